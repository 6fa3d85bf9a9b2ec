"""A test double of the kubelet for one pod of a rendered DaemonSet: what the manifest says is
what runs.

Role: `plan_pod` (pure) turns the pod template of a DaemonSet rendered by Helm plus the node's
facts into a LaunchPlan: the container's argv (image entry point + `args`), its environment
(image ENV, then `env` with the downward API and `resourceFieldRef` resolved as the kubelet
does), its mounts (each volume materialised by the caller: token, ConfigMaps, hostPath, emptyDir
as tmpfs), the capability set, the user and group, the read-only root and the readiness probe.
`prepare` writes the script that runs it in the pod's network namespace: a private mount namespace where the
root file system is read-only, /run is an empty tmpfs holding the mount points (as an image's
/var/run would), each volume is bind-mounted at its mountPath, /etc/hosts and /etc/resolv.conf are the kubelet's files,
/tmp is the emptyDir; then setpriv keeps exactly the container's capabilities and group.
`probe` performs the manifest's readiness probe against the pod IP.

Invariants:
- Nothing outside the private mount namespace changes: the host's / and /run are never written.
- Every env entry of the container is resolved or refused (KubeletError names it): an unknown
  fieldRef or resource fails instead of being dropped.
- Values the kubelet would derive (pod IP, node name, CPU count) come from PodFacts only.
"""

from __future__ import annotations

import math
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["KubeletError", "LaunchPlan", "Mount", "PodFacts", "plan_pod", "prepare", "probe", "setup_script"]


class KubeletError(ValueError):
    pass


@dataclass(frozen=True)
class PodFacts:
    """What the API server and the node know about the pod (downward API sources)."""

    name: str
    namespace: str
    node_name: str
    pod_ip: str
    node_cpus: int = 2  # limits.cpu of a container without a CPU limit = node allocatable


@dataclass(frozen=True)
class Mount:
    target: str  # mountPath in the container
    source: Path | None  # host directory/file; None = an empty tmpfs (emptyDir)
    read_only: bool = False


@dataclass(frozen=True)
class LaunchPlan:
    argv: tuple[str, ...]
    env: Mapping[str, str]
    mounts: tuple[Mount, ...]
    capabilities: tuple[str, ...]  # kept; every other capability is dropped
    run_as_user: int
    run_as_group: int | None
    read_only_root: bool
    host_network: bool
    readiness: tuple[int, str]  # (port, path) of the httpGet readiness probe
    hosts: Mapping[str, str] = field(default_factory=dict)  # /etc/hosts entries: name -> IP


# ------------------------------------------------------------------------------------ pure part


