/*
 * server.c - the `http-api` service: start and stop, libmicrohttpd driven
 * from the core's service loop, and blocking work moved off the loop. A
 * request itself is answered in request.c, its reply made in reply.c.
 *
 * libmicrohttpd runs without a thread of its own (MHD_USE_EPOLL): its
 * epoll fd is watched on the service loop, MHD_run() runs on readiness and
 * a core timer is re-armed from MHD_get_timeout() after every run. The
 * listening socket is made here so the bound port is known (port 0).
 *
 * Threads: start/stop run on the control thread and hand everything that
 * touches libmicrohttpd to the service loop (defer + wait); requests are
 * answered on the service loop; api_run_blocking() work runs on a detached
 * thread of its own while its connection is suspended. Keys and the
 * ?key= query are never logged; bodies never above debug (and not even
 * there).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api.h"

#define SRV_SRC "http-api"
#define SRV_BACKLOG 128
#define SRV_CONN_LIMIT 1024u
#define SRV_CONN_TIMEOUT_S 120u
#define SRV_PEM_MAX (1u << 20)

/* Kept from init(); each instance uses its own copy (api.core). */
static const struct ezp_core *srv_core;

/* The plugin's state: struct api first, so a struct api * is a struct srv *. */
struct srv {
	struct api api;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned n_blocking; /* connections suspended for api_run_blocking (lock) */
	bool closing;	     /* stop() has begun (lock) */
	int epoll_fd;
	bool setup_ok, subscribed;
	bool wake_queued; /* an api_wake() run is queued on the loop */
};

static struct srv *srv_of(struct api *api)
{
	return (struct srv *)api;
}

/* ---- the loop: MHD_run on readiness, timer from MHD_get_timeout ---- */

static void srv_run(struct srv *s)
{
	MHD_UNSIGNED_LONG_LONG ms = 0;

	if (!s->api.mhd)
		return;
	MHD_run(s->api.mhd);
	if (MHD_get_timeout(s->api.mhd, &ms) == MHD_YES)
		s->api.core->timer_start(s->api.mhd_timer, ms > 3600000u ? 3600000u : ms, 0);
	else
		s->api.core->timer_stop(s->api.mhd_timer);
}

static void srv_on_timer(void *arg)
{
	srv_run(arg);
}

static void srv_wake_run(void *arg)
{
	struct srv *s = arg;

	s->wake_queued = false;
	srv_run(s);
}

void api_wake(struct api *api)
{
	struct srv *s = srv_of(api);

	if (api->stopping) /* teardown runs libmicrohttpd itself; nothing may be queued after it */
		return;
	if (!s->wake_queued && api->core->defer(api->w, srv_wake_run, s) == EZP_OK)
		s->wake_queued = true;
}

static void srv_on_ready(int fd, unsigned events, void *arg)
{
	(void)fd;
	(void)events;
	srv_run(arg);
}

/* Run @fn(@s) on the service loop and wait for it. -1 when the loop is gone. */
struct srv_call {
	struct srv *s;
	void (*fn)(struct srv *s);
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
};

static void srv_call_run(void *arg)
{
	struct srv_call *c = arg;

	c->fn(c->s);
	pthread_mutex_lock(&c->lock);
	c->done = true;
	pthread_cond_signal(&c->cond);
	pthread_mutex_unlock(&c->lock);
}

static int srv_on_loop(struct srv *s, void (*fn)(struct srv *s))
{
	struct srv_call c = {.s = s, .fn = fn};

	if (s->api.core->worker_current() == s->api.w) {
		fn(s);
		return 0;
	}
	pthread_mutex_init(&c.lock, NULL);
	pthread_cond_init(&c.cond, NULL);
	if (s->api.core->defer(s->api.w, srv_call_run, &c) != EZP_OK) {
		pthread_mutex_destroy(&c.lock);
		pthread_cond_destroy(&c.cond);
		return -1;
	}
	pthread_mutex_lock(&c.lock);
	while (!c.done)
		pthread_cond_wait(&c.cond, &c.lock);
	pthread_mutex_unlock(&c.lock);
	pthread_mutex_destroy(&c.lock);
	pthread_cond_destroy(&c.cond);
	return 0;
}

