/*
 * session.c - sessions and their legs: what the transports report (reads,
 * end of stream, errors, backpressure), delivery to the far legs, pausing,
 * the zero-copy fast path, and orderly close. Thread: the session's worker.
 */
#include <stdlib.h>
#include <string.h>

#include "core.h"

/* Datagrams queued in a full chain before more are dropped (they cannot be paused). */
#define EZP__DATAGRAM_BACKLOG 256

static void session_teardown(struct ezp_session *s);

void ezp__session_enter(struct ezp_session *s)
{
	s->busy++;
}

void ezp__session_leave(struct ezp_session *s)
{
	if (--s->busy == 0 && s->closing)
		session_teardown(s);
}

struct ezp_session *ezp__session_find_local(struct ezp_worker *w, uint64_t id)
{
	struct ezp_session *s;

	TAILQ_FOREACH(s, &w->sessions, link)
		if (s->id == id && !s->closing)
			return s;
	return NULL;
}

struct ezp_session *ezp__session_new(struct ezp__pipeline *p, struct ezp_worker *w,
				     struct ezp__pipe_gen *g)
{
	struct ezp_core_ctx *d = p->d;
	struct ezp_session *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->d = d;
	s->w = w;
	s->p = p;
	s->limits = g->limits;
	s->max_clients = (unsigned)g->limits.max_client_legs;
	s->clients = calloc(s->max_clients, sizeof(*s->clients));
	s->chain = ezp__chain_ref(g->chain);
	s->to = g->to;
	atomic_fetch_add(&g->to->refs, 1);
	s->gen_no = g->no;
	s->transport = p->conf->from.transport->name; /* outlives reloads: plugins stay loaded */
	s->server_addr = g->to_addr;
	if (!s->clients || ezp__chain_init(s) != EZP_OK) {
		ezp__chain_fini(s);
		ezp__chain_unref(s->chain);
		ezp__endpoint_unref(s->to);
		free(s->clients);
		free(s);
		return NULL;
	}
	s->id = atomic_fetch_add(&d->next_session, 1);
	s->opened_us = s->last_us = ezp__now_us();
	atomic_fetch_add(&p->srefs, 1);
	atomic_fetch_add(&p->n_sessions, 1);
	atomic_fetch_add(&p->total_sessions, 1);
	pthread_mutex_lock(&d->lock);
	ezp__map_put(&d->session_worker, s->id, (void *)(uintptr_t)(w->index + 1));
	pthread_mutex_unlock(&d->lock);
	TAILQ_INSERT_TAIL(&w->sessions, s, link);
	return s;
}

struct ezp_leg *ezp__leg_new(struct ezp_session *s, const struct ezp_transport_kind *kind,
			     const void *conf, const struct ezp_addr *peer, bool is_server)
{
	struct ezp_leg *leg = calloc(1, sizeof(*leg));

	if (!leg)
		return NULL;
	leg->s = s;
	leg->kind = kind;
	leg->kind_conf = conf;
	if (peer)
		leg->peer = *peer;
	leg->is_server = is_server;
	leg->paused_now = true; /* new legs start paused */
	return leg;
}

int ezp__session_add_client(struct ezp_session *s, struct ezp_leg *leg)
{
	if (s->n_clients >= s->max_clients)
		return EZP_ERR_LIMIT;
	leg->index = s->n_clients;
	s->clients[s->n_clients++] = leg;
	return EZP_OK;
}

static void leg_close(struct ezp_leg *leg)
{
	if (leg->closed)
		return;
	leg->closed = true;
	if (leg->state)
		leg->kind->close(leg, leg->state);
	leg->state = NULL;
}

static void leg_free(struct ezp_leg *leg)
{
	if (!leg)
		return;
	leg_close(leg);
	free(leg);
}

/* Remove client leg @leg (not the last one); indexes of later legs shift. */
static void session_drop_client(struct ezp_session *s, struct ezp_leg *leg)
{
	unsigned i;

	for (i = 0; i < s->n_clients && s->clients[i] != leg; i++)
		;
	if (i == s->n_clients)
		return;
	memmove(&s->clients[i], &s->clients[i + 1], (s->n_clients - i - 1) * sizeof(leg));
	s->n_clients--;
	for (unsigned j = 0; j < s->n_clients; j++)
		s->clients[j]->index = j;
	leg_free(leg);
	ezp__session_event(s, EZP_SESSION_CHANGED);
	ezp__session_update_pause(s);
}

