/* test-blockdev.c: unit tests of the memory device, windows/split and the
 * sector lock table. */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "nbdfs/blockdev.h"
#include "blockdev-impl.h"

static void fill_pattern(uint8_t *p, size_t n, uint32_t seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)((i * 131 + seed * 7 + (i >> 9)) & 0xff);
}

/* ---- memory device --------------------------------------------------------- */

static void test_mem_basic(gconstpointer data)
{
	uint32_t ss = GPOINTER_TO_UINT(data);
	uint64_t size = 8 * (uint64_t)ss;
	g_autofree uint8_t *init = g_malloc(size);
	g_autofree uint8_t *buf = g_malloc(2 * ss);
	struct blockdev_info info;
	g_autoptr(Blockdev) dev = NULL;

	fill_pattern(init, size, 1);
	dev = blockdev_mem_new(ss, size, init, size + 100, FALSE);
	blockdev_get_info(dev, &info);
	g_assert_cmpuint(info.sector_size, ==, ss);
	g_assert_cmpuint(info.size, ==, size);
	g_assert_cmpuint(info.sectors, ==, 8);
	g_assert_cmpuint(info.offset, ==, 0);
	g_assert_true(info.read_write);
	g_assert_cmpstr(info.export_name, ==, "mem");
	g_assert_true(blockdev_get_root(dev) == dev);
	g_assert_cmpmem(blockdev_mem_data(dev), size, init, size);

	g_assert_cmpint(blockdev_read_sync(dev, 6, buf, 2 * ss), ==, 0);
	g_assert_cmpmem(buf, 2 * ss, init + 6 * ss, 2 * ss);
	/* Out of bounds, overflowing, misaligned. */
	g_assert_cmpint(blockdev_read_sync(dev, 7, buf, 2 * ss), ==, -EINVAL);
	g_assert_cmpint(blockdev_read_sync(dev, 8, buf, ss), ==, -EINVAL);
	g_assert_cmpint(blockdev_read_sync(dev, G_MAXUINT64, buf, ss), ==, -EINVAL);
	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, ss - 1), ==, -EINVAL);
	g_assert_cmpint(blockdev_write_sync(dev, 7, buf, 2 * ss, 0), ==, -EINVAL);
	g_assert_cmpint(blockdev_write_sync(dev, G_MAXUINT64 - 1, buf, 2 * ss, 0), ==, -EINVAL);
	/* Zero length at the end is fine. */
	g_assert_cmpint(blockdev_read_sync(dev, 8, buf, 0), ==, 0);

	memset(buf, 0xab, ss);
	g_assert_cmpint(blockdev_write_sync(dev, 3, buf, ss, BLOCKDEV_FUA), ==, 0);
	g_assert_cmpmem(blockdev_mem_data(dev) + 3 * ss, ss, buf, ss);
	g_assert_cmpint(blockdev_flush_sync(dev), ==, 0);

	blockdev_disconnect(dev);
	blockdev_disconnect(dev);
	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, ss), ==, -ENOTCONN);
	g_assert_cmpint(blockdev_write_sync(dev, 0, buf, ss, 0), ==, -ENOTCONN);
	g_assert_cmpint(blockdev_flush_sync(dev), ==, -ENOTCONN);
}

static void save_err(void *opaque, int err)
{
	*(int *)opaque = err;
}

struct extents {
	int n;
	uint64_t off[8], len[8];
	uint32_t flags[8];
};

static void add_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct extents *e = opaque;

	g_assert_cmpint(e->n, <, 8);
	e->off[e->n] = offset;
	e->len[e->n] = length;
	e->flags[e->n] = flags;
	e->n++;
}

/* Completion and extents land in one struct for block status. */
struct bs_result {
	struct extents ext;
	int err;
	gboolean called;
};

static void bs_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	add_extent(&((struct bs_result *)opaque)->ext, offset, length, flags);
}

static void bs_done(void *opaque, int err)
{
	struct bs_result *r = opaque;

	r->err = err;
	r->called = TRUE;
}

static struct bs_result block_status(Blockdev *dev, uint64_t sector, uint64_t count)
{
	struct bs_result r = { 0 };

	/* The memory device (and windows over it) completes synchronously. */
	blockdev_block_status(dev, sector, count, bs_extent, bs_done, &r);
	g_assert_true(r.called);
	return r;
}

