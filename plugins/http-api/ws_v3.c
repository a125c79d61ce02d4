/*
 * ws_v3.c - the v3 WebSocket protocol (/api/3/socket, DESIGN.md section 8):
 * watch mode (a tap: packet and session frames, `lagged`) and filter mode
 * (the socket holds the `remote` filter: held packets are sent with
 * verdict_required and answered by `verdict`), `inject` and `close`.
 * The held packets themselves are kept by ws_hold_* (ws_hold.c). Also
 * what v3 and v2 share: the transport cache, stopping and freeing.
 * Thread: the service loop.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ws.h"

enum { V3_WATCH = 0, V3_FILTER = 1 };

struct v3 {
	struct ws_proto_base base; /* first: the tap and the transport cache */
	int mode;
	char *pipeline; /* ?pipeline=, or NULL for all */
	uint64_t seq;	/* watch mode: the last packet frame's seq */
};

static void v3_error(struct ws_conn *c, const char *code, json_t *ref, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* An `error` frame. (transfer full) @ref. */
static void v3_error(struct ws_conn *c, const char *code, json_t *ref, const char *fmt, ...)
{
	char msg[600];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	ws_send_json(c,
		     json_pack("{s:s, s:s, s:s, s:o}", "type", "error", "code", code, "message",
			       msg, "ref", ref ? ref : json_null()),
		     WS_REPLY);
}

static json_t *v3_packet(uint64_t seq, const char *pipeline, uint64_t session,
			 const char *transport, const struct ezp_packet *pkt,
			 const struct ezp_addr *src, const struct ezp_addr *dst, uint32_t flags,
			 bool verdict_required)
{
	json_t *fl = json_array(), *j;
	char *b64 = api_b64_encode(pkt->data, pkt->len);

	if (flags & EZP_PKT_INJECTED)
		json_array_append_new(fl, json_string("injected"));
	if (flags & EZP_PKT_REPLACED)
		json_array_append_new(fl, json_string("replaced"));
	if (flags & EZP_PKT_DROPPED)
		json_array_append_new(fl, json_string("dropped"));
	j = json_pack("{s:s, s:I, s:s, s:I, s:s, s:s, s:o, s:o, s:i, s:o, s:b, s:I, s:s}", "type",
		      "packet", "seq", (json_int_t)seq, "pipeline", pipeline, "session",
		      (json_int_t)session, "transport", transport, "direction",
		      api_dir_name(pkt->dir), "src", api_addr_json(src), "dst", api_addr_json(dst),
		      "leg", (int)pkt->leg, "flags", fl, "verdict_required", verdict_required,
		      "ts_us", (json_int_t)pkt->ts_us, "data", b64 ? b64 : "");
	free(b64);
	return j;
}

static void v3_on_held(struct ws_conn *c, struct ws_held *h)
{
	ws_send_json(c,
		     v3_packet(h->seq, h->pipeline, h->session_id, h->transport, h->pkt, &h->src,
			       &h->dst, 0, true),
		     WS_HELD);
}

static const char *const close_names[] = {"none",  "client_closed",  "server_closed", "idle", "api",
					  "error", "connect_failed", "shutdown",      "limit"};

static json_t *v3_session(const struct ezp_tap_event *ev)
{
	const struct ezp_session_info *in = ev->info;
	struct ezp_session_summary s = {.struct_size = sizeof(s)};
	json_t *j;

	s.id = in->id;
	snprintf(s.pipeline, sizeof(s.pipeline), "%s", in->pipeline ? in->pipeline : ev->pipeline);
	snprintf(s.transport, sizeof(s.transport), "%s", in->transport ? in->transport : "");
	s.client = s.clients[0] = in->client;
	s.server = in->server;
	s.n_clients = in->n_clients;
	s.opened_us = in->opened_us;
	s.last_activity_us = in->last_activity_us;
	memcpy(s.bytes, in->bytes, sizeof(s.bytes));
	memcpy(s.packets, in->packets, sizeof(s.packets));
	s.dropped = in->dropped;
	s.replaced = in->replaced;
	s.injected = in->injected;
	s.closing = ev->type == EZP_TAP_SESSION_CLOSED;
	j = api_session_json(&s);
	if (j && ev->type == EZP_TAP_SESSION_CLOSED) {
		int r = in->close_reason;
		json_object_set_new(
		    j, "close_reason",
		    json_string(r >= 0 && r <= EZP_CLOSE_LIMIT ? close_names[r] : "error"));
		json_object_set_new(j, "close_text",
				    json_string(in->close_text ? in->close_text : ""));
		json_object_set_new(j, "state", json_string("closed"));
	}
	return j;
}

/* Thread: the service loop (the tap delivers there). */
static void v3_on_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct ws_conn *c = userdata;
	struct v3 *v = c->ps;
	static const char *const names[] = {NULL, NULL, "session_opened", "session_changed",
					    "session_closed"};
	const struct ezp_packet *pkt;
	uint64_t seq;

	if (c->state > WS_OPEN || (c->hold && !ws_hold_has(c->hold, ev->pipeline)))
		return;
	if (ev->type != EZP_TAP_PACKET) {
		if (ev->type == EZP_TAP_SESSION_CLOSED && c->hold)
			ws_hold_session_closed(c->hold, ev->session_id);
		if (ev->type < EZP_TAP_SESSION_OPENED || ev->type > EZP_TAP_SESSION_CLOSED ||
		    !ev->info || ws_congested(c))
			return;
		ws_send_json(
		    c, json_pack("{s:s, s:o}", "type", names[ev->type], "session", v3_session(ev)),
		    WS_EVENT);
		return;
	}
	/* a filtering socket saw the others when they were held */
	if (c->hold && !(ev->flags & EZP_PKT_INJECTED))
		return;
	pkt = ev->pkt ? ev->pkt : ev->original;
	if (!pkt || ws_congested(c))
		return;
	seq = c->hold ? ws_hold_next_seq(c->hold) : ++v->seq;
	ws_send_json(c,
		     v3_packet(seq, ev->pipeline, ev->session_id,
			       ws_pipeline_transport(c->api, &v->base.transports, ev->pipeline),
			       pkt, &ev->src, &ev->dst, ev->flags, false),
		     WS_EVENT);
}

