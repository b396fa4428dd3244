"""The run record: ``config.json``, everything needed to reproduce a run.

It holds the full resolved configuration, the versions of every package that shapes the
numbers, the git commit of the code if there is one, and every seed derived from the
master seed, under a schema version so later tools can read old runs.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from stamen.common.config import StamenConfig
from stamen.common.state import atomic_write_json

RUN_RECORD_SCHEMA_VERSION = 1
_PACKAGES = ("stamen", "flwr", "torch", "numpy", "opacus", "ray", "flwr-datasets", "scikit-learn", "mlxtend")


def derive_seeds(seed: int) -> dict[str, int]:
    """Named seeds for each random process, all from the master seed.

    Client shuffling uses ``client`` mixed with the site-id and round (see
    ``client.train.round_seed``), so it is recorded as its base. No DP noise seed is listed:
    DP noise is secret (``seed + 4`` stays free: older records list it as ``server_noise``, the
    seed of a ``dp-noise = seeded`` run's server noise, :func:`stamen.server.dp_fedavg.seeded_noise_seed`).
    """
    return {
        "master": seed,
        "model_init": seed,
        "sampling": seed + 1,
        "partition": seed + 2,
        "client": seed + 3,
        "drift": seed + 5,
    }


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape results (None if absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Path) -> str | None:
    """The commit of the code being run, with ``+dirty`` if it has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def build_run_record(config: StamenConfig, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record for a run with this configuration."""
    return {
        "schema": RUN_RECORD_SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.as_dict(),
        "seeds": derive_seeds(int(config["seed"])),
        "versions": package_versions(),
        "git_commit": git_commit(Path(__file__).resolve().parent.parent),
        "platform": {"machine": platform.machine(), "system": platform.system(), "argv": sys.argv},
        **(extra or {}),
    }


def write_run_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``config.json`` atomically and return its path."""
    path = Path(out_dir) / "config.json"
    atomic_write_json(path, record, mode=0o644)
    return path
