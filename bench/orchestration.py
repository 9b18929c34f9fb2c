"""What the orchestration costs per stage: Prefect, MLflow and the stage's own process.

    python bench/orchestration.py

Runs the pipeline on a very small demo world (a few seconds of work per stage) in a temporary
folder, with an MLflow SQLite store there and the Prefect API from the environment (a
temporary local server without one): once with every stage a fresh `python -m stages.<name>`
(`launch.preload: false`), once forked from the preloaded server (the default), then again
with every stage cached. Per stage, the overhead is the wall time the pipeline spent on it
minus the time the stage function itself ran (recorded in its manifest): the process's start
and imports, the Prefect task, the MLflow run and its logging. The cached run's per-stage
time is orchestration alone. Then the commands a user types on that config, each in a fresh
process as from a shell: `posttrain validate`, `posttrain status` and a fully cached
`posttrain run` (with the local Prefect server `run` keeps, and with Prefect's temporary
server per command), against the targets of issue 21 (2 s, 3 s, 8 s).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Imported in main(), not here: each stage forked from the server imports this script again as
# multiprocessing's __mp_main__, and Prefect's import (1.5 s) would count as every stage's overhead.
if TYPE_CHECKING:
    from pipeline.config.schema import PipelineConfig
    from pipeline.orchestration.runner import StageResult

TINY = {
    "demo": {"hidden_size": 64, "num_heads": 1, "num_layers": 1, "intermediate_size": 64,
             "train_examples": 64, "domain_train_examples": 32, "test_examples": 2, "val_examples": 1},
    "pretrain": {"trainer": {"max_steps": 3, "per_device_train_batch_size": 8}},
    "sft": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8}},
    "sampling": {"max_tokens": 4, "backend": "hf"},
    "dpo": {"trainer": {"max_steps": 2, "per_device_train_batch_size": 8, "gradient_checkpointing": False}},
}


def main() -> None:
    from flows.pipeline_flow import run_pipeline
    from pipeline.config.schema import parse_config
    from pipeline.runtime.process import free_port

    work = Path(tempfile.mkdtemp())
    preference = work / "preference.jsonl"
    preference.write_text('{"prompt": "12*3=", "chosen": "63", "rejected": "36"}\n' * 8)

    def settings(preload: bool) -> dict:
        results = work / ("results" if preload else "results-fresh")
        return {"name": "orchestration", "results_dir": str(results), **TINY, "launch": {"preload": preload},
                "data": {"preference": {"path": str(preference)}}, "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"}}

    def config(preload: bool) -> PipelineConfig:
        return parse_config(settings(preload))

    fresh = run_pipeline(config(preload=False))
    start = time.perf_counter()
    first = run_pipeline(config(preload=True))
    first_wall = time.perf_counter() - start
    start = time.perf_counter()
    cached = run_pipeline(config(preload=True))
    cached_wall = time.perf_counter() - start

    def overhead(run: StageResult) -> float:
        return run.seconds - run.manifest.seconds

    print(f"{'stage':15}{'work s':>8}{'overhead s, fresh python':>26}{'forked':>8}{'cached s':>10}")
    for a, b, again in zip(fresh, first, cached):
        print(f"{b.name:15}{b.manifest.seconds:8.1f}{overhead(a):26.1f}{overhead(b):8.1f}{again.seconds:10.2f}")
    for label, runs in (("fresh python per stage", fresh), ("forked from the preloaded server", first)):
        costs = [overhead(r) for r in runs]
        print(f"overhead per run stage, {label}: mean {statistics.mean(costs):.1f} s, max {max(costs):.1f} s, "
              f"after the first: mean {statistics.mean(costs[1:]):.1f} s")
    print(f"preloaded / fresh, mean overhead: {statistics.mean(map(overhead, first)) / statistics.mean(map(overhead, fresh)):.2f}x"
          f" ({len(first)} stages; preloaded pipeline {first_wall:.0f} s, of which stage work "
          f"{sum(r.manifest.seconds for r in first):.0f} s)")
    print(f"all cached: {cached_wall:.1f} s in all, {max(r.seconds for r in cached):.2f} s per stage at most")

    config_file = work / "orchestration.yaml"
    config_file.write_text(yaml.safe_dump(settings(preload=True)))
    # The commands as a user runs them with no Prefect API configured: `run` keeps one local Prefect
    # server for the next commands (here on a port and in a home of its own, stopped at the end).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {
        "POSTTRAIN_PREFECT_SERVER": "keep", "POSTTRAIN_PREFECT_PORT": str(free_port()),
        "PREFECT_HOME": str(work / "prefect")}

    def seconds(command: str, **extra: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", command, str(config_file)], check=True, capture_output=True,
                       env=env | extra)
        return time.perf_counter() - start

    try:
        for command, target in (("validate", 2.0), ("status", 3.0)):
            took = seconds(command)
            print(f"posttrain {command} (all cached): {took:.1f} s, {took / target:.1f}x its {target:.0f} s target")
        starting = seconds("run")
        took = seconds("run")
        print(f"posttrain run (all cached), the local Prefect server kept: {took:.1f} s, {took / 8.0:.1f}x its 8 s "
              f"target (the first run, which starts that server: {starting:.1f} s; with Prefect's temporary server "
              f"per command, POSTTRAIN_PREFECT_SERVER=temporary: {seconds('run', POSTTRAIN_PREFECT_SERVER='temporary'):.1f} s)")
    finally:
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "stop"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
