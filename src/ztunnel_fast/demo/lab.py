"""A small mesh on one machine: pods (network namespaces), a local CA, a local config, ztunnel-fast
processes and demo apps.  Used by `ztunnel-fast demo` and by the end-to-end tests.

Invariants: everything a Lab starts or creates belongs to its Topology and goes away with
`Topology.teardown()`; the local config is written once, before any ztunnel-fast starts, and is
the single source of truth for every instance (as istiod would be).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import netns
from ..identity.ca import init_ca

READY_LINE = "proxy ready"
START_TIMEOUT = 30.0  # seconds a ztunnel-fast gets to bind its listeners


@dataclass
class LabPod:
    pod: netns.Pod
    name: str
    namespace: str
    service_account: str
    mesh: bool
    node: str
    services: dict = field(default_factory=dict)  # "ns/host" -> {svc port: target port}

    @property
    def ip(self) -> str:
        return self.pod.ip

    @property
    def identity(self) -> str:
        return f"spiffe://cluster.local/ns/{self.namespace}/sa/{self.service_account}"


@dataclass
class Ztunnel:
    pod: LabPod
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def lines(self, needle: str) -> list[str]:
        return [line for line in self.log().splitlines() if needle in line]


class Lab:
    def __init__(self, topology: netns.Topology, workdir: Path, *, engine: str = "auto", log_level: str = "info"):
        self.topology = topology
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.engine = engine
        self.log_level = log_level
        self.ca_dir = self.workdir / "ca"
        init_ca(self.ca_dir, trust_domain="cluster.local", force=True)
        self.config_path = self.workdir / "local-config.yaml"
        self.pods: dict[str, LabPod] = {}
        self.services: list[dict] = []
        self.ztunnels: list[Ztunnel] = []
        self.extra_workloads: list[dict] = []

    # -- the mesh --------------------------------------------------------------------------
    def pod(self, name: str, *, namespace: str = "default", service_account: str | None = None,
            mesh: bool = True, node: str = "node1", ip: str | None = None, workload: bool = True) -> LabPod:
        """A pod (network namespace); `workload=False` keeps it out of the config (a host that
        ztunnel-fast knows nothing about, e.g. a node's own address)."""
        p = LabPod(self.topology.add_pod(name, ip), name, namespace, service_account or name, mesh, node)
        if workload:
            self.pods[name] = p
        return p

    def node(self, name: str, ip: str, pod_subnet: str) -> LabPod:
        """A node (a namespace that routes for the pods behind it); not a workload."""
        return LabPod(self.topology.add_node(name, ip, pod_subnet), name, "default", name, False, name)

    def node_pod(self, node: LabPod, name: str, ip: str, *, namespace: str = "default",
                 service_account: str | None = None, mesh: bool = True) -> LabPod:
        """A pod behind `node` (its traffic crosses the node, where node-level redirection sees it)."""
        p = LabPod(self.topology.add_node_pod(node.pod, name, ip), name, namespace, service_account or name,
                   mesh, node.node)
        self.pods[name] = p
        return p

    def node_workload(self, host: LabPod, name: str, ip: str, *, namespace: str = "default",
                      service_account: str | None = None, mesh: bool = True) -> LabPod:
        """A workload whose IP lives in `host`'s network namespace (several workloads behind one
        node-level ztunnel-fast in shared mode): the address is added to the host's eth0."""
        self.topology.run(host.pod, ["ip", "addr", "add", f"{ip}/32", "dev", netns.Topology.POD_IF])
        p = LabPod(netns.Pod(name, host.pod.netns, ip), name, namespace, service_account or name, mesh, host.node)
        self.pods[name] = p
        return p

    def service(self, name: str, namespace: str, vip: str, ports: dict[int, int], endpoints: list[LabPod],
                subject_alt_names: list[str] | None = None) -> str:
        hostname = f"{name}.{namespace}.svc.cluster.local"
        self.services.append({
            "name": name, "namespace": namespace, "hostname": hostname, "vips": [f"/{vip}"],
            "ports": dict(ports), "subjectAltNames": list(subject_alt_names or []),
        })
        for ep in endpoints:
            ep.services[f"{namespace}/{hostname}"] = dict(ports)
        return hostname

    def config(self) -> dict:
        workloads = [
            {
                "uid": f"Kubernetes//Pod/{p.namespace}/{p.name}",
                "name": p.name,
                "namespace": p.namespace,
                "serviceAccount": p.service_account,
                "workloadIps": [p.ip],
                "protocol": "HBONE" if p.mesh else "TCP",
                "node": p.node,
                "workloadName": p.name.rsplit("-", 1)[0] if p.name[-1].isdigit() else p.name,
                "canonicalName": p.name.rsplit("-", 1)[0] if p.name[-1].isdigit() else p.name,
                "canonicalRevision": "v1",
                **({"services": p.services} if p.services else {}),
            }
            for p in self.pods.values()
        ]
        return {"workloads": workloads + self.extra_workloads, "services": self.services}

    def write_config(self) -> Path:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_path

    # -- processes -------------------------------------------------------------------------
    def ztunnel_env(self, p: LabPod, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "LOCAL_", "ZTUNNEL_"))}
        env.update({
            "PROXY_MODE": "dedicated",
            "PROXY_WORKLOAD_INFO": f"{p.namespace}/{p.name}/{p.service_account}",
            "LOCAL_XDS_PATH": str(self.config_path),
            "LOCAL_CA_DIR": str(self.ca_dir),
            "ZTUNNEL_ENGINE": self.engine,
            "RUST_LOG": self.log_level,
            "NODE_NAME": p.node,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(overrides)
        return env

    def start_ztunnel(self, p: LabPod, *, redirect: bool = True, wait: bool = True, shared: bool = False,
                      **env: str) -> Ztunnel:
        """Run ztunnel-fast in the pod's netns (dedicated mode, or shared mode serving every
        workload of the pod's node) and, by default, redirect the pod's outbound TCP to it (the
        minimal in-pod rule)."""
        if shared:
            env = {"PROXY_MODE": "shared", "PROXY_WORKLOAD_INFO": "", **env}
        if not self.config_path.exists():
            self.write_config()
        log_path = self.workdir / f"ztunnel-{p.name}.log"
        out = open(log_path, "ab")
        proc = self.topology.popen(
            p.pod, [sys.executable, "-m", "ztunnel_fast", "run"], env=self.ztunnel_env(p, **env),
            stdout=out, stderr=subprocess.STDOUT,
        )
        out.close()
        zt = Ztunnel(p, proc, log_path)
        self.ztunnels.append(zt)
        if wait:
            self.wait_ready(zt)
        if redirect:
            netns.redirect_outbound(p.pod)
        return zt

    def wait_ready(self, zt: Ztunnel, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in zt.log():
                return
            if zt.proc.poll() is not None:
                raise RuntimeError(f"ztunnel-fast in {zt.pod.name} exited {zt.proc.returncode}:\n{zt.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"ztunnel-fast in {zt.pod.name} not ready after {timeout}s:\n{zt.log()}")

    def app(self, p: LabPod, *args: str, port: int | None = None) -> subprocess.Popen:
        """Start a demo app server in the pod; waits until it listens when `port` is given."""
        log_path = self.workdir / f"app-{p.name}.log"
        out = open(log_path, "ab")
        proc = self.topology.popen(p.pod, [sys.executable, "-m", "ztunnel_fast.demo.apps", *args],
                                   stdout=out, stderr=subprocess.STDOUT)
        out.close()
        if port is not None:
            netns.wait_listening(p.pod, port)
        return proc

    def client(self, p: LabPod, *args: str, timeout: float = 300) -> dict:
        """Run a demo client in the pod and return its JSON report."""
        import json

        res = self.topology.run(p.pod, [sys.executable, "-m", "ztunnel_fast.demo.apps", *args], timeout=timeout)
        return json.loads(res.stdout.strip().splitlines()[-1])

    def identity_files(self, spiffe_uri: str, name: str, ttl: float = 24 * 3600) -> tuple[Path, Path, Path]:
        """Key, chain and root for `spiffe_uri`, issued by the Lab's CA (the ztunnels' trust root),
        written under workdir/certs/<name> for peers that read files (Envoy, test clients).
        Returns (chain, key, root)."""
        from ..identity.ca import LocalCA
        from ..identity.spiffe import Identity

        issued = LocalCA.load(self.ca_dir).issue(Identity.parse(spiffe_uri), ttl)
        d = self.workdir / "certs" / name
        d.mkdir(parents=True, exist_ok=True)
        chain, key, root = d / "cert-chain.pem", d / "key.pem", d / "root-cert.pem"
        key.write_bytes(issued.key_pem)
        key.chmod(0o600)
        chain.write_bytes(b"".join(issued.chain_pem))
        root.write_bytes(issued.root_pem)
        return chain, key, root

    def client_background(self, p: LabPod, *args: str) -> tuple[subprocess.Popen, Path]:
        """Start a demo client without waiting; its JSON lines go to the returned file."""
        out_path = self.workdir / f"client-{p.name}-{len(list(self.workdir.glob('client-*')))}.out"
        out = open(out_path, "wb")
        proc = self.topology.popen(p.pod, [sys.executable, "-m", "ztunnel_fast.demo.apps", *args],
                                   stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return proc, out_path

    def http(self, p: LabPod, url: str, *, method: str = "GET") -> tuple[int, str]:
        """curl inside the pod (e.g. a ztunnel-fast's admin on localhost:15000): (status, body)."""
        res = self.topology.run(p.pod, ["curl", "-s", "-X", method, "--max-time", "10", "-w", "\n%{http_code}", url],
                                check=False)
        body, _, status = res.stdout.rpartition("\n")
        return int(status or 0), body

    def stop_ztunnel(self, zt: Ztunnel) -> int | None:
        return self.topology.stop(zt.proc)


class LabIstiod:
    """The fake istiod's xDS side (fakes/xds_server.py) as a process in its own pod, fed from a
    file in the local-config shape built from the Lab (its pods and services) plus `policies`.

    `write()` pushes the Lab's current mesh (the fake re-reads the file and sends deltas);
    `stop()`/`start()` restart it on the same address; `requests()` returns what it received
    (node, metadata, ACK/NACK) from its JSON log.  `env(pod)` gives the ztunnel variables of a
    ztunnel-fast that serves `pod` from it (no local config file).  TLS: a serving certificate for
    istiod.istio-system.svc signed by a test root (XDS_ROOT_CA), reached by IP with
    ALT_XDS_HOSTNAME.
    """

    PORT = 15012  # istiod's xDS/CA port
    START_TIMEOUT = 20.0  # seconds for the fake to listen

    def __init__(self, lab: Lab, *, token: str = "lab-bearer-token"):
        from ..fakes.xds_server import ISTIOD_NAME, make_serving_tls

        self.lab = lab
        self.server_name = ISTIOD_NAME
        self.pod = lab.pod("istiod", namespace="istio-system", workload=False)
        self.tls = make_serving_tls(lab.workdir / "istiod-tls", (ISTIOD_NAME,))
        self.config_path = lab.workdir / "istiod-config.yaml"
        self.log_path = lab.workdir / "istiod.log"
        self.token = token
        self.token_path = lab.workdir / "istio-token"
        self.token_path.write_text(token + "\n")
        self.proc: subprocess.Popen | None = None
        self.policies: list[dict] = []
        self.malformed: list[dict] = []  # raw resources for tests: {typeUrl, name, hex}

    def write(self) -> None:
        doc = {**self.lab.config(), "policies": list(self.policies)}
        if self.malformed:
            doc["malformed"] = list(self.malformed)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.config_path)  # atomic: the fake never reads half a file

    def start(self) -> None:
        if not self.config_path.exists():
            self.write()
        out = open(self.log_path, "ab")
        self.proc = self.topology_popen(out)
        out.close()
        deadline = time.monotonic() + self.START_TIMEOUT
        while '"listening"' not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake istiod did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def topology_popen(self, out) -> subprocess.Popen:
        return self.lab.topology.popen(
            self.pod.pod, [sys.executable, "-m", "ztunnel_fast.fakes.xds_server", "--config", str(self.config_path),
                           "--listen", f"{self.pod.ip}:{self.PORT}", "--tls-dir", str(self.tls.root.parent)],
            stdout=out, stderr=out)

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.topology.stop(self.proc)

    def requests(self) -> list[dict]:
        import json

        events = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]
        return [e for e in events if e["event"] == "request"]

    def exempt(self, p: LabPod) -> None:
        """As in a cluster, ztunnel's own connection to istiod is not captured: exempt it from the
        pod's outbound redirect (start_ztunnel appends the REDIRECT after this rule)."""
        netns.iptables(p.pod, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", self.pod.ip,
                       "--dport", str(self.PORT), "-j", "RETURN")

    def env(self, p: LabPod, **extra: str) -> dict[str, str]:
        """ztunnel's variables for a ztunnel-fast serving `p` from this istiod."""
        return {
            "LOCAL_XDS_PATH": "",  # no local file: xDS is the source
            "XDS_ADDRESS": f"{self.pod.ip}:{self.PORT}",  # scheme optional: https:// assumed
            "ALT_XDS_HOSTNAME": self.server_name,
            "XDS_ROOT_CA": str(self.tls.root),
            "AUTH_TOKEN": str(self.token_path),
            "POD_NAME": f"ztunnel-{p.name}",
            "POD_NAMESPACE": "istio-system",
            "INSTANCE_IP": p.ip,
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
            **extra,
        }
