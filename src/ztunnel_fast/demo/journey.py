"""`ztunnel-fast demo`: the user guide's ambient journey on one machine, without Kubernetes.

Two nodes and their pods are network namespaces (pods route through their node, as with a kind
cluster's CNI); each node runs one ztunnel-fast in shared mode with node-level redirection
(`ztunnel-fast redirect install`, ipset `ztunnel-pods-ips`) and a pod-selection watcher
(`ztunnel-fast redirect sync --watch`) over an inventory file that stands in for the Kubernetes
API; a tiny kube-proxy stand-in DNATs the httpbin Service VIP for traffic that is not captured.
The fake istiod (fakes/istiod.py, in its own namespace at ISTIOD_IP:15012) is the control plane:
both ztunnel-fast instances take the workloads over xDS and their certificates from its CA
(impersonating their node's pods with their own token), verified with its one root, as in a
cluster; labelling the namespace is an xDS push.

Then it replays the guide: curl before ambient, label the namespace, curl again (now HBONE), the
ztunnel logs, `proxy-config workloads` and `secrets`, `ipset list`, the `ztunnel-PREROUTING`
chain, and httpbin scaled to 2 with round robin visible in the logs.  Each step prints the
command, its output and one line on what it shows.

Invariant: everything the demo creates (namespaces, veths, rules, ipsets, processes, the
/etc/netns/<ns>/hosts files that give pods their DNS names, and the work directory holding the
demo CA's private key, configs and logs) is removed at the end, on Ctrl-C, SIGTERM and on
failure, unless --keep.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from .. import netns
from .lab import Lab, LabIstiod, LabPod, Ztunnel

NS = "ambient-demo"
VIP, SERVICE_PORT, TARGET_PORT = "198.19.0.10", 8000, 80
NODES = (("amb1-worker", "198.18.0.11", "198.18.1.0/24"), ("amb1-worker2", "198.18.0.12", "198.18.2.0/24"))
SYNC_INTERVAL = 0.2  # seconds between the pod-selection watcher's polls of the inventory
LOG_SETTLE_TIMEOUT = 5.0  # seconds to wait for earlier connections' closing log lines
STEPS = ("before", "label", "after", "logs", "proxy-config", "ipset", "iptables", "scale")
ISTIOD_IP = "198.18.0.5"  # the fake istiod's pod, on the nodes' segment
PUSH_TIMEOUT = 15.0  # seconds both ztunnel-fast instances get to apply an xDS push
NETNS_ETC = Path("/etc/netns")  # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


class DemoFailed(Exception):
    pass


@dataclass
class Cluster:
    lab: Lab
    nodes: dict[str, LabPod]
    ztunnels: dict[str, Ztunnel]
    inventory: Path
    istiod: LabIstiod
    labelled: bool = False

    @property
    def topo(self) -> netns.Topology:
        return self.lab.topology

    def pods(self, prefix: str) -> list[LabPod]:
        return [p for name, p in self.lab.pods.items() if name.startswith(prefix)]


# ---------------------------------------------------------------------------------------- output
def show(title: str, command: str, output: str, meaning: str) -> None:
    print(f"\n{BOLD}## {title}{RESET}")
    print(f"$ {command}")
    for line in output.rstrip("\n").splitlines():
        print(f"  {line}")
    print(f"{DIM}-> {meaning}{RESET}")


def in_ns(p: LabPod | netns.Pod, argv: list[str]) -> str:
    pod = getattr(p, "pod", p)
    return f"ip netns exec {pod.netns} {shlex.join(argv)}"


# ---------------------------------------------------------------------------------------- set-up
def _hosts_file(c: Cluster, p: LabPod) -> None:
    """Pods resolve the service by name, like kube-dns: httpbin -> the Service VIP."""
    d = NETNS_ETC / p.pod.netns
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts").write_text(
        f"127.0.0.1 localhost\n{p.ip} {p.name}\n"
        f"{VIP} httpbin httpbin.{NS} httpbin.{NS}.svc httpbin.{NS}.svc.cluster.local\n"
    )


def _kube_proxy(c: Cluster) -> None:
    """A kube-proxy stand-in on every node: the Service VIP DNATed to the httpbin pods (random
    choice, like iptables-mode kube-proxy).  Captured traffic skips it (nat ztunnel-PREROUTING)."""
    backends = c.pods("httpbin")
    for node in c.nodes.values():
        def run(*args: str, pod: netns.Pod = node.pod) -> None:
            netns.iptables(pod, "-t", "nat", *args)

        run("-F" if _has_chain(c, node, "KUBE-SERVICES") else "-N", "KUBE-SERVICES")
        if not _hooked(c, node):
            run("-A", "PREROUTING", "-j", "KUBE-SERVICES")
            run("-A", "OUTPUT", "-j", "KUBE-SERVICES")
        for i, pod in enumerate(backends):
            left = len(backends) - i
            prob = [] if left == 1 else ["-m", "statistic", "--mode", "random", "--probability", f"{1 / left:.5f}"]
            run("-A", "KUBE-SERVICES", "-d", f"{VIP}/32", "-p", "tcp", "--dport", str(SERVICE_PORT), *prob,
                "-j", "DNAT", "--to-destination", f"{pod.ip}:{TARGET_PORT}")


def _has_chain(c: Cluster, node: LabPod, chain: str) -> bool:
    return f":{chain} " in c.topo.run(node.pod, ["iptables-legacy-save", "-t", "nat"]).stdout


def _hooked(c: Cluster, node: LabPod) -> bool:
    return "-A PREROUTING -j KUBE-SERVICES" in c.topo.run(node.pod, ["iptables-legacy-save", "-t", "nat"]).stdout


def _write_inventory(c: Cluster) -> None:
    labels = {"istio.io/dataplane-mode": "ambient"} if c.labelled else {}
    doc = {
        "excludeNamespaces": ["kube-system", "istio-system"],
        "namespaces": [{"name": NS, "labels": labels}],
        "pods": [{"name": p.name, "namespace": p.namespace, "ip": p.ip, "node": p.node} for p in c.lab.pods.values()],
    }
    tmp = c.inventory.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(c.inventory)


def _add_pod(c: Cluster, node: str, name: str, ip: str, sa: str, services: bool = False) -> LabPod:
    p = c.lab.node_pod(c.nodes[node], name, ip, namespace=NS, service_account=sa, mesh=c.labelled)
    _hosts_file(c, p)
    if services:
        p.services[f"{NS}/httpbin.{NS}.svc.cluster.local"] = {SERVICE_PORT: TARGET_PORT}
    return p


def build(workdir: Path, engine: str) -> Cluster:
    topo = netns.Topology(prefix=f"ztf-demo-{int(time.time() * 1000) % 100000}")
    lab = Lab(topo, workdir, engine=engine)
    istiod = lab.attach(LabIstiod(lab, ip=ISTIOD_IP))
    nodes = {name: lab.node(name, ip, subnet) for name, ip, subnet in NODES}
    c = Cluster(lab, nodes, {}, workdir / "pods.yaml", istiod)
    w1, w2 = (n for n, _, _ in NODES)
    _add_pod(c, w1, "sleep-69cfb4968f-mwglt", "198.18.1.4", "sleep")
    _add_pod(c, w2, "sleep-69cfb4968f-qjmfs", "198.18.2.4", "sleep")
    _add_pod(c, w2, "notsleep-bb6696574-r4xjl", "198.18.2.5", "notsleep")
    httpbin = _add_pod(c, w1, "httpbin-648cd984f8-2q9bn", "198.18.1.5", "httpbin", services=True)
    lab.service("httpbin", NS, VIP, {SERVICE_PORT: TARGET_PORT}, [httpbin])
    istiod.start()  # serves Lab.config() over xDS; write_config() below pushes changes
    lab.app(httpbin, "serve", str(TARGET_PORT), "http", "--name", httpbin.name, port=TARGET_PORT)
    _kube_proxy(c)
    _write_inventory(c)
    for name, node in nodes.items():
        cli = [sys.executable, "-m", "ztunnel_fast", "redirect"]
        topo.run(node.pod, [*cli, "install"])
        log = open(workdir / f"sync-{name}.log", "ab")
        topo.popen(node.pod, [*cli, "sync", "--pods", str(c.inventory), "--node", name, "--watch",
                              "--interval", str(SYNC_INTERVAL)], stdout=log, stderr=log)
        log.close()
        c.ztunnels[name] = lab.start_ztunnel(node, shared=True, redirect=False)
    return c


# ---------------------------------------------------------------------------------------- steps
def curl_title(c: Cluster, pod: LabPod) -> tuple[str, str]:
    argv = ["curl", "-s", "--max-time", "10", f"http://httpbin:{SERVICE_PORT}/"]
    out = c.topo.run(pod.pod, argv, check=False).stdout
    title = "\n".join(line for line in out.splitlines() if "title" in line)
    return f"{in_ns(pod, argv)} | grep title -m 1", title


def _members(c: Cluster, node: LabPod) -> set[str]:
    out = c.topo.run(node.pod, ["ipset", "list", "ztunnel-pods-ips"], check=False).stdout
    return set(out.split("Members:", 1)[1].split()) if "Members:" in out else set()


def _wait_members(c: Cluster, expected: Callable[[LabPod], set[str]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_members(c, n) == expected(n) for n in c.nodes.values()):
            return
        time.sleep(0.1)
    raise DemoFailed("the pod-selection watcher did not update the ipsets in time")


def _ambient_ips(c: Cluster, node: LabPod) -> set[str]:
    return {p.ip for p in c.lab.pods.values() if p.node == node.node} if c.labelled else set()


def _log_lines(c: Cluster, since: dict[str, int] | None = None) -> list[str]:
    lines = []
    for name, zt in c.ztunnels.items():
        text = zt.log()[(since or {}).get(name, 0):]
        lines += [line for line in text.splitlines() if re.search("inbound|outbound", line)
                  and ("ztunnel_fast::proxy" in line)]
    return sorted(lines)


_SPAN_ID = re.compile(r"\b(inbound|outbound)\{id=([0-9a-f]+)")


def _unfinished(text: str) -> set[tuple[str, str]]:
    """(direction, id) of connections logged as started (outbound 'proxy to' / 'proxying to',
    inbound 'got CONNECT request') but not yet as ended ('complete' / 'failed')."""
    started, ended = set(), set()
    for line in text.splitlines():
        m = _SPAN_ID.search(line)
        if m is None:
            continue
        key = (m.group(1), m.group(2))
        if " proxy to " in line or " proxying to " in line or " got CONNECT request " in line:
            started.add(key)
        elif " complete " in line or " failed " in line:
            ended.add(key)
    return started - ended


def _marks(c: Cluster) -> dict[str, int]:
    """Where each log ends now, once the connections of earlier steps have logged their end: a
    step's own lines start after this (no 'complete' of the previous step's curl, no partial
    line)."""
    deadline = time.monotonic() + LOG_SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        logs = {name: zt.log() for name, zt in c.ztunnels.items()}
        if all(text.endswith("\n") or not text for text in logs.values()) and \
                not any(_unfinished(text) for text in logs.values()):
            break
        time.sleep(0.05)
    return {name: text.rfind("\n") + 1 for name, text in logs.items()}


def step_before(c: Cluster) -> None:
    sleep = c.pods("sleep-")[0]
    command, title = curl_title(c, sleep)
    if "httpbin.org" not in title:
        raise DemoFailed("httpbin is not reachable before ambient")
    show("Before ambient: curl httpbin from sleep", command, title,
         "plain TCP: the Service VIP is DNATed by the kube-proxy stand-in; no ztunnel-fast on the path")


def _node_workloads(c: Cluster, node: LabPod) -> dict[str, str]:
    """uid -> protocol as the node's ztunnel-fast knows them (its config_dump)."""
    import json

    out = c.topo.run(node.pod, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:15000/config_dump"],
                     check=False).stdout
    try:
        return {w["uid"]: w["protocol"] for w in json.loads(out)["workloads"]}
    except (ValueError, KeyError):
        return {}


