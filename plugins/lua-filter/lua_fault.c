/*
 * lua_fault.c - ezp.set_faults: a script sets the faults of its pipeline(s)
 * or of one session through the fault plugin's `ezp.fault` interface.
 *
 *   ezp.set_faults{LatencyMs=, JitterMs=, Loss=, BandwidthBps=, Freeze=, Blackhole=,
 *                  Seed=, FreezeMaxMs=, Direction="both"|"to_server"|"to_client"}
 *   ezp.set_faults(id, {...})     a session's own faults
 *   ezp.set_faults(nil)           clear the pipeline's; ezp.set_faults(id, nil): the session's
 *
 * The values replace those of Direction (default both); the other direction
 * keeps its current values, as do Seed and FreezeMaxMs when not given.
 * Returns true, or nil and a reason naming the key; raises "the fault
 * plugin is not loaded" when no plugin offers the interface.
 * Thread: the thread that owns the calling state (a worker or the main-mode
 * runner); the interface never waits for a worker.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "lua_filter.h"

struct lf_faults_arg {
	struct ezp_fault_dir d;
	int to[2]; /* the directions the values replace */
	int has_seed, has_freeze_max;
	uint64_t seed;
	uint32_t freeze_max_ms;
};

/*
 * The interface, found when the group was made (the control thread), or now:
 * a group made before the services started (the config the daemon started
 * with) looks it up at its first call. The services' table only changes
 * while the daemon starts or stops.
 */
static const struct ezp_fault *lf_fault_iface(struct lf_script *s)
{
	const struct ezp_fault *fi = atomic_load(&s->group->fault);

	if (!fi) {
		fi = s->core->find_service(s->core->ctx, EZP_FAULT_IFACE, EZP_FAULT_VERSION);
		if (fi)
			atomic_store(&s->group->fault, fi);
	}
	return fi;
}

/* Is a plugin named "fault" loaded (its service may not run yet)? */
static int lf_fault_loaded(struct lf_script *s)
{
	const struct ezp_control *ctl = s->group->control;
	struct ezp_plugin_info pi;

	for (size_t i = 0; ctl; i++) {
		memset(&pi, 0, sizeof(pi));
		pi.struct_size = sizeof(pi);
		if (ctl->plugin_at(s->core->ctx, i, &pi) != EZP_OK)
			break;
		if (pi.desc && pi.desc->name && !strcmp(pi.desc->name, "fault"))
			return 1;
	}
	return 0;
}

/* A whole number in 0..@max at the top of @L's stack; 0 or a message in @why. */
static int lf_faults_uint(lua_State *L, const char *key, uint64_t max, uint64_t *out, char *why,
			  size_t n)
{
	int isnum = 0;
	lua_Integer v = lua_tointegerx(L, -1, &isnum);

	if (!isnum || v < 0 || (uint64_t)v > max) {
		snprintf(why, n, "ezp.set_faults: %s must be a whole number in 0..%llu", key,
			 (unsigned long long)max);
		return -1;
	}
	*out = (uint64_t)v;
	return 0;
}

/* Read the table at @idx into @a; 0, or -1 with @why naming the key. */
static int lf_faults_table(lua_State *L, int idx, struct lf_faults_arg *a, char *why, size_t n)
{
	uint64_t v = 0;

	memset(a, 0, sizeof(*a));
	a->to[0] = a->to[1] = 1;
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
		int rc = 0;
		if (!key) {
			snprintf(why, n,
				 "ezp.set_faults: the table's keys are names (LatencyMs, ...)");
			rc = -1;
		} else if (!strcmp(key, "LatencyMs") || !strcmp(key, "JitterMs")) {
			rc = lf_faults_uint(L, key, 300000, &v, why, n);
			*(key[0] == 'L' ? &a->d.latency_ms : &a->d.jitter_ms) = (uint32_t)v;
		} else if (!strcmp(key, "BandwidthBps")) {
			rc = lf_faults_uint(L, key, 100000000000ull, &a->d.bandwidth_bps, why, n);
		} else if (!strcmp(key, "Seed")) {
			rc = lf_faults_uint(L, key, INT64_MAX, &a->seed, why, n);
			a->has_seed = 1;
		} else if (!strcmp(key, "FreezeMaxMs")) {
			rc = lf_faults_uint(L, key, 600000, &v, why, n);
			a->freeze_max_ms = (uint32_t)v;
			a->has_freeze_max = 1;
		} else if (!strcmp(key, "Loss")) {
			a->d.loss = lua_tonumber(L, -1);
			if (lua_type(L, -1) != LUA_TNUMBER || !(a->d.loss >= 0 && a->d.loss <= 1)) {
				snprintf(why, n,
					 "ezp.set_faults: Loss must be a number in 0..1 (the "
					 "share of packets dropped)");
				rc = -1;
			}
		} else if (!strcmp(key, "Freeze") || !strcmp(key, "Blackhole")) {
			if (lua_type(L, -1) != LUA_TBOOLEAN) {
				snprintf(why, n, "ezp.set_faults: %s must be true or false", key);
				rc = -1;
			}
			*(key[0] == 'F' ? &a->d.freeze : &a->d.blackhole) = lua_toboolean(L, -1);
		} else if (!strcmp(key, "Direction")) {
			const char *d = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
			a->to[0] = !strcmp(d, "both") || !strcmp(d, "to_server");
			a->to[1] = !strcmp(d, "both") || !strcmp(d, "to_client");
			if (!a->to[0] && !a->to[1]) {
				snprintf(why, n,
					 "ezp.set_faults: Direction must be \"both\", "
					 "\"to_server\" or \"to_client\"");
				rc = -1;
			}
		} else {
			snprintf(why, n,
				 "ezp.set_faults: unknown key '%.40s' (LatencyMs, JitterMs, "
				 "Loss, BandwidthBps, Freeze, Blackhole, Seed, FreezeMaxMs, "
				 "Direction)",
				 key);
			rc = -1;
		}
		lua_pop(L, 1);
		if (rc) {
			lua_pop(L, 1); /* the key */
			return -1;
		}
	}
	return 0;
}

