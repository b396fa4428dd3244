"""``stamen superlink``: Flower's SuperLink with stamen's secure defaults.

It checks the certificate files and the database directory, then runs ``flower-superlink``
with TLS, SuperNode authentication (only registered node keys may connect) and a database
file, so that the SuperLink's state (registered nodes, runs, queued messages) survives its
restart. ``--insecure`` turns TLS and node authentication off: development only.

What faces the network: Flower 1.42 serves Fleet, Control and Runtime (ServerAppIo) from one
HTTP server, and its open-source Control API authenticates nobody. So Flower's server is
always bound to 127.0.0.1 (``--control-port``: where ``flwr run``, ``flwr supernode register``
and the SuperExec connect, on the SuperLink host only), and the operator's ``--host:--port``
gets :mod:`stamen.server.fleet_proxy`, which forwards the Fleet API alone.

The SuperLink runs as ``python -m stamen.server.superlink``: the same ``flower-superlink``
entry point, with one change made first. Flower 1.42 sets SQLite's ``busy_timeout`` to 5 s
(``flwr.supercore.constant.SQLITE_PRAGMAS``, no option) and answers a request that waited
longer for the write lock with HTTP 500, which its own clients do not retry: with 10
SuperNodes on a busy host the SuperNode that got it quit, SuperExec died, and replies were
lost (docs/notes/superlink-sqlite.md). ``--database-busy-timeout`` makes the wait longer.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from stamen.client.node import check_private, readable_file
from stamen.common.errors import ConfigError, StamenError

#: Seconds a SuperLink request waits for SQLite's write lock: below the 30 s after which
#: Flower's HTTP clients give up on a request (a request cut off then may already have
#: claimed the message it asked for), far above Flower's 5 s.
DEFAULT_BUSY_TIMEOUT = 25.0
BUSY_TIMEOUT_FLAG = "--database-busy-timeout"

log = logging.getLogger("stamen.superlink")

LOOPBACK = "127.0.0.1"


@dataclass
class SuperLinkSettings:
    """What an operator sets for the SuperLink."""

    database: Path
    certificates: Path | None = None
    insecure: bool = False
    host: str = LOOPBACK
    port: int = 9093
    node_auth: bool = True
    install_dependencies: bool = False
    isolation: str = "subprocess"
    control_port: int = 9091
    control_host: str = LOOPBACK
    superexec_secret: Path | None = None
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_addresses(settings: SuperLinkSettings) -> None:
    if not is_loopback(settings.control_host):
        raise ConfigError(
            f"--control-host {settings.control_host}: the Control and ServerAppIo APIs must stay on loopback. "
            "Flower 1.42's open-source Control API has no authentication, so anyone reaching it could register "
            "node keys and run code on this host; use `flwr` on the SuperLink host (or an SSH tunnel)"
        )
    if settings.control_port == settings.port:
        raise ConfigError(f"--control-port and --port are both {settings.port}: the Fleet proxy needs its own port")
    for name, port in (("--port", settings.port), ("--control-port", settings.control_port)):
        if not 0 < port < 65536:
            raise ConfigError(f"{name} {port} is not a TCP port")


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """Validate ``settings`` and build the ``flower-superlink`` command line (loopback only)."""
    _check_addresses(settings)
    db_dir = settings.database.expanduser().resolve().parent
    if not db_dir.is_dir() or not os.access(db_dir, os.W_OK):
        raise ConfigError(f"database directory {db_dir} does not exist or is not writable")
    if not 0 < settings.busy_timeout <= 3600:
        raise ConfigError(f"{BUSY_TIMEOUT_FLAG} must be in (0, 3600] seconds, got {settings.busy_timeout}")
    cmd = [sys.executable, "-m", "stamen.server.superlink", BUSY_TIMEOUT_FLAG, str(settings.busy_timeout)]
    cmd += ["--database", str(settings.database.expanduser().resolve())]
    cmd += ["--host", LOOPBACK, "--port", str(settings.control_port)]
    if settings.insecure:
        if settings.node_auth:
            raise ConfigError("node authentication needs TLS: with --insecure (development only) add --no-node-auth")
        cmd.append("--insecure")
    else:
        ca, crt, key = server_certificates(settings)
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(crt), "--ssl-keyfile", str(key)]
        if settings.node_auth:
            cmd.append("--enable-supernode-auth")
    if settings.isolation not in ("subprocess", "process"):
        raise ConfigError(f"--serverapp-isolation must be subprocess or process, got {settings.isolation!r}")
    cmd += ["--isolation", settings.isolation]
    if settings.isolation == "process":
        if settings.superexec_secret is None:
            raise ConfigError(
                "--serverapp-isolation=process needs --superexec-auth-secret-file (the secret the SuperExec "
                "also gets): otherwise any process reaching the Runtime API can pose as the SuperExec"
            )
        secret = readable_file(settings.superexec_secret, "SuperExec secret file")
        check_private(secret, "SuperExec secret file", 0o077)
        cmd += ["--superexec-auth-secret-file", str(secret.resolve())]
    if not settings.install_dependencies:
        cmd.append("--disable-runtime-dependency-installation")
    return cmd


def server_certificates(settings: SuperLinkSettings) -> tuple[Path, Path, Path]:
    """The readable ca.crt, server.crt and a private server.key from ``--certificates``."""
    if settings.certificates is None:
        raise ConfigError("--certificates DIR (ca.crt, server.crt, server.key) is required unless --insecure")
    ca, crt, key = (
        readable_file(settings.certificates / n, "certificate file") for n in ("ca.crt", "server.crt", "server.key")
    )
    check_private(key, "server key", 0o077)
    return ca, crt, key


def _die_with_parent() -> None:
    """In the child: SIGTERM when ``stamen superlink`` dies, so no SuperLink outlives its proxy."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_superlink(settings: SuperLinkSettings, cmd: list[str]) -> int:
    """Run ``cmd`` (Flower's SuperLink, on loopback) and the Fleet proxy on ``host:port``
    until either ends; return the SuperLink's exit code."""
    import uvicorn

    from stamen.server.fleet_proxy import create_proxy, upstream_context

    tls = None if settings.insecure else server_certificates(settings)
    scheme = "http" if tls is None else "https"
    proxy = create_proxy(f"{scheme}://{LOOPBACK}:{settings.control_port}", upstream_context(tls and tls[0]))
    child = subprocess.Popen(cmd, preexec_fn=_die_with_parent)  # before any thread starts
    config = uvicorn.Config(
        proxy,
        host=settings.host.strip("[]"),
        port=settings.port,
        ssl_certfile=str(tls[1]) if tls else None,
        ssl_keyfile=str(tls[2]) if tls else None,
        access_log=False,
        log_level="warning",
    )
    log.info("Fleet API proxy on %s:%d -> Flower SuperLink on %s:%d", settings.host, settings.port, LOOPBACK,
             settings.control_port)  # fmt: skip
    server = uvicorn.Server(config)

    def stop_with_child() -> None:
        child.wait()
        server.should_exit = True  # a SuperLink that died takes its proxy with it

    threading.Thread(target=stop_with_child, daemon=True).start()
    try:
        server.run()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    return child.wait()


