/*
 * test_udp.c - the udp transport plugin (plugins/udp) on live traffic: a
 * daemon per test with two workers, real sockets on 127.0.0.1 (and ::1 when
 * the host has it), echo servers in pthreads. Many clients spread over the
 * workers by SO_REUSEPORT, hand-offs between workers, Shared sessions, idle
 * timeouts, re-pointing both legs, ICMP errors, send queues and
 * backpressure, datagram sizes, listen errors, rebinding with live sessions,
 * pausing through a holding filter, IPv6 and running out of descriptors.
 *
 * Threads: the test's own (control); filter and tap callbacks run on the
 * daemon's workers and touch only state guarded by a mutex; servers and
 * senders run in their own pthreads. Every wait has a deadline; the only
 * sleeps are where the passing of time is what is tested (idle timeouts).
 *
 * The kernel never says EAGAIN to a UDP sender on loopback (the datagram is
 * handed to the receiver at once, or dropped there), so the send-queue tests
 * make sendmmsg answer EAGAIN for one destination port (sendmmsg below,
 * which the plugin's calls resolve to), as a full NIC queue would.
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
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "wait.h"

static int slow = 1;	      /* 10 under valgrind */
#define WAIT_MS (5000 * slow) /* the deadline of every ordinary wait */
#define QUIET_MS (300 * slow) /* how long "nothing arrives" is watched */

#include "net.h" /* after WAIT_MS: its expect_* helpers wait that long */

/* ---- sendmmsg that can say EAGAIN ------------------------------------------------- */

static atomic_int fault_port; /* network order; datagrams to it get EAGAIN; 0: none */
static atomic_long fault_hits;

typedef int (*sendmmsg_fn)(int, struct mmsghdr *, unsigned, int);

static uint16_t sa_port(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET)
		return ((const struct sockaddr_in *)ss)->sin_port;
	if (ss->ss_family == AF_INET6)
		return ((const struct sockaddr_in6 *)ss)->sin6_port;
	return 0;
}

/* Exported so the plugin's sendmmsg resolves here; the rest goes to libc's. */
__attribute__((visibility("default"))) int sendmmsg(int fd, struct mmsghdr *v, unsigned n,
						    int flags)
{
	static sendmmsg_fn real;
	sendmmsg_fn fn = __atomic_load_n(&real, __ATOMIC_ACQUIRE);
	int port = atomic_load(&fault_port);

	if (!fn) {
		fn = (sendmmsg_fn)dlsym(RTLD_NEXT, "sendmmsg");
		__atomic_store_n(&real, fn, __ATOMIC_RELEASE);
	}
	if (port && n) {
		struct sockaddr_storage ss;
		socklen_t len = sizeof(ss);

		memset(&ss, 0, sizeof(ss));
		if (v[0].msg_hdr.msg_name)
			memcpy(&ss, v[0].msg_hdr.msg_name,
			       v[0].msg_hdr.msg_namelen < sizeof(ss) ? v[0].msg_hdr.msg_namelen
								     : sizeof(ss));
		else if (getpeername(fd, (struct sockaddr *)&ss, &len))
			memset(&ss, 0, sizeof(ss));
		if (sa_port(&ss) == port) {
			atomic_fetch_add(&fault_hits, 1);
			errno = EAGAIN;
			return -1;
		}
	}
	return fn(fd, v, n, flags);
}

/* ---- time and waiting ----------------------------------------------------------- */

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* ---- per-test context: everything a test made, freed even when it fails ------------ */

struct srv;
struct holder;
struct tapc;
struct sender;

struct ctx {
	struct ezp_daemon *d;
	struct srv *srvs[8];
	int n_srvs;
	int fds[160];
	int n_fds;
	struct ezp_claim *claims[4];
	int n_claims;
	struct ezp_tap *taps[4];
	int n_taps;
	struct holder *holders[4];
	int n_holds;
	struct tapc *tapcs[4];
	int n_tapcs;
	struct sender *senders[4];
	int n_senders;
	int *fill; /* descriptors that use up RLIMIT_NOFILE */
	int n_fill;
	struct rlimit nofile;
	int nofile_set;
	int log_fd, saved_stderr; /* captured log, the real stderr */
	int passed;
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

/* ---- the log: captured from stderr, to check what was counted --------------------- */

static void log_capture(void)
{
	char path[] = "/tmp/test_udp_log_XXXXXX";
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	unlink(path);
	fflush(stderr);
	T->saved_stderr = dup(2);
	assert_true(T->saved_stderr >= 0);
	assert_true(dup2(fd, 2) == 2);
	T->log_fd = fd;
}

/* The log so far (malloc'd, NUL-terminated). */
static char *log_text(void)
{
	off_t n = lseek(T->log_fd, 0, SEEK_END);
	char *buf = malloc((size_t)n + 1);
	ssize_t got;

	assert_non_null(buf);
	got = pread(T->log_fd, buf, (size_t)n, 0);
	buf[got > 0 ? got : 0] = 0;
	return buf;
}

/* Wait until the log has a line containing @needle. */
static int log_wait(const char *needle)
{
	uint64_t end = mono_ms() + WAIT_MS;

	do {
		char *t = log_text();
		int found = strstr(t, needle) != NULL;

		free(t);
		if (found)
			return 1;
		poll_pause();
	} while (mono_ms() < end);
	return 0;
}

static void expect_log(const char *needle, const char *what)
{
	if (!log_wait(needle))
		fail_msg("%s: the log has no line with '%s'", what, needle);
}

static void log_release(void)
{
	char *t;

	if (T->saved_stderr < 0)
		return;
	fflush(stderr);
	t = log_text();
	dup2(T->saved_stderr, 2);
	close(T->saved_stderr);
	close(T->log_fd);
	T->saved_stderr = T->log_fd = -1;
	if (!T->passed || getenv("EZP_TEST_VERBOSE")) /* a passed test keeps quiet */
		fprintf(stderr, "---- log of %s ----\n%s---- end of log ----\n", current_test, t);
	free(t);
}

/* ---- servers ---------------------------------------------------------------------- */

struct srv {
	int fd;
	int stop[2];
	int family;
	uint16_t port;
	char tag[8]; /* prefix of every reply */
	atomic_int got;
	pthread_t th;
};

static void *echo_main(void *arg)
{
	struct srv *s = arg;
	size_t tl = strlen(s->tag);
	char *buf = malloc(65536 + 8);

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
		memcpy(buf, s->tag, tl);
		n = recvfrom(s->fd, buf + tl, 65536, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
		if (n < 0)
			continue;
		atomic_fetch_add(&s->got, 1);
		(void)sendto(s->fd, buf, (size_t)n + tl, 0, (struct sockaddr *)&from, fl);
	}
	free(buf);
	return NULL;
}

static void set_bufs(int fd, int size)
{
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
	(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
}

static socklen_t loop_addr(int family, uint16_t port, struct sockaddr_storage *ss)
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
	a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sizeof(*a);
}

static uint16_t sock_port(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
		return 0;
	return ntohs(sa_port(&ss));
}

/* A UDP echo server on 127.0.0.1 / ::1, @port (0: any); replies "@tag" + datagram. */
static struct srv *srv_start_at(int family, uint16_t port, const char *tag)
{
	struct srv *s = calloc(1, sizeof(*s));
	struct sockaddr_storage ss;
	socklen_t len = loop_addr(family, port, &ss);
	int one = 1;

	assert_non_null(s);
	assert_true(T->n_srvs < (int)EZP_ARRAY_LEN(T->srvs));
	s->family = family;
	snprintf(s->tag, sizeof(s->tag), "%s", tag ? tag : "");
	assert_int_equal(pipe2(s->stop, O_CLOEXEC), 0);
	s->fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	assert_true(s->fd >= 0);
	setsockopt(s->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	set_bufs(s->fd, 4 << 20);
	if (bind(s->fd, (struct sockaddr *)&ss, len))
		fail_msg("echo server: bind port %u: %s", port, strerror(errno));
	s->port = sock_port(s->fd);
	assert_int_equal(pthread_create(&s->th, NULL, echo_main, s), 0);
	T->srvs[T->n_srvs++] = s;
	return s;
}

static struct srv *srv_start(const char *tag)
{
	return srv_start_at(AF_INET, 0, tag);
}

static void srv_free(struct srv *s)
{
	char c = 1;

	if (write(s->stop[1], &c, 1) != 1)
		fprintf(stderr, "test_udp: cannot stop a server\n");
	pthread_join(s->th, NULL);
	close(s->fd);
	close(s->stop[0]);
	close(s->stop[1]);
	free(s);
}

/* Stop @s now (its port is free again). */
static void srv_stop(struct srv *s)
{
	for (int i = 0; i < T->n_srvs; i++)
		if (T->srvs[i] == s) {
			T->srvs[i] = T->srvs[--T->n_srvs];
			break;
		}
	srv_free(s);
}

/* ---- client sockets ----------------------------------------------------------------- */

/* A UDP socket on the loopback of @family, connected to @port unless it is 0. */
static int udp_client_fam(int family, uint16_t port)
{
	int fd = track_fd(socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	struct sockaddr_storage me, to;
	socklen_t len = loop_addr(family, 0, &me);

	set_bufs(fd, 4 << 20);
	assert_int_equal(bind(fd, (struct sockaddr *)&me, len), 0);
	if (port) {
		len = loop_addr(family, port, &to);
		assert_int_equal(connect(fd, (struct sockaddr *)&to, len), 0);
	}
	return fd;
}

static int udp_client(uint16_t port)
{
	return udp_client_fam(AF_INET, port);
}

static void udp_connect_to(int fd, uint16_t port)
{
	struct sockaddr_storage to;
	struct sockaddr_in me;
	socklen_t len = sizeof(me);

	assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &len), 0);
	len = loop_addr(me.sin_family, port, &to);
	assert_int_equal(connect(fd, (struct sockaddr *)&to, len), 0);
}

static void expect_quiet(int fd, int ms, const char *what)
{
	char buf[2048];
	ssize_t n = recv_wait(fd, buf, sizeof(buf) - 1, ms);

	if (n == -2)
		return;
	if (n >= 0) {
		buf[n] = 0;
		fail_msg("%s: expected nothing, got '%s' (%zd bytes)", what, buf, n);
	}
	fail_msg("%s: expected nothing, got %s", what, strerror(errno));
}

/* Nothing comes back, or the kernel says nobody listens there (ICMP port unreachable). */
static void expect_no_reply(int fd, int ms, const char *what)
{
	char buf[2048];
	ssize_t n = recv_wait(fd, buf, sizeof(buf) - 1, ms);

	if (n == -2 || (n == -1 && errno == ECONNREFUSED))
		return;
	if (n >= 0) {
		buf[n] = 0;
		fail_msg("%s: expected nothing, got '%s' (%zd bytes)", what, buf, n);
	}
	fail_msg("%s: expected nothing, got %s", what, strerror(errno));
}

/* Read and forget what is there until @ms pass with nothing. Returns the count. */
static int drain(int fd, int ms)
{
	char buf[2048];
	int n = 0;

	while (recv_wait(fd, buf, sizeof(buf), ms) >= 0 && n < 100000)
		n++;
	return n;
}

static void roundtrip(int fd, const char *text, const char *want, const char *what)
{
	send_dgram(fd, text);
	expect_dgram(fd, want, what);
}

/* A round trip a client retries, as UDP clients do (up to 10 times). */
static void roundtrip_retry(int fd, const char *text, const char *want, const char *what)
{
	char buf[256];

	for (int i = 0; i < 10; i++) {
		ssize_t n;

		send_dgram(fd, text);
		n = recv_wait(fd, buf, sizeof(buf) - 1, QUIET_MS);
		if (n == -2)
			continue;
		if (n < 0)
			fail_msg("%s: %s", what, strerror(errno));
		buf[n] = 0;
		if (strcmp(buf, want))
			fail_msg("%s: expected '%s', got '%s'", what, want, buf);
		drain(fd, QUIET_MS); /* the answers to earlier tries */
		return;
	}
	fail_msg("%s: no answer to 10 tries", what);
}

/* A thread sending @text from @fd every 20 ms until stopped (at most 20 s). */
struct sender {
	int fd;
	char text[32];
	atomic_int stop;
	pthread_t th;
};

static void *sender_main(void *arg)
{
	struct sender *s = arg;

	for (int i = 0; i < 1000 && !atomic_load(&s->stop); i++) {
		(void)send(s->fd, s->text, strlen(s->text), 0);
		sleep_ms(20);
	}
	return NULL;
}

static struct sender *sender_start(int fd, const char *text)
{
	struct sender *s = calloc(1, sizeof(*s));

