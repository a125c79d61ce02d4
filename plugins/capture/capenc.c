/*
 * capenc.c - the capture encoder: tap events in, pcapng blocks out.
 *
 * Per session it keeps the transport and, per pair of addresses (a server
 * swap makes a new pair), a flow: the next TCP sequence number each way
 * and an IPv4 identification counter. TCP flows start with a synthesised
 * SYN / SYN-ACK / ACK (at the session's opening, or when a flow is first
 * seen mid-session) and end with FIN / FIN-ACK / ACK (RST when the server
 * could not be reached) at the session's close, so Wireshark's analysis
 * and "Follow TCP Stream" see a whole connection.
 *
 * Delivered bytes advance the sequence numbers. Dropped bytes do not: a
 * dropped packet is written with sequence numbers that end where the
 * delivered stream stands (as a retransmission of bytes already counted),
 * so every reassembler skips it and the stream holds exactly what was
 * delivered, while the frame still shows the dropped bytes and its comment.
 *
 * Thread: one at a time per encoder (no locking here).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capture.h"

#define ENC_BUCKETS_MIN 64
#define ENC_ORIG_MAX 16384 /* original bytes shown in a comment (hex: twice that) */

struct enc_flow {
	struct enc_flow *next;
	struct pcn_ep c, s;	 /* client, server */
	uint32_t next_c, next_s; /* next sequence number client->server, server->client */
	uint16_t ip_id;
};

struct enc_sess {
	struct enc_sess *next;
	uint64_t id;
	int transport;
	struct enc_flow *flows;
};

struct cap_enc {
	cap_sink_fn sink;
	void *ud;
	cap_transport_fn transport_fn;
	void *transport_ud;
	char *if_desc;
	struct pcn_buf blk; /* the block being made */
	struct enc_sess **buckets;
	size_t n_buckets, n_sess;
	uint64_t received, lost;
	char *comment; /* scratch */
	size_t comment_cap;
};

const char *cap_dir_name(int dir)
{
	return dir == EZP_DIR_TO_CLIENT ? "to_client" : "to_server";
}

int cap_transport_of(const char *name)
{
	if (!name || !*name)
		return CAP_T_UNKNOWN;
	return strcmp(name, "udp") == 0 ? CAP_T_UDP : CAP_T_TCP;
}

struct cap_enc *cap_enc_new(cap_sink_fn sink, void *ud, const char *if_desc)
{
	struct cap_enc *e = calloc(1, sizeof(*e));

	if (!e)
		return NULL;
	e->sink = sink;
	e->ud = ud;
	e->if_desc = strdup(if_desc ? if_desc : "");
	e->n_buckets = ENC_BUCKETS_MIN;
	e->buckets = calloc(e->n_buckets, sizeof(*e->buckets));
	if (!e->if_desc || !e->buckets) {
		cap_enc_free(e);
		return NULL;
	}
	return e;
}

static void sess_free(struct enc_sess *s)
{
	while (s->flows) {
		struct enc_flow *f = s->flows;
		s->flows = f->next;
		free(f);
	}
	free(s);
}

void cap_enc_free(struct cap_enc *e)
{
	if (!e)
		return;
	for (size_t i = 0; e->buckets && i < e->n_buckets; i++)
		while (e->buckets[i]) {
			struct enc_sess *s = e->buckets[i];
			e->buckets[i] = s->next;
			sess_free(s);
		}
	free(e->buckets);
	free(e->if_desc);
	free(e->comment);
	pcn_buf_free(&e->blk);
	free(e);
}

void cap_enc_set_transport_fn(struct cap_enc *e, cap_transport_fn fn, void *ud)
{
	e->transport_fn = fn;
	e->transport_ud = ud;
}

uint64_t cap_enc_received(const struct cap_enc *e)
{
	return e->received;
}

uint64_t cap_enc_lost_total(const struct cap_enc *e)
{
	return e->lost;
}

size_t cap_enc_sessions(const struct cap_enc *e)
{
	return e->n_sess;
}

/* Hand the block made in e->blk to the sink. */
static void emit(struct cap_enc *e)
{
	if (!e->blk.oom && e->blk.len)
		e->sink(e->ud, e->blk.p, e->blk.len);
	e->blk.len = 0;
	e->blk.oom = 0;
}

void cap_enc_header(struct cap_enc *e)
{
	pcn_shb(&e->blk, "EzProxy " CAP_VERSION " (synthesised headers: see docs/capture.md)");
	emit(e);
	pcn_idb(&e->blk, PCN_LINKTYPE_ETHERNET, "ezproxy", e->if_desc);
	emit(e);
}

