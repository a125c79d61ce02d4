/*
 * cli_watch.c - `ezproxy watch [--pipeline NAME] [--hex]` (DESIGN.md
 * section 6): follow the v3 WebSocket of a running daemon in watch mode
 * (/api/3/socket?mode=watch[&pipeline=NAME]) and print one line per event
 * on stdout, flushed per event, until Ctrl-C/SIGTERM or the socket closes.
 * Warnings (lagged, error frames) and the closing reason go to stderr.
 * Thread: the CLI process's main thread (single-threaded).
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "cli_remote.h"

#define TEXT_MAX 256 /* payload bytes shown as text by default */
#define HEX_MAX 1024 /* and as a hex dump */

struct watch {
	const struct ezp__cli_remote *r;
	int hex;
	size_t max_bytes; /* payload bytes shown; 0 = all */
	int out_gone;	  /* stdout was closed (e.g. `| head`) */
};

static const char *str_or(json_t *v, const char *def)
{
	const char *s = json_string_value(v);

	return s ? s : def;
}

/* "HH:MM:SS.mmm" local time of @ts_us (microseconds since the epoch), or now when absent. */
static void put_time(FILE *f, json_t *ts_us)
{
	struct timeval tv;
	struct tm tm;
	time_t sec;
	long ms;
	char buf[16];

	if (json_is_integer(ts_us) && json_integer_value(ts_us) > 0) {
		sec = (time_t)(json_integer_value(ts_us) / 1000000);
		ms = (long)(json_integer_value(ts_us) / 1000 % 1000);
	} else {
		gettimeofday(&tv, NULL);
		sec = tv.tv_sec;
		ms = (long)(tv.tv_usec / 1000);
	}
	localtime_r(&sec, &tm);
	strftime(buf, sizeof(buf), "%H:%M:%S", &tm);
	fprintf(f, "%s.%03ld", buf, ms);
}

/* A session id: a number, or a string as given. */
static void put_id(FILE *f, json_t *id)
{
	if (json_is_integer(id))
		fprintf(f, "#%lld", (long long)json_integer_value(id));
	else
		fprintf(f, "#%s", str_or(id, "?"));
}

/* Printable ASCII as is, '"' and '\' escaped, other bytes as \xNN; in quotes. */
static void put_text(FILE *f, const unsigned char *d, size_t len, size_t max)
{
	size_t n = max && len > max ? max : len;

	fputc('"', f);
	for (size_t i = 0; i < n; i++) {
		if (d[i] == '"' || d[i] == '\\')
			fprintf(f, "\\%c", d[i]);
		else if (d[i] >= 0x20 && d[i] < 0x7f)
			fputc(d[i], f);
		else
			fprintf(f, "\\x%02x", d[i]);
	}
	fputc('"', f);
	if (n < len)
		fprintf(f, " ... (+%zu bytes)", len - n);
}

/* 16 bytes a line: offset, hex, ASCII. */
static void put_hex(FILE *f, const unsigned char *d, size_t len, size_t max)
{
	size_t n = max && len > max ? max : len;

	for (size_t off = 0; off < n; off += 16) {
		size_t k = n - off < 16 ? n - off : 16;

		fprintf(f, "\n  %04zx  ", off);
		for (size_t i = 0; i < 16; i++) {
			if (i < k)
				fprintf(f, "%02x ", d[off + i]);
			else
				fputs("   ", f);
			if (i == 7)
				fputc(' ', f);
		}
		fputs(" |", f);
		for (size_t i = 0; i < k; i++)
			fputc(d[off + i] >= 0x20 && d[off + i] < 0x7f ? d[off + i] : '.', f);
		fputc('|', f);
	}
	if (n < len)
		fprintf(f, "\n  ... (+%zu bytes)", len - n);
}

/* base64 to bytes (libcrypto); malloc'd, NULL on bad input. */
static unsigned char *b64_decode(const char *text, size_t *out_len)
{
	size_t len = strlen(text), pad = 0;
	unsigned char *out;
	int n;

	if (len % 4 || len > (size_t)1 << 30)
		return NULL;
	if (!(out = malloc(len / 4 * 3 + 1)))
		return NULL;
	n = len ? EVP_DecodeBlock(out, (const unsigned char *)text, (int)len) : 0;
	if (n < 0) {
		free(out);
		return NULL;
	}
	if (len && text[len - 1] == '=')
		pad++;
	if (len > 1 && text[len - 2] == '=')
		pad++;
	*out_len = (size_t)n - pad;
	return out;
}

/* Flags: a list of names ["injected", "replaced", "dropped"], shown as " [a,b]". */
static void put_flags(FILE *f, json_t *flags)
{
	json_t *v;
	size_t i;
	int any = 0;

	json_array_foreach(flags, i, v)
	{
		if (json_is_string(v))
			fprintf(f, "%s%s", any++ ? "," : " [", json_string_value(v));
	}
	if (any)
		fputc(']', f);
}

