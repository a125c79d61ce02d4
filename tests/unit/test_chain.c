/*
 * test_chain.c - the filter chain (chain.c, and the session code it drives)
 * through a real embedded daemon. The test registers its own filter plugin,
 * `script`, with ezp__registry_add_builtin: each instance has a Name, and
 * obeys directives carried in the packet itself,
 *
 *     "#f1=hold,f2=repl:NEW|body"
 *
 * (the part between '#' and '|'; packets without a leading '#' pass). The
 * actions are pass, drop, repl:TEXT (same directives, new body), replnull
 * (REPLACE with no packet), hold (answered by the test, or by timeout),
 * inj:TEXT / injall:TEXT / injbad (session_inject after this filter / past
 * every filter / to a bad direction), default (EZP_VERDICT_DEFAULT), weird (an unknown
 * verdict value),
 * passrepl (PASS with a replacement left set) and close (session_close from
 * inside the callback). Every packet and session event a filter sees is
 * recorded; per-session state is allocated at OPENED and freed at CLOSED so
 * ASan and valgrind prove every session gets both.
 *
 * The test owns both ends: its own client sockets and its own server sockets
 * (no echo threads), so it decides what arrives when. Threads: the test's
 * (control); filter callbacks and taps run on the daemon's workers and touch
 * only the state under S.mu. Every wait has a deadline and waits for an
 * event or a condition, never a fixed sleep; "nothing arrives" is watched
 * for QUIET_MS.
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
#define QUIET_MS 250	      /* how long "nothing arrives" is watched */

#include "net.h" /* after WAIT_MS: its expect_* helpers wait that long */

static const char *volatile current_test = "?";
static int big_rcvbuf = 1; /* SO_RCVBUFFORCE worked */

/* ---- time ------------------------------------------------------------------------- */

/* ---- the `script` filter plugin ------------------------------------------------------ */

#define MAX_NAMES 8
#define MAX_SEEN 1024

struct seen {
	int name; /* index into S.names */
	int dir, leg;
	uint32_t flags;
	uint64_t session_id, ts_us;
	size_t len;
	char data[96];
	uint64_t at_ms;
};

struct held {
	int name;
	uint64_t id;
	int dir;
	char data[96];
	uint64_t at_ms;
};

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	char names[MAX_NAMES][16];
	int n_names;
	struct seen seen[MAX_SEEN];
	int n_seen;	 /* recorded (capped at MAX_SEEN) */
	long total_seen; /* every packet seen */
	long bytes_seen;
	struct held holds[256];
	int n_holds;
	int events[MAX_NAMES][4]; /* [name][enum ezp_session_event] */
	int inject_rc[16];
	int n_inject_rc;
	int state_missing; /* a packet or event came without OPENED first */
	int state_twice;   /* OPENED twice for one session state */
	int creates, destroys;
	int live_states; /* allocated at OPENED, freed at CLOSED */
} S;

struct script_conf {
	char *name;
};

struct script_inst {
	const struct ezp_core *core;
	int name;
	unsigned index;
};

static struct ezp_stage *sleepy_stage; /* the last `sleepy` stage created (S.mu) */

static const struct ezp_param script_params[] = {
    {"Name", EZP_PARAM_STRING, offsetof(struct script_conf, name), NULL, 1, 0, 0,
     "the name directives address"},
    EZP_PARAM_END,
};

/* Thread: any (under S.mu). */
static int name_slot(const char *name)
{
	for (int i = 0; i < S.n_names; i++)
		if (!strcmp(S.names[i], name))
			return i;
	if (S.n_names == MAX_NAMES)
		return MAX_NAMES - 1;
	snprintf(S.names[S.n_names], sizeof(S.names[0]), "%s", name);
	return S.n_names++;
}

static int slot_of(const char *name)
{
	int i;

	pthread_mutex_lock(&S.mu);
	i = name_slot(name);
	pthread_mutex_unlock(&S.mu);
	return i;
}

static int script_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
			 struct ezp_error *err)
{
	const struct script_conf *c = config;
	struct script_inst *in;

	(void)err;
	in = calloc(1, sizeof(*in));
	if (!in)
		return EZP_ERR_NOMEM;
	in->core = ctx->core;
	in->index = ctx->index;
	pthread_mutex_lock(&S.mu);
	in->name = name_slot(c->name);
	if (EZP_HAS(ctx, stage))
		sleepy_stage = ctx->stage;
	S.creates++;
	pthread_mutex_unlock(&S.mu);
	*instance = in;
	return EZP_OK;
}

static void script_destroy(void *instance)
{
	pthread_mutex_lock(&S.mu);
	S.destroys++;
	pthread_cond_broadcast(&S.cv);
	pthread_mutex_unlock(&S.mu);
	free(instance);
}

/*
 * Find this filter's action in @p: "#n1=a1,n2=a2|body". Copies the action
 * into @act and returns 1, or 0 when there is none. Bounded by the packet.
 */
static int directive(const struct ezp_packet *p, const char *name, char *act, size_t cap)
{
	size_t n = strlen(name), i = 1;
	const char *d = (const char *)p->data;

	if (p->len < 2 || d[0] != '#')
		return 0;
	while (i < p->len && d[i] != '|') {
		size_t start = i, end;
		while (i < p->len && d[i] != ',' && d[i] != '|')
			i++;
		end = i;
		if (end - start > n && !memcmp(d + start, name, n) && d[start + n] == '=') {
			size_t al = end - start - n - 1;
			if (al >= cap)
				al = cap - 1;
			memcpy(act, d + start + n + 1, al);
			act[al] = 0;
			return 1;
		}
		if (i < p->len && d[i] == ',')
			i++;
	}
	return 0;
}

/* The "#...|" head of @p (length), 0 when it has none. */
static size_t head_len(const struct ezp_packet *p)
{
	const char *bar;

	if (p->len < 2 || p->data[0] != '#')
		return 0;
	bar = memchr(p->data, '|', p->len);
	return bar ? (size_t)(bar - (const char *)p->data) + 1 : 0;
}

static struct ezp_packet *make_pkt(const struct ezp_core *core, const void *a, size_t al,
				   const char *b)
{
	size_t bl = strlen(b);
	struct ezp_packet *p = core->packet_new(al + bl);

	if (p) {
		memcpy(p->data, a, al);
		memcpy(p->data + al, b, bl);
	}
	return p;
}

static void record_inject_rc(int rc)
{
	if (S.n_inject_rc < (int)EZP_ARRAY_LEN(S.inject_rc))
		S.inject_rc[S.n_inject_rc++] = rc;
}

static int script_packet(void *instance, struct ezp_filter_call *call)
{
	struct script_inst *in = instance;
	const struct ezp_core *core = in->core;
	struct ezp_packet *p = call->pkt;
	char act[64], name[16];
	int v = EZP_VERDICT_PASS, has;

	pthread_mutex_lock(&S.mu);
	snprintf(name, sizeof(name), "%s", S.names[in->name]);
	if (!*call->session_state)
		S.state_missing++;
	S.total_seen++;
	S.bytes_seen += (long)p->len;
	if (S.n_seen < MAX_SEEN) {
		struct seen *e = &S.seen[S.n_seen++];
		e->name = in->name;
		e->dir = p->dir;
		e->leg = p->leg;
		e->flags = p->flags;
		e->session_id = p->session_id;
		e->ts_us = p->ts_us;
		e->len = p->len;
		memcpy(e->data, p->data, p->len < sizeof(e->data) ? p->len : sizeof(e->data));
		e->at_ms = mono_ms();
	}
	has = directive(p, name, act, sizeof(act));
	if (has && !strcmp(act, "hold") && S.n_holds < (int)EZP_ARRAY_LEN(S.holds)) {
		struct held *h = &S.holds[S.n_holds++];
		h->name = in->name;
		h->id = call->hold_id;
		h->dir = p->dir;
		memset(h->data, 0, sizeof(h->data));
		memcpy(h->data, p->data,
		       p->len < sizeof(h->data) - 1 ? p->len : sizeof(h->data) - 1);
		h->at_ms = mono_ms();
		v = EZP_VERDICT_HOLD;
	}
	pthread_cond_broadcast(&S.cv);
	pthread_mutex_unlock(&S.mu);
	if (!has || v == EZP_VERDICT_HOLD)
		return v;

	if (!strcmp(act, "drop"))
		return EZP_VERDICT_DROP;
	if (!strncmp(act, "repl:", 5)) {
		call->replacement = make_pkt(core, p->data, head_len(p), act + 5);
		return EZP_VERDICT_REPLACE;
	}
	if (!strcmp(act, "replnull"))
		return EZP_VERDICT_REPLACE; /* no packet: the core makes an empty one */
	if (!strcmp(act, "passrepl")) {
		call->replacement = make_pkt(core, "", 0, "ignored");
		return EZP_VERDICT_PASS; /* the core releases the stray replacement */
	}
	if (!strcmp(act, "droprepl")) {
		call->replacement = make_pkt(core, "", 0, "ignored");
		return EZP_VERDICT_DROP;
	}
	if (!strcmp(act, "default")) {
		call->replacement = make_pkt(core, "", 0, "ignored");
		return EZP_VERDICT_DEFAULT;
	}
	if (!strcmp(act, "weird")) {
		call->replacement = make_pkt(core, "", 0, "ignored");
		return 42;
	}
	if (!strncmp(act, "inj:", 4) || !strncmp(act, "injall:", 7) || !strcmp(act, "injbad")) {
		int all = act[3] == 'a', bad = act[3] == 'b';
		struct ezp_packet *q = make_pkt(core, "", 0, all ? act + 7 : bad ? "bad" : act + 4);
		int rc = core->session_inject(call->session, bad ? 7 : p->dir, q,
					      all ? -1 : (int)call->index);
		pthread_mutex_lock(&S.mu);
		record_inject_rc(rc);
		pthread_cond_broadcast(&S.cv);
		pthread_mutex_unlock(&S.mu);
		return EZP_VERDICT_PASS;
	}
	if (!strcmp(act, "close")) {
		core->session_close(call->session, EZP_CLOSE_API, "closed by filter");
		return EZP_VERDICT_PASS;
	}
	return EZP_VERDICT_PASS;
}

