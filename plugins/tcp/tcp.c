/*
 * tcp.c - the `tcp` transport plugin: listens (one SO_REUSEPORT socket per
 * worker), connects, reads and writes TCP legs for the core, half-closes,
 * and bridges two legs with splice(2) when the core asks for the fast path.
 *
 * Threads: listen/unlisten run on the control thread; everything else runs
 * on the worker that owns the listening socket or the leg. No global state;
 * the core is reached only through the table it hands us.
 *
 * Reentrancy: a core callback (leg_recv, leg_eof, leg_error, leg_connected,
 * leg_backpressure, ...) may close the leg, or its bridged peer, before it
 * returns. So every entry point holds the legs it works on (tcp_hold); a
 * close that arrives meanwhile releases the fd, watch, timer and packets at
 * once and leaves only the memory to the last tcp_drop. After any callback
 * the code re-checks `closing` (and `peer`) before going on.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <ezproxy/sdk.h>

#define TCP_ACCEPT_BURST 64          /* accepts per wakeup */
#define TCP_READ_BURST 4             /* reads (or splices) per wakeup, for fairness */
#define TCP_IOV_MAX 64               /* iovecs per sendmsg */
#define TCP_HIGH_WATER (256 * 1024)  /* queued bytes: backpressure on */
#define TCP_LOW_WATER (64 * 1024)    /* queued bytes: backpressure off */
#define TCP_PIPE_SIZE (1024 * 1024)  /* asked of F_SETPIPE_SZ */
#define TCP_MAX_PACKET 65536         /* when leg_max_packet says 0 */
#define TCP_TIMEOUT_MS 5000          /* ConnectTimeoutMs default */
#define TCP_MAX_HOPS 4               /* worker hand-offs of one accepted client */
#define TCP_LOG_EVERY_US 10000000ull /* accept failures: one log line per 10 s */
#define TCP_ACCEPT_PAUSE_MS 100      /* accept fails and no client can be refused: wait */

/*
 * One config struct serves both tables: connect() also dials client legs
 * with the From config (or NULL) and can then read only the common fields.
 * The core zero-fills configs, so connect_timeout_ms is 0 (= default) in a
 * From config; ConnectTimeoutMs has min 1, so 0 never comes from YAML.
 */
struct tcp_conf {
	struct ezp_addr addr;       /* Listen (From) or Connect (To) */
	int nodelay;                /* NoDelay */
	int64_t backlog;            /* Backlog; From only */
	int64_t connect_timeout_ms; /* ConnectTimeoutMs; To only */
};

struct tcp_listener;

struct tcp_lsock { /* one listening socket, used by one worker */
	struct tcp_listener *l;
	struct ezp_worker *worker;
	int fd;
	int spare; /* reserved descriptor, given up to refuse a client on EMFILE */
	struct ezp_watch *watch;
	struct ezp_timer *retry; /* made on first use: watching again after a pause */
};

struct tcp_listener {
	const struct ezp_core *core;
	struct ezp_listener *listener;
	/*
	 * Pausing and resuming a socket's watch after a failed accept (workers)
	 * against unlisten (control, while the workers run): under mu, nothing
	 * touches a watch or a retry timer once closing is set.
	 */
	pthread_mutex_t mu;
	int closing;
	int nodelay;
	char *pipeline;     /* for log lines */
	uint64_t logged_us; /* atomic: when an accept failure was last logged */
	unsigned n;
	struct tcp_lsock socks[];
};

struct tcp_leg { /* a leg's state (leg_set_state) */
	const struct ezp_core *core;
	struct ezp_leg *leg;
	struct ezp_worker *worker;
	int fd;
	struct ezp_watch *watch;
	unsigned events;            /* what the watch is set to */
	struct ezp_timer *timer;    /* connect timeout */
	struct ezp_packet **q;      /* out queue: a ring of q_cap (a power of two) */
	size_t q_cap, q_head, q_n;
	size_t q_off;               /* bytes of the head packet already written */
	size_t q_bytes;             /* bytes queued, not yet written */
	struct tcp_leg *peer;       /* bridged with; NULL when not bridged */
	int pipe[2];                /* bytes read from this leg on their way to peer */
	size_t pipe_bytes, pipe_cap;
	unsigned busy;              /* tcp_hold depth */
	int werr;                   /* a write error not reported yet */
	unsigned connecting : 1, connected : 1, paused : 1, rd_eof : 1, eof_sent : 1,
		shut_pending : 1, shut_done : 1, backpressure : 1, dead : 1, closing : 1;
};

static const char *tcp_strerror(int e, char *buf, size_t len)
{
	return strerror_r(e, buf, len); /* GNU version: thread-safe, may ignore buf */
}

__attribute__((format(printf, 4, 5))) static void tcp_seterr(struct ezp_error *err, int code,
							      int side, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return;
	err->code = code;
	err->side = side;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof err->message, fmt, ap);
	va_end(ap);
}

/* ---- leg state ---------------------------------------------------------- */

static struct tcp_leg *tcp_leg_new(const struct ezp_core *core, struct ezp_worker *w, int fd)
{
	struct tcp_leg *t = calloc(1, sizeof *t);

	if (t) {
		t->core = core;
		t->worker = w;
		t->fd = fd;
		t->pipe[0] = t->pipe[1] = -1;
	}
	return t;
}

