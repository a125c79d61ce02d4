/*
 * tap.c - taps: read-only subscribers to packets and session events.
 * Producers are workers; each (tap, worker) pair has its own bounded ring
 * guarded by a lock only that worker and the consumer take, so no lock is
 * shared across workers. A full ring drops its oldest event and counts it
 * (`lagged`); traffic never waits for a tap. Callbacks run on the tap's
 * delivery worker. Thread: as each function says.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

struct tap_rec {
	int type;
	uint64_t session_id;
	char pipeline[72];
	struct ezp_packet *pkt, *orig;
	uint32_t flags;
	int verdict;
	struct ezp_addr src, dst;
	struct ezp_session_info info;
	char transport[16];
	char close_text[160];
};

struct ezp__tap_slot {
	pthread_mutex_t lock;
	struct tap_rec *ring;
	unsigned cap, head, count;
	uint64_t lagged;
};

struct ezp_tap {
	struct ezp_core_ctx *d;
	struct ezp_tap_opts opts;
	char *pipeline;
	atomic_uint refs;
	atomic_bool dead;
	atomic_bool notify;
	pthread_mutex_t cb_lock;
	struct ezp_worker *deliver;
	uint64_t seq;
	struct ezp__tap_slot *slots; /* [n_workers] */
	LIST_ENTRY(ezp_tap) link;
};

static void rec_clear(struct tap_rec *r)
{
	ezp__packet_unref(r->pkt);
	ezp__packet_unref(r->orig);
	r->pkt = r->orig = NULL;
}

static void tap_unref(struct ezp_tap *t)
{
	if (atomic_fetch_sub(&t->refs, 1) != 1)
		return;
	for (unsigned w = 0; w < t->d->n_workers; w++) {
		struct ezp__tap_slot *sl = &t->slots[w];
		for (unsigned i = 0; i < sl->count; i++)
			rec_clear(&sl->ring[(sl->head + i) % sl->cap]);
		free(sl->ring);
		pthread_mutex_destroy(&sl->lock);
	}
	free(t->slots);
	free(t->pipeline);
	pthread_mutex_destroy(&t->cb_lock);
	free(t);
}

static bool tap_matches(const struct ezp_tap *t, const struct ezp_session *s)
{
	if (atomic_load_explicit(&t->dead, memory_order_relaxed))
		return false;
	if (t->pipeline && strcmp(t->pipeline, s->p->name))
		return false;
	return !t->opts.session_id || t->opts.session_id == s->id;
}

/* Thread: the session's worker. */
bool ezp__tap_wants(struct ezp_session *s)
{
	for (size_t i = 0; i < s->w->n_taps; i++)
		if (tap_matches(s->w->taps[i], s))
			return true;
	return false;
}

/* Thread: the delivery worker. Hand queued events to the callbacks. */
static void tap_drain(void *arg)
{
	struct ezp_tap *t = arg;
	unsigned n_workers = t->d->n_workers;

	atomic_store(&t->notify, false);
	for (unsigned w = 0; w < n_workers; w++) {
		struct ezp__tap_slot *sl = &t->slots[w];
		struct tap_rec *batch;
		unsigned n;
		uint64_t lagged;

		pthread_mutex_lock(&sl->lock);
		n = sl->count;
		lagged = sl->lagged;
		sl->lagged = 0;
		batch = n ? malloc(n * sizeof(*batch)) : NULL;
		if (batch) {
			for (unsigned i = 0; i < n; i++)
				batch[i] = sl->ring[(sl->head + i) % sl->cap];
			sl->head = 0;
			sl->count = 0;
		} else {
			n = 0;
		}
		pthread_mutex_unlock(&sl->lock);

		pthread_mutex_lock(&t->cb_lock);
		if (!atomic_load(&t->dead)) {
			if (lagged) {
				atomic_fetch_add(&t->d->tap_drops, lagged);
				t->seq += lagged;
				if (t->opts.on_lagged)
					t->opts.on_lagged(t->opts.userdata, lagged);
			}
			for (unsigned i = 0; i < n && !atomic_load(&t->dead); i++) {
				struct tap_rec *r = &batch[i];
				struct ezp_tap_event ev = {
					.struct_size = sizeof(ev),
					.type = r->type,
					.seq = ++t->seq,
					.pipeline = r->pipeline,
					.session_id = r->session_id,
					.pkt = r->pkt,
					.original = r->orig,
					.flags = r->flags,
					.verdict = r->verdict,
					.src = r->src,
					.dst = r->dst,
				};
				if (r->type != EZP_TAP_PACKET) {
					r->info.pipeline = r->pipeline;
					r->info.transport = r->transport;
					r->info.close_text = r->close_text;
					ev.info = &r->info;
				}
				if (t->opts.on_event)
					t->opts.on_event(t->opts.userdata, &ev);
			}
		}
		pthread_mutex_unlock(&t->cb_lock);
		for (unsigned i = 0; i < n; i++)
			rec_clear(&batch[i]);
		free(batch);
	}
	tap_unref(t);
}

