/*
 * pipeline.c - pipelines: their generations (the `to` endpoint and filter
 * chain new sessions get), listeners, the routes that send an arriving
 * client into an existing session, and exclusive filter claims.
 * Thread: control unless a function says otherwise.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* ---- chains and generations ---- */

struct ezp__chain_def *ezp__chain_ref(struct ezp__chain_def *c)
{
	if (c)
		atomic_fetch_add(&c->refs, 1);
	return c;
}

/* Thread: any; the last reference destroys the filter instances. */
void ezp__chain_unref(struct ezp__chain_def *c)
{
	if (!c || atomic_fetch_sub(&c->refs, 1) != 1)
		return;
	for (size_t i = 0; i < c->n; i++) {
		struct ezp__stage_def *sd = &c->stages[i];
		for (unsigned w = 0; sd->instances && w < c->d->n_workers; w++)
			if (sd->instances[w])
				sd->kind->destroy(sd->instances[w]);
		free(sd->instances);
		ezp__kind_conf_clear(&sd->conf);
	}
	free(c->stages);
	free(c);
}

/* The claim key of an exclusive filter: "kind" or "kind:Name". */
void ezp__claim_key(const struct ezp__kind_conf *kc, char *buf, size_t len)
{
	const struct ezp_param *pr;

	snprintf(buf, len, "%s", kc->kind);
	for (pr = kc->params; pr && pr->key; pr++) {
		if (pr->type == EZP_PARAM_STRING && !strcmp(pr->key, "Name") && kc->config) {
			const char *name = *(char *const *)((const char *)kc->config + pr->offset);
			if (name)
				snprintf(buf, len, "%s:%s", kc->kind, name);
		}
	}
}

struct ezp__claim *ezp__claim_slot(struct ezp__pipeline *p, const char *key)
{
	struct ezp__claim *c;

	LIST_FOREACH(c, &p->claims, link)
		if (!strcmp(c->key, key))
			return c;
	c = calloc(1, sizeof(*c));
	if (!c || !(c->key = strdup(key))) {
		free(c);
		return NULL;
	}
	atomic_init(&c->holder, NULL);
	LIST_INSERT_HEAD(&p->claims, c, link);
	return c;
}

static int chain_build(struct ezp_core_ctx *d, struct ezp__pipeline *p,
		       const struct ezp__pipeline_conf *pc, struct ezp__chain_def **out,
		       struct ezp_error *err)
{
	struct ezp__chain_def *c = calloc(1, sizeof(*c));
	int rc = EZP_OK;

	if (!c)
		return EZP_ERR_NOMEM;
	atomic_init(&c->refs, 1);
	c->d = d;
	c->stages = calloc(pc->n_through ? pc->n_through : 1, sizeof(*c->stages));
	if (!c->stages) {
		free(c);
		return EZP_ERR_NOMEM;
	}
	for (size_t i = 0; i < pc->n_through; i++) {
		struct ezp__stage_def *sd = &c->stages[i];
		c->n = i + 1;
		rc = ezp__kind_conf_copy(&sd->conf, &pc->through[i]);
		if (rc != EZP_OK)
			goto fail;
		sd->kind = pc->through[i].filter;
		sd->chain = c;
		sd->dormant = (sd->kind->flags & EZP_FILTER_DORMANT) &&
			      !(sd->kind->flags & EZP_FILTER_EXCLUSIVE);
		atomic_init(&sd->awake, false);
		if (!(sd->kind->flags & EZP_FILTER_EXCLUSIVE) && !sd->dormant)
			c->n_plain++;
		sd->instances = calloc(d->n_workers, sizeof(void *));
		if (!sd->instances) {
			rc = EZP_ERR_NOMEM;
			goto fail;
		}
		if (sd->kind->flags & EZP_FILTER_EXCLUSIVE) {
			char key[160];
			ezp__claim_key(&sd->conf, key, sizeof(key));
			pthread_mutex_lock(&p->lock);
			sd->claim = ezp__claim_slot(p, key);
			pthread_mutex_unlock(&p->lock);
			if (!sd->claim) {
				rc = EZP_ERR_NOMEM;
				goto fail;
			}
		}
		for (unsigned w = 0; w < d->n_workers; w++) {
			struct ezp_filter_ctx ctx = {
				.struct_size = sizeof(ctx),
				.core = &d->table,
				.worker = d->workers[w],
				.worker_index = w,
				.pipeline = p->name,
				.index = (unsigned)i,
				.stage = (struct ezp_stage *)sd,
			};
			rc = sd->kind->create(&ctx, sd->conf.config, &sd->instances[w], err);
			if (rc != EZP_OK) {
				if (!err->message[0])
					ezp__error_set(err, rc, EZP_SIDE_CONFIG, "", sd->conf.line,
						       sd->conf.column,
						       "pipeline '%s': filter '%s' could not start: %s",
						       p->name, sd->kind->name, ezp__status_str(rc));
				goto fail;
			}
		}
	}
	*out = c;
	return EZP_OK;
fail:
	ezp__chain_unref(c);
	return rc;
}

