/*
 * test_packet.c - the core's small building blocks, without a daemon:
 * refcounted packets (new, copy, wrap with a release callback, ref/unref
 * across threads, make-writable, resize), the u64 -> pointer map of util.c
 * (collisions, wrap-around probe chains, backward-shift deletion checked
 * against a reference model over many random operations), log.c (text and
 * JSON lines captured from stderr, escaping, level filtering, one write per
 * line under concurrency) and the status strings. Threads: the test's own,
 * plus pthreads of its own for the refcount and log concurrency checks.
 */
/* cmocka.h needs these first */
/* clang-format off */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
/* clang-format on */

#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "capture.h"
#include "core.h"

/* ---- packets ----------------------------------------------------------------------- */

struct release_rec {
	atomic_int calls;
	void *last_arg;
};

static void count_release(void *arg)
{
	struct release_rec *r = arg;

	r->last_arg = arg;
	atomic_fetch_add(&r->calls, 1);
}

/* Release callback for a heap buffer wrapped as a packet. */
static void free_release(void *arg)
{
	free(arg);
}

static void test_packet_new_and_copy(void **state)
{
	struct ezp_packet *p, *c, *e;

	(void)state;
	p = ezp__packet_new(0);
	assert_non_null(p);
	assert_non_null(p->data); /* a zero-length packet still has a data pointer */
	assert_int_equal(p->len, 0);
	assert_int_equal(p->session_id, 0);
	assert_int_equal(p->flags, 0);
	assert_int_equal(ezp__packet_refs(p), 1);
	ezp__packet_unref(p);

	p = ezp__packet_new(100);
	assert_non_null(p);
	assert_int_equal(p->len, 100);
	memset(p->data, 0xab, 100);
	for (size_t i = 0; i < 100; i++)
		assert_int_equal(p->data[i], 0xab);
	ezp__packet_unref(p);

	c = ezp__packet_copy("hello", 5);
	assert_non_null(c);
	assert_int_equal(c->len, 5);
	assert_memory_equal(c->data, "hello", 5);
	e = ezp__packet_copy(NULL, 0); /* nothing to copy: an empty packet */
	assert_non_null(e);
	assert_int_equal(e->len, 0);
	ezp__packet_unref(c);
	ezp__packet_unref(e);

	/* NULL is accepted where a packet may be absent */
	ezp__packet_unref(NULL);
	assert_null(ezp__packet_ref(NULL));
	assert_null(ezp__packet_make_writable(NULL));
	assert_null(ezp__packet_resize(NULL, 10));
}

static void test_packet_wrap_release(void **state)
{
	static char foreign[] = "foreign bytes";
	struct release_rec rec = {0};
	struct ezp_packet *p, *q;

	(void)state;
	p = ezp__packet_wrap(foreign, 7, count_release, &rec);
	assert_non_null(p);
	assert_ptr_equal(p->data, foreign); /* wrapped memory is used in place, not copied */
	assert_int_equal(p->len, 7);
	q = ezp__packet_ref(p);
	assert_ptr_equal(q, p);
	assert_int_equal(ezp__packet_refs(p), 2);
	ezp__packet_ref(p);
	ezp__packet_unref(p);
	ezp__packet_unref(p);
	assert_int_equal(atomic_load(&rec.calls), 0); /* still referenced */
	ezp__packet_unref(p);
	assert_int_equal(atomic_load(&rec.calls), 1);
	assert_ptr_equal(rec.last_arg, &rec);

	/* a NULL release is allowed: the memory simply stays the owner's */
	p = ezp__packet_wrap(foreign, sizeof(foreign), NULL, NULL);
	assert_non_null(p);
	ezp__packet_unref(p);

	/* heap memory handed over: freed by the release callback (ASan/valgrind check it) */
	char *heap = malloc(32);
	assert_non_null(heap);
	memcpy(heap, "0123456789", 10);
	p = ezp__packet_wrap(heap, 10, free_release, heap);
	assert_non_null(p);
	ezp__packet_unref(p);
}

/* ---- refcounts across threads ---- */

#define REF_THREADS 8
#define REF_ROUNDS 20000

struct ref_job {
	struct ezp_packet *pkt;
	pthread_barrier_t *start;
};

static void *ref_churn(void *arg)
{
	struct ref_job *j = arg;

	pthread_barrier_wait(j->start);
	for (int i = 0; i < REF_ROUNDS; i++) {
		ezp__packet_ref(j->pkt);
		if (i % 3 == 0)
			ezp__packet_ref(j->pkt), ezp__packet_unref(j->pkt);
		ezp__packet_unref(j->pkt);
	}
	return NULL;
}

/* A reference taken on one thread and dropped on another (a tap's pattern). */
struct handoff {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct ezp_packet *slot[64];
	int head, tail, done;
};

