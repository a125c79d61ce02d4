/*
 * b64.h - strict standard base64 (b64.c), shared by the REST bodies and
 * the WebSocket client messages. Decoding accepts the standard alphabet
 * only, '=' only as the last one or two characters, and missing padding;
 * one stray character (a length of 4k+1) is refused.
 *
 * Thread: any.
 */
#ifndef EZP_HTTP_API_B64_H
#define EZP_HTTP_API_B64_H

#include <stddef.h>

/* malloc'd and NUL-terminated ("" for @len 0), NULL when out of memory or too long. */
char *api_b64_encode(const void *data, size_t len);
/* Decode the @n bytes at @text. malloc'd (at least 1 byte), *@len set; NULL if bad. */
unsigned char *api_b64_decode_n(const char *text, size_t n, size_t *len);
/* As api_b64_decode_n, for a NUL-terminated @text. */
unsigned char *api_b64_decode(const char *text, size_t *len);

#endif
