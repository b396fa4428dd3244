"""An injected label shift, for drift experiments and tests: from round ``label-shift-round``
the sites in ``label-shift-sites`` train only on their records of the lower half of the
classes (labels < num_classes // 2).

P(y) changes while P(x | y) stays the same (a pure label shift), on a known round, so a
test can measure how fast the drift metrics see it. Held-out data is left as it was.
Richer scenarios (covariate shift, concept drift, streams) are the scenario files' job.
Applied by the simulation's fault layer (:mod:`simulations.faults.layer`) only.
"""

from __future__ import annotations

from stamen.client.data import SiteData
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError


def shifted_sites(cfg: StamenConfig) -> set[str]:
    """The site-ids named by ``label-shift-sites``."""
    return {s.strip() for s in str(cfg["label-shift-sites"]).split(",") if s.strip()}


def apply_label_shift(data: SiteData, cfg: StamenConfig, site_id: str, server_round: int, num_classes: int) -> SiteData:
    """``data`` as this site trains on it this round (unchanged unless the shift applies)."""
    start = int(cfg["label-shift-round"])
    if not start or server_round < start or site_id not in shifted_sites(cfg) or data.num_train == 0:
        return data
    keep = data.y_train < num_classes // 2
    if not bool(keep.any()):
        raise ConfigError(
            f"label shift on {site_id}: the site has no records with labels < {num_classes // 2}, nothing to train on"
        )
    return data.select_train(keep)