/* @cur with the asked direction(s), seed and bound replaced by @a. */
static void lf_faults_merge(struct ezp_faults *cur, const struct lf_faults_arg *a)
{
	cur->struct_size = sizeof(*cur);
	for (int d = 0; d < 2; d++)
		if (a->to[d])
			cur->dir[d] = a->d;
	if (a->has_seed)
		cur->seed = a->seed;
	if (a->has_freeze_max)
		cur->freeze_max_ms = a->freeze_max_ms;
}

static int lf_faults_fail(lua_State *L, const char *why)
{
	lua_pushnil(L);
	lua_pushstring(L, why);
	return 2;
}

int lf_ezp_set_faults(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	const struct ezp_fault *fi;
	struct lf_faults_arg a;
	struct ezp_faults f;
	struct ezp_error err;
	char why[560];
	int base = 1, top, clear, own, rc = EZP_OK;

	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_ezp); /* called as ezp:set_faults(...) */
	if (lua_rawequal(L, 1, -1))
		base = 2;
	lua_pop(L, 1);
	top = lua_gettop(L);
	if (top < base || (lua_type(L, base) != LUA_TTABLE && lua_type(L, base) != LUA_TNIL &&
			   !lua_isinteger(L, base)))
		return luaL_error(L, "ezp.set_faults: give a table of faults, nil to clear, or a "
				     "session id and one of those");
	fi = lf_fault_iface(s);
	if (!fi && lf_fault_loaded(s))
		return lf_faults_fail(L, "ezp.set_faults: the fault service is not running (the "
					 "daemon is starting or stopping); try again");
	if (!fi)
		return luaL_error(L, "ezp.set_faults: the fault plugin is not loaded");
	memset(&err, 0, sizeof(err));
	memset(&f, 0, sizeof(f));
	f.struct_size = sizeof(f);
	if (lua_isinteger(L, base)) { /* a session */
		uint64_t id = (uint64_t)lua_tointeger(L, base);
		if (lua_type(L, base + 1) != LUA_TTABLE && lua_type(L, base + 1) != LUA_TNIL)
			return luaL_error(L,
					  "ezp.set_faults(id, faults): faults is a table, or nil "
					  "to clear the session's own");
		clear = lua_type(L, base + 1) == LUA_TNIL;
		if (!clear && lf_faults_table(L, base + 1, &a, why, sizeof(why)))
			return lf_faults_fail(L, why);
		if (clear)
			rc = fi->session_set(fi->fault, id, NULL, &err);
		else if ((rc = fi->session_get(fi->fault, id, &f, &own, &err)) == EZP_OK) {
			lf_faults_merge(&f, &a);
			rc = fi->session_set(fi->fault, id, &f, &err);
		}
	} else { /* the script's pipeline(s) */
		struct lf_group **gs;
		size_t ng;
		clear = lua_type(L, base) == LUA_TNIL;
		if (!clear && lf_faults_table(L, base, &a, why, sizeof(why)))
			return lf_faults_fail(L, why);
		ng = lf_scope(s, &gs);
		for (size_t i = 0; i < ng && rc == EZP_OK; i++) {
			if (clear) {
				rc = fi->pipeline_set(fi->fault, gs[i]->pipeline, NULL, &err);
				continue;
			}
			memset(&f, 0, sizeof(f));
			f.struct_size = sizeof(f);
			rc = fi->pipeline_get(fi->fault, gs[i]->pipeline, &f, &err);
			if (rc == EZP_OK) {
				lf_faults_merge(&f, &a);
				rc = fi->pipeline_set(fi->fault, gs[i]->pipeline, &f, &err);
			}
		}
		lf_scope_put(gs, ng);
	}
	if (rc != EZP_OK) {
		snprintf(why, sizeof(why), "ezp.set_faults: %.500s",
			 err.message[0] ? err.message : "failed");
		return lf_faults_fail(L, why);
	}
	lua_pushboolean(L, 1);
	return 1;
}
