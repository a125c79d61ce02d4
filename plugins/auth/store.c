/*
 * store.c - the auth plugin's files in the state directory: keys.json
 * (loaded strictly at start, written atomically after every change) and
 * admin.key (the first admin key, owner-only), plus the hex, random and
 * error helpers both files use.
 *
 * Threads: whichever thread holds auth_state.mu (the control thread at
 * start and reconfigure, the service loop for create and revoke); loading
 * happens at start before the state is shared. Nothing here logs: a key
 * text passes through auth_admin_write only and is never printed.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "auth.h"

/* ---- small helpers ---------------------------------------------------------------- */

int auth_error(struct ezp_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return code;
	memset(err, 0, sizeof(*err));
	err->code = code;
	err->side = code == EZP_ERR_CONFIG ? EZP_SIDE_CONFIG
		    : (code == EZP_ERR_PERM || code == EZP_ERR_INVAL || code == EZP_ERR_NOT_FOUND)
			? EZP_SIDE_CLIENT
			: EZP_SIDE_INTERNAL;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return code;
}

void auth_hex(char *out, const unsigned char *in, size_t n)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * n] = '\0';
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

int auth_unhex(unsigned char *out, const char *in, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		int hi = hex_digit(in[2 * i]), lo = hi < 0 ? -1 : hex_digit(in[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return 0;
		out[i] = (unsigned char)(hi << 4 | lo);
	}
	return in[2 * n] == '\0';
}

int auth_random(void *buf, size_t n, struct ezp_error *err)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = getrandom((char *)buf + got, n - got, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return auth_error(err, EZP_ERR_IO, "getrandom failed: %s", strerror(errno));
		got += (size_t)r;
	}
	return EZP_OK;
}

static int write_all(int fd, const char *data, size_t len)
{
	while (len) {
		ssize_t w = write(fd, data, len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		data += w;
		len -= (size_t)w;
	}
	return 0;
}

/* fsync the directory so a rename survives a crash (best effort). */
static void sync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
}

/*
 * Replace @path with @data: a 0600 temporary file in @dir, written and
 * fsync'd, renamed over @path (rename replaces a symlink, never follows it).
 */
static int write_atomic(const char *dir, const char *path, const char *data, size_t len,
			struct ezp_error *err)
{
	char tmp[PATH_MAX];
	int fd = -1, saved;

	if ((size_t)snprintf(tmp, sizeof(tmp), "%s/.ezp-auth.XXXXXX", dir) >= sizeof(tmp))
		return auth_error(err, EZP_ERR_IO, "cannot write %s: path too long", path);
	if ((fd = mkostemp(tmp, O_CLOEXEC)) < 0)
		return auth_error(err, EZP_ERR_IO,
				  "cannot write %s: cannot create a file in %s: %s", path, dir,
				  strerror(errno));
	if (fchmod(fd, 0600) || write_all(fd, data, len) || fsync(fd))
		goto fail;
	if (close(fd)) {
		fd = -1;
		goto fail;
	}
	fd = -1;
	if (rename(tmp, path))
		goto fail;
	sync_dir(dir);
	return EZP_OK;
fail:
	saved = errno;
	if (fd >= 0)
		close(fd);
	unlink(tmp);
	return auth_error(err, EZP_ERR_IO, "cannot write %s: %s", path, strerror(saved));
}

/* ---- keys.json ----------------------------------------------------------------------- */

static int printable(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
			return 0;
	return 1;
}

