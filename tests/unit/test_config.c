/*
 * test_config.c - unit tests for core/config*.c: the new and the old
 * config forms against fake transport and filter kinds, every error class
 * with its position, kind items, equality, copies, the dump round trip and
 * the address helpers. Thread: the test's own (control).
 */
/* cmocka.h needs these first, in this order */
/* clang-format off */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>
/* clang-format on */

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

/* ---- fake kinds -------------------------------------------------------- */

struct tcp_listen {
	struct ezp_addr listen;
	int64_t backlog;
	int nodelay;
};
struct tcp_connect {
	struct ezp_addr connect;
	int64_t timeout_ms;
};
struct udp_listen {
	struct ezp_addr listen;
	int64_t idle_ms;
};
struct udp_connect {
	struct ezp_addr connect;
};
struct fault_conf {
	char *name;
	int64_t latency_ms;
	double loss;
	int enabled;
	int64_t count;
	char *note;
	char *label;
};
struct lua_conf {
	char *script;
	char *mode;
};

static const struct ezp_param tcp_listen_params[] = {
    {"Listen", EZP_PARAM_ADDR, offsetof(struct tcp_listen, listen), NULL, 1, 0, 0, "bind"},
    {"Backlog", EZP_PARAM_INT, offsetof(struct tcp_listen, backlog), "128", 0, 1, 65535, "q"},
    {"NoDelay", EZP_PARAM_BOOL, offsetof(struct tcp_listen, nodelay), "true", 0, 0, 0, "nd"},
    EZP_PARAM_END};
static const struct ezp_param tcp_connect_params[] = {
    {"Connect", EZP_PARAM_ADDR, offsetof(struct tcp_connect, connect), NULL, 1, 0, 0, "to"},
    {"TimeoutMs", EZP_PARAM_MS, offsetof(struct tcp_connect, timeout_ms), "10000", 0, 1, 600000,
     "t"},
    EZP_PARAM_END};
static const struct ezp_param udp_listen_params[] = {
    {"Listen", EZP_PARAM_ADDR, offsetof(struct udp_listen, listen), NULL, 1, 0, 0, "bind"},
    {"IdleTimeoutMs", EZP_PARAM_MS, offsetof(struct udp_listen, idle_ms), "60000", 0, 0, 0, "idle"},
    EZP_PARAM_END};
static const struct ezp_param udp_connect_params[] = {
    {"Connect", EZP_PARAM_ADDR, offsetof(struct udp_connect, connect), NULL, 1, 0, 0, "to"},
    EZP_PARAM_END};
static const struct ezp_param fault_params[] = {
    {"Name", EZP_PARAM_STRING, offsetof(struct fault_conf, name), "\"main fault\"", 0, 0, 0, "n"},
    {"LatencyMs", EZP_PARAM_MS, offsetof(struct fault_conf, latency_ms), "0", 0, 0, 600000, "l"},
    {"Loss", EZP_PARAM_DOUBLE, offsetof(struct fault_conf, loss), "0.0", 0, 0, 0, "loss"},
    {"Enabled", EZP_PARAM_BOOL, offsetof(struct fault_conf, enabled), "on", 0, 0, 0, "e"},
    {"Count", EZP_PARAM_INT, offsetof(struct fault_conf, count), "-1", 0, -5, 5, "c"},
    {"Note", EZP_PARAM_STRING, offsetof(struct fault_conf, note), NULL, 0, 0, 0, "note"},
    {"Label", EZP_PARAM_STRING, offsetof(struct fault_conf, label), "'it''s'", 0, 0, 0, "lb"},
    EZP_PARAM_END};
static const struct ezp_param lua_params[] = {
    {"Script", EZP_PARAM_STRING, offsetof(struct lua_conf, script), NULL, 1, 0, 0, "file"},
    {"Mode", EZP_PARAM_STRING, offsetof(struct lua_conf, mode), "callback", 0, 0, 0, "mode"},
    EZP_PARAM_END};

static const struct ezp_transport_kind tcp_kind = {.struct_size = sizeof(struct ezp_transport_kind),
						   .name = "tcp",
						   .listen_params = tcp_listen_params,
						   .listen_config_size = sizeof(struct tcp_listen),
						   .connect_params = tcp_connect_params,
						   .connect_config_size =
						       sizeof(struct tcp_connect)};
static const struct ezp_transport_kind udp_kind = {.struct_size = sizeof(struct ezp_transport_kind),
						   .name = "udp",
						   .listen_params = udp_listen_params,
						   .listen_config_size = sizeof(struct udp_listen),
						   .connect_params = udp_connect_params,
						   .connect_config_size =
						       sizeof(struct udp_connect)};
static const struct ezp_param sink_params[] = {EZP_PARAM_END};
static const struct ezp_transport_kind sink_kind = {/* connects only, no parameters */
						    .struct_size =
							sizeof(struct ezp_transport_kind),
						    .name = "sink",
						    .connect_params = sink_params,
						    .connect_config_size = 0};
static const struct ezp_filter_kind fault_kind = {.struct_size = sizeof(struct ezp_filter_kind),
						  .name = "fault",
						  .params = fault_params,
						  .config_size = sizeof(struct fault_conf)};
static const struct ezp_filter_kind lua_kind = {.struct_size = sizeof(struct ezp_filter_kind),
						.name = "lua",
						.params = lua_params,
						.config_size = sizeof(struct lua_conf)};
static const struct ezp_param broken_params[] = {{"X", EZP_PARAM_INT, 64, "1", 0, 0, 0, "x"},
						 EZP_PARAM_END};
static const struct ezp_filter_kind broken_kind = {/* offset past config_size */
						   .struct_size = sizeof(struct ezp_filter_kind),
						   .name = "broken",
						   .params = broken_params,
						   .config_size = 8};
static const struct ezp_filter_kind count_kind = {/* no parameters at all */
						  .struct_size = sizeof(struct ezp_filter_kind),
						  .name = "count"};

struct fake {
	int no_lua, no_tcp, no_fault;
	int paths_calls, lookups, lookups_before_paths;
	size_t n_paths;
	char paths[4][64];
	int paths_fail;
};

static const struct ezp_transport_kind *fake_transport(void *arg, const char *name)
{
	struct fake *f = arg;

	f->lookups++;
	if (!f->paths_calls)
		f->lookups_before_paths++;
	if (!strcmp(name, "tcp") && !f->no_tcp)
		return &tcp_kind;
	if (!strcmp(name, "udp"))
		return &udp_kind;
	if (!strcmp(name, "sink"))
		return &sink_kind;
	return NULL;
}

/* The core's `remote` slot: no parameters of its own. */
static const struct ezp_filter_kind remote_kind = {
    .struct_size = sizeof(struct ezp_filter_kind),
    .name = "remote",
    .flags = EZP_FILTER_EXCLUSIVE,
};

static const struct ezp_filter_kind *fake_filter(void *arg, const char *name)
{
	struct fake *f = arg;

	f->lookups++;
	if (!f->paths_calls)
		f->lookups_before_paths++;
	if (!strcmp(name, "fault") && !f->no_fault)
		return &fault_kind;
	if (!strcmp(name, "lua") && !f->no_lua)
		return &lua_kind;
	if (!strcmp(name, "count"))
		return &count_kind;
	if (!strcmp(name, "broken"))
		return &broken_kind;
	if (!strcmp(name, "remote"))
		return &remote_kind;
	return NULL;
}

static int fake_paths(void *arg, char *const *paths, size_t n, struct ezp_error *err)
{
	struct fake *f = arg;

	f->paths_calls++;
	f->n_paths = n;
	for (size_t i = 0; i < n && i < 4; i++)
		snprintf(f->paths[i], sizeof(f->paths[i]), "%s", paths[i]);
	if (f->paths_fail)
		return ezp__error_set(err, EZP_ERR_PLUGIN, EZP_SIDE_INTERNAL, NULL, 0, 0,
				      "cannot open plugin folder '%s'", n ? paths[0] : "?");
	return EZP_OK;
}

static struct fake fk;
static struct ezp__kind_lookup lk;

static int setup(void **state)
{
	(void)state;
	memset(&fk, 0, sizeof(fk));
	lk.arg = &fk;
	lk.transport = fake_transport;
	lk.filter = fake_filter;
	lk.plugin_paths = fake_paths;
	return 0;
}

/* ---- helpers --------------------------------------------------------------- */

static struct ezp__config *parse_ok(const char *text)
{
	struct ezp__config *cfg = NULL;
	struct ezp_error err;
	int rc;

	memset(&err, 0, sizeof(err));
	rc = ezp__config_parse(text, strlen(text), "t.yaml", &lk, &cfg, &err);
	if (rc != EZP_OK)
		print_error("unexpected error: %s:%d:%d: %s\n", err.file, err.line, err.column,
			    err.message);
	assert_int_equal(rc, EZP_OK);
	assert_non_null(cfg);
	return cfg;
}

/* Parse @text, expect @code with @msg in the message and (when line > 0) the position. */
static void parse_err(const char *text, int code, const char *msg, int line, int column)
{
	struct ezp__config *cfg = (struct ezp__config *)0x1;
	struct ezp_error err;
	int rc;

	memset(&err, 0, sizeof(err));
	rc = ezp__config_parse(text, strlen(text), "t.yaml", &lk, &cfg, &err);
	if (rc != code || !strstr(err.message, msg) || (line > 0 && err.line != line) ||
	    (line > 0 && err.column != column))
		print_error("for %s\n got rc %d at %d:%d: %s\n want %d at %d:%d: %s\n", text, rc,
			    err.line, err.column, err.message, code, line, column, msg);
	assert_int_equal(rc, code);
	assert_ptr_equal(cfg, (struct ezp__config *)0x1); /* untouched on failure */
	assert_non_null(strstr(err.message, msg));
	assert_int_equal(err.code, code);
	if (code == EZP_ERR_CONFIG) {
		assert_int_equal(err.side, EZP_SIDE_CONFIG);
		assert_string_equal(err.file, "t.yaml");
	}
	if (line > 0) {
		assert_int_equal(err.line, line);
		assert_int_equal(err.column, column);
	}
}

