"""The report of `posttrain compare`: each arm's learning rate, chosen on the validation
prompts; for each phase (after SFT, after SFT + DPO), each arm's metrics at that rate as mean
and 95% interval over seeds; each arm's paired difference from the baseline arm, bootstrapped
over problems and seeds; a verdict in words; every rate's target skill against retention (the
frontier) and the retention at a matched target skill; the answer-token entropy histograms
before and after training; and plots. Written as `report.json` (every number), `report.md`
and a self-contained `report.html`."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import markdown
import numpy as np

from pipeline.config.schema import PipelineConfig
from pipeline.data.sources import read_jsonl
from pipeline.evaluation.metrics import mean_interval, paired_bootstrap, pass_at_k, pass_at_k_table, sample_counts
from pipeline.reporting.plots import (PHASE_TITLES, entropy_histograms, frontier_plot, gain_vs_retention, loss_curves,
                                      lr_label, pass_at_k_curves)
from pipeline.results.manifest import Manifest, atomic_write_text

PHASES = {"sft": "evaluate_sft", "dpo": "evaluate_dpo"}  # phase -> the evaluation after it
PLOTS = {"pass_at_k": "pass_at_k.png", "gain_vs_retention": "gain_vs_retention.png", "loss_curves": "loss_curves.png",
         "entropy": "entropy_histograms.png", "frontier": "frontier.png"}
# compare.select -> the validation metrics (after SFT) whose sum scores a learning rate
SELECT = {"target+retention": ("val_target/pass_at_1", "val_general/retention"), "target": ("val_target/pass_at_1",),
          "retention": ("val_general/retention",)}


@dataclass
class ArmRun:
    """One arm at one seed and SFT learning rate: its pipeline's MLflow run, its stages'
    manifests (the base model's evaluation, `evaluate_base`, among them) and MLflow runs."""

    arm: str
    seed: int
    learning_rate: float
    run_id: str
    manifests: dict[str, Manifest]
    stage_runs: dict[str, str]


def headline_metrics(ks: list[int]) -> list[str]:
    return [*(f"target/pass_at_{k}" for k in ks), "general/pass_at_1", "general/retention", "target/distinct_correct",
            "target/answer_entropy", "general/answer_entropy"]


def compared_metrics(ks: list[int]) -> list[str]:
    """The metrics with a paired test: per-problem scores exist for them."""
    return [*(f"target/pass_at_{k}" for k in ks), "general/pass_at_1"]


def problem_scores(evaluation: Manifest, suite: str, k: int) -> dict[str, float]:
    """Each problem's Pass@k estimate from its samples, by problem id."""
    return {row["id"]: pass_at_k(len(row["correct"]), sum(row["correct"]), k)
            for row in read_jsonl(evaluation.path(f"samples_{suite}"))}


def paired_differences(runs: list[ArmRun], arm: str, baseline: str, stage: str, metric: str,
                       resamples: int) -> dict[str, float]:
    """Arm minus baseline on `metric`, paired by seed and problem."""
    suite, _, k = metric.partition("/pass_at_")
    rows = []
    for seed in sorted({r.seed for r in runs}):
        ours, theirs = (next(r for r in runs if r.arm == a and r.seed == seed).manifests[stage] for a in (arm, baseline))
        a, b = problem_scores(ours, suite, int(k)), problem_scores(theirs, suite, int(k))
        if a.keys() != b.keys():
            raise ValueError(f"{arm} and {baseline} (seed {seed}) were not evaluated on the same problems")
        rows.append([a[p] - b[p] for p in sorted(a)])
    return paired_bootstrap(np.array(rows), resamples)


def pass_at_k_curve(evaluations: list[Manifest], n: int) -> dict[str, list[float]]:
    """Target Pass@K for K = 1..n: the mean over seeds, and the lowest and highest seed."""
    per_seed = []
    for evaluation in evaluations:
        counts = sample_counts(read_jsonl(evaluation.path("samples_target")))
        per_seed.append(list(pass_at_k_table(counts, list(range(1, n + 1))).values()))
    curves = np.array(per_seed)
    return {"k": list(range(1, curves.shape[1] + 1)), "mean": curves.mean(0).tolist(),
            "low": curves.min(0).tolist(), "high": curves.max(0).tolist()}


def pooled_entropy(evaluations: list[Manifest], edges: list[float]) -> dict[str, list[int]]:
    """Per suite, the answer-token entropy histogram's counts summed over the evaluations (seeds)."""
    histograms = [json.loads(e.path("entropy").read_text()) for e in evaluations]
    if any(h["edges"] != edges for h in histograms):
        raise ValueError("the entropy histograms have other bins than the base model's (another vocabulary?): "
                         + ", ".join(str(e.folder) for e in evaluations))
    return {suite: np.sum([h["suites"][suite]["counts"] for h in histograms], axis=0).tolist()
            for suite in histograms[0]["suites"]}


def verdict(differences: dict[str, dict[str, float]], ks: list[int]) -> str:
    """Better, worse or within noise on target Pass@K, from each interval's sign."""
    better = [k for k in ks if differences[f"target/pass_at_{k}"]["low"] > 0]
    worse = [k for k in ks if differences[f"target/pass_at_{k}"]["high"] < 0]
    at = lambda ks_: "/".join(map(str, ks_))  # noqa: E731
    if better and worse:
        return f"mixed: better at target Pass@{at(better)}, worse at Pass@{at(worse)}"
    if better:
        return f"better at target Pass@{at(better)}" + ("" if len(better) == len(ks) else ", the rest within noise")
    if worse:
        return f"worse at target Pass@{at(worse)}" + ("" if len(worse) == len(ks) else ", the rest within noise")
    return "no difference beyond noise at any target Pass@K"


def stats(values: list[float]) -> dict[str, float | None]:
    """Mean and 95% t-interval over seeds; no interval (None) from fewer than two values."""
    if len(values) >= 2:
        return dict(zip(("mean", "low", "high"), mean_interval(values)))
    return {"mean": values[0] if values else None, "low": None, "high": None}


def validation_score(run: ArmRun, select: str) -> float:
    """A run's score for choosing its learning rate: the sum of the validation metrics that
    `select` names, after SFT. Never a test metric, so the test prompts stay unseen."""
    evaluation = run.manifests[PHASES["sft"]]
    missing = [m for m in SELECT[select] if m not in evaluation.metrics]
    if missing:
        raise ValueError(
            f"`{run.arm}` at learning rate {lr_label(run.learning_rate)}, seed {run.seed}: its evaluation after SFT "
            f"({evaluation.folder}) has no {', '.join(missing)} (made before validation metrics existed, or without "
            "data.target_val / data.general_val): run its evaluate stage again")
    return sum(evaluation.metrics[m] for m in SELECT[select])


def select_learning_rates(runs: list[ArmRun], select: str) -> dict[str, dict]:
    """Per arm, each learning rate's validation score (mean over seeds) and the best rate; a
    NaN score (the retention of a base model that solves nothing) never wins, a tie goes to
    the lower rate. An arm with one rate has nothing to choose: no score, no validation needed."""
    selected = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        rates = sorted({r.learning_rate for r in runs if r.arm == arm})
        if len(rates) == 1:
            selected[arm] = {"learning_rate": rates[0], "score": None, "scores": []}
            continue
        scores = {lr: float(np.mean([validation_score(r, select) for r in runs
                                     if r.arm == arm and r.learning_rate == lr])) for lr in rates}
        best = max(rates, key=lambda lr: -np.inf if np.isnan(scores[lr]) else scores[lr])
        selected[arm] = {"learning_rate": best, "score": scores[best],
                         "scores": [{"learning_rate": lr, "score": scores[lr]} for lr in rates]}
    return selected


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (target, retention) point is on the Pareto frontier: no other point is at
    least as good on both and better on one. A point with a NaN (no retention to take) is not."""
    return [not (np.isnan(x) or np.isnan(y)) and not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)
            for x, y in points]


def frontier(runs: list[ArmRun], stage: str, bases: dict[int, Manifest]) -> list[dict]:
    """One arm's points after `stage`, one per learning rate (ascending): its target Pass@1, the
    gain over each seed's base model and the general retention, over seeds; and which points
    are on the arm's Pareto frontier (target against retention)."""
    points = []
    for lr in sorted({r.learning_rate for r in runs}):
        group = [r for r in runs if r.learning_rate == lr]
        target = [r.manifests[stage].metrics["target/pass_at_1"] for r in group]
        retention = [r.manifests[stage].metrics["general/retention"] for r in group]
        gain = [t - bases[r.seed].metrics["target/pass_at_1"] for t, r in zip(target, group)]
        points.append({
            "learning_rate": lr, "seeds": [r.seed for r in group], "target": stats(target), "gain": stats(gain),
            "retention": stats(retention), "per_seed": [list(v) for v in zip(target, retention, gain)]})
    on_frontier = pareto([(p["target"]["mean"], p["retention"]["mean"]) for p in points])
    return [{**p, "pareto": flag} for p, flag in zip(points, on_frontier)]


def seed_curves(runs: list[ArmRun], stage: str) -> dict[int, list[tuple[float, float]]]:
    """Per seed, one arm's (target Pass@1, general retention) after `stage`, in learning-rate order."""
    ordered = sorted(runs, key=lambda r: r.learning_rate)
    return {seed: [(r.manifests[stage].metrics["target/pass_at_1"], r.manifests[stage].metrics["general/retention"])
                   for r in ordered if r.seed == seed] for seed in sorted({r.seed for r in runs})}


def retention_at(curve: list[tuple[float, float]], level: float) -> float | None:
    """The retention where a (target, retention) curve, in learning-rate order, first reaches
    target `level`: linear between the two points it falls between; None if it never does, or
    where the retention there is NaN. (First in rate order: a curve that turns back reaches a
    level twice, and the lower rate is the one that gets there with the least training.)"""
    for i, (target, retention) in enumerate(curve):
        value = None
        if i and (curve[i - 1][0] - level) * (target - level) < 0:
            (t0, r0) = curve[i - 1]
            value = r0 + (level - t0) / (target - t0) * (retention - r0)
        elif target == level:
            value = retention
        if value is not None:
            return None if np.isnan(value) else value
    return None


def matched_levels(points: dict[str, list[dict]], configured: list[float] | None, baseline: str) -> dict[str, dict]:
    """The target Pass@1 levels to match, by their name in the report, each with the arms compared
    there. A level must lie within each of those arms' spans of target Pass@1 over their rates
    (means over seeds): the middle of the span all arms share, if they share one; for each other
    arm, the middle of the span it shares with the baseline (arms whose targets never meet have
    no level); then `compare.matched_target`'s, for every arm."""
    spans = {arm: (min(p["target"]["mean"] for p in ps), max(p["target"]["mean"] for p in ps))
             for arm, ps in points.items()}

    def middle(arms: list[str]) -> float | None:
        low, high = max(spans[a][0] for a in arms), min(spans[a][1] for a in arms)
        return (low + high) / 2 if low <= high else None

    levels: dict[str, dict] = {}

    def add(level: float, source: str, arms: list[str]) -> None:
        entry = levels.setdefault(f"{level:.3f}", {"level": level, "source": source, "arms": []})
        if new := [a for a in arms if a not in entry["arms"]]:
            if entry["arms"]:  # e.g. two arms whose spans with the baseline have middles that round alike: both named
                entry["source"] += f"; {source}"
            entry["arms"] += new

    if (common := middle(list(points))) is not None:
        add(common, "the middle of the span every arm reaches", list(points))
    for arm in points:
        if arm != baseline and (level := middle([baseline, arm])) is not None:
            add(level, f"the middle of the span `{arm}` and `{baseline}` both reach", [baseline, arm])
    for level in configured or []:
        add(level, "compare.matched_target", list(points))
    return levels


def matched_retention(curves: dict[str, dict[int, list]], level: float, baseline: str) -> dict[str, dict]:
    """Per arm, the retention at target `level` over the seeds whose curve reaches it, and its
    difference from the baseline's, paired by seed (over the seeds where both reach it)."""
    at = {arm: {seed: retention_at(curve, level) for seed, curve in by_seed.items()} for arm, by_seed in curves.items()}
    matched = {}
    for arm, by_seed in at.items():
        reached = {seed: value for seed, value in by_seed.items() if value is not None}
        matched[arm] = {**stats(list(reached.values())), "seeds_reached": len(reached), "seeds": len(by_seed)}
        if arm != baseline:
            paired = [v - at[baseline][s] for s, v in reached.items() if at[baseline].get(s) is not None]
            matched[arm]["difference"] = {**stats(paired), "seeds": len(paired)}
    return matched


def chosen_runs(runs: list[ArmRun], selected: dict[str, dict]) -> list[ArmRun]:
    return [r for r in runs if r.learning_rate == selected[r.arm]["learning_rate"]]


def base_metrics(bases: list[Manifest], ks: list[int]) -> dict[str, float]:
    """The base model's headline metrics; the mean over base models when each seed has its own."""
    return {m: float(np.mean([b.metrics[m] for b in bases])) for m in headline_metrics(ks)
            if all(m in b.metrics for b in bases)}


def run_entry(run: ArmRun, ks: list[int], selected: dict[str, dict]) -> dict:
    def phase(stage: str) -> dict:
        metrics = run.manifests[stage].metrics
        return {"run_id": run.stage_runs[stage], "key": run.manifests[stage].key,
                "metrics": {m: metrics[m] for m in headline_metrics(ks)},
                "validation": {m: v for m, v in metrics.items() if m.startswith("val_")}}

    return {"arm": run.arm, "seed": run.seed, "learning_rate": run.learning_rate, "run_id": run.run_id,
            "selected": run.learning_rate == selected[run.arm]["learning_rate"],
            **{p: phase(stage) for p, stage in PHASES.items()}}


LM_EVAL_RETENTION = "general/lm_eval/retention"  # the mean over the lm-eval tasks


def lm_eval_retention_by_task(runs: list[ArmRun], stage: str, arms: list[str]) -> dict[str, dict[str, dict]]:
    """Per arm, the general retention of each lm-eval task (and their mean) after `stage`, over
    seeds; {} without lm-eval tasks."""
    names = sorted({m for r in runs for m in r.manifests[stage].metrics
                    if m.startswith("general/lm_eval/") and m.endswith("/retention")},
                   key=lambda m: (m == LM_EVAL_RETENTION, m))  # the mean last
    return {arm: {m: stats([r.manifests[stage].metrics[m] for r in runs if r.arm == arm]) for m in names}
            for arm in arms} if names else {}


def build_report(cfg: PipelineConfig, runs: list[ArmRun]) -> dict:
    """Every number of the report, from the runs' manifests and sample files. The summary,
    differences, curves, entropy and verdicts are at each arm's learning rate chosen on the
    validation prompts; the frontier and the matched-target comparison span every rate."""
    compare, ks = cfg.compare, cfg.evaluate.ks
    phases = list(PHASES)
    selected = select_learning_rates(runs, compare.select)
    chosen = chosen_runs(runs, selected)
    by_seed = {r.seed: r.manifests["evaluate_base"] for r in runs}
    bases = list(by_seed.values())  # one per seed, so that a base model shared by seeds weighs as often
    report: dict = {
        "name": cfg.name, "arms": {a: loss.model_dump() for a, loss in compare.arms.items()},
        "seeds": compare.seeds, "base_seeds": compare.base_seeds, "baseline": compare.baseline, "ks": ks,
        "phases": phases, "learning_rates": sorted({r.learning_rate for r in runs}), "select": compare.select,
        "selected": selected, "base": base_metrics(bases, ks),
        "runs": [run_entry(r, ks, selected) for r in runs],
        "summary": {}, "differences": {}, "curves": {}, "verdicts": {}, "frontier": {}, "matched": {},
        "matched_levels": {}, "lm_eval": {},
    }
    edges = json.loads(bases[0].path("entropy").read_text())["edges"]
    report["entropy"] = {"edges": edges, "base": pooled_entropy(bases, edges)}
    for phase in phases:
        stage = PHASES[phase]
        by_arm = {a: [r for r in chosen if r.arm == a] for a in compare.arms}
        report["summary"][phase] = {a: {m: stats([r.manifests[stage].metrics[m] for r in arm_runs])
                                        for m in headline_metrics(ks)} for a, arm_runs in by_arm.items()}
        report["curves"][phase] = {a: pass_at_k_curve([r.manifests[stage] for r in arm_runs], cfg.sampling.n)
                                   for a, arm_runs in by_arm.items()}
        report["entropy"][phase] = {a: pooled_entropy([r.manifests[stage] for r in arm_runs], edges)
                                    for a, arm_runs in by_arm.items()}
        report["differences"][phase] = {
            a: {m: paired_differences(chosen, a, compare.baseline, stage, m, compare.bootstrap) for m in compared_metrics(ks)}
            for a in compare.arms if a != compare.baseline}
        report["verdicts"][phase] = {a: verdict(d, ks) for a, d in report["differences"][phase].items()}
        report["lm_eval"][phase] = lm_eval_retention_by_task(chosen, stage, list(compare.arms))
        every_rate = {a: [r for r in runs if r.arm == a] for a in compare.arms}
        report["frontier"][phase] = {a: frontier(arm_runs, stage, by_seed) for a, arm_runs in every_rate.items()}
        levels = matched_levels(report["frontier"][phase], compare.matched_target, compare.baseline)
        curves = {a: seed_curves(arm_runs, stage) for a, arm_runs in every_rate.items()}
        report["matched_levels"][phase] = levels
        report["matched"][phase] = {
            name: matched_retention({a: curves[a] for a in level["arms"]}, level["level"], compare.baseline)
            for name, level in levels.items()}
    return report


def interval(s: dict[str, float], signed: bool = False) -> str:
    return f"{s['mean']:{'+' if signed else ''}.3f} ± {(s['high'] - s['low']) / 2:.3f}"


def metric_title(metric: str) -> str:
    suite, _, name = metric.partition("/")
    return f"{suite} " + name.replace("pass_at_", "Pass@").replace("_", " ")


def reached(s: dict, signed: bool = False) -> str:
    """A matched-target value: with its interval, or as far as the seeds that reach the level allow."""
    if s["mean"] is None:
        return "not reached"
    if s["low"] is None:
        return f"{s['mean']:{'+' if signed else ''}.3f} (one seed, no interval)"
    return interval(s, signed)


def selection_lines(report: dict) -> list[str]:
    rates = report["learning_rates"]
    if len(rates) == 1:
        return ["", f"Every arm runs at one SFT learning rate, {lr_label(rates[0])}: nothing to choose."]
    rule = " + ".join(f"`{m}`" for m in SELECT[report["select"]])
    lines = ["", "## Learning rate per arm, chosen on validation", "",
             f"Each arm runs at SFT learning rates {', '.join(map(lr_label, rates))}. Its rate is the one with the "
             f"highest mean over seeds of {rule} after SFT (`compare.select: {report['select']}`), scored on the "
             "validation prompts only, never on the test prompts; a tie goes to the lower rate. Every table and plot "
             "of this report but the frontier and the matched-target comparison is at each arm's chosen rate.", "",
             "| arm | " + " | ".join(f"score at {lr_label(lr)}" for lr in rates) + " | chosen rate |",
             "|---" * (len(rates) + 2) + "|"]
    for arm, chosen in report["selected"].items():
        scores = {s["learning_rate"]: s["score"] for s in chosen["scores"]}
        lines.append(f"| `{arm}` | " + " | ".join(f"{scores[lr]:.3f}" if lr in scores else "" for lr in rates)
                     + f" | {lr_label(chosen['learning_rate'])} |")
    return lines


def frontier_lines(report: dict) -> list[str]:
    lines = ["", "## Frontier: target skill against retention, per learning rate", "",
             "Each arm at each learning rate: target Pass@1, its gain over the base model (each seed's own) and "
             "general retention, mean over seeds ± the half-width of the 95% t-interval. Pareto: no other rate of "
             "the same arm has at least the target Pass@1 and the retention, and more of one.", "",
             "| phase | arm | learning rate | target Pass@1 | target Pass@1 gain | general retention | Pareto |",
             "|---|---|---|---|---|---|---|"]
    for phase in report["phases"]:
        for arm, points in report["frontier"][phase].items():
            for p in points:
                chosen = " (chosen)" if p["learning_rate"] == report["selected"][arm]["learning_rate"] else ""
                lines.append(f"| {PHASE_TITLES[phase]} | `{arm}` | {lr_label(p['learning_rate'])}{chosen} | "
                             f"{interval(p['target'])} | {interval(p['gain'], signed=True)} | "
                             f"{interval(p['retention'])} | {'yes' if p['pareto'] else ''} |")
    return lines


def matched_lines(report: dict) -> list[str]:
    baseline = report["baseline"]
    lines = ["", "## Retention at matched target skill", "",
             "General retention where each arm's target Pass@1 reaches the same level: per seed, along the arm's "
             "learning rates in ascending order, linear between the two rates the level falls between (the first "
             "such pair); then the mean ± 95% t-interval over the seeds that reach the level, and the difference "
             f"from `{baseline}` paired by seed, over the seeds where both reach it. A level lies within the span "
             "of target Pass@1 (means over seeds) of every arm compared there: the middle of the span all arms "
             f"reach, and of the span each arm and `{baseline}` both reach."]
    unmatched = []
    for phase in report["phases"]:
        spans = {a: (min(p["target"]["mean"] for p in ps), max(p["target"]["mean"] for p in ps))
                 for a, ps in report["frontier"][phase].items()}
        for arm in spans:
            if arm != baseline and not any(arm in level["arms"] for level in report["matched_levels"][phase].values()):
                unmatched.append(f"- {PHASE_TITLES[phase]}: `{arm}` (target Pass@1 {spans[arm][0]:.3f} to "
                             f"{spans[arm][1]:.3f} over its rates) and `{baseline}` ({spans[baseline][0]:.3f} to "
                             f"{spans[baseline][1]:.3f}) reach no common level: no matched comparison.")
    lines += [""] + unmatched if unmatched else []
    if len(report["learning_rates"]) == 1:
        lines.append("With one learning rate each seed's curve is a single point: it reaches only its own level.")
    lines += ["", f"| phase | target Pass@1 level | arm | general retention | seeds reaching it | difference from "
              f"`{baseline}` |", "|---|---|---|---|---|---|"]
    for phase in report["phases"]:
        for name, level in report["matched_levels"][phase].items():
            for arm, m in report["matched"][phase][name].items():
                diff = reached(m["difference"], signed=True) if "difference" in m else ""
                lines.append(f"| {PHASE_TITLES[phase]} | {name} ({level['source']}) | `{arm}` | {reached(m)} | "
                             f"{m['seeds_reached']} of {m['seeds']} | {diff} |")
    return lines


def lm_eval_lines(report: dict) -> list[str]:
    """The general retention per lm-eval task, per phase and arm; none without lm-eval tasks."""
    phases = [p for p in report["phases"] if report["lm_eval"].get(p)]
    if not phases:
        return []
    names = list(next(iter(report["lm_eval"][phases[0]].values())))
    titles = ["mean over tasks" if m == LM_EVAL_RETENTION else m.removeprefix("general/lm_eval/").removesuffix("/retention")
              for m in names]
    lines = ["", "## General retention per lm-eval task", "",
             "Each lm-eval task's score after training over the base model's (its primary metric: "
             "`evaluate.lm_eval.tasks[].metric`, else the first it reports), mean over seeds ± the half-width of the "
             "95% t-interval, at each arm's chosen learning rate.", "",
             "| phase | arm | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for phase in phases:
        for arm, values in report["lm_eval"][phase].items():
            lines.append(f"| {PHASE_TITLES[phase]} | `{arm}` | "
                         + " | ".join(interval(values[m]) for m in names) + " |")
    return lines


def render_markdown(report: dict) -> str:
    ks, baseline = report["ks"], report["baseline"]
    seeds, base_seeds = report["seeds"], report["base_seeds"]
    bases = (f" Each seed starts from its own demo base model, pretrained with seed {', '.join(map(str, base_seeds))} "
             "respectively (the base model row is their mean)." if base_seeds else "")
    lines = [
        f"# Comparison `{report['name']}`",
        "",
        "Arms (the SFT loss; everything else identical): "
        + ", ".join(f"`{a}` ({', '.join(f'{k}={v}' for k, v in loss.items())})" for a, loss in report["arms"].items())
        + f". Seeds: {', '.join(map(str, seeds))} (the SFT and DPO trainers' seed).{bases} Each arm is shown at its "
        "learning rate chosen on the validation prompts (below). Values are the mean over seeds "
        f"± the half-width of its 95% t-interval; differences are paired by problem and seed, with a 95% "
        f"bootstrap interval over problems and seeds.",
        "",
        "## Verdict",
        "",
    ]
    rate = {arm: lr_label(s["learning_rate"]) for arm, s in report["selected"].items()}
    for phase in report["phases"]:
        for arm, text in report["verdicts"][phase].items():
            lines.append(f"- {PHASE_TITLES[phase]}: `{arm}` (lr {rate[arm]}) vs `{baseline}` (lr {rate[baseline]}): "
                         f"{text}.")
    lines += selection_lines(report)
    headline = headline_metrics(ks)
    base = report["base"]
    for phase in report["phases"]:
        title = PHASE_TITLES[phase]
        lines += ["", f"## {title[0].upper()}{title[1:]}", "",
                  "| arm | " + " | ".join(metric_title(m) for m in headline) + " |",
                  "|---" * (len(headline) + 1) + "|",
                  "| base model | " + " | ".join(f"{base[m]:.3f}" if m in base else "" for m in headline) + " |"]
        for arm, summary in report["summary"][phase].items():
            lines.append(f"| `{arm}` | " + " | ".join(interval(summary[m]) for m in headline) + " |")
    lines += ["", f"## Paired differences from `{baseline}`", "",
              "| phase | arm | metric | difference | 95% interval | p |", "|---|---|---|---|---|---|"]
    for phase in report["phases"]:
        for arm, diffs in report["differences"][phase].items():
            for metric, d in diffs.items():
                lines.append(f"| {PHASE_TITLES[phase]} | `{arm}` | {metric_title(metric)} | {d['diff']:+.3f} | "
                             f"[{d['low']:+.3f}, {d['high']:+.3f}] | {d['p']:.3f} |")
    lines += frontier_lines(report) + matched_lines(report) + lm_eval_lines(report)
    lines += ["", "## Plots", "",
              f"![Target Pass@K against K, per arm and phase]({PLOTS['pass_at_k']})", "",
              f"![Target Pass@1 gain against general retention]({PLOTS['gain_vs_retention']})", "",
              f"![General retention against target Pass@1 at each learning rate, per arm and phase]"
              f"({PLOTS['frontier']})", "",
              f"![Training loss curves]({PLOTS['loss_curves']})", "",
              f"![Answer-token entropy histograms before and after training, per arm]({PLOTS['entropy']})", "",
              "## Runs", "", "| arm | learning rate | seed | pipeline run | "
              + " | ".join(f"evaluation {PHASE_TITLES[p]}" for p in report["phases"]) + " |",
              "|---|---|---|---|" + "---|" * len(report["phases"])]
    for run in report["runs"]:
        lines.append(f"| `{run['arm']}` | {lr_label(run['learning_rate'])}{' (chosen)' if run['selected'] else ''} | "
                     f"{run['seed']} | `{run['run_id']}` | "
                     + " | ".join(f"`{run[p]['run_id']}`" for p in report["phases"]) + " |")
    return "\n".join(lines) + "\n"


def render_html(markdown_text: str, folder: Path) -> str:
    """The Markdown as one HTML file, images inlined, so it reads the same as an MLflow artifact."""
    body = markdown.markdown(markdown_text, extensions=["tables"])

    def inline(match: re.Match) -> str:
        data = base64.b64encode((folder / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return f"<!doctype html>\n<html><head><meta charset='utf-8'><style>{style}</style></head><body>\n{body}\n</body></html>\n"


def write_report(cfg: PipelineConfig, runs: list[ArmRun], out: Path) -> dict[str, Path]:
    """Compute the report and write its files to `out`; returns them by name. The JSON is
    written last, so a folder whose report.json exists holds a complete report."""
    report = build_report(cfg, runs)
    out.mkdir(parents=True, exist_ok=True)
    pass_at_k_curves(report, out / PLOTS["pass_at_k"])
    gain_vs_retention(report, out / PLOTS["gain_vs_retention"])
    frontier_plot(report, out / PLOTS["frontier"])
    chosen = chosen_runs(runs, report["selected"])
    histories = {stage: {a: [json.loads(r.manifests[stage].path("log_history").read_text())
                             for r in chosen if r.arm == a] for a in report["arms"]} for stage in ("sft", "dpo")}
    loss_curves(histories, out / PLOTS["loss_curves"])
    entropy_histograms(report, out / PLOTS["entropy"])
    text = render_markdown(report)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", render_html(text, out))
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    files = {"report.md", "report.html", "report.json", *PLOTS.values()}
    return {name: out / name for name in sorted(files)}
