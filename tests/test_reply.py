"""The reply-schema contract: every bad reply is rejected for a named reason before aggregation.

Flower's FedAvg takes the first reply as the reference and rejects a whole round when one
reply differs, so the server screens each reply on its own and aggregates only the good
ones. Replies here are real ``flwr.app.Message`` replies to real instructions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from opacus import GradSampleModule
from torch import nn

from stamen.common.convert import WRAPPER_PREFIX, arrays_to_record, load_arrays, model_to_arrays
from stamen.common.flwr_internal import ErrorCode
from stamen.common.reply import (
    EVAL_METRICS,
    REPLY_SCHEMA_VERSION,
    TRAIN_METRICS,
    RejectedReply,
    SiteReply,
    Status,
    make_reply,
    screen_reply,
)
from stamen.server.loop import screen_round, weighted_mean

Arrays = dict[str, np.ndarray]
MakeInstruction = Callable[..., Message]  # the ``instruction`` fixture (tests/conftest.py)

REFERENCE: Arrays = {
    "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "fc.bias": np.zeros(2, dtype=np.float32),
}


def update(seed: int) -> Arrays:
    """A well-formed update: the reference's keys, shapes and dtypes, other values."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in REFERENCE.items()}


def train_metrics(num_examples: float = 10, **changes: float) -> dict[str, float]:
    """Exactly the train metric keys, with plausible values."""
    metrics = {"num-examples": num_examples, "train-loss": 0.7, "grad-norm": 1.5, "lr": 0.05, "steps": 4}
    metrics.update({k.replace("_", "-"): v for k, v in changes.items()})
    return metrics


def train_reply(instruction: Message, site_id: str, arrays: Mapping[str, np.ndarray], **metrics: float) -> Message:
    """An ``ok`` train reply to ``instruction`` carrying ``arrays``."""
    return make_reply(
        instruction, site_id, Status.OK, arrays=arrays_to_record(arrays), metrics=train_metrics(**metrics)
    )


def reject_reason(msg: Message, kind: str = "train", expected_site: str | None = "site-a") -> str:
    """The reason screening gives for rejecting ``msg`` (fails the test if it passes)."""
    with pytest.raises(RejectedReply) as info:
        screen_reply(msg, kind, expected_site=expected_site, reference=REFERENCE)
    return info.value.reason


# --- the acceptance test -------------------------------------------------------------------


def test_only_the_good_reply_is_aggregated_and_the_others_are_counted(instruction: MakeInstruction) -> None:
    addressed = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-d"}
    wrong_keys = {"_module." + k: v for k, v in update(1).items()}
    nan = update(2)
    nan["fc.weight"][0, 1] = np.nan
    good = update(3)
    replies = [
        train_reply(instruction(11), "site-a", wrong_keys),  # first: Flower would take it as the reference
        train_reply(instruction(12), "site-b", nan),
        make_reply(instruction(13), "site-c", Status.REFUSED_BUDGET, reason="epsilon spent"),
        train_reply(instruction(14), "site-d", good, num_examples=25),
    ]
    assert [r.metadata.src_node_id for r in replies] == [11, 12, 13, 14]

    screened = screen_round(replies, addressed, "train", REFERENCE)

    assert [r.site_id for r in screened.good] == ["site-d"]
    assert screened.rejected == Counter({"wrong_keys": 1, "non_finite": 1})
    assert screened.refused == ["site-c"]
    assert screened.missing == 0
    mean = weighted_mean(screened.good)
    assert list(mean) == list(REFERENCE)
    for key, value in good.items():
        assert mean[key].dtype == value.dtype
        np.testing.assert_array_equal(mean[key], value)


def test_weighted_mean_weights_by_num_examples(instruction: MakeInstruction) -> None:
    a, b = update(4), update(5)
    replies = [
        train_reply(instruction(11), "site-a", a, num_examples=10),
        train_reply(instruction(12), "site-b", b, num_examples=30),
    ]
    screened = screen_round(replies, {11: "site-a", 12: "site-b"}, "train", REFERENCE)
    mean = weighted_mean(screened.good)
    for key in REFERENCE:  # 10 and 30 examples: weights 1/4 and 3/4
        np.testing.assert_allclose(mean[key], 0.25 * a[key] + 0.75 * b[key], rtol=1e-6)


# --- screening a single reply ------------------------------------------------------------


def test_good_train_reply_passes_with_its_metrics(instruction: MakeInstruction) -> None:
    msg = train_reply(instruction(), "site-a", update(0))
    reply = screen_reply(msg, "train", expected_site="site-a", reference=REFERENCE)
    assert isinstance(reply, SiteReply)
    assert (reply.site_id, reply.status) == ("site-a", Status.OK)
    assert reply.metrics == {k: float(v) for k, v in train_metrics().items()}
    assert reply.content is msg.content


