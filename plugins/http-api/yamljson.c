/*
 * yamljson.c - YAML <-> JSON for the config and pipeline shapes of the v3
 * API. YAML keys that start with an uppercase letter become snake_case in
 * JSON ("IdleTimeoutMs" -> "idle_timeout_ms") and back; the single key of
 * a mapping that is the value of From/To or an item of Through is a kind
 * name ("tcp", "http-api") and is kept verbatim both ways.
 *
 * YAML is read with libyaml's event parser (no document tree): aliases are
 * refused, nesting is bounded, so hostile text cannot blow up. JSON is
 * written as YAML flow text with double-quoted strings.
 *
 * Depends on libyaml and jansson only (the fuzz target links it alone).
 * Thread: any.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "api.h"

#define YJ_MAX_DEPTH 64
#define YJ_MAX_OUT (8u << 20) /* YAML text made from one JSON value */

/* ---- key names ---- */

static bool is_kind_parent(const char *key)
{
	return key && (!strcmp(key, "From") || !strcmp(key, "To") || !strcmp(key, "from") ||
		       !strcmp(key, "to"));
}

static bool is_through(const char *key)
{
	return key && (!strcmp(key, "Through") || !strcmp(key, "through"));
}

/* "IdleTimeoutMs" -> "idle_timeout_ms"; NULL when @k is not PascalCase (keep it). */
static char *snake_of(const char *k)
{
	size_t n = strlen(k), j = 0;
	char *out;

	if (!(k[0] >= 'A' && k[0] <= 'Z'))
		return NULL;
	for (size_t i = 0; i < n; i++) {
		char c = k[i];
		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')))
			return NULL;
	}
	out = malloc(2 * n + 1);
	if (!out)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		char c = k[i];
		if (c >= 'A' && c <= 'Z') {
			if (i)
				out[j++] = '_';
			c = (char)(c - 'A' + 'a');
		}
		out[j++] = c;
	}
	out[j] = '\0';
	return out;
}

/* "idle_timeout_ms" -> "IdleTimeoutMs"; NULL when @k is not snake_case (keep it). */
static char *pascal_of(const char *k)
{
	size_t n = strlen(k), j = 0;
	char *out;

	if (!(k[0] >= 'a' && k[0] <= 'z') || k[n - 1] == '_')
		return NULL;
	for (size_t i = 0; i < n; i++) {
		char c = k[i];
		if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
			return NULL;
		if (c == '_' && (k[i + 1] < 'a' || k[i + 1] > 'z'))
			return NULL; /* "a__b", "a_1": would not come back the same */
	}
	out = malloc(n + 1);
	if (!out)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		char c = k[i];
		if (c == '_')
			continue;
		if (i == 0 || k[i - 1] == '_')
			c = (char)(c - 'a' + 'A');
		out[j++] = c;
	}
	out[j] = '\0';
	return out;
}

/* ---- YAML -> JSON ---- */

struct yj_frame {
	json_t *v;    /* object or array */
	char *key;    /* a mapping's key waiting for its value (as written in YAML) */
	bool kinds;   /* this mapping's keys are kind names */
	bool through; /* this sequence is a Through list */
};

static json_t *scalar_json(const yaml_event_t *ev)
{
	const char *s = (const char *)ev->data.scalar.value;
	size_t n = ev->data.scalar.length;
	char *end;

	if (strlen(s) != n)
		return NULL; /* a NUL inside: not representable */
	if (ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE ||
	    (ev->data.scalar.tag && !strcmp((const char *)ev->data.scalar.tag, YAML_STR_TAG)))
		return json_stringn(s, n);
	/* the core writes true, false and null only in these spellings */
	if (n == 0 || !strcmp(s, "~") || !strcmp(s, "null"))
		return json_null();
	if (!strcmp(s, "true") || !strcmp(s, "false"))
		return json_boolean(s[0] == 't');
	if ((s[0] >= '0' && s[0] <= '9') || ((s[0] == '-' || s[0] == '+') && n > 1)) {
		bool digits = true;
		for (size_t i = (s[0] == '-' || s[0] == '+'); i < n; i++)
			if (s[i] < '0' || s[i] > '9')
				digits = false;
		if (digits) {
			long long ll;
			errno = 0;
			ll = strtoll(s, &end, 10);
			if (!errno && *end == '\0')
				return json_integer(ll);
		} else if (strpbrk(s, ".eE")) {
			double d;
			errno = 0;
			d = strtod(s, &end);
			if (!errno && *end == '\0' && isfinite(d) && !strpbrk(s, "xXpP"))
				return json_real(d);
		}
	}
	return json_stringn(s, n);
}