	assert_non_null(s);
	s->fd = fd;
	snprintf(s->text, sizeof(s->text), "%s", text);
	assert_int_equal(pthread_create(&s->th, NULL, sender_main, s), 0);
	T->senders[T->n_senders++] = s;
	return s;
}

static void sender_free(struct sender *s)
{
	atomic_store(&s->stop, 1);
	pthread_join(s->th, NULL);
	free(s);
}

static void sender_stop(struct sender *s)
{
	for (int i = 0; i < T->n_senders; i++)
		if (T->senders[i] == s) {
			T->senders[i] = T->senders[--T->n_senders];
			break;
		}
	sender_free(s);
}

/* ---- the daemon --------------------------------------------------------------------- */

static int daemon_new_yaml(const char *yaml, int level, struct ezp_daemon **out,
			   struct ezp_error *err)
{
	const char *plugins = getenv("EZP_TEST_PLUGINS");
	const char *paths[] = {plugins ? plugins : "build/plugins", NULL};
	struct ezp_daemon_opts opts = {.struct_size = sizeof(opts),
				       .workers = 2,
				       .plugin_paths = paths,
				       .no_default_paths = 1,
				       .log_level = level};

	return ezp_daemon_new(yaml, "test_udp", &opts, out, err);
}

/* Start a daemon (two workers) from YAML made with @fmt; @level: its log level. */
__attribute__((format(printf, 2, 3))) static struct ezp_daemon *daemon_up(int level,
									  const char *fmt, ...)
{
	struct ezp_error err = {0};
	char yaml[4096];
	va_list ap;
	int rc;

	va_start(ap, fmt);
	vsnprintf(yaml, sizeof(yaml), fmt, ap);
	va_end(ap);
	rc = daemon_new_yaml(yaml, level, &T->d, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_new: %s (%d) at %d:%d: %s\n%s", ezp_status_str(rc), rc,
			 err.line, err.column, err.message, yaml);
	rc = ezp_daemon_start(T->d, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_start: %s: %s", ezp_status_str(rc), err.message);
	return T->d;
}

__attribute__((format(printf, 1, 2))) static void reload(const char *fmt, ...)
{
	struct ezp_error err = {0};
	char yaml[4096];
	va_list ap;
	int rc;

	va_start(ap, fmt);
	vsnprintf(yaml, sizeof(yaml), fmt, ap);
	va_end(ap);
	rc = ezp_daemon_reload(T->d, yaml, "reload", &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_reload: %s: %s\n%s", ezp_status_str(rc), err.message, yaml);
}

static uint16_t bound_port(const char *pipeline)
{
	struct ezp_addr a;

	assert_int_equal(ezp_pipeline_bound(T->d, pipeline, &a), EZP_OK);
	return ntohs(sa_port(&a.ss));
}

static size_t list_sessions(const char *pipeline, struct ezp_session_summary **v)
{
	size_t n = 0;

	*v = NULL;
	assert_int_equal(ezp_daemon_sessions(T->d, pipeline, v, &n), EZP_OK);
	return n;
}

static size_t count_sessions(const char *pipeline)
{
	struct ezp_session_summary *v;
	size_t n = list_sessions(pipeline, &v);

	free(v);
	return n;
}

/* Wait until @pipeline has @want sessions. */
static int wait_count(const char *pipeline, size_t want)
{
	uint64_t end = mono_ms() + WAIT_MS;

	do {
		if (count_sessions(pipeline) == want)
			return 1;
		poll_pause();
	} while (mono_ms() < end);
	return 0;
}

/* The session @id now (0: gone). */
static int find_session(const char *pipeline, uint64_t id, struct ezp_session_summary *out)
{
	struct ezp_session_summary *v;
	size_t n = list_sessions(pipeline, &v);
	int found = 0;

	for (size_t i = 0; i < n; i++)
		if (v[i].id == id) {
			*out = v[i];
			found = 1;
		}
	free(v);
	return found;
}

static int wait_gone(const char *pipeline, uint64_t id)
{
	uint64_t end = mono_ms() + WAIT_MS;
	struct ezp_session_summary s;

	do {
		if (!find_session(pipeline, id, &s))
			return 1;
		poll_pause();
	} while (mono_ms() < end);
	return 0;
}

static int same_addr(const struct ezp_addr *a, const struct sockaddr_storage *b)
{
	if (a->ss.ss_family != b->ss_family || sa_port(&a->ss) != sa_port(b))
		return 0;
	if (b->ss_family == AF_INET)
		return ((const struct sockaddr_in *)&a->ss)->sin_addr.s_addr ==
		       ((const struct sockaddr_in *)b)->sin_addr.s_addr;
	return !memcmp(&((const struct sockaddr_in6 *)&a->ss)->sin6_addr,
		       &((const struct sockaddr_in6 *)b)->sin6_addr, 16);
}

/* The session whose first client is @fd's local address, within WAIT_MS. */
static struct ezp_session_summary session_of(int fd, const char *pipeline)
{
	struct sockaddr_storage me;
	socklen_t len = sizeof(me);
	uint64_t end = mono_ms() + WAIT_MS;

	assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &len), 0);
	do {
		struct ezp_session_summary *v, found;
		size_t n = list_sessions(pipeline, &v);
		for (size_t i = 0; i < n; i++)
			if (same_addr(&v[i].client, &me)) {
				found = v[i];
				free(v);
				return found;
			}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("no session of pipeline %s has the client on port %u", pipeline,
		 ntohs(sa_port(&me)));
	abort(); /* not reached */
}

static void addr_text(int fd, char *buf, size_t len)
{
	struct sockaddr_storage me;
	socklen_t sl = sizeof(me);

	assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &sl), 0);
	snprintf(buf, len, me.ss_family == AF_INET6 ? "[::1]:%u" : "127.0.0.1:%u",
		 ntohs(sa_port(&me)));
}

static void swap_client(uint64_t sid, int fd, int dial, int add)
{
	struct ezp_error err = {0};
	char addr[64];
	int rc;

	addr_text(fd, addr, sizeof(addr));
	rc = ezp_session_swap_client(T->d, sid, addr, dial, add, (unsigned)WAIT_MS, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_session_swap_client(%s, dial %d, add %d): %s: %s", addr, dial, add,
			 ezp_status_str(rc), err.message);
}

static void swap_server(uint64_t sid, const char *fmt, unsigned port)
{
	struct ezp_error err = {0};
	char addr[64];
	int rc;

	snprintf(addr, sizeof(addr), fmt, port);
	rc = ezp_session_swap_server(T->d, sid, addr, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_session_swap_server(%s): %s: %s", addr, ezp_status_str(rc),
			 err.message);
}

static void inject(uint64_t sid, int dir, const void *data, size_t len)
{
	struct ezp_error err = {0};
	int rc = ezp_session_inject(T->d, sid, dir, data, len, &err);

	if (rc != EZP_OK)
		fail_msg("ezp_session_inject(%zu bytes): %s: %s", len, ezp_status_str(rc),
			 err.message);
}

static void restart(const char *pipeline, int close_sessions)
{
	struct ezp_error err = {0};
	int rc = ezp_pipeline_restart(T->d, pipeline, close_sessions, &err);

	if (rc != EZP_OK)
		fail_msg("ezp_pipeline_restart(%s): %s: %s", pipeline, ezp_status_str(rc),
			 err.message);
}

/* Wait until nothing but connected sockets is left on @port: a stranger is refused. */
static void wait_port_closed(uint16_t port)
{
	int fd = udp_client(port);
	uint64_t end = mono_ms() + WAIT_MS;
	char buf[16];

	do {
		send_dgram(fd, "anyone?");
		if (recv_wait(fd, buf, sizeof(buf), 20) == -1 && errno == ECONNREFUSED) {
			close_fd(fd);
			return;
		}
	} while (mono_ms() < end);
	fail_msg("the old listening socket on port %u did not close", port);
}

/* A port on 127.0.0.1 nobody uses right now. */
static uint16_t free_port(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct sockaddr_storage ss;
	socklen_t len = loop_addr(AF_INET, 0, &ss);
	uint16_t port;

	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&ss, len), 0);
	port = sock_port(fd);
	close(fd);
	return port;
}

