/*
 * fuzz_api_body.c - libFuzzer target for the http-api plugin's v3 request
 * bodies (plugins/http-api/bodies.c) and its YAML <-> JSON conversion
 * (yamljson.c). Any bytes must parse or fail cleanly through every body
 * parser; base64 must round-trip; a JSON string must survive JSON -> YAML
 * -> JSON unchanged; the JSON shapes of core structs filled with arbitrary
 * bytes must not read out of bounds.
 * Build: clang -g -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Isdk/include \
 *          plugins/http-api/bodies.c plugins/http-api/bodies_old.c \
 *          plugins/http-api/bodies_faults.c plugins/http-api/yamljson.c plugins/http-api/b64.c \
 *          tests/fuzz/fuzz_api_body.c -lyaml -ljansson -lcrypto
 * Thread: libFuzzer's.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../plugins/http-api/api.h"
#include "../../plugins/http-api/bodies.h"
#include "../../plugins/http-api/bodies_old.h"

static void check(int ok)
{
	if (!ok)
		abort();
}

/* decode(encode(x)) == x */
static void b64_roundtrip(const unsigned char *data, size_t len)
{
	char *text = api_b64_encode(data, len);
	unsigned char *back;
	size_t n = 0;

	check(text != NULL);
	back = api_b64_decode(text, &n);
	check(back != NULL && n == len && (len == 0 || memcmp(back, data, len) == 0));
	free(back);
	free(text);
}

/* A JSON string through YAML and back is the same string. */
static void string_roundtrip(json_t *s)
{
	char *yaml = api_json_to_yaml(s);
	json_t *back;

	if (!yaml)
		return; /* too large */
	back = api_yaml_to_json(yaml);
	check(back && json_is_string(back) && json_equal(back, s));
	json_decref(back);
	free(yaml);
}

static void every_string(json_t *v, int depth)
{
	const char *k;
	json_t *m;
	size_t i;

	if (depth > 8)
		return;
	if (json_is_string(v)) {
		size_t n;
		unsigned char *d = api_b64_decode(json_string_value(v), &n);
		if (d) {
			b64_roundtrip(d, n);
			free(d);
		}
		string_roundtrip(v);
	} else if (json_is_object(v)) {
		json_object_foreach(v, k, m) every_string(m, depth + 1);
	} else if (json_is_array(v)) {
		json_array_foreach(v, i, m) every_string(m, depth + 1);
	}
}

/* A faults body that parses means the same after its JSON shape is parsed again. */
static void faults_roundtrip(json_t *o)
{
	struct ezp_faults f, g;
	struct body_err e;
	json_t *shape;
	int clear;

	if (body_faults_parse(o, &f, &clear, &e) != 0)
		return;
	for (int d = 0; d < 2; d++)
		check(f.dir[d].loss >= 0 && f.dir[d].loss <= 1);
	shape = body_faults_json(&f);
	check(shape && body_faults_parse(shape, &g, &clear, &e) == 0);
	for (int d = 0; d < 2; d++)
		check(memcmp(&f.dir[d], &g.dir[d], sizeof(f.dir[d])) == 0);
	check(g.seed == f.seed);
	json_decref(shape);
}

