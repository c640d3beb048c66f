/* bytes.c: byte-addressed I/O on any Blockdev (a file's offset and length
 * turned into sector I/O).
 *
 * A request is cut into an unaligned head sector, an aligned middle and an
 * unaligned tail sector.  The middle goes straight to the device through
 * iovecs over the caller's buffer, split at max_request and all submitted at
 * once; the head and tail go through bounce sectors.
 *
 * Writes and zeroes hold one entry of the ROOT's sector lock table (see
 * sector-lock.c) for their absolute sector range from before the first
 * sector I/O until the last completes; the head/tail sectors they
 * read-modify-write are exclusive in it.  So an RMW waits for every write
 * touching its edge sector and every such write waits for the RMW, through
 * the export and all its partitions alike, while aligned writes only pass
 * through a short mutex hold.  A write runs in two stages: (0) read the edge
 * sectors, (1) write edges and middle; each stage counts its pieces with an
 * atomic and the last piece to finish moves on, on whatever thread completed
 * it.  Nothing blocks a thread.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "blockdev-impl.h"

enum bytes_kind { BYTES_READ, BYTES_WRITE, BYTES_ZERO };

struct bytes_req {
	struct sector_lock lock; /* writes and zeroes only */
	Blockdev *dev;		 /* reference held */
	enum bytes_kind kind;
	uint8_t *buf; /* the caller's buffer; NULL for zero */
	size_t len;   /* clipped to the device end */
	uint32_t flags;
	uint32_t ss;
	uint64_t fs, ls;       /* device sectors [fs, ls) touched */
	uint64_t mid_s, mid_e; /* aligned middle [mid_s, mid_e) */
	gboolean need_head, need_tail;
	uint32_t head_off; /* offset % ss */
	int stage;
	gint pending; /* pieces of the current stage, + 1 while submitting */
	gint err;     /* first error */
	blockdev_bytes_fn done;
	void *opaque;
	uint8_t *bounce; /* head sector, then tail sector; NULL if unused */
	int nmid;
	struct iovec mid[]; /* read/write: the middle over the caller's buffer */
};

static void stage_done(struct bytes_req *req);

static void piece_done(void *opaque, int err)
{
	struct bytes_req *req = opaque;

	if (err < 0)
		g_atomic_int_compare_and_exchange(&req->err, 0, err);
	if (g_atomic_int_dec_and_test(&req->pending))
		stage_done(req);
}

static void finish(struct bytes_req *req, ssize_t result)
{
	Blockdev *dev = req->dev;
	blockdev_bytes_fn done = req->done;
	void *opaque = req->opaque;

	if (req->kind != BYTES_READ)
		sector_lock_release(dev->root->locks, &req->lock);
	g_free(req);
	done(opaque, result);
	blockdev_unref(dev);
}

static uint8_t *tail_bounce(struct bytes_req *req)
{
	return req->bounce + req->ss;
}

/* Byte index in the caller's buffer where the tail sector starts. */
static size_t tail_pos(struct bytes_req *req)
{
	return (size_t)((req->ls - 1) * req->ss - (req->fs * req->ss + req->head_off));
}

/* The two iovecs for the bounce sectors, in the request's own storage
 * (an iov must stay valid until its request completes). */
static struct iovec *edge_iov(struct bytes_req *req)
{
	return &req->mid[req->nmid];
}

static void submit_edge_reads(struct bytes_req *req)
{
	struct iovec *hv = edge_iov(req), *tv = hv + 1;

	hv->iov_base = req->bounce;
	hv->iov_len = req->ss;
	tv->iov_base = tail_bounce(req);
	tv->iov_len = req->ss;
	g_atomic_int_set(&req->pending, 1);
	if (req->need_head) {
		g_atomic_int_inc(&req->pending);
		bdev_submit_read(req->dev, req->fs, hv, 1, piece_done, req);
	}
	if (req->need_tail) {
		g_atomic_int_inc(&req->pending);
		bdev_submit_read(req->dev, req->ls - 1, tv, 1, piece_done, req);
	}
}

