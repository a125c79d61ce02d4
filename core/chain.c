/*
 * chain.c - a session's filter chain: each packet visits the filters in
 * order; verdicts pass, drop, replace or hold. Order is kept within a
 * direction: a held packet holds the packets behind it at its stage, up to
 * the stage's window, until it is answered or times out (then it gets the
 * stage's default action). Thread: the session's worker.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

static void stage_arrive(struct ezp_session *s, unsigned dir, unsigned i, struct ezp_packet *pkt,
			 struct ezp_packet *orig);
static void stage_pump(struct ezp_session *s, unsigned dir, unsigned i);

/* A replacement takes the head (session, direction, leg, time) of the packet it replaces. */
static void replacement_head(struct ezp_packet *repl, const struct ezp_packet *pkt)
{
	repl->session_id = pkt->session_id;
	repl->dir = pkt->dir;
	repl->leg = pkt->leg;
	repl->ts_us = pkt->ts_us;
	repl->flags = (pkt->flags & EZP_PKT_INJECTED) | EZP_PKT_REPLACED;
}

static const struct ezp__hold_conf *stage_hold(struct ezp_session *s, unsigned i)
{
	return &s->chain->stages[i].conf.hold;
}

/* Leave the chain: taps see the outcome, the far leg(s) get the bytes. */
static void chain_exit(struct ezp_session *s, unsigned dir, struct ezp_packet *pkt,
		       struct ezp_packet *orig, int verdict)
{
	if (pkt->flags & EZP_PKT_EOF) {
		ezp__packet_unref(pkt);
		ezp__packet_unref(orig);
		ezp__session_deliver_eof(s, dir);
		return;
	}
	if (verdict == EZP_VERDICT_DROP) {
		s->dropped++;
		if (s->w->n_taps)
			ezp__tap_packet(s, dir, pkt, orig, pkt->flags | EZP_PKT_DROPPED, verdict);
		ezp__packet_unref(pkt);
		ezp__packet_unref(orig);
		return;
	}
	if (orig)
		s->replaced++;
	if (s->w->n_taps)
		ezp__tap_packet(s, dir, pkt, orig, pkt->flags, orig ? EZP_VERDICT_REPLACE : verdict);
	ezp__packet_unref(orig);
	ezp__session_deliver(s, dir, pkt);
}

/* Apply a decided verdict and move on to stage i + 1. */
static void stage_leave(struct ezp_session *s, unsigned dir, unsigned i, int verdict,
			struct ezp_packet *pkt, struct ezp_packet *orig, struct ezp_packet *repl)
{
	if (verdict == EZP_VERDICT_DROP) {
		ezp__packet_unref(repl);
		chain_exit(s, dir, pkt, orig, EZP_VERDICT_DROP);
		return;
	}
	if (verdict == EZP_VERDICT_REPLACE) {
		if (!repl)
			repl = ezp__packet_new(0);
		if (!repl) { /* out of memory: the packet passes unchanged */
			stage_arrive(s, dir, i + 1, pkt, orig);
			return;
		}
		replacement_head(repl, pkt);
		if (orig)
			ezp__packet_unref(pkt); /* keep the first original for taps */
		else
			orig = pkt;
		stage_arrive(s, dir, i + 1, repl, orig);
		return;
	}
	ezp__packet_unref(repl);
	stage_arrive(s, dir, i + 1, pkt, orig);
}

/*
 * Ask filter @i about @pkt. Returns the verdict; for REPLACE *repl is set,
 * for HOLD *hold_id is the id the holder answers with.
 */
/* How a held packet waits: its hold id, timeout and default (the holder's or the filter's). */
struct hold_how {
	uint64_t id;
	unsigned timeout_ms;
	bool drop;
};

static int stage_call(struct ezp_session *s, unsigned i, struct ezp_packet *pkt,
		      struct ezp_packet **repl, struct hold_how *hh)
{
	struct ezp__stage_def *sd = &s->chain->stages[i];
	struct ezp__holder *h = NULL;
	struct ezp_filter_call call;
	int v;

