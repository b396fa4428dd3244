"""The model-version registry: every aggregated model gets a number that only ever grows.

``<run-dir>/versions/index.json`` lists every version the server ever produced: its
round, the version it was computed from (``parent``; 0 is the initial model), its
evaluation, the sites whose updates went into it and every site's cumulative ε at that
point, and a status — ``ok``, ``rolled_back`` (it diverged and the server went back to an
earlier version) or ``abandoned`` (produced after the checkpoint a resumed run continued
from, so lost to the crash; its number is never reused). Entries are never removed.

Model files (``vNNNNNNNN.safetensors``) are kept for the newest ``versions-keep`` versions,
the best version (by evaluation accuracy, as the run's ``best``) and every version ever released; older files are
pruned, their index entries stay. The server is the only writer of ``index.json``; the
operator's release pointer lives in ``releases.json`` (:mod:`server.release`), written
only by the ``stamen versions`` commands, so the two never overwrite each other.

Every checkpoint holds the entries as they were at its round, so a resumed run whose
``index.json`` is unreadable rebuilds it from the checkpoint (the file kept aside as
``index.json.corrupt-<time>``); model files of later versions add abandoned entries, so
their numbers are never reused.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as st_save

from stamen.common.errors import StateError
from stamen.common.state import atomic_write_bytes, atomic_write_json, remove_stale_temps

log = logging.getLogger("stamen.server")

VERSIONS_SCHEMA_VERSION = 1
VERSIONS_DIR = "versions"
INDEX = "index.json"
RELEASES = "releases.json"
_MODEL_FILE = re.compile(r"^v(\d{8})\.safetensors$")


def version_file(version: int) -> str:
    """The model file name of ``version``."""
    return f"v{version:08d}.safetensors"


class UnreadableIndex(StateError):
    """An ``index.json`` that is not a registry document at all (torn, emptied, edited)."""


def read_index(run_dir: Path) -> dict[str, Any]:
    """The registry of ``run_dir`` (StateError if missing, unreadable or of another schema)."""
    path = Path(run_dir) / VERSIONS_DIR / INDEX
    if not path.exists():
        raise StateError(f"{run_dir} has no model versions ({path} does not exist)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableIndex(f"version registry {path} is unreadable: {exc}") from exc
    if not isinstance(doc, dict) or (doc.get("schema") == VERSIONS_SCHEMA_VERSION and not _is_list(doc)):
        raise UnreadableIndex(f"version registry {path} is unreadable: it is not a registry document")
    if doc.get("schema") != VERSIONS_SCHEMA_VERSION:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise StateError(f"version registry {path} has schema {found!r}; this stamen reads {VERSIONS_SCHEMA_VERSION}")
    return doc


def _is_list(doc: dict[str, Any]) -> bool:
    versions = doc.get("versions")
    return isinstance(versions, list) and all(isinstance(e, dict) and "version" in e for e in versions)


def read_releases(run_dir: Path) -> dict[str, Any]:
    """The release record of ``run_dir``: the released version and the log of changes."""
    path = Path(run_dir) / VERSIONS_DIR / RELEASES
    if not path.exists():
        return {"schema": VERSIONS_SCHEMA_VERSION, "released": None, "log": []}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StateError(f"release record {path} is unreadable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != VERSIONS_SCHEMA_VERSION:
        raise StateError(f"release record {path} has another schema; this stamen reads {VERSIONS_SCHEMA_VERSION}")
    return doc


@dataclass
class ModelInfo:
    """What a model file needs to be loaded elsewhere."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int