/* ---- a holder of the `callback` filter ------------------------------------------------ */

/*
 * Records, for each session, the worker its packets run on. Holds to-server
 * packets starting with "hs" and to-client packets starting with "hc"
 * (their hold ids recorded); everything else passes.
 * Thread: on_packet runs on the session's worker.
 */
struct holder {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	const struct ezp_core *core;
	uint64_t holds[64];
	int n_holds;
	int seen[2];	      /* packets per direction */
	uint64_t last_sid[2]; /* the session of the last packet per direction */
	uint64_t join_sid;    /* the session of the last to-server "join" */
	int on_worker[2];
	struct {
		uint64_t sid;
		int worker;
	} sw[512];
	int n_sw;
};

static int holder_on_packet(void *userdata, struct ezp_filter_call *call)
{
	struct holder *h = userdata;
	const struct ezp_packet *p = call->pkt;
	int w = (int)h->core->worker_index(h->core->worker_current()), v = EZP_VERDICT_PASS, i;
	const char *prefix = p->dir == EZP_DIR_TO_SERVER ? "hs" : "hc";

	pthread_mutex_lock(&h->mu);
	h->seen[p->dir & 1]++;
	h->last_sid[p->dir & 1] = p->session_id;
	if (p->dir == EZP_DIR_TO_SERVER && p->len == 4 && !memcmp(p->data, "join", 4))
		h->join_sid = p->session_id;
	h->on_worker[w & 1]++;
	for (i = 0; i < h->n_sw && h->sw[i].sid != p->session_id; i++)
		;
	if (i == h->n_sw && i < (int)EZP_ARRAY_LEN(h->sw)) {
		h->sw[i].sid = p->session_id;
		h->n_sw++;
	}
	if (i < (int)EZP_ARRAY_LEN(h->sw))
		h->sw[i].worker = w;
	if (p->len >= 2 && !memcmp(p->data, prefix, 2) &&
	    h->n_holds < (int)EZP_ARRAY_LEN(h->holds)) {
		h->holds[h->n_holds++] = call->hold_id;
		v = EZP_VERDICT_HOLD;
	}
	pthread_cond_broadcast(&h->cv);
	pthread_mutex_unlock(&h->mu);
	return v;
}

static struct holder *claim(const char *pipeline)
{
	struct holder *h = calloc(1, sizeof(*h));
	struct ezp_filter_holder fh = {.struct_size = sizeof(fh),
				       .name = "test_udp",
				       .userdata = h,
				       .on_packet = holder_on_packet};
	struct ezp_claim *cl = NULL;
	struct ezp_error err = {0};
	int rc;

	assert_non_null(h);
	sync_init(&h->mu, &h->cv);
	h->core = ezp_daemon_core(T->d);
	T->holders[T->n_holds++] = h;
	rc = ezp_filter_claim(T->d, pipeline, "callback:f", &fh, &cl, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_filter_claim(%s): %s: %s", pipeline, ezp_status_str(rc), err.message);
	T->claims[T->n_claims++] = cl;
	return h;
}

/* The worker session @sid's packets ran on, or -1. */
static int worker_of(struct holder *h, uint64_t sid)
{
	int w = -1;

	pthread_mutex_lock(&h->mu);
	for (int i = 0; i < h->n_sw; i++)
		if (h->sw[i].sid == sid)
			w = h->sw[i].worker;
	pthread_mutex_unlock(&h->mu);
	return w;
}

static int seen(struct holder *h, int dir)
{
	int n;

	pthread_mutex_lock(&h->mu);
	n = h->seen[dir];
	pthread_mutex_unlock(&h->mu);
	return n;
}

static void answer(struct holder *h, int i, int verdict)
{
	uint64_t id;

	pthread_mutex_lock(&h->mu);
	id = h->holds[i];
	pthread_mutex_unlock(&h->mu);
	assert_int_equal(ezp_filter_answer(T->d, id, verdict, NULL, 0), EZP_OK);
}

/* ---- a tap that records session ends -------------------------------------------------- */

struct tapc {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct {
		uint64_t sid;
		int reason;
		char text[96];
	} closed[64];
	int n_closed;
	int opened;
};

static void tapc_on_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct tapc *tc = userdata;

	pthread_mutex_lock(&tc->mu);
	if (ev->type == EZP_TAP_SESSION_OPENED)
		tc->opened++;
	if (ev->type == EZP_TAP_SESSION_CLOSED && ev->info &&
	    tc->n_closed < (int)EZP_ARRAY_LEN(tc->closed)) {
		tc->closed[tc->n_closed].sid = ev->session_id;
		tc->closed[tc->n_closed].reason = ev->info->close_reason;
		snprintf(tc->closed[tc->n_closed].text, sizeof(tc->closed[0].text), "%s",
			 ev->info->close_text ? ev->info->close_text : "");
		tc->n_closed++;
	}
	pthread_cond_broadcast(&tc->cv);
	pthread_mutex_unlock(&tc->mu);
}

static struct tapc *tap_on(const char *pipeline)
{
	struct tapc *tc = calloc(1, sizeof(*tc));
	struct ezp_tap_opts o = {.struct_size = sizeof(o),
				 .pipeline = pipeline,
				 .userdata = tc,
				 .on_event = tapc_on_event};
	struct ezp_tap *tap = NULL;

	assert_non_null(tc);
	sync_init(&tc->mu, &tc->cv);
	T->tapcs[T->n_tapcs++] = tc;
	assert_int_equal(ezp_tap_subscribe(T->d, &o, &tap), EZP_OK);
	T->taps[T->n_taps++] = tap;
	return tc;
}

/* Wait for the close of session @sid (0: any); returns its reason and text. */
static int tap_closed(struct tapc *tc, uint64_t sid, char *text, size_t len)
{
	struct timespec end = deadline(WAIT_MS);
	int reason = -1;

	pthread_mutex_lock(&tc->mu);
	for (;;) {
		for (int i = 0; i < tc->n_closed && reason < 0; i++)
			if (!sid || tc->closed[i].sid == sid) {
				reason = tc->closed[i].reason;
				if (text)
					snprintf(text, len, "%s", tc->closed[i].text);
			}
		if (reason >= 0 || pthread_cond_timedwait(&tc->cv, &tc->mu, &end) == ETIMEDOUT)
			break;
	}
	pthread_mutex_unlock(&tc->mu);
	if (reason < 0)
		fail_msg("no tap event for the close of session %llu", (unsigned long long)sid);
	return reason;
}

/* ---- running out of file descriptors -------------------------------------------------- */

/* Use up every descriptor below a lowered RLIMIT_NOFILE. */
static void fds_exhaust(void)
{
	struct rlimit low;
	int fd = 0;

	assert_int_equal(getrlimit(RLIMIT_NOFILE, &T->nofile), 0);
	T->nofile_set = 1;
	low = T->nofile;
	if (low.rlim_cur > 512)
		low.rlim_cur = 512;
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &low), 0);
	T->fill = calloc(low.rlim_cur, sizeof(int));
	assert_non_null(T->fill);
	while (T->n_fill < (int)low.rlim_cur && (fd = dup(0)) >= 0)
		T->fill[T->n_fill++] = fd;
	assert_true(fd < 0 && (errno == EMFILE || errno == ENFILE));
}

/* Give @n descriptors back (all of them when @n < 0). */
static void fds_release(int n)
{
	while (T->n_fill > 0 && n--)
		close(T->fill[--T->n_fill]);
	if (!T->n_fill && T->nofile_set) {
		setrlimit(RLIMIT_NOFILE, &T->nofile);
		T->nofile_set = 0;
		free(T->fill);
		T->fill = NULL;
	}
}

/* ---- setup and teardown ---------------------------------------------------------------- */

static void on_alarm(int sig)
{
	char msg[160];
	int n = snprintf(msg, sizeof(msg), "test_udp: %s hung for 100 s (x slow); aborting\n",
			 current_test);

	(void)sig;
	if (T && T->saved_stderr >= 0)
		dup2(T->saved_stderr, 2);
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
	T->log_fd = T->saved_stderr = -1;
	atomic_store(&fault_port, 0);
	*state = T;
	log_capture();
	return 0;
}

static int teardown(void **state)
{
	struct ctx *c = *state;

	alarm(100 * (unsigned)slow);
	atomic_store(&fault_port, 0);
	fds_release(-1);
	for (int i = 0; i < c->n_senders; i++)
		sender_free(c->senders[i]);
	for (int i = 0; i < c->n_taps; i++)
		ezp_tap_unsubscribe(c->taps[i]);
	for (int i = 0; i < c->n_claims; i++)
		ezp_claim_release(c->claims[i]);
	ezp_daemon_free(c->d);
	log_release();
	for (int i = 0; i < c->n_fds; i++)
		close(c->fds[i]);
	for (int i = 0; i < c->n_srvs; i++)
		srv_free(c->srvs[i]);
	for (int i = 0; i < c->n_holds; i++) {
		sync_fini(&c->holders[i]->mu, &c->holders[i]->cv);
		free(c->holders[i]);
	}
	for (int i = 0; i < c->n_tapcs; i++) {
		sync_fini(&c->tapcs[i]->mu, &c->tapcs[i]->cv);
		free(c->tapcs[i]);
	}
	free(c);
	T = NULL;
	alarm(0);
	return 0;
}

#define PASSED() (T->passed = 1)

#define UDP_PIPE(name, from_extra, through, to_extra)                                              \
	"  - Name: " name "\n"                                                                     \
	"    From: {udp: {Listen: 127.0.0.1:0" from_extra "}}\n"                                   \
	"    Through: [" through "]\n"                                                             \
	"    To: {udp: {Connect: 127.0.0.1:%u" to_extra "}}\n"

#define CALLBACK "{callback: {Name: f}}"

/* ---- 1. many clients over two workers -------------------------------------------------- */

