/*
 * ezp-ws - the WebSocket client of the EzProxy API benchmarks (bench.py --api,
 * DESIGN.md section 14): one v3 socket (/api/3/socket, DESIGN.md section 8)
 * that reads as fast as it can.
 *
 *   ezp-ws watch  --api ADDR --key-file PATH --pipeline NAME [options]
 *       counts the `packet` frames of a watcher (per direction), `lagged`
 *       and `error` frames.
 *   ezp-ws filter --api ADDR --key-file PATH --pipeline NAME [options]
 *       holds the pipeline's `remote` filter and answers every packet with
 *       verdict_required at once: {"type":"verdict","seq":N,"action":"pass"}.
 *
 * Options: --max-seconds S (600; the socket closes by itself after S),
 * --skip-data-prefix B64 (packets whose base64 `data` starts with B64 are
 * counted as `skipped`, not as packets: bench.py's UDP probes),
 * --action pass|drop (filter), --timeout-ms N (filter: the hold timeout).
 *
 * Output (stdout, one JSON object a line): {"ready":true,...} once the
 * `hello` frame arrived; the counters again for every "stats" line read on
 * stdin; a final object when stdin reaches EOF, on SIGTERM/SIGINT, at
 * --max-seconds or when the server closes. Errors: {"error":"..."}, exit 1.
 *
 * The handshake is formatted and read here (status line and headers only;
 * Sec-WebSocket-Accept checked with libcrypto); framing is wslay's (client
 * mode). Packet frames are not parsed whole: the few fields needed are found
 * by key (base64 never contains a quote), so the client's own cost stays
 * small; every other frame is parsed with jansson. Only 127.0.0.0/8.
 * Thread: one (main).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <wslay/wslay.h>

#define HANDSHAKE_MAX 16384
#define HANDSHAKE_MS 5000
#define RX_BUF (256 * 1024)
#define RX_BUDGET (8u << 20)
#define MAX_MSG (64u << 20)
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

struct opts {
	const char *mode;            /* "watch" / "filter" */
	const char *api;             /* ADDR */
	const char *key_file;
	const char *pipeline;
	const char *skip_prefix;
	const char *action;
	double max_seconds;
	long timeout_ms;
};

struct client {
	int fd;
	wslay_event_context_ptr ws;
	const struct opts *o;
	/* bytes read ahead: the handshake's leftovers, then one big recv() */
	uint8_t *rx;
	size_t rx_off, rx_len;
	size_t rx_budget;            /* bytes one wslay_event_recv may still read */
	uint64_t mask_state;
	bool ready, closed, failed;
	char fail[256];
	/* counters */
	uint64_t frames, bytes, packets, to_server, to_client, skipped, held, verdicts;
	uint64_t verdict_fail, lagged_frames, lagged_dropped, error_frames, sessions_opened;
	uint64_t sessions_closed, other_frames;
	char last_error[200];
	uint64_t t_open_ns;
};

static volatile sig_atomic_t stop_flag;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void json_escape(char *out, size_t n, const char *s)
{
	size_t j = 0;

	for (; *s && j + 7 < n; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\') {
			out[j++] = '\\';
			out[j++] = (char)ch;
		} else if (ch < 0x20) {
			j += (size_t)snprintf(out + j, n - j, "\\u%04x", ch);
		} else {
			out[j++] = (char)ch;
		}
	}
	out[j] = 0;
}

static void die_json(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die_json(const char *fmt, ...)
{
	char msg[600], esc[1300];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	json_escape(esc, sizeof(esc), msg);
	printf("{\"error\":\"%s\"}\n", esc);
	fflush(stdout);
	exit(1);
}

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

/* ---- the handshake ---- */

static void parse_addr(const char *s, struct sockaddr_in *sa)
{
	char host[64] = "127.0.0.1";
	const char *colon = strrchr(s, ':');
	char *end = NULL;
	long port;

	if (colon) {
		size_t hl = (size_t)(colon - s);
		if (hl == 0 || hl >= sizeof(host))
			die_json("bad address %s", s);
		memcpy(host, s, hl);
		host[hl] = 0;
		s = colon + 1;
	}
	port = strtol(s, &end, 10);
	if (!*s || *end || port < 1 || port > 65535)
		die_json("bad port in address");
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &sa->sin_addr) != 1 ||
	    (ntohl(sa->sin_addr.s_addr) >> 24) != 127)
		die_json("only 127.0.0.0/8 addresses are allowed, not %s", host);
}

