"""Wiring and lifecycle: config -> state -> identities -> engine -> listeners; one drain path.

Start-up order: the operator endpoints first (readiness answers 500 with what is pending), then
the local config (state), certificates for local workloads, the engine and the listeners; the
process is ready when all of them are done.  An invalid config, a missing CA or a port that cannot
be bound stops the process before any listener accepts.

Config sources feed one StateStore (state/store.py) and every applied change goes through
App._install: ProxyContext.replace_state, which re-authorizes live inbound connections, then
certificates for local identities that appeared (prefetch) or left (forget).  The local config file
(LOCAL_XDS_PATH / LOCAL_XDS) wins when set and is watched: a valid change replaces its resources;
an invalid one is logged and ignored (the old state stays).  Otherwise, with XDS_ADDRESS (or in a
cluster), the xDS client applies istiod's deltas; readiness waits for its first sync, and istiod
being unreachable only delays that (the client retries forever).

Shutdown (SIGTERM, SIGINT, POST /quitquitquit) always goes through drain(): stop accepting,
GOAWAY every HBONE connection, let tunnels finish until the deadline, then close and exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket

from . import limits
from .admin.server import Readiness, Servers, admin_app, readiness_app, stats_app, version_info
from .config import ADMIN_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_PORT, OUTBOUND_PORT, READINESS_PORT, STATS_PORT, Config, ProxyMode
from .engine import create_engine
from .errors import ConfigError, ZtunnelError
from .hbone.base import H2Settings
from .hbone.pool import HbonePool
from .identity.ca import CertificateSource, LocalCA
from .identity.manager import CertificateManager
from .identity.spiffe import Identity
from .proxy import sockets
from .proxy.common import accept_loop
from .proxy.context import ProxyContext
from .proxy.inbound import Inbound
from .proxy.inbound_passthrough import InboundPassthrough
from .proxy.outbound import Outbound
from .state.dump import config_dump
from .state.store import LOCAL_SOURCE, XDS_SOURCE, ProxyState, Removal, Resource, StateStore
from .state.workload import TunnelProtocol
from .telemetry.metrics import Metrics
from .xds.local import LocalConfig, load_local_config, parse_local_config

log = logging.getLogger(__name__)

CONFIG_POLL_INTERVAL = 1.0  # seconds between checks of LOCAL_XDS_PATH for changes
DEFAULT_DRAIN_DEADLINE = 5.0  # seconds, ztunnel's default when no grace period is given
READY_TASKS = ("state manager", "certificates", "proxy")


def settle_memory() -> None:
    """Once, when start-up is done: collect start-up's cyclic garbage, then hand the freed heap
    pages back (malloc_trim).  Import and start-up leave ~1 MiB of freed pages in glibc's heap
    that idle RSS would otherwise keep (docs/ARCHITECTURE.md, idle memory)."""
    gc.collect()
    released = limits.release_free_memory()
    log.debug("start-up done: garbage collected, free heap pages %s", "released" if released else "kept")


def load_local(config: Config) -> LocalConfig:
    """The local config (file or inline); empty when neither is set."""
    if config.local_xds_path is not None:
        return load_local_config(config.local_xds_path)
    if config.local_xds is not None:
        return parse_local_config(config.local_xds, "LOCAL_XDS")
    return LocalConfig((), (), ())


def local_identities(state: ProxyState, config: Config) -> set[Identity]:
    """Identities this proxy serves, hence needs certificates for: its own workload in dedicated
    mode (PROXY_WORKLOAD_INFO), else the HBONE workloads on NODE_NAME (all of them without it)."""
    info = config.workload_info
    if config.proxy_mode is ProxyMode.DEDICATED and info is not None:
        return {w.identity for w in state.workloads() if w.namespace == info.namespace and w.name == info.name}
    return {w.identity for w in state.workloads()
            if w.protocol is TunnelProtocol.HBONE and (not config.node_name or w.node == config.node_name)}


def certificate_source(config: Config) -> CertificateSource:
    """Where workload certificates come from, as ztunnel chooses: LOCAL_CA_DIR set means the
    built-in CA; otherwise istiod's CA on CA_ADDRESS (set, or the in-cluster default)."""
    if config.local_ca_dir is not None:
        return LocalCA.load(config.local_ca_dir)
    if config.ca is not None:
        from .identity.istiod_ca import IstiodCA

        return IstiodCA(config.ca, auth_token=config.auth_token, cluster_id=config.cluster_id,
                        impersonate=config.proxy_mode is ProxyMode.SHARED)
    raise ConfigError("CA_ADDRESS", "", "no certificate source: set CA_ADDRESS (istiod's CA) or LOCAL_CA_DIR "
                      "(a local CA; create one with `ztunnel-fast ca init DIR`)")


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


