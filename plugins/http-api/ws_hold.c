/*
 * ws_hold.c - the held packets of a filtering WebSocket, shared by the v3
 * and the old v2 protocol (ws_v3.c, ws_v2.c): the claims of the `remote`
 * filter, each held packet's per-socket seq -> the core's hold id, the
 * packets held before the upgrade completes, deadlines (a sweep timer) and
 * the answers (ws_hold_answer -> filter_answer).
 *
 * Thread: the service loop, except hold_on_packet (a packet worker), which
 * copies what the socket needs and defers the rest to the loop.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ws.h"

#define HOLD_BUCKETS 1024u
#define HOLD_SWEEP_MS 100
#define HOLD_GRACE_US 10000000ull /* keep an expired seq this long to say "expired" */

struct hold_claim {
	struct ws_hold *hd;
	struct ezp_claim *claim;
	char name[72];
	unsigned timeout_ms; /* effective */
	int fallback;	     /* verdict when a packet cannot be handed over */
};

struct ws_hold {
	struct ws_conn *c;
	struct ws_hold_opts o;
	struct hold_claim *claims;
	size_t n_claims;
	const char **names;
	uint64_t next_seq;
	struct ws_held *buckets[HOLD_BUCKETS];
	size_t count;
	struct ws_held *fifo, **fifo_tail; /* arrived before the upgrade */
	struct ezp_timer *sweep;
	bool open, stopped, sweeping;
};

static void hold_arrive(void *arg);

static void held_free(const struct ezp_core *core, struct ws_held *h)
{
	core->packet_unref(h->pkt);
	free(h);
}

/* Thread: a packet worker. Copy what the socket needs and hand it over. */
static int hold_on_packet(void *userdata, struct ezp_filter_call *call)
{
	struct hold_claim *hc = userdata;
	struct ws_conn *c = hc->hd->c;
	const struct ezp_core *core = c->api->core;
	struct ezp_session_info info = {.struct_size = sizeof(info)};
	struct ws_held *h = calloc(1, sizeof(*h));

	if (!h)
		return hc->fallback;
	core->session_info(call->session, &info);
	h->c = c;
	h->hold_id = call->hold_id;
	h->session_id = info.id;
	h->pkt = core->packet_ref(call->pkt);
	h->dir = call->pkt->dir;
	h->leg = call->pkt->leg;
	h->deadline_us = core->now_us() + (uint64_t)hc->timeout_ms * 1000;
	snprintf(h->pipeline, sizeof(h->pipeline), "%s", hc->name);
	snprintf(h->transport, sizeof(h->transport), "%s", info.transport ? info.transport : "");
	h->src = h->dir == EZP_DIR_TO_SERVER ? info.client : info.server;
	h->dst = h->dir == EZP_DIR_TO_SERVER ? info.server : info.client;
	ws_ref(c);
	if (core->defer(c->api->w, hold_arrive, h) != EZP_OK) {
		held_free(core, h);
		atomic_fetch_sub(&c->refs, 1); /* the claim still holds one: never the last */
		return hc->fallback;
	}
	return EZP_VERDICT_HOLD;
}

static struct ws_held **slot(struct ws_hold *hd, uint64_t seq)
{
	return &hd->buckets[seq % HOLD_BUCKETS];
}

static void hold_sweep(void *arg);

static void hold_deliver(struct ws_hold *hd, struct ws_held *h)
{
	h->seq = hd->next_seq++;
	h->next = *slot(hd, h->seq);
	*slot(hd, h->seq) = h;
	hd->count++;
	if (!hd->sweeping) {
		hd->sweeping = true;
		hd->c->api->core->timer_start(hd->sweep, HOLD_SWEEP_MS, 1);
	}
	hd->o.on_held(hd->c, h);
}

/* Thread: the service loop (deferred from hold_on_packet). */
static void hold_arrive(void *arg)
{
	struct ws_held *h = arg;
	struct ws_conn *c = h->c;
	struct ws_hold *hd = c->state != WS_DEAD ? c->hold : NULL;

	if (!hd || hd->stopped) {
		held_free(c->api->core, h); /* the claim is gone: the core gave the default */
	} else if (!hd->open) {
		h->next = NULL;
		*hd->fifo_tail = h;
		hd->fifo_tail = &h->next;
	} else {
		hold_deliver(hd, h);
	}
	ws_unref(c);
}

