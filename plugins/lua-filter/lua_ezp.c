/*
 * lua_ezp.c - what a script sees of the proxy: the `ezp` table, session
 * objects (ezp.get_proxy), the `pkt` table, and the session registry they
 * read. The registry is shared by the instances of one `lua` stage on all
 * workers: a mutex taken when a session opens, changes or closes (and by
 * the rare by-id lookups), atomics for the counters the packet path bumps.
 * Thread: Lua functions run on the thread that owns the calling state (a
 * worker, or the main-mode runner); the registry functions on any thread.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lua_filter.h"

static pthread_mutex_t lf_groups_lock = PTHREAD_MUTEX_INITIALIZER;
static struct lf_group *lf_groups;

/* ---- groups and the registry ---- */

struct lf_group *lf_group_get(const struct ezp_core *core, const char *pipeline, unsigned index)
{
	struct lf_group *g;

	pthread_mutex_lock(&lf_groups_lock);
	for (g = lf_groups; g; g = g->next)
		if (g->core == core && g->index == index && strcmp(g->pipeline, pipeline) == 0)
			break;
	if (g) {
		g->refs++;
		pthread_mutex_unlock(&lf_groups_lock);
		return g;
	}
	g = calloc(1, sizeof(*g));
	if (g && !(g->pipeline = strdup(pipeline))) {
		free(g);
		g = NULL;
	}
	if (g) {
		g->index = index;
		g->refs = 1;
		g->core = core;
		g->control = core->find_service(core->ctx, EZP_CONTROL_IFACE, EZP_CONTROL_VERSION);
		atomic_init(&g->fault, core->find_service(core->ctx, EZP_FAULT_IFACE,
							  EZP_FAULT_VERSION));
		pthread_mutex_init(&g->lock, NULL);
		g->next = lf_groups;
		lf_groups = g;
	}
	pthread_mutex_unlock(&lf_groups_lock);
	return g;
}

void lf_group_ref(struct lf_group *g)
{
	pthread_mutex_lock(&lf_groups_lock);
	g->refs++;
	pthread_mutex_unlock(&lf_groups_lock);
}

void lf_group_put(struct lf_group *g)
{
	struct lf_group **pp;

	if (!g)
		return;
	pthread_mutex_lock(&lf_groups_lock);
	if (--g->refs > 0) {
		pthread_mutex_unlock(&lf_groups_lock);
		return;
	}
	for (pp = &lf_groups; *pp; pp = &(*pp)->next)
		if (*pp == g) {
			*pp = g->next;
			break;
		}
	pthread_mutex_unlock(&lf_groups_lock);
	/* every entry holds a reference: none is left here */
	pthread_mutex_destroy(&g->lock);
	free(g->pipeline);
	free(g);
}

void lf_entry_unref(struct lf_entry *e)
{
	if (e && atomic_fetch_sub(&e->refs, 1) == 1) {
		lf_group_put(e->group);
		free(e);
	}
}

static void lf_entry_fill(struct lf_group *g, struct lf_entry *e,
			  const struct ezp_session_info *info)
{
	g->core->addr_format(&info->client, e->client, sizeof(e->client));
	g->core->addr_format(&info->server, e->server, sizeof(e->server));
	snprintf(e->network, sizeof(e->network), "%s", info->transport ? info->transport : "");
}

struct lf_entry *lf_session_open(struct lf_group *g, const struct ezp_session_info *info)
{
	struct lf_entry *e;

	pthread_mutex_lock(&g->lock);
	for (e = g->entries; e; e = e->next)
		if (e->id == info->id)
			break;
	if (!e && (e = calloc(1, sizeof(*e)))) {
		e->id = info->id;
		atomic_init(&e->refs, 1); /* the registry's */
		atomic_init(&e->alive, 1);
		atomic_init(&e->bytes, 0);
		atomic_init(&e->last_us, info->last_activity_us);
		e->group = g;
		lf_group_ref(g);
		e->next = g->entries;
		g->entries = e;
		atomic_fetch_add(&g->n_live, 1);
	}
	if (e) {
		lf_entry_fill(g, e, info);
		e->attach++;
		atomic_fetch_add(&e->refs, 1); /* the session slot's */
	}
	pthread_mutex_unlock(&g->lock);
	return e;
}

