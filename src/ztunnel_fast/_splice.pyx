# cython: language_level=3
"""Native engine: moves a tunnel's bytes with the GIL released.

This module holds the plain<->plain leg: splice(2) through a pipe per direction, zero copy.  The
whole loop runs without the GIL; it returns only when both directions finished (FIN propagated as
shutdown(SHUT_WR)), one side failed, or the cancel fd became readable.

Invariants: no Python object is touched inside the loop; each direction holds at most one pipe of
data (the pipe is the only buffer, so memory per tunnel is fixed); the function never closes the
sockets it is given: the caller owns them.
"""

from libc.string cimport memset

DEF PIPE_SIZE = 1 << 20      # 1 MiB pipe per direction: large enough for bulk, bounded per tunnel
DEF DEFAULT_CHUNK = 1 << 20  # bytes asked of one splice() call


cdef int leg_open(Leg *leg, int src, int dst, size_t pipe_size) noexcept nogil:
    cdef int fds[2]
    memset(leg, 0, sizeof(Leg))
    leg.src = src
    leg.dst = dst
    leg.pipe_r = -1
    leg.pipe_w = -1
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
        return errno
    leg.pipe_r = fds[0]
    leg.pipe_w = fds[1]
    cdef int size = fcntl(leg.pipe_w, F_SETPIPE_SZ, <int>pipe_size)
    leg.capacity = size if size > 0 else 65536  # the kernel default when resizing is refused
    return 0


cdef void leg_close(Leg *leg) noexcept nogil:
    if leg.pipe_r >= 0:
        close(leg.pipe_r)
    if leg.pipe_w >= 0:
        close(leg.pipe_w)
    leg.pipe_r = -1
    leg.pipe_w = -1


cdef int leg_fill(Leg *leg, size_t chunk) noexcept nogil:
    """src -> pipe.  Returns 0 or an errno."""
    cdef ssize_t n = splice(leg.src, NULL, leg.pipe_w, NULL, chunk, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
    if n > 0:
        leg.pending += n
    elif n == 0:
        leg.eof = True
    elif errno != EAGAIN and errno != EINTR:
        return errno
    return 0


cdef int leg_drain(Leg *leg) noexcept nogil:
    """pipe -> dst.  Returns 0 or an errno."""
    cdef ssize_t n
    while leg.pending > 0:
        n = splice(leg.pipe_r, NULL, leg.dst, NULL, leg.pending, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if n > 0:
            leg.pending -= n
            leg.moved += n
        elif n < 0 and (errno == EAGAIN or errno == EINTR):
            return 0
        else:
            return errno if n < 0 else EINVAL
    return 0


cdef inline void leg_finish(Leg *leg) noexcept nogil:
    if leg.eof and leg.pending == 0 and not leg.done:
        shutdown(leg.dst, SHUT_WR)
        leg.done = True


cdef int splice_loop(Leg *ab, Leg *ba, int cancel_fd, size_t chunk) noexcept nogil:
    """Runs both legs until done.  Returns 0, an errno, or ECANCELED."""
    cdef pollfd fds[5]
    cdef Leg *legs[2]
    cdef int i, n, err, idx_src[2], idx_dst[2]
    legs[0] = ab
    legs[1] = ba
    while not (ab.done and ba.done):
        n = 0
        for i in range(2):
            idx_src[i] = -1
            idx_dst[i] = -1
            if not legs[i].eof and legs[i].pending < legs[i].capacity:
                fds[n].fd = legs[i].src
                fds[n].events = POLLIN
                fds[n].revents = 0
                idx_src[i] = n
                n += 1
            if legs[i].pending > 0:
                fds[n].fd = legs[i].dst
                fds[n].events = POLLOUT
                fds[n].revents = 0
                idx_dst[i] = n
                n += 1
        fds[n].fd = cancel_fd
        fds[n].events = POLLIN
        fds[n].revents = 0
        n += 1
        if poll(fds, n, -1) < 0:
            if errno == EINTR:
                continue
            return errno
        if cancel_fd >= 0 and fds[n - 1].revents:
            return ECANCELED
        for i in range(2):
            if idx_src[i] >= 0 and fds[idx_src[i]].revents:
                err = leg_fill(legs[i], min(chunk, legs[i].capacity - legs[i].pending))
                if err:
                    return err
            if legs[i].pending > 0 and (idx_dst[i] < 0 or fds[idx_dst[i]].revents or idx_src[i] >= 0):
                err = leg_drain(legs[i])
                if err:
                    return err
            leg_finish(legs[i])
    return 0


def splice_pair(int fd_a, int fd_b, int cancel_fd=-1, size_t chunk=DEFAULT_CHUNK):
    """Move bytes a<->b until both directions end.

    Returns (bytes a->b, bytes b->a, errno); errno is 0 on a clean finish, ECANCELED when
    cancel_fd became readable.  Blocks the calling thread; the GIL is released throughout.
    """
    cdef Leg ab, ba
    cdef int err
    err = leg_open(&ab, fd_a, fd_b, PIPE_SIZE)
    if err == 0:
        err = leg_open(&ba, fd_b, fd_a, PIPE_SIZE)
        if err == 0:
            with nogil:
                err = splice_loop(&ab, &ba, cancel_fd, chunk)
            leg_close(&ba)
        leg_close(&ab)
    return ab.moved, ba.moved, err
