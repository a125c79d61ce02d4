/*
 * test_live.c - the embedding API (ezproxy.h) on live traffic: a daemon per
 * test with two workers and the tcp/udp plugins, real sockets on 127.0.0.1,
 * echo servers in pthreads, the built-in `callback` filter claimed by the
 * test, taps, injection, closing, swaps, live filter changes, limits and
 * reload. Threads: the test's own (control); filter and tap callbacks run
 * on the daemon's workers and only touch state guarded by a mutex; servers
 * and helpers run in their own pthreads. Every wait has a deadline and
 * waits for an event (or polls a condition until a deadline), never a sleep.
 */
/* cmocka.h needs these first */
/* clang-format off */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
/* clang-format on */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "wait.h"

static int slow = 1;	      /* 10 under valgrind */
#define WAIT_MS (5000 * slow) /* the deadline of every ordinary wait */
#define QUIET_MS 300	      /* how long "nothing arrives" is watched */

#include "net.h" /* after WAIT_MS: its expect_* helpers wait that long */

/* ---- per-test context: everything a test made, freed even when it fails --- */

struct srv;
struct tapc;

struct ctx {
	struct ezp_daemon *d;
	struct srv *srvs[8];
	int n_srvs;
	int fds[64];
	int n_fds;
	struct ezp_claim *claims[8];
	int n_claims;
	struct ezp_tap *taps[8];
	int n_taps;
	struct tapc *gates[4]; /* blocking taps to open at teardown */
	int n_gates;
	struct holder *holders[4];
	int n_holders;
	struct tapc *tapcs[4];
	int n_tapcs;
};

static const char *volatile current_test = "?";

static struct ctx *T;

static int track_fd(int fd)
{
	assert_true(fd >= 0);
	assert_true(T->n_fds < (int)EZP_ARRAY_LEN(T->fds));
	T->fds[T->n_fds++] = fd;
	return fd;
}

static void close_fd(int fd)
{
	for (int i = 0; i < T->n_fds; i++)
		if (T->fds[i] == fd) {
			T->fds[i] = T->fds[--T->n_fds];
			break;
		}
	close(fd);
}

/* ---- servers ---------------------------------------------------------------- */

enum { SRV_UDP_ECHO = 1, SRV_TCP_ECHO, SRV_TCP_TAG };

struct conn {
	struct srv *s;
	int fd;
	pthread_t th;
};

struct srv {
	int kind;
	const char *tag; /* SRV_TCP_TAG: reply "TAG" + line for each line */
	int fd;
	int stop[2];
	uint16_t port;
	pthread_t th;
	pthread_mutex_t mu;
	struct conn *conns[32];
	int n_conns;
};

