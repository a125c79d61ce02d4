/*
 * test_core.c - the core's machinery around the packet path:
 *   - worker.c on workers of the test's own (deferred calls from many
 *     threads, ezp__worker_call, timers, fd watches, stop and destroy);
 *   - the plugin loader's folder scans (fixtures, EZP_PLUGIN_PATH, the
 *     folder beside the executable, one folder spelt several ways) and the
 *     checks on kinds;
 *   - a daemon's life (bad YAML, a port already taken at start, stop and
 *     free edge cases, reload as a diff with live sessions, reload errors
 *     and the rollback of a half-built plan, the Workers warning);
 *   - control.c's errors, taps (errors, filters, the default capacity,
 *     unsubscribing with events queued), the services table handed to
 *     plugins, the old program's config run as a daemon, and session edge
 *     cases reachable with the real tcp and udp transports.
 * The test registers a plugin of its own (`fake` and `listenonly`
 * transports, `failer` and `counter` filters) with ezp__registry_add_builtin.
 * Threads: the test's own (control); callbacks run on workers and touch only
 * state under a mutex. Every wait has a deadline and waits for an event or a
 * condition; "nothing happens" is watched for QUIET_MS.
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
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "capture.h"
#include "core.h"
#include "wait.h"

static int slow = 1;	      /* 10 under valgrind */
#define WAIT_MS (5000 * slow) /* the deadline of every ordinary wait */
#define QUIET_MS 200	      /* how long "nothing happens" is watched */

#include "net.h" /* after WAIT_MS: its expect_* helpers wait that long */

static const char *volatile current_test = "?";

/* ---- time and waiting ------------------------------------------------------------------ */

/* A counter others bump and the test waits on. */
struct counter {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int n;
	int status;
	char msg[256];
	struct ezp_worker *on; /* the worker a callback ran on */
};

static void counter_init(struct counter *c)
{
	memset(c, 0, sizeof(*c));
	sync_init(&c->mu, &c->cv);
}

static void counter_fini(struct counter *c)
{
	pthread_cond_destroy(&c->cv);
	pthread_mutex_destroy(&c->mu);
}

static void counter_bump(struct counter *c)
{
	pthread_mutex_lock(&c->mu);
	c->n++;
	c->on = ezp__worker_current();
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
}

static int counter_get(struct counter *c)
{
	int n;

	pthread_mutex_lock(&c->mu);
	n = c->n;
	pthread_mutex_unlock(&c->mu);
	return n;
}

/* Wait until the count reaches @want; returns the count. */
static int counter_wait(struct counter *c, int want)
{
	struct timespec end = deadline(WAIT_MS);
	int n;

	pthread_mutex_lock(&c->mu);
	while (c->n < want && pthread_cond_timedwait(&c->cv, &c->mu, &end) != ETIMEDOUT)
		;
	n = c->n;
	pthread_mutex_unlock(&c->mu);
	return n;
}

/* A done callback (ezp_done_fn) that records its answer. */
static void counter_done(void *arg, int status, const char *message)
{
	struct counter *c = arg;

	pthread_mutex_lock(&c->mu);
	c->status = status;
	snprintf(c->msg, sizeof(c->msg), "%s", message ? message : "");
	c->n++;
	c->on = ezp__worker_current();
	pthread_cond_broadcast(&c->cv);
	pthread_mutex_unlock(&c->mu);
}

/* Blocks a worker until opened (bounded). */
struct gate {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int entered, open, expired;
};

static void gate_fn(void *arg)
{
	struct gate *g = arg;
	struct timespec end = deadline(4 * WAIT_MS);

	pthread_mutex_lock(&g->mu);
	g->entered = 1;
	pthread_cond_broadcast(&g->cv);
	while (!g->open)
		if (pthread_cond_timedwait(&g->cv, &g->mu, &end) == ETIMEDOUT) {
			g->expired = 1;
			break;
		}
	pthread_mutex_unlock(&g->mu);
}

static void gate_close_on(struct gate *g, struct ezp_worker *w)
{
	struct timespec end = deadline(WAIT_MS);

	memset(g, 0, sizeof(*g));
	sync_init(&g->mu, &g->cv);
	assert_int_equal(ezp__defer(w, gate_fn, g), EZP_OK);
	pthread_mutex_lock(&g->mu);
	while (!g->entered && pthread_cond_timedwait(&g->cv, &g->mu, &end) != ETIMEDOUT)
		;
	pthread_mutex_unlock(&g->mu);
	assert_true(g->entered);
}

static void gate_open(struct gate *g)
{
	pthread_mutex_lock(&g->mu);
	g->open = 1;
	pthread_cond_broadcast(&g->cv);
	pthread_mutex_unlock(&g->mu);
}

static void gate_fini(struct gate *g)
{
	assert_int_equal(g->expired, 0);
	pthread_cond_destroy(&g->cv);
	pthread_mutex_destroy(&g->mu);
}

/* ---- the test's own plugin --------------------------------------------------------------- */

struct fake_from {
	struct ezp_addr listen;
};

struct fake_to {
	struct ezp_addr connect;
};

static atomic_int fake_listen_fail;

static const struct ezp_param fake_listen_params[] = {
    {"Listen", EZP_PARAM_ADDR, offsetof(struct fake_from, listen), NULL, 1, 0, 0, "where"},
    EZP_PARAM_END,
};

static const struct ezp_param fake_connect_params[] = {
    {"Connect", EZP_PARAM_ADDR, offsetof(struct fake_to, connect), NULL, 1, 0, 0, "where to"},
    EZP_PARAM_END,
};

static int fake_listen(const struct ezp_core *core, const struct ezp_listen_args *args,
		       void **state, struct ezp_addr *bound, struct ezp_error *err)
{
	const struct fake_from *c = args->config;

	(void)core;
	(void)err;
	if (atomic_load(&fake_listen_fail))
		return EZP_ERR_IO; /* no message: the core says what failed */
	*state = malloc(1);
	*bound = c->listen;
	return *state ? EZP_OK : EZP_ERR_NOMEM;
}

static void fake_unlisten(void *state)
{
	free(state);
}

static int fake_connect(const struct ezp_core *core, const struct ezp_connect_args *args,
			struct ezp_error *err)
{
	(void)core;
	(void)args;
	(void)err;
	return EZP_ERR_IO;
}

static int fake_send(struct ezp_leg *leg, void *state, struct ezp_packet *pkt)
{
	(void)leg;
	(void)state;
	ezp__packet_unref(pkt);
	return EZP_ERR_CLOSED;
}

static void fake_leg_op(struct ezp_leg *leg, void *state)
{
	(void)leg;
	(void)state;
}

/* Listens (without sockets) and "connects" nowhere; has no connect_address. */
static const struct ezp_transport_kind fake_transport = {
    .struct_size = sizeof(struct ezp_transport_kind),
    .name = "fake",
    .description = "listens without sockets; cannot say where it connects",
    .flags = EZP_TRANSPORT_STREAM,
    .listen_params = fake_listen_params,
    .listen_config_size = sizeof(struct fake_from),
    .connect_params = fake_connect_params,
    .connect_config_size = sizeof(struct fake_to),
    .listen = fake_listen,
    .unlisten = fake_unlisten,
    .connect = fake_connect,
    .send = fake_send,
    .pause = fake_leg_op,
    .resume = fake_leg_op,
    .shutdown_write = fake_leg_op,
    .close = fake_leg_op,
};

static const struct ezp_transport_kind listenonly_transport = {
    .struct_size = sizeof(struct ezp_transport_kind),
    .name = "listenonly",
    .description = "can only listen",
    .flags = EZP_TRANSPORT_STREAM,
    .listen_params = fake_listen_params,
    .listen_config_size = sizeof(struct fake_from),
    .listen = fake_listen,
    .unlisten = fake_unlisten,
    .send = fake_send,
    .pause = fake_leg_op,
    .resume = fake_leg_op,
    .shutdown_write = fake_leg_op,
    .close = fake_leg_op,
};

static atomic_int filter_creates, filter_destroys;

struct failer_conf {
	int64_t fail_on; /* the worker index whose instance fails */
	int with_message;
};

static const struct ezp_param failer_params[] = {
    {"FailOn", EZP_PARAM_INT, offsetof(struct failer_conf, fail_on), "0", 0, 0, 0, "worker"},
    {"Message", EZP_PARAM_BOOL, offsetof(struct failer_conf, with_message), "false", 0, 0, 0,
     "fill err"},
    EZP_PARAM_END,
};

static int failer_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
			 struct ezp_error *err)
{
	const struct failer_conf *c = config;

	if ((int64_t)ctx->worker_index == c->fail_on) {
		if (c->with_message)
			snprintf(err->message, sizeof(err->message), "failer says no on worker %u",
				 ctx->worker_index);
		return EZP_ERR_UNSUPPORTED;
	}
	atomic_fetch_add(&filter_creates, 1);
	*instance = malloc(1);
	return EZP_OK;
}

static int plain_packet(void *instance, struct ezp_filter_call *call)
{
	(void)instance;
	(void)call;
	return EZP_VERDICT_PASS;
}

static void counted_destroy(void *instance)
{
	atomic_fetch_add(&filter_destroys, 1);
	free(instance);
}

static const struct ezp_filter_kind failer_filter = {
    .struct_size = sizeof(struct ezp_filter_kind),
    .name = "failer",
    .description = "cannot start on one worker",
    .params = failer_params,
    .config_size = sizeof(struct failer_conf),
    .create = failer_create,
    .packet = plain_packet,
    .destroy = counted_destroy,
};

static const struct ezp_transport_kind *const test_transports[] = {&fake_transport,
								   &listenonly_transport, NULL};
static const struct ezp_filter_kind *const test_filters[] = {&failer_filter, NULL};

static const struct ezp_plugin_desc test_plugin = {
    .struct_size = sizeof(struct ezp_plugin_desc),
    .abi_major = EZP_ABI_MAJOR,
    .abi_minor = EZP_ABI_MINOR,
    .name = "test-core",
    .version = "1",
    .transports = test_transports,
    .filters = test_filters,
};

/* ---- per-test context ---------------------------------------------------------------- */

struct ctx {
	struct ezp_daemon *d;
	struct ezp_daemon *extra[4];
	int n_extra;
	int fds[64];
	int n_fds;
	struct ezp_tap *taps[8];
	int n_taps;
	struct ezp_claim *claims[4];
	int n_claims;
};

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

/* ---- sockets ------------------------------------------------------------------------- */

static struct sockaddr_in loopback(uint16_t port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static uint16_t sock_port(int fd)
{
	struct sockaddr_storage a;
	socklen_t len = sizeof(a);

	assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	return a.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&a)->sin6_port)
				       : ntohs(((struct sockaddr_in *)&a)->sin_port);
}

static int udp_sock(uint16_t port)
{
	int fd = track_fd(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	struct sockaddr_in me = loopback(0), to = loopback(port);

	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	if (port)
		assert_int_equal(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
	return fd;
}

static int udp6_sock(uint16_t port)
{
	int fd = track_fd(socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0));
	struct sockaddr_in6 me, to;

	memset(&me, 0, sizeof(me));
	me.sin6_family = AF_INET6;
	me.sin6_addr = in6addr_loopback;
	to = me;
	to.sin6_port = htons(port);
	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	if (port)
		assert_int_equal(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
	return fd;
}

/* A TCP listener on 127.0.0.1:@port (0: any), without SO_REUSEPORT. */
static int tcp_listener_on(uint16_t port)
{
	int fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	struct sockaddr_in me = loopback(port);

	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	assert_int_equal(listen(fd, 16), 0);
	return fd;
}

static int tcp_listener(void)
{
	return tcp_listener_on(0);
}

/* A port that was free a moment ago. */
static uint16_t free_port(void)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in me = loopback(0);
	uint16_t port;

	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	port = sock_port(fd);
	close(fd);
	return port;
}

/* connect(2) to 127.0.0.1:@port: the fd, or -errno. */
static int tcp_try_connect(uint16_t port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
	struct sockaddr_in to = loopback(port);

	assert_true(fd >= 0);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	return track_fd(fd);
}

static int tcp_connect(uint16_t port)
{
	int fd = tcp_try_connect(port);

	if (fd < 0)
		fail_msg("connect to 127.0.0.1:%u: %s", port, strerror(-fd));
	return fd;
}

static int accept_wait(int lfd)
{
	struct pollfd p = {lfd, POLLIN, 0};

	if (poll(&p, 1, WAIT_MS) != 1)
		fail_msg("no connection reached the test's server");
	return track_fd(accept4(lfd, NULL, NULL, SOCK_CLOEXEC));
}

static void send_text(int fd, const char *text)
{
	assert_int_equal(send(fd, text, strlen(text), MSG_NOSIGNAL), (ssize_t)strlen(text));
}

/* The stream ends (0) or errors within the deadline. */
static void expect_closed(int fd, const char *what)
{
	char buf[256];

	for (;;) {
		ssize_t n = recv_wait(fd, buf, sizeof(buf), WAIT_MS);
		if (n == 0 || n == -1)
			return;
		if (n == -2)
			fail_msg("%s: the connection stayed open", what);
	}
}

static void expect_quiet(int fd, const char *what)
{
	char buf[2048];
	ssize_t n = recv_wait(fd, buf, sizeof(buf) - 1, QUIET_MS);

	if (n != -2)
		fail_msg("%s: expected nothing, got %zd", what, n);
}

/* ---- daemons ---------------------------------------------------------------------------- */

static struct ezp_daemon_opts test_opts(unsigned workers, const char *const *paths)
{
	struct ezp_daemon_opts o = {.struct_size = sizeof(o),
				    .workers = workers,
				    .plugin_paths = paths,
				    .no_default_paths = 1,
				    .log_level = EZP_LOG_ERROR};
	return o;
}

static const char *plugins_dir(void)
{
	const char *p = getenv("EZP_TEST_PLUGINS");

	return p ? p : "build/plugins";
}

/* New daemon with the tcp/udp plugins and the test's plugin; pipelines from @yaml via reload. */
__attribute__((format(printf, 3, 4))) static struct ezp_daemon *
daemon_make(unsigned workers, int start, const char *fmt, ...)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(workers, paths);
	struct ezp_error err = {0};
	struct ezp_daemon *d = NULL;
	char yaml[4096];
	va_list ap;
	int rc;

	va_start(ap, fmt);
	vsnprintf(yaml, sizeof(yaml), fmt, ap);
	va_end(ap);
	rc = ezp_daemon_new("Pipelines: []\n", "test_core", &opts, &d, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_new: %s", err.message);
	if (T->d)
		T->extra[T->n_extra++] = d;
	else
		T->d = d;
	rc = ezp__registry_add_builtin((struct ezp_core_ctx *)d, &test_plugin, &err);
	if (rc != EZP_OK)
		fail_msg("registering the test plugin: %s", err.message);
	if (start && (rc = ezp_daemon_start(d, &err)) != EZP_OK)
		fail_msg("ezp_daemon_start: %s", err.message);
	rc = ezp_daemon_reload(d, yaml, "test_core", &err);
	if (rc != EZP_OK)
		fail_msg("pipelines: %s at %d:%d: %s\n%s", ezp_status_str(rc), err.line, err.column,
			 err.message, yaml);
	return d;
}

static uint16_t bound_port_of(struct ezp_daemon *d, const char *pipeline)
{
	struct ezp_addr a;

	if (ezp_pipeline_bound(d, pipeline, &a) != EZP_OK)
		fail_msg("pipeline %s is not listening", pipeline);
	return a.ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&a.ss)->sin6_port)
					  : ntohs(((struct sockaddr_in *)&a.ss)->sin_port);
}

static uint16_t bound_port(const char *pipeline)
{
	return bound_port_of(T->d, pipeline);
}

static size_t sessions_of(const char *pipeline, struct ezp_session_summary **v)
{
	size_t n = 0;

	*v = NULL;
	assert_int_equal(ezp_daemon_sessions(T->d, pipeline, v, &n), EZP_OK);
	return n;
}