static void *handoff_consumer(void *arg)
{
	struct handoff *h = arg;

	pthread_mutex_lock(&h->mu);
	for (;;) {
		while (h->head == h->tail && !h->done)
			pthread_cond_wait(&h->cv, &h->mu);
		if (h->head == h->tail && h->done)
			break;
		struct ezp_packet *p = h->slot[h->head++ % 64];
		pthread_cond_broadcast(&h->cv);
		pthread_mutex_unlock(&h->mu);
		ezp__packet_unref(p);
		pthread_mutex_lock(&h->mu);
	}
	pthread_mutex_unlock(&h->mu);
	return NULL;
}

static void test_packet_refs_across_threads(void **state)
{
	static char buf[] = "shared";
	struct release_rec rec = {0};
	struct ezp_packet *p = ezp__packet_wrap(buf, 6, count_release, &rec);
	pthread_t th[REF_THREADS], consumer;
	pthread_barrier_t start;
	struct ref_job job;
	struct handoff h;

	(void)state;
	assert_non_null(p);
	pthread_barrier_init(&start, NULL, REF_THREADS);
	job.pkt = p;
	job.start = &start;
	for (int i = 0; i < REF_THREADS; i++)
		assert_int_equal(pthread_create(&th[i], NULL, ref_churn, &job), 0);
	for (int i = 0; i < REF_THREADS; i++)
		pthread_join(th[i], NULL);
	pthread_barrier_destroy(&start);
	assert_int_equal(ezp__packet_refs(p), 1);
	assert_int_equal(atomic_load(&rec.calls), 0);

	memset(&h, 0, sizeof(h));
	pthread_mutex_init(&h.mu, NULL);
	pthread_cond_init(&h.cv, NULL);
	assert_int_equal(pthread_create(&consumer, NULL, handoff_consumer, &h), 0);
	for (int i = 0; i < 5000; i++) {
		pthread_mutex_lock(&h.mu);
		while (h.tail - h.head == 64)
			pthread_cond_wait(&h.cv, &h.mu);
		h.slot[h.tail++ % 64] = ezp__packet_ref(p);
		pthread_cond_broadcast(&h.cv);
		pthread_mutex_unlock(&h.mu);
	}
	pthread_mutex_lock(&h.mu);
	h.done = 1;
	pthread_cond_broadcast(&h.cv);
	pthread_mutex_unlock(&h.mu);
	pthread_join(consumer, NULL);
	pthread_cond_destroy(&h.cv);
	pthread_mutex_destroy(&h.mu);
	assert_int_equal(ezp__packet_refs(p), 1);
	assert_int_equal(atomic_load(&rec.calls), 0);
	ezp__packet_unref(p);
	assert_int_equal(atomic_load(&rec.calls), 1); /* exactly once, at the very end */
}

static void set_head(struct ezp_packet *p)
{
	p->session_id = 77;
	p->flags = EZP_PKT_INJECTED;
	p->dir = EZP_DIR_TO_CLIENT;
	p->leg = 3;
	p->ts_us = 123456789;
}

static void check_head(const struct ezp_packet *p)
{
	assert_int_equal(p->session_id, 77);
	assert_int_equal(p->flags, EZP_PKT_INJECTED);
	assert_int_equal(p->dir, EZP_DIR_TO_CLIENT);
	assert_int_equal(p->leg, 3);
	assert_int_equal(p->ts_us, 123456789);
}

static void test_packet_make_writable(void **state)
{
	static char ro[] = "read-only";
	struct release_rec rec = {0};
	struct ezp_packet *p, *w, *other;

	(void)state;
	/* the only reference to inline bytes: the packet itself */
	p = ezp__packet_copy("abc", 3);
	w = ezp__packet_make_writable(p);
	assert_ptr_equal(w, p);
	ezp__packet_unref(w);

	/* shared: a private copy; the other holder keeps the old bytes */
	p = ezp__packet_copy("abcdef", 6);
	set_head(p);
	other = ezp__packet_ref(p);
	w = ezp__packet_make_writable(p); /* (transfer full) p */
	assert_non_null(w);
	assert_ptr_not_equal(w, other);
	assert_int_equal(ezp__packet_refs(other), 1);
	assert_int_equal(ezp__packet_refs(w), 1);
	assert_int_equal(w->len, 6);
	assert_memory_equal(w->data, "abcdef", 6);
	check_head(w);
	w->data[0] = 'X';
	assert_memory_equal(other->data, "abcdef", 6);
	ezp__packet_unref(w);
	ezp__packet_unref(other);

	/* wrapped memory is never written: a copy, and the release runs */
	p = ezp__packet_wrap(ro, 9, count_release, &rec);
	set_head(p);
	w = ezp__packet_make_writable(p);
	assert_non_null(w);
	assert_ptr_not_equal(w->data, ro);
	assert_memory_equal(w->data, "read-only", 9);
	check_head(w);
	assert_int_equal(atomic_load(&rec.calls), 1);
	w->data[0] = 'R';
	assert_string_equal(ro, "read-only");
	ezp__packet_unref(w);
	assert_int_equal(atomic_load(&rec.calls), 1);

	/* wrapped and shared: copy; the wrapped packet lives on for the other holder */
	p = ezp__packet_wrap(ro, 9, count_release, &rec);
	other = ezp__packet_ref(p);
	w = ezp__packet_make_writable(p);
	assert_ptr_not_equal(w, other);
	assert_int_equal(atomic_load(&rec.calls), 1);
	ezp__packet_unref(other);
	assert_int_equal(atomic_load(&rec.calls), 2);
	ezp__packet_unref(w);
}

