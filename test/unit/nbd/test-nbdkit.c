/* test-nbdkit.c: the NBD core against a real nbdkit (memory, pattern, eval, filters). */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

#include "nbdfs/loop.h"
#include "nbdfs/nbd.h"
#include "nbdkit-helper.h"

static void quiet_log(void *opaque, enum nbdc_log_level level, const char *msg)
{
	if (level != NBDC_LOG_DEBUG)
		g_test_message("log: %s", msg);
	else if (opaque)
		g_atomic_int_inc((gint *)opaque);
}

static struct debug_count {
	gint lines;
	GMutex m;
	GString *text;
} dbg;

static void capture_log(void *opaque, enum nbdc_log_level level, const char *msg)
{
	g_mutex_lock(&dbg.m);
	if (!dbg.text)
		dbg.text = g_string_new(NULL);
	g_string_append_printf(dbg.text, "%d %s\n", level, msg);
	g_mutex_unlock(&dbg.m);
}

static char *captured(void)
{
	g_mutex_lock(&dbg.m);
	char *s = dbg.text ? g_string_free(dbg.text, FALSE) : g_strdup("");
	dbg.text = NULL;
	g_mutex_unlock(&dbg.m);
	return s;
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
	g_assert_cmpuint(info.connections, ==, 1); /* a single fd */
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
	nbdc_disconnect(c); /* idempotent */
	nbdc_free(c);
	nbdkit_stop(k);
}

/* Waits (60 s at most) for the done callbacks (completion_done) of @n async
 * requests, drops the waiter's references; returns how many failed. */
static int async_wait(struct completion **cs, int n)
{
	gint64 until = g_get_monotonic_time() + 60 * G_USEC_PER_SEC;
	int errors = 0;

	for (int i = 0; i < n; i++) {
		gint64 err = 0;

		g_assert_true(completion_wait_until(cs[i], until, &err));
		completion_unref(cs[i]);
		errors += err != 0;
	}
	return errors;
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
	enum { N = 256, BS = 16384 };
	struct completion *cs[N];
	g_autofree uint8_t *wbuf = g_malloc(N * BS), *rbuf = g_malloc0(N * BS);
	struct iovec wv[N], rv[N * 2];

	nbdc_config_init(&cfg);
	cfg.socket_path = k->socket;
	cfg.log = capture_log;
	cfg.debug = TRUE;
	cfg.max_in_flight = 8;
	Nbdc *c = nbdc_connect(&cfg, &err);
	g_assert_no_error(err);
	nbdc_get_info(c, &info);
	g_assert_cmpuint(info.connections, ==, 4);
	g_assert_true(info.can_multi_conn);

	for (int i = 0; i < N * BS; i++)
		wbuf[i] = (uint8_t)g_random_int();
	for (int i = 0; i < N; i++) {
		wv[i].iov_base = wbuf + (size_t)i * BS;
		wv[i].iov_len = BS;
		cs[i] = completion_new();
		g_assert_cmpint(
			nbdc_aio_pwritev(c, &wv[i], 1, (uint64_t)i * BS, 0, completion_done, cs[i]),
			==, 0);
	}
	g_assert_cmpint(async_wait(cs, N), ==, 0);
	g_assert_cmpint(nbdc_flush(c), ==, 0);
	/* every connection carried requests */
	g_autofree char *log = captured();
	for (int i = 0; i < 4; i++) {
		g_autofree char *tag = g_strdup_printf(" conn=%d", i);
		g_assert_nonnull(strstr(log, tag));
	}
	/* reads scattered over two iovecs each (uneven split) */
	for (int i = 0; i < N; i++) {
		rv[2 * i].iov_base = rbuf + (size_t)i * BS;
		rv[2 * i].iov_len = 1000;
		rv[2 * i + 1].iov_base = rbuf + (size_t)i * BS + 1000;
		rv[2 * i + 1].iov_len = BS - 1000;
		cs[i] = completion_new();
		g_assert_cmpint(nbdc_aio_preadv(c, &rv[2 * i], 2, (uint64_t)i * BS, 0,
						completion_done, cs[i]),
				==, 0);
	}
	g_assert_cmpint(async_wait(cs, N), ==, 0);
	g_assert_cmpmem(wbuf, N * BS, rbuf, N * BS);
	/* one big read over the whole range as a single iovec array */
	memset(rbuf, 0, N * BS);
	cs[0] = completion_new();
	g_assert_cmpint(nbdc_aio_preadv(c, rv, 2 * N, 0, 0, completion_done, cs[0]), ==, 0);
	async_wait(cs, 1);
	g_assert_cmpmem(wbuf, N * BS, rbuf, N * BS);
	nbdc_disconnect(c);
	g_assert_cmpstr(nbdc_get_error(c), !=, NULL);
	nbdc_free(c);
	nbdkit_stop(k);
}

/* ---- helpers for the tests below ---- */

static struct nbdkit *kit_v(gboolean tcp, const char *first, va_list ap)
{
	g_autoptr(GPtrArray) a = g_ptr_array_new();

	for (const char *s = first; s; s = va_arg(ap, const char *))
		g_ptr_array_add(a, (char *)s);
	g_ptr_array_add(a, NULL);
	return nbdkit_start_unix_or_tcp((const char *const *)a->pdata, tcp);
}

