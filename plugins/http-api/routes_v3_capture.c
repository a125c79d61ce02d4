/*
 * routes_v3_capture.c - GET /api/3/capture?pipeline=NAME&session=ID: a live
 * pcapng stream (application/x-pcapng, chunked) from the capture plugin's
 * "ezp.capture" interface, read with `curl -sN ... | wireshark -k -i -`.
 *
 * The capture plugin hands whole pcapng blocks to cap_write on the service
 * loop; they wait in a bounded buffer until libmicrohttpd asks for bytes
 * (cap_read). A block that does not fit (the client reads too slowly) is
 * dropped whole and counted, so the stream never waits and never blocks a
 * worker or the service loop. With nothing to send the connection is
 * suspended and resumed by the next block. The stream ends when the client
 * goes away (libmicrohttpd frees the response: cap_free), when a stream of
 * one session sees it close, or when the API stops.
 *
 * Thread: the service loop.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"

#define CAPH_SRC "http-api"
#define CAPH_BUF_MAX (4u << 20) /* bytes waiting for a slow client before blocks are dropped */
#define CAPH_BLOCK 65536	/* libmicrohttpd's read size */

struct api_capture {
	struct api_capture *next; /* api->captures */
	struct api *api;
	struct MHD_Connection *conn;
	struct ezp_capture_stream *st; /* NULL once the stream ended */
	uint8_t *buf;
	size_t off, len, cap; /* bytes buf[off, off + len) wait to be sent */
	bool suspended, ended;
	uint64_t dropped_blocks, dropped_bytes, sent;
	char what[120]; /* "pipeline 'x' session 3", for the log */
};

static void cap_resume(struct api_capture *c)
{
	if (c->suspended) {
		c->suspended = false;
		MHD_resume_connection(c->conn);
		api_wake(c->api);
	}
}

/* Blocks from the capture plugin (ezp_capture_write_fn). */
static int cap_write(void *userdata, const void *data, size_t len)
{
	struct api_capture *c = userdata;

	if (len == 0) { /* the stream ended by itself */
		c->st = NULL;
		c->ended = true;
		cap_resume(c);
		return 0;
	}
	if (c->len + len > CAPH_BUF_MAX) {
		c->dropped_blocks++;
		c->dropped_bytes += len;
		return 0;
	}
	if (c->off + c->len + len > c->cap) {
		if (c->off) { /* move what waits to the front */
			memmove(c->buf, c->buf + c->off, c->len);
			c->off = 0;
		}
		if (c->len + len > c->cap) {
			size_t cap = c->cap ? c->cap : 65536;
			uint8_t *b;
			while (cap < c->len + len)
				cap *= 2;
			b = realloc(c->buf, cap);
			if (!b) {
				c->dropped_blocks++;
				c->dropped_bytes += len;
				return 0;
			}
			c->buf = b;
			c->cap = cap;
		}
	}
	memcpy(c->buf + c->off + c->len, data, len);
	c->len += len;
	cap_resume(c);
	return 0;
}

static ssize_t cap_read(void *cls, uint64_t pos, char *buf, size_t max)
{
	struct api_capture *c = cls;
	size_t n;

	(void)pos;
	if (c->len == 0) {
		if (c->ended || c->api->stopping)
			return MHD_CONTENT_READER_END_OF_STREAM;
		c->suspended = true;
		MHD_suspend_connection(c->conn);
		return 0;
	}
	n = c->len < max ? c->len : max;
	memcpy(buf, c->buf + c->off, n);
	c->off += n;
	c->len -= n;
	c->sent += n;
	if (c->len == 0)
		c->off = 0;
	return (ssize_t)n;
}

static void cap_unlist(struct api_capture *c)
{
	struct api_capture **pp;

	for (pp = &c->api->captures; *pp && *pp != c; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = c->next;
}

/* libmicrohttpd is done with the response: the client went away or the stream ended. */
static void cap_free(void *cls)
{
	struct api_capture *c = cls;
	const struct ezp_core *core = c->api->core;

	if (c->st)
		c->api->capture->stream_close(c->st);
	c->st = NULL;
	cap_unlist(c);
	if (c->dropped_blocks)
		core->log(EZP_LOG_WARN, CAPH_SRC,
			  "live capture of %s: %llu pcapng block(s) (%llu bytes) dropped because "
			  "the client read too slowly",
			  c->what, (unsigned long long)c->dropped_blocks,
			  (unsigned long long)c->dropped_bytes);
	if (core->log_enabled(EZP_LOG_DEBUG))
		core->log(EZP_LOG_DEBUG, CAPH_SRC, "live capture of %s ended after %llu bytes",
			  c->what, (unsigned long long)c->sent);
	free(c->buf);
	free(c);
}

static void cap_free_unqueued(struct api_capture *c)
{
	if (c->st)
		c->api->capture->stream_close(c->st);
	free(c->buf);
	free(c);
}

void api_v3_capture(struct api_req *r)
{
	struct api *api = r->api;
	const char *pipeline = api_query(r, "pipeline"), *session = api_query(r, "session");
	struct ezp_error err = {0};
	struct api_capture *c;
	struct MHD_Response *resp;
	uint64_t id = 0;
	int rc;

	if (!api->capture) {
		api_error(r, MHD_HTTP_NOT_IMPLEMENTED, "not_available",
			  "the capture plugin is not loaded");
		return;
	}
	if (pipeline && !*pipeline)
		pipeline = NULL;
	if (session && *session) {
		char *end;
		unsigned long long v = strtoull(session, &end, 10);
		if (*end || session[0] == '-' || session[0] == '+' || v == 0) {
			api_error_field(
			    r, MHD_HTTP_BAD_REQUEST, "bad_request", "session",
			    "session must be a session id (a positive integer), not '%s'", session);
			return;
		}
		id = v;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
		return;
	}
	c->api = api;
	c->conn = r->conn;
	if (id)
		snprintf(c->what, sizeof(c->what), "session %llu", (unsigned long long)id);
	else
		snprintf(c->what, sizeof(c->what), "%s%.72s%s", pipeline ? "pipeline '" : "",
			 pipeline ? pipeline : "every pipeline", pipeline ? "'" : "");
	rc = api->capture->stream_open(api->capture->capture, pipeline, id, cap_write, c, &c->st,
				       &err);
	if (rc != EZP_OK) {
		c->st = NULL;
		cap_free_unqueued(c);
		api_error_from(r, &err,
			       strstr(err.message, "pipeline") && !id ? "pipeline" : "session");
		return;
	}
	resp =
	    MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, CAPH_BLOCK, cap_read, c, cap_free);
	if (!resp) {
		cap_free_unqueued(c);
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "out of memory");
		return;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/x-pcapng");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
	MHD_add_response_header(resp, "Content-Disposition",
				"inline; filename=\"ezproxy-capture.pcapng\"");
	c->next = api->captures;
	api->captures = c;
	if (r->resp)
		MHD_destroy_response(r->resp);
	r->resp = resp;
	r->status = MHD_HTTP_OK;
	if (api->core->log_enabled(EZP_LOG_DEBUG))
		api->core->log(EZP_LOG_DEBUG, CAPH_SRC, "live capture of %s started", c->what);
}

void api_capture_close_all(struct api *api)
{
	for (struct api_capture *c = api->captures; c; c = c->next) {
		if (c->st)
			api->capture->stream_close(c->st);
		c->st = NULL;
		c->ended = true;
		cap_resume(c);
	}
	if (api->captures && api->mhd)
		MHD_run(api->mhd); /* let resumed connections end before the daemon stops */
}
