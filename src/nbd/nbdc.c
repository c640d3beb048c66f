/* nbdc.c: the Nbdc handle: connections (multi-conn), request checks and
 * splitting, FUA/zero emulation, synchronous wrappers, teardown.
 *
 * An operation (struct nbdc_op) is one allocation holding its first piece;
 * further pieces of a split request are allocated one by one.  Pieces go to
 * the least-loaded connection.  The op completes when its last piece does,
 * with the first error.  Completions that cannot run on a reader (an op that
 * finished while its submitter still held it, emulated FUA's flush, no-op
 * requests) go through a small GThreadPool, so @done never runs inside the
 * submitting call and a reader never blocks on a send.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"
#include "wire.h"

#define DISCONNECT_WAIT_US (5 * G_USEC_PER_SEC)
#define MAX_CONNECTIONS 16u
#define ZERO_BUF_LEN (1024u * 1024)

void nbdc_config_init(struct nbdc_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->fd = -1;
	cfg->tls_verify_peer = TRUE;
	cfg->structured_replies = TRUE;
	cfg->block_status = TRUE;
	cfg->max_in_flight = 64;
	cfg->handshake_timeout_ms = 30000;
}

/* ---- completion ---- */

/* Freed ops go to a small per-handle cache: an I/O then costs no malloc.
 * (The reader frees, the submitter allocates: a short lock, no syscall
 * unless they collide.) */
#define OP_CACHE_MAX 256u

static void op_free(struct nbdc_op *op)
{
	Nbdc *c = op->c;

	if (op->req.ranges)
		g_array_unref(op->req.ranges);
	g_mutex_lock(&c->op_lock);
	if (c->op_cached < OP_CACHE_MAX) {
		op->next_free = c->op_cache;
		c->op_cache = op;
		c->op_cached++;
		op = NULL;
	}
	g_mutex_unlock(&c->op_lock);
	g_free(op);
}

static void aux_run(gpointer data, gpointer user);

static void aux_push(Nbdc *c, struct nbdc_op *op)
{
	g_mutex_lock(&c->lock);
	c->aux_pending++;
	g_mutex_unlock(&c->lock);
	g_thread_pool_push(c->aux, op, NULL);
}

static void aux_finished(Nbdc *c)
{
	g_mutex_lock(&c->lock);
	if (--c->aux_pending == 0)
		g_cond_broadcast(&c->aux_cond);
	g_mutex_unlock(&c->lock);
}

static gboolean bs_more(const struct nbdc_op *op)
{
	return op->bs_end && op->err == 0 && op->bs_pos < op->bs_end &&
	       op->bs_pos >= op->bs_piece_end;
}

/* The last piece completed (on a reader). */
static void op_finish(struct nbdc_op *op)
{
	if ((op->fua_flush && !op->flushing && op->err == 0) || bs_more(op)) {
		aux_push(op->c, op); /* sends the flush from a pool thread */
		return;
	}
	op->done(op->opaque, op->err);
	op_free(op);
}

void nbdc_req_done(struct nbdc_req *req, int err)
{
	struct nbdc_op *op = req->op;

	if (!req->embedded) {
		if (req->ranges)
			g_array_unref(req->ranges);
		g_free(req);
	}
	if (err)
		g_atomic_int_compare_and_exchange(&op->err, 0, err);
	if (g_atomic_int_dec_and_test(&op->pending))
		op_finish(op);
}

static void flush_done(void *opaque, int err)
{
	struct nbdc_op *op = opaque;

	op->err = err;
	op->done(op->opaque, err);
	op_free(op);
}

static int submit_flush(Nbdc *c, nbdc_done_fn done, void *opaque, gboolean nowait);
static uint32_t big_max(Nbdc *c);
static struct nbdc_conn *pick_conn(Nbdc *c);
static int run_pieces(Nbdc *c, struct nbdc_op *op, gboolean deferred);

/* Pool thread: the next block status request, from where the last reply's
 * extents ended.  Extents reach the caller in order because one piece is in
 * flight at a time. */
