/* test-nbdkit.c: the NBD core against a real nbdkit (memory, pattern, eval, filters). */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "nbdfs/nbd.h"
#include "nbdkit-helper.h"

static void quiet_log(void *opaque, enum nbdc_log_level level, const char *msg)
{
	if (level != NBDC_LOG_DEBUG)
		g_test_message("log: %s", msg);
	else if (opaque)
		g_atomic_int_inc((gint *)opaque);
}

/* Connects to a fresh `nbdkit -s ARGS...` over a socketpair. */
static Nbdc *connect_fd(struct nbdkit **kp, struct nbdc_config *cfg, const char *const *args)
{
	g_autoptr(GError) err = NULL;
	struct nbdkit *k = nbdkit_start_fd(args);

	cfg->fd = k->fd;
	k->fd = -1;
	if (!cfg->log)
		cfg->log = quiet_log;
	Nbdc *c = nbdc_connect(cfg, &err);
	g_assert_no_error(err);
	g_assert_nonnull(c);
	*kp = k;
	return c;
}

static void test_connect_info(void)
{
	struct nbdc_config cfg;
	struct nbdkit *k;
	struct nbdc_info info;
	const char *args[] = { "memory", "1M", NULL };

	nbdc_config_init(&cfg);
	Nbdc *c = connect_fd(&k, &cfg, args);
	nbdc_get_info(c, &info);
	g_assert_cmpuint(info.size, ==, 1 << 20);
	g_assert_cmpuint(info.sector_size, ==, 512);
	g_assert_cmpuint(info.size_sectors, ==, 2048);
	g_assert_true(info.read_write);
	g_assert_true(info.can_flush);
	g_assert_true(info.can_fua);
	g_assert_true(info.can_trim);
	g_assert_true(info.can_zero);
	g_assert_true(info.can_multi_conn);
	g_assert_true(info.structured_replies);
	g_assert_true(info.can_block_status);
	g_assert_false(info.tls);
	g_assert_cmpuint(info.connections, ==, 1);    /* a single fd */
	g_assert_cmpstr(info.protocol, ==, "newstyle-fixed");
	g_assert_cmpstr(info.export_name, ==, "");
	g_assert_nonnull(info.description);
	g_assert_cmpuint(info.max_request, ==, 32u << 20);
	g_assert_true(nbdc_is_alive(c));
	g_assert_null(nbdc_get_error(c));
	nbdc_free(c);
	nbdkit_stop(k);
}

static void test_read_write(void)
{
	struct nbdc_config cfg;
	struct nbdkit *k;
	const char *args[] = { "memory", "1M", NULL };
	g_autofree uint8_t *buf = g_malloc(65536), *back = g_malloc(65536);

	nbdc_config_init(&cfg);
	Nbdc *c = connect_fd(&k, &cfg, args);
	for (int i = 0; i < 65536; i++)
		buf[i] = (uint8_t)(i * 7 + 3);
	g_assert_cmpint(nbdc_pwrite(c, buf, 65536, 4096, 0), ==, 0);
	g_assert_cmpint(nbdc_pwrite(c, buf, 512, 0, NBDC_CMD_FLAG_FUA), ==, 0);
	g_assert_cmpint(nbdc_flush(c), ==, 0);
	g_assert_cmpint(nbdc_pread(c, back, 65536, 4096, 0), ==, 0);
	g_assert_cmpmem(buf, 65536, back, 65536);
	g_assert_cmpint(nbdc_pread(c, back, 512, 0, 0), ==, 0);
	g_assert_cmpmem(buf, 512, back, 512);
	/* bounds */
	g_assert_cmpint(nbdc_pread(c, back, 512, (1 << 20) - 256, 0), ==, -EINVAL);
	g_assert_cmpint(nbdc_pwrite(c, buf, 512, (1 << 20) - 256, 0), ==, -ENOSPC);
	g_assert_cmpint(nbdc_pread(c, back, 1, UINT64_MAX, 0), ==, -EINVAL);
	g_assert_cmpint(nbdc_pread(c, back, 0, 0, 0), ==, 0);
	nbdc_disconnect(c);
	g_assert_false(nbdc_is_alive(c));
	g_assert_cmpint(nbdc_pread(c, back, 512, 0, 0), ==, -ENOTCONN);
	nbdc_disconnect(c);     /* idempotent */
	nbdc_free(c);
	nbdkit_stop(k);
}

