"""scale: many simulated sites, a fraction sampled per round; memory and time per client call.

MNIST-5k split IID over N sites (4 images each at 1,000), 10% sampled per round, cnn28, no
evaluation. Memory: peak PSS of the whole process tree (CLI, engine, Ray's processes and
workers), sampled every 0.5 s while it runs; summed RSS is shown too, but it counts pages
shared between Ray's processes once per process. Time: median server-side seconds per
round after round 1 (round 1 carries engine start and every site's identity handshake);
ms per client call = round seconds / sampled sites (the clients run one per core, so this
is wall time per call, as the plain-Flower anchor counts it). Overhead per call = that
minus the call's own compute (its local epoch, measured single-thread here, / cores).
A run of 1,000 sites with 1% sampled (as many calls as 100 sites at 10%) shows whether
cost follows sampled or total sites. Goals: 1,000 sites in <= 1.5 GiB PSS, <= 20 ms
overhead per client call.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from stamen.simulations.bench.floor import seconds_per_epoch
from stamen.simulations.bench.plots import bar_chart
from stamen.simulations.bench.runner import Context, Goal, Result
from stamen.simulations.bench.runs import BenchError, stamen_simulate
from stamen.simulations.bench.workload import Workload

SUMMARY = "100 / 300 / 1000 simulated sites, 10% sampled: peak PSS and time per client call"
GiB = 2**30
GOAL_PSS_GIB = 1.5
GOAL_OVERHEAD_MS = 20.0


@dataclass(frozen=True)
class Size:
    clients: int
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.clients}@{self.fraction:.0%}"

    @property
    def sampled(self) -> int:
        return max(1, round(self.clients * self.fraction))


@dataclass(frozen=True)
class Plan:
    sizes: tuple[Size, ...]
    rounds: int
    goal_clients: int


FULL = Plan(sizes=(Size(100, 0.1), Size(300, 0.1), Size(1000, 0.1), Size(1000, 0.01)), rounds=6, goal_clients=1000)
QUICK = Plan(sizes=(Size(50, 0.1),), rounds=3, goal_clients=50)


def run(ctx: Context) -> Result:
    plan = QUICK if ctx.quick else FULL
    cores = os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    for size in plan.sizes:
        ctx.echo(f"  {size.clients} sites, {size.sampled} sampled per round, {plan.rounds} rounds")
        w = Workload(clients=size.clients, rounds=plan.rounds, min_partition_size=1)
        args = [*w.stamen_args(), "--fraction", str(size.fraction)]
        r = stamen_simulate(ctx.run_dir(size.label.replace("%", "pct")), args, memory=True)
        if len(r.rows) != plan.rounds or any(int(x["replied"]) != size.sampled for x in r.rows):
            raise BenchError(f"{size.label}: expected {size.sampled} replies in each of {plan.rounds} rounds")
        site_examples = len(w.site(0)[1])
        compute_ms = seconds_per_epoch(w, site_examples) * 1000 / cores
        per_call_ms = r.steady_round_s / size.sampled * 1000
        rows.append(
            {
                **asdict(size),
                "sampled": size.sampled,
                "examples_per_site": site_examples,
                "peak_pss_gib": r.peak_pss / GiB,
                "peak_rss_gib": r.peak_rss / GiB,
                "peak_processes": r.peak_processes,
                "peak_pss_by_process_gib": {
                    k: v / GiB for k, v in sorted(r.peak_breakdown.items(), key=lambda kv: -kv[1])
                },
                "seconds_per_round": r.steady_round_s,
                "ms_per_call": per_call_ms,
                "cpu_ms_per_call": r.steady_cpu_per_round_s / size.sampled * 1000,
                "compute_ms_per_call": compute_ms,
                "overhead_ms_per_call": per_call_ms - compute_ms,
                "startup_s": r.startup_s,
                "first_round_s": float(r.rows[0]["seconds"]),
                "wall_s": r.wall_s,
            }
        )
        ctx.echo(f"    peak PSS {r.peak_pss / GiB:.2f} GiB, {r.steady_round_s:.2f} s/round, {per_call_ms:.1f} ms/call")
    at_goal = next(x for x in rows if x["clients"] == plan.goal_clients and x["fraction"] == 0.1)
    plot = bar_chart(
        ctx.plot_path(),
        "simulated sites (label: sites@fraction sampled)",
        {
            "peak PSS of the process tree (GiB)": {x_label(x): x["peak_pss_gib"] for x in rows},
            "ms per client call (wall)": {x_label(x): x["ms_per_call"] for x in rows},
        },
    )
    line = "; ".join(
        f"{x_label(x)}: {x['peak_pss_gib']:.2f} GiB PSS, {x['seconds_per_round']:.2f} s/round, "
        f"{x['ms_per_call']:.1f} ms/call"
        for x in rows
    )
    return Result(
        line=line,
        params={"sizes": [asdict(s) for s in plan.sizes], "rounds": plan.rounds, "model": "cnn28", "cores": cores},
        figures={"sizes": rows},
        goals=[
            Goal(f"peak PSS GiB at {plan.goal_clients} sites", GOAL_PSS_GIB, at_goal["peak_pss_gib"]),
            Goal(
                f"overhead ms per client call at {plan.goal_clients} sites",
                GOAL_OVERHEAD_MS,
                at_goal["overhead_ms_per_call"],
            ),
        ],
        plots=[plot],
    )


def x_label(row: dict[str, Any]) -> str:
    return Size(row["clients"], row["fraction"]).label
