/*
 * config.c - read the daemon's YAML config (libyaml document API) into a
 * struct ezp__config: the new form of DESIGN.md section 5, kind items
 * checked against the plugins' parameter tables, and loading files. YAML
 * helpers and kind items are in config_yaml.c, the old program's form in
 * config_legacy.c. Thread: control.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config_priv.h"

#define DEFAULT_CONFIG(THROUGH)                                                        \
	"Workers: auto\n"                                                               \
	"Api:\n"                                                                        \
	"  Listen: 127.0.0.1:8080\n"                                                    \
	"  Auth: true\n"                                                                \
	"Logging:\n"                                                                    \
	"  Level: info\n"                                                               \
	"  Format: text\n"                                                              \
	"Pipelines:\n"                                                                  \
	"  - Name: default\n"                                                           \
	"    From: { tcp: { Listen: 127.0.0.1:5554 } }\n"                               \
	"    Through: [ " THROUGH " ]\n"                                                \
	"    To: { tcp: { Connect: 127.0.0.1:5555 } }\n"                                \
	"  - Name: default-udp\n"                                                       \
	"    From: { udp: { Listen: 127.0.0.1:5554 } }\n"                               \
	"    Through: [ " THROUGH " ]\n"                                                \
	"    To: { udp: { Connect: 127.0.0.1:5555 } }\n"

const char ezp__default_config[] = DEFAULT_CONFIG("{ remote: {} }");
/* With a plugin providing the fault filter: a (dormant) fault stage after remote. */
static const char default_config_fault[] = DEFAULT_CONFIG("{ remote: {} }, { fault: {} }");

const char *ezp__default_config_for(const struct ezp__kind_lookup *lookup)
{
	if (lookup && lookup->filter && lookup->filter(lookup->arg, "fault"))
		return default_config_fault;
	return ezp__default_config;
}

/* ---- the new form ------------------------------------------------------------ */

static int name_ok(const char *s, size_t len)
{
	if (len < 1 || len > 64 || strlen(s) != len)
		return 0;
	for (size_t i = 0; i < len; i++) {
		char ch = s[i];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' || ch == '-'))
			return 0;
	}
	return 1;
}

int ezp__limits_parse(struct ezp__pctx *c, yaml_node_t *node, const char *path,
		      struct ezp__limits *limits)
{
	const char *keys[EZP__N_LIMITS];
	yaml_node_t *vals[EZP__N_LIMITS], *kn[EZP__N_LIMITS];
	char what[EZP__PATH_MAX + 32];
	int rc;

	for (int i = 0; i < EZP__N_LIMITS; i++)
		keys[i] = ezp__limit_defs[i].key;
	if ((rc = ezp__map_keys(c, node, path, keys, EZP__N_LIMITS, vals, kn)))
		return rc;
	for (int i = 0; i < EZP__N_LIMITS; i++) {
		const struct ezp__limit_def *d = &ezp__limit_defs[i];
		struct ezp__pval v = ezp__pval_of(vals[i]);
		int64_t n;
		if (!v.present)
			continue;
		snprintf(what, sizeof(what), "%s.%s", path, d->key);
		if ((rc = ezp__conv_int(c, &v, what, d->min, d->max, &n)))
			return rc;
		memcpy((char *)limits + d->offset, &n, sizeof(n));
	}
	return EZP_OK;
}

static const char *const pipe_keys[] = {"Name", "From", "Through", "To", "Shared", "Limits"};

static int need_key(struct ezp__pctx *c, const struct ezp__pipeline_conf *p, yaml_node_t **vals,
		    yaml_node_t **kn, int i, const char *path)
{
	if (!ezp__node_null(vals[i]))
		return EZP_OK;
	return ezp__perr(c, kn[i] ? EZP__LINE(kn[i]) : p->line, kn[i] ? EZP__COL(kn[i]) : p->column,
			 "missing required key '%s' in %s", pipe_keys[i], path);
}

