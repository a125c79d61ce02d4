/*
 * test_pcapng.c - the capture plugin's pcapng writer and encoder, without a
 * daemon: block layout (lengths, alignment, options), synthesised headers
 * and their checksums, and the encoder's TCP sequence numbers, handshakes,
 * FINs, comments, splitting, drops and losses. Builds plugins/capture's
 * pcapng.c and capenc.c directly. Thread: the test's only one.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../plugins/capture/capture.h" /* not tests/unit/capture.h */

static uint32_t rd32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t rd16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Every block well formed: lengths equal at both ends, a multiple of 4. */
static void check_block(const uint8_t *b, size_t len)
{
	uint32_t total = rd32(b + 4);

	assert_int_equal(total, len);
	assert_int_equal(total % 4, 0);
	assert_int_equal(rd32(b + total - 4), total);
}

/* The value of option @code in the options at @opt..@end, or NULL. */
static const uint8_t *find_opt(const uint8_t *opt, const uint8_t *end, uint16_t code, uint16_t *len)
{
	while (opt + 4 <= end) {
		uint16_t c = rd16(opt), n = rd16(opt + 2);
		if (c == 0)
			return NULL;
		if (c == code) {
			*len = n;
			return opt + 4;
		}
		opt += 4 + ((n + 3u) & ~3u);
	}
	return NULL;
}

static void test_shb_idb_isb(void **state)
{
	struct pcn_buf b = {0};
	const uint8_t *v;
	uint16_t n;

	(void)state;
	pcn_shb(&b, "app");
	check_block(b.p, b.len);
	assert_int_equal(rd32(b.p), PCN_BT_SHB);
	assert_int_equal(rd32(b.p + 8), 0x1A2B3C4D);
	assert_int_equal(rd16(b.p + 12), 1);
	assert_int_equal(rd16(b.p + 14), 0);
	assert_int_equal(rd32(b.p + 16), 0xffffffffu);
	assert_int_equal(rd32(b.p + 20), 0xffffffffu);
	v = find_opt(b.p + 24, b.p + b.len - 4, 4, &n);
	assert_non_null(v);
	assert_int_equal(n, 3);
	assert_memory_equal(v, "app", 3);
	b.len = 0;

	pcn_idb(&b, PCN_LINKTYPE_ETHERNET, "ezproxy", "desc");
	check_block(b.p, b.len);
	assert_int_equal(rd32(b.p), PCN_BT_IDB);
	assert_int_equal(rd16(b.p + 8), 1);
	assert_int_equal(rd32(b.p + 12), 0);
	v = find_opt(b.p + 16, b.p + b.len - 4, 9, &n);
	assert_non_null(v);
	assert_int_equal(n, 1);
	assert_int_equal(v[0], 6);
	v = find_opt(b.p + 16, b.p + b.len - 4, 2, &n);
	assert_int_equal(n, 7);
	assert_memory_equal(v, "ezproxy", 7);
	b.len = 0;

	pcn_isb(&b, 0x123456789ull, 7, 3, "lost");
	check_block(b.p, b.len);
	assert_int_equal(rd32(b.p), PCN_BT_ISB);
	assert_int_equal(rd32(b.p + 12), 0x1);
	assert_int_equal(rd32(b.p + 16), 0x23456789);
	v = find_opt(b.p + 20, b.p + b.len - 4, 5, &n);
	assert_int_equal(n, 8);
	assert_int_equal(rd32(v), 3);
	v = find_opt(b.p + 20, b.p + b.len - 4, 4, &n);
	assert_int_equal(rd32(v), 7);
	v = find_opt(b.p + 20, b.p + b.len - 4, 1, &n);
	assert_memory_equal(v, "lost", 4);
	pcn_buf_free(&b);
}

