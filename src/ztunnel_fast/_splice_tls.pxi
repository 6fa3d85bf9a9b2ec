# _splice piece: an HBONE connection on its worker: TLS records through the SSL* pyOpenSSL
# handshook (SSL_read / SSL_write of cryptography's bundled OpenSSL, called through the addresses
# engine/ssl_bridge.py found), the run loop, commands and timers.
#
# The byte path (issue 14): at adoption the SSL*'s socket BIO is swapped for memory BIOs, so TLS
# costs few syscalls per GB: one recv() of up to TLS_RECV_CHUNK ciphertext lands in cin, a
# read-only memory BIO over cin (no copy) becomes the read BIO and SSL_read decrypts record after
# record from it; SSL_write turns up to TLS_SEND_BATCH plaintext into records in the write BIO (a
# BIO_s_mem), moved to cout, which goes out with one send().  Without the BIO functions (bindings
# that lack them) the socket BIO stays: one read()/write() per record.
#
# Invariants: SSL_* is called only from the owning worker thread; a write retried after WANT_WRITE
# is never shorter than the attempt before (the output buffer only grows until SSL_write takes
# it; ACCEPT_MOVING_WRITE_BUFFER lets it move); reading stops while OBUF_READ_STOP bytes wait to
# be written (a peer that does not read cannot make us buffer without bound).  With memory BIOs:
# recv() into cin only once SSL_read asked for more (WANT_READ: without read-ahead the record
# layer has then taken every byte of the read BIO, a partial record kept in its own buffer), so
# cin holds at most one chunk; SSL_write only while cout holds less than TLS_SEND_BATCH (cout is
# bounded by a batch plus one record); after tls_read and tls_flush the write BIO is empty
# (whatever SSL produced, alerts and key updates included, is in cout or sent).
# The worker thread's OpenSSL error queue is empty before every SSL_read/SSL_write (SSL_get_error
# needs that), without an ERR_clear_error per call: a call that succeeds or reports WANT_READ,
# WANT_WRITE or ZERO_RETURN leaves it empty (SSL_get_error returns those only when ERR_peek_error()
# is 0), and every other failure ends in tls_fail, which clears it after taking the reason.

DEF READ_BATCH = 256 * 1024          # parse once this much plaintext is buffered
DEF RUN_BUDGET = 4 << 20             # bytes a connection moves per turn before others get theirs
DEF OBUF_READ_STOP = 2 << 20         # stop reading the peer while this much output waits
DEF WRITE_MAX = 1 << 20              # bytes offered to one SSL_write (socket BIO)
DEF RBUF_KEEP = 320 * 1024           # read buffer size kept between bursts
DEF OBUF_KEEP = 1280 * 1024
DEF TLS_RECV_CHUNK = 256 * 1024      # ciphertext per recv(): 16 full records per syscall
DEF TLS_RECV_FIRST = 32 * 1024       # cin's first size (two records); grows while recv() fills it
DEF TLS_SEND_BATCH = 256 * 1024      # plaintext per SSL_write into the write BIO: ~16 records, one send()
DEF COUT_KEEP = 320 * 1024           # one batch of records, one more record, their overhead

cdef ssl_read_fn g_ssl_read = NULL
cdef ssl_write_fn g_ssl_write = NULL
cdef ssl_get_error_fn g_ssl_get_error = NULL
cdef ssl_shutdown_fn g_ssl_shutdown = NULL
cdef err_clear_error_fn g_err_clear = NULL
cdef err_get_error_fn g_err_get = NULL
cdef err_reason_string_fn g_err_reason = NULL
cdef bio_new_fn g_bio_new = NULL
cdef bio_s_mem_fn g_bio_s_mem = NULL
cdef bio_read_fn g_bio_read = NULL
cdef ssl_set_bio_fn g_ssl_set_bio = NULL
cdef bio_set_mem_eof_return_fn g_bio_eof_return = NULL
cdef bio_free_fn g_bio_free = NULL
cdef bio_new_mem_buf_fn g_bio_new_mem_buf = NULL


cdef void tls_set_functions(uintptr_t rd, uintptr_t wr, uintptr_t get_error, uintptr_t shut,
                            uintptr_t clear, uintptr_t get_err, uintptr_t reason) noexcept nogil:
    global g_ssl_read, g_ssl_write, g_ssl_get_error, g_ssl_shutdown, g_err_clear, g_err_get, g_err_reason
    g_ssl_read = <ssl_read_fn>rd
    g_ssl_write = <ssl_write_fn>wr
    g_ssl_get_error = <ssl_get_error_fn>get_error
    g_ssl_shutdown = <ssl_shutdown_fn>shut
    g_err_clear = <err_clear_error_fn>clear
    g_err_get = <err_get_error_fn>get_err
    g_err_reason = <err_reason_string_fn>reason


