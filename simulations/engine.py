"""Child-process entry point of ``stamen simulate``: one Flower simulation, then exit.

The CLI starts this module in its own process group (so the Ray processes it spawns
can be stopped as a group) with the run's overrides as JSON. The simulation is Flower's
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
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ENDED = ("completed", "stopped")


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


def main(overrides_path: str) -> int:
    """Run the simulation described by the JSON file; exit 0 if the run completed or stopped cleanly."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    spec = json.loads(Path(overrides_path).read_text())
    from flwr.simulation import run_simulation

    from stamen.server.stop import install_stop_handlers
    from stamen.simulations.faults.layer import client_app, server_app

    init_args = {"include_dashboard": False, "num_cpus": spec["num_cpus"]}
    backend = {
        "client_resources": {"num_cpus": spec["cpus_per_client"], "num_gpus": spec["gpus_per_client"]},
        "init_args": init_args,
    }
    summary = Path(spec["run_config"]["out-dir"]) / "summary.json"
    before = summary.stat().st_mtime_ns if summary.exists() else None  # a resumed run's previous summary
    start_ray(init_args)
    install_stop_handlers()
    run_simulation(
        server_app=server_app(spec["run_config"]),
        client_app=client_app(spec.get("site_policy")),
        num_supernodes=spec["clients"],
        backend_config=backend,
    )
    if not summary.exists() or summary.stat().st_mtime_ns == before:
        return 1
    return 0 if json.loads(summary.read_text()).get("status") in ENDED else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