static void test_packet_resize(void **state)
{
	static char ro[] = "wrapped!";
	struct release_rec rec = {0};
	struct ezp_packet *p, *r, *other;

	(void)state;
	/* down: in place */
	p = ezp__packet_copy("0123456789", 10);
	r = ezp__packet_resize(p, 4);
	assert_ptr_equal(r, p);
	assert_int_equal(r->len, 4);
	/* back up within the capacity: in place, the old bytes are still there */
	r = ezp__packet_resize(r, 10);
	assert_ptr_equal(r, p);
	assert_memory_equal(r->data, "0123456789", 10);
	/* up past the capacity: a new packet, head and bytes copied, the tail zeroed */
	set_head(r);
	p = ezp__packet_resize(r, 4000);
	assert_non_null(p);
	assert_int_equal(p->len, 4000);
	assert_memory_equal(p->data, "0123456789", 10);
	for (size_t i = 10; i < 4000; i++)
		if (p->data[i] != 0)
			fail_msg("byte %zu of the grown packet is %d, not 0", i, p->data[i]);
	check_head(p);
	ezp__packet_unref(p);

	/* a zero-length packet has room for one byte */
	p = ezp__packet_new(0);
	r = ezp__packet_resize(p, 1);
	assert_ptr_equal(r, p);
	assert_int_equal(r->len, 1);
	ezp__packet_unref(r);

	/* shared: the other holder keeps its length and bytes */
	p = ezp__packet_copy("shared bytes", 12);
	other = ezp__packet_ref(p);
	r = ezp__packet_resize(p, 6);
	assert_ptr_not_equal(r, other);
	assert_int_equal(r->len, 6);
	assert_memory_equal(r->data, "shared", 6);
	assert_int_equal(other->len, 12);
	assert_int_equal(ezp__packet_refs(other), 1);
	ezp__packet_unref(other);
	ezp__packet_unref(r);

	/* wrapped: never resized in place, even when shrinking */
	p = ezp__packet_wrap(ro, 8, count_release, &rec);
	r = ezp__packet_resize(p, 3);
	assert_non_null(r);
	assert_ptr_not_equal(r->data, ro);
	assert_int_equal(r->len, 3);
	assert_memory_equal(r->data, "wra", 3);
	assert_int_equal(atomic_load(&rec.calls), 1);
	ezp__packet_unref(r);
	p = ezp__packet_wrap(ro, 8, count_release, &rec);
	r = ezp__packet_resize(p, 12);
	assert_memory_equal(r->data, "wrapped!\0\0\0\0", 12);
	assert_int_equal(atomic_load(&rec.calls), 2);
	ezp__packet_unref(r);
}

/* ---- the u64 map -------------------------------------------------------------------- */

/* The map's home slot for @key (util.c's hash, restated; checked below against the map). */
static size_t home_of(uint64_t key, size_t cap)
{
	key ^= key >> 33;
	key *= 0xff51afd7ed558ccdULL;
	key ^= key >> 33;
	return (size_t)key & (cap - 1);
}

/* The slot @key sits in, or -1. */
static long slot_of(const struct ezp__map *m, uint64_t key)
{
	for (size_t i = 0; i < m->cap; i++)
		if (m->keys[i] == key)
			return (long)i;
	return -1;
}

/*
 * The invariant of linear probing without tombstones: every slot between a
 * key's home and its position is occupied (else a lookup would stop early).
 */
static void check_probe_invariant(const struct ezp__map *m)
{
	size_t n = 0;

	for (size_t i = 0; i < m->cap; i++) {
		if (!m->keys[i])
			continue;
		n++;
		for (size_t j = home_of(m->keys[i], m->cap); j != i; j = (j + 1) & (m->cap - 1))
			if (!m->keys[j])
				fail_msg("key %llu at slot %zu has a hole at %zu on its probe path "
					 "(home %zu, cap %zu)",
					 (unsigned long long)m->keys[i], i, j,
					 home_of(m->keys[i], m->cap), m->cap);
	}
	if (n != m->n)
		fail_msg("map says %zu entries but %zu slots are used", m->n, n);
}

/* @n distinct keys (> @after) whose home slot is @home for every cap up to 2^@bits. */
static void keys_with_home(uint64_t *out, size_t n, size_t home, unsigned bits, uint64_t after)
{
	size_t found = 0;

	for (uint64_t k = after + 1; found < n; k++)
		if (home_of(k, (size_t)1 << bits) == home)
			out[found++] = k;
}

