"""Stage `sft`: supervised fine-tuning with the configured token loss (ce, dft, eaft, masked,
eksft, gem), completion-only, optionally with LoRA; EKSFT gets a frozen reference copy of
the starting model, or its cached top-K log-probs (stage `reference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    # The chunked and full-logits paths give the same loss and gradients (to float tolerance); a
    # cached reference is an input of its own.
    sft = cfg.sft.model_dump(exclude={"chunked_loss", "reference", "reference_topk"})
    sft["loss"] = cfg.sft.loss.resolved()  # a loss's changed default changes the key
    sft["lora"] = cfg.sft.lora and cfg.sft.lora.key_settings()
    return {"seed": cfg.seed, "sft": sft, **cfg.model.key_settings()}


def run(cfg: PipelineConfig, out: Path, model: Path, reference: Path | None = None) -> Manifest:
    """`model`: the starting model's folder; `reference`: the `reference` stage's top-K folder,
    when EKSFT's reference is cached."""
    from pipeline.data.sources import SFT_FIELDS, load_rows
    from pipeline.models.loading import load_causal_lm, load_tokenizer, with_chat_template_kwargs
    from pipeline.training.reference import ReferenceTopK
    from pipeline.training.train import TRAINING_OUTPUTS, train_sft

    tokenizer = load_tokenizer(model, cfg.model)
    policy = load_causal_lm(model, cfg.model, cfg.sft.lora)
    loss = cfg.sft.loss
    needs_model = loss.needs_reference and reference is None
    ref_model = load_causal_lm(model, cfg.model) if needs_model else None
    ref_topk = ReferenceTopK(reference) if reference else None
    dataset = with_chat_template_kwargs(load_rows(cfg.data.sft, SFT_FIELDS), cfg.model)
    metrics = train_sft(policy, tokenizer, dataset, cfg.sft.trainer, loss, out, cfg.seed, ref_model, cfg.sft.lora,
                        ref_topk, cfg.sft.chunked_loss)
    return Manifest("sft", out.name, TRAINING_OUTPUTS, metrics=metrics)


STAGE = Stage("sft", run, settings, data=lambda cfg: {"train": cfg.data.sft}, trains=True,
              preload=("pipeline.training.train", "pipeline.training.reference"), system_metrics=True)

if __name__ == "__main__":
    stage_main(STAGE)
