"""A real node's watched data directory: new shards are ingested, bad ones quarantined.

A node sets ``data-dir`` in its node config. At every training round the site looks for
``.npz`` / ``.csv`` files it has not ingested yet (names starting with ``.`` are ignored,
so write a shard under a dot-name and rename it when complete). Each new file is read
with stamen's own loaders and checked against the global model (per-example shape,
labels in range); a file that fails is moved to ``quarantine/`` beside a
``<name>.reason`` file saying why, and training goes on with the rest.

Ingested shards stay where they are (no copy): the site state store keeps a manifest
with each shard's SHA-256, size and modification time, so a restarted node trains on
exactly what it had ingested. Shards are identified by content (``shard-<sha256[:16]>``),
which is also the name of a shard's privacy ledger: dropping the same content again under
another name is quarantined as a duplicate rather than getting a fresh budget, and a shard
whose content changes after ingestion is withdrawn (moved to quarantine) — its records'
ledger stays as it was.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stamen.client.view import SiteView
from stamen.common.datasets import Dataset, load_dataset
from stamen.common.errors import DataError, StamenError
from stamen.common.partition import split_holdout
from stamen.common.state import SiteStore, atomic_write_bytes

log = logging.getLogger("stamen.client")

MANIFEST = "data_manifest"
QUARANTINE = "quarantine"
SUFFIXES = {".npz": "npz", ".csv": "csv"}
#: Record ids are ``ordinal << ROW_BITS | row``: unique per site while a shard has < 2**32 rows.
ROW_BITS = 32


@dataclass
class Shard:
    """One ingested file, as the manifest records it."""

    id: str
    name: str
    sha256: str
    size: int
    mtime_ns: int
    rows: int
    round: int
    ordinal: int


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DataDir:
    """The directory ``path`` of one site, with its manifest in ``store``."""

    def __init__(self, path: str, store: SiteStore, input_shape: tuple[int, ...], num_classes: int) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise DataError(f"data-dir {self.path} is not a directory")
        self.store = store
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        doc = store.read_json(MANIFEST, default={"shards": [], "withdrawn": [], "unmovable": [], "next_ordinal": 0})
        try:
            self.shards = [Shard(**s) for s in doc["shards"]]
            self.withdrawn = [Shard(**s) for s in doc["withdrawn"]]
            self.unmovable = [dict(u) for u in doc["unmovable"]]
            self.next_ordinal = int(doc["next_ordinal"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"data manifest in {store.dir} is malformed: {exc}") from exc

    def _save(self) -> None:
        self.store.write_json(
            MANIFEST,
            {
                "shards": [asdict(s) for s in self.shards],
                "withdrawn": [asdict(s) for s in self.withdrawn],
                "unmovable": self.unmovable,
                "next_ordinal": self.next_ordinal,
            },
        )

    def _candidates(self) -> list[Path]:
        """Shard files not yet refused; a file that could not be moved to quarantine is skipped by (name, version)."""
        skip = {(u["name"], u["size"], u["mtime_ns"]) for u in self.unmovable}
        out = []
        for p in sorted(self.path.iterdir()):
            if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file():
                st = p.stat()
                if (p.name, st.st_size, st.st_mtime_ns) not in skip:
                    out.append(p)
        return out

    def quarantine(self, path: Path, reason: str) -> Path | None:
        """Move ``path`` into ``quarantine/`` (never overwriting) with ``<name>.reason`` beside it.

        If the directory is read-only the file stays, is remembered as refused (this
        version of it) and skipped from then on; None is returned.
        """
        log.warning("site %s: quarantining %s: %s", self.store.site_id, path.name, reason)
        qdir = self.path / QUARANTINE
        target = qdir / path.name
        n = 1
        while target.exists() or target.with_name(target.name + ".reason").exists():
            target = qdir / f"{path.stem}.{n}{path.suffix}"
            n += 1
        st = path.stat()
        try:
            qdir.mkdir(exist_ok=True)
            atomic_write_bytes(target.with_name(target.name + ".reason"), (reason + "\n").encode(), mode=0o644)
            os.replace(path, target)
        except OSError as exc:
            log.error("site %s: cannot move %s to %s (%s); skipping it", self.store.site_id, path.name, qdir, exc)
            self.unmovable.append({"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "reason": reason})
            return None
        return target

    def _load(self, path: Path) -> Dataset:
        """Read and check one shard against the model; DataError says what is wrong."""
        data = load_dataset(f"{SUFFIXES[path.suffix]}:{path}")
        for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
            if x is None or y is None:
                continue
            shape = tuple(x.shape[1:])
            flat_ok = len(shape) == 1 and shape[0] == math.prod(self.input_shape)
            if shape != self.input_shape and not flat_ok:
                raise DataError(f"{path.name}: examples have shape {shape}, the model takes {self.input_shape}")
            if int(y.max()) >= self.num_classes:
                raise DataError(
                    f"{path.name}: label {int(y.max())} is out of range (the model has {self.num_classes} classes)"
                )
        return data

    def ingest(self, server_round: int) -> list[Path | None]:
        """Take in new files, quarantine bad or changed ones; return where the refused files went."""
        by_name = {s.name: s for s in self.shards}
        by_sha = {s.sha256: s for s in self.shards}
        present = {p.name for p in self._candidates()}
        moved: list[Path | None] = []
        for path in self._candidates():
            st = path.stat()
            known = by_name.get(path.name)
            if known and (known.size, known.mtime_ns) == (st.st_size, st.st_mtime_ns):
                continue
            digest = _digest(path)
            if known and known.sha256 == digest:  # touched, same content
                known.mtime_ns = st.st_mtime_ns
                continue
            if known:
                self.shards.remove(known)
                self.withdrawn.append(known)
                del by_sha[known.sha256]
                reason = (
                    f"content changed after it was ingested in round {known.round}; an ingested shard must not "
                    "change, so it is withdrawn from training (add new records as a new file)"
                )
                moved.append(self.quarantine(path, reason))
                continue
            twin = by_sha.get(digest)
            if twin and twin.name in present:
                moved.append(self.quarantine(path, f"duplicate of already ingested shard {twin.name} (same content)"))
                continue
            if twin:  # the ingested file was renamed
                twin.name, twin.mtime_ns = path.name, st.st_mtime_ns
                continue
            try:
                data = self._load(path)
            except StamenError as exc:
                moved.append(self.quarantine(path, str(exc)))
                continue
            shard = Shard(
                f"shard-{digest[:16]}",
                path.name,
                digest,
                st.st_size,
                st.st_mtime_ns,
                len(data.y_train),
                server_round,
                self.next_ordinal,
            )
            self.next_ordinal += 1
            self.shards.append(shard)
            by_name[shard.name], by_sha[digest] = shard, shard
            log.info("site %s: ingested %s (%d records) as %s", self.store.site_id, path.name, shard.rows, shard.id)
        self._save()
        return moved

    def active(self) -> list[Shard]:
        """Ingested shards whose file is present and unchanged (size and mtime) now."""
        out = []
        for shard in self.shards:
            path = self.path / shard.name
            try:
                st = path.stat()
            except OSError:
                log.warning(
                    "site %s: ingested shard %s is missing; training without it", self.store.site_id, shard.name
                )
                continue
            if (st.st_size, st.st_mtime_ns) != (shard.size, shard.mtime_ns):
                log.warning(
                    "site %s: shard %s changed since ingestion; left out until the next round checks it",
                    self.store.site_id,
                    shard.name,
                )
                continue
            out.append(shard)
        return out

    def view(self, server_round: int, holdout: float, *, ingest: bool) -> SiteView:
        """Every active shard's records; with ``ingest``, new files are taken in first."""
        if ingest:
            self.ingest(server_round)
        x_tr, y_tr, x_ho, y_ho, ids, shard_of = [], [], [], [], [], []
        names: list[str] = []
        for shard in self.active():
            data = self._load(self.path / shard.name)
            x, y = data.x_train.reshape(-1, *self.input_shape), data.y_train
            if data.x_test is not None and data.y_test is not None:
                train = np.arange(len(y))
                x_ho.append(data.x_test.reshape(-1, *self.input_shape))
                y_ho.append(data.y_test)
            else:
                train, hold = split_holdout(np.arange(len(y)), holdout, int(shard.sha256[:8], 16))
                x_ho.append(x[hold])
                y_ho.append(y[hold])
            x_tr.append(x[train])
            y_tr.append(y[train])
            ids.append((shard.ordinal << ROW_BITS) | train)
            shard_of.append(np.full(len(train), len(names), dtype=np.int32))
            names.append(shard.id)
        return SiteView(
            _tensor(x_tr, (0, *self.input_shape), torch.float32),
            _tensor(y_tr, (0,), torch.int64),
            _tensor(x_ho, (0, *self.input_shape), torch.float32),
            _tensor(y_ho, (0,), torch.int64),
            np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, dtype=np.int64),
            np.concatenate(shard_of) if shard_of else np.zeros(0, dtype=np.int32),
            tuple(names),
        )


def _tensor(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The rows of every shard as one tensor (a copy: the loaded arrays are read-only and shared)."""
    if not parts:
        return torch.zeros(empty_shape, dtype=dtype)
    return torch.from_numpy(np.concatenate(parts)).to(dtype)