	*repl = NULL;
	if (pkt->flags & EZP_PKT_EOF)
		return EZP_VERDICT_PASS;
	if (pkt->leg != 0 && !sd->conf.hold.all_legs && !(sd->kind->flags & EZP_FILTER_ALL_LEGS))
		return EZP_VERDICT_PASS;
	memset(&call, 0, sizeof(call));
	call.struct_size = sizeof(call);
	call.session = s;
	call.session_state = &s->fstate[i];
	call.pkt = pkt;
	call.hold_id = (++s->w->next_hold << 8) | s->w->index;
	call.index = i;
	if (sd->dormant && !atomic_load_explicit(&sd->awake, memory_order_acquire))
		return EZP_VERDICT_PASS;
	if (sd->kind->flags & EZP_FILTER_EXCLUSIVE) {
		h = atomic_load_explicit(&sd->claim->holder, memory_order_acquire);
		if (!h)
			return EZP_VERDICT_PASS;
		v = h->h.on_packet(h->h.userdata, &call);
	} else {
		v = sd->kind->packet(sd->instances[s->w->index], &call);
	}
	switch (v) {
	case EZP_VERDICT_PASS:
	case EZP_VERDICT_DROP:
		ezp__packet_unref(call.replacement);
		return v;
	case EZP_VERDICT_REPLACE:
		*repl = call.replacement;
		return v;
	case EZP_VERDICT_HOLD: /* waits as its holder says, else as the filter's config says */
		ezp__packet_unref(call.replacement);
		hh->id = call.hold_id;
		hh->timeout_ms = h && h->timeout_ms ? h->timeout_ms
						    : (unsigned)sd->conf.hold.timeout_ms;
		hh->drop = h && h->default_verdict >= 0 ? h->default_verdict == EZP_VERDICT_DROP
							: sd->conf.hold.default_drop;
		s->held++;
		return v;
	case EZP_VERDICT_DEFAULT:
		break;
	default:
		ezp__log(EZP_LOG_WARN, "chain",
			 "filter '%s' returned unknown verdict %d; default applied", sd->kind->name, v);
		break;
	}
	ezp__packet_unref(call.replacement);
	if (h && h->default_verdict >= 0)
		return h->default_verdict == EZP_VERDICT_DROP ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
	return sd->conf.hold.default_drop ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
}

static void stage_timer_arm(struct ezp_session *s, unsigned dir, unsigned i);

/* Submit entry @e (state WAIT, at stage i) to its filter. */
static void entry_submit(struct ezp_session *s, struct ezp__stage *st, struct ezp__entry *e)
{
	struct ezp_packet *repl = NULL;
	struct hold_how hh = {0};
	int v = stage_call(s, e->stage, e->pkt, &repl, &hh);

	if (v == EZP_VERDICT_HOLD) {
		e->state = EZP__E_HELD;
		e->hold_id = hh.id;
		e->deadline_us = ezp__mono_us() + (uint64_t)hh.timeout_ms * 1000u;
		e->default_drop = hh.drop;
		st->held++;
		if (ezp__map_put(&s->w->holds, hh.id, e) != EZP_OK) {
			/* cannot track it: give it the default action now */
			e->state = EZP__E_DONE;
			e->verdict = hh.drop ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
			st->held--;
			return;
		}
		if (!st->timer_on)
			stage_timer_arm(s, e->dir, e->stage);
		return;
	}
	e->state = EZP__E_DONE;
	e->verdict = v;
	if (v == EZP_VERDICT_REPLACE) {
		/* stash the replacement in place of the packet, original kept */
		if (!e->orig)
			e->orig = e->pkt;
		else
			ezp__packet_unref(e->pkt);
		if (!repl)
			repl = ezp__packet_new(0);
		if (!repl) { /* out of memory: the original passes unchanged */
			e->pkt = e->orig;
			e->orig = NULL;
			e->verdict = EZP_VERDICT_PASS;
			return;
		}
		replacement_head(repl, e->orig);
		e->pkt = repl;
	}
}

