# _splice piece: an HTTP/2 connection's state, its streams, and how streams and connections end.
# Sans-IO where it can be: frames go to c.obuf, events to c.evq; the TLS piece moves the bytes.
#
# Invariants: every stream end produces exactly one EV_STREAM_END (carrying the tunnel token when a
# plain socket was attached), after which the worker never touches that socket; a connection
# produces exactly one EV_CLOSED, after which the worker never touches its fd or SSL*.

cdef enum:
    CST_PREFACE = 0      # server: waiting for the client's connection preface
    CST_SETTINGS = 1     # waiting for the peer's first SETTINGS frame
    CST_OPEN = 2
    CST_LINGER = 3       # an error GOAWAY is queued: no more reading, flushing, then close
    CST_CLOSED = 4

cdef enum:
    CF_GOAWAY_SENT = 0x1
    CF_GOAWAY_RECV = 0x2
    CF_TLS_R = 0x4           # edge-triggered readiness, cleared on WANT_READ / WANT_WRITE
    CF_TLS_W = 0x8
    CF_READ_WANTS_W = 0x10   # SSL_read asked for writability (TLS 1.3 key update)
    CF_WRITE_WANTS_R = 0x20
    CF_TLS_FAILED = 0x40     # no close_notify after a TLS error
    CF_EPOLL = 0x80
    CF_SANS_IO = 0x100       # FrameParser: no socket, no SSL
    CF_CIN_GROW = 0x200      # the last recv() filled cin: double it before the next one

cdef enum:
    SF_DEAD = 0x1
    SF_LOCAL_END = 0x2       # we sent END_STREAM
    SF_REMOTE_END = 0x4      # the peer sent END_STREAM
    SF_RESPONDED = 0x8       # server: we answered; client: the answer arrived
    SF_ATTACHED = 0x10       # a plain socket carries the stream
    SF_PLAIN_R = 0x20
    SF_PLAIN_W = 0x40
    SF_PLAIN_SHUT = 0x80     # shutdown(SHUT_WR) done on the plain socket
    SF_DISCARD = 0x100       # answered with END_STREAM: the peer's payload is dropped
    SF_PEER = 0x200          # opened by the peer
    SF_EPOLL = 0x400
    SF_FAST_PENDING = 0x800  # fast path: a CONNECT we sent for an accepted socket, not answered yet
    SF_DIALING = 0x1000      # inbound fast path: the worker is dialling the app for the peer's CONNECT

DEF STREAM_BUCKETS = 256
DEF LINGER_NS = 100000000            # 100 ms for an error GOAWAY to reach the peer, as the pure twin
DEF RESET_FLOOD_LIMIT = 100          # unanswered streams the peer may reset per window (pure twin)
DEF RESET_FLOOD_WINDOW_S = 10
DEF EMPTY_FRAME_LIMIT = 1000         # empty non-final DATA frames per window before ENHANCE_YOUR_CALM
DEF EMPTY_FRAME_WINDOW_S = 10
DEF REFUSED_STREAM_LIMIT = 1000      # streams refused (over the limit, after GOAWAY) per window
DEF REFUSED_STREAM_WINDOW_S = 10


cdef int conn_init(Conn *c, uint64_t id, bint client, const int64_t *settings, EventQ *evq) noexcept nogil:
    memset(c, 0, sizeof(Conn))
    c.o.kind = H_TLS
    c.o.id = id
    c.h.kind = H_TLS
    c.h.owner = c
    c.evq = evq
    c.fd = -1
    c.client = client
    c.state = CST_SETTINGS if client else CST_PREFACE
    c.local_stream_window = settings[CS_STREAM_WINDOW]
    c.local_conn_window = settings[CS_CONN_WINDOW]
    c.local_max_frame = settings[CS_MAX_FRAME]
    c.local_max_streams = settings[CS_MAX_STREAMS]
    c.local_max_header_list = settings[CS_MAX_HEADER_LIST]
    c.ping_interval_ns = settings[CS_PING_INTERVAL_MS] * 1000000
    c.ping_timeout_ns = settings[CS_PING_TIMEOUT_MS] * 1000000
    if c.local_conn_window < DEFAULT_WINDOW:
        c.local_conn_window = DEFAULT_WINDOW
    c.peer_initial_window = DEFAULT_WINDOW
    c.peer_max_frame = MIN_MAX_FRAME
    c.peer_max_streams = 0x7fffffff
    c.send_window = DEFAULT_WINDOW
    c.recv_window = c.local_conn_window
    c.buckets = <Stream **>calloc(STREAM_BUCKETS, sizeof(Stream *))
    if c.buckets == NULL:
        return -1
    return 0


