"""Waypoints end to end, with a real Envoy as the waypoint (issue 12), on both engines.

  pod sleep (mesh):    client ──tcp <VIP or pod>:port──▶ REDIRECT ▶ ztunnel-fast 15001 ──┐
                                     HBONE: mTLS (server SAN = waypoint) + CONNECT <original dst>
  pod waypoint:        Envoy <wp>:15008 terminates ◀────────────────────────────────────┘
                       └▶ internal listener `connect_originate` ──┐
                                     HBONE: mTLS (server SAN = httpbin) + CONNECT <httpbin>:80
  pod httpbin (mesh):  echo app :80 ◀── ztunnel-fast inbound <httpbin>:15008 ◀┘

Both SAN checks are real: ztunnel-fast accepts only the waypoint's identity, Envoy accepts only
sleep as its client and only httpbin as its upstream, and httpbin's ztunnel-fast sees the
waypoint as the peer.  The sandwich test puts ztunnel-fast itself in front of a waypoint-like app
with `applicationTunnel: {protocol: PROXY}` and checks the PROXY v2 header the app receives.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.interop.envoy import hbone_waypoint, stat_total
from tests.interop.test_envoy_ztunnel import (
    APP_PORT,
    HBONE_PORT,
    IO_TIMEOUT,
    MIB,
    RUN_TIMEOUT,
    _assert_echoed,
    _certs,
    _echo_app,
    _envoy,
    _envoy_log,
    _send_recv,
    _served,
    _wait_line,
)
from ztunnel_fast.demo.lab import Lab
from ztunnel_fast.netns import wait_listening

pytestmark = pytest.mark.interop

VIP = "198.19.0.10"
SVC_PORT = 8000
SIZES = {"1MiB": MIB, "64MiB": 64 * MIB}
TUNNEL_PORT = 15088  # the sandwich app's PROXY-protocol port (Istio's waypoints use 15088 too)


def _mesh(lab: Lab, *, service_waypoint: bool, workload_waypoint: bool, sandwich: bool = False,
          policies: tuple = ()):
    a = lab.pod("sleep", namespace="default", service_account="sleep")
    wp = lab.pod("waypoint", namespace="default", service_account="waypoint")
    b = lab.pod("httpbin", namespace="default", service_account="httpbin")
    lab.service("httpbin", "default", VIP, {SVC_PORT: APP_PORT}, [b])
    config = lab.config()
    if service_waypoint:
        config["services"][0]["waypoint"] = {"address": f"/{wp.ip}"}
    for w in config["workloads"]:
        if w["name"] == "httpbin" and workload_waypoint:
            w["waypoint"] = {"hostname": {"namespace": "default", "hostname": "waypoint.default.svc.cluster.local"},
                             "hboneMtlsPort": HBONE_PORT}
        if w["name"] == "waypoint":
            w["services"] = {"default/waypoint.default.svc.cluster.local": {HBONE_PORT: HBONE_PORT}}
            if sandwich:
                w["applicationTunnel"] = {"protocol": "PROXY", "port": TUNNEL_PORT}
    config["services"].append({"name": "waypoint", "namespace": "default",
                               "hostname": "waypoint.default.svc.cluster.local", "vips": ["/198.19.0.50"],
                               "ports": {HBONE_PORT: HBONE_PORT}})
    config["policies"] = list(policies)
    lab.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return a, wp, b


def _envoy_waypoint(lab: Lab, a, wp, b):
    certs = _certs(lab, "waypoint", wp.identity)
    return _envoy(lab, wp, "waypoint", hbone_waypoint(
        (wp.ip, HBONE_PORT), (b.ip, HBONE_PORT), f"{b.ip}:{APP_PORT}", certs, certs.root,
        [a.identity], [b.identity]))


@pytest.mark.parametrize("size", list(SIZES), ids=list(SIZES))
def test_service_traffic_goes_through_the_envoy_waypoint(lab: Lab, size: str) -> None:
    nbytes = SIZES[size]
    a, wp, b = _mesh(lab, service_waypoint=True, workload_waypoint=False)
    app = _echo_app(lab, b)
    zb = lab.start_ztunnel(b, redirect=False)
    envoy = _envoy_waypoint(lab, a, wp, b)
    za = lab.start_ztunnel(a)
    res = _send_recv(lab, a, VIP, SVC_PORT, nbytes)
    served = _served(app)
    _assert_echoed(res, served, nbytes)
    line = f"proxy to {VIP}:{SVC_PORT} using HBONE via {wp.ip}:{HBONE_PORT} type ToServiceWaypoint"
    assert _wait_line(za, line), za.log()
    assert _wait_line(za, "outbound{", "complete dur="), za.log()
    # the destination's ztunnel-fast was reached by the waypoint, with the waypoint's identity
    assert _wait_line(zb, f"got CONNECT request to {b.ip}:{APP_PORT}", f"peer_id={wp.identity}"), zb.log()
    assert stat_total(lab.topology, wp.pod, envoy, "downstream_cx_upgrades_total") >= 1, _envoy_log(lab, "waypoint")
    assert stat_total(lab.topology, wp.pod, envoy, "cluster.hbone_peer.upstream_cx_total") >= 1
    # the access log names the waypoint as the destination workload, the service as dst.service
    access = _wait_line(za, "connection complete", "direction=outbound")
    assert access and f"dst.addr={wp.ip}:{HBONE_PORT}" in access[0] and f"dst.hbone_addr={VIP}:{SVC_PORT}" in access[0]
    assert "dst.service=httpbin.default.svc.cluster.local dst.workload=waypoint" in access[0], access
    assert f"dst.identity={wp.identity}" in access[0], access


def test_workload_traffic_goes_to_its_waypoint_found_by_hostname(lab: Lab) -> None:
    a, wp, b = _mesh(lab, service_waypoint=False, workload_waypoint=True)
    app = _echo_app(lab, b)
    zb = lab.start_ztunnel(b, redirect=False)
    envoy = _envoy_waypoint(lab, a, wp, b)
    za = lab.start_ztunnel(a)
    res = _send_recv(lab, a, b.ip, APP_PORT, MIB)
    _assert_echoed(res, _served(app), MIB)
    line = f"proxy to {b.ip}:{APP_PORT} using HBONE via {wp.ip}:{HBONE_PORT} type ToWorkloadWaypoint"
    assert _wait_line(za, line), za.log()
    # the operator's view from the client's ztunnel-fast: the WAYPOINT column is filled
    tables = {kind: lab.topology.run(a.pod, [sys.executable, "-m", "ztunnel_fast", "proxy-config", kind],
                                     timeout=30).stdout for kind in ("workloads", "services")}
    rows = {line.split()[0]: line.split() for line in tables["workloads"].splitlines()[1:]}
    assert rows["httpbin"][4] == "waypoint" and rows["sleep"][4] == "None", tables["workloads"]
    svc_rows = {line.split()[1]: line.split() for line in tables["services"].splitlines()[1:]}
    assert svc_rows["httpbin"][2:] == [VIP, "None", "1/1"], tables["services"]
    assert _wait_line(zb, f"got CONNECT request to {b.ip}:{APP_PORT}", f"peer_id={wp.identity}"), zb.log()
    assert stat_total(lab.topology, wp.pod, envoy, "downstream_cx_upgrades_total") >= 1


def test_waypoint_with_the_wrong_identity_is_refused(lab: Lab) -> None:
    """ztunnel-fast expects the waypoint workload's SAN: a waypoint presenting another identity
    (same CA) never gets a CONNECT, and the client connection fails instead of bypassing it."""
    a, wp, b = _mesh(lab, service_waypoint=True, workload_waypoint=False)
    app = _echo_app(lab, b)
    lab.start_ztunnel(b, redirect=False)
    certs = _certs(lab, "impostor", "spiffe://cluster.local/ns/default/sa/impostor")
    envoy = _envoy(lab, wp, "waypoint", hbone_waypoint(
        (wp.ip, HBONE_PORT), (b.ip, HBONE_PORT), f"{b.ip}:{APP_PORT}", certs, certs.root, [a.identity], [b.identity]))
    za = lab.start_ztunnel(a)
    res = _send_recv(lab, a, VIP, SVC_PORT, MIB, timeout=20)
    assert res["received"] == 0, res
    failed = _wait_line(za, "outbound{", "failed dur=")
    assert failed and wp.identity in failed[0] and "impostor" in failed[0], za.log()
    assert stat_total(lab.topology, wp.pod, envoy, "downstream_cx_upgrades_total") == 0
    assert app.poll() is None  # the app never saw a connection


PROXY_READER = textwrap.dedent("""\
    import hashlib, json, socket, struct, sys
    from proxyprotocol.v2 import ProxyProtocolV2
    host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    srv = socket.create_server((host, port))
    print("listening", flush=True)
    srv.settimeout(timeout)
    conn, peer = srv.accept()
    conn.settimeout(timeout)
    def exact(n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"EOF after {len(buf)} of {n} header bytes")
            buf += chunk
        return buf
    head = exact(16)
    header = head + exact(struct.unpack("!H", head[14:16])[0])
    result = ProxyProtocolV2().unpack(header)
    digest, received = hashlib.sha256(), 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        digest.update(data)
        received += len(data)
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    print(json.dumps({"source": f"{result.source[0]}:{result.source[1]}", "dest": f"{result.dest[0]}:{result.dest[1]}",
                      "tlv": {str(k): v.decode() for k, v in result.tlv.items()}, "peer": f"{peer[0]}:{peer[1]}",
                      "received": received, "sha256": digest.hexdigest(), "error": None}), flush=True)
    """)


def test_sandwich_delivers_a_proxy_v2_header_with_the_source_identity(lab: Lab) -> None:
    a, wp, b = _mesh(lab, service_waypoint=True, workload_waypoint=False, sandwich=True)
    script = lab.workdir / "proxy_reader.py"
    script.write_text(PROXY_READER)
    reader = lab.topology.popen(wp.pod, [sys.executable, str(script), wp.ip, str(TUNNEL_PORT), str(IO_TIMEOUT)],
                                stdout=subprocess.PIPE, text=True)
    wait_listening(wp.pod, TUNNEL_PORT)
    zw = lab.start_ztunnel(wp, redirect=False)
    za = lab.start_ztunnel(a)
    res = _send_recv(lab, a, VIP, SVC_PORT, MIB)
    out, _ = reader.communicate(timeout=60)
    got = json.loads(out.strip().splitlines()[-1])
    assert res["error"] is None and res["sent"] == MIB, res
    assert got["received"] == MIB and got["sha256"] == res["sent_sha256"], got
    assert res["received_sha256"] == res["sent_sha256"], res
    # the original addresses: the client pod (HBONE peer) and the service VIP it dialled
    assert got["source"].split(":")[0] == a.ip and got["dest"] == f"{VIP}:{SVC_PORT}", got
    assert got["tlv"] == {str(0xD0): a.identity}, got
    assert _wait_line(za, f"proxy to {VIP}:{SVC_PORT} using HBONE via {wp.ip}:{HBONE_PORT} type ToServiceWaypoint")
    assert _wait_line(zw, f"got CONNECT request to {VIP}:{SVC_PORT}", f"peer_id={a.identity}"), zw.log()


SHORT_CONNECTIONS = 500
SHORT_SIZE = 4096
SHORT_CONCURRENCY = 8


def test_short_connections_through_the_waypoint_share_pooled_hbone_connections(lab: Lab) -> None:
    """500 short hash-checked connections to the service: every one reaches the app through the
    waypoint, as a CONNECT stream on a few pooled HBONE connections (not one each)."""
    a, wp, b = _mesh(lab, service_waypoint=True, workload_waypoint=False)
    lab.app(b, "serve", str(APP_PORT), "echo", port=APP_PORT)
    lab.start_ztunnel(b, redirect=False)
    envoy = _envoy_waypoint(lab, a, wp, b)
    za = lab.start_ztunnel(a)
    out = lab.client(a, "echo", VIP, str(SVC_PORT), "--size", str(SHORT_SIZE), "--count", str(SHORT_CONNECTIONS),
                     "--concurrency", str(SHORT_CONCURRENCY), timeout=RUN_TIMEOUT)
    assert out["ok"] == SHORT_CONNECTIONS and out["failed"] == 0 and out["mismatched"] == 0, out
    streams = stat_total(lab.topology, wp.pod, envoy, "http.hbone_terminator.downstream_rq_total")
    conns = stat_total(lab.topology, wp.pod, envoy, "http.hbone_terminator.downstream_cx_total")
    assert streams == SHORT_CONNECTIONS, streams
    assert 1 <= conns < SHORT_CONNECTIONS // 10, conns  # pooled: at most a handful of HBONE connections
    assert len(za.lines("type ToServiceWaypoint")) == SHORT_CONNECTIONS


DENY_WAYPOINT = {"name": "deny-waypoint", "namespace": "default", "scope": "Namespace", "action": "Deny",
                 "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/waypoint"}]}]]]}


def test_l4_deny_of_the_waypoint_at_the_destination(lab: Lab) -> None:
    """An L4 policy at the destination denying the waypoint's identity: the destination's
    ztunnel-fast answers the waypoint's CONNECT with 401 and the app is never dialled."""
    a, wp, b = _mesh(lab, service_waypoint=True, workload_waypoint=False, policies=(DENY_WAYPOINT,))
    app = _echo_app(lab, b)
    zb = lab.start_ztunnel(b, redirect=False)
    envoy = _envoy_waypoint(lab, a, wp, b)
    za = lab.start_ztunnel(a)
    res = _send_recv(lab, a, VIP, SVC_PORT, MIB, timeout=20)
    assert res["received"] == 0, res
    refused = _wait_line(zb, "refused CONNECT with 401 Unauthorized", f"peer_id={wp.identity}")
    assert refused, zb.log()
    assert _wait_line(za, "type ToServiceWaypoint"), za.log()
    assert stat_total(lab.topology, wp.pod, envoy, "downstream_cx_upgrades_total") >= 1
    assert app.poll() is None  # never dialled


def test_missing_waypoint_refuses_the_connection_with_a_log_line(lab: Lab) -> None:
    """A service whose waypoint resolves to nothing: the client's connection is refused at once
    (not carried direct, which would bypass the waypoint's policy), with ztunnel's wording."""
    a, wp, b = _mesh(lab, service_waypoint=False, workload_waypoint=False)
    config = yaml.safe_load(lab.config_path.read_text())
    config["services"][0]["waypoint"] = {"hostname": {"namespace": "default", "hostname": "gone.default.svc.cluster.local"}}
    lab.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    app = _echo_app(lab, b)
    za = lab.start_ztunnel(a)
    res = _send_recv(lab, a, VIP, SVC_PORT, MIB, timeout=20)
    assert res["received"] == 0 and not (res["error"] and "timed out" in res["error"]), res
    failed = _wait_line(za, "outbound{", "failed dur=",
                        "err=unknown waypoint: default/gone.default.svc.cluster.local (no healthy upstream)")
    assert failed, za.log()
    assert not za.lines("proxy to")
    assert app.poll() is None
