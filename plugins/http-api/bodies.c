/*
 * bodies.c - the v3 API's request-body parsers and the JSON shapes of core
 * structs (sessions, pipelines, status, keys, addresses, permissions);
 * base64 is b64.c's. Pure: jansson and b64.c only, no libmicrohttpd and
 * no core calls, so the fuzz target (tests/fuzz/fuzz_api_body.c) links this
 * file with b64.c alone. Every byte parsed here came from a client.
 *
 * Thread: any.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api.h"
#include "bodies.h"

static const char *const perm_names[] = EZP_PERM_NAMES;
#define N_PERMS (sizeof(perm_names) / sizeof(perm_names[0]))

__attribute__((format(printf, 3, 4))) static int fail(struct body_err *e, const char *field,
						      const char *fmt, ...)
{
	va_list ap;

	snprintf(e->field, sizeof(e->field), "%s", field ? field : "");
	va_start(ap, fmt);
	vsnprintf(e->message, sizeof(e->message), fmt, ap);
	va_end(ap);
	return -1;
}

json_t *body_load_object(const char *buf, size_t len, struct body_err *e, int *not_object)
{
	json_error_t je;
	json_t *v;

	*not_object = 0;
	if (!buf || len == 0) {
		fail(e, NULL, "the request needs a JSON object as its body");
		return NULL;
	}
	v = json_loadb(buf, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
	if (!v) {
		fail(e, NULL, "bad JSON at line %d, column %d: %s", je.line, je.column, je.text);
		return NULL;
	}
	if (!json_is_object(v)) {
		json_decref(v);
		*not_object = 1;
		fail(e, NULL, "the body must be a JSON object");
		return NULL;
	}
	return v;
}

/* Every member of @o is one of @allowed (NULL-terminated). */
static int only_fields(json_t *o, const char *const *allowed, struct body_err *e)
{
	const char *k;
	json_t *v;

	json_object_foreach(o, k, v)
	{
		size_t i;
		char list[200] = "";

		for (i = 0; allowed[i]; i++)
			if (!strcmp(k, allowed[i]))
				break;
		if (allowed[i])
			continue;
		for (i = 0; allowed[i]; i++) {
			size_t n = strlen(list);
			snprintf(list + n, sizeof(list) - n, "%s%s", i ? ", " : "", allowed[i]);
		}
		/* the field name is client text: shown cut short, never trusted */
		return fail(e, k, "unknown field '%.60s' (expected %s)", k, list);
	}
	return 0;
}

static int get_string(json_t *o, const char *key, bool required, size_t max, const char **out,
		      struct body_err *e)
{
	json_t *v = json_object_get(o, key);

	if (!v) {
		if (required)
			return fail(e, key, "%s: required", key);
		*out = NULL;
		return 0;
	}
	if (!json_is_string(v))
		return fail(e, key, "%s: must be a string", key);
	if (json_string_length(v) == 0)
		return fail(e, key, "%s: must not be empty", key);
	if (json_string_length(v) > max)
		return fail(e, key, "%s: longer than %zu bytes", key, max);
	if (strlen(json_string_value(v)) != json_string_length(v))
		return fail(e, key, "%s: contains a NUL character", key);
	*out = json_string_value(v);
	return 0;
}

static int get_bool(json_t *o, const char *key, int *out, struct body_err *e)
{
	json_t *v = json_object_get(o, key);

	if (!v) {
		*out = 0;
		return 0;
	}
	if (!json_is_boolean(v))
		return fail(e, key, "%s: must be true or false", key);
	*out = json_is_true(v);
	return 0;
}

bool body_name_ok(const char *name)
{
	size_t n = name ? strlen(name) : 0;

	if (n == 0 || n > BODY_NAME_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '_' || c == '.' || c == '-'))
			return false;
	}
	return true;
}

/* ---- directions, addresses, permissions ---- */

const char *api_dir_name(int dir)
{
	return dir == EZP_DIR_TO_CLIENT ? "to_client" : dir == EZP_DIR_BOTH ? "both" : "to_server";
}

int api_dir_parse(const char *s)
{
	if (!s)
		return -1;
	if (!strcmp(s, "to_server"))
		return EZP_DIR_TO_SERVER;
	if (!strcmp(s, "to_client"))
		return EZP_DIR_TO_CLIENT;
	if (!strcmp(s, "both"))
		return EZP_DIR_BOTH;
	return -1;
}