/* Parse one pipeline item; @path names it in messages ("Pipelines[2]", "pipeline"). */
static int parse_pipeline(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node,
			  const char *path, struct ezp__pipeline_conf *p)
{
	yaml_node_t *vals[6], *kn[6];
	char sub[EZP__PATH_MAX + 32], show[80];
	struct ezp__pval v;
	int rc;

	p->line = EZP__LINE(node);
	p->column = EZP__COL(node);
	p->limits = cfg->limits;
	if (!node || node->type != YAML_MAPPING_NODE)
		return ezp__perr(c, p->line, p->column,
				 "%s: expected a map with Name, From "
				 "and To, found %s",
				 path, ezp__node_found(node));
	if ((rc = ezp__map_keys(c, node, path, pipe_keys, 6, vals, kn)))
		return rc;
	if ((rc = need_key(c, p, vals, kn, 0, path)))
		return rc;
	v = ezp__pval_of(vals[0]);
	snprintf(sub, sizeof(sub), "%s.Name", path);
	if ((rc = ezp__conv_string(c, &v, sub, &p->name)))
		return rc;
	if (!name_ok(v.text, v.len))
		return ezp__perr(c, v.line, v.column,
				 "%s: '%s' is not a valid pipeline name "
				 "(use 1 to 64 of A-Z a-z 0-9 _ . -)",
				 sub, ezp__show(show, sizeof(show), v.text, v.len));
	snprintf(sub, sizeof(sub), "%s.From", path);
	if ((rc = need_key(c, p, vals, kn, 1, path)) ||
	    (rc = ezp__kind_item(c, vals[1], EZP__ROLE_LISTEN, sub, &p->from)))
		return rc;
	if (!ezp__node_null(vals[2])) {
		yaml_node_t *t = vals[2];
		size_t n;
		if (t->type != YAML_SEQUENCE_NODE)
			return ezp__perr(c, EZP__LINE(t), EZP__COL(t),
					 "%s.Through: expected a list "
					 "of filters (- lua: {...}), found %s",
					 path, ezp__node_found(t));
		n = (size_t)(t->data.sequence.items.top - t->data.sequence.items.start);
		if (n > c->budget)
			return ezp__perr(c, EZP__LINE(t), EZP__COL(t),
					 "%s.Through: too many "
					 "filters through '*' aliases",
					 path);
		if (n && !(p->through = calloc(n, sizeof(*p->through))))
			return ezp__perr_nomem(c);
		for (size_t i = 0; i < n; i++) {
			snprintf(sub, sizeof(sub), "%s.Through[%zu]", path, i);
			rc = ezp__kind_item(c, ezp__node(c, t->data.sequence.items.start[i]),
					    EZP__ROLE_FILTER, sub, &p->through[i]);
			if (rc)
				return rc;
			p->n_through++;
		}
	}
	snprintf(sub, sizeof(sub), "%s.To", path);
	if ((rc = need_key(c, p, vals, kn, 3, path)) ||
	    (rc = ezp__kind_item(c, vals[3], EZP__ROLE_CONNECT, sub, &p->to)))
		return rc;
	v = ezp__pval_of(vals[4]);
	snprintf(sub, sizeof(sub), "%s.Shared", path);
	if (v.present && (rc = ezp__conv_bool(c, &v, sub, &p->shared)))
		return rc;
	snprintf(sub, sizeof(sub), "%s.Limits", path);
	return ezp__limits_parse(c, vals[5], sub, &p->limits);
}

struct name_ix {
	const char *name;
	size_t ix;
};

static int name_cmp(const void *a, const void *b)
{
	const struct name_ix *x = a, *y = b;
	int r = strcmp(x->name, y->name);

	return r ? r : (x->ix < y->ix ? -1 : x->ix > y->ix);
}

/* Duplicate names: report the earliest pipeline that reuses a name. */
static int check_names(struct ezp__pctx *c, const struct ezp__config *cfg)
{
	struct name_ix *v;
	size_t dup = SIZE_MAX, first = 0;

	if (cfg->n_pipelines < 2)
		return EZP_OK;
	if (!(v = calloc(cfg->n_pipelines, sizeof(*v))))
		return ezp__perr_nomem(c);
	for (size_t i = 0; i < cfg->n_pipelines; i++) {
		v[i].name = cfg->pipelines[i].name;
		v[i].ix = i;
	}
	qsort(v, cfg->n_pipelines, sizeof(*v), name_cmp);
	for (size_t i = 1; i < cfg->n_pipelines; i++) {
		if (!strcmp(v[i].name, v[i - 1].name) && v[i].ix < dup) {
			dup = v[i].ix;
			for (first = i - 1; first > 0 && !strcmp(v[first - 1].name, v[i].name);)
				first--;
			first = v[first].ix;
		}
	}
	free(v);
	if (dup == SIZE_MAX)
		return EZP_OK;
	return ezp__perr(c, cfg->pipelines[dup].line, cfg->pipelines[dup].column,
			 "duplicate pipeline name '%s' in Pipelines[%zu] (already used by "
			 "Pipelines[%zu]); names must be unique",
			 cfg->pipelines[dup].name, dup, first);
}