def serving_warnings(config: Config, workloads) -> list[str]:
    """What an operator must hear next to `proxy ready` when the proxy serves no workload, or
    serves workloads ztunnel would not (pure: config and the state's workloads in, lines out)."""
    out = []
    local = config.local_xds_path is not None or config.local_xds is not None
    if not local and config.xds is None:
        out.append("serving no workload: no config source (set XDS_ADDRESS, LOCAL_XDS_PATH or LOCAL_XDS)")
        return out
    if config.proxy_mode is not ProxyMode.SHARED:
        return out  # dedicated: start-up already refused a workload missing from the config
    if not config.node_name:
        out.append("shared mode without NODE_NAME: every workload in the config is treated as local "
                   "to this node (ztunnel serves only its node's workloads); set NODE_NAME")
        if local and not workloads:
            out.append("serving no workload: the config has no workloads")
        return out
    # Over xDS the workloads arrive after start: nothing to judge yet.
    if local and not any(w.node == config.node_name for w in workloads):
        out.append(f"serving no workload: no workload in the config has node {config.node_name!r} (NODE_NAME)")
    return out


class App:
    def __init__(self, config: Config):
        self.config = config
        self.listeners: list[socket.socket] = []
        self.accept_tasks: list[asyncio.Task] = []
        self.ctx: ProxyContext | None = None
        self.inbound: Inbound | None = None
        self.metrics = Metrics()
        self.readiness = Readiness(*READY_TASKS)
        self.readiness.on_ready(settle_memory)
        self.servers = Servers()
        self.engine_name = "unknown"
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task | None = None
        self.store = StateStore()  # every config source applies its changes here
        self._xds: asyncio.Task | None = None
        self._prefetches: set[asyncio.Task] = set()
        self.workload_manager = None  # in-pod mode: inpod.workloadmanager.WorkloadManager
        self.node_redirection = None  # NodeRedirection when ZTUNNEL_REDIRECTION=node

    async def start(self) -> None:
        config = self.config
        await self._serve_operator_endpoints()
        use_xds = config.local_xds_path is None and config.local_xds is None and config.xds is not None
        if use_xds:
            state = self.store.state  # empty until istiod's first responses
        else:
            state = self._replace_local(load_local(config))
            self.readiness.done("state manager")
        certs = CertificateManager(certificate_source(config), config.secret_ttl)
        engine = create_engine(config.engine, workers=config.worker_threads)
        self.engine_name = engine.name
        h2 = H2Settings(
            stream_window=config.http2_stream_window_size,
            connection_window=config.http2_connection_window_size,
            max_frame_size=config.http2_frame_size,
        )
        ctx = ProxyContext(config=config, state=state, certs=certs, engine=engine, h2=h2, metrics=self.metrics)
        if ctx.dedicated and ctx.own_workload() is None and not use_xds:
            info = config.workload_info
            raise ConfigError("PROXY_WORKLOAD_INFO", "", f"workload {info.namespace}/{info.name} is not in the local config")
        outbound = Outbound(ctx)
        ctx.pool = HbonePool(
            outbound.connect_hbone,
            max_streams=config.pool_max_streams_per_connection,
            idle_timeout=config.pool_unused_release_timeout,
        )
        self.ctx = ctx
        if config.fast_path and engine.name == "native":
            from .proxy.fastpath import FastPath

            ctx.fast_path = FastPath(ctx, outbound)
        if use_xds:
            self._start_xds()
        self.inbound = Inbound(ctx)
        if ctx.fast_path is not None:
            from .proxy.fastpath_inbound import InboundFastPath

            ctx.inbound_fast = InboundFastPath(ctx)
        passthrough = InboundPassthrough(ctx)
        _raise_open_files()  # config is valid: before the first listener accepts
        if config.inpod:
            self._start_inpod()
        else:
            for port, handler, name in (
                (OUTBOUND_PORT, outbound.handle, "outbound"),
                (INBOUND_PORT, self.inbound.handle, "inbound"),
                (INBOUND_PLAINTEXT_PORT, passthrough.handle, "inbound_passthrough"),
            ):
                self._bind(port, handler, name)
            await self._start_node_redirection()
        self.readiness.done("proxy")
        await self._prefetch_certificates()
        self.readiness.done("certificates")
        if config.local_xds_path is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_config(), name="local-config-watcher")
        if config.inpod:
            log.info("proxy ready: mode=%s (in-pod, istio-cni at %s) engine=%s", config.proxy_mode.value,
                     config.inpod_socket, engine.name)
        else:
            log.info("proxy ready: mode=%s engine=%s ports 15001 15008 15006", config.proxy_mode.value, engine.name)
        for warning in serving_warnings(config, state.workloads()):
            log.warning("%s", warning)

    # --- in-pod mode (istio-cni over ZDS) ---------------------------------------------------------
    def _start_inpod(self) -> None:
        """Instead of node-level listeners: connect to istio-cni, which hands over pod namespaces;
        each pod gets its own listeners there (inpod/)."""
        from .inpod.workloadmanager import WorkloadManager

        self.workload_manager = WorkloadManager(self.ctx, self.config.inpod_socket, self.readiness, self.metrics,
                                                drain_deadline(self.config))
        self.workload_manager.start()

    async def _start_node_redirection(self) -> None:
        """ZTUNNEL_REDIRECTION=node: install the node rules if missing and keep the ipset
        ztunnel-pods-ips following the state (redirect/node_sync.py), after every state change."""
        if self.config.redirection != "node":
            return
        from .redirect.install import RedirectError
        from .redirect.node_sync import NodeRedirection

        self.node_redirection = NodeRedirection(self.config.node_name)
        # Listen first: a state that arrives while the rules are installed is applied after.
        self.ctx.state_listeners.append(self.node_redirection.update)
        try:
            await self.node_redirection.start(self.ctx.state)
        except RedirectError as exc:
            raise ConfigError("ZTUNNEL_REDIRECTION", "", f"cannot install the node redirection: {exc}") from None

    async def _serve_operator_endpoints(self) -> None:
        def dump() -> dict:
            ctx = self.ctx
            if ctx is None:
                return {"workloads": [], "services": [], "policies": [], "certificates": [],
                        "version": version_info(self.engine_name)}
            dumped = config_dump(ctx.state, config=self.config, certificates=ctx.certs.snapshot(),
                                 version=version_info(self.engine_name))
            if self.workload_manager is not None:  # in-pod mode
                dumped["workloadState"] = self.workload_manager.workload_state()
            return dumped

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
            if name == "outbound" and self.ctx.fast_path is not None \
                    and self.ctx.fast_path.listen(lsock) is not None:  # the native workers accept it (IPv4 and IPv6)
                continue
            task = asyncio.get_running_loop().create_task(
                accept_loop(lsock, handler, self.ctx.track, name), name=f"accept-{name}-{host}"
            )
            self.accept_tasks.append(task)

    async def _prefetch_certificates(self) -> None:
        """One attempt at every local identity's certificate before ready.  A failure (istiod
        unreachable, impersonation refused) is not fatal and does not hold readiness, as in
        ztunnel: the manager retries with backoff, config_dump shows the identity Unavailable and
        connections that need it fail with that reason.  With xDS the state may still be empty:
        _install fetches as workloads arrive."""
        ctx = self.ctx
        identities = sorted(local_identities(ctx.state, self.config), key=str)
        results = await asyncio.gather(*(ctx.certs.get(i) for i in identities), return_exceptions=True)
        for identity, result in zip(identities, results):
            if isinstance(result, BaseException):
                log.warning("certificate for %s not available yet, retrying: %s", identity, result)

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
                state = self._replace_local(load_local(self.config))
            except ConfigError as exc:
                log.error("local config change ignored, keeping the previous one: %s", exc)
                continue
            closed = self._install(state)
            log.info("local config reloaded: %d workloads, %d services, %d policies; %d connections closed by policy",
                     len(state.workloads()), len(state.services()), len(state.policies()), closed)

    # -- config sources (one store, one replace_state path) ------------------------------------
    def _replace_local(self, local: LocalConfig) -> ProxyState:
        """The local file is a source that delivers complete sets: it replaces its own resources."""
        return self.store.replace(LOCAL_SOURCE, local.workloads, local.services, local.policies)

    def _start_xds(self) -> None:
        # imported here: grpcio and the xDS protos cost ~20 MiB of RSS that a local-config
        # instance never uses (tests/unit/test_lazy_imports.py keeps it so)
        from .xds.client import XdsClient
        from .xds.delta import DeltaSession, build_node

        config = self.config
        node = build_node(instance_ip=config.instance_ip, pod_name=config.pod_name,
                          pod_namespace=config.pod_namespace, node_name=config.node_name,
                          proxy_metadata=config.proxy_metadata)
        client = XdsClient(config.xds, DeltaSession(node), auth_token=config.auth_token,
                           cluster_id=config.cluster_id, apply=self._apply_xds, metrics=self.metrics,
                           on_synced=lambda: self.readiness.done("state manager"))
        log.info("xds: connecting to %s as %s", config.xds.address, node.id)
        self._xds = asyncio.get_running_loop().create_task(client.run(), name="xds-client")

    def _install(self, state: ProxyState) -> int:
        """Every source's new snapshot takes this path: swap it in (re-authorizing live inbound
        connections), then fetch certificates for local identities that appeared and forget those
        whose last local workload left (ztunnel's prefetch on xDS add).  Returns connections closed."""
        before = local_identities(self.ctx.state, self.config)
        closed = self.ctx.replace_state(state)
        after = local_identities(state, self.config)
        for identity in after - before:
            task = asyncio.get_running_loop().create_task(self._prefetch(identity), name=f"prefetch {identity}")
            self._prefetches.add(task)
            task.add_done_callback(self._prefetches.discard)
        for identity in before - after:
            self.ctx.certs.forget(identity)
        return closed

    async def _prefetch(self, identity) -> None:
        try:
            await self.ctx.certs.get(identity)
        except ZtunnelError as exc:  # retried by the manager; a connection would report it too
            log.warning("certificate prefetch for %s failed: %s", identity, exc)

    def _apply_xds(self, upserts: list[Resource], removals: list[Removal]) -> None:
        state = self.store.apply(XDS_SOURCE, upserts, removals)
        closed = self._install(state)
        # Per push at debug (istiod pushes often); at info when the push closed connections.
        log.log(logging.INFO if closed else logging.DEBUG,
                "xds: applied %d updates, %d removals: %d workloads, %d services, %d policies; "
                "%d connections closed by policy", len(upserts), len(removals), len(state.workloads()),
                len(state.services()), len(state.policies()), closed)

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
        if self._xds is not None:
            self._xds.cancel()
        if self.node_redirection is not None:
            self.node_redirection.close()
        for task in self.accept_tasks:
            task.cancel()
        if ctx.fast_path is not None:
            ctx.fast_path.drain()
        if ctx.inbound_fast is not None:
            ctx.inbound_fast.drain()
        for lsock in self.listeners:
            lsock.close()
        if self.workload_manager is not None:  # in-pod mode: every pod drains its own tunnels
            await self.workload_manager.drain(deadline)
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
