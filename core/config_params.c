/*
 * config_params.c - config values: errors, the scalar converters, addresses,
 * filling a kind's config struct from its parameter table, and clearing and
 * copying kind confs (equality is in config_dump.c). Thread: control,
 * except the address helpers and ezp__error_set (any thread: they touch
 * only their arguments).
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <math.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config_priv.h"

/* ---- errors ------------------------------------------------------------ */

static int error_vset(struct ezp_error *err, int code, int side, const char *file, int line,
		      int column, const char *fmt, va_list ap)
{
	if (!err)
		return code;
	err->code = code;
	err->side = side;
	err->line = line;
	err->column = column;
	snprintf(err->file, sizeof(err->file), "%s", file ? file : "");
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	return code;
}

int ezp__error_set(struct ezp_error *err, int code, int side, const char *file, int line,
		   int column, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	error_vset(err, code, side, file, line, column, fmt, ap);
	va_end(ap);
	return code;
}

int ezp__perr(struct ezp__pctx *c, int line, int column, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	error_vset(c->err, EZP_ERR_CONFIG, EZP_SIDE_CONFIG, c->file, line, column, fmt, ap);
	va_end(ap);
	return EZP_ERR_CONFIG;
}

int ezp__perr_nomem(struct ezp__pctx *c)
{
	return ezp__error_set(c->err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, c->file, 0, 0,
			      "out of memory while reading the config");
}

const char *ezp__show(char *buf, size_t size, const char *s, size_t len)
{
	size_t max = size > 4 ? size - 4 : 0, o = 0, i;

	if (!size)
		return "";
	for (i = 0; i < len && o < max; i++) {
		unsigned char ch = (unsigned char)s[i];
		buf[o++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
	}
	if (i < len) {
		while (o > 0 && ((unsigned char)buf[o - 1] & 0xc0) == 0x80)
			o--; /* do not cut a UTF-8 sequence */
		if (o > 0 && (unsigned char)buf[o - 1] >= 0xc0)
			o--;
		memcpy(buf + o, "...", 3);
		o += 3;
	}
	buf[o] = '\0';
	return buf;
}

/* ---- converters ------------------------------------------------------- */

#define SHOW_MAX 72

/* A scalar without NUL bytes, or an error naming @what and @expected. */
static int need_scalar(struct ezp__pctx *c, const struct ezp__pval *v, const char *what,
		       const char *expected)
{
	if (!v->scalar)
		return ezp__perr(c, v->line, v->column, "%s: expected %s, found %s", what, expected,
				 v->found ? v->found : "something else");
	if (strlen(v->text) != v->len)
		return ezp__perr(c, v->line, v->column, "%s: the value contains a NUL character",
				 what);
	return EZP_OK;
}

int ezp__conv_string(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, char **out)
{
	int rc = need_scalar(c, v, what, "a string");
	char *s;

	if (rc)
		return rc;
	if (!(s = strdup(v->text)))
		return ezp__perr_nomem(c);
	*out = s;
	return EZP_OK;
}

static int parse_i64(const char *s, int64_t *out)
{
	int neg = 0;
	uint64_t acc = 0, lim;

	if (*s == '+' || *s == '-')
		neg = *s++ == '-';
	if (!isdigit((unsigned char)*s))
		return -1;
	lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
	for (; isdigit((unsigned char)*s); s++) {
		unsigned d = (unsigned)(*s - '0');
		if (acc > (lim - d) / 10)
			return -2;
		acc = acc * 10 + d;
	}
	if (*s)
		return -1;
	*out = neg ? (acc == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)acc) : (int64_t)acc;
	return 0;
}

int ezp__conv_int(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, int64_t min,
		  int64_t max, int64_t *out)
{
	char show[SHOW_MAX];
	int64_t n;
	int rc = need_scalar(c, v, what, "an integer");

	if (rc)
		return rc;
	rc = parse_i64(v->text, &n);
	if (rc == -2 || (rc == 0 && min < max && (n < min || n > max))) {
		if (min < max)
			return ezp__perr(c, v->line, v->column,
					 "%s: %s is out of range (%lld..%lld)", what,
					 ezp__show(show, sizeof(show), v->text, v->len),
					 (long long)min, (long long)max);
		return ezp__perr(c, v->line, v->column, "%s: %s does not fit in 64 bits", what,
				 ezp__show(show, sizeof(show), v->text, v->len));
	}
	if (rc)
		return ezp__perr(c, v->line, v->column,
				 "%s: '%s' is not an integer (write decimal digits, e.g. 100)",
				 what, ezp__show(show, sizeof(show), v->text, v->len));
	*out = n;
	return EZP_OK;
}

