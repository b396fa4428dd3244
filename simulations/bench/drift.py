"""drift: detection delay and false alarms of stamen's drift signals on the drift scenarios.

Each case is one ``stamen simulate --scenario NAME`` run (DP off, every site every round)
whose scenario changes some sites' data from a known round k. The signal a case watches:

- data drift (``label-shift``: prior shift; ``rotation`` and ``noise``: covariate shift):
  a site's label or feature PSI at or over the alert line (0.2);
- concept drift (``label-swap``): a Page–Hinkley detection on a site's training loss or on
  the global evaluation loss.

Per case: the detection delay (first alarm on a shifted site at or after k, minus k; null
when never detected) and the false alarms (alarms before k, or on a site whose data did not
change; a detection on the global loss counts as a false alarm only before k). Client drift
is measured apart: the mean cosine between site updates and their aggregate over rounds
3..R, Dirichlet α = 0.1 against α = 100. Goals: every shift detected within 2 rounds, no
false alarm, and the cosine lower under label skew by at least 0.1.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from stamen.common.drift import PSI_ALERT
from stamen.common.identity import site_id_from_node_config
from stamen.simulations.bench.plots import curves
from stamen.simulations.bench.runner import Context, Goal, Result
from stamen.simulations.bench.runs import BenchError, Run, run_all, stamen_simulate

SUMMARY = "drift scenarios: detection delay and false alarms; client-drift cosine under label skew"
MAX_DELAY = 2
GLOBAL = "global"


@dataclass(frozen=True)
class Case:
    """One drift scenario and how its shift is seen."""

    scenario: str
    signal: str  # "label_psi", "feature_psi" or "concept"
    from_round: int
    shifted: tuple[int, ...]  # partition ids whose data changes
    rounds: int


@dataclass(frozen=True)
class Plan:
    cases: tuple[Case, ...]
    clients: int
    dataset: str
    cosine_alphas: tuple[float, float]
    cosine_rounds: int
    parallel: int


ALL_SITES = tuple(range(10))
FULL = Plan(
    cases=(
        Case("label-shift", "label_psi", 6, (0, 1), 10),
        Case("rotation", "feature_psi", 6, ALL_SITES, 12),
        Case("noise", "feature_psi", 6, (0, 1, 2, 3, 4), 12),
        Case("label-swap", "concept", 8, (0, 1, 2), 15),
    ),
    clients=10,
    dataset="mnist5k",
    cosine_alphas=(0.1, 100.0),
    cosine_rounds=8,
    parallel=2,
)
QUICK = Plan(
    cases=(Case("label-shift", "label_psi", 6, (0, 1), 8),),
    clients=4,
    dataset="digits",
    cosine_alphas=(0.1, 100.0),
    cosine_rounds=4,
    parallel=2,
)


def _site(pid: int) -> str:
    return site_id_from_node_config({"partition-id": pid})


def _alarms(summary: dict[str, Any], signal: str) -> dict[str, list[int]]:
    """Series name (a site-id, or ``global``) -> the rounds it alarmed on."""
    drift = summary["drift"]
    if signal == "concept":
        out: dict[str, list[int]] = {}
        for event in drift["detections"]:
            out.setdefault(event["series"], []).append(int(event["round"]))
        return out
    return {
        site: [r for r, v in zip(series["round"], series[signal], strict=True) if v >= PSI_ALERT]
        for site, series in drift["per_site"].items()
        if signal in series
    }


def score(case: Case, summary: dict[str, Any]) -> dict[str, Any]:
    """Detection delay and false alarms of one case's run."""
    shifted = {_site(p) for p in case.shifted}
    alarms = _alarms(summary, case.signal)
    seen = [r for series, rounds in alarms.items() if series in shifted or series == GLOBAL for r in rounds]
    after = [r for r in seen if r >= case.from_round]
    false_alarms = sorted(
        (series, r)
        for series, rounds in alarms.items()
        for r in rounds
        if r < case.from_round or (series not in shifted and series != GLOBAL)
    )
    return {
        "scenario": case.scenario,
        "signal": case.signal,
        "from_round": case.from_round,
        "shifted_sites": sorted(shifted),
        "delay_rounds": min(after) - case.from_round if after else None,
        "false_alarms": len(false_alarms),
        "false_alarm_events": [list(e) for e in false_alarms],
        "alarms": alarms,
    }


