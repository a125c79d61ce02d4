/*
 * capture.c - the capture plugin: the `capture` filter kind (a dormant,
 * read-only stage that only carries the File config: its writer taps the
 * pipeline, see capfile.c), the `capture` service with the "ezp.capture"
 * interface (live pcapng streams for the http-api), and the descriptor.
 *
 * A live stream is a tap delivered on the core's service loop; its encoder
 * (capenc.c) runs there and hands each block to the stream's write
 * callback. A stream of one session ends after that session closes; every
 * stream writes a statistics block after 1 s without traffic, so a reader
 * that went away is noticed.
 *
 * Threads: filter create on the control thread, session_event on the
 * instance's worker, destroy on any; the service's start/stop on the
 * control thread (stop hands its work to the service loop); streams on the
 * service loop.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>

#include "capture.h"

#define CAP_KEEPALIVE_MS 1000

/* ---- the filter kind ---- */

static const struct ezp_param cap_params[] = {
    {"File", EZP_PARAM_STRING, offsetof(struct cap_conf, file), NULL, 1, 0, 0,
     "the pcapng file (relative: to the daemon's working directory; missing folders are "
     "made); truncated when the capture starts"},
    {"RotateBytes", EZP_PARAM_INT, offsetof(struct cap_conf, rotate_bytes), "0", 0, 0, INT64_MAX,
     "start a new file when this one reaches this size (0: never); at least 4096"},
    {"RotateFiles", EZP_PARAM_INT, offsetof(struct cap_conf, rotate_files), "10", 0, 0, 100000,
     "rotated files kept beside File (File.1 is the newest); 0: only the current one"},
    EZP_PARAM_END,
};

struct cap_inst {
	const struct ezp_core *core;
	struct cap_writer *w;
};

static int cap_config_error(struct ezp_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static int cap_config_error(struct ezp_error *err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	err->code = EZP_ERR_CONFIG;
	err->side = EZP_SIDE_CONFIG;
	return EZP_ERR_CONFIG;
}

static int cap_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
		      struct ezp_error *err)
{
	const struct cap_conf *conf = config;
	struct cap_inst *in;

	if (!conf->file || !*conf->file)
		return cap_config_error(err, "capture: File must name a file");
	if (conf->rotate_bytes > 0 && conf->rotate_bytes < 4096)
		return cap_config_error(err,
					"capture: RotateBytes must be 0 (no rotation) or at "
					"least 4096, not %lld",
					(long long)conf->rotate_bytes);
	in = calloc(1, sizeof(*in));
	if (!in) {
		snprintf(err->message, sizeof(err->message), "capture: out of memory");
		err->code = EZP_ERR_NOMEM;
		return EZP_ERR_NOMEM;
	}
	in->core = ctx->core;
	in->w = cap_writer_get(ctx->core, ctx->pipeline, conf, err);
	if (!in->w) {
		free(in);
		return err->code ? err->code : EZP_ERR;
	}
	*instance = in;
	return EZP_OK;
}

/* Never called: the stage stays dormant (the writer's tap sees every packet). */
static int cap_packet(void *instance, struct ezp_filter_call *call)
{
	(void)instance;
	(void)call;
	return EZP_VERDICT_PASS;
}

static void cap_session_event(void *instance, struct ezp_session *session, int event,
			      void **session_state)
{
	struct cap_inst *in = instance;
	struct ezp_session_info info;

	(void)session_state;
	if (event != EZP_SESSION_OPENED || !in->w)
		return;
	memset(&info, 0, sizeof(info));
	info.struct_size = sizeof(info);
	in->core->session_info(session, &info);
	cap_writer_hint(in->w, cap_transport_of(info.transport));
}

static void cap_destroy(void *instance)
{
	struct cap_inst *in = instance;

	if (!in)
		return;
	cap_writer_put(in->w);
	free(in);
}

static const struct ezp_filter_kind cap_filter_kind = {
    .struct_size = sizeof(struct ezp_filter_kind),
    .name = "capture",
    .description = "writes the pipeline's packets, with their verdicts, to a pcapng file "
		   "(synthesised Ethernet/IP/TCP|UDP headers; Wireshark reads it)",
    .flags = EZP_FILTER_DORMANT | EZP_FILTER_READ_ONLY,
    .params = cap_params,
    .config_size = sizeof(struct cap_conf),
    .create = cap_create,
    .packet = cap_packet,
    .session_event = cap_session_event,
    .destroy = cap_destroy,
};

/* ---- the service: live streams ---- */

struct cap_tcache {
	struct cap_tcache *next;
	int transport;
	char pipeline[72];
};

