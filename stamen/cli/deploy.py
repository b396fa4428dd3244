"""The deployment commands of the ``stamen`` CLI: ``stamen node``, ``stamen superlink``,
``stamen rebind`` and ``stamen dashboard`` (writes the Grafana dashboard of deploy/grafana).

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
from stamen.common.errors import ConfigError
from stamen.dashboard import DASHBOARD_PATH, render
from stamen.server.superlink import DEFAULT_BUSY_TIMEOUT, SuperLinkSettings, run_superlink, superlink_command


def _opt(help_text: str, env: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_text, envvar=f"STAMEN_{env}")


def node(
    site_id: Annotated[str, _opt("this site's stable id (letters, digits, . _ -)", "SITE_ID")],
    state_dir: Annotated[Path, _opt("private directory for the site's ledger and state (mode 700)", "STATE_DIR")],
    action: Annotated[
        str | None,
        typer.Argument(help="ack-ledger: acknowledge a tampered privacy ledger (needs --reason), instead of running"),
    ] = None,
    superlink: Annotated[str, _opt("the SuperLink's Fleet address, HOST:PORT", "SUPERLINK")] = "",
    reason: Annotated[str, typer.Option(help="ack-ledger: what happened to the ledger (recorded)")] = "",
    data: Annotated[str, _opt("the site's data file: npz:PATH or csv:PATH", "DATA")] = "",
    data_dir: Annotated[Path | None, _opt("a directory of .npz/.csv shards the site watches", "DATA_DIR")] = None,
    root_certificates: Annotated[Path | None, _opt("the federation CA certificate (PEM)", "ROOT_CERTIFICATES")] = None,
    auth_key: Annotated[Path | None, _opt("this node's private key (deploy/tls/make-node-key.sh)", "AUTH_KEY")] = None,
    insecure: Annotated[bool, _opt("no TLS, no node authentication: DEVELOPMENT ONLY", "INSECURE")] = False,
    epsilon_budget: Annotated[float | None, _opt("this site's privacy budget (epsilon)", "EPSILON_BUDGET")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="extra node config KEY=VALUE, e.g. dp-public-stats=true")
    ] = None,
    runtime_port: Annotated[
        int,
        _opt(
            "loopback port of the SuperNode's Runtime API (0 = a free one: several nodes on one host)", "RUNTIME_PORT"
        ),
    ] = 0,
    health_port: Annotated[
        int, _opt("port of the SuperNode's gRPC health service, for probes (0: none)", "HEALTH_PORT")
    ] = 0,
    health_host: Annotated[
        str, _opt("address the health service listens on (0.0.0.0 for a kubelet's probes)", "HEALTH_HOST")
    ] = "127.0.0.1",
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
    """Check this site's configuration, then run the real Flower SuperNode for it.

    ``stamen node ack-ledger --state-dir D --site-id S --reason TEXT`` instead records an
    operator's acknowledgement of a tampered privacy ledger and re-seals it
    (:func:`stamen.client.ledger.acknowledge`), so the site trains again.
    """
    if action is not None:
        ack_ledger(action, state_dir, site_id, reason)
        return
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
        health_port=health_port,
        health_host=health_host,
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
    log_to_stderr("%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.Formatter.converter = time.gmtime  # UTC, as the SuperNode's relayed lines
    code = run_node(settings)
    if code:
        raise typer.Exit(code)


def log_to_stderr(fmt: str = logging.BASIC_FORMAT) -> None:
    """A daemon's own log lines to stderr, at ``STAMEN_LOG_LEVEL`` (INFO).

    ``force``: Opacus configures the root logger when it is imported (``opacus.utils.module_utils``
    calls ``basicConfig`` at WARNING), and checking a site's policy imports it first; without
    ``force`` our call would do nothing and every INFO line of the node would be lost.
    """
    logging.basicConfig(level=os.environ.get("STAMEN_LOG_LEVEL", "INFO"), format=fmt, force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise


def ack_ledger(action: str, state_dir: Path, site_id: str, reason: str) -> None:
    """``stamen node ack-ledger``: record the acknowledgement in ``ledger-events``, re-seal, report."""
    from stamen.client.ledger import acknowledge
    from stamen.common.errors import ConfigError
    from stamen.common.state import SiteStore

    if action != "ack-ledger":
        raise ConfigError(f"stamen node takes no argument but ack-ledger, got {action!r}")
    if not (state_dir / site_id).is_dir():
        raise ConfigError(f"site {site_id} has no state in {state_dir} (no directory {state_dir / site_id})")
    event = acknowledge(SiteStore(state_dir, site_id), reason)
    for name, found in event["ledgers"].items():
        spend = f"epsilon {found['epsilon']:.4g} over {found['rounds']} rounds" if "epsilon" in found else "nothing"
        typer.echo(f"{name}: re-sealed from the {found['source']} copy ({spend}); was: {found['problem'] or 'intact'}")
    if event.get("lost_rounds"):
        typer.echo(f"{event['lost_rounds']} DP round(s) the participation record counts had no surviving ledger")
    typer.echo(f"acknowledged in {state_dir / site_id / 'ledger-events.json'}")


def superlink(
    database: Annotated[Path, _opt("SQLite file for the SuperLink's state (survives restarts)", "DATABASE")],
    certificates: Annotated[
        Path | None, _opt("directory with ca.crt, server.crt, server.key (deploy/tls/make-dev-ca.sh)", "CERTIFICATES")
    ] = None,
    host: Annotated[str, _opt("address the Fleet API (the only network-facing one) listens on", "HOST")] = "127.0.0.1",
    port: Annotated[int, _opt("port of the Fleet API, the one SuperNodes dial", "PORT")] = 9093,
    control_port: Annotated[
        int, _opt("loopback port of Flower's Control and ServerAppIo APIs (flwr, SuperExec)", "CONTROL_PORT")
    ] = 9091,
    control_host: Annotated[
        str, _opt("address of the Control API: loopback only, anything else is refused", "CONTROL_HOST")
    ] = "127.0.0.1",
    node_auth: Annotated[bool, _opt("accept only registered SuperNode keys", "NODE_AUTH")] = True,
    insecure: Annotated[bool, _opt("no TLS: DEVELOPMENT ONLY (needs --no-node-auth)", "INSECURE")] = False,
    install_dependencies: Annotated[
        bool, _opt("let Flower install each run's app dependencies (uv sync; needs internet)", "INSTALL_DEPENDENCIES")
    ] = False,
    serverapp_isolation: Annotated[
        str, _opt("subprocess: the SuperLink runs the ServerApp; process: a flower-superexec does", "ISOLATION")
    ] = "subprocess",
    superexec_auth_secret_file: Annotated[
        Path | None, _opt("the secret shared with flower-superexec (needed with process isolation)", "SUPEREXEC_SECRET")
    ] = None,
    database_busy_timeout: Annotated[
        float, _opt("seconds a request waits for the database's write lock (Flower's own: 5)", "DATABASE_BUSY_TIMEOUT")
    ] = DEFAULT_BUSY_TIMEOUT,
    dry_run: Annotated[bool, typer.Option(help="check the configuration, print the SuperLink command, exit")] = False,
) -> None:
    """Run Flower's SuperLink on loopback with TLS, node authentication and a database; expose only its Fleet API."""
    settings = SuperLinkSettings(
        database,
        certificates,
        insecure,
        host,
        port,
        node_auth,
        install_dependencies,
        serverapp_isolation,
        control_port=control_port,
        control_host=control_host,
        superexec_secret=superexec_auth_secret_file,
        busy_timeout=database_busy_timeout,
    )
    cmd = superlink_command(settings)
    if insecure:
        typer.secho("WARNING: --insecure: no TLS (development only)", err=True, fg="red")
    typer.echo(" ".join(cmd), err=True)
    typer.echo(f"Fleet API on {host}:{port}; Control and ServerAppIo on 127.0.0.1:{control_port} only", err=True)
    if not dry_run:
        log_to_stderr()
        code = run_superlink(settings, cmd)
        if code:
            raise typer.Exit(code)


