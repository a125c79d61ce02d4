/*
 * test_auth.c - the `auth` service plugin (plugins/auth), loaded from the
 * build tree into real embedded daemons (ezp_daemon_new + start with an
 * `Api` section) and reached as the core hands it to the http-api plugin:
 * core->find_service(ctx, "ezp.auth", 1). Covers the first admin key and
 * admin.key, check(), the minting rules, list/get, revoke and its
 * listeners, keys surviving a restart, keys.json never holding a key,
 * corrupt keys files, the loopback rule, and failures writing either file.
 * A last group calls the plugin's service kind directly (dlopen) for what
 * a daemon does not reach easily: reconfigure, no StateDir, the key limit.
 *
 * Threads: the test's own thread is the control thread; the ezp.auth calls
 * are made from it too (the plugin guards its table with a mutex, so the
 * thread does not matter to it). Revocation listeners run synchronously
 * inside revoke(), so nothing here waits.
 */
/* cmocka.h needs these first */
/* clang-format off */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
/* clang-format on */

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ezproxy/ezproxy.h>
#include <ezproxy/services.h>

#include "capture.h"
#include "core.h"

/* sha256 of "a" * 64 and "b" * 64 (python3 hashlib) */
#define KEY_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define SHA_A "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"
#define KEY_B "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
#define SHA_B "a0fab1377f49a759b57f63318262ebe89fabfc990e8e93ceac2984561482b9d4"
#define AUTH_ON "{Listen: 127.0.0.1:0, Auth: true}"
#define AUTH_OFF "{Listen: 127.0.0.1:0, Auth: false}"

static char root[1024]; /* this run's temporary folder */
static int n_dirs;

static struct {
	char dir[1100];	  /* the test's StateDir */
	char keys[1200];  /* <dir>/keys.json */
	char admin[1200]; /* <dir>/admin.key */
	struct ezp_daemon *d;
	const struct ezp_auth *a;
} T;

/* ---- files -------------------------------------------------------------------------------- */

static char *slurp(const char *path)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = calloc(1, (size_t)n + 1);
	assert_non_null(buf);
	assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	return buf;
}

static void spill(const char *path, const char *text)
{
	FILE *f = fopen(path, "wb");

	assert_non_null(f);
	assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
	assert_int_equal(fclose(f), 0);
}

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static void rm_tree(const char *path)
{
	nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static int mode_of(const char *path)
{
	struct stat sb;

	assert_int_equal(lstat(path, &sb), 0);
	return (int)(sb.st_mode & 07777);
}

static int is_hex(const char *s, size_t n)
{
	if (strlen(s) != n)
		return 0;
	for (; *s; s++)
		if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
			return 0;
	return 1;
}

/* ---- daemons ------------------------------------------------------------------------------ */

static const char *plugins_dir(void)
{
	const char *p = getenv("EZP_TEST_PLUGINS");

	return p ? p : "build/plugins";
}

static struct ezp_daemon_opts test_opts(const char *const *paths, int level)
{
	struct ezp_daemon_opts o = {.struct_size = sizeof(o),
				    .workers = 1,
				    .plugin_paths = paths,
				    .no_default_paths = 1,
				    .log_level = level};
	return o;
}

/*
 * The core starts `http-api` after `auth` and refuses an Api section
 * without it. When the build has no working http-api plugin, this stand-in
 * (which does nothing) is registered instead, so this test depends on the
 * auth plugin only; with the real plugin there, the real one starts.
 */
static int stub_start(const struct ezp_core *core, const void *config, void **state,
		      struct ezp_error *err)
{
	(void)core;
	(void)config;
	(void)err;
	*state = NULL;
	return EZP_OK;
}

static void stub_stop(void *state)
{
	(void)state;
}

static const struct ezp_service_kind stub_api = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "http-api",
    .start = stub_start,
    .stop = stub_stop,
};
static const struct ezp_service_kind *const stub_services[] = {&stub_api, NULL};
static const struct ezp_plugin_desc stub_plugin = {
    .struct_size = sizeof(struct ezp_plugin_desc),
    .abi_major = EZP_ABI_MAJOR,
    .abi_minor = EZP_ABI_MINOR,
    .name = "test-http-api-stub",
    .version = "0",
    .services = stub_services,
};

/* Start a daemon on T.dir with @api as its Api section; T.d and T.a on EZP_OK. */
static int daemon_up_at(const char *api, int level, struct ezp_error *err)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(paths, level);
	struct ezp_daemon *d = NULL;
	char yaml[PATH_MAX + 256];
	int rc;

	assert_null(T.d);
	snprintf(yaml, sizeof(yaml), "StateDir: %s\nApi: %s\nPipelines: []\n", T.dir, api);
	memset(err, 0, sizeof(*err));
	if ((rc = ezp_daemon_new(yaml, "test_auth", &opts, &d, err)))
		return rc;
	if (!ezp__registry_service((struct ezp_core_ctx *)d, "http-api"))
		assert_int_equal(
		    ezp__registry_add_builtin((struct ezp_core_ctx *)d, &stub_plugin, err), EZP_OK);
	if ((rc = ezp_daemon_start(d, err))) {
		ezp_daemon_stop(d);
		ezp_daemon_free(d);
		return rc;
	}
	T.d = d;
	T.a = ezp_daemon_core(d)->find_service(ezp_daemon_core(d)->ctx, EZP_AUTH_IFACE,
					       EZP_AUTH_VERSION);
	if (!T.a)
		fail_msg("the daemon started but find_service(\"%s\") found nothing",
			 EZP_AUTH_IFACE);
	assert_true(T.a->struct_size >= sizeof(struct ezp_auth));
	return EZP_OK;
}

static int daemon_up(const char *api, struct ezp_error *err)
{
	return daemon_up_at(api, EZP_LOG_ERROR, err);
}

static void daemon_must(const char *api)
{
	struct ezp_error err;

	if (daemon_up(api, &err) != EZP_OK)
		fail_msg("daemon did not start: %s", err.message);
}

