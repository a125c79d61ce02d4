/*
 * fuzz_ws.c - libFuzzer target for the WebSocket client-message parsers
 * (plugins/http-api/ws_msg.c): any bytes must parse or be refused cleanly,
 * as a v3 message {type, ...} and as an old v2 message {Type, Target, Data,
 * Extra}, and the base64 decoder (b64.c) must agree with a re-encode.
 * Build: clang -g -fsanitize=fuzzer,address,undefined -Isdk/include \
 *          -Iplugins/http-api plugins/http-api/ws_msg.c plugins/http-api/b64.c \
 *          tests/fuzz/fuzz_ws.c -ljansson -lcrypto
 * Thread: libFuzzer's.
 */
#include <openssl/evp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WS_MSG_ONLY
#include "ws.h"

static void check_v3(const char *text, size_t len)
{
	struct ws3_msg m;
	struct ws_msg_err err;

	if (ws3_msg_parse(text, len, &m, &err) == 0) {
		if (m.type < WS3_VERDICT || m.type > WS3_CLOSE)
			abort();
		if (m.type == WS3_VERDICT && m.action == WS3_REPLACE && !m.data)
			abort();
		if (m.type == WS3_INJECT &&
		    (!m.data || !m.len || m.dir < 0 || m.dir > WS3_DIR_BOTH))
			abort();
		if ((m.type == WS3_INJECT || m.type == WS3_CLOSE) && !m.all && !m.session)
			abort();
		ws3_msg_clear(&m);
		return;
	}
	if (!err.code[0] || !err.message[0])
		abort();
	json_decref(err.ref);
}

static void check_v2(const char *text, size_t len)
{
	struct ws2_msg m;
	char msg[64];

	if (ws2_msg_parse(text, len, &m, msg, sizeof(msg)) == 0) {
		if (m.len && !m.data)
			abort();
		ws2_msg_clear(&m);
	} else if (strcmp(msg, "Bad JSON data")) {
		abort();
	}
}

/*
 * Whatever decodes must encode back to the same text, but for padding and
 * the unused low bits of the last character (accepted, as Go's decoder does).
 */
static void check_b64(const char *text, size_t len)
{
	size_t n = 0;
	unsigned char *out = api_b64_decode_n(text, len, &n);
	char *again;
	size_t body = len;

	if (!out)
		return;
	again = malloc(4 * ((n + 2) / 3) + 1);
	if (!again)
		abort();
	EVP_EncodeBlock((unsigned char *)again, out, (int)n);
	while (body && text[body - 1] == '=')
		body--;
	if (body && strncmp(again, text, body - 1))
		abort();
	free(again);
	free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *text = (const char *)data;

	if (size > (1u << 16))
		return 0;
	check_v3(text, size);
	check_v2(text, size);
	check_b64(text, size);
	return 0;
}
