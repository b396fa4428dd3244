"""DP-SGD through Opacus and the site's privacy ledger.

The ledger must compose every round a site ever trained (in this process or the next),
count the noisy steps the optimizer really took, and never reset.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from stamen.client.dp import DPTrainResult, batches_per_epoch, dp_schedule, train_private
from stamen.client.ledger import PrivacyLedger, calibrate_noise
from stamen.common.config import StamenConfig
from stamen.common.convert import model_to_arrays
from stamen.common.errors import ConfigError, StateError
from stamen.common.models import build_model, check_private_model
from stamen.common.state import SiteStore

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5
SIGMA = 1.1
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small batches: extra threads only spin


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _cfg(**changes: object) -> StamenConfig:
    return StamenConfig.from_mapping({"batch-size": 4, "accum-steps": 2, "num-server-rounds": 3, **changes})


def _train(model: nn.Module, cfg: StamenConfig, server_round: int = 1, seed: int = 7) -> DPTrainResult:
    x, y = _data()
    return train_private(
        model,
        x,
        y,
        cfg,
        server_round=server_round,
        seed=seed,
        device=CPU,
        noise_multiplier=SIGMA,
        max_grad_norm=1.0,
        planned_examples=len(y),
    )


def _model() -> nn.Module:
    return build_model("cnn8", (1, 8, 8), 4, seed=0)


def _store(tmp_path: Path) -> SiteStore:
    return SiteStore(tmp_path / "sites", "site-a")


def test_ledger_composes_rounds_and_records_hook_counted_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut each epoch short: the ledger must hold the steps taken, not the steps planned."""
    taken_per_epoch = 5
    poisson_iter = UniformWithReplacementSampler.__iter__
    monkeypatch.setattr(
        UniformWithReplacementSampler, "__iter__", lambda s: itertools.islice(poisson_iter(s), taken_per_epoch)
    )
    real_updates = 0
    sgd_step = torch.optim.SGD.step

    def counting_step(self: torch.optim.SGD, *args: object, **kwargs: object) -> object:
        nonlocal real_updates
        real_updates += 1
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)

    cfg, model, ledger = _cfg(), _model(), PrivacyLedger.load(_store(tmp_path))
    rate, planned = dp_schedule(64, cfg)
    assert (rate, planned) == (1 / 8, 8)
    results = []
    for server_round in (1, 2, 3):
        result = _train(model, cfg, server_round=server_round)
        result.commit(ledger)
        results.append(result)

    assert [r.steps_executed for r in results] == [taken_per_epoch] * 3
    assert ledger.steps == real_updates == 3 * taken_per_epoch != 3 * planned
    assert ledger.rounds == 3
    fresh = RDPAccountant()
    for r in results:
        for _ in range(r.steps_executed):
            fresh.step(noise_multiplier=r.noise_multiplier, sample_rate=r.sample_rate)
    one_round = RDPAccountant()
    one_round.history = [(SIGMA, rate, taken_per_epoch)]
    assert ledger.epsilon(DELTA) == pytest.approx(fresh.get_epsilon(DELTA), rel=0.01)
    assert ledger.epsilon(DELTA) > one_round.get_epsilon(DELTA)
    assert PrivacyLedger.load(_store(tmp_path)).history == ledger.history


def test_planned_steps_match_what_opacus_runs() -> None:
    cfg = _cfg(**{"local-epochs": 2, "accum-steps": 3})
    rate, planned = dp_schedule(64, cfg)
    result = _train(_model(), cfg)
    assert (result.sample_rate, result.steps_executed, result.steps) == (rate, planned, planned)


