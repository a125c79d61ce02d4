/*
 * test_tcp.c - the `tcp` transport plugin (plugins/tcp/tcp.c) under a live
 * daemon: listening (IPv4, IPv6, a port in use, restart on the same port),
 * connecting (refused, timed out, bytes queued while connecting), the full
 * path and the splice fast path, backpressure with partial writes,
 * half-close both ways, end of stream and unbridging with bytes still in
 * the pipes, resets on either side, pausing through a hold window, hand-off
 * of an accepted client to another worker, failures of the core's services
 * (injected through the plugin's services table), and running out of file
 * descriptors (in a forked child).
 *
 * Each test runs its own daemon from YAML with the plugins of the build
 * tree. Servers are plain sockets the test thread accepts and drives
 * itself, so it decides exactly when a peer reads, writes, half-closes or
 * resets. Only 127.0.0.1, 127.0.0.2 (a source address) and ::1 are used.
 * Every wait has a deadline and waits for an event or polls a condition
 * until a deadline; every loop is bounded.
 *
 * Threads: the test's (control); tap and filter callbacks run on the
 * daemon's workers and touch only state guarded by a mutex.
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "wait.h"

static int slow = 1;	      /* 10 under valgrind */
#define WAIT_MS (5000 * slow) /* the deadline of every ordinary wait */
#define QUIET_MS 300	      /* how long "nothing arrives" is watched */
#define STALL_MS (300 * slow) /* no write progress this long: the path is full */
#define STALL_CAP (96u << 20) /* a stream that never stalls by then has no backpressure */

#include "net.h" /* after WAIT_MS: its expect_* helpers wait that long */

/* ---- per-test context: everything a test made, freed even when it fails --- */

struct tapc;
struct holder;

struct ctx {
	struct ezp_daemon *d;
	int fds[96];
	int n_fds;
	struct ezp_claim *claims[4];
	int n_claims;
	struct ezp_tap *taps[4];
	int n_taps;
	struct holder *holders[4];
	int n_holders;
	struct tapc *tapcs[4];
	int n_tapcs;
};

static const char *volatile current_test = "?";
static struct ctx *T;

static int track_fd(int fd)
{
	if (fd < 0)
		fail_msg("a socket call failed: %s", strerror(errno));
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

/* Close with SO_LINGER 0: the peer gets a reset, not a FIN. */
static void rst_close(int fd)
{
	struct linger lg = {1, 0};

	assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)), 0);
	close_fd(fd);
}

/* ---- addresses and plain sockets ------------------------------------------ */

static socklen_t loopback(int family, const char *ip4, uint16_t port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons(port);
		a->sin6_addr = in6addr_loopback;
		return sizeof(*a);
	}
	struct sockaddr_in *a = (struct sockaddr_in *)ss;
	a->sin_family = AF_INET;
	a->sin_port = htons(port);
	inet_pton(AF_INET, ip4 ? ip4 : "127.0.0.1", &a->sin_addr);
	return sizeof(*a);
}

static uint16_t ss_port(const struct sockaddr_storage *ss)
{
	return ss->ss_family == AF_INET6 ? ntohs(((const struct sockaddr_in6 *)ss)->sin6_port)
					 : ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

static uint16_t sock_port(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		return 0;
	return ss_port(&ss);
}

/* Can this host use ::1? (Some containers have no IPv6 at all.) */
static int have_ipv6(void)
{
	struct sockaddr_storage ss;
	socklen_t len = loopback(AF_INET6, NULL, 0, &ss);
	int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0), ok;

	if (fd < 0)
		return 0;
	ok = bind(fd, (struct sockaddr *)&ss, len) == 0;
	close(fd);
	return ok;
}

/* A server socket on loopback port 0, listening with @backlog; the test accepts. */
static int srv_listen(int family, int backlog, uint16_t *port)
{
	struct sockaddr_storage ss;
	socklen_t len = loopback(family, NULL, 0, &ss);
	int fd = track_fd(socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0)), one = 1;

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, backlog) != 0)
		fail_msg("server socket: %s", strerror(errno));
	*port = sock_port(fd);
	return fd;
}

/* Accept the proxy's connection to a test server, within WAIT_MS. */
static int srv_accept(int lfd, const char *what)
{
	struct pollfd p = {lfd, POLLIN, 0};
	int fd, one = 1;

	if (poll(&p, 1, WAIT_MS) != 1)
		fail_msg("%s: the proxy never connected to the server", what);
	fd = track_fd(accept4(lfd, NULL, NULL, SOCK_CLOEXEC));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

/* A client connected to the proxy at @port, from @src_ip:@src_port when given. */
static int client_from(int family, const char *src_ip, uint16_t src_port, uint16_t port)
{
	struct sockaddr_storage to, from;
	socklen_t len = loopback(family, NULL, port, &to);
	int fd = track_fd(socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0)), one = 1;

	if (src_ip) {
		socklen_t fl = loopback(AF_INET, src_ip, src_port, &from);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, (struct sockaddr *)&from, fl) != 0)
			fail_msg("bind %s:%u: %s", src_ip, src_port, strerror(errno));
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&to, len) != 0)
		fail_msg("connect to the proxy (port %u): %s", port, strerror(errno));
	return fd;
}

static int client(uint16_t port)
{
	return client_from(AF_INET, NULL, 0, port);
}

static void set_nonblock(int fd)
{
	assert_int_equal(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), 0);
}

static int send_all(int fd, const void *data, size_t len)
{
	const char *p = data;
	uint64_t end = mono_ms() + (uint64_t)WAIT_MS;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN && mono_ms() < end) {
			struct pollfd q = {fd, POLLOUT, 0};
			(void)poll(&q, 1, 50);
			continue;
		}
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void expect_text(int fd, const char *want, const char *what)
{
	size_t n = strlen(want), got = 0;
	char buf[512];
	uint64_t end = mono_ms() + (uint64_t)WAIT_MS;

	assert_true(n < sizeof(buf));
	while (got < n) {
		int64_t left = (int64_t)(end - mono_ms());
		ssize_t r = recv_wait(fd, buf + got, n - got, left > 0 ? (int)left : 0);
		if (r <= 0)
			fail_msg("%s: expected '%s', got '%.*s' then %s", what, want, (int)got, buf,
				 r == -2  ? "nothing before the deadline"
				 : r == 0 ? "end of stream"
					  : strerror(errno));
		got += (size_t)r;
	}
	if (memcmp(buf, want, n))
		fail_msg("%s: expected '%s', got '%.*s'", what, want, (int)n, buf);
}

static void roundtrip(int c, int s, const char *what)
{
	assert_int_equal(send_all(c, "ping", 4), 0);
	expect_text(s, "ping", what);
	assert_int_equal(send_all(s, "pong", 4), 0);
	expect_text(c, "pong", what);
}

/* The next read is the end of stream (0), or a reset when @reset_ok. */
static void expect_eof(int fd, int reset_ok, const char *what)
{
	char buf[256];
	ssize_t r = recv_wait(fd, buf, sizeof(buf), WAIT_MS);

	if (r == 0 || (reset_ok && r < 0 && r != -2 && (errno == ECONNRESET || errno == EPIPE)))
		return;
	if (r > 0)
		fail_msg("%s: expected the end of stream, got %zd byte(s) '%.*s'", what, r,
			 (int)(r < 40 ? r : 40), buf);
	fail_msg("%s: expected the end of stream, got %s", what,
		 r == -2 ? "nothing before the deadline" : strerror(errno));
}

static void expect_quiet(int fd, int ms, const char *what)
{
	char buf[256];
	ssize_t r = recv_wait(fd, buf, sizeof(buf), ms);

	if (r == -2)
		return;
	fail_msg("%s: expected nothing, got %s", what,
		 r > 0	  ? "bytes"
		 : r == 0 ? "end of stream"
			  : strerror(errno));
}

/* ---- patterned streams ------------------------------------------------------ */

static uint8_t pattern(unsigned seed, uint64_t i)
{
	uint64_t x = (i + ((uint64_t)seed << 40)) * 0x9E3779B97F4A7C15ull;

	return (uint8_t)(x >> 56) ^ (uint8_t)(i >> 13);
}

/* One direction of a stream: bytes pattern(seed, i) written to wfd, read from rfd. */
struct flow {
	int wfd, rfd;
	unsigned seed;
	size_t sent, got, total; /* total 0: unbounded while stalling */
	int eof;		 /* the reader saw the end of stream */
	const char *name;
};

/*
 * Write (never read) until no flow made progress for STALL_MS, or every
 * flow hit STALL_CAP. Returns 1 when everything stalled: the proxy stopped
 * taking bytes, so nothing in between grows without bound.
 */
