"""The operator endpoints' HTTP/1.1 server: asyncio streams + h11 (parsing and framing are h11's).

Role: serve small `App`s (a path -> method -> handler table) on a TCP port, one request at a time
per connection, keep-alive as the client asks.  It replaced aiohttp here for idle memory: aiohttp
(with multidict, yarl, its client, cookie jar and e-mail parser) costs ~9 MiB of RSS in every
process, h11 ~0.5 MiB (docs/ARCHITECTURE.md, "idle memory").

Behaviour kept from the aiohttp apps it replaced (tests/unit/test_admin.py):
- a GET route also answers HEAD (headers only); unknown path -> 404 `404: Not Found`; a known path
  with another method -> 405 `405: Method Not Allowed` with `Allow`;
- text bodies are `text/plain; charset=utf-8` unless the handler says otherwise (`charset=utf-8`
  is added to text/* types), byte bodies carry the handler's content type as given;
- the query string is decoded as aiohttp's `request.query` (blank values kept, first value wins).

Invariants: a request is bounded (head MAX_HEAD bytes by h11, body MAX_BODY bytes) and a silent
connection is closed after KEEPALIVE_TIMEOUT seconds; a malformed request gets a 400 and the
connection is closed; `HttpServer.close()` closes the listeners and every open connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl

import h11

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # bytes of request line + headers (h11's own default)
MAX_BODY = 64 * 1024  # bytes of request body: the operator endpoints take none
KEEPALIVE_TIMEOUT = 75.0  # seconds a connection may sit idle between requests (aiohttp's default)
READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]  # first value of each name; `?reset` -> {"reset": ""}
    headers: dict[str, str]  # names lower-case; the last of repeated headers

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def text(body: str, status: int = 200, content_type: str = "text/plain") -> Response:
    """A text response, utf-8, `charset=utf-8` on its content type (as aiohttp's text=)."""
    return Response(body.encode(), status, f"{content_type}; charset=utf-8")


Handler = Callable[[Request], Awaitable[Response]]


class App:
    """Routes: exact paths, each with handlers by method ("*" = any method)."""

    def __init__(self) -> None:
        self.routes: dict[str, dict[str, Handler]] = {}

    def add_get(self, path: str, handler: Handler) -> None:
        self.routes.setdefault(path, {}).update({"GET": handler, "HEAD": handler})

    def add_post(self, path: str, handler: Handler) -> None:
        self.routes.setdefault(path, {})["POST"] = handler

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self.routes.setdefault(path, {})[method] = handler

    async def handle(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            return text("404: Not Found", 404)
        handler = methods.get(request.method) or methods.get("*")
        if handler is None:
            resp = text("405: Method Not Allowed", 405)
            resp.headers.append(("Allow", ",".join(sorted(methods))))
            return resp
        return await handler(request)


def parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    """(path, query) of a request target, the query decoded as aiohttp's request.query."""
    raw = target.decode("latin-1")
    path, _, qs = raw.partition("?")
    query: dict[str, str] = {}
    for name, value in parse_qsl(qs, keep_blank_values=True):
        query.setdefault(name, value)
    return path, query


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _http_date() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


class HttpServer:
    """One App on one listening address (asyncio.start_server; host None = every interface)."""

    def __init__(self, app: App):
        self.app = app
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str | None, port: int) -> None:
        # The name goes to the loop as bytes (in a list, so it is not taken for a sequence of
        # hosts): uvloop encodes a str host with the 'idna' codec, whose import (encodings.idna,
        # stringprep, unicodedata) would cost ~0.4 MiB of idle RSS for "localhost".
        hosts = None if host is None else [host.encode("ascii")]
        self.server = await asyncio.start_server(self._serve, hosts, port, reuse_address=True)

    @property
    def port(self) -> int:
        """The bound port (of the first listening socket; port 0 asks the kernel for one)."""
        assert self.server is not None, "not started"
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.connections):
            writer.close()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                request = await self._read_request(conn, reader, writer)
                if request is None:
                    return
                try:
                    resp = await self.app.handle(request)
                except Exception:  # one failed handler answers 500, the server goes on
                    log.exception("admin handler for %s %s failed", request.method, request.path)
                    resp = text("500 Internal Server Error\n\nServer got itself in trouble", 500)
                self._send(conn, writer, resp, head_only=request.method == "HEAD")
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, h11.LocalProtocolError):
            return
        finally:
            self.connections.discard(writer)
            writer.close()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> Request | None:
        """The next complete request, or None when the client closed or sent something malformed
        (answered 400) or too large (413)."""
        head: h11.Request | None = None
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    self._send(conn, writer, text(f"400: Bad Request\n\n{exc}", exc.error_status_hint),
                               head_only=False, close=True)
                    await writer.drain()
                return None
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(READ_SIZE), KEEPALIVE_TIMEOUT)
                conn.receive_data(data)  # b"" = the client closed
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY:
                    self._send(conn, writer, text("413: Request Entity Too Large", 413), head_only=False, close=True)
                    await writer.drain()
                    return None
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                path, query = parse_target(head.target)
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers}
                return Request(head.method.decode("ascii"), path, query, headers)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    @staticmethod
    def _send(conn: h11.Connection, writer: asyncio.StreamWriter, resp: Response, *, head_only: bool,
              close: bool = False) -> None:
        headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))),
                   ("Date", _http_date()), *resp.headers]
        if close:
            headers.append(("Connection", "close"))
        out = conn.send(h11.Response(status_code=resp.status, headers=headers, reason=_reason(resp.status)))
        if resp.body and not head_only:
            out += conn.send(h11.Data(data=resp.body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
