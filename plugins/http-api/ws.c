/*
 * ws.c - WebSocket upgrades and framing for the http-api plugin: the
 * RFC 6455 handshake checks (method, Upgrade, Connection, version, key,
 * Origin, permission), the 101 answer through libmicrohttpd's upgrade
 * response, then wslay on the upgraded socket watched on the core's
 * service loop; a bounded outgoing queue (a slow reader loses events and
 * is told `lagged`, it never slows traffic or grows memory without bound);
 * closing, revocation (ws_close_key) and plugin stop (ws_close_all).
 * Thread: the service loop (api->w) - MHD runs there too - unless said.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <wslay/wslay.h>

#include "ws.h"

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define WS_UPGRADE_WAIT_MS 30000 /* a 101 sent but never taken over: give up */

static uint64_t ws_next_id;

/* A message made while the upgrade was pending. */
struct ws_early {
	struct ws_early *next;
	size_t len;
	char text[];
};

static void early_free(struct ws_conn *c)
{
	while (c->early) {
		struct ws_early *e = c->early;
		c->early = e->next;
		free(e);
	}
	c->early_tail = &c->early;
	c->early_n = c->early_bytes = 0;
}

static int early_add(struct ws_conn *c, const char *text, size_t len, enum ws_kind kind)
{
	struct ws_early *e;

	if (kind == WS_EVENT && (c->early_n >= WS_EARLY_MSGS || c->early_bytes >= WS_EARLY_BYTES)) {
		c->lag_dropped++;
		return -1;
	}
	e = malloc(sizeof(*e) + len);
	if (!e)
		return -1;
	e->next = NULL;
	e->len = len;
	memcpy(e->text, text, len);
	*c->early_tail = e;
	c->early_tail = &e->next;
	c->early_n++;
	c->early_bytes += len;
	return 0;
}

void ws_ref(struct ws_conn *c)
{
	atomic_fetch_add(&c->refs, 1);
}

void ws_unref(struct ws_conn *c)
{
	if (atomic_fetch_sub(&c->refs, 1) != 1)
		return;
	if (c->proto->free)
		c->proto->free(c);
	free(c);
}

