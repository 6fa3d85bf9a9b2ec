"""Traffic redirection end to end: node mode (ipset + mangle TPROXY in the node's namespace, a
`shared` ztunnel-fast per node) and in-pod mode (istio-cni's rules in a pod, a `dedicated`
ztunnel-fast), driven through `python -m ztunnel_fast.redirect.cli ... --netns NODE`.

Topology for node mode: nodes are namespaces on the segment (198.18.0.x); pods sit behind their
node (veth, default route via the node): node-a's pods in 198.18.1.0/24, node-b's in
198.18.2.0/24.  Namespace `ambient-demo` is labelled ambient, `legacy` is not.  Everything lives
in the test's own namespaces and goes away with them; the host's iptables, ipsets and routes are
never touched.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ztunnel_fast import netns
from ztunnel_fast.demo.lab import LabPod
from ztunnel_fast.redirect import rules

pytestmark = pytest.mark.e2e

NODE_A, NODE_B, EXT = "198.18.0.10", "198.18.0.20", "198.18.0.30"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
WAIT_S = 10.0  # bound for every "until the watcher applied it" poll


# ----------------------------------------------------------------------------------- helpers


def cli(*args: str, netns_name: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`ztunnel-fast redirect ARGS [--netns NAME]` as a separate process (it enters the namespace)."""
    argv = [sys.executable, "-m", "ztunnel_fast.redirect.cli", *args] + (["--netns", netns_name] if netns_name else [])
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {cp.returncode}\n{cp.stdout}\n{cp.stderr}")
    return cp


def _ns(p):
    return getattr(p, "pod", p)  # a LabPod or a netns.Pod


def members(topo: netns.Topology, node) -> set[str]:
    out = topo.run(_ns(node), ["ipset", "save", "ztunnel-pods-ips"], check=False).stdout
    return {line.split()[2] for line in out.splitlines() if line.startswith("add ")}


def wait_members(topo, node, pred, what: str) -> set[str]:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = members(topo, node)
        if pred(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"ipset never {what}: {sorted(got)}")
        time.sleep(0.05)


def snapshot(topo: netns.Topology, ns) -> dict[str, str]:
    """What uninstall must restore: both iptables backends, ipsets, policy routing (counters and
    timestamps stripped: traffic changes them, not rules)."""
    def run(*argv):
        return topo.run(ns, list(argv), check=False).stdout

    def strip(save):
        save = re.sub(r"^#.*\n", "", save, flags=re.MULTILINE)
        return re.sub(r"\[\d+:\d+\]", "[-]", save)

    return {
        "iptables-legacy-save": strip(run("iptables-legacy-save")),
        "iptables-nft-save": strip(run("iptables-nft-save")),
        "ipset": re.sub(r"initval 0x[0-9a-f]+", "initval -", run("ipset", "save")),
        "ip rule": run("ip", "-4", "rule", "show"),
        "ip route": run("ip", "-4", "route", "show", "table", "all"),  # v6 autoconf changes on its own
    }


def drop_empty_tables(save: str) -> str:
    """iptables-legacy-save minus tables holding nothing but their default ACCEPT chains: the
    kernel creates a legacy table on first access and never removes it from a namespace."""
    blocks = re.findall(r"^\*\w+\n.*?^COMMIT\n", save, flags=re.DOTALL | re.MULTILINE)
    keep = [b for b in blocks if any(not re.match(r"^(\*\w+|:\w+ ACCEPT \[-\]|COMMIT)$", line)
                                    for line in b.splitlines())]
    return "".join(keep)


_SPOOF = r"""
import json, socket, sys
dst, port, src, mark, read = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
s = socket.socket()
s.setsockopt(socket.SOL_IP, 19, 1)          # IP_TRANSPARENT: bind the client's address
s.setsockopt(socket.SOL_SOCKET, 36, mark)   # SO_MARK: what ztunnel-fast's sockets carry
s.bind((src, 0))
s.settimeout(10)
out = {"connected": False, "line": None, "error": None}
try:
    s.connect((dst, port))
    out["connected"] = True
    if read:
        out["line"] = s.makefile().readline().strip()
except OSError as e:
    out["error"] = repr(e)
print(json.dumps(out))
"""


