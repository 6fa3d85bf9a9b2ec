# _splice piece: the flow cache of the outbound fast path.
#
# The event loop decides once per flow class (listener, source IP, original destination IP:port;
# IPv4 and IPv6 in one keyspace: 16-byte addresses, IPv4 as IPv4-mapped) and
# installs the decision: the pooled HBONE connection that carries it (and the worker that owns
# it; the event loop's own streams share that connection, their ids picked here too: CMD_OPEN
# with sid 0), the CONNECT header block around its per-connection fields, and the id of the decision's
# metric labels and log fields.  A worker that accepts a connection of a known class opens the
# stream itself; the event loop hears EV_FAST_OPEN (tokens with bit 62 set: never one the event
# loop issues), then the completion (EV_STREAM_END with the
# token), batched with every other event of the drain.
#
# Worker connections: an entry may name, per worker, a connection of the class's pool key that the
# worker owns; a worker with one opens the class's streams there itself, any other hands them to the
# owner of the class's connection and, at `handover_rate` hand-overs or more in a second, says so
# once (EV_FLOW_HOT): the event loop dials it one (proxy/fastpath.py).  A connection that goes is
# taken out of every entry (the class's connection moves to one that is left; an entry with none
# left goes).
#
# Invariants: a flush (every state or policy change, before the change's decisions apply) empties
# the table under its lock, so a connection looked up after it never rides an old decision;
# an entry's decision is immutable (only its connections and hand-over counts change, under the
# lock) and a lookup copies what it needs under the lock; a fast-path tunnel's
# socket belongs to the event loop from EV_FAST_OPEN on (the worker never closes it); anything
# unusual (no entry, connection gone, full or going away) hands the socket to the event loop
# (EV_ACCEPTED), whose path stays the reference; a hand-over because the connection is at its
# stream limit names that connection (the event's id), so the pool skips it until a stream on it
# ends and the event loop's path takes (or dials) another for the key; the CONNECT's
# per-connection fields are literals without indexing, so no HPACK encoder state exists to go out of step; `forwarded` is the text
# hbone.headers.forwarded writes for either family (format_addr_port: IPv6 "[addr]:port", RFC 5952).

DEF FLOW_BUCKETS = 4096
DEF TRACE_HEX = 32                       # a trace id: 16 random bytes in hex

cdef const char *HEXDIGITS = "0123456789abcdef"


cdef inline size_t flow_bucket(uint32_t lid, const uint8_t *src, const uint8_t *dst, uint32_t port) noexcept nogil:
    """src, dst: 16-byte addresses (flow_addr16)."""
    cdef uint64_t w[4]
    cdef uint64_t h
    memcpy(w, src, 16)
    memcpy(&w[2], dst, 16)
    h = (w[0] ^ w[1]) * <uint64_t>2654435761u
    h ^= ((w[2] ^ w[3]) * <uint64_t>2246822519u) ^ port ^ (<uint64_t>lid << 16)
    h ^= h >> 29
    return <size_t>(h % FLOW_BUCKETS)


cdef inline bint addr16_is_v4(const uint8_t *a) noexcept nogil:
    """An IPv4-mapped address (::ffff:a.b.c.d): the flow table's form of an IPv4 address."""
    cdef int i
    for i in range(10):
        if a[i] != 0:
            return False
    return a[10] == 0xff and a[11] == 0xff


cdef uint32_t flow_addr16(const sockaddr_in6 *sa, uint8_t *out) noexcept nogil:
    """The flow table's address (16 bytes: IPv6 as it is, IPv4 mapped to ::ffff:a.b.c.d, so one
    keyspace holds both families) of an AF_INET or AF_INET6 socket address; returns its port."""
    cdef const sockaddr_in *sin
    if sa.sin6_family == AF_INET:
        sin = <const sockaddr_in *>sa
        memset(out, 0, 10)
        out[10] = 0xff
        out[11] = 0xff
        memcpy(out + 12, &sin.sin_addr.s_addr, 4)
        return ntohs(sin.sin_port)
    memcpy(out, &sa.sin6_addr, 16)
    return ntohs(sa.sin6_port)


