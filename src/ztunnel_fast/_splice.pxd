# Declarations for the native engine (_splice.pyx).  C library declarations live here so the
# implementation file reads as logic only.

from libc.stdint cimport int64_t

cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t len, unsigned int flags)
    int pipe2(int pipefd[2], int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        O_NONBLOCK
        O_CLOEXEC
        F_SETPIPE_SZ

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)

cdef extern from "<sys/socket.h>" nogil:
    int shutdown(int sockfd, int how)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    enum:
        SHUT_WR
        MSG_NOSIGNAL

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        EINVAL
        ECANCELED


# One direction of a plain<->plain tunnel: bytes flow src -> pipe -> dst.
cdef struct Leg:
    int src
    int dst
    int pipe_r
    int pipe_w
    size_t pending      # bytes sitting in the pipe, not yet spliced to dst
    size_t capacity     # the pipe's size: never ask src for more than fits
    bint eof            # src returned 0 (FIN)
    bint done           # eof seen, pipe drained, dst shut down for writing
    int64_t moved       # bytes delivered to dst


cdef int leg_open(Leg *leg, int src, int dst, size_t pipe_size) noexcept nogil
cdef void leg_close(Leg *leg) noexcept nogil
cdef int splice_loop(Leg *ab, Leg *ba, int cancel_fd, size_t chunk) noexcept nogil
