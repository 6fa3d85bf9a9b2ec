"""Local config (LOCAL_XDS_PATH): a full example parses into the expected objects; every refusal
names the key path and the reason."""

from __future__ import annotations

import textwrap
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from ztunnel_fast.config import Config
from ztunnel_fast.errors import ConfigError
from ztunnel_fast.state.policy import (
    Action,
    Authorization,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel_fast.state.service import NetworkAddress, Service
from ztunnel_fast.state.workload import Locality, TunnelProtocol, Workload, WorkloadStatus
from ztunnel_fast.xds.local import LocalConfig, load_local_config, local_config_from, parse_local_config

SOURCE = "LOCAL_XDS_PATH=/test.yaml"

FULL = textwrap.dedent("""\
    workloads:
    - uid: Kubernetes//Pod/default/echo-1
      name: echo-1
      namespace: default
      workloadIps: ["10.0.0.1", "fd00::1"]
      protocol: HBONE
      trustDomain: td.example
      serviceAccount: echo
      network: net1
      node: node-a
      clusterId: c1
      workloadName: echo
      workloadType: pod
      canonicalName: echo
      canonicalRevision: v1
      status: Unhealthy
      locality: {region: r1, zone: z1, subzone: s1}
      services:
        default/echo.default.svc.cluster.local: {80: 8080, 443: 0}
      authorizationPolicies: [default/allow-sleep]
      capacity: 3
    - name: sleep
      namespace: default
      workloadIps: ["::ffff:10.0.0.2"]
    services:
    - name: echo
      namespace: default
      hostname: echo.default.svc.cluster.local
      vips: ["net1/10.96.0.10", "10.96.0.11", "net1/fd00:96::10"]
      ports: {80: 8080, "443": 0}
      subjectAltNames: ["spiffe://td.example/ns/default/sa/echo"]
      canonical: true
    - name: bare
      namespace: other
      hostname: bare.other.svc.cluster.local
    policies:
    - name: allow-sleep
      namespace: default
      scope: WorkloadSelector
      action: Allow
      dryRun: true
      rules:
      - - - namespaces: [{Exact: default}]
            notNamespaces: [{Prefix: kube-}]
            principals: [{Suffix: /sa/sleep}, Presence]
            notPrincipals: [{Exact: td.example/ns/default/sa/bad}]
            serviceAccounts: [{namespace: default, serviceAccount: sleep}]
            notServiceAccounts: [{namespace: default, serviceAccount: bad}]
            sourceIps: ["10.0.0.0/8", "10.1.2.3"]
            notSourceIps: ["fd00::/8", "fd00::5"]
            destinationIps: ["10.0.0.1/24"]
            notDestinationIps: ["192.168.0.0/16"]
            destinationPorts: [8080]
            notDestinationPorts: [9090]
          - {}
        - - notPrincipals: [Presence]
      - []
    - name: deny-all
      namespace: istio-system
      scope: Global
      action: Deny
""")


def test_full_example():
    cfg = parse_local_config(FULL, SOURCE)
    echo = Workload(
        uid="Kubernetes//Pod/default/echo-1",
        name="echo-1",
        namespace="default",
        workload_ips=(ip_address("10.0.0.1"), ip_address("fd00::1")),
        protocol=TunnelProtocol.HBONE,
        trust_domain="td.example",
        service_account="echo",
        network="net1",
        node="node-a",
        cluster_id="c1",
        workload_name="echo",
        workload_type="pod",
        canonical_name="echo",
        canonical_revision="v1",
        status=WorkloadStatus.UNHEALTHY,
        locality=Locality("r1", "z1", "s1"),
        services={"default/echo.default.svc.cluster.local": {80: 8080, 443: 0}},
        authorization_policies=("default/allow-sleep",),
        capacity=3,
    )
    sleep = Workload(
        uid="Kubernetes//Pod/default/sleep",  # default uid shape
        name="sleep",
        namespace="default",
        workload_ips=(ip_address("10.0.0.2"),),  # IPv4-mapped folded to IPv4
    )
    assert cfg.workloads == (echo, sleep)
    assert cfg.services == (
        Service(
            name="echo",
            namespace="default",
            hostname="echo.default.svc.cluster.local",
            vips=(NetworkAddress("net1", ip_address("10.96.0.10")),
                  NetworkAddress("", ip_address("10.96.0.11")),
                  NetworkAddress("net1", ip_address("fd00:96::10"))),
            ports={80: 8080, 443: 0},
            subject_alt_names=("spiffe://td.example/ns/default/sa/echo",),
            canonical=True,
        ),
        Service(name="bare", namespace="other", hostname="bare.other.svc.cluster.local"),
    )
    full_match = Match(
        namespaces=(StringMatch(StringMatchKind.EXACT, "default"),),
        not_namespaces=(StringMatch(StringMatchKind.PREFIX, "kube-"),),
        principals=(StringMatch(StringMatchKind.SUFFIX, "/sa/sleep"),
                    StringMatch(StringMatchKind.PRESENCE)),
        not_principals=(StringMatch(StringMatchKind.EXACT, "td.example/ns/default/sa/bad"),),
        service_accounts=(ServiceAccountMatch("default", "sleep"),),
        not_service_accounts=(ServiceAccountMatch("default", "bad"),),
        source_ips=(ip_network("10.0.0.0/8"), ip_network("10.1.2.3/32")),
        not_source_ips=(ip_network("fd00::/8"), ip_network("fd00::5/128")),
        destination_ips=(ip_network("10.0.0.0/24"),),  # host bits dropped
        not_destination_ips=(ip_network("192.168.0.0/16"),),
        destination_ports=(8080,),
        not_destination_ports=(9090,),
    )
    assert cfg.policies == (
        Authorization(
            name="allow-sleep",
            namespace="default",
            scope=Scope.WORKLOAD_SELECTOR,
            action=Action.ALLOW,
            rules=(
                ((full_match, Match()),
                 (Match(not_principals=(StringMatch(StringMatchKind.PRESENCE),)),)),
                (),
            ),
            dry_run=True,
        ),
        Authorization(name="deny-all", namespace="istio-system", scope=Scope.GLOBAL,
                      action=Action.DENY),
    )
    assert cfg.policies[0].key == "default/allow-sleep"
    assert Match().is_empty and not full_match.is_empty
    # Immutable all the way down.
    with pytest.raises(TypeError):
        cfg.workloads[0].services["x/y"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.services[0].ports[1] = 1  # type: ignore[index]


@pytest.mark.parametrize("text", ["{}", "workloads: []\nservices: []\npolicies: []",
                                  "workloads:\nservices:\n", '{"workloads": []}'])
def test_empty_sections(text):
    assert parse_local_config(text, SOURCE) == LocalConfig()


def test_json_string_port_keys():
    cfg = parse_local_config('{"services": [{"name": "a", "namespace": "n", "hostname": "h",'
                             ' "ports": {"80": 8080}}]}', "LOCAL_XDS")
    assert dict(cfg.services[0].ports) == {80: 8080}


def test_null_workload_services_entry_means_no_own_ports():
    cfg = parse_local_config("workloads:\n- {name: a, namespace: n, services: {n/h: null}}", SOURCE)
    assert dict(cfg.workloads[0].services["n/h"]) == {}


W = "workloads:\n- {name: a, namespace: n, %s}\n"
S = "services:\n- {name: s, namespace: n, hostname: h, %s}\n"
P = "policies:\n- {name: p, namespace: n, scope: Global, action: Allow, %s}\n"
M = P % "rules: [[[{%s}]]]"
MPATH = "policies[0].rules[0][0][0]"

REFUSALS = [
    # top level
    ("- a\n- b\n", "", "top level must be a mapping"),
    ("just text", "", "top level must be a mapping"),
    ("", "", "empty document"),
    ("workload: []", "workload", "unknown key; accepted: workloads, services, policies"),
    ("workloads: {}", "workloads", "expected a list, got mapping"),
    ("workloads: [5]", "workloads[0]", "expected a mapping, got integer"),
    # workloads
    ("workloads:\n- {namespace: n}", "workloads[0].name", "required"),
    ("workloads:\n- {name: '', namespace: n}", "workloads[0].name", "must not be empty"),
    ("workloads:\n- {name: a}", "workloads[0].namespace", "required"),
    (W % "nme: x", "workloads[0].nme", "unknown key"),
    (W % "waypoint: {}", "workloads[0].waypoint", "exactly one of address"),
    (W % "waypoint: {address: n/10.0.0.9, hostname: {namespace: n, hostname: h}}", "workloads[0].waypoint",
     "exactly one of address"),
    (W % "waypoint: {address: n/10.0.0.x}", "workloads[0].waypoint.address", "invalid IP address '10.0.0.x'"),
    (W % "waypoint: {hostname: {namespace: n}}", "workloads[0].waypoint.hostname.hostname", "required"),
    (W % "waypoint: {hostname: {namespace: n, hostname: h, port: 1}}", "workloads[0].waypoint.hostname.port",
     "unknown key"),
    (W % "waypoint: {destination: nohost}", "workloads[0].waypoint.destination", "invalid destination 'nohost'"),
    (W % "waypoint: {address: /10.0.0.9, hboneMtlsPort: 0}", "workloads[0].waypoint.hboneMtlsPort",
     "port 0 out of range"),
    (W % "waypoint: {address: /10.0.0.9, via: x}", "workloads[0].waypoint.via", "unknown key"),
    (W % "waypoint: 10.0.0.9", "workloads[0].waypoint", "expected a mapping, got string"),
    (W % "applicationTunnel: {protocol: HTTP}", "workloads[0].applicationTunnel.protocol",
     "accepted: NONE, PROXY"),
    (W % "applicationTunnel: {protocol: PROXY, port: 70000}", "workloads[0].applicationTunnel.port",
     "port 70000 out of range"),
    (W % "networkGateway: x", "workloads[0].networkGateway", "not supported yet"),
    (W % "hostname: x.example", "workloads[0].hostname", "not supported yet"),
    (W % "nativeTunnel: true", "workloads[0].nativeTunnel", "not supported yet"),
    (W % "networkMode: HostNetwork", "workloads[0].networkMode", "not supported yet"),
    ("workloads:\n- {name: 5, namespace: n}", "workloads[0].name", "expected a string, got integer"),
    ("workloads:\n- {name: a, namespace: [n]}", "workloads[0].namespace", "expected a string, got list"),
    (W % "workloadIps: 10.0.0.1", "workloads[0].workloadIps", "expected a list, got string"),
    (W % "workloadIps: [10.0.0.1, 10.0.0.300]", "workloads[0].workloadIps[1]",
     "invalid IP address '10.0.0.300'"),
    (W % "protocol: hbone", "workloads[0].protocol", "accepted: TCP, HBONE"),
    (W % "workloadType: statefulset", "workloads[0].workloadType", "accepted: deployment, cronjob, pod, job"),
    (W % "status: Ready", "workloads[0].status", "accepted: Healthy, Unhealthy"),
    (W % "locality: {region: r, city: c}", "workloads[0].locality.city", "unknown key"),
    (W % "locality: [r]", "workloads[0].locality", "expected a mapping, got list"),
    (W % "services: [n/h]", "workloads[0].services", "expected a mapping, got list"),
    (W % "services: {h: {80: 80}}", "workloads[0].services.h", "expected <namespace>/<hostname>"),
    (W % "services: {/h: {80: 80}}", "workloads[0].services./h", "expected <namespace>/<hostname>"),
    (W % "services: {n/h/x: {80: 80}}", "workloads[0].services.n/h/x", "expected <namespace>/<hostname>"),
    (W % "services: {n/h: {0: 80}}", "workloads[0].services.n/h.0", "service port 0 out of range"),
    (W % "services: {n/h: {80: 65536}}", "workloads[0].services.n/h.80", "target port 65536 out of range"),
    (W % "authorizationPolicies: [nopolicy]", "workloads[0].authorizationPolicies[0]",
     "expected <namespace>/<policy name>"),
    (W % "authorizationPolicies: n/p", "workloads[0].authorizationPolicies", "expected a list"),
    (W % "capacity: 0", "workloads[0].capacity", "capacity 0 out of range"),
    (W % "capacity: '2'", "workloads[0].capacity", "expected an integer (capacity), got string"),
    ("workloads:\n- {uid: u, name: a, namespace: n}\n- {uid: u, name: b, namespace: n}",
     "workloads[1].uid", "duplicate workload uid 'u' (also workloads[0])"),
    ("workloads:\n- {name: a, namespace: n}\n- {name: a, namespace: n}",
     "workloads[1].uid", "duplicate workload uid"),
    ("workloads:\n- {name: a, namespace: n, workloadIps: [10.0.0.1]}\n"
     "- {name: b, namespace: n, workloadIps: [10.0.0.2, 10.0.0.1]}",
     "workloads[1].workloadIps[1]", "10.0.0.1 on network '' already used by workloads[0]"),
    ("workloads:\n- {name: a, namespace: n, workloadIps: [10.0.0.1]}\n"
     "- {name: b, namespace: n, workloadIps: ['::ffff:10.0.0.1']}",
     "workloads[1].workloadIps[0]", "already used by workloads[0]"),
    (W % "workloadIps: [10.0.0.1, 10.0.0.1]", "workloads[0].workloadIps[1]", "listed twice"),
    # services
    ("services:\n- {namespace: n, hostname: h}", "services[0].name", "required"),
    ("services:\n- {name: s, hostname: h}", "services[0].namespace", "required"),
    ("services:\n- {name: s, namespace: n}", "services[0].hostname", "required"),
    (S % "vip: [10.0.0.1]", "services[0].vip", "unknown key"),
    (S % "waypoint: {}", "services[0].waypoint", "exactly one of address"),
    (S % "weightedWaypoints: {address: /10.0.0.9}", "services[0].weightedWaypoints", "expected a list"),
    (S % "weightedWaypoints: [{weight: 1}]", "services[0].weightedWaypoints[0].destination", "required"),
    (S % "weightedWaypoints: [{destination: {address: /10.0.0.9}, weight: -1}]",
     "services[0].weightedWaypoints[0].weight", "weight -1 out of range"),
    (S % "weightedWaypoints: [{destination: {address: /10.0.0.9}, weight: '2'}]",
     "services[0].weightedWaypoints[0].weight", "expected an integer (weight), got string"),
    (S % "loadBalancer: {mode: STRICT}", "services[0].loadBalancer", "not supported yet"),
    (S % "vips: 10.96.0.1", "services[0].vips", "expected a list, got string"),
    (S % "vips: [net/10.96.0.x]", "services[0].vips[0]", "invalid IP address '10.96.0.x'"),
    (S % "vips: [10.96.0.0/16]", "services[0].vips[0]", "invalid IP address '16'"),
    (S % "ports: {70000: 80}", "services[0].ports.70000", "service port 70000 out of range"),
    (S % "ports: {80: -1}", "services[0].ports.80", "target port -1 out of range"),
    (S % "ports: {http: 80}", "services[0].ports.http", "expected an integer (service port), got string"),
    (S % "ports: {80: '8080'}", "services[0].ports.80", "expected an integer (target port), got string"),
    (S % "ports: {80: 80, '80': 81}", "services[0].ports.80", "listed twice"),
    (S % "ports: [80]", "services[0].ports", "expected a mapping, got list"),
    (S % "subjectAltNames: [spiffe://td/ns/n]", "services[0].subjectAltNames[0]", "SPIFFE id must be"),
    (S % "subjectAltNames: [td/ns/n/sa/s]", "services[0].subjectAltNames[0]", "not a SPIFFE id"),
    (S % "canonical: 'yes'", "services[0].canonical", "expected a boolean"),
    ("services:\n- {name: a, namespace: n, hostname: h}\n- {name: b, namespace: n, hostname: h}",
     "services[1].hostname", "duplicate service n/h (also services[0])"),
    ("services:\n- {name: a, namespace: n, hostname: h1, vips: [net/10.96.0.1]}\n"
     "- {name: b, namespace: n, hostname: h2, vips: [10.96.0.1, net/10.96.0.1]}",
     "services[1].vips[1]", "duplicate VIP net/10.96.0.1: already used by services[0] (n/h1)"),
    (S % "vips: [10.96.0.1, /10.96.0.1]", "services[0].vips[1]", "listed twice"),
    # policies
    ("policies:\n- {name: '', namespace: n, scope: Global, action: Allow}", "policies[0].name",
     "must not be empty"),
    ("policies:\n- {namespace: n, scope: Global, action: Allow}", "policies[0].name", "required"),
    ("policies:\n- {name: p, scope: Global, action: Allow}", "policies[0].namespace", "required"),
    ("policies:\n- {name: p, namespace: n, action: Allow}", "policies[0].scope",
     "required; accepted: Global, Namespace, WorkloadSelector"),
    ("policies:\n- {name: p, namespace: n, scope: Global}", "policies[0].action",
     "required; accepted: Allow, Deny"),
    (P % "dryRun: 1", "policies[0].dryRun", "expected a boolean"),
    (P.replace("Global", "Cluster") % "", "policies[0].scope", "invalid value 'Cluster'"),
    (P.replace("Allow", "Audit") % "", "policies[0].action", "invalid value 'Audit'"),
    (P % "rule: []", "policies[0].rule", "unknown key"),
    (P % "rules: [{}]", "policies[0].rules[0]", "expected a list, got mapping"),
    (P % "rules: [[{}]]", "policies[0].rules[0][0]", "expected a list, got mapping"),
    (P % "rules: [[[[]]]]", "policies[0].rules[0][0][0]", "expected a mapping, got list"),
    (P % "rules: [[[{}], [{}, {principal: [Presence]}]]]", "policies[0].rules[0][1][1].principal",
     "unknown key"),
    ("policies:\n- {name: p, namespace: n, scope: Global, action: Allow}\n"
     "- {name: p, namespace: n, scope: Namespace, action: Deny}", "policies[1].name",
     "duplicate policy n/p (also policies[0])"),
    # matches
    (M % "principals: Presence", f"{MPATH}.principals", "expected a list, got string"),
    (M % "principals: [presence]", f"{MPATH}.principals[0]", "the plain string Presence"),
    (M % "principals: [{Regex: x}]", f"{MPATH}.principals[0].Regex", "unknown string match"),
    (M % "principals: [{Exact: a, Prefix: b}]", f"{MPATH}.principals[0]", "exactly one key"),
    (M % "namespaces: [{Exact: 5}]", f"{MPATH}.namespaces[0].Exact", "expected a string, got integer"),
    (M % "notNamespaces: [{Presence: null}]", f"{MPATH}.notNamespaces[0].Presence",
     "unknown string match"),
    (M % "notPrincipals: [5]", f"{MPATH}.notPrincipals[0]", "invalid string match 5"),
    (M % "serviceAccounts: [{namespace: n}]", f"{MPATH}.serviceAccounts[0].serviceAccount", "required"),
    (M % "notServiceAccounts: [{namespace: n, serviceAccount: s, name: x}]",
     f"{MPATH}.notServiceAccounts[0].name", "unknown key"),
    (M % "sourceIps: [10.0.0.0/33]", f"{MPATH}.sourceIps[0]", "invalid CIDR or IP address"),
    (M % "notSourceIps: [nope]", f"{MPATH}.notSourceIps[0]", "invalid CIDR or IP address 'nope'"),
    (M % "destinationIps: [10.0.0.0/8, 'fd00::/129']", f"{MPATH}.destinationIps[1]", "invalid CIDR"),
    (M % "notDestinationIps: [5]", f"{MPATH}.notDestinationIps[0]", "expected a CIDR string, got integer"),
    (M % "destinationPorts: [0]", f"{MPATH}.destinationPorts[0]", "port 0 out of range"),
    (M % "notDestinationPorts: [80, 65536]", f"{MPATH}.notDestinationPorts[1]", "port 65536 out of range"),
    (M % "destinationPorts: [true]", f"{MPATH}.destinationPorts[0]", "got boolean"),
]


@pytest.mark.parametrize("text,key,reason", REFUSALS, ids=[r[1] or r[2] for r in REFUSALS])
def test_refusals(text, key, reason):
    with pytest.raises(ConfigError) as info:
        parse_local_config(text, SOURCE)
    assert info.value.source == SOURCE
    assert info.value.key == key
    assert reason in info.value.reason


@pytest.mark.parametrize("text,where,problem", [
    ("workloads:\n  - name: a\n   namespace: n\n", "line 3, column", ""),
    ("workloads: [\n", "line 2, column 1", ""),
    ("services:\n- name: a\n  name: b\n", "line 3, column 3", "duplicate key 'name'"),
    ("a: 1\na: 2\n", "line 2, column 1", "duplicate key 'a'"),
])
def test_bad_yaml(text, where, problem):
    with pytest.raises(ConfigError) as info:
        parse_local_config(text, SOURCE)
    assert info.value.key == ""
    assert info.value.reason.startswith("invalid YAML at " + where)
    assert problem in info.value.reason


def test_merge_keys_are_not_duplicates():
    cfg = parse_local_config(
        "workloads:\n- &w {name: a, namespace: n}\n- {<<: *w, name: b}\n", SOURCE)
    assert [(w.name, w.namespace) for w in cfg.workloads] == [("a", "n"), ("b", "n")]
    with pytest.raises(ConfigError) as info:
        parse_local_config("workloads:\n- &w {name: a, namespace: n}\n- {<<: *w, name: b, name: c}\n",
                           SOURCE)
    assert "duplicate key 'name'" in info.value.reason


def test_load_local_config(tmp_path: Path):
    path = tmp_path / "local.yaml"
    path.write_text(FULL)
    assert load_local_config(path) == parse_local_config(FULL, SOURCE)

    path.write_text("workloads: [{name: a}]")
    with pytest.raises(ConfigError) as info:
        load_local_config(path)
    assert (info.value.source, info.value.key) == (f"LOCAL_XDS_PATH={path}", "workloads[0].namespace")


def test_load_local_config_unreadable(tmp_path: Path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_local_config(missing)
    assert info.value.source == f"LOCAL_XDS_PATH={missing}"
    assert "cannot read" in info.value.reason
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as info:
        load_local_config(binary)
    assert "not UTF-8" in info.value.reason


def test_local_config_from(tmp_path: Path):
    assert local_config_from(Config()) is None
    inline = Config.from_env({"LOCAL_XDS": "workloads: [{name: a, namespace: n}]"})
    assert local_config_from(inline).workloads[0].uid == "Kubernetes//Pod/n/a"
    with pytest.raises(ConfigError) as info:
        local_config_from(Config.from_env({"LOCAL_XDS": "workloads: [{name: a}]"}))
    assert info.value.source == "LOCAL_XDS"
    path = tmp_path / "l.yaml"
    path.write_text("services: [{name: s, namespace: n, hostname: h}]")
    assert local_config_from(Config.from_env({"LOCAL_XDS_PATH": str(path)})).services[0].key == "n/h"


def test_uid_default_uses_cluster_id():
    cfg = parse_local_config("workloads: [{name: a, namespace: n, clusterId: c2}]", SOURCE)
    assert cfg.workloads[0].uid == "c2//Pod/n/a"


def test_same_ip_on_different_networks_is_allowed():
    cfg = parse_local_config(
        "workloads:\n- {name: a, namespace: n, network: n1, workloadIps: [10.0.0.1]}\n"
        "- {name: b, namespace: n, network: n2, workloadIps: [10.0.0.1]}\n", SOURCE)
    assert len(cfg.workloads) == 2


def test_waypoints_and_application_tunnel_parse_in_every_form():
    from ztunnel_fast.state.workload import (
        ApplicationTunnel, ApplicationTunnelProtocol, GatewayAddress, WeightedWaypoint)
    cfg = parse_local_config(textwrap.dedent("""\
        workloads:
        - name: a
          namespace: n
          waypoint: {address: net1/10.0.0.9}
          applicationTunnel: {protocol: PROXY, port: 15088}
        - name: b
          namespace: n
          waypoint: {hostname: {namespace: n, hostname: wp.n.svc.cluster.local}, hboneMtlsPort: 15009}
          applicationTunnel: {}
        services:
        - name: s
          namespace: n
          hostname: s.n.svc.cluster.local
          waypoint: {destination: n/wp.n.svc.cluster.local}
          weightedWaypoints:
          - {destination: {destination: /fd00::9}, weight: 9}
          - {destination: {address: 10.0.0.8}}
        """), SOURCE)
    a, b = cfg.workloads
    assert a.waypoint == GatewayAddress(network="net1", address=ip_address("10.0.0.9"), hbone_mtls_port=15008)
    assert a.application_tunnel == ApplicationTunnel(ApplicationTunnelProtocol.PROXY, 15088)
    assert b.waypoint == GatewayAddress(namespace="n", hostname="wp.n.svc.cluster.local", hbone_mtls_port=15009)
    assert b.application_tunnel == ApplicationTunnel(ApplicationTunnelProtocol.NONE, 0)
    (s,) = cfg.services
    assert s.waypoint == GatewayAddress(namespace="n", hostname="wp.n.svc.cluster.local")
    assert s.weighted_waypoints == (
        WeightedWaypoint(GatewayAddress(network="", address=ip_address("fd00::9")), 9),
        WeightedWaypoint(GatewayAddress(network="", address=ip_address("10.0.0.8")), 1),
    )


def test_config_dump_waypoint_form_reads_back():
    """A dumped workload's waypoint ({destination, hboneMtlsPort}) pastes back into the file."""
    from ztunnel_fast.state.dump import service_json, workload_json
    from ztunnel_fast.state.store import ProxyState
    import yaml
    text = W % "waypoint: {hostname: {namespace: n, hostname: wp}, hboneMtlsPort: 15009}, " \
               "applicationTunnel: {protocol: PROXY, port: 15088}"
    (w,) = parse_local_config(text, SOURCE).workloads
    dumped = workload_json(w)
    assert dumped["waypoint"] == {"destination": "n/wp", "hboneMtlsPort": 15009}
    assert dumped["applicationTunnel"] == {"protocol": "PROXY", "port": 15088}
    again = parse_local_config(yaml.safe_dump({"workloads": [{
        "name": "a", "namespace": "n", "waypoint": dumped["waypoint"],
        "applicationTunnel": dumped["applicationTunnel"]}]}), SOURCE)
    assert again.workloads[0].waypoint == w.waypoint
    assert again.workloads[0].application_tunnel == w.application_tunnel
    svc_text = S % "weightedWaypoints: [{destination: {address: /10.0.0.9}, weight: 2}]"
    (svc,) = parse_local_config(svc_text, SOURCE).services
    assert service_json(svc, ProxyState())["weightedWaypoints"] == [
        {"destination": {"destination": "/10.0.0.9", "hboneMtlsPort": 15008}, "weight": 2}]
