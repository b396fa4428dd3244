"""A whole deployed federation on 127.0.0.1, as real processes: for tests and measurements.

One ``stamen superlink`` (TLS with a fresh development CA, node authentication, a database
file), one ``stamen node`` per site (its own key, data directory and private state
directory), and ``flwr run`` against them — the same commands an operator runs, with the
scripts in deploy/tls/. Every process starts in a session of its own and is remembered;
:meth:`Loopback.close` stops each one's process group and those of all its descendants
(SuperExec, ServerApp, SuperNode), SIGTERM then SIGKILL, and reports what it stopped.
:class:`NodeMemory` samples the peak memory (PSS and RSS) of each site's process tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from stamen.simulations.bench.periodic import Periodic
from stamen.simulations.bench.proctree import rollup, tree

ROOT = Path(__file__).resolve().parents[2]  # the repository: deploy/tls scripts, the Flower app directory
BIN = Path(sys.executable).parent
TLS = ROOT / "deploy" / "tls"
STOP_GRACE = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass
class Proc:
    """A process this federation started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"<{exc}>"


@dataclass
class Site:
    """One site's files: key pair, data directory, state directory."""

    site_id: str
    key: Path
    data_dir: Path
    state_dir: Path
    runtime_port: int | None = field(default_factory=free_port)  # None: `stamen node` picks a free one

    @property
    def data_file(self) -> Path:
        return self.data_dir / "shard-0.npz"


