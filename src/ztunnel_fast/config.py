"""Process configuration: one frozen Config read from ztunnel's environment variable names.

Role: `Config.from_env` is the single validation path.  The CLI maps its flags onto the same
variable names and calls it, so a value means the same thing whether it came from a Helm-rendered
environment or a command line.

Invariants:
- A Config returned by `from_env` is fully validated: every field is in range, dedicated mode
  always carries a WorkloadInfo, at most one of `local_xds` / `local_xds_path` is set.
- Every invalid value raises ConfigError(source=<variable name>, key="", reason=...) naming what
  was wrong and what is accepted; nothing is silently clamped or defaulted.
- An empty value counts as unset: Helm renders absent values as empty strings, and ztunnel's
  defaults then apply.
- `from_env` only reads the mapping it is given (no os.environ, no files), so tests pass dicts.

The constructor itself trusts its arguments (tests build Configs directly); `Config()` equals
`Config.from_env({})`.
"""

from __future__ import annotations

import enum
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from .errors import ConfigError
from .identity.spiffe import DEFAULT_TRUST_DOMAIN, Identity

# Fixed listener ports (ztunnel hard-codes them; reference section 2).
OUTBOUND_PORT = 15001  # outbound capture: redirected connections leaving a local workload
INBOUND_PLAINTEXT_PORT = 15006  # inbound capture of plain TCP (sources outside the mesh)
INBOUND_PORT = 15008  # inbound HBONE: mTLS + HTTP/2 CONNECT
ADMIN_PORT = 15000  # admin (config dump, log levels); bound to localhost only
STATS_PORT = 15020  # Prometheus metrics
READINESS_PORT = 15021  # GET /healthz/ready
# Connecting to these would loop a connection back into ztunnel itself (errors.SelfCall).
SELF_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_PORT})

DEFAULT_INPOD_UDS = Path("/var/run/ztunnel/ztunnel.sock")  # istio-cni's ZDS socket (chart hostPath)
DEFAULT_CLUSTER_ID = "Kubernetes"  # what istiod calls a single cluster
DEFAULT_CLUSTER_DOMAIN = "cluster.local"

# HTTP/2 limits from RFC 9113: windows are 31-bit, SETTINGS_MAX_FRAME_SIZE in [2**14, 2**24 - 1].
_MAX_WINDOW = 2**31 - 1
_MIN_FRAME = 16_384
_MAX_FRAME = 16_777_215

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_BOOL_ACCEPTED = "true/false, 1/0 or yes/no (any case)"

_ENGINES = ("auto", "native", "pure")
_LOG_FORMATS = ("text", "json")
_LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "off")

# "<number><unit>" repeated, e.g. "1h30m"; units ms/s/m/h.  Order of alternatives matters: "ms"
# must be tried before "m".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_ACCEPTED = 'seconds ("86400", "1.5") or <number><unit> with units ms, s, m, h ("24h", "1h30m")'


class ProxyMode(enum.Enum):
    SHARED = "shared"  # node proxy: serves every workload on NODE_NAME
    DEDICATED = "dedicated"  # one workload (PROXY_WORKLOAD_INFO), runs in its network namespace


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """The workload a dedicated-mode proxy serves; from PROXY_WORKLOAD_INFO="ns/name/sa"."""

    namespace: str
    name: str
    service_account: str


# -- istiod (xDS and CA) ------------------------------------------------------------------------
ISTIOD_DEFAULT_ADDRESS = "https://istiod.istio-system.svc:15012"  # ztunnel's in-cluster default
DEFAULT_ROOT_CA = "/var/run/secrets/istio/root-cert.pem"  # the istio-ca-root-cert ConfigMap mount
DEFAULT_AUTH_TOKEN = "/var/run/secrets/tokens/istio-token"  # projected token, audience istio-ca


