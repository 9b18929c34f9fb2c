"""The demo pipeline's wall time per stage, split into start-up, work and bookkeeping, before and
after, in one run; then one SFT step of our trainer against stock TRL's SFTTrainer.

    python bench/pipeline_speed.py [--config configs/demo.yaml] [--no-before] [--sft-steps 20]

After: the pipeline as it runs now (stages forked from the preloaded server, `sampling.backend`
as the config says: auto samples with transformers `generate` on a CPU), into a fresh results
folder with its own MLflow SQLite store. Before: the same stages again with a fresh Python per
stage (`launch.preload: false`) and a vLLM engine per sampling stage (`sampling.backend: vllm`,
`warm_engine: false`), the demo's defaults before; the demo world and its pretrained model are
reused, every later stage is forced. Per stage: start-up (the stage's process, its imports, its MLflow run, until
the stage function starts), work (the function), bookkeeping (the manifest, MLflow's logging,
the process's end). Then `bench/sft_step.py` on the demo model's shape and a demo SFT batch: our
CE step (chunked and full logits) against stock TRL `SFTTrainer`'s (its own LM head and loss).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Imported in main(), not here: each stage forked from the server imports this script again as
# multiprocessing's __mp_main__, and Prefect's import (1.5 s) would count as every stage's start-up.
if TYPE_CHECKING:
    from pipeline.orchestration.runner import StageResult


def isolated(settings: dict, folder: Path) -> dict:
    """A config's settings with a results folder and an MLflow SQLite store of their own in `folder`."""
    return settings | {"results_dir": str(folder / "results"), "tracking": {"uri": f"sqlite:///{folder / 'mlflow.db'}"}}


def reuse_stages(source: Path, folder: Path, stages: tuple[str, ...]) -> None:
    """Hard links to the results of `stages` in the results folder `source`, in `folder`'s: reused
    there wherever their keys are the config's."""
    for stage in stages:
        if (source / stage).is_dir():
            shutil.copytree(source / stage, folder / "results" / stage, copy_function=os.link)


def phase_table(runs: dict[str, list[StageResult]]) -> None:
    """Start-up / work / bookkeeping per stage, one column group per run; the totals, and with
    two runs their ratios over the stages both ran."""
    labels = list(runs)
    print(f"{'stage':15}" + "".join(f"{label + ': start-up / work / bookkeeping = wall':>52}" for label in labels))
    by_stage = {label: {r.name: r for r in results} for label, results in runs.items()}

    def cells(label: str, name: str) -> tuple[float, float, float, float] | None:
        result = by_stage[label].get(name)
        phases = result.phases() if result else None
        return None if phases is None else (*phases, result.seconds)

    def row(values: tuple[float, ...] | None, missing: str) -> str:
        return f"{'%6.1f s / %6.1f s / %5.1f s = %6.1f s' % values if values else missing:>52}"

    names = list(by_stage[labels[-1]])
    for name in names:
        print(f"{name:15}" + "".join(row(cells(label, name), "reused" if name in by_stage[label] else "-")
                                     for label in labels))

    def total(label: str, among: list[str]) -> tuple[float, ...]:
        ran = [c for c in (cells(label, name) for name in among) if c]
        return tuple(map(sum, zip(*ran))) if ran else (0.0,) * 4

    print(f"{'all it ran':15}" + "".join(row(total(label, names), "") for label in labels))
    both = [name for name in names if all(cells(label, name) for label in labels)]
    if len(labels) == 2 and both:
        before, after = (total(label, both) for label in labels)
        print(f"{'both ran':15}" + row(before, "") + row(after, ""))
        print(f"after / before over the {len(both)} stages both ran: start-up {after[0] / before[0]:.2f}x, "
              f"work {after[1] / before[1]:.2f}x, bookkeeping {after[2] / before[2]:.2f}x, wall {after[3] / before[3]:.2f}x")


def main() -> None:
    from flows.pipeline_flow import run_pipeline
    from flows.wiring import DEMO_STAGES, pipeline_stages
    from pipeline.config.schema import parse_config
    from pipeline.demo.world import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--no-before", dest="before", action="store_false", help="only the pipeline as it runs now")
    parser.add_argument("--sft-steps", type=int, default=20, help="steps of each SFT case; 0 leaves the SFT step out")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    settings = isolated(yaml.safe_load(args.config.read_text()), work)
    cfg = parse_config(settings)
    runs = {}
    start = time.perf_counter()
    runs["after"] = run_pipeline(cfg)
    after_wall = time.perf_counter() - start
    if args.before:
        earlier = parse_config(settings | {"launch": {"preload": False},
                                           "sampling": {**settings.get("sampling", {}), "backend": "vllm",
                                                        "warm_engine": False}})
        forced = set(pipeline_stages(earlier)) - set(DEMO_STAGES)
        runs = {"before": run_pipeline(earlier, force=forced), **runs}
    print(f"\n{args.config}, results in {work}; the pipeline as it runs now took {after_wall:.0f} s in all")
    phase_table(runs)

    if args.sft_steps:
        demo = cfg.demo
        sft = cfg.sft.trainer
        print(f"\nOne SFT step on the demo model's shape ({demo.num_layers} layers, hidden {demo.hidden_size}), "
              f"{sft.get('per_device_train_batch_size', 8)} x {sft.get('max_length', 1024)} tokens:", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("sft_step.py")), "--arch", "llama",
                        "--hidden", str(demo.hidden_size), "--layers", str(demo.num_layers), "--heads",
                        str(demo.num_heads), "--intermediate", str(demo.intermediate_size), "--vocab", str(len(build_tokenizer())),
                        "--seq", str(sft.get("max_length", 1024)), "--batch", str(sft.get("per_device_train_batch_size", 8)),
                        "--steps", str(args.sft_steps), "--cases", "ce", "trl"], check=True)


if __name__ == "__main__":  # vLLM starts processes that import this file again
    main()
