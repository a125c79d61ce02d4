/*
 * test_fault.c - unit checks of the fault plugin without a daemon: the value
 * checks of the ezp.fault interface (every field named), the random streams
 * (the same seed gives the same numbers, streams differ), and the registry
 * waking and putting to sleep a pipeline's stages as faults are set and
 * cleared (through a fake core table). The real-socket tests are
 * tests/integration/test_fault.py.
 * Thread: the test's main thread (the fake core runs deferred jobs at once).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* the plugin's two files, statics included */
#include "../../plugins/fault/fault_filter.c"
#include "../../plugins/fault/fault_registry.c"

/* ---- a fake core ---- */

static int wakes[2]; /* stage_wake calls with awake 0 / 1 */
static int awake;
static char last_log[600];

static void fake_log(int level, const char *source, const char *fmt, ...)
{
	va_list ap;

	(void)level;
	(void)source;
	va_start(ap, fmt);
	vsnprintf(last_log, sizeof(last_log), fmt, ap);
	va_end(ap);
}

static void fake_stage_wake(struct ezp_stage *stage, int on)
{
	(void)stage;
	wakes[on != 0]++;
	awake = on != 0;
}

static int fake_defer(struct ezp_worker *w, ezp_fn fn, void *arg)
{
	(void)w;
	fn(arg);
	return EZP_OK;
}

static struct ezp_worker *fake_worker_current(void)
{
	return NULL;
}

static const void *fake_find_service(struct ezp_core_ctx *ctx, const char *name, unsigned v)
{
	(void)ctx;
	(void)name;
	(void)v;
	return NULL;
}

static struct ezp_core core;

static void core_init(void)
{
	memset(&core, 0, sizeof(core));
	core.struct_size = sizeof(core);
	core.log = fake_log;
	core.stage_wake = fake_stage_wake;
	core.defer = fake_defer;
	core.worker_current = fake_worker_current;
	core.find_service = fake_find_service;
	core.ctx = (struct ezp_core_ctx *)&core;
	memset(wakes, 0, sizeof(wakes));
	awake = 0;
}

static struct ezp_faults faults(void)
{
	struct ezp_faults f;

	memset(&f, 0, sizeof(f));
	f.struct_size = sizeof(f);
	return f;
}

/* ---- value checks ---- */

static void check_bad(struct ezp_faults f, int code, const char *field)
{
	struct ezp_error err;

	memset(&err, 0, sizeof(err));
	assert_int_equal(fp_faults_check(&f, &err), code);
	if (!strstr(err.message, field))
		fail_msg("'%s' does not name %s", err.message, field);
}

static void test_checks(void **state)
{
	struct ezp_faults f = faults();
	struct ezp_error err;

	(void)state;
	memset(&err, 0, sizeof(err));
	assert_int_equal(fp_faults_check(NULL, &err), EZP_OK);
	f.dir[1].latency_ms = FP_MAX_LATENCY_MS;
	f.dir[0].loss = 1;
	assert_int_equal(fp_faults_check(&f, &err), EZP_OK);
	f = faults();
	f.dir[0].latency_ms = FP_MAX_LATENCY_MS + 1;
	check_bad(f, EZP_ERR_INVAL, "to_server.latency_ms");
	f = faults();
	f.dir[1].jitter_ms = FP_MAX_JITTER_MS + 1;
	check_bad(f, EZP_ERR_INVAL, "to_client.jitter_ms");
	f = faults();
	f.dir[1].loss = -0.1;
	check_bad(f, EZP_ERR_INVAL, "to_client.loss");
	f.dir[1].loss = NAN;
	check_bad(f, EZP_ERR_INVAL, "to_client.loss");
	f = faults();
	f.dir[0].bandwidth_bps = FP_MAX_BANDWIDTH + 1;
	check_bad(f, EZP_ERR_INVAL, "to_server.bandwidth_bps");
	f = faults();
	f.dir[0].freeze = 2;
	check_bad(f, EZP_ERR_INVAL, "to_server.freeze");
	f = faults();
	f.dir[1].blackhole = -1;
	check_bad(f, EZP_ERR_INVAL, "to_client.blackhole");
	f = faults();
	f.freeze_max_ms = FP_MAX_FREEZE_MS + 1;
	check_bad(f, EZP_ERR_INVAL, "freeze_max_ms");
	f = faults();
	f.struct_size = 8;
	check_bad(f, EZP_ERR_ABI, "too small");
	assert_true(fp_faults_zero(NULL));
	f = faults();
	f.seed = 5;
	assert_true(fp_faults_zero(&f)); /* a seed alone is no fault */
	f.dir[1].loss = 0.5;
	assert_false(fp_faults_zero(&f));
	assert_false(fp_dir_holds(&f.dir[1]));
	f.dir[1].jitter_ms = 1;
	assert_true(fp_dir_holds(&f.dir[1]));
}

/* ---- random streams ---- */

static void test_rng(void **state)
{
	struct fp_rng a, b, c;
	double sum = 0;
	int same = 1, differ = 0;

	(void)state;
	fp_rng_seed(&a, 42, 1);
	fp_rng_seed(&b, 42, 1);
	fp_rng_seed(&c, 42, 2);
	for (int i = 0; i < 10000; i++) {
		uint64_t x = fp_rng_next(&a), y = fp_rng_next(&b), z = fp_rng_next(&c);
		same &= x == y;
		differ += x != z;
	}
	assert_true(same);
	assert_true(differ > 9990);
	fp_rng_seed(&a, 0, 1); /* seed 0 is a seed like any other for the generator */
	for (int i = 0; i < 100000; i++) {
		double u = fp_rng_unit(&a);
		assert_true(u >= 0 && u < 1);
		sum += u;
	}
	assert_true(sum / 100000 > 0.49 && sum / 100000 < 0.51);
}