static struct ezp__entry *entry_new(struct ezp_session *s, unsigned dir, unsigned i,
				    struct ezp_packet *pkt, struct ezp_packet *orig)
{
	struct ezp__entry *e = calloc(1, sizeof(*e));

	if (!e)
		return NULL;
	e->s = s;
	e->dir = dir;
	e->stage = i;
	e->pkt = pkt;
	e->orig = orig;
	e->state = EZP__E_WAIT;
	return e;
}

/* A packet reaches stage @i (or leaves the chain when i == n). */
static void stage_arrive(struct ezp_session *s, unsigned dir, unsigned i, struct ezp_packet *pkt,
			 struct ezp_packet *orig)
{
	struct ezp__stage *st;
	struct ezp__entry *e;

	if (s->closing) {
		ezp__packet_unref(pkt);
		ezp__packet_unref(orig);
		return;
	}
	if (i >= s->chain->n) {
		chain_exit(s, dir, pkt, orig, EZP_VERDICT_PASS);
		return;
	}
	st = &s->dir[dir].stages[i];
	if (st->len == 0) {
		struct ezp_packet *repl = NULL;
		struct hold_how hh = {0};
		int v = stage_call(s, i, pkt, &repl, &hh);
		if (v != EZP_VERDICT_HOLD) {
			if (v == EZP_VERDICT_REPLACE)
				stage_leave(s, dir, i, v, pkt, orig, repl);
			else
				stage_leave(s, dir, i, v, pkt, orig, NULL);
			return;
		}
		e = entry_new(s, dir, i, pkt, orig);
		if (!e) {
			ezp__log(EZP_LOG_ERROR, "chain", "session %lu: out of memory holding a packet",
				 (unsigned long)s->id);
			stage_leave(s, dir, i, EZP_VERDICT_PASS, pkt, orig, NULL);
			return;
		}
		TAILQ_INSERT_TAIL(&st->q, e, link);
		st->len++;
		s->dir[dir].queued++;
		e->state = EZP__E_HELD;
		e->hold_id = hh.id;
		e->deadline_us = ezp__mono_us() + (uint64_t)hh.timeout_ms * 1000u;
		e->default_drop = hh.drop;
		st->held++;
		if (ezp__map_put(&s->w->holds, hh.id, e) != EZP_OK) {
			e->state = EZP__E_DONE;
			e->verdict = hh.drop ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
			st->held--;
			stage_pump(s, dir, i);
			return;
		}
		if (!st->timer_on)
			stage_timer_arm(s, dir, i);
		ezp__session_update_pause(s);
		return;
	}
	e = entry_new(s, dir, i, pkt, orig);
	if (!e) {
		ezp__packet_unref(pkt);
		ezp__packet_unref(orig);
		return;
	}
	TAILQ_INSERT_TAIL(&st->q, e, link);
	st->len++;
	s->dir[dir].queued++;
	stage_pump(s, dir, i);
	ezp__session_update_pause(s);
}

/* Move decided entries off the head and submit waiting ones within the window. */
static void stage_pump(struct ezp_session *s, unsigned dir, unsigned i)
{
	struct ezp__stage *st = &s->dir[dir].stages[i];
	unsigned window = (unsigned)stage_hold(s, i)->window;
	struct ezp__entry *e;

	for (;;) {
		bool progressed = false;

		while (!s->closing && (e = TAILQ_FIRST(&st->q)) && e->state == EZP__E_DONE) {
			TAILQ_REMOVE(&st->q, e, link);
			st->len--;
			s->dir[dir].queued--;
			struct ezp_packet *pkt = e->pkt, *orig = e->orig;
			int v = e->verdict;
			free(e);
			if (v == EZP_VERDICT_REPLACE) /* replacement already in pkt */
				stage_arrive(s, dir, i + 1, pkt, orig);
			else
				stage_leave(s, dir, i, v, pkt, orig, NULL);
			progressed = true;
		}
		if (s->closing)
			return;
		TAILQ_FOREACH(e, &st->q, link) {
			if (st->held >= window)
				break;
			if (e->state != EZP__E_WAIT)
				continue;
			entry_submit(s, st, e);
			if (s->closing)
				return;
			if (e->state == EZP__E_DONE && e == TAILQ_FIRST(&st->q)) {
				progressed = true;
				break;
			}
		}
		if (!progressed)
			break;
	}
}

