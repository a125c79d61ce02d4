/*
 * ezp-load — load generator and backend servers for the EzProxy benchmark.
 *
 * Single file, C11 + pthreads, Linux only. Every subcommand prints exactly one
 * JSON object on stdout when it finishes (servers print {"port":N} first, as
 * soon as they listen, and a summary object when they exit).
 *
 * Servers (127.0.0.1 only; port 0 picks a free port):
 *   ezp-load sink --tcp PORT              read and discard
 *   ezp-load echo --tcp PORT              echo every byte back
 *   ezp-load echo --udp PORT              echo every datagram back
 *     echo --tcp also takes --close-after N: close a connection once N bytes
 *     have been echoed (the server closes first, for connrate).
 *     Servers exit when stdin reaches EOF, on SIGTERM/SIGINT, or after
 *     --lifetime S seconds (default 3600).
 *
 * Clients (ADDR is PORT or 127.x.y.z:PORT):
 *   ezp-load bulk --connect ADDR --streams N --seconds S
 *   ezp-load rr --tcp|--udp --connect ADDR --count N [--size 64] [--warmup 1000]
 *   ezp-load udprate --connect ADDR --rate PPS --seconds S [--size 64]
 *   ezp-load connrate --connect ADDR --seconds S --concurrency C [--close server|client]
 *   ezp-load idle --connect ADDR --count N [--no-ping] [--max-seconds S]
 *
 * Every loop is bounded by a count and a deadline and stops by itself.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define BULK_BUF (64 * 1024)
#define ECHO_BUF (16 * 1024)
#define UDP_BATCH 64
#define UDP_MAX 2048
#define IO_TIMEOUT_MS 2000

/* ------------------------------------------------------------------ util */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull),
                          .tv_nsec = (long)(ns % 1000000000ull)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static void die_json(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* keep the message JSON-safe */
    for (char *p = msg; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20)
            *p = ' ';
    printf("{\"error\":\"%s\"}\n", msg);
    fflush(stdout);
    fprintf(stderr, "ezp-load: %s\n", msg);
    exit(1);
}

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void set_timeouts(int fd, int ms)
{
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    /* on Linux SO_SNDTIMEO also bounds a blocking connect() */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void set_bufs(int fd, int bytes)
{
    /* FORCE variants need CAP_NET_ADMIN; fall back to the capped ones */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* ADDR: "PORT", ":PORT", "HOST:PORT" with HOST in 127.0.0.0/8 or "localhost" */
static void parse_addr(const char *s, struct sockaddr_in *sa)
{
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    const char *colon = strrchr(s, ':');
    const char *port = s;
    if (colon) {
        char host[64];
        size_t hl = (size_t)(colon - s);
        if (hl >= sizeof host)
            die_json("bad address %s", s);
        memcpy(host, s, hl);
        host[hl] = 0;
        if (hl > 0 && strcmp(host, "localhost") != 0) {
            if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
                die_json("bad address %s", s);
        }
        port = colon + 1;
    }
    char *end;
    long p = strtol(port, &end, 10);
    if (*port == 0 || *end != 0 || p < 0 || p > 65535)
        die_json("bad port in %s", s);
    sa->sin_port = htons((uint16_t)p);
    if ((ntohl(sa->sin_addr.s_addr) >> 24) != 127)
        die_json("only 127.0.0.0/8 is allowed, got %s", s);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_us(const uint64_t *v, size_t n, double q)
{
    if (n == 0)
        return 0.0;
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    if (i >= n)
        i = n - 1;
    return (double)v[i] / 1000.0;
}

/* --------------------------------------------------------------- options */

struct opts {
    const char *cmd;
    const char *connect;
    int tcp_port, udp_port; /* -1 = not given */
    int tcp, udp;
    int streams;
    double seconds;
    long count;
    int size;
    long warmup;
    double rate;
    int concurrency;
    int ping;
    double max_seconds;
    double lifetime;
    long close_after; /* echo --tcp: close after echoing this many bytes */
    int client_close; /* connrate: client closes first instead of waiting for EOF */
};

static void usage(void)
{
    fprintf(stderr,
            "usage:\n"
            "  ezp-load sink --tcp PORT [--lifetime S]\n"
            "  ezp-load echo --tcp PORT [--close-after N] | --udp PORT [--lifetime S]\n"
            "  ezp-load bulk --connect ADDR --streams N --seconds S\n"
            "  ezp-load rr --tcp|--udp --connect ADDR --count N [--size 64] [--warmup 1000] [--max-seconds S]\n"
            "  ezp-load udprate --connect ADDR --rate PPS --seconds S [--size 64]\n"
            "  ezp-load connrate --connect ADDR --seconds S --concurrency C [--close server|client]\n"
            "  ezp-load idle --connect ADDR --count N [--no-ping] [--max-seconds S]\n");
    exit(2);
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
    memset(o, 0, sizeof *o);
    o->tcp_port = o->udp_port = -1;
    o->streams = 1;
    o->seconds = 2.0;
    o->count = 10000;
    o->size = 64;
    o->warmup = 1000;
    o->rate = 10000;
    o->concurrency = 1;
    o->ping = 1;
    o->max_seconds = 0;
    o->lifetime = 3600;
    if (argc < 2)
        usage();
    o->cmd = argv[1];
    int server = !strcmp(o->cmd, "sink") || !strcmp(o->cmd, "echo");
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV()                                                                \
    do {                                                                       \
        if (!v)                                                                \
            usage();                                                           \
        i++;                                                                   \
    } while (0)
        if (!strcmp(a, "--tcp")) {
            o->tcp = 1;
            if (server) {
                NEEDV();
                o->tcp_port = atoi(v);
            }
        } else if (!strcmp(a, "--udp")) {
            o->udp = 1;
            if (server) {
                NEEDV();
                o->udp_port = atoi(v);
            }
        } else if (!strcmp(a, "--connect")) {
            NEEDV();
            o->connect = v;
        } else if (!strcmp(a, "--streams")) {
            NEEDV();
            o->streams = atoi(v);
        } else if (!strcmp(a, "--seconds")) {
            NEEDV();
            o->seconds = atof(v);
        } else if (!strcmp(a, "--count")) {
            NEEDV();
            o->count = atol(v);
        } else if (!strcmp(a, "--size")) {
            NEEDV();
            o->size = atoi(v);
        } else if (!strcmp(a, "--warmup")) {
            NEEDV();
            o->warmup = atol(v);
        } else if (!strcmp(a, "--rate")) {
            NEEDV();
            o->rate = atof(v);
        } else if (!strcmp(a, "--concurrency")) {
            NEEDV();
            o->concurrency = atoi(v);
        } else if (!strcmp(a, "--no-ping")) {
            o->ping = 0;
        } else if (!strcmp(a, "--max-seconds")) {
            NEEDV();
            o->max_seconds = atof(v);
        } else if (!strcmp(a, "--close-after")) {
            NEEDV();
            o->close_after = atol(v);
        } else if (!strcmp(a, "--close")) {
            NEEDV();
            if (!strcmp(v, "client"))
                o->client_close = 1;
            else if (!strcmp(v, "server"))
                o->client_close = 0;
            else
                usage();
        } else if (!strcmp(a, "--lifetime")) {
            NEEDV();
            o->lifetime = atof(v);
        } else {
            fprintf(stderr, "unknown option %s\n", a);
            usage();
        }
#undef NEEDV
    }
    if (o->streams < 1 || o->streams > 1024)
        die_json("--streams out of range");
    if (o->seconds <= 0 || o->seconds > 3600)
        die_json("--seconds out of range");
    if (o->count < 0 || o->count > 100000000)
        die_json("--count out of range");
    if (o->warmup < 0 || o->warmup > 10000000)
        die_json("--warmup out of range");
    if (o->size < 16 || o->size > UDP_MAX)
        die_json("--size must be 16..%d", UDP_MAX);
    if (o->rate <= 0 || o->rate > 1e8)
        die_json("--rate out of range");
    if (o->concurrency < 1 || o->concurrency > 4096)
        die_json("--concurrency out of range");
    if (o->lifetime <= 0)
        o->lifetime = 3600;
}

static int tcp_connect(const struct sockaddr_in *sa, int timeout_ms)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    set_timeouts(fd, timeout_ms);
    if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = ECONNRESET;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* --------------------------------------------------------------- servers */

enum { K_LISTEN = 1, K_CONN, K_UDP, K_STDIN };

struct ent {
    int kind;
    int fd;
    uint32_t events; /* current epoll interest */
    size_t off, len; /* pending echo bytes in buf[off..len) */
    uint64_t echoed;
    char *buf;
};

static volatile sig_atomic_t g_stop;
static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static int bind_socket(int type, int port, int *chosen)
{
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die_json("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = htons((uint16_t)port);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        die_json("bind 127.0.0.1:%d: %s", port, strerror(errno));
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    *chosen = ntohs(sa.sin_port);
    if (type == SOCK_STREAM && listen(fd, 4096) != 0)
        die_json("listen: %s", strerror(errno));
    return fd;
}

static void ep_add(int ep, struct ent *e, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = e};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, e->fd, &ev) != 0)
        die_json("epoll_ctl: %s", strerror(errno));
}