/* nbdkit -U SOCK ARGS... (NULL-terminated) */
static struct nbdkit *kit(const char *first, ...) G_GNUC_NULL_TERMINATED;
static struct nbdkit *kit(const char *first, ...)
{
	va_list ap;

	va_start(ap, first);
	struct nbdkit *k = kit_v(FALSE, first, ap);
	va_end(ap);
	return k;
}

static void cfg_unix(struct nbdc_config *cfg, struct nbdkit *k)
{
	nbdc_config_init(cfg);
	cfg->socket_path = k->socket;
	cfg->log = capture_log;
}

static Nbdc *must_connect(const struct nbdc_config *cfg)
{
	g_autoptr(GError) err = NULL;
	Nbdc *c = nbdc_connect(cfg, &err);

	g_assert_no_error(err);
	return c;
}

/* Connects and expects a failure of @kind whose message contains @sub. */
static void connect_fails(const struct nbdc_config *cfg, int kind, const char *sub)
{
	g_autoptr(GError) err = NULL;
	Nbdc *c = nbdc_connect(cfg, &err);

	g_assert_null(c);
	g_assert_nonnull(err);
	g_test_message("error: %s", err->message);
	g_assert_error(err, NBDC_ERROR, kind);
	if (sub && !strstr(err->message, sub))
		g_error("message '%s' lacks '%s'", err->message, sub);
}

static void test_tcp(void)
{
	const char *args[] = { "memory", "1M", NULL };
	struct nbdkit *k = nbdkit_start_tcp(args);
	struct nbdc_config cfg;
	struct nbdc_info info;
	g_autofree char *port = g_strdup_printf("%d", k->port);
	char buf[512] = "hello";
	char back[512];

	nbdc_config_init(&cfg);
	cfg.host = "127.0.0.1";
	cfg.port = port;
	cfg.connections = 2;
	cfg.log = capture_log;
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_cmpuint(info.connections, ==, 2);
	g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), 512, 0), ==, 0);
	g_assert_cmpint(nbdc_pread(c, back, sizeof(back), 512, 0), ==, 0);
	g_assert_cmpmem(buf, sizeof(buf), back, sizeof(back));
	nbdc_free(c);
	/* nothing listening */
	nbdkit_stop(k);
	connect_fails(&cfg, NBDC_ERROR_CONNECT, "127.0.0.1");
	g_free(captured());
}

static void test_unknown_export(void)
{
	struct nbdkit *k = kit("--filter=exportname", "memory", "1M", "exportname-strict=true",
			       "exportname=a", NULL);
	struct nbdc_config cfg;

	cfg_unix(&cfg, k);
	cfg.export_name = "zzz";
	g_autofree char *want = g_strdup_printf(
		"nbd+unix:///zzz?socket=%s: export 'zzz': server does not know this export",
		k->socket);
	connect_fails(&cfg, NBDC_ERROR_NO_EXPORT, want);
	cfg.export_name = "a";
	Nbdc *c = must_connect(&cfg);
	struct nbdc_info info;
	nbdc_get_info(c, &info);
	g_assert_cmpstr(info.export_name, ==, "a");
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

static void test_oldstyle(void)
{
	struct nbdkit *k = kit("-o", "memory", "1M", NULL);
	struct nbdc_config cfg;
	struct nbdc_info info;
	g_autoptr(GError) err = NULL;
	char buf[4096];

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_cmpstr(info.protocol, ==, "oldstyle");
	g_assert_false(info.structured_replies);
	g_assert_false(info.can_block_status);
	g_assert_cmpuint(info.size, ==, 1 << 20);
	memset(buf, 0x5a, sizeof(buf));
	g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), 8192, 0), ==, 0);
	memset(buf, 0, sizeof(buf));
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 8192, 0), ==, 0);
	g_assert_cmpint(buf[100], ==, 0x5a);
	nbdc_free(c);
	GPtrArray *l = nbdc_list_exports(&cfg, FALSE, &err);
	g_assert_null(l);
	g_assert_error(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED);
	g_clear_error(&err);
	cfg.tls = TRUE;
	connect_fails(&cfg, NBDC_ERROR_TLS, "oldstyle");
	nbdkit_stop(k);
	g_free(captured());
}

static void test_newstyle_nonfixed(void)
{
	struct nbdkit *k = kit("--mask-handshake=0", "--filter=exportname", "memory", "1M",
			       "exportname-strict=true", "exportname=a", NULL);
	struct nbdc_config cfg;
	struct nbdc_info info;
	g_autoptr(GError) err = NULL;

	cfg_unix(&cfg, k);
	cfg.export_name = "a";
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_cmpstr(info.protocol, ==, "newstyle");
	g_assert_false(info.structured_replies);
	char buf[512];
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, 0);
	nbdc_free(c);
	GPtrArray *l = nbdc_list_exports(&cfg, FALSE, &err);
	g_assert_null(l);
	g_assert_error(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED);
	/* unknown export via EXPORT_NAME: the server just closes */
	cfg.export_name = "nope";
	connect_fails(&cfg, NBDC_ERROR_NO_EXPORT, "export 'nope'");
	nbdkit_stop(k);
	/* NO_ZEROES without fixed newstyle */
	k = kit("--mask-handshake=2", "memory", "1M", NULL);
	cfg_unix(&cfg, k);
	c = must_connect(&cfg);
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, 0);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

