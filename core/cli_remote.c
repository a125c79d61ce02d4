/*
 * cli_remote.c - what the remote CLI commands share: find the daemon's API
 * (--api, -c FILE's Api.Listen, or the default) and a key (--key,
 * $EZP_KEY, StateDir/admin.key), and say why the API refused; and
 * `ezproxy key create` (DESIGN.md section 6: POST /api/3/keys).
 * `ezproxy watch` is in cli_watch.c. Errors: one line on stderr saying what
 * to do.
 * Thread: the CLI process's main thread (single-threaded).
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <ezproxy/services.h>

#include "cli_remote.h"
#include "core.h"

#define DEFAULT_API "http://127.0.0.1:8080"

static const char *const perm_names[] = EZP_PERM_NAMES;

/* ---- finding the daemon and the key ---- */

/* As the daemon resolves it (core/service.c). */
static void default_state_dir(char *out, size_t n)
{
	char *dir = ezp__state_dir_resolve(NULL);

	snprintf(out, n, "%s", dir ? dir : "/var/lib/ezproxy");
	free(dir);
}

/* Read up to @max bytes of @path, NUL-terminated. NULL with errno set on failure. */
static char *slurp(const char *path, size_t max)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	size_t n;
	int e;

	if (!f)
		return NULL;
	if (!(buf = malloc(max + 1))) {
		fclose(f);
		errno = ENOMEM;
		return NULL;
	}
	n = fread(buf, 1, max, f);
	e = ferror(f) ? EIO : 0;
	fclose(f);
	if (e) {
		free(buf);
		errno = e;
		return NULL;
	}
	buf[n] = '\0';
	return buf;
}

/* The API URL from a config's Api section, into @url. 0, or 2 after saying why not. */
static int config_api_url(const struct ezp__config *cfg, const char *file, char *url, size_t n)
{
	char host[128];
	const char *colon;
	size_t hl;

	if (!cfg->api.enabled) {
		fprintf(stderr,
			"ezproxy: %s has no enabled Api section, so that daemon serves no "
			"API; add 'Api: {Listen: 127.0.0.1:8080}' or pass --api URL\n",
			file);
		return 2;
	}
	if (cfg->api.tls_cert) {
		fprintf(stderr,
			"ezproxy: %s's API uses TLS and the CLI does not speak TLS "
			"(https://) yet; give the daemon a plain http:// listener on loopback "
			"and pass --api http://HOST:PORT\n",
			file);
		return 2;
	}
	colon = strrchr(cfg->api.listen, ':');
	hl = colon ? (size_t)(colon - cfg->api.listen) : 0;
	if (!colon || hl >= sizeof(host) || !strcmp(colon + 1, "0")) {
		fprintf(stderr,
			"ezproxy: %s's Api.Listen is '%s' (no fixed port); pass --api "
			"http://HOST:PORT with the port the daemon logged\n",
			file, cfg->api.listen);
		return 2;
	}
	memcpy(host, cfg->api.listen, hl);
	host[hl] = '\0';
	/* a wildcard listener is reached on loopback */
	if (!strcmp(host, "0.0.0.0"))
		snprintf(host, sizeof(host), "127.0.0.1");
	else if (!strcmp(host, "[::]"))
		snprintf(host, sizeof(host), "[::1]");
	snprintf(url, n, "http://%s:%s", host, colon + 1);
	return 0;
}

/* Load -c FILE the way `ezproxy check` does. NULL after printing why. */
static struct ezp_daemon *config_open(const char *file)
{
	struct ezp_daemon_opts dopts = {
	    .struct_size = sizeof(dopts), .workers = 1, .log_level = EZP_LOG_ERROR};
	struct ezp_error err = {0};
	struct ezp_daemon *d = NULL;
	char *yaml;

	ezp__log_setup(EZP_LOG_ERROR, EZP__LOG_TEXT);
	if (!(yaml = slurp(file, 4u << 20))) {
		fprintf(stderr,
			"ezproxy: cannot read config '%s': %s; pass --api URL and --key "
			"KEY instead of -c\n",
			file, strerror(errno));
		return NULL;
	}
	if (ezp_daemon_new(yaml, file, &dopts, &d, &err) != EZP_OK) {
		if (err.line)
			fprintf(stderr, "ezproxy: invalid config: %s:%d:%d: %s\n", err.file,
				err.line, err.column, err.message);
		else
			fprintf(stderr, "ezproxy: invalid config '%s': %s\n", file, err.message);
		d = NULL;
	}
	free(yaml);
	return d;
}

