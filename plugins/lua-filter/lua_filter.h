/*
 * lua_filter.h - internal interface between the lua-filter plugin's files.
 *
 * Objects and the threads they live on:
 *   struct lf_script - one sandboxed lua_State with the script loaded. A
 *       callback-mode instance owns one per worker (used on that worker only);
 *       a main-mode runner owns one used on its own thread. Refcounted so a
 *       reload can replace it while held coroutines of the old one finish.
 *   struct lf_group  - what the instances of one `lua` stage (pipeline name +
 *       position) share across workers: the session registry and counters.
 *       Its mutex is taken on session open/close/change only.
 *   struct lf_entry  - one session in a group's registry (atomic counters).
 *   struct lf_inst   - one filter instance (per worker), see lua_filter.c.
 *   struct lf_main   - the main-mode runner thread, see lua_main.c.
 */
#ifndef LUA_FILTER_H
#define LUA_FILTER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <lauxlib.h>
#include <lua.h>

#include <ezproxy/sdk.h>
#include <ezproxy/services.h>

#define LF_SRC "lua"

/* The kind's parameters (filled by the core from the YAML). */
struct lf_conf {
	char *script;
	char *mode;
	int64_t memory_mb;
	int64_t instructions;
	int watch;
};

/* ---- the session registry (lua_ezp.c) ---- */

struct lf_entry {
	uint64_t id;
	atomic_int refs;          /* registry + session slot + Lua session objects */
	int attach;               /* instances that announced it (group lock) */
	atomic_int alive;
	atomic_uint_fast64_t bytes;
	atomic_uint_fast64_t last_us;
	char network[16];
	char client[EZP_ADDR_STRLEN]; /* written under the group lock */
	char server[EZP_ADDR_STRLEN];
	struct lf_group *group;
	struct lf_entry *next;
};

struct lf_group {
	char *pipeline;
	unsigned index;
	int refs;                 /* instances + queued jobs (lf_groups_lock) */
	const struct ezp_core *core;
	const struct ezp_control *control; /* NULL when the core has none */
	/* the fault plugin's interface: found at creation, or at first use (lua_fault.c) */
	_Atomic(const struct ezp_fault *) fault;
	pthread_mutex_t lock;
	struct lf_entry *entries;
	atomic_uint_fast64_t bytes_total;
	atomic_uint_fast64_t n_live;
	atomic_uint n_inst;          /* callback-mode instances (one per worker) */
	atomic_uint n_reloads;       /* reloads done by them: the last of a round logs at info */
	const void *scope;           /* lf_groups_lock: the main runner it shares, else NULL */
	struct lf_group *next;
};

struct lf_group *lf_group_get(const struct ezp_core *core, const char *pipeline,
			      unsigned index);
void lf_group_put(struct lf_group *g);
void lf_group_ref(struct lf_group *g);
/* Announce / retire a session on this group (its worker). Returns the entry (ref'd) or NULL. */
struct lf_entry *lf_session_open(struct lf_group *g, const struct ezp_session_info *info);
void lf_session_change(struct lf_group *g, struct lf_entry *e,
		       const struct ezp_session_info *info);
void lf_session_close(struct lf_group *g, struct lf_entry *e);
void lf_entry_unref(struct lf_entry *e);
/*
 * Main mode: @g's sessions are seen by runner @scope (NULL: no more). One
 * runner may serve several pipelines (the old config form); its ezp table
 * speaks for all of them.
 */
void lf_group_set_scope(struct lf_group *g, const void *scope);
void lf_groups_clear_scope(const void *scope);
struct lf_script;
/*
 * The groups @s speaks for, each ref'd, in *out (malloc'd; release with
 * lf_scope_put): its own, and in main mode every group sharing its runner.
 */
size_t lf_scope(struct lf_script *s, struct lf_group ***out);
void lf_scope_put(struct lf_group **v, size_t n);

/* ---- ezp.set_faults (lua_fault.c) ---- */
int lf_ezp_set_faults(lua_State *L);

/* ---- one loaded script (lua_sandbox.c) ---- */

enum lf_mode { LF_MODE_CALLBACK = 0, LF_MODE_MAIN = 1 };

struct lf_inst;
struct lf_main;

/* The packet call a script is inside (callback mode, synchronous part only). */
struct lf_cur {
	struct ezp_session *session;
	uint64_t session_id;
	unsigned index;
};

struct lf_script {
	lua_State *L;
	size_t mem_used, mem_limit;
	int mem_hit;              /* the allocator refused: the error is the memory limit */
	int limit_on;             /* script code runs (a resume, the load): the limit applies */
	int64_t budget;           /* instructions left in this call */
	int64_t instr_limit;
	int exhausted;            /* the budget ran out; the hook keeps firing */
	int refs;                 /* owner + held coroutines (owner's thread only) */
	int mode;
	const char *path;         /* the Script as configured (borrowed from the config) */
	const struct ezp_core *core;
	struct lf_group *group;
	struct lf_inst *inst;     /* callback mode */
	struct lf_main *main;     /* main mode */
	struct lf_cur *cur;       /* set during a synchronous packet call */
	int ref_filter;           /* EzpFilter / EzpOnPacket / get_packets callback */
	int filter_is_onpacket;
	int ref_open, ref_close;  /* EzpOnSessionOpen / Close */
	int ref_packets;          /* get_packets callback */
	int packets_two_args;     /* get_packets callback takes (ezp, pkt) */
	int ref_ezp;              /* the ezp table */
	int ref_spare;            /* a finished coroutine kept for reuse */
	int warned_return;
	int watcher_off;            /* EzpOnPacket / get_packets watcher returned true */
	atomic_int stop;           /* main mode: the runner is stopping */
	lua_State *running;       /* the coroutine being resumed */
	uint64_t errors_logged, errors_window_us, errors_suppressed;
};

