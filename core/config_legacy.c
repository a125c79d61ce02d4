/*
 * config_legacy.c - the old program's config form (ProxyAddress,
 * ServerAddress, Logging, Api.Enable/UseAuth/Address, Lua, Debug), read
 * into the same struct ezp__config as two pipelines, `default` (tcp) and
 * `default-udp`, with the `lua` filter on both when Lua.Enable is true.
 * Thread: control.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_priv.h"

static const char *const new_only[] = {"Workers", "StateDir", "Plugins", "Limits", "Pipelines"};

static int node_key_is(const yaml_node_t *k, const char *key)
{
	return k && k->type == YAML_SCALAR_NODE && k->data.scalar.length == strlen(key) &&
	       !memcmp(k->data.scalar.value, key, k->data.scalar.length);
}

static int map_has(struct ezp__pctx *c, const yaml_node_t *map, const char *const *keys, size_t n)
{
	if (!map || map->type != YAML_MAPPING_NODE)
		return 0;
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
	     p++) {
		for (size_t i = 0; i < n; i++) {
			if (node_key_is(ezp__node(c, p->key), keys[i]))
				return 1;
		}
	}
	return 0;
}

static yaml_node_t *map_get(struct ezp__pctx *c, const yaml_node_t *map, const char *key)
{
	if (!map || map->type != YAML_MAPPING_NODE)
		return NULL;
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
	     p++) {
		if (node_key_is(ezp__node(c, p->key), key))
			return ezp__node(c, p->value);
	}
	return NULL;
}

int ezp__legacy_detect(struct ezp__pctx *c, const yaml_node_t *root)
{
	static const char *const old_only[] = {"ProxyAddress", "ServerAddress", "Lua", "Debug"};
	static const char *const old_api[] = {"UseAuth", "Address"};
	static const char *const new_api[] = {"Listen", "Auth", "Tls", "Origin"};
	static const char *const enable[] = {"Enable"};
	static const char *const format[] = {"Format"};
	const yaml_node_t *api = map_get(c, root, "Api");

	if (map_has(c, root, old_only, 4) || map_has(c, api, old_api, 2))
		return 1;
	/* `Api: { Enable: ... }` alone is the old form unless anything says otherwise. */
	return map_has(c, api, enable, 1) && !map_has(c, root, new_only, 5) &&
	       !map_has(c, api, new_api, 4) && !map_has(c, map_get(c, root, "Logging"), format, 1);
}

/*
 * An `{ Address, Port }` section into "HOST:PORT" text in @out; an empty
 * Address means @empty.
 */
static int legacy_addr(struct ezp__pctx *c, yaml_node_t *node, const char *path, const char *empty,
		       int64_t port, char out[EZP_ADDR_STRLEN])
{
	static const char *const keys[] = {"Address", "Port"};
	yaml_node_t *vals[2], *kn[2];
	struct ezp__pval hv, pv;
	struct ezp_addr a;
	struct ezp_error e;
	char what[64], text[320], show[80];
	const char *host = "";
	int rc;

	if ((rc = ezp__map_keys(c, node, path, keys, 2, vals, kn)))
		return rc;
	hv = ezp__pval_of(vals[0]);
	pv = ezp__pval_of(vals[1]);
	snprintf(what, sizeof(what), "%s.Address", path);
	if (hv.present) {
		if (!hv.scalar || strlen(hv.text) != hv.len)
			return ezp__perr(c, hv.line, hv.column,
					 "%s: expected an IP address, "
					 "found %s",
					 what, hv.found ? hv.found : "a NUL character");
		host = hv.text;
	}
	snprintf(what, sizeof(what), "%s.Port", path);
	if (pv.present && (rc = ezp__conv_int(c, &pv, what, 0, 65535, &port)))
		return rc;
	if (!*host)
		host = empty;
	if (strlen(host) > 200)
		snprintf(text, sizeof(text), "?");
	else if (strchr(host, ':') && host[0] != '[')
		snprintf(text, sizeof(text), "[%s]:%lld", host, (long long)port);
	else
		snprintf(text, sizeof(text), "%s:%lld", host, (long long)port);
	if (ezp__addr_parse(text, &a, &e))
		return ezp__perr(c, hv.present ? hv.line : EZP__LINE(node),
				 hv.present ? hv.column : EZP__COL(node),
				 "%s.Address: '%s' is not an IP address (use an IPv4 or IPv6 "
				 "address, localhost, or \"\" for %s; names are not looked up)",
				 path, ezp__show(show, sizeof(show), host, strlen(host)), empty);
	ezp__addr_format(&a, out, EZP_ADDR_STRLEN);
	return EZP_OK;
}

