"""Bookkeeping of in-pod mode, without sockets: which pods exist, the snapshot, pending pods,
readiness and the `workload_manager_*` metrics.

The workload manager feeds it the ZDS events (connected, add, keep, del, snapshot sent,
disconnected) and the outcome of every proxy start; it answers with what to do (start or stop a
pod's proxy) and the ack text for istio-cni.  Semantics follow ztunnel's `inpod/statemanager.rs`:

- After each hello istio-cni replays its cache (`add`, or `keep` for a pod whose netns it cannot
  open) and ends with `snapshot_sent`; every pod not named since the hello is then drained.
- `add` of a known uid with the same netns (same inode) changes nothing; with another netns the
  old proxy is drained and a new one started.
- A pod whose proxy cannot start yet (its workload is not in the state store) stays *pending*
  and is retried; the add is NACKed with the reason.
- Ready (`workload proxy manager`) only while connected, after the snapshot, with no pending pod.

Invariant: a pod is in exactly one state; the gauges always equal the counts of `pods`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from .protocol import WorkloadInfo

READINESS_TASK = "workload proxy manager"  # ztunnel's readiness task name


class PodState(enum.Enum):
    PENDING = "pending"  # known to istio-cni, proxy not started yet (retried)
    UP = "up"  # listeners bound in the pod netns and served


@dataclass(eq=False)
class Pod:
    uid: str
    info: WorkloadInfo
    netns: Any  # the pod's netns handle (inpod.netns.PodNetns); opaque here
    netns_id: tuple[int, int]  # (st_dev, st_ino) of the netns: "the same namespace"
    state: PodState = PodState.PENDING
    error: str = ""  # why it is pending


@dataclass(frozen=True)
class Start:
    pod: Pod


@dataclass(frozen=True)
class Stop:
    pod: Pod
    reason: str


@dataclass(frozen=True)
class Discard:
    """A netns handle that is not needed (duplicate add): close it."""

    netns: Any


Command = Start | Stop | Discard


class WorkloadManagerMetrics:
    """ztunnel's `zt:src/inpod/metrics.rs` names, on the root registry (no `istio_` prefix)."""

    def __init__(self, registry: CollectorRegistry):
        self.active = Gauge("workload_manager_active_proxy_count", "The current number of proxies",
                            registry=registry)
        self.pending = Gauge("workload_manager_pending_proxy_count", "The current number of pending proxies",
                             registry=registry)
        self.started = Counter("workload_manager_proxies_started", "The total number of proxies that were started",
                               registry=registry)
        self.stopped = Counter("workload_manager_proxies_stopped", "The total number of proxies that were stopped",
                               registry=registry)


@dataclass
class StateManager:
    metrics: WorkloadManagerMetrics | None = None
    pods: dict[str, Pod] = field(default_factory=dict)
    connected: bool = False
    snapshot_received: bool = False
    _seen: set[str] = field(default_factory=set)  # uids named since the last hello

    # --- connection lifecycle ------------------------------------------------------------------
    def on_connected(self) -> None:
        """A hello was sent: istio-cni replays its cache, a new snapshot begins."""
        self.connected = True
        self.snapshot_received = False
        self._seen = set()

    def on_disconnected(self) -> None:
        """Pods keep running (istio-cni restarts must not blip traffic); readiness drops."""
        self.connected = False

    @property
    def ready(self) -> bool:
        return self.connected and self.snapshot_received and not self.pending()

    def not_ready_reason(self) -> str:
        if not self.connected:
            return "not connected to istio-cni"
        if not self.snapshot_received:
            return "waiting for the snapshot"
        return f"{len(self.pending())} pending pod(s)"

    # --- requests --------------------------------------------------------------------------------
    def add(self, uid: str, info: WorkloadInfo, netns: Any, netns_id: tuple[int, int]) -> list[Command]:
        self._seen.add(uid)
        old = self.pods.get(uid)
        if old is not None and old.netns_id == netns_id:
            if old.state is PodState.PENDING:
                return [Discard(netns), Start(old)]  # istio-cni asks again: try again now
            return [Discard(netns)]
        commands: list[Command] = []
        if old is not None:
            commands.append(Stop(old, "network namespace changed"))
            del self.pods[uid]
        pod = Pod(uid, info, netns, netns_id)
        self.pods[uid] = pod
        commands.append(Start(pod))
        self._update()
        return commands

    def keep(self, uid: str) -> str:
        """KeepWorkload: part of the snapshot only.  Returns the NACK text, or "" to ACK."""
        if self.snapshot_received:
            return f"KeepWorkload {uid} received after the snapshot"
        self._seen.add(uid)
        return ""

    def delete(self, uid: str) -> list[Command]:
        pod = self.pods.pop(uid, None)
        self._seen.discard(uid)
        self._update()
        return [Stop(pod, "deleted by istio-cni")] if pod is not None else []

    def snapshot_sent(self) -> list[Command]:
        """Reconcile: pods not named since the hello are drained."""
        self.snapshot_received = True
        stale = [pod for uid, pod in self.pods.items() if uid not in self._seen]
        for pod in stale:
            del self.pods[pod.uid]
        self._update()
        return [Stop(pod, "not in the istio-cni snapshot") for pod in stale]

    # --- outcomes of the commands ----------------------------------------------------------------
    def started(self, pod: Pod) -> None:
        if self.pods.get(pod.uid) is not pod:
            return  # deleted or replaced while starting; its Stop is on the way
        pod.state = PodState.UP
        pod.error = ""
        if self.metrics is not None:
            self.metrics.started.inc()
        self._update()

    def start_failed(self, pod: Pod, error: str) -> None:
        if self.pods.get(pod.uid) is pod:
            pod.state = PodState.PENDING
            pod.error = error
            self._update()

    def stopped(self, pod: Pod, was_up: bool) -> None:
        if was_up and self.metrics is not None:
            self.metrics.stopped.inc()
        self._update()

    def pending(self) -> list[Pod]:
        return [p for p in self.pods.values() if p.state is PodState.PENDING]

    def retry_pending(self) -> list[Command]:
        return [Start(p) for p in self.pending()]

    def _update(self) -> None:
        if self.metrics is None:
            return
        self.metrics.active.set(sum(1 for p in self.pods.values() if p.state is PodState.UP))
        self.metrics.pending.set(len(self.pending()))
