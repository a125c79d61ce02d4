/*
 * fuzz_config.c - libFuzzer target for the config reader. Any bytes must
 * parse or fail cleanly; a config that parses must dump to YAML that parses
 * back to an equal config, and its kind items must copy to equal items.
 * Build: clang -g -fsanitize=fuzzer,address,undefined -Isdk/include -Icore \
 *          core/config*.c tests/fuzz/fuzz_config.c -lyaml
 * Thread: libFuzzer's.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

struct t_conf {
	struct ezp_addr addr;
	int64_t n;
	int flag;
};
struct f_conf {
	char *s;
	int64_t ms;
	double d;
	int b;
	int64_t i;
	char *opt;
};

static const struct ezp_param t_listen[] = {
    {"Listen", EZP_PARAM_ADDR, offsetof(struct t_conf, addr), NULL, 1, 0, 0, "bind"},
    {"Backlog", EZP_PARAM_INT, offsetof(struct t_conf, n), "128", 0, 1, 65535, "q"},
    {"NoDelay", EZP_PARAM_BOOL, offsetof(struct t_conf, flag), "true", 0, 0, 0, "nd"},
    EZP_PARAM_END};
static const struct ezp_param t_connect[] = {
    {"Connect", EZP_PARAM_ADDR, offsetof(struct t_conf, addr), NULL, 1, 0, 0, "to"},
    {"TimeoutMs", EZP_PARAM_MS, offsetof(struct t_conf, n), "10000", 0, 1, 600000, "t"},
    EZP_PARAM_END};
static const struct ezp_param f_params[] = {
    {"Script", EZP_PARAM_STRING, offsetof(struct f_conf, s), "\"x y\"", 0, 0, 0, "s"},
    {"Mode", EZP_PARAM_STRING, offsetof(struct f_conf, opt), NULL, 0, 0, 0, "m"},
    {"LatencyMs", EZP_PARAM_MS, offsetof(struct f_conf, ms), "0", 0, 0, 0, "l"},
    {"Loss", EZP_PARAM_DOUBLE, offsetof(struct f_conf, d), "0.5", 0, 0, 0, "d"},
    {"On", EZP_PARAM_BOOL, offsetof(struct f_conf, b), "yes", 0, 0, 0, "b"},
    {"Count", EZP_PARAM_INT, offsetof(struct f_conf, i), "-1", 0, -5, 5, "c"},
    EZP_PARAM_END};
static const struct ezp_param none[] = {EZP_PARAM_END};

static const struct ezp_transport_kind tcp = {.struct_size = sizeof(struct ezp_transport_kind),
					      .name = "tcp",
					      .listen_params = t_listen,
					      .listen_config_size = sizeof(struct t_conf),
					      .connect_params = t_connect,
					      .connect_config_size = sizeof(struct t_conf)};
static const struct ezp_transport_kind udp = {.struct_size = sizeof(struct ezp_transport_kind),
					      .name = "udp",
					      .listen_params = t_listen,
					      .listen_config_size = sizeof(struct t_conf),
					      .connect_params = t_connect,
					      .connect_config_size = sizeof(struct t_conf)};
static const struct ezp_transport_kind sink = {.struct_size = sizeof(struct ezp_transport_kind),
					       .name = "sink",
					       .connect_params = none,
					       .connect_config_size = 0};
static const struct ezp_filter_kind lua = {.struct_size = sizeof(struct ezp_filter_kind),
					   .name = "lua",
					   .params = f_params,
					   .config_size = sizeof(struct f_conf)};
static const struct ezp_filter_kind count = {.struct_size = sizeof(struct ezp_filter_kind),
					     .name = "count"};

static const struct ezp_transport_kind *fz_transport(void *arg, const char *name)
{
	(void)arg;
	if (!strcmp(name, "tcp"))
		return &tcp;
	if (!strcmp(name, "udp"))
		return &udp;
	return !strcmp(name, "sink") ? &sink : NULL;
}

static const struct ezp_filter_kind *fz_filter(void *arg, const char *name)
{
	(void)arg;
	if (!strcmp(name, "lua") || !strcmp(name, "fault"))
		return &lua;
	return !strcmp(name, "count") ? &count : NULL;
}

static int fz_paths(void *arg, char *const *paths, size_t n, struct ezp_error *err)
{
	(void)arg;
	(void)err;
	for (size_t i = 0; i < n; i++) {
		if (!paths[i] || !*paths[i])
			abort();
	}
	return EZP_OK;
}

static const struct ezp__kind_lookup lookup = {NULL, fz_transport, fz_filter, fz_paths};

static void check_round_trip(const struct ezp__config *cfg)
{
	struct ezp__config *back = NULL;
	struct ezp_error err;
	char *text = ezp__config_dump(cfg);

	if (!text)
		abort();
	if (ezp__config_parse(text, strlen(text), "dump", &lookup, &back, &err) != EZP_OK)
		abort(); /* the dump must always read back */
	if (back->n_pipelines != cfg->n_pipelines || back->workers != cfg->workers ||
	    back->n_plugin_paths != cfg->n_plugin_paths || back->api.enabled != cfg->api.enabled ||
	    back->log_level != cfg->log_level || strcmp(back->api.listen, cfg->api.listen))
		abort();
	for (size_t i = 0; i < cfg->n_pipelines; i++) {
		struct ezp__kind_conf k;
		if (!ezp__pipeline_conf_equal(&cfg->pipelines[i], &back->pipelines[i]))
			abort();
		if (ezp__kind_conf_copy(&k, &cfg->pipelines[i].from) != EZP_OK)
			continue;
		if (!ezp__kind_conf_equal(&k, &cfg->pipelines[i].from))
			abort();
		ezp__kind_conf_clear(&k);
	}
	ezp__config_free(back);
	free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct ezp__config *cfg = NULL;
	struct ezp__kind_conf kc;
	struct ezp_error err;
	char *s;

	if (ezp__config_parse((const char *)data, size, "fuzz", &lookup, &cfg, &err) == EZP_OK) {
		check_round_trip(cfg);
		ezp__config_free(cfg);
	} else if (cfg) {
		abort(); /* outputs only on success */
	}
	if (!(s = malloc(size + 1)))
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	if (ezp__kind_conf_parse(s, (int)(size % 3), &lookup, &kc, &err) == EZP_OK)
		ezp__kind_conf_clear(&kc);
	free(s);
	return 0;
}
