/*
 * bodies_faults.c - the body of PUT /api/3/pipelines/{name}/faults and
 * /api/3/sessions/{id}/faults, and the JSON shape of struct ezp_faults
 * (bodies.h). Pure functions over jansson values, fuzzed with the other
 * bodies (tests/fuzz/fuzz_api_body.c).
 * Thread: any.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

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

int body_faults_parse(json_t *o, struct ezp_faults *out, int *clear, struct body_err *e)
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

json_t *body_faults_json(const struct ezp_faults *f)
{
	return json_pack("{s:o, s:o, s:I, s:I}", "to_server", faults_dir_json(&f->dir[0]),
			 "to_client", faults_dir_json(&f->dir[1]), "seed", (json_int_t)f->seed,
			 "freeze_max_ms",
			 (json_int_t)(f->freeze_max_ms ? f->freeze_max_ms : 10000));
}
