/*
 * fault_registry.c - the faults of pipelines and sessions, shared by the
 * `fault` stage's instances on all workers, and the `fault` service that
 * offers them as the `ezp.fault` interface (API, Lua, CLI).
 * Thread: any. Everything here runs under fp_lock, briefly; a change bumps
 * the pipeline's generation and pokes the instances, whose workers re-read
 * the faults (fault_filter.c). Nothing here waits for a worker.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fault.h"

pthread_mutex_t fp_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fp_daemon *fp_daemons;

uint64_t fp_mono_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int fp_err(struct ezp_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fp_err(struct ezp_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (err) {
		err->code = code;
		err->side = EZP_SIDE_INTERNAL;
		va_start(ap, fmt);
		vsnprintf(err->message, sizeof(err->message), fmt, ap);
		va_end(ap);
	}
	return code;
}

/* ---- values ---- */

int fp_dir_holds(const struct ezp_fault_dir *d)
{
	return d->latency_ms || d->jitter_ms || d->bandwidth_bps || d->freeze;
}

static int fp_dir_zero(const struct ezp_fault_dir *d)
{
	return !fp_dir_holds(d) && d->loss == 0 && !d->blackhole;
}

int fp_faults_zero(const struct ezp_faults *f)
{
	return !f || (fp_dir_zero(&f->dir[0]) && fp_dir_zero(&f->dir[1]));
}

int fp_faults_check(const struct ezp_faults *f, struct ezp_error *err)
{
	static const char *const names[2] = {"to_server", "to_client"};

	if (!f)
		return EZP_OK;
	if (f->struct_size < sizeof(struct ezp_faults))
		return fp_err(err, EZP_ERR_ABI, "struct ezp_faults is too small (%zu bytes)",
			      f->struct_size);
	for (int i = 0; i < 2; i++) {
		const struct ezp_fault_dir *d = &f->dir[i];
		if (d->latency_ms > FP_MAX_LATENCY_MS)
			return fp_err(err, EZP_ERR_INVAL, "%s.latency_ms must be 0..%u, not %u",
				      names[i], FP_MAX_LATENCY_MS, d->latency_ms);
		if (d->jitter_ms > FP_MAX_JITTER_MS)
			return fp_err(err, EZP_ERR_INVAL, "%s.jitter_ms must be 0..%u, not %u",
				      names[i], FP_MAX_JITTER_MS, d->jitter_ms);
		if (!(d->loss >= 0 && d->loss <= 1)) /* NaN fails too */
			return fp_err(err, EZP_ERR_INVAL,
				      "%s.loss must be a number in 0..1, not %g", names[i],
				      d->loss);
		if (d->bandwidth_bps > FP_MAX_BANDWIDTH)
			return fp_err(err, EZP_ERR_INVAL,
				      "%s.bandwidth_bps must be 0 (no cap) .. %llu, not %llu",
				      names[i], (unsigned long long)FP_MAX_BANDWIDTH,
				      (unsigned long long)d->bandwidth_bps);
		if ((d->freeze != 0 && d->freeze != 1) || (d->blackhole != 0 && d->blackhole != 1))
			return fp_err(err, EZP_ERR_INVAL, "%s.%s must be true or false", names[i],
				      d->freeze != 0 && d->freeze != 1 ? "freeze" : "blackhole");
	}
	if (f->freeze_max_ms > FP_MAX_FREEZE_MS)
		return fp_err(err, EZP_ERR_INVAL, "freeze_max_ms must be 1..%u (0: %u), not %u",
			      FP_MAX_FREEZE_MS, FP_DEF_FREEZE_MS, f->freeze_max_ms);
	return EZP_OK;
}

/* Store @f (checked; NULL clears) into @set. fp_lock held. */
static void fp_set_store(struct fp_set *set, const struct ezp_faults *f)
{
	static uint64_t serial;
	int was_frozen = set->f.dir[0].freeze || set->f.dir[1].freeze;

	if (f) {
		set->f = *f;
		set->f.struct_size = sizeof(set->f);
	} else {
		memset(&set->f, 0, sizeof(set->f));
		set->f.struct_size = sizeof(set->f);
	}
	if (!set->f.freeze_max_ms)
		set->f.freeze_max_ms = FP_DEF_FREEZE_MS;
	if (set->f.dir[0].freeze || set->f.dir[1].freeze) {
		if (!was_frozen || !set->freeze_since)
			set->freeze_since = fp_mono_us(); /* a freeze already on keeps its start */
	} else {
		set->freeze_since = 0;
	}
	set->serial = ++serial;
}

