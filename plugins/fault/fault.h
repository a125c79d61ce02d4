/*
 * fault.h - internal interface between the fault plugin's files.
 *
 * Objects and the threads they live on:
 *   struct fp_daemon - one per daemon (core ctx): the `ezp.fault` interface
 *       table and the pipelines with a fault stage. Freed by the plugin's fini
 *       once neither its service nor a pipeline uses it (fini runs each time a
 *       daemon that loaded the plugin is freed; other daemons may still run),
 *       so an interface pointer found by a script stays valid while its
 *       daemon lives.
 *   struct fp_pipe   - the faults of one pipeline (by name), shared by every
 *       instance of its `fault` stage on every worker and by every chain
 *       generation of the pipeline (a reload builds new instances that find
 *       the same record). Values are read and written under fp_lock; the
 *       workers see a change through an atomic generation number they
 *       compare at each packet, so the packet path takes no lock.
 *   struct fp_sess   - one session that an instance announced: its own
 *       faults (a session override) when it has any. Under fp_lock.
 *   struct fp_inst   - one filter instance (per worker), fault_filter.c.
 * fp_lock is taken by the interface functions, at session open and close,
 * and when a worker picks up a new generation: never per packet.
 */
#ifndef FAULT_H
#define FAULT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include <ezproxy/sdk.h>
#include <ezproxy/services.h>

#define FP_SRC "fault"

/* Limits of the values (YAML, API, Lua, CLI). */
#define FP_MAX_LATENCY_MS 300000u
#define FP_MAX_JITTER_MS 300000u
#define FP_MAX_FREEZE_MS 600000u
#define FP_DEF_FREEZE_MS 10000u
#define FP_MAX_BANDWIDTH 100000000000ull /* 100 Gbit/s */
/* The kind's HoldTimeoutMs default: more than latency + jitter + freeze can add. */
#define FP_HOLD_TIMEOUT_MS 3600000u
#define FP_HOLD_WINDOW 65536u

/* The kind's parameters (filled by the core from the YAML). */
struct fp_conf {
	int64_t latency_ms;
	int64_t jitter_ms;
	double loss;
	int64_t bandwidth_bps;
	int freeze;
	int blackhole;
	int64_t seed;
	int64_t freeze_max_ms;
	char *direction;
};

/* A set of faults with the time its freeze started (CLOCK_MONOTONIC us; 0 = none). */
struct fp_set {
	struct ezp_faults f;
	uint64_t freeze_since;
	uint64_t serial; /* changes whenever a new set is stored: restarts the random streams */
};

struct fp_stage_ref {
	struct ezp_stage *stage;
	unsigned n; /* instances of that stage */
};

struct fp_sess {
	uint64_t id;
	struct fp_pipe *pipe;
	int attached;	   /* instances that announced it */
	int own;	   /* has its own faults */
	struct fp_set set; /* its own faults when own */
	struct fp_sess *next, **pprev;
};

struct fp_pipe {
	char *name;
	struct fp_daemon *daemon;
	const struct ezp_core *core;
	int refs;	   /* instances (fp_lock) */
	struct fp_set set; /* the pipeline's faults */
	int yaml_applied;  /* yaml holds what the YAML last set */
	struct ezp_faults yaml;
	atomic_uint_fast64_t gen; /* bumped at each change of set or of a session's */
	atomic_int active;	  /* some fault is set (pipeline or a session) */
	struct fp_stage_ref *stages;
	size_t n_stages;
	struct fp_inst **insts; /* live instances, for the refresh jobs */
	size_t n_insts;
	struct fp_sess *sessions;
	struct fp_pipe *next;
};

struct fp_daemon {
	int refs; /* the running service + pipes (fp_lock) */
	struct ezp_core_ctx *ctx;
	const struct ezp_core *core;
	const struct ezp_control *control; /* for "no such pipeline/session" (may be NULL) */
	struct ezp_fault iface;
	struct fp_pipe *pipes;
	struct fp_daemon *next;
};

extern pthread_mutex_t fp_lock;

/* ---- fault_registry.c ---- */
/* Free the records no service or pipeline uses. Thread: control (fini). */
void fp_daemons_free(void);
/* A pipeline's record, ref'd by an instance; NULL on OOM. Thread: any. */
struct fp_pipe *fp_pipe_get(const struct ezp_core *core, const char *name);
void fp_pipe_put(struct fp_pipe *p);
/* Register / forget a live instance of @stage (wakes the stage while faults are set). */
int fp_pipe_attach(struct fp_pipe *p, struct fp_inst *in, struct ezp_stage *stage);
void fp_pipe_detach(struct fp_pipe *p, struct fp_inst *in, struct ezp_stage *stage);
/* The YAML of a new instance: applied when it differs from the values last applied. */
void fp_pipe_yaml(struct fp_pipe *p, const struct ezp_faults *f);
/* Announce a session on a worker; returns its record (attached) or NULL on OOM. */
struct fp_sess *fp_sess_open(struct fp_pipe *p, uint64_t id);
/* @closed: the session ended (not just a move to a new chain). */
void fp_sess_close(struct fp_sess *s, int closed);
/* The faults that apply to @s now (its own or the pipeline's). Takes fp_lock. */
void fp_sess_effective(struct fp_sess *s, struct fp_set *out, uint64_t *gen);
/* A freeze of @p or of one of its sessions may have passed its bound: clear it (logged). */
void fp_freeze_expired(struct fp_pipe *p);
/* Check and normalise a set of faults; the message names the field. */
int fp_faults_check(const struct ezp_faults *f, struct ezp_error *err);
int fp_faults_zero(const struct ezp_faults *f);
/* Does @d hold packets (latency, jitter, bandwidth or freeze)? */
int fp_dir_holds(const struct ezp_fault_dir *d);
uint64_t fp_mono_us(void);
extern const struct ezp_service_kind fp_service;

/* ---- fault_filter.c ---- */
/* Re-read the faults on @in's worker soon (a change). Thread: any (fp_lock held). */
void fp_inst_poke(struct fp_inst *in);
void fp_inst_ref(struct fp_inst *in);

#endif
