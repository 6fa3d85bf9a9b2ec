"""`python -m bench.ab`: proxy CPU per GB of a few setups, alternated over several rounds on fresh
setups, for A/B comparisons on a shared, noisy machine (a bench tool, not a test).

  python -m bench.ab --setups relay,relaycopy,native,envoy --rounds 3 --mib 1024
  python -m bench.ab --setups native,native --rounds 4 --before-setup 'cp /tmp/B.so src/...'   (see --help)

Each round runs every setup once, in the order given, each on a fresh two-pod topology (BenchLab):
start it, check the path, one fixed-size 1-stream iperf3 transfer (runners.cpu_per_gb: utime+stime
of both proxies from /proc per GB received, exactly as the bench's CPU/GB figure), tear down.
Alternating in rounds spreads the machine's drift over all setups.  Printed: every round's figure,
then per setup the median and the minimum (the least disturbed run) and the throughput of those
transfers.  `--json PATH` keeps the raw figures.

`--before-setup CMD` runs a shell command before each setup is started, with the setup's index in
the list (0, 1, ...) as $AB_INDEX and its name as $AB_SETUP: how two builds of the native engine are
compared (copy one or the other extension module in place; a new proxy process loads it at start).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from . import runners
from .lab import BenchLab
from .settings import DEFAULT, MIB


def summarize(figures: dict[str, list[dict]]) -> dict[str, dict]:
    """Per setup label: median and min CPU/GB and the median Gbit/s of its transfers (pure)."""
    out = {}
    for label, runs in figures.items():
        cpu = [r["proxy_cpu_s_per_gb"] for r in runs if r.get("proxy_cpu_s_per_gb") is not None]
        gbps = [r["gbps"] for r in runs if r.get("gbps") is not None]
        user = [r["proxy_cpu_user_s_per_gb"] for r in runs if r.get("proxy_cpu_user_s_per_gb") is not None]
        system = [r["proxy_cpu_sys_s_per_gb"] for r in runs if r.get("proxy_cpu_sys_s_per_gb") is not None]
        out[label] = {"runs": len(runs), "cpu_median": statistics.median(cpu) if cpu else None,
                      "cpu_min": min(cpu) if cpu else None, "gbps_median": statistics.median(gbps) if gbps else None,
                      "user_median": statistics.median(user) if user else None,
                      "sys_median": statistics.median(system) if system else None}
    return out


def main(argv: list[str] | None = None) -> int:
    from ztunnel_fast import netns

    from . import setups as setups_mod
    from .lab import PREFIX

    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="relay,relaycopy,native,envoy",
                    help="comma-separated setups (bench.setups.ALL); a name may repeat (A/B with --before-setup)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=1024, help="MiB per transfer")
    ap.add_argument("--topology", choices=("bridge", "veth"), default="bridge")
    ap.add_argument("--worker-threads", type=int, default=DEFAULT.worker_threads)
    ap.add_argument("--before-setup", help="shell command run before each setup starts ($AB_INDEX, $AB_SETUP)")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("must run as root (network namespaces, iptables)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    setups = setups_mod.make(names, args.worker_threads)
    labels = [f"{i}:{n}" for i, n in enumerate(names)]
    settings = replace(DEFAULT, cpu_bytes=args.mib * MIB, topology=args.topology, settle_seconds=1.0)
    netns.cleanup_stale(PREFIX)
    run_id = secrets.token_hex(3)
    workroot = Path(tempfile.mkdtemp(prefix="ztunnel-fast-ab-"))
    figures: dict[str, list[dict]] = {label: [] for label in labels}
    try:
        for rnd in range(args.rounds):
            for i, (label, setup) in enumerate(zip(labels, setups)):
                if args.before_setup:
                    subprocess.run(args.before_setup, shell=True, check=True, timeout=120,
                                   env={**os.environ, "AB_INDEX": str(i), "AB_SETUP": setup.name})
                workdir = workroot / f"{rnd}-{i}"
                workdir.mkdir(parents=True)
                bl = BenchLab(workdir, f"ab{i}", run_id, settings.body_bytes, topology=args.topology)
                try:
                    started = setup.start(bl)
                    ctx = runners.Ctx(bl, started.proxies, settings, workdir, pooled=started.info.get("pooled", True))
                    runners.path_check(ctx)
                    result = runners.cpu_per_gb(ctx)
                except Exception as exc:  # noqa: BLE001 - recorded, the rounds go on
                    result = {"error": f"{type(exc).__name__}: {exc}"[-300:]}
                finally:
                    bl.teardown()
                figures[label].append(result)
                shown = (f"{result['proxy_cpu_s_per_gb']:.3f} s/GB (user {result['proxy_cpu_user_s_per_gb']:.3f}, sys "
                 f"{result['proxy_cpu_sys_s_per_gb']:.3f}), {result['gbps']:.2f} Gbit/s"
                         if "error" not in result else result["error"])
                print(f"round {rnd + 1} {label:>14}: {shown}", flush=True)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    summary = summarize(figures)
    print(f"\n{args.mib} MiB per transfer, {args.rounds} rounds, topology {args.topology}")
    for label, s in summary.items():
        if s["cpu_median"] is None:
            print(f"{label:>14}: no figure")
            continue
        print(f"{label:>14}: CPU/GB median {s['cpu_median']:.3f}, min {s['cpu_min']:.3f} s/GB (median user "
              f"{s['user_median']:.3f}, sys {s['sys_median']:.3f}); {s['gbps_median']:.2f} Gbit/s median "
              f"({s['runs']} runs)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "figures": figures,
                                         "summary": summary}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
