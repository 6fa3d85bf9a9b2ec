"""The chart's pod boots: the DaemonSet rendered by Helm, played by the kubelet double
(fakes/kubelet.py) in a network namespace, against the fake istiod (fakes/istiod.py: xDS and CA on
one port) and, in in-pod mode, the istio-cni double (fakes/cni.py).

What runs is exactly the manifest: the image's entry point with the container's args, the env as
rendered (downward API and CPU limit filled in as the kubelet does), the token and root-cert
volumes at their mount paths, the kubelet's /etc/hosts resolving istiod.istio-system.svc, a
read-only root with /tmp as the only writable place, only NET_ADMIN/SYS_ADMIN/NET_RAW, uid 0 and
gid 1337.  Nothing is added to the values: workloads come over xDS from the rendered XDS_ADDRESS,
certificates from the rendered CA_ADDRESS, both verified with the mounted istio-ca-root-cert (the
fake's one root), with the mounted token.  Passing means the manifest's readiness probe answers
200 (state synced over xDS, certificates fetched, and in-pod: the handed-over pods' proxies up).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from ztunnel_fast.demo.lab import LabIstiod
from ztunnel_fast.fakes.cni import FakeCni, install_inpod_rules
from ztunnel_fast.fakes.istiod import ISTIOD_NAME
from ztunnel_fast.fakes.kubelet import PodFacts, plan_pod, prepare, probe

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ztunnel-fast"
ISTIOD_IP, ZTUNNEL_IP = "198.18.0.5", "198.18.0.9"
W1_IP, SLEEP_IP = "198.18.0.11", "198.18.0.12"
W1_ID = "spiffe://cluster.local/ns/demo/sa/s1"
MiB = 1024 * 1024
WAIT = 60.0  # seconds: bound of every wait loop (never a pass condition)
# Capability bits (linux/capability.h): what the securityContext adds, nothing else.
CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN = 12, 13, 21


# This checkout and its venv stand for the image's files; they stay visible in the pod even when
# the checkout lies under /tmp, which the pod's emptyDir covers.
IMAGE_PATHS = tuple(dict.fromkeys(p for p in (ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())))


def image_env() -> dict[str, str]:
    """The Containerfile's runtime ENV, with its venv path pointing at this checkout's venv."""
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    runtime = text[text.rindex("\nFROM "):]
    env = {}
    for line in runtime.splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, _, value = pair.partition("=")
                env[key] = value
    env["PATH"] = env["PATH"].replace("/opt/ztunnel-fast/bin", str(Path(sys.executable).parent))
    return env


def wait(cond, what: str, proc=None) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}: {what}")
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def status_bits(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(key)


def start_istiod(lab) -> LabIstiod:
    """The fake istiod at ISTIOD_IP (what the kubelet's /etc/hosts says istiod.istio-system.svc
    is), the Lab's control plane: every pod of the Lab is a workload it serves over xDS."""
    istiod = lab.attach(LabIstiod(lab, ip=ISTIOD_IP))
    istiod.start()
    return istiod