/* A light userdata pushed by sleep() when it yields (callback mode). */
extern char lf_sleep_token;

/*
 * Make a state, load and run @path's top level. On failure returns NULL and
 * writes why (with file and line) into @why.
 */
struct lf_script *lf_script_new(const struct ezp_core *core, const struct lf_conf *conf,
				int mode, struct lf_group *group, char *why, size_t why_len);
void lf_script_unref(struct lf_script *s);
/* Start a call: a fresh instruction budget. */
void lf_script_budget(struct lf_script *s);
/* Log a script error (message on top of @L's stack, popped) at ERROR, rate limited. */
void lf_script_error(struct lf_script *s, lua_State *L, int status, const char *what);
/* Push the script's global @name, raw (never _G's metamethods); returns its type. */
int lf_getglobal(lua_State *L, const char *name);
static inline struct lf_script *lf_script_of(lua_State *L)
{
	return *(struct lf_script **)lua_getextraspace(L);
}

/* ---- pattern functions with a step budget (lua_pattern.c) ---- */
void lf_pattern_open(lua_State *L); /* replaces string.find/match/gmatch/gsub */

/* ---- the ezp table, pkt table, session objects (lua_ezp.c) ---- */
void lf_ezp_open(lua_State *L, struct lf_script *s); /* sets s->ref_ezp, globals */
void lf_push_pkt(lua_State *L, struct lf_script *s, const struct ezp_packet *pkt,
		 const struct lf_entry *e);
/* Push a session object for @e (it takes a reference of its own). */
void lf_push_session(lua_State *L, struct lf_entry *e);

/* ---- blocking control calls on the plugin's own thread (lua_control.c) ---- */
int lf_control_start(void);
void lf_control_stop(void);
/* Swap a session's server (async; failure logged). */
int lf_control_swap_server(struct lf_group *g, uint64_t id, const char *addr);
/* The same, waiting for the result (main mode). */
int lf_control_swap_server_wait(struct lf_group *g, uint64_t id, const char *addr,
				struct lf_script *who, char *why, size_t why_len);
int lf_control_delete_pipeline(struct lf_group *g);

/* ---- main mode (lua_main.c) ---- */
struct lf_main *lf_main_get(const struct ezp_core *core, const struct lf_conf *conf,
			    struct lf_group *group, struct ezp_error *err);
void lf_main_put(struct lf_main *m);
/* Does the main script want packets (get_packets / EzpFilter / EzpOnPacket)? */
int lf_main_wants_packets(struct lf_main *m);
int lf_main_stopping(struct lf_main *m);
/* Is the runner inside a wait (get_packets, sleep)? get_packets may not start there. */
int lf_main_waiting(struct lf_main *m);
/* From the count hook of the runner's script: do a reload asked for meanwhile. */
void lf_main_hook(struct lf_main *m, struct lf_script *s);
/* Look again at what the script defines (after get_packets). Runner thread. */
void lf_main_set_wants(struct lf_main *m, struct lf_script *s);
/* Queue a held packet for the main thread. (pkt is ref'd inside.) */
int lf_main_post_packet(struct lf_main *m, struct ezp_packet *pkt, uint64_t hold_id,
			struct lf_entry *e);
void lf_main_post_session(struct lf_main *m, struct lf_entry *e, int opened);
void lf_main_reload(struct lf_main *m);
/* main-mode sleep and get_packets hooks, called from the ezp/global functions */
int lf_main_sleep(lua_State *L, struct lf_script *s, int64_t ms);
int lf_main_get_packets(lua_State *L, struct lf_script *s);

/* ---- reload (lua_reload.c) ---- */
struct lf_watch;
struct lf_watch *lf_watch_new(const struct ezp_core *core, struct ezp_worker *w,
			      const char *path, void (*fn)(void *arg), void *arg);
void lf_watch_free(struct lf_watch *w);
/* Compile @path again into a new script (same conf). NULL + @why on failure. */
void lf_log_reload(const struct ezp_core *core, const char *path, int ok, const char *why,
		   int loud);

/* Packet verdict from a script's return value(s) at the top of @L. */
int lf_verdict_of(struct lf_script *s, lua_State *L, int nres, int onpacket,
		  struct ezp_packet **repl);
/* Push the function that filters packets (EzpFilter, EzpOnPacket, get_packets cb); 0 if none. */
int lf_push_filter_fn(struct lf_script *s, lua_State *L, int *onpacket, int *two_args);
/* Run @co (function + nargs pushed) as a call: resume, log errors. Returns lua status. */
int lf_script_resume(struct lf_script *s, lua_State *co, int nargs, int *nres);

#endif
