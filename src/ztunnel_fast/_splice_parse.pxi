# _splice piece: the HTTP/2 frame parser (RFC 9113), sans-IO: bytes in c.rbuf, frames out to
# c.obuf, events to c.evq, payload to streams.
#
# Invariants: a frame longer than our SETTINGS_MAX_FRAME_SIZE is refused from its 9-byte header
# (FRAME_SIZE_ERROR), so at most one max-size frame is ever buffered; DATA payload is passed on as
# it arrives (never buffered whole); every header block, even one for a stream we ignore, is
# decoded in frame order (HPACK state must follow every block) and reaches the event loop as
# fields; any violation ends the connection through conn_error with its RFC code, never the process.

from libc.stdio cimport snprintf

DEF HBLOCK_FRAMES_MAX = 1024         # CONTINUATION frames per header block (CONTINUATION flood)


cdef inline bint sid_is_peer(Conn *c, uint32_t sid) noexcept nogil:
    return (sid & 1) == (0 if c.client else 1)


cdef inline bint sid_idle(Conn *c, uint32_t sid) noexcept nogil:
    """Neither side has used this stream id yet."""
    if sid_is_peer(c, sid):
        return sid > c.last_peer_sid
    return sid > c.highest_local_sid


cdef void stream_remote_end(Conn *c, Stream *s) noexcept nogil:
    s.flags |= SF_REMOTE_END
    if s.flags & SF_ATTACHED:
        stream_flush_plain(c, s)
    stream_maybe_done(c, s)


cdef bint refused_flood(Conn *c) noexcept nogil:
    cdef int64_t now = now_ns()
    if now - c.refused_window_start > REFUSED_STREAM_WINDOW_S * <int64_t>NS:
        c.refused_window_start = now
        c.refused_count = 0
    c.refused_count += 1
    return c.refused_count > REFUSED_STREAM_LIMIT


cdef int emit_headers(Conn *c, uint32_t sid, int hflags) noexcept nogil:
    """Decode the block (HPACK state follows every block, in frame order) and pass its fields on.
    Returns 0, or -1 when that ended the connection (COMPRESSION_ERROR, out of memory)."""
    cdef Buf fields
    cdef char why[200]
    cdef int rc
    cdef Event *e
    cdef Stream *s
    memset(&fields, 0, sizeof(Buf))
    rc = hpack_decode(c, c.hblock.data + c.hblock.start, buf_len(&c.hblock), &fields, why, sizeof(why))
    if rc != 0:
        buf_free(&fields)
        if rc == -2:
            conn_error(c, H2_INTERNAL_ERROR, "out of memory")
        else:
            conn_error(c, H2_COMPRESSION_ERROR, why)
        return -1
    if hflags & HF_RESPONSE:
        s = stream_find(c, sid)
        if s != NULL and s.flags & SF_FAST_PENDING:
            flow_response(c, s, fields_status(fields.data, fields.end))
            buf_free(&fields)
            return 0
    if hflags == 0 and not c.client and inflow_start(c, sid, &fields):
        return 0  # a cached verdict: the worker dials (EV_INBOUND_OPEN, or these fields handed over)
    e = event_new(EV_HEADERS, c.o.id)
    if e == NULL:
        buf_free(&fields)
        return 0
    e.sid = sid
    e.flags = hflags
    e.data = fields.data  # the event owns it now (event_free frees it)
    e.len = fields.end
    evq_push(c.evq, e)
    return 0


