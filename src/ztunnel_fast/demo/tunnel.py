"""`ztunnel-fast demo`: two pods in network namespaces, one ztunnel-fast each, an HBONE tunnel.

Replays the part of the user guide that needs no redirection machinery beyond the in-pod rule:
curl from `sleep` to `httpbin` (page title `httpbin.org`), then the ztunnel logs filtered with
`egrep "inbound|outbound"`.  Each step prints the command, its output and one line on what it
shows.  Everything is torn down at the end, on Ctrl-C and on failure, unless --keep.
"""

from __future__ import annotations

import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from .. import netns
from .lab import Lab

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def _step(title: str, command: str, output: str, meaning: str) -> None:
    print(f"\n{BOLD}## {title}{RESET}")
    print(f"$ {command}")
    for line in output.rstrip("\n").splitlines():
        print(f"  {line}")
    print(f"{DIM}-> {meaning}{RESET}")


def run_demo(engine: str = "auto", keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ztunnel-fast-demo-"))
    topo = netns.Topology(prefix=f"ztf-demo-{int(time.time()) % 100000}")
    try:
        lab = Lab(topo, workdir, engine=engine)
        sleep = lab.pod("sleep", namespace="ambient-demo", node="node1")
        httpbin = lab.pod("httpbin", namespace="ambient-demo", node="node2")
        lab.write_config()
        lab.app(httpbin, "serve", "80", "http", "--name", "httpbin", port=80)
        print(f"{BOLD}ztunnel-fast demo{RESET}: pods as network namespaces under {topo.prefix}-*, workdir {workdir}")
        print(f"  sleep   {sleep.ip}  (ambient-demo, sa sleep)")
        print(f"  httpbin {httpbin.ip}  (ambient-demo, sa httpbin), HTTP on :80")

        curl = ["curl", "-s", "--max-time", "10", f"http://{httpbin.ip}:80/"]
        out = topo.run(sleep.pod, curl, check=False).stdout
        title = "\n".join(line for line in out.splitlines() if "title" in line)
        _step("Before the mesh", f"kubectl exec deploy/sleep -- {shlex.join(curl)} | grep title", title,
              "plain TCP, no ztunnel-fast on the path yet")

        zs = lab.start_ztunnel(sleep)
        zh = lab.start_ztunnel(httpbin, redirect=False)
        ready = "\n".join(z.lines("proxy ready")[0] for z in (zs, zh))
        _step("Start one ztunnel-fast per pod (dedicated mode, local CA)",
              "ztunnel-fast run  # PROXY_MODE=dedicated PROXY_WORKLOAD_INFO=ambient-demo/<pod>/<sa>", ready,
              "each instance holds its workload's SPIFFE certificate; the sleep pod's outbound TCP is redirected to :15001")

        out = topo.run(sleep.pod, curl, check=False).stdout
        title = "\n".join(line for line in out.splitlines() if "title" in line)
        if "httpbin.org" not in title:
            print("demo failed: no page through the tunnel", file=sys.stderr)
            return 1
        _step("Through the mesh", f"kubectl exec deploy/sleep -- {shlex.join(curl)} | grep title", title,
              "the same request, now carried over HBONE (mTLS + HTTP/2 CONNECT on :15008)")

        for _ in range(3):
            topo.run(sleep.pod, ["curl", "-s", "-I", "--max-time", "10", f"http://{httpbin.ip}:80/"], check=False)
        time.sleep(0.2)
        logs = "\n".join(line for z in (zs, zh) for line in z.log().splitlines() if re.search("inbound|outbound", line))
        _step("ztunnel-fast logs", 'kubectl -n istio-system logs -l app=ztunnel | egrep "inbound|outbound"', logs,
              "outbound: 'proxy to ... using HBONE via ...:15008 type Direct' then 'complete'; "
              "inbound: 'got CONNECT request' with the client's SPIFFE identity")
        if keep:
            print(f"\n--keep: topology left up. Reach a pod with: ip netns exec {sleep.pod.netns} bash")
            print(f"  remove it later with: for n in $(ip netns list | grep -o '^{topo.prefix}-[a-z0-9-]*'); do ip netns del $n; done")
            return 0
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; tearing down", file=sys.stderr)
        return 130
    finally:
        if not keep:
            topo.teardown()
            print(f"\ntorn down: no namespace, process or rule of {topo.prefix} left")
