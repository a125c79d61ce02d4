/*
 * config.c - read the daemon's YAML config (libyaml document API) into a
 * struct ezp__config: the new form of DESIGN.md section 5, kind items
 * checked against the plugins' parameter tables, and loading files. The old
 * program's form is in config_legacy.c. Thread: control.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config_priv.h"

const char ezp__default_config[] =
	"Workers: auto\n"
	"Api:\n"
	"  Listen: 127.0.0.1:8080\n"
	"  Auth: true\n"
	"Logging:\n"
	"  Level: info\n"
	"  Format: text\n"
	"Pipelines:\n"
	"  - Name: default\n"
	"    From: { tcp: { Listen: 127.0.0.1:5554 } }\n"
	"    To: { tcp: { Connect: 127.0.0.1:5555 } }\n"
	"  - Name: default-udp\n"
	"    From: { udp: { Listen: 127.0.0.1:5554 } }\n"
	"    To: { udp: { Connect: 127.0.0.1:5555 } }\n";

/* ---- YAML nodes ------------------------------------------------------------ */

yaml_node_t *ezp__node(struct ezp__pctx *c, int index)
{
	return index ? yaml_document_get_node(c->doc, index) : NULL;
}

int ezp__node_null(const yaml_node_t *n)
{
	const char *s;

	if (!n)
		return 1;
	if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return 0;
	s = (const char *)n->data.scalar.value;
	if (strlen(s) != n->data.scalar.length)
		return 0;
	return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") ||
	       !strcmp(s, "NULL");
}

const char *ezp__node_found(const yaml_node_t *n)
{
	if (!n || ezp__node_null(n))
		return "nothing";
	switch (n->type) {
	case YAML_MAPPING_NODE: return "a map";
	case YAML_SEQUENCE_NODE: return "a list";
	default: return "a single value";
	}
}

struct ezp__pval ezp__pval_of(const yaml_node_t *n)
{
	struct ezp__pval v;

	memset(&v, 0, sizeof(v));
	if (ezp__node_null(n))
		return v;
	v.present = 1;
	v.line = EZP__LINE(n);
	v.column = EZP__COL(n);
	if (n->type == YAML_SCALAR_NODE) {
		v.scalar = 1;
		v.text = (const char *)n->data.scalar.value;
		v.len = n->data.scalar.length;
	} else {
		v.found = ezp__node_found(n);
	}
	return v;
}

const char *ezp__where(const char *path)
{
	return *path ? path : "the top level";
}

int ezp__spend(struct ezp__pctx *c, const yaml_node_t *n)
{
	if (c->budget == 0)
		return ezp__perr(c, EZP__LINE(n), EZP__COL(n),
				 "the config repeats itself too much through '*' aliases; "
				 "write the repeated items out");
	c->budget--;
	return EZP_OK;
}

static int key_is(const yaml_node_t *k, const char *key)
{
	return k->data.scalar.length == strlen(key) &&
	       !memcmp(k->data.scalar.value, key, k->data.scalar.length);
}

int ezp__map_keys(struct ezp__pctx *c, const yaml_node_t *map, const char *path,
		  const char *const *keys, size_t n, yaml_node_t **vals, yaml_node_t **knodes)
{
	char show[80], list[400];
	size_t i, o = 0;

	memset(vals, 0, n * sizeof(*vals));
	memset(knodes, 0, n * sizeof(*knodes));
	if (ezp__node_null(map))
		return EZP_OK;
	if (map->type != YAML_MAPPING_NODE)
		return ezp__perr(c, EZP__LINE(map), EZP__COL(map), "%s: expected a map, found %s",
				 ezp__where(path), ezp__node_found(map));
	for (yaml_node_pair_t *pr = map->data.mapping.pairs.start;
	     pr < map->data.mapping.pairs.top; pr++) {
		yaml_node_t *k = ezp__node(c, pr->key), *v = ezp__node(c, pr->value);
		if (!k || !v)
			continue;
		if (k->type != YAML_SCALAR_NODE)
			return ezp__perr(c, EZP__LINE(k), EZP__COL(k),
					 "%s: keys must be single words, found %s",
					 ezp__where(path), ezp__node_found(k));
		for (i = 0; i < n && !key_is(k, keys[i]); i++)
			;
		ezp__show(show, sizeof(show), (const char *)k->data.scalar.value,
			  k->data.scalar.length);
		if (i == n) {
			list[0] = '\0';
			for (size_t j = 0; j < n && o < sizeof(list); j++)
				o += (size_t)snprintf(list + o, sizeof(list) - o, "%s%s",
						      j ? ", " : "", keys[j]);
			if (n)
				return ezp__perr(c, EZP__LINE(k), EZP__COL(k),
						 "unknown key '%s' in %s (expected one of: %s)", show,
						 ezp__where(path), list);
			return ezp__perr(c, EZP__LINE(k), EZP__COL(k),
					 "unknown key '%s' in %s (it takes no keys)", show,
					 ezp__where(path));
		}
		if (knodes[i])
			return ezp__perr(c, EZP__LINE(k), EZP__COL(k),
					 "duplicate key '%s' in %s (first given at line %d)", show,
					 ezp__where(path), EZP__LINE(knodes[i]));
		knodes[i] = k;
		vals[i] = v;
	}
	return EZP_OK;
}

