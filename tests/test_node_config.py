"""``stamen node`` / ``stamen superlink`` refuse a bad site configuration with a clear error,
and build the real Flower command lines from a good one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stamen.client.node import (
    NodeSettings,
    check,
    node_assignment,
    node_config,
    pick_runtime_port,
    run_node,
    site_policy,
    supernode_command,
    with_policy_file,
)
from stamen.common.errors import ConfigError
from stamen.common.identity import IDENTITY_KEY
from stamen.server.superlink import SuperLinkSettings, superlink_command

TLS = Path(__file__).resolve().parents[1] / "deploy" / "tls"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development CA and one node key, made by the deploy/tls scripts."""
    root = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", str(TLS / "make-dev-ca.sh"), str(root / "certs"), "DNS:superlink"], check=True)
    subprocess.run(["bash", str(TLS / "make-node-key.sh"), "site-a", str(root / "keys")], check=True)
    return root


@pytest.fixture
def site(tmp_path: Path, pki: Path) -> NodeSettings:
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "shard.npz", x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = tmp_path / "site-a.key"  # a copy: some tests change its mode
    shutil.copy(pki / "keys" / "site-a.key", key)
    key.chmod(0o600)
    return NodeSettings(
        site_id="site-a",
        superlink="127.0.0.1:9092",
        state_dir=state,
        data_dir=data,
        root_certificates=pki / "certs" / "ca.crt",
        auth_key=key,
        extra={"site-dp": "false"},  # a real node requires DP unless its config says otherwise
    )


def test_the_scripts_make_a_ca_a_server_cert_for_the_names_asked_and_private_keys(pki: Path) -> None:
    text = subprocess.run(
        ["openssl", "x509", "-in", str(pki / "certs" / "server.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text and "DNS:superlink" in text
    verify = ["openssl", "verify", "-CAfile", str(pki / "certs" / "ca.crt"), str(pki / "certs" / "server.crt")]
    subprocess.run(verify, check=True, capture_output=True)
    for key in (pki / "certs" / "ca.key", pki / "certs" / "server.key", pki / "keys" / "site-a.key"):
        assert key.stat().st_mode & 0o077 == 0, key
    assert (pki / "keys" / "site-a.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = subprocess.run(["bash", str(TLS / "make-node-key.sh"), "site-a", str(pki / "keys")], capture_output=True)
    assert again.returncode == 2 and b"exists" in again.stderr


def test_a_good_site_gives_the_supernode_tls_its_key_and_its_node_config(site: NodeSettings) -> None:
    cmd = supernode_command(check(site), site.state_dir / ".secret")
    assert Path(cmd[0]).name == "flower-supernode"
    assert cmd[cmd.index("--root-certificates") + 1] == str(site.root_certificates)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(site.auth_key)
    assert "--insecure" not in cmd
    config = cmd[cmd.index("--node-config") + 1]
    assert 'site-id="site-a"' in config and f'data-dir="{site.data_dir}"' in config
    assert f'state-dir="{site.state_dir}"' in config
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, p: setattr(s, "site_id", "bad id!"), "site-id"),
        (lambda s, p: setattr(s, "superlink", "nohost"), "HOST:PORT"),
        (lambda s, p: setattr(s, "data_dir", p / "missing"), "data directory"),
        (lambda s, p: (setattr(s, "data_dir", None), setattr(s, "data", "npz:/no/such.npz")), "data file"),
        (lambda s, p: setattr(s, "data", "npz:x.npz"), "exactly one of"),
        (lambda s, p: setattr(s, "state_dir", p / "absent"), "does not exist"),
        (lambda s, p: os.chmod(s.state_dir, 0o755), "accessible to others"),
        (lambda s, p: os.chmod(s.state_dir, 0o750), "chmod go-rwx"),  # group access alone is refused too
        (lambda s, p: os.chmod(s.auth_key, 0o644), "accessible to others"),
        (
            lambda s, p: (
                p.joinpath("k").write_text("not a key"),
                p.joinpath("k").chmod(0o600),
                setattr(s, "auth_key", p / "k"),
            ),
            "OpenSSH private key",
        ),
        (lambda s, p: setattr(s, "root_certificates", s.auth_key), "no PEM certificate"),
        (lambda s, p: setattr(s, "root_certificates", None), "--root-certificates"),
        (lambda s, p: (setattr(s, "insecure", True), setattr(s, "auth_key", None)), "binds the site-id"),
        (lambda s, p: setattr(s, "epsilon_budget", -1.0), "epsilon-budget"),
    ],
)
def test_a_bad_site_is_refused_with_the_problem_named(
    site: NodeSettings, tmp_path: Path, change: Callable[[NodeSettings, Path], object], message: str
) -> None:
    change(site, tmp_path)
    with pytest.raises(ConfigError, match=message):
        check(site)


def test_insecure_is_development_only_and_has_no_node_auth(site: NodeSettings) -> None:
    site.insecure, site.root_certificates = True, None
    cmd = supernode_command(check(site), None)
    assert "--insecure" in cmd and "--auth-supernode-private-key" not in cmd
    assert node_config(site)[IDENTITY_KEY] == str(site.auth_key.resolve())  # stamen's handshake still signs


def test_extra_node_config_cannot_shadow_an_option() -> None:
    assert node_assignment("dp-public-stats=true") == ("dp-public-stats", "true")
    with pytest.raises(ConfigError, match="--state-dir"):
        node_assignment("state-dir=/tmp")
    with pytest.raises(ConfigError, match="key=value"):
        node_assignment("Bad Key=1")


def test_superlink_has_tls_node_auth_and_a_database_unless_told_otherwise(tmp_path: Path, pki: Path) -> None:
    cmd = superlink_command(SuperLinkSettings(tmp_path / "link.db", pki / "certs"))
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "link.db")
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(pki / "certs" / "server.crt")
    with pytest.raises(ConfigError, match="--certificates"):
        superlink_command(SuperLinkSettings(tmp_path / "link.db"))
    with pytest.raises(ConfigError, match="needs TLS"):
        superlink_command(SuperLinkSettings(tmp_path / "link.db", insecure=True))
    assert "--insecure" in superlink_command(SuperLinkSettings(tmp_path / "db", insecure=True, node_auth=False))


