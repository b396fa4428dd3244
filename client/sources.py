"""Where a site's data for one round comes from, and what each training record is.

A site's data is a per-round view, not a fixed array: a simulated site under a scenario
sees its partition change (:mod:`client.stream`), a real node with a ``data-dir`` sees
the shards ingested so far (:mod:`client.datadir`), and otherwise the site's data is
the same every round (:mod:`client.data`). Every view also says, per training record,
a stable record id (so the replay buffer can tell old records from new ones) and the
shard the record belongs to (so per-shard privacy ledgers know whom a round charges).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from stamen.client.data import load_site_data, simulated_split
from stamen.client.datadir import DataDir
from stamen.client.stream import stream_view
from stamen.client.view import SiteView
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.scenario import scenario_of
from stamen.common.state import SiteStore


def site_view(
    node_config: Mapping[str, Any],
    cfg: StamenConfig,
    server_round: int,
    store: SiteStore | None,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    ingest: bool,
) -> SiteView:
    """This site's data in ``server_round``; ``ingest`` lets a watched directory take new shards."""
    if "data-dir" in node_config:
        if "data" in node_config:
            raise ConfigError("node config sets both 'data' and 'data-dir': put the data file into the directory")
        if store is None:
            raise ConfigError("a data-dir needs the site's state store (its manifest lives there)")
        directory = DataDir(str(node_config["data-dir"]), store, input_shape, num_classes)
        return directory.view(server_round, float(cfg["holdout-fraction"]), ingest=ingest)
    scenario = scenario_of(cfg)
    if scenario is not None and "partition-id" in node_config and "data" not in node_config:
        train_idx, hold_idx = simulated_split(node_config, cfg)
        return stream_view(scenario, cfg, int(node_config["partition-id"]), train_idx, hold_idx, server_round)
    data = load_site_data(node_config, cfg)
    return SiteView.single_shard(data, np.arange(data.num_train))
