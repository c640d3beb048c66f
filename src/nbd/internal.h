/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* internal.h: types shared by the NBD core's files (private).
 *
 * The layers inside the core, each calling only down:
 *   sync.c           making handles, teardown, the blocking wrappers
 *   nbdc.c           the asynchronous calls: checks, splitting, emulation
 *   probe.c          control connections: LIST and INFO for many exports
 *   recover.c        one export's state machine on its home loop: connecting,
 *                    reconnecting with backoff, expiry, idle close, closing
 *   replay.c         writing the replay log again after a loss
 *   export.c         the handle: choosing connections, parking, the
 *                    connections' reports; log.c the replay log
 *   conn.c           one connection's state machine on one loop; the work
 *                    of its phases below it: connect.c (the socket),
 *                    negotiate.c (the negotiation), send.c and reply.c
 *                    (transmission), which report by return value
 *   handshake.c      negotiation over byte buffers (handshake-opt.c: the
 *                    option messages, GO/INFO replies)
 *   transport.c      bytes on a socket or a TLS session; tls.c the sessions
 *   cfg.c, errors.c  configuration, logging, error codes (used by all)
 * A lower file reaches an upper one only through function pointers: the
 * owner of a connection (struct nbdc_conn_owner), the export's state machine
 * (c->run), the requests' completions.  doc/ARCHITECTURE.md has the threads.
 */
#pragma once

#include <glib.h>
#include <stdint.h>

#include "nbdfs/loop.h"
#include "nbdfs/nbd.h"
#include "transport.h"

/* ---- What a negotiation produced ---- */

struct nbdc_neg {
	uint64_t size;
	uint16_t eflags;
	gboolean structured_replies;
	gboolean meta; /* base:allocation negotiated */
	uint32_t meta_id;
	uint32_t block_min, block_pref, block_max; /* 0 = not advertised */
	char *name;				   /* canonical or requested name; owned */
	char *description;			   /* owned, "" when none */
	const char *protocol;			   /* static */
	gboolean tls;
};

void nbdc_neg_clear(struct nbdc_neg *neg);

/* errors.c */
void nbdc_log(const struct nbdc_config *cfg, enum nbdc_log_level level, const char *fmt, ...)
	G_GNUC_PRINTF(3, 4);
const char *nbdc_cmd_name(uint16_t type);

/* cfg.c */
/* "nbd://host:port/export", "nbd+unix:///export?socket=path" or "fd N":
 * names the server in messages.  Caller frees. */
char *nbdc_cfg_display(const struct nbdc_config *cfg);
/* The loops of @cfg, or the process-wide default set (started on first use). */
LoopSet *nbdc_cfg_loops(const struct nbdc_config *cfg);

/* ---- Input buffer ---- */

/* Bytes received and not yet parsed: data[pos..end). */
struct nbdc_rbuf {
	uint8_t *data;
	size_t pos, end, cap;
};

/* ---- handshake.c ---- */

struct nbdc_hs;

struct nbdc_hs_goal {
	gboolean go;	       /* negotiate cfg->export_name for transmission */
	gboolean list;	       /* NBD_OPT_LIST */
	gboolean list_details; /* then NBD_OPT_INFO for each listed export */
	/* INFO for each name @probe_next returns (NULL: no more), results to
	 * @probe_result (@e borrowed for the call; NULL with @err). */
	const char *(*probe_next)(void *opaque);
	void (*probe_result)(void *opaque, const char *name, const struct nbdc_export *e,
			     const GError *err);
	void *opaque;
};

enum { NBDC_HS_WANT, NBDC_HS_START_TLS, NBDC_HS_DONE, NBDC_HS_FAILED };

/* @cfg and the goal's callbacks are borrowed for the negotiation; @display
 * (copied) names the server in errors. */
struct nbdc_hs *nbdc_hs_new(const struct nbdc_config *cfg, const struct nbdc_hs_goal *goal,
			    const char *display);
