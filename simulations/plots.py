"""PNG plots of a run, drawn from its ``summary.json`` history (matplotlib, no display)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_convergence(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy and loss per round: centralized, federated and mean client training loss."""
    history = summary.get("history", [])
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("central_accuracy", "centralized test"), ("fed_accuracy", "federated held-out")):
        xs, ys = _series(history, key)
        if xs:
            ax_acc.plot(xs, ys, marker="o", ms=3, label=label)
    for key, label in (
        ("central_loss", "centralized test"),
        ("fed_loss", "federated held-out"),
        ("train_loss", "client training (mean)"),
    ):
        xs, ys = _series(history, key)
        if xs:
            ax_loss.plot(xs, ys, marker="o", ms=3, label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
