"""The PROXY v2 header of the waypoint sandwich, checked against an independent reader."""

from ipaddress import ip_address

import pytest
from proxyprotocol.v2 import ProxyProtocolV2

from ztunnel_fast.proxy.proxy_protocol import TLV_SOURCE_IDENTITY, encode

SPIFFE = "spiffe://cluster.local/ns/demo/sa/sleep"


@pytest.mark.parametrize("src,dst", [(("198.18.0.1", 43210), ("198.19.0.10", 8000)),
                                     (("fd00::1", 1), ("fd00::a", 65535))])
def test_header_parses_with_addresses_and_the_identity_tlv(src, dst):
    src = (ip_address(src[0]), src[1])
    dst = (ip_address(dst[0]), dst[1])
    header = encode(src, dst, SPIFFE)
    result = ProxyProtocolV2().unpack(header)
    assert result.proxied
    assert (result.source, result.dest) == (src, dst)
    assert result.tlv[TLV_SOURCE_IDENTITY] == SPIFFE.encode()
    assert dict(result.tlv) == {TLV_SOURCE_IDENTITY: SPIFFE.encode()}  # only 0xD0, as ztunnel writes


def test_fixed_layout_bytes():
    header = encode((ip_address("10.0.0.1"), 1), (ip_address("10.0.0.2"), 2), "x")
    assert header.hex() == ("0d0a0d0a000d0a515549540a" "21" "11" "0010"
                            "0a000001" "0a000002" "0001" "0002" "d0" "0001" "78")


def test_without_identity_no_tlv_and_mixed_families_refused():
    header = encode((ip_address("10.0.0.1"), 1), (ip_address("10.0.0.2"), 2), None)
    assert len(header) == 16 + 12
    with pytest.raises(ValueError, match="one address family"):
        encode((ip_address("10.0.0.1"), 1), (ip_address("fd00::2"), 2), SPIFFE)
