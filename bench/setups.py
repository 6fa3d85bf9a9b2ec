"""The four setups measured side by side, and how each one is started in a BenchLab.

  direct  client ──▶ server app                                   (no proxy: the reference)
  native  client ──REDIRECT──▶ ztunnel-fast (ZTUNNEL_ENGINE=native) ══HBONE══▶ ztunnel-fast ─▶ app
  pure    the same with ZTUNNEL_ENGINE=pure (the pure-Python twin)
  envoy   client ──REDIRECT──▶ Envoy originator  ══HBONE══▶ Envoy terminator ──▶ app

In every setup the load generators connect to <server ip>:<app port>; the proxied setups capture
the client pod's outbound TCP with the same iptables rule (netns.redirect_outbound: REDIRECT to
15001, sockets marked 1337 exempt).  Both proxies of a pair are measured (client and server side).

Invariants: `start` returns only once both proxies are ready; whatever it starts belongs to the
BenchLab's topology and is stopped by its teardown, also when `start` fails half way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ztunnel_fast import netns

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

    def available(self) -> tuple[bool, str]:
        return True, ""

    def start(self, bl: BenchLab) -> Started:
        raise NotImplementedError

    def describe(self) -> str:
        return self.label


class Direct(Setup):
    name = "direct"
    label = "direct (no proxy)"
    proxied = False

    def start(self, bl: BenchLab) -> Started:
        return Started(Proxies())


class ZtunnelFast(Setup):
    def __init__(self, engine: str, log_level: str = ZTUNNEL_LOG_LEVEL):
        self.engine = engine
        self.name = engine
        self.label = f"ztunnel-fast {engine}"
        self.log_level = log_level

    def available(self) -> tuple[bool, str]:
        if self.engine == "native":
            from ztunnel_fast.engine import native_available

            ok, why = native_available()
            if not ok:
                return False, f"native engine not built ({why}); run `make build`"
        return True, ""

    def start(self, bl: BenchLab) -> Started:
        env = {"ZTUNNEL_ENGINE": self.engine, "RUST_LOG": self.log_level}
        server = bl.lab.start_ztunnel(bl.server, redirect=False, **env)  # the server pod only answers
        client = bl.lab.start_ztunnel(bl.client, redirect=True, **env)
        m = re.search(r"engine=(\S+)", client.log())
        info = {"engine": m.group(1) if m else "?", "log_level": self.log_level,
                "worker_threads": "default (ZTUNNEL_WORKER_THREADS unset)"}
        return Started(Proxies({"client": client.proc.pid, "server": server.proc.pid}), info)


class EnvoyPair(Setup):
    name = "envoy"
    label = f"Envoy pair (HBONE, --concurrency {ENVOY_CONCURRENCY})"

    def start(self, bl: BenchLab) -> Started:
        from tests.interop.envoy import envoy_binary, run_envoy, validate_config, write_config

        from .envoy_pair import multi_port_terminator, transparent_originator

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
                                    log_level=ENVOY_LOG_LEVEL, concurrency=ENVOY_CONCURRENCY)
        netns.redirect_outbound(bl.client.pod)
        info = {"binary": envoy_binary(), "concurrency": ENVOY_CONCURRENCY, "log_level": ENVOY_LOG_LEVEL,
                "outbound": "iptables REDIRECT to 15001 + original_dst listener filter",
                "authority": "%DOWNSTREAM_LOCAL_ADDRESS% (the original destination)"}
        return Started(Proxies({side: p.pid for side, p in procs.items()}), info)


def _certs(bl: BenchLab, side: str):
    """Key, chain and root for the pod's SPIFFE identity, issued by the Lab's CA."""
    from tests.certs import CertPaths

    pod = bl.client if side == "client" else bl.server
    chain, key, root = bl.lab.identity_files(pod.identity, f"envoy-{side}")
    return CertPaths(cert=chain, key=key, root=root)


ALL = {"direct": Direct, "native": lambda: ZtunnelFast("native"), "pure": lambda: ZtunnelFast("pure"),
       "envoy": EnvoyPair}


def make(names: list[str]) -> list[Setup]:
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise ValueError(f"unknown setup(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    return [ALL[n]() for n in names]