static int legacy_api(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node)
{
	static const char *const keys[] = {"Enable", "UseAuth", "Address"};
	yaml_node_t *vals[3], *kn[3];
	struct ezp__pval v;
	char listen[EZP_ADDR_STRLEN];
	int rc;

	if ((rc = ezp__map_keys(c, node, "Api", keys, 3, vals, kn)))
		return rc;
	v = ezp__pval_of(vals[0]);
	if (v.present && (rc = ezp__conv_bool(c, &v, "Api.Enable", &cfg->api.enabled)))
		return rc;
	v = ezp__pval_of(vals[1]);
	if (v.present && (rc = ezp__conv_bool(c, &v, "Api.UseAuth", &cfg->api.auth)))
		return rc;
	if ((rc = legacy_addr(c, vals[2], "Api.Address", "127.0.0.1", 8080, listen)))
		return rc;
	free(cfg->api.listen);
	if (!(cfg->api.listen = strdup(listen)))
		return ezp__perr_nomem(c);
	return EZP_OK;
}

static int legacy_lua(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *node,
		      const yaml_node_t **enable_at)
{
	static const char *const keys[] = {"Enable", "Path", "Mode"};
	static const char *const modes[] = {"main", "callback"};
	yaml_node_t *vals[3], *kn[3];
	struct ezp__pval v;
	int rc, mode = 1;

	if ((rc = ezp__map_keys(c, node, "Lua", keys, 3, vals, kn)))
		return rc;
	*enable_at = kn[0] ? kn[0] : node;
	v = ezp__pval_of(vals[0]);
	if (v.present && (rc = ezp__conv_bool(c, &v, "Lua.Enable", &cfg->lua.enabled)))
		return rc;
	v = ezp__pval_of(vals[1]);
	if (v.present && (rc = ezp__conv_string(c, &v, "Lua.Path", &cfg->lua.path)))
		return rc;
	v = ezp__pval_of(vals[2]);
	if (v.present &&
	    (rc = ezp__conv_word(c, &v, "Lua.Mode", modes, 2, "main or callback", &mode)))
		return rc;
	if ((!cfg->lua.path && !(cfg->lua.path = strdup(""))) ||
	    !(cfg->lua.mode = strdup(modes[mode])))
		return ezp__perr_nomem(c);
	if (cfg->lua.enabled && !*cfg->lua.path)
		return ezp__perr(
		    c, EZP__LINE(*enable_at), EZP__COL(*enable_at),
		    "Lua.Enable is true but Lua.Path is empty; give the script's file");
	return EZP_OK;
}

/* Fill a resolved @kc from key = text pairs; every key must be in its table. */
static int fill_kv(struct ezp__pctx *c, struct ezp__kind_conf *kc, const char *const *keys,
		   const char *const *texts, size_t n, const char *path)
{
	size_t np = ezp__params_count(kc->params);
	struct ezp__pval *pv;
	int rc = EZP_OK;

	if (np > EZP__MAX_PARAMS)
		np = 0; /* ezp__kind_fill reports the broken table */
	if (!(pv = calloc(np + 1, sizeof(*pv))))
		return ezp__perr_nomem(c);
	for (size_t i = 0; i < n && rc == EZP_OK; i++) {
		size_t j;
		for (j = 0; j < np && strcmp(kc->params[j].key, keys[i]); j++)
			;
		if (j == np && np)
			rc =
			    ezp__perr(c, kc->line, kc->column,
				      "the '%s' %s has no '%s' parameter, "
				      "which the old program's form needs (%s)",
				      kc->kind, kc->filter ? "filter" : "transport", keys[i], path);
		else if (j < np)
			pv[j] = (struct ezp__pval){1,	 1,	   texts[i],  strlen(texts[i]),
						   NULL, kc->line, kc->column};
	}
	if (rc == EZP_OK)
		rc = ezp__kind_fill(c, kc, pv, NULL, path);
	free(pv);
	return rc;
}

