# _splice piece: an HBONE stream attached to a plain socket (a tunnel), moved entirely in C.
#
# plain -> stream: readv() straight into the connection's output buffer, between the 9-byte DATA
# frame headers (up to the peer's max frame size, within both send windows); FIN -> an empty DATA
# frame with END_STREAM.  stream -> plain: payload from the TLS read buffer is gathered (pointers
# into rbuf, consecutive DATA frames of one stream) and written with one sendmsg() when the parse
# pass ends, before any other frame is handled, before END_STREAM and before rbuf can move
# (deliver_flush); what the socket does not take waits in the stream's chunk queue (copied;
# bounded by the window we gave).
# WINDOW_UPDATE follows what was written.  END_STREAM -> shutdown(SHUT_WR) once the queue is empty.
# A plain socket error resets the stream (RST_STREAM CANCEL), as the pure twin does.

DEF UPLOAD_CHUNK = 256 * 1024        # bytes one stream reads per turn: fairness between streams
DEF UPLOAD_OBUF_HIGH = 1024 * 1024   # output buffer level above which streams stop reading
DEF MAX_IOV = 16
DEF DELIVER_IOV = 64                 # payload pieces gathered per sendmsg (Conn.dl_iov)


cdef void stream_io_fail(Conn *c, Stream *s, int err) noexcept nogil:
    stream_reset(c, s, H2_CANCEL, END_IO, err)


cdef void stream_consumed(Conn *c, Stream *s, size_t n) noexcept nogil:
    s.received += n
    stream_credit(c, s, <int64_t>n)


cdef void stream_deliver(Conn *c, Stream *s, const char *p, size_t n) noexcept nogil:
    """Payload for s (in rbuf): gathered for one sendmsg when the socket can take it, else queued
    (copied)."""
    if s.flags & SF_DISCARD:
        stream_credit(c, s, <int64_t>n)
        return
    if s.flags & SF_ATTACHED and s.rq.head == NULL and s.flags & SF_PLAIN_W:
        if c.dl_stream != s or c.dl_count == DELIVER_IOV:
            deliver_flush(c)
        if s.rq.head == NULL and s.flags & SF_PLAIN_W and not s.flags & SF_DEAD:
            c.dl_stream = s
            c.dl_iov[c.dl_count].iov_base = <void *>p
            c.dl_iov[c.dl_count].iov_len = n
            c.dl_count += 1
            c.dl_bytes += n
            return
    if s.flags & SF_DEAD:
        conn_credit(c, <int64_t>n)
        return
    if n > 0:
        if chunkq_push(&s.rq, p, n) != 0:
            conn_error(c, H2_INTERNAL_ERROR, "out of memory")


cdef void deliver_flush(Conn *c) noexcept nogil:
    """Write the gathered payload with one sendmsg; what the socket does not take is queued."""
    cdef Stream *s = c.dl_stream
    cdef msghdr m
    cdef ssize_t w
    cdef size_t skip, left = c.dl_bytes
    cdef int i, count = c.dl_count
    if s == NULL:
        return
    c.dl_stream = NULL
    c.dl_count = 0
    c.dl_bytes = 0
    if s.flags & SF_DEAD:
        conn_credit(c, <int64_t>left)  # the stream ended meanwhile: payload dropped, window back
        return
    memset(&m, 0, sizeof(m))
    m.msg_iov = c.dl_iov
    m.msg_iovlen = <size_t>count
    while True:
        w = sendmsg(s.fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT)
        if w >= 0 or errno != EINTR:
            break
    if w > 0:
        stream_consumed(c, s, <size_t>w)
        left -= <size_t>w
    elif w < 0 and errno == EAGAIN:
        s.flags &= ~SF_PLAIN_W
    else:
        stream_io_fail(c, s, errno if w < 0 else EPIPE)
        conn_credit(c, <int64_t>left)
        return
    if left == 0:
        return
    if w > 0:
        s.flags &= ~SF_PLAIN_W  # a short write: the socket is full
    skip = <size_t>w if w > 0 else 0
    for i in range(count):
        if skip >= c.dl_iov[i].iov_len:
            skip -= c.dl_iov[i].iov_len
            continue
        if chunkq_push(&s.rq, <char *>c.dl_iov[i].iov_base + skip, c.dl_iov[i].iov_len - skip) != 0:
            conn_error(c, H2_INTERNAL_ERROR, "out of memory")
            return
        skip = 0


cdef void stream_flush_plain(Conn *c, Stream *s) noexcept nogil:
    """Queued payload to the plain socket; FIN once everything is out and the peer ended."""
    cdef Chunk *k
    cdef ssize_t w
    while s.rq.head != NULL and s.flags & SF_PLAIN_W:
        k = s.rq.head
        w = send(s.fd, k.data + k.off, k.len - k.off, MSG_NOSIGNAL | MSG_DONTWAIT)
        if w > 0:
            k.off += <size_t>w
            s.rq.bytes -= <size_t>w
            stream_consumed(c, s, <size_t>w)
            if k.off == k.len:
                chunkq_pop(&s.rq)  # nothing left in it: q.bytes is already right
        elif w < 0 and (errno == EAGAIN or errno == EINTR):
            s.flags &= ~SF_PLAIN_W
            return
        else:
            stream_io_fail(c, s, errno if w < 0 else EPIPE)
            return
    if s.rq.head == NULL and s.flags & SF_REMOTE_END and not s.flags & SF_PLAIN_SHUT:
        shutdown(s.fd, SHUT_WR)
        s.flags |= SF_PLAIN_SHUT
        stream_maybe_done(c, s)


