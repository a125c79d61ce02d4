/*
 * ws_msg.c - pure parsers of WebSocket client messages: v3 {type: verdict |
 * inject | close, ...} and the old v2 {Type, Target, Data, Extra}. Untrusted
 * bytes in, plain structs or an error naming the field out. Depends on
 * jansson and b64.c only (no MHD, no core), so tests/fuzz/fuzz_ws.c links
 * the two alone. Thread: any (no shared state).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define WS_MSG_ONLY
#include "ws.h"

#define PIPELINE_NAME_MAX 71

/* ---- v3 ---- */

static int refuse(struct ws_msg_err *err, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int refuse(struct ws_msg_err *err, const char *code, const char *fmt, ...)
{
	va_list ap;

	snprintf(err->code, sizeof(err->code), "%s", code);
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return -1;
}

/* Decode @key (a base64 string) into @data, @len. @what names the message type. */
static int get_data(json_t *o, const char *key, const char *what, unsigned char **data, size_t *len,
		    struct ws_msg_err *err)
{
	json_t *v = json_object_get(o, key);

	if (!v)
		return refuse(err, "missing_field", "%s needs `%s` (base64)", what, key);
	if (!json_is_string(v))
		return refuse(err, "bad_field", "`%s` must be a base64 string", key);
	*data = api_b64_decode_n(json_string_value(v), json_string_length(v), len);
	if (!*data)
		return refuse(err, "bad_field", "`%s` is not valid base64", key);
	return 0;
}

/* `session`: a positive integer or "all". */
static int get_session(json_t *o, const char *what, struct ws3_msg *m, struct ws_msg_err *err)
{
	json_t *v = json_object_get(o, "session");

	if (!v)
		return refuse(err, "missing_field", "%s needs `session` (an id or \"all\")", what);
	if (json_is_string(v) && !strcmp(json_string_value(v), "all")) {
		m->all = true;
		return 0;
	}
	if (!json_is_integer(v) || json_integer_value(v) < 1)
		return refuse(err, "bad_field", "`session` must be a session id or \"all\"");
	m->session = (uint64_t)json_integer_value(v);
	return 0;
}

static int get_pipeline(json_t *o, struct ws3_msg *m, struct ws_msg_err *err)
{
	json_t *v = json_object_get(o, "pipeline");

	if (!v || json_is_null(v))
		return 0;
	if (!json_is_string(v) || !json_string_length(v) ||
	    json_string_length(v) > PIPELINE_NAME_MAX ||
	    strlen(json_string_value(v)) != json_string_length(v))
		return refuse(err, "bad_field", "`pipeline` must be a pipeline name");
	m->pipeline = strdup(json_string_value(v));
	if (!m->pipeline)
		return refuse(err, "internal", "out of memory");
	return 0;
}

static int parse_verdict(json_t *o, struct ws3_msg *m, struct ws_msg_err *err)
{
	json_t *seq = json_object_get(o, "seq");
	json_t *act = json_object_get(o, "action");
	const char *a;

	if (!seq)
		return refuse(err, "missing_field", "verdict needs `seq`");
	if (!json_is_integer(seq) || json_integer_value(seq) < 0)
		return refuse(err, "bad_field", "`seq` must be a packet's seq");
	m->seq = (uint64_t)json_integer_value(seq);
	json_decref(m->ref);
	m->ref = json_incref(seq); /* a verdict's errors refer to its seq */
	if (!act)
		return refuse(err, "missing_field",
			      "verdict needs `action` (pass, drop or replace)");
	a = json_is_string(act) ? json_string_value(act) : "";
	if (!strcmp(a, "pass"))
		m->action = WS3_PASS;
	else if (!strcmp(a, "drop"))
		m->action = WS3_DROP;
	else if (!strcmp(a, "replace"))
		m->action = WS3_REPLACE;
	else
		return refuse(err, "bad_field", "`action` must be pass, drop or replace");
	if (m->action == WS3_REPLACE)
		return get_data(o, "data", "a replace verdict", &m->data, &m->len, err);
	return 0;
}

static int parse_inject(json_t *o, struct ws3_msg *m, struct ws_msg_err *err)
{
	json_t *d = json_object_get(o, "direction");
	const char *s;

	if (get_session(o, "inject", m, err) || get_pipeline(o, m, err))
		return -1;
	if (!d)
		return refuse(err, "missing_field",
			      "inject needs `direction` (to_server, to_client or both)");
	s = json_is_string(d) ? json_string_value(d) : "";
	if (!strcmp(s, "to_server"))
		m->dir = WS3_DIR_TO_SERVER;
	else if (!strcmp(s, "to_client"))
		m->dir = WS3_DIR_TO_CLIENT;
	else if (!strcmp(s, "both"))
		m->dir = WS3_DIR_BOTH;
	else
		return refuse(err, "bad_field", "`direction` must be to_server, to_client or both");
	if (get_data(o, "data", "inject", &m->data, &m->len, err))
		return -1;
	if (!m->len)
		return refuse(err, "bad_field", "`data` is empty: nothing to inject");
	return 0;
}

int ws3_msg_parse(const char *text, size_t len, struct ws3_msg *out, struct ws_msg_err *err)
{
	struct ws3_msg m = {0};
	json_error_t jerr;
	json_t *o = NULL, *t, *id;
	const char *type;

	memset(err, 0, sizeof(*err));
	o = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!o) {
		refuse(err, "bad_json", "bad JSON at line %d, column %d: %s", jerr.line,
		       jerr.column, jerr.text);
		goto fail;
	}
	if (!json_is_object(o)) {
		refuse(err, "bad_message", "a message is a JSON object with a `type`");
		goto fail;
	}
	id = json_object_get(o, "id");
	if (id && (json_is_string(id) || json_is_integer(id)))
		m.ref = json_incref(id);
	t = json_object_get(o, "type");
	if (!t) {
		refuse(err, "missing_field", "a message needs `type` (verdict, inject or close)");
		goto fail;
	}
	type = json_is_string(t) ? json_string_value(t) : NULL;
	if (!type) {
		refuse(err, "bad_field", "`type` must be a string");
		goto fail;
	}
	if (!strcmp(type, "verdict")) {
		m.type = WS3_VERDICT;
		if (parse_verdict(o, &m, err))
			goto fail;
	} else if (!strcmp(type, "inject")) {
		m.type = WS3_INJECT;
		if (parse_inject(o, &m, err))
			goto fail;
	} else if (!strcmp(type, "close")) {
		m.type = WS3_CLOSE;
		if (get_session(o, "close", &m, err) || get_pipeline(o, &m, err))
			goto fail;
	} else {
		refuse(err, "unknown_type",
		       "unknown message type `%.40s` (verdict, inject or close)", type);
		goto fail;
	}
	json_decref(o);
	*out = m;
	return 0;
fail:
	err->ref = m.ref;
	m.ref = NULL;
	ws3_msg_clear(&m);
	json_decref(o);
	return -1;
}

