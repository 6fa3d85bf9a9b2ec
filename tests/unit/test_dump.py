"""/config_dump shapes istioctl reads (reference ztunnel-master.md "Corrections"), without sockets."""

import yaml

from ztunnel_fast.config import Config
from ztunnel_fast.state.dump import config_dump, config_json, policy_json
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.xds.local import parse_local_config

CONFIG = """
policies:
- name: strict
  namespace: demo
  scope: Namespace
  action: Deny
  rules: [[[{notPrincipals: [Presence], principals: [{Presence: []}, {Suffix: /sa/sleep}]}]]]
"""


def test_presence_is_a_tuple_variant_and_pastes_back():
    state = ProxyState.from_local(parse_local_config(CONFIG, "test"))
    dumped = policy_json(state.policies()[0])
    match = dumped["rules"][0][0][0]
    assert match["notPrincipals"] == [{"Presence": []}]
    assert match["principals"] == [{"Presence": []}, {"Suffix": "/sa/sleep"}]
    again = parse_local_config(yaml.safe_dump({"policies": [dumped]}), "pasted")
    assert again.policies == state.policies()


def test_config_keys_are_camel_case_and_tokens_stay_secret():
    cfg = Config.from_env({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "demo/sleep/sleep-sa",
                           "AUTH_TOKEN": "eyJhbGciOi.secret", "XDS_ADDRESS": "istiod:15012"})
    out = config_json(cfg)
    assert out["workloadInfo"] == {"namespace": "demo", "name": "sleep", "serviceAccount": "sleep-sa"}
    assert out["xds"]["rootCa"] == "/var/run/secrets/istio/root-cert.pem"
    assert out["authToken"] == "<redacted>"
    assert config_json(Config.from_env({"AUTH_TOKEN": "/var/run/secrets/tokens/istio-token"}))["authToken"] == \
        "/var/run/secrets/tokens/istio-token"

    def keys(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from keys(v)
        elif isinstance(value, list):
            for v in value:
                yield from keys(v)

    dump = config_dump(ProxyState.from_local(parse_local_config(CONFIG, "t")), config=cfg, certificates=[],
                       version={})
    assert not [k for k in keys(dump) if "_" in k]
    assert dump["stagedServices"] == {} and set(dump["staticConfig"]) == {"workloads", "services", "policies"}
