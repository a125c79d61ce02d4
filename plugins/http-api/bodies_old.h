/*
 * bodies_old.h - the old v1 API's body and query parsers (bodies_old.c):
 * pure functions on jansson and libcrypto, also linked by the fuzz target.
 * Thread: any.
 */
#ifndef EZP_HTTP_API_BODIES_OLD_H
#define EZP_HTTP_API_BODIES_OLD_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct api_old_inject {
	int64_t id;	     /* a session id, or -1 for every session */
	unsigned char *data; /* malloc'd; NULL when len is 0 */
	size_t len;
	bool to_client, to_server;
};

int api_old_inject_parse(const char *body, size_t len, struct api_old_inject *out, char *err,
			 size_t err_len);
void api_old_inject_clear(struct api_old_inject *in);
int api_old_perms_parse(const char *text, int64_t *out);
const char *api_old_newkey_refused(uint32_t have, uint32_t want);
json_t *api_old_keyinfo_json(uint32_t perms);
unsigned char *api_old_b64_decode(const char *text, size_t text_len, size_t *out_len);

#endif
