/*
 * fault_filter.c - the `fault` filter kind: its parameters, one instance per
 * worker, and what happens to each packet: blackhole and loss drop it;
 * latency, jitter, bandwidth and freeze hold it and a timer answers PASS at
 * its release time, which never comes before the release of the packet
 * ahead of it in the same direction (order is kept). The stage is dormant:
 * the core calls it only while some fault of its pipeline is set.
 * Thread: create on the control thread; packet, session_event, the timers
 * and the refresh jobs on the instance's worker; destroy on any
 * thread once the core calls nothing else of the instance.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "fault.h"

struct fp_held {
	uint64_t hold_id;
	uint64_t release; /* CLOCK_MONOTONIC us */
};

/* The random streams: xoshiro256** seeded through splitmix64. */
struct fp_rng {
	uint64_t s[4];
};

struct fp_ss;

struct fp_tctx {
	struct fp_ss *ss;
	int dir;
};

/* One direction of one session on this worker. */
struct fp_dirst {
	struct fp_held *q; /* a ring of held packets, in arrival order */
	size_t cap, head, n;
	uint64_t last_release;
	uint64_t bw_free; /* when the bandwidth cap has sent what came so far */
	struct fp_rng loss_rng, jitter_rng;
	struct ezp_timer *timer;
	struct fp_tctx tctx;
	int frozen;
	uint64_t freeze_deadline;
};

/* A session's state in this instance (its filter slot). */
struct fp_ss {
	struct fp_inst *in;
	struct fp_sess *sess;
	uint64_t gen; /* of the faults in eff */
	struct fp_set eff;
	struct fp_dirst d[2];
	struct fp_ss *next, **pprev;
};

struct fp_inst {
	const struct ezp_core *core;
	struct ezp_worker *worker;
	struct ezp_stage *stage;
	struct fp_pipe *pipe;
	atomic_int refs;
	atomic_int poke_pending;
	atomic_int dead;
	int attached;
	struct fp_ss *sessions;
};

static const struct ezp_param fp_params[] = {
    {"LatencyMs", EZP_PARAM_MS, offsetof(struct fp_conf, latency_ms), "0", 0, 0, FP_MAX_LATENCY_MS,
     "added to every packet (ms)"},
    {"JitterMs", EZP_PARAM_MS, offsetof(struct fp_conf, jitter_ms), "0", 0, 0, FP_MAX_JITTER_MS,
     "plus a random 0..JitterMs per packet; order is kept"},
    {"Loss", EZP_PARAM_DOUBLE, offsetof(struct fp_conf, loss), "0", 0, 0, 0,
     "0..1: share of packets dropped (whole packets; on TCP that cuts the byte stream)"},
    {"BandwidthBps", EZP_PARAM_INT, offsetof(struct fp_conf, bandwidth_bps), "0", 0, 0,
     (int64_t)FP_MAX_BANDWIDTH, "bits per second each direction may carry; 0: no cap"},
    {"Freeze", EZP_PARAM_BOOL, offsetof(struct fp_conf, freeze), "false", 0, 0, 0,
     "hold every packet until cleared or FreezeMaxMs, then release them in order"},
    {"Blackhole", EZP_PARAM_BOOL, offsetof(struct fp_conf, blackhole), "false", 0, 0, 0,
     "drop every packet"},
    {"Seed", EZP_PARAM_INT, offsetof(struct fp_conf, seed), "0", 0, 0, INT64_MAX,
     "randomness (loss, jitter) repeats for a seed; 0: random"},
    {"FreezeMaxMs", EZP_PARAM_MS, offsetof(struct fp_conf, freeze_max_ms), "10000", 0, 1,
     FP_MAX_FREEZE_MS, "a freeze ends by itself after this long"},
    {"Direction", EZP_PARAM_STRING, offsetof(struct fp_conf, direction), "both", 0, 0, 0,
     "which direction this item's values apply to: both, to_server or to_client"},
    EZP_PARAM_END,
};

/* ---- random numbers ---- */

