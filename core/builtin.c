/*
 * builtin.c - the built-in exclusive filters: `callback`, a claimable slot
 * whose holder is a C function (the embedding API and the tests claim it
 * with ezp_filter_claim, key "callback:NAME"), and `remote`, the slot the
 * API's WebSocket filter claims (key "remote"). Unclaimed, packets pass
 * them and a session keeps its zero-copy fast path.
 * Thread: create/destroy control; there are no per-packet callbacks here:
 * the core calls the holder directly.
 */
#include <stddef.h>
#include <stdlib.h>

#include "core.h"

struct callback_conf {
	char *name;
};

static const struct ezp_param callback_params[] = {
	{"Name", EZP_PARAM_STRING, offsetof(struct callback_conf, name), NULL, 1, 0, 0,
	 "the name a program claims this filter by (ezp_filter_claim key \"callback:NAME\")"},
	EZP_PARAM_END,
};

static int callback_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
			   struct ezp_error *err)
{
	(void)ctx;
	(void)err;
	*instance = (void *)config;
	return EZP_OK;
}

static void callback_destroy(void *instance)
{
	(void)instance;
}

static const struct ezp_filter_kind callback_kind = {
	.struct_size = sizeof(struct ezp_filter_kind),
	.name = "callback",
	.description = "runs a C function registered by the embedding program",
	.flags = EZP_FILTER_EXCLUSIVE | EZP_FILTER_READS_PAYLOAD,
	.params = callback_params,
	.config_size = sizeof(struct callback_conf),
	.create = callback_create,
	.destroy = callback_destroy,
};

static int remote_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
			 struct ezp_error *err)
{
	(void)ctx;
	(void)config;
	(void)err;
	*instance = NULL;
	return EZP_OK;
}

static const struct ezp_filter_kind remote_kind = {
	.struct_size = sizeof(struct ezp_filter_kind),
	.name = "remote",
	.description = "lets one API client (a WebSocket in filter mode) pass, drop, replace "
		       "or hold each packet",
	.flags = EZP_FILTER_EXCLUSIVE | EZP_FILTER_READS_PAYLOAD,
	.params = NULL,
	.config_size = 0,
	.create = remote_create,
	.destroy = callback_destroy,
};

static const struct ezp_filter_kind *const builtin_filters[] = {&callback_kind, &remote_kind,
								NULL};

const struct ezp_plugin_desc ezp__builtin_plugin = {
	.struct_size = sizeof(struct ezp_plugin_desc),
	.abi_major = EZP_ABI_MAJOR,
	.abi_minor = EZP_ABI_MINOR,
	.name = "core",
	.version = "0.1.0",
	.description = "filters built into the core",
	.license = "MIT",
	.filters = builtin_filters,
};
