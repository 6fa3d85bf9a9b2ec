"""A/B of the new-connection figures between two source trees, alternated on a shared, noisy
machine (a bench tool, not a test): each pair runs `bench.newconn_profile --no-profile` once with
ztunnel-fast from tree A and once from tree B (PYTHONPATH; the order alternates per pair), then
prints the median of the pairs' B/A ratios for proxy CPU per connection (both sides), each side's
event loop thread, and the rate.

    .venv/bin/python -m bench.newconn_ab A_SRC B_SRC [--pairs 5] [--count 2000] [-- newconn_profile args]

A_SRC/B_SRC are `src` directories holding a built `ztunnel_fast` (e.g. `git archive REV src | tar
-x -C /tmp/a` then `setup.py build_ext --inplace` there, or a copy of a worktree's `src`).
Bounded by --pairs and --count.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

FIGURE = re.compile(r"\((\d+)/s\).*?proxy CPU \(both sides\) ([\d,]+) µs.*?client ([\d,]+), server ([\d,]+)\)"
                    r".*?client ([\d,]+) µs, server ([\d,]+) µs", re.DOTALL)
KEYS = ("rate", "cpu", "client", "server", "loop_client", "loop_server")


def run_once(src: str, count: int, extra: list[str]) -> dict[str, float] | None:
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run([sys.executable, "-m", "bench.newconn_profile", "--fast-path", "both", "--count", str(count),
                          "--no-profile", *extra], cwd=Path(__file__).resolve().parent.parent, env=env,
                         capture_output=True, text=True, timeout=600, check=False).stdout
    m = FIGURE.search(out)
    if m is None:
        print(out)
        return None
    return dict(zip(KEYS, (float(x.replace(",", "")) for x in m.groups())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench.newconn_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("a_src")
    ap.add_argument("b_src")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("extra", nargs="*", help="more bench.newconn_profile arguments (after --)")
    a = ap.parse_args(argv)
    pairs = []
    for i in range(a.pairs):
        order = ("A", "B") if i % 2 == 0 else ("B", "A")
        result = {side: run_once(a.a_src if side == "A" else a.b_src, a.count, a.extra) for side in order}
        print(i, "A", result["A"], "\n  B", result["B"], flush=True)
        if result["A"] and result["B"]:
            pairs.append(result)
    for key in ("cpu", "loop_client", "loop_server", "rate"):
        if not pairs:
            break
        ratios = [p["B"][key] / p["A"][key] for p in pairs]
        print(f"{key}: median B/A {statistics.median(ratios):.3f}  pairs {[round(r, 3) for r in ratios]}  "
              f"A median {statistics.median(p['A'][key] for p in pairs)}  B median {statistics.median(p['B'][key] for p in pairs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