static void test_many_clients(void **state)
{
	struct srv *echo = srv_start("A:");
	struct holder *h;
	char msg[32], want[40];
	int c[48], on[2];

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", "", CALLBACK, ""), echo->port);
	h = claim("p");
	for (int i = 0; i < 48; i++)
		c[i] = udp_client(bound_port("p"));
	for (int k = 0; k < 3; k++)
		for (int i = 0; i < 48; i++) {
			snprintf(msg, sizeof(msg), "c%02d-%d", i, k);
			send_dgram(c[i], msg);
		}
	for (int i = 0; i < 48; i++)
		for (int k = 0; k < 3; k++) {
			snprintf(msg, sizeof(msg), "c%02d-%d", i, k);
			snprintf(want, sizeof(want), "A:%s", msg);
			expect_dgram(c[i], want, "every client gets its own echoes, in order");
		}
	assert_int_equal(count_sessions("p"), 48);
	pthread_mutex_lock(&h->mu);
	on[0] = h->on_worker[0];
	on[1] = h->on_worker[1];
	pthread_mutex_unlock(&h->mu);
	if (!on[0] || !on[1])
		fail_msg("48 clients all ran on one worker (%d / %d packets)", on[0], on[1]);
	for (int i = 0; i < 48; i++) {
		struct ezp_session_summary s = session_of(c[i], "p");
		assert_int_equal(s.packets[EZP_DIR_TO_SERVER], 3);
		assert_int_equal(s.packets[EZP_DIR_TO_CLIENT], 3);
		assert_int_equal(s.n_clients, 1);
	}
	PASSED();
}

/* ---- 2. Batch 1 and Batch 256 ---------------------------------------------------------- */

static void burst(const char *pipeline, int n, const char *what)
{
	int c = udp_client(bound_port(pipeline));
	char msg[32], buf[64];
	int got = 0;

	for (int i = 0; i < n; i++) {
		snprintf(msg, sizeof(msg), "b%05d", i);
		send_dgram(c, msg);
	}
	for (int i = 0; i < n; i++) {
		ssize_t r = recv_wait(c, buf, sizeof(buf) - 1, WAIT_MS);
		if (r < 0)
			break;
		buf[r] = 0;
		snprintf(msg, sizeof(msg), "b%05d", i);
		if (strcmp(buf, msg))
			fail_msg("%s: datagram #%d is '%s', expected '%s'", what, i, buf, msg);
		got++;
	}
	if (got != n)
		fail_msg("%s: %d of %d datagrams came back", what, got, n);
	close_fd(c);
}

static void test_batch_sizes(void **state)
{
	struct srv *echo = srv_start(NULL);

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN,
		  "Pipelines:\n" UDP_PIPE("one", ", Batch: 1", "", ", Batch: 1")
		      UDP_PIPE("big", ", Batch: 256", "", ", Batch: 256"),
		  echo->port, echo->port);
	burst("one", 200, "Batch 1");
	burst("big", 700, "Batch 256");
	burst("big", 255, "Batch 256, one short of a batch");
	PASSED();
}

/* ---- 3. datagram sizes ------------------------------------------------------------------ */

static void big_roundtrip(int c, size_t len, const char *what)
{
	uint8_t *out = malloc(len), *in = malloc(65536);
	ssize_t n;

	assert_non_null(out);
	assert_non_null(in);
	for (size_t i = 0; i < len; i++)
		out[i] = (uint8_t)(i * 7 + (i >> 8));
	assert_int_equal(send(c, out, len, 0), (ssize_t)len);
	n = recv_wait(c, in, 65536, WAIT_MS);
	if (n != (ssize_t)len || memcmp(in, out, len)) {
		free(out);
		free(in);
		fail_msg("%s: sent %zu bytes, got back %zd", what, len, n);
	}
	free(out);
	free(in);
}

static void test_sizes(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct ezp_session_summary s;
	char buf[16], *huge;
	int c;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_DEBUG, "Pipelines:\n" UDP_PIPE("p", "", "", ""), echo->port);
	c = udp_client(bound_port("p"));
	big_roundtrip(c, 65507, "the largest IPv4 datagram passes whole");
	big_roundtrip(c, 1, "one byte");
	big_roundtrip(c, 40000, "40000 bytes");

	assert_int_equal(send(c, "", 0, 0), 0);
	if (recv_wait(c, buf, sizeof(buf), WAIT_MS) != 0)
		fail_msg("a zero-length datagram did not come back as one");
	s = session_of(c, "p");
	assert_int_equal(s.packets[EZP_DIR_TO_SERVER], 4);
	assert_int_equal(s.bytes[EZP_DIR_TO_SERVER], 65507 + 1 + 40000);

	/* more than UDP can carry: the kernel refuses it; dropped, counted, nothing stuck */
	huge = calloc(1, 70000);
	assert_non_null(huge);
	inject(s.id, EZP_DIR_TO_CLIENT, huge, 70000);
	inject(s.id, EZP_DIR_TO_SERVER, huge, 70000);
	free(huge);
	expect_log("dropped a datagram of 70000 bytes: Message too long (1 dropped)",
		   "an oversized datagram");
	expect_quiet(c, QUIET_MS, "an oversized injected datagram");
	roundtrip(c, "after", "after", "datagrams after an oversized one");
	assert_int_equal(session_of(c, "p").id, s.id);
	PASSED();
}

/* ---- 4. hand-off between workers: re-pointed and added clients ----------------------- */

/* Open a session from a fresh socket; the kernel's SO_REUSEPORT hash picks its worker. */
static void probe_one(struct holder *h, int *fd, int *w, uint64_t *sid)
{
	char msg[32];

	*fd = udp_client(bound_port("p"));
	snprintf(msg, sizeof(msg), "probe-%d", *fd);
	roundtrip(*fd, msg, msg, "a probe");
	*sid = session_of(*fd, "p").id;
	*w = worker_of(h, *sid);
	assert_true(*w == 0 || *w == 1);
}

/*
 * Probe until each worker has @k sessions (at most 32 probes). Returns the
 * count; @x is a probe on worker 0 and @y one on worker 1.
 */
static int probe(struct holder *h, int *fd, int *w, uint64_t *sid, int k, int *x, int *y)
{
	int n = 0, on[2] = {0, 0};

	*x = *y = -1;
	while (n < 32 && (on[0] < k || on[1] < k)) {
		probe_one(h, &fd[n], &w[n], &sid[n]);
		if (w[n] == 0 && *x < 0)
			*x = n;
		if (w[n] == 1 && *y < 0)
			*y = n;
		on[w[n]]++;
		n++;
	}
	if (on[0] < k || on[1] < k)
		fail_msg("%d clients: %d on worker 0, %d on worker 1; SO_REUSEPORT did not spread "
			 "them",
			 n, on[0], on[1]);
	return n;
}

/* The next probe after @from on worker @w, other than @not. */
static int probe_on(const int *ws, int n, int w, int from, int not )
{
	for (int i = from + 1; i < n; i++)
		if (ws[i] == w && i != not )
			return i;
	fail_msg("no other probe on worker %d", w);
	return -1;
}

static void close_session(uint64_t sid)
{
	struct ezp_error err = {0};

	assert_int_equal(ezp_session_close(T->d, sid, &err), EZP_OK);
	if (!wait_gone("p", sid))
		fail_msg("session %llu did not close", (unsigned long long)sid);
}

struct join {
	uint64_t sid;
	unsigned timeout; /* ms; 0: WAIT_MS */
	char addr[64];
	int rc;
	char msg[512];
	atomic_int done;
};

static void *join_main(void *arg)
{
	struct join *j = arg;
	struct ezp_error err = {0};

	j->rc = ezp_session_swap_client(T->d, j->sid, j->addr, 0, 1,
					j->timeout ? j->timeout : (unsigned)WAIT_MS, &err);
	snprintf(j->msg, sizeof(j->msg), "%s", err.message);
	atomic_store(&j->done, 1);
	return NULL;
}

/*
 * Add client @fd to session @sid by accepting it (dial 0, add 1): the call
 * waits for @fd's first datagram, which comes from a sender thread. A
 * datagram that beat the call opened a session of its own: closed, and the
 * sender tries again.
 */
/*
 * Add client @fd to session @sid by accepting it (dial 0, add 1): the call
 * waits for @fd's first datagram, which comes from a sender thread. A
 * "join" that beat the call opened a session of its own (the holder saw
 * it): closed, and the sender goes on. Lists no sessions.
 */
static int join_client_rc(struct holder *h, uint64_t sid, int fd, unsigned timeout, char *msg,
			  size_t len)
{
	struct join j = {.sid = sid, .timeout = timeout};
	struct sender *snd = sender_start(fd, "join");
	pthread_t th;

	addr_text(fd, j.addr, sizeof(j.addr));
	assert_int_equal(pthread_create(&th, NULL, join_main, &j), 0);
	while (!atomic_load(&j.done)) {
		struct ezp_error err = {0};
		uint64_t stray;

		pthread_mutex_lock(&h->mu);
		stray = h->join_sid != sid ? h->join_sid : 0;
		h->join_sid = 0;
		pthread_mutex_unlock(&h->mu);
		if (stray)
			ezp_session_close(T->d, stray, &err);
		poll_pause();
	}
	pthread_join(th, NULL);
	sender_stop(snd);
	snprintf(msg, len, "%s: %s", j.addr, j.msg);
	return j.rc;
}

static void join_client(struct holder *h, uint64_t sid, int fd)
{
	char msg[600];
	int rc = join_client_rc(h, sid, fd, 0, msg, sizeof(msg));

	if (rc != EZP_OK)
		fail_msg("ezp_session_swap_client(accept, add) %s: %s", ezp_status_str(rc), msg);
}

