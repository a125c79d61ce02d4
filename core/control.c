/*
 * control.c - the embedding API's calls on pipelines and sessions
 * (ezproxy.h): each is posted to the owning worker and, in the _sync
 * style of this file, waits for the answer. Thread: control (never a
 * worker: these calls block).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core.h"

/* A waiter shared by the caller and a done callback (refcounted: either may go first). */
struct waiter {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int refs;
	bool done;
	int status;
	char message[256];
};

static struct waiter *waiter_new(void)
{
	struct waiter *wt = calloc(1, sizeof(*wt));

	if (!wt)
		return NULL;
	pthread_mutex_init(&wt->lock, NULL);
	pthread_cond_init(&wt->cond, NULL);
	wt->refs = 2;
	return wt;
}

static void waiter_unref(struct waiter *wt)
{
	int left;

	pthread_mutex_lock(&wt->lock);
	left = --wt->refs;
	pthread_mutex_unlock(&wt->lock);
	if (left)
		return;
	pthread_cond_destroy(&wt->cond);
	pthread_mutex_destroy(&wt->lock);
	free(wt);
}

static void waiter_done(void *arg, int status, const char *message)
{
	struct waiter *wt = arg;

	pthread_mutex_lock(&wt->lock);
	if (!wt->done) {
		wt->done = true;
		wt->status = status;
		snprintf(wt->message, sizeof(wt->message), "%s", message ? message : "");
		pthread_cond_signal(&wt->cond);
	}
	pthread_mutex_unlock(&wt->lock);
	waiter_unref(wt);
}

/* Wait up to @ms (0 = forever). Returns 1 when done. */
static int waiter_wait(struct waiter *wt, unsigned ms)
{
	struct timespec ts;
	int done;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&wt->lock);
	while (!wt->done) {
		if (!ms)
			pthread_cond_wait(&wt->cond, &wt->lock);
		else if (pthread_cond_timedwait(&wt->cond, &wt->lock, &ts) == ETIMEDOUT)
			break;
	}
	done = wt->done;
	pthread_mutex_unlock(&wt->lock);
	return done;
}

static int fail_msg(struct ezp_error *err, int code, const char *fmt, const char *arg)
{
	struct ezp_error tmp;

	return ezp__error_set(err ? err : &tmp, code, EZP_SIDE_INTERNAL, "", 0, 0, fmt, arg);
}

static struct ezp__pipeline *find_pipeline(struct ezp_core_ctx *d, const char *name,
					   struct ezp_error *err)
{
	struct ezp__pipeline *p = name ? ezp__pipeline_find(d, name) : NULL;

	if (!p)
		fail_msg(err, EZP_ERR_NOT_FOUND, "no pipeline named '%s'", name ? name : "(null)");
	return p;
}

int ezp_pipeline_bound(struct ezp_daemon *dd, const char *pipeline, struct ezp_addr *out)
{
	struct ezp__pipeline *p = ezp__pipeline_find((struct ezp_core_ctx *)dd, pipeline);

	if (!p || !p->listener)
		return EZP_ERR_NOT_FOUND;
	*out = p->listener->bound;
	return EZP_OK;
}

/* Live changes keep the daemon's config in step (config read shows them). */
int ezp_pipeline_swap_to(struct ezp_daemon *dd, const char *pipeline, const char *to_yaml,
			 int apply_to_existing, struct ezp_error *err)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	struct ezp__pipeline *p = find_pipeline(d, pipeline, err);
	struct ezp__pipeline_conf *pc;
	struct ezp__kind_conf kc, saved;
	struct ezp_addr to;
	struct ezp__kind_lookup lookup;
	struct ezp__pipe_gen *g;
	struct ezp_error tmp = {0};
	int rc;

	if (!err)
		err = &tmp;
	if (!p)
		return EZP_ERR_NOT_FOUND;
	pc = ezp__config_find(d->cfg, pipeline);
	ezp__registry_lookup(d, &lookup);
	rc = ezp__kind_conf_parse(to_yaml, 0, &lookup, &kc, err);
	if (rc != EZP_OK)
		return rc;
	if (!kc.transport->connect_params) {
		ezp__kind_conf_clear(&kc);
		return fail_msg(err, EZP_ERR_CONFIG, "transport '%s' cannot connect", kc.kind);
	}
	saved = pc->to;
	pc->to = kc;
	rc = ezp__gen_build(d, p, pc, p->gen->chain, &g, err);
	if (rc != EZP_OK) {
		pc->to = saved;
		ezp__kind_conf_clear(&kc);
		return rc;
	}
	ezp__kind_conf_clear(&saved);
	to = g->to_addr;
	ezp__pipeline_set_gen(p, g);
	if (apply_to_existing)
		ezp__pipeline_swap_existing(p, &to);
	return EZP_OK;
}