@pytest.fixture
def cni_dir():
    """The node's /var/run/ztunnel (hostPath cni-ztunnel-sock-dir): a short path, because a unix
    socket path is limited to 108 bytes.  Removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ztf-cni-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def boot_pod(lab, pod, values: dict, facts: PodFacts, *, token: str, root_pem: str, ready: bool = True,
             cni_dir: Path | None = None):
    """Render the chart, materialise the pod's volumes (`cni_dir`: the host's /var/run/ztunnel,
    where istio-cni listens), run the container as the kubelet would (and, with `ready`, wait for
    its readiness probe).  Returns (plan, process, log path)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="ztunnel", namespace="istio-system")
    daemonset = yaml.safe_load(rendered["ztunnel-fast/templates/daemonset.yaml"])
    volumes = {}
    for name, files in {
        "istio-token": {"istio-token": token},  # projected serviceAccountToken, path istio-token
        "istiod-ca-cert": {"root-cert.pem": root_pem},  # ConfigMap istio-ca-root-cert
        "cni-ztunnel-sock-dir": {},  # hostPath /var/run/ztunnel (a directory of the test here)
        "xtables-lock": {"xtables.lock": ""},  # hostPath file /run/xtables.lock (node redirection)
    }.items():
        directory = lab.workdir / "volumes" / facts.name / name
        directory.mkdir(parents=True)
        for filename, content in files.items():
            (directory / filename).write_text(content)
        volumes[name] = directory / "xtables.lock" if name == "xtables-lock" else directory
    if cni_dir is not None:
        volumes["cni-ztunnel-sock-dir"] = cni_dir
    volumes["tmp"] = None  # emptyDir
    plan = plan_pod(daemonset, facts, volumes, entrypoint=["ztunnel-fast"], image_env=image_env(),
                    hosts={ISTIOD_NAME: ISTIOD_IP})
    assert plan.argv == ("ztunnel-fast", "run")
    assert plan.env["XDS_ADDRESS"] == plan.env["CA_ADDRESS"] == f"{ISTIOD_NAME}:15012"
    assert not any(k.startswith("LOCAL_") for k in plan.env), plan.env
    workdir = lab.workdir / "pods" / facts.name
    workdir.mkdir(parents=True)
    log_path = workdir / "container.log"
    with open(log_path, "wb") as out:
        proc = lab.topology.popen(pod.pod, prepare(plan, workdir, image_paths=IMAGE_PATHS), stdout=out, stderr=subprocess.STDOUT)
    if ready:
        wait_ready(plan, pod, facts, proc, log_path)
    return plan, proc, log_path


def wait_ready(plan, pod, facts: PodFacts, proc, log_path: Path) -> None:
    wait(lambda: probe(plan, pod.pod.netns, facts.pod_ip) == 200,
         f"readiness probe never 200:\n{log_path.read_text()}", proc=proc)


def wait_xds_acked(istiod: LabIstiod, facts: PodFacts, proc) -> None:
    """Until the pod's stream ACKed the Address response (its workloads are applied)."""
    node_id = f"ztunnel~{facts.pod_ip}~{facts.name}.{facts.namespace}~{facts.namespace}.svc.cluster.local"

    def acked() -> bool:
        reqs = istiod.requests()
        streams = {r["stream"] for r in reqs if r["node"] and r["node"]["id"] == node_id}
        return any(r["stream"] in streams and r["nonce"] and not r["nack"]
                   and r["typeUrl"] == "type.googleapis.com/istio.workload.Address" for r in reqs)

    wait(acked, "the pod's xDS stream never ACKed the workloads", proc=proc)


def config_dump(lab, pod) -> dict:
    status, body = lab.http(pod, "http://127.0.0.1:15000/config_dump")
    assert status == 200
    return json.loads(body)


def wait_certificates(lab, pod, identities: set[str], proc=None) -> None:
    """Until the ztunnel-fast in `pod` holds certificates for exactly `identities`.  Readiness does
    not wait for certificates of workloads learnt after the start (as ztunnel's does not): they
    are prefetched from istiod's CA right away."""
    def available() -> set[str]:
        return {c["identity"] for c in config_dump(lab, pod)["certificates"] if c["state"] == "Available"}

    wait(lambda: available() == identities, f"certificates for {identities}", proc=proc)


def assert_xds_node(istiod: LabIstiod, facts: PodFacts, token: str) -> None:
    """istiod saw the downward-API values in the node id and metadata, the token and clusterid."""
    node_id = f"ztunnel~{facts.pod_ip}~{facts.name}.{facts.namespace}~{facts.namespace}.svc.cluster.local"
    opening = [r for r in istiod.requests() if not r["nonce"] and r["node"] and r["node"]["id"] == node_id]
    assert {r["typeUrl"] for r in opening} == {"type.googleapis.com/istio.workload.Address",
                                               "type.googleapis.com/istio.security.Authorization"}, \
        [r["node"] for r in istiod.requests() if r["node"]]
    for r in opening:
        md = r["node"]["metadata"]
        assert (md["NAME"], md["NAMESPACE"], md["NODE_NAME"]) == (facts.name, facts.namespace, facts.node_name)
        assert md["INSTANCE_IPS"] == facts.pod_ip and md["CLUSTER_ID"] == "Kubernetes"
        assert r["metadata"]["authorization"] == f"Bearer {token}" and r["metadata"]["clusterid"] == "Kubernetes"
    assert not [r for r in istiod.requests() if r["nack"]]


