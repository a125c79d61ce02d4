/*
 * ezproxy/sdk.h - the EzProxy plugin SDK (header only).
 *
 * A plugin links nothing from the core. It exports one data symbol,
 * `ezp_plugin` (written with EZP_PLUGIN_DEFINE), and calls the core only
 * through the `const struct ezp_core *` it receives in its init callback.
 *
 * Threads: the core runs N workers, one event loop each. A session lives on
 * one worker with its legs, filter state and timers. Every function below
 * says from which thread it may be called:
 *   "worker"  - the worker that owns the object named (the session's, the
 *               leg's, the listener's); callbacks into a plugin arrive there.
 *   "control" - the thread that loads configuration (the main thread of the
 *               daemon or the embedder's thread); never a worker.
 *   "any"     - any thread, including a plugin's own threads.
 *
 * Ownership: a pointer handed to a plugin is borrowed for the duration of
 * the callback unless marked "(transfer full)", in which case the receiver
 * owns it on success and on failure. Packets are refcounted; write to a
 * packet only after ezp_core.packet_make_writable().
 *
 * Public structs begin with `struct_size` and only ever grow at the end; an
 * optional member is used only when the struct is large enough to hold it
 * (EZP_HAS). Enum values are never renumbered.
 */
#ifndef EZPROXY_SDK_H
#define EZPROXY_SDK_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- versions --------------------------------------------------------- */

#define EZP_ABI_MAJOR 1 /* changes only when compatibility breaks */
#define EZP_ABI_MINOR 0 /* grows when something is added */

/* EZP_HAS(ptr, member): does the struct at ptr, per its struct_size, hold member? */
#define EZP_HAS(ptr, member)                                                   \
	((ptr)->struct_size >= offsetof(__typeof__(*(ptr)), member) + sizeof((ptr)->member))

/* ---- status and errors ------------------------------------------------- */

/* Never renumbered; new codes are added at the end. */
enum ezp_status {
	EZP_OK = 0,
	EZP_ERR = -1,             /* unclassified failure (see the message) */
	EZP_ERR_NOMEM = -2,       /* allocation failed */
	EZP_ERR_INVAL = -3,       /* bad argument or bad input */
	EZP_ERR_NOT_FOUND = -4,   /* no such session, pipeline, plugin, kind */
	EZP_ERR_EXISTS = -5,      /* name already in use */
	EZP_ERR_ABI = -6,         /* plugin ABI version or struct size refused */
	EZP_ERR_IO = -7,          /* a socket or file operation failed */
	EZP_ERR_LIMIT = -8,       /* a configured limit was hit */
	EZP_ERR_BUSY = -9,        /* an exclusive filter is held by someone else */
	EZP_ERR_CONFIG = -10,     /* the configuration is invalid */
	EZP_ERR_UNSUPPORTED = -11,/* the transport or kind cannot do that */
	EZP_ERR_CLOSED = -12,     /* the session or leg has ended */
	EZP_ERR_TIMEOUT = -13,    /* a deadline passed */
	EZP_ERR_PERM = -14,       /* not permitted */
	EZP_ERR_AGAIN = -15,      /* in progress: completion is reported later */
	EZP_ERR_PLUGIN = -16,     /* a plugin could not be loaded */
};

enum ezp_side {
	EZP_SIDE_INTERNAL = 0,
	EZP_SIDE_CLIENT = 1,
	EZP_SIDE_SERVER = 2,
	EZP_SIDE_CONFIG = 3,
};

/* Filled by a failing call. file/line/column are set for config errors. */
struct ezp_error {
	int code;       /* enum ezp_status */
	int side;       /* enum ezp_side */
	char message[512];
	char file[256];
	int line;       /* 1-based; 0 when unknown */
	int column;     /* 1-based; 0 when unknown */
};

/* ---- packets ----------------------------------------------------------- */

enum ezp_direction {
	EZP_DIR_TO_SERVER = 0,
	EZP_DIR_TO_CLIENT = 1,
};

