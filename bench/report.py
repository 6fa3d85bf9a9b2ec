"""Figures of a run: metric definitions, ratios, the table (rich, plain text, markdown), the JSON
document and the PNG chart.

Pure except `write_results` and `chart` (which write files).  A metric value is a float or None
(not measured: failed, or not applicable such as proxy CPU for `direct`); ratios are value/ref and
exist only when both sides do.  Direction matters when reading a ratio: for throughput and request
rate higher is better, for latency, CPU and memory lower is better (Metric.higher_is_better).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import scaling

MIB = 1 << 20
KIB = 1 << 10
ORDER = ("direct", "native", "fastpath", "xds", "pure", "envoy", "envoy1", "relay", "relaycopy", "relayaead", "floor",
         "floorcopy")
SHORT = {"direct": "direct", "native": "native", "fastpath": "native+fast path", "xds": "native xDS", "pure": "pure", "envoy": "Envoy",
         "envoy1": "Envoy c1", "relay": "relay", "relaycopy": "relay, copies", "relayaead": "relay, AES-GCM",
         "floor": "floor",
         "floorcopy": "floor, copies"}
RATIO_COLUMNS = (  # (setup, reference)
    ("native", "direct"), ("pure", "direct"), ("envoy", "direct"), ("native", "envoy"), ("pure", "envoy"),
    ("native", "envoy1"), ("pure", "envoy1"), ("fastpath", "envoy"), ("fastpath", "envoy1"), ("xds", "envoy"),
    ("floor", "envoy"), ("floor", "envoy1"), ("floorcopy", "envoy"), ("floorcopy", "envoy1"), ("native", "floor"),
    ("relayaead", "envoy"), ("relayaead", "envoy1"),
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str  # format spec for the value
    proxy_only: bool = False  # no value for `direct` (it has no proxy)
    ratio: bool = True  # counts are reported, not compared


METRICS = (
    Metric("throughput_1", "throughput, 1 stream", "Gbit/s", True, ".2f"),
    Metric("throughput_4", "throughput, 4 streams", "Gbit/s", True, ".2f"),
    Metric("cpu_per_gb", "proxy CPU, both sides", "s/GB", False, ".2f", proxy_only=True),
    Metric("throughput_1_t2", "throughput, 1 stream, T2", "Gbit/s", True, ".2f"),
    Metric("throughput_4_t2", "throughput, 4 streams, T2", "Gbit/s", True, ".2f"),
    Metric("cpu_per_gb_t2", "proxy CPU, both sides, T2", "s/GB", False, ".2f", proxy_only=True),
    Metric("syscalls_per_gb", "proxy syscalls, both sides", "/GB", False, ",.0f", proxy_only=True),
    Metric("syscalls_read_per_gb", "proxy syscalls: read, readv, recv*", "/GB", False, ",.0f", proxy_only=True),
    Metric("syscalls_write_per_gb", "proxy syscalls: write, writev, send*", "/GB", False, ",.0f", proxy_only=True),
    Metric("syscalls_epoll_per_gb", "proxy syscalls: epoll_*", "/GB", False, ",.0f", proxy_only=True),
    Metric("syscalls_other_per_gb", "proxy syscalls: other (futex, close, ...)", "/GB", False, ",.0f", proxy_only=True),
    Metric("rps_keepalive", "keep-alive", "req/s", True, ",.0f"),
    Metric("p50_keepalive", "keep-alive p50", "ms", False, ".3f"),
    Metric("p99_keepalive", "keep-alive p99", "ms", False, ".3f"),
    Metric("rps_newconn", "new conn per request", "req/s", True, ",.0f"),
    Metric("p50_newconn", "new conn per request p50", "ms", False, ".3f"),
    Metric("p99_newconn", "new conn per request p99", "ms", False, ".3f"),
    Metric("cpu_per_newconn", "proxy CPU per new connection, both sides", "µs", False, ",.0f", proxy_only=True),
    Metric("rps_newconn_1t", "new conn per request, 1 worker thread", "req/s", True, ",.0f", proxy_only=True),
    Metric("rps_newconn_2t", "new conn per request, 2 worker threads", "req/s", True, ",.0f", proxy_only=True),
    Metric("newconn_scaling", "new conn rate, 2 threads ÷ 1 thread", "×", True, ".2f", proxy_only=True),
    Metric("cpu_newconn_1t", "proxy CPU per new connection, 1 worker thread", "µs", False, ",.0f", proxy_only=True),
    Metric("cpu_newconn_2t", "proxy CPU per new connection, 2 worker threads", "µs", False, ",.0f", proxy_only=True),
    Metric("idle_newconn_1t", "machine CPU left idle, 1 worker thread", "%", True, ".1f", proxy_only=True,
           ratio=False),
    Metric("idle_newconn_2t", "machine CPU left idle, 2 worker threads", "%", True, ".1f", proxy_only=True,
           ratio=False),
    Metric("main_newconn_2t", "main thread CPU per new connection (busier side), 2 worker threads", "µs", False,
           ",.1f", proxy_only=True, ratio=False),
    Metric("main_bound_2t", "new conn rate at which that main thread fills its core", "req/s", True, ",.0f",
           proxy_only=True, ratio=False),
    Metric("idle_rss", "idle RSS per proxy", "MiB", False, ".1f", proxy_only=True),
    Metric("tunnels_rss", "RSS, N tunnels, both sides", "MiB", False, ".1f", proxy_only=True),
    Metric("rss_per_tunnel", "RSS per tunnel, both sides", "KiB", False, ".2f", proxy_only=True),
    Metric("tunnels_open", "tunnels open and alive", "", True, ",.0f", ratio=False),
    Metric("proxy_sockets", "sockets held by the proxies", "", False, ",.0f", proxy_only=True, ratio=False),
    Metric("hbone_connections", "HBONE connections", "", False, ",.0f", proxy_only=True, ratio=False),
)
BY_KEY = {m.key: m for m in METRICS}
# metrics that come with a spread: metrics_from_raw adds "<key>_min" and "<key>_max" (the table's "(min–max)")
WITH_SPREAD = ("newconn_scaling",)
# figures taken with the tunnels open: marked "*" when fewer than requested were open and alive
AT_TUNNELS = frozenset({"tunnels_rss", "rss_per_tunnel", "proxy_sockets", "hbone_connections"})


def partial_tunnels(setup_rec: dict) -> bool:
    t = (setup_rec.get("raw") or {}).get("tunnels")
    return bool(t) and t.get("alive") != t.get("requested")
# metric key -> (raw step key, what the error of that step is called in the table)
SOURCE = {
    "throughput_1": "tput1", "throughput_4": "tput4", "cpu_per_gb": "cpu",
    "rps_keepalive": "http_ka", "p50_keepalive": "http_ka", "p99_keepalive": "http_ka",
    "rps_newconn": "http_nc", "p50_newconn": "http_nc", "p99_newconn": "http_nc", "cpu_per_newconn": "http_nc",
    "throughput_1_t2": "topology2", "throughput_4_t2": "topology2", "cpu_per_gb_t2": "topology2",
    "syscalls_per_gb": "syscalls", "syscalls_read_per_gb": "syscalls", "syscalls_write_per_gb": "syscalls",
    "syscalls_epoll_per_gb": "syscalls", "syscalls_other_per_gb": "syscalls",
    "rps_newconn_1t": "scaling", "rps_newconn_2t": "scaling", "newconn_scaling": "scaling",
    "cpu_newconn_1t": "scaling", "cpu_newconn_2t": "scaling", "idle_newconn_1t": "scaling",
    "idle_newconn_2t": "scaling", "main_newconn_2t": "scaling", "main_bound_2t": "scaling",
    "idle_rss": "idle", "tunnels_rss": "tunnels", "rss_per_tunnel": "tunnels", "tunnels_open": "tunnels",
    "proxy_sockets": "tunnels", "hbone_connections": "tunnels",
}


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def metrics_from_raw(raw: dict, proxied: bool) -> dict[str, float | None]:
    """Raw step results (runners) -> metric values; None where a step is missing or n/a."""
    m: dict[str, float | None] = {k: None for k in BY_KEY}
    m["throughput_1"] = _get(raw, "tput1", "gbps")
    m["throughput_4"] = _get(raw, "tput4", "gbps")
    m["throughput_1_t2"] = _get(raw, "topology2", "tput1", "gbps")
    m["throughput_4_t2"] = _get(raw, "topology2", "tput4", "gbps")
    if proxied:
        m["cpu_per_gb"] = _get(raw, "cpu", "proxy_cpu_s_per_gb")
        m["cpu_per_gb_t2"] = _get(raw, "topology2", "cpu", "proxy_cpu_s_per_gb")
        m["cpu_per_newconn"] = _get(raw, "http_nc", "proxy_cpu_us_per_request")
        per_gb = _get(raw, "syscalls", "per_gb") or {}
        m["syscalls_per_gb"] = per_gb.get("total")
        for kind in ("read", "write", "epoll", "other"):
            m[f"syscalls_{kind}_per_gb"] = per_gb.get(kind)
        by_threads = _get(raw, "scaling", "by_threads") or {}
        m["rps_newconn_1t"], m["rps_newconn_2t"] = _get(by_threads, "1", "rps"), _get(by_threads, "2", "rps")
        for t in ("1", "2"):
            m[f"cpu_newconn_{t}t"] = _get(by_threads, t, "proxy_cpu_us_per_request")
            idle = _get(by_threads, t, "machine_idle")
            m[f"idle_newconn_{t}t"] = idle * 100 if idle is not None else None
        main = m["main_newconn_2t"] = _get(by_threads, "2", "main_thread_us_per_request")
        m["main_bound_2t"] = 1e6 / main if main else None
        # median of the alternated rounds' ratios; its spread is shown next to it (not a METRICS key)
        m["newconn_scaling"], m["newconn_scaling_min"], m["newconn_scaling_max"] = scaling.ratio_of(raw.get("scaling"))
    for suffix, step in (("keepalive", "http_ka"), ("newconn", "http_nc")):
        m[f"rps_{suffix}"] = _get(raw, step, "rps")
        m[f"p50_{suffix}"] = _get(raw, step, "p50_ms")
        m[f"p99_{suffix}"] = _get(raw, step, "p99_ms")
    idle = _get(raw, "idle", "rss")
    if proxied and idle:
        m["idle_rss"] = sum(idle.values()) / len(idle) / MIB
    t = raw.get("tunnels")
    if t:
        alive = t.get("alive")
        m["tunnels_open"] = alive if alive is not None else t.get("opened")
        if proxied:
            at, before = sum(t["rss_at"].values()), sum(t["rss_before"].values())
            m["tunnels_rss"] = at / MIB
            if t.get("opened"):
                m["rss_per_tunnel"] = (at - before) / t["opened"] / KIB
            m["proxy_sockets"] = sum(t["proxy_sockets"].values())
            m["hbone_connections"] = _get(t, "established", "hbone")
    return m


def ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or ref == 0:
        return None
    return value / ref


def ratios(metrics: dict[str, dict[str, float | None]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{"native/direct": {metric: ratio}, ...} for every RATIO_COLUMNS pair present in `metrics`."""
    out = {}
    for setup, ref in RATIO_COLUMNS:
        if setup in metrics and ref in metrics:
            out[f"{setup}/{ref}"] = {
                m.key: (ratio(metrics[setup].get(m.key), metrics[ref].get(m.key)) if m.ratio else None)
                for m in METRICS
            }
    return out