static void bs_continue(Nbdc *c, struct nbdc_op *op)
{
	struct nbdc_req *req = &op->req;
	uint16_t flags = req->flags;

	memset(req, 0, sizeof(*req));
	req->op = op;
	req->embedded = TRUE;
	req->type = NBD_CMD_BLOCK_STATUS;
	req->flags = flags;
	req->offset = op->bs_pos;
	req->len = (uint32_t)MIN((uint64_t)big_max(c), op->bs_end - op->bs_pos);
	op->bs_piece_end = req->offset + req->len;
	op->pending = 1;
	int r = nbdc_conn_submit(pick_conn(c), req, TRUE);
	if (r < 0) {
		op->done(op->opaque, r);
		op_free(op);
	}
}

/* Pool thread: either an op to finish, or an op whose emulated FUA flush
 * must be sent now. */
static void aux_run(gpointer data, gpointer user)
{
	struct nbdc_op *op = data;
	Nbdc *c = user;

	if (op->deferred) {
		op->deferred = FALSE;
		run_pieces(c, op, TRUE); /* asked for on a reader thread */
	} else if (bs_more(op)) {
		bs_continue(c, op);
	} else if (op->fua_flush && !op->flushing && op->err == 0) {
		op->flushing = TRUE;
		int r = submit_flush(c, flush_done, op, TRUE);
		if (r < 0)
			flush_done(op, r);
	} else {
		op->done(op->opaque, op->err);
		op_free(op);
	}
	aux_finished(c);
}

/* ---- handle state ---- */

gboolean nbdc_is_alive(const Nbdc *c)
{
	return !g_atomic_int_get(&c->closing) && !g_atomic_int_get(&c->dead);
}

const char *nbdc_get_error(const Nbdc *c)
{
	Nbdc *m = (Nbdc *)c;
	const char *e;

	g_mutex_lock(&m->lock);
	e = m->error;
	g_mutex_unlock(&m->lock);
	return e;
}

void nbdc_get_info(const Nbdc *c, struct nbdc_info *out)
{
	const struct nbdc_neg *n = &c->neg;
	uint16_t f = n->eflags;

	memset(out, 0, sizeof(*out));
	out->size = n->size;
	out->sector_size = n->block_min >= 512 ? n->block_min : 512;
	out->size_sectors = n->size / out->sector_size;
	out->read_write = !(f & NBD_FLAG_READ_ONLY);
	out->eflags = f;
	out->can_flush = (f & NBD_FLAG_SEND_FLUSH) != 0;
	out->can_fua = (f & NBD_FLAG_SEND_FUA) != 0;
	out->can_trim = (f & NBD_FLAG_SEND_TRIM) != 0;
	out->can_zero = (f & NBD_FLAG_SEND_WRITE_ZEROES) != 0;
	out->can_fast_zero = (f & NBD_FLAG_SEND_FAST_ZERO) && out->can_zero;
	out->can_multi_conn = (f & NBD_FLAG_CAN_MULTI_CONN) != 0;
	out->can_block_status = n->meta;
	out->structured_replies = n->structured_replies;
	out->tls = n->tls;
	out->block_min = n->block_min;
	out->block_pref = n->block_pref;
	out->block_max = n->block_max;
	out->max_request = c->max_request;
	out->connections = c->nconns;
	out->protocol = n->protocol;
	out->export_name = n->name;
	out->description = n->description;
}

/* ---- connect ---- */

static void handle_free(Nbdc *c)
{
	/* Readers first (everything in flight completes), then the pool (its
	 * late flushes now fail at once with -ENOTCONN), then the memory. */
	for (guint i = 0; i < c->nconns; i++)
		nbdc_conn_stop(c->conns[i]);
	if (c->aux)
		g_thread_pool_free(c->aux, FALSE, TRUE);
	for (guint i = 0; i < c->nconns; i++)
		nbdc_conn_free(c->conns[i]);
	g_free(c->conns);
	nbdc_neg_clear(&c->neg);
	g_free(c->display);
	g_free(c->error);
	g_free(c->zero_buf);
	while (c->op_cache) {
		struct nbdc_op *op = c->op_cache;

		c->op_cache = op->next_free;
		g_free(op);
	}
	g_mutex_clear(&c->op_lock);
	g_mutex_clear(&c->lock);
	g_cond_clear(&c->aux_cond);
	g_free(c);
}

