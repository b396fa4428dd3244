"""Server checkpoints: the format, the store, rotation, and the fall-back on corruption.

A checkpoint is two files in ``<run-dir>/checkpoints/``:

- ``ckpt-RRRRRRRR.safetensors``: every array (global model, server optimizer state, best
  model), keyed ``<group>|<parameter>``; safetensors, so loading runs no pickle;
- ``ckpt-RRRRRRRR.json``: the schema version, round, model version, the SHA-256 of the
  arrays file and the JSON-serialisable state: the config and, under ``parts``, every
  registered run-state part (:mod:`server.run_state`: sampler RNG, best-so-far, counters,
  privacy figures, history, rollback state, drift detectors, metrics counters ...).

Both are written atomically (:func:`common.state.atomic_write_bytes`), arrays first: the
JSON is the commit record, so a crash between the two leaves an orphan arrays file that
is ignored. Loading verifies the checksum; an unreadable or inconsistent newest checkpoint
is skipped with a warning for the one before it. A checkpoint of another schema version is
an error, not a reason to fall back: silently resuming from an older checkpoint would
drop the rounds the newer one holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from stamen.common.errors import StateError
from stamen.common.state import atomic_write_bytes, atomic_write_json, remove_stale_temps

log = logging.getLogger("stamen.server")

CHECKPOINT_SCHEMA_VERSION = 2  # 2: the state is the run-state registry's parts (server/run_state.py)
CHECKPOINT_DIR = "checkpoints"
_SEP = "|"
_NAME = re.compile(r"^ckpt-(\d{8})\.json$")

Arrays = dict[str, np.ndarray]


class CorruptCheckpoint(StateError):
    """A checkpoint that cannot be read back as written (truncated, edited, half-deleted)."""


@dataclass
class Checkpoint:
    """One saved server state: array groups plus JSON state."""

    round: int
    version: int
    arrays: dict[str, Arrays] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _flatten(groups: dict[str, Arrays]) -> Arrays:
    flat: Arrays = {}
    for group, arrays in groups.items():
        if _SEP in group:
            raise ValueError(f"array group name {group!r} may not contain {_SEP!r}")
        for name, value in arrays.items():
            flat[f"{group}{_SEP}{name}"] = np.ascontiguousarray(value)
    return flat


def _unflatten(flat: Arrays) -> dict[str, Arrays]:
    groups: dict[str, Arrays] = {}
    for key, value in flat.items():
        group, sep, name = key.partition(_SEP)
        if not sep:
            raise CorruptCheckpoint(f"array key {key!r} names no group")
        groups.setdefault(group, {})[name] = value
    return groups


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINT_DIR

    def _paths(self, server_round: int) -> tuple[Path, Path]:
        stem = f"ckpt-{server_round:08d}"
        return self.dir / f"{stem}.json", self.dir / f"{stem}.safetensors"

    def rounds(self) -> list[int]:
        """Rounds that have a checkpoint record (valid or not), newest first."""
        if not self.dir.is_dir():
            return []
        found = [int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, checkpoint: Checkpoint, keep: int) -> Path:
        """Write ``checkpoint`` atomically, then keep only the newest ``keep``."""
        record_path, arrays_path = self._paths(checkpoint.round)
        blob = st_save(_flatten(checkpoint.arrays))
        atomic_write_bytes(arrays_path, blob, mode=0o644)
        atomic_write_json(
            record_path,
            {
                "schema": CHECKPOINT_SCHEMA_VERSION,
                "round": checkpoint.round,
                "version": checkpoint.version,
                "arrays_file": arrays_path.name,
                "arrays_sha256": hashlib.sha256(blob).hexdigest(),
                "state": checkpoint.state,
            },
            mode=0o644,
            strict=False,  # run state round-trips exactly (a best accuracy of -inf before any evaluation)
        )
        self._rotate(keep)
        return record_path

    def _rotate(self, keep: int) -> None:
        kept = self.rounds()[:keep]
        for server_round in self.rounds()[keep:]:
            for path in self._paths(server_round):  # the record first: an orphan arrays file is ignored
                path.unlink(missing_ok=True)
        for path in self.dir.glob("ckpt-*.safetensors"):
            if path.stem.removeprefix("ckpt-").isdigit() and int(path.stem.removeprefix("ckpt-")) not in kept:
                path.unlink(missing_ok=True)

    def load(self, server_round: int) -> Checkpoint:
        """The checkpoint of ``server_round``; CorruptCheckpoint if it cannot be trusted."""
        record_path, arrays_path = self._paths(server_round)
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"{record_path.name} is unreadable: {exc}") from exc
        if not isinstance(record, dict):
            raise CorruptCheckpoint(f"{record_path.name} is not a JSON object")
        if record.get("schema") != CHECKPOINT_SCHEMA_VERSION:
            raise StateError(
                f"checkpoint {record_path} has schema {record.get('schema')!r}; this stamen reads checkpoint "
                f"schema {CHECKPOINT_SCHEMA_VERSION}: resume it with the stamen version that wrote it"
            )
        try:
            blob = (self.dir / str(record["arrays_file"])).read_bytes()
            expected = str(record["arrays_sha256"])
            state, version, saved_round = record["state"], int(record["version"]), int(record["round"])
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpoint(f"{record_path.name} is incomplete: {exc!r}") from exc
        if hashlib.sha256(blob).hexdigest() != expected:
            raise CorruptCheckpoint(f"{arrays_path.name} does not match the checksum in {record_path.name}")
        if saved_round != server_round or not isinstance(state, dict):
            raise CorruptCheckpoint(f"{record_path.name} is inconsistent (round {saved_round})")
        try:
            arrays = _unflatten(st_load(blob))
        except SafetensorError as exc:
            raise CorruptCheckpoint(f"{arrays_path.name} is not valid safetensors: {exc}") from exc
        return Checkpoint(saved_round, version, arrays, state, record_path)

    def load_latest(self) -> Checkpoint:
        """The newest checkpoint that reads back intact, falling back over corrupt ones.

        Raises StateError when the directory holds no usable checkpoint. Temp files that
        killed writes left (rotation matches only ``ckpt-*``) are removed first.
        """
        remove_stale_temps(self.dir)
        remove_stale_temps(self.run_dir)
        rounds = self.rounds()
        if not rounds:
            raise StateError(f"no checkpoint in {self.dir}: is {self.run_dir} a stamen run directory?")
        problems: list[str] = []
        for server_round in rounds:
            try:
                checkpoint = self.load(server_round)
            except CorruptCheckpoint as exc:
                problems.append(str(exc))
                log.warning("checkpoint of round %d is unusable (%s); trying the one before it", server_round, exc)
                continue
            if problems:
                log.warning(
                    "resuming from the checkpoint of round %d, not the newest (round %d): %s",
                    server_round,
                    rounds[0],
                    "; ".join(problems),
                )
            return checkpoint
        raise StateError(f"no valid checkpoint in {self.dir}: " + "; ".join(problems))


# Keys that define what a checkpoint's state means: the sites' data (seed and partitioning),
# the model's shape, the optimizer state's layout and the privacy ledgers. Resuming with any
# of them changed would not continue the run, but silently start another one on its state.
FIXED_ON_RESUME = (
    "seed",
    "dataset",
    "partition",
    "alpha",
    "shards-per-site",
    "min-partition-size",
    "holdout-fraction",
    "input-shape",
    "num-classes",
    "model",
    "strategy",
    "dp",
    "dp-fix-model",
    "accountant",
    "delta",
    "state-dir",
    "server-dp-clip",
    "site-sampling",
)
# With client-level DP on the server, its epsilon is one accountant history at one noise
# multiplier and one site sampling rate: neither may change mid-run.
FIXED_WITH_SERVER_DP = ("server-dp-noise", "fraction-train")


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [saved, now]}`` for every key a resumed run changes; StateError for fixed keys."""
    changed = {k: [saved.get(k), v] for k, v in now.items() if k in saved and saved[k] != v}
    server_dp = float(saved.get("server-dp-clip", 0) or 0) > 0
    fixed = sorted(k for k in changed if k in FIXED_ON_RESUME or (server_dp and k in FIXED_WITH_SERVER_DP))
    if fixed:
        listed = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in fixed)
        raise StateError(f"a resumed run cannot change {listed}: the checkpoint's state depends on them")
    return changed
