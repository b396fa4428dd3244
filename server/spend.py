"""The server's floor under each site's privacy spend: a reported epsilon never goes down.

A site's epsilon is cumulative over its whole life, so a report lower than the last one
means its ledger was lost, reset or restored from an older copy (or the site lies). The
server keeps each site's highest report in the run's state (it is checkpointed and
resumed with the run) and refuses a lower one for that round: the update is not
aggregated, the refusal is logged and counted as
``stamen_sites_refused_total{reason="spend-decreased"}``, which an alert watches
(deploy/prometheus/alerts.yml, ``StamenSiteSpendDecreased``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from stamen.common.reply import SiteReply

if TYPE_CHECKING:
    from stamen.server.loop import Screened

log = logging.getLogger("stamen.server")

REASON = "spend-decreased"
#: Relative slack for float noise between two reports of the same ledger.
TOLERANCE = 1e-9


class SpendFloor:
    """The highest epsilon each site has reported in this run (a :class:`common.stateful.Stateful`)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def decreased(self, reply: SiteReply) -> bool:
        """Whether ``reply`` reports less epsilon than its site did before; else record it."""
        if "epsilon" not in reply.metrics:
            return False
        reported, last = float(reply.metrics["epsilon"]), self.last.get(reply.site_id)
        if last is not None and reported < last * (1 - TOLERANCE):
            log.warning(
                "site %s reported epsilon %.6g, below the %.6g it reported before: its privacy ledger was lost "
                "or restored; its update is refused",
                reply.site_id,
                reported,
                last,
            )
            return True
        self.last[reply.site_id] = max(reported, last or 0.0)
        return False

    def screen(self, screened: Screened) -> None:
        """Move every reply of ``screened`` whose spend decreased from ``good`` to the refused."""
        keep = []
        for reply in screened.good:
            if self.decreased(reply):
                screened.refused.append(reply.site_id)
                screened.refusals[REASON] += 1
            else:
                keep.append(reply)
        screened.good = keep

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last = {str(site): float(eps) for site, eps in state["last"].items()}