Nbdc *nbdc_connect(const struct nbdc_config *cfg, GError **error)
{
	struct nbdc_neg neg;
	struct nbdc_transport *t;
	struct nbdc_config one = *cfg;

	t = nbdc_hs_connect(cfg, &neg, error);
	if (!t)
		return NULL;

	Nbdc *c = g_new0(Nbdc, 1);
	c->cfg = *cfg;
	c->cfg.fd = -1; /* taken; never reused */
	c->display = nbdc_cfg_display(cfg);
	g_mutex_init(&c->lock);
	g_mutex_init(&c->op_lock);
	g_cond_init(&c->aux_cond);
	c->aux = g_thread_pool_new(aux_run, c, 1, FALSE, NULL);
	c->neg = neg;
	c->neg.name = g_strdup(neg.name);
	c->neg.description = g_strdup(neg.description);

	uint32_t mr = NBD_DEFAULT_MAX_REQUEST;
	if (neg.block_max && neg.block_max < mr)
		mr = neg.block_max;
	if (neg.block_min > 1)
		mr -= mr % neg.block_min;
	c->max_request = mr;

	/* How many connections. */
	guint want = cfg->connections;
	gboolean mc = (neg.eflags & NBD_FLAG_CAN_MULTI_CONN) != 0;
	if (want == 0)
		want = mc ? 4 : 1;
	if (want > MAX_CONNECTIONS) {
		nbdc_log(cfg, NBDC_LOG_WARNING, "%s: %u connections asked, using %u", c->display,
			 want, MAX_CONNECTIONS);
		want = MAX_CONNECTIONS;
	}
	if (want > 1 && !mc) {
		if (cfg->connections > 1)
			nbdc_log(cfg, NBDC_LOG_WARNING,
				 "%s: server does not allow multi-conn: using 1 connection, not %u",
				 c->display, cfg->connections);
		want = 1;
	}
	if (want > 1 && cfg->fd >= 0) {
		if (cfg->connections > 1)
			nbdc_log(cfg, NBDC_LOG_WARNING, "%s: a single fd gives a single connection",
				 c->display);
		want = 1;
	}
	c->conns = g_new0(struct nbdc_conn *, want);
	c->conns[c->nconns++] = nbdc_conn_new(c, 0, t, &neg);

	one.fd = -1;
	for (guint i = 1; i < want; i++) {
		g_autoptr(GError) e = NULL;
		struct nbdc_neg n2;
		struct nbdc_transport *t2 = nbdc_hs_connect(&one, &n2, &e);

		if (t2 && (n2.size != c->neg.size || n2.eflags != c->neg.eflags ||
			   n2.structured_replies != c->neg.structured_replies)) {
			g_set_error(&e, NBDC_ERROR, NBDC_ERROR_HANDSHAKE,
				    "connection %u negotiated a different export", i);
			nbdc_tr_close(t2);
			nbdc_neg_clear(&n2);
			t2 = NULL;
		}
		if (!t2) {
			nbdc_log(cfg, NBDC_LOG_WARNING,
				 "%s: extra connection %u failed, using %u: %s", c->display, i,
				 c->nconns, e->message);
			break;
		}
		c->conns[c->nconns++] = nbdc_conn_new(c, i, t2, &n2);
	}
	return c;
}

/* ---- submission ---- */

static struct nbdc_conn *pick_conn(Nbdc *c)
{
	if (c->nconns == 1)
		return c->conns[0];
	guint start = g_atomic_int_add(&c->rr, 1);
	struct nbdc_conn *best = NULL;
	gint best_load = G_MAXINT;
	for (guint i = 0; i < c->nconns; i++) {
		struct nbdc_conn *conn = c->conns[(start + i) % c->nconns];
		gint load = g_atomic_int_get(&conn->in_flight);

		if (conn->dead)
			continue;
		if (load < best_load) {
			best = conn;
			best_load = load;
		}
	}
	return best ? best : c->conns[0];
}

