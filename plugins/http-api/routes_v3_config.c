/*
 * routes_v3_config.c - the v3 config routes (DESIGN.md section 8): read the
 * running config (YAML and JSON), replace it from YAML text or a JSON body
 * (written back to the config file), and reload the file.
 *
 * Thread: the service loop.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api.h"
#include "bodies.h"

#define RC EZP_PERM_RECONFIGURE

#define CTL(r) ((r)->api->ctl)
#define CTX(r) ((r)->api->ctx)

static json_t *v3_str_or_null(const char *s)
{
	return s ? json_string(s) : json_null();
}

static void v3_config_get(struct api_req *r)
{
	char *yaml = CTL(r)->config_dump(CTX(r));
	json_t *cfg;

	if (!yaml) {
		api_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal", "cannot dump the config");
		return;
	}
	cfg = api_yaml_to_json(yaml);
	api_reply_json(r, MHD_HTTP_OK,
		       json_pack("{s:o, s:s, s:o}", "file",
				 v3_str_or_null(CTL(r)->config_file(CTX(r))), "yaml", yaml,
				 "config", cfg ? cfg : json_null()));
	free(yaml);
}

static bool v3_is_yaml_type(const char *ct)
{
	static const char *const types[] = {"application/yaml", "application/x-yaml", "text/yaml",
					    "text/x-yaml",	"text/plain",	      NULL};

	for (size_t i = 0; ct && types[i]; i++) {
		size_t n = strlen(types[i]);
		if (!strncasecmp(ct, types[i], n) &&
		    (ct[n] == '\0' || ct[n] == ';' || ct[n] == ' '))
			return true;
	}
	return false;
}

static void v3_config_put(struct api_req *r)
{
	struct ezp_error err = {0};
	struct body_err e;
	const char *yaml = NULL, *file;
	char *made = NULL;
	json_t *o = NULL, *cfg = NULL;

	if (v3_is_yaml_type(api_header(r, MHD_HTTP_HEADER_CONTENT_TYPE))) {
		if (!r->body_len) {
			api_error(r, MHD_HTTP_BAD_REQUEST, "bad_request",
				  "the body is empty: send the new config file's text");
			return;
		}
		if (strlen(r->body) != r->body_len) {
			api_error(r, MHD_HTTP_BAD_REQUEST, "bad_request",
				  "the config text contains a NUL byte");
			return;
		}
		yaml = r->body;
	} else {
		if (!(o = api_body_object(r)))
			return;
		if (body_config_parse(o, &yaml, &cfg, &e)) {
			api_error_body(r, &e);
			goto done;
		}
		if (cfg && !(yaml = made = api_json_to_yaml(cfg))) {
			api_error_field(r, MHD_HTTP_BAD_REQUEST, "bad_request", "config",
					"config: cannot be written as YAML");
			goto done;
		}
	}
	if (CTL(r)->config_replace(CTX(r), yaml, 1, &err) != EZP_OK) {
		api_error_from(r, &err, "config");
		goto done;
	}
	file = CTL(r)->config_file(CTX(r));
	api_reply_json(r, MHD_HTTP_OK,
		       json_pack("{s:b, s:o}", "applied", 1, "written", v3_str_or_null(file)));
done:
	free(made);
	json_decref(o);
}

static void v3_config_reload(struct api_req *r)
{
	struct ezp_error err = {0};

	if (CTL(r)->config_reload(CTX(r), &err) != EZP_OK)
		api_error_from(r, &err, "config_file");
	else
		api_reply_json(r, MHD_HTTP_OK,
			       json_pack("{s:b, s:o}", "applied", 1, "file",
					 v3_str_or_null(CTL(r)->config_file(CTX(r)))));
}

const struct api_route api_routes_v3_config[] = {
    {"GET", "/api/3/config", RC, 3, v3_config_get},
    {"PUT", "/api/3/config", RC, 3, v3_config_put},
    {"POST", "/api/3/config/reload", RC, 3, v3_config_reload},
    {NULL, NULL, 0, 0, NULL},
};