void ws3_msg_clear(struct ws3_msg *m)
{
	free(m->data);
	free(m->pipeline);
	json_decref(m->ref);
	memset(m, 0, sizeof(*m));
}

/* ---- v2: the old program decoded with Go's encoding/json into
 * struct {Type int; Target int; Data []byte; Extra uint64}: field names match
 * case-insensitively, unknown fields are ignored, null leaves a field zero,
 * a value of the wrong type is an error, []byte is standard base64. ---- */

#define V2_BAD "Bad JSON data"

static int v2_int(json_t *v, int64_t *out)
{
	if (json_is_null(v))
		return 0;
	if (!json_is_integer(v))
		return -1;
	*out = json_integer_value(v);
	return 0;
}

int ws2_msg_parse(const char *text, size_t len, struct ws2_msg *out, char *msg, size_t msg_len)
{
	struct ws2_msg m = {0};
	json_error_t jerr;
	json_t *o, *v;
	const char *key;

	o = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
	if (!o || !(json_is_object(o) || json_is_null(o)))
		goto fail;
	json_object_foreach(o, key, v)
	{
		int64_t extra = 0;
		if (!strcasecmp(key, "Type")) {
			if (v2_int(v, &m.type))
				goto fail;
		} else if (!strcasecmp(key, "Target")) {
			if (v2_int(v, &m.target))
				goto fail;
		} else if (!strcasecmp(key, "Extra")) {
			if (v2_int(v, &extra) || extra < 0)
				goto fail;
			m.extra = (uint64_t)extra;
		} else if (!strcasecmp(key, "Data")) {
			free(m.data);
			m.data = NULL;
			m.len = 0;
			if (json_is_null(v))
				continue;
			if (!json_is_string(v))
				goto fail;
			m.data =
			    api_b64_decode_n(json_string_value(v), json_string_length(v), &m.len);
			if (!m.data)
				goto fail;
		}
	}
	json_decref(o);
	*out = m;
	return 0;
fail:
	snprintf(msg, msg_len, "%s", V2_BAD);
	free(m.data);
	json_decref(o);
	return -1;
}

void ws2_msg_clear(struct ws2_msg *m)
{
	free(m->data);
	memset(m, 0, sizeof(*m));
}
