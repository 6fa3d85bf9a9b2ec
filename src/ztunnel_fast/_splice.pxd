# Declarations for the native engine (_splice.pyx and its _splice_*.pxi pieces): the structures the
# worker threads own.  C library declarations live in includes/system.pxd.
#
# Ownership: every Conn, Stream and Splice belongs to exactly one worker thread, which alone reads
# and writes it; the event loop talks to a worker only through its command queue (Cmd) and hears
# back only through the shared event queue (Event).  Structures are freed at the end of a worker
# loop iteration (graveyard), never while an epoll batch may still point at them.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

from .includes.system cimport iovec, pthread_t, pthread_mutex_t
from .includes.nghttp2 cimport nghttp2_hd_inflater


# Handle kinds: what an epoll event's data.ptr points at.
cdef enum:
    H_CMD = 1        # the worker's command eventfd
    H_TLS = 2        # an HBONE connection's TLS socket
    H_PLAIN = 3      # a tunnel's plain socket (an HBONE stream attached to it)
    H_SPLICE_A = 4   # side a of a plain<->plain tunnel
    H_SPLICE_B = 5   # side b
    H_LISTEN = 6     # the outbound listener a worker accepts on itself (fast path, _splice_accept.pxi)


cdef struct FlowTable  # below: the fast path's flow cache
cdef struct Listener  # below: one outbound listener a worker accepts on
cdef struct InFlowTable  # below: the inbound fast path's flow cache


cdef struct Handle:
    int kind
    void *owner


# Growable byte buffer: live bytes are data[start:end].
cdef struct Buf:
    char *data
    size_t start
    size_t end
    size_t cap


# Received payload not yet written to the plain socket; bounded by the stream window we granted.
cdef struct Chunk:
    Chunk *next
    size_t off
    size_t len
    char *data           # points just past the struct (one allocation)


cdef struct ChunkQ:
    Chunk *head
    Chunk *tail
    size_t bytes


# Worker -> event loop.  `data` is malloc'd and owned by the event until Python takes it.
cdef struct Event:
    Event *next
    int kind             # EV_*
    uint64_t id          # connection id, or the token of a splice
    uint64_t token       # tunnel token (EV_STREAM_END of an attached stream), else 0
    uint32_t sid
    int code
    int flags
    int err
    int64_t a
    int64_t b
    char *data
    size_t len


cdef struct EventQ:
    pthread_mutex_t lock
    Event *head
    Event *tail
    int efd              # eventfd the event loop watches; -1: nobody to wake (sans-IO tests)
    bint signalled       # events queued since the event loop last drained (efd written, or owed)
    bint owed            # signalled, efd not written yet: the end of a worker iteration writes it (evq_wake)
    bint held            # the event loop batches completions: a deferrable event queues without a wake-up
    uint32_t deferrable  # deferrable events queued since the last drain (evq_take_all hands the count over)
    uint64_t emitted     # events ever queued (tests assert no per-chunk events)


# Event loop -> worker.
cdef struct Cmd:
    Cmd *next
    int kind             # CMD_*
    uint64_t id          # connection id or splice token
    uint64_t token
    uint32_t sid
    int fd
    int fd2
    int code
    int flags
    void *ssl
    char *data
    size_t len
    int64_t settings[8]  # CS_* indexes


# Common head of what a worker owns and schedules (connections and splices).
cdef struct Obj:
    int kind             # H_TLS (Conn) or H_SPLICE_A (Splice)
    uint64_t id
    Obj *hnext           # id hash chain
    Obj *lnext           # the worker's list of live objects
    Obj *lprev
    Obj *rnext           # run queue
    Obj *gnext           # graveyard
    bint queued
    bint dead


cdef struct Stream:
    Handle h             # the plain socket's epoll handle
    void *conn           # Conn*
    uint32_t id
    uint32_t flags       # SF_*
    int64_t send_window
    int64_t recv_window
    int64_t recv_unacked
    ChunkQ rq
    int fd               # plain socket once attached, else -1
    uint64_t token
    int64_t sent         # plain -> stream payload bytes
    int64_t received     # stream -> plain payload bytes
    int end_kind         # END_*: the first thing that ended the tunnel
    int end_code         # HTTP/2 error code of a reset
    int end_err          # errno of a plain socket failure
    Stream *hnext        # sid hash chain
    Stream *anext        # the connection's list of streams
    Stream *aprev
    Stream *gnext        # graveyard
    int fast_fd          # fast path: the accepted socket waiting for the CONNECT's answer (SF_FAST_PENDING)
    # inbound fast path (_splice_inflow.pxi): the upstream dial of a peer's CONNECT (SF_DIALING)
    int dial_fd          # the socket connecting to the app, -1 when none
    int64_t dial_start   # when the CONNECT arrived (CLOCK_MONOTONIC ns)
    int64_t dial_deadline
    uint64_t dial_gen    # the inbound table's generation the verdict was looked up in
    uint64_t dial_flow   # the event loop's id of that decision
    Buf dial_fields      # the decoded request fields, for EV_INBOUND_OPEN or the hand-over EV_HEADERS


