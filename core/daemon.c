/*
 * daemon.c - a daemon instance: create from YAML, start and stop the
 * workers, apply a new config as a diff, and the embedding API's control
 * calls (ezproxy.h). Thread: control (any thread that is not a worker).
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core.h"

struct ezp_worker *ezp__session_worker(struct ezp_core_ctx *d, uint64_t id)
{
	uintptr_t v;

	pthread_mutex_lock(&d->lock);
	v = (uintptr_t)ezp__map_get(&d->session_worker, id);
	pthread_mutex_unlock(&d->lock);
	return v ? d->workers[v - 1] : NULL;
}

const struct ezp_core *ezp_daemon_core(struct ezp_daemon *dd)
{
	return &((struct ezp_core_ctx *)dd)->table;
}

static int daemon_parse(struct ezp_core_ctx *d, const char *yaml, const char *file,
			struct ezp__config **out, struct ezp_error *err)
{
	struct ezp__kind_lookup lookup;

	ezp__registry_lookup(d, &lookup);
	if (!yaml) {
		const char *def = ezp__default_config_for(&lookup);
		return ezp__config_parse(def, strlen(def), "<builtin>", &lookup, out, err);
	}
	return ezp__config_parse(yaml, strlen(yaml), file ? file : "<string>", &lookup, out, err);
}

static void pipelines_free(struct ezp_core_ctx *d)
{
	struct ezp__pipeline *p;

	while ((p = LIST_FIRST(&d->pipelines)))
		ezp__pipeline_remove(p, false);
}

int ezp_daemon_new(const char *yaml, const char *file, const struct ezp_daemon_opts *opts,
		   struct ezp_daemon **out, struct ezp_error *err)
{
	struct ezp_core_ctx *d = calloc(1, sizeof(*d));
	struct ezp_error tmp = {0};
	long ncpu;
	int rc;

	if (!err)
		err = &tmp;
	if (!d)
		return ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0, "out of memory");
	ezp__core_table_init(d);
	ezp__control_init(d);
	pthread_mutex_init(&d->lock, NULL);
	{
		pthread_mutexattr_t ma;
		pthread_mutexattr_init(&ma);
		pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
		pthread_mutex_init(&d->ctl_lock, &ma);
		pthread_mutexattr_destroy(&ma);
	}
	LIST_INIT(&d->pipelines);
	LIST_INIT(&d->taps);
	LIST_INIT(&d->reg.plugins);
	atomic_init(&d->next_session, 1);
	rc = ezp__registry_add_builtin(d, &ezp__builtin_plugin, err);
	if (rc != EZP_OK)
		goto fail;
	for (size_t i = 0; opts && opts->plugin_paths && opts->plugin_paths[i]; i++) {
		rc = ezp__registry_scan(d, opts->plugin_paths[i], err);
		if (rc != EZP_OK)
			goto fail;
	}
	if (!opts || !opts->no_default_paths)
		ezp__registry_scan_defaults(d, err);
	rc = daemon_parse(d, yaml, file, &d->cfg, err);
	if (rc != EZP_OK)
		goto fail;
	/* a config that came from a file: the API reloads it and writes changes back there */
	if (yaml && file && file[0] != '<' && access(file, R_OK) == 0)
		d->config_path = realpath(file, NULL);
	d->log_level_override = opts && opts->struct_size && opts->log_level >= 0 ? opts->log_level
										  : -1;
	ezp__log_setup(d->log_level_override >= 0 ? d->log_level_override : d->cfg->log_level,
		       d->cfg->log_format);
	ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	d->n_workers = opts && opts->workers ? opts->workers
		       : d->cfg->workers    ? (unsigned)d->cfg->workers
					    : (unsigned)(ncpu > 0 ? ncpu : 1);
	if (d->n_workers > 255)
		d->n_workers = 255;
	d->workers = calloc(d->n_workers, sizeof(*d->workers));
	if (!d->workers) {
		rc = ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0, "out of memory");
		goto fail;
	}
	for (unsigned i = 0; i < d->n_workers; i++) {
		d->workers[i] = calloc(1, sizeof(struct ezp_worker));
		if (!d->workers[i] || ezp__worker_init(d->workers[i], d, i) != EZP_OK) {
			rc = ezp__error_set(err, EZP_ERR_NOMEM, EZP_SIDE_INTERNAL, "", 0, 0,
					    "cannot create worker %u", i);
			goto fail;
		}
	}
	for (size_t i = 0; i < d->cfg->n_pipelines; i++) {
		struct ezp__pipeline *p;
		rc = ezp__pipeline_create(d, &d->cfg->pipelines[i], &p, err);
		if (rc != EZP_OK)
			goto fail;
		LIST_INSERT_HEAD(&d->pipelines, p, link);
	}
	*out = (struct ezp_daemon *)d;
	return EZP_OK;
