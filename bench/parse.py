"""Pure parsers of load-generator and tracer output (no I/O): iperf3 `-J`, wrk (`--latency` text or
the JSON line our Lua `done` hook prints), `ss` listings, syscall counts (`strace -c` summaries and
`perf stat -x,` of syscall tracepoints) with their grouping by type, and `perf script` stacks
folded for flame graphs.

Invariant: every parser either returns a complete result or raises ParseError naming what was
missing; a partially parsed figure never reaches the report.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

WRK_JSON_MARK = "WRK_JSON "  # prefix of the line printed by WRK_LUA's done()

# Printed by wrk after the run (LuaJIT): every figure we report, in one machine-readable line.
WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect_errors\":%d," ..
    "\"read_errors\":%d,\"write_errors\":%d,\"status_errors\":%d,\"timeouts\":%d," ..
    "\"latency_us\":{\"min\":%d,\"mean\":%.2f,\"max\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d}}\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


class ParseError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- iperf3
@dataclass(frozen=True)
class IperfResult:
    bytes_received: int  # payload bytes the server received (end.sum_received)
    seconds: float  # measured interval (omitted warm-up seconds excluded)
    bits_per_second: float  # receiver side
    retransmits: int | None  # sender side TCP retransmits, when reported
    streams: int

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9

    def as_dict(self) -> dict:
        return {**asdict(self), "gbps": self.gbps}


def parse_iperf3(text: str) -> IperfResult:
    """`iperf3 -J` output of a client run (TCP).  The receiver's figures are the ones reported:
    what actually arrived, after every proxy in between."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3 output is not JSON: {exc}; starts with {text[:200]!r}") from None
    if not isinstance(doc, dict):
        raise ParseError("iperf3 JSON is not an object")
    if doc.get("error"):
        raise ParseError(f"iperf3 error: {doc['error']}")
    end = doc.get("end") or {}
    recv, sent = end.get("sum_received"), end.get("sum_sent") or {}
    if not recv or "bits_per_second" not in recv or "bytes" not in recv:
        raise ParseError("iperf3 JSON has no end.sum_received (the test did not finish)")
    streams = doc.get("start", {}).get("test_start", {}).get("num_streams") or len(end.get("streams") or []) or 1
    return IperfResult(
        bytes_received=int(recv["bytes"]),
        seconds=float(recv.get("seconds") or 0.0),
        bits_per_second=float(recv["bits_per_second"]),
        retransmits=sent.get("retransmits"),
        streams=int(streams),
    )


# ---------------------------------------------------------------------------------------------- wrk
@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    errors: int  # connect + read + write + timeouts + non-2xx/3xx responses
    p50_ms: float
    p99_ms: float
    p90_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "rps": self.rps}


_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME_RE = r"([0-9.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """wrk's output: the WRK_JSON line of WRK_LUA when present, else the `--latency` text."""
    for line in text.splitlines():
        if line.startswith(WRK_JSON_MARK):
            return _parse_wrk_json(line[len(WRK_JSON_MARK):])
    return _parse_wrk_text(text)