def assert_impersonated(istiod: LabIstiod, identity: str, token: str) -> None:
    requests = istiod.ca_requests()
    assert any(r["impersonated"] == identity and r["issued"] == identity and r["status"] == "OK"
               and r["metadata"]["authorization"] == f"Bearer {token}"
               and r["metadata"]["clusterid"] == "Kubernetes" for r in requests), requests


def test_rendered_pod_boots_against_istiod(lab, engine, cni_dir):
    """Default values (redirection: inpod): istio-cni listens on the cni-ztunnel-sock-dir volume's
    ztunnel.sock and hands over w1's network namespace (its in-pod rules installed), then the
    snapshot.  A dedicated ztunnel-fast in `sleep` (same fake istiod) reaches w1 over HBONE."""
    topology = lab.topology
    istiod = start_istiod(lab)
    pod = lab.pod("ztunnel-abcde", namespace="istio-system", node="node1", ip=ZTUNNEL_IP, workload=False)
    w1 = lab.pod("w1", namespace="demo", service_account="s1", node="node1", ip=W1_IP)
    sleep = lab.pod("sleep", namespace="demo", node="node2", ip=SLEEP_IP)
    lab.write_config()  # an xDS push: w1 and sleep exist
    install_inpod_rules(w1.pod.netns)
    lab.app(w1, "serve", "9000", "echo", port=9000)
    # The pod's projected token is the one istiod's CA knows as istio-system/ztunnel on node1.
    token = istiod.token_for(pod, shared=True).read_text().strip()
    facts = PodFacts(name="ztunnel-abcde", namespace="istio-system", node_name="node1", pod_ip=ZTUNNEL_IP,
                     node_cpus=8)
    with FakeCni(cni_dir / "ztunnel.sock") as cni:
        plan, proc, log_path = boot_pod(lab, pod, {"engine": engine}, facts, token=token,
                                        root_pem=istiod.root.read_text(), ready=False, cni_dir=cni_dir)
        assert plan.env["INPOD_ENABLED"] == "true" and plan.env["ZTUNNEL_CPU_LIMIT"] == "8"
        assert cni.accept() == 1
        wait_xds_acked(istiod, facts, proc)  # istio-cni hands over pods ztunnel already knows
        assert cni.add("Kubernetes//Pod/demo/w1", w1.pod.netns, "w1", "demo", "s1") == ""
        assert cni.snapshot_sent() == ""
        wait_ready(plan, pod, facts, proc, log_path)

        assert_xds_node(istiod, facts, token)

        wait_certificates(lab, pod, {W1_ID}, proc=proc)
        assert_impersonated(istiod, W1_ID, token)
        dump = config_dump(lab, pod)
        assert dump["workloadState"]["Kubernetes//Pod/demo/w1"]["state"] == "Up", dump["workloadState"]
        assert {w["uid"] for w in dump["workloads"]} >= {"Kubernetes//Pod/demo/w1", "Kubernetes//Pod/demo/sleep"}
        log = log_path.read_text()
        assert f"engine={engine}" in log, log

        # Traffic: sleep's own ztunnel-fast (dedicated, same istiod) to w1 over HBONE, into the
        # chart pod's proxy inside w1's namespace.
        istiod.exempt(sleep)
        lab.start_ztunnel(sleep)
        out = lab.client(sleep, "echo", w1.ip, "9000", "--size", str(MiB))
        assert out["ok"] and out["received"] == MiB and out["received_sha256"] == out["sent_sha256"], out
        log = log_path.read_text()
        assert any("spiffe://cluster.local/ns/demo/sa/sleep" in line
                   for line in log.splitlines() if f"got CONNECT request to {w1.ip}:9000" in line), log

        # The process runs as the securityContext says.
        pid = proc.pid
        caps = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_SYS_ADMIN)
        assert status_bits(pid, "CapEff") == caps
        assert status_bits(pid, "CapBnd") == caps
        uids = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[:4]
        gids = Path(f"/proc/{pid}/status").read_text().split("Gid:")[1].split()[:4]
        assert uids == ["0"] * 4 and gids == ["1337"] * 4
        mounts = {line.split()[4]: line.split()[5] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()}
        assert mounts["/"].startswith("ro")
        assert mounts["/tmp"].startswith("rw")
        assert mounts["/run/secrets/tokens"].startswith("rw") and mounts["/run/ztunnel"].startswith("rw")
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")

        assert topology.stop(proc) == 0, log_path.read_text()