#define V(x) ((void *)(uintptr_t)(x))

static void test_map_basics(void **state)
{
	struct ezp__map m = {0};

	(void)state;
	/* empty: nothing found, nothing deleted */
	assert_null(ezp__map_get(&m, 1));
	assert_null(ezp__map_del(&m, 1));
	assert_int_equal(ezp__map_put(&m, 1, V(10)), EZP_OK);
	assert_int_equal(m.cap, 64);
	assert_int_equal(m.n, 1);
	assert_ptr_equal(ezp__map_get(&m, 1), V(10));
	/* the same key again replaces its value */
	assert_int_equal(ezp__map_put(&m, 1, V(11)), EZP_OK);
	assert_int_equal(m.n, 1);
	assert_ptr_equal(ezp__map_get(&m, 1), V(11));
	/* key 0 means "no key": never found */
	assert_null(ezp__map_get(&m, 0));
	assert_null(ezp__map_del(&m, 0));
	assert_null(ezp__map_get(&m, 2));
	assert_null(ezp__map_del(&m, 2));
	assert_ptr_equal(ezp__map_del(&m, 1), V(11));
	assert_int_equal(m.n, 0);
	assert_null(ezp__map_get(&m, 1));
	assert_null(ezp__map_del(&m, 1));

	/* growth keeps every entry, at the half-full mark */
	for (uint64_t k = 1; k <= 32; k++)
		assert_int_equal(ezp__map_put(&m, k * 1000003u, V(k)), EZP_OK);
	assert_int_equal(m.cap, 64);
	assert_int_equal(ezp__map_put(&m, 33 * 1000003u, V(33)), EZP_OK);
	assert_int_equal(m.cap, 128);
	for (uint64_t k = 1; k <= 33; k++)
		assert_ptr_equal(ezp__map_get(&m, k * 1000003u), V(k));
	check_probe_invariant(&m);
	ezp__map_free(&m);
	assert_null(m.keys);
	assert_int_equal(m.cap, 0);
	ezp__map_free(&m); /* twice is harmless */
}

static void test_map_collisions(void **state)
{
	struct ezp__map m = {0};
	uint64_t a[5], b[3], w[4];

	(void)state;
	keys_with_home(a, 5, 10, 6, 0);
	keys_with_home(b, 3, 11, 6, 0);
	keys_with_home(w, 4, 63, 6, 0);
	/* a run at 10..14 that b's keys (home 11) have to probe past */
	for (int i = 0; i < 5; i++)
		assert_int_equal(ezp__map_put(&m, a[i], V(100 + i)), EZP_OK);
	for (int i = 0; i < 3; i++)
		assert_int_equal(ezp__map_put(&m, b[i], V(200 + i)), EZP_OK);
	assert_int_equal(m.cap, 64);
	/* the restated hash is the map's: a[0] sits at its home */
	assert_int_equal(slot_of(&m, a[0]), 10);
	for (int i = 0; i < 5; i++)
		assert_int_equal(slot_of(&m, a[i]), 10 + i);
	for (int i = 0; i < 3; i++)
		assert_int_equal(slot_of(&m, b[i]), 15 + i);
	check_probe_invariant(&m);

	/* delete from the middle of the run: later keys shift back, none is lost */
	assert_ptr_equal(ezp__map_del(&m, a[2]), V(102));
	check_probe_invariant(&m);
	assert_null(ezp__map_get(&m, a[2]));
	for (int i = 0; i < 5; i++)
		if (i != 2)
			assert_ptr_equal(ezp__map_get(&m, a[i]), V(100 + i));
	for (int i = 0; i < 3; i++)
		assert_ptr_equal(ezp__map_get(&m, b[i]), V(200 + i));
	assert_int_equal(slot_of(&m, a[3]), 12);
	assert_int_equal(slot_of(&m, b[2]), 16);
	/* the key at its home slot goes: the rest of the run moves up */
	assert_ptr_equal(ezp__map_del(&m, a[0]), V(100));
	check_probe_invariant(&m);
	assert_int_equal(slot_of(&m, a[1]), 10);
	/* a b key may now sit at its own home */
	assert_ptr_equal(ezp__map_del(&m, a[1]), V(101));
	assert_ptr_equal(ezp__map_del(&m, a[3]), V(103));
	assert_ptr_equal(ezp__map_del(&m, a[4]), V(104));
	check_probe_invariant(&m);
	assert_int_equal(slot_of(&m, b[0]), 11);
	for (int i = 0; i < 3; i++)
		assert_ptr_equal(ezp__map_get(&m, b[i]), V(200 + i));

	/* a run that wraps from the last slot to the first */
	for (int i = 0; i < 4; i++)
		assert_int_equal(ezp__map_put(&m, w[i], V(300 + i)), EZP_OK);
	assert_int_equal(slot_of(&m, w[0]), 63);
	assert_int_equal(slot_of(&m, w[1]), 0);
	assert_int_equal(slot_of(&m, w[3]), 2);
	assert_ptr_equal(ezp__map_get(&m, w[3]), V(303));
	/* deleting across the wrap: the key at slot 0 moves back to 63 */
	assert_ptr_equal(ezp__map_del(&m, w[0]), V(300));
	check_probe_invariant(&m);
	assert_int_equal(slot_of(&m, w[1]), 63);
	assert_int_equal(slot_of(&m, w[3]), 1);
	for (int i = 1; i < 4; i++)
		assert_ptr_equal(ezp__map_get(&m, w[i]), V(300 + i));
	/* a missing key whose probe path crosses the wrap */
	uint64_t absent[1];
	keys_with_home(absent, 1, 63, 6, w[3]);
	assert_null(ezp__map_get(&m, absent[0]));
	assert_null(ezp__map_del(&m, absent[0]));
	ezp__map_free(&m);
}

