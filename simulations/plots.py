"""PNG plots of a run, drawn from its ``summary.json`` (matplotlib, no display): ``convergence.png``
and ``drift.png``.

Each figure is titled with the run's key settings (from ``config.json`` when the run directory
has one), rounds are whole numbers on the axis, a panel without data says so instead of
staying blank, and series in one panel differ in line style and marker as well as colour,
since some coincide exactly (under FedAvgM with server-lr 1 the global model change is the
server momentum).
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: (line style, marker, marker size, filled) per series of a panel, in order: where series
#: coincide, each later one's larger hollow marker rings the earlier ones'.
STYLES = (("-", "o", 4, True), ("--", "s", 7, False), (":", "^", 9, False), ("-.", "D", 11, False))

#: Run-config keys a figure's title names, in this order.
TITLE_KEYS = ("dataset", "model", "strategy", "num-server-rounds", "lr", "partition", "alpha", "dp", "seed")


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(ax: Any, history: list[dict[str, Any]], keys: tuple[tuple[str, str], ...], **style: Any) -> int:
    """Plot each key's finite values, one distinct style per series; how many series had data."""
    drawn = 0
    for (key, label), (ls, marker, size, filled) in zip(keys, itertools.cycle(STYLES)):
        xs, ys = _series(history, key)
        if xs:
            hollow = {} if filled else {"mfc": "none", "mew": 1.2}
            ax.plot(xs, ys, ls=ls, marker=marker, ms=size, label=label, **hollow, **style)
            drawn += 1
    return drawn


def _finish_panel(ax: Any, drawn: int, why: str, fontsize: float | None = None) -> None:
    """Whole-number rounds, a grid, a legend, and a note on a panel with nothing to show."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if not drawn:
        note = "no data\n" + textwrap.fill(why, 44)
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.35")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def run_title(run_dir: Path | None) -> str:
    """The run's key settings, e.g. ``digits · cnn8 · fedavgm · 20 rounds · lr 0.05 · dp``."""
    path = None if run_dir is None else Path(run_dir) / "config.json"
    if path is None or not path.is_file():
        return ""
    try:
        config = json.loads(path.read_text()).get("config", {})
    except (OSError, ValueError):
        return ""
    parts = []
    own_data = config.get("site-data") or config.get("data-loader")  # the sites' own data, not a partitioned dataset
    for key in TITLE_KEYS:
        if key not in config or (own_data and key in ("dataset", "partition", "alpha")):
            if key == "dataset" and own_data:
                parts.append(f"site-data {Path(str(own_data)).name}" if config.get("site-data") else str(own_data))
            continue
        value = config[key]
        if key == "dataset":
            parts.append(Path(str(value).partition(":")[2]).name or str(value))
        elif key == "num-server-rounds":
            parts.append(f"{value} rounds" if value else "until stopped")
        elif key == "alpha":
            if config.get("partition") == "dirichlet":
                parts.append(f"alpha {value:g}")
        elif key == "dp":
            noise = float(config.get("noise-multiplier", 0))
            calibrated = f"target epsilon {float(config.get('target-epsilon', 0)):g}"  # noise 0 = calibrated per site
            parts.append(f"DP ({f'noise {noise:g}' if noise else calibrated})" if value else "no DP")
        elif key in ("lr", "seed"):
            parts.append(f"{key} {value:g}")
        else:
            parts.append(str(value))
    return " · ".join(parts)


def _no_accuracy(summary: dict[str, Any]) -> str:
    reason = summary.get("final", {}).get("reason")
    return "no evaluation ran" if not reason else reason.split(";")[0].removeprefix("no evaluation data: ")