/* Thread: any. */
void ezp__endpoint_unref(struct ezp__endpoint *e)
{
	if (!e || atomic_fetch_sub(&e->refs, 1) != 1)
		return;
	ezp__kind_conf_clear(&e->conf);
	free(e);
}

void ezp__gen_unref(struct ezp__pipe_gen *g)
{
	if (!g || atomic_fetch_sub(&g->refs, 1) != 1)
		return;
	ezp__chain_unref(g->chain);
	ezp__endpoint_unref(g->to);
	free(g);
}

int ezp__gen_build(struct ezp_core_ctx *d, struct ezp__pipeline *p,
		   const struct ezp__pipeline_conf *pc, struct ezp__chain_def *reuse_chain,
		   struct ezp__pipe_gen **out, struct ezp_error *err)
{
	struct ezp__pipe_gen *g = calloc(1, sizeof(*g));
	int rc;

	if (!g)
		return EZP_ERR_NOMEM;
	atomic_init(&g->refs, 1);
	g->limits = pc->limits;
	g->shared = pc->shared;
	g->to = calloc(1, sizeof(*g->to));
	if (!g->to) {
		rc = EZP_ERR_NOMEM;
		goto fail;
	}
	atomic_init(&g->to->refs, 1);
	rc = ezp__kind_conf_copy(&g->to->conf, &pc->to);
	if (rc != EZP_OK)
		goto fail;
	if (!g->to->conf.transport->connect_address ||
	    g->to->conf.transport->connect_address(g->to->conf.config, &g->to_addr) != EZP_OK) {
		rc = ezp__error_set(err, EZP_ERR_CONFIG, EZP_SIDE_CONFIG, "", pc->to.line,
				    pc->to.column, "pipeline '%s': transport '%s' has no address to "
				    "connect to", pc->name, pc->to.kind);
		goto fail;
	}
	if (reuse_chain) {
		g->chain = ezp__chain_ref(reuse_chain);
	} else {
		rc = chain_build(d, p, pc, &g->chain, err);
		if (rc != EZP_OK)
			goto fail;
	}
	*out = g;
	return EZP_OK;
fail:
	ezp__gen_unref(g);
	return rc;
}

/* Thread: any. The generation new sessions get now (a reference). */
struct ezp__pipe_gen *ezp__pipeline_gen(struct ezp__pipeline *p)
{
	struct ezp__pipe_gen *g;

	pthread_mutex_lock(&p->lock);
	g = p->gen;
	atomic_fetch_add(&g->refs, 1);
	pthread_mutex_unlock(&p->lock);
	return g;
}

/* Thread: the session's worker. Pick up a changed generation. */
void ezp__pipeline_refresh_session(struct ezp_session *s)
{
	struct ezp__pipe_gen *g = ezp__pipeline_gen(s->p);

	s->limits.max_inject_bytes = g->limits.max_inject_bytes;
	s->limits.tap_buffer = g->limits.tap_buffer;
	if (g->chain != s->chain && g->chain != s->next_chain) {
		ezp__chain_unref(s->next_chain);
		s->next_chain = ezp__chain_ref(g->chain);
		s->next_gen_no = g->no;
		ezp__session_unbridge(s);
	} else if (g->chain == s->chain) {
		ezp__chain_unref(s->next_chain);
		s->next_chain = NULL;
		s->gen_no = g->no;
	}
	if (s->next_chain)
		ezp__chain_maybe_switch(s);
	if (!s->next_chain)
		s->gen_no = g->no;
	ezp__session_check_fast_path(s);
	ezp__gen_unref(g);
}