/* Wait until @pipeline has @want sessions; returns the first (or a zeroed summary). */
static struct ezp_session_summary wait_sessions(const char *pipeline, size_t want)
{
	uint64_t end = mono_ms() + WAIT_MS;
	struct ezp_session_summary s;
	size_t n;

	memset(&s, 0, sizeof(s));
	do {
		struct ezp_session_summary *v;
		n = sessions_of(pipeline, &v);
		if (n == want) {
			if (n)
				s = v[0];
			free(v);
			return s;
		}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("pipeline %s has %zu session(s), expected %zu", pipeline, n, want);
	return s;
}

/* The session whose first client is @fd's local address. */
static struct ezp_session_summary session_of(int fd)
{
	struct sockaddr_storage me;
	socklen_t len = sizeof(me);
	uint64_t end = mono_ms() + WAIT_MS;

	assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &len), 0);
	do {
		struct ezp_session_summary *v, s;
		size_t n = sessions_of(NULL, &v);
		for (size_t i = 0; i < n; i++)
			if (v[i].client.len == len && !memcmp(&v[i].client.ss, &me, len)) {
				s = v[i];
				free(v);
				return s;
			}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("no session for the client socket");
	abort();
}

/* ---- taps ---- */

struct tapc {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int n, opened, closed, packets;
	uint64_t lagged, last_seq;
	int lagged_calls;
	uint64_t sessions[64];
	char close_text[64];
};

static void tapc_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct tapc *tc = userdata;

	pthread_mutex_lock(&tc->mu);
	if (tc->n < 64)
		tc->sessions[tc->n] = ev->session_id;
	tc->n++;
	tc->last_seq = ev->seq;
	if (ev->type == EZP_TAP_SESSION_OPENED)
		tc->opened++;
	if (ev->type == EZP_TAP_SESSION_CLOSED) {
		tc->closed++;
		snprintf(tc->close_text, sizeof(tc->close_text), "%s", ev->info->close_text);
	}
	if (ev->type == EZP_TAP_PACKET)
		tc->packets++;
	pthread_cond_broadcast(&tc->cv);
	pthread_mutex_unlock(&tc->mu);
}

static void tapc_lagged(void *userdata, uint64_t dropped)
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
	static struct tapc pool[8];
	static int used;
	struct tapc *tc = &pool[used++ % 8];

	memset(tc, 0, sizeof(*tc));
	sync_init(&tc->mu, &tc->cv);
	return tc;
}

static struct ezp_tap *tap_add(struct ezp_daemon *d, struct tapc *tc, const char *pipeline,
			       uint64_t session, unsigned capacity, struct ezp_worker *on)
{
	struct ezp_tap_opts o = {.struct_size = sizeof(o),
				 .pipeline = pipeline,
				 .session_id = session,
				 .capacity = capacity,
				 .deliver_on = on,
				 .userdata = tc,
				 .on_event = tapc_event,
				 .on_lagged = tapc_lagged};
	struct ezp_tap *t = NULL;

	assert_int_equal(ezp_tap_subscribe(d, &o, &t), EZP_OK);
	T->taps[T->n_taps++] = t;
	return t;
}

static int tapc_wait(struct tapc *tc, const int *field, int want)
{
	struct timespec end = deadline(WAIT_MS);
	int n;

	pthread_mutex_lock(&tc->mu);
	while (*field < want && pthread_cond_timedwait(&tc->cv, &tc->mu, &end) != ETIMEDOUT)
		;
	n = *field;
	pthread_mutex_unlock(&tc->mu);
	return n;
}

/* ---- setup and teardown ---------------------------------------------------------------- */

static void on_alarm(int sig)
{
	char msg[160];
	int n = snprintf(msg, sizeof(msg), "test_core: %s hung; aborting\n", current_test);

	(void)sig;
	if (write(2, msg, (size_t)n) < 0)
		_exit(98);
	abort();
}

static int setup(void **state)
{
	signal(SIGALRM, on_alarm);
	alarm(60 * (unsigned)slow);
	T = calloc(1, sizeof(*T));
	if (!T)
		return -1;
	atomic_store(&fake_listen_fail, 0);
	*state = T;
	return 0;
}

static int teardown(void **state)
{
	struct ctx *c = *state;

	for (int i = 0; i < c->n_taps; i++)
		ezp_tap_unsubscribe(c->taps[i]);
	for (int i = 0; i < c->n_claims; i++)
		ezp_claim_release(c->claims[i]);
	ezp_daemon_free(c->d);
	for (int i = 0; i < c->n_extra; i++)
		ezp_daemon_free(c->extra[i]);
	for (int i = 0; i < c->n_fds; i++)
		close(c->fds[i]);
	free(c);
	T = NULL;
	alarm(0);
	ezp__log_setup(EZP_LOG_ERROR, EZP__LOG_TEXT);
	if (atomic_load(&filter_creates) != atomic_load(&filter_destroys)) {
		fprintf(stderr, "test_core: %s: %d filter instance(s) created, %d destroyed\n",
			current_test, atomic_load(&filter_creates), atomic_load(&filter_destroys));
		return -1;
	}
	return 0;
}

/* ==== 1. workers ======================================================================== */

/* Workers of the test's own: a context with just what worker.c reads. */
struct workers {
	struct ezp_core_ctx ctx;
	struct ezp_worker *w[2];
};

static void workers_up(struct workers *ws, int start)
{
	memset(ws, 0, sizeof(*ws));
	ws->ctx.n_workers = 2;
	ws->ctx.workers = ws->w;
	for (unsigned i = 0; i < 2; i++) {
		ws->w[i] = calloc(1, sizeof(struct ezp_worker));
		assert_non_null(ws->w[i]);
		assert_int_equal(ezp__worker_init(ws->w[i], &ws->ctx, i), EZP_OK);
		if (start)
			assert_int_equal(ezp__worker_start(ws->w[i]), EZP_OK);
	}
}

static void workers_down(struct workers *ws)
{
	for (unsigned i = 0; i < 2; i++) {
		ezp__worker_stop(ws->w[i]);
		ezp__worker_destroy(ws->w[i]);
		free(ws->w[i]);
	}
}

#define DEFER_THREADS 8
#define DEFERS 3000

struct defer_rec {
	struct ezp_worker *w;
	int last[DEFER_THREADS]; /* touched only on the worker */
	int out_of_order, wrong_thread;
	atomic_int ran;
	pthread_barrier_t go;
};

struct defer_call {
	struct defer_rec *r;
	int thread, seq;
};

static struct defer_call defer_calls[DEFER_THREADS][DEFERS];

static void defer_fn(void *arg)
{
	struct defer_call *c = arg;
	struct defer_rec *r = c->r;

	if (ezp__worker_current() != r->w)
		r->wrong_thread++;
	if (c->seq != r->last[c->thread] + 1)
		r->out_of_order++;
	r->last[c->thread] = c->seq;
	atomic_fetch_add(&r->ran, 1);
}

static void *defer_poster(void *arg)
{
	struct defer_call *calls = arg;

	pthread_barrier_wait(&calls[0].r->go);
	for (int i = 0; i < DEFERS; i++)
		if (ezp__defer(calls[0].r->w, defer_fn, &calls[i]) != EZP_OK)
			abort();
	return NULL;
}

static void noop_fn(void *arg)
{
	(void)arg;
}

static void test_worker_defer_many_threads(void **state)
{
	static struct defer_rec r;
	struct workers ws;
	pthread_t th[DEFER_THREADS];

	(void)state;
	current_test = __func__;
	workers_up(&ws, 1);
	memset(&r, 0, sizeof(r));
	r.w = ws.w[1];
	for (int t = 0; t < DEFER_THREADS; t++) {
		r.last[t] = -1;
		for (int i = 0; i < DEFERS; i++)
			defer_calls[t][i] = (struct defer_call){&r, t, i};
	}
	pthread_barrier_init(&r.go, NULL, DEFER_THREADS);
	for (int t = 0; t < DEFER_THREADS; t++)
		assert_int_equal(pthread_create(&th[t], NULL, defer_poster, defer_calls[t]), 0);
	for (int t = 0; t < DEFER_THREADS; t++)
		pthread_join(th[t], NULL);
	pthread_barrier_destroy(&r.go);
	/* a call after them all returns once they all ran (one FIFO per worker) */
	assert_int_equal(ezp__worker_call(r.w, noop_fn, NULL), EZP_OK);
	assert_int_equal(atomic_load(&r.ran), DEFER_THREADS * DEFERS);
	assert_int_equal(r.out_of_order, 0);
	assert_int_equal(r.wrong_thread, 0);
	for (int t = 0; t < DEFER_THREADS; t++)
		assert_int_equal(r.last[t], DEFERS - 1);
	workers_down(&ws);
}

struct call_rec {
	struct workers *ws;
	struct ezp_worker *seen_on;
	int inner_ran, inner_inline;
	int each[2];
	struct ezp_worker *each_w[2];
	int self_defer_ran;
	struct counter done;
};

static void inner_fn(void *arg)
{
	struct call_rec *c = arg;

	c->inner_ran++;
}

static void self_deferred(void *arg)
{
	struct call_rec *c = arg;

	c->self_defer_ran = ezp__worker_current() == c->ws->w[0];
	counter_bump(&c->done);
}

static void outer_fn(void *arg)
{
	struct call_rec *c = arg;

	c->seen_on = ezp__worker_current();
	/* on the worker itself ezp__worker_call runs inline (it would deadlock otherwise) */
	ezp__worker_call(c->seen_on, inner_fn, c);
	c->inner_inline = c->inner_ran == 1;
	/* a worker posting to itself (the event_active path): runs after this call */
	c->self_defer_ran = ezp__defer(c->seen_on, self_deferred, c) == EZP_OK ? -1 : -2;
}

static void each_fn(struct ezp_worker *w, void *arg)
{
	struct call_rec *c = arg;

	c->each[w->index]++;
	c->each_w[w->index] = ezp__worker_current();
}

static void test_worker_call_and_each(void **state)
{
	struct workers ws;
	struct call_rec c;

	(void)state;
	current_test = __func__;
	memset(&c, 0, sizeof(c));
	counter_init(&c.done);
	/* not started yet: the call runs inline on the caller */
	workers_up(&ws, 0);
	c.ws = &ws;
	assert_int_equal(ezp__worker_call(ws.w[0], inner_fn, &c), EZP_OK);
	assert_int_equal(c.inner_ran, 1);
	workers_down(&ws);

	workers_up(&ws, 1);
	c.inner_ran = 0;
	assert_null(ezp__worker_current());
	assert_int_equal(ezp__worker_call(ws.w[0], outer_fn, &c), EZP_OK);
	assert_ptr_equal(c.seen_on, ws.w[0]);
	assert_int_equal(c.inner_inline, 1);
	assert_int_equal(counter_wait(&c.done, 1), 1);
	assert_int_equal(c.self_defer_ran, 1);
	ezp__workers_each(&ws.ctx, each_fn, &c);
	assert_int_equal(c.each[0], 1);
	assert_int_equal(c.each[1], 1);
	assert_ptr_equal(c.each_w[0], ws.w[0]);
	assert_ptr_equal(c.each_w[1], ws.w[1]);
	workers_down(&ws);
	counter_fini(&c.done);
}

struct late_rec {
	struct ezp_worker *w;
	int ran, redefer_rc;
};

static void late_fn(void *arg)
{
	struct late_rec *l = arg;

	l->ran++;
	/* while the worker is being destroyed no new call is taken */
	l->redefer_rc = ezp__defer(l->w, noop_fn, NULL);
}

static void test_worker_stop_destroy(void **state)
{
	struct workers ws;
	struct late_rec l = {0};

	(void)state;
	current_test = __func__;
	workers_up(&ws, 1);
	ezp__worker_stop(ws.w[0]);
	ezp__worker_stop(ws.w[0]); /* twice: nothing to do */
	/* posted after the loop stopped: still taken, and run when the worker is destroyed */
	l.w = ws.w[0];
	assert_int_equal(ezp__defer(ws.w[0], late_fn, &l), EZP_OK);
	assert_int_equal(l.ran, 0);
	ezp__worker_destroy(ws.w[0]);
	assert_int_equal(l.ran, 1);
	assert_int_equal(l.redefer_rc, EZP_ERR_CLOSED);
	free(ws.w[0]);
	ezp__worker_stop(ws.w[1]);
	ezp__worker_destroy(ws.w[1]);
	free(ws.w[1]);
}

/* ---- timers ---- */

struct timer_rec {
	struct ezp_worker *w;
	struct ezp_timer *once, *rep, *selfree, *flip, *restart;
	struct counter once_n, rep_n, selfree_n, flip_n, restart_n;
	uint64_t restart_at;
	int wrong_thread;
};

static struct timer_rec TR;

static void tick(struct counter *c)
{
	if (ezp__worker_current() != TR.w)
		TR.wrong_thread++;
	counter_bump(c);
}

static void once_cb(void *arg)
{
	(void)arg;
	tick(&TR.once_n);
}

static void rep_cb(void *arg)
{
	(void)arg;
	tick(&TR.rep_n);
}

static void selfree_cb(void *arg)
{
	(void)arg;
	tick(&TR.selfree_n);
	if (counter_get(&TR.selfree_n) == 3) { /* freed inside its own callback */
		ezp__timer_free(TR.selfree);
		TR.selfree = NULL;
	}
}

static void flip_cb(void *arg)
{
	(void)arg;
	tick(&TR.flip_n);
}

static void restart_cb(void *arg)
{
	(void)arg;
	TR.restart_at = mono_ms();
	tick(&TR.restart_n);
}

static void timers_start(void *arg)
{
	const struct ezp_core *core = arg;

	TR.once = ezp__timer_new(TR.w, once_cb, NULL);
	TR.rep = core->timer_new(TR.w, rep_cb, NULL); /* the services table's entry */
	TR.selfree = ezp__timer_new(TR.w, selfree_cb, NULL);
	TR.flip = ezp__timer_new(TR.w, flip_cb, NULL);
	TR.restart = ezp__timer_new(TR.w, restart_cb, NULL);
	ezp__timer_start(TR.once, 10, 0);
	core->timer_start(TR.rep, 5, 1);
	ezp__timer_start(TR.selfree, 5, 1);
	/* repeating, then changed to one-shot before it fires: fires once */
	ezp__timer_start(TR.flip, 5, 1);
	ezp__timer_start(TR.flip, 15, 0);
	/* started again before it fires: the later start counts */
	ezp__timer_start(TR.restart, 10, 0);
	ezp__timer_start(TR.restart, 120, 0);
	/* NULL is ignored */
	ezp__timer_start(NULL, 1, 0);
	ezp__timer_stop(NULL);
	ezp__timer_free(NULL);
}

static void timers_stop_rep(void *arg)
{
	(void)arg;
	ezp__timer_stop(TR.rep);
}

static void timers_flip_to_repeat(void *arg)
{
	(void)arg;
	ezp__timer_start(TR.flip, 5, 1); /* one-shot -> repeating again */
}

static void timers_free(void *arg)
{
	(void)arg;
	ezp__timer_free(TR.once);
	ezp__timer_free(TR.rep);
	ezp__timer_free(TR.selfree);
	ezp__timer_free(TR.flip);
	ezp__timer_free(TR.restart);
}

static void quiet_wait(void)
{
	struct timespec ts = {0, QUIET_MS * 1000000L};

	nanosleep(&ts, NULL);
}

