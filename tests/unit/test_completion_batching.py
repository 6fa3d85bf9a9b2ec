"""Completion batching (ZTUNNEL_FAST_PATH_BATCH_WINDOW): the native event queue's wake-up rules and
the engine's hold, on a real Core and real workers.

- While the queue is held, a deferrable event (a fast-path tunnel's opening, status or end, a hot
  class) queues without writing the eventfd; every other event writes it, and one poll takes all.
- The engine holds the queue for `batch_window` after a poll that took deferrable events, lets go
  when a timer's poll took none, and any other event is dispatched at once meanwhile.
- Real fast-path tunnels produce only deferrable events per tunnel: held, 10 tunnels wake nobody,
  and the poll that follows takes their 10 openings and 10 ends.

Waits are bounded loops on what the workers did (events_emitted), never timing thresholds."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from ztunnel_fast import _splice
from ztunnel_fast.engine import native as nat
from ztunnel_fast.engine.pure import PureEngine

from .test_native_engine import NativeEngine, Pair, certs, run  # noqa: F401 - certs: the fixture
from .test_worker_connections import Sink, fast_listener

FAST = nat.FAST_TOKEN | 7
INBOUND = nat.FAST_TOKEN | nat.INBOUND_TOKEN | 7

# (kind, token) -> deferrable: what may wait for the batch window
KINDS = [
    (nat.EV_FAST_OPEN, FAST, True),
    (nat.EV_FAST_STATUS, FAST, True),
    (nat.EV_STREAM_END, FAST, True),
    (nat.EV_INBOUND_OPEN, INBOUND, True),
    (nat.EV_STREAM_END, INBOUND, True),
    (nat.EV_FLOW_HOT, 0, True),
    (nat.EV_STREAM_END, 5, False),  # the event loop's own tunnel
    (nat.EV_STREAM_END, 0, False),
    (nat.EV_ACCEPTED, 0, False),  # a socket for the event loop's path
    (nat.EV_STREAM_ID, 5, False),
    (nat.EV_HEADERS, 0, False),
    (nat.EV_SPLICE_DONE, 5, False),
    (nat.EV_SETTINGS, 0, False),
    (nat.EV_GOAWAY, 0, False),
    (nat.EV_ERROR, 0, False),
    (nat.EV_CLOSED, 0, False),
]


def signalled(core) -> bool:
    """Read (and so clear) the eventfd: was it written?"""
    try:
        os.read(core.event_fd, 8)
    except BlockingIOError:
        return False
    return True


@pytest.mark.parametrize("kind,token,deferrable", KINDS)
def test_a_held_queue_wakes_the_event_loop_only_for_what_cannot_wait(kind, token, deferrable):
    core = _splice.Core(1)
    try:
        core.inject_event(kind, 1, token)
        assert signalled(core)  # not held: every event wakes
        assert [ev[0] for ev in core.poll()] == [kind]
        assert core.polled_deferrable == int(deferrable)

        core.events_held = True
        assert core.events_held
        core.inject_event(kind, 2, token)
        assert signalled(core) is not deferrable
        core.inject_event(nat.EV_ACCEPTED, 3)  # any other event wakes, and its poll takes both
        assert signalled(core) is deferrable
        assert [(ev[0], ev[1]) for ev in core.poll()] == [(kind, 2), (nat.EV_ACCEPTED, 3)]
        assert core.polled_deferrable == int(deferrable)
        assert core.poll() == [] and core.polled_deferrable == 0

        core.events_held = False
        core.inject_event(kind, 4, token)
        assert signalled(core)
    finally:
        core.stop()


class HotSink:
    """The fast path's stand-in: records EV_FLOW_HOT (a deferrable event with no side effects)."""

    def __init__(self):
        self.hot: list[int] = []

    def on_hot(self, flow_id, worker):
        self.hot.append(flow_id)


async def until(cond, what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


def test_the_engine_holds_the_queue_for_the_window_after_deferrable_events_and_lets_go_when_quiet():
    async def main():
        engine = NativeEngine(workers=1)
        sink = engine.fast_sink = HotSink()
        engine.batch_window = 0.2
        core = engine.core
        try:
            core.inject_event(nat.EV_FLOW_HOT, 1)  # not held: dispatched at the next loop turn
            await until(lambda: sink.hot == [1], "the first event dispatched")
            assert core.events_held and engine._batch_timer is not None

            core.inject_event(nat.EV_FLOW_HOT, 2)
            core.inject_event(nat.EV_FLOW_HOT, 3)
            for _ in range(20):  # the reader is not woken: nothing runs them before the timer
                await asyncio.sleep(0)
            assert sink.hot == [1]

            timer = engine._batch_timer
            core.inject_event(nat.EV_STREAM_ID, 99, 5)  # of no connection: ignored, but it wakes
            await until(lambda: sink.hot == [1, 2, 3], "the held events taken with the other one")
            assert engine._batch_timer is timer  # the hold runs on to its window's end

            await until(lambda: engine._batch_timer is not timer, "the window's end")
            assert engine._batch_timer is None and not core.events_held  # nothing came: let go

            core.inject_event(nat.EV_FLOW_HOT, 4)  # quiet again: seen at once, and held again
            await until(lambda: sink.hot == [1, 2, 3, 4], "a quiet queue's event dispatched")
            assert core.events_held

            engine.batch_window = 0.0  # off: the hold ends with its window, then a wake-up per poll
            await until(lambda: not core.events_held, "the last hold's end")
            core.inject_event(nat.EV_FLOW_HOT, 5)
            await until(lambda: sink.hot[-1:] == [5], "dispatched")
            assert not core.events_held and engine._batch_timer is None
        finally:
            engine.close()
        assert engine._batch_timer is None

    run(main())


def test_real_fast_path_tunnels_wait_for_the_window_and_come_in_one_poll(certs):
    async def main():
        engine = NativeEngine(workers=2)
        sink = engine.fast_sink = Sink()
        a = await Pair(certs, engine, PureEngine(), status=503).open()
        core = engine.core
        lsock = socket.create_server(("127.0.0.1", 0))
        lid = 4
        try:
            a.client.fast_enabled = True
            core.fast_enable(a.client.worker, a.client.id, 100)
            ip, port, here, prefix = fast_listener(core, lsock, lid)
            core.flow_install(here, here, port, a.client.id, a.client.worker, 1, prefix, b"", b"", lid)
            await asyncio.sleep(0.05)
            engine._on_events()  # nothing else pending

            core.events_held = True
            before = core.events_emitted
            for _ in range(10):
                with socket.create_connection((ip, port), timeout=5):
                    pass
            # each tunnel: its opening, the 503 (EV_FAST_STATUS) and its end
            await until(lambda: core.events_emitted - before >= 30, "30 events queued")
            for _ in range(20):
                await asyncio.sleep(0)
            assert sink.opened == [] and sink.ended == []  # no wake-up for any of them
            assert core.events_emitted - before == 30

            core.events_held = False
            engine._on_events()
            assert len(sink.opened) == 10 and len(sink.ended) == 10
            assert core.polled_deferrable == 30
        finally:
            core.unlisten(lid)
            lsock.close()
            a.close()
            await asyncio.sleep(0.05)
            engine.close()

    run(main())
