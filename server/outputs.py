"""The run directory: history, summary and model files, all written atomically.

``summary.json`` is a public contract (other tools and later features read it): keys are
only ever added, and it is strict JSON (an unknown figure is ``null``, never ``NaN``).
``progress.jsonl`` gets one line per round so a watcher (the CLI's progress bar) can
follow a run in another process.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from stamen.common.errors import StateError
from stamen.common.state import atomic_write_bytes, atomic_write_json, strict_json_dumps

SUMMARY_SCHEMA_VERSION = 1


class RunOutputs:
    """Writes a run's files under ``out_dir``."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = []

    def add_round(self, row: dict[str, Any]) -> None:
        """Record one round: history.csv rewritten, one progress line appended."""
        self.history.append(row)
        self._write_table()
        with open(self.dir / "progress.jsonl", "a") as fh:
            fh.write(strict_json_dumps(row) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """The history rows so far (a resumed run rewrites its files from them), and the
        column order: the checkpoint's JSON sorts keys, history.csv keeps the run's order."""
        return {"rows": [dict(row) for row in self.history], "columns": self._columns()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        order = {column: i for i, column in enumerate(state["columns"])}
        self.restore([dict(sorted(row.items(), key=lambda kv: order.get(kv[0], len(order)))) for row in state["rows"]])

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Continue a resumed run: its history up to the checkpoint, rounds after it dropped."""
        self.history = [dict(row) for row in history]
        self._write_table()
        lines = "".join(strict_json_dumps(row) + "\n" for row in self.history)
        atomic_write_bytes(self.dir / "progress.jsonl", lines.encode(), mode=0o644)

    def _columns(self) -> list[str]:
        """Every key of the history, in the order the rows first had it."""
        columns: dict[str, None] = {}
        for r in self.history:
            columns.update(dict.fromkeys(r))
        return list(columns)

    def _write_table(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns())
        writer.writeheader()
        writer.writerows(self.history)
        # rewritten every round from the history the checkpoint holds: atomic, not fsync'd
        atomic_write_bytes(self.dir / "history.csv", buf.getvalue().encode(), mode=0o644, durable=False)

    def save_model(self, name: str, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
        """A model as safetensors (with string metadata such as round and accuracy)."""
        path = self.dir / name
        data = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        atomic_write_bytes(path, st_save(data, metadata=metadata), mode=0o644)
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """``summary.json`` with the schema version and the full history."""
        path = self.dir / "summary.json"
        atomic_write_json(path, {"schema": SUMMARY_SCHEMA_VERSION, **summary, "history": self.history}, mode=0o644)
        return path


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` for this server process: a second server on the same run is refused.

    An advisory ``flock`` on ``run.lock``: the kernel drops it when the process ends, however
    it ends, so a crashed run never leaves a stale lock behind.
    """
    path = Path(out_dir) / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"run directory {out_dir} is in use by another stamen server") from None
        yield
    finally:
        os.close(fd)