static int flows_stall(struct flow *f, int n)
{
	uint8_t buf[16384];
	uint64_t last = mono_ms();

	for (int i = 0; i < n; i++)
		set_nonblock(f[i].wfd);
	for (;;) {
		int progress = 0, capped = 0;
		for (int i = 0; i < n; i++) {
			ssize_t w;
			if (f[i].sent >= STALL_CAP) {
				capped++;
				continue;
			}
			for (size_t k = 0; k < sizeof(buf); k++)
				buf[k] = pattern(f[i].seed, f[i].sent + k);
			w = send(f[i].wfd, buf, sizeof(buf), MSG_NOSIGNAL | MSG_DONTWAIT);
			if (w > 0) {
				f[i].sent += (size_t)w;
				progress = 1;
			} else if (w < 0 && errno != EAGAIN && errno != EINTR) {
				fail_msg("%s: send while filling: %s", f[i].name, strerror(errno));
			}
		}
		if (capped == n)
			return 0;
		if (progress) {
			last = mono_ms();
			continue;
		}
		if (mono_ms() - last >= (uint64_t)STALL_MS)
			return 1;
		struct pollfd p[8];
		for (int i = 0; i < n; i++)
			p[i] = (struct pollfd){f[i].wfd, POLLOUT, 0};
		(void)poll(p, (nfds_t)n, 20);
	}
}

/*
 * Write each flow up to its total and read it all back, checking every
 * byte; @want_eof: then the reader must see the end of stream.
 */
static void flows_finish(struct flow *f, int n, int want_eof, int ms)
{
	uint8_t *buf = malloc(65536);
	uint64_t end = mono_ms() + (uint64_t)ms;

	assert_non_null(buf);
	for (int i = 0; i < n; i++) {
		set_nonblock(f[i].wfd);
		set_nonblock(f[i].rfd);
	}
	for (;;) {
		struct pollfd p[16];
		int np = 0, done = 0;

		for (int i = 0; i < n; i++) {
			if (f[i].sent < f[i].total) {
				size_t k, len = f[i].total - f[i].sent < 16384
						    ? f[i].total - f[i].sent
						    : 16384;
				for (k = 0; k < len; k++)
					buf[k] = pattern(f[i].seed, f[i].sent + k);
				ssize_t w = send(f[i].wfd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
				if (w > 0)
					f[i].sent += (size_t)w;
				else if (w < 0 && errno != EAGAIN && errno != EINTR) {
					free(buf);
					fail_msg("%s: send at %zu: %s", f[i].name, f[i].sent,
						 strerror(errno));
				}
			}
			for (int rounds = 0; rounds < 8; rounds++) {
				ssize_t r = recv(f[i].rfd, buf, 65536, MSG_DONTWAIT);
				if (r > 0) {
					for (ssize_t k = 0; k < r; k++)
						if (buf[k] !=
						    pattern(f[i].seed, f[i].got + (size_t)k)) {
							free(buf);
							fail_msg("%s: byte %zu is wrong (lost, "
								 "reordered or duplicated bytes)",
								 f[i].name, f[i].got + (size_t)k);
						}
					f[i].got += (size_t)r;
					if (f[i].got > f[i].total) {
						free(buf);
						fail_msg("%s: %zu bytes arrived, only %zu sent",
							 f[i].name, f[i].got, f[i].total);
					}
					continue;
				}
				if (r == 0) {
					f[i].eof = 1;
				} else if (errno != EAGAIN && errno != EINTR) {
					free(buf);
					fail_msg("%s: recv at %zu: %s", f[i].name, f[i].got,
						 strerror(errno));
				}
				break;
			}
			if (f[i].got == f[i].total && (!want_eof || f[i].eof))
				done++;
			else {
				p[np++] = (struct pollfd){f[i].rfd, POLLIN, 0};
				if (f[i].sent < f[i].total)
					p[np++] = (struct pollfd){f[i].wfd, POLLOUT, 0};
			}
			if (f[i].eof && f[i].got < f[i].total) {
				free(buf);
				fail_msg("%s: end of stream after %zu of %zu bytes", f[i].name,
					 f[i].got, f[i].total);
			}
		}
		if (done == n)
			break;
		if (mono_ms() > end) {
			char msg[512] = "";
			for (int i = 0; i < n; i++)
				snprintf(msg + strlen(msg), sizeof(msg) - strlen(msg),
					 " [%s: sent %zu got %zu of %zu eof %d]", f[i].name,
					 f[i].sent, f[i].got, f[i].total, f[i].eof);
			free(buf);
			fail_msg("streams did not finish before the deadline:%s", msg);
		}
		(void)poll(p, (nfds_t)np, 20);
	}
	free(buf);
}

/* ---- faults through the services table -------------------------------------------- */

/*
 * A plugin reaches the core only through its `struct ezp_core` table, so a
 * test can make one service fail for it: each daemon's table gets wrappers
 * that pass every call through, except that fault_X = n makes the call
 * after the next n calls of X fail once (n = 0: the next call). -1: none.
 */
static struct ezp_core real_table;
static atomic_int fault_packet_new = -1, fault_watch_add = -1, fault_timer_new = -1,
		  fault_defer = -1;

static int fault_now(atomic_int *f)
{
	int v = atomic_load(f);

	while (v >= 0)
		if (atomic_compare_exchange_weak(f, &v, v - 1))
			return v == 0;
	return 0;
}

static void faults_off(void)
{
	atomic_store(&fault_packet_new, -1);
	atomic_store(&fault_watch_add, -1);
	atomic_store(&fault_timer_new, -1);
	atomic_store(&fault_defer, -1);
}

static struct ezp_packet *fi_packet_new(size_t len)
{
	return fault_now(&fault_packet_new) ? NULL : real_table.packet_new(len);
}

static struct ezp_watch *fi_watch_add(struct ezp_worker *w, int fd, unsigned events,
				      ezp_watch_fn fn, void *arg)
{
	return fault_now(&fault_watch_add) ? NULL : real_table.watch_add(w, fd, events, fn, arg);
}

static struct ezp_timer *fi_timer_new(struct ezp_worker *w, ezp_fn fn, void *arg)
{
	return fault_now(&fault_timer_new) ? NULL : real_table.timer_new(w, fn, arg);
}

static int fi_defer(struct ezp_worker *w, ezp_fn fn, void *arg)
{
	return fault_now(&fault_defer) ? EZP_ERR_CLOSED : real_table.defer(w, fn, arg);
}

/* Before the daemon starts: nothing runs on its workers yet. */
static void faults_install(struct ezp_daemon *d)
{
	struct ezp_core *t = &((struct ezp_core_ctx *)d)->table;

	real_table = *t;
	t->packet_new = fi_packet_new;
	t->watch_add = fi_watch_add;
	t->timer_new = fi_timer_new;
	t->defer = fi_defer;
}

/* ---- the daemon ----------------------------------------------------------------- */

static int daemon_try(unsigned workers, const char *yaml, struct ezp_daemon **out,
		      struct ezp_error *err)
{
	const char *plugins = getenv("EZP_TEST_PLUGINS");
	const char *paths[] = {plugins ? plugins : "build/plugins", NULL};
	struct ezp_daemon_opts opts = {.struct_size = sizeof(opts),
				       .workers = workers,
				       .plugin_paths = paths,
				       .no_default_paths = 1,
				       .log_level = EZP_LOG_ERROR};
	int rc;

	*out = NULL;
	rc = ezp_daemon_new(yaml, "test_tcp", &opts, out, err);
	if (rc != EZP_OK)
		return rc;
	faults_install(*out);
	return ezp_daemon_start(*out, err);
}

__attribute__((format(printf, 2, 3))) static struct ezp_daemon *daemon_up(unsigned workers,
									  const char *fmt, ...)
{
	struct ezp_error err = {0};
	char yaml[4096];
	va_list ap;
	int rc;

	va_start(ap, fmt);
	vsnprintf(yaml, sizeof(yaml), fmt, ap);
	va_end(ap);
	rc = daemon_try(workers, yaml, &T->d, &err);
	if (rc != EZP_OK)
		fail_msg("daemon: %s (%d) at %d:%d: %s\n%s", ezp_status_str(rc), rc, err.line,
			 err.column, err.message, yaml);
	return T->d;
}

static uint16_t bound_port(const char *pipeline)
{
	struct ezp_addr a;

	assert_int_equal(ezp_pipeline_bound(T->d, pipeline, &a), EZP_OK);
	return ss_port(&a.ss);
}

static size_t list_sessions(const char *pipeline, struct ezp_session_summary **v)
{
	size_t n = 0;

	*v = NULL;
	assert_int_equal(ezp_daemon_sessions(T->d, pipeline, v, &n), EZP_OK);
	return n;
}

static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family || ss_port(a) != ss_port(b))
		return 0;
	if (a->ss_family == AF_INET6)
		return !memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
			       &((const struct sockaddr_in6 *)b)->sin6_addr,
			       sizeof(struct in6_addr));
	return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
	       ((const struct sockaddr_in *)b)->sin_addr.s_addr;
}

/* The session whose first client is @fd's local address, within WAIT_MS. */
static struct ezp_session_summary session_of(int fd, const char *pipeline)
{
	struct sockaddr_storage me;
	socklen_t len = sizeof(me);
	uint64_t end = mono_ms() + (uint64_t)WAIT_MS;

	assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &len), 0);
	do {
		struct ezp_session_summary *v, found;
		size_t n = list_sessions(pipeline, &v);
		for (size_t i = 0; i < n; i++)
			if (v[i].client.len && same_addr(&v[i].client.ss, &me)) {
				found = v[i];
				free(v);
				return found;
			}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("no session of pipeline %s has a client with port %u", pipeline, ss_port(&me));
	abort(); /* not reached */
}