/* ---- hold timeouts ---- */

struct stage_ref {
	struct ezp_session *s;
	unsigned dir, i;
};

static void stage_timeout(void *arg)
{
	struct stage_ref *r = arg;
	struct ezp_session *s = r->s;
	struct ezp__stage *st = &s->dir[r->dir].stages[r->i];
	uint64_t now = ezp__mono_us();
	struct ezp__entry *e;
	unsigned expired = 0;

	ezp__session_enter(s);
	st->timer_on = false;
	TAILQ_FOREACH(e, &st->q, link) {
		if (e->state != EZP__E_HELD || e->deadline_us > now)
			continue;
		ezp__map_del(&s->w->holds, e->hold_id);
		e->state = EZP__E_DONE;
		e->verdict = e->default_drop ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
		st->held--;
		expired++;
		s->hold_timeouts++;
	}
	if (expired)
		ezp__log(EZP_LOG_DEBUG, "chain",
			 "session %lu: %u held packet(s) timed out at filter '%s'; default applied",
			 (unsigned long)s->id, expired, s->chain->stages[r->i].kind->name);
	stage_pump(s, r->dir, r->i);
	if (!s->closing && st->held && !st->timer_on)
		stage_timer_arm(s, r->dir, r->i);
	ezp__session_update_pause(s);
	ezp__session_leave(s);
}

static void stage_timer_arm(struct ezp_session *s, unsigned dir, unsigned i)
{
	struct ezp__stage *st = &s->dir[dir].stages[i];
	uint64_t now = ezp__mono_us(), first = UINT64_MAX;
	struct ezp__entry *e;

	TAILQ_FOREACH(e, &st->q, link)
		if (e->state == EZP__E_HELD && e->deadline_us < first)
			first = e->deadline_us;
	if (first == UINT64_MAX)
		return;
	if (!st->timer) {
		struct stage_ref *r = malloc(sizeof(*r));
		if (!r)
			return;
		r->s = s;
		r->dir = dir;
		r->i = i;
		st->timer = ezp__timer_new(s->w, stage_timeout, r);
		if (!st->timer) {
			free(r);
			return;
		}
		st->timer_arg = r;
	}
	ezp__timer_start(st->timer, first > now ? (first - now + 999) / 1000 : 0, 0);
	st->timer_on = true;
}

/* ---- public to the core ---- */

int ezp__chain_init(struct ezp_session *s)
{
	for (unsigned d = 0; d < 2; d++) {
		s->dir[d].stages = calloc(s->chain->n ? s->chain->n : 1, sizeof(struct ezp__stage));
		if (!s->dir[d].stages)
			return EZP_ERR_NOMEM;
		for (size_t i = 0; i < s->chain->n; i++)
			TAILQ_INIT(&s->dir[d].stages[i].q);
		s->dir[d].queued = 0;
	}
	s->fstate = calloc(s->chain->n ? s->chain->n : 1, sizeof(void *));
	return s->fstate ? EZP_OK : EZP_ERR_NOMEM;
}

