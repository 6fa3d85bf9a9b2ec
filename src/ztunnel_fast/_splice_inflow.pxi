# _splice piece: the inbound fast path's flow cache (ZTUNNEL_FAST_PATH, Phase C).
#
# The event loop decides a peer's CONNECT once (proxy/inbound.py, the reference) and, when
# proxy/flowcache.py says the decision is a function of the class alone, installs it keyed by
# (inbound HBONE connection, :authority text): the connection fixes the peer's address and
# identity and the address it arrived on, the :authority the destination.  When the next CONNECT
# of the class arrives (its block already decoded in C), the worker dials the app itself
# (non-blocking, IPv4 or IPv6, the same SO_MARK / IP(V6)_TRANSPARENT source as sockets.connect), answers 200 when the
# dial succeeds, attaches the upstream socket and reports EV_INBOUND_OPEN (token bits 62 and 61)
# then the completion (EV_STREAM_END with the token), batched with every other event.
#
# Invariants:
# - Only allow verdicts are installed, and only a request whose fields are exactly those the
#   decision covered (:method CONNECT, the :authority text, then forwarded / traceparent /
#   tracestate / baggage with printable ASCII values) is looked up; anything else is today's path.
# - Anything unusual hands the CONNECT back untouched: the dial fails or times out, the stream or
#   connection ends meanwhile, or the table was flushed since the lookup.  The event loop then gets
#   the EV_HEADERS it would have had (before any end of the stream) and runs its own path under the
#   state in force, so a refused upstream gets the reference path's answer and wording.
# - A flush bumps `gen` under the lock, and EV_INBOUND_OPEN is queued under the same lock after
#   checking `gen`: once a flush returns, every tunnel opened on an old verdict is already in the
#   event queue (the event loop drains it before the new state applies, so the policy change
#   re-checks them like every live connection).
# - The upstream socket belongs to the event loop from EV_INBOUND_OPEN on; before, to the stream.
# - In-pod: an entry with a namespace fd (the pod's) has its upstream socket created inside that
#   namespace: the worker thread setns()es there, calls socket(), and setns()es back to its own
#   (home_fd) while holding the table's lock, so a flush of the pod (inflow_flush_scope, before
#   the event loop closes the fd) waits for it and no fd is used after it was closed.  Binding,
#   SO_MARK and connect then work from the worker's own namespace.  A failure to enter hands the
#   CONNECT back; a failure to return marks the worker netns_lost: it never dials again (its
#   next socket would be in the pod's namespace).

DEF INFLOW_BUCKETS = 4096
DEF INFLOW_AUTHORITY_MAX = 64        # InFlowEntry.authority's size: "255.255.255.255:65535" and "[<39>]:65535" fit
DEF INBOUND_TOKEN = 0x6000000000000000  # bits 62 (a worker's token) and 61 (inbound)

# the 200 answer as hbone.hpack_cache.StatelessEncoder encodes it: table size 0, then :status 200
cdef const char *STATUS_200_BLOCK = b"\x20\x88"


