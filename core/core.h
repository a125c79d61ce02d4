/*
 * core.h - internals shared between the core's files (never installed).
 * Names here are ezp__*; file-local helpers are static. The thread each
 * struct member may be touched from is written beside it.
 */
#ifndef EZP_CORE_CORE_H
#define EZP_CORE_CORE_H

#include <ezproxy/ezproxy.h>
#include <ezproxy/sdk.h>
#include <ezproxy/services.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <netinet/in.h>
#include <sys/queue.h>

#include "config.h"

struct event_base;
struct event;

/* ---- small helpers ---------------------------------------------------- */

#define EZP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
uint64_t ezp__now_us(void);      /* CLOCK_REALTIME */
uint64_t ezp__mono_us(void);     /* CLOCK_MONOTONIC */
char *ezp__strdup(const char *s); /* NULL-safe */

/* u64 -> pointer open-addressing map (keys != 0). Not thread-safe. */
struct ezp__map {
	uint64_t *keys;
	void **vals;
	size_t cap, n;
};
int ezp__map_put(struct ezp__map *m, uint64_t key, void *val);
void *ezp__map_get(const struct ezp__map *m, uint64_t key);
void *ezp__map_del(struct ezp__map *m, uint64_t key);
void ezp__map_free(struct ezp__map *m);

/* ---- logging (log.c) -------------------------------------------------- */

