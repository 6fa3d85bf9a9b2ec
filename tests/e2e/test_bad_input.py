"""Bad input on the inbound HBONE port (15008): what a refusing ztunnel answers, and that it keeps serving.

Topology per test (both engines):

  pod mallory (no ztunnel): python -m tests.e2e.badpeer CASE ──▶ httpbin:15008 (ztunnel-fast, dedicated)
  pod sleep (ztunnel; end-to-end check only) ─────── HBONE ──────┘        └─▶ echo app httpbin:80

Every case asserts the reference's answer (reference/ztunnel.md 3.2 and 4; RFC 9113 where the
reference is silent), the WARN line ztunnel-fast logs for it, and afterwards that the same process is
alive and still serves a good tunnel (a fresh mTLS connection, CONNECT httpbin:80, 256 KiB echoed,
sha256 both ways).  Each group ends with a tunnel through the mesh (sleep's ztunnel -> httpbin's).

Tests named after a defect (test_oversized_frame_*, test_non_utf8_*, test_peer_reset_*) assert the
reference behaviour that ztunnel-fast does not have yet: they fail until the product is fixed.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztunnel_fast.demo.lab import Lab, LabPod, Ztunnel
from ztunnel_fast.identity.ca import ROOT_CERT_FILE, ROOT_KEY_FILE, IssuedCertificate, LocalCA, init_ca
from ztunnel_fast.identity.spiffe import Identity

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]  # `python -m tests.e2e.badpeer` resolves from here
APP_PORT = 80
CERT_TTL = 3600  # seconds; far beyond any test
LOG_WAIT = 5.0  # seconds a WARN line gets to appear
SETTLE = 10.0  # seconds for upstream sockets to close after a flood
MIB = 1 << 20
MAX_STREAMS = 200  # SETTINGS_MAX_CONCURRENT_STREAMS ztunnel-fast advertises (reference 3.2)
UNREAD_FLOOD_MIB = 64  # MiB of PINGs a peer that never reads its acks may try to push
FOREIGN_TD_ID = "spiffe://other.local/ns/demo/sa/mallory"
# Unhandled errors: Python's own reports on stderr, which the ztunnel log captures.
CRASH_MARKERS = ("Traceback (most recent call last)", "Exception in callback", "Task exception was never retrieved")
FUTURE_NOISE = "Future exception was never retrieved"
BUSY_LOOPS = 2  # CPU-bound processes beside the refusal tests: a refusal must reach the peer under load
REFUSAL_REPEATS = 3  # each TLS refusal asserted this many times in a row under that load  # asserted by test_peer_reset_leaves_no_unretrieved_future_errors


# ------------------------------------------------------------------------------------ harness
def _write_identity(directory: Path, cert_pem: bytes, key_pem: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key_pem)
    return directory


def _write_issued(directory: Path, cert: IssuedCertificate) -> Path:
    return _write_identity(directory, b"".join(cert.chain_pem), cert.key_pem)


def _foreign_trust_domain_leaf(ca_dir: Path, uri: str) -> tuple[bytes, bytes]:
    """A leaf signed by *our* root but naming another trust domain: only the server's SPIFFE
    trust-domain check (not chain validation) can refuse it.  LocalCA.issue rightly won't make one."""
    root_key = serialization.load_pem_private_key((ca_dir / ROOT_KEY_FILE).read_bytes(), password=None)
    root = x509.load_pem_x509_certificate((ca_dir / ROOT_CERT_FILE).read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(seconds=CERT_TTL))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return leaf.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class Target:
    """httpbin's ztunnel-fast under attack from mallory, with the identities mallory may present."""

    lab: Lab
    mallory: LabPod
    sleep: LabPod
    httpbin: LabPod
    zt: Ztunnel
    root: Path
    certs: dict[str, Path]
    mesh_ztunnel: Ztunnel | None = field(default=None)

    @property
    def ip(self) -> str:
        return self.httpbin.ip

    # -- the bad peer ----------------------------------------------------------------------
    def peer(self, case: str, *args: str, certs: str | None = "good", health: bool = True,
             timeout: float = 5.0, trace: bool = False) -> dict:
        argv = [sys.executable, "-m", "tests.e2e.badpeer", case, "--ip", self.ip, "--root", str(self.root),
                "--timeout", str(timeout), "--health-port", str(APP_PORT),
                "--health-cert-dir", str(self.certs["good"]), *(["--trace"] if trace else [])]
        if certs is not None:
            argv += ["--cert-dir", str(self.certs[certs])]
        if health:
            argv.append("--health")
        res = self.lab.topology.run(self.mallory.pod, [*argv, *args], cwd=REPO, timeout=120, check=False)
        assert res.returncode == 0 and res.stdout.strip(), f"badpeer {case} failed:\n{res.stdout}\n{res.stderr}"
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert "exception" not in out, f"badpeer {case} could not run its case: {out}"
        return out

    def request(self, *headers: list[tuple[str, str]], then_echo: bool = True) -> dict:
        args = [a for h in headers for a in ("--request", json.dumps(h))]
        return self.peer("request", *args, *(["--then-echo"] if then_echo else []))

    # -- what ztunnel-fast did ---------------------------------------------------------------
    def mark(self) -> int:
        return len(self.zt.log())

    def warning(self, since: int, *needles: str, any_of: tuple[str, ...] = ("",)) -> str:
        """The first WARN line logged after `since` that contains every needle and one of `any_of`
        (waits LOG_WAIT s)."""
        deadline = time.monotonic() + LOG_WAIT
        while True:
            fresh = self.zt.log()[since:]
            for line in fresh.splitlines():
                if " WARN " in line and all(n in line for n in needles) and any(a in line for a in any_of):
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no WARN line with {needles!r} (and one of {any_of!r}) in the ztunnel log since the case:\n"
                    f"{fresh[-4000:]}")
            time.sleep(0.05)

    def assert_serving(self, out: dict) -> None:
        """The process is alive and a fresh, well-formed tunnel through it works end to end."""
        assert self.zt.proc.poll() is None, f"ztunnel-fast exited {self.zt.proc.returncode}:\n{self.zt.log()[-4000:]}"
        health = out.get("health", {})
        assert health.get("ok"), f"no good tunnel after {out.get('case')}: {health}"

    def assert_no_crash_reports(self) -> None:
        log = self.zt.log()
        found = [m for m in CRASH_MARKERS if m in log]
        assert not found, f"unhandled errors in the ztunnel log ({found}):\n{log[-6000:]}"

    def assert_mesh_tunnel(self) -> None:
        """sleep -> its ztunnel -> HBONE -> httpbin's ztunnel -> echo: the ordinary path still works."""
        if self.mesh_ztunnel is None:
            self.mesh_ztunnel = self.lab.start_ztunnel(self.sleep)
        out = self.lab.client(self.sleep, "echo", self.ip, str(APP_PORT), "--size", str(MIB), timeout=60)
        assert out["ok"], out

    def established_app_connections(self) -> list[str]:
        res = self.lab.topology.run(self.httpbin.pod, ["ss", "-tnH", "state", "established",
                                                       f"( sport = :{APP_PORT} or dport = :{APP_PORT} )"])
        return [line for line in res.stdout.splitlines() if line.strip()]