def push_mesh(c: Cluster) -> list[str]:
    """istiod pushes the Lab's mesh over xDS; returns once every node's ztunnel-fast holds it
    (its config_dump), as a line saying what was ACKed.  `c`: this Cluster or the in-pod demo's
    (both have lab, istiod, nodes, topo)."""
    before = len(c.istiod.requests())
    c.lab.write_config()
    expected = {w["uid"]: w["protocol"] for w in c.lab.config()["workloads"]}
    deadline = time.monotonic() + PUSH_TIMEOUT
    while not all(_node_workloads(c, n) == expected for n in c.nodes.values()):
        if time.monotonic() > deadline:
            raise DemoFailed("the ztunnel-fast instances did not apply istiod's xDS push in time")
        time.sleep(0.1)
    acks = [r for r in c.istiod.requests()[before:] if r["nonce"] and not r["nack"]
            and r["typeUrl"].endswith("istio.workload.Address")]
    return [f"istiod -> ztunnel-fast: xDS delta of {len(expected)} workloads, ACKed on {len(acks)} streams "
            f"(nonces {', '.join(sorted({r['nonce'] for r in acks}))})"]


def _enable_ambient(c: Cluster) -> list[str]:
    """What labelling the namespace sets in motion: istiod marks the workloads HBONE (an xDS push
    to every ztunnel-fast), istio-cni's selection adds their IPs to the nodes' sets (the inventory
    + watchers)."""
    c.labelled = True
    for p in c.lab.pods.values():
        p.mesh = True
    pushed = push_mesh(c)
    _write_inventory(c)
    _wait_members(c, lambda n: _ambient_ips(c, n))
    return pushed