int ezp_pipeline_set_filters(struct ezp_daemon *dd, const char *pipeline,
			     const char *through_yaml, struct ezp_error *err)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	struct ezp__pipeline *p = find_pipeline(d, pipeline, err);
	struct ezp__pipeline_conf *pc;
	struct ezp__kind_conf *items = NULL, *saved;
	struct ezp__kind_lookup lookup;
	struct ezp__pipe_gen *g;
	size_t n = 0, n_saved;
	struct ezp_error tmp = {0};
	int rc = EZP_OK;

	if (!err)
		err = &tmp;
	if (!p)
		return EZP_ERR_NOT_FOUND;
	pc = ezp__config_find(d->cfg, pipeline);
	ezp__registry_lookup(d, &lookup);
	rc = ezp__through_parse(through_yaml, &lookup, &items, &n, err);
	if (rc != EZP_OK)
		return rc;
	saved = pc->through;
	n_saved = pc->n_through;
	pc->through = items;
	pc->n_through = n;
	rc = ezp__gen_build(d, p, pc, NULL, &g, err);
	if (rc != EZP_OK) {
		pc->through = saved;
		pc->n_through = n_saved;
		for (size_t i = 0; i < n; i++)
			ezp__kind_conf_clear(&items[i]);
		free(items);
		return rc;
	}
	for (size_t i = 0; i < n_saved; i++)
		ezp__kind_conf_clear(&saved[i]);
	free(saved);
	ezp__pipeline_set_gen(p, g);
	return EZP_OK;
}

int ezp_pipeline_restart(struct ezp_daemon *dd, const char *pipeline, int close_sessions,
			 struct ezp_error *err)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	struct ezp__pipeline *p = find_pipeline(d, pipeline, err);
	struct ezp_listener *l;
	struct ezp_error tmp = {0};
	int rc;

	if (!err)
		err = &tmp;
	if (!p)
		return EZP_ERR_NOT_FOUND;
	rc = ezp__listener_open(p, &p->conf->from, p->conf->shared, &l, err);
	if (rc != EZP_OK)
		return rc;
	ezp__pipeline_set_listener(p, l);
	if (close_sessions)
		ezp__pipeline_close_sessions(d, p);
	return EZP_OK;
}

/* ---- sessions ---- */

struct list_ctx {
	const char *pipeline;
	struct ezp_session_summary *v;
	size_t n, cap;
	int rc;
};

