

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
