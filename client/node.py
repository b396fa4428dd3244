"""``stamen node``: check a site's configuration, then run the real Flower SuperNode.

A site is one ``flower-supernode`` connected to the federation's SuperLink, with its
node config (``site-id``, its data, its state directory, its privacy budget) handed to
the ClientApp by Flower. This module only checks what a site operator gets wrong before
anything connects — the data is there and readable, the state directory is private, the
key files are private and parse — and builds the SuperNode's command line from it:
TLS with the federation's CA and the node's authentication key, unless ``--insecure``
(development only: no TLS, hence no node authentication).

Two executors run the ClientApp tasks the SuperNode receives:
- ``warm`` (default): the SuperNode runs with ``--isolation process`` and this process
  claims its tasks and runs them in-process (:mod:`client.executor`), keeping torch, the
  model and the data loaded. The SuperNode's Runtime API stays on loopback and claiming a
  task needs an HMAC with a per-node secret kept in the state directory.
- ``flower``: Flower's default, a fresh ``flwr-clientapp`` process per message.

With ``warm`` this process supervises the SuperNode: when either ends, the other is
stopped (the SuperNode also gets SIGKILL if this process is killed). A SuperNode whose
activation the SuperLink refuses (unregistered key, or the previous session of the same
key is still marked online: up to two heartbeats, about a minute, after a crash) is
started again until ``connect-timeout`` has passed.

A node holds its site state dir's lock (:class:`common.state.SiteLock`) for its life, so a
second node (or ``stamen node ack-ledger``) on the same dir is refused; with the ``flower``
executor each ClientApp process takes it per message instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from stamen.common.errors import ConfigError
from stamen.common.identity import IDENTITY_KEY, validate_site_id
from stamen.common.state import SiteLock, SiteStore

if TYPE_CHECKING:
    from stamen.client.site_policy import SitePolicy

log = logging.getLogger("stamen.node")

#: Flower's exit code for a SuperNode whose connection (activation) the SuperLink refused.
CONNECTION_REFUSED_EXIT = 305
#: Seconds between a refused activation and the next try.
RECONNECT_PAUSE = 5.0
#: Seconds a stopping SuperNode gets between SIGTERM and SIGKILL.
STOP_GRACE = 15.0
SECRET_FILE = ".superexec-secret"
EXECUTORS = ("warm", "flower")
#: Node-config keys that have an option of their own.
OWN_OPTION = {
    "site-id": "--site-id",
    "state-dir": "--state-dir",
    "data": "--data",
    "data-dir": "--data-dir",
    "epsilon-budget": "--epsilon-budget",
    IDENTITY_KEY: "--auth-key",
}


@dataclass
class NodeSettings:
    """Everything a site sets; :func:`check` validates it."""

    site_id: str
    superlink: str
    state_dir: Path
    data: str = ""
    data_dir: Path | None = None
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    epsilon_budget: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    runtime_port: int = 0  # 0: a free loopback port, chosen at start (several nodes on one host)
    executor: str = "warm"
    poll: float = 0.05
    connect_timeout: float = 120.0
    torch_threads: int = 0
    #: Port of Flower's gRPC health service (no TLS: it answers "serving" and nothing else); 0: none.
    health_port: int = 0
    #: Where the health service listens: loopback unless the operator opens it (a kubelet's
    #: probes come to the pod's address, so the k8s manifest sets 0.0.0.0).
    health_host: str = "127.0.0.1"


def check_private(path: Path, what: str, mask: int) -> None:
    """Refuse ``path`` if its mode grants any of ``mask`` (0o007: others; 0o077: group and others)."""
    mode = path.stat().st_mode
    if mode & mask:
        who = "o" if mask == 0o007 else "go"
        raise ConfigError(f"{what} {path} is accessible to others (mode {stat.filemode(mode)}): chmod {who}-rwx it")


def readable_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path} is not readable by this user")
    return path


def _check_data(settings: NodeSettings) -> None:
    if bool(settings.data) == (settings.data_dir is not None):
        raise ConfigError("set exactly one of --data (npz:PATH or csv:PATH) and --data-dir")
    if settings.data_dir is not None:
        d = settings.data_dir
        if not d.is_dir():
            raise ConfigError(f"data directory {d} does not exist or is not a directory")
        if not os.access(d, os.R_OK | os.X_OK):
            raise ConfigError(f"data directory {d} is not readable by this user")
        return
    kind, sep, path = settings.data.partition(":")
    if not sep or kind not in ("npz", "csv") or not path:
        raise ConfigError(f"--data must be npz:PATH or csv:PATH, got {settings.data!r}")
    readable_file(Path(path), "data file")


def _check_state_dir(path: Path) -> None:
    if not path.is_dir():
        raise ConfigError(f"state directory {path} does not exist (create it with: install -d -m 700 {path})")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"state directory {path} is not writable by this user")
    check_private(path, "state directory", 0o077)


def _check_tls(settings: NodeSettings) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if settings.auth_key is None:
        raise ConfigError(
            "--auth-key (this node's private key, deploy/tls/make-node-key.sh) is required: the ServerApp binds "
            "the site-id to it"
            + (" (with --insecure Flower does not authenticate the node, but stamen's handshake still does)"
               if settings.insecure else "")
        )  # fmt: skip
    if not settings.insecure:
        if settings.root_certificates is None:
            raise ConfigError(
                "--root-certificates (the federation's CA) is required unless --insecure (development only)"
            )
        ca = readable_file(settings.root_certificates, "root certificate file")
        try:
            x509.load_pem_x509_certificates(ca.read_bytes())
        except ValueError as exc:
            raise ConfigError(f"root certificate file {ca} holds no PEM certificate: {exc}") from None
    key = readable_file(settings.auth_key, "authentication key")
    check_private(key, "authentication key", 0o077)
    try:
        private = load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"authentication key {key} is not an unencrypted OpenSSH private key: {exc}") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"authentication key {key} must be an ECDSA key on a NIST curve (ssh-keygen -t ecdsa)")


def node_assignment(text: str) -> tuple[str, str]:
    """One extra node-config ``KEY=VALUE`` from ``--set`` (keys with an option of their own are refused)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[a-z][a-z0-9-]*", key):
        raise ConfigError(f"--set expects key=value with a lower-case hyphenated key, got {text!r}")
    if key in OWN_OPTION:
        raise ConfigError(f"set node config {key!r} with {OWN_OPTION[key]}, not --set")
    return key, value.strip()


