# _splice piece 1: constants, clock, buffers, chunk queues, the event queue and the command queue.
# Everything here runs without the GIL and touches no Python object.

# -- event kinds (worker -> event loop) ------------------------------------------------------------
cdef enum:
    EV_SPLICE_DONE = 1   # id=token, a=bytes a->b, b=bytes b->a, err=errno (0 clean)
    EV_HEADERS = 2       # id=conn, sid, flags=HF_*, data=decoded fields (_splice_hpack.pxi)
    EV_STREAM_END = 3    # id=conn, sid, token, flags=END_*, code=h2 code, err=errno, a=sent, b=received
    EV_SETTINGS = 4      # id=conn, a=peer SETTINGS_MAX_CONCURRENT_STREAMS
    EV_GOAWAY = 5        # id=conn, sid=last stream id, code, data=debug data
    EV_ERROR = 6         # id=conn, code=GOAWAY code we sent, data=reason (the connection is ending)
    EV_CLOSED = 7        # id=conn, flags=CLOSE_*, data=reason; the worker let go of fd and SSL*
    EV_FAST_OPEN = 8     # id=conn, token, sid, code=fd, flags=client port, a=flow id, b=accept time (ns),
                         # data=trace id (32 hex): a fast-path tunnel began
    EV_ACCEPTED = 9      # a=fd, b=accept time (ns), sid=listener, id=the fast-path conn found full (or 0):
                         # an accepted socket for the event loop's path
    EV_FAST_STATUS = 10  # id=conn, token, sid, code=status: a fast-path CONNECT answered non-200
    EV_INBOUND_OPEN = 11 # id=conn, token, sid, code=upstream fd, a=flow id, b=CONNECT time (ns),
                         # data=the request's decoded fields: the worker answered 200 and spliced
    EV_STREAM_ID = 12    # id=conn, token=the event loop's, sid (0: refused, flags=END_REFUSED, code):
                         # the id the worker gave a CMD_OPEN sent with sid 0
    EV_FLOW_HOT = 13     # id=flow id, sid=worker: that worker hands the class's connections over at
                         # the handover rate or more and wants a connection of its own (once per entry)

# header block flags
cdef enum:
    HF_END_STREAM = 1
    HF_TRAILERS = 2      # decode only: trailers on a known stream
    HF_IGNORED = 4       # decode only: the stream is gone or refused (HPACK state must follow)
    HF_RESPONSE = 8      # client: the response to our CONNECT

# how a stream ended (EV_STREAM_END flags)
cdef enum:
    END_CLEAN = 0        # END_STREAM both ways
    END_PEER_RESET = 1   # RST_STREAM from the peer (code)
    END_LOCAL_RESET = 2  # reset asked by the event loop (code)
    END_IO = 3           # the plain socket failed (err); RST_STREAM(CANCEL) sent
    END_CONN = 4         # the connection ended under the stream
    END_REFUSED = 5      # GOAWAY from the peer did not cover the stream
    END_NOSTREAM = 6     # attach to a stream that no longer exists
    END_PROTOCOL = 7     # we reset the stream for a stream error (code)
    END_PENDING = 0x100  # flag: a fast-path stream ended before its CONNECT was answered

# how a connection ended (EV_CLOSED flags)
cdef enum:
    CLOSE_LOCAL = 0      # the event loop closed it (graceful)
    CLOSE_PEER = 1       # EOF / close_notify from the peer
    CLOSE_IO = 2         # socket or TLS error
    CLOSE_PROTOCOL = 3   # we sent an error GOAWAY
    CLOSE_GOAWAY = 4     # the peer's GOAWAY and no streams left (or an error GOAWAY)
    CLOSE_KEEPALIVE = 5  # no PING ack in time
    CLOSE_DRAINED = 6    # our graceful GOAWAY and no streams left
    CLOSE_STOP = 7       # engine shutdown

# -- command kinds (event loop -> worker) ----------------------------------------------------------
cdef enum:
    CMD_SPLICE = 1       # token, fd, fd2
    CMD_SPLICE_CANCEL = 2
    CMD_ADOPT = 3        # id, fd, ssl, flags=client, settings
    CMD_OPEN = 4         # id, sid (0: the worker picks it: EV_STREAM_ID), token, data=header block
                         # (client CONNECT, no END_STREAM)
    CMD_RESPOND = 5      # id, sid, data=header block, flags=end stream
    CMD_ATTACH = 6       # id, sid, fd, token
    CMD_RESET = 7        # id, sid, code
    CMD_GOAWAY = 8       # id, code
    CMD_CLOSE = 9        # id, flags=graceful
    CMD_ERROR = 10       # id, code: a connection error found by the event loop (HPACK, headers)
    CMD_STOP = 11
    CMD_LISTEN = 12      # fd (the worker's own dup), settings[0..2]=keepalive idle/interval/count
    CMD_UNLISTEN = 13
    CMD_FAST_OPEN = 14   # id=conn, fd, token, data=trace id + header block, settings=flow id, client, time
    CMD_FAST_ENABLE = 15 # id=conn, code=streams the fast path may open on it (0: none)

