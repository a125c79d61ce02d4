/*
 * ws_v2.c - the old program's WebSocket (/api/2/socket, DESIGN.md section
 * 8), kept exactly: ?key=K[&close][&inject][&filter][&default=drop|allow]
 * [&network=tcp|udp]; frames {"Status":200,"Data":{"Type":1,"Data":{PktNum,
 * ProxyId, Network, Source, Dest, Data, Flags}}} and errors {"Status":4xx,
 * "Data":"message"} with the old messages; client {Type, Target, Data,
 * Extra}. Then the held-packet bookkeeping both protocols share
 * (ws_hold_*: claims of the `remote` filter, seq -> hold id, deadlines).
 * Thread: the service loop, except hold_on_packet (a packet worker).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ws.h"

/* ---- the v2 protocol ---- */

#define V2_TO_SERVER 1u	    /* Flags bit 0 */
#define V2_INJECTED 2u	    /* Flags bit 1 */
#define V2_INJ_TO_CLIENT 1u /* Extra bits of an inject */
#define V2_INJ_TO_SERVER 2u

struct v2 {
	bool can_close, can_inject, filter;
	char network[4]; /* "tcp", "udp" or "" (any) */
	struct ezp_tap *tap;
	json_t *transports;
};

static void v2_error(struct ws_conn *c, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void v2_error(struct ws_conn *c, int status, const char *fmt, ...)
{
	char msg[600];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	ws_send_json(c, json_pack("{s:i, s:s}", "Status", status, "Data", msg), WS_REPLY);
}

static json_t *v2_packet(const struct ezp_core *core, int64_t pktnum, uint64_t session,
			 const char *network, const struct ezp_addr *src,
			 const struct ezp_addr *dst, const struct ezp_packet *pkt, uint32_t flags)
{
	char s[EZP_ADDR_STRLEN] = "", d[EZP_ADDR_STRLEN] = "";
	char *b64 = api_b64_encode(pkt->data, pkt->len);
	unsigned f = (pkt->dir == EZP_DIR_TO_SERVER ? V2_TO_SERVER : 0) |
		     (flags & EZP_PKT_INJECTED ? V2_INJECTED : 0);
	json_t *j;

	if (src->len)
		core->addr_format(src, s, sizeof(s));
	if (dst->len)
		core->addr_format(dst, d, sizeof(d));
	j = json_pack("{s:i, s:{s:i, s:{s:I, s:I, s:s, s:s, s:s, s:s, s:i}}}", "Status", 200,
		      "Data", "Type", 1, "Data", "PktNum", (json_int_t)pktnum, "ProxyId",
		      (json_int_t)session, "Network", network, "Source", s, "Dest", d, "Data",
		      b64 ? b64 : "", "Flags", (int)f);
	free(b64);
	return j;
}

static bool v2_network_ok(struct ws_conn *c, const char *pipeline)
{
	struct v2 *v = c->ps;

	return !v->network[0] ||
	       !strcmp(ws_pipeline_transport(c->api, &v->transports, pipeline), v->network);
}

static bool v2_accept(struct ws_conn *c, const struct ezp_pipeline_stats *p)
{
	struct v2 *v = c->ps;

	return !v->network[0] || !strcmp(p->from_kind, v->network);
}

static void v2_on_held(struct ws_conn *c, struct ws_held *h)
{
	ws_send_json(c,
		     v2_packet(c->api->core, (int64_t)h->seq, h->session_id, h->transport, &h->src,
			       &h->dst, h->pkt, 0),
		     WS_HELD);
}

static void v2_on_expired(struct ws_conn *c, struct ws_held *h)
{
	(void)h;
	v2_error(c, 408, "packet timed out");
}

static void v2_on_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct ws_conn *c = userdata;
	struct v2 *v = c->ps;
	const struct ezp_packet *pkt = ev->pkt ? ev->pkt : ev->original;
	int64_t num = -1; /* watchers' packets carry no number */

	if (c->state > WS_OPEN || (c->hold && !ws_hold_has(c->hold, ev->pipeline)))
		return;
	if (ev->type == EZP_TAP_SESSION_CLOSED && c->hold)
		ws_hold_session_closed(c->hold, ev->session_id);
	if (ev->type != EZP_TAP_PACKET || !pkt || (c->hold && !(ev->flags & EZP_PKT_INJECTED)))
		return;
	if (!v2_network_ok(c, ev->pipeline) || ws_congested(c))
		return;
	if (c->hold)
		num = (int64_t)ws_hold_next_seq(c->hold);
	ws_send_json(c,
		     v2_packet(c->api->core, num, ev->session_id,
			       ws_pipeline_transport(c->api, &v->transports, ev->pipeline),
			       &ev->src, &ev->dst, pkt, ev->flags),
		     WS_EVENT);
}