def test_new_process_continues_the_ledger(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(_store(tmp_path))
    ledger.record(SIGMA, 1 / 8, 8)
    before = ledger.epsilon(DELTA)
    script = (
        "import json, sys\n"
        "from stamen.client.ledger import PrivacyLedger\n"
        "from stamen.common.state import SiteStore\n"
        "ledger = PrivacyLedger.load(SiteStore(sys.argv[1], 'site-a'))\n"
        "eps_loaded = ledger.epsilon(1e-5)\n"
        "ledger.record(1.1, 0.125, 8)\n"
        "print(json.dumps({'loaded': eps_loaded, 'after': ledger.epsilon(1e-5)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "sites")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == pytest.approx(before)
    reloaded = PrivacyLedger.load(_store(tmp_path))
    assert (reloaded.rounds, reloaded.steps, reloaded.history) == (2, 16, ((SIGMA, 1 / 8, 16),))
    assert reloaded.epsilon(DELTA) == pytest.approx(seen["after"])
    assert seen["after"] > before


def test_round_that_would_exceed_the_budget_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger.load(_store(tmp_path))
    ledger.record(SIGMA, 1 / 8, 8)
    now, after = ledger.epsilon(DELTA), ledger.epsilon_after(SIGMA, 1 / 8, 8, DELTA)
    assert now < after
    budget = (now + after) / 2
    reason = ledger.refusal(SIGMA, 1 / 8, 8, DELTA, budget)
    assert reason is not None and "budget" in reason
    assert ledger.refusal(SIGMA, 1 / 8, 8, DELTA, after * 1.01) is None
    assert (ledger.rounds, ledger.epsilon(DELTA)) == (1, now)  # planning spends nothing


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrated_noise_spends_the_target_over_the_horizon(tmp_path: Path, accountant: str) -> None:
    target, rate, steps, horizon = 2.0, 1 / 8, 8, 10
    sigma = calibrate_noise(target, DELTA, rate, steps, horizon, accountant)
    ledger = PrivacyLedger.load(_store(tmp_path), accountant)
    for _ in range(horizon):
        ledger.record(sigma, rate, steps)
    assert ledger.epsilon(DELTA) == pytest.approx(target, rel=0.02)
    with pytest.raises(ConfigError, match="cannot reach"):
        calibrate_noise(1e-9, DELTA, rate, steps, horizon, accountant)


def test_model_with_batchnorm_is_rejected_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 4)).eval()
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_private_model(model)
    with pytest.raises(ConfigError, match="cannot be trained with DP-SGD"):
        _train(model, _cfg())
    assert not model.training  # checking does not leave the caller's model in another mode
    fixed = check_private_model(model, fix=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())


def test_trained_model_keeps_canonical_keys_and_no_opacus_hooks() -> None:
    model = _model()
    keys = list(model.state_dict())
    for server_round in (1, 2):  # the same cached object, two rounds: never wrapped twice
        before = model_to_arrays(model)
        _train(model, _cfg(), server_round=server_round)
        after = model_to_arrays(model)
        assert list(after) == keys
        assert any((after[k] != before[k]).any() for k in keys)
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    assert not any(getattr(m, name) for m in model.modules() for name in hook_dicts)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_same_seed_same_weights() -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        model = _model()
        _train(model, _cfg(), seed=seed)
        return model.state_dict()

    first, again, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_accountant_mismatch_or_damage_never_resets_the_ledger(tmp_path: Path) -> None:
    store = _store(tmp_path)
    PrivacyLedger.load(store, "rdp").record(SIGMA, 1 / 8, 8)
    with pytest.raises(StateError, match="'rdp' accountant"):
        PrivacyLedger.load(store, "prv")
    store.write_json("privacy_ledger", {"accountant": "rdp", "history": [[SIGMA, 1 / 8, -1]], "rounds": 1})
    with pytest.raises(StateError, match="malformed"):
        PrivacyLedger.load(store)


def test_fp16_is_refused_bf16_trains() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        _train(_model(), _cfg(precision="fp16"))
    model = _model()
    result = _train(model, _cfg(precision="bf16"))
    assert result.steps_executed == dp_schedule(64, _cfg())[1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_server_and_sites_build_the_same_fixed_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import stamen.common.models as models

    def bn_net(shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, num_classes))

    monkeypatch.setitem(models.REGISTRY, "bnnet", bn_net)
    with pytest.raises(ConfigError, match="BatchNorm"):
        build_model("bnnet", (1, 8, 8), 4, seed=0, dp=True)
    server = build_model("bnnet", (1, 8, 8), 4, seed=0, dp=True, fix=True)
    site = build_model("bnnet", (1, 8, 8), 4, dp=True, fix=True)
    assert list(model_to_arrays(server)) == list(model_to_arrays(site))
    assert any(isinstance(m, nn.GroupNorm) for m in site.modules())
    assert build_model("bnnet", (1, 8, 8), 4).state_dict().keys() != server.state_dict().keys()


