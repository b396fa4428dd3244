"""A simulated site's own data, instead of a partition of the run's ``dataset``.

Two ways, both simulation only (a real node names its own ``data`` / ``data-dir``):

* ``site-data = DIR``: one ``.npz`` / ``.csv`` file or sub-directory per site, in name
  order (site ``i`` is the ``i``-th entry); ``server.npz`` / ``server.csv``, when present,
  is the server's test split and no site. A simulated site then gets node config
  ``data`` (a file) or ``data-dir`` (a sub-directory, a watched directory) of its own entry,
  and loads it exactly as a real node would.
* ``data-loader = package.module:fn``: Flower's ``load_data(partition_id, num_partitions)``
  shape. ``fn`` returns ``(x, y)``, ``(x, y, x_test, y_test)`` or a mapping with those
  keys: the site's training data and, when the run has one, the server's test split. The
  server calls ``fn(0, 1)`` (the whole federation as one site) for the model's shape, the
  classes and that test split. The module is imported in every Ray actor.

Every array goes through :func:`~stamen.common.datasets.validate_arrays`, as any dataset does.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError, DataError

if TYPE_CHECKING:  # numpy and pandas load where data is read, not where a directory is listed
    from stamen.common.datasets import Dataset

SUFFIXES = {".npz": "npz", ".csv": "csv"}
#: Names in a ``site-data`` directory that are the server's test split, not a site.
SERVER_NAMES = ("server.npz", "server.csv")


def site_entries(directory: str) -> list[Path]:
    """The sites of a ``site-data`` directory: its data files and sub-directories, in name order."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"site-data {root} is not a directory")
    entries = [
        p
        for p in sorted(root.iterdir())
        if not p.name.startswith(".")
        and p.name not in SERVER_NAMES
        and (p.is_dir() or (p.is_file() and p.suffix in SUFFIXES))
    ]
    if not entries:
        raise DataError(f"site-data {root} holds no .npz or .csv file and no sub-directory: one per site is needed")
    return entries


def server_file(directory: str) -> Path | None:
    """The server's test split of a ``site-data`` directory, if it has one."""
    found = [p for p in (Path(directory).expanduser() / n for n in SERVER_NAMES) if p.is_file()]
    if len(found) > 1:
        raise DataError(f"site-data {directory} has both {SERVER_NAMES[0]} and {SERVER_NAMES[1]}: keep one")
    return found[0] if found else None


def entry_node_config(entry: Path) -> dict[str, str]:
    """The node-config keys a real node would set for this entry: ``data`` or ``data-dir``."""
    if entry.is_dir():
        return {"data-dir": str(entry.resolve())}
    return {"data": f"{SUFFIXES[entry.suffix]}:{entry.resolve()}"}


def entry_dataset(entry: Path) -> Dataset:
    """One entry's records as one dataset (a sub-directory: every file in it), validated."""
    import numpy as np

    from stamen.common.datasets import load_dataset, validate_arrays

    if not entry.is_dir():
        return load_dataset(entry_node_config(entry)["data"])
    files = [p for p in sorted(entry.iterdir()) if p.suffix in SUFFIXES and not p.name.startswith(".")]
    if not files:
        raise DataError(f"site-data sub-directory {entry} holds no .npz or .csv file")
    parts = [load_dataset(f"{SUFFIXES[p.suffix]}:{p}") for p in files]
    shapes = {p.input_shape for p in parts}
    if len(shapes) > 1:
        raise DataError(f"{entry}: its files have different per-example shapes {sorted(shapes)}")
    x = np.concatenate([p.x_train for p in parts] + [p.x_test for p in parts if p.x_test is not None])
    y = np.concatenate([p.y_train for p in parts] + [p.y_test for p in parts if p.y_test is not None])
    return validate_arrays(str(entry), x, y)


def site_names(directory: str) -> dict[str, str]:
    """Which entry of a ``site-data`` directory each simulated site-id trains on (name order)."""
    from stamen.common.identity import site_id_from_node_config

    return {site_id_from_node_config({"partition-id": i}): p.name for i, p in enumerate(site_entries(directory))}


