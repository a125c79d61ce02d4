/*
 * pcapng.c - pcapng blocks (SHB, IDB, EPB, ISB) written little-endian, and
 * synthesised Ethernet/IPv4/IPv6/TCP/UDP headers with correct checksums.
 * Layout per the pcapng specification (draft-ietf-opsawg-pcapng): every
 * block is type, total length, body padded to 32 bits, total length again;
 * options are code, length, value padded to 32 bits, ended by opt_endofopt.
 * Thread: any (pure functions).
 */
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "pcapng.h"

/* ---- the buffer ---- */

void pcn_buf_free(struct pcn_buf *b)
{
	free(b->p);
	memset(b, 0, sizeof(*b));
}

int pcn_buf_reserve(struct pcn_buf *b, size_t n)
{
	size_t cap;
	uint8_t *p;

	if (b->oom)
		return -1;
	if (b->len + n <= b->cap)
		return 0;
	cap = b->cap ? b->cap : 4096;
	while (cap < b->len + n)
		cap *= 2;
	p = realloc(b->p, cap);
	if (!p) {
		b->oom = 1;
		return -1;
	}
	b->p = p;
	b->cap = cap;
	return 0;
}

void pcn_buf_put(struct pcn_buf *b, const void *data, size_t n)
{
	if (n == 0 || pcn_buf_reserve(b, n) != 0)
		return;
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

static void put16(struct pcn_buf *b, uint16_t v)
{
	uint8_t x[2] = {(uint8_t)v, (uint8_t)(v >> 8)};

	pcn_buf_put(b, x, 2);
}

static void put32(struct pcn_buf *b, uint32_t v)
{
	uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};

	pcn_buf_put(b, x, 4);
}

static void put64(struct pcn_buf *b, uint64_t v)
{
	put32(b, (uint32_t)v);
	put32(b, (uint32_t)(v >> 32));
}

static void pad32(struct pcn_buf *b)
{
	static const uint8_t zero[4];

	pcn_buf_put(b, zero, (4 - (b->len & 3)) & 3);
}

static void set32(struct pcn_buf *b, size_t at, uint32_t v)
{
	if (b->oom || at + 4 > b->len)
		return;
	b->p[at] = (uint8_t)v;
	b->p[at + 1] = (uint8_t)(v >> 8);
	b->p[at + 2] = (uint8_t)(v >> 16);
	b->p[at + 3] = (uint8_t)(v >> 24);
}

/* Start a block: returns where it starts (for block_end). */
static size_t block_begin(struct pcn_buf *b, uint32_t type)
{
	size_t at = b->len;

	put32(b, type);
	put32(b, 0); /* total length, set by block_end */
	return at;
}

static void block_end(struct pcn_buf *b, size_t at)
{
	uint32_t total;

	pad32(b);
	total = (uint32_t)(b->len + 4 - at);
	put32(b, total);
	set32(b, at + 4, total);
}

static void opt(struct pcn_buf *b, uint16_t code, const void *v, size_t len)
{
	put16(b, code);
	put16(b, (uint16_t)len);
	pcn_buf_put(b, v, len);
	pad32(b);
}

static void opt_str(struct pcn_buf *b, uint16_t code, const char *s)
{
	size_t n;

	if (!s || !*s)
		return;
	n = strlen(s);
	opt(b, code, s, n > PCN_MAX_COMMENT ? PCN_MAX_COMMENT : n);
}

static void opt_u64(struct pcn_buf *b, uint16_t code, uint64_t v)
{
	put16(b, code);
	put16(b, 8);
	put64(b, v);
}

static void opt_end(struct pcn_buf *b)
{
	put32(b, 0);
}

/* ---- blocks ---- */

void pcn_shb(struct pcn_buf *b, const char *userappl)
{
	size_t at = block_begin(b, PCN_BT_SHB);

	put32(b, 0x1A2B3C4Du);
	put16(b, 1);
	put16(b, 0);
	put64(b, UINT64_MAX);	 /* section length not known: we stream */
	opt_str(b, 4, userappl); /* shb_userappl */
	opt_end(b);
	block_end(b, at);
}

void pcn_idb(struct pcn_buf *b, uint16_t linktype, const char *name, const char *description)
{
	size_t at = block_begin(b, PCN_BT_IDB);
	uint8_t tsresol = 6;

	put16(b, linktype);
	put16(b, 0);
	put32(b, 0);		    /* snaplen: no limit */
	opt_str(b, 2, name);	    /* if_name */
	opt_str(b, 3, description); /* if_description */
	opt(b, 9, &tsresol, 1);	    /* if_tsresol: microseconds */
	opt_end(b);
	block_end(b, at);
}

void pcn_epb(struct pcn_buf *b, uint64_t ts_us, const void *hdr, size_t hdr_len,
	     const void *payload, size_t payload_len, const char *comment)
{
	size_t at, n = hdr_len + payload_len;

	if (pcn_buf_reserve(b, 48 + n + (comment ? strlen(comment) : 0)) != 0)
		return;
	at = block_begin(b, PCN_BT_EPB);
	put32(b, 0); /* interface 0 */
	put32(b, (uint32_t)(ts_us >> 32));
	put32(b, (uint32_t)ts_us);
	put32(b, (uint32_t)n); /* captured */
	put32(b, (uint32_t)n); /* original */
	pcn_buf_put(b, hdr, hdr_len);
	pcn_buf_put(b, payload, payload_len);
	pad32(b);
	if (comment && *comment) {
		opt_str(b, PCN_OPT_COMMENT, comment);
		opt_end(b);
	}
	block_end(b, at);
}