static void srv_key_revoked(void *userdata, const char *key_id)
{
	ws_close_key(userdata, key_id);
}

static void srv_setup(struct srv *s)
{
	struct api *api = &s->api;

	api->mhd_timer = api->core->timer_new(api->w, srv_on_timer, s);
	api->mhd_watch = api->mhd_timer ? api->core->watch_add(api->w, s->epoll_fd, EZP_WATCH_READ,
							       srv_on_ready, s)
					: NULL;
	if (!api->mhd_watch)
		return;
	if (api->auth && api->auth->subscribe) {
		if (api->auth->subscribe(api->auth->auth, srv_key_revoked, api) != EZP_OK)
			return;
		s->subscribed = true;
	}
	s->setup_ok = true;
	srv_run(s);
}

static void srv_teardown(struct srv *s)
{
	struct api *api = &s->api;

	api->stopping = true;
	if (api->mhd)
		ws_close_all(api);
	if (api->mhd)
		api_capture_close_all(api);
	if (s->subscribed)
		api->auth->unsubscribe(api->auth->auth, srv_key_revoked, api);
	s->subscribed = false;
	api->core->watch_free(api->mhd_watch);
	api->mhd_watch = NULL;
	api->core->timer_free(api->mhd_timer);
	api->mhd_timer = NULL;
	if (api->mhd)
		MHD_stop_daemon(api->mhd); /* closes the listening socket too */
	api->mhd = NULL;
}

static void srv_work_resume(void *arg)
{
	struct api_req *r = arg;
	struct srv *s = srv_of(r->api);

	MHD_resume_connection(r->conn);
	pthread_mutex_lock(&s->lock);
	s->n_blocking--;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	srv_run(s);
}

static void *srv_work_main(void *arg)
{
	struct api_req *r = arg;
	struct srv *s = srv_of(r->api);

	r->work(r);
	if (!r->resp)
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "the call made no answer");
	r->work_done = true;
	if (s->api.core->defer(s->api.w, srv_work_resume, r) != EZP_OK) {
		s->api.core->log(EZP_LOG_WARN, SRV_SRC,
				 "cannot resume a request: the service loop is gone");
		pthread_mutex_lock(&s->lock);
		s->n_blocking--;
		pthread_cond_broadcast(&s->cond);
		pthread_mutex_unlock(&s->lock);
	}
	return NULL;
}

void api_run_blocking(struct api_req *r, void (*work)(struct api_req *r))
{
	struct srv *s = srv_of(r->api);
	pthread_attr_t attr;
	pthread_t t;
	int rc;

	pthread_mutex_lock(&s->lock);
	if (s->closing) {
		pthread_mutex_unlock(&s->lock);
		api_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", "the API is stopping");
		return;
	}
	s->n_blocking++;
	pthread_mutex_unlock(&s->lock);
	r->work = work;
	r->work_done = false;
	r->suspended = true;
	MHD_suspend_connection(r->conn);
	if (s->api.core->log_enabled(EZP_LOG_DEBUG))
		s->api.core->log(EZP_LOG_DEBUG, SRV_SRC, "%s %s: waiting on a thread of its own",
				 r->method, r->url);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	rc = pthread_create(&t, &attr, srv_work_main, r);
	pthread_attr_destroy(&attr);
	if (rc != 0) {
		MHD_resume_connection(r->conn);
		r->suspended = false;
		pthread_mutex_lock(&s->lock);
		s->n_blocking--;
		pthread_cond_broadcast(&s->cond);
		pthread_mutex_unlock(&s->lock);
		api_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable",
			  "cannot start a thread: %s", strerror(rc));
	}
}