static void v2_on_lagged(void *userdata, uint64_t dropped)
{
	/* the old protocol has no message for this: counted only */
	ws_add_lagged(userdata, dropped);
}

struct v2_flags {
	bool close, inject, filter;
	const char *def, *network;
};

static enum MHD_Result v2_arg(void *cls, enum MHD_ValueKind kind, const char *key,
			      const char *value)
{
	struct v2_flags *f = cls;

	(void)kind;
	if (!strcmp(key, "close"))
		f->close = true;
	else if (!strcmp(key, "inject"))
		f->inject = true;
	else if (!strcmp(key, "filter"))
		f->filter = true;
	else if (!strcmp(key, "default"))
		f->def = value ? value : "";
	else if (!strcmp(key, "network"))
		f->network = value ? value : "";
	return MHD_YES;
}

static int v2_prepare(struct ws_conn *c, struct api_req *r)
{
	struct v2_flags f = {0};
	struct ws_hold_opts ho = {.first_seq = 0,
				  .default_verdict = EZP_VERDICT_PASS,
				  .accept = v2_accept,
				  .on_held = v2_on_held,
				  .on_expired = v2_on_expired};
	struct v2 *v = calloc(1, sizeof(*v));
	struct ezp_tap_opts to = {
	    .struct_size = sizeof(to),
	    .deliver_on = c->api->w,
	    .userdata = c,
	    .on_event = v2_on_event,
	    .on_lagged = v2_on_lagged,
	};

	c->ps = v;
	if (!v) {
		api_error(r, 500, "internal", "out of memory");
		return -1;
	}
	MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, v2_arg, &f);
	if (f.close && !(c->perms & EZP_PERM_CLOSE)) {
		api_error(r, 403, "forbidden", "missing permissions for 'close'");
		return -1;
	}
	if (f.inject && !(c->perms & EZP_PERM_INJECT)) {
		api_error(r, 403, "forbidden", "missing permissions for 'inject'");
		return -1;
	}
	if (f.filter && !(c->perms & EZP_PERM_FILTER)) {
		api_error(r, 403, "forbidden", "missing permissions for 'filter'");
		return -1;
	}
	if (f.filter && f.def) {
		if (!strcmp(f.def, "drop")) {
			ho.default_verdict = EZP_VERDICT_DROP;
		} else if (strcmp(f.def, "allow")) {
			api_error(r, 400, "bad_request",
				  "'default' value is invalid, must be 'drop' or 'allow'");
			return -1;
		}
	}
	if (f.network && f.network[0] && strcmp(f.network, "tcp") && strcmp(f.network, "udp")) {
		api_error(r, 400, "bad_request", "network must be 'tcp', 'udp' or left empty");
		return -1;
	}
	v->can_close = f.close;
	v->can_inject = f.inject;
	v->filter = f.filter;
	snprintf(v->network, sizeof(v->network), "%s", f.network ? f.network : "");
	if (f.filter && !(c->hold = ws_hold_new(c, r, &ho)))
		return -1;
	/* the tap starts before the 101, as the old program's channel did */
	if (c->api->core->tap_subscribe(c->api->ctx, &to, &v->tap) != EZP_OK) {
		v->tap = NULL;
		api_error(r, 500, "internal", "cannot watch the proxies");
		return -1;
	}
	return 0;
}

static void v2_open(struct ws_conn *c)
{
	if (c->hold)
		ws_hold_open(c->hold);
}

