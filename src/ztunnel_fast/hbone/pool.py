"""Client-side pool of HBONE connections.

Invariants (reference 3.3):
- Connections are keyed by (source identity, acceptable destination identities, next hop, and
  the client IP when connections are dialled from it); a stream only ever rides a connection whose
  key matches exactly, so a TLS session authenticated for one identity set never carries traffic
  meant for another, and a spoofed source address is never shared between clients.
- A connection carries at most min(POOL_MAX_STREAMS_PER_CONNECTION, peer's
  SETTINGS_MAX_CONCURRENT_STREAMS) streams; when all are full a new connection is made for the key.
- Only one connection per key is being dialled at a time (a per-key lock), so a burst of new
  tunnels shares the new connection instead of storming the peer with handshakes.
- A connection that saw or sent GOAWAY, or failed, is never handed out again.
- A connection with no streams for POOL_UNUSED_RELEASE_TIMEOUT is closed (one the fast path shares:
  GOAWAY first, the worker closes it after any stream it opened meanwhile).
- The outbound fast path (proxy/fastpath.py) rides these connections too: its workers open streams
  on a connection it shares, counted in `active_streams` and in the stream limit (a worker that
  finds one full says so: `fast_full`), so a destination has one set of connections, not two.  A
  key whose connections a worker hands over at ZTUNNEL_FAST_PATH_HANDOVER_RATE or more gets one
  more connection, owned by that worker (`add`): a worker connection, pooled like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from ..identity.spiffe import Identity
from ..state.workload import IpAddress

if TYPE_CHECKING:  # the pure twin's classes name the interface; the native engine's mirror them
    from .connection import HboneConnection, HboneStream

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolKey:
    src_identity: Identity
    dst_identities: tuple[Identity, ...]  # sorted, so equal sets give equal keys
    next_hop: tuple[IpAddress, int]
    src_ip: IpAddress | None = None  # set when the connection is dialled from the client's IP

    @classmethod
    def of(cls, src: Identity, dst: tuple[Identity, ...] | list[Identity], next_hop: tuple[IpAddress, int],
           src_ip: IpAddress | None = None) -> "PoolKey":
        if len(dst) == 1:  # the common case: nothing to sort or deduplicate
            return cls(src, tuple(dst), next_hop, src_ip)
        return cls(src, tuple(sorted(set(dst), key=str)), next_hop, src_ip)


Connector = Callable[[PoolKey], Awaitable["HboneConnection"]]


class HbonePool:
    def __init__(self, connect: Connector, *, max_streams: int = 100, idle_timeout: float = 300.0):
        self._connect = connect
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._conns: dict[PoolKey, list[HboneConnection]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None
        self.connections_created = 0

    def _usable(self, key: PoolKey) -> HboneConnection | None:
        conns = self._conns.get(key)
        if not conns:
            return None
        if any(c.lost is not None for c in conns):
            conns[:] = [c for c in conns if c.lost is None]
        for conn in conns:
            if conn.can_open(self.max_streams):
                return conn
        return None

    async def open_stream(self, key: PoolKey, headers: list[tuple[str, str]]) -> HboneStream:
        """Send a CONNECT on a pooled connection for `key` and return the stream once it is
        answered 200 (raises HttpStatus otherwise)."""
        conn = self._usable(key)
        if conn is None:
            lock = self._locks.setdefault(key, asyncio.Lock())
            async with lock:
                conn = self._usable(key)
                if conn is None:
                    conn = await self.add(key)
        stream = conn.start_stream(headers)
        await conn.response(stream)
        return stream

    async def add(self, key: PoolKey, **connect_args) -> HboneConnection:
        """Dial one more connection for `key` and pool it (open_stream's dial; the fast path's
        worker connections: connect_args name the native worker that is to own it)."""
        conn = await self._connect(key, **connect_args)
        self.connections_created += 1
        self._conns.setdefault(key, []).append(conn)
        self._ensure_reaper()
        return conn

    def connections(self) -> list[HboneConnection]:
        return [c for conns in self._conns.values() for c in conns if c.lost is None]

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="hbone-pool-reaper")

    async def _reap(self) -> None:
        interval = max(0.05, min(self.idle_timeout / 2, 30.0))
        while self._conns:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for key in list(self._conns):
                keep = []
                for conn in self._conns[key]:
                    if conn.lost is not None:
                        continue
                    if not conn.active_streams and now - conn.idle_since >= self.idle_timeout:
                        log.debug("closing idle HBONE connection to %s", key.next_hop)
                        conn.close_idle()
                        continue
                    keep.append(conn)
                if keep:
                    self._conns[key] = keep
                else:
                    del self._conns[key]
                    self._locks.pop(key, None)

    def goaway_all(self) -> None:
        for conn in self.connections():
            conn.goaway()

    def close(self) -> None:
        for conn in self.connections():
            conn.close()
        self._conns.clear()
        if self._reaper is not None:
            self._reaper.cancel()