static void srv_mhd_log(void *cls, const char *fmt, va_list ap)
{
	struct srv *s = cls;
	char buf[512];
	size_t n;

	vsnprintf(buf, sizeof(buf), fmt, ap);
	n = strlen(buf);
	while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		buf[--n] = '\0';
	if (strstr(buf, "key=") || strcasestr(buf, "bearer"))
		return; /* never let a key reach the log */
	s->api.core->log(EZP_LOG_DEBUG, SRV_SRC, "libmicrohttpd: %s", buf);
}

/* ---- start / stop (control thread) ---- */

static int srv_fail(struct ezp_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int srv_fail(struct ezp_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (err) {
		memset(err, 0, sizeof(*err));
		err->code = code;
		err->side = EZP_SIDE_CONFIG;
		va_start(ap, fmt);
		vsnprintf(err->message, sizeof(err->message), fmt, ap);
		va_end(ap);
	}
	return code;
}

static bool srv_loopback(const struct ezp_addr *a)
{
	if (a->ss.ss_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)&a->ss;
		return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
	}
	if (a->ss.ss_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&a->ss;
		const uint8_t *b = in6->sin6_addr.s6_addr;
		return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr) ||
		       (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) && b[12] == 127);
	}
	return false;
}

static char *srv_read_pem(const char *path, const char *what, struct ezp_error *err)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	size_t n;

	if (!f) {
		srv_fail(err, EZP_ERR_CONFIG, "cannot read the TLS %s %s: %s (Api.Tls)", what, path,
			 strerror(errno));
		return NULL;
	}
	buf = malloc(SRV_PEM_MAX + 1);
	n = buf ? fread(buf, 1, SRV_PEM_MAX + 1, f) : 0;
	fclose(f);
	if (!buf || n == 0 || n > SRV_PEM_MAX) {
		free(buf);
		srv_fail(err, EZP_ERR_CONFIG, "the TLS %s %s is empty or too large (Api.Tls)", what,
			 path);
		return NULL;
	}
	buf[n] = '\0';
	return buf;
}

static int srv_listen(struct srv *s, struct ezp_error *err)
{
	struct api *api = &s->api;
	struct ezp_addr a;
	struct ezp_error perr = {0};
	int fd, one = 1;

	if (api->core->addr_parse(api->listen, &a, &perr) != EZP_OK)
		return srv_fail(err, EZP_ERR_CONFIG, "Api.Listen '%s': %s", api->listen,
				perr.message);
	if (!api->auth && !srv_loopback(&a))
		return srv_fail(err, EZP_ERR_CONFIG,
				"Api.Auth is false but Api.Listen %s is not a loopback address: "
				"turn Auth on or listen on 127.0.0.1",
				api->listen);
	fd = socket(a.ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return srv_fail(err, EZP_ERR_IO, "cannot listen on %s: %s", api->listen,
				strerror(errno));
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a.ss, a.len) < 0 || listen(fd, SRV_BACKLOG) < 0) {
		int e = errno;
		close(fd);
		return srv_fail(err, EZP_ERR_IO, "cannot listen on %s: %s; pick another Api.Listen",
				api->listen, strerror(e));
	}
	api->bound.len = sizeof(api->bound.ss);
	if (getsockname(fd, (struct sockaddr *)&api->bound.ss, &api->bound.len) < 0) {
		int e = errno;
		close(fd);
		return srv_fail(err, EZP_ERR_IO, "cannot listen on %s: %s", api->listen,
				strerror(e));
	}
	return fd;
}

static void srv_free(struct srv *s)
{
	if (!s)
		return;
	api_metrics_free(&s->api);
	free(s->api.listen);
	free(s->api.origin);
	free(s->api.web_root);
	free(s->api.tls_cert_pem);
	free(s->api.tls_key_pem);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
	free(s);
}

static char *srv_strdup(const char *v)
{
	return v ? strdup(v) : NULL;
}

