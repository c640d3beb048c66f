/* test-bytes.c: byte I/O on the memory device and windows: every head/tail
 * alignment, the device end, splitting at max_request, zeroing, and a
 * concurrency property test against a byte model. */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "nbdfs/blockdev.h"
#include "blockdev-impl.h"

static void fill_random(GRand *r, uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)g_rand_int_range(r, 1, 256);
}

/* Every combination of head offset and length around sector boundaries,
 * on the root, on a window, and with a tiny max_request. */
static void check_combos(Blockdev *dev, uint8_t *model, uint64_t base, uint64_t size, uint32_t ss,
			 GRand *r)
{
	const uint64_t offs[] = {
		0, 1, 7, ss / 2, ss - 1, ss, ss + 1, 2 * (uint64_t)ss - 3, 3 * (uint64_t)ss
	};
	const uint64_t lens[] = { 1,
				  2,
				  ss / 2,
				  ss - 1,
				  ss,
				  ss + 1,
				  2 * (uint64_t)ss - 1,
				  2 * (uint64_t)ss,
				  2 * (uint64_t)ss + 1,
				  5 * (uint64_t)ss + 3 };
	Blockdev *root = blockdev_get_root(dev);
	g_autofree uint8_t *buf = g_malloc(8 * ss);
	g_autofree uint8_t *rd = g_malloc(8 * ss + 2);

	for (size_t i = 0; i < G_N_ELEMENTS(offs); i++) {
		for (size_t j = 0; j < G_N_ELEMENTS(lens); j++) {
			uint64_t off = offs[i], len = lens[j];
			uint64_t exp = off >= size ? 0 : MIN(len, size - off);
			ssize_t n;

			fill_random(r, buf, len);
			n = blockdev_pwrite_bytes_sync(dev, buf, len, off, 0);
			if (off >= size) {
				g_assert_cmpint(n, ==, -ENOSPC);
			} else {
				g_assert_cmpint(n, ==, (ssize_t)exp);
				memcpy(model + base + off, buf, exp);
			}
			g_assert_cmpmem(blockdev_mem_data(root), size + base, model, size + base);
			/* Read back with a guard byte either side. */
			rd[0] = rd[len + 1] = 0x5a;
			n = blockdev_pread_bytes_sync(dev, rd + 1, len, off);
			g_assert_cmpint(n, ==, (ssize_t)exp);
			g_assert_cmpmem(rd + 1, exp, model + base + off, exp);
			g_assert_cmpint(rd[0], ==, 0x5a);
			if (exp == len)
				g_assert_cmpint(rd[len + 1], ==, 0x5a);
			/* Zero the first half with unaligned edges, now and then. */
			if ((i + j) % 3 == 0 && off < size) {
				uint64_t zl = (len + 1) / 2;

				g_assert_cmpint(blockdev_zero_bytes_sync(dev, off, zl, 0), ==, 0);
				memset(model + base + off, 0, MIN(zl, size - off));
				g_assert_cmpmem(blockdev_mem_data(root), size + base, model,
						size + base);
			}
		}
	}
}

static void test_bytes_combos(gconstpointer data)
{
	uint32_t ss = GPOINTER_TO_UINT(data);
	/* Odd sizes: a partial last sector. */
	const uint64_t sizes[] = { 16 * (uint64_t)ss, 16 * (uint64_t)ss + 77,
				   3 * (uint64_t)ss + 1 };
	g_autoptr(GRand) r = g_rand_new_with_seed(42);

	for (size_t k = 0; k < G_N_ELEMENTS(sizes); k++) {
		uint64_t size = sizes[k];
		g_autofree uint8_t *model = g_malloc0(size);
		g_autoptr(Blockdev) dev = blockdev_mem_new(ss, size, NULL, 0, FALSE);
		g_autoptr(GError) error = NULL;
		g_autoptr(Blockdev) w = NULL;
		struct blockdev_info info;

		fill_random(r, model, size);
		memcpy(blockdev_mem_data(dev), model, size);
		check_combos(dev, model, 0, size, ss, r);
		/* Split I/O: max_request of one and of two sectors. */
		blockdev_mem_set_max_request(dev, ss);
		check_combos(dev, model, 0, size, ss, r);
		blockdev_mem_set_max_request(dev, 2 * ss);
		check_combos(dev, model, 0, size, ss, r);
		/* Through a window starting at sector 1 running to the end. */
		w = blockdev_window_new(dev, 1, dev->addr_sectors - 1, &error);
		g_assert_no_error(error);
		blockdev_get_info(w, &info);
		g_assert_cmpuint(info.size, ==, size - ss);
		check_combos(w, model, ss, size - ss, ss, r);
	}
}

