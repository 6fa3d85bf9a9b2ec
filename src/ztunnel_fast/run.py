"""The `run` command's body: environment -> Config -> logging -> App under uvloop.

Role: one path for both ways `run` is started: the click command (`ztunnel-fast run --flag ...`,
cli.py, which first writes its flags over the environment) and the flag-less `ztunnel-fast run`
that the chart and the image use, which entry.py dispatches here without importing click
(~1 MiB of idle RSS; tests/unit/test_lazy_imports.py).

Invariant: a configuration or identity error ends the process with exit status 2 and one line on
stderr, `ztunnel-fast: error: <reason>`, before any listener accepts.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from .errors import ConfigError, IdentityError


def fail(exc: Exception | str) -> NoReturn:
    print(f"ztunnel-fast: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


def run(env: dict[str, str]) -> None:
    # gRPC core's own INFO lines (GOAWAY received, ...) would break our log format: errors only
    # unless the operator asks for more.  Set before anything imports grpc (istiod_ca does, before
    # xds/client.py's own setdefault would run).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from .config import Config
    from .telemetry.logs import setup_logging

    try:
        config = Config.from_env(env)
        setup_logging(config.log_level, config.log_format)
    except (ConfigError, ValueError) as exc:
        fail(exc)
    import uvloop

    from .app import App

    async def go():
        await App(config).run()

    try:
        uvloop.run(go())
    except (ConfigError, IdentityError) as exc:
        fail(exc)