static void tcp_pipe_close(struct tcp_leg *t)
{
	if (t->pipe[0] >= 0) {
		close(t->pipe[0]);
		close(t->pipe[1]);
	}
	t->pipe[0] = t->pipe[1] = -1;
	t->pipe_bytes = 0;
}

static void tcp_update_watch(struct tcp_leg *t);

/*
 * Release everything but the memory of @t (idempotent). A bridged peer goes
 * back to normal mode: bytes in its pipe were meant for @t and are dropped;
 * an end of stream it read but had not reported is found again by its next
 * read. Thread: worker.
 */
static void tcp_release(struct tcp_leg *t)
{
	const struct ezp_core *core = t->core;
	struct tcp_leg *p = t->peer;

	if (p) {
		t->peer = p->peer = NULL;
		if (p->pipe_bytes)
			tcp_pipe_close(p);
		if (p->rd_eof && !p->eof_sent)
			p->rd_eof = 0;
		tcp_update_watch(p);
	}
	if (t->timer)
		core->timer_free(t->timer);
	if (t->watch)
		core->watch_free(t->watch);
	if (t->fd >= 0)
		close(t->fd);
	t->timer = NULL;
	t->watch = NULL;
	t->fd = -1;
	tcp_pipe_close(t);
	for (; t->q_n; t->q_n--, t->q_head = (t->q_head + 1) & (t->q_cap - 1))
		core->packet_unref(t->q[t->q_head]);
	free(t->q);
	t->q = NULL;
	t->q_cap = t->q_bytes = t->q_off = 0;
}

static void tcp_hold(struct tcp_leg *t)
{
	t->busy++;
}

/* Undo tcp_hold; frees @t if it was closed meanwhile. Do not touch @t after. */
static void tcp_drop(struct tcp_leg *t)
{
	if (--t->busy == 0 && t->closing)
		free(t);
}

/* Set the watch from the leg's state. Thread: worker. */
static void tcp_update_watch(struct tcp_leg *t)
{
	unsigned ev = 0;
	int rd = !t->paused && !t->rd_eof;

	if (t->closing || !t->watch)
		return;
	if (t->connecting && !t->dead) {
		ev = EZP_WATCH_WRITE;
	} else if (t->connected && !t->dead) {
		if (t->peer) /* bridged: read only into an empty pipe, after injected bytes */
			rd = rd && !t->pipe_bytes && !t->peer->q_n;
		if (rd)
			ev |= EZP_WATCH_READ;
		if (t->q_n || t->werr || (t->peer && t->peer->pipe_bytes))
			ev |= EZP_WATCH_WRITE;
	}
	if (ev != t->events) {
		t->events = ev;
		t->core->watch_set(t->watch, ev);
	}
}

/* Report a failure once; the core closes the leg (maybe right now). Thread: worker. */
static void tcp_fail(struct tcp_leg *t, const char *what, int e)
{
	char buf[128], msg[192];

	if (t->dead || t->closing)
		return;
	t->dead = 1;
	tcp_update_watch(t);
	snprintf(msg, sizeof msg, "%s: %s", what, tcp_strerror(e, buf, sizeof buf));
	t->core->leg_error(t->leg, EZP_CLOSE_ERROR, msg);
}

/* ---- the out queue ------------------------------------------------------ */

static int tcp_q_push(struct tcp_leg *t, struct ezp_packet *pkt, int front)
{
	if (t->q_n == t->q_cap) {
		size_t cap = t->q_cap ? t->q_cap * 2 : 16, i;
		struct ezp_packet **q = malloc(cap * sizeof *q);

		if (!q)
			return -1;
		for (i = 0; i < t->q_n; i++)
			q[i] = t->q[(t->q_head + i) & (t->q_cap - 1)];
		free(t->q);
		t->q = q;
		t->q_cap = cap;
		t->q_head = 0;
	}
	if (front)
		t->q_head = (t->q_head - 1) & (t->q_cap - 1);
	t->q[(t->q_head + (front ? 0 : t->q_n)) & (t->q_cap - 1)] = pkt;
	t->q_n++;
	t->q_bytes += pkt->len;
	return 0;
}

/* Tell the core when the queue crosses a watermark (it may call back). Thread: worker. */
static void tcp_check_backpressure(struct tcp_leg *t)
{
	if (!t->backpressure && t->q_bytes > TCP_HIGH_WATER) {
		t->backpressure = 1;
		t->core->leg_backpressure(t->leg, 1);
	} else if (t->backpressure && t->q_bytes <= TCP_LOW_WATER) {
		t->backpressure = 0;
		t->core->leg_backpressure(t->leg, 0);
	}
}

/*
 * Write as much of the queue as the socket takes. Reports nothing itself:
 * returns -1 with t->werr set. May call leg_backpressure. While bridged it
 * waits until the pipe toward this leg is empty. Thread: worker.
 */
