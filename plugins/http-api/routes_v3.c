/*
 * routes_v3.c - the v3 REST routes (DESIGN.md section 8): status, plugins,
 * pipelines and sessions, in snake_case JSON; the config routes are in
 * routes_v3_config.c, the key routes in routes_v3_keys.c. The request
 * bodies are parsed in bodies.c; the WebSocket is ws.c's. The fault routes
 * are in routes_v3_faults.c and the live capture in routes_v3_capture.c;
 * each answers 501 `not_available` when its plugin is not loaded.
 *
 * Thread: the service loop, except the work given to api_run_blocking()
 * (server and client swaps), which runs on a thread of its own.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "bodies.h"

#define CS EZP_PERM_CHECK_STATUS
#define RC EZP_PERM_RECONFIGURE

#define CTL(r) ((r)->api->ctl)
#define CTX(r) ((r)->api->ctx)

/* The {id} path part as a session id; false after answering 400. */
static bool v3_id(struct api_req *r, uint64_t *id)
{
	const char *s = r->n_params ? r->params[0] : "";
	char *end;
	unsigned long long v;

	if (!s[0] || strlen(s) > 20 || strspn(s, "0123456789") != strlen(s)) {
		api_error_field(r, MHD_HTTP_BAD_REQUEST, "bad_request", "id",
				"id: a session id is a number, not '%.40s'", s);
		return false;
	}
	v = strtoull(s, &end, 10);
	*id = v;
	return true;
}

static const char *v3_name(struct api_req *r)
{
	return r->n_params ? r->params[0] : "";
}

/* ---- status and plugins ---- */

static void v3_status(struct api_req *r)
{
	struct ezp_status_info st = {.struct_size = sizeof(st)};

	CTL(r)->status(CTX(r), &st);
	api_reply_json(r, MHD_HTTP_OK, body_status_json(&st));
}

static json_t *v3_kind_names(const void *const *kinds, size_t name_off)
{
	json_t *a = json_array();

	for (size_t i = 0; a && kinds && kinds[i]; i++) {
		const char *name = *(const char *const *)((const char *)kinds[i] + name_off);
		json_array_append_new(a, json_string(name ? name : ""));
	}
	return a;
}

static void v3_plugins(struct api_req *r)
{
	json_t *list = json_array();

	for (size_t i = 0; list; i++) {
		struct ezp_plugin_info pi = {.struct_size = sizeof(pi)};
		const struct ezp_plugin_desc *d;
		if (CTL(r)->plugin_at(CTX(r), i, &pi) != EZP_OK)
			break;
		d = pi.desc;
		json_array_append_new(
		    list, json_pack("{s:s, s:s, s:s, s:s, s:s, s:o, s:o, s:o}", "name",
				    d->name ? d->name : "", "version", d->version ? d->version : "",
				    "description", d->description ? d->description : "", "license",
				    d->license ? d->license : "", "path", pi.path ? pi.path : "",
				    "transports",
				    v3_kind_names((const void *const *)d->transports,
						  offsetof(struct ezp_transport_kind, name)),
				    "filters",
				    v3_kind_names((const void *const *)d->filters,
						  offsetof(struct ezp_filter_kind, name)),
				    "services",
				    v3_kind_names((const void *const *)d->services,
						  offsetof(struct ezp_service_kind, name))));
	}
	api_reply_json(r, MHD_HTTP_OK, json_pack("{s:o}", "plugins", list));
}

/* ---- pipelines ---- */

/* The pipeline's config as JSON (snake_case), or null. */
static json_t *v3_pipeline_config(struct api_req *r, const char *name)
{
	char *yaml = CTL(r)->pipeline_yaml(CTX(r), name);
	json_t *v = yaml ? api_yaml_to_json(yaml) : NULL;

	free(yaml);
	return v ? v : json_null();
}

static json_t *v3_pipeline_full(struct api_req *r, const struct ezp_pipeline_stats *p)
{
	json_t *o = body_pipeline_json(p);

	if (o)
		json_object_set_new(o, "config", v3_pipeline_config(r, p->name));
	return o;
}

/* Answer with the pipeline's current state (@status), or 404. */
static void v3_pipeline_answer(struct api_req *r, const char *name, unsigned status)
{
	struct ezp_pipeline_stats p = {.struct_size = sizeof(p)};

	if (CTL(r)->pipeline_stats(CTX(r), name, &p) != EZP_OK) {
		api_error(r, MHD_HTTP_NOT_FOUND, "pipeline_not_found", "no pipeline '%.72s'", name);
		return;
	}
	api_reply_json(r, status, v3_pipeline_full(r, &p));
}

