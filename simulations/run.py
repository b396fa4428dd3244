"""Running one simulation: validate, preflight, start the engine child, follow it, read its summary.

This is the single implementation behind ``stamen simulate`` and :func:`stamen.simulate`.
Bad input raises :class:`~stamen.common.errors.ConfigError` (or its
:class:`~stamen.common.errors.DataError`) before Flower's engine starts and before anything
is written. The simulation runs in one child process in its own process group, under a
timeout: that child first runs the :func:`preflight` (data, partitioning, scenario, server
data) and only then creates the run directory and starts Ray, so the preflight's imports
and loaded data serve the run itself (one Python start, not two) and a refused run leaves
nothing behind; whatever happens, the group (Ray's processes included) is stopped before
:func:`simulate` returns. A SIGTERM or SIGINT (or the timeout) first asks the run to stop
after its current round, with a checkpoint; ``resume`` continues it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError, DataError, StamenError
from stamen.common.state import atomic_write_json

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
    """The engine exited without a summary (a crash, a timeout, a kill); the log says why.

    ``output`` is what the engine printed before it had a log of its own (it died starting).
    """

    def __init__(self, message: str, out_dir: Path, exit_code: int, output: str = "") -> None:
        super().__init__(message)
        self.out_dir = out_dir
        self.exit_code = exit_code
        self.output = output

    @property
    def log_path(self) -> Path:
        return self.out_dir / "simulation.log"

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` of the engine's log, or what it printed if it never had one."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else self.output
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Plan:
    """A validated simulation: where it writes, its config, and how many sites it has."""

    out_dir: Path
    cfg: StamenConfig
    clients: int
    resumed: bool
    resumed_after_round: int = 0
    resumed_version: int = 0
    #: Every simulated site's own privacy policy (node-config keys of a ``--site-policy`` file);
    #: None: each site takes the run's values (announced as ``site_policy = "run-config"``).
    site_policy: dict[str, Any] | None = None

    @property
    def site_policy_source(self) -> str:
        """How the run's sites got their privacy policy: ``site-policy-file`` or ``run-config``."""
        return "run-config" if self.site_policy is None else "site-policy-file"


def preflight(cfg: StamenConfig, clients: int) -> None:
    """Load and partition the data and try the model on it now, so bad input fails before any engine starts."""
    from stamen.common.models import preflight_model
    from stamen.server.evaluate import load_server_data

    if clients < 1:
        raise ConfigError(f"clients must be >= 1, got {clients}")
    server = load_server_data(cfg)
    if cfg["site-data"] or cfg["data-loader"]:
        x, y = _check_own_site_data(cfg, clients, server.input_shape, server.num_classes)
    else:
        x, y = _check_partitions(cfg, clients)
    x, y = _trial_batch(x, y, int(cfg["batch-size"]))
    preflight_model(
        str(cfg["model"]),
        server.input_shape,
        server.num_classes,
        x,
        y,
        dp=bool(cfg["dp"]),
        fix=bool(cfg["dp-fix-model"]),
    )
    check_metrics_address(cfg)