void ezp__session_info(struct ezp_session *s, struct ezp_session_info *info)
{
	memset(info, 0, sizeof(*info));
	info->struct_size = sizeof(*info);
	info->id = s->id;
	info->pipeline = s->p->name;
	info->transport = s->transport;
	if (s->n_clients)
		info->client = s->clients[0]->peer;
	info->server = s->server_addr;
	info->n_clients = s->n_clients;
	info->opened_us = s->opened_us;
	info->last_activity_us = s->last_us;
	memcpy(info->bytes, s->bytes, sizeof(info->bytes));
	memcpy(info->packets, s->packets, sizeof(info->packets));
	info->dropped = s->dropped;
	info->replaced = s->replaced;
	info->injected = s->injected;
	info->close_reason = s->close_reason;
	info->close_text = s->close_text;
}

/* Tell filters, holders and taps about a session event. */
void ezp__session_event(struct ezp_session *s, int event)
{
	struct ezp_session_info info;
	bool need_info = false;

	for (size_t i = 0; i < s->chain->n; i++) {
		struct ezp__stage_def *sd = &s->chain->stages[i];
		if (sd->kind->flags & EZP_FILTER_EXCLUSIVE)
			need_info = true;
		else if (sd->kind->session_event)
			sd->kind->session_event(sd->instances[s->w->index], s, event, &s->fstate[i]);
	}
	if (need_info) {
		ezp__session_info(s, &info);
		for (size_t i = 0; i < s->chain->n; i++) {
			struct ezp__stage_def *sd = &s->chain->stages[i];
			struct ezp__holder *h;
			if (!(sd->kind->flags & EZP_FILTER_EXCLUSIVE))
				continue;
			h = atomic_load(&sd->claim->holder);
			if (h && h->h.on_session_event)
				h->h.on_session_event(h->h.userdata, &info, event);
		}
	}
	if (s->w->n_taps)
		ezp__tap_session(s, event == EZP_SESSION_OPENED    ? EZP_TAP_SESSION_OPENED
				    : event == EZP_SESSION_CHANGED ? EZP_TAP_SESSION_CHANGED
								   : EZP_TAP_SESSION_CLOSED);
}

/* Start a session whose first client leg is attached: connect the server. */
void ezp__session_start(struct ezp_session *s)
{
	const struct ezp__kind_conf *to = &s->to->conf;
	struct ezp_connect_args args;
	struct ezp_error err = {0};
	int rc;

	ezp__session_enter(s);
	s->opened = true;
	ezp__session_event(s, EZP_SESSION_OPENED);
	s->server = ezp__leg_new(s, to->transport, to->config, &s->server_addr, true);
	if (!s->server) {
		ezp__session_close(s, EZP_CLOSE_ERROR, "out of memory");
		goto out;
	}
	memset(&args, 0, sizeof(args));
	args.struct_size = sizeof(args);
	args.leg = s->server;
	args.config = to->config;
	args.addr = &s->server_addr;
	args.worker = s->w;
	rc = to->transport->connect(&s->d->table, &args, &err);
	if (rc == EZP_OK)
		ezp__leg_connected(s->server, EZP_OK, NULL);
	else if (rc != EZP_ERR_AGAIN)
		ezp__leg_connected(s->server, rc, err.message[0] ? err.message : ezp__status_str(rc));
	ezp__session_update_pause(s);
out:
	ezp__session_leave(s);
}

/* ---- pausing and the fast path ---- */

static void leg_apply_pause(struct ezp_leg *leg, unsigned bits)
{
	bool want;

	leg->pause = bits;
	want = bits != 0;
	if (leg->closed || !leg->state || want == leg->paused_now)
		return;
	leg->paused_now = want;
	if (want)
		leg->kind->pause(leg, leg->state);
	else
		leg->kind->resume(leg, leg->state);
}