static const char *fmt_addr(const struct ezp_addr *a)
{
	static char buf[4][EZP_ADDR_STRLEN];
	static int i;

	i = (i + 1) % 4;
	return ezp__addr_format(a, buf[i], sizeof(buf[i]));
}

static int config_equal(const struct ezp__config *a, const struct ezp__config *b)
{
	if (a->workers != b->workers || a->log_level != b->log_level ||
	    a->log_format != b->log_format || a->n_plugin_paths != b->n_plugin_paths ||
	    a->n_pipelines != b->n_pipelines || memcmp(&a->limits, &b->limits, sizeof(a->limits)))
		return 0;
	if ((a->state_dir || b->state_dir) &&
	    (!a->state_dir || !b->state_dir || strcmp(a->state_dir, b->state_dir)))
		return 0;
	for (size_t i = 0; i < a->n_plugin_paths; i++) {
		if (strcmp(a->plugin_paths[i], b->plugin_paths[i]))
			return 0;
	}
#define SAME_STR(x, y) ((!(x) && !(y)) || ((x) && (y) && !strcmp((x), (y))))
	if (a->api.enabled != b->api.enabled || a->api.auth != b->api.auth ||
	    !SAME_STR(a->api.listen, b->api.listen) ||
	    !SAME_STR(a->api.tls_cert, b->api.tls_cert) ||
	    !SAME_STR(a->api.tls_key, b->api.tls_key) || !SAME_STR(a->api.origin, b->api.origin))
		return 0;
	for (size_t i = 0; i < a->n_pipelines; i++) {
		if (!ezp__pipeline_conf_equal(&a->pipelines[i], &b->pipelines[i]))
			return 0;
	}
	return 1;
}

/* dump @cfg, parse it back, compare; returns the reparsed config's dump equality too. */
static void round_trip(const struct ezp__config *cfg)
{
	struct ezp__config *back = NULL;
	struct ezp_error err;
	char *text = ezp__config_dump(cfg), *again;
	int rc;

	assert_non_null(text);
	memset(&err, 0, sizeof(err));
	rc = ezp__config_parse(text, strlen(text), "dump", &lk, &back, &err);
	if (rc)
		print_error("dump does not parse: %d:%d: %s\n%s", err.line, err.column, err.message,
			    text);
	assert_int_equal(rc, EZP_OK);
	assert_true(config_equal(cfg, back));
	again = ezp__config_dump(back);
	assert_non_null(again);
	assert_string_equal(text, again);
	free(again);
	free(text);
	ezp__config_free(back);
}

/* ---- the new form ------------------------------------------------------------ */

static const char full_yaml[] =
    "Workers: 4\n"
    "StateDir: /var/lib/ezproxy\n"
    "Plugins:\n"
    "  Path: [plugins/, /opt/ezp]\n"
    "Api:\n"
    "  Listen: 0.0.0.0:9090\n"
    "  Auth: no\n"
    "  Tls: { Cert: cert.pem, Key: key.pem }\n"
    "  Origin: http://example.com\n"
    "Limits:\n"
    "  MaxSessions: 500\n"
    "  TapBuffer: 16\n"
    "Pipelines:\n"
    "  - Name: game\n"
    "    From: { tcp: { Listen: 0.0.0.0:5554, Backlog: 64, NoDelay: OFF } }\n"
    "    Through:\n"
    "      - lua: { Script: filter.lua }\n"
    "      - fault: { LatencyMs: 50, Loss: 0.25, Count: -5, HoldWindow: 8, Default: drop,\n"
    "                 HoldTimeoutMs: 100, AllLegs: yes, Note: \"a \\\"quoted\\\" note\" }\n"
    "      - count:\n"
    "    To: { tcp: { Connect: '[2001:db8::5]:5555', TimeoutMs: 250 } }\n"
    "    Shared: true\n"
    "    Limits: { MaxSessions: 7, MaxPacket: 512 }\n"
    "  - Name: game-udp\n"
    "    From: { udp: { Listen: 0.0.0.0:5554, IdleTimeoutMs: 60000 } }\n"
    "    To: { udp: { Connect: 10.0.0.5:5555 } }\n"
    "Logging: { Level: DEBUG, Format: json }\n";

static void test_new_full(void **state)
{
	struct ezp__config *cfg = parse_ok(full_yaml);
	struct ezp__pipeline_conf *p;
	const struct tcp_listen *tl;
	const struct tcp_connect *tc;
	const struct fault_conf *fc;
	const struct lua_conf *lc;

	(void)state;
	assert_string_equal(cfg->file, "t.yaml");
	assert_int_equal(cfg->legacy, 0);
	assert_int_equal(cfg->workers, 4);
	assert_string_equal(cfg->state_dir, "/var/lib/ezproxy");
	assert_int_equal(cfg->n_plugin_paths, 2);
	assert_string_equal(cfg->plugin_paths[0], "plugins/");
	assert_string_equal(cfg->plugin_paths[1], "/opt/ezp");
	assert_int_equal(fk.paths_calls, 1);
	assert_int_equal(fk.n_paths, 2);
	assert_string_equal(fk.paths[1], "/opt/ezp");
	assert_int_equal(fk.lookups_before_paths, 0);
	assert_int_equal(cfg->api.enabled, 1);
	assert_string_equal(cfg->api.listen, "0.0.0.0:9090");
	assert_int_equal(cfg->api.auth, 0);
	assert_string_equal(cfg->api.tls_cert, "cert.pem");
	assert_string_equal(cfg->api.tls_key, "key.pem");
	assert_string_equal(cfg->api.origin, "http://example.com");
	assert_int_equal(cfg->log_level, EZP_LOG_DEBUG);
	assert_int_equal(cfg->log_format, EZP__LOG_JSON);
	assert_int_equal(cfg->limits.max_sessions, 500);
	assert_int_equal(cfg->limits.tap_buffer, 16);
	assert_int_equal(cfg->limits.max_client_legs, 8);
	assert_int_equal(cfg->n_pipelines, 2);

	p = &cfg->pipelines[0];
	assert_string_equal(p->name, "game");
	assert_int_equal(p->line, 14);
	assert_int_equal(p->column, 5);
	assert_string_equal(p->from.kind, "tcp");
	assert_ptr_equal(p->from.transport, &tcp_kind);
	assert_ptr_equal(p->from.params, tcp_listen_params);
	assert_int_equal(p->from.line, 15);
	assert_int_equal(p->from.column, 13);
	tl = p->from.config;
	assert_string_equal(fmt_addr(&tl->listen), "0.0.0.0:5554");
	assert_int_equal(tl->backlog, 64);
	assert_int_equal(tl->nodelay, 0);
	assert_int_equal(p->n_through, 3);
	assert_ptr_equal(p->through[0].filter, &lua_kind);
	lc = p->through[0].config;
	assert_string_equal(lc->script, "filter.lua");
	assert_string_equal(lc->mode, "callback");
	assert_int_equal(p->through[0].hold.window, 64);
	assert_int_equal(p->through[0].hold.timeout_ms, 5000);
	assert_int_equal(p->through[0].hold.default_drop, 0);
	assert_int_equal(p->through[0].hold.all_legs, 0);
	fc = p->through[1].config;
	assert_string_equal(fc->name, "main fault");
	assert_int_equal(fc->latency_ms, 50);
	assert_true(fc->loss == 0.25);
	assert_int_equal(fc->enabled, 1);
	assert_int_equal(fc->count, -5);
	assert_string_equal(fc->note, "a \"quoted\" note");
	assert_string_equal(fc->label, "it's");
	assert_int_equal(p->through[1].hold.window, 8);
	assert_int_equal(p->through[1].hold.timeout_ms, 100);
	assert_int_equal(p->through[1].hold.default_drop, 1);
	assert_int_equal(p->through[1].hold.all_legs, 1);
	assert_string_equal(p->through[2].kind, "count");
	assert_null(p->through[2].config);
	assert_int_equal(p->through[2].hold.window, 64);
	tc = p->to.config;
	assert_string_equal(fmt_addr(&tc->connect), "[2001:db8::5]:5555");
	assert_int_equal(tc->timeout_ms, 250);
	assert_int_equal(p->shared, 1);
	assert_int_equal(p->limits.max_sessions, 7);
	assert_int_equal(p->limits.max_packet, 512);
	assert_int_equal(p->limits.tap_buffer, 16); /* inherited from the top level */
	assert_int_equal(p->limits.max_inject_bytes, 1048576);

	p = &cfg->pipelines[1];
	assert_string_equal(p->name, "game-udp");
	assert_int_equal(((const struct udp_listen *)p->from.config)->idle_ms, 60000);
	assert_string_equal(fmt_addr(&((const struct udp_connect *)p->to.config)->connect),
			    "10.0.0.5:5555");
	assert_int_equal(p->n_through, 0);
	assert_null(p->through);
	assert_int_equal(p->shared, 0);
	assert_int_equal(p->limits.max_sessions, 500);
	ezp__config_free(cfg);
}

