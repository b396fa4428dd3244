"""Running one simulation: validate, preflight, start the engine child, follow it, read its summary.

This is the single implementation behind ``stamen simulate`` and :func:`stamen.simulate`.
Bad input raises :class:`~stamen.common.errors.ConfigError` (or its
:class:`~stamen.common.errors.DataError`) before any engine starts and before anything is
written. The simulation itself runs in a child process in its own process group, under a
timeout; whatever happens, the group (Ray's processes included) is stopped before
:func:`simulate` returns. A SIGTERM or SIGINT (or the timeout) first asks the run to stop
after its current round, with a checkpoint; ``resume`` continues it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError, StamenError

log = logging.getLogger("stamen.simulate")

#: Called with each row of the run's ``progress.jsonl`` as it appears.
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SimulationResult:
    """What a finished simulation produced; ``summary`` is its whole ``summary.json``."""

    out_dir: Path
    status: str
    rounds_completed: int
    accuracy: float | None
    loss: float | None
    source: str
    version: int
    wall_seconds: float
    summary: dict[str, Any]

    @classmethod
    def from_summary(cls, out_dir: Path, summary: dict[str, Any], wall_seconds: float) -> SimulationResult:
        final = summary["final"]
        return cls(
            out_dir=out_dir,
            status=str(summary["status"]),
            rounds_completed=int(summary["rounds_completed"]),
            accuracy=_figure(final.get("accuracy")),
            loss=_figure(final.get("loss")),
            source=str(final.get("source", "")),
            version=int(summary.get("version", 0)),
            wall_seconds=wall_seconds,
            summary=summary,
        )


def _figure(value: Any) -> float | None:
    """A summary figure as a float, or None when the run has none (missing or not finite)."""
    if value is None:
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


class SimulationFailed(StamenError):
    """The engine exited without a summary (a crash, a timeout, a kill); the log says why."""

    def __init__(self, message: str, out_dir: Path, exit_code: int) -> None:
        super().__init__(message)
        self.out_dir = out_dir
        self.exit_code = exit_code

    @property
    def log_path(self) -> Path:
        return self.out_dir / "simulation.log"


@dataclass(frozen=True)
class Plan:
    """A validated simulation: where it writes, its config, and how many sites it has."""

    out_dir: Path
    cfg: StamenConfig
    clients: int
    resumed: bool
    resumed_after_round: int = 0
    resumed_version: int = 0


def preflight(cfg: StamenConfig, clients: int) -> None:
    """Load and partition the data now, so bad input fails before any engine starts."""
    from stamen.common.datasets import load_dataset
    from stamen.common.partition import partition_indices
    from stamen.common.runrecord import derive_seeds
    from stamen.common.scenario import scenario_of
    from stamen.server.evaluate import load_server_data

    if clients < 1:
        raise ConfigError(f"clients must be >= 1, got {clients}")
    data = load_dataset(str(cfg["dataset"]))
    scenario = scenario_of(cfg)
    if scenario is not None:
        scenario.check_against(data.num_classes, data.input_shape, clients)
    partition_indices(
        data.y_train,
        clients,
        str(cfg["partition"]),
        alpha=float(cfg["alpha"]),
        shards_per_partition=int(cfg["shards-per-site"]),
        min_partition_size=int(cfg["min-partition-size"]),
        seed=derive_seeds(int(cfg["seed"]))["partition"],
    )
    load_server_data(cfg)
    check_metrics_address(cfg)


def _preflight_child(mapping: dict[str, Any], clients: int) -> None:
    preflight(StamenConfig.from_mapping(mapping), clients)


def preflight_apart(cfg: StamenConfig, clients: int) -> None:
    """:func:`preflight` in a short-lived child process, its errors raised here.

    Loading and partitioning the data imports torch, pandas and flwr-datasets (about
    0.4 GiB resident); in a child, this process, which only waits on the run, stays small.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_preflight_child, cfg.as_dict(), clients).result()


def check_metrics_address(cfg: StamenConfig) -> None:
    """A metrics port that is taken fails here, in one line, rather than inside the engine."""
    port = int(cfg["metrics-port"])
    if not port:
        return
    host = str(cfg["metrics-host"])
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