static void v3_pipelines(struct api_req *r)
{
	struct ezp_pipeline_stats *ps = NULL;
	size_t n = 0;
	json_t *list;

	if (CTL(r)->pipelines(CTX(r), &ps, &n) != EZP_OK) {
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "cannot list pipelines");
		return;
	}
	list = json_array();
	for (size_t i = 0; list && i < n; i++)
		json_array_append_new(list, v3_pipeline_full(r, &ps[i]));
	free(ps);
	api_reply_json(r, MHD_HTTP_OK, json_pack("{s:o}", "pipelines", list));
}

static void v3_pipeline_get(struct api_req *r)
{
	v3_pipeline_answer(r, v3_name(r), MHD_HTTP_OK);
}

/* pipeline_put @item (JSON, snake_case); false after answering. */
static bool v3_put(struct api_req *r, const char *name, json_t *item, int close_sessions)
{
	struct ezp_error err = {0};
	char *yaml = api_json_to_yaml(item);
	int created = 0, rc;

	if (!yaml) {
		api_error(r, MHD_HTTP_BAD_REQUEST, "bad_request",
			  "the pipeline cannot be written as YAML (too large or too deep)");
		return false;
	}
	rc = CTL(r)->pipeline_put(CTX(r), name, yaml, close_sessions, &created, &err);
	free(yaml);
	if (rc != EZP_OK) {
		api_error_from(r, &err, "pipeline");
		return false;
	}
	return true;
}

static void v3_pipeline_create(struct api_req *r)
{
	struct ezp_pipeline_stats p = {.struct_size = sizeof(p)};
	struct body_err e;
	const char *name;
	json_t *o = api_body_object(r);

	if (!o)
		return;
	if (body_pipeline_create_parse(o, &name, &e)) {
		api_error_body(r, &e);
	} else if (CTL(r)->pipeline_stats(CTX(r), name, &p) == EZP_OK) {
		api_error_field(
		    r, MHD_HTTP_CONFLICT, "conflict", "name",
		    "a pipeline named '%s' exists already (PATCH it, or DELETE it first)", name);
	} else if (v3_put(r, name, o, 0)) {
		v3_pipeline_answer(r, name, MHD_HTTP_CREATED);
	}
	json_decref(o);
}

/* {"tcp": {...}} as the YAML `tcp: {...}` (the kind name kept verbatim), malloc'd. */
static char *v3_endpoint_yaml(json_t *ep)
{
	const char *kind;
	json_t *params, *k;
	char *ky = NULL, *py = NULL, *out = NULL;

	json_object_foreach(ep, kind, params)
	{
		k = json_string(kind);
		ky = k ? api_json_to_yaml(k) : NULL;
		json_decref(k);
		py = api_json_to_yaml(params);
		if (ky && py && asprintf(&out, "%s: %s", ky, py) < 0)
			out = NULL;
		break;
	}
	free(ky);
	free(py);
	return out;
}

static void v3_pipeline_patch(struct api_req *r)
{
	const char *name = v3_name(r);
	struct ezp_error err = {0};
	struct body_patch p = {0};
	struct body_err e;
	json_t *o = api_body_object(r), *cur = NULL;
	char *to_yaml = NULL;

	if (!o)
		return;
	if (body_pipeline_patch_parse(o, name, &p, &e)) {
		api_error_body(r, &e);
		goto done;
	}
	cur = v3_pipeline_config(r, name);
	if (!json_is_object(cur)) {
		api_error(r, MHD_HTTP_NOT_FOUND, "pipeline_not_found", "no pipeline '%.72s'", name);
		goto done;
	}
	if (p.to && !(to_yaml = v3_endpoint_yaml(p.to))) {
		api_error_field(r, MHD_HTTP_BAD_REQUEST, "bad_request", "to",
				"to: cannot be written as YAML");
		goto done;
	}
	if (p.has_config) {
		static const char *const fields[] = {"from", "to", "through", "shared", NULL};
		json_t *lim = json_object_get(o, "limits");
		for (size_t i = 0; fields[i]; i++) {
			json_t *v = json_object_get(o, fields[i]);
			if (v)
				json_object_set(cur, fields[i], v);
		}
		if (lim) {
			json_t *old = json_object_get(cur, "limits");
			if (json_is_object(old))
				json_object_update(old, lim);
			else
				json_object_set(cur, "limits", lim);
		}
		if (!v3_put(r, name, cur, p.close_sessions))
			goto done;
	}
	if (to_yaml && (!p.has_config || p.apply_to_existing) &&
	    CTL(r)->pipeline_swap_to(CTX(r), name, to_yaml, p.apply_to_existing, &err) != EZP_OK) {
		api_error_from(r, &err, "pipeline");
		goto done;
	}
	v3_pipeline_answer(r, name, MHD_HTTP_OK);
done:
	free(to_yaml);
	json_decref(cur);
	json_decref(o);
}

