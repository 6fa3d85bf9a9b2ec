"""What a pod costs in in-pod mode: open descriptors and resident memory of one ztunnel-fast as
istio-cni (the FakeCni double) hands it N pods.

    .venv/bin/python -m bench.inpod_pods [--pods 100] [--engine native]

Builds a node namespace running ztunnel-fast (shared, in-pod) and N pod namespaces in its local
config, adds every pod over ZDS (real SCM_RIGHTS), checks that each pod's 15008 listens, and prints
fds and RSS before and after, and per pod.  Bounded by --pods; everything is torn down (namespaces,
processes, the socket file).  Reports numbers; asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from ztunnel_fast import netns
from ztunnel_fast.demo.lab import Lab
from ztunnel_fast.fakes.cni import FakeCni


def usage(pid: int) -> tuple[int, int]:
    """(open fds, VmRSS in KiB) of a process."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return fds, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--engine", default="native", choices=["native", "pure"])
    args = ap.parse_args()
    if not 1 <= args.pods <= 250:
        ap.error("--pods must be in 1..250 (one /24 segment)")
    work = Path(tempfile.mkdtemp(prefix="ztf-inpod-bench-"))
    sock = work / "ztunnel.sock"
    with netns.Topology() as topo:
        lab = Lab(topo, work / "lab", engine=args.engine, log_level="warn")
        node = lab.pod("node", node="node1", workload=False)
        pods = [lab.pod(f"p{i}", namespace="bench", node="node1") for i in range(args.pods)]
        lab.write_config()
        cni = FakeCni(sock)
        try:
            zt = lab.start_ztunnel(node, redirect=False, shared=True, wait=False, INPOD_UDS=str(sock),
                                   RUST_LOG="warn,ztunnel_fast::app=info")
            lab.wait_ready(zt)
            cni.accept()
            assert cni.snapshot_sent() == ""
            before = usage(zt.proc.pid)
            for p in pods:
                error = cni.add(f"uid-{p.name}", p.pod.netns, p.name, p.namespace, p.service_account)
                if error:
                    raise RuntimeError(f"{p.name}: NACK {error}")
            after = usage(zt.proc.pid)
            missing = [p.name for p in pods
                       if not topo.run(p.pod, ["ss", "-Hltn", "sport = :15008"]).stdout.strip()]
            report = {
                "engine": args.engine, "pods": args.pods, "pods_not_listening": missing,
                "fds_before": before[0], "fds_after": after[0],
                "fds_per_pod": round((after[0] - before[0]) / args.pods, 2),
                "rss_kib_before": before[1], "rss_kib_after": after[1],
                "rss_kib_per_pod": round((after[1] - before[1]) / args.pods, 1),
            }
            print(json.dumps(report, indent=2))
        finally:
            cni.close()
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