static void v3_on_lagged(void *userdata, uint64_t dropped)
{
	ws_add_lagged(userdata, dropped);
}

static void v3_lagged(struct ws_conn *c, uint64_t dropped)
{
	ws_send_json(c, json_pack("{s:s, s:I}", "type", "lagged", "dropped", (json_int_t)dropped),
		     WS_REPLY);
}

static int v3_subscribe(struct ws_conn *c, struct api_req *r);

static int v3_prepare(struct ws_conn *c, struct api_req *r)
{
	struct api *api = c->api;
	const char *mode = api_query(r, "mode"), *pipeline = api_query(r, "pipeline");
	const char *def = api_query(r, "default"), *tmo = api_query(r, "timeout_ms");
	struct ws_hold_opts ho = {.first_seq = 1, .default_verdict = -1, .on_held = v3_on_held};
	struct ezp_pipeline_stats st = {.struct_size = sizeof(st)};
	struct v3 *v = calloc(1, sizeof(*v));

	c->ps = v;
	if (!v) {
		api_error(r, 500, "internal", "out of memory");
		return -1;
	}
	if (mode && strcmp(mode, "watch") && strcmp(mode, "filter")) {
		api_error(r, 400, "bad_request", "mode must be watch or filter");
		return -1;
	}
	v->mode = mode && !strcmp(mode, "filter") ? V3_FILTER : V3_WATCH;
	if (def && strcmp(def, "pass") && strcmp(def, "drop")) {
		api_error(r, 400, "bad_request", "default must be pass or drop");
		return -1;
	}
	if (def)
		ho.default_verdict = !strcmp(def, "drop") ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
	if (tmo) {
		char *end = NULL;
		unsigned long ms = strtoul(tmo, &end, 10);
		if (!*tmo || *end || ms < 1 || ms > 3600000) {
			api_error(r, 400, "bad_request", "timeout_ms must be 1 to 3600000");
			return -1;
		}
		ho.timeout_ms = (unsigned)ms;
	}
	if (pipeline) {
		v->pipeline = strdup(pipeline);
		if (!v->pipeline) {
			api_error(r, 500, "internal", "out of memory");
			return -1;
		}
		if (api->ctl->pipeline_stats(api->ctx, pipeline, &st) != EZP_OK) {
			api_error(r, 404, "pipeline_not_found", "no pipeline named '%s'", pipeline);
			return -1;
		}
	}
	if (v->mode == V3_FILTER) {
		if (!(c->perms & EZP_PERM_FILTER)) {
			api_error(r, 403, "forbidden", "mode=filter needs the Filter permission");
			return -1;
		}
		ho.pipeline = v->pipeline;
		c->hold = ws_hold_new(c, r, &ho);
		if (!c->hold)
			return -1;
	}
	return v3_subscribe(c, r);
}

