"""The engine boundary: what the control layer hands over and what comes back.

In: a plain socket and an upstream that is either another plain socket (`splice`) or an HBONE
stream (`tunnel`), plus an id for logs.  Out: one Completion per tunnel.  Half-close travels as
FIN <-> END_STREAM and reset as RST <-> RST_STREAM.  After handing a socket over, the control
layer neither reads nor writes it until the completion arrives; the engine never closes it.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..hbone.connection import HboneStream


@dataclass(frozen=True, slots=True)
class Completion:
    """How a tunnel ended.  Byte counts are from the plain socket's point of view."""

    sent: int  # bytes read from the plain socket and delivered upstream
    received: int  # bytes from upstream written to the plain socket
    duration: float  # seconds between hand-over and the end of both directions
    error: str | None = None  # None: both directions closed cleanly
    reset: bool = False  # the tunnel ended by a reset (either side): sockets get RST, not FIN


class Engine(Protocol):
    """What the control layer needs from an engine.

    `connection()` wraps a handshaken TLS connection as an HBONE connection (client or server).
    The object it returns offers, for the control layer: `start()`, `start_stream(headers)` and
    `response(stream)` (client), `on_request(stream)` callbacks with `stream.request_headers`,
    `stream.respond(status, headers, end)` (server), `stream.reset(code)`, `can_open(limit)`,
    `goaway()`, `close()`, the `closed` future, `lost`, `streams`, `idle_since`,
    `goaway_sent`/`goaway_received`.  hbone/connection.py is the reference implementation.
    """

    name: str

    def connection(self, sock: socket.socket, tls, *, client: bool, settings, on_request=None,
                   name: str = "hbone", peer_identity=None, worker: int | None = None):
        """`worker`: the native worker that is to own it (None: the engine's choice; the pure twin
        has one event loop and ignores it)."""
        ...

    async def splice(self, plain: socket.socket, upstream: socket.socket, tunnel_id: str) -> Completion:
        ...

    async def tunnel(self, plain: socket.socket, stream: HboneStream, tunnel_id: str) -> Completion:
        ...

    def close(self) -> None:
        ...


_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


def abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN, so a reset propagates as a reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def close_after(completion: Completion, *socks: socket.socket) -> None:
    for sock in socks:
        if completion.reset:
            abort(sock)
        else:
            sock.close()
