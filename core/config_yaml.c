/*
 * config_yaml.c - the YAML side of config reading: loading one document
 * (libyaml's document API, syntax errors with positions), node helpers,
 * map keys checked against a key list (unknown and duplicate keys fail),
 * and `{ kind: { ... } }` items resolved through the kind lookup and
 * checked against the kind's parameter table. Thread: control.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_priv.h"

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
	case YAML_MAPPING_NODE:
		return "a map";
	case YAML_SEQUENCE_NODE:
		return "a list";
	default:
		return "a single value";
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
	for (yaml_node_pair_t *pr = map->data.mapping.pairs.start; pr < map->data.mapping.pairs.top;
	     pr++) {
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
						 "unknown key '%s' in %s (expected one of: %s)",
						 show, ezp__where(path), list);
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

int ezp__kind_resolve(struct ezp__pctx *c, const char *name, int role, const char *path, int line,
		      int column, struct ezp__kind_conf *kc)
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
				 "see 'ezproxy plugins')",
				 what, name, ezp__where(path));
	if (role == EZP__ROLE_LISTEN) {
		if (!kc->transport->listen_params)
			return ezp__perr(c, line, column,
					 "transport '%s' cannot listen (in %s); "
					 "use a transport that can, such as tcp or udp",
					 name, ezp__where(path));
		kc->params = kc->transport->listen_params;
		kc->config_size = kc->transport->listen_config_size;
	} else if (role == EZP__ROLE_CONNECT) {
		if (!kc->transport->connect_params)
			return ezp__perr(c, line, column,
					 "transport '%s' cannot connect (in %s); "
					 "use a transport that can, such as tcp or udp",
					 name, ezp__where(path));
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
	int rc = ezp__params_fill(c, kc->kind, kc->params, kc->config_size, kc->config, vals, path,
				  kc->line, kc->column);

	if (rc == EZP_OK && kc->filter) {
		static const struct ezp__pval none[EZP__N_HOLD_KEYS];
		rc = ezp__hold_fill(c, hold_vals ? hold_vals : none, path, kc->filter, &kc->hold);
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
	const char *eg = role == EZP__ROLE_FILTER   ? "{ lua: { Script: filter.lua } }"
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
		return ezp__perr(c, EZP__LINE(k), EZP__COL(k),
				 "%s: the %s kind must be a name, "
				 "e.g. %s",
				 ezp__where(path), what, eg);
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

/* ---- documents and standalone items ------------------------------------------ */

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
		return ezp__perr(c, 0, 0,
				 "the config is larger than 4 MiB (%zu bytes); "
				 "it cannot be right",
				 len);
	if (!yaml_parser_initialize(&p))
		return ezp__perr_nomem(c);
	yaml_parser_set_input_string(&p, (const unsigned char *)(text ? text : ""), text ? len : 0);
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
				rc = ezp__perr(c, EZP__LINE(r), EZP__COL(r),
					       "the config holds more "
					       "than one YAML document ('---'); keep one");
			yaml_document_delete(&extra);
		}
		if (rc)
			yaml_document_delete(doc);
	}
	yaml_parser_delete(&p);
	return rc;
}

int ezp__kind_conf_parse(const char *text, int is_filter, const struct ezp__kind_lookup *lookup,
			 struct ezp__kind_conf *out, struct ezp_error *err)
{
	struct ezp__pctx c;
	yaml_document_t doc;
	int rc, role = is_filter == 1		       ? EZP__ROLE_FILTER
		       : is_filter == EZP__KIND_LISTEN ? EZP__ROLE_LISTEN
						       : EZP__ROLE_CONNECT;

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
	if (!out || !n)
		return ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_INTERNAL, NULL, 0, 0,
				      "ezp__through_parse: no output");
	if ((rc = ezp__doc_load(&c, text, text ? strlen(text) : 0, &doc)))
		return rc;
	c.budget = (size_t)(doc.nodes.top - doc.nodes.start) + 16;
	root = yaml_document_get_root_node(&doc);
	if (ezp__node_null(root))
		root = NULL; /* empty text, ~ or null: no filters */
	if (root && root->type != YAML_SEQUENCE_NODE) {
		rc = ezp__perr(
		    &c, (int)root->start_mark.line + 1, (int)root->start_mark.column + 1,
		    "Through must be a list of filter items, e.g. [ {callback: {Name: f}} ]");
		goto out;
	}
	if (root) {
		size_t len =
		    (size_t)(root->data.sequence.items.top - root->data.sequence.items.start);
		items = calloc(len ? len : 1, sizeof(*items));
		if (!items) {
			rc = ezp__perr_nomem(&c);
			goto out;
		}
		for (size_t i = 0; i < len; i++) {
			char path[32];
			snprintf(path, sizeof(path), "Through[%zu]", i);
			rc = ezp__kind_item(
			    &c, yaml_document_get_node(&doc, root->data.sequence.items.start[i]),
			    EZP__ROLE_FILTER, path, &items[i]);
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
