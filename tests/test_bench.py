"""``stamen bench``: the runner, the process-tree watcher, and a quick run's bench.json.

Speed is never asserted here (the machines are shared and noisy): the benchmark's own
goals live in bench.json. These tests check that it runs, cleans up, and writes
well-formed results.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stamen.common.errors import StamenError
from stamen.simulations.bench.deployed_round import figures
from stamen.simulations.bench.drift import Case, score
from stamen.simulations.bench.fedavgm import median_rounds
from stamen.simulations.bench.privacy_utility import DEMO_SETTINGS
from stamen.simulations.bench.proctree import rollup, stop_processes, tree
from stamen.simulations.bench.runner import SCENARIOS, Goal, finite, load_bench, resolve
from stamen.simulations.bench.runs import watch


def test_goal_met_follows_its_operator_and_fails_without_a_measurement() -> None:
    assert Goal("ratio", 1.15, 1.1).met
    assert not Goal("ratio", 1.15, 1.2).met
    assert Goal("accuracy", 0.85, 0.9, op=">=").met
    assert not Goal("accuracy", 0.85, 0.8, op=">=").met
    assert not Goal("ratio", 1.15, None).met
    assert not Goal("ratio", 1.15, math.nan).met


def test_finite_turns_nan_and_infinity_into_null() -> None:
    out = finite({"a": math.nan, "b": [math.inf, 1.5, -math.inf], "c": Path("x/y"), "d": {"e": 2}})
    assert out == {"a": None, "b": [None, 1.5, None], "c": "x/y", "d": {"e": 2}}
    json.dumps(out, allow_nan=False)


def test_scenarios_resolve_in_table_order_and_unknown_names_fail_clearly() -> None:
    assert resolve([]) == list(SCENARIOS)
    assert resolve(["scale", "overhead"]) == ["overhead", "scale"]
    with pytest.raises(StamenError, match=r"unknown scenario.*nosuch.*choose from"):
        resolve(["overhead", "nosuch"])


def test_load_bench_rejects_a_file_that_is_not_a_results_list(tmp_path: Path) -> None:
    assert load_bench(tmp_path / "missing.json") == []
    path = tmp_path / "bench.json"
    path.write_text('{"scenario": "x"}')
    with pytest.raises(StamenError, match="expected a JSON list"):
        load_bench(path)
    path.write_text("[{")
    with pytest.raises(StamenError, match="not valid JSON"):
        load_bench(path)


def test_median_rounds_counts_never_reached_above_every_number() -> None:
    assert median_rounds([3, None, 5]) == 5
    assert median_rounds([2, 3, None]) == 3
    assert median_rounds([None, None, 4]) is None


def test_drift_score_measures_delay_from_the_shift_and_counts_early_or_unshifted_alarms() -> None:
    case = Case("label-shift", "label_psi", 6, (0, 1), 9)
    per_site = {
        "site-0000": {"round": [4, 5, 6, 7, 8], "label_psi": [0.0, 0.05, 0.1, 0.5, 0.6]},
        "site-0001": {"round": [4, 5, 6, 7, 8], "label_psi": [0.3, 0.0, 0.0, 0.0, 0.4]},
        "site-0002": {"round": [4, 5, 6, 7, 8], "label_psi": [0.0, 0.0, 0.0, 0.0, 0.25]},
    }
    scored = score(case, {"drift": {"per_site": per_site, "detections": []}})
    assert scored["delay_rounds"] == 1, "site-0000 crosses 0.2 at round 7, one round after the shift"
    assert scored["false_alarm_events"] == [["site-0001", 4], ["site-0002", 8]]
    assert scored["false_alarms"] == 2

    concept = Case("label-swap", "concept", 8, (2,), 12)
    events = [{"round": 3, "series": "global"}, {"round": 10, "series": "global"}, {"round": 9, "series": "site-0005"}]
    scored = score(concept, {"drift": {"per_site": {}, "detections": events}})
    assert scored["delay_rounds"] == 2
    assert scored["false_alarm_events"] == [["global", 3], ["site-0005", 9]]
    never = score(concept, {"drift": {"per_site": {}, "detections": []}})
    assert never["delay_rounds"] is None and never["false_alarms"] == 0


def test_deployed_round_figures_keep_each_setups_overhead_and_delivery_steps() -> None:
    base = {"round_mean": 4.0, "compute_mean": 2.5, "overhead_mean": 1.5, "final_accuracy": 0.9}
    base |= {"rounds": 6, "sites": 3}
    after = {**base, "to_supernode_mean": 0.9, "log_dir": "/x"}
    out = figures({"after": after, "flower": {**base, "overhead_mean": 20}})
    assert out["after"]["overhead_mean"] == 1.5 and out["after"]["to_supernode_s"] == 0.9
    assert "log_dir" not in out["after"] and "to_supernode_s" not in out["flower"]
    assert out["flower"]["overhead_mean"] == 20


def test_tree_finds_a_grandchild_in_its_own_session_and_stop_processes_ends_it() -> None:
    """The engine starts its own session (so does Ray): the tree must still hold it, and cleanup end it."""
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    root = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout is not None
        grandchild = int(root.stdout.readline())
        members = tree(root.pid)
        assert {root.pid, grandchild} <= set(members)
        assert rollup(grandchild)[0] > 0
        assert stop_processes(members) == 2
        assert root.wait(timeout=15) != 0
        assert grandchild not in tree(grandchild)
    finally:
        if root.poll() is None:
            root.kill()


def test_watch_stops_a_run_early_on_request(tmp_path: Path) -> None:
    """A watched run that writes progress lines is interrupted once stop_when says so."""
    out = tmp_path / "run"
    out.mkdir()
    code = (
        "import json, sys, time\n"
        f"path = {str(out / 'progress.jsonl')!r}\n"
        "for r in range(1, 200):\n"
        "    with open(path, 'a') as fh:\n"
        "        fh.write(json.dumps({'round': r, 'seconds': 0.05, 'elapsed': 0.05 * r}) + '\\n')\n"
        "    time.sleep(0.05)\n"
    )
    t0 = time.monotonic()
    run = watch([sys.executable, "-c", code], out, timeout=60, stop_when=lambda row: row["round"] >= 3)
    assert run.stopped_early
    assert run.rc != 0
    assert 3 <= len(run.rows) < 199
    assert run.seen_at == sorted(run.seen_at)
    assert time.monotonic() - t0 < 60


def test_cli_names_an_unknown_scenario_and_writes_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stamen", "bench", "nosuch", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown scenario(s): nosuch" in result.stderr
    assert not (tmp_path / "b").exists()


def _strict(text: str) -> Any:
    def no_constant(name: str) -> Any:
        raise AssertionError(f"bench.json holds {name}")

    return json.loads(text, parse_constant=no_constant)


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [obj]
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v)]
    return []


def test_privacy_utility_runs_the_demo_with_the_makefiles_settings() -> None:
    """The bench's "demo" setting is ``make run``'s DEMO_FLAGS less DP and its epsilon."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    line = next(row for row in makefile.splitlines() if row.startswith("DEMO_FLAGS ?="))
    flags = shlex.split(line.split("?=", 1)[1])
    privacy = {"--target-epsilon", "--delta", "--privacy-horizon-rounds"}
    rest = [f for i, f in enumerate(flags) if f != "--dp" and f not in privacy and flags[i - 1] not in privacy]
    assert rest == list(DEMO_SETTINGS)