json_t *api_addr_json(const struct ezp_addr *a)
{
	char host[INET6_ADDRSTRLEN], buf[EZP_ADDR_STRLEN];

	if (!a || a->len == 0)
		return json_null();
	if (a->ss.ss_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)&a->ss;
		if (!inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host)))
			return json_null();
		snprintf(buf, sizeof(buf), "%s:%u", host, (unsigned)ntohs(in->sin_port));
	} else if (a->ss.ss_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)&a->ss;
		if (!inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host)))
			return json_null();
		snprintf(buf, sizeof(buf), "[%s]:%u", host, (unsigned)ntohs(in6->sin6_port));
	} else {
		return json_null();
	}
	return json_string(buf);
}

int64_t api_perms_parse(json_t *v, char *bad, size_t bad_len)
{
	int64_t perms = 0;
	size_t i;
	json_t *item;

	if (bad && bad_len)
		bad[0] = '\0';
	if (json_is_integer(v)) {
		json_int_t n = json_integer_value(v);
		if (n < 0 || n > (json_int_t)EZP_PERM_ALL) {
			if (bad && bad_len)
				snprintf(bad, bad_len, "%lld", (long long)n);
			return -1;
		}
		return (int64_t)n;
	}
	if (!json_is_array(v)) {
		if (bad && bad_len)
			snprintf(bad, bad_len, "not a number or a list of names");
		return -1;
	}
	json_array_foreach(v, i, item)
	{
		size_t b;
		const char *s = json_string_value(item);

		for (b = 0; s && b < N_PERMS; b++)
			if (!strcmp(s, perm_names[b]))
				break;
		if (!s || b == N_PERMS) {
			if (bad && bad_len)
				snprintf(bad, bad_len, "%.40s", s ? s : "(not a string)");
			return -1;
		}
		perms |= (int64_t)1 << b;
	}
	return perms;
}

json_t *api_perms_json(uint32_t perms)
{
	json_t *a = json_array();

	for (size_t b = 0; a && b < N_PERMS; b++)
		if (perms & (1u << b))
			json_array_append_new(a, json_string(perm_names[b]));
	return a;
}

/* ---- shapes ---- */

json_t *body_time_json(uint64_t us)
{
	char buf[64];
	struct tm tm;
	time_t t = (time_t)(us / 1000000u);

	if (us == 0 || !gmtime_r(&t, &tm))
		return json_null();
	snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03uZ", tm.tm_year + 1900,
		 tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
		 (unsigned)(us % 1000000u / 1000u));
	return json_string(buf);
}

static json_t *u64(uint64_t v)
{
	return json_integer(v > (uint64_t)INT64_MAX ? INT64_MAX : (json_int_t)v);
}

json_t *api_session_json(const struct ezp_session_summary *s)
{
	json_t *o = json_object(), *clients = json_array();
	unsigned n = s->n_clients;

	if (!o || !clients) {
		json_decref(o);
		json_decref(clients);
		return NULL;
	}
	if (n > 8)
		n = 8;
	for (unsigned i = 0; i < n; i++)
		json_array_append_new(
		    clients,
		    api_addr_json(i == 0 && s->clients[0].len == 0 ? &s->client : &s->clients[i]));
	json_object_set_new(o, "id", u64(s->id));
	json_object_set_new(o, "pipeline", json_string(s->pipeline));
	json_object_set_new(o, "transport", json_string(s->transport));
	json_object_set_new(o, "client", api_addr_json(&s->client));
	json_object_set_new(o, "clients", clients);
	json_object_set_new(o, "server", api_addr_json(&s->server));
	json_object_set_new(o, "opened_at", body_time_json(s->opened_us));
	json_object_set_new(o, "last_activity", body_time_json(s->last_activity_us));
	json_object_set_new(o, "bytes_to_server", u64(s->bytes[EZP_DIR_TO_SERVER]));
	json_object_set_new(o, "bytes_to_client", u64(s->bytes[EZP_DIR_TO_CLIENT]));
	json_object_set_new(o, "packets_to_server", u64(s->packets[EZP_DIR_TO_SERVER]));
	json_object_set_new(o, "packets_to_client", u64(s->packets[EZP_DIR_TO_CLIENT]));
	json_object_set_new(o, "dropped", u64(s->dropped));
	json_object_set_new(o, "replaced", u64(s->replaced));
	json_object_set_new(o, "injected", u64(s->injected));
	json_object_set_new(o, "bridged", json_boolean(s->bridged));
	json_object_set_new(o, "state", json_string(s->closing ? "closing" : "open"));
	return o;
}