/* ---- random operations against a reference model ---- */

static uint64_t rng_state;

static uint64_t rng(void)
{
	uint64_t x = rng_state;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return rng_state = x;
}

struct model {
	uint64_t *keys;
	void **vals;
	bool *present;
	size_t n_keys, live;
};

static void model_check(const struct ezp__map *m, const struct model *md, long op)
{
	for (size_t i = 0; i < md->n_keys; i++) {
		void *got = ezp__map_get(m, md->keys[i]);
		void *want = md->present[i] ? md->vals[i] : NULL;
		if (got != want)
			fail_msg("op %ld: key %llu maps to %p, model says %p", op,
				 (unsigned long long)md->keys[i], got, want);
	}
	if (m->n != md->live)
		fail_msg("op %ld: map holds %zu, model %zu", op, m->n, md->live);
	check_probe_invariant(m);
}

/* @ops random put/get/del over @md's keys, checked after each op and fully every so often. */
static void model_run(struct model *md, long ops, long check_every)
{
	struct ezp__map m = {0};

	for (long op = 0; op < ops; op++) {
		size_t i = (size_t)(rng() % md->n_keys);
		unsigned what = (unsigned)(rng() % 10);
		if (what < 4) {
			void *v = V(rng() | 1);
			assert_int_equal(ezp__map_put(&m, md->keys[i], v), EZP_OK);
			if (!md->present[i])
				md->live++;
			md->present[i] = true;
			md->vals[i] = v;
		} else if (what < 8) {
			void *got = ezp__map_del(&m, md->keys[i]);
			void *want = md->present[i] ? md->vals[i] : NULL;
			if (got != want)
				fail_msg("op %ld: del %llu returned %p, model %p", op,
					 (unsigned long long)md->keys[i], got, want);
			if (md->present[i])
				md->live--;
			md->present[i] = false;
		} else {
			void *got = ezp__map_get(&m, md->keys[i]);
			void *want = md->present[i] ? md->vals[i] : NULL;
			if (got != want)
				fail_msg("op %ld: get %llu returned %p, model %p", op,
					 (unsigned long long)md->keys[i], got, want);
		}
		if (op % check_every == 0)
			model_check(&m, md, op);
	}
	model_check(&m, md, ops);
	/* empty it through del: every entry comes back exactly once */
	for (size_t i = 0; i < md->n_keys; i++) {
		void *got = ezp__map_del(&m, md->keys[i]);
		assert_ptr_equal(got, md->present[i] ? md->vals[i] : NULL);
		md->present[i] = false;
	}
	assert_int_equal(m.n, 0);
	ezp__map_free(&m);
}

static void model_init(struct model *md, size_t n)
{
	md->n_keys = n;
	md->live = 0;
	md->keys = calloc(n, sizeof(*md->keys));
	md->vals = calloc(n, sizeof(*md->vals));
	md->present = calloc(n, sizeof(*md->present));
	assert_non_null(md->keys);
	assert_non_null(md->vals);
	assert_non_null(md->present);
}

static void model_free(struct model *md)
{
	free(md->keys);
	free(md->vals);
	free(md->present);
}

static void test_map_random_model(void **state)
{
	struct model md;

	(void)state;
	rng_state = 0x9e3779b97f4a7c15ULL;

	/* small dense keys: growth, reuse, ordinary collisions */
	model_init(&md, 600);
	for (size_t i = 0; i < md.n_keys; i++)
		md.keys[i] = i + 1;
	model_run(&md, 200000, 5000);
	model_free(&md);

	/* random 64-bit keys (hold ids look like this: high bits set) */
	model_init(&md, 400);
	for (size_t i = 0; i < md.n_keys; i++) {
		uint64_t k;
		do
			k = rng();
		while (!k);
		md.keys[i] = k;
	}
	model_run(&md, 100000, 5000);
	model_free(&md);

	/*
	 * adversarial: every key has the same home for every cap up to 4096, and
	 * that home is the last slot at cap 64, so every probe chain is long and
	 * wraps around; deletions must shift entries back across the wrap.
	 */
	model_init(&md, 60);
	keys_with_home(md.keys, md.n_keys, 4095, 12, 0);
	model_run(&md, 60000, 97);
	model_free(&md);

	/* two interleaved clusters one slot apart (homes 62 and 63 up to 4096) */
	model_init(&md, 60);
	keys_with_home(md.keys, 30, 4094, 12, 0);
	keys_with_home(md.keys + 30, 30, 4095, 12, md.keys[29]);
	model_run(&md, 60000, 97);
	model_free(&md);
}