static void script_session_event(void *instance, struct ezp_session *session, int event,
				 void **state)
{
	struct script_inst *in = instance;

	(void)session;
	pthread_mutex_lock(&S.mu);
	if (event >= 1 && event <= 3)
		S.events[in->name][event]++;
	if (event == EZP_SESSION_OPENED) {
		if (*state)
			S.state_twice++;
		else if ((*state = malloc(16)))
			S.live_states++;
	} else if (!*state) {
		S.state_missing++;
	} else if (event == EZP_SESSION_CLOSED) {
		free(*state);
		*state = NULL;
		S.live_states--;
	}
	pthread_cond_broadcast(&S.cv);
	pthread_mutex_unlock(&S.mu);
}

static const struct ezp_filter_kind script_kind = {
    .struct_size = sizeof(struct ezp_filter_kind),
    .name = "script",
    .description = "obeys directives in the packet (test_chain)",
    .flags = EZP_FILTER_READS_PAYLOAD,
    .params = script_params,
    .config_size = sizeof(struct script_conf),
    .create = script_create,
    .packet = script_packet,
    .session_event = script_session_event,
    .destroy = script_destroy,
};

/* The same filter, declaring that it sees every client leg's packets. */
static const struct ezp_filter_kind script_all_kind = {
    .struct_size = sizeof(struct ezp_filter_kind),
    .name = "script-all",
    .description = "script, for every client leg",
    .flags = EZP_FILTER_READS_PAYLOAD | EZP_FILTER_ALL_LEGS,
    .params = script_params,
    .config_size = sizeof(struct script_conf),
    .create = script_create,
    .packet = script_packet,
    .session_event = script_session_event,
    .destroy = script_destroy,
};

/* The same filter, dormant until the test wakes it, with its own hold defaults. */
static const struct ezp_filter_kind sleepy_kind = {
    .struct_size = sizeof(struct ezp_filter_kind),
    .name = "sleepy",
    .description = "script, asleep until woken",
    .flags = EZP_FILTER_READS_PAYLOAD | EZP_FILTER_DORMANT,
    .params = script_params,
    .config_size = sizeof(struct script_conf),
    .create = script_create,
    .packet = script_packet,
    .session_event = script_session_event,
    .destroy = script_destroy,
    .hold_window = 7,
    .hold_timeout_ms = 12345,
};

static const struct ezp_filter_kind *const script_filters[] = {&script_kind, &script_all_kind,
							       &sleepy_kind, NULL};

static const struct ezp_plugin_desc script_plugin = {
    .struct_size = sizeof(struct ezp_plugin_desc),
    .abi_major = EZP_ABI_MAJOR,
    .abi_minor = EZP_ABI_MINOR,
    .name = "test-script",
    .version = "1",
    .description = "test_chain's scripted filter",
    .license = "MIT",
    .filters = script_filters,
};

static void script_reset(void)
{
	pthread_mutex_lock(&S.mu);
	S.n_names = 0;
	S.n_seen = 0;
	S.total_seen = 0;
	S.bytes_seen = 0;
	S.n_holds = 0;
	memset(S.events, 0, sizeof(S.events));
	S.n_inject_rc = 0;
	S.state_missing = 0;
	S.state_twice = 0;
	S.creates = 0;
	S.destroys = 0;
	S.live_states = 0;
	pthread_mutex_unlock(&S.mu);
}

/* ---- looking at what the filters saw ---- */

static int seen_find(int from, int name, int dir, const char *data)
{
	size_t n = strlen(data);

	for (int i = from; i < S.n_seen; i++) {
		const struct seen *e = &S.seen[i];
		if (e->name == name && (dir < 0 || e->dir == dir) && e->len == n &&
		    !memcmp(e->data, data, n))
			return i;
	}
	return -1;
}

/* Wait until filter @name saw @data (dir -1: either). Returns its record. */
static struct seen wait_seen(const char *name, int dir, const char *data, const char *what)
{
	int slot = slot_of(name), i;
	struct timespec end = deadline(WAIT_MS);
	struct seen e;

	pthread_mutex_lock(&S.mu);
	while ((i = seen_find(0, slot, dir, data)) < 0 &&
	       pthread_cond_timedwait(&S.cv, &S.mu, &end) != ETIMEDOUT)
		;
	if (i < 0) {
		pthread_mutex_unlock(&S.mu);
		fail_msg("%s: filter %s never saw '%s'", what, name, data);
	}
	e = S.seen[i];
	pthread_mutex_unlock(&S.mu);
	return e;
}

static int saw(const char *name, const char *data)
{
	int slot = slot_of(name), i;

	pthread_mutex_lock(&S.mu);
	i = seen_find(0, slot, -1, data);
	pthread_mutex_unlock(&S.mu);
	return i >= 0;
}

static int count_seen_by(const char *name)
{
	int slot = slot_of(name), n = 0;

	pthread_mutex_lock(&S.mu);
	for (int i = 0; i < S.n_seen; i++)
		n += S.seen[i].name == slot;
	pthread_mutex_unlock(&S.mu);
	return n;
}

/* Wait for the hold of @data by @name; returns its hold id. */
static uint64_t wait_hold(const char *name, const char *data, const char *what)
{
	int slot = slot_of(name);
	struct timespec end = deadline(WAIT_MS);

	pthread_mutex_lock(&S.mu);
	for (;;) {
		for (int i = 0; i < S.n_holds; i++)
			if (S.holds[i].name == slot && !strcmp(S.holds[i].data, data)) {
				uint64_t id = S.holds[i].id;
				pthread_mutex_unlock(&S.mu);
				return id;
			}
		if (pthread_cond_timedwait(&S.cv, &S.mu, &end) == ETIMEDOUT)
			break;
	}
	pthread_mutex_unlock(&S.mu);
	fail_msg("%s: filter %s never held '%s'", what, name, data);
	return 0;
}

static uint64_t hold_time(uint64_t id)
{
	uint64_t t = 0;

	pthread_mutex_lock(&S.mu);
	for (int i = 0; i < S.n_holds; i++)
		if (S.holds[i].id == id)
			t = S.holds[i].at_ms;
	pthread_mutex_unlock(&S.mu);
	return t;
}

static int events_of(const char *name, int event)
{
	int slot = slot_of(name), n;

	pthread_mutex_lock(&S.mu);
	n = S.events[slot][event];
	pthread_mutex_unlock(&S.mu);
	return n;
}

/* Wait until filter @name has seen @want events of @event. */
static void wait_events(const char *name, int event, int want, const char *what)
{
	int slot = slot_of(name);
	struct timespec end = deadline(WAIT_MS);
	int n;

	pthread_mutex_lock(&S.mu);
	while ((n = S.events[slot][event]) < want &&
	       pthread_cond_timedwait(&S.cv, &S.mu, &end) != ETIMEDOUT)
		;
	pthread_mutex_unlock(&S.mu);
	if (n < want)
		fail_msg("%s: filter %s got %d event(s) %d, expected %d", what, name, n, event,
			 want);
}

static void check_states_balanced(void)
{
	pthread_mutex_lock(&S.mu);
	int missing = S.state_missing, twice = S.state_twice;
	pthread_mutex_unlock(&S.mu);
	/* (states never CLOSED are counted at teardown, once the daemon is gone) */
	if (missing || twice)
		fail_msg("session_event bookkeeping: %d packet/event(s) without OPENED, %d double "
			 "OPENED",
			 missing, twice);
}

/* ---- per-test context ---------------------------------------------------------------- */

struct tapc;

struct ctx {
	struct ezp_daemon *d;
	int fds[64];
	int n_fds;
	struct ezp_tap *taps[4];
	int n_taps;
	struct tapc *tapcs[4];
	int n_tapcs;
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

/* ---- sockets --------------------------------------------------------------------------- */

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
	struct sockaddr_in a;
	socklen_t len = sizeof(a);

	assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	return ntohs(a.sin_port);
}

/* A UDP socket on 127.0.0.1:0 (connected to @port unless 0), with a large receive buffer. */
static int udp_sock(uint16_t port)
{
	int fd = track_fd(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)), big = 4 << 20;
	struct sockaddr_in me = loopback(0), to = loopback(port);

	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big)) != 0) {
		big_rcvbuf = 0; /* not root: the kernel may drop a long burst */
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	}
	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	if (port)
		assert_int_equal(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
	return fd;
}

static int tcp_listener(void)
{
	int fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)), one = 1;
	struct sockaddr_in me = loopback(0);

	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	assert_int_equal(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
	assert_int_equal(listen(fd, 16), 0);
	return fd;
}

static int tcp_connect(uint16_t port)
{
	int fd = track_fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)), one = 1;
	struct sockaddr_in to = loopback(port);

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (struct sockaddr *)&to, sizeof(to)) != 0)
		fail_msg("connect to 127.0.0.1:%u: %s", port, strerror(errno));
	return fd;
}

static int accept_wait(int lfd)
{
	struct pollfd p = {lfd, POLLIN, 0};
	int fd, one = 1;

	if (poll(&p, 1, WAIT_MS) != 1)
		fail_msg("no connection reached the test's server");
	fd = track_fd(accept4(lfd, NULL, NULL, SOCK_CLOEXEC));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

static void send_all(int fd, const void *data, size_t len)
{
	const char *p = data;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			fail_msg("send: %s", strerror(errno));
		p += n;
		len -= (size_t)n;
	}
}

static void send_text(int fd, const char *text)
{
	send_all(fd, text, strlen(text));
}

static void send_to(int fd, const struct sockaddr_in *to, const char *text)
{
	assert_int_equal(
	    sendto(fd, text, strlen(text), 0, (const struct sockaddr *)to, sizeof(*to)),
	    (ssize_t)strlen(text));
}

