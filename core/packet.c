/*
 * packet.c - refcounted packets. Allocation and writes happen on the
 * packet's worker; ref/unref are atomic so taps may hold packets on other
 * threads. A packet's bytes live inline after the header unless wrapped.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

static struct ezp__packet *priv(struct ezp_packet *pkt)
{
	return (struct ezp__packet *)pkt;
}

struct ezp_packet *ezp__packet_new(size_t len)
{
	size_t cap = len ? len : 1;
	struct ezp__packet *p = malloc(sizeof(*p) + cap);

	if (!p)
		return NULL;
	memset(p, 0, sizeof(*p));
	atomic_init(&p->refs, 1);
	p->cap = cap;
	p->pub.data = p->inline_data;
	p->pub.len = len;
	return &p->pub;
}

struct ezp_packet *ezp__packet_copy(const void *data, size_t len)
{
	struct ezp_packet *pkt = ezp__packet_new(len);

	if (pkt && len)
		memcpy(pkt->data, data, len);
	return pkt;
}

struct ezp_packet *ezp__packet_wrap(void *data, size_t len, void (*release)(void *), void *arg)
{
	struct ezp__packet *p = calloc(1, sizeof(*p));

	if (!p)
		return NULL;
	atomic_init(&p->refs, 1);
	p->pub.data = data;
	p->pub.len = len;
	p->cap = len;
	p->release = release;
	p->release_arg = arg;
	return &p->pub;
}

struct ezp_packet *ezp__packet_ref(struct ezp_packet *pkt)
{
	if (pkt)
		atomic_fetch_add_explicit(&priv(pkt)->refs, 1, memory_order_relaxed);
	return pkt;
}

void ezp__packet_unref(struct ezp_packet *pkt)
{
	struct ezp__packet *p;

	if (!pkt)
		return;
	p = priv(pkt);
	if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1)
		return;
	if (p->release)
		p->release(p->release_arg);
	free(p);
}

unsigned ezp__packet_refs(const struct ezp_packet *pkt)
{
	return atomic_load(&((const struct ezp__packet *)pkt)->refs);
}

/* Copy the public head (flags, direction, session) onto a fresh packet. */
static struct ezp_packet *packet_clone(struct ezp_packet *pkt, size_t len)
{
	struct ezp_packet *n = ezp__packet_new(len);

	if (!n)
		return NULL;
	memcpy(n->data, pkt->data, pkt->len < len ? pkt->len : len);
	n->session_id = pkt->session_id;
	n->flags = pkt->flags;
	n->dir = pkt->dir;
	n->leg = pkt->leg;
	n->ts_us = pkt->ts_us;
	return n;
}

struct ezp_packet *ezp__packet_make_writable(struct ezp_packet *pkt)
{
	if (!pkt)
		return NULL;
	if (ezp__packet_refs(pkt) == 1 && !priv(pkt)->release)
		return pkt;
	struct ezp_packet *n = packet_clone(pkt, pkt->len);
	ezp__packet_unref(pkt);
	return n;
}

struct ezp_packet *ezp__packet_resize(struct ezp_packet *pkt, size_t len)
{
	if (!pkt)
		return NULL;
	if (len <= priv(pkt)->cap && ezp__packet_refs(pkt) == 1 && !priv(pkt)->release) {
		pkt->len = len;
		return pkt;
	}
	struct ezp_packet *n = packet_clone(pkt, len);
	if (n && len > pkt->len)
		memset(n->data + pkt->len, 0, len - pkt->len);
	ezp__packet_unref(pkt);
	return n;
}
