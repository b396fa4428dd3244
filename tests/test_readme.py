"""The README documents every run-config key with its current default, and its benchmark table is
the committed results'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stamen.common.boundary import markdown_table
from stamen.common.config import KEYS
from stamen.common.errors import StamenError
from stamen.simulations.bench.report import committed_runs, readme_table, with_table

README = Path(__file__).resolve().parent.parent / "README.md"


def _rendered(default: object) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, str):
        return f'"{default}"'
    return str(default)


def test_every_run_config_key_is_in_the_readme_table_with_its_default() -> None:
    text = README.read_text()
    for key in KEYS:
        assert f"| `{key.name}` | `{_rendered(key.default)}` |" in text, key.name


def test_privacy_boundary_table_in_the_readme_is_the_code_table() -> None:
    assert markdown_table() in README.read_text()


def test_the_benchmark_table_is_written_from_the_results_committed_under_docs() -> None:
    root = README.parent
    runs = committed_runs(root / "docs")
    assert runs, "at least one full bench run is committed under docs/"
    assert with_table(README.read_text(), readme_table(runs, root)) == README.read_text(), (
        "the README's benchmark table is not current: run `stamen bench-table`"
    )


def _entry(scenario: str, started: str, line: str, *, quick: bool = False, met: tuple[bool, ...] = ()) -> dict:
    goals = [{"metric": "m", "measured": 1.0, "op": "<=", "target": 1.0, "met": m} for m in met]
    return {"scenario": scenario, "started": started, "line": line, "quick": quick, "goals": goals, "seconds": 60}


def test_the_table_takes_each_scenarios_latest_full_run_and_says_where_it_lies(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    for name, entries in {
        "bench-a": [_entry("overhead", "2026-11-01T00:00:00", "old"), _entry("scale", "2026-11-01T00:00:00", "s")],
        "bench-b": [
            _entry("overhead", "2026-12-01T00:00:00", "new | piped", met=(True, False)),
            _entry("overhead", "2026-12-02T00:00:00", "quick one", quick=True),
        ],
    }.items():
        (docs / name).mkdir(parents=True)
        (docs / name / "bench.json").write_text(json.dumps(entries))
    table = readme_table(committed_runs(docs), tmp_path)
    rows = [r for r in table.splitlines() if r.startswith("| overhead") or r.startswith("| scale")]
    assert len(rows) == 2
    assert "new \\| piped" in rows[0] and "1 of 2 ([all](docs/bench-b/bench.md))" in rows[0]
    assert "old" not in rows[0] and "quick one" not in table
    assert "docs/bench-a/bench.md" in rows[1]
    with pytest.raises(StamenError, match="no benchmark table markers"):
        with_table("a README without the markers", table)
    (docs / "bench-c").mkdir()
    (docs / "bench-c" / "bench.json").write_text("{not json")
    with pytest.raises(StamenError, match=r"bench-c/bench\.json is not valid JSON"):
        committed_runs(docs)