void ezp__session_update_pause(struct ezp_session *s)
{
	bool server_ready, server_full = false, client_full = false;
	unsigned bits;

	if (s->closing)
		return;
	server_ready = s->server && s->server->connected;
	for (unsigned i = 0; i < s->n_clients; i++)
		client_full |= s->clients[i]->congested;
	if (s->server)
		server_full = s->server->congested;
	for (unsigned i = 0; i < s->n_clients; i++) {
		bits = 0;
		if (!server_ready)
			bits |= EZP__PAUSE_CONNECT;
		if (server_full)
			bits |= EZP__PAUSE_PEER;
		if (s->chain->n && ezp__chain_full(s, EZP_DIR_TO_SERVER))
			bits |= EZP__PAUSE_CHAIN;
		leg_apply_pause(s->clients[i], bits);
	}
	if (s->server) {
		bits = 0;
		if (!server_ready)
			bits |= EZP__PAUSE_CONNECT;
		if (client_full)
			bits |= EZP__PAUSE_PEER;
		if (s->chain->n && ezp__chain_full(s, EZP_DIR_TO_CLIENT))
			bits |= EZP__PAUSE_CHAIN;
		leg_apply_pause(s->server, bits);
	}
	if (s->server_old)
		leg_apply_pause(s->server_old, client_full ? EZP__PAUSE_PEER : 0);
}

void ezp__session_check_fast_path(struct ezp_session *s)
{
	struct ezp_leg *c, *sv = s->server;

	if (s->bridged || s->closing || ezp__chain_active(s) || s->next_chain || s->n_clients != 1 || !sv ||
	    !sv->connected || s->server_old || !ezp__chain_empty(s) || s->dir[0].eof_pending ||
	    s->dir[1].eof_pending)
		return;
	c = s->clients[0];
	if (c->kind != sv->kind || !EZP_HAS(c->kind, bridge) || !c->kind->bridge || !c->state ||
	    !sv->state || c->pause || sv->pause || ezp__tap_wants(s))
		return;
	if (c->kind->bridge(c, c->state, sv, sv->state) == EZP_OK) {
		s->bridged = true;
		ezp__log(EZP_LOG_DEBUG, "session", "session %lu on the zero-copy path",
			 (unsigned long)s->id);
	}
}

void ezp__session_unbridge(struct ezp_session *s)
{
	struct ezp_leg *c, *sv;

	if (!s->bridged)
		return;
	s->bridged = false;
	c = s->clients[0];
	sv = s->server;
	c->kind->unbridge(c, c->state, sv, sv->state);
	ezp__log(EZP_LOG_DEBUG, "session", "session %lu left the zero-copy path",
		 (unsigned long)s->id);
}

/* ---- delivery ---- */

void ezp__session_deliver(struct ezp_session *s, unsigned dir, struct ezp_packet *pkt)
{
	if (dir == EZP_DIR_TO_SERVER) {
		struct ezp_leg *sv = s->server;
		if (!sv || sv->closed || sv->eof_out) {
			ezp__packet_unref(pkt);
			return;
		}
		sv->kind->send(sv, sv->state, pkt);
		return;
	}
	for (unsigned i = 0; i < s->n_clients; i++) {
		struct ezp_leg *c = s->clients[i];
		if (c->closed || c->eof_out || !c->state)
			continue;
		c->kind->send(c, c->state, i + 1 < s->n_clients ? ezp__packet_ref(pkt) : pkt);
		if (i + 1 == s->n_clients)
			return;
	}
	ezp__packet_unref(pkt);
}

static void session_maybe_done(struct ezp_session *s)
{
	bool out_done = true;

	if (!s->dir[0].eof_done || !s->dir[1].eof_done)
		return;
	if (s->server && !s->server->closed && !s->server->write_done)
		out_done = false;
	for (unsigned i = 0; i < s->n_clients; i++)
		if (!s->clients[i]->closed && !s->clients[i]->write_done)
			out_done = false;
	if (out_done)
		ezp__session_close(s, s->first_eof == EZP_DIR_TO_SERVER ? EZP_CLOSE_CLIENT
									 : EZP_CLOSE_SERVER,
				   "");
}