def _parse_wrk_json(payload: str) -> WrkResult:
    try:
        d = json.loads(payload)
        lat = d["latency_us"]
        errors = sum(int(d[k]) for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
        return WrkResult(
            requests=int(d["requests"]), duration_s=int(d["duration_us"]) / 1e6, errors=errors,
            p50_ms=lat["p50"] / 1e3, p99_ms=lat["p99"] / 1e3, p90_ms=lat["p90"] / 1e3,
            mean_ms=float(lat["mean"]) / 1e3, max_ms=lat["max"] / 1e3,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ParseError(f"bad WRK_JSON line: {exc!r}: {payload[:200]!r}") from None


def _parse_wrk_text(text: str) -> WrkResult:
    m = re.search(r"(\d+) requests in " + _TIME_RE, text)
    if not m:
        raise ParseError(f"wrk output has no 'N requests in T' line: {text[-400:]!r}")
    requests, duration_s = int(m.group(1)), _ms(m.group(2), m.group(3)) / 1e3
    pct = {p: _ms(v, u) for p, v, u in re.findall(r"^\s*(\d+(?:\.\d+)?)%\s+" + _TIME_RE + r"\s*$", text, re.M)}
    if "50" not in pct or "99" not in pct:
        raise ParseError("wrk output has no latency distribution (run it with --latency)")
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors += int(m.group(1))
    lat = re.search(r"Latency\s+" + _TIME_RE + r"\s+" + _TIME_RE + r"\s+" + _TIME_RE, text)
    return WrkResult(
        requests=requests, duration_s=duration_s, errors=errors, p50_ms=pct["50"], p99_ms=pct["99"],
        p90_ms=pct.get("90"),
        mean_ms=_ms(lat.group(1), lat.group(2)) if lat else None,
        max_ms=_ms(lat.group(5), lat.group(6)) if lat else None,
    )


# ----------------------------------------------------------------------------------------------- ss
def count_ss_lines(text: str) -> int:
    """Sockets listed by `ss -H ...` (one per non-empty line)."""
    return sum(1 for line in text.splitlines() if line.strip())


def redirect_packets(text: str, port: int = 15001) -> int:
    """Packets counted by the REDIRECT rule(s) to `port` in `iptables -t nat -L OUTPUT -v -n -x`
    output (0 when there is no such rule): proof that traffic was captured by the outbound rule."""
    total = 0
    for line in text.splitlines():
        fields = line.split()
        if "REDIRECT" in fields and f"ports {port}" in line and fields[0].isdigit():
            total += int(fields[0])
    return total


def ss_bytes_received(text: str) -> int:
    """Sum of `bytes_received:N` over the sockets of an `ss -ti` listing (0 when none)."""
    return sum(int(n) for n in re.findall(r"\bbytes_received:(\d+)", text))


# ---------------------------------------------------------------------------------------- syscalls
# Syscall names by type, as the report groups them ("other" is everything else, e.g. futex, close).
SYSCALL_TYPES = {
    "read": ("read", "readv", "pread64", "preadv", "preadv2", "recvfrom", "recvmsg", "recvmmsg", "recv"),
    "write": ("write", "writev", "pwrite64", "pwritev", "pwritev2", "sendto", "sendmsg", "sendmmsg",
              "sendfile", "sendfile64", "send"),
    "epoll": ("epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl", "epoll_create", "epoll_create1"),
}
_TYPE_OF = {name: kind for kind, names in SYSCALL_TYPES.items() for name in names}
# Counted by name as well when perf counts tracepoints (the rest of "other" is total minus the named)
SYSCALLS_NAMED_OTHER = (
    "futex", "splice", "close", "accept", "accept4", "connect", "shutdown", "socket", "getsockopt",
    "setsockopt", "getsockname", "getpeername", "poll", "ppoll", "select", "pselect6", "io_uring_enter",
    "nanosleep", "clock_nanosleep", "sched_yield", "mmap", "munmap", "mremap", "madvise", "mprotect", "brk",
    "ioctl", "fcntl", "eventfd2", "timerfd_settime", "getrandom",
)
PERF_TOTAL_EVENT = "raw_syscalls:sys_enter"  # every syscall entry: the total, whatever its name
PERF_SYSCALL_PREFIX = "syscalls:sys_enter_"
TOTAL = "total"  # key of the total in a counts dict


def syscall_type(name: str) -> str:
    return _TYPE_OF.get(name, "other")


def parse_strace_c(text: str) -> dict[str, int]:
    """`strace -c` summary -> {syscall: calls, ..., "total": calls}.  The table has `% time, seconds,
    usecs/call, calls, [errors], syscall`; the errors column is blank when a call never failed.
    Lines outside the table ("Process N attached", strace's own warnings) are ignored."""
    counts: dict[str, int] = {}
    total = None
    in_table = False
    for line in text.splitlines():
        cols = line.split()
        if cols[:2] == ["%", "time"]:
            in_table = True
            continue
        if not in_table or not cols or set(line.strip()) <= {"-", " "}:
            continue
        try:
            float(cols[0]), float(cols[1])
        except ValueError:
            continue
        if len(cols) not in (5, 6, 7) or not cols[3].isdigit():  # 7 with -w/-Y decorations: tolerated
            continue
        name = cols[-1]
        if name == "total":
            total = int(cols[3])
        else:
            counts[name] = counts.get(name, 0) + int(cols[3])
    if total is None:
        raise ParseError(f"strace -c output has no total line: {text[-300:]!r}")
    if sum(counts.values()) != total:
        raise ParseError(f"strace -c rows sum to {sum(counts.values())}, its total says {total}")
    counts[TOTAL] = total
    return counts


def parse_perf_stat_syscalls(text: str) -> dict[str, int]:
    """`perf stat -x, -e raw_syscalls:sys_enter,syscalls:sys_enter_<name>,...` -> {name: count,
    "total": count}.  A counter perf could not read (`<not counted>`, `<not supported>`) is left
    out; the total (raw_syscalls:sys_enter) must be there."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        cols = line.split(",")
        if len(cols) < 3 or line.startswith("#"):
            continue
        value, event = cols[0].strip(), cols[2].strip()
        if not value.isdigit():
            continue
        if event == PERF_TOTAL_EVENT:
            counts[TOTAL] = counts.get(TOTAL, 0) + int(value)
        elif event.startswith(PERF_SYSCALL_PREFIX):
            name = event[len(PERF_SYSCALL_PREFIX):]
            counts[name] = counts.get(name, 0) + int(value)
    if TOTAL not in counts:
        raise ParseError(f"perf stat output has no {PERF_TOTAL_EVENT} count: {text[-300:]!r}")
    return counts


def merge_counts(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def syscalls_by_type(counts: dict[str, int]) -> dict[str, int]:
    """{"read", "write", "epoll", "other", "total"} from per-name counts with a "total" (from
    strace all names are there; from perf only the traced ones, so other = total - the typed)."""
    out = {kind: 0 for kind in SYSCALL_TYPES}
    for name, n in counts.items():
        if name != TOTAL and name in _TYPE_OF:
            out[_TYPE_OF[name]] += n
    total = counts.get(TOTAL, sum(n for k, n in counts.items() if k != TOTAL))
    out["other"] = max(0, total - sum(out.values()))
    out[TOTAL] = total
    return out


def per_gb(counts: dict[str, int], bytes_moved: int) -> dict[str, float]:
    """Counts per 10^9 bytes of payload."""
    if bytes_moved <= 0:
        raise ValueError("no payload moved")
    return {k: v * 1e9 / bytes_moved for k, v in counts.items()}


# ------------------------------------------------------------------------------------ flame graphs
def fold_perf_script(text: str, keep_frame: str | None = None) -> dict[str, int]:
    """`perf script -F comm,tid,ip,sym,dso` text -> folded stacks {"comm;outer;...;leaf": samples}
    (root first, as flamegraph tools read them).  A sample is a header line (`comm tid ...`) then one
    frame per indented line (innermost first), then a blank line.  Unknown symbols read
    `[dso]`.  With `keep_frame`, only samples whose thread name or stack holds that text are kept
    (the native engine's `worker_main`, Envoy's `wrk:worker_<n>` threads)."""
    folded: dict[str, int] = {}

    def flush(comm: str | None, frames: list[str]) -> None:
        if comm is None:
            return
        if keep_frame is not None and keep_frame not in comm and not any(keep_frame in f for f in frames):
            return
        key = ";".join([comm] + frames[::-1])
        folded[key] = folded.get(key, 0) + 1

    comm, frames = None, []
    for line in text.splitlines():
        if not line.strip():
            flush(comm, frames)
            comm, frames = None, []
        elif line[0] in " \t":
            parts = line.split(None, 1)
            rest = parts[1] if len(parts) > 1 else "[unknown]"
            sym, _, dso = rest.rpartition(" (")
            sym = sym.strip() or rest.strip()
            if sym.startswith("[unknown]") or not sym:
                sym = "[" + dso.rstrip(")").rsplit("/", 1)[-1] + "]" if dso else "[unknown]"
            else:
                sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
            frames.append(sym.replace(";", ":"))
        else:
            flush(comm, frames)
            comm_tid = line.split()
            # "comm tid ..." (comm may hold spaces: the tid is the first all-digit field after it)
            idx = next((i for i, c in enumerate(comm_tid) if i and c.rstrip(":").isdigit()), len(comm_tid))
            comm, frames = " ".join(comm_tid[:idx]).replace(";", ":") or "?", []
    flush(comm, frames)
    return folded