static void show_packet(struct watch *w, FILE *f, json_t *m)
{
	const char *b64 = json_string_value(json_object_get(m, "data"));
	unsigned char *data = NULL;
	size_t len = 0;

	put_time(f, json_object_get(m, "ts_us"));
	fputc(' ', f);
	put_id(f, json_object_get(m, "session"));
	fprintf(f, " %s %s %s -> %s", str_or(json_object_get(m, "pipeline"), "?"),
		str_or(json_object_get(m, "direction"), "?"),
		str_or(json_object_get(m, "src"), "?"), str_or(json_object_get(m, "dst"), "?"));
	if (b64 && !(data = b64_decode(b64, &len))) {
		fputs(" (undecodable data)", f);
		return;
	}
	fprintf(f, " %zu bytes", len);
	put_flags(f, json_object_get(m, "flags"));
	if (w->hex) {
		put_hex(f, data, len, w->max_bytes);
	} else {
		fputs("  ", f);
		put_text(f, data, len, w->max_bytes);
	}
	free(data);
}

static void show_session(FILE *f, json_t *m, const char *what)
{
	json_t *s = json_object_get(m, "session");
	const char *reason = json_string_value(json_object_get(s, "close_reason"));
	const char *text = json_string_value(json_object_get(s, "close_text"));

	put_time(f, json_object_get(m, "ts_us"));
	fputc(' ', f);
	put_id(f, json_object_get(s, "id"));
	fprintf(f, " %s %s %s %s -> %s", str_or(json_object_get(s, "pipeline"), "?"), what,
		str_or(json_object_get(s, "transport"), "?"),
		str_or(json_object_get(s, "client"), "-"),
		str_or(json_object_get(s, "server"), "-"));
	if (!strcmp(what, "changed") && json_string_value(json_object_get(s, "state")))
		fprintf(f, " (%s)", json_string_value(json_object_get(s, "state")));
	if (strcmp(what, "closed"))
		return;
	fprintf(f, ", %lld bytes to server, %lld to client",
		(long long)json_integer_value(json_object_get(s, "bytes_to_server")),
		(long long)json_integer_value(json_object_get(s, "bytes_to_client")));
	if (reason)
		fprintf(f, ": %s%s%s", reason, text && *text ? ": " : "", text ? text : "");
}

static void show_hello(const struct watch *w, json_t *m)
{
	json_t *pl = json_object_get(m, "pipelines"), *v;
	size_t i;

	fprintf(stderr, "ezproxy: watching %s",
		json_array_size(pl) == 1 ? "pipeline" : "pipelines");
	json_array_foreach(pl, i, v) fprintf(
	    stderr, "%s%s", i ? ", " : " ",
	    json_is_string(v) ? json_string_value(v) : str_or(json_object_get(v, "name"), "?"));
	if (!json_array_size(pl))
		fprintf(stderr, " (none yet)");
	fprintf(stderr, " on %s; Ctrl-C stops\n", w->r->api.url);
}

/* Every string in @v with control characters replaced (they would reach a terminal). */
static void scrub_json(json_t *v)
{
	const char *k;
	json_t *it;
	size_t i;

	if (json_is_object(v)) {
		json_object_foreach(v, k, it)
		{
			scrub_json(it);
		}
	} else if (json_is_array(v)) {
		json_array_foreach(v, i, it)
		{
			scrub_json(it);
		}
	} else if (json_is_string(v) &&
		   strcspn(json_string_value(v),
			   "\x01\x02\x03\x04\x05\x06"
			   "\x07\x08\t\n\v\f\r\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18"
			   "\x19\x1a\x1b\x1c\x1d\x1e\x1f\x7f") != json_string_length(v)) {
		char *copy = strdup(json_string_value(v));

		ezp__cli_scrub(copy);
		if (copy)
			json_string_set(v, copy);
		free(copy);
	}
}

/* One WebSocket text message. Returns non-zero to stop (stdout gone). */
static int on_message(void *arg, const char *text, size_t len)
{
	struct watch *w = arg;
	json_t *m = json_loadb(text, len, JSON_REJECT_DUPLICATES, NULL);
	const char *type;
	char *line = NULL, start[64];
	size_t line_len = 0;
	FILE *f;

	scrub_json(m);
	if (!(type = json_string_value(json_object_get(m, "type")))) {
		snprintf(start, sizeof(start), "%s", text);
		ezp__cli_scrub(start);
		fprintf(stderr,
			"ezproxy: warning: ignoring a message from the daemon that is not "
			"a v3 event (%s)\n",
			start);
		goto done;
	}
	if (!strcmp(type, "hello")) {
		show_hello(w, m);
		goto done;
	}
	if (!strcmp(type, "lagged")) {
		fprintf(stderr,
			"ezproxy: warning: the watch fell behind; the daemon dropped %lld "
			"event(s)\n",
			(long long)json_integer_value(json_object_get(m, "dropped")));
		goto done;
	}
	if (!strcmp(type, "error")) {
		fprintf(stderr, "ezproxy: the daemon reported an error: %s (%s)\n",
			str_or(json_object_get(m, "message"), "no message"),
			str_or(json_object_get(m, "code"), "no code"));
		goto done;
	}
	/* build the event whole, then write it at once: lines never interleave */
	if (!(f = open_memstream(&line, &line_len)))
		goto done;
	if (!strcmp(type, "packet"))
		show_packet(w, f, m);
	else if (!strncmp(type, "session_", 8))
		show_session(f, m, type + 8);
	if (fclose(f) == 0 && line_len) {
		fputs(line, stdout);
		fputc('\n', stdout);
		if (fflush(stdout) != 0)
			w->out_gone = 1;
	}
done:
	free(line);
	json_decref(m);
	return w->out_gone;
}