cdef void tls_set_bio_functions(uintptr_t bio_new, uintptr_t bio_s_mem, uintptr_t bio_read,
                                uintptr_t ssl_set_bio, uintptr_t eof_return, uintptr_t bio_free,
                                uintptr_t bio_new_mem_buf) noexcept nogil:
    """Memory BIO functions; any 0 turns the batched path off (new connections keep the socket BIO)."""
    global g_bio_new, g_bio_s_mem, g_bio_read, g_ssl_set_bio, g_bio_eof_return, g_bio_free
    global g_bio_new_mem_buf
    if not (bio_new and bio_s_mem and bio_read and ssl_set_bio and eof_return and bio_free and bio_new_mem_buf):
        bio_new = bio_s_mem = bio_read = ssl_set_bio = eof_return = bio_free = bio_new_mem_buf = 0
    g_bio_new = <bio_new_fn>bio_new
    g_bio_s_mem = <bio_s_mem_fn>bio_s_mem
    g_bio_read = <bio_read_fn>bio_read
    g_ssl_set_bio = <ssl_set_bio_fn>ssl_set_bio
    g_bio_eof_return = <bio_set_mem_eof_return_fn>eof_return
    g_bio_free = <bio_free_fn>bio_free
    g_bio_new_mem_buf = <bio_new_mem_buf_fn>bio_new_mem_buf


cdef void tls_use_memory_bios(Conn *c) noexcept nogil:
    """Swap the SSL*'s socket BIO for two memory BIOs (before the worker's first SSL_read); the
    read one is replaced by a view of cin at each recv() (tls_recv).

    SSL_set_bio takes our references and frees the socket BIO (created BIO_NOCLOSE by SSL_set_fd:
    the fd stays open; pyOpenSSL keeps no pointer to it).  Nothing is lost: without read-ahead the
    socket BIO buffers nothing, and what the record layer already read (a partial record, records
    decrypted but not yet returned) stays in the SSL*.  SSL_free frees the memory BIOs later.
    Any failure leaves the socket BIO in place (the unbatched path)."""
    cdef void *r
    cdef void *w
    if g_ssl_set_bio == NULL or c.ssl == NULL:
        return
    r = g_bio_new(g_bio_s_mem())
    if r == NULL:
        g_err_clear()
        return
    w = g_bio_new(g_bio_s_mem())
    if w == NULL:
        g_bio_free(r)
        g_err_clear()
        return
    g_bio_eof_return(r, -1)  # empty means "retry" (WANT_READ), not EOF
    g_bio_eof_return(w, -1)
    g_ssl_set_bio(c.ssl, r, w)
    c.rbio = r
    c.wbio = w


cdef bint tls_ready() noexcept nogil:
    return g_ssl_read != NULL and g_ssl_write != NULL and g_ssl_get_error != NULL


cdef void tls_fail(Conn *c, int ssl_err, int saved_errno, const char *what) noexcept nogil:
    """A TLS-level failure (or EOF) ends the connection; no close_notify after it."""
    cdef char msg[200]
    cdef unsigned long e
    cdef const char *reason = NULL
    c.flags |= CF_TLS_FAILED
    if ssl_err == SSL_ERROR_ZERO_RETURN or (ssl_err == SSL_ERROR_SYSCALL and saved_errno == 0):
        if g_err_clear != NULL:
            g_err_clear()  # the queue may hold the EOF's entry: the next connection's calls need it empty
        conn_close(c, CLOSE_PEER, "peer closed the connection", False)
        return
    if ssl_err == SSL_ERROR_SYSCALL:
        c.close_err = saved_errno
        snprintf(msg, sizeof(msg), "%s", what)
    else:
        e = g_err_get() if g_err_get != NULL else 0
        if e != 0 and g_err_reason != NULL:
            reason = g_err_reason(e)
        if reason == NULL:
            reason = "TLS error"
        snprintf(msg, sizeof(msg), "%s: %s", what, reason)
    if g_err_clear != NULL:
        g_err_clear()
    conn_close(c, CLOSE_IO, msg, False)