/* The key from StateDir/admin.key (first line, trimmed), or a note why not. */
static void key_from_file(struct ezp__cli_remote *r)
{
	char path[PATH_MAX + 16];
	char *text, *p, *end;

	snprintf(path, sizeof(path), "%s/admin.key", r->state_dir);
	if (!(text = slurp(path, 4096))) {
		snprintf(r->key_note, sizeof(r->key_note), "no --key, no $EZP_KEY, and %s: %s",
			 path, strerror(errno));
		return;
	}
	for (p = text; *p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'; p++)
		;
	end = p + strcspn(p, " \t\r\n");
	*end = '\0';
	if (!*p) {
		snprintf(r->key_note, sizeof(r->key_note), "no --key, no $EZP_KEY, and %s is empty",
			 path);
		free(text);
		return;
	}
	memmove(text, p, (size_t)(end - p) + 1);
	r->key_buf = text;
	r->api.key = text;
	snprintf(r->key_note, sizeof(r->key_note), "%s", path);
	r->key_from = r->key_note;
}

int ezp__cli_remote_resolve(struct ezp__cli_remote *r)
{
	const char *env = getenv("EZP_KEY");
	struct ezp_daemon *d = NULL;
	const struct ezp__config *cfg = NULL;
	char url[320], msg[512];
	int need_state = !r->key_opt && !(env && *env);
	int rc = 0;

	if (r->config && (!r->api_opt || need_state)) {
		if (!(d = config_open(r->config)))
			return 2;
		cfg = ((struct ezp_core_ctx *)d)->cfg;
	}
	if (r->api_opt)
		snprintf(url, sizeof(url), "%s", r->api_opt);
	else if (cfg)
		rc = config_api_url(cfg, r->config, url, sizeof(url));
	else
		snprintf(url, sizeof(url), "%s", DEFAULT_API);
	if (!rc && (rc = ezp__cli_api_parse(url, &r->api, msg, sizeof(msg))))
		fprintf(stderr, "ezproxy: %s\n", msg);
	if (rc)
		goto done;
	if (cfg && cfg->state_dir)
		snprintf(r->state_dir, sizeof(r->state_dir), "%s", cfg->state_dir);
	else
		default_state_dir(r->state_dir, sizeof(r->state_dir));
	if (r->key_opt) {
		r->api.key = r->key_opt;
		r->key_from = "--key";
	} else if (env && *env) {
		r->api.key = env;
		r->key_from = "$EZP_KEY";
	} else {
		key_from_file(r);
	}
done:
	if (d)
		ezp_daemon_free(d);
	return rc;
}

int ezp__cli_remote_opt(struct ezp__cli_remote *r, int c, const char *arg)
{
	switch (c) {
	case 'a':
		r->api_opt = arg;
		return 1;
	case 'k':
		r->key_opt = arg;
		return 1;
	case 'c':
		r->config = arg;
		return 1;
	}
	return 0;
}

void ezp__cli_remote_clear(struct ezp__cli_remote *r)
{
	free(r->key_buf);
	r->key_buf = NULL;
}

void ezp__cli_scrub(char *s)
{
	for (; s && *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = '?';
}

int ezp__cli_api_refused(const struct ezp__cli_remote *r, const struct ezp__cli_reply *rep,
			 const char *perm_needed)
{
	json_t *root = rep->body_len
			   ? json_loadb(rep->body, rep->body_len, JSON_REJECT_DUPLICATES, NULL)
			   : NULL;
	json_t *e = json_object_get(root, "error");
	const char *jm = json_string_value(json_object_get(e, "message"));
	const char *jc = json_string_value(json_object_get(e, "code"));
	char m[512], code[64];

	if (jm) {
		snprintf(m, sizeof(m), "%s", jm);
	} else {
		/* not the v3 error shape: show the start of the body's first line */
		size_t n = rep->body_len < 160 ? rep->body_len : 160;
		size_t i;

		for (i = 0; i < n && rep->body[i] && rep->body[i] != '\n' && rep->body[i] != '\r';
		     i++)
			m[i] = rep->body[i];
		m[i] = '\0';
		if (!i)
			snprintf(m, sizeof(m), "no message");
	}
	snprintf(code, sizeof(code), "%s", jc ? jc : "");
	ezp__cli_scrub(m);
	ezp__cli_scrub(code);
	fprintf(stderr, "ezproxy: the ezproxy API at %s refused (%u%s%s): %s; ", r->api.url,
		rep->status, *code ? " " : "", code, m);
	if (rep->status == 401 && !r->api.key)
		fprintf(stderr,
			"no key was sent (%s): pass --key KEY or set $EZP_KEY, or -c "
			"FILE for the daemon's StateDir\n",
			r->key_note);
	else if (rep->status == 401)
		fprintf(stderr,
			"the daemon does not know the key from %s: pass a valid one with "
			"--key KEY or $EZP_KEY\n",
			r->key_from);
	else if (rep->status == 403)
		fprintf(stderr, "use a key with the %s permission (--key KEY)\n", perm_needed);
	else if (rep->status == 404)
		fprintf(stderr, "check the name you gave and that --api points at an ezproxy "
				"v3 API\n");
	else
		fprintf(stderr, "see the daemon's log for more\n");
	json_decref(root);
	return 1;
}

/* ---- ezproxy key create ---- */

/* --perms LIST as JSON (a number, or a list of canonical names). NULL after saying why. */
static json_t *perms_parse(const char *list)
{
	json_t *arr;
	char *copy, *item, *save = NULL;
	char *end;
	unsigned long v;

	if (!strcasecmp(list, "admin"))
		return json_integer(EZP_PERM_ALL);
	if (*list >= '0' && *list <= '9') {
		errno = 0;
		v = strtoul(list, &end, 0);
		if (errno || *end || v > EZP_PERM_ALL) {
			fprintf(stderr,
				"ezproxy: --perms '%s' is not a permission number from 0 to "
				"%u; use a number, 'admin' or names like CheckStatus,Close\n",
				list, EZP_PERM_ALL);
			return NULL;
		}
		return json_integer((json_int_t)v);
	}
	if (!(arr = json_array()) || !(copy = strdup(list))) {
		json_decref(arr);
		fprintf(stderr, "ezproxy: out of memory\n");
		return NULL;
	}
	for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
		size_t i, n;

		while (*item == ' ')
			item++;
		for (n = strlen(item); n && item[n - 1] == ' '; n--)
			item[n - 1] = '\0';
		for (i = 0; i < EZP_ARRAY_LEN(perm_names); i++)
			if (!strcasecmp(item, perm_names[i]))
				break;
		if (i == EZP_ARRAY_LEN(perm_names)) {
			fprintf(stderr,
				"ezproxy: unknown permission '%s' in --perms; use names from "
				"CheckStatus, Close, UseWebsocket, Filter, Inject, MakeKeys, "
				"DuplicateKeys, Reconfigure, Capture, a number or 'admin'\n",
				item);
			goto fail;
		}
		json_array_append_new(arr, json_string(perm_names[i]));
	}
	if (json_array_size(arr) == 0) {
		fprintf(stderr, "ezproxy: --perms is empty; give names like CheckStatus,Close, a "
				"number or 'admin'\n");
		goto fail;
	}
	free(copy);
	return arr;
fail:
	free(copy);
	json_decref(arr);
	return NULL;
}

/* Permission bits or names (as the API answers) as "A,B,C". */
static void perms_text(json_t *v, char *out, size_t n)
{
	size_t len = 0, i;
	json_t *it;

	out[0] = '\0';
	if (json_is_integer(v)) {
		json_int_t bits = json_integer_value(v);

		for (i = 0; i < EZP_ARRAY_LEN(perm_names); i++)
			if (bits & ((json_int_t)1 << i))
				len += (size_t)snprintf(out + len, len < n ? n - len : 0, "%s%s",
							len ? "," : "", perm_names[i]);
	} else {
		json_array_foreach(v, i, it) if (json_is_string(it)) len +=
		    (size_t)snprintf(out + len, len < n ? n - len : 0, "%s%s", len ? "," : "",
				     json_string_value(it));
	}
	if (!out[0])
		snprintf(out, n, "none");
}

static void key_usage(FILE *out)
{
	fprintf(out, "usage: ezproxy key create --perms LIST [--name NAME] [--api URL] [-c FILE] "
		     "[--key KEY]\n"
		     "  LIST: names (CheckStatus,Close,UseWebsocket,Filter,Inject,MakeKeys,\n"
		     "        DuplicateKeys,Reconfigure,Capture), a number, or admin\n");
}

int ezp__cli_key(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"perms", required_argument, NULL, 'p'},
	    {"name", required_argument, NULL, 'n'},
	    {"api", required_argument, NULL, 'a'},
	    {"key", required_argument, NULL, 'k'},
	    {"config", required_argument, NULL, 'c'},
	    {"help", no_argument, NULL, 'h'},
	    {0},
	};
	struct ezp__cli_remote r = {0};
	struct ezp__cli_reply rep = {0};
	const char *perms = NULL, *name = NULL;
	json_t *body = NULL, *ans = NULL, *perms_json;
	char *text = NULL, msg[512], ptext[256];
	const char *key, *id;
	int c, rc = 2;

	if (argc < 2 ||
	    (strcmp(argv[1], "create") && strcmp(argv[1], "--help") && strcmp(argv[1], "-h"))) {
		if (argc >= 2)
			fprintf(stderr, "ezproxy: unknown key command '%s'; ", argv[1]);
		else
			fprintf(stderr, "ezproxy: ");
		fprintf(stderr, "use 'ezproxy key create --perms LIST'\n");
		return 2;
	}
	if (strcmp(argv[1], "create")) {
		key_usage(stdout);
		return 0;
	}
	while ((c = getopt_long(argc - 1, argv + 1, "c:h", opts, NULL)) != -1) {
		switch (c) {
		case 'p':
			perms = optarg;
			break;
		case 'n':
			name = optarg;
			break;
		case 'h':
			key_usage(stdout);
			return 0;
		default:
			if (ezp__cli_remote_opt(&r, c, optarg))
				break;
			key_usage(stderr);
			return 2;
		}
	}
	if (optind < argc - 1) {
		fprintf(stderr,
			"ezproxy: unexpected argument '%s'; see 'ezproxy key create --help'\n",
			argv[optind + 1]);
		return 2;
	}
	if (!perms) {
		fprintf(stderr, "ezproxy: key create needs --perms LIST (e.g. --perms "
				"CheckStatus,UseWebsocket)\n");
		return 2;
	}
	if (!(perms_json = perms_parse(perms)))
		return 2;
	body = json_object();
	json_object_set_new(body, "perms", perms_json);
	if (name)
		json_object_set_new(body, "name", json_string(name));
	if ((rc = ezp__cli_remote_resolve(&r)))
		goto done;
	signal(SIGPIPE, SIG_IGN);
	rc = 1;
	if (!(text = json_dumps(body, JSON_COMPACT))) {
		fprintf(stderr, "ezproxy: out of memory\n");
		goto done;
	}
	if (ezp__cli_http(&r.api, "POST", "/api/3/keys", text, &rep, msg, sizeof(msg))) {
		fprintf(stderr, "ezproxy: %s\n", msg);
		goto done;
	}
	if (rep.status != 201 && rep.status != 200) {
		rc = ezp__cli_api_refused(&r, &rep, "MakeKeys");
		goto done;
	}
	ans = json_loadb(rep.body, rep.body_len, JSON_REJECT_DUPLICATES, NULL);
	key = json_string_value(json_object_get(ans, "key"));
	id = json_string_value(json_object_get(ans, "id"));
	if (!key) {
		fprintf(stderr,
			"ezproxy: the ezproxy API at %s answered %u without a key; is --api "
			"really an ezproxy v3 API?\n",
			r.api.url, rep.status);
		goto done;
	}
	perms_text(json_object_get(ans, "perms"), ptext, sizeof(ptext));
	printf("%s\n", key);
	if (fflush(stdout) != 0) {
		fprintf(stderr, "ezproxy: cannot write the key to stdout: %s\n", strerror(errno));
		goto done;
	}
	fprintf(stderr,
		"ezproxy: created key %s%s%s%s with perms %s (the key is shown only "
		"once)\n",
		id ? id : "?", name ? " '" : "", name ? name : "", name ? "'" : "", ptext);
	rc = 0;
done:
	json_decref(ans);
	json_decref(body);
	free(text);
	ezp__cli_reply_clear(&rep);
	ezp__cli_remote_clear(&r);
	return rc;
}