static void conn_close(int ep, struct ent *c, long *open_conns)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->buf);
    free(c);
    (*open_conns)--;
}

static int run_server(const struct opts *o)
{
    int is_echo = !strcmp(o->cmd, "echo");
    int udp = o->udp_port >= 0;
    int tcp = o->tcp_port >= 0;
    if (udp == tcp || (!is_echo && udp))
        usage();

    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die_json("epoll_create1: %s", strerror(errno));

    int port = 0;
    struct ent lst = {.kind = tcp ? K_LISTEN : K_UDP};
    lst.fd = bind_socket(tcp ? SOCK_STREAM : SOCK_DGRAM, tcp ? o->tcp_port : o->udp_port, &port);
    if (udp)
        set_bufs(lst.fd, 8 << 20);
    ep_add(ep, &lst, EPOLLIN);

    /* stdin EOF ends the server; epoll refuses regular files and /dev/null */
    struct ent in = {.kind = K_STDIN, .fd = 0};
    struct epoll_event iev = {.events = EPOLLIN, .data.ptr = &in};
    int watch_stdin = epoll_ctl(ep, EPOLL_CTL_ADD, 0, &iev) == 0;

    printf("{\"port\":%d}\n", port);
    fflush(stdout);

    static char sinkbuf[256 * 1024];
    struct mmsghdr msgs[UDP_BATCH];
    struct iovec iovs[UDP_BATCH];
    struct sockaddr_in addrs[UDP_BATCH];
    static char ubufs[UDP_BATCH][UDP_MAX];

    uint64_t deadline = now_ns() + (uint64_t)(o->lifetime * 1e9);
    long open_conns = 0, accepted = 0;
    uint64_t bytes = 0, datagrams = 0;
    struct epoll_event evs[256];
    const char *why = "deadline";

    while (!g_stop) {
        if (now_ns() >= deadline)
            break;
        int n = epoll_wait(ep, evs, 256, 500);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die_json("epoll_wait: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            struct ent *e = evs[i].data.ptr;
            if (e->kind == K_STDIN) {
                char b[256];
                ssize_t r = read(0, b, sizeof b);
                if (r <= 0 && !(r < 0 && errno == EINTR)) {
                    why = "stdin closed";
                    g_stop = 1;
                }
                continue;
            }
            if (e->kind == K_LISTEN) {
                for (int k = 0; k < 64; k++) {
                    int cfd = accept4(e->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0)
                        break; /* EAGAIN, EMFILE, ...: try again next wakeup */
                    struct ent *c = calloc(1, sizeof *c);
                    if (!c) {
                        close(cfd);
                        break;
                    }
                    c->kind = K_CONN;
                    c->fd = cfd;
                    if (is_echo) {
                        set_nodelay(cfd);
                        c->buf = malloc(ECHO_BUF);
                        if (!c->buf) {
                            close(cfd);
                            free(c);
                            break;
                        }
                    }
                    c->events = EPOLLIN;
                    ep_add(ep, c, EPOLLIN);
                    open_conns++;
                    accepted++;
                }
                continue;
            }
            if (e->kind == K_UDP) {
                for (int k = 0; k < 64; k++) {
                    for (int j = 0; j < UDP_BATCH; j++) {
                        iovs[j].iov_base = ubufs[j];
                        iovs[j].iov_len = UDP_MAX;
                        memset(&msgs[j], 0, sizeof msgs[j]);
                        msgs[j].msg_hdr.msg_iov = &iovs[j];
                        msgs[j].msg_hdr.msg_iovlen = 1;
                        msgs[j].msg_hdr.msg_name = &addrs[j];
                        msgs[j].msg_hdr.msg_namelen = sizeof addrs[j];
                    }
                    int got = recvmmsg(e->fd, msgs, UDP_BATCH, MSG_DONTWAIT, NULL);
                    if (got <= 0)
                        break;
                    for (int j = 0; j < got; j++) {
                        iovs[j].iov_len = msgs[j].msg_len;
                        bytes += msgs[j].msg_len;
                    }
                    datagrams += (uint64_t)got;
                    int off = 0;
                    while (off < got) {
                        int s = sendmmsg(e->fd, msgs + off, (unsigned)(got - off), MSG_DONTWAIT);
                        if (s <= 0) {
                            if (s < 0 && (errno == EAGAIN || errno == ENOBUFS))
                                break; /* drop the rest: UDP */
                            off++; /* skip a datagram whose peer is gone */
                            continue;
                        }
                        off += s;
                    }
                    if (got < UDP_BATCH)
                        break;
                }
                continue;
            }
            /* K_CONN */
            struct ent *c = e;
            int closed = 0;
            if (!is_echo) {
                for (int k = 0; k < 16; k++) {
                    ssize_t r = read(c->fd, sinkbuf, sizeof sinkbuf);
                    if (r > 0) {
                        bytes += (uint64_t)r;
                        if ((size_t)r < sizeof sinkbuf)
                            break;
                        continue;
                    }
                    if (r < 0 && (errno == EAGAIN || errno == EINTR))
                        break;
                    closed = 1;
                    break;
                }
            } else {
                /* flush pending bytes, then read more; the budget bounds the
                 * work per wakeup and is only checked with nothing pending */
                int budget = 16, want_out = 0;
                for (;;) {
                    if (c->off < c->len) {
                        ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
                        if (w < 0) {
                            if (errno == EAGAIN || errno == EINTR)
                                want_out = 1;
                            else
                                closed = 1;
                            break;
                        }
                        c->off += (size_t)w;
                        c->echoed += (uint64_t)w;
                        if (c->off < c->len) {
                            want_out = 1;
                            break;
                        }
                        if (o->close_after > 0 && c->echoed >= (uint64_t)o->close_after) {
                            closed = 1; /* everything echoed: the server closes first */
                            break;
                        }
                    }
                    if (budget-- == 0)
                        break;
                    ssize_t r = read(c->fd, c->buf, ECHO_BUF);
                    if (r > 0) {
                        bytes += (uint64_t)r;
                        c->off = 0;
                        c->len = (size_t)r;
                        continue;
                    }
                    if (!(r < 0 && (errno == EAGAIN || errno == EINTR)))
                        closed = 1;
                    break;
                }
                uint32_t want = want_out ? EPOLLOUT : EPOLLIN;
                if (!closed && want != c->events) {
                    struct epoll_event ev = {.events = want, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                    c->events = want;
                }
            }
            if (closed)
                conn_close(ep, c, &open_conns);
        }
    }
    if (g_stop && strcmp(why, "stdin closed") != 0)
        why = "signal";
    (void)watch_stdin;
    printf("{\"port\":%d,\"accepted\":%ld,\"open\":%ld,\"bytes\":%" PRIu64
           ",\"datagrams\":%" PRIu64 ",\"exit\":\"%s\"}\n",
           port, accepted, open_conns, bytes, datagrams, why);
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------ bulk */

struct bulk_thr {
    pthread_t th;
    int fd;
    uint64_t start, end;
    uint64_t bytes;
    uint64_t stopped;
    int err;
};

static void *bulk_main(void *arg)
{
    struct bulk_thr *t = arg;
    static char buf[BULK_BUF]; /* shared read-only payload */
    while (now_ns() < t->start)
        sleep_ns(100000);
    for (;;) {
        uint64_t now = now_ns();
        if (now >= t->end)
            break;
        ssize_t n = write(t->fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            t->err = errno;
            break;
        }
        t->bytes += (uint64_t)n;
    }
    t->stopped = now_ns();
    return NULL;
}

static int run_bulk(const struct opts *o)
{
    if (!o->connect)
        usage();
    struct sockaddr_in sa;
    parse_addr(o->connect, &sa);
    signal(SIGPIPE, SIG_IGN);
    struct bulk_thr *t = calloc((size_t)o->streams, sizeof *t);
    if (!t)
        die_json("oom");
    for (int i = 0; i < o->streams; i++) {
        t[i].fd = tcp_connect(&sa, IO_TIMEOUT_MS);
        if (t[i].fd < 0)
            die_json("connect %s: %s", o->connect, strerror(errno));
    }
    uint64_t start = now_ns() + 20000000ull; /* common start in 20 ms */
    uint64_t end = start + (uint64_t)(o->seconds * 1e9);
    for (int i = 0; i < o->streams; i++) {
        t[i].start = start;
        t[i].end = end;
        if (pthread_create(&t[i].th, NULL, bulk_main, &t[i]) != 0)
            die_json("pthread_create");
    }
    uint64_t bytes = 0, last = start;
    int errs = 0;
    for (int i = 0; i < o->streams; i++) {
        pthread_join(t[i].th, NULL);
        bytes += t[i].bytes;
        if (t[i].stopped > last)
            last = t[i].stopped;
        if (t[i].err)
            errs++;
        close(t[i].fd);
    }
    double secs = (double)(last - start) / 1e9;
    if (secs <= 0)
        secs = o->seconds;
    printf("{\"gbps\":%.3f,\"bytes\":%" PRIu64 ",\"seconds\":%.3f,\"streams\":%d,\"errors\":%d}\n",
           (double)bytes * 8.0 / secs / 1e9, bytes, secs, o->streams, errs);
    free(t);
    return errs ? 1 : 0;
}

/* -------------------------------------------------------------------- rr */

static int run_rr(const struct opts *o)
{
    if (!o->connect || o->tcp == o->udp)
        usage();
    struct sockaddr_in sa;
    parse_addr(o->connect, &sa);
    signal(SIGPIPE, SIG_IGN);
    double maxs = o->max_seconds > 0 ? o->max_seconds : 120;
    uint64_t deadline = now_ns() + (uint64_t)(maxs * 1e9);
    size_t size = (size_t)o->size;
    char out[UDP_MAX], in[UDP_MAX];
    memset(out, 'x', sizeof out);
    uint64_t *lat = malloc(sizeof(uint64_t) * (size_t)(o->count ? o->count : 1));
    if (!lat)
        die_json("oom");

    int fd;
    if (o->tcp) {
        fd = tcp_connect(&sa, IO_TIMEOUT_MS);
        if (fd < 0)
            die_json("connect %s: %s", o->connect, strerror(errno));
        set_nodelay(fd);
    } else {
        fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
            die_json("udp connect %s: %s", o->connect, strerror(errno));
        set_timeouts(fd, 200); /* a datagram not back in 200 ms is lost */
    }

    long total = o->warmup + o->count, done = 0, lost = 0;
    size_t nlat = 0;
    int timed_out = 0;
    for (long i = 0; i < total; i++) {
        if ((i & 63) == 0 && now_ns() >= deadline) {
            timed_out = 1;
            break;
        }
        uint64_t seq = (uint64_t)i;
        memcpy(out, &seq, sizeof seq);
        uint64_t t0 = now_ns();
        if (o->tcp) {
            if (write_all(fd, out, size) != 0 || read_all(fd, in, size) != 0)
                die_json("tcp round trip %ld: %s", i, strerror(errno));
        } else {
            if (send(fd, out, size, 0) < 0) {
                if (errno == ECONNREFUSED || errno == EINTR) {
                    lost++;
                    continue;
                }
                die_json("udp send: %s", strerror(errno));
            }
            int ok = 0;
            while (!ok) {
                ssize_t r = recv(fd, in, sizeof in, 0);
                if (r < 0) {
                    if (errno == EINTR)
                        continue;
                    if (errno == EAGAIN || errno == ECONNREFUSED)
                        break; /* lost */
                    die_json("udp recv: %s", strerror(errno));
                }
                uint64_t got;
                if ((size_t)r >= sizeof got) {
                    memcpy(&got, in, sizeof got);
                    if (got == seq)
                        ok = 1; /* else: a late answer to an earlier request */
                }
            }
            if (!ok) {
                lost++;
                if (lost > 1000 + total / 10)
                    die_json("udp: too many lost round trips (%ld)", lost);
                continue;
            }
        }
        uint64_t t1 = now_ns();
        done++;
        if (i >= o->warmup && nlat < (size_t)o->count)
            lat[nlat++] = t1 - t0;
    }
    close(fd);
    if (nlat == 0)
        die_json("no round trips measured");
    double sum = 0;
    for (size_t i = 0; i < nlat; i++)
        sum += (double)lat[i];
    qsort(lat, nlat, sizeof *lat, cmp_u64);
    printf("{\"p50_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,\"mean_us\":%.2f,\"min_us\":%.2f,"
           "\"max_us\":%.2f,\"count\":%zu,\"lost\":%ld,\"timed_out\":%s}\n",
           pct_us(lat, nlat, 0.50), pct_us(lat, nlat, 0.99), pct_us(lat, nlat, 0.999),
           sum / (double)nlat / 1000.0, pct_us(lat, nlat, 0.0), pct_us(lat, nlat, 1.0), nlat, lost,
           timed_out ? "true" : "false");
    free(lat);
    return 0;
}

/* --------------------------------------------------------------- udprate */

struct udp_rx {
    int fd;
    atomic_int stop;
    uint64_t received;
};

static void *udp_rx_main(void *arg)
{
    struct udp_rx *rx = arg;
    struct mmsghdr msgs[UDP_BATCH];
    struct iovec iovs[UDP_BATCH];
    static char bufs[UDP_BATCH][UDP_MAX];
    for (int j = 0; j < UDP_BATCH; j++) {
        iovs[j].iov_base = bufs[j];
        iovs[j].iov_len = UDP_MAX;
    }
    /* the socket has SO_RCVTIMEO 50 ms, so this loop notices stop quickly */
    for (;;) {
        for (int j = 0; j < UDP_BATCH; j++) {
            memset(&msgs[j], 0, sizeof msgs[j]);
            msgs[j].msg_hdr.msg_iov = &iovs[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(rx->fd, msgs, UDP_BATCH, MSG_WAITFORONE, NULL);
        if (n > 0) {
            rx->received += (uint64_t)n;
            continue;
        }
        if (atomic_load(&rx->stop))
            break;
    }
    return NULL;
}

static int run_udprate(const struct opts *o)
{
    if (!o->connect)
        usage();
    struct sockaddr_in sa;
    parse_addr(o->connect, &sa);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0)
        die_json("udp connect %s: %s", o->connect, strerror(errno));
    set_bufs(fd, 8 << 20);
    struct timeval tv = {.tv_sec = 0, .tv_usec = 50000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    /* Establish the proxy's session first (socat forks a child, nginx and
     * ezproxy create a session on the first datagram): one probe must come
     * back within 2 s, then anything left over is drained. Not counted. */
    {
        char probe[UDP_MAX], back[UDP_MAX];
        memset(probe, 'p', (size_t)o->size);
        uint64_t give_up = now_ns() + 2000000000ull;
        int up = 0;
        struct timeval ptv = {.tv_sec = 0, .tv_usec = 100000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &ptv, sizeof ptv);
        while (!up && now_ns() < give_up) {
            if (send(fd, probe, (size_t)o->size, 0) < 0 && errno != ECONNREFUSED)
                die_json("udp send: %s", strerror(errno));
            if (recv(fd, back, sizeof back, 0) > 0)
                up = 1;
        }
        if (!up)
            die_json("no echo through %s within 2 s", o->connect);
        sleep_ns(50000000ull);
        while (recv(fd, back, sizeof back, MSG_DONTWAIT) > 0) {
        }
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    struct udp_rx rx = {.fd = fd};
    atomic_init(&rx.stop, 0);
    pthread_t th;
    if (pthread_create(&th, NULL, udp_rx_main, &rx) != 0)
        die_json("pthread_create");

    enum { B = 32 };
    struct mmsghdr msgs[B];
    struct iovec iovs[B];
    static char bufs[B][UDP_MAX];
    for (int j = 0; j < B; j++) {
        memset(bufs[j], 'u', (size_t)o->size);
        iovs[j].iov_base = bufs[j];
        iovs[j].iov_len = (size_t)o->size;
        memset(&msgs[j], 0, sizeof msgs[j]);
        msgs[j].msg_hdr.msg_iov = &iovs[j];
        msgs[j].msg_hdr.msg_iovlen = 1;
    }

    uint64_t attempted = 0, sent = 0, errors = 0;
    uint64_t t0 = now_ns();
    uint64_t dur = (uint64_t)(o->seconds * 1e9);
    uint64_t end = t0 + dur;
    double ns_per_pkt = 1e9 / o->rate;
    uint64_t now;
    while ((now = now_ns()) < end) {
        uint64_t due = (uint64_t)((double)(now - t0) / ns_per_pkt) + 1;
        if (due <= attempted) {
            uint64_t next = t0 + (uint64_t)((double)attempted * ns_per_pkt);
            uint64_t wait = next > now ? next - now : 0;
            if (wait > 1000000)
                wait = 1000000;
            if (wait > 2000)
                sleep_ns(wait);
            continue;
        }
        uint64_t want = due - attempted;
        if (want > B)
            want = B;
        for (unsigned j = 0; j < want; j++) {
            uint64_t seq = attempted + j;
            memcpy(bufs[j], &seq, sizeof seq);
        }
        int n = sendmmsg(fd, msgs, (unsigned)want, 0);
        if (n < 0) {
            errors++;
            attempted += want; /* ECONNREFUSED/ENOBUFS: those packets are lost */
            continue;
        }
        attempted += want;
        sent += (uint64_t)n;
        if ((uint64_t)n < want)
            errors += want - (uint64_t)n;
    }
    uint64_t send_end = now_ns();
    sleep_ns(200000000ull); /* stragglers: wait 200 ms after sending stops */
    atomic_store(&rx.stop, 1);
    pthread_join(th, NULL);
    close(fd);
    double secs = (double)(send_end - t0) / 1e9;
    uint64_t lost = sent > rx.received ? sent - rx.received : 0;
    double loss = sent ? (double)lost / (double)sent : 1.0;
    printf("{\"sent\":%" PRIu64 ",\"received\":%" PRIu64 ",\"loss\":%.6f,\"lost\":%" PRIu64
           ",\"rate_target\":%.0f,\"rate_sent\":%.0f,\"rate_received\":%.0f,\"seconds\":%.3f,"
           "\"errors\":%" PRIu64 "}\n",
           sent, rx.received, loss, lost, o->rate, (double)sent / secs, (double)rx.received / secs,
           secs, errors);
    return 0;
}

/* -------------------------------------------------------------- connrate */

struct cr_thr {
    pthread_t th;
    int client_close;
    struct sockaddr_in sa;
    uint64_t end;
    uint64_t ok, errors;
    int last_err;
};

static void *cr_main(void *arg)
{
    struct cr_thr *t = arg;
    char b = 'c';
    while (now_ns() < t->end) {
        int fd = tcp_connect(&t->sa, IO_TIMEOUT_MS);
        if (fd < 0) {
            t->errors++;
            t->last_err = errno;
            sleep_ns(1000000);
            continue;
        }
        char r[16];
        if (write_all(fd, &b, 1) == 0 && read_all(fd, r, 1) == 0) {
            if (t->client_close) {
                t->ok++;
            } else {
                /* the server closes first (echo --close-after 1): wait for its
                 * FIN so TIME_WAIT lands on the server side, not on our
                 * ephemeral ports (which caps loopback at ~14k conn/s) */
                ssize_t n;
                while ((n = read(fd, r, sizeof r)) < 0 && errno == EINTR) {
                }
                if (n == 0) {
                    t->ok++;
                } else {
                    t->errors++;
                    t->last_err = n < 0 ? errno : EPROTO;
                }
            }
        } else {
            t->errors++;
            t->last_err = errno;
        }
        close(fd);
    }
    return NULL;
}

static int run_connrate(const struct opts *o)
{
    if (!o->connect)
        usage();
    struct sockaddr_in sa;
    parse_addr(o->connect, &sa);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    struct cr_thr *t = calloc((size_t)o->concurrency, sizeof *t);
    if (!t)
        die_json("oom");
    uint64_t start = now_ns();
    uint64_t end = start + (uint64_t)(o->seconds * 1e9);
    for (int i = 0; i < o->concurrency; i++) {
        t[i].sa = sa;
        t[i].end = end;
        t[i].client_close = o->client_close;
        if (pthread_create(&t[i].th, NULL, cr_main, &t[i]) != 0)
            die_json("pthread_create");
    }
    uint64_t ok = 0, errors = 0;
    int last_err = 0;
    for (int i = 0; i < o->concurrency; i++) {
        pthread_join(t[i].th, NULL);
        ok += t[i].ok;
        errors += t[i].errors;
        if (t[i].last_err)
            last_err = t[i].last_err;
    }
    double secs = (double)(now_ns() - start) / 1e9;
    printf("{\"cps\":%.0f,\"connections\":%" PRIu64 ",\"errors\":%" PRIu64
           ",\"seconds\":%.3f,\"concurrency\":%d,\"close\":\"%s\",\"last_error\":\"%s\"}\n",
           (double)ok / secs, ok, errors, secs, o->concurrency, o->client_close ? "client" : "server",
           last_err ? strerror(last_err) : "");
    free(t);
    return 0;
}

/* ------------------------------------------------------------------ idle */

static int run_idle(const struct opts *o)
{
    if (!o->connect)
        usage();
    struct sockaddr_in sa;
    parse_addr(o->connect, &sa);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    double maxs = o->max_seconds > 0 ? o->max_seconds : 600;
    uint64_t deadline = now_ns() + (uint64_t)(maxs * 1e9);
    int *fds = malloc(sizeof(int) * (size_t)(o->count ? o->count : 1));
    if (!fds)
        die_json("oom");
    long open_n = 0, failed = 0;
    for (long i = 0; i < o->count && now_ns() < deadline; i++) {
        int fd = tcp_connect(&sa, IO_TIMEOUT_MS);
        if (fd < 0) {
            failed++;
            continue;
        }
        if (o->ping) {
            char b = 'i', r;
            if (write_all(fd, &b, 1) != 0 || read_all(fd, &r, 1) != 0) {
                close(fd);
                failed++;
                continue;
            }
        }
        fds[open_n++] = fd;
    }
    printf("{\"open\":%ld,\"failed\":%ld}\n", open_n, failed);
    fflush(stdout);
    /* hold until stdin closes (or the deadline) */
    for (;;) {
        uint64_t now = now_ns();
        if (now >= deadline)
            break;
        struct pollfd p = {.fd = 0, .events = POLLIN};
        int ms = (int)((deadline - now) / 1000000ull);
        if (ms > 1000)
            ms = 1000;
        int r = poll(&p, 1, ms);
        if (r > 0) {
            char b[64];
            ssize_t n = read(0, b, sizeof b);
            if (n <= 0 && !(n < 0 && errno == EINTR))
                break;
        } else if (r < 0 && errno != EINTR) {
            break;
        }
    }
    for (long i = 0; i < open_n; i++)
        close(fds[i]);
    free(fds);
    return 0;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    struct opts o;
    parse_opts(argc, argv, &o);
    if (!strcmp(o.cmd, "sink") || !strcmp(o.cmd, "echo"))
        return run_server(&o);
    if (!strcmp(o.cmd, "bulk"))
        return run_bulk(&o);
    if (!strcmp(o.cmd, "rr"))
        return run_rr(&o);
    if (!strcmp(o.cmd, "udprate"))
        return run_udprate(&o);
    if (!strcmp(o.cmd, "connrate"))
        return run_connrate(&o);
    if (!strcmp(o.cmd, "idle"))
        return run_idle(&o);
    usage();
    return 2;
}