@pytest.fixture
def target(lab: Lab) -> Target:
    return _build_target(lab)


def _build_target(lab: Lab, engines: tuple[str, ...] = (), **env: str) -> Target | list[Target]:
    """mallory, sleep and one httpbin (with its ztunnel-fast on the lab's engine); with `engines`,
    one httpbin (and ztunnel-fast) per engine on the same topology, returned as a list."""
    mallory = lab.pod("mallory", namespace="demo", mesh=False)
    sleep = lab.pod("sleep", namespace="demo")
    names = [f"httpbin-{e}" for e in engines] or ["httpbin"]
    httpbins = [lab.pod(name, namespace="demo") for name in names]
    lab.write_config()
    zts = []
    for httpbin, engine in zip(httpbins, engines or (None,), strict=True):
        lab.app(httpbin, "serve", str(APP_PORT), "echo", port=APP_PORT)
        zts.append(lab.start_ztunnel(httpbin, redirect=False, **env,
                                     **({"ZTUNNEL_ENGINE": engine} if engine else {})))

    peers = lab.workdir / "peers"
    ours = LocalCA.load(lab.ca_dir)
    other_ca_dir = lab.workdir / "other-ca"
    init_ca(other_ca_dir, trust_domain="other.local", force=True)
    foreign = LocalCA.load(other_ca_dir)
    certs = {
        "good": _write_issued(peers / "good", ours.issue(Identity("cluster.local", "demo", "mallory"), CERT_TTL)),
        "foreign-ca": _write_issued(peers / "foreign-ca",
                                    foreign.issue(Identity("other.local", "demo", "mallory"), CERT_TTL)),
        "foreign-td": _write_identity(peers / "foreign-td",
                                      *_foreign_trust_domain_leaf(lab.ca_dir, FOREIGN_TD_ID)),
    }
    targets = [Target(lab, mallory, sleep, httpbin, zt, lab.ca_dir / ROOT_CERT_FILE, certs)
               for httpbin, zt in zip(httpbins, zts, strict=True)]
    return targets if engines else targets[0]


