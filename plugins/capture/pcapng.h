/*
 * pcapng.h - the capture plugin's pcapng writer and frame synthesis: pure
 * functions with no core dependency (tests/unit/test_pcapng.c builds them
 * alone).
 *
 *   pcn_buf      a growable byte buffer blocks are appended to
 *   pcn_shb/idb/epb/isb  the four block types we write (pcapng, little-endian)
 *   pcn_frame    an Ethernet + IPv4/IPv6 + TCP/UDP header with correct
 *                checksums for a payload, between two endpoints
 *
 * Thread: any (no shared state).
 */
#ifndef EZP_CAPTURE_PCAPNG_H
#define EZP_CAPTURE_PCAPNG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define PCN_LINKTYPE_ETHERNET 1
#define PCN_BT_SHB 0x0A0D0D0Au
#define PCN_BT_IDB 0x00000001u
#define PCN_BT_ISB 0x00000005u
#define PCN_BT_EPB 0x00000006u
#define PCN_OPT_COMMENT 1
#define PCN_MAX_COMMENT 65000 /* an option's length is 16 bits */

/* A growable buffer; @oom is set once an allocation failed (nothing appended since). */
struct pcn_buf {
	uint8_t *p;
	size_t len, cap;
	int oom;
};

void pcn_buf_free(struct pcn_buf *b);
/* Make room for @n more bytes; 0 or -1 (then b->oom). */
int pcn_buf_reserve(struct pcn_buf *b, size_t n);
void pcn_buf_put(struct pcn_buf *b, const void *data, size_t n);

/* Section Header Block: byte-order magic, version 1.0, unknown section length, shb_userappl. */
void pcn_shb(struct pcn_buf *b, const char *userappl);
/* Interface Description Block: @linktype, snaplen 0 (none), if_name, if_description, if_tsresol 6.
 */
void pcn_idb(struct pcn_buf *b, uint16_t linktype, const char *name, const char *description);
/*
 * Enhanced Packet Block on interface 0: the frame is @hdr followed by
 * @payload; microsecond timestamp @ts_us; opt_comment @comment (NULL: none;
 * cut at PCN_MAX_COMMENT bytes).
 */
void pcn_epb(struct pcn_buf *b, uint64_t ts_us, const void *hdr, size_t hdr_len,
	     const void *payload, size_t payload_len, const char *comment);
/* Interface Statistics Block for interface 0: isb_ifrecv, isb_ifdrop and a comment. */
void pcn_isb(struct pcn_buf *b, uint64_t ts_us, uint64_t received, uint64_t dropped,
	     const char *comment);

/* ---- frames ---- */

/* One end of a synthesised flow. */
struct pcn_ep {
	int v6; /* 1: addr is 16 bytes of IPv6; 0: the first 4 are IPv4 */
	uint8_t addr[16];
	uint16_t port;
};

/*
 * The endpoints of @a and @b (sockaddr_in / sockaddr_in6; anything else
 * is 0.0.0.0:0) as one family: both IPv4 when both are IPv4 or IPv4-mapped
 * IPv6, else both IPv6 (an IPv4 address becomes ::ffff:a.b.c.d).
 */
void pcn_eps(const struct sockaddr_storage *a, const struct sockaddr_storage *b, struct pcn_ep *ea,
	     struct pcn_ep *eb);

#define PCN_PROTO_TCP 6
#define PCN_PROTO_UDP 17

#define PCN_TCP_FIN 0x01
#define PCN_TCP_SYN 0x02
#define PCN_TCP_RST 0x04
#define PCN_TCP_PSH 0x08
#define PCN_TCP_ACK 0x10

/* Largest header pcn_frame writes: Ethernet 14 + IPv6 40 + TCP 20. */
#define PCN_MAX_HDR 74

struct pcn_frame {
	int proto; /* PCN_PROTO_TCP / _UDP */
	const struct pcn_ep *src, *dst;
	int src_is_client; /* MAC 02:00:00:00:00:01 for the client side, ...:02 for the server */
	uint32_t seq, ack; /* TCP */
	uint8_t tcp_flags;
	uint16_t ip_id; /* IPv4 identification */
};

/* Largest payload one frame carries for @proto and @v6 (IP total / payload length is 16 bits). */
size_t pcn_max_payload(int proto, int v6);
/*
 * Write the headers for @payload (at most pcn_max_payload bytes) into @out
 * (PCN_MAX_HDR bytes) with the IP, TCP/UDP checksums filled. Returns the
 * header length.
 */
size_t pcn_frame(uint8_t *out, const struct pcn_frame *f, const uint8_t *payload, size_t len);

/* The Internet checksum (RFC 1071) of @data, starting from partial sum @sum. */
uint32_t pcn_sum(uint32_t sum, const uint8_t *data, size_t len);
uint16_t pcn_fold(uint32_t sum);

#endif
