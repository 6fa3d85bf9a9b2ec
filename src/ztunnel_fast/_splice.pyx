# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The native engine: worker threads that own established tunnels and move their bytes without the GIL.

Role: plain<->plain tunnels (splice(2), zero copy) and HBONE connections (HTTP/2 framing, flow
control, TLS records through the SSL* pyOpenSSL handshook) run on N worker threads, each an
edge-triggered epoll loop.  The event loop talks to them through per-worker command queues and
hears back through one event queue whose eventfd it watches.  Only per-tunnel and per-header-block
work ever reaches Python: never a Python frame per chunk of payload.

Layout (each piece a .pxi included below, declarations in _splice.pxd and includes/system.pxd):
core (buffers, queues), frames (HTTP/2 wire constants and writers), splice (plain<->plain), conn
(connection and stream lifecycle), hpack (libnghttp2's decoder for the peer's header blocks), flow + accept (the
outbound fast path: the flow cache and the workers' own accept), inflow (the inbound fast path), parse + data (the frame parser, sans-IO), stream (a stream
attached to a plain socket), tls (SSL_read / SSL_write, run loop, commands, timers), worker
(threads and epoll), then the Python API (`Core`, and `FrameParser` for tests).

Invariants: a worker's objects are touched only by that worker; nothing is freed while an epoll
batch may point at it; memory per tunnel is bounded by flow-control windows and fixed buffers; a
peer's bad input ends its connection (GOAWAY), never the process.
"""

from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memmove, memset, memcmp, strlen
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, uintptr_t

from .includes.system cimport *
from .includes.nghttp2 cimport *
from .includes.net cimport *

include "_splice_core.pxi"
include "_splice_frames.pxi"
include "_splice_splice.pxi"
include "_splice_conn.pxi"
include "_splice_hpack.pxi"
include "_splice_flow.pxi"
include "_splice_inflow.pxi"
include "_splice_accept.pxi"
include "_splice_parse.pxi"
include "_splice_data.pxi"
include "_splice_stream.pxi"
include "_splice_tls.pxi"
include "_splice_worker.pxi"
include "_splice_api.pxi"
