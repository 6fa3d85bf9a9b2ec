"""Small pieces shared by the listeners: the accept loop and the duration format of the logs."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """Durations as ztunnel prints them (Rust's Debug for Duration): 269.272µs, 46.9099ms, 1.5s."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3f}".rstrip("0").rstrip(".") + "µs"
    if seconds < 1:
        return f"{seconds * 1e3:.4f}".rstrip("0").rstrip(".") + "ms"
    return f"{seconds:.4f}".rstrip("0").rstrip(".") + "s"


async def accept_loop(
    lsock: socket.socket,
    handler: Callable[[socket.socket], Awaitable[None]],
    track: Callable[[asyncio.Task], None],
    name: str,
) -> None:
    """Accept until cancelled; every connection gets a named task of its own."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sock, _ = await loop.sock_accept(lsock)
        except (ConnectionAbortedError, BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            if exc.errno in (24, 23):  # EMFILE / ENFILE: back off instead of spinning
                log.error("%s: accept failed: %s", name, exc)
                await asyncio.sleep(0.1)
                continue
            raise
        sock.setblocking(False)
        task = loop.create_task(handler(sock), name=f"{name}-{sock.fileno()}")
        task.add_done_callback(_report_crash)
        track(task)


def _report_crash(task: asyncio.Task) -> None:
    """A handler must never die silently: an unexpected exception is a bug, logged with its trace."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("connection handler %s crashed: %r", task.get_name(), exc, exc_info=exc)