int ezp__call_plugin_paths(struct ezp__pctx *c, struct ezp__config *cfg, const yaml_node_t *at)
{
	const struct ezp__kind_lookup *l = c->lookup;
	int rc;

	if (!l || !l->plugin_paths)
		return EZP_OK;
	if (c->err)
		memset(c->err, 0, sizeof(*c->err));
	rc = l->plugin_paths(l->arg, cfg->plugin_paths, cfg->n_plugin_paths, c->err);
	if (rc == EZP_OK)
		return EZP_OK;
	if (rc > 0)
		rc = EZP_ERR_PLUGIN;
	if (c->err) {
		c->err->code = rc;
		if (!c->err->message[0])
			snprintf(c->err->message, sizeof(c->err->message),
				 "loading plugins from Plugins.Path failed");
		if (!c->err->file[0])
			snprintf(c->err->file, sizeof(c->err->file), "%s", c->file);
		if (!c->err->line && at) {
			c->err->line = EZP__LINE(at);
			c->err->column = EZP__COL(at);
		}
	}
	return rc;
}

static int parse_plugins(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node,
			 const yaml_node_t **at)
{
	static const char *const keys[] = {"Path"};
	yaml_node_t *val, *kn, *t;
	size_t n = 1;
	int rc;

	if ((rc = ezp__map_keys(c, node, "Plugins", keys, 1, &val, &kn)))
		return rc;
	if (kn)
		*at = val;
	if (ezp__node_null(val))
		return EZP_OK;
	if (val->type == YAML_MAPPING_NODE)
		return ezp__perr(
		    c, EZP__LINE(val), EZP__COL(val),
		    "Plugins.Path: expected a folder or a list of folders, found a map");
	if (val->type == YAML_SEQUENCE_NODE)
		n = (size_t)(val->data.sequence.items.top - val->data.sequence.items.start);
	if (n > c->budget)
		return ezp__perr(c, EZP__LINE(val), EZP__COL(val),
				 "Plugins.Path: too many folders through '*' aliases");
	if (n && !(cfg->plugin_paths = calloc(n, sizeof(char *))))
		return ezp__perr_nomem(c);
	for (size_t i = 0; i < n; i++) {
		char what[64];
		struct ezp__pval v;
		t = val->type == YAML_SEQUENCE_NODE
			? ezp__node(c, val->data.sequence.items.start[i])
			: val;
		v = ezp__pval_of(t);
		snprintf(what, sizeof(what), "Plugins.Path[%zu]", i);
		if (!v.present || (v.scalar && !v.len))
			return ezp__perr(c, EZP__LINE(t), EZP__COL(t),
					 "%s: expected a folder, found nothing", what);
		if ((rc = ezp__spend(c, t)) ||
		    (rc = ezp__conv_string(c, &v, what, &cfg->plugin_paths[i])))
			return rc;
		cfg->n_plugin_paths++;
	}
	return EZP_OK;
}

static int parse_api(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node)
{
	static const char *const keys[] = {"Enable", "Listen", "Auth", "Tls", "Origin"};
	static const char *const tls_keys[] = {"Cert", "Key"};
	yaml_node_t *vals[5], *kn[5], *tv[2], *tk[2];
	struct ezp__pval v;
	struct ezp_addr a;
	char buf[EZP_ADDR_STRLEN];
	int rc;

	if ((rc = ezp__map_keys(c, node, "Api", keys, 5, vals, kn)))
		return rc;
	v = ezp__pval_of(vals[0]);
	if (v.present && (rc = ezp__conv_bool(c, &v, "Api.Enable", &cfg->api.enabled)))
		return rc;
	v = ezp__pval_of(vals[1]);
	if (v.present) {
		if ((rc = ezp__conv_addr(c, &v, "Api.Listen", &a)))
			return rc;
		free(cfg->api.listen);
		if (!(cfg->api.listen = strdup(ezp__addr_format(&a, buf, sizeof(buf)))))
			return ezp__perr_nomem(c);
	}
	v = ezp__pval_of(vals[2]);
	if (v.present && (rc = ezp__conv_bool(c, &v, "Api.Auth", &cfg->api.auth)))
		return rc;
	if (!ezp__node_null(vals[3])) {
		if ((rc = ezp__map_keys(c, vals[3], "Api.Tls", tls_keys, 2, tv, tk)))
			return rc;
		for (int i = 0; i < 2; i++) {
			char what[32];
			char **dst = i ? &cfg->api.tls_key : &cfg->api.tls_cert;
			v = ezp__pval_of(tv[i]);
			snprintf(what, sizeof(what), "Api.Tls.%s", tls_keys[i]);
			if (!v.present || (v.scalar && !v.len))
				return ezp__perr(c, tk[i] ? EZP__LINE(tk[i]) : EZP__LINE(vals[3]),
						 tk[i] ? EZP__COL(tk[i]) : EZP__COL(vals[3]),
						 "missing required key '%s' in Api.Tls (give both "
						 "Cert and Key files)",
						 tls_keys[i]);
			if ((rc = ezp__conv_string(c, &v, what, dst)))
				return rc;
		}
	}
	v = ezp__pval_of(vals[4]);
	if (v.present && (rc = ezp__conv_string(c, &v, "Api.Origin", &cfg->api.origin)))
		return rc;
	return EZP_OK;
}

