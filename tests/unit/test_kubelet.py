"""The kubelet double's pure part: a rendered pod template -> the launch plan and its setup script."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_chart import MATRIX, one, render
from ztunnel_fast.fakes.kubelet import KubeletError, PodFacts, plan_pod, setup_script

FACTS = PodFacts(name="ztunnel-x1", namespace="istio-system", node_name="node-a", pod_ip="10.0.0.9", node_cpus=12)
VOLUMES = {"istio-token": Path("/v/token"), "istiod-ca-cert": Path("/v/root"),
           "cni-ztunnel-sock-dir": Path("/v/sock"), "tmp": None}


def plan(values=None, volumes=VOLUMES, **kw):
    return plan_pod(one(render(values), "DaemonSet"), FACTS, volumes, entrypoint=["ztunnel-fast"], **kw)


def test_env_is_resolved_like_the_kubelet():
    p = plan(image_env={"PATH": "/opt/bin", "RUST_LOG": "overridden"})
    assert p.argv == ("ztunnel-fast", "run")
    assert p.env["PATH"] == "/opt/bin"
    assert p.env["RUST_LOG"] == "info"  # the container's env wins over the image's
    assert (p.env["POD_NAME"], p.env["POD_NAMESPACE"], p.env["NODE_NAME"], p.env["INSTANCE_IP"],
            p.env["SERVICE_ACCOUNT"]) == ("ztunnel-x1", "istio-system", "node-a", "10.0.0.9", "ztunnel")
    assert p.env["ZTUNNEL_CPU_LIMIT"] == "12"  # no limit: the node's CPUs


def test_cpu_limit_is_rounded_up():
    assert plan(MATRIX["limits"]).env["ZTUNNEL_CPU_LIMIT"] == "2"  # 1500m, divisor 1


def test_security_context_and_probe():
    p = plan()
    assert p.capabilities == ("NET_ADMIN", "SYS_ADMIN", "NET_RAW")
    assert (p.run_as_user, p.run_as_group, p.read_only_root, p.host_network) == (0, 1337, True, False)
    assert p.readiness == (15021, "/healthz/ready")
    assert plan({"redirection": "node"}, volumes={**VOLUMES, "xtables-lock": Path("/v/lock")}).host_network is True


def test_every_volume_must_be_materialised():
    with pytest.raises(KubeletError, match="volume tmp was not materialised"):
        plan(volumes={k: v for k, v in VOLUMES.items() if k != "tmp"})


def test_unknown_env_source_is_refused():
    ds = one(render(), "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}})
    with pytest.raises(KubeletError, match="HOST_IP: fieldRef status.hostIP"):
        plan_pod(ds, FACTS, VOLUMES, entrypoint=["ztunnel-fast"])


def test_setup_script_order():
    p = plan()
    lines = setup_script(p, Path("/w/hosts"), Path("/w/resolv")).splitlines()
    bind_tokens = lines.index("mount --bind /v/token /run/secrets/tokens")
    read_only = lines.index("mount -o remount,bind,ro /")
    tmp = lines.index("mount -t tmpfs -o mode=1777 tmpfs /tmp")
    assert lines[1] == "mount -t tmpfs -o mode=0755 tmpfs /run"
    assert bind_tokens < read_only < tmp  # sources under /tmp are bound before /tmp is covered
    assert "mount --bind /w/hosts /etc/hosts" in lines
    assert "mount --bind /w/resolv /etc/resolv.conf" in lines
    assert lines[-1].startswith("exec setpriv --bounding-set=-all,+net_admin,+sys_admin,+net_raw "
                                "--inh-caps=-all --regid=1337 --clear-groups --reuid=0 -- env -i ")
    assert lines[-1].endswith(" ztunnel-fast run")


def test_image_paths_under_an_empty_dir_stay_visible_read_only():
    # A checkout under /tmp (as a CI clone may be) is the image's files: the emptyDir on /tmp must
    # not hide it.  It is parked under /run first and bound back, read-only, after the tmpfs.
    lines = setup_script(plan(), None, None, (Path("/tmp/clone"), Path("/opt/py"))).splitlines()
    park = lines.index("mount --bind /tmp/clone /run/.image/0")
    tmp = lines.index("mount -t tmpfs -o mode=1777 tmpfs /tmp")
    back = lines.index("mount --bind /run/.image/0 /tmp/clone")
    assert park < lines.index("mount -o remount,bind,ro /") < tmp < back
    assert lines[back + 1] == "mount -o remount,bind,ro /tmp/clone"
    # a path no emptyDir covers is parked but needs no re-bind
    assert "mount --bind /run/.image/1 /opt/py" not in lines