void ezp__chain_fini(struct ezp_session *s)
{
	for (unsigned d = 0; d < 2; d++) {
		if (!s->dir[d].stages)
			continue;
		for (size_t i = 0; i < s->chain->n; i++) {
			struct ezp__stage *st = &s->dir[d].stages[i];
			struct ezp__entry *e;
			while ((e = TAILQ_FIRST(&st->q))) {
				TAILQ_REMOVE(&st->q, e, link);
				if (e->state == EZP__E_HELD)
					ezp__map_del(&s->w->holds, e->hold_id);
				ezp__packet_unref(e->pkt);
				ezp__packet_unref(e->orig);
				free(e);
			}
			ezp__timer_free(st->timer);
			free(st->timer_arg);
		}
		free(s->dir[d].stages);
		s->dir[d].stages = NULL;
		s->dir[d].queued = 0;
	}
	free(s->fstate);
	s->fstate = NULL;
}

void ezp__chain_push(struct ezp_session *s, unsigned dir, struct ezp_packet *pkt, unsigned from)
{
	stage_arrive(s, dir, from, pkt, NULL);
}

void ezp__chain_push_eof(struct ezp_session *s, unsigned dir)
{
	struct ezp_packet *pkt;

	if (s->dir[dir].eof_pending)
		return;
	pkt = ezp__packet_new(0);
	if (!pkt) {
		ezp__session_close(s, EZP_CLOSE_ERROR, "out of memory");
		return;
	}
	s->dir[dir].eof_pending = true;
	pkt->flags = EZP_PKT_EOF;
	pkt->dir = (uint8_t)dir;
	pkt->session_id = s->id;
	stage_arrive(s, dir, 0, pkt, NULL);
}

bool ezp__chain_empty(struct ezp_session *s)
{
	return s->dir[0].queued == 0 && s->dir[1].queued == 0;
}

bool ezp__chain_full(struct ezp_session *s, unsigned dir)
{
	for (size_t i = 0; i < s->chain->n; i++)
		if (s->dir[dir].stages[i].len >= (unsigned)stage_hold(s, i)->window)
			return true;
	return false;
}

void ezp__chain_answer(struct ezp_worker *w, uint64_t hold_id, int verdict,
		       struct ezp_packet *replacement)
{
	struct ezp__entry *e = ezp__map_del(&w->holds, hold_id);
	struct ezp_session *s;
	struct ezp__stage *st;

	if (!e) {
		ezp__packet_unref(replacement);
		return;
	}
	s = e->s;
	st = &s->dir[e->dir].stages[e->stage];
	ezp__session_enter(s);
	st->held--;
	e->state = EZP__E_DONE;
	switch (verdict) {
	case EZP_VERDICT_DROP:
		e->verdict = EZP_VERDICT_DROP;
		ezp__packet_unref(replacement);
		break;
	case EZP_VERDICT_REPLACE:
		e->verdict = EZP_VERDICT_REPLACE;
		if (!replacement)
			replacement = ezp__packet_new(0);
		if (!replacement) {
			e->verdict = EZP_VERDICT_PASS;
			break;
		}
		replacement_head(replacement, e->pkt);
		if (!e->orig)
			e->orig = e->pkt;
		else
			ezp__packet_unref(e->pkt);
		e->pkt = replacement;
		break;
	case EZP_VERDICT_DEFAULT:
		e->verdict = e->default_drop ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
		ezp__packet_unref(replacement);
		break;
	default:
		e->verdict = EZP_VERDICT_PASS;
		ezp__packet_unref(replacement);
		break;
	}
	stage_pump(s, e->dir, e->stage);
	ezp__session_update_pause(s);
	ezp__session_leave(s);
}

bool ezp__chain_active(const struct ezp_session *s)
{
	const struct ezp__chain_def *c = s->chain;

	if (c->n_plain)
		return true;
	for (size_t i = 0; i < c->n; i++) {
		const struct ezp__stage_def *sd = &c->stages[i];
		if (sd->dormant ? atomic_load_explicit(&sd->awake, memory_order_acquire)
				: atomic_load_explicit(&sd->claim->holder, memory_order_acquire) != NULL)
			return true;
	}
	return false;
}

struct wake_job {
	struct ezp_worker *w;
	struct ezp__chain_def *c; /* ref'd */
	bool awake;
};

