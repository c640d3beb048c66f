/* blockdev.c: the Blockdev base: reference counting and checked dispatch of
 * the sector calls to a device's ops.
 *
 * Public writes (write, write_zeroes, discard) register their absolute sector
 * range as a shared entry in the root's sector lock table, so they wait for
 * any read-modify-write of the byte layer in progress on those sectors (and
 * vice versa).  Reads take no lock.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "blockdev-impl.h"

/* clang-format off */
G_DEFINE_QUARK(nbdfs-blockdev-error-quark, blockdev_error)
/* clang-format on */

void blockdev_init_root(Blockdev *dev, const struct blockdev_ops *ops, const char *export_name,
			const char *uri)
{
	dev->ops = ops;
	dev->refcount = 1;
	dev->disconnected = 0;
	dev->root = dev;
	dev->locks = sector_locks_new();
	dev->export_name = g_strdup(export_name ? export_name : "");
	dev->uri = g_strdup(uri ? uri : "");
	dev->info.export_name = dev->export_name;
	dev->info.uri = dev->uri;
	dev->info.offset = 0;
}

void blockdev_init_child(Blockdev *dev, const struct blockdev_ops *ops, Blockdev *parent)
{
	dev->ops = ops;
	dev->refcount = 1;
	dev->disconnected = 0;
	dev->root = parent->root;
	dev->locks = NULL;
	dev->export_name = NULL;
	dev->uri = NULL;
	dev->info.export_name = parent->root->export_name;
	dev->info.uri = parent->root->uri;
}

void blockdev_finish_info(Blockdev *dev)
{
	uint32_t ss = dev->info.sector_size;

	g_assert(ss >= 512 && (ss & (ss - 1)) == 0);
	dev->info.sectors = dev->info.size / ss;
	dev->addr_sectors = dev->info.sectors + (dev->info.size % ss ? 1 : 0);
	if (dev->info.pref_block == 0)
		dev->info.pref_block = 4096;
	if (dev->info.max_request < ss)
		dev->info.max_request = ss;
	dev->info.max_request -= dev->info.max_request % ss;
}

void blockdev_fini(Blockdev *dev)
{
	if (dev->locks)
		sector_locks_free(dev->locks);
	dev->locks = NULL;
	g_clear_pointer(&dev->export_name, g_free);
	g_clear_pointer(&dev->uri, g_free);
}

void blockdev_hold(Blockdev *dev, gboolean held)
{
	Blockdev *root = dev->root;

	if (root->ops->hold)
		root->ops->hold(root, held);
}

void blockdev_get_health(Blockdev *dev, struct blockdev_health *out)
{
	Blockdev *root = dev->root;

	memset(out, 0, sizeof(*out));
	out->state = BLOCKDEV_CONN_CONNECTED;
	if (root->ops->get_health)
		root->ops->get_health(root, out);
}

const char *blockdev_conn_state_name(enum blockdev_conn_state state)
{
	switch (state) {
	case BLOCKDEV_CONN_IDLE:
		return "idle";
	case BLOCKDEV_CONN_CONNECTED:
		return "connected";
	case BLOCKDEV_CONN_RECONNECTING:
		return "reconnecting";
	case BLOCKDEV_CONN_FAILED:
		return "failed";
	}
	return "unknown";
}

Blockdev *blockdev_ref(Blockdev *dev)
{
	g_assert(dev && g_atomic_int_get(&dev->refcount) > 0);
	g_atomic_int_inc(&dev->refcount);
	return dev;
}

void blockdev_unref(Blockdev *dev)
{
	if (!dev)
		return;
	if (g_atomic_int_dec_and_test(&dev->refcount))
		dev->ops->destroy(dev);
}

void blockdev_get_info(Blockdev *dev, struct blockdev_info *info)
{
	*info = dev->info;
}

Blockdev *blockdev_get_root(Blockdev *dev)
{
	return dev->root;
}

int bdev_check_range(Blockdev *dev, uint64_t sector, uint64_t count)
{
	if (sector > dev->addr_sectors || count > dev->addr_sectors - sector)
		return -EINVAL;
	return 0;
}

/* Sets *@n to the sectors covered by @iov and returns 0, or returns -EINVAL
 * (negative count, overflow, not a whole number of sectors). */