void pcn_isb(struct pcn_buf *b, uint64_t ts_us, uint64_t received, uint64_t dropped,
	     const char *comment)
{
	size_t at = block_begin(b, PCN_BT_ISB);

	put32(b, 0);
	put32(b, (uint32_t)(ts_us >> 32));
	put32(b, (uint32_t)ts_us);
	opt_str(b, PCN_OPT_COMMENT, comment);
	opt_u64(b, 4, received); /* isb_ifrecv */
	opt_u64(b, 5, dropped);	 /* isb_ifdrop */
	opt_end(b);
	block_end(b, at);
}

/* ---- frames ---- */

static void ep_of(const struct sockaddr_storage *ss, struct pcn_ep *e)
{
	memset(e, 0, sizeof(*e));
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
		memcpy(e->addr, &in->sin_addr, 4);
		e->port = ntohs(in->sin_port);
	} else if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
		e->port = ntohs(in6->sin6_port);
		if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
			memcpy(e->addr, in6->sin6_addr.s6_addr + 12, 4);
		} else {
			e->v6 = 1;
			memcpy(e->addr, in6->sin6_addr.s6_addr, 16);
		}
	}
}

static void ep_to_v6(struct pcn_ep *e)
{
	if (e->v6)
		return;
	memmove(e->addr + 12, e->addr, 4);
	memset(e->addr, 0, 10);
	e->addr[10] = e->addr[11] = 0xff;
	e->v6 = 1;
}

void pcn_eps(const struct sockaddr_storage *a, const struct sockaddr_storage *b, struct pcn_ep *ea,
	     struct pcn_ep *eb)
{
	ep_of(a, ea);
	ep_of(b, eb);
	if (ea->v6 || eb->v6) {
		ep_to_v6(ea);
		ep_to_v6(eb);
	}
}

size_t pcn_max_payload(int proto, int v6)
{
	size_t l4 = proto == PCN_PROTO_TCP ? 20 : 8;

	return v6 ? 65535 - l4 : 65535 - 20 - l4;
}

uint32_t pcn_sum(uint32_t sum, const uint8_t *data, size_t len)
{
	size_t i;

	for (i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)data[i] << 8 | data[i + 1];
	if (len & 1)
		sum += (uint32_t)data[len - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

uint16_t pcn_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void be16(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

size_t pcn_frame(uint8_t *out, const struct pcn_frame *f, const uint8_t *payload, size_t len)
{
	static const uint8_t mac_client[6] = {0x02, 0, 0, 0, 0, 0x01};
	static const uint8_t mac_server[6] = {0x02, 0, 0, 0, 0, 0x02};
	int v6 = f->src->v6;
	size_t ip_len = v6 ? 40 : 20, l4_len = f->proto == PCN_PROTO_TCP ? 20 : 8;
	uint8_t *ip = out + 14, *l4 = ip + ip_len, pseudo[40];
	uint32_t sum;
	size_t alen = v6 ? 16 : 4, plen;

	memcpy(out, f->src_is_client ? mac_server : mac_client, 6); /* destination */
	memcpy(out + 6, f->src_is_client ? mac_client : mac_server, 6);
	be16(out + 12, v6 ? 0x86DD : 0x0800);
	if (v6) {
		memset(ip, 0, 40);
		ip[0] = 0x60;
		be16(ip + 4, (uint32_t)(l4_len + len));
		ip[6] = (uint8_t)f->proto;
		ip[7] = 64;
		memcpy(ip + 8, f->src->addr, 16);
		memcpy(ip + 24, f->dst->addr, 16);
	} else {
		memset(ip, 0, 20);
		ip[0] = 0x45;
		be16(ip + 2, (uint32_t)(20 + l4_len + len));
		be16(ip + 4, f->ip_id);
		be16(ip + 6, 0x4000); /* don't fragment */
		ip[8] = 64;
		ip[9] = (uint8_t)f->proto;
		memcpy(ip + 12, f->src->addr, 4);
		memcpy(ip + 16, f->dst->addr, 4);
		be16(ip + 10, pcn_fold(pcn_sum(0, ip, 20)));
	}
	memset(l4, 0, l4_len);
	be16(l4, f->src->port);
	be16(l4 + 2, f->dst->port);
	if (f->proto == PCN_PROTO_TCP) {
		be32(l4 + 4, f->seq);
		be32(l4 + 8, f->tcp_flags & PCN_TCP_ACK ? f->ack : 0);
		l4[12] = 5 << 4;
		l4[13] = f->tcp_flags;
		be16(l4 + 14, 65535);
	} else {
		be16(l4 + 4, (uint32_t)(8 + len));
	}
	/* the pseudo header: addresses, protocol, upper-layer length */
	plen = l4_len + len;
	memcpy(pseudo, f->src->addr, alen);
	memcpy(pseudo + alen, f->dst->addr, alen);
	sum = pcn_sum(0, pseudo, 2 * alen);
	sum += (uint32_t)f->proto;
	sum += (uint32_t)(plen >> 16) + (uint32_t)(plen & 0xffff);
	sum = pcn_sum(sum, l4, l4_len);
	sum = pcn_sum(sum, payload, len);
	sum = pcn_fold(sum);
	if (f->proto == PCN_PROTO_UDP && sum == 0)
		sum = 0xffff; /* 0 means "no checksum" in UDP */
	be16(l4 + (f->proto == PCN_PROTO_TCP ? 16 : 6), sum);
	return 14 + ip_len + l4_len;
}
