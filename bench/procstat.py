"""What the proxies cost, read from /proc: CPU time, resident memory, open sockets.

Role: the only reader of /proc in the harness.  A proxy is measured as its process plus every
descendant (Envoy and ztunnel-fast are single processes today; the tree keeps the figures honest
if either ever forks helpers).  Threads are included: /proc/<pid>/stat of a process sums them.

Invariants: readers never raise for a process that vanished in between (it counts as 0); CPU time
is utime+stime in seconds (clock ticks / SC_CLK_TCK); RSS is VmRSS in bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after `comm` (which may hold spaces and parens): index 0 is state."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """`pid` and all its live descendants (one /proc scan)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1] = ppid
    out, todo = [], [pid]
    while todo and len(out) < 10_000:  # bounded: a process tree is never this large here
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the given processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11])  # stat field 14 (utime)
            system += int(fields[12])  # stat field 15 (stime)
    return user / CLK_TCK, system / CLK_TCK


def machine_times(text: str) -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs from a /proc/stat text: its first `cpu` line; idle is
    idle + iowait, total every field but guest time (already counted in user and nice)."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            ticks = [int(v) for v in line.split()[1:]]
            ticks += [0] * (8 - len(ticks))
            return ticks[3] + ticks[4], sum(ticks[:8])
    raise ValueError("no cpu line in /proc/stat")


def machine_cpu() -> tuple[int, int]:
    """(idle, total) clock ticks of the whole machine since boot."""
    return machine_times((PROC / "stat").read_text())


def idle_fraction(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time that was idle between two machine_cpu() samples."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    return sum(cpu_split(pids))


def parse_schedstat(text: str) -> tuple[int, int]:
    """(cpu ns, wait ns) from a /proc/.../schedstat text."""
    parts = text.split()
    return int(parts[0]), int(parts[1])


def main_thread_seconds(pid: int) -> float:
    """CPU time of a process's main thread (its first: the event loop of ztunnel-fast, Envoy's main
    thread), in seconds, from /proc/<pid>/task/<pid>/schedstat (ns); 0 for a process that is gone."""
    try:
        return parse_schedstat((PROC / str(pid) / "task" / str(pid) / "schedstat").read_text())[0] / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_bytes(pids: list[int]) -> int:
    """Sum of VmRSS of the given processes, in bytes."""
    total = 0
    for pid in pids:
        try:
            for line in (PROC / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024  # reported in kB
                    break
        except (OSError, ValueError, IndexError):
            pass
    return total


def socket_fds(pids: list[int]) -> int:
    """Number of open socket file descriptors of the given processes."""
    n = 0
    for pid in pids:
        fd_dir = PROC / str(pid) / "fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(fd_dir / name).startswith("socket:"):
                    n += 1
            except OSError:
                pass
    return n


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


class Proxies:
    """The proxy processes of one setup, by side ("client", "server"); empty for `direct`."""

    def __init__(self, pids: dict[str, int] | None = None):
        self.pids = dict(pids or {})

    def __bool__(self) -> bool:
        return bool(self.pids)

    def tree(self, side: str | None = None) -> list[int]:
        roots = [self.pids[side]] if side else list(self.pids.values())
        return [p for root in roots for p in descendants(root)]

    def cpu(self) -> float:
        return cpu_seconds(self.tree())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of both sides."""
        return cpu_split(self.tree())

    def main_thread_cpu(self) -> dict[str, float]:
        """Per side, the CPU seconds of the proxy process's main thread (the serial part: for
        ztunnel-fast its event loop, every worker thread excluded)."""
        return {side: main_thread_seconds(pid) for side, pid in self.pids.items()}

    def rss(self, side: str | None = None) -> int:
        return rss_bytes(self.tree(side))

    def rss_by_side(self) -> dict[str, int]:
        return {side: self.rss(side) for side in self.pids}

    def sockets_by_side(self) -> dict[str, int]:
        return {side: socket_fds(self.tree(side)) for side in self.pids}

    def dead(self) -> list[str]:
        return [side for side, pid in self.pids.items() if not alive(pid)]
