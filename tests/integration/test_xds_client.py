"""The xDS client against the fake istiod over real gRPC + TLS on loopback (no network namespaces).

The client applies into a real StateStore; assertions read the store's snapshots, the fake's
received requests and the client's metrics.
"""

from __future__ import annotations

import asyncio
from ipaddress import ip_address

from prometheus_client.parser import text_string_to_metric_families

from ztunnel_fast.config import IstiodEndpoint, parse_istiod_address
from ztunnel_fast.fakes.xds_server import FakeXdsServer, make_serving_tls
from ztunnel_fast.state.policy import Action, Authorization, Scope
from ztunnel_fast.state.service import NetworkAddress, Service
from ztunnel_fast.state.store import XDS_SOURCE, StateStore
from ztunnel_fast.state.workload import TunnelProtocol, Workload
from ztunnel_fast.telemetry.metrics import Metrics
from ztunnel_fast.xds.client import XdsClient
from ztunnel_fast.xds.convert import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ztunnel_fast.xds.delta import DeltaSession, build_node


def wl(uid, ip, **kw):
    return Workload(uid=uid, name=uid, namespace="demo", workload_ips=(ip_address(ip),),
                    protocol=TunnelProtocol.HBONE, **kw)


SVC = Service("echo", "demo", "echo.demo.svc.cluster.local", (NetworkAddress("", ip_address("10.96.0.1")),), {80: 8080})
DENY = Authorization("deny", "demo", Scope.NAMESPACE, Action.DENY)


class Harness:
    def __init__(self, tmp_path, *, tls=True, token="s3cr3t", headers=()):
        self.tls = make_serving_tls(tmp_path / "istiod-tls") if tls else None
        self.server = FakeXdsServer("127.0.0.1", 0, self.tls)
        self.store = StateStore()
        self.metrics = Metrics()
        self.synced = asyncio.Event()
        self.applied = 0
        self.token_file = tmp_path / "istio-token"
        self.token_file.write_text(token + "\n")
        self.headers = headers
        self.task = None

    async def start(self):
        await self.server.start()
        endpoint = IstiodEndpoint(
            address=parse_istiod_address("XDS_ADDRESS", self.server.address),
            root_ca=str(self.tls.root) if self.tls else "SYSTEM",
            # the certificate names istiod.istio-system.svc, we dial 127.0.0.1: ALT_XDS_HOSTNAME
            server_name="istiod.istio-system.svc" if self.tls else None,
            headers=self.headers,
        )
        node = build_node(instance_ip="10.1.0.5", pod_name="ztunnel-x1", pod_namespace="istio-system",
                          node_name="node1", proxy_metadata=(("CLUSTER_ID", "c9"), ("json:LABELS", '{"a": "b"}')))
        self.client = XdsClient(endpoint, DeltaSession(node), auth_token=str(self.token_file), cluster_id="c9",
                                apply=self.apply, metrics=self.metrics, on_synced=self.synced.set)
        self.task = asyncio.get_running_loop().create_task(self.client.run(), name="xds-client-test")

    def apply(self, upserts, removals):
        self.store.apply(XDS_SOURCE, upserts, removals)
        self.applied += 1

    @property
    def state(self):
        return self.store.state

    async def close(self):
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.server.stop(0)

    def metric(self, name, **labels):
        body, _ = self.metrics.exposition(None)
        total = 0.0
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_initial_sync_over_tls_with_token_clusterid_headers_node(tmp_path):
    async def body():
        h = Harness(tmp_path, headers=(("x-extra", "1"),))
        h.server.xds.set_state([wl("a", "10.0.0.1", services={SVC.key: {}})], [SVC], [DENY])
        try:
            await h.start()
            await asyncio.wait_for(h.synced.wait(), 10)
            st = h.state
            assert st.workload_by_ip("10.0.0.1").uid == "a"
            assert st.service_by_vip("10.96.0.1").key == SVC.key
            assert [p.key for p in st.policies()] == ["demo/deny"]
            await h.server.xds.wait(lambda: len(h.server.xds.acks()) == 2, what="two ACKs")
            first = h.server.xds.received[0]
            assert first.metadata["authorization"] == "Bearer s3cr3t"
            assert first.metadata["clusterid"] == "c9" and first.metadata["x-extra"] == "1"
            opening = [r.request for r in h.server.xds.received if not r.request.response_nonce]
            assert [r.type_url for r in opening] == [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL]
            for r in opening:
                assert r.node.id == "ztunnel~10.1.0.5~ztunnel-x1.istio-system~istio-system.svc.cluster.local"
                md = r.node.metadata.fields
                assert md["NAME"].string_value == "ztunnel-x1" and md["NODE_NAME"].string_value == "node1"
                assert md["CLUSTER_ID"].string_value == "c9"
                assert md["LABELS"].struct_value.fields["a"].string_value == "b"
                assert list(r.resource_names_subscribe) == []
            assert h.metric("istio_xds_message_total", url=ADDRESS_TYPE_URL) == 1
            assert h.metric("istio_xds_message_bytes_total", url=ADDRESS_TYPE_URL) > 0
        finally:
            await h.close()
    run(body())