static int tcp_flush(struct tcp_leg *t)
{
	struct iovec iov[TCP_IOV_MAX];
	struct msghdr mh = {.msg_iov = iov};
	size_t i, off, n, want;
	ssize_t r;

	if (t->werr)
		return -1;
	if (!t->connected || t->fd < 0 || (t->peer && t->peer->pipe_bytes))
		return 0;
	while (t->q_n) {
		for (i = 0, off = t->q_off, want = 0; i < t->q_n && i < TCP_IOV_MAX; i++, off = 0) {
			struct ezp_packet *pkt = t->q[(t->q_head + i) & (t->q_cap - 1)];

			iov[i].iov_base = pkt->data + off;
			iov[i].iov_len = pkt->len - off;
			want += iov[i].iov_len;
		}
		mh.msg_iovlen = i;
		r = sendmsg(t->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (r < 0) {
			t->werr = errno;
			return -1;
		}
		for (n = (size_t)r, t->q_bytes -= n; n;) { /* drop what was written */
			struct ezp_packet *pkt = t->q[t->q_head];

			if (n < pkt->len - t->q_off) {
				t->q_off += n;
				break;
			}
			n -= pkt->len - t->q_off;
			t->q_off = 0;
			t->core->packet_unref(pkt);
			t->q_head = (t->q_head + 1) & (t->q_cap - 1);
			t->q_n--;
		}
		if ((size_t)r < want)
			break; /* the socket is full: skip the EAGAIN round trip */
	}
	tcp_check_backpressure(t);
	return 0;
}

/*
 * Half-close once everything queued (and piped) toward the peer is written,
 * then tell the core (which may end the session, closing @t, right here).
 * The caller holds @t. Thread: worker.
 */
static void tcp_try_shutdown(struct tcp_leg *t)
{
	if (!t->shut_pending || t->shut_done || !t->connected || t->q_n || t->fd < 0 ||
	    (t->peer && t->peer->pipe_bytes))
		return;
	t->shut_done = 1;
	if (shutdown(t->fd, SHUT_WR) < 0 && errno != ENOTCONN)
		t->core->log(EZP_LOG_DEBUG, "tcp", "shutdown: errno %d", errno);
	t->core->leg_write_done(t->leg);
}

/* ---- event paths (worker) ----------------------------------------------- */

/* Normal mode: up to TCP_READ_BURST reads, each handed to the core. Thread: worker. */
static void tcp_read(struct tcp_leg *t)
{
	const struct ezp_core *core = t->core;
	struct ezp_packet *pkt;
	size_t max;
	ssize_t n;
	int i, e;

	for (i = 0; i < TCP_READ_BURST; i++) {
		if (t->closing || t->dead || t->paused || t->rd_eof || t->peer)
			return;
		if (!(max = core->leg_max_packet(t->leg)))
			max = TCP_MAX_PACKET;
		if (!(pkt = core->packet_new(max))) {
			tcp_fail(t, "read", ENOMEM);
			return;
		}
		n = read(t->fd, pkt->data, max);
		if (n > 0) {
			pkt->len = (size_t)n; /* shrinking in place is allowed */
			core->leg_recv(t->leg, pkt); /* may close t */
			if ((size_t)n < max)
				return;
			continue;
		}
		e = errno;
		core->packet_unref(pkt);
		if (n == 0) {
			t->rd_eof = t->eof_sent = 1;
			tcp_update_watch(t);
			core->leg_eof(t->leg); /* may close t */
			return;
		}
		if (e != EINTR) {
			if (e != EAGAIN && e != EWOULDBLOCK)
				tcp_fail(t, "read", e);
			return;
		}
	}
}

static int tcp_gone(const struct tcp_leg *s, const struct tcp_leg *d)
{
	return s->closing || d->closing || s->dead || d->dead || s->peer != d;
}

/*
 * Bridged mode: move bytes from @s through its pipe to @d: first what is in
 * the pipe, then @d's injected packets, then end of stream, then new reads.
 * The caller holds both legs. Returns -1 once a callback closed, failed or
 * unbridged either leg (then only update_watch and drop them). Thread: worker.
 */
static int tcp_pump(struct tcp_leg *s, struct tcp_leg *d)
{
	const unsigned flags = SPLICE_F_NONBLOCK | SPLICE_F_MOVE;
	int rounds = 0, drained = 0;
	ssize_t n;

	if (tcp_gone(s, d) || d->werr)
		return -1;
	for (;;) {
		while (s->pipe_bytes) {
			n = splice(s->pipe[0], NULL, d->fd, NULL, s->pipe_bytes, flags);
			if (n > 0) {
				s->pipe_bytes -= (size_t)n;
				s->core->leg_bridged_bytes(s->leg, (size_t)n);
				if (tcp_gone(s, d))
					return -1;
			} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
				return 0; /* d is full: its WRITE watch calls us again */
			} else if (n == 0 || errno != EINTR) {
				tcp_fail(d, "write", n == 0 ? EPIPE : errno);
				return -1;
			}
		}
		if (d->q_n && tcp_flush(d) < 0) {
			tcp_fail(d, "write", d->werr);
			return -1;
		}
		if (tcp_gone(s, d))
			return -1;
		if (d->q_n)
			return 0;
		tcp_try_shutdown(d);
		if (tcp_gone(s, d))
			return -1;
		if (s->rd_eof) {
			if (s->eof_sent)
				return 0;
			s->eof_sent = 1;
			tcp_update_watch(s);
			s->core->leg_eof(s->leg); /* the core shuts d down, or closes both */
			return tcp_gone(s, d) ? -1 : 0;
		}
		/* a short read emptied the socket: the level-triggered watch says when
		 * more comes, so skip the splice that would only say EAGAIN */
		if (s->paused || drained || rounds++ >= TCP_READ_BURST)
			return 0;
		n = splice(s->fd, NULL, s->pipe[1], NULL, s->pipe_cap, flags);
		if (n > 0) {
			s->pipe_bytes += (size_t)n;
			drained = (size_t)n < s->pipe_cap;
		} else if (n == 0) {
			s->rd_eof = 1;
		} else if (errno == EAGAIN || errno == EWOULDBLOCK) {
			return 0;
		} else if (errno != EINTR) {
			tcp_fail(s, "read", errno);
			return -1;
		}
	}
}