/* ---- daemons and pipelines ---- */

static struct fp_daemon *fp_daemon_find(struct ezp_core_ctx *ctx)
{
	struct fp_daemon *d;

	for (d = fp_daemons; d; d = d->next)
		if (d->ctx == ctx)
			return d;
	return NULL;
}

static struct fp_pipe *fp_pipe_find(struct fp_daemon *d, const char *name)
{
	struct fp_pipe *p;

	for (p = d ? d->pipes : NULL; p; p = p->next)
		if (strcmp(p->name, name) == 0)
			return p;
	return NULL;
}

static void fp_iface_init(struct fp_daemon *d);

static struct fp_daemon *fp_daemon_get_locked(const struct ezp_core *core)
{
	struct fp_daemon *d = fp_daemon_find(core->ctx);

	if (d)
		return d;
	d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->ctx = core->ctx;
	d->core = core;
	fp_iface_init(d);
	d->next = fp_daemons;
	fp_daemons = d;
	return d;
}

void fp_daemons_free(void)
{
	struct fp_daemon **pp, *d;

	pthread_mutex_lock(&fp_lock);
	for (pp = &fp_daemons; (d = *pp);) {
		if (d->refs) { /* another daemon of the process still runs */
			pp = &d->next;
			continue;
		}
		*pp = d->next;
		free(d);
	}
	pthread_mutex_unlock(&fp_lock);
}

struct fp_pipe *fp_pipe_get(const struct ezp_core *core, const char *name)
{
	struct fp_daemon *d;
	struct fp_pipe *p = NULL;

	pthread_mutex_lock(&fp_lock);
	d = fp_daemon_get_locked(core);
	if (!d)
		goto out;
	p = fp_pipe_find(d, name);
	if (p) {
		p->refs++;
		goto out;
	}
	p = calloc(1, sizeof(*p));
	if (!p || !(p->name = strdup(name))) {
		free(p);
		p = NULL;
		goto out;
	}
	p->daemon = d;
	d->refs++;
	p->core = core;
	p->refs = 1;
	fp_set_store(&p->set, NULL);
	atomic_init(&p->gen, 1);
	atomic_init(&p->active, 0);
	p->next = d->pipes;
	d->pipes = p;
out:
	pthread_mutex_unlock(&fp_lock);
	return p;
}

void fp_pipe_put(struct fp_pipe *p)
{
	struct fp_pipe **pp;

	if (!p)
		return;
	pthread_mutex_lock(&fp_lock);
	if (--p->refs > 0) {
		pthread_mutex_unlock(&fp_lock);
		return;
	}
	for (pp = &p->daemon->pipes; *pp; pp = &(*pp)->next)
		if (*pp == p) {
			*pp = p->next;
			break;
		}
	p->daemon->refs--;
	while (p->sessions) { /* sessions moved to a chain without a fault stage */
		struct fp_sess *s = p->sessions;
		p->sessions = s->next;
		free(s);
	}
	pthread_mutex_unlock(&fp_lock);
	free(p->stages);
	free(p->insts);
	free(p->name);
	free(p);
}

/* Is any fault set in @p or one of its sessions? fp_lock held. */
static int fp_pipe_any(struct fp_pipe *p)
{
	struct fp_sess *s;

	if (!fp_faults_zero(&p->set.f))
		return 1;
	for (s = p->sessions; s; s = s->next)
		if (s->own && !fp_faults_zero(&s->set.f))
			return 1;
	return 0;
}

/*
 * A value changed: publish the generation, wake or put to sleep the stages
 * and have every instance re-read (which releases what a cleared fault
 * held). fp_lock held.
 */
static void fp_pipe_changed(struct fp_pipe *p)
{
	int active = fp_pipe_any(p);

	atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
	atomic_store(&p->active, active);
	for (size_t i = 0; i < p->n_stages; i++)
		p->core->stage_wake(p->stages[i].stage, active);
	for (size_t i = 0; i < p->n_insts; i++)
		fp_inst_poke(p->insts[i]);
}

