/*
 * udp.c - the `udp` transport: UDP datagrams, one session per client address.
 *
 * From: one SO_REUSEPORT socket per worker, all bound to one address, so the
 * kernel hashes each client address to one worker's socket. That worker keeps
 * a map client address -> client leg (or -> "forward to the worker that owns
 * this client's session"). To: one connected socket per server leg. Datagrams
 * are read with recvmmsg and written with sendmmsg, `Batch` at a time.
 * unlisten moves each live client leg onto its own socket bound to the listen
 * address and connected to the client, so its session goes on while the
 * port is rebound; a leg that cannot move keeps its worker socket open.
 *
 * Threads: udp_listen/udp_unlisten run on the control thread and touch only a
 * group's immutable fields, its atomic `listening` flag and its atomic
 * refcount. A worker socket (map, outbox, buffers, `users`) and every leg are
 * touched only on their worker; cross-worker work goes through core->defer.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <ezproxy/sdk.h>

#define UDP_SRC "udp"
#define UDP_DGRAM_MAX 65536 /* receive slot per datagram: 65,507 bytes (IPv4) pass whole */
_Static_assert(UDP_DGRAM_MAX > 65535 - 8, "a slot holds any UDP payload: none is cut short");
#define UDP_OUT_MAX 1024    /* datagrams kept per socket while the kernel says EAGAIN */
#define UDP_OUT_HIGH 768    /* own-socket legs: backpressure on above this */
#define UDP_SOCKBUF (4 << 20)
#define UDP_ROUNDS 4        /* recvmmsg calls per readable event (fairness) */
#define UDP_MAX_HOPS 2      /* worker hand-overs per datagram */
#define UDP_MAX_FWD 65536   /* cached forward entries per worker socket */

#define UDP_DEBUG(core, ...)                                                   \
	do {                                                                   \
		if ((core)->log_enabled(EZP_LOG_DEBUG))                        \
			(core)->log(EZP_LOG_DEBUG, UDP_SRC, __VA_ARGS__);     \
	} while (0)


/* Both configs start with `batch`: connect() may get either (client dials). */
struct udp_from {
	int64_t batch;
	struct ezp_addr listen;
	int64_t idle_ms;
};

struct udp_to {
	int64_t batch;
	struct ezp_addr connect;
};

struct udp_leg;
struct udp_sock;

/* A client address on one worker socket: its leg, or a forward to another worker. */
struct udp_entry {
	struct udp_entry *next;
	uint32_t hash;
	struct ezp_addr addr;  /* normalised: unused bytes zero */
	struct udp_leg *leg;   /* NULL: a forward */
	struct udp_sock *to;   /* forward: the socket of the worker owning the session */
	uint64_t used_ms;      /* forward: last use */
};

struct udp_map {
	struct udp_entry **b;
	size_t nb, n, n_fwd;
};

struct udp_qent {
	struct ezp_packet *pkt;
	struct udp_leg *leg; /* shared socket: send to leg's address; own socket: NULL */
};

/* Datagrams waiting for sendmmsg: a ring of up to UDP_OUT_MAX. */
struct udp_out {
	struct udp_qent *q;
	unsigned head, len, cap;
	int scheduled; /* a deferred flush is pending */
	int blocked;   /* EAGAIN: watching WRITE */
	uint64_t dropped;
};

struct udp_io {
	unsigned batch;
	struct mmsghdr *msgs, *smsgs;   /* recvmmsg, sendmmsg */
	struct iovec *iov, *siov;
	struct sockaddr_storage *names; /* shared sockets only */
	uint8_t *bufs;                  /* batch * UDP_DGRAM_MAX, on first read */
};

/* One worker's listening socket. */
struct udp_sock {
	const struct ezp_core *core;
	struct udp_group *g;
	struct ezp_worker *worker;
	int fd;
	struct ezp_watch *watch;
	unsigned events;
	struct ezp_timer *sweep; /* expires forwards */
	unsigned users;          /* listener + client legs + pending defers */
	unsigned index;          /* in g->socks */
	uint32_t seed;           /* map hash seed: clients choose the keys */
	int torn;                /* resources released; the shell lives on with g */
	struct udp_map map;
	struct udp_out out;
	struct udp_io io;
};

/* One listener: its sockets on every worker. */
struct udp_group {
	const struct ezp_core *core;
	struct ezp_listener *listener;
	struct ezp_addr bound;
	uint64_t idle_ms;
	int listening;  /* atomic */
	unsigned refs;  /* atomic: control + one per socket + deferred work */
	char *pipeline;
	unsigned n;
	struct udp_sock *socks[];
};

/*
 * A leg. Shared-socket client legs (sock != NULL) are in sock->map and send
 * through sock->out. Every other leg (server, dialled client, or a client
 * moved off its listener by unlisten) owns a connected fd.
 */
struct udp_leg {
	const struct ezp_core *core;
	struct ezp_leg *leg;
	struct ezp_worker *worker;
	struct udp_entry ent;  /* ent.addr: the peer */
	struct udp_sock *sock;
	struct ezp_addr bind;  /* own fd of a moved client leg: the listen address */
	int fd;
	struct ezp_watch *watch;
	unsigned events;
	struct udp_out out;
	struct udp_io io;
	struct ezp_timer *idle;
	uint64_t idle_ms, last_ms;
	int client, paused, closed, bp;
	int moved; /* unlisten gave it its own socket; it leaves the worker socket next */
	unsigned busy; /* callbacks and defers in progress: free waits for 0 */
	uint64_t unreachable;
};

/* ---- small helpers ------------------------------------------------------- */

static uint64_t udp_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

__attribute__((format(printf, 4, 5))) static int udp_fail(struct ezp_error *err, int code,
							  int side, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return code;
	memset(err, 0, sizeof(*err));
	err->code = code;
	err->side = side;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return code;
}

/* Count an event; true on the 1st, 2nd, 4th, 8th... so floods never flood the log. */
static int udp_count(uint64_t *n)
{
	++*n;
	return (*n & (*n - 1)) == 0;
}

static unsigned udp_batch(int64_t b)
{
	return b < 1 ? 32 : b > 256 ? 256 : (unsigned)b;
}

