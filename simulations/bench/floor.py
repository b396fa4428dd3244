"""The compute floor: a workload's local SGD steps in plain PyTorch, no federation at all.

Two ways, the faster one is the floor: one process using every core (torch's intra-op
threads), and one single-thread process per core, each doing its share of the
(round, site) trainings. Each worker is its own ``python -m stamen.simulations.bench.floor``
process: it imports torch, loads its sites and runs one warm-up step, says ``ready``,
waits for ``go`` and reports when done, so the clock covers the SGD steps only (stamen's
and Flower's figures exclude their start-up too). Aggregation is left out: averaging a
few small models costs well under a millisecond per round.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from stamen.common.errors import StamenError
from stamen.common.models import build_model
from stamen.simulations.bench.workload import Workload


@dataclass(frozen=True)
class Floor:
    """Seconds for all the workload's SGD steps, each way, and the floor (the faster)."""

    one_process_s: float | None  # None: stopped once it was 3x slower than the parallel way
    one_process_threads: int
    parallel_s: float
    parallel_processes: int
    parallel_cpu_s: float  # CPU seconds of all the single-thread workers together

    @property
    def seconds(self) -> float:
        return min(self.parallel_s, self.one_process_s or self.parallel_s)

    @property
    def best(self) -> str:
        if self.one_process_s is not None and self.one_process_s <= self.parallel_s:
            return f"1 process x {self.one_process_threads} threads"
        return f"{self.parallel_processes} processes x 1 thread"


def local_sgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload, seed: int) -> None:
    """Plain mini-batch SGD with momentum, a fresh optimizer as every round starts one."""
    opt = torch.optim.SGD(model.parameters(), lr=w.lr, momentum=w.momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(w.local_epochs):
        for idx in torch.randperm(len(y), generator=gen).split(w.batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def _worker(w: Workload, jobs: list[tuple[int, int]], threads: int) -> None:
    """One worker process: set up, report ready, wait for go, train every job, report done."""
    torch.set_num_threads(threads)
    sites = {cid: w.site(cid) for cid in sorted({cid for _, cid in jobs})}
    model = build_model(w.model, w.input_shape(), w.num_classes(), seed=w.seed)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = next(iter(sites.values()))
    local_sgd(model, x[: 2 * w.batch_size], y[: 2 * w.batch_size], w, seed=0)  # warm-up, untimed
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    t0, cpu0 = time.monotonic(), time.process_time()
    for rnd, cid in jobs:
        model.load_state_dict(initial)
        local_sgd(model, *sites[cid], w, seed=rnd * 100_003 + cid)
    print(json.dumps({"seconds": time.monotonic() - t0, "cpu_s": time.process_time() - cpu0}), flush=True)


def _run_workers(w: Workload, processes: int, threads: int, timeout: float) -> tuple[float, float] | None:
    """(wall seconds from ``go`` until the last of ``processes`` workers is done, their CPU
    seconds together); None past ``timeout``."""
    jobs = [(r, c) for r in range(w.rounds) for c in range(w.clients)]
    shares = [jobs[i::processes] for i in range(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stamen.simulations.bench.floor",
                json.dumps(w.as_dict()),
                json.dumps(share),
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for share in shares
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise StamenError(f"floor worker exited before it was ready (exit {p.wait()})")
        t0 = time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            try:
                p.wait(timeout=max(0.0, t0 + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                return None
        elapsed, cpu = time.monotonic() - t0, 0.0
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if p.returncode != 0 or not line:
                raise StamenError(f"floor worker failed (exit {p.returncode})")
            cpu += float(json.loads(line)["cpu_s"])
        return elapsed, cpu
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def measure_floor(w: Workload, cores: int | None = None, timeout: float = 1800) -> Floor:
    """Both ways of doing the workload's SGD steps without federation.

    The one-process way is stopped once it takes 3x the parallel way: it can no longer be
    the floor (on shared, oversubscribed cores its threads can spin for minutes).
    """
    cores = cores or os.cpu_count() or 1
    parallel = _run_workers(w, cores, 1, timeout)
    if parallel is None:
        raise StamenError(f"the plain-PyTorch floor took longer than {timeout:.0f}s")
    one = _run_workers(w, 1, cores, max(30.0, 3 * parallel[0]))
    return Floor(
        one_process_s=None if one is None else one[0],
        one_process_threads=cores,
        parallel_s=parallel[0],
        parallel_processes=cores,
        parallel_cpu_s=parallel[1],
    )


def seconds_per_epoch(w: Workload, num_examples: int) -> float:
    """Floor seconds of one site's local epoch on ``num_examples``, single thread, this process."""
    model = build_model(w.model, w.input_shape(), w.num_classes(), seed=w.seed)
    x, y = w.site(0)
    reps = max(1, math.ceil(num_examples / len(y)))
    x, y = x.repeat(reps, *([1] * (x.dim() - 1)))[:num_examples], y.repeat(reps)[:num_examples]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_sgd(model, x, y, w, seed=0)  # warm-up
        t0 = time.perf_counter()
        for i in range(5):
            local_sgd(model, x, y, w, seed=i + 1)
        return (time.perf_counter() - t0) / 5
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    _worker(Workload.from_dict(json.loads(sys.argv[1])), [tuple(j) for j in json.loads(sys.argv[2])], int(sys.argv[3]))
