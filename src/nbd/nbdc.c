/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nbdc.c: the public asynchronous calls: checks, splitting into wire
 * requests, FUA and zero emulation, block status continuation.
 *
 * An operation (struct nbdc_op) is one allocation holding its first piece;
 * further pieces of a split request are allocated one by one and handed to
 * export.c, which finds them a connection.  The op completes when its last
 * piece does, with the first error; its follow-ups (an emulated FUA's flush,
 * the next block status piece) are submitted from the completion, on the
 * loop, which never blocks.  Freed ops go to a small per-handle cache.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define ZERO_BUF_LEN (1024u * 1024)
#define OP_CACHE_MAX 256u

struct nbdc_op {
	Nbdc *c;
	gint pending; /* pieces not finished + 1 while submitting */
	gint err;     /* first error */
	nbdc_done_fn done;
	void *opaque;
	nbdc_extent_fn extent;
	gboolean changes;	 /* a write, zero or trim: counted in c->writes_busy */
	gboolean fua_flush;	 /* emulated FUA: flush once the pieces succeed */
	gboolean flushing;	 /* the emulated flush was sent */
	uint64_t bs_pos, bs_end; /* block status: described so far / wanted end
				  * (bs_end 0 = not a looping block status) */
	uint64_t bs_piece_end;	 /* end of the piece in flight */
	struct nbdc_op *next_free;
	struct nbdc_req req; /* the first piece */
};

/* ---- ops ---- */

static void op_free(struct nbdc_op *op)
{
	Nbdc *c = op->c;

	if (op->req.ranges)
		g_array_unref(op->req.ranges);
	g_mutex_lock(&c->op_lock);
	if (c->op_cached < OP_CACHE_MAX && !c->op_cache_closed) {
		op->next_free = c->op_cache;
		c->op_cache = op;
		c->op_cached++;
		op = NULL;
	}
	g_mutex_unlock(&c->op_lock);
	g_free(op);
	nbdc_export_unref(c);
}

static void piece_done(struct nbdc_req *req, int err);

void nbdc_op_cache_close(Nbdc *c)
{
	g_mutex_lock(&c->op_lock);
	c->op_cache_closed = TRUE;
	while (c->op_cache) {
		struct nbdc_op *op = c->op_cache;

		c->op_cache = op->next_free;
		g_free(op);
	}
	c->op_cached = 0;
	g_mutex_unlock(&c->op_lock);
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
	nbdc_export_ref(c);
	op->c = c;
	op->pending = 1; /* the submission reference */
	op->done = done;
	op->opaque = opaque;
	op->req.op = op;
	op->req.embedded = TRUE;
	op->req.complete = piece_done;
	return op;
}

/* An op that changes data: a flush has work until it completed. */
static struct nbdc_op *op_new_changing(Nbdc *c, nbdc_done_fn done, void *opaque)
{
	struct nbdc_op *op = op_new(c, done, opaque);

	op->changes = TRUE;
	g_atomic_int_inc(&c->writes_busy);
	return op;
}

static uint32_t big_max(void)
{
	/* 4 GiB - 1 MiB: a multiple of any minimum block (<= 64 KiB); nbdkit
	 * 1.32 aborts on a block status of 0xffffffff bytes. */
	return UINT32_MAX - (1024u * 1024 - 1);
}

static gboolean bs_more(const struct nbdc_op *op)
{
	return op->bs_end && op->err == 0 && op->bs_pos < op->bs_end &&
	       op->bs_pos >= op->bs_piece_end;
}

static void submit_flush_piece(struct nbdc_op *op);

/* The op's embedded request, cleared for its next piece of @type (the
 * previous piece finished). */
static struct nbdc_req *reuse_embedded(struct nbdc_op *op, uint16_t type)
{
	struct nbdc_req *req = &op->req;

	if (req->ranges)
		g_array_unref(req->ranges);
	memset(req, 0, sizeof(*req));
	req->op = op;
	req->embedded = TRUE;
	req->complete = piece_done;
	req->type = type;
	return req;
}