fail:
	ezp_daemon_free((struct ezp_daemon *)d);
	return rc;
}

static void start_undo(struct ezp_core_ctx *d);

int ezp_daemon_start(struct ezp_daemon *dd, struct ezp_error *err)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	struct ezp__pipeline *p;
	struct ezp_error tmp = {0};
	int rc;

	if (!err)
		err = &tmp;
	if (d->started)
		return EZP_OK;
	LIST_FOREACH(p, &d->pipelines, link) {
		rc = ezp__pipeline_listen(p, false, err);
		if (rc != EZP_OK)
			goto fail;
	}
	ezp__taps_start(d); /* before any worker runs: no session starts untapped */
	for (unsigned i = 0; i < d->n_workers; i++) {
		rc = ezp__worker_start(d->workers[i]);
		if (rc != EZP_OK) {
			ezp__error_set(err, rc, EZP_SIDE_INTERNAL, "", 0, 0, "cannot start worker %u", i);
			goto fail;
		}
	}
	d->started = true;
	d->started_us = ezp__now_us();
	rc = ezp__services_start(d, err);
	if (rc != EZP_OK) {
		d->started = false;
		start_undo(d);
		return rc;
	}
	ezp__log(EZP_LOG_INFO, "daemon", "ezproxy running: %u worker(s), %s", d->n_workers,
		 d->cfg->file);
	return EZP_OK;
fail:
	LIST_FOREACH(p, &d->pipelines, link)
		ezp__pipeline_unlisten(p);
	for (unsigned i = 0; i < d->n_workers; i++)
		ezp__worker_stop(d->workers[i]);
	return rc;
}

/* Undo a start whose services failed: close listeners and stop the workers. */
static void start_undo(struct ezp_core_ctx *d)
{
	struct ezp__pipeline *p;

	LIST_FOREACH(p, &d->pipelines, link)
		ezp__pipeline_unlisten(p);
	ezp__pipeline_close_sessions(d, NULL);
	for (unsigned i = 0; i < d->n_workers; i++)
		ezp__worker_stop(d->workers[i]);
}

void ezp_daemon_stop(struct ezp_daemon *dd)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	struct ezp__pipeline *p;

	if (!d || !d->started || d->stopping)
		return;
	d->stopping = true;
	ezp__services_stop(d);
	LIST_FOREACH(p, &d->pipelines, link)
		ezp__pipeline_unlisten(p);
	ezp__pipeline_close_sessions(d, NULL);
	for (unsigned i = 0; i < d->n_workers; i++)
		ezp__worker_stop(d->workers[i]);
	d->started = false;
	ezp__log(EZP_LOG_INFO, "daemon", "ezproxy stopped");
}

void ezp_daemon_free(struct ezp_daemon *dd)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;

	if (!d)
		return;
	ezp_daemon_stop(dd);
	pipelines_free(d);
	if (d->workers) {
		ezp__taps_free(d);
		for (unsigned i = 0; i < d->n_workers; i++) {
			if (d->workers[i])
				ezp__worker_destroy(d->workers[i]);
			free(d->workers[i]);
		}
	}
	free(d->workers);
	ezp__config_free(d->cfg);
	ezp__registry_free(d);
	ezp__map_free(&d->session_worker);
	pthread_mutex_destroy(&d->lock);
	pthread_mutex_destroy(&d->ctl_lock);
	free(d->config_path);
	free(d);
}

/* ---- reload: a new config applied as a diff ---- */

struct plan {
	struct ezp__pipeline *p;       /* existing, or new (ADD) */
	const struct ezp__pipeline_conf *pc;
	struct ezp__pipeline_conf *old;
	struct ezp__pipe_gen *gen;     /* new generation to set */
	struct ezp_listener *listener; /* new listener to swap in */
	bool add;
};

static bool through_equal(const struct ezp__pipeline_conf *a, const struct ezp__pipeline_conf *b)
{
	if (a->n_through != b->n_through)
		return false;
	for (size_t i = 0; i < a->n_through; i++)
		if (!ezp__kind_conf_equal(&a->through[i], &b->through[i]) ||
		    memcmp(&a->through[i].hold, &b->through[i].hold, sizeof(a->through[i].hold)))
			return false;
	return true;
}