static void test_bytes_end(void)
{
	g_autoptr(Blockdev) dev = blockdev_mem_new(512, 1000, NULL, 0, FALSE);
	g_autoptr(Blockdev) ro = blockdev_mem_new(512, 1000, NULL, 0, TRUE);
	uint8_t buf[2048];
	uint8_t *d = blockdev_mem_data(dev);

	memset(buf, 0xcc, sizeof(buf));
	/* Reads: short at the end, 0 at or past it. */
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 2048, 0), ==, 1000);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 100, 950), ==, 50);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 100, 1000), ==, 0);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 100, G_MAXUINT64), ==, 0);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 0, 10), ==, 0);
	/* Writes: ENOSPC at/after the end, short when straddling. */
	memset(buf, 0xcc, sizeof(buf));
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 1, 1000, 0), ==, -ENOSPC);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 1, G_MAXUINT64, 0), ==, -ENOSPC);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 100, 990, 0), ==, 10);
	g_assert_cmpint(d[989], ==, 0);
	g_assert_cmpint(d[990], ==, 0xcc);
	g_assert_cmpint(d[999], ==, 0xcc);
	g_assert_cmpint(d[1000], ==, 0);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 2048, 0, BLOCKDEV_FUA), ==, 1000);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 0, 5000, 0), ==, 0);
	/* Read-only. */
	g_assert_cmpint(blockdev_pwrite_bytes_sync(ro, buf, 10, 0, 0), ==, -EROFS);
	g_assert_cmpint(blockdev_zero_bytes_sync(ro, 0, 10, 0), ==, -EROFS);
	/* Zero: clipped to the end, result 0. */
	g_assert_cmpint(blockdev_zero_bytes_sync(dev, 900, 5000, 0), ==, 0);
	for (int i = 0; i < 1024; i++)
		g_assert_cmpint(d[i], ==, i < 900 ? 0xcc : 0);
	g_assert_cmpint(blockdev_zero_bytes_sync(dev, 5000, 10, 0), ==, 0);
	/* Disconnected. */
	blockdev_disconnect(dev);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 10, 0), ==, -ENOTCONN);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 10, 0, 0), ==, -ENOTCONN);
	g_assert_cmpint(blockdev_zero_bytes_sync(dev, 0, 10, 0), ==, -ENOTCONN);
}

static void test_bytes_zero(gconstpointer data)
{
	uint32_t ss = GPOINTER_TO_UINT(data);
	uint64_t size = 10 * (uint64_t)ss + 33;
	const uint64_t offs[] = { 0, 1, ss - 1, ss, ss + 5, 3 * (uint64_t)ss };
	const uint64_t lens[] = { 1, ss - 1, ss, ss + 2, 3 * (uint64_t)ss + 9, 20 * (uint64_t)ss };
	g_autoptr(Blockdev) dev = blockdev_mem_new(ss, size, NULL, 0, FALSE);
	g_autofree uint8_t *model = g_malloc(size);
	g_autoptr(GError) error = NULL;
	g_autoptr(Blockdev) w = blockdev_window_new(dev, 2, 8, &error);

	for (size_t i = 0; i < G_N_ELEMENTS(offs); i++) {
		for (size_t j = 0; j < G_N_ELEMENTS(lens); j++) {
			for (int via = 0; via < 2; via++) {
				Blockdev *t = via ? w : dev;
				uint64_t base = via ? 2 * (uint64_t)ss : 0;
				uint64_t tsize = via ? 8 * (uint64_t)ss : size;
				uint64_t off = offs[i], len = lens[j];

				memset(model, 0xa5, size);
				memset(blockdev_mem_data(dev), 0xa5, size);
				g_assert_cmpint(blockdev_zero_bytes_sync(
							t, off, len, j % 2 ? BLOCKDEV_MAY_TRIM : 0),
						==, 0);
				if (off < tsize)
					memset(model + base + off, 0, MIN(len, tsize - off));
				g_assert_cmpmem(blockdev_mem_data(dev), size, model, size);
			}
		}
	}
}