static void list_remove(struct ws_conn *c)
{
	for (struct ws_conn **pp = &c->api->ws_list; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	c->next = NULL;
}

static void ws_stop_proto(struct ws_conn *c)
{
	if (c->stopped)
		return;
	c->stopped = true;
	c->proto->stop(c);
}

/* End @c now: release what the protocol holds, close the socket. */
static void ws_destroy(struct ws_conn *c)
{
	const struct ezp_core *core = c->api->core;

	if (c->state == WS_DEAD)
		return;
	c->state = WS_DEAD;
	list_remove(c);
	ws_stop_proto(c);
	if (c->timer)
		core->timer_free(c->timer);
	if (c->watch)
		core->watch_free(c->watch);
	if (c->wslay)
		wslay_event_context_free(c->wslay);
	if (c->urh) {
		/* the peer sees the end now; MHD closes the fd on its next run */
		(void)shutdown(c->fd, SHUT_RDWR);
		MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
	}
	early_free(c);
	free(c->extra);
	c->timer = NULL;
	c->watch = NULL;
	c->wslay = NULL;
	c->urh = NULL;
	c->extra = NULL;
	ws_unref(c);
}

static void ws_timer_fired(void *arg)
{
	ws_destroy(arg);
}

static void ws_stop_deferred(void *arg)
{
	struct ws_conn *c = arg;

	if (c->state == WS_PENDING)
		ws_destroy(c);
	else if (c->state != WS_DEAD)
		ws_stop_proto(c);
	ws_unref(c);
}

/* ---- the outgoing queue ---- */

static void ws_watch_update(struct ws_conn *c)
{
	unsigned ev = 0;

	if (c->state == WS_DEAD || !c->wslay)
		return;
	if (wslay_event_want_read(c->wslay))
		ev |= EZP_WATCH_READ;
	if (wslay_event_want_write(c->wslay))
		ev |= EZP_WATCH_WRITE;
	if (!ev) {
		ws_destroy(c);
		return;
	}
	if (ev != c->watch_events) {
		c->watch_events = ev;
		c->api->core->watch_set(c->watch, ev);
	}
}

/* Ask for WRITE without touching the read side (safe inside wslay callbacks). */
static void ws_want_write(struct ws_conn *c)
{
	if (c->watch && !(c->watch_events & EZP_WATCH_WRITE)) {
		c->watch_events |= EZP_WATCH_WRITE;
		c->api->core->watch_set(c->watch, c->watch_events);
	}
}

bool ws_congested(struct ws_conn *c)
{
	if (c->state == WS_PENDING && c->early_n < WS_EARLY_MSGS && c->early_bytes < WS_EARLY_BYTES)
		return false;
	if (!c->wslay || c->state != WS_OPEN) {
		c->lag_dropped += c->state == WS_PENDING;
		return true;
	}
	if (wslay_event_get_queued_msg_length(c->wslay) >= WS_SOFT_BYTES ||
	    wslay_event_get_queued_msg_count(c->wslay) >= WS_SOFT_MSGS) {
		c->lag_dropped++;
		return true;
	}
	return false;
}

/* Report dropped events once the queue is below half the soft limit. */
static void ws_report_lag(struct ws_conn *c)
{
	uint64_t n = c->lag_dropped;

	if (!n || c->state != WS_OPEN || !c->proto->lagged)
		return;
	if (wslay_event_get_queued_msg_length(c->wslay) > WS_SOFT_BYTES / 2 ||
	    wslay_event_get_queued_msg_count(c->wslay) > WS_SOFT_MSGS / 2)
		return;
	c->lag_dropped = 0;
	c->proto->lagged(c, n);
}

void ws_add_lagged(struct ws_conn *c, uint64_t n)
{
	c->lag_dropped += n;
	ws_report_lag(c);
}

int ws_send_text(struct ws_conn *c, const char *text, size_t len, enum ws_kind kind)
{
	struct wslay_event_msg m = {WSLAY_TEXT_FRAME, (const uint8_t *)text, len};
	size_t queued;

	if (c->state == WS_PENDING)
		return early_add(c, text, len, kind);
	if (!c->wslay || c->state != WS_OPEN)
		return -1;
	queued = wslay_event_get_queued_msg_length(c->wslay);
	if (kind == WS_EVENT && (queued >= WS_SOFT_BYTES ||
				 wslay_event_get_queued_msg_count(c->wslay) >= WS_SOFT_MSGS)) {
		c->lag_dropped++;
		return -1;
	}
	if (queued + len > WS_HARD_BYTES) {
		ws_close(c, WSLAY_CODE_POLICY_VIOLATION, "too slow: outgoing queue full");
		return -1;
	}
	if (wslay_event_queue_msg(c->wslay, &m) != 0) {
		ws_close(c, WSLAY_CODE_INTERNAL_SERVER_ERROR, "out of memory");
		return -1;
	}
	ws_want_write(c);
	return 0;
}

int ws_send_json(struct ws_conn *c, json_t *j, enum ws_kind kind)
{
	char *text;
	int rc = -1;

	if (!j)
		return -1;
	text = json_dumps(j, JSON_COMPACT);
	json_decref(j);
	if (text)
		rc = ws_send_text(c, text, strlen(text), kind);
	free(text);
	return rc;
}

void ws_close(struct ws_conn *c, uint16_t code, const char *reason)
{
	if (c->state == WS_CLOSING || c->state == WS_DEAD)
		return;
	if (c->state == WS_OPEN) {
		c->state = WS_CLOSING;
		wslay_event_queue_close(c->wslay, code, (const uint8_t *)reason,
					reason ? strlen(reason) : 0);
		ws_want_write(c);
		c->api->core->timer_start(c->timer, WS_CLOSE_WAIT_MS, 0);
	}
	/* stop the protocol soon, outside whatever callback we are in */
	if (!c->stop_queued) {
		c->stop_queued = true;
		ws_ref(c);
		if (c->api->core->defer(c->api->w, ws_stop_deferred, c) != EZP_OK)
			ws_unref(c);
	}
}

/* ---- wslay on the socket ---- */

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len, int flags,
			  void *user)
{
	struct ws_conn *c = user;
	ssize_t n;

	(void)flags;
	if (c->extra_off < c->extra_len) {
		size_t k = c->extra_len - c->extra_off;
		if (k > len)
			k = len;
		memcpy(buf, c->extra + c->extra_off, k);
		c->extra_off += k;
		return (ssize_t)k;
	}
	do {
		n = recv(c->fd, buf, len, 0);
	} while (n < 0 && errno == EINTR);
	if (n > 0)
		return n;
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
	else
		wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
	return -1;
}

