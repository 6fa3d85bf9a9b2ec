"""A small mesh on one machine: pods (network namespaces), a control plane, ztunnel-fast
processes and demo apps.  Used by `ztunnel-fast demo` and by the end-to-end tests.

The control plane is either the local config file plus a local CA (LOCAL_XDS_PATH, LOCAL_CA_DIR)
or, once `Lab.attach(LabIstiod(...))`, the fake istiod: workloads over xDS and certificates from
its CA, as a cluster's ztunnel gets them.

Invariants: everything a Lab starts or creates belongs to its Topology and goes away with
`Topology.teardown()`; `Lab.config()` (pods, services, extra workloads) is the single source of
truth for every instance (as istiod would be): `write_config()` publishes it, to the file or as an
xDS push, before any ztunnel-fast that needs it starts.
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
        self.istiod: LabIstiod | None = None  # attach(): the fake istiod is the source of truth

    def attach(self, istiod: "LabIstiod") -> "LabIstiod":
        """Make `istiod` the control plane: write_config() pushes through it, start_ztunnel()
        points every ztunnel-fast at it (xDS and CA) instead of the local file and CA."""
        self.istiod = istiod
        return istiod

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
        """Publish the mesh: to the attached fake istiod (an xDS push), else to the local file."""
        if self.istiod is not None:
            self.istiod.write()
            return self.istiod.config_path
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
        if self.istiod is not None:
            env = {**self.istiod.env(p, shared=shared), **env}
        elif not self.config_path.exists():
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
    """The fake istiod (fakes/istiod.py: xDS and CA on one port, one TLS) as a process in its own
    pod, fed from a file in the local-config shape built from the Lab (its pods and services) plus
    `policies`, `malformed` and the CA's `callers`.

    `write()` pushes the Lab's current mesh (the fake re-reads the file and sends deltas) and
    returns once the fake took it; `stop()`/`start()` restart it on the same address;
    `requests()` returns the xDS requests it received (node, metadata, ACK/NACK) and
    `ca_requests()` the certificate requests.  `env(pod)` gives the ztunnel variables of a
    ztunnel-fast that serves `pod` from it (no local config file, no local CA) and registers that
    ztunnel's bearer token with the CA, as the API server knows every service account token:
    a dedicated proxy's token is its pod's service account, a shared (node) proxy's is
    istio-system/ztunnel, allowed to impersonate the identities of the pods on its node.  TLS: the
    CA authority's serving certificate for istiod.istio-system.svc, so `root` (root-cert.pem) is
    both XDS_ROOT_CA and CA_ROOT_CA; reached by IP with ALT_XDS_HOSTNAME / ALT_CA_HOSTNAME.

    `Lab.attach(istiod)` makes it the Lab's source of truth: `Lab.write_config()` pushes through it
    and `Lab.start_ztunnel()` uses `env()`.
    """

    PORT = 15012  # istiod's xDS/CA port
    START_TIMEOUT = 20.0  # seconds for the fake to listen or take a new config file
    NODE_ACCOUNT = "istio-system/ztunnel"  # the service account istiod trusts to impersonate

    def __init__(self, lab: Lab, *, token: str = "lab-bearer-token", ip: str | None = None):
        from ..fakes.ca_server import ISTIOD_NAME, FakePki

        self.lab = lab
        self.server_name = ISTIOD_NAME
        self.pod = lab.pod("istiod", namespace="istio-system", workload=False, ip=ip)
        self.pki = FakePki.create(lab.workdir / "istiod-pki")
        self.config_path = lab.workdir / "istiod-config.yaml"
        self.log_path = lab.workdir / "istiod.log"
        self.record_path = lab.workdir / "istiod-ca-requests.jsonl"
        self.token = token
        self.tokens_dir = lab.workdir / "tokens"
        self.proc: subprocess.Popen | None = None
        self.policies: list[dict] = []
        self.malformed: list[dict] = []  # raw resources for tests: {typeUrl, name, hex}
        self._callers: dict[str, tuple[str, object]] = {}  # token -> ("pod", LabPod) | ("node", node name)

    @property
    def root(self) -> Path:
        """root-cert.pem: the trust bundle of the cluster (istio-ca-root-cert)."""
        return self.pki.root_path

    @property
    def address(self) -> str:
        return f"{self.pod.ip}:{self.PORT}"

    # -- the file --------------------------------------------------------------------------
    def callers(self) -> list[dict]:
        out = []
        for token, (kind, who) in self._callers.items():
            if kind == "node":
                ids = sorted({q.identity for q in self.lab.pods.values() if q.node == who})
                out.append({"token": token, "serviceAccount": self.NODE_ACCOUNT, "identities": ids})
            else:
                out.append({"token": token, "serviceAccount": f"{who.namespace}/{who.service_account}"})
        return out

    def write(self) -> None:
        """Write the fake's file (atomically); when it runs, wait until it loaded this version."""
        doc = {**self.lab.config(), "policies": list(self.policies), "callers": self.callers()}
        if self.malformed:
            doc["malformed"] = list(self.malformed)
        loaded = self._loaded()
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.config_path)  # atomic: the fake never reads half a file
        if self.proc is not None and self.proc.poll() is None:
            self._wait(lambda: self._loaded() > loaded, "took the new config")

    def _events(self) -> list[dict]:
        import json

        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def _loaded(self) -> int:
        return sum(e["event"] in ("config", "config-error") for e in self._events())

    def _wait(self, cond, what: str) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT
        while not cond():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake istiod never {what}:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    # -- the process -----------------------------------------------------------------------
    def start(self) -> None:
        self.write()
        listening = sum(e["event"] == "listening" for e in self._events())
        loaded = self._loaded()
        out = open(self.log_path, "ab")
        self.proc = self.lab.topology.popen(
            self.pod.pod, [sys.executable, "-m", "ztunnel_fast.fakes.istiod", "--pki", str(self.pki.directory),
                           "--config", str(self.config_path), "--listen", self.address,
                           "--record", str(self.record_path)],
            stdout=out, stderr=out)
        out.close()
        self._wait(lambda: sum(e["event"] == "listening" for e in self._events()) > listening
                   and self._loaded() > loaded, "listened and loaded its config")

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.topology.stop(self.proc)

    def requests(self) -> list[dict]:
        """The xDS requests received (every run of the fake)."""
        return [e for e in self._events() if e["event"] == "request"]

    def ca_requests(self) -> list[dict]:
        """The CA requests received: fakes.ca_server.RecordedRequest as dicts."""
        import json

        if not self.record_path.exists():
            return []
        return [json.loads(line) for line in self.record_path.read_text().splitlines() if line]

    def exempt(self, p: LabPod) -> None:
        """As in a cluster, ztunnel's own connection to istiod is not captured: exempt it from the
        pod's outbound redirect (start_ztunnel appends the REDIRECT after this rule)."""
        netns.iptables(p.pod, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", self.pod.ip,
                       "--dport", str(self.PORT), "-j", "RETURN")

    def token_of(self, p: LabPod) -> str:
        """The bearer token of the ztunnel serving `p` (see token_for)."""
        return f"{self.token}.{p.name}"

    def token_for(self, p: LabPod, *, shared: bool = False) -> Path:
        """The bearer token file of the ztunnel serving `p` (registered with the CA)."""
        token = self.token_of(p)
        self._callers[token] = ("node", p.node) if shared else ("pod", p)
        self.tokens_dir.mkdir(exist_ok=True)
        path = self.tokens_dir / p.name
        path.write_text(token + "\n")
        if self.proc is not None and self.proc.poll() is None:
            self.write()
        return path

    def env(self, p: LabPod, *, shared: bool = False, **extra: str) -> dict[str, str]:
        """ztunnel's variables for a ztunnel-fast serving `p` (or, `shared`, `p`'s node) from this
        istiod: workloads over xDS and certificates from its CA, both verified with `root`."""
        return {
            "LOCAL_XDS_PATH": "",  # no local file: xDS is the source
            "LOCAL_CA_DIR": "",  # no local CA: istiod's CA signs
            "XDS_ADDRESS": self.address,  # scheme optional: https:// assumed
            "ALT_XDS_HOSTNAME": self.server_name,
            "XDS_ROOT_CA": str(self.root),
            "CA_ADDRESS": self.address,
            "ALT_CA_HOSTNAME": self.server_name,
            "CA_ROOT_CA": str(self.root),
            "AUTH_TOKEN": str(self.token_for(p, shared=shared)),
            "POD_NAME": f"ztunnel-{p.name}",
            "POD_NAMESPACE": "istio-system",
            "INSTANCE_IP": p.ip,
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
            **extra,
        }
