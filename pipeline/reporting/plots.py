"""Small plots that stages write beside their outputs (and MLflow shows as artifacts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import ScalarFormatter  # noqa: E402


def save(fig, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=100, bbox_inches="tight")  # "tight": keeps legends placed outside the axes
    plt.close(fig)


def legend_outside(ax, **options) -> None:
    """The legend to the right of `ax`, off the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, **options)


def lr_label(learning_rate: float) -> str:
    """A learning rate as people write it: 1e-5, 2.5e-4."""
    return np.format_float_scientific(learning_rate, trim="-", exp_digits=1)


def top_of(values: list[float]) -> float:
    """An axis top for scores and ratios: 1, or the highest finite value if above it, with room for labels."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max([1.0, *finite]) * 1.05


def loss_curve(log_history: Path, png: Path) -> None:
    """Training loss (and the loss diagnostics, on a second axis) against the step."""
    history = [h for h in json.loads(log_history.read_text()) if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="loss", color="black")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    diagnostics = sorted({k for h in history for k in h if k.endswith("_frac") or k in ("entropy", "weight", "kl")})
    if diagnostics:
        right = ax.twinx()
        for key in diagnostics:
            right.plot([h["step"] for h in history], [h.get(key) for h in history], label=key, linestyle="--")
        right.set_ylabel("diagnostics")
        right.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    save(fig, png)


def entropy_stairs(ax, counts: list[int], edges: list[float], label: str, **style) -> None:
    """One entropy histogram as the fraction of tokens per bin, so that sets of different sizes overlay."""
    total = max(sum(counts), 1)
    ax.stairs([c / total for c in counts], edges, label=label, **style)


def entropy_histogram(histograms: dict, png: Path) -> None:
    """An evaluation's answer-token entropy histogram (`entropy.json`), one line per suite."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for suite, h in histograms["suites"].items():
        entropy_stairs(ax, h["counts"], histograms["edges"], f"{suite} (mean {h['mean']:.2f})")
    ax.set_xlabel("entropy at the answer tokens (nats)")
    ax.set_ylabel("fraction of tokens")
    ax.legend(fontsize=8)
    save(fig, png)


PHASE_TITLES = {"sft": "after SFT", "dpo": "after SFT + DPO"}