json_t *body_status_json(const struct ezp_status_info *st)
{
	uint64_t up = st->now_us > st->started_us ? st->now_us - st->started_us : 0;

	return json_pack("{s:s, s:o, s:o, s:i, s:o, s:o, s:o, s:o, s:o, s:s}", "version",
			 st->version ? st->version : "", "started_at",
			 body_time_json(st->started_us), "uptime_ms", u64(up / 1000u), "workers",
			 (int)st->workers, "pipelines", u64(st->pipelines), "sessions",
			 u64(st->sessions), "total_sessions", u64(st->total_sessions),
			 "bytes_to_server", u64(st->bytes[EZP_DIR_TO_SERVER]), "bytes_to_client",
			 u64(st->bytes[EZP_DIR_TO_CLIENT]), "config_file",
			 st->config_file ? st->config_file : "<builtin>");
}

json_t *body_pipeline_json(const struct ezp_pipeline_stats *p)
{
	json_t *o = json_object();

	if (!o)
		return NULL;
	json_object_set_new(o, "name", json_string(p->name));
	json_object_set_new(o, "from_kind", json_string(p->from_kind));
	json_object_set_new(o, "to_kind", json_string(p->to_kind));
	json_object_set_new(o, "listening", json_boolean(p->listening));
	json_object_set_new(o, "listen_address", api_addr_json(&p->bound));
	json_object_set_new(o, "to_address", api_addr_json(&p->to_addr));
	json_object_set_new(o, "shared", json_boolean(p->shared));
	json_object_set_new(o, "filters", json_integer(p->n_filters));
	json_object_set_new(o, "sessions", u64(p->sessions));
	json_object_set_new(o, "total_sessions", u64(p->total_sessions));
	json_object_set_new(o, "bytes_to_server", u64(p->bytes[EZP_DIR_TO_SERVER]));
	json_object_set_new(o, "bytes_to_client", u64(p->bytes[EZP_DIR_TO_CLIENT]));
	json_object_set_new(o, "packets_to_server", u64(p->packets[EZP_DIR_TO_SERVER]));
	json_object_set_new(o, "packets_to_client", u64(p->packets[EZP_DIR_TO_CLIENT]));
	json_object_set_new(o, "dropped", u64(p->dropped));
	json_object_set_new(o, "replaced", u64(p->replaced));
	json_object_set_new(o, "injected", u64(p->injected));
	json_object_set_new(o, "held", u64(p->held));
	json_object_set_new(o, "hold_timeouts", u64(p->hold_timeouts));
	json_object_set_new(o, "connect_failures", u64(p->connect_failures));
	json_object_set_new(o, "refused", u64(p->refused));
	return o;
}

json_t *body_key_json(const struct ezp_key_info *k)
{
	return json_pack("{s:s, s:s, s:i, s:o, s:o, s:o}", "id", k->id, "name", k->name, "perms",
			 (int)k->perms, "perm_names", api_perms_json(k->perms), "created_at",
			 body_time_json(k->created_us), "created_by",
			 k->created_by[0] ? json_string(k->created_by) : json_null());
}

/* ---- request bodies ---- */