def test_good_evaluate_reply_needs_no_reference(instruction: MakeInstruction) -> None:
    metrics = {"num-examples": 7, "eval-loss": 0.3, "eval-accuracy": 0.9}
    msg = make_reply(instruction(message_type=MessageType.EVALUATE), "site-a", Status.OK, metrics=metrics)
    reply = screen_reply(msg, "evaluate", expected_site="site-a")
    assert set(reply.metrics) == EVAL_METRICS
    assert reply.metrics["eval-accuracy"] == 0.9


def test_train_screening_without_reference_is_a_programming_error(instruction: MakeInstruction) -> None:
    with pytest.raises(ValueError, match="reference"):
        screen_reply(train_reply(instruction(), "site-a", update(0)), "train", expected_site="site-a")


def test_refusal_passes_screening_with_its_reason(instruction: MakeInstruction) -> None:
    msg = make_reply(instruction(), "site-a", Status.REFUSED_BUDGET, reason="epsilon spent")
    reply = screen_reply(msg, "train", expected_site="site-a", reference=REFERENCE)
    assert (reply.status, reply.reason, reply.content) == (Status.REFUSED_BUDGET, "epsilon spent", None)


def test_a_site_without_data_is_idle_neither_refused_nor_rejected(instruction: MakeInstruction) -> None:
    replies = [
        make_reply(instruction(11), "site-a", Status.NO_DATA, reason="no training data this round"),
        train_reply(instruction(12), "site-b", update(1)),
        make_reply(instruction(13), "site-c", Status.REFUSED_BUDGET, reason="spent"),
    ]
    screened = screen_round(replies, {11: "site-a", 12: "site-b", 13: "site-c"}, "train", REFERENCE)
    assert screened.idle == ["site-a"] and screened.refused == ["site-c"]
    assert [r.site_id for r in screened.good] == ["site-b"] and not screened.rejected and screened.missing == 0
    for kind in ("query", "evaluate"):
        reply = screen_reply(make_reply(instruction(), "site-a", Status.NO_DATA), kind, expected_site=None)
        assert reply.status is Status.NO_DATA and reply.metrics == {}


def _with_array(key: str, value: np.ndarray) -> Arrays:
    """A good update with one array replaced."""
    arrays = update(0)
    arrays[key] = value
    return arrays


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ({**update(0), "extra": np.zeros(1, np.float32)}, "wrong_keys"),
        ({"fc.weight": update(0)["fc.weight"]}, "wrong_keys"),
        ({WRAPPER_PREFIX + k: v for k, v in update(0).items()}, "wrong_keys"),
        (_with_array("fc.weight", np.zeros((3, 2), np.float32)), "wrong_shape"),
        (_with_array("fc.bias", np.zeros((2, 1), np.float32)), "wrong_shape"),
        (_with_array("fc.bias", np.zeros(2, np.float64)), "wrong_shape"),
        (_with_array("fc.bias", np.zeros(2, np.float16)), "wrong_shape"),
        (_with_array("fc.bias", np.array([0.0, np.inf], np.float32)), "non_finite"),
        (_with_array("fc.weight", np.full((2, 3), np.nan, np.float32)), "non_finite"),
    ],
    ids=["extra-key", "missing-key", "opacus-prefix", "transposed", "extra-dim", "float64", "float16", "inf", "nan"],
)
def test_bad_arrays_are_rejected(instruction: MakeInstruction, arrays: Arrays, reason: str) -> None:
    assert reject_reason(train_reply(instruction(), "site-a", arrays)) == reason


def test_ok_train_reply_without_arrays_is_rejected(instruction: MakeInstruction) -> None:
    msg = make_reply(instruction(), "site-a", Status.OK, metrics=train_metrics())
    assert reject_reason(msg) == "wrong_keys"


def test_second_array_record_is_rejected(instruction: MakeInstruction) -> None:
    msg = train_reply(instruction(), "site-a", update(0))
    msg.content["more"] = arrays_to_record(update(1))
    assert reject_reason(msg) == "wrong_keys"


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        (train_metrics(train_loss=float("nan")), "non_finite"),
        (train_metrics(grad_norm=float("inf")), "non_finite"),
        ({k: v for k, v in train_metrics().items() if k != "lr"}, "bad_metrics"),
        ({**train_metrics(), "accuracy": 0.5}, "bad_metrics"),
        ({"num-examples": 10, "eval-loss": 0.1, "eval-accuracy": 0.5}, "bad_metrics"),
        (train_metrics(num_examples=0), "bad_metrics"),
        (train_metrics(num_examples=-3), "bad_metrics"),
        (train_metrics(num_examples=2.5), "bad_metrics"),
    ],
    ids=[
        "nan-loss",
        "inf-norm",
        "missing-key",
        "extra-key",
        "eval-keys",
        "zero-examples",
        "negative-examples",
        "fractional-examples",
    ],
)
def test_bad_metrics_are_rejected(instruction: MakeInstruction, metrics: dict[str, float], reason: str) -> None:
    msg = make_reply(instruction(), "site-a", Status.OK, arrays=arrays_to_record(update(0)), metrics=metrics)
    assert reject_reason(msg) == reason