@dataclass(frozen=True, slots=True)
class IstiodEndpoint:
    """Where and how to reach one istiod service (xDS or CA), from ztunnel's variables.

    `address` is the normalised URL (scheme `https://` assumed when absent, as ztunnel's
    validate_uri does); `root_ca` is a file path, the word `SYSTEM`, or inline PEM (starts with
    `-----BEGIN`); `server_name` overrides the TLS name (ALT_XDS_HOSTNAME / ALT_CA_HOSTNAME);
    `headers` are the extra gRPC metadata from XDS_HEADER_<name> / CA_HEADER_<name> (names
    lower-cased, as gRPC requires).
    """

    address: str
    root_ca: str = DEFAULT_ROOT_CA
    server_name: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def authority(self) -> str:
        """host:port of the address (the gRPC target)."""
        rest = self.address.split("://", 1)[1]
        return rest.split("/", 1)[0]

    @property
    def host(self) -> str:
        authority = self.authority
        if authority.startswith("["):
            return authority[1:].split("]", 1)[0]
        return authority.rsplit(":", 1)[0] if ":" in authority else authority

    @property
    def plaintext(self) -> bool:
        return self.address.startswith("http://")


def parse_istiod_address(source: str, text: str) -> str:
    """`host:port` or `https://host:port` (also `http://` for a plaintext test server)."""
    value = text.strip()
    if "://" not in value:
        value = "https://" + value
    scheme, rest = value.split("://", 1)
    authority = rest.split("/", 1)[0]
    if scheme not in ("https", "http") or not authority:
        raise ConfigError(source, "", f"{text!r} is not an address; accepted: host:port or https://host:port")
    port = authority.rsplit("]", 1)[-1].rpartition(":")[2] if ":" in authority.rsplit("]", 1)[-1] else ""
    if port and not port.isdigit():
        raise ConfigError(source, "", f"{text!r} has an invalid port {port!r}")
    if not port:
        value = f"{scheme}://{authority}:{443 if scheme == 'https' else 80}"
    return value


def istiod_endpoint(env: Mapping[str, str], kind: str) -> IstiodEndpoint | None:
    """The endpoint for kind "XDS" or "CA" from <kind>_ADDRESS, <kind>_ROOT_CA, ALT_<kind>_HOSTNAME
    and <kind>_HEADER_*; None when no address is set and we are not in a cluster
    (KUBERNETES_SERVICE_HOST unset)."""
    address = env.get(f"{kind}_ADDRESS") or None
    if address is None:
        if not env.get("KUBERNETES_SERVICE_HOST"):
            return None
        address = ISTIOD_DEFAULT_ADDRESS
    prefix = f"{kind}_HEADER_"
    headers = tuple(sorted((k[len(prefix):].lower(), v)
                           for k, v in env.items() if k.startswith(prefix) and v))
    return IstiodEndpoint(
        address=parse_istiod_address(f"{kind}_ADDRESS", address),
        root_ca=env.get(f"{kind}_ROOT_CA") or DEFAULT_ROOT_CA,
        server_name=env.get(f"ALT_{kind}_HOSTNAME") or None,
        headers=headers,
    )