int fp_pipe_attach(struct fp_pipe *p, struct fp_inst *in, struct ezp_stage *stage)
{
	struct fp_inst **ni;
	size_t i;
	int rc = EZP_ERR_NOMEM;

	pthread_mutex_lock(&fp_lock);
	ni = realloc(p->insts, (p->n_insts + 1) * sizeof(*ni));
	if (!ni)
		goto out;
	p->insts = ni;
	for (i = 0; i < p->n_stages && p->stages[i].stage != stage; i++)
		;
	if (i == p->n_stages) {
		struct fp_stage_ref *ns = realloc(p->stages, (p->n_stages + 1) * sizeof(*ns));
		if (!ns)
			goto out;
		p->stages = ns;
		ns[i].stage = stage;
		ns[i].n = 0;
		p->n_stages++;
		if (atomic_load(&p->active))
			p->core->stage_wake(stage, 1);
	}
	p->stages[i].n++;
	p->insts[p->n_insts++] = in;
	rc = EZP_OK;
out:
	pthread_mutex_unlock(&fp_lock);
	return rc;
}

void fp_pipe_detach(struct fp_pipe *p, struct fp_inst *in, struct ezp_stage *stage)
{
	pthread_mutex_lock(&fp_lock);
	for (size_t i = 0; i < p->n_insts; i++)
		if (p->insts[i] == in) {
			p->insts[i] = p->insts[--p->n_insts];
			break;
		}
	for (size_t i = 0; i < p->n_stages; i++)
		if (p->stages[i].stage == stage && --p->stages[i].n == 0) {
			p->stages[i] = p->stages[--p->n_stages];
			break;
		}
	pthread_mutex_unlock(&fp_lock);
}

static void fp_log_set(const struct ezp_core *core, const char *what, const struct ezp_faults *f);

void fp_pipe_yaml(struct fp_pipe *p, const struct ezp_faults *f)
{
	pthread_mutex_lock(&fp_lock);
	if (!p->yaml_applied || memcmp(&p->yaml, f, sizeof(*f)) != 0) {
		p->yaml = *f;
		p->yaml_applied = 1;
		fp_set_store(&p->set, f); /* its Seed and FreezeMaxMs too, with no fault set */
		if (!fp_faults_zero(f))
			fp_log_set(p->core, p->name, f);
		fp_pipe_changed(p);
	}
	pthread_mutex_unlock(&fp_lock);
}

/* ---- sessions ---- */

struct fp_sess *fp_sess_open(struct fp_pipe *p, uint64_t id)
{
	struct fp_sess *s;

	pthread_mutex_lock(&fp_lock);
	for (s = p->sessions; s; s = s->next)
		if (s->id == id)
			break;
	if (!s && (s = calloc(1, sizeof(*s)))) {
		s->id = id;
		s->pipe = p;
		s->next = p->sessions;
		if (s->next)
			s->next->pprev = &s->next;
		s->pprev = &p->sessions;
		p->sessions = s;
	}
	if (s)
		s->attached++;
	pthread_mutex_unlock(&fp_lock);
	return s;
}

void fp_sess_close(struct fp_sess *s, int closed)
{
	struct fp_pipe *p = s->pipe;

	pthread_mutex_lock(&fp_lock);
	if (--s->attached == 0 && closed) {
		int had = s->own && !fp_faults_zero(&s->set.f);
		*s->pprev = s->next;
		if (s->next)
			s->next->pprev = s->pprev;
		free(s);
		if (had)
			fp_pipe_changed(p); /* maybe the last fault of the pipeline */
	}
	pthread_mutex_unlock(&fp_lock);
}

void fp_sess_effective(struct fp_sess *s, struct fp_set *out, uint64_t *gen)
{
	pthread_mutex_lock(&fp_lock);
	*gen = atomic_load_explicit(&s->pipe->gen, memory_order_acquire);
	*out = s->own ? s->set : s->pipe->set;
	pthread_mutex_unlock(&fp_lock);
}

/* Clear the freeze of @set if its bound passed. */
static int fp_set_expire(struct fp_set *set, uint64_t now)
{
	if (!set->freeze_since || now < set->freeze_since + (uint64_t)set->f.freeze_max_ms * 1000u)
		return 0;
	set->f.dir[0].freeze = set->f.dir[1].freeze = 0;
	set->freeze_since = 0;
	return 1;
}

static void fp_pipe_expire(struct fp_pipe *p, uint64_t now)
{
	struct fp_sess *s;
	int any = 0;

	if (fp_set_expire(&p->set, now)) {
		p->core->log(EZP_LOG_INFO, FP_SRC,
			     "pipeline %s: the freeze ended after "
			     "FreezeMaxMs (%u ms); held packets are released in order",
			     p->name, p->set.f.freeze_max_ms);
		any = 1;
	}
	for (s = p->sessions; s; s = s->next)
		if (s->own && fp_set_expire(&s->set, now)) {
			p->core->log(EZP_LOG_INFO, FP_SRC,
				     "session %llu: the freeze ended after "
				     "FreezeMaxMs (%u ms); held packets are released in order",
				     (unsigned long long)s->id, s->set.f.freeze_max_ms);
			any = 1;
		}
	if (any)
		fp_pipe_changed(p);
}

