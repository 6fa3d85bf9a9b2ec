"""A test double of istiod's CA: `IstioCertificateService/CreateCertificate` over real gRPC + TLS.

Role: tests and the demo run ztunnel-fast against it the way a cluster runs ztunnel against
istiod (port 15012, TLS with a serving certificate for `istiod.istio-system.svc`, bearer token,
`clusterid`).  It speaks the same protos (protos/ca.proto) and applies istiod's rules as the
reference describes them:
- the `authorization: Bearer <token>` must be one of the configured callers' tokens and
  `clusterid` the configured cluster, else UNAUTHENTICATED "request authenticate failure";
- without `ImpersonatedIdentity` the certificate is for the caller's own service account;
- with it, the caller's service account must be a trusted node account (istio-system/ztunnel)
  and the requested identity one of the pods "on its node" (the caller's allow-list), else
  UNAUTHENTICATED "request impersonation authentication failure";
- the CSR is signed by an intermediate, and the response is [leaf, intermediate, root bundle]
  where the bundle holds two roots (the signing root and a second one), so clients must not
  split the bundle into the chain.
It records every request and can be told to fail the next N calls, to sign another SAN than asked,
or to answer garbage.

`FakePki` keeps its keys and certificates in a directory (created once, reloaded afterwards), so a
restarted server (an istiod outage) keeps issuing under the same roots; `root-cert.pem` there is
the trust bundle a pod mounts as CA_ROOT_CA.

Run standalone (e.g. in a network namespace): `python -m ztunnel_fast.fakes.ca_server --pki DIR
--listen 0.0.0.0:15012 --caller TOKEN,istio-system/ztunnel,spiffe://...` ; it prints
"fake istiod CA listening on <host:port>" when it accepts calls and appends one JSON line per
request to --record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..protos import ca_pb2, ca_pb2_grpc

ISTIOD_NAME = "istiod.istio-system.svc"  # the serving name ztunnel checks (ALT_CA_HOSTNAME)
TRUSTED_NODE_ACCOUNTS = ("istio-system/ztunnel",)  # istiod's CA_TRUSTED_NODE_ACCOUNTS default
DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_TTL = 86_400  # seconds, istiod's default workload certificate lifetime
MAX_TTL = 90 * 86_400  # seconds, istiod's MaxWorkloadCertTTL default
BACKDATE = timedelta(minutes=2)  # istiod's ClockSkewGracePeriod
AUTHENTICATE_FAILURE = "request authenticate failure"
IMPERSONATION_FAILURE = "request impersonation authentication failure"


def _name(org: str, cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_cert(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, days: int) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class FakePki:
    """The fake istiod's authority: root, a second root (bundle), intermediate, serving cert."""

    directory: Path
    trust_domain: str
    root: x509.Certificate
    other_root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    serving_chain_pem: bytes
    serving_key_pem: bytes

    FILES = ("root-cert.pem", "ca-cert.pem", "ca-key.pem", "istiod-chain.pem", "istiod-key.pem")

    @classmethod
    def create(cls, directory: Path, trust_domain: str = "cluster.local",
               server_names: tuple[str, ...] = (ISTIOD_NAME,)) -> "FakePki":
        """Load the authority from `directory`, creating it first when absent."""
        directory = Path(directory)
        if not all((directory / f).exists() for f in cls.FILES):
            cls._generate(directory, trust_domain, server_names)
        return cls._load(directory, trust_domain)

    @staticmethod
    def _generate(directory: Path, trust_domain: str, server_names: tuple[str, ...]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        root_key, other_key, int_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
        root_name = _name(trust_domain, "fake istiod root")
        other_name = _name(trust_domain, "fake istiod second root")
        root = _ca_cert(root_name, root_key, root_name, root_key, days=3650)
        other = _ca_cert(other_name, other_key, other_name, other_key, days=3650)
        inter_name = _name(trust_domain, "fake istiod intermediate")
        inter = _ca_cert(inter_name, int_key, root_name, root_key, days=365)
        now = datetime.now(timezone.utc)
        serving = (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(inter_name)
            .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in server_names]), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(int_key.public_key()), critical=False)
            .sign(int_key, hashes.SHA256())
        )
        # The bundle's first root signs; the second is there so clients keep the bundle whole.
        (directory / "root-cert.pem").write_bytes(_pem(root) + _pem(other))
        (directory / "ca-cert.pem").write_bytes(_pem(inter))
        key_path = directory / "ca-key.pem"
        key_path.write_bytes(_key_pem(int_key))
        key_path.chmod(0o600)
        (directory / "istiod-chain.pem").write_bytes(_pem(serving) + _pem(inter))
        (directory / "istiod-key.pem").write_bytes(_key_pem(srv_key))
        (directory / "istiod-key.pem").chmod(0o600)

    @classmethod
    def _load(cls, directory: Path, trust_domain: str) -> "FakePki":
        roots = x509.load_pem_x509_certificates((directory / "root-cert.pem").read_bytes())
        return cls(
            directory=directory, trust_domain=trust_domain, root=roots[0], other_root=roots[1],
            intermediate=x509.load_pem_x509_certificate((directory / "ca-cert.pem").read_bytes()),
            intermediate_key=serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None),
            serving_chain_pem=(directory / "istiod-chain.pem").read_bytes(),
            serving_key_pem=(directory / "istiod-key.pem").read_bytes(),
        )

    @property
    def root_path(self) -> Path:
        """The trust bundle file (what CA_ROOT_CA points at)."""
        return self.directory / "root-cert.pem"

    @property
    def root_bundle_pem(self) -> bytes:
        return _pem(self.root) + _pem(self.other_root)

    def sign(self, public_key, san: str, ttl: int) -> x509.Certificate:
        """A workload leaf for `san`, signed by the intermediate, shaped as istiod issues it."""
        now = datetime.now(timezone.utc).replace(microsecond=0)
        return (
            x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.intermediate.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - min(BACKDATE, timedelta(seconds=ttl // 10)))
            .not_valid_after(now + timedelta(seconds=ttl))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.intermediate_key.public_key()),
                           critical=False)
            .sign(self.intermediate_key, hashes.SHA256())
        )