/* Inject into or close every session (Target -1), as the old program did. */
static void v2_all(struct ws_conn *c, const struct ws2_msg *m, int dir)
{
	struct api *api = c->api;
	struct ezp_pipeline_stats *ps = NULL;
	struct ezp_session_summary *ss = NULL;
	size_t n = 0;

	if (m->type == 2) {
		if (api->ctl->sessions(api->ctx, NULL, &ss, &n) != EZP_OK)
			return;
		for (size_t i = 0; i < n; i++) {
			struct ezp_error err = {0};
			(void)api->ctl->session_close(api->ctx, ss[i].id, &err);
		}
		free(ss);
		return;
	}
	if (api->ctl->pipelines(api->ctx, &ps, &n) != EZP_OK)
		return;
	for (size_t i = 0; i < n; i++) {
		struct ezp_error err = {0};
		size_t k = 0;
		(void)api->ctl->pipeline_inject(api->ctx, ps[i].name, dir, m->data, m->len, &k,
						&err);
	}
	free(ps);
}

static void v2_message(struct ws_conn *c, const uint8_t *text, size_t len, bool binary)
{
	struct api *api = c->api;
	struct v2 *v = c->ps;
	struct ezp_error err = {0};
	struct ws2_msg m;
	char msg[64];
	int rc, dir;

	if (binary) {
		v2_error(c, 400, "Data type must be Text JSON");
		return;
	}
	if (ws2_msg_parse((const char *)text, len, &m, msg, sizeof(msg))) {
		v2_error(c, 400, "%s", msg);
		return;
	}
	switch (m.type) {
	case 1: /* inject */
		if (!v->can_inject) {
			v2_error(c, 403, "Missing permissions to inject");
			break;
		}
		if (!(m.extra & (V2_INJ_TO_CLIENT | V2_INJ_TO_SERVER))) {
			v2_error(c, 400, "toClient and/or toServer must be set in 'Extra'");
			break;
		}
		dir = (m.extra & V2_INJ_TO_CLIENT) && (m.extra & V2_INJ_TO_SERVER) ? EZP_DIR_BOTH
		      : m.extra & V2_INJ_TO_SERVER ? EZP_DIR_TO_SERVER
						   : EZP_DIR_TO_CLIENT;
		if (m.target == -1) {
			v2_all(c, &m, dir);
			break;
		}
		rc = m.target < 1 ? EZP_ERR_NOT_FOUND
				  : api->ctl->session_inject(api->ctx, (uint64_t)m.target, dir,
							     m.data, m.len, &err);
		if (rc == EZP_ERR_NOT_FOUND || rc == EZP_ERR_CLOSED)
			v2_error(c, 404, "proxy not found: no proxy with id %lld",
				 (long long)m.target);
		else if (rc != EZP_OK)
			v2_error(c, 400, "%s", err.message);
		break;
	case 2: /* close */
		if (!v->can_close) {
			v2_error(c, 403, "Missing permissions to close");
			break;
		}
		if (m.target == -1) {
			v2_all(c, &m, 0);
			break;
		}
		rc = m.target < 1 ? EZP_ERR_NOT_FOUND
				  : api->ctl->session_close(api->ctx, (uint64_t)m.target, &err);
		if (rc != EZP_OK)
			v2_error(c, 404, "proxy not found: no proxy with id %lld",
				 (long long)m.target);
		break;
	case 3: /* verdict */
		if (!c->hold) {
			v2_error(c, 403, "Missing permissions to filter");
			break;
		}
		rc = m.target < 0
			 ? WS_HOLD_UNKNOWN
			 : ws_hold_answer(c->hold, (uint64_t)m.target,
					  m.extra & 1 ? EZP_VERDICT_PASS : EZP_VERDICT_DROP, NULL);
		if (rc == WS_HOLD_UNKNOWN)
			v2_error(c, 404, "packet not found");
		else if (rc == WS_HOLD_ANSWERED)
			v2_error(c, 410, "packet already handled");
		else if (rc == WS_HOLD_EXPIRED)
			v2_error(c, 408, "packet timed out");
		break;
	default:
		v2_error(c, 400, "Unknown Type");
		break;
	}
	ws2_msg_clear(&m);
}

static void v2_stop(struct ws_conn *c)
{
	struct v2 *v = c->ps;

	if (v && v->tap) {
		c->api->core->tap_unsubscribe(v->tap);
		v->tap = NULL;
	}
	if (c->hold)
		ws_hold_stop(c->hold);
}

static void v2_free(struct ws_conn *c)
{
	struct v2 *v = c->ps;

	ws_hold_free(c->hold);
	c->hold = NULL;
	if (v) {
		json_decref(v->transports);
		free(v);
	}
	c->ps = NULL;
}

