/*
 * net.h - reading from and writing to the unit tests' loopback sockets with
 * deadlines: recv with a deadline, expected datagrams and streams. Thread:
 * the test's own (recv_wait also on helper threads).
 * Include after <cmocka.h> and wait.h, once WAIT_MS (the deadline of every
 * ordinary wait, in ms) is defined.
 */
#ifndef EZP_TEST_NET_H
#define EZP_TEST_NET_H

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "wait.h"

#ifndef WAIT_MS
#error "define WAIT_MS before including net.h"
#endif

/*
 * One recv with a deadline, the sender's address in *@from unless it is NULL:
 * > 0 bytes, 0 end of stream (or an empty datagram), -1 error (errno), -2 nothing came.
 */
static inline __attribute__((unused)) ssize_t recv_wait_from(int fd, void *buf, size_t len, int ms,
							     struct sockaddr_in *from)
{
	uint64_t end = mono_ms() + (uint64_t)ms;

	for (;;) {
		struct pollfd p = {fd, POLLIN, 0};
		int64_t left = (int64_t)(end - mono_ms());
		socklen_t fl = sizeof(*from);
		int r = poll(&p, 1, left > 0 ? (int)left : 0);

		if (r < 0 && errno == EINTR)
			continue;
		if (r == 0)
			return -2;
		if (r < 0)
			return -1;
		ssize_t n = from
				? recvfrom(fd, buf, len, MSG_DONTWAIT, (struct sockaddr *)from, &fl)
				: recv(fd, buf, len, MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		return n;
	}
}

static inline __attribute__((unused)) ssize_t recv_wait(int fd, void *buf, size_t len, int ms)
{
	return recv_wait_from(fd, buf, len, ms, NULL);
}

static inline __attribute__((unused)) void send_dgram(int fd, const char *text)
{
	assert_int_equal(send(fd, text, strlen(text), 0), (ssize_t)strlen(text));
}

/* The next datagram on @fd, within WAIT_MS, must be exactly @want (its sender in *@from). */
static inline __attribute__((unused)) void
expect_dgram_from(int fd, const char *want, struct sockaddr_in *from, const char *what)
{
	char buf[2048];
	ssize_t n = recv_wait_from(fd, buf, sizeof(buf) - 1, WAIT_MS, from);

	if (n < 0) {
		fail_msg("%s: expected datagram '%s', got %s", what, want,
			 n == -2 ? "nothing before the deadline" : strerror(errno));
		return;
	}
	buf[n] = 0;
	if ((size_t)n != strlen(want) || memcmp(buf, want, (size_t)n))
		fail_msg("%s: expected datagram '%s', got '%s' (%zd bytes)", what, want, buf, n);
}

static inline __attribute__((unused)) void expect_dgram(int fd, const char *want, const char *what)
{
	expect_dgram_from(fd, want, NULL, what);
}

/* Exactly @want (shorter than 4096 bytes) from a stream, within WAIT_MS. */
static inline __attribute__((unused)) void expect_stream(int fd, const char *want, const char *what)
{
	size_t n = strlen(want), got = 0;
	char buf[4096];
	uint64_t end = mono_ms() + WAIT_MS;

	assert_true(n < sizeof(buf));
	while (got < n) {
		int64_t left = (int64_t)(end - mono_ms());
		ssize_t r = recv_wait(fd, buf + got, n - got, left > 0 ? (int)left : 0);
		if (r <= 0) {
			buf[got] = 0;
			fail_msg("%s: expected '%s', got '%s' then %s", what, want, buf,
				 r == -2  ? "nothing"
				 : r == 0 ? "end of stream"
					  : strerror(errno));
		}
		got += (size_t)r;
	}
	if (memcmp(buf, want, n)) {
		buf[n] = 0;
		fail_msg("%s: expected '%s', got '%s'", what, want, buf);
	}
}

#endif