enum ezp_packet_flags {
	EZP_PKT_INJECTED = 1u << 0, /* made by inject, not read from a leg */
	EZP_PKT_REPLACED = 1u << 1, /* bytes replaced by a filter */
	EZP_PKT_DROPPED = 1u << 2,  /* only seen by taps: a filter dropped it */
	EZP_PKT_EOF = 1u << 3,      /* end of stream marker (never shown to filters) */
};

/*
 * The part of a packet a plugin may read. The core allocates packets and
 * keeps private fields after this head. `data` is read-only unless the
 * packet came back from packet_make_writable(). A packet lives on its
 * session's worker; its refcount is atomic so a tap may hold a reference on
 * another thread.
 */
struct ezp_packet {
	uint8_t *data;
	size_t len;
	uint64_t session_id; /* 0 until the packet enters a session */
	uint32_t flags;      /* enum ezp_packet_flags */
	uint8_t dir;         /* enum ezp_direction */
	uint8_t leg;         /* client leg index it came from / goes to (0 = first) */
	uint16_t reserved;
	uint64_t ts_us;      /* CLOCK_REALTIME microseconds when read */
};

/* ---- addresses --------------------------------------------------------- */

struct ezp_addr {
	socklen_t len; /* 0 = unset */
	struct sockaddr_storage ss;
};

#define EZP_ADDR_STRLEN 64 /* "[ffff:...]:65535" fits */

/* ---- parameters (config keys a kind accepts) --------------------------- */

enum ezp_param_type {
	EZP_PARAM_STRING = 1, /* char * (owned by the config; freed by the core) */
	EZP_PARAM_INT = 2,    /* int64_t */
	EZP_PARAM_BOOL = 3,   /* int (0/1) */
	EZP_PARAM_DOUBLE = 4, /* double */
	EZP_PARAM_ADDR = 5,   /* struct ezp_addr, "host:port", "[v6]:port" or ":port" */
	EZP_PARAM_MS = 6,     /* int64_t milliseconds, >= 0 */
};

/*
 * One config key. The core validates YAML against a NULL-keyed table of
 * these (unknown key -> error with line and column), fills a config struct
 * of `config_size` bytes at `offset`, and prints the table in
 * `ezproxy plugins`. def is the default as YAML text (NULL = zero / unset).
 */
struct ezp_param {
	const char *key;   /* PascalCase, e.g. "Listen" */
	int type;          /* enum ezp_param_type */
	size_t offset;     /* offsetof(config struct, field) */
	const char *def;   /* default, as it would be written in YAML */
	int required;      /* 1: the key must be given */
	int64_t min, max;  /* for INT and MS when min < max */
	const char *doc;   /* one line */
};

#define EZP_PARAM_END {NULL, 0, 0, NULL, 0, 0, 0, NULL}

/* ---- opaque core objects ------------------------------------------------ */

struct ezp_worker;    /* one event loop thread */
struct ezp_session;   /* one client flow */
struct ezp_leg;       /* a session's link to one peer */
struct ezp_listener;  /* a pipeline's `from` endpoint on all workers */
struct ezp_timer;
struct ezp_watch;
struct ezp_tap;
struct ezp_pipeline;
struct ezp_core;
struct ezp_core_ctx;  /* one daemon instance */

enum ezp_close_reason {
	EZP_CLOSE_NONE = 0,
	EZP_CLOSE_CLIENT = 1,         /* the client closed */
	EZP_CLOSE_SERVER = 2,         /* the server closed */
	EZP_CLOSE_IDLE = 3,           /* idle timeout */
	EZP_CLOSE_API = 4,            /* closed by API, script or embedder */
	EZP_CLOSE_ERROR = 5,          /* an error; see the text */
	EZP_CLOSE_CONNECT_FAILED = 6, /* the server could not be reached */
	EZP_CLOSE_SHUTDOWN = 7,       /* the daemon or pipeline stopped */
	EZP_CLOSE_LIMIT = 8,          /* a limit was hit */
};

/* ---- transports --------------------------------------------------------- */

