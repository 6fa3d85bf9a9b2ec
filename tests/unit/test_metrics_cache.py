"""The per-connection-class label cache (telemetry/metrics.py Metrics.label_set): the emitted
labels always follow the workloads and services in force, the cache is bounded, and the samples
are the ones the uncached path produced (no zero-valued children for what never counted)."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from ztunnel_fast.config import Config
from ztunnel_fast.proxy.context import ProxyContext
from ztunnel_fast.state.service import Service
from ztunnel_fast.state.store import ProxyState
from ztunnel_fast.state.workload import Workload
from ztunnel_fast.telemetry import metrics as metrics_mod
from ztunnel_fast.telemetry.access import ConnectionRecord
from ztunnel_fast.telemetry.metrics import Metrics, Peer, traffic_labels

SRC = Workload(uid="s", name="sleep-1", namespace="demo", workload_name="sleep", canonical_name="sleep",
               canonical_revision="v1")
DST = Workload(uid="d", name="httpbin-1", namespace="demo", workload_name="httpbin", canonical_name="httpbin",
               canonical_revision="v1")


def samples(m: Metrics, family: str) -> list[tuple[dict, float]]:
    text = m.exposition(None)[0].decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return [(s.labels, s.value) for s in fams[family].samples if s.name.endswith("_total")]


def connect(m: Metrics, src: Workload, dst: Workload, service=None, error=None, flag="-") -> ConnectionRecord:
    record = ConnectionRecord(m, direction="outbound", src_addr=("10.0.0.1", 40000), dst_addr="10.0.0.2:15008",
                              source=Peer(src, src.identity), destination=Peer(dst, dst.identity),
                              service=service, mtls=True)
    record.complete(10, 20, error, flag)
    return record


def test_labels_follow_a_workload_change_through_replace_state():
    ctx = ProxyContext(config=Config(), state=ProxyState([SRC, DST]), certs=None, engine=None, h2=None)
    m = ctx.metrics
    connect(m, SRC, DST)
    connect(m, SRC, DST)
    assert [(s["destination_version"], v) for s, v in samples(m, "istio_tcp_connections_opened")] == [("v1", 2.0)]
    dst2 = replace(DST, canonical_revision="v2")
    ctx.replace_state(ProxyState([SRC, dst2]))
    assert m._label_sets == {}  # dropped with the state they were derived from
    connect(m, SRC, ctx.state.workload_by_uid("d"))
    opened = sorted((s["destination_version"], v) for s, v in samples(m, "istio_tcp_connections_opened"))
    assert opened == [("v1", 2.0), ("v2", 1.0)]


def test_cached_labels_equal_traffic_labels_and_never_alias_another_workload():
    m = Metrics()
    svc = Service(name="httpbin", namespace="demo", hostname="httpbin.demo.svc.cluster.local")
    a = connect(m, SRC, DST, svc)
    assert a.labels == traffic_labels(reporter="source", source=Peer(SRC, SRC.identity),
                                      destination=Peer(DST, DST.identity), service=svc, mtls=True)
    # an equal-valued but distinct workload object (a new snapshot) gets its own, equal labels
    b = connect(m, SRC, replace(DST), svc)
    assert b.labels == a.labels and b.label_set is not a.label_set
    other = connect(m, SRC, replace(DST, namespace="other"), svc)
    assert other.labels["destination_workload_namespace"] == "other"


def test_failure_flags_and_byte_counters_match_the_uncached_samples():
    m = Metrics()
    connect(m, SRC, DST, error="boom", flag="CONNECT")
    # nothing counted with response_flags "-" except the open: no zero-valued closed/failed samples
    closed = samples(m, "istio_tcp_connections_closed")
    assert [(s["response_flags"], v) for s, v in closed] == [("CONNECT", 1.0)]
    assert [(s["response_flags"], v) for s, v in samples(m, "istio_tcp_connections_failed")] == [("CONNECT", 1.0)]
    assert [(s["response_flags"], v) for s, v in samples(m, "istio_tcp_received_bytes")] == [("CONNECT", 10.0)]
    assert [(s["response_flags"], v) for s, v in samples(m, "istio_tcp_connections_opened")] == [("-", 1.0)]
    text = m.exposition(None)[0].decode()
    assert 'istio_tcp_sockets_open{reporter="source"} 0.0' in text


def test_label_set_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(metrics_mod, "MAX_LABEL_SETS", 8)
    m = Metrics()
    for i in range(20):
        connect(m, SRC, replace(DST, name=f"httpbin-{i}"))
        assert len(m._label_sets) <= 8
    assert len(samples(m, "istio_tcp_connections_opened")) == 20


def test_context_lookups_cached_per_snapshot_follow_replace_state():
    from ztunnel_fast.config import ProxyMode, WorkloadInfo

    config = Config(proxy_mode=ProxyMode.DEDICATED, workload_info=WorkloadInfo("demo", "httpbin-1", "default"))
    svc = Service(name="httpbin", namespace="demo", hostname="httpbin.demo.svc.cluster.local")
    ctx = ProxyContext(config=config, state=ProxyState([SRC, DST], [svc]), certs=None, engine=None, h2=None)
    assert ctx.own_workload() is ctx.state.workload_by_uid("d")
    assert ctx.service_by_hostname("httpbin.demo.svc.cluster.local") is svc
    moved = replace(DST, canonical_revision="v2")
    ctx.replace_state(ProxyState([SRC, moved]))  # the service is gone, the workload changed
    assert ctx.own_workload() is ctx.state.workload_by_uid("d") and ctx.own_workload().canonical_revision == "v2"
    assert ctx.service_by_hostname("httpbin.demo.svc.cluster.local") is None
    ctx.replace_state(ProxyState([SRC]))
    assert ctx.own_workload() is None


def gauge(m: Metrics) -> list[tuple[dict, float]]:
    text = m.exposition(None)[0].decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return [(s.labels, s.value) for s in fams["istio_tcp_sockets_open"].samples]


def test_deferred_counts_read_as_counting_each_connection_at_once():
    """Counts wait in the label sets until a read: every exposition shows what counting each
    connection at once would (opened, closed, bytes, failed, the open-sockets gauge), across reads."""
    m = Metrics()
    records = [ConnectionRecord(m, direction="outbound", src_addr=("10.0.0.1", 40000 + i), dst_addr="10.0.0.2:15008",
                                source=Peer(SRC, SRC.identity), destination=Peer(DST, DST.identity), mtls=True)
               for i in range(3)]
    assert gauge(m) == [({"reporter": "source"}, 3.0)]
    records[0].complete(10, 20)
    records[1].complete(0, 5, "io error")
    assert [v for _, v in samples(m, "istio_tcp_connections_opened")] == [3.0]
    assert [v for _, v in samples(m, "istio_tcp_connections_closed")] == [2.0]
    assert [v for _, v in samples(m, "istio_tcp_received_bytes")] == [10.0]
    assert [v for _, v in samples(m, "istio_tcp_sent_bytes")] == [25.0]
    assert [v for _, v in samples(m, "istio_tcp_connections_failed")] == [1.0]
    assert gauge(m) == [({"reporter": "source"}, 1.0)]
    records[2].complete(1, 0)
    records[2].complete(1, 0)  # completed once only
    assert [v for _, v in samples(m, "istio_tcp_connections_closed")] == [3.0]
    assert [v for _, v in samples(m, "istio_tcp_received_bytes")] == [11.0]
    assert gauge(m) == [({"reporter": "source"}, 0.0)]


def test_deferred_counts_are_bounded_without_reads(monkeypatch):
    """With nobody reading, the label sets waiting to be flushed stay under MAX_PENDING."""
    monkeypatch.setattr(metrics_mod, "MAX_PENDING", 4)
    m = Metrics()
    for i in range(10):
        m.connection_failed_early({**traffic_labels(reporter="source", source=Peer(), destination=Peer(),
                                                     service=None, mtls=False), "source_workload": f"w{i}"})
        assert len(m._pending) < 4
    failed = sorted((s["source_workload"], v) for s, v in samples(m, "istio_tcp_connections_failed"))
    assert failed == [(f"w{i}", 1.0) for i in range(10)]