cdef size_t tls_read(Conn *c, size_t budget) noexcept nogil:
    """SSL_read until WANT_READ (or the budget), parsing as plaintext accumulates."""
    cdef size_t total = 0, space
    cdef int n, err, saved
    cdef ssize_t got
    cdef bint eof = False
    while total < budget and c.state < CST_LINGER:
        if buf_len(&c.obuf) >= OBUF_READ_STOP:
            break
        if buf_reserve(&c.rbuf, 32768) != 0:
            conn_error(c, H2_INTERNAL_ERROR, "out of memory")
            break
        space = c.rbuf.cap - c.rbuf.end
        if space > WRITE_MAX:
            space = WRITE_MAX
        n = g_ssl_read(c.ssl, c.rbuf.data + c.rbuf.end, <int>space)
        saved = errno
        if n > 0:
            c.rbuf.end += <size_t>n
            total += <size_t>n
            if buf_len(&c.rbuf) >= READ_BATCH:
                conn_parse(c)
            continue
        err = g_ssl_get_error(c.ssl, n)
        if err == SSL_ERROR_WANT_READ and c.rbio != NULL and not eof:
            got = tls_recv(c, &saved)
            if got > 0:
                continue
            if got == 0:
                c.flags &= ~CF_TLS_R
                break
            if saved == 0:
                eof = True
                continue  # SSL_read now reports the EOF as it would from the socket BIO
            conn_parse(c)
            if c.state != CST_CLOSED:
                tls_fail(c, SSL_ERROR_SYSCALL, saved, "connection error")
            return total
        if err == SSL_ERROR_WANT_READ:
            c.flags &= ~CF_TLS_R
            break
        if err == SSL_ERROR_WANT_WRITE:
            c.flags &= ~CF_TLS_R
            c.flags |= CF_READ_WANTS_W
            break
        conn_parse(c)  # what arrived before the end still counts
        if c.state != CST_CLOSED:
            tls_fail(c, err, 0 if eof else saved, "connection error")
        return total
    if c.wbio != NULL and c.state != CST_CLOSED:
        tls_take_records(c)  # what SSL_read wrote (key update, alerts) waits in cout
    conn_parse(c)
    if buf_len(&c.rbuf) == 0 and c.rbuf.cap > RBUF_KEEP:
        buf_shrink(&c.rbuf, RBUF_KEEP)
    return total


cdef ssize_t tls_recv(Conn *c, int *err) noexcept nogil:
    """One recv() of ciphertext into cin, which becomes the read BIO (memory-BIO mode; SSL_read
    wants more, so the current read BIO is drained and cin free).  SSL_set_bio frees the previous
    read BIO and keeps the write BIO (SSL_set_bio's rule for an unchanged wbio).
    Returns the bytes received, 0 when the socket has nothing now, or -1 with err[0] = errno on an
    error, err[0] = 0 at EOF (the read BIO then reports EOF to SSL_read as the socket BIO would)."""
    cdef ssize_t n
    cdef void *r
    # cin starts small (a connection that carries little keeps little) and doubles while recv()
    # fills it, up to TLS_RECV_CHUNK.  Growing may move it: the drained read BIO still points at
    # the old place, but a drained BIO never reads its memory and SSL_set_bio frees it below.
    if c.cin.cap < TLS_RECV_FIRST and buf_reserve(&c.cin, TLS_RECV_FIRST) != 0:
        err[0] = ENOMEM
        return -1
    if c.flags & CF_CIN_GROW:
        c.flags &= ~CF_CIN_GROW
        if buf_reserve(&c.cin, c.cin.cap * 2) != 0:
            err[0] = ENOMEM
            return -1
    while True:
        n = recv(c.fd, c.cin.data, c.cin.cap, MSG_DONTWAIT)
        if n >= 0 or errno != EINTR:
            break
    if n > 0:
        if <size_t>n == c.cin.cap and c.cin.cap < TLS_RECV_CHUNK:
            c.flags |= CF_CIN_GROW
        r = g_bio_new_mem_buf(c.cin.data, <int>n)
        if r == NULL:
            g_err_clear()
            err[0] = ENOMEM
            return -1
        g_bio_eof_return(r, -1)  # drained means "retry" (WANT_READ), not EOF
        g_ssl_set_bio(c.ssl, r, c.wbio)
        c.rbio = r
        return n
    if n == 0:
        g_bio_eof_return(c.rbio, 0)
        err[0] = 0
        return -1
    if errno == EAGAIN:
        return 0
    err[0] = errno
    return -1