enum ezp_transport_flags {
	EZP_TRANSPORT_STREAM = 1u << 0,   /* bytes (TCP): packets are reads */
	EZP_TRANSPORT_DATAGRAM = 1u << 1, /* datagrams (UDP): packets are whole */
};

/*
 * What the core hands a transport's listen(): the `From` config, and the
 * workers it should serve on. The transport creates its sockets, watches
 * them with core->watch_add on each worker, and reports every new client
 * with core->listener_accept() on that worker.
 */
struct ezp_listen_args {
	size_t struct_size;
	struct ezp_listener *listener; /* core handle, for listener_accept */
	const void *config;            /* the kind's From config (borrowed, lives as long as the listener) */
	unsigned n_workers;
	struct ezp_worker *const *workers;
	const char *pipeline;          /* name, for log lines */
};

/* One client arriving at a listener (see ezp_core.listener_accept). */
struct ezp_accept {
	size_t struct_size;
	struct ezp_listener *listener;
	struct ezp_worker *worker;   /* the worker calling */
	struct ezp_addr peer;        /* the client's address */
	struct ezp_addr local;       /* the address it reached */
	struct ezp_leg *leg;         /* out: the client leg (EZP_OK) */
	struct ezp_worker *move_to;  /* out: with EZP_ERR_AGAIN */
};

/*
 * What the core hands connect(): the leg to connect (already created by the
 * core, owned by it), the kind's `To` config, and the address to dial.
 */
struct ezp_connect_args {
	size_t struct_size;
	struct ezp_leg *leg;
	const void *config;         /* the kind's To (or From, for client dials) config; may be NULL */
	const struct ezp_addr *addr;/* where to connect */
	struct ezp_worker *worker;  /* the session's worker */
};

/*
 * A transport kind. Every callback runs on the worker named in its args or
 * owning the leg, except listen/unlisten (control thread).
 */
struct ezp_transport_kind {
	size_t struct_size;
	const char *name;
	const char *description;
	unsigned flags;                       /* enum ezp_transport_flags */
	const struct ezp_param *listen_params;/* From keys; NULL: cannot listen */
	size_t listen_config_size;
	const struct ezp_param *connect_params;/* To keys; NULL: cannot connect */
	size_t connect_config_size;
	/* Which address a To config dials (for swaps and listings). Thread: any. */
	int (*connect_address)(const void *config, struct ezp_addr *out);

	/*
	 * listen - open the From endpoint on every worker in @args.
	 * Thread: control. On success *@state is the transport's listener
	 * state and *@bound the address actually bound (port 0 resolved).
	 */
	int (*listen)(const struct ezp_core *core, const struct ezp_listen_args *args,
		      void **state, struct ezp_addr *bound, struct ezp_error *err);
	/*
	 * unlisten - close the endpoint's sockets. Thread: control; the core
	 * has stopped every worker's use of the listener (it runs this only
	 * when the workers are idle with respect to it: via a barrier).
	 * Sessions it accepted stay open.
	 */
	void (*unlisten)(void *state);

	/*
	 * connect - start connecting @args->leg. Thread: worker. Returns
	 * EZP_OK when connected now, EZP_ERR_AGAIN when core->leg_connected()
	 * will be called later (on the worker), or an error (the leg is not
	 * connected and the core closes it; leg_close is still called).
	 */
	int (*connect)(const struct ezp_core *core, const struct ezp_connect_args *args,
		       struct ezp_error *err);

	/*
	 * send - queue @pkt on the leg, in order. (transfer full): the
	 * transport unrefs it when written, on failure, or at close.
	 * Accepted before the leg is connected (queued). Returns EZP_OK or
	 * EZP_ERR_CLOSED. When the leg's queue passes its high watermark the
	 * transport calls core->leg_backpressure(leg, 1), and (leg, 0) when it
	 * drains. Thread: worker.
	 */
	int (*send)(struct ezp_leg *leg, void *leg_state, struct ezp_packet *pkt);
	/* Stop / restart delivering reads from this leg. Thread: worker. */
	void (*pause)(struct ezp_leg *leg, void *leg_state);
	void (*resume)(struct ezp_leg *leg, void *leg_state);
	/* Write what is queued, then shut down the write side (half-close). Thread: worker. */
	void (*shutdown_write)(struct ezp_leg *leg, void *leg_state);
	/* Close now and free leg_state; queued packets are released. Thread: worker. */
	void (*close)(struct ezp_leg *leg, void *leg_state);