cdef inline size_t inflow_bucket(uint64_t conn_id, const char *a, size_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037u ^ (conn_id * 11400714819323198485u)
    cdef size_t i
    for i in range(n):
        h = (h ^ <uint8_t>a[i]) * 1099511628211u
    h ^= h >> 29
    return <size_t>(h % INFLOW_BUCKETS)


cdef int inflow_table_init(InFlowTable *t) noexcept nogil:
    memset(t, 0, sizeof(InFlowTable))
    pthread_mutex_init(&t.lock, NULL)
    # the namespace the workers are created in (called on the thread that starts them); without it
    # no pod's verdict is installed (inflow_install)
    t.home_fd = c_open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
    t.buckets = <InFlowEntry **>calloc(INFLOW_BUCKETS, sizeof(InFlowEntry *))
    return 0 if t.buckets != NULL else -1


cdef void inflow_table_clear(InFlowTable *t, uint64_t conn_id, uint64_t scope_id=0) noexcept nogil:
    """Drop every entry (conn_id and scope_id 0), those of one connection, or those of one pod
    (scope_id).  Caller holds the lock."""
    cdef size_t b
    cdef InFlowEntry **pp
    cdef InFlowEntry *e
    for b in range(INFLOW_BUCKETS):
        pp = &t.buckets[b]
        while pp[0] != NULL:
            e = pp[0]
            if (conn_id == 0 and scope_id == 0) or (conn_id != 0 and e.conn_id == conn_id) \
                    or (scope_id != 0 and e.scope_id == scope_id):
                pp[0] = e.next
                free(e)
                t.count -= 1
            else:
                pp = &e.next


cdef void inflow_table_destroy(InFlowTable *t) noexcept nogil:
    if t.buckets == NULL:
        return
    inflow_table_clear(t, 0)
    free(t.buckets)
    t.buckets = NULL
    if t.home_fd >= 0:
        close(t.home_fd)
        t.home_fd = -1
    pthread_mutex_destroy(&t.lock)


cdef inline bint field_is(const char *p, size_t n, const char *lit, size_t ln) noexcept nogil:
    return n == ln and memcmp(p, lit, ln) == 0


cdef bint inflow_fields_ok(const char *p, size_t n, const char **authority, size_t *alen) noexcept nogil:
    """The request is one the cached decision covers: :method CONNECT and :authority (once each,
    first), then only forwarded, traceparent, tracestate or baggage; printable ASCII values (valid
    UTF-8, as the event loop's path needs them).  Sets the :authority text."""
    cdef uint32_t lens[2]
    cdef size_t off = 0, i
    cdef const char *name
    cdef const char *value
    cdef bint method = False, pseudo = True
    cdef uint8_t ch
    authority[0] = NULL
    while off + 8 <= n:
        memcpy(lens, p + off, 8)
        off += 8
        if off + lens[0] + lens[1] > n:
            return False
        name = p + off
        value = p + off + lens[0]
        off += lens[0] + lens[1]
        for i in range(lens[1]):
            ch = <uint8_t>value[i]
            if ch < 0x20 or ch > 0x7e:
                return False
        if lens[0] > 0 and name[0] == b':':
            if not pseudo:
                return False
            if field_is(name, lens[0], ":method", 7):
                if method or not field_is(value, lens[1], "CONNECT", 7):
                    return False
                method = True
            elif field_is(name, lens[0], ":authority", 10):
                if authority[0] != NULL or lens[1] == 0 or lens[1] > INFLOW_AUTHORITY_MAX:
                    return False
                authority[0] = value
                alen[0] = lens[1]
            else:
                return False
        else:
            pseudo = False
            if not (field_is(name, lens[0], "forwarded", 9) or field_is(name, lens[0], "traceparent", 11)
                    or field_is(name, lens[0], "tracestate", 10) or field_is(name, lens[0], "baggage", 7)):
                return False
    return off == n and method and authority[0] != NULL


cdef int inflow_socket_in(InFlowTable *t, Worker *w, int netns_fd, int family) noexcept nogil:
    """A TCP socket of `family` created inside the network namespace `netns_fd` (a pod's), the calling worker
    thread back in its own one before this returns; -1 when it cannot be (nothing created).
    Caller holds the table's lock: the pod's removal flushes its entries (under the same lock)
    before its fd is closed, so the fd is the pod's for as long as this runs.  A worker that
    cannot return home never dials again (netns_lost: its next socket would be in the pod)."""
    cdef int fd
    if w.netns_lost or t.home_fd < 0 or netns_fd < 0:
        return -1
    if setns(netns_fd, CLONE_NEWNET) != 0:
        return -1
    fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if setns(t.home_fd, CLONE_NEWNET) != 0:
        w.netns_lost = True
        if fd >= 0:
            close(fd)
        return -1
    return fd


cdef int inflow_start(Conn *c, uint32_t sid, Buf *fields) noexcept nogil:
    """A peer's new CONNECT (no END_STREAM): on a hit, start dialling the app and keep the fields
    (taken from `fields`).  Returns 1 when the worker took the stream, 0 for the event loop."""
    cdef Worker *w = <Worker *>c.worker
    cdef InFlowTable *t = w.inflows if w != NULL else NULL
    cdef InFlowEntry *e
    cdef const char *auth
    cdef size_t alen = 0
    cdef Stream *s
    cdef sockaddr_in addr
    cdef sockaddr_in6 addr6
    cdef epoll_event ev
    cdef int fd = -1, one = 1, mark = 0, rc, family = AF_INET
    cdef int keepalive[3]
    cdef uint8_t app_ip[16]
    cdef uint8_t source_ip[16]
    cdef uint32_t app_port = 0
    cdef bint has_source = False
    cdef uint64_t flow_id = 0, gen = 0
    cdef int64_t timeout_ns = 0, now
    cdef bint hit = False
    # t.count is read without the lock: a stale value only means a miss (or a lookup that misses)
    if t == NULL or c.client or t.count == 0 or w.netns_lost or c.state != CST_OPEN \
            or c.flags & (CF_GOAWAY_SENT | CF_GOAWAY_RECV):
        return 0
    if not inflow_fields_ok(fields.data, fields.end, &auth, &alen):
        return 0
    s = stream_find(c, sid)
    if s == NULL:
        return 0
    pthread_mutex_lock(&t.lock)
    e = t.buckets[inflow_bucket(c.o.id, auth, alen)]
    while e != NULL and not (e.conn_id == c.o.id and e.authority_len == alen and memcmp(e.authority, auth, alen) == 0):
        e = e.next
    if e != NULL:
        hit = True
        flow_id = e.flow_id
        family = e.app_family
        memcpy(app_ip, e.app_ip, 16)
        app_port = e.app_port
        has_source = e.has_source
        memcpy(source_ip, e.source_ip, 16)
        mark = e.mark
        timeout_ns = e.timeout_ns
        memcpy(keepalive, e.keepalive, sizeof(keepalive))
        gen = t.gen
        if e.netns_fd >= 0:  # a pod's: its socket is made in its namespace, still under the lock
            fd = inflow_socket_in(t, w, e.netns_fd, family)
            if fd < 0:
                hit = False
                t.netns_errors += 1
                t.handed += 1
    pthread_mutex_unlock(&t.lock)
    if not hit:
        return 0
    now = now_ns()
    if fd < 0:
        fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return 0
    if mark and setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(int)) != 0:
        close(fd)
        return 0
    if has_source:  # as sockets.connect: IP_TRANSPARENT / IPV6_TRANSPARENT, bound to the peer's address
        if family == AF_INET:
            memset(&addr, 0, sizeof(addr))
            addr.sin_family = AF_INET
            memcpy(&addr.sin_addr.s_addr, source_ip, 4)
            rc = setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof(int))
            if rc == 0:
                rc = bind(fd, <sockaddr *>&addr, sizeof(addr))
        else:
            memset(&addr6, 0, sizeof(addr6))
            addr6.sin6_family = AF_INET6
            memcpy(&addr6.sin6_addr, source_ip, 16)
            rc = setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof(int))
            if rc == 0:
                rc = bind(fd, <sockaddr *>&addr6, sizeof(addr6))
        if rc != 0:
            close(fd)
            return 0
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &keepalive[0], sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &keepalive[1], sizeof(int))
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &keepalive[2], sizeof(int))
    if family == AF_INET:
        memset(&addr, 0, sizeof(addr))
        addr.sin_family = AF_INET
        addr.sin_port = htons(<uint16_t>app_port)
        memcpy(&addr.sin_addr.s_addr, app_ip, 4)
        rc = connect(fd, <sockaddr *>&addr, sizeof(addr))
    else:
        memset(&addr6, 0, sizeof(addr6))
        addr6.sin6_family = AF_INET6
        addr6.sin6_port = htons(<uint16_t>app_port)
        memcpy(&addr6.sin6_addr, app_ip, 16)
        rc = connect(fd, <sockaddr *>&addr6, sizeof(addr6))
    if rc != 0 and errno != EINPROGRESS:
        close(fd)  # the event loop's path dials again and answers with its own wording
        return 0
    ev.events = EPOLLOUT | EPOLLET
    ev.data.ptr = &s.h
    if epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev) != 0:
        close(fd)
        return 0
    s.flags |= SF_DIALING
    s.dial_fd = fd
    s.dial_start = now
    s.dial_deadline = now + timeout_ns
    s.dial_gen = gen
    s.dial_flow = flow_id
    s.dial_fields = fields[0]
    memset(fields, 0, sizeof(Buf))
    c.ndialing += 1
    return 1


