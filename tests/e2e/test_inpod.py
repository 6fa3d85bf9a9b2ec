"""In-pod mode end to end: istio-cni (the FakeCni double, real SOCK_SEQPACKET + SCM_RIGHTS) hands
pod network namespaces to a shared ztunnel-fast that runs in its node's namespace; it binds
15001/15006/15008 inside each pod and proxies from there.

Topology: every pod and both nodes are namespaces on one segment (no node routing is needed: in
in-pod mode the node's ztunnel-fast never sees pod traffic in its own namespace).  Each pod gets
istio-cni's in-pod rules (`redirect install --inpod`).  node1 runs `sleep` and `web`, node2 runs
`echo`.  Every test runs on both engines; payloads are checked by sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from ztunnel_fast.fakes.cni import FakeCni, install_inpod_rules
from ztunnel_fast.inpod import protocol

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
WAIT_S = 30.0  # bound of every poll (reconnects, drains)
HOLD_S = 12  # seconds a held connection stays idle: long enough to span the events under test
SLEEP_ID = "spiffe://cluster.local/ns/demo/sa/sleep"


def uid(p) -> str:
    return f"Kubernetes//Pod/{p.namespace}/{p.name}"


class Mesh:
    def __init__(self, lab, sockdir: Path):
        self.lab = lab
        self.sockdir = sockdir
        self.cni: dict[str, FakeCni] = {}
        self.zt = {}
        self.nodes = {}

    def socket_path(self, node: str) -> Path:
        return self.sockdir / node / "ztunnel.sock"

    def start_node(self, node: str, **env):
        host = self.lab.pod(f"zt-{node}", node=node, workload=False)
        self.nodes[node] = host
        self.cni[node] = FakeCni(self.socket_path(node))
        self.zt[node] = self.lab.start_ztunnel(host, redirect=False, shared=True, INPOD_ENABLED="true",
                                               INPOD_UDS=str(self.socket_path(node)), **env)
        self.cni[node].accept()
        return self.zt[node]

    def add(self, p, node: str | None = None) -> str:
        return self.cni[node or p.node].add(uid(p), p.pod.netns, p.name, p.namespace, p.service_account)

    def http(self, node: str, path: str) -> tuple[int, str]:
        port = 15021 if path.startswith("/healthz") else 15020 if path == "/metrics" else 15000
        return self.lab.http(self.nodes[node], f"http://127.0.0.1:{port}{path}")

    def metric(self, node: str, name: str) -> float:
        status, body = self.http(node, "/metrics")
        assert status == 200
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exported:\n{body}")

    def workload_state(self, node: str) -> dict:
        status, body = self.http(node, "/config_dump")
        assert status == 200
        return json.loads(body)["workloadState"]

    def wait(self, pred, what: str):
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def mesh(lab):
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    sockdir = Path(tempfile.mkdtemp(prefix="ztf-cni-"))
    m = Mesh(lab, sockdir)
    try:
        m.sleep = lab.pod("sleep", namespace="demo", node="node1")
        m.web = lab.pod("web", namespace="demo", node="node1")
        m.echo = lab.pod("echo", namespace="demo", node="node2")
        m.spare = lab.pod("spare", namespace="demo", node="node1")
        lab.write_config()
        for p in (m.sleep, m.web, m.echo, m.spare):
            install_inpod_rules(p.pod.netns)
        lab.app(m.web, "serve", "80", "echo", port=80)
        lab.app(m.echo, "serve", "80", "echo", port=80)
        lab.app(m.spare, "serve", "80", "echo", port=80)
        yield m
    finally:
        for cni in m.cni.values():
            cni.close()
        for zt in list(lab.ztunnels):
            lab.stop_ztunnel(zt)
        shutil.rmtree(sockdir, ignore_errors=True)
        assert not any(sockdir.parent.glob(sockdir.name)), "socket dir left behind"


def start_both(m: Mesh, **node1_env) -> None:
    m.start_node("node1", **node1_env)
    m.start_node("node2")
    assert m.http("node1", "/healthz/ready")[0] == 500  # no snapshot yet
    assert m.add(m.sleep) == "" and m.add(m.web) == ""
    assert m.cni["node1"].snapshot_sent() == ""
    assert m.add(m.echo) == "" and m.cni["node2"].snapshot_sent() == ""


def listening(lab, p, port: int) -> bool:
    out = lab.topology.run(p.pod, ["ss", "-Hltn", f"sport = :{port}"]).stdout
    return bool(out.strip())


def assert_echo(out, size, count=1):
    assert out.get("ok"), out
    assert out["received"] == size * count and out["received_sha256"] == out["sent_sha256"]


def test_pod_to_pod_over_hbone_from_inside_the_pods(lab, mesh):
    m = mesh
    start_both(m)
    assert m.http("node1", "/healthz/ready") == (200, "ready\n")
    for p in (m.sleep, m.web, m.echo):
        assert all(listening(lab, p, port) for port in (15001, 15006, 15008)), p.name
    assert not listening(lab, m.nodes["node1"], 15001)  # no node-level listeners in in-pod mode

    # other node: 64 MiB, hash-checked
    assert_echo(lab.client(m.sleep, "echo", m.echo.ip, "80", "--size", str(64 * MiB), timeout=600), 64 * MiB)
    z1, z2 = m.zt["node1"], m.zt["node2"]
    assert z1.lines(f"proxy to {m.echo.ip}:80 using HBONE via {m.echo.ip}:15008 type Direct")
    got = z2.lines(f"got CONNECT request to {m.echo.ip}:80")
    assert got and f"peer_ip={m.sleep.ip} peer_id={SLEEP_ID}" in got[0]
    # same node: 1000 short connections, still HBONE (pod to pod through both pods' listeners)
    out = lab.client(m.sleep, "echo", m.web.ip, "80", "--size", "2048", "--count", "1000", "--concurrency", "50",
                     timeout=600)
    assert out["ok"] == 1000 and out["failed"] == 0, out  # each connection's echo checked by sha256
    assert len(z1.lines(f"got CONNECT request to {m.web.ip}:80")) == 1000
    assert len(z1.lines(f"proxy to {m.web.ip}:80 using HBONE via {m.web.ip}:15008")) == 1000

    # plaintext from outside the mesh into web: captured by web's own 15006
    plain = lab.pod("plain", namespace="legacy", node="node3", workload=False)
    assert_echo(lab.client(plain, "echo", m.web.ip, "80", "--size", str(MiB)), MiB)
    assert z1.lines(f"proxying plaintext to {m.web.ip}:80")

    assert m.metric("node1", "workload_manager_active_proxy_count") == 2
    assert m.metric("node1", "workload_manager_pending_proxy_count") == 0
    assert m.metric("node1", "workload_manager_proxies_started_total") == 2
    state = m.workload_state("node1")
    assert set(state) == {uid(m.sleep), uid(m.web)}
    assert state[uid(m.web)]["state"] == "Up"
    assert state[uid(m.web)]["info"] == {"name": "web", "namespace": "demo", "serviceAccount": "web"}
    assert z1.lines(f"pod demo/web (uid {uid(m.web)}) proxy started in netns net:[")
    # SIGTERM: the one drain path, through every pod
    assert lab.stop_ztunnel(z1) == 0
    assert z1.lines("shutdown complete") and z1.lines(f"pod demo/web (uid {uid(m.web)}) proxy stopped")
    assert not listening(lab, m.web, 15008)


def test_delete_a_pod_while_another_pod_has_a_tunnel_open(lab, mesh):
    m = mesh
    start_both(m)
    held, held_out = lab.client_background(m.sleep, "hold", m.echo.ip, "80", "--seconds", str(HOLD_S))
    m.wait(lambda: '"established"' in held_out.read_text(), "the held connection")
    # a pod added and deleted live on the same node as the held connection's source
    assert m.add(m.spare) == ""
    assert_echo(lab.client(m.sleep, "echo", m.spare.ip, "80", "--size", str(MiB)), MiB)
    # the held connection as `istioctl ztunnel-config connections` sees it, on both sides
    out = m.workload_state("node1")[uid(m.sleep)]["connections"]["outbound"]
    assert [(c["originalDst"], c["actualDst"], c["protocol"]) for c in out] == [
        (f"{m.echo.ip}:80", f"{m.echo.ip}:15008", "HBONE")]
    assert out[0]["src"].startswith(f"{m.sleep.ip}:")
    inb = m.workload_state("node2")[uid(m.echo)]["connections"]["inbound"]
    assert [(c["src"], c["originalDst"], c["protocol"]) for c in inb] == [(m.sleep.ip, f"{m.echo.ip}:80", "HBONE")]
    assert m.cni["node1"].delete(uid(m.spare)) == ""
    m.wait(lambda: not listening(lab, m.spare, 15008), "spare's listeners to close")
    assert m.cni["node1"].delete(uid(m.spare)) == ""  # deleting twice is harmless
    assert held.poll() is None  # the delete happened while the other tunnel was open
    assert held.wait(60) == 0
    result = json.loads(held_out.read_text().splitlines()[-1])
    assert result["echo"] == "ping" and result["ended"] == "timeout", result  # never cut
    m.wait(lambda: m.metric("node1", "workload_manager_proxies_stopped_total") == 1, "stopped count")
    assert uid(m.spare) not in m.workload_state("node1")
    # the other pods still serve
    assert_echo(lab.client(m.sleep, "echo", m.web.ip, "80", "--size", str(MiB)), MiB)


def test_istio_cni_restart_keeps_pods_and_drops_the_stale_one(lab, mesh):
    m = mesh
    start_both(m)
    assert m.add(m.spare) == ""
    held, held_out = lab.client_background(m.sleep, "hold", m.echo.ip, "80", "--seconds", str(HOLD_S))
    m.wait(lambda: '"established"' in held_out.read_text(), "the held connection")
    z1 = m.zt["node1"]

    # istio-cni on node1 restarts: the socket file is recreated, ztunnel-fast reconnects
    m.cni["node1"].close()
    m.wait(lambda: m.http("node1", "/healthz/ready")[0] == 500, "not ready while istio-cni is away")
    assert "workload proxy manager" in m.http("node1", "/healthz/ready")[1]
    m.cni["node1"] = FakeCni(m.socket_path("node1"))
    m.cni["node1"].accept()
    assert m.add(m.sleep) == ""  # same netns: kept as it is
    assert m.cni["node1"].keep(uid(m.web)) == ""  # istio-cni could not open web's netns: keep it
    assert m.http("node1", "/healthz/ready")[0] == 500  # snapshot not complete yet
    assert m.cni["node1"].snapshot_sent() == ""  # spare was not named: drained
    m.wait(lambda: not listening(lab, m.spare, 15008), "the stale pod's listeners to close")
    assert m.http("node1", "/healthz/ready") == (200, "ready\n")
    assert m.cni["node1"].keep(uid(m.web)).startswith("KeepWorkload")  # only during a snapshot
    assert set(m.workload_state("node1")) == {uid(m.sleep), uid(m.web)}
    assert m.metric("node1", "workload_manager_proxies_started_total") == 3  # no restart of sleep/web
    assert z1.lines("disconnected from istio-cni")
    # its close is an EOF, not an empty request to NACK into a closed socket
    assert not z1.lines("without a known payload") and not z1.lines("Broken pipe")
    assert held.poll() is None  # the restart happened while the tunnel was open

    assert held.wait(60) == 0
    result = json.loads(held_out.read_text().splitlines()[-1])
    assert result["ended"] == "timeout", result  # the tunnel through sleep's proxy survived
    assert_echo(lab.client(m.sleep, "echo", m.web.ip, "80", "--size", str(MiB)), MiB)


def test_protocol_errors_are_nacked_and_the_process_keeps_serving(lab, mesh):
    m = mesh
    start_both(m)
    cni = m.cni["node1"]
    netns_fd = os.open(f"/var/run/netns/{m.spare.pod.netns}", os.O_RDONLY)
    uts_fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
    file_fd = os.open("/etc/hostname", os.O_RDONLY)
    add = protocol.add_request(uid(m.spare), protocol.WorkloadInfo("spare", "demo", "spare"))
    try:
        cases = {
            "add without fd": (add, [], "AddWorkload without a network namespace fd"),
            "fd with keep": (protocol.keep_request("x"), [netns_fd], "unexpected fd with a KeepWorkload"),
            "fd with del": (protocol.del_request("x"), [netns_fd], "unexpected fd with a DelWorkload"),
            "two fds": (add, [netns_fd, netns_fd], "expected at most one fd, received 2"),
            "too many fds": (add, [netns_fd] * 6, "control message truncated"),
            "truncated": (add + b"\x00" * 2000, [netns_fd], "message truncated"),
            "not a namespace": (add, [file_fd], f"AddWorkload {uid(m.spare)}: fd is not a namespace"),
            "not a network namespace": (add, [uts_fd], f"AddWorkload {uid(m.spare)}: fd is a namespace of type"),
            "malformed": (b"\x0a\xff\xff", [], "malformed WorkloadRequest"),
            "no payload": (b"\x22\x00", [], "WorkloadRequest without a known payload"),  # field 4: unused
        }
        for name, (data, fds, reason) in cases.items():
            error = cni.send_raw(data, fds, what=name)
            assert error.startswith(reason), (name, error)
        # a pod whose workload is unknown: NACKed, pending, retried; not ready meanwhile
        ghost = cni.send_raw(protocol.add_request("ghost-uid", protocol.WorkloadInfo("ghost", "demo", "ghost")),
                             [netns_fd], what="unknown workload")
        assert "pending: workload demo/ghost (service account ghost) not found on node node1" in ghost
        assert m.http("node1", "/healthz/ready")[0] == 500
        assert m.metric("node1", "workload_manager_pending_proxy_count") == 1
        assert m.workload_state("node1")["ghost-uid"]["state"] == "Pending"
        assert cni.delete("ghost-uid") == ""
        assert m.http("node1", "/healthz/ready") == (200, "ready\n")
    finally:
        for fd in (netns_fd, uts_fd, file_fd):
            os.close(fd)
    # the same connection still works: a valid add is served
    assert m.add(m.spare) == ""
    assert_echo(lab.client(m.sleep, "echo", m.spare.ip, "80", "--size", str(MiB)), MiB)
    assert m.zt["node1"].proc.poll() is None
    assert len(m.zt["node1"].lines("NACK to istio-cni")) == len(cases) + 1
    # no fd leaked: the ztunnel process holds exactly one fd per pod namespace it serves (3 pods)
    pid = m.zt["node1"].proc.pid
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    prefix = f"/run/netns/{lab.topology.prefix}-"
    assert sorted(link for link in links if link.startswith(prefix)) == sorted(
        f"/run/netns/{p.pod.netns}" for p in (m.sleep, m.web, m.spare))


def test_a_pod_unknown_to_the_state_stays_pending_until_its_workload_appears(lab, mesh):
    m = mesh
    late = lab.pod("late", namespace="demo", node="node1", workload=False)  # not in the config yet
    install_inpod_rules(late.pod.netns)
    lab.app(late, "serve", "80", "echo", port=80)
    start_both(m)
    error = m.add(late)
    assert error.startswith(f"pod {uid(late)} pending: workload demo/late (service account late) not found"), error
    assert m.http("node1", "/healthz/ready")[0] == 500
    assert m.workload_state("node1")[uid(late)]["state"] == "Pending"
    assert not listening(lab, late, 15008)
    # the workload shows up in the state (local config reload here; xDS the same way): retried
    lab.pods["late"] = late
    lab.write_config()
    m.wait(lambda: m.http("node1", "/healthz/ready")[0] == 200, "the pending pod to start")
    assert m.workload_state("node1")[uid(late)]["state"] == "Up"
    assert listening(lab, late, 15008)
    assert m.metric("node1", "workload_manager_pending_proxy_count") == 0
    assert_echo(lab.client(late, "echo", m.echo.ip, "80", "--size", str(MiB)), MiB)
    assert m.zt["node1"].lines(f"proxy to {m.echo.ip}:80 using HBONE via {m.echo.ip}:15008 type Direct")


def test_inpod_demo_journey(engine):
    import re
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ztunnel_fast", "demo", "--mode", "inpod", "--engine", engine],
                         capture_output=True, text=True, timeout=300)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for step in ("Before ambient", "Enable ambient", "After ambient", "ztunnel-fast logs", "workloadState",
                 "Remove a pod from the mesh", "istio-cni restarts"):
        assert f"## {step}" in out, step
    assert out.count("<title>httpbin.org</title>") == 3  # before, after, after the istio-cni restart
    assert re.search(r"proxy to 198\.18\.0\.\d+:80 using HBONE via 198\.18\.0\.\d+:15008 type Direct", out)
    assert '"protocol": "HBONE"' in out and "workload_manager_proxies_stopped_total 1.0" in out
    prefix = re.search(r"namespaces (ztf-demo-\d+)-\*", out).group(1)
    workdir = re.search(r"workdir (\S+),", out).group(1)
    assert f"torn down: no namespace, rule, socket or process of {prefix} left" in out
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not Path(workdir).exists()


def test_ztunnel_started_before_istio_cni_keeps_retrying(lab, mesh):
    m = mesh
    host = lab.pod("zt-node1", node="node1", workload=False)
    m.nodes["node1"] = host
    path = m.socket_path("node1")
    # INPOD_UDS alone selects in-pod mode; nobody listens there yet
    m.zt["node1"] = lab.start_ztunnel(host, redirect=False, shared=True, INPOD_UDS=str(path))
    assert "workload proxy manager" in m.http("node1", "/healthz/ready")[1]
    assert not path.exists()
    m.cni["node1"] = FakeCni(path)
    m.cni["node1"].accept()  # the retry loop finds it
    assert m.add(m.web) == "" and m.cni["node1"].snapshot_sent() == ""
    assert m.http("node1", "/healthz/ready") == (200, "ready\n")
    assert listening(lab, m.web, 15008)


def test_a_deleted_pod_lets_its_own_tunnels_finish(lab, mesh):
    m = mesh
    start_both(m, CONNECTION_TERMINATION_DEADLINE="60s")  # the bound is not what is tested here
    assert m.add(m.spare) == ""
    size = 8 * MiB  # paced: 32 chunks of 256 KiB, 0.2 s apart, so the delete lands mid-transfer
    proc, out_path = lab.client_background(m.sleep, "echo", m.spare.ip, "80", "--size", str(size),
                                           "--chunk-delay", "0.2")
    m.wait(lambda: m.zt["node1"].lines(f"got CONNECT request to {m.spare.ip}:80"), "the transfer to start")
    assert m.cni["node1"].delete(uid(m.spare)) == ""
    m.wait(lambda: not listening(lab, m.spare, 15008), "spare's listeners to close")
    assert proc.poll() is None  # the listeners closed while the tunnel was still moving bytes
    assert proc.wait(120) == 0
    assert_echo(json.loads(out_path.read_text().splitlines()[-1]), size)
    stopped = m.wait(lambda: m.zt["node1"].lines(f"pod demo/spare (uid {uid(m.spare)}) proxy stopped"), "the stop")
    assert len(stopped) == 1 and not m.zt["node1"].lines("drain deadline reached")


def test_a_pod_whose_ports_are_taken_is_nacked_and_others_keep_working(lab, mesh):
    m = mesh
    start_both(m)
    lab.app(m.spare, "serve", "15008", "echo", port=15008)  # an app squatting on the HBONE port
    error = m.add(m.spare)
    assert error.startswith(f"pod {uid(m.spare)} pending: cannot bind listeners in its network namespace"), error
    assert not listening(lab, m.spare, 15001)  # nothing half-bound is left behind
    assert m.metric("node1", "workload_manager_pending_proxy_count") == 1
    assert_echo(lab.client(m.sleep, "echo", m.web.ip, "80", "--size", str(MiB)), MiB)
    assert m.cni["node1"].delete(uid(m.spare)) == ""
    assert m.metric("node1", "workload_manager_pending_proxy_count") == 0


def test_upstream_sockets_are_created_inside_the_pod(lab, mesh):
    """Without source spoofing (ENABLE_ORIG_SRC=false) a socket's address tells where it was
    created: a pod's address only inside the pod's namespace, the node's address otherwise."""
    m = mesh
    start_both(m, ENABLE_ORIG_SRC="false")
    assert m.add(m.spare) == ""
    lab.app(m.spare, "serve", "81", "whoami", "--name", "spare", port=81)
    # outbound: sleep's HBONE connection to echo's 15008 comes from sleep's address
    assert_echo(lab.client(m.sleep, "echo", m.echo.ip, "80", "--size", str(MiB)), MiB)
    got = m.zt["node2"].lines(f"got CONNECT request to {m.echo.ip}:80")
    assert got and f"peer_ip={m.sleep.ip} " in got[-1]
    # inbound: spare's ztunnel-fast dials the app from inside spare (its own address), not the node
    name, peer = lab.client(m.echo, "whoami", m.spare.ip, "81", "--count", "1")["names"][0].split()
    assert (name, peer) == ("spare", m.spare.ip)
    assert m.nodes["node1"].ip != m.spare.ip