static void test_mem_ops(void)
{
	g_autoptr(Blockdev) dev = blockdev_mem_new(512, 4096, NULL, 0, FALSE);
	g_autoptr(Blockdev) ro = blockdev_mem_new(512, 4096, NULL, 0, TRUE);
	uint8_t *d = blockdev_mem_data(dev);
	uint8_t buf[512];
	struct bs_result r;
	int err = 1;

	memset(d, 0x55, 4096);
	blockdev_write_zeroes(dev, 2, 3, BLOCKDEV_MAY_TRIM, save_err, &err);
	g_assert_cmpint(err, ==, 0);
	for (int i = 0; i < 4096; i++)
		g_assert_cmpint(d[i], ==, i >= 1024 && i < 2560 ? 0 : 0x55);
	blockdev_discard(dev, 7, 1, save_err, &err);
	g_assert_cmpint(err, ==, 0);
	err = 1;
	blockdev_discard(dev, 7, 2, save_err, &err);
	g_assert_cmpint(err, ==, -EINVAL);
	blockdev_write_zeroes(dev, 8, 1, 0, save_err, &err);
	g_assert_cmpint(err, ==, -EINVAL);

	r = block_status(dev, 1, 3);
	g_assert_cmpint(r.err, ==, 0);
	g_assert_cmpint(r.ext.n, ==, 1);
	g_assert_cmpuint(r.ext.off[0], ==, 512);
	g_assert_cmpuint(r.ext.len[0], ==, 1536);
	g_assert_cmpuint(r.ext.flags[0], ==, 0);
	r = block_status(dev, 6, 3);
	g_assert_cmpint(r.err, ==, -EINVAL);

	memset(buf, 1, sizeof(buf));
	g_assert_cmpint(blockdev_write_sync(ro, 0, buf, 512, 0), ==, -EROFS);
	blockdev_write_zeroes(ro, 0, 1, 0, save_err, &err);
	g_assert_cmpint(err, ==, -EROFS);
	g_assert_cmpint(blockdev_read_sync(ro, 0, buf, 512), ==, 0);
	g_assert_cmpint(buf[0], ==, 0);
}

static void test_mem_partial(gconstpointer data)
{
	uint32_t ss = GPOINTER_TO_UINT(data);
	uint64_t size = 3 * (uint64_t)ss + 100;
	g_autoptr(Blockdev) dev = blockdev_mem_new(ss, size, NULL, 0, FALSE);
	g_autofree uint8_t *buf = g_malloc(2 * ss);
	struct blockdev_info info;
	struct bs_result r;

	blockdev_get_info(dev, &info);
	g_assert_cmpuint(info.sectors, ==, 3);
	g_assert_cmpuint(info.size, ==, size);
	memset(buf, 0xee, 2 * ss);
	/* The partial last sector is addressable; only its inside is stored. */
	g_assert_cmpint(blockdev_write_sync(dev, 2, buf, 2 * ss, 0), ==, 0);
	g_assert_cmpint(blockdev_write_sync(dev, 3, buf, 2 * ss, 0), ==, -EINVAL);
	g_assert_cmpint(blockdev_write_sync(dev, 4, buf, ss, 0), ==, -EINVAL);
	for (uint64_t i = 2 * ss; i < 4 * (uint64_t)ss; i++)
		g_assert_cmpint(blockdev_mem_data(dev)[i], ==, i < size ? 0xee : 0);
	memset(buf, 0x11, 2 * ss);
	g_assert_cmpint(blockdev_read_sync(dev, 2, buf, 2 * ss), ==, 0);
	for (uint64_t i = 0; i < 2 * (uint64_t)ss; i++)
		g_assert_cmpint(buf[i], ==, 2 * ss + i < size ? 0xee : 0);
	r = block_status(dev, 2, 2);
	g_assert_cmpint(r.err, ==, 0);
	g_assert_cmpint(r.ext.n, ==, 1);
	g_assert_cmpuint(r.ext.off[0], ==, 2 * ss);
	g_assert_cmpuint(r.ext.len[0], ==, ss + 100);
}

static void test_mem_empty(void)
{
	g_autoptr(Blockdev) dev = blockdev_mem_new(512, 0, NULL, 0, FALSE);
	uint8_t buf[512];

	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, 512), ==, -EINVAL);
	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, 0), ==, 0);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 10, 0), ==, 0);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 10, 0, 0), ==, -ENOSPC);
}

/* ---- windows ---------------------------------------------------------------- */

