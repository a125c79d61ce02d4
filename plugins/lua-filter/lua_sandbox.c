/*
 * lua_sandbox.c - one sandboxed Lua state: a counting allocator (the memory
 * limit), a count hook (the instruction budget, which keeps firing once
 * spent so pcall loops stop too), the safe subset of the standard library,
 * the old globals (log, sleep, LEVEL_*), loading the script as text only,
 * and logging script errors with file and line.
 * Thread: a state is used by one thread at a time - its worker (callback
 * mode) or the main-mode runner thread; lf_script_new may run on the
 * control thread before the state is handed over.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lualib.h>

#include "lua_filter.h"

#define LF_HOOK_STEP 1000 /* instructions between two hook calls */

char lf_sleep_token;

/* ---- memory ---- */

/*
 * The limit holds while script code runs (s->limit_on: inside a resume or
 * the load), where the error reaches the script or the plugin.
 * The plugin's own pushes between two calls (the pkt table with the
 * packet's bytes, a coroutine, a session object, an error message) run
 * outside any protected call: refused there, Lua would panic and abort
 * the daemon - a script keeping its state full would do that with the
 * next packet. They are as big as the packet, not as the script wants,
 * and no script code runs meanwhile (no __gc, raw global lookups).
 */
static void *lf_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
	struct lf_script *s = ud;
	size_t old = ptr ? osize : 0;
	void *p;

	if (nsize == 0) {
		free(ptr);
		s->mem_used -= old;
		return NULL;
	}
	if (nsize > old && s->limit_on && s->mem_used - old + nsize > s->mem_limit) {
		s->mem_hit = 1;
		return NULL;
	}
	p = realloc(ptr, nsize);
	if (!p)
		return NULL;
	s->mem_used = s->mem_used - old + nsize;
	return p;
}

/* ---- the instruction budget ---- */

/* "file:line: " of the innermost Lua function of @L, or "" */
static void lf_where(lua_State *L, char *buf, size_t len)
{
	lua_Debug ar;

	buf[0] = '\0';
	for (int level = 0; lua_getstack(L, level, &ar); level++) {
		if (!lua_getinfo(L, "Sl", &ar))
			break;
		if (ar.currentline > 0) {
			snprintf(buf, len, "%s:%d: ", ar.short_src, ar.currentline);
			return;
		}
	}
}

static void lf_hook(lua_State *L, lua_Debug *ar)
{
	struct lf_script *s = lf_script_of(L);
	char where[128];

	(void)ar;
	if (s->main)
		lf_main_hook(s->main, s); /* may set s->stop: a reload stops EzpMain here */
	if (atomic_load_explicit(&s->stop, memory_order_relaxed) ||
	    (s->main && lf_main_stopping(s->main))) {
		lua_sethook(L, lf_hook, LUA_MASKCOUNT, 1);
		lf_where(L, where, sizeof(where));
		lua_pushfstring(L, "%sscript stopped (reload or shutdown)", where);
		lua_error(L);
	}
	s->budget -= LF_HOOK_STEP;
	if (s->budget > 0 && !s->exhausted)
		return;
	s->exhausted = 1;
	lua_sethook(L, lf_hook, LUA_MASKCOUNT, 1); /* from now on: every instruction */
	lf_where(L, where, sizeof(where));
	lua_pushfstring(L, "%sinstruction limit reached (InstructionLimit %I per call)", where,
			(lua_Integer)s->instr_limit);
	lua_error(L);
}

void lf_script_budget(struct lf_script *s)
{
	s->budget = s->instr_limit;
	s->exhausted = 0;
	s->mem_hit = 0;
	lua_sethook(s->L, lf_hook, LUA_MASKCOUNT, LF_HOOK_STEP);
}

/* ---- errors ---- */

void lf_script_error(struct lf_script *s, lua_State *L, int status, const char *what)
{
	const char *msg = lua_tostring(L, -1);
	char where[128], text[1024];
	uint64_t now = s->core->now_us();

	if (s->mem_hit || status == LUA_ERRMEM) {
		snprintf(text, sizeof(text), "memory limit of %zu MiB reached",
			 s->mem_limit >> 20);
		msg = text;
	} else if (!msg) {
		snprintf(text, sizeof(text), "(error object is a %s value)",
			 luaL_typename(L, -1));
		msg = text;
	}
	lf_where(L, where, sizeof(where));
	if (!where[0])
		snprintf(where, sizeof(where), "%s: ", s->path);
	/* at most 10 lines a second per state; the rest are counted */
	if (now - s->errors_window_us > 1000000) {
		if (s->errors_suppressed)
			s->core->log(EZP_LOG_ERROR, LF_SRC, "%s: %lu more script error(s) not logged",
				     s->path, (unsigned long)s->errors_suppressed);
		s->errors_window_us = now;
		s->errors_logged = 0;
		s->errors_suppressed = 0;
	}
	if (s->errors_logged++ < 10) {
		size_t wl = strlen(where);
		/* Lua already put "file:line:" on most messages */
		int has = strncmp(msg, where, wl - 1) == 0 || strncmp(msg, s->path, strlen(s->path)) == 0;
		s->core->log(EZP_LOG_ERROR, LF_SRC, "%s%s%s%s", has ? "" : where, msg,
			     what ? "; " : "", what ? what : "");
	} else {
		s->errors_suppressed++;
	}
	lua_pop(L, 1);
	lua_gc(s->L, LUA_GCCOLLECT);
}