/* Wait until session @id is listed with bridged == @bridged (or, @bridged < 0, is gone). */
static void wait_session(const char *pipeline, uint64_t id, int bridged, const char *what)
{
	uint64_t end = mono_ms() + (uint64_t)WAIT_MS;
	int seen = -2;

	do {
		struct ezp_session_summary *v;
		size_t n = list_sessions(pipeline, &v);
		seen = -1;
		for (size_t i = 0; i < n; i++)
			if (v[i].id == id)
				seen = v[i].bridged;
		free(v);
		if (seen == bridged)
			return;
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("%s: session %llu is %s, expected %s", what, (unsigned long long)id,
		 seen < 0 ? "gone"
		 : seen	  ? "bridged"
			  : "on the full path",
		 bridged < 0 ? "gone"
		 : bridged   ? "bridged"
			     : "on the full path");
}

/* A session through pipeline @p to the test server @lfd: client, server, summary. */
struct pair {
	int c, s;
	struct ezp_session_summary ss;
};

static struct pair pair_open_fam(int family, const char *pipeline, int lfd)
{
	struct pair pr;

	pr.c = client_from(family, NULL, 0, bound_port(pipeline));
	pr.s = srv_accept(lfd, pipeline);
	roundtrip(pr.c, pr.s, "first round trip");
	pr.ss = session_of(pr.c, pipeline);
	return pr;
}

static struct pair pair_open(const char *pipeline, int lfd)
{
	return pair_open_fam(AF_INET, pipeline, lfd);
}

/* ---- a tap that records session events ---------------------------------------- */

struct tev {
	int type;
	uint64_t session_id;
	int close_reason;
	char close_text[160];
	int dir;
	size_t len;
};

struct tapc {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct tev v[256];
	int n;
	int closed; /* SESSION_CLOSED events */
	uint64_t packet_bytes;
};

static void tapc_on_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct tapc *tc = userdata;

	pthread_mutex_lock(&tc->mu);
	if (ev->type == EZP_TAP_PACKET && ev->pkt)
		tc->packet_bytes += ev->pkt->len;
	if (ev->type != EZP_TAP_PACKET && tc->n < (int)EZP_ARRAY_LEN(tc->v)) {
		struct tev *e = &tc->v[tc->n++];
		memset(e, 0, sizeof(*e));
		e->type = ev->type;
		e->session_id = ev->session_id;
		if (ev->info) {
			e->close_reason = ev->info->close_reason;
			snprintf(e->close_text, sizeof(e->close_text), "%s",
				 ev->info->close_text ? ev->info->close_text : "");
		}
		if (ev->type == EZP_TAP_SESSION_CLOSED)
			tc->closed++;
	}
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
	sync_fini(&tc->mu, &tc->cv);
	free(tc);
}

static struct ezp_tap *tap_on(struct ezp_daemon *d, struct tapc *tc, const char *pipeline)
{
	struct ezp_tap_opts o = {.struct_size = sizeof(o),
				 .pipeline = pipeline,
				 .userdata = tc,
				 .on_event = tapc_on_event};
	struct ezp_tap *tap = NULL;

	if (ezp_tap_subscribe(d, &o, &tap) != EZP_OK)
		return NULL;
	if (T)
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

/* Wait for the close of one session (any when @sid is 0); copies the event. */
static int tap_closed(struct tapc *tc, uint64_t sid, struct tev *out, int ms)
{
	struct timespec end = deadline(ms);
	int found = 0;

	pthread_mutex_lock(&tc->mu);
	for (;;) {
		for (int i = 0; i < tc->n && !found; i++)
			if (tc->v[i].type == EZP_TAP_SESSION_CLOSED &&
			    (!sid || tc->v[i].session_id == sid)) {
				*out = tc->v[i];
				found = 1;
			}
		if (found || pthread_cond_timedwait(&tc->cv, &tc->mu, &end) == ETIMEDOUT)
			break;
	}
	pthread_mutex_unlock(&tc->mu);
	return found;
}

static struct tev expect_closed(struct tapc *tc, uint64_t sid, int reason, const char *text,
				const char *what)
{
	struct tev e;

	if (!tap_closed(tc, sid, &e, WAIT_MS))
		fail_msg("%s: no session_closed event before the deadline", what);
	if (e.close_reason != reason)
		fail_msg("%s: close reason %d ('%s'), expected %d", what, e.close_reason,
			 e.close_text, reason);
	if (text && strcmp(e.close_text, text))
		fail_msg("%s: close text '%s', expected '%s'", what, e.close_text, text);
	return e;
}

/* ---- a holder of the `callback` filter ------------------------------------------- */

/* To-server packets starting with "hold" are held (ids recorded); the rest pass. */
struct holder {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	uint64_t holds[64];
	int n_holds;
	int seen;
};

static int holder_on_packet(void *userdata, struct ezp_filter_call *call)
{
	struct holder *h = userdata;
	const struct ezp_packet *p = call->pkt;
	int v = EZP_VERDICT_PASS;

	if (p->dir != EZP_DIR_TO_SERVER)
		return EZP_VERDICT_PASS;
	pthread_mutex_lock(&h->mu);
	h->seen++;
	if (p->len >= 4 && !memcmp(p->data, "hold", 4) &&
	    h->n_holds < (int)EZP_ARRAY_LEN(h->holds)) {
		h->holds[h->n_holds++] = call->hold_id;
		v = EZP_VERDICT_HOLD;
	}
	pthread_cond_broadcast(&h->cv);
	pthread_mutex_unlock(&h->mu);
	return v;
}

static struct holder *holder_claim(const char *pipeline)
{
	struct holder *h = calloc(1, sizeof(*h));
	struct ezp_filter_holder fh = {.struct_size = sizeof(fh),
				       .name = "test_tcp",
				       .userdata = h,
				       .on_packet = holder_on_packet};
	struct ezp_claim *cl = NULL;
	struct ezp_error err = {0};
	int rc;

	assert_non_null(h);
	sync_init(&h->mu, &h->cv);
	T->holders[T->n_holders++] = h;
	rc = ezp_filter_claim(T->d, pipeline, "callback:f", &fh, &cl, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_filter_claim: %s: %s", ezp_status_str(rc), err.message);
	T->claims[T->n_claims++] = cl;
	return h;
}

/* ---- setup and teardown ------------------------------------------------------------ */

static void on_alarm(int sig)
{
	char msg[160];
	int n = snprintf(msg, sizeof(msg), "test_tcp: %s hung for 100 s (x slow); aborting\n",
			 current_test);

	(void)sig;
	if (write(2, msg, (size_t)n) < 0)
		_exit(98);
	abort();
}

static int setup(void **state)
{
	signal(SIGALRM, on_alarm);
	signal(SIGPIPE, SIG_IGN);
	alarm(100 * (unsigned)slow);
	faults_off();
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
	faults_off();
	for (int i = 0; i < c->n_taps; i++)
		ezp_tap_unsubscribe(c->taps[i]);
	for (int i = 0; i < c->n_claims; i++)
		ezp_claim_release(c->claims[i]);
	ezp_daemon_free(c->d);
	for (int i = 0; i < c->n_fds; i++)
		close(c->fds[i]);
	for (int i = 0; i < c->n_holders; i++) {
		sync_fini(&c->holders[i]->mu, &c->holders[i]->cv);
		free(c->holders[i]);
	}
	for (int i = 0; i < c->n_tapcs; i++)
		tapc_free(c->tapcs[i]);
	free(c);
	T = NULL;
	alarm(0);
	return 0;
}

#define PIPELINE(name, extra)                                                                      \
	"  - Name: " name "\n"                                                                     \
	"    From: {tcp: {Listen: 127.0.0.1:0}}\n"                                                 \
	"    To: {tcp: {Connect: 127.0.0.1:%u" extra "}}\n"

/* ---- 1. listening: IPv4 errors, IPv6, options ------------------------------------------ */

static void test_listen_errors(void **state)
{
	struct sockaddr_storage ss;
	struct ezp_daemon *d = NULL;
	struct ezp_error err = {0};
	char yaml[512];
	uint16_t port;
	int fd, rc;

	(void)state;
	current_test = __func__;
	/* a plain socket (no SO_REUSEPORT) holds the port */
	fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	assert_int_equal(bind(fd, (struct sockaddr *)&ss, loopback(AF_INET, NULL, 0, &ss)), 0);
	assert_int_equal(listen(fd, 1), 0);
	port = sock_port(fd);
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: busy\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u, Backlog: 8, NoDelay: false}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
		 port);
	rc = daemon_try(2, yaml, &d, &err);
	ezp_daemon_free(d);
	if (rc != EZP_ERR_IO)
		fail_msg("listening on a port in use returned %s (%d): %s", ezp_status_str(rc), rc,
			 err.message);
	char want[160];
	snprintf(want, sizeof(want),
		 "cannot listen on 127.0.0.1:%u: Address already in use; something else uses "
		 "it: pick another port in From.Listen",
		 port);
	if (!strstr(err.message, want))
		fail_msg("port in use: message '%s' lacks '%s'", err.message, want);
	if (err.line != 3)
		fail_msg("port in use: error at line %d, expected the From line 3", err.line);

