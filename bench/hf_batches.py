"""The hf backend's batches by prompt length against batches in prompt order, on a trained demo
model and the prompts an evaluation samples (the test and validation suites, 32 samples each).

    python bench/hf_batches.py [--results results] [--repeat 3]

Run it after `make demo`: it takes the SFT model and the demo world from the results folder.
`generate` computes every row of a batch until the batch's longest completion ends; batches in
prompt order mix the tasks, batches by length mostly hold one. In prompt order is one
`generate_hf` call per run of `sampling.batch_size` consecutive prompts: a call orders only its
own prompts, which leaves a batch's work as it is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.config.schema import SamplingConfig
from pipeline.data.sources import read_jsonl
from pipeline.sampling.sampler import generate_hf, load_hf

SUITES = ("general_test", "domain_test", "general_val", "domain_val")


def only_folder(pattern: str, results: Path) -> Path:
    found = sorted(results.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{results}: expected one {pattern} (run `make demo` first), found {len(found)}")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="the demo's results folder")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    world = only_folder("demo_data/*/", args.results)
    model, tokenizer = load_hf(only_folder("sft/*/model", args.results), world / "tokenizer")
    prompts = [row["prompt"] for suite in SUITES for row in read_jsonl(world / f"{suite}.jsonl")]
    settings = SamplingConfig(backend="hf", n=32, temperature=0.7, max_tokens=12)  # the demo's
    size = settings.batch_size

    def by_length() -> list[list[str]]:
        return generate_hf(model, tokenizer, prompts, settings)

    def in_prompt_order() -> list[list[str]]:
        return [c for i in range(0, len(prompts), size) for c in generate_hf(model, tokenizer, prompts[i:i + size], settings)]

    times: dict[str, list[float]] = {"by length": [], "in prompt order": []}
    for _ in range(args.repeat):  # interleaved, so that both see the same machine
        for name, run in (("by length", by_length), ("in prompt order", in_prompt_order)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"\n{len(prompts)} prompts x {settings.n} samples, batches of {size} prompts, "
          f"{torch.get_num_threads()} CPU threads; best of {args.repeat}:")
    for name, seconds in times.items():
        print(f"{name:>16}: {min(seconds):6.2f} s  (all: {', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"by length / in prompt order: {min(times['by length']) / min(times['in prompt order']):.2f}x")


if __name__ == "__main__":
    main()