cdef int tls_take_records(Conn *c) noexcept nogil:
    """Move what the write BIO holds into cout.  Returns 0, or -1 when out of memory."""
    cdef int n
    while True:
        if buf_reserve(&c.cout, 16 * 1024 + 256) != 0:
            return -1
        n = g_bio_read(c.wbio, c.cout.data + c.cout.end, <int>(c.cout.cap - c.cout.end))
        if n <= 0:
            return 0
        c.cout.end += <size_t>n


cdef size_t tls_flush_batched(Conn *c) noexcept nogil:
    """Memory-BIO mode: SSL_write (one record per call: ENABLE_PARTIAL_WRITE) until cout holds a
    batch of TLS_SEND_BATCH or obuf is empty, then one send() of the batch.  Returns the bytes
    moved (plaintext encrypted plus ciphertext sent)."""
    cdef size_t moved = 0, avail
    cdef ssize_t w
    cdef int n, err, saved
    while not c.flags & CF_TLS_FAILED:
        while buf_len(&c.cout) < TLS_SEND_BATCH and buf_len(&c.obuf) > 0:
            avail = buf_len(&c.obuf)
            if avail > TLS_SEND_BATCH:
                avail = TLS_SEND_BATCH
            n = g_ssl_write(c.ssl, c.obuf.data + c.obuf.start, <int>avail)
            saved = errno
            if n <= 0:
                err = g_ssl_get_error(c.ssl, n)
                if err == SSL_ERROR_WANT_READ:
                    c.flags &= ~CF_TLS_W
                    c.flags |= CF_WRITE_WANTS_R
                else:
                    tls_fail(c, err, saved, "write failed")
                return moved
            buf_consume(&c.obuf, <size_t>n)
            moved += <size_t>n
            if tls_take_records(c) != 0:
                c.flags |= CF_TLS_FAILED
                conn_close(c, CLOSE_IO, "out of memory", False)
                return moved
        if buf_len(&c.cout) == 0 or not c.flags & CF_TLS_W:
            break
        w = send(c.fd, c.cout.data + c.cout.start, buf_len(&c.cout), MSG_NOSIGNAL | MSG_DONTWAIT)
        if w > 0:
            buf_consume(&c.cout, <size_t>w)
            moved += <size_t>w
            continue
        if w < 0 and errno == EINTR:
            continue
        if w < 0 and errno == EAGAIN:
            c.flags &= ~CF_TLS_W
            break
        tls_fail(c, SSL_ERROR_SYSCALL, errno if w < 0 else EPIPE, "write failed")
        break
    if buf_len(&c.cout) == 0 and c.cout.cap > COUT_KEEP:
        buf_shrink(&c.cout, COUT_KEEP)
    if buf_len(&c.obuf) == 0 and c.obuf.cap > OBUF_KEEP:
        buf_shrink(&c.obuf, OBUF_KEEP)
    return moved


cdef inline bint tls_has_output(Conn *c) noexcept nogil:
    return buf_len(&c.obuf) > 0 or buf_len(&c.cout) > 0


cdef size_t tls_flush(Conn *c) noexcept nogil:
    """SSL_write the output buffer until it is empty or the socket is full."""
    cdef size_t written = 0, avail
    cdef int n, err, saved
    if c.wbio != NULL:
        return tls_flush_batched(c)
    while buf_len(&c.obuf) > 0 and c.flags & CF_TLS_W and not c.flags & CF_TLS_FAILED:
        avail = buf_len(&c.obuf)
        if avail > WRITE_MAX:
            avail = WRITE_MAX
        n = g_ssl_write(c.ssl, c.obuf.data + c.obuf.start, <int>avail)
        saved = errno
        if n > 0:
            buf_consume(&c.obuf, <size_t>n)
            written += <size_t>n
            continue
        err = g_ssl_get_error(c.ssl, n)
        if err == SSL_ERROR_WANT_WRITE:
            c.flags &= ~CF_TLS_W
        elif err == SSL_ERROR_WANT_READ:
            c.flags &= ~CF_TLS_W
            c.flags |= CF_WRITE_WANTS_R
        else:
            tls_fail(c, err, saved, "write failed")
        break
    if buf_len(&c.obuf) == 0 and c.obuf.cap > OBUF_KEEP:
        buf_shrink(&c.obuf, OBUF_KEEP)
    return written


