/*
 * cli_http.c - the CLI's tiny client for the daemon's HTTP API: one
 * HTTP/1.0 request per connection (docs/decisions/0003-cli-http-client.md),
 * and the connection, request and answer-reading helpers the WebSocket
 * client (cli_ws.c) shares.
 * Thread: the CLI process's main thread. Every wait is bounded and lets
 * SIGINT/SIGTERM in once ezp__cli_signals_install() has run.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "cli_remote.h"

#define CONNECT_MS 5000
#define REQUEST_MS 30000
#define MAX_HEAD (16u << 10)
#define MAX_BODY (16u << 20)

volatile sig_atomic_t ezp__cli_stop;
static sigset_t wait_mask; /* the mask while waiting: SIGINT/SIGTERM let in */
static int have_wait_mask;

static void on_signal(int sig)
{
	(void)sig;
	ezp__cli_stop = 1;
}

const sigset_t *ezp__cli_wait_mask(void)
{
	return have_wait_mask ? &wait_mask : NULL;
}

void ezp__cli_signals_install(void)
{
	struct sigaction sa;
	sigset_t block;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN); /* a closed stdout or socket: an error to handle, not death */
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGTERM);
	sigprocmask(SIG_BLOCK, &block, &wait_mask);
	sigdelset(&wait_mask, SIGINT);
	sigdelset(&wait_mask, SIGTERM);
	have_wait_mask = 1;
}

int64_t ezp__cli_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void ezp__cli_say(char *msg, size_t n, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, n, fmt, ap);
	va_end(ap);
}

/* Wait for @events on @fd until @deadline (now_ms). 1 ready, 0 timed out, -1 stopped by a signal.
 */
int ezp__cli_wait_fd(int fd, short events, int64_t deadline)
{
	struct pollfd p = {.fd = fd, .events = events};

	for (;;) {
		int64_t left = deadline - ezp__cli_now_ms();
		struct timespec ts;
		int rc;

		if (ezp__cli_stop)
			return -1;
		if (left <= 0)
			return 0;
		ts.tv_sec = left / 1000;
		ts.tv_nsec = (left % 1000) * 1000000;
		rc = ppoll(&p, 1, &ts, have_wait_mask ? &wait_mask : NULL);
		if (rc > 0)
			return 1;
		if (rc < 0 && errno != EINTR)
			return 1; /* let the read or write report the error */
	}
}

int ezp__cli_api_parse(const char *url, struct ezp__cli_api *api, char *msg, size_t msg_len)
{
	const char *p = url, *host, *host_end, *port = "80";
	size_t hl, pl = 2;

	memset(api, 0, sizeof(*api));
	if (!strncasecmp(p, "https://", 8)) {
		ezp__cli_say(msg, msg_len,
			     "%s: the CLI does not speak TLS (https://) yet; give it a plain "
			     "http:// listener of the daemon with --api http://HOST:PORT",
			     url);
		return 2;
	}
	if (!strncasecmp(p, "http://", 7))
		p += 7;
	else if (strstr(p, "://"))
		goto bad;
	host = p;
	if (*p == '[') {
		host = ++p;
		if (!(host_end = strchr(p, ']')))
			goto bad;
		p = host_end + 1;
	} else {
		host_end = p + strcspn(p, ":/");
		p = host_end;
	}
	hl = (size_t)(host_end - host);
	if (*p == ':') {
		port = ++p;
		pl = strspn(p, "0123456789");
		p += pl;
		if (pl == 0 || pl > 5 || atoi(port) > 65535 || atoi(port) == 0)
			goto bad;
	} else {
		pl = 2;
	}
	if (*p == '/')
		p++;
	if (*p || hl == 0 || hl >= sizeof(api->host))
		goto bad;
	memcpy(api->host, host, hl);
	memcpy(api->port, port, pl);
	snprintf(api->hostport, sizeof(api->hostport), strchr(api->host, ':') ? "[%s]:%s" : "%s:%s",
		 api->host, api->port);
	snprintf(api->url, sizeof(api->url), "http://%s", api->hostport);
	return 0;
bad:
	ezp__cli_say(msg, msg_len,
		     "'%s' is not an API address; use --api http://HOST:PORT "
		     "(e.g. http://127.0.0.1:8080)",
		     url);
	return 2;
}

/* Connect within CONNECT_MS. Returns the fd (non-blocking) or -1 with @msg set. */
int ezp__cli_connect(const struct ezp__cli_api *api, char *msg, size_t msg_len)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
	struct addrinfo *res = NULL, *ai;
	int64_t deadline = ezp__cli_now_ms() + CONNECT_MS;
	int fd = -1, err = ECONNREFUSED, rc;

	rc = getaddrinfo(api->host, api->port, &hints, &res);
	if (rc) {
		ezp__cli_say(msg, msg_len,
			     "cannot reach the ezproxy API at %s: cannot resolve '%s': %s; "
			     "check --api URL",
			     api->url, api->host, gai_strerror(rc));
		return -1;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		socklen_t len = sizeof(err);

		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
			    ai->ai_protocol);
		if (fd < 0) {
			err = errno;
			continue;
		}
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
			break;
		err = errno;
		if (err == EINPROGRESS) {
			rc = ezp__cli_wait_fd(fd, POLLOUT, deadline);
			if (rc == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 &&
			    !err)
				break;
			if (rc == 0)
				err = ETIMEDOUT;
			if (rc < 0)
				err = EINTR;
		}
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		ezp__cli_say(msg, msg_len,
			     "cannot reach the ezproxy API at %s: %s; is the daemon running? "
			     "(--api URL)",
			     api->url, err == EINTR ? "interrupted" : strerror(err));
	return fd;
}

