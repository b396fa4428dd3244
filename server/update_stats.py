"""What a round's site updates look like: their sizes, how far they agree, how far the model moved.

A site's update is its returned model minus the global model it started from (float
parameters only). Client drift shows as updates that point away from their aggregate: the
cosine of each update with the example-weighted mean update (min and mean over sites) and
the dispersion of update norms (coefficient of variation). The global model's change per
round (model drift) is the norm of what the server optimizer applied. All norms are L2
over every float parameter, flattened into one vector.
"""

from __future__ import annotations

import math

import numpy as np

Arrays = dict[str, np.ndarray]


def _flat(arrays: Arrays, keys: list[str]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel().astype(np.float64, copy=False) for k in keys])


def float_keys(model: Arrays) -> list[str]:
    """The model's float parameters (integer buffers are not updates)."""
    return [k for k, v in model.items() if np.issubdtype(v.dtype, np.floating)]


def update_statistics(global_model: Arrays, site_models: list[Arrays], weights: list[float]) -> dict[str, float]:
    """Norm and agreement figures of one round's site updates against ``global_model``."""
    if not site_models:
        return {}
    keys = float_keys(global_model)
    base = _flat(global_model, keys)
    updates = np.stack([_flat(m, keys) - base for m in site_models])
    w = np.asarray(weights, dtype=np.float64)
    mean_update = (w[:, None] * updates).sum(axis=0) / w.sum()
    norms = np.linalg.norm(updates, axis=1)
    mean_norm = float(np.linalg.norm(mean_update))
    cosines = [
        float(u @ mean_update / (n * mean_norm)) if n > 0 and mean_norm > 0 else math.nan
        for u, n in zip(updates, norms, strict=True)
    ]
    finite = [c for c in cosines if math.isfinite(c)]
    return {
        "update_norm_mean": float(norms.mean()),
        "update_norm_max": float(norms.max()),
        "update_norm_dispersion": float(norms.std() / norms.mean()) if norms.mean() > 0 else 0.0,
        "cosine_min": min(finite, default=math.nan),
        "cosine_mean": sum(finite) / len(finite) if finite else math.nan,
        "site_update_norms": norms.tolist(),
    }


def change_norm(before: Arrays, after: Arrays) -> float:
    """L2 norm of the global model's change in one round (float parameters)."""
    keys = float_keys(before)
    return float(np.linalg.norm(_flat(after, keys) - _flat(before, keys)))
