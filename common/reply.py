"""The reply schema: what a site sends back, and the check every reply passes first.

A reply's ``RecordDict`` holds three records:

- ``meta`` (ConfigRecord): ``schema`` (this module's version), ``status`` (a
  :class:`Status`), ``site-id`` and, for refusals, idle sites and errors, a ``reason``;
  refusals and idle sites also a ``code`` (:data:`REFUSAL_CODES`, :data:`NO_DATA_CODES`),
  which is all their ``reason`` says: no free text that could depend on records leaves a site;
- ``arrays`` (ArrayRecord, train replies with status ``ok`` only): the model, keyed by
  canonical parameter names (never Opacus's ``_module.`` prefix);
- ``metrics`` (MetricRecord): the required keys of the message kind, and optional keys;
  every key is a field of the privacy-boundary table (:mod:`common.boundary`), and a DP
  site's train reply carries all of :data:`PRIVACY_METRICS` or none.

The server screens every reply with :func:`screen_reply` before any Flower aggregation
code sees it, because Flower's ``FedAvg`` rejects a whole round when one reply's keys
differ and takes the first reply as the reference. Each rejection has a reason from
:data:`REJECT_REASONS` (a bounded set, so it can label a metric).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, get_args

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from stamen.common.boundary import metric_keys

REPLY_SCHEMA_VERSION = 1


class Status(StrEnum):
    """What a site did with an instruction."""

    OK = "ok"
    REFUSED_BUDGET = "refused_budget"
    # The site holds no data for this message (a quiet or not yet joined site, every shard
    # quarantined): nothing to train on or evaluate. Counted as idle, never an error.
    NO_DATA = "no_data"
    ERROR = "error"


# Every metric key a reply may carry is a field of the privacy-boundary table.
TRAIN_METRICS = metric_keys("train", required=True)
TRAIN_OPTIONAL = metric_keys("train", required=False)
# Sent in addition by a DP site: its cumulative epsilon and every input an auditor needs to
# recompute it (the ledger's totals and this round's noise and sample rate).
PRIVACY_METRICS = frozenset(
    {"epsilon", "noise-multiplier", "sample-rate", "ledger-steps", "ledger-rounds", "ledger-releases"}
)
EVAL_METRICS = metric_keys("evaluate", required=True)
QUERY_METRICS = metric_keys("query", required=True)
METRICS_BY_KIND = {"train": TRAIN_METRICS, "evaluate": EVAL_METRICS, "query": QUERY_METRICS}

#: Why a site refuses a round: a release of statistics, the DP-SGD round itself, or
#: (``per-shard``) every shard it holds would pass the budget; the ``policy-*`` codes: the
#: instruction asks for less privacy than the site's policy or its ledger allows;
#: ``ledger-tampered``: its ledger is missing, edited or older than its other records.
RefusalCode = Literal[
    "statistics-release",
    "training-round",
    "every-shard-spent",
    "policy-dp-off",
    "policy-delta",
    "policy-delta-vs-n",
    "policy-noise",
    "policy-sample-rate",
    "policy-accountant",
    "policy-switch",
    "model-not-allowed",  # a package.module:Class model the site's site-models does not list
    "ledger-tampered",
    "identity",  # server side: a node answered for a site-id bound to another key (server/sites.py)
    "policy-no-budget",
]

#: The ``meta`` ``code`` values the server keeps (a bounded set, so it can label a metric);
#: ``spend-decreased`` is the server's own (a site reported less epsilon than before);
#: ``unknown`` stands for any other value.
REFUSAL_CODES = (*get_args(RefusalCode), "spend-decreased", "unknown")

#: Why a site has nothing to do (``no_data``): the whole of what such a reply says.
NoDataCode = Literal["no-training-data", "no-holdout-data"]
NO_DATA_CODES = (*get_args(NoDataCode), "unknown")

#: The ``reason`` of an error reply from a DP site once it has read its records: the
#: exception's type only (a bounded set); its text may name counts or shards and stays in
#: the site's own log.
DP_ERROR_REASON = "{kind} on a DP site (the details are in the site's own log)"

REJECT_REASONS = (
    "message_error",  # Flower delivered an error instead of content (crash, timeout)
    "schema",  # missing meta, or another reply-schema version
    "site",  # unknown, mismatched or duplicate site-id
    "client_error",  # the site reported status 'error'
    "wrong_keys",  # array names differ from the global model's
    "wrong_shape",  # an array's shape or dtype differs from the global model's
    "non_finite",  # NaN or inf in arrays or metrics
    "bad_metrics",  # missing, extra or out-of-range metric values
    "norm_bound",  # the update is longer than update-norm-bound (update-norm-action = reject)
    "outlier",  # the update norm is above the round's median + outlier-mad-k * MAD
)


@dataclass
class SiteReply:
    """A reply that passed screening."""

    site_id: str
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    content: RecordDict | None = None
    reason: str = ""
    code: str = ""  # a refusal's code (one of REFUSAL_CODES) or an idle site's (NO_DATA_CODES)


class RejectedReply(Exception):
    """A reply that failed screening; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str, site_id: str | None = None) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.site_id = site_id


