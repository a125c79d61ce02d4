/*
 * ezproxy/ezproxy.h - embedding EzProxy: run a daemon inside a program.
 *
 * A daemon is created from YAML, started on its own worker threads, and
 * driven with the calls below from any thread that is not one of its
 * workers (the "control" side). Calls that act on a session or pipeline are
 * posted to the owning worker; the *_sync forms wait for the answer.
 * Outputs are written only on success; every _free(NULL) is a no-op.
 */
#ifndef EZPROXY_EZPROXY_H
#define EZPROXY_EZPROXY_H

#include <ezproxy/sdk.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ezp_daemon;   /* the same object as struct ezp_core_ctx */
struct ezp_claim;

struct ezp_daemon_opts {
	size_t struct_size;
	unsigned workers;          /* 0: from the config */
	const char *const *plugin_paths; /* extra folders to scan, NULL-terminated */
	int no_default_paths;      /* 1: do not scan the default folders */
	int log_level;             /* -1: from the config */
};

/* Create a daemon from YAML (@yaml NULL = the built-in default). Not started. */
int ezp_daemon_new(const char *yaml, const char *file, const struct ezp_daemon_opts *opts,
		   struct ezp_daemon **out, struct ezp_error *err);
/* Listen on every pipeline and start the workers. */
int ezp_daemon_start(struct ezp_daemon *d, struct ezp_error *err);
/* Close listeners and sessions (reason shutdown), stop workers. Idempotent. */
void ezp_daemon_stop(struct ezp_daemon *d);
void ezp_daemon_free(struct ezp_daemon *d);
/* The plugin services table of this daemon (for tests and embedders). */
const struct ezp_core *ezp_daemon_core(struct ezp_daemon *d);

/* Replace the config with new YAML, applied as a diff. Invalid: nothing changes. */
int ezp_daemon_reload(struct ezp_daemon *d, const char *yaml, const char *file,
		      struct ezp_error *err);
/* The resolved config as YAML (malloc'd; free with free()). */
char *ezp_daemon_config_dump(struct ezp_daemon *d);

/* The address a pipeline's listener is bound to (port 0 resolved). */
int ezp_pipeline_bound(struct ezp_daemon *d, const char *pipeline, struct ezp_addr *out);
/*
 * Swap a pipeline's `to` to @to_yaml (e.g. "tcp: {Connect: 127.0.0.1:9}").
 * New sessions use it at once. With @apply_to_existing each existing
 * session starts a server swap before this returns; the swaps complete
 * asynchronously (a session whose new server cannot be reached keeps its
 * old one and the failure is logged).
 */
int ezp_pipeline_swap_to(struct ezp_daemon *d, const char *pipeline, const char *to_yaml,
			 int apply_to_existing, struct ezp_error *err);
/* Replace the filter chain ("[]" or a YAML list of filter items). */
int ezp_pipeline_set_filters(struct ezp_daemon *d, const char *pipeline, const char *through_yaml,
			     struct ezp_error *err);
/* Rebind the listener (same or new From). Sessions continue unless @close_sessions. */
int ezp_pipeline_restart(struct ezp_daemon *d, const char *pipeline, int close_sessions,
			 struct ezp_error *err);

/* Summary of a session (a copy). */
struct ezp_session_summary {
	size_t struct_size;
	uint64_t id;
	char pipeline[72];
	char transport[16];
	struct ezp_addr client, server;
	unsigned n_clients;
	uint64_t opened_us, last_activity_us;
	uint64_t bytes[2], packets[2], dropped, replaced, injected;
	int bridged;               /* on the zero-copy fast path now */
	/* since ABI 1.0 as well (appended): */
	struct ezp_addr clients[8]; /* the first 8 client legs (client == clients[0]) */
	int closing;               /* the session is ending */
};
/* Live sessions (of @pipeline, or all when NULL). *out is malloc'd. */
int ezp_daemon_sessions(struct ezp_daemon *d, const char *pipeline,
			struct ezp_session_summary **out, size_t *n);

/* Closed sessions are reported to taps; the embedder's own record of them: */
int ezp_session_inject(struct ezp_daemon *d, uint64_t session_id, int dir, const void *data,
		       size_t len, struct ezp_error *err);
int ezp_session_close(struct ezp_daemon *d, uint64_t session_id, struct ezp_error *err);
/* Swap the server leg to @addr ("host:port"); waits for the connect. */
int ezp_session_swap_server(struct ezp_daemon *d, uint64_t session_id, const char *addr,
			    struct ezp_error *err);
/*
 * Swap (add = 0) or add (add = 1) a client leg. @dial 1: connect out to
 * @addr now; 0: the next client from @addr takes the leg (waits for it up
 * to @timeout_ms; UDP re-points at once).
 */
int ezp_session_swap_client(struct ezp_daemon *d, uint64_t session_id, const char *addr,
			    int dial, int add, unsigned timeout_ms, struct ezp_error *err);

/*
 * Claim an exclusive filter of @pipeline (the `callback` kind: key
 * "callback:NAME"; others: the kind name). A second claim fails with
 * EZP_ERR_BUSY "filter held by NAME". Releasing gives every packet the
 * holder held its default action at once.
 */
int ezp_filter_claim(struct ezp_daemon *d, const char *pipeline, const char *key,
		     const struct ezp_filter_holder *holder, struct ezp_claim **out,
		     struct ezp_error *err);
void ezp_claim_release(struct ezp_claim *claim);
/* Answer a held packet (any thread). */
int ezp_filter_answer(struct ezp_daemon *d, uint64_t hold_id, int verdict, const void *data,
		      size_t len);

/* Taps: see ezp_core.tap_subscribe. */
int ezp_tap_subscribe(struct ezp_daemon *d, const struct ezp_tap_opts *opts,
		      struct ezp_tap **out);
void ezp_tap_unsubscribe(struct ezp_tap *tap);

/* Run the daemon until SIGINT/SIGTERM (SIGHUP reloads @config_path). For `ezproxy run`. */
int ezp_daemon_run_signals(struct ezp_daemon *d, const char *config_path);

const char *ezp_status_str(int status);

#ifdef __cplusplus
}
#endif
#endif
