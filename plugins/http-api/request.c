/*
 * request.c - one HTTP request of the http-api plugin, from libmicrohttpd's
 * first call to its completion: the route tables (404/405 with Allow), the
 * key (Bearer header or ?key=) and its permissions (401/403), the request
 * size limit (413), the body, and sending the answer (counted in metrics).
 *
 * Thread: the service loop (libmicrohttpd runs there, see server.c); the
 * work of api_run_blocking() runs elsewhere while its connection is
 * suspended, and is answered here when it is resumed. Keys and the ?key=
 * query are never logged.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api.h"
#include "bodies.h"

#define REQ_SRC "http-api"

/* One request: struct api_req first. */
struct req {
	struct api_req r;
	const struct api_route *rt;
	size_t body_cap;
	bool answered;
};

static const char *const req_perm_names[] = EZP_PERM_NAMES;

const char *api_query(struct api_req *r, const char *name)
{
	return MHD_lookup_connection_value(r->conn, MHD_GET_ARGUMENT_KIND, name);
}

const char *api_header(struct api_req *r, const char *name)
{
	return MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, name);
}

json_t *api_body_object(struct api_req *r)
{
	struct body_err e;
	int not_object;
	json_t *v = body_load_object(r->body, r->body_len, &e, &not_object);

	if (!v)
		api_error(r, MHD_HTTP_BAD_REQUEST, not_object ? "bad_request" : "bad_json", "%s",
			  e.message);
	return v;
}

/* Does @url match @pattern? Fills r->params with the {x} parts. */
static bool req_match(const char *pattern, const char *url, struct api_req *r)
{
	const char *p = pattern, *u = url;
	size_t n = 0;

	while (*p && *u) {
		if (*p == '{') {
			const char *pe = strchr(p, '}'), *ue = strchr(u, '/');
			size_t len = ue ? (size_t)(ue - u) : strlen(u);
			if (!pe || len == 0 || n == API_MAX_PARAMS)
				goto fail;
			r->params[n] = strndup(u, len);
			if (!r->params[n])
				goto fail;
			n++;
			p = pe + 1;
			u += len;
			continue;
		}
		if (*p != *u)
			goto fail;
		p++;
		u++;
	}
	if (*p || *u)
		goto fail;
	r->n_params = n;
	return true;
fail:
	while (n > 0)
		free(r->params[--n]);
	return false;
}

static const struct api_route *const *req_tables(void)
{
	static const struct api_route *const tables[] = {api_routes_v3,	     api_routes_v3_config,
							 api_routes_v3_keys, api_routes_v3_faults, api_routes_old,
							 api_routes_misc,    NULL};
	return tables;
}

/* Find the route; on a miss answer 404 or 405 (with Allow). */
static const struct api_route *req_route(struct api_req *r)
{
	char allow[128] = "";
	const char *known = NULL;

	for (const struct api_route *const *t = req_tables(); *t; t++) {
		for (const struct api_route *rt = *t; rt->method; rt++) {
			if (!req_match(rt->pattern, r->url, r))
				continue;
			if (!strcmp(rt->method, r->method)) {
				r->route = rt->pattern;
				r->version = rt->version;
				return rt;
			}
			while (r->n_params > 0)
				free(r->params[--r->n_params]);
			known = rt->pattern;
			r->version = rt->version;
			if (!strstr(allow, rt->method)) {
				size_t n = strlen(allow);
				snprintf(allow + n, sizeof(allow) - n, "%s%s", n ? ", " : "",
					 rt->method);
			}
		}
	}
	if (!known) {
		r->version = strncmp(r->url, "/api/1/", 7) && strncmp(r->url, "/api/2/", 7) ? 3 : 1;
		api_error(r, MHD_HTTP_NOT_FOUND, "route_not_found", "no route %s %s", r->method,
			  r->url);
		return NULL;
	}
	r->route = known;
	api_error(r, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
		  "%s does not take %s (allowed: %s)", r->url, r->method, allow);
	if (r->resp)
		MHD_add_response_header(r->resp, MHD_HTTP_HEADER_ALLOW, allow);
	return NULL;
}

/* The key the client sent (Bearer header, else ?key=), or NULL. */
static const char *req_key(struct api_req *r)
{
	const char *h = api_header(r, MHD_HTTP_HEADER_AUTHORIZATION);

	if (h) {
		while (*h == ' ')
			h++;
		if (!strncasecmp(h, "Bearer ", 7)) {
			h += 7;
			while (*h == ' ')
				h++;
			if (*h)
				return h;
		}
	}
	h = api_query(r, "key");
	return h && *h ? h : NULL;
}

