"""The ``stamen`` command line: simulate, lr-find, plot.

Bad input ends with one clear line naming the problem and exit code 2, never a
traceback. A simulation runs in a child process in its own process group, under a
timeout; whatever happens, the group (Ray's processes included) is stopped before the
command returns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import StamenConfig, parse_assignment
from common.errors import StamenError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="stamen: federated continual learning on Flower.")
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def clean_errors(func: F) -> F:
    """Turn a StamenError into one red line and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StamenError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def preflight(cfg: StamenConfig, clients: int) -> None:
    """Load and partition the data now, so bad input fails before any engine starts."""
    from common.datasets import load_dataset
    from common.partition import partition_indices
    from common.runrecord import derive_seeds
    from common.scenario import scenario_of
    from server.evaluate import load_server_data

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


def with_scenario_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` on top of its scenario's ``run-config``, the scenario given as a bundled name or an absolute path."""
    from common.scenario import BUNDLED_DIR, load_scenario, resolve_path

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


def run_simulation_process(spec: dict[str, Any], out_dir: Path, timeout: float, *, show_progress: bool) -> int:
    """Run the engine child under ``timeout``; follow progress.jsonl; stop its group."""
    spec_path = out_dir / "simulation.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log_path = out_dir / "simulation.log"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    rounds = int(spec["run_config"]["num-server-rounds"])
    progress_file = out_dir / "progress.jsonl"
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulations.engine", str(spec_path)],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        try:
            with Progress(
                TextColumn("[bold]round {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                disable=not show_progress,
                transient=False,
            ) as bar:
                task = bar.add_task("starting Flower simulation engine…", total=rounds)
                deadline = time.monotonic() + timeout
                seen = 0
                while proc.poll() is None and time.monotonic() < deadline:
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
                console.print(f"[bold red]error:[/] simulation exceeded --timeout {timeout:.0f}s; stopped")
                return 124
            return int(proc.returncode)
        finally:
            _stop_group(proc)


def run_simulate_command(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``stamen simulate ARGS --out OUT`` in a child process, exactly as a user runs it (benchmarks, tests)."""
    command = [sys.executable, "-m", "simulations", "simulate", *args, "--out", str(out), "--no-progress"]
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
    clients: Annotated[int, typer.Option(help="simulated sites (Flower virtual SuperNodes)")] = 10,
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
    scenario: Annotated[
        str | None, typer.Option(help="scenario: a bundled name (simulations/scenarios/) or a YAML file")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<timestamp>)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any run-config key=value; repeatable")] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the simulation is stopped")] = 3600.0,
    cpus_per_client: Annotated[float, typer.Option(help="Ray CPUs per simulated client")] = 1.0,
    gpus_per_client: Annotated[float, typer.Option(help="Ray GPUs per simulated client")] = 0.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Run a federation of CLIENTS simulated sites on this machine (Flower + Ray)."""
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
    }
    raw: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    raw.update(parse_assignment(item) for item in set_ or [])
    if scenario is not None:
        raw["scenario"] = scenario
    raw = with_scenario_defaults(raw)
    out_dir = (out or default_out_dir()).expanduser().resolve()
    raw["out-dir"] = str(out_dir)
    cfg = StamenConfig.from_mapping(raw)
    preflight(cfg, clients)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StamenError(f"run directory {out_dir} is not empty; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "run_config": cfg.as_dict(),
        "clients": clients,
        "cpus_per_client": cpus_per_client,
        "gpus_per_client": gpus_per_client,
        "num_cpus": os.cpu_count() or 1,
    }
    started = time.monotonic()
    rc = run_simulation_process(spec, out_dir, timeout, show_progress=progress)
    wall = time.monotonic() - started
    summary_path = out_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        tail = (out_dir / "simulation.log").read_text(errors="replace").splitlines()[-25:]
        console.print("\n".join(tail), highlight=False, markup=False)
        console.print(f"[bold red]error:[/] simulation failed (exit {rc}); full log: {out_dir / 'simulation.log'}")
        raise typer.Exit(1)
    from simulations.plots import plot_convergence

    summary = json.loads(summary_path.read_text())
    plot_convergence(summary, out_dir / "convergence.png")
    final = summary["final"]
    privacy = summary.get("privacy")
    spent = f", epsilon max {privacy['epsilon_max']:.2f} (delta {privacy['delta']:g})" if privacy else ""
    if summary.get("continual"):
        spent += f", mean forgetting {summary['continual']['forgetting_mean']:.3f}"
    typer.echo(
        f"stamen: {summary['rounds_completed']} rounds, final accuracy {final['accuracy']:.4f} "
        f"(loss {final['loss']:.4f}, {final['source']}){spent}, wall {wall:.1f}s -> {out_dir}"
    )


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
    from simulations.lr_find import lr_range_test

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
    from simulations.plots import plot_convergence

    path = run_dir / "summary.json"
    if not path.exists():
        raise StamenError(f"{path} does not exist")
    typer.echo(plot_convergence(json.loads(path.read_text()), run_dir / "convergence.png"))


def main() -> None:
    """Console-script entry point."""
    app()