/* On @j->w: sessions running chain @j->c leave the fast path, or may rejoin it. */
static void wake_run(void *arg)
{
	struct wake_job *j = arg;
	struct ezp_session *s, *next;

	for (s = TAILQ_FIRST(&j->w->sessions); s; s = next) {
		next = TAILQ_NEXT(s, link);
		if (s->chain != j->c || s->closing)
			continue;
		ezp__session_enter(s);
		if (j->awake && s->bridged)
			ezp__session_unbridge(s);
		else if (!j->awake)
			ezp__session_check_fast_path(s);
		ezp__session_leave(s);
	}
	ezp__chain_unref(j->c);
	free(j);
}

void ezp__stage_wake(struct ezp_stage *stage, int awake)
{
	struct ezp__stage_def *sd = (struct ezp__stage_def *)stage;
	struct ezp_core_ctx *d;

	if (!sd || !sd->dormant || atomic_exchange(&sd->awake, awake != 0) == (awake != 0))
		return;
	d = sd->chain->d;
	if (!d->started)
		return; /* no session yet */
	for (unsigned i = 0; i < d->n_workers; i++) {
		struct wake_job *j = malloc(sizeof(*j));
		if (!j)
			continue; /* that worker's sessions notice at their next check */
		j->w = d->workers[i];
		j->c = ezp__chain_ref(sd->chain);
		j->awake = awake != 0;
		if (ezp__defer(j->w, wake_run, j) != EZP_OK) {
			ezp__chain_unref(j->c);
			free(j);
		}
	}
}

void ezp__chain_flush_claim(struct ezp_session *s, struct ezp__claim *claim)
{
	for (unsigned d = 0; d < 2; d++) {
		for (size_t i = 0; i < s->chain->n && !s->closing; i++) {
			struct ezp__stage *st = &s->dir[d].stages[i];
			struct ezp__entry *e;
			bool any = false;
			if (claim && s->chain->stages[i].claim != claim)
				continue;
			TAILQ_FOREACH(e, &st->q, link) {
				if (e->state != EZP__E_HELD)
					continue;
				ezp__map_del(&s->w->holds, e->hold_id);
				e->state = EZP__E_DONE;
				e->verdict = e->default_drop ? EZP_VERDICT_DROP : EZP_VERDICT_PASS;
				st->held--;
				any = true;
			}
			if (any)
				stage_pump(s, d, (unsigned)i);
		}
	}
	ezp__session_update_pause(s);
}

void ezp__chain_maybe_switch(struct ezp_session *s)
{
	struct ezp__chain_def *old;

	if (!s->next_chain || !ezp__chain_empty(s))
		return;
	for (size_t i = 0; i < s->chain->n; i++) {
		const struct ezp_filter_kind *k = s->chain->stages[i].kind;
		if (k->session_event && EZP_HAS(k, session_event))
			k->session_event(s->chain->stages[i].instances[s->w->index], s,
					 EZP_SESSION_CLOSED, &s->fstate[i]);
	}
	ezp__chain_fini(s);
	old = s->chain;
	s->chain = s->next_chain;
	s->gen_no = s->next_gen_no;
	s->next_chain = NULL;
	if (ezp__chain_init(s) != EZP_OK) {
		ezp__chain_unref(old);
		ezp__session_close(s, EZP_CLOSE_ERROR, "out of memory switching filters");
		return;
	}
	ezp__chain_unref(old);
	for (size_t i = 0; i < s->chain->n; i++) {
		const struct ezp_filter_kind *k = s->chain->stages[i].kind;
		if (k->session_event && EZP_HAS(k, session_event))
			k->session_event(s->chain->stages[i].instances[s->w->index], s,
					 EZP_SESSION_OPENED, &s->fstate[i]);
	}
	ezp__log(EZP_LOG_DEBUG, "chain", "session %lu now runs %zu filter(s)", (unsigned long)s->id,
		 s->chain->n);
}
