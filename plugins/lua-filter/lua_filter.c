/*
 * lua_filter.c - the `lua` filter kind: its parameters, one instance per
 * worker, callback mode (each packet runs EzpFilter / EzpOnPacket in a
 * coroutine of the worker's own Lua state; sleep() yields, the packet is
 * held and answered when the coroutine finishes), session events feeding
 * the registry and EzpOnSessionOpen/Close, reload, and the plugin
 * descriptor.
 * Thread: create on the control thread; packet, session_event, reload and
 * the timers on the instance's worker; destroy on any thread once the core
 * calls nothing else of the instance.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lua_filter.h"

struct lf_hold;

struct lf_inst {
	const struct ezp_core *core;
	struct ezp_worker *worker;
	unsigned worker_index, index;
	const struct lf_conf *conf;
	int mode;
	struct lf_group *group;
	struct lf_script *script; /* callback mode */
	struct lf_main *main;     /* main mode */
	struct lf_watch *watch;
	struct ezp_timer *reload_timer;
	struct lf_hold *holds;
};

/* A packet whose coroutine sleeps. */
struct lf_hold {
	struct lf_inst *inst;
	struct lf_script *script; /* ref'd: a reload keeps it alive */
	lua_State *co;
	int co_ref;
	int onpacket;
	uint64_t hold_id;
	struct ezp_timer *timer;
	struct lf_hold *next, **pprev;
};

static const struct ezp_param lf_params[] = {
	{"Script", EZP_PARAM_STRING, offsetof(struct lf_conf, script), NULL, 1, 0, 0,
	 "the Lua file; a relative path is relative to the daemon's working directory"},
	{"Mode", EZP_PARAM_STRING, offsetof(struct lf_conf, mode), "callback", 0, 0, 0,
	 "callback (EzpFilter per packet on each worker) or main (EzpMain on its own thread)"},
	{"MemoryLimitMb", EZP_PARAM_INT, offsetof(struct lf_conf, memory_mb), "64", 0, 1, 4096,
	 "memory each Lua state may use (one state per worker, one for main mode)"},
	{"InstructionLimit", EZP_PARAM_INT, offsetof(struct lf_conf, instructions), "10000000", 0,
	 1000, 1000000000000, "Lua instructions (and pattern steps) a call may run"},
	{"WatchFile", EZP_PARAM_BOOL, offsetof(struct lf_conf, watch), "true", 0, 0, 0,
	 "reload the script when its file changes"},
	EZP_PARAM_END,
};

/* ---- callback mode: a packet in a coroutine ---- */

static void lf_hold_free(struct lf_hold *h)
{
	*h->pprev = h->next;
	if (h->next)
		h->next->pprev = h->pprev;
	h->inst->core->timer_free(h->timer);
	luaL_unref(h->script->L, LUA_REGISTRYINDEX, h->co_ref);
	lf_script_unref(h->script);
	free(h);
}

/* Take a coroutine (the spare one when there is one); it is left on top of s->L. */
static lua_State *lf_co_take(struct lf_script *s)
{
	if (s->ref_spare != LUA_NOREF) {
		lua_rawgeti(s->L, LUA_REGISTRYINDEX, s->ref_spare);
		luaL_unref(s->L, LUA_REGISTRYINDEX, s->ref_spare);
		s->ref_spare = LUA_NOREF;
		return lua_tothread(s->L, -1);
	}
	return lua_newthread(s->L);
}

/* The coroutine on top of s->L finished well: keep it for the next packet. */
static void lf_co_recycle(struct lf_script *s, lua_State *co)
{
	lua_settop(co, 0);
	if (s->ref_spare == LUA_NOREF)
		s->ref_spare = luaL_ref(s->L, LUA_REGISTRYINDEX);
	else
		lua_pop(s->L, 1);
}

static void lf_hold_fire(void *arg);

/*
 * After a resume of @co (on top of s->L when @h is NULL): a verdict, a new
 * sleep, or an error. Returns the verdict for a synchronous call.
 */
