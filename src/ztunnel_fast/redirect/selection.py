"""Pod selection: which pods of a node are in the ambient mesh (pure), and the local inventory file
that feeds it.

The rule is the user guide's ("Pod selection logic for Ambient and Sidecar modes"):

1. namespaces in the istio-cni exclude list (``cni.values.excludeNamespaces``) are skipped;
2. a pod is ambient when
   - its namespace has the label ``istio.io/dataplane-mode=ambient``,
   - the pod has no ``sidecar.istio.io/status`` annotation (it has no sidecar), and
   - its ``ambient.istio.io/redirection`` annotation is not ``disabled``.

Only pods scheduled on the node in question count, and only their own IPs: a ``hostNetwork`` pod
shares the node's address and is never captured.  The same function will be fed from the
Kubernetes API later; today its input comes from a YAML file (all keys optional except names):

```yaml
excludeNamespaces: [kube-system, istio-system]
namespaces:
- name: ambient-demo
  labels: {istio.io/dataplane-mode: ambient}
pods:
- name: sleep
  namespace: ambient-demo
  node: node-a
  ip: 198.18.1.2            # or ips: [198.18.1.2, ...]
  annotations: {}            # e.g. {ambient.istio.io/redirection: disabled}
  hostNetwork: false
```

Invariants: the selection is a pure function of its inputs (no clock, no I/O); an invalid file
is refused whole with one message naming the file and the key, so a typo never empties the set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DATAPLANE_MODE_LABEL",
    "REDIRECTION_ANNOTATION",
    "SIDECAR_STATUS_ANNOTATION",
    "Inventory",
    "InventoryError",
    "Namespace",
    "PodInfo",
    "ambient_pod_ips",
    "ambient_reason",
    "load_inventory",
    "parse_inventory",
    "plan",
]

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_DISABLED = "disabled"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PodInfo:
    name: str
    namespace: str
    node: str
    ips: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False


@dataclass(frozen=True)
class Inventory:
    exclude_namespaces: tuple[str, ...]
    namespaces: tuple[Namespace, ...]
    pods: tuple[PodInfo, ...]


class InventoryError(ValueError):
    pass


# ------------------------------------------------------------------------------------ selection


def ambient_reason(namespace: Namespace | None, pod: PodInfo, exclude: Iterable[str]) -> str | None:
    """None when `pod` is ambient, else why not (for `status` and logs)."""
    if pod.namespace in set(exclude):
        return f"namespace {pod.namespace} is in the CNI exclude list"
    labels = namespace.labels if namespace is not None else {}
    if labels.get(DATAPLANE_MODE_LABEL) != DATAPLANE_MODE_AMBIENT:
        return f"namespace {pod.namespace} is not labelled {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}"
    if SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return f"pod has a sidecar ({SIDECAR_STATUS_ANNOTATION} annotation)"
    if pod.annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_DISABLED:
        return f"pod has {REDIRECTION_ANNOTATION}={REDIRECTION_DISABLED}"
    if pod.host_network:
        return "pod uses the host network"
    return None


def ambient_pod_ips(namespaces: Iterable[Namespace], pods: Iterable[PodInfo], node: str,
                    exclude: Iterable[str] = ()) -> set[str]:
    """The IPs of the ambient pods scheduled on `node`."""
    by_name = {ns.name: ns for ns in namespaces}
    exclude = frozenset(exclude)
    out: set[str] = set()
    for pod in pods:
        if pod.node == node and ambient_reason(by_name.get(pod.namespace), pod, exclude) is None:
            out.update(pod.ips)
    return out


def plan(current: Iterable[str], desired: Iterable[str]) -> tuple[list[str], list[str]]:
    """(to add, to remove), sorted by address: reconciling one member at a time."""
    cur, want = set(current), set(desired)
    key = ipaddress.ip_address
    return sorted(want - cur, key=key), sorted(cur - want, key=key)


# ------------------------------------------------------------------------------------ the file


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InventoryError(f"{where}: must be a mapping of strings")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise InventoryError(f"{where}: key {k!r} must be a string")
        if isinstance(v, bool):
            v = "true" if v else "false"  # YAML reads `true` as a boolean; Kubernetes has strings
        elif isinstance(v, (int, float)):
            v = str(v)
        elif v is None:
            v = ""
        if not isinstance(v, str):
            raise InventoryError(f"{where}.{k}: must be a string")
        out[k] = v
    return out


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InventoryError(f"{where}: a non-empty string is required")
    return value


def _list(doc: Mapping, key: str) -> list:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InventoryError(f"{key}: must be a list")
    return value


def parse_inventory(doc: Any) -> Inventory:
    """Validate the parsed YAML document; InventoryError names the first bad key."""
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise InventoryError("top level: must be a mapping with excludeNamespaces, namespaces, pods")
    unknown = set(doc) - {"excludeNamespaces", "namespaces", "pods"}
    if unknown:
        raise InventoryError(f"unknown key {min(unknown)!r} (expected excludeNamespaces, namespaces, pods)")
    exclude = tuple(_name(v, f"excludeNamespaces[{i}]") for i, v in enumerate(_list(doc, "excludeNamespaces")))
    namespaces = []
    seen: set[str] = set()
    for i, ns in enumerate(_list(doc, "namespaces")):
        where = f"namespaces[{i}]"
        if not isinstance(ns, Mapping):
            raise InventoryError(f"{where}: must be a mapping")
        name = _name(ns.get("name"), f"{where}.name")
        if name in seen:
            raise InventoryError(f"{where}.name: namespace {name} listed twice")
        seen.add(name)
        namespaces.append(Namespace(name, _str_map(ns.get("labels"), f"{where}.labels")))
    pods = []
    for i, pod in enumerate(_list(doc, "pods")):
        where = f"pods[{i}]"
        if not isinstance(pod, Mapping):
            raise InventoryError(f"{where}: must be a mapping")
        ips: list[tuple[str, Any]] = []  # (key for messages, value)
        if pod.get("ip") is not None:
            ips.append(("ip", pod["ip"]))
        if pod.get("ips") is not None:
            if not isinstance(pod["ips"], list):
                raise InventoryError(f"{where}.ips: must be a list")
            ips.extend((f"ips[{j}]", ip) for j, ip in enumerate(pod["ips"]))
        checked = []
        for key, ip in ips:
            try:
                checked.append(str(ipaddress.ip_address(str(ip))))
            except ValueError:
                raise InventoryError(f"{where}.{key}: invalid IP address {ip!r}") from None
        host_network = pod.get("hostNetwork", False)
        if not isinstance(host_network, bool):
            raise InventoryError(f"{where}.hostNetwork: must be true or false")
        pods.append(PodInfo(
            name=_name(pod.get("name"), f"{where}.name"),
            namespace=_name(pod.get("namespace"), f"{where}.namespace"),
            node=_name(pod.get("node"), f"{where}.node"),
            ips=tuple(dict.fromkeys(checked)),
            annotations=_str_map(pod.get("annotations"), f"{where}.annotations"),
            host_network=host_network,
        ))
    return Inventory(exclude, tuple(namespaces), tuple(pods))


def load_inventory(path: str | Path) -> Inventory:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_inventory(doc)
    except InventoryError as exc:
        raise InventoryError(f"{path}: {exc}") from None
