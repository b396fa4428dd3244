"""Poisoning scenarios, for simulation and tests only: some sites misbehave on purpose.

With ``attack`` set, the partitions named by ``attack-sites`` turn their honest work into an
attack: ``scale`` sends the global model plus ``attack-scale`` times its update,
``sign-flip`` the global model minus ``attack-scale`` times its update, ``label-flip``
trains on labels ``C - 1 - y``, ``nan`` sends NaN everywhere, ``stale`` replays the model it
sent in the first round it trained (kept in its state store) every round after.

Only the simulation's fault layer (:mod:`simulations.faults.layer`) applies these; the
production ClientApp refuses any instruction that sets them, and even within the layer a
real node (node config without ``partition-id``) refuses an attack, so a run config with one
cannot poison a deployment: every node answers with an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from stamen.client.data import SiteData
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.state import SiteStore

Arrays = dict[str, np.ndarray]
STALE_ENTRY = "attack-stale"


def attack_partitions(text: str) -> set[int]:
    """Partitions named by ``attack-sites``: a count N (partitions 0..N-1), or a comma-separated
    list of partition ids (one id alone is written with a trailing comma, e.g. ``5,``)."""
    text = text.strip()
    if not text:
        return set()
    try:
        if "," not in text:
            return set(range(int(text)))
        return {int(p) for p in text.split(",") if p.strip()}
    except ValueError:
        raise ConfigError(f"run config 'attack-sites' must be a count or a list of partition ids, got {text!r}") from (
            None
        )


def attack_of(cfg: StamenConfig, node_config: Mapping[str, Any]) -> str | None:
    """The attack this node carries out this run, or None; refused outside simulation."""
    kind = str(cfg["attack"])
    if kind == "none":
        return None
    if "partition-id" not in node_config:
        raise ConfigError(f"attack {kind!r} is a simulation-only scenario: a real node (no partition-id) refuses it")
    return kind if int(node_config["partition-id"]) in attack_partitions(str(cfg["attack-sites"])) else None


def poison_data(data: SiteData, kind: str | None, num_classes: int) -> SiteData:
    """The data this site trains on (labels flipped under ``label-flip``)."""
    if kind != "label-flip":
        return data
    return replace(data, y_train=(num_classes - 1) - data.y_train)


def poison_update(kind: str | None, global_arrays: Arrays, model: Arrays, scale: float, store: SiteStore) -> Arrays:
    """The model this site sends instead of its honest ``model``."""
    if kind in (None, "label-flip"):
        return model
    floating = {k for k, v in global_arrays.items() if np.issubdtype(v.dtype, np.floating)}
    if kind in ("scale", "sign-flip"):
        factor = scale if kind == "scale" else -scale
        return {
            k: (global_arrays[k] + factor * (v - global_arrays[k])).astype(v.dtype) if k in floating else v
            for k, v in model.items()
        }
    if kind == "nan":
        return {k: np.full_like(v, np.nan) if k in floating else v for k, v in model.items()}
    if kind == "stale":
        first = store.read_arrays(STALE_ENTRY)
        if first is None:
            store.write_arrays(STALE_ENTRY, model)
            return model
        return first
    raise ConfigError(f"unknown attack {kind!r}")
