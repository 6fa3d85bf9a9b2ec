"""The ztunnel-fast benchmark harness (`make bench`, `python -m bench`).

One run builds a two-pod network-namespace topology per setup and measures, side by side:
`direct` (no proxy), `native` (ztunnel-fast, Cython engine), `pure` (ztunnel-fast, pure twin),
`envoy` and `envoy1` (an Envoy pair speaking HBONE, --concurrency 2 and 1).  See bench/README.md for what each figure means.

Modules:
  cli        arguments, the run plan, progress, orchestration (one setup at a time)
  settings   durations and sizes (`--quick` and the default preset)
  lab        the two pods, their apps (iperf3 server, nginx, tunnel holder) and sysctls
  setups     how each setup is started (ztunnel-fast via the Lab, Envoy via tests.interop.envoy)
  envoy_pair the Envoy bootstraps (transparent HBONE originator, multi-port terminator)
  runners    one function per figure; the only place that runs load generators
  procstat   /proc readers: CPU ticks, RSS, sockets of the proxy processes
  parse      pure parsers: iperf3 JSON, wrk output, strace -c / perf stat syscall counts, perf script stacks
  syscount   syscall counts of the proxies over one transfer (perf stat tracepoints, or strace -c -f)
  flame      perf flame graphs of every proxy thread (native worker threads apart), SVG
  report     metric definitions, ratios, the table, JSON and the PNG chart
  tunnels    the 10k-tunnel client and holder (run inside pods as `python -m bench.tunnels`)
  profiling  py-spy flame graphs (`--profile`, `make bench PROFILE=1`)
  newconn_profile  where a new connection's time goes (py-spy on the client side, CPU per connection)
  micro      in-process micro-benchmarks (the place for "policy decision cost with 10,000 policies")
"""
