"""Per-connection telemetry: metrics at open and close, and ztunnel's access log lines.

    INFO  ztunnel_fast::access: connection complete src.addr=... src.workload=... ... direction=outbound
          bytes_sent=67 bytes_recv=490 duration="12ms"
    ERROR ztunnel_fast::access: connection complete ... error="http status: 401 Unauthorized"
    WARN  ztunnel_fast::access: connection failed src.addr=... dst.addr=... direction=inbound error="..."

`bytes_sent` / `bytes_recv` are from the source workload's point of view in both directions:
bytes_sent = client -> server, bytes_recv = server -> client.
Invariant: a ConnectionRecord is completed exactly once; completing it again is a no-op.
"""

from __future__ import annotations

import logging
import time

from ..state.service import Service
from .metrics import Metrics, Peer, traffic_labels

log = logging.getLogger("ztunnel_fast.access")


class ConnectionRecord:
    def __init__(
        self,
        metrics: Metrics,
        *,
        direction: str,
        src_addr: str,
        dst_addr: str,
        source: Peer,
        destination: Peer,
        service: Service | None = None,
        hbone_addr: str | None = None,
        mtls: bool,
    ):
        self.metrics = metrics
        self.direction = direction
        self.start = time.monotonic()
        self.done = False
        self.mtls = mtls
        self.labels = traffic_labels(
            reporter="source" if direction == "outbound" else "destination",
            source=source, destination=destination, service=service, mtls=mtls,
        )
        self.fields: dict[str, object] = {"src.addr": src_addr}
        if source.workload is not None:
            self.fields["src.workload"] = source.workload.name
            self.fields["src.namespace"] = source.workload.namespace
        if mtls and source.identity is not None:
            self.fields["src.identity"] = str(source.identity)
        self.fields["dst.addr"] = dst_addr
        if hbone_addr:
            self.fields["dst.hbone_addr"] = hbone_addr
        if service is not None:
            self.fields["dst.service"] = service.hostname
        if destination.workload is not None:
            self.fields["dst.workload"] = destination.workload.name
            self.fields["dst.namespace"] = destination.workload.namespace
        if mtls and destination.identity is not None:
            self.fields["dst.identity"] = str(destination.identity)
        self.fields["direction"] = direction
        metrics.connection_opened(self.labels)
        log.debug("connection opened", extra={"fields": self.fields})

    def complete(self, request_bytes: int, response_bytes: int, error: str | None = None, flag: str = "-") -> None:
        if self.done:
            return
        self.done = True
        labels = self.labels if flag == "-" else {**self.labels, "response_flags": flag}
        self.metrics.connection_closed(labels, request_bytes, response_bytes, failed=error is not None)
        fields = dict(self.fields)
        fields["bytes_sent"] = request_bytes
        fields["bytes_recv"] = response_bytes
        fields["duration"] = f"{int((time.monotonic() - self.start) * 1000)}ms"
        if error is None:
            log.info("connection complete", extra={"fields": fields})
        else:
            fields["error"] = error
            log.error("connection complete", extra={"fields": fields})


def log_early_deny(metrics: Metrics | None, *, src_addr: str, dst_addr: str, direction: str, error: str,
                   labels: dict[str, str] | None = None) -> None:
    """A connection refused before there was enough context for a full record."""
    if metrics is not None and labels is not None:
        metrics.connection_failed_early(labels)
    log.warning("connection failed", extra={"fields": {
        "src.addr": src_addr, "dst.addr": dst_addr, "direction": direction, "error": error}})
