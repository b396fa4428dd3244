"""Where a DP site's randomness comes from: a secret only the site holds.

The server sees every update and knows the whole run config, seed included. Were the
DP-SGD noise and Poisson sampling seeded from the run seed, it could regenerate the
noise and subtract it. So under ``dp-noise = "secret"`` (the default) every draw a
privacy guarantee rests on — the Poisson sampler, the Gaussian noise of DP-SGD, every
charged statistic release — is seeded from keys derived (HMAC-SHA256) from

- the site's secret: 32 bytes from ``os.urandom`` made on the site's first DP round and
  kept in its state store (``noise-secret.key``, mode 0600), never logged, sent or
  recorded; and
- 32 fresh bytes from ``os.urandom`` per training attempt, so a redone round (same site,
  same round, same global model) draws new noise: it is a new release and is charged.

Each purpose (``sampling``, ``noise``, ``releases``) gets its own key, so the streams are
independent. Opacus's own ``secure_mode`` would draw from ``/dev/urandom`` directly but
needs ``torchcsprng``, which is archived and not built for the torch stamen uses; so the
generators are ordinary torch/numpy generators with secret, CSPRNG-made seeds. Their
output is never seen on its own (only added to a gradient sum), so the seed's secrecy,
not the generator's, is what the server would have to break.

``dp-noise = "seeded"`` keeps the old, reproducible derivation from the run seed, for
research simulations only: a real node (node config without ``partition-id``) refuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stamen.common.errors import ConfigError
from stamen.common.identity import simulated
from stamen.common.state import SiteStore

SECRET_ENTRY = "noise-secret.key"
SECRET_BYTES = 32
SEED_MASK = 0x7FFF_FFFF_FFFF_FFFF  # torch.Generator.manual_seed takes a non-negative 64-bit int


@dataclass(frozen=True)
class NoiseSeeds:
    """The seeds of one DP training attempt's random draws, one per independent release."""

    sampling: int
    noise: int
    releases: int


def check_noise_mode(mode: str, node_config: Mapping[str, Any]) -> None:
    """Refuse ``dp-noise = seeded`` on a real node: the server could rebuild its noise from the seed."""
    if mode == "seeded" and not simulated(node_config):
        raise ConfigError(
            "run config 'dp-noise' = 'seeded' derives the DP noise from the public run seed, so the server could "
            "subtract it: a real node refuses it (seeded noise is for research simulations only)"
        )


def site_secret(store: SiteStore) -> bytes:
    """The site's noise secret, made from ``os.urandom`` the first time and kept (mode 0600).

    Created by a hard link from a private temp file, so two processes racing to create it
    agree on one secret.
    """
    path = store.dir / SECRET_ENTRY
    if not path.exists():
        tmp = store.dir / f".{SECRET_ENTRY}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(SECRET_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first: use that one
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"site {store.site_id}: {path} is not a {SECRET_BYTES}-byte noise secret")
    return secret


def attempt_seeds(mode: str, store: SiteStore, public_seed: int, server_round: int) -> NoiseSeeds:
    """Seeds for one training attempt: secret and fresh (``secret``), or from ``public_seed`` (``seeded``).

    ``public_seed`` is the round's seed from the run config (``round_seed``); under
    ``seeded`` these are the seeds earlier stamen versions used, so DP-SGD draws as they did.
    """
    if mode == "seeded":
        return NoiseSeeds(sampling=public_seed, noise=public_seed + 1, releases=public_seed)
    if mode != "secret":
        raise ConfigError(f"run config 'dp-noise' must be 'secret' or 'seeded', got {mode!r}")
    attempt = hmac.new(
        site_secret(store), f"stamen-dp-attempt/{server_round}/".encode() + os.urandom(32), hashlib.sha256
    ).digest()

    def key(purpose: str) -> int:
        digest = hmac.new(attempt, purpose.encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "little") & SEED_MASK

    return NoiseSeeds(sampling=key("sampling"), noise=key("noise"), releases=key("releases"))