static void daemon_down(void)
{
	if (!T.d)
		return;
	ezp_daemon_stop(T.d);
	ezp_daemon_free(T.d);
	T.d = NULL;
	T.a = NULL;
}

/* The admin key's text from admin.key (newline removed), malloc'd. */
static char *admin_key(void)
{
	char *k = slurp(T.admin);

	assert_non_null(k);
	assert_int_equal(strlen(k), 65);
	assert_int_equal(k[64], '\n');
	k[64] = '\0';
	assert_true(is_hex(k, 64));
	return k;
}

/* check() of @key: its id into @id (17 bytes), its perms returned; -1 when refused. */
static long key_perms(const char *key, char *id)
{
	uint32_t perms = 0;
	char tmp[17];

	if (T.a->check(T.a->auth, key, &perms, id ? id : tmp) != EZP_OK)
		return -1;
	return (long)perms;
}

static int mint(const char *parent, uint32_t parent_perms, uint32_t perms, const char *name,
		char *key, struct ezp_key_info *info, struct ezp_error *err)
{
	memset(err, 0, sizeof(*err));
	return T.a->create(T.a->auth, parent, parent_perms, perms, name, key, info, err);
}

static size_t n_keys(void)
{
	struct ezp_key_info *list = NULL;
	size_t n = 99;

	assert_int_equal(T.a->list(T.a->auth, &list, &n), EZP_OK);
	assert_non_null(list);
	free(list);
	return n;
}

static int setup(void **state)
{
	(void)state;
	memset(&T, 0, sizeof(T));
	snprintf(T.dir, sizeof(T.dir), "%s/s%d", root, ++n_dirs);
	snprintf(T.keys, sizeof(T.keys), "%s/keys.json", T.dir);
	snprintf(T.admin, sizeof(T.admin), "%s/admin.key", T.dir);
	assert_int_equal(mkdir(T.dir, 0700), 0);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	daemon_down();
	rm_tree(T.dir);
	return 0;
}

/* ---- the first admin key ------------------------------------------------------------------- */

static void test_first_start_admin_key(void **state)
{
	struct ezp_key_info *list = NULL, info;
	struct capture cap;
	struct ezp_error err;
	char id[17], want[PATH_MAX + 64], *key, *log, *json;
	size_t n = 0;
	int rc;

	(void)state;
	capture_begin(&cap);
	rc = daemon_up_at(AUTH_ON, EZP_LOG_INFO, &err);
	log = capture_end(&cap);
	if (rc != EZP_OK)
		fail_msg("start: %s\n%s", err.message, log);
	/* the file: regular, owner-only, 64 hex digits and a newline */
	assert_int_equal(mode_of(T.admin), 0600);
	assert_int_equal(mode_of(T.keys), 0600);
	key = admin_key();
	snprintf(want, sizeof(want), "[auth] first start: admin key written to %s (owner-only)",
		 T.admin);
	if (!strstr(log, want))
		fail_msg("no '%s' in the log:\n%s", want, log);
	assert_null(strstr(log, key)); /* never logged */
	free(log);
	/* accepted with every permission */
	assert_int_equal(T.a->enabled(T.a->auth), 1);
	assert_int_equal(key_perms(key, id), EZP_PERM_ALL);
	assert_true(is_hex(id, 16));
	assert_int_equal(T.a->check(T.a->auth, key, NULL, NULL), EZP_OK);
	/* listed */
	assert_int_equal(T.a->list(T.a->auth, &list, &n), EZP_OK);
	assert_int_equal(n, 1);
	assert_string_equal(list[0].id, id);
	assert_string_equal(list[0].name, "admin");
	assert_string_equal(list[0].created_by, "");
	assert_int_equal(list[0].perms, EZP_PERM_ALL);
	assert_true(list[0].created_us > 1600000000ull * 1000000u);
	assert_int_equal(list[0].struct_size, sizeof(struct ezp_key_info));
	free(list);
	assert_int_equal(T.a->get(T.a->auth, id, &info), EZP_OK);
	assert_string_equal(info.name, "admin");
	/* the keys file has its digest, not the key */
	json = slurp(T.keys);
	assert_non_null(json);
	assert_null(strstr(json, key));
	assert_non_null(strstr(json, "\"sha256\""));
	assert_non_null(strstr(json, id));
	free(json);
	free(key);
}

static void test_check_refuses(void **state)
{
	char big[400], id[17] = "untouched";
	uint32_t perms = 12345;
	char *key;

	(void)state;
	daemon_must(AUTH_ON);
	key = admin_key();
	/* a wrong key of the right shape, one digit off */
	char wrong[65];
	memcpy(wrong, key, sizeof(wrong));
	wrong[10] = wrong[10] == '0' ? '1' : '0';
	assert_int_equal(T.a->check(T.a->auth, wrong, &perms, id), EZP_ERR_PERM);
	assert_int_equal(perms, 12345); /* outputs untouched when refused */
	assert_string_equal(id, "untouched");
	assert_int_equal(T.a->check(T.a->auth, "", &perms, id), EZP_ERR_PERM);
	assert_int_equal(T.a->check(T.a->auth, NULL, &perms, id), EZP_ERR_PERM);
	/* the key with its newline, upper case, truncated: not the key */
	char nl[70];
	snprintf(nl, sizeof(nl), "%s\n", key);
	assert_int_equal(T.a->check(T.a->auth, nl, &perms, id), EZP_ERR_PERM);
	for (int i = 0; i < 64; i++)
		wrong[i] = (char)(key[i] >= 'a' && key[i] <= 'f' ? key[i] - 32 : key[i]);
	assert_int_equal(T.a->check(T.a->auth, wrong, &perms, id), EZP_ERR_PERM);
	nl[63] = '\0';
	assert_int_equal(T.a->check(T.a->auth, nl, &perms, id), EZP_ERR_PERM);
	/* 256 characters are hashed and refused; longer ones refused unhashed */
	memset(big, 'a', sizeof(big));
	big[256] = '\0';
	assert_int_equal(T.a->check(T.a->auth, big, &perms, id), EZP_ERR_PERM);
	big[256] = 'a';
	big[sizeof(big) - 1] = '\0';
	assert_int_equal(T.a->check(T.a->auth, big, &perms, id), EZP_ERR_PERM);
	/* and the real one still works */
	assert_int_equal(key_perms(key, NULL), EZP_PERM_ALL);
	free(key);
}