def with_scenario_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` on top of its scenario's ``run-config``, the scenario given as a bundled name or an absolute path."""
    from stamen.common.scenario import BUNDLED_DIR, load_scenario, resolve_path

    spec = str(raw.get("scenario", "")).strip()
    if not spec:
        return raw
    scenario = load_scenario(spec)
    path = resolve_path(spec)
    return {**scenario.run_config, **raw, "scenario": path.stem if path.parent == BUNDLED_DIR else str(path)}


def default_out_dir() -> Path:
    """``runs/<UTC timestamp>``."""
    return Path("runs", datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))


def resumed_config(run_dir: Path, overrides: Mapping[str, Any], clients: int | None) -> Plan:
    """The plan a resumed simulation continues with.

    The config is the newest valid checkpoint's, with ``overrides`` on top (only keys that
    do not change what the state means); the site count is the original run's.
    """
    from stamen.server.checkpoint import CheckpointStore, config_changes

    run_dir = run_dir.expanduser().resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"cannot resume {run_dir}: it does not exist")
    spec_path = run_dir / "simulation.json"
    if not spec_path.exists():
        raise ConfigError(f"{run_dir} is not a stamen simulate run directory (no simulation.json)")
    original = json.loads(spec_path.read_text())
    if clients is not None and clients != original["clients"]:
        raise ConfigError(f"the run has {original['clients']} sites; resuming cannot change clients")
    checkpoint = CheckpointStore(run_dir).load_latest()
    saved = checkpoint.state["config"]
    cfg = StamenConfig.from_mapping({**saved, **overrides, "out-dir": str(run_dir), "resume-from": str(run_dir)})
    config_changes(saved, cfg.as_dict())
    rounds = int(cfg["num-server-rounds"])
    if rounds and rounds <= checkpoint.round:
        raise ConfigError(
            f"the run's checkpoint is at round {checkpoint.round} and num-server-rounds is {rounds}: "
            f"ask for more rounds than {checkpoint.round} (the total), or 0 to run until stopped"
        )
    return Plan(run_dir, cfg, int(original["clients"]), True, checkpoint.round, checkpoint.version)


def plan_simulation(
    raw: Mapping[str, Any],
    *,
    clients: int | None = None,
    out: Path | str | None = None,
    resume: Path | str | None = None,
) -> Plan:
    """Validate everything a run needs (config, data, partitioning, run directory); write nothing."""
    if resume is not None:
        resume = Path(resume)
        if out is not None and Path(out).expanduser().resolve() != resume.expanduser().resolve():
            raise ConfigError("resume continues the run in its own directory; leave out the output directory")
        return resumed_config(resume, raw, clients)
    out_dir = Path(out or default_out_dir()).expanduser().resolve()
    full = with_scenario_defaults(dict(raw))
    full["out-dir"] = str(out_dir)
    cfg = StamenConfig.from_mapping(full)
    clients = 10 if clients is None else clients
    if clients < 1:
        raise ConfigError(f"clients must be >= 1, got {clients}")
    preflight_apart(cfg, clients)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"run directory {out_dir} is not empty; choose another output directory (or resume it)")
    return Plan(out_dir, cfg, clients, resumed=False)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


class _Signals:
    """SIGTERM/SIGINT received while a simulation runs (counted, acted on by the loop).

    Handlers can only be installed from the main thread; elsewhere (a caller running
    :func:`simulate` in a worker thread) signals keep their handlers and the timeout still holds.
    """

    def __init__(self) -> None:
        self.count = 0
        self.last = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.count += 1
        self.last = signal.Signals(signum).name

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_engine(
    spec: dict[str, Any],
    out_dir: Path,
    timeout: float,
    *,
    on_progress: ProgressFn | None = None,
    notify: Callable[[str], None] = log.warning,
    stop_grace: float = 120.0,
    append_log: bool = False,
) -> int:
    """Run the engine child under ``timeout``; follow progress.jsonl; stop its group.

    A SIGTERM or SIGINT is passed on (the timeout as a SIGTERM) to the engine process
    alone, so the ServerApp finishes its round and checkpoints while Ray's clients keep
    serving it; after ``stop_grace`` seconds, or at a second signal, the whole process group
    is stopped. Returns the child's exit code, 124 on timeout, or 128 + the signal when the
    child had to be killed.
    """
    spec_path = out_dir / "simulation.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    progress_file = out_dir / "progress.jsonl"
    with open(out_dir / "simulation.log", "ab" if append_log else "wb") as log_fh, _Signals() as signals:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stamen.simulations.engine", str(spec_path)],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        timed_out = False
        try:
            deadline = time.monotonic() + timeout
            kill_at: float | None = None
            seen = 0
            while proc.poll() is None and signals.count < 2 and (kill_at is None or time.monotonic() < kill_at):
                if kill_at is None and (signals.count or time.monotonic() >= deadline):
                    timed_out = not signals.count
                    why = signals.last or f"--timeout {timeout:.0f}s"
                    notify(f"{why}: stopping after the current round (again to stop now)")
                    os.kill(proc.pid, signal.Signals[signals.last] if signals.last else signal.SIGTERM)
                    kill_at = time.monotonic() + stop_grace
                time.sleep(0.25)
                if on_progress is not None and progress_file.exists():
                    lines = progress_file.read_text().splitlines()
                    for line in lines[seen:]:
                        on_progress(json.loads(line))
                    seen = len(lines)
            if proc.poll() is None:
                notify("the simulation did not stop in time; stopped it without a checkpoint")
                return 124 if timed_out else 128 + int(signal.Signals[signals.last or "SIGTERM"])
            if timed_out:
                notify(f"simulation exceeded --timeout {timeout:.0f}s; stopped")
                return 124
            return int(proc.returncode)
        finally:
            _stop_group(proc)


def execute(
    plan: Plan,
    *,
    timeout: float = 3600.0,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    stop_grace: float = 120.0,
    on_progress: ProgressFn | None = None,
    notify: Callable[[str], None] = log.warning,
    site_policy: Mapping[str, Any] | None = None,
) -> SimulationResult:
    """Run a planned simulation to its end; write its plots; return its result.

    ``site_policy`` (node-config keys of :mod:`stamen.client.site_policy`) is every simulated
    site's own privacy policy; without it a site's policy is the run config's.

    Raises :class:`SimulationFailed` when the engine ends without a summary.
    """
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "run_config": plan.cfg.as_dict(),
        "clients": plan.clients,
        "cpus_per_client": cpus_per_client,
        "gpus_per_client": gpus_per_client,
        "num_cpus": os.cpu_count() or 1,
        "site_policy": dict(site_policy or {}),
    }
    started = time.monotonic()
    rc = run_engine(
        spec, plan.out_dir, timeout, on_progress=on_progress, notify=notify, stop_grace=stop_grace,
        append_log=plan.resumed,
    )  # fmt: skip
    wall = time.monotonic() - started
    summary_path = plan.out_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        raise SimulationFailed(f"simulation failed (exit {rc})", plan.out_dir, rc)
    from stamen.simulations.plots import plot_run

    summary = json.loads(summary_path.read_text())
    plot_run(summary, plan.out_dir)
    return SimulationResult.from_summary(plan.out_dir, summary, wall)


def simulate(
    config: Mapping[str, Any] | None = None,
    /,
    *,
    clients: int | None = None,
    out: Path | str | None = None,
    resume: Path | str | None = None,
    timeout: float = 3600.0,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    stop_grace: float = 120.0,
    on_progress: ProgressFn | None = None,
    site_policy: Path | str | None = None,
    **keys: Any,
) -> SimulationResult:
    """Run a federation of ``clients`` simulated sites on Flower's simulation engine.

    Run-config keys come as a mapping (``{"num-server-rounds": 5}``) and/or as keyword
    arguments with underscores (``num_server_rounds=5``); the table is
    :data:`stamen.common.config.KEYS`. ``clients`` defaults to 10 (a resumed run keeps its
    own). ``site_policy`` is a site policy file every simulated site keeps
    (:func:`stamen.client.site_policy.load_policy_file`). Bad input raises
    :class:`~stamen.common.errors.ConfigError` before anything is written; a run that fails
    raises :class:`SimulationFailed`.
    """
    from stamen.client.site_policy import load_policy_file

    policy = load_policy_file(Path(site_policy)) if site_policy is not None else None
    raw = dict(config or {})
    raw.update({name.replace("_", "-"): value for name, value in keys.items()})
    plan = plan_simulation(raw, clients=clients, out=out, resume=resume)
    return execute(
        plan, timeout=timeout, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
        stop_grace=stop_grace, on_progress=on_progress, site_policy=policy,
    )  # fmt: skip


def run_simulate_command(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``stamen simulate ARGS --out OUT`` in a child process, exactly as a user runs it (benchmarks, tests)."""
    command = [sys.executable, "-m", "stamen", "simulate", *args, "--out", str(out), "--no-progress"]
    return subprocess.run(
        [*command, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