static int parse_logging(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node)
{
	static const char *const keys[] = {"Level", "Format"};
	static const char *const formats[] = {"text", "json"};
	yaml_node_t *vals[2], *kn[2];
	struct ezp__pval v;
	int rc;

	if ((rc = ezp__map_keys(c, node, "Logging", keys, 2, vals, kn)))
		return rc;
	v = ezp__pval_of(vals[0]);
	if (v.present && (rc = ezp__conv_word(c, &v, "Logging.Level", ezp__log_levels, 4,
					      "debug, info, warn or error", &cfg->log_level)))
		return rc;
	v = ezp__pval_of(vals[1]);
	if (v.present && (rc = ezp__conv_word(c, &v, "Logging.Format", formats, 2, "text or json",
					      &cfg->log_format)))
		return rc;
	return EZP_OK;
}

static int parse_workers(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node)
{
	struct ezp__pval v = ezp__pval_of(node);
	char show[80];
	int64_t n;

	if (!v.present)
		return EZP_OK;
	if (v.scalar && !strcasecmp(v.text, "auto")) {
		cfg->workers = 0;
		return EZP_OK;
	}
	if (v.scalar && strlen(v.text) == v.len && *v.text &&
	    strspn(v.text + (*v.text == '-' || *v.text == '+'), "0123456789") !=
		strlen(v.text + (*v.text == '-' || *v.text == '+')))
		return ezp__perr(c, v.line, v.column,
				 "Workers: '%s' is not a number "
				 "(use auto or 1..256)",
				 ezp__show(show, sizeof(show), v.text, v.len));
	if (ezp__conv_int(c, &v, "Workers", 1, 256, &n))
		return EZP_ERR_CONFIG;
	cfg->workers = n;
	return EZP_OK;
}

void ezp__config_defaults(struct ezp__config *cfg)
{
	cfg->log_level = EZP_LOG_INFO;
	cfg->log_format = EZP__LOG_TEXT;
	cfg->api.auth = 1;
	for (int i = 0; i < EZP__N_LIMITS; i++)
		memcpy((char *)&cfg->limits + ezp__limit_defs[i].offset, &ezp__limit_defs[i].def,
		       sizeof(int64_t));
}

