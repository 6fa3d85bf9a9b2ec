# C library declarations used by the native engine (_splice.pyx).  Declarations only: no logic.
# Kept apart so the implementation files read as logic (the uvloop layout).

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD
        EPOLL_CLOEXEC


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t

    ctypedef struct pthread_mutex_t:
        pass

    ctypedef struct pthread_attr_t:
        pass

    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start_routine)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigfillset(sigset_t *set)
    int pthread_sigmask(int how, const sigset_t *set, sigset_t *oldset)
    enum:
        SIG_BLOCK
        SIG_SETMASK


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
        F_GETFL
        F_SETFL
        O_RDONLY
    int c_open "open"(const char *path, int flags)


# setns(2): the inbound fast path creates a pod's upstream socket inside the pod's network namespace
cdef extern from "<sched.h>" nogil:
    int setns(int fd, int nstype)
    enum:
        CLONE_NEWNET


# glibc's malloc_trim (limits.release_free_memory): freed heap pages back to the system.  Other C
# libraries have none; the wrapper then reports -1 ("not available") instead of failing the build.
cdef extern from *:
    """
    #include <malloc.h>
    static int zt_malloc_trim(size_t pad) {
    #ifdef __GLIBC__
        return malloc_trim(pad);
    #else
        (void)pad;
        return -1;
    #endif
    }
    """
    int zt_malloc_trim(size_t pad) nogil


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t readv(int fd, const iovec *iov, int iovcnt)
    ssize_t writev(int fd, const iovec *iov, int iovcnt)


cdef extern from "<sys/socket.h>" nogil:
    struct linger:
        int l_onoff
        int l_linger
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int sockfd, const msghdr *msg, int flags)
    int shutdown(int sockfd, int how)
    ssize_t recv(int sockfd, void *buf, size_t len, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    int setsockopt(int sockfd, int level, int optname, const void *optval, unsigned int optlen)
    int getsockopt(int sockfd, int level, int optname, void *optval, unsigned int *optlen)
    enum:
        SHUT_RD
        SHUT_WR
        SHUT_RDWR
        MSG_NOSIGNAL
        MSG_DONTWAIT
        SOL_SOCKET
        SO_LINGER
        SO_ERROR


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    enum:
        CLOCK_MONOTONIC


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        EINVAL
        ECANCELED
        ECONNRESET
        EPIPE
        ENOTCONN
        ENOMEM
        ETIMEDOUT
        EBADF
        ENOENT
        ENOSYS


# OpenSSL entry points, called through the addresses of cryptography's bundled OpenSSL (never
# linked: engine/ssl_bridge.py hands them over).  Values of SSL_get_error from openssl/ssl.h.
ctypedef int (*ssl_read_fn)(void *ssl, void *buf, int num) noexcept nogil
ctypedef int (*ssl_write_fn)(void *ssl, const void *buf, int num) noexcept nogil
ctypedef int (*ssl_get_error_fn)(const void *ssl, int ret) noexcept nogil
ctypedef int (*ssl_shutdown_fn)(void *ssl) noexcept nogil
ctypedef void (*err_clear_error_fn)() noexcept nogil
ctypedef unsigned long (*err_get_error_fn)() noexcept nogil
ctypedef const char *(*err_reason_string_fn)(unsigned long e) noexcept nogil
# memory BIOs (the TLS byte path batches records through them: _splice_tls.pxi)
ctypedef void *(*bio_new_fn)(void *method) noexcept nogil
ctypedef void *(*bio_s_mem_fn)() noexcept nogil
ctypedef int (*bio_read_fn)(void *bio, void *buf, int num) noexcept nogil
ctypedef void (*ssl_set_bio_fn)(void *ssl, void *rbio, void *wbio) noexcept nogil
ctypedef long (*bio_set_mem_eof_return_fn)(void *bio, int v) noexcept nogil
ctypedef int (*bio_free_fn)(void *bio) noexcept nogil
ctypedef void *(*bio_new_mem_buf_fn)(const void *buf, int len) noexcept nogil

cdef enum:
    SSL_ERROR_NONE = 0
    SSL_ERROR_SSL = 1
    SSL_ERROR_WANT_READ = 2
    SSL_ERROR_WANT_WRITE = 3
    SSL_ERROR_SYSCALL = 5
    SSL_ERROR_ZERO_RETURN = 6