	/* -- optional: check EZP_HAS before use -- */

	/*
	 * repoint - (datagram) send to-peer packets to @addr and accept only
	 * from it from now on. Thread: worker.
	 */
	int (*repoint)(struct ezp_leg *leg, void *leg_state, const struct ezp_addr *addr,
		       struct ezp_error *err);
	/*
	 * bridge - forward between two legs of this transport without the
	 * core seeing the bytes (zero copy). The transport reports bytes with
	 * core->leg_bridged_bytes() and end of stream with core->leg_eof().
	 * Returns EZP_OK if it took over, anything else to decline.
	 * Thread: worker.
	 */
	int (*bridge)(struct ezp_leg *a, void *a_state, struct ezp_leg *b, void *b_state);
	/*
	 * unbridge - stop bridging: bytes the transport holds in flight go to
	 * the front of the destination leg's send queue, so nothing is lost or
	 * reordered; normal reads resume. Thread: worker.
	 */
	void (*unbridge)(struct ezp_leg *a, void *a_state, struct ezp_leg *b, void *b_state);
};

/* ---- filters ------------------------------------------------------------ */

enum ezp_verdict {
	EZP_VERDICT_PASS = 0,
	EZP_VERDICT_DROP = 1,
	EZP_VERDICT_REPLACE = 2, /* call->replacement holds the new packet */
	EZP_VERDICT_HOLD = 3,    /* the filter answers later with core->filter_answer */
	/*
	 * The filter could not decide (a script error, say): the packet gets
	 * the stage's Default, as after HoldTimeoutMs. From packet or as an
	 * answer; the core logs nothing, the filter says why.
	 */
	EZP_VERDICT_DEFAULT = 4,
};

enum ezp_filter_flags {
	EZP_FILTER_READS_PAYLOAD = 1u << 0, /* looks at bytes (not just metadata) */
	EZP_FILTER_READ_ONLY = 1u << 1,     /* never drops or replaces */
	EZP_FILTER_EXCLUSIVE = 1u << 2,     /* claimable by one holder at a time */
	EZP_FILTER_ALL_LEGS = 1u << 3,      /* sees every client leg's packets */
	/*
	 * Asleep until the filter wakes its stage with core->stage_wake: while
	 * asleep packets pass without a call and the stage does not take
	 * sessions off the zero-copy path (a fault stage with no fault set).
	 */
	EZP_FILTER_DORMANT = 1u << 4,
};

enum ezp_session_event {
	EZP_SESSION_OPENED = 1,
	EZP_SESSION_CHANGED = 2,
	EZP_SESSION_CLOSED = 3,
};

/* A read-only view of a session for filters and taps. Thread: its worker. */
struct ezp_session_info {
	size_t struct_size;
	uint64_t id;
	const char *pipeline;
	const char *transport;
	struct ezp_addr client;   /* first client leg */
	struct ezp_addr server;
	unsigned n_clients;
	uint64_t opened_us, last_activity_us;
	uint64_t bytes[2], packets[2]; /* indexed by enum ezp_direction */
	uint64_t dropped, replaced, injected;
	int close_reason;         /* enum ezp_close_reason, when closed */
	const char *close_text;   /* "" when none */
};

/* One packet handed to a filter. */
struct ezp_filter_call {
	size_t struct_size;
	struct ezp_session *session;
	void **session_state;       /* the filter's per-session slot (starts NULL) */
	struct ezp_packet *pkt;     /* borrowed; hold keeps it alive */
	uint64_t hold_id;           /* pass to filter_answer after returning HOLD */
	struct ezp_packet *replacement; /* (transfer full) set with REPLACE */
	unsigned index;             /* this filter's position in the chain */
};

