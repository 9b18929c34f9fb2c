"""Stage `demo_data`: the demo world's tokenizer and generated data: train, validation and test
splits of the general and the domain tasks, and the SFT data (the domain's train split with
general replay)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.contract import Stage
from pipeline.manifest import Manifest
from pipeline.process import stage_main


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "demo": cfg.demo.world_settings()}


def run(cfg: PipelineConfig, out: Path) -> Manifest:
    from pipeline.data import write_jsonl
    from pipeline.demo import build_tokenizer
    from pipeline.tasks import make_splits

    demo = cfg.demo
    splits = make_splits(cfg.seed, demo.train_examples, demo.domain_train_examples, demo.test_examples,
                         demo.val_examples, demo.general_replay)
    outputs = {"tokenizer": "tokenizer"}
    for name, rows in splits.items():
        if name.endswith(("_test", "_val")):  # evaluation rows: an id and the reference answer
            rows = [{"id": f"{name}-{i}", "task": r["task"], "prompt": r["prompt"], "answer": r["completion"]}
                    for i, r in enumerate(rows)]
        write_jsonl(out / f"{name}.jsonl", rows)
        outputs[name] = f"{name}.jsonl"
    build_tokenizer().save_pretrained(out / "tokenizer")
    return Manifest("demo_data", out.name, outputs)


STAGE = Stage("demo_data", run, settings, preload=("pipeline.demo", "pipeline.tasks"))

if __name__ == "__main__":
    stage_main(STAGE)