@dataclass(frozen=True)
class Caller:
    """Who a bearer token belongs to: a service account ("ns/sa") and, for a node proxy, the
    identities of the pods on its node (what it may impersonate)."""

    service_account: str
    node_identities: frozenset[str] = frozenset()


@dataclass
class RecordedRequest:
    """One CreateCertificate call as the fake saw it."""

    metadata: dict[str, str]  # gRPC metadata (lower-case keys)
    csr_sans: list[str]  # URI SANs of the CSR
    csr_key: str  # "EC secp256r1" etc.
    validity_duration: int
    impersonated: str | None  # the ImpersonatedIdentity metadata value, when sent
    status: str = "OK"  # the status code name answered
    issued: str | None = None  # the SAN put in the leaf


@dataclass
class FakeCA(ca_pb2_grpc.IstioCertificateServiceServicer):
    """The servicer; fields are the knobs tests turn."""

    pki: FakePki
    callers: dict[str, Caller] = field(default_factory=dict)  # bearer token -> caller
    cluster_id: str = DEFAULT_CLUSTER_ID
    trusted_node_accounts: tuple[str, ...] = TRUSTED_NODE_ACCOUNTS
    fail_next: int = 0  # fail this many upcoming calls with `fail_code`
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    wrong_san: str | None = None  # sign this SAN instead of the one asked for
    garbage: bool = False  # answer cert_chain elements that are not certificates
    record_path: Path | None = None  # append each RecordedRequest as a JSON line
    requests: list[RecordedRequest] = field(default_factory=list)

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve this CA on `server` (its own FakeCaServer, or one shared with the xDS side:
        fakes/istiod.py)."""
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self, server)

    async def CreateCertificate(self, request, context):  # noqa: N802 - gRPC method name
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        impersonated = None
        if request.HasField("metadata") and "ImpersonatedIdentity" in request.metadata.fields:
            impersonated = request.metadata["ImpersonatedIdentity"]
        rec = RecordedRequest(metadata, [], "", request.validity_duration, impersonated)
        self.requests.append(rec)
        try:
            chain = self._answer(request, metadata, impersonated, rec)
        except _Refused as refused:
            rec.status = refused.code.name
            self._record(rec)
            await context.abort(refused.code, refused.message)
        self._record(rec)
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    def _answer(self, request, metadata, impersonated, rec: RecordedRequest) -> list[str]:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise _Refused(self.fail_code, "injected failure")
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
        except ValueError:
            csr = None
        if csr is not None:
            try:
                rec.csr_sans = csr.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
            except x509.ExtensionNotFound:
                rec.csr_sans = []
            key = csr.public_key()
            rec.csr_key = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__

        # istiod's order: authenticate the caller, authorize impersonation, then look at the CSR.
        auth = metadata.get("authorization", "")
        caller = self.callers.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None
        if caller is None or metadata.get("clusterid") != self.cluster_id:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, AUTHENTICATE_FAILURE)
        if impersonated is not None:
            if caller.service_account not in self.trusted_node_accounts or impersonated not in caller.node_identities:
                raise _Refused(grpc.StatusCode.UNAUTHENTICATED, IMPERSONATION_FAILURE)
            identity = impersonated
        else:
            ns, sa = caller.service_account.split("/", 1)
            identity = f"spiffe://{self.pki.trust_domain}/ns/{ns}/sa/{sa}"
        if csr is None:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "CSR parsing error")
        if not csr.is_signature_valid:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "CSR signature is invalid")
        ttl = request.validity_duration or DEFAULT_TTL
        if ttl < 0:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"requested TTL {ttl} is negative")
        if self.garbage:
            return ["-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
                    "garbage", "more garbage"]
        rec.issued = self.wrong_san or identity
        leaf = self.pki.sign(key, rec.issued, min(ttl, MAX_TTL))
        return [_pem(leaf).decode(), _pem(self.pki.intermediate).decode(), self.pki.root_bundle_pem.decode()]

    def _record(self, rec: RecordedRequest) -> None:
        if self.record_path is not None:
            with open(self.record_path, "a") as out:
                out.write(json.dumps(asdict(rec)) + "\n")


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message


class FakeCaServer:
    """A grpc.aio server over TLS (serving chain from the PKI) hosting a FakeCA."""

    def __init__(self, ca: FakeCA):
        self.ca = ca
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        server = grpc.aio.server()
        self.ca.add_to(server)
        creds = grpc.ssl_server_credentials([(self.ca.pki.serving_key_pem, self.ca.pki.serving_chain_pem)])
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = server.add_secure_port(target, creds)
        if not self.port:
            raise OSError(f"fake istiod CA cannot listen on {target}")
        await server.start()
        self._server = server
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


def parse_caller(text: str) -> tuple[str, Caller]:
    """`TOKEN,ns/sa[,spiffe-id...]` -> (token, Caller)."""
    token, account, *ids = text.split(",")
    if not token or "/" not in account:
        raise argparse.ArgumentTypeError(f"--caller wants TOKEN,ns/sa[,spiffe://...]: {text!r}")
    return token, Caller(account, frozenset(ids))


async def _serve(args: argparse.Namespace) -> None:
    ca = FakeCA(FakePki.create(args.pki, args.trust_domain), dict(args.caller), cluster_id=args.cluster_id,
                fail_next=args.fail, record_path=args.record)
    server = FakeCaServer(ca)
    host, _, port = args.listen.rpartition(":")
    bound = await server.start(host.strip("[]"), int(port))
    print(f"fake istiod CA listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel_fast.fakes.ca_server", description=__doc__.split("\n")[0])
    parser.add_argument("--pki", type=Path, required=True, help="directory of the fake authority (created if absent)")
    parser.add_argument("--listen", default="0.0.0.0:15012")
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--cluster-id", default=DEFAULT_CLUSTER_ID)
    parser.add_argument("--caller", type=parse_caller, action="append", default=[],
                        help="TOKEN,ns/sa[,spiffe-id...]: a bearer token and what it may impersonate")
    parser.add_argument("--fail", type=int, default=0, help="fail this many first calls with UNAVAILABLE")
    parser.add_argument("--record", type=Path, help="append one JSON line per request here")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
