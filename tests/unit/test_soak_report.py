"""bench.soak's verdicts from samples (pure: no pods, no processes)."""

from types import SimpleNamespace

from bench.soak import targets


def sample(t, rss=70.0, fds=1000, mismatches=0, label=""):
    return {"t": t, "rss_client_mib": rss, "rss_server_mib": rss, "fds_client": fds, "fds_server": fds,
            "mismatches": mismatches, "label": label}


def verdicts(samples, crashes=(), warmup=60.0):
    soak = SimpleNamespace(samples=samples, crashes=list(crashes), warmup=warmup)
    return {name: ok for name, _, _, ok in targets(soak)}


def test_flat_run_meets_every_target():
    got = verdicts([sample(t) for t in range(0, 600, 5)])
    assert got and all(got.values()), got


def test_steady_climb_after_warm_up_is_a_leak():
    got = verdicts([sample(t, rss=70.0 + t / 10, fds=1000 + t) for t in range(0, 600, 5)])
    assert not got["rss client flat after warm-up"] and not got["fds client flat after warm-up"]
    assert got["hash mismatches"] and got["crashes (a ztunnel-fast exiting unasked)"]


def test_warm_up_growth_and_fault_samples_do_not_count():
    samples = [sample(t, rss=40.0 + t) for t in range(0, 60, 5)]  # growth during warm-up
    samples += [sample(t) for t in range(60, 600, 5)]
    samples.insert(20, sample(101, rss=500.0, fds=0, label="sigstop"))  # the fault's worst moment
    assert all(verdicts(samples).values())


def test_mismatch_or_crash_fails():
    got = verdicts([sample(t) for t in range(0, 600, 5)] + [sample(600, mismatches=1)], crashes=["client exited"])
    assert not got["hash mismatches"] and not got["crashes (a ztunnel-fast exiting unasked)"]


def fast_verdicts(fast, engine="native", fast_path=True):
    soak = SimpleNamespace(samples=[sample(t) for t in range(0, 600, 5)], crashes=[], warmup=60.0,
                           args=SimpleNamespace(fast_path=fast_path, engine=engine), fast=fast)
    return {name: (got, ok) for name, _, got, ok in targets(soak)}


OUT = "connections carried by the client's workers (outbound fast path)"
IN = "CONNECTs answered by the server's workers (inbound fast path)"


def test_a_fast_path_run_must_put_traffic_through_both_fast_paths():
    got = fast_verdicts({"outbound": (900, 100, 3), "inbound": (800, 2, 5)})
    assert got[OUT] == ("900 carried (90%), 100 by the event loop, 3 flushes", True)
    assert got[IN] == ("800 answered, 2 handed back, 5 flushes", True)
    got = fast_verdicts({"outbound": (900, 100, 3), "inbound": (0, 1000, 5)})
    assert got[OUT][1] and not got[IN][1]
    # the workers handing most connections back: the fast path is on but not carrying
    got = fast_verdicts({"outbound": (450, 27589, 174), "inbound": (17321, 0, 98)})
    assert got[OUT] == ("450 carried (2%), 27589 by the event loop, 174 flushes", False) and got[IN][1]
    got = fast_verdicts({"outbound": None, "inbound": (5, 0, 0)})  # no drain line: the fast path was off
    assert got[OUT] == ("no drain line", False) and got[IN][1]


def test_no_fast_path_rows_without_the_switch_or_on_the_pure_engine():
    for kw in ({"fast_path": False}, {"engine": "pure"}):
        got = fast_verdicts({"outbound": None, "inbound": None}, **kw)
        assert OUT not in got and IN not in got and all(ok for _, ok in got.values())