int body_inject_parse(json_t *o, struct body_inject *out, struct body_err *e)
{
	static const char *const fields[] = {"direction", "data", NULL};
	const char *dir_s, *data_s;
	json_t *d;
	int dir;
	size_t len;
	unsigned char *data;

	if (only_fields(o, fields, e) || get_string(o, "direction", true, 32, &dir_s, e))
		return -1;
	dir = api_dir_parse(dir_s);
	if (dir < 0)
		return fail(e, "direction", "direction: must be to_client, to_server or both");
	d = json_object_get(o, "data");
	if (!d)
		return fail(e, "data", "data: required (the bytes, base64)");
	if (!json_is_string(d))
		return fail(e, "data", "data: must be a base64 string");
	data_s = json_string_value(d);
	if (json_string_length(d) == 0)
		return fail(e, "data", "data: must not be empty");
	if (strlen(data_s) != json_string_length(d))
		return fail(e, "data", "data: is not valid base64");
	data = api_b64_decode(data_s, &len);
	if (!data)
		return fail(e, "data", "data: is not valid base64");
	if (len == 0) {
		free(data);
		return fail(e, "data", "data: must not be empty");
	}
	out->dir = dir;
	out->data = data;
	out->len = len;
	return 0;
}

int body_server_parse(json_t *o, const char **address, struct body_err *e)
{
	static const char *const fields[] = {"address", NULL};

	if (only_fields(o, fields, e) || get_string(o, "address", true, BODY_ADDR_MAX, address, e))
		return -1;
	return 0;
}

int body_client_parse(json_t *o, struct body_client *out, struct body_err *e)
{
	static const char *const fields[] = {"address", "mode", "timeout_ms", NULL};
	const char *addr, *mode;
	json_t *t;
	unsigned timeout = BODY_TIMEOUT_DEFAULT_MS;

	if (only_fields(o, fields, e) || get_string(o, "address", true, BODY_ADDR_MAX, &addr, e) ||
	    get_string(o, "mode", false, 16, &mode, e))
		return -1;
	if (mode && strcmp(mode, "dial") && strcmp(mode, "accept"))
		return fail(e, "mode", "mode: must be dial or accept");
	t = json_object_get(o, "timeout_ms");
	if (t) {
		if (!json_is_integer(t) || json_integer_value(t) < 1 ||
		    json_integer_value(t) > (json_int_t)BODY_TIMEOUT_MAX_MS)
			return fail(e, "timeout_ms",
				    "timeout_ms: must be a whole number from 1 to %u",
				    BODY_TIMEOUT_MAX_MS);
		timeout = (unsigned)json_integer_value(t);
	}
	out->address = addr;
	out->dial = !mode || !strcmp(mode, "dial");
	out->timeout_ms = timeout;
	return 0;
}

int body_restart_parse(json_t *o, int *close_sessions, struct body_err *e)
{
	static const char *const fields[] = {"close_sessions", NULL};

	return only_fields(o, fields, e) || get_bool(o, "close_sessions", close_sessions, e) ? -1
											     : 0;
}

/* {"kind": {params} } with one member; @what names it in messages. */
static int check_endpoint(json_t *v, const char *field, const char *what, struct body_err *e)
{
	const char *kind;
	json_t *params;

	if (!json_is_object(v) || json_object_size(v) != 1)
		return fail(e, field,
			    "%s: must be an object with one member, the kind: {\"tcp\": {...}}",
			    what);
	json_object_foreach(v, kind, params)
	{
		if (!kind[0] || strlen(kind) > 31)
			return fail(e, field, "%s: the kind name must be 1 to 31 characters", what);
		if (!json_is_object(params) && !json_is_null(params))
			return fail(e, field, "%s: the parameters of '%.31s' must be an object",
				    what, kind);
	}
	return 0;
}

/* from / to / through / shared / limits, whichever are present. */
static int check_config_fields(json_t *o, struct body_err *e)
{
	json_t *v;
	size_t i;

	if ((v = json_object_get(o, "from")) && check_endpoint(v, "from", "from", e))
		return -1;
	if ((v = json_object_get(o, "to")) && check_endpoint(v, "to", "to", e))
		return -1;
	if ((v = json_object_get(o, "through"))) {
		json_t *item;
		if (!json_is_array(v))
			return fail(e, "through", "through: must be a list of filters");
		json_array_foreach(v, i, item)
		{
			char what[32];
			snprintf(what, sizeof(what), "through[%zu]", i);
			if (check_endpoint(item, "through", what, e))
				return -1;
		}
	}
	if ((v = json_object_get(o, "shared")) && !json_is_boolean(v))
		return fail(e, "shared", "shared: must be true or false");
	if ((v = json_object_get(o, "limits")) && !json_is_object(v))
		return fail(e, "limits", "limits: must be an object");
	return 0;
}

