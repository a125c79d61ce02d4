/*
 * routes_old.c - the old program's REST API, kept working with the same
 * shapes (DESIGN.md section 8, "v1/v2"; docs/api-old.md).
 *
 * Every reply is {"Status": CODE, "Data": ...} with the same HTTP status;
 * on error Data is a message string (api_error with a route of version 1
 * or 2 gives that envelope; server.c does the same for 401/403). Fields are
 * PascalCase. Listings, inject and close cover every pipeline; status
 * reports the first pipeline's addresses and totals over all.
 *
 * The old program served its REST routes under /api/1/ only and its
 * WebSocket under /api/2/socket; so do we (no /api/2/status etc.).
 *
 * Thread: the service loop (handlers are called by server.c).
 */
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "bodies_old.h"

/* ---- helpers ---- */

static json_t *old_addr_string(struct api *api, const struct ezp_addr *a)
{
	char buf[EZP_ADDR_STRLEN];

	if (!a || a->len == 0)
		return json_string("");
	return json_string(api->core->addr_format(a, buf, sizeof(buf)));
}

static void old_oom(struct api_req *r)
{
	api_error(r, 500, "internal", "out of memory");
}

/* A failed core or auth call: the status its code maps to, Data its message. */
static void old_fail(struct api_req *r, struct ezp_error *err, int rc, const char *what)
{
	if (err->code == 0)
		err->code = rc;
	api_error_from(r, err, what);
}

/* ---- GET /api/1/status ---- */

/*
 * {ConnectionCount (live sessions, all pipelines), Alive (some pipeline is
 * listening), BytesSent (both ways, all sessions ever), ProxyAddress and
 * ServerAddress (the first pipeline's listener and `to`)}.
 */
static void old_status(struct api_req *r)
{
	const struct ezp_control *ctl = r->api->ctl;
	struct ezp_status_info st = {.struct_size = sizeof(st)};
	struct ezp_pipeline_stats *ps = NULL;
	size_t n = 0, i;
	bool alive = false;
	json_t *data;

	ctl->status(r->api->ctx, &st);
	if (ctl->pipelines(r->api->ctx, &ps, &n) != EZP_OK)
		n = 0; /* out of memory: report no pipeline */
	for (i = 0; i < n; i++)
		alive = alive || ps[i].listening;
	data = json_pack("{s:I, s:b, s:I, s:o, s:o}", "ConnectionCount", (json_int_t)st.sessions,
			 "Alive", alive, "BytesSent",
			 (json_int_t)(st.bytes[EZP_DIR_TO_SERVER] + st.bytes[EZP_DIR_TO_CLIENT]),
			 "ProxyAddress", old_addr_string(r->api, n ? &ps[0].bound : NULL),
			 "ServerAddress", old_addr_string(r->api, n ? &ps[0].to_addr : NULL));
	free(ps);
	if (!data) {
		old_oom(r);
		return;
	}
	api_reply_old(r, 200, data);
}

/* ---- GET /api/1/proxies ---- */

/* [{Id, Alive, Address (client), Network, BytesSent (both ways), LastContactAgo (ms)}] */
static void old_proxies(struct api_req *r)
{
	struct ezp_session_summary *ss = NULL;
	size_t n = 0, i;
	uint64_t now = r->api->core->now_us();
	json_t *list = json_array();

	if (!list)
		goto oom;
	if (r->api->ctl->sessions(r->api->ctx, NULL, &ss, &n) != EZP_OK)
		n = 0; /* out of memory: an empty list */
	for (i = 0; i < n; i++) {
		const struct ezp_session_summary *s = &ss[i];
		uint64_t ago = now > s->last_activity_us ? (now - s->last_activity_us) / 1000 : 0;
		json_t *o;

		o = json_pack(
		    "{s:I, s:b, s:o, s:s, s:I, s:I}", "Id", (json_int_t)s->id, "Alive", !s->closing,
		    "Address", old_addr_string(r->api, &s->client), "Network", s->transport,
		    "BytesSent",
		    (json_int_t)(s->bytes[EZP_DIR_TO_SERVER] + s->bytes[EZP_DIR_TO_CLIENT]),
		    "LastContactAgo", (json_int_t)ago);
		if (!o || json_array_append_new(list, o) != 0)
			goto oom;
	}
	free(ss);
	api_reply_old(r, 200, list);
	return;
oom:
	free(ss);
	json_decref(list);
	old_oom(r);
}

/* ---- POST /api/1/inject ---- */

static int old_dir(const struct api_old_inject *in)
{
	if (in->to_client && in->to_server)
		return EZP_DIR_BOTH;
	return in->to_client ? EZP_DIR_TO_CLIENT : EZP_DIR_TO_SERVER;
}

