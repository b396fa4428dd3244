"""DP in a real simulation: budgets are enforced, refusals counted, the run completes."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opacus.accountants import RDPAccountant

from stamen.simulations.run import run_simulate_command


@pytest.mark.slow
def test_sites_refuse_past_their_budget_and_the_run_completes(
    tmp_path: Path, stamen_simulate: Callable[..., Any]
) -> None:
    out = tmp_path / "run"
    budget = 4.8  # with sigma 1.0, q ~ 1/15, 30 steps a round: ~3.4 after one round, ~4.4 after two, ~5.1 after three
    said = stamen_simulate(
        out,
        "--clients",
        "3",
        "--rounds",
        "4",
        "--dataset",
        "digits",
        "--local-epochs",
        "2",
        "--dp",
        "--noise-multiplier",
        "1.0",
        "--epsilon-budget",
        str(budget),
        "--set",
        "min-partition-size=10",
        "--set",
        "dp-grad-sample-mode=ghost",  # the budget arithmetic is the same under ghost clipping
    ).stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    privacy = summary["privacy"]
    assert privacy["grad_sample_mode"] == "ghost"
    assert {entry["grad_sample_mode"] for entry in privacy["per_client"].values()} == {"ghost"}
    assert privacy["refused"] == 6, "every site trains rounds 1-2 and refuses rounds 3-4"
    assert [row["refused"] for row in summary["history"]] == [0, 0, 3, 3]
    assert set(privacy["per_client"]) == {"site-0000", "site-0001", "site-0002"}
    for site, entry in privacy["per_client"].items():
        assert entry["rounds"] == 2, site
        assert 3.0 < entry["epsilon"] <= budget, site
        assert entry["noise_multiplier"] == 1.0
        ledger = json.loads((out / "sites" / site / "privacy_ledger.json").read_text())["data"]
        assert sum(step for *_, step in ledger["history"]) == entry["steps"]
    assert privacy["epsilon_max"] <= budget
    assert summary["history"][-1]["epsilon_max"] == privacy["epsilon_max"]
    # No --site-policy: the simulation's relaxation (each site takes the run's values) is announced.
    assert privacy["site_policy"] == "run-config"
    assert json.loads((out / "config.json").read_text())["site_policy"] == "run-config"
    assert json.loads((out / "site-policy.json").read_text()) == {"source": "run-config", "keys": None}
    assert "site policy: the run config's" in said


@pytest.mark.slow
def test_simulated_sites_keep_their_site_policy_against_a_weaker_run_and_a_resume_remembers_it(
    tmp_path: Path, stamen_simulate: Callable[..., Any]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("site-dp = true\nepsilon-budget = 8.0\nsite-delta = 1e-5\n")
    out = tmp_path / "run"
    args = ("--clients", "2", "--dataset", "digits", "--dp", "--noise-multiplier", "1.0", "--delta", "1e-3")
    said = stamen_simulate(
        out, *args, "--rounds", "1", "--site-policy", str(policy), "--set", "min-partition-size=10"
    ).stdout
    assert "site policy" not in said, "only the run-config relaxation is announced on the console"
    stored = json.loads((out / "site-policy.json").read_text())
    keys = {"site-dp": True, "epsilon-budget": 8.0, "site-delta": 1e-5}
    assert stored == {"source": "site-policy-file", "keys": keys}
    other = tmp_path / "other.toml"
    other.write_text("site-dp = true\nepsilon-budget = 8.0\nsite-delta = 1e-2\n")
    changed = run_simulate_command(out, "--resume", str(out), "--rounds", "2", "--site-policy", str(other), timeout=120)
    assert changed.returncode != 0 and "cannot resume" in changed.stderr and "site policy" in changed.stderr
    # Resumed without --site-policy: the sites keep the policy the run started with, and still refuse.
    stamen_simulate(out, "--resume", str(out), "--rounds", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert [row["refused"] for row in summary["history"]] == [2, 2], "the run's delta 1e-3 is above the sites' 1e-5"
    assert summary["privacy"]["refused"] == 4
    assert summary["privacy"]["site_policy"] == "site-policy-file"
    assert json.loads((out / "config.json").read_text())["site_policy"] == "site-policy-file"
    assert not list((out / "sites").glob("*/privacy_ledger*.json")), "nothing was charged"


@pytest.mark.slow
def test_client_level_dp_on_the_server_with_poisson_site_sampling(
    tmp_path: Path, stamen_simulate: Callable[..., Any]
) -> None:
    out = tmp_path / "run"
    rounds, rate = 3, 0.5
    stamen_simulate(
        out,
        "--clients",
        "4",
        "--rounds",
        str(rounds),
        "--dataset",
        "digits",
        "--set",
        "server-dp-clip=0.5",
        "--set",
        "server-dp-noise=1.5",
        "--set",
        "site-sampling=poisson",
        "--set",
        f"fraction-train={rate}",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    server = summary["server_privacy"]
    # history.csv names each round's sampled sites, so no amplification by sampling is claimed: rate 1.
    assert (server["rounds"], server["sample_rate"], server["site_sampling"]) == (rounds, 1.0, "poisson")
    reference = RDPAccountant()
    reference.history = [(1.5, 1.0, rounds)]
    assert server["epsilon"] == pytest.approx(reference.get_epsilon(server["delta"]))
    history = summary["history"]
    with open(out / "history.csv", newline="") as fh:
        named = [row["sampled_sites"].split() for row in csv.DictReader(fh)]
    assert len(named) == rounds and all(set(sites) <= {f"site-{i:04d}" for i in range(4)} for sites in named)
    assert [row["server_epsilon"] for row in history] == sorted(row["server_epsilon"] for row in history)
    assert all(row["updated"] for row in history), "every round releases a noisy model, however many sites replied"


def _final_model(out: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_dp_noise_is_secret_unless_seeded_and_non_dp_runs_stay_reproducible(
    tmp_path: Path, stamen_simulate: Callable[..., Any]
) -> None:
    """Same seed, data and settings: secret DP noise gives two different models; seeded and non-DP runs repeat."""
    import numpy as np

    base = ("--clients", "2", "--rounds", "1", "--dataset", "digits", "--set", "min-partition-size=10")
    dp = (*base, "--dp", "--noise-multiplier", "1.0")
    runs = {
        "secret-1": dp,
        "secret-2": dp,
        "seeded-1": (*dp, "--set", "dp-noise=seeded"),
        "seeded-2": (*dp, "--set", "dp-noise=seeded"),
        "plain-1": base,
        "plain-2": base,
    }
    # two at a time: six independent runs whose start-up (imports, Ray) is mostly one core each
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = {name: pool.submit(stamen_simulate, tmp_path / name, *args) for name, args in runs.items()}
        said = {name: future.result().stdout for name, future in results.items()}
    models = {name: _final_model(tmp_path / name) for name in runs}
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in runs}

    def same(a: str, b: str) -> bool:
        return all(np.array_equal(models[a][k], models[b][k]) for k in models[a])

    assert not same("secret-1", "secret-2"), "secret noise: the seed does not fix the DP noise"
    assert same("seeded-1", "seeded-2") and same("plain-1", "plain-2")
    assert summaries["secret-1"]["privacy"]["noise"] == "secret"
    assert summaries["seeded-1"]["privacy"]["noise"] == "seeded"
    assert "DP noise SEEDED" in said["seeded-1"] and "SEEDED" not in said["secret-1"]
    assert json.loads((tmp_path / "seeded-1" / "config.json").read_text())["config"]["dp-noise"] == "seeded"
