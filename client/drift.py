"""A site's data drift against its own reference window, measured where the data is.

The reference is what the site trained on in the first ``drift-reference-rounds`` rounds
it took part in: the sum of those rounds' label histograms and feature sketches
(:func:`common.drift.feature_sketch`), kept in the site's state store and frozen after
that, so a restarted node or a resumed run compares with the same reference. Each round
the site compares its current training data with it and sends three scores: label PSI,
label Jensen–Shannon divergence and the feature sketch's PSI (largest over its projections).

Every histogram goes through :func:`client.release.released` first: with DP on it is a
Gaussian release charged to the site's ledger (once per data version, then cached), and
the scores are computed from released histograms only, so they are post-processing of a
DP release and cost nothing more. Unchanged data re-sends the same release, so a static
site scores exactly 0 under DP too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from stamen.client.ledger import Ledger
from stamen.client.stat_release import fingerprint, released
from stamen.common.drift import (
    FEATURE_SKETCH_SENSITIVITY,
    feature_sketch,
    js_divergence,
    projection_directions,
    psi,
    sliced_psi,
)
from stamen.common.errors import StateError
from stamen.common.state import SiteStore

REFERENCE_ENTRY = "drift_reference"
#: The reply's metric keys (each registered in :mod:`common.boundary`).
DRIFT_METRICS = ("drift-label-psi", "drift-label-js", "drift-feature-psi")


def site_drift(
    store: SiteStore,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    reference_rounds: int,
    projection_seed: int,
    ledger: Ledger | None,
    noise_multiplier: float,
    seed: int,
    budget: float = math.inf,
    delta: float = 1e-5,
) -> dict[str, float]:
    """This round's drift scores; updates the reference while it is still being built.

    ``ledger`` None means DP off (exact histograms). A release that would pass ``budget``
    raises :class:`client.ledger.PrivacyRefusal` before anything is spent or stored.
    """
    labels = np.bincount(y.numpy(), minlength=num_classes)[:num_classes].astype(np.float64)
    sketch = feature_sketch(x.numpy(), projection_directions(int(np.prod(x.shape[1:])), projection_seed))
    release = {"ledger": ledger, "noise_multiplier": noise_multiplier, "seed": seed, "budget": budget, "delta": delta}
    labels = released(
        store, key="label-histogram", fingerprint=fingerprint(y), exact=labels, l2_sensitivity=1.0, **release
    )
    sketch = released(
        store,
        key="feature-sketch",
        fingerprint=fingerprint(x),
        exact=sketch,
        l2_sensitivity=FEATURE_SKETCH_SENSITIVITY,
        **release,
    )
    ref = _reference(store, labels, sketch, reference_rounds)
    ref_labels, ref_sketch = np.asarray(ref["labels"]), np.asarray(ref["sketch"])
    return {
        "drift-label-psi": psi(ref_labels, labels),
        "drift-label-js": js_divergence(ref_labels, labels),
        "drift-feature-psi": sliced_psi(ref_sketch, sketch),
    }


def _reference(store: SiteStore, labels: np.ndarray, sketch: np.ndarray, reference_rounds: int) -> dict[str, Any]:
    """The stored reference, with this round added while fewer than ``reference_rounds`` are in it."""
    ref = store.read_json(REFERENCE_ENTRY)
    if ref is None:
        ref = {"rounds": 0, "labels": np.zeros_like(labels).tolist(), "sketch": np.zeros_like(sketch).tolist()}
    if np.shape(ref["labels"]) != labels.shape or np.shape(ref["sketch"]) != sketch.shape:
        raise StateError(
            f"site {store.site_id}: the stored drift reference has shapes {np.shape(ref['labels'])}, "
            f"{np.shape(ref['sketch'])}; this data gives {labels.shape}, {sketch.shape} (another dataset?)"
        )
    if ref["rounds"] < reference_rounds:
        ref = {
            "rounds": ref["rounds"] + 1,
            "labels": (np.asarray(ref["labels"]) + labels).tolist(),
            "sketch": (np.asarray(ref["sketch"]) + sketch).tolist(),
        }
        store.write_json(REFERENCE_ENTRY, ref)
    return ref