cdef void headers_complete(Conn *c) noexcept nogil:
    cdef uint32_t sid = c.hb_sid
    cdef bint end = c.hb_flags & FL_END_STREAM
    cdef Stream *s = stream_find(c, sid)
    cdef int ef = HF_END_STREAM if end else 0
    c.hb_sid = 0
    if s != NULL:
        if c.client and not s.flags & SF_RESPONDED:
            s.flags |= SF_RESPONDED
            if emit_headers(c, sid, ef | HF_RESPONSE) != 0:
                return
        elif s.flags & SF_REMOTE_END:
            if emit_headers(c, sid, HF_IGNORED) != 0:
                return
            stream_reset(c, s, H2_STREAM_CLOSED, END_PROTOCOL, 0)
        elif not end:
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: trailers without END_STREAM")
            return
        else:
            if emit_headers(c, sid, ef | HF_TRAILERS) != 0:
                return
        if end and not s.flags & SF_DEAD:
            stream_remote_end(c, s)
    elif not sid_is_peer(c, sid):
        # a stream id we own: the server never opens any; a client's closed stream is ignored
        if not c.client or sid_idle(c, sid):
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: HEADERS on a stream id it may not open")
            return
        if emit_headers(c, sid, HF_IGNORED) != 0:
            return
    elif c.client:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: server opened a stream (push is disabled)")
        return
    elif sid <= c.last_peer_sid:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: HEADERS on a closed or lower stream id")
        return
    else:
        c.last_peer_sid = sid
        if (c.flags & CF_GOAWAY_SENT and sid > c.goaway_last_sid) or c.open_peer_streams >= c.local_max_streams:
            if emit_headers(c, sid, HF_IGNORED) != 0:  # the block is still decoded: HPACK state follows
                return
            if not c.flags & CF_GOAWAY_SENT:
                out_rst_stream(&c.obuf, sid, H2_REFUSED_STREAM)
            # else: after our GOAWAY the stream is ignored (RFC 9113 6.8)
            if refused_flood(c):
                conn_error(c, H2_ENHANCE_YOUR_CALM, "peer kept opening streams beyond the limit")
                return
        else:
            s = stream_new(c, sid, SF_PEER)
            if s == NULL:
                conn_error(c, H2_INTERNAL_ERROR, "out of memory")
                return
            if emit_headers(c, sid, ef) != 0:
                return
            if end:
                stream_remote_end(c, s)
    c.hblock.start = 0
    c.hblock.end = 0
    buf_shrink(&c.hblock, 16384)


cdef int hblock_add(Conn *c, const char *p, size_t n) noexcept nogil:
    c.hb_frames += 1
    if c.hb_frames > HBLOCK_FRAMES_MAX or buf_len(&c.hblock) + n > <size_t>(2 * c.local_max_header_list + 16384):
        conn_error(c, H2_ENHANCE_YOUR_CALM, "peer sent a header block beyond the header list limit")
        return -1
    if buf_append(&c.hblock, p, n) != 0:
        conn_error(c, H2_INTERNAL_ERROR, "out of memory")
        return -1
    return 0


cdef void on_headers(Conn *c, int flags, uint32_t sid, const char *p, size_t n) noexcept nogil:
    cdef size_t pad
    if sid == 0:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: HEADERS on stream 0")
        return
    if flags & FL_PADDED:
        if n < 1:
            conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: HEADERS too short for its padding")
            return
        pad = <uint8_t>p[0]
        p += 1
        n -= 1
        if pad > n:
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: padding exceeds the HEADERS frame")
            return
        n -= pad
    if flags & FL_PRIORITY:
        if n < 5:
            conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: HEADERS too short for its priority")
            return
        if (get_u32(p) & 0x7fffffff) == sid:
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: stream depends on itself")
            return
        p += 5
        n -= 5
    c.hblock.start = 0
    c.hblock.end = 0
    c.hb_frames = 0
    c.hb_sid = sid
    c.hb_flags = flags & FL_END_STREAM
    if hblock_add(c, p, n) != 0:
        return
    if flags & FL_END_HEADERS:
        headers_complete(c)


cdef void on_continuation(Conn *c, int flags, uint32_t sid, const char *p, size_t n) noexcept nogil:
    if c.hb_sid == 0 or sid != c.hb_sid:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: unexpected CONTINUATION frame")
        return
    if hblock_add(c, p, n) != 0:
        return
    if flags & FL_END_HEADERS:
        headers_complete(c)


