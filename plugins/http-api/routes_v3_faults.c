/*
 * routes_v3_faults.c - GET/PUT /api/3/pipelines/{name}/faults and
 * /api/3/sessions/{id}/faults: the fault plugin's `ezp.fault` interface in
 * snake_case JSON (the body parser and the JSON shape: bodies_faults.c).
 * The routes answer 501 `not_available` only when no loaded plugin offers
 * the interface.
 *
 * Body and answer:
 *   {"to_server": {"latency_ms", "jitter_ms", "loss", "bandwidth_bps", "freeze",
 *    "blackhole"}, "to_client": {...}, "seed": N, "freeze_max_ms": N}
 * PUT replaces: a direction left out has no faults; "both" sets both
 * directions at once; {} clears (for a session: its own faults go, the
 * pipeline's apply again). A session's answer adds "own".
 *
 * Thread: the service loop (the interface never waits for a worker).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "bodies.h"

/* ---- the routes ---- */

static const struct ezp_fault *faults_iface(struct api_req *r)
{
	const struct ezp_fault *fi = r->api->fault;

	if (!fi)
		api_error(r, MHD_HTTP_NOT_IMPLEMENTED, "not_available",
			  "the fault plugin is not loaded");
	return fi;
}

/* Read the PUT body; false after answering 400. */
static bool faults_read(struct api_req *r, struct ezp_faults *f, int *clear)
{
	struct body_err e;
	json_t *o = api_body_object(r);
	int bad;

	if (!o)
		return false;
	bad = body_faults_parse(o, f, clear, &e);
	json_decref(o);
	if (bad)
		api_error_body(r, &e);
	return !bad;
}

static void faults_pipeline(struct api_req *r)
{
	const struct ezp_fault *fi = faults_iface(r);
	const char *name = r->n_params ? r->params[0] : "";
	struct ezp_faults f = {.struct_size = sizeof(f)};
	struct ezp_error err = {0};
	int clear = 0, rc;

	if (!fi)
		return;
	if (!strcmp(r->method, "PUT")) {
		if (!faults_read(r, &f, &clear))
			return;
		rc = fi->pipeline_set(fi->fault, name, clear ? NULL : &f, &err);
		if (rc != EZP_OK)
			goto fail;
	}
	rc = fi->pipeline_get(fi->fault, name, &f, &err);
	if (rc != EZP_OK)
		goto fail;
	api_reply_json(r, MHD_HTTP_OK, body_faults_json(&f));
	return;
fail:
	api_error_from(r, &err, strstr(err.message, "fault stage") ? "fault_stage" : "pipeline");
}

static void faults_session(struct api_req *r)
{
	const struct ezp_fault *fi = faults_iface(r);
	const char *s = r->n_params ? r->params[0] : "";
	struct ezp_faults f = {.struct_size = sizeof(f)};
	struct ezp_error err = {0};
	int clear = 0, own = 0, rc;
	uint64_t id;
	json_t *o;

	if (!fi)
		return;
	if (!s[0] || strlen(s) > 20 || strspn(s, "0123456789") != strlen(s)) {
		api_error_field(r, MHD_HTTP_BAD_REQUEST, "bad_request", "id",
				"id: a session id is a number, not '%.40s'", s);
		return;
	}
	id = strtoull(s, NULL, 10);
	if (!strcmp(r->method, "PUT")) {
		if (!faults_read(r, &f, &clear))
			return;
		rc = fi->session_set(fi->fault, id, clear ? NULL : &f, &err);
		if (rc != EZP_OK)
			goto fail;
	}
	rc = fi->session_get(fi->fault, id, &f, &own, &err);
	if (rc != EZP_OK)
		goto fail;
	o = body_faults_json(&f);
	json_object_set_new(o, "own", json_boolean(own));
	api_reply_json(r, MHD_HTTP_OK, o);
	return;
fail:
	api_error_from(r, &err, strstr(err.message, "fault stage") ? "fault_stage" : "session");
}

const struct api_route api_routes_v3_faults[] = {
    {"GET", "/api/3/pipelines/{name}/faults", EZP_PERM_CHECK_STATUS, 3, faults_pipeline},
    {"PUT", "/api/3/pipelines/{name}/faults", EZP_PERM_RECONFIGURE, 3, faults_pipeline},
    {"GET", "/api/3/sessions/{id}/faults", EZP_PERM_CHECK_STATUS, 3, faults_session},
    {"PUT", "/api/3/sessions/{id}/faults", EZP_PERM_RECONFIGURE, 3, faults_session},
    {NULL, NULL, 0, 0, NULL},
};
