"""What every HBONE connection shares, whichever engine drives it: the HTTP/2 parameters
(`H2Settings`), the keepalive PING timing, `ConnectionLost`, the state the pool and the listeners
see (`ConnectionState`), and the names of statuses and HTTP/2 error codes.

Role: the engine-neutral half of an HBONE connection.  `connection.py` (the pure twin's driver on
hyper-h2) and the native engine's `NativeConnection` both build on it.  Nothing here imports h2's
state machine or hyperframe (h2.errors is its enum of error codes only): an instance on the native
engine never loads them (~0.8 MiB of idle RSS; tests/unit/test_lazy_imports.py keeps it so).

Invariants: a connection that is lost, or has sent or received GOAWAY, opens no new stream
(`can_open`), whichever engine drives it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

if TYPE_CHECKING:
    from .connection import RequestHandler


PING_INTERVAL = 10.0  # seconds between keepalive PINGs (ztunnel)
PING_TIMEOUT = 20.0  # seconds without a PING ack before the connection is dropped (ztunnel)


@dataclass(frozen=True, slots=True)
class H2Settings:
    """HTTP/2 parameters of HBONE (reference 3.1/3.2); sizes in bytes."""

    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_frame_size: int = 1024 * 1024
    max_concurrent_streams: int = 200  # what a server advertises
    max_header_list_size: int = 64 * 1024


class ConnectionLost(Exception):
    pass


class ConnectionState:
    """What the pool and the listeners see of an HBONE connection, whichever engine drives it
    (connection.py's hyper-h2 driver, or a native worker): identity, streams, GOAWAY and loss state,
    capacity for new streams.  Subclasses say how many streams the peer allows."""

    def __init__(self, sock: socket.socket, tls, *, client: bool, settings: H2Settings,
                 on_request: RequestHandler | None, name: str, peer_identity):
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.tls = tls
        self.client = client
        self.name = name
        self.settings = settings
        self.peer_identity = peer_identity
        self.on_request = on_request
        self.streams: dict = {}
        self.lost: Exception | None = None
        self.goaway_sent = False
        self.goaway_received = False
        self.closed: asyncio.Future = self.loop.create_future()
        self.created = time.monotonic()
        self.idle_since = time.monotonic()
        self.streams_opened = 0
        self._tasks: set[asyncio.Task] = set()

    def peer_max_streams(self) -> int:
        raise NotImplementedError

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    def max_streams(self, pool_limit: int) -> int:
        return min(pool_limit, self.peer_max_streams())

    def close_idle(self) -> None:
        """The pool's idle timeout: close a connection without streams."""
        self.close()

    def can_open(self, pool_limit: int) -> bool:
        return (
            self.lost is None
            and not self.goaway_received
            and not self.goaway_sent
            and self.active_streams < self.max_streams(pool_limit)
        )

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _reason(status: int) -> str:
    from .headers import REASONS

    return REASONS.get(status, "")


def _code_name(code) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)