void nbdc_hs_free(struct nbdc_hs *h);
/* Checks the request before any byte goes out: NBDC_HS_WANT or FAILED. */
int nbdc_hs_check(struct nbdc_hs *h);
/* Consumes complete messages from @in, appends what to send to @out. */
int nbdc_hs_step(struct nbdc_hs *h, struct nbdc_rbuf *in, GByteArray *out);
/* The TLS handshake after STARTTLS succeeded: continue with nbdc_hs_step. */
void nbdc_hs_tls_done(struct nbdc_hs *h);
/* The server closed the stream (@midway: in the middle of a message). */
int nbdc_hs_eof(struct nbdc_hs *h, gboolean midway);
/* TRUE once ABORT was sent: however the server ends the stream now is fine. */
gboolean nbdc_hs_aborting(const struct nbdc_hs *h);
/* What the negotiation waits for (for timeout messages); static. */
const char *nbdc_hs_waiting_for(const struct nbdc_hs *h);
/* After NBDC_HS_FAILED: the error (caller frees). */
GError *nbdc_hs_take_error(struct nbdc_hs *h);
/* After NBDC_HS_DONE of a GO: what was negotiated (moves the strings). */
void nbdc_hs_result(struct nbdc_hs *h, struct nbdc_neg *neg);
/* After NBDC_HS_DONE of a LIST: the exports (caller unrefs). */
GPtrArray *nbdc_hs_take_list(struct nbdc_hs *h);
void nbdc_export_free(gpointer e);

/* ---- Requests ---- */

struct nbdc_op;
struct nbdc_conn;
struct nbdc_log_entry;

/* One NBD request on the wire (one piece of a possibly split operation).
 * It lives in exactly one list at a time: an export's parked queue, a
 * connection's inbox, send queue or in-flight list. */
struct nbdc_req {
	uint64_t cookie;
	uint16_t type, flags;
	uint64_t offset;
	uint32_t len;
	const struct iovec *iov; /* READ/WRITE data (borrowed from the caller) */
	int iovcnt;
	size_t iov_off;	  /* where this piece starts in @iov */
	struct iovec one; /* backing for @iov when we own the buffer */
	struct nbdc_op *op;
	int err;	   /* first error, negative errno */
	gboolean embedded; /* lives inside its op: not freed alone */
	/* reply state (reset before a resend) */
	gboolean bs_seen;     /* a block status chunk was delivered */
	guint content_chunks; /* OFFSET_DATA/HOLE chunks seen (DF: at most 1) */
	uint64_t covered;     /* structured READ: bytes received */
	GArray *ranges;	      /* sorted [start,end) pairs once out of order */
	/* timing */
	gint64 sent_us;		    /* fully written to the socket; 0 = not yet */
	gint64 wait_since_us;	    /* parked (waiting for a connection) since; 0 = never */
	struct nbdc_log_entry *log; /* a WRITE's copy for the replay log, once sent */
	guint64 flush_seq;	    /* FLUSH: the log sequence it covers */
	guint64 flush_gen;	    /* FLUSH: the c->write_gen it covers */
	gboolean internal;	    /* the core's own (replay, early flush) */
	/* block status: extents go to @extent; @bs_reached = where they ended */
	nbdc_extent_fn extent;
	void *extent_opaque;
	uint64_t bs_reached;
	/* called once when the request is finished (0 or -errno) */
	void (*complete)(struct nbdc_req *req, int err);
	uint8_t hdr[28]; /* the encoded request header */
	struct nbdc_req *prev, *next;
};

/* Clears the reply state of @req before it is sent again. */
void nbdc_req_reset(struct nbdc_req *req);

/* ---- Connections (conn.c; connect.c, negotiate.c, send.c, reply.c) ---- */

/* How a connection reports to its owner (the export of a data connection,
 * the probe of a control connection).  All run on the connection's loop. */