void lf_session_change(struct lf_group *g, struct lf_entry *e, const struct ezp_session_info *info)
{
	pthread_mutex_lock(&g->lock);
	lf_entry_fill(g, e, info);
	pthread_mutex_unlock(&g->lock);
}

void lf_session_close(struct lf_group *g, struct lf_entry *e)
{
	struct lf_entry **pp;
	int gone = 0;

	pthread_mutex_lock(&g->lock);
	if (--e->attach <= 0) {
		for (pp = &g->entries; *pp; pp = &(*pp)->next)
			if (*pp == e) {
				*pp = e->next;
				gone = 1;
				break;
			}
		if (gone)
			atomic_fetch_sub(&g->n_live, 1);
	}
	pthread_mutex_unlock(&g->lock);
	if (gone) {
		atomic_store(&e->alive, 0);
		lf_entry_unref(e); /* the registry's */
	}
	lf_entry_unref(e); /* the slot's */
}

void lf_group_set_scope(struct lf_group *g, const void *scope)
{
	pthread_mutex_lock(&lf_groups_lock);
	g->scope = scope;
	pthread_mutex_unlock(&lf_groups_lock);
}

void lf_groups_clear_scope(const void *scope)
{
	struct lf_group *g;

	pthread_mutex_lock(&lf_groups_lock);
	for (g = lf_groups; g; g = g->next)
		if (g->scope == scope)
			g->scope = NULL;
	pthread_mutex_unlock(&lf_groups_lock);
}

/*
 * The groups @s speaks for, each ref'd, in *out (malloc'd; release with
 * lf_scope_put): its own, and in main mode every group sharing its runner.
 */
size_t lf_scope(struct lf_script *s, struct lf_group ***out)
{
	struct lf_group *g, **v;
	size_t n = 0, cap = 0;

	pthread_mutex_lock(&lf_groups_lock);
	for (g = lf_groups; g; g = g->next)
		cap++;
	v = calloc(cap + 1, sizeof(*v));
	for (g = lf_groups; v && g; g = g->next)
		if (g == s->group || (s->main && g->scope == s->main)) {
			g->refs++;
			v[n++] = g;
		}
	pthread_mutex_unlock(&lf_groups_lock);
	*out = v;
	return n;
}

void lf_scope_put(struct lf_group **v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		lf_group_put(v[i]);
	free(v);
}

/* Live session ids of every group @s speaks for; *out malloc'd. */
static int lf_scope_ids(struct lf_script *s, uint64_t **out, size_t *n)
{
	struct lf_group **gs;
	size_t ng = lf_scope(s, &gs), k = 0, cap = 1;
	uint64_t *v;

	for (size_t i = 0; i < ng; i++)
		cap += (size_t)atomic_load(&gs[i]->n_live);
	v = gs ? malloc(cap * sizeof(*v)) : NULL;
	for (size_t i = 0; v && i < ng; i++) {
		pthread_mutex_lock(&gs[i]->lock);
		for (struct lf_entry *e = gs[i]->entries; e && k < cap; e = e->next)
			v[k++] = e->id;
		pthread_mutex_unlock(&gs[i]->lock);
	}
	lf_scope_put(gs, ng);
	if (!v)
		return EZP_ERR_NOMEM;
	*out = v;
	*n = k;
	return EZP_OK;
}

/* Session @id among the groups @s speaks for (ref'd), or NULL. */
static struct lf_entry *lf_entry_find(struct lf_script *s, uint64_t id)
{
	struct lf_group **gs;
	size_t ng = lf_scope(s, &gs);
	struct lf_entry *e = NULL;

