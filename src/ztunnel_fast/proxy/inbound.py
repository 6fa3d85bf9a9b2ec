"""Inbound HBONE listener (15008): mTLS termination and CONNECT handling for local workloads.

Per connection: choose the local workload (ours in dedicated mode, else by destination IP),
handshake with its certificate (client certificate required, same trust domain), then serve
HTTP/2.  Per CONNECT stream, in this order (reference 3.2): method and :authority checks (400),
destination must be the IP the connection arrived on (400), never ztunnel's own ports (503),
a local workload at the target (503), the upstream dial to the app (503 on failure); only then
`200`, and the engine moves the bytes.  The guide's line `got CONNECT request to <ip:port>` is
logged under `inbound{id=... peer_ip=... peer_id=spiffe://...}`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from ..config import SELF_PORTS
from ..engine import abort, close_after
from ..errors import TlsError
from ..hbone import headers as hbone_headers
from ..hbone.connection import HboneConnection, HboneStream
from ..telemetry.logs import Span
from ..tls.handshake import handshake
from ..tls.verify import peer_identities
from . import sockets
from .common import format_duration
from .context import ProxyContext

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # seconds a peer gets to complete TLS before we drop it


class Inbound:
    def __init__(self, ctx: ProxyContext):
        self.ctx = ctx
        self.connections: set[HboneConnection] = set()

    async def handle(self, sock: socket.socket) -> None:
        ctx = self.ctx
        try:
            sockets.tune(sock)
            peer_ip, peer_port = sockets.peer(sock)
            local_ip, _ = sockets.destination(sock)
        except OSError:
            sock.close()
            return
        workload = ctx.local_workload(local_ip)
        span = Span("inbound", {"peer_ip": peer_ip})
        if workload is None:
            log.warning("no local workload for %s, closing connection", local_ip, extra={"span": span})
            abort(sock)
            return
        try:
            cert = await ctx.certs.get(workload.identity)
            tls = await handshake(sock, cert.server_context, server_side=True, timeout=HANDSHAKE_TIMEOUT)
            peers = peer_identities(tls)
            if not peers:
                raise TlsError("peer certificate has no SPIFFE identity")
        except TlsError as exc:
            log.warning("%s", exc, extra={"span": span})
            abort(sock)
            return
        except Exception as exc:  # noqa: BLE001 - a bad peer must never take the listener down
            log.error("tls setup failed: %s", exc, extra={"span": span})
            abort(sock)
            return
        peer_id = peers[0]
        arrived_on = None if local_ip.is_unspecified else local_ip

        async def on_request(stream: HboneStream) -> None:
            await self._stream(stream, peer_ip, peer_id, arrived_on)

        conn = ctx.engine.connection(
            sock, tls, client=False, settings=ctx.h2, on_request=on_request,
            name=f"hbone-from-{peer_ip}", peer_identity=peer_id,
        )
        self.connections.add(conn)
        try:
            conn.start()
            await conn.closed
        finally:
            self.connections.discard(conn)
            conn.close()

    async def _stream(self, stream: HboneStream, peer_ip, peer_id, arrived_on) -> None:
        ctx = self.ctx
        start = time.monotonic()
        checked = hbone_headers.check_connect(stream.request_headers, arrived_on=arrived_on, self_ports=SELF_PORTS)
        trace = getattr(checked, "trace_id", None) or hbone_headers.new_trace_id()
        span = Span("inbound", {"id": trace, "peer_ip": peer_ip, "peer_id": peer_id})
        if isinstance(checked, hbone_headers.Refusal):
            self._refuse(stream, checked.status, checked.reason, span)
            return
        target = hbone_headers.format_addr(checked.ip, checked.port)
        if ctx.local_workload(checked.ip) is None:
            self._refuse(stream, 503, f"unknown destination {checked.ip}: no local workload", span)
            return
        log.info("got CONNECT request to %s", target, extra={"span": span})
        spoof = peer_ip if ctx.config.enable_orig_src else None
        try:
            upstream = await sockets.connect(
                checked.ip, checked.port, mark=ctx.config.packet_mark, timeout=ctx.config.connect_timeout, source=spoof
            )
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"io error: {exc.strerror} (os error {exc.errno})" if isinstance(exc, OSError) else "connect timed out"
            self._refuse(stream, 503, f"failed to connect to {target}: {reason}", span)
            return
        try:
            stream.respond(200)
            completion = await ctx.engine.tunnel(upstream, stream, trace)
        except asyncio.CancelledError:
            stream.reset()
            abort(upstream)
            raise
        except Exception as exc:  # noqa: BLE001
            stream.reset()
            abort(upstream)
            log.warning("failed dur=%s err=%s", format_duration(time.monotonic() - start), exc, extra={"span": span})
            return
        close_after(completion, upstream)
        if completion.error:
            log.warning("failed dur=%s err=%s", format_duration(completion.duration), completion.error, extra={"span": span})
        else:
            log.info("complete dur=%s", format_duration(time.monotonic() - start), extra={"span": span})

    @staticmethod
    def _refuse(stream: HboneStream, status: int, reason: str, span: Span) -> None:
        log.warning("refused CONNECT with %s: %s", hbone_headers.status_text(status), reason, extra={"span": span})
        try:
            stream.respond(status, end=True)
        except Exception:  # noqa: BLE001 - the stream may already be gone
            stream.reset()

    def goaway_all(self) -> None:
        for conn in list(self.connections):
            conn.goaway()