struct nbdc_conn_owner {
	/* GO finished: requests may be sent (data connections). */
	void (*ready)(struct nbdc_conn *conn, void *data);
	/* The connection ended before it was ready (@err set), or a control
	 * connection's negotiation finished (@err NULL).  The callee owns @err. */
	void (*finished)(struct nbdc_conn *conn, void *data, GError *err);
	/* A ready connection died (@err: -ENOTCONN, -EPROTO, -ETIMEDOUT) or
	 * was closed (@msg NULL).  @reqs: every request it still held, in
	 * order (linked by next), now owned by the callee. */
	void (*lost)(struct nbdc_conn *conn, void *data, struct nbdc_req *reqs, int err,
		     const char *msg);
	/* A request finished with @err (0 or -errno); runs the completion. */
	void (*done)(struct nbdc_conn *conn, void *data, struct nbdc_req *req, int err);
	/* A WRITE was fully sent: the owner may copy it for its replay log. */
	void (*sent)(struct nbdc_conn *conn, void *data, struct nbdc_req *req);
	/* The server answered NBD_ESHUTDOWN: the connection takes no new
	 * requests and closes once idle. */
	void (*shutting_down)(struct nbdc_conn *conn, void *data);
};

enum nbdc_conn_phase {
	NBDC_CP_NEW,
	NBDC_CP_RESOLVING,
	NBDC_CP_CONNECTING,
	NBDC_CP_HANDSHAKE,
	NBDC_CP_TLS,
	NBDC_CP_READY,
	NBDC_CP_CLOSING, /* DISC sent, waiting for EOF */
	NBDC_CP_DEAD,
};

/* A cookie table entry (cookie 0 = empty: cookies start at 1). */
struct nbdc_slot {
	uint64_t cookie;
	struct nbdc_req *req;
};

struct addrinfo;

struct nbdc_conn {
	gint refs;
	Loop *loop;
	const struct nbdc_config *cfg; /* borrowed from the owner */
	struct nbdc_tls_ctx *tls;      /* ref, or NULL */
	const struct nbdc_conn_owner *owner;
	void *owner_data;
	char *display;
	guint index;
	int fd_in;		    /* cfg->fd to use, taken at start; -1 */
	enum nbdc_conn_phase phase; /* loop only, read racily elsewhere */
	struct nbdc_transport *t;
	struct loop_watch w;
	struct loop_timer timer; /* handshake deadline or Unix retry, request
				  * timeout, goodbye */
	gint64 deadline;	 /* of the handshake; 0 = none */
	gboolean quiet;		 /* a close we asked for: no warning */
	GError *fail_error;	 /* the precise error of a failure, if known */

	/* resolving and connecting */
	struct addrinfo *ai_list, *ai_next;
	int connect_errno;

	/* negotiation */
	struct nbdc_hs *hs;
	struct nbdc_hs_goal goal;
	GByteArray *wbuf; /* negotiation bytes not yet sent: [wpos, len) */
	gsize wpos;
	struct nbdc_rbuf rb;
	struct nbdc_neg neg;

	/* sending (send.c; conn.c schedules it) */
	struct nbdc_req *txq_head, *txq_tail; /* queued, not fully sent */
	size_t tx_off;			      /* bytes of txq_head already written */
	guint tx_count;			      /* requests in the send queue */
	struct loop_defer tx_defer;
	gint64 stall_since; /* the socket stopped taking bytes; 0 = not */
	uint64_t next_cookie;
	/* in flight: fully sent, waiting for the reply */
	struct nbdc_slot *table; /* cookie -> request: open addressing */
	guint table_mask, table_used;
	struct nbdc_req *inf_head, *inf_tail; /* send order */
	guint inf_count;
	gint load; /* queued + in flight (atomic: for balancing) */
	gboolean disc_sent, shutdown_pending;
	gboolean draining; /* closing gracefully: no new requests */
	gboolean counted;  /* the owner counts it as ready (owner's field) */
	gboolean doomed;   /* the owner closes it: not usable (owner's lock) */

	/* receiving (reply.c) */
	int rx_state;
	struct nbdc_req *rx_req;
	union {
		uint8_t raw[20];
	} rx_hdr;
	uint16_t rx_flags, rx_type;
	uint32_t rx_len;
	uint64_t rx_rel, rx_left; /* payload destination and bytes left */
	uint8_t *buf;		  /* a chunk's payload (block status, errors) */
	size_t buf_size, buf_have;
	gboolean rx_drained; /* the last reply of a draining connection: DISC due */

