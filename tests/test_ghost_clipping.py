"""Ghost clipping (``dp-grad-sample-mode = ghost``) clips exactly as the hooks mode does.

Both modes scale each example's gradient by ``min(1, C / (norm + 1e-6))``; if the norms agree
the clipped sum agrees, and with the same seeds the noise, the update and the ledger's figures
are the same draw. These tests measure that on every registered model, with gradient
accumulation and empty Poisson batches, and check the run record's mode.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stamen.client.dp import Fp32ClipPrivacyEngine, grad_sample_mode, train_private
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.models import REGISTRY, build_model

CPU = torch.device("cpu")
SHAPES = {"cnn8": (1, 8, 8)}  # the other registered models take 28x28 images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(shape: tuple[int, ...], n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _per_sample_norms(name: str, mode: str) -> torch.Tensor:
    """Per-sample gradient norms of one fixed batch, as each mode computes them for clipping."""
    shape = SHAPES.get(name, (1, 28, 28))
    model = build_model(name, shape, 10, seed=0, dp=True)
    x, y = _batch(shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = Fp32ClipPrivacyEngine(secure_mode=False)
    private = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=len(y)),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
        poisson_sampling=False,
    )
    try:
        if mode == "ghost":
            module, _, criterion, _ = private
            criterion(module(x), y).backward()
            return module.per_sample_gradient_norms.detach().double()
        module, _, _ = private
        nn.functional.cross_entropy(module(x), y).backward()
        params = [p for p in module.parameters() if p.requires_grad]
        return torch.stack([p.grad_sample.flatten(1).double().norm(dim=1) for p in params]).norm(dim=0)
    finally:
        module._close()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_ghost_norms_match_the_hooks_per_sample_norms_on_every_registered_model(name: str) -> None:
    hooks, ghost = _per_sample_norms(name, "hooks"), _per_sample_norms(name, "ghost")
    assert hooks.shape == ghost.shape == (12,)
    assert float(hooks.min()) > 0
    assert torch.allclose(ghost, hooks, rtol=1e-5, atol=1e-7), (ghost - hooks).abs().max()


def _cfg(mode: str, **changes: object) -> StamenConfig:
    # batch 1 out of 8 examples: Poisson rate 1/8, about a third of the batches empty
    return StamenConfig.from_mapping(
        {"batch-size": 1, "accum-steps": 1, "local-epochs": 3, "dp-grad-sample-mode": mode, **changes}
    )


def _round(name: str, cfg: StamenConfig) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], object]:
    """One DP round: the trained weights, each step's clipped sum before noise, the result."""
    shape = SHAPES.get(name, (1, 28, 28))
    model = build_model(name, shape, 10, seed=0, dp=True)
    x, y = _batch(shape, n=8)
    sums: list[dict[str, torch.Tensor]] = []

    def before_noise(opt: object) -> None:
        sums.append({str(i): p.summed_grad.detach().clone() for i, p in enumerate(opt.params)})  # type: ignore[attr-defined]

    result = train_private(
        model, x, y, cfg, server_round=1, seed=11, noise_seed=12, device=CPU, noise_multiplier=1.1,
        max_grad_norm=0.5, planned_examples=len(y), before_noise=before_noise,
    )  # fmt: skip
    return model.state_dict(), sums, result


@pytest.mark.parametrize(("name", "accum"), [("cnn8", 1), ("cnn8", 2), ("mlp", 1), ("scatnet28", 1)])
def test_a_ghost_round_clips_noises_and_counts_as_the_hooks_round(name: str, accum: int) -> None:
    hooks_weights, hooks_sums, hooks = _round(name, _cfg("hooks", **{"accum-steps": accum}))
    ghost_weights, ghost_sums, ghost = _round(name, _cfg("ghost", **{"accum-steps": accum}))
    assert (hooks.grad_sample_mode, ghost.grad_sample_mode) == ("hooks", "ghost")
    # the ledger's figures are the same: same steps, rate and noise
    assert (ghost.steps_executed, ghost.sample_rate, ghost.noise_multiplier) == (
        hooks.steps_executed,
        hooks.sample_rate,
        hooks.noise_multiplier,
    )
    assert len(ghost_sums) == len(hooks_sums) == hooks.steps_executed
    empty = sum(all(float(t.abs().max()) == 0 for t in step.values()) for step in hooks_sums)
    assert 0 < empty < len(hooks_sums), "the round should mix empty and non-empty Poisson batches"
    for step_hooks, step_ghost in zip(hooks_sums, ghost_sums, strict=True):
        for key, total in step_hooks.items():
            assert torch.allclose(step_ghost[key], total, rtol=1e-4, atol=1e-6), (key, step_ghost[key] - total)
    for key, weight in hooks_weights.items():
        assert torch.allclose(ghost_weights[key], weight, rtol=1e-4, atol=1e-5), key
    assert any(not torch.equal(weight, build_model(name, SHAPES.get(name, (1, 28, 28)), 10, seed=0,
                                                   dp=True).state_dict()[key])
               for key, weight in hooks_weights.items())  # fmt: skip


def test_bf16_falls_back_to_hooks_and_an_unknown_mode_is_named() -> None:
    assert grad_sample_mode(_cfg("ghost"), CPU) == "ghost"
    assert grad_sample_mode(_cfg("ghost", precision="bf16"), CPU) == "hooks"
    _, _, result = _round("cnn8", _cfg("ghost", precision="bf16"))
    assert result.grad_sample_mode == "hooks"
    with pytest.raises(ConfigError, match="dp-grad-sample-mode"):
        StamenConfig.from_mapping({"dp-grad-sample-mode": "ew"})