static void test_cross_worker(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	struct holder *h;
	int fd[32], w[32], n, x, y, z, x2, t, rc;
	uint64_t sid[32], last;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", "", CALLBACK, ""), echo->port);
	h = claim("p");
	n = probe(h, fd, w, sid, 3, &x, &y); /* x, x2 on one worker; y, z, t on the other */
	x2 = probe_on(w, n, w[x], x, -1);
	z = probe_on(w, n, w[y], y, -1);
	t = probe_on(w, n, w[y], z, -1);

	/* a client address another session on this worker has: refused */
	{
		char addr[64];
		addr_text(fd[x2], addr, sizeof(addr));
		rc = ezp_session_swap_client(T->d, sid[x], addr, 0, 0, 0, &err);
		assert_int_equal(rc, EZP_ERR_EXISTS);
		if (!strstr(err.message, "another session has that client address"))
			fail_msg("repoint onto a taken address: '%s'", err.message);
	}
	/* an address family the listener cannot reach: refused */
	rc = ezp_session_swap_client(T->d, sid[x], "[::1]:9", 0, 0, 0, &err);
	assert_int_equal(rc, EZP_ERR_INVAL);

	/* Y's datagrams land on the other worker; X's session takes them there */
	close_session(sid[y]);
	swap_client(sid[x], fd[y], 0, 0);
	roundtrip(fd[y], "via-y-1", "via-y-1", "Y reaches X's session on the other worker");
	roundtrip(fd[y], "via-y-2", "via-y-2", "and again, through the remembered hand-off");
	inject(sid[x], EZP_DIR_TO_CLIENT, "to-y", 4);
	expect_dgram(fd[y], "to-y", "X's session sends to Y");
	s = session_of(fd[y], "p");
	assert_int_equal(s.id, sid[x]);
	assert_int_equal(worker_of(h, sid[x]), w[x]);
	assert_int_equal(s.packets[EZP_DIR_TO_SERVER], 3);
	roundtrip(fd[x], "x-again", "x-again", "X itself now has a session of its own");
	assert_true(session_of(fd[x], "p").id != sid[x]);

	/* Z (on the other worker too) joins X's session when it first sends */
	close_session(sid[z]);
	join_client(h, sid[x], fd[z]);
	drain(fd[z], QUIET_MS);
	drain(fd[y], QUIET_MS);
	s = session_of(fd[y], "p");
	assert_int_equal(s.n_clients, 2);
	inject(sid[x], EZP_DIR_TO_CLIENT, "both", 4);
	expect_dgram(fd[y], "both", "the first client of a session with two");
	expect_dgram(fd[z], "both", "the added client on the other worker");
	send_dgram(fd[z], "from-z");
	expect_dgram(fd[y], "from-z", "Z's datagram echoed to Y");
	expect_dgram(fd[z], "from-z", "Z's datagram echoed to Z");

	/* a session on Y's worker takes Y over: the remembered hand-off is forgotten */
	swap_client(sid[t], fd[y], 0, 0);
	roundtrip(fd[y], "now-t", "now-t", "Y after a session on its own worker took it");
	pthread_mutex_lock(&h->mu);
	last = h->last_sid[EZP_DIR_TO_SERVER];
	pthread_mutex_unlock(&h->mu);
	if (last != sid[t])
		fail_msg("Y's datagram went to session %llu, not %llu", (unsigned long long)last,
			 (unsigned long long)sid[t]);
	PASSED();
}

/* ---- 5. hand-offs expire ----------------------------------------------------------------- */

/* Keep X's session (client Y) and O's alive for @ms without a word from Y. */
static void keep_alive(uint64_t sid, int y, int o, int ms)
{
	inject(sid, EZP_DIR_TO_CLIENT, "keep", 4);
	expect_dgram(y, "keep", "a keep-alive");
	roundtrip(o, "o", "o", "another session on Y's worker");
	sleep_ms(ms);
}

static void test_handoff_expiry(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct holder *h;
	struct tapc *tc;
	int fd[32], w[32], n, x, y, o, idle = 800 * slow;
	uint64_t sid[32], t0;
	uint16_t old;
	char text[96];

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", ", IdleTimeoutMs: %d", CALLBACK, ""),
		  idle, echo->port);
	h = claim("p");
	tc = tap_on("p");
	n = probe(h, fd, w, sid, 2, &x, &y);
	o = probe_on(w, n, w[y], -1, y); /* a live session beside y: the sweep passes it by */
	close_session(sid[y]);
	swap_client(sid[x], fd[y], 0, 0);

	/* the hand-off is remembered for one idle timeout; X's session stays alive by injects */
	roundtrip(fd[y], "first", "first", "Y through the hand-off");
	t0 = mono_ms(); /* Y talks: each sweep finds the hand-off in use and keeps it */
	while (mono_ms() - t0 < (uint64_t)(idle < 1000 ? 1300 : idle * 13 / 10)) {
		roundtrip(fd[y], "talk", "talk", "Y through the remembered hand-off");
		roundtrip(fd[o], "o", "o", "another session on Y's worker");
		sleep_ms(idle / 4);
	}
	t0 = mono_ms();
	while (mono_ms() - t0 < (uint64_t)(idle + idle / 8))
		keep_alive(sid[x], fd[y], fd[o], idle / 8);
	roundtrip(fd[y], "stale", "stale", "Y after its hand-off expired");
	t0 = mono_ms();
	while (mono_ms() - t0 < (uint64_t)(3 * idle)) /* the sweep frees it */
		keep_alive(sid[x], fd[y], fd[o], idle / 8);
	roundtrip(fd[y], "swept", "swept", "Y after its hand-off was swept");
	assert_int_equal(session_of(fd[y], "p").id, sid[x]);
	old = bound_port("p");
	restart("p", 0); /* the hand-off is dropped with the old socket; Y moves with X's leg */
	wait_port_closed(old);
	roundtrip(fd[y], "moved", "moved", "Y after the restart");
	assert_int_equal(session_of(fd[y], "p").id, sid[x]);

	/* quiet: X's session ends by its idle timeout */
	assert_int_equal(tap_closed(tc, sid[x], text, sizeof(text)), EZP_CLOSE_IDLE);
	if (!strstr(text, "idle for"))
		fail_msg("idle close text '%s'", text);
	PASSED();
}

/* ---- 6. idle timeout and what refreshes it ---------------------------------------------- */

static void test_idle(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct tapc *tc;
	uint64_t sid, t0;
	int c, idle = 400 * slow;
	char text[96];

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", ", IdleTimeoutMs: %d", "", ""), idle,
		  echo->port);
	tc = tap_on("p");
	c = udp_client(bound_port("p"));
	roundtrip(c, "hello", "hello", "first datagram");
	sid = session_of(c, "p").id;

	t0 = mono_ms(); /* the client keeps talking */
	while (mono_ms() - t0 < (uint64_t)(3 * idle)) {
		send_dgram(c, "tick");
		expect_dgram(c, "tick", "a tick");
		sleep_ms(idle / 5);
	}
	t0 = mono_ms(); /* only the server talks */
	while (mono_ms() - t0 < (uint64_t)(3 * idle)) {
		inject(sid, EZP_DIR_TO_CLIENT, "srv", 3);
		expect_dgram(c, "srv", "a datagram from the server side");
		sleep_ms(idle / 5);
	}
	assert_int_equal(session_of(c, "p").id, sid);

	t0 = mono_ms();
	assert_int_equal(tap_closed(tc, sid, text, sizeof(text)), EZP_CLOSE_IDLE);
	if (mono_ms() - t0 < (uint64_t)idle / 2)
		fail_msg("the session ended %llu ms after the last datagram, IdleTimeoutMs %d",
			 (unsigned long long)(mono_ms() - t0), idle);
	if (!wait_gone("p", sid))
		fail_msg("the idle session is still listed");
	roundtrip(c, "again", "again", "a new session after the idle one");
	assert_true(session_of(c, "p").id != sid);
	PASSED();
}

/* ---- 7. a Shared pipeline --------------------------------------------------------------- */

static void test_shared(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct ezp_session_summary s;
	struct tapc *tc;
	int c[4], idle = 2000 * slow;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN,
		  "Pipelines:\n" UDP_PIPE("p", ", IdleTimeoutMs: %d", "",
					  "") "    Shared: true\n    Limits: {MaxClientLegs: 3}\n",
		  idle, echo->port);
	tc = tap_on("p");
	for (int i = 0; i < 4; i++)
		c[i] = udp_client(bound_port("p"));
	roundtrip(c[0], "one", "one", "the first client");
	s = session_of(c[0], "p");
	send_dgram(c[1], "two");
	expect_dgram(c[0], "two", "the second client's echo reaches the first");
	expect_dgram(c[1], "two", "the second client's echo reaches it");
	send_dgram(c[2], "three");
	for (int i = 0; i < 3; i++)
		expect_dgram(c[i], "three", "the third client's echo reaches all three");
	/* a fourth is over MaxClientLegs: refused, the others go on */
	send_dgram(c[3], "four");
	expect_quiet(c[3], QUIET_MS, "a client over MaxClientLegs");
	send_dgram(c[3], "four-again");
	expect_quiet(c[3], QUIET_MS, "a client over MaxClientLegs, again");
	for (int i = 0; i < 3; i++)
		expect_quiet(c[i], 10, "the refused client's datagram");
	assert_int_equal(count_sessions("p"), 1);
	assert_int_equal(session_of(c[0], "p").n_clients, 3);
	inject(s.id, EZP_DIR_TO_CLIENT, "all", 3);
	for (int i = 0; i < 3; i++)
		expect_dgram(c[i], "all", "an injected datagram reaches every client");

	/* quiet: the legs idle out one by one, then the session */
	assert_int_equal(tap_closed(tc, s.id, NULL, 0), EZP_CLOSE_IDLE);
	assert_int_equal(count_sessions("p"), 0);
	PASSED();
}

/*
 * A reload to Shared: true serves the pipeline from one worker. A client
 * routed to an old session on the other worker cannot be handed there (no
 * socket of the new listener lives on it): dropped and logged, the add times out.
 */
/* (A reload that changes From leaves old sessions pointing at a freed transport name in
 * the core, so this test lists no sessions and has no tap after it.) */
static void test_shared_reload(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct holder *h;
	int fd[32], w[32], x, y, z;
	uint64_t sid[32];

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_DEBUG, "Pipelines:\n" UDP_PIPE("p", "", CALLBACK, ""), echo->port);
	h = claim("p");
	probe(h, fd, w, sid, 1, &x, &y);
	reload("Pipelines:\n" UDP_PIPE("p", "", CALLBACK, "") "    Shared: true\n", echo->port);
	roundtrip(fd[x], "old-x", "old-x", "a session on worker 0 after the reload");
	roundtrip(fd[y], "old-y", "old-y", "a session on worker 1 after the reload");
	/* one of the two is on the worker without a socket now; add a client to each */
	for (int i = 0; i < 2; i++) {
		char msg[600];
		int rc;

		z = udp_client(bound_port("p"));
		rc = join_client_rc(h, i ? sid[y] : sid[x], z, (unsigned)(2 * QUIET_MS), msg,
				    sizeof(msg));
		if (rc == EZP_OK)
			continue;
		if (rc != EZP_ERR_TIMEOUT)
			fail_msg("add a client: %s: %s", ezp_status_str(rc), msg);
		expect_log("its session's worker cannot take it", "a client routed to no socket");
		PASSED();
		return;
	}
	fail_msg("both adds worked: no session was on the worker without a socket");
}

/* ---- 8. re-pointing the server leg ------------------------------------------------------- */

