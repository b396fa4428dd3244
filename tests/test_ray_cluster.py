"""``stamen simulate --ray-address``: the same run on an existing two-node Ray cluster.

A head and a worker node, each with one CPU, both on 127.0.0.1, are started here with
``ray start --block`` (so their daemons stay this test's descendants) in a temp dir of their
own (``RAY_TMPDIR``: the cluster's address file is not the machine's ``/tmp/ray`` one that
other Ray users would find), and stopped afterwards by their process ids, never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import run_stamen_simulate
from safetensors.numpy import load_file

from stamen.common.errors import ConfigError
from stamen.simulations.bench.loopback import free_port
from stamen.simulations.run import ray_address_of, run_simulate_command

RAY = str(Path(sys.executable).parent / "ray")
ARGS = ("--clients", "2", "--rounds", "2", "--dataset", "digits", "--model", "logreg", "--seed", "7", "--no-dp")


def _tree(pids: list[int]) -> dict[int, float]:
    """``{pid: start}`` of ``pids`` and all their descendants (a reused pid is not ours)."""
    found: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    found[p.pid] = p.create_time()
    return found


def _alive(procs: dict[int, float]) -> list[psutil.Process]:
    alive = []
    for pid, start in procs.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            if proc.create_time() == start and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _stop(procs: dict[int, float]) -> None:
    """Terminate, then kill, exactly these processes."""
    alive = _alive(procs)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, left = psutil.wait_procs(alive, timeout=10)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=10)


def _start_node(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``ray start --block ...``, waited on until it says the node runs."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([RAY, "start", "--block", *cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return proc


@pytest.fixture
def two_node_cluster() -> Iterator[tuple[str, list[int]]]:
    """(GCS address, the two ``ray start`` pids) of a head and a worker with one CPU each."""
    temp = Path(tempfile.mkdtemp(prefix="sray-", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    base = random.randrange(20_000, 60_000, 1_000)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 2**20)]
    starters: list[subprocess.Popen[bytes]] = []
    try:
        head = [
            "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-port={free_port()}",  # its head process still starts: not on 8265, another test's
            # worker ports apart from Ray's default 10002-19999 (other tests' local Rays) and from the
            # last cluster's (its workers may still be exiting): a range of this cluster's own
            f"--min-worker-port={base}", f"--max-worker-port={base + 499}",
        ]  # fmt: skip
        starters.append(_start_node([*head, *common], env, temp / "head.log"))
        worker = [
            f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={free_port()}",
            f"--min-worker-port={base + 500}", f"--max-worker-port={base + 999}",
        ]  # fmt: skip
        starters.append(_start_node([*worker, *common], env, temp / "worker.log"))
        yield f"127.0.0.1:{port}", [p.pid for p in starters]
    finally:
        ours = _tree([p.pid for p in starters])
        _stop(ours)
        assert not _alive(ours), "a Ray process of the test's cluster outlived it"
        shutil.rmtree(temp, ignore_errors=True)


def _wait_no_actors(starters: list[int], timeout: float = 60) -> None:
    """No ``ClientAppActor`` (Ray titles its worker ``ray::ClientAppActor``) is left on the cluster."""
    deadline = time.monotonic() + timeout
    while True:
        actors = []
        for proc in _alive(_tree(starters)):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "ClientAppActor" in " ".join(proc.cmdline()):
                    actors.append(proc.pid)
        if not actors:
            return
        assert time.monotonic() < deadline, f"the run's actors {actors} outlived it"
        time.sleep(1)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.xdist_group("ray-cluster")  # one two-node cluster at a time on the machine
def test_a_run_on_a_two_node_cluster_places_sites_on_both_and_equals_the_local_run(
    tmp_path: Path, two_node_cluster: tuple[str, list[int]]
) -> None:
    address, starters = two_node_cluster
    cluster_before = _tree(starters)
    on_cluster = tmp_path / "cluster"
    run_stamen_simulate(on_cluster, *ARGS, "--cpus-per-client", "1", "--ray-address", address, timeout=420)
    local = tmp_path / "local"
    run_stamen_simulate(local, *ARGS, "--cpus-per-client", "1", timeout=420)

    cluster, alone = _summary(on_cluster), _summary(local)
    assert cluster["ray_address"] == address and alone["ray_address"] is None
    assert len(cluster["ray_nodes"]) == 2, cluster["ray_nodes"]  # one 1-CPU actor per node
    assert all(count >= 1 for count in cluster["ray_nodes"].values())
    assert list(alone["ray_nodes"].values()) == [2]  # both sites on the one local node
    assert set(cluster["ray_nodes"]).isdisjoint(alone["ray_nodes"])

    assert cluster["rounds_completed"] == alone["rounds_completed"] == 2
    assert cluster["final"] == alone["final"]
    for ours, theirs in zip(cluster["history"], alone["history"], strict=True):
        for key in ("accuracy", "loss", "train_loss", "replied", "updated", "update_norm_mean"):
            assert ours[key] == theirs[key], (ours["round"], key)
    cluster_model, local_model = load_file(on_cluster / "model.safetensors"), load_file(local / "model.safetensors")
    assert cluster_model.keys() == local_model.keys()
    assert all((cluster_model[k] == local_model[k]).all() for k in cluster_model)
    assert {p.name for p in (on_cluster / "sites").iterdir()} == {"site-0000", "site-0001"}

    # The run ended nothing of the cluster: every daemon it had is still running; its actors are gone.
    assert {p.pid for p in _alive(cluster_before)} == set(cluster_before)
    _wait_no_actors(starters)
    rounds = [row["seconds"] for row in cluster["history"]], [row["seconds"] for row in alone["history"]]
    print(f"round seconds: cluster {rounds[0]}, local {rounds[1]}; cluster nodes {cluster['ray_nodes']}")


@pytest.mark.slow
@pytest.mark.xdist_group("ray-cluster")  # one two-node cluster at a time on the machine
def test_an_interrupted_run_on_the_cluster_ends_only_its_own_actors(
    tmp_path: Path, two_node_cluster: tuple[str, list[int]]
) -> None:
    address, starters = two_node_cluster
    cluster_before = _tree(starters)
    stopped = tmp_path / "stopped"
    until_stopped = (*ARGS[:2], *ARGS[4:], "--rounds", "0", "--set", "lr-schedule=constant")
    res = run_simulate_command(stopped, *until_stopped, "--ray-address", address, timeout=90)
    assert res.returncode != 0, res.stdout + res.stderr  # its --timeout stopped it (after a round)
    assert _summary(stopped)["status"] == "stopped" and _summary(stopped)["ray_address"] == address
    assert {p.pid for p in _alive(cluster_before)} == set(cluster_before)
    _wait_no_actors(starters)


def test_a_ray_address_that_is_wrong_or_silent_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not host:port"):
        ray_address_of("no-port-here")
    with pytest.raises(ConfigError, match=f"no Ray cluster answers at 127.0.0.1:{(port := free_port())}"):
        ray_address_of(f"127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert ray_address_of(None) == "auto"  # Ray's own RAY_ADDRESS, as Ray users expect
    assert ray_address_of("local") == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address_of(None) is None


def test_without_an_address_the_engine_starts_its_own_ray_even_beside_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stamen.simulations.engine import ray_init_args

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert ray_init_args(None, 3) == {"address": "local", "include_dashboard": False, "num_cpus": 3}
    assert "RAY_ADDRESS" not in os.environ  # only the address given counts, inside the engine
    assert ray_init_args("127.0.0.1:6379", 3) == {"address": "127.0.0.1:6379"}  # the cluster sizes itself


def test_site_resources_that_fit_no_actor_are_refused_before_the_run(tmp_path: Path) -> None:
    from stamen.common.config import StamenConfig
    from stamen.simulations.run import Plan, execute

    cfg = StamenConfig.from_mapping({"dataset": "digits", "out-dir": str(tmp_path / "run")})
    plan = Plan(tmp_path / "run", cfg, clients=1, resumed=False)
    for cpus, gpus in ((0.0, 0.0), (1.0, -0.5)):
        with pytest.raises(ConfigError, match="each site needs CPUs > 0 and GPUs >= 0"):
            execute(plan, cpus_per_client=cpus, gpus_per_client=gpus)
    assert not (tmp_path / "run").exists(), "nothing is written for a refused run"
