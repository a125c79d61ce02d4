/*
 * b64.c - strict standard base64 for the http-api plugin (libcrypto's
 * EVP_EncodeBlock / EVP_DecodeBlock), shared by the REST bodies (bodies.c)
 * and the WebSocket client messages (ws_msg.c). Pure: libcrypto only, so
 * the fuzz targets (tests/fuzz) link it beside either file. Every byte
 * decoded here came from a client.
 *
 * Thread: any (no shared state).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "b64.h"

char *api_b64_encode(const void *data, size_t len)
{
	size_t out_len;
	char *out;

	if (len > (SIZE_MAX / 4) * 3 - 3 || len > (size_t)INT32_MAX / 2)
		return NULL;
	out_len = 4 * ((len + 2) / 3) + 1;
	out = malloc(out_len);
	if (!out)
		return NULL;
	if (len == 0) {
		out[0] = '\0';
		return out;
	}
	EVP_EncodeBlock((unsigned char *)out, data, (int)len);
	return out;
}

static bool b64_char(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       c == '+' || c == '/';
}

unsigned char *api_b64_decode_n(const char *text, size_t n, size_t *len)
{
	size_t pad = 0, full;
	unsigned char *out = NULL;
	char *padded = NULL;
	int got;

	if (!text || !len || n > (size_t)INT32_MAX / 2)
		return NULL;
	/* strict alphabet; '=' only as the last one or two characters */
	while (pad < 2 && pad < n && text[n - 1 - pad] == '=')
		pad++;
	for (size_t i = 0; i < n - pad; i++)
		if (!b64_char((unsigned char)text[i]))
			return NULL;
	if (pad && n % 4)
		return NULL;
	full = n - pad;
	if (full % 4 == 1)
		return NULL; /* one stray character never encodes a byte */
	/* accept missing padding: pad to a multiple of 4 for EVP_DecodeBlock */
	padded = malloc(full + 4);
	out = malloc(full / 4 * 3 + 4);
	if (!padded || !out)
		goto fail;
	memcpy(padded, text, full);
	while (full % 4)
		padded[full++] = '=';
	padded[full] = '\0';
	pad = full - (n - pad);
	if (full == 0) {
		*len = 0;
		free(padded);
		return out;
	}
	got = EVP_DecodeBlock(out, (const unsigned char *)padded, (int)full);
	if (got < 0 || (size_t)got < pad)
		goto fail;
	free(padded);
	*len = (size_t)got - pad;
	return out;
fail:
	free(padded);
	free(out);
	return NULL;
}

unsigned char *api_b64_decode(const char *text, size_t *len)
{
	return text ? api_b64_decode_n(text, strlen(text), len) : NULL;
}