@pytest.fixture
def cpu_contention():
    """BUSY_LOOPS shell busy loops beside the test (its own CPU contention: a refusal raced by a reset
    shows up under load), always killed afterwards."""
    procs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(BUSY_LOOPS)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(timeout=10)


def _refused_in_tls(out: dict) -> bool:
    """The server ended the TLS session before speaking HTTP/2: a failed handshake, or an alert/close
    on the first read after it.  Never its SETTINGS."""
    if out["frames"]:
        return False
    if out["handshake"] != "ok":
        return out["handshake"].startswith("error")
    return bool(out["after"]) and (out["after"].startswith("error") or out["after"] == "eof")


def _tls_error(out: dict) -> str:
    return (out["handshake"] if out["handshake"] != "ok" else out["after"] or "").lower()


# ------------------------------------------------------------------------- 1-4: TLS refusals
def test_tls_refusals(target: Target, cpu_contention) -> None:
    t = target
    assert all(p.poll() is None for p in cpu_contention)

    # control: a correct client gets the server's HTTP/2 SETTINGS, with the reference's values (3.2)
    out = t.peer("tls")
    assert out["handshake"] == "ok" and out["version"] == "TLSv1.3" and out["alpn"] == "h2", out
    assert out["after"] == "settings", out
    settings = out["frames"][0]["settings"]
    assert settings["MAX_FRAME_SIZE"] == MIB, settings
    assert settings["MAX_CONCURRENT_STREAMS"] == 200, settings
    assert settings["INITIAL_WINDOW_SIZE"] == 4 * MIB, settings
    assert settings["MAX_HEADER_LIST_SIZE"] == 64 * 1024, settings
    t.assert_serving(out)

    # 1. not TLS at all: closed by the server, no HTTP answer
    for case in ("plaintext", "garbage"):
        since = t.mark()
        out = t.peer(case)
        assert out["closed"] is not None, f"{case}: server kept the connection open: {out}"
        assert out["received"] == 0 or out["head"].startswith("15"), f"{case}: answered with non-alert bytes: {out}"
        t.warning(since, "tls handshake failed")
        t.assert_serving(out)

    # Each alert is asserted REFUSAL_REPEATS times under the busy loops: it must reach the peer every
    # time (a close() racing the alert with an RST lost it under load), the last run also checks health.
    for attempt in range(REFUSAL_REPEATS):
        last = attempt == REFUSAL_REPEATS - 1
        # 2. TLS 1.2 only: protocol_version alert during the handshake
        since = t.mark()
        out = t.peer("tls", "--tls12", health=last)
        assert out["handshake"].startswith("error") and "protocol version" in out["handshake"].lower(), out
        t.warning(since, "tls handshake failed", "unsupported protocol version")

        # 2b. ALPN without h2: no_application_protocol alert
        since = t.mark()
        out = t.peer("tls", "--alpn", "http/1.1", health=last)
        assert out["handshake"].startswith("error") and "no application protocol" in out["handshake"].lower(), out
        t.warning(since, "tls handshake failed", "h2 required")

        # 3. no client certificate: TLS 1.3 certificate_required alert, never SETTINGS
        since = t.mark()
        out = t.peer("tls", "--no-cert", health=last)
        assert _refused_in_tls(out), out
        assert "certificate required" in _tls_error(out), (attempt, out)
        t.warning(since, "tls handshake failed", "peer did not return a certificate")

        # 4. a certificate from another CA (trust domain other.local): chain validation fails, unknown_ca
        since = t.mark()
        out = t.peer("tls", certs="foreign-ca", health=last)
        assert _refused_in_tls(out), out
        assert "unknown ca" in _tls_error(out), (attempt, out)
        t.warning(since, "tls handshake failed", "client certificate verify failed")
    t.assert_serving(out)

    # 2c. no ALPN at all: closed after the handshake
    since = t.mark()
    out = t.peer("tls", "--alpn", "")
    assert _refused_in_tls(out), out
    t.warning(since, "tls handshake failed", "ALPN h2 not negotiated")
    t.assert_serving(out)

    # 4b. our CA, but spiffe://other.local/...: the trust-domain check refuses it
    since = t.mark()
    out = t.peer("tls", certs="foreign-td")
    assert _refused_in_tls(out), out
    t.warning(since, "tls handshake failed", FOREIGN_TD_ID, "not in trust domain cluster.local")
    t.assert_serving(out)

    t.assert_mesh_tunnel()
    t.assert_no_crash_reports()