def pass_at_k_curves(report: dict, png: Path) -> None:
    """Target Pass@K against K (log axis), one panel per phase, one line per arm (mean over
    seeds, band from the lowest to the highest seed)."""
    phases, seeds = report["phases"], len(report["seeds"])
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), sharey=True, squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for arm, curve in report["curves"][phase].items():
            line, = ax.plot(curve["k"], curve["mean"], marker="o", markersize=3, label=arm)
            ax.fill_between(curve["k"], curve["low"], curve["high"], color=line.get_color(), alpha=0.15)
        n = max(k for curve in report["curves"][phase].values() for k in curve["k"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({2**i for i in range(n.bit_length()) if 2**i <= n} | set(report["ks"])))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 32, not 2^5
        ax.set_xlabel("K")
        ax.set_ylim(0, 1.02)
        ax.set_title(PHASE_TITLES[phase])
    axes[0][0].set_ylabel("target Pass@K")
    legend_outside(axes[0][-1], title=f"arm (mean; band: lowest\nto highest of {seeds} seeds)")
    save(fig, png)


def chosen_point(report: dict, phase: str, arm: str) -> dict:
    """The arm's frontier point at its learning rate chosen on validation."""
    rate = report["selected"][arm]["learning_rate"]
    return next(p for p in report["frontier"][phase][arm] if p["learning_rate"] == rate)


def gain_vs_retention(report: dict, png: Path) -> None:
    """Each arm's target Pass@1 gain over the base model against its general retention, after
    SFT (circles) and after DPO (squares), at its chosen learning rate: the mean over seeds, and
    each seed's own point small and faint (with a few seeds a t-interval spans more than the
    axis): up and right is better. Retention cannot be negative, so its axis starts at 0."""
    markers = {"sft": "o", "dpo": "s"}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    retention = []
    for i, arm in enumerate(report["arms"]):
        for phase in report["phases"]:
            point = chosen_point(report, phase, arm)
            ax.plot(point["retention"]["mean"], point["gain"]["mean"], markers[phase], color=f"C{i}",
                    label=f"{arm} {PHASE_TITLES[phase]} (lr {lr_label(point['learning_rate'])})")
            _, retentions, gains = zip(*point["per_seed"])
            ax.plot(retentions, gains, markers[phase], color=f"C{i}", markersize=3, alpha=0.35)
            retention += retentions
    ax.set_xlim(0, top_of(retention))
    ax.set_xlabel("general retention (general Pass@1 / base model's)")
    ax.set_ylabel("target Pass@1 gain over the base model")
    ax.set_title(f"each arm at its chosen learning rate: mean and each of {len(report['seeds'])} seeds", fontsize=9)
    legend_outside(ax)
    save(fig, png)


def frontier_plot(report: dict, png: Path) -> None:
    """General retention against target Pass@1, one panel per phase, one line per arm through
    its learning rates in ascending order, each point the mean over seeds, labelled with its
    rate, and each seed's own point small and faint beside it (with a few seeds a t-interval
    spans more than the whole axis); a hollow marker is off the arm's Pareto frontier, a black
    ring marks the rate chosen on validation. Both axes run from 0 to at least 1."""
    phases, markers = report["phases"], "osD^v<>ph*"
    fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 4.5), sharey=True, squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for i, (arm, points) in enumerate(report["frontier"][phase].items()):
            style = {"color": f"C{i}", "marker": markers[i % len(markers)]}
            ax.plot([p["target"]["mean"] for p in points], [p["retention"]["mean"] for p in points], label=arm,
                    markersize=6, **style)
            for p in points:
                x, y = p["target"]["mean"], p["retention"]["mean"]
                if not p["pareto"]:
                    ax.plot(x, y, markersize=6, markerfacecolor="white", linestyle="none", **style)
                targets, retentions, _ = zip(*p["per_seed"])
                ax.plot(targets, retentions, markersize=3, alpha=0.35, linestyle="none", **style)
                ax.annotate(lr_label(p["learning_rate"]), (x, y), fontsize=7, textcoords="offset points",
                            xytext=(5, 4), color=f"C{i}")
        chosen = [chosen_point(report, phase, arm) for arm in report["frontier"][phase]]
        ax.plot([p["target"]["mean"] for p in chosen], [p["retention"]["mean"] for p in chosen], "o", markersize=13,
                markerfacecolor="none", markeredgecolor="black", linestyle="none", label="chosen on validation")
        ax.set_xlabel("target Pass@1")
        ax.set_title(PHASE_TITLES[phase])
    values = [v for arms in report["frontier"].values() for points in arms.values() for p in points
              for v in sum((seed[:2] for seed in p["per_seed"]), [])]
    axes[0][0].set_ylim(0, top_of(values))
    for ax in axes[0]:
        ax.set_xlim(0, top_of(values))
    axes[0][0].set_ylabel("general retention (general Pass@1 / base model's)")
    legend_outside(axes[0][-1])
    caption = (f"Each large point: one learning rate (labelled), the mean over {len(report['seeds'])} seeds; small faint "
               "points: each seed. Lines join an arm's rates in ascending order; hollow: off the arm's Pareto frontier.")
    fig.text(0.01, -0.02, caption, fontsize=8, ha="left", va="top")
    save(fig, png)


def loss_curves(histories: dict[str, dict[str, list[list[dict]]]], png: Path) -> None:
    """Training loss against the step, one panel per training stage, one line per arm (the
    mean over seeds). `histories[stage][arm]` holds each seed's Trainer log history."""
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (stage, arms) in zip(axes[0], histories.items()):
        for arm, seeds in arms.items():
            steps = sorted({h["step"] for history in seeds for h in history if "loss" in h})
            per_step = [[h["loss"] for history in seeds for h in history if "loss" in h and h["step"] == s] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in per_step], label=f"{arm} (mean of {len(seeds)} seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(stage)
    legend_outside(axes[0][-1])
    save(fig, png)


def entropy_histograms(report: dict, png: Path) -> None:
    """Answer-token entropy histograms, one panel per suite (row) and arm (column): the base
    model's (before SFT) against the arm's after each phase, tokens pooled over seeds."""
    entropy, arms = report["entropy"], list(report["arms"])
    suites = list(entropy["base"])
    fig, axes = plt.subplots(len(suites), len(arms), figsize=(4.5 * len(arms), 3 * len(suites)), sharex=True,
                             squeeze=False)
    for row, suite in zip(axes, suites):
        for ax, arm in zip(row, arms):
            entropy_stairs(ax, entropy["base"][suite], entropy["edges"], "before SFT", fill=True, color="0.8")
            for phase in report["phases"]:
                entropy_stairs(ax, entropy[phase][arm][suite], entropy["edges"], PHASE_TITLES[phase])
            ax.set_title(f"{arm}, {suite} suite")
            ax.set_ylabel("fraction of tokens")
    legend_outside(axes[0][-1], title=f"tokens of {len(report['seeds'])} seeds")
    for ax in axes[-1]:
        ax.set_xlabel("entropy at the answer tokens (nats)")
    save(fig, png)
