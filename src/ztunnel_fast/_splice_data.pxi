# _splice piece: the frame loop (preface, frame headers, dispatch) and DATA frames, whose payload
# is passed to its stream as it arrives.
#
# Flow control (RFC 9113 6.9): a DATA frame's whole length counts against both receive windows as
# soon as its header is in; padding is credited back at once, payload once it was written to the
# plain socket (or dropped).  A frame beyond a window is a FLOW_CONTROL_ERROR.


cdef void on_ping(Conn *c, int flags, uint32_t sid, const char *p, size_t n) noexcept nogil:
    if n != 8:
        conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: PING length not 8")
        return
    if sid != 0:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: PING on a stream")
        return
    if flags & FL_ACK:
        c.ping_sent_ns = 0
    else:
        out_ping(&c.obuf, FL_ACK, p)


cdef void on_frame(Conn *c, int ftype, int flags, uint32_t sid, const char *p, size_t n) noexcept nogil:
    if ftype == FT_HEADERS:
        on_headers(c, flags, sid, p, n)
    elif ftype == FT_CONTINUATION:
        on_continuation(c, flags, sid, p, n)
    elif ftype == FT_WINDOW_UPDATE:
        on_window_update(c, sid, p, n)
    elif ftype == FT_SETTINGS:
        on_settings(c, flags, sid, p, n)
    elif ftype == FT_PING:
        on_ping(c, flags, sid, p, n)
    elif ftype == FT_RST_STREAM:
        on_rst_stream(c, sid, p, n)
    elif ftype == FT_GOAWAY:
        on_goaway(c, sid, p, n)
    elif ftype == FT_PRIORITY:
        if n != 5:
            conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: PRIORITY length not 5")
        elif sid == 0:
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: PRIORITY on stream 0")
    elif ftype == FT_PUSH_PROMISE:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: PUSH_PROMISE (push is disabled)")
    # other frame types are ignored (RFC 9113 5.5)


cdef void data_finish(Conn *c) noexcept nogil:
    cdef Stream *s
    if c.d_end and c.d_sid != 0:
        deliver_flush(c)  # the payload goes out before the FIN
        s = stream_find(c, c.d_sid)
        if s != NULL:
            stream_remote_end(c, s)
    c.d_sid = 0
    c.d_left = 0
    c.d_pad = 0
    c.d_end = False


cdef void data_begin(Conn *c, size_t length, int flags, uint32_t sid) noexcept nogil:
    """A DATA frame header (and its pad length byte) was consumed from rbuf."""
    cdef size_t pad = 0
    cdef size_t payload
    cdef Stream *s = NULL
    cdef int64_t now
    if sid == 0:
        conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: DATA on stream 0")
        return
    if flags & FL_PADDED:
        pad = <uint8_t>c.rbuf.data[c.rbuf.start]
        buf_consume(&c.rbuf, 1)
        if pad > length - 1:
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: padding exceeds the DATA frame")
            return
        payload = length - 1 - pad
    else:
        payload = length
    if <int64_t>length > c.recv_window:
        conn_error(c, H2_FLOW_CONTROL_ERROR, "peer violated HTTP/2: DATA beyond the connection window")
        return
    c.recv_window -= length
    c.data_frames_in += 1
    s = stream_find(c, sid)
    if s == NULL:
        if sid_idle(c, sid):
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: DATA on an idle stream")
            return
        c.d_sid = 0            # a stream that is over: payload dropped, window returned
    elif s.flags & SF_REMOTE_END:
        stream_reset(c, s, H2_STREAM_CLOSED, END_PROTOCOL, 0)
        s = NULL
        c.d_sid = 0
    else:
        if <int64_t>length > s.recv_window:
            conn_error(c, H2_FLOW_CONTROL_ERROR, "peer violated HTTP/2: DATA beyond the stream window")
            return
        s.recv_window -= length
        c.d_sid = sid
    if length - payload:
        stream_credit(c, s, <int64_t>(length - payload))
    if payload == 0 and not flags & FL_END_STREAM:
        # empty DATA frames cost us work and the peer nothing (CVE-2019-9518)
        now = now_ns()
        if now - c.ctl_window_start > EMPTY_FRAME_WINDOW_S * <int64_t>NS:
            c.ctl_window_start = now
            c.ctl_count = 0
        c.ctl_count += 1
        if c.ctl_count > EMPTY_FRAME_LIMIT:
            conn_error(c, H2_ENHANCE_YOUR_CALM, "peer sent a flood of empty DATA frames")
            return
    c.d_left = payload
    c.d_pad = pad
    c.d_end = (flags & FL_END_STREAM) != 0
    if payload == 0 and pad == 0:
        data_finish(c)