# -- connection settings (Cmd.settings indexes) ----------------------------------------------------
cdef enum:
    CS_STREAM_WINDOW = 0
    CS_CONN_WINDOW = 1
    CS_MAX_FRAME = 2
    CS_MAX_STREAMS = 3
    CS_MAX_HEADER_LIST = 4
    CS_PING_INTERVAL_MS = 5
    CS_PING_TIMEOUT_MS = 6

DEF NS = 1000000000


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * NS + ts.tv_nsec


# -- Buf -------------------------------------------------------------------------------------------
cdef inline size_t buf_len(Buf *b) noexcept nogil:
    return b.end - b.start


cdef int buf_reserve(Buf *b, size_t n) noexcept nogil:
    """Make room for n more bytes after b.end.  Returns 0, or -1 when out of memory.

    Compacts only when that moves no more bytes than it frees (amortised: each byte is moved at
    most once per pass through the buffer), else grows.  May move the live bytes: SSL_write
    retries are fine with that (ACCEPT_MOVING_WRITE_BUFFER)."""
    cdef size_t live, cap
    cdef char *p
    if b.cap - b.end >= n:
        return 0
    live = b.end - b.start
    if b.start > 0 and b.start >= live and b.cap - live >= n:
        memmove(b.data, b.data + b.start, live)
        b.start = 0
        b.end = live
        return 0
    cap = b.cap if b.cap >= 4096 else 4096
    while cap - b.end < n:
        cap *= 2
    p = <char *>realloc(b.data, cap)
    if p == NULL:
        return -1
    b.data = p
    b.cap = cap
    return 0


cdef inline void buf_consume(Buf *b, size_t n) noexcept nogil:
    b.start += n
    if b.start >= b.end:
        b.start = 0
        b.end = 0


cdef int buf_append(Buf *b, const char *p, size_t n) noexcept nogil:
    if buf_reserve(b, n) != 0:
        return -1
    memcpy(b.data + b.end, p, n)
    b.end += n
    return 0


cdef void buf_shrink(Buf *b, size_t keep) noexcept nogil:
    """Give memory back once a large frame has passed (bounded buffers between bursts)."""
    cdef char *p
    if b.cap > keep and b.end - b.start == 0:
        p = <char *>realloc(b.data, keep)
        if p != NULL:
            b.data = p
            b.cap = keep
        b.start = 0
        b.end = 0


cdef void buf_free(Buf *b) noexcept nogil:
    free(b.data)
    b.data = NULL
    b.start = 0
    b.end = 0
    b.cap = 0


# -- ChunkQ ----------------------------------------------------------------------------------------
cdef int chunkq_push(ChunkQ *q, const char *p, size_t n) noexcept nogil:
    cdef Chunk *c = <Chunk *>malloc(sizeof(Chunk) + n)
    if c == NULL:
        return -1
    c.next = NULL
    c.off = 0
    c.len = n
    c.data = (<char *>c) + sizeof(Chunk)
    memcpy(c.data, p, n)
    if q.tail == NULL:
        q.head = c
    else:
        q.tail.next = c
    q.tail = c
    q.bytes += n
    return 0


cdef void chunkq_pop(ChunkQ *q) noexcept nogil:
    cdef Chunk *c = q.head
    if c == NULL:
        return
    q.head = c.next
    if q.head == NULL:
        q.tail = NULL
    q.bytes -= c.len - c.off
    free(c)


cdef void chunkq_clear(ChunkQ *q) noexcept nogil:
    while q.head != NULL:
        chunkq_pop(q)
    q.bytes = 0


# -- EventQ ----------------------------------------------------------------------------------------
cdef Event *event_new(int kind, uint64_t id) noexcept nogil:
    cdef Event *e = <Event *>calloc(1, sizeof(Event))
    if e != NULL:
        e.kind = kind
        e.id = id
    return e


cdef int event_set_data(Event *e, const char *p, size_t n) noexcept nogil:
    if n == 0:
        return 0
    e.data = <char *>malloc(n)
    if e.data == NULL:
        return -1
    memcpy(e.data, p, n)
    e.len = n
    return 0


cdef void event_free(Event *e) noexcept nogil:
    free(e.data)
    free(e)