static void test_defaults(void **state)
{
	struct ezp__config *cfg = parse_ok("Pipelines:\n"
					   "  - Name: a\n"
					   "    From: { tcp: { Listen: ':1' } }\n"
					   "    To:\n"
					   "      sink:\n");
	const struct tcp_listen *tl;

	(void)state;
	assert_int_equal(cfg->workers, 0);
	assert_null(cfg->state_dir);
	assert_int_equal(cfg->n_plugin_paths, 0);
	assert_int_equal(fk.paths_calls, 1);   /* told even when there is no Plugins key */
	assert_int_equal(cfg->api.enabled, 0); /* no Api key: no API */
	assert_string_equal(cfg->api.listen, "127.0.0.1:8080");
	assert_int_equal(cfg->api.auth, 1);
	assert_null(cfg->api.tls_cert);
	assert_null(cfg->api.origin);
	assert_int_equal(cfg->log_level, EZP_LOG_INFO);
	assert_int_equal(cfg->log_format, EZP__LOG_TEXT);
	assert_int_equal(cfg->limits.max_sessions, 10000);
	assert_int_equal(cfg->limits.max_client_legs, 8);
	assert_int_equal(cfg->limits.max_inject_bytes, 1048576);
	assert_int_equal(cfg->limits.tap_buffer, 4096);
	assert_int_equal(cfg->limits.max_packet, 65536);
	assert_memory_equal(&cfg->pipelines[0].limits, &cfg->limits, sizeof(cfg->limits));
	tl = cfg->pipelines[0].from.config;
	assert_string_equal(fmt_addr(&tl->listen), "0.0.0.0:1");
	assert_int_equal(tl->backlog, 128);
	assert_int_equal(tl->nodelay, 1);
	assert_string_equal(cfg->pipelines[0].to.kind, "sink");
	assert_null(cfg->pipelines[0].to.config);
	round_trip(cfg);
	ezp__config_free(cfg);

	/* an empty file and a file of only comments are valid: nothing to run */
	cfg = parse_ok("");
	assert_int_equal(cfg->n_pipelines, 0);
	ezp__config_free(cfg);
	cfg = parse_ok("# nothing\n");
	assert_int_equal(cfg->n_pipelines, 0);
	ezp__config_free(cfg);
	cfg = parse_ok("Api:\nPipelines: []\nWorkers: AUTO\n");
	assert_int_equal(cfg->api.enabled, 1); /* Api given (empty): on, with defaults */
	assert_int_equal(cfg->workers, 0);
	ezp__config_free(cfg);
	cfg = parse_ok(
	    "Api: { Tls: ~, Origin: ~ }\nLogging:\nLimits: {}\n"
	    "Pipelines:\n  - { Name: x.y_z-1, From: { tcp: { Listen: ':1' } }, To: { sink: {} },"
	    " Through: ~, Shared: ~, Limits: ~ }\n");
	assert_null(cfg->api.tls_cert);
	assert_null(cfg->api.origin);
	assert_int_equal(cfg->pipelines[0].n_through, 0);
	assert_int_equal(cfg->pipelines[0].shared, 0);
	assert_int_equal(cfg->pipelines[0].limits.max_sessions, 10000);
	ezp__config_free(cfg);
	cfg = parse_ok("Api: { Enable: false, Listen: localhost:81 }\nPlugins: { Path: one }\n");
	assert_int_equal(cfg->api.enabled, 0);
	assert_string_equal(cfg->api.listen, "127.0.0.1:81");
	assert_int_equal(cfg->n_plugin_paths, 1);
	assert_string_equal(cfg->plugin_paths[0], "one");
	ezp__config_free(cfg);
}

static void test_builtin_default(void **state)
{
	struct ezp__config *cfg = parse_ok(ezp__default_config);

	(void)state;
	assert_int_equal(cfg->workers, 0);
	assert_int_equal(cfg->api.enabled, 1);
	assert_int_equal(cfg->api.auth, 1);
	assert_string_equal(cfg->api.listen, "127.0.0.1:8080");
	assert_int_equal(cfg->log_level, EZP_LOG_INFO);
	assert_int_equal(cfg->n_pipelines, 2);
	assert_string_equal(cfg->pipelines[0].name, "default");
	assert_string_equal(cfg->pipelines[1].name, "default-udp");
	assert_string_equal(cfg->pipelines[0].from.kind, "tcp");
	assert_string_equal(cfg->pipelines[1].to.kind, "udp");
	assert_string_equal(
	    fmt_addr(&((const struct tcp_listen *)cfg->pipelines[0].from.config)->listen),
	    "127.0.0.1:5554");
	assert_string_equal(
	    fmt_addr(&((const struct udp_connect *)cfg->pipelines[1].to.config)->connect),
	    "127.0.0.1:5555");
	round_trip(cfg);
	ezp__config_free(cfg);

	/* with a plugin providing the fault kind the default has a fault stage after remote */
	cfg = parse_ok(ezp__default_config_for(&lk));
	for (int k = 0; k < 2; k++) {
		assert_int_equal(cfg->pipelines[k].n_through, 2);
		assert_ptr_equal(cfg->pipelines[k].through[0].filter, &remote_kind);
		assert_ptr_equal(cfg->pipelines[k].through[1].filter, &fault_kind);
	}
	round_trip(cfg);
	ezp__config_free(cfg);
	fk.no_fault = 1;
	assert_ptr_equal(ezp__default_config_for(&lk), ezp__default_config);
	fk.no_fault = 0;
	cfg = parse_ok(ezp__default_config);
	ezp__config_free(cfg);
}

static void test_aliases_real(void **state)
{
	struct ezp__config *cfg =
	    parse_ok("Pipelines:\n"
		     "  - Name: a\n"
		     "    From: &from { tcp: { Listen: &addr 127.0.0.1:7 } }\n"
		     "    Through: &chain\n"
		     "      - &f fault: { LatencyMs: &ms 5 }\n"
		     "    To: { tcp: { Connect: *addr, TimeoutMs: *ms } }\n"
		     "  - Name: b\n"
		     "    From: *from\n"
		     "    Through: *chain\n"
		     "    To: { udp: { Connect: *addr } }\n");

	(void)state;
	assert_int_equal(cfg->n_pipelines, 2);
	assert_true(ezp__kind_conf_equal(&cfg->pipelines[0].from, &cfg->pipelines[1].from));
	assert_true(
	    ezp__kind_conf_equal(&cfg->pipelines[0].through[0], &cfg->pipelines[1].through[0]));
	assert_int_equal(((const struct tcp_connect *)cfg->pipelines[0].to.config)->timeout_ms, 5);
	assert_string_equal(
	    fmt_addr(&((const struct udp_connect *)cfg->pipelines[1].to.config)->connect),
	    "127.0.0.1:7");
	ezp__config_free(cfg);
}

static void test_plugins_first(void **state)
{
	struct ezp__config *cfg;

	(void)state;
	cfg = parse_ok("Pipelines:\n"
		       "  - { Name: a, From: { tcp: { Listen: ':1' } }, To: { sink: } }\n"
		       "Plugins:\n"
		       "  Path: /usr/lib/ezp\n");
	assert_int_equal(fk.paths_calls, 1);
	assert_int_equal(fk.lookups_before_paths, 0);
	assert_true(fk.lookups > 0);
	assert_int_equal(fk.n_paths, 1);
	assert_string_equal(fk.paths[0], "/usr/lib/ezp");
	ezp__config_free(cfg);

	fk.paths_fail = 1;
	parse_err("Plugins:\n  Path: [/nope]\n", EZP_ERR_PLUGIN,
		  "cannot open plugin folder '/nope'", 2, 9);
	fk.paths_fail = 0;
	lk.plugin_paths = NULL; /* optional */
	cfg = parse_ok("Plugins: { Path: [a, b] }\n");
	assert_int_equal(cfg->n_plugin_paths, 2);
	ezp__config_free(cfg);
}

/* ---- errors ---------------------------------------------------------------- */

static const char pipe_ok[] = "Pipelines:\n"
			      "  - Name: game\n"
			      "    From: { tcp: { Listen: 0.0.0.0:5554 } }\n"
			      "    To: { tcp: { Connect: 10.0.0.5:5555 } }\n";

static void test_err_keys(void **state)
{
	(void)state;
	parse_err("Workers: 2\nPipelinez: []\n", EZP_ERR_CONFIG,
		  "unknown key 'Pipelinez' in the top level (expected one of: Workers, StateDir, "
		  "Plugins, Api, Logging, Limits, Pipelines)",
		  2, 1);
	parse_err("Pipelines:\n  - Name: game\n    From: { tcp: { Listn: 1.2.3.4:5 } }\n",
		  EZP_ERR_CONFIG,
		  "unknown key 'Listn' in Pipelines[0].From.tcp (expected one of: Listen, Backlog, "
		  "NoDelay)",
		  3, 20);
	parse_err("Workers: 2\nLogging: {}\nWorkers: 3\n", EZP_ERR_CONFIG,
		  "duplicate key 'Workers' in the top level (first given at line 1)", 3, 1);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    To: { sink: }\n  - Name: b\n    Name: c\n",
		  EZP_ERR_CONFIG, "duplicate key 'Name' in Pipelines[1]", 6, 5);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1', Listen: ':2' } }\n",
		  EZP_ERR_CONFIG, "duplicate key 'Listen' in Pipelines[0].From.tcp", 3, 34);
	parse_err("Api: { Tls: { Cert: a, Key: b, Key: c } }\n", EZP_ERR_CONFIG,
		  "duplicate key 'Key' in Api.Tls", 1, 32);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Holdwindow: 3 } ]\n",
		  EZP_ERR_CONFIG,
		  "unknown key 'Holdwindow' in Pipelines[0].Through[0].fault (expected one of: "
		  "Name, LatencyMs, Loss, Enabled, Count, Note, Label, HoldWindow, HoldTimeoutMs, "
		  "Default, AllLegs)",
		  4, 25);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ count: { X: 1 } ]\n",
		  EZP_ERR_CONFIG,
		  "unknown key 'X' in Pipelines[0].Through[0].count (expected one "
		  "of: HoldWindow, HoldTimeoutMs, Default, AllLegs)",
		  4, 25);
	parse_err("Limits: { MaxSession: 4 }\n", EZP_ERR_CONFIG,
		  "unknown key 'MaxSession' in "
		  "Limits (expected one of: MaxSessions, MaxClientLegs, MaxInjectBytes, TapBuffer, "
		  "MaxPacket)",
		  1, 11);
	parse_err("Api: { UseAuth: true, Listen: ':1' }\n", EZP_ERR_CONFIG,
		  "unknown key 'Listen' in Api (expected one of: Enable, UseAuth, Address)", 1, 23);
	parse_err("? [a]\n: 1\n", EZP_ERR_CONFIG, "the top level: keys must be single words", 1, 3);
	parse_err("Logging: { Level: info, Colour: red }\n", EZP_ERR_CONFIG,
		  "unknown key 'Colour' in Logging (expected one of: Level, Format)", 1, 25);
}