cdef ssize_t stream_upload(Conn *c, Stream *s) noexcept nogil:
    """One turn of plain -> stream.  Returns payload bytes framed (0: nothing now, -1: ended)."""
    cdef int64_t win = s.send_window if s.send_window < c.send_window else c.send_window
    cdef size_t room, want, fs, nfr, i, full, rem
    cdef iovec iov[MAX_IOV]
    cdef char *base
    cdef ssize_t n
    if win <= 0:
        return 0
    if buf_len(&c.obuf) + 1024 > UPLOAD_OBUF_HIGH:
        return 0
    room = UPLOAD_OBUF_HIGH - buf_len(&c.obuf)
    want = <size_t>win
    if want > UPLOAD_CHUNK:
        want = UPLOAD_CHUNK
    if want > room:
        want = room
    fs = <size_t>c.peer_max_frame
    nfr = (want + fs - 1) // fs
    if nfr > MAX_IOV:
        nfr = MAX_IOV
        want = nfr * fs
    if buf_reserve(&c.obuf, want + nfr * FRAME_HEADER) != 0:
        conn_error(c, H2_INTERNAL_ERROR, "out of memory")
        return -1
    base = c.obuf.data + c.obuf.end
    for i in range(nfr):
        iov[i].iov_base = base + i * (fs + FRAME_HEADER) + FRAME_HEADER
        iov[i].iov_len = fs if (i + 1) * fs <= want else want - i * fs
    n = readv(s.fd, iov, <int>nfr)
    if n > 0:
        full = <size_t>n // fs
        rem = <size_t>n % fs
        for i in range(full):
            put_frame_header(base + i * (fs + FRAME_HEADER), fs, FT_DATA, 0, s.id)
        if rem:
            put_frame_header(base + full * (fs + FRAME_HEADER), rem, FT_DATA, 0, s.id)
        c.obuf.end += <size_t>n + (full + (1 if rem else 0)) * FRAME_HEADER
        s.send_window -= n
        c.send_window -= n
        s.sent += n
        return n
    if n == 0:
        out_frame(&c.obuf, FT_DATA, FL_END_STREAM, s.id, NULL, 0)  # FIN -> END_STREAM
        s.flags |= SF_LOCAL_END
        s.flags &= ~SF_PLAIN_R
        stream_maybe_done(c, s)
        return -1
    if errno == EAGAIN or errno == EINTR:
        if errno == EAGAIN:
            s.flags &= ~SF_PLAIN_R
        return 0
    stream_io_fail(c, s, errno)
    return -1


cdef inline bint stream_can_upload(Stream *s) noexcept nogil:
    return (s.flags & (SF_ATTACHED | SF_PLAIN_R | SF_LOCAL_END | SF_DEAD)) == (SF_ATTACHED | SF_PLAIN_R) \
        and s.send_window > 0


cdef size_t conn_uploads(Conn *c, size_t budget) noexcept nogil:
    """Round robin over the streams with readable plain sockets, one chunk each per round, while
    windows and the output buffer allow.  Returns the bytes framed."""
    cdef size_t moved = 0
    cdef Stream *s
    cdef Stream *nxt
    cdef ssize_t n
    cdef int count
    cdef bint progress = True
    while progress and moved < budget and c.send_window > 0 and c.state == CST_OPEN:
        progress = False
        count = c.nstreams
        s = c.rr if c.rr != NULL else c.s_head
        while count > 0 and s != NULL:
            count -= 1
            nxt = s.anext if s.anext != NULL else c.s_head
            if stream_can_upload(s):
                n = stream_upload(c, s)
                if n != 0:
                    progress = True
                if n > 0:
                    moved += <size_t>n
            if c.state != CST_OPEN:
                return moved
            if nxt != NULL and nxt.flags & SF_DEAD:
                nxt = c.s_head
            s = nxt
            if buf_len(&c.obuf) + 1024 > UPLOAD_OBUF_HIGH or c.send_window <= 0:
                c.rr = s
                return moved
        c.rr = s
    return moved


cdef void conn_downloads(Conn *c) noexcept nogil:
    """Streams whose plain socket became writable: their queued payload, then FIN."""
    cdef Stream *s = c.s_head
    cdef Stream *nxt
    while s != NULL and c.state < CST_LINGER:
        nxt = s.anext
        if s.flags & SF_ATTACHED and s.flags & SF_PLAIN_W and (s.rq.head != NULL or
                (s.flags & SF_REMOTE_END and not s.flags & SF_PLAIN_SHUT)):
            stream_flush_plain(c, s)
        s = nxt


cdef void stream_on_io(Stream *s, uint32_t events) noexcept nogil:
    cdef bint bad = (events & (EPOLLERR | EPOLLHUP)) != 0
    if events & (EPOLLIN | EPOLLRDHUP) or bad:
        s.flags |= SF_PLAIN_R
    if events & EPOLLOUT or bad:
        s.flags |= SF_PLAIN_W


cdef void stream_attach(Conn *c, uint32_t sid, int fd, uint64_t token) noexcept nogil:
    """engine.tunnel(): the plain socket now carries stream sid."""
    cdef Stream *s = stream_find(c, sid)
    cdef Worker *w = <Worker *>c.worker
    cdef epoll_event ev
    cdef Event *e
    if s == NULL or s.flags & SF_ATTACHED or w == NULL:
        e = event_new(EV_STREAM_END, c.o.id)
        if e != NULL:
            e.sid = sid
            e.token = token
            e.flags = END_NOSTREAM
            e.code = H2_CANCEL
            evq_push(c.evq, e)
        return
    set_nonblocking(fd)
    s.fd = fd
    s.token = token
    s.flags |= SF_ATTACHED | SF_PLAIN_R | SF_PLAIN_W
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
    ev.data.ptr = &s.h
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev) != 0:
        stream_io_fail(c, s, errno)
        return
    s.flags |= SF_EPOLL
    stream_flush_plain(c, s)
