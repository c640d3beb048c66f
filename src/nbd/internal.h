/* internal.h: types shared by the NBD core's files (private). */
#pragma once

#include <glib.h>
#include <stdint.h>

#include "nbdfs/nbd.h"
#include "transport.h"

/* What one connection's negotiation produced. */
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
/* "nbd://host:port/export", "nbd+unix:///export?socket=path" or "fd N":
 * names the server in messages.  Caller frees. */
char *nbdc_cfg_display(const struct nbdc_config *cfg);

/* handshake.c: connects and negotiates the export of @cfg; returns a
 * transport in transmission phase (deadline cleared) and fills @neg. */
struct nbdc_transport *nbdc_hs_connect(const struct nbdc_config *cfg, struct nbdc_neg *neg,
				       GError **error);
GPtrArray *nbdc_hs_list(const struct nbdc_config *cfg, gboolean details, GError **error);

/* ---- Transmission (conn.c, nbdc.c) ----------------------------------- */

struct nbdc_op;
struct nbdc_conn;

/* One NBD request on the wire (one piece of a possibly split operation). */
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
	int err;	      /* first error, negative errno */
	gboolean embedded;    /* lives inside its op: not freed alone */
	gboolean bs_seen;     /* a block status chunk was delivered */
	guint content_chunks; /* OFFSET_DATA/HOLE chunks seen (DF: at most 1) */
	/* structured READ coverage: fast path while chunks arrive in order */
	uint64_t covered;
	GArray *ranges;		      /* sorted [start,end) pairs once out of order */
	gint64 deadline;	      /* monotonic us; 0 = none */
	struct nbdc_req *prev, *next; /* the connection's in-flight list, send order */
};

/* A cookie table entry (cookie 0 = empty: cookies start at 1). */
struct nbdc_slot {
	uint64_t cookie;
	struct nbdc_req *req;
};

/* One caller operation: completes once every piece has. */
struct nbdc_op {
	Nbdc *c;
	gint pending; /* pieces in flight + 1 while submitting */
	gint err;     /* first error */
	nbdc_done_fn done;
	void *opaque;
	nbdc_extent_fn extent;
	gboolean fua_flush;	 /* emulated FUA: flush once the pieces succeed */
	gboolean flushing;	 /* the emulated flush was sent */
	uint64_t bs_pos, bs_end; /* block status: described so far / wanted end
				  * (bs_end 0 = not a looping block status) */
	uint64_t bs_piece_end;	 /* end of the request in flight: the next one
				  * goes out only if the reply reached it */
	struct {		 /* what to send (kept for a deferred submission) */
		uint16_t type, flags;
		uint64_t offset, count;
		uint32_t max;
		const struct iovec *iov;
		int iovcnt;
		gboolean zero_buf;
	} sub;
	gboolean deferred;   /* asked for on a reader thread: the pool sends it */
	struct nbdc_op *next_free; /* in the handle's cache of free ops */
	struct nbdc_req req; /* the first piece */
};

struct nbdc_conn {
	Nbdc *c;
	guint index;
	struct nbdc_transport *t;
	struct nbdc_neg neg;
	GMutex send_lock;  /* held across header + payload */
	GMutex lock;	   /* table, list, counters, state */
	GCond cond;	   /* slot freed / drained / reader ended */
	struct nbdc_slot *table; /* cookie -> request: open addressing, see conn.c */
	guint table_mask;	 /* size - 1 (a power of two) */
	guint table_used;
	struct nbdc_req *head, *tail;
	gint in_flight; /* written under @lock; read racily for balancing */
	guint senders;	/* submitters between insert and end of send */
	guint waiters;	/* threads in a wait on @cond (under @lock) */
	gboolean dead;
	gboolean disc_sent;
	gboolean shutdown_pending; /* server said ESHUTDOWN: DISC once idle */
	gboolean reader_done;
	char *fail_msg; /* set by a failed sender before shutdown */
	int fail_err;
	GThread *reader;
	uint8_t *buf; /* reader scratch (block status) */
	size_t buf_size;
	/* Reader only: what one recv brought beyond what was parsed so far
	 * (rbuf[rpos..rend)); replies are parsed from here. */
	uint8_t *rbuf;
	size_t rpos, rend;
};

struct nbdc {
	struct nbdc_config cfg;
	char *display;
	struct nbdc_neg neg; /* of the first connection */
	struct nbdc_conn **conns;
	guint nconns;
	guint64 next_cookie; /* atomic */
	gint closing;	     /* atomic: no new requests */
	gint dead;	     /* atomic: some connection died */
	GMutex lock;	     /* @error, @aux creation */
	char *error;
	uint32_t max_request;
	uint32_t zero_len;
	void *zero_buf;
	GThreadPool *aux; /* deferred completions, emulated FUA flushes */
	gint aux_pending; /* pushed and not yet finished (under @lock) */
	GCond aux_cond;	  /* @aux_pending reached 0 */
	guint rr;
	GMutex op_lock;		    /* @op_cache */
	struct nbdc_op *op_cache;   /* freed ops kept for reuse (no malloc per I/O) */
	guint op_cached;
};

/* conn.c */
struct nbdc_conn *nbdc_conn_new(Nbdc *c, guint index, struct nbdc_transport *t,
				struct nbdc_neg *neg);
/* Queues @req on @conn and sends it from this thread.  0, or -ENOTCONN
 * when the connection is dead or closing (nothing queued).  @internal: the
 * core's own follow-up work (emulated FUA flush, next block status piece):
 * no back-pressure wait, allowed while the handle drains.  Reader threads
 * (callbacks) never wait for back-pressure either. */
int nbdc_conn_submit(struct nbdc_conn *conn, struct nbdc_req *req, gboolean internal);
/* TRUE on a connection's reader thread (inside completion callbacks). */
gboolean nbdc_on_reader_thread(void);
/* Waits up to @until_us (monotonic) for in-flight requests to finish
 * (their callbacks included).  TRUE when none is left. */
gboolean nbdc_conn_drain(struct nbdc_conn *conn, gint64 until_us);
/* Sends NBD_CMD_DISC, closes TLS and the write side; the reader then sees EOF. */
void nbdc_conn_disconnect(struct nbdc_conn *conn);
/* Waits briefly for the reader to see EOF, then forces it out and joins it;
 * every request of @conn is complete afterwards. */
void nbdc_conn_stop(struct nbdc_conn *conn);
/* Stops (if needed) and frees. */
void nbdc_conn_free(struct nbdc_conn *conn);
/* Marks the handle dead with @msg (first message wins). */
void nbdc_set_dead(Nbdc *c, const char *msg);
/* A piece finished with @err (0 or -errno). Called by the reader. */
void nbdc_req_done(struct nbdc_req *req, int err);
const char *nbdc_cmd_name(uint16_t type);