static uint64_t fp_splitmix(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void fp_rng_seed(struct fp_rng *r, uint64_t seed, uint64_t stream)
{
	uint64_t x = seed ^ (stream * 0xd1b54a32d192ed03ull);

	for (int i = 0; i < 4; i++)
		r->s[i] = fp_splitmix(&x);
}

static inline uint64_t fp_rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static uint64_t fp_rng_next(struct fp_rng *r)
{
	uint64_t *s = r->s, out = fp_rotl(s[1] * 5, 7) * 9, t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = fp_rotl(s[3], 45);
	return out;
}

static double fp_rng_unit(struct fp_rng *r) /* [0, 1) */
{
	return (double)(fp_rng_next(r) >> 11) * 0x1.0p-53;
}

/* Seed a session's streams: from Seed alone (every session of a seed repeats), or at random. */
static void fp_ss_seed(struct fp_ss *ss)
{
	uint64_t seed = ss->eff.f.seed;

	if (!seed && getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed))
		seed = fp_mono_us() ^ (ss->sess->id * 0x9e3779b97f4a7c15ull);
	for (int d = 0; d < 2; d++) {
		fp_rng_seed(&ss->d[d].loss_rng, seed, 1 + 2 * (uint64_t)d);
		fp_rng_seed(&ss->d[d].jitter_rng, seed, 2 + 2 * (uint64_t)d);
	}
}

/* ---- held packets ---- */

static int fp_push(struct fp_dirst *ds, uint64_t hold_id, uint64_t release)
{
	if (ds->n == ds->cap) {
		size_t cap = ds->cap ? ds->cap * 2 : 16;
		struct fp_held *q = malloc(cap * sizeof(*q));
		if (!q)
			return EZP_ERR_NOMEM;
		for (size_t i = 0; i < ds->n; i++)
			q[i] = ds->q[(ds->head + i) % ds->cap];
		free(ds->q);
		ds->q = q;
		ds->cap = cap;
		ds->head = 0;
	}
	ds->q[(ds->head + ds->n) % ds->cap] = (struct fp_held){hold_id, release};
	ds->n++;
	return EZP_OK;
}

/* Answer PASS for held packets in order: all of them (@all) or those due by @now. */
static void fp_release(struct fp_ss *ss, int dir, uint64_t now, int all)
{
	struct fp_dirst *ds = &ss->d[dir];
	const struct ezp_core *core = ss->in->core;

	if (ds->frozen && !all)
		return;
	while (ds->n && (all || ds->q[ds->head].release <= now)) {
		core->filter_answer(core->ctx, ds->q[ds->head].hold_id, EZP_VERDICT_PASS, NULL);
		ds->head = (ds->head + 1) % ds->cap;
		ds->n--;
	}
}

/* (Re)arm a direction's timer for its next event, or stop it. */
static void fp_arm(struct fp_ss *ss, int dir, uint64_t now)
{
	struct fp_dirst *ds = &ss->d[dir];
	uint64_t at;

	if (!ds->timer)
		return;
	if (ds->frozen)
		at = ds->freeze_deadline;
	else if (ds->n)
		at = ds->q[ds->head].release;
	else {
		ss->in->core->timer_stop(ds->timer);
		return;
	}
	ss->in->core->timer_start(ds->timer, at > now ? (at - now + 999) / 1000 : 0, 0);
}

static void fp_refresh(struct fp_ss *ss, uint64_t now);

static void fp_timer(void *arg)
{
	struct fp_tctx *t = arg;
	struct fp_ss *ss = t->ss;
	struct fp_dirst *ds = &ss->d[t->dir];
	uint64_t now = fp_mono_us();

	if (ds->frozen && now >= ds->freeze_deadline)
		fp_refresh(ss, now); /* the bound passed: out in order, the flag cleared (logged) */
	fp_release(ss, t->dir, now, 0);
	fp_arm(ss, t->dir, now);
}

/* ---- the faults in force for a session ---- */

