"""perf flame graphs of the proxy processes (`--profile`, `make bench PROFILE=1`): every thread,
C and kernel frames included (the native engine's worker threads are C threads with no Python
frame, which py-spy's Python-centred view shows poorly; perf samples them like any thread).

  record  `perf record -F <hz> --call-graph dwarf -p <pids> -- sleep <s>` per side, during a bulk
          transfer (cpu-clock: this VM has no hardware counters; dwarf unwinding because the
          extension and CPython are built without frame pointers)
  fold    `perf script -F comm,tid,ip,sym,dso` -> folded stacks (parse.fold_perf_script), written
          as `<prefix>-<side>.folded` (the input format of Brendan Gregg's flamegraph.pl and of
          inferno, for whoever has them)
  render  `<prefix>-<side>.svg`: a self-contained flame graph (root at the bottom, width = share of
          samples, hover for the full frame and count); one tower per thread name, and a second SVG
          `<prefix>-<side>-workers.svg` with only the worker threads' samples (the native engine's
          `worker_main`, Envoy's `wrk:worker_<n>` threads)

`render_svg` is pure (folded stacks in, SVG text out); the rest starts perf (bounded by `sleep`
and by timeouts) and reads its files.
"""

from __future__ import annotations

import html
import shutil
import subprocess
import zlib
from pathlib import Path

from . import parse
from .procstat import Proxies

# worker threads, by what their samples hold: the native engine's thread entry (_splice_api.pxi),
# Envoy's worker thread names; the pure twin has none (its bytes move on the asyncio thread)
WORKER_MARKS = ("worker_main", "wrk:worker")
FRAME_H = 16
WIDTH = 1200
MIN_PX = 0.3  # narrower frames are dropped from the picture (their samples still count in the parents)


def perf_binary() -> str | None:
    return shutil.which("perf")


def _color(name: str) -> str:
    h = zlib.crc32(name.encode())
    if "kernel" in name or name.startswith(("[", "__x64_", "do_syscall", "entry_SYSCALL")):
        return f"rgb({200 + h % 55},{120 + h % 60},{60 + h % 40})"  # orange-ish: kernel / unknown
    return f"rgb({220 + h % 35},{80 + (h >> 8) % 100},{40 + (h >> 16) % 40})"


def render_svg(folded: dict[str, int], title: str) -> str:
    """Flame graph of folded stacks: each frame a rectangle as wide as its share of the samples."""
    total = sum(folded.values())
    tree: dict = {}  # name -> [count, children]
    depth = 0
    for stack, n in sorted(folded.items()):
        node = tree
        frames = stack.split(";")
        depth = max(depth, len(frames))
        for f in frames:
            entry = node.setdefault(f, [0, {}])
            entry[0] += n
            node = entry[1]
    height = (depth + 3) * FRAME_H + 10
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" '
            f'font-size="11"><rect width="100%" height="100%" fill="#fdfdf6"/>'),
           (f'<text x="{WIDTH / 2}" y="14" text-anchor="middle" font-size="13">{html.escape(title)} '
            f'({total:,} samples)</text>')]
    scale = (WIDTH - 20) / total if total else 0.0

    def walk(node: dict, x: float, level: int) -> None:
        for name, (count, children) in sorted(node.items()):
            w = count * scale
            if w >= MIN_PX:
                y = height - (level + 1) * FRAME_H - 4
                label = html.escape(name)
                pct = 100.0 * count / total
                out.append(f'<g><title>{label} ({count:,} samples, {pct:.2f}%)</title>'
                           f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{FRAME_H - 1}" '
                           f'fill="{_color(name)}" rx="2"/>')
                chars = int(w / 7)
                if chars >= 3:
                    text = name if len(name) <= chars else name[:chars - 2] + ".."
                    out.append(f'<text x="{x + 3:.2f}" y="{y + FRAME_H - 4}">{html.escape(text)}</text>')
                out.append("</g>")
                walk(children, x, level + 1)
            x += w

    walk(tree, 10.0, 0)
    out.append("</svg>")
    return "\n".join(out) + "\n"


class Recorder:
    """perf record on each side's processes for `seconds` (start now; `finish()` folds and renders)."""

    def __init__(self, proxies: Proxies, out_prefix: Path, seconds: float, hz: int = 199):
        perf = perf_binary()
        if perf is None:
            raise RuntimeError("perf not installed (apt: linux-perf)")
        self.perf, self.seconds, self.prefix = perf, seconds, Path(out_prefix)
        self.procs: dict[str, subprocess.Popen] = {}
        self.data: dict[str, Path] = {}
        for side in proxies.pids:
            data = Path(f"{out_prefix}-{side}.perf.data")
            argv = [perf, "record", "-q", "-F", str(hz), "--call-graph", "dwarf,16384", "-o", str(data),
                    "-p", ",".join(map(str, proxies.tree(side))), "--", "sleep", f"{seconds:g}"]
            self.procs[side] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                start_new_session=True)
            self.data[side] = data

    def finish(self) -> dict[str, dict[str, str]]:
        """Wait (bounded), fold, render; {side: {"svg", "workers_svg", "folded", "samples"} or {"error"}}."""
        result = {}
        for side, proc in self.procs.items():
            try:
                _, err = proc.communicate(timeout=self.seconds + 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate(timeout=10)
            data = self.data[side]
            if not data.exists() or data.stat().st_size == 0:
                result[side] = {"error": f"perf record wrote nothing (exit {proc.returncode}): "
                                         f"{(err or b'').decode(errors='replace')[-300:]}"}
                continue
            try:
                cp = subprocess.run([self.perf, "script", "-i", str(data), "-F", "comm,tid,ip,sym,dso"],
                                    capture_output=True, text=True, errors="replace", timeout=600,
                                    check=False)
            except subprocess.TimeoutExpired:
                result[side] = {"error": "perf script took over 600 s"}
                continue
            folded = parse.fold_perf_script(cp.stdout)
            mark, workers = next(((m, w) for m in WORKER_MARKS
                                  if (w := parse.fold_perf_script(cp.stdout, keep_frame=m))), ("", {}))
            base = Path(f"{self.prefix}-{side}")
            folded_path = Path(f"{base}.folded")
            folded_path.write_text("".join(f"{k} {v}\n" for k, v in sorted(folded.items())))
            svg = Path(f"{base}.svg")
            svg.write_text(render_svg(folded, f"{base.name}: all threads, perf cpu-clock"))
            entry = {"svg": str(svg), "folded": str(folded_path), "samples": sum(folded.values()),
                     "worker_samples": sum(workers.values())}
            if workers:
                wsvg = Path(f"{base}-workers.svg")
                wsvg.write_text(render_svg(workers, f"{base.name}: worker threads ({mark})"))
                entry["workers_svg"] = str(wsvg)
            data.unlink(missing_ok=True)  # tens of MB with dwarf stacks; the folded file keeps the profile
            result[side] = entry
        return result

    def abort(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
