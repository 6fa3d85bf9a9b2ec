"""Istio's standard TCP metrics, exposed on 15020 through prometheus_client.

Names and labels are Istio's (reference 7.1), so dashboards and alerts written for ztunnel work:
`istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
`istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`, `istio_tcp_connections_failed_total`
with the full CommonTrafficLabels set, plus `istio_build` and the process metrics.

Byte convention (Istio's metric definitions, the same for both reporters): `received` counts the
request direction (client -> server), `sent` the response direction (server -> client).  Byte
counts come from the engine's completion of a tunnel, once, never per chunk.
Invariant: every label is always present; an unknown value renders as "unknown".

Per-connection cost: prometheus_client's `.labels(**kw)` validates and looks up under a lock on
every call, and the label values themselves are derived from workload and service objects.  Both
are done once per connection class instead: `Metrics.label_set()` caches the labels and the child
counters keyed by the identity of the workload/service objects (immutable snapshots: a changed
workload is a new object, so its connections get new labels), bounded by MAX_LABEL_SETS and
dropped whole on every state change (`forget_label_sets`, called by ProxyContext.replace_state).
Children are never removed from a metric, so a cached child always is the one the registry
exposes.

The counts themselves are deferred: a LabelSet adds a connection's counts to plain integers and
`Metrics.flush` applies them (one `.inc(n)` per child and label set) before every exposition, and
whenever MAX_PENDING label sets are waiting (bounded memory).  A child is still created when it
first counts, so every read (`exposition`, the only reader) sees exactly the values and samples of
counting each connection at once, for a fraction of prometheus_client's per-call cost (a lock per
`.inc`).  Single-threaded: the event loop's thread counts, flushes and exposes.
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
MAX_LABEL_SETS = 4096  # cached connection classes; beyond this the cache starts over (bounded memory)
MAX_PENDING = 1024  # label sets with deferred counts; beyond this they are flushed (bounded memory)

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


class LabelSet:
    """The labels of one connection class and their child counters (see the module docstring).
    A child is created the first time it counts, as `.labels(...).inc()` would: a label set that
    never received bytes shows no `received` sample.  `flagged(flag)` gives the same labels with
    another `response_flags`.  Counts wait in `_n_*` until Metrics.flush applies them."""

    __slots__ = ("labels", "_values", "_metrics", "_opened", "_closed", "_received", "_sent", "_failed",
                 "_flagged", "_pins", "_gauge", "_pending", "_n_opened", "_n_closed", "_n_received", "_n_sent",
                 "_n_failed")

    def __init__(self, metrics: "Metrics", labels: dict[str, str], pins: tuple = ()):
        self._metrics = metrics
        self.labels = labels
        self._values = tuple(labels[k] for k in LABELS)
        self._opened = self._closed = self._received = self._sent = self._failed = self._gauge = None
        self._flagged: dict[str, LabelSet] = {}
        self._pins = pins  # the objects the cache key holds by id(): alive while the entry is
        self._pending = False  # in Metrics._pending
        self._n_opened = self._n_closed = self._n_received = self._n_sent = self._n_failed = 0

    def flagged(self, flag: str) -> "LabelSet":
        if flag == self.labels["response_flags"]:
            return self
        other = self._flagged.get(flag)
        if other is None:
            other = self._flagged[flag] = LabelSet(self._metrics, {**self.labels, "response_flags": flag})
        return other

    def _defer(self) -> None:
        self._pending = True
        pending = self._metrics._pending
        pending.append(self)
        if len(pending) >= MAX_PENDING:
            self._metrics.flush()

    def opened_now(self) -> None:
        if self._opened is None:  # the children a first count creates, in the same order
            self._opened = self._metrics.opened.labels(*self._values)
            self._gauge = self._metrics.socket_gauge(self.labels["reporter"])
        self._n_opened += 1
        if not self._pending:
            self._defer()

    def closed_now(self, request_bytes: int, response_bytes: int, failed: bool) -> None:
        m = self._metrics
        if self._closed is None:
            self._closed = m.closed.labels(*self._values)
            if self._gauge is None:
                self._gauge = m.socket_gauge(self.labels["reporter"])
        self._n_closed += 1
        if request_bytes:
            if self._received is None:
                self._received = m.received.labels(*self._values)
            self._n_received += request_bytes
        if response_bytes:
            if self._sent is None:
                self._sent = m.sent.labels(*self._values)
            self._n_sent += response_bytes
        if failed:
            self.failed_now()
        elif not self._pending:
            self._defer()

    def failed_now(self) -> None:
        if self._failed is None:
            self._failed = self._metrics.failed.labels(*self._values)
        self._n_failed += 1
        if not self._pending:
            self._defer()

    def _apply(self) -> None:
        """Add the deferred counts to the children (Metrics.flush)."""
        self._pending = False
        opened, closed = self._n_opened, self._n_closed
        if opened:
            self._opened.inc(opened)
        if closed:
            self._closed.inc(closed)
        if opened != closed:
            self._gauge.inc(opened - closed)
        if self._n_received:
            self._received.inc(self._n_received)
        if self._n_sent:
            self._sent.inc(self._n_sent)
        if self._n_failed:
            self._failed.inc(self._n_failed)
        self._n_opened = self._n_closed = self._n_received = self._n_sent = self._n_failed = 0


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
        self._gauges: dict[str, object] = {}
        self._label_sets: dict[tuple, LabelSet] = {}
        self._pending: list[LabelSet] = []  # label sets with deferred counts (flush)

    def flush(self) -> None:
        """Apply every label set's deferred counts (before any read of the metrics)."""
        pending, self._pending = self._pending, []
        for label_set in pending:
            label_set._apply()

    def socket_gauge(self, reporter: str):
        child = self._gauges.get(reporter)
        if child is None:
            child = self._gauges[reporter] = self.sockets_open.labels(reporter=reporter)
        return child

    def label_set(self, reporter: str, source: Peer, destination: Peer, service: Service | None,
                  mtls: bool) -> LabelSet:
        """traffic_labels(...) and its children, cached per connection class (module docstring)."""
        sw, dw = source.workload, destination.workload
        key = (reporter, id(sw), source.identity, id(dw), destination.identity, id(service), mtls)
        entry = self._label_sets.get(key)
        if entry is None:
            if len(self._label_sets) >= MAX_LABEL_SETS:
                self._label_sets.clear()
            labels = traffic_labels(reporter=reporter, source=source, destination=destination, service=service,
                                    mtls=mtls)
            entry = self._label_sets[key] = LabelSet(self, labels, (sw, dw, service))
        return entry

    def forget_label_sets(self) -> None:
        """Workloads or services changed: later connections derive their labels afresh."""
        self._label_sets.clear()

    def connection_opened(self, labels: dict[str, str]) -> None:
        LabelSet(self, labels).opened_now()

    def connection_closed(self, labels: dict[str, str], request_bytes: int, response_bytes: int, failed: bool) -> None:
        LabelSet(self, labels).closed_now(request_bytes, response_bytes, failed)

    def connection_failed_early(self, labels: dict[str, str]) -> None:
        """A connection refused before it was opened (deny, no upstream): counted as failed only."""
        LabelSet(self, labels).failed_now()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        self.flush()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
