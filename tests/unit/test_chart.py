"""charts/ztunnel-fast: rendered by Helm's own engine (helm-python-sdk, Helm v4's Go SDK), linted
strictly, every object validated against Kubernetes' schemas, and the contract with Istio's tooling
and with ztunnel-fast's own Config asserted field by field.

Istio's names come from the reference table "Helm chart" (ztunnel-master.md): istioctl looks for
DaemonSet `ztunnel` (pods `app=ztunnel`) in istio-system, istiod trusts ServiceAccount
`istio-system/ztunnel`, the kubelet mounts the token and root cert where ztunnel reads them.
"""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from ztunnel_fast import __version__
from ztunnel_fast.config import Config

CHART = Path(__file__).resolve().parents[2] / "charts" / "ztunnel-fast"
KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.33.0", "1.35.0")
NAMESPACE = "istio-system"

# The value combinations every structural check runs on.
MATRIX = {
    "default": {},
    "revision": {"revision": "canary"},
    "resourceName": {"resourceName": "ztunnel-fast"},
    "node": {"redirection": "node"},
    "logAsJson": {"logAsJson": True},
    "networkPolicy": {"global": {"networkPolicy": {"enabled": True}}},
    "resourceQuotas": {"resourceQuotas": {"enabled": True, "pods": 200}},
    "clusterName": {"multiCluster": {"clusterName": "west"}},
    "proxyMetadata": {"meshConfig": {"defaultConfig": {"proxyMetadata": {"ISTIO_META_ENABLE_HBONE": "true"}}}},
    "engine": {"engine": "pure", "workerThreads": 4},
    "env": {"env": {"SECRET_TTL": "12h", "POOL_MAX_STREAMS_PER_CONNECTION": 50}},
    "limits": {"resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "1500m"}}},
    "crl": {"peerCaCrl": {"enabled": True}},
    "clusterTrustBundle": {"env": {"ENABLE_CLUSTER_TRUST_BUNDLE_API": "true"}},
    "openshift": {"platform": "openshift", "seLinuxOptions": {"type": "spc_t"}},
    "extras": {"volumes": [{"name": "extra", "emptyDir": {}}],
               "volumeMounts": [{"name": "extra", "mountPath": "/extra"}],
               "nodeSelector": {"pool": "mesh"}, "podLabels": {"team": "net"},
               "imagePullSecrets": ["regcred"], "imagePullPolicy": "IfNotPresent",
               "dnsConfig": {"options": [{"name": "ndots", "value": "2"}]}},
}


def render(values: dict | None = None, namespace: str = NAMESPACE) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name="ztunnel", namespace=namespace)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict | None = None) -> str:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name="ztunnel", namespace=NAMESPACE)["ztunnel-fast/templates/NOTES.txt"]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def pod_spec(values: dict | None = None) -> dict:
    return one(render(values), "DaemonSet")["spec"]["template"]["spec"]


def container(values: dict | None = None) -> dict:
    (c,) = pod_spec(values)["containers"]
    return c


def env_of(c: dict) -> dict[str, object]:
    """name -> literal value, or the valueFrom dict; names must be unique."""
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


# ----------------------------------------------------------------------------- Helm itself


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_lint_strict(case):
    report = helm.lint(CHART, MATRIX[case], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], problems or report["errors"]


def test_chart_metadata_matches_the_package():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["name"] == "ztunnel-fast"
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == __version__


def test_values_have_istios_keys_and_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    istio_defaults = {
        "variant": "", "network": "", "resourceName": "", "labels": {}, "annotations": {},
        "volumeMounts": [], "volumes": [], "podLabels": {}, "imagePullSecrets": [], "env": {},
        "imagePullPolicy": "", "terminationGracePeriodSeconds": 30, "revision": "",
        "caAddress": "", "xdsAddress": "", "istioNamespace": "istio-system", "logLevel": "info",
        "logAsJson": False, "seLinuxOptions": {}, "resourceScope": "all", "dnsPolicy": "",
        "dnsConfig": {},
        "podAnnotations": {"prometheus.io/port": "15020", "prometheus.io/scrape": "true"},
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}},
        "resourceQuotas": {"enabled": False, "pods": 5000},
        "peerCaCrl": {"enabled": False},
        "multiCluster": {"clusterName": ""},
        "meshConfig": {"defaultConfig": {"proxyMetadata": {}}},
        "global": {"networkPolicy": {"enabled": False}},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "tolerations": [{"effect": "NoSchedule", "operator": "Exists"},
                        {"key": "CriticalAddonsOnly", "operator": "Exists"},
                        {"effect": "NoExecute", "operator": "Exists"}],
    }
    for key, default in istio_defaults.items():
        assert values[key] == default, key
    # Keys the templates read that Istio's values.yaml leaves out, and the image keys.
    for key in ("nodeSelector", "affinity", "trustBundleName", "platform", "hub", "image", "tag"):
        assert key in values, key
    assert (values["engine"], values["workerThreads"], values["redirection"]) == ("auto", "", "inpod")