static void test_no_sr(void)
{
	struct nbdkit *k = kit("--no-sr", "--filter=error", "memory", "1M", "error-pread=EIO",
			       "error-pread-rate=0%", NULL);
	struct nbdc_config cfg;
	struct nbdc_info info;
	char buf[4096];

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_false(info.structured_replies);
	g_assert_false(info.can_block_status);
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, 0);
	g_assert_cmpint(nbdc_block_status(c, 4096, 0, 0, NULL, NULL), ==, -EOPNOTSUPP);
	nbdc_free(c);
	nbdkit_stop(k);
	/* also when the client does not ask */
	k = kit("memory", "1M", NULL);
	cfg_unix(&cfg, k);
	cfg.structured_replies = FALSE;
	c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_false(info.structured_replies);
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 4096, 0), ==, 0);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

static void test_server_errors(void)
{
	struct nbdkit *k = kit("--filter=error", "memory", "1M", "error-pwrite=ENOSPC",
			       "error-pwrite-rate=100%", "error-pread=EIO", "error-pread-rate=100%",
			       "error-trim=EPERM", "error-trim-rate=100%", NULL);
	struct nbdc_config cfg;
	char buf[4096] = { 0 };

	for (int sr = 1; sr >= 0; sr--) {
		cfg_unix(&cfg, k);
		cfg.structured_replies = sr;
		Nbdc *c = must_connect(&cfg);
		g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), 0, 0), ==, -ENOSPC);
		g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, -EIO);
		g_assert_cmpint(nbdc_trim(c, 4096, 0, 0), ==, -EPERM);
		/* the connection survives server errors */
		g_assert_true(nbdc_is_alive(c));
		g_assert_cmpint(nbdc_flush(c), ==, 0);
		nbdc_free(c);
	}
	nbdkit_stop(k);
	g_free(captured());
}

static void test_read_only(void)
{
	struct nbdkit *k = kit("-r", "memory", "1M", NULL);
	struct nbdc_config cfg;
	struct nbdc_info info;
	char buf[512] = { 0 };

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_false(info.read_write);
	g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), 0, 0), ==, -EROFS);
	g_assert_cmpint(nbdc_trim(c, 512, 0, 0), ==, -EROFS);
	g_assert_cmpint(nbdc_zero(c, 512, 0, 0), ==, -EROFS);
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, 0);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

struct extents {
	uint64_t next;
	int n;
	uint64_t off[64], len[64];
	uint32_t flags[64];
};

static void on_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct extents *e = opaque;

	g_assert_cmpuint(offset, ==, e->next); /* in order, contiguous */
	g_assert_cmpuint(length, >, 0);
	e->next = offset + length;
	if (e->n < 64) {
		e->off[e->n] = offset;
		e->len[e->n] = length;
		e->flags[e->n] = flags;
	}
	e->n++;
}

static void test_trim_zero_block_status(void)
{
	struct nbdkit *k = kit("memory", "1M", NULL);
	struct nbdc_config cfg;
	g_autofree uint8_t *buf = g_malloc(65536);
	struct extents e = { 0 };

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	memset(buf, 0xff, 65536);
	g_assert_cmpint(nbdc_pwrite(c, buf, 65536, 65536, 0), ==, 0);
	e.next = 0;
	g_assert_cmpint(nbdc_block_status(c, 1 << 20, 0, 0, on_extent, &e), ==, 0);
	g_assert_cmpint(e.n, >=, 2);
	g_assert_cmpuint(e.next, <=, 1 << 20);
	/* the first extent is a hole (memory plugin: sparse) */
	g_assert_cmpuint(e.off[0], ==, 0);
	g_assert_true(e.flags[0] & NBDC_STATE_HOLE);
	/* the written range is data */
	gboolean found = FALSE;
	for (int i = 0; i < MIN(e.n, 64); i++)
		if (e.off[i] <= 65536 && e.off[i] + e.len[i] > 65536)
			found = !(e.flags[i] & NBDC_STATE_HOLE);
	g_assert_true(found);
	/* REQ_ONE: one extent */
	memset(&e, 0, sizeof(e));
	e.next = 65536;
	g_assert_cmpint(nbdc_block_status(c, 4096, 65536, NBDC_CMD_FLAG_REQ_ONE, on_extent, &e), ==,
			0);
	g_assert_cmpint(e.n, ==, 1);
	g_assert_cmpuint(e.len[0], <=, 4096);

	/* zero and trim */
	g_assert_cmpint(nbdc_zero(c, 4096, 65536, 0), ==, 0);
	g_assert_cmpint(nbdc_zero(c, 4096, 65536 + 4096, NBDC_CMD_FLAG_NO_HOLE | NBDC_CMD_FLAG_FUA),
			==, 0);
	g_assert_cmpint(nbdc_pread(c, buf, 8192, 65536, 0), ==, 0);
	for (int i = 0; i < 8192; i++)
		g_assert_cmpint(buf[i], ==, 0);
	g_assert_cmpint(nbdc_trim(c, 65536 - 8192, 65536 + 8192, 0), ==, 0);
	g_assert_cmpint(nbdc_pread(c, buf, 65536, 65536, 0), ==, 0);
	g_assert_cmpint(buf[65535], ==, 0); /* memory plugin trims to zero */
	/* bounds */
	g_assert_cmpint(nbdc_trim(c, 4096, (1 << 20) - 512, 0), ==, -ENOSPC);
	g_assert_cmpint(nbdc_block_status(c, 4096, (1 << 20) - 512, 0, on_extent, &e), ==, -EINVAL);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

/* Block status over more than 4 GiB: several requests, extents in order,
 * covering the whole range. */
static void test_block_status_big(void)
{
	struct nbdkit *k = kit("memory", "6G", NULL);
	struct nbdc_config cfg;
	struct extents e = { 0 };
	char buf[4096];

	cfg_unix(&cfg, k);
	cfg.debug = TRUE;
	Nbdc *c = must_connect(&cfg);
	memset(buf, 1, sizeof(buf));
	g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), (uint64_t)5 << 30, 0), ==, 0);
	g_free(captured());
	g_assert_cmpint(nbdc_block_status(c, (uint64_t)6 << 30, 0, 0, on_extent, &e), ==, 0);
	g_assert_cmpuint(e.next, ==, (uint64_t)6 << 30);
	g_autofree char *log = captured();
	const char *p = strstr(log, "BLOCK_STATUS cookie=");
	g_assert_nonnull(p);
	g_assert_nonnull(strstr(p + 1, "BLOCK_STATUS cookie=")); /* at least two requests */
	nbdc_free(c);
	nbdkit_stop(k);
}

