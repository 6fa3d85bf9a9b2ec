# _splice piece: the outbound listeners accepted by the workers themselves (fast path): node mode's,
# or one per pod (in its network namespace) in in-pod mode, each with the event loop's listener id;
# a listener id may name several sockets (the IPv4 and the IPv6 one: dual stack).
#
# Each worker watches its own dup of the listening socket (EPOLLEXCLUSIVE: one worker woken per
# connection), accepts, tunes the socket as proxy/sockets.tune does, reads the original destination
# (SO_ORIGINAL_DST, IP6T_SO_ORIGINAL_DST for IPv6, else the local address as under TPROXY) and
# looks the flow up: a hit goes to the worker owning the connection (CMD_FAST_OPEN), a miss to the
# event loop (EV_ACCEPTED).
#
# Invariants: a worker closes only its own dup of a listener (CMD_UNLISTEN, stop, or the EPOLLHUP of
# a listener the event loop shut down), so the event loop may close its socket at any time; every accepted socket ends in exactly one of EV_ACCEPTED
# or EV_FAST_OPEN (then the event loop owns it) or, when memory fails, close().

DEF ACCEPT_BATCH = 64               # connections accepted per readiness event (fairness)


cdef void worker_listen(Worker *w, Cmd *cmd) noexcept nogil:
    """CMD_LISTEN: accept on cmd.fd (this worker's own dup), listener id cmd.sid."""
    cdef epoll_event ev
    cdef Listener *l
    if cmd.fd < 0:
        return
    if w.stopping:
        close(cmd.fd)
        return
    l = <Listener *>calloc(1, sizeof(Listener))
    if l == NULL:
        close(cmd.fd)
        return
    l.fd = cmd.fd
    l.lid = cmd.sid
    l.h.kind = H_LISTEN
    l.h.owner = l
    w.keepalive[0] = <int>cmd.settings[0]
    w.keepalive[1] = <int>cmd.settings[1]
    w.keepalive[2] = <int>cmd.settings[2]
    if w.rng[0] == 0 and w.rng[1] == 0:
        rng_seed(w)
    ev.events = EPOLLIN | EPOLLEXCLUSIVE
    ev.data.ptr = &l.h
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, l.fd, &ev) != 0:
        close(l.fd)
        free(l)
        return
    l.next = w.listeners
    w.listeners = l
    w.listening = True


cdef void worker_drop_listener(Worker *w, Listener *l) noexcept nogil:
    """Stop watching and close this worker's dup; freed with the grave (an epoll batch of this
    iteration may still point at it)."""
    cdef Listener **pp = &w.listeners
    while pp[0] != NULL:
        if pp[0] == l:
            pp[0] = l.next
            break
        pp = &pp[0].next
    else:
        return  # already dropped
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, l.fd, NULL)
    close(l.fd)
    l.fd = -1
    l.next = w.dead_listeners
    w.dead_listeners = l
    w.listening = w.listeners != NULL


cdef void worker_unlisten(Worker *w, uint32_t lid) noexcept nogil:
    """CMD_UNLISTEN: drop listener `lid`, or every listener (lid 0)."""
    cdef Listener *l = w.listeners
    cdef Listener *next_l
    while l != NULL:
        next_l = l.next
        if lid == 0 or l.lid == lid:
            worker_drop_listener(w, l)
        l = next_l


cdef void worker_free_listeners(Worker *w) noexcept nogil:
    cdef Listener *l
    while w.dead_listeners != NULL:
        l = w.dead_listeners
        w.dead_listeners = l.next
        free(l)


cdef void tune_accepted(Worker *w, int fd) noexcept nogil:
    cdef int one = 1
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &w.keepalive[0], sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &w.keepalive[1], sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &w.keepalive[2], sizeof(int))


cdef void worker_accept(Worker *w, Listener *l, uint32_t events, Worker *all_workers, int nworkers) noexcept nogil:
    """Accept a batch on listener `l`.  A listener the event loop shut down (shutdown(SHUT_RD): the
    kernel stops listening at once, for every dup) reports EPOLLHUP or fails accept with EINVAL:
    this worker drops its dup."""
    cdef sockaddr_in6 peer, dst         # large enough for either family (AF_INET: sockaddr_in)
    cdef unsigned int plen, dlen
    cdef int fd, i, owner, level
    cdef uint8_t src16[16]
    cdef uint8_t dst16[16]
    cdef uint32_t sport, dport
    cdef Cmd *cmd
    cdef uint32_t lid = l.lid
    for i in range(ACCEPT_BATCH):
        plen = sizeof(sockaddr_in6)
        fd = accept4(l.fd, <sockaddr *>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            if errno == EINVAL or (events & (EPOLLHUP | EPOLLERR) and errno == EAGAIN):
                worker_drop_listener(w, l)  # shut down by the event loop (pod removed, drain)
            return  # EAGAIN, or an error the event loop's path would also only log and retry
        tune_accepted(w, fd)
        # the original destination as proxy/sockets.destination reads it, per the socket's family
        level = SOL_IP if peer.sin6_family == AF_INET else SOL_IPV6
        dlen = sizeof(sockaddr_in6)
        if peer.sin6_family != AF_INET and peer.sin6_family != AF_INET6:
            flow_hand_over(w, fd, now_ns(), lid, 0)
            continue
        if getsockopt(fd, level, SO_ORIGINAL_DST, &dst, &dlen) != 0:  # IP6T_SO_ORIGINAL_DST at SOL_IPV6
            dlen = sizeof(sockaddr_in6)
            if getsockname(fd, <sockaddr *>&dst, &dlen) != 0:
                dst.sin6_family = 0
        if dst.sin6_family != peer.sin6_family:
            flow_hand_over(w, fd, now_ns(), lid, 0)
            continue
        sport = flow_addr16(&peer, src16)
        dport = flow_addr16(&dst, dst16)
        owner = flow_lookup(w, lid, src16, sport, dst16, dport, fd, &cmd)
        if owner < 0 or owner >= nworkers or cmd == NULL:
            if cmd != NULL:
                cmd_free(cmd)
            flow_hand_over(w, fd, now_ns(), lid, 0)
        elif &all_workers[owner] == w:
            flow_open(w, cmd)
            cmd_free(cmd)
        else:
            worker_post(&all_workers[owner], cmd)
