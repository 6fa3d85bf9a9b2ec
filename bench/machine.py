"""What a result was measured on: machine, kernel, tool versions, source revision."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _first_line(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]) and not Path(argv[0]).exists():
        return None
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (cp.stdout.strip() or cp.stderr.strip()).splitlines()
    return out[0].strip() if out else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except (OSError, ValueError):
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def machine_info() -> dict:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "os": _os_name(),
        "mem_total_gib": _mem_total_gib(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],  # other work on the box skews figures
        "python": sys.version.split()[0],
    }


def versions(envoy: str | None) -> dict:
    import ztunnel_fast
    from ztunnel_fast.engine import native_available

    ok, why = native_available()
    git = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = None
    if git:
        cp = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=20)
        dirty = bool(cp.stdout.strip())
    return {
        "ztunnel_fast": ztunnel_fast.__version__,
        "ztunnel_fast_path": str(Path(ztunnel_fast.__file__).parent),
        "native_engine": "built" if ok else f"not built: {why}",
        "git_commit": git,
        "git_dirty": dirty,
        "envoy": _first_line([envoy, "--version"]) if envoy else None,
        "iperf3": _first_line(["iperf3", "--version"]),
        "wrk": _first_line(["wrk", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
    }
