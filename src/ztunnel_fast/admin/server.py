"""The three HTTP endpoints operators and Kubernetes use, served by admin/http.py (asyncio + h11:
no hand-written parser; not aiohttp, which costs ~9 MiB of idle RSS).

- admin, localhost:15000: `/` index, `GET /config_dump` (reference 7.3 shape), `POST /logging`
  (`?level=info` or `?level=ztunnel_fast::proxy=debug,info`; `?reset`; no query: current levels),
  `POST /quitquitquit` (graceful drain).  Anything else 404.
- stats, :15020: `/metrics` and `/stats/prometheus` (Prometheus text, or OpenMetrics by Accept).
- readiness, :15021: `GET /healthz/ready` -> `200 ready` once every start-up task is done, else
  `500 not ready, pending: {...}`; other methods 405.

Invariant: these servers start before anything else, so readiness answers (500) during start-up.
"""

from __future__ import annotations

import logging
import platform
import sys
from typing import Callable

import orjson

from .. import __version__
from ..config import ADMIN_PORT, READINESS_PORT, STATS_PORT
from ..telemetry import logs
from .http import App, HttpServer, Request, Response, text

log = logging.getLogger(__name__)

INDEX = """<!DOCTYPE html><html><head><title>ztunnel-fast admin</title></head><body>
<h1>ztunnel-fast admin</h1><ul>
<li><a href="/config_dump">/config_dump</a>: workloads, services, policies, certificates, config</li>
<li>POST /logging?level=&lt;spec&gt;: change log levels (e.g. info or ztunnel_fast::proxy=debug,info)</li>
<li>POST /quitquitquit: drain and exit</li>
</ul><p>Metrics: :15020/metrics. Readiness: :15021/healthz/ready.</p></body></html>
"""


class Readiness:
    """Start-up tasks that must finish before the proxy reports ready."""

    def __init__(self, *tasks: str):
        self.pending: set[str] = set(tasks)
        self._on_ready: list[Callable[[], None]] = []

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, the first time no task is pending (from the `done` that made it so)."""
        self._on_ready.append(callback)

    def done(self, task: str) -> None:
        self.pending.discard(task)
        if not self.pending and self._on_ready:
            callbacks, self._on_ready = self._on_ready, []
            for callback in callbacks:
                callback()

    def block(self, task: str) -> None:
        self.pending.add(task)

    @property
    def ready(self) -> bool:
        return not self.pending


def version_info(engine: str) -> dict[str, str]:
    return {
        "version": __version__,
        "gitRevision": "",
        "pythonVersion": sys.version.split()[0],
        "buildProfile": "release",
        "buildStatus": "Clean",
        "istioVersion": "",
        "engine": engine,
        "platform": platform.platform(),
    }


def admin_app(*, config_dump: Callable[[], dict], quit: Callable[[], None], initial_levels: str) -> App:
    async def index(_request: Request) -> Response:
        return text(INDEX, content_type="text/html")

    async def dump(_request: Request) -> Response:
        body = orjson.dumps(config_dump(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        return Response(body, content_type="application/json")

    async def logging_(request: Request) -> Response:
        query = request.query
        try:
            if "reset" in query:
                logs.set_levels(initial_levels)
            elif "level" in query:
                logs.set_levels(query["level"])
        except ValueError as exc:
            return text(f"{exc}\n", 400)
        return text(f"current log level is {logs.current_levels()}\n")

    async def quitquitquit(_request: Request) -> Response:
        log.info("received /quitquitquit: draining")
        quit()
        return text("OK\n")

    app = App()
    app.add_get("/", index)
    app.add_get("/config_dump", dump)
    app.add_post("/logging", logging_)
    app.add_post("/quitquitquit", quitquitquit)
    return app


def stats_app(exposition: Callable[[str | None], tuple[bytes, str]]) -> App:
    async def metrics(request: Request) -> Response:
        body, content_type = exposition(request.header("Accept"))
        return Response(body, content_type=content_type)

    app = App()
    app.add_get("/metrics", metrics)
    app.add_get("/stats/prometheus", metrics)
    return app


def readiness_app(readiness: Readiness) -> App:
    async def ready(_request: Request) -> Response:
        if readiness.ready:
            return text("ready\n")
        pending = ", ".join(f'"{t}"' for t in sorted(readiness.pending))
        return text(f"not ready, pending: {{{pending}}}\n", 500)

    app = App()
    app.add_route("*", "/healthz/ready", _get_only(ready))
    return app


def _get_only(handler):
    async def wrapped(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return text("method not allowed\n", 405)
        return await handler(request)

    return wrapped


class Servers:
    """Runs the three apps; `serve()` binds one, `close()` stops them all."""

    def __init__(self):
        self.servers: list[HttpServer] = []

    async def serve(self, app: App, host: str | None, port: int) -> None:
        server = HttpServer(app)
        await server.start(host, port)
        self.servers.append(server)

    async def close(self) -> None:
        for server in reversed(self.servers):
            await server.close()
        self.servers.clear()


__all__ = ["ADMIN_PORT", "READINESS_PORT", "STATS_PORT", "Readiness", "Servers", "admin_app", "readiness_app",
           "stats_app", "version_info"]
