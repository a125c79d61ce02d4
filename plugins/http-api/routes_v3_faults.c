/*
 * routes_v3_faults.c - GET/PUT /api/3/pipelines/{name}/faults and
 * /api/3/sessions/{id}/faults: the fault plugin's `ezp.fault` interface in
 * snake_case JSON. The body parser and the JSON shape are pure functions
 * (no libmicrohttpd, no core calls). The routes answer 501 `not_available`
 * only when no loaded plugin offers the interface.
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
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "bodies.h"

/* The limits are the fault plugin's; it checks them again. */
#define FAULTS_MAX_DELAY_MS 300000
#define FAULTS_MAX_FREEZE_MS 600000
#define FAULTS_MAX_BANDWIDTH 100000000000ll

static int faults_bad(struct body_err *e, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int faults_bad(struct body_err *e, const char *field, const char *fmt, ...)
{
	va_list ap;

	snprintf(e->field, sizeof(e->field), "%s", field);
	va_start(ap, fmt);
	vsnprintf(e->message, sizeof(e->message), fmt, ap);
	va_end(ap);
	return -1;
}

/* An integer member in 0..@max (absent: unchanged). */
static int faults_int(json_t *v, const char *field, long long max, uint64_t *out,
		      struct body_err *e)
{
	if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > max)
		return faults_bad(e, field, "%s: must be a whole number in 0..%lld", field, max);
	*out = (uint64_t)json_integer_value(v);
	return 0;
}

static int faults_dir_parse(json_t *o, const char *dname, struct ezp_fault_dir *d,
			    struct body_err *e)
{
	const char *key;
	json_t *v;
	char field[64];
	uint64_t n;

	if (!json_is_object(o))
		return faults_bad(e, dname,
				  "%s: must be an object with latency_ms, jitter_ms, loss, "
				  "bandwidth_bps, freeze, blackhole",
				  dname);
	memset(d, 0, sizeof(*d));
	json_object_foreach(o, key, v)
	{
		snprintf(field, sizeof(field), "%s.%.40s", dname, key);
		if (!strcmp(key, "latency_ms") || !strcmp(key, "jitter_ms")) {
			if (faults_int(v, field, FAULTS_MAX_DELAY_MS, &n, e))
				return -1;
			*(key[0] == 'l' ? &d->latency_ms : &d->jitter_ms) = (uint32_t)n;
		} else if (!strcmp(key, "bandwidth_bps")) {
			if (faults_int(v, field, FAULTS_MAX_BANDWIDTH, &n, e))
				return -1;
			d->bandwidth_bps = n;
		} else if (!strcmp(key, "loss")) {
			double x = json_number_value(v);
			if (!json_is_number(v) || !(x >= 0 && x <= 1))
				return faults_bad(e, field,
						  "%s: must be a number in 0..1 (the share "
						  "of packets dropped)",
						  field);
			d->loss = x;
		} else if (!strcmp(key, "freeze") || !strcmp(key, "blackhole")) {
			if (!json_is_boolean(v))
				return faults_bad(e, field, "%s: must be true or false", field);
			*(key[0] == 'f' ? &d->freeze : &d->blackhole) = json_is_true(v);
		} else {
			return faults_bad(e, field,
					  "%s: unknown field (latency_ms, jitter_ms, loss, "
					  "bandwidth_bps, freeze, blackhole)",
					  field);
		}
	}
	return 0;
}

/*
 * Parse a PUT body. *@clear is set when it has no member at all. Outputs
 * are written only on success.
 */
static int faults_body_parse(json_t *o, struct ezp_faults *out, int *clear, struct body_err *e)
{
	struct ezp_faults f;
	int has_both = 0, has_dir = 0;
	const char *key;
	json_t *v;
	uint64_t n;

	memset(&f, 0, sizeof(f));
	f.struct_size = sizeof(f);
	json_object_foreach(o, key, v)
	{
		if (!strcmp(key, "to_server") || !strcmp(key, "to_client")) {
			if (faults_dir_parse(v, key, &f.dir[key[3] == 'c'], e))
				return -1;
			has_dir = 1;
		} else if (!strcmp(key, "both")) {
			if (faults_dir_parse(v, key, &f.dir[0], e))
				return -1;
			f.dir[1] = f.dir[0];
			has_both = 1;
		} else if (!strcmp(key, "seed")) {
			if (!json_is_integer(v) || json_integer_value(v) < 0)
				return faults_bad(e, key,
						  "seed: must be a whole number >= 0 (0: random)");
			f.seed = (uint64_t)json_integer_value(v);
		} else if (!strcmp(key, "freeze_max_ms")) {
			if (faults_int(v, key, FAULTS_MAX_FREEZE_MS, &n, e))
				return -1;
			f.freeze_max_ms = (uint32_t)n;
		} else {
			return faults_bad(e, key,
					  "%.40s: unknown field (to_server, to_client, both, "
					  "seed, freeze_max_ms)",
					  key);
		}
	}
	if (has_both && has_dir)
		return faults_bad(e, "both",
				  "both: give either both or to_server/to_client, "
				  "not the two together");
	*clear = json_object_size(o) == 0;
	*out = f;
	return 0;
}

static json_t *faults_dir_json(const struct ezp_fault_dir *d)
{
	return json_pack("{s:I, s:I, s:f, s:I, s:b, s:b}", "latency_ms", (json_int_t)d->latency_ms,
			 "jitter_ms", (json_int_t)d->jitter_ms, "loss", d->loss, "bandwidth_bps",
			 (json_int_t)d->bandwidth_bps, "freeze", d->freeze, "blackhole",
			 d->blackhole);
}

static json_t *faults_json(const struct ezp_faults *f)
{
	return json_pack("{s:o, s:o, s:I, s:I}", "to_server", faults_dir_json(&f->dir[0]),
			 "to_client", faults_dir_json(&f->dir[1]), "seed", (json_int_t)f->seed,
			 "freeze_max_ms",
			 (json_int_t)(f->freeze_max_ms ? f->freeze_max_ms : 10000));
}

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
	bad = faults_body_parse(o, f, clear, &e);
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
	api_reply_json(r, MHD_HTTP_OK, faults_json(&f));
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
	o = faults_json(&f);
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
