"""Continual runs end to end, as an operator runs them: real ``stamen simulate`` processes.

Resume equivalence (DP on, half the sites per round; and DP off under a label shift, with
its concept-drift detections), fall-back over a corrupt checkpoint,
SIGTERM/SIGINT stopping an unbounded run after its round, and rollback after a divergence.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_stamen_simulate, session_processes, still_running
from safetensors.numpy import load_file
from typer.testing import CliRunner

from stamen.cli.main import app
from stamen.common.config import StamenConfig
from stamen.server.checkpoint import Checkpoint, CheckpointStore

# DP-SGD with noise seeded per (site, round) (dp-noise = seeded: resume equivalence needs
# reproducible noise), 2 of 4 sites sampled per round, and client-level DP on the server
# (noise seeded per round); a fixed cosine horizon, so a 3-round run and a 6-round run follow
# the same LR schedule.
DP_RUN = (
    "--clients",
    "4",
    "--dataset",
    "digits",
    "--fraction",
    "0.5",
    "--dp",
    "--noise-multiplier",
    "1.0",
    "--epsilon-budget",
    "50",
    "--set",
    "lr-horizon-rounds=6",
    "--set",
    "min-partition-size=10",
    "--set",
    "server-dp-clip=5.0",
    "--set",
    "server-dp-noise=0.01",
    "--set",
    "dp-noise=seeded",
)


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def _epsilons(run: Path) -> dict[str, float]:
    return {site: p["epsilon"] for site, p in _summary(run)["privacy"]["per_client"].items()}


def _momentum(run: Path, server_round: int) -> dict[str, np.ndarray]:
    arrays = load_file(run / "checkpoints" / f"ckpt-{server_round:08d}.safetensors")
    return {k: v for k, v in arrays.items() if k.startswith("optimizer:momentum|")}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b) and a
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def _assert_same_run(resumed: Path, uninterrupted: Path, *, redone: frozenset[str] = frozenset()) -> None:
    """Same global model, momentum buffer, sequence of sampled sites and epsilon per site,
    except the ``redone`` sites, which were charged again for a redone round (more epsilon)."""
    assert _max_diff(load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")) <= 1e-6
    assert _max_diff(_momentum(resumed, 6), _momentum(uninterrupted, 6)) <= 1e-6
    eps, expected = _epsilons(resumed), _epsilons(uninterrupted)
    assert {s: e for s, e in eps.items() if s not in redone} == pytest.approx(
        {s: e for s, e in expected.items() if s not in redone}, rel=1e-12
    )
    assert all(eps[s] > expected[s] for s in redone), "a redone round is a new release, charged again"
    sampled = [r["sampled_sites"] for r in _summary(uninterrupted)["history"]]
    assert [r["sampled_sites"] for r in _summary(resumed)["history"]] == sampled
    assert len(set(sampled)) > 1, "the sampler really varies the sites"
    server_eps = [r["server_epsilon"] for r in _summary(uninterrupted)["history"]]
    assert [r["server_epsilon"] for r in _summary(resumed)["history"]] == server_eps
    assert server_eps == sorted(server_eps) and server_eps[0] > 0


@pytest.fixture(scope="module")
def six_rounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("six") / "run"
    run_stamen_simulate(out, *DP_RUN, "--rounds", "6")
    return out


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("three") / "run"
    run_stamen_simulate(out, *DP_RUN, "--rounds", "3")
    return out


@pytest.mark.slow
def test_three_rounds_resumed_for_three_more_equal_six_rounds(
    six_rounds: Path, three_rounds: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(three_rounds, resumed)
    eps_before = _epsilons(resumed)
    run_stamen_simulate(resumed, "--resume", str(resumed), "--rounds", "6")

    _assert_same_run(resumed, six_rounds)
    summary = _summary(resumed)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 6
    assert [r["round"] for r in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert summary["resumes"][0]["after_round"] == 3
    assert summary["version"] == _summary(six_rounds)["version"] == 6
    assert all(_epsilons(resumed)[s] >= e for s, e in eps_before.items()), "epsilon continues, never reset"
    ledgers = {s: json.loads((resumed / "sites" / s / "privacy_ledger.json").read_text()) for s in eps_before}
    assert all(d["data"]["rounds"] == summary["privacy"]["per_client"][s]["rounds"] for s, d in ledgers.items())


@pytest.mark.slow
def test_a_corrupt_versions_index_is_rebuilt_and_the_run_continues(three_rounds: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "corrupt-index"
    shutil.copytree(three_rounds, resumed)
    index = resumed / "versions" / "index.json"
    before = json.loads(index.read_text())["versions"]
    index.write_text(index.read_text()[:40])  # torn, as by a disk fault
    run_stamen_simulate(resumed, "--resume", str(resumed), "--rounds", "5")

    assert "rebuilt it from the checkpoint" in (resumed / "simulation.log").read_text()  # the engine's log
    summary = _summary(resumed)
    assert summary["status"] == "completed" and [r["round"] for r in summary["history"]] == [1, 2, 3, 4, 5]
    after = json.loads(index.read_text())["versions"]
    assert [e["version"] for e in after] == [1, 2, 3, 4, 5] and after[:3] == before
    assert len(list((resumed / "versions").glob("index.json.corrupt-*"))) == 1


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(
    six_rounds: Path, three_rounds: Path, tmp_path: Path
) -> None:
    resumed = tmp_path / "fallback"
    shutil.copytree(three_rounds, resumed)
    newest = resumed / "checkpoints" / "ckpt-00000003.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write, as after a disk fault

    result = run_stamen_simulate(resumed, "--resume", str(resumed), "--rounds", "6")
    said = " ".join(result.stderr.split())
    assert "checkpoint of round 3 is unusable" in said
    assert "resuming from the checkpoint of round 2, not the newest (round 3)" in said
    assert "resuming" in said and "after round 2 (model version 2)" in said

    summary = _summary(resumed)
    assert summary["resumes"][0]["after_round"] == 2
    assert summary["resumes"][0]["abandoned_versions"] == [3]
    assert [r["round"] for r in summary["history"]] == [1, 2, 3, 4, 5, 6]
    # Round 3 was redone from the same state: the same model as the uninterrupted run (seeded
    # noise), and the sites that trained round 3 were charged for it a second time.
    redone = frozenset(summary["history"][2]["sampled_sites"].split())
    _assert_same_run(resumed, six_rounds, redone=redone)
    per_client, uninterrupted = summary["privacy"]["per_client"], _summary(six_rounds)["privacy"]["per_client"]
    assert all(per_client[s]["rounds"] == uninterrupted[s]["rounds"] + 1 for s in redone)
    versions = [e["version"] for e in json.loads((resumed / "versions" / "index.json").read_text())["versions"]]
    assert versions == [1, 2, 3, 4, 5, 6, 7], "the lost version 3's number is never reused"
    assert summary["version"] == 7


# Concept drift across a resume: from round 4 every site trains only on digits 0-4, so the
# global model forgets 5-9 and its centralized loss rises; the Page-Hinkley detector on it
# (threshold 0.2 nats) fires in round 6 only if it kept rounds 1-5's statistics. DP off:
# the run is reproducible bit for bit. Federated evaluation every round: only on the last
# round it would run in round 5 of the 5-round run and not in the uninterrupted one.
SHIFT_RUN = (
    *("--clients", "4", "--dataset", "digits", "--lr", "0.1", "--local-epochs", "3"),
    *("--set", "partition=iid", "--set", "eval-every=1", "--set", "lr-horizon-rounds=6"),
    *("--set", "label-shift-round=4", "--set", "label-shift-sites=site-0000,site-0001,site-0002,site-0003"),
    *("--set", "drift-ph-threshold=0.2"),
)
WALL_TIME = ("seconds", "elapsed")


@pytest.mark.slow
def test_a_resumed_run_keeps_its_drift_detectors_and_history(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stamen_simulate(straight, *SHIFT_RUN, "--rounds", "6")
    run_stamen_simulate(resumed, *SHIFT_RUN, "--rounds", "4")
    run_stamen_simulate(resumed, "--resume", str(resumed), "--rounds", "6")

    expected, got = _summary(straight), _summary(resumed)
    assert got["resumes"][0]["after_round"] == 4
    rows = [{k: v for k, v in r.items() if k not in WALL_TIME} for r in got["history"]]
    assert rows == [{k: v for k, v in r.items() if k not in WALL_TIME} for r in expected["history"]]
    assert got["drift"] == expected["drift"]
    detections = expected["drift"]["detections"]
    # the shift (round 4) raises the loss before the resume point; the detector carries that
    # evidence across the resume and fires after it
    assert {"round": 5, "series": "global"} in detections, "the shift is detected, after the resume point"
    assert rows[4]["concept_drift"] == 1 and rows[3]["drift_label_psi_max"] > 1
    table = (resumed / "history.csv").read_text().splitlines()
    assert len(table) == 7 and table[0] == (straight / "history.csv").read_text().splitlines()[0]


def _wait_for_rows(progress: Path, rows: int, proc: subprocess.Popen[str], deadline: float) -> int:
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if progress.exists() and len(progress.read_text().splitlines()) >= rows:
            return len(progress.read_text().splitlines())
        time.sleep(0.2)
    raise AssertionError(f"no {rows} rounds in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_an_unbounded_run_after_its_round_with_a_checkpoint(sig: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--clients", "3", "--rounds", "0", "--dataset", "digits", "--local-epochs", "3"]
    command = [sys.executable, "-m", "stamen", "simulate", *args, "--set", "lr-schedule=constant"]
    proc = subprocess.Popen(
        [*command, "--out", str(out), "--no-progress", "--timeout", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = _wait_for_rows(out / "progress.jsonl", 2, proc, time.monotonic() + 300)
        engine = session_processes(proc.pid)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr

    summary = _summary(out)
    done = summary["rounds_completed"]
    assert summary["status"] == "stopped" and summary["stop_reason"] == sig.name
    assert done >= seen and [r["round"] for r in summary["history"]] == list(range(1, done + 1))
    assert CheckpointStore(out).load_latest().round == done, "the last round is checkpointed"
    log = (out / "simulation.log").read_text().splitlines()
    asked = next(i for i, line in enumerate(log) if f"{sig.name}: stopping after the current round" in line)
    finished = next(i for i, line in enumerate(log) if f"round {done}: checkpoint" in line)
    assert asked < finished, "the round in flight when the signal came was finished, not cut off"
    assert f"continue with: stamen simulate --resume {out}" in stdout
    assert len(engine) > 2, "the engine, Ray's daemons and its actors were found"
    assert still_running(engine) == [], "the stopped simulation left processes behind"

    if sig is signal.SIGTERM:  # and the stopped run continues where it stopped
        run_stamen_simulate(out, "--resume", str(out), "--rounds", str(done + 2))
        resumed = _summary(out)
        assert resumed["status"] == "completed" and resumed["rounds_completed"] == done + 2
        assert [r["round"] for r in resumed["history"]] == list(range(1, done + 3))
        assert [r["version"] for r in resumed["history"]] == list(range(1, done + 3))


@pytest.mark.slow
def test_a_diverging_run_rolls_back_to_the_best_version(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_stamen_simulate(
        out,
        # lr 0.5 and 3 local epochs: the model learns before the spike, so the best version is a real one
        *("--clients", "3", "--rounds", "6", "--dataset", "digits", "--lr", "0.5", "--local-epochs", "3"),
        *("--dp", "--noise-multiplier", "0.6", "--epsilon-budget", "1000"),
        *("--set", "lr-schedule=constant", "--set", "min-partition-size=10"),
        *("--set", "server-lr-spike=3-3:20", "--set", "rollback-patience=2"),
        *("--set", "dp-noise=seeded"),  # the rounds' losses decide the rollback: reproducible noise
    )
    summary = _summary(out)
    history = summary["history"]
    event = summary["rollbacks"][0]
    assert event["round"] == 4, "the spiked round 3 and round 4 were both far worse than the best"
    assert event["to_version"] == summary["history"][1]["version"] == 2
    assert event["versions_rolled_back"] == [4, 3]
    assert history[3]["rolled_back_to"] == 2 and history[3]["rollbacks"] == 1
    index = {e["version"]: e for e in json.loads((out / "versions" / "index.json").read_text())["versions"]}
    assert index[5]["parent"] == 2, "the run continued from the best version"
    assert [index[v]["status"] for v in (3, 4)] == ["rolled_back", "rolled_back"]
    assert history[4]["central_loss"] < 2 * event["best_loss"], "and training recovered"
    numbers = [r["version"] for r in history if "rolled_back_to" not in r]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), "version numbers keep increasing"
    for site in summary["privacy"]["per_client"]:
        eps = [e["epsilon"][site] for _, e in sorted(index.items()) if site in e["epsilon"]]
        assert eps == sorted(eps) and len(eps) == 6, f"{site}: privacy spent never rolls back"


def _fake_run(tmp_path: Path, corrupt: bool) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "simulation.json").write_text(json.dumps({"clients": 3}))
    config = StamenConfig.from_mapping({"num-server-rounds": 2}).as_dict()
    store = CheckpointStore(run)
    store.save(Checkpoint(2, 2, {"model": {"w": np.zeros(2, dtype=np.float32)}}, {"config": config}), keep=3)
    if corrupt:
        (store.dir / "ckpt-00000002.safetensors").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    ("corrupt", "args", "expected"),
    [
        (True, ["--rounds", "4"], "no valid checkpoint in"),
        (False, [], "checkpoint is at round 2 and num-server-rounds is 2"),
        (False, ["--rounds", "4", "--seed", "7"], "cannot change seed (42 -> 7)"),
        (False, ["--rounds", "4", "--clients", "5"], "the run has 3 sites"),
    ],
    ids=["no-valid-checkpoint", "nothing-left-to-run", "changed-seed", "changed-clients"],
)
def test_resume_refuses_clearly(tmp_path: Path, corrupt: bool, args: list[str], expected: str) -> None:
    run = _fake_run(tmp_path, corrupt)
    result = CliRunner().invoke(app, ["simulate", "--resume", str(run), "--no-progress", *args])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
