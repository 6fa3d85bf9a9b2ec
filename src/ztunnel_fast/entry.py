"""The `ztunnel-fast` executable (console script and `python -m ztunnel_fast`).

Role: `ztunnel-fast run` with no flags, as the chart and the image start it, goes straight to
run.py with the process environment; every other command line goes to the click CLI (cli.py).
The same Config validation and error line either way; the difference is that the proxy process
never imports click (~1 MiB of idle RSS: docs/ARCHITECTURE.md, idle memory).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args == ["run"]:
        from .run import run

        run(dict(os.environ))
        return
    from .cli import main as cli

    cli(args=args)
