"""The one way to reach istiod over gRPC: channel, TLS roots, token and call metadata.

Role: the xDS client (xds/) and the CA client (identity/) both talk to istiod on port 15012 with
the same rules (ztunnel's `tls/control.rs` and `identity/caclient.rs`): TLS verified against a root
from a file, the system store or inline PEM; an optional TLS server name (ALT_*_HOSTNAME); the call
metadata `authorization: Bearer <token>` and `clusterid: <cluster id>` plus the operator's extra
headers; HTTP/2 keepalive 30 s / 10 s.

Invariants:
- Pure parts (`resolve_roots`, `read_token`, `call_metadata`, `channel_options`) do no network I/O;
  `open_channel` is the only place a grpc.aio channel is created.
- The token is read on every call (`call_metadata`): projected service-account tokens are rotated
  by the kubelet, so a cached token would expire.
- `roots_fingerprint` lets a long-lived client notice that the root file changed and rebuild its
  channel (ztunnel rebuilds the CA channel when the root changes).
- Errors name the variable that was wrong (ConfigError), never a bare OSError.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc

from .config import DEFAULT_AUTH_TOKEN, IstiodEndpoint
from .errors import ConfigError

KEEPALIVE_TIME_MS = 30_000  # ztunnel's HTTP/2 keepalive interval toward istiod
KEEPALIVE_TIMEOUT_MS = 10_000  # and how long a PING may go unanswered
MAX_RECEIVE_BYTES = 200 * 1024 * 1024  # ztunnel's xDS max decode size (200 MiB)
CONNECT_TIMEOUT = 5.0  # seconds, ztunnel's connect timeout to istiod


def resolve_roots(endpoint: IstiodEndpoint, source: str) -> bytes | None:
    """PEM bytes of the trusted roots, or None for the system store (`SYSTEM`).

    `source` names the variable for errors (e.g. "XDS_ROOT_CA")."""
    value = endpoint.root_ca
    if value == "SYSTEM":
        return None
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        data = Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read root certificate {value}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(source, "", f"{value} holds no PEM certificate")
    return data


def roots_fingerprint(endpoint: IstiodEndpoint) -> str:
    """A digest of the current roots ('' when unreadable or SYSTEM); changes when the file does."""
    try:
        roots = resolve_roots(endpoint, "root")
    except ConfigError:
        return ""
    return hashlib.sha256(roots).hexdigest() if roots else ""


def read_token(auth_token: str | None) -> str | None:
    """The bearer token: AUTH_TOKEN as a file path when such a file exists, else AUTH_TOKEN as the
    literal token; without AUTH_TOKEN the projected token file when present, else None."""
    if auth_token is None:
        path = Path(DEFAULT_AUTH_TOKEN)
        return path.read_text().strip() if path.is_file() else None
    if os.path.isfile(auth_token):
        return Path(auth_token).read_text().strip()
    return auth_token.strip()


def call_metadata(endpoint: IstiodEndpoint, token: str | None, cluster_id: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for every call: authorization (when a token exists), clusterid, extras."""
    md: list[tuple[str, str]] = []
    if token:
        md.append(("authorization", f"Bearer {token}"))
    md.append(("clusterid", cluster_id))
    md.extend(endpoint.headers)
    return tuple(md)


def channel_options(endpoint: IstiodEndpoint) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        # Reconnects are ours to pace (ztunnel's backoff), not gRPC's.
        ("grpc.enable_retries", 0),
    ]
    if endpoint.server_name:
        options.append(("grpc.ssl_target_name_override", endpoint.server_name))
        options.append(("grpc.default_authority", endpoint.server_name))
    return options


def open_channel(endpoint: IstiodEndpoint, source: str) -> grpc.aio.Channel:
    """A grpc.aio channel to the endpoint (TLS unless the address is http://, which only test
    servers use).  `source` names the root variable for errors."""
    options = channel_options(endpoint)
    if endpoint.plaintext:
        return grpc.aio.insecure_channel(endpoint.authority, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=resolve_roots(endpoint, source))
    return grpc.aio.secure_channel(endpoint.authority, credentials, options=options)