static void fp_refresh(struct fp_ss *ss, uint64_t now)
{
	struct fp_set set;
	uint64_t gen, serial = ss->eff.serial;
	int expired = 0;

	fp_sess_effective(ss->sess, &set, &gen);
	ss->gen = gen;
	ss->eff = set;
	if (set.serial != serial)
		fp_ss_seed(ss); /* a new set of faults starts the random streams again */
	for (int dir = 0; dir < 2; dir++) {
		const struct ezp_fault_dir *fd = &set.f.dir[dir];
		struct fp_dirst *ds = &ss->d[dir];
		ds->frozen = fd->freeze && set.freeze_since &&
			     now < set.freeze_since + (uint64_t)set.f.freeze_max_ms * 1000u;
		ds->freeze_deadline = set.freeze_since + (uint64_t)set.f.freeze_max_ms * 1000u;
		if (fd->freeze && !ds->frozen)
			expired = 1; /* its bound passed: clear the flag where it is set (below) */
		if (!fd->bandwidth_bps)
			ds->bw_free = 0;
		if (!fp_dir_holds(fd)) { /* nothing holds any more: out now, in order */
			fp_release(ss, dir, now, 1);
			ds->last_release = 0;
		} else {
			fp_release(ss, dir, now, 0);
		}
		fp_arm(ss, dir, now);
	}
	if (expired)
		fp_freeze_expired(ss->in->pipe);
}

static inline void fp_check_gen(struct fp_ss *ss, uint64_t now)
{
	if (atomic_load_explicit(&ss->in->pipe->gen, memory_order_acquire) != ss->gen)
		fp_refresh(ss, now);
}

/* ---- sessions ---- */

static void fp_ss_free(struct fp_ss *ss, int closed)
{
	*ss->pprev = ss->next;
	if (ss->next)
		ss->next->pprev = ss->pprev;
	for (int d = 0; d < 2; d++) {
		if (ss->d[d].timer)
			ss->in->core->timer_free(ss->d[d].timer);
		free(ss->d[d].q);
	}
	fp_sess_close(ss->sess, closed);
	free(ss);
}

static struct fp_ss *fp_ss_new(struct fp_inst *in, uint64_t id)
{
	struct fp_ss *ss = calloc(1, sizeof(*ss));

	if (!ss)
		goto fail;
	ss->in = in;
	for (int d = 0; d < 2; d++) {
		ss->d[d].tctx.ss = ss;
		ss->d[d].tctx.dir = d;
		ss->d[d].timer = in->core->timer_new(in->worker, fp_timer, &ss->d[d].tctx);
		if (!ss->d[d].timer)
			goto fail;
	}
	ss->sess = fp_sess_open(in->pipe, id);
	if (!ss->sess)
		goto fail;
	ss->next = in->sessions;
	if (ss->next)
		ss->next->pprev = &ss->next;
	ss->pprev = &in->sessions;
	in->sessions = ss;
	fp_refresh(ss, fp_mono_us());
	return ss;
fail:
	in->core->log(EZP_LOG_ERROR, FP_SRC,
		      "%s: out of memory for session %llu: its packets "
		      "pass without faults",
		      in->pipe->name, (unsigned long long)id);
	for (int d = 0; ss && d < 2; d++)
		if (ss->d[d].timer)
			in->core->timer_free(ss->d[d].timer);
	free(ss);
	return NULL;
}

static void fp_session_event(void *instance, struct ezp_session *session, int event,
			     void **session_state)
{
	struct fp_inst *in = instance;
	struct fp_ss *ss = *session_state;
	struct ezp_session_info info;

	memset(&info, 0, sizeof(info));
	info.struct_size = sizeof(info);
	in->core->session_info(session, &info);
	if (event == EZP_SESSION_OPENED && !ss) {
		*session_state = fp_ss_new(in, info.id);
	} else if (event == EZP_SESSION_CLOSED && ss) {
		/* a session moving to a new chain keeps its own faults (close_reason NONE) */
		fp_ss_free(ss, info.close_reason != EZP_CLOSE_NONE);
		*session_state = NULL;
	}
}

