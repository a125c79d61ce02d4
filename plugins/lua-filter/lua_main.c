/*
 * lua_main.c - Mode: main. EzpMain(ezp) runs once on a thread of its own
 * with its own Lua state, where sleep(ms) really sleeps. Packets pass
 * untouched unless the script filters them (ezp.get_packets(cb), or an
 * EzpFilter / EzpOnPacket function): then each packet is held by the worker
 * and queued here, in order, and answered when the callback returns.
 * get_packets(cb) blocks EzpMain and hands every packet to cb (a watcher:
 * the packet passes) until cb returns true. The
 * thread runs callbacks and EzpOnSessionOpen/Close while EzpMain sleeps and
 * after it returns. One runner per script file in main mode, shared by
 * every worker and every pipeline that uses it (the old config form puts
 * the filter on two pipelines: EzpMain still runs once); its ezp table
 * speaks for all of them (sessions, counts, close(-1), close(-2)), and
 * get_server_address/get_proxy_address answer for the first one.
 * Thread: lf_main_get/put on the control thread (put: any); post functions
 * on workers; everything else on the runner thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lua_filter.h"

enum { LF_EV_PACKET, LF_EV_OPEN, LF_EV_CLOSE };

struct lf_mevent {
	int type;
	struct ezp_packet *pkt; /* ref'd */
	uint64_t hold_id;
	struct lf_entry *e;     /* ref'd */
	struct lf_mevent *next;
};

struct lf_main {
	const struct ezp_core *core;
	const struct lf_conf *conf;
	struct lf_group *group;
	int refs;                /* lf_mains_lock */
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct lf_mevent *head, **tail;
	atomic_int stopping, reload_req, wants;
	struct lf_script *script;  /* runner thread */
	struct lf_script *pending; /* a reloaded script waiting for the old EzpMain to unwind */
	int need_run, in_main, sleep_depth, in_get_packets;
	struct lf_conf conf_copy; /* ours: the first config may go before we do */
	struct lf_main *next;
};

static pthread_mutex_t lf_mains_lock = PTHREAD_MUTEX_INITIALIZER;
static struct lf_main *lf_mains;

void lf_main_set_wants(struct lf_main *m, struct lf_script *s)
{
	int fn = 0;

	if (lf_getglobal(s->L, "EzpFilter") == LUA_TFUNCTION)
		fn = 1;
	lua_pop(s->L, 1);
	if (lf_getglobal(s->L, "EzpOnPacket") == LUA_TFUNCTION)
		fn = 1;
	lua_pop(s->L, 1);
	atomic_store(&m->wants, fn || s->ref_packets != LUA_NOREF);
}

int lf_main_stopping(struct lf_main *m)
{
	return atomic_load_explicit(&m->stopping, memory_order_relaxed);
}

int lf_main_waiting(struct lf_main *m)
{
	return m->in_get_packets || m->sleep_depth;
}

int lf_main_wants_packets(struct lf_main *m)
{
	return atomic_load_explicit(&m->wants, memory_order_relaxed);
}

static void lf_main_push(struct lf_main *m, struct lf_mevent *ev)
{
	pthread_mutex_lock(&m->lock);
	ev->next = NULL;
	*m->tail = ev;
	m->tail = &ev->next;
	pthread_cond_signal(&m->cond);
	pthread_mutex_unlock(&m->lock);
}

static struct lf_mevent *lf_main_pop(struct lf_main *m)
{
	struct lf_mevent *ev = m->head; /* m->lock held */

	if (ev) {
		m->head = ev->next;
		if (!m->head)
			m->tail = &m->head;
	}
	return ev;
}

int lf_main_post_packet(struct lf_main *m, struct ezp_packet *pkt, uint64_t hold_id,
			struct lf_entry *e)
{
	struct lf_mevent *ev = calloc(1, sizeof(*ev));

	if (!ev)
		return EZP_ERR_NOMEM;
	ev->type = LF_EV_PACKET;
	ev->pkt = m->core->packet_ref(pkt);
	ev->hold_id = hold_id;
	ev->e = e;
	if (e)
		atomic_fetch_add(&e->refs, 1);
	lf_main_push(m, ev);
	return EZP_OK;
}

void lf_main_post_session(struct lf_main *m, struct lf_entry *e, int opened)
{
	struct lf_mevent *ev;

	ev = calloc(1, sizeof(*ev));
	if (!ev)
		return;
	ev->type = opened ? LF_EV_OPEN : LF_EV_CLOSE;
	ev->e = e;
	atomic_fetch_add(&e->refs, 1);
	lf_main_push(m, ev);
}