static void list_worker(struct ezp_worker *w, void *arg)
{
	struct list_ctx *lc = arg;
	struct ezp_session *s;

	TAILQ_FOREACH(s, &w->sessions, link) {
		struct ezp_session_summary *x;
		if (s->closing || (lc->pipeline && strcmp(lc->pipeline, s->p->name)))
			continue;
		if (lc->n == lc->cap) {
			size_t cap = lc->cap ? lc->cap * 2 : 16;
			struct ezp_session_summary *v = realloc(lc->v, cap * sizeof(*v));
			if (!v) {
				lc->rc = EZP_ERR_NOMEM;
				return;
			}
			lc->v = v;
			lc->cap = cap;
		}
		x = &lc->v[lc->n++];
		memset(x, 0, sizeof(*x));
		x->struct_size = sizeof(*x);
		x->id = s->id;
		snprintf(x->pipeline, sizeof(x->pipeline), "%s", s->p->name);
		snprintf(x->transport, sizeof(x->transport), "%s", s->transport);
		if (s->n_clients)
			x->client = s->clients[0]->peer;
		x->server = s->server_addr;
		x->n_clients = s->n_clients;
		x->opened_us = s->opened_us;
		x->last_activity_us = s->last_us;
		memcpy(x->bytes, s->bytes, sizeof(x->bytes));
		memcpy(x->packets, s->packets, sizeof(x->packets));
		x->dropped = s->dropped;
		x->replaced = s->replaced;
		x->injected = s->injected;
		x->bridged = s->bridged;
		for (unsigned k = 0; k < s->n_clients && k < EZP_ARRAY_LEN(x->clients); k++)
			x->clients[k] = s->clients[k]->peer;
		x->closing = s->closing;
	}
}

int ezp_daemon_sessions(struct ezp_daemon *dd, const char *pipeline,
			struct ezp_session_summary **out, size_t *n)
{
	struct list_ctx lc = {.pipeline = pipeline};

	ezp__workers_each((struct ezp_core_ctx *)dd, list_worker, &lc);
	if (lc.rc != EZP_OK) {
		free(lc.v);
		return lc.rc;
	}
	*out = lc.v;
	*n = lc.n;
	return EZP_OK;
}

int ezp_session_inject(struct ezp_daemon *dd, uint64_t session_id, int dir, const void *data,
		       size_t len, struct ezp_error *err)
{
	struct waiter *wt = waiter_new();
	int rc;

	if (!wt)
		return EZP_ERR_NOMEM;
	rc = ezp__inject_by_id((struct ezp_core_ctx *)dd, session_id, dir, data, len, waiter_done,
			       wt);
	if (rc != EZP_OK) {
		waiter_unref(wt);
		waiter_unref(wt);
		return fail_msg(err, rc, "cannot inject: %s", ezp__status_str(rc));
	}
	waiter_wait(wt, 0);
	rc = wt->status;
	if (rc != EZP_OK)
		fail_msg(err, rc, "cannot inject: %s", wt->message);
	waiter_unref(wt);
	return rc;
}

int ezp_session_close(struct ezp_daemon *dd, uint64_t session_id, struct ezp_error *err)
{
	struct waiter *wt = waiter_new();
	int rc;

	if (!wt)
		return EZP_ERR_NOMEM;
	rc = ezp__close_by_id((struct ezp_core_ctx *)dd, session_id, waiter_done, wt);
	if (rc != EZP_OK) {
		waiter_unref(wt);
		waiter_unref(wt);
		return fail_msg(err, rc, "cannot close: %s", "session not found");
	}
	waiter_wait(wt, 0);
	rc = wt->status;
	waiter_unref(wt);
	return rc;
}

struct swap_req {
	uint64_t id;
	struct ezp_addr addr;
	int dial, add, server;
	struct waiter *wt;
};

static void swap_run(void *arg)
{
	struct swap_req *r = arg;
	struct ezp_session *s = ezp__session_find_local(ezp__worker_current(), r->id);
	int rc;

	if (!s) {
		waiter_done(r->wt, EZP_ERR_NOT_FOUND, "session not found");
	} else {
		ezp__session_enter(s);
		rc = r->server ? ezp__session_swap_server(s, &r->addr, waiter_done, r->wt)
			       : ezp__session_swap_client(s, &r->addr, r->dial, r->add, waiter_done,
							  r->wt);
		if (rc != EZP_OK)
			waiter_done(r->wt, rc, ezp__status_str(rc));
		ezp__session_leave(s);
	}
	free(r);
}