static void read_key(const char *path, char *key, size_t n)
{
	FILE *f = fopen(path, "r");
	size_t len;

	if (!f)
		die_json("cannot open key file %s: %s", path, strerror(errno));
	len = fread(key, 1, n - 1, f);
	fclose(f);
	key[len] = 0;
	while (len && (key[len - 1] == '\n' || key[len - 1] == '\r' || key[len - 1] == ' '))
		key[--len] = 0;
	if (!len)
		die_json("key file %s is empty", path);
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)key[i] <= ' ' || (unsigned char)key[i] >= 0x7f)
			die_json("key file %s holds a non-printable character", path);
}

static bool name_ok(const char *s)
{
	if (!*s || strlen(s) > 64)
		return false;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
		      *s == '-' || *s == '_' || *s == '.'))
			return false;
	return true;
}

/* The value of header @name in the header block @h (NUL-terminated), into @out. */
static bool header_value(const char *h, const char *name, char *out, size_t n)
{
	size_t nl = strlen(name);

	for (const char *line = strstr(h, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
		const char *p = line + 2, *e = strstr(p, "\r\n");
		size_t len;
		if (!e || !strncasecmp(p, "\r\n", 2))
			break;
		if (strncasecmp(p, name, nl) || p[nl] != ':')
			continue;
		p += nl + 1;
		while (p < e && (*p == ' ' || *p == '\t'))
			p++;
		len = (size_t)(e - p);
		while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
			len--;
		if (len >= n)
			return false;
		memcpy(out, p, len);
		out[len] = 0;
		return true;
	}
	return false;
}

static void handshake(struct client *c, const struct sockaddr_in *sa, const char *key)
{
	unsigned char nonce[16], digest[SHA_DIGEST_LENGTH];
	char nonce_b64[32], want[40], got[80], req[1024], status[128];
	char *buf = malloc(HANDSHAKE_MAX + 1), *end = NULL;
	const struct opts *o = c->o;
	uint64_t deadline = now_ns() + HANDSHAKE_MS * 1000000ull;
	size_t len = 0, off = 0;
	char tmo[32] = "";
	char *hdr;
	int n;

	if (!buf)
		die_json("out of memory");
	if (getrandom(nonce, sizeof(nonce), 0) != sizeof(nonce))
		die_json("getrandom: %s", strerror(errno));
	EVP_EncodeBlock((unsigned char *)nonce_b64, nonce, sizeof(nonce));
	hdr = malloc(strlen(nonce_b64) + sizeof(WS_GUID));
	if (!hdr)
		die_json("out of memory");
	sprintf(hdr, "%s%s", nonce_b64, WS_GUID);
	SHA1((const unsigned char *)hdr, strlen(hdr), digest);
	free(hdr);
	EVP_EncodeBlock((unsigned char *)want, digest, sizeof(digest));
	if (o->timeout_ms > 0)
		snprintf(tmo, sizeof(tmo), "&timeout_ms=%ld", o->timeout_ms);
	n = snprintf(req, sizeof(req),
		     "GET /api/3/socket?mode=%s&pipeline=%s%s HTTP/1.1\r\n"
		     "Host: %s:%u\r\n"
		     "Upgrade: websocket\r\n"
		     "Connection: Upgrade\r\n"
		     "Sec-WebSocket-Key: %s\r\n"
		     "Sec-WebSocket-Version: 13\r\n"
		     "Authorization: Bearer %s\r\n"
		     "\r\n",
		     o->mode, o->pipeline, tmo, inet_ntoa(sa->sin_addr), ntohs(sa->sin_port),
		     nonce_b64, key);
	if (n < 0 || (size_t)n >= sizeof(req))
		die_json("upgrade request too long");
	while (off < (size_t)n) {
		ssize_t w = send(c->fd, req + off, (size_t)n - off, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			die_json("send upgrade request: %s", strerror(errno));
		off += (size_t)w;
	}
	explicit_bzero(req, sizeof(req));
	/* read up to the blank line that ends the headers */
	while (!(end = len >= 4 ? memmem(buf, len, "\r\n\r\n", 4) : NULL)) {
		struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
		uint64_t now = now_ns();
		ssize_t r;
		if (now >= deadline)
			die_json("no upgrade answer within %d ms", HANDSHAKE_MS);
		if (len >= HANDSHAKE_MAX)
			die_json("upgrade answer headers longer than %d bytes", HANDSHAKE_MAX);
		if (poll(&pfd, 1, (int)((deadline - now) / 1000000 + 1)) <= 0)
			continue;
		r = recv(c->fd, buf + len, HANDSHAKE_MAX - len, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			die_json("read upgrade answer: %s", strerror(errno));
		if (r == 0) {
			buf[len] = 0;
			die_json("server closed during the upgrade: %.300s", buf);
		}
		len += (size_t)r;
	}
	end[2] = 0; /* keep the last header's CRLF */
	if (sscanf(buf, "HTTP/1.%*1[01] %127[^\r]", status) != 1)
		die_json("bad status line: %.100s", buf);
	if (strncmp(status, "101", 3) != 0) {
		/* the body (an error object) usually came with the headers */
		char *body = end + 4;
		size_t blen = len - (size_t)(body - buf);
		body[blen] = 0;
		for (char *q = body; *q; q++)
			if (*q == '\r' || *q == '\n' || *q == '\t')
				*q = ' ';
		die_json("upgrade refused: %s: %.400s", status, body);
	}
	if (!header_value(buf, "Sec-WebSocket-Accept", got, sizeof(got)))
		die_json("101 without Sec-WebSocket-Accept");
	if (strlen(got) != strlen(want) || CRYPTO_memcmp(got, want, strlen(want)) != 0)
		die_json("Sec-WebSocket-Accept %s does not match %s", got, want);
	/* frames sent right after the 101 */
	c->rx_len = len - (size_t)(end + 4 - buf);
	memcpy(c->rx, end + 4, c->rx_len);
	c->rx_off = 0;
	free(buf);
}

/* ---- wslay callbacks ---- */

static ssize_t cb_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
		       void *user)
{
	struct client *c = user;
	size_t n;

	(void)flags;
	if (c->rx_off == c->rx_len) {
		ssize_t r;
		if (!c->rx_budget) {
			/* let the loop look at stdin and the clock now and then */
			wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
			return -1;
		}
		c->rx_off = c->rx_len = 0;
		do
			r = recv(c->fd, c->rx, RX_BUF, 0);
		while (r < 0 && errno == EINTR);
		if (r < 0) {
			wslay_event_set_error(ctx, errno == EAGAIN || errno == EWOULDBLOCK
							   ? WSLAY_ERR_WOULDBLOCK
							   : WSLAY_ERR_CALLBACK_FAILURE);
			return -1;
		}
		if (r == 0) {
			c->closed = true;
			wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
			return -1;
		}
		c->rx_len = (size_t)r;
		c->rx_budget = c->rx_budget > (size_t)r ? c->rx_budget - (size_t)r : 0;
	}
	n = c->rx_len - c->rx_off;
	if (n > len)
		n = len;
	memcpy(buf, c->rx + c->rx_off, n);
	c->rx_off += n;
	return (ssize_t)n;
}

static ssize_t cb_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
		       void *user)
{
	struct client *c = user;
	ssize_t w;

	(void)flags;
	do
		w = send(c->fd, data, len, MSG_NOSIGNAL);
	while (w < 0 && errno == EINTR);
	if (w < 0) {
		wslay_event_set_error(ctx, errno == EAGAIN || errno == EWOULDBLOCK
						   ? WSLAY_ERR_WOULDBLOCK
						   : WSLAY_ERR_CALLBACK_FAILURE);
		return -1;
	}
	return w;
}

/* Masks need not be secret here: xorshift64*, seeded from getrandom. */
static int cb_genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *user)
{
	struct client *c = user;

	(void)ctx;
	for (size_t i = 0; i < len; i++) {
		c->mask_state ^= c->mask_state >> 12;
		c->mask_state ^= c->mask_state << 25;
		c->mask_state ^= c->mask_state >> 27;
		buf[i] = (uint8_t)((c->mask_state * 0x2545F4914F6CDD1Dull) >> 56);
	}
	return 0;
}

