/* relay_aead: the bench's `relayaead` setup, a TCP relay pair with AES-128-GCM between the relays.
 *
 *   pod client: app ──tcp <server>:<port>──▶ iptables REDIRECT ──▶ relay_aead client <ip>:<port>
 *               (SO_ORIGINAL_DST restores <server>:<port>; sent in clear as a 6-byte header:
 *               IPv4 address, port, big-endian, as bench/relay.py does)
 *               ══ records, SO_MARK 1337 ══▶ pod server: relay_aead server <ip>:<port> ──tcp──▶ app
 *
 * Between the relays every byte travels in records: 4-byte big-endian plaintext length (1..16384),
 * ciphertext, 16-byte GCM tag; the length is the AEAD's additional data; the 12-byte nonce is a
 * direction byte (0 client->server, 1 server->client) and a 64-bit record counter, big-endian.
 * Per direction: one recv() of up to 256 KiB, each 16 KiB of it sealed (or each whole record in it
 * opened) into one output buffer, one send() of that buffer.  The least per-byte work a user-space
 * TLS proxy pair does: two copies across the kernel boundary and the AEAD, per side.
 *
 * NOT TLS and NOT secure (a pre-shared key, no handshake, no replay protection across
 * connections): a measuring device for the bench, never a proxy.
 *
 * Run:  relay_aead client LISTEN_IP LISTEN_PORT PEER_IP PEER_PORT KEYHEX
 *       relay_aead server LISTEN_IP LISTEN_PORT KEYHEX
 * (KEYHEX: 32 hex digits, the same for both relays.)
 *
 * Invariants: one thread per direction, blocking sockets; memory per connection is two fixed
 * buffers per direction; a direction's EOF is passed on as shutdown(SHUT_WR) (a truncated record
 * at EOF counts as an error); an error, a bad length or a record that fails authentication shuts
 * both sockets down in both directions (the records opened before it are delivered, none after).  Build: cc -O2 -o relay_aead relay_aead.c -lcrypto -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter_ipv4.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define RECORD 16384                 /* plaintext per record, TLS 1.3's maximum */
#define LEN_BYTES 4
#define TAG_BYTES 16
#define FRAME_MAX (LEN_BYTES + RECORD + TAG_BYTES)
#define BATCH (256 * 1024)           /* bytes per recv(), what the native engine reads */
#define MARK 1337                    /* passes the REDIRECT rule */
#define HEADER_BYTES 6

static unsigned char key[16];

struct conn {
    int app;      /* the socket on the plaintext side (accepted on the client, dialled on the server) */
    int link;     /* the socket between the relays */
    int dir_out;  /* nonce direction byte of what this side seals */
};

struct pump {
    struct conn *c;
    int seal;     /* 1: app -> link (seal), 0: link -> app (open) */
};

static int send_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int recv_exactly(int fd, unsigned char *p, size_t n) {
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void nonce(unsigned char iv[12], int dir, uint64_t counter) {
    memset(iv, 0, 12);
    iv[0] = (unsigned char)dir;
    for (int i = 0; i < 8; i++) iv[11 - i] = (unsigned char)(counter >> (8 * i));
}

/* app -> link: seal each RECORD of every recv() into one output buffer, send it. */
static int pump_seal(int src, int dst, int dir) {
    unsigned char *in = malloc(BATCH);
    unsigned char *out = malloc((BATCH / RECORD + 1) * FRAME_MAX);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int rc = -1;
    uint64_t counter = 0;
    unsigned char iv[12];
    if (!in || !out || !ctx || EVP_EncryptInit_ex(ctx, EVP_aes_128_gcm(), NULL, key, NULL) != 1) goto done;
    for (;;) {
        ssize_t n = recv(src, in, BATCH, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) goto done;
        if (n == 0) { rc = 0; break; }
        unsigned char *o = out;
        for (ssize_t off = 0; off < n; off += RECORD) {
            int len = (int)(n - off < RECORD ? n - off : RECORD), outl = 0, fin = 0;
            o[0] = o[1] = 0;
            o[2] = (unsigned char)(len >> 8);
            o[3] = (unsigned char)len;
            nonce(iv, dir, counter++);
            if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1
                || EVP_EncryptUpdate(ctx, NULL, &outl, o, LEN_BYTES) != 1
                || EVP_EncryptUpdate(ctx, o + LEN_BYTES, &outl, in + off, len) != 1
                || EVP_EncryptFinal_ex(ctx, o + LEN_BYTES + outl, &fin) != 1
                || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, o + LEN_BYTES + len) != 1)
                goto done;
            o += LEN_BYTES + len + TAG_BYTES;
        }
        if (send_all(dst, out, (size_t)(o - out)) < 0) goto done;
    }