void ezp__session_deliver_eof(struct ezp_session *s, unsigned dir)
{
	s->dir[dir].eof_pending = false;
	s->dir[dir].eof_done = true;
	if (dir == EZP_DIR_TO_SERVER) {
		if (s->server && !s->server->eof_out) {
			s->server->eof_out = true;
			s->server->kind->shutdown_write(s->server, s->server->state);
		}
	} else {
		for (unsigned i = 0; i < s->n_clients; i++) {
			struct ezp_leg *c = s->clients[i];
			if (!c->eof_out && c->state) {
				c->eof_out = true;
				c->kind->shutdown_write(c, c->state);
			}
		}
	}
	session_maybe_done(s);
}

/* ---- what transports report ---- */

void ezp__leg_recv(struct ezp_leg *leg, struct ezp_packet *pkt)
{
	struct ezp_session *s = leg->s;
	unsigned dir = leg->is_server ? EZP_DIR_TO_CLIENT : EZP_DIR_TO_SERVER;

	if (s->closing || leg->closed) {
		ezp__packet_unref(pkt);
		return;
	}
	ezp__session_enter(s);
	pkt->session_id = s->id;
	pkt->dir = (uint8_t)dir;
	pkt->leg = (uint8_t)(leg->is_server ? 0 : leg->index);
	pkt->ts_us = ezp__now_us();
	s->last_us = pkt->ts_us;
	s->bytes[dir] += pkt->len;
	s->packets[dir]++;
	if (s->gen_no != atomic_load_explicit(&s->p->gen_no, memory_order_relaxed))
		ezp__pipeline_refresh_session(s);
	if (s->next_chain)
		ezp__chain_maybe_switch(s);
	if (s->chain->n && ezp__chain_full(s, dir) && (leg->kind->flags & EZP_TRANSPORT_DATAGRAM) &&
	    s->dir[dir].queued >= EZP__DATAGRAM_BACKLOG) {
		/* datagram legs cannot be paused: past the window, count and drop */
		s->dir[dir].overflow++;
		s->dropped++;
		ezp__packet_unref(pkt);
		goto out;
	}
	ezp__chain_push(s, dir, pkt, 0);
	/* only transports that can bridge ever take the fast path */
	if (!s->bridged && EZP_HAS(leg->kind, bridge) && leg->kind->bridge && !ezp__chain_active(s))
		ezp__session_check_fast_path(s);
out:
	ezp__session_leave(s);
}

void ezp__leg_eof(struct ezp_leg *leg)
{
	struct ezp_session *s = leg->s;

	if (s->closing || leg->closed || leg->eof_in)
		return;
	leg->eof_in = true;
	ezp__session_enter(s);
	if (leg == s->server_old) {
		s->server_old = NULL;
		leg_free(leg);
	} else if (!leg->is_server && s->n_clients > 1) {
		session_drop_client(s, leg);
	} else {
		unsigned dir = leg->is_server ? EZP_DIR_TO_CLIENT : EZP_DIR_TO_SERVER;
		if (!s->dir[0].eof_pending && !s->dir[0].eof_done && !s->dir[1].eof_pending &&
		    !s->dir[1].eof_done)
			s->first_eof = dir;
		ezp__chain_push_eof(s, dir);
	}
	ezp__session_leave(s);
}

void ezp__leg_write_done(struct ezp_leg *leg)
{
	struct ezp_session *s = leg->s;

	if (s->closing)
		return;
	leg->write_done = true;
	ezp__session_enter(s);
	session_maybe_done(s);
	ezp__session_leave(s);
}

/* A leg that connects for a swap or an added client: teardown answers it if it never ends. */
static void pending_add(struct ezp_session *s, struct ezp_leg *leg)
{
	leg->pending_next = s->pending;
	s->pending = leg;
}

static bool pending_has(const struct ezp_session *s, const struct ezp_leg *leg)
{
	for (const struct ezp_leg *l = s->pending; l; l = l->pending_next)
		if (l == leg)
			return true;
	return false;
}