# ----------------------------------------------------------------------------- Kubernetes schemas


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_is_valid_kubernetes(case, kube):
    docs = render(MATRIX[case])
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, kube, strict=True)


def test_validation_catches_a_broken_object():
    """The validator above is strict: an unknown pod-spec field fails it."""
    ds = one(render(), "DaemonSet")
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBE_VERSIONS[-1], strict=True)


# ----------------------------------------------------------------------------- what istioctl/istiod expect


def test_default_objects_and_names():
    docs = render()
    assert sorted(d["kind"] for d in docs) == ["DaemonSet", "ServiceAccount"]
    ds, sa = one(docs, "DaemonSet"), one(docs, "ServiceAccount")
    assert (ds["metadata"]["name"], ds["metadata"]["namespace"]) == ("ztunnel", NAMESPACE)
    assert (sa["metadata"]["name"], sa["metadata"]["namespace"]) == ("ztunnel", NAMESPACE)
    assert ds["metadata"]["labels"]["app.kubernetes.io/name"] == "ztunnel"
    assert ds["spec"]["selector"] == {"matchLabels": {"app": "ztunnel"}}
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    meta = ds["spec"]["template"]["metadata"]
    for key, value in {"app": "ztunnel", "app.kubernetes.io/name": "ztunnel",
                       "sidecar.istio.io/inject": "false", "istio.io/dataplane-mode": "none"}.items():
        assert meta["labels"][key] == value, key
    assert meta["annotations"] == {"sidecar.istio.io/inject": "false",
                                   "prometheus.io/port": "15020", "prometheus.io/scrape": "true"}


def test_default_pod_spec():
    spec = pod_spec()
    assert spec["serviceAccountName"] == "ztunnel"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert "hostNetwork" not in spec and "dnsPolicy" not in spec
    assert spec["tolerations"] == [{"effect": "NoSchedule", "operator": "Exists"},
                                   {"key": "CriticalAddonsOnly", "operator": "Exists"},
                                   {"effect": "NoExecute", "operator": "Exists"}]
    (c,) = spec["containers"]
    assert c["name"] == "istio-proxy"
    assert c["image"] == f"localhost/ztunnel-fast:{__version__}"
    assert c["args"] == ["run"]
    assert c["ports"] == [{"containerPort": 15020, "name": "ztunnel-stats", "protocol": "TCP"}]
    assert c["readinessProbe"] == {"httpGet": {"port": 15021, "path": "/healthz/ready"}}
    assert "livenessProbe" not in c
    assert c["resources"] == {"requests": {"cpu": "200m", "memory": "512Mi"}}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]},
        "readOnlyRootFilesystem": True,
        "runAsGroup": 1337,
        "runAsNonRoot": False,
        "runAsUser": 0,
    }


