"""The deployment commands of the ``stamen`` CLI: ``stamen node`` and ``stamen superlink``.

Every option can also come from an environment variable (``STAMEN_…``), which is how the
systemd unit in deploy/systemd/ configures a site.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from stamen.client.node import (
    EXECUTORS,
    NodeSettings,
    check,
    node_assignment,
    run_node,
    supernode_command,
    with_policy_file,
)
from stamen.server.superlink import SuperLinkSettings, superlink_command


def _opt(help_text: str, env: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_text, envvar=f"STAMEN_{env}")


def node(
    site_id: Annotated[str, _opt("this site's stable id (letters, digits, . _ -)", "SITE_ID")],
    superlink: Annotated[str, _opt("the SuperLink's Fleet address, HOST:PORT", "SUPERLINK")],
    state_dir: Annotated[Path, _opt("private directory for the site's ledger and state (mode 700)", "STATE_DIR")],
    data: Annotated[str, _opt("the site's data file: npz:PATH or csv:PATH", "DATA")] = "",
    data_dir: Annotated[Path | None, _opt("a directory of .npz/.csv shards the site watches", "DATA_DIR")] = None,
    root_certificates: Annotated[Path | None, _opt("the federation CA certificate (PEM)", "ROOT_CERTIFICATES")] = None,
    auth_key: Annotated[Path | None, _opt("this node's private key (deploy/tls/make-node-key.sh)", "AUTH_KEY")] = None,
    insecure: Annotated[bool, _opt("no TLS, no node authentication: DEVELOPMENT ONLY", "INSECURE")] = False,
    epsilon_budget: Annotated[float | None, _opt("this site's privacy budget (epsilon)", "EPSILON_BUDGET")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="extra node config KEY=VALUE, e.g. dp-public-stats=true")
    ] = None,
    runtime_port: Annotated[int, _opt("loopback port of the SuperNode's Runtime API", "RUNTIME_PORT")] = 9094,
    executor: Annotated[str, _opt(f"who runs ClientApp tasks: {' | '.join(EXECUTORS)}", "EXECUTOR")] = "warm",
    poll: Annotated[float, _opt("seconds between the warm executor's looks for tasks", "POLL")] = 0.05,
    connect_timeout: Annotated[
        float, _opt("seconds to keep retrying while the SuperLink refuses this node", "CONNECT_TIMEOUT")
    ] = 120.0,
    torch_threads: Annotated[int, _opt("torch threads of the warm executor (0 = torch default)", "TORCH_THREADS")] = 0,
    site_policy: Annotated[
        Path | None, _opt("this site's privacy policy, a TOML/JSON file of site-* keys", "SITE_POLICY")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="check the configuration, print the SuperNode command, exit")] = False,
) -> None:
    """Check this site's configuration, then run the real Flower SuperNode for it."""
    extra = dict(node_assignment(a) for a in set_ or [])
    settings = NodeSettings(
        site_id=site_id,
        superlink=superlink,
        state_dir=state_dir,
        data=data,
        data_dir=data_dir,
        root_certificates=root_certificates,
        auth_key=auth_key,
        insecure=insecure,
        epsilon_budget=epsilon_budget,
        extra=extra,
        runtime_port=runtime_port,
        executor=executor,
        poll=poll,
        connect_timeout=connect_timeout,
        torch_threads=torch_threads,
    )
    settings = check(with_policy_file(settings, site_policy) if site_policy is not None else settings)
    if insecure:
        typer.secho("WARNING: --insecure: no TLS and no node authentication (development only)", err=True, fg="red")
    if dry_run:
        typer.echo(" ".join(supernode_command(settings, None)))
        return
    logging.basicConfig(
        level=os.environ.get("STAMEN_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.Formatter.converter = time.gmtime  # UTC, as the SuperNode's relayed lines
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    code = run_node(settings)
    if code:
        raise typer.Exit(code)


def superlink(
    database: Annotated[Path, _opt("SQLite file for the SuperLink's state (survives restarts)", "DATABASE")],
    certificates: Annotated[
        Path | None, _opt("directory with ca.crt, server.crt, server.key (deploy/tls/make-dev-ca.sh)", "CERTIFICATES")
    ] = None,
    host: Annotated[str, _opt("address the SuperLink listens on", "HOST")] = "127.0.0.1",
    port: Annotated[int, _opt("port of its Fleet, Control and Runtime APIs", "PORT")] = 9093,
    node_auth: Annotated[bool, _opt("accept only registered SuperNode keys", "NODE_AUTH")] = True,
    insecure: Annotated[bool, _opt("no TLS: DEVELOPMENT ONLY (needs --no-node-auth)", "INSECURE")] = False,
    install_dependencies: Annotated[
        bool, _opt("let Flower install each run's app dependencies (uv sync; needs internet)", "INSTALL_DEPENDENCIES")
    ] = False,
    serverapp_isolation: Annotated[
        str, _opt("subprocess: the SuperLink runs the ServerApp; process: a flower-superexec does", "ISOLATION")
    ] = "subprocess",
    dry_run: Annotated[bool, typer.Option(help="check the configuration, print the SuperLink command, exit")] = False,
) -> None:
    """Run Flower's SuperLink with TLS, node authentication and a database."""
    cmd = superlink_command(
        SuperLinkSettings(
            database, certificates, insecure, host, port, node_auth, install_dependencies, serverapp_isolation
        )
    )
    if insecure:
        typer.secho("WARNING: --insecure: no TLS (development only)", err=True, fg="red")
    typer.echo(" ".join(cmd), err=True)
    if not dry_run:
        os.execv(cmd[0], cmd)
