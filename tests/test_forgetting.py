"""Forgetting per task: the best accuracy a task ever reached minus its accuracy now, from the server's test split."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stamen.common.errors import ConfigError
from stamen.common.scenario import parse_scenario
from stamen.server.evaluate import ServerData, evaluate_tasks
from stamen.server.tasks import TaskTracker


class Fixed(nn.Module):
    """Predicts, for input value v, the class ``table[v]``: a model whose accuracy per class we set."""

    def __init__(self, table: dict[int, int]) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 6)
        for i, v in enumerate(x[:, 0].long().tolist()):
            out[i, self.table[v]] = 1.0
        return out


def _data() -> ServerData:
    """Ten test examples of each class 0-5; input value = example's class * 10 + index."""
    y = torch.arange(6).repeat_interleave(10)
    x = (y * 10 + torch.arange(60) % 10).float().reshape(-1, 1)
    return ServerData((1,), 6, x, y)


def _model(correct: dict[int, int]) -> Fixed:
    """Right on the first ``correct[c]`` examples of class c, wrong (class 5 - c) on the rest."""
    return Fixed({c * 10 + i: (c if i < correct.get(c, 0) else 5 - c) for c in range(6) for i in range(10)})


def test_task_accuracy_counts_predictions_over_all_classes() -> None:
    accuracies = evaluate_tasks(_model({0: 10, 1: 5, 2: 0, 3: 10}), _data(), ((0, 1), (2, 3)))
    assert accuracies == [0.75, 0.5]
    assert evaluate_tasks(_model({}), ServerData((1,), 6, None, None), ((0, 1),)) is None
    with pytest.raises(ConfigError, match=r"no example of task classes \[7\]"):
        evaluate_tasks(_model({}), _data(), ((7,),))


def test_forgetting_is_best_ever_minus_final_per_task() -> None:
    scenario = parse_scenario({"tasks": {"rounds-per-task": 2, "classes": [[0, 1], [2, 3], [4, 5]]}}, "t")
    tracker = TaskTracker(scenario, _data())
    rounds = [
        {0: 8, 1: 8},  # round 1: task 1 learnt to 0.8
        {0: 10, 1: 10},  # round 2: task 1 at its best, 1.0
        {0: 6, 1: 6, 2: 9, 3: 9},  # round 3: task 2 learnt, task 1 partly forgotten
        {0: 2, 1: 2, 2: 10, 3: 10},
        {0: 2, 1: 2, 2: 4, 3: 4, 4: 10, 5: 10},  # round 5: task 3
    ]
    rows = [tracker.observe(r, _model(correct)) for r, correct in enumerate(rounds, start=1)]
    assert rows[1] == {"task1_accuracy": 1.0, "task2_accuracy": 0.0, "task3_accuracy": 0.0, "forgetting_mean": 0.0}
    assert rows[2]["forgetting_mean"] == pytest.approx(0.4)  # only task 1 has ended by round 3
    assert rows[4]["forgetting_mean"] == pytest.approx((0.8 + 0.6) / 2)
    summary = tracker.summary()
    assert summary["task_accuracy_best"] == [1.0, 1.0, 1.0]
    assert summary["task_best_round"] == [2, 4, 5]
    assert summary["task_accuracy_final"] == [0.2, 0.4, 1.0]
    assert summary["forgetting"] == pytest.approx([0.8, 0.6, 0.0])
    assert summary["forgetting_mean"] == pytest.approx(0.7)  # tasks 1 and 2; task 3 is still being trained
    assert not math.isnan(summary["forgetting_mean"])


def test_a_resumed_run_rebuilds_best_accuracies_from_its_history() -> None:
    scenario = parse_scenario({"tasks": {"rounds-per-task": 1, "classes": [[0, 1], [2, 3]]}}, "t")
    straight = TaskTracker(scenario, _data())
    rows = [straight.observe(r, _model(c)) for r, c in enumerate([{0: 10, 1: 10}, {0: 3, 1: 3, 2: 10, 3: 10}], 1)]
    resumed = TaskTracker(scenario, _data())
    resumed.resume([{"round": 1, **rows[0]}])  # the checkpoint holds round 1's history row
    resumed.observe(2, _model({0: 3, 1: 3, 2: 10, 3: 10}))
    assert resumed.summary() == straight.summary()
    assert resumed.summary()["forgetting"] == pytest.approx([0.7, 0.0])
