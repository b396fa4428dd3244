"""The per-site state store, and the one atomic-write helper everything uses.

Each site owns ``<state-dir>/<site-id>/``. In simulation ``state-dir`` sits under the
run directory; on a real node it is node config. The privacy ledger, replay buffer,
drift references and participation record live there, so a restarted node or a resumed
run continues from what the site already spent and saw. Every write is atomic (temp
file in the same directory, fsync, rename, fsync of the directory): a crash leaves the
old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from stamen.common.errors import StateError
from stamen.common.identity import validate_site_id

STATE_SCHEMA_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half.

    ``durable=False`` skips the two fsyncs (about 8 ms a write on the development box's
    disk): the rename still makes the write atomic against a crashed process, but a power
    cut may keep the previous version. Only for files rebuilt from durable state or that
    only describe it (a run's history table, a site's participation count); privacy
    ledgers, checkpoints and model versions stay durable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    """JSON through :func:`atomic_write_bytes` (sorted keys, so diffs stay readable)."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(Path(path), data, mode=0o644, durable=durable)


class SiteStore:
    """Files of one site under ``<root>/<site-id>/``, versioned and written atomically."""

    def __init__(self, root: str | Path, site_id: str) -> None:
        self.site_id = validate_site_id(site_id)
        self.dir = Path(root) / site_id
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise StateError(f"state entry name {name!r} must be a plain file name")
        return self.dir / name

    def read_json(self, name: str, default: Any = None) -> Any:
        """The stored value, or ``default`` if the entry does not exist yet."""
        path = self._path(name + ".json")
        if not path.exists():
            return default
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
            raise StateError(f"site state {path} is unreadable: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("schema") != STATE_SCHEMA_VERSION:
            raise StateError(
                f"site state {path} has schema {doc.get('schema') if isinstance(doc, dict) else None!r}, "
                f"this stamen reads schema {STATE_SCHEMA_VERSION}"
            )
        return doc["data"]

    def write_json(self, name: str, data: Any, *, durable: bool = True) -> None:
        """Store ``data`` (JSON-serialisable) atomically (see :func:`atomic_write_bytes` on ``durable``)."""
        atomic_write_json(self._path(name + ".json"), {"schema": STATE_SCHEMA_VERSION, "data": data}, durable=durable)

    def read_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        """Stored arrays, or None if the entry does not exist yet."""
        path = self._path(name + ".safetensors")
        if not path.exists():
            return None
        try:
            return st_load(path.read_bytes())
        except (OSError, SafetensorError) as exc:
            raise StateError(f"site state {path} is unreadable: {exc}") from exc

    def write_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Store named arrays atomically (safetensors: no pickle, safe to load)."""
        data = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        atomic_write_bytes(self._path(name + ".safetensors"), st_save(data))