static void test_err_values(void **state)
{
	(void)state;
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: abc } }\n", EZP_ERR_CONFIG,
		  "Pipelines[0].From.tcp.Listen: 'abc' is not an address (use HOST:PORT, "
		  "[V6]:PORT or :PORT)",
		  3, 28);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: example.com:80 } }\n",
		  EZP_ERR_CONFIG, "names are not looked up", 3, 28);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: '1.2.3.4:65536' } }\n",
		  EZP_ERR_CONFIG, "the port must be a number 0..65535", 3, 28);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1', Backlog: 0 } }\n",
		  EZP_ERR_CONFIG, "Pipelines[0].From.tcp.Backlog: 0 is out of range (1..65535)", 3,
		  43);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1', NoDelay: maybe } }\n",
		  EZP_ERR_CONFIG,
		  "Pipelines[0].From.tcp.NoDelay: 'maybe' is not a boolean (use "
		  "true or false)",
		  3, 43);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: [1] } }\n", EZP_ERR_CONFIG,
		  "Pipelines[0].From.tcp.Listen: expected an address (HOST:PORT), found a list", 3,
		  28);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Backlog: 5 } }\n", EZP_ERR_CONFIG,
		  "missing required key 'Listen' in Pipelines[0].From.tcp", 3, 13);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ lua: ]\n",
		  EZP_ERR_CONFIG, "missing required key 'Script' in Pipelines[0].Through[0].lua", 4,
		  16);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Loss: 1e999 } ]\n",
		  EZP_ERR_CONFIG, "Loss: '1e999' is not a finite number", 4, 31);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Loss: nan } ]\n",
		  EZP_ERR_CONFIG, "is not a finite number", 4, 31);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { LatencyMs: -1 } ]\n",
		  EZP_ERR_CONFIG, "LatencyMs: -1 is out of range (0..600000)", 4, 36);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Count: 6 } ]\n",
		  EZP_ERR_CONFIG, "Pipelines[0].Through[0].fault.Count: 6 is out of range (-5..5)",
		  4, 32);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Count: 1.5 } ]\n",
		  EZP_ERR_CONFIG, "'1.5' is not an integer", 4, 32);
	parse_err("Pipelines:\n  - Name: a\n    From: { udp: { Listen: ':1', IdleTimeoutMs: "
		  "99999999999999999999 } }\n",
		  EZP_ERR_CONFIG,
		  "Pipelines[0].From.udp.IdleTimeoutMs: 99999999999999999999 does not fit in 64 "
		  "bits",
		  3, 49);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Count: 99999999999999999999 } ]\n",
		  EZP_ERR_CONFIG, "Count: 99999999999999999999 is out of range (-5..5)", 4, 32);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { HoldWindow: 0 } ]\n",
		  EZP_ERR_CONFIG,
		  "Pipelines[0].Through[0].fault.HoldWindow: 0 is out of range "
		  "(1..65536)",
		  4, 37);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { HoldTimeoutMs: 3600001 } ]\n",
		  EZP_ERR_CONFIG, "HoldTimeoutMs: 3600001 is out of range (1..3600000)", 4, 40);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Default: allow } ]\n",
		  EZP_ERR_CONFIG, "fault.Default: 'allow' is not allowed here (use pass or drop)",
		  4, 34);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ fault: { Note: \"a\\0b\" } ]\n",
		  EZP_ERR_CONFIG, "Note: the value contains a NUL character", 4, 31);
	parse_err(
	    "Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n    To: { sink: }\n"
	    "    Limits: { MaxSessions: 0 }\n",
	    EZP_ERR_CONFIG, "Pipelines[0].Limits.MaxSessions: 0 is out of range (1..1000000)", 5,
	    28);
	parse_err("Limits:\n  MaxPacket: 100\n", EZP_ERR_CONFIG,
		  "Limits.MaxPacket: 100 is out of range (512..1048576)", 2, 14);
	parse_err("Workers: 0\n", EZP_ERR_CONFIG, "Workers: 0 is out of range (1..256)", 1, 10);
	parse_err("Workers: 257\n", EZP_ERR_CONFIG, "Workers: 257 is out of range (1..256)", 1, 10);
	parse_err("Workers: many\n", EZP_ERR_CONFIG,
		  "Workers: 'many' is not a number (use auto "
		  "or 1..256)",
		  1, 10);
	parse_err("StateDir: ''\n", EZP_ERR_CONFIG, "StateDir: must not be empty", 1, 11);
	parse_err("StateDir: { a: 1 }\n", EZP_ERR_CONFIG,
		  "StateDir: expected a string, found a "
		  "map",
		  1, 11);
	parse_err("Plugins: { Path: [ok, ''] }\n", EZP_ERR_CONFIG,
		  "Plugins.Path[1]: expected a folder", 1, 23);
	parse_err("Plugins: [a]\n", EZP_ERR_CONFIG, "Plugins: expected a map, found a list", 1, 10);
	parse_err("Api: { Listen: 'localhost' }\n", EZP_ERR_CONFIG,
		  "Api.Listen: 'localhost' is not an address", 1, 16);
	parse_err("Api:\n  Tls: { Cert: c.pem }\n", EZP_ERR_CONFIG,
		  "missing required key 'Key' in Api.Tls", 2, 8);
	parse_err("Api:\n  Auth: 2\n", EZP_ERR_CONFIG, "Api.Auth: '2' is not a boolean", 2, 9);
	parse_err("Logging:\n  Level: loud\n", EZP_ERR_CONFIG,
		  "Logging.Level: 'loud' is not allowed here (use debug, info, warn or error)", 2,
		  10);
	parse_err("Logging: { Format: xml }\n", EZP_ERR_CONFIG,
		  "Logging.Format: 'xml' is not allowed here (use text or json)", 1, 20);
	parse_err("- 1\n- 2\n", EZP_ERR_CONFIG, "the config must be a map of keys", 1, 1);
	parse_err("just text\n", EZP_ERR_CONFIG, "the config must be a map of keys", 1, 1);
}

static void test_err_pipelines(void **state)
{
	(void)state;
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ lua: { Script: x } ]\n",
		  EZP_ERR_CONFIG, "missing required key 'To' in Pipelines[0]", 2, 5);
	fk.no_lua = 1;
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through:\n      - lua: { Script: x }\n    To: { sink: }\n",
		  EZP_ERR_CONFIG,
		  "unknown filter 'lua' in Pipelines[0].Through[0] (no loaded plugin "
		  "provides it; see 'ezproxy plugins')",
		  5, 9);
	fk.no_lua = 0;
	parse_err("Pipelines:\n  - Name: a\n    From: { quic: { Listen: ':1' } }\n", EZP_ERR_CONFIG,
		  "unknown transport 'quic' in Pipelines[0].From (no loaded plugin "
		  "provides it; see 'ezproxy plugins')",
		  3, 13);
	parse_err("Pipelines:\n  - Name: a\n    From: { sink: }\n", EZP_ERR_CONFIG,
		  "transport 'sink' cannot listen (in Pipelines[0].From)", 3, 13);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    To: { fault: }\n",
		  EZP_ERR_CONFIG,
		  "unknown transport 'fault' in "
		  "Pipelines[0].To",
		  4, 11);
	parse_err(
	    "Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n    To: { sink: }\n"
	    "  - Name: b\n    From: { tcp: { Listen: ':2' } }\n    To: { sink: }\n"
	    "  - Name: a\n    From: { tcp: { Listen: ':3' } }\n    To: { sink: }\n",
	    EZP_ERR_CONFIG,
	    "duplicate pipeline name 'a' in Pipelines[2] (already used by "
	    "Pipelines[0])",
	    8, 5);
	parse_err("Pipelines:\n  - Name: 'a b'\n", EZP_ERR_CONFIG,
		  "Pipelines[0].Name: 'a b' is not a valid pipeline name (use 1 to 64 of A-Z a-z "
		  "0-9 _ . -)",
		  2, 11);
	parse_err("Pipelines:\n  - Name: "
		  "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n",
		  EZP_ERR_CONFIG, "is not a valid pipeline name", 2, 11);
	parse_err("Pipelines:\n  - Name: ''\n", EZP_ERR_CONFIG, "is not a valid pipeline name", 2,
		  11);
	parse_err("Pipelines:\n  - Name:\n", EZP_ERR_CONFIG,
		  "missing required key 'Name' in Pipelines[0]", 2, 5);
	parse_err("Pipelines:\n  - From: { tcp: { Listen: ':1' } }\n", EZP_ERR_CONFIG,
		  "missing required key 'Name' in Pipelines[0]", 2, 5);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' }, udp: {} }\n",
		  EZP_ERR_CONFIG, "Pipelines[0].From: give exactly one transport kind, found 2", 3,
		  36);
	parse_err(
	    "Pipelines:\n  - Name: a\n    From: {}\n", EZP_ERR_CONFIG,
	    "Pipelines[0].From: expected a map with one transport kind, e.g. { tcp: { Listen: "
	    "0.0.0.0:5554 } }, found an empty map",
	    3, 11);
	parse_err("Pipelines:\n  - Name: a\n    From: tcp\n", EZP_ERR_CONFIG,
		  "found a single value", 3, 11);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: 5 }\n", EZP_ERR_CONFIG,
		  "Pipelines[0].From.tcp: expected a map of parameters", 3, 18);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: { lua: {} }\n",
		  EZP_ERR_CONFIG, "Pipelines[0].Through: expected a list of filters", 4, 14);
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ lua ]\n",
		  EZP_ERR_CONFIG, "Pipelines[0].Through[0]: expected a map with one filter kind", 4,
		  16);
	parse_err("Pipelines:\n  - Name: a\n    From: { [x]: 1 }\n", EZP_ERR_CONFIG,
		  "Pipelines[0].From: the transport kind must be a name", 3, 13);
	parse_err(
	    "Pipelines:\n  - Name: a\n    Shared: sometimes\n    From: { tcp: { Listen: ':1' } "
	    "}\n    To: { sink: }\n",
	    EZP_ERR_CONFIG, "Pipelines[0].Shared: 'sometimes' is not a boolean", 3, 13);
	parse_err("Pipelines: { Name: a }\n", EZP_ERR_CONFIG, "Pipelines: expected a list", 1, 12);
	parse_err("Pipelines: [ 3 ]\n", EZP_ERR_CONFIG,
		  "Pipelines[0]: expected a map with Name, From and To, found a single value", 1,
		  14);
}