/* ---- minting -------------------------------------------------------------------------------- */

static void test_minting_rules(void **state)
{
	struct ezp_key_info info, maker_info;
	struct ezp_error err;
	char admin_id[17], maker[65], viewer[65], dup[65], k[65], name[80];
	char *admin;
	const uint32_t cs = EZP_PERM_CHECK_STATUS, mk = EZP_PERM_MAKE_KEYS;
	uint64_t before;

	(void)state;
	daemon_must(AUTH_ON);
	admin = admin_key();
	assert_int_equal(key_perms(admin, admin_id), EZP_PERM_ALL);
	before = ezp_daemon_core(T.d)->now_us();
	/* admin (has DuplicateKeys) may grant MakeKeys */
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, cs | mk, "maker", maker, &maker_info, &err),
			 EZP_OK);
	assert_true(is_hex(maker, 64));
	assert_true(is_hex(maker_info.id, 16));
	assert_string_equal(maker_info.name, "maker");
	assert_string_equal(maker_info.created_by, admin_id);
	assert_int_equal(maker_info.perms, cs | mk);
	assert_true(maker_info.created_us >= before);
	assert_int_equal(key_perms(maker, NULL), cs | mk);
	/* MakeKeys alone: a subset without MakeKeys */
	assert_int_equal(mint(maker_info.id, cs | mk, cs, NULL, viewer, &info, &err), EZP_OK);
	assert_string_equal(info.name, "");
	assert_string_equal(info.created_by, maker_info.id);
	assert_int_equal(key_perms(viewer, NULL), cs);
	/* ... not a bit more */
	assert_int_equal(mint(maker_info.id, cs | mk, cs | EZP_PERM_CLOSE | EZP_PERM_INJECT, "x", k,
			      &info, &err),
			 EZP_ERR_PERM);
	assert_non_null(strstr(err.message, "subset"));
	assert_non_null(strstr(err.message, "Close, Inject"));
	assert_int_equal(err.code, EZP_ERR_PERM);
	/* ... and not MakeKeys again without DuplicateKeys */
	assert_int_equal(mint(maker_info.id, cs | mk, cs | mk, "x", k, &info, &err), EZP_ERR_PERM);
	assert_non_null(strstr(err.message, "granting MakeKeys needs DuplicateKeys"));
	/* no MakeKeys in the parent */
	assert_int_equal(mint(info.id, cs, cs, "x", k, &info, &err), EZP_ERR_PERM);
	{
		char viewer_id[17];
		assert_int_equal(key_perms(viewer, viewer_id), cs);
		assert_int_equal(mint(viewer_id, cs, cs, "x", k, &info, &err), EZP_ERR_PERM);
		assert_non_null(strstr(err.message, "needs MakeKeys"));
		assert_non_null(strstr(err.message, viewer_id));
	}
	/* the parent's bits as stored count, not more than the caller says */
	assert_int_equal(mint(admin_id, cs, cs, "x", k, &info, &err), EZP_ERR_PERM);
	assert_non_null(strstr(err.message, "needs MakeKeys"));
	assert_int_equal(
	    mint(maker_info.id, EZP_PERM_ALL, cs | EZP_PERM_FILTER, "x", k, &info, &err),
	    EZP_ERR_PERM);
	assert_non_null(strstr(err.message, "Filter"));
	/* DuplicateKeys lets a key grant MakeKeys (and DuplicateKeys) */
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, cs | mk | EZP_PERM_DUPLICATE_KEYS, "dup", dup,
			      &info, &err),
			 EZP_OK);
	{
		char dup_id[17];
		assert_true(key_perms(dup, dup_id) > 0);
		assert_int_equal(
		    mint(dup_id, cs | mk | EZP_PERM_DUPLICATE_KEYS, cs | mk, "m2", k, &info, &err),
		    EZP_OK);
		assert_int_equal(mint(dup_id, cs | mk | EZP_PERM_DUPLICATE_KEYS,
				      cs | EZP_PERM_DUPLICATE_KEYS, "d2", k, &info, &err),
				 EZP_OK);
		assert_int_equal(mint(dup_id, cs | mk | EZP_PERM_DUPLICATE_KEYS,
				      EZP_PERM_RECONFIGURE, "x", k, &info, &err),
				 EZP_ERR_PERM);
	}
	/* bad requests */
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, 0, "x", k, &info, &err), EZP_ERR_INVAL);
	assert_non_null(strstr(err.message, "at least one permission"));
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, 0x200, "x", k, &info, &err), EZP_ERR_INVAL);
	assert_non_null(strstr(err.message, "unknown permission bits 0x200"));
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, 0x80000001u, "x", k, &info, &err),
			 EZP_ERR_INVAL);
	memset(name, 'n', sizeof(name));
	name[65] = '\0';
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, cs, name, k, &info, &err), EZP_ERR_INVAL);
	assert_non_null(strstr(err.message, "at most 64"));
	name[64] = '\0';
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, cs, name, k, &info, &err), EZP_OK);
	assert_string_equal(info.name, name);
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, cs, "tab\there", k, &info, &err),
			 EZP_ERR_INVAL);
	assert_non_null(strstr(err.message, "printable"));
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, cs, "caf\xc3\xa9", k, &info, &err),
			 EZP_ERR_INVAL);
	/* an unknown (revoked) parent, and none at all, with auth on */
	assert_int_equal(mint("0123456789abcdef", EZP_PERM_ALL, cs, "x", k, &info, &err),
			 EZP_ERR_PERM);
	assert_non_null(strstr(err.message, "0123456789abcdef"));
	assert_int_equal(mint("", EZP_PERM_ALL, cs, "x", k, &info, &err), EZP_ERR_PERM);
	assert_non_null(strstr(err.message, "needs the maker's key"));
	assert_int_equal(mint(NULL, EZP_PERM_ALL, cs, "x", k, &info, &err), EZP_ERR_PERM);
	/* NULL info and err are allowed */
	assert_int_equal(T.a->create(T.a->auth, admin_id, EZP_PERM_ALL, cs, "y", k, NULL, NULL),
			 EZP_OK);
	assert_int_equal(T.a->create(T.a->auth, admin_id, EZP_PERM_ALL, 0, "y", k, NULL, NULL),
			 EZP_ERR_INVAL);
	assert_int_equal(key_perms(k, NULL), cs);
	assert_int_equal(n_keys(), 8);
	free(admin);
}