static void expect_quiet(int fd, const char *what)
{
	char buf[2048];
	ssize_t n = recv_wait(fd, buf, sizeof(buf) - 1, QUIET_MS);

	if (n == -2)
		return;
	if (n >= 0) {
		buf[n] = 0;
		fail_msg("%s: expected nothing, got '%s' (%zd bytes)", what, buf, n);
	}
	fail_msg("%s: expected nothing, got %s", what, strerror(errno));
}

static void expect_eof(int fd, const char *what)
{
	char c;
	ssize_t n = recv_wait(fd, &c, 1, WAIT_MS);

	if (n != 0)
		fail_msg("%s: expected end of stream, got %s", what,
			 n == -2 ? "nothing"
			 : n > 0 ? "bytes"
				 : strerror(errno));
}

/* ---- the daemon -------------------------------------------------------------------- */

__attribute__((format(printf, 2, 3))) static void daemon_up(unsigned workers, const char *fmt, ...)
{
	const char *plugins = getenv("EZP_TEST_PLUGINS");
	const char *paths[] = {plugins ? plugins : "build/plugins", NULL};
	struct ezp_daemon_opts opts = {.struct_size = sizeof(opts),
				       .workers = workers,
				       .plugin_paths = paths,
				       .no_default_paths = 1,
				       .log_level = EZP_LOG_ERROR};
	struct ezp_error err = {0};
	char yaml[4096];
	va_list ap;
	int rc;

	va_start(ap, fmt);
	vsnprintf(yaml, sizeof(yaml), fmt, ap);
	va_end(ap);
	rc = ezp_daemon_new("Pipelines: []\n", "test_chain", &opts, &T->d, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_new: %s: %s", ezp_status_str(rc), err.message);
	rc = ezp__registry_add_builtin((struct ezp_core_ctx *)T->d, &script_plugin, &err);
	if (rc != EZP_OK)
		fail_msg("registering the script filter: %s", err.message);
	rc = ezp_daemon_start(T->d, &err);
	if (rc != EZP_OK)
		fail_msg("ezp_daemon_start: %s: %s", ezp_status_str(rc), err.message);
	/* the pipelines come with a reload: the registry now knows `script` */
	rc = ezp_daemon_reload(T->d, yaml, "test_chain", &err);
	if (rc != EZP_OK)
		fail_msg("loading the pipelines: %s at %d:%d: %s\n%s", ezp_status_str(rc), err.line,
			 err.column, err.message, yaml);
}

static uint16_t bound_port(const char *pipeline)
{
	struct ezp_addr a;

	assert_int_equal(ezp_pipeline_bound(T->d, pipeline, &a), EZP_OK);
	return ntohs(((struct sockaddr_in *)&a.ss)->sin_port);
}

/* The one live session of @pipeline (waits for it to exist). */
static struct ezp_session_summary the_session(const char *pipeline)
{
	uint64_t end = mono_ms() + WAIT_MS;

	do {
		struct ezp_session_summary *v = NULL, s;
		size_t n = 0;
		assert_int_equal(ezp_daemon_sessions(T->d, pipeline, &v, &n), EZP_OK);
		if (n == 1) {
			s = v[0];
			free(v);
			return s;
		}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("pipeline %s does not have exactly one session", pipeline);
	abort();
}

/* The session whose first client is @fd's local address. */
static struct ezp_session_summary the_session_of(int fd)
{
	struct sockaddr_in me;
	socklen_t len = sizeof(me);
	uint64_t end = mono_ms() + WAIT_MS;

	assert_int_equal(getsockname(fd, (struct sockaddr *)&me, &len), 0);
	do {
		struct ezp_session_summary *v = NULL, s;
		size_t n = 0;
		assert_int_equal(ezp_daemon_sessions(T->d, NULL, &v, &n), EZP_OK);
		for (size_t i = 0; i < n; i++) {
			const struct sockaddr_in *a = (const struct sockaddr_in *)&v[i].client.ss;
			if (a->sin_family == AF_INET && a->sin_port == me.sin_port &&
			    a->sin_addr.s_addr == me.sin_addr.s_addr) {
				s = v[i];
				free(v);
				return s;
			}
		}
		free(v);
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("no session has client port %u", ntohs(me.sin_port));
	abort();
}

static size_t n_sessions(const char *pipeline)
{
	struct ezp_session_summary *v = NULL;
	size_t n = 0;

	assert_int_equal(ezp_daemon_sessions(T->d, pipeline, &v, &n), EZP_OK);
	free(v);
	return n;
}

static void wait_no_sessions(const char *pipeline)
{
	uint64_t end = mono_ms() + WAIT_MS;

	while (n_sessions(pipeline) && mono_ms() < end)
		poll_pause();
	assert_int_equal(n_sessions(pipeline), 0);
}

static void answer(uint64_t id, int verdict, const char *data)
{
	int rc = ezp_filter_answer(T->d, id, verdict, data, data ? strlen(data) : 0);

	if (rc != EZP_OK)
		fail_msg("ezp_filter_answer(%llu): %s", (unsigned long long)id, ezp_status_str(rc));
}

/* ---- a recording tap ---------------------------------------------------------------------- */

struct tev {
	int type;
	uint64_t session_id;
	int dir, verdict, has_pkt, has_orig;
	uint32_t flags;
	char data[128], orig[128];
	size_t len, olen;
	char close_text[64];
};

struct tapc {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct tev v[512];
	int n;
};

static void tapc_on_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct tapc *tc = userdata;

	pthread_mutex_lock(&tc->mu);
	if (tc->n < (int)EZP_ARRAY_LEN(tc->v)) {
		struct tev *e = &tc->v[tc->n++];
		memset(e, 0, sizeof(*e));
		e->type = ev->type;
		e->session_id = ev->session_id;
		e->verdict = ev->verdict;
		e->flags = ev->flags;
		if (ev->pkt) {
			e->has_pkt = 1;
			e->dir = ev->pkt->dir;
			e->len = ev->pkt->len;
			memcpy(e->data, ev->pkt->data, e->len < 127 ? e->len : 127);
		}
		if (ev->original) {
			e->has_orig = 1;
			e->olen = ev->original->len;
			memcpy(e->orig, ev->original->data, e->olen < 127 ? e->olen : 127);
		}
		if (ev->info && ev->info->close_text)
			snprintf(e->close_text, sizeof(e->close_text), "%s", ev->info->close_text);
	}
	pthread_cond_broadcast(&tc->cv);
	pthread_mutex_unlock(&tc->mu);
}

static struct tapc *tap_up(const char *pipeline)
{
	struct tapc *tc = calloc(1, sizeof(*tc));
	pthread_condattr_t ca;
	struct ezp_tap_opts o = {.struct_size = sizeof(o),
				 .pipeline = pipeline,
				 .userdata = tc,
				 .on_event = tapc_on_event};

	assert_non_null(tc);
	pthread_mutex_init(&tc->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&tc->cv, &ca);
	pthread_condattr_destroy(&ca);
	T->tapcs[T->n_tapcs++] = tc;
	assert_int_equal(ezp_tap_subscribe(T->d, &o, &T->taps[T->n_taps]), EZP_OK);
	T->n_taps++;
	return tc;
}

/* Wait for a packet event with bytes @data (dir -1: either). */
static struct tev tap_packet(struct tapc *tc, int dir, const char *data, const char *what)
{
	struct timespec end = deadline(WAIT_MS);
	size_t n = strlen(data);
	struct tev e;

	pthread_mutex_lock(&tc->mu);
	for (;;) {
		for (int i = 0; i < tc->n; i++) {
			const struct tev *x = &tc->v[i];
			if (x->type == EZP_TAP_PACKET && x->has_pkt && (dir < 0 || x->dir == dir) &&
			    x->len == n && !memcmp(x->data, data, n)) {
				e = *x;
				pthread_mutex_unlock(&tc->mu);
				return e;
			}
		}
		if (pthread_cond_timedwait(&tc->cv, &tc->mu, &end) == ETIMEDOUT)
			break;
	}
	pthread_mutex_unlock(&tc->mu);
	fail_msg("%s: the tap never saw '%s'", what, data);
	abort();
}

static struct tev tap_type(struct tapc *tc, int type, const char *what)
{
	struct timespec end = deadline(WAIT_MS);
	struct tev e;

	pthread_mutex_lock(&tc->mu);
	for (;;) {
		for (int i = 0; i < tc->n; i++)
			if (tc->v[i].type == type) {
				e = tc->v[i];
				pthread_mutex_unlock(&tc->mu);
				return e;
			}
		if (pthread_cond_timedwait(&tc->cv, &tc->mu, &end) == ETIMEDOUT)
			break;
	}
	pthread_mutex_unlock(&tc->mu);
	fail_msg("%s: the tap never saw an event of type %d", what, type);
	abort();
}

static void check_tev(const struct tev *e, uint32_t flags, int verdict, const char *orig,
		      const char *what)
{
	if (e->flags != flags || e->verdict != verdict)
		fail_msg("%s: tap flags %#x verdict %d, expected %#x and %d", what, e->flags,
			 e->verdict, flags, verdict);
	if (!orig && e->has_orig)
		fail_msg("%s: the tap shows an original ('%s') where there is none", what, e->orig);
	if (orig && (!e->has_orig || e->olen != strlen(orig) || memcmp(e->orig, orig, e->olen)))
		fail_msg("%s: tap original '%s', expected '%s'", what, e->has_orig ? e->orig : "-",
			 orig);
}

/* ---- setup and teardown ------------------------------------------------------------------ */

static void on_alarm(int sig)
{
	char msg[160];
	int n = snprintf(msg, sizeof(msg), "test_chain: %s hung; aborting\n", current_test);

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
	script_reset();
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
	for (int i = 0; i < c->n_fds; i++)
		close(c->fds[i]);
	for (int i = 0; i < c->n_tapcs; i++) {
		pthread_cond_destroy(&c->tapcs[i]->cv);
		pthread_mutex_destroy(&c->tapcs[i]->mu);
		free(c->tapcs[i]);
	}
	/* every instance was destroyed and every session state freed with the daemon */
	pthread_mutex_lock(&S.mu);
	int creates = S.creates, destroys = S.destroys, live = S.live_states;
	pthread_mutex_unlock(&S.mu);
	free(c);
	T = NULL;
	alarm(0);
	if (creates != destroys || live) {
		fprintf(stderr,
			"test_chain: %s: %d filter instance(s) created, %d destroyed, %d "
			"session state(s) left\n",
			current_test, creates, destroys, live);
		return -1;
	}
	return 0;
}

#define UDP_PIPE(name, through, to_port)                                                           \
	"  - Name: " name "\n"                                                                     \
	"    From: {udp: {Listen: 127.0.0.1:0}}\n"                                                 \
	"    Through: " through "\n"                                                               \
	"    To: {udp: {Connect: 127.0.0.1:" to_port "}}\n"

#define TCP_PIPE(name, through, to_port)                                                           \
	"  - Name: " name "\n"                                                                     \
	"    From: {tcp: {Listen: 127.0.0.1:0}}\n"                                                 \
	"    Through: " through "\n"                                                               \
	"    To: {tcp: {Connect: 127.0.0.1:" to_port "}}\n"

#define THREE "[{script: {Name: f1}}, {script: {Name: f2}}, {script: {Name: f3, Default: drop}}]"

/* ---- 1. verdicts through three filters -------------------------------------------------- */

static void test_verdicts_three_filters(void **state)
{
	int srv = udp_sock(0), c;
	struct sockaddr_in up;
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	struct tapc *tc;
	struct tev e;
	struct seen sn;

	(void)state;
	current_test = __func__;
	daemon_up(2, "Pipelines:\n" UDP_PIPE("p", THREE, "%u"), sock_port(srv));
	tc = tap_up(NULL);
	c = udp_sock(bound_port("p"));

	/* no directive: every filter sees it, in order, and it arrives unchanged */
	send_text(c, "plain");
	expect_dgram_from(srv, "plain", &up, "plain datagram");
	wait_seen("f1", EZP_DIR_TO_SERVER, "plain", "plain");
	wait_seen("f2", EZP_DIR_TO_SERVER, "plain", "plain");
	wait_seen("f3", EZP_DIR_TO_SERVER, "plain", "plain");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "plain", "plain");
	check_tev(&e, 0, EZP_VERDICT_PASS, NULL, "plain");

	/* drop at the first filter: the later ones never see it */
	send_text(c, "#f1=drop|a");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f1=drop|a", "drop at f1");
	check_tev(&e, EZP_PKT_DROPPED, EZP_VERDICT_DROP, NULL, "drop at f1");
	assert_false(saw("f2", "#f1=drop|a"));
	assert_false(saw("f3", "#f1=drop|a"));
	/* a stray replacement beside DROP is released (ASan/valgrind) */
	send_text(c, "#f1=droprepl|a2");
	tap_packet(tc, EZP_DIR_TO_SERVER, "#f1=droprepl|a2", "drop with a stray replacement");

	/* replace in the middle: the next filter sees the new bytes, marked replaced */
	send_text(c, "#f2=repl:NEW|b");
	expect_dgram(srv, "#f2=repl:NEW|NEW", "replaced at f2");
	sn = wait_seen("f3", EZP_DIR_TO_SERVER, "#f2=repl:NEW|NEW", "f3 after a replace");
	assert_int_equal(sn.flags, EZP_PKT_REPLACED);
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f2=repl:NEW|NEW", "replaced at f2");
	check_tev(&e, EZP_PKT_REPLACED, EZP_VERDICT_REPLACE, "#f2=repl:NEW|b", "replaced at f2");

	/* replaced twice: taps keep the very first bytes */
	send_text(c, "#f1=repl:R1,f2=repl:R2|c");
	expect_dgram(srv, "#f1=repl:R1,f2=repl:R2|R2", "replaced twice");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f1=repl:R1,f2=repl:R2|R2", "replaced twice");
	check_tev(&e, EZP_PKT_REPLACED, EZP_VERDICT_REPLACE, "#f1=repl:R1,f2=repl:R2|c",
		  "replaced twice");

	/* replaced, then dropped later: the tap shows the replacement and the original */
	send_text(c, "#f1=repl:Q,f3=drop|d");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f1=repl:Q,f3=drop|Q", "replace then drop");
	check_tev(&e, EZP_PKT_REPLACED | EZP_PKT_DROPPED, EZP_VERDICT_DROP, "#f1=repl:Q,f3=drop|d",
		  "replace then drop");

	/* REPLACE without a packet: an empty datagram goes out */
	send_text(c, "#f2=replnull|e");
	expect_dgram(srv, "", "replaced by nothing");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "", "replaced by nothing");
	check_tev(&e, EZP_PKT_REPLACED, EZP_VERDICT_REPLACE, "#f2=replnull|e", "replnull");

	/* an unknown verdict: the stage's default (f1 pass, f3 drop) */
	send_text(c, "#f1=weird|f");
	expect_dgram(srv, "#f1=weird|f", "unknown verdict at a pass stage");
	send_text(c, "#f3=weird|g");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f3=weird|g", "unknown verdict at a drop stage");
	check_tev(&e, EZP_PKT_DROPPED, EZP_VERDICT_DROP, NULL, "unknown verdict, Default: drop");
	/* DEFAULT: the same, asked for (no warning) */
	send_text(c, "#f1=default|f");
	expect_dgram(srv, "#f1=default|f", "DEFAULT at a pass stage");
	send_text(c, "#f3=default|g");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f3=default|g", "DEFAULT at a drop stage");
	check_tev(&e, EZP_PKT_DROPPED, EZP_VERDICT_DROP, NULL, "DEFAULT, Default: drop");
	/* PASS with a stray replacement: passes unchanged */
	send_text(c, "#f2=passrepl|h");
	expect_dgram(srv, "#f2=passrepl|h", "pass with a stray replacement");

	/* a filter injects after itself: later filters see it (injected), earlier ones never */
	send_text(c, "#f2=inj:I2|i");
	expect_dgram(srv, "I2", "injected by f2 (ahead of the packet in f2's hands)");
	expect_dgram(srv, "#f2=inj:I2|i", "the packet f2 was looking at");
	sn = wait_seen("f3", EZP_DIR_TO_SERVER, "I2", "f3 sees f2's injection");
	assert_int_equal(sn.flags, EZP_PKT_INJECTED);
	assert_false(saw("f1", "I2"));
	assert_false(saw("f2", "I2"));
	/* ... or past every filter */
	send_text(c, "#f1=injall:IA|j");
	expect_dgram(srv, "IA", "injected past every filter");
	expect_dgram(srv, "#f1=injall:IA|j", "after injall");
	assert_false(saw("f2", "IA"));
	assert_false(saw("f3", "IA"));
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "IA", "injall");
	check_tev(&e, EZP_PKT_INJECTED, EZP_VERDICT_PASS, NULL, "injall");
	/* ... to a direction that does not exist: refused, the packet goes on */
	send_text(c, "#f1=injbad|k");
	expect_dgram(srv, "#f1=injbad|k", "after a bad injection");
	pthread_mutex_lock(&S.mu);
	assert_int_equal(S.n_inject_rc, 3);
	assert_int_equal(S.inject_rc[0], EZP_OK);
	assert_int_equal(S.inject_rc[1], EZP_OK);
	assert_int_equal(S.inject_rc[2], EZP_ERR_INVAL);
	pthread_mutex_unlock(&S.mu);

	/* the other direction goes through the same filters */
	send_to(srv, &up, "#f3=drop|z");
	send_to(srv, &up, "#f1=repl:C|y");
	expect_dgram(c, "#f1=repl:C|C", "to-client replace (the drop before it is gone)");
	sn = wait_seen("f1", EZP_DIR_TO_CLIENT, "#f3=drop|z", "f1 sees to-client packets");
	assert_int_equal(sn.dir, EZP_DIR_TO_CLIENT);

	s = the_session("p");
	/* drops: a, a2, d, g, the DEFAULT g, z; replaces: b, c, d(then dropped), e, y;
	 * injected: I2, IA */
	assert_int_equal(s.dropped, 6);
	assert_int_equal(s.replaced, 4);
	assert_int_equal(s.injected, 2);
	assert_int_equal(events_of("f1", EZP_SESSION_OPENED), 1);
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	wait_events("f1", EZP_SESSION_CLOSED, 1, "close");
	wait_events("f2", EZP_SESSION_CLOSED, 1, "close");
	wait_events("f3", EZP_SESSION_CLOSED, 1, "close");
	e = tap_type(tc, EZP_TAP_SESSION_CLOSED, "close");
	assert_string_equal(e.close_text, "closed by request");
	check_states_balanced();
}

