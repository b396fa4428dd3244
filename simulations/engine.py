"""Child-process entry point of ``stamen simulate``: one Flower simulation, then exit.

The CLI starts this module in its own process group (so the Ray processes it spawns
can be stopped as a group) with the run's spec as JSON on its stdin. It checks the run's
data first (:func:`~stamen.simulations.run.preflight`), in this process so the run reuses
what that loaded, and only then writes the run directory. The simulation is Flower's
engine on Ray, the same one that scales out to a Ray cluster. Its apps are stamen's with
the fault-injection layer (:mod:`simulations.faults.layer`), which alone applies the
simulation-only run-config keys.

Stopping: the ServerApp runs in a thread of Flower's, and only this main thread gets
signals, so the stop handlers (:mod:`server.stop`) are installed here. Flower's Ray backend
calls ``ray.init`` only if Ray is not running yet, and ``ray.init`` replaces the SIGTERM
handler with one that exits at once; so Ray is started here first, with the arguments
Flower would use, and the handlers are installed after it. A SIGTERM then lets the
ServerApp finish its round and write a checkpoint while the clients (Ray actors) keep
running; the CLI sends it to this process only, not to its process group.

Supervision of its own (:class:`Watchdog`): the engine also stops when the CLI that started
it is gone (``kill -9`` of ``stamen simulate``) and at the run's ``--timeout``, the CLI's
timer or not: it asks for a stop after the round, then after the stop grace ends every
process it started (Ray's included) and exits. A thread that polls the parent pid rather
than Linux's ``PR_SET_PDEATHSIG``: that signal fires when the *thread* that forked exits
(:func:`~stamen.simulations.run.simulate` may run in a worker thread), is Linux-only, and
would kill the engine at once, with no checkpoint and Ray's processes left to themselves.

On a Ray cluster (``ray_address``, ``stamen simulate --ray-address``) the engine is one more
driver: ``ray.init(address=...)`` starts no Ray process here, the sites' actors run on the
cluster's nodes (and end with this driver, as a job's actors do), and stopping the engine's
own descendants ends nothing of the cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from stamen.common.datacache import ENV as DATA_CACHE

log = logging.getLogger("stamen")

ENDED = ("completed", "stopped")
TIMED_OUT = 124  # the CLI's exit code for a run stopped at its timeout
POLL = 0.5


def started_processes() -> list[psutil.Process]:
    """Every live process this one started: its descendants and, when it leads its own process
    group (the CLI starts it so), the rest of that group.

    The group catches what the descendants miss: a Ray worker that raylet forks while the
    others are being ended, orphaned to init when raylet goes, is no one's child any more but
    still in this group. Nothing outside it is touched (a ``ray start`` cluster has its own).
    """
    me = os.getpid()
    found = {p.pid: p for p in psutil.Process(me).children(recursive=True)}
    if os.getpgid(0) == me:
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if proc.pid != me and proc.pid not in found and os.getpgid(proc.pid) == me:
                    found[proc.pid] = proc
    alive = []
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def end_descendants(grace: float = 5.0, rounds: int = 5) -> None:
    """Terminate, then kill, every process this one started (the Ray daemons and workers).

    Listed again after each pass, up to ``rounds`` passes: Ray may start a worker while the
    others are ending, and one pass would leave it running.
    """
    for _ in range(rounds):
        procs = started_processes()
        if not procs:
            return
        # a process may exit between the listing and its signal: it has nothing left to end
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace)
    log.warning("processes still running after %d passes: %s", rounds, [p.pid for p in started_processes()])


class Watchdog(threading.Thread):
    """Stops the run when the parent process is gone or ``timeout`` seconds pass.

    First a stop request (the round ends with a checkpoint), then, ``grace`` seconds later,
    every descendant is ended and the process exits.
    """

    def __init__(self, parent_pid: int, timeout: float | None, grace: float) -> None:
        super().__init__(name="stamen-engine-watchdog", daemon=True)
        self.parent_pid, self.timeout, self.grace = parent_pid, timeout, grace
        self.timed_out = False
        self.started_at = time.monotonic()

    def run(self) -> None:
        from stamen.server.stop import request_stop

        kill_at: float | None = None
        while True:
            time.sleep(POLL)
            now = time.monotonic()
            if kill_at is not None:
                if now >= kill_at:
                    log.error("the run did not stop within %.0fs; ending it without a checkpoint", self.grace)
                    end_descendants()
                    shutil.rmtree(os.environ.get(DATA_CACHE, ""), ignore_errors=True)  # os._exit skips main's cleanup
                    os._exit(TIMED_OUT if self.timed_out else 1)
                continue
            why = ""
            if os.getppid() != self.parent_pid:  # reparented: the CLI is gone
                why = f"the stamen simulate process {self.parent_pid} is gone"
            elif self.timeout is not None and now - self.started_at >= self.timeout:
                self.timed_out = True
                why = f"--timeout {self.timeout:.0f}s"
            if why:
                log.warning("%s: stopping after the current round", why)
                request_stop(why)
                kill_at = now + self.grace


def start_ray(init_args: dict[str, Any]) -> None:
    """``ray.init`` as Flower's Ray backend calls it (it then reuses this instance)."""
    import ray

    from stamen.common.flwr_internal import DEFAULT_SIMULATION_CONFIG

    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        logging_level=DEFAULT_SIMULATION_CONFIG.init_args_logging_level,
        log_to_driver=DEFAULT_SIMULATION_CONFIG.init_args_log_to_driver,
        **init_args,
    )


