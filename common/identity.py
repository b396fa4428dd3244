"""Site identity and stamen's own site sampling.

Flower's node ids are new on every SuperNode start, so nothing may be keyed by them.
Every client has a stable ``site-id``: the configured ``site-id`` of a real node, or
``site-NNNN`` from the partition id in simulation. The server samples over sorted
site-ids with a seeded generator whose state goes into checkpoints, so a resumed run
samples exactly the sites the uninterrupted run would have.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from stamen.common.errors import ConfigError

SITE_ID_KEY = "site-id"
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_site_id(site_id: str) -> str:
    """Return ``site_id`` if it is safe as a directory name and a metric label."""
    if not isinstance(site_id, str) or not _SITE_ID.fullmatch(site_id):
        raise ConfigError(
            f"site-id {site_id!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return site_id


def site_id_from_node_config(node_config: Mapping[str, Any]) -> str:
    """The site-id of this node: configured on real nodes, derived in simulation."""
    if SITE_ID_KEY in node_config:
        return validate_site_id(str(node_config[SITE_ID_KEY]))
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id']):04d}"
    raise ConfigError("node config has neither 'site-id' nor 'partition-id': set site-id for this node")


class SiteSampler:
    """Seeded, checkpointable sampling of sites for a round."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self, site_ids: Iterable[str], fraction: float, minimum: int = 1) -> list[str]:
        """Pick ``max(minimum, ceil(fraction * n))`` sites (capped at n), sorted."""
        pool = sorted(set(site_ids))
        if not pool:
            return []
        # round() first: 0.28 * 25 is 7.000000000000001 in floating point, which ceil makes 8.
        count = min(len(pool), max(minimum, math.ceil(round(fraction * len(pool), 9))))
        chosen = self._rng.choice(len(pool), size=count, replace=False)
        return sorted(pool[i] for i in chosen)

    def sample_poisson(self, site_ids: Iterable[str], rate: float) -> list[str]:
        """Each site independently with probability ``rate`` (may be empty), sorted.

        This is the sampling that amplifies the server's client-level DP (server/dp_fedavg.py).
        """
        pool = sorted(set(site_ids))
        keep = self._rng.random(len(pool)) < rate
        return [s for s, k in zip(pool, keep, strict=True) if k]

    def state_dict(self) -> dict[str, Any]:
        """The generator's full state (JSON-serialisable)."""
        return self._rng.bit_generator.state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state."""
        self._rng.bit_generator.state = dict(state)
