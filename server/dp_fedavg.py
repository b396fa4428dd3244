"""Client-level DP on the server (DP-FedAvg): each site's update clipped, the sum noised.

Each round the server clips every site's update (its model minus the global model) to
``server-dp-clip`` in L2 norm — Flower's own clipping helper — sums them with equal
weight, adds Gaussian noise of std ``server-dp-noise * server-dp-clip``, and divides by
the *expected* number of sites. The result is the noisy average model that the server
optimizer then steps towards: the noise goes in **before** momentum, so the momentum
buffer holds exactly what the broadcast model was built from. (Flower's server-side DP
wrapper noises the inner strategy's output, i.e. after FedAvgM's momentum step.)

Accounting: epsilon is Opacus's accountant at sample rate 1, with no amplification by
site sampling, whatever ``site-sampling`` is. Amplification by sampling holds only while
*who was sampled* stays secret, and stamen publishes it: history.csv's ``sampled_sites``
column, the versions index and the Prometheus round counters name or count each round's
sampled sites. Under ``site-sampling = "poisson"`` the sum is still divided by the
data-independent ``fraction-train * sites``; rate 1 is a valid upper bound either way.

The noise is the server's own secret: fresh ``os.urandom`` entropy every round (nothing
to keep for a resume), never the run seed, which the sites know too. Only under
``dp-noise = seeded`` (research simulations) is it seeded per round from the run seed, so a
run and a resumed run are reproducible, from :func:`seeded_noise_seed` (not one of the run
record's seeds: a secret-noise run uses none).
"""

from __future__ import annotations

import os

import numpy as np
from opacus.accountants import create_accountant

from stamen.common.errors import ConfigError
from stamen.common.flwr_internal import clip_inputs_inplace, get_norm

Arrays = dict[str, np.ndarray]


def seeded_noise_seed(seed: int) -> int:
    """The noise seed of a ``dp-noise = seeded`` run (``seed + 4``, as before it left the run record)."""
    return seed + 4


class DPFedAvg:
    """Clip, sum, noise and average site models; keep the server's own privacy history.

    Parameters
    ----------
    clip : float
        L2 bound of one site's update.
    noise_multiplier : float
        Noise std as a multiple of ``clip``.
    seed : int or None
        Seeds the noise of every round (``dp-noise = seeded``); None: fresh OS entropy each round.
    accountant : str (default: "rdp")
        Opacus accountant that turns the history into epsilon.
    """

    #: The rate the accountant uses: 1, no amplification (the sampled sites are published).
    sample_rate = 1.0

    def __init__(self, clip: float, noise_multiplier: float, seed: int | None, accountant: str = "rdp") -> None:
        if not (clip > 0 and noise_multiplier > 0):
            raise ConfigError(f"server DP needs clip > 0 and noise > 0, got {clip}, {noise_multiplier}")
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.seed = seed
        self.accountant = accountant
        self.rounds = 0

    def noise(self, reference: Arrays, server_round: int) -> Arrays:
        """This round's Gaussian noise on the sum, one array per floating-point parameter."""
        entropy = [self.seed, server_round] if self.seed is not None else int.from_bytes(os.urandom(32), "little")
        rng = np.random.default_rng(entropy)
        std = self.noise_multiplier * self.clip
        return {
            k: rng.normal(0.0, std, size=v.shape).astype(v.dtype)
            for k, v in reference.items()
            if np.issubdtype(v.dtype, np.floating)
        }

    def aggregate(self, current: Arrays, models: list[Arrays], expected_sites: float, server_round: int) -> Arrays:
        """The noisy average model of this round (``expected_sites``: the divisor, data-independent)."""
        if expected_sites <= 0:
            raise ValueError("expected_sites must be > 0")
        floats = [k for k, v in current.items() if np.issubdtype(v.dtype, np.floating)]
        total = {k: np.zeros_like(current[k]) for k in floats}
        for model in models:
            update = [model[k] - current[k] for k in floats]
            if get_norm(update) > self.clip:  # Flower's helper divides by the norm: skip it for a zero update
                clip_inputs_inplace(update, self.clip)
            for k, u in zip(floats, update, strict=True):
                total[k] += u
        noise = self.noise(current, server_round)
        self.rounds += 1
        out = dict(current)
        for k in floats:
            out[k] = current[k] + (total[k] + noise[k]) / expected_sites
        return out

    def epsilon(self, delta: float) -> float:
        """Client-level epsilon of every noised round so far, at ``delta``."""
        if self.rounds == 0:
            return 0.0
        acc = create_accountant(mechanism=self.accountant)
        acc.history = [(self.noise_multiplier, self.sample_rate, self.rounds)]
        return float(acc.get_epsilon(delta=delta))

    def state_dict(self) -> dict[str, int]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.rounds = int(state["rounds"])