def step_label(c: Cluster) -> None:
    pushed = _enable_ambient(c)
    pods = "\n".join(f"{p.name:<28} {p.ip:<12} {p.node}" for p in c.lab.pods.values())
    show("Enable ambient: label the namespace (kubectl label namespace ambient-demo "
         "istio.io/dataplane-mode=ambient)",
         f"# inventory {c.inventory}: namespace {NS} labels istio.io/dataplane-mode=ambient", "\n".join([pods, *pushed]),
         "istiod pushed the workloads as HBONE to every ztunnel-fast over xDS; the pod-selection watchers put "
         "the namespace's pod IPs into each node's ztunnel-pods-ips set; no pod was restarted")


def step_after(c: Cluster) -> None:
    sleep = c.pods("sleep-")[0]
    since = _marks(c)
    command, title = curl_title(c, sleep)
    if "httpbin.org" not in title:
        raise DemoFailed("httpbin is not reachable through ztunnel-fast")
    if not any("using HBONE" in line for line in _log_lines(c, since)):
        raise DemoFailed("the request did not go through ztunnel-fast over HBONE")
    show("After ambient: the same curl", command, title,
         "the same page, now captured on the client's node and carried over HBONE (mTLS, port 15008)")


def step_logs(c: Cluster) -> None:
    sleep = c.pods("sleep-")[0]
    since = _marks(c)
    argv = ["sh", "-c", f"for i in $(seq 1 3); do curl -s -I --max-time 10 http://httpbin:{SERVICE_PORT}/ >/dev/null; done"]
    c.topo.run(sleep.pod, argv)
    _marks(c)  # wait for the three connections' closing lines
    show("ztunnel-fast logs", 'kubectl -n istio-system logs -l app=ztunnel | egrep "inbound|outbound"'
         f"  # here: the logs of both nodes' ztunnel-fast, after {shlex.join(argv[2:])}",
         "\n".join(_log_lines(c, since)),
         "outbound on sleep's node: 'proxy to <pod>:80 using HBONE via <pod>:15008 type Direct' and 'complete'; "
         "inbound on httpbin's node: 'got CONNECT request' with sleep's SPIFFE identity")


