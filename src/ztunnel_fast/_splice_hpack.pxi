# _splice piece: HPACK decoding of the peer's header blocks with libnghttp2's decoder (one per
# connection, created with its first block), so a worker can read headers without the event loop.
#
# Decoded fields travel in EV_HEADERS.data as, per field: u32 name length, u32 value length (host
# byte order), the name, the value; `Core.poll()` turns them into [(name, value), ...] (bytes).
#
# Invariants: every header block is decoded, in frame order, even one for a stream we refuse or
# ignore (the dynamic table must follow the peer's); a block that does not decode, or whose header
# list is larger than our SETTINGS_MAX_HEADER_LIST_SIZE (counted as RFC 9113 6.5.2 and the hpack
# package count it: 32 + name + value per field), is a connection error COMPRESSION_ERROR, as the
# pure twin (hyper-h2 on hpack) answers it.

from libc.stdio cimport snprintf

cdef char HPACK_EMPTY[1]


cdef int hpack_put_field(Buf *out, const uint8_t *name, size_t nlen, const uint8_t *value,
                         size_t vlen) noexcept nogil:
    cdef uint32_t lens[2]
    lens[0] = <uint32_t>nlen
    lens[1] = <uint32_t>vlen
    if buf_reserve(out, 8 + nlen + vlen) != 0:
        return -1
    memcpy(out.data + out.end, lens, 8)
    if nlen:
        memcpy(out.data + out.end + 8, name, nlen)
    if vlen:
        memcpy(out.data + out.end + 8 + nlen, value, vlen)
    out.end += 8 + nlen + vlen
    return 0


cdef int hpack_decode(Conn *c, const char *p, size_t n, Buf *out, char *why, size_t whylen) noexcept nogil:
    """Decode one complete header block into `out`.  Returns 0; -1 undecodable or over the header
    list limit (`why` says which: COMPRESSION_ERROR); -2 out of memory."""
    cdef nghttp2_hd_inflater *inf = c.hd_inflater
    cdef nghttp2_nv nv
    cdef int iflags = 0
    cdef ssize_t rv
    cdef int64_t listed = 0
    if inf == NULL:
        if nghttp2_hd_inflate_new(&inf) != 0:
            return -2
        c.hd_inflater = inf
    if n == 0:
        p = HPACK_EMPTY
    while True:
        rv = nghttp2_hd_inflate_hd2(inf, &nv, &iflags, <const uint8_t *>p, n, 1)
        if rv < 0:
            snprintf(why, whylen, "peer violated HTTP/2: undecodable header block (%s)", nghttp2_strerror(<int>rv))
            return -1
        p += rv
        n -= <size_t>rv
        if iflags & NGHTTP2_HD_INFLATE_EMIT:
            listed += 32 + <int64_t>nv.namelen + <int64_t>nv.valuelen
            if listed > c.local_max_header_list:
                snprintf(why, whylen, "peer violated HTTP/2: undecodable header block "
                         "(A header list larger than %lld has been received)", <long long>c.local_max_header_list)
                return -1
            if hpack_put_field(out, nv.name, nv.namelen, nv.value, nv.valuelen) != 0:
                return -2
        if iflags & NGHTTP2_HD_INFLATE_FINAL:
            nghttp2_hd_inflate_end_headers(inf)
            return 0
        if (iflags & NGHTTP2_HD_INFLATE_EMIT) == 0 and n == 0:
            # all input consumed without FINAL: cannot happen with in_final=1, but never loop
            snprintf(why, whylen, "peer violated HTTP/2: undecodable header block (truncated)")
            return -1


cdef void hpack_free(Conn *c) noexcept nogil:
    if c.hd_inflater != NULL:
        nghttp2_hd_inflate_del(c.hd_inflater)
        c.hd_inflater = NULL


cdef list hpack_fields(const char *p, size_t n):
    """EV_HEADERS.data -> [(name, value), ...] (bytes), for the event loop."""
    cdef list out = []
    cdef uint32_t lens[2]
    cdef size_t off = 0
    while off + 8 <= n:
        memcpy(lens, p + off, 8)
        off += 8
        if off + lens[0] + lens[1] > n:
            break
        out.append((p[off:off + lens[0]], p[off + lens[0]:off + lens[0] + lens[1]]))
        off += lens[0] + lens[1]
    return out


cdef tuple event_tuple(Event *e):
    """An event as the event loop reads it: (kind, id, token, sid, code, flags, err, a, b, data);
    EV_HEADERS and EV_INBOUND_OPEN data is the decoded field list."""
    if e.kind == EV_HEADERS or e.kind == EV_INBOUND_OPEN:
        data = hpack_fields(e.data, e.len) if e.data != NULL else []
    else:
        data = e.data[:e.len] if e.data != NULL else None
    return (e.kind, e.id, e.token, e.sid, e.code, e.flags, e.err, e.a, e.b, data)
