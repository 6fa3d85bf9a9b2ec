"""HBONE mutual TLS: real handshakes over socketpairs on a uvloop event loop, no mocks.

Peers are our own contexts, hand-built pyOpenSSL contexts (a client without a certificate), and
the stdlib `ssl` module (system OpenSSL, a TLS implementation this project did not configure) for
TLS 1.2-only, SNI and ALPN-mismatch peers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import time
from datetime import datetime, timezone

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from ztunnel_fast.errors import TlsError
from ztunnel_fast.identity.ca import IssuedCertificate, LocalCA, init_ca
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.tls import (
    check_server_identity,
    check_trust_domain,
    client_context,
    describe_ssl_error,
    handshake,
    peer_identities,
    server_context,
)
from ztunnel_fast.tls.verify import X509_VERIFY_ERRORS

TD = "cluster.local"
SERVER = Identity(TD, "default", "httpbin")
CLIENT = Identity(TD, "default", "sleep")
OTHER = Identity(TD, "default", "other")
FOREIGN = Identity("other.local", "default", "sleep")


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    """Three roots: `a` (cluster.local), `b` (other.local), `c` (a second cluster.local root)."""
    out = {}
    for name, td in (("a", TD), ("b", "other.local"), ("c", TD)):
        directory = tmp_path_factory.mktemp(f"ca-{name}")
        init_ca(directory, td)
        out[name] = LocalCA.load(directory)
    return out


@pytest.fixture(scope="module")
def server_cert(cas) -> IssuedCertificate:
    return cas["a"].issue(SERVER, 3600)


@pytest.fixture(scope="module")
def client_cert(cas) -> IssuedCertificate:
    return cas["a"].issue(CLIENT, 3600)


def run(coro, loop_factory=uvloop.new_event_loop):
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def both(server_coro, client_coro):
    return await asyncio.gather(server_coro, client_coro, return_exceptions=True)


async def send_all(conn: SSL.Connection, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[conn.send(view):]
        except SSL.WantWriteError:
            await _wait(loop, conn.fileno(), write=True)
        except SSL.WantReadError:
            await _wait(loop, conn.fileno(), write=False)


async def recv_exactly(conn: SSL.Connection, n: int, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(timeout):
        while len(out) < n:
            try:
                chunk = conn.recv(n - len(out))
            except SSL.WantReadError:
                await _wait(loop, conn.fileno(), write=False)
                continue
            if not chunk:
                raise EOFError
            out += chunk
    return bytes(out)


async def _wait(loop, fd: int, *, write: bool) -> None:
    fut = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        remove(fd)


def bare_client_context(root_pem: bytes, *, alpn: list[bytes] | None = (b"h2",)) -> SSL.Context:
    """A TLS 1.3 client that trusts `root_pem` but presents no certificate."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_verify(SSL.VERIFY_PEER)
    for root in x509.load_pem_x509_certificates(root_pem):
        ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(root))
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    return ctx


def write_cert_files(tmp_path, cert: IssuedCertificate) -> tuple[str, str, str]:
    chain, key, root = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "root.pem"
    chain.write_bytes(b"".join(cert.chain_pem))
    key.write_bytes(cert.key_pem)
    root.write_bytes(cert.root_pem)
    return str(chain), str(key), str(root)


def stdlib_client(sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str | None = None) -> ssl.SSLSocket:
    """Blocking stdlib TLS client (runs in an executor thread); returns the wrapped socket."""
    sock.setblocking(True)
    sock.settimeout(5)
    tls = ctx.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    tls.do_handshake()
    return tls


