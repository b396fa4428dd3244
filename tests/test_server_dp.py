"""Client-level DP on the server: clipped updates, noise on the sum, noise before momentum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant

from stamen.client.ledger import PrivacyLedger
from stamen.common.convert import arrays_to_record
from stamen.common.errors import ConfigError
from stamen.common.identity import SiteSampler
from stamen.common.reply import SiteReply, Status
from stamen.common.state import SiteStore
from stamen.server.dp_fedavg import DPFedAvg
from stamen.server.loop import server_update
from stamen.server.optimizers.fedavgm import FedAvgM

GLOBAL = {"w": np.zeros((3, 4), dtype=np.float32), "b": np.zeros(4, dtype=np.float32)}
CLIP, SIGMA, BETA, LR = 0.5, 2.0, 0.9, 1.0


def _reply(site: str, arrays: dict[str, np.ndarray]) -> SiteReply:
    content = RecordDict({"arrays": arrays_to_record(arrays)})
    return SiteReply(site, Status.OK, metrics={"num-examples": 10.0, "lr": 0.1, "steps": 1.0}, content=content)


def test_each_update_is_clipped_and_the_divisor_is_the_expected_count() -> None:
    dp = DPFedAvg(CLIP, 1e-9, seed=0)  # negligible noise: see the clipping alone
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
    dp = DPFedAvg(CLIP, SIGMA, seed=7)
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
    a, b = DPFedAvg(CLIP, SIGMA, seed=3), DPFedAvg(CLIP, SIGMA, seed=3)
    np.testing.assert_array_equal(a.noise(GLOBAL, 5)["w"], b.noise(GLOBAL, 5)["w"])
    assert not np.allclose(a.noise(GLOBAL, 5)["w"], a.noise(GLOBAL, 6)["w"])
    assert np.std(a.noise({"w": np.zeros(20000, np.float32)}, 1)["w"]) == pytest.approx(SIGMA * CLIP, rel=0.03)


@pytest.mark.parametrize("rounds", [5, 30])
def test_epsilon_is_opacus_at_rate_one_on_the_rounds_noised(rounds: int) -> None:
    """No amplification by site sampling: history.csv names each round's sampled sites."""
    dp = DPFedAvg(CLIP, SIGMA, seed=0)
    for r in range(1, rounds + 1):
        dp.aggregate(GLOBAL, [], expected_sites=3, server_round=r)
    reference = RDPAccountant()
    reference.history = [(SIGMA, 1.0, rounds)]
    assert dp.sample_rate == 1.0
    assert dp.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5))
    amplified = RDPAccountant()
    amplified.history = [(SIGMA, 0.2, rounds)]
    assert dp.epsilon(1e-5) > 2 * amplified.get_epsilon(1e-5), "the amplified claim would be far smaller"


def test_poisson_site_sampling_includes_each_site_at_the_rate() -> None:
    sampler = SiteSampler(0)
    sites = [f"s{i}" for i in range(50)]
    counts = [len(sampler.sample_poisson(sites, 0.2)) for _ in range(400)]
    assert np.mean(counts) == pytest.approx(10, rel=0.05)
    assert min(counts) < 10 < max(counts)  # the count itself varies: sites are drawn independently


def test_bad_server_dp_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="clip"):
        DPFedAvg(0.0, SIGMA, seed=0)
    with pytest.raises(ConfigError, match="noise"):
        DPFedAvg(CLIP, 0.0, seed=0)


# --- every reported epsilon against an independent accountant (Google's dp_accounting) ------


def _independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of Poisson-subsampled Gaussian rounds (sigma, rate, steps) by dp_accounting's RDP
    accountant (add/remove neighbours, Opacus's orders so only the implementations differ)."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant as rdp
    from opacus.accountants.rdp import RDPAccountant as OpacusRDP

    accountant = rdp.RdpAccountant(orders=list(OpacusRDP.DEFAULT_ALPHAS))
    for sigma, rate, steps in history:
        gaussian = dp_event.GaussianDpEvent(sigma)
        event = gaussian if rate == 1.0 else dp_event.PoissonSampledDpEvent(rate, gaussian)
        accountant.compose(dp_event.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def test_a_sites_ledger_epsilon_matches_dp_accounting_within_one_percent(tmp_path: Path) -> None:
    """A multi-round history with several sigmas, rates and statistic releases (rate 1)."""
    delta = 1e-5
    ledger = PrivacyLedger.load(SiteStore(tmp_path, "site-a"), delta=delta)
    rounds = [(1.1, 0.02, 120), (1.1, 0.02, 80), (0.8, 0.05, 40), (2.0, 0.01, 300), (1.3, 0.1, 10)]
    for sigma, rate, steps in rounds:
        ledger.record(sigma, rate, steps)
    for sigma in (20.0, 20.0, 35.0):
        ledger.record_release(sigma)
    stored = PrivacyLedger.load(SiteStore(tmp_path, "site-a"), delta=delta)
    assert stored.rounds == len(rounds) and stored.releases == (20.0, 20.0, 35.0)
    expected = _independent_epsilon([*rounds, (20.0, 1.0, 2), (35.0, 1.0, 1)], delta)
    assert stored.epsilon(delta) == pytest.approx(expected, rel=0.01)
    assert 1.0 < expected < 20.0, "a history in the range that matters"


@pytest.mark.parametrize("rounds", [3, 50])
def test_the_server_dp_fedavg_epsilon_matches_dp_accounting_within_one_percent(rounds: int) -> None:
    dp = DPFedAvg(CLIP, 1.5, seed=0)
    for r in range(1, rounds + 1):
        dp.aggregate(GLOBAL, [], expected_sites=3, server_round=r)
    assert dp.epsilon(1e-5) == pytest.approx(_independent_epsilon([(1.5, 1.0, rounds)], 1e-5), rel=0.01)