NODE_A, NODE_B = "198.18.0.10", "198.18.0.20"


def sa_id(name: str) -> str:
    return f"spiffe://cluster.local/ns/ambient-demo/sa/{name}"


def test_node_redirection_pod_carries_traffic(lab, engine):
    """`redirection: node`: the rendered pod runs in node-a's network (hostNetwork), installs the
    node rules itself and fills ztunnel-pods-ips from its workloads; node-b runs a plain shared
    ztunnel-fast with ZTUNNEL_REDIRECTION=node.  Both take workloads over xDS and certificates from
    the fake istiod.
    A pod on node-a reaches a pod on node-b through both, over HBONE, payload hash-checked."""
    istiod = start_istiod(lab)
    a = lab.node("node-a", NODE_A, "198.18.1.0/24")
    b = lab.node("node-b", NODE_B, "198.18.2.0/24")
    sleep = lab.node_pod(a, "sleep", "198.18.1.2", namespace="ambient-demo")
    web = lab.node_pod(b, "web", "198.18.2.2", namespace="ambient-demo")
    lab.write_config()  # an xDS push
    lab.app(web, "serve", "80", "whoami", "--name", "web", port=80)
    lab.app(web, "serve", "9000", "echo", port=9000)

    # node-b: a plain shared ztunnel-fast, on the same fake istiod (Lab.attach: xDS + CA).
    zb = lab.start_ztunnel(b, shared=True, redirect=False, ZTUNNEL_REDIRECTION="node")

    token = istiod.token_for(a, shared=True).read_text().strip()
    facts = PodFacts(name="ztunnel-node-a", namespace="istio-system", node_name="node-a", pod_ip=NODE_A)
    plan, proc, log_path = boot_pod(lab, a, {"engine": engine, "redirection": "node"}, facts, token=token,
                                    root_pem=istiod.root.read_text())
    assert plan.host_network and plan.env["ZTUNNEL_REDIRECTION"] == "node"
    assert "INPOD_ENABLED" not in plan.env
    assert_xds_node(istiod, facts, token)
    wait_certificates(lab, a, {sa_id("sleep")}, proc=proc)
    wait(lambda: lab.http(b, "http://127.0.0.1:15021/healthz/ready")[0] == 200, "node-b ready", proc=zb.proc)
    wait_certificates(lab, b, {sa_id("web")}, proc=zb.proc)

    members = lab.topology.run(a.pod, ["ipset", "save", "ztunnel-pods-ips"]).stdout
    assert f"add ztunnel-pods-ips {sleep.ip}" in members and web.ip not in members

    name, peer = lab.client(sleep, "whoami", web.ip, "80", "--count", "1")["names"][0].split()
    assert (name, peer) == ("web", sleep.ip)
    out = lab.client(sleep, "echo", web.ip, "9000", "--size", str(1 << 20))
    assert out["ok"] and out["received_sha256"] == out["sent_sha256"], out
    log = log_path.read_text()
    assert f"proxy to {web.ip}:80 using HBONE via {web.ip}:15008" in log, log
    assert any(f"peer_id={sa_id('sleep')}" in line for line in zb.lines(f"got CONNECT request to {web.ip}:80"))

    assert_impersonated(istiod, sa_id("sleep"), token)
    assert_impersonated(istiod, sa_id("web"), istiod.token_of(b))
    assert lab.topology.stop(proc) == 0, log_path.read_text()
