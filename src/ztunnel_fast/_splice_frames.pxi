# _splice piece: HTTP/2 wire constants (RFC 9113) and the frame writers.  Writers append whole
# frames to a connection's output buffer (Buf); they never do I/O.  A failed allocation returns -1
# and the caller ends the connection.

cdef enum:
    FT_DATA = 0
    FT_HEADERS = 1
    FT_PRIORITY = 2
    FT_RST_STREAM = 3
    FT_SETTINGS = 4
    FT_PUSH_PROMISE = 5
    FT_PING = 6
    FT_GOAWAY = 7
    FT_WINDOW_UPDATE = 8
    FT_CONTINUATION = 9

cdef enum:
    FL_END_STREAM = 0x1
    FL_ACK = 0x1
    FL_END_HEADERS = 0x4
    FL_PADDED = 0x8
    FL_PRIORITY = 0x20

cdef enum:
    H2_NO_ERROR = 0x0
    H2_PROTOCOL_ERROR = 0x1
    H2_INTERNAL_ERROR = 0x2
    H2_FLOW_CONTROL_ERROR = 0x3
    H2_SETTINGS_TIMEOUT = 0x4
    H2_STREAM_CLOSED = 0x5
    H2_FRAME_SIZE_ERROR = 0x6
    H2_REFUSED_STREAM = 0x7
    H2_CANCEL = 0x8
    H2_COMPRESSION_ERROR = 0x9
    H2_CONNECT_ERROR = 0xa
    H2_ENHANCE_YOUR_CALM = 0xb

cdef enum:
    SET_HEADER_TABLE_SIZE = 1
    SET_ENABLE_PUSH = 2
    SET_MAX_CONCURRENT_STREAMS = 3
    SET_INITIAL_WINDOW_SIZE = 4
    SET_MAX_FRAME_SIZE = 5
    SET_MAX_HEADER_LIST_SIZE = 6

DEF FRAME_HEADER = 9
DEF MAX_WINDOW = 0x7fffffff          # 2^31 - 1: the largest flow-control window (RFC 9113 6.9.1)
DEF MIN_MAX_FRAME = 16384            # SETTINGS_MAX_FRAME_SIZE bounds (RFC 9113 6.5.2)
DEF MAX_MAX_FRAME = 16777215
DEF DEFAULT_WINDOW = 65535

cdef const char *PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEF PREFACE_LEN = 24


cdef inline void put_u32(char *p, uint32_t v) noexcept nogil:
    p[0] = <char>((v >> 24) & 0xff)
    p[1] = <char>((v >> 16) & 0xff)
    p[2] = <char>((v >> 8) & 0xff)
    p[3] = <char>(v & 0xff)


cdef inline uint32_t get_u32(const char *p) noexcept nogil:
    cdef const uint8_t *u = <const uint8_t *>p
    return (<uint32_t>u[0] << 24) | (<uint32_t>u[1] << 16) | (<uint32_t>u[2] << 8) | u[3]


cdef inline void put_frame_header(char *p, size_t length, int ftype, int flags, uint32_t sid) noexcept nogil:
    p[0] = <char>((length >> 16) & 0xff)
    p[1] = <char>((length >> 8) & 0xff)
    p[2] = <char>(length & 0xff)
    p[3] = <char>ftype
    p[4] = <char>flags
    put_u32(p + 5, sid & 0x7fffffff)


cdef int out_frame(Buf *o, int ftype, int flags, uint32_t sid, const char *payload, size_t n) noexcept nogil:
    if buf_reserve(o, FRAME_HEADER + n) != 0:
        return -1
    put_frame_header(o.data + o.end, n, ftype, flags, sid)
    if n:
        memcpy(o.data + o.end + FRAME_HEADER, payload, n)
    o.end += FRAME_HEADER + n
    return 0


cdef int out_u32_frame(Buf *o, int ftype, uint32_t sid, uint32_t value) noexcept nogil:
    cdef char p[4]
    put_u32(p, value)
    return out_frame(o, ftype, 0, sid, p, 4)


cdef inline int out_window_update(Buf *o, uint32_t sid, uint32_t increment) noexcept nogil:
    return out_u32_frame(o, FT_WINDOW_UPDATE, sid, increment & 0x7fffffff)


cdef inline int out_rst_stream(Buf *o, uint32_t sid, uint32_t code) noexcept nogil:
    return out_u32_frame(o, FT_RST_STREAM, sid, code)


cdef inline int out_ping(Buf *o, int flags, const char *opaque) noexcept nogil:
    return out_frame(o, FT_PING, flags, 0, opaque, 8)


cdef int out_goaway(Buf *o, uint32_t last_sid, uint32_t code, const char *debug, size_t n) noexcept nogil:
    cdef char p[8]
    put_u32(p, last_sid & 0x7fffffff)
    put_u32(p + 4, code)
    if buf_reserve(o, FRAME_HEADER + 8 + n) != 0:
        return -1
    put_frame_header(o.data + o.end, 8 + n, FT_GOAWAY, 0, 0)
    memcpy(o.data + o.end + FRAME_HEADER, p, 8)
    if n:
        memcpy(o.data + o.end + FRAME_HEADER + 8, debug, n)
    o.end += FRAME_HEADER + 8 + n
    return 0


cdef int out_settings(Buf *o, bint client, int64_t stream_window, int64_t max_frame,
                      int64_t max_streams, int64_t max_header_list) noexcept nogil:
    """Our SETTINGS (the values of H2Settings): the client disables push, the server announces
    its stream limit."""
    cdef char p[36]
    cdef size_t n = 0
    if client:
        p[n] = 0
        p[n + 1] = SET_ENABLE_PUSH
        put_u32(p + n + 2, 0)
        n += 6
    else:
        p[n] = 0
        p[n + 1] = SET_MAX_CONCURRENT_STREAMS
        put_u32(p + n + 2, <uint32_t>max_streams)
        n += 6
    p[n] = 0
    p[n + 1] = SET_INITIAL_WINDOW_SIZE
    put_u32(p + n + 2, <uint32_t>stream_window)
    n += 6
    p[n] = 0
    p[n + 1] = SET_MAX_FRAME_SIZE
    put_u32(p + n + 2, <uint32_t>max_frame)
    n += 6
    p[n] = 0
    p[n + 1] = SET_MAX_HEADER_LIST_SIZE
    put_u32(p + n + 2, <uint32_t>max_header_list)
    n += 6
    return out_frame(o, FT_SETTINGS, 0, 0, p, n)


cdef int out_headers(Buf *o, uint32_t sid, const char *block, size_t n, bint end_stream,
                     size_t max_frame) noexcept nogil:
    """A header block as HEADERS + CONTINUATION frames of at most the peer's max frame size."""
    cdef size_t first = n if n < max_frame else max_frame
    cdef size_t off, take
    cdef int flags = FL_END_STREAM if end_stream else 0
    if first == n:
        flags |= FL_END_HEADERS
    if out_frame(o, FT_HEADERS, flags, sid, block, first) != 0:
        return -1
    off = first
    while off < n:
        take = n - off if n - off < max_frame else max_frame
        if out_frame(o, FT_CONTINUATION, FL_END_HEADERS if off + take == n else 0, sid, block + off, take) != 0:
            return -1
        off += take
    return 0
