"""The delta ADS client: one gRPC stream to istiod, the I/O edge of xds/delta.py.

Role: open `DeltaAggregatedResources` on XDS_ADDRESS (istiod.py: TLS roots, server name, bearer
token re-read per stream, clusterid, XDS_HEADER_*), send the opening requests, hand every
response to the DeltaSession, apply its changes through `apply` (the StateStore path the local
file also takes) and send the ACK/NACK; when the stream ends, count the reason, wait the backoff
and open a new stream that announces what we hold.

Invariants:
- State is only ever changed through `apply`; while disconnected nothing changes, so the proxy
  keeps serving from the last good state (tunnels in flight are untouched by reconnects).
- A response is applied before its ACK/NACK is written: istiod never sees an ACK for state we
  do not have.
- Each attempt uses a fresh channel, so the reconnect pace is ztunnel's backoff, not gRPC's own
  channel backoff (which starts at 1 s).
- A response that is not even a DeltaDiscoveryResponse ends the stream (reason Error): without
  a nonce there is nothing to NACK.
- Log lines: one per failed attempt (warning) with the delay; routine ends (istiod closing the
  stream) only at debug; the backoff bounds the rate at one line per 15 s while istiod is down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable, Iterable

# gRPC core writes its own INFO lines (GOAWAY received, ...) to stderr in absl's format, which
# would break our log format; errors only, unless the operator asks for more.  Read when gRPC
# initialises (the first channel), so setting it at import is early enough.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc  # noqa: E402
from google.protobuf import message as pb_message

from .. import istiod
from ..config import IstiodEndpoint
from ..errors import ConfigError
from ..protos import discovery_pb2
from ..state.store import Removal, Resource
from ..telemetry.metrics import Metrics
from .delta import ADS_METHOD, Backoff, DeltaSession, classify

log = logging.getLogger(__name__)

Apply = Callable[[Iterable[Resource], Iterable[Removal]], None]


class XdsClient:
    def __init__(self, endpoint: IstiodEndpoint, session: DeltaSession, *, auth_token: str | None,
                 cluster_id: str, apply: Apply, metrics: Metrics, on_synced: Callable[[], None]):
        self.endpoint = endpoint
        self.session = session
        self.auth_token = auth_token
        self.cluster_id = cluster_id
        self.apply = apply
        self.metrics = metrics
        self.on_synced = on_synced
        self.backoff = Backoff()
        self.connected = False  # this stream has received a response
        self._synced_reported = False

    async def run(self) -> None:
        """Forever: one stream, then the backoff, then the next (cancel to stop)."""
        while True:
            reason, detail = await self._stream_once()
            self.connected = False
            self.metrics.xds_terminations.labels(reason=reason).inc()
            delay = self.backoff.next_delay(reason)
            held = sum(len(v) for v in self.session.known.values())
            if reason == "Reconnect":
                log.debug("XDS client terminated: %s, retrying in %s", detail, _ms(delay))
            elif reason == "Complete":
                log.warning("XDS client complete, reconnecting in %s", _ms(delay))
            else:
                what = "connection error" if reason == "ConnectionError" else "error"
                log.warning("XDS client %s: %s, retrying in %s; serving the last state (%d resources known)",
                            what, detail, _ms(delay), held)
            await asyncio.sleep(delay)

    async def _stream_once(self) -> tuple[str, str]:
        """One stream's life; returns (termination reason, detail for the log)."""
        try:
            channel = istiod.open_channel(self.endpoint, "XDS_ROOT_CA")
        except ConfigError as exc:
            return "ConnectionError", str(exc)
        try:
            metadata = istiod.call_metadata(self.endpoint, istiod.read_token(self.auth_token), self.cluster_id)
            call = channel.stream_stream(
                ADS_METHOD,
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=None,  # raw bytes: counted, then parsed here
            )(metadata=metadata)
            for request in self.session.initial_requests():
                await call.write(request)
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return "Complete", ""
                if not self.connected:
                    self.connected = True
                    log.info("Stream established to %s", self.endpoint.address)
                reply = self._handle(raw)
                if reply is None:
                    call.cancel()
                    return "Error", "istiod sent a message that is not a DeltaDiscoveryResponse"
                await call.write(reply)
        except grpc.aio.AioRpcError as exc:
            reason = classify(exc.code(), exc.details() or "", connected=self.connected)
            return reason, f"{exc.code().name}: {exc.details()}"
        except asyncio.InvalidStateError:
            # grpc.aio refuses a write after istiod ended the call with OK: a clean end.
            return "Complete", ""
        except OSError as exc:
            return "ConnectionError", str(exc)
        except Exception as exc:  # noqa: BLE001 - a bug here must not end xDS for the process
            log.exception("xds stream failed unexpectedly")
            return "Error", f"{type(exc).__name__}: {exc}"
        finally:
            await channel.close()

    def _handle(self, raw: bytes) -> discovery_pb2.DeltaDiscoveryRequest | None:
        try:
            response = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
        except pb_message.DecodeError:
            return None
        url = response.type_url
        self.metrics.xds_messages.labels(url=url).inc()
        self.metrics.xds_message_bytes.labels(url=url).inc(len(raw))
        outcome = self.session.on_response(response)
        log.info("received response type_url=%s size=%d removes=%d", url, len(response.resources),
                 len(response.removed_resources))
        if outcome.changes:
            self.apply(outcome.upserts, outcome.removals)
        if outcome.nack:
            log.error("sending response type_url=%s nonce=%s type=NACK error=%s (%d of %d resources rejected)",
                      url, response.nonce, outcome.reply.error_detail.message, len(outcome.rejected),
                      len(response.resources))
        if not self._synced_reported and self.session.all_synced:
            self._synced_reported = True
            log.info("xds: initial sync complete from %s", self.endpoint.address)
            self.on_synced()
        return outcome.reply


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"