void cap_enc_stats(struct cap_enc *e, uint64_t ts_us, const char *comment)
{
	pcn_isb(&e->blk, ts_us, e->received, e->lost, comment);
	emit(e);
}

void cap_enc_lost(struct cap_enc *e, uint64_t n, uint64_t ts_us, const char *why)
{
	char c[256];

	if (!n)
		return;
	e->lost += n;
	snprintf(c, sizeof(c), "%llu packet(s) or session event(s) lost here (%s); %llu in all",
		 (unsigned long long)n, why ? why : "the capture fell behind",
		 (unsigned long long)e->lost);
	cap_enc_stats(e, ts_us, c);
}

/* ---- sessions and flows ---- */

static size_t bucket_of(const struct cap_enc *e, uint64_t id)
{
	return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 32) & (e->n_buckets - 1);
}

static struct enc_sess *sess_find(struct cap_enc *e, uint64_t id)
{
	struct enc_sess *s;

	for (s = e->buckets[bucket_of(e, id)]; s; s = s->next)
		if (s->id == id)
			return s;
	return NULL;
}

static void sess_grow(struct cap_enc *e)
{
	size_t n = e->n_buckets * 2;
	struct enc_sess **b = calloc(n, sizeof(*b)), **old = e->buckets;
	size_t old_n = e->n_buckets;

	if (!b)
		return; /* longer chains, still correct */
	e->buckets = b;
	e->n_buckets = n;
	for (size_t i = 0; i < old_n; i++)
		while (old[i]) {
			struct enc_sess *s = old[i];
			size_t k = bucket_of(e, s->id);
			old[i] = s->next;
			s->next = b[k];
			b[k] = s;
		}
	free(old);
}

static struct enc_sess *sess_add(struct cap_enc *e, uint64_t id, int transport)
{
	struct enc_sess *s = calloc(1, sizeof(*s));
	size_t k;

	if (!s)
		return NULL;
	if (e->n_sess >= e->n_buckets)
		sess_grow(e);
	s->id = id;
	s->transport = transport ? transport : CAP_T_TCP;
	k = bucket_of(e, id);
	s->next = e->buckets[k];
	e->buckets[k] = s;
	e->n_sess++;
	return s;
}

static void sess_del(struct cap_enc *e, struct enc_sess *s)
{
	struct enc_sess **pp = &e->buckets[bucket_of(e, s->id)];

	while (*pp && *pp != s)
		pp = &(*pp)->next;
	if (*pp)
		*pp = s->next;
	e->n_sess--;
	sess_free(s);
}

/* Write one frame c->s (@from_client) or s->c. */
static void frame_out(struct cap_enc *e, struct enc_sess *s, struct enc_flow *f, int from_client,
		      uint32_t seq, uint32_t ack, uint8_t flags, const uint8_t *data, size_t len,
		      uint64_t ts_us, const char *comment)
{
	uint8_t hdr[PCN_MAX_HDR];
	struct pcn_frame fr = {
	    .proto = s->transport == CAP_T_UDP ? PCN_PROTO_UDP : PCN_PROTO_TCP,
	    .src = from_client ? &f->c : &f->s,
	    .dst = from_client ? &f->s : &f->c,
	    .src_is_client = from_client,
	    .seq = seq,
	    .ack = ack,
	    .tcp_flags = flags,
	    .ip_id = f->ip_id++,
	};
	size_t hl = pcn_frame(hdr, &fr, data, len);

	pcn_epb(&e->blk, ts_us, hdr, hl, data, len, comment);
	emit(e);
}

static void handshake(struct cap_enc *e, struct enc_sess *s, struct enc_flow *f, uint64_t ts_us,
		      const char *why)
{
	char c[200];
	uint32_t isn_c = f->next_c - 1, isn_s = f->next_s - 1;

	if (s->transport != CAP_T_TCP)
		return;
	snprintf(c, sizeof(c), "session %llu %s: synthesised handshake", (unsigned long long)s->id,
		 why);
	frame_out(e, s, f, 1, isn_c, 0, PCN_TCP_SYN, NULL, 0, ts_us, c);
	frame_out(e, s, f, 0, isn_s, f->next_c, PCN_TCP_SYN | PCN_TCP_ACK, NULL, 0, ts_us, c);
	frame_out(e, s, f, 1, f->next_c, f->next_s, PCN_TCP_ACK, NULL, 0, ts_us, c);
}