/*
 * The connect finished (@e = 0) or failed; tell the core once. The message is
 * only the reason ("Connection refused"): the core adds "connect to ADDR".
 * Thread: worker.
 */
static void tcp_connect_done(struct tcp_leg *t, int e)
{
	char buf[128];

	t->connecting = 0;
	t->core->timer_stop(t->timer);
	if (e) {
		t->dead = 1;
		tcp_update_watch(t);
		t->core->leg_connected(t->leg, e == ETIMEDOUT ? EZP_ERR_TIMEOUT : EZP_ERR_IO,
				       tcp_strerror(e, buf, sizeof buf));
		return;
	}
	t->connected = 1;
	tcp_update_watch(t);
	t->core->leg_connected(t->leg, EZP_OK, "");
	if (!t->closing && !t->dead && tcp_flush(t) < 0) /* sent while connecting */
		tcp_fail(t, "write", t->werr);
	else if (!t->closing)
		tcp_try_shutdown(t);
}

/* The leg's socket is ready. Thread: the leg's worker. */
static void tcp_on_event(int fd, unsigned events, void *arg)
{
	struct tcp_leg *t = arg, *p;
	socklen_t len = sizeof(int);
	int e = 0;

	tcp_hold(t);
	if (t->connecting) {
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len) < 0)
			e = errno;
		if (e != EINPROGRESS && e != EALREADY && e != EINTR)
			tcp_connect_done(t, e);
	} else if ((p = t->peer)) {
		tcp_hold(p);
		if (t->werr) {
			tcp_fail(t, "write", t->werr);
		} else if (!(events & EZP_WATCH_WRITE) || tcp_pump(p, t) == 0) {
			if (events & EZP_WATCH_READ) /* p's pipe into t first, then t's reads */
				tcp_pump(t, p);
		}
		tcp_update_watch(p);
		tcp_drop(p);
	} else {
		if ((events & EZP_WATCH_WRITE) && (t->werr || tcp_flush(t) < 0))
			tcp_fail(t, "write", t->werr);
		else if ((events & EZP_WATCH_WRITE) && !t->closing)
			tcp_try_shutdown(t);
		if ((events & EZP_WATCH_READ) && !t->closing)
			tcp_read(t);
	}
	tcp_update_watch(t);
	tcp_drop(t);
}

/*
 * The leg's timer: ConnectTimeoutMs passed, or a write error was found
 * outside a write wakeup (tcp_fail_soon). Thread: the leg's worker.
 */
static void tcp_on_timer(void *arg)
{
	struct tcp_leg *t = arg;

	tcp_hold(t);
	if (t->connecting)
		tcp_connect_done(t, ETIMEDOUT);
	else if (t->werr)
		tcp_fail(t, "write", t->werr);
	tcp_drop(t);
}

/*
 * Report t->werr from the event loop soon. A write wakeup would report it
 * too, but only once the socket takes bytes again, which may be never when
 * the peer does not read; meanwhile send() refuses (and so drops) every
 * packet for the leg. Not reported here directly: the core is in the
 * middle of a call into us. Thread: worker.
 */
static void tcp_fail_soon(struct tcp_leg *t)
{
	if (!t->timer && !(t->timer = t->core->timer_new(t->worker, tcp_on_timer, t)))
		return; /* out of memory: the next write wakeup reports it */
	t->core->timer_start(t->timer, 0, 0);
}

/* ---- transport ops on legs (worker) ------------------------------------- */

/* (transfer full) @pkt: written in order; released when written, refused or at close. */
static int tcp_send(struct ezp_leg *leg, void *state, struct ezp_packet *pkt)
{
	struct tcp_leg *t = state;
	int rc = EZP_OK;

	(void)leg;
	if (!t)
		return EZP_ERR_CLOSED; /* cannot happen after accept/connect */
	if (t->closing || t->dead || t->werr || t->shut_pending)
		rc = EZP_ERR_CLOSED;
	if (rc || !pkt->len) {
		t->core->packet_unref(pkt);
		return rc;
	}
	tcp_hold(t);
	if (tcp_q_push(t, pkt, 0) < 0) {
		t->core->packet_unref(pkt);
		rc = EZP_ERR_NOMEM;
	} else if (t->q_n == 1) {
		(void)tcp_flush(t); /* an error is reported from the watch (werr) */
	}
	if (!t->closing)
		tcp_check_backpressure(t);
	tcp_update_watch(t);
	tcp_drop(t);
	return rc;
}

static void tcp_set_paused(void *state, int paused)
{
	struct tcp_leg *t = state;

	if (t) {
		t->paused = !!paused;
		tcp_update_watch(t);
	}
}

static void tcp_pause(struct ezp_leg *leg, void *state)
{
	(void)leg;
	tcp_set_paused(state, 1);
}

