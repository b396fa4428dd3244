"""fedavgm: rounds to reach a test accuracy, FedAvg vs FedAvgM vs FedAdam vs FedYogi, over label skew.

MNIST-5k over 10 sites, Dirichlet alpha in {100, 1, 0.1}, every site every round, cnn28,
one local epoch of batch 32, constant client LR; centralized test accuracy after each
round; a run stops as soon as it reaches the target (or at the cap). Each strategy's
client LR and server LR are tuned over the same small grid (client LR x a factor of the
strategy's usual server LR) on seed 0 at the tuning alpha, then the tuned pair runs on
every seed and alpha; the figure is the median over seeds (a run that never reaches the
target counts as above the cap). Tuning prunes: a grid run stops once it can no longer
beat the best so far. Goal (Hsu et al. 2019): FedAvgM <= 0.6x FedAvg's rounds at alpha 0.1.

Beside it, the regime Hsu et al. measured server momentum in: many sites (100), a small
fraction sampled each round (10 %), near-pathological label skew (alpha 0.05) and plain local
SGD (no client momentum, which otherwise does part of the server momentum's work); FedAvg and
FedAvgM only, tuned and reported the same way, to a lower target (each round sees a tenth of
the data through ten small, skewed sites).
"""

from __future__ import annotations

import math
import statistics
import threading
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from stamen.simulations.bench.plots import curves, grouped_bars
from stamen.simulations.bench.runner import Context, Goal, Result
from stamen.simulations.bench.runs import Run, run_all, stamen_simulate

SUMMARY = "rounds to 0.90 test accuracy: FedAvg vs FedAvgM vs FedAdam vs FedYogi over Dirichlet alpha"
TARGET = 0.90
GOAL = 0.6
#: each strategy's usual server learning rate; the grid multiplies it by ``server_lr_factors``
SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.03, "fedyogi": 0.03}


@dataclass(frozen=True)
class Plan:
    """How big the scenario is."""

    alphas: tuple[float, ...]
    seeds: tuple[int, ...]
    cap: int
    clients: int
    strategies: tuple[str, ...]
    client_lrs: tuple[float, ...]
    server_lr_factors: tuple[float, ...]
    tune_alpha: float
    parallel: int
    fraction_train: float = 1.0  # of the sites, sampled each round
    client_momentum: float | None = None  # None: the run config's default
    target: float = TARGET


FULL = Plan(
    alphas=(100.0, 1.0, 0.1),
    seeds=(0, 1, 2),
    cap=40,
    clients=10,
    strategies=("fedavg", "fedavgm", "fedadam", "fedyogi"),
    client_lrs=(0.02, 0.05),
    server_lr_factors=(1 / 3, 1.0),
    tune_alpha=0.1,
    parallel=2,
)
QUICK = Plan(
    alphas=(0.1,),
    seeds=(0,),
    cap=3,
    clients=4,
    strategies=("fedavg", "fedavgm"),
    client_lrs=(0.05,),
    server_lr_factors=(1.0,),
    tune_alpha=0.1,
    parallel=2,
)
#: Hsu et al.'s regime (their CIFAR-10 runs: 100 clients, 5-10 % sampled, alpha -> 0, no client momentum)
HSU_FULL = Plan(
    alphas=(0.05,),
    seeds=(0, 1, 2),
    cap=80,
    clients=100,
    strategies=("fedavg", "fedavgm"),
    client_lrs=(0.02, 0.05),
    server_lr_factors=(1.0,),
    tune_alpha=0.05,
    parallel=2,
    fraction_train=0.1,
    client_momentum=0.0,
    target=0.80,
)
HSU_QUICK = Plan(
    alphas=(0.05,),
    seeds=(0,),
    cap=2,
    clients=10,
    strategies=("fedavg", "fedavgm"),
    client_lrs=(0.05,),
    server_lr_factors=(1.0,),
    tune_alpha=0.05,
    parallel=2,
    fraction_train=0.3,
    client_momentum=0.0,
    target=0.80,
)


@dataclass(frozen=True)
class Point:
    """One configuration: strategy, client LR and server LR."""

    strategy: str
    client_lr: float
    server_lr: float


def reached(run: Run, target: float = TARGET) -> int | None:
    """The first round whose accuracy reached the target, or None."""
    return next((int(r["round"]) for r in run.rows if float(r.get("accuracy", math.nan)) >= target), None)


def median_rounds(values: list[int | None]) -> float | None:
    """Median with 'never reached' above every number; None if the median itself never reached."""
    ranked = sorted(math.inf if v is None else float(v) for v in values)
    med = statistics.median(ranked)
    return None if math.isinf(med) else med