int ezp__conv_word(struct ezp__pctx *c, const struct ezp__pval *v, const char *what,
		   const char *const *words, size_t n, const char *hint, int *out)
{
	char show[SHOW_MAX];
	int rc = need_scalar(c, v, what, hint);

	if (rc)
		return rc;
	for (size_t i = 0; i < n; i++) {
		if (!strcasecmp(v->text, words[i])) {
			*out = (int)i;
			return EZP_OK;
		}
	}
	return ezp__perr(c, v->line, v->column, "%s: '%s' is not allowed here (use %s)", what,
			 ezp__show(show, sizeof(show), v->text, v->len), hint);
}

int ezp__conv_bool(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, int *out)
{
	static const char *const words[] = {"false", "true", "no", "yes", "off", "on"};
	char show[SHOW_MAX];
	int i, rc = need_scalar(c, v, what, "true or false");

	if (rc)
		return rc;
	for (i = 0; i < 6; i++) {
		if (!strcasecmp(v->text, words[i])) {
			*out = i & 1;
			return EZP_OK;
		}
	}
	return ezp__perr(c, v->line, v->column, "%s: '%s' is not a boolean (use true or false)",
			 what, ezp__show(show, sizeof(show), v->text, v->len));
}

int ezp__conv_double(struct ezp__pctx *c, const struct ezp__pval *v, const char *what, double *out)
{
	char show[SHOW_MAX], *end;
	double d;
	int rc = need_scalar(c, v, what, "a number");

	if (rc)
		return rc;
	d = strtod(v->text, &end); /* underflow to a tiny or zero value is fine */
	if (!v->len || isspace((unsigned char)v->text[0]) || *end || end == v->text || !isfinite(d))
		return ezp__perr(c, v->line, v->column,
				 "%s: '%s' is not a finite number (e.g. 0.5 or 10)", what,
				 ezp__show(show, sizeof(show), v->text, v->len));
	*out = d;
	return EZP_OK;
}

int ezp__conv_addr(struct ezp__pctx *c, const struct ezp__pval *v, const char *what,
		   struct ezp_addr *out)
{
	struct ezp_error e;
	int rc = need_scalar(c, v, what, "an address (HOST:PORT)");

	if (rc)
		return rc;
	if (ezp__addr_parse(v->text, out, &e))
		return ezp__perr(c, v->line, v->column, "%s: %s", what, e.message);
	return EZP_OK;
}

/* ---- addresses -------------------------------------------------------- */

static int addr_fail(struct ezp_error *err, const char *text, const char *hint)
{
	char show[SHOW_MAX];

	return ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_INTERNAL, NULL, 0, 0,
			      "'%s' is not an address (%s)",
			      ezp__show(show, sizeof(show), text, strlen(text)), hint);
}

int ezp__addr_parse(const char *text, struct ezp_addr *out, struct ezp_error *err)
{
	static const char use[] = "use HOST:PORT, [V6]:PORT or :PORT";
	struct ezp_addr a;
	char host[INET6_ADDRSTRLEN + 1];
	const char *h, *port, *p;
	size_t hlen;
	unsigned long pn = 0;
	int v6 = 0;

	if (!text)
		text = "";
	if (text[0] == '[') {
		const char *rb = strchr(text, ']');
		if (!rb || rb[1] != ':')
			return addr_fail(err, text, use);
		h = text + 1;
		hlen = (size_t)(rb - h);
		port = rb + 2;
		v6 = 1;
	} else {
		const char *colon = strrchr(text, ':');
		if (!colon)
			return addr_fail(err, text, use);
		h = text;
		hlen = (size_t)(colon - text);
		port = colon + 1;
		if (memchr(h, ':', hlen))
			return addr_fail(err, text, "write IPv6 addresses as [V6]:PORT");
	}
	for (p = port; *p; p++) {
		if (!isdigit((unsigned char)*p) || p - port >= 5)
			return addr_fail(err, text, "the port must be a number 0..65535");
		pn = pn * 10 + (unsigned long)(*p - '0');
	}
	if (p == port || pn > 65535)
		return addr_fail(err, text, "the port must be a number 0..65535");
	if (hlen >= sizeof(host))
		return addr_fail(err, text,
				 "HOST must be an IP address or localhost; "
				 "names are not looked up");
	memcpy(host, h, hlen);
	host[hlen] = '\0';

	memset(&a, 0, sizeof(a));
	if (v6) {
		struct sockaddr_in6 s6;
		memset(&s6, 0, sizeof(s6));
		s6.sin6_family = AF_INET6;
		s6.sin6_port = htons((uint16_t)pn);
		if (inet_pton(AF_INET6, host, &s6.sin6_addr) != 1)
			return addr_fail(err, text, "'[...]' must hold an IPv6 address");
		memcpy(&a.ss, &s6, sizeof(s6));
		a.len = sizeof(s6);
	} else {
		struct sockaddr_in s4;
		memset(&s4, 0, sizeof(s4));
		s4.sin_family = AF_INET;
		s4.sin_port = htons((uint16_t)pn);
		if (!hlen)
			s4.sin_addr.s_addr = htonl(INADDR_ANY);
		else if (!strcasecmp(host, "localhost"))
			s4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		else if (inet_pton(AF_INET, host, &s4.sin_addr) != 1)
			return addr_fail(err, text,
					 "HOST must be an IP address or localhost; "
					 "names are not looked up");
		memcpy(&a.ss, &s4, sizeof(s4));
		a.len = sizeof(s4);
	}
	*out = a;
	return EZP_OK;
}

