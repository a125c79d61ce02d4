/*
 * service.c - the service loop and the services the config asks for.
 *
 * The service loop is one more libevent loop on its own thread that runs
 * no session: service plugins (the http-api) put their sockets and timers
 * on it, and may call the blocking control functions (ezp.control) from it
 * without stalling a packet worker. When the config has an enabled `Api`
 * section the core starts the `auth` service and then the `http-api`
 * service, both with a `struct ezp_api_conf` (services.h).
 * Thread: control.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core.h"

#define SVC_WORKER_INDEX 255 /* never a packet worker's index (those are < 255) */

/* mkdir -p @path with mode 0700 for what it creates. */
static int mkdir_p(const char *path, struct ezp_error *err)
{
	char buf[1024];
	size_t len = strlen(path);

	if (len == 0 || len >= sizeof(buf))
		return ezp__error_set(err, EZP_ERR_CONFIG, EZP_SIDE_CONFIG, "", 0, 0,
				      "StateDir: path is empty or too long");
	memcpy(buf, path, len + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0700) != 0 && errno != EEXIST)
			goto fail;
		*p = '/';
	}
	if (mkdir(buf, 0700) != 0 && errno != EEXIST)
		goto fail;
	return EZP_OK;
fail:
	return ezp__error_set(err, EZP_ERR_IO, EZP_SIDE_CONFIG, "", 0, 0,
			      "cannot create the state directory %s: %s; set StateDir to a "
			      "writable folder",
			      buf, strerror(errno));
}

/* The state directory: StateDir, or /var/lib/ezproxy as root, else per user. */
char *ezp__state_dir_resolve(const char *configured)
{
	const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
	char buf[1024];

	if (configured)
		return strdup(configured);
	if (geteuid() == 0)
		return strdup("/var/lib/ezproxy");
	if (xdg && *xdg)
		snprintf(buf, sizeof(buf), "%s/ezproxy", xdg);
	else
		snprintf(buf, sizeof(buf), "%s/.local/state/ezproxy", home && *home ? home : ".");
	return strdup(buf);
}

/* Start service kind @k with @config; it stops in ezp__services_stop. */
static int service_run(struct ezp_core_ctx *d, const struct ezp_service_kind *k, const void *config,
		       struct ezp_error *err)
{
	struct ezp__svc_run *v;
	void *state = NULL;
	int rc;

	v = realloc(d->svcs, (d->n_svcs + 1) * sizeof(*v));
	if (!v)
		return ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0, "out of memory");
	d->svcs = v;
	rc = k->start(&d->table, config, &state, err);
	if (rc != EZP_OK) {
		if (!err->message[0])
			ezp__error_set(err, rc, EZP_SIDE_INTERNAL, "", 0, 0,
				       "the '%s' service did not start", k->name);
		return rc;
	}
	d->svcs[d->n_svcs].kind = k;
	d->svcs[d->n_svcs].state = state;
	d->n_svcs++;
	return EZP_OK;
}

/* The API's services, by name, with the Api section. */
static int service_start(struct ezp_core_ctx *d, const char *name, struct ezp_error *err)
{
	const struct ezp_service_kind *k = ezp__registry_service(d, name);

	if (!k)
		return ezp__error_set(err, EZP_ERR_PLUGIN, EZP_SIDE_CONFIG, "", 0, 0,
				      "Api is enabled but no loaded plugin provides the '%s' service; "
				      "install the %s plugin or set Api.Enable: false",
				      name, name);
	return service_run(d, k, &d->api_conf, err);
}

/* Every loaded EZP_SERVICE_AUTOSTART service (fault, capture), in load order. */
static int services_autostart(struct ezp_core_ctx *d, struct ezp_error *err)
{
	struct ezp__plugin *pl;
	int rc;

	LIST_FOREACH(pl, &d->reg.plugins, link)
		for (size_t i = 0; pl->desc->services && pl->desc->services[i]; i++) {
			const struct ezp_service_kind *k = pl->desc->services[i];
			if (!EZP_HAS(k, flags) || !(k->flags & EZP_SERVICE_AUTOSTART))
				continue;
			rc = service_run(d, k, NULL, err);
			if (rc != EZP_OK)
				return rc;
		}
	return EZP_OK;
}