static void test_epb(void **state)
{
	struct pcn_buf b = {0};
	const uint8_t hdr[3] = {1, 2, 3}, pl[2] = {4, 5};
	uint16_t n;
	const uint8_t *v;

	(void)state;
	pcn_epb(&b, 1700000000123456ull, hdr, 3, pl, 2, "hi there");
	check_block(b.p, b.len);
	assert_int_equal(rd32(b.p), PCN_BT_EPB);
	assert_int_equal(rd32(b.p + 8), 0);
	assert_int_equal(((uint64_t)rd32(b.p + 12) << 32) | rd32(b.p + 16), 1700000000123456ull);
	assert_int_equal(rd32(b.p + 20), 5);
	assert_int_equal(rd32(b.p + 24), 5);
	assert_memory_equal(b.p + 28, "\1\2\3\4\5\0\0\0", 8); /* padded to 32 bits */
	v = find_opt(b.p + 36, b.p + b.len - 4, PCN_OPT_COMMENT, &n);
	assert_int_equal(n, 8);
	assert_memory_equal(v, "hi there", 8);
	b.len = 0;
	pcn_epb(&b, 1, NULL, 0, NULL, 0, NULL); /* no data, no options */
	check_block(b.p, b.len);
	assert_int_equal(b.len, 32);
	pcn_buf_free(&b);
}

static void addr4(struct sockaddr_storage *ss, const char *ip, uint16_t port)
{
	struct sockaddr_in *in = (struct sockaddr_in *)ss;

	memset(ss, 0, sizeof(*ss));
	in->sin_family = AF_INET;
	in->sin_port = htons(port);
	inet_pton(AF_INET, ip, &in->sin_addr);
}

static void addr6(struct sockaddr_storage *ss, const char *ip, uint16_t port)
{
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;

	memset(ss, 0, sizeof(*ss));
	in6->sin6_family = AF_INET6;
	in6->sin6_port = htons(port);
	inet_pton(AF_INET6, ip, &in6->sin6_addr);
}

/* The TCP/UDP checksum over pseudo header + segment verifies to zero. */
static void verify_l4(const uint8_t *frame, size_t len)
{
	int v6 = frame[12] == 0x86;
	const uint8_t *ip = frame + 14, *l4 = ip + (v6 ? 40 : 20);
	size_t alen = v6 ? 16 : 4, l4len = len - (size_t)(l4 - frame);
	uint32_t sum = pcn_sum(0, ip + (v6 ? 8 : 12), 2 * alen);

	sum += v6 ? ip[6] : ip[9];
	sum += (uint32_t)l4len;
	sum = pcn_sum(sum, l4, l4len);
	assert_int_equal(pcn_fold(sum), 0);
	if (!v6)
		assert_int_equal(pcn_fold(pcn_sum(0, ip, 20)), 0);
}