/* ---- list, get, revoke ---------------------------------------------------------------------- */

struct rec {
	int n;
	char id[17];
	struct rec *drop; /* unsubscribe this one when called */
};

static void on_revoked(void *userdata, const char *id)
{
	struct rec *r = userdata;

	r->n++;
	snprintf(r->id, sizeof(r->id), "%s", id);
	if (r->drop)
		T.a->unsubscribe(T.a->auth, on_revoked, r->drop);
}

static void test_list_get_revoke(void **state)
{
	struct ezp_key_info *list = NULL, info, ki[3];
	struct rec r1 = {0}, r2 = {0}, r3 = {0};
	struct ezp_error err;
	char admin_id[17], keys[3][65];
	char *admin, *json;
	size_t n = 0;

	(void)state;
	daemon_must(AUTH_ON);
	admin = admin_key();
	assert_int_equal(key_perms(admin, admin_id), EZP_PERM_ALL);
	for (int i = 0; i < 3; i++) {
		char name[8];
		snprintf(name, sizeof(name), "k%d", i);
		assert_int_equal(mint(admin_id, EZP_PERM_ALL, EZP_PERM_CHECK_STATUS << i, name,
				      keys[i], &ki[i], &err),
				 EZP_OK);
	}
	/* list: every key in creation order; get: one */
	assert_int_equal(T.a->list(T.a->auth, &list, &n), EZP_OK);
	assert_int_equal(n, 4);
	assert_string_equal(list[0].id, admin_id);
	for (int i = 0; i < 3; i++) {
		assert_string_equal(list[i + 1].id, ki[i].id);
		assert_int_equal(list[i + 1].perms, EZP_PERM_CHECK_STATUS << i);
		assert_int_equal(T.a->get(T.a->auth, ki[i].id, &info), EZP_OK);
		assert_memory_equal(&info, &list[i + 1], sizeof(info));
	}
	free(list);
	assert_int_equal(T.a->get(T.a->auth, "0123456789abcdef", &info), EZP_ERR_NOT_FOUND);
	assert_int_equal(T.a->get(T.a->auth, NULL, &info), EZP_ERR_NOT_FOUND);
	/* listeners: r1 drops r2 before r2's turn, so r2 is not called */
	assert_int_equal(T.a->subscribe(T.a->auth, NULL, &r1), EZP_ERR_INVAL);
	r1.drop = &r2;
	assert_int_equal(T.a->subscribe(T.a->auth, on_revoked, &r1), EZP_OK);
	assert_int_equal(T.a->subscribe(T.a->auth, on_revoked, &r2), EZP_OK);
	for (int i = 0; i < 5; i++) /* the list grows */
		assert_int_equal(T.a->subscribe(T.a->auth, on_revoked, &r3), EZP_OK);
	assert_int_equal(T.a->revoke(T.a->auth, ki[1].id, &err), EZP_OK);
	assert_int_equal(r1.n, 1);
	assert_string_equal(r1.id, ki[1].id);
	assert_int_equal(r2.n, 0);
	assert_int_equal(r3.n, 5);
	assert_string_equal(r3.id, ki[1].id);
	/* the key stops working, is gone from list and get, and from the file */
	assert_int_equal(key_perms(keys[1], NULL), -1);
	assert_int_equal(key_perms(keys[0], NULL), EZP_PERM_CHECK_STATUS);
	assert_int_equal(key_perms(keys[2], NULL), EZP_PERM_USE_WEBSOCKET);
	assert_int_equal(T.a->get(T.a->auth, ki[1].id, &info), EZP_ERR_NOT_FOUND);
	assert_int_equal(n_keys(), 3);
	json = slurp(T.keys);
	assert_null(strstr(json, ki[1].id));
	assert_non_null(strstr(json, ki[2].id));
	free(json);
	/* twice: not found, nobody told */
	assert_int_equal(T.a->revoke(T.a->auth, ki[1].id, &err), EZP_ERR_NOT_FOUND);
	assert_non_null(strstr(err.message, ki[1].id));
	assert_int_equal(T.a->revoke(T.a->auth, NULL, NULL), EZP_ERR_NOT_FOUND);
	assert_int_equal(r1.n, 1);
	/* unsubscribed listeners are not called; unknown ones are ignored */
	r1.drop = NULL;
	T.a->unsubscribe(T.a->auth, on_revoked, &r1);
	T.a->unsubscribe(T.a->auth, on_revoked, &r2);
	for (int i = 0; i < 5; i++)
		T.a->unsubscribe(T.a->auth, on_revoked, &r3);
	assert_int_equal(T.a->revoke(T.a->auth, ki[0].id, &err), EZP_OK);
	assert_int_equal(r1.n + r3.n, 6);
	/* revoking the last admin key with no listeners */
	assert_int_equal(T.a->revoke(T.a->auth, admin_id, &err), EZP_OK);
	assert_int_equal(key_perms(admin, NULL), -1);
	assert_int_equal(n_keys(), 1);
	free(admin);
}