static struct nbdc_op *op_new(Nbdc *c, nbdc_done_fn done, void *opaque)
{
	struct nbdc_op *op;

	g_mutex_lock(&c->op_lock);
	op = c->op_cache;
	if (op) {
		c->op_cache = op->next_free;
		c->op_cached--;
	}
	g_mutex_unlock(&c->op_lock);
	if (op)
		memset(op, 0, sizeof(*op));
	else
		op = g_new0(struct nbdc_op, 1);
	op->c = c;
	op->pending = 1; /* the submission reference */
	op->done = done;
	op->opaque = opaque;
	op->req.op = op;
	op->req.embedded = TRUE;
	return op;
}

/* Drops the submission reference.  @queued: pieces were sent.  Returns
 * what the aio call returns. */
static int op_submitted(struct nbdc_op *op, guint queued, int err, gboolean deferred)
{
	if (queued == 0 && deferred) {
		/* The caller was told "queued": report through @done. */
		op->done(op->opaque, err);
		op_free(op);
		return 0;
	}
	if (queued == 0) {
		/* Nothing went out: the caller gets the error, @done never runs. */
		op_free(op);
		return err;
	}
	if (err)
		g_atomic_int_compare_and_exchange(&op->err, 0, err);
	if (g_atomic_int_dec_and_test(&op->pending))
		aux_push(op->c, op); /* all pieces already done: complete off-thread */
	return 0;
}

/* Common checks.  @write: needs a writable export. */
static int check_io(Nbdc *c, uint64_t count, uint64_t offset, gboolean write)
{
	if (!nbdc_is_alive(c))
		return -ENOTCONN;
	if (write && (c->neg.eflags & NBD_FLAG_READ_ONLY))
		return -EROFS;
	if (offset > c->neg.size || count > c->neg.size - offset)
		return write ? -ENOSPC : -EINVAL;
	uint32_t m = c->neg.block_min;
	if (m > 1 && (offset % m || count % m))
		return -EINVAL;
	return 0;
}

/* Sends @op->sub: @count bytes at @offset as pieces of at most @max (a
 * FLUSH: one request of length 0). */
static int run_pieces(Nbdc *c, struct nbdc_op *op, gboolean deferred)
{
	guint queued = 0;
	uint64_t done = 0;
	int err = 0;

	do {
		uint32_t len = (uint32_t)MIN((uint64_t)op->sub.max, op->sub.count - done);
		struct nbdc_req *req;

		if (queued == 0) {
			req = &op->req;
		} else {
			req = g_new0(struct nbdc_req, 1);
			req->op = op;
		}
		req->type = op->sub.type;
		req->flags = op->sub.flags;
		req->offset = op->sub.offset + done;
		req->len = len;
		if (op->sub.zero_buf) {
			req->one.iov_base = c->zero_buf;
			req->one.iov_len = len;
			req->iov = &req->one;
			req->iovcnt = 1;
		} else {
			req->iov = op->sub.iov;
			req->iovcnt = op->sub.iovcnt;
			req->iov_off = done;
		}
		g_atomic_int_inc(&op->pending);
		err = nbdc_conn_submit(pick_conn(c), req, FALSE);
		if (err < 0) {
			g_atomic_int_add(&op->pending, -1);
			if (!req->embedded)
				g_free(req);
			break;
		}
		queued++;
		done += len;
	} while (done < op->sub.count);
	return op_submitted(op, queued, err, deferred);
}

/* Records what @op sends and sends it, from this thread; or, on a reader
 * thread (a completion callback asking for more), from the pool: a reader
 * that blocked in send() while the server blocks writing replies that only
 * this reader reads would deadlock. */
static int submit_pieces(Nbdc *c, struct nbdc_op *op, uint16_t type, uint16_t flags,
			 uint64_t offset, uint64_t count, uint32_t max, const struct iovec *iov,
			 int iovcnt, gboolean zero_buf)
{
	op->sub.type = type;
	op->sub.flags = flags;
	op->sub.offset = offset;
	op->sub.count = count;
	op->sub.max = max;
	op->sub.iov = iov;
	op->sub.iovcnt = iovcnt;
	op->sub.zero_buf = zero_buf;
	if (nbdc_on_reader_thread()) {
		op->deferred = TRUE;
		aux_push(c, op);
		return 0;
	}
	return run_pieces(c, op, FALSE);
}