static void test_window_split(gconstpointer data)
{
	uint32_t ss = GPOINTER_TO_UINT(data);
	uint64_t size = 16 * (uint64_t)ss;
	g_autofree uint8_t *init = g_malloc(size);
	g_autofree uint8_t *buf = g_malloc(16 * ss);
	g_autoptr(Blockdev) dev = NULL;
	g_autoptr(GError) error = NULL;
	Blockdev *a = NULL, *b = NULL;
	struct blockdev_info info;

	fill_pattern(init, size, 2);
	dev = blockdev_mem_new(ss, size, init, size, FALSE);

	/* Split at 0: empty first half, everything in the second. */
	g_assert_true(blockdev_split(dev, 0, &a, &b, &error));
	g_assert_no_error(error);
	blockdev_get_info(a, &info);
	g_assert_cmpuint(info.size, ==, 0);
	g_assert_cmpuint(info.sectors, ==, 0);
	g_assert_cmpint(blockdev_read_sync(a, 0, buf, ss), ==, -EINVAL);
	g_assert_cmpint(blockdev_pread_bytes_sync(a, buf, 10, 0), ==, 0);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(a, buf, 10, 0, 0), ==, -ENOSPC);
	blockdev_get_info(b, &info);
	g_assert_cmpuint(info.size, ==, size);
	g_assert_cmpuint(info.offset, ==, 0);
	g_assert_true(blockdev_get_root(b) == dev);
	g_assert_cmpint(blockdev_read_sync(b, 0, buf, 16 * ss), ==, 0);
	g_assert_cmpmem(buf, 16 * ss, init, size);
	blockdev_unref(a);
	blockdev_unref(b);

	/* Split at the end: empty rest. */
	g_assert_true(blockdev_split(dev, 16, &a, &b, &error));
	blockdev_get_info(a, &info);
	g_assert_cmpuint(info.size, ==, size);
	blockdev_get_info(b, &info);
	g_assert_cmpuint(info.size, ==, 0);
	g_assert_cmpuint(info.offset, ==, 16);
	g_assert_cmpint(blockdev_read_sync(b, 0, buf, ss), ==, -EINVAL);
	blockdev_unref(a);
	blockdev_unref(b);

	/* Beyond the end. */
	a = b = NULL;
	g_assert_false(blockdev_split(dev, 17, &a, &b, &error));
	g_assert_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_RANGE);
	g_assert_null(a);
	g_assert_null(b);
	g_clear_error(&error);
	g_assert_null(blockdev_window_new(dev, 10, 7, &error));
	g_assert_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_RANGE);
	g_clear_error(&error);
	g_assert_null(blockdev_window_new(dev, G_MAXUINT64, 2, &error));
	g_assert_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_RANGE);
	g_clear_error(&error);
	g_assert_null(blockdev_window_new(dev, 17, 0, &error));
	g_assert_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_RANGE);
	g_clear_error(&error);

	/* Split in the middle, then nest. */
	g_assert_true(blockdev_split(dev, 5, &a, &b, &error));
	blockdev_get_info(b, &info);
	g_assert_cmpuint(info.offset, ==, 5);
	g_assert_cmpuint(info.sectors, ==, 11);
	g_assert_cmpint(blockdev_read_sync(b, 0, buf, 11 * ss), ==, 0);
	g_assert_cmpmem(buf, 11 * ss, init + 5 * ss, 11 * ss);
	g_assert_cmpint(blockdev_read_sync(b, 10, buf, 2 * ss), ==, -EINVAL);
	g_assert_cmpint(blockdev_read_sync(a, 4, buf, 2 * ss), ==, -EINVAL);
	{
		g_autoptr(Blockdev) c = blockdev_window_new(b, 3, 6, &error);
		g_autoptr(Blockdev) d = NULL;

		g_assert_nonnull(c);
		d = blockdev_window_new(c, 2, 4, &error);
		g_assert_nonnull(d);
		blockdev_get_info(d, &info);
		g_assert_cmpuint(info.offset, ==, 10);
		g_assert_cmpuint(info.sectors, ==, 4);
		g_assert_cmpuint(info.size, ==, 4 * (uint64_t)ss);
		g_assert_true(blockdev_get_root(d) == dev);
		g_assert_cmpstr(info.export_name, ==, "mem");
		g_assert_cmpint(blockdev_read_sync(d, 0, buf, 4 * ss), ==, 0);
		g_assert_cmpmem(buf, 4 * ss, init + 10 * ss, 4 * ss);
		g_assert_cmpint(blockdev_read_sync(d, 1, buf, 4 * ss), ==, -EINVAL);
		g_assert_null(blockdev_window_new(c, 2, 5, &error));
		g_clear_error(&error);
		/* A write through the innermost window lands at sector 12. */
		memset(buf, 0x77, ss);
		g_assert_cmpint(blockdev_write_sync(d, 2, buf, ss, 0), ==, 0);
		g_assert_cmpmem(blockdev_mem_data(dev) + 12 * ss, ss, buf, ss);
		g_assert_cmpmem(blockdev_mem_data(dev) + 11 * ss, ss, init + 11 * ss, ss);
		g_assert_cmpmem(blockdev_mem_data(dev) + 13 * ss, ss, init + 13 * ss, ss);

		/* Disconnecting a partition never touches parent, siblings or
		 * its own children. */
		blockdev_disconnect(c);
		g_assert_cmpint(blockdev_read_sync(c, 0, buf, ss), ==, -ENOTCONN);
		g_assert_cmpint(blockdev_read_sync(d, 0, buf, ss), ==, 0);
		g_assert_cmpint(blockdev_read_sync(b, 0, buf, ss), ==, 0);
		g_assert_cmpint(blockdev_read_sync(a, 0, buf, ss), ==, 0);
		g_assert_cmpint(blockdev_read_sync(dev, 0, buf, ss), ==, 0);
	}
	/* A window outlives its parent's last outside reference. */
	blockdev_unref(b);
	blockdev_disconnect(a);
	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, ss), ==, 0);
	blockdev_unref(a);
}