/* ---- 2. holds at different stages keep the order -------------------------------------------- */

static void test_holds_at_stages(void **state)
{
	const struct ezp_core *core;
	int srv = udp_sock(0), c;
	uint64_t a, b, d, f, g;
	struct tapc *tc;
	struct tev e;

	(void)state;
	current_test = __func__;
	daemon_up(2, "Pipelines:\n" UDP_PIPE("p", THREE, "%u"), sock_port(srv));
	core = ezp_daemon_core(T->d);
	tc = tap_up("p");
	c = udp_sock(bound_port("p"));

	send_text(c, "#f1=hold|A");
	a = wait_hold("f1", "#f1=hold|A", "A held at f1");
	send_text(c, "#f2=hold|B");
	wait_seen("f1", -1, "#f2=hold|B", "f1 decides on B while A is held");
	send_text(c, "C");
	wait_seen("f1", -1, "C", "f1 decides on C while A is held");
	expect_quiet(srv, "B and C wait behind A");
	assert_false(saw("f2", "#f2=hold|B"));

	answer(a, EZP_VERDICT_PASS, NULL);
	expect_dgram(srv, "#f1=hold|A", "A after its answer");
	b = wait_hold("f2", "#f2=hold|B", "B now held at f2");
	wait_seen("f2", -1, "C", "f2 decides on C while B is held");
	expect_quiet(srv, "C waits behind B at f2");
	answer(b, EZP_VERDICT_REPLACE, "BB");
	expect_dgram(srv, "BB", "B replaced by its answer");
	expect_dgram(srv, "C", "C after B");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "BB", "B's answer");
	check_tev(&e, EZP_PKT_REPLACED, EZP_VERDICT_REPLACE, "#f2=hold|B", "answered REPLACE");
	/* answering again has no effect */
	answer(b, EZP_VERDICT_DROP, NULL);

	/* replaced at f1, held at f2, answered REPLACE: taps see the first bytes */
	send_text(c, "#f1=repl:X,f2=hold|D");
	d = wait_hold("f2", "#f1=repl:X,f2=hold|X", "D held at f2 after f1 replaced it");
	/* while D is held, E is queued behind it and replaced at f2 (the queued path) */
	send_text(c, "#f1=repl:Y,f2=repl:Z|E");
	wait_seen("f2", -1, "#f1=repl:Y,f2=repl:Z|Y", "E decided while D is held");
	/* and F, replaced by nothing while queued */
	send_text(c, "#f2=replnull|F");
	wait_seen("f2", -1, "#f2=replnull|F", "F decided while D is held");
	expect_quiet(srv, "everything waits behind D");
	answer(d, EZP_VERDICT_REPLACE, "DD");
	expect_dgram(srv, "DD", "D's answer");
	expect_dgram(srv, "#f1=repl:Y,f2=repl:Z|Z", "E after D");
	expect_dgram(srv, "", "F (empty) after E");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "DD", "D");
	check_tev(&e, EZP_PKT_REPLACED, EZP_VERDICT_REPLACE, "#f1=repl:X,f2=hold|D", "D");
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f1=repl:Y,f2=repl:Z|Z", "E");
	if (!e.has_orig || strcmp(e.orig, "#f1=repl:Y,f2=repl:Z|E"))
		fail_msg("E: the tap's original is '%s'", e.has_orig ? e.orig : "-");
	/* (E's flags: see test_bug_queued_replace_loses_head) */

	/* answers: DROP, an unknown verdict (treated as pass), REPLACE with no packet */
	send_text(c, "#f3=hold|G1");
	g = wait_hold("f3", "#f3=hold|G1", "G1");
	answer(g, EZP_VERDICT_DROP, NULL);
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f3=hold|G1", "G1 dropped by its answer");
	check_tev(&e, EZP_PKT_DROPPED, EZP_VERDICT_DROP, NULL, "G1");
	send_text(c, "#f3=hold|G2");
	g = wait_hold("f3", "#f3=hold|G2", "G2");
	answer(g, 77, NULL);
	expect_dgram(srv, "#f3=hold|G2", "an unknown answer passes");
	send_text(c, "#f3=hold|G3");
	g = wait_hold("f3", "#f3=hold|G3", "G3");
	assert_int_equal(core->filter_answer(core->ctx, g, EZP_VERDICT_REPLACE, NULL), EZP_OK);
	expect_dgram(srv, "", "REPLACE answered with no packet: empty");
	send_text(c, "#f3=hold|G4");
	g = wait_hold("f3", "#f3=hold|G4", "G4");
	answer(g, EZP_VERDICT_DEFAULT, NULL);
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f3=hold|G4", "G4 answered DEFAULT (drop)");
	check_tev(&e, EZP_PKT_DROPPED, EZP_VERDICT_DROP, NULL, "G4");

	/* the to-client direction holds independently of the to-server one */
	send_text(c, "#f1=hold|H");
	f = wait_hold("f1", "#f1=hold|H", "H");
	struct sockaddr_in up;
	send_text(c, "ping"); /* queued behind H: learn the upstream address another way */
	expect_quiet(srv, "ping waits behind H");
	answer(f, EZP_VERDICT_PASS, NULL);
	expect_dgram_from(srv, "#f1=hold|H", &up, "H");
	expect_dgram(srv, "ping", "ping");
	send_to(srv, &up, "#f2=hold|back");
	f = wait_hold("f2", "#f2=hold|back", "to-client hold");
	send_text(c, "fwd");
	expect_dgram(srv, "fwd", "to-server flows while to-client is held");
	answer(f, EZP_VERDICT_PASS, NULL);
	expect_dgram(c, "#f2=hold|back", "to-client after its answer");
	check_states_balanced();
}

