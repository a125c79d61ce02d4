/*
 * capfile.c - capture files: one writer per (pipeline, File), shared by the
 * per-worker instances of the `capture` filter through a registry.
 *
 * A writer subscribes a core tap for its pipeline. The tap's callbacks run
 * on a packet worker (the tap's delivery worker) and only queue a record
 * (packet references, addresses) for the writer's own thread, bounded in
 * count and bytes: past the bound a record is counted as lost, like the
 * events the tap itself lost by lagging. The writer thread encodes
 * (capenc.c) into a buffer, writes it at least twice a second and when it
 * grows past 256 KiB, rotates the file by size and, when the last
 * reference goes, writes a statistics block and closes the file.
 *
 * Threads: cap_writer_get on the control thread; cap_writer_put on any;
 * tap callbacks on the delivery worker; the rest on the writer's thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "capture.h"

#define CW_MAX_EVENTS 16384u	    /* queued records before dropping */
#define CW_MAX_BYTES (64u << 20)    /* queued payload bytes before dropping */
#define CW_WAKE_BYTES (1u << 20)    /* wake the thread early past this */
#define CW_WRITE_BYTES (256u << 10) /* write when the buffer grows past this */
#define CW_FLUSH_MS 500		    /* and at least this often */
#define CW_LOG_EVERY_US 10000000ull /* loss warnings at most every 10 s */

struct cw_rec {
	struct cw_rec *next;
	int type;
	uint64_t session_id, ts_us;
	int dir;
	uint32_t flags;
	struct ezp_packet *pkt, *orig;
	struct ezp_addr src, dst;
	int transport;
	struct ezp_addr client, server;
	uint64_t opened_us;
	int close_reason;
	char close_text[160];
};

struct cap_writer {
	struct cap_writer *next; /* registry (reg_lock) */
	int refs;		 /* reg_lock */
	bool closing;		 /* reg_lock: the last reference went; the thread is finishing */
	const struct ezp_core *core;
	struct ezp_core_ctx *ctx;
	char *pipeline, *file;
	atomic_int_fast64_t rotate_bytes, rotate_files;
	atomic_int hint; /* the pipeline's transport, as instances saw it */
	struct ezp_tap *tap;
	pthread_t thread;
	/* the queue (lock) */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct cw_rec *head, **tail;
	size_t q_n, q_bytes;
	uint64_t q_lost;
	bool stop;
	/* the writer thread's own */
	int fd;
	uint64_t file_bytes;
	struct pcn_buf wbuf;
	struct cap_enc *enc;
	uint64_t last_flush_us, lost_logged_us, lost_unlogged, io_errors;
};

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t reg_cond = PTHREAD_COND_INITIALIZER;
static struct cap_writer *reg_list;
static unsigned reg_threads; /* writer threads not finished yet */

/* ---- the writer thread: files ---- */

/* "dir/cap.pcapng" + 2 -> "dir/cap.2.pcapng"; "cap" + 2 -> "cap.2". */
static void rotated_name(const char *file, unsigned i, char *out, size_t len)
{
	const char *slash = strrchr(file, '/'), *base = slash ? slash + 1 : file;
	const char *dot = strrchr(base, '.');

	if (dot && dot != base)
		snprintf(out, len, "%.*s.%u%s", (int)(dot - file), file, i, dot);
	else
		snprintf(out, len, "%s.%u", file, i);
}

static int cw_open(const char *file)
{
	return open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
}

static void cw_flush(struct cap_writer *w)
{
	size_t off = 0;

	while (w->fd >= 0 && off < w->wbuf.len) {
		ssize_t n = write(w->fd, w->wbuf.p + off, w->wbuf.len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (w->io_errors++ == 0)
				w->core->log(EZP_LOG_ERROR, CAP_SRC,
					     "pipeline '%s': cannot write %s: %s; captured packets "
					     "are lost until it can be written",
					     w->pipeline, w->file, strerror(n < 0 ? errno : EIO));
			break;
		}
		off += (size_t)n;
		w->file_bytes += (uint64_t)n;
	}
	w->wbuf.len = 0;
	w->wbuf.oom = 0;
	w->last_flush_us = w->core->now_us();
}

static void cw_sink(void *ud, const uint8_t *block, size_t len)
{
	struct cap_writer *w = ud;

	pcn_buf_put(&w->wbuf, block, len);
}

