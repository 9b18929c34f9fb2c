"""Stage `reference`: the starting model's top-K log-probs at every SFT loss token, computed
once, so that EKSFT with `sft.reference: cached` trains without the reference model in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main

# SFTConfig keys that change the tokens or the loss mask of an SFT row
TOKENIZATION_KEYS = {"max_length", "truncation_mode", "packing", "packing_strategy", "padding_free",
                     "completion_only_loss", "assistant_only_loss", "chat_template_path", "dataset_text_field",
                     "eos_token", "pad_token", "dataset_kwargs"}


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    # Only the trainer keys that decide the tokens and the loss mask: rows are looked up by their
    # tokens, so the order (seed, steps) does not matter, and SFT checks every row it gets.
    tokenization = {k: v for k, v in cfg.sft.trainer.items() if k in TOKENIZATION_KEYS}
    return {"topk": cfg.sft.reference_topk, "trainer": tokenization, **cfg.model.key_settings()}


def run(cfg: PipelineConfig, out: Path, model: Path) -> Manifest:
    """`model`: the starting model's folder."""
    from pipeline.data.sources import SFT_FIELDS, load_rows
    from pipeline.models.loading import load_causal_lm, load_tokenizer, with_chat_template_kwargs
    from pipeline.training.train import cache_reference_topk

    tokenizer = load_tokenizer(model, cfg.model)
    reference = load_causal_lm(model, cfg.model)
    dataset = with_chat_template_kwargs(load_rows(cfg.data.sft, SFT_FIELDS), cfg.model)
    metrics = cache_reference_topk(reference, tokenizer, dataset, cfg.sft.trainer, cfg.seed, cfg.sft.reference_topk,
                                   out / "topk")
    return Manifest("reference", out.name, {"topk": "topk"}, metrics=metrics)


STAGE = Stage("reference", run, settings, data=lambda cfg: {"train": cfg.data.sft},
              preload=("pipeline.training.train",), system_metrics=True)

if __name__ == "__main__":
    stage_main(STAGE)