/*
 * The value after "key": in @m (at most @len bytes), or NULL. Base64 and
 * the numbers never hold a quote, so a quoted key followed by a colon is
 * the key.
 */
static const char *field(const char *m, size_t len, const char *key)
{
	size_t kl = strlen(key);
	const char *p = m, *e = m + len;

	while (p < e) {
		const char *q = memmem(p, (size_t)(e - p), key, kl);
		if (!q)
			return NULL;
		p = q + kl;
		if (q > m && q[-1] == '"' && p < e && *p == '"') {
			p++;
			while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
				p++;
			if (p < e && *p == ':') {
				p++;
				while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
					p++;
				return p < e ? p : NULL;
			}
		}
	}
	return NULL;
}

static bool field_is(const char *m, size_t len, const char *key, const char *lit)
{
	const char *v = field(m, len, key);
	size_t ll = strlen(lit);

	return v && (size_t)(m + len - v) >= ll && !memcmp(v, lit, ll);
}

static void other_frame(struct client *c, const char *m, size_t len)
{
	json_error_t jerr;
	json_t *j = json_loadb(m, len, JSON_REJECT_DUPLICATES, &jerr);
	const char *type = json_string_value(json_object_get(j, "type"));

	if (!type) {
		c->other_frames++;
	} else if (!strcmp(type, "hello")) {
		if (!c->ready) {
			c->ready = true;
			c->t_open_ns = now_ns();
			printf("{\"ready\":true,\"mode\":\"%s\",\"pipeline\":\"%s\"}\n", c->o->mode,
			       c->o->pipeline);
			fflush(stdout);
		}
	} else if (!strcmp(type, "lagged")) {
		c->lagged_frames++;
		c->lagged_dropped += (uint64_t)json_integer_value(json_object_get(j, "dropped"));
	} else if (!strcmp(type, "error")) {
		const char *msg = json_string_value(json_object_get(j, "message"));
		c->error_frames++;
		snprintf(c->last_error, sizeof(c->last_error), "%s", msg ? msg : "?");
	} else if (!strcmp(type, "session_opened")) {
		c->sessions_opened++;
	} else if (!strcmp(type, "session_closed")) {
		c->sessions_closed++;
	} else {
		c->other_frames++;
	}
	json_decref(j);
}