static int need_kind(struct ezp__pctx *c, const char *name, int filter, int line, int column,
		     const char *why)
{
	const struct ezp__kind_lookup *l = c->lookup;
	const void *k = NULL;

	if (l && filter && l->filter)
		k = l->filter(l->arg, name);
	else if (l && !filter && l->transport)
		k = l->transport(l->arg, name);
	if (k)
		return EZP_OK;
	return ezp__perr(c, line, column,
			 "%s but no loaded plugin provides the '%s' %s "
			 "(see 'ezproxy plugins')",
			 why, name, filter ? "filter" : "transport");
}

static int legacy_pipelines(struct ezp__pctx *c, struct ezp__config *cfg, const char *proxy,
			    const char *server, int line, int column, const yaml_node_t *lua_at)
{
	static const char *const names[] = {"default", "default-udp"};
	static const char *const kinds[] = {"tcp", "udp"};
	static const char *const listen_key[] = {"Listen"}, *const connect_key[] = {"Connect"};
	static const char *const lua_keys[] = {"Script", "Mode"};
	const char *lua_texts[] = {cfg->lua.path, cfg->lua.mode};
	const struct ezp__kind_lookup *l = c->lookup;
	int has_fault = l && l->filter && l->filter(l->arg, "fault");
	size_t n;
	int rc;

	for (int i = 0; i < 2; i++) {
		if ((rc = need_kind(
			 c, kinds[i], 0, line, column,
			 "the old program's form (ProxyAddress, ServerAddress) needs it")))
			return rc;
	}
	if (cfg->lua.enabled && (rc = need_kind(c, "lua", 1, EZP__LINE(lua_at), EZP__COL(lua_at),
						"Lua.Enable is true")))
		return rc;
	if (!(cfg->pipelines = calloc(2, sizeof(*cfg->pipelines))))
		return ezp__perr_nomem(c);
	for (int i = 0; i < 2; i++) {
		struct ezp__pipeline_conf *p = &cfg->pipelines[i];
		cfg->n_pipelines++;
		p->line = line;
		p->column = column;
		p->limits = cfg->limits;
		if (!(p->name = strdup(names[i])))
			return ezp__perr_nomem(c);
		if ((rc = ezp__kind_resolve(c, kinds[i], EZP__ROLE_LISTEN, "ProxyAddress", line,
					    column, &p->from)) ||
		    (rc = fill_kv(c, &p->from, listen_key, &proxy, 1, "ProxyAddress")) ||
		    (rc = ezp__kind_resolve(c, kinds[i], EZP__ROLE_CONNECT, "ServerAddress", line,
					    column, &p->to)) ||
		    (rc = fill_kv(c, &p->to, connect_key, &server, 1, "ServerAddress")))
			return rc;
		/*
		 * the old program filtered through its WebSocket: the `remote` slot, after Lua;
		 * then a (dormant) `fault` stage when a plugin provides one, so the fault API
		 * works on these pipelines too
		 */
		n = (cfg->lua.enabled ? 1 : 0) + (cfg->api.enabled ? 1 : 0) + (has_fault ? 1 : 0);
		if (!n)
			continue;
		if (!(p->through = calloc(n, sizeof(*p->through))))
			return ezp__perr_nomem(c);
		if (cfg->lua.enabled) {
			if ((rc = ezp__kind_resolve(c, "lua", EZP__ROLE_FILTER, "Lua", EZP__LINE(lua_at),
						    EZP__COL(lua_at), &p->through[0])))
				return rc;
			p->n_through = 1;
			if ((rc = fill_kv(c, &p->through[0], lua_keys, lua_texts, 2, "Lua")))
				return rc;
		}
		if (cfg->api.enabled) {
			struct ezp__kind_conf *kc = &p->through[p->n_through];
			if ((rc = ezp__kind_resolve(c, "remote", EZP__ROLE_FILTER, "Api", line, column,
						    kc)) ||
			    (rc = fill_kv(c, kc, NULL, NULL, 0, "Api")))
				return rc;
			p->n_through++;
		}
		if (has_fault) {
			struct ezp__kind_conf *kc = &p->through[p->n_through];
			if ((rc = ezp__kind_resolve(c, "fault", EZP__ROLE_FILTER, "ProxyAddress", line,
						    column, kc)) ||
			    (rc = fill_kv(c, kc, NULL, NULL, 0, "ProxyAddress")))
				return rc;
			p->n_through++;
		}
	}
	return EZP_OK;
}

