"""Stage `pretrain` (demo world only): a small Llama trained from scratch on the general tasks,
so the model has real skills that SFT on the domain can make it forget."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from pipeline.config import DataSource, LossConfig, PipelineConfig
from pipeline.data import SFT_FIELDS, load_rows
from pipeline.demo import build_model
from pipeline.manifest import Manifest
from pipeline.stage import stage_main
from pipeline.training import TRAINING_OUTPUTS, train_sft


def run(cfg: PipelineConfig, out: Path, data: Path) -> Manifest:
    world = Manifest.read(data)
    tokenizer = AutoTokenizer.from_pretrained(world.path("tokenizer"))
    model = build_model(cfg.demo, tokenizer, cfg.model_seed)
    dataset = load_rows(DataSource(path=str(world.path("general_train"))), SFT_FIELDS)
    metrics = train_sft(model, tokenizer, dataset, cfg.pretrain.trainer, LossConfig(name="ce"), out, cfg.model_seed)
    return Manifest("pretrain", out.name, TRAINING_OUTPUTS, metrics=metrics)


if __name__ == "__main__":
    stage_main(run)