static void tcp_resume(struct ezp_leg *leg, void *state)
{
	(void)leg;
	tcp_set_paused(state, 0);
}

static void tcp_shutdown_write(struct ezp_leg *leg, void *state)
{
	struct tcp_leg *t = state;

	(void)leg;
	if (t && !t->closing) {
		t->shut_pending = 1;
		tcp_hold(t);
		tcp_try_shutdown(t);
		tcp_drop(t);
	}
}

/* Also called from inside our own callbacks: the memory waits for the last tcp_drop. */
static void tcp_close(struct ezp_leg *leg, void *state)
{
	struct tcp_leg *t = state;

	(void)leg;
	if (!t || t->closing)
		return;
	t->closing = 1;
	tcp_release(t);
	if (!t->busy)
		free(t);
}

/* Make the leg's pipe (once; kept until close). Thread: worker. */
static int tcp_pipe_open(struct tcp_leg *t)
{
	int sz;

	if (t->pipe[0] >= 0)
		return 0;
	if (pipe2(t->pipe, O_NONBLOCK | O_CLOEXEC) < 0) {
		t->pipe[0] = t->pipe[1] = -1;
		return -1;
	}
	(void)fcntl(t->pipe[1], F_SETPIPE_SZ, TCP_PIPE_SIZE); /* may be refused */
	sz = fcntl(t->pipe[1], F_GETPIPE_SZ);
	t->pipe_cap = sz > 0 ? (size_t)sz : 65536;
	return 0;
}

static int tcp_bridgeable(const struct tcp_leg *t)
{
	return t && t->connected && !t->dead && !t->closing && !t->werr && !t->peer && !t->q_n;
}

/* Forward a <-> b with splice from now on, or decline with EZP_ERR_AGAIN. Thread: worker. */
static int tcp_bridge(struct ezp_leg *a, void *a_state, struct ezp_leg *b, void *b_state)
{
	struct tcp_leg *x = a_state, *y = b_state;

	(void)a;
	(void)b;
	if (x == y || !tcp_bridgeable(x) || !tcp_bridgeable(y))
		return EZP_ERR_AGAIN;
	if (tcp_pipe_open(x) < 0 || tcp_pipe_open(y) < 0)
		return EZP_ERR_AGAIN; /* out of descriptors: stay on the full path */
	x->peer = y;
	y->peer = x;
	tcp_update_watch(x);
	tcp_update_watch(y);
	return EZP_OK;
}

/*
 * Move what is still in @x's pipe to the front of @y's out queue, as one
 * packet. The head of @y's queue is never partly written at this point (it
 * is flushed only once @x's pipe is empty), so order holds. Bytes that
 * cannot be kept fail @y rather than vanish. Thread: worker.
 */
static void tcp_unpipe(struct tcp_leg *x, struct tcp_leg *y)
{
	struct ezp_packet *pkt;
	size_t got = 0;
	ssize_t r;

	if (!x->pipe_bytes || x->closing || y->closing)
		return;
	if (!(pkt = x->core->packet_new(x->pipe_bytes))) {
		y->werr = ENOMEM;
		tcp_pipe_close(x);
		tcp_fail_soon(y);
		return;
	}
	while (got < x->pipe_bytes) {
		r = read(x->pipe[0], pkt->data + got, x->pipe_bytes - got);
		if (r > 0)
			got += (size_t)r;
		else if (r == 0 || errno != EINTR)
			break;
	}
	pkt->len = got;
	if (got < x->pipe_bytes || tcp_q_push(y, pkt, 1) < 0) {
		x->core->packet_unref(pkt);
		y->werr = got < x->pipe_bytes ? EIO : ENOMEM;
		tcp_pipe_close(x);
		tcp_fail_soon(y);
		return;
	}
	x->pipe_bytes = 0;
	x->core->leg_bridged_bytes(x->leg, got);
}

/* Back to the full path; bytes in flight lead the out queues. Thread: worker. */
static void tcp_unbridge(struct ezp_leg *a, void *a_state, struct ezp_leg *b, void *b_state)
{
	struct tcp_leg *x = a_state, *y = b_state, *both[2] = {a_state, b_state};
	int i;

	(void)a;
	(void)b;
	if (!x || !y || x->peer != y)
		return;
	tcp_hold(x);
	tcp_hold(y);
	tcp_unpipe(x, y);
	tcp_unpipe(y, x);
	x->peer = y->peer = NULL;
	for (i = 0; i < 2; i++) {
		if (both[i]->rd_eof && !both[i]->eof_sent)
			both[i]->rd_eof = 0; /* its next read finds the end of stream again */
		if (!both[i]->closing)
			tcp_check_backpressure(both[i]);
		tcp_update_watch(both[i]);
	}
	tcp_drop(y);
	tcp_drop(x);
}

/*
 * Dial args->addr (never the config's address). A failure message is only
 * the reason, as for a connect that fails later: the core adds "connect to
 * ADDR: " to whatever it is given. Thread: the leg's worker.
 */
static int tcp_connect(const struct ezp_core *core, const struct ezp_connect_args *args,
		       struct ezp_error *err)
{
	const struct tcp_conf *conf = args->config; /* To, From (client dial) or NULL */
	struct ezp_worker *w = args->worker ? args->worker : core->leg_worker(args->leg);
	uint64_t ms = TCP_TIMEOUT_MS;
	int one = 1, e = ENOMEM, rc;
	struct tcp_leg *t;
	char buf[128];

