"""What a DP site's non-update replies say: a fixed code, never text that could depend on its records.

A refusal's text names epsilon figures and shards, an error's may name counts, shapes or
files: both stay in the site's own log. Whether a site has any record to train on is
public (SECURITY.md): its ``no_data`` reply is a fixed code and charges nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from clientdrive import OneSite, site_terms

from stamen.client.data import SiteData
from stamen.client.ledger import LEDGER_ENTRY
from stamen.client.replay import ReplayBuffer
from stamen.client.view import SiteView
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.reply import NO_DATA_CODES, REFUSAL_CODES, RejectedReply
from stamen.common.state import SiteStore

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def _site(tmp_path: Path, rows: int, **raw: object) -> OneSite:
    """A DP site whose data directory holds ``rows`` digits (none: an empty directory)."""
    cfg = StamenConfig.from_mapping(
        {"dataset": "digits", "dp": True, "noise-multiplier": 1.0, "lr-schedule": "constant", **raw}
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    if rows:
        data = load_dataset("digits")
        np.savez(inbox / "a.npz", x=data.x_train[:rows], y=data.y_train[:rows])
    node = {"site-id": "node-a", "data-dir": str(inbox), "state-dir": str(tmp_path / "state"), **site_terms(cfg)}
    return OneSite(cfg, node, "logreg", (1, 8, 8), 10)


def test_a_refusal_sends_its_code_only_and_logs_the_figures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = _site(tmp_path, 200, **{"epsilon-budget": 1.0})
    with caplog.at_level(logging.INFO, logger="stamen.client"):
        reply = site.train(1)
    assert reply["status"] == "refused_budget"
    assert reply["reason"] == reply["code"] == "training-round" and reply["code"] in REFUSAL_CODES
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("would bring epsilon from" in m for m in logged), logged


def test_an_empty_dp_site_answers_a_fixed_no_data_code_and_is_not_charged(tmp_path: Path) -> None:
    """The documented choice: that a DP site holds no record is public; the reply says that and nothing else."""
    site = _site(tmp_path, 0)
    reply = site.train(1)
    assert reply == {"status": "no_data", "reason": "no-training-data", "code": "no-training-data"}
    assert reply["code"] in NO_DATA_CODES
    assert not list((tmp_path / "state" / "node-a").glob(f"{LEDGER_ENTRY}*.json")), "nothing charged"


def test_a_dp_sites_error_reading_its_records_names_its_type_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replay buffer of another shape: the StateError's text (the shapes) stays in the site's log."""
    store = SiteStore(tmp_path / "state", "node-a")
    foreign = SiteData(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), torch.zeros(0, 5), torch.zeros(0))
    buffer = ReplayBuffer(store, 3, 3)
    buffer.offer(SiteView.single_shard(foreign, np.arange(1000, 1003)))
    buffer.save()
    replay = {"replay-size": 3, "replay-horizon": 3}
    with caplog.at_level(logging.ERROR, logger="stamen.client"), pytest.raises(RejectedReply) as dp_error:
        _site(tmp_path, 200, **replay).train(1)
    assert dp_error.value.detail == "StateError on a DP site (the details are in the site's own log)"
    assert any("holds examples of shape" in r.getMessage() for r in caplog.records)
    with pytest.raises(RejectedReply, match="holds examples of shape"):  # a non-DP site's error keeps its text
        _site(tmp_path, 200, dp=False, **replay).train(2)
