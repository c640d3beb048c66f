/* test-nbd-dev.c: the NBD Blockdev against a real nbdkit: I/O, a size that
 * is not a sector multiple, sector sizes, read-only, and reconnection
 * (server restarted on the same socket; server gone for good). */
#include "config.h"

#include <errno.h>
#include <gio/gio.h>
#include <glib/gstdio.h>
#include <string.h>

#include "nbdfs/blockdev-nbd.h"
#include "nbdfs/loop.h"

#define DEADLINE_US (30 * G_USEC_PER_SEC)

struct server {
	char *dir;
	char *sock;
	char *pidfile;
	GSubprocess *proc;
};

static void server_start(struct server *s, const char *const *args)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(GPtrArray) argv = g_ptr_array_new();
	gint64 deadline = g_get_monotonic_time() + DEADLINE_US;

	g_ptr_array_add(argv, (char *)"nbdkit");
	g_ptr_array_add(argv, (char *)"-f");
	g_ptr_array_add(argv, (char *)"--exit-with-parent");
	g_ptr_array_add(argv, (char *)"-U");
	g_ptr_array_add(argv, s->sock);
	/* nbdkit writes the pid file once it accepts connections. */
	g_ptr_array_add(argv, (char *)"-P");
	g_ptr_array_add(argv, s->pidfile);
	for (; *args; args++)
		g_ptr_array_add(argv, (char *)*args);
	g_ptr_array_add(argv, NULL);
	g_unlink(s->sock);
	g_unlink(s->pidfile);
	s->proc = g_subprocess_newv((const char *const *)argv->pdata, G_SUBPROCESS_FLAGS_NONE,
				    &error);
	g_assert_no_error(error);
	while (!g_file_test(s->pidfile, G_FILE_TEST_EXISTS)) {
		g_assert_cmpint(g_get_monotonic_time(), <, deadline);
		g_assert_nonnull(g_subprocess_get_identifier(s->proc));
		g_usleep(10000);
	}
}

static void server_kill(struct server *s)
{
	if (!s->proc)
		return;
	g_subprocess_force_exit(s->proc);
	g_subprocess_wait(s->proc, NULL, NULL);
	g_clear_object(&s->proc);
}

static void server_init(struct server *s)
{
	g_autoptr(GError) error = NULL;

	s->dir = g_dir_make_tmp("nbdfs-block-XXXXXX", &error);
	g_assert_no_error(error);
	s->sock = g_build_filename(s->dir, "sock", NULL);
	s->pidfile = g_build_filename(s->dir, "pid", NULL);
	s->proc = NULL;
}

static void server_fini(struct server *s)
{
	server_kill(s);
	g_unlink(s->sock);
	g_unlink(s->pidfile);
	g_free(s->sock);
	g_free(s->pidfile);
	{
		g_autofree char *f = g_build_filename(s->dir, "disk", NULL);

		g_unlink(f);
	}
	g_rmdir(s->dir);
	g_free(s->dir);
}

/* A fresh @s serving nbdkit @args. */
static void server_up(struct server *s, const char *const *args)
{
	server_init(s);
	server_start(s, args);
}

static Blockdev *connect_dev(struct server *s, guint timeout_s, uint32_t sector_size,
			     gboolean read_only, GError **error)
{
	struct nbdc_config cfg;
	struct blockdev_nbd_opts opts = {
		.sector_size = sector_size,
		.timeout_s = timeout_s,
		.read_only = read_only,
		.uri = "nbd+unix:///?socket=test",
	};

	nbdc_config_init(&cfg);
	cfg.socket_path = s->sock;
	return blockdev_nbd_new(&cfg, &opts, error);
}

/* A read-write device on @s with the server's sector size; it must connect. */
static Blockdev *connect_ok(struct server *s, guint timeout_s)
{
	g_autoptr(GError) error = NULL;
	Blockdev *dev = connect_dev(s, timeout_s, 0, FALSE, &error);

	g_assert_no_error(error);
	return dev;
}

