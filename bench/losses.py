"""Loss forward+backward at real sizes: time and peak memory per loss and path, as ratios.

    python bench/losses.py                       # hidden 2560, vocab 151,936 (Qwen3-4B), 2k and 8k tokens
    python bench/losses.py --tokens 8192 --losses ce eaft dft

Paths: `naive` (the model's full logits, then the loss), `chunked` (TokenLoss.chunked from the
hidden states), `trl` (plain CE through TRL's fused LM head kernel) and `liger` (plain CE through
Liger Kernel's fused linear cross-entropy, CUDA only, where `liger-kernel` is installed), for
scale. `eksft` has its reference as a second head; `eksft-cached` reads the reference's top 64
log-probs instead. Peak memory is above what the inputs already take: on a CPU the peak resident
size, each case in its own process so that the peak is its own; on CUDA the allocator's peak,
reset between cases, which then share one process (a process start costs more than a case).
Runs unchanged on a CPU (float32) and on a CUDA GPU (bfloat16).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl.kernels import ChunkedLogProbFunction  # noqa: E402
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # noqa: E402  (the tile width TRL's trainer uses)

from pipeline.losses import chunked  # noqa: E402
from pipeline.losses.stats import TopK
from pipeline.losses.token_loss import build_loss

LOSSES = ["ce", "eaft", "dft", "gem", "eksft", "eksft-cached"]
PATHS = {"naive": LOSSES, "chunked": LOSSES, "trl": ["ce"], "liger": ["ce"]}
CACHED_K = 64


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def make_step(loss_name: str, path: str, tokens: int, hidden_size: int, vocab: int, device: str, dtype: torch.dtype):
    """A closure running one fwd+bwd of `loss_name` on `path`, with its inputs."""
    torch.manual_seed(0)
    kw = {"device": device, "dtype": dtype}
    hidden = torch.randn(1, tokens + 1, hidden_size, **kw, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False, **kw)
    labels = torch.randint(0, vocab, (1, tokens + 1), device=device)
    loss_fn = build_loss(loss_name.removesuffix("-cached"))
    ref = {}
    if loss_name == "eksft":
        ref_head = torch.nn.Linear(hidden_size, vocab, bias=False, **kw).requires_grad_(False)
        ref = {"ref_hidden": torch.randn(1, tokens + 1, hidden_size, **kw)}
    if loss_name == "eksft-cached":
        ids = torch.randint(0, vocab, (tokens, CACHED_K), device=device, dtype=torch.int32)
        ref = {"ref_topk": TopK(ids, torch.log_softmax(torch.randn(tokens, CACHED_K, device=device), -1) - 1.0)}

    def step() -> None:
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        if path == "naive":
            extra = {}
            if "ref_hidden" in ref:
                with torch.no_grad():
                    extra["ref_logits"] = ref_head(ref["ref_hidden"])
            loss = loss_fn(head(hidden), labels, ref_topk=ref.get("ref_topk"), **extra)
        elif path == "chunked":
            loss = loss_fn.chunked(hidden, head, labels, ref_lm_head=ref_head if "ref_hidden" in ref else None, **ref)
        elif path == "liger":
            loss = liger_ce(head.weight, hidden[0, :-1], labels[0, 1:])
        else:
            logp = ChunkedLogProbFunction.apply(hidden[0, :-1], head.weight, None, labels[0, 1:], 1.0,
                                                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]
            loss = -logp.sum() / tokens
        loss.backward()

    if path == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_ce = LigerFusedLinearCrossEntropyLoss()
    return step


def run_case(loss_name: str, path: str, tokens: int, hidden_size: int, vocab: int, repeat: int) -> dict:
    """One fwd+bwd of one loss on one path; time (best of `repeat`) and peak memory above the inputs."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    make_step(loss_name, path, 16, hidden_size, vocab, device, dtype)()  # warm-up: code paths, kernels, allocator
    step = make_step(loss_name, path, tokens, hidden_size, vocab, device, dtype)
    if cuda:
        base = torch.cuda.memory_allocated()  # the inputs
        step()  # a second warm-up at full size: the kernels picked for these shapes
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loss": loss_name, "path": path, "tokens": tokens, "seconds": min(times), "peak_mb": (peak - base) / 2**20,
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"}


