"""Stage `sft`: supervised fine-tuning with the configured token loss (ce, dft, eaft, masked,
eksft, gem), completion-only, optionally with LoRA; EKSFT gets a frozen reference copy of
the starting model, or its cached top-K log-probs (stage `reference`)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import PipelineConfig
from pipeline.data import SFT_FIELDS, load_rows
from pipeline.losses import build_loss
from pipeline.manifest import Manifest
from pipeline.reference import ReferenceTopK
from pipeline.stage import stage_main
from pipeline.training import TRAINING_OUTPUTS, train_sft


def run(cfg: PipelineConfig, out: Path, model: Path, reference: Path | None = None) -> Manifest:
    """`reference`: the `reference` stage's folder, when EKSFT's reference is cached."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    loss = cfg.sft.loss
    needs_model = build_loss(loss.name, **loss.params).needs_reference and reference is None
    ref_model = AutoModelForCausalLM.from_pretrained(model, dtype="auto") if needs_model else None
    ref_topk = ReferenceTopK(Manifest.read(reference).path("topk")) if reference else None
    dataset = load_rows(cfg.data.sft, SFT_FIELDS)
    metrics = train_sft(policy, tokenizer, dataset, cfg.sft.trainer, loss, out, cfg.seed, ref_model, cfg.sft.lora,
                        ref_topk, cfg.sft.chunked_loss)
    return Manifest("sft", out.name, TRAINING_OUTPUTS, metrics=metrics)


if __name__ == "__main__":
    stage_main(run)