def _args(plan: Plan, p: Point, alpha: float, seed: int) -> list[str]:
    regime = ["--set", f"fraction-train={plan.fraction_train:g}"] if plan.fraction_train < 1 else []
    if plan.client_momentum is not None:
        regime += ["--set", f"momentum={plan.client_momentum:g}"]
    if plan.clients * 32 > 4000:  # MNIST-5k's training split over 100 sites: ~40 examples each
        regime += ["--set", "min-partition-size=1"]
    return [*regime,
        "--clients", str(plan.clients),
        "--rounds", str(plan.cap),
        "--dataset", "mnist5k",
        "--model", "cnn28",
        "--partition", "dirichlet",
        "--alpha", str(alpha),
        "--strategy", p.strategy,
        "--lr", str(p.client_lr),
        "--server-lr", str(p.server_lr),
        "--seed", str(seed),
        "--no-dp",
        "--set", "holdout-fraction=0",
        "--set", "lr-schedule=constant",
        "--set", "warmup-rounds=0",
    ]  # fmt: skip


class Limit:
    """The best rounds-to-target so far in a tuning grid, shared by the grid's runs."""

    def __init__(self, cap: int, target: float = TARGET) -> None:
        self.cap = self.value = cap
        self.target = target
        self._lock = threading.Lock()

    def offer(self, rounds: int | None) -> None:
        with self._lock:
            if rounds is not None:
                self.value = min(self.value, rounds)

    def stop(self, row: dict[str, Any]) -> bool:
        """Reached the target, or can no longer beat the best so far (the last round ends by itself)."""
        if int(row["round"]) >= self.cap:
            return False
        return float(row.get("accuracy", math.nan)) >= self.target or int(row["round"]) >= self.value


def _one(ctx: Context, plan: Plan, p: Point, alpha: float, seed: int, limit: Limit) -> Run:
    regime = "hsu-" if plan.fraction_train < 1 else ""
    name = f"{regime}{p.strategy}-a{alpha:g}-s{seed}-lr{p.client_lr:g}-slr{p.server_lr:.3g}"
    run = stamen_simulate(ctx.run_dir(name), _args(plan, p, alpha, seed), stop_when=limit.stop)
    limit.offer(reached(run, plan.target))
    return run


def _best(runs: dict[Point, Run], target: float) -> Point:
    """Fewest rounds to the target; ties and never-reached broken by the best accuracy seen."""

    def key(p: Point) -> tuple[float, float]:
        r = reached(runs[p], target)
        best_acc = max((float(x["accuracy"]) for x in runs[p].rows), default=0.0)
        return (math.inf if r is None else r, -best_acc)

    return min(runs, key=key)


def _measure(ctx: Context, plan: Plan) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, float, int], Run]]:
    """Tune each strategy on seed 0 at the tuning alpha, run the tuned settings everywhere, tabulate."""
    grids: dict[str, dict[Point, Run]] = {}
    for strategy in plan.strategies:
        points = [
            Point(strategy, lr, float(f"{SERVER_LR[strategy] * f:.3g}"))
            for lr in plan.client_lrs
            for f in plan.server_lr_factors
        ]
        ctx.echo(f"  tuning {strategy} over {len(points)} (client lr, server lr) at alpha {plan.tune_alpha:g}")
        limit = Limit(plan.cap, plan.target)
        grids[strategy] = dict(
            zip(
                points,
                run_all([partial(_one, ctx, plan, p, plan.tune_alpha, plan.seeds[0], limit) for p in points], 2),
                strict=True,
            )
        )
    tuned = {s: _best(grids[s], plan.target) for s in plan.strategies}
    jobs, keys = [], []
    for s in plan.strategies:
        for alpha in plan.alphas:
            for seed in plan.seeds:
                if alpha == plan.tune_alpha and seed == plan.seeds[0]:
                    continue
                keys.append((s, alpha, seed))
                jobs.append(partial(_one, ctx, plan, tuned[s], alpha, seed, Limit(plan.cap, plan.target)))
    ctx.echo(f"  {len(jobs)} runs with the tuned settings, {plan.parallel} at a time")
    runs = dict(zip(keys, run_all(jobs, plan.parallel), strict=True))
    for s in plan.strategies:
        runs[(s, plan.tune_alpha, plan.seeds[0])] = grids[s][tuned[s]]

    table: dict[str, dict[str, Any]] = {}
    for s in plan.strategies:
        per_alpha = {}
        for alpha in plan.alphas:
            got = [reached(runs[(s, alpha, seed)], plan.target) for seed in plan.seeds]
            per_alpha[f"{alpha:g}"] = {
                "rounds_per_seed": got,
                "median_rounds": median_rounds(got),
                "best_accuracy_per_seed": [max(runs[(s, alpha, seed)].accuracy()) for seed in plan.seeds],
            }
        table[s] = {
            "client_lr": tuned[s].client_lr,
            "server_lr": tuned[s].server_lr,
            "grid": [
                {
                    "client_lr": p.client_lr,
                    "server_lr": p.server_lr,
                    "rounds": reached(r, plan.target),
                    "stopped_at": len(r.rows),
                }
                for p, r in grids[s].items()
            ],
            "alphas": per_alpha,
        }
    return table, runs


