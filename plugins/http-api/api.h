/*
 * api.h - the http-api plugin's internal interface between its files.
 *
 *   server.c     start/stop, libmicrohttpd on the core's service loop,
 *                blocking work off the loop
 *   request.c    one request: routing, keys and permissions, body limits
 *   reply.c      replies and errors (the v3 and old envelopes)
 *   routes_v3.c  the v3 REST routes (DESIGN.md section 8): status,
 *                plugins, pipelines, sessions
 *   routes_v3_config.c, routes_v3_keys.c  the v3 config and key routes
 *   routes_v3_faults.c  the v3 fault routes (the fault plugin's ezp.fault)
 *   routes_v3_capture.c  GET /api/3/capture: live pcapng streams
 *   routes_old.c the old v1/v2 REST routes
 *   metrics.c    /metrics (Prometheus text) and the request counters
 *   ws.c         WebSocket upgrade and framing (wslay) on the service loop
 *   ws_v3.c      the v3 socket protocol (watch and filter modes)
 *   ws_v2.c      the old /api/2/socket protocol
 *   yamljson.c   YAML <-> JSON for the config and pipeline shapes
 *
 * Thread: everything here runs on the service loop (ezp_control.
 * service_worker) unless it says otherwise.
 */
#ifndef EZP_HTTP_API_H
#define EZP_HTTP_API_H

#include <ezproxy/sdk.h>
#include <ezproxy/services.h>
#include <jansson.h>
#include <microhttpd.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "b64.h"

#define API_MAX_BODY (1u << 20)     /* request bodies larger than this get 413 */
#define API_MAX_PARAMS 4

struct ws_conn;
struct api_capture;
struct api_metrics;
struct body_err;

struct api {
	const struct ezp_core *core;
	struct ezp_core_ctx *ctx;
	const struct ezp_control *ctl;
	const struct ezp_auth *auth;     /* NULL when Auth is off */
	const struct ezp_fault *fault;   /* NULL when the fault plugin is not loaded */
	struct ezp_worker *w;            /* the service loop */
	struct MHD_Daemon *mhd;
	struct ezp_watch *mhd_watch;
	struct ezp_timer *mhd_timer;
	struct ezp_addr bound;           /* where the API listens (port 0 resolved) */
	char *listen, *origin, *web_root, *tls_cert_pem, *tls_key_pem;
	bool tls;
	uint64_t started_us;
	struct api_metrics *metrics;
	struct ws_conn *ws_list;         /* open WebSockets (ws.c) */
	bool stopping;
	const struct ezp_capture *capture; /* the capture plugin's ezp.capture, or NULL */
	struct api_capture *captures;    /* live capture streams (routes_v3_capture.c) */
};

/* One HTTP request being answered. */
struct api_req {
	struct api *api;
	struct MHD_Connection *conn;
	const char *method;              /* "GET", ... */
	const char *url;                 /* path, no query */
	const char *route;               /* the matched pattern, for metrics ("-" none) */
	int version;                     /* 1, 2 (old envelope) or 3 */
	char *params[API_MAX_PARAMS];    /* {name} / {id} path parts, decoded */
	size_t n_params;
	char *body;                      /* NUL-terminated */
	size_t body_len;
	bool too_large;
	/* the key used (all bits when Auth is off) */
	uint32_t perms;
	char key_id[17];
	const char *key_text;            /* as sent (for ?key= on upgrades); never logged */
	/* the answer */
	struct MHD_Response *resp;
	unsigned status;
	/* blocking work (api_run_blocking) */
	bool suspended, work_done;
	void (*work)(struct api_req *r);
	void *work_arg;
};

typedef void (*api_handler)(struct api_req *r);

struct api_route {
	const char *method;              /* NULL ends a table */
	const char *pattern;             /* "/api/3/sessions/{id}": {x} matches one path part */
	uint32_t perms;                  /* every bit needed (0: any known key; see API_PERM_PUBLIC) */
	int version;                     /* error envelope: 3, or 1/2 for the old API */
	api_handler fn;
};

/*
 * A route that needs no key at all (the web page): API_PERM_PUBLIC in perms,
 * or perms 0 on a path outside /api/.
 */
#define API_PERM_PUBLIC (1u << 31)

extern const struct api_route api_routes_v3[];
extern const struct api_route api_routes_v3_config[];
extern const struct api_route api_routes_v3_keys[];
extern const struct api_route api_routes_v3_faults[]; /* routes_v3_faults.c */
extern const struct api_route api_routes_old[];
extern const struct api_route api_routes_misc[];   /* /metrics, /api/3/openapi.json, / */

/* ---- requests (request.c) ---- */