cdef int flow_table_init(FlowTable *t, int nworkers) noexcept nogil:
    memset(t, 0, sizeof(FlowTable))
    pthread_mutex_init(&t.lock, NULL)
    t.nworkers = nworkers
    t.buckets = <FlowEntry **>calloc(FLOW_BUCKETS, sizeof(FlowEntry *))
    return 0 if t.buckets != NULL else -1


cdef void flow_entry_free(FlowEntry *e) noexcept nogil:
    free(e.worker_conn)
    free(e.handovers)
    free(e.prefix)
    free(e.fwd_host)
    free(e.suffix)
    free(e)


cdef bint flow_entry_forget_conn(FlowTable *t, FlowEntry *e, uint64_t conn_id) noexcept nogil:
    """Take connection `conn_id` out of the entry's worker connections (that worker may get hot
    again); True when none is left (the entry goes)."""
    cdef int i
    cdef bint left = False
    for i in range(t.nworkers):
        if e.worker_conn[i] == conn_id:
            e.worker_conn[i] = 0
            e.handovers[i] = 0
            e.hot &= ~(<uint64_t>1 << i)
        elif e.worker_conn[i] != 0:
            left = True
    if e.conn_id == conn_id:
        e.conn_id = 0
        for i in range(t.nworkers):  # the class's streams go to another worker connection of it
            if e.worker_conn[i] != 0:
                e.conn_id = e.worker_conn[i]
                e.worker = i
                break
    return not left


cdef void flow_table_clear(FlowTable *t, uint64_t conn_id) noexcept nogil:
    """Drop every entry (conn_id 0), or take one connection out of every entry (an entry whose
    last connection it was goes).  Caller holds the lock."""
    cdef size_t b
    cdef FlowEntry **pp
    cdef FlowEntry *e
    for b in range(FLOW_BUCKETS):
        pp = &t.buckets[b]
        while pp[0] != NULL:
            e = pp[0]
            if conn_id == 0 or flow_entry_forget_conn(t, e, conn_id):
                pp[0] = e.next
                flow_entry_free(e)
                t.count -= 1
            else:
                pp = &e.next


cdef void flow_table_clear_listener(FlowTable *t, uint32_t lid) noexcept nogil:
    """Drop the entries of one listener (a pod removed).  Caller holds the lock."""
    cdef size_t b
    cdef FlowEntry **pp
    cdef FlowEntry *e
    for b in range(FLOW_BUCKETS):
        pp = &t.buckets[b]
        while pp[0] != NULL:
            e = pp[0]
            if e.lid == lid:
                pp[0] = e.next
                flow_entry_free(e)
                t.count -= 1
            else:
                pp = &e.next


cdef void flow_table_destroy(FlowTable *t) noexcept nogil:
    if t.buckets == NULL:
        return
    flow_table_clear(t, 0)
    free(t.buckets)
    t.buckets = NULL
    pthread_mutex_destroy(&t.lock)


cdef inline uint64_t rng_next(Worker *w) noexcept nogil:
    cdef uint64_t s1 = w.rng[0]
    cdef uint64_t s0 = w.rng[1]
    w.rng[0] = s0
    s1 ^= s1 << 23
    w.rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26)
    return w.rng[1] + s0


cdef void rng_seed(Worker *w) noexcept nogil:
    if getrandom(w.rng, sizeof(w.rng), 0) != sizeof(w.rng):
        w.rng[0] = <uint64_t>now_ns() ^ <uint64_t><uintptr_t>w
        w.rng[1] = (<uint64_t>2654435761u << 32) ^ <uint64_t>w.index
    if w.rng[0] == 0 and w.rng[1] == 0:
        w.rng[1] = 1


cdef void put_hex(char *out, uint64_t v, int digits) noexcept nogil:
    cdef int i
    for i in range(digits):
        out[digits - 1 - i] = HEXDIGITS[v & 0xf]
        v >>= 4