const struct ws_proto ws_proto_v2 = {
    .prepare = v2_prepare,
    .open = v2_open,
    .message = v2_message,
    .stop = v2_stop,
    .free = v2_free,
};

/* ---- shared shapes ---- */

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

/* ---- held packets (both protocols) ---- */

#define HOLD_BUCKETS 1024u
#define HOLD_SWEEP_MS 100
#define HOLD_GRACE_US 10000000ull /* keep an expired seq this long to say "expired" */

struct hold_claim {
	struct ws_hold *hd;
	struct ezp_claim *claim;
	char name[72];
	unsigned timeout_ms; /* effective */
	int fallback;	     /* verdict when a packet cannot be handed over */
};

struct ws_hold {
	struct ws_conn *c;
	struct ws_hold_opts o;
	struct hold_claim *claims;
	size_t n_claims;
	const char **names;
	uint64_t next_seq;
	struct ws_held *buckets[HOLD_BUCKETS];
	size_t count;
	struct ws_held *fifo, **fifo_tail; /* arrived before the upgrade */
	struct ezp_timer *sweep;
	bool open, stopped, sweeping;
};

static void hold_arrive(void *arg);

static void held_free(const struct ezp_core *core, struct ws_held *h)
{
	core->packet_unref(h->pkt);
	free(h);
}

/* Thread: a packet worker. Copy what the socket needs and hand it over. */
static int hold_on_packet(void *userdata, struct ezp_filter_call *call)
{
	struct hold_claim *hc = userdata;
	struct ws_conn *c = hc->hd->c;
	const struct ezp_core *core = c->api->core;
	struct ezp_session_info info = {.struct_size = sizeof(info)};
	struct ws_held *h = calloc(1, sizeof(*h));

	if (!h)
		return hc->fallback;
	core->session_info(call->session, &info);
	h->c = c;
	h->hold_id = call->hold_id;
	h->session_id = info.id;
	h->pkt = core->packet_ref(call->pkt);
	h->dir = call->pkt->dir;
	h->leg = call->pkt->leg;
	h->deadline_us = core->now_us() + (uint64_t)hc->timeout_ms * 1000;
	snprintf(h->pipeline, sizeof(h->pipeline), "%s", hc->name);
	snprintf(h->transport, sizeof(h->transport), "%s", info.transport ? info.transport : "");
	h->src = h->dir == EZP_DIR_TO_SERVER ? info.client : info.server;
	h->dst = h->dir == EZP_DIR_TO_SERVER ? info.server : info.client;
	ws_ref(c);
	if (core->defer(c->api->w, hold_arrive, h) != EZP_OK) {
		held_free(core, h);
		atomic_fetch_sub(&c->refs, 1); /* the claim still holds one: never the last */
		return hc->fallback;
	}
	return EZP_VERDICT_HOLD;
}

static struct ws_held **slot(struct ws_hold *hd, uint64_t seq)
{
	return &hd->buckets[seq % HOLD_BUCKETS];
}

static void hold_sweep(void *arg);

static void hold_deliver(struct ws_hold *hd, struct ws_held *h)
{
	h->seq = hd->next_seq++;
	h->next = *slot(hd, h->seq);
	*slot(hd, h->seq) = h;
	hd->count++;
	if (!hd->sweeping) {
		hd->sweeping = true;
		hd->c->api->core->timer_start(hd->sweep, HOLD_SWEEP_MS, 1);
	}
	hd->o.on_held(hd->c, h);
}

/* Thread: the service loop (deferred from hold_on_packet). */
static void hold_arrive(void *arg)
{
	struct ws_held *h = arg;
	struct ws_conn *c = h->c;
	struct ws_hold *hd = c->state != WS_DEAD ? c->hold : NULL;

	if (!hd || hd->stopped) {
		held_free(c->api->core, h); /* the claim is gone: the core gave the default */
	} else if (!hd->open) {
		h->next = NULL;
		*hd->fifo_tail = h;
		hd->fifo_tail = &h->next;
	} else {
		hold_deliver(hd, h);
	}
	ws_unref(c);
}

static void hold_unlink(struct ws_hold *hd, struct ws_held *h)
{
	for (struct ws_held **pp = slot(hd, h->seq); *pp; pp = &(*pp)->next) {
		if (*pp == h) {
			*pp = h->next;
			hd->count--;
			return;
		}
	}
}