cdef void inflow_stop_dial(Conn *c, Stream *s, bint close_fd) noexcept nogil:
    cdef Worker *w = <Worker *>c.worker
    s.flags &= ~SF_DIALING
    c.ndialing -= 1
    if w != NULL:
        epoll_ctl(w.epfd, EPOLL_CTL_DEL, s.dial_fd, NULL)
    if close_fd:
        close(s.dial_fd)
    s.dial_fd = -1


cdef void inflow_hand_over(Conn *c, Stream *s) noexcept nogil:
    """The worker lets go of the dial: the event loop gets the CONNECT as if no worker had looked."""
    cdef Worker *w = <Worker *>c.worker
    cdef Event *e
    if not s.flags & SF_DIALING:
        return
    inflow_stop_dial(c, s, True)
    if w != NULL and w.inflows != NULL:
        pthread_mutex_lock(&w.inflows.lock)
        w.inflows.handed += 1
        pthread_mutex_unlock(&w.inflows.lock)
    e = event_new(EV_HEADERS, c.o.id)
    if e == NULL:
        buf_free(&s.dial_fields)
        stream_reset(c, s, H2_INTERNAL_ERROR, END_PROTOCOL, 0)
        return
    e.sid = s.id
    e.flags = 0
    e.data = s.dial_fields.data  # the event owns it now
    e.len = s.dial_fields.end
    memset(&s.dial_fields, 0, sizeof(Buf))
    evq_push(c.evq, e)