# ------------------------------------------------------------------------------------------ table
def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _spread(metrics: dict, m: Metric) -> str:
    """" (min–max)" after a figure that has a spread (the scaling ratio's alternated rounds)."""
    lo, hi = metrics.get(f"{m.key}_min"), metrics.get(f"{m.key}_max")
    return "" if lo is None or hi is None else f" ({format(lo, m.fmt)}–{format(hi, m.fmt)})"


def _fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def metric_label(m: Metric, tunnels: int | None = None, topology2: str | None = None) -> str:
    label = m.label.replace("N tunnels", f"{tunnels:,} tunnels") if tunnels else m.label
    label = label.replace("T2", topology2 or "second topology")
    return f"{label} ({m.unit})" if m.unit else label


def shown_metrics(doc: dict) -> list[Metric]:
    """The metrics of the table: all, less the second-topology rows when none was measured."""
    topo2 = _get(doc, "settings", "second_topology")
    return [m for m in METRICS if topo2 or SOURCE.get(m.key) != "topology2"]


def configuration(doc: dict) -> str:
    """One line: what the figures were taken with (topology, threads, durations, sizes, tools)."""
    s = doc.get("settings", {})
    setups = doc.get("setups", {})
    topo, topo2 = s.get("topology", "bridge"), s.get("second_topology")
    parts = [f"topology {topo}" + (f" (throughput and CPU/GB also on {topo2})" if topo2 else "")]
    conc = sorted({(st.get("info") or {}).get("concurrency") for n, st in setups.items() if n.startswith("envoy")}
                  - {None})
    if conc:
        parts.append("Envoy --concurrency " + " and ".join(map(str, conc)))
    if any(n in setups for n in ("native", "pure", "fastpath", "xds")):
        parts.append(f"ztunnel-fast ZTUNNEL_WORKER_THREADS={s.get('worker_threads', '?')}")
    parts.append("scaling at " + " and ".join(map(str, s.get("scaling_threads") or ())) + " worker threads"
                 + (f" ({s['scaling_rounds']} alternated rounds of {s.get('scaling_seconds')} s)"
                    if s.get("scaling_rounds") else ""))
    parts.append(f"iperf3 {s.get('iperf_seconds')} s + {s.get('iperf_omit')} s warm-up")
    parts.append(f"CPU/GB from {(s.get('cpu_bytes') or 0) / MIB:,.0f} MiB")
    tool = next((st["raw"]["syscalls"]["tool"] for st in setups.values() if (st.get("raw") or {}).get("syscalls")),
                s.get("syscall_tool"))
    parts.append(f"syscalls from a separate {(s.get('syscall_bytes') or 0) / MIB:,.0f} MiB transfer ({tool})")
    parts.append(f"wrk {s.get('wrk_seconds')} s, {s.get('wrk_connections')} connections")
    parts.append(f"{s.get('tunnels') or 0:,} tunnels")
    if s.get("skipped_steps"):
        parts.append("steps skipped: " + ", ".join(s["skipped_steps"]))
    return "configuration: " + "; ".join(parts)


