"""overhead: the same local SGD steps by plain PyTorch (the floor), stamen, and plain Flower.

(a) the compute floor (:mod:`simulations.bench.floor`); (b) ``stamen simulate`` with every
extra off (no evaluation on either side, constant LR, plain FedAvg, no DP); (c) the
minimal plain-Flower app (:mod:`simulations.bench.flower_app`) on the same engine. Rounds
after the first are compared (median server-side seconds per round against the floor's
seconds per round); the time until round 1 ends, less one steady round, is reported as
start-up. Goals: stamen <= 1.15x the floor and no slower than plain Flower, per round, in
wall time and (the steadier figure when other work shares the cores) in CPU time of the
whole process tree.
"""

from __future__ import annotations

from stamen.simulations.bench.floor import measure_floor
from stamen.simulations.bench.plots import bar_chart
from stamen.simulations.bench.runner import Context, Goal, Result
from stamen.simulations.bench.runs import BenchError, Run, plain_flower, stamen_simulate
from stamen.simulations.bench.workload import Workload

SUMMARY = "same local SGD steps: plain PyTorch floor vs stamen vs plain Flower"
FULL = Workload(clients=10, rounds=20)
QUICK = Workload(clients=4, rounds=4)
GOAL_VS_FLOOR = 1.15
GOAL_VS_FLOWER = 1.0


def _check(run: Run, w: Workload, who: str) -> None:
    """Every round ran and every site replied, or the timings mean nothing."""
    if len(run.rows) != w.rounds or any(int(r["replied"]) != w.clients for r in run.rows):
        replied = [r.get("replied") for r in run.rows]
        raise BenchError(f"{who}: expected {w.rounds} rounds with {w.clients} replies each, got {replied}")


def _side(run: Run) -> dict[str, float]:
    return {
        "s_per_round": run.steady_round_s,
        "cpu_s_per_round": run.steady_cpu_per_round_s,
        "startup_s": run.startup_s,
        "first_round_end_s": run.first_round_end_s,
        "wall_s": run.wall_s,
    }


def run(ctx: Context) -> Result:
    w = QUICK if ctx.quick else FULL
    ctx.echo(f"  floor: {w.clients} sites x {w.rounds} rounds of {w.model} on {w.dataset}, plain PyTorch")
    floor = measure_floor(w)
    ctx.echo("  stamen simulate, extras off")
    stamen = stamen_simulate(ctx.run_dir("stamen"), w.stamen_args())
    _check(stamen, w, "stamen")
    ctx.echo("  plain Flower app")
    flower = plain_flower(ctx.run_dir("flower"), w.as_dict())
    _check(flower, w, "plain Flower")

    floor_round = floor.seconds / w.rounds
    s, f = _side(stamen), _side(flower)
    figures = {
        "floor_s": floor.seconds,
        "floor_best": floor.best,
        "floor_one_process_s": floor.one_process_s,
        "floor_parallel_s": floor.parallel_s,
        "floor_s_per_round": floor_round,
        "floor_cpu_s_per_round": floor.parallel_cpu_s / w.rounds,
        "stamen": s,
        "flower": {**f, "final_accuracy": flower.summary()["final"]["accuracy"]},
        "ratio_stamen_floor": s["s_per_round"] / floor_round,
        "ratio_stamen_flower": s["s_per_round"] / f["s_per_round"],
        "ratio_flower_floor": f["s_per_round"] / floor_round,
        "ratio_startup_stamen_flower": s["startup_s"] / f["startup_s"] if f["startup_s"] > 0 else None,
        "stamen_overhead_s_per_round": s["s_per_round"] - floor_round,
        "ratio_cpu_stamen_floor": s["cpu_s_per_round"] / (floor.parallel_cpu_s / w.rounds),
        "ratio_cpu_stamen_flower": s["cpu_s_per_round"] / f["cpu_s_per_round"],
    }
    plot = bar_chart(
        ctx.plot_path(),
        "seconds per round (after round 1) and start-up",
        {
            "per round": {
                f"floor ({floor.best})": floor_round,
                "stamen": s["s_per_round"],
                "plain Flower": f["s_per_round"],
            },
            "start-up": {"stamen": s["startup_s"], "plain Flower": f["startup_s"]},
        },
        unit="s",
    )
    line = (
        f"per round: floor {floor_round:.2f}s, stamen {s['s_per_round']:.2f}s, plain Flower {f['s_per_round']:.2f}s; "
        f"stamen/floor {figures['ratio_stamen_floor']:.2f}x (CPU {figures['ratio_cpu_stamen_floor']:.2f}x), "
        f"stamen/Flower {figures['ratio_stamen_flower']:.2f}x (CPU {figures['ratio_cpu_stamen_flower']:.2f}x); "
        f"start-up stamen {s['startup_s']:.1f}s, Flower {f['startup_s']:.1f}s"
    )
    return Result(
        line=line,
        params={**w.as_dict(), "evaluation": "off on all sides", "stamen_args": w.stamen_args()},
        figures=figures,
        goals=[
            Goal("stamen / floor seconds per round, excluding start-up", GOAL_VS_FLOOR, figures["ratio_stamen_floor"]),
            Goal("stamen / plain Flower seconds per round", GOAL_VS_FLOWER, figures["ratio_stamen_flower"]),
            Goal("stamen / floor CPU seconds per round", GOAL_VS_FLOOR, figures["ratio_cpu_stamen_floor"]),
            Goal("stamen / plain Flower CPU seconds per round", GOAL_VS_FLOWER, figures["ratio_cpu_stamen_flower"]),
        ],
        plots=[plot],
        notes=[
            "steady round = median server-side seconds of rounds 2..R; floor per round = floor total / R",
            "start-up = wall time from process start until round 1's progress line, less one steady round",
            "cpu per round = CPU seconds of the whole process tree (Ray included) between the ends of round 1 "
            "and round R, / (R-1); floor cpu = the single-thread workers' CPU seconds / R; less sensitive to "
            "other load on shared cores than wall time",
        ],
    )