/* ---- kind items --------------------------------------------------------------- */

int ezp__kind_resolve(struct ezp__pctx *c, const char *name, int role, const char *path,
		      int line, int column, struct ezp__kind_conf *kc)
{
	const struct ezp__kind_lookup *l = c->lookup;
	const char *what = role == EZP__ROLE_FILTER ? "filter" : "transport";

	memset(kc, 0, sizeof(*kc));
	if (role == EZP__ROLE_FILTER) {
		kc->filter = l && l->filter ? l->filter(l->arg, name) : NULL;
		if (kc->filter) {
			kc->params = kc->filter->params;
			kc->config_size = kc->filter->config_size;
		}
	} else {
		kc->transport = l && l->transport ? l->transport(l->arg, name) : NULL;
	}
	if (!kc->filter && !kc->transport)
		return ezp__perr(c, line, column,
				 "unknown %s '%s' in %s (no loaded plugin provides it; "
				 "see 'ezproxy plugins')", what, name, ezp__where(path));
	if (role == EZP__ROLE_LISTEN) {
		if (!kc->transport->listen_params)
			return ezp__perr(c, line, column, "transport '%s' cannot listen (in %s); "
					 "use a transport that can, such as tcp or udp", name,
					 ezp__where(path));
		kc->params = kc->transport->listen_params;
		kc->config_size = kc->transport->listen_config_size;
	} else if (role == EZP__ROLE_CONNECT) {
		if (!kc->transport->connect_params)
			return ezp__perr(c, line, column, "transport '%s' cannot connect (in %s); "
					 "use a transport that can, such as tcp or udp", name,
					 ezp__where(path));
		kc->params = kc->transport->connect_params;
		kc->config_size = kc->transport->connect_config_size;
	}
	kc->line = line;
	kc->column = column;
	if (!(kc->kind = strdup(name)))
		return ezp__perr_nomem(c);
	if (kc->config_size && !(kc->config = calloc(1, kc->config_size))) {
		ezp__kind_conf_clear(kc);
		return ezp__perr_nomem(c);
	}
	return EZP_OK;
}

int ezp__kind_fill(struct ezp__pctx *c, struct ezp__kind_conf *kc, const struct ezp__pval *vals,
		   const struct ezp__pval *hold_vals, const char *path)
{
	int rc = ezp__params_fill(c, kc->kind, kc->params, kc->config_size, kc->config, vals,
				  path, kc->line, kc->column);

	if (rc == EZP_OK && kc->filter) {
		static const struct ezp__pval none[EZP__N_HOLD_KEYS];
		rc = ezp__hold_fill(c, hold_vals ? hold_vals : none, path, &kc->hold);
	}
	return rc;
}

/* Fill @kc from the YAML map @params (or null) at @path ("Pipelines[0].From.tcp"). */
static int kind_fill_map(struct ezp__pctx *c, struct ezp__kind_conf *kc, yaml_node_t *params,
			 const char *path)
{
	size_t np = ezp__params_count(kc->params), nk, i;
	const char **keys = NULL;
	yaml_node_t **vals = NULL, **knodes = NULL;
	struct ezp__pval *pv = NULL;
	int rc;

	if (np > EZP__MAX_PARAMS)
		return ezp__params_fill(c, kc->kind, kc->params, 0, NULL, NULL, path, kc->line,
					kc->column); /* reports the broken table */
	if (params && !ezp__node_null(params) && params->type != YAML_MAPPING_NODE)
		return ezp__perr(c, EZP__LINE(params), EZP__COL(params),
				 "%s: expected a map of parameters (e.g. { Key: value }), found %s",
				 path, ezp__node_found(params));
	nk = np + (kc->filter ? EZP__N_HOLD_KEYS : 0);
	keys = calloc(nk + 1, sizeof(*keys));
	vals = calloc(nk + 1, sizeof(*vals));
	knodes = calloc(nk + 1, sizeof(*knodes));
	pv = calloc(nk + 1, sizeof(*pv));
	if (!keys || !vals || !knodes || !pv) {
		rc = ezp__perr_nomem(c);
		goto out;
	}
	for (i = 0; i < np; i++)
		keys[i] = kc->params[i].key;
	for (i = np; i < nk; i++)
		keys[i] = ezp__hold_keys[i - np];
	rc = ezp__map_keys(c, params, path, keys, nk, vals, knodes);
	if (rc)
		goto out;
	for (i = 0; i < nk; i++)
		pv[i] = ezp__pval_of(vals[i]);
	rc = ezp__kind_fill(c, kc, pv, pv + np, path);
out:
	free(keys);
	free(vals);
	free(knodes);
	free(pv);
	return rc;
}