/* Put @v (transfer full) into the top frame, or make it the root. */
static int yj_add(struct yj_frame *st, int depth, json_t **root, json_t *v)
{
	struct yj_frame *f;
	int rc = 0;

	if (!v)
		return -1;
	if (depth == 0) {
		*root = v;
		return 0;
	}
	f = &st[depth - 1];
	if (json_is_array(f->v))
		return json_array_append_new(f->v, v);
	if (!f->key) {
		json_decref(v);
		return -1; /* a mapping or sequence used as a key */
	}
	{
		char *snake = f->kinds ? NULL : snake_of(f->key);
		const char *k = snake ? snake : f->key;
		/* duplicate keys (or two spellings of one key) are refused */
		if (json_object_get(f->v, k))
			rc = -1;
		if (!rc)
			rc = json_object_set_new(f->v, k, v);
		else
			json_decref(v);
		free(snake);
	}
	free(f->key);
	f->key = NULL;
	return rc;
}

json_t *api_yaml_to_json(const char *yaml)
{
	yaml_parser_t parser;
	yaml_event_t ev;
	struct yj_frame st[YJ_MAX_DEPTH];
	int depth = 0;
	json_t *root = NULL;
	bool done = false, ok = false;

	if (!yaml)
		return NULL;
	if (!yaml_parser_initialize(&parser))
		return NULL;
	yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, strlen(yaml));
	while (!done) {
		if (!yaml_parser_parse(&parser, &ev))
			break;
		switch (ev.type) {
		case YAML_STREAM_START_EVENT:
		case YAML_DOCUMENT_START_EVENT:
			break;
		case YAML_DOCUMENT_END_EVENT:
		case YAML_STREAM_END_EVENT:
			done = ok = true;
			break;
		case YAML_ALIAS_EVENT:
			done = true;
			break;
		case YAML_SCALAR_EVENT:
			if (depth > 0 && json_is_object(st[depth - 1].v) && !st[depth - 1].key) {
				size_t n = ev.data.scalar.length;
				st[depth - 1].key = strndup((const char *)ev.data.scalar.value, n);
				if (!st[depth - 1].key || strlen(st[depth - 1].key) != n)
					done = true;
				break;
			}
			if (yj_add(st, depth, &root, scalar_json(&ev)))
				done = true;
			else if (depth == 0)
				done = ok = true;
			break;
		case YAML_MAPPING_START_EVENT:
		case YAML_SEQUENCE_START_EVENT: {
			struct yj_frame *parent = depth ? &st[depth - 1] : NULL;
			bool map = ev.type == YAML_MAPPING_START_EVENT;
			if (depth == YJ_MAX_DEPTH ||
			    (parent && json_is_object(parent->v) && !parent->key)) {
				done = true; /* too deep, or a complex key */
				break;
			}
			st[depth].v = map ? json_object() : json_array();
			st[depth].key = NULL;
			st[depth].kinds = map && parent &&
					  (json_is_object(parent->v) ? is_kind_parent(parent->key)
								     : parent->through);
			st[depth].through =
			    !map && parent && json_is_object(parent->v) && is_through(parent->key);
			if (!st[depth].v)
				done = true;
			else
				depth++;
			break;
		}
		case YAML_MAPPING_END_EVENT:
		case YAML_SEQUENCE_END_EVENT: {
			json_t *v = st[--depth].v;
			free(st[depth].key);
			if (yj_add(st, depth, &root, v))
				done = true;
			else if (depth == 0)
				done = ok = true;
			break;
		}
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&parser);
	while (depth > 0) {
		depth--;
		free(st[depth].key);
		json_decref(st[depth].v);
	}
	if (!ok) {
		json_decref(root);
		return NULL;
	}
	return root ? root : json_null();
}

/* ---- JSON -> YAML flow text ---- */

struct yj_buf {
	char *p;
	size_t len, cap;
	bool failed;
};