done:
    EVP_CIPHER_CTX_free(ctx);
    free(in);
    free(out);
    return rc;
}

/* link -> app: open every whole record of what has arrived into one output buffer, send it; keep
 * the partial record at the end for the next recv(). */
static int pump_open(int src, int dst, int dir) {
    size_t cap = BATCH + FRAME_MAX, have = 0;
    unsigned char *in = malloc(cap);
    unsigned char *out = malloc(cap);
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int rc = -1;
    uint64_t counter = 0;
    unsigned char iv[12];
    if (!in || !out || !ctx || EVP_DecryptInit_ex(ctx, EVP_aes_128_gcm(), NULL, key, NULL) != 1) goto done;
    for (;;) {
        size_t room = cap - have;
        ssize_t n = recv(src, in + have, room > BATCH ? BATCH : room, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) goto done;
        if (n == 0) { rc = have ? -1 : 0; break; }  /* a truncated record is an error */
        have += (size_t)n;
        unsigned char *p = in, *end = in + have, *o = out;
        int bad = 0;
        while (end - p >= LEN_BYTES) {
            uint32_t len = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
            if (len == 0 || len > RECORD) {
                fprintf(stderr, "relay_aead: record %llu has length %u\n", (unsigned long long)counter, len);
                bad = 1;
                break;
            }
            if ((size_t)(end - p) < LEN_BYTES + len + TAG_BYTES) break;
            int outl = 0, fin = 0;
            nonce(iv, dir, counter++);
            if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1
                || EVP_DecryptUpdate(ctx, NULL, &outl, p, LEN_BYTES) != 1
                || EVP_DecryptUpdate(ctx, o, &outl, p + LEN_BYTES, (int)len) != 1
                || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_BYTES, p + LEN_BYTES + len) != 1
                || EVP_DecryptFinal_ex(ctx, o + outl, &fin) != 1) {
                fprintf(stderr, "relay_aead: record %llu failed authentication\n", (unsigned long long)(counter - 1));
                bad = 1;
                break;
            }
            o += len;
            p += LEN_BYTES + len + TAG_BYTES;
        }
        have = (size_t)(end - p);
        if (have && p != in) memmove(in, p, have);
        /* the records opened before a bad one are delivered (as TLS would), nothing after it */
        if (o != out && send_all(dst, out, (size_t)(o - out)) < 0) goto done;
        if (bad) goto done;
    }
done:
    EVP_CIPHER_CTX_free(ctx);
    free(in);
    free(out);
    return rc;
}

static void *run_pump(void *arg) {
    struct pump *pm = arg;
    struct conn *c = pm->c;
    int src = pm->seal ? c->app : c->link, dst = pm->seal ? c->link : c->app;
    int rc = pm->seal ? pump_seal(src, dst, c->dir_out) : pump_open(src, dst, !c->dir_out);
    if (rc == 0) {
        shutdown(dst, SHUT_WR);
    } else {  /* an error on one direction ends both */
        shutdown(c->app, SHUT_RDWR);
        shutdown(c->link, SHUT_RDWR);
    }
    return NULL;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int dial(const struct sockaddr_in *to, int mark) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark) < 0) { close(fd); return -1; }
    if (connect(fd, (const struct sockaddr *)to, sizeof *to) < 0) { close(fd); return -1; }
    return fd;
}