static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data, size_t len, int flags,
			  void *user)
{
	struct ws_conn *c = user;
	ssize_t n;

	do {
		n = send(c->fd, data, len, MSG_NOSIGNAL | (flags & WSLAY_MSG_MORE ? MSG_MORE : 0));
	} while (n < 0 && errno == EINTR);
	if (n >= 0)
		return n;
	if (errno == EAGAIN || errno == EWOULDBLOCK)
		wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
	else
		wslay_event_set_error(ctx, WSLAY_ERR_CALLBACK_FAILURE);
	return -1;
}

static void ws_msg_cb(wslay_event_context_ptr ctx, const struct wslay_event_on_msg_recv_arg *arg,
		      void *user)
{
	struct ws_conn *c = user;

	(void)ctx;
	if (c->state != WS_OPEN)
		return;
	if (arg->opcode == WSLAY_TEXT_FRAME || arg->opcode == WSLAY_BINARY_FRAME)
		c->proto->message(c, arg->msg, arg->msg_length, arg->opcode == WSLAY_BINARY_FRAME);
	else if (arg->opcode == WSLAY_CONNECTION_CLOSE && !c->stop_queued)
		ws_close(c, 0, NULL); /* wslay already answered; stop the protocol */
}

static void ws_io(int fd, unsigned events, void *arg)
{
	struct ws_conn *c = arg;

	(void)fd;
	if (c->state == WS_DEAD)
		return;
	ws_ref(c);
	if ((events & EZP_WATCH_READ) && wslay_event_recv(c->wslay) != 0)
		goto dead;
	if (c->state != WS_DEAD && wslay_event_want_write(c->wslay) &&
	    wslay_event_send(c->wslay) != 0)
		goto dead;
	if (c->state == WS_CLOSING && wslay_event_get_close_received(c->wslay) &&
	    !wslay_event_want_write(c->wslay))
		goto dead;
	ws_report_lag(c);
	ws_watch_update(c);
	ws_unref(c);
	return;
dead:
	ws_destroy(c);
	ws_unref(c);
}

/* ---- the handshake ---- */

/* Does the comma-separated header value @v hold @token (case-insensitive)? */
static bool has_token(const char *v, const char *token)
{
	size_t n = strlen(token);

	while (v && *v) {
		while (*v == ' ' || *v == '\t' || *v == ',')
			v++;
		size_t k = strcspn(v, ",");
		size_t e = k;
		while (e > 0 && (v[e - 1] == ' ' || v[e - 1] == '\t'))
			e--;
		if (e == n && !strncasecmp(v, token, n))
			return true;
		v += k;
	}
	return false;
}

static bool key_ok(const char *key)
{
	unsigned char buf[32];
	size_t n = strlen(key);

	/* 16 random bytes in base64: 24 characters ending "==" */
	return n == 24 && key[22] == '=' && key[23] == '=' &&
	       EVP_DecodeBlock(buf, (const unsigned char *)key, 24) == 18;
}

static void accept_value(const char *key, char out[29])
{
	unsigned char sha[SHA_DIGEST_LENGTH];
	char in[128];
	int n = snprintf(in, sizeof(in), "%s" WS_GUID, key);

	SHA1((const unsigned char *)in, (size_t)n, sha);
	EVP_EncodeBlock((unsigned char *)out, sha, SHA_DIGEST_LENGTH);
}

/*
 * Origin: absent (a non-browser client), the page's own origin
 * (scheme + Host), or the configured extra origin.
 */
static bool origin_ok(struct api_req *r)
{
	const char *origin = api_header(r, "Origin"), *host = api_header(r, "Host");
	const char *scheme = r->api->tls ? "https://" : "http://";
	size_t sn = strlen(scheme);

	if (!origin)
		return true;
	if (host && !strncasecmp(origin, scheme, sn) && !strcasecmp(origin + sn, host))
		return true;
	return r->api->origin && *r->api->origin && !strcasecmp(origin, r->api->origin);
}