/* ---- globals ---- */

static int lf_g_log(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	lua_Integer level = EZP_LOG_INFO;
	const char *msg;

	if (lua_gettop(L) >= 2) {
		level = luaL_checkinteger(L, 1);
		msg = luaL_tolstring(L, 2, NULL);
	} else {
		msg = luaL_tolstring(L, 1, NULL);
	}
	if (level < EZP_LOG_DEBUG)
		level = EZP_LOG_DEBUG;
	if (level > EZP_LOG_ERROR)
		level = EZP_LOG_ERROR;
	s->core->log((int)level, LF_SRC, "%s", msg);
	return 0;
}

static int lf_g_print(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	luaL_Buffer b;
	int n = lua_gettop(L);

	luaL_buffinit(L, &b);
	for (int i = 1; i <= n; i++) {
		if (i > 1)
			luaL_addchar(&b, '\t');
		luaL_tolstring(L, i, NULL);
		luaL_addvalue(&b);
	}
	luaL_pushresult(&b);
	s->core->log(EZP_LOG_INFO, LF_SRC, "%s", lua_tostring(L, -1));
	return 0;
}

static int lf_sleep_done(lua_State *L, int status, lua_KContext ctx)
{
	(void)L;
	(void)status;
	(void)ctx;
	return 0;
}

static int lf_g_sleep(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	lua_Number ms = luaL_checknumber(L, 1);

	if (ms < 0)
		ms = 0;
	if (ms > 86400000)
		return luaL_error(L, "sleep(%f): at most 86400000 ms", (double)ms);
	if (s->mode == LF_MODE_MAIN)
		return lf_main_sleep(L, s, (int64_t)ms);
	if (!lua_isyieldable(L) || L != s->running)
		return luaL_error(L, "sleep() can only wait in EzpFilter/EzpOnPacket itself, "
				  "not in a coroutine of the script, a metamethod or at load time");
	lua_settop(L, 0);
	lua_pushlightuserdata(L, &lf_sleep_token);
	lua_pushinteger(L, (lua_Integer)ms);
	return lua_yieldk(L, 2, 0, lf_sleep_done);
}

/* load() for text chunks only */
static int lf_g_load(lua_State *L)
{
	int n = lua_gettop(L);

	if (n < 1)
		return luaL_error(L, "bad argument #1 to 'load' (value expected)");
	if (lua_type(L, 1) == LUA_TSTRING && strncmp(lua_tostring(L, 1), LUA_SIGNATURE, 4) == 0)
		return luaL_error(L, "load: binary chunks (bytecode) are not allowed in the sandbox");
	lua_settop(L, n >= 4 ? 4 : 3);
	if (!lua_isnil(L, 3) && strcmp(luaL_checkstring(L, 3), "t") != 0)
		return luaL_error(L, "load: only text chunks are allowed (mode \"t\")");
	lua_pushstring(L, "t");
	lua_replace(L, 3);
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_insert(L, 1);
	lua_call(L, n >= 4 ? 4 : 3, LUA_MULTRET); /* an env only when one was given */
	return lua_gettop(L);
}

static int lf_g_disabled(lua_State *L)
{
	return luaL_error(L, "%s is not available in the sandbox",
			  lua_tostring(L, lua_upvalueindex(1)));
}

/* io, debug, package and the removed os functions: a clear error on use */
static int lf_g_missing(lua_State *L)
{
	return luaL_error(L, "%s.%s is not available in the sandbox (no io, os.execute, package, "
			  "debug)", lua_tostring(L, lua_upvalueindex(1)), luaL_tolstring(L, 2, NULL));
}

/*
 * setmetatable, refusing a metatable with __gc: Lua runs finalizers with
 * hooks off, so the instruction budget could not stop one (a loop in __gc
 * would hang the worker for good), and they run wherever the collector
 * steps, also outside the script's calls. An object is only marked for
 * finalization when its metatable has __gc at this point, so refusing it
 * here is enough.
 */