/* Copy the meaningful fields of @sa so addresses compare with memcmp. */
static int udp_addr_norm(const void *sa, socklen_t len, struct ezp_addr *out)
{
	const struct sockaddr_in *in4 = sa;
	const struct sockaddr_in6 *in6 = sa;

	memset(out, 0, sizeof(*out));
	if (in4->sin_family == AF_INET && len >= sizeof(*in4)) {
		struct sockaddr_in *o = (struct sockaddr_in *)&out->ss;

		o->sin_family = AF_INET;
		o->sin_port = in4->sin_port;
		o->sin_addr = in4->sin_addr;
		out->len = sizeof(*o);
		return 0;
	}
	if (in6->sin6_family == AF_INET6 && len >= sizeof(*in6)) {
		struct sockaddr_in6 *o = (struct sockaddr_in6 *)&out->ss;

		o->sin6_family = AF_INET6;
		o->sin6_port = in6->sin6_port;
		o->sin6_addr = in6->sin6_addr;
		o->sin6_scope_id = in6->sin6_scope_id;
		out->len = sizeof(*o);
		return 0;
	}
	return -1;
}

/* @a as seen by a socket of @family: IPv4 becomes v4-mapped on IPv6 sockets. */
static int udp_addr_for(const struct ezp_addr *a, int family, struct ezp_addr *out)
{
	struct sockaddr_in v4;
	struct sockaddr_in6 *o;

	if (udp_addr_norm(&a->ss, a->len, out))
		return -1;
	if (out->ss.ss_family == family)
		return 0;
	if (family != AF_INET6)
		return -1;
	memcpy(&v4, &out->ss, sizeof(v4));
	memset(out, 0, sizeof(*out));
	o = (struct sockaddr_in6 *)&out->ss;
	o->sin6_family = AF_INET6;
	o->sin6_port = v4.sin_port;
	o->sin6_addr.s6_addr[10] = 0xff;
	o->sin6_addr.s6_addr[11] = 0xff;
	memcpy(&o->sin6_addr.s6_addr[12], &v4.sin_addr, 4);
	out->len = sizeof(*o);
	return 0;
}

static uint32_t udp_addr_hash(const struct ezp_addr *a, uint32_t seed)
{
	const uint8_t *p = (const uint8_t *)&a->ss;
	uint32_t h = 2166136261u ^ seed;
	socklen_t i;

	for (i = 0; i < a->len; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

static void udp_group_unref(struct udp_group *g)
{
	unsigned i;

	if (__atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL))
		return;
	for (i = 0; i < g->n; i++)
		free(g->socks[i]);
	free(g->pipeline);
	free(g);
}

/* ---- the address map (chained hash) -------------------------------------- */

static struct udp_entry *udp_map_find(struct udp_map *m, const struct ezp_addr *a, uint32_t h)
{
	struct udp_entry *e;

	if (!m->nb)
		return NULL;
	for (e = m->b[h & (m->nb - 1)]; e; e = e->next)
		if (e->hash == h && e->addr.len == a->len && !memcmp(&e->addr.ss, &a->ss, a->len))
			return e;
	return NULL;
}

static int udp_map_add(struct udp_map *m, struct udp_entry *e)
{
	if (m->n >= m->nb) {
		size_t nb = m->nb ? m->nb * 2 : 16, i;
		struct udp_entry **b = calloc(nb, sizeof(*b)), *x, *next;

		if (!b && !m->nb)
			return -1;
		for (i = 0; b && i < m->nb; i++)
			for (x = m->b[i]; x; x = next) {
				next = x->next;
				x->next = b[x->hash & (nb - 1)];
				b[x->hash & (nb - 1)] = x;
			}
		if (b) {
			free(m->b);
			m->b = b;
			m->nb = nb;
		}
	}
	e->next = m->b[e->hash & (m->nb - 1)];
	m->b[e->hash & (m->nb - 1)] = e;
	m->n++;
	m->n_fwd += !e->leg;
	return 0;
}

static void udp_map_del(struct udp_map *m, struct udp_entry *e)
{
	struct udp_entry **p;

	if (!m->nb)
		return;
	for (p = &m->b[e->hash & (m->nb - 1)]; *p && *p != e; p = &(*p)->next)
		;
	if (*p) {
		*p = e->next;
		m->n--;
		m->n_fwd -= !e->leg;
	}
}

/* Free forwards unused for the idle timeout (or all of them). */
static void udp_sweep(struct udp_sock *s, uint64_t now, int all)
{
	struct udp_entry **p, *e;
	size_t i;

	for (i = 0; i < s->map.nb && s->map.n_fwd; i++)
		for (p = &s->map.b[i]; (e = *p);) {
			if (e->leg || (!all && now - e->used_ms < s->g->idle_ms)) {
				p = &e->next;
				continue;
			}
			*p = e->next;
			s->map.n--;
			s->map.n_fwd--;
			free(e);
		}
	if (!s->map.n_fwd && s->sweep)
		s->core->timer_stop(s->sweep);
}

static void udp_sweep_fire(void *arg)
{
	udp_sweep(arg, udp_now_ms(), 0);
}

/* ---- batches in and out --------------------------------------------------- */

static int udp_io_init(struct udp_io *io, unsigned batch, int named)
{
	io->batch = batch;
	io->msgs = calloc(batch, sizeof(*io->msgs));
	io->smsgs = calloc(batch, sizeof(*io->smsgs));
	io->iov = calloc(batch, sizeof(*io->iov));
	io->siov = calloc(batch, sizeof(*io->siov));
	io->names = named ? calloc(batch, sizeof(*io->names)) : NULL;
	return io->msgs && io->smsgs && io->iov && io->siov && (!named || io->names) ? 0 : -1;
}

static void udp_io_free(struct udp_io *io)
{
	free(io->msgs);
	free(io->smsgs);
	free(io->iov);
	free(io->siov);
	free(io->names);
	free(io->bufs);
	memset(io, 0, sizeof(*io));
}

/* recvmmsg up to a batch. Returns the count, or -1 with errno. */
static int udp_io_recv(struct udp_io *io, int fd)
{
	unsigned i;
	char c;

	if (!io->bufs && !(io->bufs = malloc((size_t)io->batch * UDP_DGRAM_MAX))) {
		(void)recv(fd, &c, 1, MSG_DONTWAIT | MSG_TRUNC); /* drop one, or we spin */
		errno = ENOMEM;
		return -1;
	}
	for (i = 0; i < io->batch; i++) {
		struct msghdr *h = &io->msgs[i].msg_hdr;

		memset(h, 0, sizeof(*h));
		io->iov[i].iov_base = io->bufs + (size_t)i * UDP_DGRAM_MAX;
		io->iov[i].iov_len = UDP_DGRAM_MAX;
		h->msg_iov = &io->iov[i];
		h->msg_iovlen = 1;
		if (io->names) {
			h->msg_name = &io->names[i];
			h->msg_namelen = sizeof(io->names[i]);
		}
	}
	return recvmmsg(fd, io->msgs, io->batch, MSG_DONTWAIT, NULL);
}

static int udp_out_push(struct udp_out *o, struct ezp_packet *pkt, struct udp_leg *leg)
{
	if (o->len == o->cap) {
		unsigned cap = o->cap ? o->cap * 2 : 64, i;
		struct udp_qent *q;

		if (o->cap >= UDP_OUT_MAX || !(q = malloc(cap * sizeof(*q))))
			return -1;
		for (i = 0; i < o->len; i++)
			q[i] = o->q[(o->head + i) & (o->cap - 1)];
		free(o->q);
		o->q = q;
		o->cap = cap;
		o->head = 0;
	}
	o->q[(o->head + o->len++) & (o->cap - 1)] = (struct udp_qent){pkt, leg};
	return 0;
}

/* Take @leg's datagrams (all when @leg is NULL) out of @from, into @to or released. */
static void udp_out_take(const struct ezp_core *core, struct udp_out *from,
			 const struct udp_leg *leg, struct udp_out *to)
{
	unsigned i, kept = 0;

	for (i = 0; i < from->len; i++) {
		struct udp_qent e = from->q[(from->head + i) & (from->cap - 1)];

		if (leg && e.leg != leg)
			from->q[(from->head + kept++) & (from->cap - 1)] = e;
		else if (!to || udp_out_push(to, e.pkt, NULL))
			core->packet_unref(e.pkt);
	}
	from->len = kept;
}

/* sendmmsg what is queued until empty or EAGAIN. Calls nothing in the core but unref/log. */
static void udp_out_flush(const struct ezp_core *core, struct udp_out *o, struct udp_io *io,
			  int fd)
{
	while (o->len) {
		unsigned n = o->len < io->batch ? o->len : io->batch, i;
		int r;

		for (i = 0; i < n; i++) {
			struct udp_qent *e = &o->q[(o->head + i) & (o->cap - 1)];
			struct msghdr *h = &io->smsgs[i].msg_hdr;

			memset(h, 0, sizeof(*h));
			io->siov[i].iov_base = e->pkt->data;
			io->siov[i].iov_len = e->pkt->len;
			h->msg_iov = &io->siov[i];
			h->msg_iovlen = 1;
			if (e->leg) {
				h->msg_name = &e->leg->ent.addr.ss;
				h->msg_namelen = e->leg->ent.addr.len;
			}
		}
		r = sendmmsg(fd, io->smsgs, n, MSG_DONTWAIT);
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
			o->blocked = 1;
			return;
		}
		if (r < 0) {
			if (udp_count(&o->dropped))
				UDP_DEBUG(core, "dropped a datagram of %zu bytes: %s (%llu dropped)",
					  o->q[o->head].pkt->len, strerror(errno),
					  (unsigned long long)o->dropped);
			r = 1;
		}
		for (i = 0; i < (unsigned)r; i++) {
			core->packet_unref(o->q[o->head].pkt);
			o->head = (o->head + 1) & (o->cap - 1);
			o->len--;
		}
	}
	o->blocked = 0;
}

