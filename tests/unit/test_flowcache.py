"""The outbound flow cache's decision (proxy/flowcache.py), table-driven, without sockets: which
flow classes the native workers may carry on their own, and that the entry's header block, with
the per-connection fields a worker adds the way it adds them, is the CONNECT the event loop's path
sends (hbone.headers.connect_request)."""

from ipaddress import ip_address

import hpack
import pytest

from ztunnel_fast.hbone import headers as hbone_headers
from ztunnel_fast.hbone.pool import PoolKey
from ztunnel_fast.proxy.flowcache import FlowClass, flow_entry, literal
from ztunnel_fast.proxy.route import decide
from ztunnel_fast.state.store import ProxyState, RoundRobin
from ztunnel_fast.xds.local import parse_local_config

from .test_route import CONFIG, WAYPOINTS


def _state(text):
    return ProxyState.from_local(parse_local_config(text, "test"))


def _entry(state, src, dst, port, *, source_uid="sleep", dedicated=False):
    source = state.workload_by_uid(source_uid) if source_uid else None
    route = decide(state, RoundRobin(), source=source, dst_ip=ip_address(dst), dst_port=port)
    flow = FlowClass(ip_address(src), ip_address(dst), port)
    key = PoolKey.of(source.identity if source else None, route.identities, route.next_hop or (ip_address(dst), port))
    return route, flow_entry(flow, route, source, key, dedicated=dedicated)


@pytest.mark.parametrize("config,dst,port,cached,why", [
    (CONFIG, "198.18.0.2", 80, True, "HBONE straight to a mesh workload"),
    (CONFIG, "198.19.0.10", 8000, False, "service VIP: an endpoint is picked round robin per connection"),
    (CONFIG, "198.18.0.4", 9090, False, "plain TCP to a non-mesh workload"),
    (CONFIG, "198.19.0.11", 9000, False, "service VIP of a non-mesh workload"),
    (CONFIG, "10.1.2.3", 80, False, "passthrough"),
    (CONFIG, "198.19.0.12", 80, False, "refused: no healthy upstream"),
    (CONFIG, "127.0.0.1", 15008, False, "refused: self call"),
    (WAYPOINTS, "198.18.0.2", 80, False, "through the workload's waypoint"),
    (WAYPOINTS, "198.19.0.13", 80, False, "weighted waypoints: sampled per connection"),
    (WAYPOINTS, "198.18.0.3", 70, True, "a mesh workload without a waypoint"),
])
def test_which_flows_are_cached(config, dst, port, cached, why):
    _, entry = _entry(_state(config), "198.18.0.1", dst, port)
    assert (entry is not None) is cached, why


def test_no_source_workload_is_cached_only_in_dedicated_mode():
    state = _state(CONFIG)
    assert _entry(state, "198.18.0.9", "198.18.0.2", 80, source_uid=None)[1] is None
    assert _entry(state, "198.18.0.9", "198.18.0.2", 80, source_uid=None, dedicated=True)[1] is not None


def test_the_entrys_block_with_the_per_connection_fields_is_the_event_loops_connect():
    state = _state(CONFIG)
    route, entry = _entry(state, "198.18.0.1", "198.18.0.2", 80)
    trace = "0123456789abcdef0123456789abcdef"
    # what a worker adds between prefix and suffix (_splice_flow.pxi: flow_lookup)
    forwarded = 'for="198.18.0.1:40000"' + entry.fwd_host.decode()
    block = (entry.prefix + literal("forwarded", forwarded)
             + literal("traceparent", f"00-{trace}-0011223344556677-00") + entry.suffix)
    decoded = hpack.Decoder().decode(block)
    expected = hbone_headers.connect_request(route.authority, client_ip=ip_address("198.18.0.1"), client_port=40000,
                                             trace_id=trace, source=state.workload_by_uid("sleep"))
    assert [n for n, _ in decoded] == [n for n, _ in expected]
    assert [v for n, v in decoded if n != "traceparent"] == [v for n, v in expected if n != "traceparent"]
    assert hbone_headers.trace_id_of(dict(decoded)["traceparent"]) == trace
    # stateless: literals without indexing leave the peer's dynamic table empty
    d = hpack.Decoder()
    d.decode(block)
    assert len(d.header_table.dynamic_entries) == 0


def test_the_listener_is_part_of_the_class():
    """In-pod mode: one listener per pod; the same addresses on two pods' listeners are two
    classes (the source workload is the pod's), and the entry keeps its listener."""
    state = _state(CONFIG)
    source = state.workload_by_uid("sleep")
    route = decide(state, RoundRobin(), source=source, dst_ip=ip_address("198.18.0.2"), dst_port=80)
    key = PoolKey.of(source.identity, route.identities, route.next_hop)
    a = FlowClass(ip_address("198.18.0.1"), ip_address("198.18.0.2"), 80, 2)
    b = FlowClass(ip_address("198.18.0.1"), ip_address("198.18.0.2"), 80, 3)
    assert a != b and len({a, b}) == 2
    assert FlowClass(ip_address("198.18.0.1"), ip_address("198.18.0.2"), 80).listener == 1  # node mode's
    entry = flow_entry(b, route, source, key, dedicated=False)
    assert entry is not None and entry.flow.listener == 3
