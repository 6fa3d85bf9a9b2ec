"""The bench harness's pure parts: parsers (iperf3 JSON, wrk output), metrics and ratios, the table,
the Envoy bootstraps and the nginx config.  No sockets, no namespaces, no timing thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import parse, report
from bench.cli import build_parser, settings_from
from bench.settings import DEFAULT, MIB, QUICK

# ---------------------------------------------------------------------------------------- iperf3
IPERF_OK = {
    "start": {"version": "iperf 3.12", "test_start": {"protocol": "TCP", "num_streams": 4, "omit": 1, "duration": 10}},
    "intervals": [],
    "end": {
        "streams": [{}, {}, {}, {}],
        "sum_sent": {"start": 0, "end": 10.0, "seconds": 10.0, "bytes": 2_500_000_000,
                     "bits_per_second": 2.0e9, "retransmits": 7, "sender": True},
        "sum_received": {"start": 0, "end": 10.002, "seconds": 10.002, "bytes": 2_499_000_000,
                         "bits_per_second": 1.9988e9, "sender": True},
    },
}


def test_iperf3_reports_the_receiver_side():
    r = parse.parse_iperf3(json.dumps(IPERF_OK))
    assert r.bytes_received == 2_499_000_000
    assert r.bits_per_second == pytest.approx(1.9988e9)
    assert r.gbps == pytest.approx(1.9988)
    assert r.retransmits == 7
    assert r.streams == 4
    assert r.as_dict()["gbps"] == pytest.approx(1.9988)


def test_iperf3_error_document_is_refused_with_its_message():
    doc = {"start": {"connected": []}, "intervals": [], "end": {},
           "error": "unable to connect to server: Connection refused"}
    with pytest.raises(parse.ParseError, match="Connection refused"):
        parse.parse_iperf3(json.dumps(doc))


@pytest.mark.parametrize("text", ["", "not json", "[]", json.dumps({"start": {}, "end": {}})])
def test_iperf3_unfinished_or_garbage_is_refused(text):
    with pytest.raises(parse.ParseError):
        parse.parse_iperf3(text)


# ------------------------------------------------------------------------------------------- wrk
WRK_TEXT = """\
Running 10s test @ http://198.18.0.2:80/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   193.28us   54.01us   3.29ms   93.41%
    Req/Sec    40.89k     1.52k   43.60k    78.22%
  Latency Distribution
     50%  183.00us
     75%  202.00us
     90%  228.00us
     99%    1.36ms
  406879 requests in 10.10s, 468.77MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  40286.14
