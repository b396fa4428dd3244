"""``bench.md``: the latest result of each scenario in ``bench.json`` as a Markdown table; and the
README's benchmark table, from the full runs committed under ``docs/``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stamen.common.errors import StamenError


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


def load_bench(path: Path) -> list[dict[str, Any]]:
    """The entries already in ``bench.json`` (none if it does not exist)."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StamenError(f"{path} is not valid JSON ({exc}); move it away or choose another --out") from None
    if not isinstance(entries, list):
        raise StamenError(f"{path} is not a bench.json (expected a JSON list of scenario results)")
    return entries


#: The README's generated benchmark table sits between these two lines.
TABLE_START = "<!-- bench-table: written by `stamen bench-table` from docs/bench-*/bench.json; do not edit by hand -->"
TABLE_END = "<!-- /bench-table -->"


def committed_runs(docs: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every full (not ``--quick``) scenario result in ``docs/bench-*/bench.json``, with its file."""
    runs = []
    for path in sorted(docs.glob("bench-*/bench.json")):
        runs += [(path, e) for e in load_bench(path) if not e.get("quick") and "error" not in e]
    return runs


def readme_table(runs: list[tuple[Path, dict[str, Any]]], root: Path) -> str:
    """The latest full run of each scenario, one row each: when, where, its one-line result, goals met.

    One row per scenario rather than per goal (``dp-cost`` alone has 36): each row links the
    run's own ``bench.md``, which lists every goal.
    """
    latest: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, entry in runs:
        held = latest.get(entry["scenario"])
        if held is None or entry["started"] >= held[1]["started"]:
            latest[entry["scenario"]] = (path, entry)
    rows = [
        TABLE_START,
        "",
        "| scenario | run (UTC, minutes, mean load, commit) | result | goals met |",
        "|---|---|---|---|",
    ]
    for name in sorted(latest):
        path, entry = latest[name]
        goals = entry.get("goals", [])
        met = sum(bool(g["met"]) for g in goals)
        report = (path.resolve().parent / "bench.md").relative_to(root).as_posix()
        load = entry.get("load_average", {}).get("mean_1m")
        when = (
            f"{entry['started'][:10]}, {entry.get('seconds', 0) / 60:.1f} min, load {load}, "
            f"`{str(entry.get('machine', {}).get('git_commit', '?'))[:7]}`"
        )
        line = str(entry.get("line", "")).replace("|", "\\|")
        rows.append(f"| {name} | {when} | {line} | {met} of {len(goals)} ([all]({report})) |")
    if not latest:
        rows.append("| (no full run committed under docs/) | | | |")
    return "\n".join([*rows, "", TABLE_END])


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the table's two marker lines replaced by ``table``."""
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < start:
        raise StamenError(f"the README has no benchmark table markers ({TABLE_START!r} ... {TABLE_END!r})")
    return readme[:start] + table + readme[end + len(TABLE_END) :]
