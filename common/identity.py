"""Site identity and stamen's own site sampling.

Flower's node ids are new on every SuperNode start, so nothing may be keyed by them.
Every client has a stable ``site-id``: the configured ``site-id`` of a real node, or
``site-NNNN`` from the partition id in simulation. The server samples over sorted
site-ids with a seeded generator whose state goes into checkpoints, so a resumed run
samples exactly the sites the uninterrupted run would have.

A site-id is also bound to a key: in deployment the server's handshake carries a fresh nonce
and the site signs (site-id, run-id, nonce) with its SuperNode's private key
(:func:`prove_identity`), so a node cannot answer for a site whose key it does not hold
(server/sites.py keeps the binding). Flower 1.42 does not show the ServerApp a node's
registered key, hence this proof of possession of our own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from stamen.common.errors import ConfigError

SITE_ID_KEY = "site-id"
IDENTITY_KEY = "identity-key"  # node config: path of the SuperNode's private key (stamen node sets it)
IDENTITY_RECORD = "identity"  # the handshake's ConfigRecord holding the server's nonce
PROOF_KEY, PROOF_SIGNATURE = "identity-public-key", "identity-signature"  # in the reply's meta
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def simulated(node_config: Mapping[str, Any]) -> bool:
    """Whether this node config is a simulated site's: Flower's simulation engine alone sets
    ``partition-id`` (``stamen node`` has a ``site-id``, never a partition)."""
    return "partition-id" in node_config


def validate_site_id(site_id: str) -> str:
    """Return ``site_id`` if it is safe as a directory name and a metric label."""
    if not isinstance(site_id, str) or not _SITE_ID.fullmatch(site_id):
        raise ConfigError(
            f"site-id {site_id!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return site_id


def site_id_from_node_config(node_config: Mapping[str, Any]) -> str:
    """The site-id of this node: configured on real nodes, derived in simulation."""
    if SITE_ID_KEY in node_config:
        return validate_site_id(str(node_config[SITE_ID_KEY]))
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id']):04d}"
    raise ConfigError("node config has neither 'site-id' nor 'partition-id': set site-id for this node")


class SiteSampler:
    """Seeded, checkpointable sampling of sites for a round."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def sample(self, site_ids: Iterable[str], fraction: float, minimum: int = 1) -> list[str]:
        """Pick ``max(minimum, ceil(fraction * n))`` sites (capped at n), sorted."""
        pool = sorted(set(site_ids))
        if not pool:
            return []
        # round() first: 0.28 * 25 is 7.000000000000001 in floating point, which ceil makes 8.
        count = min(len(pool), max(minimum, math.ceil(round(fraction * len(pool), 9))))
        chosen = self._rng.choice(len(pool), size=count, replace=False)
        return sorted(pool[i] for i in chosen)

    def sample_poisson(self, site_ids: Iterable[str], rate: float) -> list[str]:
        """Each site independently with probability ``rate`` (may be empty), sorted.

        This is the sampling that amplifies the server's client-level DP (server/dp_fedavg.py).
        """
        pool = sorted(set(site_ids))
        keep = self._rng.random(len(pool)) < rate
        return [s for s, k in zip(pool, keep, strict=True) if k]

    def state_dict(self) -> dict[str, Any]:
        """The generator's full state (JSON-serialisable)."""
        return self._rng.bit_generator.state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state."""
        self._rng.bit_generator.state = dict(state)


def _payload(site_id: str, run_id: int, nonce: str) -> bytes:
    return json.dumps(["stamen-site-identity/1", site_id, int(run_id), nonce]).encode()


def key_fingerprint(public_der: bytes) -> str:
    """``sha256:<hex>`` of a DER SubjectPublicKeyInfo: how a binding names a key."""
    return "sha256:" + hashlib.sha256(public_der).hexdigest()


def prove_identity(key_path: str, site_id: str, run_id: int, nonce: str) -> dict[str, str]:
    """Sign (site-id, run-id, nonce) with the node's OpenSSH ECDSA key; the reply's proof fields."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        with open(key_path, "rb") as fh:
            private = serialization.load_ssh_private_key(fh.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"identity key {key_path} cannot be read as an OpenSSH private key: {exc}") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"identity key {key_path} is not an ECDSA key")
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = private.sign(_payload(site_id, run_id, nonce), ec.ECDSA(hashes.SHA256()))
    return {PROOF_KEY: base64.b64encode(public).decode(), PROOF_SIGNATURE: base64.b64encode(signature).decode()}


def verify_identity(proof: Mapping[str, Any], site_id: str, run_id: int, nonce: str) -> str:
    """The key fingerprint if ``proof`` signs (site-id, run-id, nonce); ValueError naming the flaw otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        public_der = base64.b64decode(str(proof[PROOF_KEY]), validate=True)
        signature = base64.b64decode(str(proof[PROOF_SIGNATURE]), validate=True)
        public = serialization.load_der_public_key(public_der)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"malformed identity proof: {exc}") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ValueError("identity proof key is not an ECDSA key")
    try:
        public.verify(signature, _payload(site_id, run_id, nonce), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("identity proof signature does not verify") from None
    return key_fingerprint(public_der)
