"""The worker-thread scaling figure's pure parts: the order of the alternated runs and what is made
of their results.

On 2 cores shared by wrk, nginx and both proxies one new-connection run per thread count is one
noisy sample: the 2 ÷ 1 ratio of two back-to-back runs flipped from run to run.  The step
(runners.scaling) therefore keeps one setup per thread count open and runs wrk against them
alternately in rounds, the order flipping every round (1,2 then 2,1 then 1,2, ...: ABBA, so a
drift of the machine during a round does not favour one thread count).  Each round gives one ratio
(its 2-thread rate ÷ its 1-thread rate, two runs taken seconds apart); the figure is the median of
those ratios, and their min and max are its spread.

Beside it, per thread count, the proxies' CPU per request, the CPU per request of the busier
side's main thread (ztunnel-fast's event loop: the serial part, which caps the rate at one core's
worth however many workers run) and the share of the machine's CPU left idle: a second thread can only raise the rate of a proxy whose one thread was the bound (idle CPU
left at 1 thread); a run that leaves the machine no idle CPU at 1 thread is bound by the machine
(wrk, nginx and both proxies share its 2 cores), and there a second thread only adds its cost.

Invariants: pure (no I/O, no clock); a round whose runs are not all present (a failed wrk) gives
no ratio and is counted in `incomplete`; medians are over the runs and rounds that exist.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def order(rounds: int, threads: Iterable[int]) -> list[list[int]]:
    """The thread counts of each round: as given in even rounds, reversed in odd ones (ABBA)."""
    base = list(threads)
    return [base if r % 2 == 0 else base[::-1] for r in range(rounds)]


def _spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rounds: list[dict[str, dict]], low: str = "1", high: str = "2") -> dict:
    """Rounds of wrk results ({"1": run, "2": run} each, a run as runners.http returns it) ->
    per thread count the median request rate (and its min/max, the run count, the median proxy CPU
    per request, the median share of the machine left idle and the median CPU per request of the
    busier side's main thread), and the per-round `high ÷ low` ratios with their median, min and max.

    `by_threads[t]["rps"]` is the median rate, so readers of the one-run form keep working."""
    threads = sorted({t for rnd in rounds for t in rnd}, key=lambda t: (len(t), t))
    by_threads = {}
    for t in threads:
        runs = [rnd[t] for rnd in rounds if rnd.get(t) and rnd[t].get("rps")]
        rps = _spread([r["rps"] for r in runs])
        cpu = [r["proxy_cpu_us_per_request"] for r in runs if r.get("proxy_cpu_us_per_request") is not None]
        idle = [r["machine_idle"] for r in runs if r.get("machine_idle") is not None]
        main = [r["main_thread_us_per_request"] for r in runs if r.get("main_thread_us_per_request") is not None]
        by_threads[t] = {"rps": rps["median"], "rps_min": rps["min"], "rps_max": rps["max"], "runs": len(runs),
                         "proxy_cpu_us_per_request": statistics.median(cpu) if cpu else None,
                         "machine_idle": statistics.median(idle) if idle else None,
                         "main_thread_us_per_request": statistics.median(main) if main else None,
                         "errors": sum(r.get("errors") or 0 for r in runs)}
    ratios = []
    for rnd in rounds:
        one, two = (rnd.get(low) or {}).get("rps"), (rnd.get(high) or {}).get("rps")
        if one and two:
            ratios.append(two / one)
    spread = _spread(ratios)
    return {"by_threads": by_threads, "ratios": ratios, "ratio_median": spread["median"],
            "ratio_min": spread["min"], "ratio_max": spread["max"], "rounds": len(rounds),
            "incomplete": len(rounds) - len(ratios)}


def ratio_of(raw_scaling: dict | None) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the 2 ÷ 1 ratio from a scaling step's raw result; results of the
    one-run form (no rounds, before the alternation) give their single ratio and no spread."""
    if not raw_scaling:
        return None, None, None
    if raw_scaling.get("ratio_median") is not None:
        return raw_scaling["ratio_median"], raw_scaling.get("ratio_min"), raw_scaling.get("ratio_max")
    by = raw_scaling.get("by_threads") or {}
    one, two = (by.get("1") or {}).get("rps"), (by.get("2") or {}).get("rps")
    return (two / one if one and two else None), None, None
