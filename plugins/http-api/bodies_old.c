/*
 * bodies_old.c - pure parsers and shapes for the old v1 REST API
 * (DESIGN.md section 8, "v1/v2"): the POST /api/1/inject body, the
 * ?perms=N of /api/1/newkey, the MakeKeys/DuplicateKeys rule check, and
 * the /api/1/keyinfo object.
 *
 * No libmicrohttpd and no core dependency (jansson, libcrypto and the
 * permission bits of services.h only), so a fuzz target links this file
 * alone. The old program was written in Go; where its encoding/json and
 * strconv accepted an input, these parsers accept it too (field names
 * matched without regard to case, unknown fields ignored, padded base64
 * with CR/LF ignored, perms in Go's base-0 integer syntax), except that
 * duplicate fields are refused (JSON_REJECT_DUPLICATES everywhere).
 *
 * Thread: any (no shared state).
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <ezproxy/services.h>
#include <jansson.h>
#include <openssl/evp.h>

#include "bodies_old.h"

static void old_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void old_err(char *err, size_t err_len, const char *fmt, ...)
{
	va_list ap;

	if (!err || err_len == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, err_len, fmt, ap);
	va_end(ap);
}

static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/*
 * api_old_b64_decode - standard padded base64 as Go's base64.StdEncoding
 * reads it: CR and LF are skipped, anything else outside the alphabet, a
 * length that is not a multiple of 4 or misplaced '=' is refused.
 * Returns: malloc'd bytes (at least 1 byte allocated) and *@out_len, or
 * NULL on bad input or OOM.
 */
unsigned char *api_old_b64_decode(const char *text, size_t text_len, size_t *out_len)
{
	unsigned char *clean = NULL, *out = NULL;
	size_t n = 0, pad = 0, i;
	int got;

	clean = malloc(text_len + 1);
	if (!clean)
		goto fail;
	for (i = 0; i < text_len; i++) {
		unsigned char c = (unsigned char)text[i];

		if (c == '\r' || c == '\n')
			continue;
		if (c == '=') {
			pad++;
		} else if (pad > 0 || b64_value(c) < 0) {
			goto fail; /* a character after '=', or outside the alphabet */
		}
		clean[n++] = c;
	}
	if (n % 4 != 0 || pad > 2)
		goto fail;
	out = malloc(n / 4 * 3 + 1);
	if (!out)
		goto fail;
	got = n ? EVP_DecodeBlock(out, clean, (int)n) : 0;
	if (got < 0 || (size_t)got < pad)
		goto fail;
	free(clean);
	*out_len = (size_t)got - pad;
	return out;
fail:
	free(clean);
	free(out);
	return NULL;
}

/* Find field @name in @obj the way Go does (case-insensitive). NULL when absent. */
static json_t *old_field(json_t *obj, const char *name, bool *dup)
{
	const char *k;
	json_t *v, *found = NULL;

	json_object_foreach(obj, k, v)
	{
		if (strcasecmp(k, name) != 0)
			continue;
		if (found)
			*dup = true;
		found = v;
	}
	return found;
}

/*
 * api_old_inject_parse - the body of POST /api/1/inject:
 * {"Id": N (-1 = all), "Data": "base64", "ToClient": bool, "ToServer": bool}.
 * Id is required; Data, ToClient and ToServer may be missing or null (empty
 * data, false); at least one direction must be true.
 * @out: written only on success; release with api_old_inject_clear.
 * Returns: 0, or -1 with a message for the 400 reply in @err.
 */
int api_old_inject_parse(const char *body, size_t len, struct api_old_inject *out, char *err,
			 size_t err_len)
{
	static const char *const names[] = {"Id", "Data", "ToClient", "ToServer"};
	struct api_old_inject in = {0};
	json_error_t jerr;
	json_t *root = NULL, *v[4];
	bool dup = false;
	size_t i;

	root = json_loadb(body ? body : "", len, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		old_err(err, err_len, "invalid JSON data: %s (line %d, column %d)", jerr.text,
			jerr.line, jerr.column);
		goto fail;
	}
	if (!json_is_object(root)) {
		old_err(err, err_len,
			"invalid JSON data: the body must be an object "
			"{Id, Data, ToClient, ToServer}");
		goto fail;
	}
	for (i = 0; i < 4; i++) {
		v[i] = old_field(root, names[i], &dup);
		if (dup) {
			old_err(err, err_len, "invalid JSON data: field %s given twice", names[i]);
			goto fail;
		}
		if (v[i] && json_is_null(v[i]))
			v[i] = NULL;
	}
	if (!v[0]) {
		old_err(err, err_len, "Id is required (a proxy id, or -1 for all)");
		goto fail;
	}
	if (!json_is_integer(v[0]) || json_integer_value(v[0]) < -1) {
		old_err(err, err_len, "Id must be a proxy id or -1 for all");
		goto fail;
	}
	in.id = json_integer_value(v[0]);
	if (v[1]) {
		if (!json_is_string(v[1])) {
			old_err(err, err_len, "Data must be a base64 string");
			goto fail;
		}
		in.data =
		    api_old_b64_decode(json_string_value(v[1]), json_string_length(v[1]), &in.len);
		if (!in.data) {
			old_err(err, err_len, "Data is not valid base64");
			goto fail;
		}
	}
	for (i = 2; i < 4; i++) {
		if (v[i] && !json_is_boolean(v[i])) {
			old_err(err, err_len, "%s must be true or false", names[i]);
			goto fail;
		}
	}
	in.to_client = v[2] && json_is_true(v[2]);
	in.to_server = v[3] && json_is_true(v[3]);
	if (!in.to_client && !in.to_server) {
		old_err(err, err_len, "ToClient and/or ToServer must be true");
		goto fail;
	}
	if (in.len == 0) {
		free(in.data);
		in.data = NULL;
	}
	json_decref(root);
	*out = in;
	return 0;
fail:
	free(in.data);
	json_decref(root);
	return -1;
}

