/* sync.c: blocking wrappers of the sector and byte calls (blockdev.h).
 *
 * Apart from blockdev.c and bytes.c so that each calls only downwards: the
 * wrappers use both, bytes.c uses the base in blockdev.c, and the base uses
 * neither.
 */
#include "config.h"

#include "nbdfs/blockdev.h"

struct sync_wait {
	GMutex mu;
	GCond cond;
	gboolean finished;
	int err;
};

static void sync_init(struct sync_wait *w)
{
	g_mutex_init(&w->mu);
	g_cond_init(&w->cond);
	w->finished = FALSE;
	w->err = 0;
}

static void sync_done(void *opaque, int err)
{
	struct sync_wait *w = opaque;

	g_mutex_lock(&w->mu);
	w->err = err;
	w->finished = TRUE;
	g_cond_signal(&w->cond);
	g_mutex_unlock(&w->mu);
}

static int sync_wait(struct sync_wait *w)
{
	int err;

	g_mutex_lock(&w->mu);
	while (!w->finished)
		g_cond_wait(&w->cond, &w->mu);
	err = w->err;
	g_mutex_unlock(&w->mu);
	g_mutex_clear(&w->mu);
	g_cond_clear(&w->cond);
	return err;
}

int blockdev_read_sync(Blockdev *dev, uint64_t sector, void *buf, size_t len)
{
	struct iovec iov = { .iov_base = buf, .iov_len = len };
	struct sync_wait w;

	sync_init(&w);
	blockdev_read(dev, sector, &iov, 1, sync_done, &w);
	return sync_wait(&w);
}

int blockdev_write_sync(Blockdev *dev, uint64_t sector, const void *buf, size_t len, uint32_t flags)
{
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	struct sync_wait w;

	sync_init(&w);
	blockdev_write(dev, sector, &iov, 1, flags, sync_done, &w);
	return sync_wait(&w);
}

int blockdev_flush_sync(Blockdev *dev)
{
	struct sync_wait w;

	sync_init(&w);
	blockdev_flush(dev, sync_done, &w);
	return sync_wait(&w);
}

struct sync_bytes {
	struct sync_wait w;
	ssize_t result;
};

static void sync_bytes_done(void *opaque, ssize_t result)
{
	struct sync_bytes *s = opaque;

	g_mutex_lock(&s->w.mu);
	s->result = result;
	s->w.finished = TRUE;
	g_cond_signal(&s->w.cond);
	g_mutex_unlock(&s->w.mu);
}

ssize_t blockdev_pread_bytes_sync(Blockdev *dev, void *buf, size_t len, uint64_t offset)
{
	struct sync_bytes s;

	sync_init(&s.w);
	blockdev_pread_bytes(dev, buf, len, offset, sync_bytes_done, &s);
	sync_wait(&s.w);
	return s.result;
}

ssize_t blockdev_pwrite_bytes_sync(Blockdev *dev, const void *buf, size_t len, uint64_t offset,
				   uint32_t flags)
{
	struct sync_bytes s;

	sync_init(&s.w);
	blockdev_pwrite_bytes(dev, buf, len, offset, flags, sync_bytes_done, &s);
	sync_wait(&s.w);
	return s.result;
}

ssize_t blockdev_zero_bytes_sync(Blockdev *dev, uint64_t offset, uint64_t len, uint32_t flags)
{
	struct sync_bytes s;

	sync_init(&s.w);
	blockdev_zero_bytes(dev, offset, len, flags, sync_bytes_done, &s);
	sync_wait(&s.w);
	return s.result;
}