def spoofed_client(topo, node, dst: str, port: int, src: str, *, read: bool) -> dict:
    """A client in the node's namespace that dials like ztunnel-fast does with ENABLE_ORIG_SRC:
    from a pod's address (IP_TRANSPARENT) with the packet mark 1337."""
    cp = topo.run(_ns(node), [sys.executable, "-c", _SPOOF, dst, str(port), src, "1337", "1" if read else "0"])
    return json.loads(cp.stdout)


def whoami(lab, client, ip: str, port: int = 80) -> tuple[str, str]:
    """(server name, client address the server saw)."""
    name, peer = lab.client(client, "whoami", ip, str(port), "--count", "1")["names"][0].split()
    return name, peer


def count(z, needle: str) -> int:
    return len(z.lines(needle))


def add_node(lab, name: str, ip: str, pod_subnet: str) -> LabPod:
    """A node (not a workload: ztunnel-fast does not know its address)."""
    return lab.node(name, ip, pod_subnet)


def add_node_pod(lab, node: LabPod, name: str, ip: str, namespace: str, *, mesh: bool = True) -> LabPod:
    return lab.node_pod(node, name, ip, namespace=namespace, mesh=mesh)


def write_inventory(path: Path, pods: list[LabPod], labelled: dict[str, bool], **extra) -> Path:
    doc = {
        "excludeNamespaces": ["kube-system"],
        "namespaces": [{"name": ns, "labels": dict(AMBIENT) if on else {}} for ns, on in labelled.items()],
        "pods": [{"name": p.name, "namespace": p.namespace, "ip": p.ip, "node": p.node, **extra.get(p.name, {})}
                 for p in pods],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)  # atomic: the watcher never reads half a file
    return path


def install_node(lab, node: LabPod, inventory: Path) -> None:
    cli("install", netns_name=node.pod.netns)
    cli("sync", "--pods", str(inventory), "--node", node.node, netns_name=node.pod.netns)


# ------------------------------------------------------------------------------- node mode


