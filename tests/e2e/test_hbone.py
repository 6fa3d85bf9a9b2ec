"""HBONE tunnels between two ztunnel-fast instances, end to end in network namespaces.

Topology: pods on one L2 segment; each mesh pod runs its own ztunnel-fast (dedicated mode) and
the client pod's outbound TCP is REDIRECTed to its ztunnel (reference 8.3).  Every test runs on
both engines (the `engine` fixture behind `lab`), and every payload is checked by sha256.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def two_pods(lab, *, server_mode="echo", client_log_level=None):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", server_mode, port=80)
    env = {"RUST_LOG": client_log_level} if client_log_level else {}
    za = lab.start_ztunnel(a, **env)
    zb = lab.start_ztunnel(b, redirect=False)
    return a, b, za, zb


def wait_for_line(path, needle, timeout=10.0):
    """The last line of `path` containing `needle`, polling until it shows up (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in path.read_text().splitlines() if needle in line]
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no line with {needle!r} in {path} after {timeout}s:\n{path.read_text()}")


def assert_echo(out, size):
    assert out.get("ok"), out
    assert out["received"] == size and out["received_sha256"] == out["sent_sha256"]


def test_small_payload_both_ways_and_guide_log_lines(lab):
    a, b, za, zb = two_pods(lab)
    out = lab.client(a, "echo", b.ip, "80", "--size", "1024")
    assert_echo(out, 1024)
    proxy = za.lines(f"proxy to {b.ip}:80 using HBONE via {b.ip}:15008 type Direct")
    assert len(proxy) == 1 and proxy[0].split()[2].startswith("outbound{id=")
    conn_id = proxy[0].split("outbound{id=")[1].split("}")[0]
    assert any(f"outbound{{id={conn_id}}}" in line for line in za.lines("complete dur="))
    got = zb.lines(f"got CONNECT request to {b.ip}:80")
    assert len(got) == 1
    # the two ztunnels' lines share the connection id (traceparent), and the peer is identified
    assert f"inbound{{id={conn_id} peer_ip={a.ip} peer_id=spiffe://cluster.local/ns/demo/sa/sleep}}" in got[0]


def test_256_mib_both_ways(lab):
    a, b, za, zb = two_pods(lab)
    out = lab.client(a, "echo", b.ip, "80", "--size", str(256 * MiB), timeout=600)
    assert_echo(out, 256 * MiB)


def test_1000_short_connections_100_at_a_time(lab):
    a, b, za, zb = two_pods(lab)
    out = lab.client(a, "echo", b.ip, "80", "--size", "2048", "--count", "1000", "--concurrency", "100", timeout=600)
    assert out["ok"] == 1000 and out["failed"] == 0, out
    assert len(za.lines("complete dur=")) == 1000
    assert len(zb.lines("got CONNECT request to")) == 1000


def test_half_close_client_first(lab):
    a, b, za, zb = two_pods(lab)
    out = lab.client(a, "echo", b.ip, "80", "--size", str(4 * MiB), "--half-close-first")
    assert_echo(out, 4 * MiB)