cdef inline bint evq_deferrable(Event *e) noexcept nogil:
    """Bookkeeping the event loop may take a few milliseconds late (completion batching): a
    fast-path tunnel's opening, status, end and a hot class.  Nothing waits on them; every other
    event (the event loop's own streams, splices, hand-overs, connections) is answered at once."""
    return (e.kind == EV_FAST_OPEN or e.kind == EV_INBOUND_OPEN or e.kind == EV_FAST_STATUS
            or e.kind == EV_FLOW_HOT or (e.kind == EV_STREAM_END and (e.token >> 62) & 1))


cdef void evq_push(EventQ *q, Event *e) noexcept nogil:
    """Queue an event; the event loop is woken at the end of the pushing worker's iteration
    (evq_wake): one eventfd write per drain, not per event, and every event an iteration emits
    in the same wake-up (the worker loop calls evq_wake before it waits again).  While the event
    loop holds the queue (`held`, completion batching), a deferrable event wakes nobody: the event
    loop's timer drains it, or the next other event's wake-up does."""
    cdef bint deferrable
    if e == NULL:
        return
    deferrable = evq_deferrable(e)
    pthread_mutex_lock(&q.lock)
    if q.tail == NULL:
        q.head = e
    else:
        q.tail.next = e
    q.tail = e
    q.emitted += 1
    if deferrable:
        q.deferrable += 1
    if not q.signalled and not (deferrable and q.held):
        q.signalled = True
        q.owed = True
    pthread_mutex_unlock(&q.lock)


cdef void evq_wake(EventQ *q) noexcept nogil:
    """Write the eventfd a push owes (the worker loop, before each wait and when it ends).  The
    unlocked read is a hint: a worker always sees its own pushes' flag; another worker's push is
    written by that worker at the end of its own iteration, if no one did it before."""
    cdef uint64_t one = 1
    cdef bint wake
    if not q.owed:
        return
    pthread_mutex_lock(&q.lock)
    wake = q.owed
    q.owed = False
    pthread_mutex_unlock(&q.lock)
    if wake and q.efd >= 0:
        write(q.efd, &one, 8)


cdef Event *evq_take_all(EventQ *q, uint32_t *deferrable) noexcept nogil:
    """Every queued event (oldest first); `*deferrable` is how many of them are deferrable."""
    cdef Event *head
    cdef uint64_t junk
    # Clear the eventfd before taking the list: a push after our unlock finds signalled False and
    # writes it again.  (The other order loses that wake-up: the queue would stall for good.)
    if q.efd >= 0:
        read(q.efd, &junk, 8)
    pthread_mutex_lock(&q.lock)
    head = q.head
    q.head = NULL
    q.tail = NULL
    q.signalled = False
    q.owed = False  # taken before its write: nothing to wake the event loop for
    deferrable[0] = q.deferrable
    q.deferrable = 0
    pthread_mutex_unlock(&q.lock)
    return head


cdef void emit_simple(EventQ *q, int kind, uint64_t id, uint32_t sid, int code, int flags,
                      const char *msg, size_t n) noexcept nogil:
    cdef Event *e = event_new(kind, id)
    if e == NULL:
        return
    e.sid = sid
    e.code = code
    e.flags = flags
    if msg != NULL and n > 0:
        event_set_data(e, msg, n)
    evq_push(q, e)


# -- Cmd -------------------------------------------------------------------------------------------
cdef void cmd_free(Cmd *c) noexcept nogil:
    free(c.data)
    free(c)


cdef void worker_post(Worker *w, Cmd *c) noexcept nogil:
    cdef uint64_t one = 1
    pthread_mutex_lock(&w.lock)
    if w.cmd_tail == NULL:
        w.cmd_head = c
    else:
        w.cmd_tail.next = c
    w.cmd_tail = c
    pthread_mutex_unlock(&w.lock)
    write(w.cmd_efd, &one, 8)


cdef Cmd *worker_take_cmds(Worker *w) noexcept nogil:
    cdef Cmd *head
    cdef uint64_t junk
    read(w.cmd_efd, &junk, 8)
    pthread_mutex_lock(&w.lock)
    head = w.cmd_head
    w.cmd_head = NULL
    w.cmd_tail = NULL
    pthread_mutex_unlock(&w.lock)
    return head


cdef inline void set_nonblocking(int fd) noexcept nogil:
    """The worker must never block on a socket the event loop handed over."""
    cdef int fl = fcntl(fd, F_GETFL)
    if fl >= 0 and not fl & O_NONBLOCK:
        fcntl(fd, F_SETFL, fl | O_NONBLOCK)
