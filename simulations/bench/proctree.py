"""A child process tree: who is in it, how much memory it holds, and stopping all of it.

A Flower simulation is the stamen CLI, its engine child, and Ray's processes (GCS, raylet,
agents, one worker per actor). The tree is every descendant of the root, plus every
member of a session led by one of them (a process that daemonized under a tree member's
session still counts). Memory is PSS: summed RSS counts pages shared between Ray's
processes once per process. psutil reads it (``memory_full_info``, from ``smaps_rollup``
since psutil 5.9.1); a process is known by its pid and its creation time, so a recycled
pid is never taken for a member.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil

from stamen.simulations.bench.periodic import Periodic

GONE = (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError)


class Stat(NamedTuple):
    """What the tree needs of one live process."""

    ppid: int
    sid: int
    started: float  # creation time (seconds since the epoch): with the pid, the process's identity
    cpu: float  # user + system seconds


def _stat(proc: psutil.Process) -> Stat | None:
    """``proc``'s :class:`Stat`; None if it is gone or a zombie."""
    try:
        with proc.oneshot():
            if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return None
            times = proc.cpu_times()
            return Stat(proc.ppid(), os.getsid(proc.pid), proc.create_time(), times.user + times.system)
    except GONE:
        return None


def _all_stats() -> dict[int, Stat]:
    return {p.pid: st for p in psutil.process_iter() if (st := _stat(p)) is not None}


def _process(pid: int, started: float) -> tuple[psutil.Process, Stat] | None:
    """The live, non-zombie process ``pid`` and its :class:`Stat`, if it is still the one created at ``started``."""
    try:
        proc = psutil.Process(pid)
    except GONE:
        return None
    st = _stat(proc)
    return (proc, st) if st is not None and st.started == started else None


def tree(root: int) -> dict[int, float]:
    """pid -> creation time of ``root`` and every process that belongs to its tree."""
    stats = _all_stats()
    if root not in stats:
        return {}
    members = {root}
    sessions = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, sid, _, _) in stats.items():
            if pid not in members and (ppid in members or sid in sessions):
                members.add(pid)
                changed = True
            if pid in members and sid == pid and pid not in sessions:
                sessions.add(pid)
                changed = True
    return {pid: stats[pid].started for pid in members}


def rollup(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of ``pid`` in bytes; (0, 0) if it is gone."""
    try:
        mem = psutil.Process(pid).memory_full_info()
    except GONE:
        return 0, 0
    return mem.pss, mem.rss


def label(pid: int) -> str:
    """A short name for a tree member: Ray's process title, the ``-m`` module, or the program."""
    try:
        args = [a for a in psutil.Process(pid).cmdline() if a]
    except GONE:
        return "?"
    if not args:
        return "?"
    if args[0].startswith("ray::"):
        return args[0].split()[0]
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]
    script = next((a for a in args[1:3] if a.endswith(".py") or "/bin/" in a), args[0])
    return Path(script).name


@dataclass
class TreeWatch(Periodic):
    """Samples a tree in a thread: remembers every member seen and, if asked, peak memory.

    ``peak_breakdown`` is the PSS at the peak summed by process :func:`label`.
    :meth:`cpu_seconds` is the CPU time the tree has used so far, by every member seen.
    """

    root: int
    interval: float = 0.5
    memory: bool = False
    seen: dict[int, float] = field(default_factory=dict)
    peak_pss: int = 0
    peak_rss: int = 0
    peak_processes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    cpu: dict[tuple[int, float], float] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """CPU seconds used by the tree's members so far (a member's last sample once it is gone)."""
        for pid, started in tree(self.root).items():
            self._add_cpu(pid, started)
        return sum(self.cpu.values())

    def _add_cpu(self, pid: int, started: float) -> None:
        if (found := _process(pid, started)) is not None:
            key = (pid, started)
            self.cpu[key] = max(self.cpu.get(key, 0.0), found[1].cpu)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        stop_processes(self.seen)

    def sample(self) -> None:
        members = tree(self.root)
        self.seen.update(members)
        for pid, started in members.items():
            self._add_cpu(pid, started)
        self.peak_processes = max(self.peak_processes, len(members))
        if self.memory and members:
            per_process = {pid: rollup(pid) for pid in members}
            pss = sum(v[0] for v in per_process.values())
            self.peak_rss = max(self.peak_rss, sum(v[1] for v in per_process.values()))
            if pss > self.peak_pss:
                self.peak_pss = pss
                self.peak_breakdown = {}
                for pid, (value, _) in per_process.items():
                    name = label(pid)
                    self.peak_breakdown[name] = self.peak_breakdown.get(name, 0) + value


def _alive(pid: int, started: float) -> bool:
    return _process(pid, started) is not None


def stop_processes(procs: dict[int, float], grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL, the still-running processes of ``procs`` (pid -> creation time).

    Only processes seen in the tree are signalled, and only while their start time still
    matches (a recycled pid is someone else's). Returns how many had to be stopped.
    """
    left = {p: s for p, s in procs.items() if _alive(p, s)}
    count = len(left)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid, started in left.items():
            if (found := _process(pid, started)) is not None:
                with contextlib.suppress(*GONE):
                    found[0].send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in left.items()):
            time.sleep(0.1)
        left = {p: s for p, s in left.items() if _alive(p, s)}
        if not left:
            break
    return count
