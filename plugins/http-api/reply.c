/*
 * reply.c - the http-api plugin's answers: JSON, raw and empty replies,
 * the v3 error envelope {"error": {"code", "message", "field"}} and the
 * old API's {"Status", "Data"}, and the mapping of a failed core call
 * (enum ezp_status and its message) to an HTTP status and error code.
 *
 * Thread: any (a reply only touches its own struct api_req; the work of
 * api_run_blocking() answers from a thread of its own).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "bodies.h"

static void reply_set(struct api_req *r, unsigned status, struct MHD_Response *resp)
{
	if (!resp) {
		/* out of memory: a fixed answer */
		static const char oom[] =
		    "{\"error\":{\"code\":\"internal\",\"message\":\"out of memory\"}}";
		resp = MHD_create_response_from_buffer(sizeof(oom) - 1, (void *)oom,
						       MHD_RESPMEM_PERSISTENT);
		status = MHD_HTTP_INTERNAL_SERVER_ERROR;
		if (!resp)
			return;
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	if (r->resp)
		MHD_destroy_response(r->resp);
	r->resp = resp;
	r->status = status;
}

void api_reply_raw(struct api_req *r, unsigned status, const char *content_type, const void *data,
		   size_t len)
{
	struct MHD_Response *resp =
	    MHD_create_response_from_buffer(len, (void *)data, MHD_RESPMEM_MUST_COPY);

	if (resp && content_type)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
	reply_set(r, status, resp);
}

void api_reply_json(struct api_req *r, unsigned status, json_t *body)
{
	char *text =
	    body ? json_dumps(body, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY |
				 JSON_REAL_PRECISION(15)) : NULL;
	struct MHD_Response *resp = NULL;
	size_t n;

	json_decref(body);
	if (text) {
		n = strlen(text);
		char *t = realloc(text, n + 2);
		if (t) {
			text = t;
			text[n++] = '\n';
			text[n] = '\0';
		}
		resp = MHD_create_response_from_buffer(n, text, MHD_RESPMEM_MUST_FREE);
		if (!resp)
			free(text);
		else
			MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
						"application/json");
	}
	reply_set(r, status, resp);
}

void api_reply_old(struct api_req *r, unsigned status, json_t *data)
{
	api_reply_json(
	    r, status,
	    json_pack("{s:i, s:o}", "Status", (int)status, "Data", data ? data : json_null()));
}

void api_reply_empty(struct api_req *r)
{
	reply_set(r, MHD_HTTP_NO_CONTENT,
		  MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT));
}

static void reply_verror(struct api_req *r, unsigned status, const char *code, const char *field,
			 json_t *extra, const char *fmt, va_list ap)
{
	char msg[768];
	json_t *e;

	vsnprintf(msg, sizeof(msg), fmt, ap);
	if (r->version == 1 || r->version == 2) {
		json_decref(extra);
		api_reply_old(r, status, json_string(msg));
		return;
	}
	e = json_pack("{s:s, s:s}", "code", code, "message", msg);
	if (e && field && field[0])
		json_object_set_new(e, "field", json_string(field));
	if (e && extra)
		json_object_update(e, extra);
	json_decref(extra);
	api_reply_json(r, status, e ? json_pack("{s:o}", "error", e) : NULL);
}

void api_error(struct api_req *r, unsigned status, const char *code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	reply_verror(r, status, code, NULL, NULL, fmt, ap);
	va_end(ap);
}

void api_error_field(struct api_req *r, unsigned status, const char *code, const char *field,
		     const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	reply_verror(r, status, code, field, NULL, fmt, ap);
	va_end(ap);
}

void api_error_body(struct api_req *r, const struct body_err *e)
{
	api_error_field(r, MHD_HTTP_BAD_REQUEST, "bad_request", e->field, "%s", e->message);
}

