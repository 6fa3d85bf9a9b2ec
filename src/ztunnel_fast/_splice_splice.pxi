# _splice piece 2: plain <-> plain tunnels on a worker: splice(2) through one pipe per direction
# (zero copy), recv/send through a fixed buffer when the kernel refuses to splice the pair.
#
# Invariants: a direction holds at most one pipe (or one buffer) of data: memory per tunnel is
# fixed.  FIN travels as shutdown(SHUT_WR) once the pipe is empty.  The first error ends both
# directions (the event loop then resets both sockets).  The sockets are never closed here.

DEF PIPE_SIZE = 1 << 20          # bytes per pipe: large enough for bulk, bounded per tunnel
DEF SPLICE_BUDGET = 8 << 20      # bytes one direction moves per turn before others get theirs
DEF FALLBACK_BUF = 256 * 1024    # recv/send buffer when splice(2) is refused


cdef int sleg_open(SLeg *l, int src, int dst) noexcept nogil:
    cdef int fds[2]
    cdef int size
    memset(l, 0, sizeof(SLeg))
    l.src = src
    l.dst = dst
    l.pipe_r = -1
    l.pipe_w = -1
    l.src_r = True   # edge-triggered: try once before the first edge
    l.dst_w = True
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
        return errno
    l.pipe_r = fds[0]
    l.pipe_w = fds[1]
    size = fcntl(l.pipe_w, F_SETPIPE_SZ, <int>PIPE_SIZE)
    l.capacity = size if size > 0 else 65536  # the kernel default when resizing is refused
    return 0


cdef void sleg_close(SLeg *l) noexcept nogil:
    if l.pipe_r >= 0:
        close(l.pipe_r)
    if l.pipe_w >= 0:
        close(l.pipe_w)
    l.pipe_r = -1
    l.pipe_w = -1
    free(l.buf)
    l.buf = NULL


cdef int sleg_fallback(SLeg *l) noexcept nogil:
    """Switch to recv/send (only before any byte went through the pipe)."""
    l.buf = <char *>malloc(FALLBACK_BUF)
    if l.buf == NULL:
        return ENOMEM
    l.capacity = FALLBACK_BUF
    l.boff = 0
    return 0