static int send_all(int fd, const void *data, size_t len)
{
	const char *p = data;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void *udp_echo_main(void *arg)
{
	struct srv *s = arg;
	char *buf = malloc(65536);

	for (;;) {
		struct pollfd p[2] = {{s->fd, POLLIN, 0}, {s->stop[0], POLLIN, 0}};
		struct sockaddr_storage from;
		socklen_t fl = sizeof(from);
		ssize_t n;

		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[1].revents)
			break;
		n = recvfrom(s->fd, buf, 65536, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
		if (n >= 0)
			(void)sendto(s->fd, buf, (size_t)n, 0, (struct sockaddr *)&from, fl);
	}
	free(buf);
	return NULL;
}

static void *tcp_conn_main(void *arg)
{
	struct conn *c = arg;
	const char *tag = c->s->tag;
	size_t tl = tag ? strlen(tag) : 0, ll = 0;
	char *buf = malloc(65536), *line = malloc(4096 + 64);

	for (;;) {
		ssize_t n = recv(c->fd, buf, 65536, 0);

		if (n == 0) {
			shutdown(c->fd, SHUT_WR); /* echo the half-close */
			break;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (!tag) {
			if (send_all(c->fd, buf, (size_t)n) < 0)
				break;
			continue;
		}
		for (ssize_t i = 0; i < n; i++) {
			if (!ll) {
				memcpy(line, tag, tl);
				ll = tl;
			}
			line[ll++] = buf[i];
			if (buf[i] == '\n' || ll >= 4096) {
				if (send_all(c->fd, line, ll) < 0)
					goto out;
				ll = 0;
			}
		}
	}
out:
	free(buf);
	free(line);
	return NULL;
}

static void *tcp_accept_main(void *arg)
{
	struct srv *s = arg;

	for (;;) {
		struct pollfd p[2] = {{s->fd, POLLIN, 0}, {s->stop[0], POLLIN, 0}};
		struct conn *c;
		int fd;

		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (p[1].revents)
			break;
		fd = accept4(s->fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue;
		pthread_mutex_lock(&s->mu);
		if (s->n_conns == (int)EZP_ARRAY_LEN(s->conns) || !(c = calloc(1, sizeof(*c)))) {
			pthread_mutex_unlock(&s->mu);
			close(fd);
			continue;
		}
		c->s = s;
		c->fd = fd;
		if (pthread_create(&c->th, NULL, tcp_conn_main, c) != 0) {
			free(c);
			close(fd);
		} else {
			s->conns[s->n_conns++] = c;
		}
		pthread_mutex_unlock(&s->mu);
	}
	return NULL;
}

static uint16_t sock_port(int fd)
{
	struct sockaddr_in a;
	socklen_t len = sizeof(a);

	if (getsockname(fd, (struct sockaddr *)&a, &len) < 0)
		return 0;
	return ntohs(a.sin_port);
}

static struct sockaddr_in loopback(const char *ip, uint16_t port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	inet_pton(AF_INET, ip, &a.sin_addr);
	return a;
}

/* Start a server on 127.0.0.1:0; it is stopped and freed at teardown. */
static struct srv *srv_start(int kind, const char *tag)
{
	struct srv *s = calloc(1, sizeof(*s));
	struct sockaddr_in a = loopback("127.0.0.1", 0);
	int one = 1;

	assert_non_null(s);
	s->kind = kind;
	s->tag = tag;
	pthread_mutex_init(&s->mu, NULL);
	assert_int_equal(pipe2(s->stop, O_CLOEXEC), 0);
	s->fd =
	    socket(AF_INET, (kind == SRV_UDP_ECHO ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC, 0);
	assert_true(s->fd >= 0);
	setsockopt(s->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	assert_int_equal(bind(s->fd, (struct sockaddr *)&a, sizeof(a)), 0);
	if (kind != SRV_UDP_ECHO)
		assert_int_equal(listen(s->fd, 64), 0);
	s->port = sock_port(s->fd);
	assert_int_equal(
	    pthread_create(&s->th, NULL, kind == SRV_UDP_ECHO ? udp_echo_main : tcp_accept_main, s),
	    0);
	T->srvs[T->n_srvs++] = s;
	return s;
}

static void srv_stop(struct srv *s)
{
	char c = 1;

	if (write(s->stop[1], &c, 1) != 1)
		fprintf(stderr, "test_live: cannot stop a server\n");
	pthread_join(s->th, NULL);
	for (int i = 0; i < s->n_conns; i++) {
		shutdown(s->conns[i]->fd, SHUT_RDWR); /* wakes a blocked recv or send */
		pthread_join(s->conns[i]->th, NULL);
		close(s->conns[i]->fd);
		free(s->conns[i]);
	}
	close(s->fd);
	close(s->stop[0]);
	close(s->stop[1]);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

/* ---- client sockets --------------------------------------------------------- */

static int tcp_client_from(const char *src_ip, uint16_t port)
{
	int fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)), one = 1;
	struct sockaddr_in to = loopback("127.0.0.1", port);

	if (src_ip) {
		struct sockaddr_in from = loopback(src_ip, 0);
		assert_int_equal(bind(fd, (struct sockaddr *)&from, sizeof(from)), 0);
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0)
		fail_msg("connect to 127.0.0.1:%u: %s", port, strerror(errno));
	return fd;
}

static int tcp_client(uint16_t port)
{
	return tcp_client_from(NULL, port);
}

/* A TCP socket on 127.0.0.1, any port: listening with @backlog, or only bound for < 0. */
static int loopback_stream(int backlog)
{
	struct sockaddr_in any = loopback("127.0.0.1", 0);
	int fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));

	assert_int_equal(bind(fd, (struct sockaddr *)&any, sizeof(any)), 0);
	if (backlog >= 0)
		assert_int_equal(listen(fd, backlog), 0);
	return fd;
}

/* A UDP socket on 127.0.0.1:0, connected to @port unless @port is 0. */
static int udp_client(uint16_t port)
{
	int fd = track_fd(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	struct sockaddr_in me = loopback("127.0.0.1", 0), to = loopback("127.0.0.1", port);

	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	if (port)
		assert_int_equal(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
	return fd;
}

/* Read exactly @n bytes. Returns 0, or -1 (end/error) / -2 (deadline) with *got set. */
static int recv_exact(int fd, char *buf, size_t n, int ms, size_t *got)
{
	uint64_t end = mono_ms() + (uint64_t)ms;

	*got = 0;
	while (*got < n) {
		int64_t left = (int64_t)(end - mono_ms());
		ssize_t r = recv_wait(fd, buf + *got, n - *got, left > 0 ? (int)left : 0);
		if (r == -2)
			return -2;
		if (r <= 0)
			return -1;
		*got += (size_t)r;
	}
	return 0;
}

static void expect_bytes(int fd, const char *want, const char *what)
{
	size_t n = strlen(want), got = 0;
	char *buf = calloc(1, n + 1);
	int rc;

	assert_non_null(buf);
	rc = recv_exact(fd, buf, n, WAIT_MS, &got);
	if (rc != 0 || memcmp(buf, want, n)) {
		char copy[256];
		snprintf(copy, sizeof(copy), "%.*s", (int)got, buf);
		free(buf);
		fail_msg("%s: expected '%s', got %zu byte(s) '%s' (%s)", what, want, got, copy,
			 rc == -2   ? "deadline passed"
			 : rc == -1 ? "end of stream or error"
				    : "differ");
	}
	free(buf);
}

static void tcp_roundtrip(int fd, const char *send_text, const char *want, const char *what)
{
	assert_int_equal(send_all(fd, send_text, strlen(send_text)), 0);
	expect_bytes(fd, want, what);
}

static void expect_quiet(int fd, int ms, const char *what)
{
	char buf[2048];
	ssize_t n = recv_wait(fd, buf, sizeof(buf) - 1, ms);

	if (n == -2)
		return;
	if (n > 0) {
		buf[n] = 0;
		fail_msg("%s: expected nothing, got '%s' (%zd bytes)", what, buf, n);
	}
	fail_msg("%s: expected nothing, got %s", what, n == 0 ? "end of stream" : strerror(errno));
}

/* ---- the daemon ----------------------------------------------------------------- */

__attribute__((format(printf, 1, 2))) static struct ezp_daemon *daemon_up(const char *fmt, ...)
{
	const char *plugins = getenv("EZP_TEST_PLUGINS");
	const char *paths[] = {plugins ? plugins : "build/plugins", NULL};
	struct ezp_daemon_opts opts = {.struct_size = sizeof(opts),
				       .workers = 2,
				       .plugin_paths = paths,
				       .no_default_paths = 1,
				       .log_level = EZP_LOG_WARN};
	struct ezp_error err = {0};
	char yaml[4096];
	va_list ap;
	int rc;

	va_start(ap, fmt);
	vsnprintf(yaml, sizeof(yaml), fmt, ap);
	va_end(ap);
	rc = ezp_daemon_new(yaml, "test_live", &opts, &T->d, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_new: %s (%d) at %d:%d: %s\n%s", ezp_status_str(rc), rc,
			 err.line, err.column, err.message, yaml);
	rc = ezp_daemon_start(T->d, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_start: %s: %s", ezp_status_str(rc), err.message);
	return T->d;
}

static uint16_t bound_port(const char *pipeline)
{
	struct ezp_addr a;

	assert_int_equal(ezp_pipeline_bound(T->d, pipeline, &a), EZP_OK);
	assert_int_equal(a.ss.ss_family, AF_INET);
	return ntohs(((struct sockaddr_in *)&a.ss)->sin_port);
}

static uint16_t addr_port(const struct ezp_addr *a)
{
	return a->ss.ss_family == AF_INET ? ntohs(((const struct sockaddr_in *)&a->ss)->sin_port)
					  : 0;
}

static int addr_is(const struct ezp_addr *a, const struct sockaddr_in *b)
{
	const struct sockaddr_in *x = (const struct sockaddr_in *)&a->ss;

	return a->ss.ss_family == AF_INET && x->sin_port == b->sin_port &&
	       x->sin_addr.s_addr == b->sin_addr.s_addr;
}

static size_t list_sessions(const char *pipeline, struct ezp_session_summary **v)
{
	size_t n = 0;

	*v = NULL;
	assert_int_equal(ezp_daemon_sessions(T->d, pipeline, v, &n), EZP_OK);
	return n;
}

/* The session whose first client is @fd's local address, within WAIT_MS. */
static struct ezp_session_summary session_of(int fd, const char *pipeline)
{
	struct sockaddr_in me;
	socklen_t len = sizeof(me);
	uint64_t end = mono_ms() + WAIT_MS;

	assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &len), 0);
	do {
		struct ezp_session_summary *v, found;
		size_t n = list_sessions(pipeline, &v);
		for (size_t i = 0; i < n; i++)
			if (addr_is(&v[i].client, &me)) {
				found = v[i];
				free(v);
				return found;
			}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("no session of pipeline %s has client 127.0.0.1:%u", pipeline, ntohs(me.sin_port));
	abort(); /* not reached */
}

/* Poll the session list of @pipeline until @pred holds for session @id (or for none). */
static int wait_session(const char *pipeline, uint64_t id,
			int (*pred)(const struct ezp_session_summary *s, const void *arg),
			const void *arg, struct ezp_session_summary *last)
{
	uint64_t end = mono_ms() + WAIT_MS;

	do {
		struct ezp_session_summary *v;
		size_t n = list_sessions(pipeline, &v);
		for (size_t i = 0; i < n; i++)
			if (v[i].id == id) {
				if (last)
					*last = v[i];
				if (pred(&v[i], arg)) {
					free(v);
					return 1;
				}
			}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	return 0;
}

static int is_bridged(const struct ezp_session_summary *s, const void *arg)
{
	(void)arg;
	return s->bridged == 1;
}

static int has_clients(const struct ezp_session_summary *s, const void *arg)
{
	return s->n_clients == *(const unsigned *)arg;
}

static int server_port_is(const struct ezp_session_summary *s, const void *arg)
{
	return addr_port(&s->server) == *(const uint16_t *)arg;
}

/* ---- a holder of the `callback` filter ---------------------------------------------- */

/*
 * To-server packets starting with "drop" are dropped, "repl" replaced by
 * "REPLACED", "hold" held (their hold ids recorded); everything else passes.
 * Thread: on_packet runs on the session's worker.
 */
struct holder {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	const struct ezp_core *core;
	uint64_t holds[256];
	int n_holds;
	int seen;     /* to-server packets seen */
	int released; /* on_released calls */
};

static int starts(const struct ezp_packet *p, const char *prefix)
{
	size_t n = strlen(prefix);

	return p->len >= n && !memcmp(p->data, prefix, n);
}

static int holder_on_packet(void *userdata, struct ezp_filter_call *call)
{
	struct holder *h = userdata;
	const struct ezp_packet *p = call->pkt;
	int v = EZP_VERDICT_PASS;

	if (p->dir != EZP_DIR_TO_SERVER)
		return EZP_VERDICT_PASS;
	pthread_mutex_lock(&h->mu);
	h->seen++;
	if (starts(p, "drop")) {
		v = EZP_VERDICT_DROP;
	} else if (starts(p, "repl")) {
		struct ezp_packet *r = h->core->packet_new(8);
		if (r) {
			memcpy(r->data, "REPLACED", 8);
			call->replacement = r;
			v = EZP_VERDICT_REPLACE;
		}
	} else if (starts(p, "hold") && h->n_holds < (int)EZP_ARRAY_LEN(h->holds)) {
		h->holds[h->n_holds++] = call->hold_id;
		v = EZP_VERDICT_HOLD;
	}
	pthread_cond_broadcast(&h->cv);
	pthread_mutex_unlock(&h->mu);
	return v;
}

static void holder_on_released(void *userdata)
{
	struct holder *h = userdata;

	pthread_mutex_lock(&h->mu);
	h->released++;
	pthread_cond_broadcast(&h->cv);
	pthread_mutex_unlock(&h->mu);
}

static struct holder *holder_new(void)
{
	struct holder *h = calloc(1, sizeof(*h));

	assert_non_null(h);
	sync_init(&h->mu, &h->cv);
	h->core = ezp_daemon_core(T->d);
	T->holders[T->n_holders++] = h;
	return h;
}

static void holder_free(struct holder *h)
{
	sync_fini(&h->mu, &h->cv);
	free(h);
}

static struct ezp_filter_holder holder_desc(struct holder *h, const char *name)
{
	struct ezp_filter_holder fh = {.struct_size = sizeof(fh),
				       .name = name,
				       .userdata = h,
				       .on_packet = holder_on_packet,
				       .on_released = holder_on_released};
	return fh;
}

static struct ezp_claim *claim(struct holder *h, const char *pipeline, const char *name)
{
	struct ezp_filter_holder fh = holder_desc(h, name);
	struct ezp_claim *cl = NULL;
	struct ezp_error err = {0};
	int rc = ezp_filter_claim(T->d, pipeline, "callback:f", &fh, &cl, &err);

	if (rc != EZP_OK)
		fail_msg("ezp_filter_claim(%s): %s: %s", pipeline, ezp_status_str(rc), err.message);
	T->claims[T->n_claims++] = cl;
	return cl;
}

static void release(struct ezp_claim *cl)
{
	for (int i = 0; i < T->n_claims; i++)
		if (T->claims[i] == cl) {
			T->claims[i] = T->claims[--T->n_claims];
			break;
		}
	ezp_claim_release(cl);
}

static uint64_t hold_id(struct holder *h, int i)
{
	uint64_t id;

	pthread_mutex_lock(&h->mu);
	id = h->holds[i];
	pthread_mutex_unlock(&h->mu);
	return id;
}

struct answer {
	struct ezp_daemon *d;
	uint64_t hold_id;
	int verdict;
	int rc;
};

static void *answer_main(void *arg)
{
	struct answer *a = arg;

	a->rc = ezp_filter_answer(a->d, a->hold_id, a->verdict, NULL, 0);
	return NULL;
}

/* Answer a hold from a thread of our own (not the worker, not the test's). */
static int answer_from_thread(uint64_t id, int verdict)
{
	struct answer a = {T->d, id, verdict, -999};
	pthread_t th;

	assert_int_equal(pthread_create(&th, NULL, answer_main, &a), 0);
	pthread_join(th, NULL);
	return a.rc;
}

/* ---- a tap that records what it sees ------------------------------------------- */

struct tev {
	int type;
	uint64_t seq, session_id;
	int has_pkt, dir, verdict;
	uint32_t flags;
	char data[128];
	size_t len;
	int has_orig;
	char orig[128];
	size_t olen;
};

struct tapc {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct tev *v;
	int n, cap;
	uint64_t lagged;
	int lagged_calls;
	int block_first; /* the first on_event waits for gate_open */
	int entered, gate_open, gate_expired;
};

static void tapc_on_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct tapc *tc = userdata;
	struct tev *e;

	pthread_mutex_lock(&tc->mu);
	if (tc->block_first && !tc->entered) {
		struct timespec end = deadline(4 * WAIT_MS);
		tc->entered = 1;
		pthread_cond_broadcast(&tc->cv);
		while (!tc->gate_open)
			if (pthread_cond_timedwait(&tc->cv, &tc->mu, &end) == ETIMEDOUT) {
				tc->gate_expired = 1;
				break;
			}
	}
	if (tc->n == tc->cap) {
		int cap = tc->cap ? tc->cap * 2 : 64;
		struct tev *v = realloc(tc->v, (size_t)cap * sizeof(*v));
		if (!v)
			goto out;
		tc->v = v;
		tc->cap = cap;
	}
	e = &tc->v[tc->n++];
	memset(e, 0, sizeof(*e));
	e->type = ev->type;
	e->seq = ev->seq;
	e->session_id = ev->session_id;
	e->flags = ev->flags;
	e->verdict = ev->verdict;
	if (ev->pkt) {
		e->has_pkt = 1;
		e->dir = ev->pkt->dir;
		e->len = ev->pkt->len;
		memcpy(e->data, ev->pkt->data, e->len < sizeof(e->data) ? e->len : sizeof(e->data));
	}
	if (ev->original) {
		e->has_orig = 1;
		e->olen = ev->original->len;
		memcpy(e->orig, ev->original->data,
		       e->olen < sizeof(e->orig) ? e->olen : sizeof(e->orig));
	}
out:
	pthread_cond_broadcast(&tc->cv);
	pthread_mutex_unlock(&tc->mu);
}

static void tapc_on_lagged(void *userdata, uint64_t dropped)
{
	struct tapc *tc = userdata;

	pthread_mutex_lock(&tc->mu);
	tc->lagged += dropped;
	tc->lagged_calls++;
	pthread_cond_broadcast(&tc->cv);
	pthread_mutex_unlock(&tc->mu);
}

static struct tapc *tapc_new(void)
{
	struct tapc *tc = calloc(1, sizeof(*tc));

	assert_non_null(tc);
	sync_init(&tc->mu, &tc->cv);
	T->tapcs[T->n_tapcs++] = tc;
	return tc;
}

static void tapc_free(struct tapc *tc)
{
	free(tc->v);
	sync_fini(&tc->mu, &tc->cv);
	free(tc);
}

static struct ezp_tap *tap_on(struct tapc *tc, const char *pipeline, uint64_t session_id,
			      unsigned capacity, struct ezp_worker *deliver_on)
{
	struct ezp_tap_opts o = {.struct_size = sizeof(o),
				 .pipeline = pipeline,
				 .session_id = session_id,
				 .capacity = capacity,
				 .deliver_on = deliver_on,
				 .userdata = tc,
				 .on_event = tapc_on_event,
				 .on_lagged = tapc_on_lagged};
	struct ezp_tap *tap = NULL;

	assert_int_equal(ezp_tap_subscribe(T->d, &o, &tap), EZP_OK);
	assert_non_null(tap);
	T->taps[T->n_taps++] = tap;
	return tap;
}

static void tap_off(struct ezp_tap *tap)
{
	for (int i = 0; i < T->n_taps; i++)
		if (T->taps[i] == tap) {
			T->taps[i] = T->taps[--T->n_taps];
			break;
		}
	ezp_tap_unsubscribe(tap);
}

/* Index of the first event after @from of @type (packets: @dir and exact bytes). */
static int tap_find(struct tapc *tc, int from, int type, int dir, const char *data)
{
	for (int i = from; i < tc->n; i++) {
		const struct tev *e = &tc->v[i];
		if (e->type != type)
			continue;
		if (type == EZP_TAP_PACKET &&
		    (!e->has_pkt || e->dir != dir || e->len != strlen(data) ||
		     memcmp(e->data, data, e->len)))
			continue;
		return i;
	}
	return -1;
}

/* Wait for such an event; returns a copy. Fails the test at the deadline. */
static struct tev tap_expect(struct tapc *tc, int type, int dir, const char *data, const char *what)
{
	struct timespec end = deadline(WAIT_MS);
	struct tev e;
	int i;

	pthread_mutex_lock(&tc->mu);
	while ((i = tap_find(tc, 0, type, dir, data)) < 0 &&
	       pthread_cond_timedwait(&tc->cv, &tc->mu, &end) != ETIMEDOUT)
		;
	if (i < 0) {
		char seen[1024] = "";
		for (int k = 0; k < tc->n && strlen(seen) < sizeof(seen) - 80; k++)
			snprintf(seen + strlen(seen), sizeof(seen) - strlen(seen),
				 " [type %d dir %d flags %#x '%.*s']", tc->v[k].type, tc->v[k].dir,
				 tc->v[k].flags, (int)(tc->v[k].len < 20 ? tc->v[k].len : 20),
				 tc->v[k].data);
		pthread_mutex_unlock(&tc->mu);
		fail_msg("%s: no tap event (type %d, dir %d, '%s') before the deadline; seen:%s",
			 what, type, dir, data ? data : "", seen);
	}
	e = tc->v[i];
	pthread_mutex_unlock(&tc->mu);
	return e;
}

/* ---- setup and teardown ------------------------------------------------------------ */

/* A test that hangs inside a blocking API call is reported by name, then aborted. */
static void on_alarm(int sig)
{
	char msg[160];
	int n = snprintf(msg, sizeof(msg), "test_live: %s hung for 100 s (x slow); aborting\n",
			 current_test);

	(void)sig;
	if (write(2, msg, (size_t)n) < 0)
		_exit(98);
	abort();
}

static int setup(void **state)
{
	signal(SIGALRM, on_alarm);
	alarm(100 * (unsigned)slow);
	T = calloc(1, sizeof(*T));
	if (!T)
		return -1;
	*state = T;
	return 0;
}

static int teardown(void **state)
{
	struct ctx *c = *state;

	alarm(100 * (unsigned)slow);
	for (int i = 0; i < c->n_gates; i++) { /* a blocked tap callback must not stall stop */
		pthread_mutex_lock(&c->gates[i]->mu);
		c->gates[i]->gate_open = 1;
		pthread_cond_broadcast(&c->gates[i]->cv);
		pthread_mutex_unlock(&c->gates[i]->mu);
	}
	for (int i = 0; i < c->n_taps; i++)
		ezp_tap_unsubscribe(c->taps[i]);
	for (int i = 0; i < c->n_claims; i++)
		ezp_claim_release(c->claims[i]);
	ezp_daemon_free(c->d);
	for (int i = 0; i < c->n_fds; i++)
		close(c->fds[i]);
	for (int i = 0; i < c->n_srvs; i++)
		srv_stop(c->srvs[i]);
	for (int i = 0; i < c->n_holders; i++)
		holder_free(c->holders[i]);
	for (int i = 0; i < c->n_tapcs; i++)
		tapc_free(c->tapcs[i]);
	free(c);
	T = NULL;
	alarm(0);
	return 0;
}

#define UDP_CALLBACK_PIPELINE(extra)                                                               \
	"Pipelines:\n"                                                                             \
	"  - Name: p\n"                                                                            \
	"    From: {udp: {Listen: 127.0.0.1:0}}\n"                                                 \
	"    Through: [{callback: {Name: f" extra "}}]\n"                                          \
	"    To: {udp: {Connect: 127.0.0.1:%u}}\n"

#define TCP_PIPELINE(name)                                                                         \
	"  - Name: " name "\n"                                                                     \
	"    From: {tcp: {Listen: 127.0.0.1:0}}\n"                                                 \
	"    To: {tcp: {Connect: 127.0.0.1:%u}}\n"

/* ---- 1. verdicts over UDP ---------------------------------------------------------- */

static void test_verdicts_udp(void **state)
{
	struct srv *echo = srv_start(SRV_UDP_ECHO, NULL);
	struct holder *h;
	struct ezp_session_summary s;
	int c;

	(void)state;
	current_test = __func__;
	daemon_up(UDP_CALLBACK_PIPELINE(", HoldTimeoutMs: 10000"), echo->port);
	h = holder_new();
	claim(h, "p", "verdicts");
	c = udp_client(bound_port("p"));

	send_dgram(c, "pass-1");
	expect_dgram(c, "pass-1", "pass");

	send_dgram(c, "drop-1");
	send_dgram(c, "pass-2");
	expect_dgram(c, "pass-2", "the datagram after a dropped one (the dropped echo came back?)");

	send_dgram(c, "repl-1");
	expect_dgram(c, "REPLACED", "replace");

	send_dgram(c, "hold-1");
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 1, WAIT_MS))
		fail_msg("the filter never saw the datagram to hold");
	expect_quiet(c, QUIET_MS, "a held datagram");
	assert_int_equal(answer_from_thread(hold_id(h, 0), EZP_VERDICT_PASS), EZP_OK);
	expect_dgram(c, "hold-1", "a held datagram answered pass");

	s = session_of(c, "p");
	assert_int_equal(s.dropped, 1);
	assert_int_equal(s.replaced, 1);
}

/* ---- 2. a hold keeps order --------------------------------------------------------- */

static void test_hold_keeps_order(void **state)
{
	struct srv *echo = srv_start(SRV_UDP_ECHO, NULL);
	struct holder *h;
	char msg[32];
	int c;

	(void)state;
	current_test = __func__;
	daemon_up(UDP_CALLBACK_PIPELINE(", HoldTimeoutMs: 20000"), echo->port);
	h = holder_new();
	claim(h, "p", "order");
	c = udp_client(bound_port("p"));

	send_dgram(c, "hold-01");
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 1, WAIT_MS))
		fail_msg("the filter never saw datagram #1");
	for (int i = 2; i <= 10; i++) {
		snprintf(msg, sizeof(msg), "m%02d", i);
		send_dgram(c, msg);
	}
	/* the filter is asked about #2..#10 (and passes them) but they wait behind #1 */
	if (!wait_at_least(&h->mu, &h->cv, &h->seen, 10, WAIT_MS))
		fail_msg("the filter saw only %d of 10 datagrams", h->seen);
	expect_quiet(c, QUIET_MS, "datagrams behind a held one");
	assert_int_equal(answer_from_thread(hold_id(h, 0), EZP_VERDICT_PASS), EZP_OK);
	expect_dgram(c, "hold-01", "#1 after its answer");
	for (int i = 2; i <= 10; i++) {
		snprintf(msg, sizeof(msg), "m%02d", i);
		expect_dgram(c, msg, "the datagrams behind #1, in order");
	}
}