# -------------------------------------------------------------------- 5-9: CONNECT refusals
def _connect_cases(t: Target) -> list[tuple[list[tuple[str, str]], int, str]]:
    """(headers, status, reason in the WARN line) of every CONNECT refusal (reference 3.2)."""
    ip = t.ip
    get = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", f"{ip}:{APP_PORT}")]

    def connect(authority: str) -> list[tuple[str, str]]:
        return [(":method", "CONNECT"), (":authority", authority)]

    cases = [
        # (headers, status, reason in the WARN line)
        (get, 400, "400 Bad Request: expected method CONNECT"),  # 5
        (connect("nonsense"), 400, "400 Bad Request: no valid authority pseudo header"),  # 6
        (connect(ip), 400, "400 Bad Request: no valid authority pseudo header"),
        (connect(f"{ip}:0"), 400, "400 Bad Request: no valid authority pseudo header"),
        (connect(f"{ip}:65536"), 400, "400 Bad Request: no valid authority pseudo header"),
        (connect(f"{ip}:15008"), 503, "503 Service Unavailable: self call"),  # 7
        (connect(f"{ip}:15001"), 503, "503 Service Unavailable: self call"),
        (connect(f"{ip}:15006"), 503, "503 Service Unavailable: self call"),
        (connect(f"{t.mallory.ip}:{APP_PORT}"), 400, f"400 Bad Request: ip mismatch: {t.mallory.ip} != {ip}"),  # 8
        (connect(f"198.18.0.250:{APP_PORT}"), 400, f"400 Bad Request: ip mismatch: 198.18.0.250 != {ip}"),
        (connect(f"{ip}:81"), 503, f"503 Service Unavailable: failed to connect to {ip}:81"),  # 9
    ]
    return cases


def test_connect_refusals(target: Target) -> None:
    t = target
    cases = _connect_cases(t)
    for headers, status, reason in cases:
        since = t.mark()
        out = t.request(headers)
        stream = out["streams"][0]
        assert stream.get("status") == str(status) and stream.get("end_stream"), (headers, out)
        assert out["goaway"] is None and out["closed"] is None, (headers, out)
        # a refusal is a stream's business: the same connection still carries a good tunnel
        assert out["echo_same_connection"]["ok"], (headers, out)
        line = t.warning(since, "refused CONNECT with", reason)
        assert f"peer_id={t.lab.pods['mallory'].identity}" in line, line
        t.assert_serving(out)

    # all of them multiplexed on one connection, then a good tunnel on it
    out = t.request(*(headers for headers, _, _ in cases))
    assert [s.get("status") for s in out["streams"]] == [str(status) for _, status, _ in cases], out
    assert out["echo_same_connection"]["ok"], out
    t.assert_serving(out)

    t.assert_mesh_tunnel()
    t.assert_no_crash_reports()


