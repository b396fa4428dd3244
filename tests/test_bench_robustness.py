"""The robustness bench scenario: which runs it asks for and how it turns them into goals
(runs stubbed with written summaries; the real runs are ``stamen bench robustness``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stamen.simulations.bench import robustness
from stamen.simulations.bench.runner import Context
from stamen.simulations.bench.runs import Run

# final accuracy per (attack, rule, attackers) of the stubbed runs
ACCURACY = {("", "mean", 0): 0.93, ("", "trimmed-mean", 0): 0.92, ("scale", "mean", 2): 0.73,
            ("scale", "trimmed-mean", 2): 0.915}  # fmt: skip


def test_quick_plan_runs_each_cell_once_and_states_the_issue_goals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[list[str]] = []

    def fake(out: Path, args: list[str]) -> Run:
        asked.append(args)
        value = dict(a.split("=", 1) for a in args if "=" in a)
        k = int(value.get("attack-sites", 0))
        out.mkdir(parents=True)
        summary = {
            "rounds_completed": robustness.QUICK.rounds,
            "final": {"accuracy": ACCURACY[(value.get("attack", ""), value["aggregation"], k)]},
            "participation": {"rejected_outlier": 0, "replied": 20},
        }
        (out / "summary.json").write_text(json.dumps(summary))
        return Run(out=out, rc=0, wall_s=1.0)

    monkeypatch.setattr(robustness, "stamen_simulate", fake)
    ctx = Context("robustness", tmp_path / "out", True, tmp_path / "work", lambda _: None)
    (tmp_path / "out").mkdir()
    result = robustness.run(ctx)
    assert len(asked) == 4  # clean once per rule, attacked once per rule
    goals = {g.metric: g for g in result.goals}
    assert goals["scale, 2/10: clean - mean"].measured == pytest.approx(0.20) and goals["scale, 2/10: clean - mean"].met
    best = goals["scale, 2/10: clean - best robust rule"]
    assert best.measured == pytest.approx(0.015) and best.met
    assert result.line.startswith("clean 0.930; scale 2/10: mean 0.730, trimmed-mean 0.915")
    assert all(p.is_file() for p in result.plots)