cdef int conn_start(Conn *c) noexcept nogil:
    """Preface (client), SETTINGS, and the connection window raised to ours (reference 3.1)."""
    if c.client and buf_append(&c.obuf, PREFACE, PREFACE_LEN) != 0:
        return -1
    if out_settings(&c.obuf, c.client, c.local_stream_window, c.local_max_frame,
                    c.local_max_streams, c.local_max_header_list) != 0:
        return -1
    if c.local_conn_window > DEFAULT_WINDOW:
        if out_window_update(&c.obuf, 0, <uint32_t>(c.local_conn_window - DEFAULT_WINDOW)) != 0:
            return -1
    c.next_ping_ns = now_ns() + c.ping_interval_ns
    return 0


# -- streams -----------------------------------------------------------------------------------------
cdef inline Stream *stream_find(Conn *c, uint32_t sid) noexcept nogil:
    cdef Stream *s = c.buckets[sid % STREAM_BUCKETS]
    while s != NULL and s.id != sid:
        s = s.hnext
    return s


cdef Stream *stream_new(Conn *c, uint32_t sid, uint32_t flags) noexcept nogil:
    cdef Stream *s = <Stream *>calloc(1, sizeof(Stream))
    cdef size_t b = sid % STREAM_BUCKETS
    if s == NULL:
        return NULL
    s.h.kind = H_PLAIN
    s.h.owner = s
    s.conn = c
    s.id = sid
    s.flags = flags
    s.fd = -1
    s.dial_fd = -1
    s.send_window = c.peer_initial_window
    s.recv_window = c.local_stream_window
    s.hnext = c.buckets[b]
    c.buckets[b] = s
    s.aprev = c.s_tail
    if c.s_tail != NULL:
        c.s_tail.anext = s
    else:
        c.s_head = s
    c.s_tail = s
    c.nstreams += 1
    if flags & SF_PEER:
        c.open_peer_streams += 1
    return s


cdef void stream_unlink(Conn *c, Stream *s) noexcept nogil:
    cdef Stream **pp = &c.buckets[s.id % STREAM_BUCKETS]
    while pp[0] != NULL:
        if pp[0] == s:
            pp[0] = s.hnext
            break
        pp = &pp[0].hnext
    if c.rr == s:
        c.rr = s.anext
    if s.aprev != NULL:
        s.aprev.anext = s.anext
    else:
        c.s_head = s.anext
    if s.anext != NULL:
        s.anext.aprev = s.aprev
    else:
        c.s_tail = s.aprev
    c.nstreams -= 1
    if s.flags & SF_PEER:
        c.open_peer_streams -= 1


cdef void stream_free(Stream *s) noexcept nogil:
    chunkq_clear(&s.rq)
    buf_free(&s.dial_fields)
    free(s)


cdef void conn_credit(Conn *c, int64_t n) noexcept nogil:
    """Connection-level window back to the peer once half of it was consumed."""
    c.recv_unacked += n
    if c.recv_unacked >= c.local_conn_window // 2 and c.state < CST_LINGER:
        out_window_update(&c.obuf, 0, <uint32_t>c.recv_unacked)
        c.recv_window += c.recv_unacked
        c.recv_unacked = 0


cdef void stream_credit(Conn *c, Stream *s, int64_t n) noexcept nogil:
    conn_credit(c, n)
    if s == NULL or s.flags & (SF_DEAD | SF_REMOTE_END):
        return
    s.recv_unacked += n
    if s.recv_unacked >= c.local_stream_window // 2 and c.state < CST_LINGER:
        out_window_update(&c.obuf, s.id, <uint32_t>s.recv_unacked)
        s.recv_window += s.recv_unacked
        s.recv_unacked = 0


cdef void stream_end(Conn *c, Stream *s, int kind, int code, int err) noexcept nogil:
    """The stream is over (cleanly or not): report it once, let go of its socket, free it later."""
    cdef Event *e
    cdef Worker *w = <Worker *>c.worker
    if s.flags & SF_DEAD:
        return
    if s.flags & SF_DIALING:
        inflow_hand_over(c, s)  # the event loop hears of the CONNECT first, then of its end
    s.flags |= SF_DEAD
    if s.flags & SF_EPOLL and w != NULL:
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, s.fd, NULL)
        s.flags &= ~SF_EPOLL
    e = event_new(EV_STREAM_END, c.o.id)
    if e != NULL:
        e.sid = s.id
        e.token = s.token
        e.flags = kind
        if s.flags & SF_FAST_PENDING:
            e.flags |= END_PENDING  # a fast-path CONNECT never answered: its socket was not attached
        e.code = code
        e.err = err
        e.a = s.sent
        e.b = s.received
        evq_push(c.evq, e)
    if s.rq.bytes:
        conn_credit(c, <int64_t>s.rq.bytes)  # buffered payload dropped: the connection window returns
    chunkq_clear(&s.rq)
    stream_unlink(c, s)
    if w != NULL:
        s.gnext = w.sgrave
        w.sgrave = s
    else:
        s.gnext = c.grave
        c.grave = s


