"""Small plots that stages write beside their outputs (and MLflow shows as artifacts)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