static void test_timers(void **state)
{
	struct workers ws;
	int n;

	(void)state;
	current_test = __func__;
	workers_up(&ws, 1);
	memset(&TR, 0, sizeof(TR));
	counter_init(&TR.once_n);
	counter_init(&TR.rep_n);
	counter_init(&TR.selfree_n);
	counter_init(&TR.flip_n);
	counter_init(&TR.restart_n);
	TR.w = ws.w[0];
	/* a services table to reach the timer entries through */
	struct ezp_core_ctx *tbl = calloc(1, sizeof(*tbl));
	assert_non_null(tbl);
	ezp__core_table_init(tbl);
	uint64_t t0 = mono_ms(); /* libevent times from its loop's cached clock: not before t0 */
	ezp__worker_call(TR.w, timers_start, &tbl->table);

	assert_int_equal(counter_wait(&TR.once_n, 1), 1);
	assert_true(counter_wait(&TR.rep_n, 4) >= 4);
	assert_int_equal(counter_wait(&TR.selfree_n, 3), 3);
	assert_int_equal(counter_wait(&TR.flip_n, 1), 1);
	assert_int_equal(counter_wait(&TR.restart_n, 1), 1);
	/* it fired for the second start (120 ms), not the first (10 ms) */
	if (TR.restart_at - t0 < 110)
		fail_msg("a restarted timer fired after %llu ms, before its second start's 120 ms",
			 (unsigned long long)(TR.restart_at - t0));
	ezp__worker_call(TR.w, timers_stop_rep, NULL);
	n = counter_get(&TR.rep_n);
	quiet_wait();
	/* stopped, one-shot, freed inside its callback: none fires again */
	assert_int_equal(counter_get(&TR.rep_n), n);
	assert_int_equal(counter_get(&TR.once_n), 1);
	assert_int_equal(counter_get(&TR.selfree_n), 3);
	assert_int_equal(counter_get(&TR.flip_n), 1);
	assert_int_equal(counter_get(&TR.restart_n), 1);
	/* a stopped repeating timer restarts; a one-shot one becomes repeating */
	ezp__worker_call(TR.w, timers_flip_to_repeat, NULL);
	assert_true(counter_wait(&TR.flip_n, 4) >= 4);
	ezp__worker_call(TR.w, timers_free, NULL);
	assert_int_equal(TR.wrong_thread, 0);
	workers_down(&ws);
	free(tbl);
	counter_fini(&TR.once_n);
	counter_fini(&TR.rep_n);
	counter_fini(&TR.selfree_n);
	counter_fini(&TR.flip_n);
	counter_fini(&TR.restart_n);
}

/* ---- fd watches ---- */

struct watch_rec {
	struct ezp_worker *w;
	struct ezp_watch *rd, *wr, *self, *bad, *bad0;
	int sp[2], pp[2];
	struct counter reads, writes, selfs;
	unsigned last_rd_events, last_wr_events;
	int consume;
};

static struct watch_rec WR;

static void rd_cb(int fd, unsigned events, void *arg)
{
	char buf[64];

	(void)arg;
	WR.last_rd_events = events;
	if (WR.consume && read(fd, buf, sizeof(buf)) < 0)
		return;
	counter_bump(&WR.reads);
}

static void wr_cb(int fd, unsigned events, void *arg)
{
	(void)fd;
	(void)arg;
	WR.last_wr_events = events;
	ezp__watch_set(WR.wr, 0); /* once is enough */
	counter_bump(&WR.writes);
}

static void self_cb(int fd, unsigned events, void *arg)
{
	char buf[8];

	(void)events;
	(void)arg;
	if (read(fd, buf, sizeof(buf)) < 0)
		return;
	ezp__watch_free(WR.self); /* freed inside its own callback */
	WR.self = NULL;
	counter_bump(&WR.selfs);
}

static void watches_add(void *arg)
{
	(void)arg;
	WR.rd = ezp__watch_add(WR.w, WR.pp[0], EZP_WATCH_READ, rd_cb, NULL);
	WR.wr = ezp__watch_add(WR.w, WR.sp[0], 0, wr_cb, NULL); /* nothing yet */
	WR.self = ezp__watch_add(WR.w, WR.sp[1], EZP_WATCH_READ, self_cb, NULL);
	/* a descriptor that is not open cannot be watched */
	WR.bad = ezp__watch_add(WR.w, 100000, EZP_WATCH_READ, rd_cb, NULL);
	/* an empty interest set is not armed, so it is accepted; arming it fails later */
	WR.bad0 = ezp__watch_add(WR.w, 100001, 0, rd_cb, NULL);
}

static void watches_rd_off(void *arg)
{
	(void)arg;
	ezp__watch_set(WR.rd, 0);
}

static void watches_rd_on(void *arg)
{
	(void)arg;
	ezp__watch_set(WR.rd, EZP_WATCH_READ);
	ezp__watch_set(WR.rd, EZP_WATCH_READ); /* unchanged: nothing to do */
	ezp__watch_set(NULL, EZP_WATCH_READ);
}

static void watches_wr_on(void *arg)
{
	(void)arg;
	ezp__watch_set(WR.wr, EZP_WATCH_WRITE | EZP_WATCH_READ);
}

static void watches_bad_arm(void *arg)
{
	(void)arg;
	ezp__watch_set(WR.bad0, EZP_WATCH_READ); /* logged: cannot watch */
}

static void watches_free(void *arg)
{
	(void)arg;
	ezp__watch_free(WR.rd);
	ezp__watch_free(WR.wr);
	ezp__watch_free(WR.self);
	ezp__watch_free(WR.bad0);
	ezp__watch_free(NULL);
}

static void test_watches(void **state)
{
	struct workers ws;
	struct capture cap;
	char *log;
	int n;

	(void)state;
	current_test = __func__;
	workers_up(&ws, 1);
	memset(&WR, 0, sizeof(WR));
	counter_init(&WR.reads);
	counter_init(&WR.writes);
	counter_init(&WR.selfs);
	WR.w = ws.w[1];
	WR.consume = 1;
	assert_int_equal(pipe2(WR.pp, O_CLOEXEC | O_NONBLOCK), 0);
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, WR.sp), 0);
	ezp__worker_call(WR.w, watches_add, NULL);
	assert_non_null(WR.rd);
	assert_non_null(WR.wr);
	assert_non_null(WR.self);
	assert_null(WR.bad);
	assert_non_null(WR.bad0);

	/* readable: the callback runs with READ */
	assert_int_equal(write(WR.pp[1], "x", 1), 1);
	assert_int_equal(counter_wait(&WR.reads, 1), 1);
	assert_int_equal(WR.last_rd_events, EZP_WATCH_READ);
	/* interest removed: bytes wait unnoticed */
	ezp__worker_call(WR.w, watches_rd_off, NULL);
	assert_int_equal(write(WR.pp[1], "y", 1), 1);
	quiet_wait();
	assert_int_equal(counter_get(&WR.reads), 1);
	/* interest back: the waiting byte is seen */
	ezp__worker_call(WR.w, watches_rd_on, NULL);
	assert_int_equal(counter_wait(&WR.reads, 2), 2);

	/* writable: WRITE is reported (READ is not: nothing to read) */
	ezp__worker_call(WR.w, watches_wr_on, NULL);
	assert_int_equal(counter_wait(&WR.writes, 1), 1);
	assert_int_equal(WR.last_wr_events, EZP_WATCH_WRITE);
	/* the peer of sp[0] becomes readable: that watch frees itself in its callback */
	assert_int_equal(write(WR.sp[0], "z", 1), 1);
	assert_int_equal(counter_wait(&WR.selfs, 1), 1);
	assert_int_equal(write(WR.sp[0], "z", 1), 1);
	quiet_wait();
	assert_int_equal(counter_get(&WR.selfs), 1);
	/* level-triggered: a byte left unread is reported again and again */
	WR.consume = 0;
	n = counter_get(&WR.reads);
	assert_int_equal(write(WR.pp[1], "w", 1), 1);
	assert_true(counter_wait(&WR.reads, n + 3) >= n + 3);
	ezp__worker_call(WR.w, watches_rd_off, NULL);

	ezp__log_setup(EZP_LOG_WARN, EZP__LOG_TEXT);
	capture_begin(&cap);
	ezp__worker_call(WR.w, watches_bad_arm, NULL);
	log = capture_end(&cap);
	if (!strstr(log, "cannot watch fd 100001"))
		fail_msg("arming a watch on a closed fd was not reported: '%s'", log);
	free(log);
	ezp__worker_call(WR.w, watches_free, NULL);
	workers_down(&ws);
	close(WR.pp[0]);
	close(WR.pp[1]);
	close(WR.sp[0]);
	close(WR.sp[1]);
	counter_fini(&WR.reads);
	counter_fini(&WR.writes);
	counter_fini(&WR.selfs);
}

/* ==== 2. the loader ======================================================================= */

static struct ezp_core_ctx *bare_daemon(void)
{
	struct ezp_daemon_opts opts = test_opts(1, NULL);
	struct ezp_error err = {0};
	struct ezp_daemon *d = NULL;

	opts.log_level = EZP_LOG_WARN;
	assert_int_equal(ezp_daemon_new("Pipelines: []\n", "t", &opts, &d, &err), EZP_OK);
	if (T->d)
		T->extra[T->n_extra++] = d;
	else
		T->d = d;
	return (struct ezp_core_ctx *)d;
}

static void test_loader_scan_fixtures(void **state)
{
	const char *fixtures = getenv("EZP_TEST_FIXTURES");
	char spelt[3][PATH_MAX];
	struct ezp_core_ctx *d;
	struct ezp_error err = {0};
	struct capture cap;
	char *log, path[PATH_MAX];

	(void)state;
	current_test = __func__;
	if (!fixtures)
		fixtures = "tests";
	d = bare_daemon();
	ezp__log_setup(EZP_LOG_WARN, EZP__LOG_TEXT);
	capture_begin(&cap);
	/* every broken plugin there is refused with a warning; the scan itself succeeds */
	assert_int_equal(ezp__registry_scan(d, fixtures, &err), EZP_OK);
	log = capture_end(&cap);
	static const char *const want[] = {
	    "was built for SDK ABI 2.0",    "needs SDK ABI 1.1",
	    "has a descriptor of 16 bytes", "does not export the symbol 'ezp_plugin'",
	    "failed to initialise",	    "filter #0 is incomplete"};
	for (size_t i = 0; i < EZP_ARRAY_LEN(want); i++)
		if (!strstr(log, want[i]))
			fail_msg("scanning %s: no warning containing '%s' in:\n%s", fixtures,
				 want[i], log);
	free(log);
	assert_null(ezp__registry_filter(d, "half"));
	assert_int_equal(d->reg.n_searched, 1);

	/* a folder with things that are not plugins: a dangling link, a text file called .so,
	 * one level of subfolders is searched, the next is not */
	{
		char dir[] = "/tmp/ezp-loader-XXXXXX", p1[PATH_MAX], p2[PATH_MAX], p3[PATH_MAX],
		     p4[PATH_MAX], p5[PATH_MAX], sub[PATH_MAX], subsub[PATH_MAX];
		FILE *f;
		assert_non_null(mkdtemp(dir));
		snprintf(p1, sizeof(p1), "%s/dangling.so", dir);
		snprintf(p2, sizeof(p2), "%s/junk.so", dir);
		snprintf(sub, sizeof(sub), "%s/a", dir);
		snprintf(subsub, sizeof(subsub), "%s/a/b", dir);
		snprintf(p3, sizeof(p3), "%s/a/junk1.so", dir);
		snprintf(p4, sizeof(p4), "%s/a/b/junk2.so", dir);
		snprintf(p5, sizeof(p5), "%s/notes.txt", dir);
		assert_int_equal(symlink("/nonexistent-ezp/x.so", p1), 0);
		assert_int_equal(mkdir(sub, 0700), 0);
		assert_int_equal(mkdir(subsub, 0700), 0);
		const char *files[] = {p2, p3, p4, p5};
		for (int i = 0; i < 4; i++) {
			assert_non_null(f = fopen(files[i], "w"));
			fputs("not an ELF object\n", f);
			fclose(f);
		}
		capture_begin(&cap);
		assert_int_equal(ezp__registry_scan(d, dir, &err), EZP_OK);
		log = capture_end(&cap);
		unlink(p1);
		for (int i = 0; i < 4; i++)
			unlink(files[i]);
		rmdir(subsub);
		rmdir(sub);
		rmdir(dir);
		if (!strstr(log, "junk.so") || !strstr(log, "junk1.so") ||
		    strstr(log, "junk2.so") || strstr(log, "dangling") || strstr(log, "notes"))
			fail_msg("scanning a folder of non-plugins:\n%s", log);
		free(log);
		assert_int_equal(d->reg.n_searched, 2);
	}
	/* one folder spelt three ways is scanned once */
	snprintf(spelt[0], sizeof(spelt[0]), "%s/", plugins_dir());
	snprintf(spelt[1], sizeof(spelt[1]), "%s/.", plugins_dir());
	snprintf(spelt[2], sizeof(spelt[2]), "%s/tcp/..", plugins_dir());
	for (int i = 0; i < 3; i++)
		assert_int_equal(ezp__registry_scan(d, spelt[i], &err), EZP_OK);
	assert_int_equal(d->reg.n_searched, 3);
	assert_non_null(ezp__registry_transport(d, "tcp"));
	assert_non_null(ezp__registry_transport(d, "udp"));
	/* the same file loaded again by path: already there */
	snprintf(path, sizeof(path), "%s/tcp/tcp.so", plugins_dir());
	assert_int_equal(ezp__registry_load(d, path, &err), EZP_ERR_EXISTS);
	/* a file is not a folder */
	assert_int_equal(ezp__registry_scan(d, path, &err), EZP_ERR_NOT_FOUND);
	assert_non_null(strstr(err.message, "does not exist"));
}

static void test_loader_default_paths(void **state)
{
	const char *paths[] = {NULL};
	struct ezp_daemon_opts opts = test_opts(1, paths);
	struct ezp_error err = {0};
	struct ezp_daemon *d = NULL;
	struct capture cap;
	char env[3 * PATH_MAX], *log;
	const char *old = getenv("EZP_PLUGIN_PATH");
	char *saved = old ? strdup(old) : NULL;

	(void)state;
	current_test = __func__;
	/* EZP_PLUGIN_PATH: a list; a folder that does not exist is a warning, not an error */
	snprintf(env, sizeof(env), "/nonexistent-ezp-dir:%s:%s/", plugins_dir(), plugins_dir());
	setenv("EZP_PLUGIN_PATH", env, 1);
	opts.no_default_paths = 0;
	opts.log_level = EZP_LOG_WARN;
	ezp__log_setup(EZP_LOG_WARN, EZP__LOG_TEXT);
	capture_begin(&cap);
	assert_int_equal(ezp_daemon_new("Pipelines: []\n", "t", &opts, &d, &err), EZP_OK);
	log = capture_end(&cap);
	if (saved)
		setenv("EZP_PLUGIN_PATH", saved, 1);
	else
		unsetenv("EZP_PLUGIN_PATH");
	free(saved);
	T->d = d;
	if (!strstr(log, "plugin folder '/nonexistent-ezp-dir' does not exist"))
		fail_msg("EZP_PLUGIN_PATH's missing folder was not reported:\n%s", log);
	free(log);
	assert_non_null(ezp__registry_transport((struct ezp_core_ctx *)d, "tcp"));

	/* with no EZP_PLUGIN_PATH the folder beside the executable (../plugins) is found */
	unsetenv("EZP_PLUGIN_PATH");
	struct ezp_daemon *d2 = NULL;
	assert_int_equal(ezp_daemon_new("Pipelines: []\n", "t", &opts, &d2, &err), EZP_OK);
	T->extra[T->n_extra++] = d2;
	if (old)
		setenv("EZP_PLUGIN_PATH", old, 1);
	assert_non_null(ezp__registry_transport((struct ezp_core_ctx *)d2, "udp"));
	/* no options at all: the defaults, and Workers from the config */
	struct ezp_daemon *d3 = NULL;
	assert_int_equal(ezp_daemon_new("Workers: 2\nPipelines: []\n", NULL, NULL, &d3, &err),
			 EZP_OK);
	T->extra[T->n_extra++] = d3;
	assert_int_equal(((struct ezp_core_ctx *)d3)->n_workers, 2);
	/* Plugins.Path naming a folder that does not exist is a config error */
	struct ezp_daemon *d4 = NULL;
	memset(&err, 0, sizeof(err));
	assert_int_not_equal(
	    ezp_daemon_new("Plugins: {Path: [/nonexistent-ezp-dir]}\nPipelines: []\n", "paths.yaml",
			   &opts, &d4, &err),
	    EZP_OK);
	assert_null(d4);
	if (!strstr(err.message, "does not exist"))
		fail_msg("Plugins.Path: '%s'", err.message);
}