def check(settings: NodeSettings) -> NodeSettings:
    """Validate ``settings``; raise :class:`ConfigError` naming the first problem."""
    validate_site_id(settings.site_id)
    host, sep, port = settings.superlink.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--superlink must be HOST:PORT, got {settings.superlink!r}")
    if settings.executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {settings.executor!r}")
    _check_data(settings)
    _check_state_dir(settings.state_dir)
    _check_tls(settings)
    if settings.torch_threads < 0:
        raise ConfigError(f"--torch-threads must be >= 0, got {settings.torch_threads}")
    if not 0 <= settings.health_port <= 65535 or (
        settings.health_port and settings.health_port == settings.runtime_port
    ):
        raise ConfigError(f"--health-port must be 0 or a port other than --runtime-port, got {settings.health_port}")
    if settings.epsilon_budget is not None and not settings.epsilon_budget > 0:
        raise ConfigError(f"--epsilon-budget must be > 0, got {settings.epsilon_budget}")
    site_policy(settings)
    return settings


def site_policy(settings: NodeSettings) -> SitePolicy:
    """This node's privacy policy (``site-*`` keys, :mod:`client.site_policy`), checked before the node starts.

    A node without any privacy configuration would refuse every round (DP is required by
    default, and it has no budget), so it does not start: its operator chooses a budget
    or ``site-dp=false``.
    """
    from stamen.client.site_policy import SitePolicy
    from stamen.common.config import StamenConfig

    policy = SitePolicy.of(node_config(settings), StamenConfig.from_mapping({}))
    if policy.dp_required and not policy.budget > 0:
        raise ConfigError(
            "this node has no privacy configuration: it requires DP by default and needs its own budget "
            "(--epsilon-budget E); to accept runs without DP set --set site-dp=false"
        )
    return policy


