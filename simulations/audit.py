"""``stamen audit``: an empirical privacy audit of a site's DP-SGD, in the server's position.

The one-run canary audit of Steinke, Nasr, Jagielski 2023 ("Privacy Auditing with One
(1) Training Run"), beside the accountant: the ledger says what a site spends, the audit
measures, from what the site releases, a 95 % lower bound ``eps_lb`` that no correct
(eps, delta)-DP mechanism can exceed (except with 5 % chance). It is the empirical test
of SECURITY.md's claim that the server cannot regenerate a site's noise.

What runs is the site's real DP-SGD: :func:`stamen.client.dp.train_private` (Opacus,
the site's Poisson sampler) with seeds from :func:`stamen.client.noise.attempt_seeds`,
charged to a real :class:`~stamen.client.ledger.PrivacyLedger` and calibrated by
:func:`~stamen.client.ledger.calibrate_noise`, on one site holding mnist5k's train split,
over ``rounds`` rounds. The audit sets its own training settings (logreg, plain SGD:
momentum 0, no weight decay, constant lr), so a round's update is linear in its noisy
gradient sums and each score reads one coordinate of them.

- **Canaries**: ``m`` white-box Dirac gradients ``C * e_j`` (norm exactly the clip bound
  ``C``) on ``m`` distinct weights of input pixels that are 0 in every image of the public
  test split, so the data hardly touch those coordinates. The auditor's own coins include
  each with probability 1/2. On each noisy step an included canary joins the sum of
  clipped per-sample gradients before the noise (the ``before_noise`` hook of
  ``train_private``) with the sampler's rate ``q``, exactly as one more record of the site
  would be: the ledger's epsilon is a guarantee for records Poisson-sampled at ``q``; a
  canary in every step would be another mechanism, which that epsilon does not bound.
- **Scores** come only from the released updates: ``score_j = -sum_r update_r[j] * B / lr``
  (expected batch ``B`` and ``lr`` are public). With ``noise = "seeded"`` the auditor is
  given the run seed, derives the site's noise seeds as ``client.noise`` does under
  ``dp-noise = seeded``, regenerates Opacus's noise draw for draw and subtracts it; with
  ``"secret"`` it cannot.
- **Guesses**: "in" for the ``k`` highest scores, "out" for the ``k`` lowest, abstain on
  the rest (``2k = guess_fraction * m``, fixed before any score is seen);
  :func:`simulations.audit_bound.epsilon_lower_bound` turns the ``v`` correct of ``r``
  guesses into ``eps_lb``.

Simulation only: canaries are reached from this module alone. There is no run-config key
for them, so no server instruction can ask a real node (or a simulated site) for one.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from rich.table import Table
from torch import nn

from stamen.client.dp import dp_schedule, train_private
from stamen.client.ledger import PrivacyLedger, calibrate_noise
from stamen.client.noise import attempt_seeds
from stamen.client.train import round_seed
from stamen.common.config import StamenConfig
from stamen.common.datasets import Dataset, load_dataset
from stamen.common.errors import ConfigError
from stamen.common.models import build_model
from stamen.common.runrecord import derive_seeds
from stamen.common.state import SiteStore, atomic_write_json
from stamen.simulations.audit_bound import ceiling, epsilon_lower_bound
from stamen.simulations.bench.machine import LoadSampler, machine_info

NOISE_MODES = ("secret", "seeded")
SITE_ID = "audit-site"
#: the bench entry schema (:mod:`simulations.bench.runner`): audit.json reads like a bench.json
RESULT_SCHEMA = 1


@dataclass(frozen=True)
class AuditSettings:
    """One audit's size and the site's DP settings (the audit chooses them; see the module doc)."""

    canaries: int = 1000
    rounds: int = 10
    target_epsilon: float = 2.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    lr: float = 0.1
    batch_size: int = 256
    model: str = "logreg"
    dataset: str = "mnist5k"
    guess_fraction: float = 0.5
    records: int | None = None  # the first ``records`` of the train split (None: all); smaller for tests

    def config(self, noise: str, seed: int) -> StamenConfig:
        """The run config the site trains under: DP at the target, plain SGD, constant lr."""
        if noise not in NOISE_MODES:
            raise ConfigError(f"audit noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
        if self.canaries < 2 or self.rounds < 1:
            raise ConfigError(f"the audit needs >= 2 canaries and >= 1 round, got {self.canaries} and {self.rounds}")
        if not 0 < self.guess_fraction <= 1:
            raise ConfigError(f"guess fraction must be in (0, 1], got {self.guess_fraction!r}")
        return StamenConfig.from_mapping(
            {
                "dataset": self.dataset,
                "model": self.model,
                "seed": seed,
                "dp": True,
                "dp-noise": noise,
                "target-epsilon": self.target_epsilon,
                "delta": self.delta,
                "max-grad-norm": self.max_grad_norm,
                "privacy-horizon-rounds": self.rounds,
                "num-server-rounds": self.rounds,
                "optimizer": "sgd",
                "momentum": 0.0,
                "weight-decay": 0.0,
                "lr": self.lr,
                "lr-schedule": "constant",
                "warmup-rounds": 0.0,
                "batch-size": self.batch_size,
                "local-epochs": 1,
                "precision": "fp32",
            }
        )


@dataclass(frozen=True)
class AuditRow:
    """One audit's outcome: ``correct`` of ``guesses`` about ``canaries``, ``epsilon_lb`` beside the ledger's."""

    seed: int
    noise: str
    canaries: int
    guesses: int
    correct: int
    epsilon_lb: float
    epsilon: float
    delta: float
    ceiling: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    rounds: int
    seconds: float


def flat(model: nn.Module) -> torch.Tensor:
    """All parameters in ``model.parameters()`` order (the DP optimizer's), as one float64 vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()]).double()


def canary_coordinates(model: nn.Module, public: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` distinct flat coordinates of the first layer's weights whose input is 0 in all of ``public``.

    The auditor chooses them from public data only (the test split), so they say nothing of
    the site's records; a pixel the site's data does light up only makes the audit weaker.
    """
    first = next(model.parameters())
    pixels = np.flatnonzero(public.reshape(len(public), -1).max(axis=0) == 0)
    if first.dim() != 2 or first.shape[1] != public[0].size:
        raise ConfigError("the audit needs a model whose first parameter is a Linear weight on the flattened input")
    candidates = (np.arange(first.shape[0])[:, None] * first.shape[1] + pixels[None, :]).ravel()
    if m > len(candidates):
        raise ConfigError(
            f"--canaries {m} is more than the {len(candidates)} weights of always-0 pixels this model has"
        )
    return np.sort(rng.choice(candidates, size=m, replace=False))


class Canaries:
    """The ``before_noise`` hook: each included canary joins a noisy step's clipped sum with rate ``q``.

    ``joins[i]`` counts the steps canary ``i`` joined, so a test can check its score.
    """

    def __init__(
        self, coords: np.ndarray, included: np.ndarray, clip: float, rate: float, size: int, seed: int
    ) -> None:
        self.coords = torch.as_tensor(coords, dtype=torch.long)
        self.included = torch.as_tensor(included, dtype=torch.bool)
        self.clip, self.rate, self.size = clip, rate, size
        self.joins = np.zeros(len(coords), dtype=np.int64)
        self._coins = torch.Generator().manual_seed(seed)

    def __call__(self, optimizer: DPOptimizer) -> None:
        joined = self.included & (torch.rand(len(self.coords), generator=self._coins) < self.rate)
        self.joins += joined.numpy()
        canary = torch.zeros(self.size)
        canary[self.coords[joined]] = self.clip
        sums = [p.summed_grad for p in optimizer.params]
        for summed, part in zip(sums, torch.split(canary, [s.numel() for s in sums]), strict=True):
            summed.add_(part.view_as(summed).to(summed))


def regenerated_noise(model: nn.Module, noise_seed: int, steps: int, std: float) -> torch.Tensor:
    """The sum over ``steps`` of Opacus's noise drawn from ``noise_seed``, flat: what a server that
    knows the seed subtracts. Draws every parameter of every step, in the optimizer's order."""
    generator = torch.Generator().manual_seed(noise_seed)
    total = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for _ in range(steps):
        total += torch.cat(
            [_generate_noise(std=std, reference=p.detach(), generator=generator).flatten() for p in model.parameters()]
        ).double()
    return total


def guess(scores: np.ndarray, included: np.ndarray, fraction: float) -> tuple[int, int]:
    """``(guesses, correct)``: "in" for the top ``k`` scores, "out" for the bottom ``k``, ``2k = fraction * m``."""
    k = max(1, int(fraction * len(scores)) // 2)
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
    return 2 * k, correct


def site_data(settings: AuditSettings) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    data = load_dataset(settings.dataset)
    if data.x_test is None:
        raise ConfigError(f"the audit picks canary coordinates from a public test split; {settings.dataset} has none")
    x, y = data.x_train[: settings.records], data.y_train[: settings.records]
    return data, torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def run_audit(seed: int, noise: str, settings: AuditSettings) -> AuditRow:
    """One audit: ``settings.rounds`` DP rounds of the site with canaries, scored from its updates."""
    t0 = time.monotonic()
    cfg = settings.config(noise, seed)
    data, x, y = site_data(settings)
    n = len(y)
    rate, steps_per_round = dp_schedule(n, cfg)
    sigma = calibrate_noise(settings.target_epsilon, settings.delta, rate, steps_per_round, settings.rounds)
    model = build_model(settings.model, tuple(data.input_shape), data.num_classes, seed=seed)
    rng = np.random.default_rng([seed, 0xA0D17])  # the auditor's own coins, nobody else's
    coords = canary_coordinates(model, data.x_test, settings.canaries, rng)
    included = rng.random(settings.canaries) < 0.5
    size = sum(p.numel() for p in model.parameters())
    canaries = Canaries(coords, included, settings.max_grad_norm, rate, size, int(rng.integers(2**62)))
    expected_batch = max(1, round(n * rate))
    scores = np.zeros(settings.canaries)
    steps = 0
    with tempfile.TemporaryDirectory(prefix="stamen-audit-") as root, warnings.catch_warnings():
        # Opacus's hooks warn every step that the input needs no gradient: true and harmless here
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        store = SiteStore(root, SITE_ID)
        ledger = PrivacyLedger.load(store, "rdp", delta=settings.delta)
        for rnd in range(1, settings.rounds + 1):
            public_seed = round_seed(derive_seeds(seed)["client"], SITE_ID, rnd)
            seeds = attempt_seeds(noise, store, public_seed, rnd)
            before = flat(model)
            result = train_private(
                model,
                x,
                y,
                cfg,
                server_round=rnd,
                seed=seeds.sampling,
                noise_seed=seeds.noise,
                device=torch.device("cpu"),
                noise_multiplier=sigma,
                max_grad_norm=settings.max_grad_norm,
                planned_examples=n,
                before_noise=canaries,
            )
            result.commit(ledger)
            steps += result.steps
            score = -(flat(model) - before) * expected_batch / settings.lr
            if noise == "seeded":  # the server's attack: the seeded derivation from the public run seed
                server_guess = attempt_seeds("seeded", store, public_seed, rnd).noise
                score -= regenerated_noise(model, server_guess, result.steps, sigma * settings.max_grad_norm)
            scores += score[coords].numpy()
        epsilon = ledger.epsilon(settings.delta)
    guesses, correct = guess(scores, included, settings.guess_fraction)
    return AuditRow(
        seed=seed,
        noise=noise,
        canaries=settings.canaries,
        guesses=guesses,
        correct=correct,
        epsilon_lb=epsilon_lower_bound(settings.canaries, guesses, correct, settings.delta),
        epsilon=epsilon,
        delta=settings.delta,
        ceiling=ceiling(guesses),
        noise_multiplier=sigma,
        sample_rate=rate,
        steps=steps,
        rounds=settings.rounds,
        seconds=time.monotonic() - t0,
    )


def run_audits(
    seeds: Iterable[int], modes: Iterable[str], settings: AuditSettings, on_row: Callable[[AuditRow], None]
) -> list[AuditRow]:
    """Every (seed, mode) audit in turn; ``on_row`` sees each as it ends."""
    rows = []
    for seed in seeds:
        for mode in modes:
            rows.append(run_audit(seed, mode, settings))
            on_row(rows[-1])
    return rows


def table(rows: Iterable[AuditRow]) -> Table:
    """The audit's rich table: eps_lb beside the ledger's epsilon, per seed and noise mode."""
    out = Table(title="stamen audit: one-run canary audit (Steinke et al. 2023), 95 % lower bound")
    for name in ("seed", "noise", "canaries m", "guesses r", "correct v", "eps_lb (95%)", "ledger eps", "delta"):
        out.add_column(name, justify="right")
    for r in rows:
        lb = f"{r.epsilon_lb:.3f}"
        lb = f"[bold red]{lb}[/]" if r.epsilon_lb > r.epsilon else lb
        out.add_row(
            str(r.seed),
            r.noise,
            str(r.canaries),
            str(r.guesses),
            str(r.correct),
            lb,
            f"{r.epsilon:.3f}",
            f"{r.delta:g}",
        )
    return out


def write_results(path: Path, rows: list[AuditRow], settings: AuditSettings, started: str, load: LoadSampler) -> None:
    """``path`` as a bench.json of one entry (scenario ``audit``): params, figures (one per row), machine."""
    entry: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "scenario": "audit",
        "started": started,
        "line": "; ".join(f"seed {r.seed} {r.noise}: eps_lb {r.epsilon_lb:.3f} / ledger {r.epsilon:.3f}" for r in rows),
        "params": asdict(settings),
        "figures": {"rows": [asdict(r) for r in rows]},
        "met": all((r.epsilon_lb <= r.epsilon) == (r.noise == "secret") for r in rows),
        "seconds": sum(r.seconds for r in rows),
        "load_average": load.report(),
        "machine": machine_info(),
    }
    atomic_write_json(path, [entry], mode=0o644)


def audit(
    seeds: list[int], modes: list[str], settings: AuditSettings, out: Path | None, on_row: Callable[[AuditRow], None]
) -> list[AuditRow]:
    """Run the audits (under a load sampler) and write ``out`` if given."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    with LoadSampler() as load:
        rows = run_audits(seeds, modes, settings, on_row)
    if out is not None:
        write_results(out, rows, settings, started, load)
    return rows