static void test_nbd_basic(void)
{
	const char *args[] = { "memory", "1M", NULL };
	struct server s;
	g_autoptr(GError) error = NULL;
	g_autoptr(Blockdev) dev = NULL;
	struct blockdev_info info;
	uint8_t wbuf[3000], rbuf[3000];
	Blockdev *a, *b;

	server_up(&s, args);
	dev = connect_ok(&s, 5);
	blockdev_get_info(dev, &info);
	g_assert_cmpuint(info.size, ==, 1024 * 1024);
	g_assert_cmpuint(info.sector_size, ==, 512);
	g_assert_cmpuint(info.sectors, ==, 2048);
	g_assert_true(info.read_write);
	g_assert_cmpstr(info.uri, ==, "nbd+unix:///?socket=test");

	for (size_t i = 0; i < sizeof(wbuf); i++)
		wbuf[i] = (uint8_t)(i * 7 + 3);
	g_assert_cmpint(blockdev_write_sync(dev, 10, wbuf, 1024, BLOCKDEV_FUA), ==, 0);
	g_assert_cmpint(blockdev_read_sync(dev, 10, rbuf, 1024), ==, 0);
	g_assert_cmpmem(rbuf, 1024, wbuf, 1024);
	g_assert_cmpint(blockdev_flush_sync(dev), ==, 0);
	g_assert_cmpint(blockdev_read_sync(dev, 2048, rbuf, 512), ==, -EINVAL);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, wbuf, 3000, 100001, 0), ==, 3000);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, rbuf, 3000, 100001), ==, 3000);
	g_assert_cmpmem(rbuf, 3000, wbuf, 3000);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, rbuf, 3000, 1024 * 1024 - 10), ==, 10);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, wbuf, 3000, 1024 * 1024, 0), ==, -ENOSPC);

	/* Through a partition. */
	g_assert_true(blockdev_split(dev, 100, &a, &b, &error));
	g_assert_cmpint(blockdev_pwrite_bytes_sync(b, wbuf, 700, 50, 0), ==, 700);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, rbuf, 700, 100 * 512 + 50), ==, 700);
	g_assert_cmpmem(rbuf, 700, wbuf, 700);
	blockdev_disconnect(b);
	g_assert_cmpint(blockdev_read_sync(a, 0, rbuf, 512), ==, 0);
	blockdev_unref(a);
	blockdev_unref(b);

	blockdev_disconnect(dev);
	g_assert_cmpint(blockdev_read_sync(dev, 0, rbuf, 512), ==, -ENOTCONN);
	g_clear_pointer(&dev, blockdev_unref);
	server_fini(&s);
}

static void test_nbd_partial(void)
{
	const char *args[] = { "memory", "1000", NULL };
	struct server s;
	g_autoptr(Blockdev) dev = NULL;
	struct blockdev_info info;
	uint8_t buf[1024], rbuf[1100];

	server_up(&s, args);
	dev = connect_ok(&s, 5);
	blockdev_get_info(dev, &info);
	g_assert_cmpuint(info.size, ==, 1000);
	g_assert_cmpuint(info.sectors, ==, 1);
	memset(buf, 0x6b, sizeof(buf));
	/* The partial sector: only the inside is written, the rest reads 0. */
	g_assert_cmpint(blockdev_write_sync(dev, 0, buf, 1024, 0), ==, 0);
	memset(rbuf, 0xff, sizeof(rbuf));
	g_assert_cmpint(blockdev_read_sync(dev, 1, rbuf, 512), ==, 0);
	for (int i = 0; i < 512; i++)
		g_assert_cmpint(rbuf[i], ==, i < 488 ? 0x6b : 0);
	g_assert_cmpint(blockdev_read_sync(dev, 2, rbuf, 512), ==, -EINVAL);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, "xyz", 3, 998, 0), ==, 2);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, rbuf, 1100, 0), ==, 1000);
	g_assert_cmpint(rbuf[997], ==, 0x6b);
	g_assert_cmpint(rbuf[998], ==, 'x');
	g_assert_cmpint(rbuf[999], ==, 'y');
	g_clear_pointer(&dev, blockdev_unref);
	server_fini(&s);
}

