"""deployed-round: round overhead of a deployed federation on loopback (simulations/bench/round_overhead.py).

A real SuperLink and three real SuperNodes on 127.0.0.1 (TLS, node authentication), MNIST-5k
split IID, DP off, one local epoch. Overhead = a round's wall time minus the slowest site's
training time, averaged over the rounds after the first. Three set-ups on the same machine:

- ``after``: stamen as shipped (the warm site executor, the server's 0.2 s reply poll);
- ``before``: stamen with Flower's defaults (a new ``flwr-clientapp`` process per message,
  the server polling for replies every 3 s); its sites' compute is the warm run's;
- ``flower``: a plain Flower app in the pattern of Flower's PyTorch quickstart.

The part that is the SuperNode's own idle poll (Flower sleeps a fixed 3 s after an empty
pull) is inside ``to_supernode_s``: from the server creating an instruction to the SuperNode
starting to receive it. Goal: ``after`` overhead <= 3 s per round (ambition 1 s).
"""

from __future__ import annotations

import argparse
from typing import Any

from stamen.simulations.bench import round_overhead as deploy_bench
from stamen.simulations.bench.runner import Context, Goal, Result

SUMMARY = "deployed round overhead on loopback, 3 SuperNodes: stamen after / before / plain Flower"
GOAL_S = 3.0
SETUPS = {
    "after": {"app": "stamen", "executor": "warm", "reply_poll": 0.2},
    "before": {"app": "stamen", "executor": "flower", "reply_poll": 3.0},
    "flower": {"app": "quickstart", "executor": "flower", "reply_poll": 3.0},
}


def figures(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The per-set-up figures of ``deploy_bench.run`` results, keyed by set-up."""
    out: dict[str, Any] = {}
    for name, r in results.items():
        row = {k: r[k] for k in ("round_mean", "compute_mean", "overhead_mean", "final_accuracy", "rounds", "sites")}
        for key in ("to_supernode_mean", "supernode_download_mean", "supernode_to_executor_mean",
                    "executor_transfer_mean"):  # fmt: skip
            if key in r:
                row[key.removesuffix("_mean") + "_s"] = r[key]
        out[name] = row
    return out


def run(ctx: Context) -> Result:
    rounds, timeout = (3, 900.0) if ctx.quick else (6, 1800.0)
    chosen = ("after",) if ctx.quick else ("after", "before", "flower")
    results: dict[str, dict[str, Any]] = {}
    for name in chosen:
        ctx.echo(f"  {name}: 3 SuperNodes, {rounds} rounds")
        compute = results["after"]["compute_mean"] if name == "before" else 0.0
        args = argparse.Namespace(**SETUPS[name], sites=3, rounds=rounds, compute=compute, timeout=timeout)
        results[name] = deploy_bench.run(args)
    figs = figures(results)
    after = figs["after"]
    line = ", ".join(f"{n} {f['overhead_mean']:.2f} s (round {f['round_mean']:.2f} s)" for n, f in figs.items())
    line += f"; after: server -> SuperNode {after['to_supernode_s']:.2f} s (holds the SuperNode's idle poll)"
    return Result(
        line=f"overhead per round: {line}",
        params={"sites": 3, "rounds": rounds, "setups": {n: SETUPS[n] for n in chosen}},
        figures=figs,
        goals=[Goal("overhead per round, after (s)", GOAL_S, after["overhead_mean"])],
        notes=["rounds after the first; 'before' uses the warm run's compute time (its ClientApp logs none)"],
    )