/* The file reached RotateBytes: shift file -> file.1 -> file.2 ... and start a new one. */
static void cw_rotate(struct cap_writer *w, uint64_t ts_us)
{
	unsigned keep = (unsigned)atomic_load(&w->rotate_files);
	char from[4096], to[4096];

	cw_flush(w);
	if (w->fd >= 0)
		close(w->fd);
	if (keep == 0) {
		unlink(w->file);
	} else {
		rotated_name(w->file, keep, to, sizeof(to));
		unlink(to);
		for (unsigned i = keep; i > 1; i--) {
			rotated_name(w->file, i - 1, from, sizeof(from));
			rotated_name(w->file, i, to, sizeof(to));
			rename(from, to);
		}
		rotated_name(w->file, 1, to, sizeof(to));
		if (rename(w->file, to) != 0)
			w->core->log(EZP_LOG_WARN, CAP_SRC,
				     "pipeline '%s': cannot rename %s to %s: %s", w->pipeline,
				     w->file, to, strerror(errno));
	}
	w->fd = cw_open(w->file);
	if (w->fd < 0)
		w->core->log(EZP_LOG_ERROR, CAP_SRC, "pipeline '%s': cannot open %s: %s",
			     w->pipeline, w->file, strerror(errno));
	w->file_bytes = 0;
	w->io_errors = 0;
	cap_enc_header(w->enc);
	cap_enc_resync(w->enc, ts_us);
}

static void cw_note_lost(struct cap_writer *w, uint64_t n)
{
	uint64_t now = w->core->now_us();

	cap_enc_lost(w->enc, n, now, "the capture fell behind");
	w->lost_unlogged += n;
	if (now - w->lost_logged_us >= CW_LOG_EVERY_US) {
		w->core->log(EZP_LOG_WARN, CAP_SRC,
			     "pipeline '%s': %llu packet(s) not written to %s: the capture fell "
			     "behind (%llu in all; noted in the file)",
			     w->pipeline, (unsigned long long)w->lost_unlogged, w->file,
			     (unsigned long long)cap_enc_lost_total(w->enc));
		w->lost_logged_us = now;
		w->lost_unlogged = 0;
	}
}

static void cw_encode(struct cap_writer *w, struct cw_rec *r)
{
	struct cap_ev ev = {
	    .type = r->type,
	    .session_id = r->session_id,
	    .pipeline = w->pipeline,
	    .ts_us = r->ts_us,
	    .dir = r->dir,
	    .flags = r->flags,
	    .src = r->src,
	    .dst = r->dst,
	    .transport = r->transport,
	    .client = r->client,
	    .server = r->server,
	    .opened_us = r->opened_us,
	    .close_reason = r->close_reason,
	    .close_text = r->close_text,
	};
	int64_t rb = atomic_load(&w->rotate_bytes);

	if (r->pkt) {
		ev.data = r->pkt->data;
		ev.len = r->pkt->len;
	}
	if (r->orig) {
		ev.orig = r->orig->data;
		ev.orig_len = r->orig->len;
	}
	if (rb > 0 && w->file_bytes + w->wbuf.len >= (uint64_t)rb)
		cw_rotate(w, r->ts_us);
	cap_enc_event(w->enc, &ev);
}

static void cw_rec_free(const struct ezp_core *core, struct cw_rec *r)
{
	if (r->pkt)
		core->packet_unref(r->pkt);
	if (r->orig)
		core->packet_unref(r->orig);
	free(r);
}

static void cw_finish(struct cap_writer *w)
{
	char c[200];

	snprintf(c, sizeof(c), "capture of pipeline '%s' ended: %llu packet(s), %llu lost",
		 w->pipeline, (unsigned long long)cap_enc_received(w->enc),
		 (unsigned long long)cap_enc_lost_total(w->enc));
	cap_enc_stats(w->enc, w->core->now_us(), c);
	cw_flush(w);
	if (w->fd >= 0)
		close(w->fd);
	w->fd = -1;
}

static void cw_free(struct cap_writer *w)
{
	while (w->head) {
		struct cw_rec *r = w->head;
		w->head = r->next;
		cw_rec_free(w->core, r);
	}
	cap_enc_free(w->enc);
	pcn_buf_free(&w->wbuf);
	pthread_mutex_destroy(&w->lock);
	pthread_cond_destroy(&w->cond);
	free(w->pipeline);
	free(w->file);
	free(w);
}