cdef void tls_shutdown(Conn *c) noexcept nogil:
    """close_notify, once, without waiting for the peer's."""
    if g_ssl_shutdown != NULL and c.ssl != NULL:
        g_err_clear()
        g_ssl_shutdown(c.ssl)
        g_err_clear()
        if c.wbio != NULL and tls_take_records(c) == 0 and c.flags & CF_TLS_W:
            send(c.fd, c.cout.data + c.cout.start, buf_len(&c.cout), MSG_NOSIGNAL | MSG_DONTWAIT)


cdef void conn_on_io(Conn *c, uint32_t events) noexcept nogil:
    cdef bint bad = (events & (EPOLLERR | EPOLLHUP)) != 0
    if events & (EPOLLIN | EPOLLRDHUP) or bad:
        c.flags |= CF_TLS_R
        if c.flags & CF_WRITE_WANTS_R:
            c.flags = (c.flags | CF_TLS_W) & ~CF_WRITE_WANTS_R
    if events & EPOLLOUT or bad:
        c.flags |= CF_TLS_W
        if c.flags & CF_READ_WANTS_W:
            c.flags = (c.flags | CF_TLS_R) & ~CF_READ_WANTS_W


cdef void conn_run(Conn *c) noexcept nogil:
    """One turn: read and parse, plain sockets both ways, write; bounded by RUN_BUDGET."""
    cdef size_t moved = 0, n
    cdef bint progress = True
    while progress and moved < RUN_BUDGET and c.state != CST_CLOSED:
        progress = False
        if c.state < CST_LINGER and c.flags & CF_TLS_R and buf_len(&c.obuf) < OBUF_READ_STOP:
            n = tls_read(c, RUN_BUDGET - moved)
            if n:
                progress = True
                moved += n
            if c.state == CST_CLOSED:
                return
        if c.state == CST_OPEN:
            conn_downloads(c)
            n = conn_uploads(c, RUN_BUDGET - moved)
            if n:
                progress = True
                moved += n
        if tls_has_output(c) and c.flags & CF_TLS_W:
            if tls_flush(c):
                progress = True
            if c.state == CST_CLOSED:
                return
    if c.state < CST_LINGER:
        conn_check_idle(c)
    if moved >= RUN_BUDGET:
        worker_queue(<Worker *>c.worker, &c.o)


cdef void conn_adopt(Worker *w, Cmd *cmd) noexcept nogil:
    cdef Conn *c = <Conn *>calloc(1, sizeof(Conn))
    cdef epoll_event ev
    cdef Event *e
    if c == NULL or conn_init(c, cmd.id, cmd.flags & 1, cmd.settings, w.evq) != 0 or not tls_ready():
        if c != NULL:
            free(c.buckets)
            free(c)
        e = event_new(EV_CLOSED, cmd.id)
        if e != NULL:
            e.flags = CLOSE_IO
            event_set_data(e, "native engine could not take the connection", 44)
            evq_push(w.evq, e)
        return
    c.worker = w
    c.fd = cmd.fd
    c.ssl = cmd.ssl
    tls_use_memory_bios(c)
    worker_adopt(w, &c.o)
    if conn_start(c) != 0:
        conn_close(c, CLOSE_IO, "out of memory", False)
        return
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    ev.data.ptr = &c.h
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, c.fd, &ev) != 0:
        c.close_err = errno
        c.flags |= CF_TLS_FAILED
        conn_close(c, CLOSE_IO, "epoll_ctl failed", False)
        return
    # TLS may hold plaintext read during the handshake: try reading before the first edge
    c.flags |= CF_EPOLL | CF_TLS_R | CF_TLS_W
    worker_queue(w, &c.o)


cdef void conn_open_next(Conn *c, Cmd *cmd) noexcept nogil:
    """CMD_OPEN with sid 0: the stream takes the connection's next id, so streams the event loop
    opens and those the fast path opens (flow_open) share one ascending sequence (RFC 9113
    5.1.1); EV_STREAM_ID tells the event loop the id (0: refused), before any event of the stream."""
    cdef uint32_t sid = c.highest_local_sid + 2 if c.highest_local_sid else 1
    cdef Event *e = event_new(EV_STREAM_ID, c.o.id)
    cdef bint refused = c.state >= CST_LINGER or c.flags & (CF_GOAWAY_RECV | CF_GOAWAY_SENT) \
        or c.highest_local_sid >= 0x7ffffffd or stream_new(c, sid, 0) == NULL
    if e != NULL:
        e.token = cmd.token
        e.sid = 0 if refused else sid
        if refused:
            e.flags = END_REFUSED
            e.code = H2_REFUSED_STREAM
        evq_push(c.evq, e)
    if refused:
        return
    c.highest_local_sid = sid
    if out_headers(&c.obuf, sid, cmd.data, cmd.len, False, <size_t>c.peer_max_frame) != 0:
        conn_error(c, H2_INTERNAL_ERROR, "out of memory")


