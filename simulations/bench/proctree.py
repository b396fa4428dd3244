"""A child process tree: who is in it, how much memory it holds, and stopping all of it.

A Flower simulation is the stamen CLI, its engine child, and Ray's processes (GCS, raylet,
agents, one worker per actor). The tree is every descendant of the root, plus every
member of a session led by one of them (a process that daemonized under a tree member's
session still counts). Memory is PSS from ``/proc/PID/smaps_rollup``: summed RSS counts
pages shared between Ray's processes once per process. psutil is not a dependency and
its ``memory_full_info`` reads the slower full ``smaps``, so /proc is read directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from stamen.simulations.bench.periodic import Periodic

PROC = Path("/proc")


TICKS = os.sysconf("SC_CLK_TCK")


class Stat(NamedTuple):
    """The fields of ``/proc/PID/stat`` the tree needs (times in clock ticks)."""

    ppid: int
    sid: int
    started: int
    cpu: int  # user + system time


def _stat(pid: int) -> Stat | None:
    """``pid``'s :class:`Stat`; None if it is gone or a zombie."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return Stat(int(fields[1]), int(fields[3]), int(fields[19]), int(fields[11]) + int(fields[12]))


def _all_stats() -> dict[int, Stat]:
    out = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            out[int(entry.name)] = st
    return out


def tree(root: int) -> dict[int, int]:
    """pid -> start time of ``root`` and every process that belongs to its tree."""
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
    """(PSS, RSS) of ``pid`` in bytes from ``smaps_rollup``; (0, 0) if it is gone."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0, 0
    found = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            found[key] = int(rest.split()[0]) * 1024
    return found.get("Pss", 0), found.get("Rss", 0)


def label(pid: int) -> str:
    """A short name for a tree member: Ray's process title, the ``-m`` module, or the program."""
    try:
        args = [a for a in (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
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
    seen: dict[int, int] = field(default_factory=dict)
    peak_pss: int = 0
    peak_rss: int = 0
    peak_processes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    cpu: dict[tuple[int, int], int] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """CPU seconds used by the tree's members so far (a member's last sample once it is gone)."""
        for pid, started in tree(self.root).items():
            self._add_cpu(pid, started)
        return sum(self.cpu.values()) / TICKS

    def _add_cpu(self, pid: int, started: int) -> None:
        st = _stat(pid)
        if st is not None and st.started == started:
            key = (pid, started)
            self.cpu[key] = max(self.cpu.get(key, 0), st.cpu)

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


def _alive(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st.started == started


def stop_processes(procs: dict[int, int], grace: float = 10.0) -> int:
    """SIGTERM, then SIGKILL, the still-running processes of ``procs`` (pid -> start time).

    Only processes seen in the tree are signalled, and only while their start time still
    matches (a recycled pid is someone else's). Returns how many had to be stopped.
    """
    left = {p: s for p, s in procs.items() if _alive(p, s)}
    count = len(left)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid, started in left.items():
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in left.items()):
            time.sleep(0.1)
        left = {p: s for p, s in left.items() if _alive(p, s)}
        if not left:
            break
    return count