def step_proxy_config(c: Cluster) -> None:
    node = c.nodes[NODES[0][0]]
    for kind in ("workloads", "secrets"):
        argv = [sys.executable, "-m", "ztunnel_fast", "proxy-config", kind]
        out = c.topo.run(node.pod, argv).stdout
        if kind == "secrets":
            out += "\n" + _issued_by_istiod(c, node, out)
        show(f"proxy-config {kind} (istioctl proxy-config {kind} ztunnel-...)",
             in_ns(node, ["ztunnel-fast", "proxy-config", kind]), out,
             "the workloads this ztunnel-fast knows (over xDS), with their protocol" if kind == "workloads" else
             "the certificates it holds for its node's workloads, issued by istiod's CA (CA row: istiod's root), "
             "state and validity")


def _issued_by_istiod(c: Cluster, node: LabPod, table: str) -> str:
    """The fake istiod's side of the secrets: its CreateCertificate log for this node's token, and
    a check that the table's CA rows are istiod's root."""
    root_serial = format(c.istiod.pki.root.serial_number, "x")  # the table prints serials as istioctl: %x
    ca_rows = [line for line in table.splitlines() if re.search(r"\sCA\s", line)]
    if not ca_rows or not all(root_serial in line for line in ca_rows):
        raise DemoFailed(f"the certificates are not rooted in istiod's CA (root serial {root_serial}):\n{table}")
    token = c.istiod.token_of(node)
    issued = sorted({f"  {r['issued']}: impersonated by istio-system/ztunnel on {node.node}, {r['status']}"
                     for r in c.istiod.ca_requests()
                     if r["metadata"].get("authorization") == f"Bearer {token}" and r["status"] == "OK"})
    return "\n".join([f"# istiod's CA log (root serial {root_serial}):", *issued])