Transfer/sec:     46.41MB
"""


def test_wrk_text_with_latency_distribution():
    r = parse.parse_wrk(WRK_TEXT)
    assert r.requests == 406879
    assert r.duration_s == pytest.approx(10.10)
    assert r.rps == pytest.approx(406879 / 10.10)
    assert r.p50_ms == pytest.approx(0.183)
    assert r.p90_ms == pytest.approx(0.228)
    assert r.p99_ms == pytest.approx(1.36)
    assert r.mean_ms == pytest.approx(0.19328)
    assert r.max_ms == pytest.approx(3.29)
    assert r.errors == 3 + 1 + 5


def test_wrk_json_line_from_the_lua_hook_wins_over_the_text():
    line = parse.WRK_JSON_MARK + json.dumps({
        "requests": 1000, "duration_us": 2_000_000, "bytes": 1, "connect_errors": 0, "read_errors": 0,
        "write_errors": 0, "status_errors": 2, "timeouts": 0,
        "latency_us": {"min": 50, "mean": 120.5, "max": 9000, "p50": 100, "p90": 300, "p99": 2500},
    })
    r = parse.parse_wrk(WRK_TEXT + line + "\n")
    assert (r.requests, r.duration_s, r.rps) == (1000, 2.0, 500.0)
    assert (r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms) == (0.1, 0.3, 2.5, 9.0)
    assert r.errors == 2


def test_wrk_lua_hook_prints_the_marker():
    assert "WRK_JSON" in parse.WRK_LUA and parse.WRK_JSON_MARK.strip() in parse.WRK_LUA
    assert "done = function(summary, latency, requests)" in parse.WRK_LUA


@pytest.mark.parametrize("text", ["", "Usage: wrk <options> <url>", WRK_TEXT.replace("     99%    1.36ms\n", "")])
def test_wrk_without_figures_is_refused(text):
    with pytest.raises(parse.ParseError):
        parse.parse_wrk(text)


def test_wrk_time_units():
    text = WRK_TEXT.replace("183.00us", "1.50s").replace("1.36ms", "2.00m")
    r = parse.parse_wrk(text)
    assert r.p50_ms == 1500.0 and r.p99_ms == 120_000.0


def test_ss_line_count():
    assert parse.count_ss_lines("a\n\n b \n") == 2
    assert parse.count_ss_lines("") == 0


def test_ss_bytes_received_sums_every_socket():
    text = ("0 0 198.18.0.2:5201 198.18.0.2:55816\n\t cubic bytes_sent:5 bytes_acked:5 bytes_received:165 segs_out:6\n"
            "0 0 198.18.0.2:5201 198.18.0.2:55818\n\t cubic bytes_received:1000 segs_in:8\n")
    assert parse.ss_bytes_received(text) == 1165
    assert parse.ss_bytes_received("") == 0


# ------------------------------------------------------------------------------ metrics, ratios
def _iperf(gbps, nbytes=10**9, cpu=None):
    return {"gbps": gbps, "bytes_received": nbytes, "proxy_cpu_s_per_gb": cpu}


def _wrk(rps, p50, p99):
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99}


def _raw(gbps, rps, cpu=None, rss=None):
    raw = {"tput1": _iperf(gbps, cpu=cpu), "tput4": _iperf(gbps * 2, cpu=cpu), "cpu": _iperf(gbps, cpu=cpu),
           "http_ka": _wrk(rps, 0.2, 1.0), "http_nc": _wrk(rps / 4, 0.8, 4.0)}
    if rss is not None:
        raw["idle"] = {"rss": {"client": rss, "server": rss * 3}}
        raw["tunnels"] = {"requested": 100, "opened": 100, "alive": 99,
                          "rss_before": {"client": 10 * MIB, "server": 10 * MIB},
                          "rss_at": {"client": 10 * MIB + 100 * 1024 * 3, "server": 10 * MIB + 100 * 1024},
                          "proxy_sockets": {"client": 101, "server": 101},
                          "established": {"client_pod": 200, "server_pod": 101, "hbone": 1}}
    else:
        raw["idle"] = {"rss": {}}
        raw["tunnels"] = {"requested": 100, "opened": 100, "alive": 100, "rss_before": {}, "rss_at": {},
                          "proxy_sockets": {}, "established": {"client_pod": 200, "server_pod": 100, "hbone": 0}}
    return raw


def test_metrics_from_raw_proxied():
    m = report.metrics_from_raw(_raw(2.0, 10_000, cpu=3.5, rss=40 * MIB), proxied=True)
    assert m["throughput_1"] == 2.0 and m["throughput_4"] == 4.0
    assert m["cpu_per_gb"] == 3.5
    assert (m["rps_keepalive"], m["p50_keepalive"], m["p99_keepalive"]) == (10_000, 0.2, 1.0)
    assert (m["rps_newconn"], m["p50_newconn"], m["p99_newconn"]) == (2_500, 0.8, 4.0)
    assert m["idle_rss"] == pytest.approx(80.0)  # mean of 40 and 120 MiB
    assert m["rss_per_tunnel"] == pytest.approx(4.0)  # 400 KiB more over 100 tunnels
    assert m["tunnels_rss"] == pytest.approx(20 + 400 / 1024)
    assert m["tunnels_open"] == 99
    assert m["proxy_sockets"] == 202 and m["hbone_connections"] == 1


def test_metrics_of_direct_have_no_proxy_figures():
    m = report.metrics_from_raw(_raw(10.0, 50_000), proxied=False)
    assert m["throughput_1"] == 10.0
    for key in ("cpu_per_gb", "idle_rss", "tunnels_rss", "rss_per_tunnel", "proxy_sockets", "hbone_connections"):
        assert m[key] is None, key


def test_metrics_missing_steps_are_none():
    m = report.metrics_from_raw({}, proxied=True)
    spreads = {f"{k}_{end}" for k in report.WITH_SPREAD for end in ("min", "max")}
    assert set(m) == set(report.BY_KEY) | spreads and all(v is None for v in m.values())


def test_ratio():
    assert report.ratio(2.0, 4.0) == 0.5
    assert report.ratio(None, 4.0) is None
    assert report.ratio(2.0, None) is None
    assert report.ratio(2.0, 0.0) is None


def _doc(**setups):
    return {"settings": {"tunnels": 100, "iperf_seconds": 10, "iperf_omit": 1, "cpu_bytes": 2 << 30,
                         "wrk_threads": 1, "wrk_connections": 8, "wrk_seconds": 10, "body_bytes": 1024},
            "machine": {"cpu_model": "cpu", "nproc": 2, "kernel": "6"}, "started": "2026-01-01T00:00:00",
            "setups": setups}


def _setup(raw, proxied=True, errors=None, available=True, label="x"):
    return {"label": label, "available": available, "reason": None if available else "not built", "info": {},
            "raw": raw, "errors": errors or {}, "metrics": report.metrics_from_raw(raw, proxied)}


def test_ratios_vs_direct_and_vs_envoy():
    doc = _doc(direct=_setup(_raw(10.0, 40_000), proxied=False), native=_setup(_raw(2.0, 10_000, 3.0, 40 * MIB)),
               envoy=_setup(_raw(4.0, 20_000, 1.5, 60 * MIB)))
    r = report.ratios({k: v["metrics"] for k, v in doc["setups"].items()})
    assert set(r) == {"native/direct", "envoy/direct", "native/envoy"}  # no pure in this run
    assert r["native/direct"]["throughput_1"] == pytest.approx(0.2)
    assert r["native/envoy"]["throughput_1"] == pytest.approx(0.5)
    assert r["native/envoy"]["cpu_per_gb"] == pytest.approx(2.0)
    assert r["native/direct"]["cpu_per_gb"] is None  # direct has no proxy
    assert r["native/envoy"]["tunnels_open"] is None  # counts are not compared


def test_table_rows_values_ratios_and_failures():
    native_raw = _raw(2.0, 10_000, 3.0, 40 * MIB)
    del native_raw["tput4"]  # that step failed
    doc = _doc(
        direct=_setup(_raw(10.0, 40_000), proxied=False),
        native=_setup(native_raw, errors={"tput4": "stalled"}),
        pure=_setup({}, available=False),
        envoy=_setup(_raw(4.0, 20_000, 1.5, 60 * MIB)),
    )
    header, rows = report.table(doc)
    assert header[:5] == ["figure", "direct", "native", "pure", "Envoy"]
    assert "native ÷ direct" in header and "native ÷ Envoy" in header and "pure ÷ Envoy" in header
    by_label = {r[0]: r for r in rows}
    t1 = by_label["throughput, 1 stream (Gbit/s)"]
    assert t1[1:5] == ["10.00", "2.00", "n/a", "4.00"]
    assert t1[header.index("native ÷ direct")] == "0.20×"
    assert t1[header.index("native ÷ Envoy")] == "0.50×"
    assert t1[header.index("pure ÷ Envoy")] == "–"
    assert by_label["throughput, 4 streams (Gbit/s)"][2] == "failed"
    cpu = by_label["proxy CPU, both sides (s/GB)"]
    assert cpu[1] == "–" and cpu[2] == "3.00"
    assert "RSS, 100 tunnels, both sides (MiB)" in by_label
    assert all(len(r) == len(header) for r in rows)


def test_renderers_keep_every_cell():
    header, rows = ["figure", "a", "b ÷ a"], [["x (u)", "1.00", "0.50×"], ["y", "–", "–"]]
    plain = report.render_plain(header, rows).splitlines()
    assert len(plain) == 4 and plain[0].startswith("figure") and "0.50×" in plain[2]
    md = report.render_markdown(header, rows).splitlines()
    assert md[0] == "| figure | a | b ÷ a |" and md[1] == "|---|---:|---:|" and md[2] == "| x (u) | 1.00 | 0.50× |"
    parts = report.split(header, rows)
    assert [p[0] for p in parts] == [["figure", "a"], ["figure", "b ÷ a"]]
    assert report.rich_width(header, rows) > sum(len(h) for h in header)


def test_notes_name_failures_and_unavailable_setups():
    native = _setup({}, errors={"tput1": "iperf3 made no progress"})
    native["retried"] = {"tput1": "iperf3 made no progress", "cpu": "stalled"}
    doc = _doc(native=native, pure=_setup({}, available=False))
    text = "\n".join(report.notes(doc))
    assert "native: tput1 failed: iperf3 made no progress" in text
    assert "native: cpu: first attempt failed (stalled); the figure is from a retry" in text
    assert "tput1: first attempt" not in text
    assert "pure: not measured: not built" in text


def test_notes_name_tunnels_that_did_not_open():
    raw = _raw(2.0, 10_000, 3.0, 40 * MIB)
    raw["tunnels"]["open_failures"] = {"TimeoutError": 1}
    text = "\n".join(report.notes(_doc(native=_setup(raw))))
    assert "native: only 99 of 100 tunnels open and alive, figures marked * are with those" in text
    assert "open failures {'TimeoutError': 1}" in text
    rows = dict((r[0], r[1:]) for r in report.table(_doc(native=_setup(raw)))[1])
    assert rows["RSS per tunnel, both sides (KiB)"][0] == "4.00*"
    assert rows["throughput, 1 stream (Gbit/s)"][0] == "2.00"


def test_write_results(tmp_path: Path):
    doc = _doc(direct=_setup(_raw(10.0, 40_000), proxied=False))
    paths = report.write_results(doc, tmp_path, "20260101T000000Z")
    assert json.loads(paths["json"].read_text())["setups"]["direct"]["metrics"]["throughput_1"] == 10.0
    assert paths["latest_json"].read_text() == paths["json"].read_text()
    assert "| figure | direct |" in paths["md"].read_text()
    partial = report.write_results(doc, tmp_path / "p", "x-interrupted", latest=False)
    assert "latest_json" not in partial and not (tmp_path / "p" / "latest.json").exists()


# ---------------------------------------------------------------------------- settings and CLI
def test_quick_preset_is_shorter_and_overrides_apply():
    assert QUICK.iperf_seconds < DEFAULT.iperf_seconds and QUICK.tunnels < DEFAULT.tunnels == 10_000
    args = build_parser().parse_args(["--quick", "--tunnels", "500", "--cpu-mib", "64"])
    s = settings_from(args)
    assert s.tunnels == 500 and s.cpu_bytes == 64 * MIB and s.wrk_seconds == QUICK.wrk_seconds
    assert settings_from(build_parser().parse_args([])) == DEFAULT


# -------------------------------------------------------------------- Envoy bootstraps, nginx
def test_transparent_originator_shape():
    from bench.envoy_pair import transparent_originator

    certs = SimpleNamespace(cert=Path("/c.pem"), key=Path("/k.pem"))
    cfg = transparent_originator("198.18.0.1", "198.18.0.2", certs, "/root.pem", ["spiffe://td/ns/b/sa/server"])
    listener = cfg["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15001}
    assert listener["listener_filters"][0]["name"] == "envoy.filters.listener.original_dst"
    tcp_proxy = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert tcp_proxy["tunneling_config"]["hostname"] == "%DOWNSTREAM_LOCAL_ADDRESS%"
    cluster = cfg["static_resources"]["clusters"][0]
    opt = cluster["upstream_bind_config"]["socket_options"][0]
    assert (opt["level"], opt["name"], opt["int_value"]) == (1, 36, 1337)  # SOL_SOCKET, SO_MARK
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] >= 10_000
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    san = tls["validation_context"]["match_typed_subject_alt_names"][0]
    assert san["matcher"]["exact"] == "spiffe://td/ns/b/sa/server"


def test_multi_port_terminator_routes_each_authority_to_its_app():
    from bench.envoy_pair import multi_port_terminator

    certs = SimpleNamespace(cert=Path("/c.pem"), key=Path("/k.pem"))
    cfg = multi_port_terminator("198.18.0.2", [80, 5201], certs, "/root.pem", ["spiffe://td/ns/b/sa/client"])
    res = cfg["static_resources"]
    hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http2_protocol_options"]["allow_connect"] is True
    vhosts = {v["domains"][0]: v["routes"][0]["route"]["cluster"] for v in hcm["route_config"]["virtual_hosts"]}
    assert vhosts == {"198.18.0.2:80": "app_80", "198.18.0.2:5201": "app_5201"}
    ports = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
             ["socket_address"]["port_value"] for c in res["clusters"]}
    assert ports == {"app_80": 80, "app_5201": 5201}
    tls = res["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    with pytest.raises(ValueError):
        multi_port_terminator("198.18.0.2", [], certs, "/root.pem", ["spiffe://td/ns/b/sa/client"])


def test_nginx_conf_keeps_every_path_in_its_root(tmp_path: Path):
    from bench.lab import nginx_conf

    conf = nginx_conf(tmp_path, "198.18.0.2", 80, 16)
    assert "listen 198.18.0.2:80" in conf and f'return 200 "{"x" * 16}"' in conf
    assert "daemon off;" in conf and "access_log off;" in conf
    for line in conf.splitlines():
        if line.strip().split(" ")[0].endswith(("_path", "pid", "error_log")):
            assert str(tmp_path) in line, line


# ------------------------------------- issue 11 and 14 figures: per-connection CPU, scaling, syscalls
def _raw_more(gbps, rps, cpu, us_per_conn, one, two, syscalls_total):
    raw = _raw(gbps, rps, cpu, 40 * MIB)
    raw["http_nc"]["proxy_cpu_us_per_request"] = us_per_conn
    raw["scaling"] = {"by_threads": {"1": _wrk(one, 1.0, 5.0), "2": _wrk(two, 1.0, 5.0)}}
    raw["syscalls"] = {"tool": "perf stat (syscall tracepoints)", "per_gb": {
        "read": syscalls_total * 0.5, "write": syscalls_total * 0.3, "epoll": syscalls_total * 0.15,
        "other": syscalls_total * 0.05, "total": syscalls_total}}
    raw["topology2"] = {"topology": "veth", "tput1": _iperf(gbps * 1.1), "tput4": _iperf(gbps * 1.2),
                        "cpu": _iperf(gbps, cpu=cpu and cpu * 0.9)}
    return raw


def test_metrics_per_connection_cpu_scaling_syscalls_and_second_topology():
    m = report.metrics_from_raw(_raw_more(2.0, 10_000, 3.0, 350.0, 1_000, 1_500, 200_000), proxied=True)
    assert m["cpu_per_newconn"] == 350.0
    assert (m["rps_newconn_1t"], m["rps_newconn_2t"]) == (1_000, 1_500)
    assert m["newconn_scaling"] == pytest.approx(1.5)
    assert m["syscalls_per_gb"] == 200_000 and m["syscalls_read_per_gb"] == 100_000
    assert m["syscalls_epoll_per_gb"] == pytest.approx(30_000) and m["syscalls_other_per_gb"] == pytest.approx(10_000)
    assert m["throughput_1_t2"] == pytest.approx(2.2) and m["cpu_per_gb_t2"] == pytest.approx(2.7)
    direct = report.metrics_from_raw(_raw_more(10.0, 40_000, None, None, 0, 0, 0), proxied=False)
    assert direct["throughput_1_t2"] == pytest.approx(11.0)
    assert all(direct[k] is None for k in ("cpu_per_newconn", "syscalls_per_gb", "newconn_scaling", "cpu_per_gb_t2"))


def test_table_has_envoy_at_both_concurrencies_and_the_configuration_line():
    doc = _doc(native=_setup(_raw_more(2.0, 10_000, 3.0, 400.0, 1_000, 1_800, 100_000)),
               envoy=_setup(_raw_more(2.0, 10_000, 3.0, 800.0, 2_000, 3_000, 200_000)),
               envoy1=_setup(_raw_more(1.0, 10_000, 2.0, 500.0, 0, 0, 150_000)))
    doc["settings"].update(topology="bridge", second_topology="veth", worker_threads=2, scaling_threads=[1, 2],
                           syscall_bytes=512 * MIB, syscall_tool="auto")
    doc["setups"]["envoy"]["info"] = {"concurrency": 2}
    doc["setups"]["envoy1"]["info"] = {"concurrency": 1}
    header, rows = report.table(doc)
    assert header[1:4] == ["native", "Envoy", "Envoy c1"]
    by_label = {r[0]: r for r in rows}
    cpu_nc = by_label["proxy CPU per new connection, both sides (µs)"]
    assert cpu_nc[header.index("native ÷ Envoy")] == "0.50×"
    assert cpu_nc[header.index("native ÷ Envoy c1")] == "0.80×"
    sc = by_label["new conn rate, 2 threads ÷ 1 thread (×)"]
    assert sc[1:3] == ["1.80", "1.50"] and sc[header.index("native ÷ Envoy")] == "1.20×"
    assert by_label["proxy syscalls, both sides (/GB)"][header.index("native ÷ Envoy c1")] == "0.67×"
    assert "throughput, 1 stream, veth (Gbit/s)" in by_label
    conf = report.configuration(doc)
    assert "topology bridge (throughput and CPU/GB also on veth)" in conf
    assert "Envoy --concurrency 1 and 2" in conf and "ZTUNNEL_WORKER_THREADS=2" in conf
    assert "512 MiB transfer (perf stat (syscall tracepoints))" in conf
    assert report.notes(doc)[0] == conf


def test_table_without_a_second_topology_has_no_such_rows():
    doc = _doc(native=_setup(_raw(2.0, 10_000, 3.0, 40 * MIB)))
    doc["settings"]["second_topology"] = None
    labels = [r[0] for r in report.table(doc)[1]]
    assert not any("second topology" in label or "veth" in label for label in labels)
    assert "configuration: topology bridge;" in report.configuration(doc)


def test_topology_option_sets_the_main_and_the_second_topology():
    def s(*argv):
        return settings_from(build_parser().parse_args(list(argv)))
    assert (s().topology, s().second_topology) == ("bridge", "veth")
    assert (s("--topology", "veth").topology, s("--topology", "veth").second_topology) == ("veth", None)
    assert (s("--topology", "bridge").topology, s("--topology", "bridge").second_topology) == ("bridge", None)
    assert s("--worker-threads", "1", "--syscall-tool", "strace", "--syscall-mib", "8").syscall_bytes == 8 * MIB


def test_steps_per_setup():
    from bench import cli, setups

    runner = SimpleNamespace(skip=frozenset({"idle"}), settings=DEFAULT)
    keys = {s.name: [st.key for st in cli.Runner.steps_for(runner, s)]
            for s in setups.make(["direct", "native", "pure", "envoy", "envoy1"])}
    assert "idle" not in keys["native"]
    assert "syscalls" not in keys["direct"] and "scaling" not in keys["direct"] and "topology2" in keys["direct"]
    assert "scaling" in keys["native"] and "scaling" not in keys["pure"] and "syscalls" in keys["pure"]
    assert "scaling" in keys["envoy"] and "tunnels" in keys["envoy"]
    assert "scaling" not in keys["envoy1"] and "tunnels" not in keys["envoy1"] and "syscalls" in keys["envoy1"]
    runner.settings = QUICK.__class__(**{**DEFAULT.as_dict(), "second_topology": None})
    assert "topology2" not in [st.key for st in cli.Runner.steps_for(runner, setups.make(["native"])[0])]
