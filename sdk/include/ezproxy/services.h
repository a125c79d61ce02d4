/*
 * ezproxy/services.h - interfaces between service plugins and the core.
 *
 * A service plugin (http-api, auth) finds the interfaces it needs with
 * ezp_core.find_service(ctx, NAME, VERSION). Each interface is a table of
 * functions that begins with struct_size and only grows at the end.
 *
 *   "ezp.control" - provided by the core: what the API does to a running
 *                   daemon (status, pipelines, sessions, config, claims).
 *   "ezp.auth"    - provided by the auth plugin: keys and permissions.
 *   "ezp.fault"   - provided by the fault plugin: faults set live.
 *   "ezp.capture" - provided by the capture plugin: live pcapng streams.
 *
 * Threads: every function here runs on the "service" thread - the core's
 * service loop (ezp_control.service_worker), which runs no session - or on
 * the control thread, unless it says "any". Functions that act on a
 * session are posted to its worker and wait for the answer, so they may
 * block the service loop for a short while, never a packet worker.
 */
#ifndef EZPROXY_SERVICES_H
#define EZPROXY_SERVICES_H

#include <ezproxy/ezproxy.h>
#include <ezproxy/sdk.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- what the core hands to service start() ---------------------------- */

/*
 * The core starts the `auth` service and then the `http-api` service when
 * the config has an `Api` section that is enabled. Both kinds declare no
 * params (params NULL, config_size 0); their start() receives a
 * `const struct ezp_api_conf *` built from the `Api` section.
 */
struct ezp_api_conf {
	size_t struct_size;
	const char *listen;      /* "127.0.0.1:8080" (port 0: any free port) */
	int auth;                /* 1: keys required */
	const char *tls_cert;    /* PEM file, or NULL for plain HTTP */
	const char *tls_key;
	const char *origin;      /* an extra Origin allowed on WebSocket upgrades, or NULL */
	const char *state_dir;   /* created by the core (0700); keys file and admin.key live here */
	const char *web_root;    /* the web page's files, or NULL when not installed */
};

/* ---- ezp.control (the core) ------------------------------------------------ */

#define EZP_CONTROL_IFACE "ezp.control"
#define EZP_CONTROL_VERSION 1

struct ezp_status_info {
	size_t struct_size;
	const char *version;       /* "0.1.0" */
	uint64_t started_us;       /* CLOCK_REALTIME */
	uint64_t now_us;
	unsigned workers;
	uint64_t pipelines;
	uint64_t sessions;         /* live */
	uint64_t total_sessions;   /* since start */
	uint64_t bytes[2];         /* by enum ezp_direction, closed and live sessions */
	const char *config_file;   /* "<builtin>" when none */
};

/* A pipeline as the API shows it (a copy). */
struct ezp_pipeline_stats {
	size_t struct_size;
	char name[72];
	char from_kind[32], to_kind[32];
	int listening;
	struct ezp_addr bound;     /* where the listener is bound (port 0 resolved) */
	struct ezp_addr to_addr;   /* the current `to` address */
	int shared;
	unsigned n_filters;
	uint64_t sessions;         /* live */
	uint64_t total_sessions;
	uint64_t bytes[2], packets[2]; /* closed + live sessions, by enum ezp_direction */
	uint64_t dropped, replaced, injected;
	uint64_t held, hold_timeouts;  /* packets a filter held; holds that timed out */
	uint64_t connect_failures, refused;
};

/* A loaded plugin. */
struct ezp_plugin_info {
	size_t struct_size;
	const struct ezp_plugin_desc *desc;
	const char *path;          /* "<builtin>" for the core's own */
};

/*
 * Extra claim options (ezp_control.filter_claim): the holder's own hold
 * timeout and default action, overriding the filter's HoldTimeoutMs and
 * Default for packets this holder holds.
 */
struct ezp_claim_opts {
	size_t struct_size;
	unsigned timeout_ms;       /* 0: the filter's HoldTimeoutMs */
	int default_verdict;       /* -1: the filter's Default; else EZP_VERDICT_PASS / _DROP */
};

struct ezp_control {
	size_t struct_size;

	/* The service loop (a libevent loop on its own thread, no sessions). Thread: any. */
	struct ezp_worker *(*service_worker)(struct ezp_core_ctx *ctx);
	void (*status)(struct ezp_core_ctx *ctx, struct ezp_status_info *out);
	/* The i-th loaded plugin (0..); EZP_ERR_NOT_FOUND past the end. */
	int (*plugin_at)(struct ezp_core_ctx *ctx, size_t i, struct ezp_plugin_info *out);