/* nozero filter: no WRITE_ZEROES -> zero emulated by writes; eval without
 * FUA -> FUA emulated by FLUSH; debug logging shows what went on the wire. */
static void test_emulation_and_debug(void)
{
	struct nbdkit *k = kit("--filter=nozero", "memory", "4M", "zeromode=none", NULL);
	struct nbdc_config cfg;
	struct nbdc_info info;
	g_autofree uint8_t *buf = g_malloc(3 << 20);

	cfg_unix(&cfg, k);
	cfg.debug = TRUE;
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_false(info.can_zero);
	memset(buf, 0xaa, 3 << 20);
	g_assert_cmpint(nbdc_pwrite(c, buf, 3 << 20, 0, 0), ==, 0);
	g_assert_cmpint(nbdc_zero(c, (2 << 20) + 4096, 4096, 0), ==, 0);
	g_assert_cmpint(nbdc_zero(c, 512, 0, NBDC_CMD_FLAG_FAST_ZERO), ==, -EOPNOTSUPP);
	g_assert_cmpint(nbdc_pread(c, buf, 3 << 20, 0, 0), ==, 0);
	g_assert_cmpint(buf[4095], ==, 0xaa);
	for (size_t i = 4096; i < (2 << 20) + 8192; i++)
		if (buf[i])
			g_error("byte %zu not zero", i);
	g_assert_cmpint(buf[(2 << 20) + 8192], ==, 0xaa);
	nbdc_free(c);
	g_autofree char *log = captured();
	g_assert_nonnull(strstr(log, "WRITE cookie="));
	g_assert_nonnull(strstr(log, "READ cookie="));
	g_assert_nonnull(strstr(log, "reply cookie="));
	g_assert_null(strstr(log, "WRITE_ZEROES"));
	nbdkit_stop(k);

	k = kit("eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero", "pwrite=cat >/dev/null",
		"can_write=exit 0", "can_flush=exit 0", "flush=exit 0", "can_fua=echo emulate",
		"can_trim=exit 3", NULL);
	cfg_unix(&cfg, k);
	cfg.debug = TRUE;
	c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_true(info.can_flush);
	g_assert_false(info.can_trim);
	g_free(captured());
	g_assert_cmpint(nbdc_pwrite(c, buf, 4096, 0, NBDC_CMD_FLAG_FUA), ==, 0);
	g_assert_cmpint(nbdc_trim(c, 4096, 0, 0), ==, -EOPNOTSUPP);
	g_autofree char *log2 = captured();
	g_test_message("%s", log2);
	/* nbdkit's "emulate" FUA mode advertises FUA itself; either way the write is durable */
	if (!info.can_fua)
		g_assert_nonnull(strstr(log2, "FLUSH cookie="));
	nbdc_free(c);
	nbdkit_stop(k);

	k = kit("eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero", "pwrite=cat >/dev/null",
		"can_write=exit 0", "can_flush=exit 0", "flush=exit 0", "can_fua=echo none", NULL);
	cfg_unix(&cfg, k);
	cfg.debug = TRUE;
	c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_false(info.can_fua);
	g_free(captured());
	g_assert_cmpint(nbdc_pwrite(c, buf, 4096, 0, NBDC_CMD_FLAG_FUA), ==, 0);
	g_autofree char *log3 = captured();
	g_assert_nonnull(strstr(log3, "FLUSH cookie="));
	nbdc_free(c);
	nbdkit_stop(k);
	/* no flush at all: flush is a successful no-op */
	k = kit("eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero", "can_flush=exit 3", NULL);
	cfg_unix(&cfg, k);
	cfg.debug = TRUE;
	c = must_connect(&cfg);
	g_free(captured());
	g_assert_cmpint(nbdc_flush(c), ==, 0);
	g_autofree char *log4 = captured();
	g_assert_null(strstr(log4, "FLUSH"));
	nbdc_free(c);
	nbdkit_stop(k);
}