	/* the second worker's socket cannot be watched: everything opened is closed again */
	memset(&err, 0, sizeof(err));
	atomic_store(&fault_watch_add, 1);
	snprintf(yaml, sizeof(yaml), "Pipelines:\n" PIPELINE("w", ""), port);
	rc = daemon_try(2, yaml, &d, &err);
	faults_off();
	ezp_daemon_free(d);
	if (rc != EZP_ERR_IO || !strstr(err.message, "cannot listen on 127.0.0.1:") ||
	    !strstr(err.message, ": Cannot allocate memory"))
		fail_msg("a listener whose watch failed: %s (%d) '%s'", ezp_status_str(rc), rc,
			 err.message);
}

static void test_ipv6(void **state)
{
	uint16_t sport;
	struct ezp_addr a;
	struct pair pr;
	int lfd;

	(void)state;
	current_test = __func__;
	if (!have_ipv6()) {
		skip();
		return;
	}
	lfd = srv_listen(AF_INET6, 16, &sport);
	daemon_up(2,
		  "Pipelines:\n"
		  "  - Name: six\n"
		  "    From: {tcp: {Listen: \"[::1]:0\", Backlog: 4}}\n"
		  "    To: {tcp: {Connect: \"[::1]:%u\", NoDelay: false}}\n",
		  sport);
	assert_int_equal(ezp_pipeline_bound(T->d, "six", &a), EZP_OK);
	assert_int_equal(a.ss.ss_family, AF_INET6);
	pr = pair_open_fam(AF_INET6, "six", lfd);
	wait_session("six", pr.ss.id, 1, "an IPv6 session without filters");
	roundtrip(pr.c, pr.s, "IPv6, bridged");
	assert_int_equal(pr.ss.server.ss.ss_family, AF_INET6);
	assert_int_equal(ss_port(&pr.ss.server.ss), sport);
	shutdown(pr.c, SHUT_WR);
	expect_eof(pr.s, 0, "IPv6: the client's half-close");
	shutdown(pr.s, SHUT_WR);
	expect_eof(pr.c, 0, "IPv6: the server's half-close");
	wait_session("six", pr.ss.id, -1, "IPv6 session after both half-closes");
}

/* ---- 2. connecting: refused, timed out, late ------------------------------------------- */

static void test_connect_refused(void **state)
{
	struct sockaddr_storage ss;
	struct tapc *tc;
	char text[128];
	uint16_t dead;
	int fd, c, lfd;
	uint16_t sport;

	(void)state;
	current_test = __func__;
	/* bound but not listening: a connect there is refused */
	fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	assert_int_equal(bind(fd, (struct sockaddr *)&ss, loopback(AF_INET, NULL, 0, &ss)), 0);
	dead = sock_port(fd);
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", "") PIPELINE("ok", ""), dead, sport);
	tc = tapc_new();
	assert_non_null(tap_on(T->d, tc, "p"));

	c = client(bound_port("p"));
	expect_eof(c, 1, "a client whose server refuses");
	snprintf(text, sizeof(text), "connect to 127.0.0.1:%u: Connection refused", dead);
	expect_closed(tc, 0, EZP_CLOSE_CONNECT_FAILED, text, "refused connect");
	/* the listener keeps serving */
	close_fd(c);
	c = client(bound_port("p"));
	expect_eof(c, 1, "a second client whose server refuses");
	struct pair pr = pair_open("ok", lfd);
	roundtrip(pr.c, pr.s, "another pipeline of the daemon");
}

/*
 * A listening socket with backlog 0 whose queue is full: SYNs to it are
 * dropped, so connects there hang. @fillers gets the connects that fill it
 * (the last one is the stuck one), @n their count.
 */
static int stuck_server(uint16_t *port, int *fillers, int *n)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int lfd = srv_listen(AF_INET, 0, port), stuck = 0;

	len = loopback(AF_INET, NULL, *port, &ss);
	for (*n = 0; *n < 8 && !stuck;) {
		int f = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
		struct pollfd p = {f, POLLOUT, 0};
		fillers[(*n)++] = f;
		if (connect(f, (struct sockaddr *)&ss, len) == 0)
			continue;
		assert_int_equal(errno, EINPROGRESS);
		stuck = poll(&p, 1, 150) == 0;
	}
	if (!stuck)
		fail_msg("could not fill the accept queue of a backlog-0 listener");
	return lfd;
}

static void test_connect_timeout(void **state)
{
	struct ezp_error err = {0};
	struct tapc *tc;
	char text[128], addr[64];
	uint16_t sport, okport;
	uint64_t t0, took;
	int c, rc, lfd, fillers[8], nf;

	(void)state;
	current_test = __func__;
	stuck_server(&sport, fillers, &nf);
	lfd = srv_listen(AF_INET, 16, &okport);
	daemon_up(2,
		  "Pipelines:\n" PIPELINE("p", ", ConnectTimeoutMs: 300")
		      PIPELINE("ok", ", ConnectTimeoutMs: 300"),
		  sport, okport);
	tc = tapc_new();
	assert_non_null(tap_on(T->d, tc, "p"));

	t0 = mono_ms();
	c = client(bound_port("p"));
	expect_eof(c, 1, "a client whose server never answers");
	took = mono_ms() - t0;
	snprintf(text, sizeof(text), "connect to 127.0.0.1:%u: Connection timed out", sport);
	expect_closed(tc, 0, EZP_CLOSE_CONNECT_FAILED, text, "connect timeout");
	if (took < 250)
		fail_msg("the connect gave up after %llu ms, before ConnectTimeoutMs 300",
			 (unsigned long long)took);

	/* a server swap that times out leaves the session where it was */
	struct pair pr = pair_open("ok", lfd);
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", sport);
	rc = ezp_session_swap_server(T->d, pr.ss.id, addr, &err);
	if (rc != EZP_ERR_TIMEOUT || !strstr(err.message, "Connection timed out"))
		fail_msg("a swap to a server that never answers: %s (%d) '%s'", ezp_status_str(rc),
			 rc, err.message);
	roundtrip(pr.c, pr.s, "the session after the failed swap");
}

/* Bytes for the server while its connect is still going on wait and lead the stream. */
static void test_send_while_connecting(void **state)
{
	struct ezp_error err = {0};
	struct ezp_session_summary ss;
	uint16_t sport;
	int fillers[8], nf, lfd, c, s, f;

	(void)state;
	current_test = __func__;
	lfd = stuck_server(&sport, fillers, &nf);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ", ConnectTimeoutMs: 60000"), sport);
	c = client(bound_port("p"));
	ss = session_of(c, "p");
	assert_int_equal(send_all(c, "from the client", 15), 0);
	assert_int_equal(ezp_session_inject(T->d, ss.id, EZP_DIR_TO_SERVER, "early;", 6, &err),
			 EZP_OK);
	/* make room: the proxy's next SYN (its retransmission) gets in */
	for (int i = nf - 1; i >= 0; i--)
		close_fd(fillers[i]);
	f = srv_accept(lfd, "the filler already queued");
	close_fd(f);
	s = srv_accept(lfd, "the proxy, once the queue had room");
	expect_text(s, "early;from the client", "bytes sent while connecting, then the client's");
	roundtrip(c, s, "after the late connect");
}

/* Rebinding a fixed port while the old sockets still listen; sessions go on. */
static void test_restart_same_port(void **state)
{
	struct sockaddr_storage ss;
	struct ezp_error err = {0};
	struct pair pr, pr2;
	uint16_t sport, port;
	int lfd, tmp, rc;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	tmp = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(tmp >= 0);
	assert_int_equal(bind(tmp, (struct sockaddr *)&ss, loopback(AF_INET, NULL, 0, &ss)), 0);
	port = sock_port(tmp);
	close(tmp);
	daemon_up(2,
		  "Pipelines:\n"
		  "  - Name: p\n"
		  "    From: {tcp: {Listen: 127.0.0.1:%u, NoDelay: false}}\n"
		  "    To: {tcp: {Connect: 127.0.0.1:%u}}\n",
		  port, sport);
	pr = pair_open("p", lfd);
	wait_session("p", pr.ss.id, 1, "before the restart");
	rc = ezp_pipeline_restart(T->d, "p", 0, &err);
	if (rc != EZP_OK)
		fail_msg("restart on the same port: %s: %s", ezp_status_str(rc), err.message);
	assert_int_equal(bound_port("p"), port);
	roundtrip(pr.c, pr.s, "a session across the restart");
	pr2 = pair_open("p", lfd);
	roundtrip(pr2.c, pr2.s, "a session after the restart");
	rc = ezp_pipeline_restart(T->d, "p", 1, &err);
	if (rc != EZP_OK)
		fail_msg("restart closing sessions: %s: %s", ezp_status_str(rc), err.message);
	expect_eof(pr.c, 1, "a session closed by the restart");
	expect_eof(pr2.c, 1, "another session closed by the restart");
	pr = pair_open("p", lfd);
	roundtrip(pr.c, pr.s, "a session after the second restart");
}

/* ---- 2b. the core's services fail under the plugin ------------------------------------ */