static void pending_del(struct ezp_session *s, struct ezp_leg *leg)
{
	for (struct ezp_leg **pp = &s->pending; *pp; pp = &(*pp)->pending_next)
		if (*pp == leg) {
			*pp = leg->pending_next;
			return;
		}
}

void ezp__leg_error(struct ezp_leg *leg, int reason, const char *message)
{
	struct ezp_session *s = leg->s;
	char text[160];

	if (s->closing || leg->closed)
		return;
	if (leg->attach_mode > 0) {
		/* a client for an existing session whose transport could not attach it:
		 * the session never had it; tell the waiter and forget the leg */
		if (leg->attach_done)
			leg->attach_done(leg->attach_arg, EZP_ERR_IO, message ? message : "attach failed");
		free(leg);
		return;
	}
	if (!leg->state) /* the transport never attached: forget the leg */
		leg->closed = true;
	ezp__session_enter(s);
	if (leg == s->server_old) {
		s->server_old = NULL;
		leg_free(leg);
	} else if (pending_has(s, leg)) {
		/* a leg being connected for a swap or an added client: its caller hears of it */
		ezp__leg_connected(leg, EZP_ERR_IO, message);
	} else if (!leg->is_server && s->n_clients > 1) {
		session_drop_client(s, leg);
	} else {
		if (reason == EZP_CLOSE_ERROR) {
			snprintf(text, sizeof(text), "%s: %s", leg->is_server ? "server" : "client",
				 message ? message : "error");
			ezp__session_close(s, reason, text);
		} else {
			ezp__session_close(s, reason, message ? message : "");
		}
	}
	ezp__session_leave(s);
}

void ezp__leg_backpressure(struct ezp_leg *leg, int on)
{
	struct ezp_session *s = leg->s;

	if (leg->congested == (on != 0) || s->closing)
		return;
	leg->congested = on != 0;
	ezp__session_enter(s);
	ezp__session_update_pause(s);
	ezp__session_leave(s);
}

void ezp__leg_bridged_bytes(struct ezp_leg *from, size_t n)
{
	struct ezp_session *s = from->s;
	unsigned dir = from->is_server ? EZP_DIR_TO_CLIENT : EZP_DIR_TO_SERVER;

	s->bytes[dir] += n;
	s->packets[dir]++;
	s->last_us = ezp__now_us();
}

void ezp__leg_connected(struct ezp_leg *leg, int status, const char *message)
{
	struct ezp_session *s = leg->s;
	char addr[EZP_ADDR_STRLEN];
	ezp_done_fn done = leg->on_connect;
	void *arg = leg->on_connect_arg;

	if (s->closing)
		return; /* still pending: teardown frees it and answers */
	if (leg->connect_purpose != EZP__LEG_PRIMARY)
		pending_del(s, leg);
	ezp__session_enter(s);
	leg->on_connect = NULL;
	if (status != EZP_OK) {
		ezp__addr_format(&leg->peer, addr, sizeof(addr));
		if (leg->connect_purpose == EZP__LEG_PRIMARY) {
			atomic_fetch_add(&s->p->connect_failures, 1);
			ezp__log(EZP_LOG_WARN, "session", "session %lu (%s): cannot connect to %s: %s",
				 (unsigned long)s->id, s->p->name, addr, message ? message : "");
			char text[160];
			snprintf(text, sizeof(text), "connect to %s: %s", addr, message ? message : "");
			ezp__session_close(s, EZP_CLOSE_CONNECT_FAILED, text);
		} else {
			char text[200];
			snprintf(text, sizeof(text), "connect to %s: %s", addr, message ? message : "");
			leg_free(leg);
			if (done)
				done(arg, status, text);
		}
		goto out;
	}
	leg->connected = true;
	switch (leg->connect_purpose) {
	case EZP__LEG_PRIMARY:
		break;
	case EZP__LEG_SWAP_SERVER: {
		struct ezp_leg *old = s->server;
		ezp__session_unbridge(s);
		s->server = leg;
		s->server_addr = leg->peer;
		leg->connect_purpose = EZP__LEG_PRIMARY;
		leg_free(old);
		ezp__session_event(s, EZP_SESSION_CHANGED);
		break;
	}
	case EZP__LEG_SWAP_CLIENT: {
		struct ezp_leg *old = s->clients[0];
		ezp__session_unbridge(s);
		leg->index = 0;
		s->clients[0] = leg;
		leg_free(old);
		ezp__session_event(s, EZP_SESSION_CHANGED);
		break;
	}
	case EZP__LEG_ADD_CLIENT:
		ezp__session_unbridge(s);
		if (ezp__session_add_client(s, leg) != EZP_OK) {
			leg_free(leg);
			if (done)
				done(arg, EZP_ERR_LIMIT, "too many client legs (MaxClientLegs)");
			goto out;
		}
		ezp__session_event(s, EZP_SESSION_CHANGED);
		break;
	}
	ezp__session_update_pause(s);
	ezp__session_check_fast_path(s);
	if (done)
		done(arg, EZP_OK, NULL);
out:
	ezp__session_leave(s);
}