def convergence_figure(summary: dict[str, Any], title: str = "") -> Figure:
    """Accuracy and loss per round (centralized, federated, mean client training loss), and
    with DP the largest cumulative epsilon of any site per round against the target."""
    history = summary.get("history", [])
    privacy = summary.get("privacy")
    fig, axes = plt.subplots(1, 3 if privacy else 2, figsize=(16 if privacy else 11, 4.4))
    ax_acc, ax_loss = axes[0], axes[1]
    accuracy = (("central_accuracy", "centralized test"), ("fed_accuracy", "federated held-out"))
    _finish_panel(ax_acc, _plot(ax_acc, history, accuracy), _no_accuracy(summary))
    losses = (
        ("central_loss", "centralized test"),
        ("fed_loss", "federated held-out"),
        ("train_loss", "client training (mean)"),
    )
    _finish_panel(ax_loss, _plot(ax_loss, history, losses), "no site reported a loss")
    ax_acc.set(xlabel="round", ylabel="accuracy", title="Accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    if privacy:
        ax_eps = axes[2]
        drawn = _plot(ax_eps, history, (("epsilon_max", "max over sites"),))
        if privacy.get("budget"):
            ax_eps.axhline(privacy["budget"], color="tab:red", ls="--", label="budget")
        ax_eps.set(xlabel="round", ylabel=f"epsilon (delta {privacy['delta']:g})", title="Privacy spent")
        _finish_panel(ax_eps, drawn, "no site reported its epsilon")
    return _titled(fig, title)


def drift_figure(summary: dict[str, Any], title: str = "") -> Figure:
    """Data drift (per site and max, against the PSI alert line), client drift, update and
    model-change norms, and concept-drift detections on the global evaluation loss."""
    history = summary.get("history", [])
    drift = summary.get("drift", {})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax_data, ax_cos, ax_norm, ax_concept = axes.ravel()
    sites = [series for series in drift.get("per_site", {}).values() if "label_psi" in series]
    for i, series in enumerate(sites):
        label = "label PSI per site" if i == 0 else None
        ax_data.plot(series["round"], series["label_psi"], lw=0.8, alpha=0.5, label=label)
    maxima = (("drift_label_psi_max", "max label PSI"), ("drift_feature_psi_max", "max feature PSI"))
    drawn = len(sites) + _plot(ax_data, history, maxima, lw=2)
    ax_data.axhline(drift.get("psi_threshold", 0.2), color="red", ls="--", lw=1, label="alert threshold")
    ax_data.set(xlabel="round", ylabel="PSI vs reference window", title="Data drift")
    _finish_panel(ax_data, drawn, "no site reported data drift", fontsize=7)
    drawn = _plot(ax_cos, history, (("cosine_mean", "mean"), ("cosine_min", "min")))
    ax_cos.set(xlabel="round", ylabel="cosine(site update, mean update)", title="Client drift")
    _finish_panel(ax_cos, drawn, "fewer than 2 site updates in every round", fontsize=7)
    norms = (
        ("update_norm_mean", "site update (mean)"),
        ("model_change_norm", "global model change"),
        ("server_buffer_norm", "server momentum"),
    )
    drawn = _plot(ax_norm, history, norms)
    ax_norm.set(xlabel="round", ylabel="L2 norm", title="Updates and model drift")
    if drawn:
        ax_norm.set_yscale("log")
    _finish_panel(ax_norm, drawn, "no update was aggregated", fontsize=7)
    drawn = _plot(ax_concept, history, (("loss", "global evaluation loss"),))
    for i, event in enumerate(drift.get("detections", [])):
        ax_concept.axvline(
            event["round"],
            color="red" if event["series"] == "global" else "orange",
            lw=1,
            label="detection (global / site)" if i == 0 else None,
        )
    ax_concept.set(xlabel="round", ylabel="cross-entropy", title="Concept drift (Page-Hinkley)")
    _finish_panel(ax_concept, drawn, _no_accuracy(summary), fontsize=7)
    return _titled(fig, title)


def _titled(fig: Figure, title: str) -> Figure:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG and free it."""
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(summary: dict[str, Any], run_dir: Path) -> list[Path]:
    """Every plot of a run, written into its directory and titled with its settings."""
    title = run_title(run_dir)
    return [
        save(convergence_figure(summary, title), run_dir / "convergence.png"),
        save(drift_figure(summary, title), run_dir / "drift.png"),
    ]