static void put(struct yj_buf *b, const char *s, size_t n)
{
	if (b->failed)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		char *p;
		while (cap < b->len + n + 1)
			cap *= 2;
		if (cap > YJ_MAX_OUT) {
			b->failed = true;
			return;
		}
		p = realloc(b->p, cap);
		if (!p) {
			b->failed = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void puts_(struct yj_buf *b, const char *s)
{
	put(b, s, strlen(s));
}

/* A double-quoted YAML scalar for UTF-8 @s (jansson strings are valid UTF-8). */
static void put_quoted(struct yj_buf *b, const char *s, size_t n)
{
	char esc[12];

	put(b, "\"", 1);
	for (size_t i = 0; i < n;) {
		unsigned char c = (unsigned char)s[i];
		unsigned cp, len;

		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			put(b, esc, 2);
			i++;
			continue;
		}
		if (c < 0x20 || c == 0x7f) {
			snprintf(esc, sizeof(esc), "\\x%02X", c);
			puts_(b, esc);
			i++;
			continue;
		}
		if (c < 0x80) {
			put(b, s + i, 1);
			i++;
			continue;
		}
		/* decode one code point to decide whether YAML may carry it raw */
		len = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
		if (i + len > n) {
			b->failed = true;
			return;
		}
		cp = c & (len == 4 ? 0x07 : len == 3 ? 0x0f : 0x1f);
		for (unsigned k = 1; k < len; k++)
			cp = (cp << 6) | ((unsigned char)s[i + k] & 0x3f);
		if ((cp >= 0x80 && cp <= 0x9f && cp != 0x85) || cp == 0xfeff || cp == 0xfffe ||
		    cp == 0xffff || cp == 0x85) {
			snprintf(esc, sizeof(esc), "\\u%04X", cp);
			puts_(b, esc);
		} else {
			put(b, s + i, len);
		}
		i += len;
	}
	put(b, "\"", 1);
}

static void put_json(struct yj_buf *b, json_t *v, int depth, bool kinds, bool through)
{
	char num[64];

	if (depth >= YJ_MAX_DEPTH) {
		b->failed = true;
		return;
	}
	switch (json_typeof(v)) {
	case JSON_OBJECT: {
		const char *k;
		json_t *m;
		bool first = true;
		puts_(b, "{");
		json_object_foreach(v, k, m)
		{
			char *pascal = kinds ? NULL : pascal_of(k), *snake = NULL;
			if (!first)
				puts_(b, ", ");
			first = false;
			if (pascal)
				puts_(b, pascal);
			else if (!kinds && (snake = snake_of(k)) != NULL)
				puts_(b, k); /* already PascalCase */
			else
				put_quoted(b, k, strlen(k));
			free(pascal);
			free(snake);
			puts_(b, ": ");
			put_json(b, m, depth + 1, !kinds && is_kind_parent(k),
				 !kinds && is_through(k));
		}
		puts_(b, "}");
		break;
	}
	case JSON_ARRAY: {
		size_t i;
		json_t *m;
		puts_(b, "[");
		json_array_foreach(v, i, m)
		{
			if (i)
				puts_(b, ", ");
			put_json(b, m, depth + 1, through, false);
		}
		puts_(b, "]");
		break;
	}
	case JSON_STRING:
		put_quoted(b, json_string_value(v), json_string_length(v));
		break;
	case JSON_INTEGER:
		snprintf(num, sizeof(num), "%lld", (long long)json_integer_value(v));
		puts_(b, num);
		break;
	case JSON_REAL: {
		double d = json_real_value(v);
		snprintf(num, sizeof(num), "%.17g", d);
		if (!strpbrk(num, ".eE"))
			strcat(num, ".0");
		puts_(b, num);
		break;
	}
	case JSON_TRUE:
		puts_(b, "true");
		break;
	case JSON_FALSE:
		puts_(b, "false");
		break;
	default:
		puts_(b, "null");
		break;
	}
}

char *api_json_to_yaml(json_t *v)
{
	struct yj_buf b = {0};

	if (!v)
		return NULL;
	put_json(&b, v, 0, false, false);
	if (b.failed || !b.p) {
		free(b.p);
		return NULL;
	}
	return b.p;
}
