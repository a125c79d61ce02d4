/*
 * ws.h - the WebSocket side of the http-api plugin, between its files:
 *
 *   ws.c      upgrade handshake, wslay framing on the upgraded socket,
 *             the bounded outgoing queue, lifecycle and revocation
 *   ws_v3.c   the v3 socket protocol (/api/3/socket: watch and filter)
 *   ws_v2.c   the old /api/2/socket protocol
 *   ws_hold.c the held packets of a filtering socket (both protocols)
 *   ws_msg.c  pure parsers of client messages (jansson and b64.c only; fuzzed)
 *
 * Thread: the service loop (api->w) unless a function says otherwise.
 */
#ifndef EZP_HTTP_API_WS_H
#define EZP_HTTP_API_WS_H

#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "b64.h"

/* ---- client messages (ws_msg.c): no MHD or core dependency ---- */

#define WS_MAX_MSG (1u << 20) /* largest client message accepted */

enum ws3_type { WS3_VERDICT = 1, WS3_INJECT = 2, WS3_CLOSE = 3 };

/* WS3_DIR_BOTH has the value of EZP_DIR_BOTH (services.h). */
enum { WS3_DIR_TO_SERVER = 0, WS3_DIR_TO_CLIENT = 1, WS3_DIR_BOTH = 2 };
/* Verdict actions, the values of enum ezp_verdict (sdk.h). */
enum { WS3_PASS = 0, WS3_DROP = 1, WS3_REPLACE = 2 };

/* Why a client message was refused: an `error` frame's code, message, ref. */
struct ws_msg_err {
	char code[32];
	char message[200];
	json_t *ref; /* a reference the caller releases, or NULL */
};

/* A v3 client message. */
struct ws3_msg {
	int type;	     /* enum ws3_type */
	uint64_t seq;	     /* verdict */
	int action;	     /* verdict: WS3_PASS / WS3_DROP / WS3_REPLACE */
	unsigned char *data; /* verdict replace, inject: malloc'd (may be len 0) */
	size_t len;
	bool all;	  /* inject, close: session "all" */
	uint64_t session; /* inject, close: the session id when !all */
	char *pipeline;	  /* inject, close: malloc'd or NULL */
	int dir;	  /* inject: WS3_DIR_* */
	json_t *ref;	  /* the message's "id", echoed as `ref` in errors */
};

/*
 * Parse one v3 text message. 0 and *@out filled (release with
 * ws3_msg_clear), or -1 and @err filled (release err->ref). Codes:
 * bad_json, bad_message, missing_field, bad_field, unknown_type.
 */
int ws3_msg_parse(const char *text, size_t len, struct ws3_msg *out, struct ws_msg_err *err);
void ws3_msg_clear(struct ws3_msg *m);

/* An old (v2) client message {Type, Target, Data, Extra}: Go decoding rules. */
struct ws2_msg {
	int64_t type;
	int64_t target;
	unsigned char *data; /* malloc'd or NULL */
	size_t len;
	uint64_t extra;
};

/* 0 and *@out filled (ws2_msg_clear), or -1 with the old program's message. */
int ws2_msg_parse(const char *text, size_t len, struct ws2_msg *out, char *msg, size_t msg_len);
void ws2_msg_clear(struct ws2_msg *m);

#ifndef WS_MSG_ONLY
#include "api.h"

/* ---- one WebSocket (ws.c) ---- */

/* How a queued message may be treated when the client reads slowly. */
enum ws_kind {
	WS_REPLY = 0, /* hello, errors, lagged: always queued (up to the hard cap) */
	WS_EVENT = 1, /* a tap event: dropped and counted past the soft limit */
	WS_HELD = 2,  /* a packet waiting for a verdict: queued up to the hard cap */
};