static int swap_post(struct ezp_core_ctx *d, uint64_t id, const char *addr, int server, int dial,
		     int add, unsigned timeout_ms, struct ezp_error *err)
{
	struct ezp_worker *w = ezp__session_worker(d, id);
	struct swap_req *r;
	struct waiter *wt;
	struct ezp_error tmp = {0};
	int rc;

	if (!err)
		err = &tmp;
	if (!w) {
		char id_text[24];
		snprintf(id_text, sizeof(id_text), "%lu", (unsigned long)id);
		return fail_msg(err, EZP_ERR_NOT_FOUND, "session %s not found", id_text);
	}
	r = calloc(1, sizeof(*r));
	if (!r)
		return EZP_ERR_NOMEM;
	rc = ezp__addr_parse(addr, &r->addr, err);
	if (rc != EZP_OK) {
		free(r);
		return rc;
	}
	wt = waiter_new();
	if (!wt) {
		free(r);
		return EZP_ERR_NOMEM;
	}
	r->id = id;
	r->server = server;
	r->dial = dial;
	r->add = add;
	r->wt = wt;
	rc = ezp__defer(w, swap_run, r);
	if (rc != EZP_OK) {
		free(r);
		waiter_unref(wt);
		waiter_unref(wt);
		return fail_msg(err, rc, "%s", ezp__status_str(rc));
	}
	if (!waiter_wait(wt, timeout_ms)) {
		/* accept mode and nobody came: take the route back */
		struct ezp__pipeline *p;
		bool cancelled = false;
		LIST_FOREACH(p, &d->pipelines, link)
			if (ezp__pipeline_route_cancel(p, wt))
				cancelled = true;
		if (cancelled) {
			waiter_unref(wt);
			waiter_unref(wt);
			return fail_msg(err, EZP_ERR_TIMEOUT, "no client came from %s in time", addr);
		}
		waiter_wait(wt, 0); /* it was taken just now: its answer is on the way */
	}
	rc = wt->status;
	if (rc != EZP_OK)
		fail_msg(err, rc, "%s", wt->message[0] ? wt->message : ezp__status_str(rc));
	waiter_unref(wt);
	return rc;
}

int ezp_session_swap_server(struct ezp_daemon *dd, uint64_t session_id, const char *addr,
			    struct ezp_error *err)
{
	return swap_post((struct ezp_core_ctx *)dd, session_id, addr, 1, 1, 0, 0, err);
}

int ezp_session_swap_client(struct ezp_daemon *dd, uint64_t session_id, const char *addr,
			    int dial, int add, unsigned timeout_ms, struct ezp_error *err)
{
	return swap_post((struct ezp_core_ctx *)dd, session_id, addr, 0, dial, add,
			 dial ? 0 : (timeout_ms ? timeout_ms : 30000), err);
}

/* ---- exclusive filters ---- */

struct ezp_claim {
	struct ezp_core_ctx *d;
	struct ezp__holder *h;
};

/* A claimed slot: sessions of the pipeline leave the fast path so the holder sees their bytes. */
static void claim_worker(struct ezp_worker *w, void *arg)
{
	struct ezp__pipeline *p = arg;
	struct ezp_session *s, *next;

	for (s = TAILQ_FIRST(&w->sessions); s; s = next) {
		next = TAILQ_NEXT(s, link);
		if (s->p != p || s->closing || !s->bridged)
			continue;
		ezp__session_enter(s);
		ezp__session_unbridge(s);
		ezp__session_leave(s);
	}
}

int ezp_filter_claim(struct ezp_daemon *dd, const char *pipeline, const char *key,
		     const struct ezp_filter_holder *holder, struct ezp_claim **out,
		     struct ezp_error *err)
{
	return ezp__filter_claim((struct ezp_core_ctx *)dd, pipeline, key, holder, NULL, out, err);
}

int ezp__filter_claim(struct ezp_core_ctx *d, const char *pipeline, const char *key,
		      const struct ezp_filter_holder *holder, const struct ezp_claim_opts *opts,
		      struct ezp_claim **out, struct ezp_error *err)
{
	struct ezp__pipeline *p = find_pipeline(d, pipeline, err);
	struct ezp__claim *slot = NULL, *c;
	struct ezp__holder *h, *expected = NULL;
	struct ezp_claim *cl;