cdef void stream_reset(Conn *c, Stream *s, int code, int kind, int err) noexcept nogil:
    """We reset the stream: RST_STREAM to the peer, then end it."""
    if s.flags & SF_DEAD:
        return
    if c.state < CST_LINGER:
        out_rst_stream(&c.obuf, s.id, <uint32_t>code)
    stream_end(c, s, kind, code, err)


cdef void stream_maybe_done(Conn *c, Stream *s) noexcept nogil:
    """END_STREAM both ways (and, with a plain socket, everything delivered and FIN passed on)."""
    if s.flags & SF_DEAD:
        return
    if not (s.flags & SF_LOCAL_END and s.flags & SF_REMOTE_END):
        return
    if s.flags & SF_ATTACHED and (s.rq.bytes > 0 or not s.flags & SF_PLAIN_SHUT):
        return
    stream_end(c, s, END_CLEAN, 0, 0)


cdef void conn_end_streams(Conn *c, int kind, int code) noexcept nogil:
    while c.s_head != NULL:
        stream_end(c, c.s_head, kind, code, 0)


# -- ending the connection ---------------------------------------------------------------------------
cdef void conn_error(Conn *c, int code, const char *msg) noexcept nogil:
    """A connection error: GOAWAY with `code`, every stream ends, then close after LINGER_NS."""
    if c.state >= CST_LINGER:
        return
    emit_simple(c.evq, EV_ERROR, c.o.id, c.last_peer_sid, code, 0, msg, strlen(msg))
    out_goaway(&c.obuf, c.last_peer_sid, <uint32_t>code, NULL, 0)
    c.flags |= CF_GOAWAY_SENT
    c.state = CST_LINGER
    c.linger_deadline = now_ns() + LINGER_NS
    conn_end_streams(c, END_CONN, H2_CANCEL)


cdef void conn_close(Conn *c, int kind, const char *msg, bint graceful) noexcept nogil:
    """The connection is over: streams end, close_notify when graceful, fd and SSL* let go."""
    cdef Worker *w = <Worker *>c.worker
    cdef Event *e
    if c.state == CST_CLOSED:
        return
    conn_end_streams(c, END_CONN, H2_CANCEL)
    if c.flags & CF_SANS_IO == 0 and c.flags & CF_TLS_FAILED == 0:
        tls_flush(c)  # best effort: a GOAWAY still queued
        if graceful and c.flags & CF_TLS_FAILED == 0:
            tls_shutdown(c)
    c.state = CST_CLOSED
    if w != NULL:
        if c.flags & CF_EPOLL:
            epoll_ctl(w.epfd, EPOLL_CTL_DEL, c.fd, NULL)
            c.flags &= ~CF_EPOLL
        worker_forget(w, &c.o)
    e = event_new(EV_CLOSED, c.o.id)
    if e != NULL:
        e.flags = kind
        e.err = c.close_err
        event_set_data(e, msg, strlen(msg))
        evq_push(c.evq, e)


cdef void conn_check_idle(Conn *c) noexcept nogil:
    """After GOAWAY either way, the connection closes once its last stream is done."""
    if c.state >= CST_LINGER or c.nstreams > 0:
        return
    if c.flags & CF_GOAWAY_SENT:
        conn_close(c, CLOSE_DRAINED, "drained after GOAWAY", True)
    elif c.flags & CF_GOAWAY_RECV:
        conn_close(c, CLOSE_GOAWAY, "peer sent GOAWAY NO_ERROR", True)


cdef void conn_free(Conn *c) noexcept nogil:
    cdef Stream *s
    conn_end_streams(c, END_CONN, H2_CANCEL)  # nothing left normally: the close ended them
    while c.grave != NULL:
        s = c.grave
        c.grave = s.gnext
        stream_free(s)
    buf_free(&c.rbuf)
    buf_free(&c.obuf)
    buf_free(&c.hblock)
    buf_free(&c.cin)
    buf_free(&c.cout)
    hpack_free(c)
    free(c.buckets)
    free(c)