static void test_nbd_sector_size(void)
{
	const char *args[] = {
		"--filter=blocksize-policy",	"memory", "1001K", "blocksize-minimum=4096",
		"blocksize-error-policy=error", NULL
	};
	struct server s;
	g_autoptr(GError) error = NULL;
	g_autoptr(Blockdev) dev = NULL;
	struct blockdev_info info;
	g_autofree uint8_t *buf = g_malloc(8192);

	server_up(&s, args);
	dev = connect_dev(&s, 5, 512, FALSE, &error);
	g_assert_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_INVALID);
	g_assert_null(dev);
	g_clear_error(&error);
	dev = connect_dev(&s, 5, 3000, FALSE, &error);
	g_assert_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_INVALID);
	g_clear_error(&error);
	dev = connect_dev(&s, 5, 0, TRUE, &error);
	g_assert_no_error(error);
	blockdev_get_info(dev, &info);
	g_assert_cmpuint(info.sector_size, ==, 4096);
	g_assert_cmpuint(info.sectors, ==, 250);
	g_assert_false(info.read_write);
	memset(buf, 1, 8192);
	g_assert_cmpint(blockdev_write_sync(dev, 0, buf, 4096, 0), ==, -EROFS);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 1, 0, 0), ==, -EROFS);
	g_assert_cmpint(blockdev_read_sync(dev, 249, buf, 4096), ==, 0);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, buf, 100, 5), ==, 100);
	g_clear_pointer(&dev, blockdev_unref);
	server_fini(&s);
}

/* Waits for the asynchronous byte request whose callback is
 * completion_done_bytes(@c), drops the waiter's reference to @c, returns
 * the request's result. */
static ssize_t pending_wait(struct completion *c)
{
	gint64 r = 0;

	g_assert_true(completion_wait_until(c, g_get_monotonic_time() + DEADLINE_US, &r));
	completion_unref(c);
	return r;
}

static void test_nbd_reconnect(void)
{
	struct server s;
	g_autoptr(GError) error = NULL;
	g_autoptr(Blockdev) dev = NULL;
	g_autofree char *file = NULL;
	const char *args[4] = { "file", NULL, NULL, NULL };
	g_autofree char *filearg = NULL;
	uint8_t wbuf[1500], rbuf[1500];
	struct completion *p = completion_new(), *q = completion_new();

	server_init(&s);
	file = g_build_filename(s.dir, "disk", NULL);
	{
		g_autofree char *zeros = g_malloc0(256 * 1024);

		g_assert_true(g_file_set_contents(file, zeros, 256 * 1024, &error));
	}
	filearg = g_strdup_printf("file=%s", file);
	args[1] = filearg;
	server_start(&s, args);
	dev = connect_ok(&s, 30);
	for (size_t i = 0; i < sizeof(wbuf); i++)
		wbuf[i] = (uint8_t)(i * 13 + 1);
	g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, wbuf, 1500, 777, 0), ==, 1500);
	g_assert_cmpint(blockdev_flush_sync(dev), ==, 0);

	/* Outage: requests issued now complete after the restart. */
	server_kill(&s);
	blockdev_pread_bytes(dev, rbuf, 1500, 777, completion_done_bytes, p);
	blockdev_pwrite_bytes(dev, wbuf, 100, 5000, 0, completion_done_bytes, q);
	server_start(&s, args);
	g_assert_cmpint(pending_wait(p), ==, 1500);
	g_assert_cmpmem(rbuf, 1500, wbuf, 1500);
	g_assert_cmpint(pending_wait(q), ==, 100);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, rbuf, 100, 5000), ==, 100);
	g_assert_cmpmem(rbuf, 100, wbuf, 100);

	/* A second outage, noticed by a request in flight: still fine. */
	server_kill(&s);
	server_start(&s, args);
	g_assert_cmpint(blockdev_pread_bytes_sync(dev, rbuf, 1500, 777), ==, 1500);
	g_assert_cmpmem(rbuf, 1500, wbuf, 1500);

	blockdev_disconnect(dev);
	g_clear_pointer(&dev, blockdev_unref);
	server_fini(&s);
}

