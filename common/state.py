"""The per-site state store, and the one atomic-write helper everything uses.

Each site owns ``<state-dir>/<site-id>/``. In simulation ``state-dir`` sits under the
run directory; on a real node it is node config. The privacy ledger, replay buffer,
drift references and participation record live there, so a restarted node or a resumed
run continues from what the site already spent and saw. Every write is atomic (temp
file in the same directory, fsync, rename, fsync of the directory): a crash leaves the
old file or the new one, never a torn one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from stamen.common.errors import StateError
from stamen.common.identity import validate_site_id

log = logging.getLogger("stamen")

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


def finite_or_none(obj: Any) -> Any:
    """``obj`` as strict JSON values: every NaN or infinite float None, paths strings, numpy
    scalars Python ones (recursively).

    Python's ``json`` writes non-finite floats as ``NaN``/``Infinity``, which strict parsers
    (and every other language's standard one) reject; an unknown figure is ``null`` instead.
    """
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def strict_json_dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON for files users and other tools read: non-finite floats become ``null``."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o600, durable: bool = True, strict: bool = True) -> None:
    """JSON through :func:`atomic_write_bytes` (sorted keys, so diffs stay readable); owner-only by default.

    ``strict`` (the default) writes strict JSON (:func:`strict_json_dumps`); ``strict=False`` is
    for stamen's own state (checkpoints, site stores), which must round-trip ``-inf`` and NaN
    exactly and whose MACs cover the bytes as Python writes them.
    """
    dumps = strict_json_dumps if strict else json.dumps
    data = (dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(Path(path), data, mode=mode, durable=durable)


#: The temp files :func:`atomic_write_bytes` makes (``mkstemp``: ``.NAME.`` + 8 random characters + ``.tmp``).
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temps(directory: Path, min_age: float = 60.0) -> list[str]:
    """Delete temp files that killed atomic writes left in ``directory``; the names removed.

    Only names of the temp pattern older than ``min_age`` seconds: a write in progress holds its
    temp file for milliseconds, so a concurrent writer's file is never taken.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed: list[str] = []
    cutoff = time.time() - min_age
    for entry in os.scandir(directory):
        if _TEMP.match(entry.name) and entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
            Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        log.warning("removed %d temp file(s) of interrupted writes from %s", len(removed), directory)
    return sorted(removed)


class SiteLock:
    """One process per site state dir: an OS lock (``flock``) on ``<site dir>/.lock``.

    The read-modify-write of a ledger is safe only if one process owns the dir. The lock
    is per process and reentrant within it (a warm executor or a simulation actor takes it
    again for every message); the OS drops it when the process dies, so no lock is ever
    stale. A second process is refused with a StateError naming the dir and the holder.
    """

    _held: ClassVar[dict[Path, tuple[int, int]]] = {}  # site dir -> (fd, holds)
    _guard: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def acquire(cls, site_dir: Path) -> None:
        """Take (or take again) the lock of ``site_dir``; StateError if another process holds it."""
        site_dir = Path(site_dir).resolve()
        with cls._guard:
            if site_dir in cls._held:
                fd, holds = cls._held[site_dir]
                cls._held[site_dir] = (fd, holds + 1)
                return
            fd = os.open(site_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StateError(
                    f"site state dir {site_dir} is in use by another process (pid {holder}): one process per "
                    "site state dir, so its ledger is never charged by two at once"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            cls._held[site_dir] = (fd, 1)

    @classmethod
    def release(cls, site_dir: Path) -> None:
        """Drop one hold of ``site_dir``'s lock; the last one unlocks it."""
        site_dir = Path(site_dir).resolve()
        with cls._guard:
            fd, holds = cls._held[site_dir]
            if holds > 1:
                cls._held[site_dir] = (fd, holds - 1)
                return
            del cls._held[site_dir]
            os.close(fd)  # closing the descriptor releases the flock

    @classmethod
    @contextmanager
    def held(cls, site_dir: Path) -> Iterator[None]:
        """The lock of ``site_dir`` for the duration of a ``with`` block."""
        cls.acquire(site_dir)
        try:
            yield
        finally:
            cls.release(site_dir)


# A forked child shares its parent's lock descriptors but is another process: it must take the lock itself.
os.register_at_fork(after_in_child=SiteLock._held.clear)


class SiteStore:
    """Files of one site under ``<root>/<site-id>/``, versioned and written atomically."""

    def __init__(self, root: str | Path, site_id: str) -> None:
        self.site_id = validate_site_id(site_id)
        self.dir = Path(root) / site_id
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temps(self.dir)

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
        atomic_write_json(
            self._path(name + ".json"), {"schema": STATE_SCHEMA_VERSION, "data": data}, durable=durable, strict=False
        )

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
