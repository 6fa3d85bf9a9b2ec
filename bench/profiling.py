"""py-spy flame graphs of the ztunnel-fast processes (`--profile`, `make bench PROFILE=1`).

py-spy attaches from the host to each proxy pid (client and server side) with `--native`, so the
compiled engine's C frames show up next to the Python ones, and writes one SVG flame graph per
process.  Sampling pauses the target ~100 times a second, so the profiled run is an extra
1-stream iperf3 run after the measured ones: the reported figures are never taken under py-spy.

Invariant: every py-spy started here is bounded by `--duration` and stopped (SIGINT, which makes
it write what it has, then SIGKILL) before `record` returns.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .procstat import Proxies


def py_spy_binary() -> str | None:
    cand = Path(sys.executable).parent / "py-spy"
    return str(cand) if cand.exists() else shutil.which("py-spy")


class Recorder:
    def __init__(self, proxies: Proxies, out_prefix: Path, seconds: float, rate: int = 100):
        self.binary = py_spy_binary()
        if self.binary is None:
            raise RuntimeError("py-spy not found (pip install '.[bench]')")
        self.seconds = seconds
        self.outputs: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        for side, pid in proxies.pids.items():
            out = Path(f"{out_prefix}-{side}.svg")
            log = out.with_suffix(".log")
            argv = [self.binary, "record", "--pid", str(pid), "--native", "--rate", str(rate),
                    "--duration", str(int(seconds) + 1), "--format", "flamegraph", "--output", str(out)]
            with open(log, "wb") as fh:
                self.procs[side] = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            self.outputs[side], self.logs[side] = out, log

    def finish(self) -> dict[str, str]:
        """Wait for every recorder (bounded), stop stragglers; returns {side: svg path or error}."""
        result = {}
        for side, proc in self.procs.items():
            try:
                proc.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            out = self.outputs[side]
            if out.exists() and out.stat().st_size > 0:
                result[side] = str(out)
                self.logs[side].unlink(missing_ok=True)
            else:
                tail = self.logs[side].read_text(errors="replace")[-500:] if self.logs[side].exists() else ""
                result[side] = f"error: py-spy wrote nothing (exit {proc.returncode}): {tail.strip()}"
        return result

    def abort(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
