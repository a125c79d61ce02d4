/*
 * config_dump.c - write a resolved config back as YAML in the new form,
 * every default spelled out, so that `ezproxy check` shows what will run
 * and ezp__config_parse reads the text back to an equal config; and the
 * equality of kind and pipeline confs that a reload diffs with.
 * Thread: any (reads only the configs it is given).
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_priv.h"

struct out {
	char *p;
	size_t len, cap;
	int oom;
};

static void put(struct out *o, const char *s, size_t n)
{
	if (o->oom)
		return;
	if (o->len + n + 1 > o->cap) {
		size_t cap = o->cap ? o->cap : 1024;
		char *np;
		while (cap < o->len + n + 1)
			cap *= 2;
		if (!(np = realloc(o->p, cap))) {
			o->oom = 1;
			return;
		}
		o->p = np;
		o->cap = cap;
	}
	memcpy(o->p + o->len, s, n);
	o->len += n;
	o->p[o->len] = '\0';
}

static void putf(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(struct out *o, const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n > 0)
		put(o, buf, (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

static void indent(struct out *o, int n)
{
	static const char sp[] = "                                ";

	put(o, sp, (size_t)n < sizeof(sp) - 1 ? (size_t)n : sizeof(sp) - 1);
}

/* Decode one UTF-8 sequence; returns its length, or 0 when invalid. */
static size_t utf8_dec(const unsigned char *s, size_t n, uint32_t *cp)
{
	size_t len, i;
	uint32_t v;

	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	} else if ((s[0] & 0xe0) == 0xc0) {
		len = 2;
		v = s[0] & 0x1f;
	} else if ((s[0] & 0xf0) == 0xe0) {
		len = 3;
		v = s[0] & 0x0f;
	} else if ((s[0] & 0xf8) == 0xf0) {
		len = 4;
		v = s[0] & 0x07;
	} else {
		return 0;
	}
	if (len > n)
		return 0;
	for (i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		v = (v << 6) | (s[i] & 0x3f);
	}
	if ((len == 2 && v < 0x80) || (len == 3 && v < 0x800) || (len == 4 && v < 0x10000) ||
	    v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	*cp = v;
	return len;
}

/* A double-quoted YAML scalar: anything a YAML reader would refuse or fold is escaped. */
static void put_str(struct out *o, const char *s)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t n = strlen(s), i = 0, l;
	uint32_t cp;

	put(o, "\"", 1);
	while (i < n) {
		l = utf8_dec(u + i, n - i, &cp);
		if (!l) {
			put(o, "\\uFFFD", 6); /* cannot happen for text libyaml read */
			i++;
			continue;
		}
		if (cp == '"' || cp == '\\') {
			put(o, "\\", 1);
			put(o, s + i, 1);
		} else if (cp == '\n') {
			put(o, "\\n", 2);
		} else if (cp == '\t') {
			put(o, "\\t", 2);
		} else if (cp < 0x20 || (cp >= 0x7f && cp <= 0xa0) || cp == 0x2028 ||
			   cp == 0x2029 || cp == 0xfeff || (cp >= 0xd800 && cp <= 0xdfff) ||
			   cp == 0xfffe || cp == 0xffff) {
			putf(o, cp > 0xff ? "\\u%04X" : "\\x%02X", (unsigned)cp);
		} else {
			put(o, s + i, l);
		}
		i += l;
	}
	put(o, "\"", 1);
}

static void put_limits(struct out *o, const struct ezp__limits *l, int ind)
{
	for (int i = 0; i < EZP__N_LIMITS; i++) {
		int64_t v;
		memcpy(&v, (const char *)l + ezp__limit_defs[i].offset, sizeof(v));
		indent(o, ind);
		putf(o, "%s: %" PRId64 "\n", ezp__limit_defs[i].key, v);
	}
}

