/*
 * config_priv.h - what config.c, config_params.c and config_dump.c share:
 * the parse context, one parameter value as given, the value converters
 * and the common filter (hold) keys. Not for the rest of the core.
 * Thread: control (the converters touch only their arguments).
 */
#ifndef EZP_CORE_CONFIG_PRIV_H
#define EZP_CORE_CONFIG_PRIV_H

#include <yaml.h>

#include "config.h"

#define EZP__CONFIG_MAX_BYTES (4u * 1024u * 1024u) /* larger config texts are refused */
#define EZP__PATH_MAX 256			   /* key paths in messages */
#define EZP__MAX_PARAMS 1024			   /* longer tables are a plugin bug */

/* What is being read: positions and errors go through here. */
struct ezp__pctx {
	const char *file;
	struct ezp_error *err;
	const struct ezp__kind_lookup *lookup;
	yaml_document_t *doc;
	size_t budget; /* items (pipelines, kinds, paths) left before aliases count as abuse */
};

/* One value as given in YAML (or made up for the old form, or a default). */
struct ezp__pval {
	int present;	  /* 0: the key was not given (or was null) */
	int scalar;	  /* 1: text/len hold the scalar */
	const char *text; /* NUL-terminated; len may be shorter if it holds a NUL */
	size_t len;
	const char *found; /* when !scalar: "a map" or "a list" */
	int line, column;  /* 1-based; 0 for defaults */
};

/* Fills c->err with EZP_ERR_CONFIG at line/column. Returns EZP_ERR_CONFIG. */
int ezp__perr(struct ezp__pctx *c, int line, int column, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int ezp__perr_nomem(struct ezp__pctx *c);

/* Printable, bounded copy of user text for messages; returns @buf. */
const char *ezp__show(char *buf, size_t size, const char *s, size_t len);

/*
 * Converters. @what is the key path named in messages. Each checks the
 * value is a scalar of the right shape and writes *@out only on success.
 * min < max enables the range check of the integer converters.
 */
int ezp__conv_string(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, char **out);
int ezp__conv_int(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, int64_t min,
		  int64_t max, int64_t *out);
int ezp__conv_bool(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, int *out);
int ezp__conv_double(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, double *out);
int ezp__conv_addr(struct ezp__pctx *c, const struct ezp__pval *v, const char *what,
		   struct ezp_addr *out);
/* One of @words (case-insensitive); *@out is its index. @hint e.g. "debug, info, warn or error". */
int ezp__conv_word(struct ezp__pctx *c, const struct ezp__pval *v, const char *what,
		   const char *const *words, size_t n, const char *hint, int *out);

/* Bytes a parameter of @type takes in a config struct; 0 for an unknown type. */
size_t ezp__param_size(int type);
/* Number of entries in a NULL-keyed table (0 for NULL); > EZP__MAX_PARAMS means broken. */
size_t ezp__params_count(const struct ezp_param *params);

/*
 * Fill @config (zeroed, @config_size bytes; SIZE_MAX = unchecked) from
 * @vals (one per table entry, or NULL for none): given values, else
 * defaults, else zero; missing required keys fail naming @path. On
 * failure the strings it set are freed again.
 */
int ezp__params_fill(struct ezp__pctx *c, const char *kind, const struct ezp_param *params,
		     size_t config_size, void *config, const struct ezp__pval *vals,
		     const char *path, int line, int column);

/* The keys every filter item accepts beside its own: HoldWindow, HoldTimeoutMs, Default, AllLegs.
 */
#define EZP__N_HOLD_KEYS 4
extern const char *const ezp__hold_keys[EZP__N_HOLD_KEYS];
void ezp__hold_defaults(struct ezp__hold_conf *hold);
int ezp__hold_fill(struct ezp__pctx *c, const struct ezp__pval *vals, const char *path,
		   const struct ezp_filter_kind *kind, struct ezp__hold_conf *hold);

/* The Limits keys, their bounds and defaults. */
#define EZP__N_LIMITS 5
struct ezp__limit_def {
	const char *key;
	size_t offset; /* in struct ezp__limits */
	int64_t min, max, def;
};
extern const struct ezp__limit_def ezp__limit_defs[EZP__N_LIMITS];

extern const char *const ezp__log_levels[4]; /* by enum ezp_log_level */

/* ---- YAML helpers (config.c) ---- */

#define EZP__LINE(n) ((n) ? (int)(n)->start_mark.line + 1 : 0)
#define EZP__COL(n) ((n) ? (int)(n)->start_mark.column + 1 : 0)

/* What a kind item is read for. */
enum { EZP__ROLE_CONNECT = 0, EZP__ROLE_FILTER = 1, EZP__ROLE_LISTEN = 2 };

yaml_node_t *ezp__node(struct ezp__pctx *c, int index);
int ezp__node_null(const yaml_node_t *n);	     /* absent, ~, null or empty */
const char *ezp__node_found(const yaml_node_t *n);   /* "a map", "a list", ... */
struct ezp__pval ezp__pval_of(const yaml_node_t *n); /* null -> not present */
const char *ezp__where(const char *path);	     /* "" -> "the top level" */
int ezp__spend(struct ezp__pctx *c, const yaml_node_t *n);
/* Load one YAML document; syntax errors and a second document fail. */
int ezp__doc_load(struct ezp__pctx *c, const char *text, size_t len, yaml_document_t *doc);
/*
 * Check @map's keys against @keys (unknown and duplicate keys fail);
 * vals[i]/knodes[i] get the value and key node of keys[i], or NULL.
 */
int ezp__map_keys(struct ezp__pctx *c, const yaml_node_t *map, const char *path,
		  const char *const *keys, size_t n, yaml_node_t **vals, yaml_node_t **knodes);
int ezp__limits_parse(struct ezp__pctx *c, yaml_node_t *node, const char *path,
		      struct ezp__limits *limits);
void ezp__config_defaults(struct ezp__config *cfg);
int ezp__call_plugin_paths(struct ezp__pctx *c, struct ezp__config *cfg, const yaml_node_t *at);
/* Look @name up for @role and set up @kc (kind, table, zeroed config). */
int ezp__kind_resolve(struct ezp__pctx *c, const char *name, int role, const char *path, int line,
		      int column, struct ezp__kind_conf *kc);
/* Fill a resolved @kc from @vals (per table entry) and @hold_vals (filters; NULL = defaults). */
int ezp__kind_fill(struct ezp__pctx *c, struct ezp__kind_conf *kc, const struct ezp__pval *vals,
		   const struct ezp__pval *hold_vals, const char *path);
/* One `{ kind: { ... } }` item at @path. */
int ezp__kind_item(struct ezp__pctx *c, yaml_node_t *item, int role, const char *path,
		   struct ezp__kind_conf *out);

/* ---- the old program's form (config_legacy.c) ---- */

int ezp__legacy_detect(struct ezp__pctx *c, const yaml_node_t *root);
int ezp__legacy_parse(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *root);

#endif