static struct ws_conn *find_pending(struct api *api, struct MHD_Connection *conn, uint64_t id)
{
	for (struct ws_conn *c = api->ws_list; c; c = c->next)
		if (c->state == WS_PENDING && c->mhd_conn == conn && (!id || c->id == id))
			return c;
	return NULL;
}

/* MHD sent the 101: take the socket over. */
static void ws_upgraded(void *cls, struct MHD_Connection *connection, void *req_cls,
			const char *extra_in, size_t extra_in_size, MHD_socket sock,
			struct MHD_UpgradeResponseHandle *urh)
{
	static const struct wslay_event_callbacks cbs = {
	    .recv_callback = ws_recv_cb,
	    .send_callback = ws_send_cb,
	    .on_msg_recv_callback = ws_msg_cb,
	};
	struct api *api = cls;
	const struct ezp_core *core = api->core;
	struct ws_conn *c = find_pending(api, connection, 0);
	wslay_event_context_ptr ctx = NULL;
	int one = 1, fl;

	(void)req_cls;
	if (!c || api->stopping) {
		MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
		return;
	}
	c->urh = urh;
	c->fd = sock;
	core->timer_stop(c->timer);
	fl = fcntl(sock, F_GETFL);
	if (fl < 0 || fcntl(sock, F_SETFL, fl | O_NONBLOCK) < 0)
		goto fail;
	(void)setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* TLS: a socketpair */
	if (extra_in_size) {
		c->extra = malloc(extra_in_size);
		if (!c->extra)
			goto fail;
		memcpy(c->extra, extra_in, extra_in_size);
		c->extra_len = extra_in_size;
	}
	if (wslay_event_context_server_init(&ctx, &cbs, c) != 0)
		goto fail;
	c->wslay = ctx;
	wslay_event_config_set_max_recv_msg_length(ctx, WS_MAX_MSG);
	c->watch_events = EZP_WATCH_READ | (extra_in_size ? EZP_WATCH_WRITE : 0);
	c->watch = core->watch_add(api->w, sock, c->watch_events, ws_io, c);
	if (!c->watch)
		goto fail;
	c->state = WS_OPEN;
	c->proto->open(c);
	for (struct ws_early *e = c->early; e && c->state == WS_OPEN; e = e->next) {
		struct wslay_event_msg m = {WSLAY_TEXT_FRAME, (const uint8_t *)e->text, e->len};
		if (wslay_event_queue_msg(c->wslay, &m) != 0)
			break;
	}
	early_free(c);
	if (extra_in_size && c->state == WS_OPEN)
		ws_io(sock, EZP_WATCH_READ, c); /* frames that came with the request */
	else
		ws_watch_update(c);
	return;
fail:
	core->log(EZP_LOG_WARN, "http-api", "WebSocket from %s: cannot take over the socket",
		  c->peer);
	ws_destroy(c);
}

static void peer_text(struct api_req *r, char *buf, size_t len)
{
	const union MHD_ConnectionInfo *ci =
	    MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
	struct ezp_addr a = {0};

	snprintf(buf, len, "?");
	if (!ci || !ci->client_addr)
		return;
	a.len = ci->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
						       : sizeof(struct sockaddr_in);
	memcpy(&a.ss, ci->client_addr, a.len);
	r->api->core->addr_format(&a, buf, len);
}

