"""The inbound flow cache's decision (proxy/flowcache.py: inbound_cacheable / inbound_entry),
table-driven, without sockets: which CONNECT classes the native workers may answer on their own.
Only an allow verdict that is a function of the class (connection + :authority) and the state is
cached; denials, dry-run policies, waypoint / application-tunnel delivery and anything not IPv4
take the event loop's path every time."""

from dataclasses import replace
from ipaddress import ip_address

import pytest

from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.proxy.flowcache import (
    AUTHORITY_MAX,
    InboundClass,
    inbound_cacheable,
    inbound_entry,
)
from ztunnel_fast.state.rbac import ALLOWED, NOT_ALLOWED, ConnectionInfo, Decision
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.state.workload import ApplicationTunnel, ApplicationTunnelProtocol
from ztunnel_fast.xds.local import parse_local_config

from .test_route import CONFIG

PEER = (ip_address("198.18.0.1"), 40000)
PEER_ID = Identity.parse("spiffe://cluster.local/ns/default/sa/sleep")
HERE = ip_address("198.18.0.2")


def _workload():
    state = ProxyState.from_local(parse_local_config(CONFIG, "test"))
    workload = state.workload_by_ip(HERE, "")
    assert workload is not None
    return workload


def _args(**over):
    workload = over.pop("workload", None) or _workload()
    target = over.pop("target", (HERE, 80))
    args = {"peer": PEER, "peer_id": PEER_ID, "arrived_on": HERE, "target": target, "workload": workload,
            "info": ConnectionInfo(PEER[0], target[0], target[1], PEER_ID),
            "decision": Decision(True, ALLOWED, None), "source": None, "netns": None}
    args.update(over)
    return args


@pytest.mark.parametrize("over,authority,cached,why", [
    ({}, "198.18.0.2:80", True, "allowed, to the address the connection arrived on"),
    ({"source": PEER[0]}, "198.18.0.2:80", True, "allowed, dialled from the peer's address (ORIG_SRC)"),
    ({"decision": Decision(False, NOT_ALLOWED, None)}, "198.18.0.2:80", False, "denied: never cached"),
    ({"decision": Decision(True, ALLOWED, None, ("ns/dry",))}, "198.18.0.2:80", False,
     "dry-run policies log a line per connection"),
    ({"arrived_on": None}, "198.18.0.2:80", False, "the listener does not know where it arrived"),
    ({"target": (ip_address("198.18.0.3"), 80)}, "198.18.0.3:80", False,
     "another address than the one it arrived on: waypoint or application-tunnel delivery"),
    ({"workload": replace(_workload(), application_tunnel=ApplicationTunnel(ApplicationTunnelProtocol.PROXY, 15088))},
     "198.18.0.2:80", False, "the sandwich: a PROXY header per connection"),
    ({"workload": replace(_workload(), application_tunnel=ApplicationTunnel(ApplicationTunnelProtocol.NONE, 0))},
     "198.18.0.2:80", False, "an application tunnel"),
    ({"netns": 7}, "198.18.0.2:80", True, "in-pod: upstream sockets made in the pod's open namespace fd"),
    ({"netns": 0}, "198.18.0.2:80", True, "in-pod: fd 0 is an fd like any other"),
    ({"netns": -1}, "198.18.0.2:80", False, "in-pod: the pod's namespace fd is closed (or the pod stopped)"),
    ({"netns": 7, "source": PEER[0]}, "198.18.0.2:80", True, "in-pod, dialled from the peer's address"),
    ({"peer": (ip_address("fd00::1"), 40000)}, "198.18.0.2:80", False, "an IPv6 peer"),
    ({"arrived_on": ip_address("fd00::2"), "target": (ip_address("fd00::2"), 80)}, "[fd00::2]:80", False,
     "an IPv6 destination"),
    ({}, "198.18.0.2:" + "0" * (AUTHORITY_MAX - 10) + "80", False, "an :authority longer than the native key"),
    ({}, "198.18.0.2:８0", False, "an :authority that is not ASCII"),
])
def test_which_connects_are_cached(over, authority, cached, why):
    flow = InboundClass(7, authority)
    args = _args(**over)
    entry = inbound_entry(flow, **args)
    assert (entry is not None) is cached, why
    assert inbound_cacheable(flow, peer_ip=args["peer"][0], arrived_on=args["arrived_on"], target=args["target"],
                             workload=args["workload"], decision=args["decision"], source=args["source"],
                             netns=args["netns"]) is cached