/* The tap starts before the 101 so nothing sent right after the upgrade is missed. */
static int v3_subscribe(struct ws_conn *c, struct api_req *r)
{
	struct api *api = c->api;
	struct v3 *v = c->ps;
	struct ezp_tap_opts to = {
	    .struct_size = sizeof(to),
	    .pipeline = v->pipeline,
	    .deliver_on = api->w,
	    .userdata = c,
	    .on_event = v3_on_event,
	    .on_lagged = v3_on_lagged,
	};

	if (api->core->tap_subscribe(api->ctx, &to, &v->base.tap) != EZP_OK) {
		v->base.tap = NULL;
		api_error(r, 500, "internal", "cannot watch the pipelines");
		return -1;
	}
	return 0;
}

static void v3_open(struct ws_conn *c)
{
	struct api *api = c->api;
	struct v3 *v = c->ps;
	struct ezp_status_info si = {.struct_size = sizeof(si)};
	json_t *names = json_array();

	api->ctl->status(api->ctx, &si);
	if (c->hold) {
		const char *const *pn;
		size_t n = ws_hold_pipelines(c->hold, &pn);
		for (size_t i = 0; i < n; i++)
			json_array_append_new(names, json_string(pn[i]));
	} else if (v->pipeline) {
		json_array_append_new(names, json_string(v->pipeline));
	} else {
		struct ezp_pipeline_stats *ps = NULL;
		size_t n = 0;
		if (api->ctl->pipelines(api->ctx, &ps, &n) == EZP_OK) {
			for (size_t i = 0; i < n; i++)
				json_array_append_new(names, json_string(ps[i].name));
			free(ps);
		}
	}
	ws_send_json(c,
		     json_pack("{s:s, s:i, s:s, s:s, s:o, s:o}", "type", "hello", "version", 3,
			       "server", si.version ? si.version : "", "mode",
			       v->mode == V3_FILTER ? "filter" : "watch", "permissions",
			       api_perms_json(c->perms), "pipelines", names),
		     WS_REPLY);
	if (c->hold)
		ws_hold_open(c->hold);
}

static void v3_verdict(struct ws_conn *c, struct ws3_msg *m)
{
	struct ezp_packet *repl = NULL;
	int rc;

	if (!c->hold) {
		v3_error(c, "not_filtering", json_incref(m->ref),
			 "verdicts are for sockets opened with mode=filter");
		return;
	}
	if (m->action == WS3_REPLACE) {
		repl = c->api->core->packet_new(m->len);
		if (!repl) {
			v3_error(c, "internal", json_incref(m->ref), "out of memory");
			return;
		}
		if (m->len)
			memcpy(repl->data, m->data, m->len);
	}
	rc = ws_hold_answer(c->hold, m->seq, m->action, repl);
	if (rc == WS_HOLD_EXPIRED)
		v3_error(c, "verdict_expired", json_incref(m->ref),
			 "packet %llu is no longer held: its hold timed out (the default was "
			 "applied) or its session ended",
			 (unsigned long long)m->seq);
	else if (rc)
		v3_error(c, "unknown_seq", json_incref(m->ref),
			 rc == WS_HOLD_ANSWERED
			     ? "packet %llu does not wait for a verdict (already "
			       "answered, or never held)"
			     : "no packet with seq %llu was sent on this socket",
			 (unsigned long long)m->seq);
}

/* Report a failed control call as an error frame. */
static void v3_failed(struct ws_conn *c, json_t *ref, int rc, const struct ezp_error *err,
		      const char *what)
{
	char code[48];

	if (rc == EZP_ERR_NOT_FOUND || rc == EZP_ERR_CLOSED)
		snprintf(code, sizeof(code), "%s_not_found", what);
	else
		snprintf(code, sizeof(code), "%s",
			 rc == EZP_ERR_INVAL || rc == EZP_ERR_LIMIT ? "bad_request" : "failed");
	v3_error(c, code, json_incref(ref), "%s", err->message[0] ? err->message : "failed");
}

