"""Small plots that stages write beside their outputs (and MLflow shows as artifacts)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


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
    phases = report["phases"]
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), sharey=True, squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for arm, curve in report["curves"][phase].items():
            line, = ax.plot(curve["k"], curve["mean"], marker="o", markersize=3, label=arm)
            ax.fill_between(curve["k"], curve["low"], curve["high"], color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K")
        ax.set_title(PHASE_TITLES[phase])
    axes[0][0].set_ylabel("target Pass@K")
    axes[0][0].legend(fontsize=8)
    save(fig, png)


def gain_vs_retention(report: dict, png: Path) -> None:
    """Each arm's target Pass@1 gain over the base model against its general retention, after
    SFT (circles) and after DPO (squares), with 95% intervals over seeds: up and right is better."""
    base = report["base"].get("target/pass_at_1", 0.0)
    markers = {"sft": "o", "dpo": "s"}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, arm in enumerate(report["arms"]):
        color = f"C{i}"
        for phase in report["phases"]:
            s = report["summary"][phase][arm]
            x, y = s["general/retention"], s["target/pass_at_1"]
            ax.errorbar(x["mean"], y["mean"] - base, xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                        yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]], fmt=markers[phase], color=color,
                        label=f"{arm} {PHASE_TITLES[phase]}")
    ax.set_xlabel("general retention (general Pass@1 / base model's)")
    ax.set_ylabel("target Pass@1 gain over the base model")
    ax.legend(fontsize=7)
    save(fig, png)


def loss_curves(histories: dict[str, dict[str, list[list[dict]]]], png: Path) -> None:
    """Training loss against the step, one panel per training stage, one line per arm (the
    mean over seeds). `histories[stage][arm]` holds each seed's Trainer log history."""
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (stage, arms) in zip(axes[0], histories.items()):
        for arm, seeds in arms.items():
            steps = sorted({h["step"] for history in seeds for h in history if "loss" in h})
            per_step = [[h["loss"] for history in seeds for h in history if "loss" in h and h["step"] == s] for s in steps]
            ax.plot(steps, [sum(v) / len(v) for v in per_step], label=arm)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(stage)
        ax.legend(fontsize=8)
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
        row[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("entropy at the answer tokens (nats)")
    save(fig, png)