def test_stamen_node_cli_reports_a_bad_state_dir_in_one_line(site: NodeSettings) -> None:
    os.chmod(site.state_dir, 0o755)
    res = subprocess.run(
        [sys.executable, "-m", "stamen", "node", "--site-id", "site-a", "--superlink", "127.0.0.1:9092",
         "--state-dir", str(site.state_dir), "--data-dir", str(site.data_dir), "--root-certificates",
         str(site.root_certificates), "--auth-key", str(site.auth_key), "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "state directory" in res.stderr and "chmod go-rwx" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_site_policy_file_goes_into_the_node_config_and_a_bad_policy_stops_the_node(
    site: NodeSettings, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("site-dp = true\nepsilon-budget = 2.5\nsite-delta = 1e-7\n")
    site.extra = {}
    cmd = supernode_command(check(with_policy_file(site, policy)), site.state_dir / ".secret")
    config = cmd[cmd.index("--node-config") + 1]
    assert "site-dp=true" in config and "site-delta=1e-07" in config and "epsilon-budget=2.5" in config
    site.extra = {"site-dp": "true"}
    site.epsilon_budget = None
    with pytest.raises(ConfigError, match="site-dp = true needs epsilon-budget"):
        check(site)
    site.extra = {"site-delta": "1e-6"}
    with pytest.raises(ConfigError, match="but not site-dp"):
        check(site)


def test_a_node_without_privacy_configuration_requires_dp_and_does_not_start_without_a_budget(
    site: NodeSettings,
) -> None:
    site.extra = {}
    with pytest.raises(ConfigError, match=r"no privacy configuration.*--epsilon-budget.*site-dp=false"):
        check(site)
    site.epsilon_budget = 4.0
    policy = site_policy(check(site))
    assert (policy.source, policy.dp_required, policy.budget, policy.delta, policy.accountant) == (
        "default",
        True,
        4.0,
        1e-5,
        "rdp",
    )
    assert (policy.privacy_policy, policy.public_stats) == ("refuse", False)
    site.extra = {"site-dp": "false"}
    assert not site_policy(check(site)).dp_required, "accepting non-DP runs takes an explicit site-dp=false"


class _Exec(Exception):
    """Raised instead of exec'ing the SuperNode."""


def test_stamen_node_logs_its_privacy_policy_at_start(
    site: NodeSettings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    site.extra, site.epsilon_budget, site.executor = {}, 3.0, "flower"

    def no_exec(*_: object) -> None:
        raise _Exec

    monkeypatch.setattr(os, "execve", no_exec)
    with caplog.at_level("INFO", logger="stamen.node"), pytest.raises(_Exec):
        run_node(check(site))
    (line,) = [r.getMessage() for r in caplog.records if "privacy policy" in r.getMessage()]
    assert "site site-a privacy policy: DP required, epsilon budget 3" in line
    assert "delta <= 1e-05" in line and "strict default" in line


def test_a_daemons_info_lines_reach_stderr_after_opacus_configured_the_root_logger() -> None:
    """Opacus calls ``basicConfig`` when imported, and a node's policy check imports it before
    ``stamen node`` sets up its log: the node's own INFO lines must still be written."""
    code = (
        "import logging, opacus.utils.module_utils\n"
        "from stamen.cli.deploy import log_to_stderr\n"
        "log_to_stderr()\n"
        "logging.getLogger('stamen.node').info('site site-a: up')\n"
        "logging.getLogger('httpx').info('one line per poll')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "STAMEN_LOG_LEVEL": "INFO"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "INFO:stamen.node:site site-a: up" in res.stderr.splitlines(), res.stderr
    assert "one line per poll" not in res.stderr


def test_a_node_without_a_runtime_port_takes_a_free_one_and_a_taken_one_names_the_option() -> None:
    """Two nodes on one host: the second no longer meets Flower's 401 from the first one's port."""
    first, second = pick_runtime_port(0), pick_runtime_port(0)
    assert first > 0 and second > 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--runtime-port {port} on 127.0.0.1 is in use"):
            pick_runtime_port(port)
    assert pick_runtime_port(port) == port  # free again: the given port is kept


def test_a_node_restarted_on_its_runtime_port_is_not_refused_for_the_old_connections() -> None:
    """A killed SuperNode leaves its accepted connections in TIME_WAIT; gRPC binds over them."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its end waits in TIME_WAIT
            client.recv(1)
    assert pick_runtime_port(port) == port


@pytest.mark.slow
def test_the_health_port_serves_flowers_grpc_health_service_for_a_kubelet(site: NodeSettings) -> None:
    """``--health-port``: what the StatefulSet's probes (deploy/k8s/stamen-sites.yaml) ask, answered
    by the running SuperNode while it still waits for its SuperLink (nobody listens at 9092)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from stamen.simulations.bench.loopback import free_port

    port = free_port()
    with pytest.raises(ConfigError, match="--health-port"):
        check(NodeSettings(**{**site.__dict__, "runtime_port": port, "health_port": port}))
    cmd = [sys.executable, "-m", "stamen", "node", "--site-id", "site-a", "--superlink", "127.0.0.1:9092",
           "--state-dir", str(site.state_dir), "--data-dir", str(site.data_dir), "--root-certificates",
           str(site.root_certificates), "--auth-key", str(site.auth_key), "--set", "site-dp=false",
           "--health-port", str(port), "--runtime-port", str(free_port()), "--connect-timeout", "60"]  # fmt: skip
    node = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline, status = time.monotonic() + 90, None
            while status is None and time.monotonic() < deadline and node.poll() is None:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    time.sleep(0.5)
        assert status == health_pb2.HealthCheckResponse.SERVING, node.poll()
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)