#define WS_SOFT_BYTES (8u << 20) /* past this, WS_EVENT messages are dropped */
#define WS_SOFT_MSGS 20000u
#define WS_HARD_BYTES (32u << 20) /* past this the socket is closed (1008) */
#define WS_CLOSE_WAIT_MS 2000	  /* after our close frame, wait this for the peer's */
#define WS_EARLY_MSGS 1024u	  /* kept before the upgrade completes */
#define WS_EARLY_BYTES (1u << 20)

struct ws_conn;

/* What a protocol (v3, v2) does on a socket. Every callback runs on the service loop. */
struct ws_proto {
	/*
	 * Before the upgrade: read the query, check permissions, claim
	 * filters. On failure answer @r with the error and return -1.
	 */
	int (*prepare)(struct ws_conn *c, struct api_req *r);
	/* After the upgrade: hello, subscriptions, packets held meanwhile. */
	void (*open)(struct ws_conn *c);
	/* One whole message from the client (@binary: an opcode-2 message). */
	void (*message)(struct ws_conn *c, const uint8_t *msg, size_t len, bool binary);
	/* @dropped events were lost (queue full or tap lagged); the queue has room again. */
	void (*lagged)(struct ws_conn *c, uint64_t dropped);
	/* Release claims and taps. Called once, never from a tap callback. */
	void (*stop)(struct ws_conn *c);
	/* Free the protocol state (after stop; no callback refers to it any more). */
	void (*free)(struct ws_conn *c);
};

extern const struct ws_proto ws_proto_v3;
extern const struct ws_proto ws_proto_v2;

enum ws_state { WS_PENDING = 0, WS_OPEN = 1, WS_CLOSING = 2, WS_DEAD = 3 };

struct ws_conn {
	struct api *api;
	struct ws_conn *next; /* api->ws_list */
	const struct ws_proto *proto;
	void *ps;	      /* the protocol's state */
	struct ws_hold *hold; /* a filtering socket's claims (set by the protocol) */
	atomic_uint refs;     /* list + deferred work + claims */
	uint64_t id;	      /* names the pending upgrade (MHD closure) */
	enum ws_state state;
	int version; /* 3 or 2 */
	uint32_t perms;
	char key_id[17];
	char peer[EZP_ADDR_STRLEN];	 /* the client's address, for holder names and logs */
	struct MHD_Connection *mhd_conn; /* pending: the request's connection */
	/* after the upgrade */
	int fd;
	struct MHD_UpgradeResponseHandle *urh;
	void *wslay; /* wslay_event_context_ptr */
	struct ezp_watch *watch;
	unsigned watch_events;
	struct ezp_timer *timer; /* pending: upgrade deadline; closing: close wait */
	char *extra;		 /* bytes MHD read past the request */
	size_t extra_len, extra_off;
	bool stop_queued, stopped;
	/* outgoing queue accounting */
	uint64_t lag_dropped; /* events dropped, not yet reported */
	/* messages made before the upgrade completed (taps start before the 101) */
	struct ws_early *early, **early_tail;
	size_t early_n, early_bytes;
};

/*
 * Queue one text message. (transfer full) @j for ws_send_json. Returns 0,
 * or -1 when it was not queued (an event dropped past the soft limit, the
 * socket closing, or the hard cap hit, which closes the socket).
 */
int ws_send_text(struct ws_conn *c, const char *text, size_t len, enum ws_kind kind);
int ws_send_json(struct ws_conn *c, json_t *j, enum ws_kind kind);
/*
 * Is the queue past the soft limit? Call before building a WS_EVENT
 * message: when true the event counts as dropped and should not be built.
 */
bool ws_congested(struct ws_conn *c);
/* Add @n to the dropped count (a tap lagged) and report it when there is room. */
void ws_add_lagged(struct ws_conn *c, uint64_t n);
/* Send a close frame (@code, @reason) and end the socket; the protocol stops soon. */
void ws_close(struct ws_conn *c, uint16_t code, const char *reason);
/* Keep @c allocated (deferred work). Thread: any. */
void ws_ref(struct ws_conn *c);
/* Thread: the service loop (the last unref frees). */
void ws_unref(struct ws_conn *c);

