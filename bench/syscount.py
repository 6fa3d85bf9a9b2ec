"""Syscalls of the proxy processes during one transfer, counted by name: `perf stat` on syscall
tracepoints when the kernel allows it, else `strace -c -f`.

  perf   `perf stat -x, -e raw_syscalls:sys_enter,syscalls:sys_enter_<name>,... -p <pids> -D -1
         --control fifo:ctl,ack` per side: events opened first (disabled), enabled through the
         control fifo once perf acknowledges, disabled again after the transfer.  In-kernel
         counters: the traced process is barely slowed.  The total is raw_syscalls:sys_enter
         (every syscall); per name only the listed ones (parse.SYSCALL_TYPES and
         SYSCALLS_NAMED_OTHER), so "other" = total - read - write - epoll.
  strace `strace -c -f -p <pid>` per side (every thread); stops every syscall twice, so the
         traced transfer is many times slower.  Every name is counted.

Role: the only place that starts tracers for syscall counts.  Invariants: the counts cover exactly
the window between `start()` returning and `stop()`; every tracer started here is stopped (SIGINT,
then SIGKILL after a bound) before `stop()` or `abort()` returns; nothing here times a figure (the
caller runs the counted transfer apart from the timed ones).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import parse
from .procstat import Proxies

TRACEPOINTS = Path("/sys/kernel/tracing/events/syscalls")
START_TIMEOUT = 60.0  # perf opens (threads x events) counters before it acknowledges
STOP_TIMEOUT = 30.0


def perf_binary() -> str | None:
    return shutil.which("perf")


def strace_binary() -> str | None:
    return shutil.which("strace")


def perf_events() -> list[str]:
    """The tracepoints to count: the total and every syscall named in parse, where the kernel has it."""
    names = [n for kind in parse.SYSCALL_TYPES.values() for n in kind] + list(parse.SYSCALLS_NAMED_OTHER)
    if TRACEPOINTS.is_dir():
        names = [n for n in names if (TRACEPOINTS / f"sys_enter_{n}").is_dir()]
    return [parse.PERF_TOTAL_EVENT] + [parse.PERF_SYSCALL_PREFIX + n for n in dict.fromkeys(names)]


def perf_works() -> tuple[bool, str]:
    """Can perf count syscall tracepoints here (root, tracefs, perf_event_paranoid)?"""
    perf = perf_binary()
    if perf is None:
        return False, "perf not installed"
    try:
        cp = subprocess.run([perf, "stat", "-x,", "-e", f"{parse.PERF_TOTAL_EVENT},syscalls:sys_enter_read",
                             "--", "true"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"perf stat failed: {exc}"
    try:
        counts = parse.parse_perf_stat_syscalls(cp.stderr)
    except parse.ParseError:
        return False, f"perf stat cannot count syscall tracepoints: {cp.stderr.strip()[-300:]}"
    return (counts[parse.TOTAL] > 0, "" if counts[parse.TOTAL] > 0 else "perf counted no syscall")


def choose_tool(prefer: str = "auto") -> str:
    """"perf" or "strace" (raises RuntimeError when neither can run)."""
    if prefer in ("auto", "perf"):
        ok, why = perf_works()
        if ok:
            return "perf"
        if prefer == "perf":
            raise RuntimeError(why)
    if strace_binary() is None:
        raise RuntimeError("neither perf (syscall tracepoints) nor strace can count syscalls here")
    return "strace"


class _Tracer:
    """One tracer process attached to one side's processes."""

    def __init__(self, tool: str, pids: list[int], out: Path):
        self.tool, self.out = tool, out
        self.ctl = self.ack = None
        self.log = out.with_suffix(".log")
        if tool == "perf":
            ctl_path, ack_path = out.with_suffix(".ctl"), out.with_suffix(".ack")
            for p in (ctl_path, ack_path):
                p.unlink(missing_ok=True)
                os.mkfifo(p)
            argv = [perf_binary(), "stat", "-x,", "--no-big-num", "-e", ",".join(perf_events()),
                    "-p", ",".join(map(str, pids)), "-D", "-1", "--control", f"fifo:{ctl_path},{ack_path}",
                    "-o", str(out)]
        else:
            argv = [strace_binary(), "-c", "-f", "-o", str(out)] + [a for pid in pids for a in ("-p", str(pid))]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if tool == "perf":
            # both ends opened with O_NONBLOCK where a blocking open would wait for perf forever
            self.ctl = _open_fifo(ctl_path, os.O_WRONLY, self.proc)
            self.ack = os.open(ack_path, os.O_RDONLY | os.O_NONBLOCK)

    def _command(self, word: str, timeout: float) -> None:
        os.write(self.ctl, (word + "\n").encode())
        deadline, buf = time.monotonic() + timeout, b""
        while b"ack" not in buf:
            if self.proc.poll() is not None:
                raise RuntimeError(f"perf stat exited ({self.proc.returncode}): {self._tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"perf stat did not acknowledge '{word}' in {timeout:.0f}s")
            try:
                buf += os.read(self.ack, 64)
            except BlockingIOError:
                time.sleep(0.05)

    def enable(self) -> None:
        if self.tool == "perf":
            self._command("enable", START_TIMEOUT)
        else:  # strace: wait until it reports every thread attached
            deadline = time.monotonic() + START_TIMEOUT
            while "attached" not in self._tail() and self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"strace exited ({self.proc.returncode}): {self._tail()}")
            time.sleep(0.5)  # threads are attached one by one after the first line

    def disable(self) -> None:
        if self.tool == "perf":
            self._command("disable", STOP_TIMEOUT)

    def stop(self) -> dict[str, int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise RuntimeError(f"{self.tool} did not stop on SIGINT in {STOP_TIMEOUT:.0f}s") from None
        finally:
            self._close()
        text = self.out.read_text(errors="replace") if self.out.exists() else ""
        if self.tool == "perf":
            return parse.parse_perf_stat_syscalls(text)
        return parse.parse_strace_c(text)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-500:] if self.log.exists() else ""

    def _close(self) -> None:
        for fd in (self.ctl, self.ack):
            if fd is not None:
                os.close(fd)
        self.ctl = self.ack = None

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close()


def _open_fifo(path: Path, flags: int, proc: subprocess.Popen) -> int:
    """Open the write end of a fifo once the reader (perf) has opened it (bounded)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            return os.open(path, flags | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"perf stat did not open its control fifo (exit {proc.poll()})") from None
            time.sleep(0.05)


class Counter:
    """`with Counter(proxies, tool, workdir) as c: <transfer>; counts = c.stop()` -> {side: counts}."""

    def __init__(self, proxies: Proxies, tool: str, workdir: Path):
        self.tracers: dict[str, _Tracer] = {}
        try:
            for side in proxies.pids:
                pids = proxies.tree(side)
                self.tracers[side] = _Tracer(tool, pids, Path(workdir) / f"syscalls-{side}.txt")
            for t in self.tracers.values():
                t.enable()
        except BaseException:
            self.abort()
            raise

    def stop(self) -> dict[str, dict[str, int]]:
        try:
            for t in self.tracers.values():
                t.disable()
            return {side: t.stop() for side, t in self.tracers.items()}
        finally:
            self.abort()

    def abort(self) -> None:
        for t in self.tracers.values():
            t.abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
