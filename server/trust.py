"""Bounded trust in what sites report, and the aggregation rule under the server optimizer.

A site's self-reported example count sets its weight and its update is whatever it sends,
so one site could dominate a plain weighted mean. Three bounds, applied to the replies that
passed :func:`common.reply.screen_reply`:

- ``update-norm-bound``: an update (site model minus global model) longer than the bound is
  clipped to it, or rejected (``norm_bound``) with ``update-norm-action = reject``;
- ``outlier-mad-k``: an update whose norm exceeds the round's median norm + k * MAD (median
  absolute deviation, a robust spread) is rejected (``outlier``);
- ``max-site-weight`` / ``equal-weights``: no site's share of the total weight exceeds the cap.

Then ``aggregation`` picks the rule whose result the server optimizer steps towards (so
FedAvgM momentum is applied to the robust aggregate, with the optimizer's own state): the
weighted mean, the coordinate-wise median, the trimmed mean, Krum or Multi-Krum. Median,
trimmed mean and Krum are shift-invariant, so applying them to site models is the same as
applying them to updates.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from flwr.app import MetricRecord, RecordDict

from stamen.common.config import StamenConfig
from stamen.common.convert import arrays_to_record, record_to_arrays
from stamen.common.flwr_internal import aggregate_arrayrecords, select_multikrum, trim_mean
from stamen.common.reply import SiteReply

log = logging.getLogger("stamen.server")

Arrays = dict[str, np.ndarray]
RULES = ("mean", "median", "trimmed-mean", "krum", "multikrum")


def update_norm(current: Arrays, model: Arrays) -> float:
    """L2 norm of a site's update over the floating-point arrays (integer buffers are counters)."""
    total = 0.0
    for key, ref in current.items():
        if np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum(np.square(model[key].astype(np.float64) - ref.astype(np.float64))))
    return total**0.5


def clip_update(current: Arrays, model: Arrays, bound: float) -> Arrays:
    """``model`` with its update scaled down to norm ``bound`` (unchanged when already within it)."""
    norm = update_norm(current, model)
    if norm <= bound:
        return model
    scale = bound / norm
    return {
        k: (ref + (model[k] - ref) * scale).astype(ref.dtype) if np.issubdtype(ref.dtype, np.floating) else model[k]
        for k, ref in current.items()
    }


def capped_weights(weights: list[float], max_share: float) -> list[float]:
    """Weights rescaled so that none exceeds ``max_share`` of their sum (water-filling).

    The largest weights are lowered to a common level ``max_share * S`` where ``S`` is the new
    total; when the cap cannot be met (``max_share * n < 1``) every site gets the same weight.
    """
    n = len(weights)
    if n == 0 or max_share <= 0 or max_share >= 1:
        return list(weights)
    if max_share * n <= 1:
        return [1.0] * n
    order = sorted(range(n), key=lambda i: weights[i], reverse=True)
    capped = 0
    while capped < n:
        rest = sum(weights[i] for i in order[capped:])
        total = rest / (1 - capped * max_share)
        if weights[order[capped]] <= max_share * total:
            break
        capped += 1
    level = max_share * total
    out = list(weights)
    for i in order[:capped]:
        out[i] = level
    return out


def median_of(models: list[Arrays]) -> Arrays:
    """Coordinate-wise median. Flower's FedMedian computes it only inside its
    ``aggregate_train`` method (which also pops the arrays out of the replies), so the one
    numpy call is made here."""
    return {k: np.median(np.stack([m[k] for m in models]), axis=0).astype(models[0][k].dtype) for k in models[0]}


@dataclass(frozen=True)
class TrustPolicy:
    """The bounds and rule of one run, from its config."""

    norm_bound: float = 0.0
    norm_action: str = "clip"
    outlier_k: float = 0.0
    max_share: float = 0.0
    equal_weights: bool = False
    rule: str = "mean"
    trim_fraction: float = 0.2
    byzantine: int = 1

    @classmethod
    def from_config(cls, cfg: StamenConfig) -> TrustPolicy:
        return cls(
            norm_bound=float(cfg["update-norm-bound"]),
            norm_action=str(cfg["update-norm-action"]),
            outlier_k=float(cfg["outlier-mad-k"]),
            max_share=float(cfg["max-site-weight"]),
            equal_weights=bool(cfg["equal-weights"]),
            rule=str(cfg["aggregation"]),
            trim_fraction=float(cfg["trim-fraction"]),
            byzantine=int(cfg["byzantine-sites"]),
        )

    def screen(self, current: Arrays, good: list[SiteReply], rejected: Counter[str]) -> list[SiteReply]:
        """The replies kept after the norm bound and the outlier test; rejections are counted
        in ``rejected`` by reason, clipped updates replace the reply's arrays."""
        if self.norm_bound <= 0 and self.outlier_k <= 0:
            return list(good)
        kept: list[SiteReply] = []
        norms: list[float] = []
        for reply in good:
            if reply.content is None:
                continue
            model = record_to_arrays(reply.content["arrays"])
            norm = update_norm(current, model)
            if self.norm_bound > 0 and norm > self.norm_bound:
                if self.norm_action == "reject":
                    rejected["norm_bound"] += 1
                    log.warning(
                        "update of %s rejected (norm_bound): norm %.4g > %.4g", reply.site_id, norm, self.norm_bound
                    )
                    continue
                reply.content["arrays"] = arrays_to_record(clip_update(current, model, self.norm_bound))
                norm = self.norm_bound
            kept.append(reply)
            norms.append(norm)
        if self.outlier_k > 0 and len(kept) >= 3:
            median = float(np.median(norms))
            mad = float(np.median(np.abs(np.asarray(norms) - median)))
            limit = median + self.outlier_k * mad
            out = [r for r, n in zip(kept, norms, strict=True) if n > limit]
            for reply in out:
                log.warning(
                    "update of %s rejected (outlier): norm above median + %g * MAD = %.4g",
                    reply.site_id,
                    self.outlier_k,
                    limit,
                )
            if out:
                rejected["outlier"] += len(out)
            kept = [r for r in kept if r not in out]
        return kept

    def weights(self, replies: list[SiteReply]) -> list[float]:
        """Each reply's aggregation weight: its example count, capped, or all equal."""
        if self.equal_weights:
            return [1.0] * len(replies)
        return capped_weights([r.metrics["num-examples"] for r in replies], self.max_share)

    def aggregate(self, replies: list[SiteReply]) -> Arrays:
        """The round's aggregate of the (screened, site-id-ordered) replies under the rule."""
        contents = [
            RecordDict({"arrays": r.content["arrays"], "metrics": MetricRecord({"weight": w, "index": i})})
            for i, (r, w) in enumerate(zip(replies, self.weights(replies), strict=True))
            if r.content is not None
        ]
        if self.rule == "median":
            return median_of([record_to_arrays(c["arrays"]) for c in contents])
        if self.rule == "trimmed-mean":
            models = [record_to_arrays(c["arrays"]) for c in contents]
            return {
                k: np.asarray(trim_mean(np.stack([m[k] for m in models]), self.trim_fraction)).astype(ref.dtype)
                for k, ref in models[0].items()
            }
        if self.rule in ("krum", "multikrum"):
            select = 1 if self.rule == "krum" else max(1, len(contents) - self.byzantine)
            contents = select_multikrum(contents, num_malicious_nodes=self.byzantine, num_nodes_to_select=select)
        return record_to_arrays(aggregate_arrayrecords(contents, "weight"))
