"""A compare's pipelines one at a time against side by side (`compare.parallel`), in one run:
wall time, and whether side by side made the same results.

    python bench/compare_parallel.py [--config configs/demo.yaml] [--arms ce eaft] [--seeds 0 1]
                                     [--threads 1] [--reuse results]

The config's pipeline, compared over `--arms` and `--seeds` at its own learning rate, three
times, each into a fresh results folder with its own MLflow store: each stage on every core, one
pipeline at a time (what a CPU machine does by default); `launch.cpu_threads: --threads`, one at
a time; the same, as many side by side as the cores hold (`compare.parallel: auto`). The stages
every pipeline shares (the demo world and its base model) are hard-linked from `--reuse` where
it holds them under the same keys (after `make demo`), else made by the first run and linked
from it. Prints each run's wall time, the ratios, and whether the last two made the same files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = ("demo_data", "pretrain")
TIMED = ("log_history",)  # the trainer's log records its own run time


def outputs(results: Path) -> dict[tuple[str, str], dict[str, str]]:
    from pipeline.results.manifest import Manifest

    return {(m.parent.parent.name, m.parent.name): {k: v for k, v in Manifest.read(m.parent).digests.items()
                                                    if k not in TIMED}
            for m in results.glob("*/*/manifest.json") if m.parent.parent.name not in SHARED}


def main() -> None:
    from flows.compare import run_compare
    from pipeline.config.schema import parse_config
    from pipeline.orchestration.devices import pipeline_devices
    from pipeline_speed import isolated, reuse_stages  # bench/: this script's folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--arms", nargs="+", default=["ce", "eaft"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="launch.cpu_threads of the last two runs")
    parser.add_argument("--reuse", type=Path, default=Path("results"), help="results holding the shared stages")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    base = yaml.safe_load(args.config.read_text())
    compare = {"arms": {arm: {"name": arm} for arm in args.arms}, "seeds": args.seeds, "learning_rates": None,
               "base_seeds": None}
    runs = {"every core, one at a time": ({}, 1), f"{args.threads} thread(s), one at a time": (
        {"cpu_threads": args.threads}, 1), f"{args.threads} thread(s), side by side": ({"cpu_threads": args.threads}, "auto")}
    seconds, folders = {}, {}
    for i, (label, (launch, parallel)) in enumerate(runs.items()):
        folder = work / f"run{i}"
        settings = isolated(base, folder) | {
            "launch": base.get("launch", {}) | launch,
            "compare": base.get("compare", {}) | compare | {"parallel": parallel, "report_dir": str(folder / "report")}}
        cfg = parse_config(settings)
        reuse_stages(args.reuse if i == 0 else folders[next(iter(runs))] / "results", folder, SHARED)
        side_by_side = len(pipeline_devices(cfg, len(args.arms) * len(args.seeds)))
        print(f"\n=== {label}: {side_by_side} pipeline(s) at a time", flush=True)
        start = time.perf_counter()
        run_compare(cfg)
        seconds[label], folders[label] = time.perf_counter() - start, folder

    print(f"\n{args.config}, arms {' '.join(args.arms)}, seeds {' '.join(map(str, args.seeds))}; results in {work}")
    first = next(iter(seconds.values()))
    for label, s in seconds.items():
        print(f"{label:32} {s:7.1f} s  {s / first:.2f}x")
    alone, together = (outputs(folders[label] / "results") for label in list(runs)[1:])
    same = alone == together
    print(f"side by side against one at a time, both at {args.threads} thread(s): "
          f"{list(seconds.values())[2] / list(seconds.values())[1]:.2f}x the time; "
          f"{'the same' if same else 'NOT the same'} {len(together)} results (weights, samples, scores)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":  # stages forked from the server import this file again
    main()