static void test_service_failures(void **state)
{
	struct tapc *tc, *tq;
	struct flow f = {.seed = 8, .name = "client->server"};
	struct pair pr;
	char text[128];
	uint16_t sport, dport;
	int lfd, c;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	srv_listen(AF_INET, 16, &dport); /* connects that fail half-way end here, never accepted */
	daemon_up(2, "Pipelines:\n" PIPELINE("p", "") PIPELINE("f", "") PIPELINE("q", ""), sport,
		  dport, sport);
	tc = tapc_new();
	assert_non_null(tap_on(T->d, tc, "p"));
	assert_non_null(tap_on(T->d, tc, "f"));

	/* an accepted socket cannot be watched: that client is closed, the next one served */
	atomic_store(&fault_watch_add, 0);
	c = client(bound_port("p"));
	expect_eof(c, 1, "a client whose socket could not be watched");
	assert_int_equal(atomic_load(&fault_watch_add), -1);
	pr = pair_open("p", lfd);
	roundtrip(pr.c, pr.s, "the next client");

	/* the server socket cannot be watched, or its connect timer made */
	snprintf(text, sizeof(text), "connect to 127.0.0.1:%u: Cannot allocate memory", dport);
	atomic_store(&fault_watch_add, 1); /* the client's watch passes, the server's fails */
	c = client(bound_port("f"));
	expect_eof(c, 1, "a client whose server socket could not be watched");
	expect_closed(tc, 0, EZP_CLOSE_CONNECT_FAILED, text, "server watch failed");
	pthread_mutex_lock(&tc->mu);
	tc->n = 0;
	pthread_mutex_unlock(&tc->mu);
	atomic_store(&fault_timer_new, 0);
	c = client(bound_port("f"));
	expect_eof(c, 1, "a client whose connect timer could not be made");
	expect_closed(tc, 0, EZP_CLOSE_CONNECT_FAILED, text, "connect timer failed");

	/* no packet for a read: the session ends with the reason, the server sees the end */
	atomic_store(&fault_packet_new, 0);
	assert_int_equal(send_all(pr.c, "x", 1), 0);
	expect_eof(pr.s, 1, "the server after a failed read");
	expect_closed(tc, pr.ss.id, EZP_CLOSE_ERROR, "client: read: Cannot allocate memory",
		      "no packet for a read");

	/* no packet for the bytes in a pipe at unbridge: the leg fails, nothing is lost silently */
	pr = pair_open("q", lfd);
	wait_session("q", pr.ss.id, 1, "before the stall");
	f.wfd = pr.c;
	f.rfd = pr.s;
	if (!flows_stall(&f, 1))
		fail_msg("the proxy took %zu bytes nobody read", f.sent);
	tq = tapc_new();
	atomic_store(&fault_packet_new, 0);
	assert_non_null(tap_on(T->d, tq, "q"));
	expect_closed(tq, pr.ss.id, EZP_CLOSE_ERROR, "server: write: Cannot allocate memory",
		      "no packet for the pipe's bytes at unbridge");
}

/* ---- 2c. a client the core refuses ------------------------------------------------------ */

static void test_refused_by_core(void **state)
{
	struct pair pr;
	uint16_t sport;
	int lfd, c;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Limits: {MaxSessions: 1}\nPipelines:\n" PIPELINE("p", ""), sport);
	pr = pair_open("p", lfd);
	c = client(bound_port("p"));
	expect_eof(c, 1, "a client over MaxSessions");
	roundtrip(pr.c, pr.s, "the session under the limit");
}

/* ---- 3. half-close both ways, on the full path and bridged -------------------------- */

/* Each side half-closes in turn; bytes after the other side's FIN still arrive. */
static void half_close_both_ways(const char *pipeline, int lfd, int bridged, struct tapc *tc)
{
	struct pair pr;

	/* the server finishes first; the client goes on sending */
	pr = pair_open(pipeline, lfd);
	wait_session(pipeline, pr.ss.id, bridged, "before the half-close");
	assert_int_equal(send_all(pr.s, "last words", 10), 0);
	assert_int_equal(shutdown(pr.s, SHUT_WR), 0);
	expect_text(pr.c, "last words", "the server's bytes before its FIN");
	expect_eof(pr.c, 0, "the server's half-close reaches the client");
	assert_int_equal(send_all(pr.c, "still here", 10), 0);
	expect_text(pr.s, "still here", "the client writes after the server's FIN");
	assert_int_equal(send_all(pr.c, "and here", 8), 0);
	expect_text(pr.s, "and here", "the client writes more after the server's FIN");
	assert_int_equal(shutdown(pr.c, SHUT_WR), 0);
	expect_eof(pr.s, 0, "the client's half-close reaches the server");
	wait_session(pipeline, pr.ss.id, -1, "after both half-closes");
	if (tc)
		expect_closed(tc, pr.ss.id, EZP_CLOSE_SERVER, "", "the server closed first");

	/* the client finishes first; the server goes on answering */
	pr = pair_open(pipeline, lfd);
	wait_session(pipeline, pr.ss.id, bridged, "before the half-close");
	assert_int_equal(send_all(pr.c, "request", 7), 0);
	assert_int_equal(shutdown(pr.c, SHUT_WR), 0);
	expect_text(pr.s, "request", "the client's bytes before its FIN");
	expect_eof(pr.s, 0, "the client's half-close reaches the server");
	assert_int_equal(send_all(pr.s, "answer", 6), 0);
	expect_text(pr.c, "answer", "the server answers after the client's FIN");
	assert_int_equal(shutdown(pr.s, SHUT_WR), 0);
	expect_eof(pr.c, 0, "the server's half-close reaches the client");
	wait_session(pipeline, pr.ss.id, -1, "after both half-closes");
	if (tc)
		expect_closed(tc, pr.ss.id, EZP_CLOSE_CLIENT, "", "the client closed first");
}

static void test_half_close_full_path(void **state)
{
	struct tapc *tc;
	uint16_t sport;
	int lfd;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);
	tc = tapc_new(); /* a tap keeps the sessions on the full path */
	assert_non_null(tap_on(T->d, tc, "p"));
	half_close_both_ways("p", lfd, 0, tc);
}

static void test_half_close_bridged(void **state)
{
	uint16_t sport;
	int lfd;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);
	half_close_both_ways("p", lfd, 1, NULL);
}

/* ---- 4. backpressure and partial writes ------------------------------------------------ */

/*
 * The server does not read: the client's bytes fill the proxy until it
 * stops reading from the client (bounded), then the server reads and every
 * byte arrives in order. The same the other way round at the same time.
 */
static void backpressure(const char *pipeline, int lfd, int bridged)
{
	struct pair pr = pair_open(pipeline, lfd);
	struct flow f[2] = {{.wfd = pr.c, .rfd = pr.s, .seed = 1, .name = "client->server"},
			    {.wfd = pr.s, .rfd = pr.c, .seed = 2, .name = "server->client"}};
	int small = 32 * 1024;

	setsockopt(pr.c, SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
	setsockopt(pr.s, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	wait_session(pipeline, pr.ss.id, bridged, "before the stream");
	if (!flows_stall(f, 2))
		fail_msg("the proxy took %zu + %zu bytes nobody read: no backpressure", f[0].sent,
			 f[1].sent);
	wait_session(pipeline, pr.ss.id, bridged, "while stalled");
	f[0].total = f[0].sent + (1u << 20);
	f[1].total = f[1].sent + (1u << 20);
	flows_finish(f, 2, 0, 6 * WAIT_MS);
	roundtrip(pr.c, pr.s, "after the streams");
}

static void test_backpressure_full_path(void **state)
{
	uint16_t sport;
	int lfd;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	/* small reads: hundreds of packets queue up, many iovecs per write */
	daemon_up(2,
		  "Limits: {MaxPacket: 512}\n"
		  "Pipelines:\n" PIPELINE("p", "") "    Through: [{callback: {Name: f}}]\n",
		  sport);
	holder_claim("p"); /* an unclaimed slot would keep the fast path */
	backpressure("p", lfd, 0);
}

static void test_backpressure_bridged(void **state)
{
	uint16_t sport;
	int lfd;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);
	backpressure("p", lfd, 1);
}

/* ---- 5. the fast path: end of stream and unbridging with bytes in the pipes --------- */

/*
 * Bridged, the server not reading: the client's bytes fill the pipe and its
 * FIN waits behind them. The server then reads every byte and the end of
 * stream. With @unbridge a tap first takes the session off the fast path:
 * the pipe's bytes lead the server's queue and the FIN is found again.
 */
static void eof_behind_pipe(int unbridge)
{
	uint16_t sport;
	struct pair pr;
	struct flow f = {.seed = 3, .name = "client->server, then FIN"};
	struct tapc *tc;
	int lfd;

	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);
	pr = pair_open("p", lfd);
	wait_session("p", pr.ss.id, 1, "before the stream");
	f.wfd = pr.c;
	f.rfd = pr.s;
	if (!flows_stall(&f, 1))
		fail_msg("the proxy took %zu bytes nobody read", f.sent);
	f.total = f.sent;
	assert_int_equal(shutdown(pr.c, SHUT_WR), 0); /* the FIN waits behind the pipe */
	if (unbridge) {
		tc = tapc_new();
		assert_non_null(tap_on(T->d, tc, "p"));
		wait_session("p", pr.ss.id, 0, "a tap takes the session off the fast path");
	} else {
		wait_session("p", pr.ss.id, 1, "the client's FIN behind a full pipe");
	}
	flows_finish(&f, 1, 1, 6 * WAIT_MS);
	assert_int_equal(send_all(pr.s, "bye", 3), 0);
	expect_text(pr.c, "bye", "the server answers after the client's FIN");
	close_fd(pr.s);
	expect_eof(pr.c, 0, "the server's close");
	wait_session("p", pr.ss.id, -1, "after both ends");
}