static int lf_after_resume(struct lf_inst *in, struct lf_script *s, lua_State *co, int rc,
			   int nres, int onpacket, struct lf_hold *h, uint64_t hold_id,
			   struct ezp_packet **repl)
{
	if (rc == LUA_YIELD && nres == 2 && lua_touserdata(co, -2) == &lf_sleep_token) {
		lua_Integer ms = lua_tointeger(co, -1);
		lua_pop(co, 2);
		if (!h) {
			h = calloc(1, sizeof(*h));
			if (h)
				h->timer = in->core->timer_new(in->worker, lf_hold_fire, h);
			if (!h || !h->timer) {
				free(h);
				in->core->log(EZP_LOG_ERROR, LF_SRC, "%s: out of memory holding a "
					      "packet for sleep(); Default applied", s->path);
				lua_pop(s->L, 1);
				return EZP_VERDICT_DEFAULT;
			}
			h->inst = in;
			h->script = s;
			s->refs++;
			h->co = co;
			h->co_ref = luaL_ref(s->L, LUA_REGISTRYINDEX);
			h->onpacket = onpacket;
			h->hold_id = hold_id;
			h->next = in->holds;
			if (h->next)
				h->next->pprev = &h->next;
			h->pprev = &in->holds;
			in->holds = h;
		}
		in->core->timer_start(h->timer, (uint64_t)ms, 0);
		return EZP_VERDICT_HOLD;
	}
	if (rc == LUA_YIELD) {
		lua_settop(co, 0);
		lua_pushfstring(co, "%s: coroutine.yield() outside a coroutine of the script "
				"(use sleep(ms) to wait)", s->path);
		rc = LUA_ERRRUN;
	}
	if (rc != LUA_OK) {
		lf_script_error(s, co, rc, NULL);
		if (h) {
			in->core->filter_answer(in->core->ctx, h->hold_id, EZP_VERDICT_DEFAULT, NULL);
			lf_hold_free(h);
		} else {
			lua_pop(s->L, 1);
		}
		return EZP_VERDICT_DEFAULT;
	}
	int v = lf_verdict_of(s, co, nres, onpacket, repl);
	if (h) {
		in->core->filter_answer(in->core->ctx, h->hold_id, v, *repl);
		*repl = NULL;
		lf_hold_free(h);
	} else {
		lf_co_recycle(s, co);
	}
	return v;
}

static void lf_hold_fire(void *arg)
{
	struct lf_hold *h = arg;
	struct lf_script *s = h->script;
	struct ezp_packet *repl = NULL;
	int nres = 0, rc;

	lf_script_budget(s);
	rc = lf_script_resume(s, h->co, 0, &nres);
	lf_after_resume(h->inst, s, h->co, rc, nres, h->onpacket, h, h->hold_id, &repl);
}

static int lf_packet(void *instance, struct ezp_filter_call *call)
{
	struct lf_inst *in = instance;
	struct lf_entry *e = *call->session_state;
	struct ezp_packet *pkt = call->pkt;
	struct lf_script *s;
	struct lf_cur cur;
	lua_State *co;
	int onpacket, two, nres = 0, rc, v;

	if (e) {
		atomic_fetch_add_explicit(&e->bytes, pkt->len, memory_order_relaxed);
		atomic_store_explicit(&e->last_us, pkt->ts_us, memory_order_relaxed);
	}
	atomic_fetch_add_explicit(&in->group->bytes_total, pkt->len, memory_order_relaxed);
	if (in->mode == LF_MODE_MAIN) {
		if (!lf_main_wants_packets(in->main))
			return EZP_VERDICT_PASS;
		if (lf_main_post_packet(in->main, pkt, call->hold_id, e) == EZP_OK)
			return EZP_VERDICT_HOLD;
		return EZP_VERDICT_DEFAULT;
	}
	s = in->script;
	if (!lf_push_filter_fn(s, s->L, &onpacket, &two))
		return EZP_VERDICT_PASS;
	co = lf_co_take(s);
	lua_rotate(s->L, -2, 1); /* coroutine below the function */
	lua_xmove(s->L, co, 1);
	if (two)
		lua_rawgeti(co, LUA_REGISTRYINDEX, s->ref_ezp);
	lf_push_pkt(co, s, pkt, e);
	cur.session = call->session;
	cur.session_id = pkt->session_id;
	cur.index = call->index;
	s->cur = &cur;
	lf_script_budget(s);
	rc = lf_script_resume(s, co, two ? 2 : 1, &nres);
	s->cur = NULL;
	v = lf_after_resume(in, s, co, rc, nres, onpacket, NULL, call->hold_id, &call->replacement);
	return v;
}

