"""`proxy ready` comes with a warning when the proxy serves no workload (or more than ztunnel would)."""

from ztunnel_fast.app import serving_warnings
from ztunnel_fast.config import Config
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.xds.local import parse_local_config

CONFIG = """
workloads:
- {uid: a, name: a, namespace: ns, serviceAccount: a, workloadIps: [10.0.0.1], protocol: HBONE, node: node1}
- {uid: b, name: b, namespace: ns, serviceAccount: b, workloadIps: [10.0.0.2], protocol: HBONE, node: node2}
"""


def workloads(text=CONFIG):
    return ProxyState.from_local(parse_local_config(text, "test")).workloads()


def test_no_config_source():
    assert serving_warnings(Config.from_env({}), ()) == [
        "serving no workload: no config source (set XDS_ADDRESS, LOCAL_XDS_PATH or LOCAL_XDS)"]


def test_xds_workloads_arrive_later():
    # istiod's workloads come after `proxy ready`: only what is already wrong is reported
    xds = {"XDS_ADDRESS": "istiod.istio-system.svc:15012"}
    assert serving_warnings(Config.from_env({**xds, "NODE_NAME": "node1"}), ()) == []
    assert serving_warnings(Config.from_env(xds), ())[0].startswith("shared mode without NODE_NAME")


def test_shared_mode_without_node_name():
    got = serving_warnings(Config.from_env({"LOCAL_XDS": CONFIG}), workloads())
    assert len(got) == 1 and got[0].startswith("shared mode without NODE_NAME") and "set NODE_NAME" in got[0]
    empty = serving_warnings(Config.from_env({"LOCAL_XDS": "workloads: []"}), workloads("workloads: []"))
    assert empty[-1] == "serving no workload: the config has no workloads"


def test_shared_mode_node_without_workloads():
    got = serving_warnings(Config.from_env({"LOCAL_XDS": CONFIG, "NODE_NAME": "node9"}), workloads())
    assert got == ["serving no workload: no workload in the config has node 'node9' (NODE_NAME)"]


def test_no_warning_when_serving():
    assert serving_warnings(Config.from_env({"LOCAL_XDS": CONFIG, "NODE_NAME": "node2"}), workloads()) == []
    dedicated = Config.from_env({"LOCAL_XDS": CONFIG, "PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/a/a"})
    assert serving_warnings(dedicated, workloads()) == []