/* ---- live changes of one session ---- */

int ezp__session_swap_server(struct ezp_session *s, const struct ezp_addr *addr,
			     ezp_done_fn done, void *arg)
{
	struct ezp_leg *sv = s->server, *leg;
	struct ezp_connect_args args;
	struct ezp_error err = {0};
	int rc;

	if (!sv)
		return EZP_ERR_CLOSED;
	if ((sv->kind->flags & EZP_TRANSPORT_DATAGRAM) && EZP_HAS(sv->kind, repoint) &&
	    sv->kind->repoint) {
		rc = sv->kind->repoint(sv, sv->state, addr, &err);
		if (rc == EZP_OK) {
			sv->peer = *addr;
			s->server_addr = *addr;
			ezp__session_event(s, EZP_SESSION_CHANGED);
		}
		done(arg, rc, rc == EZP_OK ? NULL : err.message);
		return EZP_OK;
	}
	leg = ezp__leg_new(s, sv->kind, sv->kind_conf, addr, true);
	if (!leg)
		return EZP_ERR_NOMEM;
	leg->connect_purpose = EZP__LEG_SWAP_SERVER;
	leg->on_connect = done;
	leg->on_connect_arg = arg;
	pending_add(s, leg);
	memset(&args, 0, sizeof(args));
	args.struct_size = sizeof(args);
	args.leg = leg;
	args.config = sv->kind_conf;
	args.addr = addr;
	args.worker = s->w;
	ezp__session_enter(s);
	rc = sv->kind->connect(&s->d->table, &args, &err);
	if (rc == EZP_OK)
		ezp__leg_connected(leg, EZP_OK, NULL);
	else if (rc != EZP_ERR_AGAIN)
		ezp__leg_connected(leg, rc, err.message[0] ? err.message : ezp__status_str(rc));
	ezp__session_leave(s);
	return EZP_OK;
}

int ezp__session_swap_client(struct ezp_session *s, const struct ezp_addr *addr, int dial,
			     bool add, ezp_done_fn done, void *arg)
{
	struct ezp_leg *c = s->n_clients ? s->clients[0] : NULL, *leg;
	struct ezp_connect_args args;
	struct ezp_error err = {0};
	int rc;

	if (!c)
		return EZP_ERR_CLOSED;
	if (add && s->n_clients >= s->max_clients)
		return EZP_ERR_LIMIT;
	if (!add && (c->kind->flags & EZP_TRANSPORT_DATAGRAM)) {
		if (!EZP_HAS(c->kind, repoint) || !c->kind->repoint)
			return EZP_ERR_UNSUPPORTED;
		rc = c->kind->repoint(c, c->state, addr, &err);
		if (rc == EZP_OK) {
			ezp__pipeline_route_add(s->p, addr, s, EZP__ROUTE_REPLACE, false, NULL, NULL);
			c->peer = *addr;
			ezp__session_event(s, EZP_SESSION_CHANGED);
		}
		done(arg, rc, rc == EZP_OK ? NULL : err.message);
		return EZP_OK;
	}
	if (!dial) {
		/* the next client from @addr takes (or joins) the session */
		return ezp__pipeline_route_add(s->p, addr, s, add ? EZP__ROUTE_ADD : EZP__ROUTE_REPLACE,
					       true, done, arg);
	}
	if (!c->kind->connect)
		return EZP_ERR_UNSUPPORTED;
	leg = ezp__leg_new(s, c->kind, NULL, addr, false);
	if (!leg)
		return EZP_ERR_NOMEM;
	leg->connect_purpose = add ? EZP__LEG_ADD_CLIENT : EZP__LEG_SWAP_CLIENT;
	leg->on_connect = done;
	leg->on_connect_arg = arg;
	pending_add(s, leg);
	memset(&args, 0, sizeof(args));
	args.struct_size = sizeof(args);
	args.leg = leg;
	args.addr = addr;
	args.worker = s->w;
	ezp__session_enter(s);
	rc = c->kind->connect(&s->d->table, &args, &err);
	if (rc == EZP_OK)
		ezp__leg_connected(leg, EZP_OK, NULL);
	else if (rc != EZP_ERR_AGAIN)
		ezp__leg_connected(leg, rc, err.message[0] ? err.message : ezp__status_str(rc));
	ezp__session_leave(s);
	return EZP_OK;
}