const char *ezp__addr_format(const struct ezp_addr *addr, char *buf, size_t len)
{
	char ip[INET6_ADDRSTRLEN];

	if (!buf || !len)
		return "";
	buf[0] = '\0';
	if (!addr || !addr->len)
		return buf;
	if (addr->ss.ss_family == AF_INET && addr->len >= sizeof(struct sockaddr_in)) {
		struct sockaddr_in s4;
		memcpy(&s4, &addr->ss, sizeof(s4));
		if (inet_ntop(AF_INET, &s4.sin_addr, ip, sizeof(ip)))
			snprintf(buf, len, "%s:%u", ip, (unsigned)ntohs(s4.sin_port));
	} else if (addr->ss.ss_family == AF_INET6 && addr->len >= sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 s6;
		memcpy(&s6, &addr->ss, sizeof(s6));
		if (inet_ntop(AF_INET6, &s6.sin6_addr, ip, sizeof(ip)))
			snprintf(buf, len, "[%s]:%u", ip, (unsigned)ntohs(s6.sin6_port));
	} else {
		snprintf(buf, len, "?");
	}
	return buf;
}

/* ---- parameter tables --------------------------------------------------- */

size_t ezp__param_size(int type)
{
	switch (type) {
	case EZP_PARAM_STRING:
		return sizeof(char *);
	case EZP_PARAM_INT:
	case EZP_PARAM_MS:
		return sizeof(int64_t);
	case EZP_PARAM_BOOL:
		return sizeof(int);
	case EZP_PARAM_DOUBLE:
		return sizeof(double);
	case EZP_PARAM_ADDR:
		return sizeof(struct ezp_addr);
	default:
		return 0;
	}
}

size_t ezp__params_count(const struct ezp_param *params)
{
	size_t n = 0;

	while (params && params[n].key && n <= EZP__MAX_PARAMS)
		n++;
	return n;
}

static int is_yaml_null(const char *s)
{
	return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") ||
	       !strcmp(s, "NULL");
}

/* A plugin's default text: a plain YAML scalar or a simply quoted one. NULL = none. */
static char *def_text(const char *def, int *oom)
{
	size_t n = strlen(def), o = 0;
	char *s;

	*oom = 0;
	if (def[0] != '"' && def[0] != '\'') {
		if (is_yaml_null(def))
			return NULL;
		if (!(s = strdup(def)))
			*oom = 1;
		return s;
	}
	if (!(s = malloc(n + 1))) {
		*oom = 1;
		return NULL;
	}
	for (size_t i = 1; i < n; i++) {
		if (def[i] == def[0] && !(def[0] == '\'' && def[i + 1] == '\''))
			break;
		if (def[0] == '\'' && def[i] == '\'')
			i++; /* '' stands for ' */
		else if (def[0] == '"' && def[i] == '\\' && def[i + 1]) {
			i++;
			s[o++] = def[i] == 'n' ? '\n' : def[i] == 't' ? '\t' : def[i];
			continue;
		}
		s[o++] = def[i];
	}
	s[o] = '\0';
	return s;
}