struct gen_poke {
	struct ezp__pipeline *p;
	const struct ezp_addr *to; /* apply_to_existing: swap servers */
};

static void swap_done_log(void *arg, int status, const char *message)
{
	uint64_t id = (uintptr_t)arg;

	if (status != EZP_OK)
		ezp__log(EZP_LOG_WARN, "pipeline", "session %lu keeps its server: %s",
			 (unsigned long)id, message ? message : ezp__status_str(status));
}

/* Thread: each worker. Sessions of @p that see no packets still move. */
static void gen_poke_worker(struct ezp_worker *w, void *arg)
{
	struct gen_poke *pk = arg;
	struct ezp_session *s, *next;

	for (s = TAILQ_FIRST(&w->sessions); s; s = next) {
		next = TAILQ_NEXT(s, link);
		if (s->p != pk->p || s->closing)
			continue;
		ezp__session_enter(s);
		ezp__pipeline_refresh_session(s);
		if (pk->to && !s->closing)
			ezp__session_swap_server(s, pk->to, swap_done_log, (void *)(uintptr_t)s->id);
		ezp__session_leave(s);
	}
}

void ezp__pipeline_set_gen(struct ezp__pipeline *p, struct ezp__pipe_gen *g)
{
	struct ezp__pipe_gen *old;
	struct gen_poke pk = {p, NULL};

	pthread_mutex_lock(&p->lock);
	old = p->gen;
	g->no = old ? old->no + 1 : 1;
	p->gen = g;
	atomic_store(&p->gen_no, g->no);
	pthread_mutex_unlock(&p->lock);
	ezp__gen_unref(old);
	if (p->d->started)
		ezp__workers_each(p->d, gen_poke_worker, &pk);
}

/* Swap existing sessions' servers to @to (apply_to_existing). */
void ezp__pipeline_swap_existing(struct ezp__pipeline *p, const struct ezp_addr *to)
{
	struct gen_poke pk = {p, to};

	if (p->d->started)
		ezp__workers_each(p->d, gen_poke_worker, &pk);
}

/* ---- create, listen, remove ---- */

int ezp__pipeline_create(struct ezp_core_ctx *d, const struct ezp__pipeline_conf *pc,
			 struct ezp__pipeline **out, struct ezp_error *err)
{
	struct ezp__pipeline *p = calloc(1, sizeof(*p));
	struct ezp__pipe_gen *g = NULL;
	int rc;

	if (!p)
		return EZP_ERR_NOMEM;
	p->d = d;
	pthread_mutex_init(&p->lock, NULL);
	LIST_INIT(&p->routes);
	LIST_INIT(&p->claims);
	atomic_init(&p->srefs, 1);
	p->name = strdup(pc->name);
	p->conf = calloc(1, sizeof(*p->conf));
	if (!p->name || !p->conf) {
		rc = EZP_ERR_NOMEM;
		goto fail;
	}
	p->conf->name = strdup(pc->name);
	if ((rc = ezp__kind_conf_copy(&p->conf->from, &pc->from)) != EZP_OK)
		goto fail;
	p->conf->shared = pc->shared;
	p->conf->limits = pc->limits;
	rc = ezp__gen_build(d, p, pc, NULL, &g, err);
	if (rc != EZP_OK)
		goto fail;
	p->gen = g;
	g->no = 1;
	atomic_store(&p->gen_no, 1);
	*out = p;
	return EZP_OK;
fail:
	ezp__pipeline_unref(p);
	return rc;
}

static void pipeline_conf_free(struct ezp__pipeline_conf *pc)
{
	if (!pc)
		return;
	free(pc->name);
	ezp__kind_conf_clear(&pc->from);
	free(pc);
}