/* ---- 3. hold timeouts and the default action ------------------------------------- */

static void test_hold_timeout(void **state)
{
	struct srv *echo = srv_start(SRV_UDP_ECHO, NULL);
	struct holder *h;
	uint64_t t0, waited;
	int cd, cp;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n"
		  "  - Name: pd\n"
		  "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		  "    Through: [{callback: {Name: f, HoldTimeoutMs: 300, Default: drop}}]\n"
		  "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		  "  - Name: pp\n"
		  "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		  "    Through: [{callback: {Name: f, HoldTimeoutMs: 300, Default: pass}}]\n"
		  "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		  echo->port, echo->port);
	h = holder_new();
	claim(h, "pd", "timeout-drop");
	claim(h, "pp", "timeout-pass");

	/* Default: drop - the held datagram never arrives; the one behind it does */
	cd = udp_client(bound_port("pd"));
	send_dgram(cd, "hold-d");
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 1, WAIT_MS))
		fail_msg("the filter never saw the datagram to hold (pd)");
	send_dgram(cd, "after-d");
	expect_dgram(cd, "after-d", "Default: drop: only the datagram behind the held one");
	expect_quiet(cd, QUIET_MS, "Default: drop");

	/* Default: pass - it arrives after about HoldTimeoutMs */
	cp = udp_client(bound_port("pp"));
	t0 = mono_ms();
	send_dgram(cp, "hold-p");
	expect_dgram(cp, "hold-p", "Default: pass after the hold timeout");
	waited = mono_ms() - t0;
	if (waited < 250)
		fail_msg("the held datagram came back after %llu ms, before HoldTimeoutMs 300",
			 (unsigned long long)waited);
	assert_int_equal(h->n_holds, 2);
}

