"""ZDS protocol core without sockets: datagrams + fds + flags in, typed requests or NACK reasons out."""

import array
import socket

import pytest

from ztunnel_fast.inpod import protocol as p
from ztunnel_fast.protos import zds_pb2

INFO = p.WorkloadInfo("web", "demo", "web-sa")


def test_hello_is_v1_and_acks_round_trip():
    hello = zds_pb2.ZdsHello()
    hello.ParseFromString(p.hello())
    assert hello.version == zds_pb2.V1 == 1
    assert p.parse_response(p.ack()) == ""
    assert p.parse_response(p.ack("bad fd")) == "bad fd"
    assert p.ack() == bytes.fromhex("0a00")  # WorkloadResponse{ack (field 1) = empty Ack}


def test_wire_field_numbers():
    # DelWorkload.uid is field 2 and keep is payload field 5 (reference 4.4)
    assert p.del_request("u") == bytes.fromhex("1203") + b"\x12\x01u"
    assert p.keep_request("u") == bytes.fromhex("2a03") + b"\x0a\x01u"
    assert p.snapshot_request() == bytes.fromhex("1a00")
    wi = zds_pb2.WorkloadInfo.DESCRIPTOR
    assert [(f.name, f.number) for f in wi.fields] == [("name", 1), ("namespace", 2), ("service_account", 3)]


def test_add_with_one_fd():
    msg = p.parse_request(p.add_request("uid-1", INFO), [7])
    assert msg == p.AddWorkload("uid-1", INFO, 7)


def test_empty_service_account_defaults():
    msg = p.parse_request(p.add_request("uid-1", p.WorkloadInfo("web", "demo", "")), [7])
    assert msg.info.service_account == "default"


@pytest.mark.parametrize("data,expected", [
    (p.keep_request("k"), p.KeepWorkload("k")),
    (p.del_request("d"), p.DelWorkload("d")),
    (p.snapshot_request(), p.SnapshotSent()),
])
def test_other_requests(data, expected):
    assert p.parse_request(data, []) == expected


@pytest.mark.parametrize("data,fds,flags,reason", [
    (p.add_request("u", INFO), [], 0, "AddWorkload without a network namespace fd"),
    (p.keep_request("u"), [5], 0, "unexpected fd with a KeepWorkload message"),
    (p.del_request("u"), [5], 0, "unexpected fd with a DelWorkload message"),
    (p.snapshot_request(), [5], 0, "unexpected fd with a SnapshotSent message"),
    (p.add_request("u", INFO), [5, 6], 0, "expected at most one fd, received 2"),
    (p.add_request("u", INFO), [5], socket.MSG_TRUNC, "message truncated"),
    (p.add_request("u", INFO), [5], socket.MSG_CTRUNC, "control message truncated"),
    (b"\xff\xff\xff", [], 0, "malformed WorkloadRequest"),
    (b"", [], 0, "WorkloadRequest without a known payload"),
    (b"\x22\x00", [], 0, "WorkloadRequest without a known payload"),  # field 4: not a payload
    (p.add_request("", INFO), [5], 0, "AddWorkload without a uid"),
    (zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid="u")).SerializeToString(), [5], 0,
     "AddWorkload u without workload_info"),
    (p.keep_request(""), [], 0, "KeepWorkload without a uid"),
    (p.del_request(""), [], 0, "DelWorkload without a uid"),
])
def test_protocol_errors(data, fds, flags, reason):
    msg = p.parse_request(data, fds, flags)
    assert isinstance(msg, p.ProtocolError)
    assert msg.reason.startswith(reason), msg.reason


def test_fds_from_ancillary():
    data = array.array("i", [4, 9]).tobytes()
    assert p.fds_from_ancillary([(socket.SOL_SOCKET, socket.SCM_RIGHTS, data)]) == ([4, 9], None)
    fds, err = p.fds_from_ancillary([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, b"x" * 12)])
    assert fds == [] and "unexpected control message" in err


def test_hello_parse_rejects_garbage():
    assert isinstance(p.parse_hello(b"\xff"), p.ProtocolError)
    assert p.parse_hello(p.hello()) == 1


def test_eof_is_recognised_with_the_flags_recvmsg_really_returns():
    """The workload manager reads with MSG_CMSG_CLOEXEC, which Linux echoes in msg_flags: the
    peer's close must still read as EOF, and an empty datagram with truncation flags must not."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        a.send(p.snapshot_request())
        data, anc, flags, _ = b.recvmsg(p.RECV_BUFFER, p.ANCILLARY_BUFFER, socket.MSG_CMSG_CLOEXEC)
        assert not p.is_eof(data, [], flags)
        a.close()
        data, anc, flags, _ = b.recvmsg(p.RECV_BUFFER, p.ANCILLARY_BUFFER, socket.MSG_CMSG_CLOEXEC)
        assert flags & socket.MSG_CMSG_CLOEXEC  # what made the old `not flags` test miss the EOF
        assert p.is_eof(data, [], flags)
    finally:
        b.close()
    assert not p.is_eof(b"", [], socket.MSG_TRUNC)
