/*
 * routes_v3_keys.c - the v3 key routes (DESIGN.md section 8): list, create
 * (the key text is answered once and never logged), show the caller's own
 * key, and revoke (never a key with permissions the caller lacks). Keys
 * are the auth plugin's ("ezp.auth"); with Api.Auth: false these answer
 * 501 `not_available`, but keys/self.
 *
 * Thread: the service loop.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "bodies.h"

#define MK EZP_PERM_MAKE_KEYS

static const char *v3_name(struct api_req *r)
{
	return r->n_params ? r->params[0] : "";
}

static const struct ezp_auth *v3_auth(struct api_req *r)
{
	if (!r->api->auth)
		api_error(r, MHD_HTTP_NOT_IMPLEMENTED, "not_available",
			  "keys are off: the API runs with Api.Auth: false");
	return r->api->auth;
}

static void v3_keys(struct api_req *r)
{
	const struct ezp_auth *a = v3_auth(r);
	struct ezp_key_info *ks = NULL;
	size_t n = 0;
	json_t *list;

	if (!a)
		return;
	if (a->list(a->auth, &ks, &n) != EZP_OK) {
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "cannot list keys");
		return;
	}
	list = json_array();
	for (size_t i = 0; list && i < n; i++)
		json_array_append_new(list, body_key_json(&ks[i]));
	free(ks);
	api_reply_json(r, MHD_HTTP_OK, json_pack("{s:o}", "keys", list));
}

static void v3_key_create(struct api_req *r)
{
	const struct ezp_auth *a = v3_auth(r);
	struct ezp_key_info info = {.struct_size = sizeof(info)};
	struct ezp_error err = {0};
	struct body_err e;
	char key[65];
	const char *name;
	uint32_t perms;
	json_t *o, *k;

	if (!a || !(o = api_body_object(r)))
		return;
	if (body_key_parse(o, &perms, &name, &e)) {
		api_error_body(r, &e);
	} else if (a->create(a->auth, r->key_id, r->perms, perms, name, key, &info, &err) !=
		   EZP_OK) {
		api_error_from(r, &err, "key");
	} else {
		k = body_key_json(&info);
		if (k)
			json_object_set_new(k, "key", json_string(key));
		api_reply_json(r, MHD_HTTP_CREATED, k);
		explicit_bzero(key, sizeof(key));
	}
	json_decref(o);
}

static void v3_key_self(struct api_req *r)
{
	struct ezp_key_info info = {.struct_size = sizeof(info)};
	const struct ezp_auth *a = r->api->auth;

	if (!a) {
		api_reply_json(r, MHD_HTTP_OK,
			       json_pack("{s:n, s:s, s:i, s:o, s:b}", "id", "name", "", "perms",
					 (int)r->perms, "perm_names", api_perms_json(r->perms),
					 "auth", 0));
		return;
	}
	if (a->get(a->auth, r->key_id, &info) != EZP_OK) {
		api_error(r, MHD_HTTP_UNAUTHORIZED, "unauthorized", "this key was revoked");
		return;
	}
	api_reply_json(r, MHD_HTTP_OK, body_key_json(&info));
}

static void v3_key_delete(struct api_req *r)
{
	const struct ezp_auth *a = v3_auth(r);
	struct ezp_key_info info = {.struct_size = sizeof(info)};
	struct ezp_error err = {0};
	uint32_t extra;
	json_t *names;
	char *text;

	if (!a)
		return;
	if (a->get(a->auth, v3_name(r), &info) != EZP_OK) {
		api_error(r, MHD_HTTP_NOT_FOUND, "key_not_found", "no key '%.20s'", v3_name(r));
		return;
	}
	extra = info.perms & ~r->perms;
	if (extra) {
		names = api_perms_json(extra);
		text = names ? json_dumps(names, JSON_COMPACT) : NULL;
		api_error(r, MHD_HTTP_FORBIDDEN, "forbidden",
			  "key %s has permissions this key lacks: %s", info.id, text ? text : "");
		free(text);
		json_decref(names);
		return;
	}
	if (a->revoke(a->auth, info.id, &err) != EZP_OK)
		api_error_from(r, &err, "key");
	else
		api_reply_empty(r);
}

const struct api_route api_routes_v3_keys[] = {
    {"GET", "/api/3/keys", MK, 3, v3_keys},
    {"POST", "/api/3/keys", MK, 3, v3_key_create},
    {"GET", "/api/3/keys/self", 0, 3, v3_key_self},
    {"DELETE", "/api/3/keys/{id}", MK, 3, v3_key_delete},
    {NULL, NULL, 0, 0, NULL},
};