static void test_block_sizes(void)
{
	struct nbdkit *k = kit("--filter=blocksize-policy", "pattern", "4M",
			       "blocksize-minimum=4096", "blocksize-preferred=64K",
			       "blocksize-maximum=64K", "blocksize-error-policy=error", NULL);
	struct nbdc_config cfg;
	struct nbdc_info info;
	g_autofree uint8_t *buf = g_malloc(1 << 20);

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_cmpuint(info.block_min, ==, 4096);
	g_assert_cmpuint(info.block_pref, ==, 65536);
	g_assert_cmpuint(info.block_max, ==, 65536);
	g_assert_cmpuint(info.sector_size, ==, 4096);
	g_assert_cmpuint(info.size_sectors, ==, 1024);
	g_assert_cmpuint(info.max_request, ==, 65536);
	g_assert_cmpint(nbdc_pread(c, buf, 512, 0, 0), ==, -EINVAL);
	g_assert_cmpint(nbdc_pread(c, buf, 4096, 512, 0), ==, -EINVAL);
	/* 1 MiB read split into 16 pieces of 64K: pattern = offsets */
	g_assert_cmpint(nbdc_pread(c, buf, 1 << 20, 1 << 20, 0), ==, 0);
	for (uint64_t i = 0; i < (1 << 20); i += 8) {
		uint64_t v;
		memcpy(&v, buf + i, 8);
		g_assert_cmpuint(GUINT64_FROM_BE(v), ==, (1 << 20) + i);
	}
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

static void test_list(void)
{
	struct nbdkit *k = kit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
			       "exportname=disk1", "exportname=disk2", "exportname=disk 3",
			       "exportdesc=fixed:test desc", NULL);
	struct nbdc_config cfg;
	g_autoptr(GError) err = NULL;

	cfg_unix(&cfg, k);
	cfg.export_name = "ignored";
	g_autoptr(GPtrArray) l = nbdc_list_exports(&cfg, FALSE, &err);
	g_assert_no_error(err);
	g_assert_cmpuint(l->len, ==, 3);
	struct nbdc_export *e = l->pdata[2];
	g_assert_cmpstr(((struct nbdc_export *)l->pdata[0])->name, ==, "disk1");
	g_assert_cmpstr(e->name, ==, "disk 3");
	g_assert_false(e->has_info);
	g_autoptr(GPtrArray) d = nbdc_list_exports(&cfg, TRUE, &err);
	g_assert_no_error(err);
	g_assert_cmpuint(d->len, ==, 3);
	e = d->pdata[1];
	g_assert_true(e->has_info);
	g_assert_cmpuint(e->size, ==, 1 << 20);
	g_assert_false(e->read_only);
	g_assert_cmpstr(e->description, ==, "test desc");
	nbdkit_stop(k);

	/* 200 exports, with details */
	k = kit("eval", "list_exports=for i in $(seq 1 200); do echo exp$i; done",
		"get_size=echo 1M", "pread=head -c $3 /dev/zero", NULL);
	cfg_unix(&cfg, k);
	g_autoptr(GPtrArray) big = nbdc_list_exports(&cfg, TRUE, &err);
	g_assert_no_error(err);
	g_assert_cmpuint(big->len, ==, 200);
	for (guint i = 0; i < 200; i++) {
		struct nbdc_export *x = big->pdata[i];
		g_autofree char *want = g_strdup_printf("exp%u", i + 1);
		g_assert_cmpstr(x->name, ==, want);
		g_assert_true(x->has_info);
		g_assert_cmpuint(x->size, ==, 1 << 20);
	}
	nbdkit_stop(k);

	/* listing refused: ERR_PLATFORM -> UNSUPPORTED */
	k = kit("--filter=exportname", "memory", "1M", "exportname-list=error", NULL);
	cfg_unix(&cfg, k);
	GPtrArray *none = nbdc_list_exports(&cfg, FALSE, &err);
	g_assert_null(none);
	g_assert_error(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED);
	g_clear_error(&err);
	nbdkit_stop(k);
	g_free(captured());
}