/* ---- restarts and the files --------------------------------------------------------------- */

static void test_persist_across_restart(void **state)
{
	struct ezp_key_info info, again;
	struct ezp_error err;
	char admin_id[17], k1[65], k2[65], id[17];
	char *admin, *admin_text, *json;

	(void)state;
	daemon_must(AUTH_ON);
	admin = admin_key();
	admin_text = slurp(T.admin);
	assert_int_equal(key_perms(admin, admin_id), EZP_PERM_ALL);
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, EZP_PERM_CAPTURE | EZP_PERM_INJECT, "keep",
			      k1, &info, &err),
			 EZP_OK);
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, EZP_PERM_CLOSE, "gone", k2, &again, &err),
			 EZP_OK);
	assert_int_equal(T.a->revoke(T.a->auth, again.id, &err), EZP_OK);
	daemon_down();
	/* a new daemon, same StateDir: same keys, same ids, no new admin.key */
	assert_int_equal(unlink(T.admin), 0);
	daemon_must(AUTH_ON);
	assert_int_equal(access(T.admin, F_OK), -1);
	assert_int_equal(key_perms(admin, id), EZP_PERM_ALL);
	assert_string_equal(id, admin_id);
	assert_int_equal(key_perms(k1, id), EZP_PERM_CAPTURE | EZP_PERM_INJECT);
	assert_string_equal(id, info.id);
	assert_int_equal(key_perms(k2, NULL), -1);
	assert_int_equal(T.a->get(T.a->auth, info.id, &again), EZP_OK);
	assert_memory_equal(&info, &again, sizeof(info));
	assert_int_equal(n_keys(), 2);
	/* the file never holds a key */
	json = slurp(T.keys);
	assert_null(strstr(json, admin));
	assert_null(strstr(json, k1));
	assert_null(strstr(json, k2));
	assert_non_null(strstr(json, "\"version\": 1"));
	free(json);
	/* with auth off, keys are still kept and checked (for when it is turned on) */
	daemon_down();
	daemon_must(AUTH_OFF);
	assert_int_equal(T.a->enabled(T.a->auth), 0);
	assert_int_equal(key_perms(k1, NULL), EZP_PERM_CAPTURE | EZP_PERM_INJECT);
	free(admin);
	free(admin_text);
}

static void test_keys_file_written_elsewhere(void **state)
{
	struct ezp_key_info info;
	char id[17];

	(void)state;
	/* a keys file this test wrote, with known keys: loaded, no admin key made */
	spill(T.keys,
	      "{\"version\": 1, \"keys\": [\n"
	      " {\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": \"" SHA_A "\",\n"
	      "  \"perms\": 511, \"created_us\": 5, \"created_by\": \"\"},\n"
	      " {\"id\": \"00000000000000bb\", \"name\": \"b key\", \"sha256\": \"" SHA_B "\",\n"
	      "  \"perms\": 3, \"created_us\": 6, \"created_by\": \"00000000000000aa\"}]}\n");
	daemon_must(AUTH_ON);
	assert_int_equal(access(T.admin, F_OK), -1);
	assert_int_equal(key_perms(KEY_A, id), EZP_PERM_ALL);
	assert_string_equal(id, "00000000000000aa");
	assert_int_equal(key_perms(KEY_B, id), 3);
	assert_string_equal(id, "00000000000000bb");
	assert_int_equal(T.a->get(T.a->auth, "00000000000000bb", &info), EZP_OK);
	assert_string_equal(info.name, "b key");
	assert_string_equal(info.created_by, "00000000000000aa");
	assert_int_equal(info.created_us, 6);
}

/* Each: a keys file start must refuse, and a piece of the message. */
static const struct {
	const char *text;
	const char *says;
} corrupt[] = {
    {"{\"version\": 1, \"keys\": [", "is corrupt ("},
    {"", "is corrupt ("},
    {"{\"version\": 1, \"version\": 1, \"keys\": []}", "is corrupt ("},
    {"{\"version\": 2, \"keys\": []}", "has version 2"},
    {"{\"keys\": []}", "is corrupt: "},
    {"[]", "is corrupt: "},
    {"{\"version\": 1, \"keys\": {}}", "keys is not a list"},
    {"{\"version\": 1, \"keys\": [7]}", "keys[0]"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 1, \"created_us\": 1, \"created_by\": \"\", \"x\": 1}]}",
     "keys[0]"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000AA\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 1, \"created_us\": 1, \"created_by\": \"\"}]}",
     "id is not 16"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00aa\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 1, \"created_us\": 1, \"created_by\": \"\"}]}",
     "id is not 16"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\\n\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 1, \"created_us\": 1, \"created_by\": \"\"}]}",
     "name is not"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": "
     "\"" KEY_A "x\", \"perms\": 1, \"created_us\": 1, \"created_by\": \"\"}]}",
     "sha256 is not"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 0, \"created_us\": 1, \"created_by\": \"\"}]}",
     "perms is not"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 512, \"created_us\": 1, \"created_by\": \"\"}]}",
     "perms is not"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 1, \"created_us\": -1, \"created_by\": \"\"}]}",
     "created_us is negative"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 1, \"created_us\": 1, \"created_by\": \"zz\"}]}",
     "created_by is neither"},
    {"{\"version\": 1, \"keys\": [{\"id\": \"00000000000000aa\", \"name\": \"a\", \"sha256\": "
     "\"" SHA_A "\", \"perms\": 1, \"created_us\": 1, \"created_by\": \"\"}, {\"id\": "
     "\"00000000000000aa\", \"name\": \"b\", \"sha256\": \"" SHA_B "\", \"perms\": 1, "
     "\"created_us\": 1, \"created_by\": \"\"}]}",
     "is also keys[0]"},
};