/* Completes @op later with 0 without sending anything. */
static int complete_later(Nbdc *c, struct nbdc_op *op)
{
	op->pending = 0;
	aux_push(c, op);
	return 0;
}

static size_t iov_total(const struct iovec *iov, int iovcnt)
{
	size_t n = 0;

	for (int i = 0; i < iovcnt; i++)
		n += iov[i].iov_len;
	return n;
}

int nbdc_aio_preadv(Nbdc *c, const struct iovec *iov, int iovcnt, uint64_t offset, uint32_t flags,
		    nbdc_done_fn done, void *opaque)
{
	uint64_t count = iov_total(iov, iovcnt);
	int r = check_io(c, count, offset, FALSE);
	uint16_t wf = 0;

	if (r < 0)
		return r;
	if ((flags & NBDC_CMD_FLAG_DF) && (c->neg.eflags & NBD_FLAG_SEND_DF))
		wf |= NBD_CMD_FLAG_DF;
	struct nbdc_op *op = op_new(c, done, opaque);
	if (count == 0)
		return complete_later(c, op);
	return submit_pieces(c, op, NBD_CMD_READ, wf, offset, count, c->max_request, iov, iovcnt,
			     FALSE);
}

/* FUA flag on the wire, or emulation by a flush afterwards. */
static uint16_t fua_flags(Nbdc *c, struct nbdc_op *op, uint32_t flags)
{
	if (!(flags & NBDC_CMD_FLAG_FUA))
		return 0;
	if (c->neg.eflags & NBD_FLAG_SEND_FUA)
		return NBD_CMD_FLAG_FUA;
	if (c->neg.eflags & NBD_FLAG_SEND_FLUSH)
		op->fua_flush = TRUE;
	return 0;
}

int nbdc_aio_pwritev(Nbdc *c, const struct iovec *iov, int iovcnt, uint64_t offset, uint32_t flags,
		     nbdc_done_fn done, void *opaque)
{
	uint64_t count = iov_total(iov, iovcnt);
	int r = check_io(c, count, offset, TRUE);

	if (r < 0)
		return r;
	struct nbdc_op *op = op_new(c, done, opaque);
	uint16_t wf = fua_flags(c, op, flags);
	if (count == 0)
		return complete_later(c, op);
	return submit_pieces(c, op, NBD_CMD_WRITE, wf, offset, count, c->max_request, iov, iovcnt,
			     FALSE);
}

static int submit_flush(Nbdc *c, nbdc_done_fn done, void *opaque, gboolean nowait)
{
	struct nbdc_op *op = op_new(c, done, opaque);

	op->req.type = NBD_CMD_FLUSH;
	g_atomic_int_inc(&op->pending);
	int err = nbdc_conn_submit(pick_conn(c), &op->req, nowait);
	if (err < 0) {
		op_free(op);
		return err;
	}
	return op_submitted(op, 1, 0, FALSE);
}

int nbdc_aio_flush(Nbdc *c, nbdc_done_fn done, void *opaque)
{
	if (!nbdc_is_alive(c))
		return -ENOTCONN;
	struct nbdc_op *op = op_new(c, done, opaque);
	if (!(c->neg.eflags & NBD_FLAG_SEND_FLUSH))
		return complete_later(c, op);
	return submit_pieces(c, op, NBD_CMD_FLUSH, 0, 0, 0, 0, NULL, 0, FALSE);
}

/* Largest TRIM/ZERO/BLOCK_STATUS piece: 4 GiB - 1 MiB, a multiple of any
 * minimum block (<= 64 KiB).  (nbdkit 1.32 aborts on a block status of
 * 0xffffffff bytes; round lengths are kinder to every server.) */
static uint32_t big_max(Nbdc *c)
{
	(void)c;
	return UINT32_MAX - (1024u * 1024 - 1);
}

