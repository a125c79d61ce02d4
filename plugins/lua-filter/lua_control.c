/*
 * lua_control.c - calls that must wait: the core's "ezp.control" functions
 * (swap a session's server, delete the pipeline for ezp.close(-2)) block
 * until a worker answers, so no worker and no
 * script may call them directly. Scripts queue jobs here and each job runs
 * on the core's service loop (ezp_control.service_worker), the thread those
 * functions are made for, which the core stops before it tears a daemon
 * down; main mode may wait for the answer. Jobs the service loop never ran
 * (shutdown) are finished in the plugin's fini.
 * Thread: lf_control_* from any thread; jobs on the service loop.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lua_filter.h"

enum lf_job_kind { LF_JOB_SWAP, LF_JOB_DELETE };

struct lf_waiter {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int done, rc, refs; /* refs: the job's and the caller's */
	char why[512];
};

static void lf_waiter_unref(struct lf_waiter *w)
{
	int last;

	pthread_mutex_lock(&w->lock);
	last = --w->refs == 0;
	pthread_mutex_unlock(&w->lock);
	if (!last)
		return;
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->lock);
	free(w);
}

/* Has the caller stopped waiting (its script is stopping)? Then only the log can tell it. */
static int lf_waiter_alone(struct lf_waiter *w)
{
	int alone;

	pthread_mutex_lock(&w->lock);
	alone = w->refs == 1;
	pthread_mutex_unlock(&w->lock);
	return alone;
}

struct lf_job {
	int kind;
	struct lf_group *group; /* ref'd */
	uint64_t id;
	char addr[256];
	struct lf_waiter *waiter;
	struct lf_job *next;
};

static pthread_mutex_t lf_ctl_lock = PTHREAD_MUTEX_INITIALIZER;
static struct lf_job *lf_jobs;

static void lf_job_finish(struct lf_job *j, int rc, const char *why)
{
	if (j->waiter) {
		pthread_mutex_lock(&j->waiter->lock);
		j->waiter->rc = rc;
		snprintf(j->waiter->why, sizeof(j->waiter->why), "%s", why ? why : "");
		j->waiter->done = 1;
		pthread_cond_signal(&j->waiter->cond);
		pthread_mutex_unlock(&j->waiter->lock);
		lf_waiter_unref(j->waiter);
	}
	lf_group_put(j->group);
	free(j);
}

/* Run @j and finish it. Thread: the service loop. */
static void lf_job_run(struct lf_job *j)
{
	struct lf_group *g = j->group;
	const struct ezp_control *c = g->control;
	struct ezp_error err;
	int rc;

	memset(&err, 0, sizeof(err));
	if (!c) {
		lf_job_finish(j, EZP_ERR_UNSUPPORTED, "the core offers no control interface");
		return;
	}
	if (j->kind == LF_JOB_SWAP) {
		rc = c->session_swap_server(g->core->ctx, j->id, j->addr, &err);
		if (rc != EZP_OK && (!j->waiter || lf_waiter_alone(j->waiter)))
			g->core->log(EZP_LOG_WARN, LF_SRC, "set_server(%lu, %s) failed: %s",
				     (unsigned long)j->id, j->addr, err.message);
	} else {
		rc = c->pipeline_delete(g->core->ctx, g->pipeline, &err);
		if (rc != EZP_OK)
			g->core->log(EZP_LOG_WARN, LF_SRC, "close(-2) of pipeline %s failed: %s",
				     g->pipeline, err.message);
		else
			g->core->log(EZP_LOG_INFO, LF_SRC, "pipeline %s closed by its script",
				     g->pipeline);
	}
	lf_job_finish(j, rc, err.message);
}

/* Run the oldest queued job of @arg's daemon. Thread: the service loop. */
static void lf_kick(void *arg)
{
	const struct ezp_core *core = arg;
	struct lf_job *j, **pp;

	pthread_mutex_lock(&lf_ctl_lock);
	for (pp = &lf_jobs; (j = *pp); pp = &j->next)
		if (j->group->core == core)
			break;
	if (j)
		*pp = j->next;
	pthread_mutex_unlock(&lf_ctl_lock);
	if (j)
		lf_job_run(j);
}

