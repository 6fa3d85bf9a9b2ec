"""`ztunnel-fast demo` replays the guide's journey start to finish and leaves nothing behind."""

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def demo(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ztunnel_fast", "demo", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_clean(out: str) -> None:
    prefix = re.search(r"namespaces (ztf-demo-\d+)-\*", out).group(1)
    assert f"torn down: no namespace, rule, ipset or process of {prefix} left" in out
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not list(Path("/etc/netns").glob(f"{prefix}-*")) if Path("/etc/netns").exists() else True
    procs = subprocess.run(["pgrep", "-af", "ztunnel_fast"], capture_output=True, text=True).stdout
    assert prefix not in procs
    workdir = Path(re.search(r"workdir (/\S+),", out).group(1))
    assert workdir.name.startswith("ztunnel-fast-demo-")
    assert not workdir.exists(), f"{workdir} (the demo CA's private key) left behind"


def test_demo_journey(engine):
    res = demo("--engine", engine)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"engine {engine})" in out
    for step in ("Before ambient", "Enable ambient", "After ambient", "ztunnel-fast logs", "proxy-config workloads",
                 "proxy-config secrets", "The ipset of captured pods", "The redirection chain", "Scale httpbin to 2"):
        assert f"## {step}" in out, step
    assert out.count("<title>httpbin.org</title>") == 2  # before and after ambient
    assert re.search(r"proxy to 198\.18\.\d+\.\d+:80 using HBONE via 198\.18\.\d+\.\d+:15008 type Direct", out)
    assert "got CONNECT request to" in out and "peer_id=spiffe://cluster.local/ns/ambient-demo/sa/sleep" in out
    assert "Name: ztunnel-pods-ips" in out and "Chain ztunnel-PREROUTING" in out
    assert re.search(r"sleep-69cfb4968f-mwglt\s+ambient-demo\s+198\.18\.1\.4\s+amb1-worker\s+None\s+HBONE", out)
    served = re.search(r"served by: (.*)", out).group(1).split(", ")
    assert len(served) == 10 and set(served) == {"httpbin-648cd984f8-2q9bn", "httpbin-648cd984f8-7dglb"}
    assert_logs_step_shows_only_its_own_connections(out)
    assert_clean(out)


def assert_logs_step_shows_only_its_own_connections(out: str) -> None:
    """The logs step follows the 'after' step's curl: none of that connection's lines leak into it."""
    logs = out.split("## ztunnel-fast logs", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in logs.splitlines() if "ztunnel_fast::proxy" in line]
    ids = {re.search(r"id=([0-9a-f]+)", line).group(1) for line in lines}
    assert len(ids) == 3, lines  # the step's three curls, each with its own trace id
    for i in ids:  # each connection appears whole: started, accepted, completed
        mine = [line for line in lines if f"id={i}" in line]
        assert any("proxy to" in line for line in mine) and any("got CONNECT request" in line for line in mine)
        assert any(": complete dur=" in line for line in mine), mine


def test_demo_single_step(engine):
    res = demo("--engine", engine, "--step", "ipset")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "## The ipset of captured pods" in res.stdout and "## Before ambient" not in res.stdout
    assert re.search(r"Members:\n\s+198\.18\.1\.\d+\n\s+198\.18\.1\.\d+", res.stdout)
    assert_clean(res.stdout)
    assert demo("--step", "nope").returncode == 2


def test_demo_sigterm_removes_everything(engine):
    """SIGTERM mid-journey: the namespaces, processes and the work directory (CA key) all go."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ztunnel_fast", "demo", "--engine", engine],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = ""
    try:
        deadline = time.monotonic() + 180
        while "## Before ambient" not in out and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                out += line
        assert "## Before ambient" in out, out
        workdir = Path(re.search(r"workdir (/\S+),", out).group(1))
        assert (workdir / "ca").is_dir()  # the CA (and its key) is there while the demo runs
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert_clean(out)
