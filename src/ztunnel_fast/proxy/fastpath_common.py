"""What the outbound and inbound fast paths' control sides share (proxy/fastpath.py,
proxy/fastpath_inbound.py): the live tunnel a worker opened, its tracking once its poll is
dispatched, and the completion tail that turns the worker's EV_STREAM_END into the event loop's
path's closing lines, access log line and metrics.

A side is a `TunnelSink` subclass that names its logger (`log`: the lines are its reference
path's), its direction (`swapped`: inbound's plain socket is the app, the server, so what it sent
is the response direction) and how a failure is logged (`_failed`).

Invariants:
- `tunnels` holds a token from its open event to its completion; a completion pops it exactly once
  (`_ended`), and a token that opened as an orphan (no entry: cannot happen) only has its socket
  reset there.
- A tunnel's `fd` is owned here from its open event on and closed exactly once, at its completion:
  with RST (`abort_fd`) when it was cancelled, reset or never attached, else with close(2).
- `future` (what drain and, inbound, policy changes cancel) is made only for a tunnel still live
  once the poll that opened it is dispatched (NativeEngine.after_batch: no await and no state
  change came in between); `tracked` is its ProxyContext.connections entry (inbound only).
- The lines, access log and metrics are the reference path's, to the letter: `complete dur=...`
  at INFO (formatted only when INFO is on), `failed dur=... err=...` at WARNING, and
  ConnectionRecord.complete once per tunnel.
- Imported only with the native engine.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from h2.errors import ErrorCodes

from ..engine import abort
from ..engine.native import END_CLEAN, stream_completion
from .common import format_duration

DRAIN_REASON = "connection closed due to drain"


class Tunnel:
    """One live fast-path tunnel: `fd` is the client socket (outbound) or the app socket
    (inbound); `future` and `tracked` are made only if it outlives its poll (_track_fresh).
    Outbound sets `flow_id`, `scope` (who tracks it for drain: the node's context or its pod's
    PodScope) and `status` (a CONNECT answered with other than 200); inbound sets `entry`."""

    __slots__ = ("conn", "done", "entry", "fd", "flow_id", "future", "record", "scope", "sid", "sink", "span",
                 "start", "status", "tracked")

    def __init__(self, conn, sid, fd, span, record, start, scope, *, flow_id=0, entry=None):
        self.conn = conn
        self.sid = sid
        self.fd = fd
        self.span = span
        self.record = record
        self.start = start
        self.scope = scope
        self.flow_id = flow_id
        self.entry = entry
        self.status = 0
        self.future = None
        self.tracked = None
        self.done = False

    def on_future_done(self, future) -> None:
        """The done callback of `future` (set by _track_fresh, with `sink`): drain or a policy
        change cancelled it.  Removed before the completion sets its result (_settled)."""
        if future.cancelled():
            self.sink._cancelled(self)


def abort_fd(fd: int) -> None:
    """Close the socket `fd` with RST (engine.abort)."""
    abort(socket.socket(fileno=fd))


class TunnelSink:
    """The part of a fast path's control side that handles tunnels (see the module docstring).
    A subclass sets `log` and `swapped`, calls `_init_tunnels` and implements `_failed` and
    `_cancelled`; it may override `_track` (what else tracks a tunnel that outlives its poll)."""

    log: logging.Logger
    swapped = False  # inbound: the plain socket is the app (the server): sent/received swap

    def _init_tunnels(self, ctx) -> None:
        self.ctx = ctx
        self.engine = ctx.engine
        self.core = ctx.engine.core
        ctx.engine.batch_window = ctx.config.fast_path_batch_window  # completion batching
        self.tunnels: dict[int, Tunnel] = {}  # token -> live fast-path tunnel
        self._orphans: dict[int, socket.socket] = {}  # token -> socket of a tunnel of no entry
        self._fresh: list[Tunnel] = []  # opened in the poll being dispatched (_track_fresh)

    # -- open ----------------------------------------------------------------------------------
    def _orphan(self, token: int, fd: int, conn, sid: int) -> None:
        """A tunnel of no entry (cannot happen): its socket is closed at its completion, once the
        worker let go of it; the worker resets the stream."""
        self._orphans[token] = socket.socket(fileno=fd)
        if conn is not None and not self.engine._closed:
            self.core.reset(conn.worker, conn.id, sid, ErrorCodes.CANCEL)

    def _opened(self, token: int, tunnel: Tunnel) -> None:
        self.tunnels[token] = tunnel
        fresh = self._fresh
        if not fresh:
            self.engine.after_batch(self._track_fresh)
        fresh.append(tunnel)

    def _track_fresh(self) -> None:
        """The tunnels opened in this poll that are still live are tracked for drain, each in its
        scope (a tunnel whose completion came in the same poll never needed to be: no await, no
        state change came in between)."""
        fresh, self._fresh = self._fresh, []
        create_future = self.engine.loop.create_future
        for tunnel in fresh:
            if tunnel.done:
                continue
            tunnel.future = future = create_future()
            tunnel.sink = self
            self._track(tunnel, future)
            future.add_done_callback(tunnel.on_future_done)
            tunnel.scope.track(future)

    def _track(self, tunnel: Tunnel, future) -> None:
        """What else tracks a tunnel that outlived its poll (inbound: policy changes)."""

    def _cancelled(self, tunnel: Tunnel) -> None:
        raise NotImplementedError

    # -- completion ----------------------------------------------------------------------------
    def _ended(self, token: int) -> Tunnel | None:
        """The tunnel of a completion, marked done; None for an orphan (its socket reset here)."""
        tunnel = self.tunnels.pop(token, None)
        if tunnel is None:
            orphan = self._orphans.pop(token, None)
            if orphan is not None:
                abort(orphan)
            return None
        tunnel.done = True
        return tunnel

    def _settled(self, tunnel: Tunnel) -> bool:
        """Complete the tunnel's future; True when drain or a policy change had cancelled it (the
        reference path's CancelledError branch: RST, the record's closing reason, no line)."""
        future = tunnel.future
        if future is None:
            return False
        tracked = tunnel.tracked
        if tracked is not None:
            self.ctx.connections.untrack(tracked)
        if future.cancelled():
            abort_fd(tunnel.fd)
            tunnel.record.complete(0, 0, (tracked.closed_reason if tracked is not None else None) or DRAIN_REASON)
            return True
        if not future.done():
            future.remove_done_callback(tunnel.on_future_done)  # not cancelled: nothing for it to do
            future.set_result(None)
        return False

    def _finish(self, tunnel: Tunnel, kind: int, code: int, err: int, sent: int, received: int) -> None:
        """The completion tail of an attached tunnel: close the socket (RST on a reset), complete
        the record, and the reference path's closing line."""
        log = self.log
        if kind == END_CLEAN:  # stream_completion's common case, without its Completion
            os.close(tunnel.fd)
            if self.swapped:
                tunnel.record.complete(received, sent, None)
            else:
                tunnel.record.complete(sent, received, None)
            if log.isEnabledFor(logging.INFO):
                log.info("complete dur=%s", format_duration(time.monotonic() - tunnel.start),
                         extra={"span": tunnel.span})
            return
        completion = stream_completion((kind, code, err, sent, received), tunnel.start)
        if completion.reset:
            abort_fd(tunnel.fd)
        else:
            os.close(tunnel.fd)
        if self.swapped:
            tunnel.record.complete(completion.received, completion.sent, completion.error)
        else:
            tunnel.record.complete(completion.sent, completion.received, completion.error)
        if completion.error:
            self._failed(tunnel, completion.error, completion.duration)
        elif log.isEnabledFor(logging.INFO):
            log.info("complete dur=%s", format_duration(time.monotonic() - tunnel.start), extra={"span": tunnel.span})

    def _failed(self, tunnel: Tunnel, error: str, duration: float) -> None:
        """The reference path's `failed` line of a tunnel that ended in `error` after `duration`."""
        raise NotImplementedError
