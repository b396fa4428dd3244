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
    """Accuracy and loss per round (centralized, federated, mean client training loss), and
    with DP the largest cumulative epsilon of any site per round against the target."""
    history = summary.get("history", [])
    privacy = summary.get("privacy")
    fig, axes = plt.subplots(1, 3 if privacy else 2, figsize=(16 if privacy else 11, 4))
    ax_acc, ax_loss = axes[0], axes[1]
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
    if privacy:
        ax_eps = axes[2]
        xs, ys = _series(history, "epsilon_max")
        ax_eps.plot(xs, ys, marker="o", ms=3, label="max over sites")
        if privacy.get("budget"):
            ax_eps.axhline(privacy["budget"], color="tab:red", ls="--", label="budget")
        ax_eps.set(xlabel="round", ylabel=f"epsilon (delta {privacy['delta']:g})", title="Privacy spent")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