static int have_ipv6(void)
{
	struct sockaddr_storage ss;
	socklen_t len = loop_addr(AF_INET6, 0, &ss);
	int fd = socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0), ok;

	if (fd < 0)
		return 0;
	ok = bind(fd, (struct sockaddr *)&ss, len) == 0;
	close(fd);
	return ok;
}

static void test_swap_server(void **state)
{
	struct srv *a = srv_start("A:"), *b = srv_start("B:"), *c6 = NULL;
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	char to[64];
	int c, c2;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", "", "", ""), a->port);
	c = udp_client(bound_port("p"));
	roundtrip(c, "1", "A:1", "before the swap");
	s = session_of(c, "p");
	swap_server(s.id, "127.0.0.1:%u", b->port);
	roundtrip(c, "2", "B:2", "after the swap the session talks to B");
	assert_int_equal(session_of(c, "p").id, s.id);
	s = session_of(c, "p");
	assert_int_equal(ntohs(sa_port(&s.server.ss)), b->port);
	if (have_ipv6()) {
		c6 = srv_start_at(AF_INET6, 0, "6:");
		swap_server(s.id, "[::1]:%u", c6->port);
		roundtrip(c, "3", "6:3", "an IPv4 client, an IPv6 server");
	}
	swap_server(s.id, "127.0.0.1:%u", a->port);
	roundtrip(c, "4", "A:4", "back to A");

	/* the pipeline's To for new sessions and, with apply_to_existing, the old ones */
	c2 = udp_client(bound_port("p"));
	roundtrip(c2, "5", "A:5", "a second session");
	snprintf(to, sizeof(to), "udp: {Connect: 127.0.0.1:%u}", b->port);
	assert_int_equal(ezp_pipeline_swap_to(T->d, "p", to, 1, &err), EZP_OK);
	roundtrip(c, "6", "B:6", "an existing session after swap_to");
	roundtrip(c2, "7", "B:7", "the other existing session after swap_to");
	PASSED();
}

/* ---- 9. ICMP port unreachable: the server goes away and comes back ----------------------- */

static void test_icmp_unreachable(void **state)
{
	struct srv *echo = srv_start("A:");
	uint16_t port = echo->port;
	uint64_t sid;
	int c;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_DEBUG, "Pipelines:\n" UDP_PIPE("p", "", "", ""), port);
	c = udp_client(bound_port("p"));
	roundtrip(c, "up", "A:up", "before the server goes");
	sid = session_of(c, "p").id;
	srv_stop(echo);
	for (int i = 0; i < 6; i++) {
		send_dgram(c, "lost");
		sleep_ms(20);
	}
	expect_log("Connection refused", "the ICMP error is counted");
	expect_quiet(c, QUIET_MS, "nobody answers");
	assert_int_equal(session_of(c, "p").id, sid);
	echo = srv_start_at(AF_INET, port, "B:");
	roundtrip(c, "back", "B:back", "the server came back on its port");
	assert_int_equal(session_of(c, "p").id, sid);
	PASSED();
}

/* ---- 10. pausing the server leg while a filter holds ------------------------------------ */

static void test_pause_resume(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct holder *h;
	char msg[16];
	int c;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN,
		  "Pipelines:\n" UDP_PIPE(
		      "p", "", "{callback: {Name: f, HoldWindow: 2, HoldTimeoutMs: 60000}}", ""),
		  echo->port);
	h = claim("p");
	c = udp_client(bound_port("p"));

	/* to the client: two held fill the window; the server leg stops reading */
	send_dgram(c, "hc-1");
	send_dgram(c, "hc-2");
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 2, WAIT_MS))
		fail_msg("the filter held %d of 2 datagrams", h->n_holds);
	for (int i = 3; i <= 12; i++) {
		snprintf(msg, sizeof(msg), "m%02d", i);
		send_dgram(c, msg);
	}
	if (!wait_at_least(&h->mu, &h->cv, &h->seen[EZP_DIR_TO_SERVER], 12, WAIT_MS))
		fail_msg("the server was sent %d of 12", seen(h, EZP_DIR_TO_SERVER));
	expect_quiet(c, QUIET_MS, "replies behind two held ones");
	if (seen(h, EZP_DIR_TO_CLIENT) != 2)
		fail_msg("the paused server leg was read: the filter saw %d replies",
			 seen(h, EZP_DIR_TO_CLIENT));
	answer(h, 0, EZP_VERDICT_PASS);
	answer(h, 1, EZP_VERDICT_PASS);
	expect_dgram(c, "hc-1", "held #1");
	expect_dgram(c, "hc-2", "held #2");
	for (int i = 3; i <= 12; i++) {
		snprintf(msg, sizeof(msg), "m%02d", i);
		expect_dgram(c, msg, "the replies read after the resume, in order");
	}

	/* to the server: a client leg cannot stop the kernel; its datagrams queue in order */
	send_dgram(c, "hs-3");
	send_dgram(c, "hs-4");
	if (!wait_at_least(&h->mu, &h->cv, &h->n_holds, 4, WAIT_MS))
		fail_msg("the filter held %d of 4 datagrams", h->n_holds);
	send_dgram(c, "n1");
	send_dgram(c, "n2");
	expect_quiet(c, QUIET_MS, "datagrams behind two held ones");
	answer(h, 2, EZP_VERDICT_PASS);
	answer(h, 3, EZP_VERDICT_DROP);
	expect_dgram(c, "hs-3", "held to-server #1");
	expect_dgram(c, "n1", "behind the held ones #1");
	expect_dgram(c, "n2", "behind the held ones #2");
	PASSED();
}

/* ---- 11. full send queues: EAGAIN, backpressure, drops ----------------------------------- */

static int wait_packets(uint64_t sid, int dir, uint64_t want)
{
	uint64_t end = mono_ms() + WAIT_MS;
	struct ezp_session_summary s;

	do {
		if (find_session("p", sid, &s) && s.packets[dir] >= want)
			return 1;
		poll_pause();
	} while (mono_ms() < end);
	return 0;
}

/* Expect "d0000".. in order, @n of them, then nothing. */
static void expect_seq(int c, int n, const char *what)
{
	char buf[64], want[16];

	for (int i = 0; i < n; i++) {
		ssize_t r = recv_wait(c, buf, sizeof(buf) - 1, WAIT_MS);
		snprintf(want, sizeof(want), "d%04d", i);
		if (r < 0)
			fail_msg("%s: only %d of %d datagrams came", what, i, n);
		buf[r] = 0;
		if (strcmp(buf, want))
			fail_msg("%s: datagram #%d is '%s', expected '%s'", what, i, buf, want);
	}
	expect_quiet(c, QUIET_MS, what);
}

static void send_seq(int c, int n)
{
	char msg[16];

	for (int i = 0; i < n; i++) {
		snprintf(msg, sizeof(msg), "d%04d", i);
		send_dgram(c, msg);
	}
}

static void test_send_queue_full(void **state)
{
	struct srv *echo = srv_start(NULL);
	uint64_t sid, sent;
	uint16_t old;
	int c;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_DEBUG, "Pipelines:\n" UDP_PIPE("p", "", "", ""), echo->port);
	c = udp_client(bound_port("p"));
	roundtrip(c, "warm", "warm", "before");
	sid = session_of(c, "p").id;

	/* the server's socket is full: 1024 wait, the rest are dropped and counted */
	atomic_store(&fault_port, htons(echo->port));
	send_seq(c, 1100);
	if (!wait_packets(sid, EZP_DIR_TO_SERVER, 1101))
		fail_msg("the session did not read 1100 datagrams");
	expect_log("1024 queued (64 dropped)", "datagrams over the server queue");
	assert_int_equal(atomic_load(&echo->got), 1);
	assert_true(atomic_load(&fault_hits) > 0);
	atomic_store(&fault_port, 0);
	expect_seq(c, 1024, "the queued datagrams once the server socket drains");
	roundtrip(c, "after", "after", "the server leg after its queue drained");

	/* the client side: the worker's socket queue fills the same way */
	atomic_store(&fault_port, htons(sock_port(c)));
	send_seq(c, 1100);
	if (!wait_packets(sid, EZP_DIR_TO_CLIENT, 1 + 1024 + 1 + 1100))
		fail_msg("the session did not get 1100 replies");
	expect_log("dropped a datagram of 5 bytes: 1024 queued", "replies over the client queue");
	atomic_store(&fault_port, 0);
	expect_seq(c, 1024, "the queued replies once the worker socket drains");
	roundtrip(c, "after2", "after2", "the client side after its queue drained");

	/* replies queued for a client move with it when the listener is rebound */
	atomic_store(&fault_port, htons(sock_port(c)));
	sent = session_of(c, "p").packets[EZP_DIR_TO_CLIENT];
	send_seq(c, 10);
	if (!wait_packets(sid, EZP_DIR_TO_CLIENT, sent + 10))
		fail_msg("the session did not get 10 replies");
	old = bound_port("p");
	restart("p", 0);
	wait_port_closed(old);
	atomic_store(&fault_port, 0);
	expect_seq(c, 10, "queued replies after their client moved to its own socket");

	/* and are released when the session closes */
	atomic_store(&fault_port, htons(sock_port(c)));
	send_seq(c, 5);
	if (!wait_packets(sid, EZP_DIR_TO_CLIENT, sent + 15))
		fail_msg("the session did not get 5 replies");
	close_session(sid);
	atomic_store(&fault_port, 0);
	expect_quiet(c, QUIET_MS, "replies queued for a closed session");
	PASSED();
}

/* Expect "d<from>".."d<to - 1>" in order on @c. */
static void expect_range(int c, int from, int to, const char *what)
{
	char buf[64], want[16];

	for (int i = from; i < to; i++) {
		ssize_t r = recv_wait(c, buf, sizeof(buf) - 1, WAIT_MS);
		snprintf(want, sizeof(want), "d%04d", i);
		if (r < 0)
			fail_msg("%s: nothing after '%s'", what, i ? "earlier ones" : "the start");
		buf[r] = 0;
		if (strcmp(buf, want))
			fail_msg("%s: datagram is '%s', expected '%s'", what, buf, want);
	}
}