	if (!args->addr || !args->addr->len) {
		tcp_seterr(err, EZP_ERR_INVAL, EZP_SIDE_INTERNAL, "tcp: no address to connect to");
		return EZP_ERR_INVAL;
	}
	if (conf && conf->connect_timeout_ms > 0) /* 0: a From config (client dial) */
		ms = (uint64_t)conf->connect_timeout_ms;
	if (!(t = tcp_leg_new(core, w, -1))) {
		tcp_seterr(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "tcp: out of memory");
		return EZP_ERR_NOMEM;
	}
	t->leg = args->leg;
	t->fd = socket(args->addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (t->fd < 0)
		goto fail_errno;
	if (!conf || conf->nodelay)
		(void)setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(t->fd, (const struct sockaddr *)&args->addr->ss, args->addr->len) == 0)
		t->connected = 1;
	else if (errno == EINPROGRESS || errno == EINTR)
		t->connecting = 1;
	else
		goto fail_errno;
	t->events = t->connecting ? EZP_WATCH_WRITE : 0;
	if (!(t->watch = core->watch_add(w, t->fd, t->events, tcp_on_event, t)))
		goto fail;
	if (t->connecting && !(t->timer = core->timer_new(w, tcp_on_timer, t)))
		goto fail;
	if (t->connecting)
		core->timer_start(t->timer, ms, 0);
	t->paused = 1; /* reads start at resume */
	rc = t->connecting ? EZP_ERR_AGAIN : EZP_OK;
	core->leg_set_state(args->leg, t); /* the core may use the leg from here on */
	return rc;

fail_errno:
	e = errno;
fail:
	tcp_seterr(err, e == ENOMEM ? EZP_ERR_NOMEM : EZP_ERR_IO, EZP_SIDE_SERVER, "%s",
		   tcp_strerror(e, buf, sizeof buf));
	tcp_release(t);
	free(t);
	return e == ENOMEM ? EZP_ERR_NOMEM : EZP_ERR_IO;
}

/* ---- listening ---------------------------------------------------------- */

struct tcp_handoff { /* a client on its way to the worker its session lives on */
	const struct ezp_core *core;
	struct ezp_listener *listener;
	struct ezp_worker *worker;
	int fd, hops;
	struct ezp_addr peer;
};

static void tcp_handoff_run(void *arg);

/* Offer accepted socket @fd (taken) to the core; the leg starts paused. Thread: @w. */
static void tcp_admit(const struct ezp_core *core, struct ezp_listener *listener,
		      struct ezp_worker *w, int fd, const struct ezp_addr *peer, int hops)
{
	struct ezp_accept a = {.struct_size = sizeof a, .listener = listener, .worker = w};
	struct tcp_handoff *h;
	struct tcp_leg *t;
	int rc;

	if (!(t = tcp_leg_new(core, w, fd))) {
		core->log(EZP_LOG_WARN, "tcp", "out of memory: client refused");
		close(fd);
		return;
	}
	a.peer = *peer;
	a.local.len = sizeof a.local.ss;
	if (getsockname(fd, (struct sockaddr *)&a.local.ss, &a.local.len) < 0)
		a.local.len = 0;
	rc = core->listener_accept(&a);
	if (rc == EZP_OK && a.leg) {
		t->leg = a.leg;
		t->connected = t->paused = 1;
		if (!(t->watch = core->watch_add(w, fd, 0, tcp_on_event, t))) {
			tcp_release(t); /* closes fd; the core never calls close for this leg */
			free(t);
			core->leg_error(a.leg, EZP_CLOSE_ERROR, "tcp: cannot watch the socket");
			return;
		}
		core->leg_set_state(a.leg, t); /* may start, resume or even close the leg */
		return;
	}
	free(t); /* the fd goes on, or is closed below */
	if (rc == EZP_ERR_AGAIN && a.move_to && hops < TCP_MAX_HOPS && (h = malloc(sizeof *h))) {
		*h = (struct tcp_handoff){core, listener, a.move_to, fd, hops + 1, *peer};
		if (core->defer(a.move_to, tcp_handoff_run, h) == EZP_OK)
			return;
		free(h);
	}
	close(fd); /* refused: the core has logged why */
}

/* Thread: the worker the core moved the client to. */
static void tcp_handoff_run(void *arg)
{
	struct tcp_handoff *h = arg;

	tcp_admit(h->core, h->listener, h->worker, h->fd, &h->peer, h->hops);
	free(h);
}

/* Log an accept failure, at most once per TCP_LOG_EVERY_US per listener. Thread: a worker. */
static void tcp_accept_failed(struct tcp_listener *l, int e)
{
	uint64_t now = l->core->now_us(), last = __atomic_load_n(&l->logged_us, __ATOMIC_RELAXED);
	char buf[128];

	if ((last && now - last < TCP_LOG_EVERY_US) ||
	    !__atomic_compare_exchange_n(&l->logged_us, &last, now, 0, __ATOMIC_RELAXED,
					 __ATOMIC_RELAXED))
		return;
	l->core->log(EZP_LOG_WARN, "tcp", "pipeline '%s': accept: %s%s", l->pipeline,
		     tcp_strerror(e, buf, sizeof buf),
		     e == EMFILE || e == ENFILE ? "; refusing new clients until descriptors"
			     " are free (raise the open-file limit, ulimit -n)" : "");
}

