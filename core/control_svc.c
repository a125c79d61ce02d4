/*
 * control_svc.c - the "ezp.control" interface (services.h): what the API
 * does to a running daemon. Pipeline and config changes are serialised by
 * d->ctl_lock (a recursive mutex shared with SIGHUP reloads and the
 * embedding calls); pipeline create, change and delete are applied as a
 * config diff, exactly like a reload. Thread: the service loop or the
 * control thread, never a packet worker.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core.h"

static struct ezp_worker *ctl_service_worker(struct ezp_core_ctx *d)
{
	return d->svc_w;
}

/* Live sessions' counters, summed per pipeline on every worker. */
struct sum_ctx {
	struct ezp_pipeline_stats *v;
	struct ezp__pipeline **ps;
	size_t n;
};

static void sum_worker(struct ezp_worker *w, void *arg)
{
	struct sum_ctx *sc = arg;
	struct ezp_session *s;

	TAILQ_FOREACH(s, &w->sessions, link) {
		for (size_t i = 0; i < sc->n; i++) {
			struct ezp_pipeline_stats *x = &sc->v[i];
			if (sc->ps[i] != s->p)
				continue;
			for (int k = 0; k < 2; k++) {
				x->bytes[k] += s->bytes[k];
				x->packets[k] += s->packets[k];
			}
			x->dropped += s->dropped;
			x->replaced += s->replaced;
			x->injected += s->injected;
			x->held += s->held;
			x->hold_timeouts += s->hold_timeouts;
		}
	}
}

static void stats_fill(struct ezp__pipeline *p, struct ezp_pipeline_stats *x)
{
	struct ezp__pipe_gen *g = ezp__pipeline_gen(p);

	memset(x, 0, sizeof(*x));
	x->struct_size = sizeof(*x);
	snprintf(x->name, sizeof(x->name), "%s", p->name);
	snprintf(x->from_kind, sizeof(x->from_kind), "%s", p->conf->from.kind);
	snprintf(x->to_kind, sizeof(x->to_kind), "%s", g->to->conf.kind);
	if (p->listener) {
		x->listening = 1;
		x->bound = p->listener->bound;
	}
	x->to_addr = g->to_addr;
	x->shared = g->shared;
	x->n_filters = (unsigned)g->chain->n;
	x->sessions = atomic_load(&p->n_sessions);
	x->total_sessions = atomic_load(&p->total_sessions);
	for (int k = 0; k < 2; k++) {
		x->bytes[k] = atomic_load(&p->bytes[k]);
		x->packets[k] = atomic_load(&p->packets[k]);
	}
	x->dropped = atomic_load(&p->dropped);
	x->replaced = atomic_load(&p->replaced);
	x->injected = atomic_load(&p->injected);
	x->held = atomic_load(&p->held);
	x->hold_timeouts = atomic_load(&p->hold_timeouts);
	x->connect_failures = atomic_load(&p->connect_failures);
	x->refused = atomic_load(&p->refused);
	ezp__gen_unref(g);
}

/* Stats of @name (NULL: all, in config order). */
static int stats_collect(struct ezp_core_ctx *d, const char *name, struct ezp_pipeline_stats **out,
			 size_t *n)
{
	struct sum_ctx sc = {0};
	size_t cap = d->cfg->n_pipelines ? d->cfg->n_pipelines : 1;

	sc.v = calloc(cap, sizeof(*sc.v));
	sc.ps = calloc(cap, sizeof(*sc.ps));
	if (!sc.v || !sc.ps) {
		free(sc.v);
		free(sc.ps);
		return EZP_ERR_NOMEM;
	}
	for (size_t i = 0; i < d->cfg->n_pipelines; i++) {
		struct ezp__pipeline *p = ezp__pipeline_find(d, d->cfg->pipelines[i].name);
		if (!p || (name && strcmp(name, p->name)))
			continue;
		stats_fill(p, &sc.v[sc.n]);
		sc.ps[sc.n++] = p;
	}
	if (sc.n && d->started)
		ezp__workers_each(d, sum_worker, &sc);
	free(sc.ps);
	if (name && !sc.n) {
		free(sc.v);
		return EZP_ERR_NOT_FOUND;
	}
	*out = sc.v;
	*n = sc.n;
	return EZP_OK;
}