/* ---- worker sockets (listening) ------------------------------------------ */

static void udp_sock_drop(struct udp_sock *s)
{
	struct udp_group *g = s->g;

	if (--s->users)
		return;
	s->torn = 1;
	udp_sweep(s, 0, 1);
	if (s->sweep)
		s->core->timer_free(s->sweep);
	if (s->watch)
		s->core->watch_free(s->watch);
	close(s->fd);
	free(s->map.b);
	udp_out_take(s->core, &s->out, NULL, NULL);
	free(s->out.q);
	udp_io_free(&s->io);
	udp_group_unref(g);
}

static void udp_sock_flush(struct udp_sock *s)
{
	unsigned ev;

	udp_out_flush(s->core, &s->out, &s->io, s->fd);
	ev = EZP_WATCH_READ | (s->out.blocked ? EZP_WATCH_WRITE : 0);
	if (s->watch && ev != s->events)
		s->core->watch_set(s->watch, ev);
	s->events = ev;
}

static void udp_sock_deferred(void *arg)
{
	struct udp_sock *s = arg;

	s->out.scheduled = 0;
	if (!s->out.blocked)
		udp_sock_flush(s);
	udp_sock_drop(s);
}

/* Flush at the end of this loop iteration (one defer per batch). */
static void udp_sock_schedule(struct udp_sock *s)
{
	if (s->out.scheduled || s->out.blocked)
		return;
	if (s->core->defer(s->worker, udp_sock_deferred, s) != EZP_OK) {
		udp_sock_flush(s);
		return;
	}
	s->out.scheduled = 1;
	s->users++;
}

static void udp_deliver(struct udp_leg *l, const uint8_t *data, size_t len, uint64_t now,
			uint64_t ts)
{
	struct ezp_packet *pkt = l->core->packet_new(len);

	l->last_ms = now;
	if (!pkt) {
		UDP_DEBUG(l->core, "dropped a datagram of %zu bytes: out of memory", len);
		return;
	}
	if (len)
		memcpy(pkt->data, data, len);
	pkt->ts_us = ts;
	l->core->leg_recv(l->leg, pkt); /* may close l */
}

static void udp_leg_unbusy(struct udp_leg *l);

