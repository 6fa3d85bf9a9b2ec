"""Drive a pyOpenSSL handshake on a non-blocking socket from the asyncio event loop.

Role: the one place where TLS handshakes meet the event loop.  `handshake()` returns the live
SSL.Connection unchanged; the engine later calls SSL_read/SSL_write on its SSL*, so nothing wraps it.

Invariants:
- The socket is connected and non-blocking; it stays owned by the caller, who closes it on failure.
- Reader/writer callbacks registered on the socket's fd are removed before `handshake()` returns or
  raises (also on timeout and cancellation), so the engine can take the fd over.
- One deadline covers the whole handshake; expiry raises TlsError, never asyncio.TimeoutError.
- Every failure is a TlsError "tls handshake failed: <reason>", the reason mapped from OpenSSL's to
  a short, stable phrase (`describe_ssl_error`, pure).
- Success means: handshake complete and ALPN h2 negotiated.
- Server side, no TLS state exists before the peer's first bytes arrive: a stranger that connects
  and says nothing costs a socket and a waiting coroutine, not an SSL object with its buffers.
"""

from __future__ import annotations

import asyncio
import os
import socket

from OpenSSL import SSL

from ..errors import TlsError
from .context import ALPN_H2

DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds; as ztunnel's connect timeout

# OpenSSL reason strings (lower case, as ERR_reason_error_string gives them) -> our log phrase.
_REASONS: dict[str, str] = {
    "peer did not return a certificate": "peer did not return a certificate",
    "tlsv13 alert certificate required": "peer requires a client certificate",
    "unsupported protocol": "unsupported protocol version",
    "no protocols available": "unsupported protocol version",
    "wrong version number": "unsupported protocol version",
    "tlsv1 alert protocol version": "unsupported protocol version",
    "certificate verify failed": "certificate verify failed",
    "tlsv1 alert unknown ca": "peer rejected our certificate (unknown ca)",
    "sslv3 alert bad certificate": "peer rejected our certificate (bad certificate)",
    "sslv3 alert certificate unknown": "peer rejected our certificate (certificate unknown)",
    "no application protocol": "no common ALPN protocol (h2 required)",
    "tlsv1 alert no application protocol": "no common ALPN protocol (h2 required)",
    "sslv3 alert handshake failure": "peer aborted the handshake (handshake failure)",
    "no shared cipher": "no shared cipher",
    "no suitable signature algorithm": "no suitable signature algorithm",
    "http request": "peer spoke plain HTTP, not TLS",
    "packet length too long": "peer did not speak TLS",
    "record layer failure": "peer did not speak TLS",
}


def describe_ssl_error(exc: BaseException) -> str:
    """A short reason for a handshake exception (pure; used in TlsError messages and logs)."""
    if isinstance(exc, TlsError):
        return str(exc)  # raised by our own verify/ALPN callbacks, already worded
    if isinstance(exc, SSL.ZeroReturnError):
        return "peer closed the connection (close_notify)"
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else -1
        if code in (-1, 0):
            return "connection closed by peer"
        return os.strerror(code).lower() if isinstance(code, int) else str(exc)
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(entry[2]).lower() for entry in exc.args[0] if len(entry) == 3 and entry[2]]
        for reason in reasons:
            if reason in _REASONS:
                return _REASONS[reason]
        for reason in reasons:
            if "alert" in reason:
                return f"peer sent alert: {reason.split('alert', 1)[1].strip()}"
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


async def handshake(
    sock: socket.socket,
    ctx: SSL.Context,
    *,
    server_side: bool,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    loop: asyncio.AbstractEventLoop | None = None,
) -> SSL.Connection:
    """Run the TLS handshake of `ctx` on `sock`; return the SSL.Connection with ALPN h2 negotiated."""
    if sock.gettimeout() != 0.0:
        raise ValueError("handshake() needs a non-blocking socket")
    loop = loop or asyncio.get_running_loop()
    fd = sock.fileno()
    conn = None
    try:
        async with asyncio.timeout(timeout):
            if server_side:
                await _ready(loop, fd, writing=False)  # the ClientHello (or EOF) is here
            conn = SSL.Connection(ctx, sock)
            if server_side:
                conn.set_accept_state()
            else:
                conn.set_connect_state()
            while True:
                try:
                    conn.do_handshake()
                    break
                except SSL.WantReadError:
                    await _ready(loop, fd, writing=False)
                except SSL.WantWriteError:
                    await _ready(loop, fd, writing=True)
    except TimeoutError:
        raise TlsError(f"tls handshake failed: timed out after {timeout:g}s") from None
    except (SSL.Error, TlsError) as exc:
        raise TlsError(f"tls handshake failed: {describe_ssl_error(exc)}") from exc
    alpn = conn.get_alpn_proto_negotiated()
    if alpn != ALPN_H2:
        got = alpn.decode("ascii", "replace") if alpn else "none"
        raise TlsError(f"tls handshake failed: ALPN h2 not negotiated (got {got})")
    return conn


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, writing: bool) -> None:
    """Wait until `fd` is readable (or writable); always unregisters the callback."""
    waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if writing:
        loop.add_writer(fd, wake)
        try:
            await waiter
        finally:
            loop.remove_writer(fd)
    else:
        loop.add_reader(fd, wake)
        try:
            await waiter
        finally:
            loop.remove_reader(fd)