class VersionRegistry:
    """The server's side of the registry: numbers, entries and model files."""

    def __init__(self, run_dir: Path, model: ModelInfo, keep: int) -> None:
        self.dir = Path(run_dir) / VERSIONS_DIR
        self.keep = keep
        self.abandoned: list[int] = []
        self.unreadable: UnreadableIndex | None = None  # until a resume rebuilds it from the checkpoint
        self.doc = {
            "schema": VERSIONS_SCHEMA_VERSION,
            "model": {"name": model.name, "input_shape": list(model.input_shape), "num_classes": model.num_classes},
            "versions": [],
        }
        if (self.dir / INDEX).exists():
            try:
                self.doc = read_index(run_dir)
            except UnreadableIndex as exc:
                self.unreadable = exc

    @property
    def entries(self) -> list[dict[str, Any]]:
        if self.unreadable is not None:
            raise self.unreadable
        return self.doc["versions"]

    @property
    def highest(self) -> int:
        """The highest number ever given out (0 before the first aggregation)."""
        return max((e["version"] for e in self.entries), default=0)

    def entry(self, version: int) -> dict[str, Any]:
        for e in self.entries:
            if e["version"] == version:
                return e
        raise StateError(f"version {version} is not in the registry {self.dir / INDEX}")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint knows of the registry: the highest number given out, every entry, the best."""
        return {"highest": self.highest, "entries": copy.deepcopy(self.entries), "best": self.doc.get("best")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: versions made after the checkpoint are abandoned (listed in :attr:`abandoned`).

        An unreadable index is rebuilt from the checkpoint first; stale temp files are removed.
        """
        remove_stale_temps(self.dir)
        if self.unreadable is not None:
            self._rebuild(state)
        self.abandoned = self.abandon_after(int(state["highest"]))

    def _rebuild(self, state: dict[str, Any]) -> None:
        """Replace the unreadable index with the checkpoint's entries plus later model files."""
        if "entries" not in state:
            raise StateError(f"{self.unreadable}; the checkpoint predates saved entries, so it cannot be rebuilt")
        path = self.dir / INDEX
        aside = path.with_name(f"{INDEX}.corrupt-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}")
        os.replace(path, aside)
        entries = copy.deepcopy(state["entries"])
        known = {e["version"] for e in entries}
        for name in sorted(os.listdir(self.dir)):
            m = _MODEL_FILE.match(name)
            if m and int(m.group(1)) not in known:
                entries.append(self._recovered_entry(int(m.group(1)), name))
        self.doc["versions"] = sorted(entries, key=lambda e: e["version"])
        if state.get("best") is not None:
            self.doc["best"] = state["best"]
        log.warning(
            "%s; rebuilt it from the checkpoint (%d versions, %d from model files only), the old file kept as %s",
            self.unreadable,
            len(entries),
            len(entries) - len(known),
            aside.name,
        )
        self.unreadable = None
        self._write()

    def _recovered_entry(self, version: int, name: str) -> dict[str, Any]:
        """The entry of a model file newer than the checkpoint: all the file itself says."""
        try:
            with safe_open(str(self.dir / name), "np") as fh:
                server_round: int | None = int((fh.metadata() or {})["round"])
        except (OSError, SafetensorError, KeyError, ValueError):
            server_round = None
        created = datetime.fromtimestamp((self.dir / name).stat().st_mtime, UTC).isoformat(timespec="seconds")
        return {
            "version": version,
            "round": server_round,
            "parent": None,
            "status": "ok",
            "metrics": {},
            "contributors": [],
            "epsilon": {},
            "created": created,
            "file": name,
            "recovered": "model file only",
        }

    def abandon_after(self, version: int) -> list[int]:
        """Mark versions above ``version`` (the highest the resumed checkpoint knew) abandoned."""
        lost = [e["version"] for e in self.entries if e["version"] > version and e["status"] != "abandoned"]
        for e in self.entries:
            if e["version"] in lost:
                e["status"] = "abandoned"
        if lost:
            self._write()
        return lost

    def add(self, version: int, arrays: dict[str, np.ndarray], entry: dict[str, Any], *, best: int) -> None:
        """Store a new version's model file and entry (``best``: the best version now), then prune."""
        if version <= self.highest:
            raise StateError(f"version {version} is not above the highest version {self.highest}: numbers only grow")
        name = version_file(version)
        data = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        metadata = {"version": str(version), "round": str(entry["round"]), "model": self.doc["model"]["name"]}
        atomic_write_bytes(self.dir / name, st_save(data, metadata=metadata), mode=0o644)
        self.entries.append(
            {"version": version, "created": datetime.now(UTC).isoformat(timespec="seconds"), **entry, "file": name}
        )
        self.doc["best"] = best
        self._prune({version, best})
        self._write()

    def roll_back(self, current: int, target: int) -> list[int]:
        """Mark the versions from ``current`` back to (not including) ``target`` as rolled back."""
        known = {e["version"]: e for e in self.entries}
        left: list[int] = []
        version = current
        while version in known and version != target:
            known[version]["status"] = "rolled_back"
            left.append(version)
            version = known[version]["parent"]
        self._write()
        return left

    def _prune(self, protected: set[int]) -> None:
        if self.keep == 0:
            return
        releases = read_releases(self.dir.parent)
        keep = set(protected) | {r["version"] for r in releases["log"]}
        keep |= {e["version"] for e in sorted(self.entries, key=lambda e: -e["version"])[: self.keep]}
        for e in self.entries:
            if e["file"] and e["version"] not in keep:
                (self.dir / e["file"]).unlink(missing_ok=True)
                e["file"] = None

    def _write(self) -> None:
        atomic_write_json(self.dir / INDEX, self.doc, mode=0o644)
