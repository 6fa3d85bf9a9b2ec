"""One pod's proxy in in-pod mode: listeners 15001/15006/15008 bound inside the pod's network
namespace, served by the shared control loop, engine, state and certificates.

`PodScope` is the pod's view of the shared ProxyContext: everything (config, state, certificates,
engine, metrics, policy tracking) is read live from the shared context, except what belongs to the
pod alone: its workload (the source of every outbound connection and the only local destination),
its HBONE pool and its tunnels, and the socket factory that creates upstream sockets inside the
pod's namespace (so a pod's traffic leaves from the pod, as ztunnel's does).

The pod's workload comes from the state store: the workload on NODE_NAME with the namespace,
service account and name istio-cni gave in WorkloadInfo.  It is looked up again whenever the
state is replaced, so xDS or local-config updates apply to running pods.

Invariants: every socket created for the pod (listeners and upstreams, also those the inbound
fast path's workers create from the pod's namespace fd) is created inside its namespace and
carries SO_MARK (PACKET_MARK, 1337); drain never touches another pod's tunnels; stop_accepting
(before the removal's ack and before the namespace fd is closed) also forgets the pod's inbound
fast-path verdicts, after which no worker uses the fd.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from ..config import INBOUND_PLAINTEXT_PORT, INBOUND_PORT, OUTBOUND_PORT
from ..hbone import headers as hbone_headers
from ..hbone.pool import HbonePool
from ..proxy import sockets
from ..proxy.common import accept_loop
from ..proxy.context import ProxyContext
from ..proxy.inbound import Inbound
from ..proxy.inbound_passthrough import InboundPassthrough
from ..proxy.outbound import Outbound
from ..proxy.route import Kind
from ..state.workload import IpAddress, Workload
from .netns import NetnsThread, PodNetns
from .protocol import WorkloadInfo

log = logging.getLogger(__name__)

LISTENERS = ((OUTBOUND_PORT, "outbound"), (INBOUND_PORT, "inbound"), (INBOUND_PLAINTEXT_PORT, "inbound_passthrough"))


class WorkloadNotFound(Exception):
    """The pod's workload is not (yet) in the state store: the pod stays pending."""


def find_workload(state, info: WorkloadInfo, node: str) -> Workload | None:
    """The local workload of a pod: on `node` (when set), same namespace, service account, name."""
    for w in state.workloads_on_node(node) if node else state.workloads():
        if w.namespace == info.namespace and w.name == info.name and w.service_account == info.service_account:
            return w
    return None


class PodScope:
    """A pod's view of the shared ProxyContext (see the module docstring)."""

    dedicated = False  # shared mode: identities per workload, never PROXY_WORKLOAD_INFO
    fast_path_node = None  # in-pod traffic always goes over HBONE, also on the same node
    stopped = False  # set by PodProxy.stop_accepting: the inbound fast path installs nothing more

    def __init__(self, parent: ProxyContext, info: WorkloadInfo, netns: PodNetns, thread: NetnsThread):
        self._parent = parent
        self.info = info
        self.netns = netns
        self._thread = thread
        self.pool: HbonePool | None = None
        self.tunnels: set[asyncio.Task] = set()
        self._cached: tuple[Any, Workload | None] = (None, None)
        self.socket_factory = self._socket

    def __getattr__(self, name: str):
        return getattr(self._parent, name)  # live: a replaced state or policy index is seen at once

    async def _socket(self, family: int) -> socket.socket:
        return await self._thread.run(self.netns, lambda: socket.socket(family, socket.SOCK_STREAM))

    def workload(self) -> Workload | None:
        # cached per state snapshot: ProxyContext replaces `state` whole and never mutates it
        state = self._parent.state
        if self._cached[0] is not state:
            self._cached = (state, find_workload(state, self.info, self._parent.config.node_name))
        return self._cached[1]

    @property
    def orig_src(self) -> bool:
        enabled = self._parent.config.enable_orig_src
        return True if enabled is None else enabled

    def source_workload(self, client_ip: IpAddress) -> Workload | None:
        return self.workload()  # everything leaving this pod's namespace is the pod's

    def local_workload(self, dst_ip: IpAddress) -> Workload | None:
        w = self.workload()
        if w is not None and (dst_ip in w.workload_ips or dst_ip.is_unspecified or not w.workload_ips):
            return w
        return None

    def track(self, task: asyncio.Task) -> None:
        self.tunnels.add(task)
        task.add_done_callback(self.tunnels.discard)
        self._parent.track(task)  # the process-wide drain waits for it too