def test_node_redirection_captures_exactly_the_intended_traffic(lab):
    a = add_node(lab, "node-a", NODE_A, "198.18.1.0/24")
    b = add_node(lab, "node-b", NODE_B, "198.18.2.0/24")
    sleep = add_node_pod(lab, a, "sleep", "198.18.1.2", "ambient-demo")
    web_a = add_node_pod(lab, a, "web-a", "198.18.1.3", "ambient-demo")
    legacy_a = add_node_pod(lab, a, "legacy-a", "198.18.1.4", "legacy", mesh=False)
    web_b = add_node_pod(lab, b, "web-b", "198.18.2.2", "ambient-demo")
    legacy_b = add_node_pod(lab, b, "legacy-b", "198.18.2.3", "legacy", mesh=False)
    lab.service("web", "ambient-demo", "198.19.0.10", {8000: 80}, [web_b])
    lab.write_config()
    for p in (web_a, web_b, legacy_a, legacy_b):
        lab.app(p, "serve", "80", "whoami", "--name", p.name, port=80)
    lab.app(web_b, "serve", "9000", "echo", port=9000)
    lab.app(a, "serve", "7000", "whoami", "--name", "node-a", port=7000)
    za = lab.start_ztunnel(a, shared=True, redirect=False, ENABLE_ORIG_SRC="true")
    zb = lab.start_ztunnel(b, shared=True, redirect=False, ENABLE_ORIG_SRC="true")
    inventory = write_inventory(lab.workdir / "pods.yaml", [sleep, web_a, legacy_a, web_b, legacy_b],
                                {"ambient-demo": True, "legacy": False})
    install_node(lab, a, inventory)
    install_node(lab, b, inventory)
    assert members(lab.topology, a) == {sleep.ip, web_a.ip}
    assert members(lab.topology, b) == {web_b.ip}

    # ambient pod -> ambient pod on another node: outbound 15001 on node-a, HBONE 15008 on node-b
    # the app on the other node sees the client pod's own address: node-a dials HBONE from it
    assert whoami(lab, sleep, web_b.ip) == ("web-b", sleep.ip)
    assert za.lines(f"proxy to {web_b.ip}:80 using HBONE via {web_b.ip}:15008 type Direct")
    assert any(f"peer_ip={sleep.ip} peer_id=spiffe://cluster.local/ns/ambient-demo/sa/sleep" in line
               for line in zb.lines(f"got CONNECT request to {web_b.ip}:80"))
    assert zb.lines(f"got CONNECT request to {web_b.ip}:80")
    out = lab.client(sleep, "echo", web_b.ip, "9000", "--size", str(1 << 20))
    assert out["ok"] and out["received_sha256"] == out["sent_sha256"], out

    # a service VIP exists only inside ztunnel-fast: reaching it proves the capture
    assert whoami(lab, sleep, "198.19.0.10", 8000) == ("web-b", sleep.ip)

    # ambient -> ambient on the same node: ztunnel-fast's HBONE to its own pod loops through lo
    assert whoami(lab, sleep, web_a.ip) == ("web-a", sleep.ip)
    assert za.lines(f"proxy to {web_a.ip}:80 using HBONE via {web_a.ip}:15008 type Direct")
    assert za.lines(f"got CONNECT request to {web_a.ip}:80")

    # ambient -> non-mesh pod: still captured (outbound), carried as plain TCP
    assert whoami(lab, sleep, legacy_b.ip)[0] == "legacy-b"
    assert za.lines(f"proxy to {legacy_b.ip}:80 using TCP via {legacy_b.ip}:80 type Direct")

    # non-ambient -> ambient pod (same node, other node): inbound 15006; the app sees the client
    # pod's own address (ENABLE_ORIG_SRC), and its replies find their way back to ztunnel-fast
    assert whoami(lab, legacy_a, web_a.ip) == ("web-a", legacy_a.ip)
    assert whoami(lab, legacy_b, web_a.ip) == ("web-a", legacy_b.ip)
    assert count(za, f"proxying plaintext to {web_a.ip}:80") == 2

    # inbound to an ambient pod on 15008 is ztunnel-fast's, whoever sends it (web-a has no 15008)
    raw = json.loads(lab.topology.run(legacy_b.pod, netns.send_recv_argv(web_a.ip, 15008, 0, timeout=10)).stdout)
    assert raw.get("local"), raw  # connected (to ztunnel-fast, which then drops the non-TLS peer)
    assert not lab.topology.run(web_a.pod, ["ss", "-ltnH", "sport = :15008"]).stdout.strip()

    # never captured: a non-ambient pod's own traffic, the node's own traffic, pods -> their node
    before = [len(z.log().splitlines()) for z in (za, zb)]
    assert whoami(lab, legacy_a, legacy_b.ip) == ("legacy-b", legacy_a.ip)
    assert whoami(lab, a, web_a.ip) == ("web-a", NODE_A)
    assert whoami(lab, a, legacy_b.ip) == ("legacy-b", NODE_A)
    assert whoami(lab, sleep, NODE_A, 7000) == ("node-a", sleep.ip)
    for z, n in zip((za, zb), before):
        new = z.log().splitlines()[n:]
        assert not [line for line in new if "outbound{" in line or "inbound" in line], new

    # what ztunnel-fast does with ENABLE_ORIG_SRC, checked on the raw return paths:
    # from a pod's address to another node: node-b captures it, its ztunnel-fast dials the app
    # with that address again, and both replies come back to the right transparent socket
    got = spoofed_client(lab.topology, a, web_b.ip, 80, sleep.ip, read=True)
    assert got["line"] == f"web-b {sleep.ip}", got
    # from a pod's address to our own pod's HBONE port: lands on our 15008, answered through lo
    got = spoofed_client(lab.topology, a, web_a.ip, 15008, sleep.ip, read=False)
    assert got["connected"], got

    # the guide's views
    st = cli("status", netns_name=a.pod.netns).stdout
    assert "Name: ztunnel-pods-ips" in st and "Type: hash:ip" in st and sleep.ip in st and web_a.ip in st
    assert "Chain ztunnel-PREROUTING (1 references)" in st
    assert "match-set ztunnel-pods-ips src ADDRTYPE match dst-type !LOCAL TPROXY redirect 0.0.0.0:15001" in st


