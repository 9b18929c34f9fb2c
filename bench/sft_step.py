"""One SFT training step per loss on a mid-size randomly initialised model, as a ratio to CE.

    python bench/sft_step.py                     # Llama, hidden 1024, 12 layers, vocab 32,000, 4 x 256 tokens
    python bench/sft_step.py --hidden 2560 --layers 36 --heads 32 --intermediate 9728 --vocab 151936 --seq 2048

Each case trains `--steps` steps with TRL's SFTTrainer (our TokenLossSFTTrainer) and reports
the median step time after the first. Cases: every loss on the chunked path and on the full
logits; EKSFT with its reference model in memory, with the reference's cached top 64
log-probs, and as the official code runs it (a policy forward without gradient, the
reference's forward, then the policy's forward with gradient: three forwards per step). It
also reports how far the cached reference's KL is from the exact one, on the same batch of the
policy after the EKSFT run's steps. Runs unchanged on a CPU and on a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from trl import SFTConfig
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import LossConfig  # noqa: E402
from pipeline.demo import build_tokenizer  # noqa: E402
from pipeline.losses import build_loss  # noqa: E402
from pipeline.reference import ReferenceTopK  # noqa: E402
from pipeline.trainer import TokenLossSFTTrainer  # noqa: E402
from pipeline.training import cache_reference_topk, trainer_config  # noqa: E402

CACHED_K = 64


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="at least 2: the first is not timed")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    start = LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32)
    tokenizer = build_tokenizer()
    # Pre-tokenized rows (TRL skips its tokenization): a quarter prompt, the rest completion.
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(10, args.vocab, (args.seq,), generator=g).tolist(),
             "completion_mask": [0] * (args.seq // 4) + [1] * (args.seq - args.seq // 4)}
            for _ in range(args.batch * (args.steps + 1))]
    dataset = Dataset.from_list(rows)
    # TRL trains pre-tokenized rows on every token unless told to use their completion_mask. The
    # learning rate is high so that the policy moves from the reference in a few steps (for the KL).
    trainer_args = {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "save_strategy": "no",
                    "report_to": "none", "logging_steps": 1, "max_length": args.seq, "completion_only_loss": True,
                    "learning_rate": 1e-3}
    work = Path(tempfile.mkdtemp())
    cache_reference_topk(start, tokenizer, dataset, trainer_args, 0, CACHED_K, work / "topk")
    reference_topk = ReferenceTopK(work / "topk")

    def clone() -> LlamaForCausalLM:
        model = LlamaForCausalLM(config).to(start.dtype)
        model.load_state_dict(start.state_dict())
        return model

    cases = [(name, chunked, "", name) for name in ("ce", "eaft", "dft", "gem") for chunked in (True, False)]
    cases += [("eksft", chunked, "model", "eksft") for chunked in (True, False)]
    cases += [("eksft", chunked, "cached", "eksft-cached") for chunked in (True, False)]
    cases += [("eksft", False, "three-forward", "eksft-3fwd")]
    results, kept = {}, None
    for name, chunked, reference, label in cases:
        cls = ThreeForwardEKSFT if reference == "three-forward" else TokenLossSFTTrainer
        timer = StepTimes()
        trainer = cls(model=clone(), args=trainer_config(SFTConfig, work / label, trainer_args, 0),
                      train_dataset=dataset,
                      processing_class=tokenizer, token_loss=build_loss(name), chunked=chunked, callbacks=[timer],
                      ref_model=clone() if reference in ("model", "three-forward") else None,
                      reference_topk=reference_topk if reference == "cached" else None)
        trainer.train()
        results[(label, chunked)] = statistics.median(timer.times[1:])
        if (label, chunked) == ("eksft", True):
            kept = trainer  # for the KL of the cached reference; the others are freed as they end
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"{label:14}{'chunked' if chunked else 'full logits':13}{results[(label, chunked)]:8.2f} s/step", flush=True)

    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nstep time, ratio to CE on the same path ({device}; hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {args.batch} x {args.seq} tokens)")
    for label in ("eaft", "dft", "gem", "eksft", "eksft-cached"):
        print(f"  {label:14} chunked {results[(label, True)] / results[('ce', True)]:.2f}x   "
              f"full logits {results[(label, False)] / results[('ce', False)]:.2f}x")
    print(f"  chunked / full logits, ce: {results[('ce', True)] / results[('ce', False)]:.2f}x")
    three = results[("eksft-3fwd", False)]
    print(f"  three-forward EKSFT / EKSFT: {three / results[('eksft', True)]:.2f}x (chunked), "
          f"{three / results[('eksft', False)]:.2f}x (full logits)")
    print(f"  three-forward EKSFT / CE (full logits): {three / results[('ce', False)]:.2f}x")
    kl_error(kept, reference_topk, start)


def kl_error(trainer: TokenLossSFTTrainer, reference_topk: ReferenceTopK, reference: LlamaForCausalLM) -> None:
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