class Loopback:
    """A SuperLink and its sites under ``root``; use as a context manager."""

    def __init__(self, root: Path, *, executor: str = "warm", torch_threads: int = 1, watched: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs = self.root / "certs"
        self.port = free_port()  # the Fleet API (stamen's proxy): what SuperNodes dial
        self.control_port = free_port()  # Flower's own API on loopback: what `flwr` dials
        self.executor = executor
        self.torch_threads = torch_threads  # several sites share this machine's cores
        self.watched = watched  # sites read a watched data directory (else node config names the npz file)
        self.procs: list[Proc] = []
        self.sites: dict[str, Site] = {}
        self.cli_home = self.root / "flwr-cli"
        self.stopped: dict[str, str] = {}

    # --- environment -----------------------------------------------------------------

    def env(self, home: str) -> dict[str, str]:
        """Environment of one process: its own FLWR_HOME, no telemetry, no dependency installs."""
        env = {
            **os.environ,
            "FLWR_HOME": str(self.root / "home" / home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        env.pop("RAY_ADDRESS", None)
        return env

    def cli_env(self) -> dict[str, str]:
        env = self.env("cli")
        env["FLWR_HOME"] = str(self.cli_home)
        return env

    def _run(self, cmd: list[str], env: Mapping[str, str], timeout: float = 120) -> str:
        res = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res.stdout

    def start(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path | None = None) -> Proc:
        """Start ``cmd`` in a session of its own, output to ``logs/<name>.log``."""
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "ab") as fh:
            popen = subprocess.Popen(cmd, env=dict(env), cwd=cwd or self.root, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    # --- the SuperLink ---------------------------------------------------------------

    def start_superlink(self, *, name: str = "superlink", timeout: float = 60.0) -> Proc:
        """Certificates (first time), then ``stamen superlink``; returns once it accepts connections."""
        if not self.certs.exists():
            self._run(["bash", str(TLS / "make-dev-ca.sh"), str(self.certs)], os.environ)
            self.cli_home.mkdir(parents=True, exist_ok=True)
            (self.cli_home / "config.toml").write_text(
                '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                f'address = "127.0.0.1:{self.control_port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
            )
        cmd = [str(BIN / "stamen"), "superlink", "--database", str(self.root / "superlink.db"),
               "--certificates", str(self.certs), "--port", str(self.port),
               "--control-port", str(self.control_port)]  # fmt: skip
        proc = self.start(name, cmd, self.env("superlink"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"the SuperLink exited {proc.popen.returncode}:\n{proc.tail()}")
            try:
                for port in (self.port, self.control_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc
            except OSError:
                time.sleep(0.3)
        ports = f"{self.port} and {self.control_port}"
        raise RuntimeError(f"the SuperLink did not listen on {ports} within {timeout:.0f}s:\n{proc.tail()}")

    # --- sites -----------------------------------------------------------------------

    def add_site(self, site_id: str, x: np.ndarray, y: np.ndarray, *, register: bool = True) -> Site:
        """A key pair, a data directory with one npz shard, a private state directory."""
        keys = self.root / "keys"
        self._run(["bash", str(TLS / "make-node-key.sh"), site_id, str(keys)], os.environ)
        site = Site(site_id, keys / f"{site_id}.key", self.root / "data" / site_id, self.root / "state" / site_id)
        site.data_dir.mkdir(parents=True)
        site.state_dir.mkdir(parents=True, mode=0o700)
        np.savez(site.data_file, x=x, y=y)
        if register:
            self._run(["bash", str(TLS / "register-node.sh"), str(site.key) + ".pub", "loopback", site_id],
                      self.cli_env())  # fmt: skip
        self.sites[site_id] = site
        return site

    def start_node(
        self,
        site_id: str,
        *,
        name: str | None = None,
        connect_timeout: float = 150.0,
        privacy: Sequence[str] = ("--set", "site-dp=false"),
    ) -> Proc:
        """``stamen node`` for a site (its FLWR_HOME is the site's own).

        ``privacy``: the node's own privacy options. A real node requires DP by default, so
        the default here, for non-DP runs, says ``site-dp=false`` explicitly; a DP run's
        sites pass their budget (``("--epsilon-budget", "8")``).
        """
        site = self.sites[site_id]
        cmd = [
            str(BIN / "stamen"), "node", "--site-id", site_id, "--superlink", f"127.0.0.1:{self.port}",
            "--state-dir", str(site.state_dir),
            *(["--data-dir", str(site.data_dir)] if self.watched else ["--data", f"npz:{site.data_file}"]),
            "--root-certificates", str(self.certs / "ca.crt"), "--auth-key", str(site.key),
            *(["--runtime-port", str(site.runtime_port)] if site.runtime_port is not None else []),
            "--executor", self.executor,
            "--connect-timeout", str(connect_timeout), "--torch-threads", str(self.torch_threads), *privacy,
        ]  # fmt: skip
        return self.start(name or site_id, cmd, self.env(site_id))

    def supernode_pid(self, proc: Proc) -> int | None:
        """The ``flower-supernode`` process under a ``stamen node``."""
        for pid in descendants(proc.popen.pid):
            try:
                cmdline = psutil.Process(pid).cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(Path(a).name == "flower-supernode" for a in cmdline[:2]):
                return pid
        return None

    def node_list(self) -> list[dict[str, object]]:
        """``flwr supernode ls --format json``: the SuperLink's view of the nodes."""
        out = self._run([str(BIN / "flwr"), "supernode", "ls", "loopback", "--format", "json"], self.cli_env())
        return list(json.loads(out[out.index("{") :]).get("nodes", []))

    # --- runs ------------------------------------------------------------------------

    def flwr_run(self, run_config: Mapping[str, object], *, name: str = "flwr-run", app: Path = ROOT) -> Proc:
        """``flwr run <app> loopback --stream`` with ``run_config`` (TOML values); the app is stamen by default."""
        pairs = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else _toml(v)}" for k, v in run_config.items())
        cmd = [str(BIN / "flwr"), "run", str(app), "loopback", "--stream", "--run-config", pairs]
        return self.start(name, cmd, self.cli_env(), cwd=ROOT)

    # --- teardown --------------------------------------------------------------------

    def stop(self, proc: Proc, sig: signal.Signals = signal.SIGTERM) -> str:
        """Stop ``proc``'s process group and its descendants' groups; say how it ended."""
        groups = {g for p in [proc.popen.pid, *descendants(proc.popen.pid)] if (g := _pgid(p)) is not None}
        pids = [proc.popen.pid, *descendants(proc.popen.pid)]
        how = "already gone"
        for s, wait in ((sig, STOP_GRACE), (signal.SIGKILL, 5.0)):
            live = [p for p in pids if _alive(p)]
            if not live:
                break
            how = s.name
            for g in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(g, s)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.1)
        proc.popen.poll()
        return how if not any(_alive(p) for p in pids) else f"still alive after {how}"

    def close(self) -> dict[str, str]:
        """Stop everything this federation started, all at once (one by one, ten nodes took minutes)."""
        procs = list(reversed(self.procs))
        with ThreadPoolExecutor(max_workers=max(len(procs), 1)) as pool:
            for proc, how in zip(procs, pool.map(self.stop, procs), strict=True):
                self.stopped[f"{proc.name}[{proc.popen.pid}]"] = how
        return self.stopped

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class NodeMemory(Periodic):
    """Peak PSS and RSS (bytes) of each ``stamen node``'s whole process tree, sampled in a thread.

    PSS counts a page shared by the node's processes (SuperNode, warm executor) once in all;
    RSS counts it in each, so it overstates a tree that shares pages.
    """

    nodes: Mapping[str, Proc]
    interval: float = 5.0
    peak_pss: dict[str, int] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)

    def sample(self) -> None:
        for site, proc in self.nodes.items():
            usage = [rollup(pid) for pid in tree(proc.popen.pid)]
            pss, rss = sum(u[0] for u in usage), sum(u[1] for u in usage)
            self.peak_pss[site] = max(self.peak_pss.get(site, 0), pss)
            self.peak_rss[site] = max(self.peak_rss.get(site, 0), rss)

    def table(self) -> str:
        """One line per site: peak PSS and RSS in MiB."""
        mib = 2.0**20
        return "\n".join(
            f"{s}: peak PSS {self.peak_pss.get(s, 0) / mib:.0f} MiB, RSS {self.peak_rss.get(s, 0) / mib:.0f} MiB"
            for s in self.nodes
        )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def digits_shards(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` IID shards of the digits training split (the split the server evaluates against)."""
    from stamen.common.datasets import load_dataset

    data = load_dataset("digits")
    order = np.random.default_rng(seed).permutation(len(data.y_train))
    return [(np.asarray(data.x_train[idx], np.float32), np.asarray(data.y_train[idx], np.int64))
            for idx in np.array_split(order, n)]  # fmt: skip


def read_progress(out_dir: Path) -> list[dict[str, object]]:
    """The rounds a running ServerApp has completed so far (its progress.jsonl)."""
    path = Path(out_dir) / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