def with_policy_file(settings: NodeSettings, path: Path) -> NodeSettings:
    """``settings`` with the keys of site policy file ``path`` (``stamen node --site-policy``)."""
    from stamen.client.site_policy import load_policy_file

    keys = load_policy_file(path)
    clash = sorted(k for k in keys if k in settings.extra or (k == "epsilon-budget" and settings.epsilon_budget))
    if clash:
        raise ConfigError(f"--site-policy {path} and --set/--epsilon-budget both set {', '.join(clash)}")
    budget = keys.pop("epsilon-budget", settings.epsilon_budget)
    settings.epsilon_budget = None if budget is None else float(budget)
    settings.extra = {**settings.extra, **keys}
    return settings


def _toml_value(value: object) -> str:
    """A node-config value as Flower parses it (TOML scalars)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def node_config(settings: NodeSettings) -> dict[str, object]:
    """The node config the ClientApp reads (``site-id``, data, ``state-dir``, budget, extras)."""
    config: dict[str, object] = {"site-id": settings.site_id, "state-dir": str(settings.state_dir.resolve())}
    if settings.data_dir is not None:
        config["data-dir"] = str(settings.data_dir.resolve())
    else:
        kind, _, path = settings.data.partition(":")
        config["data"] = f"{kind}:{Path(path).resolve()}"
    if settings.epsilon_budget is not None:
        config["epsilon-budget"] = float(settings.epsilon_budget)
    if settings.auth_key is not None:  # the ClientApp signs the server's identity handshake with it
        config[IDENTITY_KEY] = str(settings.auth_key.resolve())
    config.update(settings.extra)
    return config


def flower_binary(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found next to {sys.executable} nor on PATH: is flwr installed?")
    return found


def supernode_command(settings: NodeSettings, secret_file: Path | None) -> list[str]:
    """The ``flower-supernode`` command line for ``settings``."""
    cmd = [flower_binary("flower-supernode"), "--superlink", settings.superlink]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        assert settings.root_certificates is not None and settings.auth_key is not None  # check() made sure
        cmd += ["--root-certificates", str(settings.root_certificates.resolve()), "--auth-supernode-private-key",
                str(settings.auth_key.resolve())]  # fmt: skip
    pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config(settings).items())
    cmd += ["--node-config", pairs, "--host", "127.0.0.1", "--port", str(settings.runtime_port)]
    if settings.health_port:
        cmd += ["--health-server-address", f"{settings.health_host}:{settings.health_port}"]
    if settings.executor == "warm":
        cmd += ["--isolation", "process"]
        if secret_file is not None:
            cmd += ["--superexec-auth-secret-file", str(secret_file)]
    return cmd


def node_secret(state_dir: Path) -> Path:
    """The per-node secret that lets the warm executor (and nothing else) claim tasks."""
    path = state_dir / SECRET_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    check_private(path, "executor secret", 0o077)
    return path


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when this process dies (Linux prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)


class SuperNodeProcess:
    """A running ``flower-supernode`` whose output is relayed to ours and read on the way.

    Flower reports a refused activation in its output (``Exit Code: 305``) while the
    process itself exits with 1, so the relay keeps the exit code Flower printed.
    """

    def __init__(self, cmd: list[str], env: Mapping[str, str]) -> None:
        log.info("starting %s", " ".join(cmd))
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.popen = subprocess.Popen(
            cmd, env=dict(env), start_new_session=True, preexec_fn=preexec, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.flower_exit: int | None = None
        self._relay = threading.Thread(target=self._copy, daemon=True)
        self._relay.start()

    def _copy(self) -> None:
        """Relay the SuperNode's lines, stamped with the time they arrived (Flower's own have none)."""
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            sys.stdout.buffer.write(f"{stamp} ".encode() + line)
            sys.stdout.buffer.flush()
            if m := re.search(rb"Exit Code: (\d+)", line):
                self.flower_exit = int(m.group(1))

    def poll(self) -> int | None:
        """None while running; else Flower's own exit code if it printed one, else the process's."""
        code = self.popen.poll()
        if code is None:
            return None
        self._relay.join(timeout=5.0)
        return self.flower_exit if self.flower_exit is not None else code


def _stop(node: SuperNodeProcess) -> int:
    """SIGTERM the SuperNode's process group, SIGKILL it after a grace period; its exit code."""
    proc = node.popen
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