	/* the inbox: requests handed over by other threads */
	GMutex inq_lock;
	struct nbdc_req *inq_head, *inq_tail;
	gboolean inq_posted, inq_closed;
	struct loop_task inq_task;
	struct loop_task kill_task;
	gboolean kill_posted;
};

/* A connection to the server of @cfg (borrowed, must outlive it) on @loop,
 * negotiating @goal.  @tls: the credentials when cfg->tls.  Not started. */
struct nbdc_conn *nbdc_conn_new(Loop *loop, const struct nbdc_config *cfg, struct nbdc_tls_ctx *tls,
				const struct nbdc_hs_goal *goal,
				const struct nbdc_conn_owner *owner, void *owner_data, int fd);
struct nbdc_conn *nbdc_conn_ref(struct nbdc_conn *conn);
/* The last reference frees (the connection must be dead or never started). */
void nbdc_conn_unref(struct nbdc_conn *conn);
/* Starts connecting; any thread (posts to the connection's loop). */
void nbdc_conn_start(struct nbdc_conn *conn);
/* Queues @req; any thread.  FALSE when the connection no longer takes
 * requests (then @req is untouched). */
gboolean nbdc_conn_submit(struct nbdc_conn *conn, struct nbdc_req *req);
/* How nbdc_conn_close ends a connection. */
enum nbdc_close_how {
	NBDC_CLOSE_GRACEFUL, /* NBD_CMD_DISC once the requests it holds finished */
	NBDC_CLOSE_ABANDON,  /* the requests it holds go to owner->lost with -ENOTCONN
			      * now; one that held none still says NBD_CMD_DISC */
	NBDC_CLOSE_DROP,     /* as ABANDON, and no NBD_CMD_DISC at all */
};
/* Ends the connection; any thread (posted, so it never runs inside the
 * caller's callbacks). */
void nbdc_conn_close(struct nbdc_conn *conn, enum nbdc_close_how how);
/* Ready and taking requests (read racily off the loop: a hint). */
gboolean nbdc_conn_is_ready(const struct nbdc_conn *conn);
/* Ready, its inbox open, and its owner not closing it (read under the
 * owner's lock): worth handing a request to. */
gboolean nbdc_conn_usable(const struct nbdc_conn *conn);

/* connect.c (loop only): the socket.  Results besides -errno (failed, with
 * *@msg): */
enum {
	NBDC_CONNECT_STARTED, /* a non-blocking connect is under way on conn->t */
	NBDC_CONNECT_UP,      /* connected (TCP options set) */
	NBDC_CONNECT_BUSY,    /* a Unix server's backlog is full: again at *@retry_at */
};
int nbdc_connect_unix(struct nbdc_conn *conn, gint64 *retry_at, char **msg);
/* The next address of conn->ai_next (TCP). */
int nbdc_connect_next(struct nbdc_conn *conn, char **msg);
/* EPOLLOUT on a connecting socket: UP, or on failure the next address. */
int nbdc_connect_finish(struct nbdc_conn *conn, char **msg);
/* A numeric host: conn->ai_list filled, TRUE; FALSE when it needs a lookup. */
gboolean nbdc_connect_numeric(struct nbdc_conn *conn);
/* @done(@opaque, res, gai) runs on conn->loop after getaddrinfo of the
 * connection's host ran on the pool; it may steal *res (else freed). */
typedef void (*nbdc_resolved_fn)(void *opaque, struct addrinfo **res, int gai);
void nbdc_resolve(struct nbdc_conn *conn, nbdc_resolved_fn done, void *opaque);
/* A lookup's result: the first address tried (takes *@res), or failed. */
int nbdc_connect_resolved(struct nbdc_conn *conn, struct addrinfo **res, int gai, char **msg);

/* negotiate.c (loop only): the negotiation.  Results besides -errno (failed:
 * *@msg, conn->fail_error or the handshake's error says why): */
enum {
	NBDC_NEG_WAIT,	/* wait for the events the phase asks for */
	NBDC_NEG_READY, /* GO done: transmission; nbdc_neg_finish */
	NBDC_NEG_DONE,	/* a control connection finished its goal */
};
/* Phase HANDSHAKE over conn->t: the handshake, its buffers. */
int nbdc_neg_start(struct nbdc_conn *conn);
/* Socket events in the phases HANDSHAKE and TLS. */
int nbdc_neg_io(struct nbdc_conn *conn, uint32_t events, char **msg);
/* After NBDC_NEG_READY: what was negotiated to conn->neg; the handshake freed. */
void nbdc_neg_finish(struct nbdc_conn *conn);