def _ratio(plan: Plan, table: dict[str, dict[str, Any]]) -> float | None:
    """FedAvgM / FedAvg median rounds at the tuning alpha (FedAvg never reaching counts as the cap)."""
    key_alpha = f"{plan.tune_alpha:g}"
    avg = table["fedavg"]["alphas"][key_alpha]["median_rounds"]
    avgm = table["fedavgm"]["alphas"][key_alpha]["median_rounds"]
    return None if avgm is None else avgm / (avg if avg is not None else plan.cap)


def _line(plan: Plan, table: dict[str, dict[str, Any]]) -> str:
    def shown(v: float | None) -> str:
        return f">{plan.cap}" if v is None else f"{v:g}"

    return "; ".join(
        f"alpha {a:g}: "
        + ", ".join(f"{s} {shown(table[s]['alphas'][f'{a:g}']['median_rounds'])}" for s in plan.strategies)
        for a in plan.alphas
    )


def run(ctx: Context) -> Result:
    plan, hsu = (QUICK, HSU_QUICK) if ctx.quick else (FULL, HSU_FULL)
    table, runs = _measure(ctx, plan)
    ctx.echo(
        f"  Hsu et al.'s regime: {hsu.clients} sites, {hsu.fraction_train:.0%} sampled, alpha {hsu.tune_alpha:g}, "
        "no client momentum"
    )
    hsu_table, hsu_runs = _measure(ctx, hsu)
    key_alpha = f"{plan.tune_alpha:g}"
    ratio, hsu_ratio = _ratio(plan, table), _ratio(hsu, hsu_table)
    goals = [
        Goal(f"FedAvgM / FedAvg median rounds to {TARGET:g} at alpha {key_alpha}", GOAL, ratio),
        Goal(
            f"Hsu's regime ({hsu.clients} sites, {hsu.fraction_train:.0%} sampled, no client momentum): FedAvgM / "
            f"FedAvg median rounds to {hsu.target:g} at alpha {hsu.tune_alpha:g}",
            GOAL,
            hsu_ratio,
        ),
    ]
    plots = [
        grouped_bars(
            ctx.plot_path(),
            f"median rounds to {TARGET:.0%} test accuracy (hatched: not reached in {plan.cap})",
            {
                f"alpha {a:g}": {s: table[s]["alphas"][f"{a:g}"]["median_rounds"] for s in plan.strategies}
                for a in plan.alphas
            },
            "rounds",
            cap=plan.cap,
        ),
        *(
            curves(
                ctx.plot_path(name),
                f"{title}test accuracy at alpha {p.tune_alpha:g}, seed {p.seeds[0]}, tuned settings "
                "(runs stop at the target)",
                {
                    s: (
                        [r["round"] for r in got[(s, p.tune_alpha, p.seeds[0])].rows],
                        got[(s, p.tune_alpha, p.seeds[0])].accuracy(),
                    )
                    for s in p.strategies
                },
                "round",
                "test accuracy",
                hline=p.target,
            )
            for name, title, p, got in (
                ("curves", "", plan, runs),
                (
                    "hsu-curves",
                    f"Hsu's regime ({hsu.clients} sites, {hsu.fraction_train:.0%} sampled): ",
                    hsu,
                    hsu_runs,
                ),
            )
        ),
    ]
    return Result(
        line=f"median rounds to {TARGET:g}: {_line(plan, table)}; "
        f"Hsu's regime, to {hsu.target:g}: {_line(hsu, hsu_table)}",
        params={
            **asdict(plan),
            "target_accuracy": TARGET,
            "server_lr_base": SERVER_LR,
            "dataset": "mnist5k",
            "hsu_regime": asdict(hsu),
        },
        figures={
            "strategies": table,
            "ratio_fedavgm_fedavg": ratio,
            "hsu_strategies": hsu_table,
            "hsu_ratio_fedavgm_fedavg": hsu_ratio,
        },
        goals=goals,
        plots=plots,
        notes=[
            "rounds null = target not reached within the cap (or, in tuning, stopped once it could not beat the best)",
            f"tuned on seed {plan.seeds[0]} at alpha {plan.tune_alpha:g} only; the other alphas reuse those settings",
            "Hsu's regime: plain local SGD (momentum 0), sites sampled uniformly each round",
        ],
    )
