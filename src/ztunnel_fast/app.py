"""Wiring and lifecycle: config -> state -> identities -> engine -> listeners; one drain path.

Start-up order: the operator endpoints first (readiness answers 500 with what is pending), then
the local config (state), certificates for local workloads, the engine and the listeners; the
process is ready when all of them are done.  An invalid config, a missing CA or a port that cannot
be bound stops the process before any listener accepts.

The local config file (LOCAL_XDS_PATH) is watched: a valid change replaces the state whole and
re-authorizes live inbound connections; an invalid one is logged and ignored (the old state stays).

Shutdown (SIGTERM, SIGINT, POST /quitquitquit) always goes through drain(): stop accepting,
GOAWAY every HBONE connection, let tunnels finish until the deadline, then close and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from . import limits
from .admin.server import Readiness, Servers, admin_app, readiness_app, stats_app, version_info
from .config import ADMIN_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_PORT, OUTBOUND_PORT, READINESS_PORT, STATS_PORT, Config
from .engine import create_engine
from .errors import ConfigError
from .hbone.connection import H2Settings
from .hbone.pool import HbonePool
from .identity.ca import LocalCA
from .identity.manager import CertificateManager
from .proxy import sockets
from .proxy.common import accept_loop
from .proxy.context import ProxyContext
from .proxy.inbound import Inbound
from .proxy.inbound_passthrough import InboundPassthrough
from .proxy.outbound import Outbound
from .state.dump import config_dump
from .state.store import ProxyState
from .state.workload import TunnelProtocol
from .telemetry.metrics import Metrics
from .xds.local import LocalConfig, load_local_config, parse_local_config

log = logging.getLogger(__name__)

CONFIG_POLL_INTERVAL = 1.0  # seconds between checks of LOCAL_XDS_PATH for changes
DEFAULT_DRAIN_DEADLINE = 5.0  # seconds, ztunnel's default when no grace period is given
READY_TASKS = ("state manager", "certificates", "proxy")


def load_state(config: Config) -> ProxyState:
    if config.local_xds_path is not None:
        local = load_local_config(config.local_xds_path)
    elif config.local_xds is not None:
        local = parse_local_config(config.local_xds, "LOCAL_XDS")
    else:
        local = LocalConfig((), (), ())
    return ProxyState.from_local(local)


def _raise_open_files() -> None:
    """RLIMIT_NOFILE soft -> hard before any listener exists, logged as ztunnel does (issue 13)."""
    before, after = limits.raise_open_files()
    if after != before:
        log.info("raised open file limit (RLIMIT_NOFILE) from %d to %d", before, after)
    else:
        log.info("open file limit (RLIMIT_NOFILE) is %d", after)


def drain_deadline(config: Config) -> float:
    """CONNECTION_TERMINATION_DEADLINE, else from TERMINATION_GRACE_PERIOD_SECONDS as ztunnel
    derives it (grace - 5 s above 10 s, else grace - 1 s), else 5 s."""
    if config.connection_termination_deadline is not None:
        return config.connection_termination_deadline
    grace = config.termination_grace_period
    if grace is None:
        return DEFAULT_DRAIN_DEADLINE
    return max(0.0, grace - 5 if grace > 10 else grace - 1)


class App:
    def __init__(self, config: Config):
        self.config = config
        self.listeners: list[socket.socket] = []
        self.accept_tasks: list[asyncio.Task] = []
        self.ctx: ProxyContext | None = None
        self.inbound: Inbound | None = None
        self.metrics = Metrics()
        self.readiness = Readiness(*READY_TASKS)
        self.servers = Servers()
        self.engine_name = "unknown"
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        config = self.config
        await self._serve_operator_endpoints()
        state = load_state(config)
        self.readiness.done("state manager")
        if config.local_ca_dir is None:
            raise ConfigError("LOCAL_CA_DIR", "", "required (no istiod CA client yet): create one with `ztunnel-fast ca init DIR`")
        ca = LocalCA.load(config.local_ca_dir)
        certs = CertificateManager(ca, config.secret_ttl)
        engine = create_engine(config.engine, workers=config.worker_threads)
        self.engine_name = engine.name
        h2 = H2Settings(
            stream_window=config.http2_stream_window_size,
            connection_window=config.http2_connection_window_size,
            max_frame_size=config.http2_frame_size,
        )
        ctx = ProxyContext(config=config, state=state, certs=certs, engine=engine, h2=h2, metrics=self.metrics)
        if ctx.dedicated and ctx.own_workload() is None:
            info = config.workload_info
            raise ConfigError("PROXY_WORKLOAD_INFO", "", f"workload {info.namespace}/{info.name} is not in the local config")
        outbound = Outbound(ctx)
        ctx.pool = HbonePool(
            outbound.connect_hbone,
            max_streams=config.pool_max_streams_per_connection,
            idle_timeout=config.pool_unused_release_timeout,
        )
        self.ctx = ctx
        self.inbound = Inbound(ctx)
        passthrough = InboundPassthrough(ctx)
        _raise_open_files()  # config is valid: before the first listener accepts
        for port, handler, name in (
            (OUTBOUND_PORT, outbound.handle, "outbound"),
            (INBOUND_PORT, self.inbound.handle, "inbound"),
            (INBOUND_PLAINTEXT_PORT, passthrough.handle, "inbound_passthrough"),
        ):
            self._bind(port, handler, name)
        self.readiness.done("proxy")
        await self._prefetch_certificates()
        self.readiness.done("certificates")
        if config.local_xds_path is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_config(), name="local-config-watcher")
        log.info("proxy ready: mode=%s engine=%s ports 15001 15008 15006", config.proxy_mode.value, engine.name)

    async def _serve_operator_endpoints(self) -> None:
        def dump() -> dict:
            ctx = self.ctx
            if ctx is None:
                return {"workloads": [], "services": [], "policies": [], "certificates": [],
                        "version": version_info(self.engine_name)}
            return config_dump(ctx.state, config=self.config, certificates=ctx.certs.snapshot(),
                               version=version_info(self.engine_name))

        try:
            await self.servers.serve(readiness_app(self.readiness), None, READINESS_PORT)
            await self.servers.serve(stats_app(self.metrics.exposition), None, STATS_PORT)
            await self.servers.serve(admin_app(config_dump=dump, quit=self.stop, initial_levels=self.config.log_level),
                                     "localhost", ADMIN_PORT)
        except OSError as exc:
            await self.servers.close()
            raise ConfigError("admin", "", f"cannot listen on the operator ports 15000/15020/15021: {exc.strerror}") from None

    def _bind(self, port: int, handler, name: str) -> None:
        hosts = ["0.0.0.0"] + (["::"] if self.config.ipv6_enabled and socket.has_ipv6 else [])
        for host in hosts:
            try:
                lsock = sockets.listener(host, port, transparent=True)
            except OSError as exc:
                if host == "::":
                    log.debug("no IPv6 listener on port %d: %s", port, exc)
                    continue
                raise ConfigError(name, "", f"cannot listen on {host}:{port}: {exc.strerror}") from None
            self.listeners.append(lsock)
            task = asyncio.get_running_loop().create_task(
                accept_loop(lsock, handler, self.ctx.track, name), name=f"accept-{name}-{host}"
            )
            self.accept_tasks.append(task)

    async def _prefetch_certificates(self) -> None:
        ctx = self.ctx
        if ctx.dedicated:
            identities = {ctx.own_workload().identity}
        else:
            identities = {
                w.identity
                for w in ctx.state.workloads()
                if w.protocol is TunnelProtocol.HBONE and (not self.config.node_name or w.node == self.config.node_name)
            }
        await asyncio.gather(*(ctx.certs.get(i) for i in identities))

    async def _watch_config(self) -> None:
        path = self.config.local_xds_path
        last = _stamp(path)
        while True:
            await asyncio.sleep(CONFIG_POLL_INTERVAL)
            stamp = _stamp(path)
            if stamp == last:
                continue
            last = stamp
            try:
                state = load_state(self.config)
            except ConfigError as exc:
                log.error("local config change ignored, keeping the previous one: %s", exc)
                continue
            closed = self.ctx.replace_state(state)
            log.info("local config reloaded: %d workloads, %d services, %d policies; %d connections closed by policy",
                     len(state.workloads()), len(state.services()), len(state.policies()), closed)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.start()
        except BaseException:
            await self.servers.close()
            raise
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """The one shutdown path."""
        deadline = drain_deadline(self.config)
        ctx = self.ctx
        self.readiness.block("drain")
        log.info("draining: no new connections, waiting up to %.1fs for %d open tunnels", deadline, len(ctx.tunnels))
        if self._watcher is not None:
            self._watcher.cancel()
        for task in self.accept_tasks:
            task.cancel()
        for lsock in self.listeners:
            lsock.close()
        if ctx.pool is not None:
            ctx.pool.goaway_all()
        if self.inbound is not None:
            self.inbound.goaway_all()
        if ctx.tunnels:
            _, pending = await asyncio.wait(list(ctx.tunnels), timeout=deadline)
            if pending:
                log.warning("drain deadline reached: closing %d tunnels", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        if ctx.pool is not None:
            ctx.pool.close()
        await ctx.certs.close()
        ctx.engine.close()
        await self.servers.close()
        log.info("shutdown complete")


def _stamp(path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size
