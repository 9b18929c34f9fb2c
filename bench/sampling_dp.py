"""vLLM sampling with data_parallel_size D against one engine: same model, prompts and seed,
the completions must be equal; prints both wall times.

    python bench/sampling_dp.py [--dp 2] [--tp 1] [--n 3] [--prompts 8] [--max-tokens 12] [--model DIR] [--compile]

Without --model it builds a tiny untrained Llama (head_dim 64, one layer) in a temporary
folder. Each run starts its engines afresh (the time includes their start): `sample_vllm` as
the sample and evaluate stages call it. On a CPU the engines share the machine's cores, a
disjoint slice each; on GPUs each takes tp devices of CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `bench.sampling`

from bench.sampling import addition_prompts, build_demo_model  # noqa: E402
from pipeline.config.schema import DemoConfig, SamplingConfig  # noqa: E402
from pipeline.sampling.sampler import sample_vllm  # noqa: E402

TINY = DemoConfig(hidden_size=64, num_heads=1, num_layers=1, intermediate_size=128)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, default=2, help="data_parallel_size of the run compared with 1")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of both runs")
    parser.add_argument("--n", type=int, default=3, help="completions per prompt (temperature 1, seeded)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--model", type=Path, help="an HF model folder; default: a tiny untrained Llama")
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (default: enforce_eager)")
    args = parser.parse_args()
    prompts = addition_prompts(args.prompts)
    settings = SamplingConfig(backend="vllm", n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=7,
                              enforce_eager=not args.compile, tensor_parallel_size=args.tp)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_demo_model(Path(tmp), TINY)
        runs = {}
        for dp in (1, args.dp):
            start = time.perf_counter()
            completions = sample_vllm(model_dir, prompts, settings.model_copy(update={"data_parallel_size": dp}))
            runs[dp] = (time.perf_counter() - start, completions)
    same = runs[1][1] == runs[args.dp][1]
    print(f"\n{args.prompts} prompts x n={args.n}, max {args.max_tokens} tokens, tp {args.tp}, "
          f"{'compiled' if args.compile else 'eager'}")
    for dp, (seconds, _) in runs.items():
        print(f"data_parallel_size {dp}: {seconds:6.1f} s (engine start included)")
    print(f"completions equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":  # vLLM and the data-parallel ranks start processes that import this file again
    sys.exit(main())