static void hold_unlink(struct ws_hold *hd, struct ws_held *h)
{
	for (struct ws_held **pp = slot(hd, h->seq); *pp; pp = &(*pp)->next) {
		if (*pp == h) {
			*pp = h->next;
			hd->count--;
			return;
		}
	}
}

static void hold_sweep(void *arg)
{
	struct ws_hold *hd = arg;
	const struct ezp_core *core = hd->c->api->core;
	uint64_t now = core->now_us();

	for (unsigned b = 0; b < HOLD_BUCKETS; b++) {
		struct ws_held **pp = &hd->buckets[b];
		while (*pp) {
			struct ws_held *h = *pp;
			if (!h->expired && now > h->deadline_us) {
				h->expired = true;
				if (hd->o.on_expired)
					hd->o.on_expired(hd->c, h);
			}
			if (h->expired && now > h->deadline_us + HOLD_GRACE_US) {
				*pp = h->next;
				hd->count--;
				held_free(core, h);
				continue;
			}
			pp = &h->next;
		}
	}
	if (!hd->count) {
		hd->sweeping = false;
		core->timer_stop(hd->sweep);
	}
}

/* The remote filter's HoldTimeoutMs and Default in @pipeline. */
static void remote_conf(struct api *api, const char *pipeline, unsigned *timeout_ms,
			bool *default_drop)
{
	int def = EZP_VERDICT_PASS;

	*timeout_ms = 5000;
	if (api->ctl->filter_hold(api->ctx, pipeline, "remote", timeout_ms, &def) != EZP_OK)
		*timeout_ms = 5000;
	*default_drop = def == EZP_VERDICT_DROP;
}

struct ws_hold *ws_hold_new(struct ws_conn *c, struct api_req *r, const struct ws_hold_opts *o)
{
	struct api *api = c->api;
	struct ezp_pipeline_stats *ps = NULL;
	struct ws_hold *hd = calloc(1, sizeof(*hd));
	size_t n = 0;
	char holder_name[160];

	if (!hd || api->ctl->pipelines(api->ctx, &ps, &n) != EZP_OK) {
		api_error(r, 500, "internal", "cannot list pipelines");
		goto fail;
	}
	hd->c = c;
	hd->o = *o;
	hd->next_seq = o->first_seq;
	hd->fifo_tail = &hd->fifo;
	hd->claims = calloc(n ? n : 1, sizeof(*hd->claims));
	hd->names = calloc(n ? n : 1, sizeof(*hd->names));
	hd->sweep = api->core->timer_new(api->w, hold_sweep, hd);
	if (!hd->claims || !hd->names || !hd->sweep) {
		api_error(r, 500, "internal", "out of memory");
		goto fail;
	}
	snprintf(holder_name, sizeof(holder_name), "WebSocket %s (key %s)", c->peer,
		 c->key_id[0] ? c->key_id : "-");
	for (size_t i = 0; i < n; i++) {
		struct hold_claim *hc = &hd->claims[hd->n_claims];
		struct ezp_filter_holder holder = {
		    .struct_size = sizeof(holder),
		    .name = holder_name,
		    .userdata = hc,
		    .on_packet = hold_on_packet,
		};
		struct ezp_claim_opts copts = {
		    .struct_size = sizeof(copts),
		    .timeout_ms = o->timeout_ms,
		    .default_verdict = o->default_verdict,
		};
		struct ezp_error err = {0};
		bool drop;
		int rc;

		if (o->pipeline ? strcmp(ps[i].name, o->pipeline)
				: o->accept && !o->accept(c, &ps[i]))
			continue;
		hc->hd = hd;
		snprintf(hc->name, sizeof(hc->name), "%s", ps[i].name);
		remote_conf(api, hc->name, &hc->timeout_ms, &drop);
		if (o->timeout_ms)
			hc->timeout_ms = o->timeout_ms;
		hc->fallback = o->default_verdict >= 0 ? o->default_verdict
			       : drop		       ? EZP_VERDICT_DROP
						       : EZP_VERDICT_PASS;
		ws_ref(c); /* on_packet may run as soon as the claim exists */
		rc = api->ctl->filter_claim(api->ctx, hc->name, "remote", &holder, &copts,
					    &hc->claim, &err);
		if (rc == EZP_OK) {
			hd->names[hd->n_claims++] = hc->name;
			continue;
		}
		atomic_fetch_sub(&c->refs, 1);
		if (rc == EZP_ERR_BUSY) {
			api_error(r, 409, "filter_busy", "%s", err.message);
			goto fail;
		}
		if (rc != EZP_ERR_NOT_FOUND || o->pipeline) {
			api_error(r, rc == EZP_ERR_NOT_FOUND ? 404 : 500,
				  rc == EZP_ERR_NOT_FOUND ? "no_remote_filter" : "internal",
				  "cannot filter pipeline '%s': %s", hc->name, err.message);
			goto fail;
		}
	}
	if (o->pipeline && !hd->n_claims) {
		api_error(r, 404, "pipeline_not_found", "no pipeline named '%s'", o->pipeline);
		goto fail;
	}
	if (!hd->n_claims) {
		api_error(r, 404, "no_remote_filter",
			  "no pipeline has a `remote` filter in its Through to hold");
		goto fail;
	}
	free(ps);
	return hd;
fail:
	free(ps);
	if (hd) {
		ws_hold_stop(hd);
		ws_hold_free(hd);
	}
	return NULL;
}