/* ---- 3. bad answers ------------------------------------------------------------------ */

static void test_bad_answers(void **state)
{
	const struct ezp_core *core;
	int srv = udp_sock(0);

	(void)state;
	current_test = __func__;
	daemon_up(2, "Pipelines:\n" UDP_PIPE("p", "[{script: {Name: f1}}]", "%u"), sock_port(srv));
	core = ezp_daemon_core(T->d);
	/* hold id 0 and ids naming a worker that does not exist are refused */
	assert_int_equal(core->filter_answer(core->ctx, 0, EZP_VERDICT_PASS, NULL), EZP_ERR_INVAL);
	assert_int_equal(core->filter_answer(core->ctx, 0x05, EZP_VERDICT_PASS, NULL),
			 EZP_ERR_INVAL);
	assert_int_equal(
	    core->filter_answer(core->ctx, (7u << 8) | 2u, EZP_VERDICT_PASS, core->packet_new(3)),
	    EZP_ERR_INVAL); /* the replacement is released (ASan, valgrind) */
	assert_int_equal(ezp_filter_answer(T->d, (9u << 8) | 200u, EZP_VERDICT_REPLACE, "x", 1),
			 EZP_ERR_INVAL);
	/* a well-formed id nobody holds: posted, then released without effect */
	assert_int_equal(core->filter_answer(core->ctx, (12345u << 8) | 1u, EZP_VERDICT_REPLACE,
					     core->packet_new(3)),
			 EZP_OK);
	assert_int_equal(ezp_filter_answer(T->d, (999u << 8), EZP_VERDICT_DROP, NULL, 0), EZP_OK);
}

/* ---- 4. the hold window: TCP pauses and resumes ------------------------------------------- */

static void test_window_pause_resume(void **state)
{
	int lfd = tcp_listener(), c, sv;
	struct ezp_session_summary s;
	uint64_t h1, h2, h3;

	(void)state;
	current_test = __func__;
	daemon_up(1, "Pipelines:\n" TCP_PIPE("p", "[{script: {Name: f1, HoldWindow: 2}}]", "%u"),
		  sock_port(lfd));
	c = tcp_connect(bound_port("p"));
	sv = accept_wait(lfd);

	send_text(c, "#f1=hold|1;");
	h1 = wait_hold("f1", "#f1=hold|1;", "first hold");
	send_text(c, "#f1=hold|2;");
	h2 = wait_hold("f1", "#f1=hold|2;", "second hold fills the window");
	/* the client leg is paused now: the proxy reads nothing more */
	send_text(c, "three;");
	expect_quiet(sv, "nothing passes while both are held");
	assert_int_equal(count_seen_by("f1"), 2);
	s = the_session("p");
	assert_int_equal(s.bytes[EZP_DIR_TO_SERVER], 22);

	answer(h1, EZP_VERDICT_PASS, NULL);
	expect_stream(sv, "#f1=hold|1;", "the first held packet");
	/* room in the window: the client is read again */
	wait_seen("f1", EZP_DIR_TO_SERVER, "three;", "read after resume");
	expect_quiet(sv, "three waits behind the second hold");
	answer(h2, EZP_VERDICT_PASS, NULL);
	expect_stream(sv, "#f1=hold|2;three;", "the rest, in order");

	/* the to-client direction: the server leg pauses the same way */
	send_text(sv, "#f1=hold|s1;");
	h1 = wait_hold("f1", "#f1=hold|s1;", "to-client hold 1");
	send_text(sv, "#f1=hold|s2;");
	h2 = wait_hold("f1", "#f1=hold|s2;", "to-client hold 2");
	send_text(sv, "#f1=hold|s3;");
	expect_quiet(c, "to-client paused");
	assert_int_equal(count_seen_by("f1"), 5);
	answer(h2, EZP_VERDICT_DROP, NULL); /* answered out of order: still waits for s1 */
	expect_quiet(c, "s2 is decided but s1 is not");
	answer(h1, EZP_VERDICT_REPLACE, "S1;");
	expect_stream(c, "S1;", "s1 replaced; s2 dropped");
	h3 = wait_hold("f1", "#f1=hold|s3;", "s3 read after the window opened");
	answer(h3, EZP_VERDICT_PASS, NULL);
	expect_stream(c, "#f1=hold|s3;", "s3");
	check_states_balanced();
}

/* With HoldWindow 1 a datagram behind a held one is not even shown to the filter. */
static void test_window_defers_submission(void **state)
{
	int srv = udp_sock(0), c;
	uint64_t a;

	(void)state;
	current_test = __func__;
	daemon_up(1, "Pipelines:\n" UDP_PIPE("p", "[{script: {Name: f1, HoldWindow: 1}}]", "%u"),
		  sock_port(srv));
	c = udp_sock(bound_port("p"));
	send_text(c, "#f1=hold|A");
	a = wait_hold("f1", "#f1=hold|A", "A");
	send_text(c, "#f1=repl:BB|B");
	expect_quiet(srv, "B waits");
	assert_false(saw("f1", "#f1=repl:BB|B"));
	answer(a, EZP_VERDICT_PASS, NULL);
	expect_dgram(srv, "#f1=hold|A", "A");
	expect_dgram(srv, "#f1=repl:BB|BB", "B, shown to the filter only now");
}