void fp_freeze_expired(struct fp_pipe *p)
{
	pthread_mutex_lock(&fp_lock);
	fp_pipe_expire(p, fp_mono_us());
	pthread_mutex_unlock(&fp_lock);
}

/* ---- the ezp.fault interface ---- */

static void fp_log_set(const struct ezp_core *core, const char *what, const struct ezp_faults *f)
{
	static const char *const names[2] = {"to_server", "to_client"};
	char buf[400];
	size_t n = 0;

	buf[0] = 0;
	for (int i = 0; i < 2 && n < sizeof(buf); i++) {
		const struct ezp_fault_dir *d = &f->dir[i];
		if (fp_dir_zero(d))
			continue;
		n += (size_t)snprintf(
		    buf + n, sizeof(buf) - n,
		    "%s%s: latency %u ms, jitter %u ms, loss %g, bandwidth %llu bps%s%s",
		    n ? "; " : "", names[i], d->latency_ms, d->jitter_ms, d->loss,
		    (unsigned long long)d->bandwidth_bps, d->freeze ? ", frozen" : "",
		    d->blackhole ? ", blackhole" : "");
	}
	core->log(EZP_LOG_INFO, FP_SRC, "%s: faults %s%s", what, n ? "set: " : "cleared",
		  n ? buf : "");
}

/* May @d ask the core (ezp.control) from this thread? Not from a packet worker. */
static int fp_may_ask(struct fp_daemon *d)
{
	struct ezp_worker *w = d->core->worker_current();

	return d->control && (!w || w == d->control->service_worker(d->ctx));
}

/* No record: say whether the pipeline is unknown or only lacks the stage. */
static int fp_no_pipe(struct fp_daemon *d, const char *name, struct ezp_error *err)
{
	struct ezp_pipeline_stats st;

	memset(&st, 0, sizeof(st));
	st.struct_size = sizeof(st);
	if (fp_may_ask(d) && d->control->pipeline_stats(d->ctx, name, &st) != EZP_OK)
		return fp_err(err, EZP_ERR_NOT_FOUND, "no pipeline named '%s'", name);
	return fp_err(err, EZP_ERR_NOT_FOUND,
		      "pipeline '%s' has no fault stage (add `- fault: {}` to its Through)", name);
}

static int fp_if_pipeline_set(void *fault, const char *pipeline, const struct ezp_faults *f,
			      struct ezp_error *err)
{
	struct fp_daemon *d = fault;
	struct fp_pipe *p;
	int rc;

	if (!pipeline)
		return fp_err(err, EZP_ERR_INVAL, "no pipeline name");
	rc = fp_faults_check(f, err);
	if (rc != EZP_OK)
		return rc;
	pthread_mutex_lock(&fp_lock);
	p = fp_pipe_find(d, pipeline);
	if (p) {
		fp_set_store(&p->set, f);
		fp_log_set(d->core, p->name, &p->set.f);
		fp_pipe_changed(p);
	}
	pthread_mutex_unlock(&fp_lock);
	return p ? EZP_OK : fp_no_pipe(d, pipeline, err);
}

static int fp_if_pipeline_get(void *fault, const char *pipeline, struct ezp_faults *out,
			      struct ezp_error *err)
{
	struct fp_daemon *d = fault;
	struct fp_pipe *p;

	if (!pipeline)
		return fp_err(err, EZP_ERR_INVAL, "no pipeline name");
	pthread_mutex_lock(&fp_lock);
	p = fp_pipe_find(d, pipeline);
	if (p) {
		fp_pipe_expire(p, fp_mono_us());
		*out = p->set.f;
	}
	pthread_mutex_unlock(&fp_lock);
	return p ? EZP_OK : fp_no_pipe(d, pipeline, err);
}

/* fp_lock held. */
static struct fp_sess *fp_sess_find(struct fp_daemon *d, uint64_t id)
{
	for (struct fp_pipe *p = d->pipes; p; p = p->next)
		for (struct fp_sess *s = p->sessions; s; s = s->next)
			if (s->id == id && s->attached)
				return s;
	return NULL;
}

