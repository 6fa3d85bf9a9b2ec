"""The worker-thread scaling figure (bench.scaling, runners.scaling, cli._Labs): the alternated
order, the median ratio and its spread, the report's cell, and that both setups held open at once
are torn down.  No namespaces: the labs and wrk are stand-ins; no timing thresholds."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest

from bench import cli, report, runners, scaling
from bench.settings import DEFAULT, QUICK


def _run(rps, cpu=500.0, errors=0, idle=None, main=None):
    return {"rps": rps, "requests": int(rps * 4), "errors": errors, "proxy_cpu_us_per_request": cpu,
            "p50_ms": 1.0, "p99_ms": 2.0, "machine_idle": idle, "main_thread_us_per_request": main}


def test_order_flips_every_round():
    assert scaling.order(5, [1, 2]) == [[1, 2], [2, 1], [1, 2], [2, 1], [1, 2]]
    assert scaling.order(2, ["1", "2"]) == [["1", "2"], ["2", "1"]]
    assert scaling.order(0, [1, 2]) == []


def test_summarize_gives_per_round_ratios_their_median_and_spread():
    rounds = [{"1": _run(1000, 400), "2": _run(1100, 500)},
              {"2": _run(900, 600), "1": _run(1000, 420)},
              {"1": _run(800, 410), "2": _run(1200, 520)}]
    s = scaling.summarize(rounds)
    assert s["ratios"] == pytest.approx([1.1, 0.9, 1.5])
    assert s["ratio_median"] == pytest.approx(1.1)
    assert (s["ratio_min"], s["ratio_max"]) == (pytest.approx(0.9), pytest.approx(1.5))
    assert s["rounds"] == 3 and s["incomplete"] == 0
    one, two = s["by_threads"]["1"], s["by_threads"]["2"]
    assert (one["rps"], one["rps_min"], one["rps_max"], one["runs"]) == (1000, 800, 1000, 3)
    assert two["rps"] == 1100 and two["proxy_cpu_us_per_request"] == 520
    # the median ratio is not the ratio of the medians (1100 / 1000 here by chance): another set
    s2 = scaling.summarize([{"1": _run(1000), "2": _run(2000)}, {"1": _run(2000), "2": _run(2200)},
                            {"1": _run(3000), "2": _run(3000)}])
    assert s2["ratio_median"] == pytest.approx(1.1) and s2["by_threads"]["2"]["rps"] / s2["by_threads"]["1"]["rps"] == 1.1
    s3 = scaling.summarize([{"1": _run(1000), "2": _run(2000)}, {"1": _run(1000), "2": _run(1000)},
                            {"1": _run(4000), "2": _run(4400)}])
    assert s3["ratio_median"] == pytest.approx(1.1)
    assert s3["by_threads"]["2"]["rps"] / s3["by_threads"]["1"]["rps"] == pytest.approx(2.0)


def test_summarize_skips_rounds_without_both_runs():
    s = scaling.summarize([{"1": _run(1000), "2": _run(1500)}, {"1": _run(1000)}, {"2": {"rps": 0}, "1": _run(900)}])
    assert s["ratios"] == [1.5] and s["incomplete"] == 2
    assert s["by_threads"]["1"]["runs"] == 3 and s["by_threads"]["2"]["runs"] == 1
    empty = scaling.summarize([])
    assert empty["ratio_median"] is None and empty["by_threads"] == {}


def test_ratio_of_reads_both_the_rounds_and_the_one_run_form():
    assert scaling.ratio_of({"ratio_median": 1.2, "ratio_min": 0.9, "ratio_max": 1.4, "by_threads": {}}) == (1.2, 0.9, 1.4)
    old = {"by_threads": {"1": {"rps": 1000.0}, "2": {"rps": 1500.0}}}
    assert scaling.ratio_of(old) == (pytest.approx(1.5), None, None)
    assert scaling.ratio_of(None) == (None, None, None)
    assert scaling.ratio_of({"by_threads": {"1": {"rps": 1000.0}}}) == (None, None, None)


def _doc_with(native_scaling, envoy_scaling):
    def setup(raw):
        return {"label": "x", "available": True, "raw": raw, "errors": {}, "retried": {},
                "metrics": report.metrics_from_raw(raw, proxied=True)}
    return {"started": "2026-12-01T00:00:00", "machine": {}, "quick": False,
            "settings": {**DEFAULT.as_dict(), "second_topology": None},
            "setups": {"native": setup({"scaling": native_scaling}), "envoy": setup({"scaling": envoy_scaling})}}


def test_report_shows_the_median_ratio_with_its_spread_and_compares_medians():
    native = scaling.summarize([{"1": _run(1000), "2": _run(1100)}, {"2": _run(950), "1": _run(1000)},
                                {"1": _run(1000), "2": _run(1200)}])
    envoy = scaling.summarize([{"1": _run(2000), "2": _run(2000)}, {"2": _run(2100), "1": _run(2000)},
                               {"1": _run(2000), "2": _run(1900)}])
    doc = _doc_with(native, envoy)
    m = doc["setups"]["native"]["metrics"]
    assert m["newconn_scaling"] == pytest.approx(1.1) and m["rps_newconn_2t"] == 1100
    header, rows = report.table(doc)
    row = next(r for r in rows if r[0].startswith("new conn rate, 2 threads ÷ 1 thread"))
    assert row[header.index("native")] == "1.10 (0.95–1.20)"
    assert row[header.index("Envoy")] == "1.00 (0.95–1.05)"
    assert row[header.index("native ÷ Envoy")] == "1.10×"
    assert "8 alternated rounds of 4.0 s" in report.configuration(doc)
    # a result of the one-run form still renders, without a spread
    old = _doc_with({"by_threads": {"1": _run(1000), "2": _run(900)}}, envoy)
    row = next(r for r in report.table(old)[1] if r[0].startswith("new conn rate, 2 threads"))
    assert row[report.table(old)[0].index("native")] == "0.90"


def test_quick_preset_and_overrides_shorten_the_scaling_figure():
    assert QUICK.scaling_rounds < DEFAULT.scaling_rounds and QUICK.scaling_seconds <= DEFAULT.scaling_seconds
    s = cli.settings_from(cli.build_parser().parse_args(["--scaling-rounds", "3", "--scaling-seconds", "2"]))
    assert (s.scaling_rounds, s.scaling_seconds) == (3, 2.0)


class _FakeLab:
    def __init__(self, threads):
        self.threads, self.torn = threads, False

    def teardown(self):
        self.torn = True


def test_runner_scaling_alternates_between_two_open_setups(monkeypatch):
    calls, open_now, labs_made = [], set(), []

    class Labs:
        settings = replace(DEFAULT, scaling_rounds=4, scaling_seconds=3.0)

        @contextmanager
        def open(self, threads=None, topology=None):
            lab = _FakeLab(threads)
            labs_made.append(lab)
            open_now.add(threads)
            try:
                yield runners.Ctx(lab, None, self.settings, None)
            finally:
                open_now.discard(threads)
                lab.teardown()

    def fake_http(ctx, new_connection):
        assert new_connection and open_now == {1, 2}  # both setups are open during every run
        calls.append((ctx.bl.threads, ctx.settings.wrk_seconds))
        return _run(1000.0 * ctx.bl.threads ** 0.5 + len(calls))

    monkeypatch.setattr(runners, "http", fake_http)
    monkeypatch.setattr(runners, "SCALING_PAUSE_S", 0)
    out = runners.scaling(Labs())
    warm, timed = calls[:2], calls[2:]
    assert [t for t, _ in warm] == [1, 2] and all(s == 1.0 for _, s in warm)  # unrecorded warm-up runs
    assert [t for t, _ in timed] == [1, 2, 2, 1, 1, 2, 2, 1] and all(s == 3.0 for _, s in timed)
    assert out["order"] == [["1", "2"], ["2", "1"], ["1", "2"], ["2", "1"]]
    assert out["rounds"] == 4 and len(out["ratios"]) == 4 and out["ratio_median"] is not None
    assert all(lab.torn for lab in labs_made) and not open_now


def test_labs_tears_down_only_its_own_setup_and_every_one_on_the_way_out(monkeypatch):
    monkeypatch.setattr(runners, "path_check", lambda ctx: {})
    runner = SimpleNamespace(live=[], labs_built=0, settings=DEFAULT)
    runner.teardown = lambda bl=None: cli.Runner.teardown(runner, bl)

    def build(setup, tag, threads=None, topology=None):
        lab = _FakeLab(threads)
        runner.live.append(lab)
        return lab, SimpleNamespace(info={}), runners.Ctx(lab, None, DEFAULT, None)

    runner._build = build
    rec = {}
    labs = cli._Labs(runner, SimpleNamespace(name="native"), rec)
    with labs.open(threads=1) as c1:
        with labs.open(threads=2) as c2:
            assert runner.live == [c1.bl, c2.bl]
        assert c2.bl.torn and not c1.bl.torn and runner.live == [c1.bl]
    assert c1.bl.torn and runner.live == []
    assert [v["threads"] for v in rec["variants"].values()] == [1, 2]
    with pytest.raises(RuntimeError), labs.open(threads=1) as c1, labs.open(threads=2) as c2:
        raise RuntimeError("wrk failed")  # a failure inside tears both down too
    assert c1.bl.torn and c2.bl.torn and runner.live == []


# ------------------------------------------------------------------ bench.thread_cpu's pure parts
def test_thread_cpu_parses_proc_texts_and_diffs_per_thread():
    from bench import thread_cpu as tc

    status = "Name:\tpython\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n"
    assert tc.parse_status_switches(status) == (120, 7)
    assert tc.parse_status_switches("Name:\tx\n") == (0, 0)
    assert tc.parse_schedstat("2500000000 400000000 99\n") == (2_500_000_000, 400_000_000)
    S = tc.ThreadSample
    before = {10: S("python", 1_000_000_000, 0, 5, 1), 11: S("python", 0, 0, 0, 0), 12: S("python", 7, 0, 0, 0)}
    after = {10: S("python", 1_500_000_000, 100_000_000, 15, 2), 11: S("python", 2_000_000_000, 0, 40, 9),
             12: S("python", 7, 0, 0, 0), 13: S("wrk:worker_1", 250_000_000, 0, 3, 0)}
    rows = tc.diff({10}, before, after, seconds=5.0, requests=10_000)
    assert [r["tid"] for r in rows] == [10, 11, 13]  # main first, then by CPU; idle thread 12 left out
    main, busy, new = rows
    assert main["main"] and main["cpu_s"] == 0.5 and main["cores"] == 0.1 and main["wait_s"] == 0.1
    assert main["us_per_request"] == 50.0 and (main["voluntary"], main["involuntary"]) == (10, 1)
    assert busy["cores"] == 0.4 and not busy["main"]
    assert new["cpu_s"] == 0.25 and new["comm"] == "wrk:worker_1"  # a thread born during the run counts from 0


def test_machine_idle_is_read_from_proc_stat_and_reported_per_thread_count():
    """The share of the machine left idle during each run: read from /proc/stat's cpu line (idle +
    iowait over user..steal), its median per thread count, shown in % beside the CPU per request."""
    from bench import procstat

    before = procstat.machine_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    after = procstat.machine_times("cpu  400 0 150 850 50 0 0 0 7 0\n")
    assert before == (850, 1000) and after == (900, 1450)  # guest time (7) is inside user already
    assert procstat.idle_fraction(before, after) == pytest.approx(50 / 450)
    assert procstat.idle_fraction(after, after) is None
    with pytest.raises(ValueError):
        procstat.machine_times("intr 1 2 3\n")
    idle_now, total_now = procstat.machine_cpu()
    assert 0 <= idle_now <= total_now
    native = scaling.summarize([{"1": _run(1000, 400, idle=0.01), "2": _run(950, 450, idle=0.0)},
                                {"2": _run(900, 460, idle=0.02), "1": _run(1000, 390, idle=0.03)},
                                {"1": _run(1000, 410, idle=0.02), "2": _run(1000, 440, idle=None)}])
    assert native["by_threads"]["1"]["machine_idle"] == pytest.approx(0.02)
    assert native["by_threads"]["2"]["machine_idle"] == pytest.approx(0.01)  # the run without a reading is left out
    envoy = scaling.summarize([{"1": _run(1000, 600, idle=0.2), "2": _run(1200, 700, idle=0.1)}])
    doc = _doc_with(native, envoy)
    header, rows = report.table(doc)
    cells = {r[0].split(" (")[0]: r for r in rows}
    assert cells["machine CPU left idle, 1 worker thread"][header.index("native")] == "2.0"
    assert cells["machine CPU left idle, 1 worker thread"][header.index("Envoy")] == "20.0"
    assert cells["proxy CPU per new connection, 2 worker threads"][header.index("native")] == "450"


def test_the_main_threads_cpu_per_request_and_the_rate_it_caps_are_reported_at_two_threads():
    """The busier side's main thread (ztunnel-fast's event loop) per request, read from
    /proc/<pid>/task/<pid>/schedstat: its median at 2 worker threads and 1e6 / it, the rate at which
    that one thread would fill its core."""
    from bench import procstat

    spent = procstat.main_thread_seconds(os.getpid())
    sum(range(200_000))  # this (main) thread runs: its figure grows
    assert procstat.main_thread_seconds(os.getpid()) > spent > 0
    assert procstat.main_thread_seconds(2**22 + 7) == 0.0  # no such process
    assert procstat.Proxies({"client": os.getpid()}).main_thread_cpu()["client"] > 0
    native = scaling.summarize([{"1": _run(1000, main=30.0), "2": _run(950, main=40.0)},
                                {"2": _run(900, main=60.0), "1": _run(1000, main=35.0)},
                                {"1": _run(1000), "2": _run(1000, main=50.0)}])
    assert native["by_threads"]["1"]["main_thread_us_per_request"] == pytest.approx(32.5)
    assert native["by_threads"]["2"]["main_thread_us_per_request"] == pytest.approx(50.0)
    envoy = scaling.summarize([{"1": _run(1000, main=2.0), "2": _run(1200, main=4.0)}])
    header, rows = report.table(_doc_with(native, envoy))
    cells = {r[0].split(" (")[0]: r for r in rows}
    main_row = cells["main thread CPU per new connection"]
    assert main_row[header.index("native")] == "50.0" and main_row[header.index("Envoy")] == "4.0"
    bound = cells["new conn rate at which that main thread fills its core"]
    assert bound[header.index("native")] == "20,000" and bound[header.index("Envoy")] == "250,000"