static void params_clear_n(const struct ezp_param *params, size_t n, void *config)
{
	for (size_t i = 0; config && i < n; i++) {
		if (params[i].type == EZP_PARAM_STRING) {
			char *s;
			memcpy(&s, (char *)config + params[i].offset, sizeof(s));
			free(s);
			s = NULL;
			memcpy((char *)config + params[i].offset, &s, sizeof(s));
		}
	}
}

void ezp__params_clear(const struct ezp_param *params, void *config)
{
	params_clear_n(params, ezp__params_count(params), config);
}

static int param_set(struct ezp__pctx *c, const struct ezp_param *p, void *dst,
		     const struct ezp__pval *v, const char *what)
{
	union {
		char *s;
		int64_t i;
		int b;
		double d;
		struct ezp_addr a;
	} u;
	int rc;

	memset(&u, 0, sizeof(u));
	switch (p->type) {
	case EZP_PARAM_STRING:
		rc = ezp__conv_string(c, v, what, &u.s);
		break;
	case EZP_PARAM_INT:
		rc = ezp__conv_int(c, v, what, p->min, p->max, &u.i);
		break;
	case EZP_PARAM_MS: {
		int64_t lo = 0, hi = INT64_MAX;
		if (p->min < p->max) {
			lo = p->min > 0 ? p->min : 0;
			hi = p->max > lo ? p->max : lo;
		}
		rc = ezp__conv_int(c, v, what, 0, 0, &u.i);
		if (rc == EZP_OK && (u.i < lo || u.i > hi))
			rc = ezp__perr(c, v->line, v->column,
				       "%s: %lld is out of range (%lld..%lld)", what,
				       (long long)u.i, (long long)lo, (long long)hi);
		break;
	}
	case EZP_PARAM_BOOL:
		rc = ezp__conv_bool(c, v, what, &u.b);
		break;
	case EZP_PARAM_DOUBLE:
		rc = ezp__conv_double(c, v, what, &u.d);
		break;
	default:
		rc = ezp__conv_addr(c, v, what, &u.a);
		break;
	}
	if (rc == EZP_OK)
		memcpy(dst, &u, ezp__param_size(p->type));
	return rc;
}

int ezp__params_fill(struct ezp__pctx *c, const char *kind, const struct ezp_param *params,
		     size_t config_size, void *config, const struct ezp__pval *vals,
		     const char *path, int line, int column)
{
	size_t n = ezp__params_count(params), i;
	char what[EZP__PATH_MAX + 64];
	int rc = EZP_OK;

	if (n > EZP__MAX_PARAMS)
		return ezp__perr(c, line, column,
				 "the parameter table of '%s' has over %d "
				 "entries or no end marker (a bug in its plugin)",
				 kind, EZP__MAX_PARAMS);
	for (i = 0; i < n; i++) {
		const struct ezp_param *p = &params[i];
		size_t size = ezp__param_size(p->type);
		if (!size || !config || p->offset > config_size || config_size - p->offset < size) {
			rc = ezp__perr(c, line, column,
				       "parameter '%s' of '%s' has a bad type "
				       "or lies outside its config struct (a bug in its plugin)",
				       p->key, kind);
			goto fail;
		}
	}
	for (i = 0; i < n; i++) {
		const struct ezp_param *p = &params[i];
		void *dst = (char *)config + p->offset;
		snprintf(what, sizeof(what), "%s%s%s", path, *path ? "." : "", p->key);
		if (vals && vals[i].present) {
			rc = param_set(c, p, dst, &vals[i], what);
		} else if (p->required) {
			rc = ezp__perr(c, line, column, "missing required key '%s' in %s", p->key,
				       *path ? path : kind);
		} else {
			int oom;
			char *def = p->def ? def_text(p->def, &oom) : NULL;
			if (def) {
				struct ezp__pval dv = {1, 1, def, strlen(def), NULL, line, column};
				strncat(what, " (the plugin's default)",
					sizeof(what) - strlen(what) - 1);
				rc = param_set(c, p, dst, &dv, what);
				free(def);
			} else if (p->def && oom) {
				rc = ezp__perr_nomem(c);
			} else {
				memset(dst, 0, ezp__param_size(p->type));
			}
		}
		if (rc)
			goto fail;
	}
	return EZP_OK;
fail:
	params_clear_n(params, i, config);
	return rc;
}

int ezp__params_defaults(const struct ezp_param *params, void *config, struct ezp_error *err)
{
	struct ezp__pctx c;

	memset(&c, 0, sizeof(c));
	c.file = "";
	c.err = err;
	return ezp__params_fill(&c, "this kind", params, SIZE_MAX, config, NULL, "", 0, 0);
}

