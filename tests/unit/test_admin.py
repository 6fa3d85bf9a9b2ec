"""Operator endpoints (aiohttp apps served in process) and the metric registry, without a netns."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_fast.admin.server import Readiness, admin_app, readiness_app, stats_app
from ztunnel_fast.app import drain_deadline
from ztunnel_fast.config import Config
from ztunnel_fast.state.workload import Workload
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.telemetry import logs
from ztunnel_fast.telemetry.metrics import LABELS, Metrics, Peer, traffic_labels


async def _get(app, method, path):
    async with TestClient(TestServer(app)) as client:
        resp = await client.request(method, path)
        return resp.status, await resp.text(), resp.headers.get("Content-Type", "")


def call(app, method, path):
    return asyncio.run(_get(app, method, path))


def test_readiness_reports_pending_tasks_until_done():
    r = Readiness("state manager", "certificates", "proxy")
    app = readiness_app(r)
    status, text, _ = call(app, "GET", "/healthz/ready")
    assert status == 500 and text == 'not ready, pending: {"certificates", "proxy", "state manager"}\n'
    r.done("state manager")
    r.done("proxy")
    assert call(readiness_app(r), "GET", "/healthz/ready")[:2] == (500, 'not ready, pending: {"certificates"}\n')
    r.done("certificates")
    assert call(readiness_app(r), "GET", "/healthz/ready")[:2] == (200, "ready\n")
    assert call(readiness_app(r), "POST", "/healthz/ready")[0] == 405
    r.block("drain")
    assert call(readiness_app(r), "GET", "/healthz/ready")[0] == 500


def test_admin_endpoints():
    quit_calls = []
    app = lambda: admin_app(config_dump=lambda: {"workloads": [1]}, quit=lambda: quit_calls.append(1),
                            initial_levels="info")
    status, text, ctype = call(app(), "GET", "/config_dump")
    assert status == 200 and orjson.loads(text) == {"workloads": [1]} and ctype.startswith("application/json")
    assert call(app(), "GET", "/")[0] == 200
    assert call(app(), "POST", "/quitquitquit")[:2] == (200, "OK\n") and quit_calls == [1]
    assert call(app(), "GET", "/quitquitquit")[0] == 405
    assert call(app(), "GET", "/stats")[0] == 404
    try:
        assert call(app(), "POST", "/logging?level=warn,ztunnel::proxy=debug")[1] == \
            "current log level is warn,ztunnel_fast::proxy=debug\n"
        assert call(app(), "POST", "/logging?level=nonsense")[0] == 400
        assert call(app(), "POST", "/logging?reset")[1] == "current log level is info\n"
    finally:
        logs.set_levels("info")


def test_metrics_exposition_parses_and_counts():
    m = Metrics()
    src = Workload(uid="s", name="sleep-1", namespace="demo", workload_name="sleep", canonical_name="sleep",
                   canonical_revision="v1")
    labels = traffic_labels(reporter="source", source=Peer(src, src.identity), destination=Peer(None, None),
                            service=None, mtls=False)
    assert set(labels) == set(LABELS)
    assert labels["destination_workload"] == "unknown" and labels["connection_security_policy"] == "unknown"
    assert labels["source_workload"] == "sleep" and labels["source_app"] == "sleep" and labels["source_version"] == "v1"
    m.connection_opened(labels)
    m.connection_closed({**labels, "response_flags": "CONNECT"}, 100, 250, failed=True)
    status, text, ctype = call(stats_app(m.exposition), "GET", "/stats/prometheus")
    assert status == 200 and ctype.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    recv = [s for s in fams["istio_tcp_received_bytes"].samples if s.name.endswith("_total")]
    assert [s.value for s in recv] == [100.0] and recv[0].labels["response_flags"] == "CONNECT"
    assert [s.value for s in fams["istio_tcp_sent_bytes"].samples if s.name.endswith("_total")] == [250.0]
    assert [s.value for s in fams["istio_tcp_connections_failed"].samples if s.name.endswith("_total")] == [1.0]
    assert fams["istio_build"].samples[0].labels == {"component": "ztunnel", "tag": fams["istio_build"].samples[0].labels["tag"]}
    status, text, ctype = call(stats_app(m.exposition), "GET", "/metrics")
    assert status == 200


def test_openmetrics_by_accept_header():
    m = Metrics()

    async def go():
        async with TestClient(TestServer(stats_app(m.exposition))) as client:
            resp = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
            return resp.headers["Content-Type"], await resp.text()

    ctype, text = asyncio.run(go())
    assert ctype.startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")


def test_drain_deadline_semantics():
    assert drain_deadline(Config.from_env({})) == 5.0
    assert drain_deadline(Config.from_env({"TERMINATION_GRACE_PERIOD_SECONDS": "30"})) == 25.0
    assert drain_deadline(Config.from_env({"TERMINATION_GRACE_PERIOD_SECONDS": "8"})) == 7.0
    assert drain_deadline(Config.from_env({"TERMINATION_GRACE_PERIOD_SECONDS": "30",
                                           "CONNECTION_TERMINATION_DEADLINE": "2s"})) == 2.0


def test_principal_label_uses_identity():
    ident = Identity("cluster.local", "demo", "sleep")
    labels = traffic_labels(reporter="destination", source=Peer(None, ident), destination=Peer(None, None),
                            service=None, mtls=True)
    assert labels["source_principal"] == "spiffe://cluster.local/ns/demo/sa/sleep"
    assert labels["connection_security_policy"] == "mutual_tls"