/* ---- log.c --------------------------------------------------------------------------- */

static void log_defaults(void)
{
	ezp__log_setup(EZP_LOG_INFO, EZP__LOG_TEXT);
}

static int matches(const char *re, const char *text)
{
	regex_t r;
	int ok;

	assert_int_equal(regcomp(&r, re, REG_EXTENDED | REG_NEWLINE), 0);
	ok = regexec(&r, text, 0, NULL, 0) == 0;
	regfree(&r);
	return ok;
}

static int count_lines(const char *s)
{
	int n = 0;

	for (; *s; s++)
		n += *s == '\n';
	return n;
}

static void test_log_text(void **state)
{
	struct capture c;
	char *out;

	(void)state;
	ezp__log_setup(EZP_LOG_INFO, EZP__LOG_TEXT);
	capture_begin(&c);
	ezp__log(EZP_LOG_INFO, "unit", "hello %d %s", 42, "world");
	ezp__log(EZP_LOG_WARN, NULL, "no source");
	ezp__log(EZP_LOG_ERROR, "unit", "bad thing");
	ezp__log(EZP_LOG_DEBUG, "unit", "not shown at info");
	ezp__log(9, "unit", "above error is shown as error");
	out = capture_end(&c);
	log_defaults();
	if (count_lines(out) != 4)
		fail_msg("expected 4 lines, got:\n%s", out);
	if (!matches("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z info  "
		     "\\[unit\\] hello 42 world$",
		     out))
		fail_msg("info line not in the text format:\n%s", out);
	if (!matches("Z warn  \\[core\\] no source$", out))
		fail_msg("a NULL source is not shown as core:\n%s", out);
	if (!matches("Z error \\[unit\\] bad thing$", out))
		fail_msg("error line:\n%s", out);
	if (!matches("Z error \\[unit\\] above error is shown as error$", out))
		fail_msg("a level above error is not clamped:\n%s", out);
	assert_null(strstr(out, "not shown"));
	free(out);
}

static void test_log_levels(void **state)
{
	struct capture c;
	char *out;

	(void)state;
	ezp__log_setup(EZP_LOG_WARN, EZP__LOG_TEXT);
	assert_false(ezp__log_enabled(EZP_LOG_DEBUG));
	assert_false(ezp__log_enabled(EZP_LOG_INFO));
	assert_true(ezp__log_enabled(EZP_LOG_WARN));
	assert_true(ezp__log_enabled(EZP_LOG_ERROR));
	capture_begin(&c);
	ezp__log(EZP_LOG_DEBUG, "t", "d");
	ezp__log(EZP_LOG_INFO, "t", "i");
	ezp__log(EZP_LOG_WARN, "t", "w");
	ezp__log(EZP_LOG_ERROR, "t", "e");
	/* an out-of-range level leaves the level as it was */
	ezp__log_setup(42, EZP__LOG_TEXT);
	ezp__log(EZP_LOG_INFO, "t", "still filtered");
	ezp__log_setup(-1, EZP__LOG_TEXT);
	ezp__log(EZP_LOG_INFO, "t", "still filtered");
	ezp__log(-5, "t", "below debug: never shown");
	ezp__log_setup(EZP_LOG_DEBUG, EZP__LOG_TEXT);
	assert_true(ezp__log_enabled(EZP_LOG_DEBUG));
	ezp__log(EZP_LOG_DEBUG, "t", "debug now");
	out = capture_end(&c);
	log_defaults();
	if (count_lines(out) != 3 || !strstr(out, "[t] w\n") || !strstr(out, "[t] e\n") ||
	    !strstr(out, "debug [t] debug now\n") || strstr(out, "filtered") ||
	    strstr(out, "never"))
		fail_msg("level filtering wrong:\n%s", out);
	free(out);
}

static void test_log_json(void **state)
{
	struct capture c;
	char *out;

	(void)state;
	ezp__log_setup(EZP_LOG_DEBUG, EZP__LOG_JSON);
	capture_begin(&c);
	ezp__log(EZP_LOG_INFO, "src\"x", "say \"hi\" \\ back\nnew\tline\x01 caf\xc3\xa9");
	ezp__log(EZP_LOG_DEBUG, NULL, "plain");
	out = capture_end(&c);
	log_defaults();
	if (count_lines(out) != 2)
		fail_msg("expected 2 JSON lines:\n%s", out);
	if (!matches(
		"^\\{\"ts\":\"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z\","
		"\"level\":\"info\",",
		out))
		fail_msg("JSON head wrong:\n%s", out);
	if (!strstr(out, "\"source\":\"src\\\"x\","))
		fail_msg("source not escaped:\n%s", out);
	if (!strstr(out, "\"msg\":\"say \\\"hi\\\" \\\\ back\\u000anew\\u0009line\\u0001 "
			 "caf\xc3\xa9\"}\n"))
		fail_msg("message not escaped as JSON:\n%s", out);
	if (!strstr(out, "\"level\":\"debug\",\"source\":\"core\",\"msg\":\"plain\"}\n"))
		fail_msg("second line:\n%s", out);
	free(out);
}