/* Datagrams cannot be paused: past the window's queue they are counted and dropped. */
static void test_datagram_overflow(void **state)
{
	int srv = udp_sock(0), c;
	struct ezp_session_summary s;
	char msg[32], buf[64];
	uint64_t a, end;
	int got = 0;

	(void)state;
	current_test = __func__;
	daemon_up(1, "Pipelines:\n" UDP_PIPE("p", "[{script: {Name: f1, HoldWindow: 1}}]", "%u"),
		  sock_port(srv));
	c = udp_sock(bound_port("p"));
	send_text(c, "#f1=hold|first");
	a = wait_hold("f1", "#f1=hold|first", "first");
	for (int i = 1; i < 300; i++) {
		snprintf(msg, sizeof(msg), "n%03d", i);
		send_text(c, msg);
		if (i % 20 == 0) { /* let the proxy read: the kernel must drop none of them */
			end = mono_ms() + WAIT_MS;
			while (the_session("p").packets[EZP_DIR_TO_SERVER] < (uint64_t)i + 1 &&
			       mono_ms() < end)
				poll_pause();
		}
	}
	/* 256 fit in the queue (the held one and 255 more); 44 are dropped */
	end = mono_ms() + WAIT_MS;
	do {
		s = the_session("p");
		if (s.dropped >= 44 || s.packets[EZP_DIR_TO_SERVER] >= 300)
			break;
		poll_pause();
	} while (mono_ms() < end);
	assert_int_equal(s.packets[EZP_DIR_TO_SERVER], 300);
	assert_int_equal(s.dropped, 44);
	answer(a, EZP_VERDICT_PASS, NULL);
	expect_dgram(srv, "#f1=hold|first", "first");
	for (int i = 1, last = 0; i < 256; i++) {
		ssize_t n = recv_wait(srv, buf, sizeof(buf) - 1, WAIT_MS);
		if (n < 0 && !big_rcvbuf && got >= 200)
			break; /* a small receive buffer may have lost some of the burst */
		if (n < 0)
			fail_msg("datagram %d of 255 queued ones never came", i);
		buf[n] = 0;
		snprintf(msg, sizeof(msg), "n%03d", i);
		if (big_rcvbuf ? strcmp(buf, msg) != 0 : atoi(buf + 1) <= last)
			fail_msg("queued datagrams out of order: '%s' where '%s' was due", buf,
				 msg);
		last = atoi(buf + 1);
		got++;
	}
	if (big_rcvbuf)
		assert_int_equal(got, 255);
	expect_quiet(srv, "the overflow was dropped, not delayed");
}

/* ---- 5. timeouts at several stages --------------------------------------------------------- */

static void test_timeouts(void **state)
{
	int srv = udp_sock(0), c;
	uint64_t t0, a, b, late;
	struct tapc *tc;
	struct tev e;
	char buf[64];

	(void)state;
	current_test = __func__;
	daemon_up(
	    1,
	    "Pipelines:\n" UDP_PIPE(
		"p",
		"[{script: {Name: f1, HoldTimeoutMs: 150}}, {script: {Name: f2, HoldTimeoutMs: "
		"150, Default: drop}}, {script: {Name: f3, HoldTimeoutMs: 100, HoldWindow: 1}}]",
		"%u"),
	    sock_port(srv));
	tc = tap_up(NULL);
	c = udp_sock(bound_port("p"));

	/* held at f1 until its timeout (pass), then at f2 until its timeout (drop) */
	send_text(c, "#f1=hold,f2=hold|T1");
	a = wait_hold("f1", "#f1=hold,f2=hold|T1", "T1 at f1");
	b = wait_hold("f2", "#f1=hold,f2=hold|T1", "T1 at f2 after f1's timeout");
	assert_true(hold_time(b) - hold_time(a) >= 140);
	e = tap_packet(tc, EZP_DIR_TO_SERVER, "#f1=hold,f2=hold|T1", "T1 dropped by f2's timeout");
	check_tev(&e, EZP_PKT_DROPPED, EZP_VERDICT_DROP, NULL, "T1");
	/* an answer after the timeout changes nothing */
	answer(a, EZP_VERDICT_REPLACE, "late");
	answer(b, EZP_VERDICT_PASS, NULL);

	/* two holds 60 ms apart: each leaves at its own deadline, in order */
	t0 = mono_ms();
	send_text(c, "#f1=hold|A");
	wait_hold("f1", "#f1=hold|A", "A");
	struct timespec gap = {0, 60 * 1000000L};
	nanosleep(&gap, NULL);
	send_text(c, "#f1=hold|B");
	b = wait_hold("f1", "#f1=hold|B", "B");
	expect_dgram(srv, "#f1=hold|A", "A at its timeout");
	expect_dgram(srv, "#f1=hold|B", "B at its timeout");
	late = mono_ms();
	if (late - hold_time(b) < 140)
		fail_msg("B left %llu ms after it was held: before its own deadline",
			 (unsigned long long)(late - hold_time(b)));
	assert_true(late - t0 >= 200);

	/* window 1 with a timeout: the next datagram is submitted when the first times out */
	send_text(c, "#f3=hold|W1");
	wait_hold("f3", "#f3=hold|W1", "W1");
	send_text(c, "#f3=hold|W2");
	expect_dgram(srv, "#f3=hold|W1", "W1 after its timeout");
	wait_hold("f3", "#f3=hold|W2", "W2 held once W1 left");
	expect_dgram(srv, "#f3=hold|W2", "W2 after its own timeout");
	(void)buf;
	check_states_balanced();
}

/* ---- 6. end of stream travels behind held bytes -------------------------------------------- */

static void test_eof_behind_hold(void **state)
{
	int lfd = tcp_listener(), c, sv;
	struct ezp_session_summary s;
	struct tapc *tc;
	struct tev e;
	uint64_t h;

	(void)state;
	current_test = __func__;
	daemon_up(
	    2, "Pipelines:\n" TCP_PIPE("p", "[{script: {Name: f1}}, {script: {Name: f2}}]", "%u"),
	    sock_port(lfd));
	tc = tap_up("p");
	c = tcp_connect(bound_port("p"));
	sv = accept_wait(lfd);

	send_text(c, "#f2=hold|DATA");
	h = wait_hold("f2", "#f2=hold|DATA", "DATA held at f2");
	s = the_session("p");
	assert_int_equal(shutdown(c, SHUT_WR), 0); /* the FIN is now behind the held bytes */
	expect_quiet(sv, "neither the bytes nor the end of stream may pass the hold");
	answer(h, EZP_VERDICT_REPLACE, "data");
	expect_stream(sv, "data", "the held bytes first");
	expect_eof(sv, "then the end of stream");
	/* the other way is still open: half-close */
	send_text(sv, "#f1=hold|reply");
	h = wait_hold("f1", "#f1=hold|reply", "reply held");
	assert_int_equal(shutdown(sv, SHUT_WR), 0);
	expect_quiet(c, "the reply's end of stream waits too");
	answer(h, EZP_VERDICT_PASS, NULL);
	expect_stream(c, "#f1=hold|reply", "the reply");
	expect_eof(c, "the reply's end of stream");
	wait_no_sessions("p");
	e = tap_type(tc, EZP_TAP_SESSION_CLOSED, "closed after both halves");
	assert_int_equal(e.session_id, s.id);
	wait_events("f1", EZP_SESSION_CLOSED, 1, "closed");
	check_states_balanced();
}

/* ---- 7. a chain switch waits for the packet boundary ----------------------------------------- */

static void test_switch_while_held(void **state)
{
	struct ezp_error err = {0};
	int srv = udp_sock(0), c, c2;
	uint64_t a;

	(void)state;
	current_test = __func__;
	daemon_up(2, "Pipelines:\n" UDP_PIPE("p", "[{script: {Name: f1}}]", "%u"), sock_port(srv));
	c = udp_sock(bound_port("p"));
	c2 = udp_sock(bound_port("p"));
	send_text(c2, "idle");
	expect_dgram(srv, "idle", "an idle second session");
	send_text(c, "#f1=hold|A");
	a = wait_hold("f1", "#f1=hold|A", "A");
	assert_int_equal(events_of("f1", EZP_SESSION_OPENED), 2);

	assert_int_equal(ezp_pipeline_set_filters(
			     T->d, "p", "[{script: {Name: g1}}, {script: {Name: g2}}]", &err),
			 EZP_OK);
	/* the idle session switched at once; the one with a held packet did not */
	assert_int_equal(events_of("f1", EZP_SESSION_CLOSED), 1);
	assert_int_equal(events_of("g1", EZP_SESSION_OPENED), 1);
	assert_int_equal(events_of("g2", EZP_SESSION_OPENED), 1);
	/* B still goes through the old chain: it queues behind A */
	send_text(c, "#f1=repl:BB,g1=drop|B");
	wait_seen("f1", -1, "#f1=repl:BB,g1=drop|B", "B in the old chain");
	expect_quiet(srv, "B waits behind A");
	answer(a, EZP_VERDICT_PASS, NULL);
	expect_dgram(srv, "#f1=hold|A", "A");
	expect_dgram(srv, "#f1=repl:BB,g1=drop|BB", "B, replaced by f1, never seen by g1");
	assert_false(saw("g1", "#f1=repl:BB,g1=drop|BB"));
	/* the next packet starts at the boundary: the new chain */
	send_text(c, "#f1=drop,g2=repl:new|C");
	expect_dgram(srv, "#f1=drop,g2=repl:new|new", "C through the new chain");
	assert_false(saw("f1", "#f1=drop,g2=repl:new|C"));
	assert_int_equal(events_of("f1", EZP_SESSION_CLOSED), 2);
	assert_int_equal(events_of("g1", EZP_SESSION_OPENED), 2);
	assert_int_equal(events_of("g2", EZP_SESSION_OPENED), 2);
	/* (when the old chain's instances go: see test_bug_old_chain_outlives_switch) */
	/* and back to no filters at all */
	assert_int_equal(ezp_pipeline_set_filters(T->d, "p", "[]", &err), EZP_OK);
	send_text(c, "#g1=drop|D");
	expect_dgram(srv, "#g1=drop|D", "no filters now");
	assert_int_equal(events_of("g1", EZP_SESSION_CLOSED), 2);
	assert_int_equal(events_of("g2", EZP_SESSION_CLOSED), 2);
	/* once the sessions are gone every instance is: f1 x 2 workers, g1 and g2 x 2 */
	assert_int_equal(ezp_session_close(T->d, the_session_of(c).id, &err), EZP_OK);
	assert_int_equal(ezp_session_close(T->d, the_session_of(c2).id, &err), EZP_OK);
	wait_no_sessions("p");
	pthread_mutex_lock(&S.mu);
	int creates = S.creates, destroys = S.destroys;
	pthread_mutex_unlock(&S.mu);
	assert_int_equal(creates, 6);
	assert_int_equal(destroys, 6);
	check_states_balanced();
}