static void packet_frame(struct client *c, const char *m, size_t len)
{
	size_t head = len < 2048 ? len : 2048; /* every field but `data` comes first */
	const char *o = c->o->skip_prefix;

	if (o) {
		const char *d = field(m, len, "data");
		size_t pl = strlen(o);
		if (d && *d == '"' && (size_t)(m + len - d) > pl && !memcmp(d + 1, o, pl)) {
			c->skipped++;
			goto verdict;
		}
	}
	c->packets++;
	if (field_is(m, head, "direction", "\"to_server\""))
		c->to_server++;
	else if (field_is(m, head, "direction", "\"to_client\""))
		c->to_client++;
verdict:
	if (field_is(m, head, "verdict_required", "true")) {
		const char *s = field(m, head, "seq");
		char out[96];
		unsigned long long seq;
		struct wslay_event_msg msg;
		int n;
		c->held++;
		if (!s || sscanf(s, "%llu", &seq) != 1) {
			c->verdict_fail++;
			return;
		}
		n = snprintf(out, sizeof(out), "{\"type\":\"verdict\",\"seq\":%llu,\"action\":\"%s\"}",
			     seq, c->o->action);
		msg = (struct wslay_event_msg){WSLAY_TEXT_FRAME, (const uint8_t *)out, (size_t)n};
		if (wslay_event_queue_msg(c->ws, &msg) == 0)
			c->verdicts++;
		else
			c->verdict_fail++;
	}
}

static void cb_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
		   void *user)
{
	struct client *c = user;
	const char *m = (const char *)arg->msg;
	size_t len = arg->msg_length, head = len < 256 ? len : 256;

	(void)ctx;
	if (arg->opcode != WSLAY_TEXT_FRAME)
		return; /* close / ping / pong: wslay answers */
	c->frames++;
	c->bytes += len;
	if (field_is(m, head, "type", "\"packet\""))
		packet_frame(c, m, len);
	else
		other_frame(c, m, len);
}

