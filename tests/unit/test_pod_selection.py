"""Pod selection (the user guide's rule) as table tests, the inventory file's refusals, and the
reconcile plan.  Pure: no ipset, no namespaces."""

from __future__ import annotations

import pytest

from ztunnel_fast.redirect.selection import (
    InventoryError,
    Namespace,
    PodInfo,
    ambient_pod_ips,
    ambient_reason,
    load_inventory,
    parse_inventory,
    plan,
)

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NAMESPACES = [
    Namespace("demo", AMBIENT),
    Namespace("plain", {}),
    Namespace("other-mode", {"istio.io/dataplane-mode": "sidecar"}),
    Namespace("kube-system", AMBIENT),  # labelled, but excluded
]
SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def pod(name, ns="demo", node="n1", ips=("10.0.0.1",), annotations=None, host_network=False):
    return PodInfo(name, ns, node, tuple(ips), annotations or {}, host_network)


@pytest.mark.parametrize("p, ambient, why", [
    (pod("a"), True, None),
    (pod("b", ns="plain"), False, "is not labelled istio.io/dataplane-mode=ambient"),
    (pod("c", ns="other-mode"), False, "is not labelled"),
    (pod("d", ns="missing"), False, "is not labelled"),  # namespace unknown
    (pod("e", ns="kube-system"), False, "in the CNI exclude list"),
    (pod("f", annotations=SIDECAR), False, "has a sidecar"),
    (pod("g", annotations={"ambient.istio.io/redirection": "disabled"}), False, "redirection=disabled"),
    (pod("h", annotations={"ambient.istio.io/redirection": "enabled"}), True, None),
    (pod("i", annotations={"ambient.istio.io/redirection": "Disabled"}), True, None),  # exact value only
    (pod("j", annotations={"sidecar.istio.io/inject": "false"}), True, None),  # only the status counts
    (pod("k", annotations={"sidecar.istio.io/status": ""}), False, "has a sidecar"),  # present = sidecar
    (pod("l", host_network=True), False, "host network"),
])
def test_guide_rule(p, ambient, why):
    by_name = {n.name: n for n in NAMESPACES}
    reason = ambient_reason(by_name.get(p.namespace), p, ["kube-system"])
    assert (reason is None) == ambient
    if why:
        assert why in reason
    assert ambient_pod_ips(NAMESPACES, [p], "n1", ["kube-system"]) == ({*p.ips} if ambient else set())


def test_only_the_nodes_pods_and_all_their_ips():
    pods = [pod("a", ips=("10.0.0.1", "fd00::1")), pod("b", node="n2", ips=("10.0.1.1",)), pod("c", ips=())]
    assert ambient_pod_ips(NAMESPACES, pods, "n1", ["kube-system"]) == {"10.0.0.1", "fd00::1"}
    assert ambient_pod_ips(NAMESPACES, pods, "n2", ["kube-system"]) == {"10.0.1.1"}
    assert ambient_pod_ips(NAMESPACES, pods, "n3") == set()


def test_labelling_and_unlabelling_a_namespace():
    pods = [pod("a", ns="plain", ips=("10.0.0.5",)), pod("b", ns="plain", ips=("10.0.0.6",), annotations=SIDECAR)]
    before = ambient_pod_ips(NAMESPACES, pods, "n1")
    labelled = [Namespace("plain", AMBIENT) if n.name == "plain" else n for n in NAMESPACES]
    after = ambient_pod_ips(labelled, pods, "n1")
    assert before == set() and after == {"10.0.0.5"}  # the sidecar pod stays out


def test_plan_reconciles_member_by_member():
    assert plan({"10.0.0.2", "10.0.0.10"}, {"10.0.0.10", "10.0.0.3", "10.0.0.1"}) == (["10.0.0.1", "10.0.0.3"],
                                                                                       ["10.0.0.2"])
    assert plan([], []) == ([], [])


def test_parse_inventory_file_shape():
    inv = parse_inventory({
        "excludeNamespaces": ["kube-system"],
        "namespaces": [{"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient", "team": 7}}],
        "pods": [{"name": "a", "namespace": "demo", "node": "n1", "ip": "10.0.0.1", "ips": ["10.0.0.1", "10.0.0.2"],
                  "annotations": {"x": True}, "hostNetwork": False}],
    })
    assert inv.exclude_namespaces == ("kube-system",)
    assert inv.namespaces[0].labels == {"istio.io/dataplane-mode": "ambient", "team": "7"}
    assert inv.pods[0].ips == ("10.0.0.1", "10.0.0.2") and inv.pods[0].annotations == {"x": "true"}
    assert parse_inventory(None) == parse_inventory({})


@pytest.mark.parametrize("doc, message", [
    ([], "top level: must be a mapping with excludeNamespaces, namespaces, pods"),
    ({"pod": []}, "unknown key 'pod' (expected excludeNamespaces, namespaces, pods)"),
    ({"pods": {}}, "pods: must be a list"),
    ({"namespaces": [{"labels": {}}]}, "namespaces[0].name: a non-empty string is required"),
    ({"namespaces": [{"name": "a"}, {"name": "a"}]}, "namespaces[1].name: namespace a listed twice"),
    ({"namespaces": [{"name": "a", "labels": ["x"]}]}, "namespaces[0].labels: must be a mapping of strings"),
    ({"pods": [{"name": "a", "namespace": "d", "node": "n", "ip": "10.0.0.300"}]},
     "pods[0].ip: invalid IP address '10.0.0.300'"),
    ({"pods": [{"name": "a", "namespace": "d", "node": "n", "ip": "10.0.0.1", "ips": ["x"]}]},
     "pods[0].ips[0]: invalid IP address 'x'"),
    ({"pods": [{"name": "a", "namespace": "d", "ip": "10.0.0.1"}]}, "pods[0].node: a non-empty string is required"),
    ({"pods": [{"name": "a", "namespace": "d", "node": "n", "hostNetwork": "yes"}]},
     "pods[0].hostNetwork: must be true or false"),
    ({"pods": [{"name": "a", "namespace": "d", "node": "n", "annotations": {"k": ["v"]}}]},
     "pods[0].annotations.k: must be a string"),
])
def test_inventory_refusals(doc, message):
    with pytest.raises(InventoryError) as err:
        parse_inventory(doc)
    assert str(err.value) == message


def test_load_inventory_names_the_file(tmp_path):
    f = tmp_path / "pods.yaml"
    f.write_text("pods:\n- {name: a, namespace: demo, node: n1, ip: 10.0.0.1}\nnamespaces: [{name: demo, labels: "
                 "{istio.io/dataplane-mode: ambient}}]\n")
    inv = load_inventory(f)
    assert ambient_pod_ips(inv.namespaces, inv.pods, "n1", inv.exclude_namespaces) == {"10.0.0.1"}
    f.write_text("pods: [unclosed\n")
    with pytest.raises(InventoryError, match=f"^{f}: not valid YAML"):
        load_inventory(f)
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(tmp_path / "missing.yaml")