/*
 * Out of descriptors: give up the spare one for a moment to accept and close
 * one waiting client, so the level-triggered watch does not spin. Returns -1
 * when that was not possible. Thread: the socket's worker.
 */
static int tcp_refuse_one(struct tcp_lsock *ls)
{
	int c = -1;

	if (ls->spare >= 0) {
		close(ls->spare);
		if ((c = accept4(ls->fd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
			close(c);
	}
	ls->spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
	return c >= 0 ? 0 : -1;
}

/* The pause after a failed accept is over. Thread: ls->worker. */
static void tcp_accept_resume(void *arg)
{
	struct tcp_lsock *ls = arg;

	pthread_mutex_lock(&ls->l->mu);
	if (!ls->l->closing) {
		if (ls->spare < 0)
			ls->spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
		ls->l->core->watch_set(ls->watch, EZP_WATCH_READ);
	}
	pthread_mutex_unlock(&ls->l->mu);
}

/*
 * Accepting failed and no waiting client could be refused (no spare, or an
 * error other than EMFILE/ENFILE): the client stays queued and the socket
 * readable, so the level-triggered watch would call us again at once, and
 * again, spinning the worker. Stop watching for TCP_ACCEPT_PAUSE_MS instead.
 * Thread: ls->worker.
 */
static void tcp_accept_pause(struct tcp_lsock *ls)
{
	const struct ezp_core *core = ls->l->core;

	pthread_mutex_lock(&ls->l->mu);
	if (!ls->l->closing &&
	    (ls->retry || (ls->retry = core->timer_new(ls->worker, tcp_accept_resume, ls)))) {
		core->watch_set(ls->watch, 0);
		core->timer_start(ls->retry, TCP_ACCEPT_PAUSE_MS, 0);
	} /* else out of memory as well: nothing better to do than to be called again */
	pthread_mutex_unlock(&ls->l->mu);
}

/* The listening socket is readable. Thread: ls->worker. */
static void tcp_on_accept(int fd, unsigned events, void *arg)
{
	struct tcp_lsock *ls = arg;
	struct tcp_listener *l = ls->l;
	struct ezp_addr peer;
	int i, c, e, one = 1;

	(void)events;
	for (i = 0; i < TCP_ACCEPT_BURST; i++) {
		peer.len = sizeof peer.ss;
		c = accept4(fd, (struct sockaddr *)&peer.ss, &peer.len,
			    SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (c < 0) {
			e = errno;
			if (e == EINTR || e == ECONNABORTED || e == EPROTO)
				continue;
			if (e == EAGAIN || e == EWOULDBLOCK)
				return;
			tcp_accept_failed(l, e);
			if ((e == EMFILE || e == ENFILE) && tcp_refuse_one(ls) == 0)
				continue;
			tcp_accept_pause(ls);
			return;
		}
		if (l->nodelay)
			(void)setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		tcp_admit(l->core, l->listener, ls->worker, c, &peer, 0);
	}
}

/* Close every socket; sessions stay open. Thread: control (workers quiet). */
static void tcp_unlisten(void *state)
{
	struct tcp_listener *l = state;
	unsigned i;

	if (!l)
		return;
	pthread_mutex_lock(&l->mu); /* from here on no callback touches a watch or timer */
	l->closing = 1;
	pthread_mutex_unlock(&l->mu);
	for (i = 0; i < l->n; i++) {
		/* each free waits for its own callback if one is running right now */
		if (l->socks[i].retry)
			l->core->timer_free(l->socks[i].retry);
		if (l->socks[i].watch)
			l->core->watch_free(l->socks[i].watch);
		if (l->socks[i].fd >= 0)
			close(l->socks[i].fd);
		if (l->socks[i].spare >= 0)
			close(l->socks[i].spare);
	}
	pthread_mutex_destroy(&l->mu);
	free(l->pipeline);
	free(l);
}

/* One listening socket per worker, all on the same port. Thread: control. */
static int tcp_listen(const struct ezp_core *core, const struct ezp_listen_args *args,
		      void **state, struct ezp_addr *bound, struct ezp_error *err)
{
	const struct tcp_conf *conf = args->config;
	int one = 1, backlog, e = ENOMEM;
	struct tcp_listener *l;
	struct ezp_addr addr;
	char at[EZP_ADDR_STRLEN], buf[128];
	unsigned i;

	if (!conf || !conf->addr.len || !args->n_workers) {
		tcp_seterr(err, EZP_ERR_INVAL, EZP_SIDE_CONFIG, "tcp: %s", args->n_workers ?
			   "From needs a Listen address" : "no workers to listen on");
		return EZP_ERR_INVAL;
	}
	l = calloc(1, sizeof *l + args->n_workers * sizeof l->socks[0]);
	if (!l || !(l->pipeline = strdup(args->pipeline ? args->pipeline : "?"))) {
		free(l);
		tcp_seterr(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "tcp: out of memory");
		return EZP_ERR_NOMEM;
	}
	l->core = core;
	l->listener = args->listener;
	pthread_mutex_init(&l->mu, NULL);
	l->nodelay = conf->nodelay;
	l->n = args->n_workers;
	for (i = 0; i < l->n; i++)
		l->socks[i] = (struct tcp_lsock){.l = l, .worker = args->workers[i], .fd = -1,
						 .spare = -1};
	backlog = conf->backlog > 0 ? (int)conf->backlog : 1024;
	addr = conf->addr;
	for (i = 0; i < l->n; i++) {
		struct tcp_lsock *ls = &l->socks[i];

		ls->fd = socket(addr.ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (ls->fd < 0 ||
		    setsockopt(ls->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
		    setsockopt(ls->fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0 ||
		    bind(ls->fd, (const struct sockaddr *)&addr.ss, addr.len) < 0 ||
		    listen(ls->fd, backlog) < 0)
			goto fail_errno;
		if (i == 0) { /* port 0: the others bind the port the kernel chose */
			addr.len = sizeof addr.ss;
			if (getsockname(ls->fd, (struct sockaddr *)&addr.ss, &addr.len) < 0)
				goto fail_errno;
		}
		ls->spare = open("/dev/null", O_RDONLY | O_CLOEXEC); /* best effort */
	}
	for (i = 0; i < l->n; i++) {
		l->socks[i].watch = core->watch_add(l->socks[i].worker, l->socks[i].fd,
						    EZP_WATCH_READ, tcp_on_accept, &l->socks[i]);
		if (!l->socks[i].watch)
			goto fail;
	}
	*state = l;
	*bound = addr;
	return EZP_OK;

fail_errno:
	e = errno;
fail:
	core->addr_format(&addr, at, sizeof at);
	tcp_seterr(err, EZP_ERR_IO, EZP_SIDE_CONFIG, "cannot listen on %s: %s%s", at,
		   tcp_strerror(e, buf, sizeof buf),
		   e == EADDRINUSE ? "; something else uses it: pick another port in From.Listen"
		   : e == EACCES ? "; ports below 1024 need root or CAP_NET_BIND_SERVICE"
		   : e == EADDRNOTAVAIL ? "; no local interface has that address" : "");
	tcp_unlisten(l);
	return EZP_ERR_IO;
}

/* Thread: any. */
static int tcp_connect_address(const void *config, struct ezp_addr *out)
{
	const struct tcp_conf *c = config;

	if (!c || !c->addr.len)
		return EZP_ERR_NOT_FOUND;
	*out = c->addr;
	return EZP_OK;
}

/* ---- the descriptor ----------------------------------------------------- */

static const struct ezp_param tcp_listen_params[] = {
	{.key = "Listen", .type = EZP_PARAM_ADDR, .offset = offsetof(struct tcp_conf, addr),
	 .required = 1, .doc = "where clients connect, e.g. \"0.0.0.0:7000\" or \"[::]:7000\""},
	{.key = "Backlog", .type = EZP_PARAM_INT, .offset = offsetof(struct tcp_conf, backlog),
	 .def = "1024", .min = 1, .max = 65535, .doc = "listen(2) queue length, per worker"},
	{.key = "NoDelay", .type = EZP_PARAM_BOOL, .offset = offsetof(struct tcp_conf, nodelay),
	 .def = "true", .doc = "set TCP_NODELAY on client sockets (no Nagle delay)"},
	EZP_PARAM_END,
};

static const struct ezp_param tcp_connect_params[] = {
	{.key = "Connect", .type = EZP_PARAM_ADDR, .offset = offsetof(struct tcp_conf, addr),
	 .required = 1, .doc = "server address to connect to, e.g. \"10.0.0.5:7000\""},
	{.key = "ConnectTimeoutMs", .type = EZP_PARAM_MS,
	 .offset = offsetof(struct tcp_conf, connect_timeout_ms), .def = "5000", .min = 1,
	 .max = 3600000, .doc = "give up connecting after this many milliseconds"},
	{.key = "NoDelay", .type = EZP_PARAM_BOOL, .offset = offsetof(struct tcp_conf, nodelay),
	 .def = "true", .doc = "set TCP_NODELAY on server sockets (no Nagle delay)"},
	EZP_PARAM_END,
};

static const struct ezp_transport_kind tcp_kind = {
	.struct_size = sizeof(struct ezp_transport_kind),
	.name = "tcp",
	.description = "TCP streams: a SO_REUSEPORT listener per worker, splice(2) fast path",
	.flags = EZP_TRANSPORT_STREAM,
	.listen_params = tcp_listen_params,
	.listen_config_size = sizeof(struct tcp_conf),
	.connect_params = tcp_connect_params,
	.connect_config_size = sizeof(struct tcp_conf),
	.connect_address = tcp_connect_address,
	.listen = tcp_listen,
	.unlisten = tcp_unlisten,
	.connect = tcp_connect,
	.send = tcp_send,
	.pause = tcp_pause,
	.resume = tcp_resume,
	.shutdown_write = tcp_shutdown_write,
	.close = tcp_close,
	.bridge = tcp_bridge,
	.unbridge = tcp_unbridge,
};

static const struct ezp_transport_kind *const tcp_transports[] = {&tcp_kind, NULL};

EZP_PLUGIN_DEFINE(ezp_plugin, .name = "tcp", .version = "0.1.0",
		  .description = "TCP transport: listen, connect, half-close, zero-copy bridging",
		  .license = "MIT", .transports = tcp_transports);
