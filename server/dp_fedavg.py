"""Client-level DP on the server (DP-FedAvg): each site's update clipped, the sum noised.

Each round the server clips every site's update (its model minus the global model) to
``server-dp-clip`` in L2 norm — Flower's own clipping helper — sums them with equal
weight, adds Gaussian noise of std ``server-dp-noise * server-dp-clip``, and divides by
the *expected* number of sites. The result is the noisy average model that the server
optimizer then steps towards: the noise goes in **before** momentum, so the momentum
buffer holds exactly what the broadcast model was built from. (Flower's server-side DP
wrapper noises the inner strategy's output, i.e. after FedAvgM's momentum step.)

Accounting, by how sites were sampled:

- ``site-sampling = "poisson"``: every site is in a round independently with
  probability ``fraction-train``, so Opacus's accountant for the subsampled Gaussian
  mechanism applies at that rate (the sum is divided by ``fraction-train * sites``);
- ``site-sampling = "fixed"``: a fixed number of sites is drawn. Amplification by that
  kind of sampling needs another analysis, so stamen claims none: epsilon is computed
  at sample rate 1, a valid upper bound.

The noise is the server's own secret: fresh ``os.urandom`` entropy every round (nothing
to keep for a resume), never the run seed, which the sites know too. Only under
``dp-noise = seeded`` (research simulations) is it seeded per round from the run seed, so a
run and a resumed run are reproducible.
"""

from __future__ import annotations

import os

import numpy as np
from opacus.accountants import create_accountant

from stamen.common.errors import ConfigError
from stamen.common.flwr_internal import clip_inputs_inplace, get_norm

Arrays = dict[str, np.ndarray]


class DPFedAvg:
    """Clip, sum, noise and average site models; keep the server's own privacy history.

    Parameters
    ----------
    clip : float
        L2 bound of one site's update.
    noise_multiplier : float
        Noise std as a multiple of ``clip``.
    sample_rate : float
        Probability a site is in a round (1.0 for fixed-size sampling: no amplification).
    seed : int or None
        Seeds the noise of every round (``dp-noise = seeded``); None: fresh OS entropy each round.
    accountant : str (default: "rdp")
        Opacus accountant that turns the history into epsilon.
    """

    def __init__(
        self, clip: float, noise_multiplier: float, sample_rate: float, seed: int | None, accountant: str = "rdp"
    ) -> None:
        if not (clip > 0 and noise_multiplier > 0 and 0 < sample_rate <= 1):
            raise ConfigError(
                f"server DP needs clip > 0, noise > 0 and a sample rate in (0, 1], got "
                f"{clip}, {noise_multiplier}, {sample_rate}"
            )
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
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