def test_the_entry_holds_what_each_connect_of_the_class_gets():
    flow = InboundClass(7, "198.18.0.2:80")
    args = _args(source=PEER[0])
    entry = inbound_entry(flow, **args)
    assert entry.flow == flow and entry.peer == PEER and entry.peer_id == PEER_ID
    assert entry.target == (HERE, 80) and entry.arrived_on == HERE and entry.source == PEER[0]
    assert entry.workload is args["workload"] and entry.info == args["info"]
    assert entry.netns is None  # our own namespace
    assert inbound_entry(flow, **_args(netns=9)).netns == 9  # the pod's: the workers create the socket there


class _Netns:
    def __init__(self, fd):
        self.fd = fd


class _PodScope:
    """The attributes scope_netns reads of inpod.podproxy.PodScope."""

    stopped = False

    def __init__(self, fd):
        self.netns = _Netns(fd)
        self.socket_factory = object()


class _NodeContext:
    socket_factory = None


class _FactoryOnly:
    """A context with a socket factory but no pod namespace: nowhere the workers could dial."""

    socket_factory = object()


def test_where_a_scopes_upstream_sockets_are_made():
    from ztunnel_fast.proxy.fastpath_inbound import scope_netns

    assert scope_netns(_NodeContext()) is None
    pod = _PodScope(11)
    assert scope_netns(pod) == 11
    pod.stopped = True  # its removal began: nothing is installed any more
    assert scope_netns(pod) == -1
    assert scope_netns(_PodScope(-1)) == -1  # its fd is closed
    assert scope_netns(_FactoryOnly()) == -1


def test_a_pod_scope_is_read_as_the_pod():
    import asyncio

    from ztunnel_fast.inpod.podproxy import PodScope
    from ztunnel_fast.proxy.fastpath_inbound import scope_netns

    class Parent:
        socket_factory = None

    class Thread:
        pass

    scope = PodScope(Parent(), None, _Netns(13), Thread())
    assert scope_netns(scope) == 13
    scope.stopped = True
    assert scope_netns(scope) == -1
    assert asyncio.iscoroutinefunction(scope.socket_factory)


@pytest.mark.parametrize("extra", [
    [],
    [("forwarded", 'for="198.18.0.1:4000";host=echo.demo.svc.cluster.local'), ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-00")],
    [("traceparent", "00-xyz-1-00"), ("baggage", "k8s.namespace.name=demo")],
    [("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-00"), ("traceparent", "00-" + "c" * 32 + "-" + "d" * 16 + "-00"),
     ("forwarded", "for=x"), ("forwarded", "for=y;host=z"), ("tracestate", "a=b")],
])
def test_the_fast_path_reads_a_request_as_check_connect_does(extra):
    from ztunnel_fast.config import SELF_PORTS
    from ztunnel_fast.hbone.headers import check_connect
    from ztunnel_fast.proxy.fastpath_inbound import request_telemetry

    headers = [(":method", "CONNECT"), (":authority", "198.18.0.2:80")] + extra
    checked = check_connect(headers, arrived_on=HERE, self_ports=SELF_PORTS)
    fields = [(k.encode(), v.encode()) for k, v in headers]
    assert request_telemetry(fields) == ("198.18.0.2:80", checked.trace_id, checked.forwarded)