def test_default_volumes_and_mounts():
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes == {
        "istio-token": {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "path": "istio-token", "expirationSeconds": 43200, "audience": "istio-ca"}}]}},
        "istiod-ca-cert": {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
        "cni-ztunnel-sock-dir": {"name": "cni-ztunnel-sock-dir",
                                 "hostPath": {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"}},
        "tmp": {"name": "tmp", "emptyDir": {}},
    }
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts == {"istio-token": "/var/run/secrets/tokens", "istiod-ca-cert": "/var/run/secrets/istio",
                      "cni-ztunnel-sock-dir": "/var/run/ztunnel", "tmp": "/tmp"}


def test_default_env():
    env = env_of(container())
    field = lambda path: {"fieldRef": {"fieldPath": path}}  # noqa: E731
    assert env == {
        "CA_ADDRESS": "istiod.istio-system.svc:15012",
        "XDS_ADDRESS": "istiod.istio-system.svc:15012",
        "RUST_LOG": "info",
        "ISTIO_META_CLUSTER_ID": "Kubernetes",
        "INPOD_ENABLED": "true",
        "TERMINATION_GRACE_PERIOD_SECONDS": "30",
        "POD_NAME": field("metadata.name"),
        "POD_NAMESPACE": field("metadata.namespace"),
        "NODE_NAME": field("spec.nodeName"),
        "INSTANCE_IP": field("status.podIP"),
        "SERVICE_ACCOUNT": field("spec.serviceAccountName"),
        "ZTUNNEL_CPU_LIMIT": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}},
        "ZTUNNEL_RESOURCE_CPU_REQUEST": "200m",
        "ZTUNNEL_ENGINE": "auto",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def test_container_args_are_a_command_of_our_cli():
    from ztunnel_fast.cli import main

    (command,) = container()["args"]
    assert command in main.commands


# ----------------------------------------------------------------------------- the value matrix


def test_revision():
    docs = render({"revision": "canary", "global": {"networkPolicy": {"enabled": True}}})
    ds = one(docs, "DaemonSet")
    env = env_of(ds["spec"]["template"]["spec"]["containers"][0])
    assert env["CA_ADDRESS"] == env["XDS_ADDRESS"] == "istiod-canary.istio-system.svc:15012"
    assert ds["spec"]["template"]["metadata"]["annotations"]["istio.io/rev"] == "canary"
    assert ds["metadata"]["labels"]["istio.io/rev"] == "canary"
    assert ds["metadata"]["name"] == "ztunnel"  # istioctl still finds it
    assert one(docs, "NetworkPolicy")["metadata"]["name"] == "ztunnel-canary"


def test_explicit_addresses_and_istio_namespace():
    env = env_of(container({"istioNamespace": "mesh", "caAddress": "ca.example:443"}))
    assert env["CA_ADDRESS"] == "ca.example:443"
    assert env["XDS_ADDRESS"] == "istiod.mesh.svc:15012"


def test_resource_name():
    docs = render({"resourceName": "ztunnel-fast"})
    ds, sa = one(docs, "DaemonSet"), one(docs, "ServiceAccount")
    assert ds["metadata"]["name"] == sa["metadata"]["name"] == "ztunnel-fast"
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "ztunnel-fast"
    assert ds["spec"]["selector"]["matchLabels"] == {"app": "ztunnel"}
    assert "trustedZtunnelName" in notes({"resourceName": "ztunnel-fast"})


def test_node_redirection():
    spec = pod_spec({"redirection": "node"})
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = env_of(spec["containers"][0])
    assert env["ZTUNNEL_REDIRECTION"] == "node"
    assert "INPOD_ENABLED" not in env
    assert "ztunnel-pods-ips" in notes({"redirection": "node"})
    # The host's iptables lock, shared with kube-proxy (the root file system is read-only).
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in spec["containers"][0]["volumeMounts"]
    assert "xtables-lock" not in {v["name"] for v in pod_spec()["volumes"]}
    # An explicit dnsPolicy wins.
    assert pod_spec({"redirection": "node", "dnsPolicy": "Default"})["dnsPolicy"] == "Default"


def test_log_as_json():
    assert env_of(container({"logAsJson": True}))["LOG_FORMAT"] == "json"
    assert "LOG_FORMAT" not in env_of(container())
    assert env_of(container({"logLevel": "info,access=debug"}))["RUST_LOG"] == "info,access=debug"


def test_network_policy():
    assert not [d for d in render() if d["kind"] == "NetworkPolicy"]
    np = one(render(MATRIX["networkPolicy"]), "NetworkPolicy")
    assert np["metadata"] == {**np["metadata"], "name": "ztunnel", "namespace": NAMESPACE}
    assert np["spec"]["podSelector"] == {"matchLabels": {"app": "ztunnel"}}
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = np["spec"]["ingress"]
    assert sorted((p["port"], p["protocol"]) for p in rule["ports"]) == sorted(
        [(p, "TCP") for p in (15021, 15020, 15000, 15008, 15001, 15006, 15053)] + [(15053, "UDP")])
    assert np["spec"]["egress"] == [{}]


def test_resource_quota():
    quota = one(render(MATRIX["resourceQuotas"]), "ResourceQuota")
    assert quota["metadata"]["namespace"] == NAMESPACE
    assert quota["spec"] == {"hard": {"pods": "200"}, "scopeSelector": {"matchExpressions": [
        {"operator": "In", "scopeName": "PriorityClass", "values": ["system-node-critical"]}]}}


def test_cluster_name_and_network():
    env = env_of(container({"multiCluster": {"clusterName": "west"}, "network": "net-1"}))
    assert env["ISTIO_META_CLUSTER_ID"] == "west"
    assert env["NETWORK"] == "net-1"


def test_proxy_metadata_and_user_env():
    env = env_of(container({**MATRIX["proxyMetadata"], **MATRIX["env"]}))
    assert env["ISTIO_META_ENABLE_HBONE"] == "true"
    assert env["SECRET_TTL"] == "12h"
    assert env["POOL_MAX_STREAMS_PER_CONNECTION"] == "50"  # numbers become strings


def test_engine_and_worker_threads():
    env = env_of(container({"engine": "pure", "workerThreads": 4}))
    assert (env["ZTUNNEL_ENGINE"], env["ZTUNNEL_WORKER_THREADS"]) == ("pure", "4")
    assert env_of(container({"workerThreads": "3"}))["ZTUNNEL_WORKER_THREADS"] == "3"
    assert env_of(container({"workerThreads": "50%"}))["ZTUNNEL_WORKER_THREADS"] == "50%"
    assert env_of(container({"workerThreads": 0}))["ZTUNNEL_WORKER_THREADS"] == "0"
    assert "ZTUNNEL_WORKER_THREADS" not in env_of(container())


def test_cpu_limit_values():
    env = env_of(container(MATRIX["limits"]))
    assert env["ZTUNNEL_RESOURCE_CPU_LIMIT"] == "1500m"
    assert env["ZTUNNEL_RESOURCE_CPU_REQUEST"] == "500m"
    assert env["ZTUNNEL_CPU_LIMIT"] == {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}}