int ezp__daemon_apply(struct ezp_core_ctx *d, struct ezp__config *cfg, struct ezp_error *err)
{
	struct plan *plans = calloc(cfg->n_pipelines ? cfg->n_pipelines : 1, sizeof(*plans));
	struct ezp__pipeline *p, *next;
	unsigned changed = 0, added = 0, removed = 0;
	int rc = EZP_OK;

	if (!plans)
		return EZP_ERR_NOMEM;
	/* build everything new beside the old; nothing changes if one part fails */
	for (size_t i = 0; i < cfg->n_pipelines; i++) {
		struct plan *pl = &plans[i];
		pl->pc = &cfg->pipelines[i];
		pl->p = ezp__pipeline_find(d, pl->pc->name);
		if (!pl->p) {
			pl->add = true;
			rc = ezp__pipeline_create(d, pl->pc, &pl->p, err);
			if (rc == EZP_OK && d->started)
				rc = ezp__pipeline_listen(pl->p, true, err);
			if (rc != EZP_OK)
				goto rollback;
			continue;
		}
		pl->old = ezp__config_find(d->cfg, pl->pc->name);
		if (pl->old && ezp__pipeline_conf_equal(pl->old, pl->pc))
			continue;
		if (!pl->old || !ezp__kind_conf_equal(&pl->old->from, &pl->pc->from) ||
		    pl->old->shared != pl->pc->shared) {
			if (d->started) {
				rc = ezp__listener_open(pl->p, &pl->pc->from, pl->pc->shared,
							&pl->listener, err);
				if (rc != EZP_OK)
					goto rollback;
			}
		}
		rc = ezp__gen_build(d, pl->p, pl->pc,
				    pl->old && through_equal(pl->old, pl->pc) ? pl->p->gen->chain : NULL,
				    &pl->gen, err);
		if (rc != EZP_OK)
			goto rollback;
	}
	/* commit */
	for (p = LIST_FIRST(&d->pipelines); p; p = next) {
		next = LIST_NEXT(p, link);
		if (!ezp__config_find(cfg, p->name)) {
			ezp__log(EZP_LOG_INFO, "daemon", "pipeline '%s' removed", p->name);
			ezp__pipeline_remove(p, true);
			removed++;
		}
	}
	for (size_t i = 0; i < cfg->n_pipelines; i++) {
		struct plan *pl = &plans[i];
		if (pl->add) {
			pthread_mutex_lock(&d->lock);
			LIST_INSERT_HEAD(&d->pipelines, pl->p, link);
			pthread_mutex_unlock(&d->lock);
			ezp__pipeline_log_listen(pl->p);
			added++;
			continue;
		}
		if (pl->listener) {
			char addr[EZP_ADDR_STRLEN];
			ezp__pipeline_set_listener(pl->p, pl->listener);
			ezp__kind_conf_clear(&pl->p->conf->from);
			ezp__kind_conf_copy(&pl->p->conf->from, &pl->pc->from);
			ezp__log(EZP_LOG_INFO, "daemon", "pipeline '%s' now listens on %s", pl->p->name,
				 ezp__addr_format(&pl->listener->bound, addr, sizeof(addr)));
		}
		if (pl->gen) {
			pl->p->conf->shared = pl->pc->shared;
			pl->p->conf->limits = pl->pc->limits;
			ezp__pipeline_set_gen(pl->p, pl->gen);
			changed++;
		}
	}
	free(plans);
	ezp__services_note_reload(d, cfg);
	ezp__config_free(d->cfg);
	d->cfg = cfg;
	ezp__log_setup(d->log_level_override >= 0 ? d->log_level_override : cfg->log_level,
		       cfg->log_format);
	ezp__log(EZP_LOG_INFO, "daemon", "config applied: %u added, %u changed, %u removed", added,
		 changed, removed);
	return EZP_OK;
rollback:
	if (!err->file[0] && cfg->file)
		snprintf(err->file, sizeof(err->file), "%s", cfg->file);
	for (size_t i = 0; i < cfg->n_pipelines; i++) {
		struct plan *pl = &plans[i];
		if (pl->add && pl->p) {
			ezp__pipeline_unlisten(pl->p);
			ezp__pipeline_unref(pl->p);
		}
		ezp__listener_close(pl->listener);
		ezp__gen_unref(pl->gen);
	}
	free(plans);
	return rc;
}

