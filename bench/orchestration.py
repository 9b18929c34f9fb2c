"""What the orchestration costs per stage: Prefect, MLflow and the stage's own process.

    python bench/orchestration.py

Runs the pipeline on a very small demo world (a few seconds of work per stage) twice in a
temporary folder, with an MLflow SQLite store there and the Prefect API from the environment
(a temporary local server without one). Per stage, the overhead is the wall time the pipeline
spent on it minus the time the stage function itself ran (recorded in its manifest): the
child process's start and imports, the Prefect task, the MLflow run and its logging. The
second run finds every stage cached: its per-stage time is orchestration alone.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.pipeline import run_pipeline  # noqa: E402
from pipeline.config import parse_config  # noqa: E402

TINY = {
    "demo": {"hidden_size": 64, "num_heads": 1, "num_layers": 1, "intermediate_size": 64,
             "train_examples": 64, "domain_train_examples": 32, "test_examples": 2},
    "pretrain": {"trainer": {"max_steps": 3, "per_device_train_batch_size": 8}},
    "sft": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8}},
    "sampling": {"max_tokens": 4, "backend": "hf"},
    "dpo": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "gradient_checkpointing": False}},
}


def main() -> None:
    work = Path(tempfile.mkdtemp())
    preference = work / "preference.jsonl"
    preference.write_text('{"prompt": "12*3=", "chosen": "63", "rejected": "36"}\n' * 8)
    cfg = parse_config({"name": "orchestration", "results_dir": str(work / "results"), **TINY,
                        "data": {"preference": {"path": str(preference)}},
                        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}})
    start = time.perf_counter()
    first = run_pipeline(cfg)
    first_wall = time.perf_counter() - start
    start = time.perf_counter()
    cached = run_pipeline(cfg)
    cached_wall = time.perf_counter() - start

    print(f"{'stage':15}{'wall s':>8}{'work s':>8}{'overhead s':>12}{'cached s':>10}")
    overheads = []
    for run, again in zip(first, cached):
        overhead = run.seconds - run.manifest.seconds
        overheads.append(overhead)
        print(f"{run.name:15}{run.seconds:8.1f}{run.manifest.seconds:8.1f}{overhead:12.1f}{again.seconds:10.2f}")
    print(f"\noverhead per run stage: mean {statistics.mean(overheads):.1f} s, max {max(overheads):.1f} s "
          f"({len(first)} stages; pipeline {first_wall:.0f} s, of which stage work "
          f"{sum(r.manifest.seconds for r in first):.0f} s)")
    print(f"all cached: {cached_wall:.1f} s in all, {max(r.seconds for r in cached):.2f} s per stage at most")


if __name__ == "__main__":
    main()
