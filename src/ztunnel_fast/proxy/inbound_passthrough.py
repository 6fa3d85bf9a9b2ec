"""Inbound plaintext listener (15006): captured non-HBONE traffic to a local workload.

The original destination comes from SO_ORIGINAL_DST (REDIRECT) or the local address (TPROXY);
it must be a local workload and never one of ztunnel's own ports.  The connection has no peer
identity (so a STRICT PeerAuthentication, later, denies it); the app is dialled with the packet
mark and the bytes go through the engine's plain splice.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from ..config import SELF_PORTS
from ..engine import abort, close_after
from ..hbone import headers as hbone_headers
from ..telemetry.logs import Span
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
            sockets.tune(sock)
            peer_ip, _ = sockets.peer(sock)
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
        if ctx.local_workload(dst_ip) is None:
            log.warning("failed dur=%s err=unknown destination %s: no local workload",
                        format_duration(time.monotonic() - start), target, extra={"span": span})
            abort(sock)
            return
        log.info("proxying plaintext to %s", target, extra={"span": span})
        spoof = peer_ip if ctx.config.enable_orig_src else None
        try:
            upstream = await sockets.connect(dst_ip, dst_port, mark=ctx.config.packet_mark,
                                             timeout=ctx.config.connect_timeout, source=spoof)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("failed dur=%s err=connect to %s: %s", format_duration(time.monotonic() - start), target, exc,
                        extra={"span": span})
            abort(sock)
            return
        try:
            completion = await ctx.engine.splice(sock, upstream, conn_id)
        except BaseException:
            abort(sock)
            abort(upstream)
            raise
        close_after(completion, sock, upstream)
        if completion.error:
            log.warning("failed dur=%s err=%s", format_duration(completion.duration), completion.error, extra={"span": span})
        else:
            log.info("complete dur=%s", format_duration(time.monotonic() - start), extra={"span": span})