static void test_eof_behind_pipe(void **state)
{
	(void)state;
	current_test = __func__;
	eof_behind_pipe(0);
}

static void test_eof_behind_pipe_unbridged(void **state)
{
	(void)state;
	current_test = __func__;
	eof_behind_pipe(1);
}

/* Both directions stalled on the fast path, then a tap takes the session off it. */
static void test_unbridge_with_pipes_full(void **state)
{
	uint16_t sport;
	struct pair pr;
	struct flow f[2];
	struct tapc *tc;
	struct ezp_tap *tap;
	uint64_t seen;
	int lfd;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);
	pr = pair_open("p", lfd);
	wait_session("p", pr.ss.id, 1, "before the streams");
	f[0] = (struct flow){.wfd = pr.c, .rfd = pr.s, .seed = 4, .name = "client->server"};
	f[1] = (struct flow){.wfd = pr.s, .rfd = pr.c, .seed = 5, .name = "server->client"};
	if (!flows_stall(f, 2))
		fail_msg("the proxy took %zu + %zu bytes nobody read", f[0].sent, f[1].sent);

	tc = tapc_new();
	tap = tap_on(T->d, tc, "p");
	assert_non_null(tap);
	wait_session("p", pr.ss.id, 0, "a tap takes the session off the fast path");
	f[0].total = f[0].sent + (512u << 10);
	f[1].total = f[1].sent + (512u << 10);
	flows_finish(f, 2, 0, 6 * WAIT_MS);
	pthread_mutex_lock(&tc->mu);
	seen = tc->packet_bytes;
	pthread_mutex_unlock(&tc->mu);
	if (seen < (1u << 20)) /* the bytes read after the unbridge pass the tap */
		fail_msg("the tap saw only %llu bytes after the unbridge",
			 (unsigned long long)seen);

	/* without the tap the session goes back to the fast path */
	tap_off(tap);
	roundtrip(pr.c, pr.s, "after the tap left");
	wait_session("p", pr.ss.id, 1, "the tap left");
	roundtrip(pr.c, pr.s, "bridged again");
}

/* ---- 6. resets ---------------------------------------------------------------------------- */

/* The client stops reading; the server fills the proxy until its leg is paused. */
static void stall_server_side(struct pair *pr, unsigned seed)
{
	struct flow f = {.wfd = pr->s, .rfd = pr->c, .seed = seed, .name = "server->client"};
	int small = 32 * 1024;

	setsockopt(pr->c, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	if (!flows_stall(&f, 1))
		fail_msg("the proxy took %zu bytes the client never read", f.sent);
}

static void test_resets_full_path(void **state)
{
	struct tapc *tc;
	struct pair pr;
	uint16_t sport;
	int lfd;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);
	tc = tapc_new();
	assert_non_null(tap_on(T->d, tc, "p"));

	/* the client resets: the read fails */
	pr = pair_open("p", lfd);
	rst_close(pr.c);
	expect_eof(pr.s, 1, "the server after the client's reset");
	expect_closed(tc, pr.ss.id, EZP_CLOSE_ERROR, "client: read: Connection reset by peer",
		      "client reset");

	/* the server resets: the read fails */
	pr = pair_open("p", lfd);
	rst_close(pr.s);
	expect_eof(pr.c, 1, "the client after the server's reset");
	expect_closed(tc, pr.ss.id, EZP_CLOSE_ERROR, "server: read: Connection reset by peer",
		      "server reset");

	/* the server resets while its leg is paused: the next write fails */
	pr = pair_open("p", lfd);
	stall_server_side(&pr, 6);
	rst_close(pr.s);
	poll_pause();
	assert_int_equal(send_all(pr.c, "after the reset", 15), 0);
	struct tev e;
	if (!tap_closed(tc, pr.ss.id, &e, WAIT_MS))
		fail_msg("a write to a reset server did not end the session");
	if (e.close_reason != EZP_CLOSE_ERROR || strncmp(e.close_text, "server: write: ", 15))
		fail_msg("write to a reset server: reason %d '%s', expected an error 'server: "
			 "write: ...'",
			 e.close_reason, e.close_text);
}

static void test_resets_bridged(void **state)
{
	struct pair pr;
	uint16_t sport;
	int lfd;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);

	pr = pair_open("p", lfd);
	wait_session("p", pr.ss.id, 1, "before the client's reset");
	rst_close(pr.c);
	expect_eof(pr.s, 1, "bridged: the server after the client's reset");
	wait_session("p", pr.ss.id, -1, "bridged: after the client's reset");

	pr = pair_open("p", lfd);
	wait_session("p", pr.ss.id, 1, "before the server's reset");
	rst_close(pr.s);
	expect_eof(pr.c, 1, "bridged: the client after the server's reset");
	wait_session("p", pr.ss.id, -1, "bridged: after the server's reset");

	/* the server's pipe is full so its leg is not read; it resets; the client writes */
	pr = pair_open("p", lfd);
	wait_session("p", pr.ss.id, 1, "before the stall");
	stall_server_side(&pr, 7);
	rst_close(pr.s);
	poll_pause();
	assert_int_equal(send_all(pr.c, "after the reset", 15), 0);
	wait_session("p", pr.ss.id, -1, "bridged: a write to a reset server");
}

/* ---- 7. pause and resume through a hold window ----------------------------------------- */

static void test_hold_window_pauses(void **state)
{
	struct holder *h;
	struct pair pr;
	uint16_t sport;
	int lfd, seen;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 16, &sport);
	daemon_up(2,
		  "Pipelines:\n" PIPELINE("p", "") "    Through: [{callback: {Name: f, "
						   "HoldWindow: 2, HoldTimeoutMs: 60000}}]\n",
		  sport);
	h = holder_claim("p");
	pr = pair_open("p", lfd);

	assert_int_equal(send_all(pr.c, "hold-1", 6), 0);
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 1, WAIT_MS))
		fail_msg("the filter never held the first packet");
	assert_int_equal(send_all(pr.c, "hold-2", 6), 0);
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 2, WAIT_MS))
		fail_msg("the filter never held the second packet");
	/* the window is full: the client leg is paused and nothing more is read */
	pthread_mutex_lock(&h->mu);
	seen = h->seen;
	pthread_mutex_unlock(&h->mu);
	assert_int_equal(send_all(pr.c, "pass-3", 6), 0);
	expect_quiet(pr.s, QUIET_MS, "bytes behind a full hold window");
	pthread_mutex_lock(&h->mu);
	if (h->seen != seen) {
		pthread_mutex_unlock(&h->mu);
		fail_msg("the client leg was read while the hold window was full");
	}
	pthread_mutex_unlock(&h->mu);

	assert_int_equal(ezp_filter_answer(T->d, h->holds[0], EZP_VERDICT_PASS, NULL, 0), EZP_OK);
	if (!wait_at_least(&h->mu, &h->cv, &h->seen, seen + 1, WAIT_MS))
		fail_msg("the client leg was not resumed when the window opened");
	assert_int_equal(ezp_filter_answer(T->d, h->holds[1], EZP_VERDICT_PASS, NULL, 0), EZP_OK);
	expect_text(pr.s, "hold-1hold-2pass-3", "held packets and the one behind them, in order");
	roundtrip(pr.c, pr.s, "after the window drained");
}

/* ---- 8. an accepted client handed to the worker of its session ---------------------- */

struct swap_call {
	struct ezp_daemon *d;
	uint64_t id;
	unsigned timeout_ms;
	int rc;
	struct ezp_error err;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int done;
};

