/*
 * services.c - the `struct ezp_core` table every plugin gets: thin,
 * documented entry points into the core's packets, workers, sessions and
 * taps. Thread: as sdk.h says for each member.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

static void svc_log(int level, const char *source, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	ezp__vlog(level, source, fmt, ap);
	va_end(ap);
}

static int svc_addr_parse(const char *text, struct ezp_addr *out, struct ezp_error *err)
{
	struct ezp_error tmp = {0};

	return ezp__addr_parse(text, out, err ? err : &tmp);
}

static unsigned svc_worker_index(struct ezp_worker *w)
{
	return w->index;
}

static struct ezp_timer *svc_timer_new(struct ezp_worker *w, ezp_fn fn, void *arg)
{
	return ezp__timer_new(w, fn, arg);
}

static void svc_leg_set_state(struct ezp_leg *leg, void *state)
{
	leg->state = state;
	if (leg->attach_mode)
		ezp__leg_attached(leg);
}

static void *svc_leg_state(struct ezp_leg *leg)
{
	return leg->state;
}

static struct ezp_worker *svc_leg_worker(struct ezp_leg *leg)
{
	return leg->s->w;
}

static size_t svc_leg_max_packet(struct ezp_leg *leg)
{
	return (size_t)leg->s->limits.max_packet;
}

struct answer {
	struct ezp_worker *w;
	uint64_t hold_id;
	int verdict;
	struct ezp_packet *pkt;
};

static void answer_run(void *arg)
{
	struct answer *a = arg;

	ezp__chain_answer(a->w, a->hold_id, a->verdict, a->pkt);
	free(a);
}

/* Always posted, even from the owning worker: the chain may be mid-call. */
static int svc_filter_answer(struct ezp_core_ctx *d, uint64_t hold_id, int verdict,
			     struct ezp_packet *replacement)
{
	unsigned wi = (unsigned)(hold_id & 0xff);
	struct answer *a;
	int rc;

	if (wi >= d->n_workers || !(hold_id >> 8)) {
		ezp__packet_unref(replacement);
		return EZP_ERR_INVAL;
	}
	a = malloc(sizeof(*a));
	if (!a) {
		ezp__packet_unref(replacement);
		return EZP_ERR_NOMEM;
	}
	a->w = d->workers[wi];
	a->hold_id = hold_id;
	a->verdict = verdict;
	a->pkt = replacement;
	rc = ezp__defer(a->w, answer_run, a);
	if (rc != EZP_OK) {
		ezp__packet_unref(replacement);
		free(a);
	}
	return rc;
}

static void svc_session_info(struct ezp_session *s, struct ezp_session_info *info)
{
	ezp__session_info(s, info);
}

int ezp__session_inject_local(struct ezp_session *s, int dir, struct ezp_packet *pkt, int after)
{
	unsigned from;

	if (s->closing || (dir != EZP_DIR_TO_SERVER && dir != EZP_DIR_TO_CLIENT)) {
		ezp__packet_unref(pkt);
		return s->closing ? EZP_ERR_CLOSED : EZP_ERR_INVAL;
	}
	if ((int64_t)pkt->len > s->limits.max_inject_bytes) {
		ezp__log(EZP_LOG_WARN, "session", "session %lu: injected packet of %zu bytes refused "
			 "(Limits.MaxInjectBytes is %ld)", (unsigned long)s->id, pkt->len,
			 (long)s->limits.max_inject_bytes);
		ezp__packet_unref(pkt);
		return EZP_ERR_LIMIT;
	}
	ezp__session_enter(s);
	ezp__session_unbridge(s);
	pkt->flags |= EZP_PKT_INJECTED;
	pkt->session_id = s->id;
	pkt->dir = (uint8_t)dir;
	pkt->leg = 0;
	pkt->ts_us = ezp__now_us();
	s->injected++;
	from = after < 0 ? (unsigned)s->chain->n : (unsigned)after + 1;
	if (from > s->chain->n)
		from = (unsigned)s->chain->n;
	ezp__chain_push(s, (unsigned)dir, pkt, from);
	ezp__session_leave(s);
	return EZP_OK;
}

static void svc_session_close(struct ezp_session *s, int reason, const char *text)
{
	ezp__session_close(s, reason, text);
}

/* ---- by id, any thread ---- */

struct by_id {
	struct ezp_core_ctx *d;
	uint64_t id;
	int dir;
	struct ezp_packet *pkt;
	ezp_done_fn done;
	void *arg;
	int close;
};

