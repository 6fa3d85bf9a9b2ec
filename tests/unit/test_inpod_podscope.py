"""A pod's identity in in-pod mode: the workload on NODE_NAME matching istio-cni's WorkloadInfo,
and the pod's view of the shared context (no sockets)."""

from ipaddress import ip_address

import yaml

from ztunnel_fast.config import Config
from ztunnel_fast.inpod.podproxy import PodScope, find_workload
from ztunnel_fast.inpod.protocol import WorkloadInfo
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.xds.local import parse_local_config


def state(*workloads):
    doc = {"workloads": [
        {"uid": f"u-{name}-{ns}-{node}", "name": name, "namespace": ns, "serviceAccount": sa, "workloadIps": [ip],
         "protocol": "HBONE", "node": node}
        for name, ns, sa, ip, node in workloads]}
    return ProxyState.from_local(parse_local_config(yaml.safe_dump(doc), "test"))


def test_find_workload_matches_name_namespace_service_account_and_node():
    st = state(("web", "demo", "web", "10.0.0.1", "node2"), ("web", "demo", "web", "10.0.0.2", "node1"),
               ("web", "other", "web", "10.0.0.3", "node1"))
    assert find_workload(st, WorkloadInfo("web", "demo", "web"), "node1").uid == "u-web-demo-node1"
    assert find_workload(st, WorkloadInfo("web", "demo", "web"), "node3") is None
    assert find_workload(st, WorkloadInfo("web", "demo", "other-sa"), "node1") is None
    assert find_workload(st, WorkloadInfo("db", "demo", "web"), "node1") is None


class Parent:
    """The parts of ProxyContext a PodScope reads."""

    def __init__(self, st, config):
        self.state = st
        self.config = config
        self.tracked = []

    def track(self, task):
        self.tracked.append(task)


def test_scope_serves_only_its_pod_and_follows_state_replacement():
    parent = Parent(state(("web", "demo", "web", "10.0.0.2", "node1")), Config(node_name="node1"))
    scope = PodScope(parent, WorkloadInfo("web", "demo", "web"), netns=None, thread=None)
    assert scope.source_workload(ip_address("10.9.9.9")).uid == "u-web-demo-node1"  # whatever leaves the pod
    assert scope.local_workload(ip_address("10.0.0.2")).uid == "u-web-demo-node1"
    assert scope.local_workload(ip_address("10.0.0.7")) is None  # not this pod's address
    assert scope.orig_src is True and scope.dedicated is False and scope.fast_path_node is None
    assert scope.config is parent.config  # everything else is the shared context's, live
    parent.state = state(("web", "demo", "web", "10.0.0.9", "node1"))
    assert scope.local_workload(ip_address("10.0.0.9")) is not None
    parent.state = state()
    assert scope.workload() is None
    assert PodScope(Parent(state(), Config(enable_orig_src=False)), WorkloadInfo("a", "b", "c"), None, None).orig_src \
        is False


def test_stop_accepting_takes_the_pods_inbound_verdicts_away_first():
    """Before the removal's ack (and so before its netns fd is closed): the scope stops installing
    and the inbound fast path forgets the pod's verdicts, once; no fast path: nothing to forget."""
    from ztunnel_fast.inpod.podproxy import PodProxy

    class InboundFast:
        def __init__(self):
            self.forgotten = []

        def forget_scope(self, scope):
            assert scope.stopped  # nothing can be installed again meanwhile
            self.forgotten.append(scope)

    parent = Parent(state(), Config())
    parent.fast_path = None
    parent.inbound_fast = InboundFast()
    proxy = PodProxy(parent, "uid-1", WorkloadInfo("web", "demo", "web"), None, None)
    assert proxy.scope.stopped is False
    proxy.stop_accepting()
    assert proxy.scope.stopped is True and parent.inbound_fast.forgotten == [proxy.scope]
    bare = PodProxy(Parent(state(), Config()), "uid-2", WorkloadInfo("web", "demo", "web"), None, None)
    bare.stop_accepting()  # a context without the inbound fast path (the pure engine)
    assert bare.scope.stopped is True
