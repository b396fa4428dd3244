"""The stamen ServerApp: what the SuperLink (or the simulation engine) runs.

Everything it needs comes from run config, because in deployment this is a process the
SuperLink starts. ``stamen simulate`` builds the same app with its overrides through
:func:`make_server_app`, and with its fault-injection layer (``simulations/faults``); the
production ``app`` has none and refuses a run that sets a simulation-only key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from stamen.common.config import KEY_BY_NAME, StamenConfig
from stamen.common.errors import ConfigError
from stamen.server.loop import Federation
from stamen.server.optimizers.base import ServerOptimizer
from stamen.server.outputs import run_lock
from stamen.server.stop import install_stop_handlers

log = logging.getLogger("stamen.server")

FaultLayer = Callable[[StamenConfig, ServerOptimizer], ServerOptimizer]
"""A simulation's fault injection on the server: it wraps the run's server optimizer (``server-lr-spike``)."""


def resolve_out_dir(cfg: StamenConfig, run_id: int | None = None) -> Path:
    """``out-dir``, or the run being resumed (``resume-from``), or a fresh ``runs/<UTC timestamp>[-<run id>]``.

    A resumed run continues in its own directory: its checkpoints, versions and (in
    simulation) its sites' privacy ledgers are there.
    """
    if cfg["resume-from"]:
        resume = Path(str(cfg["resume-from"])).expanduser().resolve()
        if cfg["out-dir"] and Path(str(cfg["out-dir"])).expanduser().resolve() != resume:
            raise ConfigError(
                f"resume-from continues the run in its own directory ({resume}); leave out-dir empty or set it there"
            )
        return resume
    if cfg["out-dir"]:
        return Path(str(cfg["out-dir"])).expanduser().resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path("runs", f"{stamp}-{run_id}" if run_id else stamp).resolve()


def _configure_logging() -> None:
    """Log stamen's own lines only; the root logger stays as Flower set it (an INFO root
    would also log every HTTP request Flower makes to upload the logs)."""
    logger = logging.getLogger("stamen")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(os.environ.get("STAMEN_LOG_LEVEL", "INFO"))


def make_server_app(overrides: Mapping[str, Any] | None = None, *, fault_layer: FaultLayer | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's, with ``overrides`` on top.

    ``fault_layer`` is the simulation engine's (``simulations/faults/layer.py``), applied
    after a resumed run's state is restored into the optimizer it wraps; without one (the
    production app) a simulation-only key set in the run config is refused before anything runs.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _configure_logging()
        raw = {k: v for k, v in context.run_config.items() if k in KEY_BY_NAME}
        cfg = StamenConfig.from_mapping({**raw, **(overrides or {})})
        refused = cfg.simulation_only_set()
        if fault_layer is None and refused:
            names = ", ".join(f"'{k}'" for k in refused)
            raise ConfigError(
                f"run config {names} is simulation-only (fault injection): run it with stamen simulate, "
                "the production ServerApp refuses it"
            )
        out_dir = resolve_out_dir(cfg, getattr(grid.run, "run_id", None))
        log.info("stamen run directory: %s", out_dir)
        # A deployed ServerApp runs here in its process's main thread; in simulation this is a
        # no-op and the engine's main thread has the handlers (simulations/engine.py).
        restore = install_stop_handlers()
        try:
            with run_lock(out_dir):
                federation = Federation(grid, cfg, out_dir)
                if fault_layer is not None:
                    federation.optimizer = fault_layer(cfg, federation.optimizer)
                federation.run()
        finally:
            restore()

    return app


app = make_server_app()
