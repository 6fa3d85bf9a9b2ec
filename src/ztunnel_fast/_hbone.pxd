# Declarations for the native HBONE engine (_hbone.pyx): the structures the worker threads own.
# C library declarations live in includes/system.pxd.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

from .includes.system cimport pthread_t, pthread_mutex_t


# Handle kinds: what an epoll event's data.ptr points at.
cdef enum:
    H_CMD = 1        # the worker's command eventfd
    H_TLS = 2        # an HBONE connection's TLS socket
    H_PLAIN = 3      # a tunnel's plain socket (an HBONE stream attached to it)
    H_SPLICE = 4     # one side of a plain<->plain tunnel


cdef struct Handle:
    int kind
    int side             # splice: 0 = fd a, 1 = fd b
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
    int kind
    uint64_t id          # connection id, or tunnel id for completions
    uint32_t sid
    int code
    int flags
    int64_t a
    int64_t b
    char *data
    size_t len


cdef struct EventQ:
    pthread_mutex_t lock
    Event *head
    Event *tail
    int efd              # eventfd the event loop watches; -1: nobody to wake (sans-IO tests)
    uint64_t emitted     # events ever queued (tests assert no per-chunk events)


# Event loop -> worker.
cdef struct Cmd:
    Cmd *next
    int kind
    uint64_t id          # connection or splice id
    uint32_t sid
    int fd
    int fd2
    int code
    int flags
    uint64_t tunnel
    void *ssl
    char *data
    size_t len
    int64_t settings[8]  # CS_* indexes


# Common head of the objects a worker owns and can schedule (connections and splices).
cdef struct Obj:
    int kind             # H_TLS (Conn) or H_SPLICE (Splice)
    uint64_t id
    Obj *hnext           # id hash chain
    Obj *rnext           # run queue
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
    uint64_t tunnel
    int64_t sent         # plain -> stream payload bytes
    int64_t received     # stream -> plain payload bytes
    int err_kind         # TE_*: the first thing that went wrong
    int err_code         # errno or HTTP/2 error code
    Stream *hnext
    Stream *anext        # attached list
    Stream *aprev
    Stream *gnext        # graveyard
    bint dead


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
    int hb_kind
    int hb_end_stream
    int hb_frames
    size_t preface_got
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
    int nattached
    Stream **buckets
    Stream *att_head
    Stream *att_tail
    Stream *rr
    uint32_t recent_reset[16]
    int recent_pos
    int64_t reset_ring[128]
    int reset_count
    int reset_pos
    int64_t flood_window_start
    int64_t flood_count
    int64_t ping_interval_ns
    int64_t ping_timeout_ns
    int64_t next_ping_ns
    int64_t ping_sent_ns
    int64_t linger_deadline
    int close_kind
    char close_msg[200]
    int64_t frames_in
    int64_t data_frames_in


# One direction of a plain<->plain tunnel on a worker.
cdef struct SLeg:
    int src
    int dst
    int pipe_r
    int pipe_w
    size_t pending
    size_t capacity
    bint eof
    bint done
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
    uint32_t ready       # SR_* readiness bits
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
    Obj **objs
    Obj *run_head
    Obj *run_tail
    Obj *grave
    Stream *grave_streams
    bint stopping
    int64_t next_tick
    int64_t nconns