/* Thread: any. */
void ezp__pipeline_unref(struct ezp__pipeline *p)
{
	struct ezp__claim *c;
	struct ezp__route *r;

	if (!p || atomic_fetch_sub(&p->srefs, 1) != 1)
		return;
	ezp__gen_unref(p->gen);
	while ((r = LIST_FIRST(&p->routes))) {
		LIST_REMOVE(r, link);
		if (r->done)
			r->done(r->done_arg, EZP_ERR_CLOSED, "pipeline removed");
		free(r);
	}
	while ((c = LIST_FIRST(&p->claims))) {
		LIST_REMOVE(c, link);
		free(c->key);
		free(c);
	}
	pipeline_conf_free(p->conf);
	pthread_mutex_destroy(&p->lock);
	free(p->name);
	free(p);
}

static void listener_free(struct ezp_listener *l)
{
	if (!l)
		return;
	ezp__kind_conf_clear(&l->conf);
	free(l->workers);
	free(l);
}

/* Open a listener for @from (not yet the pipeline's). */
int ezp__listener_open(struct ezp__pipeline *p, const struct ezp__kind_conf *from, bool shared,
		       struct ezp_listener **out, struct ezp_error *err)
{
	struct ezp_core_ctx *d = p->d;
	struct ezp_listener *l = calloc(1, sizeof(*l));
	struct ezp_listen_args args;
	int rc;

	if (!l)
		return EZP_ERR_NOMEM;
	l->p = p;
	l->kind = from->transport;
	if ((rc = ezp__kind_conf_copy(&l->conf, from)) != EZP_OK)
		goto fail;
	/* a Shared pipeline's clients all join one session: serve it from one worker */
	l->n_workers = shared ? 1 : d->n_workers;
	l->workers = calloc(l->n_workers, sizeof(*l->workers));
	if (!l->workers) {
		rc = EZP_ERR_NOMEM;
		goto fail;
	}
	if (shared) {
		unsigned h = 5381;
		for (const char *c = p->name; *c; c++)
			h = h * 33 + (unsigned char)*c;
		l->workers[0] = d->workers[h % d->n_workers];
	} else {
		for (unsigned i = 0; i < d->n_workers; i++)
			l->workers[i] = d->workers[i];
	}
	memset(&args, 0, sizeof(args));
	args.struct_size = sizeof(args);
	args.listener = l;
	args.config = l->conf.config;
	args.n_workers = l->n_workers;
	args.workers = l->workers;
	args.pipeline = p->name;
	rc = l->kind->listen(&d->table, &args, &l->state, &l->bound, err);
	if (rc != EZP_OK) {
		if (!err->message[0])
			ezp__error_set(err, rc, EZP_SIDE_CONFIG, "", from->line, from->column,
				       "pipeline '%s': cannot listen: %s", p->name,
				       ezp__status_str(rc));
		if (!err->line) { /* point at the From item that asked for it */
			err->line = from->line;
			err->column = from->column;
		}
		goto fail;
	}
	*out = l;
	return EZP_OK;
fail:
	listener_free(l);
	return rc;
}

static void listener_barrier(struct ezp_worker *w, void *arg)
{
	(void)w;
	(void)arg;
}

void ezp__listener_close(struct ezp_listener *l)
{
	struct ezp_core_ctx *d;

	if (!l)
		return;
	d = l->p->d;
	l->kind->unlisten(l->state);
	/* a worker may be inside listener_accept, or have a hand-off queued:
	 * one pass through every worker's queue before the listener is freed */
	if (d->started && ezp__off_workers(d))
		ezp__workers_each(d, listener_barrier, NULL);
	listener_free(l);
}

void ezp__pipeline_log_listen(struct ezp__pipeline *p)
{
	char from[EZP_ADDR_STRLEN], to[EZP_ADDR_STRLEN];

	if (!p->listener)
		return;
	ezp__log(EZP_LOG_INFO, "pipeline", "pipeline '%s': %s %s -> %s %s", p->name,
		 p->conf->from.kind, ezp__addr_format(&p->listener->bound, from, sizeof(from)),
		 p->gen->to->conf.kind, ezp__addr_format(&p->gen->to_addr, to, sizeof(to)));
}