/* libmicrohttpd's access and completion callbacks; @cls is the struct api. */
enum MHD_Result api_request_access(void *cls, struct MHD_Connection *conn, const char *url,
				   const char *method, const char *version, const char *upload,
				   size_t *upload_size, void **con_cls);
void api_request_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
			   enum MHD_RequestTerminationCode toe);

/* A query argument (decoded), or NULL. */
const char *api_query(struct api_req *r, const char *name);
/* A request header, or NULL. */
const char *api_header(struct api_req *r, const char *name);
/*
 * Parse the body as a JSON object (duplicate keys rejected). On failure it
 * answers 400 `bad_json` naming the line and column (or `bad_request` when
 * the top level is not an object) and returns NULL.
 */
json_t *api_body_object(struct api_req *r);
/*
 * (server.c) Run @work(@r) on a thread of its own (for calls that wait: a server swap,
 * an accept-mode client). The HTTP connection is suspended meanwhile and
 * the reply @work made is sent when it returns. The handler returns right
 * after calling this.
 */
void api_run_blocking(struct api_req *r, void (*work)(struct api_req *r));

/*
 * (server.c) Run libmicrohttpd soon, from the loop (after MHD_resume_connection
 * outside a libmicrohttpd callback, which it would otherwise notice only at
 * its next event).
 */
void api_wake(struct api *api);

/* ---- replies (reply.c). Each sets r->resp / r->status once. Thread: any. ---- */

/* (transfer full) @body. */
void api_reply_json(struct api_req *r, unsigned status, json_t *body);
/* v3: {"error": {"code", "message"}}; old API: {"Status": status, "Data": "message"}. */
void api_error(struct api_req *r, unsigned status, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* As api_error, with a "field" member naming the body field at fault (v3 only). */
void api_error_field(struct api_req *r, unsigned status, const char *code, const char *field,
		     const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* 400 `bad_request` naming the field a body parser (bodies.c) refused. */
void api_error_body(struct api_req *r, const struct body_err *e);
/* Map a failed core call to a status and code (NOT_FOUND 404 `<what>_not_found`, ...). */
void api_error_from(struct api_req *r, const struct ezp_error *err, const char *what);
/* Old API success: {"Status": status, "Data": data}. (transfer full) @data. */
void api_reply_old(struct api_req *r, unsigned status, json_t *data);
void api_reply_raw(struct api_req *r, unsigned status, const char *content_type,
		   const void *data, size_t len);
/* 204 No Content. */
void api_reply_empty(struct api_req *r);

/* ---- shapes shared by the REST and WebSocket code (bodies.c; base64: b64.h) ---- */

const char *api_dir_name(int dir);               /* "to_server" / "to_client" */
/* "to_server" | "to_client" | "both" -> EZP_DIR_*, or -1. */
int api_dir_parse(const char *s);
json_t *api_addr_json(const struct ezp_addr *a); /* "1.2.3.4:5" or null */
json_t *api_session_json(const struct ezp_session_summary *s);
/* Permission bits <-> names ("perms": 7 or ["CheckStatus", ...]); -1 on bad input. */
int64_t api_perms_parse(json_t *v, char *bad, size_t bad_len);
json_t *api_perms_json(uint32_t perms);

/* ---- WebSocket (ws.c) ---- */

/* Answer an upgrade request on /api/3/socket (@proto 3) or /api/2/socket (@proto 2). */
void ws_upgrade(struct api_req *r, int proto);
/* Close every WebSocket opened with @key_id (revocation). */
void ws_close_key(struct api *api, const char *key_id);
/* Close all (plugin stop). */
void ws_close_all(struct api *api);

/* ---- live captures (routes_v3_capture.c) ---- */

/* GET /api/3/capture: a pcapng stream from the capture plugin (501 without it). */
void api_v3_capture(struct api_req *r);
/* End every live capture stream (plugin stop). */
void api_capture_close_all(struct api *api);

/* ---- metrics (metrics.c) ---- */

int api_metrics_new(struct api *api);
void api_metrics_free(struct api *api);
/* Count one answered request. */
void api_metrics_count(struct api *api, const char *route, const char *method, unsigned status);

/* ---- YAML <-> JSON (yamljson.c) ---- */

/*
 * YAML text (as the core dumps it) to JSON with PascalCase keys turned to
 * snake_case ("IdleTimeoutMs" -> "idle_timeout_ms"); kind names (tcp,
 * lua, ...) are kept. NULL on bad YAML.
 */
json_t *api_yaml_to_json(const char *yaml);
/* JSON with snake_case keys to YAML flow text with PascalCase keys, malloc'd. */
char *api_json_to_yaml(json_t *v);

#endif