int lf_control_start(void)
{
	return EZP_OK;
}

/* The plugin's fini: every daemon using it has stopped; finish what never ran. */
void lf_control_stop(void)
{
	struct lf_job *j;

	pthread_mutex_lock(&lf_ctl_lock);
	while ((j = lf_jobs)) {
		lf_jobs = j->next;
		pthread_mutex_unlock(&lf_ctl_lock);
		lf_job_finish(j, EZP_ERR_CLOSED, "the daemon is stopping");
		pthread_mutex_lock(&lf_ctl_lock);
	}
	pthread_mutex_unlock(&lf_ctl_lock);
}

static int lf_post(struct lf_group *g, int kind, uint64_t id, const char *addr,
		   struct lf_waiter *w)
{
	struct lf_job *j = calloc(1, sizeof(*j)), **pp;
	struct ezp_worker *svc;

	if (!j)
		return EZP_ERR_NOMEM;
	j->kind = kind;
	j->group = g;
	j->id = id;
	j->waiter = w;
	if (addr && strlen(addr) >= sizeof(j->addr)) {
		free(j);
		return EZP_ERR_INVAL;
	}
	if (addr)
		snprintf(j->addr, sizeof(j->addr), "%s", addr);
	svc = g->control ? g->control->service_worker(g->core->ctx) : NULL;
	if (!svc) {
		free(j);
		return EZP_ERR_CLOSED;
	}
	lf_group_ref(g);
	pthread_mutex_lock(&lf_ctl_lock);
	pp = &lf_jobs; /* FIFO */
	while (*pp)
		pp = &(*pp)->next;
	*pp = j;
	pthread_mutex_unlock(&lf_ctl_lock);
	if (g->core->defer(svc, lf_kick, (void *)g->core) != EZP_OK)
		return EZP_ERR_AGAIN; /* stays queued; finished in fini */
	return EZP_OK;
}

int lf_control_swap_server(struct lf_group *g, uint64_t id, const char *addr)
{
	return lf_post(g, LF_JOB_SWAP, id, addr, NULL);
}

static int lf_stopping(struct lf_script *s)
{
	return atomic_load(&s->stop) || (s->main && lf_main_stopping(s->main));
}

/* Post a job and wait for it (or until @who's script is stopping). */
static int lf_post_wait(struct lf_group *g, int kind, uint64_t id, const char *addr,
			struct lf_script *who, char *why, size_t why_len)
{
	struct lf_waiter *w = calloc(1, sizeof(*w));
	int rc;

	if (!w) {
		snprintf(why, why_len, "out of memory");
		return EZP_ERR_NOMEM;
	}
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	w->refs = 2;
	rc = lf_post(g, kind, id, addr, w);
	if (rc != EZP_OK && rc != EZP_ERR_AGAIN) { /* not queued */
		if (rc == EZP_ERR_INVAL) /* lf_post says so of a too long address only */
			snprintf(why, why_len, "'%.40s...' is too long for an address", addr);
		else
			snprintf(why, why_len, "cannot queue the call (status %d)", rc);
		w->refs = 1;
		lf_waiter_unref(w);
		return rc;
	}
	pthread_mutex_lock(&w->lock);
	while (!w->done && !lf_stopping(who)) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += 50000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&w->cond, &w->lock, &ts);
	}
	rc = w->done ? w->rc : EZP_ERR_CLOSED;
	snprintf(why, why_len, "%s", w->done ? w->why : "the script is stopping");
	pthread_mutex_unlock(&w->lock);
	lf_waiter_unref(w);
	return rc;
}

int lf_control_swap_server_wait(struct lf_group *g, uint64_t id, const char *addr,
				struct lf_script *who, char *why, size_t why_len)
{
	return lf_post_wait(g, LF_JOB_SWAP, id, addr, who, why, why_len);
}

int lf_control_delete_pipeline(struct lf_group *g)
{
	return lf_post(g, LF_JOB_DELETE, 0, NULL, NULL);
}