static void test_log_long_lines(void **state)
{
	char *big = malloc(5000), *ctl = malloc(1500);
	struct capture c;
	char *out, *nl;

	(void)state;
	assert_non_null(big);
	assert_non_null(ctl);
	memset(big, 'x', 4999);
	big[4999] = 0;
	memset(ctl, '\n', 1499);
	ctl[1499] = 0;

	/* text: the message is cut at 1023 bytes, the line still ends */
	ezp__log_setup(EZP_LOG_INFO, EZP__LOG_TEXT);
	capture_begin(&c);
	ezp__log(EZP_LOG_INFO, "long", "%s", big);
	out = capture_end(&c);
	nl = strchr(out, '\n');
	assert_non_null(nl);
	assert_int_equal(nl[1], 0);
	assert_non_null(strstr(out, "[long] "));
	assert_int_equal(strlen(strstr(out, "[long] ") + 7), 1023 + 1);
	free(out);

	/* JSON: a message of control characters escapes to six bytes each, cut, still valid */
	ezp__log_setup(EZP_LOG_INFO, EZP__LOG_JSON);
	capture_begin(&c);
	ezp__log(EZP_LOG_INFO, "long", "%s", ctl);
	ezp__log(EZP_LOG_INFO, "long", "%s", big);
	out = capture_end(&c);
	log_defaults();
	if (count_lines(out) != 2)
		fail_msg("long JSON lines: %d lines", count_lines(out));
	for (char *line = out; *line;) {
		char *end = strchr(line, '\n');
		assert_non_null(end);
		*end = 0;
		if (strncmp(line, "{\"ts\":", 6) || strcmp(end - 2, "\"}"))
			fail_msg("long JSON line is not closed: ...%s", end - 20);
		/* an escape sequence is never cut in half */
		char *msg = strstr(line, "\"msg\":\"") + 7;
		for (char *p = msg; p < end - 2; p++) {
			if (*p == '\\') {
				if (p[1] != 'u' || !matches("^[0-9a-f]{4}", p + 2))
					fail_msg("bad escape at offset %ld", (long)(p - msg));
				p += 5;
			}
		}
		line = end + 1;
	}
	free(out);
	free(big);
	free(ctl);
}

/* A very long source name: the line is cut at the line buffer (2304 bytes). */
static void test_log_long_source(void **state)
{
	char *src = malloc(3000);
	struct capture c;
	char *out;

	(void)state;
	assert_non_null(src);
	memset(src, 's', 2999);
	src[2999] = 0;
	ezp__log_setup(EZP_LOG_INFO, EZP__LOG_TEXT);
	capture_begin(&c);
	ezp__log(EZP_LOG_INFO, src, "message");
	out = capture_end(&c);
	log_defaults();
	assert_int_equal(strlen(out), 2303);
	assert_non_null(strstr(out, " info  [sss"));
	assert_null(strstr(out, "message")); /* cut before the message */
	free(out);
	free(src);
}

/*
 * log.c ezp__vlog(): a text line longer than the 2304-byte buffer is cut
 * to 2303 bytes and loses its '\n', so it runs into the next line. (Only a
 * very long source name can do it: the message is capped at 1023 bytes.)
 */
static void test_bug_log_cut_line_loses_newline(void **state)
{
	char *src = malloc(3000);
	struct capture c;
	char *out;

	(void)state;
	assert_non_null(src);
	memset(src, 's', 2999);
	src[2999] = 0;
	ezp__log_setup(EZP_LOG_INFO, EZP__LOG_TEXT);
	capture_begin(&c);
	ezp__log(EZP_LOG_INFO, src, "first");
	ezp__log(EZP_LOG_INFO, "next", "second");
	out = capture_end(&c);
	log_defaults();
	free(src);
	int lines = count_lines(out);
	free(out);
	if (lines != 2)
		fail_msg("two log calls wrote %d complete line(s)", lines);
}

#define LOG_THREADS 8
#define LOG_LINES 300

static void *log_writer(void *arg)
{
	int id = (int)(intptr_t)arg;
	char pad[200];

	memset(pad, 'a' + id, sizeof(pad) - 1);
	pad[sizeof(pad) - 1] = 0;
	for (int i = 0; i < LOG_LINES; i++)
		ezp__log(EZP_LOG_WARN, "thr", "t%d n%04d %s end", id, i, pad);
	return NULL;
}

