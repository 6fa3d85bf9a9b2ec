"""Log lines in ztunnel's shape, RUST_LOG-style levels, JSON output, duration format."""

import io
import logging

import orjson
import pytest

from ztunnel_fast.proxy.common import format_duration
from ztunnel_fast.telemetry import logs


@pytest.fixture
def stream():
    buf = io.StringIO()
    yield buf
    logs.setup_logging("info", "text", stream=io.StringIO())


def test_text_line_matches_the_guide_shape(stream):
    logs.setup_logging("info", "text", stream=stream)
    span = logs.Span("outbound", {"id": "7d344076d398339f1e51a74803d6c854"})
    logging.getLogger("ztunnel_fast.proxy.outbound").info("complete dur=%s", "269.272µs", extra={"span": span})
    line = stream.getvalue().strip()
    ts, rest = line.split(" ", 1)
    assert ts.endswith("Z") and "T" in ts and len(ts.split(".")[1]) == 7
    assert rest == " INFO outbound{id=7d344076d398339f1e51a74803d6c854}: ztunnel_fast::proxy::outbound: complete dur=269.272µs"


def test_fields_render_after_message_and_quote_spaces(stream):
    logs.setup_logging("info", "text", stream=stream)
    logging.getLogger("ztunnel_fast.x").warning("connection complete", extra={"fields": {"src.addr": "1.2.3.4:5", "error": "http status: 401 Unauthorized"}})
    assert stream.getvalue().strip().endswith('connection complete src.addr=1.2.3.4:5 error="http status: 401 Unauthorized"')
    assert " WARN " in stream.getvalue()


def test_json_format(stream):
    logs.setup_logging("info", "json", stream=stream)
    span = logs.Span("inbound", {"id": "ab", "peer_ip": "198.18.0.1"})
    logging.getLogger("ztunnel_fast.proxy.inbound").info("got CONNECT request to %s", "198.18.0.2:80",
                                                         extra={"span": span, "fields": {"bytes_sent": 12}})
    rec = orjson.loads(stream.getvalue())
    assert rec["level"] == "info" and rec["scope"] == "ztunnel_fast::proxy::inbound"
    assert rec["message"] == "got CONNECT request to 198.18.0.2:80"
    assert rec["spans"] == [{"name": "inbound", "id": "ab", "peer_ip": "198.18.0.1"}]
    assert rec["bytes_sent"] == 12


def test_levels_per_module_and_runtime_change(stream):
    logs.setup_logging("warn,ztunnel::proxy=debug", "text", stream=stream)
    logging.getLogger("ztunnel_fast.proxy.outbound").debug("visible")
    logging.getLogger("ztunnel_fast.app").info("hidden")
    assert "visible" in stream.getvalue() and "hidden" not in stream.getvalue()
    logs.set_levels("info")
    logging.getLogger("ztunnel_fast.proxy.outbound").debug("now hidden")
    logging.getLogger("ztunnel_fast.app").info("now visible")
    assert "now hidden" not in stream.getvalue() and "now visible" in stream.getvalue()
    assert logs.current_levels() == "info"


@pytest.mark.parametrize("spec", ["loud", "ztunnel=verbose", "info,x=nope"])
def test_bad_level_spec_is_refused(spec):
    with pytest.raises(ValueError):
        logs.parse_levels(spec)


@pytest.mark.parametrize("seconds,text", [
    (0.000269272, "269.272µs"), (0.0469099, "46.9099ms"), (1.5, "1.5s"), (0.001, "1ms"), (2.0, "2s"),
])
def test_duration_format(seconds, text):
    assert format_duration(seconds) == text
