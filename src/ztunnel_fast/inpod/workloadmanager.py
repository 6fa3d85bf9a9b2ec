"""The ZDS connection to istio-cni: connect with backoff, hello, then one ack per request.

istio-cni listens on an AF_UNIX SOCK_SEQPACKET socket (INPOD_UDS, default
/var/run/ztunnel/ztunnel.sock); ztunnel-fast connects, retrying with ztunnel's backoff (10 ms,
doubled after every failure, at most 15 s, back to 10 ms once connected), sends ZdsHello{V1} and
then answers every WorkloadRequest with exactly one WorkloadResponse{ack}.  Datagrams are read with
recvmsg (1024 bytes + room for a few fds, MSG_CMSG_CLOEXEC) and decoded by `protocol`; decisions
are `statemanager`'s; this module only does the I/O and runs the resulting start/stop commands.

Invariants:
- Bad input from istio-cni is NACKed with the reason and logged; it never ends the process or
  the connection.  Only EOF or a socket error ends a connection (then: reconnect).
- Every received fd is either owned by a pod (PodNetns) or closed before the ack is sent.
- Pods keep running while istio-cni is away; the next snapshot decides which stay.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from pathlib import Path

from ..admin.server import Readiness
from ..proxy.context import ProxyContext
from ..telemetry.metrics import Metrics
from . import protocol
from .netns import NetnsThread, NotANetworkNamespace, PodNetns
from .podproxy import PodProxy, WorkloadNotFound
from .statemanager import Command, Discard, Pod, PodState, READINESS_TASK, Start, StateManager, Stop, \
    WorkloadManagerMetrics

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 0.010  # seconds, ztunnel's first retry delay
BACKOFF_MAX = 15.0  # seconds, ztunnel's cap
PENDING_RETRY_INTERVAL = 5.0  # seconds between retries of pending pods (ztunnel's)


class WorkloadManager:
    def __init__(self, ctx: ProxyContext, uds: Path, readiness: Readiness, metrics: Metrics, drain_deadline: float):
        self.ctx = ctx
        self.uds = uds
        self.readiness = readiness
        self.state = StateManager(WorkloadManagerMetrics(metrics.registry))
        self.proxies: dict[str, PodProxy] = {}  # uid -> running proxy (pod state UP)
        self.drain_deadline = drain_deadline
        self.thread = NetnsThread()
        self._tasks: list[asyncio.Task] = []
        self._drains: set[asyncio.Task] = set()
        self._sock: socket.socket | None = None
        self._starting: set[str] = set()  # uids with a start in flight (retry and add may race)
        readiness.block(READINESS_TASK)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="zds-client"),
                       loop.create_task(self._retry_pending(), name="zds-pending-retry")]

    # --- connection loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock = sock
            try:
                await asyncio.get_running_loop().sock_connect(sock, str(self.uds))
            except OSError as exc:
                sock.close()
                backoff = min(backoff * 2, BACKOFF_MAX)
                log.debug("istio-cni not reachable at %s (%s); retrying in %.3fs", self.uds, exc, backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = BACKOFF_INITIAL
            log.info("connected to istio-cni at %s", self.uds)
            try:
                await self._serve(sock)
            except OSError as exc:
                log.warning("istio-cni connection failed: %s", exc)
            finally:
                sock.close()
                self._sock = None
                self.state.on_disconnected()
                self._update_readiness()
            log.warning("disconnected from istio-cni; reconnecting (pods keep running)")
            await asyncio.sleep(backoff)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, protocol.hello())
        self.state.on_connected()
        self._update_readiness()
        while True:
            data, ancdata, flags = await _recvmsg(sock)
            fds, cmsg_error = protocol.fds_from_ancillary(ancdata)
            if protocol.is_eof(data, fds, flags):
                return  # EOF: istio-cni went away
            try:
                error = await self._handle(data, fds, flags, cmsg_error)
            except Exception as exc:  # noqa: BLE001 - a bug here must NACK, not kill the client
                log.exception("error handling a ZDS message")
                error = f"internal error: {exc}"
            finally:
                for fd in fds:  # whatever a pod did not take
                    _close_quietly(fd)
            if error:
                log.warning("NACK to istio-cni: %s", error)
            await loop.sock_sendall(sock, protocol.ack(error))
            self._update_readiness()

    async def _handle(self, data: bytes, fds: list[int], flags: int, cmsg_error: str | None) -> str:
        """One request: the ack text ("" = ACK).  Takes ownership of an fd by removing it from `fds`."""
        if cmsg_error:
            return cmsg_error
        msg = protocol.parse_request(data, fds, flags)
        if isinstance(msg, protocol.ProtocolError):
            return msg.reason
        if isinstance(msg, protocol.AddWorkload):
            try:
                netns = PodNetns(msg.netns_fd)
            except NotANetworkNamespace as exc:
                return f"AddWorkload {msg.uid}: {exc}"
            fds.remove(msg.netns_fd)  # the pod (or Discard) owns it now
            log.info("pod received: %s/%s uid %s netns net:[%d]", msg.info.namespace, msg.info.name, msg.uid,
                     netns.inode)
            return await self._run_commands(self.state.add(msg.uid, msg.info, netns, netns.id))
        if isinstance(msg, protocol.KeepWorkload):
            return self.state.keep(msg.uid)
        if isinstance(msg, protocol.DelWorkload):
            log.info("pod delete request: uid %s", msg.uid)
            return await self._run_commands(self.state.delete(msg.uid))
        log.info("istio-cni snapshot received: %d pods", len(self.state.pods))
        return await self._run_commands(self.state.snapshot_sent())

    async def _run_commands(self, commands: list[Command]) -> str:
        errors = []
        for cmd in commands:
            if isinstance(cmd, Discard):
                cmd.netns.close()
            elif isinstance(cmd, Stop):
                self._stop(cmd.pod, cmd.reason)
            elif isinstance(cmd, Start):
                error = await self._start(cmd.pod)
                if error:
                    errors.append(error)
        return "; ".join(errors)

    async def _start(self, pod: Pod) -> str:
        if pod.uid in self._starting:
            return ""
        self._starting.add(pod.uid)
        proxy = PodProxy(self.ctx, pod.uid, pod.info, pod.netns, self.thread)
        reason = ""
        try:
            await proxy.start()
        except WorkloadNotFound as exc:
            reason = f"pod {pod.uid} pending: {exc}"
        except OSError as exc:
            reason = f"pod {pod.uid} pending: cannot bind listeners in its network namespace: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - a bug must leave the pod pending, not stop the retries
            log.exception("starting the proxy of pod %s failed", pod.uid)
            reason = f"pod {pod.uid} pending: internal error: {exc}"
        finally:
            self._starting.discard(pod.uid)
        if not reason:
            if self.state.pods.get(pod.uid) is not pod:  # removed while binding: undo
                self._drain(proxy, pod, "deleted while starting", was_up=False, close_netns=False)
                return ""
            self.proxies[pod.uid] = proxy
            self.state.started(pod)
            return ""
        log.warning("%s (retried every %.0fs)", reason, PENDING_RETRY_INTERVAL)
        self.state.start_failed(pod, reason)
        return reason

    def _stop(self, pod: Pod, reason: str) -> None:
        proxy = self.proxies.pop(pod.uid, None)
        was_up = pod.state is PodState.UP
        if proxy is None:
            pod.netns.close()
            self.state.stopped(pod, was_up=False)
            return
        self._drain(proxy, pod, reason, was_up=was_up, close_netns=True)

    def _drain(self, proxy: PodProxy, pod: Pod, reason: str, *, was_up: bool, close_netns: bool) -> None:
        proxy.stop_accepting()  # now, before the request's ack: nothing accepted after it (fast path too)

        async def drain() -> None:
            try:
                await proxy.drain(self.drain_deadline, reason)
            finally:
                if close_netns:
                    pod.netns.close()
                self.state.stopped(pod, was_up=was_up)
        task = asyncio.get_running_loop().create_task(drain(), name=f"drain-pod-{pod.uid}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _retry_pending(self) -> None:
        while True:
            await asyncio.sleep(PENDING_RETRY_INTERVAL)
            for cmd in self.state.retry_pending():
                if isinstance(cmd, Start) and cmd.pod.state is PodState.PENDING:
                    await self._start(cmd.pod)
            self._update_readiness()

    def _update_readiness(self) -> None:
        if self.state.ready:
            self.readiness.done(READINESS_TASK)
        else:
            self.readiness.block(READINESS_TASK)

    # --- admin and shutdown ----------------------------------------------------------------------
    def workload_state(self) -> dict:
        """config_dump's `workloadState`: {uid: {state, info, connections}}."""
        out = {}
        for uid, pod in self.state.pods.items():
            proxy = self.proxies.get(uid)
            out[uid] = {
                "state": "Up" if pod.state is PodState.UP else "Pending",
                "info": {"name": pod.info.name, "namespace": pod.info.namespace,
                         "serviceAccount": pod.info.service_account},
                "connections": proxy.connections() if proxy is not None else {"inbound": [], "outbound": []},
            }
        return out

    def stop_accepting(self) -> list[PodProxy]:
        """Process shutdown: stop the ZDS client; returns the running proxies to drain."""
        for task in self._tasks:
            task.cancel()
        if self._sock is not None:
            self._sock.close()
        return list(self.proxies.values())

    async def drain(self, deadline: float) -> None:
        """Process shutdown: every pod drains in parallel; then fds and the netns thread are released."""
        proxies = self.stop_accepting()
        self.proxies.clear()
        await asyncio.gather(*(p.drain(deadline, "ztunnel-fast shutting down") for p in proxies),
                             *self._drains, return_exceptions=True)
        for pod in self.state.pods.values():
            pod.netns.close()
        self.thread.close()


async def _recvmsg(sock: socket.socket) -> tuple[bytes, list, int]:
    """recvmsg on a non-blocking socket, awaiting readability (asyncio has no sock_recvmsg)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(protocol.RECV_BUFFER, protocol.ANCILLARY_BUFFER,
                                                   socket.MSG_CMSG_CLOEXEC)
            return data, ancdata, flags
        except (BlockingIOError, InterruptedError):
            pass
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
