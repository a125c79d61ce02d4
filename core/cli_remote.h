/*
 * cli_remote.h - the CLI commands that talk to a running daemon through its
 * HTTP API (`ezproxy watch` in cli_watch.c, `ezproxy key create` and the
 * --api/-c/--key resolution in cli_remote.c), and the tiny HTTP (cli_http.c)
 * and WebSocket (cli_ws.c) client they share. Linked into the executable
 * only, never into libezproxy.
 * Thread: the CLI process's main thread (single-threaded).
 */
#ifndef EZP_CORE_CLI_REMOTE_H
#define EZP_CORE_CLI_REMOTE_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include <limits.h>

/* ---- the commands; each returns the process exit code ---- */

int ezp__cli_watch(int argc, char **argv); /* cli_watch.c */
int ezp__cli_key(int argc, char **argv);   /* cli_remote.c */
int ezp__cli_fault(int argc, char **argv); /* cli_fault.c */

/* ---- the client (cli_http.c, cli_ws.c) ---- */

/* Where the API is: parsed from an http:// URL. */
struct ezp__cli_api {
	char url[320];	    /* as the user sees it, "http://127.0.0.1:8080" */
	char host[256];	    /* "127.0.0.1", "::1" (no brackets), "localhost" */
	char hostport[272]; /* the Host header: "127.0.0.1:8080", "[::1]:8080" */
	char port[8];
	const char *key; /* sent as Authorization: Bearer, or NULL */
};

/* An HTTP answer; body malloc'd and NUL-terminated (free with ezp__cli_reply_clear). */
struct ezp__cli_reply {
	unsigned status;
	char *body;
	size_t body_len;
};

/* Set by the SIGINT/SIGTERM handler that ezp__cli_signals_install() sets up. */
extern volatile sig_atomic_t ezp__cli_stop;

/*
 * Parse @url ("http://HOST:PORT[/]", "HOST:PORT" meaning http). Returns 0,
 * or 2 with a one-line message in @msg (https:// is refused: the CLI does
 * not speak TLS yet).
 */
int ezp__cli_api_parse(const char *url, struct ezp__cli_api *api, char *msg, size_t msg_len);

/*
 * Block SIGINT and SIGTERM and catch them: every wait of the client then
 * lets them in, sets ezp__cli_stop and returns. SIGPIPE is ignored.
 */
void ezp__cli_signals_install(void);

/*
 * One request/answer on its own connection (HTTP/1.0, see
 * docs/decisions/0002-cli-http-client.md). @body (JSON) may be NULL.
 * Returns 0 with *@out filled (any status), or 1 with a one-line message
 * in @msg (cannot connect, timeout, malformed answer).
 */
int ezp__cli_http(const struct ezp__cli_api *api, const char *method, const char *path,
		  const char *body, struct ezp__cli_reply *out, char *msg, size_t msg_len);
void ezp__cli_reply_clear(struct ezp__cli_reply *r);

/* How a WebSocket ended (ezp__cli_ws_run). */
enum ezp__cli_ws_end {
	EZP__CLI_WS_STOPPED, /* SIGINT/SIGTERM: we closed it */
	EZP__CLI_WS_CLOSED,  /* the daemon sent a close frame */
	EZP__CLI_WS_LOST,    /* the connection broke without a close frame */
	EZP__CLI_WS_HANDLER, /* the message handler asked to stop (it printed why) */
};

struct ezp__cli_ws_result {
	enum ezp__cli_ws_end end;
	unsigned close_code; /* EZP__CLI_WS_CLOSED: the daemon's status code (0 none) */
	char reason[128];    /* its close reason, or why the connection was lost */
};

/*
 * Open a WebSocket on @path (GET with the upgrade headers; the answer's
 * Sec-WebSocket-Accept is checked) and call @on_text for every text
 * message until the socket closes, @on_text returns non-zero or a signal
 * arrives (then a close frame 1000 is sent). @msg: (borrowed) the message,
 * NUL-terminated. Returns 0 with *@res filled once the socket was open;
 * 1 with *@refusal filled when the daemon answered the upgrade with
 * another status (its body is the error); 1 with @msg set when it could
 * not connect or the handshake was malformed.
 */
