"""Istio's standard TCP metrics, exposed on 15020 through prometheus_client.

Names and labels are Istio's (reference 7.1), so dashboards and alerts written for ztunnel work:
`istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
`istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`, `istio_tcp_connections_failed_total`
with the full CommonTrafficLabels set, plus `istio_build` and the process metrics.

Byte convention (Istio's metric definitions, the same for both reporters): `received` counts the
request direction (client -> server), `sent` the response direction (server -> client).  Byte
counts come from the engine's completion of a tunnel, once, never per chunk.
Invariant: every label is always present; an unknown value renders as "unknown".
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from .. import __version__
from ..identity.spiffe import Identity
from ..state.service import Service
from ..state.workload import Workload

UNKNOWN = "unknown"

LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a connection as telemetry sees it."""

    workload: Workload | None = None
    identity: Identity | None = None


def _or_unknown(value: str | None) -> str:
    return value or UNKNOWN


def _workload_labels(prefix: str, peer: Peer) -> dict[str, str]:
    w = peer.workload
    canonical = (w.canonical_name or w.workload_name or w.name) if w else None
    revision = w.canonical_revision if w else None
    return {
        f"{prefix}_workload": _or_unknown(w and (w.workload_name or w.name)),
        f"{prefix}_canonical_service": _or_unknown(canonical),
        f"{prefix}_canonical_revision": _or_unknown(revision or ("latest" if w else None)),
        f"{prefix}_workload_namespace": _or_unknown(w and w.namespace),
        f"{prefix}_principal": str(peer.identity) if peer.identity else UNKNOWN,
        f"{prefix}_app": _or_unknown(canonical),
        f"{prefix}_version": _or_unknown(revision or ("latest" if w else None)),
        f"{prefix}_cluster": _or_unknown(w and w.cluster_id),
    }


def traffic_labels(
    *,
    reporter: str,
    source: Peer,
    destination: Peer,
    service: Service | None,
    mtls: bool,
    response_flags: str = "-",
) -> dict[str, str]:
    """CommonTrafficLabels for one connection (pure)."""
    labels = {"reporter": reporter}
    labels.update(_workload_labels("source", source))
    labels.update({
        "destination_service": service.hostname if service else _or_unknown(
            destination.workload and destination.workload.name),
        "destination_service_namespace": service.namespace if service else _or_unknown(
            destination.workload and destination.workload.namespace),
        "destination_service_name": service.name if service else _or_unknown(
            destination.workload and destination.workload.name),
    })
    labels.update(_workload_labels("destination", destination))
    labels["request_protocol"] = "tcp"
    labels["response_flags"] = response_flags or "-"
    labels["connection_security_policy"] = "mutual_tls" if mtls else UNKNOWN
    return labels


class Metrics:
    """The registry behind /metrics and /stats/prometheus."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.opened = Counter("istio_tcp_connections_opened", "Connections opened", LABELS, registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "Connections closed", LABELS, registry=r)
        self.received = Counter("istio_tcp_received_bytes", "Bytes received during request (client to server)",
                                LABELS, registry=r)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent during response (server to client)", LABELS, registry=r)
        self.failed = Counter("istio_tcp_connections_failed", "Connections that failed", LABELS, registry=r)
        self.sockets_open = Gauge("istio_tcp_sockets_open", "Open tunnels", ["reporter"], registry=r)
        # xDS (reference M9, M10): why streams to istiod ended; messages and bytes per type URL.
        self.xds_terminations = Counter("istio_xds_connection_terminations",
                                        "Connection terminations of the xDS stream", ["reason"], registry=r)
        self.xds_messages = Counter("istio_xds_message", "xDS responses received", ["url"], registry=r)
        self.xds_message_bytes = Counter("istio_xds_message_bytes", "Bytes of xDS responses received",
                                         ["url"], registry=r)
        build = Gauge("istio_build", "Build information", ["component", "tag"], registry=r)
        build.labels(component="ztunnel", tag=__version__).set(1)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def connection_opened(self, labels: dict[str, str]) -> None:
        self.opened.labels(**labels).inc()
        self.sockets_open.labels(reporter=labels["reporter"]).inc()

    def connection_closed(self, labels: dict[str, str], request_bytes: int, response_bytes: int, failed: bool) -> None:
        self.closed.labels(**labels).inc()
        self.sockets_open.labels(reporter=labels["reporter"]).dec()
        if request_bytes:
            self.received.labels(**labels).inc(request_bytes)
        if response_bytes:
            self.sent.labels(**labels).inc(response_bytes)
        if failed:
            self.failed.labels(**labels).inc()

    def connection_failed_early(self, labels: dict[str, str]) -> None:
        """A connection refused before it was opened (deny, no upstream): counted as failed only."""
        self.failed.labels(**labels).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
