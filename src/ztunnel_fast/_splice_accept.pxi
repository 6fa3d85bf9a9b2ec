# _splice piece: the outbound listener accepted by the workers themselves (fast path).
#
# Each worker watches its own dup of the listening socket (EPOLLEXCLUSIVE: one worker woken per
# connection), accepts, tunes the socket as proxy/sockets.tune does, reads the original destination
# (SO_ORIGINAL_DST, else the local address as under TPROXY) and looks the flow up: a hit goes to the
# worker owning the connection (CMD_FAST_OPEN), a miss to the event loop (EV_ACCEPTED).
#
# Invariants: a worker closes only its own dup of the listener (CMD_UNLISTEN, stop), so the event
# loop may close its socket at any time; every accepted socket ends in exactly one of EV_ACCEPTED
# or EV_FAST_OPEN (then the event loop owns it) or, when memory fails, close().

DEF ACCEPT_BATCH = 64               # connections accepted per readiness event (fairness)


cdef void worker_listen(Worker *w, Cmd *cmd) noexcept nogil:
    cdef epoll_event ev
    if w.listening or cmd.fd < 0:
        if cmd.fd >= 0:
            close(cmd.fd)
        return
    w.listen_fd = cmd.fd
    w.keepalive[0] = <int>cmd.settings[0]
    w.keepalive[1] = <int>cmd.settings[1]
    w.keepalive[2] = <int>cmd.settings[2]
    w.listen_h.kind = H_LISTEN
    w.listen_h.owner = w
    if w.rng[0] == 0 and w.rng[1] == 0:
        rng_seed(w)
    ev.events = EPOLLIN | EPOLLEXCLUSIVE
    ev.data.ptr = &w.listen_h
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.listen_fd, &ev) != 0:
        close(w.listen_fd)
        return
    w.listening = True


cdef void worker_unlisten(Worker *w) noexcept nogil:
    if not w.listening:
        return
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, w.listen_fd, NULL)
    close(w.listen_fd)
    w.listening = False


cdef void tune_accepted(Worker *w, int fd) noexcept nogil:
    cdef int one = 1
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &w.keepalive[0], sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &w.keepalive[1], sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &w.keepalive[2], sizeof(int))


cdef void worker_accept(Worker *w, Worker *all_workers, int nworkers) noexcept nogil:
    cdef sockaddr_in peer, dst
    cdef unsigned int plen, dlen
    cdef int fd, i, owner
    cdef Cmd *cmd
    for i in range(ACCEPT_BATCH):
        plen = sizeof(sockaddr_in)
        fd = accept4(w.listen_fd, <sockaddr *>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            return  # EAGAIN, or an error the event loop's path would also only log and retry
        tune_accepted(w, fd)
        dlen = sizeof(sockaddr_in)
        if peer.sin_family != AF_INET or (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &dst, &dlen) != 0
                and getsockname(fd, <sockaddr *>&dst, &dlen) != 0) or dst.sin_family != AF_INET:
            flow_hand_over(w, fd, now_ns())
            continue
        owner = flow_lookup(w, ntohl(peer.sin_addr.s_addr), ntohs(peer.sin_port),
                            ntohl(dst.sin_addr.s_addr), ntohs(dst.sin_port), fd, &cmd)
        if owner < 0 or owner >= nworkers or cmd == NULL:
            if cmd != NULL:
                cmd_free(cmd)
            flow_hand_over(w, fd, now_ns())
        elif &all_workers[owner] == w:
            flow_open(w, cmd)
            cmd_free(cmd)
        else:
            worker_post(&all_workers[owner], cmd)
