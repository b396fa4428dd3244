"""Per-task accuracy and forgetting, for scenarios whose data arrives as a sequence of tasks.

Each round the server evaluates the global model on each task's classes of its test split
(:func:`server.evaluate.evaluate_tasks`). A task's forgetting is the best accuracy the
model ever reached on it minus its accuracy now; the run's ``forgetting_mean`` averages
the tasks whose training is over (at the end of a run, every task but the last, as in
the continual-learning literature). A resumed run rebuilds all of it from the history
rows its checkpoint restored, so nothing extra goes into the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stamen.common.scenario import Scenario
from stamen.server.evaluate import ServerData, evaluate_tasks


class TaskTracker:
    """Best and latest accuracy per task of one run."""

    def __init__(self, scenario: Scenario, data: ServerData) -> None:
        self.scenario = scenario
        self.data = data
        n = len(scenario.tasks)
        self.best = [-math.inf] * n
        self.best_round = [0] * n
        self.latest: list[float] = [math.nan] * n
        self.round = 0

    def observe(self, server_round: int, model: torch.nn.Module) -> dict[str, float]:
        """Evaluate every task now; return the history columns (``task<n>_accuracy``, ``forgetting_mean``)."""
        accuracies = evaluate_tasks(model, self.data, self.scenario.tasks)
        if accuracies is None:
            return {}
        self._update(server_round, accuracies)
        row: dict[str, float] = {f"task{i + 1}_accuracy": acc for i, acc in enumerate(accuracies)}
        row["forgetting_mean"] = self._mean_forgetting(server_round)
        return row

    def resume(self, history: list[dict[str, Any]]) -> None:
        """Continue a resumed run: best and latest accuracy per task from the rows it already wrote."""
        for row in history:
            accuracies = [row.get(f"task{i + 1}_accuracy") for i in range(len(self.scenario.tasks))]
            if None not in accuracies:
                self._update(int(row["round"]), [float(a) for a in accuracies])

    def _update(self, server_round: int, accuracies: list[float]) -> None:
        self.round, self.latest = server_round, accuracies
        for i, acc in enumerate(accuracies):
            if acc > self.best[i]:
                self.best[i], self.best_round[i] = acc, server_round

    def forgetting(self) -> list[float]:
        """Best minus latest accuracy, per task."""
        return [best - latest for best, latest in zip(self.best, self.latest, strict=True)]

    def _mean_forgetting(self, server_round: int) -> float:
        done = [f for i, f in enumerate(self.forgetting()) if self.scenario.task_end(i) < server_round]
        return sum(done) / len(done) if done else 0.0

    def summary(self) -> dict[str, Any]:
        """The ``tasks`` block of ``summary.json``."""
        if self.round == 0:
            return {}
        return {
            "classes": [list(t) for t in self.scenario.tasks],
            "rounds_per_task": self.scenario.rounds_per_task,
            "task_accuracy_final": self.latest,
            "task_accuracy_best": self.best,
            "task_best_round": self.best_round,
            "forgetting": self.forgetting(),
            "forgetting_mean": self._mean_forgetting(self.round),
        }