static void udp_idle_fire(void *arg)
{
	struct udp_leg *l = arg;
	uint64_t idle = udp_now_ms() - l->last_ms;
	char msg[64];

	if (idle < l->idle_ms) {
		l->core->timer_start(l->idle, l->idle_ms - idle, 0);
		return;
	}
	snprintf(msg, sizeof(msg), "idle for %llu ms", (unsigned long long)idle);
	l->core->leg_error(l->leg, EZP_CLOSE_IDLE, msg); /* may close l */
}

static void udp_client_open(struct udp_sock *s, struct ezp_leg *leg, const struct ezp_addr *peer,
			    uint32_t h, const uint8_t *data, size_t len, uint64_t now, uint64_t ts)
{
	const struct ezp_core *core = s->core;
	struct udp_leg *l = calloc(1, sizeof(*l));

	if (!l)
		goto fail;
	l->core = core;
	l->leg = leg;
	l->worker = s->worker;
	l->fd = -1;
	l->client = 1;
	l->ent.addr = *peer;
	l->ent.hash = h;
	l->ent.leg = l;
	l->idle_ms = s->g->idle_ms;
	l->last_ms = now;
	l->idle = core->timer_new(s->worker, udp_idle_fire, l);
	if (!l->idle || udp_map_add(&s->map, &l->ent))
		goto fail;
	l->sock = s;
	s->users++;
	core->timer_start(l->idle, l->idle_ms, 0);
	/* the core may close the leg in here (a Shared session full, a failed connect) */
	l->busy++;
	core->leg_set_state(leg, l);
	if (!l->closed)
		udp_deliver(l, data, len, now, ts);
	udp_leg_unbusy(l);
	return;
fail:
	if (l && l->idle)
		core->timer_free(l->idle);
	free(l);
	core->leg_error(leg, EZP_CLOSE_ERROR, "out of memory");
}

/* A datagram handed to another worker (the session's). */
struct udp_move {
	struct udp_group *g;
	struct udp_sock *to;
	struct ezp_addr peer;
	unsigned hops;
	uint64_t ts;
	size_t len;
	uint8_t data[];
};

static void udp_sock_input(struct udp_sock *s, const struct ezp_addr *peer, const uint8_t *data,
			   size_t len, unsigned hops, uint64_t now, uint64_t ts);

static void udp_move_run(void *arg)
{
	struct udp_move *m = arg;
	struct udp_group *g = m->g;

	if (!m->to->torn) {
		m->to->users++;
		udp_sock_input(m->to, &m->peer, m->data, m->len, m->hops + 1, udp_now_ms(), m->ts);
		udp_sock_drop(m->to);
	}
	free(m);
	udp_group_unref(g);
}

static void udp_forward(struct udp_sock *s, struct udp_sock *to, const struct ezp_addr *peer,
			const uint8_t *data, size_t len, unsigned hops, uint64_t ts)
{
	struct udp_move *m = malloc(sizeof(*m) + len);

	if (!m) {
		UDP_DEBUG(s->core, "dropped a datagram of %zu bytes: out of memory", len);
		return;
	}
	m->g = s->g;
	m->to = to;
	m->peer = *peer;
	m->hops = hops;
	m->ts = ts;
	m->len = len;
	memcpy(m->data, data, len);
	__atomic_add_fetch(&s->g->refs, 1, __ATOMIC_RELAXED);
	if (s->core->defer(to->worker, udp_move_run, m) != EZP_OK) {
		free(m);
		udp_group_unref(s->g); /* not the last: s holds one */
	}
}

static struct udp_sock *udp_group_sock(struct udp_group *g, struct ezp_worker *w)
{
	unsigned i;

	for (i = 0; i < g->n; i++)
		if (g->socks[i]->worker == w)
			return g->socks[i];
	return NULL;
}

/* One datagram from @peer on @s: to its leg, to its session's worker, or to a new session. */
static void udp_sock_input(struct udp_sock *s, const struct ezp_addr *peer, const uint8_t *data,
			   size_t len, unsigned hops, uint64_t now, uint64_t ts)
{
	const struct ezp_core *core = s->core;
	struct udp_group *g = s->g;
	uint32_t h = udp_addr_hash(peer, s->seed);
	struct udp_entry *e = udp_map_find(&s->map, peer, h);
	struct udp_sock *to;
	struct ezp_accept a;
	char text[EZP_ADDR_STRLEN];
	int rc;

	if (e && e->leg) {
		udp_deliver(e->leg, data, len, now, ts);
		return;
	}
	if (e && hops < UDP_MAX_HOPS && now - e->used_ms < g->idle_ms) {
		e->used_ms = now;
		udp_forward(s, e->to, peer, data, len, hops, ts);
		return;
	}
	if (!__atomic_load_n(&g->listening, __ATOMIC_ACQUIRE)) {
		/*
		 * Unlistened: while sockets leave the SO_REUSEPORT group the kernel may
		 * hash a client to another worker's old socket. Ask the next worker;
		 * after every worker was asked it is an unknown client: dropped.
		 */
		if (hops + 1 < g->n)
			udp_forward(s, g->socks[(s->index + 1) % g->n], peer, data, len, hops, ts);
		return;
	}
	if (e) {
		udp_map_del(&s->map, e);
		free(e);
	}
	memset(&a, 0, sizeof(a));
	a.struct_size = sizeof(a);
	a.listener = g->listener;
	a.worker = s->worker;
	a.peer = *peer;
	a.local = g->bound;
	rc = core->listener_accept(&a);
	if (rc == EZP_OK && a.leg) {
		udp_client_open(s, a.leg, peer, h, data, len, now, ts);
		return;
	}
	if (rc != EZP_ERR_AGAIN)
		return; /* refused: the core logged why */
	to = a.move_to && a.move_to != s->worker ? udp_group_sock(g, a.move_to) : NULL;
	if (!to || hops >= UDP_MAX_HOPS) {
		UDP_DEBUG(core, "pipeline %s: dropped a datagram from %s: its session's worker "
				"cannot take it", g->pipeline,
			  core->addr_format(peer, text, sizeof(text)));
		return;
	}
	if (!hops && s->sweep && s->map.n_fwd < UDP_MAX_FWD && (e = calloc(1, sizeof(*e)))) {
		e->addr = *peer;
		e->hash = h;
		e->to = to;
		e->used_ms = now;
		if (udp_map_add(&s->map, e))
			free(e);
		else if (s->map.n_fwd == 1)
			core->timer_start(s->sweep, g->idle_ms < 1000 ? 1000 : g->idle_ms, 1);
	}
	udp_forward(s, to, peer, data, len, hops, ts);
}

