"""One exception tree for ztunnel-fast.

Leaf names follow ztunnel's vocabulary so that log lines and `error=` fields read the same as
Istio's.  Every error that reaches a log line or an access log carries a short, stable message.
"""

from __future__ import annotations


class ZtunnelError(Exception):
    """Root of every error raised by ztunnel-fast on purpose."""


class ConfigError(ZtunnelError):
    """Invalid configuration; raised before anything starts, never at run time.

    `source` names where the bad value came from (an environment variable or a file), `key` the
    field inside it, `reason` what is wrong.  str() renders all three on one line.
    """

    def __init__(self, source: str, key: str, reason: str):
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


class IdentityError(ZtunnelError):
    """A SPIFFE identity could not be parsed, issued or verified."""


class TlsError(ZtunnelError):
    """TLS handshake or peer verification failed."""

    flag = "TLS_FAILURE"


class ProxyError(ZtunnelError):
    """A tunnel could not be set up; `flag` is the Istio response flag for telemetry."""

    flag = "-"


class SelfCall(ProxyError):
    """A connection would loop back into one of ztunnel's own listener ports."""

    def __init__(self, port: int):
        super().__init__(f"self call: refusing to connect to ztunnel's own port {port}")


class NoHealthyUpstream(ProxyError):
    """A known service has no usable endpoint."""

    def __init__(self, service: str):
        super().__init__(f"no healthy upstream for {service}")


class UnknownSourceWorkload(ProxyError):
    """Shared mode: the connection's source IP is no local workload."""

    def __init__(self, ip: str):
        super().__init__(f"unknown source workload {ip}")


class HttpStatus(ProxyError):
    """The HBONE peer answered CONNECT with a non-200 status."""

    flag = "CONNECT"

    def __init__(self, status: int, reason: str = ""):
        self.status = status
        super().__init__(f"http status: {status}{' ' + reason if reason else ''}")


class ConnectTimeout(ProxyError):
    flag = "NETWORK_POLICY"

    def __init__(self, addr: str):
        super().__init__(
            f"connection timed out, maybe a NetworkPolicy is blocking HBONE port 15008: {addr}"
        )


class UpstreamConnectError(ProxyError):
    flag = "CONNECT"


class StreamReset(ZtunnelError):
    """The HTTP/2 stream was reset by the peer (RST_STREAM) or by us."""

    def __init__(self, error_code: int):
        self.error_code = error_code
        super().__init__(f"stream reset (error code {error_code})")
