"""The hf backend's batches: by prompt length, with the rows that ended taken out once half of a
batch's have, against the rows kept to the batch's end, and against batches in prompt order;
on the demo's SFT model and the prompts its evaluation samples (test and validation suites, in
the stage's order).

    python bench/hf_batches.py [--results results] [--repeat 3]

Run it after `make demo`: it takes the latest world and SFT model of the results folder
(`results/latest/`) and `configs/demo.yaml`'s sampling settings. `generate` computes every row
of a batch until the batch's longest completion ends; batches in prompt order mix the tasks,
batches by length mostly hold one. Four cases: as the sampler runs now (by length, longest
first, `sampling.batch_size` prompts a batch, the ended rows out at half), the same with the
ended rows kept (one `generate` call per batch, as before), in prompt order at that batch size,
and in prompt order at 64, as it ran before that. In prompt order is one `generate_hf` call per
run of consecutive prompts: a call orders only its own prompts, which leaves a batch's work as it is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.config.schema import load_config
from pipeline.data.sources import read_jsonl
from pipeline.results.manifest import Manifest
from pipeline.sampling import sampler
from pipeline.sampling.sampler import generate_hf, load_hf

REPO = Path(__file__).resolve().parents[1]
SUITES = ("domain_test", "general_test", "domain_val", "general_val")  # target, general, val_target, val_general


def latest(results: Path, stage: str) -> Manifest:
    """The stage's latest result, as the runner records it, with its files checked."""
    pointer = results / "latest" / stage
    manifest = Manifest.find(results / stage / pointer.read_text()) if pointer.is_file() else None
    if manifest is None:
        raise SystemExit(f"{pointer}: no {stage} result here (run `make demo` first)")
    if changed := manifest.changed():
        raise SystemExit(f"{manifest.folder}: {', '.join(changed)} changed since the stage wrote them")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="the demo's results folder")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    world = latest(args.results, "demo_data")
    model, tokenizer = load_hf(latest(args.results, "sft").path("model"), world.path("tokenizer"))
    prompts = [row["prompt"] for suite in SUITES for row in read_jsonl(world.path(suite))]
    settings = load_config(REPO / "configs" / "demo.yaml").sampling

    def in_prompt_order(size: int) -> None:
        for start in range(0, len(prompts), size):
            generate_hf(model, tokenizer, prompts[start:start + size], settings)

    def ended_rows_kept() -> None:
        share, sampler.ENDED_SHARE = sampler.ENDED_SHARE, 2.0  # never: one generate call per batch
        try:
            generate_hf(model, tokenizer, prompts, settings)
        finally:
            sampler.ENDED_SHARE = share

    cases = {f"by length, {settings.batch_size} a batch (now)": lambda: generate_hf(model, tokenizer, prompts, settings),
             "by length, ended rows kept": ended_rows_kept,
             f"in prompt order, {settings.batch_size} a batch": lambda: in_prompt_order(settings.batch_size),
             "in prompt order, 64 a batch (before)": lambda: in_prompt_order(64)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):  # interleaved, so that every case sees the same machine
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"\n{len(prompts)} prompts x {settings.n} samples, at most {settings.max_tokens} tokens, "
          f"{torch.get_num_threads()} CPU threads; best of {args.repeat}:")
    best = {name: min(seconds) for name, seconds in times.items()}
    for name, seconds in times.items():
        print(f"{name:>38}: {best[name]:6.2f} s  (all: {', '.join(f'{s:.2f}' for s in seconds)})")
    now, *others = best
    for other in others:
        print(f"{now} / {other}: {best[now] / best[other]:.2f}x")


if __name__ == "__main__":
    main()
