"""The setups measured side by side, and how each one is started in a BenchLab.

  direct  client ──▶ server app                                   (no proxy: the reference)
  native  client ──REDIRECT──▶ ztunnel-fast (ZTUNNEL_ENGINE=native) ══HBONE══▶ ztunnel-fast ─▶ app
  pure    the same with ZTUNNEL_ENGINE=pure (the pure-Python twin)
  envoy   client ──REDIRECT──▶ Envoy originator  ══HBONE══▶ Envoy terminator ──▶ app  (--concurrency 2)
  envoy1  the same with --concurrency 1 (issue 14's held-out configuration)
  fastpath  native with ZTUNNEL_FAST_PATH=true on both sides (the workers' flow caches: outbound
          connections on the client side, inbound CONNECTs on the server side);
          only the figures the fast path can move (idle, throughput, new connections, scaling)
  xds     native in xDS mode, the real deployment's: workloads over xDS and certificates from the
          fake istiod (ztunnel_fast.fakes.istiod, in a third pod, as `make demo` runs it), so
          grpcio, protobuf and the xDS client are loaded; only idle RSS (issue 11 item 4) and the
          path check (the byte path is the same engine as `native`)
  relay   client ──REDIRECT──▶ plain TCP relay ──tcp──▶ plain TCP relay ──▶ app (bench/relay.py):
          no TLS, no HTTP/2, bytes moved by splice(2) — what any proxy pair pays here (the floor);
          only throughput, CPU/GB and syscalls
  relaycopy  the same relay with recv_into()/send() through a 256 KiB buffer: the two user-space
          copies per proxy a user-space TLS proxy cannot avoid
  relayaead  a relay pair in C (bench/relay_aead.c) with AES-128-GCM in 16 KiB records between the
          relays: recv, seal or open, send - the least a user-space TLS proxy pair does, measured

In every setup the load generators connect to <server ip>:<app port>; the proxied setups capture
the client pod's outbound TCP with the same iptables rule (netns.redirect_outbound: REDIRECT to
15001, sockets marked 1337 exempt).  Both proxies of a pair are measured (client and server side).

Threads: `start(bl, threads)` gives both proxies `threads` worker threads (ZTUNNEL_WORKER_THREADS,
Envoy --concurrency); None = the setup's own (Settings.worker_threads for ztunnel-fast, 2 or 1
for Envoy).  `scales` says whether the new-connection scaling figure (1 vs 2 threads) applies;
`skip` names steps a setup leaves out (envoy1 duplicates envoy's tunnel and scaling figures).

Invariants: `start` returns only once both proxies are ready; whatever it starts belongs to the
BenchLab's topology and is stopped by its teardown, also when `start` fails half way.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ztunnel_fast import netns
from ztunnel_fast.demo.lab import LabIstiod

from .lab import APP_PORTS, BenchLab
from .procstat import Proxies

ENVOY_CONCURRENCY = 2  # worker threads; ztunnel's default is 2 workers too
ENVOY_LOG_LEVEL = "warning"
# ztunnel-fast logs one line per connection at info; Envoy has no access log here.  For a like-for-
# like data path both run without per-connection logs (ztunnel-fast keeps its start-up line).
ZTUNNEL_LOG_LEVEL = "warn,ztunnel_fast::app=info"


@dataclass
class Started:
    proxies: Proxies
    info: dict = field(default_factory=dict)  # what the report shows about the setup (engine, threads)


class Setup:
    name = ""
    label = ""
    proxied = True
    scales = False  # has worker threads: the new-connection rate at 1 and 2 of them is measured
    skip: frozenset = frozenset()  # step keys this setup does not run
    threads_label = ""  # how its thread count is set, for the configuration line

    def available(self) -> tuple[bool, str]:
        return True, ""

    def start(self, bl: BenchLab, threads: int | None = None) -> Started:
        raise NotImplementedError

    def describe(self) -> str:
        return self.label


class Direct(Setup):
    name = "direct"
    label = "direct (no proxy)"
    proxied = False

    def start(self, bl: BenchLab, threads: int | None = None) -> Started:
        return Started(Proxies())


class ZtunnelFast(Setup):
    threads_label = "ZTUNNEL_WORKER_THREADS"

    def __init__(self, engine: str, worker_threads: int = 2, log_level: str = ZTUNNEL_LOG_LEVEL,
                 fast_path: bool = False, xds: bool = False):
        self.engine = engine
        self.fast_path = fast_path
        self.xds = xds  # control plane: the fake istiod (xDS + CA) instead of the local file and CA
        self.name = "xds" if xds else "fastpath" if fast_path else engine
        self.label = (f"ztunnel-fast {engine}" + (" + ZTUNNEL_FAST_PATH=true" if fast_path else "")
                      + (", xDS mode (fake istiod)" if xds else ""))
        # the fast path changes how connections start, not the byte path or what a tunnel holds
        self.skip = frozenset({"tunnels", "syscalls", "topology2", "cpu"}) if fast_path else frozenset()
        if xds:  # the control plane changes what is loaded, not the byte path
            self.skip = frozenset(XDS_SKIPS)
        self.log_level = log_level
        self.worker_threads = worker_threads
        self.scales = engine == "native"  # the pure twin has no worker threads (one asyncio loop)
        self.extra_env: dict[str, str] = {}  # more env for both proxies (bench tools' experiments only)

    def available(self) -> tuple[bool, str]:
        if self.engine == "native":
            from ztunnel_fast.engine import native_available

            ok, why = native_available()
            if not ok:
                return False, f"native engine not built ({why}); run `make build`"
        return True, ""

    def start(self, bl: BenchLab, threads: int | None = None) -> Started:
        threads = threads or self.worker_threads
        env = {"ZTUNNEL_ENGINE": self.engine, "RUST_LOG": self.log_level, "ZTUNNEL_WORKER_THREADS": str(threads),
               "ZTUNNEL_FAST_PATH": "true" if self.fast_path else "false", **self.extra_env}
        if self.xds:
            istiod = bl.lab.attach(LabIstiod(bl.lab))
            istiod.start()  # serves the Lab's pods over xDS and signs their certificates
            istiod.exempt(bl.client)  # ztunnel's own connection to istiod is not captured
        server = bl.lab.start_ztunnel(bl.server, redirect=False, **env)  # the server pod only answers
        client = bl.lab.start_ztunnel(bl.client, redirect=True, **env)
        if self.xds:
            for pod in (bl.server, bl.client):  # ready = workloads synced and certificates issued
                _wait_ready(bl, pod)
        m = re.search(r"engine=(\S+)", client.log())
        info = {"engine": m.group(1) if m else "?", "log_level": self.log_level,
                "worker_threads": threads if self.engine == "native" else "n/a (pure twin: one asyncio loop)",
                "topology": bl.kind}
        if self.xds:
            info["control_plane"] = "fake istiod (xDS + CA over TLS, ztunnel_fast.fakes.istiod)"
        return Started(Proxies({"client": client.proc.pid, "server": server.proc.pid}), info)


class EnvoyPair(Setup):
    threads_label = "--concurrency"

    def __init__(self, concurrency: int = ENVOY_CONCURRENCY):
        self.concurrency = concurrency
        self.name = "envoy" if concurrency == ENVOY_CONCURRENCY else f"envoy{concurrency}"
        self.label = f"Envoy pair (HBONE, --concurrency {concurrency})"
        self.scales = concurrency == ENVOY_CONCURRENCY
        self.skip = frozenset() if self.scales else frozenset({"tunnels", "scaling"})

    def start(self, bl: BenchLab, threads: int | None = None) -> Started:
        from tests.interop.envoy import envoy_binary, run_envoy, validate_config, write_config

        from .envoy_pair import multi_port_terminator, transparent_originator

        concurrency = threads or self.concurrency
        client_certs = _certs(bl, "client")
        server_certs = _certs(bl, "server")
        term = multi_port_terminator(bl.server.ip, APP_PORTS, server_certs, server_certs.root, [bl.client.identity])
        orig = transparent_originator(bl.client.ip, bl.server.ip, client_certs, client_certs.root, [bl.server.identity])
        procs = {}
        for side, pod, cfg in (("server", bl.server, term), ("client", bl.client, orig)):
            path = write_config(bl.workdir, f"envoy-{side}", cfg)
            cp = validate_config(path)
            if cp.returncode != 0:
                raise RuntimeError(f"envoy rejected the {side} bootstrap: {cp.stderr[-1500:]}")
            procs[side] = run_envoy(bl.topology, pod.pod, path, bl.workdir / f"envoy-{side}.log",
                                    log_level=ENVOY_LOG_LEVEL, concurrency=concurrency)
        netns.redirect_outbound(bl.client.pod)
        info = {"binary": envoy_binary(), "concurrency": concurrency, "log_level": ENVOY_LOG_LEVEL,
                "topology": bl.kind,
                "outbound": "iptables REDIRECT to 15001 + original_dst listener filter",
                "authority": "%DOWNSTREAM_LOCAL_ADDRESS% (the original destination)"}
        return Started(Proxies({side: p.pid for side, p in procs.items()}), info)


class RelayPair(Setup):
    """bench/relay.py in both pods, where the proxies sit: the byte path without any protocol."""

    threads_label = "one thread per direction"
    # no HTTP, tunnel, scaling or memory figures: the floor is about bytes (CPU/GB), not connections
    skip = frozenset({"idle", "http_ka", "http_nc", "tunnels", "scaling"})

    def __init__(self, mode: str = "splice"):
        self.mode = mode
        self.name = "relay" if mode == "splice" else f"relay{mode}"
        self.label = {
            "splice": "plain TCP relay pair (no TLS; splice(2), no user-space copy)",
            "copy": "plain TCP relay pair (no TLS; recv_into/send, 256 KiB buffer)",
            "aead": "TCP relay pair in C with AES-128-GCM 16 KiB records between the relays (not TLS; "
                    "recv, seal/open, send)",
        }[mode]

    def available(self) -> tuple[bool, str]:
        if self.mode == "aead":
            import shutil

            if not shutil.which("cc"):
                return False, "no C compiler (cc) to build bench/relay_aead.c"
            if not Path("/usr/include/openssl/evp.h").exists():
                return False, "OpenSSL headers missing (apt: libssl-dev)"
        return True, ""

    def _argv(self, bl: BenchLab, role: str, listen: str, peer: str) -> list[str]:
        import os
        import sys

        from .relay import __file__ as relay_script
        from .relay import build_aead

        if self.mode != "aead":
            return [sys.executable, relay_script, role, "--listen", listen] + (
                ["--peer", peer] if role == "client" else []) + ["--mode", self.mode]
        binary = build_aead(bl.workdir)
        if not getattr(self, "_key", None):
            self._key = os.urandom(16).hex()  # one key for both relays of a setup
        ip, port = listen.rsplit(":", 1)
        return [str(binary), role, ip, port] + (peer.rsplit(":", 1) if role == "client" else []) + [self._key]

    def start(self, bl: BenchLab, threads: int | None = None) -> Started:
        peer = f"{bl.server.ip}:15008"
        procs = {"server": bl.popen(bl.server, self._argv(bl, "server", peer, peer), "relay-server.log")}
        netns.wait_listening(bl.server.pod, 15008, timeout=15)
        procs["client"] = bl.popen(bl.client, self._argv(bl, "client", "0.0.0.0:15001", peer), "relay-client.log")
        netns.wait_listening(bl.client.pod, 15001, timeout=15)
        netns.redirect_outbound(bl.client.pod)
        for side, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"relay {side} exited with {proc.returncode}; see {bl.workdir}")
        info = {"mode": self.mode, "topology": bl.kind, "pooled": False,
                "outbound": "iptables REDIRECT to 15001 + SO_ORIGINAL_DST"}
        return Started(Proxies({side: p.pid for side, p in procs.items()}), info)


XDS_SKIPS = ("tput1", "tput4", "cpu", "syscalls", "http_ka", "http_nc", "tunnels", "scaling", "topology2")
READY_TIMEOUT = 30.0  # seconds for an xDS-mode proxy to sync and get its certificate


def _wait_ready(bl: BenchLab, pod) -> None:
    """Wait until the proxy in `pod` answers 200 on 15021 /healthz/ready (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while bl.lab.http(pod, "http://127.0.0.1:15021/healthz/ready")[0] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"ztunnel-fast in {pod.name} not ready over xDS after {READY_TIMEOUT:.0f}s")
        time.sleep(0.1)


def _certs(bl: BenchLab, side: str):
    """Key, chain and root for the pod's SPIFFE identity, issued by the Lab's CA."""
    from tests.certs import CertPaths

    pod = bl.client if side == "client" else bl.server
    chain, key, root = bl.lab.identity_files(pod.identity, f"envoy-{side}")
    return CertPaths(cert=chain, key=key, root=root)


ALL = {"direct": lambda t: Direct(), "native": lambda t: ZtunnelFast("native", t), "pure": lambda t: ZtunnelFast("pure", t),
       "envoy": lambda t: EnvoyPair(ENVOY_CONCURRENCY), "envoy1": lambda t: EnvoyPair(1),
       "fastpath": lambda t: ZtunnelFast("native", t, fast_path=True),
       "relay": lambda t: RelayPair("splice"), "relaycopy": lambda t: RelayPair("copy"),
       "relayaead": lambda t: RelayPair("aead"),
       "xds": lambda t: ZtunnelFast("native", t, xds=True)}


def make(names: list[str], worker_threads: int = 2) -> list[Setup]:
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise ValueError(f"unknown setup(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    return [ALL[n](worker_threads) for n in names]