/* One record of "keys" into @k. NULL on success, else what is wrong. */
static const char *key_from_json(json_t *obj, struct auth_key *k, char *why, size_t cap)
{
	const char *id, *name, *sha, *by;
	json_int_t perms, created;
	unsigned char raw[AUTH_ID_BYTES];
	json_error_t je;

	if (json_unpack_ex(obj, &je, JSON_STRICT, "{s:s, s:s, s:s, s:I, s:I, s:s}", "id", &id,
			   "name", &name, "sha256", &sha, "perms", &perms, "created_us", &created,
			   "created_by", &by)) {
		snprintf(why, cap, "%s", je.text);
		return why;
	}
	if (strlen(id) != AUTH_ID_BYTES * 2 || !auth_unhex(raw, id, AUTH_ID_BYTES))
		return "id is not 16 lowercase hex digits";
	if (strlen(name) > AUTH_NAME_MAX || !printable(name))
		return "name is not up to 64 printable characters";
	if (strlen(sha) != AUTH_DIGEST_BYTES * 2 || !auth_unhex(k->digest, sha, AUTH_DIGEST_BYTES))
		return "sha256 is not 64 lowercase hex digits";
	if (perms <= 0 || (perms & ~(json_int_t)EZP_PERM_ALL))
		return "perms is not a permission set (1..511)";
	if (created < 0)
		return "created_us is negative";
	if (*by && (strlen(by) != AUTH_ID_BYTES * 2 || !auth_unhex(raw, by, AUTH_ID_BYTES)))
		return "created_by is neither \"\" nor 16 lowercase hex digits";
	snprintf(k->id, sizeof(k->id), "%s", id);
	snprintf(k->name, sizeof(k->name), "%s", name);
	snprintf(k->created_by, sizeof(k->created_by), "%s", by);
	k->perms = (uint32_t)perms;
	k->created_us = (uint64_t)created;
	return NULL;
}

/* The parsed document into the table. */
static int keys_from_json(struct auth_state *st, json_t *root, struct ezp_error *err)
{
	json_t *arr, *item;
	json_int_t version;
	json_error_t je;
	char why[200];
	const char *bad;
	size_t i, n;

	if (json_unpack_ex(root, &je, 0, "{s:I, s:o}", "version", &version, "keys", &arr))
		return auth_error(err, EZP_ERR_IO, "the keys file %s is corrupt: %s", st->keys_path,
				  je.text);
	if (version != AUTH_FILE_VERSION)
		return auth_error(err, EZP_ERR_IO,
				  "the keys file %s has version %lld; this EzProxy reads version "
				  "%d only",
				  st->keys_path, (long long)version, AUTH_FILE_VERSION);
	if (!json_is_array(arr))
		return auth_error(err, EZP_ERR_IO,
				  "the keys file %s is corrupt: keys is not a list", st->keys_path);
	n = json_array_size(arr);
	if (n > AUTH_MAX_KEYS)
		return auth_error(err, EZP_ERR_IO, "the keys file %s holds %zu keys; at most %d",
				  st->keys_path, n, AUTH_MAX_KEYS);
	if (n && !(st->keys = calloc(n, sizeof(*st->keys))))
		return auth_error(err, EZP_ERR_NOMEM, "out of memory loading %s", st->keys_path);
	st->cap_keys = n;
	json_array_foreach(arr, i, item)
	{
		if ((bad = key_from_json(item, &st->keys[i], why, sizeof(why))))
			return auth_error(err, EZP_ERR_IO,
					  "the keys file %s is corrupt: keys[%zu]: %s",
					  st->keys_path, i, bad);
		for (size_t j = 0; j < i; j++)
			if (!strcmp(st->keys[j].id, st->keys[i].id))
				return auth_error(err, EZP_ERR_IO,
						  "the keys file %s is corrupt: keys[%zu]: id %s "
						  "is also keys[%zu]",
						  st->keys_path, i, st->keys[i].id, j);
		st->n_keys = i + 1;
	}
	return EZP_OK;
}