def with_site_data(node_config: Mapping[str, Any], cfg: StamenConfig) -> Mapping[str, Any]:
    """A simulated site's node config with its own ``site-data`` entry as ``data`` / ``data-dir``.

    Unchanged for a real node (no ``partition-id``) and a run without ``site-data``, so the
    site then loads its entry through the real node's code path.
    """
    if not cfg["site-data"] or "partition-id" not in node_config:
        return node_config
    entries = site_entries(str(cfg["site-data"]))
    partition_id = int(node_config["partition-id"])
    if not 0 <= partition_id < len(entries):
        raise ConfigError(f"site {partition_id} has no entry in site-data {cfg['site-data']} ({len(entries)} sites)")
    return {**node_config, **entry_node_config(entries[partition_id])}


@functools.lru_cache(maxsize=64)
def loader_dataset(spec: str, partition_id: int, num_partitions: int) -> Dataset:
    """What ``fn(partition_id, num_partitions)`` returns, validated (cached: a site asks every round)."""
    from stamen.common.datasets import validate_arrays
    from stamen.common.models import import_user, one_line

    fn = import_user(spec, "data-loader")
    try:
        result = fn(partition_id, num_partitions)
    except Exception as exc:  # a user's loader may fail with anything
        raise DataError(
            f"data-loader {spec!r} failed for partition {partition_id} of {num_partitions} "
            f"({type(exc).__name__}: {one_line(exc)})"
        ) from exc
    arrays = _arrays(spec, result)
    name = f"data-loader {spec} partition {partition_id}/{num_partitions}"
    return validate_arrays(name, *arrays)


def _arrays(spec: str, result: object) -> tuple[Any, Any, Any, Any]:
    """(x, y, x_test, y_test) from a loader's result: a 2- or 4-tuple or a mapping of those keys."""
    if isinstance(result, Mapping) and "x" in result and "y" in result:
        return result["x"], result["y"], result.get("x_test"), result.get("y_test")
    if isinstance(result, tuple | list) and len(result) in (2, 4):
        x, y, *test = result
        return x, y, *(test or (None, None))
    raise DataError(
        f"data-loader {spec!r} returned {type(result).__name__}; expected (x, y), (x, y, x_test, y_test) "
        "or a mapping with keys x, y (and x_test, y_test)"
    )


def site_count(cfg: StamenConfig) -> int | None:
    """The number of sites ``site-data`` implies (None: the run does not say)."""
    return len(site_entries(str(cfg["site-data"]))) if cfg["site-data"] else None


def own_site_dataset(cfg: StamenConfig, partition_id: int, num_partitions: int) -> Dataset:
    """A simulated site's own data, from ``site-data`` or ``data-loader``."""
    if cfg["site-data"]:
        return entry_dataset(site_entries(str(cfg["site-data"]))[partition_id])
    if not cfg["data-loader"]:
        raise ConfigError("the run sets neither site-data nor data-loader: its sites are partitions of dataset")
    return loader_dataset(str(cfg["data-loader"]), partition_id, num_partitions)


def server_dataset(cfg: StamenConfig) -> tuple[tuple[int, ...], int, Dataset | None] | None:
    """(input shape, classes, the test split's dataset or None) for a run whose sites have their own data.

    ``site-data``: the shape of the first site, classes over every site and ``server.*``;
    ``data-loader``: ``fn(0, 1)``'s. None: the run's data is ``dataset``.
    """
    import numpy as np

    from stamen.common.datasets import load_dataset, validate_arrays

    if cfg["data-loader"]:
        whole = loader_dataset(str(cfg["data-loader"]), 0, 1)
        test = None
        if whole.x_test is not None and whole.y_test is not None:
            test = validate_arrays(whole.name, whole.x_test, whole.y_test)
        return whole.input_shape, whole.num_classes, test
    if not cfg["site-data"]:
        return None
    sites = [entry_dataset(e) for e in site_entries(str(cfg["site-data"]))]
    found = server_file(str(cfg["site-data"]))
    test = None
    if found is not None:
        whole = load_dataset(f"{SUFFIXES[found.suffix]}:{found}")
        x = whole.x_train if whole.x_test is None else np.concatenate([whole.x_train, whole.x_test])
        y = whole.y_train if whole.y_test is None else np.concatenate([whole.y_train, whole.y_test])
        test = validate_arrays(whole.name, x, y)
    classes = max(d.num_classes for d in [*sites, *([test] if test else [])])
    return sites[0].input_shape, classes, test