int ezp__legacy_parse(struct ezp__pctx *c, struct ezp__config *cfg, yaml_node_t *root)
{
	static const char *const keys[] = {"ProxyAddress", "ServerAddress", "Logging",
					   "Api",	   "Lua",	    "Debug"};
	static const char *const level_key[] = {"Level"};
	yaml_node_t *vals[6], *kn[6], *lv, *lk;
	const yaml_node_t *lua_at = root;
	char proxy[EZP_ADDR_STRLEN], server[EZP_ADDR_STRLEN], show[80];
	struct ezp__pval v;
	int rc, debug = 0;

	for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top;
	     p++) {
		yaml_node_t *k = ezp__node(c, p->key);
		for (size_t i = 0; i < 5; i++) {
			if (node_key_is(k, new_only[i]))
				return ezp__perr(
				    c, EZP__LINE(k), EZP__COL(k),
				    "key '%s' cannot be mixed with the old program's "
				    "keys (ProxyAddress, ServerAddress, Api.UseAuth, "
				    "Api.Address, Lua, Debug); write the whole file in "
				    "the new form",
				    ezp__show(show, sizeof(show), new_only[i],
					      strlen(new_only[i])));
		}
	}
	if ((rc = ezp__map_keys(c, root, "", keys, 6, vals, kn)))
		return rc;
	cfg->legacy = 1;
	cfg->log_level = EZP_LOG_WARN;
	if ((rc = legacy_addr(c, vals[0], "ProxyAddress", "0.0.0.0", 5554, proxy)) ||
	    (rc = legacy_addr(c, vals[1], "ServerAddress", "127.0.0.1", 5555, server)))
		return rc;
	if ((rc = ezp__map_keys(c, vals[2], "Logging", level_key, 1, &lv, &lk)))
		return rc;
	v = ezp__pval_of(lv);
	if (v.present && (rc = ezp__conv_word(c, &v, "Logging.Level", ezp__log_levels, 4,
					      "debug, info, warn or error", &cfg->log_level)))
		return rc;
	cfg->api.enabled = kn[3] != NULL;
	if ((rc = legacy_api(c, cfg, vals[3])) || (rc = legacy_lua(c, cfg, vals[4], &lua_at)))
		return rc;
	v = ezp__pval_of(vals[5]);
	if (v.present && (rc = ezp__conv_bool(c, &v, "Debug", &debug)))
		return rc;
	if (debug)
		cfg->log_level = EZP_LOG_DEBUG;
	if ((rc = ezp__call_plugin_paths(c, cfg, NULL)))
		return rc;
	return legacy_pipelines(c, cfg, proxy, server, kn[0] ? EZP__LINE(kn[0]) : EZP__LINE(root),
				kn[0] ? EZP__COL(kn[0]) : EZP__COL(root), lua_at);
}