/* Open the pipeline's listener; @quiet: the caller logs it once committed. */
int ezp__pipeline_listen(struct ezp__pipeline *p, bool quiet, struct ezp_error *err)
{
	struct ezp_listener *l;
	int rc;

	if (p->listener)
		return EZP_OK;
	rc = ezp__listener_open(p, &p->conf->from, p->conf->shared, &l, err);
	if (rc != EZP_OK)
		return rc;
	ezp__pipeline_set_listener(p, l);
	if (!quiet)
		ezp__pipeline_log_listen(p);
	return EZP_OK;
}

void ezp__pipeline_unlisten(struct ezp__pipeline *p)
{
	ezp__pipeline_set_listener(p, NULL);
}

/* Put @l (NULL: none) in place of @p's listener and close the old one. Thread: control. */
void ezp__pipeline_set_listener(struct ezp__pipeline *p, struct ezp_listener *l)
{
	struct ezp_listener *old = p->listener;

	pthread_mutex_lock(&p->lock);
	p->listener = l;
	if (l)
		p->bound = l->bound;
	else
		memset(&p->bound, 0, sizeof(p->bound));
	pthread_mutex_unlock(&p->lock);
	ezp__listener_close(old);
}

/* Thread: any (see ezp_core.pipeline_addresses). */
int ezp__pipeline_addresses(struct ezp_core_ctx *d, const char *name, struct ezp_addr *bound,
			    struct ezp_addr *to)
{
	struct ezp__pipeline *p;
	int rc = EZP_ERR_NOT_FOUND;

	pthread_mutex_lock(&d->lock);
	LIST_FOREACH(p, &d->pipelines, link) {
		if (strcmp(p->name, name) != 0)
			continue;
		pthread_mutex_lock(&p->lock);
		if (bound)
			*bound = p->bound;
		if (to)
			*to = p->gen->to_addr;
		pthread_mutex_unlock(&p->lock);
		rc = EZP_OK;
		break;
	}
	pthread_mutex_unlock(&d->lock);
	return rc;
}

static void close_sessions_worker(struct ezp_worker *w, void *arg)
{
	struct ezp__pipeline *p = arg;
	struct ezp_session *s, *next;

	for (s = TAILQ_FIRST(&w->sessions); s; s = next) {
		next = TAILQ_NEXT(s, link);
		if (!p || s->p == p)
			ezp__session_close(s, EZP_CLOSE_SHUTDOWN, p ? "pipeline removed" : "");
	}
}

void ezp__pipeline_close_sessions(struct ezp_core_ctx *d, struct ezp__pipeline *p)
{
	ezp__workers_each(d, close_sessions_worker, p);
}

void ezp__pipeline_remove(struct ezp__pipeline *p, bool close_sessions)
{
	struct ezp_core_ctx *d = p->d;

	p->removed = true;
	ezp__pipeline_unlisten(p);
	if (close_sessions && d->started)
		ezp__pipeline_close_sessions(d, p);
	pthread_mutex_lock(&d->lock);
	LIST_REMOVE(p, link);
	pthread_mutex_unlock(&d->lock);
	ezp__pipeline_unref(p);
}

struct ezp__pipeline *ezp__pipeline_find(struct ezp_core_ctx *d, const char *name)
{
	struct ezp__pipeline *p;

	LIST_FOREACH(p, &d->pipelines, link)
		if (!strcmp(p->name, name))
			return p;
	return NULL;
}

/* ---- accepting clients (worker threads) ---- */

static bool route_match(const struct ezp__route *r, const struct ezp_addr *a)
{
	const struct sockaddr *x = (const struct sockaddr *)&r->addr.ss;
	const struct sockaddr *y = (const struct sockaddr *)&a->ss;

	if (x->sa_family != y->sa_family)
		return false;
	if (x->sa_family == AF_INET) {
		const struct sockaddr_in *p = (const void *)x, *q = (const void *)y;
		return p->sin_addr.s_addr == q->sin_addr.s_addr &&
		       (p->sin_port == 0 || p->sin_port == q->sin_port);
	}
	if (x->sa_family == AF_INET6) {
		const struct sockaddr_in6 *p = (const void *)x, *q = (const void *)y;
		return !memcmp(&p->sin6_addr, &q->sin6_addr, sizeof(p->sin6_addr)) &&
		       (p->sin6_port == 0 || p->sin6_port == q->sin6_port);
	}
	return false;
}

