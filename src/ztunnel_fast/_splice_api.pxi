# _splice piece: the Python API.  `Core` owns the workers and the event queue; engine/native.py is
# its only user.  Every method only queues a command (or drains events): nothing here blocks on a
# worker except stop().

DEF MAX_WORKERS = 64


def set_ssl_functions(uintptr_t ssl_read, uintptr_t ssl_write, uintptr_t ssl_get_error,
                      uintptr_t ssl_shutdown, uintptr_t err_clear_error, uintptr_t err_get_error,
                      uintptr_t err_reason_string, uintptr_t bio_new=0, uintptr_t bio_s_mem=0,
                      uintptr_t bio_read=0, uintptr_t ssl_set_bio=0, uintptr_t bio_set_mem_eof_return=0,
                      uintptr_t bio_free=0, uintptr_t bio_new_mem_buf=0):
    """Addresses of cryptography's bundled OpenSSL functions (engine/ssl_bridge.py finds them).
    The memory BIO ones are optional: without them (0) connections adopted afterwards keep the
    socket BIO (one syscall per TLS record instead of one per batch)."""
    tls_set_functions(ssl_read, ssl_write, ssl_get_error, ssl_shutdown, err_clear_error,
                      err_get_error, err_reason_string)
    tls_set_bio_functions(bio_new, bio_s_mem, bio_read, ssl_set_bio, bio_set_mem_eof_return, bio_free,
                          bio_new_mem_buf)


def malloc_trim(size_t pad=0):
    """glibc's `malloc_trim(pad)`: 1 when memory was handed back, 0 when none could be, -1 when the
    C library has no malloc_trim.  Here so that limits.py needs no ctypes in the native engine's
    processes (ctypes costs ~0.3 MiB of idle RSS)."""
    return zt_malloc_trim(pad)


