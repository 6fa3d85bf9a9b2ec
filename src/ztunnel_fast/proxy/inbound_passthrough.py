"""Inbound plaintext listener (15006): captured non-HBONE traffic to a local workload.

The original destination comes from SO_ORIGINAL_DST (REDIRECT) or the local address (TPROXY);
it must be a local workload and never one of ztunnel's own ports.  The connection has no peer
identity, so authorization sees none (a STRICT PeerAuthentication, a DENY `notPrincipals:
presence` policy, closes it); otherwise the app is dialled with the packet mark and the bytes
go through the engine's plain splice.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from ..config import SELF_PORTS
from ..engine import abort, close_after
from ..hbone import headers as hbone_headers
from ..state.rbac import ConnectionInfo
from ..telemetry.access import ConnectionRecord, log_early_deny
from ..telemetry.logs import Span
from ..telemetry.metrics import Peer
from . import sockets
from .common import format_duration
from .context import ProxyContext

log = logging.getLogger(__name__)


class InboundPassthrough:
    def __init__(self, ctx: ProxyContext):
        self.ctx = ctx

    async def handle(self, sock: socket.socket) -> None:
        ctx = self.ctx
        conn_id = hbone_headers.new_trace_id()
        start = time.monotonic()
        try:
            peer_ip, peer_port = sockets.peer(sock)
            dst_ip, dst_port = sockets.destination(sock)
        except OSError:
            sock.close()
            return
        span = Span("inbound_passthrough", {"id": conn_id, "peer_ip": peer_ip})
        target = hbone_headers.format_addr(dst_ip, dst_port)
        if dst_port in SELF_PORTS:
            log.warning("failed dur=%s err=self call to %s", format_duration(time.monotonic() - start), target, extra={"span": span})
            abort(sock)
            return
        workload = ctx.local_workload(dst_ip)
        client = hbone_headers.format_addr(peer_ip, peer_port)
        if workload is None:
            error = f"unknown destination {target}: no local workload"
            log.warning("failed dur=%s err=%s", format_duration(time.monotonic() - start), error, extra={"span": span})
            log_early_deny(ctx.metrics, src_addr=client, dst_addr=target, direction="inbound", error=error)
            abort(sock)
            return
        record = ConnectionRecord(
            ctx.metrics, direction="inbound", src_addr=client, dst_addr=target,
            source=Peer(ctx.state.workload_by_ip(peer_ip, ctx.config.network), None),
            destination=Peer(workload, None), mtls=False,
        )
        info = ConnectionInfo(src_ip=peer_ip, dst_ip=dst_ip, dst_port=dst_port, src_identity=None)
        decision = ctx.authorize(workload, info, span)
        if not decision.allowed:
            error = f"connection closed due to policy rejection: {decision.reason}"
            log.warning("failed dur=%s err=%s", format_duration(time.monotonic() - start), error, extra={"span": span})
            record.complete(0, 0, error, "DENY")
            abort(sock)
            return
        log.info("proxying plaintext to %s", target, extra={"span": span})
        spoof = peer_ip if ctx.orig_src else None
        try:
            upstream = await sockets.connect(dst_ip, dst_port, mark=ctx.config.packet_mark,
                                             timeout=ctx.config.connect_timeout, source=spoof,
                                             factory=ctx.socket_factory)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("failed dur=%s err=connect to %s: %s", format_duration(time.monotonic() - start), target, exc,
                        extra={"span": span})
            record.complete(0, 0, f"connect to {target}: {exc}", "CONNECT")
            abort(sock)
            return
        tracked = ctx.connections.track(workload, info, span)
        try:
            completion = await ctx.engine.splice(sock, upstream, conn_id)
        except asyncio.CancelledError:
            abort(sock)
            abort(upstream)
            record.complete(0, 0, tracked.closed_reason or "connection closed due to drain")
            if tracked.closed_reason is None:
                raise
            return
        finally:
            ctx.connections.untrack(tracked)
        close_after(completion, sock, upstream)
        # the plain socket is the client here: what it sent is the request direction
        record.complete(completion.sent, completion.received, completion.error)
        if completion.error:
            log.warning("failed dur=%s err=%s", format_duration(completion.duration), completion.error, extra={"span": span})
        else:
            log.info("complete dur=%s", format_duration(time.monotonic() - start), extra={"span": span})