void lf_main_reload(struct lf_main *m)
{
	pthread_mutex_lock(&m->lock);
	atomic_store(&m->reload_req, 1);
	pthread_cond_signal(&m->cond);
	pthread_mutex_unlock(&m->lock);
}

static void lf_event_free(struct lf_main *m, struct lf_mevent *ev)
{
	if (ev->pkt)
		m->core->packet_unref(ev->pkt);
	lf_entry_unref(ev->e);
	free(ev);
}

/* ---- running things on the runner's state ---- */

/* Run function + nargs on a new coroutine of s->L; errors logged. */
static int lf_main_call(struct lf_main *m, lua_State *co, int nargs, int *nres)
{
	struct lf_script *s = m->script;
	int rc;

	lf_script_budget(s);
	rc = lf_script_resume(s, co, nargs, nres);
	if (rc == LUA_YIELD) {
		lua_settop(co, 0);
		lua_pushfstring(co, "%s: coroutine.yield() outside a coroutine of the script",
				s->path);
		rc = LUA_ERRRUN;
	}
	if (rc != LUA_OK && atomic_load(&s->stop))
		lua_pop(co, 1); /* unwound on purpose (reload or shutdown) */
	else if (rc != LUA_OK)
		lf_script_error(s, co, rc, NULL);
	return rc;
}

static void lf_main_packet(struct lf_main *m, struct lf_mevent *ev)
{
	struct lf_script *s = m->script;
	struct ezp_packet *repl = NULL;
	int onpacket, two, nres = 0, v = EZP_VERDICT_PASS;
	lua_State *co;

	if (!lf_push_filter_fn(s, s->L, &onpacket, &two)) {
		m->core->filter_answer(m->core->ctx, ev->hold_id, EZP_VERDICT_PASS, NULL);
		return;
	}
	co = lua_newthread(s->L);
	lua_rotate(s->L, -2, 1);
	lua_xmove(s->L, co, 1);
	if (two)
		lua_rawgeti(co, LUA_REGISTRYINDEX, s->ref_ezp);
	if (ev->e)
		pthread_mutex_lock(&m->group->lock);
	lf_push_pkt(co, s, ev->pkt, ev->e);
	if (ev->e)
		pthread_mutex_unlock(&m->group->lock);
	if (lf_main_call(m, co, two ? 2 : 1, &nres) == LUA_OK) {
		v = lf_verdict_of(s, co, nres, onpacket, &repl);
		m->core->filter_answer(m->core->ctx, ev->hold_id, v, repl);
	} else {
		m->core->filter_answer(m->core->ctx, ev->hold_id, EZP_VERDICT_DEFAULT, NULL);
	}
	lua_pop(s->L, 1);
}

static void lf_main_session(struct lf_main *m, struct lf_mevent *ev)
{
	struct lf_script *s = m->script;
	const char *name = ev->type == LF_EV_OPEN ? "EzpOnSessionOpen" : "EzpOnSessionClose";
	lua_State *co;
	int nres = 0;

	if (lf_getglobal(s->L, name) != LUA_TFUNCTION) {
		lua_pop(s->L, 1);
		return;
	}
	co = lua_newthread(s->L);
	lua_rotate(s->L, -2, 1);
	lua_xmove(s->L, co, 1);
	lua_rawgeti(co, LUA_REGISTRYINDEX, s->ref_ezp);
	lf_push_session(co, ev->e); /* the registry no longer has a closed one */
	lf_main_call(m, co, 2, &nres);
	lua_pop(s->L, 1);
}

static void lf_main_event(struct lf_main *m, struct lf_mevent *ev)
{
	struct lf_script *s = m->script;
	int limit = s->limit_on;

	s->limit_on = 0; /* our own pushes; served from inside sleep() too */
	if (ev->type == LF_EV_PACKET)
		lf_main_packet(m, ev);
	else
		lf_main_session(m, ev);
	s->limit_on = limit;
	lf_event_free(m, ev);
}

