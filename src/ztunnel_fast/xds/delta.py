"""The delta ADS protocol as ztunnel speaks it to istiod, without I/O (reference 4.1, 5.1).

Role: responses in, (changes to apply, the ACK/NACK to send) out; the requests that open a
stream; the node id and metadata; the reconnect backoff and how a stream's end is classified.
xds/client.py owns the gRPC stream and the clock and calls into this module; tests drive it
with messages only.

Invariants:
- One DeltaSession lives across reconnects: it remembers the name of every resource istiod sent
  (accepted or not) until istiod removes it, and a new stream announces them in
  `initial_resource_versions` with empty versions, as ztunnel does, so istiod sends removals for
  what disappeared while we were away.
- Every response gets exactly one answer: an ACK `{type_url, response_nonce}`, or a NACK that
  adds `error_detail` {code 0, message = the rejections joined by "; ", each "<name>: <reason>"}
  (ztunnel leaves the status code at its default).
- Partial apply, as ztunnel does: the valid resources of a NACKed response are applied; a
  rejected resource keeps its previous state.
- `synced` gains a type URL when a response of that type was ACKed (ztunnel's readiness: a NACKed
  first response keeps "state manager" pending until istiod sends one that is accepted).
- Wildcard subscriptions only (empty resource_names_subscribe): ztunnel's default, not on-demand.
- A response for a type URL we did not subscribe to is NACKed ("type URL not subscribed");
  ztunnel ACKs it with an error log, but istiod never sends one, and a NACK tells it why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Callable

import grpc
from google.protobuf import message as pb_message
from google.protobuf import struct_pb2

# Envoy's discovery messages cut down to ztunnel's fields (same wire format; protos/discovery.proto
# says why they are not xds-protos' envoy.service.discovery.v3)
from ..protos import authorization_pb2, discovery_pb2, workload_pb2
from ..state.store import Removal, Resource
from .convert import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    Rejected,
    address_from_proto,
    authorization_from_proto,
)

log = logging.getLogger(__name__)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
DEFAULT_INSTANCE_IP = "1.1.1.1"  # ztunnel's INSTANCE_IP default in the node id

INITIAL_BACKOFF = 0.010  # seconds: ztunnel's first reconnect delay
MAX_BACKOFF = 15.0  # seconds: ztunnel's cap


# --- the node -------------------------------------------------------------------------------------


def node_id(instance_ip: str, pod_name: str, pod_namespace: str) -> str:
    """ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local"""
    ip = instance_ip or DEFAULT_INSTANCE_IP
    return f"ztunnel~{ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"


def build_node(*, instance_ip: str, pod_name: str, pod_namespace: str, node_name: str,
               proxy_metadata: tuple[tuple[str, str], ...] = ()) -> discovery_pb2.Node:
    """The Node ztunnel sends: id as above; metadata NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, then
    the proxy metadata (ISTIO_META_<K> as strings, ISTIO_METAJSON_<K> as JSON values; config.py
    marks the latter with a "json:" key prefix).  An entry that is not valid JSON is left out with
    an error line, as ztunnel does."""
    metadata: dict[str, object] = {
        "NAME": pod_name,
        "NAMESPACE": pod_namespace,
        "INSTANCE_IPS": instance_ip or DEFAULT_INSTANCE_IP,
        "NODE_NAME": node_name,
    }
    for key, value in proxy_metadata:
        if key.startswith("json:"):
            name = key[len("json:"):]
            try:
                metadata[name] = json.loads(value)
            except ValueError as exc:
                log.error("failed to parse ISTIO_METAJSON_%s=%s: %s", name, value, exc)
        else:
            metadata[key] = value
    struct = struct_pb2.Struct()
    struct.update(metadata)
    return discovery_pb2.Node(id=node_id(instance_ip, pod_name, pod_namespace), metadata=struct)


# --- what a response turns into -----------------------------------------------------------------


@dataclass(frozen=True)
class TypeHandler:
    """How one type URL's resources become state changes."""

    type_url: str
    message: type  # the protobuf class inside each Resource's Any
    convert: Callable[[str, object], Resource]  # (name, message) -> model; raises Rejected
    removal_kind: str  # Removal.kind for removed_resources


HANDLERS = (
    TypeHandler(ADDRESS_TYPE_URL, workload_pb2.Address, address_from_proto, "address"),
    TypeHandler(AUTHORIZATION_TYPE_URL, authorization_pb2.Authorization, authorization_from_proto, "policy"),
)


@dataclass
class Outcome:
    """What one response means."""

    type_url: str
    upserts: list[Resource] = field(default_factory=list)  # valid resources to apply
    removals: list[Removal] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)  # left out; their old state stays
    reply: discovery_pb2.DeltaDiscoveryRequest | None = None  # the ACK or NACK to send
    first: bool = False  # the first ACKed response of this type since the process started

    @property
    def nack(self) -> bool:
        return bool(self.rejected)

    @property
    def changes(self) -> bool:
        return bool(self.upserts or self.removals)