/* ---- packets ---- */

static int fp_packet(void *instance, struct ezp_filter_call *call)
{
	struct fp_inst *in = instance;
	struct fp_ss *ss = *call->session_state;
	const struct ezp_fault_dir *fd;
	struct fp_dirst *ds;
	uint64_t now, rel;
	int dir = call->pkt->dir ? 1 : 0;

	if (!ss) {
		ss = fp_ss_new(in, call->pkt->session_id);
		*call->session_state = ss;
		if (!ss)
			return EZP_VERDICT_PASS;
	}
	now = fp_mono_us();
	fp_check_gen(ss, now);
	fd = &ss->eff.f.dir[dir];
	ds = &ss->d[dir];
	if (fd->blackhole)
		return EZP_VERDICT_DROP;
	if (fd->loss > 0 && fp_rng_unit(&ds->loss_rng) < fd->loss)
		return EZP_VERDICT_DROP;
	if (ds->frozen && now >= ds->freeze_deadline) {
		fp_refresh(ss, now);
		fd = &ss->eff.f.dir[dir];
	}
	if (!fp_dir_holds(fd))
		return EZP_VERDICT_PASS;
	rel = now;
	if (fd->bandwidth_bps) {
		uint64_t start = ds->bw_free > now ? ds->bw_free : now;
		ds->bw_free =
		    start + (uint64_t)((double)call->pkt->len * 8e6 / (double)fd->bandwidth_bps);
		rel = ds->bw_free;
	}
	rel += (uint64_t)fd->latency_ms * 1000u;
	if (fd->jitter_ms)
		rel += fp_rng_next(&ds->jitter_rng) % ((uint64_t)fd->jitter_ms * 1000u + 1);
	if (rel < ds->last_release)
		rel = ds->last_release;
	ds->last_release = rel;
	if (!ds->frozen && rel <= now)
		return EZP_VERDICT_PASS;
	if (fp_push(ds, call->hold_id, rel) != EZP_OK) {
		in->core->log(EZP_LOG_WARN, FP_SRC,
			      "%s: out of memory holding a packet: it "
			      "passes now",
			      in->pipe->name);
		return EZP_VERDICT_PASS;
	}
	if (ds->n == 1)
		fp_arm(ss, dir, now);
	return EZP_VERDICT_HOLD;
}

/* ---- refresh jobs: a change reaches idle sessions too ---- */

void fp_inst_ref(struct fp_inst *in)
{
	atomic_fetch_add(&in->refs, 1);
}

static void fp_inst_unref(struct fp_inst *in)
{
	if (atomic_fetch_sub(&in->refs, 1) != 1)
		return;
	fp_pipe_put(in->pipe);
	free(in);
}

static void fp_poke_run(void *arg)
{
	struct fp_inst *in = arg;
	uint64_t now = fp_mono_us();

	atomic_store(&in->poke_pending, 0);
	if (!atomic_load(&in->dead))
		for (struct fp_ss *ss = in->sessions; ss; ss = ss->next)
			fp_check_gen(ss, now);
	fp_inst_unref(in);
}

void fp_inst_poke(struct fp_inst *in)
{
	if (atomic_exchange(&in->poke_pending, 1))
		return;
	fp_inst_ref(in);
	if (in->core->defer(in->worker, fp_poke_run, in) != EZP_OK) {
		atomic_store(&in->poke_pending, 0);
		atomic_fetch_sub(&in->refs, 1); /* the owner's reference remains */
	}
}

/* ---- create / destroy ---- */