class _Stop(Exception):
    """SIGTERM/SIGINT arrived while no task was running."""


def pick_runtime_port(port: int) -> int:
    """The SuperNode's loopback Runtime API port: ``port`` if it is free, or any free one for 0.

    A taken port would otherwise surface as Flower's ``401 Unauthorized`` from whichever node
    already listens there (another ``stamen node`` on this host). The probe binds as gRPC does,
    with ``SO_REUSEADDR``: a node restarted on its port finds the old connections in TIME_WAIT
    there for a minute, which gRPC's bind accepts and a plain bind refuses; a live listener is
    refused either way.
    """
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(
                f"--runtime-port {port} on 127.0.0.1 is in use ({exc.strerror or exc}; another node on this host?): "
                "give each node its own --runtime-port, or leave it out and a free one is chosen"
            ) from None
        return int(probe.getsockname()[1])


def run_node(settings: NodeSettings, env: Mapping[str, str] | None = None) -> int:
    """Run the site until it is stopped or its SuperNode ends; the exit code to return."""
    env = dict(os.environ if env is None else env)
    settings.runtime_port = pick_runtime_port(settings.runtime_port)
    log.info("site %s: SuperNode Runtime API on 127.0.0.1:%d", settings.site_id, settings.runtime_port)
    log.info("site %s privacy policy: %s", settings.site_id, site_policy(settings).describe())
    site_dir = SiteStore(settings.state_dir, settings.site_id).dir
    if settings.executor == "flower":
        cmd = supernode_command(settings, None)
        with SiteLock.held(site_dir):  # refused if another node holds it; each flwr-clientapp takes it per message
            pass
        os.execve(cmd[0], cmd, env)  # Flower's own isolation: nothing of ours stays in between
    SiteLock.acquire(site_dir)  # one node per site state dir, for this process's life (the OS drops it)
    secret_file = node_secret(settings.state_dir.resolve())
    cmd = supernode_command(settings, secret_file)
    state = {"busy": False, "stop": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        state["stop"] = True
        if not state["busy"]:
            raise _Stop

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    procs = [SuperNodeProcess(cmd, env)]
    try:
        code = _supervise(settings, cmd, env, procs, secret_file.read_bytes(), state)
    except _Stop:
        code = 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _stop(procs[-1])
    return code if code >= 0 else 128 - code


def _supervise(
    settings: NodeSettings,
    cmd: list[str],
    env: dict[str, str],
    procs: list[SuperNodeProcess],
    secret: bytes,
    state: dict[str, bool],
) -> int:
    """Run tasks while the SuperNode lives; start it again while the SuperLink refuses it."""
    from stamen.client.executor import WarmExecutor

    first = time.monotonic()
    executor = WarmExecutor(f"127.0.0.1:{settings.runtime_port}", secret, settings.torch_threads)
    try:
        while not state["stop"]:
            code = procs[-1].poll()
            if code is None:
                state["busy"] = True
                result = executor.poll_once()
                state["busy"] = False
                if result is None and not state["stop"]:
                    time.sleep(settings.poll)
            elif code != CONNECTION_REFUSED_EXIT:
                log.warning("the SuperNode exited with code %s", code)
                return code
            elif time.monotonic() - first < settings.connect_timeout:
                log.warning("the SuperLink refused this node; trying again in %.0fs", RECONNECT_PAUSE)
                time.sleep(RECONNECT_PAUSE)
                procs.append(SuperNodeProcess(cmd, env))
            else:
                raise ConfigError(
                    f"the SuperLink refused node {settings.site_id} for {settings.connect_timeout:.0f}s: is its "
                    "public key registered (deploy/tls/register-node.sh)? A crashed node's old session stays "
                    "online for up to a minute."
                )
        return 0
    finally:
        executor.close()