static int srv_start(const struct ezp_core *core, const void *config, void **state,
		     struct ezp_error *err)
{
	const struct ezp_api_conf *conf = config;
	const struct ezp_control *ctl;
	const struct ezp_auth *auth;
	const union MHD_DaemonInfo *info;
	unsigned flags =
	    MHD_USE_ERROR_LOG | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_ALLOW_UPGRADE;
	struct srv *s = NULL;
	char host[EZP_ADDR_STRLEN];
	int fd = -1, rc;

	if (!conf || conf->struct_size < offsetof(struct ezp_api_conf, web_root) || !conf->listen)
		return srv_fail(err, EZP_ERR_INVAL, "http-api: no Api configuration was given");
	ctl = core->find_service(core->ctx, EZP_CONTROL_IFACE, EZP_CONTROL_VERSION);
	if (!ctl)
		return srv_fail(err, EZP_ERR_UNSUPPORTED,
				"http-api: the core does not provide ezp.control");
	auth = core->find_service(core->ctx, EZP_AUTH_IFACE, EZP_AUTH_VERSION);
	if (conf->auth && !auth)
		return srv_fail(
		    err, EZP_ERR_CONFIG,
		    "Api.Auth is true but the auth plugin is not loaded: install auth.so "
		    "beside http-api.so (Plugins.Path) or set Api.Auth: false");
	s = calloc(1, sizeof(*s));
	if (!s)
		return srv_fail(err, EZP_ERR_NOMEM, "http-api: out of memory");
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	s->epoll_fd = -1;
	s->api.core = core;
	s->api.ctx = core->ctx;
	s->api.ctl = ctl;
	s->api.auth = conf->auth ? auth : NULL;
	s->api.fault = core->find_service(core->ctx, EZP_FAULT_IFACE, EZP_FAULT_VERSION);
	s->api.w = ctl->service_worker(core->ctx);
	s->api.capture = core->find_service(core->ctx, EZP_CAPTURE_IFACE, EZP_CAPTURE_VERSION);
	s->api.started_us = core->now_us();
	s->api.listen = srv_strdup(conf->listen);
	s->api.origin = srv_strdup(conf->origin);
	s->api.web_root = srv_strdup(conf->web_root);
	if (!s->api.listen || (conf->origin && !s->api.origin) ||
	    (conf->web_root && !s->api.web_root)) {
		rc = srv_fail(err, EZP_ERR_NOMEM, "http-api: out of memory");
		goto fail;
	}
	if (!s->api.w) {
		rc = srv_fail(err, EZP_ERR_UNSUPPORTED, "http-api: the core has no service loop");
		goto fail;
	}
	if ((conf->tls_cert != NULL) != (conf->tls_key != NULL)) {
		rc = srv_fail(err, EZP_ERR_CONFIG, "Api.Tls needs both Cert and Key");
		goto fail;
	}
	if (conf->tls_cert) {
		s->api.tls_cert_pem = srv_read_pem(conf->tls_cert, "certificate", err);
		s->api.tls_key_pem =
		    s->api.tls_cert_pem ? srv_read_pem(conf->tls_key, "key", err) : NULL;
		if (!s->api.tls_key_pem) {
			rc = err ? err->code : EZP_ERR_CONFIG;
			goto fail;
		}
		s->api.tls = true;
		flags |= MHD_USE_TLS;
	}
	if (api_metrics_new(&s->api) != EZP_OK) {
		rc = srv_fail(err, EZP_ERR_NOMEM, "http-api: out of memory");
		goto fail;
	}
	fd = srv_listen(s, err);
	if (fd < 0) {
		rc = fd;
		goto fail;
	}
	if (s->api.bound.ss.ss_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	if (s->api.tls)
		s->api.mhd = MHD_start_daemon(
		    flags, 0, NULL, NULL, api_request_access, &s->api, MHD_OPTION_EXTERNAL_LOGGER,
		    srv_mhd_log, s, MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_NOTIFY_COMPLETED,
		    api_request_completed, &s->api, MHD_OPTION_CONNECTION_TIMEOUT,
		    SRV_CONN_TIMEOUT_S, MHD_OPTION_CONNECTION_LIMIT, SRV_CONN_LIMIT,
		    MHD_OPTION_HTTPS_MEM_KEY, s->api.tls_key_pem, MHD_OPTION_HTTPS_MEM_CERT,
		    s->api.tls_cert_pem, MHD_OPTION_END);
	else
		s->api.mhd = MHD_start_daemon(
		    flags, 0, NULL, NULL, api_request_access, &s->api, MHD_OPTION_EXTERNAL_LOGGER,
		    srv_mhd_log, s, MHD_OPTION_LISTEN_SOCKET, fd, MHD_OPTION_NOTIFY_COMPLETED,
		    api_request_completed, &s->api, MHD_OPTION_CONNECTION_TIMEOUT,
		    SRV_CONN_TIMEOUT_S, MHD_OPTION_CONNECTION_LIMIT, SRV_CONN_LIMIT,
		    MHD_OPTION_END);
	if (!s->api.mhd) {
		rc = srv_fail(err, EZP_ERR_IO, "http-api: libmicrohttpd cannot start on %s%s",
			      s->api.listen,
			      s->api.tls ? " (check the TLS certificate and key)" : "");
		goto fail;
	}
	fd = -1; /* libmicrohttpd closes it */
	info = MHD_get_daemon_info(s->api.mhd, MHD_DAEMON_INFO_EPOLL_FD);
	s->epoll_fd = info ? info->epoll_fd : -1;
	if (s->epoll_fd < 0) {
		rc = srv_fail(err, EZP_ERR_IO, "http-api: libmicrohttpd has no epoll fd");
		goto fail;
	}
	if (srv_on_loop(s, srv_setup) != 0 || !s->setup_ok) {
		rc = srv_fail(err, EZP_ERR_IO,
			      "http-api: cannot watch the API socket on the "
			      "service loop");
		goto fail;
	}
	core->log(EZP_LOG_INFO, SRV_SRC, "listening on %s://%s", s->api.tls ? "https" : "http",
		  core->addr_format(&s->api.bound, host, sizeof(host)));
	*state = s;
	return EZP_OK;
fail:
	if (fd >= 0)
		close(fd);
	if (s->api.mhd && srv_on_loop(s, srv_teardown) != 0)
		srv_teardown(s);
	srv_free(s);
	return rc;
}

/*
 * Nothing: run after teardown, it returns once every call queued on the loop
 * before it has run - an api_wake() queued just before teardown (a capture
 * stream resumed in the same batch) still finds @s alive; after teardown
 * nothing is queued (api->stopping).
 */
static void srv_barrier(struct srv *s)
{
	(void)s;
}

static void srv_stop(void *state)
{
	struct srv *s = state;

	if (!s)
		return;
	pthread_mutex_lock(&s->lock);
	s->closing = true;
	if (s->n_blocking)
		s->api.core->log(EZP_LOG_INFO, SRV_SRC, "waiting for %u API call(s) to finish",
				 s->n_blocking);
	while (s->n_blocking)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	if (srv_on_loop(s, srv_teardown) != 0)
		srv_teardown(s); /* the loop is gone: nothing else runs now */
	else
		srv_on_loop(s, srv_barrier);
	srv_free(s);
}

static int srv_init(const struct ezp_core *core, struct ezp_error *err)
{
	(void)err;
	srv_core = core;
	return EZP_OK;
}

static const struct ezp_service_kind srv_kind = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "http-api",
    .description = "HTTP API: v3 REST, the old v1/v2 API, WebSocket, /metrics",
    .params = NULL,
    .config_size = 0,
    .start = srv_start,
    .stop = srv_stop,
};

static const struct ezp_service_kind *const srv_services[] = {&srv_kind, NULL};

EZP_PLUGIN_DEFINE(ezp_plugin, .name = "http-api", .version = "0.1.0",
		  .description = "the HTTP API service (libmicrohttpd on the core's service loop)",
		  .license = "MIT", .init = srv_init, .services = srv_services);
