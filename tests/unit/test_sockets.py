"""proxy/sockets.py: accepted sockets carry ztunnel's TCP options without a syscall of their own
(set on the listener, copied by Linux at accept), and the address caches answer like the parsers."""

from __future__ import annotations

import socket
from ipaddress import ip_address

from ztunnel_fast.proxy import sockets


def test_accepted_socket_inherits_nodelay_and_keepalive_from_the_listener():
    lsock = sockets.listener("127.0.0.1", 0)
    client = socket.socket()
    try:
        client.connect(lsock.getsockname())
        lsock.setblocking(True)
        accepted, _ = lsock.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == sockets.KEEPALIVE_IDLE
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == sockets.KEEPALIVE_INTERVAL
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == sockets.KEEPALIVE_COUNT
            # and the client's view is untouched: the options are the listener's, not the system's
            assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        client.close()
        lsock.close()


def test_normalize_is_cached_and_folds_ipv4_mapped():
    for _ in range(2):  # the second round answers from the cache
        assert sockets.normalize("10.1.2.3") == ip_address("10.1.2.3")
        assert sockets.normalize("::ffff:10.1.2.3") == ip_address("10.1.2.3")
        assert sockets.normalize("fe80::1%eth0") == ip_address("fe80::1")
        assert sockets._from_packed(bytes([10, 1, 2, 4])) == ip_address("10.1.2.4")
        assert sockets._from_packed(ip_address("::ffff:10.1.2.5").packed) == ip_address("10.1.2.5")
        assert sockets._ip_text(ip_address("fd00::1")) == "fd00::1"


def test_address_caches_stay_bounded():
    for i in range(sockets.IP_CACHE_SIZE + 10):
        text = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
        assert sockets._ip_text(sockets.normalize(text)) == text
    assert len(sockets._ip_parsed) <= sockets.IP_CACHE_SIZE
    assert len(sockets._ip_texts) <= sockets.IP_CACHE_SIZE


def test_addresses_are_parsed_once_and_unmapped():
    from ipaddress import IPv4Address, IPv6Address

    from ztunnel_fast.proxy import sockets

    mapped = sockets.normalize("::ffff:10.1.2.3")
    assert mapped == IPv4Address("10.1.2.3")
    assert sockets.normalize("::ffff:10.1.2.3") is mapped  # the cached object
    assert sockets.normalize("fe80::1%eth0") == IPv6Address("fe80::1")
    assert sockets._from_packed(bytes([10, 1, 2, 3])) == mapped
    assert sockets._from_packed(IPv6Address("::ffff:10.1.2.3").packed) == mapped