/* Descriptors the loader must refuse or accept. */
static int svc_start(const struct ezp_core *core, const void *config, void **state,
		     struct ezp_error *err)
{
	(void)core;
	(void)config;
	(void)err;
	*state = NULL;
	return EZP_OK;
}

static atomic_int svc_starts, svc_stops;
static const char *svc_state_dir_seen;

static int svc_start_counted(const struct ezp_core *core, const void *config, void **state,
			     struct ezp_error *err)
{
	const struct ezp_api_conf *ac = config;

	(void)core;
	(void)err;
	svc_state_dir_seen = ac->state_dir;
	atomic_fetch_add(&svc_starts, 1);
	*state = (void *)"auth-state";
	return EZP_OK;
}

static void svc_stop(void *state)
{
	(void)state;
	atomic_fetch_add(&svc_stops, 1);
}

static const void *svc_iface(void *state)
{
	return state;
}

static const struct ezp_service_kind auth_service = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "auth",
    .start = svc_start_counted,
    .stop = svc_stop,
    .iface_name = "ezp.test-auth",
    .iface_version = 2,
    .iface = svc_iface,
};

static const struct ezp_service_kind http_api_service = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "http-api",
    .start = svc_start,
    .stop = svc_stop,
};

/* Started whenever loaded (no Api needed), with no config, before auth and http-api. */
static atomic_int auto_starts, auto_order; /* auto_order: svc_starts seen at its start */

static int auto_start(const struct ezp_core *core, const void *config, void **state,
		      struct ezp_error *err)
{
	(void)core;
	(void)err;
	if (config)
		return EZP_ERR_INVAL;
	atomic_fetch_add(&auto_starts, 1);
	atomic_store(&auto_order, atomic_load(&svc_starts));
	*state = (void *)"auto-state";
	return EZP_OK;
}

static const struct ezp_service_kind auto_service = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "auto",
    .start = auto_start,
    .stop = svc_stop,
    .iface_name = "ezp.test-auto",
    .iface_version = 1,
    .iface = svc_iface,
    .flags = EZP_SERVICE_AUTOSTART,
};

static const struct ezp_service_kind half_service = {
    .struct_size = sizeof(struct ezp_service_kind), .name = "half", .stop = svc_stop, /* no start */
};

static const struct ezp_transport_kind half_transport = {
    .struct_size = sizeof(struct ezp_transport_kind),
    .name = "halftx",
    .send = fake_send, /* no close, pause, ... */
};

static atomic_int fini_calls;

static void count_fini(void)
{
	atomic_fetch_add(&fini_calls, 1);
}

static int init_fails_quietly(const struct ezp_core *core, struct ezp_error *err)
{
	(void)core;
	(void)err;
	return EZP_ERR_PERM;
}

static const struct ezp_service_kind *const api_services[] = {&http_api_service, &auth_service,
							      NULL};
static const struct ezp_service_kind *const auto_services[] = {&auto_service, NULL};
static const struct ezp_service_kind *const half_services[] = {&half_service, NULL};
static const struct ezp_transport_kind *const half_transports[] = {&half_transport, NULL};
static const struct ezp_transport_kind *const tcp_again[] = {&listenonly_transport, NULL};

#define DESC(...)                                                                                  \
	{                                                                                          \
		.struct_size = sizeof(struct ezp_plugin_desc), .abi_major = EZP_ABI_MAJOR,         \
		.abi_minor = EZP_ABI_MINOR, __VA_ARGS__                                            \
	}

static const struct ezp_plugin_desc api_plugin =
    DESC(.name = "api", .services = api_services, .fini = count_fini);
static const struct ezp_plugin_desc api_again = DESC(.name = "api2", .services = api_services);
static const struct ezp_plugin_desc auto_plugin = DESC(.name = "auto", .services = auto_services);
static const struct ezp_plugin_desc half_svc_plugin = DESC(.name = "hs", .services = half_services);
static const struct ezp_plugin_desc half_tx_plugin =
    DESC(.name = "ht", .transports = half_transports);
static const struct ezp_plugin_desc nameless = DESC(.name = "");
static const struct ezp_plugin_desc tx_clash = DESC(.name = "clash", .transports = tcp_again);
static const struct ezp_plugin_desc quiet_init = DESC(.name = "qi", .init = init_fails_quietly);

static void test_loader_kind_checks(void **state)
{
	struct ezp_core_ctx *d;
	struct ezp_error err = {0};

	(void)state;
	current_test = __func__;
	d = bare_daemon();
	atomic_store(&fini_calls, 0);
	assert_null(ezp__registry_service(d, "http-api"));
	assert_int_equal(ezp__registry_add_builtin(d, &api_plugin, &err), EZP_OK);
	assert_ptr_equal(ezp__registry_service(d, "http-api"), &http_api_service);
	assert_null(ezp__registry_service(d, "nope"));
	assert_int_equal(ezp__registry_add_builtin(d, &api_again, &err), EZP_ERR_EXISTS);
	assert_non_null(strstr(err.message, "service 'http-api' is already provided"));
	assert_int_equal(ezp__registry_add_builtin(d, &half_svc_plugin, &err), EZP_ERR_ABI);
	assert_non_null(strstr(err.message, "plugin hs: service #0 is incomplete"));
	assert_int_equal(ezp__registry_add_builtin(d, &half_tx_plugin, &err), EZP_ERR_ABI);
	assert_non_null(strstr(err.message, "plugin ht: transport #0 is incomplete"));
	assert_int_equal(ezp__registry_add_builtin(d, &nameless, &err), EZP_ERR_PLUGIN);
	assert_non_null(strstr(err.message, "has no name"));
	assert_int_equal(ezp__registry_add_builtin(d, &test_plugin, &err), EZP_OK);
	assert_int_equal(ezp__registry_add_builtin(d, &tx_clash, &err), EZP_ERR_EXISTS);
	assert_non_null(strstr(err.message, "transport 'listenonly' is already provided"));
	memset(&err, 0, sizeof(err));
	assert_int_equal(ezp__registry_add_builtin(d, &quiet_init, &err), EZP_ERR_PERM);
	assert_non_null(strstr(err.message, "plugin qi failed to initialise: not permitted"));
	/* fini runs when the registry goes */
	ezp_daemon_free((struct ezp_daemon *)d);
	T->d = NULL;
	assert_int_equal(atomic_load(&fini_calls), 1);
}

/* ==== 3. a daemon's life ================================================================== */

static void test_daemon_new_errors(void **state)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(1, paths);
	struct ezp_error err = {0};
	struct ezp_daemon *d = NULL;
	char *dump;

	(void)state;
	current_test = __func__;
	/* bad YAML: where and what; nothing is returned */
	assert_int_equal(
	    ezp_daemon_new("Pipelines:\n  - Name: p\n    Frm: {}\n", "bad.yaml", &opts, &d, &err),
	    EZP_ERR_CONFIG);
	assert_null(d);
	assert_string_equal(err.file, "bad.yaml");
	assert_int_equal(err.line, 3);
	assert_non_null(strstr(err.message, "Frm"));
	/* without an error struct: just the code */
	assert_int_equal(ezp_daemon_new(": : :\n", NULL, &opts, &d, NULL), EZP_ERR_CONFIG);
	assert_null(d);
	/* a plugin folder that does not exist */
	const char *nowhere[] = {"/nonexistent-ezp-dir", NULL};
	struct ezp_daemon_opts o2 = test_opts(1, nowhere);
	assert_int_equal(ezp_daemon_new("Pipelines: []\n", NULL, &o2, &d, &err), EZP_ERR_NOT_FOUND);
	assert_null(d);
	/* the built-in default config (not started: nothing is bound) */
	assert_int_equal(ezp_daemon_new(NULL, NULL, &opts, &d, &err), EZP_OK);
	dump = ezp_daemon_config_dump(d);
	assert_non_null(dump);
	if (!strstr(dump, "127.0.0.1:5554") || !strstr(dump, "127.0.0.1:5555"))
		fail_msg("the default config is not the documented one:\n%s", dump);
	free(dump);
	assert_int_equal(ezp_pipeline_bound(d, "default", &(struct ezp_addr){0}),
			 EZP_ERR_NOT_FOUND);
	ezp_daemon_stop(d); /* never started: nothing to stop */
	ezp_daemon_free(d);
	d = NULL;
	/* more workers than an id can name are capped */
	opts.workers = 300;
	assert_int_equal(ezp_daemon_new("Pipelines: []\n", NULL, &opts, &d, &err), EZP_OK);
	assert_int_equal(((struct ezp_core_ctx *)d)->n_workers, 255);
	ezp_daemon_free(d);
	ezp_daemon_free(NULL);
}

/* Errors from building a pipeline, through a daemon that knows the test's kinds. */
static void test_daemon_pipeline_build_errors(void **state)
{
	struct ezp_error err = {0};
	struct ezp_daemon *d;
	int rc;

	(void)state;
	current_test = __func__;
	d = daemon_make(2, 0, "Pipelines: []\n");
	/* a transport that cannot say where it connects */
	rc = ezp_daemon_reload(d,
			       "Pipelines:\n"
			       "  - Name: nf\n"
			       "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
			       "    To: {fake: {Connect: 127.0.0.1:9}}\n",
			       "nf.yaml", &err);
	assert_int_equal(rc, EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "pipeline 'nf': transport 'fake' has no address"));
	assert_int_equal(err.line, 4);
	assert_string_equal(err.file, "nf.yaml");
	/* a filter that cannot start on worker 1 (worker 0's instance is cleaned up) */
	memset(&err, 0, sizeof(err));
	rc = ezp_daemon_reload(d,
			       "Pipelines:\n"
			       "  - Name: ff\n"
			       "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
			       "    Through: [{failer: {FailOn: 1}}]\n"
			       "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
			       NULL, &err);
	assert_int_equal(rc, EZP_ERR_UNSUPPORTED);
	assert_non_null(strstr(err.message, "pipeline 'ff': filter 'failer' could not start: "
					    "not supported"));
	assert_int_equal(err.line, 4);
	/* ... or with its own message */
	memset(&err, 0, sizeof(err));
	rc = ezp_daemon_reload(d,
			       "Pipelines:\n"
			       "  - Name: ff\n"
			       "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
			       "    Through: [{failer: {FailOn: 0, Message: true}}]\n"
			       "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
			       NULL, &err);
	assert_int_equal(rc, EZP_ERR_UNSUPPORTED);
	assert_string_equal(err.message, "failer says no on worker 0");
	assert_int_equal(atomic_load(&filter_creates), atomic_load(&filter_destroys));
	/* a transport that fails to listen, without saying why */
	atomic_store(&fake_listen_fail, 1);
	rc = ezp_daemon_reload(d, "Pipelines: []\n", NULL, &err);
	assert_int_equal(rc, EZP_OK);
	assert_int_equal(ezp_daemon_start(d, &err), EZP_OK);
	memset(&err, 0, sizeof(err));
	rc = ezp_daemon_reload(d,
			       "Pipelines:\n"
			       "  - Name: fl\n"
			       "    From: {fake: {Listen: 127.0.0.1:7}}\n"
			       "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
			       "fl.yaml", &err);
	assert_int_equal(rc, EZP_ERR_IO);
	assert_non_null(strstr(err.message, "pipeline 'fl': cannot listen: I/O error"));
	assert_int_equal(err.line, 3);
	atomic_store(&fake_listen_fail, 0);
	rc = ezp_daemon_reload(d,
			       "Pipelines:\n"
			       "  - Name: fl\n"
			       "    From: {fake: {Listen: 127.0.0.1:7}}\n"
			       "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
			       "fl.yaml", &err);
	assert_int_equal(rc, EZP_OK);
	assert_int_equal(bound_port_of(d, "fl"), 7);
}

static void test_daemon_start_port_taken(void **state)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(2, paths);
	struct ezp_error err = {0};
	int blocker = tcp_listener(), fd;
	uint16_t taken = sock_port(blocker), pa = free_port();
	char yaml[512];
	int rc;

	(void)state;
	current_test = __func__;
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: b\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:9}}\n"
		 "  - Name: a\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
		 taken, pa);
	assert_int_equal(ezp_daemon_new(yaml, "taken.yaml", &opts, &T->d, &err), EZP_OK);
	rc = ezp_daemon_start(T->d, &err);
	assert_int_not_equal(rc, EZP_OK);
	if (!strstr(err.message, "in use") && !strstr(err.message, "Address"))
		fail_msg("a taken port: '%s'", err.message);
	assert_int_equal(err.line, 3);
	/* nothing is left listening: `a` was opened first and closed again */
	assert_int_equal(ezp_pipeline_bound(T->d, "a", &(struct ezp_addr){0}), EZP_ERR_NOT_FOUND);
	fd = tcp_try_connect(pa);
	if (fd >= 0)
		fail_msg("port %u of pipeline a still accepts connections after a failed start",
			 pa);
	assert_int_equal(fd, -ECONNREFUSED);
	/* the port comes free: start now works */
	close_fd(blocker);
	assert_int_equal(ezp_daemon_start(T->d, &err), EZP_OK);
	assert_int_equal(ezp_daemon_start(T->d, NULL), EZP_OK); /* twice: already running */
	assert_int_equal(bound_port("a"), pa);
	assert_int_equal(bound_port("b"), taken);
	fd = tcp_connect(pa);
	ezp_daemon_stop(T->d);
	ezp_daemon_stop(T->d); /* twice: nothing more */
	expect_closed(fd, "a session at stop");
	assert_int_equal(tcp_try_connect(pa), -ECONNREFUSED);
}

/* A daemon with no plugin folders scanned (the build's real auth and http-api stay out). */
static struct ezp_daemon *bare_api_daemon(const char *yaml)
{
	const char *none[] = {NULL};
	struct ezp_daemon_opts opts = test_opts(1, none);
	struct ezp_error err = {0};
	struct ezp_daemon *d = NULL;

	if (ezp_daemon_new(yaml, "test_core", &opts, &d, &err) != EZP_OK)
		fail_msg("ezp_daemon_new: %s", err.message);
	if (T->d)
		T->extra[T->n_extra++] = d;
	else
		T->d = d;
	return d;
}