def test_train_metric_keys_are_the_documented_ones() -> None:
    assert {"num-examples", "lr", "steps"} == TRAIN_METRICS
    assert set(train_metrics()) == TRAIN_METRICS | {"train-loss", "grad-norm"}


def test_optional_metrics_may_be_left_out(instruction: MakeInstruction) -> None:
    metrics = {k: v for k, v in train_metrics().items() if k in TRAIN_METRICS}
    msg = make_reply(instruction(), "site-a", Status.OK, arrays=arrays_to_record(update(0)), metrics=metrics)
    assert screen_reply(msg, "train", expected_site="site-a", reference=REFERENCE).metrics == metrics


def test_privacy_report_is_all_or_nothing(instruction: MakeInstruction) -> None:
    full = {"epsilon": 1.0, "noise-multiplier": 1.1, "sample-rate": 0.1, "ledger-steps": 10, "ledger-rounds": 1}
    full["ledger-releases"] = 1
    good = make_reply(
        instruction(), "site-a", Status.OK, arrays=arrays_to_record(update(0)), metrics={**train_metrics(), **full}
    )
    assert screen_reply(good, "train", expected_site="site-a", reference=REFERENCE).metrics["epsilon"] == 1.0
    partial = {**train_metrics(), "epsilon": 1.0}
    msg = make_reply(instruction(), "site-a", Status.OK, arrays=arrays_to_record(update(0)), metrics=partial)
    assert reject_reason(msg) == "bad_metrics"


def test_missing_metrics_record_is_rejected(instruction: MakeInstruction) -> None:
    msg = train_reply(instruction(), "site-a", update(0))
    del msg.content["metrics"]
    assert reject_reason(msg) == "bad_metrics"


def test_metric_that_is_a_list_is_rejected(instruction: MakeInstruction) -> None:
    msg = train_reply(instruction(), "site-a", update(0))
    msg.content["metrics"] = MetricRecord({**train_metrics(), "lr": [0.1, 0.2]})
    assert reject_reason(msg) == "bad_metrics"


def test_site_error_is_a_client_error_with_its_reason(instruction: MakeInstruction) -> None:
    msg = make_reply(instruction(), "site-a", Status.ERROR, reason="CUDA out of memory")
    with pytest.raises(RejectedReply, match="CUDA out of memory") as info:
        screen_reply(msg, "train", expected_site="site-a", reference=REFERENCE)
    assert (info.value.reason, info.value.site_id) == ("client_error", "site-a")


def test_flower_error_message_is_a_message_error(instruction: MakeInstruction) -> None:
    msg = Message(Error(code=3, reason="ClientApp crashed"), reply_to=instruction())
    assert msg.has_error() and msg.metadata.src_node_id == 11
    assert reject_reason(msg) == "message_error"


def test_reply_without_meta_is_a_schema_error(instruction: MakeInstruction) -> None:
    content = RecordDict({"arrays": arrays_to_record(update(0)), "metrics": MetricRecord(train_metrics())})
    assert reject_reason(Message(content, reply_to=instruction())) == "schema"


@pytest.mark.parametrize(
    "meta_change",
    [{"schema": REPLY_SCHEMA_VERSION + 1}, {"schema": 0}, {"status": "done"}],
    ids=["newer-schema", "older-schema", "unknown-status"],
)
def test_meta_with_other_schema_or_status_is_rejected(
    instruction: MakeInstruction, meta_change: dict[str, object]
) -> None:
    msg = train_reply(instruction(), "site-a", update(0))
    msg.content["meta"].update(meta_change)
    assert reject_reason(msg) == "schema"


def test_meta_without_site_id_is_rejected(instruction: MakeInstruction) -> None:
    msg = train_reply(instruction(), "site-a", update(0))
    msg.content["meta"] = ConfigRecord({"schema": REPLY_SCHEMA_VERSION, "status": "ok"})
    assert reject_reason(msg) == "schema"


def test_reply_claiming_another_site_is_rejected(instruction: MakeInstruction) -> None:
    msg = train_reply(instruction(), "site-b", update(0))
    assert reject_reason(msg, expected_site="site-a") == "site"