/* ---- held packets of a filtering socket, both protocols (ws_hold.c) ---- */

/* Why ws_hold_take refused a verdict. */
enum ws_hold_miss { WS_HOLD_UNKNOWN = 1, WS_HOLD_ANSWERED = 2, WS_HOLD_EXPIRED = 3 };

struct ws_hold; /* the filter side of a socket (both protocols) */

/* One packet held for this socket, as the worker saw it. */
struct ws_held {
	struct ws_held *next; /* hash chain / pending list */
	struct ws_conn *c;
	uint64_t hold_id, seq, deadline_us, session_id;
	struct ezp_packet *pkt; /* a reference */
	uint8_t dir, leg;
	bool expired;
	char pipeline[72];
	char transport[16];
	struct ezp_addr src, dst;
};

struct ws_hold_opts {
	const char *pipeline; /* NULL: every pipeline with a `remote` filter */
	unsigned timeout_ms;  /* 0: the filter's HoldTimeoutMs */
	int default_verdict;  /* -1: the filter's Default */
	uint64_t first_seq;   /* v3 counts from 1, v2 (PktNum) from 0 */
	/* which pipelines to claim when @pipeline is NULL (NULL: all) */
	bool (*accept)(struct ws_conn *c, const struct ezp_pipeline_stats *p);
	/* a held packet got its seq (after the upgrade): show it */
	void (*on_held)(struct ws_conn *c, struct ws_held *h);
	/* optional: a held packet's time is up (the filter gave it the default) */
	void (*on_expired)(struct ws_conn *c, struct ws_held *h);
};

/*
 * Claim the `remote` filter of the pipeline(s) @o names. On failure the
 * error is answered on @r (409 filter_busy "filter held by ...", 404
 * pipeline_not_found / no_remote_filter) and NULL returned.
 */
struct ws_hold *ws_hold_new(struct ws_conn *c, struct api_req *r, const struct ws_hold_opts *o);
/* Names of the claimed pipelines (borrowed). */
size_t ws_hold_pipelines(struct ws_hold *hd, const char *const **names);
bool ws_hold_has(struct ws_hold *hd, const char *pipeline);
/* After the upgrade: deliver the packets held before it (on_held, in order). */
void ws_hold_open(struct ws_hold *hd);
/* The next per-socket sequence number for a frame that is not held. */
uint64_t ws_hold_next_seq(struct ws_hold *hd);
/*
 * Answer the held packet @seq. (transfer full) @repl with WS3_REPLACE.
 * 0 when answered; else an enum ws_hold_miss.
 */
int ws_hold_answer(struct ws_hold *hd, uint64_t seq, int verdict, struct ezp_packet *repl);
/* Forget held packets of a closed session. */
void ws_hold_session_closed(struct ws_hold *hd, uint64_t session_id);
/* Release the claims (held packets get the default at once). Idempotent. */
void ws_hold_stop(struct ws_hold *hd);
void ws_hold_free(struct ws_hold *hd);

/* ---- helpers shared by v3 and v2 (ws_v3.c) ---- */

/* Transport of a pipeline ("tcp", "udp", ...), cached per socket; "" when unknown. */
const char *ws_pipeline_transport(struct api *api, json_t **cache, const char *pipeline);
/* Close every session of @pipeline (NULL: all); one already gone is no error. */
void ws_close_sessions(struct api *api, const char *pipeline);
/* The start of both protocols' state (c->ps, malloc'd). */
struct ws_proto_base {
	struct ezp_tap *tap;
	json_t *transports; /* pipeline -> transport (ws_pipeline_transport's cache) */
};
/* The .stop of both: unsubscribe the tap and release the claims (ws_hold_stop). */
void ws_proto_stop(struct ws_conn *c);
/* Free the held packets (ws_hold_free), the cache and c->ps; the .free of v2. */
void ws_proto_free(struct ws_conn *c);

#endif /* WS_MSG_ONLY */
#endif
