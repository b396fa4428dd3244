"""Fixed features computed once (issue 16): scatnet28's scattering cached per record.

Done-when: the ledger's figures are identical with and without the cache (same epsilon,
steps and sample rate); a new data version (a shard ingested, a stream round whose view
changed) is computed afresh for exactly its new records; and under non-DP on a fixed seed
the trained model equals the uncached one within float tolerance. Every site here is the
real ClientApp (tests/clientdrive.py), a run with ``feature-cache-mb = 0`` the uncached one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clientdrive import OneSite, site_terms
from conftest import run_stamen_simulate
from safetensors.numpy import load_file

from stamen.client.ledger import PrivacyLedger
from stamen.common.config import StamenConfig
from stamen.common.datasets import load_dataset
from stamen.common.features import CACHE, FeatureCache, on_features
from stamen.common.models import build_model
from stamen.common.state import SiteStore
from stamen.server.evaluate import ServerData, evaluate_centrally

pytestmark = pytest.mark.usefixtures("serverapp_identity", "one_torch_thread")
SHAPE = (1, 28, 28)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def empty_cache() -> None:
    """Each test counts its own hits and misses."""
    CACHE.clear()
    CACHE.hits = CACHE.misses = 0


@pytest.fixture(scope="module")
def mnist() -> dict[str, np.ndarray]:
    data = load_dataset("mnist5k")
    return {"x": data.x_train, "y": data.y_train, "x_test": data.x_test, "y_test": data.y_test}


def _cfg(cache_mb: int, **raw: object) -> StamenConfig:
    base = {"dataset": "mnist5k", "lr-schedule": "constant", "lr": 0.1, "replay-size": 0, "holdout-fraction": 0}
    return StamenConfig.from_mapping({**base, **raw, "feature-cache-mb": cache_mb})


def _close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 1e-5) -> bool:
    return set(a) == set(b) and all(np.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def _misses_and_hits(site: OneSite, server_round: int) -> tuple[int, int]:
    """The cache's misses and hits during one round of ``site`` (which must train)."""
    misses, hits = CACHE.misses, CACHE.hits
    assert site.train(server_round)["status"] == "ok"
    return CACHE.misses - misses, CACHE.hits - hits


def test_the_cache_returns_the_extractors_features_and_stays_within_its_bound(mnist: dict[str, np.ndarray]) -> None:
    model = build_model("scatnet28", SHAPE, 10, seed=0)
    x = torch.from_numpy(mnist["x"][:48])
    direct = model.fixed_features(x)
    row_bytes = direct[0].numel() * 4
    cache = FeatureCache(20 * row_bytes)

    first = cache.features(model, torch.cat([x[:10], x[:10]]), "site", CPU)
    assert (cache.misses, cache.hits) == (10, 0), "a record repeated in one batch is computed once"
    torch.testing.assert_close(first, torch.cat([direct[:10], direct[:10]]), atol=1e-6, rtol=0)
    again = cache.features(model, x[:10], "site", CPU)
    assert (cache.misses, cache.hits) == (10, 10)
    assert torch.equal(again, first[:10])
    assert cache.features(model, x[:10], "other-site", CPU).shape == again.shape and cache.misses == 20

    everything = cache.features(model, x, "site", CPU)
    torch.testing.assert_close(everything, direct, atol=1e-6, rtol=0)
    assert len(cache) == 20 and cache.nbytes == 20 * row_bytes, "least recently used records evicted"

    full = model(x)
    head, features = on_features(model, x, cache_mb=1, scope="site", device=CPU)
    torch.testing.assert_close(head(features), full, atol=1e-5, rtol=0)
    assert set(dict(head.named_parameters())) == set(dict(model.named_parameters()))
    assert all(a is b for a, b in zip(head.parameters(), model.parameters(), strict=True)), "the head is the model's"
    cnn = build_model("cnn28", SHAPE, 10, seed=0)
    assert on_features(cnn, x, cache_mb=1, scope="site", device=CPU) == (cnn, x), "no frozen extractor: unchanged"
    off_model, off_x = on_features(model, x, cache_mb=0, scope="site", device=CPU)
    assert off_model is model and off_x is x


