/*
 * metrics.c - the API request counters, GET /metrics (Prometheus text
 * format 0.0.4), GET /api/3/openapi.json (spec/openapi.json, embedded at
 * build time by embed.py) and the placeholder page at GET /.
 *
 * Threads: api_metrics_count runs on the service loop and on the threads
 * of api_run_blocking, so the counters sit behind a mutex. The table is
 * bounded: routes come from fixed tables, methods are folded to a known
 * list and statuses are the few the server answers; anything past
 * API_METRICS_MAX entries is counted under route "other". Handlers run on the service loop.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

#define API_METRICS_MAX 512
#define API_METRICS_ROUTE 96

/* openapi_embed.c, generated from spec/openapi.json by embed.py */
extern const unsigned char api_openapi_json[];
extern const size_t api_openapi_json_len;

struct metrics_entry {
	char route[API_METRICS_ROUTE];
	const char *method; /* one of metrics_methods */
	unsigned status;
	uint64_t count;
};

struct api_metrics {
	pthread_mutex_t lock;
	size_t n;
	uint64_t overflow;
	struct metrics_entry e[API_METRICS_MAX];
};

static const char *const metrics_methods[] = {
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
};

/*
 * api_metrics_new - make the counters (api->metrics).
 * Returns: EZP_OK or EZP_ERR_NOMEM. Thread: service loop (plugin start).
 */
int api_metrics_new(struct api *api)
{
	struct api_metrics *m = calloc(1, sizeof(*m));

	if (!m)
		return EZP_ERR_NOMEM;
	if (pthread_mutex_init(&m->lock, NULL) != 0) {
		free(m);
		return EZP_ERR_NOMEM;
	}
	api->metrics = m;
	return EZP_OK;
}

/* A no-op when there are none. Thread: service loop, after every blocking job ended. */
void api_metrics_free(struct api *api)
{
	if (!api || !api->metrics)
		return;
	pthread_mutex_destroy(&api->metrics->lock);
	free(api->metrics);
	api->metrics = NULL;
}

static const char *metrics_method(const char *method)
{
	size_t i;

	for (i = 0; method && i + 1 < sizeof(metrics_methods) / sizeof(metrics_methods[0]); i++)
		if (strcmp(method, metrics_methods[i]) == 0)
			return metrics_methods[i];
	return "other";
}

/*
 * api_metrics_count - count one answered request. @route is the matched
 * pattern ("-" or NULL when none matched). Thread: any.
 */
void api_metrics_count(struct api *api, const char *route, const char *method, unsigned status)
{
	struct api_metrics *m = api ? api->metrics : NULL;
	const char *meth = metrics_method(method);
	char key[API_METRICS_ROUTE];
	size_t i;

	if (!m)
		return;
	snprintf(key, sizeof(key), "%s", route && *route ? route : "-");
	pthread_mutex_lock(&m->lock);
	for (i = 0; i < m->n; i++) {
		struct metrics_entry *e = &m->e[i];

		if (e->method == meth && e->status == status && strcmp(e->route, key) == 0) {
			e->count++;
			goto out;
		}
	}
	if (m->n < API_METRICS_MAX) {
		struct metrics_entry *e = &m->e[m->n++];

		memcpy(e->route, key, sizeof(key));
		e->method = meth;
		e->status = status;
		e->count = 1;
	} else {
		m->overflow++;
	}
out:
	pthread_mutex_unlock(&m->lock);
}

/* ---- the exposition text ---- */

/* A label value: backslash, double quote and line feed escaped. */
static void put_label(FILE *f, const char *s)
{
	for (; *s; s++) {
		if (*s == '\\')
			fputs("\\\\", f);
		else if (*s == '"')
			fputs("\\\"", f);
		else if (*s == '\n')
			fputs("\\n", f);
		else
			fputc(*s, f);
	}
}

