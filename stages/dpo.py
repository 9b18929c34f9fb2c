"""Stage `dpo`: TRL's DPOTrainer from the SFT model, with the SFT model as the frozen
reference, on the on-policy pairs (stage `pairs`) or the user's preference data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import DataSource, PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    dpo = cfg.dpo.model_dump() | {"lora": cfg.dpo.lora and cfg.dpo.lora.key_settings()}
    return {"seed": cfg.seed, "dpo": dpo, **cfg.model.key_settings()}


def run(cfg: PipelineConfig, out: Path, model: Path, pairs: Path | None = None) -> Manifest:
    """`model`: the SFT model's folder; `pairs`: the `pairs` stage's file, else `data.preference`."""
    from pipeline.data.sources import PREFERENCE_FIELDS, load_rows
    from pipeline.models.loading import load_causal_lm, load_tokenizer, with_chat_template_kwargs
    from pipeline.training.train import TRAINING_OUTPUTS, train_dpo

    source = DataSource(path=str(pairs)) if pairs else cfg.data.preference
    dataset = load_rows(source, PREFERENCE_FIELDS)
    dataset = dataset.select_columns([c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names])
    dataset = with_chat_template_kwargs(dataset, cfg.model)
    tokenizer = load_tokenizer(model, cfg.model)
    policy = load_causal_lm(model, cfg.model, cfg.dpo.lora)
    # The explicit reference is the SFT model. With LoRA, or with reference log-probs computed
    # once before training, TRL's own reference (the loaded weights with the adapter off, or
    # the untrained policy) is those same SFT weights, and saves a second copy in memory.
    shared = cfg.dpo.lora is not None or cfg.dpo.trainer.get("precompute_ref_log_probs", False)
    reference = None if shared else load_causal_lm(model, cfg.model)
    metrics = train_dpo(policy, tokenizer, dataset, cfg.dpo.trainer, out, cfg.seed, reference, cfg.dpo.lora)
    return Manifest("dpo", out.name, TRAINING_OUTPUTS, metrics=metrics)


# The on-policy pairs are an input (`pairs`); given preference data is a data set it reads.
STAGE = Stage("dpo", run, settings, data=lambda cfg: {"train": cfg.data.preference}, input_data={"pairs": "train"},
              trains=True, preload=("pipeline.training.train",), system_metrics=True)

if __name__ == "__main__":
    stage_main(STAGE)
