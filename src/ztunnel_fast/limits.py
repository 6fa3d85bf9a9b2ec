"""Process limits and memory handed back to the system: the bounded cost of strangers, process side.

Role: two small OS-facing helpers the app and the inbound listener call.
- `raise_open_files()`: the soft RLIMIT_NOFILE raised to the hard limit at start, as ztunnel does
  (an inherited soft limit of 1,024 would stop accepting long before memory or CPU run out).
- `release_free_memory()`: glibc keeps freed heap pages in its arenas; after a wave of connections
  has come and gone, `malloc_trim(0)` hands them back so RSS returns near its baseline.

Invariants: neither ever raises (a limit we cannot change, or a libc without malloc_trim, is a
fact to report, not an error); both are cheap enough to call from the event loop, and
`release_free_memory` is only called after waves (`should_trim`), never per connection.
"""

from __future__ import annotations

import resource

TRIM_AFTER_PEAK = 256  # pending connections at a wave's peak before its end is worth a malloc_trim


def raise_open_files() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def should_trim(peak: int) -> bool:
    """Whether the end of a wave that peaked at `peak` pending connections deserves a trim (pure)."""
    return peak >= TRIM_AFTER_PEAK


_malloc_trim = None


def _find_malloc_trim():
    """The C library's malloc_trim as a callable (size_t) -> int, or False when there is none.

    The native engine's binding when it is built: no ctypes in its processes (~0.3 MiB of idle
    RSS); otherwise ctypes' view of the process's own symbols (libc among them), without
    ctypes.util.find_library, which imports shutil & co. and runs ldconfig (~0.4 MiB)."""
    try:
        from ._splice import malloc_trim
    except ImportError:
        pass
    else:
        return malloc_trim  # -1 from it means "no malloc_trim in this C library": released nothing
    import ctypes  # imported here: only processes without the native engine need it

    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """`malloc_trim(0)` when the C library has it (glibc); True when it released something."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = _find_malloc_trim()
    if not _malloc_trim:
        return False
    return _malloc_trim(0) > 0