static void by_id_run(void *arg)
{
	struct by_id *b = arg;
	struct ezp_worker *w = ezp__worker_current();
	struct ezp_session *s = w ? ezp__session_find_local(w, b->id) : NULL;
	int rc = EZP_ERR_NOT_FOUND;
	char msg[160] = "session not found";

	if (s && b->close) {
		ezp__session_close(s, EZP_CLOSE_API, "closed by request");
		rc = EZP_OK;
	} else if (s) {
		if (b->pkt && (int64_t)b->pkt->len > s->limits.max_inject_bytes)
			snprintf(msg, sizeof(msg), "%zu bytes is over the injection limit "
				 "(Limits.MaxInjectBytes is %ld)", b->pkt->len,
				 (long)s->limits.max_inject_bytes);
		else
			snprintf(msg, sizeof(msg), "invalid direction or session closing");
		rc = ezp__session_inject_local(s, b->dir, b->pkt, -1);
		b->pkt = NULL;
	}
	ezp__packet_unref(b->pkt);
	if (b->done)
		b->done(b->arg, rc, rc == EZP_OK ? NULL : msg);
	free(b);
}

static int by_id_post(struct ezp_core_ctx *d, struct by_id *b)
{
	struct ezp_worker *w = ezp__session_worker(d, b->id);
	int rc;

	if (!w) {
		ezp__packet_unref(b->pkt);
		free(b);
		return EZP_ERR_NOT_FOUND;
	}
	rc = ezp__defer(w, by_id_run, b);
	if (rc != EZP_OK) {
		ezp__packet_unref(b->pkt);
		free(b);
	}
	return rc;
}

int ezp__inject_by_id(struct ezp_core_ctx *d, uint64_t id, int dir, const void *data, size_t len,
		      ezp_done_fn done, void *arg)
{
	struct by_id *b = calloc(1, sizeof(*b));

	if (!b)
		return EZP_ERR_NOMEM;
	b->d = d;
	b->id = id;
	b->dir = dir;
	b->done = done;
	b->arg = arg;
	b->pkt = ezp__packet_copy(data, len);
	if (!b->pkt) {
		free(b);
		return EZP_ERR_NOMEM;
	}
	return by_id_post(d, b);
}

int ezp__close_by_id(struct ezp_core_ctx *d, uint64_t id, ezp_done_fn done, void *arg)
{
	struct by_id *b = calloc(1, sizeof(*b));

	if (!b)
		return EZP_ERR_NOMEM;
	b->d = d;
	b->id = id;
	b->close = 1;
	b->done = done;
	b->arg = arg;
	return by_id_post(d, b);
}

static int svc_tap_subscribe(struct ezp_core_ctx *d, const struct ezp_tap_opts *opts,
			     struct ezp_tap **out)
{
	return ezp__tap_subscribe(d, opts, out);
}

void ezp__core_table_init(struct ezp_core_ctx *d)
{
	struct ezp_core *t = &d->table;

	memset(t, 0, sizeof(*t));
	t->struct_size = sizeof(*t);
	t->abi_major = EZP_ABI_MAJOR;
	t->abi_minor = EZP_ABI_MINOR;
	t->log = svc_log;
	t->log_enabled = ezp__log_enabled;
	t->addr_parse = svc_addr_parse;
	t->addr_format = ezp__addr_format;
	t->packet_new = ezp__packet_new;
	t->packet_wrap = ezp__packet_wrap;
	t->packet_ref = ezp__packet_ref;
	t->packet_unref = ezp__packet_unref;
	t->packet_make_writable = ezp__packet_make_writable;
	t->packet_resize = ezp__packet_resize;
	t->defer = ezp__defer;
	t->worker_current = ezp__worker_current;
	t->worker_index = svc_worker_index;
	t->timer_new = svc_timer_new;
	t->timer_start = ezp__timer_start;
	t->timer_stop = ezp__timer_stop;
	t->timer_free = ezp__timer_free;
	t->watch_add = ezp__watch_add;
	t->watch_set = ezp__watch_set;
	t->watch_free = ezp__watch_free;
	t->now_us = ezp__now_us;
	t->listener_accept = ezp__listener_accept;
	t->leg_set_state = svc_leg_set_state;
	t->leg_state = svc_leg_state;
	t->leg_worker = svc_leg_worker;
	t->leg_recv = ezp__leg_recv;
	t->leg_eof = ezp__leg_eof;
	t->leg_write_done = ezp__leg_write_done;
	t->leg_connected = ezp__leg_connected;
	t->leg_error = ezp__leg_error;
	t->leg_backpressure = ezp__leg_backpressure;
	t->leg_bridged_bytes = ezp__leg_bridged_bytes;
	t->leg_max_packet = svc_leg_max_packet;
	t->filter_answer = svc_filter_answer;
	t->session_info = svc_session_info;
	t->session_inject = ezp__session_inject_local;
	t->session_close = svc_session_close;
	t->inject = ezp__inject_by_id;
	t->close = ezp__close_by_id;
	t->tap_subscribe = svc_tap_subscribe;
	t->tap_unsubscribe = ezp__tap_unsubscribe;
	t->find_service = ezp__find_service;
	t->ctx = d;
	t->pipeline_addresses = ezp__pipeline_addresses;
	t->stage_wake = ezp__stage_wake;
}