def _cpu_cores(quantity: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", str(quantity).strip())
    if match is None:
        raise KubeletError(f"CPU quantity {quantity!r} is not supported by this kubelet double")
    return float(match.group(1)) / (1000 if match.group(2) else 1)


def _resolve_env(entry: dict, pod_spec: dict, container: dict, facts: PodFacts) -> str:
    if "value" in entry:
        return str(entry["value"])
    source = entry.get("valueFrom") or {}
    if "fieldRef" in source:
        path = source["fieldRef"]["fieldPath"]
        fields = {
            "metadata.name": facts.name,
            "metadata.namespace": facts.namespace,
            "spec.nodeName": facts.node_name,
            "status.podIP": facts.pod_ip,
            "spec.serviceAccountName": pod_spec.get("serviceAccountName", "default"),
        }
        if path not in fields:
            raise KubeletError(f"env {entry['name']}: fieldRef {path} is not supported")
        return fields[path]
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        if ref.get("resource") != "limits.cpu":
            raise KubeletError(f"env {entry['name']}: resourceFieldRef {ref.get('resource')} is not supported")
        limit = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
        cores = _cpu_cores(limit) if limit is not None else float(facts.node_cpus)
        # The kubelet divides by the divisor and rounds up (1500m with divisor 1 -> "2").
        return str(math.ceil(cores / _cpu_cores(ref.get("divisor", "1"))))
    raise KubeletError(f"env {entry['name']}: neither value nor a supported valueFrom")


def plan_pod(daemonset: dict, facts: PodFacts, volumes: Mapping[str, Path | None], *,
             entrypoint: Sequence[str], image_env: Mapping[str, str] = (),
             hosts: Mapping[str, str] | None = None, container_name: str = "istio-proxy") -> LaunchPlan:
    """The plan for the pod of `daemonset` on the node `facts` describes.  `volumes` maps each
    volume name to the host path holding its materialised content (None: a tmpfs)."""
    pod_spec = daemonset["spec"]["template"]["spec"]
    (container,) = [c for c in pod_spec["containers"] if c["name"] == container_name]
    env = dict(image_env)
    for entry in container.get("env", []):
        env[entry["name"]] = _resolve_env(entry, pod_spec, container, facts)
    declared = {v["name"] for v in pod_spec.get("volumes", [])}
    mounts = []
    for m in container.get("volumeMounts", []):
        if m["name"] not in declared:
            raise KubeletError(f"volumeMount {m['name']} names no volume of the pod")
        if m["name"] not in volumes:
            raise KubeletError(f"volume {m['name']} was not materialised")
        mounts.append(Mount(m["mountPath"], volumes[m["name"]], bool(m.get("readOnly", False))))
    sc = container.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    if "ALL" not in caps.get("drop", []):
        raise KubeletError("only containers that drop ALL capabilities are supported")
    probe_get = container["readinessProbe"]["httpGet"]
    return LaunchPlan(
        argv=tuple(entrypoint) + tuple(container.get("command", ())) + tuple(container.get("args", ())),
        env=env,
        mounts=tuple(mounts),
        capabilities=tuple(caps.get("add", [])),
        run_as_user=int(sc.get("runAsUser", 0)),
        run_as_group=sc.get("runAsGroup"),
        read_only_root=bool(sc.get("readOnlyRootFilesystem", False)),
        host_network=bool(pod_spec.get("hostNetwork", False)),
        readiness=(int(probe_get["port"]), probe_get.get("path", "/")),
        hosts=dict(hosts or {}),
    )


def setup_script(plan: LaunchPlan, hosts_file: Path | None, resolv_file: Path | None = None,
                 image_paths: tuple[Path, ...] = ()) -> str:
    """The shell run in the pod's private mount namespace before exec (pure; tested as text).

    `image_paths` are host directories that stand for the image's own files (the checkout and its
    venv): they stay visible, read-only, even when they lie under an emptyDir target such as /tmp
    (a checkout under /tmp would otherwise vanish under the emptyDir's tmpfs)."""
    q = shlex.quote
    lines = ["set -e", "mount -t tmpfs -o mode=0755 tmpfs /run"]
    # Park each image path under /run before anything covers it; re-bound after the emptyDirs.
    parked = []
    for i, path in enumerate(image_paths):
        stage = f"/run/.image/{i}"
        lines += [f"mkdir -p {stage}", f"mount --bind {q(str(path))} {stage}"]
        parked.append((stage, str(path)))
    tmp_mounts = []
    for m in plan.mounts:
        target = m.target.replace("/var/run/", "/run/", 1) if m.target.startswith("/var/run/") else m.target
        if m.source is None:
            tmp_mounts.append(target)
            continue
        if target.startswith("/run/"):
            kind = "-d" if m.source.is_dir() else "-f"
            lines.append(f"mkdir -p {q(target)}" if kind == "-d" else
                         f"mkdir -p {q(str(Path(target).parent))} && touch {q(target)}")
        lines.append(f"mount --bind {q(str(m.source))} {q(target)}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {q(target)}")
    if hosts_file is not None:
        lines.append(f"mount --bind {q(str(hosts_file))} /etc/hosts")
    if resolv_file is not None:
        lines.append(f"mount --bind {q(str(resolv_file))} /etc/resolv.conf")
    if plan.read_only_root:
        lines += ["mount -o remount,bind,ro /", "mount -o remount,ro /run"]
    for target in tmp_mounts:  # last: the sources above may live under /tmp
        lines.append(f"mount -t tmpfs -o mode=1777 tmpfs {q(target)}")
    for stage, path in parked:
        if any(path == t or path.startswith(t.rstrip("/") + "/") for t in tmp_mounts):
            lines += [f"mkdir -p {q(path)}", f"mount --bind {stage} {q(path)}",
                      f"mount -o remount,bind,ro {q(path)}"]
    lines.append("cd /")
    keep = ",".join(["-all"] + [f"+{c.lower()}" for c in plan.capabilities])
    setpriv = ["setpriv", f"--bounding-set={keep}", "--inh-caps=-all"]
    if plan.run_as_group is not None:
        setpriv += [f"--regid={plan.run_as_group}", "--clear-groups"]
    setpriv += [f"--reuid={plan.run_as_user}", "--"]
    env = ["env", "-i"] + [f"{k}={v}" for k, v in plan.env.items()]
    lines.append("exec " + " ".join(q(a) for a in setpriv + env + list(plan.argv)))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ I/O


def prepare(plan: LaunchPlan, workdir: Path, image_paths: tuple[Path, ...] = ()) -> list[str]:
    """Write the pod's /etc/hosts and setup script into `workdir`; returns the argv that starts
    the container when run inside the pod's network namespace (`ip netns exec POD ...`).  The
    container's process keeps the PID of that argv (every step execs)."""
    hosts_file = resolv_file = None
    if plan.hosts:
        hosts_file = workdir / "etc-hosts"
        hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n"
                              + "".join(f"{ip} {name}\n" for name, ip in plan.hosts.items()))
        # The kubelet writes each pod's resolv.conf too (cluster DNS).  This double has no DNS
        # server: names come from /etc/hosts, and with no nameserver line resolvers ask
        # 127.0.0.1:53, refused at once, instead of waiting out the host's unreachable resolver
        # for the lookups /etc/hosts cannot answer (AAAA, gRPC's TXT service config).
        resolv_file = workdir / "etc-resolv.conf"
        resolv_file.write_text("# kubelet double: no cluster DNS server; names resolve from /etc/hosts\n")
    script = workdir / "container-setup.sh"
    script.write_text(setup_script(plan, hosts_file, resolv_file, image_paths))
    return ["unshare", "--mount", "--propagation", "private", "sh", str(script)]


def probe(plan: LaunchPlan, netns: str, pod_ip: str, timeout: float = 2.0) -> int:
    """The readiness probe: the HTTP status of GET http://<pod IP>:<port><path> (0: no answer)."""
    port, path = plan.readiness
    cp = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                         "--max-time", str(timeout), f"http://{pod_ip}:{port}{path}"],
                        capture_output=True, text=True, timeout=timeout + 10)
    return int(cp.stdout or 0)
