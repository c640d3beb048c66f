/* window.c: windows of a parent Blockdev (blockdev_window_new,
 * blockdev_split): what a partition or a split is.
 *
 * A window holds a reference on its parent and forwards every request with
 * its start added, after the base layer bounds-checked it against the window
 * (so a request can never reach a sector outside it).  Its disconnect only
 * marks the window itself.  info.offset is the parent's offset plus start, so
 * it is absolute however deep windows nest; the byte size is clipped to the
 * parent's, so a window over the parent's partial last sector is partial too.
 */
#include "config.h"

#include <errno.h>

#include "blockdev-impl.h"

struct window {
	struct blockdev base;
	Blockdev *parent; /* owned reference */
	uint64_t start;	  /* first sector within the parent */
};

#define WIN(dev) ((struct window *)(dev))

static void win_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		     blockdev_done_fn done, void *opaque)
{
	bdev_submit_read(WIN(dev)->parent, WIN(dev)->start + sector, iov, iovcnt, done, opaque);
}

static void win_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		      uint32_t flags, blockdev_done_fn done, void *opaque)
{
	bdev_submit_write(WIN(dev)->parent, WIN(dev)->start + sector, iov, iovcnt, flags, done,
			  opaque);
}

static void win_flush(Blockdev *dev, blockdev_done_fn done, void *opaque)
{
	/* A flush covers the whole export: go straight to the root. */
	blockdev_flush(dev->root, done, opaque);
}

static void win_zero(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
		     blockdev_done_fn done, void *opaque)
{
	bdev_submit_write_zeroes(WIN(dev)->parent, WIN(dev)->start + sector, count, flags, done,
				 opaque);
}

static void win_discard(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
			void *opaque)
{
	bdev_submit_discard(WIN(dev)->parent, WIN(dev)->start + sector, count, done, opaque);
}

/* Block status: parent extents translated to window bytes and clipped to
 * the asked range (and the window's size). */
struct win_bs {
	blockdev_extent_fn extent;
	blockdev_done_fn done;
	void *opaque;
	uint64_t base;	 /* window start in parent bytes */
	uint64_t lo, hi; /* asked range, window bytes */
};

static void win_bs_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct win_bs *bs = opaque;
	uint64_t s, e;

	/* Work in window bytes; extents that start before the window or end
	 * past it are clipped, overflow-safe. */
	if (offset < bs->base) {
		if (length <= bs->base - offset)
			return;
		length -= bs->base - offset;
		offset = bs->base;
	}
	s = offset - bs->base;
	e = length > G_MAXUINT64 - s ? G_MAXUINT64 : s + length;
	if (s < bs->lo)
		s = bs->lo;
	if (e > bs->hi)
		e = bs->hi;
	if (s >= e)
		return;
	bs->extent(bs->opaque, s, e - s, flags);
}

static void win_bs_done(void *opaque, int err)
{
	struct win_bs *bs = opaque;
	blockdev_done_fn done = bs->done;
	void *done_opaque = bs->opaque;

	g_free(bs);
	done(done_opaque, err);
}

static void win_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
			     blockdev_extent_fn extent, blockdev_done_fn done, void *opaque)
{
	struct window *w = WIN(dev);
	uint32_t ss = dev->info.sector_size;
	struct win_bs *bs = g_new0(struct win_bs, 1);

	bs->extent = extent;
	bs->done = done;
	bs->opaque = opaque;
	bs->base = w->start * ss;
	bs->lo = sector * ss;
	bs->hi = MIN((sector + count) * ss, dev->info.size);
	bdev_submit_block_status(w->parent, w->start + sector, count, win_bs_extent, win_bs_done,
				 bs);
}

static void win_destroy(Blockdev *dev)
{
	Blockdev *parent = WIN(dev)->parent;

	blockdev_fini(dev);
	g_free(dev);
	blockdev_unref(parent);
}

static const struct blockdev_ops window_ops = {
	.read = win_read,
	.write = win_write,
	.flush = win_flush,
	.write_zeroes = win_zero,
	.discard = win_discard,
	.block_status = win_block_status,
	.destroy = win_destroy,
};

Blockdev *blockdev_window_new(Blockdev *parent, uint64_t start, uint64_t sectors, GError **error)
{
	const struct blockdev_info *pi;
	struct window *w;
	uint64_t end, start_b, len_b;

	g_return_val_if_fail(parent != NULL, NULL);
	pi = &parent->info;
	if (!g_uint64_checked_add(&end, start, sectors) || end > parent->addr_sectors) {
		g_set_error(
			error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_RANGE,
			"partition: window at sector %" G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT
			" sectors: beyond the end of the device (%" G_GUINT64_FORMAT " sectors)",
			start, sectors, parent->addr_sectors);
		return NULL;
	}
	/* end <= addr_sectors, so start * ss is at most size rounded up to a
	 * sector: no overflow (blockdev sizes stay below 2^63). */
	start_b = start * pi->sector_size;
	if (start_b >= pi->size || sectors == 0)
		len_b = 0;
	else if (!g_uint64_checked_mul(&len_b, sectors, pi->sector_size) ||
		 len_b > pi->size - start_b)
		len_b = pi->size - start_b;

	w = g_new0(struct window, 1);
	blockdev_init_child(&w->base, &window_ops, parent);
	w->parent = blockdev_ref(parent);
	w->start = start;
	w->base.info = *pi;
	w->base.info.size = len_b;
	w->base.info.offset = pi->offset + start;
	blockdev_finish_info(&w->base);
	return &w->base;
}

gboolean blockdev_split(Blockdev *dev, uint64_t first_sectors, Blockdev **first, Blockdev **rest,
			GError **error)
{
	Blockdev *a, *b;

	g_return_val_if_fail(dev && first && rest, FALSE);
	if (first_sectors > dev->addr_sectors) {
		g_set_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_RANGE,
			    "split: %" G_GUINT64_FORMAT
			    " sectors: beyond the end of the device (%" G_GUINT64_FORMAT
			    " sectors)",
			    first_sectors, dev->addr_sectors);
		return FALSE;
	}
	a = blockdev_window_new(dev, 0, first_sectors, error);
	if (!a)
		return FALSE;
	b = blockdev_window_new(dev, first_sectors, dev->addr_sectors - first_sectors, error);
	if (!b) {
		blockdev_unref(a);
		return FALSE;
	}
	*first = a;
	*rest = b;
	return TRUE;
}