cdef int hpack_put_int(Buf *b, uint8_t first, int prefix_bits, size_t v) noexcept nogil:
    """RFC 7541 5.1 integer with an N-bit prefix; `first` carries the bits above the prefix."""
    cdef size_t limit = (1 << prefix_bits) - 1
    cdef char byte
    if buf_reserve(b, 10) != 0:
        return -1
    if v < limit:
        b.data[b.end] = <char>(first | v)
        b.end += 1
        return 0
    b.data[b.end] = <char>(first | limit)
    b.end += 1
    v -= limit
    while v >= 128:
        b.data[b.end] = <char>((v & 0x7f) | 0x80)
        b.end += 1
        v >>= 7
    b.data[b.end] = <char>v
    b.end += 1
    return 0


cdef int hpack_put_literal(Buf *b, const char *name, size_t nlen, const char *value, size_t vlen) noexcept nogil:
    """A literal field without indexing, new name, no Huffman (RFC 7541 6.2.2): no encoder state."""
    if hpack_put_int(b, 0x00, 4, 0) != 0 or hpack_put_int(b, 0x00, 7, nlen) != 0 \
            or buf_append(b, name, nlen) != 0 or hpack_put_int(b, 0x00, 7, vlen) != 0:
        return -1
    return buf_append(b, value, vlen)


cdef size_t format_addr_port(char *out, const uint8_t *a, uint32_t port) noexcept nogil:
    """`ip:port` as hbone.headers.format_addr writes it (out: 64 bytes): IPv4 (an IPv4-mapped
    address, as proxy/sockets.normalize unmaps it) dotted; IPv6 in brackets, RFC 5952 text as
    Python's ipaddress writes it (lowercase hex, no leading zeros, the first longest run of two or
    more zero groups as "::", never an embedded dotted IPv4)."""
    cdef uint32_t words[8]
    cdef int i, best = -1, best_len = 0, run = 0
    cdef size_t n
    if addr16_is_v4(a):
        return <size_t>snprintf(out, 32, "%u.%u.%u.%u:%u", a[12], a[13], a[14], a[15], port)
    for i in range(8):
        words[i] = (<uint32_t>a[2 * i] << 8) | a[2 * i + 1]
        if words[i] == 0:
            run += 1
            if run > best_len:
                best_len = run
                best = i - run + 1
        else:
            run = 0
    if best_len < 2:
        best = -1
    out[0] = b'['
    n = 1
    i = 0
    while i < 8:
        if i == best:
            out[n] = b':'
            out[n + 1] = b':'
            n += 2
            i += best_len
            continue
        if i > 0 and not (best >= 0 and i == best + best_len):
            out[n] = b':'
            n += 1
        n += <size_t>snprintf(out + n, 5, "%x", words[i])
        i += 1
    n += <size_t>snprintf(out + n, 9, "]:%u", port)
    return n


