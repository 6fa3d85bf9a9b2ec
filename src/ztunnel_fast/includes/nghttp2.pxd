# libnghttp2's HPACK decoder API (Debian libnghttp2-dev), used by the native engine's
# _splice_hpack.pxi.  Declarations only: no logic.

from libc.stdint cimport uint8_t


cdef extern from "<nghttp2/nghttp2.h>" nogil:
    ctypedef struct nghttp2_hd_inflater:
        pass

    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags

    enum:
        NGHTTP2_HD_INFLATE_NONE
        NGHTTP2_HD_INFLATE_FINAL
        NGHTTP2_HD_INFLATE_EMIT

    int nghttp2_hd_inflate_new(nghttp2_hd_inflater **inflater_ptr)
    void nghttp2_hd_inflate_del(nghttp2_hd_inflater *inflater)
    ssize_t nghttp2_hd_inflate_hd2(nghttp2_hd_inflater *inflater, nghttp2_nv *nv_out, int *inflate_flags,
                                   const uint8_t *inp, size_t inlen, int in_final)
    int nghttp2_hd_inflate_end_headers(nghttp2_hd_inflater *inflater)
    const char *nghttp2_strerror(int lib_error_code)