static int ctl_pipelines(struct ezp_core_ctx *d, struct ezp_pipeline_stats **out, size_t *n)
{
	int rc;

	pthread_mutex_lock(&d->ctl_lock);
	rc = stats_collect(d, NULL, out, n);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static int ctl_pipeline_stats(struct ezp_core_ctx *d, const char *name,
			      struct ezp_pipeline_stats *out)
{
	struct ezp_pipeline_stats *v;
	size_t n;
	int rc;

	if (!name)
		return EZP_ERR_INVAL;
	pthread_mutex_lock(&d->ctl_lock);
	rc = stats_collect(d, name, &v, &n);
	pthread_mutex_unlock(&d->ctl_lock);
	if (rc != EZP_OK)
		return rc;
	*out = v[0];
	free(v);
	return EZP_OK;
}

static void ctl_status(struct ezp_core_ctx *d, struct ezp_status_info *out)
{
	struct ezp_pipeline_stats *v = NULL;
	size_t n = 0;

	memset(out, 0, sizeof(*out));
	out->struct_size = sizeof(*out);
	out->version = EZP_VERSION;
	out->started_us = d->started_us;
	out->now_us = ezp__now_us();
	out->workers = d->n_workers;
	out->config_file = d->config_path ? d->config_path : d->cfg->file;
	if (ctl_pipelines(d, &v, &n) != EZP_OK)
		return;
	out->pipelines = n;
	for (size_t i = 0; i < n; i++) {
		out->sessions += v[i].sessions;
		out->total_sessions += v[i].total_sessions;
		out->bytes[0] += v[i].bytes[0];
		out->bytes[1] += v[i].bytes[1];
	}
	free(v);
}

static int ctl_plugin_at(struct ezp_core_ctx *d, size_t i, struct ezp_plugin_info *out)
{
	struct ezp__plugin *pl;
	size_t k = 0;

	LIST_FOREACH(pl, &d->reg.plugins, link) {
		if (k++ != i)
			continue;
		memset(out, 0, sizeof(*out));
		out->struct_size = sizeof(*out);
		out->desc = pl->desc;
		out->path = pl->path;
		return EZP_OK;
	}
	return EZP_ERR_NOT_FOUND;
}

static char *ctl_pipeline_yaml(struct ezp_core_ctx *d, const char *name)
{
	const struct ezp__pipeline_conf *pc;
	char *r = NULL;

	pthread_mutex_lock(&d->ctl_lock);
	pc = ezp__config_find(d->cfg, name);
	if (pc)
		r = ezp__pipeline_dump(pc);
	pthread_mutex_unlock(&d->ctl_lock);
	return r;
}

/* The live config as a fresh copy (dump and parse back: the dump round-trips). */
static int config_copy(struct ezp_core_ctx *d, struct ezp__config **out, struct ezp_error *err)
{
	struct ezp__kind_lookup lookup;
	char *text = ezp__config_dump(d->cfg);
	int rc;

	if (!text)
		return ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0, "out of memory");
	ezp__registry_lookup(d, &lookup);
	rc = ezp__config_parse(text, strlen(text), d->cfg->file, &lookup, out, err);
	free(text);
	return rc;
}