static void test_daemon_api_services(void **state)
{
	struct ezp_error err = {0};
	struct ezp_daemon *d;
	const struct ezp_core *core;
	const struct ezp_control *ctl;
	char dir[] = "/tmp/ezp-svc-XXXXXX", yaml[1024], sub[256];
	struct stat st;

	(void)state;
	current_test = __func__;
	assert_non_null(mkdtemp(dir));
	snprintf(sub, sizeof(sub), "%s/a/b", dir);
	snprintf(yaml, sizeof(yaml), "StateDir: %s\nApi: {Listen: 127.0.0.1:0}\nPipelines: []\n",
		 sub);
	/* Api configured, but no plugin provides the services: the start fails and says so */
	d = bare_api_daemon(yaml);
	assert_int_not_equal(ezp_daemon_start(d, &err), EZP_OK);
	if (!strstr(err.message, "no loaded plugin provides the 'auth' service"))
		fail_msg("start without the auth service: '%s'", err.message);
	/* with the services there: auth then http-api start, in a created 0700 StateDir */
	d = bare_api_daemon("Pipelines: []\n");
	assert_int_equal(ezp__registry_add_builtin((struct ezp_core_ctx *)d, &api_plugin, &err),
			 EZP_OK);
	assert_int_equal(ezp_daemon_reload(d, yaml, NULL, &err), EZP_OK);
	atomic_store(&svc_starts, 0);
	atomic_store(&svc_stops, 0);
	assert_int_equal(ezp_daemon_start(d, &err), EZP_OK);
	assert_int_equal(atomic_load(&svc_starts), 1);
	assert_string_equal(svc_state_dir_seen, sub);
	assert_int_equal(stat(sub, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0700);
	core = ezp_daemon_core(d);
	ctl = core->find_service(core->ctx, EZP_CONTROL_IFACE, EZP_CONTROL_VERSION);
	assert_non_null(ctl);
	assert_non_null(ctl->service_worker(core->ctx));
	assert_null(core->find_service(core->ctx, EZP_CONTROL_IFACE, EZP_CONTROL_VERSION + 1));
	assert_string_equal(core->find_service(core->ctx, "ezp.test-auth", 2), "auth-state");
	assert_null(core->find_service(core->ctx, "ezp.test-auth", 3));
	assert_null(core->find_service(core->ctx, "ezp.none", 1));
	assert_null(core->find_service(core->ctx, NULL, 1));
	ezp_daemon_stop(d);
	assert_int_equal(atomic_load(&svc_stops), 2);
	rmdir(sub);
	snprintf(sub, sizeof(sub), "%s/a", dir);
	rmdir(sub);
	rmdir(dir);
}

/* An EZP_SERVICE_AUTOSTART service runs without Api, and before auth/http-api with it. */
static void test_daemon_autostart_service(void **state)
{
	struct ezp_error err = {0};
	struct ezp_daemon *d;
	const struct ezp_core *core;
	char dir[] = "/tmp/ezp-auto-XXXXXX", yaml[512];

	(void)state;
	current_test = __func__;
	d = bare_api_daemon("Pipelines: []\n"); /* no Api section */
	assert_int_equal(ezp__registry_add_builtin((struct ezp_core_ctx *)d, &auto_plugin, &err),
			 EZP_OK);
	atomic_store(&auto_starts, 0);
	atomic_store(&svc_stops, 0);
	assert_int_equal(ezp_daemon_start(d, &err), EZP_OK);
	assert_int_equal(atomic_load(&auto_starts), 1);
	core = ezp_daemon_core(d);
	assert_string_equal(core->find_service(core->ctx, "ezp.test-auto", 1), "auto-state");
	ezp_daemon_stop(d);
	assert_int_equal(atomic_load(&svc_stops), 1);

	/* with the API: it starts first (auth has not started yet) and stops last */
	assert_non_null(mkdtemp(dir));
	snprintf(yaml, sizeof(yaml), "StateDir: %s\nApi: {Listen: 127.0.0.1:0}\nPipelines: []\n",
		 dir);
	d = bare_api_daemon("Pipelines: []\n");
	assert_int_equal(ezp__registry_add_builtin((struct ezp_core_ctx *)d, &auto_plugin, &err),
			 EZP_OK);
	assert_int_equal(ezp__registry_add_builtin((struct ezp_core_ctx *)d, &api_plugin, &err),
			 EZP_OK);
	assert_int_equal(ezp_daemon_reload(d, yaml, NULL, &err), EZP_OK);
	atomic_store(&auto_starts, 0);
	atomic_store(&svc_starts, 0);
	atomic_store(&svc_stops, 0);
	assert_int_equal(ezp_daemon_start(d, &err), EZP_OK);
	assert_int_equal(atomic_load(&auto_starts), 1);
	assert_int_equal(atomic_load(&auto_order), 0);
	assert_int_equal(atomic_load(&svc_starts), 1);
	ezp_daemon_stop(d);
	assert_int_equal(atomic_load(&svc_stops), 3);
	rmdir(dir);
}

/* ---- reload as a diff, with sessions ---- */

static void test_reload_diff(void **state)
{
	int la = tcp_listener(), lb = tcp_listener(), su = udp_sock(0), c1, a1, c2, b2, cq, cr, c3;
	struct ezp_session_summary sq;
	struct ezp_error err = {0};
	struct tapc *tc;
	uint16_t pnew;
	char yaml[2048], *dump;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		    "  - Name: q\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		    "  - Name: s\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    Through: [{callback: {Name: k, HoldTimeoutMs: 100}}]\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		    sock_port(la), sock_port(su), sock_port(su));
	tc = tapc_new();
	tap_add(T->d, tc, "q", 0, 0, NULL);
	c1 = tcp_connect(bound_port("p"));
	a1 = accept_wait(la);
	send_text(c1, "x1");
	expect_stream(a1, "x1", "p before the reload");
	cq = udp_sock(bound_port("q"));
	send_text(cq, "q1");
	expect_dgram(su, "q1", "q before the reload");
	sq = session_of(cq);
	uint16_t port_s = bound_port("s");
	struct ezp__pipeline *ps = ezp__pipeline_find((struct ezp_core_ctx *)T->d, "s");
	struct ezp__chain_def *chain_s = ps->gen->chain;

	/* p: new To; q: removed; r: added; s: only a hold key changed */
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: p\n"
		 "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		 "  - Name: r\n"
		 "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		 "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		 "  - Name: s\n"
		 "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		 "    Through: [{callback: {Name: k, HoldTimeoutMs: 200}}]\n"
		 "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		 sock_port(lb), sock_port(su), sock_port(su));
	assert_int_equal(ezp_daemon_reload(T->d, yaml, "reload-2", &err), EZP_OK);
	/* the existing p session keeps its server; a new one goes to the new To */
	send_text(c1, "x2");
	expect_stream(a1, "x2", "p's session after the reload");
	c2 = tcp_connect(bound_port("p"));
	b2 = accept_wait(lb);
	send_text(c2, "y1");
	expect_stream(b2, "y1", "a new p session goes to the new server");
	/* q is gone with its session */
	assert_int_equal(tapc_wait(tc, &tc->closed, 1), 1);
	assert_string_equal(tc->close_text, "pipeline removed");
	assert_int_equal(tc->sessions[tc->n - 1], sq.id);
	assert_int_equal(ezp_pipeline_bound(T->d, "q", &(struct ezp_addr){0}), EZP_ERR_NOT_FOUND);
	/* r works */
	cr = udp_sock(bound_port("r"));
	send_text(cr, "r1");
	expect_dgram(su, "r1", "the added pipeline");
	/* s kept its listener, but has a new chain (the hold timeout differs) */
	assert_int_equal(bound_port("s"), port_s);
	assert_ptr_not_equal(ps->gen->chain, chain_s);
	chain_s = ps->gen->chain;

	/* p's From changes: the listener is rebound, its session continues; s: only To */
	pnew = free_port();
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: p\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		 "  - Name: r\n"
		 "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		 "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		 "  - Name: s\n"
		 "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		 "    Through: [{callback: {Name: k, HoldTimeoutMs: 200}}]\n"
		 "    To: {udp: {Connect: 127.0.0.2:%u}}\n",
		 pnew, sock_port(lb), sock_port(su), sock_port(su));
	assert_int_equal(ezp_daemon_reload(T->d, yaml, "reload-3", &err), EZP_OK);
	assert_int_equal(bound_port("p"), pnew);
	send_text(c1, "x3");
	expect_stream(a1, "x3", "p's session after its listener moved");
	c3 = tcp_connect(pnew);
	accept_wait(lb);
	(void)c3;
	/* s: the same filters: the chain (and its claim slot) is kept */
	assert_ptr_equal(ps->gen->chain, chain_s);
	/* the same config again changes nothing */
	assert_int_equal(ezp_daemon_reload(T->d, yaml, "reload-4", NULL), EZP_OK);
	assert_int_equal(bound_port("p"), pnew);
	assert_ptr_equal(ps->gen->chain, chain_s);
	dump = ezp_daemon_config_dump(T->d);
	assert_non_null(strstr(dump, "Name: \"r\""));
	assert_null(strstr(dump, "Name: \"q\""));
	free(dump);
	/* Shared changes: a new listener (on one worker) */
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: r\n"
		 "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		 "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		 "    Shared: true\n",
		 sock_port(su));
	assert_int_equal(ezp_daemon_reload(T->d, yaml, "reload-5", &err), EZP_OK);
	assert_int_equal(ezp__pipeline_find((struct ezp_core_ctx *)T->d, "r")->listener->n_workers,
			 1);
	expect_closed(c1, "p removed: its session closes");
}

static void test_reload_errors_rollback(void **state)
{
	int la = tcp_listener(), blocker = tcp_listener(), c, a, fd;
	uint16_t taken = sock_port(blocker), pn = free_port(), pc = free_port(), pp;
	struct ezp_error err = {0};
	char good[512], yaml[2048];
	struct capture cap;
	char *log;

	(void)state;
	current_test = __func__;
	snprintf(good, sizeof(good),
		 "Pipelines:\n"
		 "  - Name: p\n"
		 "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:%u}}\n",
		 sock_port(la));
	daemon_make(1, 1, "%s", good);
	pp = bound_port("p");
	c = tcp_connect(pp);
	a = accept_wait(la);
	send_text(c, "1");
	expect_stream(a, "1", "before");

	/* invalid YAML: nothing changes */
	assert_int_equal(ezp_daemon_reload(T->d, "Pipelines: [", "e1.yaml", &err), EZP_ERR_CONFIG);
	assert_string_equal(err.file, "e1.yaml");
	/* a new pipeline listens, the next cannot: the first is closed again */
	snprintf(yaml, sizeof(yaml),
		 "%s"
		 "  - Name: n1\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:9}}\n"
		 "  - Name: n2\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
		 good, pn, taken);
	memset(&err, 0, sizeof(err));
	assert_int_not_equal(ezp_daemon_reload(T->d, yaml, "e2.yaml", &err), EZP_OK);
	assert_string_equal(err.file, "e2.yaml");
	assert_int_equal(err.line, 9);
	assert_int_equal(ezp_pipeline_bound(T->d, "n1", &(struct ezp_addr){0}), EZP_ERR_NOT_FOUND);
	fd = tcp_try_connect(pn);
	if (fd >= 0)
		fail_msg("n1's port %u still listens after a refused reload", pn);
	/* p gets a new From (opened), then a filter cannot start: the new listener is closed */
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: p\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u}}\n"
		 "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		 "  - Name: n3\n"
		 "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		 "    Through: [{failer: {FailOn: 0}}]\n"
		 "    To: {tcp: {Connect: 127.0.0.1:9}}\n",
		 pc, sock_port(la));
	memset(&err, 0, sizeof(err));
	assert_int_equal(ezp_daemon_reload(T->d, yaml, "e3.yaml", &err), EZP_ERR_UNSUPPORTED);
	assert_string_equal(err.file, "e3.yaml");
	assert_int_equal(tcp_try_connect(pc), -ECONNREFUSED);
	assert_int_equal(bound_port("p"), pp);
	/* p's new generation cannot be built (its chain fails), after its new listener opened */
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: p\n"
		 "    From: {tcp: {Listen: 127.0.0.1:%u}}\n"
		 "    Through: [{failer: {FailOn: 0}}]\n"
		 "    To: {tcp: {Connect: 127.0.0.1:%u}}\n",
		 pc, sock_port(la));
	assert_int_equal(ezp_daemon_reload(T->d, yaml, "e4.yaml", &err), EZP_ERR_UNSUPPORTED);
	assert_int_equal(tcp_try_connect(pc), -ECONNREFUSED);
	/* through all that, p and its session are untouched */
	assert_int_equal(bound_port("p"), pp);
	send_text(c, "2");
	expect_stream(a, "2", "the session after refused reloads");
	close_fd(tcp_connect(pp));
	accept_wait(la);

	/* Workers cannot change live: said, and the rest applies */
	ezp__log_setup(EZP_LOG_WARN, EZP__LOG_TEXT);
	capture_begin(&cap);
	snprintf(yaml, sizeof(yaml), "Workers: 3\n%s", good);
	assert_int_equal(ezp_daemon_reload(T->d, yaml, NULL, &err), EZP_OK);
	log = capture_end(&cap);
	if (!strstr(log, "Workers changed to 3: takes effect on restart"))
		fail_msg("no warning about Workers:\n%s", log);
	free(log);
	assert_int_equal(((struct ezp_core_ctx *)T->d)->n_workers, 1);
}

/* A daemon that never started: a reload builds pipelines without listening. */
static void test_reload_before_start(void **state)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(1, paths);
	struct ezp_error err = {0};
	struct ezp_session_summary *v = NULL;
	size_t n = 9;

	(void)state;
	current_test = __func__;
	assert_int_equal(ezp_daemon_new("Pipelines: []\n", NULL, &opts, &T->d, &err), EZP_OK);
	assert_int_equal(ezp_daemon_reload(T->d, NULL, NULL, &err), EZP_OK); /* the default */
	assert_int_equal(ezp_pipeline_bound(T->d, "default", &(struct ezp_addr){0}),
			 EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_daemon_sessions(T->d, NULL, &v, &n), EZP_OK);
	assert_int_equal(n, 0);
	free(v);
	assert_int_equal(ezp_daemon_reload(T->d, "Pipelines: []\n", NULL, &err), EZP_OK);
	assert_null(ezp__pipeline_find((struct ezp_core_ctx *)T->d, "default"));
}

/* ==== 4. control.c errors ================================================================== */

static void test_control_unknown_names(void **state)
{
	struct ezp_filter_holder fh = {.struct_size = sizeof(fh), .on_packet = NULL};
	struct ezp_claim *cl = NULL;
	struct ezp_error err = {0};

	(void)state;
	current_test = __func__;
	daemon_make(1, 1, "Pipelines: []\n");
	assert_int_equal(ezp_pipeline_swap_to(T->d, "nope", "tcp: {Connect: 127.0.0.1:9}", 0, &err),
			 EZP_ERR_NOT_FOUND);
	assert_string_equal(err.message, "no pipeline named 'nope'");
	assert_int_equal(ezp_pipeline_swap_to(T->d, NULL, "tcp: {Connect: 127.0.0.1:9}", 0, NULL),
			 EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_pipeline_set_filters(T->d, "nope", "[]", &err), EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_pipeline_set_filters(T->d, "nope", "[]", NULL), EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_pipeline_restart(T->d, "nope", 0, &err), EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_pipeline_restart(T->d, "nope", 1, NULL), EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_filter_claim(T->d, "nope", "callback:x", &fh, &cl, &err),
			 EZP_ERR_NOT_FOUND);
	assert_null(cl);
	assert_int_equal(ezp_pipeline_bound(T->d, "nope", &(struct ezp_addr){0}),
			 EZP_ERR_NOT_FOUND);
	/* sessions that do not exist */
	memset(&err, 0, sizeof(err));
	assert_int_equal(ezp_session_inject(T->d, 424242, EZP_DIR_TO_SERVER, "x", 1, &err),
			 EZP_ERR_NOT_FOUND);
	assert_non_null(strstr(err.message, "cannot inject: not found"));
	assert_int_equal(ezp_session_close(T->d, 424242, &err), EZP_ERR_NOT_FOUND);
	assert_non_null(strstr(err.message, "cannot close: session not found"));
	assert_int_equal(ezp_session_swap_server(T->d, 424242, "127.0.0.1:9", &err),
			 EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_session_swap_server(T->d, 424242, "127.0.0.1:9", NULL),
			 EZP_ERR_NOT_FOUND);
	assert_int_equal(ezp_session_swap_client(T->d, 424242, "127.0.0.1:9", 1, 0, 0, &err),
			 EZP_ERR_NOT_FOUND);
	ezp_claim_release(NULL);
}

