"""`ztunnel-fast demo` runs start to finish and leaves nothing behind (both engines)."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_runs_and_cleans_up(engine):
    res = subprocess.run([sys.executable, "-m", "ztunnel_fast", "demo", "--engine", engine],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert out.count("<title>httpbin.org</title>") == 2  # before and through the mesh
    assert "using HBONE via" in out and "got CONNECT request to" in out
    assert f"engine={engine}" in out
    prefix = re.search(r"(ztf-demo-\d+)-\*", out).group(1)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in left
    assert "torn down" in out
