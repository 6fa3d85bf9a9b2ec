"""What every listener shares: configuration, state, certificates, the engine, the pool.

Invariant: `state` is replaced whole (a new immutable snapshot), never mutated, so a decision
always sees one consistent view.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

from ..config import Config, ProxyMode
from ..engine import Engine
from ..hbone.base import H2Settings
from ..hbone.pool import HbonePool
from ..identity.manager import CertificateManager
from ..state.rbac import ConnectionInfo, Decision, PolicyIndex, authorize
from ..state.service import Service
from ..state.store import ProxyState, RoundRobin
from ..state.workload import IpAddress, Workload
from ..telemetry.metrics import Metrics
from . import sockets
from .connections import ConnectionManager

log = logging.getLogger(__name__)


@dataclass
class ProxyContext:
    config: Config
    state: ProxyState
    certs: CertificateManager
    engine: Engine
    h2: H2Settings
    pool: HbonePool | None = None
    lb: RoundRobin = field(default_factory=RoundRobin)
    tunnels: set[asyncio.Task] = field(default_factory=set)
    metrics: Metrics = field(default_factory=Metrics)
    connections: ConnectionManager = field(default_factory=ConnectionManager)
    policies: PolicyIndex | None = None
    socket_factory: "sockets.SocketFactory | None" = None  # None: upstream sockets in our own netns
    # Called with every new state after it is in place (node redirection, ...): the one hook for
    # whatever follows the state, whichever source (local file, xDS) produced it.
    state_listeners: list[Callable[[ProxyState], None]] = field(default_factory=list)
    # The outbound fast path (proxy/fastpath.py, ZTUNNEL_FAST_PATH), None when off.
    fast_path: "object | None" = None
    # The inbound fast path (proxy/fastpath_inbound.py, same switch), None when off.
    inbound_fast: "object | None" = None

    def __post_init__(self) -> None:
        if self.policies is None:
            self.policies = PolicyIndex.build(self.state.policies())
        self._by_hostname: tuple[ProxyState, dict[str, Service]] | None = None  # (for state, index)
        self._own: tuple[ProxyState, Workload | None] | None = None  # (for state, own_workload())

    def replace_state(self, state: ProxyState) -> int:
        """Swap in a new snapshot (config reload); live inbound connections are authorized
        again and those now denied are closed.  Returns how many were closed."""
        if self.fast_path is not None:  # before the new state applies: no connection rides an old entry
            self.fast_path.flush()
        if self.inbound_fast is not None:  # also takes the tunnels opened on old verdicts (reevaluated below)
            self.inbound_fast.flush()
        if state.policies() is not self.state.policies():  # the store keeps the tuple while unchanged
            self.policies = PolicyIndex.build(state.policies())
        self.state = state
        self.metrics.forget_label_sets()  # labels derive from workloads and services
        closed = self.connections.reevaluate(self.policies, lambda w: state.workload_by_uid(w.uid))
        for listener in self.state_listeners:
            listener(state)
        return closed

    def authorize(self, workload: Workload, info: ConnectionInfo, span=None) -> Decision:
        """L4 authorization for an inbound connection; dry-run policies are only logged."""
        decision = authorize(self.policies, workload, info)
        level = logging.INFO if self.config.authz_policy_info_logging else logging.DEBUG
        for name in decision.dry_run:
            log.log(level, "dry-run policy %s would change the decision (%s)", name,
                    "allowed" if decision.allowed else decision.reason, extra={"span": span})
        if not decision.allowed:
            log.log(level, "RBAC rejected: %s", decision.reason, extra={"span": span})
        return decision

    def service_by_hostname(self, hostname: str | None) -> Service | None:
        if not hostname:
            return None
        state = self.state
        cached = self._by_hostname
        if cached is None or cached[0] is not state:
            index: dict[str, Service] = {}
            for service in state.services():
                index.setdefault(service.hostname, service)  # the first one wins, as the scan did
            cached = self._by_hostname = (state, index)
        return cached[1].get(hostname)

    @property
    def dedicated(self) -> bool:
        return self.config.proxy_mode is ProxyMode.DEDICATED

    def own_workload(self) -> Workload | None:
        """Dedicated mode: the workload this instance serves (PROXY_WORKLOAD_INFO)."""
        info = self.config.workload_info
        if info is None:
            return None
        state = self.state
        cached = self._own
        if cached is not None and cached[0] is state:  # one scan per snapshot, not per connection
            return cached[1]
        own = None
        for w in state.workloads():
            if w.namespace == info.namespace and w.name == info.name:
                own = w
                break
        self._own = (state, own)
        return own

    def source_workload(self, client_ip: IpAddress) -> Workload | None:
        """Who is connecting: our own workload in dedicated mode, else found by source IP among
        the workloads of this node."""
        if self.dedicated:
            return self.own_workload()
        w = self.state.workload_by_ip(client_ip, self.config.network)
        if w is not None and (not self.config.node_name or w.node == self.config.node_name):
            return w
        return None

    def local_workload(self, dst_ip: IpAddress) -> Workload | None:
        """The local workload an inbound connection is for: ours (dedicated), or by destination IP."""
        if self.dedicated:
            own = self.own_workload()
            if own is not None and (dst_ip in own.workload_ips or dst_ip.is_unspecified):
                return own
            return own if own is not None and not own.workload_ips else None
        w = self.state.workload_by_ip(dst_ip, self.config.network)
        if w is not None and (not self.config.node_name or w.node == self.config.node_name):
            return w
        return None

    @property
    def orig_src(self) -> bool:
        """Dial with the client's source IP (IP_TRANSPARENT)?  ENABLE_ORIG_SRC, else on in shared
        (node) mode, whose redirection rules route the replies back, and off in dedicated mode."""
        if self.config.enable_orig_src is not None:
            return self.config.enable_orig_src
        return not self.dedicated

    @property
    def fast_path_node(self) -> str | None:
        if self.config.node_local_fast_path and not self.dedicated and self.config.node_name:
            return self.config.node_name
        return None

    def track(self, task: asyncio.Task) -> None:
        self.tunnels.add(task)
        task.add_done_callback(self.tunnels.discard)