cdef int sleg_fill(SLeg *l, bint *progress) noexcept nogil:
    cdef ssize_t n
    cdef int err
    if l.buf != NULL:
        if l.pending > 0:
            return 0
        n = recv(l.src, l.buf, l.capacity, MSG_DONTWAIT)
        if n > 0:
            l.boff = 0
    else:
        n = splice(l.src, NULL, l.pipe_w, NULL, l.capacity - l.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if n < 0 and errno == EINVAL and l.moved == 0 and l.pending == 0:
            err = sleg_fallback(l)
            if err:
                return err
            return sleg_fill(l, progress)
    if n > 0:
        l.pending += n
        progress[0] = True
    elif n == 0:
        l.eof = True
        progress[0] = True
    elif errno == EAGAIN or errno == EINTR:
        if errno == EAGAIN:
            l.src_r = False
    else:
        return errno
    return 0


cdef int sleg_drain(SLeg *l, bint *progress) noexcept nogil:
    cdef ssize_t n
    if l.buf != NULL:
        n = send(l.dst, l.buf + l.boff, l.pending, MSG_NOSIGNAL | MSG_DONTWAIT)
        if n > 0:
            l.boff += n
    else:
        n = splice(l.pipe_r, NULL, l.dst, NULL, l.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
    if n > 0:
        l.pending -= n
        l.moved += n
        progress[0] = True
    elif n < 0 and (errno == EAGAIN or errno == EINTR):
        if errno == EAGAIN:
            l.dst_w = False
    else:
        return errno if n < 0 else EPIPE
    return 0


cdef int sleg_step(SLeg *l, bint *more) noexcept nogil:
    """Move what readiness allows, up to SPLICE_BUDGET.  Returns 0 or an errno; sets more[0]
    when the budget ran out with work left (the splice is queued again)."""
    cdef bint progress = True
    cdef int err
    cdef int64_t start = l.moved
    while progress and not l.done:
        progress = False
        if l.pending > 0 and l.dst_w:
            err = sleg_drain(l, &progress)
            if err:
                return err
        if not l.eof and l.src_r and l.pending < l.capacity:
            err = sleg_fill(l, &progress)
            if err:
                return err
        if l.eof and l.pending == 0:
            shutdown(l.dst, SHUT_WR)
            l.done = True
        elif l.moved - start >= SPLICE_BUDGET:
            more[0] = True
            break
    return 0


cdef Splice *splice_new(Worker *w, uint64_t token, int fa, int fb) noexcept nogil:
    cdef Splice *s = <Splice *>calloc(1, sizeof(Splice))
    if s == NULL:
        return NULL
    s.o.kind = H_SPLICE_A
    s.o.id = token
    s.worker = w
    s.fa = fa
    s.fb = fb
    s.ha.kind = H_SPLICE_A
    s.ha.owner = s
    s.hb.kind = H_SPLICE_B
    s.hb.owner = s
    s.ab.pipe_r = s.ab.pipe_w = s.ba.pipe_r = s.ba.pipe_w = -1
    s.err = sleg_open(&s.ab, fa, fb)
    if s.err == 0:
        s.err = sleg_open(&s.ba, fb, fa)
    return s


cdef void splice_on_io(Splice *s, int side, uint32_t events) noexcept nogil:
    """Edge from epoll: remember readiness.  Errors and hang-ups wake both ways, so the next
    syscall reports them."""
    cdef bint bad = (events & (EPOLLERR | EPOLLHUP)) != 0
    if side == 0:       # fa: source of ab, destination of ba
        if events & (EPOLLIN | EPOLLRDHUP) or bad:
            s.ab.src_r = True
        if events & EPOLLOUT or bad:
            s.ba.dst_w = True
    else:
        if events & (EPOLLIN | EPOLLRDHUP) or bad:
            s.ba.src_r = True
        if events & EPOLLOUT or bad:
            s.ab.dst_w = True


cdef void splice_finish(Worker *w, Splice *s, int err) noexcept nogil:
    cdef Event *e
    if s.o.dead:
        return
    worker_forget(w, &s.o)
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, s.fa, NULL)
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, s.fb, NULL)
    sleg_close(&s.ab)
    sleg_close(&s.ba)
    e = event_new(EV_SPLICE_DONE, s.o.id)
    if e != NULL:
        e.a = s.ab.moved
        e.b = s.ba.moved
        e.err = err
        evq_push(w.evq, e)


cdef void splice_run(Worker *w, Splice *s) noexcept nogil:
    cdef bint more = False
    cdef int err
    if s.err:
        splice_finish(w, s, s.err)
        return
    err = sleg_step(&s.ab, &more)
    if err == 0:
        err = sleg_step(&s.ba, &more)
    if err:
        splice_finish(w, s, err)
    elif s.ab.done and s.ba.done:
        splice_finish(w, s, 0)
    elif more:
        worker_queue(w, &s.o)


cdef void splice_start(Worker *w, uint64_t token, int fa, int fb) noexcept nogil:
    cdef Splice *s = splice_new(w, token, fa, fb)
    cdef epoll_event ev
    cdef Event *e
    if s == NULL:
        e = event_new(EV_SPLICE_DONE, token)
        if e != NULL:
            e.err = ENOMEM
            evq_push(w.evq, e)
        return
    worker_adopt(w, &s.o)
    if s.err == 0:
        set_nonblocking(fa)
        set_nonblocking(fb)
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.ptr = &s.ha
        if epoll_ctl(w.epfd, EPOLL_CTL_ADD, fa, &ev) != 0:
            s.err = errno
        ev.data.ptr = &s.hb
        if s.err == 0 and epoll_ctl(w.epfd, EPOLL_CTL_ADD, fb, &ev) != 0:
            s.err = errno
    worker_queue(w, &s.o)
