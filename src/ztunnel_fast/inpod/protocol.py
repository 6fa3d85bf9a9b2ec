"""The ZDS wire protocol, sans-IO: one datagram (bytes, received fds, recvmsg flags) in, one typed
message or a ProtocolError out; acks and the hello out as bytes.

Wire facts (reference ztunnel-master.md 4.4): AF_UNIX SOCK_SEQPACKET, one protobuf per datagram
with no length prefix, istio-cni -> ztunnel `WorkloadRequest`, ztunnel -> istio-cni `ZdsHello`
first and then exactly one `WorkloadResponse{ack}` per request (empty error = ACK).

Invariants:
- `parse_request` never raises on peer input: anything malformed becomes a ProtocolError whose
  `reason` is the NACK text.
- fd ownership: the caller owns every fd it passed in.  Only an `AddWorkload` result takes one
  (its `netns_fd`); for every other result (including errors) the caller closes all fds.
"""

from __future__ import annotations

import array
import socket
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ..protos import zds_pb2

# ztunnel reads a datagram into 1024 bytes; a longer one is a protocol error (MSG_TRUNC).
RECV_BUFFER = 1024  # bytes
# Room for more fds than allowed, so "more than one fd" gets its own clear error before the
# kernel has to truncate (MSG_CTRUNC, which the kernel resolves by dropping the extra fds).
MAX_FDS_RECEIVED = 4
ANCILLARY_BUFFER = socket.CMSG_SPACE(MAX_FDS_RECEIVED * array.array("i").itemsize)


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """Who the pod is, as istio-cni names it (WorkloadInfo; trust_domain is reserved on the wire)."""

    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class AddWorkload:
    uid: str
    info: WorkloadInfo
    netns_fd: int  # the pod's network namespace; owned by whoever handles this message


@dataclass(frozen=True, slots=True)
class KeepWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    pass


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A request that must be NACKed; `reason` is the Ack.error text."""

    reason: str


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


def hello() -> bytes:
    """ZdsHello{V1}: the first datagram ztunnel sends after connecting."""
    return zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString()


def ack(error: str = "") -> bytes:
    """WorkloadResponse{ack}: empty error = ACK, otherwise a NACK carrying the reason."""
    return zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString()


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[int], str | None]:
    """The fds carried in SCM_RIGHTS control messages, and an error for any other control message
    (whose content is then ignored).  Pure: works on recvmsg's ancdata list."""
    fds: list[int] = []
    error = None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
        else:
            error = f"unexpected control message (level {level}, type {kind})"
    return fds, error


def is_eof(data: bytes, fds: list[int], flags: int) -> bool:
    """Whether a recvmsg result is the peer's close.  Linux copies MSG_CMSG_CLOEXEC from the call's
    flags into msg_flags, also on EOF, so only the flags a datagram can carry count."""
    return not data and not fds and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)


def parse_request(data: bytes, fds: list[int], flags: int = 0) -> Request | ProtocolError:
    """One received datagram -> a typed request, or the reason it must be NACKed."""
    if flags & socket.MSG_TRUNC:
        return ProtocolError(f"message truncated: longer than {RECV_BUFFER} bytes")
    if flags & socket.MSG_CTRUNC:
        return ProtocolError(f"control message truncated: more than {MAX_FDS_RECEIVED} fds sent")
    if len(fds) > 1:
        return ProtocolError(f"expected at most one fd, received {len(fds)}")
    request = zds_pb2.WorkloadRequest()
    try:
        request.ParseFromString(data)
    except DecodeError as exc:
        return ProtocolError(f"malformed WorkloadRequest: {exc}")
    kind = request.WhichOneof("payload")
    if kind is None:
        return ProtocolError("WorkloadRequest without a known payload")
    if kind != "add" and fds:
        return ProtocolError(f"unexpected fd with a {_NAMES[kind]} message")
    if kind == "add":
        add = request.add
        if not fds:
            return ProtocolError("AddWorkload without a network namespace fd")
        if not add.uid:
            return ProtocolError("AddWorkload without a uid")
        if not add.HasField("workload_info"):
            return ProtocolError(f"AddWorkload {add.uid} without workload_info")
        wi = add.workload_info
        if not (wi.name and wi.namespace):
            return ProtocolError(f"AddWorkload {add.uid}: workload_info needs a name and a namespace")
        # empty service account: Kubernetes' "default", as ztunnel defaults it
        info = WorkloadInfo(wi.name, wi.namespace, wi.service_account or "default")
        return AddWorkload(add.uid, info, fds[0])
    if kind == "keep":
        return KeepWorkload(request.keep.uid) if request.keep.uid else ProtocolError("KeepWorkload without a uid")
    if kind == "del":
        uid = getattr(request, "del").uid  # `del` is a Python keyword
        return DelWorkload(uid) if uid else ProtocolError("DelWorkload without a uid")
    return SnapshotSent()


_NAMES = {"del": "DelWorkload", "keep": "KeepWorkload", "snapshot_sent": "SnapshotSent"}


# --- the istio-cni side (used by the test double in fakes/cni.py) ----------------------------------

def add_request(uid: str, info: WorkloadInfo) -> bytes:
    return zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid=uid, workload_info=zds_pb2.WorkloadInfo(
        name=info.name, namespace=info.namespace, service_account=info.service_account))).SerializeToString()


def keep_request(uid: str) -> bytes:
    return zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid)).SerializeToString()


def del_request(uid: str) -> bytes:
    req = zds_pb2.WorkloadRequest()
    getattr(req, "del").uid = uid  # `del` is a Python keyword
    return req.SerializeToString()


def snapshot_request() -> bytes:
    return zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent()).SerializeToString()


def parse_hello(data: bytes) -> int | ProtocolError:
    """The version a ZdsHello announces."""
    hello_msg = zds_pb2.ZdsHello()
    try:
        hello_msg.ParseFromString(data)
    except DecodeError as exc:
        return ProtocolError(f"malformed ZdsHello: {exc}")
    return hello_msg.version


def parse_response(data: bytes) -> str | ProtocolError:
    """The Ack.error of a WorkloadResponse ("" = ACK)."""
    resp = zds_pb2.WorkloadResponse()
    try:
        resp.ParseFromString(data)
    except DecodeError as exc:
        return ProtocolError(f"malformed WorkloadResponse: {exc}")
    if resp.WhichOneof("payload") != "ack":
        return ProtocolError("WorkloadResponse without an ack")
    return resp.ack.error