/* `"kind": {}` or `"kind":` and its parameters, the kind key at column @ind. */
static void put_kind(struct out *o, const struct ezp__kind_conf *kc, int ind)
{
	size_t n = ezp__params_count(kc->params), written = 0;

	put_str(o, kc->kind ? kc->kind : "");
	put(o, ":", 1);
	for (size_t i = 0; kc->config && i < n && i < EZP__MAX_PARAMS; i++) {
		const struct ezp_param *p = &kc->params[i];
		const char *v = (const char *)kc->config + p->offset;
		char buf[EZP_ADDR_STRLEN];
		char *s = NULL;
		int64_t iv;
		int b;
		double d;
		struct ezp_addr a;

		if (!ezp__param_size(p->type) || p->offset > kc->config_size ||
		    kc->config_size - p->offset < ezp__param_size(p->type))
			continue;
		if (p->type == EZP_PARAM_STRING) {
			memcpy(&s, v, sizeof(s));
			if (!s)
				continue;
		} else if (p->type == EZP_PARAM_ADDR) {
			memcpy(&a, v, sizeof(a));
			if (!a.len)
				continue;
		}
		put(o, "\n", 1);
		indent(o, ind + 2);
		put(o, p->key, strlen(p->key));
		put(o, ": ", 2);
		written++;
		switch (p->type) {
		case EZP_PARAM_STRING:
			put_str(o, s);
			break;
		case EZP_PARAM_INT:
		case EZP_PARAM_MS:
			memcpy(&iv, v, sizeof(iv));
			putf(o, "%" PRId64, iv);
			break;
		case EZP_PARAM_BOOL:
			memcpy(&b, v, sizeof(b));
			put(o, b ? "true" : "false", b ? 4 : 5);
			break;
		case EZP_PARAM_DOUBLE:
			memcpy(&d, v, sizeof(d));
			putf(o, "%.17g", d);
			break;
		default:
			put_str(o, ezp__addr_format(&a, buf, sizeof(buf)));
			break;
		}
	}
	if (kc->filter) {
		const struct ezp__hold_conf *h = &kc->hold;
		put(o, "\n", 1);
		indent(o, ind + 2);
		putf(o, "HoldWindow: %" PRId64 "\n", h->window);
		indent(o, ind + 2);
		putf(o, "HoldTimeoutMs: %" PRId64 "\n", h->timeout_ms);
		indent(o, ind + 2);
		putf(o, "Default: %s\n", h->default_drop ? "drop" : "pass");
		indent(o, ind + 2);
		putf(o, "AllLegs: %s\n", h->all_legs ? "true" : "false");
	} else {
		put(o, written ? "\n" : " {}\n", written ? 1 : 4);
	}
}

static void put_pipeline(struct out *o, const struct ezp__pipeline_conf *p)
{
	put(o, "  - Name: ", 10);
	put_str(o, p->name ? p->name : "");
	put(o, "\n    From:\n      ", 17);
	put_kind(o, &p->from, 6);
	if (!p->n_through) {
		put(o, "    Through: []\n", 16);
	} else {
		put(o, "    Through:\n", 13);
		for (size_t i = 0; i < p->n_through; i++) {
			put(o, "      - ", 8);
			put_kind(o, &p->through[i], 8);
		}
	}
	put(o, "    To:\n      ", 14);
	put_kind(o, &p->to, 6);
	putf(o, "    Shared: %s\n    Limits:\n", p->shared ? "true" : "false");
	put_limits(o, &p->limits, 6);
}

char *ezp__pipeline_dump(const struct ezp__pipeline_conf *p)
{
	struct out o = {NULL, 0, 0, 0};
	char *r, *w;

	put_pipeline(&o, p);
	if (o.oom || !o.p) {
		free(o.p);
		return NULL;
	}
	/* "  - Name: x\n    From: ..." -> a mapping: drop 4 columns from every line */
	for (r = w = o.p; *r;) {
		for (int k = 0; k < 4 && *r && *r != '\n'; k++)
			r++;
		while (*r && *r != '\n')
			*w++ = *r++;
		if (*r)
			*w++ = *r++;
	}
	*w = '\0';
	return o.p;
}