static void udp_sock_io(int fd, unsigned events, void *arg)
{
	struct udp_sock *s = arg;
	const struct ezp_core *core = s->core;
	int round, n, i;

	s->users++; /* a leg closing inside leg_recv may drop the last other user */
	if (events & EZP_WATCH_WRITE)
		udp_sock_flush(s);
	for (round = 0; (events & EZP_WATCH_READ) && round < UDP_ROUNDS; round++) {
		uint64_t now, ts;

		n = udp_io_recv(&s->io, fd);
		if (n < 0) { /* level-triggered: anything left is read next time */
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				UDP_DEBUG(core, "pipeline %s: recv: %s", s->g->pipeline,
					  strerror(errno));
			break;
		}
		now = udp_now_ms();
		ts = core->now_us();
		for (i = 0; i < n; i++) {
			struct msghdr *h = &s->io.msgs[i].msg_hdr;
			struct ezp_addr peer;

			if (udp_addr_norm(h->msg_name, h->msg_namelen, &peer))
				continue;
			udp_sock_input(s, &peer, h->msg_iov->iov_base, s->io.msgs[i].msg_len, 0,
				       now, ts);
		}
		if (n < (int)s->io.batch)
			break;
	}
	udp_sock_drop(s);
}

/* Deferred by listen: start watching on the socket's own worker. */
static void udp_sock_start(void *arg)
{
	struct udp_sock *s = arg;
	struct udp_group *g = s->g;
	const struct ezp_core *core = s->core;

	if (!s->torn) {
		s->sweep = core->timer_new(s->worker, udp_sweep_fire, s);
		s->events = EZP_WATCH_READ | (s->out.blocked ? EZP_WATCH_WRITE : 0);
		s->watch = core->watch_add(s->worker, s->fd, s->events, udp_sock_io, s);
		if (!s->watch)
			core->log(EZP_LOG_ERROR, UDP_SRC, "pipeline %s: cannot watch a udp socket "
				  "on worker %u", g->pipeline, core->worker_index(s->worker));
	}
	udp_group_unref(g);
}

/* ---- legs with their own connected socket ---------------------------------- */

static int udp_leg_reads(const struct udp_leg *l)
{
	return !l->closed && (l->client || !l->paused); /* client legs: pause is a flag */
}

static void udp_leg_events(struct udp_leg *l)
{
	unsigned ev = (udp_leg_reads(l) ? EZP_WATCH_READ : 0) |
		      (l->out.blocked ? EZP_WATCH_WRITE : 0);

	if (l->watch && ev != l->events)
		l->core->watch_set(l->watch, ev);
	l->events = ev;
}

static void udp_leg_unbusy(struct udp_leg *l)
{
	if (--l->busy || !l->closed)
		return;
	udp_io_free(&l->io);
	free(l->out.q);
	free(l);
}

/* May close the leg (backpressure off): callers hold busy or touch nothing after. */
static void udp_leg_flush(struct udp_leg *l)
{
	udp_out_flush(l->core, &l->out, &l->io, l->fd);
	udp_leg_events(l);
	if (l->bp && !l->out.len) {
		l->bp = 0;
		l->core->leg_backpressure(l->leg, 0);
	}
}

static void udp_leg_deferred(void *arg)
{
	struct udp_leg *l = arg;

	l->out.scheduled = 0;
	if (!l->closed && !l->out.blocked)
		udp_leg_flush(l);
	udp_leg_unbusy(l);
}

static void udp_leg_schedule(struct udp_leg *l)
{
	if (l->out.scheduled || l->out.blocked)
		return;
	if (l->core->defer(l->worker, udp_leg_deferred, l) != EZP_OK) {
		udp_leg_flush(l);
		return;
	}
	l->out.scheduled = 1;
	l->busy++;
}

static void udp_leg_io(int fd, unsigned events, void *arg)
{
	struct udp_leg *l = arg;
	const struct ezp_core *core = l->core;
	char text[EZP_ADDR_STRLEN], msg[EZP_ADDR_STRLEN + 64];
	int round, n, i;

	(void)fd; /* l->fd: a repoint from inside leg_recv swaps the socket */
	l->busy++;
	if (events & EZP_WATCH_WRITE)
		udp_leg_flush(l);
	for (round = 0; (events & EZP_WATCH_READ) && udp_leg_reads(l) && round < UDP_ROUNDS;
	     round++) {
		uint64_t now, ts;

		n = udp_io_recv(&l->io, l->fd);
		if (n < 0 && (errno == ECONNREFUSED || errno == EHOSTUNREACH ||
			      errno == ENETUNREACH || errno == EHOSTDOWN || errno == ENOPROTOOPT)) {
			/* ICMP: the peer may come back; the session stays. */
			if (udp_count(&l->unreachable))
				UDP_DEBUG(core, "%s: %s (%llu times); still forwarding",
					  core->addr_format(&l->ent.addr, text, sizeof(text)),
					  strerror(errno), (unsigned long long)l->unreachable);
			continue;
		}
		if (n < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOMEM &&
			    errno != EINTR) {
				snprintf(msg, sizeof(msg), "recv from %s: %s",
					 core->addr_format(&l->ent.addr, text, sizeof(text)),
					 strerror(errno));
				core->leg_error(l->leg, EZP_CLOSE_ERROR, msg);
			}
			break;
		}
		now = udp_now_ms();
		ts = core->now_us();
		for (i = 0; i < n && !l->closed; i++) {
			struct msghdr *h = &l->io.msgs[i].msg_hdr;
			struct ezp_addr from;

			/* a moved client's socket was bound before it was connected */
			if (h->msg_name && (udp_addr_norm(h->msg_name, h->msg_namelen, &from) ||
					    from.len != l->ent.addr.len ||
					    memcmp(&from.ss, &l->ent.addr.ss, from.len)))
				continue;
			udp_deliver(l, h->msg_iov->iov_base, l->io.msgs[i].msg_len, now, ts);
		}
		if (n < (int)l->io.batch)
			break;
	}
	udp_leg_unbusy(l);
}

