"""Per-connection telemetry: metrics at open and close, and ztunnel's access log lines.

    INFO  ztunnel_fast::access: connection complete src.addr=... src.workload=... ... direction=outbound
          bytes_sent=67 bytes_recv=490 duration="12ms"
    ERROR ztunnel_fast::access: connection complete ... error="http status: 401 Unauthorized"
    WARN  ztunnel_fast::access: connection failed src.addr=... dst.addr=... direction=inbound error="..."

`bytes_sent` / `bytes_recv` are from the source workload's point of view in both directions:
bytes_sent = client -> server, bytes_recv = server -> client.
Invariant: a ConnectionRecord is completed exactly once; completing it again is a no-op.
Nothing is formatted for a line the logger's level drops (addresses, identities, durations).
"""

from __future__ import annotations

import logging
import time

from ..hbone.headers import format_addr
from ..state.service import Service
from ..state.workload import IpAddress
from .metrics import Metrics, Peer

log = logging.getLogger("ztunnel_fast.access")


Address = str | tuple[IpAddress, int]  # text, or (ip, port) formatted only when a line is written


def _addr_text(addr) -> str:
    return addr if isinstance(addr, str) else format_addr(*addr)


class ConnectionRecord:
    """Metrics at open and close, the access log line at close.  The log fields are built only
    when the access logger is enabled for the line's level (addresses may be passed as (ip, port)
    and are formatted then); the labels and their children come from Metrics.label_set()."""

    __slots__ = ("metrics", "direction", "start", "done", "mtls", "label_set", "_src_addr", "_dst_addr",
                 "_source", "_destination", "_service", "_hbone_addr")

    def __init__(
        self,
        metrics: Metrics,
        *,
        direction: str,
        src_addr: Address,
        dst_addr: Address,
        source: Peer,
        destination: Peer,
        service: Service | None = None,
        hbone_addr: Address | None = None,
        mtls: bool,
    ):
        self.metrics = metrics
        self.direction = direction
        self.start = time.monotonic()
        self.done = False
        self.mtls = mtls
        self._src_addr = src_addr
        self._dst_addr = dst_addr
        self._source = source
        self._destination = destination
        self._service = service
        self._hbone_addr = hbone_addr
        self.label_set = metrics.label_set("source" if direction == "outbound" else "destination",
                                           source, destination, service, mtls)
        self.label_set.opened_now()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection opened", extra={"fields": self.fields})

    def again(self, src_addr: Address, start: float) -> ConnectionRecord:
        """The record of another connection of this one's class (same direction, peers, service,
        destination and labels) from `src_addr`, started at `start`: counted as opened now, as
        the constructor does (the fast paths make one per flow class and copy it per tunnel)."""
        other = ConnectionRecord.__new__(ConnectionRecord)
        other.metrics = self.metrics
        other.direction = self.direction
        other.start = start
        other.done = False
        other.mtls = self.mtls
        other.label_set = self.label_set
        other._src_addr = src_addr
        other._dst_addr = self._dst_addr
        other._source = self._source
        other._destination = self._destination
        other._service = self._service
        other._hbone_addr = self._hbone_addr
        other.label_set.opened_now()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection opened", extra={"fields": other.fields})
        return other

    @property
    def labels(self) -> dict[str, str]:
        return self.label_set.labels

    @property
    def fields(self) -> dict[str, object]:
        """The access log's fields up to `direction` (a new dict on every call)."""
        source, destination, service, mtls = self._source, self._destination, self._service, self.mtls
        fields: dict[str, object] = {"src.addr": _addr_text(self._src_addr)}
        if source.workload is not None:
            fields["src.workload"] = source.workload.name
            fields["src.namespace"] = source.workload.namespace
        if mtls and source.identity is not None:
            fields["src.identity"] = str(source.identity)
        fields["dst.addr"] = _addr_text(self._dst_addr)
        if self._hbone_addr:
            fields["dst.hbone_addr"] = _addr_text(self._hbone_addr)
        if service is not None:
            fields["dst.service"] = service.hostname
        if destination.workload is not None:
            fields["dst.workload"] = destination.workload.name
            fields["dst.namespace"] = destination.workload.namespace
        if mtls and destination.identity is not None:
            fields["dst.identity"] = str(destination.identity)
        fields["direction"] = self.direction
        return fields

    def complete(self, request_bytes: int, response_bytes: int, error: str | None = None, flag: str = "-") -> None:
        if self.done:
            return
        self.done = True
        children = self.label_set if flag == "-" else self.label_set.flagged(flag)
        children.closed_now(request_bytes, response_bytes, error is not None)
        if not log.isEnabledFor(logging.INFO if error is None else logging.ERROR):
            return
        fields = self.fields
        fields["bytes_sent"] = request_bytes
        fields["bytes_recv"] = response_bytes
        fields["duration"] = f"{int((time.monotonic() - self.start) * 1000)}ms"
        if error is None:
            log.info("connection complete", extra={"fields": fields})
        else:
            fields["error"] = error
            log.error("connection complete", extra={"fields": fields})


def log_early_deny(metrics: Metrics | None, *, src_addr: Address, dst_addr: Address, direction: str, error: str,
                   labels: dict[str, str] | None = None) -> None:
    """A connection refused before there was enough context for a full record."""
    if metrics is not None and labels is not None:
        metrics.connection_failed_early(labels)
    if log.isEnabledFor(logging.WARNING):
        log.warning("connection failed", extra={"fields": {
            "src.addr": _addr_text(src_addr), "dst.addr": _addr_text(dst_addr), "direction": direction,
            "error": error}})
