/*
 * bodies.h - the v3 request-body parsers and the JSON shapes of core
 * structs (bodies.c). Pure functions over jansson values (base64: b64.c):
 * no libmicrohttpd, no core calls, so tests/fuzz/fuzz_api_body.c links
 * bodies.c and b64.c alone.
 *
 * Every parser takes a JSON object loaded with JSON_REJECT_DUPLICATES,
 * refuses unknown fields, and on failure returns -1 with @e naming the
 * field and saying what is wrong ("direction: must be to_client, to_server
 * or both"). Outputs are written only on success; pointers into the
 * object are borrowed (they live as long as the object).
 *
 * Thread: any.
 */
#ifndef EZP_HTTP_API_BODIES_H
#define EZP_HTTP_API_BODIES_H

#include <ezproxy/ezproxy.h>
#include <ezproxy/services.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BODY_NAME_MAX 63     /* pipeline names */
#define BODY_KEY_NAME_MAX 64 /* key names */
#define BODY_ADDR_MAX 255
#define BODY_TIMEOUT_DEFAULT_MS 10000u
#define BODY_TIMEOUT_MAX_MS 600000u

struct body_err {
	char field[64]; /* "" when the body as a whole is wrong */
	char message[320];
};

/*
 * Load @len bytes as one JSON object (duplicate keys rejected). NULL on
 * failure: @e->message says where (line, column) and *@not_object is set
 * to 1 when the text is JSON but not an object, 0 when it is not JSON.
 */
json_t *body_load_object(const char *buf, size_t len, struct body_err *e, int *not_object);

/* POST /api/3/sessions/{id}/inject, POST /api/3/pipelines/{name}/inject. */
struct body_inject {
	int dir;	     /* EZP_DIR_TO_SERVER, EZP_DIR_TO_CLIENT or EZP_DIR_BOTH */
	unsigned char *data; /* malloc'd: the caller frees it */
	size_t len;
};
int body_inject_parse(json_t *o, struct body_inject *out, struct body_err *e);

/* PUT /api/3/sessions/{id}/server: {address}. */
int body_server_parse(json_t *o, const char **address, struct body_err *e);

/* PUT /api/3/sessions/{id}/client, POST .../clients: {address, mode?, timeout_ms?}. */
struct body_client {
	const char *address;
	int dial; /* mode "dial" (default) 1, "accept" 0 */
	unsigned timeout_ms;
};
int body_client_parse(json_t *o, struct body_client *out, struct body_err *e);

/* POST /api/3/pipelines/{name}/restart: {close_sessions?}. */
int body_restart_parse(json_t *o, int *close_sessions, struct body_err *e);

/*
 * POST /api/3/pipelines: {name, from, to, through?, shared?, limits?}. On
 * success *@name is the pipeline name and @o is a valid pipeline item.
 */
int body_pipeline_create_parse(json_t *o, const char **name, struct body_err *e);

/*
 * PATCH /api/3/pipelines/{name}: any of from, to, through, shared, limits,
 * plus apply_to_existing and close_sessions; name only if it is @name.
 */
struct body_patch {
	bool has_config; /* any of from, through, shared, limits (and name) */
	json_t *to;	 /* borrowed, or NULL */
	int apply_to_existing;
	int close_sessions;
};
int body_pipeline_patch_parse(json_t *o, const char *name, struct body_patch *out,
			      struct body_err *e);

/* PUT /api/3/config as JSON: {"yaml": "..."} or {"config": {...}} (one of them). */
int body_config_parse(json_t *o, const char **yaml, json_t **config, struct body_err *e);

/* POST /api/3/keys: {perms, name?}. */
int body_key_parse(json_t *o, uint32_t *perms, const char **name, struct body_err *e);

/* Is @name a valid pipeline name ([A-Za-z0-9_.-], 1..63)? */
bool body_name_ok(const char *name);

/* ---- shapes of core structs ---- */

/* "2026-01-02T03:04:05.678Z" for CLOCK_REALTIME microseconds (0: null). */
json_t *body_time_json(uint64_t us);
json_t *body_status_json(const struct ezp_status_info *st);
/* Without "config" (the caller adds it). */
json_t *body_pipeline_json(const struct ezp_pipeline_stats *p);
json_t *body_key_json(const struct ezp_key_info *k);

/*
 * PUT .../faults: {"to_server": {...}, "to_client": {...} | "both": {...},
 * "seed", "freeze_max_ms"} (bodies_faults.c). A direction left out has no
 * faults; *@clear is set for {}.
 */
int body_faults_parse(json_t *o, struct ezp_faults *out, int *clear, struct body_err *e);
/* The same shape for answers, both directions always present. */
json_t *body_faults_json(const struct ezp_faults *f);

#endif