def rebind(
    site_id: Annotated[str, typer.Argument(help="the site-id whose key binding to forget")],
    out_dir: Annotated[Path, typer.Option(help="the run's out-dir (where the ServerApp writes history)")],
    reason: Annotated[str, typer.Option(help="why (recorded with the run's state), e.g. 'site-a rotated its key'")],
) -> None:
    """Operator action: let the next key that proves SITE_ID bind it (after a site's key changed)."""
    if not out_dir.is_dir():
        raise ConfigError(f"--out-dir {out_dir} is not a directory: give the run's out-dir")
    from stamen.server.sites import request_rebind  # here: the other commands need no flwr.app

    path = request_rebind(out_dir, site_id, reason)
    typer.echo(f"rebind of {site_id} requested ({path}): the ServerApp applies it at its next handshake")


def dashboard(
    out: Annotated[Path, typer.Option(help="where to write the dashboard JSON")] = DASHBOARD_PATH,
    check: Annotated[bool, typer.Option(help="write nothing; exit 1 when OUT is not what would be written")] = False,
) -> None:
    """Generate the Grafana dashboard from its definition (stamen/dashboard.py)."""
    text = render()
    if check:
        current = out.read_text() if out.is_file() else None
        if current != text:
            typer.echo(f"{out} is not current: run `stamen dashboard --out {out}`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{out} is current")
        return
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: directory {out.parent} does not exist")
    out.write_text(text)
    typer.echo(f"stamen dashboard -> {out}")