static void hold_sweep(void *arg)
{
	struct ws_hold *hd = arg;
	const struct ezp_core *core = hd->c->api->core;
	uint64_t now = core->now_us();

	for (unsigned b = 0; b < HOLD_BUCKETS; b++) {
		struct ws_held **pp = &hd->buckets[b];
		while (*pp) {
			struct ws_held *h = *pp;
			if (!h->expired && now > h->deadline_us) {
				h->expired = true;
				if (hd->o.on_expired)
					hd->o.on_expired(hd->c, h);
			}
			if (h->expired && now > h->deadline_us + HOLD_GRACE_US) {
				*pp = h->next;
				hd->count--;
				held_free(core, h);
				continue;
			}
			pp = &h->next;
		}
	}
	if (!hd->count) {
		hd->sweeping = false;
		core->timer_stop(hd->sweep);
	}
}

/* The remote filter's HoldTimeoutMs and Default in @pipeline. */
static void remote_conf(struct api *api, const char *pipeline, unsigned *timeout_ms,
			bool *default_drop)
{
	int def = EZP_VERDICT_PASS;

	*timeout_ms = 5000;
	if (api->ctl->filter_hold(api->ctx, pipeline, "remote", timeout_ms, &def) != EZP_OK)
		*timeout_ms = 5000;
	*default_drop = def == EZP_VERDICT_DROP;
}

struct ws_hold *ws_hold_new(struct ws_conn *c, struct api_req *r, const struct ws_hold_opts *o)
{
	struct api *api = c->api;
	struct ezp_pipeline_stats *ps = NULL;
	struct ws_hold *hd = calloc(1, sizeof(*hd));
	size_t n = 0;
	char holder_name[160];

	if (!hd || api->ctl->pipelines(api->ctx, &ps, &n) != EZP_OK) {
		api_error(r, 500, "internal", "cannot list pipelines");
		goto fail;
	}
	hd->c = c;
	hd->o = *o;
	hd->next_seq = o->first_seq;
	hd->fifo_tail = &hd->fifo;
	hd->claims = calloc(n ? n : 1, sizeof(*hd->claims));
	hd->names = calloc(n ? n : 1, sizeof(*hd->names));
	hd->sweep = api->core->timer_new(api->w, hold_sweep, hd);
	if (!hd->claims || !hd->names || !hd->sweep) {
		api_error(r, 500, "internal", "out of memory");
		goto fail;
	}
	snprintf(holder_name, sizeof(holder_name), "WebSocket %s (key %s)", c->peer,
		 c->key_id[0] ? c->key_id : "-");
	for (size_t i = 0; i < n; i++) {
		struct hold_claim *hc = &hd->claims[hd->n_claims];
		struct ezp_filter_holder holder = {
		    .struct_size = sizeof(holder),
		    .name = holder_name,
		    .userdata = hc,
		    .on_packet = hold_on_packet,
		};
		struct ezp_claim_opts copts = {
		    .struct_size = sizeof(copts),
		    .timeout_ms = o->timeout_ms,
		    .default_verdict = o->default_verdict,
		};
		struct ezp_error err = {0};
		bool drop;
		int rc;

		if (o->pipeline ? strcmp(ps[i].name, o->pipeline)
				: o->accept && !o->accept(c, &ps[i]))
			continue;
		hc->hd = hd;
		snprintf(hc->name, sizeof(hc->name), "%s", ps[i].name);
		remote_conf(api, hc->name, &hc->timeout_ms, &drop);
		if (o->timeout_ms)
			hc->timeout_ms = o->timeout_ms;
		hc->fallback = o->default_verdict >= 0 ? o->default_verdict
			       : drop		       ? EZP_VERDICT_DROP
						       : EZP_VERDICT_PASS;
		ws_ref(c); /* on_packet may run as soon as the claim exists */
		rc = api->ctl->filter_claim(api->ctx, hc->name, "remote", &holder, &copts,
					    &hc->claim, &err);
		if (rc == EZP_OK) {
			hd->names[hd->n_claims++] = hc->name;
			continue;
		}
		atomic_fetch_sub(&c->refs, 1);
		if (rc == EZP_ERR_BUSY) {
			api_error(r, 409, "filter_busy", "%s", err.message);
			goto fail;
		}
		if (rc != EZP_ERR_NOT_FOUND || o->pipeline) {
			api_error(r, rc == EZP_ERR_NOT_FOUND ? 404 : 500,
				  rc == EZP_ERR_NOT_FOUND ? "no_remote_filter" : "internal",
				  "cannot filter pipeline '%s': %s", hc->name, err.message);
			goto fail;
		}
	}
	if (o->pipeline && !hd->n_claims) {
		api_error(r, 404, "pipeline_not_found", "no pipeline named '%s'", o->pipeline);
		goto fail;
	}
	if (!hd->n_claims) {
		api_error(r, 404, "no_remote_filter",
			  "no pipeline has a `remote` filter in its Through to hold");
		goto fail;
	}
	free(ps);
	return hd;
fail:
	free(ps);
	if (hd) {
		ws_hold_stop(hd);
		ws_hold_free(hd);
	}
	return NULL;
}

