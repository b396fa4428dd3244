"""A reply lost on the way leaves a record the site reconciles (issue 17, finding 4).

A DP site charges its ledger before its reply leaves. The server's next train instruction
tells the site which of its numbered updates arrived (server/grid_rounds.Receipts); the
site's record (client/receipts.py) then counts the lost ones, charged or not, and reports
the count with every reply. Driven through the real ClientApp ``train`` in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from clientdrive import NODE_ID, OneSite

from stamen.client import app as client_app
from stamen.client.receipts import ENTRY, reconcile, record_sent
from stamen.common.config import StamenConfig
from stamen.common.reply import screen_reply
from stamen.common.state import SiteStore
from stamen.server.grid_rounds import Receipts

pytestmark = pytest.mark.usefixtures("serverapp_identity")
SITE = "site-0000"


def _site(tmp_path: Path) -> OneSite:
    cfg = StamenConfig.from_mapping({"dataset": "digits", "dp": True, "noise-multiplier": 1.0})
    node: dict[str, Any] = {"site-id": SITE, "state-dir": str(tmp_path / "state"), "partition-id": 0}
    return OneSite(cfg, node | {"num-partitions": 2}, "logreg", (1, 8, 8), 10)


def _round(site: OneSite, receipts: Receipts, server_round: int, *, lost: bool = False) -> dict[str, float]:
    """One train round through the real ClientApp; ``lost``: the reply never reaches the server."""
    msg = site._message("train", server_round)
    receipts.stamp(msg.content.config_records["config"], SITE, server_round)
    reply = client_app.train(msg, site.context)
    if not lost:
        receipts.record(server_round, [reply], {NODE_ID: SITE})
    return screen_reply(reply, "train", expected_site=SITE, reference=site.arrays).metrics


def test_a_lost_charged_reply_is_counted_by_the_site_after_the_next_instruction(tmp_path: Path) -> None:
    site, receipts = _site(tmp_path), Receipts()
    first = _round(site, receipts, 1)
    assert first["update-id"] == 1 and first["updates-lost"] == 0
    _round(site, receipts, 2, lost=True)  # charged on the site, never received
    third = _round(site, receipts, 3)
    assert (third["updates-lost"], third["updates-lost-charged"]) == (1, 1)
    record = SiteStore(str(tmp_path / "state"), SITE).read_json(ENTRY)
    assert (record["received"], record["lost"], record["lost_charged"]) == (1, 1, 1)
    assert [(e["id"], e["round"], e["charged"]) for e in record["pending"]] == [(3, 3, True)]
    # The next instruction settles round 3 as received; the lost count stays.
    fourth = _round(site, receipts, 4)
    assert fourth["update-id"] == 4 and fourth["updates-lost"] == 1
    assert SiteStore(str(tmp_path / "state"), SITE).read_json(ENTRY)["received"] == 2


def test_a_server_vouches_only_for_rounds_it_ran(tmp_path: Path) -> None:
    """A resumed server (receipts from round 3 on) says nothing about round 2: it stays pending, not lost."""
    store = SiteStore(str(tmp_path), SITE)
    record_sent(store, 2, charged=True)
    record_sent(store, 3, charged=True)
    reconcile(store, 4, 3, [])
    record = store.read_json(ENTRY)
    assert record["lost"] == 1 and [e["round"] for e in record["pending"]] == [2]
    reconcile(store, 5, None, [])  # an instruction without receipts settles nothing
    assert store.read_json(ENTRY)["pending"] == record["pending"]
    config: dict[str, Any] = {}
    resumed = Receipts()
    resumed.stamp(config, SITE, 3)
    resumed.stamp(config, SITE, 40)
    assert config == {"receipts-from-round": 40 - resumed.window}