/* What create() gets: where the instance runs. */
struct ezp_stage; /* one item of one chain, shared by its per-worker instances */

struct ezp_filter_ctx {
	size_t struct_size;
	const struct ezp_core *core;
	struct ezp_worker *worker;  /* the instance's worker */
	unsigned worker_index;
	const char *pipeline;
	unsigned index;             /* position in the chain */
	struct ezp_stage *stage;    /* for stage_wake; valid while the instance lives */
};

/*
 * A filter kind. One instance exists per pipeline per worker; its packet
 * and session_event callbacks run on that worker only.
 */
struct ezp_filter_kind {
	size_t struct_size;
	const char *name;
	const char *description;
	unsigned flags; /* enum ezp_filter_flags */
	const struct ezp_param *params;
	size_t config_size;
	/* Thread: control. @config is borrowed and outlives the instance. */
	int (*create)(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
		      struct ezp_error *err);
	/* Thread: worker. Returns enum ezp_verdict. */
	int (*packet)(void *instance, struct ezp_filter_call *call);
	/* Optional. Thread: worker. @session_state as in ezp_filter_call. */
	void (*session_event)(void *instance, struct ezp_session *session, int event,
			      void **session_state);
	/* Optional. Thread: worker. New config, same kind. */
	int (*reconfigure)(void *instance, const void *config, struct ezp_error *err);
	/* Thread: any, once no other callback of the instance can run. */
	void (*destroy)(void *instance);
	/*
	 * Optional. Thread: worker. An explicit reload (SIGHUP, the API's
	 * config reload or replace) kept this filter's config unchanged:
	 * re-read whatever the filter reads from files (a script).
	 */
	void (*reload)(void *instance);
	/*
	 * Defaults for the core's HoldWindow and HoldTimeoutMs keys when an
	 * item does not set them (0: the core's, 64 and 5000 ms). A filter
	 * that holds every packet for a while (latency) wants a wide window.
	 */
	unsigned hold_window;
	unsigned hold_timeout_ms;
};

/*
 * A holder of an exclusive filter (the remote filter of the API, a C
 * callback registered by an embedder). While nobody holds an exclusive
 * filter, packets pass it. Thread: on_packet runs on the session's worker.
 */
struct ezp_filter_holder {
	size_t struct_size;
	const char *name;          /* shown in "filter held by NAME" */
	void *userdata;
	int (*on_packet)(void *userdata, struct ezp_filter_call *call);
	void (*on_session_event)(void *userdata, const struct ezp_session_info *info, int event);
	/* Called once, on any thread, when the claim has ended. Optional. */
	void (*on_released)(void *userdata);
};

/* ---- taps ---------------------------------------------------------------- */

enum ezp_tap_event_type {
	EZP_TAP_PACKET = 1,
	EZP_TAP_SESSION_OPENED = 2,
	EZP_TAP_SESSION_CHANGED = 3,
	EZP_TAP_SESSION_CLOSED = 4,
};

/* One event as a tap sees it. Borrowed for the callback. */
struct ezp_tap_event {
	size_t struct_size;
	int type;                  /* enum ezp_tap_event_type */
	uint64_t seq;              /* per tap, increasing (gaps = lagged) */
	const char *pipeline;
	uint64_t session_id;
	const struct ezp_packet *pkt;      /* EZP_TAP_PACKET: final bytes (NULL if dropped with none) */
	const struct ezp_packet *original; /* replaced packets: the bytes before; else NULL */
	uint32_t flags;            /* enum ezp_packet_flags */
	int verdict;               /* the verdict the chain reached */
	struct ezp_addr src, dst;
	const struct ezp_session_info *info; /* session events: the session */
};

struct ezp_tap_opts {
	size_t struct_size;
	const char *pipeline;      /* NULL: every pipeline */
	uint64_t session_id;       /* 0: every session */
	unsigned capacity;         /* events kept per worker before dropping oldest; 0 = config default */
	struct ezp_worker *deliver_on; /* worker whose thread runs the callbacks; NULL = worker 0 */
	void *userdata;
	void (*on_event)(void *userdata, const struct ezp_tap_event *ev);
	void (*on_lagged)(void *userdata, uint64_t dropped);
};

