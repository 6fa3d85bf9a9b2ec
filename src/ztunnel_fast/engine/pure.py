"""The pure twin: the engine interface in plain Python on asyncio.

It is the behavioural reference for the native engine and the fallback when the extension is not
built (or ZTUNNEL_NO_EXTENSIONS=1).  Both directions of a tunnel are two tasks; each reads into a
reused buffer and writes before reading again, so a tunnel holds at most one buffer per direction
plus what HTTP/2 flow control admits.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time

from h2.errors import ErrorCodes

from ..errors import StreamReset
from ..hbone.connection import ConnectionLost, HboneConnection, HboneStream
from .base import Completion

SMALL_READ = 16 * 1024  # bytes per read until a tunnel proves to be bulk
BUFFER_SIZE = 256 * 1024  # bytes per read for bulk tunnels: few syscalls, bounded per tunnel
BULK_AFTER = 1024 * 1024  # bytes moved in one direction before it gets a reused bulk buffer


class _Reader:
    """Reads from a socket: fresh small reads first, a reused large buffer once bulk."""

    __slots__ = ("loop", "sock", "moved", "buf", "view")

    def __init__(self, loop, sock: socket.socket):
        self.loop = loop
        self.sock = sock
        self.moved = 0
        self.buf: bytearray | None = None
        self.view: memoryview | None = None

    async def read(self) -> bytes | memoryview:
        if self.buf is None:
            data = await self.loop.sock_recv(self.sock, SMALL_READ)
            self.moved += len(data)
            if self.moved >= BULK_AFTER:
                self.buf = bytearray(BUFFER_SIZE)
                self.view = memoryview(self.buf)
            return data
        n = await self.loop.sock_recv_into(self.sock, self.buf)
        return self.view[:n]
_RESETS = (ConnectionResetError, BrokenPipeError)


class _Direction:
    """Counts bytes and records how one direction ended."""

    __slots__ = ("moved", "error", "reset")

    def __init__(self):
        self.moved = 0
        self.error: str | None = None
        self.reset = False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return f"io error: {exc.strerror} (os error {exc.errno})"
    return str(exc) or type(exc).__name__


class PureEngine:
    name = "pure"

    def __init__(self):
        self.loop = asyncio.get_running_loop()

    async def splice(self, plain: socket.socket, upstream: socket.socket, tunnel_id: str) -> Completion:
        start = time.monotonic()
        ab, ba = _Direction(), _Direction()
        t1 = asyncio.ensure_future(self._copy(plain, upstream, ab))
        t2 = asyncio.ensure_future(self._copy(upstream, plain, ba))
        await self._join(t1, t2, ab, ba, on_reset=lambda: (_rst(plain), _rst(upstream)))
        return _completion(ab, ba, start)

    async def _copy(self, src: socket.socket, dst: socket.socket, d: _Direction) -> None:
        loop = self.loop
        reader = _Reader(loop, src)
        try:
            while True:
                data = await reader.read()
                if not data:
                    _shutdown_write(dst)
                    return
                await loop.sock_sendall(dst, data)
                d.moved += len(data)
        except _RESETS as exc:
            d.error, d.reset = _describe(exc), True
        except OSError as exc:
            d.error, d.reset = _describe(exc), True

    def connection(self, sock, tls, *, client, settings, on_request=None, name="hbone", peer_identity=None,
                   worker=None):  # one event loop: `worker` names nothing here
        return HboneConnection(sock, tls, client=client, settings=settings, on_request=on_request, name=name,
                               peer_identity=peer_identity)

    async def tunnel(self, plain: socket.socket, stream: HboneStream, tunnel_id: str) -> Completion:
        start = time.monotonic()
        up, down = _Direction(), _Direction()
        t1 = asyncio.ensure_future(self._plain_to_stream(plain, stream, up))
        t2 = asyncio.ensure_future(self._stream_to_plain(stream, plain, down))

        def on_reset():
            stream.reset(ErrorCodes.CANCEL)
            _rst(plain)

        await self._join(t1, t2, up, down, on_reset=on_reset)
        return _completion(up, down, start)

    async def _plain_to_stream(self, plain: socket.socket, stream: HboneStream, d: _Direction) -> None:
        reader = _Reader(self.loop, plain)
        try:
            while True:
                data = await reader.read()
                if not data:
                    stream.end()
                    return
                await stream.write(data)
                d.moved += len(data)
        except (StreamReset, ConnectionLost) as exc:
            d.error, d.reset = _describe(exc), True
        except OSError as exc:
            d.error, d.reset = _describe(exc), True

    async def _stream_to_plain(self, stream: HboneStream, plain: socket.socket, d: _Direction) -> None:
        loop = self.loop
        try:
            while True:
                data = await stream.read()
                if not data:
                    _shutdown_write(plain)
                    return
                await loop.sock_sendall(plain, data)
                d.moved += len(data)
                stream.consumed()
        except (StreamReset, ConnectionLost) as exc:
            d.error, d.reset = _describe(exc), True
        except OSError as exc:
            d.error, d.reset = _describe(exc), True

    @staticmethod
    async def _join(t1, t2, d1: _Direction, d2: _Direction, on_reset) -> None:
        """Wait for both directions; the first reset aborts the other direction too."""
        pending = {t1, t2}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if d1.reset or d2.reset:
                    on_reset()
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    return
        except asyncio.CancelledError:
            for task in (t1, t2):
                task.cancel()
            on_reset()
            raise

    def close(self) -> None:
        pass


def _completion(up: _Direction, down: _Direction, start: float) -> Completion:
    return Completion(
        sent=up.moved,
        received=down.moved,
        duration=time.monotonic() - start,
        error=up.error or down.error,
        reset=up.reset or down.reset,
    )


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EBADF):
            raise


def _rst(sock: socket.socket) -> None:
    """Make the peer see a reset: linger 0 and shut the socket down both ways.

    The socket object stays open (the control layer owns it and closes it after the completion).
    """
    from .base import _LINGER_RESET

    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