void api_old_inject_clear(struct api_old_inject *in)
{
	if (!in)
		return;
	free(in->data);
	in->data = NULL;
	in->len = 0;
}

static int digit_value(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'Z')
		return c - 'A' + 10;
	return 99;
}

/*
 * api_old_perms_parse - ?perms=N as Go's strconv.ParseInt(s, 0, 64) reads
 * it: decimal, 0x / 0o / 0b prefixes, a leading 0 for octal, '_' between
 * digits after a prefix, an optional '+'. Negative values are refused.
 * Returns: 0 and *@out, or -1.
 */
int api_old_perms_parse(const char *text, int64_t *out)
{
	const char *p = text;
	uint64_t v = 0;
	unsigned base = 10;
	bool prefixed = false, digit_before = false;

	if (!p)
		return -1;
	if (*p == '+')
		p++;
	if (p[0] == '0' && p[1] != '\0') {
		char c = (char)tolower((unsigned char)p[1]);

		prefixed = true;
		if (c == 'x' || c == 'o' || c == 'b') {
			base = c == 'x' ? 16 : c == 'o' ? 8 : 2;
			p += 2;
		} else {
			base = 8;
			p += 1;
		}
		digit_before = true; /* a prefix counts as a digit: "0x_1f", "0_7" */
	}
	if (*p == '\0')
		return -1;
	for (; *p; p++) {
		unsigned d;

		if (*p == '_') {
			if (!prefixed || !digit_before || p[1] == '\0' || p[1] == '_')
				return -1;
			digit_before = false;
			continue;
		}
		d = (unsigned)digit_value((unsigned char)*p);
		if (d >= base)
			return -1;
		if (v > ((uint64_t)INT64_MAX - d) / base)
			return -1;
		v = v * base + d;
		digit_before = true;
	}
	*out = (int64_t)v;
	return 0;
}

/* The old program's names for the permission bits, by bit number. */
static const char *const old_perm_names[] = {
    "CanCheckStatus", "CanClose",	  "CanUseWebsocket", "CanFilter",  "CanInject",
    "CanMakeKeys",    "CanDuplicateKeys", "CanReconfigure",  "CanCapture",
};

/*
 * api_old_newkey_refused - the MakeKeys/DuplicateKeys rule of the old
 * /api/1/newkey: every bit of @want must be in @have, except MakeKeys,
 * which needs DuplicateKeys. Returns NULL when allowed, else the old name
 * of the first bit refused ("CanInject") for the 403 message.
 */
const char *api_old_newkey_refused(uint32_t have, uint32_t want)
{
	unsigned bit;

	for (bit = 0; bit < sizeof(old_perm_names) / sizeof(old_perm_names[0]); bit++) {
		uint32_t b = 1u << bit;

		if (!(want & b))
			continue;
		if (b == EZP_PERM_MAKE_KEYS ? !(have & EZP_PERM_DUPLICATE_KEYS) : !(have & b))
			return old_perm_names[bit];
	}
	return NULL;
}

/*
 * api_old_keyinfo_json - the /api/1/keyinfo object for a key with @perms:
 * {Value (the permission bits), CanCheckStatus, CanClose, CanUseWebsocket,
 * CanFilter, CanInject, CanMakeKeys, CanDuplicateKeys, Admin}.
 * Returns: (transfer full) a new object, or NULL on OOM.
 */
json_t *api_old_keyinfo_json(uint32_t perms)
{
	return json_pack(
	    "{s:I, s:b, s:b, s:b, s:b, s:b, s:b, s:b, s:b}", "Value", (json_int_t)perms,
	    "CanCheckStatus", (perms & EZP_PERM_CHECK_STATUS) != 0, "CanClose",
	    (perms & EZP_PERM_CLOSE) != 0, "CanUseWebsocket", (perms & EZP_PERM_USE_WEBSOCKET) != 0,
	    "CanFilter", (perms & EZP_PERM_FILTER) != 0, "CanInject",
	    (perms & EZP_PERM_INJECT) != 0, "CanMakeKeys", (perms & EZP_PERM_MAKE_KEYS) != 0,
	    "CanDuplicateKeys", (perms & EZP_PERM_DUPLICATE_KEYS) != 0, "Admin",
	    (perms & EZP_PERM_ALL) == EZP_PERM_ALL);
}