static void v3_pipeline_delete(struct api_req *r)
{
	struct ezp_error err = {0};

	if (CTL(r)->pipeline_delete(CTX(r), v3_name(r), &err) != EZP_OK)
		api_error_from(r, &err, "pipeline");
	else
		api_reply_empty(r);
}

static void v3_pipeline_restart(struct api_req *r)
{
	struct ezp_error err = {0};
	struct body_err e;
	int close_sessions = 0;
	json_t *o = NULL;

	if (r->body_len) {
		if (!(o = api_body_object(r)))
			return;
		if (body_restart_parse(o, &close_sessions, &e)) {
			api_error_body(r, &e);
			json_decref(o);
			return;
		}
		json_decref(o);
	}
	if (CTL(r)->pipeline_restart(CTX(r), v3_name(r), close_sessions, &err) != EZP_OK)
		api_error_from(r, &err, "pipeline");
	else
		v3_pipeline_answer(r, v3_name(r), MHD_HTTP_OK);
}

static void v3_pipeline_inject(struct api_req *r)
{
	struct ezp_error err = {0};
	struct body_inject in;
	struct body_err e;
	size_t n = 0;
	json_t *o = api_body_object(r);

	if (!o)
		return;
	if (body_inject_parse(o, &in, &e)) {
		api_error_body(r, &e);
	} else {
		if (CTL(r)->pipeline_inject(CTX(r), v3_name(r), in.dir, in.data, in.len, &n,
					    &err) != EZP_OK)
			api_error_from(r, &err, "pipeline");
		else
			api_reply_json(r, MHD_HTTP_OK,
				       json_pack("{s:I, s:I}", "sessions", (json_int_t)n, "bytes",
						 (json_int_t)in.len));
		free(in.data);
	}
	json_decref(o);
}

/* ---- sessions ---- */

static void v3_sessions(struct api_req *r)
{
	struct ezp_session_summary *ss = NULL;
	struct ezp_pipeline_stats p = {.struct_size = sizeof(p)};
	const char *pipeline = api_query(r, "pipeline");
	size_t n = 0;
	json_t *list;

	if (pipeline && !pipeline[0])
		pipeline = NULL;
	if (pipeline && CTL(r)->pipeline_stats(CTX(r), pipeline, &p) != EZP_OK) {
		api_error(r, MHD_HTTP_NOT_FOUND, "pipeline_not_found", "no pipeline '%.72s'",
			  pipeline);
		return;
	}
	if (CTL(r)->sessions(CTX(r), pipeline, &ss, &n) != EZP_OK) {
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "cannot list sessions");
		return;
	}
	list = json_array();
	for (size_t i = 0; list && i < n; i++)
		json_array_append_new(list, api_session_json(&ss[i]));
	free(ss);
	api_reply_json(r, MHD_HTTP_OK, json_pack("{s:o}", "sessions", list));
}

/* A failed call on session @id: 404 says which id; other errors as mapped. Thread: any. */
static void v3_session_error(struct api_req *r, const struct ezp_error *err, uint64_t id)
{
	if (err->code == EZP_ERR_NOT_FOUND || err->code == EZP_ERR_CLOSED)
		api_error(r, MHD_HTTP_NOT_FOUND, "session_not_found",
			  "no session %llu (it has ended, or never existed)",
			  (unsigned long long)id);
	else
		api_error_from(r, err, "session");
}

/* Answer with session @id (@status), or 404. Thread: any. */
static void v3_session_answer(struct api_req *r, uint64_t id, unsigned status)
{
	struct ezp_session_summary s = {.struct_size = sizeof(s)};

	if (CTL(r)->session_get(CTX(r), id, &s) != EZP_OK)
		api_error(r, MHD_HTTP_NOT_FOUND, "session_not_found",
			  "no session %llu (it has ended, or never existed)",
			  (unsigned long long)id);
	else
		api_reply_json(r, status, api_session_json(&s));
}

static void v3_session_get(struct api_req *r)
{
	uint64_t id;

	if (v3_id(r, &id))
		v3_session_answer(r, id, MHD_HTTP_OK);
}

static void v3_session_close(struct api_req *r)
{
	struct ezp_error err = {0};
	uint64_t id;

	if (!v3_id(r, &id))
		return;
	if (CTL(r)->session_close(CTX(r), id, &err) != EZP_OK)
		v3_session_error(r, &err, id);
	else
		api_reply_empty(r);
}