/* A reload was asked for: compile the new script; swap now or after EzpMain unwinds. */
static void lf_main_try_reload(struct lf_main *m)
{
	char why[1024];
	struct lf_script *s;

	atomic_store(&m->reload_req, 0);
	s = lf_script_new(m->core, m->conf, LF_MODE_MAIN, m->group, why, sizeof(why));
	if (!s) {
		lf_log_reload(m->core, m->conf->script, 0, why, 1);
		return;
	}
	s->main = m;
	lf_log_reload(m->core, m->conf->script, 1, NULL, 1);
	lf_script_unref(m->pending);
	m->pending = s;
	if (m->in_main) {
		atomic_store(&m->script->stop, 1); /* EzpMain unwinds at its next instruction */
		return;
	}
	lf_script_unref(m->script);
	m->script = s;
	m->pending = NULL;
	lf_main_set_wants(m, s);
	m->need_run = 1;
}

/*
 * The count hook of the runner's script: a reload asked for while EzpMain
 * computes without sleeping would wait for its next sleep() - for good in a
 * loop that never sleeps. Compile the new script now: if it loads, the old
 * EzpMain stops right here (s->stop) and lf_main_run starts the new one; if
 * not, the old one goes on. Only in EzpMain's own code: a callback served
 * from a sleep leaves the reload to that sleep's loop.
 */
void lf_main_hook(struct lf_main *m, struct lf_script *s)
{
	if (s == m->script && m->in_main && !m->sleep_depth && atomic_load(&m->reload_req))
		lf_main_try_reload(m);
}

/* Wait @ms (or, with @ms < 0, until the get_packets callback says stop), serving events. */
static int lf_main_wait(lua_State *L, struct lf_script *s, int64_t ms)
{
	struct lf_main *m = s->main;
	struct timespec until;

	if (ms < 0)
		ms = 86400000; /* get_packets: re-checked below, a day at a time */

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += (time_t)(ms / 1000);
	until.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	m->sleep_depth++;
	pthread_mutex_lock(&m->lock);
	while (!atomic_load(&s->stop) && !atomic_load(&m->stopping) &&
	       !(m->in_get_packets && s->watcher_off)) {
		struct lf_mevent *ev = NULL;
		if (m->sleep_depth == 1 && atomic_load(&m->reload_req)) {
			pthread_mutex_unlock(&m->lock);
			lf_main_try_reload(m);
			pthread_mutex_lock(&m->lock);
			continue;
		}
		if (m->sleep_depth == 1 && s == m->script)
			ev = lf_main_pop(m);
		if (ev) { /* serve packets and hooks while the script sleeps */
			pthread_mutex_unlock(&m->lock);
			lf_main_event(m, ev);
			pthread_mutex_lock(&m->lock);
			continue;
		}
		if (pthread_cond_timedwait(&m->cond, &m->lock, &until) != 0)
			break; /* the time is up */
	}
	pthread_mutex_unlock(&m->lock);
	m->sleep_depth--;
	if (atomic_load(&s->stop) || atomic_load(&m->stopping)) {
		atomic_store(&s->stop, 1);
		return luaL_error(L, "%s: script stopped (reload or shutdown)", s->path);
	}
	lf_script_budget(s); /* a new slice after each sleep */
	return 0;
}

int lf_main_sleep(lua_State *L, struct lf_script *s, int64_t ms)
{
	return lf_main_wait(L, s, ms);
}

int lf_main_get_packets(lua_State *L, struct lf_script *s)
{
	struct lf_main *m = s->main;
	int rc;

	m->in_get_packets = 1; /* lf_ezp_get_packets refused a call from inside a wait */
	s->watcher_off = 0;
	lf_main_set_wants(m, s);
	for (;;) {
		rc = lf_main_wait(L, s, -1);
		if (s->watcher_off || rc != 0)
			break;
	}
	m->in_get_packets = 0;
	s->watcher_off = 0;
	luaL_unref(L, LUA_REGISTRYINDEX, s->ref_packets);
	s->ref_packets = LUA_NOREF;
	lf_main_set_wants(m, s);
	return 0;
}

static void lf_main_run(struct lf_main *m)
{
	struct lf_script *s = m->script;
	lua_State *co = lua_newthread(s->L);
	int nres = 0;

	lf_getglobal(co, "EzpMain");
	lua_rawgeti(co, LUA_REGISTRYINDEX, s->ref_ezp);
	m->in_main = 1;
	lf_main_call(m, co, 1, &nres);
	m->in_main = 0;
	lua_pop(s->L, 1);
	lf_main_set_wants(m, s);
	if (m->pending) { /* reloaded while EzpMain ran: start the new one */
		lf_script_unref(m->script);
		m->script = m->pending;
		m->pending = NULL;
		lf_main_set_wants(m, m->script);
		m->need_run = 1;
	}
}