class DeltaSession:
    """Delta ADS bookkeeping for one process (survives reconnects)."""

    def __init__(self, node: discovery_pb2.Node, handlers: tuple[TypeHandler, ...] = HANDLERS):
        self.node = node
        self.handlers = {h.type_url: h for h in handlers}
        # type URL -> names istiod sent and has not removed (announced on reconnect)
        self.known: dict[str, set[str]] = {h.type_url: set() for h in handlers}
        self.synced: set[str] = set()

    @property
    def all_synced(self) -> bool:
        return self.synced >= set(self.handlers)

    def initial_requests(self) -> list[discovery_pb2.DeltaDiscoveryRequest]:
        """The opening request of each type on a new stream: node, wildcard, what we hold."""
        return [
            discovery_pb2.DeltaDiscoveryRequest(
                node=self.node,
                type_url=type_url,
                # Names only: ztunnel does not track versions (istiod needs the names for removals).
                initial_resource_versions={name: "" for name in sorted(self.known[type_url])},
            )
            for type_url in self.handlers
        ]

    def on_response(self, response: discovery_pb2.DeltaDiscoveryResponse) -> Outcome:
        type_url = response.type_url
        outcome = Outcome(type_url)
        handler = self.handlers.get(type_url)
        if handler is None:
            outcome.rejected.append(Rejected(type_url or "(no type_url)", "type URL not subscribed"))
            outcome.reply = self._reply(response, outcome.rejected)
            return outcome
        known = self.known[type_url]
        for resource in response.resources:
            known.add(resource.name)
            try:
                outcome.upserts.append(self._decode(handler, resource))
            except Rejected as rejection:
                outcome.rejected.append(rejection)
        for name in response.removed_resources:
            outcome.removals.append(Removal(handler.removal_kind, name))
            known.discard(name)
        if not outcome.rejected:
            outcome.first = type_url not in self.synced
            self.synced.add(type_url)
        outcome.reply = self._reply(response, outcome.rejected)
        return outcome

    @staticmethod
    def _decode(handler: TypeHandler, resource: discovery_pb2.Resource) -> Resource:
        name = resource.name
        if not resource.HasField("resource"):
            raise Rejected(name, "XDS payload without resource")
        if resource.resource.type_url != handler.type_url:
            raise Rejected(name, f"resource type {resource.resource.type_url!r} in a {handler.type_url} response")
        msg = handler.message()
        try:
            msg.ParseFromString(resource.resource.value)
        except pb_message.DecodeError as exc:
            raise Rejected(name, f"cannot decode {handler.message.DESCRIPTOR.full_name}: {exc}") from None
        return handler.convert(name, msg)

    @staticmethod
    def _reply(response: discovery_pb2.DeltaDiscoveryResponse,
               rejected: list[Rejected]) -> discovery_pb2.DeltaDiscoveryRequest:
        reply = discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)
        if rejected:
            reply.error_detail.CopyFrom(discovery_pb2.Status(message="; ".join(str(r) for r in rejected)))
        return reply


# --- reconnects -----------------------------------------------------------------------------------

# Stream ends ztunnel treats as routine (istiod rolling, the connection's max age): the backoff
# restarts at 10 ms.  Unavailable only with these details; other Unavailable = a connection error.
_ROUTINE_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
_ROUTINE_UNAVAILABLE = ("transport is closing", "received prior goaway")


def classify(code: grpc.StatusCode | None, details: str = "", *, connected: bool = True) -> str:
    """The `reason` label of istio_xds_connection_terminations_total for how a stream ended:
    Complete (istiod ended it cleanly, code None), Reconnect (routine), ConnectionError (the
    stream never got going: Unavailable before any response), Error (any other status)."""
    if code is None:
        return "Complete"
    text = (details or "").lower()
    if code in _ROUTINE_CODES or (code == grpc.StatusCode.UNAVAILABLE and any(s in text for s in _ROUTINE_UNAVAILABLE)):
        return "Reconnect"
    if code == grpc.StatusCode.UNAVAILABLE and not connected:
        return "ConnectionError"
    return "Error"


class Backoff:
    """ztunnel's xDS reconnect delay: 10 ms, doubled before sleeping after an error, capped at
    15 s, back to 10 ms after a clean or routine end (Complete, Reconnect)."""

    def __init__(self) -> None:
        self.current = INITIAL_BACKOFF

    def next_delay(self, reason: str) -> float:
        if reason in ("Complete", "Reconnect"):
            self.current = INITIAL_BACKOFF
        else:
            self.current = min(self.current * 2, MAX_BACKOFF)
        return self.current