cdef int flow_lookup(Worker *w, uint32_t lid, const uint8_t *src, uint32_t sport, const uint8_t *dst, uint32_t dport,
                     int fd, Cmd **out) noexcept nogil:
    """A hit builds the CMD_FAST_OPEN for the owning worker: data = trace id (32 hex) + the CONNECT
    header block.  src, dst: 16-byte addresses (flow_addr16).  Returns the owner's index, or -1 (miss)."""
    cdef FlowTable *t = w.flows
    cdef FlowEntry *e
    cdef Buf b
    cdef char trace[TRACE_HEX]
    cdef char tp[64]
    cdef char fwd[72]                    # 'for="' + "[<39>]:65535" + '"'
    cdef size_t n
    cdef int owner = -1
    cdef uint64_t conn_id = 0
    cdef uint64_t hot = 0
    cdef int64_t now
    cdef Cmd *cmd
    cdef uint64_t r0 = rng_next(w)
    cdef uint64_t r1 = rng_next(w)
    cdef uint64_t r2 = rng_next(w)
    out[0] = NULL
    if t == NULL:
        return -1
    put_hex(trace, r0, 16)
    put_hex(trace + 16, r1, 16)
    memset(&b, 0, sizeof(Buf))
    if buf_append(&b, trace, TRACE_HEX) != 0:
        return -1
    pthread_mutex_lock(&t.lock)
    e = t.buckets[flow_bucket(lid, src, dst, dport)]
    while e != NULL and not (e.lid == lid and e.port == dport and memcmp(e.src, src, 16) == 0
                             and memcmp(e.dst, dst, 16) == 0):
        e = e.next
    if e != NULL:
        if e.worker_conn[w.index] != 0:  # this worker owns a connection of the class: no hand-over
            conn_id = e.worker_conn[w.index]
            owner = w.index
        else:
            conn_id = e.conn_id
            owner = e.worker
            if owner != w.index and t.handover_rate and not (e.hot >> w.index) & 1:
                now = <int64_t>now_ns()
                if now - e.window_ns >= 1000000000:
                    e.window_ns = now
                    memset(e.handovers, 0, t.nworkers * sizeof(uint32_t))
                e.handovers[w.index] += 1
                if e.handovers[w.index] >= t.handover_rate:
                    e.hot |= <uint64_t>1 << w.index
                    hot = e.flow_id
        # forwarded: for="<client ip:port>"[;host=<service>]   traceparent: 00-<trace>-<span>-00
        memcpy(fwd, b'for="', 5)
        n = 5 + format_addr_port(fwd + 5, src, sport)
        fwd[n] = b'"'
        n += 1
        memcpy(tp, b"00-", 3)
        memcpy(tp + 3, trace, TRACE_HEX)
        tp[35] = b'-'
        put_hex(tp + 36, r2, 16)
        memcpy(tp + 52, b"-00", 3)
        if buf_append(&b, e.prefix, e.prefix_len) != 0 or hpack_put_int(&b, 0x00, 4, 0) != 0 \
                or hpack_put_int(&b, 0x00, 7, 9) != 0 or buf_append(&b, "forwarded", 9) != 0 \
                or hpack_put_int(&b, 0x00, 7, n + e.fwd_host_len) != 0 or buf_append(&b, fwd, n) != 0 \
                or (e.fwd_host_len and buf_append(&b, e.fwd_host, e.fwd_host_len) != 0) \
                or hpack_put_literal(&b, "traceparent", 11, tp, 55) != 0 \
                or (e.suffix_len and buf_append(&b, e.suffix, e.suffix_len) != 0):
            e = NULL
        else:
            cmd = <Cmd *>calloc(1, sizeof(Cmd))
            if cmd != NULL:
                cmd.kind = CMD_FAST_OPEN
                cmd.id = conn_id
                cmd.fd = fd
                cmd.fd2 = -1
                cmd.sid = lid  # a hand-over at the owner still names the listener
                cmd.data = b.data
                cmd.len = b.end
                b.data = NULL
                cmd.settings[0] = <int64_t>e.flow_id
                cmd.settings[2] = sport
                cmd.settings[3] = now_ns()
                w.fast_seq += 1
                cmd.token = (<uint64_t>1 << 62) | (<uint64_t>w.index << 48) | (w.fast_seq & ((<uint64_t>1 << 48) - 1))
                out[0] = cmd
    pthread_mutex_unlock(&t.lock)
    buf_free(&b)
    if out[0] == NULL:
        return -1
    if hot:
        flow_hot(w, hot)
    return owner


cdef void flow_hot(Worker *w, uint64_t flow_id) noexcept nogil:
    """EV_FLOW_HOT: this worker hands flow `flow_id`'s connections over to the worker that owns
    its connection at the handover rate or more; the event loop dials it a connection of its own
    (proxy/fastpath.py), once per entry and worker until that connection goes."""
    cdef Event *e = event_new(EV_FLOW_HOT, flow_id)
    if e != NULL:
        e.sid = <uint32_t>w.index
        evq_push(w.evq, e)


cdef void flow_count(Worker *w, bint carried) noexcept nogil:
    """Connections carried by the workers (a tunnel opened) or handed to the event loop."""
    if w.flows == NULL:
        return
    pthread_mutex_lock(&w.flows.lock)
    if carried:
        w.flows.hits += 1
    else:
        w.flows.misses += 1
    pthread_mutex_unlock(&w.flows.lock)


cdef void flow_hand_over(Worker *w, int fd, int64_t accepted, uint32_t lid, uint64_t full) noexcept nogil:
    """A connection the fast path does not take: the event loop runs its own path on it (the
    event's sid names the listener it was accepted on; its id is `full`: the fast-path connection
    whose stream limit turned it away, 0 for any other reason)."""
    cdef Event *e = event_new(EV_ACCEPTED, full)
    flow_count(w, False)
    if e == NULL:
        close(fd)
        return
    e.a = fd
    e.b = accepted
    e.sid = lid
    evq_push(w.evq, e)


