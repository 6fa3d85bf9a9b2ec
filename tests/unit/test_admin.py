"""Operator endpoints (admin/http.py apps served in process on 127.0.0.1) and the metric
registry, without a netns."""

from __future__ import annotations

import asyncio
import http.client
import socket

import orjson
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_fast.admin.http import HttpServer, parse_target
from ztunnel_fast.admin.server import Readiness, admin_app, readiness_app, stats_app
from ztunnel_fast.app import drain_deadline
from ztunnel_fast.config import Config
from ztunnel_fast.state.workload import Workload
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.telemetry import logs
from ztunnel_fast.telemetry.metrics import LABELS, Metrics, Peer, traffic_labels


def _request(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, str, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), {"reason": resp.reason, **{k.lower(): v for k, v in resp.getheaders()}}
    finally:
        conn.close()


async def _served(app, fn):
    """Run the blocking client function `fn(port)` against `app` served on 127.0.0.1."""
    server = HttpServer(app)
    await server.start("127.0.0.1", 0)
    try:
        return await asyncio.to_thread(fn, server.port)
    finally:
        await server.close()


def call_full(app, method, path, headers=None):
    return asyncio.run(_served(app, lambda port: _request(port, method, path, headers)))


def call(app, method, path):
    status, body, headers = call_full(app, method, path)
    return status, body, headers.get("content-type", "")


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

    status, text, headers = call_full(stats_app(m.exposition), "GET", "/metrics",
                                      {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")


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


def admin_for_tests():
    return admin_app(config_dump=lambda: {"workloads": [{"name": "a", "ports": {80: 8080}}]}, quit=lambda: None,
                     initial_levels="info")


def test_response_headers_and_bodies_as_the_aiohttp_apps_answered():
    status, body, h = call_full(admin_for_tests(), "GET", "/config_dump")
    assert status == 200 and h["content-type"] == "application/json"
    assert body == orjson.dumps({"workloads": [{"name": "a", "ports": {80: 8080}}]},
                                option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    assert int(h["content-length"]) == len(body.encode()) and h["date"].endswith(" GMT")
    status, body, h = call_full(admin_for_tests(), "GET", "/")
    assert status == 200 and h["content-type"] == "text/html; charset=utf-8" and body.startswith("<!DOCTYPE html>")
    assert call(readiness_app(Readiness()), "GET", "/healthz/ready") == (200, "ready\n", "text/plain; charset=utf-8")
    status, body, h = call_full(admin_for_tests(), "GET", "/nowhere")
    assert (status, body, h["content-type"], h["reason"]) == (404, "404: Not Found", "text/plain; charset=utf-8",
                                                              "Not Found")
    status, body, h = call_full(admin_for_tests(), "PUT", "/config_dump")
    assert (status, body, h["allow"], h["reason"]) == (405, "405: Method Not Allowed", "GET,HEAD", "Method Not Allowed")


def test_head_answers_the_get_headers_without_a_body():
    status, body, h = call_full(admin_for_tests(), "HEAD", "/config_dump")
    assert status == 200 and body == "" and h["content-type"] == "application/json" and int(h["content-length"]) > 0
    status, body, _ = call_full(readiness_app(Readiness("proxy")), "HEAD", "/healthz/ready")
    assert (status, body) == (500, "")


def test_keep_alive_serves_several_requests_on_one_connection():
    r = Readiness("proxy")

    def two(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            out = []
            for _ in range(2):
                conn.request("GET", "/healthz/ready")
                resp = conn.getresponse()
                out.append((resp.status, resp.read().decode()))
                r.done("proxy")
            return out, conn.sock is not None
        finally:
            conn.close()

    out, still_open = asyncio.run(_served(readiness_app(r), two))
    assert out == [(500, 'not ready, pending: {"proxy"}\n'), (200, "ready\n")] and still_open


def test_malformed_request_gets_400_and_the_connection_is_closed():
    def raw(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz/ready HTTP/1.1\r\nno colon here\r\n\r\n")
            data = b""
            for _ in range(100):  # bounded: until the server closes
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data

    data = asyncio.run(_served(readiness_app(Readiness()), raw))
    assert data.startswith(b"HTTP/1.1 400 ") and b"connection: close" in data.lower()


def test_query_decoded_as_aiohttp_request_query():
    assert parse_target(b"/logging?reset") == ("/logging", {"reset": ""})
    assert parse_target(b"/logging?level=ztunnel_fast::proxy=debug,info") == \
        ("/logging", {"level": "ztunnel_fast::proxy=debug,info"})
    assert parse_target(b"/logging?level=a%3Db+c&level=second") == ("/logging", {"level": "a=b c"})
    assert parse_target(b"/config_dump") == ("/config_dump", {})


def test_on_ready_runs_once_when_the_last_start_up_task_is_done():
    r = Readiness("proxy", "certificates")
    calls = []
    r.on_ready(lambda: calls.append(sorted(r.pending)))
    r.done("proxy")
    assert calls == []
    r.done("certificates")
    assert calls == [[]]
    r.block("drain")
    r.done("drain")  # ready again later (a drain that ends): start-up's callbacks do not run twice
    assert calls == [[]]