/* ---- 4. the holder goes away ------------------------------------------------------- */

static void test_holder_goes_away(void **state)
{
	struct srv *echo = srv_start(SRV_UDP_ECHO, NULL);
	struct holder *h, *h2;
	struct ezp_claim *cl, *cl2 = NULL;
	struct ezp_filter_holder fh;
	struct ezp_error err = {0};
	uint64_t t0;
	int c, rc;

	(void)state;
	current_test = __func__;
	daemon_up(UDP_CALLBACK_PIPELINE(", HoldTimeoutMs: 30000, Default: pass"), echo->port);
	h = holder_new();
	h2 = holder_new();
	cl = claim(h, "p", "first-holder");
	c = udp_client(bound_port("p"));

	send_dgram(c, "hold-a");
	send_dgram(c, "hold-b");
	send_dgram(c, "hold-c");
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 3, WAIT_MS))
		fail_msg("the filter held only %d of 3 datagrams", h->n_holds);

	fh = holder_desc(h2, "second-holder");
	rc = ezp_filter_claim(T->d, "p", "callback:f", &fh, &cl2, &err);
	if (rc == EZP_OK)
		T->claims[T->n_claims++] = cl2;
	assert_int_equal(rc, EZP_ERR_BUSY);
	assert_null(cl2);
	if (!strstr(err.message, "filter held by first-holder"))
		fail_msg("second claim: message '%s' lacks 'filter held by first-holder'",
			 err.message);

	t0 = mono_ms();
	release(cl);
	expect_dgram(c, "hold-a", "held #1 after the holder left");
	expect_dgram(c, "hold-b", "held #2 after the holder left");
	expect_dgram(c, "hold-c", "held #3 after the holder left");
	if (mono_ms() - t0 > (uint64_t)WAIT_MS)
		fail_msg("held datagrams took %llu ms after release",
			 (unsigned long long)(mono_ms() - t0));
	assert_int_equal(h->released, 1);

	send_dgram(c, "hold-d"); /* nobody holds the filter: it passes */
	expect_dgram(c, "hold-d", "a datagram after the holder left");
	send_dgram(c, "drop-e");
	expect_dgram(c, "drop-e", "unclaimed filter passes everything");
}

/* ---- 5. taps ------------------------------------------------------------------------ */

static void check_event(const struct tev *e, uint64_t sid, uint32_t flags, int verdict,
			const char *what)
{
	if (e->session_id != sid)
		fail_msg("%s: session %llu, expected %llu", what, (unsigned long long)e->session_id,
			 (unsigned long long)sid);
	if (e->flags != flags)
		fail_msg("%s: flags %#x, expected %#x", what, e->flags, flags);
	if (verdict >= 0 && e->verdict != verdict)
		fail_msg("%s: verdict %d, expected %d", what, e->verdict, verdict);
}

