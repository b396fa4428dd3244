"""Child-process entry point of ``stamen simulate``: one Flower simulation, then exit.

The CLI starts this module in its own process group (so the Ray processes it spawns
can be stopped as a group) with the run's overrides as JSON. The simulation is Flower's
engine on Ray, the same one that scales out to a Ray cluster.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(overrides_path: str) -> int:
    """Run the simulation described by the JSON file; exit 0 only if the run completed."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    spec = json.loads(Path(overrides_path).read_text())
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    backend = {
        "client_resources": {"num_cpus": spec["cpus_per_client"], "num_gpus": spec["gpus_per_client"]},
        "init_args": {"include_dashboard": False, "num_cpus": spec["num_cpus"]},
    }
    run_simulation(
        server_app=make_server_app(spec["run_config"]),
        client_app=client_app,
        num_supernodes=spec["clients"],
        backend_config=backend,
    )
    summary = Path(spec["run_config"]["out-dir"]) / "summary.json"
    return 0 if summary.exists() and json.loads(summary.read_text()).get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