static int lf_g_setmetatable(lua_State *L)
{
	if (lua_type(L, 2) == LUA_TTABLE) {
		lua_pushliteral(L, "__gc");
		if (lua_rawget(L, 2) != LUA_TNIL)
			return luaL_error(L, "setmetatable: __gc metamethods are not available in "
					  "the sandbox");
		lua_pop(L, 1);
	}
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_insert(L, 1);
	lua_call(L, lua_gettop(L) - 1, 1);
	return 1;
}

static void lf_missing_mt(lua_State *L, const char *name)
{
	lua_newtable(L);
	lua_pushstring(L, name);
	lua_pushcclosure(L, lf_g_missing, 1);
	lua_setfield(L, -2, "__index");
	lua_setmetatable(L, -2);
}

static void lf_disable(lua_State *L, int table, const char *name, const char *shown)
{
	lua_pushstring(L, shown);
	lua_pushcclosure(L, lf_g_disabled, 1);
	lua_setfield(L, table, name);
}

static void lf_open_libs(lua_State *L)
{
	static const luaL_Reg libs[] = {
		{LUA_GNAME, luaopen_base},         {LUA_COLIBNAME, luaopen_coroutine},
		{LUA_TABLIBNAME, luaopen_table},   {LUA_STRLIBNAME, luaopen_string},
		{LUA_MATHLIBNAME, luaopen_math},   {LUA_UTF8LIBNAME, luaopen_utf8},
		{LUA_OSLIBNAME, luaopen_os},       {NULL, NULL},
	};
	static const char *const os_keep[] = {"time", "clock", "date", NULL};

	for (const luaL_Reg *l = libs; l->name; l++) {
		luaL_requiref(L, l->name, l->func, 1);
		lua_pop(L, 1);
	}
	lua_pushglobaltable(L);
	lf_disable(L, lua_gettop(L), "dofile", "dofile");
	lf_disable(L, lua_gettop(L), "loadfile", "loadfile");
	for (int i = 0; i < 3; i++) {
		static const char *const gone[] = {"io", "debug", "package"};
		lua_newtable(L);
		lf_missing_mt(L, gone[i]);
		lua_setfield(L, -2, gone[i]);
	}
	lua_getfield(L, -1, "load");
	lua_pushcclosure(L, lf_g_load, 1);
	lua_setfield(L, -2, "load");
	lua_getfield(L, -1, "setmetatable");
	lua_pushcclosure(L, lf_g_setmetatable, 1);
	lua_setfield(L, -2, "setmetatable");
	lua_pushcfunction(L, lf_g_print);
	lua_setfield(L, -2, "print");
	lf_disable(L, lua_gettop(L), "require", "require");
	/* string.dump: no bytecode out (and none in: load is text only) */
	lua_getfield(L, -1, "string");
	lf_disable(L, lua_gettop(L), "dump", "string.dump");
	lua_pop(L, 1);
	/* os: time, clock, date only */
	lua_newtable(L);
	lua_getfield(L, -2, "os");
	for (int i = 0; os_keep[i]; i++) {
		lua_getfield(L, -1, os_keep[i]);
		lua_setfield(L, -3, os_keep[i]);
	}
	lua_pop(L, 1);
	lf_missing_mt(L, "os");
	lua_setfield(L, -2, "os");
	lua_pop(L, 1);
	lf_pattern_open(L);

	lua_register(L, "log", lf_g_log);
	lua_register(L, "sleep", lf_g_sleep);
	static const char *const levels[] = {"LEVEL_DEBUG", "LEVEL_INFO", "LEVEL_WARN",
					     "LEVEL_ERROR"};
	for (int i = 0; i < 4; i++) {
		lua_pushinteger(L, i);
		lua_setglobal(L, levels[i]);
	}
}

/* ---- making and loading ---- */

/*
 * A script may give _G an __index that raises for unknown names (the
 * "strict globals" idiom); the plugin asks for functions a script may
 * leave out, often outside any protected call, so it never goes through
 * metamethods.
 */
int lf_getglobal(lua_State *L, const char *name)
{
	int t;

	lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_GLOBALS);
	lua_pushstring(L, name);
	t = lua_rawget(L, -2);
	lua_remove(L, -2);
	return t;
}

static int lf_load_protected(lua_State *L)
{
	struct lf_script *s = lua_touserdata(L, 1);
	int rc;

	lf_open_libs(L);
	lf_ezp_open(L, s);
	rc = luaL_loadfilex(L, s->path, "t");
	if (rc != LUA_OK)
		return lua_error(L);
	lua_call(L, 0, 0);
	lf_getglobal(L, "EzpFilter");
	lf_getglobal(L, "EzpOnPacket");
	if (!lua_isnil(L, -1) && !lua_isnil(L, -2))
		return luaL_error(L, "%s: defines both EzpFilter and EzpOnPacket; keep one",
				  s->path);
	if ((!lua_isnil(L, -1) && !lua_isfunction(L, -1)) ||
	    (!lua_isnil(L, -2) && !lua_isfunction(L, -2)))
		return luaL_error(L, "%s: EzpFilter / EzpOnPacket must be functions", s->path);
	lua_pop(L, 2);
	if (s->mode == LF_MODE_MAIN) {
		lf_getglobal(L, "EzpMain");
		if (!lua_isfunction(L, -1))
			return luaL_error(L, "%s: Mode is main but the script defines no EzpMain "
					  "function", s->path);
		lua_pop(L, 1);
	}
	return 0;
}