/* A dialled client leg (its own socket) under backpressure pauses the server leg. */
static void test_dialled_client_backpressure(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct sockaddr_storage from;
	socklen_t fl = sizeof(from);
	char buf[64], text[64];
	uint64_t sid;
	ssize_t n;
	int c, d, got;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", "", "", ""), echo->port);
	c = udp_client(bound_port("p"));
	roundtrip(c, "warm", "warm", "before");
	sid = session_of(c, "p").id;
	d = udp_client(0);
	swap_client(sid, d, 1, 1); /* dial d: a second client leg with its own socket */
	assert_int_equal(session_of(c, "p").n_clients, 2);
	inject(sid, EZP_DIR_TO_CLIENT, "both", 4);
	expect_dgram(c, "both", "the first client leg");
	{ /* the dialled leg's own socket sent it: d answers there */
		struct pollfd p = {d, POLLIN, 0};
		assert_int_equal(poll(&p, 1, WAIT_MS), 1);
		n = recvfrom(d, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
		assert_int_equal(n, 4);
		assert_memory_equal(buf, "both", 4);
	}
	assert_int_equal(connect(d, (struct sockaddr *)&from, fl), 0);
	send_dgram(d, "from-d");
	expect_dgram(c, "from-d", "d's datagram went to the server; the reply reaches c");
	expect_dgram(d, "from-d", "and d");

	/* d's socket is full: its queue passes 768, the server leg stops reading */
	atomic_store(&fault_port, htons(sock_port(d)));
	send_seq(c, 1100);
	for (got = 0; got < 1100; got++) {
		n = recv_wait(c, buf, sizeof(buf) - 1, QUIET_MS);
		if (n < 0)
			break;
		buf[n] = 0;
		snprintf(text, sizeof(text), "d%04d", got);
		if (strcmp(buf, text))
			fail_msg("c: reply '%s', expected '%s'", buf, text);
	}
	if (got >= 1100 || got < 768)
		fail_msg("with d's queue full c got %d of 1100 replies (backpressure at 768)", got);
	atomic_store(&fault_port, 0);
	expect_range(c, got, 1100, "c after d's socket drained");
	expect_range(d, 0, 1100, "d: every reply, none dropped");
	roundtrip(c, "after", "after", "after the backpressure");
	expect_dgram(d, "after", "d after the backpressure");
	PASSED();
}

/* A receiver that never reads behind a tiny buffer: the kernel drops; nothing breaks. */
static void test_slow_receiver(void **state)
{
	struct srv *echo = srv_start(NULL);
	char buf[1200];
	int c, tiny = 1, got;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", ", Batch: 256", "", ", Batch: 256"),
		  echo->port);
	c = udp_client(bound_port("p"));
	roundtrip(c, "warm", "warm", "before");
	assert_int_equal(setsockopt(c, SOL_SOCKET, SO_RCVBUF, &tiny, sizeof(tiny)), 0);
	memset(buf, 'x', sizeof(buf));
	for (int i = 0; i < 3000; i++)
		assert_int_equal(send(c, buf, sizeof(buf), 0), (ssize_t)sizeof(buf));
	got = drain(c, QUIET_MS);
	if (got >= 3000)
		fail_msg("a receiver with a tiny buffer got all %d datagrams", got);
	roundtrip(c, "after", "after", "the session after the kernel dropped replies");
	PASSED();
}

/* ---- 12. listen errors --------------------------------------------------------------------- */

static void test_listen_errors(void **state)
{
	struct srv *echo = srv_start(NULL);
	struct ezp_daemon *d = NULL;
	struct ezp_error err = {0};
	char yaml[512];
	uint16_t port;
	int busy, c, rc;

	(void)state;
	current_test = __func__;
	busy = udp_client(0); /* a plain socket, no SO_REUSEPORT, holds the port */
	port = sock_port(busy);
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n  - Name: p\n    From: {udp: {Listen: 127.0.0.1:%u}}\n"
		 "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		 port, echo->port);
	assert_int_equal(daemon_new_yaml(yaml, EZP_LOG_ERROR, &d, &err), EZP_OK);
	rc = ezp_daemon_start(d, &err);
	ezp_daemon_free(d);
	assert_int_equal(rc, EZP_ERR_IO);
	if (!strstr(err.message, "cannot listen on udp") ||
	    !strstr(err.message, "Address already in use"))
		fail_msg("a port in use: '%s'", err.message);

	/* a reload onto that port fails whole; the running listener goes on */
	daemon_up(EZP_LOG_ERROR, "Pipelines:\n" UDP_PIPE("p", "", "", ""), echo->port);
	c = udp_client(bound_port("p"));
	roundtrip(c, "one", "one", "before the refused reload");
	rc = ezp_daemon_reload(T->d, yaml, "reload", &err);
	assert_int_equal(rc, EZP_ERR_IO);
	roundtrip(c, "two", "two", "after the refused reload");

	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n  - Name: p\n    From: {udp: {Listen: nowhere}}\n"
		 "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		 echo->port);
	rc = ezp_daemon_reload(T->d, yaml, "reload", &err);
	assert_int_equal(rc, EZP_ERR_CONFIG);
	if (err.line != 3)
		fail_msg("a bad Listen address: error at line %d: '%s'", err.line, err.message);
	roundtrip(c, "three", "three", "after the bad address");
	PASSED();
}

/* ---- 13. rebinding with live sessions ------------------------------------------------------ */

static void test_rebind_live(void **state)
{
	struct srv *a = srv_start("A:"), *b = srv_start("B:");
	struct ezp_session_summary s;
	uint16_t old, fixed;
	int c1, c2, c3, c4, y;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", "", "", ""), a->port);
	old = bound_port("p");
	c1 = udp_client(old);
	roundtrip(c1, "1", "A:1", "before the restart");
	s = session_of(c1, "p");
	inject(s.id, EZP_DIR_TO_CLIENT, "queued", 6); /* in flight while it moves */
	restart("p", 0);
	expect_dgram(c1, "queued", "a datagram queued across the restart");
	assert_true(bound_port("p") != old);
	roundtrip(c1, "2", "A:2", "the old session keeps its address after the restart");
	c2 = udp_client(bound_port("p"));
	roundtrip(c2, "3", "A:3", "a new client reaches the new socket");
	c3 = udp_client(old);
	send_dgram(c3, "nobody");
	expect_no_reply(c3, QUIET_MS, "a new client at the old address");
	assert_int_equal(session_of(c1, "p").id, s.id);

	/* the moved session's legs can still be re-pointed */
	swap_server(s.id, "127.0.0.1:%u", b->port);
	roundtrip(c1, "4", "B:4", "the moved session's server swapped");
	y = udp_client(old);
	swap_client(s.id, y, 0, 0);
	roundtrip(y, "5", "B:5", "the moved session's client re-pointed");
	inject(s.id, EZP_DIR_TO_CLIENT, "to-y", 4);
	expect_dgram(y, "to-y", "and the server side reaches the new client");

	{
		struct ezp_error err = {0};
		assert_int_equal(ezp_session_swap_client(T->d, s.id, "[::1]:9", 0, 0, 0, &err),
				 EZP_ERR_INVAL);
	}

	/* a reload that changes Listen: sessions go on, new clients use the new port */
	fixed = free_port();
	reload("Pipelines:\n  - Name: p\n    From: {udp: {Listen: 127.0.0.1:%u}}\n"
	       "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
	       fixed, a->port);
	assert_int_equal(bound_port("p"), fixed);
	roundtrip(y, "6", "B:6", "the twice-moved session after the reload");
	roundtrip(c2, "7", "A:7", "a session of the restarted listener after the reload");
	c4 = udp_client(fixed);
	roundtrip(c4, "8", "A:8", "a new client on the reloaded Listen");

	/*
	 * A restart on the same fixed port: the new sockets join the old ones'
	 * SO_REUSEPORT group, so while the old ones close the kernel may hash a
	 * client anywhere. A datagram sent in that moment may be lost, as UDP
	 * allows; the client's retry gets through.
	 */
	restart("p", 0);
	assert_int_equal(bound_port("p"), fixed);
	roundtrip_retry(c4, "9", "A:9", "a session after a restart on the same port");
	roundtrip(c4, "9b", "A:9b", "a session after a restart on the same port, again");
	close_fd(c2);
	c2 = udp_client(fixed);
	roundtrip(c2, "10", "A:10", "a new client after a restart on the same port");

	/* a restart that closes the sessions */
	restart("p", 1);
	if (!wait_count("p", 0))
		fail_msg("sessions left after a restart with close_sessions");
	roundtrip(c4, "11", "A:11", "the same client gets a new session");
	PASSED();
}

/* A reload that removes the pipeline ends its sessions; one that changes Batch rebinds. */
static void test_reload_remove(void **state)
{
	struct srv *a = srv_start("A:");
	struct tapc *tc;
	uint64_t sid;
	int c;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN, "Pipelines:\n" UDP_PIPE("p", "", "", "") UDP_PIPE("q", "", "", ""),
		  a->port, a->port);
	tc = tap_on(NULL);
	c = udp_client(bound_port("p"));
	roundtrip(c, "1", "A:1", "before");
	sid = session_of(c, "p").id;
	reload("Pipelines:\n" UDP_PIPE("q", "", "", ""), a->port);
	assert_int_equal(tap_closed(tc, sid, NULL, 0), EZP_CLOSE_SHUTDOWN);
	send_dgram(c, "2");
	expect_no_reply(c, QUIET_MS, "the removed pipeline");
	c = udp_client(bound_port("q"));
	roundtrip(c, "3", "A:3", "the pipeline left");
	reload("Pipelines:\n" UDP_PIPE("q", ", Batch: 4", "", ""), a->port);
	roundtrip(c, "4", "A:4", "the old session after a From change");
	PASSED();
}

/* ---- 14. IPv6 ---------------------------------------------------------------------------------
 */

