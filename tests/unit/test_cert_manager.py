"""CertificateManager: caching, shared issuance, half-life renewal, backoff, config_dump snapshot.

Certificates come from a real LocalCA behind a small recording source (counts calls, can fail, can
hold an issuance open); renewal is observed on real TLS connections over socketpairs on uvloop.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import time
from datetime import datetime, timezone

import pytest
import uvloop
from cryptography import x509
from OpenSSL import SSL

from ztunnel_fast.errors import IdentityError
from ztunnel_fast.identity.ca import IssuedCertificate, LocalCA, init_ca
from ztunnel_fast.identity.manager import (
    INITIAL_BACKOFF,
    MAX_BACKOFF,
    MIN_REFRESH_DELAY,
    CertificateManager,
    WorkloadCertificate,
    backoff_delay,
)
from ztunnel_fast.identity.spiffe import Identity
from ztunnel_fast.tls import handshake, peer_identities

ALICE = Identity("cluster.local", "shop", "alice")
BOB = Identity("cluster.local", "shop", "bob")
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> LocalCA:
    directory = tmp_path_factory.mktemp("ca")
    init_ca(directory, "cluster.local")
    return LocalCA.load(directory)


class RecordingSource:
    """A CertificateSource over a real LocalCA that records calls and fails on request.

    `now` (epoch seconds, a callable) is the CA's clock; `fail` holds the number of upcoming calls
    that fail; with `gate` set, issue is a coroutine that waits for the gate (an async CA).
    """

    def __init__(self, ca: LocalCA, *, now=time.time, fail: int = 0, gate: asyncio.Event | None = None):
        self.ca, self.now, self.fail, self.gate = ca, now, fail, gate
        self.calls: list[tuple[Identity, float]] = []
        self.started = 0  # issue() entered (an async issuance may still be waiting at the gate)
        self.mismatch: Identity | None = None

    def issue(self, identity: Identity, ttl: float):
        self.started += 1
        if self.gate is not None:
            return self._issue_async(identity, ttl)
        return self._issue(identity, ttl)

    async def _issue_async(self, identity, ttl):
        await self.gate.wait()
        return self._issue(identity, ttl)

    def _issue(self, identity: Identity, ttl: float) -> IssuedCertificate:
        self.calls.append((identity, time.time()))
        if self.fail > 0:
            self.fail -= 1
            raise IdentityError("CA unreachable")
        at = datetime.fromtimestamp(self.now(), timezone.utc)
        return self.ca.issue(self.mismatch or identity, ttl, now=at)


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def wait_for(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def cert_manager_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("cert-manager "))


async def tls_pair(server: WorkloadCertificate, client: WorkloadCertificate):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    srv, cli = await asyncio.gather(
        handshake(a, server.server_context, server_side=True),
        handshake(b, client.client_context, server_side=False),
    )
    return (a, b), srv, cli


async def echo(sender: SSL.Connection, receiver: SSL.Connection, data: bytes) -> bytes:
    sender.sendall(data)  # small: fits the socket buffer
    loop = asyncio.get_running_loop()
    while True:
        try:
            return receiver.recv(65536)
        except SSL.WantReadError:
            fut = loop.create_future()
            loop.add_reader(receiver.fileno(), lambda: fut.done() or fut.set_result(None))
            try:
                await asyncio.wait_for(fut, 5)
            finally:
                loop.remove_reader(receiver.fileno())


# -- pure ------------------------------------------------------------------------------------------


def test_backoff_doubles_from_half_a_second_to_150s():
    assert [backoff_delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(9) == 128.0
    assert backoff_delay(10) == MAX_BACKOFF == 150.0
    assert backoff_delay(10_000) == 150.0
    assert INITIAL_BACKOFF == 0.5


# -- caching and sharing ---------------------------------------------------------------------------


def test_get_issues_once_and_caches(ca):
    async def main():
        source = RecordingSource(ca)
        manager = CertificateManager(source, ttl=3600)
        try:
            first = await manager.get(ALICE)
            again = await manager.get(ALICE)
            assert again is first
            assert [i for i, _ in source.calls] == [ALICE]
            assert manager.state(ALICE) == "Available"
            assert first.identity == ALICE and isinstance(first.server_context, SSL.Context)
            assert cert_manager_tasks() == [f"cert-manager {ALICE}"]
            bob = await manager.get(BOB)
            assert bob.serial != first.serial
            assert [i for i, _ in source.calls] == [ALICE, BOB]
        finally:
            await manager.close()

    run(main())


def test_concurrent_gets_share_one_issuance(ca):
    async def main():
        gate = asyncio.Event()
        source = RecordingSource(ca, gate=gate)
        manager = CertificateManager(source, ttl=3600)
        try:
            waiters = [asyncio.create_task(manager.get(ALICE)) for _ in range(20)]
            await asyncio.sleep(0.05)
            assert manager.state(ALICE) == "Initializing"
            assert manager.snapshot()[0]["state"] == "Initializing"
            assert not any(w.done() for w in waiters)
            gate.set()
            certs = await asyncio.gather(*waiters)
            assert len({id(c) for c in certs}) == 1
            assert len(source.calls) == 1
            assert manager.state(ALICE) == "Available"
        finally:
            await manager.close()

    run(main())


def test_a_cancelled_waiter_does_not_cancel_the_shared_issuance(ca):
    async def main():
        gate = asyncio.Event()
        source = RecordingSource(ca, gate=gate)
        manager = CertificateManager(source, ttl=3600)
        try:
            impatient = asyncio.create_task(manager.get(ALICE))
            patient = asyncio.create_task(manager.get(ALICE))
            await asyncio.sleep(0.02)
            impatient.cancel()
            gate.set()
            cert = await patient
            assert cert.identity == ALICE and len(source.calls) == 1
        finally:
            await manager.close()

    run(main())


def test_source_returning_another_identity_is_an_error(ca):
    async def main():
        source = RecordingSource(ca)
        source.mismatch = BOB
        manager = CertificateManager(source, ttl=3600)
        try:
            with pytest.raises(IdentityError, match=f"CA returned a certificate for {BOB}, asked for {ALICE}"):
                await manager.get(ALICE)
        finally:
            await manager.close()

    run(main())


# -- renewal ---------------------------------------------------------------------------------------


def test_renewal_at_half_life_keeps_live_connections(ca):
    """ttl 2 s: renewed about 1 s in; the old connection keeps working, new handshakes use the new cert."""

    async def main():
        source = RecordingSource(ca)
        manager = CertificateManager(source, ttl=2)
        try:
            old = await manager.get(ALICE)
            client = await manager.get(BOB)
            socks, srv, cli = await tls_pair(old, client)
            assert cli.get_peer_certificate(as_cryptography=True).serial_number == old.serial

            await wait_for(lambda: len([c for c in source.calls if c[0] == ALICE]) >= 2, timeout=3)
            renewed_at = [t for i, t in source.calls if i == ALICE][1]
            # not before the half-life (the 0.5 s floor may push it later, never earlier)
            assert renewed_at >= old.issued.refresh_at.timestamp() - 0.05
            new = await manager.get(ALICE)
            assert new.serial != old.serial and new is not old

            # the connection made with the old certificate still carries data both ways
            assert await echo(cli, srv, b"still here") == b"still here"
            assert await echo(srv, cli, b"me too") == b"me too"
            assert cli.get_peer_certificate(as_cryptography=True).serial_number == old.serial

            # a new handshake presents the new certificate
            client = await manager.get(BOB)
            socks2, srv2, cli2 = await tls_pair(new, client)
            assert cli2.get_peer_certificate(as_cryptography=True).serial_number == new.serial
            assert peer_identities(cli2) == [ALICE]
            for s in socks + socks2:
                s.close()
        finally:
            await manager.close()

    run(main())


def test_renewal_time_follows_the_injected_clock(ca):
    """The CA stamps certs at T; the manager's clock says T + 1799 s (past half-life of a 1 h cert):
    renewal is due at once, but not sooner than MIN_REFRESH_DELAY."""
    base = time.time()

    async def main():
        source = RecordingSource(ca, now=lambda: base)
        manager = CertificateManager(source, ttl=3600, clock=lambda: base + 1799)
        try:
            cert = await manager.get(ALICE)
            assert cert.issued.refresh_at.timestamp() == pytest.approx(base - 60 + 1830, abs=1)
            issued_at = source.calls[0][1]
            await wait_for(lambda: len(source.calls) >= 2, timeout=2)
            assert source.calls[1][1] - issued_at >= MIN_REFRESH_DELAY - 0.05
        finally:
            await manager.close()

    run(main())


def test_no_renewal_before_half_life(ca):
    base = time.time()

    async def main():
        source = RecordingSource(ca, now=lambda: base)
        manager = CertificateManager(source, ttl=3600, clock=lambda: base)  # half-life ~30 min away
        try:
            await manager.get(ALICE)
            await asyncio.sleep(1.0)
            assert len(source.calls) == 1
        finally:
            await manager.close()

    run(main())


def test_failed_renewal_keeps_the_old_cert_until_it_expires(ca):
    base = time.time()
    clock = {"now": base + 1799}  # renewal due at once (see above)

    async def main():
        source = RecordingSource(ca, now=lambda: base)
        manager = CertificateManager(source, ttl=3600, clock=lambda: clock["now"])
        try:
            cert = await manager.get(ALICE)
            source.fail = 1_000
            await wait_for(lambda: len(source.calls) >= 3, timeout=3)  # renewal + one retry failed
            assert manager.state(ALICE) == "Available"
            assert (await manager.get(ALICE)) is cert
            assert manager.snapshot()[0]["certChain"][0]["serialNumber"] == str(cert.serial)

            clock["now"] = base + 3601  # the old certificate has expired
            assert manager.state(ALICE) == "Unavailable: CA unreachable"
            with pytest.raises(IdentityError, match="Unavailable: CA unreachable"):
                await manager.get(ALICE)
        finally:
            await manager.close()

    run(main())


def test_failing_source_backs_off_then_recovers(ca):
    async def main():
        source = RecordingSource(ca, fail=2)
        manager = CertificateManager(source, ttl=3600, rand=lambda: 0.5)  # no jitter: the base delays
        try:
            with pytest.raises(IdentityError, match=f"no certificate for {ALICE}: Unavailable: CA unreachable"):
                await manager.get(ALICE)
            assert manager.snapshot()[0]["state"] == "Unavailable: CA unreachable"
            assert manager.snapshot()[0]["certChain"] == []
            # fail fast while backing off: the second get() fails before the retry is attempted
            with pytest.raises(IdentityError, match="Unavailable"):
                await manager.get(ALICE)
            assert len(source.calls) == 1

            await wait_for(lambda: manager.state(ALICE) == "Available", timeout=4)
            times = [t for _, t in source.calls]
            assert len(times) == 3
            gaps = [b - a for a, b in zip(times, times[1:])]
            # Order, not speed: each retry comes only after its backoff (0.5 s, then 1 s), which
            # grows; how late a loaded machine runs it does not matter.
            assert (backoff_delay(1), backoff_delay(2)) == (0.5, 1.0)
            assert gaps[0] >= backoff_delay(1) - 0.05 and gaps[1] >= backoff_delay(2) - 0.05, gaps
            assert (await manager.get(ALICE)).identity == ALICE
        finally:
            await manager.close()

    run(main())


def test_get_during_a_retry_waits_for_that_attempt(ca):
    async def main():
        gate = asyncio.Event()
        gate.set()
        source = RecordingSource(ca, fail=1, gate=gate)
        manager = CertificateManager(source, ttl=3600)
        try:
            with pytest.raises(IdentityError, match="Unavailable"):
                await manager.get(ALICE)
            gate.clear()  # the retry (after 0.5 s) will hang at the CA until we let it through
            await wait_for(lambda: source.started == 2, timeout=2)
            waiter = asyncio.create_task(manager.get(ALICE))
            await asyncio.sleep(0.05)
            assert not waiter.done()  # an attempt is in flight: wait for it rather than fail
            gate.set()
            cert = await asyncio.wait_for(waiter, 1)
            assert cert.identity == ALICE and source.started == 2
        finally:
            await manager.close()

    run(main())


# -- lifecycle and snapshot ------------------------------------------------------------------------


def test_forget_and_close_cancel_timers(ca):
    async def main():
        source = RecordingSource(ca)
        manager = CertificateManager(source, ttl=3600)
        await manager.get(ALICE)
        await manager.get(BOB)
        assert cert_manager_tasks() == [f"cert-manager {ALICE}", f"cert-manager {BOB}"]
        manager.forget(ALICE)
        manager.forget(ALICE)  # idempotent
        await asyncio.sleep(0)
        assert cert_manager_tasks() == [f"cert-manager {BOB}"]
        assert [e["identity"] for e in manager.snapshot()] == [str(BOB)]
        await manager.get(ALICE)  # managed again: issued afresh
        assert [i for i, _ in source.calls] == [ALICE, BOB, ALICE]
        await manager.close()
        assert cert_manager_tasks() == []
        assert manager.snapshot() == []
        with pytest.raises(IdentityError, match="closed"):
            await manager.get(ALICE)

    run(main())


def test_forget_releases_waiters(ca):
    async def main():
        gate = asyncio.Event()
        manager = CertificateManager(RecordingSource(ca, gate=gate), ttl=3600)
        waiter = asyncio.create_task(manager.get(ALICE))
        await asyncio.sleep(0.02)
        manager.forget(ALICE)
        with pytest.raises(IdentityError, match="forgotten"):
            await asyncio.wait_for(waiter, 1)
        await manager.close()

    run(main())


def test_snapshot_shape(ca):
    async def main():
        manager = CertificateManager(RecordingSource(ca), ttl=3600)
        try:
            bob = await manager.get(BOB)
            alice = await manager.get(ALICE)
            snap = manager.snapshot()
        finally:
            await manager.close()
        assert [e["identity"] for e in snap] == [str(ALICE), str(BOB)]  # sorted
        for entry, cert in zip(snap, (alice, bob)):
            assert set(entry) == {"identity", "state", "certChain", "rootCerts"}
            assert entry["state"] == "Available"
            assert len(entry["certChain"]) == 1 and len(entry["rootCerts"]) == 1
            leaf = entry["certChain"][0]
            assert set(leaf) == {"pem", "serialNumber", "validFrom", "expirationTime"}
            assert base64.b64decode(leaf["pem"]) == cert.issued.chain_pem[0]  # base64 of the PEM, as ztunnel
            assert leaf["serialNumber"] == str(cert.serial)  # decimal, as ztunnel and istioctl
            assert int(leaf["serialNumber"], 10) == x509.load_pem_x509_certificate(base64.b64decode(leaf["pem"])).serial_number
            assert RFC3339_Z.match(leaf["validFrom"]) and RFC3339_Z.match(leaf["expirationTime"])
            assert leaf["validFrom"] == cert.issued.not_before.strftime("%Y-%m-%dT%H:%M:%SZ")
            assert leaf["expirationTime"] == cert.issued.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
            assert base64.b64decode(entry["rootCerts"][0]["pem"]) == ca.root_pem
            assert RFC3339_Z.match(entry["rootCerts"][0]["expirationTime"])

    run(main())
