"""`ztunnel-fast demo --mode inpod`: the ambient journey as today's Istio runs it, with istio-cni.

Two nodes and three pods are network namespaces on one segment.  Each node runs one ztunnel-fast
in shared mode with INPOD_ENABLED=true (as Istio's chart starts it) and an istio-cni double
(`fakes.cni.FakeCni`) listening on that node's ZDS socket.  The fake istiod (fakes/istiod.py, its
own namespace, port 15012) is the control plane: workloads over xDS, certificates from its CA.
Enabling ambient does what istiod and istio-cni do: istiod pushes the pods as HBONE workloads over
xDS; istio-cni writes the in-pod rules into each pod's namespace (`redirect install --inpod --netns
POD`) and hands the namespace to the node's ztunnel-fast (AddWorkload + the netns fd), then
SnapshotSent.
Then: curl again (HBONE between the pods' own listeners), the logs, `workloadState` with the live
connection, a pod removed from the mesh (DelWorkload), and an istio-cni restart (reconnect, replay,
snapshot: pods kept).

Invariant: everything the demo creates (namespaces, rules, processes, socket files, the workdir)
is removed at the end, on Ctrl-C and on failure, unless --keep.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import netns
from ..fakes.cni import FakeCni, install_inpod_rules
from .journey import BOLD, RESET, DemoFailed, demo_exit, in_ns, push_mesh, show
from .lab import Lab, LabIstiod, LabPod

NS = "ambient-demo"
NODES = ("amb1-worker", "amb1-worker2")
STEPS = ("before", "enable", "after", "logs", "workload-state", "remove", "cni-restart")


class InpodCluster:
    def __init__(self, workdir: Path, engine: str):
        self.workdir = workdir
        self.lab = Lab(netns.Topology(prefix=f"ztf-demo-{os.getpid()}"), workdir / "lab", engine=engine)
        self.cni: dict[str, FakeCni] = {}
        self.ztunnels = {}
        self.nodes: dict[str, LabPod] = {}
        lab = self.lab
        self.istiod = lab.attach(LabIstiod(lab))
        for name in NODES:
            self.nodes[name] = lab.pod(name, node=name, workload=False)
        # Not in the mesh until the namespace is labelled: istiod serves them as plain TCP workloads.
        self.sleep = lab.pod("sleep", namespace=NS, node=NODES[0], mesh=False)
        self.notsleep = lab.pod("notsleep", namespace=NS, node=NODES[0], mesh=False)
        self.httpbin = lab.pod("httpbin", namespace=NS, node=NODES[1], mesh=False)
        self.istiod.start()
        lab.app(self.httpbin, "serve", "80", "http", "--name", "httpbin", port=80)
        lab.app(self.httpbin, "serve", "81", "echo", port=81)  # for a long-lived connection to show
        for name, node in self.nodes.items():
            sock = self.socket(name)
            self.cni[name] = FakeCni(sock)
            self.ztunnels[name] = lab.start_ztunnel(node, shared=True, redirect=False, INPOD_ENABLED="true",
                                                    INPOD_UDS=str(sock))
            self.cni[name].accept()
        push_mesh(self)  # both ztunnel-fast instances hold istiod's state before istio-cni hands pods over

    @property
    def topo(self) -> netns.Topology:
        return self.lab.topology

    def socket(self, node: str) -> Path:
        return self.workdir / node / "ztunnel.sock"

    def uid(self, p: LabPod) -> str:
        return f"Kubernetes//Pod/{p.namespace}/{p.name}"

    def add(self, p: LabPod) -> str:
        return self.cni[p.node].add(self.uid(p), p.pod.netns, p.name, p.namespace, p.service_account)

    def curl(self, p: LabPod) -> tuple[str, str]:
        argv = ["curl", "-s", "--max-time", "10", f"http://{self.httpbin.ip}/"]
        out = self.topo.run(p.pod, argv, check=False).stdout
        return f"{in_ns(p, argv)} | grep title -m 1", "\n".join(line for line in out.splitlines() if "title" in line)

    def admin(self, node: str, path: str) -> str:
        return self.topo.run(self.nodes[node].pod, ["curl", "-s", "--max-time", "10", f"http://127.0.0.1{path}"],
                             check=False).stdout

    def close(self) -> None:
        for cni in self.cni.values():
            cni.close()
        self.topo.teardown()


def step_before(c: InpodCluster) -> None:
    cmd, title = c.curl(c.sleep)
    if "httpbin.org" not in title:
        raise DemoFailed(f"curl before ambient failed: {title!r}")
    show("Before ambient", cmd, title, "plain TCP straight to the httpbin pod: no ztunnel-fast involved")


def _enable(c: InpodCluster) -> list[str]:
    for p in (c.sleep, c.notsleep, c.httpbin):
        p.mesh = True
    lines = push_mesh(c)  # istiod: the pods are HBONE workloads now
    for p in (c.sleep, c.notsleep, c.httpbin):
        install_inpod_rules(p.pod.netns)
        error = c.add(p)
        lines.append(f"{p.node}: AddWorkload {c.uid(p)} (netns fd of {p.pod.netns}) -> {'ACK' if not error else error}")
        if error:
            raise DemoFailed(f"istio-cni add of {p.name} NACKed: {error}")
    for name, cni in c.cni.items():
        error = cni.snapshot_sent()
        lines.append(f"{name}: SnapshotSent -> {'ACK' if not error else error}")
    return lines


def step_enable(c: InpodCluster) -> None:
    lines = _enable(c)
    ready = c.admin(NODES[0], ":15021/healthz/ready").strip()
    show("Enable ambient (kubectl label namespace ambient-demo istio.io/dataplane-mode=ambient)",
         "# istiod: xDS push (pods now HBONE); istio-cni: in-pod rules in each pod netns, then ZDS AddWorkload "
         "with the netns fd, SnapshotSent",
         "\n".join(lines + [f"{NODES[0]} readiness: {ready}"]),
         "istiod pushed the pods as HBONE workloads over xDS; each pod's namespace now has istio-cni's rules "
         "and ztunnel-fast listeners 15001/15006/15008 inside it")


def step_after(c: InpodCluster) -> None:
    cmd, title = c.curl(c.sleep)
    if "httpbin.org" not in title:
        raise DemoFailed(f"curl after ambient failed: {title!r}")
    show("After ambient", cmd, title, "same answer, now through sleep's and httpbin's in-pod listeners over HBONE")


def step_logs(c: InpodCluster) -> None:
    lines = [line for zt in c.ztunnels.values() for line in zt.log().splitlines()
             if "inbound" in line or "outbound" in line]
    if not any("using HBONE via" in line for line in lines):
        raise DemoFailed("no HBONE line in the logs")
    show("ztunnel-fast logs", "# both nodes' logs, egrep 'inbound|outbound'", "\n".join(lines[-6:]),
         "outbound in sleep's namespace on amb1-worker, inbound in httpbin's on amb1-worker2, mTLS identities")


def step_workload_state(c: InpodCluster) -> None:
    held = c.topo.popen(c.sleep.pod, [sys.executable, "-m", "ztunnel_fast.demo.apps", "hold", c.httpbin.ip, "81",
                                      "--seconds", "5"], stdout=subprocess.DEVNULL)
    try:
        state = {}
        for _ in range(100):  # bounded: until the held connection shows up
            state = json.loads(c.admin(NODES[0], ":15000/config_dump") or "{}").get("workloadState", {})
            if state.get(c.uid(c.sleep), {}).get("connections", {}).get("outbound"):
                break
            time.sleep(0.05)
    finally:
        c.topo.stop(held)
    show("workloadState (istioctl ztunnel-config connections)",
         f"{in_ns(c.nodes[NODES[0]], ['curl', '-s', 'localhost:15000/config_dump'])} | jq .workloadState",
         json.dumps(state, indent=2), "each pod istio-cni handed over, its state, and its live connections")


def step_remove(c: InpodCluster) -> None:
    error = c.cni[NODES[0]].delete(c.uid(c.notsleep))
    active = [line for line in c.admin(NODES[0], ":15020/metrics").splitlines()
              if line.startswith("workload_manager_") and "_created" not in line]
    show("Remove a pod from the mesh (DelWorkload)", f"# istio-cni: DelWorkload {c.uid(c.notsleep)}",
         "\n".join([f"-> {'ACK' if not error else error}", *active]),
         "notsleep's proxy drained and its listeners closed; sleep and httpbin keep working")


def step_cni_restart(c: InpodCluster) -> None:
    node = NODES[0]
    c.cni[node].close()
    c.cni[node] = FakeCni(c.socket(node))
    c.cni[node].accept()
    lines = [f"reconnected; AddWorkload sleep -> {c.add(c.sleep) or 'ACK'}",
             f"SnapshotSent -> {c.cni[node].snapshot_sent() or 'ACK'}"]
    cmd, title = c.curl(c.sleep)
    if "httpbin.org" not in title:
        raise DemoFailed(f"curl after the istio-cni restart failed: {title!r}")
    lines.append(title)
    show("istio-cni restarts", f"# restart istio-cni on {node}; then {cmd}", "\n".join(lines),
         "ztunnel-fast reconnects, istio-cni replays its pods and the snapshot: existing pods keep running")


STEP_FUNCS = {"before": step_before, "enable": step_enable, "after": step_after, "logs": step_logs,
              "workload-state": step_workload_state, "remove": step_remove, "cni-restart": step_cni_restart}


def run_inpod_demo(engine: str = "auto", keep: bool = False, step: str | None = None) -> int:
    if step is not None and step not in STEPS:
        print(f"unknown step {step!r}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    # short: AF_UNIX socket paths are limited to 108 bytes
    workdir = Path(tempfile.mkdtemp(prefix="ztf-inpod-demo-"))
    c: InpodCluster | None = None
    completed = False
    try:
        c = InpodCluster(workdir, engine)
        engine_name = c.ztunnels[NODES[0]].lines("proxy ready")[0].split("engine=")[1].split()[0]
        print(f"{BOLD}ztunnel-fast demo (in-pod mode){RESET}: the ambient journey with istio-cni on one machine "
              f"(namespaces {c.topo.prefix}-*, workdir {workdir}, engine {engine_name})")
        print(f"  istiod (fake) {c.istiod.address}: xDS and CA for {c.istiod.server_name}")
        for name, node in c.nodes.items():
            print(f"  node {name:<13} {node.ip}: ztunnel-fast (shared, INPOD_ENABLED=true), istio-cni at {c.socket(name)}")
        for p in (c.sleep, c.notsleep, c.httpbin):
            print(f"  pod  {p.name:<13} {p.ip:<12} on {p.node}")
        names = STEPS if step is None else (("enable", step) if step not in ("before", "enable") else (step,))
        for name in names:
            if step is not None and name == "enable" and step != "enable":
                _enable(c)
                continue
            STEP_FUNCS[name](c)
        completed = True
        if keep:
            print(f"\n--keep: the topology stays up. Enter a pod: ip netns exec {c.sleep.pod.netns} bash")
        return 0
    except (DemoFailed, KeyboardInterrupt) as exc:
        return demo_exit(exc)
    finally:
        if not (keep and completed):
            if c is not None:
                c.close()
                print(f"\ntorn down: no namespace, rule, socket or process of {c.topo.prefix} left")
            shutil.rmtree(workdir, ignore_errors=True)