	for (size_t i = 0; !e && i < ng; i++) {
		pthread_mutex_lock(&gs[i]->lock);
		for (e = gs[i]->entries; e; e = e->next)
			if (e->id == id) {
				atomic_fetch_add(&e->refs, 1);
				break;
			}
		pthread_mutex_unlock(&gs[i]->lock);
	}
	lf_scope_put(gs, ng);
	return e;
}

/* ---- the pkt table ---- */

void lf_push_pkt(lua_State *L, struct lf_script *s, const struct ezp_packet *pkt,
		 const struct lf_entry *e)
{
	int to_server = pkt->dir == EZP_DIR_TO_SERVER;
	int injected = (pkt->flags & EZP_PKT_INJECTED) != 0;
	const char *client = e ? e->client : "", *server = e ? e->server : "";

	(void)s;
	lua_createtable(L, 0, 7);
	lua_pushinteger(L, (to_server ? 1 : 0) | (injected ? 2 : 0));
	lua_setfield(L, -2, "flags");
	lua_pushboolean(L, to_server);
	lua_setfield(L, -2, "serverbound");
	lua_pushboolean(L, injected);
	lua_setfield(L, -2, "injected");
	lua_pushstring(L, to_server ? client : server);
	lua_setfield(L, -2, "source");
	lua_pushstring(L, to_server ? server : client);
	lua_setfield(L, -2, "dest");
	lua_pushinteger(L, (lua_Integer)pkt->session_id);
	lua_setfield(L, -2, "proxy_id");
	lua_pushlstring(L, (const char *)pkt->data, pkt->len);
	lua_setfield(L, -2, "data");
}

/* ---- injecting and closing ---- */

/* ezp.f(...) and ezp:f(...) both work: the first argument index after a self. */
static int lf_base(lua_State *L)
{
	return lua_istable(L, 1) ? 2 : 1;
}

static int lf_inject_one(struct lf_script *s, uint64_t id, int dir, const char *d, size_t len)
{
	if (s->cur && s->cur->session_id == id) {
		/* from inside this session's packet call: later filters see it, in order */
		struct ezp_packet *p = s->core->packet_new(len);
		if (!p)
			return EZP_ERR_NOMEM;
		memcpy(p->data, d, len);
		return s->core->session_inject(s->cur->session, dir, p, (int)s->cur->index);
	}
	return s->core->inject(s->core->ctx, id, dir, d, len, NULL, NULL);
}

/* Inject to @id (-1 = every session of this pipeline) in directions @dirs (bit per dir). */
static int lf_inject_ids(lua_State *L, struct lf_script *s, lua_Integer id, unsigned dirs,
			 const char *d, size_t len)
{
	uint64_t one = (uint64_t)id, *ids = &one;
	size_t n = 1;
	int ok = 1;

	if (id == -1 && lf_scope_ids(s, &ids, &n) != EZP_OK)
		return luaL_error(L, "out of memory");
	for (size_t i = 0; i < n; i++)
		for (int dir = 0; dir < 2; dir++)
			if ((dirs & (1u << dir)) && lf_inject_one(s, ids[i], dir, d, len) != EZP_OK)
				ok = 0;
	if (ids != &one)
		free(ids);
	lua_pushboolean(L, ok);
	return 1;
}

static int lf_ezp_inject(lua_State *L, unsigned dirs)
{
	struct lf_script *s = lf_script_of(L);
	int b = lf_base(L);
	lua_Integer id = luaL_checkinteger(L, b);
	size_t len;
	const char *d = luaL_checklstring(L, b + 1, &len);

	return lf_inject_ids(L, s, id, dirs, d, len);
}

static int lf_ezp_inject_server(lua_State *L)
{
	return lf_ezp_inject(L, 1u << EZP_DIR_TO_SERVER);
}

static int lf_ezp_inject_client(lua_State *L)
{
	return lf_ezp_inject(L, 1u << EZP_DIR_TO_CLIENT);
}

