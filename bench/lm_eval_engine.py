"""An evaluation's lm-eval tasks three ways, in one run: lm-eval's HF backend; the sampling's
vLLM engine started for the tasks (`sampling.warm_engine: false`); and the run's warm engine,
already running as it is once the evaluation has sampled.

    python bench/lm_eval_engine.py [--config configs/demo.yaml] [--model M] [--general G]

Run it after `make demo`: the model is the demo's newest SFT model and the general suite the demo
world's (`results/sft/*/model`, `results/demo_data/*/general_test.jsonl`), unless given. An
untimed HF run goes first, so that lm-eval's import, its task index and the suite's data set are
ready for all three alike. Prints each way's wall time (the model's load included, the warm
engine's start not), its ratio to HF's, and how far each vLLM way's lm-eval metrics are from HF's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def newest(pattern: str) -> Path:
    found = sorted(Path().glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing at {pattern}: run `make demo` first, or name it")
    return found[-1]


def main() -> None:
    from pipeline.config.schema import DataSource, load_config
    from pipeline.evaluation.lm_eval_suite import run_lm_eval
    from pipeline.models.loading import load_tokenizer
    from pipeline.sampling import warm
    from pipeline.sampling.sampler import SAMPLER_ENV, prompt_seeds, warm_session

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--model", type=Path, help="a model folder (default: the demo's newest SFT model)")
    parser.add_argument("--general", type=Path, help="the general suite (default: the demo world's)")
    args = parser.parse_args()
    model = args.model or newest("results/sft/*/model")
    general = args.general or newest("results/demo_data/*/general_test.jsonl")
    cfg = load_config(args.config)
    if cfg.evaluate.lm_eval is None:
        raise SystemExit(f"{args.config} sets no evaluate.lm_eval tasks")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"general_eval": DataSource(path=str(general))})})
    vllm = cfg.sampling.model_copy(update={"backend": "vllm"})

    def timed(label: str, sampling) -> tuple[float, dict[str, float]]:
        out = Path(tempfile.mkdtemp(prefix=f"bench-lm-eval-{label}-"))
        start = time.perf_counter()
        metrics, _ = run_lm_eval(model, load_tokenizer(model, cfg.model), cfg.model_copy(update={"sampling": sampling}),
                                 out)
        return time.perf_counter() - start, metrics

    hf = cfg.sampling.model_copy(update={"backend": "hf"})
    timed("warm-up", hf)
    runs = {"hf": timed("hf", hf),
            "vllm, an engine for the tasks": timed("vllm", vllm.model_copy(update={"warm_engine": False}))}
    sampler = warm.Sampler({})
    try:
        os.environ[SAMPLER_ENV] = sampler.address()
        with warm_session(os.environ[SAMPLER_ENV], model, vllm, cfg.model.tokenizer) as call:  # the evaluation's sampling
            call("sample", ["1+1="], prompt_seeds(vllm.seed, 1))
        runs["vllm, the run's warm engine"] = timed("warm", vllm)
    finally:
        sampler.stop()
        os.environ.pop(SAMPLER_ENV, None)
    hf_time, hf_metrics = runs["hf"]
    print(f"\nlm-eval tasks {[t.task for t in cfg.evaluate.lm_eval.tasks]} on {model}, general suite {general}:")
    for label, (seconds, metrics) in runs.items():
        gap = max(abs(metrics[k] - hf_metrics[k]) for k in hf_metrics)
        print(f"  {label}: {seconds:.1f} s ({seconds / hf_time:.2f}x hf); largest metric difference from hf {gap:.4f}")


if __name__ == "__main__":
    main()
