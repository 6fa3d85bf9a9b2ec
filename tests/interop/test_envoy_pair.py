"""Envoy on both ends of an HBONE tunnel: proves the bootstrap builders before ztunnel-fast uses them.

  pod sleep:   client ──tcp──▶ Envoy originator 127.0.0.1:15101 ──┐
                                                                  │ mTLS 1.3 + h2 CONNECT <httpbin>:8080
  pod httpbin: echo app <ip>:8080 ◀──tcp── Envoy terminator <ip>:15008 ◀┘
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.certs import HTTPBIN_ID, SLEEP_ID, CertAuthority, spiffe_id
from tests.interop.envoy import admin_get, hbone_originator, hbone_terminator, run_envoy, validate_config, write_config
from ztunnel_fast.netns import Topology, echo_server_argv, send_recv_argv, wait_listening

pytestmark = pytest.mark.interop

MIB = 1 << 20
APP_PORT = 8080
ORIGINATOR_PORT = 15101
OTHER_ID = spiffe_id("default", "other")


def _pair(topology: Topology, tmp: Path, *, allowed_client: str = SLEEP_ID, expected_server: str = HTTPBIN_ID):
    """Pods sleep/httpbin, echo app + terminator in httpbin, originator in sleep; returns handles."""
    ca = CertAuthority()
    sleep_certs = ca.write(tmp / "sleep", "sleep", SLEEP_ID)
    httpbin_certs = ca.write(tmp / "httpbin", "httpbin", HTTPBIN_ID)
    sleep, httpbin = topology.add_pod("sleep"), topology.add_pod("httpbin")

    app = topology.popen(httpbin, echo_server_argv(httpbin.ip, APP_PORT), stdout=subprocess.PIPE, text=True)
    wait_listening(httpbin, APP_PORT)

    term_cfg = write_config(tmp, "terminator", hbone_terminator(
        (httpbin.ip, 15008), (httpbin.ip, APP_PORT), httpbin_certs, httpbin_certs.root, [allowed_client]))
    orig_cfg = write_config(tmp, "originator", hbone_originator(
        ("127.0.0.1", ORIGINATOR_PORT), (httpbin.ip, 15008), f"{httpbin.ip}:{APP_PORT}",
        sleep_certs, sleep_certs.root, [expected_server]))
    for cfg in (term_cfg, orig_cfg):
        cp = validate_config(cfg)
        assert cp.returncode == 0, cp.stderr[-2000:]
    term = run_envoy(topology, httpbin, term_cfg, tmp / "terminator.log", log_level="debug")
    orig = run_envoy(topology, sleep, orig_cfg, tmp / "originator.log", log_level="debug")
    return sleep, httpbin, app, term, orig


def _stat(topology: Topology, pod, envoy, name_part: str) -> int:
    """Sum of counters whose name contains `name_part` (e.g. 'ssl.fail_verify_san')."""
    total = 0
    for line in admin_get(topology, pod, envoy.admin_address, "/stats?filter=" + name_part).splitlines():
        name, _, value = line.partition(": ")
        if name_part in name and value.strip().isdigit():
            total += int(value)
    return total


def test_envoy_pair_echo_1mib(topology: Topology, tmp_path: Path) -> None:
    sleep, httpbin, app, term, orig = _pair(topology, tmp_path)
    res = json.loads(topology.run(sleep, send_recv_argv("127.0.0.1", ORIGINATOR_PORT, MIB)).stdout)
    assert res["error"] is None and res["send_error"] is None, res
    assert res["received"] == MIB and res["received_sha256"] == res["sent_sha256"], res
    out, _ = app.communicate(timeout=30)
    served = json.loads(out.strip().splitlines()[-1])
    assert served["received"] == MIB and served["sha256"] == res["sent_sha256"]
    # the app is reached from inside the httpbin pod (terminator -> app), not from the sleep pod
    assert served["peer"].split(":")[0] == httpbin.ip
    # and it really went through mTLS + CONNECT
    assert _stat(topology, httpbin, term, "downstream_cx_upgrades_total") >= 1
    assert _stat(topology, sleep, orig, "cluster.hbone_peer.upstream_cx_total") >= 1


@pytest.mark.parametrize("reject", ["client_san", "server_san"])
def test_envoy_pair_san_mismatch_fails(topology: Topology, tmp_path: Path, reject: str) -> None:
    kw = {"allowed_client": OTHER_ID} if reject == "client_san" else {"expected_server": OTHER_ID}
    sleep, httpbin, app, term, orig = _pair(topology, tmp_path, **kw)
    res = json.loads(topology.run(sleep, send_recv_argv("127.0.0.1", ORIGINATOR_PORT, MIB, timeout=15)).stdout)
    # the originator accepts the TCP connection, fails the tunnel and closes: no echo comes back
    assert res["received"] == 0, res
    assert not (res["error"] and "timed out" in res["error"]), res
    # the failure is the SAN check on the side that was told to reject
    envoy, pod, stat = ((term, httpbin, "ssl.fail_verify_san") if reject == "client_san"
                        else (orig, sleep, "cluster.hbone_peer.ssl.fail_verify_san"))
    assert _stat(topology, pod, envoy, stat) >= 1
    assert app.poll() is None  # the app never saw a connection (stopped by teardown)