static int iov_sectors(Blockdev *dev, const struct iovec *iov, int iovcnt, uint64_t *n)
{
	uint64_t total = 0;

	*n = 0;
	if (iovcnt < 0 || (iovcnt > 0 && !iov))
		return -EINVAL;
	for (int i = 0; i < iovcnt; i++) {
		if (iov[i].iov_len > 0 && !iov[i].iov_base)
			return -EINVAL;
		if (g_uint64_checked_add(&total, total, iov[i].iov_len) == FALSE)
			return -EINVAL;
	}
	if (total % dev->info.sector_size)
		return -EINVAL;
	*n = total / dev->info.sector_size;
	return 0;
}

/* Common checks; returns 0 to proceed, 1 when there is nothing to do, or a
 * negative errno.  A disconnected window only refuses requests made to it
 * directly (@forwarded FALSE); its own children keep working.  A
 * disconnected root refuses everything. */
static int check_req_full(Blockdev *dev, gboolean forwarded, gboolean write, uint64_t sector,
			  uint64_t count)
{
	if ((!forwarded || dev->root == dev) && blockdev_is_disconnected(dev))
		return -ENOTCONN;
	if (write && !dev->info.read_write)
		return -EROFS;
	if (bdev_check_range(dev, sector, count) < 0)
		return -EINVAL;
	return count == 0 ? 1 : 0;
}

/* The one checked entry for every request, public or forwarded: TRUE when
 * the request may go on to the driver; otherwise it has been completed
 * (0 for an empty request, else the error) and FALSE is returned.  @err is
 * an earlier error (from iov_sectors()) that wins over every check;
 * @supported FALSE turns a valid non-empty request into -EOPNOTSUPP.
 * Inlined with constant flags, so it costs what the open-coded checks did. */
static inline gboolean admit(Blockdev *dev, gboolean forwarded, gboolean write, int err,
			     uint64_t sector, uint64_t count, gboolean supported,
			     blockdev_done_fn done, void *opaque)
{
	int r = err ? err : check_req_full(dev, forwarded, write, sector, count);

	if (r == 0 && !supported)
		r = -EOPNOTSUPP;
	if (r != 0) {
		done(opaque, r < 0 ? r : 0);
		return FALSE;
	}
	return TRUE;
}

static inline void submit_read(Blockdev *dev, gboolean forwarded, uint64_t sector,
			       const struct iovec *iov, int iovcnt, blockdev_done_fn done,
			       void *opaque)
{
	uint64_t n;
	int err = iov_sectors(dev, iov, iovcnt, &n);

	if (admit(dev, forwarded, FALSE, err, sector, n, TRUE, done, opaque))
		dev->ops->read(dev, sector, iov, iovcnt, done, opaque);
}

static inline void submit_block_status(Blockdev *dev, gboolean forwarded, uint64_t sector,
				       uint64_t count, blockdev_extent_fn extent,
				       blockdev_done_fn done, void *opaque)
{
	if (admit(dev, forwarded, FALSE, 0, sector, count, dev->info.can_block_status, done,
		  opaque))
		dev->ops->block_status(dev, sector, count, extent, done, opaque);
}

void bdev_submit_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		      blockdev_done_fn done, void *opaque)
{
	submit_read(dev, TRUE, sector, iov, iovcnt, done, opaque);
}

void bdev_submit_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		       uint32_t flags, blockdev_done_fn done, void *opaque)
{
	uint64_t n;
	int err = iov_sectors(dev, iov, iovcnt, &n);

	if (admit(dev, TRUE, TRUE, err, sector, n, TRUE, done, opaque))
		dev->ops->write(dev, sector, iov, iovcnt, flags, done, opaque);
}

void bdev_submit_write_zeroes(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
			      blockdev_done_fn done, void *opaque)
{
	if (admit(dev, TRUE, TRUE, 0, sector, count, TRUE, done, opaque))
		dev->ops->write_zeroes(dev, sector, count, flags, done, opaque);
}

void bdev_submit_discard(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
			 void *opaque)
{
	if (admit(dev, TRUE, TRUE, 0, sector, count, dev->info.can_trim, done, opaque))
		dev->ops->discard(dev, sector, count, done, opaque);
}

void bdev_submit_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
			      blockdev_extent_fn extent, blockdev_done_fn done, void *opaque)
{
	submit_block_status(dev, TRUE, sector, count, extent, done, opaque);
}

