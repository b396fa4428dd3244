"""PNG charts of benchmark results (matplotlib, no display)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def bar_chart(path: Path, title: str, panels: dict[str, dict[str, float]], unit: str = "") -> Path:
    """One bar panel per entry of ``panels`` (panel title -> bar label -> value)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, bars) in zip(axes[0], panels.items(), strict=True):
        labels = list(bars)
        values = [bars[k] if bars[k] is not None and math.isfinite(bars[k]) else 0.0 for k in labels]
        ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}{unit}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(panel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grouped_bars(
    path: Path, title: str, groups: dict[str, dict[str, float | None]], ylabel: str, cap: float | None = None
) -> Path:
    """Bars grouped by ``groups`` keys (e.g. alpha), one colour per series (e.g. strategy).

    A missing value (None: e.g. never reached the target) is drawn at ``cap`` and hatched.
    """
    series = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for j, name in enumerate(series):
        for i, group in enumerate(groups.values()):
            value = group.get(name)
            missing = value is None
            height = cap if missing and cap is not None else (value or 0.0)
            ax.bar(
                i + (j - (len(series) - 1) / 2) * width,
                height,
                width,
                color=f"C{j}",
                hatch="//" if missing else None,
                alpha=0.5 if missing else 1.0,
                label=name if i == 0 else None,
            )
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    if cap is not None:
        ax.axhline(cap, color="grey", ls=":", lw=1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(
    path: Path,
    title: str,
    series: dict[str, tuple[list[float], list[float]]],
    xlabel: str,
    ylabel: str,
    hline: float | None = None,
) -> Path:
    """Line plots of ``series`` (label -> (xs, ys))."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
