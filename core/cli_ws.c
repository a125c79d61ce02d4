/*
 * cli_ws.c - the CLI's WebSocket client for `ezproxy watch`: the upgrade
 * request is written here (Sec-WebSocket-Accept checked with libcrypto
 * SHA-1 + base64), the framing is wslay's (client context, mask keys from
 * getrandom). See docs/decisions/0003-cli-http-client.md.
 * Thread: the CLI process's main thread. Every wait is bounded and lets
 * SIGINT/SIGTERM in once ezp__cli_signals_install() has run.
 */
#include <errno.h>
#include <openssl/evp.h>
#include <poll.h>
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

#include "cli_remote.h"

#define REQUEST_MS 30000
#define MAX_WS_MSG (8u << 20)
#define CLOSE_WAIT_MS 2000
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

struct ws {
	int fd;
	const char *pre; /* bytes read past the 101 head, fed to wslay first */
	size_t pre_len;
	int eof, err; /* recv saw EOF / an error (errno) */
	int (*on_text)(void *arg, const char *text, size_t len);
	void *arg;
	int handler_stop; /* on_text asked to stop */
	int we_closed;	  /* we sent the first close frame (a signal) */
	struct ezp__cli_ws_result *res;
};

static ssize_t ws_recv(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags, void *user)
{
	struct ws *ws = user;
	ssize_t n;

	(void)flags;
	if (ws->pre_len) {
		n = (ssize_t)(len < ws->pre_len ? len : ws->pre_len);
		memcpy(buf, ws->pre, (size_t)n);
		ws->pre += n;
		ws->pre_len -= (size_t)n;
		return n;
	}
	n = recv(ws->fd, buf, len, 0);
	if (n > 0)
		return n;
	if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
		wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
		return -1;
	}
	if (n == 0)
		ws->eof = 1;
	else
		ws->err = errno;
	wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
	return -1;
}

static ssize_t ws_send(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
		       void *user)
{
	struct ws *ws = user;
	ssize_t n;

	(void)flags;
	n = send(ws->fd, data, len, MSG_NOSIGNAL);
	if (n >= 0)
		return n;
	if (errno == EAGAIN || errno == EINTR) {
		wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
	} else {
		ws->err = errno;
		wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
	}
	return -1;
}

static int ws_genmask(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, void *user)
{
	(void)user;
	if (getrandom(buf, len, 0) != (ssize_t)len) {
		wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
		return -1;
	}
	return 0;
}

static void ws_on_msg(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
		      void *user)
{
	struct ws *ws = user;
	char *text;

	if (arg->opcode == WSLAY_CONNECTION_CLOSE) {
		size_t rl = arg->msg_length > 2 ? arg->msg_length - 2 : 0;

		ws->res->close_code = arg->status_code;
		if (rl >= sizeof(ws->res->reason))
			rl = sizeof(ws->res->reason) - 1;
		memcpy(ws->res->reason, arg->msg + 2 * (rl > 0), rl);
		ws->res->reason[rl] = '\0';
		ezp__cli_scrub(ws->res->reason);
		return;
	}
	if (arg->opcode != WSLAY_TEXT_FRAME || ws->handler_stop)
		return;
	/* wslay's buffer has no room for a NUL: copy (messages are small) */
	if (!(text = malloc(arg->msg_length + 1))) {
		ws->handler_stop = 1;
		snprintf(ws->res->reason, sizeof(ws->res->reason), "out of memory");
		wslay_event_queue_close(ctx, WSLAY_CODE_INTERNAL_SERVER_ERROR, NULL, 0);
		return;
	}
	memcpy(text, arg->msg, arg->msg_length);
	text[arg->msg_length] = '\0';
	if (ws->on_text(ws->arg, text, arg->msg_length)) {
		ws->handler_stop = 1;
		wslay_event_queue_close(ctx, WSLAY_CODE_NORMAL_CLOSURE, NULL, 0);
	}
	free(text);
}

/* Send the upgrade request and check the 101 answer. 0 open, 1 refused or failed. */
static int ws_handshake(int fd, const struct ezp__cli_api *api, const char *path,
			struct ezp__cli_rbuf *b, size_t *head_len, struct ezp__cli_reply *refusal,
			char *msg, size_t msg_len)
{
	int64_t deadline = ezp__cli_now_ms() + REQUEST_MS;
	unsigned char nonce[16], sha[EVP_MAX_MD_SIZE];
	char key[32], want[64], got[128], up[64], accept_src[96], req[2048];
	unsigned sha_len = 0, status;
	size_t body_len;
	int n;

	if (getrandom(nonce, sizeof(nonce), 0) != (ssize_t)sizeof(nonce)) {
		ezp__cli_say(msg, msg_len, "getrandom failed: %s", strerror(errno));
		return 1;
	}
	EVP_EncodeBlock((unsigned char *)key, nonce, sizeof(nonce));
	snprintf(accept_src, sizeof(accept_src), "%s%s", key, WS_GUID);
	if (!EVP_Digest(accept_src, strlen(accept_src), sha, &sha_len, EVP_sha1(), NULL)) {
		ezp__cli_say(msg, msg_len, "libcrypto cannot compute SHA-1");
		return 1;
	}
	EVP_EncodeBlock((unsigned char *)want, sha, (int)sha_len);
	n = snprintf(req, sizeof(req),
		     "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: ezproxy-cli/%s\r\n"
		     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
		     "Sec-WebSocket-Version: 13\r\n%s%s%s\r\n",
		     path, api->hostport, EZP_VERSION, key,
		     api->key ? "Authorization: Bearer " : "", api->key ? api->key : "",
		     api->key ? "\r\n" : "");
	if (n < 0 || (size_t)n >= sizeof(req)) {
		ezp__cli_say(msg, msg_len,
			     "the WebSocket request is too long (pipeline name or key)");
		return 1;
	}
	if (ezp__cli_send_all(fd, req, (size_t)n, deadline, api->url, msg, msg_len) ||
	    ezp__cli_read_head(fd, b, head_len, &status, deadline, api->url, msg, msg_len))
		return 1;
	if (status != 101) {
		/* HTTP/1.1 here: a body only with Content-Length */
		if (ezp__cli_read_body(fd, b, *head_len, 0, deadline, api->url, &body_len, msg,
				       msg_len))
			return 1;
		ezp__cli_take_body(b, *head_len, body_len, status, refusal);
		return 1;
	}
	if (!ezp__cli_head_value(b->data, "Upgrade", up, sizeof(up)) ||
	    strcasecmp(up, "websocket") ||
	    !ezp__cli_head_value(b->data, "Sec-WebSocket-Accept", got, sizeof(got)) ||
	    strcmp(got, want)) {
		ezp__cli_say(msg, msg_len,
			     "the server at %s answered the WebSocket upgrade without a valid "
			     "Sec-WebSocket-Accept; is --api really an ezproxy API?",
			     api->url);
		return 1;
	}
	return 0;
}