static void submit_middle(struct bytes_req *req)
{
	uint64_t sector = req->mid_s;

	if (req->kind == BYTES_ZERO) {
		if (req->mid_e > req->mid_s) {
			g_atomic_int_inc(&req->pending);
			bdev_submit_write_zeroes(req->dev, req->mid_s, req->mid_e - req->mid_s,
						 req->flags, piece_done, req);
		}
		return;
	}
	for (int i = 0; i < req->nmid; i++) {
		g_atomic_int_inc(&req->pending);
		if (req->kind == BYTES_READ)
			bdev_submit_read(req->dev, sector, &req->mid[i], 1, piece_done, req);
		else
			bdev_submit_write(req->dev, sector, &req->mid[i], 1, req->flags, piece_done,
					  req);
		sector += req->mid[i].iov_len / req->ss;
	}
}

/* Stage 1 of a write or zero: patch the bounce sectors, write everything. */
static void submit_writes(struct bytes_req *req)
{
	struct iovec *hv = edge_iov(req), *tv = hv + 1;
	uint32_t ss = req->ss;

	req->stage = 1;
	g_atomic_int_set(&req->pending, 1);
	if (req->need_head) {
		size_t n = MIN((size_t)(ss - req->head_off), req->len);

		if (req->buf)
			memcpy(req->bounce + req->head_off, req->buf, n);
		else
			memset(req->bounce + req->head_off, 0, n);
		hv->iov_base = req->bounce;
		hv->iov_len = ss;
		g_atomic_int_inc(&req->pending);
		bdev_submit_write(req->dev, req->fs, hv, 1, req->flags, piece_done, req);
	}
	submit_middle(req);
	if (req->need_tail) {
		size_t pos = tail_pos(req), n = req->len - pos;

		if (req->buf)
			memcpy(tail_bounce(req), req->buf + pos, n);
		else
			memset(tail_bounce(req), 0, n);
		tv->iov_base = tail_bounce(req);
		tv->iov_len = ss;
		g_atomic_int_inc(&req->pending);
		bdev_submit_write(req->dev, req->ls - 1, tv, 1, req->flags, piece_done, req);
	}
	piece_done(req, 0);
}

static void stage_done(struct bytes_req *req)
{
	int err = g_atomic_int_get(&req->err);

	if (req->kind == BYTES_READ) {
		if (err == 0) {
			if (req->need_head)
				memcpy(req->buf, req->bounce + req->head_off,
				       MIN((size_t)(req->ss - req->head_off), req->len));
			if (req->need_tail) {
				size_t pos = tail_pos(req);

				memcpy(req->buf + pos, tail_bounce(req), req->len - pos);
			}
		}
		finish(req, err ? err : (ssize_t)req->len);
		return;
	}
	if (err || req->stage == 1) {
		finish(req, err ? err : req->kind == BYTES_ZERO ? 0 : (ssize_t)req->len);
		return;
	}
	submit_writes(req);
}

static void write_granted(void *opaque)
{
	struct bytes_req *req = opaque;

	if (req->need_head || req->need_tail) {
		req->stage = 0;
		submit_edge_reads(req);
		piece_done(req, 0);
	} else {
		submit_writes(req);
	}
}

/* Builds a request for [offset, offset + len) (already clipped, len > 0). */
static struct bytes_req *req_new(Blockdev *dev, enum bytes_kind kind, void *buf, size_t len,
				 uint64_t offset, uint32_t flags, blockdev_bytes_fn done,
				 void *opaque)
{
	uint32_t ss = dev->info.sector_size;
	uint32_t max = dev->info.max_request;
	uint64_t end = offset + len; /* <= size: no overflow */
	uint64_t fs = offset / ss, ls = (end + ss - 1) / ss;
	gboolean need_head = offset % ss != 0, need_tail = end % ss != 0;
	uint64_t mid_s, mid_e, mid_bytes;
	size_t nmid = 0, extra_iov, bounce_len, total; /* extra_iov: edge_iov() */
	struct bytes_req *req;

	if (need_head && need_tail && ls - fs == 1)
		need_tail = FALSE; /* one sector: the head bounce covers it */
	mid_s = fs + (need_head ? 1 : 0);
	mid_e = ls - (need_tail ? 1 : 0);
	if (mid_e < mid_s)
		mid_e = mid_s;
	mid_bytes = (mid_e - mid_s) * ss;
	if (kind != BYTES_ZERO && mid_bytes > 0)
		nmid = (size_t)((mid_bytes + max - 1) / max);
	extra_iov = 2;
	bounce_len = need_head || need_tail ? 2 * (size_t)ss : 0;
	total = sizeof(*req) + (nmid + extra_iov) * sizeof(struct iovec) + bounce_len;

	req = g_malloc(total);
	memset(req, 0, sizeof(*req));
	req->dev = blockdev_ref(dev);
	req->kind = kind;
	req->buf = buf;
	req->len = len;
	req->flags = flags;
	req->ss = ss;
	req->fs = fs;
	req->ls = ls;
	req->mid_s = mid_s;
	req->mid_e = mid_e;
	req->need_head = need_head;
	req->need_tail = need_tail;
	req->head_off = (uint32_t)(offset % ss);
	req->done = done;
	req->opaque = opaque;
	req->nmid = (int)nmid;
	req->bounce = bounce_len ? (uint8_t *)&req->mid[nmid + extra_iov] : NULL;
	if (nmid) {
		uint8_t *p = (uint8_t *)buf + (size_t)(mid_s * ss - offset);

		for (size_t i = 0; i < nmid; i++) {
			uint64_t n = MIN(mid_bytes, (uint64_t)max);

			req->mid[i].iov_base = p;
			req->mid[i].iov_len = (size_t)n;
			p += n;
			mid_bytes -= n;
		}
	}
	return req;
}