def ray_init_args(address: str | None, num_cpus: int) -> dict[str, Any]:
    """``ray.init``'s arguments: join the cluster at ``address``, else start a Ray of ``num_cpus`` here.

    Joining starts no Ray process on this machine and sizes nothing (the cluster's nodes
    say what they have); ``RAY_ADDRESS`` is dropped from this process's environment so
    that the address given is the only one Ray reads. Without one, the address is Ray's
    ``local`` (start a new Ray): a bare ``ray.init`` would join the newest ``ray start``
    cluster on the machine instead, found in ``/tmp/ray``.
    """
    os.environ.pop("RAY_ADDRESS", None)
    if address and address != "local":
        return {"address": address}
    return {"address": "local", "include_dashboard": False, "num_cpus": num_cpus}


def site_node_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Every simulated site's node-config keys: its policy, and the run's model as its allowed model.

    The simulating user is every site, so the model they chose is one the sites chose; said
    explicitly (``site-models``) so the sites apply the same rule as a deployed node.
    """
    from stamen.common.models import SITE_MODELS

    return {**(spec.get("site_policy") or {}), SITE_MODELS: str(spec["run_config"]["model"])}


def main(spec_source: str) -> int:
    """Run the simulation the spec describes; exit 0 if the run completed or stopped cleanly.

    The built-in dataset and the partitions are computed once, in the preflight, into a
    private directory every Ray worker of this process inherits in ``STAMEN_DATA_CACHE``
    (:mod:`common.datacache`); it is removed when the run ends.
    """
    with tempfile.TemporaryDirectory(prefix="stamen-data-") as cache:
        os.environ[DATA_CACHE] = cache
        return _run(spec_source)


def _run(spec_source: str) -> int:
    """The run itself.

    ``spec_source`` is ``-`` (the CLI's way: the spec on stdin, and this process writes
    nothing until its preflight passed, then opens the run directory itself) or the path of
    a spec file in an existing run directory (the log is then whatever stdout is).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from_cli = spec_source == "-"
    spec = json.loads(sys.stdin.read() if from_cli else Path(spec_source).read_text())
    from stamen.common.config import StamenConfig
    from stamen.common.errors import StamenError
    from stamen.simulations.run import PREFLIGHT_REFUSED, open_run_dir, preflight, preflight_refusal

    try:  # in this process, so the data it loads and the modules it imports serve the run
        preflight(StamenConfig.from_mapping(spec["run_config"]), int(spec["clients"]))
    except StamenError as exc:
        print(preflight_refusal(exc), flush=True)
        return PREFLIGHT_REFUSED
    if from_cli:
        if os.getppid() != int(spec["parent_pid"]):  # the CLI went away while this checked
            return 1
        open_run_dir(spec)
    from flwr.simulation import run_simulation

    from stamen.server.stop import install_stop_handlers
    from stamen.simulations.faults.layer import client_app, server_app
    from stamen.simulations.placement import PLACEMENT_DIR, add_to_summary

    address = spec.get("ray_address")
    init_args = ray_init_args(address, spec["num_cpus"])
    backend = {
        "client_resources": {"num_cpus": spec["cpus_per_client"], "num_gpus": spec["gpus_per_client"]},
        "init_args": init_args,
    }
    summary = Path(spec["run_config"]["out-dir"]) / "summary.json"
    placement = summary.parent / PLACEMENT_DIR
    before = summary.stat().st_mtime_ns if summary.exists() else None  # a resumed run's previous summary
    watchdog = Watchdog(int(spec.get("parent_pid", os.getppid())), spec.get("timeout"), spec.get("stop_grace", 120.0))
    watchdog.start()
    try:
        start_ray(init_args)
        install_stop_handlers()
        run_simulation(
            server_app=server_app(spec["run_config"]),
            client_app=client_app(site_node_config(spec), str(placement)),
            num_supernodes=spec["clients"],
            backend_config=backend,
        )
    finally:
        end_descendants()
    if not summary.exists() or summary.stat().st_mtime_ns == before:
        return 1
    if add_to_summary(summary, placement, address).get("status") not in ENDED:
        return 1
    return TIMED_OUT if watchdog.timed_out else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
