/*
 * capture.h - internal interface between the capture plugin's files.
 *
 *   pcapng.c     pcapng blocks and synthesised headers (pure; pcapng.h)
 *   capenc.c     the encoder: tap events -> pcapng blocks, with per-session
 *                TCP sequence numbers, handshakes, FINs and comments (pure:
 *                no core calls, so the unit test drives it directly)
 *   capfile.c    a file writer: one per (pipeline, File), its own thread,
 *                buffered writes, rotation, the registry the per-worker
 *                filter instances share
 *   capture.c    the `capture` filter kind, the `capture` service (the
 *                "ezp.capture" live streams) and the plugin descriptor
 *
 * Objects and threads: a struct cap_enc is used by one thread at a time
 * (a writer's thread, or the service loop for a live stream). A struct
 * cap_writer is shared by the filter instances of its pipeline (refcounted
 * under the registry lock); tap events reach it on the tap's delivery
 * worker and are queued for its thread.
 */
#ifndef EZP_CAPTURE_H
#define EZP_CAPTURE_H

#include <stddef.h>
#include <stdint.h>

#include <ezproxy/sdk.h>
#include <ezproxy/services.h>

#include "pcapng.h"

#define CAP_SRC "capture"
#define CAP_VERSION "0.1.0"

/* ---- the encoder (capenc.c) ---- */

enum cap_transport { CAP_T_UNKNOWN = 0, CAP_T_TCP = 1, CAP_T_UDP = 2 };

/* One tap event as the encoder reads it (borrowed for the call). */
struct cap_ev {
	int type; /* enum ezp_tap_event_type */
	uint64_t session_id;
	const char *pipeline; /* may be NULL */
	uint64_t ts_us;
	/* EZP_TAP_PACKET */
	int dir;	     /* enum ezp_direction */
	uint32_t flags;	     /* enum ezp_packet_flags */
	const uint8_t *data; /* the bytes delivered (or dropped) */
	size_t len;
	const uint8_t *orig; /* replaced: the bytes before; else NULL */
	size_t orig_len;
	struct ezp_addr src, dst;
	/* session events */
	int transport; /* enum cap_transport */
	struct ezp_addr client, server;
	uint64_t opened_us;
	int close_reason;	/* enum ezp_close_reason */
	const char *close_text; /* may be NULL */
};

/* Where the encoder's blocks go, one whole block per call. */
typedef void (*cap_sink_fn)(void *ud, const uint8_t *block, size_t len);
/* The transport of a session first seen by a packet (no opened event seen). */
typedef int (*cap_transport_fn)(void *ud, const char *pipeline, uint64_t session_id);

struct cap_enc;

/* @if_desc: the interface's description (the IDB). NULL on out of memory. */
struct cap_enc *cap_enc_new(cap_sink_fn sink, void *ud, const char *if_desc);
void cap_enc_free(struct cap_enc *e);
void cap_enc_set_transport_fn(struct cap_enc *e, cap_transport_fn fn, void *ud);
/* The Section Header and Interface Description blocks. */
void cap_enc_header(struct cap_enc *e);
/* After a new header mid-run (rotation): a synthesised handshake for every open TCP flow. */
void cap_enc_resync(struct cap_enc *e, uint64_t ts_us);
void cap_enc_event(struct cap_enc *e, const struct cap_ev *ev);
/* @n packets were lost before reaching the encoder: counted, and said in a statistics block. */
void cap_enc_lost(struct cap_enc *e, uint64_t n, uint64_t ts_us, const char *why);
/* A statistics block with the totals (packets received and lost), e.g. at the end. */
void cap_enc_stats(struct cap_enc *e, uint64_t ts_us, const char *comment);
uint64_t cap_enc_received(const struct cap_enc *e);
uint64_t cap_enc_lost_total(const struct cap_enc *e);
/* Sessions tracked now (for tests). */
size_t cap_enc_sessions(const struct cap_enc *e);

/* "to_server" / "to_client". */
const char *cap_dir_name(int dir);
int cap_transport_of(const char *name);

/* ---- file writers (capfile.c) ---- */

struct cap_conf {
	char *file;
	int64_t rotate_bytes;
	int64_t rotate_files;
};

struct cap_writer;

/*
 * The writer of @conf->file for @pipeline: made (the file opened, its
 * thread and tap started) or shared with a reference more. NULL with @err.
 * Thread: control.
 */
struct cap_writer *cap_writer_get(const struct ezp_core *core, const char *pipeline,
				  const struct cap_conf *conf, struct ezp_error *err);
/* Drop a reference; the last one stops the tap and lets the thread finish. Thread: any. */
void cap_writer_put(struct cap_writer *w);
/* A session of the writer's pipeline is known to run @transport (from a filter instance). */
void cap_writer_hint(struct cap_writer *w, int transport);
/* Wait for every writer thread to finish (plugin fini). */
void cap_writers_wait(void);

/* ---- the capture service (capture.c) ---- */

extern const struct ezp_service_kind cap_service_kind;

#endif
