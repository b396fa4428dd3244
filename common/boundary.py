"""The privacy boundary: every value a site sends, and why it may leave a DP site.

ε from DP-SGD covers the model update only. Everything else a site sends is listed here
with its treatment on a DP site; the reply screen (:mod:`common.reply`) accepts no metric
that is not in this table, and the README's privacy-boundary table is generated from it
(a test keeps them equal). Treatments:

- ``config``: a function of the run config and the round alone; nothing record-derived.
- ``dp-sgd``: the DP-SGD mechanism's output, or computed from it alone (post-processing).
- ``release``: a Gaussian release of record-derived statistics, charged to the site's
  privacy ledger (:mod:`client.release`), or computed from such releases alone.
- ``ledger``: the site's privacy accounting, computed from config and releases alone.
- ``opt-in``: record-derived and not noised; a DP site sends it only when the operator
  declares it public (``dp-public-stats = true``).

With DP off there is no privacy claim, and every field is sent as measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Treatment(StrEnum):
    """How a field that leaves a DP site is accounted for."""

    CONFIG = "config"
    DP_SGD = "dp-sgd"
    RELEASE = "release"
    LEDGER = "ledger"
    OPT_IN = "opt-in"


# Treatments that keep a DP site's guarantee without any opt-in by the operator.
ACCOUNTED = frozenset({Treatment.CONFIG, Treatment.DP_SGD, Treatment.RELEASE, Treatment.LEDGER})


@dataclass(frozen=True)
class Field:
    """One value a site sends: in which replies, whether required, and its DP treatment."""

    name: str
    kinds: tuple[str, ...]
    required: bool
    treatment: Treatment
    why: str


FIELDS: tuple[Field, ...] = (
    Field(
        "arrays",
        ("train",),
        True,
        Treatment.DP_SGD,
        "the locally trained model: per-sample clipping and Gaussian noise by Opacus, charged per step",
    ),
    Field(
        "num-examples",
        ("train",),
        True,
        Treatment.RELEASE,
        "training-set size, the aggregation weight: a noisy count charged once per data version",
    ),
    Field(
        "num-examples",
        ("query",),
        False,
        Treatment.OPT_IN,
        "training-set size in the identity handshake: sent only with DP off",
    ),
    Field(
        "steps",
        ("train",),
        True,
        Treatment.RELEASE,
        "noisy steps taken; the Poisson schedule is computed from the released count",
    ),
    Field("lr", ("train",), True, Treatment.CONFIG, "the schedule's learning rate at the round's last step"),
    Field(
        "grad-norm",
        ("train",),
        False,
        Treatment.DP_SGD,
        "mean norm of the noised gradients (with DP off: of the clipped raw gradients)",
    ),
    Field("train-loss", ("train",), False, Treatment.OPT_IN, "mean training loss on raw records"),
    Field("epsilon", ("train",), False, Treatment.LEDGER, "cumulative epsilon of the site's ledger at the run's delta"),
    Field("noise-multiplier", ("train",), False, Treatment.LEDGER, "this round's DP-SGD noise multiplier"),
    Field("sample-rate", ("train",), False, Treatment.RELEASE, "this round's Poisson rate, from the released count"),
    Field("ledger-steps", ("train",), False, Treatment.LEDGER, "noisy steps in the site's whole ledger"),
    Field("ledger-rounds", ("train",), False, Treatment.LEDGER, "DP rounds in the site's whole ledger"),
    Field(
        "ledger-releases",
        ("train",),
        False,
        Treatment.LEDGER,
        "charged releases of statistics in the site's whole ledger (each at dp-stats-noise)",
    ),
    Field(
        "ghost-clipping",
        ("train",),
        False,
        Treatment.CONFIG,
        "1 when the round clipped by Opacus's ghost clipping, 0 by its hooks: from the config and the device",
    ),
    Field("update-id", ("train",), False, Treatment.LEDGER, "the site's own number of this update (client/receipts)"),
    Field(
        "updates-lost",
        ("train",),
        False,
        Treatment.LEDGER,
        "updates the site sent that the server's receipts show never arrived",
    ),
    Field("updates-lost-charged", ("train",), False, Treatment.LEDGER, "of those, updates its ledger was charged for"),
    Field(
        "drift-label-psi",
        ("train",),
        False,
        Treatment.RELEASE,
        "label PSI against the site's reference window, computed from charged label-histogram releases",
    ),
    Field(
        "drift-label-js",
        ("train",),
        False,
        Treatment.RELEASE,
        "label Jensen-Shannon divergence against the reference, from the same releases",
    ),
    Field(
        "drift-feature-psi",
        ("train",),
        False,
        Treatment.RELEASE,
        "feature-sketch PSI against the reference, computed from charged feature-sketch releases",
    ),
    Field(
        "num-examples",
        ("evaluate",),
        True,
        Treatment.OPT_IN,
        "held-out set size (a DP site takes part in federated evaluation only with dp-public-stats)",
    ),
    Field("eval-loss", ("evaluate",), True, Treatment.OPT_IN, "loss of the global model on held-out records"),
    Field("eval-accuracy", ("evaluate",), True, Treatment.OPT_IN, "accuracy of the global model on held-out records"),
)

FIELD_BY_KEY = {(kind, f.name): f for f in FIELDS for kind in f.kinds}


def metric_keys(kind: str, *, required: bool | None = None) -> frozenset[str]:
    """Metric keys of a reply of ``kind`` (``required``: only required / only optional ones)."""
    return frozenset(
        f.name
        for f in FIELDS
        if kind in f.kinds and f.name != "arrays" and (required is None or f.required == required)
    )


def unaccounted(kind: str, keys: set[str] | frozenset[str]) -> set[str]:
    """The keys of a ``kind`` reply that a DP site may send only by the operator's opt-in (or unknown ones)."""
    return {k for k in keys if (kind, k) not in FIELD_BY_KEY or FIELD_BY_KEY[kind, k].treatment not in ACCOUNTED}


def markdown_table() -> str:
    """The README's privacy-boundary table."""
    lines = ["| field | sent in | on a DP site | why |", "|---|---|---|---|"]
    for f in FIELDS:
        lines.append(f"| `{f.name}` | {', '.join(f.kinds)} | {f.treatment.value} | {f.why} |")
    return "\n".join(lines)