/* Id -1: every live session of every pipeline. */
static int old_inject_all(struct api_req *r, const struct api_old_inject *in, struct ezp_error *err)
{
	struct ezp_pipeline_stats *ps = NULL;
	size_t n = 0, i, hit;
	int rc;

	rc = r->api->ctl->pipelines(r->api->ctx, &ps, &n);
	if (rc != EZP_OK)
		return rc;
	for (i = 0; i < n; i++) {
		memset(err, 0, sizeof(*err));
		rc = r->api->ctl->pipeline_inject(r->api->ctx, ps[i].name, old_dir(in), in->data,
						  in->len, &hit, err);
		if (rc == EZP_ERR_NOT_FOUND)
			rc = EZP_OK; /* deleted meanwhile */
		if (rc != EZP_OK)
			break;
	}
	free(ps);
	return rc;
}

static void old_inject(struct api_req *r)
{
	struct api_old_inject in;
	struct ezp_error err = {0};
	char msg[256];
	int rc;

	if (api_old_inject_parse(r->body, r->body_len, &in, msg, sizeof(msg)) != 0) {
		api_error(r, 400, "bad_request", "%s", msg);
		return;
	}
	if (in.id == -1) {
		/* nothing to send is accepted, as the old program did */
		rc = in.len ? old_inject_all(r, &in, &err) : EZP_OK;
	} else {
		struct ezp_session_summary s = {.struct_size = sizeof(s)};

		if (in.len)
			rc = r->api->ctl->session_inject(r->api->ctx, (uint64_t)in.id, old_dir(&in),
							 in.data, in.len, &err);
		else
			rc = r->api->ctl->session_get(r->api->ctx, (uint64_t)in.id, &s);
		if (rc == EZP_ERR_NOT_FOUND || rc == EZP_ERR_CLOSED) {
			api_error(r, 404, "session_not_found", "proxy not found: %lld",
				  (long long)in.id);
			goto out;
		}
	}
	if (rc != EZP_OK) {
		old_fail(r, &err, rc, "session");
		goto out;
	}
	api_reply_old(r, 200, json_string(""));
out:
	api_old_inject_clear(&in);
}

/* ---- GET /api/1/newkey?perms=N ---- */

static void old_newkey(struct api_req *r)
{
	const struct ezp_auth *auth = r->api->auth;
	struct ezp_key_info info = {.struct_size = sizeof(info)};
	struct ezp_error err = {0};
	const char *text = api_query(r, "perms"), *refused;
	char key[65];
	int64_t want;
	uint32_t perms;
	int rc;

	if (!auth || !auth->enabled(auth->auth)) { /* as /api/3/keys */
		api_error(r, 501, "not_available",
			  "keys are off: the API runs with Api.Auth: false");
		return;
	}
	if (!text) {
		api_error(r, 400, "bad_request", "requires 'perms' field");
		return;
	}
	if (api_old_perms_parse(text, &want) != 0) {
		api_error(r, 400, "bad_request", "invalid perms field");
		return;
	}
	perms = (uint32_t)((uint64_t)want & EZP_PERM_ALL); /* unknown bits: ignored, as before */
	refused = api_old_newkey_refused(r->perms, perms);
	if (refused) {
		api_error(r, 403, "forbidden", "lacking permission to add '%s' permission",
			  refused);
		return;
	}
	if (perms == 0) {
		api_error(r, 400, "bad_request", "no permissions were added");
		return;
	}
	rc = auth->create(auth->auth, r->key_id, r->perms, perms, "api/1/newkey", key, &info, &err);
	if (rc != EZP_OK) { /* EZP_ERR_PERM gives 403 */
		old_fail(r, &err, rc, "key");
		return;
	}
	api_reply_old(r, 200, json_pack("{s:s, s:I}", "Key", key, "Perms", (json_int_t)info.perms));
	explicit_bzero(key, sizeof(key));
}

/* ---- GET /api/1/keyinfo ---- */

/* Value is the key's permission bits (the old program's meaning); all bits when Auth is off. */
static void old_keyinfo(struct api_req *r)
{
	json_t *data = api_old_keyinfo_json(r->perms);

	if (!data) {
		old_oom(r);
		return;
	}
	api_reply_old(r, 200, data);
}

/* ---- GET /api/2/socket (the protocol lives in ws_v2.c) ---- */

static void old_socket(struct api_req *r)
{
	ws_upgrade(r, 2);
}

const struct api_route api_routes_old[] = {
    {"GET", "/api/1/status", EZP_PERM_CHECK_STATUS, 1, old_status},
    {"GET", "/api/1/proxies", EZP_PERM_CHECK_STATUS, 1, old_proxies},
    {"POST", "/api/1/inject", EZP_PERM_INJECT, 1, old_inject},
    {"GET", "/api/1/newkey", EZP_PERM_MAKE_KEYS, 1, old_newkey},
    {"GET", "/api/1/keyinfo", 0, 1, old_keyinfo},
    {"GET", "/api/2/socket", EZP_PERM_USE_WEBSOCKET, 2, old_socket},
    {NULL, NULL, 0, 0, NULL},
};