static void expect_refused(const char *says, const char *api)
{
	struct ezp_error err;
	int rc = daemon_up(api, &err);

	if (rc == EZP_OK)
		fail_msg("the daemon started; expected '%s'", says);
	if (!strstr(err.message, says))
		fail_msg("expected '%s' in: %s", says, err.message);
}

static void test_corrupt_keys_file(void **state)
{
	char target[PATH_MAX + 16];
	struct ezp_error err;

	(void)state;
	for (size_t i = 0; i < sizeof(corrupt) / sizeof(corrupt[0]); i++) {
		char *after;
		spill(T.keys, corrupt[i].text);
		daemon_up(AUTH_ON, &err);
		if (T.d)
			fail_msg("corrupt[%zu] was accepted", i);
		if (!strstr(err.message, T.keys) || !strstr(err.message, corrupt[i].says))
			fail_msg("corrupt[%zu]: expected the file name and '%s' in: %s", i,
				 corrupt[i].says, err.message);
		/* never overwritten, and no admin key made */
		after = slurp(T.keys);
		assert_string_equal(after, corrupt[i].text);
		free(after);
		assert_int_equal(access(T.admin, F_OK), -1);
	}
	/* the parse error has the file, line and column */
	spill(T.keys, "{\n  \"version\": 1,\n  \"keys\": [ nope ]}");
	daemon_up(AUTH_ON, &err);
	assert_null(T.d);
	assert_non_null(strstr(err.message, "line 3"));
	/* not a regular file; a symlink (not followed); too large */
	assert_int_equal(unlink(T.keys), 0);
	assert_int_equal(mkdir(T.keys, 0700), 0);
	expect_refused("not a regular file", AUTH_ON);
	assert_int_equal(rmdir(T.keys), 0);
	snprintf(target, sizeof(target), "%s/target", T.dir);
	spill(target, "{\"version\": 1, \"keys\": []}");
	assert_int_equal(symlink(target, T.keys), 0);
	expect_refused("cannot read the keys file", AUTH_ON);
	expect_refused(T.keys, AUTH_OFF);
	assert_int_equal(unlink(T.keys), 0);
	assert_int_equal(truncate(target, (off_t)(16u << 20) + 1), 0);
	assert_int_equal(rename(target, T.keys), 0);
	expect_refused("at most", AUTH_ON);
	assert_int_equal(unlink(T.keys), 0);
	/* removed: a fresh start with a new admin key */
	daemon_must(AUTH_ON);
	assert_int_equal(access(T.admin, F_OK), 0);
}

static void test_admin_key_file_cases(void **state)
{
	char target[PATH_MAX + 16], inside[PATH_MAX + 16];
	struct ezp_error err;
	char *key, *text;

	(void)state;
	/* a stale admin.key (keys.json removed to start over) is replaced */
	spill(T.admin, "stale\n");
	assert_int_equal(chmod(T.admin, 0644), 0);
	daemon_must(AUTH_ON);
	assert_int_equal(mode_of(T.admin), 0600);
	key = admin_key();
	assert_int_equal(key_perms(key, NULL), EZP_PERM_ALL);
	free(key);
	daemon_down();
	/* a symlink there is replaced, its target untouched */
	assert_int_equal(unlink(T.admin), 0);
	assert_int_equal(unlink(T.keys), 0);
	snprintf(target, sizeof(target), "%s/target", T.dir);
	spill(target, "untouched");
	assert_int_equal(symlink(target, T.admin), 0);
	daemon_must(AUTH_ON);
	assert_int_equal(mode_of(T.admin), 0600); /* lstat: a file now */
	text = slurp(target);
	assert_string_equal(text, "untouched");
	free(text);
	key = admin_key();
	assert_int_equal(key_perms(key, NULL), EZP_PERM_ALL);
	free(key);
	daemon_down();
	/* admin.key cannot be written: start fails, and no key is left behind */
	assert_int_equal(unlink(T.admin), 0);
	assert_int_equal(unlink(T.keys), 0);
	assert_int_equal(mkdir(T.admin, 0700), 0);
	snprintf(inside, sizeof(inside), "%s/x", T.admin);
	spill(inside, "x");
	assert_int_equal(daemon_up(AUTH_ON, &err), EZP_ERR_IO);
	assert_non_null(strstr(err.message, T.admin));
	text = slurp(T.keys);
	assert_non_null(text);
	assert_non_null(strstr(text, "\"keys\": []"));
	free(text);
	rm_tree(T.admin);
	/* fixed: the next start makes one */
	daemon_must(AUTH_ON);
	key = admin_key();
	assert_int_equal(key_perms(key, NULL), EZP_PERM_ALL);
	free(key);
}

static void test_save_failures(void **state)
{
	struct ezp_key_info info;
	struct ezp_error err;
	char admin_id[17], k[65];
	char *admin;

	(void)state;
	daemon_must(AUTH_ON);
	admin = admin_key();
	assert_int_equal(key_perms(admin, admin_id), EZP_PERM_ALL);
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, EZP_PERM_CLOSE, "k", k, &info, &err), EZP_OK);
	/* keys.json replaced by a folder: rename fails; nothing changes in memory */
	assert_int_equal(unlink(T.keys), 0);
	assert_int_equal(mkdir(T.keys, 0700), 0);
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, EZP_PERM_CLOSE, "k2", k, &info, &err),
			 EZP_ERR_IO);
	assert_non_null(strstr(err.message, T.keys));
	assert_int_equal(n_keys(), 2);
	assert_int_equal(T.a->revoke(T.a->auth, admin_id, &err), EZP_ERR_IO);
	assert_int_equal(key_perms(admin, NULL), EZP_PERM_ALL);
	assert_int_equal(n_keys(), 2);
	/* the state directory gone: no temporary file can be made */
	rm_tree(T.dir);
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, EZP_PERM_CLOSE, "k3", k, &info, &err),
			 EZP_ERR_IO);
	assert_non_null(strstr(err.message, "cannot create a file"));
	assert_int_equal(mkdir(T.dir, 0700), 0);
	/* back: it works again and the file is written whole */
	assert_int_equal(mint(admin_id, EZP_PERM_ALL, EZP_PERM_CLOSE, "k4", k, &info, &err),
			 EZP_OK);
	assert_int_equal(T.a->revoke(T.a->auth, info.id, &err), EZP_OK);
	assert_int_equal(n_keys(), 2);
	assert_int_equal(mode_of(T.keys), 0600);
	free(admin);
}

