"""vLLM's warm engine against an engine per stage, on the demo pipeline's four sampling stages
(evaluate_base, evaluate_sft, sample, evaluate_dpo), in one run each.

    python bench/warm_sampler.py [--config configs/demo.yaml] [--results results]

Run it after `make demo`: the demo's world, pretrained and SFT models are reused from the results
folder (hard links into a temporary one, with its own MLflow store). Both runs sample with
`sampling.backend: vllm`. First an engine per stage (`sampling.warm_engine: false`), as before:
its new samples make new pairs and a new DPO model. Then the warm engine, with the four sampling
stages forced: the first starts the engine, the others load their model's weights into it. Per
stage: start-up / work / bookkeeping, and the ratio of the sampling stages' totals. Then whether
each stage sampled the same completions in both runs (their samples' digests), and whether the
second run's pairs and DPO were reused, which they are only if its samples are the first's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLING_STAGES = ("evaluate_base", "evaluate_sft", "sample", "evaluate_dpo")
REUSED_STAGES = ("demo_data", "pretrain", "reference", "sft")


def main() -> None:
    from flows.pipeline_flow import run_pipeline
    from pipeline.config.schema import parse_config
    from pipeline_speed import isolated, phase_table, reuse_stages  # bench/: this script's folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--results", type=Path, default=Path("results"), help="the demo's results folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    reuse_stages(args.results, work, REUSED_STAGES)
    settings = isolated(yaml.safe_load(args.config.read_text()), work)
    runs, walls = {}, {}
    for label, warm in (("engine per stage", False), ("warm engine", True)):
        cfg = parse_config(settings | {"sampling": {**settings.get("sampling", {}), "backend": "vllm",
                                                    "warm_engine": warm}})
        start = time.perf_counter()
        runs[label] = run_pipeline(cfg, force=set(SAMPLING_STAGES) if warm else set())
        walls[label] = time.perf_counter() - start
    print(f"\n{args.config} with sampling.backend vllm, results in {work}; whole runs: "
          + ", ".join(f"{label} {wall:.0f} s" for label, wall in walls.items()))
    phase_table(runs)
    before, after = ({r.name: r for r in results} for results in runs.values())
    fresh, warm = (sum(by_name[name].seconds for name in SAMPLING_STAGES) for by_name in (before, after))
    print(f"the {len(SAMPLING_STAGES)} sampling stages: {fresh:.1f} s with an engine per stage, {warm:.1f} s with "
          f"the warm engine ({warm / fresh:.2f}x)")
    for name in SAMPLING_STAGES:  # the sample stage's `samples`, an evaluation's `samples_<suite>`
        digests = [{k: v for k, v in by_name[name].manifest.digests.items() if k.startswith("samples")}
                   for by_name in (before, after)]
        same = digests[0] and digests[0] == digests[1]
        print(f"{name}: the same samples in both runs ({', '.join(digests[0])}): {'yes' if same else 'NO'}")
    print("pairs and dpo reused by the warm run: "
          + ("yes" if after["pairs"].cached and after["dpo"].cached else "NO"))


if __name__ == "__main__":  # vLLM and the stages start processes that import this file again
    main()
