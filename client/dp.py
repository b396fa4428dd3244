"""Sample-level DP-SGD for one round of local training, through Opacus.

Opacus's ``PrivacyEngine`` does the privacy-critical parts: Poisson sampling of each
logical batch, per-sample clipping to ``max_grad_norm`` and Gaussian noise of
``noise_multiplier * max_grad_norm``; ``BatchMemoryManager`` splits a logical batch of
``batch-size * accum-steps`` into physical batches of ``batch-size``. The rest follows
:func:`client.train.train_local`: the optimizer, the global LR schedule per optimizer
step, bf16 autocast.

Privacy accounting does not trust the configuration: the round's Opacus accountant is
fed by the DP optimizer's step hook, which runs once per noisy step actually taken, and
:meth:`DPTrainResult.commit` writes exactly that to the site's
:class:`~stamen.client.ledger.PrivacyLedger`. A round on a site goes through the site's privacy
front door, :class:`client.privacy.SitePrivacy`: it plans the round (released size, noise,
rate), this module trains it, and the front door charges ``DPTrainResult.commit`` to the
ledger(s) before the reply is built.

Opacus runs with ``secure_mode=False`` (it needs ``torchcsprng``, archived and not built
for this torch): the Poisson sampler and the noise come from torch generators given two
independent seeds, which :mod:`client.noise` makes secret and fresh per attempt (or, under
``dp-noise = seeded``, derives from the run seed).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from stamen.client.ledger import Ledger, check_accountant
from stamen.client.train import TrainResult, autocast_dtype, make_optimizer
from stamen.common.config import StamenConfig
from stamen.common.errors import ConfigError
from stamen.common.models import check_private_model
from stamen.common.schedule import lr_at

# The per-sample modes a round may run (``dp-grad-sample-mode``). "hooks": Opacus's per-sample
# gradients. "ghost": Opacus's ghost clipping, per-sample norms of Linear and Embedding layers
# without their per-sample gradients (other layers' come from the same hooks), and a second
# backward pass of the loss re-weighted by the clip factors; both clip every example to
# max_grad_norm with the same factor, so the noise and the accounting are the same. Of the
# other modes, "ew" fails on an empty Poisson batch and under bf16 autocast, and "functorch"
# is slower and fails on an empty batch through a conv layer (measured on CPU, cnn28).
GRAD_SAMPLE_MODES = ("hooks", "ghost")


def grad_sample_mode(cfg: StamenConfig, device: torch.device) -> str:
    """The mode a round runs: the configured one, or "hooks" where ghost clipping cannot clip right.

    Under bf16 autocast Opacus takes ghost norms in bf16, as it does the hooks' norms that
    :class:`Fp32ClipOptimizer` re-takes in fp32; ghost clipping has no such place to mend, so a
    bf16 round falls back to hooks. The choice depends on the configuration and device only,
    never on the data, so the run record can say which mode every site ran.
    """
    asked = str(cfg["dp-grad-sample-mode"])  # one of GRAD_SAMPLE_MODES: the config table checked it
    if asked == "ghost" and autocast_dtype(str(cfg["precision"]), device) is not None:
        return "hooks"
    return asked


class Fp32ClipOptimizer(DPOptimizer):
    """Opacus's DPOptimizer, clipping per-sample gradients in fp32.

    Under bf16 autocast the per-sample gradients Opacus's hooks compute are bf16, and
    Opacus 1.6 takes their norms (and so the clip factors) in that dtype before casting
    the gradients to the parameters' fp32: clipped gradients then overshoot
    ``max_grad_norm`` by up to 0.7 %, and the sensitivity the accountant assumes is wrong.
    Casting ``p.grad_sample`` to fp32 first is the smallest change at the one place the
    norms are taken; everything else (noise, scaling, hooks) stays Opacus's.
    """

    def clip_and_accumulate(self) -> None:
        for p in self.params:
            grads = p.grad_sample
            p.grad_sample = [g.float() for g in grads] if isinstance(grads, list) else grads.float()
        super().clip_and_accumulate()


class Fp32ClipPrivacyEngine(PrivacyEngine):
    """Opacus's PrivacyEngine, making :class:`Fp32ClipOptimizer` (flat clipping, one process).

    ``_prepare_optimizer`` is where ``make_private`` picks its optimizer class; Opacus
    offers no argument for a custom one, so this overrides that one step and keeps the rest
    (module wrapping, accountant hook, data loader) as Opacus does it.
    """

    def _prepare_optimizer(  # type: ignore[override]
        self,
        *,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        noise_generator: torch.Generator | None = None,
        clipping: str = "flat",
        distributed: bool = False,
        grad_sample_mode: str = "hooks",
        **_: object,
    ) -> DPOptimizer:
        if clipping != "flat" or distributed:
            raise ConfigError(f"DP-SGD here clips flat on one process, not clipping={clipping!r}, {distributed=}")
        # ghost clipping clips inside its backward pass: Opacus's own optimizer for it, fp32 only
        optimizer_class = DPOptimizerFastGradientClipping if grad_sample_mode == "ghost" else Fp32ClipOptimizer
        return optimizer_class(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            generator=noise_generator,
            secure_mode=False,
        )


@dataclass(frozen=True)
class DPTrainResult(TrainResult):
    """A DP round's report, counted by the optimizer's step hook (``steps`` == ``steps_executed``).

    ``grad_norm`` is the mean norm of the noised gradient (private); ``train_loss`` is
    computed on the raw data and is not.
    """

    steps_executed: int
    sample_rate: float
    noise_multiplier: float
    grad_sample_mode: str = "hooks"

    def commit(self, ledger: Ledger) -> None:
        """Charge this round to the site's ledger; call before the update leaves the site."""
        ledger.record(self.noise_multiplier, self.sample_rate, self.steps_executed)