def _real_site(tmp_path: Path, name: str, cfg: StamenConfig, node: dict[str, Any]) -> OneSite:
    state = {"site-id": "node-a", "state-dir": str(tmp_path / name / "state"), **site_terms(cfg)}
    return OneSite(cfg, {**state, **node}, "scatnet28", SHAPE, 10)


def test_non_dp_training_on_cached_features_gives_the_uncached_model(
    tmp_path: Path, mnist: dict[str, np.ndarray]
) -> None:
    np.savez(tmp_path / "site.npz", x=mnist["x"][:160], y=mnist["y"][:160])
    node = {"data": f"npz:{tmp_path / 'site.npz'}"}
    cached = _real_site(tmp_path, "cached", _cfg(512, **{"local-epochs": 2}), node)
    uncached = _real_site(tmp_path, "uncached", _cfg(0, **{"local-epochs": 2}), node)
    initial = dict(cached.arrays)

    assert _misses_and_hits(cached, 1) == (160, 0), "round 1 computes each record once, for both its epochs"
    assert _misses_and_hits(cached, 2) == (0, 160), "round 2 computes nothing"
    assert _misses_and_hits(uncached, 1) == _misses_and_hits(uncached, 2) == (0, 0), "feature-cache-mb 0: off"

    assert set(cached.arrays) == set(build_model("scatnet28", SHAPE, 10).state_dict()), "the full model is sent"
    assert not _close(cached.arrays, initial, atol=1e-3), "the model trained"
    assert _close(cached.arrays, uncached.arrays)
    x_test, y_test = torch.from_numpy(mnist["x_test"]), torch.from_numpy(mnist["y_test"])
    assert cached.accuracy(x_test, y_test) == pytest.approx(uncached.accuracy(x_test, y_test), abs=2e-3)


def _simulated_site(tmp_path: Path, name: str, cfg: StamenConfig) -> OneSite:
    node = {"site-id": "site-0000", "partition-id": 0, "num-partitions": 10, "state-dir": str(tmp_path / name)}
    return OneSite(cfg, node, "scatnet28", SHAPE, 10)


def test_dp_ledger_figures_are_identical_with_and_without_the_cache(tmp_path: Path) -> None:
    dp = {"dp": True, "target-epsilon": 8.0, "privacy-horizon-rounds": 2, "dp-noise": "seeded"}
    sites = {name: _simulated_site(tmp_path, name, _cfg(mb, **dp)) for name, mb in (("cached", 512), ("uncached", 0))}
    replies = {name: [site.train(r) for r in (1, 2)] for name, site in sites.items()}
    assert CACHE.misses > 0 and CACHE.hits > 0, "the cached site used the cache"

    ledgers = {name: PrivacyLedger.load(SiteStore(tmp_path / name, "site-0000")) for name in sites}
    cached, uncached = ledgers["cached"], ledgers["uncached"]
    assert cached.rounds == uncached.rounds == 2
    assert cached.history == uncached.history, "same noise multiplier, sample rate and steps"
    assert cached.releases == uncached.releases
    assert cached.epsilon(1e-5) == uncached.epsilon(1e-5) <= 8.0
    for key in ("epsilon", "steps", "sample-rate", "noise-multiplier"):
        assert [r[key] for r in replies["cached"]] == [r[key] for r in replies["uncached"]], key
    # seeded noise: the same draws on both, so the models agree up to the float error of the features
    assert _close(sites["cached"].arrays, sites["uncached"].arrays, atol=1e-4)