static void test_nbd_gone(gconstpointer data)
{
	guint timeout_s = GPOINTER_TO_UINT(data);
	const char *args[] = { "memory", "64K", NULL };
	struct server s;
	Blockdev *dev;
	uint8_t buf[512];
	struct completion *p = completion_new();
	ssize_t r;

	server_up(&s, args);
	dev = connect_ok(&s, timeout_s);
	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, 512), ==, 0);
	server_kill(&s);
	if (timeout_s < 10) {
		g_assert_cmpint(blockdev_read_sync(dev, 0, buf, 512), ==, -EIO);
		g_assert_cmpint(blockdev_pwrite_bytes_sync(dev, buf, 10, 3, 0), ==, -EIO);
	}
	/* A pending request when the device is disconnected fails promptly
	 * (with a 600 s timeout, only the disconnect can end it in time). */
	blockdev_pread_bytes(dev, buf, 10, 0, completion_done_bytes, p);
	blockdev_disconnect(dev);
	r = pending_wait(p);
	g_assert_cmpint(r, <, 0);
	if (timeout_s >= 10)
		g_assert_cmpint(r, ==, -ENOTCONN);
	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, 512), ==, -ENOTCONN);
	blockdev_unref(dev);
	server_fini(&s);
}

/* A restarted server with another size is refused until the timeout. */
static void test_nbd_size_changed(void)
{
	const char *args1[] = { "memory", "64K", NULL };
	const char *args2[] = { "memory", "128K", NULL };
	struct server s;
	Blockdev *dev;
	uint8_t buf[512];

	server_up(&s, args1);
	dev = connect_ok(&s, 2);
	server_kill(&s);
	server_start(&s, args2);
	g_assert_cmpint(blockdev_read_sync(dev, 0, buf, 512), ==, -EIO);
	blockdev_disconnect(dev);
	blockdev_unref(dev);
	server_fini(&s);
}

/* ---- block status and concurrent unaligned writers over a real server ---- */

/* Block status shares one opaque between the extent and done callbacks. */
struct bs_collect {
	struct completion *done; /* the done callback's reference */
	GArray *ext;		 /* uint64_t triples: offset, length, flags */
};

static void bs_collect_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct bs_collect *b = opaque;
	uint64_t v[3] = { offset, length, flags };

	g_array_append_vals(b->ext, v, 3);
}

static void bs_collect_done(void *opaque, int err)
{
	struct bs_collect *b = opaque;

	completion_done(b->done, err);
}

static void test_nbd_block_status(void)
{
	const char *args[] = { "memory", "1M", NULL };
	struct server s;
	g_autoptr(GError) error = NULL;
	g_autoptr(Blockdev) dev = NULL;
	g_autoptr(Blockdev) w = NULL;
	struct bs_collect b = { 0 };
	gint64 err = -1;
	uint8_t buf[4096];
	uint64_t covered = 0;
	gboolean saw_data = FALSE;

	server_up(&s, args);
	dev = connect_ok(&s, 5);
	memset(buf, 0x42, sizeof(buf));
	g_assert_cmpint(blockdev_write_sync(dev, 128, buf, 4096, 0), ==, 0);
	/* Through a window starting at sector 64: the data is at window byte 32K. */
	w = blockdev_window_new(dev, 64, 256, &error);
	g_assert_no_error(error);
	b.done = completion_new();
	b.ext = g_array_new(FALSE, FALSE, sizeof(uint64_t));
	blockdev_block_status(w, 0, 256, bs_collect_extent, bs_collect_done, &b);
	g_assert_true(completion_wait_until(b.done, g_get_monotonic_time() + DEADLINE_US, &err));
	completion_unref(b.done);
	g_assert_cmpint(err, ==, 0);
	for (guint i = 0; i < b.ext->len; i += 3) {
		uint64_t off = g_array_index(b.ext, uint64_t, i);
		uint64_t len = g_array_index(b.ext, uint64_t, i + 1);
		uint64_t fl = g_array_index(b.ext, uint64_t, i + 2);

		g_assert_cmpuint(off, ==, covered);
		covered += len;
		g_assert_cmpuint(covered, <=, 256 * 512);
		if (off <= 32768 && off + len >= 32768 + 4096) {
			g_assert_cmpuint(fl & BLOCKDEV_STATE_HOLE, ==, 0);
			saw_data = TRUE;
		}
	}
	g_assert_true(saw_data);
	g_array_unref(b.ext);
	g_clear_pointer(&w, blockdev_unref);
	g_clear_pointer(&dev, blockdev_unref);
	server_fini(&s);
}

