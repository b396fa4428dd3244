"""The machine a benchmark ran on, and how busy it was (the figures mean little without it)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from stamen.common.runrecord import git_commit, package_versions
from stamen.simulations.bench.periodic import Periodic


def _cpu_model() -> str:
    """The CPU's model name: psutil does not report it, and ``platform.processor()`` is empty on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    return round(psutil.virtual_memory().total / 2**30, 1)


def _gpu() -> str | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (or None), package versions, the code's git commit."""
    versions = package_versions()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "gpu": _gpu(),
        "platform": platform.platform(),
        "python": versions.pop("python"),
        "torch": versions["torch"],
        "versions": versions,
        "git_commit": git_commit(Path(__file__).resolve().parents[2]),
    }


@dataclass
class LoadSampler(Periodic):
    """The 1-minute load average at start and end, and its mean over the run (every 5 s).

    The load counts the benchmark's own processes too: on a 2-core machine a load near 2
    means the benchmark had it to itself, well above 2 means it shared the cores.
    """

    interval: float = 5.0
    samples: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=lambda: list(os.getloadavg()))

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def report(self) -> dict[str, Any]:
        end = list(os.getloadavg())
        samples = self.samples or [end[0]]
        return {
            "start": [round(v, 2) for v in self.start],
            "end": [round(v, 2) for v in end],
            "mean_1m": round(sum(samples) / len(samples), 2),
            "max_1m": round(max(samples), 2),
        }