/* Thread: a worker. Queue @r (moved in) for @t, dropping the oldest if full. */
static void tap_push(struct ezp_tap *t, struct ezp_worker *w, struct tap_rec *r)
{
	struct ezp__tap_slot *sl = &t->slots[w->index];
	struct tap_rec old = {0};
	bool drop_old = false;

	pthread_mutex_lock(&sl->lock);
	if (sl->count == sl->cap) {
		old = sl->ring[sl->head];
		sl->head = (sl->head + 1) % sl->cap;
		sl->count--;
		sl->lagged++;
		drop_old = true;
	}
	sl->ring[(sl->head + sl->count) % sl->cap] = *r;
	sl->count++;
	pthread_mutex_unlock(&sl->lock);
	if (drop_old)
		rec_clear(&old);
	if (!atomic_exchange(&t->notify, true)) {
		atomic_fetch_add(&t->refs, 1);
		if (ezp__defer(t->deliver, tap_drain, t) != EZP_OK) {
			atomic_store(&t->notify, false);
			tap_unref(t);
		}
	}
}

static void rec_fill(struct tap_rec *r, struct ezp_session *s, int type)
{
	memset(r, 0, sizeof(*r));
	r->type = type;
	r->session_id = s->id;
	snprintf(r->pipeline, sizeof(r->pipeline), "%s", s->p->name);
}

void ezp__tap_packet(struct ezp_session *s, unsigned dir, const struct ezp_packet *pkt,
		     const struct ezp_packet *orig, uint32_t flags, int verdict)
{
	struct ezp_worker *w = s->w;
	struct ezp_addr client = {0};

	if (s->n_clients)
		client = s->clients[pkt->leg < s->n_clients ? pkt->leg : 0]->peer;
	for (size_t i = 0; i < w->n_taps; i++) {
		struct ezp_tap *t = w->taps[i];
		struct tap_rec r;
		if (!tap_matches(t, s))
			continue;
		rec_fill(&r, s, EZP_TAP_PACKET);
		r.pkt = ezp__packet_ref((struct ezp_packet *)pkt);
		r.orig = ezp__packet_ref((struct ezp_packet *)orig);
		r.flags = flags;
		r.verdict = verdict;
		r.src = dir == EZP_DIR_TO_SERVER ? client : s->server_addr;
		r.dst = dir == EZP_DIR_TO_SERVER ? s->server_addr : client;
		tap_push(t, w, &r);
	}
}

void ezp__tap_session(struct ezp_session *s, int type)
{
	struct ezp_worker *w = s->w;

	for (size_t i = 0; i < w->n_taps; i++) {
		struct ezp_tap *t = w->taps[i];
		struct tap_rec r;
		if (!tap_matches(t, s))
			continue;
		rec_fill(&r, s, type);
		ezp__session_info(s, &r.info);
		snprintf(r.transport, sizeof(r.transport), "%s", s->transport);
		snprintf(r.close_text, sizeof(r.close_text), "%s", s->close_text);
		r.src = r.info.client;
		r.dst = r.info.server;
		tap_push(t, w, &r);
	}
}

/* Thread: worker @w. Rebuild this worker's view of the tap list. */
static void taps_refresh(struct ezp_worker *w, void *arg)
{
	struct ezp_core_ctx *d = w->d;
	struct ezp_tap **old = w->taps, **fresh = NULL;
	size_t n_old = w->n_taps, n = 0;
	struct ezp_tap *t;
	struct ezp_session *s, *next;

	(void)arg;
	pthread_mutex_lock(&d->lock);
	LIST_FOREACH(t, &d->taps, link)
		n++;
	if (n)
		fresh = calloc(n, sizeof(*fresh));
	n = 0;
	if (fresh) {
		LIST_FOREACH(t, &d->taps, link) {
			atomic_fetch_add(&t->refs, 1);
			fresh[n++] = t;
		}
	}
	pthread_mutex_unlock(&d->lock);
	w->taps = fresh;
	w->n_taps = n;
	for (size_t i = 0; i < n_old; i++)
		tap_unref(old[i]);
	free(old);
	/* sessions a tap now watches leave the fast path; others may take it */
	for (s = TAILQ_FIRST(&w->sessions); s; s = next) {
		next = TAILQ_NEXT(s, link);
		ezp__session_enter(s);
		if (s->bridged && ezp__tap_wants(s))
			ezp__session_unbridge(s);
		else if (!s->bridged)
			ezp__session_check_fast_path(s);
		ezp__session_leave(s);
	}
}