def test_labelling_a_namespace_starts_and_stops_capture_live(lab, tmp_path):
    a = add_node(lab, "node-a", NODE_A, "198.18.1.0/24")
    ext = LabPod(lab.topology.add_pod("ext", EXT), "ext", "outside", "ext", False, "none")  # off-mesh host
    sleep = add_node_pod(lab, a, "sleep", "198.18.1.2", "demo")
    other = add_node_pod(lab, a, "other", "198.18.1.3", "mesh")  # ambient all along
    plain = add_node_pod(lab, a, "plain", "198.18.1.4", "legacy", mesh=False)
    lab.write_config()
    lab.app(ext, "serve", "80", "whoami", "--name", "ext", port=80)
    lab.app(ext, "serve", "9000", "echo", port=9000)
    sleep_app = lab.app(sleep, "serve", "80", "whoami", "--name", "sleep", port=80)
    za = lab.start_ztunnel(a, shared=True, redirect=False, ENABLE_ORIG_SRC="true")
    pods = [sleep, other, plain]
    inventory = write_inventory(tmp_path / "pods.yaml", pods, {"demo": False, "mesh": True, "legacy": False})
    cli("install", netns_name=a.pod.netns)
    with open(tmp_path / "watch.log", "wb") as log:
        watcher = lab.topology.popen(
            a.pod, [sys.executable, "-m", "ztunnel_fast.redirect.cli", "sync", "--pods", str(inventory),
                    "--node", "node-a", "--watch", "--interval", "0.1"],
            stdout=log, stderr=subprocess.STDOUT)
    wait_members(lab.topology, a, lambda m: m == {other.ip}, "held only the ambient pod")

    def captured_out(p) -> bool:
        n = count(za, f"proxy to {EXT}:80 using TCP via {EXT}:80 type Passthrough")
        name, peer = whoami(lab, p, EXT)
        assert name == "ext"
        now = count(za, f"proxy to {EXT}:80 using TCP via {EXT}:80 type Passthrough")
        assert peer == (NODE_A if now > n else p.ip)  # passthrough leaves from the node
        return now > n

    assert not captured_out(sleep) and captured_out(other) and not captured_out(plain)

    # connections in flight while pods come and go, the rules are re-installed, and the set changes:
    # one captured (other), one not captured yet (sleep), one never captured (plain)
    size = 3 << 20
    flows = [lab.client_background(p, "echo", EXT, "9000", "--size", str(size), "--chunk-delay", "0.2")
             for p in (other, sleep, plain)]
    time.sleep(0.5)

    # label the namespace: the watcher adds sleep's address, nothing restarts
    write_inventory(inventory, pods, {"demo": True, "mesh": True, "legacy": False})
    wait_members(lab.topology, a, lambda m: m == {sleep.ip, other.ip}, "gained sleep")
    cli("install", netns_name=a.pod.netns)  # idempotent: same rules, members kept
    cli("add-pod", "198.18.1.99", netns_name=a.pod.netns)
    cli("del-pod", "198.18.1.99", netns_name=a.pod.netns)
    for proc, out_path in flows:
        proc.wait(timeout=120)
        res = json.loads(out_path.read_text().strip().splitlines()[-1])
        assert res["ok"] and res["received"] == size, (out_path.name, res)
    assert captured_out(sleep)
    inbound = count(za, f"proxying plaintext to {sleep.ip}:80")
    assert whoami(lab, ext, sleep.ip) == ("sleep", EXT)  # inbound to it is captured now too
    assert count(za, f"proxying plaintext to {sleep.ip}:80") == inbound + 1
    assert sleep_app.poll() is None  # the pod's app never restarted

    # unlabel: capture stops for new connections; a captured one in flight finishes intact
    flow = lab.client_background(sleep, "echo", EXT, "9000", "--size", str(size), "--chunk-delay", "0.2")
    time.sleep(0.5)
    write_inventory(inventory, pods, {"demo": False, "mesh": True, "legacy": False})
    wait_members(lab.topology, a, lambda m: m == {other.ip}, "lost sleep")
    flow[0].wait(timeout=120)
    res = json.loads(flow[1].read_text().strip().splitlines()[-1])
    assert res["ok"] and res["received"] == size, res
    assert not captured_out(sleep) and captured_out(other)

    # pod-level opt-out and a bad file: the set follows the annotation, a typo changes nothing
    write_inventory(inventory, pods, {"demo": True, "mesh": True, "legacy": False},
                    other={"annotations": {"ambient.istio.io/redirection": "disabled"}})
    wait_members(lab.topology, a, lambda m: m == {sleep.ip}, "followed the annotation")
    inventory.write_text("pods: [{name: x, namespace: demo, node: node-a, ip: 198.18.1.300}]\n")
    deadline = time.monotonic() + WAIT_S
    while "invalid IP address" not in (tmp_path / "watch.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "pods[0].ip: invalid IP address '198.18.1.300' (ipset left unchanged)" in (tmp_path / "watch.log").read_text()
    assert members(lab.topology, a) == {sleep.ip}
    assert watcher.poll() is None


def test_uninstall_restores_the_node_exactly(topology):
    """Install twice (idempotent), then uninstall: both iptables backends, the ipsets and the
    policy routing inside the node's namespace are exactly as before; other software's rules,
    sets and routes around ours are untouched, and our hooks run before theirs."""
    node = topology.add_node("node", NODE_A, "198.18.1.0/24")
    ipt = lambda *a: netns.iptables(node, *a)
    # what a real node has already: kube-proxy style rules, another ipset, another ip rule
    topology.run(node, ["ipset", "create", "kube-test", "hash:ip"])
    topology.run(node, ["ipset", "add", "kube-test", "198.18.0.99"])
    ipt("-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "MARK", "--set-mark", "0x4000")
    ipt("-t", "mangle", "-A", "OUTPUT", "-m", "set", "--match-set", "kube-test", "dst", "-j", "RETURN")
    ipt("-t", "nat", "-A", "PREROUTING", "-d", "198.19.9.9/32", "-p", "tcp", "-j", "DNAT",
        "--to-destination", "198.18.0.99:80")
    ipt("-A", "FORWARD", "-s", "198.18.0.99/32", "-j", "ACCEPT")
    topology.run(node, ["ip", "rule", "add", "fwmark", "0x4000", "lookup", "200", "pref", "1000"])
    before = snapshot(topology, node)

    cli("install", netns_name=node.netns)
    first = snapshot(topology, node)
    assert cli("install", netns_name=node.netns).stdout.splitlines() == ["redirection installed (node mode)"]
    assert snapshot(topology, node) == first  # idempotent
    cli("add-pod", "198.18.1.2", netns_name=node.netns)
    cli("add-pod", "198.18.1.2", netns_name=node.netns)  # again: no error, one member
    assert members(topology, node) == {"198.18.1.2"}
    assert cli("status", netns_name=node.netns).stdout.startswith("mode: node\nstate: installed\n")

    # what iptables-save shows is exactly the rule builder's text, hooks first in their chains
    save = topology.run(node, ["iptables-legacy-save"]).stdout
    tables = {t.split("\n", 1)[0].strip(): t for t in save.split("*")[1:]}
    for table, expected in rules.render(rules.node_ruleset()).items():
        for chain in sorted({line.split()[1] for line in expected if line.startswith("-A ztunnel-")}):
            assert f":{chain} - [0:0]" in tables[table]
            got = [line for line in tables[table].splitlines() if line.startswith(f"-A {chain} ")]
            assert got == [line for line in expected if line.startswith(f"-A {chain} ")], (table, chain)
    for builtin in ("PREROUTING", "INPUT", "OUTPUT"):
        mangle = save.split("*mangle")[1]
        first_rule = next(line for line in mangle.splitlines() if line.startswith(f"-A {builtin} "))
        assert first_rule == f"-A {builtin} -j ztunnel-{builtin}"
    assert "-A PREROUTING -p udp -j MARK --set-xmark 0x4000/0xffffffff" in save  # theirs, intact
    assert topology.run(node, ["ip", "rule", "show"]).stdout.count("lookup 100") == 1

    out = cli("uninstall", netns_name=node.netns).stdout
    assert "destroyed ipset ztunnel-pods-ips" in out
    assert snapshot(topology, node) == before
    assert cli("uninstall", netns_name=node.netns).stdout.splitlines() == ["redirection removed (node mode)"]
    assert snapshot(topology, node) == before
    st = cli("status", netns_name=node.netns, check=False)
    assert st.returncode == 1 and "state: not installed" in st.stdout


@pytest.mark.parametrize("mode", ["node", "inpod"])
def test_uninstall_in_a_fresh_namespace_leaves_only_empty_tables(topology, mode):
    """A namespace without any rules: after install + uninstall the only trace is the legacy
    tables the kernel created on first access (empty, policy ACCEPT)."""
    ns = topology.add_pod("fresh")
    flag = ["--inpod"] if mode == "inpod" else []
    before = snapshot(topology, ns)
    cli("install", *flag, netns_name=ns.netns)
    assert cli("status", *flag, netns_name=ns.netns).returncode == 0
    if mode == "inpod":
        save = topology.run(ns, ["iptables-legacy-save"]).stdout
        for table, lines in rules.render(rules.inpod_ruleset()).items():
            block = save.split(f"*{table}\n")[1].split("COMMIT")[0]
            for line in lines:
                assert line in block.splitlines(), (table, line)
    cli("uninstall", *flag, netns_name=ns.netns)
    after = snapshot(topology, ns)
    assert drop_empty_tables(after.pop("iptables-legacy-save")) == drop_empty_tables(before.pop("iptables-legacy-save"))
    assert after == before


def test_rules_in_the_nft_backend_are_reported(topology):
    node = topology.add_node("node", NODE_A, "198.18.1.0/24")
    topology.run(node, ["iptables-nft", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    legacy_before = topology.run(node, ["iptables-legacy-save"]).stdout
    refused = cli("install", netns_name=node.netns, check=False)
    assert refused.returncode == 2
    assert "1 iptables rule(s) in the nft backend" in refused.stderr and "--allow-nft" in refused.stderr
    assert topology.run(node, ["iptables-legacy-save"]).stdout == legacy_before  # nothing written
    assert "ztunnel-pods-ips" not in topology.run(node, ["ipset", "list", "-n"]).stdout

    ok = cli("install", "--allow-nft", netns_name=node.netns)
    assert "warning: this network namespace has 1 iptables rule(s) in the nft backend" in ok.stderr
    cli("uninstall", netns_name=node.netns)

    # redirection chains already in nft (e.g. installed by an iptables-nft based istio-cni): refused
    topology.run(node, ["iptables-nft", "-t", "mangle", "-N", "ztunnel-PREROUTING"])
    refused = cli("install", "--allow-nft", netns_name=node.netns, check=False)
    assert refused.returncode == 2 and "ztunnel-PREROUTING already exist in the iptables-nft backend" in refused.stderr


# --------------------------------------------------------------------------------- in-pod mode


def test_inpod_rules_for_a_dedicated_ztunnel(lab):
    """istio-cni's in-pod rules in `web`'s namespace, a dedicated ztunnel-fast listening there:
    inbound HBONE (15008) and plaintext (15006) are captured by TPROXY, outbound by REDIRECT, and
    with ENABLE_ORIG_SRC the app sees each client's own address."""
    web = lab.pod("web", namespace="demo")
    sleep = lab.pod("sleep", namespace="demo")
    plain = lab.pod("plain", namespace="legacy", mesh=False)
    lab.write_config()
    lab.app(web, "serve", "80", "whoami", "--name", "web", port=80)
    lab.app(sleep, "serve", "80", "whoami", "--name", "sleep", port=80)
    # the kernel creates legacy tables on first access; a real pod has them: take them into account
    netns.iptables(web.pod, "-t", "mangle", "-S")
    netns.iptables(web.pod, "-t", "nat", "-S")
    before = snapshot(lab.topology, web.pod)
    zw = lab.start_ztunnel(web, redirect=False, ENABLE_ORIG_SRC="true")
    zs = lab.start_ztunnel(sleep)  # the reference 8.3 rule: its outbound goes to its ztunnel-fast
    cli("install", "--inpod", netns_name=web.pod.netns)

    assert whoami(lab, sleep, web.ip) == ("web", sleep.ip)  # HBONE into web, TPROXY 15008
    assert zs.lines(f"proxy to {web.ip}:80 using HBONE via {web.ip}:15008 type Direct")
    assert zw.lines(f"got CONNECT request to {web.ip}:80")
    assert whoami(lab, plain, web.ip) == ("web", plain.ip)  # plaintext, TPROXY 15006
    assert zw.lines(f"proxying plaintext to {web.ip}:80")
    assert whoami(lab, web, sleep.ip)[0] == "sleep"  # web's outbound, REDIRECT 15001
    assert zw.lines(f"proxy to {sleep.ip}:80 using HBONE via {sleep.ip}:15008 type Direct")
    assert zs.lines(f"got CONNECT request to {sleep.ip}:80")

    cli("uninstall", "--inpod", netns_name=web.pod.netns)
    assert snapshot(lab.topology, web.pod) == before
    # without the rules the pod is reached directly again
    n = len(zw.lines("proxying plaintext"))
    assert whoami(lab, plain, web.ip) == ("web", plain.ip)
    assert len(zw.lines("proxying plaintext")) == n