/* TLS with a PSK; plaintext against --tls=require; TLS against --tls=off. */
static void test_tls_psk(void)
{
	g_autoptr(GError) err = NULL;
	g_autofree char *dir = g_dir_make_tmp("nbdc-psk-XXXXXX", &err);
	g_autofree char *psk = g_build_filename(dir, "keys.psk", NULL);
	g_autofree char *arg = g_strdup_printf("--tls-psk=%s", psk);
	struct nbdc_config cfg;
	struct nbdc_info info;
	char buf[512];

	g_assert_no_error(err);
	g_assert_true(
		g_file_set_contents(psk, "alice:0123456789abcdef0123456789abcdef\n", -1, &err));
	struct nbdkit *k = kit("--tls=require", arg, "memory", "1M", NULL);
	cfg_unix(&cfg, k);
	cfg.tls = TRUE;
	cfg.tls_psk_file = psk;
	cfg.tls_username = "alice";
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_true(info.tls);
	g_assert_true(info.structured_replies);
	memset(buf, 7, sizeof(buf));
	g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), 0, 0), ==, 0);
	memset(buf, 0, sizeof(buf));
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, 0);
	g_assert_cmpint(buf[511], ==, 7);
	nbdc_free(c);
	g_autoptr(GPtrArray) l = nbdc_list_exports(&cfg, TRUE, &err);
	g_assert_no_error(err);
	g_assert_cmpuint(l->len, >=, 1);
	/* wrong user */
	cfg.tls_username = "mallory";
	connect_fails(&cfg, NBDC_ERROR_TLS, "no key for user 'mallory'");
	/* plaintext */
	cfg.tls = FALSE;
	connect_fails(&cfg, NBDC_ERROR_TLS_REQUIRED, "requires TLS");
	GPtrArray *none = nbdc_list_exports(&cfg, FALSE, &err);
	g_assert_null(none);
	g_assert_error(err, NBDC_ERROR, NBDC_ERROR_TLS_REQUIRED);
	g_clear_error(&err);
	nbdkit_stop(k);
	/* the server refuses TLS */
	k = kit("--tls=off", "memory", "1M", NULL);
	cfg_unix(&cfg, k);
	cfg.tls = TRUE;
	cfg.tls_psk_file = psk;
	cfg.tls_username = "alice";
	connect_fails(&cfg, NBDC_ERROR_TLS, "policy");
	nbdkit_stop(k);
	unlink(psk);
	rmdir(dir);
	g_free(captured());
}

static void sh(const char *cmd)
{
	g_autoptr(GError) err = NULL;
	int status = 0;
	const char *argv[] = { "/bin/sh", "-ec", cmd, NULL };

	g_assert_true(g_spawn_sync(NULL, (char **)argv, NULL,
				   G_SPAWN_STDOUT_TO_DEV_NULL | G_SPAWN_STDERR_TO_DEV_NULL, NULL,
				   NULL, NULL, NULL, &status, &err));
	g_assert_no_error(err);
	g_assert_true(g_spawn_check_wait_status(status, &err));
}

/* X.509: a CA, a server certificate for "localhost", a client certificate. */
static void test_tls_x509(void)
{
	g_autoptr(GError) err = NULL;
	g_autofree char *dir = g_dir_make_tmp("nbdc-x509-XXXXXX", &err);
	g_autofree char *cmd = g_strdup_printf(
		"cd %s; mkdir srv cli other\n"
		"certtool --generate-privkey --key-type=ecdsa > ca-key.pem\n"
		"printf 'cn = Test CA\\nca\\ncert_signing_key\\nexpiration_days = 30\\n' > "
		"ca.info\n"
		"certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info "
		"--outfile srv/ca-cert.pem\n"
		"cp srv/ca-cert.pem cli/\n"
		"certtool --generate-privkey --key-type=ecdsa > srv/server-key.pem\n"
		"printf 'cn = localhost\\ndns_name = "
		"localhost\\ntls_www_server\\nsigning_key\\nexpiration_days = 30\\n' > s.info\n"
		"certtool --generate-certificate --load-ca-certificate srv/ca-cert.pem "
		"--load-ca-privkey ca-key.pem "
		"--load-privkey srv/server-key.pem --template s.info --outfile "
		"srv/server-cert.pem\n"
		"certtool --generate-privkey --key-type=ecdsa > cli/client-key.pem\n"
		"printf 'cn = client\\ntls_www_client\\nsigning_key\\nexpiration_days = 30\\n' > "
		"c.info\n"
		"certtool --generate-certificate --load-ca-certificate srv/ca-cert.pem "
		"--load-ca-privkey ca-key.pem "
		"--load-privkey cli/client-key.pem --template c.info --outfile "
		"cli/client-cert.pem\n"
		"certtool --generate-privkey --key-type=ecdsa > other-key.pem\n"
		"certtool --generate-self-signed --load-privkey other-key.pem --template ca.info "
		"--outfile other/ca-cert.pem\n",
		dir);
	g_autofree char *srv = g_strdup_printf("--tls-certificates=%s/srv", dir);
	g_autofree char *cli = g_strdup_printf("%s/cli", dir);
	g_autofree char *other = g_strdup_printf("%s/other", dir);
	g_autofree char *rm = g_strdup_printf("rm -rf %s", dir);
	struct nbdc_config cfg;
	struct nbdc_info info;
	char buf[512];

	g_assert_no_error(err);
	sh(cmd);
	struct nbdkit *k = kit("--tls=require", srv, "--tls-verify-peer", "memory", "1M", NULL);
	cfg_unix(&cfg, k);
	cfg.tls = TRUE;
	cfg.tls_certificates = cli;
	cfg.tls_hostname = "localhost";
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_true(info.tls);
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, 0);
	nbdc_free(c);
	/* the name does not match */
	cfg.tls_hostname = "wrong.example";
	connect_fails(&cfg, NBDC_ERROR_TLS, "certificate");
	/* ... unless verification is off */
	cfg.tls_verify_peer = FALSE;
	c = must_connect(&cfg);
	nbdc_free(c);
	/* a CA that did not sign the server */
	cfg.tls_verify_peer = TRUE;
	cfg.tls_hostname = "localhost";
	cfg.tls_certificates = other;
	connect_fails(&cfg, NBDC_ERROR_TLS, "certificate");
	nbdkit_stop(k);
	sh(rm);
	g_free(captured());
}

