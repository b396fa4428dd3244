"""Fixed features computed once: a model's frozen extractor, cached per record in memory.

A model may declare a frozen feature extractor (:class:`FixedFeatures`): a fixed,
data-independent function of each record alone (wavelet scattering, a pretrained
backbone), followed by a trainable head. Training and evaluation then run the head on
features computed once per record instead of at every forward pass of every epoch of
every round. DP-SGD is unchanged: per-sample gradients of the head's parameters are the
same on cached features, the extractor has nothing to train (so nothing to clip or
noise), and the sampler, the noise and the accountant see the same records and steps.

Entries are keyed by the extractor (:attr:`FixedFeatures.feature_key`), a scope (the
site) and a digest of each record's bytes, so a new data version (a shard ingested, a
stream round whose view changed, replayed records mixed in) is a cache miss for exactly
its new records, never a stale hit. The cache lives in process memory only, bounded by
``feature-cache-mb`` and evicted least recently used: a site's records (and their
features) never go to disk or leave the process.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

#: Records per extractor call on a cache miss: large enough to batch, small enough to bound memory.
EXTRACT_BATCH = 256


@runtime_checkable
class FixedFeatures(Protocol):
    """A model whose forward is ``trainable_head()(fixed_features(x))``.

    ``fixed_features`` must be a function of each record alone with no trainable or
    data-derived state (so caching it is exact and costs no privacy); ``trainable_head``
    returns a module over those features that shares the model's own parameters (so
    training it trains the model, and the model's ``state_dict`` is what is sent);
    ``feature_key`` names the extractor and its settings (two models with one key must
    compute the same features).
    """

    feature_key: str

    def fixed_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def trainable_head(self) -> nn.Module: ...


class FeatureCache:
    """Per-record features of fixed extractors, least recently used evicted beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str, bytes], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of features held now."""
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def features(self, model: FixedFeatures, x: torch.Tensor, scope: str, device: torch.device) -> torch.Tensor:
        """``model.fixed_features(x)`` on CPU, row by row from the cache; misses computed on ``device``."""
        rows = x.detach().cpu().contiguous()
        keys = [(model.feature_key, scope, _digest(row)) for row in rows.numpy()]
        missing: dict[tuple[str, str, bytes], int] = {}
        for i, key in enumerate(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
            elif key not in missing:
                missing[key] = i
                self.misses += 1
        computed: dict[tuple[str, str, bytes], torch.Tensor] = {}
        if missing:
            extracted = _extract(model, rows[list(missing.values())], device)
            # one tensor per record, not views of the batch: evicting a record frees its memory
            computed = {key: feature.clone() for key, feature in zip(missing, extracted, strict=True)}
        out = torch.stack([computed[k] if k in computed else self._entries[k] for k in keys])
        for key, feature in computed.items():
            self._entries[key] = feature
            self._bytes += _size(feature)
        self._evict()
        return out

    def _evict(self) -> None:
        while self._entries and self._bytes > self.max_bytes:
            _, feature = self._entries.popitem(last=False)
            self._bytes -= _size(feature)


def _digest(row: np.ndarray) -> bytes:
    """A record's identity by content: its dtype, shape and bytes."""
    h = hashlib.blake2b(f"{row.dtype}{row.shape}".encode(), digest_size=16)
    h.update(row.tobytes())
    return h.digest()


def _size(feature: torch.Tensor) -> int:
    return feature.numel() * feature.element_size()


@torch.no_grad()
def _extract(model: FixedFeatures, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The extractor's fp32 features of ``x`` (at least one record), on CPU, in batches."""
    if isinstance(model, nn.Module):
        model.to(device)
    return torch.cat(
        [
            model.fixed_features(x[i : i + EXTRACT_BATCH].to(device)).float().cpu()
            for i in range(0, len(x), EXTRACT_BATCH)
        ]
    )


#: The process's cache (a site's, a simulation's sites', or the server's): features only save work.
CACHE = FeatureCache(0)


def on_features(
    model: nn.Module, x: torch.Tensor, *, cache_mb: int, scope: str, device: torch.device
) -> tuple[nn.Module, torch.Tensor]:
    """What to train or evaluate on ``x``: (head, cached features) or, without a frozen extractor or cache, (model, x).

    The head shares the model's parameters, so training it in place trains ``model``;
    send ``model``'s full ``state_dict`` (extractor buffers included) as before.
    """
    limit = cache_mb * 2**20  # the run's feature-cache-mb
    if not limit or not len(x) or not isinstance(model, FixedFeatures):
        return model, x
    CACHE.resize(limit)
    return model.trainable_head(), CACHE.features(model, x, scope, device)
