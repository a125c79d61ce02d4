/*
 * log.c - log lines to stderr as text or JSON. Thread: any (one write(2)
 * per line, so lines from workers never interleave). Payload bytes are
 * never passed here above debug level: that rule is the callers'.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

static int log_level = EZP_LOG_INFO;
static int log_format = EZP__LOG_TEXT;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void ezp__log_setup(int level, int format)
{
	if (level >= EZP_LOG_DEBUG && level <= EZP_LOG_ERROR)
		log_level = level;
	log_format = format;
}

int ezp__log_enabled(int level)
{
	return level >= log_level;
}

/* JSON-escape @s into @out (always terminated). */
static size_t json_escape(char *out, size_t cap, const char *s)
{
	size_t n = 0;

	for (; *s && n + 7 < cap; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			out[n++] = '\\';
			out[n++] = (char)c;
		} else if (c < 0x20) {
			n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
		} else {
			out[n++] = (char)c;
		}
	}
	out[n] = '\0';
	return n;
}

void ezp__vlog(int level, const char *source, const char *fmt, va_list ap)
{
	char msg[1024], line[2304], ts[40];
	struct timespec now;
	struct tm tm;
	int n;

	if (level < log_level)
		return;
	if (level < EZP_LOG_DEBUG)
		level = EZP_LOG_DEBUG;
	if (level > EZP_LOG_ERROR)
		level = EZP_LOG_ERROR;
	vsnprintf(msg, sizeof(msg), fmt, ap);
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	if (log_format == EZP__LOG_JSON) {
		char esc[2048], src[128];
		json_escape(esc, sizeof(esc), msg);
		json_escape(src, sizeof(src), source ? source : "core");
		n = snprintf(line, sizeof(line),
			     "{\"ts\":\"%s.%06ldZ\",\"level\":\"%s\",\"source\":\"%s\",\"msg\":\"%s\"}\n",
			     ts, now.tv_nsec / 1000, level_names[level], src, esc);
	} else {
		n = snprintf(line, sizeof(line), "%s.%03ldZ %-5s [%s] %s\n", ts,
			     now.tv_nsec / 1000000, level_names[level], source ? source : "core",
			     msg);
	}
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(line)) { /* cut, but still one whole line */
		n = sizeof(line) - 1;
		line[n - 1] = '\n';
	}
	ssize_t w = write(STDERR_FILENO, line, (size_t)n);
	(void)w;
}

void ezp__log(int level, const char *source, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	ezp__vlog(level, source, fmt, ap);
	va_end(ap);
}

const char *ezp__status_str(int status)
{
	switch (status) {
	case EZP_OK: return "ok";
	case EZP_ERR: return "error";
	case EZP_ERR_NOMEM: return "out of memory";
	case EZP_ERR_INVAL: return "invalid argument";
	case EZP_ERR_NOT_FOUND: return "not found";
	case EZP_ERR_EXISTS: return "already exists";
	case EZP_ERR_ABI: return "plugin ABI mismatch";
	case EZP_ERR_IO: return "I/O error";
	case EZP_ERR_LIMIT: return "limit reached";
	case EZP_ERR_BUSY: return "busy";
	case EZP_ERR_CONFIG: return "invalid configuration";
	case EZP_ERR_UNSUPPORTED: return "not supported";
	case EZP_ERR_CLOSED: return "closed";
	case EZP_ERR_TIMEOUT: return "timed out";
	case EZP_ERR_PERM: return "not permitted";
	case EZP_ERR_AGAIN: return "in progress";
	case EZP_ERR_PLUGIN: return "plugin error";
	}
	return "unknown status";
}

const char *ezp_status_str(int status)
{
	return ezp__status_str(status);
}