static struct enc_flow *flow_get(struct cap_enc *e, struct enc_sess *s,
				 const struct ezp_addr *client, const struct ezp_addr *server,
				 uint64_t ts_us, const char *why)
{
	struct pcn_ep c, sv;
	struct enc_flow *f;
	uint32_t isn;

	pcn_eps(&client->ss, &server->ss, &c, &sv);
	for (f = s->flows; f; f = f->next)
		if (!memcmp(&f->c, &c, sizeof(c)) && !memcmp(&f->s, &sv, sizeof(sv)))
			return f;
	f = calloc(1, sizeof(*f));
	if (!f)
		return NULL;
	f->c = c;
	f->s = sv;
	/* initial sequence numbers: fixed per session (and flow), not secret */
	isn = (uint32_t)((s->id + 1) * 0x9E3779B1u) ^ ((uint32_t)c.port << 16 | sv.port);
	f->next_c = isn + 1;
	f->next_s = (isn ^ 0x5bd1e995u) + 1;
	f->ip_id = (uint16_t)(s->id * 7);
	f->next = s->flows;
	s->flows = f;
	handshake(e, s, f, ts_us, why);
	return f;
}

void cap_enc_resync(struct cap_enc *e, uint64_t ts_us)
{
	for (size_t i = 0; i < e->n_buckets; i++)
		for (struct enc_sess *s = e->buckets[i]; s; s = s->next)
			for (struct enc_flow *f = s->flows; f; f = f->next)
				handshake(e, s, f, ts_us, "continues in this file");
}

/* ---- comments ---- */

static char *comment_room(struct cap_enc *e, size_t n)
{
	char *c;

	if (n <= e->comment_cap)
		return e->comment;
	c = realloc(e->comment, n);
	if (!c)
		return NULL;
	e->comment = c;
	e->comment_cap = n;
	return c;
}

/* "session 3 to_server; injected; dropped; replaced; original (5 bytes): 68656c6c6f" */
static const char *packet_comment(struct cap_enc *e, const struct cap_ev *ev)
{
	static const char hex[] = "0123456789abcdef";
	size_t shown = ev->orig ? (ev->orig_len < ENC_ORIG_MAX ? ev->orig_len : ENC_ORIG_MAX) : 0;
	char *c = comment_room(e, 200 + 2 * shown);
	size_t n;

	if (!c)
		return NULL;
	n = (size_t)snprintf(c, 200, "session %llu %s%s%s", (unsigned long long)ev->session_id,
			     cap_dir_name(ev->dir),
			     ev->flags & EZP_PKT_INJECTED ? "; injected" : "",
			     ev->flags & EZP_PKT_DROPPED ? "; dropped" : "");
	if (ev->orig) {
		n += (size_t)snprintf(c + n, 120,
				      "; replaced; original (%zu bytes%s): ", ev->orig_len,
				      shown < ev->orig_len ? ", the first shown" : "");
		for (size_t i = 0; i < shown; i++) {
			c[n++] = hex[ev->orig[i] >> 4];
			c[n++] = hex[ev->orig[i] & 15];
		}
		c[n] = '\0';
	} else if (ev->flags & EZP_PKT_REPLACED) {
		snprintf(c + n, 40, "; replaced");
	}
	return c;
}

/* ---- events ---- */

static void on_packet(struct cap_enc *e, const struct cap_ev *ev)
{
	struct enc_sess *s = sess_find(e, ev->session_id);
	int to_server = ev->dir == EZP_DIR_TO_SERVER;
	int dropped = (ev->flags & EZP_PKT_DROPPED) != 0;
	const char *base;
	struct enc_flow *f;
	size_t max, n_parts, off = 0;
	uint32_t *next, ack;

	e->received++;
	if (!s) {
		int t = e->transport_fn
			    ? e->transport_fn(e->transport_ud, ev->pipeline, ev->session_id)
			    : CAP_T_UNKNOWN;
		s = sess_add(e, ev->session_id, t);
		if (!s)
			return;
	}
	f = flow_get(e, s, to_server ? &ev->src : &ev->dst, to_server ? &ev->dst : &ev->src,
		     ev->ts_us, "seen mid-session");
	base = packet_comment(e, ev);
	if (!f || !base)
		return;
	max = pcn_max_payload(s->transport == CAP_T_UDP ? PCN_PROTO_UDP : PCN_PROTO_TCP, f->c.v6);
	n_parts = ev->len ? (ev->len + max - 1) / max : 1;
	next = to_server ? &f->next_c : &f->next_s;
	ack = to_server ? f->next_s : f->next_c;
	for (size_t part = 0; part < n_parts; part++) {
		size_t len = ev->len - off < max ? ev->len - off : max;
		char pc[300];
		const char *comment = base;
		uint32_t seq = dropped ? *next - (uint32_t)ev->len + (uint32_t)off : *next;
		if (n_parts > 1) {
			/* the first part carries the whole comment, later ones a short one */
			if (part > 0) {
				snprintf(pc, sizeof(pc), "session %llu %s%s; part %zu/%zu",
					 (unsigned long long)ev->session_id, cap_dir_name(ev->dir),
					 dropped ? "; dropped" : "", part + 1, n_parts);
				comment = pc;
			} else {
				size_t bl = strlen(base);
				char *c = comment_room(e, bl + 40);
				if (c)
					snprintf(c + bl, 40, "; part 1/%zu", n_parts);
				comment = c ? c : base;
			}
		}
		frame_out(e, s, f, to_server, seq, ack,
			  len ? PCN_TCP_PSH | PCN_TCP_ACK : PCN_TCP_ACK,
			  ev->data ? ev->data + off : NULL, len, ev->ts_us, comment);
		if (!dropped && s->transport == CAP_T_TCP)
			*next += (uint32_t)len;
		off += len;
	}
}