static void test_frames(void **state)
{
	struct sockaddr_storage a, b;
	struct pcn_ep ea, eb;
	uint8_t frame[PCN_MAX_HDR + 64];
	const uint8_t pl[5] = "hello";
	size_t hl;
	struct pcn_frame f = {.proto = PCN_PROTO_TCP,
			      .src = &ea,
			      .dst = &eb,
			      .src_is_client = 1,
			      .seq = 1000,
			      .ack = 77,
			      .tcp_flags = PCN_TCP_PSH | PCN_TCP_ACK,
			      .ip_id = 9};

	(void)state;
	addr4(&a, "127.0.0.1", 40000);
	addr4(&b, "10.1.2.3", 5555);
	pcn_eps(&a, &b, &ea, &eb);
	assert_int_equal(ea.v6, 0);
	hl = pcn_frame(frame, &f, pl, 5);
	assert_int_equal(hl, 54);
	memcpy(frame + hl, pl, 5);
	assert_int_equal(frame[12], 0x08);
	assert_int_equal(frame[11], 1); /* source MAC: the client's */
	assert_int_equal(frame[14], 0x45);
	assert_int_equal(frame[14 + 9], 6);
	assert_int_equal(be32(frame + 34 + 4), 1000);
	assert_int_equal(be32(frame + 34 + 8), 77);
	assert_int_equal(frame[34 + 13], PCN_TCP_PSH | PCN_TCP_ACK);
	verify_l4(frame, hl + 5);

	/* IPv6 with an IPv4 peer: both IPv6, the IPv4 one mapped */
	addr6(&a, "::1", 1234);
	pcn_eps(&a, &b, &ea, &eb);
	assert_int_equal(ea.v6, 1);
	assert_int_equal(eb.v6, 1);
	assert_int_equal(eb.addr[10], 0xff);
	assert_int_equal(eb.addr[12], 10);
	f.proto = PCN_PROTO_UDP;
	f.src_is_client = 0;
	hl = pcn_frame(frame, &f, pl, 5);
	assert_int_equal(hl, 14 + 40 + 8);
	memcpy(frame + hl, pl, 5);
	assert_int_equal(frame[12], 0x86);
	assert_int_equal(frame[11], 2);
	verify_l4(frame, hl + 5);

	/* IPv4-mapped IPv6 on both sides: plain IPv4 */
	addr6(&a, "::ffff:127.0.0.1", 1);
	addr6(&b, "::ffff:127.0.0.2", 2);
	pcn_eps(&a, &b, &ea, &eb);
	assert_int_equal(ea.v6, 0);
	assert_int_equal(eb.addr[3], 2);
	f.proto = PCN_PROTO_UDP;
	hl = pcn_frame(frame, &f, pl, 4); /* even and odd lengths */
	memcpy(frame + hl, pl, 4);
	verify_l4(frame, hl + 4);
	/* an unknown family is 0.0.0.0:0 */
	memset(&a, 0, sizeof(a));
	pcn_eps(&a, &b, &ea, &eb);
	assert_int_equal(ea.port, 0);
	assert_int_equal(pcn_max_payload(PCN_PROTO_TCP, 0), 65495);
	assert_int_equal(pcn_max_payload(PCN_PROTO_UDP, 1), 65527);
}

/* ---- the encoder ---- */

#define MAX_BLOCKS 64

struct sink {
	uint8_t *blk[MAX_BLOCKS];
	size_t len[MAX_BLOCKS];
	size_t n;
};

static void sink_fn(void *ud, const uint8_t *block, size_t len)
{
	struct sink *s = ud;

	check_block(block, len);
	assert_true(s->n < MAX_BLOCKS);
	s->blk[s->n] = malloc(len);
	memcpy(s->blk[s->n], block, len);
	s->len[s->n++] = len;
}

static void sink_clear(struct sink *s)
{
	for (size_t i = 0; i < s->n; i++)
		free(s->blk[i]);
	s->n = 0;
}

/* Frame i: its TCP seq, flags, payload length and comment. */
struct fr {
	uint32_t seq, ack;
	uint8_t flags;
	size_t plen;
	char comment[40000]; /* a 16 KiB original is 32 KiB of hex */
	int udp;
	int from_client;
};

static struct fr frame_of(struct sink *s, size_t i)
{
	struct fr r;
	const uint8_t *b = s->blk[i], *f = b + 28, *ip, *l4, *v;
	uint32_t caplen = rd32(b + 20);
	uint16_t n;
	size_t iplen, l4len;

	memset(&r, 0, sizeof(r));
	assert_int_equal(rd32(b), PCN_BT_EPB);
	verify_l4(f, caplen);
	ip = f + 14;
	iplen = f[12] == 0x86 ? 40 : 20;
	l4 = ip + iplen;
	r.udp = (f[12] == 0x86 ? ip[6] : ip[9]) == 17;
	l4len = r.udp ? 8 : 20;
	r.plen = caplen - 14 - iplen - l4len;
	r.from_client = f[11] == 1;
	if (!r.udp) {
		r.seq = be32(l4 + 4);
		r.ack = be32(l4 + 8);
		r.flags = l4[13];
	}
	v = find_opt(b + 28 + ((caplen + 3) & ~3u), b + s->len[i] - 4, PCN_OPT_COMMENT, &n);
	if (v)
		snprintf(r.comment, sizeof(r.comment), "%.*s", (int)n, (const char *)v);
	return r;
}