static int ctl_pipeline_put(struct ezp_core_ctx *d, const char *name, const char *item_yaml,
			    int close_sessions, int *created, struct ezp_error *err)
{
	struct ezp__kind_lookup lookup;
	struct ezp__config *cfg = NULL;
	struct ezp__pipeline_conf *old;
	bool from_changed = false;
	int rc, is_new = 0;

	if (!name || !item_yaml)
		return ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_CLIENT, "", 0, 0,
				      "a pipeline needs a name and its config");
	pthread_mutex_lock(&d->ctl_lock);
	rc = config_copy(d, &cfg, err);
	if (rc != EZP_OK)
		goto out;
	ezp__registry_lookup(d, &lookup);
	rc = ezp__config_put_pipeline(cfg, name, item_yaml, "<request>", &lookup, &is_new, err);
	if (rc != EZP_OK)
		goto out;
	old = ezp__config_find(d->cfg, name);
	from_changed = old && !ezp__kind_conf_equal(&old->from, &ezp__config_find(cfg, name)->from);
	rc = ezp__daemon_apply(d, cfg, err);
	if (rc != EZP_OK)
		goto out;
	cfg = NULL; /* the daemon's now */
	if (from_changed && close_sessions)
		ezp__pipeline_close_sessions(d, ezp__pipeline_find(d, name));
	if (created)
		*created = is_new;