void ws_upgrade(struct api_req *r, int proto)
{
	struct api *api = r->api;
	const char *upgrade = api_header(r, "Upgrade"), *conn = api_header(r, "Connection");
	const char *version = api_header(r, "Sec-WebSocket-Version");
	const char *key = api_header(r, "Sec-WebSocket-Key");
	struct MHD_Response *resp = NULL;
	struct ws_conn *c = NULL;
	char accept[32];

	if (strcmp(r->method, "GET")) {
		api_error(r, 405, "method_not_allowed", "a WebSocket opens with GET");
		return;
	}
	if (!upgrade || !has_token(upgrade, "websocket") || !conn || !has_token(conn, "upgrade")) {
		api_error(r, 426, "upgrade_required",
			  "this is a WebSocket endpoint: send Upgrade: websocket and "
			  "Connection: Upgrade");
		goto need_upgrade;
	}
	if (!version || strcmp(version, "13")) {
		api_error(r, 426, "upgrade_required", "only WebSocket version 13 is supported");
		goto need_upgrade;
	}
	if (!key || !key_ok(key)) {
		api_error(r, 400, "bad_request", "Sec-WebSocket-Key must be 16 bytes in base64");
		return;
	}
	if (!origin_ok(r)) {
		api_error(
		    r, 403, "origin_not_allowed",
		    "Origin %.100s may not open this WebSocket (allowed: the page's own origin "
		    "or Api.Origin)",
		    api_header(r, "Origin"));
		return;
	}
	if (!(r->perms & EZP_PERM_USE_WEBSOCKET)) {
		api_error(r, 403, "forbidden", "this key lacks UseWebsocket");
		return;
	}
	if (api->stopping) {
		api_error(r, 503, "unavailable", "the API is stopping");
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		api_error(r, 500, "internal", "out of memory");
		return;
	}
	atomic_init(&c->refs, 1);
	c->early_tail = &c->early;
	c->api = api;
	c->id = ++ws_next_id;
	c->version = proto;
	c->fd = -1;
	c->mhd_conn = r->conn;
	c->perms = r->perms;
	c->proto = proto == 2 ? &ws_proto_v2 : &ws_proto_v3;
	snprintf(c->key_id, sizeof(c->key_id), "%s", r->key_id);
	peer_text(r, c->peer, sizeof(c->peer));
	c->timer = api->core->timer_new(api->w, ws_timer_fired, c);
	if (!c->timer) {
		api_error(r, 500, "internal", "out of memory");
		goto fail;
	}
	if (c->proto->prepare(c, r) != 0)
		goto fail; /* answered */
	resp = MHD_create_response_for_upgrade(ws_upgraded, api);
	accept_value(key, accept);
	if (!resp ||
	    MHD_add_response_header(resp, MHD_HTTP_HEADER_UPGRADE, "websocket") != MHD_YES ||
	    MHD_add_response_header(resp, "Sec-WebSocket-Accept", accept) != MHD_YES) {
		api_error(r, 500, "internal", "cannot build the upgrade response");
		goto fail;
	}
	/* a newer upgrade on the same MHD connection replaces a stale one */
	while (find_pending(api, r->conn, 0))
		ws_destroy(find_pending(api, r->conn, 0));
	c->next = api->ws_list;
	api->ws_list = c;
	api->core->timer_start(c->timer, WS_UPGRADE_WAIT_MS, 0);
	r->resp = resp;
	r->status = MHD_HTTP_SWITCHING_PROTOCOLS;
	return;
fail:
	if (resp)
		MHD_destroy_response(resp);
	c->stopped = true;
	if (c->proto->stop)
		c->proto->stop(c);
	if (c->timer)
		api->core->timer_free(c->timer);
	early_free(c);
	ws_unref(c);
	return;
need_upgrade:
	if (r->resp) {
		MHD_add_response_header(r->resp, MHD_HTTP_HEADER_UPGRADE, "websocket");
		MHD_add_response_header(r->resp, "Sec-WebSocket-Version", "13");
	}
}

/* ---- closing many ---- */

void ws_close_key(struct api *api, const char *key_id)
{
	struct ws_conn *c, *next;

	for (c = api->ws_list; c; c = next) {
		next = c->next;
		if (!strcmp(c->key_id, key_id))
			ws_close(c, WSLAY_CODE_POLICY_VIOLATION, "key revoked");
	}
}

void ws_close_all(struct api *api)
{
	while (api->ws_list) {
		struct ws_conn *c = api->ws_list;
		if (c->state == WS_OPEN) {
			wslay_event_queue_close(c->wslay, WSLAY_CODE_GOING_AWAY,
						(const uint8_t *)"server stopping", 15);
			(void)wslay_event_send(c->wslay); /* best effort: the socket closes now */
		}
		ws_destroy(c);
	}
}
