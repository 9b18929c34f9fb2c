"""The report of `posttrain compare`: for each phase (after SFT, after SFT + DPO), each arm's
metrics as mean and 95% interval over seeds; each arm's paired difference from the baseline
arm, bootstrapped over problems and seeds; a verdict in words; the answer-token entropy
histograms before and after training; and plots. Written as
`report.json` (every number), `report.md` and a self-contained `report.html`."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path

import markdown
import numpy as np

from pipeline.config import PipelineConfig
from pipeline.data import read_jsonl
from pipeline.manifest import Manifest, atomic_write_text
from pipeline.metrics import mean_interval, paired_bootstrap, pass_at_k, pass_at_k_table, sample_counts
from pipeline.plots import PHASE_TITLES, entropy_histograms, gain_vs_retention, loss_curves, pass_at_k_curves

PHASES = {"sft": "evaluate_sft", "dpo": "evaluate_dpo"}  # phase -> the evaluation after it
PLOTS = {"pass_at_k": "pass_at_k.png", "gain_vs_retention": "gain_vs_retention.png", "loss_curves": "loss_curves.png",
         "entropy": "entropy_histograms.png"}


@dataclass
class ArmRun:
    """One arm at one seed: its pipeline's MLflow run, its stages' manifests and MLflow runs."""

    arm: str
    seed: int
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


def build_report(cfg: PipelineConfig, runs: list[ArmRun], base: Manifest) -> dict:
    """Every number of the report, from the runs' manifests and sample files."""
    compare, ks = cfg.compare, cfg.evaluate.ks
    phases = list(PHASES)
    report: dict = {
        "name": cfg.name, "arms": {a: loss.model_dump() for a, loss in compare.arms.items()},
        "seeds": compare.seeds, "baseline": compare.baseline, "ks": ks, "phases": phases,
        "base": {m: base.metrics[m] for m in headline_metrics(ks) if m in base.metrics},
        "runs": [{"arm": r.arm, "seed": r.seed, "run_id": r.run_id,
                  **{p: {"run_id": r.stage_runs[PHASES[p]], "key": r.manifests[PHASES[p]].key,
                         "metrics": {m: r.manifests[PHASES[p]].metrics[m] for m in headline_metrics(ks)}}
                     for p in phases}} for r in runs],
        "summary": {}, "differences": {}, "curves": {}, "verdicts": {},
    }
    edges = json.loads(base.path("entropy").read_text())["edges"]
    report["entropy"] = {"edges": edges, "base": pooled_entropy([base], edges)}
    for phase in phases:
        stage = PHASES[phase]
        by_arm = {a: [r for r in runs if r.arm == a] for a in compare.arms}
        report["summary"][phase] = {
            a: {m: dict(zip(("mean", "low", "high"), mean_interval([r.manifests[stage].metrics[m] for r in arm_runs])))
                for m in headline_metrics(ks)} for a, arm_runs in by_arm.items()}
        report["curves"][phase] = {a: pass_at_k_curve([r.manifests[stage] for r in arm_runs], cfg.sampling.n)
                                   for a, arm_runs in by_arm.items()}
        report["entropy"][phase] = {a: pooled_entropy([r.manifests[stage] for r in arm_runs], edges)
                                    for a, arm_runs in by_arm.items()}
        report["differences"][phase] = {
            a: {m: paired_differences(runs, a, compare.baseline, stage, m, compare.bootstrap) for m in compared_metrics(ks)}
            for a in compare.arms if a != compare.baseline}
        report["verdicts"][phase] = {a: verdict(d, ks) for a, d in report["differences"][phase].items()}
    return report


def interval(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} ± {(s['high'] - s['low']) / 2:.3f}"


def metric_title(metric: str) -> str:
    suite, _, name = metric.partition("/")
    return f"{suite} " + name.replace("pass_at_", "Pass@").replace("_", " ")


def render_markdown(report: dict) -> str:
    ks, baseline = report["ks"], report["baseline"]
    seeds = report["seeds"]
    lines = [
        f"# Comparison `{report['name']}`",
        "",
        f"Arms (the SFT loss; everything else identical): "
        + ", ".join(f"`{a}` ({', '.join(f'{k}={v}' for k, v in loss.items())})" for a, loss in report["arms"].items())
        + f". Seeds: {', '.join(map(str, seeds))} (the SFT and DPO trainers' seed). Values are the mean over seeds "
        f"± the half-width of its 95% t-interval; differences are paired by problem and seed, with a 95% "
        f"bootstrap interval over problems and seeds.",
        "",
        "## Verdict",
        "",
    ]
    for phase in report["phases"]:
        for arm, text in report["verdicts"][phase].items():
            lines.append(f"- {PHASE_TITLES[phase]}: `{arm}` vs `{baseline}`: {text}.")
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
    lines += ["", "## Plots", "",
              f"![Target Pass@K against K, per arm and phase]({PLOTS['pass_at_k']})", "",
              f"![Target Pass@1 gain against general retention]({PLOTS['gain_vs_retention']})", "",
              f"![Training loss curves]({PLOTS['loss_curves']})", "",
              f"![Answer-token entropy histograms before and after training, per arm]({PLOTS['entropy']})", "",
              "## Runs", "", "| arm | seed | pipeline run | " + " | ".join(f"evaluation {PHASE_TITLES[p]}" for p in report["phases"])
              + " |", "|---|---|---|" + "---|" * len(report["phases"])]
    for run in report["runs"]:
        lines.append(f"| `{run['arm']}` | {run['seed']} | `{run['run_id']}` | "
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


def write_report(cfg: PipelineConfig, runs: list[ArmRun], base: Manifest, out: Path) -> dict[str, Path]:
    """Compute the report and write its files to `out`; returns them by name. The JSON is
    written last, so a folder whose report.json exists holds a complete report."""
    report = build_report(cfg, runs, base)
    out.mkdir(parents=True, exist_ok=True)
    pass_at_k_curves(report, out / PLOTS["pass_at_k"])
    gain_vs_retention(report, out / PLOTS["gain_vs_retention"])
    histories = {stage: {a: [json.loads(r.manifests[stage].path("log_history").read_text()) for r in runs if r.arm == a]
                         for a in report["arms"]} for stage in ("sft", "dpo")}
    loss_curves(histories, out / PLOTS["loss_curves"])
    entropy_histograms(report, out / PLOTS["entropy"])
    text = render_markdown(report)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", render_html(text, out))
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    files = {"report.md", "report.html", "report.json", *PLOTS.values()}
    return {name: out / name for name in sorted(files)}