static void test_control_pipeline_changes(void **state)
{
	int la = tcp_listener(), c1, a1, c2;
	struct ezp_error err = {0};
	uint16_t old_port;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {tcp: {Connect: 127.0.0.1:%u}}\n",
		    sock_port(la));
	/* swap_to: bad YAML, a transport that cannot connect, one with no address */
	assert_int_equal(ezp_pipeline_swap_to(T->d, "p", "tcp: {Connect: [", 0, &err),
			 EZP_ERR_CONFIG);
	memset(&err, 0, sizeof(err));
	assert_int_equal(
	    ezp_pipeline_swap_to(T->d, "p", "listenonly: {Listen: 127.0.0.1:1}", 0, &err),
	    EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "transport 'listenonly' cannot connect"));
	memset(&err, 0, sizeof(err));
	assert_int_equal(ezp_pipeline_swap_to(T->d, "p", "fake: {Connect: 127.0.0.1:1}", 0, NULL),
			 EZP_ERR_CONFIG);
	assert_int_equal(ezp_pipeline_swap_to(T->d, "p", "fake: {Connect: 127.0.0.1:1}", 0, &err),
			 EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "has no address to connect to"));
	/* set_filters: bad YAML, an unknown filter, one that cannot start */
	assert_int_equal(ezp_pipeline_set_filters(T->d, "p", "[{", &err), EZP_ERR_CONFIG);
	assert_int_equal(ezp_pipeline_set_filters(T->d, "p", "[{nosuch: {}}]", &err),
			 EZP_ERR_CONFIG);
	memset(&err, 0, sizeof(err));
	assert_int_equal(ezp_pipeline_set_filters(T->d, "p", "[{failer: {FailOn: 1}}]", NULL),
			 EZP_ERR_UNSUPPORTED);
	assert_int_equal(ezp_pipeline_set_filters(T->d, "p", "[{failer: {FailOn: 1}}]", &err),
			 EZP_ERR_UNSUPPORTED);
	assert_non_null(strstr(err.message, "could not start"));
	/* nothing of that changed p */
	c1 = tcp_connect(bound_port("p"));
	a1 = accept_wait(la);
	send_text(c1, "ok");
	expect_stream(a1, "ok", "after refused changes");
	/* swap_to for existing sessions too, to a server that is down: they keep theirs */
	{
		struct capture cap;
		char to[64], *log = NULL;
		uint64_t end = mono_ms() + WAIT_MS;
		snprintf(to, sizeof(to), "tcp: {Connect: 127.0.0.1:%u}", free_port());
		ezp__log_setup(EZP_LOG_WARN, EZP__LOG_TEXT);
		capture_begin(&cap);
		assert_int_equal(ezp_pipeline_swap_to(T->d, "p", to, 1, &err), EZP_OK);
		for (;;) { /* the swap fails on the session's worker, later */
			char buf[4096] = "";
			fflush(stderr);
			ssize_t n = pread(fileno(cap.f), buf, sizeof(buf) - 1, 0);
			if ((n > 0 && strstr(buf, "keeps its server")) || mono_ms() > end)
				break;
			poll_pause();
		}
		log = capture_end(&cap);
		ezp__log_setup(EZP_LOG_ERROR, EZP__LOG_TEXT);
		if (!strstr(log, "keeps its server: connect to 127.0.0.1:"))
			fail_msg("a failed swap of an existing session was not logged: '%s'", log);
		free(log);
		send_text(c1, "kept");
		expect_stream(a1, "kept", "the session kept its server");
		snprintf(to, sizeof(to), "tcp: {Connect: 127.0.0.1:%u}", sock_port(la));
		assert_int_equal(ezp_pipeline_swap_to(T->d, "p", to, 0, NULL), EZP_OK);
	}
	/* restart keeping sessions: a new listener (port 0: a new port), the session lives */
	old_port = bound_port("p");
	assert_int_equal(ezp_pipeline_restart(T->d, "p", 0, &err), EZP_OK);
	send_text(c1, "still");
	expect_stream(a1, "still", "the session across a restart");
	c2 = tcp_connect(bound_port("p"));
	accept_wait(la);
	wait_sessions("p", 2);
	/* restart closing sessions */
	assert_int_equal(ezp_pipeline_restart(T->d, "p", 1, NULL), EZP_OK);
	expect_closed(c1, "restart with close_sessions");
	expect_closed(c2, "restart with close_sessions");
	wait_sessions("p", 0);
	(void)old_port;
	/* restart failing: the listener stays as it was */
	struct ezp_daemon *d2 = daemon_make(1, 1,
					    "Pipelines:\n"
					    "  - Name: f\n"
					    "    From: {fake: {Listen: 127.0.0.1:5}}\n"
					    "    To: {tcp: {Connect: 127.0.0.1:9}}\n");
	atomic_store(&fake_listen_fail, 1);
	assert_int_equal(ezp_pipeline_restart(d2, "f", 0, &err), EZP_ERR_IO);
	atomic_store(&fake_listen_fail, 0);
	assert_int_equal(bound_port_of(d2, "f"), 5);
}

/* A TCP session on pipeline "p" to the test's server @lfd; returns the client fd. */
static int tcp_session(int lfd, int *server_fd, struct ezp_session_summary *s)
{
	int c = tcp_connect(bound_port("p"));

	*server_fd = accept_wait(lfd);
	send_text(c, "hi");
	expect_stream(*server_fd, "hi", "a new session");
	*s = session_of(c);
	return c;
}

struct swap_job {
	uint64_t id;
	const char *addr;
	int dial, add;
	unsigned timeout;
	int rc;
	struct ezp_error err;
};

static void *swap_client_main(void *arg)
{
	struct swap_job *j = arg;

	j->rc = ezp_session_swap_client(T->d, j->id, j->addr, j->dial, j->add, j->timeout, &j->err);
	return NULL;
}

static int routes_of(const char *pipeline)
{
	struct ezp__pipeline *p = ezp__pipeline_find((struct ezp_core_ctx *)T->d, pipeline);
	struct ezp__route *r;
	int n = 0;

	pthread_mutex_lock(&p->lock);
	LIST_FOREACH(r, &p->routes, link)
	n++;
	pthread_mutex_unlock(&p->lock);
	return n;
}

static void test_control_session_swaps(void **state)
{
	int la = tcp_listener(), lc = tcp_listener(), c, a, dialed;
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	struct swap_job j;
	pthread_t th;
	char addr[64];
	uint64_t end;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		    "    Limits: {MaxClientLegs: 2}\n",
		    sock_port(la));
	c = tcp_session(la, &a, &s);
	/* a bad address */
	assert_int_equal(ezp_session_swap_server(T->d, s.id, "not an address", &err),
			 EZP_ERR_INVAL);
	assert_true(err.message[0] != 0);
	/* accept mode, nobody comes: the route is taken back */
	memset(&err, 0, sizeof(err));
	assert_int_equal(ezp_session_swap_client(T->d, s.id, "127.0.0.5:0", 0, 1, 950, &err),
			 EZP_ERR_TIMEOUT);
	assert_string_equal(err.message, "no client came from 127.0.0.5:0 in time");
	assert_int_equal(routes_of("p"), 0);
	/* accept mode, and the session ends while waiting: the waiter is told */
	j = (struct swap_job){
	    .id = s.id, .addr = "127.0.0.6:0", .dial = 0, .add = 1, .timeout = 4 * WAIT_MS};
	assert_int_equal(pthread_create(&th, NULL, swap_client_main, &j), 0);
	end = mono_ms() + WAIT_MS;
	while (routes_of("p") == 0 && mono_ms() < end)
		poll_pause();
	assert_int_equal(routes_of("p"), 1);
	/* the session's client is replaced by a dialled one: the old one is closed */
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", sock_port(lc));
	assert_int_equal(ezp_session_swap_client(T->d, s.id, addr, 1, 0, 0, &err), EZP_OK);
	dialed = accept_wait(lc);
	expect_closed(c, "the replaced client leg");
	send_text(dialed, "via-dial");
	expect_stream(a, "via-dial", "the dialled client leg feeds the server");
	send_text(a, "back");
	expect_stream(dialed, "back", "the server answers the dialled leg");
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	pthread_join(th, NULL);
	assert_int_equal(j.rc, EZP_ERR_CLOSED);
	assert_non_null(strstr(j.err.message, "the session ended"));
	assert_int_equal(routes_of("p"), 0);
	/* a second client leg is allowed, a third is over MaxClientLegs */
	c = tcp_session(la, &a, &s);
	assert_int_equal(ezp_session_swap_client(T->d, s.id, addr, 1, 1, 0, &err), EZP_OK);
	accept_wait(lc);
	assert_int_equal(ezp_session_swap_client(T->d, s.id, addr, 1, 1, 0, &err), EZP_ERR_LIMIT);
	(void)c;
}

/* ---- claims ---- */

static int claim_packet(void *userdata, struct ezp_filter_call *call)
{
	(void)userdata;
	(void)call;
	return EZP_VERDICT_PASS;
}

static void claim_released(void *userdata)
{
	counter_bump(userdata);
}

static void test_control_claims(void **state)
{
	static struct counter released;
	struct ezp_filter_holder fh = {.struct_size = sizeof(fh),
				       .name = "first",
				       .userdata = &released,
				       .on_packet = claim_packet,
				       .on_released = claim_released};
	struct ezp_filter_holder small = fh;
	struct ezp_claim *cl = NULL, *cl2 = NULL;
	struct ezp_error err = {0};
	struct ezp_daemon *d;

	(void)state;
	current_test = __func__;
	counter_init(&released);
	/* a daemon that is not started: claims work, release flushes nothing */
	d = daemon_make(1, 0,
			"Pipelines:\n"
			"  - Name: p\n"
			"    From: {udp: {Listen: 127.0.0.1:0}}\n"
			"    Through: [{callback: {Name: x}}]\n"
			"    To: {udp: {Connect: 127.0.0.1:9}}\n");
	assert_int_equal(ezp_filter_claim(d, "p", "callback:x", NULL, &cl, &err), EZP_ERR_INVAL);
	assert_int_equal(
	    ezp_filter_claim(d, "p", "callback:x", &(struct ezp_filter_holder){0}, &cl, NULL),
	    EZP_ERR_INVAL);
	assert_int_equal(ezp_filter_claim(d, "p", "callback:y", &fh, &cl, &err), EZP_ERR_NOT_FOUND);
	assert_string_equal(err.message, "pipeline has no exclusive filter 'callback:y'");
	assert_int_equal(ezp_filter_claim(d, "p", "callback:x", &fh, &cl, &err), EZP_OK);
	/* a holder struct from an older SDK (smaller): what it has is used */
	small.struct_size = offsetof(struct ezp_filter_holder, on_session_event);
	small.name = NULL;
	assert_int_equal(ezp_filter_claim(d, "p", "callback:x", &small, &cl2, &err), EZP_ERR_BUSY);
	assert_string_equal(err.message, "filter held by first");
	assert_null(cl2);
	assert_int_equal(ezp_filter_claim(d, "p", "callback:x", &small, &cl2, NULL), EZP_ERR_BUSY);
	/* released with nothing held: on_released is still called, once */
	ezp_claim_release(cl);
	assert_int_equal(counter_get(&released), 1);
	/* the slot is free again; an anonymous holder takes it */
	assert_int_equal(ezp_filter_claim(d, "p", "callback:x", &small, &cl2, &err), EZP_OK);
	assert_int_equal(ezp_filter_claim(d, "p", "callback:x", &fh, &cl, &err), EZP_ERR_BUSY);
	assert_string_equal(err.message, "filter held by anonymous");
	ezp_claim_release(cl2); /* no on_released in the small struct */
	assert_int_equal(counter_get(&released), 1);
	counter_fini(&released);
}

/* ==== 5. taps ============================================================================= */

static void test_tap_errors_and_filters(void **state)
{
	struct ezp_tap_opts o = {.struct_size = sizeof(o), .on_event = tapc_event};
	int su = udp_sock(0), c1, c2, cq;
	struct ezp_session_summary s1, s2;
	struct ezp_tap *t = NULL;
	struct tapc *by_id, *by_pipe, *all;
	struct sockaddr_in up;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		    "  - Name: q\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		    sock_port(su), sock_port(su));
	assert_int_equal(ezp_tap_subscribe(T->d, NULL, &t), EZP_ERR_INVAL);
	assert_int_equal(ezp_tap_subscribe(T->d, &o, NULL), EZP_ERR_INVAL);
	o.struct_size = offsetof(struct ezp_tap_opts, on_lagged);
	assert_int_equal(ezp_tap_subscribe(T->d, &o, &t), EZP_ERR_INVAL);
	assert_null(t);
	ezp_tap_unsubscribe(NULL);

	c1 = udp_sock(bound_port("p"));
	c2 = udp_sock(bound_port("p"));
	cq = udp_sock(bound_port("q"));
	send_text(c1, "a");
	expect_dgram_from(su, "a", &up, "c1");
	send_text(c2, "b");
	expect_dgram(su, "b", "c2");
	s1 = session_of(c1);
	s2 = session_of(c2);
	by_id = tapc_new();
	by_pipe = tapc_new();
	all = tapc_new();
	tap_add(T->d, by_id, NULL, s2.id, 0, NULL);
	tap_add(T->d, by_pipe, "q", 0, 0, NULL);
	tap_add(T->d, all, NULL, 0, 0, NULL);
	send_text(c1, "c1-1");
	send_text(c2, "c2-1");
	send_text(cq, "q-1");
	for (int i = 0, seen = 0; i < 3; i++) { /* sessions on different workers: any order */
		char buf[16];
		ssize_t n = recv_wait(su, buf, sizeof(buf) - 1, WAIT_MS);
		assert_true(n > 0);
		buf[n] = 0;
		int bit = !strcmp(buf, "c1-1")	 ? 1
			  : !strcmp(buf, "c2-1") ? 2
			  : !strcmp(buf, "q-1")	 ? 4
						 : 8;
		assert_true(bit < 8 && !(seen & bit));
		seen |= bit;
	}
	/* every event reaches `all`; only s2's reach by_id; only q's by_pipe */
	assert_true(tapc_wait(all, &all->packets, 3) >= 3);
	assert_int_equal(tapc_wait(by_id, &by_id->packets, 1), 1);
	assert_int_equal(tapc_wait(by_pipe, &by_pipe->opened, 1), 1);
	assert_int_equal(tapc_wait(by_pipe, &by_pipe->packets, 1), 1);
	quiet_wait();
	pthread_mutex_lock(&by_id->mu);
	for (int i = 0; i < by_id->n; i++)
		assert_int_equal(by_id->sessions[i], s2.id);
	pthread_mutex_unlock(&by_id->mu);
	assert_int_equal(by_pipe->n, 2); /* q's session opened, and its packet */
	(void)s1;
}

static int is_bridged(uint64_t id, int want)
{
	uint64_t end = mono_ms() + WAIT_MS;

	do {
		struct ezp_session_summary *v;
		size_t n = sessions_of(NULL, &v);
		for (size_t i = 0; i < n; i++)
			if (v[i].id == id && v[i].bridged == want) {
				free(v);
				return 1;
			}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	return 0;
}

static void test_tap_fast_path_and_leftovers(void **state)
{
	const struct ezp_core *core;
	int la = tcp_listener(), c, a, su = udp_sock(0), cu;
	struct ezp_session_summary s;
	struct ezp_tap *tap = NULL;
	struct tapc *tc = tapc_new(), *left = tapc_new();
	struct ezp_tap_opts o = {
	    .struct_size = sizeof(o), .pipeline = "t", .userdata = tc, .on_event = tapc_event};
	struct ezp_daemon *d2;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: t\n"
		    "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {tcp: {Connect: 127.0.0.1:%u}}\n",
		    sock_port(la));
	core = ezp_daemon_core(T->d);
	c = tcp_connect(bound_port("t"));
	a = accept_wait(la);
	send_text(c, "zero-copy");
	expect_stream(a, "zero-copy", "before any tap");
	s = session_of(c);
	assert_true(is_bridged(s.id, 1));
	/* a tap that wants the session takes it off the fast path (through the table) */
	assert_int_equal(core->tap_subscribe(core->ctx, &o, &tap), EZP_OK);
	assert_true(is_bridged(s.id, 0));
	send_text(c, "tapped");
	expect_stream(a, "tapped", "while tapped");
	assert_true(tapc_wait(tc, &tc->packets, 1) >= 1);
	core->tap_unsubscribe(tap);
	assert_true(is_bridged(s.id, 1));
	send_text(a, "back");
	expect_stream(c, "back", "bridged again");

	/* a daemon freed with a tap still subscribed frees it too (ASan/valgrind) */
	d2 = daemon_make(1, 1,
			 "Pipelines:\n"
			 "  - Name: u\n"
			 "    From: {udp: {Listen: 127.0.0.1:0}}\n"
			 "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
			 sock_port(su));
	struct ezp_tap_opts o2 = {
	    .struct_size = sizeof(o2), .userdata = left, .on_event = tapc_event};
	struct ezp_tap *t2 = NULL;
	assert_int_equal(ezp_tap_subscribe(d2, &o2, &t2), EZP_OK);
	cu = udp_sock(bound_port_of(d2, "u"));
	send_text(cu, "x");
	expect_dgram(su, "x", "x");
	assert_true(tapc_wait(left, &left->packets, 1) >= 1);
	(void)t2; /* left subscribed on purpose */
}