out:
	ezp__config_free(cfg);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static int ctl_pipeline_delete(struct ezp_core_ctx *d, const char *name, struct ezp_error *err)
{
	struct ezp__config *cfg = NULL;
	int rc;

	pthread_mutex_lock(&d->ctl_lock);
	rc = config_copy(d, &cfg, err);
	if (rc == EZP_OK && (!name || ezp__config_del_pipeline(cfg, name) != EZP_OK))
		rc = ezp__error_set(err, EZP_ERR_NOT_FOUND, EZP_SIDE_CLIENT, "", 0, 0,
				    "no pipeline named '%s'", name ? name : "(null)");
	if (rc == EZP_OK) {
		rc = ezp__daemon_apply(d, cfg, err);
		if (rc == EZP_OK)
			cfg = NULL;
	}
	ezp__config_free(cfg);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static int ctl_pipeline_swap_to(struct ezp_core_ctx *d, const char *name, const char *to_yaml,
				int apply_to_existing, struct ezp_error *err)
{
	int rc;

	pthread_mutex_lock(&d->ctl_lock);
	rc = ezp_pipeline_swap_to((struct ezp_daemon *)d, name, to_yaml, apply_to_existing, err);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static int ctl_pipeline_restart(struct ezp_core_ctx *d, const char *name, int close_sessions,
				struct ezp_error *err)
{
	int rc;

	pthread_mutex_lock(&d->ctl_lock);
	rc = ezp_pipeline_restart((struct ezp_daemon *)d, name, close_sessions, err);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static int ctl_session_inject(struct ezp_core_ctx *d, uint64_t id, int dir, const void *data,
			      size_t len, struct ezp_error *err)
{
	int rc;

	if (dir != EZP_DIR_BOTH)
		return ezp_session_inject((struct ezp_daemon *)d, id, dir, data, len, err);
	rc = ezp_session_inject((struct ezp_daemon *)d, id, EZP_DIR_TO_SERVER, data, len, err);
	if (rc == EZP_OK)
		rc = ezp_session_inject((struct ezp_daemon *)d, id, EZP_DIR_TO_CLIENT, data, len,
					err);
	return rc;
}

static int ctl_sessions(struct ezp_core_ctx *d, const char *pipeline,
			struct ezp_session_summary **out, size_t *n)
{
	return ezp_daemon_sessions((struct ezp_daemon *)d, pipeline, out, n);
}

static int ctl_pipeline_inject(struct ezp_core_ctx *d, const char *name, int dir,
			       const void *data, size_t len, size_t *n_sessions,
			       struct ezp_error *err)
{
	struct ezp_session_summary *v = NULL;
	size_t n = 0, done = 0;
	int rc;

	if (!name || !ezp__pipeline_find(d, name))
		return ezp__error_set(err, EZP_ERR_NOT_FOUND, EZP_SIDE_CLIENT, "", 0, 0,
				      "no pipeline named '%s'", name ? name : "(null)");
	rc = ctl_sessions(d, name, &v, &n);
	if (rc != EZP_OK)
		return ezp__error_set(err, rc, EZP_SIDE_INTERNAL, "", 0, 0, "cannot list sessions");
	for (size_t i = 0; i < n; i++)
		if (ctl_session_inject(d, v[i].id, dir, data, len, err) == EZP_OK)
			done++; /* a session that ended meanwhile is skipped */
	free(v);
	if (n_sessions)
		*n_sessions = done;
	if (err) /* a session that ended meanwhile is not an error of the call */
		memset(err, 0, sizeof(*err));
	return EZP_OK;
}

static int ctl_session_get(struct ezp_core_ctx *d, uint64_t id, struct ezp_session_summary *out)
{
	struct ezp_session_summary *v = NULL;
	size_t n = 0;
	int rc = EZP_ERR_NOT_FOUND;

	if (!ezp__session_worker(d, id))
		return EZP_ERR_NOT_FOUND;
	if (ctl_sessions(d, NULL, &v, &n) != EZP_OK)
		return EZP_ERR_NOMEM;
	for (size_t i = 0; i < n; i++) {
		if (v[i].id == id) {
			*out = v[i];
			rc = EZP_OK;
		}
	}
	free(v);
	return rc;
}

static int ctl_session_close(struct ezp_core_ctx *d, uint64_t id, struct ezp_error *err)
{
	return ezp_session_close((struct ezp_daemon *)d, id, err);
}

static int ctl_session_swap_server(struct ezp_core_ctx *d, uint64_t id, const char *addr,
				   struct ezp_error *err)
{
	return ezp_session_swap_server((struct ezp_daemon *)d, id, addr, err);
}

static int ctl_session_swap_client(struct ezp_core_ctx *d, uint64_t id, const char *addr,
				   int dial, int add, unsigned timeout_ms, struct ezp_error *err)
{
	return ezp_session_swap_client((struct ezp_daemon *)d, id, addr, dial, add, timeout_ms,
				       err);
}

static char *ctl_config_dump(struct ezp_core_ctx *d)
{
	char *r;

	pthread_mutex_lock(&d->ctl_lock);
	r = ezp__config_dump(d->cfg);
	pthread_mutex_unlock(&d->ctl_lock);
	return r;
}

static const char *ctl_config_file(struct ezp_core_ctx *d)
{
	return d->config_path;
}

/* Write @text to @path atomically: a temporary file beside it, fsync, rename. */
static int write_atomic(const char *path, const char *text, struct ezp_error *err)
{
	size_t len = strlen(text), off = 0;
	char tmp[4096];
	int fd;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof(tmp))
		return ezp__error_set(err, EZP_ERR_IO, EZP_SIDE_INTERNAL, "", 0, 0,
				      "config path too long");
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		goto fail;
	while (off < len) {
		ssize_t n = write(fd, text + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			close(fd);
			unlink(tmp);
			goto fail;
		}
		off += (size_t)n;
	}
	if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
		unlink(tmp);
		goto fail;
	}
	return EZP_OK;
fail:
	return ezp__error_set(err, EZP_ERR_IO, EZP_SIDE_INTERNAL, "", 0, 0,
			      "the new config is applied but could not be written to %s: %s", path,
			      strerror(errno));
}

static int ctl_config_replace(struct ezp_core_ctx *d, const char *yaml, int write_back,
			      struct ezp_error *err)
{
	struct ezp__kind_lookup lookup;
	struct ezp__config *cfg = NULL;
	int rc;

	if (!yaml)
		return ezp__error_set(err, EZP_ERR_INVAL, EZP_SIDE_CLIENT, "", 0, 0, "no config");
	pthread_mutex_lock(&d->ctl_lock);
	ezp__registry_lookup(d, &lookup);
	rc = ezp__config_parse(yaml, strlen(yaml), "<request>", &lookup, &cfg, err);
	if (rc == EZP_OK) {
		/* later dumps name the file the daemon runs from, not the request */
		if (d->config_path) {
			free(cfg->file);
			cfg->file = strdup(d->config_path);
		}
		rc = ezp__daemon_apply(d, cfg, err);
		if (rc != EZP_OK)
			ezp__config_free(cfg);
		else
			ezp__filters_reload(d);
	}
	if (rc == EZP_OK && write_back && d->config_path)
		rc = write_atomic(d->config_path, yaml, err);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static int ctl_config_reload(struct ezp_core_ctx *d, struct ezp_error *err)
{
	int rc;

	if (!d->config_path)
		return ezp__error_set(err, EZP_ERR_NOT_FOUND, EZP_SIDE_CLIENT, "", 0, 0,
				      "the daemon was started without a config file (-c FILE): "
				      "nothing to reload");
	pthread_mutex_lock(&d->ctl_lock);
	rc = ezp__daemon_reload_file(d, d->config_path, err);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static int ctl_filter_claim(struct ezp_core_ctx *d, const char *pipeline, const char *key,
			    const struct ezp_filter_holder *holder,
			    const struct ezp_claim_opts *opts, struct ezp_claim **out,
			    struct ezp_error *err)
{
	int rc;

	pthread_mutex_lock(&d->ctl_lock);
	rc = ezp__filter_claim(d, pipeline, key, holder, opts, out, err);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

static uint64_t ctl_tap_drops(struct ezp_core_ctx *d)
{
	return atomic_load(&d->tap_drops);
}

static int ctl_filter_hold(struct ezp_core_ctx *d, const char *pipeline, const char *key,
			   unsigned *timeout_ms, int *default_verdict)
{
	const struct ezp__pipeline_conf *pc;
	int rc = EZP_ERR_NOT_FOUND;

	pthread_mutex_lock(&d->ctl_lock);
	pc = ezp__config_find(d->cfg, pipeline);
	if (pc && key) {
		for (size_t k = 0; k < pc->n_through && rc != EZP_OK; k++) {
			char ck[160];
			if (!(pc->through[k].filter->flags & EZP_FILTER_EXCLUSIVE))
				continue;
			ezp__claim_key(&pc->through[k], ck, sizeof(ck));
			if (strcmp(ck, key))
				continue;
			*timeout_ms = (unsigned)pc->through[k].hold.timeout_ms;
			*default_verdict = pc->through[k].hold.default_drop ? EZP_VERDICT_DROP
									    : EZP_VERDICT_PASS;
			rc = EZP_OK;
		}
	}
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

void ezp__control_init(struct ezp_core_ctx *d)
{
	struct ezp_control *c = &d->control;

	memset(c, 0, sizeof(*c));
	c->struct_size = sizeof(*c);
	c->service_worker = ctl_service_worker;
	c->status = ctl_status;
	c->plugin_at = ctl_plugin_at;
	c->pipelines = ctl_pipelines;
	c->pipeline_stats = ctl_pipeline_stats;
	c->pipeline_yaml = ctl_pipeline_yaml;
	c->pipeline_put = ctl_pipeline_put;
	c->pipeline_delete = ctl_pipeline_delete;
	c->pipeline_swap_to = ctl_pipeline_swap_to;
	c->pipeline_restart = ctl_pipeline_restart;
	c->pipeline_inject = ctl_pipeline_inject;
	c->sessions = ctl_sessions;
	c->session_get = ctl_session_get;
	c->session_close = ctl_session_close;
	c->session_inject = ctl_session_inject;
	c->session_swap_server = ctl_session_swap_server;
	c->session_swap_client = ctl_session_swap_client;
	c->config_dump = ctl_config_dump;
	c->config_file = ctl_config_file;
	c->config_replace = ctl_config_replace;
	c->config_reload = ctl_config_reload;
	c->filter_claim = ctl_filter_claim;
	c->claim_release = ezp_claim_release;
	c->tap_drops = ctl_tap_drops;
	c->filter_hold = ctl_filter_hold;
}