cdef class Core:
    """N worker threads plus the event queue the event loop drains (`event_fd`, `poll()`)."""

    cdef EventQ evq
    cdef Worker *workers
    cdef int nworkers
    cdef bint evq_ready
    cdef bint stopped
    cdef FlowTable flows
    cdef bint flows_ready
    cdef InFlowTable inflows
    cdef bint inflows_ready
    cdef uint32_t polled_deferrable  # deferrable events in the last poll()

    def __cinit__(self):
        self.flows_ready = False
        self.inflows_ready = False
        self.workers = NULL
        self.nworkers = 0
        self.evq_ready = False
        self.stopped = True

    def __init__(self, int nworkers):
        cdef int i, err
        if nworkers < 1 or nworkers > MAX_WORKERS:
            raise ValueError(f"worker threads must be 1..{MAX_WORKERS}, not {nworkers}")
        memset(&self.evq, 0, sizeof(EventQ))
        pthread_mutex_init(&self.evq.lock, NULL)
        self.evq.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.evq.efd < 0:
            raise OSError(errno, "eventfd failed")
        self.evq_ready = True
        if flow_table_init(&self.flows, nworkers) != 0:
            raise MemoryError()
        self.flows_ready = True
        if inflow_table_init(&self.inflows) != 0:
            raise MemoryError()
        self.inflows_ready = True
        self.workers = <Worker *>calloc(nworkers, sizeof(Worker))
        if self.workers == NULL:
            raise MemoryError()
        self.stopped = False
        for i in range(nworkers):
            err = worker_init(&self.workers[i], i, &self.evq)
            self.nworkers = i + 1
            self.workers[i].flows = &self.flows
            self.workers[i].inflows = &self.inflows
            self.workers[i].all_workers = self.workers
            self.workers[i].nworkers = nworkers
            if err == 0:
                err = pthread_create(&self.workers[i].tid, NULL, worker_main, &self.workers[i])
                if err == 0:
                    self.workers[i].started = True
            if err:
                self.stop()
                raise OSError(err, "cannot start native worker thread")

    @property
    def workers_count(self):
        return self.nworkers

    @property
    def event_fd(self):
        return self.evq.efd

    @property
    def events_emitted(self):
        """Events ever queued for the event loop (tests: no per-chunk events)."""
        return self.evq.emitted

    def poll(self):
        """Every queued event, oldest first, as tuples
        (kind, id, token, sid, code, flags, err, a, b, data); EV_HEADERS data is the decoded
        [(name, value), ...]."""
        cdef Event *e
        cdef Event *nxt
        cdef list out = []
        if not self.evq_ready:
            return out
        e = evq_take_all(&self.evq, &self.polled_deferrable)
        while e != NULL:
            nxt = e.next
            out.append(event_tuple(e))
            event_free(e)
            e = nxt
        return out

    @property
    def polled_deferrable(self):
        """How many events of the last poll() were deferrable (a fast-path tunnel's opening,
        status or end, a hot class): the event loop batches completions while they come."""
        return self.polled_deferrable

    @property
    def events_held(self):
        """True: a deferrable event queues without waking the event loop (completion batching;
        its timer polls).  Every other event still wakes it, and its poll takes all."""
        return self.evq.held

    @events_held.setter
    def events_held(self, bint held):
        pthread_mutex_lock(&self.evq.lock)
        self.evq.held = held
        pthread_mutex_unlock(&self.evq.lock)

    def inject_event(self, int kind, uint64_t id=0, uint64_t token=0, uint32_t sid=0):
        """Queue an event as a worker does, wake-up rules included (tests and bench tools only:
        what the queue does with each kind, without a worker producing it)."""
        cdef Event *e
        if not self.evq_ready:
            raise RuntimeError("native engine stopped")
        e = event_new(kind, id)
        if e == NULL:
            raise MemoryError()
        e.token = token
        e.sid = sid
        evq_push(&self.evq, e)
        evq_wake(&self.evq)

    cdef Worker *_worker(self, int index) except NULL:
        if self.stopped:
            raise RuntimeError("native engine stopped")
        return &self.workers[index % self.nworkers]

    cdef Cmd *_cmd(self, int kind, uint64_t id) except NULL:
        cdef Cmd *c = <Cmd *>calloc(1, sizeof(Cmd))
        if c == NULL:
            raise MemoryError()
        c.kind = kind
        c.id = id
        c.fd = -1
        c.fd2 = -1
        return c

    cdef int _data(self, Cmd *c, bytes data) except -1:
        cdef Py_ssize_t n = len(data)
        if n:
            c.data = <char *>malloc(n)
            if c.data == NULL:
                free(c)
                raise MemoryError()
            memcpy(c.data, <const char *>data, n)
            c.len = n
        return 0

    def splice(self, int worker, uint64_t token, int fd_a, int fd_b):
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_SPLICE, token)
        c.token = token
        c.fd = fd_a
        c.fd2 = fd_b
        worker_post(w, c)

    def splice_cancel(self, int worker, uint64_t token):
        cdef Worker *w = self._worker(worker)
        worker_post(w, self._cmd(CMD_SPLICE_CANCEL, token))

    def adopt(self, int worker, uint64_t conn_id, int fd, uintptr_t ssl, bint client, tuple settings):
        """Hand a handshaken TLS connection to a worker.  settings: CS_* values in order."""
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_ADOPT, conn_id)
        cdef int i
        c.fd = fd
        c.ssl = <void *>ssl
        c.flags = 1 if client else 0
        for i in range(min(len(settings), 8)):
            c.settings[i] = settings[i]
        worker_post(w, c)

    def open_stream(self, int worker, uint64_t conn_id, uint32_t sid, bytes block, uint64_t token=0):
        """sid 0: the worker picks the stream's id and says it in EV_STREAM_ID with `token`."""
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_OPEN, conn_id)
        c.sid = sid
        c.token = token
        self._data(c, block)
        worker_post(w, c)

    def respond(self, int worker, uint64_t conn_id, uint32_t sid, bytes block, bint end):
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_RESPOND, conn_id)
        c.sid = sid
        c.flags = 1 if end else 0
        self._data(c, block)
        worker_post(w, c)

    def attach(self, int worker, uint64_t conn_id, uint32_t sid, int fd, uint64_t token):
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_ATTACH, conn_id)
        c.sid = sid
        c.fd = fd
        c.token = token
        worker_post(w, c)

    def reset(self, int worker, uint64_t conn_id, uint32_t sid, int code):
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_RESET, conn_id)
        c.sid = sid
        c.code = code
        worker_post(w, c)

    def goaway(self, int worker, uint64_t conn_id, int code):
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_GOAWAY, conn_id)
        c.code = code
        worker_post(w, c)

    def close_conn(self, int worker, uint64_t conn_id, bint graceful):
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_CLOSE, conn_id)
        c.flags = 1 if graceful else 0
        worker_post(w, c)

    def conn_error(self, int worker, uint64_t conn_id, int code, bytes reason):
        """A connection error the event loop found (HPACK, header rules): GOAWAY code, close."""
        cdef Worker *w = self._worker(worker)
        cdef Cmd *c = self._cmd(CMD_ERROR, conn_id)
        c.code = code
        self._data(c, reason)
        worker_post(w, c)

    # -- the outbound fast path (_splice_flow.pxi, _splice_accept.pxi) --------------------------
    def listen(self, int fd, tuple keepalive, uint32_t lid=1):
        """Every worker accepts on (its own dup of) the listening socket `fd` from now on, as
        listener `lid` (> 0: the flow classes' key and EV_ACCEPTED's sid).
        keepalive: (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) for the accepted sockets."""
        cdef int i, dfd
        cdef Cmd *c
        for i in range(self.nworkers):
            dfd = dup(fd)
            if dfd < 0:
                raise OSError(errno, "dup of the listening socket failed")
            c = self._cmd(CMD_LISTEN, 0)
            c.fd = dfd
            c.sid = lid
            c.settings[0] = keepalive[0]
            c.settings[1] = keepalive[1]
            c.settings[2] = keepalive[2]
            worker_post(self._worker(i), c)

    def unlisten(self, uint32_t lid=0):
        """The workers stop accepting on listener `lid` (0: every listener; each closes its own
        dup).  Asynchronous: shut the socket down (SHUT_RD) to stop the kernel listening at once."""
        cdef int i
        cdef Cmd *c
        for i in range(self.nworkers):
            c = self._cmd(CMD_UNLISTEN, 0)
            c.sid = lid
            worker_post(self._worker(i), c)

    def fast_enable(self, int worker, uint64_t conn_id, int max_streams):
        """Let the fast path open up to `max_streams` streams on this client connection (0: none).
        The event loop never opens streams on it itself (stream ids are the worker's then)."""
        cdef Cmd *c = self._cmd(CMD_FAST_ENABLE, conn_id)
        c.code = max_streams
        worker_post(self._worker(worker), c)

    def flow_install(self, bytes src, bytes dst, uint32_t port, uint64_t conn_id, int worker,
                     uint64_t flow_id, bytes prefix, bytes fwd_host, bytes suffix, uint32_t lid=1,
                     tuple worker_conns=()):
        """Install (or replace) the decision for flows src -> dst:port accepted on listener `lid`;
        src, dst: 16 bytes, IPv6 or IPv4-mapped IPv4 (proxy/flowcache.addr16).  conn_id (owned by
        `worker`) carries the class; worker_conns: (worker, connection id) pairs of the other
        connections of its pool key a worker owns, on which that worker opens the class's streams
        itself."""
        cdef FlowEntry *e
        cdef FlowEntry **pp
        cdef size_t b
        cdef int i
        if len(src) != 16 or len(dst) != 16:
            raise ValueError("flow addresses are 16 bytes (IPv6, or IPv4-mapped IPv4)")
        e = <FlowEntry *>calloc(1, sizeof(FlowEntry))
        if e == NULL:
            raise MemoryError()
        e.worker_conn = <uint64_t *>calloc(self.nworkers, sizeof(uint64_t))
        e.handovers = <uint32_t *>calloc(self.nworkers, sizeof(uint32_t))
        if e.worker_conn == NULL or e.handovers == NULL:
            flow_entry_free(e)
            raise MemoryError()
        for pair in worker_conns:
            i = pair[0]
            if 0 <= i < self.nworkers and pair[1]:
                e.worker_conn[i] = pair[1]
        e.lid = lid
        memcpy(e.src, <const char *>src, 16)
        memcpy(e.dst, <const char *>dst, 16)
        e.port = port
        e.conn_id = conn_id
        e.worker = worker % self.nworkers
        e.worker_conn[e.worker] = conn_id
        e.flow_id = flow_id
        e.prefix = _dup_bytes(prefix, &e.prefix_len)
        e.fwd_host = _dup_bytes(fwd_host, &e.fwd_host_len)
        e.suffix = _dup_bytes(suffix, &e.suffix_len)
        b = flow_bucket(lid, e.src, e.dst, port)
        pthread_mutex_lock(&self.flows.lock)
        pp = &self.flows.buckets[b]
        while pp[0] != NULL:
            if pp[0].lid == lid and pp[0].port == port and memcmp(pp[0].src, e.src, 16) == 0 \
                    and memcmp(pp[0].dst, e.dst, 16) == 0:
                e.next = pp[0].next
                flow_entry_free(pp[0])
                pp[0] = e
                break
            pp = &pp[0].next
        else:
            e.next = self.flows.buckets[b]
            self.flows.buckets[b] = e
            self.flows.count += 1
        pthread_mutex_unlock(&self.flows.lock)

    def flow_flush(self, uint64_t conn_id=0):
        """Forget every installed decision (conn_id 0: a state or policy change), or those riding
        one connection.  A lookup after this returns has no old entry to find."""
        with nogil:
            pthread_mutex_lock(&self.flows.lock)
            flow_table_clear(&self.flows, conn_id)
            if conn_id == 0:
                self.flows.gen += 1
            pthread_mutex_unlock(&self.flows.lock)

    def flow_flush_listener(self, uint32_t lid):
        """Forget the decisions of listener `lid` (its pod is going).  A lookup after this returns
        has no entry of it to find."""
        with nogil:
            pthread_mutex_lock(&self.flows.lock)
            flow_table_clear_listener(&self.flows, lid)
            pthread_mutex_unlock(&self.flows.lock)

    @property
    def flow_handover_rate(self):
        """Handovers per second of one flow class by one worker (to the worker that owns the
        class's connection) at which that worker asks for a connection of its own (EV_FLOW_HOT;
        0: never)."""
        return self.flows.handover_rate

    @flow_handover_rate.setter
    def flow_handover_rate(self, uint32_t rate):
        self.flows.handover_rate = rate

    @property
    def flow_stats(self):
        """(entries, connections carried by the workers, handed to the event loop, flushes)."""
        return (self.flows.count, self.flows.hits, self.flows.misses, self.flows.gen)

    # -- the inbound fast path (_splice_inflow.pxi) ---------------------------------------------
    def inflow_install(self, uint64_t conn_id, bytes authority, uint64_t flow_id, bytes app_ip,
                       uint32_t app_port, bytes source_ip, int mark, double timeout, tuple keepalive,
                       int netns_fd=-1, uint64_t scope_id=0):
        """Install (or replace) the allow verdict for CONNECTs to `authority` (the exact :authority
        text) on inbound connection `conn_id`: dial app_ip:app_port (packed: 4 bytes IPv4, 16
        IPv6) from source_ip (packed, the same family; b"": our own address) with SO_MARK `mark`,
        within `timeout` seconds.  In-pod: the upstream socket is created inside the network
        namespace `netns_fd` (the caller keeps it open until `inflow_flush_scope(scope_id)`
        returned; -1: the workers' own)."""
        cdef InFlowEntry *e
        cdef InFlowEntry **pp
        cdef size_t b
        if len(authority) == 0 or len(authority) > INFLOW_AUTHORITY_MAX:
            raise ValueError("authority too long for the inbound flow cache")
        if len(app_ip) not in (4, 16) or len(source_ip) not in (0, len(app_ip)):
            raise ValueError("the upstream is 4 or 16 bytes, the source none or of its family")
        if netns_fd >= 0 and (self.inflows.home_fd < 0 or scope_id == 0):
            raise ValueError("a pod's verdict needs the workers' own namespace and the pod's scope id")
        e = <InFlowEntry *>calloc(1, sizeof(InFlowEntry))
        if e == NULL:
            raise MemoryError()
        e.conn_id = conn_id
        memcpy(e.authority, <const char *>authority, len(authority))
        e.authority_len = len(authority)
        e.flow_id = flow_id
        e.app_family = AF_INET if len(app_ip) == 4 else AF_INET6
        memcpy(e.app_ip, <const char *>app_ip, len(app_ip))
        e.app_port = app_port
        e.has_source = len(source_ip) != 0
        if e.has_source:
            memcpy(e.source_ip, <const char *>source_ip, len(source_ip))
        e.mark = mark
        e.timeout_ns = <int64_t>(timeout * NS)
        e.keepalive[0] = keepalive[0]
        e.keepalive[1] = keepalive[1]
        e.keepalive[2] = keepalive[2]
        e.netns_fd = netns_fd
        e.scope_id = scope_id
        b = inflow_bucket(conn_id, e.authority, e.authority_len)
        pthread_mutex_lock(&self.inflows.lock)
        pp = &self.inflows.buckets[b]
        while pp[0] != NULL:
            if pp[0].conn_id == conn_id and pp[0].authority_len == e.authority_len \
                    and memcmp(pp[0].authority, e.authority, e.authority_len) == 0:
                e.next = pp[0].next
                free(pp[0])
                pp[0] = e
                break
            pp = &pp[0].next
        else:
            e.next = self.inflows.buckets[b]
            self.inflows.buckets[b] = e
            self.inflows.count += 1
        pthread_mutex_unlock(&self.inflows.lock)

    def inflow_flush(self, uint64_t conn_id=0):
        """Forget every inbound verdict (conn_id 0: a state or policy change; the generation moves,
        so no dial looked up before it opens a tunnel), or those of one connection."""
        with nogil:
            pthread_mutex_lock(&self.inflows.lock)
            inflow_table_clear(&self.inflows, conn_id)
            if conn_id == 0:
                self.inflows.gen += 1
            pthread_mutex_unlock(&self.inflows.lock)

    def inflow_flush_scope(self, uint64_t scope_id):
        """Forget the verdicts of one pod (its removal), and move the generation: once this
        returns, no worker uses the pod's namespace fd (sockets are created under the lock) and no
        dial looked up before opens a tunnel (it is handed back to the event loop)."""
        if scope_id == 0:
            raise ValueError("scope 0 is the node's")
        with nogil:
            pthread_mutex_lock(&self.inflows.lock)
            inflow_table_clear(&self.inflows, 0, scope_id)
            self.inflows.gen += 1
            pthread_mutex_unlock(&self.inflows.lock)

    @property
    def inflow_netns_errors(self):
        """Hits handed back because the pod's upstream socket could not be created in its namespace."""
        return self.inflows.netns_errors

    @property
    def inflow_stats(self):
        """(entries, CONNECTs the workers answered, dials handed back to the event loop, flushes)."""
        return (self.inflows.count, self.inflows.hits, self.inflows.handed, self.inflows.gen)

    def stop(self):
        """Stop every worker (their connections and splices end, with events) and join them."""
        cdef int i
        cdef Cmd *c
        if self.stopped:
            return
        self.stopped = True
        for i in range(self.nworkers):
            if self.workers[i].started:
                c = <Cmd *>calloc(1, sizeof(Cmd))
                if c != NULL:
                    c.kind = CMD_STOP
                    worker_post(&self.workers[i], c)
        for i in range(self.nworkers):
            if self.workers[i].started:
                with nogil:
                    pthread_join(self.workers[i].tid, NULL)
                self.workers[i].started = False

    def __dealloc__(self):
        cdef int i
        cdef Event *e
        cdef Event *nxt
        self.stop()
        if self.workers != NULL:
            for i in range(self.nworkers):
                worker_destroy(&self.workers[i])
            free(self.workers)
            self.workers = NULL
        if self.flows_ready:
            flow_table_destroy(&self.flows)
            self.flows_ready = False
        if self.inflows_ready:
            inflow_table_destroy(&self.inflows)
            self.inflows_ready = False
        if self.evq_ready:
            e = evq_take_all(&self.evq, &self.polled_deferrable)
            while e != NULL:
                nxt = e.next
                event_free(e)
                e = nxt
            close(self.evq.efd)
            pthread_mutex_destroy(&self.evq.lock)
            self.evq_ready = False