/* Attach a client that arrived through a route (accept mode / Shared). */
int ezp__session_attach_client(struct ezp_session *s, struct ezp_leg *leg, int mode)
{
	ezp__session_unbridge(s);
	if (mode == EZP__ROUTE_REPLACE && s->n_clients) {
		struct ezp_leg *old = s->clients[0];
		leg->index = 0;
		s->clients[0] = leg;
		leg_free(old);
	} else if (ezp__session_add_client(s, leg) != EZP_OK) {
		return EZP_ERR_LIMIT;
	}
	ezp__session_event(s, EZP_SESSION_CHANGED);
	return EZP_OK;
}

/* ---- close ---- */

void ezp__session_close(struct ezp_session *s, int reason, const char *text)
{
	if (s->closing)
		return;
	s->closing = true;
	s->close_reason = reason;
	snprintf(s->close_text, sizeof(s->close_text), "%s", text ? text : "");
	if (!s->busy)
		session_teardown(s);
}

static const char *reason_name(int r)
{
	static const char *const names[] = {"none", "client closed", "server closed", "idle",
					    "closed by request", "error", "connect failed",
					    "shutdown", "limit"};
	return r >= 0 && r < (int)EZP_ARRAY_LEN(names) ? names[r] : "?";
}

static void session_teardown(struct ezp_session *s)
{
	struct ezp__pipeline *p = s->p;
	struct ezp_core_ctx *d = s->d;

	s->busy++; /* callbacks below must not re-enter teardown */
	atomic_fetch_sub(&p->n_sessions, 1); /* the slot is free before the close is logged */
	ezp__log(EZP_LOG_INFO, "session", "session %lu (%s) closed: %s%s%s; %lu bytes to server, "
		 "%lu to client", (unsigned long)s->id, p->name, reason_name(s->close_reason),
		 s->close_text[0] ? ": " : "", s->close_text, (unsigned long)s->bytes[0],
		 (unsigned long)s->bytes[1]);
	if (s->opened)
		ezp__session_event(s, EZP_SESSION_CLOSED);
	ezp__chain_fini(s);
	while (s->pending) { /* swaps still connecting: their callers are waiting */
		struct ezp_leg *leg = s->pending;
		ezp_done_fn done = leg->on_connect;
		void *arg = leg->on_connect_arg;
		s->pending = leg->pending_next;
		leg_free(leg);
		if (done)
			done(arg, EZP_ERR_CLOSED, "the session closed while connecting");
	}
	leg_free(s->server);
	leg_free(s->server_old);
	for (unsigned i = 0; i < s->n_clients; i++)
		leg_free(s->clients[i]);
	s->n_clients = 0;
	TAILQ_REMOVE(&s->w->sessions, s, link);
	pthread_mutex_lock(&d->lock);
	ezp__map_del(&d->session_worker, s->id);
	pthread_mutex_unlock(&d->lock);
	ezp__pipeline_session_closed(p, s);
	ezp__chain_unref(s->chain);
	ezp__chain_unref(s->next_chain);
	ezp__endpoint_unref(s->to);
	free(s->clients);
	free(s);
}