/* The last piece finished (on a loop, or in a posted task). */
static void op_finish(struct nbdc_op *op)
{
	if (op->fua_flush && !op->flushing && op->err == 0) {
		op->flushing = TRUE;
		submit_flush_piece(op);
		return;
	}
	if (bs_more(op)) {
		/* The next block status request, from where the last reply's
		 * extents ended: one in flight at a time keeps them in order. */
		uint16_t flags = op->req.flags;
		struct nbdc_req *req = reuse_embedded(op, NBD_CMD_BLOCK_STATUS);

		req->flags = flags;
		req->extent = op->extent;
		req->extent_opaque = op->opaque;
		req->offset = op->bs_pos;
		req->len = (uint32_t)MIN((uint64_t)big_max(), op->bs_end - op->bs_pos);
		op->bs_piece_end = req->offset + req->len;
		op->pending = 1;
		nbdc_export_submit(op->c, req);
		return;
	}
	if (op->changes)
		g_atomic_int_add(&op->c->writes_busy, -1);
	op->done(op->opaque, op->err);
	op_free(op);
}

static void piece_done(struct nbdc_req *req, int err)
{
	struct nbdc_op *op = req->op;

	if (req->type == NBD_CMD_BLOCK_STATUS && op->bs_end)
		op->bs_pos = req->bs_reached;
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

static void submit_flush_piece(struct nbdc_op *op)
{
	struct nbdc_req *req = reuse_embedded(op, NBD_CMD_FLUSH);

	op->pending = 1;
	nbdc_export_submit(op->c, req);
}

/* Drops the submission reference. */
static void op_submitted(struct nbdc_op *op)
{
	if (g_atomic_int_dec_and_test(&op->pending)) {
		/* Every piece already finished: complete on a loop, later. */
		op->pending = 1;
		nbdc_complete_later(op->c, &op->req, op->err);
	}
}

/* Common checks.  @write: needs a writable export. */
static int check_io(Nbdc *c, uint64_t count, uint64_t offset, gboolean write)
{
	if (!nbdc_export_alive(c))
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

/* Sends @count bytes at @offset as pieces of at most @max (a FLUSH: one
 * request of length 0).  @zero_buf: WRITE pieces from the zero buffer. */
static int submit_pieces(Nbdc *c, struct nbdc_op *op, uint16_t type, uint16_t flags,
			 uint64_t offset, uint64_t count, uint32_t max, const struct iovec *iov,
			 int iovcnt, gboolean zero_buf)
{
	uint64_t done = 0;
	guint n = 0;

	do {
		uint32_t len = (uint32_t)MIN((uint64_t)max, count - done);
		struct nbdc_req *req;

		if (n == 0) {
			req = &op->req;
		} else {
			req = g_new0(struct nbdc_req, 1);
			req->op = op;
			req->complete = piece_done;
		}
		req->type = type;
		req->flags = flags;
		req->offset = offset + done;
		req->len = len;
		req->extent = op->extent;
		req->extent_opaque = op->opaque;
		if (zero_buf) {
			req->one.iov_base = c->zero_buf;
			req->one.iov_len = len;
			req->iov = &req->one;
			req->iovcnt = 1;
		} else {
			req->iov = iov;
			req->iovcnt = iovcnt;
			req->iov_off = done;
		}
		g_atomic_int_inc(&op->pending);
		nbdc_export_submit(c, req);
		done += len;
		n++;
	} while (done < count);
	op_submitted(op);
	return 0;
}

/* Completes @op later with 0 without sending anything. */
static int complete_later(Nbdc *c, struct nbdc_op *op)
{
	nbdc_complete_later(c, &op->req, 0);
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
	struct nbdc_op *op = op_new_changing(c, done, opaque);
	uint16_t wf = fua_flags(c, op, flags);
	if (count == 0)
		return complete_later(c, op);
	return submit_pieces(c, op, NBD_CMD_WRITE, wf, offset, count, c->max_request, iov, iovcnt,
			     FALSE);
}

/* Nothing for a flush to make durable: no write, zero or trim of the user's
 * is unfinished (in flight, parked, waiting for the log), each one
 * acknowledged was covered by a flush that succeeded after it, and the replay
 * log is empty.  (A lost write was acknowledged and not covered: it counts.) */
static gboolean flush_has_no_work(Nbdc *c)
{
	gboolean clean;

	if (g_atomic_int_get(&c->writes_busy) > 0)
		return FALSE;
	g_mutex_lock(&c->lock);
	clean = c->write_gen == c->flushed_gen && !c->log_head;
	g_mutex_unlock(&c->lock);
	return clean;
}

int nbdc_aio_flush(Nbdc *c, nbdc_done_fn done, void *opaque)
{
	if (!nbdc_export_alive(c))
		return -ENOTCONN;
	struct nbdc_op *op = op_new(c, done, opaque);
	if (!(c->neg.eflags & NBD_FLAG_SEND_FLUSH) || flush_has_no_work(c))
		return complete_later(c, op);
	return submit_pieces(c, op, NBD_CMD_FLUSH, 0, 0, 0, 0, NULL, 0, FALSE);
}

int nbdc_aio_trim(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags, nbdc_done_fn done,
		  void *opaque)
{
	int r = check_io(c, count, offset, TRUE);

	if (r < 0)
		return r;
	if (!(c->neg.eflags & NBD_FLAG_SEND_TRIM))
		return -EOPNOTSUPP;
	struct nbdc_op *op = op_new_changing(c, done, opaque);
	uint16_t wf = fua_flags(c, op, flags);
	if (count == 0)
		return complete_later(c, op);
	return submit_pieces(c, op, NBD_CMD_TRIM, wf, offset, count, big_max(), NULL, 0, FALSE);
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
	struct nbdc_op *op = op_new_changing(c, done, opaque);
	uint16_t wf = fua_flags(c, op, flags);
	if (count == 0)
		return complete_later(c, op);
	if (native) {
		if (flags & NBDC_CMD_FLAG_NO_HOLE)
			wf |= NBD_CMD_FLAG_NO_HOLE;
		if (flags & NBDC_CMD_FLAG_FAST_ZERO)
			wf |= NBD_CMD_FLAG_FAST_ZERO;
		return submit_pieces(c, op, NBD_CMD_WRITE_ZEROES, wf, offset, count, big_max(),
				     NULL, 0, FALSE);
	}
	/* Emulation: writes from one shared zero buffer. */
	g_mutex_lock(&c->op_lock);
	if (!c->zero_buf) {
		c->zero_len = MIN(ZERO_BUF_LEN, c->max_request);
		c->zero_buf = g_malloc0(c->zero_len);
	}
	g_mutex_unlock(&c->op_lock);
	return submit_pieces(c, op, NBD_CMD_WRITE, wf, offset, count, c->zero_len, NULL, 0, TRUE);
}

int nbdc_aio_block_status(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags,
			  nbdc_extent_fn extent, nbdc_done_fn done, void *opaque)
{
	int r = check_io(c, count, offset, FALSE);

	if (r < 0)
		return r;
	if (!c->neg.meta && (c->neg.structured_replies || !c->lazy || !c->cfg.block_status ||
			     !c->cfg.structured_replies))
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
		op->bs_piece_end = offset + MIN(count, (uint64_t)big_max());
	}
	return submit_pieces(c, op, NBD_CMD_BLOCK_STATUS, wf, offset,
			     MIN(count, (uint64_t)big_max()), big_max(), NULL, 0, FALSE);
}

/* ---- the handle ---- */

gboolean nbdc_is_alive(const Nbdc *c)
{
	return nbdc_export_alive(c);
}

const char *nbdc_get_error(const Nbdc *c)
{
	Nbdc *m = (Nbdc *)c;
	const char *e;

	g_mutex_lock(&m->lock);
	e = (m->dead || g_atomic_int_get(&m->closing)) ? m->error : NULL;
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
	if (c->ever_ready) {
		out->can_block_status = n->meta;
		out->structured_replies = n->structured_replies;
	} else {
		out->can_block_status = c->cfg.block_status && c->cfg.structured_replies;
		out->structured_replies = c->cfg.structured_replies;
	}
	out->tls = c->cfg.tls;
	out->block_min = n->block_min;
	out->block_pref = n->block_pref;
	out->block_max = n->block_max;
	out->max_request = c->max_request;
	out->connections = c->nready;
	out->protocol = n->protocol ? n->protocol : "newstyle-fixed";
	out->export_name = n->name;
	out->description = n->description;
}