def proxy_metadata(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """ISTIO_META_<KEY>=v and ISTIO_METAJSON_<KEY>=json entries, prefix stripped, for the xDS node
    metadata (ztunnel's proxyMetadata handling); JSON values stay text here."""
    out = []
    for key, value in env.items():
        for prefix in ("ISTIO_METAJSON_", "ISTIO_META_"):
            if key.startswith(prefix) and key != prefix:
                out.append((("json:" if prefix == "ISTIO_METAJSON_" else "") + key[len(prefix):], value))
                break
    return tuple(sorted(out))


def parse_bool(source: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(source, "", f"invalid boolean {text!r}; accepted: {_BOOL_ACCEPTED}")


def parse_duration(source: str, text: str) -> float:
    """Seconds from "86400", "1.5", "24h", "30m", "90s", "500ms" or a sum like "1h30m"."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # float() also accepts "nan", "inf" and "1e3"; only plain non-negative decimals are durations.
        if re.fullmatch(r"\d+(?:\.\d+)?", value):
            return seconds
        raise ConfigError(source, "", f"invalid duration {text!r}; accepted: {_DURATION_ACCEPTED}")
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ConfigError(source, "", f"invalid duration {text!r}; accepted: {_DURATION_ACCEPTED}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_int(source: str, text: str, low: int, high: int | None = None) -> int:
    value = text.strip()
    # int() alone would accept "+5", "1_000" and " 5"; configs should use plain decimals.
    if not re.fullmatch(r"-?\d+", value):
        raise ConfigError(source, "", f"invalid integer {text!r}; accepted: a decimal integer, "
                          + _range_text(low, high))
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ConfigError(source, "", f"{number} out of range; accepted: {_range_text(low, high)}")
    return number


def _range_text(low: int, high: int | None) -> str:
    return f"{low}..{high}" if high is not None else f">= {low}"


def parse_workload_info(source: str, text: str) -> WorkloadInfo:
    parts = text.split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(
            source, "", f"invalid workload info {text!r}; accepted: <namespace>/<name>/<service account>"
        )
    return WorkloadInfo(namespace=parts[0], name=parts[1], service_account=parts[2])


def _choice(source: str, text: str, accepted: tuple[str, ...]) -> str:
    value = text.strip().lower()
    if value not in accepted:
        raise ConfigError(source, "", f"invalid value {text!r}; accepted: {', '.join(accepted)}")
    return value


def parse_log_level(source: str, text: str) -> str:
    """RUST_LOG in the forms ztunnel documents: "info" or "info,access=debug,hickory=off"."""
    for directive in text.split(","):
        directive = directive.strip()
        target, _, level = directive.rpartition("=")
        if "=" in directive and not target:
            level = ""  # "=debug": a target is required before "="
        if level.lower() not in _LOG_LEVELS:
            raise ConfigError(
                source, "",
                f"invalid log directive {directive!r} in {text!r}; accepted: comma-separated "
                f"<level> or <target>=<level>, level one of {', '.join(_LOG_LEVELS)}",
            )
    return text.strip()


T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    proxy_mode: ProxyMode = ProxyMode.SHARED  # PROXY_MODE
    workload_info: WorkloadInfo | None = None  # PROXY_WORKLOAD_INFO; always set when dedicated
    node_name: str = ""  # NODE_NAME: shared mode serves workloads whose `node` equals it
    cluster_id: str = DEFAULT_CLUSTER_ID  # CLUSTER_ID, else ISTIO_META_CLUSTER_ID
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN  # CLUSTER_DOMAIN
    trust_domain: str = DEFAULT_TRUST_DOMAIN  # TRUST_DOMAIN: of our own identities
    network: str = ""  # NETWORK: the network this node's workloads are on
    local_xds_path: Path | None = None  # LOCAL_XDS_PATH: local config file instead of xDS
    local_xds: str | None = None  # LOCAL_XDS: the same config inline (YAML)
    local_ca_dir: Path | None = None  # LOCAL_CA_DIR: issue workload certs from a local root CA
    secret_ttl: float = 86_400.0  # SECRET_TTL, seconds: lifetime of issued workload certs
    pool_max_streams_per_connection: int = 100  # POOL_MAX_STREAMS_PER_CONNECTION
    pool_unused_release_timeout: float = 300.0  # POOL_UNUSED_RELEASE_TIMEOUT, seconds idle
    http2_stream_window_size: int = 4_194_304  # HTTP2_STREAM_WINDOW_SIZE, bytes (4 MiB)
    http2_connection_window_size: int = 16_777_216  # HTTP2_CONNECTION_WINDOW_SIZE, bytes (16 MiB)
    http2_frame_size: int = 1_048_576  # HTTP2_FRAME_SIZE, bytes (1 MiB)
    worker_threads: int = 2  # ZTUNNEL_WORKER_THREADS: engine threads moving bytes
    engine: str = "auto"  # ZTUNNEL_ENGINE: auto|native|pure (ZTUNNEL_NO_EXTENSIONS forces pure)
    fast_path: bool = True  # ZTUNNEL_FAST_PATH: native workers accept 15001 and serve cached flows (ours)
    # ZTUNNEL_FAST_PATH_HANDOVER_RATE (ours): handovers per second of one flow class by one worker at
    # which that worker gets an HBONE connection of its own to the destination (0: never)
    fast_path_handover_rate: int = 200
    # ZTUNNEL_FAST_PATH_BATCH_WINDOW (ours), seconds: after a poll that took fast-path completions
    # the event loop takes the next ones in one batch this much later (0: a wake-up per poll)
    fast_path_batch_window: float = 0.005
    packet_mark: int = 1337  # PACKET_MARK: SO_MARK on upstream sockets so redirection skips them
    enable_orig_src: bool | None = None  # ENABLE_ORIG_SRC: spoof source IP; None = by mode
    ipv6_enabled: bool = True  # IPV6_ENABLED: bind [::] rather than 0.0.0.0
    node_local_fast_path: bool = False  # NODE_LOCAL_FAST_PATH: 1.18 same-node shortcut (ours)
    connect_timeout: float = 10.0  # CONNECT_TIMEOUT, seconds for an upstream TCP connect
    log_level: str = "info"  # RUST_LOG
    log_format: str = "text"  # LOG_FORMAT: text|json
    termination_grace_period: float | None = None  # TERMINATION_GRACE_PERIOD_SECONDS, seconds
    # CONNECTION_TERMINATION_DEADLINE, seconds: drain deadline; None = derived from the grace period
    connection_termination_deadline: float | None = None
    authz_policy_info_logging: bool = False  # AUTHZ_POLICY_INFO_LOGGING: policy decisions at info
    # -- joining a mesh: istiod and the pod's own facts (downward API in the Helm chart) --------
    xds: IstiodEndpoint | None = None  # XDS_ADDRESS, XDS_ROOT_CA, ALT_XDS_HOSTNAME, XDS_HEADER_*
    ca: IstiodEndpoint | None = None  # CA_ADDRESS, CA_ROOT_CA, ALT_CA_HOSTNAME, CA_HEADER_*
    # AUTH_TOKEN: a file path (re-read per use: projected tokens rotate), else a literal token;
    # None = DEFAULT_AUTH_TOKEN when that file exists, else no token.
    auth_token: str | None = None
    pod_name: str = ""  # POD_NAME
    pod_namespace: str = ""  # POD_NAMESPACE
    instance_ip: str = ""  # INSTANCE_IP
    service_account: str = ""  # SERVICE_ACCOUNT
    proxy_metadata: tuple[tuple[str, str], ...] = ()  # ISTIO_META_* / ISTIO_METAJSON_* ("json:" key prefix)
    # --- in-pod mode (istio-cni over ZDS); see `inpod` below
    inpod_enabled: bool = False  # INPOD_ENABLED: Istio's chart sets "true"
    inpod_uds: Path | None = None  # INPOD_UDS: istio-cni's ZDS socket; setting it also enables in-pod mode
    # ZTUNNEL_REDIRECTION: "node" = keep the node's ipset from the state (see redirection_from_env)
    redirection: str = "none"
    # -- bounded cost of strangers on 15008 (no ztunnel names exist for these) --
    tls_handshake_timeout: float = 10.0  # TLS_HANDSHAKE_TIMEOUT, seconds from accept to a verified peer
    max_pending_tls_handshakes: int = 1024  # MAX_PENDING_TLS_HANDSHAKES: beyond it, new ones are refused

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Config":
        def get(name: str) -> str | None:
            value = env.get(name)
            return value if value else None  # empty == unset (see module docstring)

        def parsed(name: str, parse: Callable[[str, str], T], default: T) -> T:
            value = get(name)
            return default if value is None else parse(name, value)

        mode = parsed("PROXY_MODE", lambda s, v: ProxyMode(_choice(s, v, ("shared", "dedicated"))),
                      ProxyMode.SHARED)
        # Validated whenever set, so a typo surfaces even in shared mode where it is unused.
        workload_info = parsed("PROXY_WORKLOAD_INFO", parse_workload_info, None)
        if mode is ProxyMode.DEDICATED and workload_info is None:
            raise ConfigError(
                "PROXY_WORKLOAD_INFO", "",
                "required when PROXY_MODE=dedicated; accepted: <namespace>/<name>/<service account>",
            )

        local_xds_path = get("LOCAL_XDS_PATH")
        local_xds = get("LOCAL_XDS")
        if local_xds_path is not None and local_xds is not None:
            raise ConfigError("LOCAL_XDS", "", "LOCAL_XDS and LOCAL_XDS_PATH are both set; set only one")

        engine = parsed("ZTUNNEL_ENGINE", lambda s, v: _choice(s, v, _ENGINES), "auto")
        if parsed("ZTUNNEL_NO_EXTENSIONS", parse_bool, False):
            # Asking for the native engine while disabling extensions is contradictory: refuse
            # rather than guess which of the two the operator meant.
            if engine == "native":
                raise ConfigError(
                    "ZTUNNEL_ENGINE", "",
                    "native conflicts with ZTUNNEL_NO_EXTENSIONS=true; accepted: auto or pure",
                )
            engine = "pure"

        def duration(low_exclusive: bool):
            def parse(source: str, text: str) -> float:
                seconds = parse_duration(source, text)
                if low_exclusive and seconds <= 0:
                    raise ConfigError(source, "", f"{text!r} must be greater than zero")
                return seconds
            return parse

        def batch_window(source: str, text: str) -> float:
            seconds = parse_duration(source, text)
            if seconds > 1:  # completions (metrics, access logs, drain) must not lag for long
                raise ConfigError(source, "", f"{text!r} is longer than the 1s the batch window allows")
            return seconds

        def bounded(low: int, high: int | None = None):
            return lambda s, v: parse_int(s, v, low, high)

        return cls(
            proxy_mode=mode,
            workload_info=workload_info,
            node_name=get("NODE_NAME") or "",
            # ISTIO_META_CLUSTER_ID (what Istio's chart sets) wins over CLUSTER_ID, as in ztunnel.
            cluster_id=get("ISTIO_META_CLUSTER_ID") or get("CLUSTER_ID") or DEFAULT_CLUSTER_ID,
            cluster_domain=get("CLUSTER_DOMAIN") or DEFAULT_CLUSTER_DOMAIN,
            trust_domain=get("TRUST_DOMAIN") or DEFAULT_TRUST_DOMAIN,
            network=get("NETWORK") or "",
            local_xds_path=Path(local_xds_path) if local_xds_path is not None else None,
            local_xds=local_xds,
            local_ca_dir=parsed("LOCAL_CA_DIR", lambda s, v: Path(v), None),
            secret_ttl=parsed("SECRET_TTL", duration(True), 86_400.0),
            pool_max_streams_per_connection=parsed("POOL_MAX_STREAMS_PER_CONNECTION", bounded(1), 100),
            pool_unused_release_timeout=parsed("POOL_UNUSED_RELEASE_TIMEOUT", duration(True), 300.0),
            http2_stream_window_size=parsed("HTTP2_STREAM_WINDOW_SIZE", bounded(1, _MAX_WINDOW),
                                            4_194_304),
            http2_connection_window_size=parsed("HTTP2_CONNECTION_WINDOW_SIZE",
                                                bounded(1, _MAX_WINDOW), 16_777_216),
            http2_frame_size=parsed("HTTP2_FRAME_SIZE", bounded(_MIN_FRAME, _MAX_FRAME), 1_048_576),
            worker_threads=worker_threads_from_env(env),
            engine=engine,
            fast_path=parsed("ZTUNNEL_FAST_PATH", parse_bool, True),
            fast_path_handover_rate=parsed("ZTUNNEL_FAST_PATH_HANDOVER_RATE", bounded(0, 2**32 - 1), 200),
            fast_path_batch_window=parsed("ZTUNNEL_FAST_PATH_BATCH_WINDOW", batch_window, 0.005),
            packet_mark=parsed("PACKET_MARK", bounded(0, 2**32 - 1), 1337),  # SO_MARK is a u32
            enable_orig_src=parsed("ENABLE_ORIG_SRC", parse_bool, None),
            ipv6_enabled=parsed("IPV6_ENABLED", parse_bool, True),
            node_local_fast_path=parsed("NODE_LOCAL_FAST_PATH", parse_bool, False),
            connect_timeout=parsed("CONNECT_TIMEOUT", duration(True), 10.0),
            log_level=parsed("RUST_LOG", parse_log_level, "info"),
            log_format=parsed("LOG_FORMAT", lambda s, v: _choice(s, v, _LOG_FORMATS), "text"),
            termination_grace_period=parsed("TERMINATION_GRACE_PERIOD_SECONDS", duration(False), None),
            connection_termination_deadline=parsed("CONNECTION_TERMINATION_DEADLINE", duration(False), None),
            authz_policy_info_logging=parsed("AUTHZ_POLICY_INFO_LOGGING", parse_bool, False),
            xds=istiod_endpoint(env, "XDS"),
            ca=istiod_endpoint(env, "CA"),
            auth_token=get("AUTH_TOKEN"),
            pod_name=get("POD_NAME") or "",
            pod_namespace=get("POD_NAMESPACE") or "",
            instance_ip=get("INSTANCE_IP") or "",
            service_account=get("SERVICE_ACCOUNT") or "",
            proxy_metadata=proxy_metadata(env),
            # in-pod mode (ZDS)
            inpod_enabled=parsed("INPOD_ENABLED", parse_bool, False),
            inpod_uds=parsed("INPOD_UDS", lambda s, v: Path(v), None),
            redirection=redirection_from_env(env, mode),
            tls_handshake_timeout=parsed("TLS_HANDSHAKE_TIMEOUT", duration(True), 10.0),
            max_pending_tls_handshakes=parsed("MAX_PENDING_TLS_HANDSHAKES", bounded(1), 1024),
        )

    # --- in-pod mode (ZDS) -------------------------------------------------------------------
    @property
    def inpod(self) -> bool:
        """In-pod mode: a shared proxy that serves the pods istio-cni hands over (listeners in each
        pod's netns) instead of binding node-level listeners.  On with INPOD_ENABLED=true, as
        Istio's chart sets it, or when INPOD_UDS is set; dedicated mode never is."""
        return self.proxy_mode is ProxyMode.SHARED and (self.inpod_enabled or self.inpod_uds is not None)

    @property
    def inpod_socket(self) -> Path:
        return self.inpod_uds if self.inpod_uds is not None else DEFAULT_INPOD_UDS

    def identity(self) -> Identity | None:
        """The one identity a dedicated proxy serves; None in shared mode (identities per workload)."""
        if self.proxy_mode is not ProxyMode.DEDICATED or self.workload_info is None:
            return None
        return Identity(self.trust_domain, self.workload_info.namespace,
                        self.workload_info.service_account)


# ------------------------------------------------------------------ CPU limit and worker threads
#
# The Helm chart passes the container's CPU limit as ZTUNNEL_CPU_LIMIT (downward API, limits.cpu
# with divisor 1: whole CPUs rounded up, and the node's CPUs when no limit is set) and, only when
# the values set them, the quantities themselves as ZTUNNEL_RESOURCE_CPU_LIMIT/_REQUEST.  The
# engine's worker threads follow ztunnel's rule (reference section 10):
# - ZTUNNEL_WORKER_THREADS: N threads, or "N%" of the CPUs, or 0 = all CPUs, where the CPUs are
#   ZTUNNEL_CPU_LIMIT, else the machine's (the one read outside `env`);
# - unset, with a CPU limit in the values: ceil(limit), at least 1 (never more threads than CPUs);
# - unset otherwise: a quarter of ZTUNNEL_CPU_LIMIT rounded up, at least DEFAULT_WORKER_THREADS,
#   raised to ceil(request) when the values request more CPUs than that.

DEFAULT_WORKER_THREADS = 2  # ztunnel's default; also when nothing tells us the CPU count


def parse_cpu_quantity(source: str, text: str) -> float:
    """CPUs from a Kubernetes CPU quantity: "2", "1.5" or millicores "500m"; must be > 0."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", value)
    if match is None:
        raise ConfigError(source, "", f"invalid CPU quantity {text!r}; accepted: CPUs (\"2\", \"1.5\") "
                          "or millicores (\"500m\")")
    cpus = float(match.group(1)) / (1000 if match.group(2) else 1)
    if cpus <= 0:
        raise ConfigError(source, "", f"{text!r} must be greater than zero")
    return cpus


def worker_threads_from_env(env: Mapping[str, str], machine_cpus: Callable[[], int | None] = os.cpu_count) -> int:
    def cpus() -> float:
        limit = env.get("ZTUNNEL_CPU_LIMIT")
        if limit:
            return parse_cpu_quantity("ZTUNNEL_CPU_LIMIT", limit)
        return float(machine_cpus() or 1)

    explicit = (env.get("ZTUNNEL_WORKER_THREADS") or "").strip()
    if explicit.endswith("%"):
        percent = parse_int("ZTUNNEL_WORKER_THREADS", explicit[:-1], 1, 100)
        return max(1, math.ceil(cpus() * percent / 100))
    if explicit:
        threads = parse_int("ZTUNNEL_WORKER_THREADS", explicit, 0)
        return threads or max(1, math.ceil(cpus()))
    limit = env.get("ZTUNNEL_RESOURCE_CPU_LIMIT")
    if limit:
        return max(1, math.ceil(parse_cpu_quantity("ZTUNNEL_RESOURCE_CPU_LIMIT", limit)))
    threads = DEFAULT_WORKER_THREADS
    if env.get("ZTUNNEL_CPU_LIMIT"):
        threads = max(threads, math.ceil(cpus() / 4))
    request = env.get("ZTUNNEL_RESOURCE_CPU_REQUEST")
    if request:
        threads = max(threads, math.ceil(parse_cpu_quantity("ZTUNNEL_RESOURCE_CPU_REQUEST", request)))
    return threads


# ------------------------------------------------------------------ node redirection
#
# ZTUNNEL_REDIRECTION=node (the chart's `redirection: node`): in shared mode in the node's network
# namespace, ztunnel-fast installs the node's TPROXY rules if absent and keeps the ipset
# ztunnel-pods-ips equal to the IPs of the HBONE workloads on NODE_NAME (redirect/node_sync.py).
# "none" (default): something else redirects (istio-cni in-pod, or `ztunnel-fast redirect`).

_REDIRECTIONS = ("none", "node")


def redirection_from_env(env: Mapping[str, str], mode: ProxyMode) -> str:
    text = env.get("ZTUNNEL_REDIRECTION")
    if not text:
        return "none"
    value = _choice("ZTUNNEL_REDIRECTION", text, _REDIRECTIONS)
    if value == "node":
        if mode is not ProxyMode.SHARED:
            raise ConfigError("ZTUNNEL_REDIRECTION", "",
                              "node needs PROXY_MODE=shared (it serves every workload on NODE_NAME)")
        if not env.get("NODE_NAME"):
            raise ConfigError("ZTUNNEL_REDIRECTION", "", "node needs NODE_NAME (the node whose pods to capture)")
        inpod = env.get("INPOD_ENABLED")
        if inpod and parse_bool("INPOD_ENABLED", inpod):
            raise ConfigError("ZTUNNEL_REDIRECTION", "",
                              "node conflicts with INPOD_ENABLED=true; accepted: one of the two")
    return value
