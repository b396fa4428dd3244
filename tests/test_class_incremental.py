"""Class-incremental learning in a real ``stamen simulate`` run: replay limits forgetting.

A reduced Split-digits (3 sites, 5 tasks of 2 classes, 2 rounds each) run twice, with and
without a replay buffer. The full-size MNIST-5k figures come from
``simulations/bench/split_replay.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SCENARIO = """\
name: split-digits
run-config: {dataset: digits, partition: iid, strategy: fedavg, local-epochs: 5, lr: 0.1, momentum: 0.0,
             num-server-rounds: 10}
tasks: {rounds-per-task: 2, classes: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]}
events:
  - {kind: quiet, sites: [2], from-round: 9}
"""


@pytest.mark.slow
def test_replay_reduces_forgetting_in_a_class_incremental_run(
    tmp_path: Path, stamen_simulate: Callable[..., Any]
) -> None:
    scenario = tmp_path / "split-digits.yaml"
    scenario.write_text(SCENARIO)
    runs = {}
    for size in (100, 0):
        out = tmp_path / f"replay-{size}"
        # horizon 500, about a site's records: each is kept with probability 0.2, about 100 in the buffer
        replay = ["--set", f"replay-size={size}", "--set", "replay-horizon=500"]
        result = stamen_simulate(out, "--clients", "3", "--scenario", str(scenario), *replay)
        assert "mean forgetting" in result.stdout
        runs[size] = json.loads((out / "summary.json").read_text())
    with_replay, without = runs[100], runs[0]
    for summary in runs.values():
        assert summary["status"] == "completed" and summary["scenario"] == "split-digits"
        assert len(summary["tasks"]["forgetting"]) == 5
        assert {f"task{i}_accuracy" for i in range(1, 6)} <= set(summary["history"][-1])
    f_replay, f_none = with_replay["tasks"]["forgetting"][0], without["tasks"]["forgetting"][0]
    assert without["tasks"]["task_accuracy_best"][0] > 0.9, "task 1 was learnt in both runs"
    assert f_none > 0.8, f"without replay task 1 is forgotten (forgetting {f_none})"
    assert f_replay < f_none / 3, f"replay should cut forgetting of task 1 at least 3x: {f_replay} vs {f_none}"
    assert with_replay["final"]["accuracy"] > without["final"]["accuracy"] + 0.4
    # site 2 has no new data in rounds 9-10: without a buffer it has nothing to train on and is idle;
    # with one it trains on its replayed records
    assert [row["idle"] for row in without["history"]] == [0] * 8 + [1, 1]
    assert without["participation"]["idle"] == 2 and without["participation"]["replied"] == 28
    assert [row["idle"] for row in with_replay["history"]] == [0] * 10
    state = json.loads((tmp_path / "replay-100" / "sites" / "site-0000" / "replay.json").read_text())["data"]
    assert state["keep"] == 0.2 and state["seen"] > 400
    # each record kept by its own keyed hash: binomial(seen, 0.2), within 5 sd
    assert abs(state["size"] - 0.2 * state["seen"]) < 5 * (state["seen"] * 0.2 * 0.8) ** 0.5, state
    assert not (tmp_path / "replay-0" / "sites" / "site-0000" / "replay.json").exists()
