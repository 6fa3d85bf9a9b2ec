"""The floor's pure parts: the arithmetic (relay CPU/GB + encrypt + decrypt), the derived table
columns and their ratios to Envoy, the REDIRECT counter parser that proves a relay carried the
traffic, and the relay's 6-byte destination header.  No sockets, no namespaces, no timings."""

from __future__ import annotations

import pytest

from bench import floor, parse, report
from bench.relay import HEADER, decode_header, encode_header

CRYPTO = {
    "tool": "test", "record_bytes": 16384, "repeats": 3,
    "AES-128-GCM": {"encrypt_s_per_gb": 0.30, "decrypt_s_per_gb": 0.25, "pair_s_per_gb": 0.55},
    "AES-256-GCM": {"encrypt_s_per_gb": 0.35, "decrypt_s_per_gb": 0.33, "pair_s_per_gb": 0.68},
}


def _rec(metrics: dict) -> dict:
    full = {m.key: None for m in report.METRICS}
    full.update(metrics)
    return {"label": "x", "available": True, "raw": {}, "errors": {}, "retried": {}, "info": {}, "metrics": full}


def test_per_gb_scales_to_decimal_gigabytes():
    assert floor.per_gb(0.5, 500_000_000) == pytest.approx(1.0)
    assert floor.per_gb(3.0, 2 * 10**9) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        floor.per_gb(1.0, 0)


def test_pair_crypto_is_one_encrypt_and_one_decrypt():
    assert floor.pair_crypto(CRYPTO["AES-128-GCM"]) == pytest.approx(0.55)
    assert floor.floor_per_gb(0.9, 0.55) == pytest.approx(1.45)
    assert floor.floor_per_gb(None, 0.55) is None
    assert floor.floor_per_gb(0.9, None) is None


def test_derived_floor_adds_aes128_to_each_relay_on_both_topologies():
    setups = {"relay": _rec({"cpu_per_gb": 0.9, "cpu_per_gb_t2": 0.8, "throughput_1": 6.0}),
              "relaycopy": _rec({"cpu_per_gb": 1.7, "cpu_per_gb_t2": None})}
    out = floor.derived_setups(setups, CRYPTO)
    assert set(out) == {"floor", "floorcopy"}
    assert out["floor"]["metrics"]["cpu_per_gb"] == pytest.approx(1.45)
    assert out["floor"]["metrics"]["cpu_per_gb_t2"] == pytest.approx(1.35)
    assert out["floor"]["metrics"]["throughput_1"] is None  # a floor states CPU only
    assert out["floorcopy"]["metrics"]["cpu_per_gb"] == pytest.approx(2.25)
    assert out["floorcopy"]["metrics"]["cpu_per_gb_t2"] is None  # its relay figure is missing
    assert out["floor"]["derived"] is True and out["floor"]["info"]["cipher"] == "AES-128-GCM"


def test_no_floor_without_crypto_or_relay():
    assert floor.derived_setups({"relay": _rec({"cpu_per_gb": 0.9})}, None) == {}
    assert floor.derived_setups({"native": _rec({"cpu_per_gb": 3.0})}, CRYPTO) == {}


def test_table_shows_floor_and_floor_over_envoy():
    setups = {"envoy": _rec({"cpu_per_gb": 3.0}), "relay": _rec({"cpu_per_gb": 0.95})}
    setups.update(floor.derived_setups(setups, CRYPTO))
    doc = {"setups": setups, "settings": {"tunnels": 10, "second_topology": None}, "crypto": CRYPTO}
    header, rows = report.table(doc)
    assert "floor" in header and "floor ÷ Envoy" in header
    cpu = next(r for r in rows if r[0].startswith("proxy CPU, both sides"))
    assert cpu[header.index("floor")] == "1.50"
    assert cpu[header.index("floor ÷ Envoy")] == "0.50×"
    note = next(n for n in report.notes(doc) if n.startswith("crypto per GB"))
    assert "AES-256-GCM encrypt 0.350 + decrypt 0.330 = 0.680 s/GB" in note


IPTABLES_NAT_OUTPUT = """\
Chain OUTPUT (policy ACCEPT 12 packets, 720 bytes)
    pkts      bytes target     prot opt in     out     source               destination
      37     2220 REDIRECT   6    --  *      !lo     0.0.0.0/0            0.0.0.0/0            mark match ! 0x539/0xfff redir ports 15001
       4      240 REDIRECT   6    --  *      !lo     0.0.0.0/0            0.0.0.0/0            redir ports 15006
"""


def test_redirect_packets_counts_only_the_rule_to_the_port():
    assert parse.redirect_packets(IPTABLES_NAT_OUTPUT) == 37
    assert parse.redirect_packets(IPTABLES_NAT_OUTPUT, port=15006) == 4
    assert parse.redirect_packets("Chain OUTPUT (policy ACCEPT)\n    pkts bytes target\n") == 0


def test_relay_header_round_trips_the_original_destination():
    raw = encode_header("198.18.0.2", 5201)
    assert len(raw) == HEADER.size == 6
    assert raw == bytes([198, 18, 0, 2, 0x14, 0x51])
    assert decode_header(raw) == ("198.18.0.2", 5201)


def test_ab_summary_takes_medians_and_skips_failed_runs():
    from bench.ab import summarize

    runs = [{"proxy_cpu_s_per_gb": 3.0, "proxy_cpu_user_s_per_gb": 1.0, "proxy_cpu_sys_s_per_gb": 2.0, "gbps": 3.0},
            {"proxy_cpu_s_per_gb": 2.0, "proxy_cpu_user_s_per_gb": 0.9, "proxy_cpu_sys_s_per_gb": 1.1, "gbps": 4.0},
            {"error": "BenchError: proxy exited"},
            {"proxy_cpu_s_per_gb": 4.0, "proxy_cpu_user_s_per_gb": 1.2, "proxy_cpu_sys_s_per_gb": 2.8, "gbps": 2.0}]
    s = summarize({"0:native": runs, "1:relay": [{"error": "x"}]})
    assert s["0:native"] == {"runs": 4, "cpu_median": 3.0, "cpu_min": 2.0, "gbps_median": 3.0,
                             "user_median": 1.0, "sys_median": 2.0}
    assert s["1:relay"]["cpu_median"] is None and s["1:relay"]["runs"] == 1


def test_cpu_split_adds_up_to_cpu_seconds():
    import os

    from bench import procstat

    user, system = procstat.cpu_split([os.getpid()])
    assert user >= 0 and system >= 0
    total = procstat.cpu_seconds([os.getpid()])
    assert total >= user + system  # read after: the process only accumulates CPU
    assert procstat.cpu_split([2**22 + 12345]) == (0.0, 0.0)  # a pid that does not exist counts as 0