def batches_per_epoch(num_examples: int, cfg: StamenConfig) -> int:
    """Logical (Poisson) batches per epoch, ``ceil(num_examples / logical batch)``, in integers.

    The one source of the round's sample rate (``1 / batches_per_epoch``) and step count:
    the sampler, the accountant, the plan and the refusal check all read it, never a float
    round trip (``int(1 / (1 / k))`` is ``k - 1`` for k = 93 and 69 other k <= 1000).
    """
    logical_batch = int(cfg["batch-size"]) * int(cfg["accum-steps"])
    if num_examples < 1 or logical_batch < 1:
        raise ConfigError(f"a DP round needs >= 1 example and batch, got {num_examples} and {logical_batch}")
    return -(-num_examples // logical_batch)


def dp_schedule(num_examples: int, cfg: StamenConfig) -> tuple[float, int]:
    """``(sample_rate, noisy steps per round)`` for a site of ``num_examples``, to plan before training.

    On a DP site ``num_examples`` is the *released* count (:mod:`client.release`), so the
    schedule — and everything computed from it that leaves the site — is post-processing
    of a charged release, never of the exact size. The rate is ``1 / k`` and the round
    takes ``local-epochs * k`` steps, ``k`` = :func:`batches_per_epoch`; :func:`train_private`
    gives Opacus's sampler exactly ``k`` batches per epoch.
    """
    k = batches_per_epoch(num_examples, cfg)
    return 1 / k, int(cfg["local-epochs"]) * k


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: StamenConfig,
    *,
    server_round: int,
    seed: int,
    device: torch.device,
    noise_multiplier: float,
    max_grad_norm: float,
    planned_examples: int,
    accountant_name: str = "rdp",
    noise_seed: int | None = None,
    before_noise: Callable[[DPOptimizer], None] | None = None,
) -> DPTrainResult:
    """Run ``local-epochs`` of DP-SGD and load the result into ``model`` (unwrapped keys).

    Opacus wraps a fresh copy each round, so hooks are never added twice to the caller's
    cached model object. ``seed`` drives the Poisson sampler, ``noise_seed`` (default
    ``seed + 1``) the noise; both must come from :mod:`client.noise` on a site. The
    sample rate comes from ``planned_examples`` (the released count, see
    :func:`dp_schedule`) and the noisy sum is divided by the expected batch computed from
    it, so no exact record count enters what leaves the site.

    ``before_noise`` is for the privacy audit only (:mod:`simulations.audit`): called on
    each noisy step with the optimizer after clipping (``p.summed_grad`` holds the sum of
    clipped per-sample gradients) and before Opacus adds the noise. The ClientApp never
    passes it and no run-config key reaches it, so no instruction can switch it on.
    """
    if not (noise_multiplier > 0 and max_grad_norm > 0):
        raise ConfigError(
            f"DP-SGD needs noise-multiplier > 0 and max-grad-norm > 0, got {noise_multiplier}, {max_grad_norm}"
        )
    check_accountant(accountant_name)
    if cfg["precision"] == "fp16":
        raise ConfigError("precision fp16 is not supported with DP-SGD (no loss scaling there); use bf16 or fp32")
    amp_dtype = autocast_dtype(str(cfg["precision"]), device)
    batch_size, accum, epochs = int(cfg["batch-size"]), int(cfg["accum-steps"]), int(cfg["local-epochs"])

    work = copy.deepcopy(model).to(device).train()
    check_private_model(work)
    rate, _ = dp_schedule(planned_examples, cfg)
    # Opacus's own Poisson sampler, told the batch count: left to itself it draws int(1 / rate) batches.
    sampler = UniformWithReplacementSampler(
        num_samples=len(y),
        sample_rate=rate,
        generator=torch.Generator().manual_seed(seed),
        steps=batches_per_epoch(planned_examples, cfg),
    )
    loader = DataLoader(TensorDataset(x, y), batch_sampler=sampler)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = Fp32ClipPrivacyEngine(accountant=accountant_name, secure_mode=False)
    mode = grad_sample_mode(cfg, device)
    private = engine.make_private(
        module=work,
        optimizer=make_optimizer(work, cfg),
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 1 if noise_seed is None else noise_seed),
        grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),  # ghost clipping's loss wrapper takes it; hooks ignore it
        poisson_sampling=False,  # the loader above already samples Poisson at the planned rate
    )
    if mode == "ghost":
        dp_model, optimizer, criterion, dp_loader = private
    else:
        dp_model, optimizer, dp_loader = private
        criterion = _mean_cross_entropy
    optimizer.expected_batch_size = max(1, round(planned_examples * rate))
    if before_noise is not None:
        add_noise = optimizer.add_noise

        def add_noise_after_hook() -> None:
            before_noise(optimizer)
            add_noise()

        optimizer.add_noise = add_noise_after_hook  # type: ignore[method-assign]
    accountant_hook = optimizer.step_hook
    norms: list[float] = []

    def on_noisy_step(opt: DPOptimizer) -> None:
        accountant_hook(opt)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in opt.params]))))

    optimizer.attach_step_hook(on_noisy_step)
    expected_steps = epochs * len(dp_loader)
    loss_sum, seen, lr = 0.0, 0, float(cfg["lr"])
    try:
        with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=batch_size, optimizer=optimizer) as bmm:
            # Index the tensors directly: the samplers are Opacus's, the per-item collate is skipped.
            sampler = bmm.batch_sampler if accum > 1 else dp_loader.batch_sampler
            for _ in range(epochs):
                for idx in sampler:
                    index = torch.as_tensor(idx, dtype=torch.long)
                    xb, yb = x[index].to(device), y[index].to(device)
                    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                    with ctx:
                        loss = criterion(dp_model(xb), yb)
                    loss.backward()
                    if len(yb):  # ghost clipping's loss of an empty batch is the mean of nothing
                        loss_sum += float(loss.detach()) * len(yb)
                    seen += len(yb)
                    # only the last physical batch of a logical one steps, so len(norms) is the step index
                    lr = lr_at(server_round - 1 + (len(norms) + 1) / expected_steps, cfg)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        ((sigma, rate, steps),) = engine.accountant.history
        model.load_state_dict(work.state_dict())
    finally:
        dp_model._close()
    return DPTrainResult(
        train_loss=loss_sum / max(seen, 1),
        grad_norm=sum(norms) / max(len(norms), 1),
        lr=lr,
        num_examples=len(y),
        steps=steps,
        steps_executed=steps,
        sample_rate=rate,
        noise_multiplier=sigma,
        grad_sample_mode=mode,
    )


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the physical batch, 0 (not NaN) for an empty Poisson batch (the hooks mode's loss)."""
    return F.cross_entropy(logits, labels, reduction="sum") / max(len(labels), 1)