	/* Every pipeline, in config order. *out is malloc'd (free()). */
	int (*pipelines)(struct ezp_core_ctx *ctx, struct ezp_pipeline_stats **out, size_t *n);
	int (*pipeline_stats)(struct ezp_core_ctx *ctx, const char *name,
			      struct ezp_pipeline_stats *out);
	/*
	 * The resolved config of one pipeline as a YAML mapping (Name, From,
	 * Through, To, Shared, Limits; every default written out), malloc'd.
	 * NULL when there is no such pipeline.
	 */
	char *(*pipeline_yaml)(struct ezp_core_ctx *ctx, const char *name);
	/*
	 * Create (@name not in use) or replace a pipeline with @item_yaml, one
	 * mapping in the form of a `Pipelines:` item (its Name must be @name).
	 * Validated whole and applied as a diff like a reload: a changed `To`
	 * affects new sessions, a changed `From` rebinds the listener (its
	 * sessions continue unless @close_sessions), filters change at packet
	 * boundaries. Errors give the key; line/column refer to @item_yaml.
	 * *@created is set to 1 when the pipeline is new.
	 */
	int (*pipeline_put)(struct ezp_core_ctx *ctx, const char *name, const char *item_yaml,
			    int close_sessions, int *created, struct ezp_error *err);
	/* Stop listening and close the pipeline's sessions. */
	int (*pipeline_delete)(struct ezp_core_ctx *ctx, const char *name, struct ezp_error *err);
	/* As ezp_pipeline_swap_to / ezp_pipeline_restart (ezproxy.h). */
	int (*pipeline_swap_to)(struct ezp_core_ctx *ctx, const char *name, const char *to_yaml,
				int apply_to_existing, struct ezp_error *err);
	int (*pipeline_restart)(struct ezp_core_ctx *ctx, const char *name, int close_sessions,
				struct ezp_error *err);
	/* Queue @data toward @dir (or both: EZP_DIR_BOTH) in every live session of @name. */
	int (*pipeline_inject)(struct ezp_core_ctx *ctx, const char *name, int dir,
			       const void *data, size_t len, size_t *n_sessions,
			       struct ezp_error *err);

	/* As ezp_daemon_sessions (ezproxy.h); @pipeline NULL = all. */
	int (*sessions)(struct ezp_core_ctx *ctx, const char *pipeline,
			struct ezp_session_summary **out, size_t *n);
	int (*session_get)(struct ezp_core_ctx *ctx, uint64_t id, struct ezp_session_summary *out);
	int (*session_close)(struct ezp_core_ctx *ctx, uint64_t id, struct ezp_error *err);
	/* @dir: EZP_DIR_TO_SERVER, EZP_DIR_TO_CLIENT or EZP_DIR_BOTH. */
	int (*session_inject)(struct ezp_core_ctx *ctx, uint64_t id, int dir, const void *data,
			      size_t len, struct ezp_error *err);
	int (*session_swap_server)(struct ezp_core_ctx *ctx, uint64_t id, const char *addr,
				   struct ezp_error *err);
	int (*session_swap_client)(struct ezp_core_ctx *ctx, uint64_t id, const char *addr,
				   int dial, int add, unsigned timeout_ms, struct ezp_error *err);

	/* The resolved config as YAML, malloc'd. */
	char *(*config_dump)(struct ezp_core_ctx *ctx);
	/* The file the daemon was started with, or NULL (built-in default / a string). */
	const char *(*config_file)(struct ezp_core_ctx *ctx);
	/*
	 * Replace the config with @yaml: validated whole, applied as a diff.
	 * With @write_back and a config file, the text is then written to that
	 * file atomically (a temporary file renamed over it). Invalid: nothing
	 * changes and @err names file "<request>", line, column and key.
	 */
	int (*config_replace)(struct ezp_core_ctx *ctx, const char *yaml, int write_back,
			      struct ezp_error *err);
	/* Reload from the config file (EZP_ERR_NOT_FOUND when there is none). */
	int (*config_reload)(struct ezp_core_ctx *ctx, struct ezp_error *err);