def shifted_series(case: Case, summary: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per round, the largest data-drift score among the case's shifted sites (for the plot)."""
    shifted = {_site(p) for p in case.shifted}
    best: dict[int, float] = {}
    for site, series in summary["drift"]["per_site"].items():
        if site in shifted and case.signal in series:
            for r, v in zip(series["round"], series[case.signal], strict=True):
                best[r] = max(best.get(r, 0.0), v)
    rounds = sorted(best)
    return [float(r) for r in rounds], [best[r] for r in rounds]


def _case_run(ctx: Context, plan: Plan, case: Case) -> Run:
    args = ["--scenario", case.scenario, "--clients", str(plan.clients), "--dataset", plan.dataset]
    args += ["--rounds", str(case.rounds), "--no-dp", "--set", "drift-reference-rounds=2"]
    return stamen_simulate(ctx.run_dir(case.scenario), args)


def _cosine_run(ctx: Context, plan: Plan, alpha: float) -> Run:
    args = ["--clients", str(plan.clients), "--dataset", plan.dataset, "--alpha", f"{alpha:g}", "--no-dp"]
    args += ["--rounds", str(plan.cosine_rounds), "--set", "min-partition-size=10"]
    return stamen_simulate(ctx.run_dir(f"cosine-alpha-{alpha:g}"), args)


def _complete(r: Run, rounds: int) -> dict[str, Any]:
    summary = r.summary()
    if summary.get("rounds_completed") != rounds:
        raise BenchError(f"{r.out}: the run did not complete {rounds} rounds")
    return summary


def run(ctx: Context) -> Result:
    plan = QUICK if ctx.quick else FULL
    jobs = [partial(_case_run, ctx, plan, case) for case in plan.cases]
    jobs += [partial(_cosine_run, ctx, plan, alpha) for alpha in plan.cosine_alphas]
    ctx.echo(f"  {len(jobs)} runs of {plan.clients} sites on {plan.dataset}, {plan.parallel} at a time")
    runs = run_all(jobs, plan.parallel)
    case_runs, cosine_runs = runs[: len(plan.cases)], runs[len(plan.cases) :]
    summaries = [_complete(r, case.rounds) for case, r in zip(plan.cases, case_runs, strict=True)]
    cases = [score(case, summary) for case, summary in zip(plan.cases, summaries, strict=True)]
    plot = curves(
        ctx.plot_path(),
        f"largest PSI among the shifted sites per round (dotted: the {PSI_ALERT} alert line)",
        {
            f"{c.scenario} ({c.signal}, from round {c.from_round})": shifted_series(c, summary)
            for c, summary in zip(plan.cases, summaries, strict=True)
            if c.signal != "concept"
        },
        "round",
        "PSI",
        hline=PSI_ALERT,
    )
    cosine: dict[str, float] = {}
    for alpha, r in zip(plan.cosine_alphas, cosine_runs, strict=True):
        rows = [row for row in _complete(r, plan.cosine_rounds)["history"] if row["round"] >= 3]
        cosine[f"{alpha:g}"] = statistics.mean(row["cosine_mean"] for row in rows)
    skewed, iid = (cosine[f"{a:g}"] for a in plan.cosine_alphas)
    delays = [c["delay_rounds"] for c in cases]
    worst = None if any(d is None for d in delays) else max(delays)
    goals = [
        Goal("worst detection delay (rounds)", MAX_DELAY, worst),
        Goal("false alarms", 0, sum(c["false_alarms"] for c in cases)),
        Goal("cosine(alpha 100) - cosine(alpha 0.1)", 0.1, iid - skewed, ">="),
    ]
    shown = ", ".join(
        f"{c['scenario']} delay {'never' if c['delay_rounds'] is None else c['delay_rounds']}/{c['false_alarms']} false"
        for c in cases
    )
    return Result(
        line=f"{shown}; client-drift cosine alpha 0.1 {skewed:.3f} vs alpha 100 {iid:.3f}",
        params={**asdict(plan), "psi_alert": PSI_ALERT},
        figures={"cases": cases, "cosine_mean": cosine},
        goals=goals,
        plots=[plot],
    )