static void test_err_yaml(void **state)
{
	(void)state;
	parse_err("Workers: 2\nApi: [\n", EZP_ERR_CONFIG,
		  "YAML syntax error: did not find "
		  "expected node content",
		  3, 1);
	parse_err("a: b: c\n", EZP_ERR_CONFIG,
		  "YAML syntax error: mapping values are not allowed "
		  "in this context",
		  1, 5);
	parse_err("Workers: *nope\n", EZP_ERR_CONFIG, "YAML syntax error: found undefined alias", 1,
		  10);
	parse_err("Workers: 1\n---\nWorkers: 2\n", EZP_ERR_CONFIG,
		  "the config holds more than one YAML document", 3, 1);
	parse_err("Workers: 1\n---\n: [\n", EZP_ERR_CONFIG, "YAML syntax error", 0, 0);
	parse_err("Workers: \"1\x01\"\n", EZP_ERR_CONFIG, "control characters are not allowed", 1,
		  12);
	parse_err("Workers: 1\nStateDir: \xff\n", EZP_ERR_CONFIG, "not readable text", 2, 11);
	{ /* a NUL byte inside the buffer */
		static const char t[] = "Workers: 1\0\n";
		struct ezp__config *cfg = NULL;
		struct ezp_error err;
		assert_int_equal(ezp__config_parse(t, sizeof(t) - 1, "x", &lk, &cfg, &err),
				 EZP_ERR_CONFIG);
		assert_null(cfg);
	}
}

/* Inputs that once could hang or crash a parser: they must fail or pass quickly. */
static void test_err_hostile(void **state)
{
	struct ezp__config *cfg = NULL;
	struct ezp_error err;
	char *deep;
	size_t n = 20000;

	(void)state;
	parse_err("Pipelines: &p [ *p ]\n", EZP_ERR_CONFIG, "Pipelines[0]: expected a map", 1, 12);
	parse_err("Pipelines:\n  - &a { Name: x, Through: [ *a ] }\n", EZP_ERR_CONFIG,
		  "missing required key 'From' in Pipelines[0]", 2, 5);
	parse_err("a: &a [*a, *a]\nb: &b [*a, *a]\nc: &c [*b, *b]\n", EZP_ERR_CONFIG,
		  "unknown key 'a'", 1, 1);
	/* many pipelines sharing one long filter chain through aliases */
	parse_err(
	    "Pipelines:\n"
	    "  - { Name: a, From: { tcp: { Listen: ':1' } }, To: { sink: }, Through: &t [\n"
	    "      &f { count: }, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f,\n"
	    "      *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f, *f ] }\n"
	    "  - { Name: b, From: { tcp: { Listen: ':1' } }, To: { sink: }, Through: *t }\n"
	    "  - { Name: c, From: { tcp: { Listen: ':1' } }, To: { sink: }, Through: *t }\n"
	    "  - { Name: d, From: { tcp: { Listen: ':1' } }, To: { sink: }, Through: *t }\n",
	    EZP_ERR_CONFIG, "through '*' aliases", 0, 0);
	deep = malloc(2 * n + 16);
	assert_non_null(deep);
	memset(deep, '[', n);
	memset(deep + n, ']', n);
	deep[2 * n] = '\0';
	assert_int_not_equal(ezp__config_parse(deep, 2 * n, "x", &lk, &cfg, &err), EZP_OK);
	free(deep);
	assert_null(cfg);
	assert_int_equal(ezp__config_parse(NULL, 0, NULL, &lk, &cfg, &err), EZP_OK);
	assert_string_equal(cfg->file, "<string>");
	ezp__config_free(cfg);
	cfg = NULL;
	assert_int_equal(ezp__config_parse(pipe_ok, strlen(pipe_ok), "x", NULL, &cfg, &err),
			 EZP_ERR_CONFIG); /* no lookup: every kind is unknown */
	assert_non_null(strstr(err.message, "unknown transport 'tcp'"));
	assert_int_equal(ezp__config_parse(pipe_ok, strlen(pipe_ok), "x", &lk, NULL, &err),
			 EZP_ERR_INVAL);
	assert_int_equal(ezp__config_parse("Workers: 1", 10, "x", &lk, &cfg, NULL), EZP_OK);
	ezp__config_free(cfg);
	cfg = NULL;
	assert_int_equal(ezp__config_parse("Workers: x", 10, "x", &lk, &cfg, NULL), EZP_ERR_CONFIG);
	assert_int_equal(ezp__config_parse(pipe_ok, 5u * 1024 * 1024, "x", &lk, &cfg, &err),
			 EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "larger than 4 MiB"));
	ezp__config_free(NULL);
}

/* ---- the old program's form ------------------------------------------------- */

static const char old_yaml[] = "ProxyAddress:\n"
			       "  Address: &LocalAddress \"\"\n"
			       "  Port: 5554\n"
			       "ServerAddress:\n"
			       "  Address: *LocalAddress\n"
			       "  Port: 5555\n"
			       "Logging:\n"
			       "  Level: warn\n"
			       "Api:\n"
			       "  Enable: true\n"
			       "  UseAuth: true\n"
			       "  Address:\n"
			       "    Address: *LocalAddress\n"
			       "    Port: 8080\n"
			       "Lua:\n"
			       "  Enable: false\n"
			       "  Path: \"\"\n"
			       "  Mode: callback\n";

static void test_legacy(void **state)
{
	struct ezp__config *cfg = parse_ok(old_yaml);
	const struct ezp__pipeline_conf *p;

	(void)state;
	assert_int_equal(cfg->legacy, 1);
	assert_int_equal(cfg->workers, 0);
	assert_int_equal(cfg->log_level, EZP_LOG_WARN);
	assert_int_equal(cfg->api.enabled, 1);
	assert_int_equal(cfg->api.auth, 1);
	assert_string_equal(cfg->api.listen, "127.0.0.1:8080");
	assert_int_equal(cfg->lua.enabled, 0);
	assert_string_equal(cfg->lua.path, "");
	assert_string_equal(cfg->lua.mode, "callback");
	assert_int_equal(fk.paths_calls, 1);
	assert_int_equal(fk.n_paths, 0);
	assert_int_equal(cfg->n_pipelines, 2);
	p = &cfg->pipelines[0];
	assert_string_equal(p->name, "default");
	assert_ptr_equal(p->from.transport, &tcp_kind);
	assert_string_equal(fmt_addr(&((const struct tcp_listen *)p->from.config)->listen),
			    "0.0.0.0:5554");
	assert_int_equal(((const struct tcp_listen *)p->from.config)->backlog, 128);
	assert_string_equal(fmt_addr(&((const struct tcp_connect *)p->to.config)->connect),
			    "127.0.0.1:5555");
	/* Api.Enable: the old program filtered through its WebSocket: the `remote` slot */
	assert_int_equal(p->n_through, 2);
	assert_ptr_equal(p->through[0].filter, &remote_kind);
	/* and a (dormant) fault stage, as a plugin provides the kind */
	assert_ptr_equal(p->through[1].filter, &fault_kind);
	assert_int_equal(p->line, 1);
	assert_int_equal(p->limits.max_sessions, 10000);
	p = &cfg->pipelines[1];
	assert_string_equal(p->name, "default-udp");
	assert_ptr_equal(p->to.transport, &udp_kind);
	assert_string_equal(fmt_addr(&((const struct udp_listen *)p->from.config)->listen),
			    "0.0.0.0:5554");
	assert_string_equal(fmt_addr(&((const struct udp_connect *)p->to.config)->connect),
			    "127.0.0.1:5555");
	round_trip(cfg); /* the dump is the new form */
	ezp__config_free(cfg);

	cfg = parse_ok("ProxyAddress: { Address: 10.1.2.3, Port: 1 }\n"
		       "ServerAddress: { Address: '::1', Port: 2 }\n"
		       "Debug: true\n");
	assert_int_equal(cfg->log_level, EZP_LOG_DEBUG);
	assert_int_equal(cfg->api.enabled, 0);
	assert_string_equal(
	    fmt_addr(&((const struct tcp_listen *)cfg->pipelines[0].from.config)->listen),
	    "10.1.2.3:1");
	assert_string_equal(
	    fmt_addr(&((const struct udp_connect *)cfg->pipelines[1].to.config)->connect),
	    "[::1]:2");
	ezp__config_free(cfg);

	cfg = parse_ok("Api: { Enable: false }\n"); /* nothing new-form: the old form */
	assert_int_equal(cfg->legacy, 1);
	assert_int_equal(cfg->n_pipelines, 2);
	ezp__config_free(cfg);
	fk.no_fault = 1; /* no plugin provides `fault`: only the remote slot */
	cfg = parse_ok(old_yaml);
	assert_int_equal(cfg->pipelines[0].n_through, 1);
	assert_ptr_equal(cfg->pipelines[0].through[0].filter, &remote_kind);
	ezp__config_free(cfg);
	fk.no_fault = 0;
	cfg = parse_ok("Api: { Enable: false, Listen: ':1' }\n");
	assert_int_equal(cfg->legacy, 0);
	assert_int_equal(cfg->n_pipelines, 0);
	ezp__config_free(cfg);
}