static struct ezp_tap *last_subscribed;

static void subscribe_on_worker(void *arg)
{
	if (ezp_tap_subscribe(T->d, arg, &last_subscribed) != EZP_OK)
		last_subscribed = NULL;
}

static void unsubscribe_on_worker(void *arg)
{
	ezp_tap_unsubscribe(arg);
}

static void test_tap_default_capacity_and_queued(void **state)
{
	struct ezp_core_ctx *ctx;
	struct ezp_worker *sw, *other;
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	int su = udp_sock(0), c;
	struct tapc *tc, *tc2;
	struct ezp_tap *t2;
	struct gate g;
	char msg[16];

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Limits: {TapBuffer: 16}\n"
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		    sock_port(su));
	ctx = (struct ezp_core_ctx *)T->d;
	c = udp_sock(bound_port("p"));
	send_text(c, "hello");
	expect_dgram(su, "hello", "hello");
	s = session_of(c);
	sw = ezp__session_worker(ctx, s.id);
	assert_non_null(sw);
	other = ctx->workers[sw == ctx->workers[0] ? 1 : 0];

	/* capacity 0 means Limits.TapBuffer (16): with its delivery worker blocked, a tap
	 * keeps the newest 16 events and reports the rest as lagged */
	tc = tapc_new();
	tap_add(T->d, tc, "p", 0, 0, other);
	gate_close_on(&g, other);
	for (int i = 0; i < 40; i++) {
		snprintf(msg, sizeof(msg), "i%02d", i);
		assert_int_equal(
		    ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, msg, strlen(msg), &err),
		    EZP_OK);
	}
	gate_open(&g);
	assert_int_equal(tapc_wait(tc, &tc->packets, 16), 16);
	assert_int_equal(tapc_wait(tc, &tc->lagged_calls, 1), 1);
	quiet_wait();
	assert_int_equal(tc->packets, 16);
	assert_int_equal(tc->lagged, 24);
	assert_int_equal(tc->last_seq, 40); /* the sequence counts the lost ones */
	gate_fini(&g);

	/* unsubscribing (from a worker) while events wait for delivery: none is delivered */
	tc2 = tapc_new();
	t2 = tap_add(T->d, tc2, "p", 0, 0, other);
	gate_close_on(&g, other);
	for (int i = 0; i < 5; i++)
		assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "q", 1, &err),
				 EZP_OK);
	for (int i = 0; i < T->n_taps; i++)
		if (T->taps[i] == t2)
			T->taps[i] = T->taps[--T->n_taps];
	assert_int_equal(ezp__worker_call(sw, unsubscribe_on_worker, t2), EZP_OK);
	gate_open(&g);
	/* the drain and the deferred view refresh run on `other` now */
	assert_int_equal(ezp__worker_call(other, noop_fn, NULL), EZP_OK);
	assert_int_equal(ezp__worker_call(sw, noop_fn, NULL), EZP_OK);
	assert_int_equal(tc2->n, 0);
	gate_fini(&g);
	/* subscribing from a worker: the views refresh later, and then it sees traffic */
	struct tapc *tc3 = tapc_new();
	static struct ezp_tap *t3;
	static struct ezp_tap_opts o3;
	o3 = (struct ezp_tap_opts){
	    .struct_size = sizeof(o3), .pipeline = "p", .userdata = tc3, .on_event = tapc_event};
	assert_int_equal(ezp__worker_call(sw, subscribe_on_worker, &o3), EZP_OK);
	t3 = last_subscribed;
	assert_non_null(t3);
	T->taps[T->n_taps++] = t3;
	assert_int_equal(ezp__worker_call(sw, noop_fn, NULL), EZP_OK);
	send_text(c, "seen");
	expect_dgram(su, "seen", "seen");
	assert_true(tapc_wait(tc3, &tc3->packets, 1) >= 1);
}

/* ==== 6. the services table ================================================================ */

static void log_through_table(void *arg)
{
	const struct ezp_core *core = arg;

	core->log(EZP_LOG_WARN, "plugin", "from a plugin: %d", 7);
}

static void bump_fn(void *arg)
{
	counter_bump(arg);
}

/* State for the table's worker entries (a watch lives on its worker). */
static struct {
	const struct ezp_core *core;
	struct ezp_worker *w;
	struct ezp_watch *watch;
	struct counter c;
	int pp[2];
} TW;

static void table_watch_cb(int fd, unsigned events, void *arg)
{
	char b;

	(void)arg;
	if (events & EZP_WATCH_READ && read(fd, &b, 1) == 1) {
		TW.core->watch_set(TW.watch, 0);
		counter_bump(&TW.c);
	}
}

static void table_watch_add(void *arg)
{
	(void)arg; /* (no cmocka asserts on a worker thread) */
	if (TW.core->worker_current() == TW.w)
		TW.watch = TW.core->watch_add(TW.w, TW.pp[0], EZP_WATCH_READ, table_watch_cb, NULL);
}

static void table_watch_free(void *arg)
{
	(void)arg;
	TW.core->watch_free(TW.watch);
	TW.watch = NULL;
}

static void test_services_table(void **state)
{
	const struct ezp_core *core;
	struct ezp_error err = {0};
	struct ezp_addr a;
	struct capture cap;
	char buf[EZP_ADDR_STRLEN], *log;
	struct ezp_packet *p, *q;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1, "Pipelines: []\n");
	core = ezp_daemon_core(T->d);
	assert_int_equal(core->struct_size, sizeof(struct ezp_core));
	assert_int_equal(core->abi_major, EZP_ABI_MAJOR);
	assert_ptr_equal(core->ctx, (struct ezp_core_ctx *)T->d);

	/* addresses */
	assert_int_equal(core->addr_parse("127.0.0.1:80", &a, &err), EZP_OK);
	assert_string_equal(core->addr_format(&a, buf, sizeof(buf)), "127.0.0.1:80");
	assert_int_equal(core->addr_parse("[::1]:443", &a, NULL), EZP_OK);
	assert_string_equal(core->addr_format(&a, buf, sizeof(buf)), "[::1]:443");
	assert_int_not_equal(core->addr_parse("not-an-address", &a, NULL), EZP_OK);
	assert_int_not_equal(core->addr_parse("1.2.3.4:99999", &a, &err), EZP_OK);
	assert_true(err.message[0] != 0);

	/* logging: the level is the daemon's */
	ezp__log_setup(EZP_LOG_WARN, EZP__LOG_TEXT);
	assert_false(core->log_enabled(EZP_LOG_INFO));
	assert_true(core->log_enabled(EZP_LOG_ERROR));
	capture_begin(&cap);
	log_through_table((void *)core);
	core->log(EZP_LOG_INFO, "plugin", "filtered");
	log = capture_end(&cap);
	if (!strstr(log, "warn  [plugin] from a plugin: 7\n") || strstr(log, "filtered"))
		fail_msg("logging through the table: '%s'", log);
	free(log);

	/* packets */
	p = core->packet_new(4);
	memcpy(p->data, "abcd", 4);
	q = core->packet_ref(p);
	q = core->packet_make_writable(q); /* shared: a copy */
	assert_ptr_not_equal(q, p);
	q = core->packet_resize(q, 2);
	assert_int_equal(q->len, 2);
	core->packet_unref(q);
	core->packet_unref(p);
	static char foreign[] = "foreign";
	p = core->packet_wrap(foreign, 7, NULL, NULL);
	assert_ptr_equal(p->data, foreign);
	core->packet_unref(p);

	/* workers */
	assert_null(core->worker_current());
	assert_int_equal(core->worker_index(((struct ezp_core_ctx *)T->d)->workers[1]), 1);
	assert_true(core->now_us() > 1600000000000000ull);
	assert_null(core->find_service(core->ctx, "ezp.auth", 1));
	counter_init(&TW.c);
	TW.core = core;
	TW.w = ((struct ezp_core_ctx *)T->d)->workers[1];
	assert_int_equal(core->defer(TW.w, bump_fn, &TW.c), EZP_OK);
	assert_int_equal(counter_wait(&TW.c, 1), 1);
	assert_ptr_equal(TW.c.on, TW.w);
	/* an fd watch through the table, on a worker */
	assert_int_equal(pipe2(TW.pp, O_CLOEXEC | O_NONBLOCK), 0);
	assert_int_equal(ezp__worker_call(TW.w, table_watch_add, NULL), EZP_OK);
	assert_non_null(TW.watch);
	assert_int_equal(write(TW.pp[1], "x", 1), 1);
	assert_int_equal(counter_wait(&TW.c, 2), 2);
	assert_int_equal(ezp__worker_call(TW.w, table_watch_free, NULL), EZP_OK);
	close(TW.pp[0]);
	close(TW.pp[1]);
	counter_fini(&TW.c);
}

/* ---- by id, with done callbacks ---- */

static void test_services_by_id(void **state)
{
	const struct ezp_core *core;
	struct ezp_core_ctx *ctx;
	int su = udp_sock(0), c;
	struct ezp_session_summary s;
	struct counter done;
	char big[300];

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		    "    Limits: {MaxInjectBytes: 256}\n",
		    sock_port(su));
	core = ezp_daemon_core(T->d);
	ctx = core->ctx;
	c = udp_sock(bound_port("p"));
	send_text(c, "hi");
	expect_dgram(su, "hi", "hi");
	s = session_of(c);
	counter_init(&done);

	/* unknown session: refused at once, the done callback is not called */
	assert_int_equal(core->inject(ctx, 999999, EZP_DIR_TO_CLIENT, "x", 1, counter_done, &done),
			 EZP_ERR_NOT_FOUND);
	assert_int_equal(core->close(ctx, 999999, counter_done, &done), EZP_ERR_NOT_FOUND);
	/* a good injection: done(OK) on the session's worker */
	assert_int_equal(core->inject(ctx, s.id, EZP_DIR_TO_CLIENT, "inj", 3, counter_done, &done),
			 EZP_OK);
	assert_int_equal(counter_wait(&done, 1), 1);
	assert_int_equal(done.status, EZP_OK);
	assert_ptr_equal(done.on, ezp__session_worker(ctx, s.id));
	expect_dgram(c, "inj", "injected by id");
	/* no done callback at all */
	assert_int_equal(core->inject(ctx, s.id, EZP_DIR_TO_SERVER, "nd", 2, NULL, NULL), EZP_OK);
	expect_dgram(su, "nd", "injected without a done callback");
	/* a bad direction, and too many bytes: done tells why */
	assert_int_equal(core->inject(ctx, s.id, 5, "x", 1, counter_done, &done), EZP_OK);
	assert_int_equal(counter_wait(&done, 2), 2);
	assert_int_equal(done.status, EZP_ERR_INVAL);
	assert_string_equal(done.msg, "invalid direction or session closing");
	memset(big, 'b', sizeof(big));
	assert_int_equal(
	    core->inject(ctx, s.id, EZP_DIR_TO_SERVER, big, sizeof(big), counter_done, &done),
	    EZP_OK);
	assert_int_equal(counter_wait(&done, 3), 3);
	assert_int_equal(done.status, EZP_ERR_LIMIT);
	assert_string_equal(done.msg,
			    "300 bytes is over the injection limit (Limits.MaxInjectBytes is 256)");
	struct ezp_error err = {0};
	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_SERVER, big, sizeof(big), &err),
			 EZP_ERR_LIMIT);
	assert_non_null(strstr(err.message, "over the injection limit"));
	/* close by id */
	assert_int_equal(core->close(ctx, s.id, counter_done, &done), EZP_OK);
	assert_int_equal(counter_wait(&done, 4), 4);
	assert_int_equal(done.status, EZP_OK);
	wait_sessions("p", 0);
	/* the session is gone: by id it is not found any more */
	assert_int_equal(core->close(ctx, s.id, counter_done, &done), EZP_ERR_NOT_FOUND);
	counter_fini(&done);
}

/* ---- on the session's worker ---- */

struct on_worker {
	uint64_t id;
	const struct ezp_core *core;
	struct ezp_session_info info;
	int found, rc_big, rc_dir, rc_clamp, rc_closing;
};

static void on_session_worker(void *arg)
{
	struct on_worker *o = arg;
	const struct ezp_core *core = o->core;
	struct ezp_session *s = ezp__session_find_local(ezp__worker_current(), o->id);

	if (!(o->found = s != NULL))
		return;
	core->session_info(s, &o->info);
	o->rc_big = core->session_inject(s, EZP_DIR_TO_CLIENT, core->packet_new(4096), -1);
	o->rc_dir = core->session_inject(s, 3, core->packet_new(1), -1);
	/* an index past the chain: straight to the leg */
	struct ezp_packet *p = core->packet_new(5);
	memcpy(p->data, "after", 5);
	o->rc_clamp = core->session_inject(s, EZP_DIR_TO_CLIENT, p, 7);
}

static void close_on_session_worker(void *arg)
{
	struct on_worker *o = arg;
	const struct ezp_core *core = o->core;
	struct ezp_session *s = ezp__session_find_local(ezp__worker_current(), o->id);

	if (!(o->found = s != NULL))
		return;
	/* closed (but still being torn down): injections are refused */
	ezp__session_enter(s);
	core->session_close(s, EZP_CLOSE_API, "closed through the table");
	o->rc_closing = core->session_inject(s, EZP_DIR_TO_CLIENT, core->packet_new(1), -1);
	ezp__session_leave(s);
}

static void test_services_on_worker(void **state)
{
	int su = udp_sock(0), c;
	struct ezp_session_summary s;
	struct on_worker o;
	struct tapc *tc;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		    "    Limits: {MaxInjectBytes: 1024}\n",
		    sock_port(su));
	tc = tapc_new();
	tap_add(T->d, tc, "p", 0, 0, NULL);
	c = udp_sock(bound_port("p"));
	send_text(c, "12345");
	expect_dgram(su, "12345", "first");
	s = session_of(c);
	memset(&o, 0, sizeof(o));
	o.id = s.id;
	o.core = ezp_daemon_core(T->d);
	assert_int_equal(ezp__worker_call(ezp__session_worker((struct ezp_core_ctx *)T->d, s.id),
					  on_session_worker, &o),
			 EZP_OK);
	assert_true(o.found);
	assert_int_equal(o.info.id, s.id);
	assert_string_equal(o.info.pipeline, "p");
	assert_string_equal(o.info.transport, "udp");
	assert_int_equal(o.info.n_clients, 1);
	assert_int_equal(o.info.bytes[EZP_DIR_TO_SERVER], 5);
	assert_int_equal(o.info.packets[EZP_DIR_TO_SERVER], 1);
	assert_int_equal(o.rc_big, EZP_ERR_LIMIT);
	assert_int_equal(o.rc_dir, EZP_ERR_INVAL);
	assert_int_equal(o.rc_clamp, EZP_OK);
	expect_dgram(c, "after", "injected past the chain");
	assert_int_equal(ezp__worker_call(ezp__session_worker((struct ezp_core_ctx *)T->d, s.id),
					  close_on_session_worker, &o),
			 EZP_OK);
	assert_true(o.found);
	assert_int_equal(o.rc_closing, EZP_ERR_CLOSED);
	assert_int_equal(tapc_wait(tc, &tc->closed, 1), 1);
	assert_string_equal(tc->close_text, "closed through the table");
	wait_sessions("p", 0);
}

/* ==== 7. the old program's config as a daemon =============================================== */