/* ---- the loop ---- */

static void print_counters(struct client *c, const char *what)
{
	char esc[420];
	double secs = c->t_open_ns ? (double)(now_ns() - c->t_open_ns) / 1e9 : 0.0;

	json_escape(esc, sizeof(esc), c->failed ? c->fail : c->last_error);
	printf("{\"%s\":true,\"mode\":\"%s\",\"frames\":%" PRIu64 ",\"bytes\":%" PRIu64
	       ",\"packets\":%" PRIu64 ",\"to_server\":%" PRIu64 ",\"to_client\":%" PRIu64
	       ",\"skipped\":%" PRIu64 ",\"held\":%" PRIu64 ",\"verdicts\":%" PRIu64
	       ",\"verdict_failures\":%" PRIu64 ",\"lagged_frames\":%" PRIu64
	       ",\"lagged\":%" PRIu64 ",\"error_frames\":%" PRIu64 ",\"sessions_opened\":%" PRIu64
	       ",\"sessions_closed\":%" PRIu64 ",\"other_frames\":%" PRIu64
	       ",\"seconds\":%.3f,\"server_closed\":%s,\"failed\":%s,\"last_error\":\"%s\"}\n",
	       what, c->o->mode, c->frames, c->bytes, c->packets, c->to_server, c->to_client,
	       c->skipped, c->held, c->verdicts, c->verdict_fail, c->lagged_frames,
	       c->lagged_dropped, c->error_frames, c->sessions_opened, c->sessions_closed,
	       c->other_frames, secs,
	       c->closed || (c->ws && wslay_event_get_close_received(c->ws)) ? "true" : "false",
	       c->failed ? "true" : "false",
	       esc);
	fflush(stdout);
}

/* Read "stats" lines from stdin; false at EOF. */
static bool read_stdin(struct client *c)
{
	static char line[256];
	static size_t used;
	ssize_t r = read(0, line + used, sizeof(line) - 1 - used);

	if (r < 0)
		return errno == EINTR || errno == EAGAIN;
	if (r == 0)
		return false;
	used += (size_t)r;
	line[used] = 0;
	for (char *nl; (nl = strchr(line, '\n'));) {
		*nl = 0;
		if (!strcmp(line, "stats"))
			print_counters(c, "stats");
		used -= (size_t)(nl + 1 - line);
		memmove(line, nl + 1, used + 1);
	}
	if (used == sizeof(line) - 1)
		used = 0; /* a line too long: forget it */
	return true;
}

static void run(struct client *c)
{
	uint64_t end = now_ns() + (uint64_t)(c->o->max_seconds * 1e9);
	bool stdin_open = true;

	/* frames that came with the 101 */
	c->rx_budget = RX_BUDGET;
	if (c->rx_len && wslay_event_recv(c->ws) != 0) {
		c->failed = true;
		snprintf(c->fail, sizeof(c->fail), "bad frames right after the upgrade");
		return;
	}
	while (!stop_flag && !c->closed) {
		struct pollfd pfd[2] = {{.fd = c->fd, .events = POLLIN},
					{.fd = stdin_open ? 0 : -1, .events = POLLIN}};
		uint64_t now = now_ns();
		int n;

		if (now >= end)
			break;
		if (wslay_event_want_write(c->ws))
			pfd[0].events |= POLLOUT;
		if (!wslay_event_want_read(c->ws) && !wslay_event_want_write(c->ws))
			break; /* the close handshake is over */
		n = poll(pfd, 2, 200);
		if (n < 0 && errno != EINTR) {
			c->failed = true;
			snprintf(c->fail, sizeof(c->fail), "poll: %s", strerror(errno));
			return;
		}
		if (n <= 0)
			continue;
		if (pfd[0].revents & (POLLIN | POLLERR | POLLHUP)) {
			c->rx_budget = RX_BUDGET;
			if (wslay_event_recv(c->ws) != 0 && !c->closed) {
				c->failed = true;
				snprintf(c->fail, sizeof(c->fail), "receive failed (bad frame or reset)");
				return;
			}
		}
		if (wslay_event_want_write(c->ws) && wslay_event_send(c->ws) != 0) {
			c->failed = !c->closed;
			snprintf(c->fail, sizeof(c->fail), "send failed");
			return;
		}
		if (pfd[1].revents & (POLLIN | POLLHUP | POLLERR))
			stdin_open = read_stdin(c);
		if (!stdin_open)
			break;
	}
	if (!c->closed && !wslay_event_get_close_sent(c->ws)) {
		/* best effort: one close frame, no wait for the answer */
		wslay_event_queue_close(c->ws, WSLAY_CODE_NORMAL_CLOSURE, NULL, 0);
		(void)wslay_event_send(c->ws);
	}
}