struct cap_svc {
	const struct ezp_core *core;
	const struct ezp_control *ctl;
	struct ezp_worker *w;
	struct ezp_capture iface;
	struct ezp_capture_stream *streams;
};

struct ezp_capture_stream {
	struct ezp_capture_stream *next;
	struct cap_svc *svc;
	struct cap_enc *enc;
	struct ezp_tap *tap;
	struct ezp_timer *keepalive;
	ezp_capture_write_fn write;
	void *ud;
	char *pipeline;
	uint64_t session_id;
	bool ended; /* write said stop, or the stream ended by itself */
	uint64_t last_write_us;
	struct cap_tcache *tcache;
};

static void st_sink(void *ud, const uint8_t *block, size_t len)
{
	struct ezp_capture_stream *st = ud;
	const struct ezp_core *core = st->svc->core;

	if (st->ended)
		return;
	st->last_write_us = core->now_us();
	if (st->write(st->ud, block, len) != 0)
		st->ended = true;
}

static void st_teardown(struct ezp_capture_stream *st)
{
	struct ezp_capture_stream **pp;
	struct cap_svc *svc = st->svc;

	for (pp = &svc->streams; *pp && *pp != st; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = st->next;
	svc->core->tap_unsubscribe(st->tap);
	svc->core->timer_free(st->keepalive);
	cap_enc_free(st->enc);
	while (st->tcache) {
		struct cap_tcache *t = st->tcache;
		st->tcache = t->next;
		free(t);
	}
	free(st->pipeline);
	free(st);
}

/* Deferred after a stream ended inside a tap callback (no unsubscribing there). */
static void st_end_deferred(void *arg)
{
	st_teardown(arg);
}

/* The stream ended (write said stop, or its session closed): tell the writer, tear down later. */
static void st_ended(struct ezp_capture_stream *st, bool tell)
{
	if (tell && !st->ended)
		st->write(st->ud, NULL, 0);
	st->ended = true;
	if (st->svc->core->defer(st->svc->w, st_end_deferred, st) != EZP_OK)
		st->svc->core->log(EZP_LOG_WARN, CAP_SRC,
				   "a live capture stream could not be "
				   "released: the service loop is stopping");
}

static int st_transport(void *ud, const char *pipeline, uint64_t session_id)
{
	struct ezp_capture_stream *st = ud;
	struct ezp_pipeline_stats ps;
	struct cap_tcache *t;

	(void)session_id;
	if (!pipeline)
		return CAP_T_UNKNOWN;
	for (t = st->tcache; t; t = t->next)
		if (!strcmp(t->pipeline, pipeline))
			return t->transport;
	memset(&ps, 0, sizeof(ps));
	ps.struct_size = sizeof(ps);
	if (st->svc->ctl->pipeline_stats(st->svc->core->ctx, pipeline, &ps) != EZP_OK)
		return CAP_T_UNKNOWN;
	t = calloc(1, sizeof(*t));
	if (!t)
		return CAP_T_UNKNOWN;
	snprintf(t->pipeline, sizeof(t->pipeline), "%s", pipeline);
	t->transport = cap_transport_of(ps.from_kind);
	t->next = st->tcache;
	st->tcache = t;
	return t->transport;
}

static void st_on_event(void *userdata, const struct ezp_tap_event *tev)
{
	struct ezp_capture_stream *st = userdata;
	struct cap_ev ev;
	bool end;

	if (st->ended || tev->type == EZP_TAP_SESSION_CHANGED)
		return;
	memset(&ev, 0, sizeof(ev));
	ev.type = tev->type;
	ev.session_id = tev->session_id;
	ev.pipeline = tev->pipeline;
	ev.src = tev->src;
	ev.dst = tev->dst;
	ev.flags = tev->flags;
	ev.ts_us = st->svc->core->now_us();
	if (tev->type == EZP_TAP_PACKET) {
		const struct ezp_packet *p = tev->pkt ? tev->pkt : tev->original;
		if (!p)
			return;
		ev.dir = p->dir;
		if (p->ts_us)
			ev.ts_us = p->ts_us;
		if (tev->pkt) {
			ev.data = tev->pkt->data;
			ev.len = tev->pkt->len;
		}
		if (tev->original) {
			ev.orig = tev->original->data;
			ev.orig_len = tev->original->len;
		}
	} else if (tev->info) {
		ev.transport = cap_transport_of(tev->info->transport);
		ev.client = tev->info->client;
		ev.server = tev->info->server;
		ev.opened_us = tev->info->opened_us;
		ev.close_reason = tev->info->close_reason;
		ev.close_text = tev->info->close_text;
	}
	end = st->session_id && tev->type == EZP_TAP_SESSION_CLOSED;
	cap_enc_event(st->enc, &ev);
	if (st->ended || end)
		st_ended(st, end);
}

static void st_on_lagged(void *userdata, uint64_t dropped)
{
	struct ezp_capture_stream *st = userdata;

	if (st->ended)
		return;
	cap_enc_lost(st->enc, dropped, st->svc->core->now_us(), "the live stream fell behind");
	if (st->ended)
		st_ended(st, false);
}

static void st_keepalive(void *arg)
{
	struct ezp_capture_stream *st = arg;
	uint64_t now = st->svc->core->now_us();

	if (st->ended || now - st->last_write_us < CAP_KEEPALIVE_MS * 1000ull)
		return;
	cap_enc_stats(st->enc, now, NULL);
	if (st->ended)
		st_ended(st, false);
}

static int st_fail(struct ezp_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int st_fail(struct ezp_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return code;
	memset(err, 0, sizeof(*err));
	err->code = code;
	err->side = EZP_SIDE_CLIENT;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return code;
}

static int cap_stream_open(void *capture, const char *pipeline, uint64_t session_id,
			   ezp_capture_write_fn write, void *userdata,
			   struct ezp_capture_stream **out, struct ezp_error *err)
{
	struct cap_svc *svc = capture;
	struct ezp_capture_stream *st = NULL;
	struct ezp_pipeline_stats ps;
	struct ezp_session_summary sum;
	struct ezp_tap_opts o;
	char desc[200];
	int rc;

	if (!svc || !write || !out)
		return st_fail(err, EZP_ERR_INVAL, "capture: bad arguments");
	memset(&ps, 0, sizeof(ps));
	ps.struct_size = sizeof(ps);
	if (pipeline && svc->ctl->pipeline_stats(svc->core->ctx, pipeline, &ps) != EZP_OK)
		return st_fail(err, EZP_ERR_NOT_FOUND, "no pipeline '%s'", pipeline);
	memset(&sum, 0, sizeof(sum));
	sum.struct_size = sizeof(sum);
	if (session_id && svc->ctl->session_get(svc->core->ctx, session_id, &sum) != EZP_OK)
		return st_fail(err, EZP_ERR_NOT_FOUND, "no session %llu",
			       (unsigned long long)session_id);
	if (session_id && pipeline && strcmp(sum.pipeline, pipeline))
		return st_fail(err, EZP_ERR_NOT_FOUND, "session %llu is not in pipeline '%s'",
			       (unsigned long long)session_id, pipeline);
	st = calloc(1, sizeof(*st));
	if (!st)
		return st_fail(err, EZP_ERR_NOMEM, "capture: out of memory");
	st->svc = svc;
	st->write = write;
	st->ud = userdata;
	st->session_id = session_id;
	st->pipeline = pipeline ? strdup(pipeline) : NULL;
	if (session_id)
		snprintf(desc, sizeof(desc),
			 "EzProxy live capture of session %llu (pipeline '%.72s')",
			 (unsigned long long)session_id, sum.pipeline);
	else if (pipeline)
		snprintf(desc, sizeof(desc), "EzProxy live capture of pipeline '%.100s'", pipeline);
	else
		snprintf(desc, sizeof(desc), "EzProxy live capture of every pipeline");
	st->enc = cap_enc_new(st_sink, st, desc);
	st->keepalive = svc->core->timer_new(svc->w, st_keepalive, st);
	if (!st->enc || !st->keepalive || (pipeline && !st->pipeline)) {
		rc = st_fail(err, EZP_ERR_NOMEM, "capture: out of memory");
		goto fail;
	}
	cap_enc_set_transport_fn(st->enc, st_transport, st);
	if (session_id) { /* the session's own transport, whatever its pipeline's From says now */
		struct cap_tcache *t = calloc(1, sizeof(*t));
		if (t) {
			snprintf(t->pipeline, sizeof(t->pipeline), "%s", sum.pipeline);
			t->transport = cap_transport_of(sum.transport);
			st->tcache = t;
		}
	}
	cap_enc_header(st->enc);
	if (st->ended) {
		rc = st_fail(err, EZP_ERR_CLOSED, "capture: the reader refused the header");
		goto fail;
	}
	memset(&o, 0, sizeof(o));
	o.struct_size = sizeof(o);
	o.pipeline = st->pipeline;
	o.session_id = session_id;
	o.deliver_on = svc->w;
	o.userdata = st;
	o.on_event = st_on_event;
	o.on_lagged = st_on_lagged;
	rc = svc->core->tap_subscribe(svc->core->ctx, &o, &st->tap);
	if (rc != EZP_OK) {
		st->tap = NULL;
		st_fail(err, rc, "capture: cannot subscribe a tap");
		goto fail;
	}
	/* a session that closed before the tap reached its worker would never end the stream */
	if (session_id && svc->ctl->session_get(svc->core->ctx, session_id, &sum) != EZP_OK) {
		rc = st_fail(err, EZP_ERR_NOT_FOUND, "no session %llu (it has just closed)",
			     (unsigned long long)session_id);
		goto fail;
	}
	svc->core->timer_start(st->keepalive, CAP_KEEPALIVE_MS, 1);
	st->next = svc->streams;
	svc->streams = st;
	*out = st;
	return EZP_OK;
fail:
	st_teardown(st);
	return rc;
}

static void cap_stream_close(struct ezp_capture_stream *st)
{
	if (st)
		st_teardown(st);
}

/* Run @fn(@svc) on the service loop and wait. */
struct svc_call {
	struct cap_svc *svc;
	void (*fn)(struct cap_svc *svc);
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
};

static void svc_call_run(void *arg)
{
	struct svc_call *c = arg;

	c->fn(c->svc);
	pthread_mutex_lock(&c->lock);
	c->done = true;
	pthread_cond_signal(&c->cond);
	pthread_mutex_unlock(&c->lock);
}

static void svc_on_loop(struct cap_svc *svc, void (*fn)(struct cap_svc *svc))
{
	struct svc_call c = {.svc = svc, .fn = fn};

	if (svc->core->worker_current() == svc->w) {
		fn(svc);
		return;
	}
	pthread_mutex_init(&c.lock, NULL);
	pthread_cond_init(&c.cond, NULL);
	if (svc->core->defer(svc->w, svc_call_run, &c) == EZP_OK) {
		pthread_mutex_lock(&c.lock);
		while (!c.done)
			pthread_cond_wait(&c.cond, &c.lock);
		pthread_mutex_unlock(&c.lock);
	} else {
		fn(svc); /* the loop is gone: nothing else runs now */
	}
	pthread_mutex_destroy(&c.lock);
	pthread_cond_destroy(&c.cond);
}

/* End every stream still open: its writer is told (a zero-length write). */
static void svc_end_all(struct cap_svc *svc)
{
	while (svc->streams) {
		struct ezp_capture_stream *st = svc->streams;
		if (!st->ended)
			st->write(st->ud, NULL, 0);
		st_teardown(st);
	}
}

static int cap_svc_start(const struct ezp_core *core, const void *config, void **state,
			 struct ezp_error *err)
{
	struct cap_svc *svc;
	const struct ezp_control *ctl =
	    core->find_service(core->ctx, EZP_CONTROL_IFACE, EZP_CONTROL_VERSION);

	(void)config;
	if (!ctl || !ctl->service_worker(core->ctx))
		return st_fail(err, EZP_ERR_UNSUPPORTED,
			       "capture: the core has no service loop for live captures");
	svc = calloc(1, sizeof(*svc));
	if (!svc)
		return st_fail(err, EZP_ERR_NOMEM, "capture: out of memory");
	svc->core = core;
	svc->ctl = ctl;
	svc->w = ctl->service_worker(core->ctx);
	svc->iface.struct_size = sizeof(svc->iface);
	svc->iface.stream_open = cap_stream_open;
	svc->iface.stream_close = cap_stream_close;
	svc->iface.capture = svc;
	*state = svc;
	return EZP_OK;
}

static void cap_svc_stop(void *state)
{
	struct cap_svc *svc = state;

	if (!svc)
		return;
	svc_on_loop(svc, svc_end_all);
	free(svc);
}

static const void *cap_svc_iface(void *state)
{
	return &((struct cap_svc *)state)->iface;
}

const struct ezp_service_kind cap_service_kind = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "capture",
    .description = "live pcapng streams of pipelines and sessions (ezp.capture; "
		   "GET /api/3/capture)",
    .params = NULL,
    .config_size = 0,
    .start = cap_svc_start,
    .stop = cap_svc_stop,
    .iface_name = EZP_CAPTURE_IFACE,
    .iface_version = EZP_CAPTURE_VERSION,
    .iface = cap_svc_iface,
    .flags = EZP_SERVICE_AUTOSTART,
};

/* ---- the plugin ---- */

static const struct ezp_filter_kind *const cap_filters[] = {&cap_filter_kind, NULL};
static const struct ezp_service_kind *const cap_services[] = {&cap_service_kind, NULL};

static void cap_fini(void)
{
	cap_writers_wait();
}

EZP_PLUGIN_DEFINE(ezp_plugin, .name = "capture", .version = CAP_VERSION,
		  .description = "pcapng captures: files from YAML with rotation, live streams "
				 "through the API",
		  .license = "MIT", .fini = cap_fini, .filters = cap_filters,
		  .services = cap_services);