def in_child(name: str, path: str, tokens: int, args: argparse.Namespace) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, "--case", name, path, "--tokens", str(tokens), "--hidden", str(args.hidden),
         "--vocab", str(args.vocab), "--repeat", str(args.repeat), *(["--chunk-logits", str(args.chunk_logits)] if args.chunk_logits else [])],
        capture_output=True, text=True)
    if child.returncode == 0:
        return json.loads(child.stdout.strip().splitlines()[-1])
    # out of memory, most likely: reported, the others still run
    why = "killed (out of memory)" if child.returncode in (-9, 137) else child.stderr.strip().splitlines()[-1:]
    return {"loss": name, "path": path, "tokens": tokens, "error": str(why)}


def in_process(name: str, path: str, tokens: int, args: argparse.Namespace) -> dict:
    try:
        return run_case(name, path, tokens, args.hidden, args.vocab, args.repeat)
    except (torch.OutOfMemoryError, ImportError) as e:
        return {"loss": name, "path": path, "tokens": tokens, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def ratio(results: list[dict], key: str, a: tuple[str, str], b: tuple[str, str]) -> str:
    pick = {(r["loss"], r["path"]): r for r in results if "seconds" in r}
    if a not in pick or b not in pick:
        return "n/a"
    return f"{pick[a][key] / pick[b][key]:.2f}x"


def report(results: list[dict], args: argparse.Namespace) -> None:
    for tokens in sorted({r["tokens"] for r in results}):
        rows = [r for r in results if r["tokens"] == tokens]
        device = next((r["device"] for r in rows if "device" in r), "")
        chunk = args.chunk_logits or ("the GPU's default" if "cpu" not in device else "the CPU's default")
        print(f"\n{tokens} tokens, {device}, chunked path: {chunk} logits per chunk")
        print(f"{'loss':14}{'path':9}{'seconds':>9}{'peak MB':>10}")
        for r in rows:
            if "seconds" in r:
                print(f"{r['loss']:14}{r['path']:9}{r['seconds']:9.2f}{r['peak_mb']:10.0f}")
            else:
                print(f"{r['loss']:14}{r['path']:9}  {r['error']}")
        print("ratios:")
        for name in [n for n in LOSSES if any(r["loss"] == n for r in rows)]:
            print(f"  {name} chunked: time vs its own naive {ratio(rows, 'seconds', (name, 'chunked'), (name, 'naive'))}, "
                  f"vs ce chunked {ratio(rows, 'seconds', (name, 'chunked'), ('ce', 'chunked'))}, "
                  f"vs TRL fused ce {ratio(rows, 'seconds', (name, 'chunked'), ('ce', 'trl'))}, "
                  f"vs Liger fused ce {ratio(rows, 'seconds', (name, 'chunked'), ('ce', 'liger'))}; "
                  f"peak memory vs its own naive {ratio(rows, 'peak_mb', (name, 'chunked'), (name, 'naive'))}, "
                  f"vs TRL {ratio(rows, 'peak_mb', (name, 'chunked'), ('ce', 'trl'))}, "
                  f"vs Liger {ratio(rows, 'peak_mb', (name, 'chunked'), ('ce', 'liger'))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--chunk-logits", type=int, help="logits per chunk of the chunked path; default: the device's")
    parser.add_argument("--repeat", type=int, default=1 if not torch.cuda.is_available() else 3)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: one case, in a child process
    args = parser.parse_args()
    if args.chunk_logits:  # read by TokenLoss.chunked at each call
        chunked.CHUNK_LOGITS = chunked.CHUNK_LOGITS_CUDA = args.chunk_logits
    if args.case:
        tokens = args.tokens[0]
        print(json.dumps(run_case(args.case[0], args.case[1], tokens, args.hidden, args.vocab, args.repeat)))
        return
    results = []
    for tokens in args.tokens:
        for path in args.paths:
            for name in [n for n in args.losses if n in PATHS[path]]:
                results.append(in_process(name, path, tokens, args) if torch.cuda.is_available() else
                               in_child(name, path, tokens, args))
                print(json.dumps(results[-1]), flush=True)
    report(results, args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