int ezp__pipeline_route_add(struct ezp__pipeline *p, const struct ezp_addr *addr,
			    struct ezp_session *s, int mode, bool once, ezp_done_fn done, void *arg)
{
	struct ezp__route *r = calloc(1, sizeof(*r)), *old, *next;

	if (!r)
		return EZP_ERR_NOMEM;
	r->addr = *addr;
	r->session_id = s->id;
	r->worker = s->w->index;
	r->mode = mode;
	r->once = once;
	r->done = done;
	r->done_arg = arg;
	pthread_mutex_lock(&p->lock);
	for (old = LIST_FIRST(&p->routes); old; old = next) {
		next = LIST_NEXT(old, link);
		/* the newest route for an address wins; a re-pointed client's
		 * earlier standing route into the same session goes */
		if (old->done)
			continue;
		if (!memcmp(&old->addr, addr, sizeof(*addr)) ||
		    (!once && !old->once && old->session_id == s->id && old->mode == mode &&
		     mode == EZP__ROUTE_REPLACE)) {
			LIST_REMOVE(old, link);
			free(old);
		}
	}
	LIST_INSERT_HEAD(&p->routes, r, link);
	pthread_mutex_unlock(&p->lock);
	return EZP_OK;
}

/* Remove a pending route whose waiter gave up. Returns 1 if it was still there. */
int ezp__pipeline_route_cancel(struct ezp__pipeline *p, void *done_arg)
{
	struct ezp__route *r;

	pthread_mutex_lock(&p->lock);
	LIST_FOREACH(r, &p->routes, link) {
		if (r->done_arg == done_arg) {
			LIST_REMOVE(r, link);
			pthread_mutex_unlock(&p->lock);
			free(r);
			return 1;
		}
	}
	pthread_mutex_unlock(&p->lock);
	return 0;
}

/* Thread: @s's worker. Forget routes into @s; a Shared pipeline's session ends. */
void ezp__pipeline_session_closed(struct ezp__pipeline *p, struct ezp_session *s)
{
	struct ezp__route *r, *next;
	uint64_t i;

	pthread_mutex_lock(&p->lock);
	for (r = LIST_FIRST(&p->routes); r; r = next) {
		next = LIST_NEXT(r, link);
		if (r->session_id != s->id)
			continue;
		LIST_REMOVE(r, link);
		if (r->done)
			r->done(r->done_arg, EZP_ERR_CLOSED, "the session ended");
		free(r);
	}
	if (p->shared_id == s->id)
		p->shared_id = 0;
	pthread_mutex_unlock(&p->lock);
	for (i = 0; i < 2; i++) {
		atomic_fetch_add(&p->bytes[i], s->bytes[i]);
		atomic_fetch_add(&p->packets[i], s->packets[i]);
	}
	atomic_fetch_add(&p->dropped, s->dropped);
	atomic_fetch_add(&p->replaced, s->replaced);
	atomic_fetch_add(&p->injected, s->injected);
	atomic_fetch_add(&p->held, s->held);
	atomic_fetch_add(&p->hold_timeouts, s->hold_timeouts);
	ezp__pipeline_unref(p);
}