cdef struct Conn:
    Obj o
    Handle h
    void *worker         # Worker*, NULL in sans-IO mode
    EventQ *evq
    int fd
    void *ssl
    bint client
    int state            # CST_*
    uint32_t flags       # CF_*
    Buf rbuf
    Buf obuf
    Buf hblock           # header block being reassembled (HEADERS + CONTINUATION)
    uint32_t hb_sid
    int hb_flags
    int hb_frames
    size_t preface_got
    # a DATA frame whose payload is still arriving
    uint32_t d_sid
    size_t d_left        # payload bytes still to come
    size_t d_pad         # padding bytes after them
    bint d_end           # END_STREAM once the frame is complete
    bint d_need_padlen   # PADDED: the pad length byte has not been read yet
    # our settings (CS_*), then the peer's
    int64_t local_stream_window
    int64_t local_conn_window
    int64_t local_max_frame
    int64_t local_max_streams
    int64_t local_max_header_list
    int64_t peer_initial_window
    int64_t peer_max_frame
    int64_t peer_max_streams
    int64_t send_window
    int64_t recv_window
    int64_t recv_unacked
    uint32_t last_peer_sid
    uint32_t highest_local_sid
    uint32_t goaway_last_sid
    int open_peer_streams
    int nstreams
    Stream **buckets
    Stream *s_head
    Stream *s_tail
    Stream *rr           # where the next fair upload round starts
    Stream *grave
    int64_t reset_ring[128]
    int reset_count
    int reset_pos
    int64_t ctl_window_start     # empty DATA frames counted since (flood limit)
    int64_t ctl_count
    int64_t refused_window_start # streams refused or ignored since (flood limit)
    int64_t refused_count
    int64_t ping_interval_ns
    int64_t ping_timeout_ns
    int64_t next_ping_ns
    int64_t ping_sent_ns
    int64_t linger_deadline
    int64_t frames_in
    int64_t data_frames_in
    int close_err        # errno behind a CLOSE_IO (EV_CLOSED.err)
    # TLS through memory BIOs (added for issue 14; NULL: the socket BIO pyOpenSSL set, unbatched)
    void *rbio           # a read-only view of cin that SSL_read decrypts from (owned by the SSL*)
    void *wbio           # records SSL_write produced, moved to cout (owned by the SSL*)
    Buf cin              # ciphertext of the last recv() (rbio points into it until drained)
    Buf cout             # ciphertext waiting for send(): at most one batch of records
    # stream -> plain payload gathered in one parse pass, written with one sendmsg (issue 14)
    Stream *dl_stream    # the stream dl_iov belongs to (NULL: nothing gathered)
    int dl_count
    size_t dl_bytes
    iovec dl_iov[64]     # DELIVER_IOV pieces of rbuf (valid until rbuf is compacted or refilled)
    nghttp2_hd_inflater *hd_inflater  # the peer's HPACK context (_splice_hpack.pxi), made at its first block
    int64_t fast_max_streams  # fast path: streams the workers may open on it (0: not a fast-path connection)
    int ndialing         # inbound fast path: streams whose upstream dial is in progress (SF_DIALING)


# One direction of a plain<->plain tunnel on a worker.
cdef struct SLeg:
    int src
    int dst
    int pipe_r
    int pipe_w
    size_t pending       # bytes in the pipe (or in buf) not yet written to dst
    size_t capacity
    bint eof
    bint done
    bint src_r           # edge-triggered readiness, cleared on EAGAIN
    bint dst_w
    int64_t moved
    char *buf            # recv/send fallback when splice(2) refuses the socket pair
    size_t boff


cdef struct Splice:
    Obj o
    Handle ha
    Handle hb
    void *worker
    int fa
    int fb
    SLeg ab
    SLeg ba
    int err


cdef struct Worker:
    int index
    pthread_t tid
    bint started
    int epfd
    int cmd_efd
    Handle cmd_h
    pthread_mutex_t lock
    Cmd *cmd_head
    Cmd *cmd_tail
    EventQ *evq
    Obj **objs           # id hash table
    Obj *live
    Obj *run_head
    Obj *run_tail
    Obj *grave
    Stream *sgrave
    bint stopping
    int64_t next_tick
    int64_t nobjs
    # fast path (_splice_accept.pxi, _splice_flow.pxi)
    FlowTable *flows     # the Core's flow cache, shared by every worker
    InFlowTable *inflows # the Core's inbound flow cache, shared by every worker
    Listener *listeners  # this worker's dups of the outbound listeners (one per pod in in-pod mode)
    Listener *dead_listeners  # dropped in this iteration, freed with the grave
    bint listening       # at least one listener
    int keepalive[3]     # TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT for accepted sockets
    uint64_t fast_seq    # fast-path tunnel tokens issued by this worker
    uint64_t rng[2]      # xorshift128+ state (trace ids), seeded from getrandom
    Worker *all_workers  # every worker of the Core (a hit goes to the owner of its connection)
    int nworkers
    bint netns_lost      # could not return to its own network namespace: never dials again (_splice_inflow.pxi)


