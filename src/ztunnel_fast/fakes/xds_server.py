"""A test double of istiod's xDS side: delta ADS over real gRPC (TLS or plaintext).

Role: tests and the demo point ztunnel-fast's XDS_ADDRESS here.  It serves
`DeltaAggregatedResources` with Envoy's messages (xds-protos) carrying Istio's
`istio.workload.Address` and `istio.security.Authorization` (protos/), from resources a test sets
directly or from a file in the local-config YAML shape (the same file a LOCAL_XDS_PATH run reads).
A test can push changes and removals, send malformed resources, drop streams, restart, and read
every request it received (node, metadata, ACK/NACK, initial_resource_versions).

Invariants (what istiod does and so does this double):
- Resource names are istiod's: workload uid, "<namespace>/<hostname>", "<namespace>/<name>";
  versions are content hashes, so an unchanged resource keeps its version across restarts.
- The first request of a type on a stream gets one response with everything the client lacks
  (versions differing from its initial_resource_versions) and removals for names it announced
  that no longer exist; later changes go to every subscribed stream as deltas.
- Every response carries a fresh nonce; requests with a response_nonce are ACKs, or NACKs when
  error_detail is set.  Nothing here interprets a NACK (istiod only logs it).
- Only loopback or a test-made network namespace is ever listened on (the caller chooses).

Not a product path: `python -m ztunnel_fast.fakes.xds_server` runs it standalone (e2e, demo),
logging each request as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import itertools
import json
import logging
import sys
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Callable

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

from ..state.policy import Authorization
from ..state.service import Service
from ..state.workload import Workload
from ..xds.convert import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    authorization_to_proto,
    service_to_proto,
    workload_to_proto,
)
from ..xds.local import LocalConfig, parse_local_config

log = logging.getLogger(__name__)

ISTIOD_NAME = "istiod.istio-system.svc"  # the name ztunnel verifies (XDS_ADDRESS host)
TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)
CONFIG_POLL_INTERVAL = 0.1  # seconds between checks of the watched config file
WAIT_STEP = 0.01  # seconds between checks in `wait`


# --- TLS for the double ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingTls:
    root: Path  # give to ztunnel-fast as XDS_ROOT_CA
    cert: Path
    key: Path


def make_serving_tls(directory: Path, names: tuple[str, ...] = (ISTIOD_NAME,), days: int = 2) -> ServingTls:
    """A test root and a serving certificate for `names` (DNS SANs; IPs become IP SANs)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fake istiod test root")])
    root = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(root_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    files = ServingTls(directory / "root-cert.pem", directory / "istiod.pem", directory / "istiod-key.pem")
    files.root.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


# --- what was received ----------------------------------------------------------------------------


@dataclass
class Received:
    """One DeltaDiscoveryRequest as the double saw it."""

    stream: int
    request: discovery_pb2.DeltaDiscoveryRequest
    metadata: dict[str, str]

    @property
    def is_ack(self) -> bool:
        return bool(self.request.response_nonce) and not self.request.HasField("error_detail")

    @property
    def is_nack(self) -> bool:
        return bool(self.request.response_nonce) and self.request.HasField("error_detail")

    def as_json(self) -> dict:
        r = self.request
        return {
            "event": "request", "stream": self.stream, "typeUrl": r.type_url, "nonce": r.response_nonce,
            "nack": r.error_detail.message if r.HasField("error_detail") else None,
            "node": json_format.MessageToDict(r.node) if r.HasField("node") else None,
            "initialResourceVersions": dict(r.initial_resource_versions),
            "subscribe": list(r.resource_names_subscribe), "metadata": self.metadata,
        }


@dataclass
class _Stream:
    id: int
    metadata: dict[str, str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    subscribed: set[str] = field(default_factory=set)


_DROP = object()


def _packed(msg) -> tuple[str, any_pb2.Any]:
    a = any_pb2.Any()
    a.Pack(msg)
    return hashlib.sha256(a.value).hexdigest()[:16], a


def _models_to_resources(workloads, services, policies) -> dict[str, dict[str, tuple[str, any_pb2.Any]]]:
    out: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {t: {} for t in TYPE_URLS}
    for w in workloads:
        out[ADDRESS_TYPE_URL][w.uid] = _packed(workload_to_proto(w))
    for s in services:
        out[ADDRESS_TYPE_URL][s.key] = _packed(service_to_proto(s))
    for p in policies:
        out[AUTHORIZATION_TYPE_URL][p.key] = _packed(authorization_to_proto(p))
    return out


class FakeXds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """The servicer plus the control surface tests use."""

    def __init__(self, on_request: Callable[[Received], None] | None = None):
        # type URL -> name -> (version, Any)
        self.resources: dict[str, dict[str, tuple[str, any_pb2.Any]]] = {t: {} for t in TYPE_URLS}
        self.received: list[Received] = []
        self.streams: dict[int, _Stream] = {}
        self.streams_opened = 0
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._on_request = on_request

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve this double on `server` (its own FakeXdsServer, or one shared with the CA:
        fakes/istiod.py)."""
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    # -- control surface ---------------------------------------------------------------------------
    def set_state(self, workloads=(), services=(), policies=()) -> None:
        """Make the served set exactly these models; connected clients get the difference."""
        new = _models_to_resources(workloads, services, policies)
        for type_url in TYPE_URLS:
            old = self.resources[type_url]
            changed = {n: v for n, v in new[type_url].items() if old.get(n, (None,))[0] != v[0]}
            removed = [n for n in old if n not in new[type_url]]
            self.resources[type_url] = new[type_url]
            if changed or removed:
                self._broadcast(type_url, changed, removed)

    def set_local_config(self, config: LocalConfig) -> None:
        self.set_state(config.workloads, config.services, config.policies)

    def upsert(self, *objs: Workload | Service | Authorization) -> None:
        """Add or change resources (and push them)."""
        pushes: dict[str, dict] = {t: {} for t in TYPE_URLS}
        for obj in objs:
            if isinstance(obj, Workload):
                pushes[ADDRESS_TYPE_URL][obj.uid] = _packed(workload_to_proto(obj))
            elif isinstance(obj, Service):
                pushes[ADDRESS_TYPE_URL][obj.key] = _packed(service_to_proto(obj))
            else:
                pushes[AUTHORIZATION_TYPE_URL][obj.key] = _packed(authorization_to_proto(obj))
        for type_url, changed in pushes.items():
            if changed:
                self.resources[type_url].update(changed)
                self._broadcast(type_url, changed, [])

    def remove(self, type_url: str, *names: str) -> None:
        for name in names:
            self.resources[type_url].pop(name, None)
        self._broadcast(type_url, {}, list(names))

    def push_raw(self, type_url: str, name: str, any_type_url: str, value: bytes, version: str = "raw") -> None:
        """Send one resource with arbitrary bytes (a malformed resource); not kept in the served set."""
        self._broadcast(type_url, {name: (version, any_pb2.Any(type_url=any_type_url, value=value))}, [])

    def drop_streams(self) -> int:
        """End every open stream with UNAVAILABLE (as a broken connection would)."""
        for s in self.streams.values():
            s.queue.put_nowait(_DROP)
        return len(self.streams)

    def nacks(self) -> list[Received]:
        return [r for r in self.received if r.is_nack]

    def acks(self, type_url: str | None = None) -> list[Received]:
        return [r for r in self.received if r.is_ack and (type_url is None or r.request.type_url == type_url)]

    async def wait(self, predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
        for _ in range(int(timeout / WAIT_STEP)):
            value = predicate()
            if value:
                return value
            await asyncio.sleep(WAIT_STEP)
        raise TimeoutError(f"fake xDS: timed out waiting for {what}")

    # -- the gRPC method ---------------------------------------------------------------------------
    async def DeltaAggregatedResources(self, request_iterator, context):  # noqa: N802 - gRPC's name
        stream = _Stream(next(self._ids), {k: v for k, v in context.invocation_metadata()})
        self.streams[stream.id] = stream
        self.streams_opened += 1
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, stream),
                                                        name=f"fake-xds-read-{stream.id}")
        try:
            while True:
                item = await stream.queue.get()
                if item is _DROP:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "stream dropped by the fake istiod")
                if isinstance(item, BaseException):
                    return
                yield item
        finally:
            reader.cancel()
            self.streams.pop(stream.id, None)

    async def _read(self, request_iterator, stream: _Stream) -> None:
        try:
            async for request in request_iterator:
                received = Received(stream.id, request, stream.metadata)
                self.received.append(received)
                if self._on_request is not None:
                    self._on_request(received)
                type_url = request.type_url
                if not request.response_nonce and type_url not in stream.subscribed:
                    stream.subscribed.add(type_url)
                    self._initial(stream, request)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            stream.queue.put_nowait(EOFError())

    def _initial(self, stream: _Stream, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        served = self.resources.get(request.type_url, {})
        known = dict(request.initial_resource_versions)
        changed = {n: v for n, v in served.items() if known.get(n) != v[0]}
        removed = [n for n in known if n not in served]
        stream.queue.put_nowait(self._response(request.type_url, changed, removed))

    def _response(self, type_url: str, changed: dict, removed: list[str]) -> discovery_pb2.DeltaDiscoveryResponse:
        return discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url,
            nonce=str(next(self._nonces)),
            resources=[discovery_pb2.Resource(name=n, version=v, resource=a) for n, (v, a) in changed.items()],
            removed_resources=removed,
        )

    def _broadcast(self, type_url: str, changed: dict, removed: list[str]) -> None:
        for s in self.streams.values():
            if type_url in s.subscribed:
                s.queue.put_nowait(self._response(type_url, changed, removed))


class FakeXdsServer:
    """A grpc.aio server around FakeXds: `await start()`, `await stop()`; restartable on one port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ServingTls | None = None,
                 xds: FakeXds | None = None):
        self.host = host
        self.port = port
        self.tls = tls
        self.xds = xds or FakeXds()
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        """What XDS_ADDRESS should say (https for TLS, http for plaintext)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server()
        self.xds.add_to(server)
        target = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.tls is None:
            port = server.add_insecure_port(target)
        else:
            creds = grpc.ssl_server_credentials([(self.tls.key.read_bytes(), self.tls.cert.read_bytes())])
            port = server.add_secure_port(target, creds)
        if not port:
            raise OSError(f"fake xDS: cannot listen on {target}")
        await server.start()
        self.port = port
        self._server = server
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (open streams end); the served resources stay for a restart."""
        if self._server is not None:
            self.xds.drop_streams()
            await self._server.stop(grace)
            self._server = None


# --- standalone (e2e and demo) --------------------------------------------------------------------


# Keys of the config file that are the doubles' knobs, not local config: `malformed` (below) and
# `callers` (the CA's bearer tokens, read by fakes/istiod.py).
DOUBLE_KEYS = ("malformed", "callers")


def load_config_file(path: Path) -> tuple[LocalConfig, list[dict], dict]:
    """The local-config YAML plus an optional `malformed` list for tests:
    [{typeUrl, name, anyTypeUrl, hex}], sent once each time the file changes.  The third value
    holds the doubles' keys (DOUBLE_KEYS) as found."""
    document = yaml.safe_load(path.read_text()) or {}
    knobs = {k: document.pop(k) for k in DOUBLE_KEYS if k in document}
    malformed = knobs.get("malformed") or []
    return parse_local_config(yaml.safe_dump(document), f"fake istiod config {path}"), malformed, knobs


async def serve_file(path: Path, xds: FakeXds, stop: asyncio.Event,
                     on_knobs: Callable[[dict], None] | None = None) -> None:
    """Serve `path` and push its changes (checked every CONFIG_POLL_INTERVAL) until `stop`.
    `on_knobs` gets the doubles' keys of each version before the "config" line is printed (so a
    reader of that line knows every side is current)."""
    last = None
    while not stop.is_set():
        try:
            stamp = path.stat().st_mtime_ns, path.stat().st_size
        except OSError:
            stamp = None
        if stamp != last and stamp is not None:
            last = stamp
            try:
                config, malformed, knobs = load_config_file(path)
                if on_knobs is not None:
                    on_knobs(knobs)
            except Exception as exc:  # noqa: BLE001 - a test's bad file is reported, not fatal
                print(json.dumps({"event": "config-error", "error": str(exc)}), flush=True)
            else:
                xds.set_local_config(config)
                for m in malformed:
                    xds.push_raw(m["typeUrl"], m["name"], m.get("anyTypeUrl", m["typeUrl"]),
                                        bytes.fromhex(m.get("hex", "")))
                print(json.dumps({"event": "config", "workloads": len(config.workloads),
                                  "services": len(config.services), "policies": len(config.policies),
                                  "malformed": len(malformed)}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), CONFIG_POLL_INTERVAL)
        except asyncio.TimeoutError:
            pass


async def _main(args: argparse.Namespace) -> int:
    import signal

    tls = None
    if not args.plaintext:
        tls = ServingTls(Path(args.tls_dir) / "root-cert.pem", Path(args.tls_dir) / "istiod.pem",
                         Path(args.tls_dir) / "istiod-key.pem")
    host, _, port = args.listen.rpartition(":")
    server = FakeXdsServer(host.strip("[]"), int(port), tls,
                           FakeXds(on_request=lambda r: print(json.dumps(r.as_json()), flush=True)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(json.dumps({"event": "listening", "address": server.address}), flush=True)
    try:
        await serve_file(Path(args.config), server.xds, stop)
    finally:
        await server.stop(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel_fast.fakes.xds_server",
                                     description="A fake istiod xDS server fed from a local-config YAML file.")
    parser.add_argument("--config", required=True, help="local-config YAML (re-read when it changes)")
    parser.add_argument("--listen", default="127.0.0.1:15012", help="host:port")
    parser.add_argument("--tls-dir", help="directory with root-cert.pem, istiod.pem, istiod-key.pem "
                                          "(see make_serving_tls)")
    parser.add_argument("--plaintext", action="store_true", help="serve without TLS (http://)")
    args = parser.parse_args(argv)
    if not args.plaintext and not args.tls_dir:
        parser.error("--tls-dir is required unless --plaintext")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