/*
 * A non-blocking UDP socket bound (SO_REUSEPORT) to @bind_to and/or connected
 * to @peer. Returns the fd, or -1 with errno.
 */
static int udp_socket(const struct ezp_addr *bind_to, const struct ezp_addr *peer)
{
	const struct ezp_addr *a = bind_to ? bind_to : peer;
	int fd, one = 1, size = UDP_SOCKBUF, e;

	if ((fd = socket(a->ss.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0)
		return -1;
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	if (bind_to && (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
			setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) ||
			bind(fd, (const struct sockaddr *)&bind_to->ss, bind_to->len)))
		goto fail;
	if (peer && connect(fd, (const struct sockaddr *)&peer->ss, peer->len))
		goto fail;
	return fd;
fail:
	e = errno;
	close(fd);
	errno = e;
	return -1;
}

/*
 * unlisten, step 1: give a client leg its own socket, bound to the listen
 * address and connected to the client, so the listen port can be rebound.
 * The leg stays in the worker socket's map until step 2. Returns 0 or -1.
 */
static int udp_leg_move_off(struct udp_leg *l)
{
	struct udp_sock *s = l->sock;
	const struct ezp_core *core = l->core;
	char text[EZP_ADDR_STRLEN];
	int fd = -1;

	if (udp_io_init(&l->io, s->io.batch, 1) ||
	    (fd = udp_socket(&s->g->bound, &l->ent.addr)) < 0)
		goto fail;
	l->events = EZP_WATCH_READ;
	if (!(l->watch = core->watch_add(l->worker, fd, l->events, udp_leg_io, l)))
		goto fail;
	l->fd = fd;
	l->bind = s->g->bound;
	return 0;
fail:
	UDP_DEBUG(core, "client %s stays on the old udp socket: %s",
		  core->addr_format(&l->ent.addr, text, sizeof(text)), strerror(errno));
	if (fd >= 0)
		close(fd);
	udp_io_free(&l->io);
	return -1;
}

/* unlisten, step 2: the moved leg leaves the worker socket, with its queued datagrams. */
static void udp_leg_detach(struct udp_leg *l)
{
	struct udp_sock *s = l->sock;

	udp_map_del(&s->map, &l->ent);
	udp_out_take(l->core, &s->out, l, &l->out);
	l->sock = NULL;
	s->users--; /* not the last: the caller holds the listener's use */
	if (l->out.len)
		udp_leg_schedule(l);
}

/*
 * Deferred by unlisten to the socket's worker. Every client leg gets its own
 * socket first; then what the old socket still holds is read and delivered,
 * so no datagram sent before the move is lost when it closes.
 */
static void udp_sock_release(void *arg)
{
	struct udp_sock *s = arg;
	struct udp_group *g = s->g;
	struct udp_entry *e, *next;
	size_t i;

	if (!s->torn) {
		for (i = 0; i < s->map.nb; i++)
			for (e = s->map.b[i]; e; e = e->next)
				if (e->leg)
					e->leg->moved = !udp_leg_move_off(e->leg);
		udp_sock_io(s->fd, EZP_WATCH_READ, s); /* may close legs */
		udp_sweep(s, 0, 1);
		for (i = 0; i < s->map.nb; i++)
			for (e = s->map.b[i]; e; e = next) {
				next = e->next;
				if (e->leg->moved)
					udp_leg_detach(e->leg);
			}
		udp_sock_drop(s); /* the listener's use; legs left keep it open */
	}
	udp_group_unref(g);
}

/* ---- transport ops ---------------------------------------------------------- */

static void udp_unlisten(void *state)
{
	struct udp_group *g = state;
	unsigned i;

	if (!g)
		return;
	__atomic_store_n(&g->listening, 0, __ATOMIC_RELEASE);
	for (i = 0; i < g->n; i++) {
		__atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
		if (g->core->defer(g->socks[i]->worker, udp_sock_release, g->socks[i]) == EZP_OK)
			continue;
		__atomic_sub_fetch(&g->refs, 1, __ATOMIC_RELAXED);
		g->core->log(EZP_LOG_WARN, UDP_SRC, "pipeline %s: worker %u stopped; its udp "
			     "socket stays open", g->pipeline,
			     g->core->worker_index(g->socks[i]->worker));
	}
	udp_group_unref(g); /* the control thread's */
}

static int udp_listen(const struct ezp_core *core, const struct ezp_listen_args *args,
		      void **state, struct ezp_addr *bound, struct ezp_error *err)
{
	const struct udp_from *cfg = args->config;
	struct udp_group *g = NULL;
	struct ezp_addr addr;
	struct sockaddr_storage ss;
	socklen_t len;
	char text[EZP_ADDR_STRLEN];
	unsigned i, n = args->n_workers;
	int rc = EZP_ERR_NOMEM;

	if (!cfg || !n)
		return udp_fail(err, EZP_ERR_INVAL, EZP_SIDE_INTERNAL,
				"udp listen needs a From config and a worker");
	core->addr_format(&cfg->listen, text, sizeof(text));
	if (udp_addr_norm(&cfg->listen.ss, cfg->listen.len, &addr))
		return udp_fail(err, EZP_ERR_CONFIG, EZP_SIDE_CONFIG, "cannot listen on udp %s: "
				"not an IPv4 or IPv6 address", text);
	if (!(g = calloc(1, sizeof(*g) + n * sizeof(g->socks[0]))) ||
	    !(g->pipeline = strdup(args->pipeline ? args->pipeline : "")))
		goto fail;
	g->core = core;
	g->listener = args->listener;
	g->idle_ms = cfg->idle_ms > 0 ? (uint64_t)cfg->idle_ms : 60000;
	g->listening = 1;
	g->refs = 1 + n;
	g->n = n;
	for (i = 0; i < n; i++) {
		struct udp_sock *s = calloc(1, sizeof(*s));

		if (!(g->socks[i] = s))
			goto fail;
		s->core = core;
		s->g = g;
		s->worker = args->workers[i];
		s->users = 1;
		s->index = i;
		s->fd = -1;
		if (getrandom(&s->seed, sizeof(s->seed), GRND_NONBLOCK) != sizeof(s->seed))
			s->seed = (uint32_t)(uintptr_t)s ^ (uint32_t)udp_now_ms();
		if (udp_io_init(&s->io, udp_batch(cfg->batch), 1))
			goto fail;
		if ((s->fd = udp_socket(&addr, NULL)) < 0) {
			rc = udp_fail(err, EZP_ERR_IO, EZP_SIDE_CONFIG, "cannot listen on udp %s: %s",
				      text, strerror(errno));
			goto fail;
		}
		len = sizeof(ss);
		if (!i && (getsockname(s->fd, (struct sockaddr *)&ss, &len) ||
			   udp_addr_norm(&ss, len, &addr))) {
			rc = udp_fail(err, EZP_ERR_IO, EZP_SIDE_CONFIG, "cannot listen on udp %s: %s",
				      text, strerror(errno));
			goto fail;
		}
	}
	g->bound = addr;
	for (i = 0; i < n; i++) {
		__atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
		if (core->defer(g->socks[i]->worker, udp_sock_start, g->socks[i]) != EZP_OK) {
			__atomic_sub_fetch(&g->refs, 1, __ATOMIC_RELAXED);
			udp_unlisten(g);
			return udp_fail(err, EZP_ERR_CLOSED, EZP_SIDE_INTERNAL,
					"cannot listen on udp %s: the workers are stopping", text);
		}
	}
	*state = g;
	*bound = g->bound;
	return EZP_OK;
fail:
	if (rc == EZP_ERR_NOMEM)
		udp_fail(err, rc, EZP_SIDE_INTERNAL, "cannot listen on udp %s: out of memory", text);
	for (i = 0; g && i < n; i++)
		if (g->socks[i]) {
			if (g->socks[i]->fd >= 0)
				close(g->socks[i]->fd);
			udp_io_free(&g->socks[i]->io);
			free(g->socks[i]);
		}
	if (g)
		free(g->pipeline);
	free(g);
	return rc;
}

static int udp_connect(const struct ezp_core *core, const struct ezp_connect_args *args,
		       struct ezp_error *err)
{
	const struct udp_to *cfg = args->config; /* or a udp_from: batch comes first in both */
	struct udp_leg *l = calloc(1, sizeof(*l));
	int rc;

	if (!l || udp_io_init(&l->io, udp_batch(cfg ? cfg->batch : 0), 0)) {
		if (l)
			udp_io_free(&l->io);
		free(l);
		return udp_fail(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "out of memory");
	}
	l->core = core;
	l->leg = args->leg;
	l->worker = args->worker;
	l->events = EZP_WATCH_READ;
	/* not IPv4 or IPv6: the address stays unset and socket() says EAFNOSUPPORT */
	(void)udp_addr_norm(&args->addr->ss, args->addr->len, &l->ent.addr);
	l->fd = udp_socket(NULL, &l->ent.addr);
	if (l->fd >= 0 &&
	    (l->watch = core->watch_add(args->worker, l->fd, l->events, udp_leg_io, l))) {
		core->leg_set_state(args->leg, l);
		return EZP_OK;
	}
	/* only the reason: the core adds "connect to ADDR" */
	rc = udp_fail(err, EZP_ERR_IO, EZP_SIDE_SERVER, "%s",
		      l->fd < 0 ? strerror(errno) : "cannot watch the socket");
	if (l->fd >= 0)
		close(l->fd);
	udp_io_free(&l->io);
	free(l);
	return rc;
}

static int udp_send(struct ezp_leg *leg, void *state, struct ezp_packet *pkt)
{
	struct udp_leg *l = state;
	struct udp_out *o;

	(void)leg;
	if (!l) /* cannot happen: state is set before a leg is usable; no core to unref with */
		return EZP_ERR_CLOSED;
	if (l->closed) {
		l->core->packet_unref(pkt);
		return EZP_ERR_CLOSED;
	}
	if (l->idle)
		l->last_ms = udp_now_ms();
	o = l->sock ? &l->sock->out : &l->out;
	if (udp_out_push(o, pkt, l->sock ? l : NULL)) {
		if (udp_count(&o->dropped))
			UDP_DEBUG(l->core, "dropped a datagram of %zu bytes: %u queued "
				  "(%llu dropped)", pkt->len, o->len,
				  (unsigned long long)o->dropped);
		l->core->packet_unref(pkt);
		return EZP_OK;
	}
	if (l->sock) {
		if (o->len >= l->sock->io.batch && !o->blocked)
			udp_sock_flush(l->sock);
		else
			udp_sock_schedule(l->sock);
		return EZP_OK;
	}
	if (o->blocked) {
		if (!l->bp && o->len >= UDP_OUT_HIGH) {
			l->bp = 1;
			l->core->leg_backpressure(l->leg, 1);
		}
	} else if (o->len >= l->io.batch) {
		udp_leg_flush(l);
	} else {
		udp_leg_schedule(l);
	}
	return EZP_OK;
}

/* Server legs stop reading; client legs only note it (datagrams keep coming). */
static void udp_set_paused(void *state, int on)
{
	struct udp_leg *l = state;

	if (l) {
		l->paused = on;
		udp_leg_events(l);
	}
}

static void udp_pause(struct ezp_leg *leg, void *state)
{
	(void)leg;
	udp_set_paused(state, 1);
}

static void udp_resume(struct ezp_leg *leg, void *state)
{
	(void)leg;
	udp_set_paused(state, 0);
}

/* UDP has no half-close: send what is queued, then say the write side is done. */
static void udp_shutdown_write(struct ezp_leg *leg, void *state)
{
	struct udp_leg *l = state;

	l->busy++;
	if (l->sock)
		udp_sock_flush(l->sock);
	else
		udp_leg_flush(l);
	if (!l->closed)
		l->core->leg_write_done(leg);
	udp_leg_unbusy(l);
}

static void udp_close(struct ezp_leg *leg, void *state)
{
	struct udp_leg *l = state;
	struct udp_sock *s;

	(void)leg;
	if (!l || l->closed)
		return;
	l->closed = 1;
	if (l->idle)
		l->core->timer_free(l->idle);
	l->idle = NULL;
	if ((s = l->sock)) {
		l->sock = NULL;
		udp_map_del(&s->map, &l->ent);
		udp_out_take(l->core, &s->out, l, NULL);
		udp_sock_drop(s);
	}
	if (l->watch)
		l->core->watch_free(l->watch);
	l->watch = NULL;
	if (l->fd >= 0)
		close(l->fd);
	l->fd = -1;
	udp_out_take(l->core, &l->out, NULL, NULL);
	l->busy++;
	udp_leg_unbusy(l); /* frees now unless a callback or defer still holds it */
}

static int udp_repoint(struct ezp_leg *leg, void *state, const struct ezp_addr *addr,
		       struct ezp_error *err)
{
	struct udp_leg *l = state;
	struct ezp_addr to;
	struct ezp_watch *w;
	char text[EZP_ADDR_STRLEN];
	int fd;

	(void)leg;
	if (!l || l->closed)
		return udp_fail(err, EZP_ERR_CLOSED, EZP_SIDE_INTERNAL, "the leg has closed");
	l->core->addr_format(addr, text, sizeof(text));
	if (l->sock) {
		struct udp_sock *s = l->sock;
		struct udp_entry *e;

		if (udp_addr_for(addr, s->g->bound.ss.ss_family, &to))
			return udp_fail(err, EZP_ERR_INVAL, EZP_SIDE_CLIENT, "cannot repoint to %s: "
					"the udp listener cannot reach that address family", text);
		e = udp_map_find(&s->map, &to, udp_addr_hash(&to, s->seed));
		if (e && e->leg && e->leg != l)
			return udp_fail(err, EZP_ERR_EXISTS, EZP_SIDE_CLIENT, "cannot repoint to %s: "
					"another session has that client address", text);
		if (e && !e->leg) {
			udp_map_del(&s->map, e);
			free(e);
		}
		udp_map_del(&s->map, &l->ent);
		l->ent.addr = to;
		l->ent.hash = udp_addr_hash(&to, s->seed);
		udp_map_add(&s->map, &l->ent); /* cannot fail: the table exists */
		return EZP_OK;
	}
	/* Own socket: connect a new one, swap only when it works. */
	if (udp_addr_for(addr, l->bind.len ? l->bind.ss.ss_family : addr->ss.ss_family, &to))
		return udp_fail(err, EZP_ERR_INVAL, EZP_SIDE_SERVER, "cannot repoint to %s: "
				"not an IPv4 or IPv6 address", text);
	if ((fd = udp_socket(l->bind.len ? &l->bind : NULL, &to)) < 0)
		return udp_fail(err, EZP_ERR_IO, l->client ? EZP_SIDE_CLIENT : EZP_SIDE_SERVER,
				"connect to %s: %s", text, strerror(errno));
	if (!(w = l->core->watch_add(l->worker, fd, l->events, udp_leg_io, l))) {
		close(fd);
		return udp_fail(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "cannot watch the socket");
	}
	l->core->watch_free(l->watch);
	close(l->fd);
	l->watch = w;
	l->fd = fd;
	l->ent.addr = to;
	return EZP_OK;
}

static int udp_connect_address(const void *config, struct ezp_addr *out)
{
	const struct udp_to *cfg = config;

	if (!cfg || !cfg->connect.len)
		return EZP_ERR_INVAL;
	*out = cfg->connect;
	return EZP_OK;
}

/* ---- descriptor ------------------------------------------------------------- */

static const struct ezp_param udp_listen_params[] = {
	{.key = "Listen", .type = EZP_PARAM_ADDR, .offset = offsetof(struct udp_from, listen),
	 .required = 1, .doc = "address to receive datagrams on, host:port"},
	{.key = "IdleTimeoutMs", .type = EZP_PARAM_MS, .offset = offsetof(struct udp_from, idle_ms),
	 .def = "60000", .min = 1, .max = 86400000,
	 .doc = "end a client's session after this long with no datagram either way"},
	{.key = "Batch", .type = EZP_PARAM_INT, .offset = offsetof(struct udp_from, batch),
	 .def = "32", .min = 1, .max = 256, .doc = "datagrams per recvmmsg/sendmmsg call"},
	EZP_PARAM_END,
};

static const struct ezp_param udp_connect_params[] = {
	{.key = "Connect", .type = EZP_PARAM_ADDR, .offset = offsetof(struct udp_to, connect),
	 .required = 1, .doc = "server address, host:port"},
	{.key = "Batch", .type = EZP_PARAM_INT, .offset = offsetof(struct udp_to, batch),
	 .def = "32", .min = 1, .max = 256, .doc = "datagrams per recvmmsg/sendmmsg call"},
	EZP_PARAM_END,
};

static const struct ezp_transport_kind udp_kind = {
	.struct_size = sizeof(struct ezp_transport_kind),
	.name = "udp",
	.description = "UDP datagrams; one session per client address",
	.flags = EZP_TRANSPORT_DATAGRAM,
	.listen_params = udp_listen_params,
	.listen_config_size = sizeof(struct udp_from),
	.connect_params = udp_connect_params,
	.connect_config_size = sizeof(struct udp_to),
	.connect_address = udp_connect_address,
	.listen = udp_listen,
	.unlisten = udp_unlisten,
	.connect = udp_connect,
	.send = udp_send,
	.pause = udp_pause,
	.resume = udp_resume,
	.shutdown_write = udp_shutdown_write,
	.close = udp_close,
	.repoint = udp_repoint,
};

static const struct ezp_transport_kind *const udp_transports[] = {&udp_kind, NULL};

EZP_PLUGIN_DEFINE(ezp_plugin, .name = "udp", .version = "0.1.0",
		  .description = "UDP transport: batched, one session per client address",
		  .license = "MIT", .transports = udp_transports);