def test_unknown_reject_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reject reason"):
        RejectedReply("bad_vibes", "detail")


# --- screening a round ------------------------------------------------------------------


def test_round_rejects_a_reply_claiming_another_site(instruction: MakeInstruction) -> None:
    replies = [train_reply(instruction(11), "site-b", update(0)), train_reply(instruction(12), "site-b", update(1))]
    screened = screen_round(replies, {11: "site-a", 12: "site-b"}, "train", REFERENCE)
    assert [r.site_id for r in screened.good] == ["site-b"]
    assert screened.rejected == Counter({"site": 1})


def test_round_rejects_a_second_reply_from_one_site(instruction: MakeInstruction) -> None:
    first, second = update(0), update(1)
    replies = [train_reply(instruction(11), "site-a", first), train_reply(instruction(11), "site-a", second)]
    screened = screen_round(replies, {11: "site-a"}, "train", REFERENCE)
    assert len(screened.good) == 1
    np.testing.assert_array_equal(weighted_mean(screened.good)["fc.weight"], first["fc.weight"])
    assert screened.rejected == Counter({"site": 1})
    assert screened.missing == 0


def test_round_rejects_a_reply_from_a_node_not_addressed(instruction: MakeInstruction) -> None:
    replies = [train_reply(instruction(99), "site-a", update(0))]
    screened = screen_round(replies, {11: "site-a"}, "train", REFERENCE)
    assert screened.good == []
    assert screened.rejected == Counter({"site": 1})
    assert screened.missing == 1


def test_round_counts_message_errors_and_missing_replies(instruction: MakeInstruction) -> None:
    replies = [
        Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ClientApp raised"), reply_to=instruction(11)),
        make_reply(instruction(12), "site-b", Status.ERROR, reason="disk full"),
        train_reply(instruction(13), "site-c", update(0)),
    ]
    addressed = {11: "site-a", 12: "site-b", 13: "site-c", 14: "site-d"}
    screened = screen_round(replies, addressed, "train", REFERENCE)
    assert [r.site_id for r in screened.good] == ["site-c"]
    assert screened.rejected == Counter({"message_error": 1, "client_error": 1})
    assert (screened.refused, screened.missing) == ([], 1)


@pytest.mark.parametrize(
    "code", [ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE]
)
def test_the_superlinks_word_that_a_site_never_answered_counts_as_missing(
    instruction: MakeInstruction, code: int
) -> None:
    """Instruction expired unanswered, reply expired, heartbeat lost: a failed site, not a rejected reply."""
    replies = [Message(Error(code=code, reason="unavailable"), reply_to=instruction(11))]
    screened = screen_round(replies, {11: "site-a", 12: "site-b"}, "train", REFERENCE)
    assert screened.rejected == Counter() and screened.good == []
    assert screened.missing == 2


# --- canonical keys under Opacus ----------------------------------------------------------


class Tiny(nn.Module):
    """Two layers, so the wrapped state dict has several prefixed keys."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def test_opacus_wrapped_model_has_canonical_keys() -> None:
    torch.manual_seed(0)
    model = Tiny()
    wrapped = GradSampleModule(model)
    assert all(k.startswith(WRAPPER_PREFIX) for k in wrapped.state_dict())  # what the conversion must undo
    plain, canonical = model_to_arrays(model), model_to_arrays(wrapped)
    assert list(canonical) == list(plain) == ["fc.weight", "fc.bias", "head.weight", "head.bias"]
    assert not any(k.startswith(WRAPPER_PREFIX) for k in canonical)
    for key in plain:
        np.testing.assert_array_equal(canonical[key], plain[key])


def test_load_arrays_into_wrapped_model() -> None:
    torch.manual_seed(0)
    wrapped = GradSampleModule(Tiny())
    arrays = {k: np.full_like(v, i + 1.0) for i, (k, v) in enumerate(model_to_arrays(Tiny()).items())}
    load_arrays(wrapped, arrays)
    loaded = model_to_arrays(wrapped)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    with pytest.raises(RuntimeError):  # strict: a prefixed or partial state is refused
        load_arrays(wrapped, {WRAPPER_PREFIX + k: v for k, v in arrays.items()})


def test_update_from_wrapped_model_passes_screening(instruction: MakeInstruction) -> None:
    torch.manual_seed(0)
    reference = model_to_arrays(Tiny())
    msg = make_reply(
        instruction(),
        "site-a",
        Status.OK,
        arrays=arrays_to_record(model_to_arrays(GradSampleModule(Tiny()))),
        metrics=train_metrics(),
    )
    reply = screen_reply(msg, "train", expected_site="site-a", reference=reference)
    assert list(reply.content["arrays"].keys()) == list(reference)
