"""The privacy boundary: what a DP site sends is accounted for, unless the operator opts in.

The ClientApp's handlers run in-process on real Flower messages and contexts, with a real
state store; every metric key of every reply is checked against the boundary table
(``common/boundary.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from stamen.client import app as client_app
from stamen.client.data import load_site_data
from stamen.client.dp import dp_schedule
from stamen.client.ledger import PrivacyLedger
from stamen.common.boundary import FIELDS, Treatment, unaccounted
from stamen.common.config import StamenConfig
from stamen.common.convert import arrays_to_record, model_to_arrays
from stamen.common.instruction import schema_header
from stamen.common.models import build_model
from stamen.common.reply import Status, screen_reply
from stamen.common.state import SiteStore

MakeInstruction = Callable[..., Message]
NODE = {"partition-id": 1, "num-partitions": 3}


def _run_config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    cfg = {
        "dataset": "digits",
        "dp": True,
        "noise-multiplier": 1.0,
        "num-server-rounds": 3,
        "min-partition-size": 10,
        **changes,
    }
    return {
        **StamenConfig.from_mapping(cfg).as_dict(),
        "state-dir": str(tmp_path / "sites"),
        "server-round": 1,
        "model-name": "cnn8",
        "model-input-shape": [1, 8, 8],
        "model-num-classes": 10,
        **schema_header(),
    }


def _message(instruction: MakeInstruction, kind: str, config: dict[str, Any]) -> Message:
    msg = instruction(message_type=kind)
    content = RecordDict({"config": ConfigRecord(config)})
    if kind != MessageType.QUERY:
        content["arrays"] = arrays_to_record(model_to_arrays(build_model("cnn8", (1, 8, 8), 10, seed=0)))
    msg.content = content
    return msg


def _context(node: dict[str, Any] | None = None) -> Context:
    return Context(run_id=1, node_id=11, node_config=dict(node or NODE), state=RecordDict(), run_config={})


def _metrics(reply: Message) -> dict[str, float]:
    return dict(reply.content.metric_records["metrics"])


def test_dp_site_with_defaults_sends_only_accounted_fields(tmp_path: Path, instruction: MakeInstruction) -> None:
    config = _run_config(tmp_path)
    reply = client_app.train(_message(instruction, MessageType.TRAIN, config), _context())
    metrics = _metrics(reply)
    assert reply.content.config_records["meta"]["status"] == Status.OK
    assert unaccounted("train", set(metrics)) == set()
    assert "train-loss" not in metrics

    # the count it sent is the charged release, and the schedule follows it, not the exact size
    store = SiteStore(tmp_path / "sites", "site-0001")
    ledger = PrivacyLedger.load(store)
    assert ledger.releases == (10.0, 10.0, 10.0)  # example count, label histogram, feature sketch (drift)
    sent = metrics["num-examples"]
    assert sent == max(1, round(store.read_json("releases")["num-examples"]["values"][0]))
    exact = load_site_data(NODE, StamenConfig.from_mapping({"dataset": "digits", "min-partition-size": 10})).num_train
    assert metrics["sample-rate"] == dp_schedule(int(sent), StamenConfig.from_mapping({}))[0]
    assert abs(sent - exact) < 6 * 10.0  # noise of std 10 around the exact count

    # a second round of the same data re-sends the cached count: no new charge
    again = client_app.train(_message(instruction, MessageType.TRAIN, {**config, "server-round": 2}), _context())
    assert _metrics(again)["num-examples"] == sent
    assert PrivacyLedger.load(store).releases == (10.0, 10.0, 10.0)
    assert PrivacyLedger.load(store).rounds == 2


def test_dp_site_sends_nothing_record_derived_in_handshake_or_evaluation(
    tmp_path: Path, instruction: MakeInstruction
) -> None:
    config = _run_config(tmp_path)
    query = client_app.query(_message(instruction, MessageType.QUERY, config), _context())
    assert _metrics(query) == {}
    assert screen_reply(query, "query", expected_site=None).site_id == "site-0001"
    evaluation = client_app.evaluate(_message(instruction, MessageType.EVALUATE, config), _context())
    meta = evaluation.content.config_records["meta"]
    assert meta["status"] == Status.ERROR and "dp-public-stats" in meta["reason"]
    assert _metrics(evaluation) == {}


@pytest.mark.parametrize("where", ["run", "node"])
def test_public_stats_are_sent_only_by_opt_in(tmp_path: Path, instruction: MakeInstruction, where: str) -> None:
    config = _run_config(tmp_path, **({"dp-public-stats": True} if where == "run" else {}))
    node = {**NODE, "dp-public-stats": "true"} if where == "node" else NODE
    metrics = _metrics(client_app.train(_message(instruction, MessageType.TRAIN, config), _context(node)))
    assert unaccounted("train", set(metrics)) == {"train-loss"}
    evaluation = client_app.evaluate(_message(instruction, MessageType.EVALUATE, config), _context(node))
    assert set(_metrics(evaluation)) == {"num-examples", "eval-loss", "eval-accuracy"}


def test_release_that_would_pass_the_budget_is_refused_and_spends_nothing(
    tmp_path: Path, instruction: MakeInstruction
) -> None:
    config = _run_config(tmp_path, **{"epsilon-budget": 0.05})
    reply = client_app.train(_message(instruction, MessageType.TRAIN, config), _context())
    meta = reply.content.config_records["meta"]
    assert meta["status"] == Status.REFUSED_BUDGET and meta["code"] == meta["reason"] == "statistics-release"
    assert PrivacyLedger.load(SiteStore(tmp_path / "sites", "site-0001")).releases == ()


def test_non_dp_site_sends_exact_statistics(tmp_path: Path, instruction: MakeInstruction) -> None:
    config = _run_config(tmp_path, dp=False)
    metrics = _metrics(client_app.train(_message(instruction, MessageType.TRAIN, config), _context()))
    exact = load_site_data(NODE, StamenConfig.from_mapping({"dataset": "digits", "min-partition-size": 10})).num_train
    assert metrics["num-examples"] == exact and "train-loss" in metrics


def test_every_boundary_field_names_its_treatment() -> None:
    assert all(isinstance(f.treatment, Treatment) and f.why for f in FIELDS)
    assert np.unique([(f.name, k) for f in FIELDS for k in f.kinds], axis=0).shape[0] == sum(
        len(f.kinds) for f in FIELDS
    )