def table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per metric; absolute values per setup, then the ratios.  A figure
    that failed reads `failed` (the reason is listed under the table)."""
    setups = [s for s in ORDER if s in doc["setups"]]
    metrics = {s: doc["setups"][s].get("metrics", {}) for s in setups}
    rat = ratios(metrics)
    ratio_cols = [k for k in (f"{a}/{b}" for a, b in RATIO_COLUMNS) if k in rat]
    header = ["figure"] + [SHORT[s] for s in setups] + [
        f"{SHORT[k.split('/')[0]]} ÷ {SHORT[k.split('/')[1]]}" for k in ratio_cols]
    tunnels = _get(doc, "settings", "tunnels")
    topo2 = _get(doc, "settings", "second_topology")
    rows = []
    for m in shown_metrics(doc):
        row = [metric_label(m, tunnels, topo2)]
        for s in setups:
            v = metrics[s].get(m.key)
            failed = SOURCE[m.key] in doc["setups"][s].get("errors", {}) or not doc["setups"][s].get("available", True)
            if v is None and failed and not (m.proxy_only and s == "direct"):
                row.append("failed" if doc["setups"][s].get("available", True) else "n/a")
            else:
                star = "*" if v is not None and m.key in AT_TUNNELS and partial_tunnels(doc["setups"][s]) else ""
                row.append(_fmt(v, m.fmt) + star + _spread(metrics[s], m))
        row += [_fmt_ratio(rat[k].get(m.key)) for k in ratio_cols]
        rows.append(row)
    return header, rows


def split(header: list[str], rows: list[list[str]]) -> list[tuple[list[str], list[list[str]]]]:
    """The table as two narrower ones, absolute values and ratios (for narrow terminals)."""
    n_abs = sum(1 for h in header[1:] if "÷" not in h) + 1
    parts = [(header[:n_abs], [r[:n_abs] for r in rows])]
    if len(header) > n_abs:
        parts.append(([header[0]] + header[n_abs:], [[r[0]] + r[n_abs:] for r in rows]))
    return parts


def _rich_header(h: str) -> str:
    return h.replace(" ÷ ", "\n÷ ")  # ratio columns as two header lines: narrow columns


def rich_width(header: list[str], rows: list[list[str]]) -> int:
    """Columns a rich Table of these cells needs (cell padding and borders included)."""
    cells = [[max(_rich_header(h).split("\n"), key=len) for h in header]] + rows
    return sum(max(len(r[i]) for r in cells) + 3 for i in range(len(header))) + 1


def render_plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def render_rich(header: list[str], rows: list[list[str]], title: str, caption: str):
    from rich.table import Table

    t = Table(title=title, caption=caption, caption_justify="left", show_lines=False)
    n_abs = sum(1 for h in header[1:] if "÷" not in h)
    for i, h in enumerate(header):
        style = "bold" if i == 0 else ("cyan" if i <= n_abs else "magenta")
        t.add_column(_rich_header(h), justify="left" if i == 0 else "right", style=style if i else None, no_wrap=i > 0)
    for r in rows:
        t.add_row(*r)
    return t


def notes(doc: dict) -> list[str]:
    """Lines printed under the table: how to read it, what each setup was, what failed and why."""
    s = doc.get("settings", {})
    out = [
        configuration(doc),
        "ratios are value ÷ reference: above 1 is better for throughput, req/s and scaling, worse for latency, CPU, "
        "syscalls and memory",
        f"iperf3 {s.get('iperf_seconds')} s after {s.get('iperf_omit')} s warm-up, client -> server; CPU per GB from a "
        f"{(s.get('cpu_bytes') or 0) / (1 << 20):,.0f} MiB transfer (utime+stime of both proxies from /proc)",
        f"wrk {s.get('wrk_threads')} thread, {s.get('wrk_connections')} connections, {s.get('wrk_seconds')} s, "
        f"nginx 1 worker, {s.get('body_bytes')} B body; new connection = `Connection: close` "
        "(latency from request write, after connect)",
        f"tunnels: {s.get('tunnels'):,} concurrent connections each proven by a 1-byte round trip; RSS per tunnel = "
        "(RSS at N - RSS just before) / N",
        "proxy CPU per new connection = utime+stime of both proxies over the new-connection wrk run ÷ requests "
        "completed; the 1/2 worker-thread rates come from two fresh setups open at once, run alternately in "
        f"{s.get('scaling_rounds') or 1} rounds of {s.get('scaling_seconds') or s.get('wrk_seconds')} s, the order "
        "flipping every round (ztunnel-fast ZTUNNEL_WORKER_THREADS, Envoy --concurrency; the pure twin has no "
        "worker threads): rates are the medians, 2 ÷ 1 is the median of the per-round ratios with (min–max)",
        "syscalls per GB: both proxies, every thread, counted on a transfer of their own (never a timed one), "
        "÷ GB received; read = read/readv/recv*, write = write/writev/send*, epoll = epoll_*",
    ]
    from .floor import crypto_note

    crypto = crypto_note(doc.get("crypto"))
    if crypto:
        out.append(crypto)
    for name in ORDER:
        st = doc["setups"].get(name)
        if not st:
            continue
        info = st.get("info") or {}
        desc = st.get("label", name)
        if info:
            shown = ("engine", "concurrency", "worker_threads", "log_level", "mode")
            listed = ", ".join(f"{k}={v}" for k, v in info.items() if k in shown)
            desc += f" [{listed}]" if listed else ""
        if not st.get("available", True):
            out.append(f"{name}: not measured: {st.get('reason')}")
            continue
        out.append(f"{name}: {desc}")
        for step, err in (st.get("errors") or {}).items():
            out.append(f"{name}: {step} failed: {err}")
        t = (st.get("raw") or {}).get("tunnels")
        if t and t.get("alive") != t.get("requested"):
            out.append(f"{name}: only {t.get('alive') or 0:,} of {t['requested']:,} tunnels open and alive, figures "
                       f"marked * are with those (open failures {t.get('open_failures')}, check failures "
                       f"{t.get('check_failures')})")
        for step, err in (st.get("retried") or {}).items():
            if step not in (st.get("errors") or {}):
                out.append(f"{name}: {step}: first attempt failed ({err}); the figure is from a retry on a fresh setup")
    return out


# -------------------------------------------------------------------------------------- JSON, PNG
def write_results(doc: dict, directory: Path, stamp: str, latest: bool = True) -> dict[str, Path]:
    """<stamp>.json and <stamp>.md (the table, for READMEs), and the same as latest.* when `latest`."""
    directory.mkdir(parents=True, exist_ok=True)
    header, rows = table(doc)
    texts = {
        "json": json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n",
        "md": f"{title_of(doc)}\n\n" + render_markdown(header, rows) + "\n\n"
              + "\n".join(f"- {n}" for n in notes(doc)) + "\n",
    }
    paths = {}
    for ext, text in texts.items():
        paths[ext] = directory / f"{stamp}.{ext}"
        paths[ext].write_text(text)
        if latest:
            paths[f"latest_{ext}"] = directory / f"latest.{ext}"
            paths[f"latest_{ext}"].write_text(text)
    return paths


CHART_METRICS = ("throughput_1", "throughput_4", "cpu_per_gb", "syscalls_per_gb",
                 "throughput_1_t2", "throughput_4_t2", "cpu_per_gb_t2", "cpu_per_newconn",
                 "rps_keepalive", "p50_keepalive", "p99_keepalive", "newconn_scaling",
                 "rps_newconn", "p50_newconn", "p99_newconn", "rps_newconn_1t",
                 "idle_rss", "tunnels_rss", "rss_per_tunnel", "rps_newconn_2t")
COLORS = {"direct": "#7f7f7f", "native": "#1f77b4", "fastpath": "#2ca02c", "xds": "#17becf", "pure": "#aec7e8", "envoy": "#ff7f0e",
          "envoy1": "#ffbb78", "relay": "#9467bd", "relaycopy": "#c5b0d5", "relayaead": "#e377c2", "floor": "#8c564b",
          "floorcopy": "#c49c94"}


def chart(doc: dict, path: Path, title: str) -> Path:
    """One PNG: a small bar chart per figure (absolute values, labelled), setups in a fixed order and
    colour; a missing bar reads n/a or failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = [s for s in ORDER if s in doc["setups"]]
    tunnels = _get(doc, "settings", "tunnels")
    topo2 = _get(doc, "settings", "second_topology")
    keys = [k for k in CHART_METRICS if topo2 or SOURCE.get(k) != "topology2"]
    cols = 4
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        m = BY_KEY[key]
        values = [doc["setups"][s].get("metrics", {}).get(key) for s in setups]
        xs = list(range(len(setups)))
        heights = [v or 0.0 for v in values]
        bars = ax.bar(xs, heights, color=[COLORS[s] for s in setups])
        top = max(heights) if any(heights) else 1.0
        for x, b, v, s in zip(xs, bars, values, setups):
            if v is None:
                failed = SOURCE[key] in doc["setups"][s].get("errors", {})
                ax.text(x, top * 0.02, "failed" if failed else "n/a", ha="center", va="bottom", fontsize=7,
                        color="#999")
            else:
                star = "*" if key in AT_TUNNELS and partial_tunnels(doc["setups"][s]) else ""
                ax.text(x, b.get_height(), format(v, m.fmt) + star, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, [SHORT[s] for s in setups], fontsize=8)
        ax.set_ylim(0, top * 1.18)
        ax.set_title(metric_label(m, tunnels, topo2).strip() + ("  ↑" if m.higher_is_better else "  ↓"), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    import textwrap

    fig.suptitle(title + "\n" + textwrap.fill(configuration(doc), 220), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def title_of(doc: dict) -> str:
    mi = doc.get("machine", {})
    return (f"ztunnel-fast bench {doc.get('started', '')[:19]}Z  ·  {mi.get('cpu_model')} × {mi.get('nproc')}  ·  "
            f"Linux {mi.get('kernel')}  ·  {'quick' if doc.get('quick') else 'full'} run")