def set_sqlite_busy_timeout(seconds: float) -> None:
    """Make every SQLite connection Flower opens in this process wait ``seconds`` for a lock.

    Flower reads ``SQLITE_PRAGMAS`` from :mod:`flwr.supercore.sql_mixin` on each new
    connection; it has no public option for it. A Flower without that table is refused
    rather than run with the 5 s that lost replies.
    """
    from stamen.common.flwr_internal import sql_mixin

    pragmas = getattr(sql_mixin, "SQLITE_PRAGMAS", None)
    if not pragmas or "busy_timeout" not in dict(pragmas):
        raise StamenError(
            "this Flower has no flwr.supercore.sql_mixin.SQLITE_PRAGMAS busy_timeout: "
            "stamen's SQLite busy-timeout setting needs review (server/superlink.py)"
        )
    ms = str(round(seconds * 1000))
    sql_mixin.SQLITE_PRAGMAS = tuple((k, ms if k == "busy_timeout" else v) for k, v in pragmas)


def main(argv: list[str]) -> int:
    """``python -m stamen.server.superlink --database-busy-timeout S FLOWER-ARGS...``."""
    if len(argv) < 2 or argv[0] != BUSY_TIMEOUT_FLAG:
        raise SystemExit(f"usage: python -m stamen.server.superlink {BUSY_TIMEOUT_FLAG} SECONDS FLOWER-SUPERLINK-ARGS")
    set_sqlite_busy_timeout(float(argv[1]))
    from stamen.common.flwr_internal import flower_superlink

    sys.argv = ["flower-superlink", *argv[2:]]
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