/* ---- 8. AllLegs: filters and the second client leg ------------------------------------------ */

static void test_all_legs(void **state)
{
	int srv = udp_sock(0), a, b;
	struct sockaddr_in up;
	struct seen sn;

	(void)state;
	current_test = __func__;
	daemon_up(1,
		  "Pipelines:\n"
		  "  - Name: p\n"
		  "    From: {udp: {Listen: 127.0.0.1:0}}\n"
		  "    Through: [{script: {Name: first}}, {script: {Name: every, AllLegs: true}},"
		  " {script-all: {Name: kind}}]\n"
		  "    To: {udp: {Connect: 127.0.0.1:%u}}\n"
		  "    Shared: true\n",
		  sock_port(srv));
	a = udp_sock(bound_port("p"));
	b = udp_sock(bound_port("p"));
	send_text(a, "from-a");
	expect_dgram_from(srv, "from-a", &up, "first client");
	send_text(b, "#first=drop,every=repl:B2|from-b");
	expect_dgram(srv, "#first=drop,every=repl:B2|B2",
		     "second client: only AllLegs filters act on it");
	assert_false(saw("first", "#first=drop,every=repl:B2|from-b"));
	sn = wait_seen("every", EZP_DIR_TO_SERVER, "#first=drop,every=repl:B2|from-b", "AllLegs");
	assert_int_equal(sn.leg, 1);
	sn = wait_seen("kind", EZP_DIR_TO_SERVER, "#first=drop,every=repl:B2|B2", "ALL_LEGS kind");
	assert_int_equal(sn.leg, 1);
	wait_events("first", EZP_SESSION_CHANGED, 1, "the second leg joined");
	wait_events("kind", EZP_SESSION_CHANGED, 1, "the second leg joined");
	/* to the clients: every leg gets it; filters see it once, as leg 0 */
	send_to(srv, &up, "both");
	expect_dgram(a, "both", "to client a");
	expect_dgram(b, "both", "to client b");
	sn = wait_seen("first", EZP_DIR_TO_CLIENT, "both", "to-client");
	assert_int_equal(sn.leg, 0);
	send_text(a, "#first=drop|gone");
	expect_quiet(srv, "leg 0's packets are the plain filters' business");
	check_states_balanced();
}

/* ---- 9. closing from inside a filter, and with packets held -------------------------------- */

static void test_close_in_chain(void **state)
{
	int srv = udp_sock(0), c, c2;
	struct ezp_session_summary s;
	struct ezp_error err = {0};
	struct tapc *tc;
	struct tev e;
	uint64_t a;

	(void)state;
	current_test = __func__;
	daemon_up(1, "Pipelines:\n" UDP_PIPE("p", THREE, "%u"), sock_port(srv));
	tc = tap_up("p");
	c = udp_sock(bound_port("p"));
	send_text(c, "#f2=close|X");
	e = tap_type(tc, EZP_TAP_SESSION_CLOSED, "closed by a filter");
	assert_string_equal(e.close_text, "closed by filter");
	expect_quiet(srv, "the packet of a session closed under it goes nowhere");
	assert_false(saw("f3", "#f2=close|X"));
	wait_no_sessions("p");

	/* a session closed while it holds packets at two stages and queues one more */
	c2 = udp_sock(bound_port("p"));
	send_text(c2, "#f1=hold|H1");
	a = wait_hold("f1", "#f1=hold|H1", "H1");
	send_text(c2, "#f2=hold|H2");
	wait_seen("f1", -1, "#f2=hold|H2", "H2 at f1");
	send_text(c2, "#f3=hold|H3");
	wait_seen("f1", -1, "#f3=hold|H3", "H3 at f1");
	s = the_session("p");
	assert_int_equal(ezp_session_close(T->d, s.id, &err), EZP_OK);
	wait_no_sessions("p");
	answer(a, EZP_VERDICT_REPLACE, "too late"); /* released without effect */
	expect_quiet(srv, "nothing of a closed session is sent");
	(void)c;
	check_states_balanced();
}

/* ---- 10. backpressure on the full path -------------------------------------------------- */

#define BULK (16u << 20)

struct bulk_job {
	int fd;
	size_t len;
	int rc;
	atomic_int done;
};

static void fill_pattern(unsigned char *buf, size_t off, size_t n)
{
	for (size_t i = 0; i < n; i++)
		buf[i] = (unsigned char)('a' + ((off + i) * 7 + (off + i) / 251) % 26);
}

static void *bulk_send(void *arg)
{
	struct bulk_job *j = arg;
	unsigned char buf[16384];
	size_t off = 0;

	while (off < j->len) {
		size_t n = j->len - off < sizeof(buf) ? j->len - off : sizeof(buf);
		fill_pattern(buf, off, n);
		for (size_t done = 0; done < n;) {
			ssize_t w = send(j->fd, buf + done, n - done, MSG_NOSIGNAL);
			if (w < 0 && errno == EINTR)
				continue;
			if (w <= 0) {
				j->rc = -1;
				return NULL;
			}
			done += (size_t)w;
		}
		off += n;
	}
	atomic_store(&j->done, 1);
	return NULL;
}

/* Read @len bytes of the pattern from @fd; returns 0 when intact. */
static int bulk_recv(int fd, size_t len)
{
	unsigned char buf[16384], want[16384];
	size_t off = 0;

	while (off < len) {
		ssize_t n = recv_wait(fd, buf, sizeof(buf) < len - off ? sizeof(buf) : len - off,
				      WAIT_MS);
		if (n <= 0)
			return -1;
		fill_pattern(want, off, (size_t)n);
		if (memcmp(buf, want, (size_t)n))
			return -2;
		off += (size_t)n;
	}
	return 0;
}

static void test_backpressure(void **state)
{
	int lfd = tcp_listener(), c, sv;
	struct ezp_session_summary s;
	struct bulk_job j;
	pthread_t th;
	uint64_t end;
	long before;

	(void)state;
	current_test = __func__;
	daemon_up(1, "Pipelines:\n" TCP_PIPE("p", "[{script: {Name: f1}}]", "%u"), sock_port(lfd));
	c = tcp_connect(bound_port("p"));
	sv = accept_wait(lfd);

	/* the server reads nothing: the proxy's queue fills, then it stops reading the client */
	j = (struct bulk_job){c, BULK, 0, 0};
	assert_int_equal(pthread_create(&th, NULL, bulk_send, &j), 0);
	end = mono_ms() + WAIT_MS;
	do { /* wait until the flow has stalled */
		pthread_mutex_lock(&S.mu);
		before = S.bytes_seen;
		pthread_mutex_unlock(&S.mu);
		struct timespec ts = {0, 100 * 1000000L};
		nanosleep(&ts, NULL);
		pthread_mutex_lock(&S.mu);
		long now = S.bytes_seen;
		pthread_mutex_unlock(&S.mu);
		if (now == before && now > 0)
			break;
	} while (mono_ms() < end);
	s = the_session("p");
	if (s.bytes[EZP_DIR_TO_SERVER] >= BULK || atomic_load(&j.done))
		fail_msg(
		    "the proxy read all %u bytes although the server read none: no backpressure",
		    BULK);
	/* now the server reads: everything arrives, intact and in order */
	if (bulk_recv(sv, BULK) != 0)
		fail_msg("bulk data to the server lost or corrupted under backpressure");
	pthread_join(th, NULL);
	assert_int_equal(j.rc, 0);

	/* the same the other way: the client does not read */
	pthread_mutex_lock(&S.mu);
	S.bytes_seen = 0;
	pthread_mutex_unlock(&S.mu);
	j = (struct bulk_job){sv, BULK, 0, 0};
	assert_int_equal(pthread_create(&th, NULL, bulk_send, &j), 0);
	end = mono_ms() + WAIT_MS;
	do {
		pthread_mutex_lock(&S.mu);
		before = S.bytes_seen;
		pthread_mutex_unlock(&S.mu);
		struct timespec ts = {0, 100 * 1000000L};
		nanosleep(&ts, NULL);
		pthread_mutex_lock(&S.mu);
		long now = S.bytes_seen;
		pthread_mutex_unlock(&S.mu);
		if (now == before && now > 0)
			break;
	} while (mono_ms() < end);
	s = the_session("p");
	assert_true(s.bytes[EZP_DIR_TO_CLIENT] < BULK);
	assert_false(atomic_load(&j.done));
	if (bulk_recv(c, BULK) != 0)
		fail_msg("bulk data to the client lost or corrupted under backpressure");
	pthread_join(th, NULL);
	assert_int_equal(j.rc, 0);
	check_states_balanced();
}

/* ---- 11. an exclusive filter in a chain with plain ones ------------------------------------ */

struct hold_rec {
	pthread_mutex_t mu;
	uint64_t ids[16];
	int n, events[4], released;
};

static int holder_packet(void *userdata, struct ezp_filter_call *call)
{
	struct hold_rec *h = userdata;
	int v = EZP_VERDICT_PASS;

	pthread_mutex_lock(&h->mu);
	if (call->pkt->len >= 4 && !memcmp(call->pkt->data, "hold", 4) && h->n < 16) {
		h->ids[h->n++] = call->hold_id;
		v = EZP_VERDICT_HOLD;
	}
	pthread_mutex_unlock(&h->mu);
	return v;
}

static void holder_event(void *userdata, const struct ezp_session_info *info, int event)
{
	struct hold_rec *h = userdata;

	(void)info;
	pthread_mutex_lock(&h->mu);
	if (event >= 1 && event <= 3)
		h->events[event]++;
	pthread_mutex_unlock(&h->mu);
}

static void holder_released(void *userdata)
{
	struct hold_rec *h = userdata;

	pthread_mutex_lock(&h->mu);
	h->released++;
	pthread_mutex_unlock(&h->mu);
}