/* The YAML of an item as a set of faults; the message names the key. */
static int fp_conf_faults(const struct fp_conf *c, struct ezp_faults *f, struct ezp_error *err)
{
	int to_server, to_client;

	memset(f, 0, sizeof(*f));
	f->struct_size = sizeof(*f);
	to_server = !strcmp(c->direction, "both") || !strcmp(c->direction, "to_server");
	to_client = !strcmp(c->direction, "both") || !strcmp(c->direction, "to_client");
	if (!to_server && !to_client) {
		snprintf(err->message, sizeof(err->message),
			 "fault: Direction must be both, to_server or to_client, not '%.200s'",
			 c->direction);
		goto fail;
	}
	if (!(c->loss >= 0 && c->loss <= 1)) {
		snprintf(err->message, sizeof(err->message),
			 "fault: Loss must be a number in 0..1 (a share of packets), not %g",
			 c->loss);
		goto fail;
	}
	for (int d = 0; d < 2; d++) {
		if (!(d ? to_client : to_server))
			continue;
		f->dir[d].latency_ms = (uint32_t)c->latency_ms;
		f->dir[d].jitter_ms = (uint32_t)c->jitter_ms;
		f->dir[d].loss = c->loss;
		f->dir[d].bandwidth_bps = (uint64_t)c->bandwidth_bps;
		f->dir[d].freeze = c->freeze != 0;
		f->dir[d].blackhole = c->blackhole != 0;
	}
	f->seed = (uint64_t)c->seed;
	f->freeze_max_ms = (uint32_t)c->freeze_max_ms;
	return EZP_OK;
fail:
	err->code = EZP_ERR_CONFIG;
	err->side = EZP_SIDE_CONFIG;
	return EZP_ERR_CONFIG;
}

static void fp_destroy(void *instance)
{
	struct fp_inst *in = instance;

	if (!in)
		return;
	if (in->attached)
		fp_pipe_detach(in->pipe, in, in->stage);
	while (in->sessions)
		fp_ss_free(in->sessions, 1);
	atomic_store(&in->dead, 1);
	fp_inst_unref(in);
}

static int fp_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
		     struct ezp_error *err)
{
	struct ezp_faults f;
	struct fp_inst *in = NULL;
	int rc;

	rc = fp_conf_faults(config, &f, err);
	if (rc != EZP_OK)
		return rc;
	in = calloc(1, sizeof(*in));
	if (!in)
		goto nomem;
	in->core = ctx->core;
	in->worker = ctx->worker;
	in->stage = EZP_HAS(ctx, stage) ? ctx->stage : NULL;
	atomic_init(&in->refs, 1);
	in->pipe = fp_pipe_get(ctx->core, ctx->pipeline);
	if (!in->pipe || fp_pipe_attach(in->pipe, in, in->stage) != EZP_OK)
		goto nomem;
	in->attached = 1;
	fp_pipe_yaml(in->pipe, &f);
	*instance = in;
	return EZP_OK;
nomem:
	snprintf(err->message, sizeof(err->message), "fault: out of memory");
	err->code = EZP_ERR_NOMEM;
	fp_destroy(in);
	return EZP_ERR_NOMEM;
}

static const struct ezp_filter_kind fp_kind = {
    .struct_size = sizeof(struct ezp_filter_kind),
    .name = "fault",
    .description = "adds latency, jitter, loss, a bandwidth cap, freezes or a blackhole, "
		   "per direction; set live by the API, Lua and `ezproxy fault`",
    .flags = EZP_FILTER_DORMANT,
    .params = fp_params,
    .config_size = sizeof(struct fp_conf),
    .create = fp_create,
    .packet = fp_packet,
    .session_event = fp_session_event,
    .destroy = fp_destroy,
    .hold_window = FP_HOLD_WINDOW,
    .hold_timeout_ms = FP_HOLD_TIMEOUT_MS,
};

static const struct ezp_filter_kind *const fp_kinds[] = {&fp_kind, NULL};
static const struct ezp_service_kind *const fp_services[] = {&fp_service, NULL};

static void fp_fini(void)
{
	fp_daemons_free();
}

EZP_PLUGIN_DEFINE(ezp_plugin, .name = "fault", .version = "0.1.0",
		  .description = "network faults per pipeline, session and direction: latency, "
				 "jitter, loss, bandwidth, freeze, blackhole",
		  .license = "MIT", .fini = fp_fini, .filters = fp_kinds, .services = fp_services);