/* ---- Public calls --------------------------------------------------------- */

void blockdev_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		   blockdev_done_fn done, void *opaque)
{
	submit_read(dev, FALSE, sector, iov, iovcnt, done, opaque);
}

/* A public write-like call holding a shared entry in the root's lock table. */
enum locked_kind { LOCKED_WRITE, LOCKED_ZERO, LOCKED_DISCARD };

struct locked_req {
	struct sector_lock lock;
	Blockdev *dev;
	enum locked_kind kind;
	uint64_t sector, count;
	const struct iovec *iov;
	int iovcnt;
	uint32_t flags;
	blockdev_done_fn done;
	void *opaque;
};

static void locked_done(void *opaque, int err)
{
	struct locked_req *req = opaque;
	Blockdev *dev = req->dev;
	blockdev_done_fn done = req->done;
	void *done_opaque = req->opaque;

	sector_lock_release(dev->root->locks, &req->lock);
	g_free(req);
	done(done_opaque, err);
	blockdev_unref(dev);
}

static void locked_granted(void *opaque)
{
	struct locked_req *req = opaque;
	Blockdev *dev = req->dev;

	switch (req->kind) {
	case LOCKED_WRITE:
		dev->ops->write(dev, req->sector, req->iov, req->iovcnt, req->flags, locked_done,
				req);
		break;
	case LOCKED_ZERO:
		dev->ops->write_zeroes(dev, req->sector, req->count, req->flags, locked_done, req);
		break;
	case LOCKED_DISCARD:
		dev->ops->discard(dev, req->sector, req->count, locked_done, req);
		break;
	}
}

static void submit_locked(Blockdev *dev, enum locked_kind kind, uint64_t sector, uint64_t count,
			  const struct iovec *iov, int iovcnt, uint32_t flags,
			  blockdev_done_fn done, void *opaque)
{
	struct locked_req *req = g_new0(struct locked_req, 1);
	uint64_t abs = dev->info.offset + sector; /* in bounds: cannot overflow */

	req->dev = blockdev_ref(dev);
	req->kind = kind;
	req->sector = sector;
	req->count = count;
	req->iov = iov;
	req->iovcnt = iovcnt;
	req->flags = flags;
	req->done = done;
	req->opaque = opaque;
	sector_lock_init(&req->lock, abs, abs + count, FALSE, FALSE, locked_granted, req);
	sector_lock_acquire(dev->root->locks, &req->lock);
}

void blockdev_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		    uint32_t flags, blockdev_done_fn done, void *opaque)
{
	uint64_t n;
	int err = iov_sectors(dev, iov, iovcnt, &n);

	if (admit(dev, FALSE, TRUE, err, sector, n, TRUE, done, opaque))
		submit_locked(dev, LOCKED_WRITE, sector, n, iov, iovcnt, flags, done, opaque);
}

void blockdev_write_zeroes(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
			   blockdev_done_fn done, void *opaque)
{
	if (admit(dev, FALSE, TRUE, 0, sector, count, TRUE, done, opaque))
		submit_locked(dev, LOCKED_ZERO, sector, count, NULL, 0, flags, done, opaque);
}

void blockdev_discard(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
		      void *opaque)
{
	if (admit(dev, FALSE, TRUE, 0, sector, count, dev->info.can_trim, done, opaque))
		submit_locked(dev, LOCKED_DISCARD, sector, count, NULL, 0, 0, done, opaque);
}

void blockdev_flush(Blockdev *dev, blockdev_done_fn done, void *opaque)
{
	if (blockdev_is_disconnected(dev)) {
		done(opaque, -ENOTCONN);
		return;
	}
	if (!dev->info.can_flush) {
		done(opaque, 0);
		return;
	}
	dev->ops->flush(dev, done, opaque);
}

void blockdev_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
			   blockdev_extent_fn extent, blockdev_done_fn done, void *opaque)
{
	submit_block_status(dev, FALSE, sector, count, extent, done, opaque);
}

void blockdev_disconnect(Blockdev *dev)
{
	if (!g_atomic_int_compare_and_exchange(&dev->disconnected, 0, 1))
		return;
	if (dev->ops->disconnect)
		dev->ops->disconnect(dev);
}