# One outbound listener a worker accepts on (_splice_accept.pxi): its own dup of the socket and the
# event loop's id for it (node mode: one; in-pod mode: one per pod, the pod's network namespace).
cdef struct Listener:
    Handle h             # kind H_LISTEN, owner: this Listener
    Listener *next
    int fd               # the worker's own dup
    uint32_t lid         # the event loop's listener id (part of every flow class's key)


# The flow cache (_splice_flow.pxi): (listener, source IP, original destination IP:port) -> the decision the
# event loop installed.  A decision is immutable (its connections and hand-over counts change under
# the lock); a lookup copies what it needs under the lock.
cdef struct FlowEntry:
    FlowEntry *next
    uint32_t lid         # the listener the flow was accepted on (in-pod: the pod)
    uint8_t src[16]      # IPv6, or IPv4 as IPv4-mapped (::ffff:a.b.c.d); network byte order
    uint8_t dst[16]      # the original destination, the same form
    uint32_t port
    uint64_t conn_id     # the pooled HBONE connection the class was installed with
    int worker           # the worker that owns it
    uint64_t flow_id     # the event loop's id of the decision (labels, log fields)
    # worker connections: per worker (nworkers long), a pooled connection of the class's pool key
    # that worker owns (0: none), conn_id's owner included; a worker with one opens the class's
    # streams there itself instead of handing them to another worker
    uint64_t *worker_conn
    uint32_t *handovers  # per worker: handovers in the current one-second window
    int64_t window_ns    # when the window began
    uint64_t hot         # bit per worker: EV_FLOW_HOT sent for it (cleared when its connection goes)
    char *prefix         # HPACK: :method, :authority (stateless encoding)
    size_t prefix_len
    char *fwd_host       # ';host=<service>' appended to forwarded, or empty
    size_t fwd_host_len
    char *suffix         # HPACK: fields after traceparent (baggage)
    size_t suffix_len


cdef struct FlowTable:
    pthread_mutex_t lock
    FlowEntry **buckets
    uint64_t gen         # bumped by every flush (state or policy change)
    int64_t count
    int64_t hits         # connections the workers carried (a fast-path tunnel opened)
    int64_t misses       # connections handed to the event loop (EV_ACCEPTED)
    int nworkers         # length of every entry's per-worker arrays
    uint32_t handover_rate  # handovers per second of one class by one worker that make it hot (0: never)


# The inbound flow cache (_splice_inflow.pxi): (inbound HBONE connection, :authority text) -> the
# allow verdict and upstream the event loop decided.  The connection fixes the peer (IP, port,
# identity) and the address it arrived on; the :authority text fixes the destination.  Entries are
# immutable; a lookup copies what it needs under the lock.
cdef struct InFlowEntry:
    InFlowEntry *next
    uint64_t conn_id     # the inbound HBONE connection
    char authority[64]   # INFLOW_AUTHORITY_MAX
    size_t authority_len
    uint64_t flow_id     # the event loop's id of the decision (workload, labels, log fields)
    int app_family       # AF_INET or AF_INET6: the upstream's (and the spoofed source's) family
    uint8_t app_ip[16]   # the upstream: 4 bytes (AF_INET) or 16, network byte order
    uint32_t app_port
    uint8_t source_ip[16]  # bind to it with IP_TRANSPARENT (the peer's address), same family
    bint has_source      # False: no spoofing (our own address)
    int mark             # SO_MARK of the upstream socket, 0: none
    int64_t timeout_ns   # connect timeout
    int keepalive[3]     # TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT
    int netns_fd         # in-pod: the pod's network namespace (the event loop's fd), -1: ours
    uint64_t scope_id    # the event loop's id of the pod (flushed together), 0: the node


cdef struct InFlowTable:
    pthread_mutex_t lock
    InFlowEntry **buckets
    uint64_t gen         # bumped by every flush (state or policy change)
    int64_t count
    int64_t hits         # CONNECTs the workers answered and spliced (EV_INBOUND_OPEN)
    int64_t handed       # hits whose dial the workers handed back to the event loop
    int64_t netns_errors # hits handed back because a worker could not enter the pod's namespace
    int home_fd          # the workers' own network namespace (opened at Core init), -1: none