cdef void inflow_dial_ready(Conn *c, Stream *s) noexcept nogil:
    """The dial's socket signalled: connected -> 200, EV_INBOUND_OPEN, splice; else hand over."""
    cdef Worker *w = <Worker *>c.worker
    cdef InFlowTable *t = w.inflows
    cdef int err = 0, fd
    cdef unsigned int elen = sizeof(int)
    cdef Event *e
    cdef uint64_t token
    cdef bint current
    if getsockopt(s.dial_fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0 or err != 0 \
            or c.state != CST_OPEN or s.flags & SF_DEAD:
        inflow_hand_over(c, s)
        return
    w.fast_seq += 1
    token = <uint64_t>INBOUND_TOKEN | (<uint64_t>w.index << 48) | (w.fast_seq & ((<uint64_t>1 << 48) - 1))
    e = event_new(EV_INBOUND_OPEN, c.o.id)
    if e == NULL:
        inflow_hand_over(c, s)
        return
    e.token = token
    e.sid = s.id
    e.code = s.dial_fd
    e.a = <int64_t>s.dial_flow
    e.b = s.dial_start
    e.data = s.dial_fields.data
    e.len = s.dial_fields.end
    pthread_mutex_lock(&t.lock)
    current = t.gen == s.dial_gen
    if current:
        t.hits += 1
        evq_push(c.evq, e)  # under the lock: a flush that returns finds it queued
    pthread_mutex_unlock(&t.lock)
    if not current:  # a state change since the lookup: the event loop decides under the new one
        e.data = NULL
        e.len = 0
        event_free(e)
        inflow_hand_over(c, s)
        return
    memset(&s.dial_fields, 0, sizeof(Buf))  # the event owns them now
    fd = s.dial_fd
    inflow_stop_dial(c, s, False)
    if out_headers(&c.obuf, s.id, STATUS_200_BLOCK, 2, False, <size_t>c.peer_max_frame) != 0:
        conn_error(c, H2_INTERNAL_ERROR, "out of memory")
    else:
        s.flags |= SF_RESPONDED
    stream_attach(c, s.id, fd, token)  # the stream ends with EV_STREAM_END(token) whatever happens
    worker_queue(w, &c.o)


cdef void inflow_tick(Conn *c, int64_t now) noexcept nogil:
    """Dials past their connect timeout are handed to the event loop (which dials and answers)."""
    cdef Stream *s = c.s_head
    cdef Stream *nxt
    while s != NULL and c.ndialing > 0:
        nxt = s.anext
        if s.flags & SF_DIALING and now >= s.dial_deadline:
            inflow_hand_over(c, s)
        s = nxt