static int parse_new(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *root)
{
	static const char *const keys[] = {"Workers", "StateDir", "Plugins",  "Api",
					   "Logging", "Limits",	  "Pipelines"};
	yaml_node_t *vals[7], *kn[7], *pl;
	const yaml_node_t *paths_at;
	struct ezp__pval v;
	size_t n;
	int rc;

	if ((rc = ezp__map_keys(c, root, "", keys, 7, vals, kn)))
		return rc;
	if ((rc = parse_workers(c, cfg, vals[0])))
		return rc;
	v = ezp__pval_of(vals[1]);
	if (v.present) {
		if ((rc = ezp__conv_string(c, &v, "StateDir", &cfg->state_dir)))
			return rc;
		if (!*cfg->state_dir)
			return ezp__perr(c, v.line, v.column,
					 "StateDir: must not be empty "
					 "(leave it out for the default)");
	}
	/* Plugins first: their kinds must be known before pipelines are read. */
	paths_at = kn[2];
	if ((rc = parse_plugins(c, cfg, vals[2], &paths_at)) ||
	    (rc = ezp__call_plugin_paths(c, cfg, paths_at)))
		return rc;
	cfg->api.enabled = kn[3] != NULL;
	if (!(cfg->api.listen = strdup("127.0.0.1:8080")))
		return ezp__perr_nomem(c);
	if ((rc = parse_api(c, cfg, vals[3])) || (rc = parse_logging(c, cfg, vals[4])) ||
	    (rc = ezp__limits_parse(c, vals[5], "Limits", &cfg->limits)))
		return rc;
	pl = vals[6];
	if (ezp__node_null(pl))
		return EZP_OK;
	if (pl->type != YAML_SEQUENCE_NODE)
		return ezp__perr(c, EZP__LINE(pl), EZP__COL(pl),
				 "Pipelines: expected a list "
				 "(- Name: ...), found %s",
				 ezp__node_found(pl));
	n = (size_t)(pl->data.sequence.items.top - pl->data.sequence.items.start);
	if (n > c->budget)
		return ezp__perr(c, EZP__LINE(pl), EZP__COL(pl),
				 "Pipelines: too many pipelines through '*' aliases");
	if (n && !(cfg->pipelines = calloc(n, sizeof(*cfg->pipelines))))
		return ezp__perr_nomem(c);
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = ezp__node(c, pl->data.sequence.items.start[i]);
		char path[EZP__PATH_MAX];
		snprintf(path, sizeof(path), "Pipelines[%zu]", i);
		cfg->n_pipelines++;
		if ((rc = ezp__spend(c, item)) ||
		    (rc = parse_pipeline(c, cfg, item, path, &cfg->pipelines[i])))
			return rc;
	}
	return check_names(c, cfg);
}

/* ---- entry points ----------------------------------------------------------- */

int ezp__config_parse(const char *text, size_t len, const char *file,
		      const struct ezp__kind_lookup *lookup, struct ezp__config **out,
		      struct ezp_error *err)
{
	struct ezp__pctx c;
	struct ezp__config *cfg = NULL;
	yaml_document_t doc;
	yaml_node_t *root;
	int rc;

	memset(&c, 0, sizeof(c));
	c.file = file ? file : "<string>";
	c.err = err;
	c.lookup = lookup;
	c.doc = &doc;
	if (!out)
		return ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_INTERNAL, NULL, 0, 0,
				      "ezp__config_parse: no output");
	if ((rc = ezp__doc_load(&c, text, len, &doc)))
		return rc;
	c.budget = (size_t)(doc.nodes.top - doc.nodes.start) + 16;
	root = yaml_document_get_root_node(&doc);
	if (!(cfg = calloc(1, sizeof(*cfg))) || !(cfg->file = strdup(c.file))) {
		rc = ezp__perr_nomem(&c);
		goto out;
	}
	ezp__config_defaults(cfg);
	if (!ezp__node_null(root) && root->type != YAML_MAPPING_NODE)
		rc = ezp__perr(&c, EZP__LINE(root), EZP__COL(root),
			       "the config must be a map of "
			       "keys (e.g. Pipelines: ...), found %s",
			       ezp__node_found(root));
	else if (ezp__legacy_detect(&c, root))
		rc = ezp__legacy_parse(&c, cfg, root);
	else
		rc = parse_new(&c, cfg, root);
out:
	yaml_document_delete(&doc);
	if (rc) {
		ezp__config_free(cfg);
		return rc;
	}
	*out = cfg;
	return EZP_OK;
}

int ezp__config_load(const char *path, const struct ezp__kind_lookup *lookup,
		     struct ezp__config **out, struct ezp_error *err)
{
	size_t cap = 64 * 1024, len = 0, n;
	char *buf = NULL, *nb;
	FILE *f;
	int rc;

	if (!path)
		return ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_CONFIG, NULL, 0, 0,
				      "no config file given");
	if (!(f = fopen(path, "rb")))
		return ezp__error_set(err, EZP_ERR_IO, EZP_SIDE_CONFIG, path, 0, 0,
				      "cannot read config '%s': %s", path, strerror(errno));
	for (;;) {
		if (!(nb = realloc(buf, cap + 1))) {
			rc = ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, path, 0, 0,
					    "out of memory while reading config '%s'", path);
			goto out;
		}
		buf = nb;
		n = fread(buf + len, 1, cap - len, f);
		len += n;
		if (len < cap)
			break;
		if (len > EZP__CONFIG_MAX_BYTES) {
			rc = ezp__error_set(err, EZP_ERR_CONFIG, EZP_SIDE_CONFIG, path, 0, 0,
					    "config '%s' is larger than 4 MiB; it cannot be right",
					    path);
			goto out;
		}
		cap = cap * 2 > EZP__CONFIG_MAX_BYTES ? EZP__CONFIG_MAX_BYTES + 1 : cap * 2;
	}
	if (ferror(f)) {
		rc = ezp__error_set(err, EZP_ERR_IO, EZP_SIDE_CONFIG, path, 0, 0,
				    "cannot read config '%s': %s", path, strerror(errno));
		goto out;
	}
	buf[len] = '\0';
	rc = ezp__config_parse(buf, len, path, lookup, out, err);