def step_ipset(c: Cluster) -> None:
    node = c.nodes[NODES[0][0]]
    argv = ["ipset", "list", "ztunnel-pods-ips"]
    show("The ipset of captured pods", in_ns(node, argv), c.topo.run(node.pod, argv).stdout,
         "the ambient pods of this node: their traffic is redirected to ztunnel-fast")


def step_iptables(c: Cluster) -> None:
    node = c.nodes[NODES[0][0]]
    argv = ["iptables-legacy", "-t", "mangle", "-L", "ztunnel-PREROUTING"]
    show("The redirection chain", in_ns(node, argv), c.topo.run(node.pod, argv).stdout,
         "TPROXY: outbound from ambient pods to 15001, HBONE to them to 15008, other inbound to 15006")


def step_scale(c: Cluster) -> None:
    w2 = NODES[1][0]
    second = _add_pod(c, w2, "httpbin-648cd984f8-7dglb", "198.18.2.6", "httpbin", services=True)
    c.lab.app(second, "serve", str(TARGET_PORT), "http", "--name", second.name, port=TARGET_PORT)
    push_mesh(c)  # istiod: the new endpoint of the service, to both ztunnel-fast instances
    _kube_proxy(c)
    _write_inventory(c)
    _wait_members(c, lambda n: _ambient_ips(c, n))
    sleep = c.pods("sleep-")[0]
    since = _marks(c)
    argv = ["sh", "-c", f"for i in $(seq 1 10); do curl -s -I --max-time 10 http://httpbin:{SERVICE_PORT}/; done"]
    out = c.topo.run(sleep.pod, argv).stdout
    served = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("X-Served-By")]
    lines = _log_lines(c, since)
    targets = {m.group(1) for line in lines for m in [re.search(r"proxy to (\S+):80 using HBONE", line)] if m}
    if len(set(served)) != 2 or len(targets) != 2:
        raise DemoFailed(f"round robin did not reach both replicas: {served}")
    show("Scale httpbin to 2 (kubectl -n ambient-demo scale deployment httpbin --replicas=2)",
         in_ns(sleep, argv) + '  # then the logs, egrep "inbound|outbound"',
         "\n".join([f"served by: {', '.join(served)}", *lines]),
         "client-side L4 round robin in ztunnel-fast: the requests alternate between the two replicas "
         f"({' and '.join(sorted(targets))}), independent of kube-proxy")