/* send.c (loop only) */
void nbdc_send_init(struct nbdc_conn *conn);
void nbdc_send_fini(struct nbdc_conn *conn);
/* Encodes @req into the send queue (the caller has it written). */
void nbdc_send_queue(struct nbdc_conn *conn, struct nbdc_req *req);
/* Writes what the socket takes; <0 when the connection must die (@msg set). */
int nbdc_send_flush(struct nbdc_conn *conn, char **msg);
struct nbdc_req *nbdc_table_lookup(const struct nbdc_conn *conn, uint64_t cookie);
/* A reply finished @req: out of the table and the in-flight list.  TRUE
 * when that left a draining connection with nothing to do (DISC is due). */
gboolean nbdc_send_retire(struct nbdc_conn *conn, struct nbdc_req *req);
/* Every request the connection holds, in order, unlinked (for death). */
struct nbdc_req *nbdc_send_take_all(struct nbdc_conn *conn);
/* Up to @max iovecs for [rel, rel + len) of @req's buffers; returns the
 * count (0 if @req's iov is shorter than the request: a caller bug). */
int nbdc_req_iov(const struct nbdc_req *req, uint64_t rel, uint64_t len, struct iovec *out,
		 int max);
/* The request timeout: <0 when a request (or the stalled socket) is overdue
 * (@msg set); else *@next_due is when the next one is, or 0. */
int nbdc_send_check_timeout(struct nbdc_conn *conn, gint64 *next_due, char **msg);
/* Sends NBD_CMD_DISC now (nothing may be in flight). */
void nbdc_send_disc(struct nbdc_conn *conn);

/* reply.c (loop only) */
/* Reads and handles what arrived: 0, NBDC_REPLY_DRAINED (the last request of
 * a draining connection finished: send DISC, then call again), or <0 when
 * the connection must die (@msg set, or NULL for a clean EOF after our DISC). */
#define NBDC_REPLY_DRAINED 1
int nbdc_reply_read(struct nbdc_conn *conn, char **msg);
/* Fills conn->rb with one read during negotiation: >0, 0 EOF, -EAGAIN, -errno. */
ssize_t nbdc_rb_fill(struct nbdc_conn *conn);
void nbdc_reply_fini(struct nbdc_conn *conn);

#define NBDC_RBUF_SIZE (68u * 1024) /* >= header + NBD_MAX_OPTION_REPLY */

/* ---- The handle: one export (export.c, recover.c, replay.c, log.c; nbdc.c, sync.c) ---- */

/* An acknowledged write (or zero) that no flush covered yet. */
struct nbdc_log_entry {
	struct nbdc_log_entry *next;
	uint64_t offset;
	uint32_t len;
	uint16_t type, flags; /* NBD_CMD_WRITE or NBD_CMD_WRITE_ZEROES, wire flags */
	guint64 seq;	      /* order of acknowledgement; 0 = not yet */
	uint8_t data[];	      /* WRITE payload */
};

enum nbdc_ex_state {
	NBDC_EX_IDLE,	    /* no connection, none needed yet */
	NBDC_EX_CONNECTING, /* the first connection (or the first after idle) */
	NBDC_EX_READY,
	NBDC_EX_RECOVERING, /* lost: reconnecting, replaying, then resending */
	NBDC_EX_FAILED,	    /* gave up until the next request */
	NBDC_EX_CLOSED,
};

struct nbdc {
	gint refs;		/* the user's, one per connection, one per task */
	struct nbdc_config cfg; /* copy; strings borrowed from the caller */
	LoopSet *loops;		/* borrowed: outlives the handle */
	Loop *home;		/* runs the export's timers and state changes */
	char *display;
	struct nbdc_tls_ctx *tls; /* ref, or NULL */
	struct nbdc_neg neg;	  /* what the export is; fixed once known */
	uint32_t max_request;
	guint max_conns;
	gboolean lazy;	 /* made by nbdc_open: on-demand connections */
	gboolean had_fd; /* cfg.fd given: one connection, never again */
	gboolean log_on; /* keep unflushed writes for replay */