QUICK_SUBSET = ["fedavgm", "scale", "drift"]


@pytest.mark.slow
def test_quick_bench_writes_one_well_formed_object_per_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "stamen", "bench", *QUICK_SUBSET, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entries = _strict((out / "bench.json").read_text())
    assert [e["scenario"] for e in entries] == QUICK_SUBSET
    for entry in entries:
        assert "error" not in entry
        assert entry["quick"] is True
        assert entry["schema"] == 1
        assert isinstance(entry["line"], str) and entry["line"]
        assert f"{entry['scenario']}: {entry['line']}" in result.stdout
        assert isinstance(entry["params"], dict) and entry["params"]
        assert isinstance(entry["figures"], dict) and entry["figures"]
        assert entry["goals"], "every scenario here states a goal"
        for goal in entry["goals"]:
            assert set(goal) == {"metric", "op", "target", "measured", "met"}
            assert isinstance(goal["metric"], str) and goal["op"] in ("<=", ">=")
            assert isinstance(goal["met"], bool)
            assert goal["measured"] is None or isinstance(goal["measured"], int | float)
        assert entry["met"] == all(g["met"] for g in entry["goals"])
        assert entry["plots"] and all((out / p).is_file() for p in entry["plots"])
        machine = entry["machine"]
        assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
        assert isinstance(machine["cores"], int) and machine["cores"] >= 1
        assert isinstance(machine["torch"], str)
        assert machine["gpu"] is None or isinstance(machine["gpu"], str)
        load = entry["load_average"]
        assert len(load["start"]) == 3 and len(load["end"]) == 3
        assert entry["seconds"] > 0
        assert all(math.isfinite(n) for n in _numbers(entry))
    table = (out / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in QUICK_SUBSET)
    scale = entries[1]["figures"]["sizes"][0]
    assert scale["peak_pss_gib"] > 0 and scale["peak_processes"] >= 3  # CLI, engine and Ray were all counted
    assert scale["peak_rss_gib"] >= scale["peak_pss_gib"]