static void test_taps(void **state)
{
	struct srv *echo = srv_start(SRV_UDP_ECHO, NULL);
	struct ezp_core_ctx *ctx;
	struct ezp_session_summary s;
	struct ezp_worker *sw, *other;
	struct ezp_error err = {0};
	struct ezp_tap *tap, *lag;
	struct holder *h;
	struct tapc *tc, *lc;
	struct tev e;
	uint64_t prev, missing;
	char msg[32];
	int c, c2, gap;

	(void)state;
	current_test = __func__;
	daemon_up(UDP_CALLBACK_PIPELINE(""), echo->port);
	ctx = (struct ezp_core_ctx *)T->d;
	h = holder_new();
	claim(h, "p", "taps");
	tc = tapc_new();
	tap = tap_on(tc, "p", 0, 0, NULL);
	c = udp_client(bound_port("p"));

	send_dgram(c, "hello");
	expect_dgram(c, "hello", "plain datagram");
	s = session_of(c, "p");
	e = tap_expect(tc, EZP_TAP_SESSION_OPENED, 0, NULL, "session opened");
	check_event(&e, s.id, 0, -1, "session_opened");
	e = tap_expect(tc, EZP_TAP_PACKET, EZP_DIR_TO_SERVER, "hello", "to-server packet");
	check_event(&e, s.id, 0, EZP_VERDICT_PASS, "to-server 'hello'");
	e = tap_expect(tc, EZP_TAP_PACKET, EZP_DIR_TO_CLIENT, "hello", "to-client packet");
	check_event(&e, s.id, 0, EZP_VERDICT_PASS, "to-client 'hello'");

	send_dgram(c, "drop-me");
	e = tap_expect(tc, EZP_TAP_PACKET, EZP_DIR_TO_SERVER, "drop-me", "dropped packet");
	check_event(&e, s.id, EZP_PKT_DROPPED, EZP_VERDICT_DROP, "dropped 'drop-me'");

	send_dgram(c, "repl-me");
	expect_dgram(c, "REPLACED", "replaced datagram");
	e = tap_expect(tc, EZP_TAP_PACKET, EZP_DIR_TO_SERVER, "REPLACED", "replaced packet");
	check_event(&e, s.id, EZP_PKT_REPLACED, EZP_VERDICT_REPLACE, "replaced 'repl-me'");
	if (!e.has_orig || e.olen != 7 || memcmp(e.orig, "repl-me", 7))
		fail_msg("replaced packet: original bytes missing or wrong");
	e = tap_expect(tc, EZP_TAP_PACKET, EZP_DIR_TO_CLIENT, "REPLACED", "echo of replaced");
	check_event(&e, s.id, 0, EZP_VERDICT_PASS, "to-client 'REPLACED'");

	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "inj-c", 5, &err),
			 EZP_OK);
	expect_dgram(c, "inj-c", "injected to client");
	e = tap_expect(tc, EZP_TAP_PACKET, EZP_DIR_TO_CLIENT, "inj-c", "injected to client");
	check_event(&e, s.id, EZP_PKT_INJECTED, -1, "injected 'inj-c'");
	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_SERVER, "inj-s", 5, &err),
			 EZP_OK);
	expect_dgram(c, "inj-s", "echo of injected to server");
	e = tap_expect(tc, EZP_TAP_PACKET, EZP_DIR_TO_SERVER, "inj-s", "injected to server");
	check_event(&e, s.id, EZP_PKT_INJECTED, -1, "injected 'inj-s'");

	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	e = tap_expect(tc, EZP_TAP_SESSION_CLOSED, 0, NULL, "session closed");
	check_event(&e, s.id, 0, -1, "session_closed");
	pthread_mutex_lock(&tc->mu);
	for (int i = 1; i < tc->n; i++)
		if (tc->v[i].seq <= tc->v[i - 1].seq) {
			pthread_mutex_unlock(&tc->mu);
			fail_msg("tap seq not increasing at event %d", i);
		}
	pthread_mutex_unlock(&tc->mu);
	tap_off(tap);

	/* lag: a tap delivered on the other worker, stuck in its first callback */
	c2 = udp_client(bound_port("p"));
	send_dgram(c2, "warm");
	expect_dgram(c2, "warm", "second session");
	s = session_of(c2, "p");
	sw = ezp__session_worker(ctx, s.id);
	assert_non_null(sw);
	other = ctx->workers[sw == ctx->workers[0] ? 1 : 0];
	lc = tapc_new();
	lc->block_first = 1;
	T->gates[T->n_gates++] = lc;
	lag = tap_on(lc, "p", s.id, 8, other);

	send_dgram(c2, "first");
	expect_dgram(c2, "first", "first datagram under the lag tap");
	if (!wait_at_least(&lc->mu, &lc->cv, &lc->entered, 1, WAIT_MS))
		fail_msg("the lag tap never got its first event");
	for (int i = 0; i < 200; i++) { /* the tap is stuck: traffic must not be */
		snprintf(msg, sizeof(msg), "lag-%03d", i);
		send_dgram(c2, msg);
		expect_dgram(c2, msg, "traffic while a tap is stuck");
	}
	pthread_mutex_lock(&lc->mu);
	lc->gate_open = 1;
	pthread_cond_broadcast(&lc->cv);
	pthread_mutex_unlock(&lc->mu);
	if (!wait_at_least(&lc->mu, &lc->cv, &lc->lagged_calls, 1, WAIT_MS))
		fail_msg("on_lagged never came after the tap fell behind");
	/* wait until the events after the lag report are in too */
	if (!wait_at_least(&lc->mu, &lc->cv, &lc->n, 8, WAIT_MS))
		fail_msg("the lag tap got only %d events", lc->n);
	tap_off(lag);
	T->n_gates--;
	assert_int_equal(lc->gate_expired, 0);
	assert_true(lc->lagged > 0);
	gap = 0;
	missing = 0;
	prev = lc->v[0].seq;
	for (int i = 1; i < lc->n; i++) {
		if (lc->v[i].seq <= prev)
			fail_msg("lag tap: seq %llu after %llu", (unsigned long long)lc->v[i].seq,
				 (unsigned long long)prev);
		if (lc->v[i].seq > prev + 1) {
			gap = 1;
			missing += lc->v[i].seq - prev - 1;
		}
		prev = lc->v[i].seq;
	}
	assert_true(gap);
	if (missing != lc->lagged)
		fail_msg("lag tap: %llu seq numbers missing but on_lagged reported %llu",
			 (unsigned long long)missing, (unsigned long long)lc->lagged);
}

/* ---- 6. inject --------------------------------------------------------------------- */

static void test_inject(void **state)
{
	struct srv *echo = srv_start(SRV_TCP_ECHO, NULL);
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	char big[2000], got[1024], limit_msg[sizeof(err.message)];
	size_t n;
	int c, rc;

	(void)state;
	current_test = __func__;
	daemon_up("Limits: {MaxInjectBytes: 1024}\nPipelines:\n" TCP_PIPELINE("p"), echo->port);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "hi", "hi", "plain round trip");
	s = session_of(c, "p");

	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "INJ-TC", 6, &err),
			 EZP_OK);
	expect_bytes(c, "INJ-TC", "inject to client");
	tcp_roundtrip(c, "ping", "ping", "stream after an injection (no extra bytes)");

	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_SERVER, "INJ-TS", 6, &err),
			 EZP_OK);
	expect_bytes(c, "INJ-TS", "inject to server, echoed");

	memset(big, 'x', sizeof(big));
	rc = ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, big, sizeof(big), &err);
	if (rc != EZP_ERR_LIMIT)
		fail_msg("a 2000-byte injection with MaxInjectBytes 1024 returned %s (%d): %s",
			 ezp_status_str(rc), rc, err.message);
	snprintf(limit_msg, sizeof(limit_msg), "%s", err.message);
	memset(big, 'y', 1024);
	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, big, 1024, &err),
			 EZP_OK);
	assert_int_equal(recv_exact(c, got, 1024, WAIT_MS, &n), 0);
	assert_memory_equal(got, big, 1024);
	tcp_roundtrip(c, "pong", "pong", "stream after a refused injection");

	rc = ezp_session_inject(T->d, 987654321, EZP_DIR_TO_CLIENT, "x", 1, &err);
	assert_int_equal(rc, EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	rc = ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "x", 1, &err);
	assert_int_equal(rc, EZP_ERR_NOT_FOUND);

	/* last, so the checks above run whatever it says: the refusal names the limit */
	if (!strstr(limit_msg, "MaxInjectBytes") && !strstr(limit_msg, "limit"))
		fail_msg("EZP_ERR_LIMIT came with the message '%s', which does not name the limit",
			 limit_msg);
}

/* ---- 7. close ---------------------------------------------------------------------- */