static void bodies(json_t *o)
{
	struct body_err e;
	struct body_inject in;
	struct body_client c;
	struct body_patch p;
	const char *s;
	json_t *cfg;
	int b;
	uint32_t perms;
	char bad[64];

	if (body_inject_parse(o, &in, &e) == 0) {
		check(in.dir >= 0 && in.dir <= 2 && in.len > 0);
		b64_roundtrip(in.data, in.len);
		free(in.data);
	}
	body_server_parse(o, &s, &e);
	if (body_client_parse(o, &c, &e) == 0)
		check(c.address && c.timeout_ms >= 1 && c.timeout_ms <= BODY_TIMEOUT_MAX_MS);
	body_restart_parse(o, &b, &e);
	if (body_pipeline_create_parse(o, &s, &e) == 0)
		check(body_name_ok(s));
	body_pipeline_patch_parse(o, "p", &p, &e);
	body_config_parse(o, &s, &cfg, &e);
	if (body_key_parse(o, &perms, &s, &e) == 0)
		check(perms <= EZP_PERM_ALL);
	faults_roundtrip(o);
	if (json_object_get(o, "perms")) {
		int64_t v = api_perms_parse(json_object_get(o, "perms"), bad, sizeof(bad));
		if (v >= 0) {
			json_t *names = api_perms_json((uint32_t)v);
			check(api_perms_parse(names, NULL, 0) == v);
			json_decref(names);
		}
	}
	check(strlen(e.message) < sizeof(e.message));
	/* the whole object through YAML: must not crash (key spellings may collide) */
	{
		char *yaml = api_json_to_yaml(o);
		json_t *back = yaml ? api_yaml_to_json(yaml) : NULL;
		json_decref(back);
		free(yaml);
	}
	every_string(o, 0);
}

/* Core structs filled with the input bytes: the shapes stay in bounds. */
static void shapes(const uint8_t *data, size_t size)
{
	struct ezp_session_summary ss;
	struct ezp_pipeline_stats ps;
	struct ezp_key_info ki;
	json_t *v;

	memset(&ss, 0, sizeof(ss));
	memcpy(&ss, data, size < sizeof(ss) ? size : sizeof(ss));
	ss.pipeline[sizeof(ss.pipeline) - 1] = '\0';
	ss.transport[sizeof(ss.transport) - 1] = '\0';
	if (ss.client.len > sizeof(ss.client.ss))
		ss.client.len = sizeof(ss.client.ss);
	v = api_session_json(&ss);
	json_decref(v);

	memset(&ps, 0, sizeof(ps));
	memcpy(&ps, data, size < sizeof(ps) ? size : sizeof(ps));
	ps.name[sizeof(ps.name) - 1] = '\0';
	ps.from_kind[sizeof(ps.from_kind) - 1] = '\0';
	ps.to_kind[sizeof(ps.to_kind) - 1] = '\0';
	v = body_pipeline_json(&ps);
	json_decref(v);

	memset(&ki, 0, sizeof(ki));
	memcpy(&ki, data, size < sizeof(ki) ? size : sizeof(ki));
	ki.id[sizeof(ki.id) - 1] = '\0';
	ki.name[sizeof(ki.name) - 1] = '\0';
	ki.created_by[sizeof(ki.created_by) - 1] = '\0';
	v = body_key_json(&ki);
	json_decref(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct body_err e;
	int not_object;
	char *text;
	json_t *o, *v;
	size_t n;
	unsigned char *d;

	o = body_load_object((const char *)data, size, &e, &not_object);
	if (o) {
		bodies(o);
		json_decref(o);
	}

	text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	/* the bytes as YAML (as the core's dumps are read), and back */
	v = api_yaml_to_json(text);
	if (v) {
		char *yaml = api_json_to_yaml(v);
		json_t *again = yaml ? api_yaml_to_json(yaml) : NULL;
		json_decref(again);
		free(yaml);
		json_decref(v);
	}
	/* the bytes as base64 */
	d = api_b64_decode(text, &n);
	if (d) {
		b64_roundtrip(d, n);
		free(d);
	}
	check(api_dir_parse(text) == -1 || !strcmp(api_dir_name(api_dir_parse(text)), text));
	/* the old API's bodies and queries */
	{
		struct api_old_inject in;
		char err[256];
		int64_t perms;
		if (api_old_inject_parse((const char *)data, size, &in, err, sizeof(err)) == 0)
			api_old_inject_clear(&in);
		if (api_old_perms_parse(text, &perms) == 0)
			json_decref(api_old_keyinfo_json((uint32_t)perms & 0x1ffu));
		d = api_old_b64_decode(text, size, &n);
		free(d);
	}
	free(text);
	shapes(data, size);
	return 0;
}
