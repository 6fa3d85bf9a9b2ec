"""The chart's pod boots: the DaemonSet rendered by Helm, played by the kubelet double
(fakes/kubelet.py) in a network namespace, against the fake istiod CA.

What runs is exactly the manifest: the image's entry point with the container's args, the env as
rendered (downward API and CPU limit filled in as the kubelet does), the token and root-cert
volumes at their mount paths, the kubelet's /etc/hosts resolving istiod.istio-system.svc, a
read-only root with /tmp as the only writable place, only NET_ADMIN/SYS_ADMIN/NET_RAW, uid 0 and
gid 1337.  The workloads come from a ConfigMap volume named by values (`env.LOCAL_XDS_PATH`,
`volumes`, `volumeMounts`) until the xDS client lands; certificates come from the CA at the
rendered CA_ADDRESS, with the mounted token, impersonating the node's workload.  Passing means the
manifest's readiness probe answers 200.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from ztunnel_fast.fakes.ca_server import ISTIOD_NAME, FakePki
from ztunnel_fast.fakes.kubelet import PodFacts, plan_pod, prepare, probe

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ztunnel-fast"
ISTIOD_IP, ZTUNNEL_IP = "198.18.0.5", "198.18.0.9"
W1_ID = "spiffe://cluster.local/ns/demo/sa/s1"
TOKEN = "tok-ztunnel-pod"
WAIT = 60.0  # seconds: bound of every wait loop (never a pass condition)
# Capability bits (linux/capability.h): what the securityContext adds, nothing else.
CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN = 12, 13, 21


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


def start_fake_ca(lab, istiod, callers: list[str]) -> tuple[FakePki, Path]:
    """The fake istiod CA in `istiod`'s namespace; returns (pki, request record)."""
    pki = FakePki.create(lab.workdir / "istiod-pki")
    record = lab.workdir / "ca-requests.jsonl"
    ca_log = lab.workdir / "istiod-ca.log"
    argv = [sys.executable, "-m", "ztunnel_fast.fakes.ca_server", "--pki", str(pki.directory),
            "--listen", "0.0.0.0:15012", "--record", str(record)]
    for caller in callers:
        argv += ["--caller", caller]
    with open(ca_log, "wb") as out:
        ca = lab.topology.popen(istiod.pod, argv, stdout=out, stderr=subprocess.STDOUT)
    wait(lambda: "listening on" in ca_log.read_text(), "fake CA listening", proc=ca)
    return pki, record


def chart_values(engine: str, **extra) -> dict:
    """The values under test plus the local config as a ConfigMap volume (until xDS lands)."""
    return {
        "engine": engine,
        "env": {"LOCAL_XDS_PATH": "/var/run/ztunnel-fast/config.yaml"},
        "volumes": [{"name": "local-config", "configMap": {"name": "ztunnel-local-config"}}],
        "volumeMounts": [{"name": "local-config", "mountPath": "/var/run/ztunnel-fast", "readOnly": True}],
        **extra,
    }


