/*
 * ws_v2.c - the old program's WebSocket (/api/2/socket, DESIGN.md section
 * 8), kept exactly: ?key=K[&close][&inject][&filter][&default=drop|allow]
 * [&network=tcp|udp]; frames {"Status":200,"Data":{"Type":1,"Data":{PktNum,
 * ProxyId, Network, Source, Dest, Data, Flags}}} and errors {"Status":4xx,
 * "Data":"message"} with the old messages; client {Type, Target, Data,
 * Extra}. The held packets of a filtering socket are kept by ws_hold_*
 * (ws_hold.c), as for v3.
 * Thread: the service loop.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ws.h"

#define V2_TO_SERVER 1u	    /* Flags bit 0 */
#define V2_INJECTED 2u	    /* Flags bit 1 */
#define V2_INJ_TO_CLIENT 1u /* Extra bits of an inject */
#define V2_INJ_TO_SERVER 2u

struct v2 {
	struct ws_proto_base base; /* first: the tap and the transport cache */
	bool can_close, can_inject, filter;
	char network[4]; /* "tcp", "udp" or "" (any) */
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
	       !strcmp(ws_pipeline_transport(c->api, &v->base.transports, pipeline), v->network);
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
			       ws_pipeline_transport(c->api, &v->base.transports, ev->pipeline),
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
	if (c->api->core->tap_subscribe(c->api->ctx, &to, &v->base.tap) != EZP_OK) {
		v->base.tap = NULL;
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
	size_t n = 0;

	if (m->type == 2) {
		ws_close_sessions(api, NULL);
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

const struct ws_proto ws_proto_v2 = {
    .prepare = v2_prepare,
    .open = v2_open,
    .message = v2_message,
    .stop = ws_proto_stop,
    .free = ws_proto_free,
};