int ezp__kind_item(struct ezp__pctx *c, yaml_node_t *item, int role, const char *path,
		   struct ezp__kind_conf *out)
{
	const char *what = role == EZP__ROLE_FILTER ? "filter" : "transport";
	const char *eg = role == EZP__ROLE_FILTER ? "{ lua: { Script: filter.lua } }"
			 : role == EZP__ROLE_LISTEN ? "{ tcp: { Listen: 0.0.0.0:5554 } }"
						    : "{ tcp: { Connect: 10.0.0.5:5555 } }";
	struct ezp__kind_conf kc;
	char sub[EZP__PATH_MAX], show[80];
	yaml_node_pair_t *pr;
	yaml_node_t *k, *v;
	int rc;

	if (!item || item->type != YAML_MAPPING_NODE ||
	    item->data.mapping.pairs.top == item->data.mapping.pairs.start)
		return ezp__perr(c, EZP__LINE(item), EZP__COL(item),
				 "%s: expected a map with one %s kind, e.g. %s, found %s",
				 ezp__where(path), what, eg,
				 item && item->type == YAML_MAPPING_NODE ? "an empty map"
									 : ezp__node_found(item));
	pr = item->data.mapping.pairs.start;
	if (item->data.mapping.pairs.top - pr > 1) {
		k = ezp__node(c, pr[1].key);
		return ezp__perr(c, EZP__LINE(k), EZP__COL(k),
				 "%s: give exactly one %s kind, found %d; write one per item",
				 ezp__where(path), what, (int)(item->data.mapping.pairs.top - pr));
	}
	k = ezp__node(c, pr->key);
	v = ezp__node(c, pr->value);
	if (!k || !v || k->type != YAML_SCALAR_NODE || ezp__node_null(k) ||
	    strlen((const char *)k->data.scalar.value) != k->data.scalar.length)
		return ezp__perr(c, EZP__LINE(k), EZP__COL(k), "%s: the %s kind must be a name, "
				 "e.g. %s", ezp__where(path), what, eg);
	if ((rc = ezp__spend(c, k)))
		return rc;
	rc = ezp__kind_resolve(c, (const char *)k->data.scalar.value, role, path, EZP__LINE(k),
			       EZP__COL(k), &kc);
	if (rc)
		return rc;
	snprintf(sub, sizeof(sub), "%s%s%s", path, *path ? "." : "",
		 ezp__show(show, sizeof(show), kc.kind, strlen(kc.kind)));
	rc = kind_fill_map(c, &kc, v, sub);
	if (rc) {
		ezp__kind_conf_clear(&kc);
		return rc;
	}
	*out = kc;
	return EZP_OK;
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

static int parse_pipeline(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node,
			  size_t index, struct ezp__pipeline_conf *p)
{
	yaml_node_t *vals[6], *kn[6];
	char path[EZP__PATH_MAX], sub[EZP__PATH_MAX + 32], show[80];
	struct ezp__pval v;
	int rc;

	snprintf(path, sizeof(path), "Pipelines[%zu]", index);
	p->line = EZP__LINE(node);
	p->column = EZP__COL(node);
	p->limits = cfg->limits;
	if (!node || node->type != YAML_MAPPING_NODE)
		return ezp__perr(c, p->line, p->column, "%s: expected a map with Name, From "
				 "and To, found %s", path, ezp__node_found(node));
	if ((rc = ezp__map_keys(c, node, path, pipe_keys, 6, vals, kn)))
		return rc;
	if ((rc = need_key(c, p, vals, kn, 0, path)))
		return rc;
	v = ezp__pval_of(vals[0]);
	snprintf(sub, sizeof(sub), "%s.Name", path);
	if ((rc = ezp__conv_string(c, &v, sub, &p->name)))
		return rc;
	if (!name_ok(v.text, v.len))
		return ezp__perr(c, v.line, v.column, "%s: '%s' is not a valid pipeline name "
				 "(use 1 to 64 of A-Z a-z 0-9 _ . -)", sub,
				 ezp__show(show, sizeof(show), v.text, v.len));
	snprintf(sub, sizeof(sub), "%s.From", path);
	if ((rc = need_key(c, p, vals, kn, 1, path)) ||
	    (rc = ezp__kind_item(c, vals[1], EZP__ROLE_LISTEN, sub, &p->from)))
		return rc;
	if (!ezp__node_null(vals[2])) {
		yaml_node_t *t = vals[2];
		size_t n;
		if (t->type != YAML_SEQUENCE_NODE)
			return ezp__perr(c, EZP__LINE(t), EZP__COL(t), "%s.Through: expected a list "
					 "of filters (- lua: {...}), found %s", path,
					 ezp__node_found(t));
		n = (size_t)(t->data.sequence.items.top - t->data.sequence.items.start);
		if (n > c->budget)
			return ezp__perr(c, EZP__LINE(t), EZP__COL(t), "%s.Through: too many "
					 "filters through '*' aliases", path);
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
			 "Pipelines[%zu]); names must be unique", cfg->pipelines[dup].name, dup,
			 first);
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
		return ezp__perr(c, EZP__LINE(val), EZP__COL(val),
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
		t = val->type == YAML_SEQUENCE_NODE ? ezp__node(c, val->data.sequence.items.start[i])
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
						 "Cert and Key files)", tls_keys[i]);
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
	if (v.present && (rc = ezp__conv_word(c, &v, "Logging.Format", formats, 2,
					      "text or json", &cfg->log_format)))
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
	if (v.scalar && strlen(v.text) == v.len && *v.text && strspn(v.text + (*v.text == '-' || *v.text == '+'),
		"0123456789") != strlen(v.text + (*v.text == '-' || *v.text == '+')))
		return ezp__perr(c, v.line, v.column, "Workers: '%s' is not a number "
				 "(use auto or 1..256)", ezp__show(show, sizeof(show), v.text, v.len));
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
	static const char *const keys[] = {"Workers", "StateDir", "Plugins", "Api",
					   "Logging", "Limits",   "Pipelines"};
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
			return ezp__perr(c, v.line, v.column, "StateDir: must not be empty "
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
		return ezp__perr(c, EZP__LINE(pl), EZP__COL(pl), "Pipelines: expected a list "
				 "(- Name: ...), found %s", ezp__node_found(pl));
	n = (size_t)(pl->data.sequence.items.top - pl->data.sequence.items.start);
	if (n > c->budget)
		return ezp__perr(c, EZP__LINE(pl), EZP__COL(pl),
				 "Pipelines: too many pipelines through '*' aliases");
	if (n && !(cfg->pipelines = calloc(n, sizeof(*cfg->pipelines))))
		return ezp__perr_nomem(c);
	for (size_t i = 0; i < n; i++) {
		yaml_node_t *item = ezp__node(c, pl->data.sequence.items.start[i]);
		cfg->n_pipelines++;
		if ((rc = ezp__spend(c, item)) ||
		    (rc = parse_pipeline(c, cfg, item, i, &cfg->pipelines[i])))
			return rc;
	}
	return check_names(c, cfg);
}

/* ---- documents, entry points ------------------------------------------------ */

static int syntax_error(struct ezp__pctx *c, const yaml_parser_t *p, const char *text, size_t len)
{
	int line = (int)p->problem_mark.line + 1, col = (int)p->problem_mark.column + 1;
	const char *problem = p->problem ? p->problem : "unknown problem";

	if (p->error == YAML_MEMORY_ERROR)
		return ezp__perr_nomem(c);
	if (p->error == YAML_READER_ERROR) {
		size_t off = p->problem_offset < len ? p->problem_offset : len;
		line = 1;
		col = 1;
		for (size_t i = 0; i < off; i++) {
			if (text[i] == '\n') {
				line++;
				col = 1;
			} else if (((unsigned char)text[i] & 0xc0) != 0x80) {
				col++;
			}
		}
		return ezp__perr(c, line, col, "the config is not readable text: %s (byte %zu)",
				 problem, off);
	}
	if (p->context)
		return ezp__perr(c, line, col, "YAML syntax error: %s (%s at line %d, column %d)",
				 problem, p->context, (int)p->context_mark.line + 1,
				 (int)p->context_mark.column + 1);
	return ezp__perr(c, line, col, "YAML syntax error: %s", problem);
}

int ezp__doc_load(struct ezp__pctx *c, const char *text, size_t len, yaml_document_t *doc)
{
	yaml_parser_t p;
	yaml_document_t extra;
	yaml_node_t *r;
	int rc = EZP_OK;

	if (len > EZP__CONFIG_MAX_BYTES)
		return ezp__perr(c, 0, 0, "the config is larger than 4 MiB (%zu bytes); "
				 "it cannot be right", len);
	if (!yaml_parser_initialize(&p))
		return ezp__perr_nomem(c);
	yaml_parser_set_input_string(&p, (const unsigned char *)(text ? text : ""),
				     text ? len : 0);
	if (!yaml_parser_load(&p, doc)) {
		rc = syntax_error(c, &p, text ? text : "", text ? len : 0);
		yaml_parser_delete(&p);
		return rc;
	}
	if (yaml_document_get_root_node(doc)) {
		if (!yaml_parser_load(&p, &extra)) {
			rc = syntax_error(c, &p, text, len);
		} else {
			if ((r = yaml_document_get_root_node(&extra)))
				rc = ezp__perr(c, EZP__LINE(r), EZP__COL(r), "the config holds more "
					       "than one YAML document ('---'); keep one");
			yaml_document_delete(&extra);
		}
		if (rc)
			yaml_document_delete(doc);
	}
	yaml_parser_delete(&p);
	return rc;
}

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
		rc = ezp__perr(&c, EZP__LINE(root), EZP__COL(root), "the config must be a map of "
			       "keys (e.g. Pipelines: ...), found %s", ezp__node_found(root));
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
		cap *= 2;
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

int ezp__kind_conf_parse(const char *text, int is_filter, const struct ezp__kind_lookup *lookup,
			 struct ezp__kind_conf *out, struct ezp_error *err)
{
	struct ezp__pctx c;
	yaml_document_t doc;
	int rc, role = is_filter == 1 ? EZP__ROLE_FILTER
		       : is_filter == EZP__KIND_LISTEN ? EZP__ROLE_LISTEN : EZP__ROLE_CONNECT;

	memset(&c, 0, sizeof(c));
	c.file = "<string>";
	c.err = err;
	c.lookup = lookup;
	c.doc = &doc;
	if (!out)
		return ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_INTERNAL, NULL, 0, 0,
				      "ezp__kind_conf_parse: no output");
	if ((rc = ezp__doc_load(&c, text, text ? strlen(text) : 0, &doc)))
		return rc;
	c.budget = (size_t)(doc.nodes.top - doc.nodes.start) + 16;
	rc = ezp__kind_item(&c, yaml_document_get_root_node(&doc), role, "", out);
	yaml_document_delete(&doc);
	return rc;
}

int ezp__through_parse(const char *text, const struct ezp__kind_lookup *lookup,
		       struct ezp__kind_conf **out, size_t *n, struct ezp_error *err)
{
	struct ezp__pctx c;
	yaml_document_t doc;
	yaml_node_t *root;
	struct ezp__kind_conf *items = NULL;
	size_t count = 0;
	int rc;

