"""Wiring and lifecycle: config -> state -> identities -> engine -> listeners; one drain path.

Start-up is all-or-nothing: an invalid config, a missing CA or a port that cannot be bound stops
the process before any listener accepts.  Shutdown (SIGTERM, SIGINT) always goes through drain():
stop accepting, GOAWAY every HBONE connection, let tunnels finish until the deadline, then close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from .config import INBOUND_PLAINTEXT_PORT, INBOUND_PORT, OUTBOUND_PORT, Config
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
from .state.store import ProxyState
from .state.workload import TunnelProtocol
from .xds.local import LocalConfig, load_local_config, parse_local_config

log = logging.getLogger(__name__)


def load_state(config: Config) -> ProxyState:
    if config.local_xds_path is not None:
        local = load_local_config(config.local_xds_path)
    elif config.local_xds is not None:
        local = parse_local_config(config.local_xds, "LOCAL_XDS")
    else:
        local = LocalConfig((), (), ())
    return ProxyState.from_local(local)


def drain_deadline(config: Config) -> float:
    """TERMINATION_GRACE_PERIOD_SECONDS semantics of ztunnel: grace - 5 s above 10 s, else - 1 s."""
    grace = config.termination_grace_period
    return max(0.0, grace - 5 if grace > 10 else grace - 1)


class App:
    def __init__(self, config: Config):
        self.config = config
        self.listeners: list[socket.socket] = []
        self.accept_tasks: list[asyncio.Task] = []
        self.ctx: ProxyContext | None = None
        self.inbound: Inbound | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        state = load_state(config)
        if config.local_ca_dir is None:
            raise ConfigError("LOCAL_CA_DIR", "", "required (no istiod CA client yet): create one with `ztunnel-fast ca init DIR`")
        ca = LocalCA.load(config.local_ca_dir)
        certs = CertificateManager(ca, config.secret_ttl)
        engine = create_engine(config.engine)
        h2 = H2Settings(
            stream_window=config.http2_stream_window_size,
            connection_window=config.http2_connection_window_size,
            max_frame_size=config.http2_frame_size,
        )
        ctx = ProxyContext(config=config, state=state, certs=certs, engine=engine, h2=h2)
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
        for port, handler, name in (
            (OUTBOUND_PORT, outbound.handle, "outbound"),
            (INBOUND_PORT, self.inbound.handle, "inbound"),
            (INBOUND_PLAINTEXT_PORT, passthrough.handle, "inbound_passthrough"),
        ):
            self._bind(port, handler, name)
        await self._prefetch_certificates()
        log.info(
            "proxy ready: mode=%s engine=%s ports 15001 15008 15006",
            config.proxy_mode.value, engine.name,
        )

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

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.start()
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        deadline = drain_deadline(self.config)
        log.info("draining: no new connections, waiting up to %.1fs for %d open tunnels", deadline, len(self.ctx.tunnels))
        for task in self.accept_tasks:
            task.cancel()
        for lsock in self.listeners:
            lsock.close()
        ctx = self.ctx
        if ctx.pool is not None:
            ctx.pool.goaway_all()
        if self.inbound is not None:
            self.inbound.goaway_all()
        if ctx.tunnels:
            _, pending = await asyncio.wait(list(ctx.tunnels), timeout=deadline)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if ctx.pool is not None:
            ctx.pool.close()
        await ctx.certs.close()
        ctx.engine.close()
        log.info("shutdown complete")