# ------------------------------------------------------------ 10-12: HTTP/2 protocol violations
def test_h2_protocol_violations(target: Target, cpu_contention) -> None:
    t = target
    assert all(p.poll() is None for p in cpu_contention)

    # 10. TLS fine, then no HTTP/2 client preface.  RFC 9113 3.4: a connection error PROTOCOL_ERROR,
    # "a GOAWAY frame MAY be omitted" (the Rust h2 crate under ztunnel omits it): closed, and any
    # GOAWAY that is sent says PROTOCOL_ERROR.
    since = t.mark()
    out = t.peer("bad-preface")
    assert out["closed"] is not None, f"server kept the connection after a bad preface: {out}"
    assert out["goaway"] in (None, "PROTOCOL_ERROR"), out
    assert not [f for f in out["frames"] if f["type"] not in ("SETTINGS", "WINDOWUPDATE", "GOAWAY")], out
    t.warning(since, "peer violated HTTP/2", "preamble")
    t.assert_serving(out)

    # 11. a whole frame one byte over the advertised SETTINGS_MAX_FRAME_SIZE (1 MiB): FRAME_SIZE_ERROR
    since = t.mark()
    out = t.peer("oversized-frame")
    assert out["server_max_frame_size"] == MIB, out
    assert out["goaway"] == "FRAME_SIZE_ERROR" and out["closed"] is not None, out
    t.warning(since, "peer violated HTTP/2", "FRAME_SIZE_ERROR")
    t.assert_serving(out)

    # 12. HEADERS on an even (server-initiated) stream id: PROTOCOL_ERROR
    since = t.mark()
    out = t.peer("even-stream")
    assert out["goaway"] == "PROTOCOL_ERROR" and out["closed"] is not None, out
    t.warning(since, "peer violated HTTP/2", "PROTOCOL_ERROR")
    t.assert_serving(out)

    # 12a. one stream more than the advertised 200: that one refused (RST_STREAM REFUSED_STREAM, RFC
    # 9113 5.1.2), the 200 others served and the connection kept (a PING still answered, no GOAWAY)
    out = t.peer("too-many-streams", "--count", str(MAX_STREAMS + 1), timeout=30.0)
    assert out["complete"] and out["goaway"] is None and out["ping_after"], out
    assert out["statuses"] == {"200": MAX_STREAMS} and out["refused"] == [2 * MAX_STREAMS + 1], out
    t.assert_serving(out)

    # 12c. a header block HPACK cannot decode: the compression context is lost, COMPRESSION_ERROR
    since = t.mark()
    out = t.peer("hpack-error")
    assert out["goaway"] == "COMPRESSION_ERROR" and out["closed"] is not None, out
    t.warning(since, "peer violated HTTP/2", "COMPRESSION_ERROR")
    t.assert_serving(out)

    # 12b. stream 5 used (GET, answered 400), then a new stream 3: PROTOCOL_ERROR, last stream 5
    since = t.mark()
    out = t.peer("lower-stream")
    assert [f for f in out["frames"] if f["type"] == "HEADERS" and f["stream"] == 5], out
    goaways = [f for f in out["frames"] if f["type"] == "GOAWAY"]
    assert out["goaway"] == "PROTOCOL_ERROR" and goaways[0]["last_stream_id"] == 5, out
    assert out["closed"] is not None, out
    t.warning(since, "peer violated HTTP/2", "PROTOCOL_ERROR")
    t.assert_serving(out)

    t.assert_mesh_tunnel()
    t.assert_no_crash_reports()


def test_forged_tls_record_ends_only_its_connection(target: Target) -> None:
    """A record that fails authentication (bad_record_mac) closes its connection, and only it.  Twice
    in a row, then a good tunnel: the native engine hands connections to its workers in turn, so with
    two workers the good tunnel runs on a worker whose last connection failed in SSL_read (the
    worker thread's OpenSSL error queue must be empty again for the next connection's reads)."""
    t = target
    for last in (False, True):
        out = t.peer("bad-record", health=last)
        assert "exception" not in out, out
        assert out["closed"] is not None, f"server kept the connection after a forged record: {out}"
    t.assert_serving(out)
    t.assert_no_crash_reports()