def test_peer_ca_crl():
    spec = pod_spec(MATRIX["crl"])
    assert env_of(spec["containers"][0])["CRL_PATH"] == "/var/run/secrets/istio/crl/ca-crl.pem"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["crl-volume"]["configMap"] == {"name": "istio-ca-crl", "optional": True}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["crl-volume"] == {"name": "crl-volume", "mountPath": "/var/run/secrets/istio/crl", "readOnly": True}


def test_trust_bundle_sources():
    volumes = {v["name"]: v for v in pod_spec({"trustBundleName": "my-root"})["volumes"]}
    assert volumes["istiod-ca-cert"]["configMap"] == {"name": "my-root"}
    volumes = {v["name"]: v for v in pod_spec(MATRIX["clusterTrustBundle"])["volumes"]}
    assert volumes["istiod-ca-cert"]["projected"] == {"sources": [{"clusterTrustBundle": {
        "name": "istio.io:istiod-ca:root-cert", "path": "root-cert.pem"}}]}


def test_image_forms():
    assert container({"hub": "reg.example/mesh", "tag": "1.2", "variant": "debug"})["image"] == \
        "reg.example/mesh/ztunnel-fast:1.2-debug"
    assert container({"image": "reg.example/other/zt:9"})["image"] == "reg.example/other/zt:9"
    assert container({"imagePullPolicy": "Always"})["imagePullPolicy"] == "Always"