static void test_exclusive_in_chain(void **state)
{
	static struct hold_rec h; /* the daemon may call it until teardown */
	struct ezp_filter_holder fh = {.struct_size = sizeof(fh),
				       .name = "chain-test",
				       .userdata = &h,
				       .on_packet = holder_packet,
				       .on_session_event = holder_event,
				       .on_released = holder_released};
	struct ezp_error err = {0};
	int srv = udp_sock(0), c;
	uint64_t end;
	int n;

	(void)state;
	current_test = __func__;
	memset(&h, 0, sizeof(h));
	pthread_mutex_init(&h.mu, NULL);
	daemon_up(1,
		  "Pipelines:\n" UDP_PIPE("p",
					  "[{script: {Name: f1}}, {callback: {Name: x, Default: "
					  "drop}}, {script: {Name: f3}}]",
					  "%u"),
		  sock_port(srv));
	assert_int_equal(ezp_filter_claim(T->d, "p", "callback:x", &fh, &T->claims[0], &err),
			 EZP_OK);
	T->n_claims = 1;
	c = udp_sock(bound_port("p"));
	send_text(c, "hold-1");
	end = mono_ms() + WAIT_MS;
	do {
		pthread_mutex_lock(&h.mu);
		n = h.n;
		pthread_mutex_unlock(&h.mu);
		if (!n)
			poll_pause();
	} while (!n && mono_ms() < end);
	assert_int_equal(n, 1);
	send_text(c, "after");
	wait_seen("f1", -1, "after", "behind the holder's packet");
	expect_quiet(srv, "behind the holder's packet");
	pthread_mutex_lock(&h.mu);
	assert_int_equal(h.events[EZP_SESSION_OPENED], 1);
	pthread_mutex_unlock(&h.mu);
	/* the holder goes away: its held packet gets the stage default (drop) at once */
	ezp_claim_release(T->claims[0]);
	T->n_claims = 0;
	assert_int_equal(h.released, 1);
	expect_dgram(srv, "after", "the queued packet after the release");
	assert_false(saw("f3", "hold-1"));
	/* unclaimed, the exclusive stage passes everything */
	send_text(c, "hold-2");
	expect_dgram(srv, "hold-2", "unclaimed");
}

/* ---- regressions: bugs these tests found in core/, now fixed -------------- */

/*
 * chain.c entry_submit(): a packet that a filter REPLACEs while it is queued
 * behind a held one gets a replacement whose head (session_id, dir, leg,
 * ts_us, flags) is never filled in, unlike stage_leave() and
 * ezp__chain_answer(). Later filters then see a to-client packet as
 * to-server, session 0, no REPLACED flag; taps show flags 0.
 */
/* ---- a dormant stage: skipped and off the fast path's way until woken ----------------- */

static struct ezp_session_summary wait_bridged(int want, const char *what)
{
	uint64_t end = mono_ms() + WAIT_MS;
	struct ezp_session_summary s;

	do {
		s = the_session("p");
		if (s.bridged == want)
			return s;
		poll_pause();
	} while (mono_ms() < end);
	fail_msg("%s: the session is %sbridged", what, s.bridged ? "" : "not ");
	return s;
}

static void test_dormant_stage(void **state)
{
	const struct ezp_core *core;
	const struct ezp__hold_conf *h;
	struct ezp__pipe_gen *g;
	struct ezp_stage *stage;
	int lfd = tcp_listener(), c, sv;

	(void)state;
	current_test = __func__;
	daemon_up(1, "Pipelines:\n" TCP_PIPE("p", "[{sleepy: {Name: s1}}, {sleepy: {Name: s2, "
						  "HoldWindow: 3}}]", "%u"),
		  sock_port(lfd));
	core = ezp_daemon_core(T->d);
	/* the kind's hold defaults, unless the item sets its own */
	g = ezp__pipeline_gen(ezp__pipeline_find((struct ezp_core_ctx *)T->d, "p"));
	h = &g->chain->stages[0].conf.hold;
	assert_int_equal(h->window, 7);
	assert_int_equal(h->timeout_ms, 12345);
	assert_int_equal(g->chain->stages[1].conf.hold.window, 3);
	ezp__gen_unref(g);

	c = tcp_connect(bound_port("p"));
	sv = accept_wait(lfd);
	send_text(c, "#s1=drop|asleep");
	expect_stream(sv, "#s1=drop|asleep", "an asleep stage passes without a call");
	wait_bridged(1, "asleep");
	assert_int_equal(count_seen_by("s1"), 0);

	pthread_mutex_lock(&S.mu);
	stage = sleepy_stage; /* s2's, created last */
	pthread_mutex_unlock(&S.mu);
	core->stage_wake(stage, 1);
	wait_bridged(0, "woken");
	send_text(c, "#s2=drop|awake");
	expect_quiet(sv, "the woken stage dropped it");
	send_text(c, "#s2=repl:NEW|x");
	expect_stream(sv, "#s2=repl:NEW|NEW", "the woken stage replaced it");
	assert_int_equal(count_seen_by("s1"), 0);
	core->stage_wake(stage, 1); /* again: nothing changes */

	core->stage_wake(stage, 0);
	wait_bridged(1, "asleep again: back on the fast path");
	send_text(c, "#s2=drop|asleep again");
	expect_stream(sv, "#s2=drop|asleep again", "asleep again: passes");
	check_states_balanced();
}

static void test_bug_queued_replace_loses_head(void **state)
{
	int srv = udp_sock(0), c;
	struct ezp_session_summary s;
	struct sockaddr_in up;
	struct seen sn;
	struct tapc *tc;
	struct tev e;
	uint64_t a;

	(void)state;
	current_test = __func__;
	daemon_up(
	    1, "Pipelines:\n" UDP_PIPE("p", "[{script: {Name: f1}}, {script: {Name: f2}}]", "%u"),
	    sock_port(srv));
	tc = tap_up("p");
	c = udp_sock(bound_port("p"));
	send_text(c, "hello");
	expect_dgram_from(srv, "hello", &up, "hello");
	s = the_session("p");

	/* to-client: X held at f1, Z replaced by f1 while queued behind X */
	send_to(srv, &up, "#f1=hold|X");
	a = wait_hold("f1", "#f1=hold|X", "X");
	send_to(srv, &up, "#f1=repl:Y|Z");
	wait_seen("f1", -1, "#f1=repl:Y|Z", "Z decided while X is held");
	answer(a, EZP_VERDICT_PASS, NULL);
	expect_dgram(c, "#f1=hold|X", "X");
	expect_dgram(c, "#f1=repl:Y|Y", "Z replaced");
	sn = wait_seen("f2", -1, "#f1=repl:Y|Y", "f2 sees the replacement");
	e = tap_packet(tc, -1, "#f1=repl:Y|Y", "the tap sees the replacement");
	if (sn.dir != EZP_DIR_TO_CLIENT || sn.session_id != s.id || sn.flags != EZP_PKT_REPLACED ||
	    !sn.ts_us)
		fail_msg(
		    "f2 saw a replaced to-client packet as dir %d, session %llu, flags %#x, ts "
		    "%llu (expected dir %d, session %llu, flags %#x, a timestamp)",
		    sn.dir, (unsigned long long)sn.session_id, sn.flags,
		    (unsigned long long)sn.ts_us, EZP_DIR_TO_CLIENT, (unsigned long long)s.id,
		    EZP_PKT_REPLACED);
	check_tev(&e, EZP_PKT_REPLACED, EZP_VERDICT_REPLACE, "#f1=repl:Y|Z", "tap of Z");
}

/*
 * A filter chain replaced by ezp_pipeline_set_filters() (or a reload) stays
 * alive, with its filter instances, after every session has moved to the
 * new chain: each session keeps a reference to the generation it started
 * with (session.c, s->gen, for its legs' configs), and that generation holds
 * the old chain. Old instances (a capture file, a Lua state) live until the
 * last of those sessions ends, however long.
 */
static void test_bug_old_chain_outlives_switch(void **state)
{
	struct ezp_error err = {0};
	int srv = udp_sock(0), c;
	uint64_t end;
	int destroys;

	(void)state;
	current_test = __func__;
	daemon_up(1, "Pipelines:\n" UDP_PIPE("p", "[{script: {Name: f1}}]", "%u"), sock_port(srv));
	c = udp_sock(bound_port("p"));
	send_text(c, "one");
	expect_dgram(srv, "one", "one");
	assert_int_equal(ezp_pipeline_set_filters(T->d, "p", "[{script: {Name: g1}}]", &err),
			 EZP_OK);
	/* the session moved (f1 closed, g1 opened): nothing uses f1 any more */
	wait_events("f1", EZP_SESSION_CLOSED, 1, "switch");
	wait_events("g1", EZP_SESSION_OPENED, 1, "switch");
	send_text(c, "two");
	expect_dgram(srv, "two", "two");
	end = mono_ms() + WAIT_MS;
	do {
		pthread_mutex_lock(&S.mu);
		destroys = S.destroys;
		pthread_mutex_unlock(&S.mu);
		if (destroys < 1)
			poll_pause();
	} while (destroys < 1 && mono_ms() < end);
	if (destroys != 1)
		fail_msg("the old chain's filter instance was not destroyed after the switch "
			 "(%d destroyed); it lives as long as the session",
			 destroys);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_verdicts_three_filters, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_holds_at_stages, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bad_answers, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_window_pause_resume, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_window_defers_submission, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_datagram_overflow, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_timeouts, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_eof_behind_hold, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_switch_while_held, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_all_legs, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_close_in_chain, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_backpressure, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_exclusive_in_chain, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_dormant_stage, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bug_queued_replace_loses_head, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_bug_old_chain_outlives_switch, setup, teardown),
	};
	const char *preload = getenv("LD_PRELOAD");
	pthread_condattr_t ca;

	if (preload && strstr(preload, "vgpreload")) /* valgrind: everything is slower */
		slow = 10;
	pthread_mutex_init(&S.mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&S.cv, &ca);
	pthread_condattr_destroy(&ca);
	if (getenv("EZP_TEST_FILTER")) /* e.g. EZP_TEST_FILTER='test_timeouts' */
		cmocka_set_test_filter(getenv("EZP_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
