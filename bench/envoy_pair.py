"""Envoy as a transparent per-pod HBONE proxy pair, built on the proven builders of
tests/interop/envoy.py (imported, not copied).

  pod client: app ──tcp <server>:<port>──▶ iptables REDIRECT ──▶ Envoy originator 0.0.0.0:15001
              (original_dst listener filter restores <server>:<port>; tcp_proxy tunneling_config
              hostname %DOWNSTREAM_LOCAL_ADDRESS% => CONNECT <server>:<port>), upstream sockets carry
              SO_MARK 1337 so the REDIRECT rule lets them out, exactly as ztunnel-fast's do
  pod server: Envoy terminator <server>:15008 (mTLS, h2, allow_connect, CONNECT terminated) ──tcp──▶
              app <server>:<port>, chosen by the CONNECT authority (one virtual host per app port)

TLS 1.3 only, ALPN h2, certificates from the Lab's local CA, SPIFFE URI SAN checked both ways (the
builders refuse an empty SAN list).  Envoy's own HTTP/2 defaults are kept (windows, buffers); the
circuit breakers are lifted as Istio does, or Envoy would refuse tunnels beyond 1,024.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from tests.interop.envoy import hbone_originator, hbone_terminator

HBONE_PORT = 15008
OUTBOUND_PORT = 15001
SOL_SOCKET, SO_MARK = 1, 36  # Linux values, for Envoy's raw socket_options
# Envoy's default circuit breakers allow 1,024 connections / requests / pending requests per cluster
# and priority: a CONNECT tunnel is one request, so 10,000 tunnels would be cut at 1,024.  Istio
# lifts them the same way (max_connections etc. = 2^32 - 1 on its clusters).
UNLIMITED = 4_294_967_295
NO_CIRCUIT_BREAKING = {"thresholds": [{
    "priority": "DEFAULT", "max_connections": UNLIMITED, "max_pending_requests": UNLIMITED,
    "max_requests": UNLIMITED, "max_retries": UNLIMITED,
}]}
ORIGINAL_DST_FILTER = {
    "name": "envoy.filters.listener.original_dst",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"},
}


def transparent_originator(client_ip: str, server_ip: str, client_certs: Any, root_path: Any,
                           server_sans: Sequence[str], mark: int = 1337) -> dict:
    cfg = hbone_originator(("0.0.0.0", OUTBOUND_PORT), (server_ip, HBONE_PORT), "%DOWNSTREAM_LOCAL_ADDRESS%",
                           client_certs, root_path, server_sans)
    res = cfg["static_resources"]
    listener = res["listeners"][0]
    listener["listener_filters"] = [copy.deepcopy(ORIGINAL_DST_FILTER)]
    cluster = res["clusters"][0]
    cluster["circuit_breakers"] = copy.deepcopy(NO_CIRCUIT_BREAKING)
    cluster["upstream_bind_config"] = {
        "source_address": {"address": client_ip, "port_value": 0},
        "socket_options": [{"description": "SO_MARK: bypass the outbound REDIRECT", "level": SOL_SOCKET,
                            "name": SO_MARK, "int_value": mark, "state": "STATE_PREBIND"}],
    }
    return cfg


def multi_port_terminator(server_ip: str, app_ports: Sequence[int], server_certs: Any, root_path: Any,
                          client_sans: Sequence[str]) -> dict:
    if not app_ports:
        raise ValueError("at least one app port")
    cfg = hbone_terminator((server_ip, HBONE_PORT), (server_ip, app_ports[0]), server_certs, root_path, client_sans)
    res = cfg["static_resources"]
    template_cluster = res["clusters"][0]
    hcm = res["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    template_vhost = hcm["route_config"]["virtual_hosts"][0]
    vhosts, clusters = [], []
    for port in app_ports:
        name = f"app_{port}"
        vhost = copy.deepcopy(template_vhost)
        vhost["name"] = name
        vhost["domains"] = [f"{server_ip}:{port}"]
        for route in vhost["routes"]:
            route["route"]["cluster"] = name
        vhosts.append(vhost)
        cluster = copy.deepcopy(template_cluster)
        cluster["name"] = name
        cluster["circuit_breakers"] = copy.deepcopy(NO_CIRCUIT_BREAKING)
        cluster["load_assignment"]["cluster_name"] = name
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] = {
            "address": server_ip, "port_value": int(port)}
        clusters.append(cluster)
    hcm["route_config"]["virtual_hosts"] = vhosts
    res["clusters"] = clusters
    return cfg