static int lf_ezp_inject_both(lua_State *L)
{
	return lf_ezp_inject(L, 3u);
}

static int lf_ezp_close(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	lua_Integer id = luaL_checkinteger(L, lf_base(L));
	uint64_t one = (uint64_t)id, *ids = &one;
	size_t n = 1;
	int ok = 1;

	if (id == -2) { /* the pipeline(s) themselves */
		struct lf_group **gs;
		size_t ng = lf_scope(s, &gs);
		for (size_t i = 0; i < ng; i++)
			if (lf_control_delete_pipeline(gs[i]) != EZP_OK)
				ok = 0;
		lf_scope_put(gs, ng);
		lua_pushboolean(L, ok && ng);
		return 1;
	}
	if (id == -1 && lf_scope_ids(s, &ids, &n) != EZP_OK)
		return luaL_error(L, "out of memory");
	for (size_t i = 0; i < n; i++)
		if (s->core->close(s->core->ctx, ids[i], NULL, NULL) != EZP_OK)
			ok = 0;
	if (ids != &one)
		free(ids);
	lua_pushboolean(L, ok);
	return 1;
}

/* ---- pipeline-wide questions ---- */

static int lf_ezp_is_alive(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);

	lua_pushboolean(L, !atomic_load(&s->stop));
	return 1;
}

/*
 * Push pipeline @g's listen address (@bound) or To address as "ip:port", nil
 * while not known. Main mode may run before the daemon listens: it waits up
 * to 3 s for the listener.
 */
static int lf_push_addr(lua_State *L, struct lf_group *g, int bound)
{
	struct lf_script *s = lf_script_of(L);
	const struct ezp_core *core = g->core;
	struct ezp_addr a;
	char buf[EZP_ADDR_STRLEN];

	memset(&a, 0, sizeof(a));
	if (!EZP_HAS(core, pipeline_addresses)) {
		lua_pushnil(L);
		return 1;
	}
	for (int i = 0; i < 300; i++) {
		int rc = bound ? core->pipeline_addresses(core->ctx, g->pipeline, &a, NULL)
			       : core->pipeline_addresses(core->ctx, g->pipeline, NULL, &a);
		if ((rc == EZP_OK && a.len) || s->mode != LF_MODE_MAIN || atomic_load(&s->stop) ||
		    (s->main && lf_main_stopping(s->main)))
			break;
		struct timespec ts = {0, 10000000};
		nanosleep(&ts, NULL);
	}
	if (!a.len)
		lua_pushnil(L);
	else
		lua_pushstring(L, core->addr_format(&a, buf, sizeof(buf)));
	return 1;
}

static int lf_ezp_server_address(lua_State *L)
{
	return lf_push_addr(L, lf_script_of(L)->group, 0);
}

static int lf_ezp_proxy_address(lua_State *L)
{
	return lf_push_addr(L, lf_script_of(L)->group, 1);
}

/* Sum of a counter over the groups the calling script speaks for. */
static int lf_push_sum(lua_State *L, int live)
{
	struct lf_script *s = lf_script_of(L);
	struct lf_group **gs;
	size_t ng = lf_scope(s, &gs);
	uint64_t sum = 0;

	for (size_t i = 0; i < ng; i++)
		sum += live ? atomic_load(&gs[i]->n_live) : atomic_load(&gs[i]->bytes_total);
	lf_scope_put(gs, ng);
	lua_pushinteger(L, (lua_Integer)sum);
	return 1;
}

static int lf_ezp_bytes_sent(lua_State *L)
{
	return lf_push_sum(L, 0);
}

static int lf_ezp_proxy_count(lua_State *L)
{
	return lf_push_sum(L, 1);
}