def stdlib_client_context(tmp_path, cert: IssuedCertificate | None, *, alpn=("h2",), tls12_only=False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=(cert.root_pem if cert else b"").decode() or None)
    if cert is not None:
        chain, key, _ = write_cert_files(tmp_path, cert)
        ctx.load_cert_chain(chain, key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if tls12_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def assert_fd_unregistered(fd: int) -> None:
    """Only on the stdlib loop: uvloop's remove_reader/remove_writer always return None."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, uvloop.Loop):
        return
    assert loop.remove_reader(fd) is False, "handshake left a reader registered"
    assert loop.remove_writer(fd) is False, "handshake left a writer registered"


def test_tests_run_on_uvloop():
    async def main():
        return asyncio.get_running_loop()

    assert isinstance(run(main()), uvloop.Loop)


# uvloop is the product's loop; the stdlib loop additionally lets us see leftover fd registrations.
LOOPS = pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop],
                                ids=["uvloop", "asyncio"])


# -- successful mutual TLS -----------------------------------------------------------------------


@LOOPS
def test_mutual_handshake_negotiates_tls13_h2_and_identities(loop_factory, server_cert, client_cert):
    async def main():
        s, c = socket_pair()
        with s, c:
            srv, cli = await both(
                handshake(s, server_context(server_cert, TD), server_side=True),
                handshake(c, client_context(client_cert), server_side=False),
            )
            assert isinstance(srv, SSL.Connection) and isinstance(cli, SSL.Connection), (srv, cli)
            assert srv.get_alpn_proto_negotiated() == b"h2" == cli.get_alpn_proto_negotiated()
            assert srv.get_protocol_version_name() == "TLSv1.3" == cli.get_protocol_version_name()
            assert peer_identities(srv) == [CLIENT]
            assert peer_identities(cli) == [SERVER]
            assert check_server_identity(cli, [OTHER, SERVER]) == SERVER
            assert check_trust_domain(srv, TD) == CLIENT
            assert srv.get_servername() is None  # the client never sends SNI
            assert cli.get_peer_certificate(as_cryptography=True).serial_number == server_cert.serial
            # leaf only on the wire: the root is not auto-chained from the trust store
            # (server side, OpenSSL's peer chain excludes the client's leaf: nothing else was sent)
            assert [c.serial_number for c in cli.get_peer_cert_chain(as_cryptography=True)] == [server_cert.serial]
            assert srv.get_peer_cert_chain(as_cryptography=True) == []
            assert_fd_unregistered(s.fileno())
            assert_fd_unregistered(c.fileno())
            # the returned connections carry application data both ways
            await send_all(cli, b"ping" * 1000)
            assert await recv_exactly(srv, 4000) == b"ping" * 1000
            await send_all(srv, b"pong")
            assert await recv_exactly(cli, 4) == b"pong"

    run(main(), loop_factory)


def test_contexts_disable_resumption_and_pin_tls13(server_cert, client_cert):
    for ctx in (server_context(server_cert, TD), client_context(client_cert)):
        options = ctx.set_options(0)  # returns the options in force
        assert options & SSL.OP_NO_TICKET
        assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF
    assert server_context(server_cert, TD).get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    assert client_context(client_cert).get_verify_mode() == SSL.VERIFY_PEER


def test_contexts_are_independent_of_later_certificates(cas, server_cert, client_cert):
    """A context built from one issuance keeps serving it (what lets renewal leave live conns alone)."""
    ctx = server_context(server_cert, TD)
    cas["a"].issue(SERVER, 3600)  # a renewal elsewhere changes nothing about ctx

    async def main():
        s, c = socket_pair()
        with s, c:
            srv, cli = await both(handshake(s, ctx, server_side=True),
                                  handshake(c, client_context(client_cert), server_side=False))
            assert cli.get_peer_certificate(as_cryptography=True).serial_number == server_cert.serial

    run(main())


# -- refusals ------------------------------------------------------------------------------------


@LOOPS
def test_client_without_certificate_is_refused(loop_factory, server_cert):
    async def main():
        s, c = socket_pair()
        with s, c:
            srv, cli = await both(
                handshake(s, server_context(server_cert, TD), server_side=True),
                handshake(c, bare_client_context(server_cert.root_pem), server_side=False),
            )
            assert isinstance(srv, TlsError)
            assert str(srv) == "tls handshake failed: peer did not return a certificate"
            assert_fd_unregistered(s.fileno())
            # TLS 1.3: the client finishes first and learns of the refusal on its first read
            if isinstance(cli, SSL.Connection):
                with pytest.raises(SSL.Error) as info:
                    await recv_exactly(cli, 1)
                assert describe_ssl_error(info.value) == "peer requires a client certificate"
            else:
                assert isinstance(cli, TlsError), cli

    run(main(), loop_factory)


def test_client_from_foreign_trust_domain_is_refused_by_the_trust_domain_check(cas, server_cert):
    """The server trusts both roots, so only the SPIFFE trust-domain rule can refuse the client."""
    bundle = cas["a"].root_pem + cas["b"].root_pem + cas["c"].root_pem
    server = dataclasses.replace(server_cert, root_pem=bundle)
    foreign = cas["b"].issue(FOREIGN, 3600)
    same_td_other_root = cas["c"].issue(CLIENT, 3600)

    async def attempt(client_cert):
        s, c = socket_pair()
        with s, c:
            return await both(
                handshake(s, server_context(server, TD), server_side=True),
                handshake(c, client_context(dataclasses.replace(client_cert, root_pem=server_cert.root_pem)),
                          server_side=False),
            )

    srv, _ = run(attempt(foreign))
    assert isinstance(srv, TlsError)
    assert str(srv) == (
        "tls handshake failed: client identity spiffe://other.local/ns/default/sa/sleep "
        "is not in trust domain cluster.local"
    )
    # control: a cluster.local client from another trusted root is accepted by the same server
    srv, cli = run(attempt(same_td_other_root))
    assert isinstance(srv, SSL.Connection), srv
    assert peer_identities(srv) == [CLIENT]


def test_client_from_untrusted_root_is_refused(cas, server_cert):
    stranger = cas["c"].issue(CLIENT, 3600)  # right trust domain, root the server does not trust

    async def main():
        s, c = socket_pair()
        with s, c:
            return await both(
                handshake(s, server_context(server_cert, TD), server_side=True),
                handshake(c, client_context(dataclasses.replace(stranger, root_pem=server_cert.root_pem)),
                          server_side=False),
            )

    srv, _ = run(main())
    assert isinstance(srv, TlsError)
    assert str(srv) == (
        "tls handshake failed: client certificate verify failed: unable to get local issuer certificate (depth 0)"
    )


def test_client_refuses_server_from_untrusted_root(cas, client_cert):
    impostor = cas["c"].issue(SERVER, 3600)

    async def main():
        s, c = socket_pair()
        with s, c:
            return await both(
                handshake(s, server_context(impostor, TD), server_side=True),
                handshake(c, client_context(client_cert), server_side=False),
            )

    srv, cli = run(main())
    assert isinstance(cli, TlsError)
    assert str(cli) == (
        "tls handshake failed: server certificate verify failed: unable to get local issuer certificate (depth 0)"
    )
    assert isinstance(srv, TlsError)
    assert "unknown ca" in str(srv)


def test_client_refuses_server_with_unexpected_identity(server_cert, client_cert):
    async def main():
        s, c = socket_pair()
        with s, c:
            srv, cli = await both(handshake(s, server_context(server_cert, TD), server_side=True),
                                  handshake(c, client_context(client_cert), server_side=False))
            with pytest.raises(TlsError) as info:
                check_server_identity(cli, [OTHER, FOREIGN])
            assert str(info.value) == (
                "server identity spiffe://cluster.local/ns/default/sa/httpbin not in expected "
                "[spiffe://cluster.local/ns/default/sa/other, spiffe://other.local/ns/default/sa/sleep]"
            )
            with pytest.raises(TlsError, match=r"not in expected \[\]"):
                check_server_identity(cli, [])

    run(main())


def test_tls12_only_client_is_refused(tmp_path, server_cert, client_cert):
    async def main():
        s, c = socket_pair()
        with s, c:
            loop = asyncio.get_running_loop()
            ctx = stdlib_client_context(tmp_path, client_cert, tls12_only=True)
            srv, cli = await both(
                handshake(s, server_context(server_cert, TD), server_side=True),
                loop.run_in_executor(None, stdlib_client, c, ctx),
            )
            assert isinstance(srv, TlsError)
            assert str(srv) == "tls handshake failed: unsupported protocol version"
            assert isinstance(cli, ssl.SSLError), cli

    run(main())


def test_stdlib_tls13_client_interoperates_and_sni_is_visible_when_sent(tmp_path, server_cert, client_cert):
    """Control for the no-SNI assertion: a client that does send SNI is seen by our server."""

    async def main():
        s, c = socket_pair()
        with s, c:
            loop = asyncio.get_running_loop()
            ctx = stdlib_client_context(tmp_path, client_cert)
            srv, cli = await both(
                handshake(s, server_context(server_cert, TD), server_side=True),
                loop.run_in_executor(None, stdlib_client, c, ctx, "sni.example"),
            )
            assert isinstance(srv, SSL.Connection), srv
            assert srv.get_servername() == b"sni.example"
            assert peer_identities(srv) == [CLIENT]
            assert cli.selected_alpn_protocol() == "h2"

    run(main())


@pytest.mark.parametrize("alpn, reason", [
    (["http/1.1"], "client offered ALPN [http/1.1], h2 required"),
    (None, "ALPN h2 not negotiated (got none)"),
])
def test_client_without_h2_is_refused(tmp_path, server_cert, client_cert, alpn, reason):
    async def main():
        s, c = socket_pair()
        with s, c:
            loop = asyncio.get_running_loop()
            ctx = stdlib_client_context(tmp_path, client_cert, alpn=alpn)
            srv, cli = await both(
                handshake(s, server_context(server_cert, TD), server_side=True),
                loop.run_in_executor(None, stdlib_client, c, ctx),
            )
            assert isinstance(srv, TlsError)
            assert str(srv) == f"tls handshake failed: {reason}"
            if alpn:  # a fatal no_application_protocol alert reached the client
                assert isinstance(cli, ssl.SSLError) and "no application protocol" in str(cli), cli

    run(main())


def test_client_refuses_server_that_does_not_select_h2(tmp_path, server_cert, client_cert):
    chain, key, _ = write_cert_files(tmp_path, server_cert)
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no ALPN configured, no client cert requested
    plain.load_cert_chain(chain, key)

    def stdlib_server(sock):
        sock.setblocking(True)
        sock.settimeout(5)
        tls = plain.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
        return tls

    async def main():
        s, c = socket_pair()
        with s, c:
            loop = asyncio.get_running_loop()
            srv, cli = await both(loop.run_in_executor(None, stdlib_server, s),
                                  handshake(c, client_context(client_cert), server_side=False))
            assert isinstance(cli, TlsError)
            assert str(cli) == "tls handshake failed: ALPN h2 not negotiated (got none)"

    run(main())


@LOOPS
def test_handshake_times_out_against_a_silent_peer(loop_factory, server_cert, client_cert):
    async def main():
        for ctx, server_side in ((server_context(server_cert, TD), True), (client_context(client_cert), False)):
            s, c = socket_pair()
            with s, c:
                start = time.monotonic()
                with pytest.raises(TlsError) as info:
                    await handshake(s, ctx, server_side=server_side, timeout=0.3)
                elapsed = time.monotonic() - start
                assert str(info.value) == "tls handshake failed: timed out after 0.3s"
                assert elapsed >= 0.25  # order: the handshake gave up only after its timeout
                assert_fd_unregistered(s.fileno())

    run(main(), loop_factory)


def test_peer_closing_mid_handshake_is_reported(server_cert):
    async def main():
        s, c = socket_pair()
        with s:
            c.close()
            with pytest.raises(TlsError, match="^tls handshake failed: connection closed by peer$"):
                await handshake(s, server_context(server_cert, TD), server_side=True, timeout=2)

    run(main())


def test_handshake_rejects_blocking_sockets(server_cert):
    async def main():
        s, c = socket.socketpair()
        with s, c:
            with pytest.raises(ValueError, match="non-blocking"):
                await handshake(s, server_context(server_cert, TD), server_side=True)

    run(main())


# -- verify.py on certificates (pure) ------------------------------------------------------------


def _custom_leaf(sans: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256())


def test_peer_identities_keeps_spiffe_uris_in_order():
    leaf = _custom_leaf([
        x509.UniformResourceIdentifier("https://example.com/not-spiffe"),
        x509.UniformResourceIdentifier(str(FOREIGN)),
        x509.DNSName("httpbin.default.svc"),
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default"),  # malformed: skipped
        x509.UniformResourceIdentifier(str(CLIENT)),
    ])
    assert peer_identities(leaf) == [FOREIGN, CLIENT]
    assert peer_identities(crypto.X509.from_cryptography(leaf)) == [FOREIGN, CLIENT]
    assert check_trust_domain(leaf, TD) == CLIENT  # any SAN in the trust domain will do
    assert check_trust_domain(leaf, "other.local") == FOREIGN
    with pytest.raises(TlsError, match="^client identity spiffe://other.local/.*, spiffe://cluster.local/.* "
                                       "is not in trust domain mesh.example$"):
        check_trust_domain(leaf, "mesh.example")


def test_certificates_without_spiffe_ids():
    for leaf in (_custom_leaf(None), _custom_leaf([x509.DNSName("a.example")])):
        assert peer_identities(leaf) == []
        with pytest.raises(TlsError, match="^client certificate has no SPIFFE URI SAN$"):
            check_trust_domain(leaf, TD)
    with pytest.raises(TypeError):
        peer_identities(b"not a certificate")


def test_verify_error_names_match_openssl():
    from OpenSSL._util import ffi, lib  # test-only peek at OpenSSL's own wording

    for code, name in X509_VERIFY_ERRORS.items():
        assert ffi.string(lib.X509_verify_cert_error_string(code)).decode().startswith(name), code


def test_describe_ssl_error_maps_openssl_reasons():
    assert describe_ssl_error(SSL.Error([("SSL routines", "", "unsupported protocol")])) == "unsupported protocol version"
    assert describe_ssl_error(SSL.Error([("SSL routines", "", "tlsv1 alert decode error")])) == "peer sent alert: decode error"
    assert describe_ssl_error(SSL.Error([("SSL routines", "", "something new")])) == "something new"
    assert describe_ssl_error(SSL.SysCallError(-1, "Unexpected EOF")) == "connection closed by peer"
    assert describe_ssl_error(SSL.SysCallError(104, "ECONNRESET")) == "connection reset by peer"
    assert describe_ssl_error(TlsError("x")) == "x"


def test_intermediates_are_sent_and_verified(tmp_path, client_cert):
    """istiod with a plugged-in CA issues leaf <- intermediate <- root: the chain must travel."""
    init_ca(tmp_path, TD)
    root = x509.load_pem_x509_certificate((tmp_path / "root-cert.pem").read_bytes())
    root_key = serialization.load_pem_private_key((tmp_path / "root-key.pem").read_bytes(), None)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_ski = x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key())
    intermediate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, TD),
                                 x509.NameAttribute(x509.NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.subject)
        .public_key(inter_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(root.not_valid_before_utc)
        .not_valid_after(root.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(inter_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    leaf = LocalCA(intermediate, inter_key).issue(SERVER, 3600)
    inter_pem = intermediate.public_bytes(serialization.Encoding.PEM)
    new_root_pem = root.public_bytes(serialization.Encoding.PEM)
    # the server trusts the client's root; the client trusts only the new root (no intermediate)
    server = dataclasses.replace(leaf, chain_pem=(leaf.chain_pem[0], inter_pem), root_pem=client_cert.root_pem)
    client = dataclasses.replace(client_cert, root_pem=new_root_pem)

    async def main():
        s, c = socket_pair()
        with s, c:
            return await both(handshake(s, server_context(server, TD), server_side=True),
                              handshake(c, client_context(client), server_side=False))

    srv, cli = run(main())
    assert isinstance(srv, SSL.Connection) and isinstance(cli, SSL.Connection), (srv, cli)
    chain = [c.subject for c in cli.get_peer_cert_chain(as_cryptography=True)]
    assert chain == [x509.Name([]), intermediate.subject]
    assert peer_identities(cli) == [SERVER]
