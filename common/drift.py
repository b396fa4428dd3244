"""Drift math: distribution-shift scores between histograms, the feature sketch they are
computed on, and a Page–Hinkley change detector.

Written here rather than taken from a library: PSI and the histogram sketch are a few
lines of numpy; Jensen–Shannon comes from scipy. For the change detector, river's
``PageHinkley`` (installable, a 2.7 MB wheel) keeps its state in private attributes and
a ``stats.Mean`` object, so a JSON checkpoint could only capture it through pickle; the
detector below keeps its whole state in one plain dict (:meth:`PageHinkley.state_dict`),
like the server optimizers do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from stamen.common.errors import StateError

#: PSI at or above this is the conventional "significant shift" (and the alert threshold).
PSI_ALERT = 0.2
#: PSI from this up to PSI_ALERT is the conventional "moderate shift" (the dashboard's yellow line).
PSI_WATCH = 0.1
#: Proportions are floored here before PSI's log ratio, so an empty bin scores large, not inf.
PROPORTION_FLOOR = 1e-4
#: The feature sketch: this many fixed random 1-D projections, each histogrammed in these bins.
FEATURE_PROJECTIONS = 8
FEATURE_BIN_EDGES = np.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])


def proportions(counts: np.ndarray) -> np.ndarray:
    """Counts (possibly noisy, so possibly negative) to proportions floored at PROPORTION_FLOOR."""
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    total = c.sum()
    p = c / total if total > 0 else np.full(c.shape, 1.0 / c.size)
    p = np.maximum(p, PROPORTION_FLOOR)
    return p / p.sum()


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index sum((q - p) * ln(q / p)) of two count histograms."""
    p, q = proportions(reference), proportions(current)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0 = same, 1 = disjoint); scipy returns its square root."""
    from scipy.spatial.distance import jensenshannon  # here: what reads this module's constants needs no scipy

    return float(jensenshannon(proportions(reference), proportions(current), base=2) ** 2)


def sliced_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """The largest PSI over the projections of two feature sketches (rows = projections).

    The max, not the mean: a covariate shift shows in some directions more than others
    (on MNIST, 300 vs 300 records: resampling 0.05-0.07, 30° rotation 0.38, Gaussian noise
    of std 0.5 0.43; the mean over projections gives 0.04, 0.16, 0.23).
    """
    return float(max(psi(r, c) for r, c in zip(reference, current, strict=True)))


def projection_directions(num_features: int, seed: int) -> np.ndarray:
    """FEATURE_PROJECTIONS fixed unit directions, the same on every site of a run (seeded)."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((FEATURE_PROJECTIONS, num_features))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def feature_sketch(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Histograms of each record's direction projected on fixed random axes.

    Each record is scaled to unit L2 norm and projected on each direction; the projection,
    times sqrt(features), is binned on fixed edges (a unit record's projection on a random
    axis is ~N(0, 1/features), so the bins cover it). A sketch of where records point
    rather than of pixel intensities: rotation moves mass between features and so moves
    the projections; added noise spreads them. Bins are data-independent and each record
    adds exactly 1 to one bin per projection, so the sketch's L2 sensitivity to one record
    is sqrt(FEATURE_PROJECTIONS), as a DP release of it needs.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0)
    proj = unit @ directions.T * math.sqrt(flat.shape[1])
    edges = np.concatenate(([-np.inf], FEATURE_BIN_EDGES, [np.inf]))
    return np.stack([np.histogram(proj[:, j], bins=edges)[0] for j in range(directions.shape[0])]).astype(np.float64)


FEATURE_SKETCH_SENSITIVITY = math.sqrt(FEATURE_PROJECTIONS)


@dataclass
class PageHinkley:
    """One-sided Page–Hinkley test for an increase in a series' mean (e.g. a loss).

    m_t = sum(x_i - mean_i - delta) with mean_i a fading mean (factor ``fading`` per
    value, so a loss that fell early in training does not hide a later rise); the test
    fires when m_t - min(m) > ``threshold`` after at least ``min_values`` values, then
    starts over. Threshold and delta are in the series' units (nats for a loss).
    """

    threshold: float
    delta: float
    fading: float = 0.8
    min_values: int = 3
    count: int = 0
    mean: float = 0.0
    cumulative: float = 0.0
    minimum: float = 0.0

    def update(self, value: float) -> bool:
        """Feed one value; True when a change is detected (the test is then reset)."""
        if not math.isfinite(value):
            return False
        self.mean = value if self.count == 0 else self.fading * self.mean + (1 - self.fading) * value
        self.count += 1
        self.cumulative += value - self.mean - self.delta
        self.minimum = min(self.minimum, self.cumulative)
        if self.count >= self.min_values and self.cumulative - self.minimum > self.threshold:
            self.count, self.mean, self.cumulative, self.minimum = 0, 0.0, 0.0, 0.0
            return True
        return False

    def state_dict(self) -> dict[str, float]:
        """The whole state as plain numbers (for a checkpoint)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from :meth:`state_dict`: every field it holds, nothing else."""
        unknown = sorted(set(state) - {f.name for f in fields(self)})
        if unknown:
            raise StateError(f"Page-Hinkley state has unknown field(s) {', '.join(unknown)}")
        for name, value in state.items():
            setattr(self, name, int(value) if name in ("count", "min_values") else float(value))

    @classmethod
    def from_state(cls, state: dict[str, float]) -> PageHinkley:
        """Rebuild a detector from :meth:`state_dict`."""
        return cls(**state)
