"""The ``stamen`` command line: simulate (and resume), lr-find, plot, versions, bench.

Bad input ends with one clear line naming the problem and exit code 2, never a
traceback. A simulation runs in a child process in its own process group, under a
timeout; whatever happens, the group (Ray's processes included) is stopped before the
command returns. A SIGTERM or Ctrl-C (or the timeout) first asks the run to stop after its
current round, with a checkpoint; ``--resume`` continues it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stamen.cli import deploy as deploy_cli
from stamen.cli.console import clean_errors, console, show_warnings
from stamen.cli.versions import versions_app
from stamen.common.config import StamenConfig, parse_assignment
from stamen.common.errors import StamenError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="stamen: federated continual learning on Flower.")
app.add_typer(versions_app, name="versions")


def preflight(cfg: StamenConfig, clients: int) -> None:
    """Load and partition the data now, so bad input fails before any engine starts."""
    from stamen.common.datasets import load_dataset
    from stamen.common.partition import partition_indices
    from stamen.common.runrecord import derive_seeds
    from stamen.common.scenario import scenario_of
    from stamen.server.evaluate import load_server_data

    if clients < 1:
        raise StamenError(f"--clients must be >= 1, got {clients}")
    data = load_dataset(str(cfg["dataset"]))
    scenario = scenario_of(cfg)
    if scenario is not None:
        scenario.check_against(data.num_classes, data.input_shape, clients)
    partition_indices(
        data.y_train,
        clients,
        str(cfg["partition"]),
        alpha=float(cfg["alpha"]),
        shards_per_partition=int(cfg["shards-per-site"]),
        min_partition_size=int(cfg["min-partition-size"]),
        seed=derive_seeds(int(cfg["seed"]))["partition"],
    )
    load_server_data(cfg)
    check_metrics_address(cfg)


def _preflight_child(mapping: dict[str, Any], clients: int) -> None:
    show_warnings()
    preflight(StamenConfig.from_mapping(mapping), clients)


def preflight_apart(cfg: StamenConfig, clients: int) -> None:
    """:func:`preflight` in a short-lived child process, its errors raised here.

    Loading and partitioning the data imports torch, pandas and flwr-datasets (about
    0.4 GiB resident); in a child, this process, which only waits on the run, stays small.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_preflight_child, cfg.as_dict(), clients).result()


def check_metrics_address(cfg: StamenConfig) -> None:
    """A metrics port that is taken fails here, in one line, rather than inside the engine."""
    port = int(cfg["metrics-port"])
    if not port:
        return
    host = str(cfg["metrics-host"])
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise StamenError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


