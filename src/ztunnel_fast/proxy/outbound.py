"""Outbound listener (15001): captured connections from local workloads, carried to their destination.

For each accepted socket: find the original destination and the source workload, take the pure
routing decision, then either open a CONNECT stream on a pooled HBONE connection or dial plain
TCP, and hand the pair to the engine.  Log lines follow the user guide:
`proxy to <ip:port> using HBONE via <ip>:15008 type Direct` (or `ToServiceWaypoint` /
`ToWorkloadWaypoint` with the waypoint as the `via`), `proxying to <ip:port> using node local
fast path`, `complete dur=...`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from ..errors import ConnectTimeout, ProxyError, StreamReset, TlsError, UpstreamConnectError
from ..hbone import headers as hbone_headers
from ..hbone.base import ConnectionLost
from ..hbone.pool import PoolKey
from ..telemetry.access import ConnectionRecord, log_early_deny
from ..telemetry.logs import Span
from ..telemetry.metrics import Peer
from ..tls.handshake import handshake
from ..tls.verify import check_server_identity
from ..engine import abort, close_after
from . import sockets
from .common import format_duration
from .context import ProxyContext
from .route import Kind, decide

if TYPE_CHECKING:  # annotations only: the native engine's connections never load hyper-h2
    from ..hbone.connection import HboneConnection

log = logging.getLogger(__name__)


def connection_record(ctx: ProxyContext, client, route, source) -> ConnectionRecord:
    """The access log record and metrics of one outbound connection (also the fast path's)."""
    hbone = route.kind is Kind.HBONE
    return ConnectionRecord(
        ctx.metrics,
        direction="outbound",
        src_addr=client,
        dst_addr=route.next_hop,
        hbone_addr=route.authority,
        source=Peer(source, source.identity if source is not None and hbone else None),
        destination=Peer(route.workload, route.identities[0] if hbone else None),
        service=route.service,
        mtls=hbone,
    )


def pool_key(ctx: ProxyContext, route, source, client_ip) -> PoolKey:
    """The HBONE connection a tunnel rides (also the fast path's)."""
    src_identity = source.identity if source is not None else ctx.config.identity()
    # shared (node) mode dials HBONE from the client's own IP, so the destination sees (and
    # authorizes, and hands the app) the real client address, as in-pod ztunnel does
    src_ip = client_ip if ctx.orig_src and not ctx.dedicated else None
    return PoolKey.of(src_identity, route.identities, route.next_hop, src_ip)


class Outbound:
    def __init__(self, ctx: ProxyContext):
        self.ctx = ctx

    async def connect_hbone(self, key: PoolKey, worker: int | None = None) -> HboneConnection:
        """Dial, handshake and start a new pooled HBONE connection for `key` (`worker`: the native
        worker that is to own it, for the fast path's worker connections)."""
        ctx = self.ctx
        ip, port = key.next_hop
        addr = hbone_headers.format_addr(ip, port)
        try:
            sock = await sockets.connect(ip, port, mark=ctx.config.packet_mark, timeout=ctx.config.connect_timeout,
                                         source=key.src_ip, factory=ctx.socket_factory)
        except asyncio.TimeoutError:
            raise ConnectTimeout(addr) from None
        except OSError as exc:
            raise UpstreamConnectError(f"io error: {exc.strerror} (os error {exc.errno}) connecting to {addr}") from None
        try:
            cert = await ctx.certs.get(key.src_identity)
            tls = await handshake(sock, cert.client_context, server_side=False, timeout=ctx.config.connect_timeout)
            peer = check_server_identity(tls, key.dst_identities)
        except BaseException:
            sock.close()
            raise
        conn = ctx.engine.connection(sock, tls, client=True, settings=ctx.h2, name=f"hbone-to-{addr}", peer_identity=peer,
                                     worker=worker)
        conn.start()
        log.debug("new HBONE connection to %s (server identity %s)%s", addr, peer,
                  "" if worker is None else f", owned by worker {conn.worker}")
        return conn

    async def handle(self, sock: socket.socket) -> None:
        ctx = self.ctx
        conn_id = hbone_headers.new_trace_id()
        span = Span("outbound", {"id": conn_id})
        start = time.monotonic()
        try:
            client_ip, client_port = sockets.peer(sock)
            dst_ip, dst_port = sockets.destination(sock)
        except OSError as exc:
            log.debug("dropping connection that vanished before it was handled: %s", exc, extra={"span": span})
            sock.close()
            return
        client = (client_ip, client_port)  # formatted only for a line that is written
        source = ctx.source_workload(client_ip)
        if source is None and not ctx.dedicated:
            error = f"unknown source workload {client_ip}"
            self._failed(span, start, error)
            log_early_deny(ctx.metrics, src_addr=client, dst_addr=(dst_ip, dst_port),
                           direction="outbound", error=error)
            abort(sock)
            return
        route = decide(
            ctx.state,
            ctx.lb,
            source=source,
            dst_ip=dst_ip,
            dst_port=dst_port,
            network=ctx.config.network,
            fast_path_node=ctx.fast_path_node,
        )
        if route.kind is Kind.REFUSE:
            self._failed(span, start, route.reason)
            log_early_deny(ctx.metrics, src_addr=client, dst_addr=(dst_ip, dst_port),
                           direction="outbound", error=route.reason)
            abort(sock)
            return
        hbone = route.kind is Kind.HBONE
        record = connection_record(ctx, client, route, source)
        try:
            if hbone:
                completion = await self._hbone(sock, route, source, client_ip, client_port, conn_id, span)
            else:
                completion = await self._plain(sock, route, source, client_ip, conn_id, span)
        except asyncio.CancelledError:
            abort(sock)
            record.complete(0, 0, "connection closed due to drain")
            raise
        except (ProxyError, TlsError, StreamReset, ConnectionLost, OSError) as exc:
            self._failed(span, start, str(exc))
            record.complete(0, 0, str(exc), getattr(exc, "flag", "CONNECT"))
            abort(sock)
            return
        # the plain socket is the client: what it sent is the request direction
        record.complete(completion.sent, completion.received, completion.error)
        if completion.error:
            self._failed(span, start, completion.error)
        elif log.isEnabledFor(logging.INFO):
            log.info("complete dur=%s", format_duration(time.monotonic() - start), extra={"span": span})

    async def _hbone(self, sock, route, source, client_ip, client_port, conn_id, span):
        ctx = self.ctx
        if log.isEnabledFor(logging.INFO):
            log.info(
                "proxy to %s using HBONE via %s type %s",
                route.authority,
                hbone_headers.format_addr(*route.next_hop),
                route.via.value,
                extra={"span": span},
            )
        request = hbone_headers.connect_request(
            route.authority,
            client_ip=client_ip,
            client_port=client_port,
            trace_id=conn_id,
            source=source,
            service_host=route.service.hostname if route.service is not None else None,
        )
        key = pool_key(ctx, route, source, client_ip)
        fast_path = ctx.fast_path
        generation = fast_path.generation if fast_path is not None else 0  # the state `route` was decided in
        stream = await ctx.pool.open_stream(key, request)
        # --- fast path hook (proxy/fastpath.py): the native workers may carry this flow class on
        # this pooled connection next time (unless the state changed while the CONNECT was answered)
        if fast_path is not None:
            fast_path.learn(route, source, key, stream.conn, client_ip, *route.target, generation, scope=ctx)
        # ---
        try:
            completion = await ctx.engine.tunnel(sock, stream, conn_id)
        except BaseException:
            stream.reset()
            raise
        close_after(completion, sock)
        return completion

    async def _plain(self, sock, route, source, client_ip, conn_id, span):
        ctx = self.ctx
        ip, port = route.target
        spoof = None
        if route.kind is Kind.NODE_LOCAL:
            if log.isEnabledFor(logging.INFO):
                log.info("proxying to %s using node local fast path", hbone_headers.format_addr(ip, port),
                         extra={"span": span})
            spoof = client_ip if ctx.orig_src else None
        elif log.isEnabledFor(logging.INFO):
            kind = "Passthrough" if route.kind is Kind.PASSTHROUGH else "Direct"
            target = hbone_headers.format_addr(ip, port)
            log.info("proxy to %s using TCP via %s type %s", target, target, kind, extra={"span": span})
        try:
            upstream = await sockets.connect(ip, port, mark=ctx.config.packet_mark, timeout=ctx.config.connect_timeout,
                                             source=spoof, factory=ctx.socket_factory)
        except asyncio.TimeoutError:
            raise UpstreamConnectError(
                f"connection timed out connecting to {hbone_headers.format_addr(ip, port)}") from None
        except OSError as exc:
            raise UpstreamConnectError(f"io error: {exc.strerror} (os error {exc.errno})") from None
        try:
            completion = await ctx.engine.splice(sock, upstream, conn_id)
        except BaseException:
            abort(upstream)
            raise
        close_after(completion, sock, upstream)
        return completion

    @staticmethod
    def _failed(span: Span, start: float, error: str) -> None:
        if log.isEnabledFor(logging.WARNING):
            log.warning("failed dur=%s err=%s", format_duration(time.monotonic() - start), error, extra={"span": span})
