"""Socket primitives the listeners need, in one place: original destination, marks, transparency,
and the graceful close that makes a refusal (TLS alert, GOAWAY) reach the peer.

Every socket ztunnel-fast opens toward a workload carries SO_MARK (1337 by default) so that the
redirection rules let it pass instead of capturing it again.

Why `close_gracefully` exists: Linux answers close() on a socket whose receive queue still holds
unread bytes with RST instead of FIN, and drops whatever of our own output is still queued (RFC 2525
2.17).  A refused TLS client has typically sent more (its Finished, the HTTP/2 preface) that we never
read, so a plain close() raced our alert: under CPU load the alert was still queued when the RST
went out and the client saw a bare EOF.  Shutting the write side first queues FIN behind the alert;
reading what the peer still sends (bounded in bytes and time) empties the receive queue, so the
final close() sends nothing that could overtake it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from ipaddress import ip_address
from typing import Awaitable, Callable

from ..state.workload import IpAddress

# Creates an unconnected TCP socket of the given family.  In-pod mode passes one per pod so that
# upstream sockets are born inside the pod's network namespace; None = this process's namespace.
SocketFactory = Callable[[int], Awaitable[socket.socket]]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the same number at SOL_IPV6 (IP6T_SO_ORIGINAL_DST)
IP_TRANSPARENT = 19  # linux/in.h
IPV6_TRANSPARENT = 75  # linux/in6.h
IP_FREEBIND = 15
SO_MARK = 36
KEEPALIVE_IDLE = 180  # seconds, ztunnel's KEEPALIVE_TIME
KEEPALIVE_INTERVAL = 180
KEEPALIVE_COUNT = 9
DRAIN_BYTES = 256 * 1024  # bytes of a closing peer's leftovers read and dropped at most: a bound a stranger cannot raise
DRAIN_TIMEOUT = 2.0  # seconds a closing peer gets to read our last words and close its side
DRAIN_READ = 64 * 1024  # bytes per recv() while draining


IP_CACHE_SIZE = 4096  # entries per address cache below; beyond this a cache starts over (bounded memory)
# Parsing "10.0.0.1" into an IPv4Address and back costs microseconds per connection; addresses
# repeat (a node has few pods), and both forms are immutable, so each is computed once.
_ip_parsed: dict[str | bytes, IpAddress] = {}  # getpeername() text or packed SO_ORIGINAL_DST -> address
_ip_texts: dict[IpAddress, str] = {}  # address -> str(address)


def normalize(ip: str) -> IpAddress:
    addr = _ip_parsed.get(ip)
    return addr if addr is not None else _parse(ip, ip.split("%", 1)[0])


def _from_packed(packed: bytes) -> IpAddress:
    addr = _ip_parsed.get(packed)
    return addr if addr is not None else _parse(packed, packed)


def _parse(key: str | bytes, raw: str | bytes) -> IpAddress:
    """The cache miss of normalize/_from_packed: parse, unmap IPv4-mapped IPv6, remember."""
    addr = ip_address(raw)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if len(_ip_parsed) >= IP_CACHE_SIZE:
        _ip_parsed.clear()
    _ip_parsed[key] = addr
    return addr


def _ip_text(ip: IpAddress) -> str:
    text = _ip_texts.get(ip)
    if text is None:
        if len(_ip_texts) >= IP_CACHE_SIZE:
            _ip_texts.clear()
        text = _ip_texts[ip] = str(ip)
    return text


def original_dst(sock: socket.socket) -> tuple[IpAddress, int] | None:
    """The pre-NAT destination of a REDIRECTed connection, or None when it was not NATed."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return _from_packed(packed), port
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return _from_packed(packed), port
    except OSError:
        return None


def destination(sock: socket.socket) -> tuple[IpAddress, int]:
    """Where the client meant to go: SO_ORIGINAL_DST after REDIRECT, else the local address
    (TPROXY and direct connections keep the original destination as the local address)."""
    orig = original_dst(sock)
    if orig is not None:
        return orig
    host, port = sock.getsockname()[:2]
    return normalize(host), port