static void test_close(void **state)
{
	struct srv *echo = srv_start(SRV_TCP_ECHO, NULL);
	struct ezp_session_summary s, *v;
	struct ezp_error err = {0};
	char buf[16];
	ssize_t r;
	size_t n;
	int c;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), echo->port);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "hello", "hello", "round trip");
	s = session_of(c, "p");
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	r = recv_wait(c, buf, sizeof(buf), WAIT_MS);
	if (r != 0)
		fail_msg("after ezp_session_close the client got %s, expected end of stream",
			 r == -2 ? "nothing"
			 : r < 0 ? strerror(errno)
				 : "bytes");
	n = list_sessions("p", &v);
	for (size_t i = 0; i < n; i++)
		if (v[i].id == s.id) {
			free(v);
			fail_msg("session %llu is still listed after ezp_session_close",
				 (unsigned long long)s.id);
		}
	free(v);
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_ERR_NOT_FOUND);
}

/* ---- 8. swap a pipeline's `to` ---------------------------------------------------- */

/* core->pipeline_addresses: @to_port is where @pipeline connects now; bound is its listener. */
static void check_addresses(const char *pipeline, uint16_t to_port, const char *what)
{
	const struct ezp_core *core = ezp_daemon_core(T->d);
	struct ezp_addr bound, to;
	int rc;

	memset(&bound, 0xff, sizeof(bound));
	memset(&to, 0xff, sizeof(to));
	rc = core->pipeline_addresses(core->ctx, pipeline, &bound, &to);
	if (rc != EZP_OK)
		fail_msg("%s: pipeline_addresses(%s): %s", what, pipeline, ezp_status_str(rc));
	if (addr_port(&bound) != bound_port(pipeline) || addr_port(&to) != to_port)
		fail_msg("%s: pipeline_addresses says bound %u to %u, expected %u and %u", what,
			 addr_port(&bound), addr_port(&to), bound_port(pipeline), to_port);
	assert_int_equal(core->pipeline_addresses(core->ctx, pipeline, NULL, NULL), EZP_OK);
	assert_int_equal(core->pipeline_addresses(core->ctx, "no-such", &bound, &to),
			 EZP_ERR_NOT_FOUND);
}

static void test_swap_pipeline_to(void **state)
{
	struct srv *a = srv_start(SRV_TCP_TAG, "A:"), *b = srv_start(SRV_TCP_TAG, "B:");
	struct ezp_session_summary s1, last;
	struct ezp_error err = {0};
	char to[96];
	int c1, c2, rc;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), a->port);
	check_addresses("p", a->port, "before the swap");
	c1 = tcp_client(bound_port("p"));
	tcp_roundtrip(c1, "x\n", "A:x\n", "before the swap");
	s1 = session_of(c1, "p");

	snprintf(to, sizeof(to), "tcp: {Connect: 127.0.0.1:%u}", b->port);
	rc = ezp_pipeline_swap_to(T->d, "p", to, 0, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_pipeline_swap_to: %s: %s", ezp_status_str(rc), err.message);
	check_addresses("p", b->port, "after the swap");
	tcp_roundtrip(c1, "y\n", "A:y\n", "an old session keeps its server");
	c2 = tcp_client(bound_port("p"));
	tcp_roundtrip(c2, "z\n", "B:z\n", "a new session gets the new `to`");
	tcp_roundtrip(c1, "y2\n", "A:y2\n", "the old session still on A");

	rc = ezp_pipeline_swap_to(T->d, "p", to, 1, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_pipeline_swap_to(apply_to_existing): %s: %s", ezp_status_str(rc),
			 err.message);
	if (!wait_session("p", s1.id, server_port_is, &b->port, &last))
		fail_msg("apply_to_existing: session %llu still has server port %u, not B %u",
			 (unsigned long long)s1.id, addr_port(&last.server), b->port);
	tcp_roundtrip(c1, "w\n", "B:w\n", "apply_to_existing moved the old session");
	tcp_roundtrip(c2, "v\n", "B:v\n", "the new session still works");
}

/* ---- 9. swap a session's server ------------------------------------------------------ */

static void test_swap_session_server(void **state)
{
	struct srv *a = srv_start(SRV_TCP_TAG, "A:"), *b = srv_start(SRV_TCP_TAG, "B:");
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	char addr[64];
	int c, dead, rc;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), a->port);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "1\n", "A:1\n", "before any swap");
	s = session_of(c, "p");

	/* a port bound but not listening: connecting there is refused */
	dead = loopback_stream(-1);
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", sock_port(dead));
	rc = ezp_session_swap_server(T->d, s.id, addr, &err);
	if (rc == EZP_OK)
		fail_msg("swapping to %s (nothing listening) succeeded", addr);
	if (!err.message[0])
		fail_msg("swapping to %s failed with %d but no message", addr, rc);
	tcp_roundtrip(c, "2\n", "A:2\n", "a failed swap leaves the session on A");

	snprintf(addr, sizeof(addr), "127.0.0.1:%u", b->port);
	rc = ezp_session_swap_server(T->d, s.id, addr, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_session_swap_server(%s): %s: %s", addr, ezp_status_str(rc),
			 err.message);
	tcp_roundtrip(c, "3\n", "B:3\n", "after the swap the same connection talks to B");
	tcp_roundtrip(c, "4\n", "B:4\n", "and keeps talking to B");
	assert_int_equal(session_of(c, "p").id, s.id);
}

/* ---- 10. swap a UDP client ----------------------------------------------------------- */

static void test_swap_client_udp(void **state)
{
	struct srv *echo = srv_start(SRV_UDP_ECHO, NULL);
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	char addr[64], buf[64];
	int x, y, rc;
	ssize_t n;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n"
		  "  - Name: p\n"
		  "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		  "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		  echo->port);
	x = udp_client(bound_port("p"));
	send_dgram(x, "from-x");
	expect_dgram(x, "from-x", "X's session");
	s = session_of(x, "p");
	y = udp_client(0);
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", sock_port(y));
	rc = ezp_session_swap_client(T->d, s.id, addr, 1, 0, 0, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_session_swap_client(%s): %s: %s", addr, ezp_status_str(rc),
			 err.message);
	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "to-y", 4, &err),
			 EZP_OK);
	n = recv_wait(y, buf, sizeof(buf), WAIT_MS);
	if (n != 4 || memcmp(buf, "to-y", 4))
		fail_msg("the re-pointed client Y got %zd bytes instead of 'to-y'", n);
	expect_quiet(x, QUIET_MS, "the old client X after the re-point");
}

/* ---- 11. TCP: dial a client leg and add it ------------------------------------------- */

static void test_dial_add_client(void **state)
{
	struct srv *echo = srv_start(SRV_TCP_ECHO, NULL);
	struct ezp_session_summary s, last;
	struct ezp_error err = {0};
	unsigned two = 2;
	char addr[64];
	struct pollfd p;
	int c, l, la, rc;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), echo->port);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "hello", "hello", "round trip");
	s = session_of(c, "p");

	l = loopback_stream(4);
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", sock_port(l));
	rc = ezp_session_swap_client(T->d, s.id, addr, 1, 1, 0, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_session_swap_client(dial, add, %s): %s: %s", addr, ezp_status_str(rc),
			 err.message);
	p = (struct pollfd){l, POLLIN, 0};
	assert_int_equal(poll(&p, 1, WAIT_MS), 1);
	la = track_fd(accept4(l, NULL, NULL, SOCK_CLOEXEC));
	if (!wait_session("p", s.id, has_clients, &two, &last))
		fail_msg("the session has %u client(s) after the dial, expected 2", last.n_clients);

	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "both", 4, &err),
			 EZP_OK);
	expect_bytes(c, "both", "the original client");
	expect_bytes(la, "both", "the dialled client leg");
}

/* ---- 12. TCP: accept a client into an existing session ---------------------------------- */

struct swap_call {
	struct ezp_daemon *d;
	uint64_t id;
	char addr[64];
	int rc;
	struct ezp_error err;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int done;
};

static void *swap_accept_main(void *arg)
{
	struct swap_call *sc = arg;
	int rc = ezp_session_swap_client(sc->d, sc->id, "127.0.0.2:0", 0, 1, (unsigned)WAIT_MS,
					 &sc->err);

	pthread_mutex_lock(&sc->mu);
	sc->rc = rc;
	sc->done = 1;
	pthread_cond_broadcast(&sc->cv);
	pthread_mutex_unlock(&sc->mu);
	return NULL;
}

static int routes_pending(struct ezp_daemon *d, const char *pipeline)
{
	struct ezp__pipeline *p = ezp__pipeline_find((struct ezp_core_ctx *)d, pipeline);
	int any;

	pthread_mutex_lock(&p->lock);
	any = !LIST_EMPTY(&p->routes);
	pthread_mutex_unlock(&p->lock);
	return any;
}