struct accepted {
    int fd;
    int client;
    struct sockaddr_in peer;
};

static void *handle(void *arg) {
    struct accepted *a = arg;
    struct conn c = {.app = -1, .link = -1, .dir_out = a->client ? 0 : 1};
    unsigned char hdr[HEADER_BYTES];
    struct sockaddr_in dst = {.sin_family = AF_INET};
    if (a->client) {
        socklen_t len = sizeof dst;
        c.app = a->fd;
        if (getsockopt(c.app, SOL_IP, SO_ORIGINAL_DST, &dst, &len) < 0) goto out;
        memcpy(hdr, &dst.sin_addr.s_addr, 4);   /* both already big-endian */
        memcpy(hdr + 4, &dst.sin_port, 2);
        if ((c.link = dial(&a->peer, MARK)) < 0 || send_all(c.link, hdr, sizeof hdr) < 0) goto out;
    } else {
        c.link = a->fd;
        if (recv_exactly(c.link, hdr, sizeof hdr) < 0) goto out;
        memcpy(&dst.sin_addr.s_addr, hdr, 4);
        memcpy(&dst.sin_port, hdr + 4, 2);
        if ((c.app = dial(&dst, 0)) < 0) goto out;
    }
    nodelay(c.app);
    nodelay(c.link);
    struct pump seal = {&c, 1}, open = {&c, 0};
    pthread_t other;
    if (pthread_create(&other, NULL, run_pump, &open) != 0) goto out;
    run_pump(&seal);
    pthread_join(other, NULL);
out:
    if (c.app >= 0) close(c.app);
    if (c.link >= 0) close(c.link);
    free(a);
    return NULL;
}

static int parse_addr(const char *ip, const char *port, struct sockaddr_in *sa) {
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)atoi(port));
    return inet_pton(AF_INET, ip, &sa->sin_addr) == 1 ? 0 : -1;
}

static int parse_key(const char *hex) {
    if (strlen(hex) != 2 * sizeof key) return -1;
    for (size_t i = 0; i < sizeof key; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return -1;
        key[i] = (unsigned char)v;
    }
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: relay_aead client LISTEN_IP LISTEN_PORT PEER_IP PEER_PORT KEYHEX\n"
                    "       relay_aead server LISTEN_IP LISTEN_PORT KEYHEX\n");
    return 2;
}

int main(int argc, char **argv) {
    struct sockaddr_in listen_at, peer = {0};
    int client;
    if (argc == 7 && strcmp(argv[1], "client") == 0) {
        client = 1;
        if (parse_addr(argv[4], argv[5], &peer) < 0) return usage();
    } else if (argc == 5 && strcmp(argv[1], "server") == 0) {
        client = 0;
    } else {
        return usage();
    }
    if (parse_addr(argv[2], argv[3], &listen_at) < 0 || parse_key(argv[argc - 1]) < 0) return usage();
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0
        || bind(lfd, (struct sockaddr *)&listen_at, sizeof listen_at) < 0 || listen(lfd, 4096) < 0) {
        perror("relay_aead: listen");
        return 1;
    }
    printf("relay_aead %s listening on %s:%s\n", argv[1], argv[2], argv[3]);
    fflush(stdout);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) continue;
            perror("relay_aead: accept");
            return 1;
        }
        struct accepted *a = malloc(sizeof *a);
        if (!a) { close(fd); continue; }
        *a = (struct accepted){.fd = fd, .client = client, .peer = peer};
        pthread_t t;
        if (pthread_create(&t, &attr, handle, a) != 0) { close(fd); free(a); }
    }
}