	memset(&c, 0, sizeof(c));
	c.file = "<string>";
	c.err = err;
	c.lookup = lookup;
	c.doc = &doc;
	if ((rc = ezp__doc_load(&c, text, text ? strlen(text) : 0, &doc)))
		return rc;
	c.budget = (size_t)(doc.nodes.top - doc.nodes.start) + 16;
	root = yaml_document_get_root_node(&doc);
	if (root && root->type == YAML_SCALAR_NODE && root->data.scalar.length == 0)
		root = NULL; /* empty text: no filters */
	if (root && root->type != YAML_SEQUENCE_NODE) {
		rc = ezp__perr(&c, (int)root->start_mark.line + 1, (int)root->start_mark.column + 1,
			       "Through must be a list of filter items, e.g. [ {callback: {Name: f}} ]");
		goto out;
	}
	if (root) {
		size_t len = (size_t)(root->data.sequence.items.top - root->data.sequence.items.start);
		items = calloc(len ? len : 1, sizeof(*items));
		if (!items) {
			rc = ezp__perr_nomem(&c);
			goto out;
		}
		for (size_t i = 0; i < len; i++) {
			char path[32];
			snprintf(path, sizeof(path), "Through[%zu]", i);
			rc = ezp__kind_item(&c, yaml_document_get_node(&doc,
					    root->data.sequence.items.start[i]), EZP__ROLE_FILTER,
					    path, &items[i]);
			if (rc) {
				for (size_t j = 0; j < i; j++)
					ezp__kind_conf_clear(&items[j]);
				free(items);
				items = NULL;
				goto out;
			}
			count = i + 1;
		}
	}
	*out = items;
	*n = count;
	rc = EZP_OK;
out:
	yaml_document_delete(&doc);
	return rc;
}