struct async_ctx {
	GMutex m;
	GCond cv;
	int pending;
	int errors;
	int first_err;
};

static void async_done(void *opaque, int err)
{
	struct async_ctx *a = opaque;

	g_mutex_lock(&a->m);
	if (err) {
		a->errors++;
		if (!a->first_err)
			a->first_err = err;
	}
	a->pending--;
	g_cond_broadcast(&a->cv);
	g_mutex_unlock(&a->m);
}

static void async_wait(struct async_ctx *a)
{
	gint64 until = g_get_monotonic_time() + 60 * G_USEC_PER_SEC;

	g_mutex_lock(&a->m);
	while (a->pending > 0)
		g_assert_true(g_cond_wait_until(&a->cv, &a->m, until));
	g_mutex_unlock(&a->m);
}

/* Unix socket, default connections (4 with multi-conn), 256 async writes
 * then reads spread over all connections, in any order. */
static void test_unix_multiconn_async(void)
{
	struct nbdc_config cfg;
	struct nbdc_info info;
	const char *args[] = { "memory", "4M", NULL };
	struct nbdkit *k = nbdkit_start_unix(args);
	g_autoptr(GError) err = NULL;
	struct async_ctx a = { 0 };
	enum { N = 256, BS = 16384 };
	g_autofree uint8_t *wbuf = g_malloc(N * BS), *rbuf = g_malloc0(N * BS);
	struct iovec wv[N], rv[N * 2];

	nbdc_config_init(&cfg);
	cfg.socket_path = k->socket;
	cfg.log = quiet_log;
	cfg.max_in_flight = 8;
	Nbdc *c = nbdc_connect(&cfg, &err);
	g_assert_no_error(err);
	nbdc_get_info(c, &info);
	g_assert_cmpuint(info.connections, ==, 4);
	g_assert_true(info.can_multi_conn);

	for (int i = 0; i < N * BS; i++)
		wbuf[i] = (uint8_t)g_random_int();
	g_mutex_init(&a.m);
	g_cond_init(&a.cv);
	a.pending = N;
	for (int i = 0; i < N; i++) {
		wv[i].iov_base = wbuf + (size_t)i * BS;
		wv[i].iov_len = BS;
		g_assert_cmpint(nbdc_aio_pwritev(c, &wv[i], 1, (uint64_t)i * BS, 0, async_done, &a),
				==, 0);
	}
	async_wait(&a);
	g_assert_cmpint(a.errors, ==, 0);
	g_assert_cmpint(nbdc_flush(c), ==, 0);
	/* reads scattered over two iovecs each (uneven split) */
	a.pending = N;
	for (int i = 0; i < N; i++) {
		rv[2 * i].iov_base = rbuf + (size_t)i * BS;
		rv[2 * i].iov_len = 1000;
		rv[2 * i + 1].iov_base = rbuf + (size_t)i * BS + 1000;
		rv[2 * i + 1].iov_len = BS - 1000;
		g_assert_cmpint(nbdc_aio_preadv(c, &rv[2 * i], 2, (uint64_t)i * BS, 0, async_done, &a),
				==, 0);
	}
	async_wait(&a);
	g_assert_cmpint(a.errors, ==, 0);
	g_assert_cmpmem(wbuf, N * BS, rbuf, N * BS);
	/* one big read over the whole range as a single iovec array */
	memset(rbuf, 0, N * BS);
	a.pending = 1;
	g_assert_cmpint(nbdc_aio_preadv(c, rv, 2 * N, 0, 0, async_done, &a), ==, 0);
	async_wait(&a);
	g_assert_cmpmem(wbuf, N * BS, rbuf, N * BS);
	nbdc_disconnect(c);
	g_assert_cmpstr(nbdc_get_error(c), !=, NULL);
	nbdc_free(c);
	g_mutex_clear(&a.m);
	g_cond_clear(&a.cv);
	nbdkit_stop(k);
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_autofree char *nbdkit = g_find_program_in_path("nbdkit");
	if (!nbdkit) {
		g_test_skip("nbdkit not installed");
		return 0;
	}
	g_test_add_func("/nbdkit/connect-info", test_connect_info);
	g_test_add_func("/nbdkit/read-write", test_read_write);
	g_test_add_func("/nbdkit/unix-multiconn-async", test_unix_multiconn_async);
	return g_test_run();
}