int ezp__cli_send_all(int fd, const char *buf, size_t len, int64_t deadline, const char *url,
		      char *msg, size_t msg_len)
{
	while (len) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
		int rc;

		if (n > 0) {
			buf += n;
			len -= (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			ezp__cli_say(msg, msg_len,
				     "lost the connection to the ezproxy API at %s: %s", url,
				     strerror(errno));
			return -1;
		}
		if ((rc = ezp__cli_wait_fd(fd, POLLOUT, deadline)) <= 0) {
			ezp__cli_say(msg, msg_len, "the ezproxy API at %s %s", url,
				     rc ? "request interrupted"
					: "did not take the request in time");
			return -1;
		}
	}
	return 0;
}

/* Read more into @b (up to @max bytes in all). 1 got bytes, 0 EOF, -1 error with @msg. */
static int read_more(int fd, struct ezp__cli_rbuf *b, size_t max, int64_t deadline, const char *url,
		     char *msg, size_t msg_len)
{
	for (;;) {
		ssize_t n;
		int rc;

		if (b->len >= max) {
			ezp__cli_say(msg, msg_len,
				     "the ezproxy API at %s sent an answer over %zu bytes; "
				     "is --api really an ezproxy API?",
				     url, max);
			return -1;
		}
		if (b->cap - b->len < 4096 + 1) {
			size_t cap = b->cap ? b->cap * 2 : 8192;
			char *p = realloc(b->data, cap);

			if (!p) {
				ezp__cli_say(msg, msg_len, "out of memory");
				return -1;
			}
			b->data = p;
			b->cap = cap;
		}
		n = recv(fd, b->data + b->len, b->cap - b->len - 1, 0);
		if (n > 0) {
			b->len += (size_t)n;
			b->data[b->len] = '\0';
			return 1;
		}
		if (n == 0)
			return 0;
		if (errno != EAGAIN && errno != EINTR) {
			ezp__cli_say(msg, msg_len,
				     "lost the connection to the ezproxy API at %s: %s", url,
				     strerror(errno));
			return -1;
		}
		if ((rc = ezp__cli_wait_fd(fd, POLLIN, deadline)) <= 0) {
			ezp__cli_say(msg, msg_len, "the ezproxy API at %s %s", url,
				     rc ? "request interrupted" : "did not answer in time");
			return -1;
		}
	}
}

/*
 * The value of header @name in the head @h (status line, headers, each
 * ending in CRLF), copied to @out. 1 found, 0 not.
 */
int ezp__cli_head_value(const char *h, const char *name, char *out, size_t out_len)
{
	size_t nl = strlen(name);
	const char *line = strstr(h, "\r\n");

	while (line && line[2] != '\r' && line[2] != '\0') {
		const char *p = line + 2, *end = strstr(p, "\r\n");
		size_t vl;

		if (!end)
			return 0;
		if ((size_t)(end - p) > nl && !strncasecmp(p, name, nl) && p[nl] == ':') {
			p += nl + 1;
			while (p < end && (*p == ' ' || *p == '\t'))
				p++;
			vl = (size_t)(end - p);
			while (vl && (p[vl - 1] == ' ' || p[vl - 1] == '\t'))
				vl--;
			if (vl >= out_len)
				vl = out_len - 1;
			memcpy(out, p, vl);
			out[vl] = '\0';
			return 1;
		}
		line = end;
	}
	return 0;
}

/*
 * Read the head (status line and headers up to the blank line) into @b.
 * *@head_len: its length with the blank line; what follows is the body's start.
 */
int ezp__cli_read_head(int fd, struct ezp__cli_rbuf *b, size_t *head_len, unsigned *status,
		       int64_t deadline, const char *url, char *msg, size_t msg_len)
{
	char *end;
	int rc, minor;

	while (!b->data || !(end = strstr(b->data, "\r\n\r\n"))) {
		rc = read_more(fd, b, MAX_HEAD, deadline, url, msg, msg_len);
		if (rc < 0)
			return -1;
		if (rc == 0) {
			ezp__cli_say(msg, msg_len,
				     "the ezproxy API at %s closed the connection without an "
				     "answer",
				     url);
			return -1;
		}
	}
	*head_len = (size_t)(end - b->data) + 4;
	if (sscanf(b->data, "HTTP/1.%d %3u", &minor, status) != 2 || *status < 100 ||
	    *status > 599) {
		ezp__cli_say(msg, msg_len,
			     "the server at %s did not answer in HTTP; is --api really an "
			     "ezproxy API?",
			     url);
		return -1;
	}
	return 0;
}