def boot_pod(lab, pod, values: dict, facts: PodFacts, *, token: str, root_pem: str, local_config: str):
    """Render the chart, materialise the pod's volumes, run the container as the kubelet would.
    Returns (plan, process, log path)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="ztunnel", namespace="istio-system")
    daemonset = yaml.safe_load(rendered["ztunnel-fast/templates/daemonset.yaml"])
    volumes = {}
    for name, files in {
        "istio-token": {"istio-token": token},  # projected serviceAccountToken, path istio-token
        "istiod-ca-cert": {"root-cert.pem": root_pem},  # ConfigMap istio-ca-root-cert
        "cni-ztunnel-sock-dir": {},  # hostPath /var/run/ztunnel (a directory of the test here)
        "local-config": {"config.yaml": local_config},
        "xtables-lock": {"xtables.lock": ""},  # hostPath file /run/xtables.lock (node redirection)
    }.items():
        directory = lab.workdir / "volumes" / facts.name / name
        directory.mkdir(parents=True)
        for filename, content in files.items():
            (directory / filename).write_text(content)
        volumes[name] = directory / "xtables.lock" if name == "xtables-lock" else directory
    volumes["tmp"] = None  # emptyDir
    plan = plan_pod(daemonset, facts, volumes, entrypoint=["ztunnel-fast"], image_env=image_env(),
                    hosts={ISTIOD_NAME: ISTIOD_IP})
    assert plan.argv == ("ztunnel-fast", "run")
    workdir = lab.workdir / "pods" / facts.name
    workdir.mkdir(parents=True)
    log_path = workdir / "container.log"
    with open(log_path, "wb") as out:
        proc = lab.topology.popen(pod.pod, prepare(plan, workdir), stdout=out, stderr=subprocess.STDOUT)
    wait(lambda: probe(plan, pod.pod.netns, facts.pod_ip) == 200,
         f"readiness probe never 200:\n{log_path.read_text()}", proc=proc)
    return plan, proc, log_path


def test_rendered_pod_boots_against_istiod(lab, engine):
    topology = lab.topology
    istiod = lab.pod("istiod", namespace="istio-system", ip=ISTIOD_IP, workload=False)
    pod = lab.pod("ztunnel-abcde", namespace="istio-system", node="node1", ip=ZTUNNEL_IP, workload=False)
    # The CA lets this pod's token impersonate w1 ("a pod on its node").
    pki, record = start_fake_ca(lab, istiod, [f"{TOKEN},istio-system/ztunnel,{W1_ID}"])
    local_config = yaml.safe_dump({"workloads": [{
        "uid": "Kubernetes//Pod/demo/w1", "name": "w1", "namespace": "demo", "serviceAccount": "s1",
        "workloadIps": ["198.18.0.11"], "protocol": "HBONE", "node": "node1"}]})
    facts = PodFacts(name="ztunnel-abcde", namespace="istio-system", node_name="node1", pod_ip=ZTUNNEL_IP,
                     node_cpus=8)
    plan, proc, log_path = boot_pod(lab, pod, chart_values(engine), facts, token=TOKEN,
                                    root_pem=pki.root_path.read_text(), local_config=local_config)
    assert plan.env["CA_ADDRESS"] == f"{ISTIOD_NAME}:15012" and plan.env["ZTUNNEL_CPU_LIMIT"] == "8"

    # The certificate came from the CA at the rendered address, with the mounted token.
    requests = [json.loads(line) for line in record.read_text().splitlines() if line]
    assert any(r["impersonated"] == W1_ID and r["status"] == "OK"
               and r["metadata"]["authorization"] == f"Bearer {TOKEN}"
               and r["metadata"]["clusterid"] == "Kubernetes" for r in requests), requests
    log = log_path.read_text()
    assert f"engine={engine}" in log, log

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
    assert mounts["/run/secrets/tokens"].startswith("rw") and mounts["/run/ztunnel-fast"].startswith("ro")
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")

    assert topology.stop(proc) == 0, log_path.read_text()


NODE_A, NODE_B = "198.18.0.10", "198.18.0.20"


def sa_id(name: str) -> str:
    return f"spiffe://cluster.local/ns/ambient-demo/sa/{name}"


def test_node_redirection_pod_carries_traffic(lab, engine):
    """`redirection: node`: the rendered pod runs in node-a's network (hostNetwork), installs the
    node rules itself and fills ztunnel-pods-ips from its workloads; node-b runs a plain shared
    ztunnel-fast with ZTUNNEL_REDIRECTION=node.  Both take certificates from the fake istiod CA.
    A pod on node-a reaches a pod on node-b through both, over HBONE, payload hash-checked."""
    istiod = lab.pod("istiod", namespace="istio-system", ip=ISTIOD_IP, workload=False)
    a = lab.node("node-a", NODE_A, "198.18.1.0/24")
    b = lab.node("node-b", NODE_B, "198.18.2.0/24")
    sleep = lab.node_pod(a, "sleep", "198.18.1.2", namespace="ambient-demo")
    web = lab.node_pod(b, "web", "198.18.2.2", namespace="ambient-demo")
    lab.write_config()
    pki, record = start_fake_ca(lab, istiod, [
        f"tok-node-a,istio-system/ztunnel,{sa_id('sleep')}",
        f"tok-node-b,istio-system/ztunnel,{sa_id('web')}",
    ])
    lab.app(web, "serve", "80", "whoami", "--name", "web", port=80)
    lab.app(web, "serve", "9000", "echo", port=9000)

    (lab.workdir / "token-node-b").write_text("tok-node-b\n")
    zb = lab.start_ztunnel(b, shared=True, redirect=False, ZTUNNEL_REDIRECTION="node", LOCAL_CA_DIR="",
                           CA_ADDRESS=f"{ISTIOD_IP}:15012", CA_ROOT_CA=str(pki.root_path),
                           ALT_CA_HOSTNAME=ISTIOD_NAME, AUTH_TOKEN=str(lab.workdir / "token-node-b"))

    facts = PodFacts(name="ztunnel-node-a", namespace="istio-system", node_name="node-a", pod_ip=NODE_A)
    plan, proc, log_path = boot_pod(lab, a, chart_values(engine, redirection="node"), facts, token="tok-node-a",
                                    root_pem=pki.root_path.read_text(), local_config=lab.config_path.read_text())
    assert plan.host_network and plan.env["ZTUNNEL_REDIRECTION"] == "node"
    assert "INPOD_ENABLED" not in plan.env

    members = lab.topology.run(a.pod, ["ipset", "save", "ztunnel-pods-ips"]).stdout
    assert f"add ztunnel-pods-ips {sleep.ip}" in members and web.ip not in members

    name, peer = lab.client(sleep, "whoami", web.ip, "80", "--count", "1")["names"][0].split()
    assert (name, peer) == ("web", sleep.ip)
    out = lab.client(sleep, "echo", web.ip, "9000", "--size", str(1 << 20))
    assert out["ok"] and out["received_sha256"] == out["sent_sha256"], out
    log = log_path.read_text()
    assert f"proxy to {web.ip}:80 using HBONE via {web.ip}:15008" in log, log
    assert any(f"peer_id={sa_id('sleep')}" in line for line in zb.lines(f"got CONNECT request to {web.ip}:80"))

    requests = [json.loads(line) for line in record.read_text().splitlines() if line]
    assert any(r["impersonated"] == sa_id("sleep") and r["metadata"]["authorization"] == "Bearer tok-node-a"
               and r["status"] == "OK" for r in requests), requests
    assert lab.topology.stop(proc) == 0, log_path.read_text()