static void test_window_partial(gconstpointer data)
{
	uint32_t ss = GPOINTER_TO_UINT(data);
	uint64_t size = 4 * (uint64_t)ss + 1;
	g_autoptr(Blockdev) dev = blockdev_mem_new(ss, size, NULL, 0, FALSE);
	g_autoptr(GError) error = NULL;
	g_autofree uint8_t *buf = g_malloc(2 * ss);
	Blockdev *a, *b;
	struct blockdev_info info;
	struct bs_result r;

	g_assert_true(blockdev_split(dev, 3, &a, &b, &error));
	blockdev_get_info(b, &info);
	g_assert_cmpuint(info.size, ==, ss + 1);
	g_assert_cmpuint(info.sectors, ==, 1);
	g_assert_cmpuint(info.offset, ==, 3);
	memset(buf, 0x99, 2 * ss);
	g_assert_cmpint(blockdev_write_sync(b, 0, buf, 2 * ss, 0), ==, 0);
	g_assert_cmpint(blockdev_mem_data(dev)[size - 1], ==, 0x99);
	g_assert_cmpint(blockdev_mem_data(dev)[size], ==, 0);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(b, buf, 10, ss - 5, 0), ==, 6);
	g_assert_cmpint(blockdev_pread_bytes_sync(b, buf, 2 * ss, 0), ==, ss + 1);
	r = block_status(b, 0, 2);
	g_assert_cmpint(r.ext.n, ==, 1);
	g_assert_cmpuint(r.ext.off[0], ==, 0);
	g_assert_cmpuint(r.ext.len[0], ==, ss + 1);
	r = block_status(b, 1, 1);
	g_assert_cmpint(r.ext.n, ==, 1);
	g_assert_cmpuint(r.ext.off[0], ==, ss);
	g_assert_cmpuint(r.ext.len[0], ==, 1);
	blockdev_unref(a);
	blockdev_unref(b);

	/* A window wholly inside the partial sector split off by blockdev_split
	 * at the number of whole sectors. */
	g_assert_true(blockdev_split(dev, 4, &a, &b, &error));
	blockdev_get_info(b, &info);
	g_assert_cmpuint(info.size, ==, 1);
	g_assert_cmpuint(info.sectors, ==, 0);
	g_assert_cmpint(blockdev_read_sync(b, 0, buf, ss), ==, 0);
	g_assert_cmpint(blockdev_pread_bytes_sync(b, buf, 100, 0), ==, 1);
	blockdev_unref(a);
	blockdev_unref(b);
	g_assert_true(blockdev_split(dev, 5, &a, &b, &error));
	blockdev_get_info(b, &info);
	g_assert_cmpuint(info.size, ==, 0);
	blockdev_unref(a);
	blockdev_unref(b);
}

/* Block status through a window over a device whose extents cross the window
 * edges: a fake parent is overkill, so check clipping with a window whose
 * parent extent (one covering the asked range) starts before it. */
