"""A real Prometheus (Debian's `prometheus` and `promtool`) against ztunnel-fast's stats port.

Two mesh pods (sleep -> httpbin, one ztunnel-fast each); Prometheus runs inside httpbin's network
namespace with a temporary config scraping both proxies' :15020 every second (its own ztunnel-fast
on loopback, sleep's over the pod network) and a temporary storage directory, listening on
127.0.0.1 with a free port of that namespace.  PromQL over its HTTP API must give exactly the
bytes and connections the test moved, per reporter; `promtool check metrics` must accept the
exposition, except for the lint findings that ztunnel's own metric names trigger (listed below,
exact text), so any other finding fails.  Prometheus is a tracked process of the topology
(stopped at teardown, also on failure) and its directory is removed in a finally.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
SCRAPE_INTERVAL = "1s"  # short, so the counters reach Prometheus within a few polls
QUERY_WAIT_S = 60.0  # bound on waiting for Prometheus to see the final counter values
UP = 2 * MiB  # request direction per connection (client -> server)
DOWN = 3 * MiB  # response direction per connection
CONNECTIONS = 2

# `promtool check metrics` findings that ztunnel's own metric names trigger, accepted because they
# are the names Istio's ztunnel exports (dashboards and alerts depend on them); exact text.
# Debian 12's promtool 2.42 finds none in today's exposition (every counter ends in `_total`, every
# family has HELP, names are snake_case), so the set is empty: any finding fails the test.
ACCEPTED_LINT: set[str] = set()


def _free_port(lab, pod) -> int:
    """A free TCP port on 127.0.0.1 inside the pod's network namespace."""
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    out = lab.topology.run(pod.pod, ["python3", "-c", code]).stdout
    return int(out.strip())


def _query(lab, pod, port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    status, body = lab.http(pod, url)
    assert status == 200, body
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def _by_reporter(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("reporter", ""): float(r["value"][1]) for r in result}


def test_prometheus_sees_the_bytes_moved(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "halfclose", "--size", str(DOWN), port=80)
    lab.start_ztunnel(a)
    lab.start_ztunnel(b, redirect=False)

    promdir = Path(tempfile.mkdtemp(prefix="ztf-prometheus-"))
    try:
        port = _free_port(lab, b)
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{
                "job_name": "ztunnel",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [f"{a.ip}:15020", "127.0.0.1:15020"]}],
            }],
        }
        (promdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        check = subprocess.run(["promtool", "check", "config", str(promdir / "prometheus.yml")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(promdir / "prometheus.log", "wb")
        prom = lab.topology.popen(b.pod, [
            "prometheus", f"--config.file={promdir / 'prometheus.yml'}", f"--storage.tsdb.path={promdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        for i in range(CONNECTIONS):
            out = lab.client(a, "halfclose", b.ip, "80", "--size", str(UP))
            assert out["received"] == DOWN and out["error"] is None, out
            assert out["received_sha256"] == out["expected_sha256"], out

        pair = 'source_workload="sleep",destination_workload="httpbin",connection_security_policy="mutual_tls"'
        want = {
            f"sum by (reporter) (istio_tcp_received_bytes_total{{{pair}}})": CONNECTIONS * UP,
            f"sum by (reporter) (istio_tcp_sent_bytes_total{{{pair}}})": CONNECTIONS * DOWN,
            f"sum by (reporter) (istio_tcp_connections_opened_total{{{pair}}})": CONNECTIONS,
            f"sum by (reporter) (istio_tcp_connections_closed_total{{{pair}}})": CONNECTIONS,
        }
        expected = {q: {"source": float(v), "destination": float(v)} for q, v in want.items()}
        got: dict = {}
        deadline = time.monotonic() + QUERY_WAIT_S
        while time.monotonic() < deadline:
            assert prom.poll() is None, (promdir / "prometheus.log").read_text()
            try:
                got = {q: _by_reporter(_query(lab, b, port, q)) for q in want}
            except (AssertionError, ValueError):  # not listening yet
                got = {}
            if got == expected:
                break
            time.sleep(0.5)
        assert got == expected, (got, (promdir / "prometheus.log").read_text()[-2000:])
        up = _query(lab, b, port, 'up{job="ztunnel"}')
        assert sorted(r["metric"]["instance"] for r in up if r["value"][1] == "1") == sorted(
            [f"{a.ip}:15020", "127.0.0.1:15020"])
    finally:
        lab.topology.teardown()  # stops Prometheus (a tracked process) before its directory goes
        shutil.rmtree(promdir, ignore_errors=True)
    assert not promdir.exists()


def test_promtool_accepts_the_exposition(lab):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    lab.start_ztunnel(a)
    lab.start_ztunnel(b, redirect=False)
    out = lab.client(a, "echo", b.ip, "80", "--size", "4096")
    assert out["ok"], out  # so every metric family has samples with the full label set
    for pod in (a, b):
        for path in ("/metrics", "/stats/prometheus"):
            status, body = lab.http(pod, f"http://127.0.0.1:15020{path}")
            assert status == 200 and "istio_tcp_sent_bytes_total" in body
            res = subprocess.run(["promtool", "check", "metrics"], input=body + "\n", capture_output=True,
                                 text=True, timeout=60)
            findings = {line.strip() for line in (res.stdout + res.stderr).splitlines() if line.strip()}
            assert findings <= ACCEPTED_LINT, sorted(findings - ACCEPTED_LINT)
            assert findings or res.returncode == 0, res
    # The same check finds what it should (so an empty result above means a clean exposition).
    bad = subprocess.run(["promtool", "check", "metrics"], input="# TYPE fooBar counter\nfooBar 1\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and 'fooBar counter metrics should have "_total" suffix' in bad.stdout + bad.stderr