int ezp_daemon_reload(struct ezp_daemon *dd, const char *yaml, const char *file,
		      struct ezp_error *err)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	struct ezp__config *cfg;
	struct ezp_error tmp = {0};
	int rc;

	if (!err)
		err = &tmp;
	pthread_mutex_lock(&d->ctl_lock);
	rc = daemon_parse(d, yaml, file, &cfg, err);
	if (rc != EZP_OK) {
		pthread_mutex_unlock(&d->ctl_lock);
		return rc;
	}
	if (cfg->workers && (unsigned)cfg->workers != d->n_workers)
		ezp__log(EZP_LOG_WARN, "daemon", "Workers changed to %ld: takes effect on restart",
			 (long)cfg->workers);
	rc = ezp__daemon_apply(d, cfg, err);
	if (rc != EZP_OK)
		ezp__config_free(cfg);
	else
		ezp__filters_reload(d);
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

char *ezp_daemon_config_dump(struct ezp_daemon *dd)
{
	return ezp__config_dump(((struct ezp_core_ctx *)dd)->cfg);
}

/* ---- explicit reloads: filters re-read their files ---- */

struct reload_ctx {
	struct ezp__pipe_gen **gens;
	size_t n;
};

static void reload_worker(struct ezp_worker *w, void *arg)
{
	struct reload_ctx *rc = arg;

	for (size_t i = 0; i < rc->n; i++) {
		struct ezp__chain_def *c = rc->gens[i]->chain;
		for (size_t k = 0; k < c->n; k++) {
			const struct ezp_filter_kind *kind = c->stages[k].kind;
			if (EZP_HAS(kind, reload) && kind->reload && c->stages[k].instances[w->index])
				kind->reload(c->stages[k].instances[w->index]);
		}
	}
}

void ezp__filters_reload(struct ezp_core_ctx *d)
{
	struct reload_ctx rc = {0};
	struct ezp__pipeline *p;
	size_t n = 0;

	if (!d->started)
		return;
	LIST_FOREACH(p, &d->pipelines, link)
		n++;
	rc.gens = calloc(n ? n : 1, sizeof(*rc.gens));
	if (!rc.gens)
		return;
	LIST_FOREACH(p, &d->pipelines, link)
		rc.gens[rc.n++] = ezp__pipeline_gen(p);
	ezp__workers_each(d, reload_worker, &rc);
	for (size_t i = 0; i < rc.n; i++)
		ezp__gen_unref(rc.gens[i]);
	free(rc.gens);
}

int ezp__daemon_reload_file(struct ezp_core_ctx *d, const char *path, struct ezp_error *err)
{
	struct ezp__kind_lookup lookup;
	struct ezp__config *cfg = NULL;
	int rc;

	pthread_mutex_lock(&d->ctl_lock);
	ezp__registry_lookup(d, &lookup);
	rc = ezp__config_load(path, &lookup, &cfg, err);
	if (rc == EZP_OK)
		rc = ezp__daemon_apply(d, cfg, err);
	if (rc == EZP_OK)
		ezp__filters_reload(d);
	if (rc != EZP_OK) {
		ezp__config_free(cfg);
		if (err->line)
			ezp__log(EZP_LOG_ERROR, "daemon", "reload refused, nothing changed: %s:%d:%d: %s",
				 err->file, err->line, err->column, err->message);
		else
			ezp__log(EZP_LOG_ERROR, "daemon", "reload refused, nothing changed: %s",
				 err->message);
	}
	pthread_mutex_unlock(&d->ctl_lock);
	return rc;
}

int ezp_daemon_run_signals(struct ezp_daemon *dd, const char *config_path)
{
	struct ezp_core_ctx *d = (struct ezp_core_ctx *)dd;
	sigset_t set;
	int sig;

	sigemptyset(&set);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	for (;;) {
		if (sigwait(&set, &sig) != 0)
			continue;
		if (sig == SIGHUP) {
			struct ezp_error err = {0};
			if (!config_path) {
				ezp__log(EZP_LOG_WARN, "daemon", "SIGHUP: no config file to reload "
					 "(started without -c)");
				continue;
			}
			ezp__daemon_reload_file(d, config_path, &err);
			continue;
		}
		ezp__log(EZP_LOG_INFO, "daemon", "%s: shutting down", strsignal(sig));
		ezp_daemon_stop(dd);
		return EZP_OK;
	}
}