int body_pipeline_create_parse(json_t *o, const char **name, struct body_err *e)
{
	static const char *const fields[] = {"name",   "from",	 "to", "through",
					     "shared", "limits", NULL};
	const char *n;

	if (only_fields(o, fields, e) || get_string(o, "name", true, BODY_NAME_MAX, &n, e))
		return -1;
	if (!body_name_ok(n))
		return fail(e, "name", "name: use 1 to %d letters, digits, '_', '.' or '-'",
			    BODY_NAME_MAX);
	if (!json_object_get(o, "from"))
		return fail(e, "from",
			    "from: required, e.g. {\"tcp\": {\"listen\": \"127.0.0.1:0\"}}");
	if (!json_object_get(o, "to"))
		return fail(e, "to",
			    "to: required, e.g. {\"tcp\": {\"connect\": \"127.0.0.1:9\"}}");
	if (check_config_fields(o, e))
		return -1;
	*name = n;
	return 0;
}

int body_pipeline_patch_parse(json_t *o, const char *name, struct body_patch *out,
			      struct body_err *e)
{
	static const char *const fields[] = {
	    "name",	      "from", "to", "through", "shared", "limits", "apply_to_existing",
	    "close_sessions", NULL};
	json_t *v;
	int apply = 0, close_s = 0;
	bool has_config = false;

	if (only_fields(o, fields, e))
		return -1;
	v = json_object_get(o, "name");
	if (v && (!json_is_string(v) || strcmp(json_string_value(v), name ? name : "")))
		return fail(e, "name", "name: a pipeline cannot be renamed (delete and create it)");
	if (check_config_fields(o, e) || get_bool(o, "apply_to_existing", &apply, e) ||
	    get_bool(o, "close_sessions", &close_s, e))
		return -1;
	has_config = json_object_get(o, "from") || json_object_get(o, "through") ||
		     json_object_get(o, "shared") || json_object_get(o, "limits");
	if (apply && !json_object_get(o, "to"))
		return fail(e, "apply_to_existing", "apply_to_existing: needs a new 'to'");
	if (!has_config && !json_object_get(o, "to"))
		return fail(e, NULL,
			    "nothing to change: give one of from, to, through, shared, limits");
	out->has_config = has_config;
	out->to = json_object_get(o, "to");
	out->apply_to_existing = apply;
	out->close_sessions = close_s;
	return 0;
}

int body_config_parse(json_t *o, const char **yaml, json_t **config, struct body_err *e)
{
	static const char *const fields[] = {"yaml", "config", NULL};
	json_t *y, *c;

	if (only_fields(o, fields, e))
		return -1;
	y = json_object_get(o, "yaml");
	c = json_object_get(o, "config");
	if ((y && c) || (!y && !c))
		return fail(e, y ? "config" : "yaml",
			    "give the new config as one of \"yaml\" (text) or \"config\" (object)");
	if (y && (!json_is_string(y) || strlen(json_string_value(y)) != json_string_length(y)))
		return fail(e, "yaml", "yaml: must be a string (the config file's text)");
	if (c && !json_is_object(c))
		return fail(e, "config", "config: must be an object");
	*yaml = y ? json_string_value(y) : NULL;
	*config = c;
	return 0;
}

int body_key_parse(json_t *o, uint32_t *perms, const char **name, struct body_err *e)
{
	static const char *const fields[] = {"perms", "name", NULL};
	json_t *p;
	char bad[64];
	int64_t bits;
	const char *n;

	if (only_fields(o, fields, e) || get_string(o, "name", false, BODY_KEY_NAME_MAX, &n, e))
		return -1;
	p = json_object_get(o, "perms");
	if (!p)
		return fail(e, "perms", "perms: required (a number or a list of names)");
	bits = api_perms_parse(p, bad, sizeof(bad));
	if (bits < 0)
		return fail(e, "perms",
			    "perms: '%s' is not a permission (a number 0..%u or a list of: "
			    "CheckStatus, Close, UseWebsocket, Filter, Inject, MakeKeys, "
			    "DuplicateKeys, Reconfigure, Capture)",
			    bad, EZP_PERM_ALL);
	*perms = (uint32_t)bits;
	*name = n ? n : "";
	return 0;
}