int ezp__listener_accept(struct ezp_accept *a)
{
	struct ezp_listener *l = a->listener;
	struct ezp__pipeline *p = l->p;
	struct ezp_core_ctx *d = p->d;
	struct ezp_worker *w = a->worker;
	struct ezp__route *r;
	struct ezp__pipe_gen *g;
	struct ezp_session *s;
	struct ezp_leg *leg;
	uint64_t sid = 0;
	unsigned target = w->index;
	int mode = 0;
	bool shared;
	ezp_done_fn done = NULL;
	void *done_arg = NULL;
	char addr[EZP_ADDR_STRLEN];

	a->leg = NULL;
	a->move_to = NULL;
	if (d->stopping || p->removed)
		return EZP_ERR_CLOSED;
	pthread_mutex_lock(&p->lock);
	LIST_FOREACH(r, &p->routes, link)
		if (route_match(r, &a->peer))
			break;
	if (r) {
		sid = r->session_id;
		target = r->worker;
		mode = r->mode;
		if (target == w->index && r->once) {
			done = r->done;
			done_arg = r->done_arg;
			LIST_REMOVE(r, link);
			free(r);
		}
	} else if (p->gen->shared && p->shared_id) {
		sid = p->shared_id;
		target = p->shared_worker;
		mode = EZP__ROUTE_ADD;
	}
	g = p->gen;
	atomic_fetch_add(&g->refs, 1);
	pthread_mutex_unlock(&p->lock);

	if (sid && target != w->index) {
		ezp__gen_unref(g);
		a->move_to = d->workers[target];
		return EZP_ERR_AGAIN;
	}
	if (sid && (s = ezp__session_find_local(w, sid))) {
		ezp__gen_unref(g);
		leg = ezp__leg_new(s, l->kind, l->conf.config, &a->peer, false);
		if (!leg)
			return EZP_ERR_NOMEM;
		leg->attach_mode = mode;
		leg->attach_done = done;
		leg->attach_arg = done_arg;
		a->leg = leg;
		return EZP_OK;
	}
	if (done) /* the session of a once-route is gone: a new session instead */
		done(done_arg, EZP_ERR_CLOSED, "the session ended");
	if ((int64_t)atomic_load(&p->n_sessions) >= g->limits.max_sessions) {
		uint64_t n = atomic_fetch_add(&p->refused, 1) + 1;
		if (!(n & (n - 1))) /* the 1st, 2nd, 4th, ... refusal: no log flood */
			ezp__log(EZP_LOG_WARN, "pipeline",
				 "pipeline '%s': refused client %s: %ld sessions reached "
				 "(Limits.MaxSessions); %lu refused so far",
				 p->name, ezp__addr_format(&a->peer, addr, sizeof(addr)),
				 (long)g->limits.max_sessions, (unsigned long)n);
		ezp__gen_unref(g);
		return EZP_ERR_LIMIT;
	}
	s = ezp__session_new(p, w, g);
	shared = g->shared;
	ezp__gen_unref(g);
	if (!s)
		return EZP_ERR_NOMEM;
	leg = ezp__leg_new(s, l->kind, l->conf.config, &a->peer, false);
	if (!leg || ezp__session_add_client(s, leg) != EZP_OK) {
		free(leg);
		ezp__session_close(s, EZP_CLOSE_ERROR, "out of memory");
		return EZP_ERR_NOMEM;
	}
	leg->attach_mode = -1; /* the first leg: start the session when attached */
	if (shared) {
		pthread_mutex_lock(&p->lock);
		if (!p->shared_id) {
			p->shared_id = s->id;
			p->shared_worker = w->index;
		}
		pthread_mutex_unlock(&p->lock);
	}
	ezp__log(EZP_LOG_DEBUG, "pipeline", "pipeline '%s': session %lu from %s", p->name,
		 (unsigned long)s->id, ezp__addr_format(&a->peer, addr, sizeof(addr)));
	a->leg = leg;
	return EZP_OK;
}

/* Thread: the leg's worker. The transport attached its state: use the leg. */
void ezp__leg_attached(struct ezp_leg *leg)
{
	struct ezp_session *s = leg->s;
	int rc;

	if (leg->attach_mode == 0)
		return;
	if (leg->attach_mode < 0) {
		leg->attach_mode = 0;
		ezp__session_start(s);
		return;
	}
	ezp__session_enter(s);
	rc = ezp__session_attach_client(s, leg, leg->attach_mode);
	leg->attach_mode = 0;
	if (rc != EZP_OK) {
		leg->kind->close(leg, leg->state);
		if (leg->attach_done)
			leg->attach_done(leg->attach_arg, rc, "too many client legs (MaxClientLegs)");
		free(leg);
	} else {
		ezp__session_update_pause(s);
		if (leg->attach_done)
			leg->attach_done(leg->attach_arg, EZP_OK, NULL);
	}
	ezp__session_leave(s);
}
