"""dp-cost: seconds per local epoch with DP-SGD / without, per registry model and batch size.

Measured inside the federated loop: for each (model, batch size) two short ``stamen
simulate`` runs, ``--dp`` (noise calibrated to a target epsilon, as the demo does) and
``--no-dp``, on 2 IID sites (one per core), every site every round, no evaluation. A
round's server-side seconds are a fixed part plus its sites' local epochs. The fixed part
is measured by two baseline runs whose training is negligible (logreg, one epoch, batch
128), one without DP (the federation's own cost) and one with DP (that plus DP's per-round
cost: noise calibration, the ledger, wrapping the model); each case trains several local
epochs so the epochs dominate. seconds per epoch = (median round seconds after round 1 -
the matching baseline) / epochs. DP's per-round cost is reported on its own.

What dominates: one DP epoch of the costliest case and of cnn28 (the demo's model) is
profiled in this process with torch.profiler through ``client.dp.train_private``, and the
DP per-round steps outside the epoch are timed one by one.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from stamen.client.data import load_site_data
from stamen.client.dp import GRAD_SAMPLE_MODES, dp_schedule, train_private
from stamen.client.ledger import PrivacyLedger, calibrate_noise
from stamen.common.config import StamenConfig
from stamen.common.models import REGISTRY, build_model
from stamen.common.state import SiteStore
from stamen.simulations.bench.plots import grouped_bars
from stamen.simulations.bench.runner import Context, Goal, Result
from stamen.simulations.bench.runs import BenchError, Run, stamen_simulate

SUMMARY = "seconds per local epoch with DP / without, per model and batch size, inside the federated loop"
GOAL = 1.5
CLIENTS = 2
TARGET_EPSILON = 8.0


@dataclass(frozen=True)
class Case:
    """A registry model on a dataset it fits, with enough local epochs that training dominates a round.

    DP epochs cost several times more, so the DP run trains fewer of them (a round of
    each lasts about 1-3 s on an idle 2-core machine).
    """

    model: str
    dataset: str
    epochs_nodp: int
    epochs_dp: int

    def epochs(self, dp: bool) -> int:
        return self.epochs_dp if dp else self.epochs_nodp


#: local epochs (no DP, DP) per registry model: about 1-3 s of training per round on an idle 2-core machine
EPOCHS = {"logreg": (40, 20), "mlp": (30, 3), "cnn28": (3, 2), "cnn28-tanh": (6, 4), "cnn8": (30, 10)}
#: cnn8 takes 8x8 images; every other registry model takes MNIST-5k's 28x28 ones
DATASET = {"cnn8": "digits"}
FULL_CASES = tuple(Case(m, DATASET.get(m, "mnist5k"), *EPOCHS.get(m, (3, 2))) for m in REGISTRY)
QUICK_CASES = (Case("cnn8", "digits", 5, 2),)
FULL_BATCHES = (32, 128)
QUICK_BATCHES = (32,)
BASELINE = Case("logreg", "mnist5k", 1, 1)


def _args(case: Case, batch: int, dp: bool, rounds: int, mode: str = "hooks") -> list[str]:
    args = [
        "--clients", str(CLIENTS),
        "--rounds", str(rounds),
        "--dataset", case.dataset,
        "--model", case.model,
        "--partition", "iid",
        "--batch-size", str(batch),
        "--local-epochs", str(case.epochs(dp)),
        "--set", "holdout-fraction=0",
        "--set", "server-eval=false",
        "--set", "min-partition-size=1",
    ]  # fmt: skip
    if dp:
        return [*args, "--dp", "--target-epsilon", str(TARGET_EPSILON), "--privacy-horizon-rounds", str(rounds),
                "--set", f"dp-grad-sample-mode={mode}"]  # fmt: skip
    return [*args, "--no-dp"]


def _timed(ctx: Context, case: Case, batch: int, dp: bool, rounds: int, tag: str = "", mode: str = "hooks") -> Run:
    name = f"{tag}{case.model}-b{batch}-{'dp' if dp else 'nodp'}{'-' + mode if dp and mode != 'hooks' else ''}"
    run = stamen_simulate(ctx.run_dir(name), _args(case, batch, dp, rounds, mode))
    if len(run.rows) != rounds or any(int(r["replied"]) != CLIENTS for r in run.rows):
        raise BenchError(f"{name}: expected {rounds} rounds with {CLIENTS} replies, got {run.rows}")
    ran = {p.get("grad_sample_mode") for p in run.summary().get("privacy", {}).get("per_client", {}).values()}
    if dp and ran != {mode}:
        raise BenchError(f"{name}: asked for dp-grad-sample-mode {mode}, the sites ran {sorted(map(str, ran))}")
    return run


def profile_dp_epoch(case: Case, batch: int, top: int = 6) -> dict[str, Any]:
    """Top operators (self CPU time) of one DP-SGD epoch on one site, single thread."""
    cfg = StamenConfig.from_mapping(
        {"dataset": case.dataset, "partition": "iid", "batch-size": batch, "holdout-fraction": 0.0}
    )
    site = load_site_data({"partition-id": 0, "num-partitions": CLIENTS}, cfg)
    model = build_model(case.model, tuple(site.x_train.shape[1:]), 10, seed=0)
    kwargs: dict[str, Any] = {
        "server_round": 1,
        "device": torch.device("cpu"),
        "noise_multiplier": 1.0,
        "planned_examples": site.num_train,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_private(model, site.x_train, site.y_train, cfg, seed=0, max_grad_norm=1.0, **kwargs)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            train_private(model, site.x_train, site.y_train, cfg, seed=1, max_grad_norm=1.0, **kwargs)
    finally:
        torch.set_num_threads(threads)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "case": f"{case.model} batch {batch}",
        "total_self_cpu_s": total / 1e6,
        "top": [
            {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
            for e in events[:top]
        ],
    }


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_dp_round_steps(horizon: int = 20) -> dict[str, float]:
    """Seconds of the DP steps a site takes every round outside its epochs (one site, this process).

    Noise calibration is cached per process: its first call (once per site process and
    configuration) and a repeat are both shown.
    """
    cfg = StamenConfig.from_mapping({"dataset": "mnist5k", "partition": "iid", "holdout-fraction": 0.0})
    site = load_site_data({"partition-id": 0, "num-partitions": CLIENTS}, cfg)
    rate, steps = dp_schedule(site.num_train, cfg)

    def calibrate() -> float:
        return calibrate_noise(TARGET_EPSILON, 1e-5, rate, steps, horizon)

    out = {"calibrate_noise_first": _seconds(calibrate), "calibrate_noise_cached": _seconds(calibrate)}
    sigma = calibrate()
    with tempfile.TemporaryDirectory() as root:
        store = SiteStore(root, "site-0000")
        ledger = PrivacyLedger.load(store, "rdp")
        ledger.record(sigma, rate, steps)
        out["ledger_load_and_check"] = _seconds(
            lambda: PrivacyLedger.load(store, "rdp").refusal(sigma, rate, steps, 1e-5, TARGET_EPSILON)
        )
        out["ledger_record_and_epsilon"] = _seconds(lambda: (ledger.record(sigma, rate, steps), ledger.epsilon(1e-5)))
    return out


def _per_epoch(train_s: float, epochs: int) -> float | None:
    """Seconds per epoch; None when the round was no longer than the baseline (nothing to divide)."""
    return train_s / epochs if train_s > 0 else None


def _ratio(dp: float | None, nodp: float | None) -> float | None:
    return dp / nodp if dp is not None and nodp is not None else None


def run(ctx: Context) -> Result:
    cases, batches = (QUICK_CASES, QUICK_BATCHES) if ctx.quick else (FULL_CASES, FULL_BATCHES)
    # ghost clipping beside the hooks at full size; the quick run keeps to the default mode
    modes = ("hooks",) if ctx.quick else GRAD_SAMPLE_MODES
    rounds = 2 if ctx.quick else 3
    ctx.echo(f"  baseline rounds (training negligible): {BASELINE.model}, 1 epoch, batch 128, no DP and DP")
    base_runs = {
        "nodp": _timed(ctx, BASELINE, 128, False, rounds, "baseline-"),
        "dp": _timed(ctx, BASELINE, 128, True, rounds, "baseline-"),
    }
    base = {k: r.steady_round_s for k, r in base_runs.items()}
    base_cpu = {k: r.steady_cpu_per_round_s for k, r in base_runs.items()}
    rows: list[dict[str, Any]] = []
    for case in cases:
        for batch in batches:
            ctx.echo(
                f"  {case.model} on {case.dataset}, batch {batch}: no DP ({case.epochs_nodp} local epochs), "
                f"DP ({case.epochs_dp})"
            )
            plain = _timed(ctx, case, batch, False, rounds)
            private = _timed(ctx, case, batch, True, rounds)
            by_mode = {"hooks": private} | {m: _timed(ctx, case, batch, True, rounds, mode=m) for m in modes[1:]}
            per_epoch = {
                label: _per_epoch(r.steady_round_s - base[label], case.epochs(label == "dp"))
                for label, r in (("nodp", plain), ("dp", private))
            }
            cpu_per_epoch = {
                label: _per_epoch(r.steady_cpu_per_round_s - base_cpu[label], case.epochs(label == "dp"))
                for label, r in (("nodp", plain), ("dp", private))
            }
            ratio = _ratio(per_epoch["dp"], per_epoch["nodp"])
            mode_ratio = {
                m: _ratio(_per_epoch(r.steady_round_s - base["dp"], case.epochs_dp), per_epoch["nodp"])
                for m, r in by_mode.items()
            }
            best = min(mode_ratio, key=lambda m: mode_ratio[m] or float("inf"))
            rows.append(
                {
                    **asdict(case),
                    "batch_size": batch,
                    "round_s_nodp": plain.steady_round_s,
                    "round_s_dp": private.steady_round_s,
                    "epoch_s_nodp": per_epoch["nodp"],
                    "epoch_s_dp": per_epoch["dp"],
                    "ratio": ratio,
                    "epoch_cpu_s_nodp": cpu_per_epoch["nodp"],
                    "epoch_cpu_s_dp": cpu_per_epoch["dp"],
                    "ratio_cpu": _ratio(cpu_per_epoch["dp"], cpu_per_epoch["nodp"]),
                    "epsilon_max": private.summary().get("privacy", {}).get("epsilon_max"),
                    "ratio_by_mode": mode_ratio,  # DP (each dp-grad-sample-mode) / no-DP seconds per epoch
                    "best_mode": best,
                    "ratio_best": mode_ratio.get(best, ratio),
                }
            )
            shown_modes = ", ".join(f"{m} {'n/a' if v is None else round(v, 2)}" for m, v in mode_ratio.items())
            ctx.echo(f"    DP/no-DP per epoch: {shown_modes}")
    worst = max(rows, key=lambda r: r["ratio"] or float("inf"))
    profiled = [Case(worst["model"], worst["dataset"], 1, 1)]
    profiled += [c for c in cases if c.model == "cnn28" and c.model != worst["model"]]
    profiles = [profile_dp_epoch(c, worst["batch_size"] if c.model == worst["model"] else 32) for c in profiled]
    plot = grouped_bars(
        ctx.plot_path(),
        "DP-SGD seconds per local epoch / non-private (CPU)",
        {f"batch {b}": {r["model"]: r["ratio"] for r in rows if r["batch_size"] == b} for b in batches},
        "DP / no DP",
    )

    def shown(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}x"

    summary = ", ".join(
        f"{r['model']}/b{r['batch_size']} {shown(r['ratio'])} (CPU {shown(r['ratio_cpu'])})" for r in rows
    )
    top = profiles[0]["top"][0]
    return Result(
        line=f"DP/no-DP per local epoch: {summary}; top DP cost ({profiles[0]['case']}): {top['op']} "
        f"{top['share']:.0%}",
        params={
            "cases": [asdict(c) for c in cases],
            "batch_sizes": list(batches),
            "grad_sample_modes": list(modes),
            "clients": CLIENTS,
            "rounds": rounds,
            "target_epsilon": TARGET_EPSILON,
            "device": "cpu",
            "cores": os.cpu_count(),
            "baseline": asdict(BASELINE),
        },
        figures={
            "baseline_round_s": base,
            "baseline_cpu_s_per_round": base_cpu,
            "dp_fixed_s_per_round": base["dp"] - base["nodp"],
            "dp_fixed_cpu_s_per_round": base_cpu["dp"] - base_cpu["nodp"],
            "dp_fixed_breakdown_s": time_dp_round_steps(),
            "cases": rows,
            "profiles": profiles,
        },
        goals=[
            goal
            for r in rows
            for goal in (
                Goal(f"DP/no-DP seconds per epoch, {r['model']} batch {r['batch_size']} (hooks)", GOAL, r["ratio"]),
                Goal(
                    f"DP/no-DP seconds per epoch, {r['model']} batch {r['batch_size']}, faster mode ({r['best_mode']})",
                    GOAL,
                    r["ratio_best"],
                ),
                Goal(f"DP/no-DP CPU seconds per epoch, {r['model']} batch {r['batch_size']}", GOAL, r["ratio_cpu"]),
            )
        ],
        plots=[plot],
        notes=[
            "epoch seconds = (median round seconds after round 1 - baseline round seconds) / local epochs",
            "cpu figures: the same with the whole process tree's CPU seconds per round, less sensitive to other "
            "load on shared cores",
            "each of the 2 sites trains on its own core; a round waits for the slower one",
        ],
    )