struct lf_script *lf_script_new(const struct ezp_core *core, const struct lf_conf *conf,
				int mode, struct lf_group *group, char *why, size_t why_len)
{
	struct lf_script *s = calloc(1, sizeof(*s));
	int rc;

	if (!s) {
		snprintf(why, why_len, "out of memory");
		return NULL;
	}
	s->mem_limit = (size_t)conf->memory_mb << 20;
	s->instr_limit = conf->instructions;
	s->mode = mode;
	s->path = conf->script;
	s->core = core;
	s->group = group;
	s->refs = 1;
	s->ref_filter = s->ref_open = s->ref_close = LUA_NOREF;
	s->ref_packets = s->ref_ezp = s->ref_spare = LUA_NOREF;
	s->L = lua_newstate(lf_alloc, s);
	if (!s->L) {
		snprintf(why, why_len, "%s: cannot make a Lua state (MemoryLimitMb too small?)",
			 conf->script);
		free(s);
		return NULL;
	}
	*(struct lf_script **)lua_getextraspace(s->L) = s;
	lf_script_budget(s);
	lua_pushcfunction(s->L, lf_load_protected);
	lua_pushlightuserdata(s->L, s);
	s->limit_on = 1;
	rc = lua_pcall(s->L, 1, 0, 0);
	s->limit_on = 0;
	if (rc != LUA_OK) {
		const char *msg = lua_tostring(s->L, -1);
		if (s->mem_hit || rc == LUA_ERRMEM)
			snprintf(why, why_len, "%s: memory limit of %zu MiB reached while loading",
				 conf->script, s->mem_limit >> 20);
		else
			snprintf(why, why_len, "%s", msg ? msg : "error loading the script");
		lua_close(s->L);
		free(s);
		return NULL;
	}
	lf_script_budget(s);
	return s;
}

void lf_script_unref(struct lf_script *s)
{
	if (!s || --s->refs > 0)
		return;
	lua_close(s->L);
	free(s);
}

int lf_script_resume(struct lf_script *s, lua_State *co, int nargs, int *nres)
{
	lua_State *prev = s->running;
	int rc, limit = s->limit_on;

	s->running = co;
	s->limit_on = 1;
	rc = lua_resume(co, s->L, nargs, nres);
	s->limit_on = limit;
	s->running = prev;
	return rc;
}

int lf_push_filter_fn(struct lf_script *s, lua_State *L, int *onpacket, int *two_args)
{
	*onpacket = 0;
	*two_args = 1;
	if (lf_getglobal(L, "EzpFilter") == LUA_TFUNCTION)
		return 1;
	lua_pop(L, 1);
	if (s->watcher_off)
		return 0;
	if (lf_getglobal(L, "EzpOnPacket") == LUA_TFUNCTION) {
		*onpacket = 1;
		return 1;
	}
	lua_pop(L, 1);
	if (s->ref_packets != LUA_NOREF) { /* a watcher, like EzpOnPacket */
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_packets);
		*two_args = s->packets_two_args;
		*onpacket = 1;
		return 1;
	}
	return 0;
}

int lf_verdict_of(struct lf_script *s, lua_State *L, int nres, int onpacket,
		  struct ezp_packet **repl)
{
	int t = nres > 0 ? lua_type(L, -nres) : LUA_TNIL;
	int v = EZP_VERDICT_PASS;

	*repl = NULL;
	if (onpacket) { /* a watcher: the packet passes; true uninstalls it */
		if (t == LUA_TBOOLEAN && lua_toboolean(L, -nres))
			s->watcher_off = 1;
	} else if (t == LUA_TBOOLEAN) {
		v = lua_toboolean(L, -nres) ? EZP_VERDICT_PASS : EZP_VERDICT_DROP;
	} else if (t == LUA_TSTRING) {
		size_t len;
		const char *d = lua_tolstring(L, -nres, &len);
		*repl = s->core->packet_new(len);
		if (*repl) {
			memcpy((*repl)->data, d, len);
			v = EZP_VERDICT_REPLACE;
		}
	} else if (t != LUA_TNIL && !s->warned_return) {
		s->warned_return = 1;
		s->core->log(EZP_LOG_WARN, LF_SRC, "%s: EzpFilter returned a %s; the packet passes "
			     "(return true, false or a string) - said once", s->path,
			     lua_typename(L, t));
	}
	lua_pop(L, nres);
	return v;
}
