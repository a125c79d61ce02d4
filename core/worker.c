/*
 * worker.c - the worker event loops (libevent, one thread each), deferred
 * calls posted from any thread, and the timers and fd watches plugins use.
 * libevent stays behind these functions. Thread: as each function says.
 */
#include <errno.h>
#include <event2/event.h>
#include <event2/thread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core.h"

static __thread struct ezp_worker *current_worker;

struct ezp_timer {
	struct event *ev;
	ezp_fn fn;
	void *arg;
	uint64_t ms;
	int repeat;
};

struct ezp_watch {
	struct event *ev;
	struct ezp_worker *w;
	int fd;
	unsigned events;
	ezp_watch_fn fn;
	void *arg;
};

struct ezp_worker *ezp__worker_current(void)
{
	return current_worker;
}

static void worker_run_queue(struct ezp_worker *w);

/* Thread: the worker. Woken by another thread through the eventfd. */
static void worker_drain(evutil_socket_t fd, short what, void *arg)
{
	struct ezp_worker *w = arg;
	uint64_t v;

	(void)what;
	if (read(fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		ezp__log(EZP_LOG_WARN, "worker", "eventfd read: %s", strerror(errno));
	worker_run_queue(w);
}

/* Thread: the worker. Activated by the worker itself: no syscall. */
static void worker_drain_local(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	worker_run_queue(arg);
}

/* Thread: the worker. Run every queued deferred call, in order. */
static void worker_run_queue(struct ezp_worker *w)
{
	struct ezp__deferred *d;

	pthread_mutex_lock(&w->defer_lock);
	d = w->defer_head;
	w->defer_head = w->defer_tail = NULL;
	pthread_mutex_unlock(&w->defer_lock);
	while (d) {
		struct ezp__deferred *next = d->next;
		d->fn(d->arg);
		free(d);
		d = next;
	}
}

int ezp__worker_init(struct ezp_worker *w, struct ezp_core_ctx *d, unsigned index)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;

	pthread_once(&once, (void (*)(void))evthread_use_pthreads);
	memset(w, 0, sizeof(*w));
	w->d = d;
	w->index = index;
	w->wake_fd = -1;
	TAILQ_INIT(&w->sessions);
	pthread_mutex_init(&w->defer_lock, NULL);
	w->base = event_base_new();
	if (!w->base)
		return EZP_ERR_NOMEM;
	w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (w->wake_fd < 0)
		return EZP_ERR_IO;
	w->wake_ev = event_new(w->base, w->wake_fd, EV_READ | EV_PERSIST, worker_drain, w);
	if (!w->wake_ev || event_add(w->wake_ev, NULL) != 0)
		return EZP_ERR_NOMEM;
	w->local_ev = event_new(w->base, -1, 0, worker_drain_local, w);
	if (!w->local_ev)
		return EZP_ERR_NOMEM;
	return EZP_OK;
}

static void *worker_main(void *arg)
{
	struct ezp_worker *w = arg;

	current_worker = w;
	event_base_loop(w->base, EVLOOP_NO_EXIT_ON_EMPTY);
	/* calls posted while stopping still run, so nothing waits forever */
	worker_run_queue(w);
	current_worker = NULL;
	return NULL;
}

int ezp__worker_start(struct ezp_worker *w)
{
	if (pthread_create(&w->thread, NULL, worker_main, w) != 0)
		return EZP_ERR_IO;
	w->running = true;
	return EZP_OK;
}

static void worker_exit(void *arg)
{
	struct ezp_worker *w = arg;

	event_base_loopbreak(w->base);
}

void ezp__worker_stop(struct ezp_worker *w)
{
	if (!w->running)
		return;
	ezp__defer(w, worker_exit, w);
	pthread_join(w->thread, NULL);
	w->running = false;
}

void ezp__worker_destroy(struct ezp_worker *w)
{
	struct ezp__deferred *d, *next;

	pthread_mutex_lock(&w->defer_lock);
	w->defer_closed = true;
	d = w->defer_head;
	w->defer_head = w->defer_tail = NULL;
	pthread_mutex_unlock(&w->defer_lock);
	for (; d; d = next) { /* never ran: run now so resources are released */
		next = d->next;
		d->fn(d->arg);
		free(d);
	}
	if (w->wake_ev)
		event_free(w->wake_ev);
	if (w->local_ev)
		event_free(w->local_ev);
	if (w->wake_fd >= 0)
		close(w->wake_fd);
	if (w->base)
		event_base_free(w->base);
	ezp__map_free(&w->holds);
	free(w->taps);
	pthread_mutex_destroy(&w->defer_lock);
}

int ezp__defer(struct ezp_worker *w, ezp_fn fn, void *arg)
{
	struct ezp__deferred *d = malloc(sizeof(*d));
	uint64_t one = 1;
	bool wake;

	if (!d)
		return EZP_ERR_NOMEM;
	d->fn = fn;
	d->arg = arg;
	d->next = NULL;
	pthread_mutex_lock(&w->defer_lock);
	if (w->defer_closed) {
		pthread_mutex_unlock(&w->defer_lock);
		free(d);
		return EZP_ERR_CLOSED;
	}
	wake = !w->defer_head;
	if (w->defer_tail)
		w->defer_tail->next = d;
	else
		w->defer_head = d;
	w->defer_tail = d;
	pthread_mutex_unlock(&w->defer_lock);
	/*
	 * The worker's own defers: later in this loop iteration, no syscall.
	 * Another thread always writes the eventfd, even when the queue was not
	 * empty: a wake must never depend on one an earlier caller may not
	 * have delivered yet (a shutdown once waited forever on that).
	 */
	if (current_worker == w) {
		if (wake)
			event_active(w->local_ev, 0, 0);
	} else if (write(w->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN) {
		ezp__log(EZP_LOG_WARN, "worker", "eventfd write: %s", strerror(errno));
	}
	return EZP_OK;
}

struct call_sync {
	ezp_fn fn;
	void *arg;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
};

static void call_sync_run(void *arg)
{
	struct call_sync *c = arg;

	c->fn(c->arg);
	pthread_mutex_lock(&c->lock);
	c->done = true;
	pthread_cond_signal(&c->cond);
	pthread_mutex_unlock(&c->lock);
}

int ezp__worker_call(struct ezp_worker *w, ezp_fn fn, void *arg)
{
	struct call_sync c = {.fn = fn, .arg = arg};
	int rc;

	if (current_worker == w || !w->running) {
		fn(arg);
		return EZP_OK;
	}
	pthread_mutex_init(&c.lock, NULL);
	pthread_cond_init(&c.cond, NULL);
	rc = ezp__defer(w, call_sync_run, &c);
	if (rc == EZP_OK) {
		pthread_mutex_lock(&c.lock);
		while (!c.done)
			pthread_cond_wait(&c.cond, &c.lock);
		pthread_mutex_unlock(&c.lock);
	}
	pthread_cond_destroy(&c.cond);
	pthread_mutex_destroy(&c.lock);
	return rc;
}

struct each_call {
	void (*fn)(struct ezp_worker *w, void *arg);
	struct ezp_worker *w;
	void *arg;
};

static void each_run(void *arg)
{
	struct each_call *c = arg;

	c->fn(c->w, c->arg);
}

void ezp__workers_each(struct ezp_core_ctx *d, void (*fn)(struct ezp_worker *w, void *arg),
		       void *arg)
{
	for (unsigned i = 0; i < d->n_workers; i++) {
		struct each_call c = {fn, d->workers[i], arg};
		ezp__worker_call(d->workers[i], each_run, &c);
	}
}

/* ---- timers ---- */

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct ezp_timer *t = arg;

	(void)fd;
	(void)what;
	t->fn(t->arg);
}

struct ezp_timer *ezp__timer_new(struct ezp_worker *w, ezp_fn fn, void *arg)
{
	struct ezp_timer *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->fn = fn;
	t->arg = arg;
	t->ev = event_new(w->base, -1, 0, timer_cb, t);
	if (!t->ev) {
		free(t);
		return NULL;
	}
	return t;
}

void ezp__timer_start(struct ezp_timer *t, uint64_t ms, int repeat)
{
	struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};

	if (!t)
		return;
	event_del(t->ev);
	if (repeat != t->repeat) {
		struct event_base *base = event_get_base(t->ev);
		struct event *ev = event_new(base, -1, repeat ? EV_PERSIST : 0, timer_cb, t);
		if (!ev) {
			ezp__log(EZP_LOG_ERROR, "worker", "out of memory: timer not started");
			return;
		}
		event_free(t->ev);
		t->ev = ev;
		t->repeat = repeat;
	}
	t->ms = ms;
	event_add(t->ev, &tv);
}