static int lf_ezp_get_packets(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	int b = lf_base(L);
	lua_Debug ar;

	/* refused before anything changes: the running get_packets keeps its callback */
	if (s->main && lf_main_waiting(s->main))
		return luaL_error(L, "get_packets: already waiting for packets");
	if (s->ref_packets != LUA_NOREF)
		luaL_unref(L, LUA_REGISTRYINDEX, s->ref_packets);
	s->ref_packets = LUA_NOREF;
	if (lua_isnoneornil(L, b)) {
		if (s->main)
			lf_main_set_wants(s->main, s);
		return 0;
	}
	luaL_checktype(L, b, LUA_TFUNCTION);
	lua_pushvalue(L, b);
	lua_getinfo(L, ">u", &ar);
	s->packets_two_args = ar.nparams >= 2; /* function(ezp, pkt) or function(pkt) */
	lua_pushvalue(L, b);
	s->ref_packets = luaL_ref(L, LUA_REGISTRYINDEX);
	if (s->main) /* main mode: blocks until the callback returns true */
		return lf_main_get_packets(L, s);
	return 0;
}

static int lf_ezp_set_server(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	int b = lf_base(L);
	lua_Integer id = luaL_checkinteger(L, b);
	const char *addr = luaL_checkstring(L, b + 1);
	char why[512];

	if (s->mode == LF_MODE_MAIN) {
		if (lf_control_swap_server_wait(s->group, (uint64_t)id, addr, s, why,
						sizeof(why)) ==
		    EZP_OK) {
			lua_pushboolean(L, 1);
			return 1;
		}
		lua_pushnil(L);
		lua_pushstring(L, why);
		return 2;
	}
	lua_pushboolean(L, lf_control_swap_server(s->group, (uint64_t)id, addr) == EZP_OK);
	return 1;
}

/* ---- session objects ---- */

#define LF_SESSION_MT "ezp.session"

static struct lf_entry *lf_self(lua_State *L)
{
	return *(struct lf_entry **)lua_touserdata(L, lua_upvalueindex(1));
}

static int lf_s_is_alive(lua_State *L)
{
	lua_pushboolean(L, atomic_load(&lf_self(L)->alive));
	return 1;
}

static int lf_s_send(lua_State *L, int dir)
{
	struct lf_script *s = lf_script_of(L);
	struct lf_entry *e = lf_self(L);
	size_t len;
	const char *d = luaL_checklstring(L, lua_gettop(L), &len); /* s:f(data) or s.f(data) */

	lua_pushboolean(L, lf_inject_one(s, e->id, dir, d, len) == EZP_OK);
	return 1;
}

static int lf_s_send_client(lua_State *L)
{
	return lf_s_send(L, EZP_DIR_TO_CLIENT);
}

static int lf_s_send_server(lua_State *L)
{
	return lf_s_send(L, EZP_DIR_TO_SERVER);
}

static int lf_s_get_id(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)lf_self(L)->id);
	return 1;
}

static int lf_s_string(lua_State *L, int which)
{
	struct lf_entry *e = lf_self(L);
	struct lf_group *g = e->group;
	char buf[EZP_ADDR_STRLEN];
	const char *src = which == 0 ? e->network : which == 1 ? e->client : e->server;

	pthread_mutex_lock(&g->lock);
	snprintf(buf, sizeof(buf), "%s", src);
	pthread_mutex_unlock(&g->lock);
	lua_pushstring(L, buf);
	return 1;
}

static int lf_s_network(lua_State *L)
{
	return lf_s_string(L, 0);
}

static int lf_s_client(lua_State *L)
{
	return lf_s_string(L, 1);
}

static int lf_s_server(lua_State *L)
{
	return lf_s_string(L, 2);
}

static int lf_s_bytes(lua_State *L)
{
	lua_pushinteger(L, (lua_Integer)atomic_load(&lf_self(L)->bytes));
	return 1;
}

static int lf_s_last_contact(lua_State *L)
{
	uint64_t last = atomic_load(&lf_self(L)->last_us), now = lf_script_of(L)->core->now_us();

	lua_pushinteger(L, (lua_Integer)(now > last ? (now - last) / 1000u : 0));
	return 1;
}