	if (!p)
		return EZP_ERR_NOT_FOUND;
	if (!holder || !holder->on_packet)
		return fail_msg(err, EZP_ERR_INVAL, "a holder needs on_packet%s", "");
	pthread_mutex_lock(&p->lock);
	LIST_FOREACH(c, &p->claims, link)
		if (!strcmp(c->key, key))
			slot = c;
	pthread_mutex_unlock(&p->lock);
	if (!slot)
		return fail_msg(err, EZP_ERR_NOT_FOUND, "pipeline has no exclusive filter '%s'", key);
	h = calloc(1, sizeof(*h));
	cl = calloc(1, sizeof(*cl));
	if (!h || !cl) {
		free(h);
		free(cl);
		return EZP_ERR_NOMEM;
	}
	memcpy(&h->h, holder, holder->struct_size < sizeof(h->h) ? holder->struct_size
								  : sizeof(h->h));
	h->name = strdup(holder->name ? holder->name : "anonymous");
	h->h.name = h->name;
	h->slot = slot;
	h->p = p;
	h->default_verdict = -1;
	if (opts && EZP_HAS(opts, default_verdict)) {
		h->timeout_ms = opts->timeout_ms;
		if (opts->default_verdict == EZP_VERDICT_PASS ||
		    opts->default_verdict == EZP_VERDICT_DROP)
			h->default_verdict = opts->default_verdict;
	}
	atomic_fetch_add(&p->srefs, 1);
	if (!atomic_compare_exchange_strong(&slot->holder, &expected, h)) {
		struct ezp_error tmp;
		ezp__error_set(err ? err : &tmp, EZP_ERR_BUSY, EZP_SIDE_CLIENT, "", 0, 0,
			       "filter held by %s", expected->name);
		ezp__pipeline_unref(p);
		free(h->name);
		free(h);
		free(cl);
		return EZP_ERR_BUSY;
	}
	cl->d = d;
	cl->h = h;
	if (d->started)
		ezp__workers_each(d, claim_worker, p);
	*out = cl;
	return EZP_OK;
}

static void release_worker(struct ezp_worker *w, void *arg)
{
	struct ezp__holder *h = arg;
	struct ezp_session *s, *next;

	for (s = TAILQ_FIRST(&w->sessions); s; s = next) {
		next = TAILQ_NEXT(s, link);
		if (s->p != h->p || s->closing)
			continue;
		ezp__session_enter(s);
		ezp__chain_flush_claim(s, h->slot);
		if (!s->closing)
			ezp__session_check_fast_path(s);
		ezp__session_leave(s);
	}
}

void ezp_claim_release(struct ezp_claim *cl)
{
	struct ezp__holder *h;

	if (!cl)
		return;
	h = cl->h;
	atomic_store(&h->slot->holder, NULL);
	if (cl->d->started)
		ezp__workers_each(cl->d, release_worker, h);
	if (h->h.on_released)
		h->h.on_released(h->h.userdata);
	ezp__pipeline_unref(h->p);
	free(h->name);
	free(h);
	free(cl);
}

int ezp_filter_answer(struct ezp_daemon *dd, uint64_t hold_id, int verdict, const void *data,
		      size_t len)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	struct ezp_packet *repl = NULL;

	if (verdict == EZP_VERDICT_REPLACE) {
		repl = ezp__packet_copy(data, len);
		if (!repl)
			return EZP_ERR_NOMEM;
	}
	return d->table.filter_answer(d, hold_id, verdict, repl);
}

int ezp_tap_subscribe(struct ezp_daemon *dd, const struct ezp_tap_opts *opts,
		      struct ezp_tap **out)
{
	return ezp__tap_subscribe((struct ezp_core_ctx *)dd, opts, out);
}

void ezp_tap_unsubscribe(struct ezp_tap *tap)
{
	ezp__tap_unsubscribe(tap);
}
