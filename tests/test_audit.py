"""``stamen audit``: the one-run canary audit's bound, its canaries inside the real DP-SGD step, and
the audit itself (secret noise holds the ledger's epsilon; seeded noise given to the auditor breaks it)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.client import app as client_app
from stamen.client.dp import dp_schedule, train_private
from stamen.common.config import KEYS
from stamen.common.errors import ConfigError
from stamen.common.models import build_model
from stamen.simulations.audit import (
    AuditSettings,
    Canaries,
    canary_coordinates,
    flat,
    guess,
    regenerated_noise,
    site_data,
)
from stamen.simulations.audit_bound import ceiling, epsilon_lower_bound, p_value


def test_all_guesses_right_reach_the_closed_form_ceiling() -> None:
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r, 0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
        assert ceiling(r) == pytest.approx(math.log(p / (1 - p)))
    assert ceiling(1000) == pytest.approx(5.81, abs=0.01)


def test_half_right_proves_nothing_and_more_right_proves_more() -> None:
    assert epsilon_lower_bound(1000, 500, 250, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 500, 200, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(1000, 500, v, 1e-5) for v in range(250, 501, 10)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[0] == 0.0 < bounds[-1]


def test_delta_term_matches_the_papers_sum_and_only_lowers_the_bound() -> None:
    m, r, v, eps, delta = 1000, 200, 150, 0.8, 1e-4
    q = 1 / (1 + math.exp(-eps))
    alpha, running = 0.0, 0.0
    for i in range(1, v + 1):  # Algorithm 2's loop, term by term
        running += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, running / i)
    assert p_value(m, r, v, eps, delta) == pytest.approx(stats.binom.sf(v - 1, r, q) + 2 * m * delta * alpha)
    assert epsilon_lower_bound(m, r, v, delta) < epsilon_lower_bound(m, r, v, 0.0)


def test_bad_counts_are_named() -> None:
    with pytest.raises(ConfigError, match="correct <= guesses <= canaries"):
        epsilon_lower_bound(10, 20, 5, 1e-5)
    public = np.ones((4, 1, 28, 28))
    public[:, 0, 0, :3] = 0  # three pixels dark in every public image: 3 x 10 classes = 30 canary weights
    model = build_model("logreg", (1, 28, 28), 10, seed=0)
    coords = canary_coordinates(model, public, 30, np.random.default_rng(0))
    assert sorted(coords % 784) == sorted(list(range(3)) * 10) and len(set(coords)) == 30
    with pytest.raises(ConfigError, match="canaries 31 is more than the 30"):
        canary_coordinates(model, public, 31, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="needs >= 2 canaries"):
        AuditSettings(canaries=1).config("secret", 0)
    with pytest.raises(ConfigError, match="noise must be one of secret, seeded"):
        AuditSettings().config("server", 0)


def test_guesses_abstain_in_the_middle() -> None:
    scores = np.array([5.0, -1.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, False, False, False, True])
    assert guess(scores, included, fraction=4 / 6) == (4, 3)  # in: 5, 4 (one wrong); out: -2, -1


def _canary_round(noise_multiplier: float, seeded_noise: int) -> tuple[np.ndarray, Canaries]:
    """One real DP-SGD round of 512 records with 200 canaries; scores as the server reads the update,
    minus the regenerated noise (what a server given the noise seed does)."""
    settings = AuditSettings(records=512, batch_size=64)
    cfg = settings.config("seeded", 0)
    data, x, y = site_data(settings)
    model = build_model("logreg", (1, 28, 28), 10, seed=0)
    rng = np.random.default_rng(1)
    coords = canary_coordinates(model, data.x_train[:512], 200, rng)  # pixels 0 in the site's own data
    rate, _ = dp_schedule(len(y), cfg)
    canaries = Canaries(coords, rng.random(200) < 0.5, 1.0, rate, sum(p.numel() for p in model.parameters()), 2)
    before = flat(model)
    result = train_private(
        model,
        x,
        y,
        cfg,
        server_round=1,
        seed=3,
        noise_seed=seeded_noise,
        device=torch.device("cpu"),
        noise_multiplier=noise_multiplier,
        max_grad_norm=1.0,
        planned_examples=len(y),
        before_noise=canaries,
    )
    scores = -(flat(model) - before) * round(len(y) * rate) / settings.lr
    scores -= regenerated_noise(model, seeded_noise, result.steps, noise_multiplier)
    assert result.steps == 8 and canaries.joins.max() >= 1
    return scores[coords].numpy(), canaries


def test_canary_is_one_more_clipped_gradient_before_the_noise() -> None:
    """With (almost) no noise, an included canary scores C per step it joined; an excluded one 0."""
    scores, canaries = _canary_round(1e-6, seeded_noise=4)
    included = canaries.included.numpy()
    assert scores[included] == pytest.approx(canaries.joins[included].astype(float), abs=1e-3)
    assert np.abs(scores[~included]).max() < 1e-3
    assert (canaries.joins[~included] == 0).all()


def test_a_server_with_the_noise_seed_strips_opacus_noise_exactly() -> None:
    """At sigma 1 the regenerated noise leaves the same scores as no noise: Opacus's draws, rebuilt."""
    scores, canaries = _canary_round(1.0, seeded_noise=4)
    assert scores == pytest.approx(canaries.joins.astype(float), abs=1e-3)


@pytest.mark.slow
def test_audit_secret_noise_holds_seeded_noise_given_to_the_auditor_breaks(tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    result = CliRunner().invoke(
        app, ["audit", "--seeds", "0", "--noise", "both", "--canaries", "600", "--rounds", "5", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(out.read_text())
    rows = {r["noise"]: r for r in entry["figures"]["rows"]}
    assert entry["scenario"] == "audit" and entry["met"] is True
    for row in rows.values():
        assert row["epsilon"] == pytest.approx(2.0, rel=0.01)  # the real ledger, calibrated to the target
        assert row["guesses"] == 300 and row["steps"] == 80
    assert rows["secret"]["epsilon_lb"] <= rows["secret"]["epsilon"]
    assert rows["seeded"]["epsilon_lb"] > 1.5 * rows["seeded"]["epsilon"]
    assert "eps_lb" in result.output


def test_no_run_config_key_can_ask_a_site_for_canaries() -> None:
    """Canaries reach train_private only from the audit module: nothing in an instruction names them."""
    assert not [k.name for k in KEYS if "canar" in k.name or "audit" in k.name]
    assert "before_noise" not in (Path(client_app.__file__)).read_text()