cdef void data_continue(Conn *c) noexcept nogil:
    """Pass on the payload (or skip the padding) of the DATA frame in progress."""
    cdef size_t avail = buf_len(&c.rbuf)
    cdef size_t n
    cdef Stream *s
    if c.d_left > 0:
        n = avail if avail < c.d_left else c.d_left
        s = stream_find(c, c.d_sid) if c.d_sid != 0 else NULL
        c.d_left -= n
        if s != NULL:
            stream_deliver(c, s, c.rbuf.data + c.rbuf.start, n)
        else:
            conn_credit(c, <int64_t>n)
        buf_consume(&c.rbuf, n)
    elif c.d_pad > 0:
        n = avail if avail < c.d_pad else c.d_pad
        c.d_pad -= n
        buf_consume(&c.rbuf, n)
    if c.d_left == 0 and c.d_pad == 0 and c.state < CST_LINGER:
        data_finish(c)


cdef void conn_parse(Conn *c) noexcept nogil:
    """Consume what rbuf holds: whole frames, and DATA payload as it comes (written to the plain
    sockets before returning: rbuf may move afterwards)."""
    conn_parse_frames(c)
    deliver_flush(c)


cdef void conn_parse_frames(Conn *c) noexcept nogil:
    cdef const char *p
    cdef size_t avail, length, n
    cdef int ftype, flags
    cdef uint32_t sid
    while c.state < CST_LINGER:
        p = c.rbuf.data + c.rbuf.start
        avail = buf_len(&c.rbuf)
        if c.state == CST_PREFACE:
            n = PREFACE_LEN - c.preface_got
            if avail < n:
                n = avail
            if n == 0:
                return
            if memcmp(p, PREFACE + c.preface_got, n) != 0:
                conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: invalid HTTP/2 preamble")
                return
            c.preface_got += n
            buf_consume(&c.rbuf, n)
            if c.preface_got == PREFACE_LEN:
                c.state = CST_SETTINGS
            continue
        if c.d_left > 0 or c.d_pad > 0:
            if avail == 0:
                return
            data_continue(c)
            continue
        if avail < FRAME_HEADER:
            return
        length = (<size_t>(<uint8_t>p[0]) << 16) | (<size_t>(<uint8_t>p[1]) << 8) | <uint8_t>p[2]
        ftype = <uint8_t>p[3]
        flags = <uint8_t>p[4]
        sid = get_u32(p + 5) & 0x7fffffff
        if <int64_t>length > c.local_max_frame:
            conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: frame larger than SETTINGS_MAX_FRAME_SIZE")
            return
        if c.state == CST_SETTINGS and (ftype != FT_SETTINGS or flags & FL_ACK):
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: first frame is not SETTINGS")
            return
        if c.hb_sid != 0 and ftype != FT_CONTINUATION:
            conn_error(c, H2_PROTOCOL_ERROR, "peer violated HTTP/2: header block interrupted (CONTINUATION expected)")
            return
        if ftype == FT_DATA:
            if flags & FL_PADDED:
                if length == 0:
                    conn_error(c, H2_FRAME_SIZE_ERROR, "peer violated HTTP/2: DATA too short for its padding")
                    return
                if avail < FRAME_HEADER + 1:
                    return
            c.frames_in += 1
            buf_consume(&c.rbuf, FRAME_HEADER)
            data_begin(c, length, flags, sid)
            continue
        deliver_flush(c)  # payload before any other frame, and before rbuf may move
        if avail < FRAME_HEADER + length:
            if buf_reserve(&c.rbuf, FRAME_HEADER + length - avail) != 0:
                conn_error(c, H2_INTERNAL_ERROR, "out of memory")
            return
        c.frames_in += 1
        on_frame(c, ftype, flags, sid, p + FRAME_HEADER, length)
        buf_consume(&c.rbuf, FRAME_HEADER + length)