static void test_legacy_lua(void **state)
{
	static const char lua_on[] = "ProxyAddress: { Port: 7000 }\n"
				     "Lua:\n"
				     "  Enable: true\n"
				     "  Path: scripts/main.lua\n"
				     "  Mode: main\n";
	struct ezp__config *cfg = parse_ok(lua_on);
	const struct lua_conf *lc;

	(void)state;
	assert_int_equal(cfg->lua.enabled, 1);
	assert_string_equal(cfg->lua.path, "scripts/main.lua");
	assert_string_equal(cfg->lua.mode, "main");
	assert_int_equal(cfg->n_pipelines, 2);
	for (int i = 0; i < 2; i++) {
		assert_int_equal(cfg->pipelines[i].n_through, 2); /* lua, then fault */
		assert_ptr_equal(cfg->pipelines[i].through[1].filter, &fault_kind);
		assert_ptr_equal(cfg->pipelines[i].through[0].filter, &lua_kind);
		lc = cfg->pipelines[i].through[0].config;
		assert_string_equal(lc->script, "scripts/main.lua");
		assert_string_equal(lc->mode, "main");
		assert_int_equal(cfg->pipelines[i].through[0].hold.window, 64);
	}
	assert_string_equal(
	    fmt_addr(&((const struct tcp_listen *)cfg->pipelines[0].from.config)->listen),
	    "0.0.0.0:7000");
	round_trip(cfg);
	ezp__config_free(cfg);

	fk.no_lua = 1;
	parse_err(lua_on, EZP_ERR_CONFIG,
		  "Lua.Enable is true but no loaded plugin provides the "
		  "'lua' filter",
		  3, 3);
	fk.no_lua = 0;
	parse_err("Lua: { Enable: yes }\n", EZP_ERR_CONFIG,
		  "Lua.Enable is true but Lua.Path is "
		  "empty",
		  1, 8);
	parse_err("Lua: { Mode: sometimes }\n", EZP_ERR_CONFIG,
		  "Lua.Mode: 'sometimes' is not allowed here (use main or callback)", 1, 14);
}

static void test_legacy_errors(void **state)
{
	(void)state;
	fk.no_tcp = 1;
	parse_err(old_yaml, EZP_ERR_CONFIG,
		  "the old program's form (ProxyAddress, ServerAddress) "
		  "needs it but no loaded plugin provides the 'tcp' transport",
		  1, 1);
	fk.no_tcp = 0;
	parse_err("ProxyAddress: { Port: 1 }\nPipelines: []\n", EZP_ERR_CONFIG,
		  "key 'Pipelines' cannot be mixed with the old program's keys", 2, 1);
	parse_err("ProxyAddress: { Port: 1, Host: x }\n", EZP_ERR_CONFIG,
		  "unknown key 'Host' in ProxyAddress (expected one of: Address, Port)", 1, 26);
	parse_err("Debug: true\nDebg: 1\n", EZP_ERR_CONFIG,
		  "unknown key 'Debg' in the top level (expected one of: ProxyAddress, "
		  "ServerAddress, Logging, Api, Lua, Debug)",
		  2, 1);
	parse_err("Debug: true\nDebug: false\n", EZP_ERR_CONFIG,
		  "duplicate key 'Debug' in the top level", 2, 1);
	parse_err("ProxyAddress: { Port: 70000 }\n", EZP_ERR_CONFIG,
		  "ProxyAddress.Port: 70000 is out of range (0..65535)", 1, 23);
	parse_err("ServerAddress: { Address: game.example.com }\n", EZP_ERR_CONFIG,
		  "ServerAddress.Address: 'game.example.com' is not an IP address", 1, 27);
	parse_err("Api: { UseAuth: false, Address: '1.2.3.4:5' }\n", EZP_ERR_CONFIG,
		  "Api.Address: expected a map, found a single value", 1, 33);
	parse_err("Api: { UseAuth: false }\nLogging: { Level: warn, Format: text }\n",
		  EZP_ERR_CONFIG, "unknown key 'Format' in Logging (expected one of: Level)", 2,
		  25);
}

/* ---- kind items, equality, copies ---------------------------------------------- */

static void test_kind_conf_parse(void **state)
{
	struct ezp__kind_conf kc, k2;
	struct ezp_error err;

	(void)state;
	memset(&kc, 0, sizeof(kc));
	assert_int_equal(ezp__kind_conf_parse("tcp: {Connect: 127.0.0.1:9}", 0, &lk, &kc, &err),
			 EZP_OK);
	assert_string_equal(kc.kind, "tcp");
	assert_ptr_equal(kc.params, tcp_connect_params);
	assert_int_equal(kc.config_size, sizeof(struct tcp_connect));
	assert_string_equal(fmt_addr(&((const struct tcp_connect *)kc.config)->connect),
			    "127.0.0.1:9");
	assert_int_equal(((const struct tcp_connect *)kc.config)->timeout_ms, 10000);
	assert_int_equal(kc.line, 1);
	assert_int_equal(kc.column, 1);

	assert_int_equal(
	    ezp__kind_conf_parse("{ tcp: { Connect: '127.0.0.1:9' } }", 0, &lk, &k2, &err), EZP_OK);
	assert_true(ezp__kind_conf_equal(&kc, &k2));
	ezp__kind_conf_clear(&k2);
	assert_int_equal(
	    ezp__kind_conf_parse("{ tcp: { Connect: '127.0.0.1:10' } }", 0, &lk, &k2, &err),
	    EZP_OK);
	assert_false(ezp__kind_conf_equal(&kc, &k2));
	ezp__kind_conf_clear(&k2);
	ezp__kind_conf_clear(&kc);
	ezp__kind_conf_clear(&kc); /* a cleared conf clears again */
	ezp__kind_conf_clear(NULL);

	assert_int_equal(
	    ezp__kind_conf_parse("{fault: {Default: drop, Note: hi}}", 1, &lk, &kc, &err), EZP_OK);
	assert_ptr_equal(kc.filter, &fault_kind);
	assert_int_equal(kc.hold.default_drop, 1);
	assert_string_equal(((const struct fault_conf *)kc.config)->note, "hi");
	ezp__kind_conf_clear(&kc);

	assert_int_equal(
	    ezp__kind_conf_parse("udp: { Listen: '[::]:53' }", EZP__KIND_LISTEN, &lk, &kc, &err),
	    EZP_OK);
	assert_ptr_equal(kc.params, udp_listen_params);
	assert_string_equal(fmt_addr(&((const struct udp_listen *)kc.config)->listen), "[::]:53");
	ezp__kind_conf_clear(&kc);

	memset(&kc, 0x5a, sizeof(kc)); /* untouched on failure */
	assert_int_equal(ezp__kind_conf_parse("tcp: {Listen: ':1'}", 0, &lk, &kc, &err),
			 EZP_ERR_CONFIG);
	assert_string_equal(err.message, "unknown key 'Listen' in tcp (expected one of: Connect, "
					 "TimeoutMs)");
	assert_string_equal(err.file, "<string>");
	assert_int_equal(err.line, 1);
	assert_int_equal(err.column, 7);
	assert_int_equal(ezp__kind_conf_parse("tcp: {Connect: x}", 0, &lk, &kc, &err),
			 EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "tcp.Connect: 'x' is not an address"));
	assert_int_equal(ezp__kind_conf_parse("nope: {}", 1, &lk, &kc, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "unknown filter 'nope' in the top level"));
	assert_int_equal(ezp__kind_conf_parse("sink:", EZP__KIND_LISTEN, &lk, &kc, &err),
			 EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "transport 'sink' cannot listen"));
	assert_int_equal(ezp__kind_conf_parse("", 0, &lk, &kc, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "expected a map with one transport kind"));
	assert_int_equal(ezp__kind_conf_parse(NULL, 0, &lk, &kc, &err), EZP_ERR_CONFIG);
	assert_int_equal(ezp__kind_conf_parse("{a: 1, b: 2}", 0, &lk, &kc, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "give exactly one transport kind, found 2"));
	assert_int_equal(ezp__kind_conf_parse("[", 0, &lk, &kc, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "YAML syntax error"));
	assert_int_equal(ezp__kind_conf_parse("tcp: {Connect: ':1'}", 0, &lk, NULL, &err),
			 EZP_ERR_INVAL);
	assert_int_equal(kc.line, 0x5a5a5a5a);
}

