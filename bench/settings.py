"""Durations, sizes and configuration of one bench run: the default preset (~13-20 minutes for the
five setups on a 2-core machine) and `--quick` (~4-6 minutes).  Every wait in the harness derives its bound from
these numbers plus a fixed margin, so a shorter run is also a shorter worst case."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class Settings:
    iperf_seconds: float = 15.0  # per throughput run (1 and 4 streams), after the warm-up below
    iperf_omit: int = 1  # warm-up seconds iperf3 leaves out of its figures (slow start, pool set-up)
    cpu_bytes: int = 2 * GIB  # fixed-size iperf3 run for CPU seconds per GB
    wrk_seconds: float = 15.0  # per request/response run (keep-alive, new connection per request); whole s
    wrk_connections: int = 8  # concurrent HTTP connections of wrk (1 thread): closed loop
    wrk_threads: int = 1
    body_bytes: int = 1024  # HTTP response body (ztunnel's own latency bench uses 1 KB)
    tunnels: int = 10_000  # concurrent open tunnels for the memory / connection-count figure
    tunnel_connect_parallel: int = 200  # connects in flight at once while opening them
    tunnel_open_timeout: float = 240.0  # give up opening after this long (partial count reported)
    settle_seconds: float = 2.0  # quiet time before idle-RSS samples and between figures
    syscall_bytes: int = 512 * MIB  # fixed-size iperf3 run with the proxies' syscalls counted (not timed)
    syscall_tool: str = "auto"  # "perf" (syscall tracepoints), "strace" (strace -c -f) or "auto" (perf if it works)
    worker_threads: int = 2  # ZTUNNEL_WORKER_THREADS of ztunnel-fast in every figure but the scaling ones
    scaling_threads: tuple[int, ...] = (1, 2)  # new-connection rate at these worker threads / Envoy concurrency
    scaling_rounds: int = 8  # alternated rounds (one wrk run per thread count each, order flipping: bench.scaling)
    scaling_seconds: float = 4.0  # per scaling wrk run; whole seconds
    topology: str = "bridge"  # "bridge" (pods on a bridge) or "veth" (one veth pair between the pods)
    second_topology: str | None = "veth"  # throughput and CPU/GB also measured on this one (None: not)

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT = Settings()
QUICK = replace(
    DEFAULT,
    iperf_seconds=3.0,
    cpu_bytes=512 * MIB,
    syscall_bytes=256 * MIB,
    wrk_seconds=3.0,
    scaling_rounds=2,
    scaling_seconds=2.0,
    tunnels=2_000,
    tunnel_open_timeout=90.0,
    settle_seconds=1.0,
)


TOPOLOGIES = ("bridge", "veth")