static void test_accept_add_client(void **state)
{
	struct srv *echo = srv_start(SRV_TCP_ECHO, NULL);
	struct ezp_session_summary s, *v;
	struct swap_call sc = {0};
	pthread_t th;
	uint64_t end;
	size_t n;
	int c, c2 = -1, ok;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), echo->port);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "one", "one", "round trip");
	s = session_of(c, "p");

	sync_init(&sc.mu, &sc.cv);
	sc.d = T->d;
	sc.id = s.id;
	sc.rc = -999;
	assert_int_equal(pthread_create(&th, NULL, swap_accept_main, &sc), 0);
	/* the call is waiting once its route is in place */
	end = mono_ms() + WAIT_MS;
	while (!routes_pending(T->d, "p") && !sc.done && mono_ms() < end)
		poll_pause();
	ok = routes_pending(T->d, "p");
	if (ok)
		c2 = tcp_client_from("127.0.0.2", bound_port("p"));
	ok = ok && wait_at_least(&sc.mu, &sc.cv, &sc.done, 1, 2 * WAIT_MS);
	pthread_join(th, NULL); /* returns by its own 5 s timeout at the latest */
	sync_fini(&sc.mu, &sc.cv);
	if (!ok)
		fail_msg("accept-mode swap: %s (rc %d: %s)",
			 sc.done ? "the route never appeared" : "never returned", sc.rc,
			 sc.err.message);
	if (sc.rc != EZP_OK)
		fail_msg("accept-mode swap returned %s (%d): %s", ezp_status_str(sc.rc), sc.rc,
			 sc.err.message);
	n = list_sessions("p", &v);
	if (n != 1 || v[0].id != s.id || v[0].n_clients != 2) {
		unsigned nc = n ? v[0].n_clients : 0;
		free(v);
		fail_msg("after accept add: %zu session(s), first with %u client(s); expected 1 "
			 "session (%llu) with 2",
			 n, nc, (unsigned long long)s.id);
	}
	free(v);
	tcp_roundtrip(c, "two", "two", "the first client after the add");
	expect_bytes(c2, "two", "the accepted client gets the server's bytes");
}

static void *swap_jammed_main(void *arg)
{
	struct swap_call *sc = arg;
	int rc = ezp_session_swap_server(sc->d, sc->id, sc->addr, &sc->err);

	pthread_mutex_lock(&sc->mu);
	sc->rc = rc;
	sc->done = 1;
	pthread_cond_broadcast(&sc->cv);
	pthread_mutex_unlock(&sc->mu);
	return NULL;
}

/*
 * A session closes while its server swap is still connecting (to a listener
 * whose accept queue is full, so the SYN goes unanswered): the waiting call
 * gets an error at once instead of waiting for a connect that nobody will
 * report (it used to wait for good, and so did the daemon's shutdown).
 */
static void test_swap_interrupted_by_close(void **state)
{
	struct srv *a = srv_start(SRV_TCP_TAG, "A:");
	struct ezp_session_summary s;
	struct swap_call sc = {0};
	struct ezp_error err = {0};
	pthread_t th;
	int c, jam, ok;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), a->port);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "1\n", "A:1\n", "before the swap");
	s = session_of(c, "p");

	jam = loopback_stream(0);
	tcp_client(sock_port(jam)); /* fills the accept queue: backlog 0 holds one */
	snprintf(sc.addr, sizeof(sc.addr), "127.0.0.1:%u", sock_port(jam));
	sync_init(&sc.mu, &sc.cv);
	sc.d = T->d;
	sc.id = s.id;
	sc.rc = -999;
	assert_int_equal(pthread_create(&th, NULL, swap_jammed_main, &sc), 0);
	/* let the swap reach its worker; were the close first, the swap finds no session:
	 * the call must return either way */
	poll_pause();
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	ok = wait_at_least(&sc.mu, &sc.cv, &sc.done, 1, WAIT_MS);
	if (!ok)
		fail_msg("ezp_session_swap_server did not return after its session closed");
	pthread_join(th, NULL);
	sync_fini(&sc.mu, &sc.cv);
	if (sc.rc != EZP_ERR_CLOSED && sc.rc != EZP_ERR_NOT_FOUND)
		fail_msg("the interrupted swap returned %s (%d): %s", ezp_status_str(sc.rc), sc.rc,
			 sc.err.message);
}

/* ---- 13. a Shared pipeline -------------------------------------------------------------- */

static void test_shared_pipeline(void **state)
{
	struct srv *echo = srv_start(SRV_TCP_ECHO, NULL);
	struct ezp_session_summary s, last, *v;
	struct ezp_error err = {0};
	unsigned two = 2;
	size_t n;
	int c1, c2;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p") "    Shared: true\n", echo->port);
	c1 = tcp_client(bound_port("p"));
	tcp_roundtrip(c1, "one", "one", "the first client");
	s = session_of(c1, "p");
	c2 = tcp_client(bound_port("p"));
	if (!wait_session("p", s.id, has_clients, &two, &last))
		fail_msg("Shared: the session has %u client(s), expected 2", last.n_clients);
	n = list_sessions("p", &v);
	free(v);
	assert_int_equal(n, 1);
	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "all", 3, &err), EZP_OK);
	expect_bytes(c1, "all", "Shared: the first client");
	expect_bytes(c2, "all", "Shared: the second client");
}

/* ---- 14. a live filter chain change under a stream ------------------------------------- */

#define STREAM_BYTES (8u << 20)
#define STREAM_AHEAD (256u << 10)

static uint8_t pattern(uint64_t i)
{
	uint64_t x = i * 0x9E3779B97F4A7C15ull;

	return (uint8_t)(x >> 56) ^ (uint8_t)(i >> 13);
}

static uint64_t fnv(uint64_t h, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ull;
	return h;
}

struct stream {
	int fd;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	uint64_t sent_hash, recv_hash;
	int recv_128k; /* bytes echoed / 128 KiB, for waiting on progress */
	size_t sent, received;
	int64_t first_bad; /* offset of the first wrong byte, -1 none */
	int w_err, r_err;  /* errno-ish; -2 = stalled, -3 = the reader stopped */
	int r_done;
};

static void *stream_writer(void *arg)
{
	struct stream *st = arg;
	uint8_t *buf = malloc(65536);
	uint64_t h = 0xcbf29ce484222325ull;
	size_t off = 0;

	while (buf && off < STREAM_BYTES) {
		size_t n = STREAM_BYTES - off < 65536 ? STREAM_BYTES - off : 65536;
		struct timespec end = deadline(2 * WAIT_MS);
		int late = 0;

		/* at most STREAM_AHEAD bytes in flight, so every stretch of the stream
		 * between two chain changes really crosses the proxy after the change */
		pthread_mutex_lock(&st->mu);
		while (off + n > st->received + STREAM_AHEAD && !st->r_done && !late)
			late = pthread_cond_timedwait(&st->cv, &st->mu, &end) == ETIMEDOUT;
		pthread_mutex_unlock(&st->mu);
		if (late || st->r_done) {
			st->w_err = late ? -2 : -3;
			break;
		}
		for (size_t i = 0; i < n; i++)
			buf[i] = pattern(off + i);
		h = fnv(h, buf, n);
		if (send_all(st->fd, buf, n) < 0) {
			st->w_err = errno ? errno : -1;
			break;
		}
		off += n;
	}
	free(buf);
	st->sent_hash = h;
	st->sent = off;
	return NULL;
}

static void *stream_reader(void *arg)
{
	struct stream *st = arg;
	uint8_t *buf = malloc(65536);
	uint64_t h = 0xcbf29ce484222325ull;
	size_t off = 0;

	while (buf && off < STREAM_BYTES) {
		ssize_t n = recv_wait(st->fd, buf, 65536, 2 * WAIT_MS);
		if (n <= 0) {
			st->r_err = n == -2 ? -2 : n == 0 ? -1 : errno;
			break;
		}
		for (ssize_t i = 0; i < n && st->first_bad < 0; i++)
			if (buf[i] != pattern(off + (size_t)i))
				st->first_bad = (int64_t)(off + (size_t)i);
		h = fnv(h, buf, (size_t)n);
		off += (size_t)n;
		pthread_mutex_lock(&st->mu);
		st->received = off;
		st->recv_128k = (int)(off >> 17);
		pthread_cond_broadcast(&st->cv);
		pthread_mutex_unlock(&st->mu);
	}
	free(buf);
	pthread_mutex_lock(&st->mu);
	st->recv_hash = h;
	st->r_done = 1;
	pthread_cond_broadcast(&st->cv);
	pthread_mutex_unlock(&st->mu);
	return NULL;
}