	GMutex lock;	  /* the export lock: everything below */
	GPtrArray *conns; /* struct nbdc_conn * (refs): connecting or ready */
	guint nready, nopening;
	guint rr; /* round-robin start among connections */
	enum nbdc_ex_state state;
	gint closing;	  /* atomic: no new requests */
	gboolean dead;	  /* without reconnect: a connection died */
	gboolean starved; /* the last attempt found no file descriptor:
			   * the waiting requests fail now */
	char *error;	  /* why it died (or the last attempt failed) */
	struct nbdc_req *parked_head, *parked_tail;
	guint nparked;
	struct nbdc_req *throttled_head, *throttled_tail;
	Loop *prefer;	 /* where the next connection should live */
	gint64 lost_at;	 /* the outage began */
	gboolean warned; /* this outage was logged */
	guint attempts;
	gint64 backoff_us, next_attempt;
	guint holds;	/* nbdc_hold */
	gint in_flight; /* atomic: requests submitted, not finished */
	guint64 reconnects, lost_seq;
	gboolean ever_ready;
	/* the replay log */
	struct nbdc_log_entry *log_head, *log_tail;
	guint64 log_bytes, log_seq; /* payload bytes held; last sequence given */
	guint log_entries;
	gboolean log_flushing, replaying;
	gboolean replay_owed;		      /* this outage's replay is still to do */
	struct nbdc_log_entry *replay_cursor; /* next entry to write again */
	guint replay_pending;
	gboolean replay_failed;
	/* what a flush has to do: acknowledged writes, zeroes and trims of the
	 * user's (write_gen counts them) against those covered by the last flush
	 * that succeeded (flushed_gen); and the ones not finished yet */
	guint64 write_gen, flushed_gen;
	gint writes_busy; /* atomic: write/zero/trim calls not completed */

	/* the home loop's machinery (home loop only, but kick_posted) */
	loop_fn run; /* the state machine: recover.c's nbdc_export_run */
	struct loop_task kick_task;
	gboolean kick_posted; /* under @lock */
	struct loop_timer retry_timer, expiry_timer, idle_timer;
	gboolean idle_fired;
	guint next_index;
	/* nbdc_connect waiting for its connections */
	gboolean connecting_sync;
	guint sync_waiting;	      /* outcomes still due */
	struct completion *sync_wait; /* done when they are in */
	GError *sync_error;	      /* the first connection's failure */
	/* teardown */
	struct completion *gone; /* done when the last connection ended */
	gboolean gone_done;
	struct completion *drained; /* done when nothing is in flight */

	/* nbdc.c: ops and the zero buffer */
	GMutex op_lock;
	struct nbdc_op *op_cache;
	guint op_cached;
	gboolean op_cache_closed; /* nbdc_free: ops are freed, not kept */
	uint32_t zero_len;
	void *zero_buf;
};

/* nbdc.c: frees the cache of finished ops and keeps no more (nbdc_free). */
void nbdc_op_cache_close(Nbdc *c);

/* ---- inside the handle ----
 * Calls run down: recover.c (the state machine) -> replay.c (writing the log
 * again) -> export.c (the handle, its requests and connections) -> log.c.
 * export.c reaches the state machine only through c->run (nbdc_export_kick). */

#define NBDC_BACKOFF_MIN_US (50 * 1000)
#define NBDC_BACKOFF_MAX_US (2 * G_USEC_PER_SEC)
#define NBDC_LOG_FLUSH_AT (32u * 1024 * 1024)  /* unflushed bytes held: an early flush */
#define NBDC_LOG_FLUSH_ENTRIES 65536u	       /* ... or that many entries */
#define NBDC_LOG_MAX (96u * 1024 * 1024)       /* ... and new writes wait */
#define NBDC_GONE_WAIT_US (5 * G_USEC_PER_SEC) /* teardown waits for connections */

/* recover.c */
/* The state machine: one look at the export on its home loop (a loop_fn for
 * c->run; drops the reference nbdc_export_kick took). */