static void test_legacy_daemon(void **state)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(2, paths);
	struct ezp_error err = {0};
	int lt = -1, su = -1, c, a, cu;
	uint16_t port = 0;
	char yaml[512], *dump;

	(void)state;
	current_test = __func__;
	/* one server port for both networks, as the old program had */
	for (int tries = 0; tries < 20 && su < 0; tries++) {
		struct sockaddr_in me;
		lt = tcp_listener();
		port = sock_port(lt);
		me = loopback(port);
		su = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (bind(su, (struct sockaddr *)&me, sizeof(me)) != 0) {
			close(su);
			su = -1;
			close_fd(lt);
		}
	}
	assert_true(su >= 0);
	track_fd(su);
	snprintf(yaml, sizeof(yaml),
		 "ProxyAddress: {Address: 127.0.0.1, Port: 0}\n"
		 "ServerAddress: {Address: 127.0.0.1, Port: %u}\n"
		 "Logging: {Level: error}\n",
		 port);
	assert_int_equal(ezp_daemon_new(yaml, "old.yaml", &opts, &T->d, &err), EZP_OK);
	assert_int_equal(ezp_daemon_start(T->d, &err), EZP_OK);
	dump = ezp_daemon_config_dump(T->d);
	if (!strstr(dump, "Name: \"default\"\n") || !strstr(dump, "Name: \"default-udp\"\n"))
		fail_msg("the old form is not two pipelines:\n%s", dump);
	free(dump);
	c = tcp_connect(bound_port("default"));
	a = accept_wait(lt);
	send_text(c, "tcp-old");
	expect_stream(a, "tcp-old", "the old form's tcp pipeline");
	send_text(a, "back");
	expect_stream(c, "back", "and back");
	cu = udp_sock(bound_port("default-udp"));
	send_text(cu, "udp-old");
	expect_dgram(su, "udp-old", "the old form's udp pipeline");
	/* reloading the same old form changes nothing */
	assert_int_equal(ezp_daemon_reload(T->d, yaml, "old.yaml", &err), EZP_OK);
	send_text(c, "again");
	expect_stream(a, "again", "after the reload");
}

/* ==== 8. sessions: shared legs, repoint, IPv6 routes ====================================== */

static void test_shared_tcp_legs(void **state)
{
	int la = tcp_listener(), a, c1, c2, c3, c4;
	struct ezp_session_summary s;
	struct linger lg = {1, 0};

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		    "    Shared: true\n"
		    "    Limits: {MaxClientLegs: 3}\n",
		    sock_port(la));
	c1 = tcp_connect(bound_port("p"));
	a = accept_wait(la);
	send_text(c1, "one;");
	expect_stream(a, "one;", "first leg");
	s = session_of(c1);
	c2 = tcp_connect(bound_port("p"));
	c3 = tcp_connect(bound_port("p"));
	uint64_t end = mono_ms() + WAIT_MS;
	do {
		s = wait_sessions("p", 1);
		if (s.n_clients < 3)
			poll_pause();
	} while (s.n_clients < 3 && mono_ms() < end);
	assert_int_equal(s.n_clients, 3);
	/* a fourth client is over MaxClientLegs: it is closed, the session goes on */
	c4 = tcp_connect(bound_port("p"));
	expect_closed(c4, "a client over MaxClientLegs");
	send_text(a, "all;");
	expect_stream(c1, "all;", "to leg 0");
	expect_stream(c2, "all;", "to leg 1");
	expect_stream(c3, "all;", "to leg 2");
	/* a leg that ends (FIN) leaves; the others stay */
	assert_int_equal(shutdown(c2, SHUT_WR), 0);
	end = mono_ms() + WAIT_MS;
	do {
		s = wait_sessions("p", 1);
		if (s.n_clients != 2)
			poll_pause();
	} while (s.n_clients != 2 && mono_ms() < end);
	assert_int_equal(s.n_clients, 2);
	/* a leg that is reset leaves too */
	setsockopt(c3, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
	close_fd(c3);
	end = mono_ms() + WAIT_MS;
	do {
		s = wait_sessions("p", 1);
		if (s.n_clients != 1)
			poll_pause();
	} while (s.n_clients != 1 && mono_ms() < end);
	assert_int_equal(s.n_clients, 1);
	send_text(c1, "last;");
	expect_stream(a, "last;", "the remaining leg");
	send_text(a, "only;");
	expect_stream(c1, "only;", "only leg 0 now");
}

static void test_udp_repoint_and_routes(void **state)
{
	int su = udp_sock(0), su2 = udp_sock(0), c, c2, c6, s6;
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	char addr[80];

	(void)state;
	current_test = __func__;
	s6 = udp6_sock(0);
	daemon_make(1, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		    "  - Name: v6\n"
		    "    From: {udp: {Listen: '[::1]:0'}}\n"
		    "    To: {udp: {Connect: '[::1]:%u'}}\n",
		    sock_port(su), sock_port(s6));
	c = udp_sock(bound_port("p"));
	send_text(c, "a");
	expect_dgram(su, "a", "a");
	s = session_of(c);
	/* a datagram server swap re-points the upstream */
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", sock_port(su2));
	assert_int_equal(ezp_session_swap_server(T->d, s.id, addr, &err), EZP_OK);
	send_text(c, "b");
	expect_dgram(su2, "b", "after the server swap");
	/* the client re-pointed to one address twice: the newer route replaces the older */
	c2 = udp_sock(0);
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", sock_port(c2));
	assert_int_equal(ezp_session_swap_client(T->d, s.id, addr, 0, 0, 0, &err), EZP_OK);
	assert_int_equal(routes_of("p"), 1);
	assert_int_equal(ezp_session_swap_client(T->d, s.id, addr, 0, 0, 0, &err), EZP_OK);
	assert_int_equal(routes_of("p"), 1); /* one route per address: the newest */
	struct sockaddr_in to = loopback(bound_port("p"));
	assert_int_equal(sendto(c2, "c2", 2, 0, (struct sockaddr *)&to, sizeof(to)), 2);
	expect_dgram(su2, "c2", "the re-pointed client is the session's");
	wait_sessions("p", 1);
	/* IPv6: sessions and routes by v6 address */
	c6 = udp6_sock(bound_port("v6"));
	send_text(c6, "six");
	expect_dgram(s6, "six", "over IPv6");
	s = session_of(c6);
	int c6b = udp6_sock(0);
	snprintf(addr, sizeof(addr), "[::1]:%u", sock_port(c6b));
	assert_int_equal(ezp_session_swap_client(T->d, s.id, addr, 0, 0, 0, &err), EZP_OK);
	struct sockaddr_in6 to6;
	memset(&to6, 0, sizeof(to6));
	to6.sin6_family = AF_INET6;
	to6.sin6_addr = in6addr_loopback;
	to6.sin6_port = htons(bound_port("v6"));
	assert_int_equal(sendto(c6b, "six-b", 5, 0, (struct sockaddr *)&to6, sizeof(to6)), 5);
	expect_dgram(s6, "six-b", "the re-pointed v6 client");
	wait_sessions("v6", 1);
	/* another v6 client is checked against that route, and gets a session of its own */
	int c6c = udp6_sock(bound_port("v6"));
	send_text(c6c, "six-c");
	expect_dgram(s6, "six-c", "a second v6 client");
	wait_sessions("v6", 2);
	/* a v4 client never matches a v6 route */
	expect_quiet(c, "nothing for c");
}

/* ---- accept mode: replace, add past the limit; injections after a half-close ---- */

static int tcp_connect_from(const char *ip, uint16_t port)
{
	int fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
	struct sockaddr_in me = loopback(0), to = loopback(port);

	inet_pton(AF_INET, ip, &me.sin_addr);
	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	if (connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0)
		fail_msg("connect from %s: %s", ip, strerror(errno));
	return fd;
}

static void wait_routes(const char *pipeline, int want)
{
	uint64_t end = mono_ms() + WAIT_MS;

	while (routes_of(pipeline) != want && mono_ms() < end)
		poll_pause();
	assert_int_equal(routes_of(pipeline), want);
}

static void test_accept_mode_legs(void **state)
{
	int la = tcp_listener(), c1, a, c2, c3, c4, a2, c5;
	struct ezp_session_summary s, s2;
	struct ezp_error err = {0};
	struct swap_job j1, j2, j3, j4;
	pthread_t t1, t2, t3, t4;

	(void)state;
	current_test = __func__;
	daemon_make(2, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		    "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		    "    Limits: {MaxClientLegs: 2}\n",
		    sock_port(la));
	c1 = tcp_session(la, &a, &s);
	/* replace: the next client from 127.0.0.9 takes over the client leg */
	j1 = (struct swap_job){.id = s.id, .addr = "127.0.0.9:0", .timeout = 4 * WAIT_MS};
	assert_int_equal(pthread_create(&t1, NULL, swap_client_main, &j1), 0);
	wait_routes("p", 1);
	c2 = tcp_connect_from("127.0.0.9", bound_port("p"));
	pthread_join(t1, NULL);
	assert_int_equal(j1.rc, EZP_OK);
	expect_closed(c1, "the replaced client");
	send_text(c2, "new-client");
	expect_stream(a, "new-client", "from the client that took over");
	send_text(a, "to-new");
	expect_stream(c2, "to-new", "to the client that took over");
	/* add: two waiters for the one free leg; the second client is over the limit */
	j2 =
	    (struct swap_job){.id = s.id, .addr = "127.0.0.10:0", .add = 1, .timeout = 4 * WAIT_MS};
	j3 =
	    (struct swap_job){.id = s.id, .addr = "127.0.0.11:0", .add = 1, .timeout = 4 * WAIT_MS};
	assert_int_equal(pthread_create(&t2, NULL, swap_client_main, &j2), 0);
	assert_int_equal(pthread_create(&t3, NULL, swap_client_main, &j3), 0);
	wait_routes("p", 2);
	c3 = tcp_connect_from("127.0.0.10", bound_port("p"));
	pthread_join(t2, NULL);
	assert_int_equal(j2.rc, EZP_OK);
	c4 = tcp_connect_from("127.0.0.11", bound_port("p"));
	pthread_join(t3, NULL);
	assert_int_equal(j3.rc, EZP_ERR_LIMIT);
	assert_non_null(strstr(j3.err.message, "too many client legs (MaxClientLegs)"));
	expect_closed(c4, "the client over the limit");
	send_text(a, "both;");
	expect_stream(c2, "both;", "leg 0");
	expect_stream(c3, "both;", "leg 1");
	/* a second session with a pending route outlives the first one's close */
	c5 = tcp_session(la, &a2, &s2);
	j4 = (struct swap_job){
	    .id = s2.id, .addr = "127.0.0.12:0", .add = 1, .timeout = 4 * WAIT_MS};
	assert_int_equal(pthread_create(&t4, NULL, swap_client_main, &j4), 0);
	wait_routes("p", 1);
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	assert_int_equal(routes_of("p"), 1);
	assert_int_equal(ezp_session_close(T->d, s2.id, &err), EZP_OK);
	pthread_join(t4, NULL);
	assert_int_equal(j4.rc, EZP_ERR_CLOSED);
	(void)c5;
}

static void test_inject_after_half_close(void **state)
{
	int la = tcp_listener(), c, a;
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	char buf[16];

	(void)state;
	current_test = __func__;
	daemon_make(1, 1,
		    "Pipelines:\n"
		    "  - Name: p\n"
		    "    From: {tcp: {Listen: 127.0.0.1:0}}\n"
		    "    Through: [{callback: {Name: k}}]\n"
		    "    To: {tcp: {Connect: 127.0.0.1:%u}}\n"
		    "    Shared: true\n",
		    sock_port(la));
	/* the client is done sending: bytes injected toward the server go nowhere */
	c = tcp_session(la, &a, &s);
	assert_int_equal(shutdown(c, SHUT_WR), 0);
	assert_int_equal(recv_wait(a, buf, sizeof(buf), WAIT_MS), 0);
	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_SERVER, "late", 4, &err),
			 EZP_OK);
	send_text(a, "open;");
	expect_stream(c, "open;", "the other half is still open");
	assert_int_equal(shutdown(a, SHUT_WR), 0);
	assert_int_equal(recv_wait(c, buf, sizeof(buf), WAIT_MS), 0);
	wait_sessions("p", 0);
	/* the server is done sending: bytes injected toward the client go nowhere */
	c = tcp_session(la, &a, &s);
	assert_int_equal(shutdown(a, SHUT_WR), 0);
	assert_int_equal(recv_wait(c, buf, sizeof(buf), WAIT_MS), 0);
	assert_int_equal(ezp_session_inject(T->d, s.id, EZP_DIR_TO_CLIENT, "late", 4, &err),
			 EZP_OK);
	send_text(c, "open;");
	expect_stream(a, "open;", "the other half is still open");
	assert_int_equal(shutdown(c, SHUT_WR), 0);
	assert_int_equal(recv_wait(a, buf, sizeof(buf), WAIT_MS), 0);
	wait_sessions("p", 0);
}

/*
 * tap.c: a tap subscribed before ezp_daemon_start() never sees anything.
 * taps_changed() skips the workers' view refresh while !d->started, and
 * ezp_daemon_start() does not refresh the views either, so the workers'
 * tap lists stay empty.
 */
static void test_bug_tap_before_start(void **state)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(1, paths);
	struct ezp_error err = {0};
	int su = udp_sock(0), c;
	struct tapc *tc;
	char yaml[512];

	(void)state;
	current_test = __func__;
	snprintf(yaml, sizeof(yaml),
		 "Pipelines:\n"
		 "  - Name: p\n"
		 "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		 "    To: {udp: {Connect: 127.0.0.1:%u}}\n",
		 sock_port(su));
	assert_int_equal(ezp_daemon_new(yaml, NULL, &opts, &T->d, &err), EZP_OK);
	tc = tapc_new();
	tap_add(T->d, tc, NULL, 0, 0, NULL);
	assert_int_equal(ezp_daemon_start(T->d, &err), EZP_OK);
	c = udp_sock(bound_port("p"));
	send_text(c, "x");
	expect_dgram(su, "x", "x");
	if (tapc_wait(tc, &tc->opened, 1) != 1)
		fail_msg("a tap subscribed before start saw no session_opened");
}

/*
 * control.c swap_post(): an unknown session id gives the message
 * "session  not found" (fail_msg with "session %s not found" and ""): the
 * id is missing, and there are two spaces.
 */
static void test_bug_swap_unknown_session_message(void **state)
{
	struct ezp_error err = {0};

	(void)state;
	current_test = __func__;
	daemon_make(1, 1, "Pipelines: []\n");
	assert_int_equal(ezp_session_swap_server(T->d, 424242, "127.0.0.1:9", &err),
			 EZP_ERR_NOT_FOUND);
	if (!strstr(err.message, "424242"))
		fail_msg("the error for an unknown session does not name it: '%s'", err.message);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_worker_defer_many_threads, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_worker_call_and_each, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_worker_stop_destroy, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_timers, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_watches, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_loader_scan_fixtures, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_loader_default_paths, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_loader_kind_checks, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_daemon_new_errors, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_daemon_pipeline_build_errors, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_daemon_start_port_taken, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_daemon_autostart_service, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_daemon_api_services, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_reload_diff, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_reload_errors_rollback, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_reload_before_start, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_control_unknown_names, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_control_pipeline_changes, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_control_session_swaps, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_control_claims, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_tap_errors_and_filters, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_tap_default_capacity_and_queued, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_tap_fast_path_and_leftovers, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_services_table, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_services_by_id, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_services_on_worker, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_legacy_daemon, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_shared_tcp_legs, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_udp_repoint_and_routes, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_accept_mode_legs, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_inject_after_half_close, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bug_tap_before_start, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bug_swap_unknown_session_message, setup, teardown),
	};
	const char *preload = getenv("LD_PRELOAD");

	if (preload && strstr(preload, "vgpreload")) /* valgrind: everything is slower */
		slow = 10;
	signal(SIGPIPE, SIG_IGN);
	if (getenv("EZP_TEST_FILTER")) /* e.g. EZP_TEST_FILTER='test_timers' */
		cmocka_set_test_filter(getenv("EZP_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