/* The checks every byte call starts with.  TRUE to go on, with *@len cut to
 * the end of the device and to @max; otherwise the call has been completed
 * (-ENOTCONN, -EROFS for a write on a read-only device, 0 for an empty
 * request, @past_end (0 or -errno) for one that starts at or past the end)
 * and FALSE is returned. */
static gboolean bytes_admit(Blockdev *dev, gboolean write, uint64_t offset, uint64_t *len,
			    uint64_t max, int past_end, blockdev_bytes_fn done, void *opaque)
{
	uint64_t size = dev->info.size;
	int r = 1;

	if (blockdev_is_disconnected(dev))
		r = -ENOTCONN;
	else if (write && !dev->info.read_write)
		r = -EROFS;
	else if (*len == 0)
		r = 0;
	else if (offset >= size)
		r = past_end;
	if (r <= 0) {
		done(opaque, r);
		return FALSE;
	}
	*len = MIN(MIN(*len, size - offset), max);
	return TRUE;
}

void blockdev_pread_bytes(Blockdev *dev, void *buf, size_t len, uint64_t offset,
			  blockdev_bytes_fn done, void *opaque)
{
	uint64_t n = len;
	struct bytes_req *req;

	if (!bytes_admit(dev, FALSE, offset, &n, SSIZE_MAX, 0, done, opaque))
		return;
	req = req_new(dev, BYTES_READ, buf, (size_t)n, offset, 0, done, opaque);
	g_atomic_int_set(&req->pending, 1);
	if (req->need_head || req->need_tail)
		submit_edge_reads(req); /* resets pending to 1 + edges */
	submit_middle(req);
	piece_done(req, 0);
}

static void start_write(Blockdev *dev, enum bytes_kind kind, void *buf, size_t len, uint64_t offset,
			uint32_t flags, blockdev_bytes_fn done, void *opaque)
{
	struct bytes_req *req = req_new(dev, kind, buf, len, offset, flags, done, opaque);
	uint64_t base = dev->info.offset;

	sector_lock_init(&req->lock, base + req->fs, base + req->ls, req->need_head, req->need_tail,
			 write_granted, req);
	sector_lock_acquire(dev->root->locks, &req->lock);
}

void blockdev_pwrite_bytes(Blockdev *dev, const void *buf, size_t len, uint64_t offset,
			   uint32_t flags, blockdev_bytes_fn done, void *opaque)
{
	uint64_t n = len;

	if (bytes_admit(dev, TRUE, offset, &n, SSIZE_MAX, -ENOSPC, done, opaque))
		start_write(dev, BYTES_WRITE, (void *)buf, (size_t)n, offset, flags, done, opaque);
}

void blockdev_zero_bytes(Blockdev *dev, uint64_t offset, uint64_t len, uint32_t flags,
			 blockdev_bytes_fn done, void *opaque)
{
	if (bytes_admit(dev, TRUE, offset, &len, SIZE_MAX, 0, done, opaque))
		start_write(dev, BYTES_ZERO, NULL, (size_t)len, offset, flags, done, opaque);
}