/* ---- session events ---- */

static void lf_call_hook(struct lf_script *s, const char *name, struct lf_entry *e)
{
	lua_State *co;
	int nres = 0, rc, limit = s->limit_on;

	if (lf_getglobal(s->L, name) != LUA_TFUNCTION) {
		lua_pop(s->L, 1);
		return;
	}
	s->limit_on = 0; /* our own pushes, also if a script call got us here */
	co = lf_co_take(s);
	lua_rotate(s->L, -2, 1);
	lua_xmove(s->L, co, 1);
	lua_rawgeti(co, LUA_REGISTRYINDEX, s->ref_ezp);
	lf_push_session(co, e); /* not ezp.get_proxy: the script may have changed it */
	lf_script_budget(s);
	rc = lf_script_resume(s, co, 2, &nres);
	if (rc == LUA_OK) {
		lf_co_recycle(s, co);
	} else {
		if (rc == LUA_YIELD) {
			lua_settop(co, 0);
			lua_pushfstring(co, "%s: %s cannot sleep or yield", s->path, name);
			rc = LUA_ERRRUN;
		}
		lf_script_error(s, co, rc, NULL);
		lua_pop(s->L, 1);
	}
	s->limit_on = limit;
}

static void lf_session_event(void *instance, struct ezp_session *session, int event,
			     void **session_state)
{
	struct lf_inst *in = instance;
	struct lf_entry *e = *session_state;
	struct ezp_session_info info;

	memset(&info, 0, sizeof(info));
	info.struct_size = sizeof(info);
	in->core->session_info(session, &info);
	if (event == EZP_SESSION_OPENED && !e) {
		e = lf_session_open(in->group, &info);
		*session_state = e;
		if (!e)
			return;
		if (in->mode == LF_MODE_CALLBACK)
			lf_call_hook(in->script, "EzpOnSessionOpen", e);
		else
			lf_main_post_session(in->main, e, 1);
	} else if (event == EZP_SESSION_CHANGED && e) {
		lf_session_change(in->group, e, &info);
	} else if (event == EZP_SESSION_CLOSED && e) {
		/* a session moving to a new filter chain is not closing: no hook */
		if (info.close_reason != EZP_CLOSE_NONE) {
			atomic_store(&e->alive, 0);
			if (in->mode == LF_MODE_CALLBACK)
				lf_call_hook(in->script, "EzpOnSessionClose", e);
			else
				lf_main_post_session(in->main, e, 0);
		}
		lf_session_close(in->group, e);
		*session_state = NULL;
	}
}

/* ---- reload ---- */

static void lf_reload_now(struct lf_inst *in, int loud)
{
	char why[1024];
	struct lf_script *s;

	if (in->mode == LF_MODE_MAIN) {
		if (in->worker_index == 0)
			lf_main_reload(in->main);
		return;
	}
	s = lf_script_new(in->core, in->conf, LF_MODE_CALLBACK, in->group, why, sizeof(why));
	if (!s) {
		lf_log_reload(in->core, in->conf->script, 0, why, loud);
		return;
	}
	s->inst = in;
	lf_script_unref(in->script); /* held coroutines keep the old state until they finish */
	in->script = s;
	lf_log_reload(in->core, in->conf->script, 1, NULL, loud);
}

/* The instance that completes a round of reloads (every worker) logs at info. */
static int lf_reload_loud(struct lf_inst *in)
{
	unsigned n = atomic_load(&in->group->n_inst);

	return n == 0 || (atomic_fetch_add(&in->group->n_reloads, 1) + 1) % n == 0;
}

static void lf_reload_timer(void *arg)
{
	struct lf_inst *in = arg;

	lf_reload_now(in, in->mode == LF_MODE_MAIN || lf_reload_loud(in));
}

/* the script's folder changed: reload a little later (editors write in steps) */
static void lf_file_changed(void *arg)
{
	struct lf_inst *in = arg;

	if (in->reload_timer)
		in->core->timer_start(in->reload_timer, 100, 0);
}

static void lf_reload_hook(void *instance)
{
	struct lf_inst *in = instance;

	lf_reload_now(in, in->mode == LF_MODE_MAIN || lf_reload_loud(in));
}