def with_scenario_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` on top of its scenario's ``run-config``, the scenario given as a bundled name or an absolute path."""
    from stamen.common.scenario import BUNDLED_DIR, load_scenario, resolve_path

    spec = str(raw.get("scenario", "")).strip()
    if not spec:
        return raw
    scenario = load_scenario(spec)
    path = resolve_path(spec)
    return {**scenario.run_config, **raw, "scenario": path.stem if path.parent == BUNDLED_DIR else str(path)}


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


class _Signals:
    """SIGTERM/SIGINT received by the CLI while a simulation runs (counted, acted on by the loop)."""

    def __init__(self) -> None:
        self.count = 0
        self.last = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.count += 1
        self.last = signal.Signals(signum).name

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress_columns(rounds: int) -> list[Any]:
    counter = "[bold]round {task.completed}/{task.total}" if rounds else "[bold]round {task.completed} (until stopped)"
    return [TextColumn(counter), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]


def run_simulation_process(
    spec: dict[str, Any],
    out_dir: Path,
    timeout: float,
    *,
    show_progress: bool,
    stop_grace: float = 120.0,
    append_log: bool = False,
) -> int:
    """Run the engine child under ``timeout``; follow progress.jsonl; stop its group.

    A SIGTERM or SIGINT to this command is passed on (the timeout as a SIGTERM) to the
    engine process alone, so the ServerApp finishes its round and checkpoints while Ray's
    clients keep serving it; after ``stop_grace`` seconds, or at a second signal, the whole
    process group is stopped. Returns the child's exit code, 124 on timeout, or 128 + the
    signal when the child had to be killed.
    """
    spec_path = out_dir / "simulation.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = out_dir / "simulation.log"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    rounds = int(spec["run_config"]["num-server-rounds"])
    progress_file = out_dir / "progress.jsonl"
    with open(log_path, "ab" if append_log else "wb") as log_fh, _Signals() as signals:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stamen.simulations.engine", str(spec_path)],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        timed_out = False
        try:
            with Progress(
                *_progress_columns(rounds), console=console, disable=not show_progress, transient=False
            ) as bar:
                task = bar.add_task("starting Flower simulation engine…", total=rounds or None)
                deadline = time.monotonic() + timeout
                kill_at: float | None = None
                seen = 0
                while proc.poll() is None and signals.count < 2 and (kill_at is None or time.monotonic() < kill_at):
                    if kill_at is None and (signals.count or time.monotonic() >= deadline):
                        timed_out = not signals.count
                        why = signals.last or f"--timeout {timeout:.0f}s"
                        console.print(f"{why}: stopping after the current round (again to stop now)", highlight=False)
                        os.kill(proc.pid, signal.Signals[signals.last] if signals.last else signal.SIGTERM)
                        kill_at = time.monotonic() + stop_grace
                    time.sleep(0.25)
                    if progress_file.exists():
                        lines = progress_file.read_text().splitlines()
                        for line in lines[seen:]:
                            row = json.loads(line)
                            bar.update(
                                task,
                                completed=row["round"],
                                description=f"accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}",
                            )
                        seen = len(lines)
            if proc.poll() is None:
                console.print(
                    "[bold red]error:[/] the simulation did not stop in time; stopped it without a checkpoint"
                )
                return 124 if timed_out else 128 + int(signal.Signals[signals.last or "SIGTERM"])
            if timed_out:
                console.print(f"[bold red]error:[/] simulation exceeded --timeout {timeout:.0f}s; stopped")
                return 124
            return int(proc.returncode)
        finally:
            _stop_group(proc)


def run_simulate_command(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``stamen simulate ARGS --out OUT`` in a child process, exactly as a user runs it (benchmarks, tests)."""
    command = [sys.executable, "-m", "stamen", "simulate", *args, "--out", str(out), "--no-progress"]
    return subprocess.run(
        [*command, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )


def default_out_dir() -> Path:
    """``runs/<UTC timestamp>``."""
    return Path("runs", datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))


@app.command()
@clean_errors
def simulate(
    clients: Annotated[
        int | None, typer.Option(help="simulated sites (Flower virtual SuperNodes) [default: 10]")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="num-server-rounds")] = None,
    fraction: Annotated[float | None, typer.Option(help="fraction-train: share of sites per round")] = None,
    dataset: Annotated[str | None, typer.Option(help="digits | mnist5k | npz:PATH | csv:PATH | hf:NAME")] = None,
    partition: Annotated[str | None, typer.Option(help="iid | dirichlet | shards")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet alpha")] = None,
    model: Annotated[str | None, typer.Option(help="auto | logreg | mlp | cnn28 | cnn8 | pkg.mod:Class")] = None,
    strategy: Annotated[str | None, typer.Option(help="fedavg | fedavgm | fedadam | fedyogi")] = None,
    server_lr: Annotated[float | None, typer.Option(help="server learning rate")] = None,
    server_momentum: Annotated[float | None, typer.Option(help="FedAvgM beta")] = None,
    lr: Annotated[float | None, typer.Option(help="peak local learning rate")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="local epochs per round")] = None,
    batch_size: Annotated[int | None, typer.Option(help="local batch size")] = None,
    seed: Annotated[int | None, typer.Option(help="master seed")] = None,
    dp: Annotated[bool | None, typer.Option("--dp/--no-dp", help="DP-SGD on every site")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="0 = calibrate from --target-epsilon")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="per-sample clipping bound")] = None,
    target_epsilon: Annotated[float | None, typer.Option(help="epsilon to calibrate noise to")] = None,
    delta: Annotated[float | None, typer.Option(help="DP delta")] = None,
    privacy_horizon_rounds: Annotated[int | None, typer.Option(help="rounds the calibration covers")] = None,
    epsilon_budget: Annotated[float | None, typer.Option(help="per-site budget (0 = target)")] = None,
    accountant: Annotated[str | None, typer.Option(help="rdp | prv")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve Prometheus metrics on this port (0 = off)")] = None,
    scenario: Annotated[
        str | None, typer.Option(help="scenario: a bundled name (simulations/scenarios/) or a YAML file")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<timestamp>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any run-config key=value; repeatable")] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the simulation is stopped")] = 3600.0,
    cpus_per_client: Annotated[float, typer.Option(help="Ray CPUs per simulated client")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option(help="Ray GPUs per simulated client")] = 0.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    resume: Annotated[
        Path | None, typer.Option(help="continue this run directory from its newest valid checkpoint")
    ] = None,
    stop_grace: Annotated[
        float, typer.Option(help="seconds a stopped run gets to finish its round before it is killed")
    ] = 120.0,
) -> None:
    """Run a federation of CLIENTS simulated sites on this machine (Flower + Ray).

    SIGTERM or Ctrl-C stops the run after the current round, with a checkpoint; --resume
    continues it. --rounds 0 runs until stopped.
    """
    flags = {
        "num-server-rounds": rounds,
        "fraction-train": fraction,
        "dataset": dataset,
        "partition": partition,
        "alpha": alpha,
        "model": model,
        "strategy": strategy,
        "server-lr": server_lr,
        "server-momentum": server_momentum,
        "lr": lr,
        "local-epochs": local_epochs,
        "batch-size": batch_size,
        "seed": seed,
        "dp": dp,
        "noise-multiplier": noise_multiplier,
        "max-grad-norm": max_grad_norm,
        "target-epsilon": target_epsilon,
        "delta": delta,
        "privacy-horizon-rounds": privacy_horizon_rounds,
        "epsilon-budget": epsilon_budget,
        "accountant": accountant,
        "metrics-port": metrics_port,
    }
    raw: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    raw.update(parse_assignment(item) for item in set_ or [])
    if scenario is not None:
        raw["scenario"] = scenario
    if resume is not None:
        if out is not None and out.expanduser().resolve() != resume.expanduser().resolve():
            raise StamenError("--resume continues the run in its own directory; leave out --out")
        out_dir, cfg, clients = resumed_config(resume, raw, clients)
    else:
        out_dir = (out or default_out_dir()).expanduser().resolve()
        raw = with_scenario_defaults(raw)
        raw["out-dir"] = str(out_dir)
        cfg = StamenConfig.from_mapping(raw)
        clients = 10 if clients is None else clients
        preflight_apart(cfg, clients)
        if out_dir.exists() and any(out_dir.iterdir()):
            raise StamenError(f"run directory {out_dir} is not empty; choose another --out (or --resume it)")
        out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "run_config": cfg.as_dict(),
        "clients": clients,
        "cpus_per_client": cpus_per_client,
        "gpus_per_client": gpus_per_client,
        "num_cpus": os.cpu_count() or 1,
    }
    if cfg["metrics-port"]:
        from stamen.server.exporter import metrics_url

        typer.echo(f"stamen: metrics at {metrics_url(cfg)} while the simulation runs")
    started = time.monotonic()
    rc = run_simulation_process(
        spec, out_dir, timeout, show_progress=progress, stop_grace=stop_grace, append_log=resume is not None
    )
    wall = time.monotonic() - started
    summary_path = out_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        tail = (out_dir / "simulation.log").read_text(errors="replace").splitlines()[-25:]
        console.print("\n".join(tail), highlight=False, markup=False)
        console.print(f"[bold red]error:[/] simulation failed (exit {rc}); full log: {out_dir / 'simulation.log'}")
        if (out_dir / "checkpoints").is_dir():
            console.print(f"its checkpoints are kept; continue with: stamen simulate --resume {out_dir}")
        raise typer.Exit(1)
    from stamen.simulations.plots import plot_run

    summary = json.loads(summary_path.read_text())
    plot_run(summary, out_dir)
    final = summary["final"]
    privacy = summary.get("privacy")
    spent = f", epsilon max {privacy['epsilon_max']:.2f} (delta {privacy['delta']:g})" if privacy else ""
    if summary.get("tasks"):
        spent += f", mean forgetting {summary['tasks']['forgetting_mean']:.3f}"
    typer.echo(
        f"stamen: {summary['rounds_completed']} rounds, final accuracy {final['accuracy']:.4f} "
        f"(loss {final['loss']:.4f}, {final['source']}){spent}, model version {summary['version']}, "
        f"wall {wall:.1f}s -> {out_dir}"
    )
    if summary["status"] == "stopped":
        typer.echo(
            f"stamen: stopped after round {summary['rounds_completed']} ({summary['stop_reason']}); "
            f"continue with: stamen simulate --resume {out_dir}"
        )


def resumed_config(run_dir: Path, overrides: dict[str, Any], clients: int | None) -> tuple[Path, StamenConfig, int]:
    """The run directory, config and site count a resumed simulation continues with.

    The config is the newest valid checkpoint's, with ``overrides`` on top (only keys that
    do not change what the state means); the site count is the original run's.
    """
    from stamen.server.checkpoint import CheckpointStore, config_changes

    run_dir = run_dir.expanduser().resolve()
    spec_path = run_dir / "simulation.json"
    if not spec_path.exists():
        raise StamenError(f"{run_dir} is not a stamen simulate run directory (no simulation.json)")
    original = json.loads(spec_path.read_text())
    if clients is not None and clients != original["clients"]:
        raise StamenError(f"the run has {original['clients']} sites; --resume cannot change --clients")
    show_warnings()
    checkpoint = CheckpointStore(run_dir).load_latest()
    saved = checkpoint.state["config"]
    cfg = StamenConfig.from_mapping({**saved, **overrides, "out-dir": str(run_dir), "resume-from": str(run_dir)})
    config_changes(saved, cfg.as_dict())
    rounds = int(cfg["num-server-rounds"])
    if rounds and rounds <= checkpoint.round:
        raise StamenError(
            f"the run's checkpoint is at round {checkpoint.round} and num-server-rounds is {rounds}: "
            f"pass --rounds above {checkpoint.round} (the total), or --rounds 0 to run until stopped"
        )
    console.print(f"resuming {run_dir} after round {checkpoint.round} (model version {checkpoint.version})")
    return run_dir, cfg, int(original["clients"])


@app.command("lr-find")
@clean_errors
def lr_find(
    dataset: Annotated[str, typer.Option(help="dataset spec")] = "mnist5k",
    clients: Annotated[int, typer.Option(help="partitions the dataset is split into")] = 10,
    site: Annotated[int, typer.Option(help="which partition to test on")] = 0,
    steps: Annotated[int, typer.Option(help="steps of the range test")] = 100,
    set_: Annotated[list[str] | None, typer.Option("--set", help="run-config key=value; repeatable")] = None,
) -> None:
    """Learning-rate range test on one site's data; prints a suggested --lr."""
    from stamen.simulations.lr_find import lr_range_test

    raw: dict[str, Any] = {"dataset": dataset}
    raw.update(parse_assignment(item) for item in set_ or [])
    cfg = StamenConfig.from_mapping(raw)
    if not 0 <= site < clients:
        raise StamenError(f"--site must be in [0, {clients}), got {site}")
    result = lr_range_test(cfg, site=site, clients=clients, steps=steps)
    typer.echo(
        f"suggested lr: {result.suggested_lr:.3g} (loss fell fastest there; range {result.lrs[0]:.1e}"
        f"..{result.lrs[-1]:.1e} over {len(result.lrs)} steps)"
    )


@app.command()
@clean_errors
def plot(run_dir: Annotated[Path, typer.Argument(help="a run directory with summary.json")]) -> None:
    """Redraw a run's PNG plots from its summary.json."""
    from stamen.simulations.plots import plot_run

    path = run_dir / "summary.json"
    if not path.exists():
        raise StamenError(f"{path} does not exist")
    for png in plot_run(json.loads(path.read_text()), run_dir):
        typer.echo(png)


@app.command()
@clean_errors
def bench(
    scenarios: Annotated[list[str] | None, typer.Argument(help="scenarios to run (default: all)")] = None,
    out: Annotated[Path | None, typer.Option(help="results directory (default runs/bench-<timestamp>)")] = None,
    quick: Annotated[bool, typer.Option(help="every scenario at reduced size, a few minutes in all")] = False,
) -> None:
    """Benchmarks: stamen against the compute floor, plain Flower and its goals (DIR/bench.json)."""
    from stamen.simulations.bench.runner import run_bench

    out_dir = out or Path("runs", "bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    results = run_bench(scenarios or [], out_dir, quick=quick, echo=typer.echo)
    typer.echo(f"stamen bench: {len(results)} scenario(s) -> {out_dir / 'bench.json'}")
    if any("error" in r for r in results):
        raise typer.Exit(1)


app.command("node")(clean_errors(deploy_cli.node))
app.command("superlink")(clean_errors(deploy_cli.superlink))


def main() -> None:
    """Console-script entry point."""
    app()
