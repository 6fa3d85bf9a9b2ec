# Socket and randomness declarations for the native engine's own accept path (_splice_accept.pxi)
# and the flow cache (_splice_flow.pxi).  Declarations only: no logic.

from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t
    ctypedef uint16_t in_port_t

    struct in_addr:
        in_addr_t s_addr

    struct sockaddr_in:
        unsigned short sin_family
        in_port_t sin_port
        in_addr sin_addr

    struct in6_addr:
        uint8_t s6_addr[16]

    struct sockaddr_in6:
        unsigned short sin6_family
        in_port_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    uint16_t ntohs(uint16_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint32_t htonl(uint32_t)
    enum:
        IPPROTO_TCP
        SOL_IP
        AF_INET
        AF_INET6
        IP_TRANSPARENT
        IPPROTO_IPV6
        IPV6_TRANSPARENT


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY
        TCP_KEEPIDLE
        TCP_KEEPINTVL
        TCP_KEEPCNT


cdef extern from "<linux/netfilter_ipv4.h>" nogil:
    enum:
        SO_ORIGINAL_DST  # at SOL_IP; IPv6's IP6T_SO_ORIGINAL_DST (at SOL_IPV6) is the same number, 80


cdef extern from "<sys/socket.h>" nogil:
    struct sockaddr:
        unsigned short sa_family

    int accept4(int sockfd, sockaddr *addr, unsigned int *addrlen, int flags)
    int getsockname(int sockfd, sockaddr *addr, unsigned int *addrlen)
    int socket(int domain, int type, int protocol)
    int connect(int sockfd, const sockaddr *addr, unsigned int addrlen)
    int bind(int sockfd, const sockaddr *addr, unsigned int addrlen)
    enum:
        SOL_IPV6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SO_KEEPALIVE
        SO_MARK


cdef extern from "<sys/epoll.h>" nogil:
    enum:
        EPOLLEXCLUSIVE


cdef extern from "<sys/random.h>" nogil:
    ssize_t getrandom(void *buf, size_t buflen, unsigned int flags)


cdef extern from "<unistd.h>" nogil:
    int dup(int oldfd)


cdef extern from "<errno.h>" nogil:
    enum:
        EINPROGRESS