def _trial_batch(x: Any, y: Any, size: int) -> tuple[Any, Any]:
    """The first ``size`` records of a site as tensors: the batch the model is tried on."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(x[:size], dtype=np.float32)), torch.from_numpy(np.array(y[:size], dtype=np.int64))


def _check_partitions(cfg: StamenConfig, clients: int) -> tuple[Any, Any]:
    """Partition the run's dataset as the sites will; site 0's records (the model's trial batch)."""
    from stamen.common.datasets import load_dataset
    from stamen.common.partition import partition_indices
    from stamen.common.runrecord import derive_seeds
    from stamen.common.scenario import scenario_of

    data = load_dataset(str(cfg["dataset"]))
    scenario = scenario_of(cfg)
    if scenario is not None:
        scenario.check_against(data.num_classes, data.input_shape, clients)
    parts = partition_indices(
        data.y_train,
        clients,
        str(cfg["partition"]),
        alpha=float(cfg["alpha"]),
        shards_per_partition=int(cfg["shards-per-site"]),
        min_partition_size=int(cfg["min-partition-size"]),
        seed=derive_seeds(int(cfg["seed"]))["partition"],
    )
    return data.x_train[parts[0]], data.y_train[parts[0]]


def _check_own_site_data(
    cfg: StamenConfig, clients: int, input_shape: tuple[int, ...], num_classes: int
) -> tuple[Any, Any]:
    """Load every site's own data (``site-data`` / ``data-loader``) and check it fits the model.

    Returns site 0's records (the model's trial batch).
    """
    import math

    from stamen.common.errors import DataError
    from stamen.common.sitedata import own_site_dataset, site_count

    count = site_count(cfg)
    if count is not None and clients != count:
        raise ConfigError(
            f"--clients {clients}, but site-data {cfg['site-data']} has {count} sites (one per file or "
            "sub-directory); leave out --clients, the sites follow the entries"
        )
    sites = [own_site_dataset(cfg, site, clients) for site in range(clients)]
    for site, data in enumerate(sites):
        if math.prod(data.input_shape) != math.prod(input_shape):
            raise DataError(
                f"site {site} ({data.name}): examples have shape {data.input_shape}, the model takes {input_shape}"
            )
        if data.num_classes > num_classes:
            raise DataError(
                f"site {site} ({data.name}): label {data.num_classes - 1} is out of range: the model has "
                f"{num_classes} classes (set num-classes)"
            )
    return sites[0].x_train, sites[0].y_train


#: The engine child's exit code when its preflight refused the run (the CLI's, for bad input).
PREFLIGHT_REFUSED = 2
#: The key of the one JSON line a refusing engine prints: ``{"preflight-error": ..., "kind": ...}``.
PREFLIGHT_ERROR = "preflight-error"
#: What the engine child prints, last on its pipe, once it has opened the run directory.
ENGINE_STARTED = "stamen-engine: run directory open"


def preflight_refusal(exc: StamenError) -> str:
    """The line the engine child prints when its preflight refuses the run."""
    return json.dumps({PREFLIGHT_ERROR: str(exc), "kind": type(exc).__name__})


def _refusal_in(output: str) -> ConfigError | None:
    """The preflight's error from the engine's early output, as the CLI raises it."""
    for line in reversed(output.splitlines()):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and PREFLIGHT_ERROR in record:
                kind = DataError if record.get("kind") == "DataError" else ConfigError
                return kind(str(record[PREFLIGHT_ERROR]))
    return None


def open_run_dir(spec: dict[str, Any]) -> None:
    """The engine child's first writes, made once its preflight passed: the run directory,
    ``simulation.json``, a new run's ``site-policy.json``, and ``simulation.log`` as its own
    stdout and stderr (appended to on a resume). It prints :data:`ENGINE_STARTED` on its pipe
    first, so the CLI knows the run started (a resumed run's log exists before it does).
    """
    out_dir = Path(spec["run_config"]["out-dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "simulation.json").write_text(json.dumps(spec, indent=2))
    if not spec["resumed"]:
        atomic_write_json(out_dir / SITE_POLICY_FILE, spec["site_policy_record"])
    if spec["run_config"].get("site-data"):  # the sites are named by number: say which file each one is
        from stamen.common.sitedata import site_names

        directory = str(spec["run_config"]["site-data"])
        record = {"site-data": directory, "sites": site_names(directory)}
        atomic_write_json(out_dir / SITE_DATA_FILE, record, mode=0o644)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if spec["resumed"] else os.O_TRUNC)
    fd = os.open(out_dir / "simulation.log", flags, 0o644)
    print(ENGINE_STARTED)  # a resumed run's log exists already: this line, not the file, says it started
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


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


#: The run directory's record of its sites' privacy policy, written at start, read on resume.
SITE_POLICY_FILE = "site-policy.json"
#: Which ``site-data`` entry each simulated site-id trains on (a run with ``site-data`` only).
SITE_DATA_FILE = "site-data.json"


def stored_site_policy(run_dir: Path) -> dict[str, Any] | None:
    """The site policy keys a run started with (None: the run's values), from ``site-policy.json``;
    a run directory from before that file reads its ``simulation.json``."""
    path = run_dir / SITE_POLICY_FILE
    if path.exists():
        return json.loads(path.read_text())["keys"]
    return json.loads((run_dir / "simulation.json").read_text()).get("site_policy") or None


def resumed_site_policy(run_dir: Path, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The resumed run's site policy: the one it started with; a different ``--site-policy`` is refused."""
    stored = stored_site_policy(run_dir)
    if given is not None and dict(given) != stored:
        started = "no --site-policy (the run's values)" if stored is None else f"site policy {stored}"
        raise ConfigError(
            f"cannot resume {run_dir} with --site-policy {dict(given)}: the run started with {started}, "
            "and its sites' privacy policy cannot change mid-run; leave out --site-policy to keep it"
        )
    return stored


def resumed_config(
    run_dir: Path, overrides: Mapping[str, Any], clients: int | None, site_policy: Mapping[str, Any] | None = None
) -> Plan:
    """The plan a resumed simulation continues with.

    The config is the newest valid checkpoint's, with ``overrides`` on top (only keys that
    do not change what the state means); the site count and site policy are the original run's.
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
    policy = resumed_site_policy(run_dir, site_policy)
    return Plan(run_dir, cfg, int(original["clients"]), True, checkpoint.round, checkpoint.version, policy)


def plan_simulation(
    raw: Mapping[str, Any],
    *,
    clients: int | None = None,
    out: Path | str | None = None,
    resume: Path | str | None = None,
    site_policy: Mapping[str, Any] | None = None,
) -> Plan:
    """Validate the config and the run directory; write nothing. The data, partitioning and
    scenario are checked by :func:`preflight`, in the engine child, before it writes anything.

    ``site_policy``: the keys of a ``--site-policy`` file (a resumed run keeps its own).
    """
    if resume is not None:
        resume = Path(resume)
        if out is not None and Path(out).expanduser().resolve() != resume.expanduser().resolve():
            raise ConfigError("resume continues the run in its own directory; leave out the output directory")
        return resumed_config(resume, raw, clients, site_policy)
    out_dir = Path(out or default_out_dir()).expanduser().resolve()
    full = with_scenario_defaults(dict(raw))
    full["out-dir"] = str(out_dir)
    if full.get("site-data"):  # the engine's sites may run elsewhere than this working directory
        full["site-data"] = str(Path(str(full["site-data"])).expanduser().resolve())
    cfg = StamenConfig.from_mapping(full)
    from stamen.common.sitedata import site_count

    clients = (site_count(cfg) or 10) if clients is None else clients
    if clients < 1:
        raise ConfigError(f"clients must be >= 1, got {clients}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"run directory {out_dir} is not empty; choose another output directory (or resume it)")
    return Plan(out_dir, cfg, clients, resumed=False, site_policy=None if site_policy is None else dict(site_policy))


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


def _read_all(stream: Any, into: list[bytes]) -> None:
    into.append(stream.read())


def run_engine(
    spec: dict[str, Any],
    out_dir: Path,
    timeout: float,
    *,
    on_progress: ProgressFn | None = None,
    notify: Callable[[str], None] = log.warning,
    stop_grace: float = 120.0,
) -> int:
    """Run the engine child under ``timeout``; follow progress.jsonl; stop its group.

    The spec goes to the child on its stdin. Until its preflight passed the child writes
    nothing and prints to a pipe; a refusal comes back here as the preflight's own
    :class:`~stamen.common.errors.ConfigError`, a crash as :class:`SimulationFailed`.
    Once the child has taken over its log (:func:`open_run_dir`) the pipe closes and the
    run is followed. A SIGTERM or SIGINT is passed on (the timeout as a SIGTERM) to the
    engine process alone, so the ServerApp finishes its round and checkpoints while Ray's
    clients keep serving it; after ``stop_grace`` seconds, or at a second signal, the whole
    process group is stopped. Returns the child's exit code, 124 on timeout, or 128 + the
    signal when the child had to be killed.
    """
    import threading

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    progress_file = out_dir / "progress.jsonl"
    with _Signals() as signals:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stamen.simulations.engine", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        timed_out = False
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(spec).encode())
            proc.stdin.close()
            early: list[bytes] = []
            reader = threading.Thread(target=_read_all, args=(proc.stdout, early), daemon=True)
            reader.start()
            deadline = time.monotonic() + timeout
            while reader.is_alive() and not signals.count and time.monotonic() < deadline:
                reader.join(0.1)
            if reader.is_alive():  # stopped while it was still starting: nothing was written yet
                notify(f"{signals.last or f'--timeout {timeout:.0f}s'}: stopped the simulation while it started")
                return 128 + int(signal.Signals[signals.last]) if signals.last else 124
            output = b"".join(early).decode(errors="replace")
            if ENGINE_STARTED not in output:  # it exited before it opened the run directory
                rc = proc.wait()
                refusal = _refusal_in(output)
                if refusal is not None and rc == PREFLIGHT_REFUSED:
                    raise refusal
                raise SimulationFailed(f"the simulation engine failed to start (exit {rc})", out_dir, rc, output)
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


#: The engine's settings (:func:`engine_spec`), as :func:`execute` defaults them.
ENGINE_DEFAULTS: dict[str, float | str | None] = {
    "timeout": 3600.0,
    "stop_grace": 120.0,
    "cpus_per_client": 1.0,
    "gpus_per_client": 0.0,
    "ray_address": None,
}


def ray_address_of(address: str | None) -> str | None:
    """The Ray cluster a run joins: ``address``, else ``RAY_ADDRESS`` (as Ray users expect), else
    None (a Ray of its own). ``host:port`` must answer now, so a wrong address fails in one line."""
    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    if address is None or address in ("auto", "local") or address.startswith("ray://"):
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not host:port, ray://host:port, auto or local")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from None
    return address


def engine_spec(
    plan: Plan, site_policy: Mapping[str, Any] | None = None, **settings: float | str | None
) -> dict[str, Any]:
    """What the engine child runs: the run, its resources, and the timeout and grace it enforces itself."""
    unknown = sorted(set(settings) - set(ENGINE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown engine settings {unknown}; known: {sorted(ENGINE_DEFAULTS)}")
    return {
        "run_config": plan.cfg.as_dict(),
        "clients": plan.clients,
        "num_cpus": os.cpu_count() or 1,
        "site_policy": dict(site_policy or {}),
        "site_policy_record": {"source": plan.site_policy_source, "keys": plan.site_policy},
        "resumed": plan.resumed,
        "parent_pid": os.getpid(),
        **ENGINE_DEFAULTS,
        **settings,
    }


def execute(
    plan: Plan,
    *,
    timeout: float = 3600.0,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    stop_grace: float = 120.0,
    on_progress: ProgressFn | None = None,
    notify: Callable[[str], None] = log.warning,
    ray_address: str | None = None,
) -> SimulationResult:
    """Run a planned simulation to its end; write its plots; return its result.

    ``ray_address`` (or ``RAY_ADDRESS``): run on that Ray cluster (:func:`ray_address_of`); the
    run directory and ``state-dir`` must then be storage every node of it shares.

    ``plan.site_policy`` (node-config keys of :mod:`stamen.client.site_policy`) is every
    simulated site's own privacy policy, recorded in ``site-policy.json`` at start; without
    it a site's policy is the run config's, and ``summary.json`` / ``config.json`` say so.

    Raises :class:`SimulationFailed` when the engine ends without a summary.
    """
    if not cpus_per_client > 0 or not gpus_per_client >= 0:
        raise ConfigError(
            f"each site needs CPUs > 0 and GPUs >= 0 (a fraction shares one), "
            f"got --cpus-per-client {cpus_per_client} --gpus-per-client {gpus_per_client}"
        )
    ray_address = ray_address_of(ray_address)
    spec = engine_spec(
        plan, plan.site_policy, timeout=timeout, stop_grace=stop_grace, cpus_per_client=cpus_per_client,
        gpus_per_client=gpus_per_client, ray_address=ray_address,
    )  # fmt: skip
    started = time.monotonic()
    rc = run_engine(
        spec, plan.out_dir, timeout, on_progress=on_progress, notify=notify, stop_grace=stop_grace
    )  # fmt: skip
    wall = time.monotonic() - started
    summary_path = plan.out_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        raise SimulationFailed(f"simulation failed (exit {rc})", plan.out_dir, rc)
    from stamen.simulations.plots import plot_run

    summary = announce_site_policy(plan.out_dir, json.loads(summary_path.read_text()), plan.site_policy_source)
    plot_run(summary, plan.out_dir)
    return SimulationResult.from_summary(plan.out_dir, summary, wall)


def announce_site_policy(out_dir: Path, summary: dict[str, Any], source: str) -> dict[str, Any]:
    """Record in ``summary.json`` (``privacy.site_policy``, when the run has DP) and ``config.json``
    (``site_policy``) how the sites got their privacy policy; the summary as rewritten.

    ``run-config`` is the simulation's relaxation (a real node never takes the run config as
    its policy), so a run that made it says so in its outputs.
    """
    if "privacy" in summary:
        summary["privacy"]["site_policy"] = source
        atomic_write_json(out_dir / "summary.json", summary, mode=0o644)
    record_path = out_dir / "config.json"
    if record_path.exists():
        atomic_write_json(record_path, {**json.loads(record_path.read_text()), "site_policy": source}, mode=0o644)
    return summary


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
    ray_address: str | None = None,
    **keys: Any,
) -> SimulationResult:
    """Run a federation of ``clients`` simulated sites on Flower's simulation engine.

    Run-config keys come as a mapping (``{"num-server-rounds": 5}``) and/or as keyword
    arguments with underscores (``num_server_rounds=5``); the table is
    :data:`stamen.common.config.KEYS`. ``clients`` defaults to 10 (a resumed run keeps its
    own). ``site_policy`` is a site policy file every simulated site keeps
    (:func:`stamen.client.site_policy.load_policy_file`). ``ray_address`` (or ``RAY_ADDRESS``)
    runs the sites on that Ray cluster instead of a Ray started for the run. Bad input raises
    :class:`~stamen.common.errors.ConfigError` before anything is written; a run that fails
    raises :class:`SimulationFailed`.
    """
    policy = None
    if site_policy is not None:  # imported only then: it loads opacus (seconds) for the ledger's accountant
        from stamen.client.site_policy import load_policy_file

        policy = load_policy_file(Path(site_policy))
    raw = dict(config or {})
    raw.update({name.replace("_", "-"): value for name, value in keys.items()})
    plan = plan_simulation(raw, clients=clients, out=out, resume=resume, site_policy=policy)
    return execute(
        plan, timeout=timeout, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
        stop_grace=stop_grace, on_progress=on_progress, ray_address=ray_address,
    )  # fmt: skip


def run_simulate_command(
    out: Path, *args: str, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``stamen simulate ARGS --out OUT`` in a child process, exactly as a user runs it (benchmarks, tests)."""
    command = [sys.executable, "-m", "stamen", "simulate", *args, "--out", str(out), "--no-progress"]
    return subprocess.run(
        [*command, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        env=None if env is None else dict(env),
    )
