"""stamen: federated continual learning on Flower, with DP-SGD on every site.

The public Python API::

    import stamen

    result = stamen.simulate(dataset="digits", clients=3, num_server_rounds=5)
    print(result.accuracy, result.out_dir)

- :func:`simulate` runs a simulated federation and returns a :class:`SimulationResult`;
  bad input raises :class:`ConfigError` before anything is written.
- :data:`KEYS` is the run-config table (every key, its type, default and range);
  :class:`RunConfig` validates a mapping against it.
- :class:`StamenStrategy` is stamen's aggregation (screening, trust rules, client-level
  DP, server optimizer) as a Flower ``Strategy`` for a ServerApp of your own.

Names are imported on first use, so ``import stamen`` stays cheap (no torch, no Ray).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "simulate": "stamen.simulations.run",
    "SimulationResult": "stamen.simulations.run",
    "SimulationFailed": "stamen.simulations.run",
    "KEYS": "stamen.common.config",
    "RunConfig": "stamen.common.config",
    "StamenError": "stamen.common.errors",
    "ConfigError": "stamen.common.errors",
    "DataError": "stamen.common.errors",
    "StateError": "stamen.common.errors",
    "StamenStrategy": "stamen.server.strategy",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stamen' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