/* Authenticate and authorize; false after answering 401/403. */
static bool req_authorize(struct api_req *r, const struct api_route *rt)
{
	const struct ezp_auth *auth = r->api->auth;
	const char *key = req_key(r);
	uint32_t missing;
	char names[160] = "";

	r->key_text = key;
	if (!auth) {
		r->perms = EZP_PERM_ALL;
		return true;
	}
	if ((rt->perms & API_PERM_PUBLIC) || (rt->perms == 0 && strncmp(rt->pattern, "/api/", 5))) {
		/* the web page: no key needed; a valid key still gives its bits */
		if (!key || auth->check(auth->auth, key, &r->perms, r->key_id) != EZP_OK) {
			r->perms = 0;
			r->key_id[0] = '\0';
		}
		return true;
	}
	if (!key) {
		api_error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized",
			  "this API needs a key: send 'Authorization: Bearer KEY' (or ?key=KEY)");
		return false;
	}
	if (auth->check(auth->auth, key, &r->perms, r->key_id) != EZP_OK) {
		r->key_id[0] = '\0';
		api_error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized", "unknown key");
		return false;
	}
	missing = rt->perms & ~r->perms & EZP_PERM_ALL;
	if (!missing)
		return true;
	for (unsigned b = 0; b < sizeof(req_perm_names) / sizeof(req_perm_names[0]); b++) {
		if (missing & (1u << b)) {
			size_t n = strlen(names);
			snprintf(names + n, sizeof(names) - n, "%s%s", n ? ", " : "",
				 req_perm_names[b]);
		}
	}
	api_error(r, MHD_HTTP_FORBIDDEN, "forbidden", "this key lacks the permission%s %s",
		  strchr(names, ',') ? "s" : "", names);
	return false;
}

static enum MHD_Result req_send(struct req *q)
{
	struct api_req *r = &q->r;
	enum MHD_Result rc;

	if (!r->resp)
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "no answer was made");
	if (!r->resp)
		return MHD_NO;
	q->answered = true;
	rc = MHD_queue_response(r->conn, r->status, r->resp);
	api_metrics_count(r->api, r->route ? r->route : "-", r->method, r->status);
	if (r->api->core->log_enabled(EZP_LOG_DEBUG))
		r->api->core->log(EZP_LOG_DEBUG, REQ_SRC, "%s %s -> %u", r->method, r->url,
				  r->status);
	MHD_destroy_response(r->resp);
	r->resp = NULL;
	return rc;
}

/* First call for a request: route, key, declared size. true when answered already. */
static bool req_begin(struct req *q)
{
	struct api_req *r = &q->r;
	const char *cl;

	if (r->api->stopping) {
		api_error(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", "the API is stopping");
		return true;
	}
	q->rt = req_route(r);
	if (!q->rt || !req_authorize(r, q->rt))
		return true;
	cl = api_header(r, MHD_HTTP_HEADER_CONTENT_LENGTH);
	if (cl && strtoull(cl, NULL, 10) > API_MAX_BODY) {
		api_error(r, MHD_HTTP_CONTENT_TOO_LARGE, "payload_too_large",
			  "the body is larger than %u bytes", API_MAX_BODY);
		return true;
	}
	return false;
}

static void req_append(struct req *q, const char *data, size_t n)
{
	struct api_req *r = &q->r;

	if (r->too_large)
		return;
	if (n > API_MAX_BODY - r->body_len) {
		r->too_large = true;
		free(r->body);
		r->body = NULL;
		r->body_len = 0;
		return;
	}
	if (r->body_len + n + 1 > q->body_cap) {
		size_t cap = q->body_cap ? q->body_cap : 1024;
		char *b;
		while (cap < r->body_len + n + 1)
			cap *= 2;
		b = realloc(r->body, cap);
		if (!b) {
			r->too_large = true;
			return;
		}
		r->body = b;
		q->body_cap = cap;
	}
	memcpy(r->body + r->body_len, data, n);
	r->body_len += n;
	r->body[r->body_len] = '\0';
}

enum MHD_Result api_request_access(void *cls, struct MHD_Connection *conn, const char *url,
				   const char *method, const char *version, const char *upload,
				   size_t *upload_size, void **con_cls)
{
	struct api *api = cls;
	struct req *q = *con_cls;
	struct api_req *r;

	(void)version;
	if (!q) {
		q = calloc(1, sizeof(*q));
		if (!q)
			return MHD_NO;
		*con_cls = q;
		r = &q->r;
		r->api = api;
		r->conn = conn;
		r->method = method;
		r->url = url;
		r->route = "-";
		r->version = 3;
		if (req_begin(q))
			return req_send(q);
		return MHD_YES;
	}
	r = &q->r;
	if (*upload_size) {
		if (!q->answered)
			req_append(q, upload, *upload_size);
		*upload_size = 0;
		return MHD_YES;
	}
	if (q->answered)
		return MHD_YES;
	if (r->suspended) {
		/* resumed after api_run_blocking: its answer is ready */
		r->suspended = false;
		return req_send(q);
	}
	if (r->too_large) {
		api_error(r, MHD_HTTP_CONTENT_TOO_LARGE, "payload_too_large",
			  "the body is larger than %u bytes", API_MAX_BODY);
		return req_send(q);
	}
	q->rt->fn(r);
	if (r->suspended)
		return MHD_YES;
	return req_send(q);
}

void api_request_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
			   enum MHD_RequestTerminationCode toe)
{
	struct req *q = *con_cls;

	(void)cls;
	(void)conn;
	(void)toe;
	if (!q)
		return;
	for (size_t i = 0; i < q->r.n_params; i++)
		free(q->r.params[i]);
	if (q->r.resp)
		MHD_destroy_response(q->r.resp);
	free(q->r.body);
	free(q);
	*con_cls = NULL;
}
