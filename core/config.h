/*
 * config.h - the daemon's configuration: YAML (libyaml document API) to
 * structs, validated against the parameter tables of the kinds that plugins
 * provide. Thread: control only. A config is immutable once loaded; a
 * reload builds a new one beside the old.
 */
#ifndef EZP_CORE_CONFIG_H
#define EZP_CORE_CONFIG_H

#include <ezproxy/sdk.h>
#include <stddef.h>
#include <stdint.h>

/* Resolves kinds while a config is parsed (the plugin registry answers). */
struct ezp__kind_lookup {
	void *arg;
	/* Return the kind or NULL. On NULL the parser reports "unknown transport 'x'". */
	const struct ezp_transport_kind *(*transport)(void *arg, const char *name);
	const struct ezp_filter_kind *(*filter)(void *arg, const char *name);
	/*
	 * Called once, after the top-level Plugins.Path list is read and
	 * before any pipeline is resolved, so the registry can load plugins
	 * from those folders. Return EZP_OK or fill @err.
	 */
	int (*plugin_paths)(void *arg, char *const *paths, size_t n, struct ezp_error *err);
};

/* Limits of DESIGN.md section 3: top-level `Limits:` and per pipeline `Limits:`. */
struct ezp__limits {
	int64_t max_sessions;     /* MaxSessions, per pipeline, default 10000 */
	int64_t max_client_legs;  /* MaxClientLegs, per session, default 8 */
	int64_t max_inject_bytes; /* MaxInjectBytes, default 1048576 */
	int64_t tap_buffer;       /* TapBuffer, events per tap per worker, default 4096 */
	int64_t max_packet;       /* MaxPacket, largest read from a stream leg, default 65536 */
};

/* Common keys every filter accepts, beside its own parameters. */
struct ezp__hold_conf {
	int64_t window;      /* HoldWindow, packets held in flight per direction, default 64 (1..65536) */
	int64_t timeout_ms;  /* HoldTimeoutMs, default 5000 */
	int default_drop;    /* Default: pass|drop, default pass */
	int all_legs;        /* AllLegs: bool, default false */
};

/* One `{ kind: { Key: value, ... } }` item. */
struct ezp__kind_conf {
	char *kind;                       /* "tcp", "lua", ... */
	const struct ezp_param *params;   /* the kind's table (NULL for none) */
	size_t config_size;
	void *config;                     /* config_size bytes filled from params */
	struct ezp__hold_conf hold;       /* filters only */
	const struct ezp_transport_kind *transport; /* From/To */
	const struct ezp_filter_kind *filter;       /* Through */
	int line, column;                 /* where the kind name stands */
};

struct ezp__pipeline_conf {
	char *name;
	struct ezp__kind_conf from;
	struct ezp__kind_conf to;
	struct ezp__kind_conf *through;
	size_t n_through;
	int shared;                 /* Shared: bool */
	struct ezp__limits limits;  /* top-level Limits merged with the pipeline's */
	int line, column;
};

struct ezp__api_conf {
	int enabled;         /* Api present and not Enable: false */
	char *listen;        /* "127.0.0.1:8080" */
	int auth;            /* default true */
	char *tls_cert, *tls_key; /* NULL = plain HTTP */
	char *origin;        /* extra allowed Origin for WebSocket upgrades, NULL = none */
};

struct ezp__lua_conf {       /* the old program's `Lua:` section */
	int enabled;
	char *path;
	char *mode;          /* "main" or "callback" */
};

enum ezp__log_format { EZP__LOG_TEXT = 0, EZP__LOG_JSON = 1 };

struct ezp__config {
	char *file;          /* where it came from ("<builtin>", "<string>") */
	int legacy;          /* 1 when the old program's form was read */
	int64_t workers;     /* Workers: N or auto (0) */
	char *state_dir;     /* NULL = default */
	char **plugin_paths; /* Plugins.Path */
	size_t n_plugin_paths;
	int log_level;       /* enum ezp_log_level */
	int log_format;      /* enum ezp__log_format */
	struct ezp__api_conf api;
	struct ezp__lua_conf lua;  /* legacy only; turned into `lua` filters too */
	struct ezp__limits limits; /* top-level defaults */
	struct ezp__pipeline_conf *pipelines;
	size_t n_pipelines;
};

/* The built-in default config text (DESIGN.md section 5). */
extern const char ezp__default_config[];
/* The default for @lookup's plugins: with a `fault` stage when a plugin provides the kind. */
const char *ezp__default_config_for(const struct ezp__kind_lookup *lookup);