cdef void conn_command(Conn *c, Cmd *cmd) noexcept nogil:
    cdef Stream *s
    cdef Event *e
    cdef char msg[200]
    cdef size_t n
    if c.state == CST_CLOSED:
        return
    if cmd.kind == CMD_OPEN and cmd.sid == 0:
        conn_open_next(c, cmd)
    elif cmd.kind == CMD_OPEN:
        if c.state >= CST_LINGER or c.flags & (CF_GOAWAY_RECV | CF_GOAWAY_SENT) or \
                sid_is_peer(c, cmd.sid) or cmd.sid <= c.highest_local_sid or stream_new(c, cmd.sid, 0) == NULL:
            e = event_new(EV_STREAM_END, c.o.id)
            if e != NULL:
                e.sid = cmd.sid
                e.flags = END_REFUSED
                e.code = H2_REFUSED_STREAM
                evq_push(c.evq, e)
            return
        c.highest_local_sid = cmd.sid
        if out_headers(&c.obuf, cmd.sid, cmd.data, cmd.len, False, <size_t>c.peer_max_frame) != 0:
            conn_error(c, H2_INTERNAL_ERROR, "out of memory")
    elif cmd.kind == CMD_RESPOND:
        s = stream_find(c, cmd.sid)
        if s == NULL or c.state >= CST_LINGER:
            return
        if out_headers(&c.obuf, cmd.sid, cmd.data, cmd.len, cmd.flags & 1, <size_t>c.peer_max_frame) != 0:
            conn_error(c, H2_INTERNAL_ERROR, "out of memory")
            return
        s.flags |= SF_RESPONDED
        if cmd.flags & 1:
            s.flags |= SF_LOCAL_END
            if not s.flags & SF_ATTACHED:
                s.flags |= SF_DISCARD  # a refusal: what the peer still sends is dropped
                if s.rq.bytes:
                    stream_credit(c, s, <int64_t>s.rq.bytes)
                chunkq_clear(&s.rq)
            stream_maybe_done(c, s)
    elif cmd.kind == CMD_ATTACH:
        stream_attach(c, cmd.sid, cmd.fd, cmd.token)
    elif cmd.kind == CMD_RESET:
        s = stream_find(c, cmd.sid)
        if s != NULL:
            stream_reset(c, s, cmd.code, END_LOCAL_RESET, 0)
    elif cmd.kind == CMD_GOAWAY:
        if c.state < CST_LINGER and not c.flags & CF_GOAWAY_SENT:
            out_goaway(&c.obuf, c.last_peer_sid, <uint32_t>cmd.code, NULL, 0)
            c.flags |= CF_GOAWAY_SENT
            c.goaway_last_sid = c.last_peer_sid
    elif cmd.kind == CMD_CLOSE:
        conn_close(c, CLOSE_LOCAL, "closed", cmd.flags & 1)
        return
    elif cmd.kind == CMD_ERROR:
        n = cmd.len if cmd.len < sizeof(msg) - 1 else sizeof(msg) - 1
        if n:
            memcpy(msg, cmd.data, n)
        msg[n] = 0
        conn_error(c, cmd.code, msg)
    worker_queue(<Worker *>c.worker, &c.o)


cdef void conn_tick(Conn *c, int64_t now) noexcept nogil:
    """Timers: the linger after an error GOAWAY, and the PING keepalive (10 s / 20 s)."""
    if c.state == CST_LINGER:
        if now >= c.linger_deadline:
            conn_close(c, CLOSE_PROTOCOL, "closed after a protocol error", False)
        return
    if c.ndialing > 0 and c.state == CST_OPEN:
        inflow_tick(c, now)
    if c.state == CST_CLOSED or c.ping_interval_ns <= 0:
        return
    if c.ping_sent_ns:
        if now - c.ping_sent_ns > c.ping_timeout_ns:
            conn_close(c, CLOSE_KEEPALIVE, "keepalive timeout", False)
    elif now >= c.next_ping_ns:
        out_ping(&c.obuf, 0, "ztunnelf")
        c.ping_sent_ns = now
        c.next_ping_ns = now + c.ping_interval_ns
        worker_queue(<Worker *>c.worker, &c.o)