static int lf_s_gc(lua_State *L)
{
	struct lf_entry **pe = luaL_checkudata(L, 1, LF_SESSION_MT);

	lf_entry_unref(*pe);
	*pe = NULL;
	return 0;
}

/*
 * A new session object on the stack, bound to no session yet: the caller
 * stores a reference in the slot returned. Made before the reference is
 * taken, so an allocation error (a script at its memory limit) leaks none.
 */
static struct lf_entry **lf_session_obj(lua_State *L)
{
	static const luaL_Reg methods[] = {
		{"is_alive", lf_s_is_alive},       {"send_to_client", lf_s_send_client},
		{"send_to_server", lf_s_send_server}, {"get_id", lf_s_get_id},
		{"get_network", lf_s_network},     {"get_client_addr", lf_s_client},
		{"get_server_addr", lf_s_server},  {"get_bytes_sent", lf_s_bytes},
		{"get_last_contact", lf_s_last_contact}, {NULL, NULL},
	};
	struct lf_entry **pe = lua_newuserdatauv(L, sizeof(*pe), 0);

	*pe = NULL; /* lf_s_gc takes NULL */
	luaL_setmetatable(L, LF_SESSION_MT);
	lua_createtable(L, 0, 10);
	lua_insert(L, -2);
	for (const luaL_Reg *m = methods; m->name; m++) {
		lua_pushvalue(L, -1);
		lua_pushcclosure(L, m->func, 1);
		lua_setfield(L, -3, m->name);
	}
	lua_setfield(L, -2, "_session");
	return pe;
}

/*
 * The hooks get their session this way, not through ezp.get_proxy: in main
 * mode EzpOnSessionClose runs after the session left the registry, and the
 * ezp table is the script's to change.
 */
void lf_push_session(lua_State *L, struct lf_entry *e)
{
	struct lf_entry **pe = lf_session_obj(L);

	atomic_fetch_add(&e->refs, 1);
	*pe = e;
}

static int lf_ezp_get_proxy(lua_State *L)
{
	struct lf_script *s = lf_script_of(L);
	lua_Integer id = luaL_checkinteger(L, lf_base(L));
	struct lf_entry **pe = lf_session_obj(L);

	*pe = lf_entry_find(s, (uint64_t)id); /* ref'd: the object's */
	if (!*pe) {
		lua_pop(L, 1);
		lua_pushnil(L);
	}
	return 1;
}

/* ---- the table ---- */

void lf_ezp_open(lua_State *L, struct lf_script *s)
{
	static const luaL_Reg fns[] = {
		{"inject_to_server", lf_ezp_inject_server},
		{"inject_to_client", lf_ezp_inject_client},
		{"inject_to_both", lf_ezp_inject_both},
		{"is_alive", lf_ezp_is_alive},
		{"get_server_address", lf_ezp_server_address},
		{"get_proxy_address", lf_ezp_proxy_address},
		{"get_packets", lf_ezp_get_packets},
		{"close", lf_ezp_close},
		{"get_bytes_sent", lf_ezp_bytes_sent},
		{"get_proxy_count", lf_ezp_proxy_count},
		{"get_proxy", lf_ezp_get_proxy},
		{"set_server", lf_ezp_set_server},
		{"set_faults", lf_ezp_set_faults},
		{NULL, NULL},
	};

	luaL_newmetatable(L, LF_SESSION_MT);
	lua_pushcfunction(L, lf_s_gc);
	lua_setfield(L, -2, "__gc");
	lua_pushliteral(L, "session");
	lua_setfield(L, -2, "__metatable");
	lua_pop(L, 1);
	luaL_newlib(L, fns);
	lua_pushvalue(L, -1);
	lua_setglobal(L, "ezp");
	s->ref_ezp = luaL_ref(L, LUA_REGISTRYINDEX);
}
