/*
 * prefix_drop.c - an out-of-tree EzProxy filter plugin: drops packets
 * going to the server that start with a configured prefix, and counts
 * them. Built with nothing but the SDK headers:
 *
 *   cc -shared -fPIC -o prefix_drop.so prefix_drop.c $(pkg-config --cflags ezproxy-sdk)
 *
 * Use it in a pipeline:
 *
 *   Through:
 *     - prefix-drop: { Prefix: "BAD", Direction: to_server }
 *
 * Thread: create runs on the control thread, packet on each worker with
 * that worker's own instance, so the counter needs no lock.
 */
#include <ezproxy/sdk.h>
#include <stdlib.h>
#include <string.h>

struct pd_conf {
	char *prefix;    /* Prefix */
	char *direction; /* Direction: to_server, to_client or both */
};

static const struct ezp_param pd_params[] = {
	{"Prefix", EZP_PARAM_STRING, offsetof(struct pd_conf, prefix), NULL, 1, 0, 0,
	 "drop packets that start with these bytes"},
	{"Direction", EZP_PARAM_STRING, offsetof(struct pd_conf, direction), "to_server", 0, 0, 0,
	 "to_server, to_client or both"},
	EZP_PARAM_END,
};

struct pd {
	const struct ezp_core *core;
	const struct pd_conf *conf;
	size_t prefix_len;
	int dirs;      /* bit 0: to_server, bit 1: to_client */
	unsigned long dropped;
};

static int pd_create(const struct ezp_filter_ctx *ctx, const void *config, void **instance,
		     struct ezp_error *err)
{
	const struct pd_conf *conf = config;
	struct pd *pd;
	int dirs;

	if (!strcmp(conf->direction, "to_server"))
		dirs = 1;
	else if (!strcmp(conf->direction, "to_client"))
		dirs = 2;
	else if (!strcmp(conf->direction, "both"))
		dirs = 3;
	else {
		err->code = EZP_ERR_CONFIG;
		strcpy(err->message, "prefix-drop: Direction must be to_server, to_client or both");
		return EZP_ERR_CONFIG;
	}
	pd = calloc(1, sizeof(*pd));
	if (!pd)
		return EZP_ERR_NOMEM;
	pd->core = ctx->core;
	pd->conf = conf;
	pd->prefix_len = strlen(conf->prefix);
	pd->dirs = dirs;
	*instance = pd;
	return EZP_OK;
}

static int pd_packet(void *instance, struct ezp_filter_call *call)
{
	struct pd *pd = instance;
	const struct ezp_packet *pkt = call->pkt;

	if (!(pd->dirs & (1 << pkt->dir)) || pkt->len < pd->prefix_len ||
	    memcmp(pkt->data, pd->conf->prefix, pd->prefix_len) != 0)
		return EZP_VERDICT_PASS;
	pd->dropped++;
	return EZP_VERDICT_DROP;
}

static void pd_destroy(void *instance)
{
	struct pd *pd = instance;

	if (pd->dropped)
		pd->core->log(EZP_LOG_INFO, "prefix-drop", "dropped %lu packet(s)", pd->dropped);
	free(pd);
}

static const struct ezp_filter_kind pd_kind = {
	.struct_size = sizeof(struct ezp_filter_kind),
	.name = "prefix-drop",
	.description = "drops packets that start with a prefix",
	.flags = EZP_FILTER_READS_PAYLOAD,
	.params = pd_params,
	.config_size = sizeof(struct pd_conf),
	.create = pd_create,
	.packet = pd_packet,
	.destroy = pd_destroy,
};

static const struct ezp_filter_kind *const pd_filters[] = {&pd_kind, NULL};

EZP_PLUGIN_DEFINE(ezp_plugin,
	.name = "prefix-drop",
	.version = "1.0.0",
	.description = "example out-of-tree filter",
	.license = "MIT",
	.filters = pd_filters);
