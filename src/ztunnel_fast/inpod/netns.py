"""A pod's network namespace, handed over by istio-cni as an fd: validation and running code in it.

A socket belongs to the network namespace of the thread that created it, for its whole life, so
entering the pod's namespace is only needed to *create* sockets; binding, connecting and moving
bytes then work from any thread.  Code that must create sockets in a pod runs on one dedicated
thread (`NetnsThread`) that enters the pod's namespace, runs it, and returns to ztunnel-fast's
own namespace before doing anything else; the event loop thread never leaves its namespace.

Invariants: a PodNetns owns its fd (O_CLOEXEC from MSG_CMSG_CLOEXEC) and closes it exactly once;
only fds whose NS_GET_NSTYPE is CLONE_NEWNET are accepted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3), returns the CLONE_NEW* type of an nsfs fd
CLONE_NEWNET = os.CLONE_NEWNET if hasattr(os, "CLONE_NEWNET") else 0x40000000

T = TypeVar("T")


class NotANetworkNamespace(ValueError):
    pass


def check_netns_fd(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of a network-namespace fd; NotANetworkNamespace for anything else."""
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        raise NotANetworkNamespace(f"fd is not a namespace ({exc.strerror})") from None
    if kind != CLONE_NEWNET:
        raise NotANetworkNamespace(f"fd is a namespace of type {kind:#x}, not a network namespace")
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class PodNetns:
    def __init__(self, fd: int):
        self.fd = fd
        self.id = check_netns_fd(fd)

    @property
    def inode(self) -> int:
        return self.id[1]

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"PodNetns(net:[{self.inode}])"


def _setns(fd: int) -> None:
    os.setns(fd, CLONE_NEWNET) if hasattr(os, "setns") else _libc_setns(fd)


def _libc_setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetnsThread:
    """One worker thread that creates sockets inside pod namespaces on request."""

    def __init__(self) -> None:
        # ztunnel-fast's own namespace, to come back to after every call
        self._home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")

    def _call(self, fd: int, fn: Callable[[], T]) -> T:
        _setns(fd)
        try:
            return fn()
        finally:
            try:
                _setns(self._home)
            except OSError:
                # a thread stuck in a pod namespace would create the next pod's sockets in the
                # wrong place: stop using this thread altogether
                log.critical("cannot return to the node network namespace; replacing the netns thread")
                self._pool.shutdown(wait=False)
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns")
                raise

    async def run(self, netns: PodNetns, fn: Callable[[], T]) -> T:
        """Run `fn` (which should only create sockets) inside `netns`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, netns.fd, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        os.close(self._home)