static void *swap_accept_main(void *arg)
{
	struct swap_call *sc = arg;
	int rc =
	    ezp_session_swap_client(sc->d, sc->id, "127.0.0.2:0", 0, 1, sc->timeout_ms, &sc->err);

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

/*
 * The kernel spreads connections over the workers' SO_REUSEPORT sockets by
 * a hash of the addresses, so a client from a given source port always
 * reaches the same worker. A probe connection from 127.0.0.2:PORT shows
 * which worker that is (its session is made there); once a port leads to
 * the other worker, a client from that port is accepted there and handed
 * over to the worker that owns the session it joins.
 */
static void test_accept_handoff(void **state)
{
	struct ezp_core_ctx *ctx;
	struct ezp_worker *home, *w;
	struct swap_call sc = {0};
	struct pair pr;
	pthread_t th;
	uint16_t sport, pport = 0, port;
	uint64_t end;
	int lfd, c2 = -1, ok;

	(void)state;
	current_test = __func__;
	lfd = srv_listen(AF_INET, 64, &sport);
	daemon_up(2, "Pipelines:\n" PIPELINE("p", ""), sport);
	ctx = (struct ezp_core_ctx *)T->d;
	port = bound_port("p");
	pr = pair_open("p", lfd);
	home = ezp__session_worker(ctx, pr.ss.id);
	assert_non_null(home);

	for (int i = 0; i < 40 && !pport; i++) {
		int probe = client_from(AF_INET, "127.0.0.2", 0, port);
		struct ezp_session_summary ps = session_of(probe, "p");
		int ps_fd = srv_accept(lfd, "probe");
		w = ezp__session_worker(ctx, ps.id);
		if (w && w != home)
			pport = sock_port(probe);
		rst_close(probe); /* no TIME_WAIT: the same port can connect again */
		close_fd(ps_fd);
		wait_session("p", ps.id, -1, "a probe session after its reset");
	}
	if (!pport)
		fail_msg("40 source ports all reached the session's own worker");

	/* the hand-off cannot be posted: that client is closed, the session stays as it was */
	sync_init(&sc.mu, &sc.cv);
	sc.d = T->d;
	sc.id = pr.ss.id;
	sc.rc = -999;
	sc.timeout_ms = 1000u * (unsigned)slow;
	atomic_store(&fault_defer, 0);
	assert_int_equal(pthread_create(&th, NULL, swap_accept_main, &sc), 0);
	end = mono_ms() + (uint64_t)WAIT_MS;
	while (!routes_pending(T->d, "p") && !sc.done && mono_ms() < end)
		poll_pause();
	ok = routes_pending(T->d, "p");
	if (ok) {
		c2 = client_from(AF_INET, "127.0.0.2", pport, port);
		expect_eof(c2, 1, "a client whose hand-off failed");
		rst_close(c2);
	}
	ok = ok && wait_at_least(&sc.mu, &sc.cv, &sc.done, 1, 2 * WAIT_MS);
	pthread_join(th, NULL);
	sync_fini(&sc.mu, &sc.cv);
	if (!ok || sc.rc != EZP_ERR_TIMEOUT)
		fail_msg("accept-mode add whose hand-off failed: rc %d: %s", sc.rc, sc.err.message);
	assert_int_equal(atomic_load(&fault_defer), -1);
	roundtrip(pr.c, pr.s, "the session after the failed hand-off");

	memset(&sc, 0, sizeof(sc));
	sync_init(&sc.mu, &sc.cv);
	sc.d = T->d;
	sc.id = pr.ss.id;
	sc.rc = -999;
	sc.timeout_ms = (unsigned)WAIT_MS;
	assert_int_equal(pthread_create(&th, NULL, swap_accept_main, &sc), 0);
	end = mono_ms() + (uint64_t)WAIT_MS;
	while (!routes_pending(T->d, "p") && !sc.done && mono_ms() < end)
		poll_pause();
	ok = routes_pending(T->d, "p");
	if (ok)
		c2 = client_from(AF_INET, "127.0.0.2", pport, port);
	ok = ok && wait_at_least(&sc.mu, &sc.cv, &sc.done, 1, 2 * WAIT_MS);
	pthread_join(th, NULL);
	sync_fini(&sc.mu, &sc.cv);
	if (!ok || sc.rc != EZP_OK)
		fail_msg("accept-mode add from another worker: rc %d: %s", sc.rc, sc.err.message);
	assert_int_equal(send_all(pr.s, "to both", 7), 0);
	expect_text(pr.c, "to both", "the first client");
	expect_text(c2, "to both", "the client handed over from the other worker");
	assert_int_equal(send_all(c2, "from two", 8), 0);
	expect_text(pr.s, "from two", "the handed-over client's bytes reach the server");
}

/* ---- 9. out of file descriptors (in a forked child) ------------------------------------ */

/*
 * The child cannot use cmocka's asserts (a failure would jump back into the
 * runner inside the child): CK records the first failure and goes to the
 * cleanup, which frees everything whatever happened.
 */
#define CK(cond, ...)                                                                              \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "test_emfile (child), line %d: ", __LINE__);               \
			fprintf(stderr, __VA_ARGS__);                                              \
			fputc('\n', stderr);                                                       \
			rc = 1;                                                                    \
			goto out;                                                                  \
		}                                                                                  \
	} while (0)

/* The lowest descriptor number with @k free numbers below it: the limit that leaves @k. */
static rlim_t limit_leaving(int k)
{
	int fd, free_seen = 0;

	for (fd = 0; fd < 65536; fd++) {
		if (fcntl(fd, F_GETFD) >= 0)
			continue;
		if (free_seen == k)
			break;
		free_seen++;
	}
	return (rlim_t)fd;
}

/* Open descriptors below 4096 (no directory listing: that needs a descriptor itself). */
static int fd_count(void)
{
	int n = 0;

	for (int fd = 0; fd < 4096; fd++)
		n += fcntl(fd, F_GETFD) >= 0;
	return n;
}

/*
 * Wait until the proxy is done with descriptors: a refused client sees its
 * end of stream just before the listener reopens its spare descriptor.
 */
static int fd_settle(int want)
{
	uint64_t end = mono_ms() + (uint64_t)WAIT_MS;

	while (fd_count() != want && mono_ms() < end)
		poll_pause();
	return fd_count() == want;
}

static int set_nofile(rlim_t cur, const struct rlimit *orig)
{
	struct rlimit r = {cur, orig->rlim_max};

	return setrlimit(RLIMIT_NOFILE, &r);
}

static int child_connect(int fd, uint16_t port)
{
	struct sockaddr_storage ss;
	socklen_t len = loopback(AF_INET, NULL, port, &ss);

	return connect(fd, (struct sockaddr *)&ss, len);
}

/* Returns 0 when @fd gets the end of stream (or a reset) within WAIT_MS. */
static int child_eof(int fd)
{
	char buf[64];
	ssize_t r = recv_wait(fd, buf, sizeof(buf), WAIT_MS);

	return r == 0 || (r == -1 && errno == ECONNRESET) ? 0 : -1;
}

static int srv_accept_child(int lfd)
{
	struct pollfd p = {lfd, POLLIN, 0};

	if (poll(&p, 1, WAIT_MS) != 1)
		return -1;
	return accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
}

/* Wait until @pipeline lists no session: their legs, and descriptors, are closed then. */
static int child_sessions_gone(struct ezp_daemon *d, const char *pipeline)
{
	uint64_t end = mono_ms() + (uint64_t)WAIT_MS;

	for (;;) {
		struct ezp_session_summary *v = NULL;
		size_t n = 1;
		if (ezp_daemon_sessions(d, pipeline, &v, &n) != EZP_OK)
			n = 1;
		free(v);
		if (!n)
			return 1;
		if (mono_ms() > end)
			return 0;
		poll_pause();
	}
}

static int child_bridged(struct ezp_daemon *d, const char *pipeline, uint64_t id)
{
	struct ezp_session_summary *v = NULL;
	size_t n = 0;
	int b = -1;

	if (ezp_daemon_sessions(d, pipeline, &v, &n) == EZP_OK)
		for (size_t i = 0; i < n; i++)
			if (v[i].id == id)
				b = v[i].bridged;
	free(v);
	return b;
}