size_t ws_hold_pipelines(struct ws_hold *hd, const char *const **names)
{
	*names = hd->names;
	return hd->n_claims;
}

bool ws_hold_has(struct ws_hold *hd, const char *pipeline)
{
	for (size_t i = 0; i < hd->n_claims; i++)
		if (!strcmp(hd->names[i], pipeline))
			return true;
	return false;
}

void ws_hold_open(struct ws_hold *hd)
{
	struct ws_held *h;

	hd->open = true;
	while ((h = hd->fifo) && hd->c->state == WS_OPEN) {
		hd->fifo = h->next;
		hold_deliver(hd, h);
	}
	if (!hd->fifo)
		hd->fifo_tail = &hd->fifo;
}

uint64_t ws_hold_next_seq(struct ws_hold *hd)
{
	return hd->next_seq++;
}

int ws_hold_answer(struct ws_hold *hd, uint64_t seq, int verdict, struct ezp_packet *repl)
{
	const struct ezp_core *core = hd->c->api->core;
	struct ws_held *h;

	for (h = *slot(hd, seq); h && h->seq != seq; h = h->next)
		;
	if (!h || h->expired || core->now_us() > h->deadline_us) {
		core->packet_unref(repl);
		if (h) {
			h->expired = true;
			return WS_HOLD_EXPIRED;
		}
		return seq >= hd->o.first_seq && seq < hd->next_seq ? WS_HOLD_ANSWERED
								    : WS_HOLD_UNKNOWN;
	}
	core->filter_answer(hd->c->api->ctx, h->hold_id, verdict, repl);
	hold_unlink(hd, h);
	held_free(core, h);
	return 0;
}

void ws_hold_session_closed(struct ws_hold *hd, uint64_t session_id)
{
	for (unsigned b = 0; hd->count && b < HOLD_BUCKETS; b++) {
		struct ws_held **pp = &hd->buckets[b];
		while (*pp) {
			struct ws_held *h = *pp;
			if (h->session_id == session_id && !h->expired) {
				h->expired = true; /* its session ended: the packet is gone */
				h->deadline_us = hd->c->api->core->now_us();
			}
			pp = &h->next;
		}
	}
}

void ws_hold_stop(struct ws_hold *hd)
{
	const struct ezp_core *core = hd->c->api->core;

	if (hd->stopped)
		return;
	hd->stopped = true;
	for (size_t i = 0; i < hd->n_claims; i++) {
		hd->c->api->ctl->claim_release(hd->claims[i].claim); /* held packets: default now */
		ws_unref(hd->c);
	}
	hd->n_claims = 0;
	if (hd->sweep)
		core->timer_stop(hd->sweep);
}

void ws_hold_free(struct ws_hold *hd)
{
	const struct ezp_core *core;

	if (!hd)
		return;
	core = hd->c->api->core;
	for (unsigned b = 0; b < HOLD_BUCKETS; b++) {
		while (hd->buckets[b]) {
			struct ws_held *h = hd->buckets[b];
			hd->buckets[b] = h->next;
			held_free(core, h);
		}
	}
	while (hd->fifo) {
		struct ws_held *h = hd->fifo;
		hd->fifo = h->next;
		held_free(core, h);
	}
	if (hd->sweep)
		core->timer_free(hd->sweep);
	free(hd->claims);
	free(hd->names);
	free(hd);
}