/* ---- services ------------------------------------------------------------ */

/* A service kind (http-api, auth, ...). Thread: control for every callback. */
struct ezp_service_kind {
	size_t struct_size;
	const char *name;
	const char *description;
	const struct ezp_param *params;
	size_t config_size;
	int (*start)(const struct ezp_core *core, const void *config, void **state,
		     struct ezp_error *err);
	int (*reconfigure)(void *state, const void *config, struct ezp_error *err);
	void (*stop)(void *state);
	/* An interface other plugins find by name with core->find_service. */
	const char *iface_name;    /* e.g. "ezp.auth"; NULL = none */
	unsigned iface_version;
	const void *(*iface)(void *state);
	unsigned flags;            /* enum ezp_service_flags */
};

enum ezp_service_flags {
	/*
	 * Started whenever the plugin is loaded, before auth and http-api
	 * (which may then find its interface), with a NULL config; stopped
	 * after them. Without it a service starts only when the core asks for
	 * it by name (auth, http-api: when Api is enabled).
	 */
	EZP_SERVICE_AUTOSTART = 1u << 0,
};

/* ---- the plugin descriptor ---------------------------------------------- */

struct ezp_plugin_desc {
	/* frozen forever: */
	size_t struct_size;
	uint32_t abi_major;
	uint32_t abi_minor;
	/* minor 0: */
	const char *name;
	const char *version;
	const char *description;
	const char *license;
	int (*init)(const struct ezp_core *core, struct ezp_error *err); /* optional; control */
	void (*fini)(void);                                               /* optional; control */
	const struct ezp_transport_kind *const *transports; /* NULL-terminated, or NULL */
	const struct ezp_filter_kind *const *filters;
	const struct ezp_service_kind *const *services;
};

#define EZP_PLUGIN_SYMBOL "ezp_plugin"

#ifdef __cplusplus
#define EZP_PLUGIN_EXTERN extern "C"
#else
#define EZP_PLUGIN_EXTERN
#endif

/*
 * EZP_PLUGIN_DEFINE(sym, ...) - the plugin's one export. Out of tree use
 * EZP_PLUGIN_DEFINE(ezp_plugin, ...); built into libezproxy the build
 * defines EZP_PLUGIN_BUILTIN_NAME so the symbol becomes ezp_plugin_<name>.
 */
#define EZP_PLUGIN_DEFINE(sym, ...)                                            \
	EZP_PLUGIN_EXTERN __attribute__((visibility("default")))               \
	const struct ezp_plugin_desc sym = {                                   \
		.struct_size = sizeof(struct ezp_plugin_desc),                 \
		.abi_major = EZP_ABI_MAJOR,                                    \
		.abi_minor = EZP_ABI_MINOR,                                    \
		__VA_ARGS__}

/* ---- the services table the core gives every plugin ---------------------- */

enum ezp_log_level {
	EZP_LOG_DEBUG = 0,
	EZP_LOG_INFO = 1,
	EZP_LOG_WARN = 2,
	EZP_LOG_ERROR = 3,
};

enum ezp_watch_events {
	EZP_WATCH_READ = 1u << 0,
	EZP_WATCH_WRITE = 1u << 1,
};

typedef void (*ezp_fn)(void *arg);
typedef void (*ezp_watch_fn)(int fd, unsigned events, void *arg);
typedef void (*ezp_done_fn)(void *arg, int status, const char *message);

struct ezp_core {
	size_t struct_size;
	uint32_t abi_major, abi_minor;

	/* -- logging. Thread: any. Never pass payload bytes above debug. -- */
	void (*log)(int level, const char *source, const char *fmt, ...)
		__attribute__((format(printf, 3, 4)));
	int (*log_enabled)(int level);