/* ---- create / destroy ---- */

static void lf_destroy(void *instance)
{
	struct lf_inst *in = instance;

	if (!in)
		return;
	lf_watch_free(in->watch);
	in->core->timer_free(in->reload_timer);
	while (in->holds)
		lf_hold_free(in->holds);
	if (in->script)
		atomic_fetch_sub(&in->group->n_inst, 1);
	lf_script_unref(in->script);
	if (in->main)
		lf_main_put(in->main);
	lf_group_put(in->group);
	free(in);
}

static int lf_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
		     struct ezp_error *err)
{
	const struct lf_conf *conf = config;
	struct lf_inst *in = NULL;
	char why[1024];

	if (strcmp(conf->mode, "callback") != 0 && strcmp(conf->mode, "main") != 0) {
		snprintf(err->message, sizeof(err->message),
			 "lua: Mode must be callback or main, not '%s'", conf->mode);
		err->code = EZP_ERR_CONFIG;
		err->side = EZP_SIDE_CONFIG;
		return EZP_ERR_CONFIG;
	}
	in = calloc(1, sizeof(*in));
	if (!in)
		goto nomem;
	in->core = ctx->core;
	in->worker = ctx->worker;
	in->worker_index = ctx->worker_index;
	in->index = ctx->index;
	in->conf = conf;
	in->mode = strcmp(conf->mode, "main") == 0 ? LF_MODE_MAIN : LF_MODE_CALLBACK;
	in->group = lf_group_get(ctx->core, ctx->pipeline, ctx->index);
	if (!in->group)
		goto nomem;
	if (in->mode == LF_MODE_MAIN) {
		in->main = lf_main_get(ctx->core, conf, in->group, err);
		if (!in->main)
			goto fail;
		lf_group_set_scope(in->group, in->main);
	} else {
		lf_group_set_scope(in->group, NULL);
		in->script = lf_script_new(ctx->core, conf, LF_MODE_CALLBACK, in->group, why,
					   sizeof(why));
		if (!in->script) {
			snprintf(err->message, sizeof(err->message), "lua: %.490s", why);
			err->code = EZP_ERR_CONFIG;
			err->side = EZP_SIDE_CONFIG;
			goto fail;
		}
		in->script->inst = in;
		atomic_fetch_add(&in->group->n_inst, 1);
	}
	in->reload_timer = ctx->core->timer_new(ctx->worker, lf_reload_timer, in);
	if (conf->watch && in->reload_timer && (in->mode == LF_MODE_CALLBACK || ctx->worker_index == 0))
		in->watch = lf_watch_new(ctx->core, ctx->worker, conf->script, lf_file_changed, in);
	*instance = in;
	return EZP_OK;
nomem:
	snprintf(err->message, sizeof(err->message), "lua: out of memory");
	err->code = EZP_ERR_NOMEM;
fail:
	lf_destroy(in);
	return err->code ? err->code : EZP_ERR;
}

static const struct ezp_filter_kind lf_kind = {
	.struct_size = sizeof(struct ezp_filter_kind),
	.name = "lua",
	.description = "runs a sandboxed Lua 5.4 script on each packet (the old program's "
		       "scripts run unchanged)",
	.flags = EZP_FILTER_READS_PAYLOAD,
	.params = lf_params,
	.config_size = sizeof(struct lf_conf),
	.create = lf_create,
	.packet = lf_packet,
	.session_event = lf_session_event,
	.destroy = lf_destroy,
	.reload = lf_reload_hook,
};

static const struct ezp_filter_kind *const lf_kinds[] = {&lf_kind, NULL};

static int lf_init(const struct ezp_core *core, struct ezp_error *err)
{
	(void)core;
	if (lf_control_start() != EZP_OK) {
		snprintf(err->message, sizeof(err->message), "lua: cannot start its control thread");
		err->code = EZP_ERR;
		return EZP_ERR;
	}
	return EZP_OK;
}

static void lf_fini(void)
{
	lf_control_stop();
}

EZP_PLUGIN_DEFINE(ezp_plugin, .name = "lua-filter", .version = "0.1.0",
		  .description = "the lua filter: sandboxed Lua 5.4 scripts on packets",
		  .license = "MIT", .init = lf_init, .fini = lf_fini, .filters = lf_kinds);