static struct cap_ev ev_session(int type, uint64_t id, int transport)
{
	struct cap_ev ev;

	memset(&ev, 0, sizeof(ev));
	ev.type = type;
	ev.session_id = id;
	ev.transport = transport;
	ev.ts_us = 1000;
	addr4(&ev.client.ss, "127.0.0.1", 40000);
	addr4(&ev.server.ss, "127.0.0.1", 5555);
	ev.client.len = ev.server.len = sizeof(struct sockaddr_in);
	return ev;
}

static struct cap_ev ev_packet(uint64_t id, int dir, const void *data, size_t len, uint32_t flags)
{
	struct cap_ev ev = ev_session(EZP_TAP_PACKET, id, 0);

	ev.dir = dir;
	ev.data = data;
	ev.len = len;
	ev.flags = flags;
	ev.src = dir == EZP_DIR_TO_SERVER ? ev.client : ev.server;
	ev.dst = dir == EZP_DIR_TO_SERVER ? ev.server : ev.client;
	return ev;
}

static void test_encoder_tcp(void **state)
{
	struct sink s = {0};
	struct cap_enc *e = cap_enc_new(sink_fn, &s, "test");
	struct cap_ev ev;
	struct fr f, syn, synack;
	uint32_t c_next, s_next;
	uint8_t *big;

	(void)state;
	cap_enc_header(e);
	assert_int_equal(s.n, 2);
	assert_int_equal(rd32(s.blk[0]), PCN_BT_SHB);
	assert_int_equal(rd32(s.blk[1]), PCN_BT_IDB);
	sink_clear(&s);

	ev = ev_session(EZP_TAP_SESSION_OPENED, 3, CAP_T_TCP);
	cap_enc_event(e, &ev);
	assert_int_equal(s.n, 3);
	syn = frame_of(&s, 0);
	synack = frame_of(&s, 1);
	assert_int_equal(syn.flags, PCN_TCP_SYN);
	assert_true(syn.from_client);
	assert_int_equal(synack.flags, PCN_TCP_SYN | PCN_TCP_ACK);
	assert_int_equal(synack.ack, syn.seq + 1);
	assert_string_equal(syn.comment, "session 3 opened: synthesised handshake");
	c_next = syn.seq + 1;
	s_next = synack.seq + 1;
	assert_int_equal(frame_of(&s, 2).flags, PCN_TCP_ACK);
	assert_int_equal(cap_enc_sessions(e), 1);
	sink_clear(&s);

	/* delivered bytes advance the sequence numbers */
	ev = ev_packet(3, EZP_DIR_TO_SERVER, "hello", 5, 0);
	cap_enc_event(e, &ev);
	f = frame_of(&s, 0);
	assert_int_equal(f.seq, c_next);
	assert_int_equal(f.ack, s_next);
	assert_int_equal(f.plen, 5);
	assert_string_equal(f.comment, "session 3 to_server");
	c_next += 5;
	/* dropped bytes do not: they end where the stream stands */
	ev = ev_packet(3, EZP_DIR_TO_SERVER, "DROPME", 6, EZP_PKT_DROPPED);
	cap_enc_event(e, &ev);
	f = frame_of(&s, 1);
	assert_int_equal(f.seq, c_next - 6);
	assert_string_equal(f.comment, "session 3 to_server; dropped");
	/* replaced: the new bytes, the original in the comment (hex) */
	ev = ev_packet(3, EZP_DIR_TO_CLIENT, "new", 3, EZP_PKT_REPLACED);
	ev.orig = (const uint8_t *)"\x01\xab";
	ev.orig_len = 2;
	cap_enc_event(e, &ev);
	f = frame_of(&s, 2);
	assert_int_equal(f.seq, s_next);
	assert_false(f.from_client);
	assert_string_equal(f.comment, "session 3 to_client; replaced; original (2 bytes): 01ab");
	s_next += 3;
	ev = ev_packet(3, EZP_DIR_TO_CLIENT, "", 0, EZP_PKT_REPLACED | EZP_PKT_INJECTED);
	cap_enc_event(e, &ev);
	f = frame_of(&s, 3);
	assert_int_equal(f.flags, PCN_TCP_ACK);
	assert_int_equal(f.plen, 0);
	assert_string_equal(f.comment, "session 3 to_client; injected; replaced");
	sink_clear(&s);

	/* larger than a frame: parts, in sequence; a long original shown in part */
	big = calloc(1, 140000);
	ev = ev_packet(3, EZP_DIR_TO_SERVER, big, 140000, EZP_PKT_REPLACED);
	ev.orig = big;
	ev.orig_len = 20000;
	cap_enc_event(e, &ev);
	assert_int_equal(s.n, 3);
	assert_int_equal(frame_of(&s, 0).seq, c_next);
	assert_int_equal(frame_of(&s, 1).seq, c_next + 65495);
	assert_int_equal(frame_of(&s, 2).plen, 140000 - 2 * 65495);
	assert_non_null(strstr(frame_of(&s, 0).comment, "original (20000 bytes, the first shown)"));
	assert_non_null(strstr(frame_of(&s, 0).comment, "; part 1/3"));
	assert_string_equal(frame_of(&s, 2).comment, "session 3 to_server; part 3/3");
	c_next += 140000;
	sink_clear(&s);
	/* a dropped large one: every part before the stream's position */
	ev = ev_packet(3, EZP_DIR_TO_SERVER, big, 70000, EZP_PKT_DROPPED);
	cap_enc_event(e, &ev);
	assert_int_equal(frame_of(&s, 0).seq, c_next - 70000);
	assert_int_equal(frame_of(&s, 1).seq, c_next - 70000 + 65495);
	assert_string_equal(frame_of(&s, 1).comment, "session 3 to_server; dropped; part 2/2");
	free(big);
	sink_clear(&s);

	/* a new file: every open flow gets a handshake that continues it */
	cap_enc_resync(e, 5);
	assert_int_equal(s.n, 3);
	assert_int_equal(frame_of(&s, 0).seq, c_next - 1);
	assert_int_equal(frame_of(&s, 1).seq, s_next - 1);
	assert_string_equal(frame_of(&s, 0).comment,
			    "session 3 continues in this file: synthesised handshake");
	sink_clear(&s);

	/* the server closed first */
	ev = ev_session(EZP_TAP_SESSION_CLOSED, 3, CAP_T_TCP);
	ev.close_reason = EZP_CLOSE_SERVER;
	ev.close_text = "bye";
	cap_enc_event(e, &ev);
	assert_int_equal(s.n, 3);
	f = frame_of(&s, 0);
	assert_false(f.from_client);
	assert_int_equal(f.flags, PCN_TCP_FIN | PCN_TCP_ACK);
	assert_int_equal(f.seq, s_next);
	assert_int_equal(frame_of(&s, 1).seq, c_next);
	assert_int_equal(frame_of(&s, 1).ack, s_next + 1);
	assert_string_equal(f.comment, "session 3 closed: the server closed: bye");
	assert_int_equal(cap_enc_sessions(e), 0);
	assert_int_equal(cap_enc_received(e), 6);
	sink_clear(&s);
	cap_enc_free(e);
}