static const char *close_reason_text(int reason)
{
	switch (reason) {
	case EZP_CLOSE_CLIENT:
		return "the client closed";
	case EZP_CLOSE_SERVER:
		return "the server closed";
	case EZP_CLOSE_IDLE:
		return "idle timeout";
	case EZP_CLOSE_API:
		return "closed by the API, a script or the embedder";
	case EZP_CLOSE_ERROR:
		return "error";
	case EZP_CLOSE_CONNECT_FAILED:
		return "the server could not be reached";
	case EZP_CLOSE_SHUTDOWN:
		return "the daemon or pipeline stopped";
	case EZP_CLOSE_LIMIT:
		return "a limit was hit";
	default:
		return "ended";
	}
}

static void on_closed(struct cap_enc *e, const struct cap_ev *ev)
{
	struct enc_sess *s = sess_find(e, ev->session_id);
	char c[300];

	if (!s)
		return;
	snprintf(c, sizeof(c), "session %llu closed: %s%s%s", (unsigned long long)s->id,
		 close_reason_text(ev->close_reason), ev->close_text && *ev->close_text ? ": " : "",
		 ev->close_text ? ev->close_text : "");
	for (struct enc_flow *f = s->flows; s->transport == CAP_T_TCP && f; f = f->next) {
		int server_first = ev->close_reason == EZP_CLOSE_SERVER;
		if (ev->close_reason == EZP_CLOSE_CONNECT_FAILED) {
			frame_out(e, s, f, 0, f->next_s, f->next_c, PCN_TCP_RST | PCN_TCP_ACK, NULL,
				  0, ev->ts_us, c);
			continue;
		}
		if (server_first) {
			frame_out(e, s, f, 0, f->next_s, f->next_c, PCN_TCP_FIN | PCN_TCP_ACK, NULL,
				  0, ev->ts_us, c);
			f->next_s++;
			frame_out(e, s, f, 1, f->next_c, f->next_s, PCN_TCP_FIN | PCN_TCP_ACK, NULL,
				  0, ev->ts_us, c);
			f->next_c++;
			frame_out(e, s, f, 0, f->next_s, f->next_c, PCN_TCP_ACK, NULL, 0, ev->ts_us,
				  c);
		} else {
			frame_out(e, s, f, 1, f->next_c, f->next_s, PCN_TCP_FIN | PCN_TCP_ACK, NULL,
				  0, ev->ts_us, c);
			f->next_c++;
			frame_out(e, s, f, 0, f->next_s, f->next_c, PCN_TCP_FIN | PCN_TCP_ACK, NULL,
				  0, ev->ts_us, c);
			f->next_s++;
			frame_out(e, s, f, 1, f->next_c, f->next_s, PCN_TCP_ACK, NULL, 0, ev->ts_us,
				  c);
		}
	}
	sess_del(e, s);
}

void cap_enc_event(struct cap_enc *e, const struct cap_ev *ev)
{
	struct enc_sess *s;

	switch (ev->type) {
	case EZP_TAP_PACKET:
		on_packet(e, ev);
		break;
	case EZP_TAP_SESSION_OPENED:
		s = sess_find(e, ev->session_id);
		if (!s)
			s = sess_add(e, ev->session_id, ev->transport);
		if (s)
			flow_get(e, s, &ev->client, &ev->server,
				 ev->opened_us ? ev->opened_us : ev->ts_us, "opened");
		break;
	case EZP_TAP_SESSION_CLOSED:
		on_closed(e, ev);
		break;
	default: /* changed: a new pair of addresses makes a new flow at its first packet */
		break;
	}
}