static void test_through_parse(void **state)
{
	struct ezp__kind_conf *items = (struct ezp__kind_conf *)0x1;
	struct ezp_error err;
	size_t n = 77;

	(void)state;
	assert_int_equal(
	    ezp__through_parse("- lua: { Script: a.lua }\n- count:\n", &lk, &items, &n, &err),
	    EZP_OK);
	assert_int_equal(n, 2);
	assert_string_equal(((const struct lua_conf *)items[0].config)->script, "a.lua");
	assert_ptr_equal(items[1].filter, &count_kind);
	for (size_t i = 0; i < n; i++)
		ezp__kind_conf_clear(&items[i]);
	free(items);
	for (int i = 0; i < 3; i++) {
		static const char *const empty[] = {"", "~", "[]"};
		n = 77;
		assert_int_equal(ezp__through_parse(empty[i], &lk, &items, &n, &err), EZP_OK);
		assert_int_equal(n, 0);
		free(items);
	}
	items = (struct ezp__kind_conf *)0x1;
	n = 77;
	assert_int_equal(
	    ezp__through_parse("- count:\n- lua: { Scrip: x }\n", &lk, &items, &n, &err),
	    EZP_ERR_CONFIG);
	assert_string_equal(err.message,
			    "unknown key 'Scrip' in Through[1].lua (expected one of: "
			    "Script, Mode, HoldWindow, HoldTimeoutMs, Default, AllLegs)");
	assert_int_equal(err.line, 2);
	assert_int_equal(err.column, 10);
	assert_int_equal(ezp__through_parse("{ lua: {} }", &lk, &items, &n, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "must be a list of filter items"));
	assert_ptr_equal(items, (struct ezp__kind_conf *)0x1);
	assert_int_equal(n, 77);
}

static void test_equal_copy(void **state)
{
	struct ezp__config *a = parse_ok(full_yaml), *b;
	struct ezp__kind_conf k;
	struct fault_conf *fc;

	(void)state;
	b = parse_ok(full_yaml);
	assert_true(config_equal(a, b));
	for (size_t i = 0; i < a->n_pipelines; i++)
		assert_true(ezp__pipeline_conf_equal(&a->pipelines[i], &b->pipelines[i]));
	assert_false(ezp__pipeline_conf_equal(&a->pipelines[0], &b->pipelines[1]));

	/* each field that matters makes a difference */
	b->pipelines[0].shared = 0;
	assert_false(ezp__pipeline_conf_equal(&a->pipelines[0], &b->pipelines[0]));
	b->pipelines[0].shared = 1;
	b->pipelines[0].limits.max_client_legs++;
	assert_false(ezp__pipeline_conf_equal(&a->pipelines[0], &b->pipelines[0]));
	b->pipelines[0].limits.max_client_legs--;
	b->pipelines[0].through[1].hold.all_legs = 0;
	assert_false(ezp__pipeline_conf_equal(&a->pipelines[0], &b->pipelines[0]));
	b->pipelines[0].through[1].hold.all_legs = 1;
	b->pipelines[0].n_through--;
	assert_false(ezp__pipeline_conf_equal(&a->pipelines[0], &b->pipelines[0]));
	b->pipelines[0].n_through++;
	b->pipelines[0].line = 99; /* positions do not count */
	assert_true(ezp__pipeline_conf_equal(&a->pipelines[0], &b->pipelines[0]));

	fc = b->pipelines[0].through[1].config;
	fc->loss = 0.5;
	assert_false(
	    ezp__kind_conf_equal(&a->pipelines[0].through[1], &b->pipelines[0].through[1]));
	fc->loss = 0.25;
	free(fc->note);
	fc->note = strdup("other");
	assert_false(
	    ezp__kind_conf_equal(&a->pipelines[0].through[1], &b->pipelines[0].through[1]));
	free(fc->note);
	fc->note = NULL;
	assert_false(
	    ezp__kind_conf_equal(&a->pipelines[0].through[1], &b->pipelines[0].through[1]));
	assert_false(ezp__kind_conf_equal(&a->pipelines[0].from, &a->pipelines[1].from));
	assert_false(ezp__kind_conf_equal(&a->pipelines[0].from, &a->pipelines[0].to));

	/* copies are deep and equal */
	assert_int_equal(ezp__kind_conf_copy(&k, &a->pipelines[0].through[1]), EZP_OK);
	assert_true(ezp__kind_conf_equal(&k, &a->pipelines[0].through[1]));
	assert_ptr_not_equal(k.kind, a->pipelines[0].through[1].kind);
	assert_ptr_not_equal(((struct fault_conf *)k.config)->note,
			     ((struct fault_conf *)a->pipelines[0].through[1].config)->note);
	ezp__kind_conf_clear(&k);
	assert_int_equal(ezp__kind_conf_copy(&k, &a->pipelines[0].through[2]), EZP_OK);
	assert_null(k.config);
	assert_true(ezp__kind_conf_equal(&k, &a->pipelines[0].through[2]));
	ezp__kind_conf_clear(&k);
	ezp__config_free(a);
	ezp__config_free(b);
}

static void test_params_defaults(void **state)
{
	struct fault_conf fc;
	struct tcp_listen tl;
	struct ezp_error err;

	(void)state;
	memset(&fc, 0, sizeof(fc));
	assert_int_equal(ezp__params_defaults(fault_params, &fc, &err), EZP_OK);
	assert_string_equal(fc.name, "main fault");
	assert_string_equal(fc.label, "it's");
	assert_null(fc.note);
	assert_int_equal(fc.enabled, 1);
	assert_int_equal(fc.count, -1);
	ezp__params_clear(fault_params, &fc);
	assert_null(fc.name);
	assert_null(fc.label);
	ezp__params_clear(fault_params, NULL);
	ezp__params_clear(NULL, &fc);

	memset(&tl, 0, sizeof(tl));
	assert_int_equal(ezp__params_defaults(tcp_listen_params, &tl, &err), EZP_ERR_CONFIG);
	assert_string_equal(err.message, "missing required key 'Listen' in this kind");
	assert_int_equal(ezp__params_defaults(NULL, NULL, &err), EZP_OK);

	{ /* a plugin whose default does not parse is reported, not trusted */
		static const struct ezp_param bad[] = {
		    {"Port", EZP_PARAM_INT, 0, "eighty", 0, 0, 0, "p"}, EZP_PARAM_END};
		int64_t v = 0;
		assert_int_equal(ezp__params_defaults(bad, &v, &err), EZP_ERR_CONFIG);
		assert_non_null(strstr(err.message, "Port (the plugin's default): 'eighty' is not "
						    "an integer"));
	}
	/* a table that points outside its struct is refused, not written */
	parse_err("Pipelines:\n  - Name: a\n    From: { tcp: { Listen: ':1' } }\n"
		  "    Through: [ broken: { X: 1 } ]\n",
		  EZP_ERR_CONFIG,
		  "parameter 'X' of 'broken' has a bad type or lies outside its config struct "
		  "(a bug in its plugin)",
		  4, 16);
}

/* ---- the dump ------------------------------------------------------------------ */

static void test_dump(void **state)
{
	struct ezp__config *cfg = parse_ok(full_yaml);
	char *text;

	(void)state;
	round_trip(cfg);
	text = ezp__config_dump(cfg);
	assert_non_null(strstr(text, "Workers: 4\n"));
	assert_non_null(strstr(text, "Api:\n  Enable: true\n  Listen: \"0.0.0.0:9090\"\n"
				     "  Auth: false\n  Tls:\n    Cert: \"cert.pem\"\n"));
	assert_non_null(strstr(text, "Logging:\n  Level: debug\n  Format: json\n"));
	assert_non_null(strstr(text, "      - \"fault\":\n          Name: \"main fault\"\n"));
	assert_non_null(strstr(text, "          HoldWindow: 8\n"));
	assert_non_null(strstr(text, "          Default: drop\n"));
	assert_non_null(strstr(text, "          Note: \"a \\\"quoted\\\" note\"\n"));
	assert_non_null(strstr(text, "    To:\n      \"tcp\":\n        Connect: "
				     "\"[2001:db8::5]:5555\"\n        TimeoutMs: 250\n"));
	assert_non_null(strstr(text, "    Shared: true\n    Limits:\n      MaxSessions: 7\n"));
	free(text);
	ezp__config_free(cfg);

	/* strings YAML would fold or refuse come back byte for byte */
	cfg = parse_ok("StateDir: \"tab\\there\\nnl \\x7f \\u0085 \\u2028 \\\\ \\\" é 𝄞 \\x01 "
		       "\\uFEFF #: - ? ' *a &b !c %d @e `f\"\n"
		       "Api: { Origin: \" lead and trail \", Tls: { Cert: '-', Key: '~' } }\n"
		       "Plugins: { Path: ['null', 'true', '{x}', '[y]', '# z'] }\n"
		       "Pipelines:\n"
		       "  - Name: x\n"
		       "    From: { tcp: { Listen: '[::ffff:1.2.3.4]:0' } }\n"
		       "    Through: [ fault: { Loss: 0.1, Note: '', Name: \"\\t\" } ]\n"
		       "    To: { sink: }\n");
	assert_string_equal(cfg->plugin_paths[0], "null");
	assert_string_equal(cfg->api.tls_key, "~");
	round_trip(cfg);
	text = ezp__config_dump(cfg);
	assert_non_null(strstr(text, "Workers: auto\n"));
	assert_non_null(strstr(text, "Pipelines:\n  - Name: \"x\"\n"));
	free(text);
	ezp__config_free(cfg);

	cfg = parse_ok(
	    "Pipelines:\n  - Name: d\n    From: { tcp: { Listen: ':1' } }\n"
	    "    Through:\n      - fault: { Loss: 0x1p-1074 }\n      - fault: { Loss: -0.0 }\n"
	    "      - fault: { Loss: 0.1 }\n      - fault: { Loss: 1e308 }\n"
	    "      - fault: { Loss: 4.9406564584124654e-324 }\n"
	    "    To: { sink: }\n");
	assert_true(((const struct fault_conf *)cfg->pipelines[0].through[0].config)->loss > 0);
	round_trip(cfg); /* doubles come back exactly */
	ezp__config_free(cfg);

	cfg = parse_ok("Pipelines: []\n");
	round_trip(cfg);
	ezp__config_free(cfg);
	assert_null(ezp__config_dump(NULL));
}