	/* -- addresses. Thread: any. -- */
	int (*addr_parse)(const char *text, struct ezp_addr *out, struct ezp_error *err);
	/* Writes "1.2.3.4:5" / "[::1]:5" into buf (EZP_ADDR_STRLEN). Returns buf. */
	const char *(*addr_format)(const struct ezp_addr *addr, char *buf, size_t len);

	/* -- packets. Thread: the packet's worker unless said otherwise. -- */
	/* New packet of @len bytes (contents undefined); refcount 1. NULL on OOM. */
	struct ezp_packet *(*packet_new)(size_t len);
	/* Wrap foreign memory; @release(@arg) runs when the last ref goes. */
	struct ezp_packet *(*packet_wrap)(void *data, size_t len, void (*release)(void *arg),
					  void *arg);
	/* Thread: any (atomic). */
	struct ezp_packet *(*packet_ref)(struct ezp_packet *pkt);
	void (*packet_unref)(struct ezp_packet *pkt);
	/* (transfer full) @pkt; returns a packet only the caller references (a copy if shared). */
	struct ezp_packet *(*packet_make_writable)(struct ezp_packet *pkt);
	/* Shrink or grow @pkt's length in place; grow may reallocate. (transfer full) */
	struct ezp_packet *(*packet_resize)(struct ezp_packet *pkt, size_t len);

	/* -- workers, timers, fd watches. -- */
	/* Run @fn(@arg) on @w's thread soon. Thread: any. EZP_ERR_CLOSED once stopping. */
	int (*defer)(struct ezp_worker *w, ezp_fn fn, void *arg);
	/* The worker the caller runs on, or NULL. Thread: any. */
	struct ezp_worker *(*worker_current)(void);
	unsigned (*worker_index)(struct ezp_worker *w);
	/* Thread: @w. A one-shot or repeating timer. */
	struct ezp_timer *(*timer_new)(struct ezp_worker *w, ezp_fn fn, void *arg);
	void (*timer_start)(struct ezp_timer *t, uint64_t ms, int repeat);
	void (*timer_stop)(struct ezp_timer *t);
	void (*timer_free)(struct ezp_timer *t);
	/* Thread: @w. Watch @fd for EZP_WATCH_* events (level-triggered). */
	struct ezp_watch *(*watch_add)(struct ezp_worker *w, int fd, unsigned events,
				       ezp_watch_fn fn, void *arg);
	void (*watch_set)(struct ezp_watch *watch, unsigned events);
	void (*watch_free)(struct ezp_watch *watch);
	uint64_t (*now_us)(void); /* CLOCK_REALTIME microseconds */

	/* -- for transports. Thread: the leg's / listener's worker. -- */
	/*
	 * listener_accept - a new client reached a listener. The core makes (or
	 * joins) a session and returns the client leg in @a->leg; the transport
	 * then sets its state with leg_set_state. EZP_ERR_AGAIN with
	 * @a->move_to set: the session this client belongs to lives on another
	 * worker; hand the client (its fd, its datagram) to that worker with
	 * defer and call listener_accept again there with a->worker = move_to.
	 * Any other error: refuse the client (close its socket, drop the datagram).
	 * Thread: a->worker.
	 */
	int (*listener_accept)(struct ezp_accept *a);
	/*
	 * leg_set_state - attach the transport's state to a new leg. The core
	 * starts using the leg (and may call pause/resume on it) from here on.
	 * A transport that cannot make its state calls leg_error instead; the
	 * core then never calls close for that leg.
	 */
	void (*leg_set_state)(struct ezp_leg *leg, void *leg_state);
	void *(*leg_state)(struct ezp_leg *leg);
	struct ezp_worker *(*leg_worker)(struct ezp_leg *leg);
	/* (transfer full) @pkt: bytes read from the leg. */
	void (*leg_recv)(struct ezp_leg *leg, struct ezp_packet *pkt);
	/* The peer finished sending (TCP FIN). */
	void (*leg_eof)(struct ezp_leg *leg);
	/*
	 * After shutdown_write: everything queued was written and the write
	 * side is shut down. The core ends a session only after this, so no
	 * queued byte is lost. Datagram transports call it at once.
	 */
	void (*leg_write_done)(struct ezp_leg *leg);
	/* The connect started with EZP_ERR_AGAIN finished. */
	void (*leg_connected)(struct ezp_leg *leg, int status, const char *message);
	/* The leg failed or was idle; the core ends the session (or drops the leg). */
	void (*leg_error)(struct ezp_leg *leg, int reason, const char *message);
	void (*leg_backpressure)(struct ezp_leg *leg, int on);
	/* While bridged: @n bytes moved from @from to its peer leg. */
	void (*leg_bridged_bytes)(struct ezp_leg *from, size_t n);
	/* The config values for the leg's pipeline limits. */
	size_t (*leg_max_packet)(struct ezp_leg *leg);

