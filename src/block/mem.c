/* mem.c: an in-memory Blockdev for tests (every op, thread-safe).
 *
 * The bytes live in one buffer padded to whole sectors; the padding past
 * info.size always stays zero, so the partial last sector reads as zeros
 * past the end and a write of it stores only the bytes inside.  A GRWLock
 * makes each request atomic against writers.  Completions run on the
 * calling thread, before the call returns.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "blockdev-impl.h"

struct mem_dev {
	struct blockdev base;
	GRWLock lock;
	uint8_t *data; /* addr_sectors * sector_size bytes */
	size_t alloc;
	gint delay_us; /* tests: sleep before each read/write */
};

#define MEM(dev) ((struct mem_dev *)(dev))

/* Widens race windows in the concurrency tests: a delay of up to delay_us. */
static void mem_delay(struct mem_dev *m)
{
	gint d = g_atomic_int_get(&m->delay_us);

	if (d > 0)
		g_usleep(g_random_int_range(0, d + 1));
}

static void mem_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		     blockdev_done_fn done, void *opaque)
{
	struct mem_dev *m = MEM(dev);
	const uint8_t *p = m->data + sector * dev->info.sector_size;

	mem_delay(m);
	g_rw_lock_reader_lock(&m->lock);
	for (int i = 0; i < iovcnt; i++) {
		memcpy(iov[i].iov_base, p, iov[i].iov_len);
		p += iov[i].iov_len;
	}
	g_rw_lock_reader_unlock(&m->lock);
	done(opaque, 0);
}

/* Copies into [pos, pos + len) but only the part below info.size. */
static void mem_store(struct mem_dev *m, uint64_t pos, const void *src, size_t len)
{
	uint64_t size = m->base.info.size;

	if (pos >= size)
		return;
	if (len > size - pos)
		len = size - pos;
	if (src)
		memcpy(m->data + pos, src, len);
	else
		memset(m->data + pos, 0, len);
}

static void mem_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		      uint32_t flags, blockdev_done_fn done, void *opaque)
{
	struct mem_dev *m = MEM(dev);
	uint64_t pos = sector * dev->info.sector_size;

	mem_delay(m);
	g_rw_lock_writer_lock(&m->lock);
	for (int i = 0; i < iovcnt; i++) {
		mem_store(m, pos, iov[i].iov_base, iov[i].iov_len);
		pos += iov[i].iov_len;
	}
	g_rw_lock_writer_unlock(&m->lock);
	done(opaque, 0);
}

static void mem_flush(Blockdev *dev, blockdev_done_fn done, void *opaque)
{
	done(opaque, 0);
}

static void mem_zero(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
		     blockdev_done_fn done, void *opaque)
{
	struct mem_dev *m = MEM(dev);

	g_rw_lock_writer_lock(&m->lock);
	mem_store(m, sector * dev->info.sector_size, NULL, count * dev->info.sector_size);
	g_rw_lock_writer_unlock(&m->lock);
	done(opaque, 0);
}

static void mem_discard(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
			void *opaque)
{
	mem_zero(dev, sector, count, 0, done, opaque);
}

static void mem_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
			     blockdev_extent_fn extent, blockdev_done_fn done, void *opaque)
{
	uint64_t off = sector * dev->info.sector_size;
	uint64_t len = count * dev->info.sector_size;

	if (len > dev->info.size - off)
		len = dev->info.size - off;
	if (len > 0)
		extent(opaque, off, len, 0);
	done(opaque, 0);
}

static void mem_destroy(Blockdev *dev)
{
	struct mem_dev *m = MEM(dev);

	g_rw_lock_clear(&m->lock);
	g_free(m->data);
	blockdev_fini(dev);
	g_free(m);
}

static const struct blockdev_ops mem_ops = {
	.read = mem_read,
	.write = mem_write,
	.flush = mem_flush,
	.write_zeroes = mem_zero,
	.discard = mem_discard,
	.block_status = mem_block_status,
	.destroy = mem_destroy,
};

Blockdev *blockdev_mem_new(uint32_t sector_size, uint64_t size, const void *data, size_t data_len,
			   gboolean read_only)
{
	struct mem_dev *m;
	uint64_t alloc;

	g_return_val_if_fail(sector_size >= 512 && (sector_size & (sector_size - 1)) == 0, NULL);
	g_return_val_if_fail(size <= G_MAXSIZE - sector_size, NULL);
	m = g_new0(struct mem_dev, 1);
	blockdev_init_root(&m->base, &mem_ops, "mem", "mem:");
	m->base.info.sector_size = sector_size;
	m->base.info.size = size;
	m->base.info.read_write = !read_only;
	m->base.info.pref_block = 4096;
	m->base.info.max_request = 1024 * 1024;
	m->base.info.can_flush = TRUE;
	m->base.info.can_fua = TRUE;
	m->base.info.can_trim = TRUE;
	m->base.info.can_zero = TRUE;
	m->base.info.can_block_status = TRUE;
	blockdev_finish_info(&m->base);
	alloc = m->base.addr_sectors * sector_size;
	m->alloc = alloc;
	m->data = g_malloc0(alloc ? alloc : 1);
	if (data)
		memcpy(m->data, data, MIN((uint64_t)data_len, size));
	g_rw_lock_init(&m->lock);
	return &m->base;
}

uint8_t *blockdev_mem_data(Blockdev *dev)
{
	g_return_val_if_fail(dev && dev->ops == &mem_ops, NULL);
	return MEM(dev)->data;
}

void blockdev_mem_set_max_request(Blockdev *dev, uint32_t max_request)
{
	g_return_if_fail(dev && dev->ops == &mem_ops);
	dev->info.max_request = max_request;
	blockdev_finish_info(dev);
}

void blockdev_mem_set_delay(Blockdev *dev, guint max_delay_us)
{
	g_return_if_fail(dev && dev->ops == &mem_ops);
	g_atomic_int_set(&MEM(dev)->delay_us, (gint)max_delay_us);
}