static void taps_refresh_deferred(void *arg)
{
	taps_refresh(arg, NULL);
}

/*
 * Thread: control, before the workers start: taps subscribed before start
 * see the first session too (the workers have no session and run nothing yet).
 */
void ezp__taps_start(struct ezp_core_ctx *d)
{
	for (unsigned i = 0; i < d->n_workers; i++)
		taps_refresh(d->workers[i], NULL);
}

/* Every worker rebuilds its view: waits when called off the workers. */
static void taps_changed(struct ezp_core_ctx *d)
{
	if (!d->started)
		return;
	if (ezp__off_workers(d)) {
		ezp__workers_each(d, taps_refresh, NULL);
		return;
	}
	for (unsigned i = 0; i < d->n_workers; i++)
		ezp__defer(d->workers[i], taps_refresh_deferred, d->workers[i]);
}

int ezp__tap_subscribe(struct ezp_core_ctx *d, const struct ezp_tap_opts *opts,
		       struct ezp_tap **out)
{
	struct ezp_tap *t;
	unsigned cap;

	if (!opts || !out || opts->struct_size < offsetof(struct ezp_tap_opts, on_lagged) +
							 sizeof(opts->on_lagged))
		return EZP_ERR_INVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return EZP_ERR_NOMEM;
	t->d = d;
	memcpy(&t->opts, opts, sizeof(t->opts));
	t->pipeline = ezp__strdup(opts->pipeline);
	atomic_init(&t->refs, 1);
	pthread_mutex_init(&t->cb_lock, NULL);
	t->deliver = opts->deliver_on ? opts->deliver_on : d->workers[0];
	cap = opts->capacity ? opts->capacity
			     : (unsigned)(d->cfg ? d->cfg->limits.tap_buffer : 4096);
	t->slots = calloc(d->n_workers, sizeof(*t->slots));
	if (!t->slots || (opts->pipeline && !t->pipeline))
		goto fail;
	for (unsigned w = 0; w < d->n_workers; w++) {
		pthread_mutex_init(&t->slots[w].lock, NULL);
		t->slots[w].cap = cap;
		t->slots[w].ring = calloc(cap, sizeof(struct tap_rec));
		if (!t->slots[w].ring)
			goto fail;
	}
	pthread_mutex_lock(&d->lock);
	LIST_INSERT_HEAD(&d->taps, t, link);
	pthread_mutex_unlock(&d->lock);
	taps_changed(d);
	*out = t;
	return EZP_OK;
fail:
	tap_unref(t);
	return EZP_ERR_NOMEM;
}

void ezp__tap_unsubscribe(struct ezp_tap *t)
{
	struct ezp_core_ctx *d;

	if (!t)
		return;
	d = t->d;
	pthread_mutex_lock(&t->cb_lock); /* waits for a running callback batch */
	atomic_store(&t->dead, true);
	pthread_mutex_unlock(&t->cb_lock);
	pthread_mutex_lock(&d->lock);
	LIST_REMOVE(t, link);
	pthread_mutex_unlock(&d->lock);
	taps_changed(d);
	tap_unref(t);
}

/* Thread: control, after the workers stopped. */
void ezp__taps_free(struct ezp_core_ctx *d)
{
	struct ezp_tap *t;

	for (unsigned i = 0; i < d->n_workers; i++) {
		struct ezp_worker *w = d->workers[i];
		for (size_t j = 0; j < w->n_taps; j++)
			tap_unref(w->taps[j]);
		free(w->taps);
		w->taps = NULL;
		w->n_taps = 0;
	}
	while ((t = LIST_FIRST(&d->taps))) {
		LIST_REMOVE(t, link);
		atomic_store(&t->dead, true);
		tap_unref(t);
	}
}