static void usage(void)
{
	die_json("usage: ezp-ws watch|filter --api ADDR --key-file PATH --pipeline NAME "
		 "[--max-seconds S] [--skip-data-prefix B64] [--action pass|drop] [--timeout-ms N]");
}

int main(int argc, char **argv)
{
	struct opts o = {.max_seconds = 600, .action = "pass"};
	struct client c = {.o = &o, .fd = -1};
	struct wslay_event_callbacks cbs = {
		.recv_callback = cb_recv,
		.send_callback = cb_send,
		.genmask_callback = cb_genmask,
		.on_msg_recv_callback = cb_msg,
	};
	struct sockaddr_in sa;
	struct sigaction sig = {.sa_handler = on_signal};
	char key[512];
	int one = 1;

	if (argc < 2)
		usage();
	o.mode = argv[1];
	if (strcmp(o.mode, "watch") && strcmp(o.mode, "filter"))
		usage();
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			usage();
		i++;
		if (!strcmp(a, "--api"))
			o.api = v;
		else if (!strcmp(a, "--key-file"))
			o.key_file = v;
		else if (!strcmp(a, "--pipeline"))
			o.pipeline = v;
		else if (!strcmp(a, "--skip-data-prefix"))
			o.skip_prefix = v;
		else if (!strcmp(a, "--action"))
			o.action = v;
		else if (!strcmp(a, "--max-seconds"))
			o.max_seconds = atof(v);
		else if (!strcmp(a, "--timeout-ms"))
			o.timeout_ms = atol(v);
		else
			usage();
	}
	if (!o.api || !o.key_file || !o.pipeline || o.max_seconds <= 0 || o.max_seconds > 3600)
		usage();
	if (!name_ok(o.pipeline))
		die_json("pipeline name must be [A-Za-z0-9._-], 1 to 64 characters");
	if (strcmp(o.action, "pass") && strcmp(o.action, "drop"))
		usage();
	if (o.skip_prefix && (!*o.skip_prefix || strchr(o.skip_prefix, '"')))
		usage();
	sigaction(SIGTERM, &sig, NULL);
	sigaction(SIGINT, &sig, NULL);
	signal(SIGPIPE, SIG_IGN);
	parse_addr(o.api, &sa);
	read_key(o.key_file, key, sizeof(key));
	if (getrandom(&c.mask_state, sizeof(c.mask_state), 0) != sizeof(c.mask_state) ||
	    !c.mask_state)
		c.mask_state = 0x9E3779B97F4A7C15ull;
	c.rx = malloc(RX_BUF > HANDSHAKE_MAX ? RX_BUF : HANDSHAKE_MAX);
	if (!c.rx)
		die_json("out of memory");
	c.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c.fd < 0 || connect(c.fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
		die_json("connect %s: %s", o.api, strerror(errno));
	setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	handshake(&c, &sa, key);
	explicit_bzero(key, sizeof(key));
	if (fcntl(c.fd, F_SETFL, fcntl(c.fd, F_GETFL) | O_NONBLOCK) != 0)
		die_json("fcntl: %s", strerror(errno));
	if (wslay_event_context_client_init(&c.ws, &cbs, &c) != 0)
		die_json("wslay_event_context_client_init failed");
	wslay_event_config_set_max_recv_msg_length(c.ws, MAX_MSG);
	run(&c);
	if (!c.ready && !c.failed) {
		c.failed = true;
		snprintf(c.fail, sizeof(c.fail), "closed before the hello frame%s%s",
			 c.last_error[0] ? ": " : "", c.last_error);
	}
	print_counters(&c, "final");
	wslay_event_context_free(c.ws);
	close(c.fd);
	free(c.rx);
	return c.failed ? 1 : 0;
}