	/*
	 * Claim the exclusive filter @key ("remote", "callback:NAME") of
	 * @pipeline; see ezp_filter_claim. @opts may be NULL.
	 */
	int (*filter_claim)(struct ezp_core_ctx *ctx, const char *pipeline, const char *key,
			    const struct ezp_filter_holder *holder,
			    const struct ezp_claim_opts *opts, struct ezp_claim **out,
			    struct ezp_error *err);
	/* Thread: any but the holder's own callbacks. */
	void (*claim_release)(struct ezp_claim *claim);
	/* Total events taps lost by lagging since start (for /metrics). Thread: any. */
	uint64_t (*tap_drops)(struct ezp_core_ctx *ctx);
	/*
	 * The hold settings of the exclusive filter @key in @pipeline's
	 * current chain: HoldTimeoutMs and Default (EZP_VERDICT_PASS/_DROP).
	 * EZP_ERR_NOT_FOUND when the pipeline has no such filter.
	 */
	int (*filter_hold)(struct ezp_core_ctx *ctx, const char *pipeline, const char *key,
			   unsigned *timeout_ms, int *default_verdict);
};

/* A direction value the control inject functions accept beside enum ezp_direction. */
#define EZP_DIR_BOTH 2

/* ---- ezp.auth (the auth plugin) --------------------------------------------- */

#define EZP_AUTH_IFACE "ezp.auth"
#define EZP_AUTH_VERSION 1

/* Permission bits (DESIGN.md section 7; the old program's values). */
enum ezp_perm {
	EZP_PERM_CHECK_STATUS = 1u << 0,
	EZP_PERM_CLOSE = 1u << 1,
	EZP_PERM_USE_WEBSOCKET = 1u << 2,
	EZP_PERM_FILTER = 1u << 3,
	EZP_PERM_INJECT = 1u << 4,
	EZP_PERM_MAKE_KEYS = 1u << 5,
	EZP_PERM_DUPLICATE_KEYS = 1u << 6,
	EZP_PERM_RECONFIGURE = 1u << 7,
	EZP_PERM_CAPTURE = 1u << 8,
};
#define EZP_PERM_ALL 0x1ffu

/* One key as listed (never the secret). */
struct ezp_key_info {
	size_t struct_size;
	char id[17];               /* 16 hex digits, stable, safe to show and log */
	char name[65];
	uint32_t perms;
	uint64_t created_us;       /* CLOCK_REALTIME */
	char created_by[17];       /* id of the key that minted it; "" for the first admin key */
};

/* Told when a key is revoked (the API closes that key's WebSockets). */
typedef void (*ezp_key_revoked_fn)(void *userdata, const char *key_id);

struct ezp_auth {
	size_t struct_size;
	/* 0 when Auth is off: every request is admin (the API is on loopback then). */
	int (*enabled)(void *auth);
	/*
	 * Look up the key text a client sent. EZP_OK and *@perms / @id_out
	 * (17 bytes) when known; EZP_ERR_PERM when unknown. Constant-time
	 * compare of SHA-256 digests; the key is never logged.
	 */
	int (*check)(void *auth, const char *key, uint32_t *perms, char *id_out);
	/*
	 * Mint a key for the holder of @parent_id (with @parent_perms): needs
	 * MakeKeys; @perms must be a subset of the parent's bits; MakeKeys in
	 * @perms needs DuplicateKeys in the parent. On EZP_OK @key_out (65
	 * bytes: 64 hex digits) holds the secret (shown once) and @info the
	 * record. EZP_ERR_PERM with a message saying which rule refused.
	 */
	int (*create)(void *auth, const char *parent_id, uint32_t parent_perms, uint32_t perms,
		      const char *name, char *key_out, struct ezp_key_info *info,
		      struct ezp_error *err);
	/* Every key; *out malloc'd (free()). */
	int (*list)(void *auth, struct ezp_key_info **out, size_t *n);
	int (*get)(void *auth, const char *id, struct ezp_key_info *out);
	/* Remove a key; EZP_ERR_NOT_FOUND when unknown. Listeners are told. */
	int (*revoke)(void *auth, const char *id, struct ezp_error *err);
	/* Register / remove a revocation listener. Thread: service. */
	int (*subscribe)(void *auth, ezp_key_revoked_fn fn, void *userdata);
	void (*unsubscribe)(void *auth, ezp_key_revoked_fn fn, void *userdata);
	/* The object every call above takes. */
	void *auth;
};

/*
 * Permission names, as accepted in "perms": ["CheckStatus", ...] and shown
 * in key listings, indexed by bit number.
 */
