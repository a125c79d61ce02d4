/*
 * util.c - clocks, strings and the u64 -> pointer map the core uses for
 * session and hold lookups. Thread: any (the map is not thread-safe: its
 * owner says which lock or worker guards it).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core.h"

uint64_t ezp__now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t ezp__mono_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

char *ezp__strdup(const char *s)
{
	return s ? strdup(s) : NULL;
}

static size_t map_slot(uint64_t key, size_t cap)
{
	key ^= key >> 33;
	key *= 0xff51afd7ed558ccdULL;
	key ^= key >> 33;
	return (size_t)key & (cap - 1);
}

static int map_grow(struct ezp__map *m)
{
	size_t cap = m->cap ? m->cap * 2 : 64;
	uint64_t *keys = calloc(cap, sizeof(*keys));
	void **vals = calloc(cap, sizeof(*vals));

	if (!keys || !vals) {
		free(keys);
		free(vals);
		return EZP_ERR_NOMEM;
	}
	for (size_t i = 0; i < m->cap; i++) {
		if (!m->keys[i])
			continue;
		size_t j = map_slot(m->keys[i], cap);
		while (keys[j])
			j = (j + 1) & (cap - 1);
		keys[j] = m->keys[i];
		vals[j] = m->vals[i];
	}
	free(m->keys);
	free(m->vals);
	m->keys = keys;
	m->vals = vals;
	m->cap = cap;
	return EZP_OK;
}

int ezp__map_put(struct ezp__map *m, uint64_t key, void *val)
{
	if ((m->n + 1) * 2 > m->cap && map_grow(m) != EZP_OK)
		return EZP_ERR_NOMEM;
	size_t j = map_slot(key, m->cap);
	while (m->keys[j] && m->keys[j] != key)
		j = (j + 1) & (m->cap - 1);
	if (!m->keys[j])
		m->n++;
	m->keys[j] = key;
	m->vals[j] = val;
	return EZP_OK;
}

void *ezp__map_get(const struct ezp__map *m, uint64_t key)
{
	if (!m->cap || !key)
		return NULL;
	size_t j = map_slot(key, m->cap);
	while (m->keys[j]) {
		if (m->keys[j] == key)
			return m->vals[j];
		j = (j + 1) & (m->cap - 1);
	}
	return NULL;
}

/* Backward-shift deletion keeps probe chains intact without tombstones. */
void *ezp__map_del(struct ezp__map *m, uint64_t key)
{
	if (!m->cap || !key)
		return NULL;
	size_t j = map_slot(key, m->cap);
	while (m->keys[j] && m->keys[j] != key)
		j = (j + 1) & (m->cap - 1);
	if (!m->keys[j])
		return NULL;
	void *val = m->vals[j];
	size_t i = j;
	for (;;) {
		i = (i + 1) & (m->cap - 1);
		if (!m->keys[i])
			break;
		size_t home = map_slot(m->keys[i], m->cap);
		/* move i into the hole at j if its home is not in (j, i] */
		if ((j < i) ? (home <= j || home > i) : (home <= j && home > i)) {
			m->keys[j] = m->keys[i];
			m->vals[j] = m->vals[i];
			j = i;
		}
	}
	m->keys[j] = 0;
	m->vals[j] = NULL;
	m->n--;
	return val;
}

void ezp__map_free(struct ezp__map *m)
{
	free(m->keys);
	free(m->vals);
	memset(m, 0, sizeof(*m));
}