# ------------------------------------------------------------------------------- 13: floods
def test_floods(target: Target) -> None:
    t = target
    assert not t.established_app_connections()

    # rapid reset (CVE-2023-44487 shape): 1000 CONNECTs, each cancelled right away, in one burst
    out = t.peer("flood-reset", "--count", "1000", "--linger", "2", timeout=10.0)
    if out["goaway"] is None:
        assert out["ping_after"], f"connection neither served a PING nor sent GOAWAY after the burst: {out}"
    t.assert_serving(out)
    # whatever the server dialed for the cancelled streams, it must not keep
    deadline = time.monotonic() + SETTLE
    while (left := t.established_app_connections()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"upstream connections left open after the reset flood: {left}"

    # 10000 PINGs + 10000 SETTINGS written before reading anything: every PING answered, or GOAWAY
    out = t.peer("flood-ping", "--count", "10000", timeout=10.0)
    if out["goaway"] is None:
        assert out["ping_after"] and out["ping_acks"] == 10000 + 1, out
    t.assert_serving(out)

    # PINGs whose acks are never read: the server stops reading (the peer's writes block long before
    # UNREAD_FLOOD_MIB) or ends the connection with ENHANCE_YOUR_CALM; it never buffers the acks
    out = t.peer("flood-ping-unread", "--count", str(UNREAD_FLOOD_MIB), timeout=10.0)
    assert out["written"] < out["limit"], out
    assert out["blocked"] or out["goaway"] == "ENHANCE_YOUR_CALM", out
    t.assert_serving(out)

    # one tunnel whose 5000 bytes arrive as 5000 one-byte DATA frames: echoed intact
    out = t.peer("flood-data", "--count", "5000", timeout=10.0)
    assert out["ok"] and out["goaway"] is None, out
    t.assert_serving(out)

    t.assert_mesh_tunnel()
    t.assert_no_crash_reports()


# ------------------------------------------------------------ defects (fail until fixed)
def test_oversized_frame_is_refused_from_its_header(target: Target) -> None:
    """RFC 9113 4.2: a frame longer than SETTINGS_MAX_FRAME_SIZE is a FRAME_SIZE_ERROR, decidable from
    its 9-byte header; the Rust h2 crate under ztunnel (length-delimited codec) answers GOAWAY at once.
    ztunnel-fast waits for the body (up to 16 MiB buffered per connection) before it checks."""
    t = target
    since = t.mark()
    out = t.peer("oversized-frame-header", timeout=5.0)
    assert out["server_max_frame_size"] == MIB, out
    assert out["goaway"] == "FRAME_SIZE_ERROR", (
        f"no GOAWAY FRAME_SIZE_ERROR within 5 s of a frame header announcing 16 MiB - 1 bytes "
        f"(max {MIB}): the server buffers the body before checking the length: {out}")
    assert out["closed"] is not None, out
    t.warning(since, "peer violated HTTP/2", "FRAME_SIZE_ERROR")
    t.assert_serving(out)
    t.assert_no_crash_reports()


def test_non_utf8_header_value_is_answered(target: Target) -> None:
    """HTTP/2 field values are octets.  A CONNECT whose :authority holds 0xff is malformed: the answer is
    400, RST_STREAM(PROTOCOL_ERROR) (what the Rust h2 crate does) or GOAWAY(PROTOCOL_ERROR), never
    silence and never an unhandled exception in the event loop."""
    t = target
    since = t.mark()
    out = t.peer("non-utf8-header", timeout=5.0)
    answers = [f for f in out["frames"] if f["type"] in ("HEADERS", "RST_STREAM", "GOAWAY")]
    assert out["answered"] and answers, f"no answer to a CONNECT with a non-UTF-8 :authority within 5 s: {out}"
    assert all(f.get("error", "PROTOCOL_ERROR") == "PROTOCOL_ERROR" for f in answers), out
    t.warning(since, any_of=("peer violated HTTP/2", "refused CONNECT with"))
    t.assert_serving(out)
    t.assert_no_crash_reports()


def test_peer_reset_leaves_no_unretrieved_future_errors(target: Target) -> None:
    """A client resetting an established tunnel (RST_STREAM CANCEL) is ordinary traffic: every client
    ztunnel does it when its downstream resets.  It must not make asyncio report an unretrieved future
    exception on stderr (3 lines per stream: a reset flood of 1000 streams writes 3000)."""
    t = target
    out = t.peer("reset-tunnel")
    assert out["echoed"] and out["ping_after"], out
    t.assert_serving(out)
    time.sleep(0.5)  # the message is written when the stream's future is collected
    log = t.zt.log()
    assert FUTURE_NOISE not in log, (
        f"asyncio reported {log.count(FUTURE_NOISE)} unretrieved StreamReset future(s) after one reset "
        f"tunnel:\n{log[-3000:]}")


# ------------------------------------------------------------ one behaviour, two engines
def _answer(out: dict) -> dict:
    """What a server decided in a case, engine-neutral: the frame trace (badpeer --trace: each
    stream's frames in order, DATA as bytes, no flow-control pacing or keepalive timers), the TLS
    outcome and how the connection ended; never byte counts of pacing or the peer's own timings."""
    keep = ("trace", "handshake", "version", "alpn", "after", "received", "head", "closed", "goaway",
            "streams", "statuses", "refused", "ok", "echoed", "ping_after", "ping_acks", "blocked", "answered")
    answer = {k: out[k] for k in keep if k in out}
    if "echo_same_connection" in out:
        answer["echo_same_connection"] = out["echo_same_connection"].get("ok")
    answer["health"] = out.get("health", {}).get("ok")
    return answer


def test_engines_answer_alike(topology, tmp_path) -> None:
    """Every bad-input case against the native engine and the pure twin, side by side on one
    topology: the answers (frame traces included) must be equal, so a difference fails the suite."""
    from ztunnel_fast.engine import native_available

    ok, why = native_available()
    assert ok, f"native engine not built: {why} (run `make build`)"
    lab = Lab(topology, tmp_path, log_level="info")
    native, pure = _build_target(lab, engines=("native", "pure"))

    def runs(t: Target) -> list[tuple[str, dict]]:
        cases: list[tuple[str, tuple[str, ...], dict]] = [
            ("settings", ("tls",), {}),
            ("plaintext", ("plaintext",), {}),
            ("garbage", ("garbage",), {}),
            ("tls12", ("tls", "--tls12"), {}),
            ("alpn-http1", ("tls", "--alpn", "http/1.1"), {}),
            ("alpn-none", ("tls", "--alpn", ""), {}),
            ("no-cert", ("tls", "--no-cert"), {}),
            ("foreign-ca", ("tls",), {"certs": "foreign-ca"}),
            ("foreign-td", ("tls",), {"certs": "foreign-td"}),
            ("bad-preface", ("bad-preface",), {}),
            ("oversized-frame", ("oversized-frame",), {}),
            ("oversized-frame-header", ("oversized-frame-header",), {}),
            ("even-stream", ("even-stream",), {}),
            ("lower-stream", ("lower-stream",), {}),
            ("non-utf8-header", ("non-utf8-header",), {}),
            ("hpack-error", ("hpack-error",), {}),
            ("too-many-streams", ("too-many-streams", "--count", str(MAX_STREAMS + 1)), {"timeout": 30.0}),
            ("flood-ping", ("flood-ping", "--count", "10000"), {"timeout": 10.0}),
            ("flood-data", ("flood-data", "--count", "5000"), {"timeout": 10.0}),
            ("reset-tunnel", ("reset-tunnel",), {}),
        ]
        for n, (headers, _, _) in enumerate(_connect_cases(t)):
            cases.append((f"connect-{n}", ("request", "--request", json.dumps(headers), "--then-echo"), {}))
        results = []
        for name, argv, kw in cases:
            results.append((name, _answer(t.peer(*argv, trace=True, **kw))))
        # how many acks an unread PING flood gets before the server stops reading depends on when
        # the peer gives up writing: only the verdict (backpressure or GOAWAY) is compared
        out = t.peer("flood-ping-unread", "--count", str(UNREAD_FLOOD_MIB), timeout=10.0)
        results.append(("flood-ping-unread", {"blocked": out["blocked"], "goaway": out["goaway"],
                                              "health": out["health"]["ok"]}))
        # rapid reset races the server's answers against the peer's cancels by design: its per-stream
        # frames differ from run to run on one engine, so only its verdict is compared
        out = t.peer("flood-reset", "--count", "1000", "--linger", "2", timeout=10.0)
        results.append(("flood-reset", {"goaway": out["goaway"], "ping_after": out["ping_after"],
                                        "health": out["health"]["ok"]}))
        return results

    answers = {"native": runs(native), "pure": runs(pure)}
    differences = [
        f"{name}:\n  native: {json.dumps(n)[:3000]}\n  pure:   {json.dumps(p)[:3000]}"
        for (name, n), (_, p) in zip(answers["native"], answers["pure"], strict=True) if n != p
    ]
    assert not differences, "the engines answer differently:\n" + "\n".join(differences)
    # and the answers are the ones the suite asserts (equal but both wrong must fail too)
    by_case = dict(answers["native"])
    assert by_case["too-many-streams"]["refused"] == [2 * MAX_STREAMS + 1], by_case["too-many-streams"]
    assert by_case["hpack-error"]["goaway"] == "COMPRESSION_ERROR", by_case["hpack-error"]
    assert "unknown ca" in by_case["foreign-ca"]["after"].lower(), by_case["foreign-ca"]
    for t in (native, pure):
        t.assert_no_crash_reports()


# ------------------------------------------------------------------ strangers: bounded cost
LOW_NOFILE = 1024  # the soft open-file limit ztunnel-fast is started with here; it must raise it
PENDING_CAP = 5  # MAX_PENDING_TLS_HANDSHAKES in the cap test


def _open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def test_silent_stranger_is_closed_at_the_deadline_and_nofile_is_raised(lab: Lab) -> None:
    """Started with a soft RLIMIT_NOFILE of 1024, ztunnel-fast raises it to the hard limit and logs
    it; a connection that never sends a byte is closed at TLS_HANDSHAKE_TIMEOUT, with a WARN."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > LOW_NOFILE, f"hard open-file limit {hard} leaves nothing to raise"
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_NOFILE, hard))
    try:
        t = _build_target(lab, TLS_HANDSHAKE_TIMEOUT="1s")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert _open_file_limits(t.zt.proc.pid) == (hard, hard)
    assert t.zt.lines(f"raised open file limit (RLIMIT_NOFILE) from {LOW_NOFILE} to {hard}"), t.zt.log()[-3000:]

    since = t.mark()
    out = t.peer("silent", timeout=30.0)  # bounded wait for the outcome; the deadline is 1 s
    assert out["closed"] is not None, f"a silent connection was never closed: {out}"
    t.warning(since, "tls handshake failed", "timed out")
    t.assert_serving(out)
    t.assert_no_crash_reports()


def test_pending_handshake_cap_refuses_strangers_while_authenticated_traffic_flows(lab: Lab) -> None:
    """MAX_PENDING_TLS_HANDSHAKES silent connections are held; one more is reset at once (WARN);
    a connection authenticated before them still carries a tunnel; once they leave, new peers
    are served again."""
    t = _build_target(lab, MAX_PENDING_TLS_HANDSHAKES=str(PENDING_CAP), TLS_HANDSHAKE_TIMEOUT="120s")
    since = t.mark()
    out = t.peer("strangers", "--count", str(PENDING_CAP), health=False, timeout=20.0)
    assert "failed_in" not in out, f"{out}\n{t.zt.log()[-4000:]}"
    assert out["echo_before"]["ok"], out
    assert out["extra_closed"] is not None, f"the stranger beyond the cap was not refused: {out}"
    assert out["idle_open"] == PENDING_CAP, f"strangers within the cap were closed: {out}"
    assert out["echo_during_cap"]["ok"], out
    line = t.warning(since, "refused connection from", f"MAX_PENDING_TLS_HANDSHAKES={PENDING_CAP}")
    assert f"{PENDING_CAP} TLS handshakes pending" in line, line
    # the strangers are gone: their handshakes end (peer closed) and fresh peers are admitted again
    for _ in range(20):  # bounded: each attempt waits for its own outcome
        out = t.peer("echo", health=False)
        if out.get("ok"):
            break
    assert out.get("ok"), out
    t.assert_no_crash_reports()