static void test_multiconn_fallback(void)
{
	struct nbdkit *k =
		kit("--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable", NULL);
	struct nbdc_config cfg;
	struct nbdc_info info;

	cfg_unix(&cfg, k);
	cfg.connections = 3;
	Nbdc *c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_false(info.can_multi_conn);
	g_assert_cmpuint(info.connections, ==, 1);
	nbdc_free(c);
	g_autofree char *log = captured();
	g_assert_nonnull(strstr(log, "multi-conn"));
	nbdkit_stop(k);
	/* the server refuses extra connections: carry on with fewer */
	k = kit("--filter=limit", "memory", "1M", "limit=2", NULL);
	cfg_unix(&cfg, k);
	cfg.connections = 4;
	c = must_connect(&cfg);
	nbdc_get_info(c, &info);
	g_assert_cmpuint(info.connections, ==, 2);
	char buf[512];
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, 0);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

static void test_server_death(void)
{
	struct nbdkit *k = kit("eval", "get_size=echo 4M",
			       "pread=if [ $4 -ge 2097152 ]; then kill -9 $PPID; sleep 1; fi; head "
			       "-c $3 /dev/zero",
			       NULL);
	struct nbdc_config cfg;
	g_autofree char *buf = g_malloc(65536);

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	g_assert_cmpint(nbdc_pread(c, buf, 4096, 0, 0), ==, 0);
	g_assert_cmpint(nbdc_pread(c, buf, 4096, 2 << 20, 0), ==, -ENOTCONN);
	g_assert_false(nbdc_is_alive(c));
	g_assert_nonnull(nbdc_get_error(c));
	g_test_message("error: %s", nbdc_get_error(c));
	g_assert_nonnull(strstr(nbdc_get_error(c), "closed the connection"));
	g_assert_cmpint(nbdc_pread(c, buf, 4096, 0, 0), ==, -ENOTCONN);
	g_assert_cmpint(nbdc_flush(c), ==, -ENOTCONN);
	nbdc_disconnect(c);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

static void test_timeouts(void)
{
	struct nbdkit *k = kit("--filter=delay", "memory", "1M", "delay-read=20", NULL);
	struct nbdc_config cfg;
	char buf[512];

	cfg_unix(&cfg, k);
	cfg.request_timeout_ms = 300;
	Nbdc *c = must_connect(&cfg);
	g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), 0, 0), ==, 0);
	g_assert_cmpint(nbdc_pread(c, buf, sizeof(buf), 0, 0), ==, -ETIMEDOUT);
	g_assert_false(nbdc_is_alive(c));
	g_assert_nonnull(strstr(nbdc_get_error(c), "timed out"));
	nbdc_free(c);
	nbdkit_stop(k);

	/* handshake: the server never answers GO (open hangs) */
	k = kit("eval", "open=sleep 20", "get_size=echo 1M", "pread=head -c $3 /dev/zero", NULL);
	cfg_unix(&cfg, k);
	cfg.handshake_timeout_ms = 300;
	connect_fails(&cfg, NBDC_ERROR_TIMEOUT, "timed out");
	nbdkit_stop(k);
	g_free(captured());
}

/* Completion callbacks that submit more work (as a read-modify-write layer
 * does): a chain of 16 MiB writes and reads, each asked for from the
 * previous one's callback, on one connection. */
struct chain {
	Nbdc *c;
	int step;
	uint8_t *buf;
	struct iovec v;
	struct completion *done; /* dropped by the last step */
};

static void chain_done(void *opaque, int err)
{
	struct chain *ch = opaque;

	g_assert_cmpint(err, ==, 0);
	if (++ch->step == 8) {
		completion_done(ch->done, 0);
		return;
	}
	uint64_t off = (uint64_t)(ch->step % 2) << 24;
	int r = ch->step % 2 ? nbdc_aio_pwritev(ch->c, &ch->v, 1, off, 0, chain_done, ch)
			     : nbdc_aio_preadv(ch->c, &ch->v, 1, off, 0, chain_done, ch);
	g_assert_cmpint(r, ==, 0);
}

static void test_callback_chain(void)
{
	struct nbdkit *k = kit("memory", "32M", NULL);
	struct nbdc_config cfg;
	struct chain ch = { 0 };

	cfg_unix(&cfg, k);
	cfg.connections = 1;
	cfg.max_in_flight = 1;
	Nbdc *c = must_connect(&cfg);
	ch.c = c;
	ch.done = completion_new();
	ch.buf = g_malloc(16 << 20);
	memset(ch.buf, 0x3c, 16 << 20);
	ch.v.iov_base = ch.buf;
	ch.v.iov_len = 16 << 20;
	g_assert_cmpint(nbdc_aio_pwritev(c, &ch.v, 1, 0, 0, chain_done, &ch), ==, 0);
	async_wait(&ch.done, 1);
	g_assert_cmpint(ch.step, ==, 8);
	g_assert_cmpint(ch.buf[(16 << 20) - 1], ==, 0x3c);
	nbdc_free(c);
	g_free(ch.buf);
	nbdkit_stop(k);
	g_free(captured());
}