def make_reply(
    instruction: Message,
    site_id: str,
    status: Status,
    *,
    arrays: ArrayRecord | None = None,
    metrics: Mapping[str, float] | None = None,
    reason: str = "",
    code: str = "",
    proof: Mapping[str, str] | None = None,
) -> Message:
    """Build a schema-conforming reply to ``instruction`` (``code``: a refusal's, from :data:`REFUSAL_CODES`;
    ``proof``: the handshake's identity proof, common/identity.prove_identity)."""
    meta = {"schema": REPLY_SCHEMA_VERSION, "status": status.value, "site-id": site_id, "reason": reason}
    if code:
        meta["code"] = code
    meta.update(proof or {})
    content = RecordDict({"meta": ConfigRecord(meta)})
    if arrays is not None:
        content["arrays"] = arrays
    content["metrics"] = MetricRecord({k: float(v) for k, v in (metrics or {}).items()})
    return Message(content=content, reply_to=instruction)


def _meta(msg: Message) -> tuple[str, Status, str]:
    if msg.has_error():
        raise RejectedReply("message_error", f"error reply: {msg.error.reason}")
    meta = msg.content.config_records.get("meta")
    if meta is None:
        raise RejectedReply("schema", "reply has no 'meta' record")
    if meta.get("schema") != REPLY_SCHEMA_VERSION:
        raise RejectedReply("schema", f"reply schema {meta.get('schema')!r}, expected {REPLY_SCHEMA_VERSION}")
    site_id = meta.get("site-id")
    if not isinstance(site_id, str):
        raise RejectedReply("schema", "reply has no site-id")
    try:
        status = Status(meta.get("status"))
    except ValueError:
        raise RejectedReply("schema", f"unknown status {meta.get('status')!r}", site_id) from None
    return site_id, status, str(meta.get("reason", ""))


def _metrics(msg: Message, kind: str, site_id: str) -> dict[str, float]:
    record = msg.content.metric_records.get("metrics")
    if record is None:
        raise RejectedReply("bad_metrics", "no 'metrics' record", site_id)
    keys = set(record.keys())
    required, allowed = metric_keys(kind, required=True), metric_keys(kind)
    if not required <= keys <= allowed:
        raise RejectedReply(
            "bad_metrics",
            f"metric keys: missing {sorted(required - keys)}, "
            f"not in the privacy-boundary table {sorted(keys - allowed)}",
            site_id,
        )
    if kind == "train" and keys & PRIVACY_METRICS and not keys >= PRIVACY_METRICS:
        raise RejectedReply("bad_metrics", f"partial privacy report: missing {sorted(PRIVACY_METRICS - keys)}", site_id)
    values: dict[str, float] = {}
    for key, value in record.items():
        if not isinstance(value, (int, float)):
            raise RejectedReply("bad_metrics", f"metric {key!r} is not a number", site_id)
        if not math.isfinite(value):
            raise RejectedReply("non_finite", f"metric {key!r} is {value}", site_id)
        values[key] = float(value)
    if "num-examples" in values and (values["num-examples"] <= 0 or not values["num-examples"].is_integer()):
        raise RejectedReply("bad_metrics", f"num-examples {values['num-examples']} is not a positive integer", site_id)
    return values


def check_update_arrays(msg: Message, reference: Mapping[str, np.ndarray], site_id: str) -> None:
    """Reject a reply whose single 'arrays' record does not match ``reference`` key for key, in shape,
    dtype and finiteness (a malformed or poisoned update never reaches aggregation)."""
    arrays = msg.content.array_records.get("arrays")
    if arrays is None:
        raise RejectedReply("wrong_keys", "no 'arrays' record", site_id)
    if len(msg.content.array_records) != 1:
        raise RejectedReply("wrong_keys", "more than one ArrayRecord", site_id)
    if list(arrays.keys()) != list(reference.keys()):
        missing = sorted(set(reference) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(reference))
        raise RejectedReply("wrong_keys", f"missing {missing[:3]}, unexpected {extra[:3]}", site_id)
    for key, ref in reference.items():
        arr = arrays[key].numpy()
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise RejectedReply(
                "wrong_shape", f"{key}: {arr.dtype}{list(arr.shape)} != {ref.dtype}{list(ref.shape)}", site_id
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise RejectedReply("non_finite", f"{key} has NaN or inf", site_id)


def screen_reply(
    msg: Message,
    kind: str,
    *,
    expected_site: str | None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> SiteReply:
    """Check one reply against the schema; raise :class:`RejectedReply` if it fails.

    ``expected_site`` is the site-id the server addressed (None during the identity
    handshake); ``reference`` is the global model the update must match (train only).
    Refusals and idle sites (no data) pass screening: they are counted, not rejected.
    """
    site_id, status, reason = _meta(msg)
    if expected_site is not None and site_id != expected_site:
        raise RejectedReply("site", f"reply claims site {site_id!r}, sent to {expected_site!r}", site_id)
    if status is Status.ERROR:
        raise RejectedReply("client_error", reason or "site reported an error", site_id)
    if status in (Status.REFUSED_BUDGET, Status.NO_DATA):
        code = str(msg.content.config_records["meta"].get("code", "unknown"))
        known = REFUSAL_CODES if status is Status.REFUSED_BUDGET else NO_DATA_CODES
        return SiteReply(site_id, status, reason=reason, code=code if code in known else "unknown")
    metrics = _metrics(msg, kind, site_id)
    if kind == "train":
        if reference is None:
            raise ValueError("screening a train reply needs the reference model")
        check_update_arrays(msg, reference, site_id)
    return SiteReply(site_id, status, metrics=metrics, content=msg.content)