size_t ws_hold_pipelines(struct ws_hold *hd, const char *const **names)
{
	*names = hd->names;
	return hd->n_claims;
}

bool ws_hold_has(struct ws_hold *hd, const char *pipeline)
{
	for (size_t i = 0; i < hd->n_claims; i++)
		if (!strcmp(hd->names[i], pipeline))
			return true;
	return false;
}

void ws_hold_open(struct ws_hold *hd)
{
	struct ws_held *h;

	hd->open = true;
	while ((h = hd->fifo) && hd->c->state == WS_OPEN) {
		hd->fifo = h->next;
		hold_deliver(hd, h);
	}
	if (!hd->fifo)
		hd->fifo_tail = &hd->fifo;
}

uint64_t ws_hold_next_seq(struct ws_hold *hd)
{
	return hd->next_seq++;
}

int ws_hold_answer(struct ws_hold *hd, uint64_t seq, int verdict, struct ezp_packet *repl)
{
	const struct ezp_core *core = hd->c->api->core;
	struct ws_held *h;

	for (h = *slot(hd, seq); h && h->seq != seq; h = h->next)
		;
	if (!h || h->expired || core->now_us() > h->deadline_us) {
		core->packet_unref(repl);
		if (h) {
			h->expired = true;
			return WS_HOLD_EXPIRED;
		}
		return seq >= hd->o.first_seq && seq < hd->next_seq ? WS_HOLD_ANSWERED
								    : WS_HOLD_UNKNOWN;
	}
	core->filter_answer(hd->c->api->ctx, h->hold_id, verdict, repl);
	hold_unlink(hd, h);
	held_free(core, h);
	return 0;
}

void ws_hold_session_closed(struct ws_hold *hd, uint64_t session_id)
{
	for (unsigned b = 0; hd->count && b < HOLD_BUCKETS; b++) {
		struct ws_held **pp = &hd->buckets[b];
		while (*pp) {
			struct ws_held *h = *pp;
			if (h->session_id == session_id && !h->expired) {
				h->expired = true; /* its session ended: the packet is gone */
				h->deadline_us = hd->c->api->core->now_us();
			}
			pp = &h->next;
		}
	}
}

void ws_hold_stop(struct ws_hold *hd)
{
	const struct ezp_core *core = hd->c->api->core;

	if (hd->stopped)
		return;
	hd->stopped = true;
	for (size_t i = 0; i < hd->n_claims; i++) {
		hd->c->api->ctl->claim_release(hd->claims[i].claim); /* held packets: default now */
		ws_unref(hd->c);
	}
	hd->n_claims = 0;
	if (hd->sweep)
		core->timer_stop(hd->sweep);
}

void ws_hold_free(struct ws_hold *hd)
{
	const struct ezp_core *core;

	if (!hd)
		return;
	core = hd->c->api->core;
	for (unsigned b = 0; b < HOLD_BUCKETS; b++) {
		while (hd->buckets[b]) {
			struct ws_held *h = hd->buckets[b];
			hd->buckets[b] = h->next;
			held_free(core, h);
		}
	}
	while (hd->fifo) {
		struct ws_held *h = hd->fifo;
		hd->fifo = h->next;
		held_free(core, h);
	}
	if (hd->sweep)
		core->timer_free(hd->sweep);
	free(hd->claims);
	free(hd->names);
	free(hd);
}
