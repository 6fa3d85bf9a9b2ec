"""In-pod bookkeeping without sockets: snapshot, keep, del, pending, readiness, metrics."""

from prometheus_client import CollectorRegistry

from ztunnel_fast.inpod.protocol import WorkloadInfo
from ztunnel_fast.inpod.statemanager import (Discard, PodState, Start, StateManager, Stop,
                                             WorkloadManagerMetrics)

INFO = WorkloadInfo("web", "demo", "web")


class Handle:
    def __init__(self, ino):
        self.id = (1, ino)


def make():
    reg = CollectorRegistry()
    return StateManager(WorkloadManagerMetrics(reg)), reg


def value(reg, name):
    return reg.get_sample_value(name)


def add(sm, uid, ino):
    h = Handle(ino)
    return sm.add(uid, INFO, h, h.id)


def test_readiness_needs_connection_snapshot_and_no_pending():
    sm, _ = make()
    assert not sm.ready and "not connected" in sm.not_ready_reason()
    sm.on_connected()
    assert not sm.ready and "snapshot" in sm.not_ready_reason()
    [start] = add(sm, "a", 1)
    sm.start_failed(start.pod, "workload not found")
    assert sm.snapshot_sent() == []
    assert not sm.ready and "1 pending" in sm.not_ready_reason()
    sm.started(start.pod)
    assert sm.ready
    sm.on_disconnected()
    assert not sm.ready
    assert sm.pods["a"].state is PodState.UP  # pods keep running while istio-cni is away


def test_snapshot_drains_pods_not_named_and_keeps_kept_ones():
    sm, reg = make()
    sm.on_connected()
    for uid, ino in (("a", 1), ("b", 2), ("c", 3)):
        [start] = add(sm, uid, ino)
        sm.started(start.pod)
    sm.snapshot_sent()
    assert value(reg, "workload_manager_active_proxy_count") == 3
    # istio-cni restarts: replays a (same netns), keep for b, nothing for c
    sm.on_disconnected()
    sm.on_connected()
    assert [type(c) for c in add(sm, "a", 1)] == [Discard]
    assert sm.keep("b") == ""
    stops = sm.snapshot_sent()
    assert [(s.pod.uid, s.reason) for s in stops] == [("c", "not in the istio-cni snapshot")]
    assert set(sm.pods) == {"a", "b"}
    sm.stopped(stops[0].pod, was_up=True)
    assert value(reg, "workload_manager_active_proxy_count") == 2
    assert value(reg, "workload_manager_proxies_started_total") == 3
    assert value(reg, "workload_manager_proxies_stopped_total") == 1
    assert sm.keep("a").startswith("KeepWorkload a received after the snapshot")


def test_same_uid_new_netns_replaces_the_proxy():
    sm, _ = make()
    sm.on_connected()
    [start] = add(sm, "a", 1)
    sm.started(start.pod)
    stop, start2 = add(sm, "a", 2)
    assert isinstance(stop, Stop) and stop.pod is start.pod and stop.reason == "network namespace changed"
    assert isinstance(start2, Start) and start2.pod.netns_id == (1, 2)


def test_delete_and_pending_retry():
    sm, reg = make()
    sm.on_connected()
    [start] = add(sm, "a", 1)
    sm.start_failed(start.pod, "not found")
    assert value(reg, "workload_manager_pending_proxy_count") == 1
    assert [c.pod.uid for c in sm.retry_pending()] == ["a"]
    # istio-cni adds the same pod again while pending: retried at once, duplicate fd released
    again = add(sm, "a", 1)
    assert [type(c) for c in again] == [Discard, Start]
    [stop] = sm.delete("a")
    assert stop.pod is start.pod and stop.reason == "deleted by istio-cni"
    assert sm.delete("a") == []  # idempotent
    assert value(reg, "workload_manager_pending_proxy_count") == 0
    sm.started(start.pod)  # a start that finishes after the delete changes nothing
    assert sm.pods == {} and value(reg, "workload_manager_active_proxy_count") == 0