#define NW 4
#define CONC_SIZE (16 * 1024 + 300)

struct conc {
	Blockdev *dev, *win; /* win: sectors [8, end) */
	uint8_t *model;
	guint32 seed;
};

struct conc_worker {
	struct conc *c;
	int id;
};

/* Writer @id owns the bytes whose (offset / 97) % NW == id: slots of 97
 * bytes dealt round-robin, so neighbours share sectors. */
static gpointer conc_writer(gpointer opaque)
{
	struct conc_worker *wk = opaque;
	struct conc *c = wk->c;
	g_autoptr(GRand) r = g_rand_new_with_seed(c->seed + wk->id);
	uint8_t buf[97];

	for (int it = 0; it < 150; it++) {
		uint64_t slot = (uint64_t)g_rand_int_range(r, 0, CONC_SIZE / 97 / NW) * NW + wk->id;
		uint64_t a = g_rand_int_range(r, 0, 97);
		uint64_t n = g_rand_int_range(r, 1, 97 - a + 1);
		uint64_t off = slot * 97 + a;
		ssize_t res;

		for (uint64_t i = 0; i < n; i++)
			buf[i] = (uint8_t)g_rand_int(r);
		if (off >= 8 * 512 && g_rand_boolean(r))
			res = blockdev_pwrite_bytes_sync(c->win, buf, n, off - 8 * 512, 0);
		else
			res = blockdev_pwrite_bytes_sync(c->dev, buf, n, off, 0);
		g_assert_cmpint(res, ==, (ssize_t)n);
		memcpy(c->model + off, buf, n);
	}
	return NULL;
}

static void test_nbd_concurrency(void)
{
	g_autofree char *size = g_strdup_printf("%d", CONC_SIZE);
	const char *args[] = { "memory", size, NULL };
	struct server s;
	g_autoptr(GError) error = NULL;
	struct conc c = { 0 };
	struct conc_worker wk[NW];
	GThread *t[NW];
	g_autofree uint8_t *back = g_malloc(CONC_SIZE);

	server_up(&s, args);
	c.dev = connect_ok(&s, 5);
	c.win = blockdev_window_new(c.dev, 8, (CONC_SIZE + 511) / 512 - 8, &error);
	g_assert_no_error(error);
	c.model = g_malloc0(CONC_SIZE);
	c.seed = (guint32)g_test_rand_int();
	for (int i = 0; i < NW; i++) {
		wk[i].c = &c;
		wk[i].id = i;
		t[i] = g_thread_new("writer", conc_writer, &wk[i]);
	}
	for (int i = 0; i < NW; i++)
		g_thread_join(t[i]);
	g_assert_cmpint(blockdev_pread_bytes_sync(c.dev, back, CONC_SIZE, 0), ==, CONC_SIZE);
	g_assert_cmpmem(back, CONC_SIZE, c.model, CONC_SIZE);
	blockdev_unref(c.win);
	blockdev_unref(c.dev);
	g_free(c.model);
	server_fini(&s);
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	/* Reconnection logs warnings on purpose. */
	g_log_set_always_fatal(G_LOG_FATAL_MASK | G_LOG_LEVEL_CRITICAL);
	g_test_add_func("/block/nbd/basic", test_nbd_basic);
	g_test_add_func("/block/nbd/partial", test_nbd_partial);
	g_test_add_func("/block/nbd/sector-size", test_nbd_sector_size);
	g_test_add_func("/block/nbd/block-status", test_nbd_block_status);
	g_test_add_func("/block/nbd/concurrency", test_nbd_concurrency);
	g_test_add_func("/block/nbd/reconnect", test_nbd_reconnect);
	g_test_add_data_func("/block/nbd/gone/0", GUINT_TO_POINTER(0), test_nbd_gone);
	g_test_add_data_func("/block/nbd/gone/1", GUINT_TO_POINTER(1), test_nbd_gone);
	g_test_add_data_func("/block/nbd/gone/600", GUINT_TO_POINTER(600), test_nbd_gone);
	g_test_add_func("/block/nbd/size-changed", test_nbd_size_changed);
	return g_test_run();
}
