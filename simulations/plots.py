"""PNG plots of a run, drawn from its ``summary.json`` (matplotlib, no display): ``convergence.png``
and ``drift.png``."""

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


def _plot(ax: Any, history: list[dict[str, Any]], keys: tuple[tuple[str, str], ...], **style: Any) -> None:
    for key, label in keys:
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=label, **style)


def plot_drift(summary: dict[str, Any], path: Path) -> Path:
    """Data drift (per site and max, against the PSI alert line), client drift, update and
    model-change norms, and concept-drift detections on the global evaluation loss."""
    history = summary.get("history", [])
    drift = summary.get("drift", {})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax_data, ax_cos, ax_norm, ax_concept = axes.ravel()
    sites = [series for series in drift.get("per_site", {}).values() if "label_psi" in series]
    for i, series in enumerate(sites):
        label = "label PSI per site" if i == 0 else None
        ax_data.plot(series["round"], series["label_psi"], lw=0.8, alpha=0.5, label=label)
    maxima = (("drift_label_psi_max", "max label PSI"), ("drift_feature_psi_max", "max feature PSI"))
    _plot(ax_data, history, maxima, lw=2)
    ax_data.axhline(drift.get("psi_threshold", 0.2), color="red", ls="--", lw=1, label="alert threshold")
    ax_data.set(xlabel="round", ylabel="PSI vs reference window", title="Data drift")
    _plot(ax_cos, history, (("cosine_mean", "mean"), ("cosine_min", "min")))
    ax_cos.set(xlabel="round", ylabel="cosine(site update, mean update)", title="Client drift")
    _plot(
        ax_norm,
        history,
        (
            ("update_norm_mean", "site update (mean)"),
            ("model_change_norm", "global model change"),
            ("server_buffer_norm", "server momentum"),
        ),
    )
    ax_norm.set(xlabel="round", ylabel="L2 norm", title="Updates and model drift", yscale="log")
    _plot(ax_concept, history, (("loss", "global evaluation loss"),))
    for i, event in enumerate(drift.get("detections", [])):
        ax_concept.axvline(
            event["round"],
            color="red" if event["series"] == "global" else "orange",
            lw=1,
            label="detection (global / site)" if i == 0 else None,
        )
    ax_concept.set(xlabel="round", ylabel="cross-entropy", title="Concept drift (Page-Hinkley)")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(summary: dict[str, Any], run_dir: Path) -> list[Path]:
    """Every plot of a run, written into its directory."""
    return [plot_convergence(summary, run_dir / "convergence.png"), plot_drift(summary, run_dir / "drift.png")]
