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


def test_rendered_pod_boots_against_istiod(lab, engine):
    topology = lab.topology
    istiod = lab.pod("istiod", namespace="istio-system", ip=ISTIOD_IP, workload=False)
    pod = lab.pod("ztunnel-abcde", namespace="istio-system", node="node1", ip=ZTUNNEL_IP, workload=False)

    # istiod: the fake CA, which lets this pod's token impersonate w1 ("a pod on its node").
    pki = FakePki.create(lab.workdir / "istiod-pki")
    record = lab.workdir / "ca-requests.jsonl"
    ca_log = lab.workdir / "istiod-ca.log"
    with open(ca_log, "wb") as out:
        ca = topology.popen(istiod.pod, [
            sys.executable, "-m", "ztunnel_fast.fakes.ca_server", "--pki", str(pki.directory),
            "--listen", "0.0.0.0:15012", "--record", str(record),
            "--caller", f"{TOKEN},istio-system/ztunnel,{W1_ID}",
        ], stdout=out, stderr=subprocess.STDOUT)
    wait(lambda: "listening on" in ca_log.read_text(), "fake CA listening", proc=ca)

    # The manifest: default values plus the local config as a ConfigMap volume.
    values = {
        "engine": engine,
        "env": {"LOCAL_XDS_PATH": "/var/run/ztunnel-fast/config.yaml"},
        "volumes": [{"name": "local-config", "configMap": {"name": "ztunnel-local-config"}}],
        "volumeMounts": [{"name": "local-config", "mountPath": "/var/run/ztunnel-fast", "readOnly": True}],
    }
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="ztunnel", namespace="istio-system")
    daemonset = yaml.safe_load(rendered["ztunnel-fast/templates/daemonset.yaml"])

    # The kubelet materialises the volumes.
    volumes = {}
    for name, files in {
        "istio-token": {"istio-token": TOKEN},  # projected serviceAccountToken, path istio-token
        "istiod-ca-cert": {"root-cert.pem": pki.root_path.read_text()},  # ConfigMap istio-ca-root-cert
        "cni-ztunnel-sock-dir": {},  # hostPath /var/run/ztunnel (a directory of the test here)
        "local-config": {"config.yaml": yaml.safe_dump({"workloads": [{
            "uid": "Kubernetes//Pod/demo/w1", "name": "w1", "namespace": "demo", "serviceAccount": "s1",
            "workloadIps": ["198.18.0.11"], "protocol": "HBONE", "node": "node1"}]})},
    }.items():
        directory = lab.workdir / "volumes" / name
        directory.mkdir(parents=True)
        for filename, content in files.items():
            (directory / filename).write_text(content)
        volumes[name] = directory
    volumes["tmp"] = None  # emptyDir

    facts = PodFacts(name="ztunnel-abcde", namespace="istio-system", node_name="node1", pod_ip=ZTUNNEL_IP,
                     node_cpus=8)
    plan = plan_pod(daemonset, facts, volumes, entrypoint=["ztunnel-fast"], image_env=image_env(),
                    hosts={ISTIOD_NAME: ISTIOD_IP})
    assert plan.argv == ("ztunnel-fast", "run")
    assert plan.env["CA_ADDRESS"] == f"{ISTIOD_NAME}:15012" and plan.env["ZTUNNEL_CPU_LIMIT"] == "8"
    log_path = lab.workdir / "ztunnel-pod.log"
    with open(log_path, "wb") as out:
        proc = topology.popen(pod.pod, prepare(plan, lab.workdir), stdout=out, stderr=subprocess.STDOUT)

    wait(lambda: probe(plan, pod.pod.netns, ZTUNNEL_IP) == 200,
         f"readiness probe never 200:\n{log_path.read_text()}", proc=proc)

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