void nbdc_export_run(void *opaque);
void nbdc_export_hold(Nbdc *c, gboolean held);
void nbdc_export_health(Nbdc *c, struct nbdc_health *out);
/* Stops new requests; @wait_us > 0 (off a loop): waits that long for those in
 * flight first.  Then fails what is left with -ENOTCONN and closes every
 * connection (idle ones with NBD_CMD_DISC).  @wait_us 0 while another call
 * waits: ends that wait now. */
void nbdc_export_close(Nbdc *c, gint64 wait_us);
/* Waits (bounded) until every connection of a closed handle ended. */
void nbdc_export_wait_gone(Nbdc *c);

/* replay.c: home loop, no lock: writes the log again; TRUE while not finished. */
gboolean nbdc_replay_step(Nbdc *c);

/* export.c */
/* A handle for @cfg with no connection; @run is its state machine, posted
 * to the home loop by nbdc_export_kick. */
Nbdc *nbdc_export_new(const struct nbdc_config *cfg, gboolean lazy, loop_fn run, GError **error);
void nbdc_export_ref(Nbdc *c);
void nbdc_export_unref(Nbdc *c);
gboolean nbdc_export_alive(const Nbdc *c);
/* Asks the home loop to run the state machine (any thread, coalesced). */
void nbdc_export_kick(Nbdc *c);
/* Hands a prepared request to a connection, or parks it (any thread);
 * req->complete runs exactly once, never inside this call. */
void nbdc_export_submit(Nbdc *c, struct nbdc_req *req);
/* The same for a parked or throttled request going out again (already
 * counted in flight; the home loop it is released from is not where its
 * user is, so it opens no connection there). */
void nbdc_export_resubmit(Nbdc *c, struct nbdc_req *req);
/* Runs req->complete(req, err) soon on a loop (never inside the caller). */
void nbdc_complete_later(Nbdc *c, struct nbdc_req *req, int err);
/* Finishes @req (no lock held); the _all form a list linked by next. */
void nbdc_export_finish(Nbdc *c, struct nbdc_req *req, int err);
void nbdc_export_finish_all(Nbdc *c, struct nbdc_req *list, int err);
/* Nothing is in flight any more. */
void nbdc_export_idle_now(Nbdc *c);
/* A doubly linked list of requests (prev/next) between *head and *tail:
 * @req goes on the end. */
static inline void nbdc_req_append(struct nbdc_req **head, struct nbdc_req **tail,
				   struct nbdc_req *req)
{
	req->next = NULL;
	req->prev = *tail;
	if (*tail)
		(*tail)->next = req;
	else
		*head = req;
	*tail = req;
}

/* The same list: @req (on it) comes off, its prev and next cleared. */
static inline void nbdc_req_unlink(struct nbdc_req **head, struct nbdc_req **tail,
				   struct nbdc_req *req)
{
	if (req->prev)
		req->prev->next = req->next;
	else
		*head = req->next;
	if (req->next)
		req->next->prev = req->prev;
	else
		*tail = req->prev;
	req->prev = req->next = NULL;
}
/* Under c->lock: parks @req until a connection is ready. */
void nbdc_park_locked(Nbdc *c, struct nbdc_req *req);
gboolean nbdc_has_usable_locked(const Nbdc *c);
/* Under c->lock: a new data connection on @loop, registered (the caller
 * starts it after unlocking and drops the returned reference). */
struct nbdc_conn *nbdc_export_new_conn_locked(Nbdc *c, Loop *loop);
/* Under c->lock: an early flush to submit after unlocking, or NULL when one
 * runs or the log is empty. */
struct nbdc_req *nbdc_early_flush_locked(Nbdc *c);

/* log.c (under c->lock) */
void nbdc_log_free_all(Nbdc *c);
void nbdc_log_append(Nbdc *c, struct nbdc_log_entry *e);
/* A flush covering every entry up to @seq succeeded. */
void nbdc_log_trim(Nbdc *c, guint64 seq);
/* The writes in the log may be gone from the server for good. */
void nbdc_log_lose(Nbdc *c, const char *why);