cdef void flow_open(Worker *w, Cmd *cmd) noexcept nogil:
    """CMD_FAST_OPEN on the worker that owns the connection: open the CONNECT stream; the accepted
    socket is attached when the answer is 200 (flow_response)."""
    cdef Obj *o = worker_find(w, cmd.id)
    cdef Conn *c = <Conn *>o if o != NULL and o.kind == H_TLS else NULL
    cdef int64_t limit
    cdef uint32_t sid
    cdef Stream *s
    cdef Event *e
    cdef char data[TRACE_HEX]
    if c != NULL:
        limit = c.fast_max_streams if c.fast_max_streams < c.peer_max_streams else c.peer_max_streams
    if c == NULL or c.state != CST_OPEN or c.flags & (CF_GOAWAY_RECV | CF_GOAWAY_SENT) \
            or c.fast_max_streams <= 0 or cmd.len < TRACE_HEX:
        flow_hand_over(w, cmd.fd, cmd.settings[3], cmd.sid, 0)
        return
    if c.nstreams >= limit or c.highest_local_sid >= 0x7ffffffd:
        # full (or out of stream ids): the event loop's path takes another pooled connection
        flow_hand_over(w, cmd.fd, cmd.settings[3], cmd.sid, c.o.id)
        return
    sid = c.highest_local_sid + 2 if c.highest_local_sid else 1
    s = stream_new(c, sid, SF_FAST_PENDING)
    if s == NULL:
        flow_hand_over(w, cmd.fd, cmd.settings[3], cmd.sid, 0)
        return
    c.highest_local_sid = sid
    flow_count(w, True)
    s.fast_fd = cmd.fd
    s.token = cmd.token
    e = event_new(EV_FAST_OPEN, c.o.id)
    if e != NULL:
        e.token = cmd.token
        e.sid = sid
        e.code = cmd.fd
        e.flags = <int>cmd.settings[2]
        e.a = cmd.settings[0]
        e.b = cmd.settings[3]
        memcpy(data, cmd.data, TRACE_HEX)
        event_set_data(e, data, TRACE_HEX)
        evq_push(w.evq, e)
    if out_headers(&c.obuf, sid, cmd.data + TRACE_HEX, cmd.len - TRACE_HEX, False, <size_t>c.peer_max_frame) != 0:
        conn_error(c, H2_INTERNAL_ERROR, "out of memory")
    worker_queue(w, &c.o)


cdef int fields_status(const char *p, size_t n) noexcept nogil:
    """The :status of decoded response fields (_splice_hpack.pxi layout), or 0."""
    cdef uint32_t lens[2]
    cdef size_t off = 0
    cdef int status = 0
    cdef size_t i
    cdef int digit
    while off + 8 <= n:
        memcpy(lens, p + off, 8)
        off += 8
        if off + lens[0] + lens[1] > n:
            return 0
        if lens[0] == 7 and memcmp(p + off, b":status", 7) == 0:
            if lens[1] != 3:
                return 0
            for i in range(3):
                digit = <int>(<uint8_t>p[off + 7 + i]) - 48  # '0'
                if digit < 0 or digit > 9:
                    return 0
                status = status * 10 + digit
            return status
        off += lens[0] + lens[1]
    return 0


cdef void flow_response(Conn *c, Stream *s, int status) noexcept nogil:
    """The answer to a fast-path CONNECT: 200 attaches the accepted socket; anything else is told
    to the event loop (EV_FAST_STATUS) and the stream is reset, as the event loop's path does."""
    cdef int fd = s.fast_fd
    cdef Event *e
    s.flags &= ~SF_FAST_PENDING
    s.fast_fd = -1
    if status == 200:
        stream_attach(c, s.id, fd, s.token)
        return
    e = event_new(EV_FAST_STATUS, c.o.id)
    if e != NULL:
        e.token = s.token
        e.sid = s.id
        e.code = status
        evq_push(c.evq, e)
    stream_reset(c, s, H2_CANCEL, END_LOCAL_RESET, 0)