/* Lines from many threads never interleave: one write(2) per line. */
static void test_log_concurrent_lines(void **state)
{
	pthread_t th[LOG_THREADS];
	int seen[LOG_THREADS] = {0};
	struct capture c;
	char *out, *line;

	(void)state;
	ezp__log_setup(EZP_LOG_INFO, EZP__LOG_TEXT);
	capture_begin(&c);
	for (int i = 0; i < LOG_THREADS; i++)
		assert_int_equal(pthread_create(&th[i], NULL, log_writer, (void *)(intptr_t)i), 0);
	for (int i = 0; i < LOG_THREADS; i++)
		pthread_join(th[i], NULL);
	out = capture_end(&c);
	log_defaults();
	assert_int_equal(count_lines(out), LOG_THREADS * LOG_LINES);
	line = out;
	while (*line) {
		char *end = strchr(line, '\n');
		int id, n;
		char body[256];
		*end = 0;
		char *msg = strstr(line, "[thr] ");
		if (!msg || sscanf(msg, "[thr] t%d n%d %255s end", &id, &n, body) != 3 || id < 0 ||
		    id >= LOG_THREADS || strlen(body) != 199 ||
		    strspn(body, (char[]){(char)('a' + id), 0}) != 199 || strcmp(end - 4, " end"))
			fail_msg("mangled line: %s", line);
		if (n != seen[id]) /* each thread's lines stay in its order */
			fail_msg("thread %d: line %d after %d", id, n, seen[id] - 1);
		seen[id]++;
		line = end + 1;
	}
	free(out);
}

/* ---- status strings and small helpers --------------------------------------------------- */

static void test_status_strings(void **state)
{
	static const struct {
		int code;
		const char *text;
	} want[] = {
	    {EZP_OK, "ok"},
	    {EZP_ERR, "error"},
	    {EZP_ERR_NOMEM, "out of memory"},
	    {EZP_ERR_INVAL, "invalid argument"},
	    {EZP_ERR_NOT_FOUND, "not found"},
	    {EZP_ERR_EXISTS, "already exists"},
	    {EZP_ERR_ABI, "plugin ABI mismatch"},
	    {EZP_ERR_IO, "I/O error"},
	    {EZP_ERR_LIMIT, "limit reached"},
	    {EZP_ERR_BUSY, "busy"},
	    {EZP_ERR_CONFIG, "invalid configuration"},
	    {EZP_ERR_UNSUPPORTED, "not supported"},
	    {EZP_ERR_CLOSED, "closed"},
	    {EZP_ERR_TIMEOUT, "timed out"},
	    {EZP_ERR_PERM, "not permitted"},
	    {EZP_ERR_AGAIN, "in progress"},
	    {EZP_ERR_PLUGIN, "plugin error"},
	};

	(void)state;
	for (size_t i = 0; i < EZP_ARRAY_LEN(want); i++) {
		assert_string_equal(ezp_status_str(want[i].code), want[i].text);
		assert_string_equal(ezp__status_str(want[i].code), want[i].text);
	}
	/* the codes are frozen */
	assert_int_equal(EZP_ERR_PLUGIN, -16);
	assert_string_equal(ezp_status_str(-17), "unknown status");
	assert_string_equal(ezp_status_str(1), "unknown status");
	assert_string_equal(ezp_status_str(-1000), "unknown status");
}

static void test_util_helpers(void **state)
{
	uint64_t a, b, wall;
	char *s;

	(void)state;
	assert_null(ezp__strdup(NULL));
	s = ezp__strdup("abc");
	assert_string_equal(s, "abc");
	free(s);
	wall = (uint64_t)time(NULL) * 1000000u;
	a = ezp__now_us();
	assert_true(a + 2000000u > wall && a < wall + 2000000u);
	a = ezp__mono_us();
	for (int i = 0; i < 1000; i++) {
		b = ezp__mono_us();
		assert_true(b >= a);
		a = b;
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_packet_new_and_copy),
	    cmocka_unit_test(test_packet_wrap_release),
	    cmocka_unit_test(test_packet_refs_across_threads),
	    cmocka_unit_test(test_packet_make_writable),
	    cmocka_unit_test(test_packet_resize),
	    cmocka_unit_test(test_map_basics),
	    cmocka_unit_test(test_map_collisions),
	    cmocka_unit_test(test_map_random_model),
	    cmocka_unit_test(test_log_text),
	    cmocka_unit_test(test_log_levels),
	    cmocka_unit_test(test_log_json),
	    cmocka_unit_test(test_log_long_lines),
	    cmocka_unit_test(test_log_long_source),
	    cmocka_unit_test(test_bug_log_cut_line_loses_newline),
	    cmocka_unit_test(test_log_concurrent_lines),
	    cmocka_unit_test(test_status_strings),
	    cmocka_unit_test(test_util_helpers),
	};

	if (getenv("EZP_TEST_FILTER"))
		cmocka_set_test_filter(getenv("EZP_TEST_FILTER"));
	return cmocka_run_group_tests(tests, NULL, NULL);
}
