/*
 * wait.h - clocks, deadlines and condvar waits the unit tests share. Thread: any.
 */
#ifndef EZP_TEST_WAIT_H
#define EZP_TEST_WAIT_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

static inline __attribute__((unused)) uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* An absolute CLOCK_MONOTONIC time @ms from now (condvars use that clock). */
static inline __attribute__((unused)) struct timespec deadline(int ms)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	return ts;
}

static inline __attribute__((unused)) void sync_init(pthread_mutex_t *mu, pthread_cond_t *cv)
{
	pthread_condattr_t ca;

	pthread_mutex_init(mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(cv, &ca);
	pthread_condattr_destroy(&ca);
}

static inline __attribute__((unused)) void sync_fini(pthread_mutex_t *mu, pthread_cond_t *cv)
{
	pthread_cond_destroy(cv);
	pthread_mutex_destroy(mu);
}

/* Wait until *@val >= @want (guarded by @mu). Returns 1, or 0 at the deadline. */
static inline __attribute__((unused)) int wait_at_least(pthread_mutex_t *mu, pthread_cond_t *cv, const int *val, int want, int ms)
{
	struct timespec end = deadline(ms);
	int ok;

	pthread_mutex_lock(mu);
	while (*val < want && pthread_cond_timedwait(cv, mu, &end) != ETIMEDOUT)
		;
	ok = *val >= want;
	pthread_mutex_unlock(mu);
	return ok;
}

/* Between two looks at a condition that has no event to wait on. */
static inline __attribute__((unused)) void poll_pause(void)
{
	struct timespec ts = {0, 2 * 1000000L};

	nanosleep(&ts, NULL);
}

#endif
