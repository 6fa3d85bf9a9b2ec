"""The inbound fast path (ZTUNNEL_FAST_PATH on the destination's ztunnel): native workers answer
the peer's CONNECTs of classes the event loop allowed once (dial the app, 200, splice); the pure twin
ignores the switch and keeps today's path.  Whatever path answers a CONNECT, the outcome, the logs,
the access log and the metrics (reporter=destination) must be the same: cases run with the switch
on and off, cold and warm, on both engines.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import yaml

from .test_fast_path import FAST, access_lines, metrics

pytestmark = pytest.mark.e2e

STATS = re.compile(r"inbound fast path: (\d+) CONNECTs answered by the workers, (\d+) handed back, (\d+) flushes")


def inbound_stats(lab, zt) -> tuple[int, int, int] | None:
    """(answered by the workers, handed back, flushes) from the line drain logs; None: no fast path."""
    lab.stop_ztunnel(zt)
    found = [m for m in (STATS.search(line) for line in zt.lines("inbound fast path: ")) if m]
    return tuple(int(g) for g in found[-1].groups()) if found else None


def wait_lines(zt, text: str, n: int, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(zt.lines(text)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return zt.lines(text)


def _publish(lab, policies) -> None:
    """Write the config atomically (the watcher never reads half a file)."""
    cfg = lab.config()
    cfg["policies"] = policies
    tmp = lab.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, lab.config_path)


def _server_view(lab, zt, pod, client_ip) -> tuple:
    """The destination's inbound lines, access log and metrics, minus what differs per connection."""
    access = sorted(sorted(f.items()) for f in access_lines(zt, "inbound"))
    m = sorted((name, labels, v) for (name, labels), v in metrics(lab, pod).items())
    got = sorted(line.split("}", 1)[1] for line in zt.lines("got CONNECT request to"))
    refused = sorted(line.split("}", 1)[1] for line in zt.lines("refused CONNECT"))
    failed = sorted(line.split("err=", 1)[1] for line in zt.lines("failed dur="))
    return access, m, got, refused, failed


@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_sequential_connects_hash_checked_with_the_same_logs_and_metrics(lab, engine, fast):
    """40 connections one after the other through one HBONE connection: the first is the event
    loop's (it installs the class), the rest the workers'.  Each carries its own trace id from the
    client to the server's lines; the access log lines and metrics are those of the event loop's
    path."""
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a)
    zb = lab.start_ztunnel(b, redirect=False, **(FAST if fast else {}))
    n = 40
    out = lab.client(a, "echo", b.ip, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
    assert out["ok"] == n and out["failed"] == 0 and out["mismatched"] == 0, out
    done = wait_lines(zb, "complete dur=", n)
    assert len(done) == n
    proxy = za.lines(f"proxy to {b.ip}:80 using HBONE via {b.ip}:15008 type Direct")
    ids = {line.split("outbound{id=")[1].split("}")[0] for line in proxy}
    got = zb.lines(f"got CONNECT request to {b.ip}:80")
    assert len(got) == n and {line.split("inbound{id=")[1].split(" ")[0] for line in got} == ids
    assert all(f"peer_ip={a.ip} peer_id=spiffe://cluster.local/ns/demo/sa/sleep}}" in line for line in got)
    access = access_lines(zb, "inbound")
    assert len(access) == n and all(x == access[0] for x in access)
    assert access[0]["bytes_sent"] == "3000" and access[0]["bytes_recv"] == "3000", access[0]
    assert access[0]["src.workload"] == "sleep" and access[0]["dst.workload"] == "httpbin", access[0]
    m = metrics(lab, b)
    opened = [(dict(labels), v) for (name, labels), v in m.items() if name == "istio_tcp_connections_opened_total"]
    closed = [v for (name, _), v in m.items() if name == "istio_tcp_connections_closed_total"]
    assert [v for _, v in opened] == [n] and closed == [n], m
    assert opened[0][0]["reporter"] == "destination"
    assert sum(v for (name, _), v in m.items() if name == "istio_tcp_received_bytes_total") == n * 3000
    stats = inbound_stats(lab, zb)
    if fast and engine == "native":
        answered, handed, _ = stats
        assert answered == n - 1 and handed == 0, stats  # cold: the first one installs the class
    else:
        assert stats is None