static int transport_udp(void *ud, const char *pipeline, uint64_t id)
{
	(void)ud;
	(void)pipeline;
	(void)id;
	return CAP_T_UDP;
}

static void test_encoder_udp_lost_and_closes(void **state)
{
	struct sink s = {0};
	struct cap_enc *e = cap_enc_new(sink_fn, &s, NULL);
	struct cap_ev ev;
	static const char *reasons[] = {"the client closed",
					"idle timeout",
					"closed by the API, a script or the embedder",
					"error",
					"the daemon or pipeline stopped",
					"a limit was hit",
					"ended"};
	int codes[] = {EZP_CLOSE_CLIENT,   EZP_CLOSE_IDLE,  EZP_CLOSE_API, EZP_CLOSE_ERROR,
		       EZP_CLOSE_SHUTDOWN, EZP_CLOSE_LIMIT, EZP_CLOSE_NONE};

	(void)state;
	/* a UDP session first seen by a packet: the transport from the callback, no handshake */
	cap_enc_set_transport_fn(e, transport_udp, NULL);
	ev = ev_packet(9, EZP_DIR_TO_SERVER, "dgram", 5, 0);
	cap_enc_event(e, &ev);
	assert_int_equal(s.n, 1);
	assert_true(frame_of(&s, 0).udp);
	ev = ev_session(EZP_TAP_SESSION_CHANGED, 9, 0);
	cap_enc_event(e, &ev);
	ev = ev_session(EZP_TAP_SESSION_CLOSED, 9, 0);
	cap_enc_event(e, &ev);
	assert_int_equal(s.n, 1);
	assert_int_equal(cap_enc_sessions(e), 0);
	sink_clear(&s);

	/* losses: a statistics block with the counts */
	cap_enc_lost(e, 0, 1, NULL);
	assert_int_equal(s.n, 0);
	cap_enc_lost(e, 4, 1, NULL);
	cap_enc_stats(e, 2, "end");
	assert_int_equal(s.n, 2);
	assert_int_equal(rd32(s.blk[0]), PCN_BT_ISB);
	assert_int_equal(cap_enc_lost_total(e), 4);
	sink_clear(&s);

	/* TCP sessions closing for every reason; a failed connect is a reset */
	for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
		char want[200];
		ev = ev_session(EZP_TAP_SESSION_OPENED, 20 + i, CAP_T_TCP);
		cap_enc_event(e, &ev);
		cap_enc_event(e, &ev); /* twice: one handshake */
		ev = ev_session(EZP_TAP_SESSION_CLOSED, 20 + i, CAP_T_TCP);
		ev.close_reason = codes[i];
		cap_enc_event(e, &ev);
		assert_int_equal(s.n, 6);
		snprintf(want, sizeof(want), "session %zu closed: %s", 20 + i, reasons[i]);
		assert_string_equal(frame_of(&s, 3).comment, want);
		assert_true(frame_of(&s, 3).from_client);
		sink_clear(&s);
	}
	ev = ev_session(EZP_TAP_SESSION_OPENED, 40, CAP_T_TCP);
	cap_enc_event(e, &ev);
	ev = ev_session(EZP_TAP_SESSION_CLOSED, 40, CAP_T_TCP);
	ev.close_reason = EZP_CLOSE_CONNECT_FAILED;
	cap_enc_event(e, &ev);
	assert_int_equal(s.n, 4);
	assert_int_equal(frame_of(&s, 3).flags, PCN_TCP_RST | PCN_TCP_ACK);
	sink_clear(&s);
	/* a close for a session never seen writes nothing */
	cap_enc_event(e, &ev);
	assert_int_equal(s.n, 0);
	/* many sessions: the table grows */
	for (uint64_t id = 100; id < 400; id++) {
		ev = ev_session(EZP_TAP_SESSION_OPENED, id, CAP_T_UDP);
		cap_enc_event(e, &ev);
	}
	assert_int_equal(cap_enc_sessions(e), 300);
	for (uint64_t id = 100; id < 400; id += 2) {
		ev = ev_session(EZP_TAP_SESSION_CLOSED, id, CAP_T_UDP);
		cap_enc_event(e, &ev);
	}
	assert_int_equal(cap_enc_sessions(e), 150);
	assert_int_equal(s.n, 0);
	assert_string_equal(cap_dir_name(EZP_DIR_TO_CLIENT), "to_client");
	assert_int_equal(cap_transport_of(NULL), CAP_T_UNKNOWN);
	assert_int_equal(cap_transport_of("tcp"), CAP_T_TCP);
	cap_enc_free(e);
	cap_enc_free(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_shb_idb_isb),
	    cmocka_unit_test(test_epb),
	    cmocka_unit_test(test_frames),
	    cmocka_unit_test(test_encoder_tcp),
	    cmocka_unit_test(test_encoder_udp_lost_and_closes),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
