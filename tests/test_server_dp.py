"""Client-level DP on the server: clipped updates, noise on the sum, noise before momentum."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant

from stamen.common.convert import arrays_to_record
from stamen.common.errors import ConfigError
from stamen.common.identity import SiteSampler
from stamen.common.reply import SiteReply, Status
from stamen.server.dp_fedavg import DPFedAvg
from stamen.server.loop import server_update
from stamen.server.optimizers.fedavgm import FedAvgM

GLOBAL = {"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}
CLIP, SIGMA, BETA, LR = 0.5, 2.0, 0.9, 1.0


def _reply(site: str, arrays: dict[str, np.ndarray]) -> SiteReply:
    content = RecordDict({"arrays": arrays_to_record(arrays)})
    return SiteReply(site, Status.OK, metrics={"num-examples": 10.0, "lr": 0.1, "steps": 1.0}, content=content)


def test_each_update_is_clipped_and_the_divisor_is_the_expected_count() -> None:
    dp = DPFedAvg(CLIP, 1e-9, 1.0, seed=0)  # negligible noise: see the clipping alone
    big = {"w": np.full((3, 4), 10.0, np.float32), "b": np.zeros(4, np.float32)}
    small = {"w": np.full((3, 4), 0.01, np.float32), "b": np.zeros(4, np.float32)}
    out = dp.aggregate(GLOBAL, [big, small], expected_sites=4, server_round=1)
    clipped_big = big["w"] * CLIP / np.linalg.norm(big["w"])
    np.testing.assert_allclose(out["w"], (clipped_big + small["w"]) / 4, atol=1e-6)


def test_noise_is_added_before_the_momentum_step() -> None:
    """Sites send back the global model unchanged, so every move of the model is noise.

    With noise before momentum (stamen) round 2's model carries round 1's noise twice
    over through the buffer: w2 = w0 + (1 + beta) n1 / m + n2 / m. With noise added to
    the momentum step's output (Flower's server-side wrapper order) it would be
    w0 + n1 / m + n2 / m, whatever beta.
    """
    m = 3
    dp = DPFedAvg(CLIP, SIGMA, 1.0, seed=7)
    optimizer = FedAvgM(server_lr=LR, momentum=BETA)
    arrays = dict(GLOBAL)
    noises = []
    for rnd in (1, 2):
        noises.append(dp.noise(arrays, rnd))
        replies = [_reply(f"site-{i}", arrays) for i in range(m)]
        arrays = server_update(optimizer, arrays, replies, rnd, dp, expected_sites=m)
    n1, n2 = noises
    ours = {k: GLOBAL[k] + (1 + BETA) * n1[k] / m + n2[k] / m for k in GLOBAL}
    after = {k: GLOBAL[k] + n1[k] / m + n2[k] / m for k in GLOBAL}
    for k in GLOBAL:
        np.testing.assert_allclose(arrays[k], ours[k], rtol=1e-5, atol=1e-6)
        assert np.abs(arrays[k] - after[k]).max() > 0.1
    # the buffer is the one the broadcast model was built from: w2 = w1 - lr * buffer
    np.testing.assert_allclose(optimizer.state_dict()["momentum"]["w"], -(BETA * n1["w"] + n2["w"]) / m, rtol=1e-5)


def test_noise_is_reproducible_per_round_and_differs_between_rounds() -> None:
    a, b = DPFedAvg(CLIP, SIGMA, 1.0, seed=3), DPFedAvg(CLIP, SIGMA, 1.0, seed=3)
    np.testing.assert_array_equal(a.noise(GLOBAL, 5)["w"], b.noise(GLOBAL, 5)["w"])
    assert not np.allclose(a.noise(GLOBAL, 5)["w"], a.noise(GLOBAL, 6)["w"])
    assert np.std(a.noise({"w": np.zeros(20000, np.float32)}, 1)["w"]) == pytest.approx(SIGMA * CLIP, rel=0.03)


@pytest.mark.parametrize(("rate", "rounds"), [(1.0, 5), (0.2, 30)])
def test_epsilon_is_opacus_on_the_rounds_noised(rate: float, rounds: int) -> None:
    dp = DPFedAvg(CLIP, SIGMA, rate, seed=0)
    for r in range(1, rounds + 1):
        dp.aggregate(GLOBAL, [], expected_sites=3, server_round=r)
    reference = RDPAccountant()
    reference.history = [(SIGMA, rate, rounds)]
    assert dp.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5))
    assert dp.epsilon(1e-5) > 0


def test_poisson_site_sampling_includes_each_site_at_the_rate() -> None:
    sampler = SiteSampler(0)
    sites = [f"s{i}" for i in range(50)]
    counts = [len(sampler.sample_poisson(sites, 0.2)) for _ in range(400)]
    assert np.mean(counts) == pytest.approx(10, rel=0.05)
    assert min(counts) < 10 < max(counts)  # the count itself varies: sites are drawn independently


def test_bad_server_dp_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="clip"):
        DPFedAvg(0.0, SIGMA, 1.0, seed=0)
    with pytest.raises(ConfigError, match="sample rate"):
        DPFedAvg(CLIP, SIGMA, 1.5, seed=0)
