"""Which identities a proxy needs certificates for (app.local_identities), pure."""

from ipaddress import ip_address

from ztunnel_fast.app import local_identities
from ztunnel_fast.config import Config, ProxyMode, WorkloadInfo
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.state.workload import TunnelProtocol, Workload


def w(name, node, protocol=TunnelProtocol.HBONE, sa=None, ip="10.0.0.1"):
    return Workload(uid=name, name=name, namespace="ns", service_account=sa or name, node=node,
                    workload_ips=(ip_address(ip),), protocol=protocol)


STATE = ProxyState([w("a", "n1", ip="10.0.0.1"), w("b", "n1", sa="a", ip="10.0.0.2"),
                    w("c", "n2", ip="10.0.0.3"), w("legacy", "n1", TunnelProtocol.TCP, ip="10.0.0.4")])


def ident(sa):
    return Identity("cluster.local", "ns", sa)


def test_shared_mode_serves_hbone_workloads_of_its_node():
    assert local_identities(STATE, Config(node_name="n1")) == {ident("a")}  # a and b share one identity
    assert local_identities(STATE, Config(node_name="n2")) == {ident("c")}
    assert local_identities(STATE, Config()) == {ident("a"), ident("c")}  # no NODE_NAME: every HBONE workload
    assert local_identities(ProxyState(), Config(node_name="n1")) == set()


def test_dedicated_mode_serves_its_own_workload_only():
    config = Config(proxy_mode=ProxyMode.DEDICATED, workload_info=WorkloadInfo("ns", "legacy", "legacy"))
    assert local_identities(STATE, config) == {ident("legacy")}
    missing = Config(proxy_mode=ProxyMode.DEDICATED, workload_info=WorkloadInfo("ns", "gone", "gone"))
    assert local_identities(STATE, missing) == set()