char *ezp__config_dump(const struct ezp__config *cfg)
{
	static const char *const formats[] = {"text", "json"};
	struct out o = {NULL, 0, 0, 0};
	int lvl;

	if (!cfg)
		return NULL;
	if (cfg->workers > 0)
		putf(&o, "Workers: %" PRId64 "\n", cfg->workers);
	else
		put(&o, "Workers: auto\n", 14);
	if (cfg->state_dir) {
		put(&o, "StateDir: ", 10);
		put_str(&o, cfg->state_dir);
		put(&o, "\n", 1);
	}
	if (!cfg->n_plugin_paths) {
		put(&o, "Plugins:\n  Path: []\n", 20);
	} else {
		put(&o, "Plugins:\n  Path:\n", 17);
		for (size_t i = 0; i < cfg->n_plugin_paths; i++) {
			put(&o, "    - ", 6);
			put_str(&o, cfg->plugin_paths[i] ? cfg->plugin_paths[i] : "");
			put(&o, "\n", 1);
		}
	}
	putf(&o, "Api:\n  Enable: %s\n  Listen: ", cfg->api.enabled ? "true" : "false");
	put_str(&o, cfg->api.listen ? cfg->api.listen : "127.0.0.1:8080");
	putf(&o, "\n  Auth: %s\n", cfg->api.auth ? "true" : "false");
	if (cfg->api.tls_cert || cfg->api.tls_key) {
		put(&o, "  Tls:\n    Cert: ", 17);
		put_str(&o, cfg->api.tls_cert ? cfg->api.tls_cert : "");
		put(&o, "\n    Key: ", 10);
		put_str(&o, cfg->api.tls_key ? cfg->api.tls_key : "");
		put(&o, "\n", 1);
	}
	if (cfg->api.origin) {
		put(&o, "  Origin: ", 10);
		put_str(&o, cfg->api.origin);
		put(&o, "\n", 1);
	}
	lvl = cfg->log_level >= 0 && cfg->log_level <= 3 ? cfg->log_level : EZP_LOG_INFO;
	putf(&o, "Logging:\n  Level: %s\n  Format: %s\n", ezp__log_levels[lvl],
	     formats[cfg->log_format == EZP__LOG_JSON]);
	put(&o, "Limits:\n", 8);
	put_limits(&o, &cfg->limits, 2);
	if (!cfg->n_pipelines)
		put(&o, "Pipelines: []\n", 14);
	else
		put(&o, "Pipelines:\n", 11);
	for (size_t i = 0; i < cfg->n_pipelines; i++)
		put_pipeline(&o, &cfg->pipelines[i]);
	if (o.oom) {
		free(o.p);
		return NULL;
	}
	return o.p;
}

/* ---- equality ------------------------------------------------------------------ */

static const struct ezp_param *param_find(const struct ezp_param *params, const char *key)
{
	for (size_t i = 0; params && params[i].key && i < EZP__MAX_PARAMS; i++) {
		if (!strcmp(params[i].key, key))
			return &params[i];
	}
	return NULL;
}

static int param_equal(const struct ezp_param *pa, const void *ca, const struct ezp_param *pb,
		       const void *cb)
{
	const char *a = (const char *)ca + pa->offset, *b = (const char *)cb + pb->offset;

	switch (pa->type) {
	case EZP_PARAM_STRING: {
		char *sa, *sb;
		memcpy(&sa, a, sizeof(sa));
		memcpy(&sb, b, sizeof(sb));
		return sa == sb || (sa && sb && !strcmp(sa, sb));
	}
	case EZP_PARAM_DOUBLE: {
		double da, db;
		memcpy(&da, a, sizeof(da));
		memcpy(&db, b, sizeof(db));
		return da == db;
	}
	case EZP_PARAM_ADDR: {
		struct ezp_addr aa, ab;
		memcpy(&aa, a, sizeof(aa));
		memcpy(&ab, b, sizeof(ab));
		return aa.len == ab.len && aa.len <= sizeof(aa.ss) &&
		       !memcmp(&aa.ss, &ab.ss, aa.len);
	}
	default:
		return !memcmp(a, b, ezp__param_size(pa->type));
	}
}

int ezp__kind_conf_equal(const struct ezp__kind_conf *a, const struct ezp__kind_conf *b)
{
	size_t na = ezp__params_count(a->params), nb = ezp__params_count(b->params);

	if (!a->kind || !b->kind || strcmp(a->kind, b->kind) || na != nb ||
	    memcmp(&a->hold, &b->hold, sizeof(a->hold)))
		return 0;
	for (size_t i = 0; i < na && i < EZP__MAX_PARAMS; i++) {
		const struct ezp_param *pa = &a->params[i];
		const struct ezp_param *pb = param_find(b->params, pa->key);
		if (!pb || pa->type != pb->type || !ezp__param_size(pa->type))
			return 0;
		if (!a->config || !b->config) {
			if (a->config != b->config)
				return 0;
			continue;
		}
		if (!param_equal(pa, a->config, pb, b->config))
			return 0;
	}
	return 1;
}

int ezp__pipeline_conf_equal(const struct ezp__pipeline_conf *a, const struct ezp__pipeline_conf *b)
{
	if (!a->name || !b->name || strcmp(a->name, b->name) || a->shared != b->shared ||
	    a->n_through != b->n_through || memcmp(&a->limits, &b->limits, sizeof(a->limits)) ||
	    !ezp__kind_conf_equal(&a->from, &b->from) || !ezp__kind_conf_equal(&a->to, &b->to))
		return 0;
	for (size_t i = 0; i < a->n_through; i++) {
		if (!ezp__kind_conf_equal(&a->through[i], &b->through[i]))
			return 0;
	}
	return 1;
}