def test_scatnet28_trains_under_dp_and_sends_only_its_trainable_layers() -> None:
    """The DP demo's model: its fixed scattering filters never leave the site nor change."""
    model = build_model("scatnet28", (1, 8, 8), 4, seed=0, dp=True)
    keys = list(model.state_dict())
    assert keys == ["norm.weight", "norm.bias", "classifier.weight", "classifier.bias"]
    filters = {k: v.clone() for k, v in model.scattering.named_buffers()}
    assert filters  # the transform's filters are buffers, just not persistent ones
    other = build_model("scatnet28", (1, 8, 8), 4, seed=1, dp=True)
    assert all(torch.equal(filters[k], v) for k, v in other.scattering.named_buffers())
    before = model_to_arrays(model)
    _train(model, _cfg())
    after = model_to_arrays(model)
    assert list(after) == keys and all((after[k] != before[k]).any() for k in keys)
    assert all(torch.equal(filters[k], v) for k, v in model.scattering.named_buffers())
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_model("scatnet28", (1, 10, 10), 4)


def test_one_batch_count_for_every_k_and_the_ledger_records_the_planned_steps(tmp_path: Path) -> None:
    """``int(1 / (1 / k)) == k - 1`` for k = 93 (and 69 other k <= 1000): plan and sampler must not disagree."""
    for epochs, batch, accum in ((1, 1, 1), (3, 4, 2)):
        cfg = _cfg(**{"local-epochs": epochs, "batch-size": batch, "accum-steps": accum})
        logical = batch * accum
        for k in range(1, 1001):
            for n in {(k - 1) * logical + 1, k * logical}:
                assert batches_per_epoch(n, cfg) == k, (n, k)
                assert dp_schedule(n, cfg) == (1 / k, epochs * k), (n, k)
    cfg = _cfg(**{"batch-size": 1, "accum-steps": 1})
    x, y = _data(93)
    rate, planned = dp_schedule(93, cfg)
    assert planned == 93
    result = train_private(
        _model(), x, y, cfg, server_round=1, seed=0, device=CPU, noise_multiplier=SIGMA, max_grad_norm=1.0,
        planned_examples=93,
    )  # fmt: skip
    ledger = PrivacyLedger.load(_store(tmp_path))
    result.commit(ledger)
    assert ledger.history == ((SIGMA, rate, planned),) and ledger.steps == 93
    assert result.sample_rate == rate == 1 / 93


def test_clipped_per_sample_gradients_stay_within_the_bound_under_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measure the clipped per-sample gradients Opacus sums (its ``einsum("i,i...")``): none passes C."""
    clip = 0.05
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    einsum = torch.einsum

    def spying_einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
        if equation == "i,i...":
            calls.append((operands[0].detach().double(), operands[1].detach().double()))
        return einsum(equation, *operands)

    monkeypatch.setattr(torch, "einsum", spying_einsum)
    model = _model()
    x, y = _data()
    cfg = _cfg(precision="bf16", **{"batch-size": 16, "accum-steps": 1})
    train_private(
        model, x, y, cfg, server_round=1, seed=5, device=CPU, noise_multiplier=SIGMA, max_grad_norm=clip,
        planned_examples=len(y),
    )  # fmt: skip
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert calls and len(calls) % n_params == 0
    worst = 0.0
    for start in range(0, len(calls), n_params):
        squares = sum(
            (factor.reshape(-1, *[1] * (g.dim() - 1)) * g).flatten(1).pow(2).sum(1)
            for factor, g in calls[start : start + n_params]
        )
        if len(squares):
            worst = max(worst, float(squares.sqrt().max()))
    assert clip * 0.99 < worst <= clip * (1 + 1e-6), worst / clip
