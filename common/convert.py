"""Record <-> torch conversion with canonical parameter names.

Opacus wraps a model in ``GradSampleModule``, whose state dict prefixes every key with
``_module.``. Keys that cross the wire are always the unwrapped (canonical) names, so
this is the only place that knows about the prefix.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WRAPPER_PREFIX = "_module."


def canonical_key(key: str) -> str:
    """Strip any number of wrapper prefixes."""
    while key.startswith(WRAPPER_PREFIX):
        key = key[len(WRAPPER_PREFIX) :]
    return key


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside any Opacus wrapper."""
    while hasattr(model, "_module"):
        model = model._module
    return model


def model_to_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Canonical-keyed numpy copies of the model's state."""
    return {canonical_key(k): v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord in the given key order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy arrays of an ArrayRecord, in its key order."""
    return {k: v.numpy() for k, v in record.items()}


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load canonical-keyed arrays into ``model`` (wrapped or not), strictly."""
    target = unwrap(model)
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
    target.load_state_dict(state, strict=True)
