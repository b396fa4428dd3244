"""Releasing a site's record-derived statistics under DP: the Gaussian mechanism, charged.

Anything a DP site sends that is computed from its records (its example count, label
histograms, feature statistics) goes through :func:`released`: Gaussian noise of
``noise_multiplier * l2_sensitivity`` is added to the exact values, the release is
charged to the site's :class:`~stamen.client.ledger.Ledger` (one Gaussian mechanism at
that noise multiplier), and the noisy values are cached in the site's store keyed by
``(key, fingerprint)``. Sending the same statistic of the same data again re-sends the
cached values — post-processing, free — so a site pays once per data version, not once
per round. With DP off there is no ledger and the exact values are returned.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from stamen.client.ledger import Ledger, PrivacyRefusal
from stamen.common.errors import ConfigError
from stamen.common.state import SiteStore

RELEASES_ENTRY = "releases"


def fingerprint(*tensors: torch.Tensor) -> str:
    """A digest of the data a statistic describes: a new data version gets a new fingerprint."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def released(
    store: SiteStore,
    *,
    key: str,
    fingerprint: str,
    exact: np.ndarray,
    l2_sensitivity: float,
    ledger: Ledger | None,
    noise_multiplier: float,
    seed: int,
    budget: float = math.inf,
    delta: float = 1e-5,
) -> np.ndarray:
    """``exact`` as it may leave the site: itself with DP off, else a charged, cached Gaussian release.

    ``l2_sensitivity`` bounds how far the vector moves when one record is added or removed
    (a histogram of one value per record: 1). A new release that would take the ledger
    past ``budget`` (at ``delta``) raises :class:`~stamen.client.ledger.PrivacyRefusal` and spends
    nothing. The ledger is charged and persisted before the noisy values are stored or
    returned, so a crash can only over-count. ``seed`` must be the site's secret release
    seed (:mod:`client.noise`) unless the run chose ``dp-noise = seeded``.
    """
    exact = np.asarray(exact, dtype=np.float64)
    if ledger is None:
        return exact
    if not (noise_multiplier > 0 and l2_sensitivity > 0):
        raise ConfigError(
            f"a DP release needs noise multiplier and sensitivity > 0, got {noise_multiplier}, {l2_sensitivity}"
        )
    cache = store.read_json(RELEASES_ENTRY, default={})
    entry = cache.get(key)
    if entry and entry["fingerprint"] == fingerprint and entry["scale"] == noise_multiplier * l2_sensitivity:
        values = np.asarray(entry["values"], dtype=np.float64)
        if values.shape == exact.shape:
            return values
    reason = ledger.release_refusal(noise_multiplier, delta, budget)
    if reason:
        raise PrivacyRefusal("statistics-release", reason)
    # one stream per (seed, statistic, data version): releases of different statistics are independent
    stream = [seed, int(fingerprint[:8], 16), int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)]
    noise = np.random.default_rng(stream).normal(0.0, noise_multiplier * l2_sensitivity, size=exact.shape)
    values = exact + noise
    ledger.record_release(noise_multiplier)
    cache[key] = {"fingerprint": fingerprint, "scale": noise_multiplier * l2_sensitivity, "values": values.tolist()}
    store.write_json(RELEASES_ENTRY, cache)
    return values


def released_count(
    store: SiteStore,
    ledger: Ledger | None,
    y: torch.Tensor,
    *,
    noise_multiplier: float,
    seed: int,
    budget: float = math.inf,
    delta: float = 1e-5,
    key: str = "num-examples",
) -> int:
    """The site's training-set size as it may leave the site (at least 1); ``key`` names it in the cache."""
    value = released(
        store,
        key=key,
        fingerprint=fingerprint(y),
        exact=np.array([len(y)]),
        l2_sensitivity=1.0,
        ledger=ledger,
        noise_multiplier=noise_multiplier,
        seed=seed,
        budget=budget,
        delta=delta,
    )
    return max(1, round(float(value[0])))