int auth_keys_load(struct auth_state *st, struct ezp_error *err)
{
	json_t *root = NULL;
	json_error_t je;
	struct stat sb;
	char *buf = NULL;
	size_t got = 0;
	int fd, rc;

	if ((fd = open(st->keys_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)) < 0) {
		if (errno == ENOENT)
			return EZP_OK;
		return auth_error(err, EZP_ERR_IO,
				  "cannot read the keys file %s: %s (it is not overwritten: fix "
				  "or remove it)",
				  st->keys_path, strerror(errno));
	}
	if (fstat(fd, &sb) || !S_ISREG(sb.st_mode) || sb.st_size > (off_t)AUTH_FILE_MAX) {
		rc = auth_error(err, EZP_ERR_IO,
				"cannot read the keys file %s: not a regular file of at most "
				"%u bytes",
				st->keys_path, AUTH_FILE_MAX);
		goto out;
	}
	if (!(buf = malloc((size_t)sb.st_size + 1))) {
		rc = auth_error(err, EZP_ERR_NOMEM, "out of memory reading %s", st->keys_path);
		goto out;
	}
	while (got < (size_t)sb.st_size) {
		ssize_t r = read(fd, buf + got, (size_t)sb.st_size - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			rc =
			    auth_error(err, EZP_ERR_IO, "cannot read the keys file %s: %s",
				       st->keys_path, r ? strerror(errno) : "it shrank while read");
			goto out;
		}
		got += (size_t)r;
	}
	if (!(root = json_loadb(buf, got, JSON_REJECT_DUPLICATES, &je))) {
		rc = auth_error(err, EZP_ERR_IO,
				"the keys file %s is corrupt (%s, line %d column %d): restore it, "
				"or remove it to start over with a new admin key",
				st->keys_path, je.text, je.line, je.column);
		if (err) {
			snprintf(err->file, sizeof(err->file), "%s", st->keys_path);
			err->line = je.line > 0 ? je.line : 0;
			err->column = je.column > 0 ? je.column : 0;
		}
		goto out;
	}
	rc = keys_from_json(st, root, err);
out:
	json_decref(root);
	free(buf);
	close(fd);
	return rc;
}

int auth_keys_save(struct auth_state *st, struct ezp_error *err)
{
	json_t *root, *arr;
	char *text = NULL;
	int rc = EZP_ERR_NOMEM;

	if (!st->dir)
		return EZP_OK;
	root = json_pack("{s:i, s:[]}", "version", AUTH_FILE_VERSION, "keys");
	arr = root ? json_object_get(root, "keys") : NULL;
	for (size_t i = 0; arr && i < st->n_keys; i++) {
		const struct auth_key *k = &st->keys[i];
		char sha[AUTH_DIGEST_BYTES * 2 + 1];
		auth_hex(sha, k->digest, AUTH_DIGEST_BYTES);
		if (json_array_append_new(arr, json_pack("{s:s, s:s, s:s, s:I, s:I, s:s}", "id",
							 k->id, "name", k->name, "sha256", sha,
							 "perms", (json_int_t)k->perms,
							 "created_us", (json_int_t)k->created_us,
							 "created_by", k->created_by)))
			arr = NULL;
	}
	if (arr && (text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER)))
		rc = EZP_OK;
	if (rc)
		auth_error(err, rc, "out of memory writing %s", st->keys_path);
	else
		rc = write_atomic(st->dir, st->keys_path, text, strlen(text), err);
	free(text);
	json_decref(root);
	return rc;
}

/* ---- admin.key ------------------------------------------------------------------------- */

int auth_admin_write(struct auth_state *st, const char *key, struct ezp_error *err)
{
	char text[AUTH_KEY_MAX + 2];
	size_t len = (size_t)snprintf(text, sizeof(text), "%s\n", key);
	int fd, rc = EZP_OK;

	fd = open(st->admin_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0 && errno == EEXIST) {
		rc = write_atomic(st->dir, st->admin_path, text, len, err);
	} else if (fd < 0) {
		rc = auth_error(err, EZP_ERR_IO, "cannot write the admin key to %s: %s",
				st->admin_path, strerror(errno));
	} else {
		if (fchmod(fd, 0600) || write_all(fd, text, len) || fsync(fd)) {
			rc = auth_error(err, EZP_ERR_IO, "cannot write the admin key to %s: %s",
					st->admin_path, strerror(errno));
			unlink(st->admin_path);
		}
		close(fd);
		if (!rc)
			sync_dir(st->dir);
	}
	explicit_bzero(text, sizeof(text));
	return rc;
}