#define EZP_PERM_NAMES                                                                   \
	{                                                                                \
		"CheckStatus", "Close", "UseWebsocket", "Filter", "Inject", "MakeKeys",  \
			"DuplicateKeys", "Reconfigure", "Capture"                        \
	}

/* ---- ezp.fault (the fault plugin) ------------------------------------------ */

#define EZP_FAULT_IFACE "ezp.fault"
#define EZP_FAULT_VERSION 1

/* One direction's faults; all zero: none. */
struct ezp_fault_dir {
	uint32_t latency_ms;     /* added to every packet */
	uint32_t jitter_ms;      /* plus a random 0..jitter_ms; order is kept */
	double loss;             /* 0..1: share of packets dropped (whole packets, also on TCP) */
	uint64_t bandwidth_bps;  /* bits per second; 0: no cap */
	int freeze;              /* hold everything until cleared or freeze_max_ms, then in order */
	int blackhole;           /* drop everything */
};

/* The faults of a pipeline or of one session. */
struct ezp_faults {
	size_t struct_size;
	struct ezp_fault_dir dir[2]; /* indexed by enum ezp_direction */
	uint64_t seed;               /* randomness (loss, jitter) repeats for a seed; 0: random */
	uint32_t freeze_max_ms;      /* a freeze ends by itself after this; 0: 10000 */
};

/*
 * What the API, Lua and the CLI change live. Thread: any; nothing blocks on
 * a worker (settings are published to the workers, which pick them up at
 * the next packet). Pipelines must have a `fault` stage in Through (the
 * built-in default config has one when the plugin is loaded).
 */
struct ezp_fault {
	size_t struct_size;
	/*
	 * Replace the faults of every session of @pipeline that has no faults
	 * of its own; @f NULL or all zero clears. EZP_ERR_NOT_FOUND (message
	 * says so) when the pipeline has no fault stage; EZP_ERR_INVAL with a
	 * message naming the field for a bad value (loss outside 0..1, ...).
	 */
	int (*pipeline_set)(void *fault, const char *pipeline, const struct ezp_faults *f,
			    struct ezp_error *err);
	int (*pipeline_get)(void *fault, const char *pipeline, struct ezp_faults *out,
			    struct ezp_error *err);
	/*
	 * A session's own faults, which replace its pipeline's for it; @f NULL
	 * clears them (the pipeline's apply again). EZP_ERR_NOT_FOUND for an
	 * unknown session or one whose pipeline has no fault stage.
	 */
	int (*session_set)(void *fault, uint64_t session_id, const struct ezp_faults *f,
			   struct ezp_error *err);
	/* *@own: 1 when the session has faults of its own, else @out is its pipeline's. */
	int (*session_get)(void *fault, uint64_t session_id, struct ezp_faults *out, int *own,
			   struct ezp_error *err);
	void *fault;
};

/* ---- ezp.capture (the capture plugin) -------------------------------------- */

#define EZP_CAPTURE_IFACE "ezp.capture"
#define EZP_CAPTURE_VERSION 1

struct ezp_capture_stream;

/*
 * Bytes of a live pcapng stream: the section header and interface blocks
 * first, then one call per block. Return 0 to go on, nonzero to stop (the
 * stream then ends as by stream_close, from inside this call). Thread: the
 * service loop. @data is borrowed for the call.
 * A call with @data NULL and @len 0 says the stream ended by itself (its
 * session closed, the capture service is stopping): it is then over as by
 * stream_close, and the stream must not be used again.
 */
typedef int (*ezp_capture_write_fn)(void *userdata, const void *data, size_t len);

struct ezp_capture {
	size_t struct_size;
	/*
	 * Start a live capture of @pipeline (NULL: every pipeline) and
	 * @session_id (0: every session). EZP_ERR_NOT_FOUND for an unknown
	 * pipeline or session. Packets the stream could not keep up with are
	 * counted and said in a comment block. Thread: the service loop.
	 */
	int (*stream_open)(void *capture, const char *pipeline, uint64_t session_id,
			   ezp_capture_write_fn write, void *userdata,
			   struct ezp_capture_stream **out, struct ezp_error *err);
	/* After it returns, write is not called again. Thread: the service loop. */
	void (*stream_close)(struct ezp_capture_stream *st);
	void *capture;
};

#ifdef __cplusplus
}
#endif
#endif /* EZPROXY_SERVICES_H */
