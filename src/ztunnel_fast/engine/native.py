"""The native engine: tunnels moved by compiled code (_splice) with the GIL released.

This stage of the engine owns plain<->plain tunnels (node-local fast path, passthrough, plain TCP
to non-mesh workloads, inbound to the app): each runs `_splice.splice_pair` on a thread of its own,
which blocks in poll()/splice() outside the interpreter and reports back to the event loop.
HBONE legs are still moved by the pure twin's HTTP/2 driver.

Invariant: the sockets stay owned by the caller; a tunnel can be cancelled (drain) through its
cancel pipe, which makes the native loop return ECANCELED.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time

from .. import _splice  # noqa: F401 - ImportError here means "no native engine"
from ..hbone.connection import HboneConnection, HboneStream
from .base import Completion
from .pure import PureEngine

_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECANCELED, errno.ETIMEDOUT, errno.EHOSTUNREACH}


class NativeEngine:
    name = "native"

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self._pure = PureEngine()

    async def splice(self, plain: socket.socket, upstream: socket.socket, tunnel_id: str) -> Completion:
        loop = self.loop
        done: asyncio.Future = loop.create_future()
        cancel_r, cancel_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        start = time.monotonic()

        def run():
            try:
                result = _splice.splice_pair(plain.fileno(), upstream.fileno(), cancel_r)
            except BaseException as exc:  # noqa: BLE001 - report, never lose a completion
                result = exc
            loop.call_soon_threadsafe(_resolve, done, result)

        thread = threading.Thread(target=run, name=f"splice-{tunnel_id[:8]}", daemon=True)
        thread.start()
        try:
            result = await asyncio.shield(done)
        except asyncio.CancelledError:
            os.write(cancel_w, b"x")
            result = await done
            raise
        finally:
            if done.done():
                os.close(cancel_r)
                os.close(cancel_w)
        if isinstance(result, BaseException):
            return Completion(0, 0, time.monotonic() - start, error=f"native engine: {result}", reset=True)
        sent, received, err = result
        error = None
        if err:
            error = f"io error: {os.strerror(err)} (os error {err})"
        return Completion(sent, received, time.monotonic() - start, error=error, reset=bool(err))

    def connection(self, sock, tls, *, client, settings, on_request=None, name="hbone", peer_identity=None):
        return HboneConnection(sock, tls, client=client, settings=settings, on_request=on_request, name=name,
                               peer_identity=peer_identity)

    async def tunnel(self, plain: socket.socket, stream: HboneStream, tunnel_id: str) -> Completion:
        return await self._pure.tunnel(plain, stream, tunnel_id)

    def close(self) -> None:
        pass


def _resolve(fut: asyncio.Future, result) -> None:
    if not fut.done():
        fut.set_result(result)
