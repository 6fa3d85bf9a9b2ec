"""Config.from_env: defaults, every accepted spelling, every refusal (source and reason)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztunnel_fast import config as config_mod
from ztunnel_fast.config import Config, ProxyMode, WorkloadInfo
from ztunnel_fast.errors import ConfigError
from ztunnel_fast.identity.spiffe import Identity


def test_defaults():
    cfg = Config.from_env({})
    assert cfg == Config()
    assert cfg.proxy_mode is ProxyMode.SHARED
    assert cfg.workload_info is None
    assert cfg.node_name == ""
    assert cfg.cluster_id == "Kubernetes"
    assert cfg.cluster_domain == "cluster.local"
    assert cfg.trust_domain == "cluster.local"
    assert cfg.network == ""
    assert cfg.local_xds_path is None and cfg.local_xds is None and cfg.local_ca_dir is None
    assert cfg.secret_ttl == 86_400.0
    assert cfg.pool_max_streams_per_connection == 100
    assert cfg.pool_unused_release_timeout == 300.0
    assert cfg.http2_stream_window_size == 4_194_304
    assert cfg.http2_connection_window_size == 16_777_216
    assert cfg.http2_frame_size == 1_048_576
    assert cfg.worker_threads == 2
    assert cfg.engine == "auto"
    assert cfg.packet_mark == 1337
    assert cfg.enable_orig_src is None
    assert cfg.ipv6_enabled is True
    assert cfg.node_local_fast_path is False
    assert cfg.fast_path is True  # the flow caches are on unless ZTUNNEL_FAST_PATH=false
    assert cfg.fast_path_handover_rate == 200  # hand-overs per second that give a worker its own connection
    assert cfg.fast_path_batch_window == 0.005  # fast-path completions come to the event loop in 5 ms batches
    assert cfg.connect_timeout == 10.0
    assert cfg.tls_handshake_timeout == 10.0
    assert cfg.max_pending_tls_handshakes == 1024
    assert cfg.log_level == "info"
    assert cfg.log_format == "text"
    assert cfg.termination_grace_period is None  # unset: the drain deadline defaults to 5 s (app.drain_deadline)
    assert cfg.identity() is None


def test_ports():
    assert (config_mod.OUTBOUND_PORT, config_mod.INBOUND_PLAINTEXT_PORT, config_mod.INBOUND_PORT,
            config_mod.ADMIN_PORT, config_mod.STATS_PORT, config_mod.READINESS_PORT) == (
        15001, 15006, 15008, 15000, 15020, 15021)
    assert config_mod.SELF_PORTS == frozenset({15001, 15006, 15008})


def test_all_set():
    env = {
        "PROXY_MODE": "dedicated",
        "PROXY_WORKLOAD_INFO": "default/local/sleep",
        "NODE_NAME": "node-1",
        "CLUSTER_ID": "c1",
        "CLUSTER_DOMAIN": "example.local",
        "TRUST_DOMAIN": "td.example",
        "NETWORK": "net1",
        "LOCAL_XDS_PATH": "/etc/ztunnel/local.yaml",
        "LOCAL_CA_DIR": "/var/lib/ca",
        "SECRET_TTL": "12h",
        "POOL_MAX_STREAMS_PER_CONNECTION": "7",
        "POOL_UNUSED_RELEASE_TIMEOUT": "90s",
        "HTTP2_STREAM_WINDOW_SIZE": "65535",
        "HTTP2_CONNECTION_WINDOW_SIZE": "2147483647",
        "HTTP2_FRAME_SIZE": "16384",
        "ZTUNNEL_WORKER_THREADS": "4",
        "ZTUNNEL_ENGINE": "native",
        "PACKET_MARK": "0",
        "ENABLE_ORIG_SRC": "Yes",
        "IPV6_ENABLED": "FALSE",
        "NODE_LOCAL_FAST_PATH": "1",
        "CONNECT_TIMEOUT": "500ms",
        "TLS_HANDSHAKE_TIMEOUT": "2s",
        "MAX_PENDING_TLS_HANDSHAKES": "50",
        "RUST_LOG": "info,access=debug",
        "LOG_FORMAT": "json",
        "TERMINATION_GRACE_PERIOD_SECONDS": "0",
        "ZTUNNEL_FAST_PATH": "false",
        "ZTUNNEL_FAST_PATH_HANDOVER_RATE": "0",
        "ZTUNNEL_FAST_PATH_BATCH_WINDOW": "0",
    }
    cfg = Config.from_env(env)
    assert cfg == Config(
        proxy_mode=ProxyMode.DEDICATED,
        workload_info=WorkloadInfo("default", "local", "sleep"),
        node_name="node-1",
        cluster_id="c1",
        cluster_domain="example.local",
        trust_domain="td.example",
        network="net1",
        local_xds_path=Path("/etc/ztunnel/local.yaml"),
        local_xds=None,
        local_ca_dir=Path("/var/lib/ca"),
        secret_ttl=43_200.0,
        pool_max_streams_per_connection=7,
        pool_unused_release_timeout=90.0,
        http2_stream_window_size=65_535,
        http2_connection_window_size=2**31 - 1,
        http2_frame_size=16_384,
        worker_threads=4,
        engine="native",
        packet_mark=0,
        enable_orig_src=True,
        ipv6_enabled=False,
        node_local_fast_path=True,
        connect_timeout=0.5,
        tls_handshake_timeout=2.0,
        max_pending_tls_handshakes=50,
        log_level="info,access=debug",
        log_format="json",
        termination_grace_period=0.0,
        fast_path=False,
        fast_path_handover_rate=0,
        fast_path_batch_window=0.0,
    )
    assert cfg.identity() == Identity("td.example", "default", "sleep")


def test_identity_only_in_dedicated_mode():
    cfg = Config.from_env({"PROXY_WORKLOAD_INFO": "ns/name/sa"})
    assert cfg.workload_info == WorkloadInfo("ns", "name", "sa")
    assert cfg.identity() is None


def test_cluster_id_precedence():
    # Istio's chart sets ISTIO_META_CLUSTER_ID; like ztunnel, it wins over CLUSTER_ID.
    assert Config.from_env({"ISTIO_META_CLUSTER_ID": "meta"}).cluster_id == "meta"
    assert Config.from_env({"ISTIO_META_CLUSTER_ID": "meta", "CLUSTER_ID": "c"}).cluster_id == "meta"
    assert Config.from_env({"CLUSTER_ID": "c"}).cluster_id == "c"


def test_istiod_endpoints():
    cfg = Config.from_env({"XDS_ADDRESS": "istiod.istio-system.svc:15012", "XDS_HEADER_X_Tenant": "a",
                           "ALT_XDS_HOSTNAME": "istiod.example", "CA_ROOT_CA": "SYSTEM"})
    assert cfg.xds.address == "https://istiod.istio-system.svc:15012"
    assert cfg.xds.authority == "istiod.istio-system.svc:15012" and cfg.xds.host == "istiod.istio-system.svc"
    assert cfg.xds.headers == (("x_tenant", "a"),) and cfg.xds.server_name == "istiod.example"
    assert cfg.ca is None  # no CA_ADDRESS and not in a cluster
    in_cluster = Config.from_env({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "CA_ROOT_CA": "SYSTEM"})
    assert in_cluster.xds.address == in_cluster.ca.address == "https://istiod.istio-system.svc:15012"
    assert in_cluster.ca.root_ca == "SYSTEM" and in_cluster.xds.root_ca == "/var/run/secrets/istio/root-cert.pem"
    with pytest.raises(ConfigError, match="XDS_ADDRESS"):
        Config.from_env({"XDS_ADDRESS": "ftp://istiod:15012"})
    with pytest.raises(ConfigError, match="invalid port"):
        Config.from_env({"CA_ADDRESS": "istiod:abc"})


def test_pod_facts_and_proxy_metadata():
    cfg = Config.from_env({"POD_NAME": "ztunnel-x", "POD_NAMESPACE": "istio-system", "INSTANCE_IP": "10.0.0.5",
                           "SERVICE_ACCOUNT": "ztunnel", "ISTIO_META_ENABLE_HBONE": "true",
                           "ISTIO_METAJSON_LABELS": '{"a":"b"}'})
    assert (cfg.pod_name, cfg.pod_namespace, cfg.instance_ip, cfg.service_account) == (
        "ztunnel-x", "istio-system", "10.0.0.5", "ztunnel")
    assert cfg.proxy_metadata == (("ENABLE_HBONE", "true"), ("json:LABELS", '{"a":"b"}'))


def test_empty_value_is_unset():
    assert Config.from_env({"SECRET_TTL": "", "PROXY_MODE": "", "IPV6_ENABLED": ""}) == Config()


def test_inline_local_xds():
    assert Config.from_env({"LOCAL_XDS": "workloads: []"}).local_xds == "workloads: []"


@pytest.mark.parametrize("text,seconds", [
    ("86400", 86_400.0), ("1.5", 1.5), ("24h", 86_400.0), ("30m", 1_800.0), ("90s", 90.0),
    ("250ms", 0.25), ("1h30m", 5_400.0), (" 5s ", 5.0),
])
def test_durations(text, seconds):
    assert Config.from_env({"SECRET_TTL": text}).secret_ttl == seconds


@pytest.mark.parametrize("text,value", [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False),
])
def test_booleans(text, value):
    assert Config.from_env({"ENABLE_ORIG_SRC": text}).enable_orig_src is value
    assert Config.from_env({"IPV6_ENABLED": text}).ipv6_enabled is value


@pytest.mark.parametrize("env", [{"ZTUNNEL_NO_EXTENSIONS": "1"},
                                 {"ZTUNNEL_NO_EXTENSIONS": "true", "ZTUNNEL_ENGINE": "auto"},
                                 {"ZTUNNEL_NO_EXTENSIONS": "1", "ZTUNNEL_ENGINE": "pure"}])
def test_no_extensions_forces_pure(env):
    assert Config.from_env(env).engine == "pure"


def test_no_extensions_false_keeps_engine():
    assert Config.from_env({"ZTUNNEL_NO_EXTENSIONS": "0", "ZTUNNEL_ENGINE": "native"}).engine == "native"


def test_case_insensitive_choices():
    cfg = Config.from_env({"PROXY_MODE": "Shared", "ZTUNNEL_ENGINE": "PURE", "LOG_FORMAT": "JSON"})
    assert (cfg.proxy_mode, cfg.engine, cfg.log_format) == (ProxyMode.SHARED, "pure", "json")


@pytest.mark.parametrize("env,source,reason", [
    ({"PROXY_MODE": "node"}, "PROXY_MODE", "accepted: shared, dedicated"),
    ({"PROXY_MODE": "dedicated"}, "PROXY_WORKLOAD_INFO", "required when PROXY_MODE=dedicated"),
    ({"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/name"}, "PROXY_WORKLOAD_INFO",
     "<namespace>/<name>/<service account>"),
    ({"PROXY_WORKLOAD_INFO": "ns//sa"}, "PROXY_WORKLOAD_INFO", "invalid workload info"),
    ({"PROXY_WORKLOAD_INFO": "a/b/c/d"}, "PROXY_WORKLOAD_INFO", "invalid workload info"),
    ({"LOCAL_XDS": "{}", "LOCAL_XDS_PATH": "/x.yaml"}, "LOCAL_XDS", "both set"),
    ({"SECRET_TTL": "1d"}, "SECRET_TTL", "invalid duration '1d'"),
    ({"SECRET_TTL": "-5"}, "SECRET_TTL", "invalid duration"),
    ({"SECRET_TTL": "0"}, "SECRET_TTL", "greater than zero"),
    ({"SECRET_TTL": "nan"}, "SECRET_TTL", "invalid duration"),
    ({"SECRET_TTL": "1e3"}, "SECRET_TTL", "invalid duration"),
    ({"SECRET_TTL": "h"}, "SECRET_TTL", "invalid duration"),
    ({"SECRET_TTL": "5s3"}, "SECRET_TTL", "invalid duration"),
    ({"POOL_UNUSED_RELEASE_TIMEOUT": "0s"}, "POOL_UNUSED_RELEASE_TIMEOUT", "greater than zero"),
    ({"POOL_UNUSED_RELEASE_TIMEOUT": "soon"}, "POOL_UNUSED_RELEASE_TIMEOUT", "units ms, s, m, h"),
    ({"CONNECT_TIMEOUT": "0"}, "CONNECT_TIMEOUT", "greater than zero"),
    ({"TLS_HANDSHAKE_TIMEOUT": "0s"}, "TLS_HANDSHAKE_TIMEOUT", "greater than zero"),
    ({"TLS_HANDSHAKE_TIMEOUT": "soon"}, "TLS_HANDSHAKE_TIMEOUT", "invalid duration"),
    ({"MAX_PENDING_TLS_HANDSHAKES": "0"}, "MAX_PENDING_TLS_HANDSHAKES", "accepted: >= 1"),
    ({"MAX_PENDING_TLS_HANDSHAKES": "many"}, "MAX_PENDING_TLS_HANDSHAKES", "invalid integer"),
    ({"TERMINATION_GRACE_PERIOD_SECONDS": "-1"}, "TERMINATION_GRACE_PERIOD_SECONDS", "invalid duration"),
    ({"POOL_MAX_STREAMS_PER_CONNECTION": "0"}, "POOL_MAX_STREAMS_PER_CONNECTION", "accepted: >= 1"),
    ({"POOL_MAX_STREAMS_PER_CONNECTION": "ten"}, "POOL_MAX_STREAMS_PER_CONNECTION", "invalid integer"),
    ({"POOL_MAX_STREAMS_PER_CONNECTION": "1_000"}, "POOL_MAX_STREAMS_PER_CONNECTION", "invalid integer"),
    ({"HTTP2_STREAM_WINDOW_SIZE": "0"}, "HTTP2_STREAM_WINDOW_SIZE", "accepted: 1..2147483647"),
    ({"HTTP2_STREAM_WINDOW_SIZE": "2147483648"}, "HTTP2_STREAM_WINDOW_SIZE", "out of range"),
    ({"HTTP2_CONNECTION_WINDOW_SIZE": "2147483648"}, "HTTP2_CONNECTION_WINDOW_SIZE", "out of range"),
    ({"HTTP2_CONNECTION_WINDOW_SIZE": "-1"}, "HTTP2_CONNECTION_WINDOW_SIZE", "out of range"),
    ({"HTTP2_FRAME_SIZE": "16383"}, "HTTP2_FRAME_SIZE", "accepted: 16384..16777215"),
    ({"HTTP2_FRAME_SIZE": "16777216"}, "HTTP2_FRAME_SIZE", "out of range"),
    ({"ZTUNNEL_WORKER_THREADS": "-1"}, "ZTUNNEL_WORKER_THREADS", "out of range"),  # 0 = all CPUs, "N%" (ztunnel)
    ({"ZTUNNEL_WORKER_THREADS": "4x"}, "ZTUNNEL_WORKER_THREADS", "invalid integer"),
    ({"ZTUNNEL_ENGINE": "fast"}, "ZTUNNEL_ENGINE", "accepted: auto, native, pure"),
    ({"ZTUNNEL_ENGINE": "native", "ZTUNNEL_NO_EXTENSIONS": "1"}, "ZTUNNEL_ENGINE", "conflicts"),
    ({"ZTUNNEL_NO_EXTENSIONS": "please"}, "ZTUNNEL_NO_EXTENSIONS", "invalid boolean"),
    ({"PACKET_MARK": "4294967296"}, "PACKET_MARK", "out of range"),
    ({"PACKET_MARK": "0x539"}, "PACKET_MARK", "invalid integer"),
    ({"ENABLE_ORIG_SRC": "maybe"}, "ENABLE_ORIG_SRC", "true/false, 1/0 or yes/no"),
    ({"IPV6_ENABLED": "on"}, "IPV6_ENABLED", "invalid boolean 'on'"),
    ({"NODE_LOCAL_FAST_PATH": "2"}, "NODE_LOCAL_FAST_PATH", "invalid boolean"),
    ({"RUST_LOG": "verbose"}, "RUST_LOG", "invalid log directive 'verbose'"),
    ({"RUST_LOG": "info,access=loud"}, "RUST_LOG", "invalid log directive 'access=loud'"),
    ({"RUST_LOG": "=debug"}, "RUST_LOG", "invalid log directive"),
    ({"RUST_LOG": "info,"}, "RUST_LOG", "invalid log directive"),
    ({"LOG_FORMAT": "yaml"}, "LOG_FORMAT", "accepted: text, json"),
    ({"ZTUNNEL_FAST_PATH_HANDOVER_RATE": "-1"}, "ZTUNNEL_FAST_PATH_HANDOVER_RATE", "out of range; accepted: 0..4294967295"),
    ({"ZTUNNEL_FAST_PATH_HANDOVER_RATE": "fast"}, "ZTUNNEL_FAST_PATH_HANDOVER_RATE", "invalid integer 'fast'"),
    ({"ZTUNNEL_FAST_PATH_BATCH_WINDOW": "2s"}, "ZTUNNEL_FAST_PATH_BATCH_WINDOW", "longer than the 1s the batch window allows"),
    ({"ZTUNNEL_FAST_PATH_BATCH_WINDOW": "-5ms"}, "ZTUNNEL_FAST_PATH_BATCH_WINDOW", "invalid duration"),
])
def test_refusals(env, source, reason):
    with pytest.raises(ConfigError) as info:
        Config.from_env(env)
    assert info.value.source == source
    assert info.value.key == ""
    assert reason in info.value.reason


def test_log_levels_case_insensitive():
    assert Config.from_env({"RUST_LOG": "WARN,hickory=Off"}).log_level == "WARN,hickory=Off"


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().node_name = "x"  # type: ignore[misc]
