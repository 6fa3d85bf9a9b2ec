"""Inbound HBONE listener (15008): mTLS termination and CONNECT handling for local workloads.

Per connection: choose the local workload (ours in dedicated mode, else by destination IP),
handshake with its certificate (client certificate required, same trust domain), then serve
HTTP/2.  Per CONNECT stream, in this order (reference 3.2): method and :authority checks (400),
destination must be the IP the connection arrived on (400) unless the local workload is the
waypoint of that destination or has an application tunnel (then the bytes go to the local pod),
never ztunnel's own ports (503),
a local workload at the target (503), the upstream dial to the app (503 on failure); only then
`200`, and the engine moves the bytes.  With ZTUNNEL_FAST_PATH (native engine) an allowed
CONNECT's class is installed for the workers (proxy/fastpath_inbound.py), which answer the next
ones themselves; this path stays the reference for every miss.  A workload with `applicationTunnel: {protocol: PROXY}`
(the waypoint sandwich) is dialled on its tunnel port and first gets a PROXY v2 header with the
original addresses and the source identity (proxy_protocol.py).  The guide's line `got CONNECT request to <ip:port>` is
logged under `inbound{id=... peer_ip=... peer_id=spiffe://...}`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from .. import limits
from ..config import SELF_PORTS
from ..engine import abort, close_after
from ..errors import TlsError
from ..hbone import headers as hbone_headers
from ..state.rbac import ConnectionInfo
from ..state.workload import ApplicationTunnelProtocol
from ..telemetry.access import ConnectionRecord, log_early_deny
from ..telemetry.logs import Span
from ..telemetry.metrics import Peer
from ..tls.handshake import handshake
from ..tls.verify import peer_identities
from . import proxy_protocol, sockets
from .common import format_duration
from .context import ProxyContext
from .route import is_waypoint_for

if TYPE_CHECKING:  # annotations only: the native engine's connections never load hyper-h2
    from ..hbone.connection import HboneConnection, HboneStream

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL = 1.0  # seconds between WARN lines about refused strangers (a flood logs a count)


class Inbound:
    """Invariants on strangers (connections not yet authenticated): at most
    MAX_PENDING_TLS_HANDSHAKES of them at once, beyond that a new one is reset at once (WARN, rate
    limited); each gets TLS_HANDSHAKE_TIMEOUT from accept to a verified peer (WARN "timed out");
    none leaves a Python object behind once it is gone, and the end of a large wave hands freed
    heap back to the system (limits.release_free_memory)."""

    def __init__(self, ctx: ProxyContext):
        self.ctx = ctx
        self.connections: set[HboneConnection] = set()
        self.pending = 0  # connections between accept and a verified peer (or their close)
        self.refused = 0  # connections refused because `pending` was at the cap, since start
        self._wave_peak = 0  # the highest `pending` since it was last zero
        self._unreported_refusals = 0
        self._last_refusal_log = float("-inf")

    async def handle(self, sock: socket.socket) -> None:
        if self.pending >= self.ctx.config.max_pending_tls_handshakes:
            self._refuse_stranger(sock)
            return
        self.pending += 1
        self._wave_peak = max(self._wave_peak, self.pending)
        try:
            admitted = await self._authenticate(sock)
        finally:
            self.pending -= 1
            if self.pending == 0:
                if limits.should_trim(self._wave_peak):
                    limits.release_free_memory()
                self._wave_peak = 0
        if admitted is not None:
            await self._serve(sock, *admitted)

    def _refuse_stranger(self, sock: socket.socket) -> None:
        """Over the cap: reset at once (no TLS state, no task beyond this call); WARN at most once
        per REFUSAL_LOG_INTERVAL, with how many were refused since the last line."""
        self.refused += 1
        self._unreported_refusals += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            cap = self.ctx.config.max_pending_tls_handshakes
            try:
                peer = hbone_headers.format_addr(*sockets.peer(sock))
            except OSError:
                peer = "unknown peer"
            log.warning("refused connection from %s: %d TLS handshakes pending (MAX_PENDING_TLS_HANDSHAKES=%d); "
                        "%d refused since the last report", peer, self.pending, cap, self._unreported_refusals,
                        extra={"span": Span("inbound", {})})
            self._last_refusal_log = now
            self._unreported_refusals = 0
        abort(sock)

    async def _authenticate(self, sock: socket.socket):
        """TLS with the local workload's certificate and a SPIFFE check of the peer: returns what
        serving needs, or None after closing the socket (WARN with the reason)."""
        ctx = self.ctx
        try:
            peer_ip, peer_port = sockets.peer(sock)
            local_ip, _ = sockets.destination(sock)
        except OSError:
            sock.close()
            return None
        workload = ctx.local_workload(local_ip)
        span = Span("inbound", {"peer_ip": peer_ip})
        if workload is None:
            log.warning("no local workload for %s, closing connection", local_ip, extra={"span": span})
            abort(sock)
            return None
        try:
            cert = await ctx.certs.get(workload.identity)
            tls = await handshake(sock, cert.server_context, server_side=True,
                                  timeout=ctx.config.tls_handshake_timeout)
            peers = peer_identities(tls)
            if not peers:
                raise TlsError("peer certificate has no SPIFFE identity")
        except TlsError as exc:
            log.warning("%s", exc, extra={"span": span})
            # FIN after the TLS alert OpenSSL just wrote (unknown ca, certificate required, ...),
            # then drain: a close() with the peer's unread bytes would send RST and drop the alert
            await sockets.close_gracefully(sock)
            return None
        except Exception as exc:  # noqa: BLE001 - a bad peer must never take the listener down
            log.error("tls setup failed: %s", exc, extra={"span": span})
            abort(sock)
            return None
        return tls, peers[0], peer_ip, peer_port, local_ip

    async def _serve(self, sock: socket.socket, tls, peer_id, peer_ip, peer_port, local_ip) -> None:
        ctx = self.ctx
        arrived_on = None if local_ip.is_unspecified else local_ip

        async def on_request(stream: HboneStream) -> None:
            await self._stream(stream, peer_ip, peer_port, peer_id, arrived_on)

        conn = ctx.engine.connection(
            sock, tls, client=False, settings=ctx.h2, on_request=on_request,
            name=f"hbone-from-{peer_ip}", peer_identity=peer_id,
        )
        self.connections.add(conn)
        if ctx.inbound_fast is not None:  # after its EV_CLOSED: no tunnel of its verdicts is still queued
            conn.closed.add_done_callback(lambda _f, conn=conn: ctx.inbound_fast.forget(conn))
        try:
            conn.start()
            await conn.closed
        finally:
            self.connections.discard(conn)
            conn.close()

    async def _stream(self, stream: HboneStream, peer_ip, peer_port, peer_id, arrived_on) -> None:
        ctx = self.ctx
        start = time.monotonic()
        local = ctx.local_workload(arrived_on) if arrived_on is not None else None

        def may_differ(ip) -> bool:
            # ztunnel's validate_destination: a waypoint (or an app-tunnel workload) receives
            # CONNECTs addressed to what it fronts, not to its own IP
            if local is None:
                return False
            return local.application_tunnel is not None or is_waypoint_for(ctx.state, local, ip, ctx.config.network)

        checked = hbone_headers.check_connect(stream.request_headers, arrived_on=arrived_on, self_ports=SELF_PORTS,
                                              may_differ=may_differ)
        trace = getattr(checked, "trace_id", None) or hbone_headers.new_trace_id()
        span = Span("inbound", {"id": trace, "peer_ip": peer_ip, "peer_id": peer_id})
        client = (peer_ip, peer_port)  # addresses are formatted only for a line that is written
        if isinstance(checked, hbone_headers.Refusal):
            self._refuse(stream, checked.status, checked.reason, span)
            log_early_deny(ctx.metrics, src_addr=client, dst_addr=f"{arrived_on or '*'}:15008",
                           direction="inbound", error=checked.reason)
            return
        target = (checked.ip, checked.port)
        if arrived_on is not None and checked.ip != arrived_on:
            workload, app_ip = local, arrived_on  # accepted by may_differ: deliver to the local pod
        else:
            workload, app_ip = ctx.local_workload(checked.ip), checked.ip
        if workload is None:
            reason = f"unknown destination {checked.ip}: no local workload"
            self._refuse(stream, 503, reason, span)
            log_early_deny(ctx.metrics, src_addr=client, dst_addr=target, direction="inbound", error=reason)
            return
        if log.isEnabledFor(logging.INFO):
            log.info("got CONNECT request to %s", hbone_headers.format_addr(*target), extra={"span": span})
        service_host = _forwarded_host(checked.forwarded)
        record = ConnectionRecord(
            ctx.metrics,
            direction="inbound",
            src_addr=client,
            dst_addr=target,
            hbone_addr=target,
            source=Peer(ctx.state.workload_by_ip(peer_ip, ctx.config.network), peer_id),
            destination=Peer(workload, workload.identity),
            service=ctx.service_by_hostname(service_host),
            mtls=True,
        )
        info = ConnectionInfo(src_ip=peer_ip, dst_ip=checked.ip, dst_port=checked.port, src_identity=peer_id)
        decision = ctx.authorize(workload, info, span)
        if not decision.allowed:
            error = f"connection closed due to policy rejection: {decision.reason}"
            self._refuse(stream, 401, decision.reason, span)
            record.complete(0, 0, error, "DENY")
            return
        if stream.reset_code is not None:  # the peer gave up already: do not dial the app
            record.complete(0, 0, "stream reset by peer before it was answered")
            return
        tunnel = workload.application_tunnel
        sandwich = tunnel is not None and tunnel.protocol is ApplicationTunnelProtocol.PROXY
        app_port = (tunnel.port or checked.port) if sandwich else checked.port
        # the PROXY header carries the client address, so the sandwich does not spoof it
        spoof = peer_ip if ctx.orig_src and not sandwich else None
        if ctx.inbound_fast is not None:  # the native workers may answer this class next time
            ctx.inbound_fast.learn(stream, peer=client, peer_id=peer_id, arrived_on=arrived_on, target=target,
                                   workload=workload, info=info, decision=decision, source=spoof, scope=ctx)
        header = None
        if sandwich:
            try:
                header = proxy_protocol.encode((peer_ip, peer_port), (checked.ip, checked.port), str(peer_id))
            except ValueError as exc:
                self._refuse(stream, 503, f"cannot write the PROXY header: {exc}", span)
                record.complete(0, 0, str(exc), "CONNECT")
                return
        upstream = None
        try:
            upstream = await sockets.connect(
                app_ip, app_port, mark=ctx.config.packet_mark, timeout=ctx.config.connect_timeout, source=spoof,
                factory=ctx.socket_factory,
            )
            if header is not None:
                await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(upstream, header),
                                       ctx.config.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            if upstream is not None:
                abort(upstream)
            reason = f"io error: {exc.strerror} (os error {exc.errno})" if isinstance(exc, OSError) else "connect timed out"
            self._refuse(stream, 503, f"failed to connect to {hbone_headers.format_addr(app_ip, app_port)}: {reason}",
                         span)
            record.complete(0, 0, reason, "CONNECT")
            return
        tracked = ctx.connections.track(workload, info, span)
        try:
            stream.respond(200)
            completion = await ctx.engine.tunnel(upstream, stream, trace)
        except asyncio.CancelledError:
            stream.reset()
            abort(upstream)
            record.complete(0, 0, tracked.closed_reason or "connection closed due to drain")
            if tracked.closed_reason is None:
                raise
            return
        except Exception as exc:  # noqa: BLE001
            stream.reset()
            abort(upstream)
            log.warning("failed dur=%s err=%s", format_duration(time.monotonic() - start), exc, extra={"span": span})
            record.complete(0, 0, str(exc))
            return
        finally:
            ctx.connections.untrack(tracked)
        close_after(completion, upstream)
        # the plain socket is the app (the server): what it sent is the response direction
        record.complete(completion.received, completion.sent, completion.error)
        if completion.error:
            log.warning("failed dur=%s err=%s", format_duration(completion.duration), completion.error, extra={"span": span})
        elif log.isEnabledFor(logging.INFO):
            log.info("complete dur=%s", format_duration(time.monotonic() - start), extra={"span": span})

    @staticmethod
    def _refuse(stream: HboneStream, status: int, reason: str, span: Span) -> None:
        log.warning("refused CONNECT with %s: %s", hbone_headers.status_text(status), reason, extra={"span": span})
        try:
            stream.respond(status, end=True)
        except Exception:  # noqa: BLE001 - the stream may already be gone
            stream.reset()

    def goaway_all(self) -> None:
        """Drain: no new streams on any inbound connection; open tunnels finish."""
        for conn in list(self.connections):
            conn.goaway()


def _forwarded_host(value: str) -> str | None:
    """The `host=` of a `forwarded` header: the destination service, used for telemetry only."""
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key.lower() == "host" and val:
            return val.strip('"')
    return None