def test_half_close_server_first(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    server = lab.app(b, "serve", "80", "halfclose", "--size", str(3 * MiB), port=80)
    lab.start_ztunnel(a)
    lab.start_ztunnel(b, redirect=False)
    out = lab.client(a, "halfclose", b.ip, "80", "--size", str(2 * MiB))
    assert out["error"] is None, out
    assert out["received"] == 3 * MiB and out["received_sha256"] == out["expected_sha256"]
    # the server saw all of the client's bytes after its own FIN, then the client's FIN
    report = wait_for_line(lab.workdir / "app-httpbin.log", '"received"')
    assert json.loads(report) == {"received": 2 * MiB, "sha256": out["sent_sha256"]}
    assert server.poll() is None


def test_server_reset_reaches_the_client_as_reset(lab):
    a, b, za, zb = two_pods(lab, server_mode="reset")
    out = lab.client(a, "read", b.ip, "80")
    assert out["reset"] is True and out["received"] == 0, out
    assert za.lines("failed dur=")  # the outbound side reports the reset
    # the ztunnels are unharmed: a new tunnel still works
    lab.app(b, "serve", "81", "echo", port=81)
    assert_echo(lab.client(a, "echo", b.ip, "81", "--size", "1024"), 1024)


def test_service_vip_round_robin_over_two_endpoints(lab):
    a = lab.pod("sleep", namespace="demo")
    b1 = lab.pod("httpbin-1", namespace="demo", service_account="httpbin")
    b2 = lab.pod("httpbin-2", namespace="demo", service_account="httpbin")
    lab.service("httpbin", "demo", "198.19.0.10", {8000: 80}, [b1, b2])
    lab.write_config()
    for p in (b1, b2):
        lab.app(p, "serve", "80", "whoami", "--name", p.name, port=80)
        lab.start_ztunnel(p, redirect=False)
    za = lab.start_ztunnel(a)
    out = lab.client(a, "whoami", "198.19.0.10", "8000", "--count", "6")
    names = [n.split()[0] for n in out["names"]]
    assert names in (["httpbin-1", "httpbin-2"] * 3, ["httpbin-2", "httpbin-1"] * 3), names
    # service port 8000 was translated to target port 80, per endpoint
    assert len(za.lines(f"proxy to {b1.ip}:80 using HBONE")) == 3
    assert len(za.lines(f"proxy to {b2.ip}:80 using HBONE")) == 3


def test_passthrough_to_unknown_address_and_plain_tcp_to_non_mesh_workload(lab):
    a = lab.pod("sleep", namespace="demo")
    legacy = lab.pod("legacy", namespace="demo", mesh=False)
    outside = lab.pod("outside", workload=False)  # not in the config at all
    lab.write_config()
    lab.app(legacy, "serve", "80", "echo", port=80)
    lab.app(outside, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a)
    assert_echo(lab.client(a, "echo", outside.ip, "80", "--size", str(MiB)), MiB)
    assert za.lines(f"proxy to {outside.ip}:80 using TCP via {outside.ip}:80 type Passthrough")
    assert_echo(lab.client(a, "echo", legacy.ip, "80", "--size", str(MiB)), MiB)
    assert za.lines(f"proxy to {legacy.ip}:80 using TCP via {legacy.ip}:80 type Direct")


def test_client_refuses_server_with_wrong_identity(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    # B's ztunnel believes its workload runs as "imposter": it presents that identity.
    forged = yaml.safe_load(lab.config_path.read_text())
    for w in forged["workloads"]:
        if w["name"] == "httpbin":
            w["serviceAccount"] = "imposter"
    forged_path = lab.workdir / "forged.yaml"
    forged_path.write_text(yaml.safe_dump(forged))
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False, LOCAL_XDS_PATH=str(forged_path), PROXY_WORKLOAD_INFO="demo/httpbin/imposter")
    out = lab.client(a, "echo", b.ip, "80", "--size", "1024")
    assert not out.get("ok") and out.get("received", 0) == 0, out
    failed = za.lines("failed dur=")
    assert failed and "spiffe://cluster.local/ns/demo/sa/imposter" in failed[0], za.log()
    assert not zb.lines("got CONNECT request")


def test_pool_reuses_connections(lab):
    a, b, za, zb = two_pods(lab, client_log_level="info,ztunnel_fast::proxy::outbound=debug")
    out = lab.client(a, "echo", b.ip, "80", "--size", "512", "--count", "200", "--concurrency", "50")
    assert out["ok"] == 200, out
    assert len(za.lines("new HBONE connection to")) == 1, za.lines("new HBONE connection to")


def test_pool_opens_a_new_connection_when_one_is_full(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a, POOL_MAX_STREAMS_PER_CONNECTION="5", RUST_LOG="info,ztunnel_fast::proxy::outbound=debug")
    lab.start_ztunnel(b, redirect=False)
    # 20 long-ish transfers at once need at least 4 connections of 5 streams each
    out = lab.client(a, "echo", b.ip, "80", "--size", str(8 * MiB), "--count", "20", "--concurrency", "20")
    assert out["ok"] == 20, out
    created = len(za.lines("new HBONE connection to"))
    assert created >= math.ceil(20 / 5), created
    assert created < 20  # still pooled, not one connection per tunnel


def test_inbound_plaintext_from_non_mesh_client(lab):
    from ztunnel_fast import netns

    legacy = lab.pod("legacy", namespace="demo", mesh=False)  # no ztunnel: sends plain TCP
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    zb = lab.start_ztunnel(b, redirect=False)
    netns.redirect_inbound_plaintext(b.pod)
    assert_echo(lab.client(legacy, "echo", b.ip, "80", "--size", str(2 * MiB)), 2 * MiB)
    lines = zb.lines(f"proxying plaintext to {b.ip}:80")
    assert len(lines) == 1 and f"peer_ip={legacy.ip}" in lines[0]
    assert zb.lines("complete dur=")


def test_certificates_renew_at_half_life_without_disturbing_live_tunnels(lab):
    """SECRET_TTL=4s: certificates renew every ~2 s.  A paced transfer spanning several renewals
    completes intact, and after the first certificates expired new handshakes still succeed."""
    env = {"SECRET_TTL": "4s", "POOL_UNUSED_RELEASE_TIMEOUT": "1s", "RUST_LOG": "info,ztunnel_fast::identity=debug"}
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a, **env)
    zb = lab.start_ztunnel(b, redirect=False, **env)
    # ~32 MiB at 256 KiB per 50 ms: about 6.5 s in flight on one tunnel
    out = lab.client(a, "echo", b.ip, "80", "--size", str(32 * MiB), "--chunk-delay", "0.05", timeout=120)
    assert_echo(out, 32 * MiB)
    time.sleep(1.5)  # the pooled connection goes idle and is released: the next tunnel handshakes anew
    assert_echo(lab.client(a, "echo", b.ip, "80", "--size", "4096"), 4096)
    for zt in (za, zb):
        issued = zt.lines("certificate issued")
        assert len(issued) >= 3, zt.log()  # initial + renewals during the transfer
        serials = {line.split("serial=")[1].split()[0] for line in issued}
        assert len(serials) == len(issued)
