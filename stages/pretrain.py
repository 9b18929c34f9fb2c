"""Stage `pretrain` (demo world only): a small Llama trained from scratch on the general tasks,
so the model has real skills that SFT on the domain can make it forget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig
from pipeline.results.manifest import Manifest
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    # The world is an input; of `demo`, only the model's own settings and its seed.
    model = cfg.demo.model_dump(include=cfg.demo.MODEL_FIELDS - {"model_seed"}) | cfg.demo.world_key()
    return {"seed": cfg.model_seed, "demo": model, "trainer": cfg.pretrain.trainer}


def run(cfg: PipelineConfig, out: Path, tokenizer: Path, train: Path) -> Manifest:
    """`tokenizer` and `train`: the demo world's tokenizer and general training split (stage `demo_data`)."""
    from transformers import AutoTokenizer

    from pipeline.config.schema import DataSource, LossConfig
    from pipeline.data.sources import SFT_FIELDS, load_rows
    from pipeline.demo.world import build_model
    from pipeline.training.train import TRAINING_OUTPUTS, train_sft

    tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    model = build_model(cfg.demo, tokenizer, cfg.model_seed)
    dataset = load_rows(DataSource(path=str(train)), SFT_FIELDS)
    metrics = train_sft(model, tokenizer, dataset, cfg.pretrain.trainer, LossConfig(name="ce"), out, cfg.model_seed)
    return Manifest("pretrain", out.name, TRAINING_OUTPUTS, metrics=metrics)


STAGE = Stage("pretrain", run, settings, input_data={"train": "train"}, trains=True,
              preload=("pipeline.training.train", "pipeline.demo.world"), system_metrics=True)

if __name__ == "__main__":
    stage_main(STAGE)
