"""The scenario table and the runner: time each scenario, print its line, append to bench.json.

A scenario is one module in :data:`SCENARIOS` with a ``SUMMARY`` string and a
``run(ctx: Context) -> Result`` function. ``DIR/bench.json`` is a JSON list, one object
per scenario run, appended to (and rewritten atomically) as each scenario finishes, so an
interrupted benchmark keeps what it measured. Every number in it is finite: a figure that
could not be measured (a target never reached) is ``null``. ``DIR/bench.md`` renders the
latest result of each scenario as a table of measured figures next to their goals.
"""

from __future__ import annotations

import importlib
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stamen.common.errors import StamenError
from stamen.common.state import atomic_write_bytes, atomic_write_json
from stamen.common.state import finite_or_none as finite
from stamen.simulations.bench.machine import LoadSampler, machine_info
from stamen.simulations.bench.report import load_bench, markdown
from stamen.simulations.bench.runs import ABORT

#: name -> module, in the order a full run takes them.
SCENARIOS: dict[str, str] = {
    "overhead": "stamen.simulations.bench.overhead",
    "dp-cost": "stamen.simulations.bench.dp_cost",
    "fedavgm": "stamen.simulations.bench.fedavgm",
    "privacy-utility": "stamen.simulations.bench.privacy_utility",
    "scale": "stamen.simulations.bench.scale",
    "continual": "stamen.simulations.bench.continual",
    "robustness": "stamen.simulations.bench.robustness",
    "drift": "stamen.simulations.bench.drift",
    "deployed-round": "stamen.simulations.bench.deployed_round",
}

BENCH_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Goal:
    """A goal a measured figure is held to, e.g. ``ratio <= 1.15``."""

    metric: str
    target: float
    measured: float | None
    op: str = "<="

    @property
    def met(self) -> bool:
        if self.measured is None or not math.isfinite(self.measured):
            return False
        return self.measured <= self.target if self.op == "<=" else self.measured >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "target": self.target, "measured": self.measured, "met": self.met}

    def describe(self) -> str:
        shown = "n/a" if self.measured is None else f"{self.measured:.3g}"
        return f"{self.metric} {shown} (goal {self.op} {self.target:g}: {'met' if self.met else 'MISSED'})"


@dataclass
class Result:
    """What a scenario measured: one printable line, its parameters, figures, goals and plots."""

    line: str
    params: dict[str, Any]
    figures: dict[str, Any]
    goals: list[Goal] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    """Where a scenario writes, and how big it should be."""

    name: str
    out: Path
    quick: bool
    work: Path
    echo: Callable[[str], None]

    def run_dir(self, name: str) -> Path:
        """A fresh directory path for one run of this scenario (not created)."""
        path = self.work / name
        if path.exists():
            raise StamenError(f"scenario {self.name} asked twice for run directory {name!r} (a naming bug)")
        return path

    def plot_path(self, suffix: str = "") -> Path:
        return self.out / f"{self.name}{'-' + suffix if suffix else ''}.png"


def resolve(names: list[str]) -> list[str]:
    """The scenarios to run, in table order; all of them when none are named."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise StamenError(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return [n for n in SCENARIOS if n in names] if names else list(SCENARIOS)


def run_bench(names: list[str], out: Path, *, quick: bool, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the named scenarios; append one object per scenario to ``out/bench.json``."""
    chosen = resolve(names)
    out.mkdir(parents=True, exist_ok=True)
    bench_path = out / "bench.json"
    entries = load_bench(bench_path)
    machine = machine_info()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    done: list[dict[str, Any]] = []
    for name in chosen:
        module = importlib.import_module(SCENARIOS[name])
        ctx = Context(name=name, out=out, quick=quick, work=out / "runs" / f"{stamp}-{name}", echo=echo)
        echo(f"{name}: {module.SUMMARY} ({'quick' if quick else 'full'}) ...")
        started = datetime.now(UTC).isoformat(timespec="seconds")
        t0 = time.monotonic()
        entry: dict[str, Any] = {"schema": BENCH_SCHEMA_VERSION, "scenario": name, "quick": quick, "started": started}
        ABORT.clear()
        with LoadSampler() as load:
            try:
                result: Result = module.run(ctx)
            except Exception as exc:  # one broken scenario must not lose the others' results
                echo(traceback.format_exc())
                entry.update(error=f"{type(exc).__name__}: {exc}", met=False)
                line = f"{name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            else:
                entry.update(
                    line=result.line,
                    params=result.params,
                    figures=result.figures,
                    goals=[g.as_dict() for g in result.goals],
                    met=all(g.met for g in result.goals) if result.goals else None,
                    plots=[str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in result.plots],
                    notes=result.notes,
                )
                goals = "; ".join(g.describe() for g in result.goals)
                line = f"{name}: {result.line}" + (f" | {goals}" if goals else "")
        entry.update(seconds=time.monotonic() - t0, load_average=load.report(), machine=machine)
        entries.append(finite(entry))
        done.append(entries[-1])
        atomic_write_json(bench_path, entries, mode=0o644)
        atomic_write_bytes(out / "bench.md", markdown(entries).encode(), mode=0o644)
        echo(line)
    return done
