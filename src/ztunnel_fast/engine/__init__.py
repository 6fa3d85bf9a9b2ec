"""Engine selection: the native (Cython) engine when built, else the pure twin.

`ZTUNNEL_ENGINE=native|pure|auto` chooses; `ZTUNNEL_NO_EXTENSIONS=1` forces the pure twin;
asking for `native` when the extension is not built is a start-up error, never a silent fallback.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from .base import Completion, Engine, abort, close_after

log = logging.getLogger(__name__)

__all__ = ["Completion", "Engine", "abort", "close_after", "create_engine", "native_available"]


def native_available() -> tuple[bool, str]:
    try:
        from . import native  # noqa: F401
    except ImportError as exc:
        return False, str(exc)
    return True, ""


def create_engine(choice: str = "auto", workers: int = 2) -> Engine:
    """Must be called with a running event loop.  `workers`: native worker threads
    (ZTUNNEL_WORKER_THREADS, `Config.worker_threads`); the pure twin ignores it."""
    if choice not in ("auto", "native", "pure"):
        raise ConfigError("ZTUNNEL_ENGINE", "", f"unknown engine {choice!r} (use auto|native|pure)")
    if choice in ("auto", "native"):
        ok, why = native_available()
        if ok:
            from .native import NativeEngine

            return NativeEngine(workers=workers)
        if choice == "native":
            raise ConfigError("ZTUNNEL_ENGINE", "", f"native engine requested but not built: {why}")
        log.warning("native engine not available (%s); using the pure twin", why)
    from .pure import PureEngine

    return PureEngine()
