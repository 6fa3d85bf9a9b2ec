"""Move the current process into a named network namespace (``/run/netns/NAME``) with setns(2).

Role: python-iptables works on the network namespace of the calling process, so the
`ztunnel-fast redirect ... --netns NAME` commands enter NAME before anything else; child
processes (`ipset`, `ip`, `iptables-legacy-save`) inherit it.

Invariants: only a single-threaded process may switch (setns changes the calling thread only);
it happens before the first iptables table is opened; there is no way back, by design: the
command runs entirely inside the namespace it was pointed at.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

__all__ = ["NetnsError", "enter"]

CLONE_NEWNET = 0x40000000  # linux/sched.h
NETNS_DIR = "/run/netns"  # where `ip netns add` pins namespaces
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class NetnsError(RuntimeError):
    pass


def enter(name: str) -> None:
    if not _NAME_RE.match(name):
        raise NetnsError(f"bad network namespace name {name!r}")
    if threading.active_count() != 1:
        raise NetnsError("cannot switch network namespace in a multi-threaded process")
    path = os.path.join(NETNS_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {name} does not exist (no {path})") from None
    try:
        setns = getattr(os, "setns", None)  # Python >= 3.12
        if setns is not None:
            setns(fd, CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetnsError(f"setns({path}): {os.strerror(err)} (needs root / CAP_SYS_ADMIN)")
    except PermissionError:
        raise NetnsError(f"setns({path}): permission denied (needs root / CAP_SYS_ADMIN)") from None
    finally:
        os.close(fd)