void ezp__cli_reply_clear(struct ezp__cli_reply *r)
{
	free(r->body);
	memset(r, 0, sizeof(*r));
}

/* Move the body (what follows the head) of @b into @out. */
void ezp__cli_take_body(struct ezp__cli_rbuf *b, size_t head_len, size_t body_len, unsigned status,
			struct ezp__cli_reply *out)
{
	memmove(b->data, b->data + head_len, body_len);
	b->data[body_len] = '\0';
	out->status = status;
	out->body = b->data;
	out->body_len = body_len;
	b->data = NULL;
}

/*
 * Read the body after the head: Content-Length bytes, or up to EOF when
 * @to_eof and there is none. A chunked body is refused (we ask HTTP/1.0).
 */
int ezp__cli_read_body(int fd, struct ezp__cli_rbuf *b, size_t head_len, int to_eof,
		       int64_t deadline, const char *url, size_t *body_len, char *msg,
		       size_t msg_len)
{
	char v[64];
	unsigned long long cl = 0;
	int rc;

	if (ezp__cli_head_value(b->data, "Transfer-Encoding", v, sizeof(v)) &&
	    strcasecmp(v, "identity")) {
		ezp__cli_say(msg, msg_len,
			     "the ezproxy API at %s answered with Transfer-Encoding '%s', "
			     "which this client does not read",
			     url, v);
		return -1;
	}
	if (ezp__cli_head_value(b->data, "Content-Length", v, sizeof(v))) {
		char *e;

		errno = 0;
		cl = strtoull(v, &e, 10);
		if (errno || e == v || *e || cl > MAX_BODY) {
			ezp__cli_say(msg, msg_len,
				     "the ezproxy API at %s sent a bad or too large "
				     "Content-Length '%s'",
				     url, v);
			return -1;
		}
		while (b->len - head_len < cl) {
			rc = read_more(fd, b, head_len + cl, deadline, url, msg, msg_len);
			if (rc < 0)
				return -1;
			if (rc == 0) {
				ezp__cli_say(msg, msg_len,
					     "the ezproxy API at %s closed the connection "
					     "%llu bytes into a %llu-byte answer",
					     url, (unsigned long long)(b->len - head_len), cl);
				return -1;
			}
		}
		*body_len = (size_t)cl;
		return 0;
	}
	while (to_eof &&
	       (rc = read_more(fd, b, head_len + MAX_BODY, deadline, url, msg, msg_len)) != 0) {
		if (rc < 0)
			return -1;
	}
	*body_len = to_eof ? b->len - head_len : 0;
	return 0;
}

/* The key goes into a header line: refuse bytes that would end it. */
int ezp__cli_key_ok(const char *key, char *msg, size_t msg_len)
{
	for (const char *p = key; p && *p; p++) {
		if ((unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e) {
			ezp__cli_say(msg, msg_len,
				     "the key contains spaces or control characters; check "
				     "--key, $EZP_KEY or the key file");
			return 0;
		}
	}
	return 1;
}

int ezp__cli_http(const struct ezp__cli_api *api, const char *method, const char *path,
		  const char *body, struct ezp__cli_reply *out, char *msg, size_t msg_len)
{
	int64_t deadline = ezp__cli_now_ms() + REQUEST_MS;
	struct ezp__cli_rbuf b = {0};
	char *req = NULL;
	size_t req_len = 0, head_len, body_len;
	unsigned status;
	FILE *f;
	int fd = -1, rc = 1;

	if (!ezp__cli_key_ok(api->key, msg, msg_len))
		return 1;
	if (!(f = open_memstream(&req, &req_len))) {
		ezp__cli_say(msg, msg_len, "out of memory");
		return 1;
	}
	fprintf(f,
		"%s %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: ezproxy-cli/%s\r\n"
		"Accept: application/json\r\n",
		method, path, api->hostport, EZP_VERSION);
	if (api->key)
		fprintf(f, "Authorization: Bearer %s\r\n", api->key);
	if (body)
		fprintf(f, "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
			strlen(body), body);
	else
		fputs("\r\n", f);
	if (fclose(f) != 0 || !req) {
		ezp__cli_say(msg, msg_len, "out of memory");
		goto fail;
	}
	if ((fd = ezp__cli_connect(api, msg, msg_len)) < 0)
		goto fail;
	if (ezp__cli_send_all(fd, req, req_len, deadline, api->url, msg, msg_len) ||
	    ezp__cli_read_head(fd, &b, &head_len, &status, deadline, api->url, msg, msg_len) ||
	    ezp__cli_read_body(fd, &b, head_len, 1, deadline, api->url, &body_len, msg, msg_len))
		goto fail;
	ezp__cli_take_body(&b, head_len, body_len, status, out);
	rc = 0;
fail:
	if (fd >= 0)
		close(fd);
	free(req);
	free(b.data);
	return rc;
}
