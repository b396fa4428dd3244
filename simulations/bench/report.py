"""``bench.md``: the latest result of each scenario in ``bench.json`` as a Markdown table."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def markdown(entries: list[dict[str, Any]]) -> str:
    """One row per goal of each scenario's latest run, then each scenario's one-line result."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        latest[entry["scenario"]] = entry
    rows = ["| scenario | measured | goal | met |", "|---|---|---|---|"]
    lines = []
    for name, entry in latest.items():
        kind = "quick" if entry.get("quick") else "full"
        load = entry.get("load_average", {}).get("mean_1m")
        lines.append(
            f"- **{name}** ({kind}, {entry.get('seconds', 0):.0f} s, mean load {load}): "
            f"{entry.get('line') or entry.get('error')}"
        )
        for goal in entry.get("goals", []):
            met = "yes" if goal["met"] else "**no**"
            rows.append(
                f"| {name} | {goal['metric']}: {_fmt(goal['measured'])} | {goal['op']} {goal['target']:g} | {met} |"
            )
        if "error" in entry:
            rows.append(f"| {name} | failed: {entry['error']} | | **no** |")
    machine = next(iter(latest.values()), {}).get("machine", {})
    head = (
        f"Machine: {machine.get('cpu_model')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB, "
        f"GPU {machine.get('gpu') or 'none'}, torch {machine.get('torch')}, commit {machine.get('git_commit')}"
    )
    return "\n".join([head, "", *rows, "", *lines, ""])