/* ---- the loopback rule -------------------------------------------------------------------- */

static void test_auth_off(void **state)
{
	struct ezp_key_info info;
	struct ezp_error err;
	char k[65];

	(void)state;
	/* not loopback: refused, saying why */
	assert_int_not_equal(daemon_up("{Listen: 0.0.0.0:0, Auth: false}", &err), EZP_OK);
	assert_non_null(strstr(err.message, "Api.Auth is false but Api.Listen 0.0.0.0:0 is not a "
					    "loopback address: turn Auth on or listen on "
					    "127.0.0.1"));
	assert_int_equal(err.code, EZP_ERR_CONFIG);
	/* loopback: every request is admin; no admin key is made */
	daemon_must(AUTH_OFF);
	assert_int_equal(T.a->enabled(T.a->auth), 0);
	assert_int_equal(access(T.admin, F_OK), -1);
	assert_int_equal(n_keys(), 0);
	/* minting with no parent: the parent is admin */
	assert_int_equal(mint("", 0, EZP_PERM_ALL, "first", k, &info, &err), EZP_OK);
	assert_string_equal(info.created_by, "");
	assert_int_equal(mint(NULL, 0, EZP_PERM_CLOSE, NULL, k, &info, &err), EZP_OK);
	assert_int_equal(key_perms(k, NULL), EZP_PERM_CLOSE);
	assert_int_equal(mint("", 0, 0x400, NULL, k, &info, &err), EZP_ERR_INVAL);
	assert_int_equal(n_keys(), 2);
	assert_int_equal(mode_of(T.keys), 0600);
}

/* ---- the service kind, called directly -------------------------------------------------- */

struct direct {
	void *handle;
	const struct ezp_service_kind *kind;
	struct ezp_daemon *d; /* gives a real core table; never started */
	const struct ezp_core *core;
};

static void direct_open(struct direct *x)
{
	const char *paths[] = {plugins_dir(), NULL};
	struct ezp_daemon_opts opts = test_opts(paths, EZP_LOG_ERROR);
	const struct ezp_plugin_desc *desc;
	struct ezp_error err;
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/auth/auth.so", plugins_dir());
	x->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!x->handle)
		fail_msg("dlopen %s: %s", path, dlerror());
	desc = dlsym(x->handle, EZP_PLUGIN_SYMBOL);
	assert_non_null(desc);
	assert_string_equal(desc->name, "auth");
	assert_non_null(desc->services);
	x->kind = desc->services[0];
	assert_null(desc->services[1]);
	assert_string_equal(x->kind->name, "auth");
	assert_string_equal(x->kind->iface_name, EZP_AUTH_IFACE);
	assert_int_equal(x->kind->iface_version, EZP_AUTH_VERSION);
	assert_null(x->kind->params);
	assert_int_equal(x->kind->config_size, 0);
	assert_int_equal(ezp_daemon_new("Pipelines: []\n", NULL, &opts, &x->d, &err), EZP_OK);
	x->core = ezp_daemon_core(x->d);
}

static void direct_close(struct direct *x)
{
	ezp_daemon_free(x->d);
	dlclose(x->handle);
}

static struct ezp_api_conf conf_of(const char *listen, int auth, const char *dir)
{
	struct ezp_api_conf c = {
	    .struct_size = sizeof(c), .listen = listen, .auth = auth, .state_dir = dir};
	return c;
}

static void test_direct_listen_addresses(void **state)
{
	static const struct {
		const char *listen;
		int ok;
	} cases[] = {
	    {"127.0.0.1:8080", 1},
	    {"127.255.0.9:1", 1},
	    {"localhost:80", 1},
	    {"LOCALHOST", 1},
	    {"[::1]:8080", 1},
	    {"::1", 1},
	    {"[::ffff:127.0.0.1]:5", 1},
	    {"0.0.0.0:8080", 0},
	    {"10.0.0.1:80", 0},
	    {"[::]:80", 0},
	    {":8080", 0},
	    {"[::1", 0},
	    {"example.com:80", 0},
	    {"128.0.0.1:1", 0},
	    {"[::ffff:10.0.0.1]:5", 0},
	    {NULL, 0},
	};
	struct direct x;
	struct ezp_error err;
	struct ezp_api_conf c;
	char longhost[400];
	void *st = NULL;

	(void)state;
	direct_open(&x);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		c = conf_of(cases[i].listen, 0, NULL);
		st = NULL;
		int rc = x.kind->start(x.core, &c, &st, &err);
		if (cases[i].ok != (rc == EZP_OK))
			fail_msg("Listen %s: start gave %d (%s)",
				 cases[i].listen ? cases[i].listen : "NULL", rc,
				 rc ? err.message : "");
		if (rc == EZP_OK)
			x.kind->stop(st);
		else
			assert_int_equal(err.code, EZP_ERR_CONFIG);
	}
	memset(longhost, '1', sizeof(longhost));
	longhost[sizeof(longhost) - 1] = '\0';
	c = conf_of(longhost, 0, NULL);
	assert_int_equal(x.kind->start(x.core, &c, &st, &err), EZP_ERR_CONFIG);
	/* no config, a config too small, auth on without a StateDir */
	assert_int_equal(x.kind->start(x.core, NULL, &st, &err), EZP_ERR_ABI);
	c = conf_of("127.0.0.1:1", 1, NULL);
	c.struct_size = offsetof(struct ezp_api_conf, state_dir);
	assert_int_equal(x.kind->start(x.core, &c, &st, NULL), EZP_ERR_ABI);
	c = conf_of("127.0.0.1:1", 1, NULL);
	assert_int_equal(x.kind->start(x.core, &c, &st, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "StateDir"));
	x.kind->stop(NULL);
	direct_close(&x);
}

