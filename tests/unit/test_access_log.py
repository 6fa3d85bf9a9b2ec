"""telemetry/access.py: the access log line is the same whether addresses come as text or as
(ip, port), and nothing is formatted when the access logger's level drops the line."""

from __future__ import annotations

import io
from ipaddress import ip_address

import pytest

from ztunnel_fast.state.workload import Workload
from ztunnel_fast.telemetry import access, logs
from ztunnel_fast.telemetry.access import ConnectionRecord, log_early_deny
from ztunnel_fast.telemetry.metrics import Metrics, Peer

SRC = Workload(uid="s", name="sleep-1", namespace="demo")
DST = Workload(uid="d", name="httpbin-1", namespace="demo")


@pytest.fixture
def stream():
    buf = io.StringIO()
    yield buf
    logs.setup_logging("info", "text", stream=io.StringIO())


def record(src_addr, dst_addr, hbone_addr):
    return ConnectionRecord(Metrics(), direction="inbound", src_addr=src_addr, dst_addr=dst_addr,
                            hbone_addr=hbone_addr, source=Peer(SRC, SRC.identity),
                            destination=Peer(DST, DST.identity), mtls=True)


def test_tuple_and_text_addresses_give_the_same_line(stream):
    logs.setup_logging("info", "text", stream=stream)
    record("10.0.0.1:4000", "[fd00::2]:80", "[fd00::2]:80").complete(5, 7)
    record((ip_address("10.0.0.1"), 4000), (ip_address("fd00::2"), 80), (ip_address("fd00::2"), 80)).complete(5, 7)
    lines = [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    strip = [line.rsplit(" duration=", 1)[0] for line in lines]
    assert strip[0] == strip[1]
    assert strip[0].endswith(
        "connection complete src.addr=10.0.0.1:4000 src.workload=sleep-1 src.namespace=demo "
        "src.identity=spiffe://cluster.local/ns/demo/sa/default dst.addr=[fd00::2]:80 "
        "dst.hbone_addr=[fd00::2]:80 dst.workload=httpbin-1 dst.namespace=demo "
        "dst.identity=spiffe://cluster.local/ns/demo/sa/default direction=inbound bytes_sent=5 bytes_recv=7")


def test_nothing_is_formatted_when_the_level_is_off(stream, monkeypatch):
    logs.setup_logging("warn", "text", stream=stream)

    def boom(*_):
        raise AssertionError("formatted an address for a dropped line")

    monkeypatch.setattr(access, "format_addr", boom)
    record((ip_address("10.0.0.1"), 4000), (ip_address("10.0.0.2"), 80), None).complete(1, 2)
    assert stream.getvalue() == ""
    logs.setup_logging("error", "text", stream=stream)
    log_early_deny(None, src_addr=(ip_address("10.0.0.1"), 1), dst_addr=(ip_address("10.0.0.2"), 2),
                   direction="outbound", error="x")
    assert stream.getvalue() == ""
    # an error completion is still written at warn, with the addresses formatted then
    logs.setup_logging("warn", "text", stream=stream)
    monkeypatch.undo()
    record((ip_address("10.0.0.1"), 4000), (ip_address("10.0.0.2"), 80), None).complete(0, 0, "refused")
    assert "src.addr=10.0.0.1:4000" in stream.getvalue() and 'error=refused' in stream.getvalue()
