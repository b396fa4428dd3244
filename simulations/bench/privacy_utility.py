"""privacy-utility: final test accuracy at per-site epsilon in {1, 3, 8, inf}, delta fixed.

The default demo's federation (MNIST-5k over 10 sites, Dirichlet 0.5, cnn28, FedAvgM) run
with ``stamen simulate --dp --target-epsilon E --privacy-horizon-rounds R`` for R rounds,
so every site spends at most E by the end; epsilon = inf is the same run without DP.
Reference points: Abadi et al. 2016 (central DP-SGD, full MNIST) 90/95/97% at eps
0.5/2/8; a naive DP-FedAvg loop on this data reached 0.794 at eps 8 (shared/anchors.md).
Goals: every site's reported epsilon at or under its target; accuracy >= 0.85 at eps 8.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from stamen.simulations.bench.plots import curves
from stamen.simulations.bench.runner import Context, Goal, Result
from stamen.simulations.bench.runs import BenchError, Run, run_all, stamen_simulate

SUMMARY = "final accuracy at per-site epsilon 1, 3, 8, inf (10 sites, MNIST-5k)"
DELTA = 1e-5
GOAL_ACCURACY_AT_8 = 0.85


@dataclass(frozen=True)
class Plan:
    epsilons: tuple[float, ...]
    clients: int
    rounds: int
    parallel: int


FULL = Plan(epsilons=(1.0, 3.0, 8.0, math.inf), clients=10, rounds=20, parallel=2)
QUICK = Plan(epsilons=(8.0, math.inf), clients=4, rounds=2, parallel=2)


def _args(plan: Plan, eps: float) -> list[str]:
    args = ["--clients", str(plan.clients), "--rounds", str(plan.rounds), "--dataset", "mnist5k"]
    if math.isinf(eps):
        return [*args, "--no-dp"]
    dp = ["--dp", "--target-epsilon", str(eps), "--delta", str(DELTA), "--privacy-horizon-rounds", str(plan.rounds)]
    return [*args, *dp]


def _one(ctx: Context, plan: Plan, eps: float) -> Run:
    return stamen_simulate(ctx.run_dir(f"eps-{eps:g}"), _args(plan, eps))


def run(ctx: Context) -> Result:
    plan = QUICK if ctx.quick else FULL
    ctx.echo(f"  {len(plan.epsilons)} runs of {plan.clients} sites x {plan.rounds} rounds, {plan.parallel} at a time")
    runs = run_all([partial(_one, ctx, plan, eps) for eps in plan.epsilons], plan.parallel)
    rows: list[dict[str, Any]] = []
    for eps, r in zip(plan.epsilons, runs, strict=True):
        summary = r.summary()
        if summary.get("rounds_completed") != plan.rounds:
            raise BenchError(f"epsilon {eps:g}: run did not complete {plan.rounds} rounds ({r.out})")
        privacy = summary.get("privacy") or {}
        sigmas = [p["noise_multiplier"] for p in privacy.get("per_client", {}).values()]
        rows.append(
            {
                "target_epsilon": None if math.isinf(eps) else eps,
                "final_accuracy": summary["final"]["accuracy"],
                "best_accuracy": summary["best"]["accuracy"],
                "epsilon_max": privacy.get("epsilon_max"),
                "epsilon_mean": privacy.get("epsilon_mean"),
                "noise_multiplier_range": [min(sigmas), max(sigmas)] if sigmas else None,
                "refused": privacy.get("refused"),
                "seconds_per_round": r.steady_round_s,
                "wall_s": r.wall_s,
            }
        )
    goals = [
        Goal(
            f"epsilon spent / target at eps {row['target_epsilon']:g}", 1.0, row["epsilon_max"] / row["target_epsilon"]
        )
        for row in rows
        if row["target_epsilon"] is not None
    ]
    at_8 = next((row["final_accuracy"] for row in rows if row["target_epsilon"] == 8.0), None)
    if at_8 is not None:
        goals.append(Goal("final accuracy at eps 8", GOAL_ACCURACY_AT_8, at_8, op=">="))
    label = {eps: ("no DP" if math.isinf(eps) else f"eps {eps:g}") for eps in plan.epsilons}
    plot = curves(
        ctx.plot_path(),
        f"test accuracy per round, {plan.clients} sites, delta {DELTA:g}",
        {label[eps]: ([x["round"] for x in r.rows], r.accuracy()) for eps, r in zip(plan.epsilons, runs, strict=True)},
        "round",
        "test accuracy",
    )
    line = ", ".join(f"{label[eps]} {row['final_accuracy']:.3f}" for eps, row in zip(plan.epsilons, rows, strict=True))
    return Result(
        line=f"final accuracy: {line}",
        params={**asdict(plan), "epsilons": [None if math.isinf(e) else e for e in plan.epsilons], "delta": DELTA},
        figures={"runs": rows},
        goals=goals,
        plots=[plot],
        notes=["epsilon null = no DP; runs in parallel, so seconds per round are not comparable with other scenarios"],
    )