cdef void on_settings(Conn *c, int flags, uint32_t sid, const char *p, size_t n) noexcept nogil:
    cdef size_t i
    cdef int ident
    cdef uint32_t v
    cdef int64_t delta
    cdef Stream *s
    cdef Event *e
    if sid != 0:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: SETTINGS on a stream")
        return
    if flags & FL_ACK:
        if n != 0:
            conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: SETTINGS ACK with a payload")
        return
    if n % 6:
        conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: SETTINGS length not a multiple of 6")
        return
    i = 0
    while i < n:
        ident = (<uint8_t>p[i] << 8) | <uint8_t>p[i + 1]
        v = get_u32(p + i + 2)
        i += 6
        if ident == SET_ENABLE_PUSH:
            if v > 1 or (c.client and v == 1):
                conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: invalid SETTINGS_ENABLE_PUSH")
                return
        elif ident == SET_MAX_CONCURRENT_STREAMS:
            c.peer_max_streams = v
            e = event_new(EV_SETTINGS, c.o.id)
            if e != NULL:
                e.a = v
                evq_push(c.evq, e)
        elif ident == SET_INITIAL_WINDOW_SIZE:
            if v > MAX_WINDOW:
                conn_error(c, H2_FLOW_CONTROL_ERROR, "peer violated HTTP/2: SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                return
            delta = <int64_t>v - c.peer_initial_window
            c.peer_initial_window = v
            s = c.s_head
            while s != NULL:
                s.send_window += delta
                if s.send_window > MAX_WINDOW:
                    conn_error(c, H2_FLOW_CONTROL_ERROR, "peer violated HTTP/2: stream window above 2^31-1")
                    return
                s = s.anext
        elif ident == SET_MAX_FRAME_SIZE:
            if v < MIN_MAX_FRAME or v > MAX_MAX_FRAME:
                conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: invalid SETTINGS_MAX_FRAME_SIZE")
                return
            c.peer_max_frame = v
    out_frame(&c.obuf, FT_SETTINGS, FL_ACK, 0, NULL, 0)
    if c.state == CST_SETTINGS:
        c.state = CST_OPEN


cdef void on_rst_stream(Conn *c, uint32_t sid, const char *p, size_t n) noexcept nogil:
    cdef Stream *s
    cdef int64_t now, older
    cdef char msg[120]
    if n != 4:
        conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: RST_STREAM length not 4")
        return
    if sid == 0:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: RST_STREAM on stream 0")
        return
    s = stream_find(c, sid)
    if s == NULL:
        if sid_idle(c, sid):
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: RST_STREAM on an idle stream")
        return
    if not c.client and s.flags & SF_PEER and not s.flags & SF_RESPONDED:
        # rapid reset (CVE-2023-44487): streams cancelled before we could answer them
        now = now_ns()
        c.reset_ring[c.reset_count % 128] = now
        c.reset_count += 1
        if c.reset_count > RESET_FLOOD_LIMIT:
            older = c.reset_ring[(c.reset_count - RESET_FLOOD_LIMIT - 1) % 128]
            if now - older <= RESET_FLOOD_WINDOW_S * <int64_t>NS:
                stream_end(c, s, END_PEER_RESET, <int>get_u32(p), 0)
                snprintf(msg, sizeof(msg), "peer reset %d streams before they were answered",
                         <int>(RESET_FLOOD_LIMIT + 1))
                conn_error(c, H2_ENHANCE_YOUR_CALM, msg)
                return
    stream_end(c, s, END_PEER_RESET, <int>get_u32(p), 0)


cdef void on_goaway(Conn *c, uint32_t sid, const char *p, size_t n) noexcept nogil:
    cdef uint32_t last, code
    cdef Stream *s
    cdef Stream *nxt
    cdef Event *e
    cdef char msg[80]
    if sid != 0:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: GOAWAY on a stream")
        return
    if n < 8:
        conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: GOAWAY shorter than 8 bytes")
        return
    last = get_u32(p) & 0x7fffffff
    code = get_u32(p + 4)
    e = event_new(EV_GOAWAY, c.o.id)
    if e != NULL:
        e.sid = last
        e.code = <int>code
        event_set_data(e, p + 8, n - 8 if n - 8 < 1024 else 1024)
        evq_push(c.evq, e)
    c.flags |= CF_GOAWAY_RECV
    s = c.s_head
    while s != NULL:
        nxt = s.anext
        if not sid_is_peer(c, s.id) and s.id > last:
            stream_end(c, s, END_REFUSED, H2_REFUSED_STREAM, 0)
        s = nxt
    if code != 0:
        snprintf(msg, sizeof(msg), "peer sent GOAWAY with error code %u", code)
        conn_close(c, CLOSE_GOAWAY, msg, False)


cdef void on_window_update(Conn *c, uint32_t sid, const char *p, size_t n) noexcept nogil:
    cdef uint32_t inc
    cdef Stream *s
    if n != 4:
        conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: WINDOW_UPDATE length not 4")
        return
    inc = get_u32(p) & 0x7fffffff
    if sid == 0:
        if inc == 0:
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: WINDOW_UPDATE of 0")
            return
        c.send_window += inc
        if c.send_window > MAX_WINDOW:
            conn_error(c, H2_FLOW_CONTROL_ERROR, "peer violated HTTP/2: connection window above 2^31-1")
        return
    s = stream_find(c, sid)
    if s == NULL:
        if sid_idle(c, sid):
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: WINDOW_UPDATE on an idle stream")
        return
    if inc == 0:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: WINDOW_UPDATE of 0")
        return
    s.send_window += inc
    if s.send_window > MAX_WINDOW:
        conn_error(c, H2_FLOW_CONTROL_ERROR, "peer violated HTTP/2: stream window above 2^31-1")