int nbdc_aio_trim(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags, nbdc_done_fn done,
		  void *opaque)
{
	int r = check_io(c, count, offset, TRUE);

	if (r < 0)
		return r;
	if (!(c->neg.eflags & NBD_FLAG_SEND_TRIM))
		return -EOPNOTSUPP;
	struct nbdc_op *op = op_new(c, done, opaque);
	uint16_t wf = fua_flags(c, op, flags);
	if (count == 0)
		return complete_later(c, op);
	return submit_pieces(c, op, NBD_CMD_TRIM, wf, offset, count, big_max(c), NULL, 0, FALSE);
}

int nbdc_aio_zero(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags, nbdc_done_fn done,
		  void *opaque)
{
	int r = check_io(c, count, offset, TRUE);
	gboolean native = (c->neg.eflags & NBD_FLAG_SEND_WRITE_ZEROES) != 0;

	if (r < 0)
		return r;
	if ((flags & NBDC_CMD_FLAG_FAST_ZERO) &&
	    (!native || !(c->neg.eflags & NBD_FLAG_SEND_FAST_ZERO)))
		return -EOPNOTSUPP;
	struct nbdc_op *op = op_new(c, done, opaque);
	uint16_t wf = fua_flags(c, op, flags);
	if (count == 0)
		return complete_later(c, op);
	if (native) {
		if (flags & NBDC_CMD_FLAG_NO_HOLE)
			wf |= NBD_CMD_FLAG_NO_HOLE;
		if (flags & NBDC_CMD_FLAG_FAST_ZERO)
			wf |= NBD_CMD_FLAG_FAST_ZERO;
		return submit_pieces(c, op, NBD_CMD_WRITE_ZEROES, wf, offset, count, big_max(c),
				     NULL, 0, FALSE);
	}
	/* Emulation: writes from one shared zero buffer. */
	g_mutex_lock(&c->lock);
	if (!c->zero_buf) {
		c->zero_len = MIN(ZERO_BUF_LEN, c->max_request);
		c->zero_buf = g_malloc0(c->zero_len);
	}
	g_mutex_unlock(&c->lock);
	return submit_pieces(c, op, NBD_CMD_WRITE, wf, offset, count, c->zero_len, NULL, 0, TRUE);
}

int nbdc_aio_block_status(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags,
			  nbdc_extent_fn extent, nbdc_done_fn done, void *opaque)
{
	int r = check_io(c, count, offset, FALSE);

	if (r < 0)
		return r;
	if (!c->neg.meta)
		return -EOPNOTSUPP;
	struct nbdc_op *op = op_new(c, done, opaque);
	op->extent = extent;
	if (count == 0)
		return complete_later(c, op);
	/* One request at a time so that extents arrive in order; without
	 * REQ_ONE the next one starts where the last reply's extents ended,
	 * until the whole range is described. */
	uint16_t wf = (flags & NBDC_CMD_FLAG_REQ_ONE) ? NBD_CMD_FLAG_REQ_ONE : 0;
	if (!wf) {
		op->bs_pos = offset;
		op->bs_end = offset + count;
		op->bs_piece_end = offset + MIN(count, (uint64_t)big_max(c));
	}
	return submit_pieces(c, op, NBD_CMD_BLOCK_STATUS, wf, offset,
			     MIN(count, (uint64_t)big_max(c)), big_max(c), NULL, 0, FALSE);
}

/* ---- synchronous wrappers ---- */

struct sync_wait {
	GMutex m;
	GCond cv;
	gboolean done;
	int err;
};

static void sync_done(void *opaque, int err)
{
	struct sync_wait *w = opaque;

	g_mutex_lock(&w->m);
	w->err = err;
	w->done = TRUE;
	g_cond_signal(&w->cv);
	g_mutex_unlock(&w->m);
}

static int sync_wait(struct sync_wait *w, int r)
{
	if (r == 0) {
		g_mutex_lock(&w->m);
		while (!w->done)
			g_cond_wait(&w->cv, &w->m);
		g_mutex_unlock(&w->m);
		r = w->err;
	}
	g_mutex_clear(&w->m);
	g_cond_clear(&w->cv);
	return r;
}

