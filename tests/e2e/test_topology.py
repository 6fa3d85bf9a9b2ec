"""The namespace harness itself: connectivity, cleanup, and the REDIRECT helpers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from ztunnel_fast import netns
from ztunnel_fast.netns import Topology, echo_server_argv, send_recv_argv, wait_listening

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def _host_netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _host_veths() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def _json_line(proc: subprocess.Popen, timeout: float = 30) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_two_pods_exchange_bytes(topology: Topology) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    assert a.ip != b.ip and a.netns.startswith(topology.prefix)
    server = topology.popen(b, echo_server_argv(b.ip, 8080), stdout=subprocess.PIPE, text=True)
    wait_listening(b, 8080)
    client = json.loads(topology.run(a, send_recv_argv(b.ip, 8080, MIB)).stdout)
    served = _json_line(server)
    assert client["error"] is None and client["send_error"] is None
    assert client["received"] == MIB and client["received_sha256"] == client["sent_sha256"]
    assert served["received"] == MIB and served["sha256"] == client["sent_sha256"]
    assert served["peer"].split(":")[0] == a.ip  # no NAT on the segment


def test_teardown_leaves_nothing() -> None:
    veths_before = _host_veths()
    topo = Topology()
    try:
        pods = [topo.add_pod(n) for n in ("a", "b", "c")]
        sleeper = topo.popen(pods[0], ["sleep", "300"])
        netns.redirect_outbound(pods[0])
        ours = {n for n in _host_netns_names() if n.startswith(topo.prefix + "-")}
        assert ours == {f"{topo.prefix}-{n}" for n in ("a", "b", "c", "net")}
    finally:
        topo.teardown()
    topo.teardown()  # idempotent
    assert sleeper.returncode is not None
    assert not [n for n in _host_netns_names() if n.startswith(topo.prefix)]
    assert _host_veths() <= veths_before, "veth left on the host"
    assert not (netns.OWNER_DIR / f"{topo.prefix}-a").exists()


def test_cleanup_stale_spares_live_owner(topology: Topology) -> None:
    topology.add_pod("live")
    stale = f"{topology.prefix}-stale"
    subprocess.run(["ip", "netns", "add", stale], check=True)  # no owner file: looks crashed
    try:
        removed = netns.cleanup_stale(f"{topology.prefix}-*")
        assert removed == [stale]
        names = _host_netns_names()
        assert stale not in names and f"{topology.prefix}-live" in names
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


def test_sigterm_tears_down() -> None:
    """A process killed with SIGTERM removes its namespaces and still dies of SIGTERM."""
    script = textwrap.dedent("""
        import sys, time
        from ztunnel_fast.netns import Topology
        t = Topology()
        t.add_pod("a")
        t.popen(t.pods["a"], ["sleep", "300"])
        print(t.prefix, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    prefix = None
    try:
        prefix = proc.stdout.readline().strip()
        assert prefix.startswith("ztf-")
        assert f"{prefix}-a" in _host_netns_names()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert proc.returncode == -signal.SIGTERM
        assert not [n for n in _host_netns_names() if n.startswith(prefix)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if prefix:
            netns.cleanup_stale(prefix + "-*")


# One listener standing in for ztunnel's outbound port: for each accepted connection it reports the
# pre-NAT destination from SO_ORIGINAL_DST (SOL_IP, 80), a struct sockaddr_in.
_ORIG_DST_LISTENER = r"""
import json, socket, struct, sys
SO_ORIGINAL_DST = 80
port, count = int(sys.argv[1]), int(sys.argv[2])
srv = socket.create_server(("0.0.0.0", port))
srv.settimeout(20)
for _ in range(count):
    c, peer = srv.accept()
    raw = c.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    family, = struct.unpack_from("=H", raw, 0)  # sa_family_t, host order
    dport, = struct.unpack_from("!H", raw, 2)   # sin_port, network order
    dip = socket.inet_ntoa(raw[4:8])            # sin_addr
    print(json.dumps({"family": family, "orig_dst": "%s:%d" % (dip, dport), "peer": peer[0],
                      "local": "%s:%d" % c.getsockname()}), flush=True)
    c.close()
"""


def test_redirect_outbound_and_mark_bypass(topology: Topology) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    netns.redirect_outbound(a, port=15001, mark=1337)
    vip = "198.19.0.10"  # a service VIP: not on the segment, leaves via the default dev route
    listener = topology.popen(a, [sys.executable, "-c", _ORIG_DST_LISTENER, "15001", "2"],
                              stdout=subprocess.PIPE, text=True)
    wait_listening(a, 15001)

    # Unmarked: both a pod IP and a VIP land on pod A's 15001, original destination preserved.
    for dst in (b.ip, vip):
        # the listener closes right away; the client only needs the connect to succeed
        res = json.loads(topology.run(a, send_recv_argv(dst, 8080, 0, timeout=10)).stdout)
        assert res["error"] is None, res
    out, _ = listener.communicate(timeout=20)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["orig_dst"] for r in records] == [f"{b.ip}:8080", f"{vip}:8080"]
    assert all(r["family"] == 2 and r["local"].endswith(":15001") for r in records)  # AF_INET

    # Marked (SO_MARK 1337): bypasses the REDIRECT and reaches pod B itself.  Nothing listens on
    # 15001 any more, so a wrongly redirected connection would be refused.
    server = topology.popen(b, echo_server_argv(b.ip, 8080), stdout=subprocess.PIPE, text=True)
    wait_listening(b, 8080)
    res = json.loads(topology.run(a, send_recv_argv(b.ip, 8080, 4096, mark=1337)).stdout)
    assert res["error"] is None and res["received_sha256"] == res["sent_sha256"], res
    assert _json_line(server)["peer"].split(":")[0] == a.ip

    # and the unmarked one is refused now (REDIRECT to the closed 15001), proving the rule is live
    res = json.loads(topology.run(a, send_recv_argv(b.ip, 8080, 0, timeout=5)).stdout)
    assert res["error"] and "Refused" in res["error"], res


def test_redirect_inbound_plaintext(topology: Topology) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    netns.redirect_inbound_plaintext(b, port=15006)
    listener = topology.popen(b, [sys.executable, "-c", _ORIG_DST_LISTENER, "15006", "1"],
                              stdout=subprocess.PIPE, text=True)
    wait_listening(b, 15006)
    res = json.loads(topology.run(a, send_recv_argv(b.ip, 9090, 0, timeout=10)).stdout)
    assert res["error"] is None, res
    rec = json.loads(listener.communicate(timeout=20)[0].splitlines()[0])
    assert rec["orig_dst"] == f"{b.ip}:9090" and rec["peer"] == a.ip
    # 15008 (HBONE) is exempt: nothing listens there, so the connection is refused, not redirected
    res = json.loads(topology.run(a, send_recv_argv(b.ip, 15008, 0, timeout=5)).stdout)
    assert res["error"] and "Refused" in res["error"], res


def test_wait_listening_is_bounded(topology: Topology) -> None:
    a = topology.add_pod("a")
    with pytest.raises(TimeoutError, match=r"nothing listens on tcp port 1 .* after 0\.5s"):
        wait_listening(a, 1, timeout=0.5)  # returns (raises) instead of waiting on: the outcome is the bound
