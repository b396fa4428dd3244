"""Run one federated simulation as a child process tree and time it from the outside.

Both stamen (``stamen simulate``) and the plain-Flower reference app append one JSON line
per round to ``progress.jsonl`` in their run directory, with the server's own ``seconds``
for the round and ``elapsed`` since the first round began. The watcher here also notes
when each line appeared, counted from process start, so engine start-up (interpreter,
imports, Ray, actors, the first round's one-time work) can be reported apart from the
steady rounds, and the CPU time the whole tree had used by then (on shared cores, CPU
time per round is steadier than wall time). It can stop a run early (SIGINT to the stamen CLI, which then stops its
engine's process group) and samples the tree's memory while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stamen.common.errors import StamenError
from stamen.simulations.bench.proctree import TreeWatch

#: Set when a group of parallel runs must end (Ctrl-C, or one of them failed): the others are stopped.
ABORT = threading.Event()


class BenchError(StamenError):
    """A benchmark run failed; the message names the run and ends with its log tail."""


@dataclass
class Run:
    """What one watched run produced."""

    out: Path
    rc: int
    wall_s: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    seen_at: list[float] = field(default_factory=list)
    cpu_at: list[float] = field(default_factory=list)
    stopped_early: bool = False
    peak_pss: int = 0
    peak_rss: int = 0
    peak_processes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def steady_round_s(self) -> float:
        """Median server-side seconds of the rounds after the first (the first carries start-up)."""
        rest = [float(r["seconds"]) for r in self.rows[1:]]
        if not rest:
            raise BenchError(f"{self.out}: needs at least 2 rounds to time a steady round, got {len(self.rows)}")
        return statistics.median(rest)

    @property
    def steady_cpu_per_round_s(self) -> float:
        """CPU seconds the whole process tree used per round, between the ends of round 1 and the last."""
        if len(self.cpu_at) < 2:
            raise BenchError(f"{self.out}: needs at least 2 rounds to measure CPU per round")
        return (self.cpu_at[-1] - self.cpu_at[0]) / (len(self.cpu_at) - 1)

    @property
    def first_round_end_s(self) -> float:
        """Seconds from process start until the first round's progress line appeared."""
        return self.seen_at[0]

    @property
    def startup_s(self) -> float:
        """One-time cost: time to the end of round 1, less one steady round."""
        return max(0.0, self.first_round_end_s - self.steady_round_s)

    def summary(self) -> dict[str, Any]:
        path = self.out / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def accuracy(self) -> list[float]:
        """Per-round accuracy as the run reported it (NaN where it was not evaluated)."""
        return [float(r.get("accuracy", float("nan"))) for r in self.rows]


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return f"({path} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def watch(
    cmd: list[str],
    out: Path,
    *,
    timeout: float,
    stop_when: Callable[[dict[str, Any]], bool] | None = None,
    memory: bool = False,
    logs: tuple[Path, ...] = (),
) -> Run:
    """Run ``cmd`` (which writes ``out/progress.jsonl``) to the end, or until ``stop_when(row)``."""
    log_path = out.parent / f"{out.name}.log"
    progress = out / "progress.jsonl"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    run = Run(out=out, rc=-1, wall_s=0.0)
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        with TreeWatch(proc.pid, memory=memory) as tree:
            offset = 0
            deadline = started + timeout
            while proc.poll() is None and time.monotonic() < deadline and not ABORT.is_set():
                time.sleep(0.1)
                if not progress.exists():
                    continue
                with open(progress, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offset += len(complete)
                for line in complete.decode().splitlines():
                    run.rows.append(json.loads(line))
                    run.seen_at.append(time.monotonic() - started)
                    run.cpu_at.append(tree.cpu_seconds())
                    if stop_when is not None and not run.stopped_early and stop_when(run.rows[-1]):
                        run.stopped_early = True
                        proc.send_signal(signal.SIGINT)  # the stamen CLI then stops its engine group
            if proc.poll() is None and not run.stopped_early:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        run.rc = proc.returncode
        run.wall_s = time.monotonic() - started
        run.peak_pss, run.peak_rss, run.peak_processes = tree.peak_pss, tree.peak_rss, tree.peak_processes
        run.peak_breakdown = tree.peak_breakdown
    if ABORT.is_set():
        raise BenchError(f"run {out} stopped: another run failed or the benchmark was interrupted")
    if run.rc != 0 and not run.stopped_early:
        tails = "\n".join(f"--- {p}\n{_tail(p)}" for p in (log_path, *logs))
        raise BenchError(f"run {out} failed (exit {run.rc} after {run.wall_s:.0f}s)\n{tails}")
    return run


def stamen_simulate(
    out: Path,
    args: list[str],
    *,
    timeout: float = 1800,
    stop_when: Callable[[dict[str, Any]], bool] | None = None,
    memory: bool = False,
) -> Run:
    """``stamen simulate ARGS --out OUT`` as a user runs it, watched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "stamen", "simulate", *args, "--out", str(out), "--no-progress"]
    cmd += ["--timeout", str(timeout)]
    return watch(cmd, out, timeout=timeout + 120, stop_when=stop_when, memory=memory, logs=(out / "simulation.log",))


def plain_flower(out: Path, workload: dict[str, Any], *, timeout: float = 1800) -> Run:
    """The plain-Flower reference app (:mod:`simulations.bench.flower_app`) on ``workload``, watched."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {"workload": workload, "out": str(out), "cpus_per_client": 1.0, "num_cpus": os.cpu_count() or 1}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    return watch([sys.executable, "-m", "stamen.simulations.bench.flower_app", str(spec_path)], out, timeout=timeout)


def run_all(jobs: list[Callable[[], Run]], parallel: int) -> list[Run]:
    """Run jobs ``parallel`` at a time (for scenarios that measure accuracy, not time)."""
    if parallel <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            ABORT.set()  # Ctrl-C, or one run failed: stop the others rather than wait for them
            for f in futures:
                f.cancel()
            raise