static void *lf_main_thread(void *arg)
{
	struct lf_main *m = arg;

	while (!atomic_load(&m->stopping)) {
		struct lf_mevent *ev;
		if (m->need_run) {
			m->need_run = 0;
			lf_main_run(m);
			continue;
		}
		if (atomic_load(&m->reload_req)) {
			lf_main_try_reload(m);
			continue;
		}
		pthread_mutex_lock(&m->lock);
		while (!m->head && !atomic_load(&m->stopping) && !atomic_load(&m->reload_req))
			pthread_cond_wait(&m->cond, &m->lock);
		ev = lf_main_pop(m);
		pthread_mutex_unlock(&m->lock);
		if (ev)
			lf_main_event(m, ev);
	}
	return NULL;
}

/* ---- make and stop ---- */

struct lf_main *lf_main_get(const struct ezp_core *core, const struct lf_conf *conf,
			    struct lf_group *group, struct ezp_error *err)
{
	struct lf_main *m;
	char why[1024];

	pthread_mutex_lock(&lf_mains_lock);
	for (m = lf_mains; m; m = m->next)
		if (m->core == core && strcmp(m->conf->script, conf->script) == 0) {
			m->refs++;
			pthread_mutex_unlock(&lf_mains_lock);
			return m;
		}
	m = calloc(1, sizeof(*m));
	if (!m) {
		snprintf(err->message, sizeof(err->message), "lua: out of memory");
		err->code = EZP_ERR_NOMEM;
		goto fail;
	}
	m->core = core;
	m->conf_copy = *conf;
	m->conf_copy.script = strdup(conf->script);
	m->conf_copy.mode = NULL;
	m->conf = &m->conf_copy;
	if (!m->conf_copy.script) {
		snprintf(err->message, sizeof(err->message), "lua: out of memory");
		err->code = EZP_ERR_NOMEM;
		goto fail;
	}
	m->group = group;
	m->refs = 1;
	m->tail = &m->head;
	m->script = lf_script_new(core, m->conf, LF_MODE_MAIN, group, why, sizeof(why));
	if (!m->script) {
		snprintf(err->message, sizeof(err->message), "lua: %.490s", why);
		err->code = EZP_ERR_CONFIG;
		err->side = EZP_SIDE_CONFIG;
		goto fail;
	}
	m->script->main = m;
	lf_main_set_wants(m, m->script);
	m->need_run = 1;
	pthread_mutex_init(&m->lock, NULL);
	pthread_cond_init(&m->cond, NULL);
	if (pthread_create(&m->thread, NULL, lf_main_thread, m) != 0) {
		pthread_cond_destroy(&m->cond);
		pthread_mutex_destroy(&m->lock);
		snprintf(err->message, sizeof(err->message), "lua: cannot start the main thread");
		err->code = EZP_ERR;
		goto fail;
	}
	lf_group_ref(group);
	m->next = lf_mains;
	lf_mains = m;
	pthread_mutex_unlock(&lf_mains_lock);
	return m;
fail:
	if (m) {
		lf_script_unref(m->script);
		free(m->conf_copy.script);
	}
	free(m);
	pthread_mutex_unlock(&lf_mains_lock);
	return NULL;
}

void lf_main_put(struct lf_main *m)
{
	struct lf_main **pp;
	struct lf_mevent *ev;

	pthread_mutex_lock(&lf_mains_lock);
	if (--m->refs > 0) {
		pthread_mutex_unlock(&lf_mains_lock);
		return;
	}
	for (pp = &lf_mains; *pp; pp = &(*pp)->next)
		if (*pp == m) {
			*pp = m->next;
			break;
		}
	pthread_mutex_unlock(&lf_mains_lock);
	pthread_mutex_lock(&m->lock);
	atomic_store(&m->stopping, 1); /* the count hook and sleep() see it */
	pthread_cond_signal(&m->cond);
	pthread_mutex_unlock(&m->lock);
	pthread_join(m->thread, NULL);
	lf_groups_clear_scope(m);
	while ((ev = lf_main_pop(m)))
		lf_event_free(m, ev);
	lf_script_unref(m->pending);
	lf_script_unref(m->script);
	pthread_cond_destroy(&m->cond);
	pthread_mutex_destroy(&m->lock);
	lf_group_put(m->group);
	free(m->conf_copy.script);
	free(m);
}