static void *cw_main(void *arg)
{
	struct cap_writer *w = arg;
	struct cap_writer **pp;

	pthread_mutex_lock(&w->lock);
	for (;;) {
		struct cw_rec *batch;
		uint64_t lost;
		bool stopping;

		if (!w->head && !w->q_lost && !w->stop) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += CW_FLUSH_MS * 1000000L;
			if (ts.tv_nsec >= 1000000000L) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
			pthread_cond_timedwait(&w->cond, &w->lock, &ts);
		}
		batch = w->head;
		w->head = NULL;
		w->tail = &w->head;
		w->q_n = w->q_bytes = 0;
		lost = w->q_lost;
		w->q_lost = 0;
		stopping = w->stop;
		pthread_mutex_unlock(&w->lock);

		if (lost)
			cw_note_lost(w, lost);
		while (batch) {
			struct cw_rec *r = batch;
			batch = r->next;
			cw_encode(w, r);
			cw_rec_free(w->core, r);
		}
		if (w->wbuf.len >= CW_WRITE_BYTES ||
		    (w->wbuf.len && w->core->now_us() - w->last_flush_us >= CW_FLUSH_MS * 1000ull))
			cw_flush(w);
		pthread_mutex_lock(&w->lock);
		if (stopping && !w->head && !w->q_lost)
			break;
	}
	pthread_mutex_unlock(&w->lock);
	cw_finish(w);
	pthread_mutex_lock(&reg_lock);
	for (pp = &reg_list; *pp && *pp != w; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = w->next;
	reg_threads--;
	pthread_cond_broadcast(&reg_cond);
	pthread_mutex_unlock(&reg_lock);
	cw_free(w);
	return NULL;
}

/* ---- the tap (its delivery worker) ---- */