/* The config key an error message names: "unknown key 'Frm'" or "A.B.Listen: ...". */
static void reply_err_field(const char *msg, char *out, size_t len)
{
	const char *p = strstr(msg, "key '"), *end;
	char key[64];
	size_t n, j = 0;

	out[0] = '\0';
	if (p) {
		p += 5;
		end = strchr(p, '\'');
	} else {
		end = strstr(msg, ": ");
		if (!end || memchr(msg, ' ', (size_t)(end - msg)))
			return;
		p = end;
		while (p > msg && p[-1] != '.')
			p--;
	}
	if (!end || end <= p || (size_t)(end - p) >= sizeof(key))
		return;
	n = (size_t)(end - p);
	memcpy(key, p, n);
	key[n] = '\0';
	/* PascalCase -> snake_case, as the JSON bodies spell it */
	for (size_t i = 0; i < n && j + 2 < len; i++) {
		char c = key[i];
		if (c >= 'A' && c <= 'Z') {
			if (i)
				out[j++] = '_';
			c = (char)(c - 'A' + 'a');
		}
		if (c == '[')
			break;
		out[j++] = c;
	}
	out[j] = '\0';
}

static void reply_error_extra(struct api_req *r, unsigned status, const char *code,
			      const char *field, json_t *extra, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	reply_verror(r, status, code, field, extra, fmt, ap);
	va_end(ap);
}

/* enum ezp_status -> HTTP status and error code (NULL: "<what>_not_found"). */
static const struct {
	int status;
	unsigned http;
	const char *code;
} reply_codes[] = {
    {EZP_ERR_NOT_FOUND, MHD_HTTP_NOT_FOUND, NULL},
    {EZP_ERR_CLOSED, MHD_HTTP_NOT_FOUND, NULL},
    {EZP_ERR_INVAL, MHD_HTTP_BAD_REQUEST, "bad_request"},
    {EZP_ERR_CONFIG, MHD_HTTP_BAD_REQUEST, "config_invalid"},
    {EZP_ERR_EXISTS, MHD_HTTP_CONFLICT, "conflict"},
    {EZP_ERR_BUSY, MHD_HTTP_CONFLICT, "filter_busy"},
    {EZP_ERR_PERM, MHD_HTTP_FORBIDDEN, "forbidden"},
    {EZP_ERR_UNSUPPORTED, MHD_HTTP_BAD_REQUEST, "unsupported"},
    {EZP_ERR_TIMEOUT, MHD_HTTP_GATEWAY_TIMEOUT, "timeout"},
    {EZP_ERR_LIMIT, MHD_HTTP_TOO_MANY_REQUESTS, "limit"},
    {EZP_ERR_IO, MHD_HTTP_BAD_GATEWAY, "io_error"},
};

void api_error_from(struct api_req *r, const struct ezp_error *err, const char *what)
{
	char code[64], field[64] = "";
	const char *c = "internal", *file;
	const char *msg = err && err->message[0] ? err->message : "failed";
	unsigned status = MHD_HTTP_INTERNAL_SERVER_ERROR;
	int ec = err ? err->code : EZP_ERR;
	json_t *extra = NULL;

	for (size_t i = 0; i < sizeof(reply_codes) / sizeof(reply_codes[0]); i++) {
		if (reply_codes[i].status != ec)
			continue;
		status = reply_codes[i].http;
		c = reply_codes[i].code;
		if (!c) {
			snprintf(code, sizeof(code), "%s_not_found",
				 what && what[0] ? what : "resource");
			c = code;
		}
	}
	/* a limit on size (an inject larger than MaxInjectBytes) is 413, others 429 */
	if (ec == EZP_ERR_LIMIT && (strstr(msg, "large") || strstr(msg, "bytes")))
		status = MHD_HTTP_CONTENT_TOO_LARGE;
	if (ec == EZP_ERR_INVAL || ec == EZP_ERR_CONFIG) {
		reply_err_field(msg, field, sizeof(field));
		if (err->line > 0) {
			file = err->file[0] ? err->file : "<request>";
			extra = json_pack("{s:s, s:i, s:i}", "file", file, "line", err->line,
					  "column", err->column);
			reply_error_extra(r, status, c, field, extra, "%s (at %s:%d:%d)", msg, file,
					  err->line, err->column);
			return;
		}
	}
	reply_error_extra(r, status, c, field, NULL, "%s", msg);
}