out:
	fclose(f);
	free(buf);
	return rc;
}

static void pipeline_clear(struct ezp__pipeline_conf *p)
{
	free(p->name);
	ezp__kind_conf_clear(&p->from);
	ezp__kind_conf_clear(&p->to);
	for (size_t i = 0; i < p->n_through; i++)
		ezp__kind_conf_clear(&p->through[i]);
	free(p->through);
}

void ezp__config_free(struct ezp__config *cfg)
{
	if (!cfg)
		return;
	for (size_t i = 0; i < cfg->n_pipelines; i++)
		pipeline_clear(&cfg->pipelines[i]);
	free(cfg->pipelines);
	for (size_t i = 0; i < cfg->n_plugin_paths; i++)
		free(cfg->plugin_paths[i]);
	free(cfg->plugin_paths);
	free(cfg->file);
	free(cfg->state_dir);
	free(cfg->api.listen);
	free(cfg->api.tls_cert);
	free(cfg->api.tls_key);
	free(cfg->api.origin);
	free(cfg->lua.path);
	free(cfg->lua.mode);
	free(cfg);
}

/* ---- one pipeline at a time (the API's create, change and delete) ---- */

int ezp__config_put_pipeline(struct ezp__config *cfg, const char *name, const char *text,
			     const char *file, const struct ezp__kind_lookup *lookup, int *created,
			     struct ezp_error *err)
{
	struct ezp__pipeline_conf item, *v;
	struct ezp__pctx c;
	yaml_document_t doc;
	yaml_node_t *root;
	size_t at = cfg->n_pipelines;
	int rc, is_new;

	memset(&c, 0, sizeof(c));
	memset(&item, 0, sizeof(item));
	c.file = file ? file : "<string>";
	c.err = err;
	c.lookup = lookup;
	c.doc = &doc;
	if ((rc = ezp__doc_load(&c, text, strlen(text), &doc)))
		return rc;
	c.budget = (size_t)(doc.nodes.top - doc.nodes.start) + 16;
	root = yaml_document_get_root_node(&doc);
	rc = parse_pipeline(&c, cfg, root, "pipeline", &item);
	yaml_document_delete(&doc);
	if (rc == EZP_OK && strcmp(item.name, name))
		rc = ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_CLIENT, c.file, item.line,
				    item.column, "pipeline.Name: '%s' does not match the pipeline "
				    "'%s' being written", item.name, name);
	if (rc != EZP_OK) {
		pipeline_clear(&item);
		return rc;
	}
	for (size_t i = 0; i < cfg->n_pipelines; i++)
		if (!strcmp(cfg->pipelines[i].name, name))
			at = i;
	is_new = at == cfg->n_pipelines;
	if (is_new) {
		v = realloc(cfg->pipelines, (cfg->n_pipelines + 1) * sizeof(*v));
		if (!v) {
			pipeline_clear(&item);
			return ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0,
					      "out of memory");
		}
		cfg->pipelines = v;
		cfg->n_pipelines++;
	} else {
		pipeline_clear(&cfg->pipelines[at]);
	}
	cfg->pipelines[at] = item;
	*created = is_new;
	return EZP_OK;
}

struct ezp__pipeline_conf *ezp__config_find(const struct ezp__config *cfg, const char *name)
{
	for (size_t i = 0; cfg && name && i < cfg->n_pipelines; i++)
		if (!strcmp(cfg->pipelines[i].name, name))
			return &cfg->pipelines[i];
	return NULL;
}

int ezp__config_del_pipeline(struct ezp__config *cfg, const char *name)
{
	for (size_t i = 0; i < cfg->n_pipelines; i++) {
		if (strcmp(cfg->pipelines[i].name, name))
			continue;
		pipeline_clear(&cfg->pipelines[i]);
		memmove(&cfg->pipelines[i], &cfg->pipelines[i + 1],
			(cfg->n_pipelines - i - 1) * sizeof(*cfg->pipelines));
		cfg->n_pipelines--;
		return EZP_OK;
	}
	return EZP_ERR_NOT_FOUND;
}