/* Disconnect with requests in flight: they finish first (bounded wait). */
static void test_disconnect_in_flight(void)
{
	struct nbdkit *k = kit("--filter=delay", "memory", "1M", "delay-read=300ms", NULL);
	struct nbdc_config cfg;
	struct completion *cs[8], *refused = completion_new();
	static char bufs[8][4096];

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	static struct iovec vs[8]; /* must outlive the requests */
	for (int i = 0; i < 8; i++) {
		vs[i].iov_base = bufs[i];
		vs[i].iov_len = 4096;
		cs[i] = completion_new();
		g_assert_cmpint(nbdc_aio_preadv(c, &vs[i], 1, (uint64_t)i * 4096, 0,
						completion_done, cs[i]),
				==, 0);
	}
	nbdc_disconnect(c);
	for (int i = 0; i < 8; i++) /* all finished before nbdc_disconnect returned */
		g_assert_true(completion_is_done(cs[i]));
	g_assert_cmpint(async_wait(cs, 8), ==, 0);
	struct iovec v = { bufs[0], 4096 };
	g_assert_cmpint(nbdc_aio_preadv(c, &v, 1, 0, 0, completion_done, refused), ==, -ENOTCONN);
	completion_done(refused, 0); /* refused: no callback will drop its reference */
	completion_unref(refused);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
}

/* A flush's callback: where it ran. */
struct flush_seen {
	GThread *caller;
	gint other_thread, on_loop;
	struct completion *done; /* dropped here */
};

static void flush_seen_done(void *opaque, int err)
{
	struct flush_seen *f = opaque;

	g_atomic_int_set(&f->other_thread, g_thread_self() != f->caller);
	g_atomic_int_set(&f->on_loop, loop_current() != NULL);
	completion_done(f->done, err);
}

/* nbdc_aio_flush on @c; its result, after checking the callback ran once,
 * on a loop (not inside the caller's call). */
static int flush_from_loop(Nbdc *c)
{
	struct flush_seen f = { .caller = g_thread_self(), .done = completion_new() };
	gint64 err = -1;

	g_assert_cmpint(nbdc_aio_flush(c, flush_seen_done, &f), ==, 0);
	g_assert_true(
		completion_wait_until(f.done, g_get_monotonic_time() + 30 * G_USEC_PER_SEC, &err));
	completion_unref(f.done);
	g_assert_true(f.other_thread);
	g_assert_true(f.on_loop);
	return (int)err;
}

/* A flush with nothing to cover (never wrote, or nothing since the last
 * flush) completes with 0 like any other: later, on a loop, never inside the
 * call; the same after a write, when it goes to the server. */
static void test_flush_nothing_to_cover(void)
{
	struct nbdkit *k = kit("memory", "1M", NULL);
	struct nbdc_config cfg;
	static char buf[4096];

	cfg_unix(&cfg, k);
	Nbdc *c = must_connect(&cfg);
	g_assert_cmpint(flush_from_loop(c), ==, 0);
	g_assert_cmpint(nbdc_pwrite(c, buf, sizeof(buf), 0, 0), ==, 0);
	g_assert_cmpint(flush_from_loop(c), ==, 0);
	g_assert_cmpint(flush_from_loop(c), ==, 0);
	nbdc_free(c);
	nbdkit_stop(k);
	g_free(captured());
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
	g_test_add_func("/nbdkit/tcp", test_tcp);
	g_test_add_func("/nbdkit/unknown-export", test_unknown_export);
	g_test_add_func("/nbdkit/oldstyle", test_oldstyle);
	g_test_add_func("/nbdkit/newstyle-nonfixed", test_newstyle_nonfixed);
	g_test_add_func("/nbdkit/no-sr", test_no_sr);
	g_test_add_func("/nbdkit/server-errors", test_server_errors);
	g_test_add_func("/nbdkit/read-only", test_read_only);
	g_test_add_func("/nbdkit/trim-zero-block-status", test_trim_zero_block_status);
	g_test_add_func("/nbdkit/block-status-big", test_block_status_big);
	g_test_add_func("/nbdkit/emulation-debug", test_emulation_and_debug);
	g_test_add_func("/nbdkit/block-sizes", test_block_sizes);
	g_test_add_func("/nbdkit/list", test_list);
	g_test_add_func("/nbdkit/tls-psk", test_tls_psk);
	g_test_add_func("/nbdkit/tls-x509", test_tls_x509);
	g_test_add_func("/nbdkit/multiconn-fallback", test_multiconn_fallback);
	g_test_add_func("/nbdkit/server-death", test_server_death);
	g_test_add_func("/nbdkit/timeouts", test_timeouts);
	g_test_add_func("/nbdkit/callback-chain", test_callback_chain);
	g_test_add_func("/nbdkit/disconnect-in-flight", test_disconnect_in_flight);
	g_test_add_func("/nbdkit/flush-nothing-to-cover", test_flush_nothing_to_cover);
	return g_test_run();
}