/* How the loop ended, from who closed first. */
static enum ezp__cli_ws_end ws_end(wslay_event_context_ptr ctx, const struct ws *ws, int lost)
{
	if (ws->handler_stop)
		return EZP__CLI_WS_HANDLER;
	if (ws->we_closed)
		return EZP__CLI_WS_STOPPED;
	if (wslay_event_get_close_received(ctx))
		return EZP__CLI_WS_CLOSED;
	return lost ? EZP__CLI_WS_LOST : EZP__CLI_WS_STOPPED;
}

static void ws_loop(wslay_event_context_ptr ctx, struct ws *ws)
{
	int64_t close_deadline = 0;
	int lost = 0;

	if (ws->pre_len && wslay_event_recv(ctx) != 0)
		lost = 1;
	while (!lost && (wslay_event_want_read(ctx) || wslay_event_want_write(ctx))) {
		struct pollfd p = {.fd = ws->fd};
		struct timespec ts = {.tv_sec = 0, .tv_nsec = 200 * 1000000};

		if (ezp__cli_stop && !close_deadline && !wslay_event_get_close_received(ctx)) {
			wslay_event_queue_close(ctx, WSLAY_CODE_NORMAL_CLOSURE, NULL, 0);
			ws->we_closed = !ws->handler_stop;
		}
		if ((ezp__cli_stop || ws->handler_stop || wslay_event_get_close_received(ctx)) &&
		    !close_deadline)
			close_deadline = ezp__cli_now_ms() + CLOSE_WAIT_MS;
		if (close_deadline && ezp__cli_now_ms() >= close_deadline)
			break;
		p.events = (short)((wslay_event_want_read(ctx) ? POLLIN : 0) |
				   (wslay_event_want_write(ctx) ? POLLOUT : 0));
		if (ppoll(&p, 1, &ts, ezp__cli_wait_mask()) <= 0)
			continue;
		if ((p.revents & (POLLIN | POLLERR | POLLHUP)) && wslay_event_want_read(ctx) &&
		    wslay_event_recv(ctx) != 0)
			lost = 1;
		else if ((p.revents & (POLLOUT | POLLERR | POLLHUP)) &&
			 wslay_event_want_write(ctx) && wslay_event_send(ctx) != 0)
			lost = 1;
		else if ((p.revents & (POLLERR | POLLHUP)) && !(p.revents & POLLIN) &&
			 !wslay_event_want_write(ctx))
			lost = 1;
	}
	ws->res->end = ws_end(ctx, ws, lost);
	if (ws->res->end == EZP__CLI_WS_LOST)
		snprintf(ws->res->reason, sizeof(ws->res->reason), "%s",
			 ws->eof   ? "the daemon closed the connection without a WebSocket close "
				     "frame"
			 : ws->err ? strerror(ws->err)
				   : "a malformed WebSocket frame");
}

int ezp__cli_ws_run(const struct ezp__cli_api *api, const char *path,
		    int (*on_text)(void *arg, const char *text, size_t len), void *arg,
		    struct ezp__cli_ws_result *res, struct ezp__cli_reply *refusal, char *msg,
		    size_t msg_len)
{
	static const struct wslay_event_callbacks cbs = {
	    .recv_callback = ws_recv,
	    .send_callback = ws_send,
	    .genmask_callback = ws_genmask,
	    .on_msg_recv_callback = ws_on_msg,
	};
	struct ws ws = {.fd = -1, .on_text = on_text, .arg = arg, .res = res};
	wslay_event_context_ptr ctx = NULL;
	struct ezp__cli_rbuf b = {0};
	size_t head_len = 0;
	int rc = 1;

	memset(res, 0, sizeof(*res));
	if (!ezp__cli_key_ok(api->key, msg, msg_len))
		return 1;
	if ((ws.fd = ezp__cli_connect(api, msg, msg_len)) < 0)
		goto fail;
	if (ws_handshake(ws.fd, api, path, &b, &head_len, refusal, msg, msg_len))
		goto fail;
	ws.pre = b.data + head_len;
	ws.pre_len = b.len - head_len;
	if (wslay_event_context_client_init(&ctx, &cbs, &ws) != 0) {
		ezp__cli_say(msg, msg_len, "out of memory");
		goto fail;
	}
	wslay_event_config_set_max_recv_msg_length(ctx, MAX_WS_MSG);
	ws_loop(ctx, &ws);
	rc = 0;
fail:
	if (ctx)
		wslay_event_context_free(ctx);
	if (ws.fd >= 0)
		close(ws.fd);
	free(b.data);
	return rc;
}
