/*
 * lua_reload.c - reloading a script when its file changes: an inotify
 * watch on the script's folder (editors replace files by renaming, so the
 * folder is watched, not the file), read on the instance's worker through
 * core->watch_add; and the log lines reloads write.
 * Thread: the instance's worker (lf_watch_new runs on the control thread
 * in create(); the core's watch then fires on the worker).
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "lua_filter.h"

struct lf_watch {
	const struct ezp_core *core;
	int fd;
	struct ezp_watch *watch;
	char base[NAME_MAX + 1];
	void (*fn)(void *arg);
	void *arg;
};

static void lf_watch_read(int fd, unsigned events, void *arg)
{
	struct lf_watch *w = arg;
	char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	int hit = 0;
	ssize_t n;

	(void)events;
	while ((n = read(fd, buf, sizeof(buf))) > 0) {
		for (ssize_t off = 0; off + (ssize_t)sizeof(struct inotify_event) <= n;) {
			const struct inotify_event *ev = (const void *)(buf + off);
			size_t step = sizeof(*ev) + ev->len;
			if (off + (ssize_t)step > n)
				break;
			if (ev->len && strncmp(ev->name, w->base, ev->len) == 0)
				hit = 1;
			if (ev->mask & IN_Q_OVERFLOW)
				hit = 1;
			off += (ssize_t)step;
		}
	}
	if (hit)
		w->fn(w->arg);
}

struct lf_watch *lf_watch_new(const struct ezp_core *core, struct ezp_worker *worker,
			      const char *path, void (*fn)(void *arg), void *arg)
{
	struct lf_watch *w = calloc(1, sizeof(*w));
	char *d1 = strdup(path), *d2 = strdup(path);

	if (!w || !d1 || !d2)
		goto fail;
	w->fd = -1;
	w->core = core;
	w->fn = fn;
	w->arg = arg;
	snprintf(w->base, sizeof(w->base), "%s", basename(d1));
	w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (w->fd < 0)
		goto fail;
	if (inotify_add_watch(w->fd, dirname(d2),
			      IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF) < 0)
		goto fail;
	w->watch = core->watch_add(worker, w->fd, EZP_WATCH_READ, lf_watch_read, w);
	if (!w->watch)
		goto fail;
	free(d1);
	free(d2);
	return w;
fail:
	core->log(EZP_LOG_WARN, LF_SRC, "%s: cannot watch the file for changes (%s); reload it "
		  "with SIGHUP or the API", path, strerror(errno));
	if (w && w->fd >= 0)
		close(w->fd);
	free(w);
	free(d1);
	free(d2);
	return NULL;
}

void lf_watch_free(struct lf_watch *w)
{
	if (!w)
		return;
	w->core->watch_free(w->watch);
	close(w->fd);
	free(w);
}

void lf_log_reload(const struct ezp_core *core, const char *path, int ok, const char *why,
		   int loud)
{
	int level = loud ? (ok ? EZP_LOG_INFO : EZP_LOG_ERROR) : EZP_LOG_DEBUG;

	if (ok)
		core->log(level, LF_SRC, "reloaded %s", path);
	else
		core->log(level, LF_SRC, "reload of %s failed, keeping the old script: %s", path,
			  why);
}