/* ---- hold keys and limits ------------------------------------------------ */

const char *const ezp__hold_keys[EZP__N_HOLD_KEYS] = {"HoldWindow", "HoldTimeoutMs", "Default",
						      "AllLegs"};

const struct ezp__limit_def ezp__limit_defs[EZP__N_LIMITS] = {
    {"MaxSessions", offsetof(struct ezp__limits, max_sessions), 1, 1000000, 10000},
    {"MaxClientLegs", offsetof(struct ezp__limits, max_client_legs), 1, 1024, 8},
    {"MaxInjectBytes", offsetof(struct ezp__limits, max_inject_bytes), 1, 67108864, 1048576},
    {"TapBuffer", offsetof(struct ezp__limits, tap_buffer), 16, 1048576, 4096},
    {"MaxPacket", offsetof(struct ezp__limits, max_packet), 512, 1048576, 65536},
};

const char *const ezp__log_levels[4] = {"debug", "info", "warn", "error"};

void ezp__hold_defaults(struct ezp__hold_conf *hold)
{
	hold->window = 64;
	hold->timeout_ms = 5000;
	hold->default_drop = 0;
	hold->all_legs = 0;
}

int ezp__hold_fill(struct ezp__pctx *c, const struct ezp__pval *vals, const char *path,
		   const struct ezp_filter_kind *kind, struct ezp__hold_conf *hold)
{
	static const char *const actions[] = {"pass", "drop"};
	char what[EZP__PATH_MAX + 32];
	int rc = EZP_OK;

	ezp__hold_defaults(hold);
	if (kind && EZP_HAS(kind, hold_timeout_ms)) { /* the kind's own defaults */
		if (kind->hold_window && kind->hold_window <= 65536)
			hold->window = kind->hold_window;
		if (kind->hold_timeout_ms && kind->hold_timeout_ms <= 3600000)
			hold->timeout_ms = kind->hold_timeout_ms;
	}
	for (int i = 0; i < EZP__N_HOLD_KEYS && rc == EZP_OK; i++) {
		if (!vals[i].present)
			continue;
		snprintf(what, sizeof(what), "%s.%s", path, ezp__hold_keys[i]);
		switch (i) {
		case 0:
			rc = ezp__conv_int(c, &vals[i], what, 1, 65536, &hold->window);
			break;
		case 1:
			rc = ezp__conv_int(c, &vals[i], what, 1, 3600000, &hold->timeout_ms);
			break;
		case 2:
			rc = ezp__conv_word(c, &vals[i], what, actions, 2, "pass or drop",
					    &hold->default_drop);
			break;
		default:
			rc = ezp__conv_bool(c, &vals[i], what, &hold->all_legs);
			break;
		}
	}
	return rc;
}

/* ---- kind confs ----------------------------------------------------------- */

void ezp__kind_conf_clear(struct ezp__kind_conf *kc)
{
	if (!kc)
		return;
	if (kc->config)
		ezp__params_clear(kc->params, kc->config);
	free(kc->config);
	free(kc->kind);
	memset(kc, 0, sizeof(*kc));
}

int ezp__kind_conf_copy(struct ezp__kind_conf *dst, const struct ezp__kind_conf *src)
{
	struct ezp__kind_conf k = *src;
	size_t n = ezp__params_count(src->params), i;

	k.kind = NULL;
	k.config = NULL;
	if (src->kind && !(k.kind = strdup(src->kind)))
		goto fail;
	if (src->config && src->config_size) {
		if (!(k.config = malloc(src->config_size)))
			goto fail;
		memcpy(k.config, src->config, src->config_size);
		for (i = 0; i < n; i++) { /* no string shared with @src, even on failure */
			char *none = NULL;
			if (src->params[i].type == EZP_PARAM_STRING)
				memcpy((char *)k.config + src->params[i].offset, &none,
				       sizeof(none));
		}
		for (i = 0; i < n; i++) {
			const struct ezp_param *p = &src->params[i];
			char *s;
			if (p->type != EZP_PARAM_STRING)
				continue;
			memcpy(&s, (const char *)src->config + p->offset, sizeof(s));
			if (s && !(s = strdup(s)))
				goto fail;
			memcpy((char *)k.config + p->offset, &s, sizeof(s));
		}
	} else {
		k.config = NULL;
	}
	*dst = k;
	return EZP_OK;
fail:
	ezp__kind_conf_clear(&k);
	return EZP_ERR_NOMEM;
}
