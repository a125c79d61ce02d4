/*
 * auth.h - what the auth plugin's two files share: the key table and the
 * service state (auth.c), the keys file and admin.key on disk (store.c).
 * Internal to the plugin: every name here is hidden (the build compiles
 * with -fvisibility=hidden; the descriptor is the only export).
 *
 * Threads: the service callbacks (start, reconfigure, stop) run on the
 * control thread, the `ezp.auth` calls on the service loop; both touch the
 * key table, so it is guarded by auth_state.mu. store.c's functions are
 * called with that mutex held (or before the state is shared).
 */
#ifndef EZP_AUTH_H
#define EZP_AUTH_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <ezproxy/services.h>

#define AUTH_SECRET_BYTES 32	  /* 256-bit keys */
#define AUTH_KEY_HEX 64		  /* a key as shown: 64 lowercase hex digits */
#define AUTH_ID_BYTES 8		  /* ids: 16 hex digits, random */
#define AUTH_DIGEST_BYTES 32	  /* SHA-256 */
#define AUTH_NAME_MAX 64	  /* printable ASCII */
#define AUTH_KEY_MAX 256	  /* longer presented keys are refused unhashed */
#define AUTH_MAX_KEYS 10000	  /* keys kept; minting past it is refused */
#define AUTH_FILE_MAX (16u << 20) /* a keys file larger than this is refused */
#define AUTH_FILE_VERSION 1	  /* "version" in keys.json */
#define AUTH_KEYS_FILE "keys.json"
#define AUTH_ADMIN_FILE "admin.key"

/* One stored key: never the secret, only its digest. */
struct auth_key {
	char id[AUTH_ID_BYTES * 2 + 1];
	char name[AUTH_NAME_MAX + 1];
	char created_by[AUTH_ID_BYTES * 2 + 1]; /* "" for the first admin key / auth off */
	uint32_t perms;
	uint64_t created_us;
	unsigned char digest[AUTH_DIGEST_BYTES];
};

/* One revocation listener. */
struct auth_sub {
	ezp_key_revoked_fn fn;
	void *userdata;
};

struct auth_state {
	const struct ezp_core *core;
	struct ezp_auth iface; /* handed out by iface(); .auth is this state */
	pthread_mutex_t mu;    /* guards everything below */
	int enabled;	       /* Api.Auth */
	char *dir;	       /* the state directory; NULL: keys kept in memory only */
	char *keys_path;       /* <dir>/keys.json */
	char *admin_path;      /* <dir>/admin.key */
	struct auth_key *keys;
	size_t n_keys, cap_keys;
	struct auth_sub *subs;
	size_t n_subs, cap_subs;
};

/* Fill @err (may be NULL) and return @code. The side follows from the code. */
int auth_error(struct ezp_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* @n bytes to 2n lowercase hex digits plus NUL. */
void auth_hex(char *out, const unsigned char *in, size_t n);
/* Exactly 2n lowercase hex digits (then NUL) to @n bytes. 1 on success, 0 otherwise. */
int auth_unhex(unsigned char *out, const char *in, size_t n);
/* @n random bytes from getrandom(2). EZP_OK or EZP_ERR_IO. */
int auth_random(void *buf, size_t n, struct ezp_error *err);

/*
 * auth_keys_load - read <dir>/keys.json into the (empty) table. A missing
 * file is an empty table; an unreadable or corrupt one is an error naming
 * the file (never overwritten). Thread: control, before the state is shared.
 */
int auth_keys_load(struct auth_state *st, struct ezp_error *err);
/* Write the table to <dir>/keys.json atomically (0600 temp, fsync, rename). Mutex held. */
int auth_keys_save(struct auth_state *st, struct ezp_error *err);
/*
 * Write "@key\n" to <dir>/admin.key, owner-only: created with O_EXCL and
 * O_NOFOLLOW, or atomically replaced when the file exists. Mutex held.
 */
int auth_admin_write(struct auth_state *st, const char *key, struct ezp_error *err);

#endif