/*
 * ezp__config_parse - parse and validate YAML @text (from @file, for error
 * positions) into *@out. Unknown or duplicate keys, wrong types, unknown
 * kinds, duplicate pipeline names and out-of-range values fail with
 * @err->file/line/column and a message naming the key. The old program's
 * form is recognised by its top-level keys. Outputs written only on success.
 */
int ezp__config_parse(const char *text, size_t len, const char *file,
		      const struct ezp__kind_lookup *lookup, struct ezp__config **out,
		      struct ezp_error *err);
/* Read @path and parse it. */
int ezp__config_load(const char *path, const struct ezp__kind_lookup *lookup,
		     struct ezp__config **out, struct ezp_error *err);
void ezp__config_free(struct ezp__config *cfg);
/*
 * Create or replace pipeline @name in @cfg from @text, one YAML mapping in
 * the form of a Pipelines item (its Name must be @name). Errors give
 * positions in @text (as @file). *@created: 1 when the name was new.
 */
int ezp__config_put_pipeline(struct ezp__config *cfg, const char *name, const char *text,
			     const char *file, const struct ezp__kind_lookup *lookup, int *created,
			     struct ezp_error *err);
/* Pipeline @name of @cfg, or NULL (@cfg and @name may be NULL). */
struct ezp__pipeline_conf *ezp__config_find(const struct ezp__config *cfg, const char *name);
/* Remove pipeline @name from @cfg; EZP_ERR_NOT_FOUND when absent. */
int ezp__config_del_pipeline(struct ezp__config *cfg, const char *name);
/* One pipeline as YAML (a mapping, every default written out), malloc'd. */
char *ezp__pipeline_dump(const struct ezp__pipeline_conf *p);

/*
 * Parse one standalone kind item (e.g. the YAML text "{ tcp: { Connect: 1.2.3.4:5 } }"
 * or "tcp: {Connect: ...}") against a transport (@is_filter = 0) or
 * filter (@is_filter = 1) kind. Used by live changes.
 */
int ezp__kind_conf_parse(const char *text, int is_filter, const struct ezp__kind_lookup *lookup,
			 struct ezp__kind_conf *out, struct ezp_error *err);
/* Values for @is_filter above (0 and 1 keep their meaning). */
#define EZP__KIND_CONNECT 0 /* a transport's To (connect_params) */
#define EZP__KIND_FILTER 1  /* a filter (params + hold keys) */
#define EZP__KIND_LISTEN 2  /* a transport's From (listen_params) */
void ezp__kind_conf_clear(struct ezp__kind_conf *kc);
/*
 * Parse a YAML list of filter items ("[]", "- callback: {Name: x}", ...)
 * into a malloc'd array (like a pipeline's Through). Used by live changes.
 */
int ezp__through_parse(const char *text, const struct ezp__kind_lookup *lookup,
		       struct ezp__kind_conf **out, size_t *n, struct ezp_error *err);
/* Deep copy (strings duplicated). */
int ezp__kind_conf_copy(struct ezp__kind_conf *dst, const struct ezp__kind_conf *src);
/* 1 when kind and every parameter value are equal. */
int ezp__kind_conf_equal(const struct ezp__kind_conf *a, const struct ezp__kind_conf *b);
int ezp__pipeline_conf_equal(const struct ezp__pipeline_conf *a,
			     const struct ezp__pipeline_conf *b);

/* Fill a kind's config struct with the table's defaults (used for kinds with no YAML). */
int ezp__params_defaults(const struct ezp_param *params, void *config, struct ezp_error *err);
/* Free strings a params table put in @config (not @config itself). */
void ezp__params_clear(const struct ezp_param *params, void *config);

/*
 * Write the resolved config as YAML in the new form (for `ezproxy check`
 * and the API's config read) into a malloc'd string. Every default is
 * written out.
 */
char *ezp__config_dump(const struct ezp__config *cfg);

/* Address helpers shared by the core (config.c owns them). Thread: any. */
int ezp__addr_parse(const char *text, struct ezp_addr *out, struct ezp_error *err);
const char *ezp__addr_format(const struct ezp_addr *addr, char *buf, size_t len);

/* Set @err: code, side, message (printf), position. Returns @code. */
int ezp__error_set(struct ezp_error *err, int code, int side, const char *file, int line,
		   int column, const char *fmt, ...) __attribute__((format(printf, 7, 8)));

#endif