/* ---- concurrency property test ---------------------------------------------
 * Writers own disjoint byte ranges ("slots", 1..700 bytes, dealt round-robin
 * so neighbours belong to different writers and share sectors).  Each writer
 * repeatedly writes random data over random sub-ranges of its own slots,
 * through the root or through a window of it, and records it in the model.
 * Readers read random ranges meanwhile.  At the end the device must equal
 * the model byte for byte: no RMW lost a neighbour's bytes. */

#define NWRITERS 4
#define NREADERS 2

struct conc {
	Blockdev *dev;
	Blockdev *win[2];      /* [0, half) and [half, end) */
	uint64_t win_start[2]; /* bytes */
	uint64_t win_size[2];
	uint64_t size;
	uint8_t *model;
	GArray *slot_off[NWRITERS], *slot_len[NWRITERS];
	gint stop;
	guint iters;
	guint32 seed;
};

struct worker {
	struct conc *c;
	int id;
	GThread *thread;
};

static gpointer writer_main(gpointer opaque)
{
	struct worker *wk = opaque;
	struct conc *c = wk->c;
	g_autoptr(GRand) r = g_rand_new_with_seed(c->seed + wk->id);
	uint8_t buf[1024];
	GArray *offs = c->slot_off[wk->id], *lens = c->slot_len[wk->id];

	for (guint it = 0; it < c->iters; it++) {
		guint s = g_rand_int_range(r, 0, offs->len);
		uint64_t so = g_array_index(offs, uint64_t, s);
		uint64_t sl = g_array_index(lens, uint64_t, s);
		uint64_t a = g_rand_int_range(r, 0, sl);
		uint64_t n = g_rand_int_range(r, 1, sl - a + 1);
		uint64_t off = so + a;
		Blockdev *target = c->dev;
		uint64_t toff = off;
		int via = g_rand_int_range(r, 0, 3);
		ssize_t res;

		if (via < 2 && off >= c->win_start[via] &&
		    off + n <= c->win_start[via] + c->win_size[via]) {
			target = c->win[via];
			toff = off - c->win_start[via];
		}
		fill_random(r, buf, n);
		if (g_rand_int_range(r, 0, 8) == 0) {
			res = blockdev_zero_bytes_sync(target, toff, n, 0);
			g_assert_cmpint(res, ==, 0);
			memset(c->model + off, 0, n);
		} else {
			res = blockdev_pwrite_bytes_sync(target, buf, n, toff, 0);
			if (res != (ssize_t)n)
				g_test_message("via %d off %" G_GUINT64_FORMAT
					       " n %" G_GUINT64_FORMAT,
					       via, off, n);
			g_assert_cmpint(res, ==, (ssize_t)n);
			memcpy(c->model + off, buf, n);
		}
	}
	return NULL;
}

static gpointer reader_main(gpointer opaque)
{
	struct worker *wk = opaque;
	struct conc *c = wk->c;
	g_autoptr(GRand) r = g_rand_new_with_seed(c->seed + 100 + wk->id);
	uint8_t buf[4096];

	while (!g_atomic_int_get(&c->stop)) {
		uint64_t off = g_rand_int_range(r, 0, c->size);
		uint64_t n = g_rand_int_range(r, 1, sizeof(buf));
		ssize_t res = blockdev_pread_bytes_sync(c->dev, buf, n, off);

		g_assert_cmpint(res, ==, (ssize_t)MIN(n, c->size - off));
	}
	return NULL;
}