	/* -- for filters. -- */
	/*
	 * filter_answer - answer a packet the filter held. @replacement is
	 * (transfer full) and used with EZP_VERDICT_REPLACE. Thread: any; the
	 * answer is posted to the session's worker (the hold id names it).
	 * Returns EZP_OK when posted; an answer for a packet that already timed
	 * out or whose session ended is released without effect.
	 */
	int (*filter_answer)(struct ezp_core_ctx *ctx, uint64_t hold_id, int verdict,
			     struct ezp_packet *replacement);
	/* Fill @info for @s. Thread: @s's worker. */
	void (*session_info)(struct ezp_session *s, struct ezp_session_info *info);
	/*
	 * session_inject - queue @pkt (transfer full) toward @dir. From inside
	 * filter @after's callback pass its index so later filters see it; pass
	 * -1 to skip every filter. Thread: the session's worker.
	 */
	int (*session_inject)(struct ezp_session *s, int dir, struct ezp_packet *pkt, int after);
	/* Thread: the session's worker. */
	void (*session_close)(struct ezp_session *s, int reason, const char *text);

	/* -- by id, from any thread: posted to the owning worker; @done runs there. -- */
	int (*inject)(struct ezp_core_ctx *ctx, uint64_t session_id, int dir, const void *data,
		      size_t len, ezp_done_fn done, void *arg);
	int (*close)(struct ezp_core_ctx *ctx, uint64_t session_id, ezp_done_fn done, void *arg);

	/* -- taps. Thread: any. -- */
	int (*tap_subscribe)(struct ezp_core_ctx *ctx, const struct ezp_tap_opts *opts,
			     struct ezp_tap **out);
	/* After it returns no callback of the tap runs any more. Not from the tap's own callback. */
	void (*tap_unsubscribe)(struct ezp_tap *tap);

	/* -- services. Thread: control. -- */
	const void *(*find_service)(struct ezp_core_ctx *ctx, const char *name, unsigned min_version);

	/* The daemon this table belongs to (plugins keep it from init). */
	struct ezp_core_ctx *ctx;

	/*
	 * pipeline_addresses - where pipeline @name listens (@bound) and where
	 * new sessions connect now (@to, which a swap of the pipeline's To
	 * changes). An address is zeroed (len 0) while not known: before the
	 * listener is bound, or for a To with no address. Either pointer may be
	 * NULL. Returns EZP_ERR_NOT_FOUND for no such pipeline (not applied
	 * yet, or removed). Thread: any; never blocks on a worker.
	 */
	int (*pipeline_addresses)(struct ezp_core_ctx *ctx, const char *name,
				  struct ezp_addr *bound, struct ezp_addr *to);
	/*
	 * stage_wake - wake (@awake 1) or put to sleep a DORMANT filter's stage
	 * (ezp_filter_ctx.stage); no effect on other kinds. Sessions of the
	 * chain leave or may rejoin the zero-copy path on their workers
	 * shortly after: packets already bridged meanwhile pass unseen.
	 * Thread: any.
	 */
	void (*stage_wake)(struct ezp_stage *stage, int awake);
};

#ifdef __cplusplus
}
#endif
#endif /* EZPROXY_SDK_H */