STEP_FUNCS = {"before": step_before, "label": step_label, "after": step_after, "logs": step_logs,
              "proxy-config": step_proxy_config, "ipset": step_ipset, "iptables": step_iptables,
              "scale": step_scale}
NEEDS_LABEL = {"after", "logs", "proxy-config", "ipset", "iptables", "scale"}


def teardown(c: Cluster | None) -> None:
    if c is not None:
        for p in c.lab.pods.values():
            shutil.rmtree(NETNS_ETC / p.pod.netns, ignore_errors=True)
        c.topo.teardown()


def run_demo(engine: str = "auto", keep: bool = False, step: str | None = None) -> int:
    if step is not None and step not in STEPS:
        print(f"unknown step {step!r}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    # SIGTERM ends the demo like Ctrl-C (the finally below removes everything); netns's own
    # handler tears the namespaces down first and then calls this one.
    signal.signal(signal.SIGTERM, _terminated)
    workdir = Path(tempfile.mkdtemp(prefix="ztunnel-fast-demo-"))
    c: Cluster | None = None
    completed = False
    try:
        c = build(workdir, engine)
        print(f"{BOLD}ztunnel-fast demo{RESET}: the ambient user journey on one machine "
              f"(namespaces {c.topo.prefix}-*, workdir {workdir}, engine {c.ztunnels[NODES[0][0]].lines('proxy ready')[0].split('engine=')[1].split()[0]})")
        print(f"  istiod (fake) {c.istiod.address}: xDS and CA for {c.istiod.server_name}, "
              f"root {c.istiod.root}")
        for name, node in c.nodes.items():
            print(f"  node {name:<13} {node.ip}: ztunnel-fast (shared mode), redirection installed")
        for p in c.lab.pods.values():
            print(f"  pod  {p.name:<28} {p.ip:<12} on {p.node}")
        print(f"  service httpbin {VIP}:{SERVICE_PORT} -> {TARGET_PORT}")
        if step is None:
            for name in STEPS:
                STEP_FUNCS[name](c)
        else:
            if step in NEEDS_LABEL:
                _enable_ambient(c)
            STEP_FUNCS[step](c)
        completed = True
        if keep:
            print(f"\n--keep: the topology stays up. Enter a pod: ip netns exec {c.pods('sleep-')[0].pod.netns} bash")
            print(f"  ztunnel-fast logs: {workdir}/ztunnel-*.log; admin inside a node: "
                  f"ip netns exec {c.nodes[NODES[0][0]].pod.netns} curl localhost:15000/config_dump")
            print(f"  remove everything: for n in $(ip netns list | grep -o '^{c.topo.prefix}-[a-z0-9-]*'); "
                  f"do ip netns pids $n | xargs -r kill; ip netns del $n; rm -rf /etc/netns/$n; done; rm -rf {workdir}")
        return 0
    except (DemoFailed, KeyboardInterrupt) as exc:
        return demo_exit(exc)
    finally:
        if not (keep and completed):
            teardown(c)
            shutil.rmtree(workdir, ignore_errors=True)  # holds the demo CA's private key
            if c is not None:
                print(f"\ntorn down: no namespace, rule, ipset or process of {c.topo.prefix} left, "
                      f"{workdir} removed")


def demo_exit(exc: BaseException) -> int:
    """The exit status of a demo ended by `exc`: 1 for a failed step (its message on stderr),
    130 for Ctrl-C; the caller's `finally` tears down."""
    if isinstance(exc, KeyboardInterrupt):
        print("\ninterrupted; tearing down", file=sys.stderr)
        return 130
    print(f"\ndemo failed: {exc}", file=sys.stderr)
    return 1


def _terminated(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