static void test_concurrency(gconstpointer data)
{
	uint32_t ss = GPOINTER_TO_UINT(data);
	struct conc c = { 0 };
	struct worker w[NWRITERS + NREADERS];
	g_autoptr(GRand) r = NULL;
	g_autoptr(GError) error = NULL;
	uint64_t pos = 0, half_sectors;
	int k = 0;

	c.seed = (guint32)g_test_rand_int();
	r = g_rand_new_with_seed(c.seed);
	c.size = 24 * (uint64_t)ss + 123;
	c.iters = g_test_slow() ? 5000 : 600;
	c.model = g_malloc(c.size);
	fill_random(r, c.model, c.size);
	c.dev = blockdev_mem_new(ss, c.size, c.model, c.size, FALSE);
	blockdev_mem_set_max_request(c.dev, 2 * ss);
	blockdev_mem_set_delay(c.dev, 20);
	half_sectors = 11;
	g_assert_true(blockdev_split(c.dev, half_sectors, &c.win[0], &c.win[1], &error));
	c.win_start[0] = 0;
	c.win_size[0] = half_sectors * ss;
	c.win_start[1] = half_sectors * ss;
	c.win_size[1] = c.size - half_sectors * ss;
	for (int i = 0; i < NWRITERS; i++) {
		c.slot_off[i] = g_array_new(FALSE, FALSE, sizeof(uint64_t));
		c.slot_len[i] = g_array_new(FALSE, FALSE, sizeof(uint64_t));
	}
	while (pos < c.size) {
		uint64_t len = (uint64_t)g_rand_int_range(r, 1, ss < 700 ? ss : 700);

		len = MIN(len, c.size - pos);

		g_array_append_val(c.slot_off[k], pos);
		g_array_append_val(c.slot_len[k], len);
		pos += len;
		k = (k + 1) % NWRITERS;
	}
	for (int i = 0; i < NWRITERS + NREADERS; i++) {
		w[i].c = &c;
		w[i].id = i < NWRITERS ? i : i - NWRITERS;
		w[i].thread =
			g_thread_new("worker", i < NWRITERS ? writer_main : reader_main, &w[i]);
	}
	for (int i = 0; i < NWRITERS; i++)
		g_thread_join(w[i].thread);
	g_atomic_int_set(&c.stop, 1);
	for (int i = NWRITERS; i < NWRITERS + NREADERS; i++)
		g_thread_join(w[i].thread);
	if (memcmp(blockdev_mem_data(c.dev), c.model, c.size) != 0) {
		for (uint64_t i = 0; i < c.size; i++)
			if (blockdev_mem_data(c.dev)[i] != c.model[i])
				g_test_message(
					"seed %u: first difference at byte %" G_GUINT64_FORMAT,
					c.seed, i);
		g_assert_not_reached();
	}
	for (int i = 0; i < NWRITERS; i++) {
		g_array_unref(c.slot_off[i]);
		g_array_unref(c.slot_len[i]);
	}
	blockdev_unref(c.win[0]);
	blockdev_unref(c.win[1]);
	blockdev_unref(c.dev);
	g_free(c.model);
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_data_func("/block/bytes/combos/512", GUINT_TO_POINTER(512), test_bytes_combos);
	g_test_add_data_func("/block/bytes/combos/4096", GUINT_TO_POINTER(4096), test_bytes_combos);
	g_test_add_func("/block/bytes/end", test_bytes_end);
	g_test_add_data_func("/block/bytes/zero/512", GUINT_TO_POINTER(512), test_bytes_zero);
	g_test_add_data_func("/block/bytes/zero/4096", GUINT_TO_POINTER(4096), test_bytes_zero);
	g_test_add_data_func("/block/bytes/concurrency/512", GUINT_TO_POINTER(512),
			     test_concurrency);
	g_test_add_data_func("/block/bytes/concurrency/4096", GUINT_TO_POINTER(4096),
			     test_concurrency);
	return g_test_run();
}
