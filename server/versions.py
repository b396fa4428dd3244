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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from stamen.common.errors import StateError
from stamen.common.state import atomic_write_bytes, atomic_write_json

VERSIONS_SCHEMA_VERSION = 1
VERSIONS_DIR = "versions"
INDEX = "index.json"
RELEASES = "releases.json"


def version_file(version: int) -> str:
    """The model file name of ``version``."""
    return f"v{version:08d}.safetensors"


def read_index(run_dir: Path) -> dict[str, Any]:
    """The registry of ``run_dir`` (StateError if missing, unreadable or of another schema)."""
    path = Path(run_dir) / VERSIONS_DIR / INDEX
    if not path.exists():
        raise StateError(f"{run_dir} has no model versions ({path} does not exist)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StateError(f"version registry {path} is unreadable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != VERSIONS_SCHEMA_VERSION:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise StateError(f"version registry {path} has schema {found!r}; this stamen reads {VERSIONS_SCHEMA_VERSION}")
    return doc


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
        path = self.dir / INDEX
        if path.exists():
            self.doc = read_index(run_dir)
        else:
            self.doc = {
                "schema": VERSIONS_SCHEMA_VERSION,
                "model": {"name": model.name, "input_shape": list(model.input_shape), "num_classes": model.num_classes},
                "versions": [],
            }

    @property
    def entries(self) -> list[dict[str, Any]]:
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
        """What a checkpoint knows of the registry: the highest number given out by then."""
        return {"highest": self.highest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: versions made after the checkpoint are abandoned (listed in :attr:`abandoned`)."""
        self.abandoned = self.abandon_after(int(state["highest"]))

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
        atomic_write_json(self.dir / INDEX, self.doc)
