/*
 * test_loader.c - the plugin loader: real plugins load, broken ones are
 * refused with an exact status and message, built-ins are present.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

static struct ezp_core_ctx *new_daemon(void)
{
	struct ezp_daemon_opts opts = {.struct_size = sizeof(opts), .workers = 1,
				       .no_default_paths = 1, .log_level = EZP_LOG_ERROR};
	struct ezp_error err = {0};
	struct ezp_daemon *d = NULL;

	assert_int_equal(ezp_daemon_new("Pipelines: []\n", "t", &opts, &d, &err), EZP_OK);
	return (struct ezp_core_ctx *)d;
}

static void fixture(char *buf, size_t len, const char *name)
{
	const char *dir = getenv("EZP_TEST_FIXTURES");

	snprintf(buf, len, "%s/%s.so", dir ? dir : "tests", name);
}

static void expect_refusal(const char *name, int code, const char *needle)
{
	struct ezp_core_ctx *d = new_daemon();
	struct ezp_error err = {0};
	char path[4096];

	fixture(path, sizeof(path), name);
	assert_int_equal(ezp__registry_load(d, path, &err), code);
	if (!strstr(err.message, needle))
		fail_msg("message for %s was '%s', expected it to contain '%s'", name, err.message,
			 needle);
	ezp_daemon_free((struct ezp_daemon *)d);
}

static void test_wrong_major(void **state)
{
	(void)state;
	expect_refusal("bad_major", EZP_ERR_ABI, "was built for SDK ABI 2.0 but this core speaks 1.0");
}

static void test_newer_minor(void **state)
{
	(void)state;
	expect_refusal("bad_minor", EZP_ERR_ABI, "needs SDK ABI 1.1 but this core speaks 1.0");
}

static void test_small_struct(void **state)
{
	(void)state;
	expect_refusal("bad_size", EZP_ERR_ABI, "has a descriptor of 16 bytes");
}

static void test_missing_symbol(void **state)
{
	(void)state;
	expect_refusal("bad_symbol", EZP_ERR_PLUGIN, "does not export the symbol 'ezp_plugin'");
}

static void test_init_fails(void **state)
{
	(void)state;
	expect_refusal("bad_init", EZP_ERR_UNSUPPORTED, "failed to initialise");
}

static void test_incomplete_filter(void **state)
{
	(void)state;
	expect_refusal("bad_filter", EZP_ERR_ABI, "filter #0 is incomplete");
}

static void test_not_a_library(void **state)
{
	struct ezp_core_ctx *d = new_daemon();
	struct ezp_error err = {0};

	(void)state;
	assert_int_equal(ezp__registry_load(d, "/nonexistent/x.so", &err), EZP_ERR_PLUGIN);
	assert_non_null(strstr(err.message, "cannot load plugin /nonexistent/x.so"));
	ezp_daemon_free((struct ezp_daemon *)d);
}

static void test_real_plugins_and_builtin(void **state)
{
	struct ezp_core_ctx *d = new_daemon();
	struct ezp_error err = {0};
	const char *dir = getenv("EZP_TEST_PLUGINS");

	(void)state;
	assert_non_null(ezp__registry_filter(d, "callback"));
	assert_null(ezp__registry_transport(d, "tcp"));
	assert_int_equal(ezp__registry_scan(d, dir ? dir : "plugins", &err), EZP_OK);
	assert_non_null(ezp__registry_transport(d, "tcp"));
	assert_non_null(ezp__registry_transport(d, "udp"));
	/* scanning twice loads nothing twice */
	assert_int_equal(ezp__registry_scan(d, dir ? dir : "plugins", &err), EZP_OK);
	assert_int_equal(ezp__registry_scan(d, "/nonexistent-dir", &err), EZP_ERR_NOT_FOUND);
	assert_non_null(strstr(err.message, "does not exist"));
	ezp_daemon_free((struct ezp_daemon *)d);
}

static void test_duplicate_kind_refused(void **state)
{
	struct ezp_core_ctx *d = new_daemon();
	struct ezp_error err = {0};
	static const struct ezp_filter_kind *const no_filters[] = {NULL};
	static const struct ezp_plugin_desc dup = {
		.struct_size = sizeof(struct ezp_plugin_desc),
		.abi_major = EZP_ABI_MAJOR,
		.abi_minor = EZP_ABI_MINOR,
		.name = "dup",
		.filters = no_filters,
	};

	(void)state;
	assert_int_equal(ezp__registry_add_builtin(d, &dup, &err), EZP_OK);
	/* the same plugin name again is skipped */
	assert_int_equal(ezp__registry_add_builtin(d, &dup, &err), EZP_ERR_EXISTS);
	/* another plugin providing `callback` is refused */
	static const struct ezp_filter_kind cb = {
		.struct_size = sizeof(struct ezp_filter_kind), .name = "callback",
		.flags = EZP_FILTER_EXCLUSIVE,
		.create = (int (*)(const struct ezp_filter_ctx *, const void *, void **,
				   struct ezp_error *))1,
		.destroy = (void (*)(void *))1,
	};
	static const struct ezp_filter_kind *const cb_filters[] = {&cb, NULL};
	static const struct ezp_plugin_desc other = {
		.struct_size = sizeof(struct ezp_plugin_desc),
		.abi_major = EZP_ABI_MAJOR,
		.abi_minor = EZP_ABI_MINOR,
		.name = "other",
		.filters = cb_filters,
	};
	assert_int_equal(ezp__registry_add_builtin(d, &other, &err), EZP_ERR_EXISTS);
	assert_non_null(strstr(err.message, "filter 'callback' is already provided"));
	ezp_daemon_free((struct ezp_daemon *)d);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_wrong_major),
		cmocka_unit_test(test_newer_minor),
		cmocka_unit_test(test_small_struct),
		cmocka_unit_test(test_missing_symbol),
		cmocka_unit_test(test_init_fails),
		cmocka_unit_test(test_incomplete_filter),
		cmocka_unit_test(test_not_a_library),
		cmocka_unit_test(test_real_plugins_and_builtin),
		cmocka_unit_test(test_duplicate_kind_refused),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