def test_openshift_and_resource_scope():
    docs = render(MATRIX["openshift"])
    role, binding = one(docs, "ClusterRole"), one(docs, "ClusterRoleBinding")
    assert role["rules"][0]["resourceNames"] == ["privileged"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ztunnel", "namespace": NAMESPACE}]
    assert container(MATRIX["openshift"])["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    assert sorted(d["kind"] for d in render({**MATRIX["openshift"], "resourceScope": "cluster"})) == \
        ["ClusterRole", "ClusterRoleBinding"]
    assert sorted(d["kind"] for d in render({**MATRIX["openshift"], "resourceScope": "namespace"})) == \
        ["DaemonSet", "ServiceAccount"]


def test_extras_are_passed_through():
    docs = render(MATRIX["extras"])
    spec = one(docs, "DaemonSet")["spec"]["template"]
    assert spec["metadata"]["labels"]["team"] == "net"
    assert spec["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "mesh"}
    assert {"name": "extra", "emptyDir": {}} in spec["spec"]["volumes"]
    assert {"name": "extra", "mountPath": "/extra"} in spec["spec"]["containers"][0]["volumeMounts"]
    assert spec["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert one(docs, "ServiceAccount")["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["spec"]["dnsConfig"] == {"options": [{"name": "ndots", "value": "2"}]}


def test_release_namespace_is_used():
    docs = render(namespace="mesh-system")
    assert {d["metadata"]["namespace"] for d in docs} == {"mesh-system"}


# ----------------------------------------------------------------------------- values.schema.json


@pytest.mark.parametrize("values, where", [
    ({"redirection": "foo"}, "/redirection"),
    ({"engine": "fast"}, "/engine"),
    ({"workerThreads": -1}, "/workerThreads"),
    ({"workerThreads": "two"}, "/workerThreads"),
    ({"workerThreads": "150%"}, "/workerThreads"),
    ({"logAsJson": "yes"}, "/logAsJson"),
    ({"resourceScope": "everything"}, "/resourceScope"),
    ({"resourceQuotas": {"enabled": True, "pods": 0}}, "/resourceQuotas/pods"),
    ({"revision": "Canary_1"}, "/revision"),
    ({"podAnnotations": {"a": 1}}, "/podAnnotations/a"),
    ({"redirect": "node"}, "additional properties 'redirect' not allowed"),
])
def test_schema_rejects_bad_values(values, where):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.render(values, name="ztunnel", namespace=NAMESPACE)
    assert where in str(err.value)


def test_schema_accepts_every_matrix_case():
    with helm.Chart.load(CHART) as chart:
        for values in MATRIX.values():
            chart.validate_schema(values)


# ----------------------------------------------------------------------------- the env contract with Config


def kubelet_env(c: dict, *, cpu_limit: str = "2") -> dict[str, str]:
    """The container's environment as the kubelet would fill it on a node with `cpu_limit` CPUs."""
    downward = {"metadata.name": "ztunnel-abcde", "metadata.namespace": NAMESPACE,
                "spec.nodeName": "node-a", "status.podIP": "10.0.0.7", "spec.serviceAccountName": "ztunnel"}
    out = {}
    for e in c["env"]:
        if "value" in e:
            out[e["name"]] = e["value"]
        elif "fieldRef" in e["valueFrom"]:
            out[e["name"]] = downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert e["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
            out[e["name"]] = cpu_limit
    return out


def test_rendered_env_is_a_valid_config():
    values = {"logAsJson": True, "engine": "pure", **MATRIX["proxyMetadata"]}
    config = Config.from_env(kubelet_env(container(values)))
    assert config.xds.authority == config.ca.authority == "istiod.istio-system.svc:15012"
    assert (config.pod_name, config.pod_namespace, config.instance_ip, config.service_account) == \
        ("ztunnel-abcde", NAMESPACE, "10.0.0.7", "ztunnel")
    assert ("ENABLE_HBONE", "true") in config.proxy_metadata
    assert ("CLUSTER_ID", "Kubernetes") in config.proxy_metadata
    assert config.node_name == "node-a"
    assert config.cluster_id == "Kubernetes"
    assert (config.engine, config.log_format, config.log_level) == ("pure", "json", "info")
    assert config.termination_grace_period == 30.0
    assert config.redirection == "none"


def test_node_redirection_env_is_a_valid_config():
    config = Config.from_env(kubelet_env(container({"redirection": "node"})))
    assert config.redirection == "node"


def test_worker_threads_follow_the_rendered_cpu_limit():
    # No limit in values: the downward API reports the node's CPUs (16 here): a quarter of them.
    assert Config.from_env(kubelet_env(container(), cpu_limit="16")).worker_threads == 4
    # A limit in values: its CPUs, rounded up (1500m -> 2).
    assert Config.from_env(kubelet_env(container(MATRIX["limits"]), cpu_limit="2")).worker_threads == 2
    # workerThreads wins; its percentages are of the rendered CPU limit.
    assert Config.from_env(kubelet_env(container({"workerThreads": 3}), cpu_limit="16")).worker_threads == 3
    assert Config.from_env(kubelet_env(container({"workerThreads": "50%"}), cpu_limit="16")).worker_threads == 8


def test_mounts_put_the_files_where_config_reads_them():
    """The token and root-cert files land on ztunnel's default paths (no env override needed)."""
    from ztunnel_fast.config import DEFAULT_AUTH_TOKEN, DEFAULT_ROOT_CA

    spec = pod_spec()
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    (token,) = volumes["istio-token"]["projected"]["sources"]
    assert f"{mounts['istio-token']}/{token['serviceAccountToken']['path']}" == DEFAULT_AUTH_TOKEN
    # istiod's ConfigMap istio-ca-root-cert carries the key root-cert.pem; a ConfigMap volume
    # without `items` makes each key a file.
    assert "items" not in volumes["istiod-ca-cert"]["configMap"]
    assert f"{mounts['istiod-ca-cert']}/root-cert.pem" == DEFAULT_ROOT_CA
    env = env_of(spec["containers"][0])
    assert not {"AUTH_TOKEN", "CA_ROOT_CA", "XDS_ROOT_CA"} & set(env)
