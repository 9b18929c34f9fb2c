"""Samples per second of vLLM and of transformers `generate`: same model, prompts and n.

    python bench/sampling.py [--n 32] [--prompts 16] [--max-tokens 64] [--model DIR] [--eager]

Without --model it builds the demo-size model (untrained) in a temporary folder. Start
times (vLLM's engine, HF's model load) are reported apart from the sampling rates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config.schema import DemoConfig, SamplingConfig
from pipeline.demo.world import build_model, build_tokenizer
from pipeline.sampling.sampler import generate_hf, generate_vllm, load_hf, vllm_engine, vllm_engine_args


def build_demo_model(folder: Path, cfg: DemoConfig = DemoConfig()) -> Path:
    """An untrained demo-world model (and its tokenizer) saved in `folder`."""
    tokenizer = build_tokenizer()
    build_model(cfg, tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def addition_prompts(count: int) -> list[str]:
    return [f"{17 * i}+{29 * i}=" for i in range(count)]


def measure(generate: Callable[[list[str]], list[list[str]]], prompts: list[str]) -> tuple[float, float]:
    """Samples per second, and mean completion length in characters (both backends stop at EOS)."""
    generate(prompts[:1])  # warm-up: the first call's one-time costs
    start = time.perf_counter()
    completions = [text for texts in generate(prompts) for text in texts]
    return len(completions) / (time.perf_counter() - start), sum(map(len, completions)) / len(completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32, help="completions per prompt")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, help="an HF model folder; default: the untrained demo model")
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile and CUDA graphs")
    args = parser.parse_args()
    settings = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, enforce_eager=args.eager)
    prompts = addition_prompts(args.prompts)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_demo_model(Path(tmp))
        # vLLM first: its engine wants the GPU memory free, and returns all of it on shutdown.
        start = time.perf_counter()
        with vllm_engine(model_dir, settings) as llm:
            vllm_start = time.perf_counter() - start
            vllm_rate, vllm_length = measure(lambda p: generate_vllm(llm, p, settings), prompts)
        start = time.perf_counter()
        model, tokenizer = load_hf(model_dir)
        hf_load = time.perf_counter() - start
        hf_rate, hf_length = measure(lambda p: generate_hf(model, tokenizer, p, settings), prompts)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{model_dir if args.model else 'demo model (untrained)'} on {device}: {args.prompts} prompts x n={args.n}, "
          f"max {args.max_tokens} tokens, temperature 1; vLLM {vllm_engine_args(settings)}")
    print(f"start:  vLLM engine {vllm_start:.1f} s, HF model load {hf_load:.1f} s")
    print(f"vLLM:         {vllm_rate:8.1f} samples/s  (mean completion {vllm_length:.1f} chars)")
    print(f"HF generate:  {hf_rate:8.1f} samples/s  (mean completion {hf_length:.1f} chars)")
    print(f"vLLM / HF:    {vllm_rate / hf_rate:8.2f}x")


if __name__ == "__main__":  # vLLM starts processes that import this file again
    main()
