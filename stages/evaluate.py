"""Stage `evaluate`: sample and score a model on the target suite and the general suite
("what it must not forget"), and on their validation splits where given (`val_target`,
`val_general`): Pass@K per suite, per-task Pass@1, diversity, the retention of the general
score against the base model's evaluation, and, at the reference answers' tokens of the test
suites, the model's entropy (its histogram, `entropy.json`, and mean) and the share of tokens
it is confidently wrong at (`confident_wrong`: the "confident conflicts"); and the lm-eval tasks of
`evaluate.lm_eval`, with their retention, as part of the general suite.

Sampling and scoring have keys of their own: a change of scoring alone (`evaluate.ks`, the
verifier's settings, the baseline) re-scores an earlier evaluation's saved samples."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.config.schema import EVAL_SUITES, DataSource, PipelineConfig
from pipeline.results.manifest import Manifest, atomic_write_text
from pipeline.runtime.contract import Stage
from pipeline.runtime.process import stage_main

TEST_SUITES = ("target", "general")
LM_EVAL_FILES = ("lm_eval.json", "lm_eval_samples.jsonl.gz")


def eval_suites(cfg: PipelineConfig) -> dict[str, DataSource]:
    """The suites this config evaluates on, by name (target, general, val_target, val_general)."""
    return {suite: getattr(cfg.data, key) for suite, key in EVAL_SUITES.items() if getattr(cfg.data, key) is not None}


def lm_eval_settings(cfg: PipelineConfig) -> dict[str, Any] | None:
    """What the lm-eval results depend on (None without lm-eval tasks): the tasks' settings; with
    vLLM, that the sampling's engine answers the requests (lm-eval's own backends did before);
    with the chat template applied, that it is the config's (`model.chat_template`, its kwargs),
    where one is set (before, the tokenizer's own was used)."""
    if cfg.evaluate.lm_eval is None:
        return None
    settings = cfg.evaluate.lm_eval.key_settings()
    if cfg.sampling.chosen_backend() == "vllm":
        settings["model"] = "the sampling's vLLM engine"
    if cfg.evaluate.lm_eval.apply_chat_template and (cfg.model.chat_template is not None or cfg.model.chat_template_kwargs):
        settings["chat_template"] = "the config's"
    return settings


def samples_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """What the completions, the answer entropies and the lm-eval results depend on."""
    return {"sampling": cfg.sampling.key_settings(), "max_prompts": cfg.evaluate.max_prompts,
            "lm_eval": lm_eval_settings(cfg), **cfg.model.key_settings(training=False)}


def settings(cfg: PipelineConfig) -> dict[str, Any]:
    suites = eval_suites(cfg)
    code = any(s.verifier == "code" for s in suites.values())
    lm_eval = {"lm_eval": lm_eval_settings(cfg)} if cfg.evaluate.lm_eval else {}  # absent: keys made before it existed
    return {"sampling": cfg.sampling.key_settings(), "evaluate": cfg.evaluate.key_settings(code) | lm_eval,
            "verifiers": {suite: source.verifier for suite, source in suites.items()},  # scoring only
            **cfg.model.key_settings(training=False)}


def score_suite(rows: list[dict], completions: list[list[str]], source: DataSource, cfg: PipelineConfig) -> list[dict]:
    """One result row per prompt: the completions, which are correct, and the sampling settings."""
    from pipeline.data.sources import reference
    from pipeline.evaluation.verifiers import get_verifier

    verify = get_verifier(source.verifier, **cfg.evaluate.verifier_options())
    answers = [reference(row) for row in rows]
    pairs = ([c for samples in completions for c in samples],
             [a for a, samples in zip(answers, completions, strict=True) for _ in samples])
    if source.verifier == "code":  # threads: each verdict is a sandboxed process that a thread only waits on
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            correct = pool.map(verify, *pairs)
    else:  # string comparisons: a thread per verdict would cost more than the verdict
        correct = map(verify, *pairs)
    sampled_with = cfg.sampling.key_settings()  # what decides the samples: not the devices, not a warm engine
    return [{
        "id": row.get("id", str(i)),
        "task": row.get("task"),
        "prompt": row["prompt"],
        "answer": answer,
        "completions": samples,
        "correct": [next(correct) for _ in samples],
        "sampling": sampled_with,
    } for i, (row, answer, samples) in enumerate(zip(rows, answers, completions, strict=True))]


def suite_metrics(suite: str, scored: list[dict], ks: list[int]) -> dict[str, float]:
    from pipeline.evaluation.metrics import pass_at_k_table, sample_counts

    metrics = {f"{suite}/pass_at_{k}": v for k, v in pass_at_k_table(sample_counts(scored), ks).items()}
    for task in sorted({r["task"] for r in scored if r["task"]}):
        rows = [r for r in scored if r["task"] == task]
        metrics[f"{suite}/{task}/pass_at_1"] = pass_at_k_table(sample_counts(rows), [1])[1]
    # Diversity (GEM's concern): distinct correct completions per prompt.
    metrics[f"{suite}/distinct_correct"] = sum(len({c for c, ok in zip(r["completions"], r["correct"]) if ok})
                                               for r in scored) / len(scored)
    return metrics


def saved_completions(samples: Path, rows: dict[str, list[dict]]) -> list[list[str]]:
    """An earlier evaluation's completions, suite by suite, for the same prompts in the same order."""
    from pipeline.data.sources import read_jsonl

    completions = []
    for suite, wanted in rows.items():
        saved = read_jsonl(samples / f"samples_{suite}.jsonl", [{"prompt", "completions"}])
        if [r["prompt"] for r in saved] != [r["prompt"] for r in wanted]:
            raise ValueError(f"{samples / f'samples_{suite}.jsonl'}: not the prompts of this evaluation")
        completions += [r["completions"] for r in saved]
    return completions


def run(cfg: PipelineConfig, out: Path, model: Path, baseline: Path | None = None, samples: Path | None = None) -> Manifest:
    """`model`: the model's folder; `baseline`: the base model's evaluation, for retention;
    `samples`: an earlier evaluation of the same model with the same sampling (the runner finds
    it), whose completions, entropies and lm-eval results are scored again, not made again."""
    from pipeline.data.sources import EVAL_FIELDS, load_rows, scored_fields, write_jsonl
    from pipeline.evaluation.answer_entropy import answer_entropy_histograms
    from pipeline.evaluation.lm_eval_suite import lm_eval_metrics, lm_eval_retention, run_lm_eval
    from pipeline.models.loading import load_tokenizer, rendered_prompts
    from pipeline.reporting.plots import entropy_histogram
    from pipeline.sampling.sampler import sample

    suites = eval_suites(cfg)
    rows = {suite: list(load_rows(source, scored_fields(source, EVAL_FIELDS)))[: cfg.evaluate.max_prompts]
            for suite, source in suites.items()}
    # What the model is given: chats rendered with the configured template, as in training.
    prompts = iter(rendered_prompts([r["prompt"] for suite in suites for r in rows[suite]], model, cfg.model))
    given = {suite: [next(prompts) for _ in rows[suite]] for suite in suites}
    if samples is None:
        # One sampling call for all suites: one batch for vLLM, batches by length across suites for hf.
        names = [f"data.{EVAL_SUITES[suite]} ({source.name}) row {i + 1}"
                 for suite, source in suites.items() for i in range(len(rows[suite]))]
        completions = iter(sample(model, [p for suite in suites for p in given[suite]], cfg.sampling,
                                  cfg.model.tokenizer, names, cfg.model.trust_remote_code))
    else:
        completions = iter(saved_completions(samples, rows))
    metrics: dict[str, float] = {}
    outputs = {}
    for suite, source in suites.items():
        scored = score_suite(rows[suite], [next(completions) for _ in rows[suite]], source, cfg)
        write_jsonl(out / f"samples_{suite}.jsonl", scored)
        outputs[f"samples_{suite}"] = f"samples_{suite}.jsonl"
        metrics |= suite_metrics(suite, scored, cfg.evaluate.ks)
    if cfg.evaluate.lm_eval is not None:  # with vLLM, on the sampling's engine: before this process takes GPU memory
        if samples is None:
            scores, lm_eval = run_lm_eval(model, load_tokenizer(model, cfg.model), cfg, out)
        else:
            for name in LM_EVAL_FILES:
                shutil.copy2(samples / name, out / name)
            lm_eval = json.loads((out / "lm_eval.json").read_text())
            scores = lm_eval_metrics(lm_eval["results"])
        metrics |= scores
        outputs |= {"lm_eval": "lm_eval.json", "lm_eval_samples": "lm_eval_samples.jsonl.gz"}
    # After the vLLM engine's work, which needs the GPU memory to itself; the test suites only.
    # A code problem's reference answer is its canonical solution, where the suite ships one.
    references = {suite: [{"prompt": p, "answer": r.get("answer", r.get("canonical_solution"))}
                          for p, r in zip(given[suite], rows[suite], strict=True)] for suite in TEST_SUITES if suite in rows}
    references = {suite: refs for suite, refs in references.items() if all(isinstance(r["answer"], str) for r in refs)}
    if samples is None:
        entropy = answer_entropy_histograms(model, cfg.model.tokenizer, references, cfg.model.trust_remote_code)
    else:
        entropy = json.loads((samples / "entropy.json").read_text())
    atomic_write_text(out / "entropy.json", json.dumps(entropy, indent=1))
    entropy_histogram(entropy, out / "entropy.png")
    outputs |= {"entropy": "entropy.json", "entropy_plot": "entropy.png"}
    for suite, h in entropy["suites"].items():
        metrics |= {f"{suite}/answer_entropy": h["mean"], f"{suite}/confident_wrong": h["confident_wrong"]}
    if baseline is not None:
        before = Manifest.read(baseline).metrics
        for general in (s for s in suites if s.endswith("general")):
            base = before[f"{general}/pass_at_1"]
            metrics[f"{general}/retention"] = metrics[f"{general}/pass_at_1"] / base if base > 0 else float("nan")
        if cfg.evaluate.lm_eval is not None:
            metrics |= lm_eval_retention(lm_eval, metrics, before)
    return Manifest("evaluate", out.name, outputs, metrics=metrics)


STAGE = Stage("evaluate", run, settings, data=eval_suites, samples_settings=samples_settings, scoring_inputs=("baseline",),
              preload=("pipeline.sampling.sampler", "pipeline.evaluation.answer_entropy",
                       "pipeline.evaluation.lm_eval_suite", "pipeline.evaluation.verifiers", "pipeline.reporting.plots",
                       "lm_eval.evaluator", "lm_eval.tasks", "lm_eval.models.huggingface",  # run_lm_eval's: 0.4 s
                       # transformers imports these lazily, at the first Auto class: 0.4 s a stage else
                       "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto"),
              system_metrics=True, samples=True)

if __name__ == "__main__":
    stage_main(STAGE)
