/*
 * capture.h - capturing stderr (the core's log lines) into a temporary file,
 * for the unit tests that check what was logged. Thread: the test's own.
 * Include after <cmocka.h> (it asserts with cmocka).
 */
#ifndef EZP_TEST_CAPTURE_H
#define EZP_TEST_CAPTURE_H

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* stderr goes to a temporary file between capture_begin and capture_end. */
struct capture {
	int saved;
	FILE *f;
};

static inline __attribute__((unused)) void capture_begin(struct capture *c)
{
	fflush(stderr);
	c->f = tmpfile();
	assert_non_null(c->f);
	c->saved = dup(STDERR_FILENO);
	assert_true(c->saved >= 0);
	assert_true(dup2(fileno(c->f), STDERR_FILENO) >= 0);
}

/* Puts stderr back; returns what was written (malloc'd, NUL-terminated). */
static inline __attribute__((unused)) char *capture_end(struct capture *c)
{
	long n;
	char *buf;

	fflush(stderr);
	dup2(c->saved, STDERR_FILENO);
	close(c->saved);
	n = lseek(fileno(c->f), 0, SEEK_END);
	assert_true(n >= 0);
	buf = calloc(1, (size_t)n + 1);
	assert_non_null(buf);
	assert_int_equal(pread(fileno(c->f), buf, (size_t)n, 0), n);
	fclose(c->f);
	return buf;
}

#endif