/* A holder that passes everything and counts the bytes it saw. Thread: worker. */
static int count_on_packet(void *userdata, struct ezp_filter_call *call)
{
	struct holder *h = userdata;

	pthread_mutex_lock(&h->mu);
	h->seen += (int)call->pkt->len;
	pthread_mutex_unlock(&h->mu);
	return EZP_VERDICT_PASS;
}

static void test_filter_change_under_stream(void **state)
{
	struct srv *echo = srv_start(SRV_TCP_ECHO, NULL);
	struct ezp_session_summary s, last;
	struct ezp_error err = {0};
	struct stream st = {.first_bad = -1};
	struct timeval tv = {10, 0};
	pthread_t wt, rt;
	int c, rc = EZP_OK, changes = 0, at, stalled = 0, full_path = 0, seen;
	struct holder *h = NULL;
	struct ezp_filter_holder fh;
	struct ezp_claim *cl;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), echo->port);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "warm-up", "warm-up", "round trip");
	s = session_of(c, "p");
	if (!wait_session("p", s.id, is_bridged, NULL, &last))
		fail_msg("a TCP session with no filters and no taps is not bridged (bridged = %d)",
			 last.bridged);

	setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	st.fd = c;
	sync_init(&st.mu, &st.cv);
	assert_int_equal(pthread_create(&rt, NULL, stream_reader, &st), 0);
	assert_int_equal(pthread_create(&wt, NULL, stream_writer, &st), 0);
	/* change the chain at several points of the stream (every 1 MiB echoed) */
	for (at = 1; at <= 6; at++) {
		if (!wait_at_least(&st.mu, &st.cv, &st.recv_128k, at * 8, 2 * WAIT_MS)) {
			stalled = 1;
			break;
		}
		rc = ezp_pipeline_set_filters(T->d, "p", at % 2 ? "- callback: {Name: f}" : "[]",
					      &err);
		if (rc != EZP_OK)
			break;
		changes++;
		if (at == 1) { /* the filter's claim slot exists now: count what it sees */
			h = holder_new();
			fh = holder_desc(h, "counter");
			fh.on_packet = count_on_packet;
			cl = NULL;
			rc = ezp_filter_claim(T->d, "p", "callback:f", &fh, &cl, &err);
			if (rc != EZP_OK)
				break;
			T->claims[T->n_claims++] = cl;
		}
		if (at % 2) { /* a claimed filter now: the session left the fast path at once */
			struct ezp_session_summary *v;
			size_t n = list_sessions("p", &v);
			full_path += n == 1 && v[0].id == s.id && !v[0].bridged;
			free(v);
		}
	}
	if (!stalled && rc == EZP_OK && changes % 2) { /* end with no filters */
		rc = ezp_pipeline_set_filters(T->d, "p", "[]", &err);
		changes++;
	}
	pthread_join(wt, NULL);
	pthread_join(rt, NULL);
	sync_fini(&st.mu, &st.cv);
	if (rc != EZP_OK)
		fail_msg("ezp_pipeline_set_filters or claim (change %d): %s: %s", changes + 1,
			 ezp_status_str(rc), err.message);
	if (st.w_err || st.r_err || st.received != STREAM_BYTES || st.first_bad >= 0 ||
	    st.sent_hash != st.recv_hash)
		fail_msg("stream through %d live chain changes: sent %zu (err %d), echoed %zu "
			 "(err %d%s), first wrong byte at %lld, hashes %s",
			 changes, st.sent, st.w_err, st.received, st.r_err,
			 st.r_err == -2 ? " = stalled 10 s" : "", (long long)st.first_bad,
			 st.sent_hash == st.recv_hash ? "equal" : "differ");
	assert_int_equal(changes, 6);
	if (full_path != 3)
		fail_msg("only %d of 3 filter insertions took the session off the fast path",
			 full_path);
	assert_non_null(h);
	pthread_mutex_lock(&h->mu);
	seen = h->seen;
	pthread_mutex_unlock(&h->mu);
	if (seen < (int)(1u << 20) - (int)STREAM_AHEAD)
		fail_msg("the inserted filter saw only %d bytes of the stream", seen);
	tcp_roundtrip(c, "after", "after", "round trip after the stream");
	if (!wait_session("p", s.id, is_bridged, NULL, &last))
		fail_msg("with the filters removed the session did not go back to the fast path "
			 "(bridged = %d)",
			 last.bridged);
}

/* ---- 15. limits: MaxSessions -------------------------------------------------------------- */

static void test_max_sessions(void **state)
{
	struct srv *echo = srv_start(SRV_TCP_ECHO, NULL);
	char buf[16];
	ssize_t r;
	int c1, c2, c3;
	struct ezp_session_summary *v;
	size_t n;

	(void)state;
	current_test = __func__;
	daemon_up("Limits: {MaxSessions: 2}\nPipelines:\n" TCP_PIPELINE("p"), echo->port);
	c1 = tcp_client(bound_port("p"));
	tcp_roundtrip(c1, "a", "a", "first client");
	c2 = tcp_client(bound_port("p"));
	tcp_roundtrip(c2, "b", "b", "second client");
	c3 = tcp_client(bound_port("p"));
	(void)send_all(c3, "c", 1);
	r = recv_wait(c3, buf, sizeof(buf), WAIT_MS);
	if (r > 0)
		fail_msg("the third client (MaxSessions 2) got %zd bytes back", r);
	if (r == -2)
		fail_msg("the third client (MaxSessions 2) was not closed within %d ms", WAIT_MS);
	tcp_roundtrip(c1, "a2", "a2", "first client after the refusal");
	tcp_roundtrip(c2, "b2", "b2", "second client after the refusal");
	n = list_sessions("p", &v);
	free(v);
	assert_int_equal(n, 2);
}

/* ---- 16. reload ------------------------------------------------------------------------- */

static void test_reload(void **state)
{
	struct srv *a = srv_start(SRV_TCP_TAG, "A:"), *b = srv_start(SRV_TCP_TAG, "B:");
	struct ezp_error err = {0};
	char yaml[1024], bad[1024];
	uint16_t pport;
	int c, cq, rc;

	(void)state;
	current_test = __func__;
	daemon_up("Pipelines:\n" TCP_PIPELINE("p"), a->port);
	pport = bound_port("p");
	c = tcp_client(pport);
	tcp_roundtrip(c, "1\n", "A:1\n", "p before reload");

	snprintf(yaml, sizeof(yaml), "Pipelines:\n" TCP_PIPELINE("p") TCP_PIPELINE("q"), a->port,
		 b->port);
	rc = ezp_daemon_reload(T->d, yaml, "reload-1", &err);
	if (rc != EZP_OK)
		fail_msg("reload adding q: %s at %d:%d: %s", ezp_status_str(rc), err.line,
			 err.column, err.message);
	cq = tcp_client(bound_port("q"));
	tcp_roundtrip(cq, "q\n", "B:q\n", "the added pipeline q");
	tcp_roundtrip(c, "2\n", "A:2\n", "p's session across the reload");
	assert_int_equal(bound_port("p"), pport);

	/* line 5, column 5: the unknown key */
	snprintf(bad, sizeof(bad),
		 "Pipelines:\n"
		 "  - Name: p\n"
		 "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		 "    Bogus: 1\n",
		 b->port);
	memset(&err, 0, sizeof(err));
	rc = ezp_daemon_reload(T->d, bad, "reload-2", &err);
	assert_int_equal(rc, EZP_ERR_CONFIG);
	if (err.line != 5 || err.column != 5 || !strstr(err.message, "Bogus"))
		fail_msg("unknown key: error at %d:%d '%s', expected 5:5 naming 'Bogus'", err.line,
			 err.column, err.message);
	tcp_roundtrip(c, "3\n", "A:3\n", "p after a refused reload");
	close_fd(c);
	c = tcp_client(bound_port("p"));
	tcp_roundtrip(c, "4\n", "A:4\n", "a new p session after a refused reload (still A)");
	cq = tcp_client(bound_port("q"));
	tcp_roundtrip(cq, "q2\n", "B:q2\n", "q after a refused reload");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_verdicts_udp, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_hold_keeps_order, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_hold_timeout, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_holder_goes_away, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_taps, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_inject, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_close, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_swap_pipeline_to, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_swap_session_server, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_swap_interrupted_by_close, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_swap_client_udp, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_dial_add_client, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_accept_add_client, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_shared_pipeline, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_filter_change_under_stream, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_max_sessions, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_reload, setup, teardown),
	};

	const char *preload = getenv("LD_PRELOAD");

	if (preload && strstr(preload, "vgpreload")) /* valgrind: everything is slower */
		slow = 10;
	if (getenv("EZP_TEST_FILTER")) /* e.g. EZP_TEST_FILTER='test_inject' */
		cmocka_set_test_filter(getenv("EZP_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
