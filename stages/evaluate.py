"""Stage `evaluate`: sample and score a model on the target suite and the general suite
("what it must not forget"), and on their validation splits where given (`val_target`,
`val_general`): Pass@K per suite, per-task Pass@1, diversity, the retention of the general
score against the base model's evaluation, and, at the reference answers' tokens of the test
suites, the model's entropy (its histogram, `entropy.json`, and mean) and the share of tokens
it is confidently wrong at (`confident_wrong`: the "confident conflicts"); and the lm-eval tasks of
`evaluate.lm_eval`, with their retention, as part of the general suite."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.answer_entropy import answer_entropy_histograms
from pipeline.config import EVAL_SUITES, DataSource, PipelineConfig
from pipeline.data import EVAL_FIELDS, load_rows, reference, scored_fields, write_jsonl
from pipeline.lm_eval_suite import lm_eval_retention, run_lm_eval
from pipeline.manifest import Manifest, atomic_write_text
from pipeline.metrics import pass_at_k_table, sample_counts
from pipeline.plots import entropy_histogram
from pipeline.sampling import sample
from pipeline.stage import stage_main
from pipeline.verifiers import get_verifier

TEST_SUITES = ("target", "general")


def score_suite(rows: list[dict], completions: list[list[str]], source: DataSource, cfg: PipelineConfig) -> list[dict]:
    """One result row per prompt: the completions, which are correct, and the sampling settings."""
    verify = get_verifier(source.verifier, **cfg.evaluate.verifier_options())
    answers = [reference(row) for row in rows]
    # Threads: a code verdict is a sandboxed process that the thread only waits on.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        correct = iter(pool.map(verify, [c for samples in completions for c in samples],
                                [a for a, samples in zip(answers, completions, strict=True) for _ in samples]))
    return [{
        "id": row.get("id", str(i)),
        "task": row.get("task"),
        "prompt": row["prompt"],
        "answer": answer,
        "completions": samples,
        "correct": [next(correct) for _ in samples],
        "sampling": cfg.sampling.model_dump(),
    } for i, (row, answer, samples) in enumerate(zip(rows, answers, completions, strict=True))]


def suite_metrics(suite: str, scored: list[dict], ks: list[int]) -> dict[str, float]:
    metrics = {f"{suite}/pass_at_{k}": v for k, v in pass_at_k_table(sample_counts(scored), ks).items()}
    for task in sorted({r["task"] for r in scored if r["task"]}):
        rows = [r for r in scored if r["task"] == task]
        metrics[f"{suite}/{task}/pass_at_1"] = pass_at_k_table(sample_counts(rows), [1])[1]
    # Diversity (GEM's concern): distinct correct completions per prompt.
    metrics[f"{suite}/distinct_correct"] = sum(len({c for c, ok in zip(r["completions"], r["correct"]) if ok})
                                               for r in scored) / len(scored)
    return metrics


def run(cfg: PipelineConfig, out: Path, model: Path, baseline: Path | None = None) -> Manifest:
    suites = {suite: getattr(cfg.data, key) for suite, key in EVAL_SUITES.items() if getattr(cfg.data, key)}
    rows = {suite: list(load_rows(source, scored_fields(source, EVAL_FIELDS)))[: cfg.evaluate.max_prompts]
            for suite, source in suites.items()}
    # One sampling call for all suites: the engine starts once per stage.
    prompts = [r["prompt"] for suite in suites for r in rows[suite]]
    names = [f"data.{EVAL_SUITES[suite]} ({source.name}) row {i + 1}"
             for suite, source in suites.items() for i in range(len(rows[suite]))]
    completions = iter(sample(model, prompts, cfg.sampling, cfg.model.tokenizer, names))
    metrics: dict[str, float] = {}
    outputs = {}
    for suite, source in suites.items():
        scored = score_suite(rows[suite], [next(completions) for _ in rows[suite]], source, cfg)
        write_jsonl(out / f"samples_{suite}.jsonl", scored)
        outputs[f"samples_{suite}"] = f"samples_{suite}.jsonl"
        metrics |= suite_metrics(suite, scored, cfg.evaluate.ks)
    # After sampling, which (with vLLM) needs the GPU memory to itself; the test suites only.
    # A code problem's reference answer is its canonical solution, where the suite ships one.
    references = {suite: [{"prompt": r["prompt"], "answer": r.get("answer", r.get("canonical_solution"))}
                          for r in rows[suite]] for suite in TEST_SUITES if suite in rows}
    references = {suite: refs for suite, refs in references.items() if all(isinstance(r["answer"], str) for r in refs)}
    entropy = answer_entropy_histograms(model, cfg.model.tokenizer, references)
    atomic_write_text(out / "entropy.json", json.dumps(entropy, indent=1))
    entropy_histogram(entropy, out / "entropy.png")
    outputs |= {"entropy": "entropy.json", "entropy_plot": "entropy.png"}
    for suite, h in entropy["suites"].items():
        metrics |= {f"{suite}/answer_entropy": h["mean"], f"{suite}/confident_wrong": h["confident_wrong"]}
    if cfg.evaluate.lm_eval is not None:
        scores, lm_eval = run_lm_eval(model, cfg.model.tokenizer, cfg, out)
        metrics |= scores
        outputs |= {"lm_eval": "lm_eval.json", "lm_eval_samples": "lm_eval_samples.jsonl.gz"}
    if baseline is not None:
        before = Manifest.read(baseline).metrics
        for general in (s for s in suites if s.endswith("general")):
            base = before[f"{general}/pass_at_1"]
            metrics[f"{general}/retention"] = metrics[f"{general}/pass_at_1"] / base if base > 0 else float("nan")
        if cfg.evaluate.lm_eval is not None:
            metrics |= lm_eval_retention(lm_eval, metrics, before)
    return Manifest("evaluate", out.name, outputs, metrics=metrics)


if __name__ == "__main__":
    stage_main(run)
