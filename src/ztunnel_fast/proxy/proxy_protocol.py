"""PROXY protocol v2 header for the waypoint "sandwich" (reference 3.2 step 8, 3.4), sans-IO.

A workload whose `applicationTunnel.protocol` is PROXY (a waypoint running in the mesh) gets each
inbound tunnel as a plain TCP connection that starts with one PROXY v2 header: command PROXY,
TCP over IPv4 or IPv6, the original source and destination (the HBONE peer's address and the
CONNECT :authority), then TLV 0xD0 holding the source's SPIFFE id, as ztunnel writes it (the
proto's 0xD1 "target service" TLV is not written by ztunnel either).

Invariant: `encode` is pure and its output is exactly the header (16-byte preamble + addresses +
TLVs); the caller writes it before any payload.
"""

from __future__ import annotations

import struct

from ..state.workload import IpAddress

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # the 12-byte v2 signature
VERSION_COMMAND_PROXY = 0x21  # version 2, command PROXY (not LOCAL)
FAMILY_TCP4 = 0x11  # AF_INET, STREAM
FAMILY_TCP6 = 0x21  # AF_INET6, STREAM
TLV_SOURCE_IDENTITY = 0xD0  # ztunnel's custom TLV: the source's SPIFFE id (the "authority" TLV)
_MAX_TLV_VALUE = 0xFFFF  # a TLV length is 16 bits


def encode(src: tuple[IpAddress, int], dst: tuple[IpAddress, int], source_identity: str | None) -> bytes:
    """The header for a connection from `src` to `dst` (both the same IP family)."""
    (sip, sport), (dip, dport) = src, dst
    if sip.version != dip.version:
        raise ValueError(f"PROXY header needs one address family: {sip} and {dip}")
    family = FAMILY_TCP4 if sip.version == 4 else FAMILY_TCP6
    body = sip.packed + dip.packed + struct.pack("!HH", sport, dport)
    if source_identity:
        value = source_identity.encode()
        if len(value) > _MAX_TLV_VALUE:
            raise ValueError("source identity too long for a PROXY TLV")
        body += struct.pack("!BH", TLV_SOURCE_IDENTITY, len(value)) + value
    return SIGNATURE + struct.pack("!BBH", VERSION_COMMAND_PROXY, family, len(body)) + body