static void v3_session_inject(struct api_req *r)
{
	struct ezp_error err = {0};
	struct body_inject in;
	struct body_err e;
	uint64_t id;
	json_t *o;

	if (!v3_id(r, &id) || !(o = api_body_object(r)))
		return;
	if (body_inject_parse(o, &in, &e)) {
		api_error_body(r, &e);
	} else {
		if (CTL(r)->session_inject(CTX(r), id, in.dir, in.data, in.len, &err) != EZP_OK)
			v3_session_error(r, &err, id);
		else
			api_reply_json(r, MHD_HTTP_OK,
				       json_pack("{s:I, s:s}", "injected", (json_int_t)in.len,
						 "direction", api_dir_name(in.dir)));
		free(in.data);
	}
	json_decref(o);
}

/* A swap done on a thread of its own (it waits for a connect or a client). */
struct v3_swap {
	uint64_t id;
	bool server, add;
	int dial;
	unsigned timeout_ms;
	char address[BODY_ADDR_MAX + 1];
};

static void v3_swap_work(struct api_req *r)
{
	struct v3_swap *w = r->work_arg;
	struct ezp_error err = {0};
	int rc;

	if (w->server)
		rc = CTL(r)->session_swap_server(CTX(r), w->id, w->address, &err);
	else
		rc = CTL(r)->session_swap_client(CTX(r), w->id, w->address, w->dial, w->add,
						 w->timeout_ms, &err);
	if (rc != EZP_OK)
		v3_session_error(r, &err, w->id);
	else
		v3_session_answer(r, w->id, MHD_HTTP_OK);
	free(w);
	r->work_arg = NULL;
}

static void v3_swap(struct api_req *r, bool server, bool add)
{
	struct v3_swap *w = NULL;
	struct body_client c = {0};
	struct body_err e;
	uint64_t id;
	json_t *o;
	int bad;

	if (!v3_id(r, &id) || !(o = api_body_object(r)))
		return;
	bad = server ? body_server_parse(o, &c.address, &e) : body_client_parse(o, &c, &e);
	if (bad) {
		api_error_body(r, &e);
	} else if (!(w = calloc(1, sizeof(*w)))) {
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
	} else {
		w->id = id;
		w->server = server;
		w->add = add;
		w->dial = server ? 1 : c.dial;
		w->timeout_ms = c.timeout_ms;
		snprintf(w->address, sizeof(w->address), "%s", c.address);
		r->work_arg = w;
		api_run_blocking(r, v3_swap_work);
		if (!r->suspended) { /* could not start: answered already */
			free(w);
			r->work_arg = NULL;
		}
	}
	json_decref(o);
}

static void v3_swap_server(struct api_req *r)
{
	v3_swap(r, true, false);
}

static void v3_swap_client(struct api_req *r)
{
	v3_swap(r, false, false);
}

static void v3_add_client(struct api_req *r)
{
	v3_swap(r, false, true);
}

/* ---- not here yet, and the WebSocket ---- */

static void v3_capture(struct api_req *r)
{
	api_v3_capture(r); /* routes_v3_capture.c */
}

static void v3_socket(struct api_req *r)
{
	ws_upgrade(r, 3);
}

const struct api_route api_routes_v3[] = {
    {"GET", "/api/3/status", CS, 3, v3_status},
    {"GET", "/api/3/plugins", CS, 3, v3_plugins},
    {"GET", "/api/3/pipelines", CS, 3, v3_pipelines},
    {"POST", "/api/3/pipelines", RC, 3, v3_pipeline_create},
    {"GET", "/api/3/pipelines/{name}", CS, 3, v3_pipeline_get},
    {"PATCH", "/api/3/pipelines/{name}", RC, 3, v3_pipeline_patch},
    {"DELETE", "/api/3/pipelines/{name}", RC, 3, v3_pipeline_delete},
    {"POST", "/api/3/pipelines/{name}/restart", RC, 3, v3_pipeline_restart},
    {"POST", "/api/3/pipelines/{name}/inject", EZP_PERM_INJECT, 3, v3_pipeline_inject},
    {"GET", "/api/3/sessions", CS, 3, v3_sessions},
    {"GET", "/api/3/sessions/{id}", CS, 3, v3_session_get},
    {"DELETE", "/api/3/sessions/{id}", EZP_PERM_CLOSE, 3, v3_session_close},
    {"POST", "/api/3/sessions/{id}/inject", EZP_PERM_INJECT, 3, v3_session_inject},
    {"PUT", "/api/3/sessions/{id}/server", RC, 3, v3_swap_server},
    {"PUT", "/api/3/sessions/{id}/client", RC, 3, v3_swap_client},
    {"POST", "/api/3/sessions/{id}/clients", RC, 3, v3_add_client},
    {"GET", "/api/3/capture", EZP_PERM_CAPTURE, 3, v3_capture},
    {"GET", "/api/3/socket", EZP_PERM_USE_WEBSOCKET, 3, v3_socket},
    {NULL, NULL, 0, 0, NULL},
};
