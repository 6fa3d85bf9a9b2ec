"""The outbound fast path (ZTUNNEL_FAST_PATH): native workers accept 15001 and carry the flows the
event loop decided once; the pure twin ignores the switch and keeps today's path.  Whatever path
carries a connection, the outcome, the logs, the access log and the metrics must be the same:
every case runs with the fast path on and off, cold and warm, on both engines.
"""

from __future__ import annotations

import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

FAST = {"ZTUNNEL_FAST_PATH": "true"}
STATS = re.compile(r"fast path: (\d+) connections carried by the workers, (\d+) by the event loop's path, (\d+) flushes")


def metrics(lab, pod) -> dict[tuple, float]:
    status, body = lab.http(pod, "http://127.0.0.1:15020/metrics")
    assert status == 200
    out: dict[tuple, float] = {}
    for fam in text_string_to_metric_families(body):
        if not fam.name.startswith("istio_tcp"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fast_stats(lab, zt) -> tuple[int, int, int] | None:
    """(carried by the workers, by the event loop, flushes) from the line drain logs; None: no fast path."""
    lab.stop_ztunnel(zt)
    found = [STATS.search(line) for line in zt.lines("fast path: ")]
    found = [m for m in found if m]
    return tuple(int(g) for g in found[-1].groups()) if found else None


def access_lines(zt, direction="outbound") -> list[dict[str, str]]:
    """The access log's fields, minus what differs per connection (client port, duration, ids)."""
    out = []
    for line in zt.lines("connection complete"):
        if f"direction={direction}" not in line:
            continue
        fields = dict(re.findall(r'(\S+?)=("[^"]*"|\S+)', line.split("connection complete", 1)[1]))
        fields.pop("duration", None)
        fields["src.addr"] = fields["src.addr"].rsplit(":", 1)[0]
        level = line.split()[1]
        out.append({"level": level, **fields})
    return out


def two_pods(lab, client_env):
    a = lab.pod("sleep", namespace="demo")
    b = lab.pod("httpbin", namespace="demo")
    lab.write_config()
    lab.app(b, "serve", "80", "echo", port=80)
    za = lab.start_ztunnel(a, **client_env)
    zb = lab.start_ztunnel(b, redirect=False)
    return a, b, za, zb


@pytest.mark.parametrize("fast", [False, True], ids=["fast-off", "fast-on"])
def test_sequential_connections_hash_checked_with_the_same_logs_and_metrics(lab, engine, fast):
    a, b, za, zb = two_pods(lab, FAST if fast else {})
    n = 40
    out = lab.client(a, "echo", b.ip, "80", "--size", "3000", "--count", str(n), "--concurrency", "1")
    assert out["ok"] == n and out["failed"] == 0, out
    deadline = time.monotonic() + 10
    while len(za.lines("complete dur=")) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(za.lines("complete dur=")) == n
    proxy = za.lines(f"proxy to {b.ip}:80 using HBONE via {b.ip}:15008 type Direct")
    assert len(proxy) == n
    ids = {line.split("outbound{id=")[1].split("}")[0] for line in proxy}
    assert len(ids) == n and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # the server saw each connection's trace id and the client's address in forwarded
    got = zb.lines(f"got CONNECT request to {b.ip}:80")
    assert len(got) == n
    assert {line.split("inbound{id=")[1].split(" ")[0] for line in got} == ids
    access = access_lines(za)
    assert len(access) == n and all(x == access[0] for x in access)
    assert access[0]["bytes_sent"] == "3000" and access[0]["bytes_recv"] == "3000", access[0]
    m = metrics(lab, a)
    opened = [v for (name, labels), v in m.items() if name == "istio_tcp_connections_opened_total"]
    closed = [v for (name, labels), v in m.items() if name == "istio_tcp_connections_closed_total"]
    assert opened == [n] and closed == [n], m
    stats = fast_stats(lab, za)
    if fast and engine == "native":
        carried, event_loop, _ = stats
        assert carried + event_loop == n and carried >= n - 5, stats  # cold: the first few
    else:
        assert stats is None