void ezp__timer_stop(struct ezp_timer *t)
{
	if (t)
		event_del(t->ev);
}

void ezp__timer_free(struct ezp_timer *t)
{
	if (!t)
		return;
	event_free(t->ev);
	free(t);
}

/* ---- fd watches ---- */

static void watch_cb(evutil_socket_t fd, short what, void *arg)
{
	struct ezp_watch *watch = arg;
	unsigned ev = 0;

	if (what & EV_READ)
		ev |= EZP_WATCH_READ;
	if (what & EV_WRITE)
		ev |= EZP_WATCH_WRITE;
	watch->fn((int)fd, ev, watch->arg);
}

/* Re-arm the one event of @watch with its current interest set. */
static int watch_arm(struct ezp_watch *watch)
{
	short flags = EV_PERSIST;

	if (watch->events & EZP_WATCH_READ)
		flags |= EV_READ;
	if (watch->events & EZP_WATCH_WRITE)
		flags |= EV_WRITE;
	event_del(watch->ev);
	if (!(watch->events & (EZP_WATCH_READ | EZP_WATCH_WRITE)))
		return EZP_OK;
	if (event_assign(watch->ev, watch->w->base, watch->fd, flags, watch_cb, watch) != 0 ||
	    event_add(watch->ev, NULL) != 0)
		return EZP_ERR_IO;
	return EZP_OK;
}

struct ezp_watch *ezp__watch_add(struct ezp_worker *w, int fd, unsigned events, ezp_watch_fn fn,
				 void *arg)
{
	struct ezp_watch *watch = calloc(1, sizeof(*watch));

	if (!watch)
		return NULL;
	watch->w = w;
	watch->fd = fd;
	watch->fn = fn;
	watch->arg = arg;
	watch->events = events;
	watch->ev = event_new(w->base, fd, EV_PERSIST, watch_cb, watch);
	if (!watch->ev || watch_arm(watch) != EZP_OK) {
		ezp__watch_free(watch);
		return NULL;
	}
	return watch;
}

void ezp__watch_set(struct ezp_watch *watch, unsigned events)
{
	if (!watch || watch->events == events)
		return;
	watch->events = events;
	if (watch_arm(watch) != EZP_OK)
		ezp__log(EZP_LOG_ERROR, "worker", "cannot watch fd %d", watch->fd);
}

void ezp__watch_free(struct ezp_watch *watch)
{
	if (!watch)
		return;
	if (watch->ev) {
		event_del(watch->ev);
		event_free(watch->ev);
	}
	free(watch);
}
