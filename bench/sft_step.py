"""One SFT training step per loss on a randomly initialised model, as a ratio to CE and to stock TRL.

    python bench/sft_step.py                     # Llama, hidden 1024, 12 layers, vocab 32,000, 4 x 256 tokens
    python bench/sft_step.py --qwen3-0.6b --seq 2048   # Qwen3-0.6B's shape: 28 layers, vocab 151,936
    python bench/sft_step.py --cases ce trl --paths chunked

Each case trains `--steps` steps with TRL's SFTTrainer (our TokenLossSFTTrainer) and reports
the median step time after the first, tokens per second and the model FLOPs utilisation (MFU:
6 x the matmul parameters + the attention's 12 x layers x width x sequence, per token, over the
card's peak; EKSFT's reference forward is not counted as useful work). Cases: every loss on
the chunked path and on the full logits; `trl`, stock TRL SFTTrainer with its own fused LM
head and loss (its `nll`); EKSFT with its reference model in memory, with the reference's
cached top 64 log-probs, and as the official code runs it (a policy forward without gradient,
the reference's forward, then the policy's forward with gradient: three forwards per step). It
also reports how far the cached reference's KL is from the exact one, on the same batch of the
policy after the EKSFT run's steps. Runs unchanged on a CPU and on a CUDA GPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from trl import SFTConfig, SFTTrainer
from datasets import Dataset
from datasets.table import InMemoryTable
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen3Config, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo.world import build_tokenizer  # noqa: E402
from pipeline.losses.token_loss import build_loss
from pipeline.training.reference import ReferenceTopK  # noqa: E402
from pipeline.training.train import cache_reference_topk, trainer_config  # noqa: E402
from pipeline.training import trainer as trainer_module  # noqa: E402
from pipeline.training.trainer import TokenLossSFTTrainer  # noqa: E402

CACHED_K = 64
CASES = ["ce", "eaft", "dft", "gem", "eksft", "eksft-cached", "eksft-3fwd", "trl"]
# Dense bf16 peak of the cards MFU is reported for, in FLOP/s (NVIDIA's data sheets), by a part of
# the device's name; the first that matches counts (the PCIe and NVL H100s are slower than the SXM).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
QWEN3_0_6B = {"arch": "qwen3", "hidden": 1024, "layers": 28, "heads": 16, "kv_heads": 8, "head_dim": 128,
              "intermediate": 3072, "vocab": 151936, "tied": True}


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


class ThreeForwardEKSFT(TokenLossSFTTrainer):
    """EKSFT as the official code steps: an extra policy forward without gradient first."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def model_config(args: argparse.Namespace) -> LlamaConfig | Qwen3Config:
    shape = {"hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
             "num_key_value_heads": args.kv_heads or args.heads, "intermediate_size": args.intermediate,
             "vocab_size": args.vocab, "max_position_embeddings": args.seq, "tie_word_embeddings": args.tied}
    if args.arch == "qwen3":
        return Qwen3Config(**shape, head_dim=args.head_dim or args.hidden // args.heads)
    return LlamaConfig(**shape)


def train_flops_per_token(model: PreTrainedModel, seq: int) -> float:
    """6 x the parameters a token goes through in matmuls (the LM head, not the embedding lookup), plus
    the attention's scores and values, 12 x layers x query width x sequence (PaLM's appendix B)."""
    config = model.config
    matmul = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if config.tie_word_embeddings:
        matmul += model.get_output_embeddings().weight.numel()
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 6 * matmul + 12 * config.num_hidden_layers * width * seq


def peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((peak for card, peak in PEAK_BF16.items() if card in name), None)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["llama", "qwen3"], default="llama")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, help="default: --heads")
    parser.add_argument("--head-dim", type=int, help="qwen3 only; default: hidden / heads")
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tied", action="store_true", help="the LM head shares the embedding's weight")
    parser.add_argument("--qwen3-0.6b", dest="qwen3", action="store_true", help="Qwen3-0.6B's shape (overrides the above)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="at least 2: the first is not timed")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--paths", nargs="+", default=["chunked", "full"], choices=["chunked", "full"])
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU; default: known cards' bf16 peak")
    args = parser.parse_args()
    if args.qwen3:
        vars(args).update(QWEN3_0_6B)

    cuda = torch.cuda.is_available()
    config = model_config(args)
    torch.manual_seed(0)
    start = AutoModelForCausalLM.from_config(config).to(torch.bfloat16 if cuda else torch.float32)
    tokenizer = build_tokenizer()
    # Pre-tokenized rows (TRL skips its tokenization): a quarter prompt, the rest completion.
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(10, args.vocab, (args.seq,), generator=g).tolist(),
             "completion_mask": [0] * (args.seq // 4) + [1] * (args.seq - args.seq // 4)}
            for _ in range(args.batch * (args.steps + 1))]
    # Named, so that datasets does not fingerprint the table by pickling it, which fails with Python
    # 3.12 and pyarrow 25 ("Can't pickle <class 'MonthDayNano'>", seen on the GPU machine).
    dataset = Dataset(InMemoryTable.from_pylist(rows), fingerprint=f"sft-step-{args.seq}x{len(rows)}-{args.vocab}")
    # TRL trains pre-tokenized rows on every token unless told to use their completion_mask. The
    # learning rate is high so that the policy moves from the reference in a few steps (for the KL).
    trainer_args = {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "save_strategy": "no",
                    "report_to": "none", "logging_steps": 1, "max_length": args.seq, "completion_only_loss": True,
                    "learning_rate": 1e-3}
    work = Path(tempfile.mkdtemp())

    def clone() -> PreTrainedModel:
        # a copy of memory (a fresh model's random init of 0.6B weights takes seconds) of a model no
        # trainer has had: TRL's SFTTrainer patches the model it is given
        return copy.deepcopy(start)

    reference_topk = None
    if "eksft-cached" in args.cases:
        cache_reference_topk(clone(), tokenizer, dataset, trainer_args, 0, CACHED_K, work / "topk")
        reference_topk = ReferenceTopK(work / "topk")

    own_path = ("eksft-3fwd", "trl")  # the full logits, and TRL's own head: one path each
    cases = [(label, path == "chunked") for label in args.cases if label not in own_path for path in args.paths]
    cases += [(label, False) for label in args.cases if label in own_path]
    flops, peak = train_flops_per_token(start, args.seq), peak_flops(args)
    tokens = args.batch * args.seq
    results, kept = {}, None
    # The chunked cases take the chunked path even where a batch's logits fit in one chunk (small
    # shapes), where training itself takes the full logits: this bench compares the two paths.
    trainer_module.tokens_per_chunk = lambda vocab, device: 0
    for label, chunked in cases:
        timer = StepTimes()
        common = {"model": clone(), "args": trainer_config(SFTConfig, work / label, trainer_args, 0),
                  "train_dataset": dataset, "processing_class": tokenizer, "callbacks": [timer]}
        if label == "trl":
            trainer = SFTTrainer(**common)
        else:
            name = label.removesuffix("-cached").removesuffix("-3fwd")
            cls = ThreeForwardEKSFT if label == "eksft-3fwd" else TokenLossSFTTrainer
            trainer = cls(**common, token_loss=build_loss(name), chunked=chunked,
                          ref_model=clone() if label in ("eksft", "eksft-3fwd") else None,
                          reference_topk=reference_topk if label == "eksft-cached" else None)
        trainer.train()
        results[(label, chunked)] = seconds = statistics.median(timer.times[1:])
        if (label, chunked) == ("eksft", True) and reference_topk is not None:
            kept = trainer  # for the KL of the cached reference; the others are freed as they end
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        mfu = f"  MFU {flops * tokens / seconds / peak:.1%}" if peak else ""
        path = "TRL's head" if label == "trl" else "chunked" if chunked else "full logits"
        print(f"{label:14}{path:13}{seconds:8.3f} s/step  {tokens / seconds:10.0f} tokens/s{mfu}", flush=True)

    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nstep time, ratio to CE on the same path ({device}; {args.arch}, hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {args.batch} x {args.seq} tokens; {flops / 1e9:.2f} GFLOP per token trained)")

    def ratio(a: tuple[str, bool], b: tuple[str, bool]) -> str:
        return f"{results[a] / results[b]:.2f}x" if a in results and b in results else "n/a"

    for label in ("eaft", "dft", "gem", "eksft", "eksft-cached"):
        if label in args.cases:
            print(f"  {label:14} chunked {ratio((label, True), ('ce', True))}   full logits {ratio((label, False), ('ce', False))}")
    print(f"  chunked / full logits, ce: {ratio(('ce', True), ('ce', False))}")
    print(f"  ours / stock TRL SFTTrainer, ce: {ratio(('ce', True), ('trl', False))} (chunked), "
          f"{ratio(('ce', False), ('trl', False))} (full logits)")
    if "eksft-3fwd" in args.cases:
        print(f"  three-forward EKSFT / EKSFT: {ratio(('eksft-3fwd', False), ('eksft', True))} (chunked), "
              f"{ratio(('eksft-3fwd', False), ('eksft', False))} (full logits); "
              f"/ CE (full logits): {ratio(('eksft-3fwd', False), ('ce', False))}")
    if kept is not None:
        kl_error(kept, reference_topk, start)


def kl_error(trainer: TokenLossSFTTrainer, reference_topk: ReferenceTopK, reference: PreTrainedModel) -> None:
    """The cached reference's KL against the exact one, per token, for the policy EKSFT trained."""
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = trainer.model(**inputs).logits
        exact, cached = build_loss("eksft"), build_loss("eksft")
        exact(logits, batch["labels"], ref_logits=reference.to(logits.device)(**inputs).logits)
        cached(logits, batch["labels"], ref_topk=reference_topk.lookup(batch))
    e, c = float(exact.diagnostics["kl"]), float(cached.diagnostics["kl"])
    print(f"  cached top-{CACHED_K} KL: mean {c:.4f} vs exact {e:.4f} nats per token ({abs(c - e) / e:.1%} off)")


if __name__ == "__main__":
    main()