static void cw_on_event(void *userdata, const struct ezp_tap_event *ev)
{
	struct cap_writer *w = userdata;
	struct cw_rec *r;
	size_t bytes = 0;
	bool wake = false;

	if (ev->type == EZP_TAP_SESSION_CHANGED)
		return;
	if (ev->type == EZP_TAP_PACKET)
		bytes = (ev->pkt ? ev->pkt->len : 0) + (ev->original ? ev->original->len : 0);
	pthread_mutex_lock(&w->lock);
	if (w->q_n >= CW_MAX_EVENTS || w->q_bytes + bytes > CW_MAX_BYTES) {
		w->q_lost++;
		pthread_mutex_unlock(&w->lock);
		return;
	}
	pthread_mutex_unlock(&w->lock);
	r = calloc(1, sizeof(*r));
	if (!r) {
		pthread_mutex_lock(&w->lock);
		w->q_lost++;
		pthread_mutex_unlock(&w->lock);
		return;
	}
	r->type = ev->type;
	r->session_id = ev->session_id;
	r->src = ev->src;
	r->dst = ev->dst;
	r->flags = ev->flags;
	if (ev->type == EZP_TAP_PACKET) {
		const struct ezp_packet *p = ev->pkt ? ev->pkt : ev->original;
		r->pkt = ev->pkt ? w->core->packet_ref((struct ezp_packet *)ev->pkt) : NULL;
		r->orig =
		    ev->original ? w->core->packet_ref((struct ezp_packet *)ev->original) : NULL;
		r->dir = p ? p->dir : EZP_DIR_TO_SERVER;
		r->ts_us = p && p->ts_us ? p->ts_us : w->core->now_us();
	} else {
		r->ts_us = w->core->now_us();
		if (ev->info) {
			r->transport = cap_transport_of(ev->info->transport);
			r->client = ev->info->client;
			r->server = ev->info->server;
			r->opened_us = ev->info->opened_us;
			r->close_reason = ev->info->close_reason;
			snprintf(r->close_text, sizeof(r->close_text), "%s",
				 ev->info->close_text ? ev->info->close_text : "");
		}
	}
	pthread_mutex_lock(&w->lock);
	*w->tail = r;
	w->tail = &r->next;
	w->q_n++;
	w->q_bytes += bytes;
	wake = w->q_bytes >= CW_WAKE_BYTES || w->q_n >= CW_MAX_EVENTS / 2;
	if (wake)
		pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

static void cw_on_lagged(void *userdata, uint64_t dropped)
{
	struct cap_writer *w = userdata;

	pthread_mutex_lock(&w->lock);
	w->q_lost += dropped;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

static int cw_transport(void *ud, const char *pipeline, uint64_t session_id)
{
	struct cap_writer *w = ud;

	(void)pipeline;
	(void)session_id;
	return atomic_load(&w->hint);
}

/* ---- the registry ---- */

static int cw_fail(struct ezp_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int cw_fail(struct ezp_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	err->code = code;
	err->side = EZP_SIDE_CONFIG;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return code;
}

/* Create the folders above @file that are missing (0755). */
static void cw_mkdirs(const char *file)
{
	char buf[4096];
	size_t n = strlen(file);

	if (n >= sizeof(buf))
		return;
	memcpy(buf, file, n + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		mkdir(buf, 0755);
		*p = '/';
	}
}

static struct cap_writer *cw_new(const struct ezp_core *core, const char *pipeline,
				 const struct cap_conf *conf, struct ezp_error *err)
{
	struct cap_writer *w = calloc(1, sizeof(*w));
	char desc[160];

	if (!w) {
		cw_fail(err, EZP_ERR_NOMEM, "capture: out of memory");
		return NULL;
	}
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	w->tail = &w->head;
	w->core = core;
	w->ctx = core->ctx;
	w->fd = -1;
	w->refs = 1;
	atomic_init(&w->rotate_bytes, conf->rotate_bytes);
	atomic_init(&w->rotate_files, conf->rotate_files);
	atomic_init(&w->hint, CAP_T_UNKNOWN);
	w->pipeline = strdup(pipeline);
	w->file = strdup(conf->file);
	snprintf(desc, sizeof(desc), "EzProxy pipeline '%.100s'", pipeline);
	w->enc = cap_enc_new(cw_sink, w, desc);
	if (!w->pipeline || !w->file || !w->enc) {
		cw_fail(err, EZP_ERR_NOMEM, "capture: out of memory");
		goto fail;
	}
	cap_enc_set_transport_fn(w->enc, cw_transport, w);
	cw_mkdirs(conf->file);
	w->fd = cw_open(conf->file);
	if (w->fd < 0) {
		cw_fail(err, EZP_ERR_IO, "capture: cannot open File %s: %s", conf->file,
			strerror(errno));
		goto fail;
	}
	cap_enc_header(w->enc);
	cw_flush(w);
	return w;
fail:
	if (w->fd >= 0)
		close(w->fd);
	cw_free(w);
	return NULL;
}

/* Start the thread of a new writer and list it (reg_lock held). */
static int cw_start(struct cap_writer *w, struct ezp_error *err)
{
	pthread_attr_t attr;
	int rc;

	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	rc = pthread_create(&w->thread, &attr, cw_main, w);
	pthread_attr_destroy(&attr);
	if (rc != 0)
		return cw_fail(err, EZP_ERR, "capture: cannot start a writer thread: %s",
			       strerror(rc));
	reg_threads++;
	w->next = reg_list;
	reg_list = w;
	return EZP_OK;
}

/*
 * Subscribe the tap of a new writer. Not under reg_lock: subscribing waits
 * for every worker, and a worker may be waiting for reg_lock in
 * cap_writer_put.
 */
static void cw_subscribe(struct cap_writer *w)
{
	struct ezp_tap_opts o = {
	    .struct_size = sizeof(o),
	    .pipeline = w->pipeline,
	    .userdata = w,
	    .on_event = cw_on_event,
	    .on_lagged = cw_on_lagged,
	};

	if (w->core->tap_subscribe(w->ctx, &o, &w->tap) != EZP_OK) {
		w->tap = NULL;
		w->core->log(EZP_LOG_ERROR, CAP_SRC,
			     "pipeline '%s': cannot subscribe a tap; %s "
			     "stays empty",
			     w->pipeline, w->file);
	}
}

struct cap_writer *cap_writer_get(const struct ezp_core *core, const char *pipeline,
				  const struct cap_conf *conf, struct ezp_error *err)
{
	struct cap_writer *w;
	bool fresh = false;

	pthread_mutex_lock(&reg_lock);
again:
	for (w = reg_list; w; w = w->next) {
		if (w->ctx != core->ctx || strcmp(w->file, conf->file))
			continue;
		if (w->closing) { /* the same file, finishing: wait for it to close */
			pthread_cond_wait(&reg_cond, &reg_lock);
			goto again;
		}
		if (strcmp(w->pipeline, pipeline)) {
			cw_fail(err, EZP_ERR_CONFIG,
				"capture: File %s is already written by pipeline '%s'; give each "
				"pipeline its own File",
				conf->file, w->pipeline);
			w = NULL;
			goto out;
		}
		w->refs++;
		atomic_store(&w->rotate_bytes, conf->rotate_bytes);
		atomic_store(&w->rotate_files, conf->rotate_files);
		goto out;
	}
	w = cw_new(core, pipeline, conf, err);
	if (w && cw_start(w, err) != EZP_OK) {
		close(w->fd);
		cw_free(w);
		w = NULL;
	}
	fresh = w != NULL;
out:
	pthread_mutex_unlock(&reg_lock);
	if (fresh)
		cw_subscribe(w);
	return w;
}

void cap_writer_put(struct cap_writer *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&reg_lock);
	if (--w->refs > 0) {
		pthread_mutex_unlock(&reg_lock);
		return;
	}
	w->closing = true;
	pthread_mutex_unlock(&reg_lock);
	w->core->tap_unsubscribe(w->tap);
	pthread_mutex_lock(&w->lock);
	w->stop = true;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
	/* the thread writes what is queued, closes the file and frees @w */
}

void cap_writer_hint(struct cap_writer *w, int transport)
{
	if (w && transport)
		atomic_store(&w->hint, transport);
}

void cap_writers_wait(void)
{
	pthread_mutex_lock(&reg_lock);
	while (reg_threads)
		pthread_cond_wait(&reg_cond, &reg_lock);
	pthread_mutex_unlock(&reg_lock);
}