static void test_window_block_status(void)
{
	g_autoptr(Blockdev) dev = blockdev_mem_new(512, 64 * 512, NULL, 0, FALSE);
	g_autoptr(GError) error = NULL;
	g_autoptr(Blockdev) w = blockdev_window_new(dev, 10, 20, &error);
	g_autoptr(Blockdev) ww = blockdev_window_new(w, 5, 10, &error);
	struct bs_result r;

	r = block_status(ww, 2, 3);
	g_assert_cmpint(r.err, ==, 0);
	g_assert_cmpint(r.ext.n, ==, 1);
	g_assert_cmpuint(r.ext.off[0], ==, 1024);
	g_assert_cmpuint(r.ext.len[0], ==, 1536);
	r = block_status(ww, 9, 2);
	g_assert_cmpint(r.err, ==, -EINVAL);
}

/* ---- sector lock table ---------------------------------------------------- */

static void mark_granted(void *opaque)
{
	(*(int *)opaque)++;
}

static void test_sector_lock(void)
{
	struct sector_locks *t = sector_locks_new();
	struct sector_lock a, b, c, d, e;
	int ga = 0, gb = 0, gc = 0, gd = 0, ge = 0;

	/* Shared entries never conflict. */
	sector_lock_init(&a, 0, 10, FALSE, FALSE, mark_granted, &ga);
	sector_lock_init(&b, 5, 15, FALSE, FALSE, mark_granted, &gb);
	sector_lock_acquire(t, &a);
	sector_lock_acquire(t, &b);
	g_assert_cmpint(ga, ==, 1);
	g_assert_cmpint(gb, ==, 1);
	/* An RMW of sector 9 waits for both. */
	sector_lock_init(&c, 9, 10, TRUE, TRUE, mark_granted, &gc);
	g_assert_cmpint(c.nexcl, ==, 1);
	sector_lock_acquire(t, &c);
	g_assert_cmpint(gc, ==, 0);
	/* A shared write elsewhere passes; one touching sector 9 queues behind c. */
	sector_lock_init(&d, 20, 30, FALSE, FALSE, mark_granted, &gd);
	sector_lock_acquire(t, &d);
	g_assert_cmpint(gd, ==, 1);
	sector_lock_init(&e, 9, 12, FALSE, FALSE, mark_granted, &ge);
	sector_lock_acquire(t, &e);
	g_assert_cmpint(ge, ==, 0);
	sector_lock_release(t, &a);
	g_assert_cmpint(gc, ==, 0);
	sector_lock_release(t, &b);
	g_assert_cmpint(gc, ==, 1);
	g_assert_cmpint(ge, ==, 0);
	sector_lock_release(t, &c);
	g_assert_cmpint(ge, ==, 1);
	sector_lock_release(t, &d);
	sector_lock_release(t, &e);

	/* Two RMWs of different edges of the same range don't conflict when
	 * neither's exclusive sector is in the other's range. */
	sector_lock_init(&a, 0, 4, TRUE, FALSE, mark_granted, &ga);
	sector_lock_init(&b, 4, 8, TRUE, TRUE, mark_granted, &gb);
	sector_lock_init(&c, 3, 5, FALSE, TRUE, mark_granted, &gc);
	ga = gb = gc = 0;
	sector_lock_acquire(t, &a);
	sector_lock_acquire(t, &b);
	g_assert_cmpint(ga + gb, ==, 2);
	sector_lock_acquire(t, &c); /* exclusive 4 is in b */
	g_assert_cmpint(gc, ==, 0);
	sector_lock_release(t, &b);
	g_assert_cmpint(gc, ==, 1);
	sector_lock_release(t, &a);
	sector_lock_release(t, &c);
	sector_locks_free(t);
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_data_func("/block/mem/basic/512", GUINT_TO_POINTER(512), test_mem_basic);
	g_test_add_data_func("/block/mem/basic/4096", GUINT_TO_POINTER(4096), test_mem_basic);
	g_test_add_func("/block/mem/ops", test_mem_ops);
	g_test_add_data_func("/block/mem/partial/512", GUINT_TO_POINTER(512), test_mem_partial);
	g_test_add_data_func("/block/mem/partial/4096", GUINT_TO_POINTER(4096), test_mem_partial);
	g_test_add_func("/block/mem/empty", test_mem_empty);
	g_test_add_data_func("/block/window/split/512", GUINT_TO_POINTER(512), test_window_split);
	g_test_add_data_func("/block/window/split/4096", GUINT_TO_POINTER(4096), test_window_split);
	g_test_add_data_func("/block/window/partial/512", GUINT_TO_POINTER(512),
			     test_window_partial);
	g_test_add_data_func("/block/window/partial/4096", GUINT_TO_POINTER(4096),
			     test_window_partial);
	g_test_add_func("/block/window/block-status", test_window_block_status);
	g_test_add_func("/block/sector-lock", test_sector_lock);
	return g_test_run();
}
