"""An outsider holding only the federation's ``ca.crt`` tries what issue 17's trial did; each step fails.

A real deployment on loopback (``stamen superlink`` with TLS and node authentication, one
registered site ``site-a`` as ``stamen node``). The outsider has the CA certificate and the
address sites dial (the Fleet API), nothing else. It tries:

(a) ``flwr supernode register`` of its own key: the Control API is not on that address
    (the SuperLink's listening sockets say so: Flower's server on 127.0.0.1 at the control
    port only), and the attempt against the Fleet address fails; the SuperLink still knows
    one node.
(b) ``flwr run`` of its own app against the Fleet address: fails, and the app, which writes a
    marker file the moment it is imported, never ran. The operator, on the SuperLink host,
    can run the same app (the marker appears): the check would have seen it.
(c) A SuperNode with an unregistered key claiming ``site-a``: refused by the SuperLink, never
    trains. A registered node of another site claiming ``site-a`` after it was bound: refused
    by the key binding (the checkpoint records it), never trains. History shows only the
    real site's replies and its own participation record every round.

Run alone with ``pytest -m deployment``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stamen.common.state import SiteStore
from stamen.simulations.bench.loopback import TLS, Loopback, descendants, digits_shards, free_port, read_progress

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

BIN = Path(sys.executable).parent
ROUNDS = 4
RUN_TIMEOUT = 480.0

EVIL_APP = """
import pathlib
pathlib.Path({marker!r}).write_text("the outsider's code ran")
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
app = ServerApp()
client = ClientApp()

@app.main()
def main(grid, context):
    pass