/* ---- addresses, errors, files ---------------------------------------------------- */

static void test_addr(void **state)
{
	static const struct {
		const char *in, *out;
	} good[] = {
	    {"1.2.3.4:5", "1.2.3.4:5"},
	    {":80", "0.0.0.0:80"},
	    {"localhost:8080", "127.0.0.1:8080"},
	    {"LocalHost:1", "127.0.0.1:1"},
	    {"0.0.0.0:0", "0.0.0.0:0"},
	    {"255.255.255.255:65535", "255.255.255.255:65535"},
	    {"[::1]:5", "[::1]:5"},
	    {"[::]:0", "[::]:0"},
	    {"[2001:DB8:0:0:0:0:0:1]:443", "[2001:db8::1]:443"},
	    {"[::ffff:10.0.0.1]:9", "[::ffff:10.0.0.1]:9"},
	    {"127.0.0.1:00080", "127.0.0.1:80"},
	};
	static const char *const bad[] = {"",
					  "abc",
					  "1.2.3.4",
					  "1.2.3.4:",
					  ":",
					  "1.2.3.4:65536",
					  "1.2.3.4:-1",
					  "1.2.3.4:+1",
					  "1.2.3.4:1x",
					  "1.2.3.4:123456",
					  "1.2.3:5",
					  "1.2.3.4.5:6",
					  "256.1.1.1:1",
					  "::1:5",
					  "[::1]",
					  "[::1]5",
					  "[::1]:",
					  "[]:5",
					  "[1.2.3.4]:5",
					  "[::1:5",
					  "example.com:80",
					  " 1.2.3.4:5",
					  "1.2.3.4:5 ",
					  "[fe80::1%eth0]:5",
					  "[::1]:5:6",
					  "0x7f.1:80"};
	struct ezp_addr a;
	struct ezp_error err;
	char buf[EZP_ADDR_STRLEN], tiny[4];

	(void)state;
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		memset(&a, 0x33, sizeof(a));
		if (ezp__addr_parse(good[i].in, &a, &err) != EZP_OK)
			print_error("'%s': %s\n", good[i].in, err.message);
		assert_int_equal(ezp__addr_parse(good[i].in, &a, &err), EZP_OK);
		assert_string_equal(ezp__addr_format(&a, buf, sizeof(buf)), good[i].out);
	}
	assert_int_equal(ezp__addr_parse("1.2.3.4:5", &a, NULL), EZP_OK);
	assert_int_equal(a.len, sizeof(struct sockaddr_in));
	assert_int_equal(a.ss.ss_family, AF_INET);
	assert_int_equal(ntohs(((struct sockaddr_in *)&a.ss)->sin_port), 5);
	assert_int_equal(ezp__addr_parse("[::1]:6", &a, NULL), EZP_OK);
	assert_int_equal(a.len, sizeof(struct sockaddr_in6));
	assert_int_equal(a.ss.ss_family, AF_INET6);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memset(&a, 0x33, sizeof(a));
		memset(&err, 0, sizeof(err));
		if (ezp__addr_parse(bad[i], &a, &err) != EZP_ERR_INVAL)
			print_error("'%s' parsed\n", bad[i]);
		assert_int_equal(ezp__addr_parse(bad[i], &a, &err), EZP_ERR_INVAL);
		assert_int_equal(err.code, EZP_ERR_INVAL);
		assert_non_null(strstr(err.message, "is not an address ("));
		assert_int_equal(a.len, 0x33333333); /* untouched */
	}
	assert_int_equal(ezp__addr_parse(NULL, &a, &err), EZP_ERR_INVAL);
	assert_int_equal(ezp__addr_parse("abc", &a, &err), EZP_ERR_INVAL);
	assert_string_equal(err.message, "'abc' is not an address (use HOST:PORT, [V6]:PORT or "
					 ":PORT)");
	assert_int_equal(ezp__addr_parse("::1:5", &a, &err), EZP_ERR_INVAL);
	assert_string_equal(err.message, "'::1:5' is not an address (write IPv6 addresses as "
					 "[V6]:PORT)");

	memset(&a, 0, sizeof(a));
	assert_string_equal(ezp__addr_format(&a, buf, sizeof(buf)), "");
	assert_string_equal(ezp__addr_format(NULL, buf, sizeof(buf)), "");
	assert_string_equal(ezp__addr_format(&a, NULL, 0), "");
	assert_int_equal(
	    ezp__addr_parse("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", &a, &err), EZP_OK);
	assert_string_equal(ezp__addr_format(&a, buf, sizeof(buf)),
			    "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
	assert_string_equal(ezp__addr_format(&a, tiny, sizeof(tiny)), "[ff");
	a.ss.ss_family = AF_UNIX;
	assert_string_equal(ezp__addr_format(&a, buf, sizeof(buf)), "?");
}

static void test_error_set(void **state)
{
	struct ezp_error err;
	char longfile[400];

	(void)state;
	memset(&err, 0x7f, sizeof(err));
	assert_int_equal(
	    ezp__error_set(&err, EZP_ERR_IO, EZP_SIDE_SERVER, NULL, 3, 4, "x %d %s", 7, "y"),
	    EZP_ERR_IO);
	assert_int_equal(err.code, EZP_ERR_IO);
	assert_int_equal(err.side, EZP_SIDE_SERVER);
	assert_string_equal(err.file, "");
	assert_int_equal(err.line, 3);
	assert_int_equal(err.column, 4);
	assert_string_equal(err.message, "x 7 y");
	memset(longfile, 'f', sizeof(longfile) - 1);
	longfile[sizeof(longfile) - 1] = '\0';
	ezp__error_set(&err, EZP_ERR_CONFIG, EZP_SIDE_CONFIG, longfile, 1, 1, "%s", longfile);
	assert_int_equal(strlen(err.file), sizeof(err.file) - 1);
	assert_int_equal(strlen(err.message), 399);
	assert_int_equal(ezp__error_set(NULL, EZP_ERR_PERM, 0, "f", 0, 0, "x"), EZP_ERR_PERM);
}

static void test_load(void **state)
{
	char path[] = "/tmp/ezp_test_config_XXXXXX";
	struct ezp__config *cfg = NULL;
	struct ezp_error err;
	FILE *f;
	int fd;

	(void)state;
	assert_int_equal(ezp__config_load("/nonexistent/ezp.yaml", &lk, &cfg, &err), EZP_ERR_IO);
	assert_string_equal(err.message, "cannot read config '/nonexistent/ezp.yaml': No such file "
					 "or directory");
	assert_string_equal(err.file, "/nonexistent/ezp.yaml");
	assert_null(cfg);
	assert_int_equal(ezp__config_load("/tmp", &lk, &cfg, &err), EZP_ERR_IO);
	assert_string_equal(err.message, "cannot read config '/tmp': Is a directory");

	fd = mkstemp(path);
	assert_true(fd >= 0);
	f = fdopen(fd, "w");
	fputs(old_yaml, f);
	fclose(f);
	assert_int_equal(ezp__config_load(path, &lk, &cfg, &err), EZP_OK);
	assert_string_equal(cfg->file, path);
	assert_int_equal(cfg->n_pipelines, 2);
	ezp__config_free(cfg);
	cfg = NULL;

	f = fopen(path, "w");
	fputs("Workers: 1\nWorkers: 2\n", f);
	fclose(f);
	assert_int_equal(ezp__config_load(path, &lk, &cfg, &err), EZP_ERR_CONFIG);
	assert_string_equal(err.file, path);
	assert_int_equal(err.line, 2);

	f = fopen(path, "w"); /* over 4 MiB of comments */
	for (int i = 0; i < 70 * 1024; i++)
		fputs("# 456789012345678901234567890123456789012345678901234567890123\n", f);
	fclose(f);
	assert_int_equal(ezp__config_load(path, &lk, &cfg, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "' is larger than 4 MiB; it cannot be right"));
	assert_int_equal(strncmp(err.message, "config '/tmp/", 13), 0);
	unlink(path);
	assert_int_equal(ezp__config_load("/dev/zero", &lk, &cfg, &err), EZP_ERR_CONFIG);
	assert_string_equal(err.message, "config '/dev/zero' is larger than 4 MiB; it cannot be "
					 "right");
	assert_null(cfg);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup(test_new_full, setup),
	    cmocka_unit_test_setup(test_defaults, setup),
	    cmocka_unit_test_setup(test_builtin_default, setup),
	    cmocka_unit_test_setup(test_aliases_real, setup),
	    cmocka_unit_test_setup(test_plugins_first, setup),
	    cmocka_unit_test_setup(test_err_keys, setup),
	    cmocka_unit_test_setup(test_err_values, setup),
	    cmocka_unit_test_setup(test_err_pipelines, setup),
	    cmocka_unit_test_setup(test_err_yaml, setup),
	    cmocka_unit_test_setup(test_err_hostile, setup),
	    cmocka_unit_test_setup(test_legacy, setup),
	    cmocka_unit_test_setup(test_legacy_lua, setup),
	    cmocka_unit_test_setup(test_legacy_errors, setup),
	    cmocka_unit_test_setup(test_kind_conf_parse, setup),
	    cmocka_unit_test_setup(test_through_parse, setup),
	    cmocka_unit_test_setup(test_equal_copy, setup),
	    cmocka_unit_test_setup(test_params_defaults, setup),
	    cmocka_unit_test_setup(test_dump, setup),
	    cmocka_unit_test_setup(test_addr, setup),
	    cmocka_unit_test_setup(test_error_set, setup),
	    cmocka_unit_test_setup(test_load, setup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