cdef char *_dup_bytes(bytes data, size_t *n) except? NULL:
    cdef Py_ssize_t k = len(data)
    cdef char *p
    n[0] = 0
    if k == 0:
        return NULL
    p = <char *>malloc(k)
    if p == NULL:
        raise MemoryError()
    memcpy(p, <const char *>data, k)
    n[0] = k
    return p


DEFAULT_SETTINGS = (4 << 20, 16 << 20, 1 << 20, 200, 64 << 10, 0, 0)


cdef class FrameParser:
    """One HTTP/2 connection of the engine without socket or TLS (sans-IO), for tests and fuzzing:
    `feed(bytes)`, then `output()` (bytes we would send) and `events()` (what the event loop
    would hear).  The same C code as on a worker, minus the I/O."""

    cdef Conn *c
    cdef EventQ evq

    def __cinit__(self):
        self.c = NULL
        memset(&self.evq, 0, sizeof(EventQ))
        pthread_mutex_init(&self.evq.lock, NULL)
        self.evq.efd = -1

    def __init__(self, bint client=False, tuple settings=DEFAULT_SETTINGS):
        cdef int64_t s[8]
        cdef int i
        memset(s, 0, sizeof(s))
        for i in range(min(len(settings), 8)):
            s[i] = settings[i]
        self.c = <Conn *>calloc(1, sizeof(Conn))
        if self.c == NULL or conn_init(self.c, 1, client, s, &self.evq) != 0:
            raise MemoryError()
        self.c.flags |= CF_SANS_IO
        if conn_start(self.c) != 0:
            raise MemoryError()

    def feed(self, bytes data):
        if self.c.state >= CST_LINGER:
            return
        if buf_append(&self.c.rbuf, <const char *>data, len(data)) != 0:
            raise MemoryError()
        with nogil:
            conn_parse(self.c)
        self._reap()

    cdef void _reap(self):
        cdef Stream *s
        while self.c.grave != NULL:
            s = self.c.grave
            self.c.grave = s.gnext
            stream_free(s)

    def output(self):
        """Bytes queued for the peer since the last call."""
        cdef bytes out = self.c.obuf.data[self.c.obuf.start:self.c.obuf.end] if buf_len(&self.c.obuf) else b""
        self.c.obuf.start = 0
        self.c.obuf.end = 0
        return out

    def events(self):
        cdef uint32_t deferrable
        cdef Event *e = evq_take_all(&self.evq, &deferrable)
        cdef Event *nxt
        cdef list out = []
        while e != NULL:
            nxt = e.next
            out.append(event_tuple(e))
            event_free(e)
            e = nxt
        return out

    def _command(self, int kind, uint32_t sid=0, int code=0, int flags=0, bytes data=b"", uint64_t token=0):
        cdef Cmd cmd
        memset(&cmd, 0, sizeof(Cmd))
        cmd.kind = kind
        cmd.id = 1
        cmd.sid = sid
        cmd.token = token
        cmd.code = code
        cmd.flags = flags
        cmd.fd = -1
        cmd.data = <char *>data
        cmd.len = len(data)
        conn_command(self.c, &cmd)
        self._reap()

    def open_stream(self, uint32_t sid, bytes block, uint64_t token=0):
        self._command(CMD_OPEN, sid, data=block, token=token)

    def respond(self, uint32_t sid, bytes block, bint end=False):
        self._command(CMD_RESPOND, sid, flags=1 if end else 0, data=block)

    def reset(self, uint32_t sid, int code=H2_CANCEL):
        self._command(CMD_RESET, sid, code=code)

    def goaway(self, int code=H2_NO_ERROR):
        self._command(CMD_GOAWAY, code=code)

    @property
    def state(self):
        return ("preface", "settings", "open", "linger", "closed")[self.c.state]

    @property
    def streams(self):
        return self.c.nstreams

    @property
    def frames_in(self):
        return self.c.frames_in

    @property
    def buffered(self):
        """Payload bytes held for streams with no plain socket (bounded by the stream windows)."""
        cdef size_t total = 0
        cdef Stream *s = self.c.s_head
        while s != NULL:
            total += s.rq.bytes
            s = s.anext
        return total

    @property
    def windows(self):
        """(connection send window, connection receive window, peer max frame size)."""
        return (self.c.send_window, self.c.recv_window, self.c.peer_max_frame)

    def __dealloc__(self):
        cdef Event *e
        cdef Event *nxt
        cdef uint32_t deferrable
        if self.c != NULL:
            conn_free(self.c)
            self.c = NULL
        e = evq_take_all(&self.evq, &deferrable)
        while e != NULL:
            nxt = e.next
            event_free(e)
            e = nxt
        pthread_mutex_destroy(&self.evq.lock)