static void put_head(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{pipeline="P"[,extra="V"]} value */
static void put_pipe(FILE *f, const char *name, const char *pipeline, const char *extra,
		     const char *extra_value, uint64_t v)
{
	fprintf(f, "%s{pipeline=\"", name);
	put_label(f, pipeline);
	if (extra) {
		fprintf(f, "\",%s=\"", extra);
		put_label(f, extra_value);
	}
	fprintf(f, "\"} %llu\n", (unsigned long long)v);
}

struct pipe_metric {
	const char *name, *help;
	int counter;
	size_t off; /* of a uint64_t in struct ezp_pipeline_stats */
};

#define PM(n, c, field, h)                                                                         \
	{                                                                                          \
		n, h, c, offsetof(struct ezp_pipeline_stats, field)                                \
	}
static const struct pipe_metric pipe_metrics[] = {
    PM("ezproxy_sessions", 0, sessions, "Live sessions."),
    PM("ezproxy_sessions_total", 1, total_sessions, "Sessions opened since start."),
    PM("ezproxy_injected_total", 1, injected, "Packets injected (API, scripts, embedders)."),
    PM("ezproxy_hold_timeouts_total", 1, hold_timeouts,
       "Held packets that got their default action after the hold timeout."),
    PM("ezproxy_connect_failures_total", 1, connect_failures,
       "Connections to the server that failed."),
    PM("ezproxy_refused_total", 1, refused, "Clients refused (limits, errors)."),
};

static uint64_t pipe_u64(const struct ezp_pipeline_stats *p, size_t off)
{
	uint64_t v;

	memcpy(&v, (const char *)p + off, sizeof(v));
	return v;
}

static void put_pipelines(FILE *f, const struct ezp_pipeline_stats *ps, size_t n)
{
	static const char *const dirs[2] = {"to_server", "to_client"};
	size_t i, k;
	int d;

	for (k = 0; k < sizeof(pipe_metrics) / sizeof(pipe_metrics[0]); k++) {
		put_head(f, pipe_metrics[k].name, pipe_metrics[k].counter ? "counter" : "gauge",
			 pipe_metrics[k].help);
		for (i = 0; i < n; i++)
			put_pipe(f, pipe_metrics[k].name, ps[i].name, NULL, NULL,
				 pipe_u64(&ps[i], pipe_metrics[k].off));
	}
	put_head(f, "ezproxy_bytes_total", "counter", "Bytes forwarded, by direction.");
	for (i = 0; i < n; i++)
		for (d = 0; d < 2; d++)
			put_pipe(f, "ezproxy_bytes_total", ps[i].name, "direction", dirs[d],
				 ps[i].bytes[d == 0 ? EZP_DIR_TO_SERVER : EZP_DIR_TO_CLIENT]);
	put_head(f, "ezproxy_packets_total", "counter", "Packets forwarded, by direction.");
	for (i = 0; i < n; i++)
		for (d = 0; d < 2; d++)
			put_pipe(f, "ezproxy_packets_total", ps[i].name, "direction", dirs[d],
				 ps[i].packets[d == 0 ? EZP_DIR_TO_SERVER : EZP_DIR_TO_CLIENT]);
	put_head(f, "ezproxy_verdicts_total", "counter",
		 "Filter verdicts other than pass: dropped, replaced, held.");
	for (i = 0; i < n; i++) {
		put_pipe(f, "ezproxy_verdicts_total", ps[i].name, "verdict", "dropped",
			 ps[i].dropped);
		put_pipe(f, "ezproxy_verdicts_total", ps[i].name, "verdict", "replaced",
			 ps[i].replaced);
		put_pipe(f, "ezproxy_verdicts_total", ps[i].name, "verdict", "held", ps[i].held);
	}
}

static void put_requests(FILE *f, struct api_metrics *m)
{
	size_t i;

	put_head(f, "ezproxy_api_requests_total", "counter",
		 "API requests answered, by route pattern, method and status.");
	if (!m)
		return;
	pthread_mutex_lock(&m->lock);
	for (i = 0; i < m->n; i++) {
		fputs("ezproxy_api_requests_total{route=\"", f);
		put_label(f, m->e[i].route);
		fprintf(f, "\",method=\"%s\",status=\"%u\"} %llu\n", m->e[i].method, m->e[i].status,
			(unsigned long long)m->e[i].count);
	}
	if (m->overflow)
		fprintf(f,
			"ezproxy_api_requests_total{route=\"other\",method=\"other\","
			"status=\"0\"} %llu\n",
			(unsigned long long)m->overflow);
	pthread_mutex_unlock(&m->lock);
}

/* GET /metrics (CheckStatus) */
static void misc_metrics(struct api_req *r)
{
	struct api *api = r->api;
	struct ezp_status_info st = {.struct_size = sizeof(st)};
	struct ezp_pipeline_stats *ps = NULL;
	size_t n = 0, len = 0;
	char *text = NULL;
	FILE *f;

	api->ctl->status(api->ctx, &st);
	if (api->ctl->pipelines(api->ctx, &ps, &n) != EZP_OK)
		n = 0; /* out of memory: no pipeline samples */
	f = open_memstream(&text, &len);
	if (!f) {
		free(ps);
		api_error(r, 500, "internal", "out of memory");
		return;
	}
	put_head(f, "ezproxy_up", "gauge", "1 while the daemon runs.");
	fputs("ezproxy_up 1\n", f);
	put_head(f, "ezproxy_uptime_seconds", "gauge", "Seconds since the daemon started.");
	fprintf(f, "ezproxy_uptime_seconds %.3f\n",
		st.now_us > st.started_us ? (double)(st.now_us - st.started_us) / 1e6 : 0.0);
	put_pipelines(f, ps, n);
	put_head(f, "ezproxy_tap_drops_total", "counter",
		 "Events taps lost because they fell behind.");
	fprintf(f, "ezproxy_tap_drops_total %llu\n",
		(unsigned long long)api->ctl->tap_drops(api->ctx));
	put_requests(f, api->metrics);
	free(ps);
	if (fclose(f) != 0 || !text) {
		free(text);
		api_error(r, 500, "internal", "out of memory");
		return;
	}
	api_reply_raw(r, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
	free(text);
}

/* GET /api/3/openapi.json (CheckStatus): the embedded spec/openapi.json. */
static void misc_openapi(struct api_req *r)
{
	api_reply_raw(r, 200, "application/json", api_openapi_json, api_openapi_json_len);
}

/* GET / (no key): a placeholder until the web page arrives. */
static void misc_root(struct api_req *r)
{
	static const char page[] =
	    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
	    "<title>EzProxy</title></head>\n<body>\n<h1>EzProxy</h1>\n"
	    "<p>The HTTP API is here. The web page is not part of this build yet.</p>\n"
	    "<ul>\n"
	    "<li><a href=\"/api/3/status\">/api/3/status</a> (send a key: "
	    "<code>Authorization: Bearer KEY</code> or <code>?key=KEY</code>)</li>\n"
	    "<li><a href=\"/api/3/openapi.json\">/api/3/openapi.json</a>: every route "
	    "(OpenAPI 3.0)</li>\n"
	    "<li><a href=\"/metrics\">/metrics</a>: Prometheus text</li>\n"
	    "<li>docs/api.md and docs/api-old.md in the source tree</li>\n"
	    "</ul>\n</body></html>\n";

	api_reply_raw(r, 200, "text/html; charset=utf-8", page, sizeof(page) - 1);
}

const struct api_route api_routes_misc[] = {
    {"GET", "/metrics", EZP_PERM_CHECK_STATUS, 3, misc_metrics},
    {"GET", "/api/3/openapi.json", EZP_PERM_CHECK_STATUS, 3, misc_openapi},
    {"GET", "/", 0, 3, misc_root},
    {NULL, NULL, 0, 0, NULL},
};