def peer(sock: socket.socket) -> tuple[IpAddress, int]:
    host, port = sock.getpeername()[:2]
    return normalize(host), port


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY and keepalive (ztunnel's settings).  Set on every listener too: Linux copies
    them to each accepted socket (tests/unit/test_sockets.py checks it), so accepted sockets need
    no syscalls of their own for them."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def listener(host: str, port: int, *, transparent: bool = False, backlog: int = 1024,
             mark: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:
            _set_transparent(sock, best_effort=True)
        tune(sock)  # inherited by every accepted socket
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _set_transparent(sock: socket.socket, best_effort: bool = False) -> bool:
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        return True
    except OSError:
        if best_effort:
            return False
        raise


async def connect(
    ip: IpAddress,
    port: int,
    *,
    mark: int | None,
    timeout: float,
    source: IpAddress | None = None,
    factory: SocketFactory | None = None,
) -> socket.socket:
    """A marked, tuned, non-blocking TCP connection; `source` spoofs the client's address
    (IP_TRANSPARENT), which needs the return route that redirection installs; `factory` creates
    the socket (in a pod's network namespace), else it is created here."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = await factory(family) if factory is not None else socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source is not None and source.version == ip.version:
            _set_transparent(sock)
            sock.bind((_ip_text(source), 0))
        tune(sock)
        loop = asyncio.get_running_loop()
        # asyncio.timeout, not wait_for: no extra future and callbacks per connection; a timeout
        # still raises TimeoutError (asyncio.TimeoutError) with the connect cancelled
        async with asyncio.timeout(timeout):
            await connect_numeric(loop, sock, (_ip_text(ip), port))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_numeric(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple) -> None:
    """Connect the non-blocking `sock` to `address`, a numeric IP and port: connect(2), then wait
    for writability and read SO_ERROR, as loop.sock_connect does once the address is resolved.
    Not loop.sock_connect itself: uvloop's resolves every address, numeric ones too, with
    getaddrinfo on libuv's thread pool (a hand-off to a pool thread and back per connection).
    Raises OSError (ConnectionRefusedError, ...) with the errno the kernel gave and its C text as
    strerror, as a connect(2) that fails at once does (loop.sock_connect's is "Connect call failed
    (address)", which ztunnel's `io error: Connection refused (os error 111)` does not say)."""
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    fd = sock.fileno()
    writable = loop.create_future()
    loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))  # "Connection refused": ztunnel's `io error: ... (os error 111)`


_draining: set[asyncio.Task] = set()  # close_gracefully tasks started by close_later (kept from GC)


async def close_gracefully(sock: socket.socket, *, drain_bytes: int = DRAIN_BYTES,
                           drain_timeout: float = DRAIN_TIMEOUT) -> None:
    """FIN after everything we wrote, then read and drop what the peer still sends until it closes,
    `drain_bytes` were read or `drain_timeout` passed, then close.  Never raises; always closes."""
    try:
        sock.setblocking(False)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # already reset or never connected: nothing left to deliver
        sock.close()
        return
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    left = drain_bytes

    def on_readable() -> None:
        nonlocal left
        try:
            while left > 0:
                data = sock.recv(min(left, DRAIN_READ))
                if not data:
                    break  # the peer closed its side: nothing more will come
                left -= len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # reset by the peer: nothing of ours is left to protect
        if not finished.done():
            finished.set_result(None)

    fd = sock.fileno()
    try:
        loop.add_reader(fd, on_readable)
        await asyncio.wait_for(finished, drain_timeout)
    except (TimeoutError, asyncio.TimeoutError, OSError, ValueError):
        pass
    finally:
        try:
            loop.remove_reader(fd)
        except (ValueError, OSError):
            pass
        sock.close()


def close_later(sock: socket.socket) -> None:
    """`close_gracefully` for synchronous callers (connection objects): runs as its own task."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no event loop left (interpreter shutdown): close is all we can do
        sock.close()
        return
    task = loop.create_task(close_gracefully(sock), name="close-gracefully")
    _draining.add(task)
    task.add_done_callback(_draining.discard)