"""


def _evil_app(root: Path, marker: Path) -> Path:
    """A Flower app whose import writes ``marker``."""
    app = root / "evil"
    (app / "evil").mkdir(parents=True)
    (app / "evil" / "__init__.py").write_text("")
    (app / "evil" / "app.py").write_text(EVIL_APP.format(marker=str(marker)))
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = ["flwr"]\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "evil.app:app"\nclientapp = "evil.app:client"\n\n'
        "[tool.flwr.app.config]\n"
    )
    return app


def _listening(pid: int) -> dict[str, set[tuple[str, int]]]:
    """(ip, port) each process of ``stamen superlink``'s tree listens on: ``stamen`` (the Fleet
    proxy), ``flower-superlink`` (Flower's SuperLink), or the program's name for any other."""
    out: dict[str, set[tuple[str, int]]] = {}
    for p in [pid, *descendants(pid)]:
        try:
            proc = psutil.Process(p)
            socks = {(c.laddr.ip, c.laddr.port) for c in proc.net_connections() if c.status == psutil.CONN_LISTEN}
            command = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        names = [Path(a).name for a in command[:2]]
        # Flower's SuperLink runs as `python -m stamen.server.superlink` (its SQLite wait set first)
        superlink = "flower-superlink" in names or "stamen.server.superlink" in command[:3]
        name = "stamen" if p == pid else "flower-superlink" if superlink else names[0]
        out.setdefault(name, set()).update(socks)
    return out


def _outsider_flwr(fed: Loopback, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**fed.cli_env(), "FLWR_HOME": str(home)}
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=120, cwd=home)


def _wait(what: str, cond: object, timeout: float, fed: Loopback) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name} ---\n{p.tail(2500)}" for p in fed.procs)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def test_an_outsider_with_only_the_ca_certificate_gets_nowhere(tmp_path: Path) -> None:
    out = tmp_path / "run"
    marker = tmp_path / "outsider-code-ran"
    with Loopback(tmp_path / "fed") as fed:
        superlink = fed.start_superlink()
        shards = digits_shards(2)
        fed.add_site("site-a", *shards[0])
        fed.add_site("site-b", *shards[1])  # registered, but it will claim to be site-a
        site_a = fed.start_node("site-a")

        # The outsider: ca.crt and the Fleet address, a key and an app of its own.
        outsider = tmp_path / "outsider"
        outsider.mkdir()
        subprocess.run(["bash", str(TLS / "make-node-key.sh"), "outsider", str(outsider)], check=True)
        (outsider / "config.toml").write_text(
            '[superlink]\ndefault = "outside"\n\n[superlink.outside]\n'
            f'address = "127.0.0.1:{fed.port}"\nroot-certificates = "{fed.certs / "ca.crt"}"\n'
        )

        # (a) What listens: Flower's server (Control, ServerAppIo, Fleet) on loopback at the control
        # port only; the Fleet proxy on the sites' address; nothing else.
        sockets = _listening(superlink.popen.pid)
        assert sockets.get("flower-superlink") == {("127.0.0.1", fed.control_port)}, sockets
        assert ("127.0.0.1", fed.port) in sockets.get("stamen", set()), sockets
        every = set().union(*sockets.values())
        assert every == {("127.0.0.1", fed.control_port), ("127.0.0.1", fed.port)}, sockets
        register = _outsider_flwr(fed, outsider, "supernode", "register", str(outsider / "outsider.key.pub"), "outside")
        assert register.returncode != 0, register.stdout + register.stderr
        assert len(fed.node_list()) == 2, "the outsider's key was registered"

        # (b) flwr run of its own code against the Fleet address.
        evil = _evil_app(tmp_path, marker)
        attempt = _outsider_flwr(fed, outsider, "run", str(evil), "outside")
        assert attempt.returncode != 0, attempt.stdout + attempt.stderr
        time.sleep(5)  # would a run it started be importing the app now?
        assert not marker.exists(), "the outsider's code ran on the SuperLink host"
        runs = subprocess.run(
            [str(BIN / "flwr"), "ls", "loopback", "--format", "json"],
            env=fed.cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=fed.root,
        )
        assert json.loads(runs.stdout[runs.stdout.index("{") :]).get("runs", []) == [], runs.stdout

        # (c) An unregistered key claiming site-a: the SuperLink refuses it before any message.
        impostor_state = tmp_path / "impostor-state"
        impostor_state.mkdir(mode=0o700)
        subprocess.run(["bash", str(TLS / "make-node-key.sh"), "impostor", str(outsider)], check=True)
        impostor = fed.start(
            "impostor",
            [str(BIN / "stamen"), "node", "--site-id", "site-a", "--superlink", f"127.0.0.1:{fed.port}",
             "--state-dir", str(impostor_state), "--data", f"npz:{fed.sites['site-a'].data_file}",
             "--root-certificates", str(fed.certs / "ca.crt"), "--auth-key", str(outsider / "impostor.key"),
             "--runtime-port", str(free_port()), "--connect-timeout", "3", "--set", "site-dp=false"],
            fed.env("impostor"),
        )  # fmt: skip
        run = fed.flwr_run(
            {
                "num-server-rounds": ROUNDS,
                "dataset": "digits",
                "out-dir": str(out),
                "round-timeout": 60.0,
                "min-available-sites": 1,
                "wait-for-sites": 120.0,
                "lr-schedule": "constant",
                "lr": 0.1,
                "seed": 3,
            }
        )
        assert impostor.popen.wait(timeout=120) == 2, impostor.tail()
        assert "refused node" in impostor.tail(), impostor.tail()

        # A registered node of another site (site-b's key) claiming site-a, once site-a is bound
        # (in round 1's handshake); every later round's handshake asks a node it has not mapped.
        _wait("site-a's key binding", lambda: "site site-a bound to key" in run.tail(20000), RUN_TIMEOUT, fed)
        insider_state = tmp_path / "insider-state"
        insider_state.mkdir(mode=0o700)
        insider = fed.start(
            "insider",
            [str(BIN / "stamen"), "node", "--site-id", "site-a", "--superlink", f"127.0.0.1:{fed.port}",
             "--state-dir", str(insider_state), "--data", f"npz:{fed.sites['site-b'].data_file}",
             "--root-certificates", str(fed.certs / "ca.crt"), "--auth-key", str(fed.sites["site-b"].key),
             "--runtime-port", str(fed.sites["site-b"].runtime_port), "--set", "site-dp=false"],
            fed.env("insider"),
        )  # fmt: skip
        _wait("the insider online", lambda: "SuperNode ID" in insider.tail(20000), 180, fed)
        assert len(read_progress(out)) < ROUNDS - 1, "the insider came too late for a handshake: step (c) is void"
        try:
            run.popen.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`flwr run` did not finish in {RUN_TIMEOUT:.0f}s\n{run.tail()}\n{insider.tail()}")
        fed.stop(insider)
        fed.stop(site_a)

        # The operator, on the SuperLink host, can run the same app: the marker check would see it ran.
        operator = fed.start("operator", [str(BIN / "flwr"), "run", str(evil), "loopback"], fed.cli_env(), cwd=evil)
        _wait("the operator's run of the app", marker.exists, 120, fed)

    history = read_progress(out)
    context = f"history: {history}\nrun output:\n{run.tail(4000)}"
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1)), context
    assert all(r["replied"] == 1 and r["updated"] for r in history), context
    participation = SiteStore(fed.sites["site-a"].state_dir, "site-a").read_json("participation")
    assert participation["last_round"] == participation["rounds"] == ROUNDS, participation
    # Neither impostor ever trained: no participation record in their state stores.
    for state in (impostor_state, insider_state):
        assert not any(p.name.startswith("participation") for p in state.rglob("*")), sorted(state.rglob("*"))
    # The insider was asked, and the key binding refused it: the run's state records it.
    checkpoint = sorted(out.rglob("ckpt-*.json"))[-1]
    keys = json.loads(checkpoint.read_text())["state"]["parts"]["site_keys"]
    assert set(keys["bound"]) == {"site-a"}, keys
    refused = [e for e in keys["events"] if e["event"] == "refused"]
    assert refused and all(e["site"] == "site-a" for e in refused), keys
    assert all(e["key"] != keys["bound"]["site-a"] for e in refused), keys
    assert marker.read_text() == "the outsider's code ran", operator.tail()