#define SYNC_INIT(w)                                                                               \
	do {                                                                                       \
		memset(&(w), 0, sizeof(w));                                                        \
		g_mutex_init(&(w).m);                                                              \
		g_cond_init(&(w).cv);                                                              \
	} while (0)

int nbdc_pread(Nbdc *c, void *buf, size_t count, uint64_t offset, uint32_t flags)
{
	struct iovec v = {buf, count};
	struct sync_wait w;

	SYNC_INIT(w);
	return sync_wait(&w, nbdc_aio_preadv(c, &v, 1, offset, flags, sync_done, &w));
}

int nbdc_pwrite(Nbdc *c, const void *buf, size_t count, uint64_t offset, uint32_t flags)
{
	struct iovec v = {(void *)buf, count};
	struct sync_wait w;

	SYNC_INIT(w);
	return sync_wait(&w, nbdc_aio_pwritev(c, &v, 1, offset, flags, sync_done, &w));
}

int nbdc_flush(Nbdc *c)
{
	struct sync_wait w;

	SYNC_INIT(w);
	return sync_wait(&w, nbdc_aio_flush(c, sync_done, &w));
}

int nbdc_trim(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags)
{
	struct sync_wait w;

	SYNC_INIT(w);
	return sync_wait(&w, nbdc_aio_trim(c, count, offset, flags, sync_done, &w));
}

int nbdc_zero(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags)
{
	struct sync_wait w;

	SYNC_INIT(w);
	return sync_wait(&w, nbdc_aio_zero(c, count, offset, flags, sync_done, &w));
}

/* The aio call has one opaque for both callbacks: the sync form passes the
 * wait struct and forwards extents to the caller's opaque. */
struct sync_bs {
	struct sync_wait w; /* first: sync_done sees a struct sync_wait */
	nbdc_extent_fn extent;
	void *opaque;
};

static void sync_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct sync_bs *b = opaque;

	if (b->extent)
		b->extent(b->opaque, offset, length, flags);
}

int nbdc_block_status(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags,
		      nbdc_extent_fn extent, void *opaque)
{
	struct sync_bs b;

	SYNC_INIT(b.w);
	b.extent = extent;
	b.opaque = opaque;
	return sync_wait(
	    &b.w, nbdc_aio_block_status(c, count, offset, flags, sync_extent, sync_done, &b));
}

/* ---- listing ---- */

GPtrArray *nbdc_list_exports(const struct nbdc_config *cfg, gboolean details, GError **error)
{
	return nbdc_hs_list(cfg, details, error);
}

/* ---- teardown ---- */

void nbdc_disconnect(Nbdc *c)
{
	if (!c || !g_atomic_int_compare_and_exchange(&c->closing, 0, 1))
		return;
	g_autofree char *why = g_strdup_printf("%s: disconnected", c->display);
	g_mutex_lock(&c->lock);
	if (!c->error)
		c->error = g_steal_pointer(&why);
	g_mutex_unlock(&c->lock);
	/* In-flight requests and deferred work (an emulated FUA flush, the
	 * next block status request) may feed each other: wait for both to
	 * settle, within one bound. */
	gint64 until = g_get_monotonic_time() + DISCONNECT_WAIT_US;
	if (nbdc_on_reader_thread())
		until = 0; /* from a callback: its own request is still open */
	for (;;) {
		gboolean idle = TRUE;

		for (guint i = 0; i < c->nconns; i++)
			idle &= nbdc_conn_drain(c->conns[i], until);
		g_mutex_lock(&c->lock);
		while (c->aux_pending > 0)
			if (!g_cond_wait_until(&c->aux_cond, &c->lock, until))
				break;
		idle &= c->aux_pending == 0;
		g_mutex_unlock(&c->lock);
		if (idle)
			for (guint i = 0; i < c->nconns; i++)
				idle &= nbdc_conn_drain(c->conns[i], until);
		if (idle || g_get_monotonic_time() >= until)
			break;
	}
	for (guint i = 0; i < c->nconns; i++)
		nbdc_conn_disconnect(c->conns[i]);
}

void nbdc_free(Nbdc *c)
{
	if (!c)
		return;
	nbdc_disconnect(c);
	handle_free(c);
}