class PodOutbound(Outbound):
    """Outbound for one pod, noting each connection's route for `workloadState` (the decision
    itself is the shared one)."""

    def __init__(self, scope: PodScope, open_connections: dict[int, dict[str, str]]):
        super().__init__(scope)
        self._open = open_connections

    def _note(self, route, actual) -> None:
        entry = self._open.get(id(asyncio.current_task()))
        if entry is not None and actual is not None:
            entry["actualDst"] = hbone_headers.format_addr(*actual)
            entry["protocol"] = "HBONE" if route.kind is Kind.HBONE else "TCP"

    async def _hbone(self, sock, route, *args):
        self._note(route, route.next_hop)
        return await super()._hbone(sock, route, *args)

    async def _plain(self, sock, route, *args):
        self._note(route, route.target)
        return await super()._plain(sock, route, *args)


class PodProxy:
    def __init__(self, ctx: ProxyContext, uid: str, info: WorkloadInfo, netns: PodNetns, thread: NetnsThread):
        self.uid = uid
        self.scope = PodScope(ctx, info, netns, thread)
        self._thread = thread
        self.listeners: list[socket.socket] = []
        self.accept_tasks: list[asyncio.Task] = []
        self.inbound: Inbound | None = None
        self.outbound_open: dict[int, dict[str, str]] = {}  # id(task) or fast-path token -> {src, originalDst, ...}
        self.fast_lid: int | None = None  # the outbound listener's id in the fast path (ZTUNNEL_FAST_PATH)

    async def start(self) -> None:
        scope = self.scope
        info = scope.info
        workload = scope.workload()
        if workload is None:
            node = scope.config.node_name or "any node"
            raise WorkloadNotFound(f"workload {info.namespace}/{info.name} (service account {info.service_account}) "
                                   f"not found on node {node}")
        ipv6 = scope.config.ipv6_enabled
        mark = scope.config.packet_mark
        self.listeners = await self._thread.run(scope.netns, lambda: _bind_all(ipv6, mark))
        outbound = PodOutbound(scope, self.outbound_open)
        scope.pool = HbonePool(outbound.connect_hbone, max_streams=scope.config.pool_max_streams_per_connection,
                               idle_timeout=scope.config.pool_unused_release_timeout)
        self.inbound = Inbound(scope)
        handlers = {"outbound": self._outbound(outbound.handle), "inbound": self.inbound.handle,
                    "inbound_passthrough": InboundPassthrough(scope).handle}
        loop = asyncio.get_running_loop()
        fast_path = scope.fast_path
        for lsock, name in self.listeners_named:
            if fast_path is not None and name == "outbound":
                # the native workers accept it themselves (proxy/fastpath.py), misses come back here;
                # the pod's IPv4 and IPv6 listeners share one listener id
                lid = fast_path.listen(lsock, handle=handlers[name], scope=scope,
                                       open_connections=self.outbound_open)
                if lid is not None:
                    self.fast_lid = lid
                    continue
            self.accept_tasks.append(loop.create_task(
                accept_loop(lsock, handlers[name], scope.track, name), name=f"accept-{name}-{self.uid}"))
        log.info("pod %s/%s (uid %s) proxy started in netns net:[%d] as %s", info.namespace, info.name, self.uid,
                 scope.netns.inode, workload.identity)
        # the pod's certificate before its first connection needs it (ztunnel prefetches too)
        prefetch = loop.create_task(scope.certs.get(workload.identity), name=f"prefetch-cert-{self.uid}")
        prefetch.add_done_callback(_log_prefetch_failure)

    @property
    def listeners_named(self) -> list[tuple[socket.socket, str]]:
        names = {port: name for port, name in LISTENERS}
        return [(s, names[s.getsockname()[1]]) for s in self.listeners]

    def _outbound(self, handle):
        """Remember each outbound connection for config_dump's `workloadState` while it lives."""
        async def handler(sock: socket.socket) -> None:
            try:
                src = hbone_headers.format_addr(*sockets.peer(sock))
                dst = hbone_headers.format_addr(*sockets.destination(sock))
            except OSError:
                src = dst = ""
            key = id(asyncio.current_task())
            self.outbound_open[key] = {"src": src, "originalDst": dst}
            try:
                await handle(sock)
            finally:
                self.outbound_open.pop(key, None)
        return handler

    def connections(self) -> dict[str, list[dict[str, str]]]:
        """Live connections in the shape `istioctl ztunnel-config connections` reads."""
        w = self.scope.workload()
        inbound = []
        for entry in self.scope.connections.entries():
            if w is None or entry.workload.uid != w.uid:
                continue
            i = entry.info
            dst = hbone_headers.format_addr(i.dst_ip, i.dst_port)
            inbound.append({"src": str(i.src_ip), "originalDst": dst, "actualDst": dst,
                            "protocol": "HBONE" if i.src_identity is not None else "TCP"})
        return {"inbound": inbound, "outbound": list(self.outbound_open.values())}

    def stop_accepting(self) -> None:
        """Synchronously (before the DelPod's ack): no connection is accepted any more, by the event
        loop or the fast path's workers (whose entries for this pod are gone when it returns), and
        no worker dials a CONNECT into the pod's namespace any more (inbound fast path)."""
        for task in self.accept_tasks:
            task.cancel()
        if self.fast_lid is not None:
            self.scope.fast_path.unlisten(self.fast_lid)
            self.fast_lid = None
        self.scope.stopped = True
        inbound_fast = getattr(self.scope, "inbound_fast", None)
        if inbound_fast is not None:  # no worker dials into the pod (or uses its netns fd) after this
            inbound_fast.forget_scope(self.scope)
        for lsock in self.listeners:
            lsock.close()
        self.listeners = []

    async def drain(self, deadline: float, reason: str) -> None:
        """Stop accepting, GOAWAY this pod's HBONE connections, let its tunnels finish until the
        deadline, then close what is left.  Other pods are not touched."""
        info = self.scope.info
        log.info("pod %s/%s (uid %s) draining (%s): %d open tunnels", info.namespace, info.name, self.uid, reason,
                 len(self.scope.tunnels))
        self.stop_accepting()
        if self.scope.pool is not None:
            self.scope.pool.goaway_all()
        if self.inbound is not None:
            self.inbound.goaway_all()
        tunnels = list(self.scope.tunnels)
        if tunnels:
            _, pending = await asyncio.wait(tunnels, timeout=deadline)
            if pending:
                log.warning("pod %s/%s drain deadline reached: closing %d tunnels", info.namespace, info.name,
                            len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        if self.scope.pool is not None:
            self.scope.pool.close()
        log.info("pod %s/%s (uid %s) proxy stopped", info.namespace, info.name, self.uid)


def _log_prefetch_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("certificate prefetch failed (retried on first use): %s", task.exception())


def _bind_all(ipv6: bool, mark: int) -> list[socket.socket]:
    """Runs inside the pod's namespace: bind the three listeners (IPv4, and IPv6 when the pod has it)."""
    made: list[socket.socket] = []
    try:
        for port, _name in LISTENERS:
            made.append(sockets.listener("0.0.0.0", port, transparent=True, mark=mark))
            if ipv6 and socket.has_ipv6:
                try:
                    made.append(sockets.listener("::", port, transparent=True, mark=mark))
                except OSError as exc:
                    log.debug("no IPv6 listener on port %d in the pod: %s", port, exc)
    except BaseException:
        for s in made:
            s.close()
        raise
    return made
