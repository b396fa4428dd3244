"""``stamen superlink``: Flower's SuperLink with stamen's secure defaults.

A thin wrapper: it checks the certificate files and the database directory, then
``exec``s ``flower-superlink`` with TLS, SuperNode authentication (only registered node
keys may connect: deploy/tls/register-node.sh) and a database file, so that the
SuperLink's state (registered nodes, runs, queued messages) survives its restart.
``--insecure`` turns TLS and node authentication off: development only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stamen.client.node import check_private, flower_binary, readable_file
from stamen.common.errors import ConfigError


@dataclass
class SuperLinkSettings:
    """What an operator sets for the SuperLink."""

    database: Path
    certificates: Path | None = None
    insecure: bool = False
    host: str = "127.0.0.1"
    port: int = 9093
    node_auth: bool = True
    install_dependencies: bool = False
    isolation: str = "subprocess"


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """Validate ``settings`` and build the ``flower-superlink`` command line."""
    db_dir = settings.database.expanduser().resolve().parent
    if not db_dir.is_dir() or not os.access(db_dir, os.W_OK):
        raise ConfigError(f"database directory {db_dir} does not exist or is not writable")
    cmd = [flower_binary("flower-superlink"), "--database", str(settings.database.expanduser().resolve())]
    cmd += ["--host", settings.host, "--port", str(settings.port)]
    if settings.insecure:
        if settings.node_auth:
            raise ConfigError("node authentication needs TLS: with --insecure (development only) add --no-node-auth")
        cmd.append("--insecure")
    else:
        if settings.certificates is None:
            raise ConfigError("--certificates DIR (ca.crt, server.crt, server.key) is required unless --insecure")
        certs = settings.certificates
        ca, crt, key = (readable_file(certs / n, "certificate file") for n in ("ca.crt", "server.crt", "server.key"))
        check_private(key, "server key", 0o077)
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(crt), "--ssl-keyfile", str(key)]
        if settings.node_auth:
            cmd.append("--enable-supernode-auth")
    if settings.isolation not in ("subprocess", "process"):
        raise ConfigError(f"--serverapp-isolation must be subprocess or process, got {settings.isolation!r}")
    cmd += ["--isolation", settings.isolation]
    if not settings.install_dependencies:
        cmd.append("--disable-runtime-dependency-installation")
    return cmd