static int fp_no_sess(struct fp_daemon *d, uint64_t id, struct ezp_error *err)
{
	struct ezp_session_summary sum;

	memset(&sum, 0, sizeof(sum));
	sum.struct_size = sizeof(sum);
	if (!fp_may_ask(d)) /* a packet worker (Lua) does not wait for the core */
		return fp_err(err, EZP_ERR_NOT_FOUND,
			      "no session %llu with a fault stage (it "
			      "ended, never was, or its pipeline has no fault stage)",
			      (unsigned long long)id);
	if (d->control->session_get(d->ctx, id, &sum) != EZP_OK)
		return fp_err(err, EZP_ERR_NOT_FOUND, "no session %llu", (unsigned long long)id);
	return fp_err(err, EZP_ERR_NOT_FOUND, "session %llu: its pipeline has no fault stage",
		      (unsigned long long)id);
}

static int fp_if_session_set(void *fault, uint64_t id, const struct ezp_faults *f,
			     struct ezp_error *err)
{
	struct fp_daemon *d = fault;
	struct fp_sess *s;
	char what[48];
	int rc;

	rc = fp_faults_check(f, err);
	if (rc != EZP_OK)
		return rc;
	pthread_mutex_lock(&fp_lock);
	s = fp_sess_find(d, id);
	if (s) {
		s->own = f != NULL;
		fp_set_store(&s->set, f);
		snprintf(what, sizeof(what), "session %llu", (unsigned long long)id);
		if (f && fp_faults_zero(f))
			d->core->log(EZP_LOG_INFO, FP_SRC,
				     "%s: own faults: none (its pipeline's do "
				     "not apply to it)",
				     what);
		else if (f)
			fp_log_set(d->core, what, &s->set.f);
		else
			d->core->log(EZP_LOG_INFO, FP_SRC,
				     "%s: own faults cleared (the pipeline's "
				     "apply)",
				     what);
		fp_pipe_changed(s->pipe);
	}
	pthread_mutex_unlock(&fp_lock);
	return s ? EZP_OK : fp_no_sess(d, id, err);
}

static int fp_if_session_get(void *fault, uint64_t id, struct ezp_faults *out, int *own,
			     struct ezp_error *err)
{
	struct fp_daemon *d = fault;
	struct fp_sess *s;

	pthread_mutex_lock(&fp_lock);
	s = fp_sess_find(d, id);
	if (s) {
		fp_pipe_expire(s->pipe, fp_mono_us());
		*out = s->own ? s->set.f : s->pipe->set.f;
		if (own)
			*own = s->own;
	}
	pthread_mutex_unlock(&fp_lock);
	return s ? EZP_OK : fp_no_sess(d, id, err);
}

static void fp_iface_init(struct fp_daemon *d)
{
	d->iface.struct_size = sizeof(d->iface);
	d->iface.pipeline_set = fp_if_pipeline_set;
	d->iface.pipeline_get = fp_if_pipeline_get;
	d->iface.session_set = fp_if_session_set;
	d->iface.session_get = fp_if_session_get;
	d->iface.fault = d;
}

/* ---- the service (AUTOSTART: started whenever the plugin is loaded) ---- */

static int fp_svc_start(const struct ezp_core *core, const void *config, void **state,
			struct ezp_error *err)
{
	struct fp_daemon *d;

	(void)config;
	pthread_mutex_lock(&fp_lock);
	d = fp_daemon_get_locked(core);
	if (d) {
		d->refs++;
		d->control = core->find_service(core->ctx, EZP_CONTROL_IFACE, EZP_CONTROL_VERSION);
	}
	pthread_mutex_unlock(&fp_lock);
	if (!d)
		return fp_err(err, EZP_ERR_NOMEM, "fault: out of memory");
	*state = d;
	return EZP_OK;
}

static void fp_svc_stop(void *state)
{
	struct fp_daemon *d = state;

	pthread_mutex_lock(&fp_lock);
	d->control = NULL; /* the record stays until fini: pointers handed out remain valid */
	d->refs--;
	pthread_mutex_unlock(&fp_lock);
}

static const void *fp_svc_iface(void *state)
{
	return &((struct fp_daemon *)state)->iface;
}

const struct ezp_service_kind fp_service = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "fault",
    .description = "faults set live (latency, jitter, loss, bandwidth, freeze, blackhole) "
		   "for the API, Lua and the command line",
    .start = fp_svc_start,
    .stop = fp_svc_stop,
    .iface_name = EZP_FAULT_IFACE,
    .iface_version = EZP_FAULT_VERSION,
    .iface = fp_svc_iface,
    .flags = EZP_SERVICE_AUTOSTART,
};