def test_live_push_removal_nack_then_recovery(tmp_path):
    async def body():
        h = Harness(tmp_path)
        h.server.xds.set_state([wl("a", "10.0.0.1")], [], [])
        try:
            await h.start()
            await asyncio.wait_for(h.synced.wait(), 10)
            xds = h.server.xds
            xds.upsert(wl("b", "10.0.0.2"), DENY)
            await xds.wait(lambda: h.state.workload_by_ip("10.0.0.2") and h.state.policies(), what="push")
            xds.remove(ADDRESS_TYPE_URL, "a")
            await xds.wait(lambda: h.state.workload_by_uid("a") is None, what="removal")
            assert h.state.workload_by_ip("10.0.0.1") is None
            # a malformed resource next to a good one: NACK naming it, the good one applied
            acks_before = len(xds.acks(ADDRESS_TYPE_URL))
            xds.push_raw(ADDRESS_TYPE_URL, "junk", ADDRESS_TYPE_URL, b"\xff\xff")
            xds.upsert(Workload(uid="c", name="c", namespace="demo", workload_ips=(ip_address("10.0.0.3"),)))
            nack = await xds.wait(lambda: xds.nacks(), what="NACK")
            assert nack[0].request.error_detail.message.startswith("junk: cannot decode istio.workload.Address")
            await xds.wait(lambda: h.state.workload_by_uid("c"), what="good resource after NACK")
            await xds.wait(lambda: len(xds.acks(ADDRESS_TYPE_URL)) > acks_before, what="ACK after NACK")
            assert h.state.workload_by_uid("b") is not None  # earlier state intact
        finally:
            await h.close()
    run(body())


def test_reconnect_keeps_state_and_sends_initial_resource_versions(tmp_path):
    async def body():
        h = Harness(tmp_path)
        h.server.xds.set_state([wl("a", "10.0.0.1"), wl("b", "10.0.0.2")], [SVC], [DENY])
        try:
            await h.start()
            await asyncio.wait_for(h.synced.wait(), 10)
            xds = h.server.xds
            await xds.wait(lambda: len(xds.acks()) == 2, what="initial ACKs")
            # istiod goes away: the client keeps its state while it retries
            await h.server.stop(0)
            await xds.wait(lambda: h.metric("istio_xds_connection_terminations_total") >= 2, what="retries")
            assert h.state.workload_by_ip("10.0.0.1").uid == "a" and h.state.policies()
            # while it was down, b went away and d arrived
            xds.set_state([wl("a", "10.0.0.1"), wl("d", "10.0.0.4")], [SVC], [DENY])
            await h.server.start()
            await xds.wait(lambda: h.state.workload_by_uid("d") is not None, timeout=30, what="resync")
            # the two types resync on separate responses: wait for both before looking at either
            await xds.wait(lambda: all(h.metric("istio_xds_message_total", url=u) >= 2
                                       for u in (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)),
                           timeout=30, what="both resync responses")
            assert h.state.workload_by_uid("b") is None and h.state.workload_by_uid("a") is not None
            reopened = [r.request for r in xds.received if r.stream > 1 and not r.request.response_nonce]
            versions = {r.type_url: dict(r.initial_resource_versions) for r in reopened}
            assert versions[ADDRESS_TYPE_URL] == {"a": "", "b": "", SVC.key: ""}
            assert versions[AUTHORIZATION_TYPE_URL] == {"demo/deny": ""}
            # one resync response per type on the new stream, carrying the removal of b
            assert h.metric("istio_xds_message_total", url=ADDRESS_TYPE_URL) == 2
            assert h.metric("istio_xds_message_total", url=AUTHORIZATION_TYPE_URL) == 2
            assert h.metric("istio_xds_connection_terminations_total", reason="ConnectionError") >= 1
        finally:
            await h.close()
    run(body())


def test_dropped_stream_reconnects_and_plaintext_works(tmp_path):
    async def body():
        h = Harness(tmp_path, tls=False)
        h.server.xds.set_state([wl("a", "10.0.0.1")], [], [])
        try:
            await h.start()
            await asyncio.wait_for(h.synced.wait(), 10)
            xds = h.server.xds
            assert xds.drop_streams() == 1
            await xds.wait(lambda: xds.streams_opened >= 2 and len(xds.streams) == 1, what="second stream")
            xds.upsert(wl("z", "10.0.0.26"))
            await xds.wait(lambda: h.state.workload_by_uid("z"), what="push on the new stream")
            assert h.state.workload_by_uid("a") is not None
            assert h.metric("istio_xds_connection_terminations_total") >= 1
        finally:
            await h.close()
    run(body())


def test_wrong_root_is_a_connection_error_and_never_syncs(tmp_path):
    async def body():
        h = Harness(tmp_path)
        await h.server.start()
        other = make_serving_tls(tmp_path / "other")
        endpoint = IstiodEndpoint(parse_istiod_address("XDS_ADDRESS", h.server.address), root_ca=str(other.root),
                                  server_name="istiod.istio-system.svc")
        client = XdsClient(endpoint, DeltaSession(build_node(instance_ip="", pod_name="p", pod_namespace="n",
                                                             node_name="")),
                           auth_token="t", cluster_id="c", apply=h.apply, metrics=h.metrics, on_synced=h.synced.set)
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await h.server.xds.wait(lambda: h.metric("istio_xds_connection_terminations_total",
                                                     reason="ConnectionError") >= 3, what="failed attempts")
            assert not h.synced.is_set() and h.server.xds.received == []
            assert client.backoff.current > 0.01
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await h.server.stop(0)
    run(body())


def test_a_failing_apply_ends_the_stream_not_the_client(tmp_path):
    """A bug while applying is logged and the client reconnects; the process keeps its xDS."""
    async def body():
        h = Harness(tmp_path, tls=False)
        h.server.xds.set_state([wl("a", "10.0.0.1")], [], [])
        calls = []

        def flaky(upserts, removals):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            h.store.apply(XDS_SOURCE, upserts, removals)

        try:
            await h.start()
            h.client.apply = flaky
            await h.server.xds.wait(lambda: h.state.workload_by_uid("a"), what="applied on the second stream")
            assert h.metric("istio_xds_connection_terminations_total", reason="Error") == 1
            assert not h.task.done()
        finally:
            await h.close()
    run(body())