int ezp__cli_ws_run(const struct ezp__cli_api *api, const char *path,
		    int (*on_text)(void *arg, const char *text, size_t len), void *arg,
		    struct ezp__cli_ws_result *res, struct ezp__cli_reply *refusal, char *msg,
		    size_t msg_len);

/* ---- between cli_http.c and cli_ws.c ---- */

/* A growing receive buffer (data NUL-terminated when not NULL). */
struct ezp__cli_rbuf {
	char *data;
	size_t len, cap;
};

int64_t ezp__cli_now_ms(void); /* CLOCK_MONOTONIC */
void ezp__cli_say(char *msg, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The signal mask for ppoll while waiting (NULL before ezp__cli_signals_install). */
const sigset_t *ezp__cli_wait_mask(void);
/* Wait for @events on @fd until @deadline (ms). 1 ready, 0 timed out, -1 stopped by a signal. */
int ezp__cli_wait_fd(int fd, short events, int64_t deadline);
/* Connect within 5 s. The fd (non-blocking), or -1 with the "cannot reach" message. */
int ezp__cli_connect(const struct ezp__cli_api *api, char *msg, size_t msg_len);
/* Each 0 on success, -1 with @msg set. */
int ezp__cli_send_all(int fd, const char *buf, size_t len, int64_t deadline, const char *url,
		      char *msg, size_t msg_len);
/* Read the status line and headers (up to the blank line, at most 16 KiB) into @b. */
int ezp__cli_read_head(int fd, struct ezp__cli_rbuf *b, size_t *head_len, unsigned *status,
		       int64_t deadline, const char *url, char *msg, size_t msg_len);
/* The value of header @name in the head @h; 1 found, 0 not. */
int ezp__cli_head_value(const char *h, const char *name, char *out, size_t out_len);
/* The body after the head: Content-Length bytes, or (@to_eof) up to EOF; never chunked. */
int ezp__cli_read_body(int fd, struct ezp__cli_rbuf *b, size_t head_len, int to_eof,
		       int64_t deadline, const char *url, size_t *body_len, char *msg,
		       size_t msg_len);
/* Move the body of @b into @out (@b loses its data). */
void ezp__cli_take_body(struct ezp__cli_rbuf *b, size_t head_len, size_t body_len, unsigned status,
			struct ezp__cli_reply *out);
/* 0 (with @msg set) when @key has bytes that cannot go in a header line. */
int ezp__cli_key_ok(const char *key, char *msg, size_t msg_len);

/* ---- finding the daemon and the key (cli_remote.c) ---- */

struct ezp__cli_remote {
	const char *api_opt, *key_opt, *config; /* --api, --key, -c (NULL: not given) */
	struct ezp__cli_api api;		/* filled by ezp__cli_remote_resolve */
	char *key_buf;				/* the key read from a file */
	const char *key_from;			/* "--key", "$EZP_KEY" or the file's path */
	char key_note[PATH_MAX + 160];		/* the key file, or why there is no key */
	char state_dir[PATH_MAX];
};

/*
 * Fill @r->api: the URL from --api, else -c FILE's Api.Listen, else
 * http://127.0.0.1:8080; the key from --key, else $EZP_KEY, else
 * StateDir/admin.key (StateDir from -c FILE or the default), else none.
 * Returns 0, or the exit code after printing why on stderr.
 */
int ezp__cli_remote_resolve(struct ezp__cli_remote *r);
void ezp__cli_remote_clear(struct ezp__cli_remote *r);
/*
 * Take getopt_long's @c and @arg into @r: 1 for 'a' (--api URL), 'k'
 * (--key KEY) or 'c' (-c/--config FILE), else 0 (another option).
 */
int ezp__cli_remote_opt(struct ezp__cli_remote *r, int c, const char *arg);
/* Replace control characters in @s (text from the daemon, bound for a terminal) with '?'. */
void ezp__cli_scrub(char *s);
/*
 * Print on one line why the API refused (@rep: its status and v3
 * {"error": {code, message}} body) and what to do; @perm_needed names the
 * permission a 403 lacks. Returns the exit code (1).
 */
int ezp__cli_api_refused(const struct ezp__cli_remote *r, const struct ezp__cli_reply *rep,
			 const char *perm_needed);

#endif