static int emfile_child(void)
{
	struct ezp_daemon *d = NULL;
	struct ezp_error err = {0};
	struct ezp_tap *tap = NULL;
	struct tapc tc;
	struct rlimit orig;
	struct tev e;
	char yaml[1024], text[160], buf[16];
	int rc = 0, limited = 0, lfd = -1, cs[7] = {-1, -1, -1, -1, -1, -1, -1}, reserve = -1,
	    sfd = -1;
	int sfd5 = -1;
	int base;
	uint16_t sport = 0, pp, qp;
	uint64_t qid = 0;

	memset(&tc, 0, sizeof(tc));
	sync_init(&tc.mu, &tc.cv);
	alarm(100 * (unsigned)slow);
	CK(getrlimit(RLIMIT_NOFILE, &orig) == 0, "getrlimit: %s", strerror(errno));
	{
		struct sockaddr_storage ss;
		socklen_t len = loopback(AF_INET, NULL, 0, &ss);
		lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		CK(lfd >= 0 && bind(lfd, (struct sockaddr *)&ss, len) == 0 && listen(lfd, 16) == 0,
		   "server socket: %s", strerror(errno));
		sport = sock_port(lfd);
	}
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n" PIPELINE("p", "") PIPELINE("q", "") PIPELINE("r", ""), sport, sport,
		 sport);
	rc = daemon_try(1, yaml, &d, &err);
	CK(rc == EZP_OK, "daemon: %s: %s", ezp_status_str(rc), err.message);
	CK(ezp_pipeline_bound(d, "p", &(struct ezp_addr){0}) == EZP_OK, "no pipeline p");
	{
		struct ezp_addr a;
		ezp_pipeline_bound(d, "p", &a);
		pp = ss_port(&a.ss);
		ezp_pipeline_bound(d, "q", &a);
		qp = ss_port(&a.ss);
	}
	tap = tap_on(d, &tc, "p"); /* only p: q's sessions may take the fast path */
	CK(tap, "tap_subscribe failed");
	for (int i = 0; i < 7; i++)
		CK((cs[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) >= 0, "socket: %s",
		   strerror(errno));
	base = fd_count();

	/* no descriptor left: waiting clients are accepted with the spare and closed */
	limited = 1;
	CK(set_nofile(limit_leaving(0), &orig) == 0, "setrlimit: %s", strerror(errno));
	CK(child_connect(cs[0], pp) == 0, "connect: %s", strerror(errno));
	CK(child_eof(cs[0]) == 0, "a client while out of descriptors was not refused");
	CK(child_connect(cs[1], pp) == 0, "connect: %s", strerror(errno));
	CK(child_eof(cs[1]) == 0, "a second client while out of descriptors was not refused");

	/* one left: the client is accepted, the server socket cannot be made */
	CK(fd_settle(base), "descriptors: %d open, expected %d", fd_count(), base);
	CK(set_nofile(limit_leaving(1), &orig) == 0, "setrlimit: %s", strerror(errno));
	CK(child_connect(cs[2], pp) == 0, "connect: %s", strerror(errno));
	CK(child_eof(cs[2]) == 0, "a client whose server socket failed was not closed");
	CK(tap_closed(&tc, 0, &e, WAIT_MS), "no session_closed for the failed connect");
	snprintf(text, sizeof(text), "connect to 127.0.0.1:%u: Too many open files", sport);
	CK(e.close_reason == EZP_CLOSE_CONNECT_FAILED && !strcmp(e.close_text, text),
	   "failed connect: reason %d '%s', expected %d '%s'", e.close_reason, e.close_text,
	   EZP_CLOSE_CONNECT_FAILED, text);

	/* a new listener cannot be made either; the old one stays */
	CK(fd_settle(base), "descriptors: %d open, expected %d", fd_count(), base);
	CK(set_nofile(limit_leaving(0), &orig) == 0, "setrlimit: %s", strerror(errno));
	memset(&err, 0, sizeof(err));
	rc = ezp_pipeline_restart(d, "q", 0, &err);
	CK(rc == EZP_ERR_IO &&
	       strstr(err.message, "cannot listen on 127.0.0.1:0: Too many open files"),
	   "restart while out of descriptors: %s (%d) '%s'", ezp_status_str(rc), rc, err.message);
	rc = 0;

	/*
	 * A listener without a spare (one descriptor left when it was made) and
	 * none left now: the waiting client cannot be refused. The worker must not
	 * spin on the level-triggered watch meanwhile, and must accept the client
	 * once descriptors are free again.
	 */
	CK(fd_settle(base), "descriptors: %d open, expected %d", fd_count(), base);
	CK(set_nofile(limit_leaving(1), &orig) == 0, "setrlimit: %s", strerror(errno));
	rc = ezp_pipeline_restart(d, "r", 0, &err);
	CK(rc == EZP_OK, "restart r with one descriptor left: %s: %s", ezp_status_str(rc),
	   err.message);
	base = fd_count(); /* the old socket and its spare are closed, one new socket is open */
	{
		struct ezp_addr a;
		struct rusage r0, r1;
		long cpu_ms;
		struct timespec half = {0, 500 * 1000000L};
		ezp_pipeline_bound(d, "r", &a);
		CK(set_nofile(limit_leaving(0), &orig) == 0, "setrlimit: %s", strerror(errno));
		CK(child_connect(cs[5], ss_port(&a.ss)) == 0, "connect: %s", strerror(errno));
		getrusage(RUSAGE_SELF, &r0);
		nanosleep(&half, NULL);
		getrusage(RUSAGE_SELF, &r1);
		cpu_ms = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec + r1.ru_stime.tv_sec -
			  r0.ru_stime.tv_sec) *
			     1000L +
			 (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec + r1.ru_stime.tv_usec -
			  r0.ru_stime.tv_usec) /
			     1000L;
		CK(cpu_ms < 150L * slow,
		   "out of descriptors without a spare the daemon used %ld ms of CPU in 500 ms",
		   cpu_ms);
		CK(set_nofile(orig.rlim_cur, &orig) == 0, "setrlimit: %s", strerror(errno));
		/*
		 * Valgrind enforces a lowered limit after the syscall: it closes the
		 * descriptor accept4 returned and says EMFILE, so the waiting client
		 * is gone there. Natively it waited and is served now.
		 */
		for (int i = slow == 1 ? 5 : 6; i <= 6; i++) {
			if (i == 6)
				CK(child_connect(cs[6], ss_port(&a.ss)) == 0, "connect: %s",
				   strerror(errno));
			CK((sfd5 = srv_accept_child(lfd)) >= 0, "%s was never served",
			   i == 5 ? "the waiting client" : "a client after the pause");
			CK(send_all(cs[i], "ping", 4) == 0, "send: %s", strerror(errno));
			CK(recv_wait(sfd5, buf, 4, WAIT_MS) == 4 && !memcmp(buf, "ping", 4),
			   "ping lost");
			close(sfd5);
			sfd5 = -1;
		}
		for (int i = 5; i <= 6; i++) {
			close(cs[i]);
			cs[i] = -1;
		}
		/* the listener has its spare again; a new baseline once r's sessions are gone */
		CK(child_sessions_gone(d, "r"), "r's sessions did not end");
		base = fd_count();
	}

	/* two left: client and server sockets, but no pipes: the session stays on the full path */
	CK(fd_settle(base), "descriptors: %d open, expected %d", fd_count(), base);
	/* the lowest free slot, below the limit: the test gives it up to accept */
	CK((reserve = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0, "open: %s", strerror(errno));
	CK(set_nofile(limit_leaving(2), &orig) == 0, "setrlimit: %s", strerror(errno));
	CK(child_connect(cs[3], qp) == 0, "connect: %s", strerror(errno));
	{
		struct pollfd p = {lfd, POLLIN, 0};
		CK(poll(&p, 1, WAIT_MS) == 1, "the proxy never connected to the server");
	}
	close(reserve); /* the one descriptor the test needs to accept */
	reserve = -1;
	/* the proxy's bridge attempt when its connect completes may hold the slot for a moment */
	for (int i = 0;
	     i < 500 && (sfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC)) < 0 && errno == EMFILE; i++)
		poll_pause();
	CK(sfd >= 0, "accept: %s", strerror(errno));
	CK(send_all(cs[3], "ping", 4) == 0, "send: %s", strerror(errno));
	CK(recv_wait(sfd, buf, 4, WAIT_MS) == 4 && !memcmp(buf, "ping", 4), "ping lost");
	CK(send_all(sfd, "pong", 4) == 0, "send: %s", strerror(errno));
	CK(recv_wait(cs[3], buf, 4, WAIT_MS) == 4 && !memcmp(buf, "pong", 4), "pong lost");
	{
		struct ezp_session_summary *v = NULL;
		size_t n = 0;
		ezp_daemon_sessions(d, "q", &v, &n);
		qid = n == 1 ? v[0].id : 0;
		free(v);
	}
	CK(qid && child_bridged(d, "q", qid) == 0,
	   "without descriptors for pipes the session must stay on the full path");

	/* descriptors again: the next read takes the fast path, the listeners serve */
	limited = 0;
	CK(set_nofile(orig.rlim_cur, &orig) == 0, "setrlimit: %s", strerror(errno));
	CK(send_all(cs[3], "ping", 4) == 0, "send: %s", strerror(errno));
	CK(recv_wait(sfd, buf, 4, WAIT_MS) == 4 && !memcmp(buf, "ping", 4), "ping lost");
	{
		uint64_t end = mono_ms() + (uint64_t)WAIT_MS;
		while (child_bridged(d, "q", qid) != 1 && mono_ms() < end)
			poll_pause();
	}
	CK(child_bridged(d, "q", qid) == 1, "with descriptors back the session is not bridged");
	CK(child_connect(cs[4], qp) == 0, "q after its failed restart: %s", strerror(errno));
	{
		struct pollfd p = {lfd, POLLIN, 0};
		CK(poll(&p, 1, WAIT_MS) == 1, "q does not serve after the failed restart");
	}
out:
	if (limited)
		(void)set_nofile(orig.rlim_cur, &orig);
	if (tap)
		ezp_tap_unsubscribe(tap);
	ezp_daemon_free(d);
	for (int i = 0; i < 7; i++)
		if (cs[i] >= 0)
			close(cs[i]);
	if (sfd5 >= 0)
		close(sfd5);
	if (reserve >= 0)
		close(reserve);
	if (sfd >= 0)
		close(sfd);
	if (lfd >= 0)
		close(lfd);
	sync_fini(&tc.mu, &tc.cv);
	alarm(0);
	return rc;
}

static void test_emfile(void **state)
{
	uint64_t end = mono_ms() + 60000u * (unsigned)slow;
	int status = 0;
	pid_t pid, r;

	(void)state;
	current_test = __func__;
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int rc = emfile_child();
		free(T);
		exit(rc); /* exit, not _exit: coverage data is written at exit */
	}
	while ((r = waitpid(pid, &status, WNOHANG)) == 0 && mono_ms() < end)
		poll_pause();
	if (r == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
		fail_msg("the child running out of descriptors hung");
	}
	assert_int_equal(r, pid);
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		fail_msg("the child running out of descriptors failed (status %#x; see its "
			 "message above)",
			 status);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_listen_errors, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_ipv6, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_connect_refused, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_connect_timeout, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_send_while_connecting, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_restart_same_port, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_service_failures, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_refused_by_core, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_half_close_full_path, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_half_close_bridged, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_backpressure_full_path, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_backpressure_bridged, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_eof_behind_pipe, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_eof_behind_pipe_unbridged, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_unbridge_with_pipes_full, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_resets_full_path, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_resets_bridged, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_hold_window_pauses, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_accept_handoff, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_emfile, setup, teardown),
	};
	const char *preload = getenv("LD_PRELOAD");

	if (preload && strstr(preload, "vgpreload")) /* valgrind: everything is slower */
		slow = 10;
	if (getenv("EZP_TEST_FILTER"))
		cmocka_set_test_filter(getenv("EZP_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