void ezp__log_setup(int level, int format);
void ezp__log(int level, const char *source, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void ezp__vlog(int level, const char *source, const char *fmt, va_list ap);
int ezp__log_enabled(int level);
const char *ezp__status_str(int status);

/* ---- packets (packet.c) ----------------------------------------------- */

struct ezp__packet {
	struct ezp_packet pub;   /* first: a struct ezp_packet * is a struct ezp__packet * */
	atomic_uint refs;
	size_t cap;
	void (*release)(void *arg); /* wrapped memory */
	void *release_arg;
	struct ezp__packet *next;   /* free list / queues (owner only) */
	uint8_t inline_data[];
};
struct ezp_packet *ezp__packet_new(size_t len);
struct ezp_packet *ezp__packet_copy(const void *data, size_t len);
struct ezp_packet *ezp__packet_wrap(void *data, size_t len, void (*release)(void *), void *arg);
struct ezp_packet *ezp__packet_ref(struct ezp_packet *pkt);
void ezp__packet_unref(struct ezp_packet *pkt);
struct ezp_packet *ezp__packet_make_writable(struct ezp_packet *pkt);
struct ezp_packet *ezp__packet_resize(struct ezp_packet *pkt, size_t len);
unsigned ezp__packet_refs(const struct ezp_packet *pkt);

/* ---- workers (worker.c) ----------------------------------------------- */

struct ezp__deferred {
	ezp_fn fn;
	void *arg;
	struct ezp__deferred *next;
};

struct ezp__tap_slot;

struct ezp_worker {
	struct ezp_core_ctx *d;
	unsigned index;
	struct event_base *base;
	pthread_t thread;
	bool running;             /* thread started */
	/* deferred calls: any thread pushes under lock, the worker drains */
	pthread_mutex_t defer_lock;
	struct ezp__deferred *defer_head, *defer_tail;
	bool defer_closed;
	int wake_fd;              /* eventfd */
	struct event *wake_ev;
	struct event *local_ev;   /* the worker's own defers: event_active, no syscall */
	/* worker-owned: */
	TAILQ_HEAD(, ezp_session) sessions;
	struct ezp__map holds;    /* hold id -> struct ezp__entry */
	uint64_t next_hold;
	struct ezp_tap **taps;     /* this worker's view of the tap list */
	size_t n_taps;
};

int ezp__worker_init(struct ezp_worker *w, struct ezp_core_ctx *d, unsigned index);
int ezp__worker_start(struct ezp_worker *w);
/* Stop the loop after the queued deferred calls ran; join. Thread: control. */
void ezp__worker_stop(struct ezp_worker *w);
void ezp__worker_destroy(struct ezp_worker *w);
int ezp__defer(struct ezp_worker *w, ezp_fn fn, void *arg);
struct ezp_worker *ezp__worker_current(void);
/* Run @fn(@arg) on @w and wait for it. Thread: not @w (runs inline when it is). */
int ezp__worker_call(struct ezp_worker *w, ezp_fn fn, void *arg);
/* Run @fn(@arg, worker) on every worker and wait. Thread: not a worker. */
void ezp__workers_each(struct ezp_core_ctx *d, void (*fn)(struct ezp_worker *w, void *arg),
		       void *arg);

struct ezp_timer *ezp__timer_new(struct ezp_worker *w, ezp_fn fn, void *arg);
void ezp__timer_start(struct ezp_timer *t, uint64_t ms, int repeat);
void ezp__timer_stop(struct ezp_timer *t);
void ezp__timer_free(struct ezp_timer *t);
struct ezp_watch *ezp__watch_add(struct ezp_worker *w, int fd, unsigned events, ezp_watch_fn fn,
				 void *arg);
void ezp__watch_set(struct ezp_watch *watch, unsigned events);
void ezp__watch_free(struct ezp_watch *watch);

/* ---- plugins (loader.c) ----------------------------------------------- */

struct ezp__plugin {
	const struct ezp_plugin_desc *desc;
	void *handle;            /* dlopen handle; NULL for built-ins */
	char *path;              /* "<builtin>" for built-ins */
	int initialised;
	LIST_ENTRY(ezp__plugin) link;
};

struct ezp__registry {
	LIST_HEAD(, ezp__plugin) plugins;
	char **searched;         /* folders already scanned */
	size_t n_searched;
};

/*
 * Check a descriptor before any field past abi_minor is read. Returns
 * EZP_OK or EZP_ERR_ABI with a message naming both versions.
 */
int ezp__plugin_check(const struct ezp_plugin_desc *desc, const char *path,
		      struct ezp_error *err);
/* dlopen @path, find `ezp_plugin`, check, init, register. */
int ezp__registry_load(struct ezp_core_ctx *d, const char *path, struct ezp_error *err);
/* Load every *.so in @dir and its direct subfolders (once per folder). */
int ezp__registry_scan(struct ezp_core_ctx *d, const char *dir, struct ezp_error *err);
int ezp__registry_add_builtin(struct ezp_core_ctx *d, const struct ezp_plugin_desc *desc,
			      struct ezp_error *err);
void ezp__registry_free(struct ezp_core_ctx *d);
const struct ezp_transport_kind *ezp__registry_transport(struct ezp_core_ctx *d,
							 const char *name);
const struct ezp_filter_kind *ezp__registry_filter(struct ezp_core_ctx *d, const char *name);
const struct ezp_service_kind *ezp__registry_service(struct ezp_core_ctx *d, const char *name);
void ezp__registry_lookup(struct ezp_core_ctx *d, struct ezp__kind_lookup *lookup);
/* The default plugin folders: $EZP_PLUGIN_PATH, beside the executable, the install dir. */
int ezp__registry_scan_defaults(struct ezp_core_ctx *d, struct ezp_error *err);

extern const struct ezp_plugin_desc ezp__builtin_plugin; /* the `callback` filter */

/* ---- pipelines, sessions, chains ------------------------------------- */

/*
 * A claim slot for an exclusive filter in a pipeline, keyed by
 * "kind" or "kind:Name". The holder pointer is read by workers at packet
 * time (atomic); a release clears it, then flushes every worker's held
 * packets for the slot, then calls on_released.
 */
struct ezp__claim {
	char *key;
	_Atomic(struct ezp__holder *) holder;
	LIST_ENTRY(ezp__claim) link;
};

struct ezp__holder {
	struct ezp_filter_holder h;  /* copied from the claimer */
	char *name;
	struct ezp__claim *slot;
	struct ezp__pipeline *p;
	atomic_uint pending;         /* workers still flushing after release */
	unsigned timeout_ms;         /* 0: the filter's HoldTimeoutMs */
	int default_verdict;         /* -1: the filter's Default */
};

/* One filter of a chain definition: its conf and one instance per worker. */
struct ezp__stage_def {
	struct ezp__kind_conf conf;
	const struct ezp_filter_kind *kind;
	void **instances;            /* [n_workers] */
	struct ezp__claim *claim;    /* exclusive kinds: the pipeline's slot */
	struct ezp__chain_def *chain; /* the chain it belongs to (no ref) */
	bool dormant;                /* EZP_FILTER_DORMANT: called only while awake */
	atomic_bool awake;
};

/* The filter chain of a pipeline generation; shared by sessions (refcounted). */
struct ezp__chain_def {
	atomic_uint refs;
	struct ezp_core_ctx *d;
	struct ezp__stage_def *stages;
	size_t n;
	size_t n_plain;              /* stages that are neither exclusive slots nor dormant */
};

/* A `To` endpoint; sessions keep it while their server legs use its config. */
struct ezp__endpoint {
	atomic_uint refs;
	struct ezp__kind_conf conf;
};
void ezp__endpoint_unref(struct ezp__endpoint *e);

/* What new sessions of a pipeline use; swapped whole (refcounted). */
struct ezp__pipe_gen {
	atomic_uint refs;
	struct ezp__chain_def *chain;
	struct ezp__endpoint *to;
	struct ezp_addr to_addr;
	struct ezp__limits limits;
	bool shared;
	uint64_t no;                 /* generation number */
};

/* Routes that send an arriving client into an existing session. */
struct ezp__route {
	struct ezp_addr addr;        /* port 0 = any port from that IP */
	uint64_t session_id;
	unsigned worker;
	int mode;                    /* EZP__ROUTE_REPLACE / _ADD */
	bool once;                   /* removed after one use (TCP accept) */
	ezp_done_fn done;            /* TCP accept mode: told when it happened */
	void *done_arg;
	LIST_ENTRY(ezp__route) link;
};
enum { EZP__ROUTE_REPLACE = 1, EZP__ROUTE_ADD = 2 };

struct ezp__pipeline {
	struct ezp_core_ctx *d;
	char *name;
	struct ezp__pipeline_conf *conf;  /* control thread */
	struct ezp_listener *listener;    /* NULL while not listening; see ezp__pipeline_set_listener */
	struct ezp_addr bound;            /* lock: the listener's address (len 0: none) */
	/* current generation: read by workers under lock at accept; gen_no is
	 * checked per packet without the lock */
	pthread_mutex_t lock;             /* gen, routes, claims, shared_id */
	struct ezp__pipe_gen *gen;
	atomic_uint_fast64_t gen_no;
	LIST_HEAD(, ezp__route) routes;
	LIST_HEAD(, ezp__claim) claims;
	uint64_t shared_id;               /* Shared: the live session (0 none) */
	unsigned shared_worker;
	atomic_uint_fast64_t n_sessions;  /* live */
	atomic_uint_fast64_t total_sessions;
	atomic_uint_fast64_t bytes[2];    /* closed sessions' totals from here to... */
	atomic_uint_fast64_t packets[2];
	atomic_uint_fast64_t dropped, replaced, injected, held, hold_timeouts; /* ...here */
	atomic_uint_fast64_t connect_failures;
	atomic_uint_fast64_t refused;     /* clients refused at MaxSessions */
	bool removed;                     /* deleted: no new sessions */
	atomic_uint srefs;                /* the daemon's list + one per session */
	LIST_ENTRY(ezp__pipeline) link;
};

struct ezp_listener {
	struct ezp__pipeline *p;
	const struct ezp_transport_kind *kind;
	struct ezp__kind_conf conf;  /* owned copy: the transport keeps a pointer into it */
	void *state;
	struct ezp_addr bound;
	unsigned n_workers;
	struct ezp_worker **workers;
};

enum ezp__pause {
	EZP__PAUSE_CONNECT = 1u << 0,  /* the server leg is still connecting */
	EZP__PAUSE_PEER = 1u << 1,     /* a leg this one feeds is congested */
	EZP__PAUSE_CHAIN = 1u << 2,    /* the hold window of its direction is full */
};

struct ezp_leg {
	struct ezp_session *s;
	const struct ezp_transport_kind *kind;
	const void *kind_conf;          /* config handed to connect (may be NULL) */
	void *state;                    /* the transport's */
	struct ezp_addr peer;
	bool is_server;
	bool connected;
	bool eof_in;                    /* peer finished sending */
	bool eof_out;                   /* we shut down our write side */
	bool congested;                 /* the transport said backpressure on */
	bool paused_now;                /* what the transport was last told */
	bool closed;
	bool write_done;                /* the transport said leg_write_done */
	unsigned pause;                 /* enum ezp__pause bits */
	unsigned index;                 /* client leg index */
	uint64_t bytes_in;
	ezp_done_fn on_connect;         /* swaps: told when the connect ends */
	void *on_connect_arg;
	struct ezp_leg *pending_next;   /* a swap's or an added client's leg while it connects */
	int connect_purpose;            /* EZP__LEG_* */
	int attach_mode;                /* until attached: -1 first leg, EZP__ROUTE_* */
	ezp_done_fn attach_done;        /* accept-mode waiter */
	void *attach_arg;
};
enum { EZP__LEG_PRIMARY = 0, EZP__LEG_SWAP_SERVER, EZP__LEG_SWAP_CLIENT, EZP__LEG_ADD_CLIENT };

/* One packet waiting in a stage (held, or queued behind a held one). */
struct ezp__entry {
	struct ezp_packet *pkt;        /* current bytes (owned ref) */
	struct ezp_packet *orig;       /* before a replace, for taps (owned ref) */
	struct ezp_session *s;
	uint64_t hold_id;              /* 0 unless held */
	uint64_t deadline_us;          /* monotonic, when held */
	unsigned stage;
	unsigned dir;
	int state;                     /* EZP__E_* */
	int verdict;
	bool default_drop;             /* when held: the action at timeout or release */
	bool counted_held;
	TAILQ_ENTRY(ezp__entry) link;
};
enum { EZP__E_WAIT = 0, EZP__E_HELD, EZP__E_DONE };

struct ezp__stage {
	TAILQ_HEAD(, ezp__entry) q;
	unsigned held;                 /* entries in state HELD */
	unsigned len;                  /* entries queued */
	struct ezp_timer *timer;       /* earliest hold deadline */
	void *timer_arg;
	bool timer_on;
};

struct ezp__dir {
	struct ezp__stage *stages;     /* [chain->n] */
	unsigned queued;               /* entries in all stages */
	bool eof_pending;              /* an EOF is travelling the chain */
	bool eof_done;                 /* EOF delivered to the far leg(s) */
	uint64_t overflow;             /* datagrams dropped: chain full */
};

struct ezp_session {
	struct ezp_core_ctx *d;
	uint64_t id;
	struct ezp_worker *w;
	struct ezp__pipeline *p;
	struct ezp__endpoint *to;      /* the `To` it started with (ref): its server legs' config */
	struct ezp__chain_def *chain;  /* the chain it runs (ref) */
	uint64_t gen_no;               /* generation its chain came from */
	struct ezp__chain_def *next_chain; /* waiting for a packet boundary */
	uint64_t next_gen_no;
	void **fstate;                 /* [chain->n] per-session filter state */
	struct ezp_leg *server;
	struct ezp_leg *server_old;    /* during a swap: still read until it ends */
	struct ezp_leg *pending;       /* legs still connecting for swaps and added clients */
	struct ezp_leg **clients;      /* [max_client_legs] */
	unsigned n_clients, max_clients;
	struct ezp__dir dir[2];
	struct ezp__limits limits;
	const char *transport;         /* from's kind name */
	struct ezp_addr server_addr;
	uint64_t opened_us, last_us;
	uint64_t bytes[2], packets[2], dropped, replaced, injected;
	uint64_t held, hold_timeouts;
	int close_reason;
	char close_text[160];
	bool opened;                   /* session_opened was announced */
	bool closing;
	bool bridged;
	unsigned first_eof;            /* direction whose EOF came first */
	unsigned busy;                 /* re-entrancy: > 0 inside a core call */
	bool free_pending;
	TAILQ_ENTRY(ezp_session) link;
};

/* pipeline.c */
int ezp__pipeline_create(struct ezp_core_ctx *d, const struct ezp__pipeline_conf *pc,
			 struct ezp__pipeline **out, struct ezp_error *err);
/* Stop listening, close sessions (when @close_sessions), free when unused. */
void ezp__pipeline_remove(struct ezp__pipeline *p, bool close_sessions);
int ezp__pipeline_listen(struct ezp__pipeline *p, bool quiet, struct ezp_error *err);
void ezp__pipeline_log_listen(struct ezp__pipeline *p);
void ezp__pipeline_unlisten(struct ezp__pipeline *p);
void ezp__pipeline_set_listener(struct ezp__pipeline *p, struct ezp_listener *l);
int ezp__pipeline_addresses(struct ezp_core_ctx *d, const char *name, struct ezp_addr *bound,
			    struct ezp_addr *to);
struct ezp__pipeline *ezp__pipeline_find(struct ezp_core_ctx *d, const char *name);
struct ezp__pipe_gen *ezp__pipeline_gen(struct ezp__pipeline *p); /* ref'd */
void ezp__gen_unref(struct ezp__pipe_gen *g);
int ezp__gen_build(struct ezp_core_ctx *d, struct ezp__pipeline *p,
		   const struct ezp__pipeline_conf *pc, struct ezp__chain_def *reuse_chain,
		   struct ezp__pipe_gen **out, struct ezp_error *err);
void ezp__pipeline_set_gen(struct ezp__pipeline *p, struct ezp__pipe_gen *g);
struct ezp__chain_def *ezp__chain_ref(struct ezp__chain_def *c);
void ezp__chain_unref(struct ezp__chain_def *c);
int ezp__listener_accept(struct ezp_accept *a);
struct ezp__claim *ezp__claim_slot(struct ezp__pipeline *p, const char *key); /* lock held */
/* The claim key of an exclusive filter item: "kind" or "kind:Name". */
void ezp__claim_key(const struct ezp__kind_conf *kc, char *buf, size_t len);
void ezp__pipeline_unref(struct ezp__pipeline *p);
/* A route: the next client from @addr goes into @s. Thread: @s's worker. */
int ezp__pipeline_route_add(struct ezp__pipeline *p, const struct ezp_addr *addr,
			    struct ezp_session *s, int mode, bool once, ezp_done_fn done, void *arg);
/* Thread: @s's worker. */
void ezp__pipeline_session_closed(struct ezp__pipeline *p, struct ezp_session *s);
/* The pipeline's generation changed: move @s to the new chain when it can. */
void ezp__pipeline_refresh_session(struct ezp_session *s);
int ezp__pipeline_route_cancel(struct ezp__pipeline *p, void *done_arg);
void ezp__pipeline_swap_existing(struct ezp__pipeline *p, const struct ezp_addr *to);
void ezp__pipeline_close_sessions(struct ezp_core_ctx *d, struct ezp__pipeline *p);
int ezp__listener_open(struct ezp__pipeline *p, const struct ezp__kind_conf *from, bool shared,
		       struct ezp_listener **out, struct ezp_error *err);
void ezp__listener_close(struct ezp_listener *l);
void ezp__leg_attached(struct ezp_leg *leg);

/* session.c */
struct ezp_session *ezp__session_new(struct ezp__pipeline *p, struct ezp_worker *w,
				     struct ezp__pipe_gen *g);
struct ezp_leg *ezp__leg_new(struct ezp_session *s, const struct ezp_transport_kind *kind,
			     const void *conf, const struct ezp_addr *peer, bool is_server);
int ezp__session_add_client(struct ezp_session *s, struct ezp_leg *leg);
void ezp__session_start(struct ezp_session *s);
void ezp__session_close(struct ezp_session *s, int reason, const char *text);
void ezp__session_info(struct ezp_session *s, struct ezp_session_info *info);
void ezp__session_event(struct ezp_session *s, int event);
void ezp__session_update_pause(struct ezp_session *s);
void ezp__session_check_fast_path(struct ezp_session *s);
void ezp__session_unbridge(struct ezp_session *s);
int ezp__session_swap_server(struct ezp_session *s, const struct ezp_addr *addr,
			     ezp_done_fn done, void *arg);
int ezp__session_swap_client(struct ezp_session *s, const struct ezp_addr *addr, int dial,
			     bool add, ezp_done_fn done, void *arg);
/* Deliver a packet that left the chain to the far leg(s). (transfer full) */
void ezp__session_deliver(struct ezp_session *s, unsigned dir, struct ezp_packet *pkt);
void ezp__session_deliver_eof(struct ezp_session *s, unsigned dir);
void ezp__session_enter(struct ezp_session *s);
void ezp__session_leave(struct ezp_session *s);
struct ezp_session *ezp__session_find_local(struct ezp_worker *w, uint64_t id);
void ezp__leg_recv(struct ezp_leg *leg, struct ezp_packet *pkt);
void ezp__leg_eof(struct ezp_leg *leg);
void ezp__leg_connected(struct ezp_leg *leg, int status, const char *message);
void ezp__leg_error(struct ezp_leg *leg, int reason, const char *message);
void ezp__leg_write_done(struct ezp_leg *leg);
int ezp__session_attach_client(struct ezp_session *s, struct ezp_leg *leg, int mode);
void ezp__leg_backpressure(struct ezp_leg *leg, int on);
void ezp__leg_bridged_bytes(struct ezp_leg *from, size_t n);

/* chain.c */
int ezp__chain_init(struct ezp_session *s);
void ezp__chain_fini(struct ezp_session *s);
/* A packet enters direction @dir at stage @from (0 = all filters). (transfer full) */
void ezp__chain_push(struct ezp_session *s, unsigned dir, struct ezp_packet *pkt, unsigned from);
void ezp__chain_push_eof(struct ezp_session *s, unsigned dir);
bool ezp__chain_empty(struct ezp_session *s);
void ezp__chain_answer(struct ezp_worker *w, uint64_t hold_id, int verdict,
		       struct ezp_packet *replacement);
/*
 * Does the chain do anything? Unclaimed exclusive slots pass every packet,
 * so a session whose chain has only those may take the fast path.
 */
bool ezp__chain_active(const struct ezp_session *s);
void ezp__stage_wake(struct ezp_stage *stage, int awake);
/* Give every held packet of @claim (NULL: all) its default action now. */
void ezp__chain_flush_claim(struct ezp_session *s, struct ezp__claim *claim);
/* Switch to s->next_chain if the chain is empty. */
void ezp__chain_maybe_switch(struct ezp_session *s);
bool ezp__chain_full(struct ezp_session *s, unsigned dir);

/* tap.c */
struct ezp_tap;
void ezp__tap_packet(struct ezp_session *s, unsigned dir, const struct ezp_packet *pkt,
		     const struct ezp_packet *orig, uint32_t flags, int verdict);
void ezp__tap_session(struct ezp_session *s, int type);
bool ezp__tap_wants(struct ezp_session *s);
int ezp__tap_subscribe(struct ezp_core_ctx *d, const struct ezp_tap_opts *opts,
		       struct ezp_tap **out);
void ezp__tap_unsubscribe(struct ezp_tap *tap);
void ezp__taps_free(struct ezp_core_ctx *d);
void ezp__taps_start(struct ezp_core_ctx *d);

/* ---- the daemon (daemon.c) -------------------------------------------- */

struct ezp_core_ctx {
	struct ezp_core table;            /* handed to plugins */
	struct ezp__registry reg;
	struct ezp__config *cfg;          /* control */
	unsigned n_workers;
	struct ezp_worker **workers;
	LIST_HEAD(, ezp__pipeline) pipelines; /* control; read by workers under lock */
	pthread_mutex_t lock;             /* pipelines list, session index, taps */
	pthread_mutex_t ctl_lock;         /* recursive: config and pipeline changes, one at a time */
	struct ezp__map session_worker;   /* id -> worker index + 1 */
	atomic_uint_fast64_t next_session;
	atomic_uint_fast64_t next_tap_seq;
	LIST_HEAD(, ezp_tap) taps;
	uint64_t started_us;
	bool started;
	bool stopping;
	char *config_path;
	int log_level_override;           /* embedder's level, -1: the config's */
	struct ezp_error last_error;
	/* services (service.c) */
	struct ezp_worker *svc_w;         /* the service loop: runs no session */
	struct ezp__svc_run *svcs;        /* started services, in start order */
	size_t n_svcs;
	char *state_dir;                  /* resolved, created when the API runs */
	struct ezp_api_conf api_conf;     /* what the API services were started with */
	struct ezp_control control;       /* the "ezp.control" interface */
	atomic_uint_fast64_t tap_drops;   /* events taps lost by lagging */
};

/* A running service (service.c). */
struct ezp__svc_run {
	const struct ezp_service_kind *kind;
	void *state;
};
/* Start the service loop and the services the config asks for. Thread: control. */
int ezp__services_start(struct ezp_core_ctx *d, struct ezp_error *err);
void ezp__services_stop(struct ezp_core_ctx *d);
/* The config's Api changed (reload): say it takes effect on restart. */
void ezp__services_note_reload(struct ezp_core_ctx *d, const struct ezp__config *cfg);
const void *ezp__find_service(struct ezp_core_ctx *d, const char *name, unsigned min_version);
/* StateDir, or the default: /var/lib/ezproxy as root, else per user (malloc'd). Thread: any. */
char *ezp__state_dir_resolve(const char *configured);
/* control_svc.c: fill d->control. */
void ezp__control_init(struct ezp_core_ctx *d);

/* Is the caller off @d's packet workers (the control thread or the service loop)? */
static inline bool ezp__off_workers(struct ezp_core_ctx *d)
{
	struct ezp_worker *w = ezp__worker_current();

	return !w || w == d->svc_w;
}

/* Worker lookup for a session id (under d->lock). Returns NULL when gone. */
struct ezp_worker *ezp__session_worker(struct ezp_core_ctx *d, uint64_t id);
void ezp__core_table_init(struct ezp_core_ctx *d);
int ezp__session_inject_local(struct ezp_session *s, int dir, struct ezp_packet *pkt, int after);
int ezp__inject_by_id(struct ezp_core_ctx *d, uint64_t id, int dir, const void *data, size_t len,
		      ezp_done_fn done, void *arg);
int ezp__close_by_id(struct ezp_core_ctx *d, uint64_t id, ezp_done_fn done, void *arg);
int ezp__filter_claim(struct ezp_core_ctx *d, const char *pipeline, const char *key,
		      const struct ezp_filter_holder *holder, const struct ezp_claim_opts *opts,
		      struct ezp_claim **out, struct ezp_error *err);
/* Apply a new config as a diff (control thread). Takes @cfg on success. */
int ezp__daemon_apply(struct ezp_core_ctx *d, struct ezp__config *cfg, struct ezp_error *err);
/* Explicit reloads: every filter with a reload hook re-reads its files (each worker). */
void ezp__filters_reload(struct ezp_core_ctx *d);
/* Load @path and apply it; nothing changes when it is invalid. Logs the outcome. */
int ezp__daemon_reload_file(struct ezp_core_ctx *d, const char *path, struct ezp_error *err);

#endif