def test_an_ingested_shard_is_computed_afresh_and_only_it(tmp_path: Path, mnist: dict[str, np.ndarray]) -> None:
    sites = {}
    for name, mb in (("cached", 512), ("uncached", 0)):
        (tmp_path / name / "inbox").mkdir(parents=True)
        sites[name] = _real_site(tmp_path, name, _cfg(mb), {"data-dir": str(tmp_path / name / "inbox")})

    def drop(shard: str, rows: slice) -> None:
        for name in sites:
            np.savez(tmp_path / name / "inbox" / shard, x=mnist["x"][rows], y=mnist["y"][rows])

    def both(server_round: int) -> tuple[int, int]:
        sites["uncached"].train(server_round)
        return _misses_and_hits(sites["cached"], server_round)

    drop("a.npz", slice(0, 120))
    assert both(1) == (120, 0)
    drop("b.npz", slice(120, 200))
    assert both(2) == (80, 120), "only the new shard's records are computed"
    assert both(3) == (0, 200)
    assert _close(sites["cached"].arrays, sites["uncached"].arrays), "no stale features: same model as uncached"


def test_a_stream_round_whose_view_changed_is_computed_afresh(tmp_path: Path) -> None:
    sites = {
        name: _simulated_site(tmp_path, name, _cfg(mb, scenario="rotation"))
        for name, mb in (("cached", 512), ("uncached", 0))
    }
    misses_5, hits_5 = _misses_and_hits(sites["cached"], 5)
    assert misses_5 > 0 and hits_5 == 0
    assert _misses_and_hits(sites["cached"], 5) == (0, misses_5), "the same view again: nothing computed"
    assert _misses_and_hits(sites["cached"], 6) == (misses_5, 0), "round 6 rotates every image: all new"
    for server_round in (5, 5, 6):
        sites["uncached"].train(server_round)
    assert _close(sites["cached"].arrays, sites["uncached"].arrays)


def test_server_evaluation_on_cached_features_matches_the_model(mnist: dict[str, np.ndarray]) -> None:
    model = build_model("scatnet28", SHAPE, 10, seed=3)
    x, y = torch.from_numpy(mnist["x_test"][:200]), torch.from_numpy(mnist["y_test"][:200])
    uncached = evaluate_centrally(model, ServerData(SHAPE, 10, x, y, feature_cache_mb=0))
    assert CACHE.misses == 0
    data = ServerData(SHAPE, 10, x, y, feature_cache_mb=64)
    first, second = evaluate_centrally(model, data), evaluate_centrally(model, data)
    assert (CACHE.misses, CACHE.hits) == (200, 200), "the test split's features are computed once per process"
    assert uncached is not None and first == second
    assert first[1] == uncached[1] and first[0] == pytest.approx(uncached[0], abs=1e-5)


@pytest.mark.slow
def test_the_dp_demo_run_spends_the_same_privacy_with_and_without_the_cache(tmp_path: Path) -> None:
    """The real CLI, the DP demo's settings on 2 sites for 2 rounds, seeded noise: the same ledgers and model."""
    demo = ("--clients", "2", "--rounds", "2", "--dp", "--target-epsilon", "8", "--privacy-horizon-rounds", "2")
    sets = ("model=scatnet28", "lr=0.1", "server-momentum=0.5", "holdout-fraction=0", "dp-noise=seeded")
    privacy, models = {}, {}
    for mb in (512, 0):
        out = tmp_path / f"cache-{mb}"
        run_stamen_simulate(out, *demo, *(arg for key in (*sets, f"feature-cache-mb={mb}") for arg in ("--set", key)))
        privacy[mb] = json.loads((out / "summary.json").read_text())["privacy"]["per_client"]
        models[mb] = load_file(out / "model.safetensors")
    assert len(privacy[512]) == 2 and privacy[512] == privacy[0], "same epsilon, history (sigma, rate, steps)"
    assert all(site["rounds"] == 2 and 0 < site["epsilon"] <= 8 for site in privacy[0].values())
    assert _close(models[512], models[0], atol=1e-4)
