/*
 * auth.c - the `auth` service plugin: API keys and their permissions
 * (DESIGN.md section 7). Provides the "ezp.auth" interface (services.h):
 * check a presented key, mint keys under the minting rules, list, get and
 * revoke them, and tell subscribers about revocations. Keys are 256-bit
 * random tokens; only their SHA-256 is kept, in <StateDir>/keys.json
 * (store.c). On first start with auth on and no key, an admin key is
 * written to <StateDir>/admin.key (owner-only). Keys are never logged.
 *
 * Threads: start, reconfigure and stop run on the control thread; the
 * interface's functions on the core's service loop. Both touch the key
 * table, so every access holds auth_state.mu. Revocation listeners are
 * called without the mutex (they may call back in).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "auth.h"

static const char *const auth_perm_names[] = EZP_PERM_NAMES;

/* ---- the listen address ------------------------------------------------------------ */

/* Is "host:port" / "[v6]:port" / "localhost:port" on loopback? */
static int auth_is_loopback(const char *listen)
{
	char host[256];
	const char *start = listen, *end;
	struct in_addr a4;
	struct in6_addr a6;

	if (!listen)
		return 0;
	if (*listen == '[') {
		start = listen + 1;
		if (!(end = strchr(start, ']')))
			return 0;
	} else {
		end = strrchr(listen, ':');
		if (end && strchr(listen, ':') != end) /* a bare IPv6 address, no port */
			end = NULL;
	}
	if (!end)
		end = listen + strlen(listen);
	if ((size_t)(end - start) >= sizeof(host))
		return 0;
	memcpy(host, start, (size_t)(end - start));
	host[end - start] = '\0';
	if (!strcasecmp(host, "localhost"))
		return 1;
	if (inet_pton(AF_INET, host, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	if (inet_pton(AF_INET6, host, &a6) == 1)
		return IN6_IS_ADDR_LOOPBACK(&a6) ||
		       (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
	return 0;
}

/* The config checks start and reconfigure share. */
static int auth_check_conf(const struct ezp_api_conf *conf, struct ezp_error *err)
{
	if (!conf || !EZP_HAS(conf, state_dir))
		return auth_error(err, EZP_ERR_ABI, "auth: the core passed no Api config");
	if (!conf->auth && !auth_is_loopback(conf->listen))
		return auth_error(err, EZP_ERR_CONFIG,
				  "Api.Auth is false but Api.Listen %s is not a loopback address: "
				  "turn Auth on or listen on 127.0.0.1",
				  conf->listen ? conf->listen : "(none)");
	if (conf->auth && !conf->state_dir)
		return auth_error(
		    err, EZP_ERR_CONFIG,
		    "Api.Auth is true but there is no StateDir for the keys file: set "
		    "StateDir");
	return EZP_OK;
}

/* ---- the key table (mutex held) ----------------------------------------------------- */

static struct auth_key *auth_find(struct auth_state *st, const char *id)
{
	for (size_t i = 0; id && i < st->n_keys; i++)
		if (!strcmp(st->keys[i].id, id))
			return &st->keys[i];
	return NULL;
}

static void auth_info(const struct auth_key *k, struct ezp_key_info *out)
{
	if (!out)
		return;
	memset(out, 0, sizeof(*out));
	out->struct_size = sizeof(*out);
	memcpy(out->id, k->id, sizeof(out->id));
	memcpy(out->name, k->name, sizeof(out->name));
	out->perms = k->perms;
	out->created_us = k->created_us;
	memcpy(out->created_by, k->created_by, sizeof(out->created_by));
}

/*
 * Make a key, add it and save the table (taken out again if saving fails).
 * @text gets the secret (AUTH_KEY_HEX + 1 bytes); @out the new record.
 */
static int auth_mint(struct auth_state *st, uint32_t perms, const char *name, const char *by,
		     char *text, struct auth_key *out, struct ezp_error *err)
{
	unsigned char secret[AUTH_SECRET_BYTES], raw[AUTH_ID_BYTES];
	struct auth_key *k;
	int rc;

	if (st->n_keys >= AUTH_MAX_KEYS)
		return auth_error(err, EZP_ERR_LIMIT,
				  "there are %d keys already; revoke some first", AUTH_MAX_KEYS);
	if (st->n_keys == st->cap_keys) {
		size_t cap = st->cap_keys ? st->cap_keys * 2 : 8;
		struct auth_key *keys = realloc(st->keys, cap * sizeof(*keys));
		if (!keys)
			return auth_error(err, EZP_ERR_NOMEM, "out of memory minting a key");
		st->keys = keys;
		st->cap_keys = cap;
	}
	k = &st->keys[st->n_keys];
	memset(k, 0, sizeof(*k));
	if ((rc = auth_random(secret, sizeof(secret), err)))
		return rc;
	do {
		if ((rc = auth_random(raw, sizeof(raw), err)))
			goto out;
		auth_hex(k->id, raw, sizeof(raw));
	} while (auth_find(st, k->id));
	auth_hex(text, secret, sizeof(secret));
	SHA256((const unsigned char *)text, AUTH_KEY_HEX, k->digest);
	snprintf(k->name, sizeof(k->name), "%s", name);
	snprintf(k->created_by, sizeof(k->created_by), "%s", by);
	k->perms = perms;
	k->created_us = st->core->now_us();
	st->n_keys++;
	if ((rc = auth_keys_save(st, err))) {
		st->n_keys--;
		OPENSSL_cleanse(text, AUTH_KEY_HEX + 1);
		goto out;
	}
	*out = *k;
out:
	OPENSSL_cleanse(secret, sizeof(secret));
	return rc;
}

/* Auth on and no key: make the admin key and write it to admin.key. */
static int auth_first_admin(struct auth_state *st, struct ezp_error *err)
{
	char text[AUTH_KEY_HEX + 1];
	struct auth_key k;
	int rc;

	if (!st->enabled || st->n_keys)
		return EZP_OK;
	if ((rc = auth_mint(st, EZP_PERM_ALL, "admin", "", text, &k, err)))
		return rc;
	if ((rc = auth_admin_write(st, text, err))) {
		st->n_keys--; /* an admin key nobody can read would lock everyone out */
		auth_keys_save(st, NULL);
	} else {
		st->core->log(EZP_LOG_INFO, "auth",
			      "first start: admin key written to %s (owner-only)", st->admin_path);
	}
	OPENSSL_cleanse(text, sizeof(text));
	return rc;
}

/* ---- the ezp.auth interface (service loop) -------------------------------------------- */

static int auth_enabled(void *auth)
{
	struct auth_state *st = auth;
	int on;

	pthread_mutex_lock(&st->mu);
	on = st->enabled;
	pthread_mutex_unlock(&st->mu);
	return on;
}

static int auth_check(void *auth, const char *key, uint32_t *perms, char *id_out)
{
	struct auth_state *st = auth;
	unsigned char digest[AUTH_DIGEST_BYTES];
	size_t len = key ? strnlen(key, AUTH_KEY_MAX + 1) : 0, found = SIZE_MAX;

	if (len == 0 || len > AUTH_KEY_MAX)
		return EZP_ERR_PERM;
	SHA256((const unsigned char *)key, len, digest);
	pthread_mutex_lock(&st->mu);
	/* every digest is compared, in constant time, match or not */
	for (size_t i = 0; i < st->n_keys; i++) {
		int eq = CRYPTO_memcmp(digest, st->keys[i].digest, sizeof(digest)) == 0;
		found = eq ? i : found;
	}
	if (found != SIZE_MAX) {
		if (perms)
			*perms = st->keys[found].perms;
		if (id_out)
			memcpy(id_out, st->keys[found].id, sizeof(st->keys[found].id));
	}
	pthread_mutex_unlock(&st->mu);
	return found != SIZE_MAX ? EZP_OK : EZP_ERR_PERM;
}

/* "Filter, Inject" for the bits in @bits. */
static void auth_perm_list(uint32_t bits, char *out, size_t cap)
{
	size_t n = 0;

	out[0] = '\0';
	for (unsigned b = 0; b < sizeof(auth_perm_names) / sizeof(auth_perm_names[0]); b++)
		if (bits & (1u << b) && n < cap)
			n += (size_t)snprintf(out + n, cap - n, "%s%s", n ? ", " : "",
					      auth_perm_names[b]);
}

/* The minting rules, with the parent's permissions as stored. Mutex held. */
static int auth_may_mint(const char *parent, uint32_t parent_perms, uint32_t perms,
			 struct ezp_error *err)
{
	char missing[160];

	if (!(parent_perms & EZP_PERM_MAKE_KEYS))
		return auth_error(err, EZP_ERR_PERM,
				  "minting a key needs MakeKeys, which key %s does not have",
				  parent);
	if (perms & ~parent_perms) {
		auth_perm_list(perms & ~parent_perms, missing, sizeof(missing));
		return auth_error(
		    err, EZP_ERR_PERM,
		    "a new key may only have a subset of its maker's permissions: key "
		    "%s does not have %s",
		    parent, missing);
	}
	if ((perms & (EZP_PERM_MAKE_KEYS | EZP_PERM_DUPLICATE_KEYS)) &&
	    !(parent_perms & EZP_PERM_DUPLICATE_KEYS))
		return auth_error(
		    err, EZP_ERR_PERM,
		    "granting MakeKeys needs DuplicateKeys, which key %s does not have "
		    "(MakeKeys alone mints keys without MakeKeys)",
		    parent);
	return EZP_OK;
}

static int auth_create(void *auth, const char *parent_id, uint32_t parent_perms, uint32_t perms,
		       const char *name, char *key_out, struct ezp_key_info *info,
		       struct ezp_error *err)
{
	struct auth_state *st = auth;
	char text[AUTH_KEY_HEX + 1];
	struct auth_key *parent, k;
	int rc;

	if (!name)
		name = "";
	if (!perms)
		return auth_error(err, EZP_ERR_INVAL, "perms: a key needs at least one permission");
	if (perms & ~EZP_PERM_ALL)
		return auth_error(err, EZP_ERR_INVAL,
				  "perms: unknown permission bits 0x%x (known bits: 0x%x)",
				  perms & ~EZP_PERM_ALL, EZP_PERM_ALL);
	if (strnlen(name, AUTH_NAME_MAX + 1) > AUTH_NAME_MAX)
		return auth_error(err, EZP_ERR_INVAL, "name: at most %d characters", AUTH_NAME_MAX);
	for (const char *c = name; *c; c++)
		if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7e)
			return auth_error(err, EZP_ERR_INVAL,
					  "name: printable ASCII characters only");
	pthread_mutex_lock(&st->mu);
	if (!st->enabled) { /* every request is admin */
		parent_id = "";
		parent_perms = EZP_PERM_ALL;
	} else if (!(parent = auth_find(st, parent_id))) {
		rc = parent_id && *parent_id
			 ? auth_error(err, EZP_ERR_PERM, "key %s has been revoked", parent_id)
			 : auth_error(err, EZP_ERR_PERM, "minting a key needs the maker's key");
		goto out;
	} else {
		parent_perms &= parent->perms;
	}
	if (!(rc = auth_may_mint(parent_id, parent_perms, perms, err)) &&
	    !(rc = auth_mint(st, perms, name, parent_id, text, &k, err))) {
		memcpy(key_out, text, sizeof(text));
		auth_info(&k, info);
		OPENSSL_cleanse(text, sizeof(text));
	}
out:
	pthread_mutex_unlock(&st->mu);
	return rc;
}

static int auth_list(void *auth, struct ezp_key_info **out, size_t *n)
{
	struct auth_state *st = auth;
	struct ezp_key_info *arr;

	pthread_mutex_lock(&st->mu);
	arr = malloc((st->n_keys ? st->n_keys : 1) * sizeof(*arr));
	for (size_t i = 0; arr && i < st->n_keys; i++)
		auth_info(&st->keys[i], &arr[i]);
	*n = arr ? st->n_keys : 0;
	pthread_mutex_unlock(&st->mu);
	*out = arr;
	return arr ? EZP_OK : EZP_ERR_NOMEM;
}

static int auth_get(void *auth, const char *id, struct ezp_key_info *out)
{
	struct auth_state *st = auth;
	struct auth_key *k;

	pthread_mutex_lock(&st->mu);
	if ((k = auth_find(st, id)))
		auth_info(k, out);
	pthread_mutex_unlock(&st->mu);
	return k ? EZP_OK : EZP_ERR_NOT_FOUND;
}

static int auth_subscribed(struct auth_state *st, const struct auth_sub *s)
{
	int yes = 0;

	pthread_mutex_lock(&st->mu);
	for (size_t i = 0; !yes && i < st->n_subs; i++)
		yes = st->subs[i].fn == s->fn && st->subs[i].userdata == s->userdata;
	pthread_mutex_unlock(&st->mu);
	return yes;
}

static int auth_revoke(void *auth, const char *id, struct ezp_error *err)
{
	struct auth_state *st = auth;
	struct auth_sub *subs = NULL;
	struct auth_key *k, gone;
	char gone_id[sizeof(gone.id)];
	size_t i, n_subs = 0;
	int rc;

	pthread_mutex_lock(&st->mu);
	if (!(k = auth_find(st, id))) {
		pthread_mutex_unlock(&st->mu);
		return auth_error(err, EZP_ERR_NOT_FOUND, "no key with id '%s'", id ? id : "");
	}
	i = (size_t)(k - st->keys);
	gone = *k;
	memmove(k, k + 1, (st->n_keys - i - 1) * sizeof(*k));
	st->n_keys--;
	if ((rc = auth_keys_save(st, err))) { /* put it back: nothing changed */
		memmove(&st->keys[i + 1], &st->keys[i], (st->n_keys - i) * sizeof(*k));
		st->keys[i] = gone;
		st->n_keys++;
	} else if (st->n_subs && (subs = malloc(st->n_subs * sizeof(*subs)))) {
		memcpy(subs, st->subs, st->n_subs * sizeof(*subs));
		n_subs = st->n_subs;
	}
	pthread_mutex_unlock(&st->mu);
	memcpy(gone_id, gone.id, sizeof(gone_id));
	/* a listener removed by an earlier one's callback is not called */
	for (i = 0; i < n_subs; i++)
		if (auth_subscribed(st, &subs[i]))
			subs[i].fn(subs[i].userdata, gone_id);
	free(subs);
	return rc;
}

static int auth_subscribe(void *auth, ezp_key_revoked_fn fn, void *userdata)
{
	struct auth_state *st = auth;
	int rc = EZP_OK;

	if (!fn)
		return EZP_ERR_INVAL;
	pthread_mutex_lock(&st->mu);
	if (st->n_subs == st->cap_subs) {
		size_t cap = st->cap_subs ? st->cap_subs * 2 : 4;
		struct auth_sub *subs = realloc(st->subs, cap * sizeof(*subs));
		if (subs) {
			st->subs = subs;
			st->cap_subs = cap;
		} else {
			rc = EZP_ERR_NOMEM;
		}
	}
	if (!rc)
		st->subs[st->n_subs++] = (struct auth_sub){fn, userdata};
	pthread_mutex_unlock(&st->mu);
	return rc;
}

static void auth_unsubscribe(void *auth, ezp_key_revoked_fn fn, void *userdata)
{
	struct auth_state *st = auth;

	pthread_mutex_lock(&st->mu);
	for (size_t i = 0; i < st->n_subs; i++) {
		if (st->subs[i].fn == fn && st->subs[i].userdata == userdata) {
			memmove(&st->subs[i], &st->subs[i + 1],
				(st->n_subs - i - 1) * sizeof(st->subs[0]));
			st->n_subs--;
			break;
		}
	}
	pthread_mutex_unlock(&st->mu);
}

/* ---- the service (control thread) -------------------------------------------------------- */

static void auth_stop(void *state)
{
	struct auth_state *st = state;

	if (!st)
		return;
	pthread_mutex_destroy(&st->mu);
	free(st->keys);
	free(st->subs);
	free(st->dir);
	free(st->keys_path);
	free(st->admin_path);
	free(st);
}

static char *auth_path(const char *dir, const char *file)
{
	size_t n = strlen(dir) + strlen(file) + 2;
	char *p = malloc(n);

	if (p)
		snprintf(p, n, "%s/%s", dir, file);
	return p;
}

static int auth_start(const struct ezp_core *core, const void *config, void **state,
		      struct ezp_error *err)
{
	const struct ezp_api_conf *conf = config;
	struct auth_state *st;
	int rc;

	if ((rc = auth_check_conf(conf, err)))
		return rc;
	if (!(st = calloc(1, sizeof(*st))))
		return auth_error(err, EZP_ERR_NOMEM, "out of memory starting auth");
	pthread_mutex_init(&st->mu, NULL);
	st->core = core;
	st->enabled = conf->auth != 0;
	st->iface = (struct ezp_auth){
	    .struct_size = sizeof(struct ezp_auth),
	    .enabled = auth_enabled,
	    .check = auth_check,
	    .create = auth_create,
	    .list = auth_list,
	    .get = auth_get,
	    .revoke = auth_revoke,
	    .subscribe = auth_subscribe,
	    .unsubscribe = auth_unsubscribe,
	    .auth = st,
	};
	if (conf->state_dir && (!(st->dir = strdup(conf->state_dir)) ||
				!(st->keys_path = auth_path(conf->state_dir, AUTH_KEYS_FILE)) ||
				!(st->admin_path = auth_path(conf->state_dir, AUTH_ADMIN_FILE)))) {
		rc = auth_error(err, EZP_ERR_NOMEM, "out of memory starting auth");
		goto fail;
	}
	if ((st->dir && (rc = auth_keys_load(st, err))) || (rc = auth_first_admin(st, err)))
		goto fail;
	if (!st->enabled)
		core->log(EZP_LOG_WARN, "auth",
			  "Api.Auth is false: every API request on %s is admin (loopback only)",
			  conf->listen);
	core->log(EZP_LOG_DEBUG, "auth", "%zu keys loaded from %s", st->n_keys,
		  st->keys_path ? st->keys_path : "(memory)");
	*state = st;
	return EZP_OK;
fail:
	auth_stop(st);
	return rc;
}

/* A new Api section: Auth and Listen may change, the state directory may not. */
static int auth_reconfigure(void *state, const void *config, struct ezp_error *err)
{
	const struct ezp_api_conf *conf = config;
	struct auth_state *st = state;
	int rc, was;

	if ((rc = auth_check_conf(conf, err)))
		return rc;
	if ((st->dir || conf->state_dir) &&
	    (!st->dir || !conf->state_dir || strcmp(st->dir, conf->state_dir)))
		return auth_error(err, EZP_ERR_CONFIG,
				  "StateDir cannot change while the API runs: restart the daemon");
	pthread_mutex_lock(&st->mu);
	was = st->enabled;
	st->enabled = conf->auth != 0;
	if ((rc = auth_first_admin(st, err)))
		st->enabled = was;
	pthread_mutex_unlock(&st->mu);
	return rc;
}

static const void *auth_iface(void *state)
{
	return &((struct auth_state *)state)->iface;
}

static const struct ezp_service_kind auth_kind = {
    .struct_size = sizeof(struct ezp_service_kind),
    .name = "auth",
    .description = "API keys (only their SHA-256 on disk) and permissions",
    .params = NULL,
    .config_size = 0,
    .start = auth_start,
    .reconfigure = auth_reconfigure,
    .stop = auth_stop,
    .iface_name = EZP_AUTH_IFACE,
    .iface_version = EZP_AUTH_VERSION,
    .iface = auth_iface,
};

static const struct ezp_service_kind *const auth_services[] = {&auth_kind, NULL};

EZP_PLUGIN_DEFINE(ezp_plugin, .name = "auth", .version = "0.1.0",
		  .description = "API keys and permissions for the http-api service",
		  .license = "MIT", .services = auth_services);