static void test_direct_memory_only(void **state)
{
	struct ezp_api_conf c = conf_of("127.0.0.1:1", 0, NULL);
	const struct ezp_auth *a;
	struct ezp_key_info *list = NULL, info;
	struct ezp_error err;
	struct direct x;
	char k[65];
	size_t n = 9;
	void *st = NULL;

	(void)state;
	direct_open(&x);
	assert_int_equal(x.kind->start(x.core, &c, &st, &err), EZP_OK);
	a = x.kind->iface(st);
	assert_ptr_equal(a->auth, st);
	assert_int_equal(a->struct_size, sizeof(struct ezp_auth));
	assert_int_equal(a->list(a->auth, &list, &n), EZP_OK);
	assert_int_equal(n, 0);
	free(list);
	/* no StateDir and auth off: keys live in memory, up to the limit */
	for (int i = 0; i < 10000; i++)
		if (a->create(a->auth, "", 0, EZP_PERM_CLOSE, "m", k, &info, &err) != EZP_OK)
			fail_msg("key %d: %s", i, err.message);
	assert_int_equal(a->create(a->auth, "", 0, EZP_PERM_CLOSE, "m", k, &info, &err),
			 EZP_ERR_LIMIT);
	assert_int_equal(a->check(a->auth, k, NULL, NULL), EZP_OK);
	assert_int_equal(a->revoke(a->auth, info.id, &err), EZP_OK);
	assert_int_equal(a->check(a->auth, k, NULL, NULL), EZP_ERR_PERM);
	assert_int_equal(a->subscribe(a->auth, on_revoked, &n), EZP_OK); /* freed by stop */
	x.kind->stop(st);
	direct_close(&x);
}

static void test_direct_reconfigure(void **state)
{
	struct ezp_api_conf c = conf_of("127.0.0.1:1", 0, T.dir);
	const struct ezp_auth *a;
	struct ezp_error err;
	struct direct x;
	char other[PATH_MAX + 8], inside[PATH_MAX + 8];
	void *st = NULL;

	(void)state;
	direct_open(&x);
	assert_non_null(x.kind->reconfigure);
	/* auth off, then on: the admin key is made then */
	assert_int_equal(x.kind->start(x.core, &c, &st, &err), EZP_OK);
	a = x.kind->iface(st);
	assert_int_equal(a->enabled(a->auth), 0);
	assert_int_equal(access(T.admin, F_OK), -1);
	/* admin.key cannot be written: the change is refused, auth stays off */
	assert_int_equal(mkdir(T.admin, 0700), 0);
	snprintf(inside, sizeof(inside), "%s/x", T.admin);
	spill(inside, "x");
	c.auth = 1;
	assert_int_equal(x.kind->reconfigure(st, &c, &err), EZP_ERR_IO);
	assert_int_equal(a->enabled(a->auth), 0);
	rm_tree(T.admin);
	assert_int_equal(x.kind->reconfigure(st, &c, &err), EZP_OK);
	assert_int_equal(a->enabled(a->auth), 1);
	T.a = a;
	{
		char *key = admin_key();
		assert_int_equal(key_perms(key, NULL), EZP_PERM_ALL);
		free(key);
	}
	T.a = NULL;
	/* refused: another StateDir, none, a public address with auth off */
	snprintf(other, sizeof(other), "%s/other", T.dir);
	c = conf_of("127.0.0.1:1", 1, other);
	assert_int_equal(x.kind->reconfigure(st, &c, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "StateDir cannot change"));
	c = conf_of("127.0.0.1:1", 0, NULL);
	assert_int_equal(x.kind->reconfigure(st, &c, &err), EZP_ERR_CONFIG);
	c = conf_of("0.0.0.0:1", 0, T.dir);
	assert_int_equal(x.kind->reconfigure(st, &c, &err), EZP_ERR_CONFIG);
	assert_non_null(strstr(err.message, "not a loopback address"));
	assert_int_equal(a->enabled(a->auth), 1);
	/* off again on loopback */
	c = conf_of("[::1]:1", 0, T.dir);
	assert_int_equal(x.kind->reconfigure(st, &c, &err), EZP_OK);
	assert_int_equal(a->enabled(a->auth), 0);
	x.kind->stop(st);
	/* memory only, and a StateDir appears: refused too */
	c = conf_of("127.0.0.1:1", 0, NULL);
	assert_int_equal(x.kind->start(x.core, &c, &st, &err), EZP_OK);
	c = conf_of("127.0.0.1:1", 0, T.dir);
	assert_int_equal(x.kind->reconfigure(st, &c, &err), EZP_ERR_CONFIG);
	x.kind->stop(st);
	direct_close(&x);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_first_start_admin_key, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_check_refuses, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_minting_rules, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_list_get_revoke, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_persist_across_restart, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_keys_file_written_elsewhere, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_corrupt_keys_file, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_admin_key_file_cases, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_save_failures, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_auth_off, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_direct_listen_addresses, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_direct_memory_only, setup, teardown),
	    cmocka_unit_test_setup_teardown(test_direct_reconfigure, setup, teardown),
	};
	const char *tmp = getenv("TMPDIR");
	int rc;

	signal(SIGPIPE, SIG_IGN);
	snprintf(root, sizeof(root), "%s/ezp-test-auth-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(root)) {
		perror("mkdtemp");
		return 1;
	}
	if (getenv("EZP_TEST_FILTER")) /* e.g. EZP_TEST_FILTER='test_minting_rules' */
		cmocka_set_test_filter(getenv("EZP_TEST_FILTER"));
	rc = cmocka_run_group_tests(tests, NULL, NULL);
	rm_tree(root);
	return rc;
}