/* inject / close for every session of @pipeline (NULL: the socket's, else all). */
static void v3_all(struct ws_conn *c, struct ws3_msg *m)
{
	struct api *api = c->api;
	struct v3 *v = c->ps;
	const char *only = m->pipeline ? m->pipeline : v->pipeline;
	struct ezp_pipeline_stats *ps = NULL;
	size_t n = 0;

	if (only && api->ctl->pipeline_stats(
			api->ctx, only,
			&(struct ezp_pipeline_stats){
			    .struct_size = sizeof(struct ezp_pipeline_stats)}) != EZP_OK) {
		v3_error(c, "pipeline_not_found", json_incref(m->ref), "no pipeline named '%s'",
			 only);
		return;
	}
	if (m->type == WS3_CLOSE) {
		ws_close_sessions(api, only);
		return;
	}
	if (api->ctl->pipelines(api->ctx, &ps, &n) != EZP_OK)
		return;
	for (size_t i = 0; i < n; i++) {
		struct ezp_error err = {0};
		size_t k = 0;
		int rc;
		if (only && strcmp(only, ps[i].name))
			continue;
		rc = api->ctl->pipeline_inject(api->ctx, ps[i].name, m->dir, m->data, m->len, &k,
					       &err);
		if (rc != EZP_OK) {
			v3_failed(c, m->ref, rc, &err, "pipeline");
			break;
		}
	}
	free(ps);
}

static void v3_message(struct ws_conn *c, const uint8_t *text, size_t len, bool binary)
{
	struct api *api = c->api;
	struct ws_msg_err perr;
	struct ws3_msg m;
	struct ezp_error err = {0};
	int rc;

	if (binary) {
		v3_error(c, "bad_message", NULL, "binary frames are not accepted: send JSON text");
		return;
	}
	if (ws3_msg_parse((const char *)text, len, &m, &perr)) {
		v3_error(c, perr.code, perr.ref, "%s", perr.message);
		return;
	}
	switch (m.type) {
	case WS3_VERDICT:
		v3_verdict(c, &m);
		break;
	case WS3_INJECT:
	case WS3_CLOSE:
		if (!(c->perms & (m.type == WS3_INJECT ? EZP_PERM_INJECT : EZP_PERM_CLOSE))) {
			v3_error(c, "forbidden", json_incref(m.ref), "%s needs the %s permission",
				 m.type == WS3_INJECT ? "inject" : "close",
				 m.type == WS3_INJECT ? "Inject" : "Close");
			break;
		}
		if (m.all) {
			v3_all(c, &m);
			break;
		}
		rc = m.type == WS3_INJECT
			 ? api->ctl->session_inject(api->ctx, m.session, m.dir, m.data, m.len, &err)
			 : api->ctl->session_close(api->ctx, m.session, &err);
		if (rc != EZP_OK)
			v3_failed(c, m.ref, rc, &err, "session");
		break;
	}
	ws3_msg_clear(&m);
}

static void v3_free(struct ws_conn *c)
{
	struct v3 *v = c->ps;
	char *pipeline = v ? v->pipeline : NULL;

	ws_proto_free(c);
	free(pipeline);
}

const struct ws_proto ws_proto_v3 = {
    .prepare = v3_prepare,
    .open = v3_open,
    .message = v3_message,
    .lagged = v3_lagged,
    .stop = ws_proto_stop,
    .free = v3_free,
};

/* ---- shared with v2 ---- */

const char *ws_pipeline_transport(struct api *api, json_t **cache, const char *pipeline)
{
	json_t *v = *cache ? json_object_get(*cache, pipeline) : NULL;
	struct ezp_pipeline_stats *ps = NULL;
	size_t n = 0;

	if (v)
		return json_string_value(v);
	if (!*cache)
		*cache = json_object();
	if (*cache && api->ctl->pipelines(api->ctx, &ps, &n) == EZP_OK) {
		for (size_t i = 0; i < n; i++)
			json_object_set_new(*cache, ps[i].name, json_string(ps[i].from_kind));
		free(ps);
	}
	v = *cache ? json_object_get(*cache, pipeline) : NULL;
	return v ? json_string_value(v) : "";
}

void ws_close_sessions(struct api *api, const char *pipeline)
{
	struct ezp_session_summary *ss = NULL;
	size_t n = 0;

	if (api->ctl->sessions(api->ctx, pipeline, &ss, &n) != EZP_OK)
		return;
	for (size_t i = 0; i < n; i++) {
		struct ezp_error err = {0};
		(void)api->ctl->session_close(api->ctx, ss[i].id, &err); /* gone: fine */
	}
	free(ss);
}

void ws_proto_stop(struct ws_conn *c)
{
	struct ws_proto_base *b = c->ps;

	if (b && b->tap) {
		c->api->core->tap_unsubscribe(b->tap);
		b->tap = NULL;
	}
	if (c->hold)
		ws_hold_stop(c->hold);
}

void ws_proto_free(struct ws_conn *c)
{
	struct ws_proto_base *b = c->ps;

	ws_hold_free(c->hold);
	c->hold = NULL;
	if (b) {
		json_decref(b->transports);
		free(b);
	}
	c->ps = NULL;
}