static void watch_usage(FILE *out)
{
	fprintf(out, "usage: ezproxy watch [--pipeline NAME] [--hex] [--max-bytes N] [--api URL] "
		     "[-c FILE] [--key KEY]\n"
		     "  one line per packet and session event of a running daemon, until Ctrl-C\n");
}

/* "/api/3/socket?mode=watch[&pipeline=NAME]", NAME percent-encoded. */
static int watch_path(const char *pipeline, char *out, size_t n)
{
	size_t len =
	    (size_t)snprintf(out, n, "/api/3/socket?mode=watch%s", pipeline ? "&pipeline=" : "");

	for (const char *p = pipeline; p && *p && len + 4 < n; p++) {
		unsigned char c = (unsigned char)*p;

		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		    c == '-' || c == '_' || c == '.' || c == '~')
			out[len++] = (char)c;
		else
			len += (size_t)snprintf(out + len, n - len, "%%%02X", c);
	}
	if (len + 4 >= n)
		return -1;
	out[len] = '\0';
	return 0;
}

int ezp__cli_watch(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"pipeline", required_argument, NULL, 'p'},
	    {"hex", no_argument, NULL, 'x'},
	    {"max-bytes", required_argument, NULL, 'm'},
	    {"api", required_argument, NULL, 'a'},
	    {"key", required_argument, NULL, 'k'},
	    {"config", required_argument, NULL, 'c'},
	    {"help", no_argument, NULL, 'h'},
	    {0},
	};
	struct ezp__cli_remote r = {0};
	struct watch w = {.r = &r};
	struct ezp__cli_ws_result res;
	struct ezp__cli_reply refusal = {0};
	const char *pipeline = NULL;
	long max = -1;
	char path[512], msg[512], *end;
	int c, rc = 2;

	while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
		switch (c) {
		case 'p':
			pipeline = optarg;
			break;
		case 'x':
			w.hex = 1;
			break;
		case 'm':
			errno = 0;
			max = strtol(optarg, &end, 10);
			if (errno || *end || max < 0) {
				fprintf(stderr, "ezproxy: --max-bytes takes a number of bytes "
						"(0 shows whole packets)\n");
				return 2;
			}
			break;
		case 'h':
			watch_usage(stdout);
			return 0;
		default:
			if (ezp__cli_remote_opt(&r, c, optarg))
				break;
			watch_usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "ezproxy: unexpected argument '%s'; see 'ezproxy watch --help'\n",
			argv[optind]);
		return 2;
	}
	if (pipeline && (!*pipeline || watch_path(pipeline, path, sizeof(path)))) {
		fprintf(stderr, "ezproxy: --pipeline needs a pipeline name (at most 100 bytes)\n");
		return 2;
	}
	watch_path(pipeline, path, sizeof(path));
	w.max_bytes = max >= 0 ? (size_t)max : w.hex ? HEX_MAX : TEXT_MAX;
	if ((rc = ezp__cli_remote_resolve(&r)))
		goto done;
	ezp__cli_signals_install();
	rc = 1;
	if (ezp__cli_ws_run(&r.api, path, on_message, &w, &res, &refusal, msg, sizeof(msg))) {
		if (refusal.status)
			rc = ezp__cli_api_refused(&r, &refusal, "UseWebsocket");
		else if (ezp__cli_stop)
			rc = 0;
		else
			fprintf(stderr, "ezproxy: %s\n", msg);
		goto done;
	}
	switch (res.end) {
	case EZP__CLI_WS_STOPPED:
		rc = 0;
		break;
	case EZP__CLI_WS_HANDLER:
		rc = w.out_gone ? 0 : 1;
		break;
	case EZP__CLI_WS_CLOSED:
		rc = res.close_code == 1000 || res.close_code == 1001 ? 0 : 1;
		fprintf(stderr, "ezproxy: the daemon ended the watch (%u%s%s)%s\n", res.close_code,
			res.reason[0] ? ": " : "", res.reason,
			res.close_code == 1001 ? "; it is shutting down or restarting" : "");
		break;
	case EZP__CLI_WS_LOST:
		fprintf(stderr,
			"ezproxy: lost the connection to the ezproxy API at %s: %s; is the "
			"daemon still running?\n",
			r.api.url, res.reason);
		break;
	}
done:
	ezp__cli_reply_clear(&refusal);
	ezp__cli_remote_clear(&r);
	return rc;
}