/* ---- the registry: set, get, wake and sleep ---- */

static void test_registry(void **state)
{
	struct fp_conf conf = {.direction = (char *)"to_client", .latency_ms = 50,
			       .freeze_max_ms = 10000};
	struct ezp_filter_ctx ctx;
	struct ezp_faults f = faults(), out;
	struct ezp_error err;
	const struct ezp_fault *fi;
	void *inst = NULL, *svc = NULL;
	int own = 0;

	(void)state;
	core_init();
	memset(&ctx, 0, sizeof(ctx));
	ctx.struct_size = sizeof(ctx);
	ctx.core = &core;
	ctx.pipeline = "p";
	ctx.stage = (struct ezp_stage *)&ctx;
	memset(&err, 0, sizeof(err));
	assert_int_equal(fp_create(&ctx, &conf, &inst, &err), EZP_OK);
	assert_int_equal(wakes[1], 1); /* the YAML's latency woke the stage */
	assert_int_equal(fp_service.start(&core, NULL, &svc, &err), EZP_OK);
	fi = fp_service.iface(svc);
	assert_int_equal(fi->pipeline_get(fi->fault, "p", &out, &err), EZP_OK);
	assert_int_equal(out.dir[1].latency_ms, 50);
	assert_int_equal(out.dir[0].latency_ms, 0);
	assert_int_equal(out.freeze_max_ms, 10000);

	f.dir[0].loss = 2;
	assert_int_equal(fi->pipeline_set(fi->fault, "p", &f, &err), EZP_ERR_INVAL);
	assert_non_null(strstr(err.message, "to_server.loss"));
	assert_int_equal(fi->pipeline_set(fi->fault, NULL, &f, &err), EZP_ERR_INVAL);
	assert_int_equal(fi->pipeline_get(fi->fault, NULL, &out, &err), EZP_ERR_INVAL);
	assert_int_equal(fi->pipeline_set(fi->fault, "q", NULL, &err), EZP_ERR_NOT_FOUND);
	assert_non_null(strstr(err.message, "pipeline 'q' has no fault stage"));
	assert_int_equal(fi->session_get(fi->fault, 7, &out, &own, &err), EZP_ERR_NOT_FOUND);
	assert_int_equal(fi->session_set(fi->fault, 7, NULL, &err), EZP_ERR_NOT_FOUND);

	assert_int_equal(fi->pipeline_set(fi->fault, "p", NULL, &err), EZP_OK); /* clear */
	assert_int_equal(awake, 0);
	assert_int_equal(wakes[0], 1);
	assert_non_null(strstr(last_log, "faults cleared"));
	f = faults();
	f.seed = 9; /* no fault: the stage stays asleep, the seed is kept */
	assert_int_equal(fi->pipeline_set(fi->fault, "p", &f, &err), EZP_OK);
	assert_int_equal(awake, 0);
	assert_int_equal(fi->pipeline_get(fi->fault, "p", &out, &err), EZP_OK);
	assert_int_equal(out.seed, 9);
	f.dir[0].blackhole = 1;
	assert_int_equal(fi->pipeline_set(fi->fault, "p", &f, &err), EZP_OK);
	assert_int_equal(awake, 1);
	assert_non_null(strstr(last_log, "blackhole"));

	/* the same YAML again (a reload that changed nothing): live faults stay */
	fp_pipe_yaml(((struct fp_inst *)inst)->pipe, &(struct ezp_faults){
		.struct_size = sizeof(struct ezp_faults), .freeze_max_ms = 10000,
		.dir = {{0}, {.latency_ms = 50}}});
	assert_int_equal(fi->pipeline_get(fi->fault, "p", &out, &err), EZP_OK);
	assert_int_equal(out.dir[0].blackhole, 1);

	fp_destroy(inst);
	assert_int_equal(fi->pipeline_get(fi->fault, "p", &out, &err), EZP_ERR_NOT_FOUND);
	fp_service.stop(svc);
	fp_fini();
}

static void test_conf_errors(void **state)
{
	struct fp_conf conf = {.direction = (char *)"sideways", .freeze_max_ms = 10000};
	struct ezp_filter_ctx ctx;
	struct ezp_error err;
	void *inst = NULL;

	(void)state;
	core_init();
	memset(&ctx, 0, sizeof(ctx));
	ctx.struct_size = sizeof(ctx);
	ctx.core = &core;
	ctx.pipeline = "p";
	memset(&err, 0, sizeof(err));
	assert_int_equal(fp_create(&ctx, &conf, &inst, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "Direction must be both, to_server or to_client"));
	conf.direction = (char *)"both";
	conf.loss = 1.5;
	assert_int_equal(fp_create(&ctx, &conf, &inst, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "Loss must be a number in 0..1"));
	assert_null(inst);
	fp_fini();
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_checks),
		cmocka_unit_test(test_rng),
		cmocka_unit_test(test_registry),
		cmocka_unit_test(test_conf_errors),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
