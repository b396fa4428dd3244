"""continual: class-incremental learning with and without the replay buffer (simulations/bench/split_replay.py).

Split-MNIST on MNIST-5k (quick: Split-digits), run twice through ``stamen simulate``:
``replay-size`` 0 and 200. Goal: replay cuts the first task's forgetting at least 3x
(Split-MNIST literature: about 0.90 final accuracy with replay, about 0.20 without).
"""

from __future__ import annotations

from stamen.simulations.bench.runner import Context, Goal, Result
from stamen.simulations.bench.split_replay import run as run_continual

SUMMARY = "forgetting of task 1 and final accuracy, class-incremental, replay-size 0 vs 200"
GOAL = 3.0


def run(ctx: Context) -> Result:
    figures = run_continual(ctx.work, quick=ctx.quick)
    none, replay = figures["no_replay"], figures["replay"]
    line = (
        f"{figures['scenario']}: final accuracy {none['final_accuracy']:.3f} -> {replay['final_accuracy']:.3f}, "
        f"task-1 forgetting {none['forgetting_task1']:.3f} -> {replay['forgetting_task1']:.3f} with replay"
    )
    return Result(
        line=line,
        params={"scenario": figures["scenario"], "clients": figures["clients"], "replay_size": figures["replay_size"]},
        figures=figures,
        goals=[Goal("forgetting_task1_ratio", GOAL, figures["forgetting_task1_ratio"], ">=")],
    )