int ezp__services_start(struct ezp_core_ctx *d, struct ezp_error *err)
{
	const struct ezp__api_conf *a = &d->cfg->api;
	int rc;

	d->svc_w = calloc(1, sizeof(*d->svc_w));
	if (!d->svc_w || ezp__worker_init(d->svc_w, d, SVC_WORKER_INDEX) != EZP_OK ||
	    ezp__worker_start(d->svc_w) != EZP_OK) {
		rc = ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0,
				    "cannot start the service loop");
		goto fail;
	}
	rc = services_autostart(d, err);
	if (rc != EZP_OK)
		goto fail;
	if (!a->enabled)
		return EZP_OK;
	d->state_dir = ezp__state_dir_resolve(d->cfg->state_dir);
	if (!d->state_dir) {
		rc = ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0, "out of memory");
		goto fail;
	}
	rc = mkdir_p(d->state_dir, err);
	if (rc != EZP_OK)
		goto fail;
	memset(&d->api_conf, 0, sizeof(d->api_conf));
	d->api_conf.struct_size = sizeof(d->api_conf);
	d->api_conf.listen = ezp__strdup(a->listen ? a->listen : "127.0.0.1:8080");
	d->api_conf.auth = a->auth;
	d->api_conf.tls_cert = ezp__strdup(a->tls_cert);
	d->api_conf.tls_key = ezp__strdup(a->tls_key);
	d->api_conf.origin = ezp__strdup(a->origin);
	d->api_conf.state_dir = d->state_dir;
	rc = service_start(d, "auth", err);
	if (rc == EZP_OK)
		rc = service_start(d, "http-api", err);
	if (rc != EZP_OK)
		goto fail;
	return EZP_OK;
fail:
	ezp__services_stop(d);
	return rc;
}

static void api_conf_clear(struct ezp_api_conf *c)
{
	free((char *)c->listen);
	free((char *)c->tls_cert);
	free((char *)c->tls_key);
	free((char *)c->origin);
	memset(c, 0, sizeof(*c));
}

void ezp__services_stop(struct ezp_core_ctx *d)
{
	/* the last started stops first: the API before the auth it uses */
	while (d->n_svcs) {
		struct ezp__svc_run *r = &d->svcs[--d->n_svcs];
		if (r->kind->stop)
			r->kind->stop(r->state);
	}
	free(d->svcs);
	d->svcs = NULL;
	if (d->svc_w) {
		ezp__worker_stop(d->svc_w);
		ezp__worker_destroy(d->svc_w);
		free(d->svc_w);
		d->svc_w = NULL;
	}
	api_conf_clear(&d->api_conf);
	free(d->state_dir);
	d->state_dir = NULL;
}

static int str_eq(const char *a, const char *b)
{
	return (!a && !b) || (a && b && !strcmp(a, b));
}

void ezp__services_note_reload(struct ezp_core_ctx *d, const struct ezp__config *cfg)
{
	const struct ezp__api_conf *o = &d->cfg->api, *n = &cfg->api;

	if (o->enabled != n->enabled || o->auth != n->auth || !str_eq(o->listen, n->listen) ||
	    !str_eq(o->tls_cert, n->tls_cert) || !str_eq(o->tls_key, n->tls_key) ||
	    !str_eq(o->origin, n->origin) || !str_eq(d->cfg->state_dir, cfg->state_dir))
		ezp__log(EZP_LOG_WARN, "daemon",
			 "Api or StateDir changed: takes effect when the daemon restarts");
}

const void *ezp__find_service(struct ezp_core_ctx *d, const char *name, unsigned min_version)
{
	if (!name)
		return NULL;
	if (!strcmp(name, EZP_CONTROL_IFACE))
		return min_version <= EZP_CONTROL_VERSION ? &d->control : NULL;
	for (size_t i = 0; i < d->n_svcs; i++) {
		const struct ezp_service_kind *k = d->svcs[i].kind;
		if (k->iface_name && !strcmp(k->iface_name, name) &&
		    k->iface_version >= min_version && k->iface)
			return k->iface(d->svcs[i].state);
	}
	return NULL;
}