static void test_ipv6(void **state)
{
	struct srv *e6, *e4;
	struct ezp_session_summary s;
	int c, c4;

	(void)state;
	current_test = __func__;
	if (!have_ipv6()) {
		fprintf(stderr, "test_udp: no ::1 on this host; %s skipped\n", __func__);
		skip();
	}
	e6 = srv_start_at(AF_INET6, 0, "6:");
	e4 = srv_start("4:");
	daemon_up(EZP_LOG_DEBUG,
		  "Pipelines:\n  - Name: p\n    From: {udp: {Listen: \"[::1]:0\"}}\n"
		  "    To: {udp: {Connect: \"[::1]:%u\"}}\n",
		  e6->port);
	c = udp_client_fam(AF_INET6, bound_port("p"));
	roundtrip(c, "v6", "6:v6", "IPv6 both ways");
	s = session_of(c, "p");
	{
		uint8_t *out = malloc(65527), *in = malloc(65536);
		ssize_t n;
		assert_non_null(out);
		assert_non_null(in);
		memset(out, 0x5a, 65527);
		memcpy(out, "6:", 2); /* the reply carries the tag */
		assert_int_equal(send(c, out + 2, 65525, 0), 65525);
		n = recv_wait(c, in, 65536, WAIT_MS);
		if (n != 65527 || memcmp(in, out, 65527)) {
			free(out);
			free(in);
			fail_msg("the largest IPv6 datagram: got %zd of 65527 bytes", n);
		}
		free(out);
		free(in);
	}
	/* an IPv4 client address for an IPv6 listener: v4-mapped, which ::1 cannot reach */
	c4 = udp_client(0);
	swap_client(s.id, c4, 0, 0);
	inject(s.id, EZP_DIR_TO_CLIENT, "unreachable", 11);
	expect_log("dropped a datagram of 11 bytes: Network is unreachable",
		   "a datagram ::1 cannot send");
	expect_quiet(c4, QUIET_MS, "an IPv4 client of a ::1 listener");
	swap_client(s.id, c, 0, 0);
	inject(s.id, EZP_DIR_TO_CLIENT, "home", 4);
	expect_dgram(c, "home", "re-pointed back to the IPv6 client");
	swap_server(s.id, "127.0.0.1:%u", e4->port);
	roundtrip(c, "x", "4:x", "an IPv6 client, an IPv4 server");
	restart("p", 0);
	roundtrip(c, "y", "4:y", "an IPv6 session moved off its listener");
	{ /* its own socket is bound to ::1, which cannot reach IPv4: the leg stays */
		struct ezp_error err = {0};
		char addr[64];
		addr_text(c4, addr, sizeof(addr));
		assert_int_equal(ezp_session_swap_client(T->d, s.id, addr, 0, 0, 0, &err),
				 EZP_ERR_IO);
		if (!strstr(err.message, "Network is unreachable"))
			fail_msg("repoint a moved ::1 client to IPv4: '%s'", err.message);
	}
	roundtrip(c, "z", "4:z", "the moved session after a refused repoint");
	PASSED();
}

/* ---- 15. transports mixed: tcp in, udp out (and back) ------------------------------------ */

/* A TCP server for one connection: replies "T:" + the first read, then shuts its write side. */
struct tsrv {
	int fd, conn;
	uint16_t port;
	char after[64]; /* what came after its shutdown */
	atomic_int n_after;
	pthread_t th;
};

static void *tsrv_main(void *arg)
{
	struct tsrv *t = arg;
	char buf[64];
	struct pollfd p = {t->fd, POLLIN, 0};
	ssize_t n;

	if (poll(&p, 1, WAIT_MS) != 1 || (t->conn = accept4(t->fd, NULL, NULL, SOCK_CLOEXEC)) < 0)
		return NULL;
	p.fd = t->conn;
	if (poll(&p, 1, WAIT_MS) != 1 || (n = recv(t->conn, buf + 2, sizeof(buf) - 2, 0)) <= 0)
		return NULL;
	memcpy(buf, "T:", 2);
	(void)send(t->conn, buf, (size_t)n + 2, MSG_NOSIGNAL);
	shutdown(t->conn, SHUT_WR);
	if (poll(&p, 1, WAIT_MS) == 1 && (n = recv(t->conn, t->after, sizeof(t->after) - 1, 0)) > 0)
		atomic_store(&t->n_after, (int)n);
	return NULL;
}

static struct tsrv t; /* outlives a failed test: its thread ends by its own deadline */

static void test_mixed_udp_tcp(void **state)
{
	struct sockaddr_storage ss;
	socklen_t len = loop_addr(AF_INET, 0, &ss);
	uint64_t end;
	int c;

	(void)state;
	current_test = __func__;
	memset(&t, 0, sizeof(t));
	t.conn = -1;
	t.fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	assert_int_equal(bind(t.fd, (struct sockaddr *)&ss, len), 0);
	assert_int_equal(listen(t.fd, 4), 0);
	t.port = sock_port(t.fd);
	assert_int_equal(pthread_create(&t.th, NULL, tsrv_main, &t), 0);
	daemon_up(EZP_LOG_WARN,
		  "Pipelines:\n  - Name: p\n    From: {udp: {Listen: 127.0.0.1:0}}\n"
		  "    To: {tcp: {Connect: 127.0.0.1:%u}}\n",
		  t.port);
	c = udp_client(bound_port("p"));
	roundtrip(c, "hi", "T:hi", "a udp client of a tcp server");
	/* the server's end of stream reaches the udp client leg, which has no half-close */
	send_dgram(c, "more");
	end = mono_ms() + WAIT_MS;
	while (!atomic_load(&t.n_after) && mono_ms() < end)
		poll_pause();
	pthread_join(t.th, NULL);
	if (t.conn >= 0)
		close(t.conn);
	if (atomic_load(&t.n_after) != 4 || memcmp(t.after, "more", 4))
		fail_msg("the tcp server got %d bytes after its shutdown", atomic_load(&t.n_after));
	PASSED();
}

static void test_mixed_tcp(void **state)
{
	struct srv *echo = srv_start("U:");
	struct sockaddr_storage ss;
	socklen_t len;
	char buf[64];
	ssize_t n;
	int t;

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_WARN,
		  "Pipelines:\n  - Name: p\n    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		  "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		  echo->port);
	t = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	len = loop_addr(AF_INET, bound_port("p"), &ss);
	assert_int_equal(connect(t, (struct sockaddr *)&ss, len), 0);
	assert_int_equal(send(t, "ping", 4, 0), 4);
	n = recv_wait(t, buf, sizeof(buf), WAIT_MS);
	assert_int_equal(n, 6);
	assert_memory_equal(buf, "U:ping", 6);
	assert_int_equal(send(t, "last", 4, 0), 4);
	shutdown(t, SHUT_WR); /* the udp server leg gets shutdown_write */
	n = recv_wait(t, buf, sizeof(buf), WAIT_MS);
	assert_int_equal(n, 6);
	assert_memory_equal(buf, "U:last", 6);
	{
		struct ezp_session_summary *v;
		struct ezp_error err = {0};
		assert_int_equal(list_sessions("p", &v), 1);
		assert_int_equal(ezp_session_close(T->d, v[0].id, &err), EZP_OK);
		free(v);
	}
	n = recv_wait(t, buf, sizeof(buf), WAIT_MS);
	assert_true(n <= 0 && n != -2); /* the tcp client is closed */
	if (!wait_count("p", 0))
		fail_msg("the session did not close");
	PASSED();
}

/* ---- 16. no file descriptors left ----------------------------------------------------------- */

static void test_no_fds(void **state)
{
	struct srv *a = srv_start(NULL), *b = srv_start("B:");
	struct ezp_error err = {0};
	struct holder *h;
	struct tapc *tc;
	char addr[64], text[96];
	int fd[32], w[32], x, y, c1, c2, c3, d, rc;
	uint64_t sid, sids[32];

	(void)state;
	current_test = __func__;
	daemon_up(EZP_LOG_DEBUG, "Pipelines:\n" UDP_PIPE("p", "", CALLBACK, ""), a->port);
	h = claim("p");
	tc = tap_on("p");
	probe(h, fd, w, sids, 1, &x, &y); /* a session on each worker: no old socket closes */
	c1 = fd[x];
	sid = sids[x];
	c2 = udp_client(bound_port("p"));
	d = udp_client(0);
	c3 = udp_client(0);

	fds_exhaust();
	/* a new client: its server socket cannot be made; its session ends at once */
	send_dgram(c2, "2");
	{
		char why[96];
		int r = tap_closed(tc, 0, why, sizeof(why));
		if (r != EZP_CLOSE_CONNECT_FAILED || !strstr(why, "Too many open files"))
			fail_msg("a session without a server socket ended with %d '%s'", r, why);
	}
	expect_quiet(c2, QUIET_MS, "a client whose server socket failed");
	/* a server swap fails and leaves the session as it was */
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", b->port);
	rc = ezp_session_swap_server(T->d, sid, addr, &err);
	assert_int_equal(rc, EZP_ERR_IO);
	if (!strstr(err.message, "Too many open files"))
		fail_msg("swap_server without descriptors: '%s'", err.message);
	/* so does dialling a client */
	addr_text(d, addr, sizeof(addr));
	rc = ezp_session_swap_client(T->d, sid, addr, 1, 1, 0, &err);
	assert_int_equal(rc, EZP_ERR_IO);
	roundtrip(c1, "3", "3", "the session after the failed swaps");

	/* a restart with one descriptor for two sockets fails whole */
	fds_release(1);
	rc = ezp_pipeline_restart(T->d, "p", 0, &err);
	assert_int_equal(rc, EZP_ERR_IO);
	if (!strstr(err.message, "cannot listen on udp") ||
	    !strstr(err.message, "Too many open files"))
		fail_msg("a restart without descriptors: '%s'", err.message);
	roundtrip(c1, "3b", "3b", "the session after the failed restart");

	/* a restart gets its two sockets; the live client cannot move and keeps the old one */
	fds_release(1);
	restart("p", 0);
	roundtrip(c1, "4", "4", "a client left on the old socket");
	roundtrip(fd[y], "4y", "4y", "a client on the other worker left on its old socket");
	fds_release(-1);
	udp_connect_to(c3, bound_port("p"));
	roundtrip(c3, "5", "5", "a new client once descriptors are back");
	roundtrip(c1, "6", "6", "the client on the old socket");
	close_session(sid);
	assert_int_equal(tap_closed(tc, sid, text, sizeof(text)), EZP_CLOSE_API);
	PASSED();
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_many_clients, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_batch_sizes, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_sizes, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_cross_worker, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_handoff_expiry, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_idle, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_shared, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_swap_server, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_icmp_unreachable, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_pause_resume, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_send_queue_full, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_dialled_client_backpressure, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_slow_receiver, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_listen_errors, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_rebind_live, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_reload_remove, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_ipv6, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_mixed_tcp, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_mixed_udp_tcp, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_shared_reload, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_no_fds, setup, teardown),
	};

	const char *preload = getenv("LD_PRELOAD");

	if (preload && strstr(preload, "vgpreload")) /* valgrind: everything is slower */
		slow = 10;
	if (getenv("EZP_TEST_FILTER")) /* e.g. EZP_TEST_FILTER='test_idle' */
		cmocka_set_test_filter(getenv("EZP_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
