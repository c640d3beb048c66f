/* test-badserver.c: the NBD client core against a scripted bad server (protocol.md §2).
 *
 * One test per bad-server case (H = handshake, T = transmission, S = structured
 * read chunks, B = block status), plus the positive cases only a fake server
 * can produce (holes, chunks out of order, ERROR_OFFSET, ...).  Each test
 * asserts the exact outcome (GError code, or negative errno) and that the
 * client stays sane: no hang (every step and request is bounded, and a
 * watchdog ends a stuck test), later requests on a dead connection fail with
 * -ENOTCONN, nbdc_get_error() explains, and bytes around read buffers stay
 * untouched.
 */
#include "fake-server.h"
#include "nbdfs/nbd.h"

#include <errno.h>
#include <stdarg.h>
#include <glib/gstdio.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define GUARD 64
#define GUARD_BYTE 0xe7
#define FILL_BYTE 0xaa
#define MiB (1024u * 1024u)

static char *psk_file;     /* alice's key: what the client uses */
static char *psk_file_bob; /* a server that knows only bob */
static char *psk_dir;      /* set in the parent process only */
static const char *current_test = "?";

/* ---- Watchdog: a hung test fails loudly instead of hanging the suite ---- */

static void watchdog_fired(int sig)
{
	static const char msg[] = "Bail out! watchdog: a test hung: ";

	(void)sig;
	if (write(2, msg, sizeof(msg) - 1) < 0 ||
	    write(2, current_test, strlen(current_test)) < 0 || write(2, "\n", 1) < 0)
		_exit(99);
	_exit(99);
}

static void begin(void)
{
	current_test = g_test_get_path();
	alarm(30);
}

/* Diagnostics go to stderr: each test runs in a subprocess whose stderr the
 * suite inherits, while its stdout (TAP) is the parent's business. */
static void note(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

static void note(const char *fmt, ...)
{
	va_list ap;
	g_autofree char *msg = NULL;

	va_start(ap, fmt);
	msg = g_strdup_vprintf(fmt, ap);
	va_end(ap);
	g_printerr("# %s: %s\n", current_test, msg);
}

/* ---- Client configuration ------------------------------------------------ */

static void quiet_log(void *opaque, enum nbdc_log_level level, const char *msg)
{
	if (level >= NBDC_LOG_WARNING)
		note("core warning: %s", msg);
}

typedef struct {
	FakeServer *fs;
	FakeExport e;
	struct nbdc_config cfg;
	Nbdc *c;
} Ctx;

static void ctx_init(Ctx *t)
{
	begin();
	t->fs = fake_server_new();
	fake_export_init(&t->e);
	nbdc_config_init(&t->cfg);
	t->cfg.fd = fake_server_client_fd(t->fs);
	t->cfg.connections = 1;
	t->cfg.handshake_timeout_ms = 5000;
	t->cfg.request_timeout_ms = 5000;
	t->cfg.log = quiet_log;
	t->c = NULL;
}

static void ctx_end(Ctx *t)
{
	nbdc_free(t->c); /* must return: no hang */
	t->c = NULL;
	fake_server_free(t->fs);
	t->fs = NULL;
	alarm(0);
}

/* Starts the script and connects; the connection must succeed. */
static void ctx_connect(Ctx *t)
{
	g_autoptr(GError) err = NULL;

	fake_server_start(t->fs);
	t->c = nbdc_connect(&t->cfg, &err);
	g_assert_no_error(err);
	g_assert_nonnull(t->c);
	g_assert_true(nbdc_is_alive(t->c));
	g_assert_null(nbdc_get_error(t->c));
}

/* Starts the script and connects; it must fail with NBDC_ERROR / @code. */
static void ctx_connect_fails(Ctx *t, int code)
{
	g_autoptr(GError) err = NULL;

	fake_server_start(t->fs);
	t->c = nbdc_connect(&t->cfg, &err);
	if (t->c)
		note("connect unexpectedly succeeded");
	g_assert_null(t->c);
	g_assert_nonnull(err);
	note("connect error: %s (code %d)", err->message, err->code);
	g_assert_error(err, NBDC_ERROR, code);
	g_assert_true(g_utf8_validate(err->message, -1, NULL));
	g_assert_cmpuint(strlen(err->message), >, 0);
}

static GPtrArray *ctx_list(Ctx *t, GError **err)
{
	fake_server_start(t->fs);
	return nbdc_list_exports(&t->cfg, FALSE, err);
}

static void ctx_list_fails(Ctx *t, int code)
{
	g_autoptr(GError) err = NULL;
	g_autoptr(GPtrArray) list = ctx_list(t, &err);

	g_assert_null(list);
	g_assert_nonnull(err);
	note("list error: %s (code %d)", err->message, err->code);
	g_assert_error(err, NBDC_ERROR, code);
	g_assert_cmpuint(strlen(err->message), >, 0);
}

/* The common start of an I/O case: a normal negotiation, then one request
 * captured in slot 0. */
static void ctx_io(Ctx *t)
{
	fake_negotiate(t->fs, &t->e, 0, 0);
	fake_expect_request(t->fs, 0);
}

/* ---- Guarded buffers ------------------------------------------------------- */

typedef struct {
	guint8 *mem;
	guint8 *p;
	size_t len;
} Buf;

static Buf buf_new(size_t len)
{
	Buf b = { .len = len };

	b.mem = g_malloc(len + 2 * GUARD);
	memset(b.mem, GUARD_BYTE, len + 2 * GUARD);
	b.p = b.mem + GUARD;
	memset(b.p, FILL_BYTE, len);
	return b;
}

static void buf_check_guards(const Buf *b)
{
	for (size_t i = 0; i < GUARD; i++) {
		g_assert_cmphex(b->mem[i], ==, GUARD_BYTE);
		g_assert_cmphex(b->p[b->len + i], ==, GUARD_BYTE);
	}
}

/* Bytes [from, to) of @b hold the pattern of export offset @off + i. */
static void buf_check_pattern(const Buf *b, uint64_t off, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (b->p[i] != fake_pattern_byte(off + i))
			g_error("byte %zu: got 0x%02x, want pattern 0x%02x", i, b->p[i],
				fake_pattern_byte(off + i));
}

static void buf_check_fill(const Buf *b, uint8_t v, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (b->p[i] != v)
			g_error("byte %zu: got 0x%02x, want 0x%02x", i, b->p[i], v);
}

static void buf_free(Buf *b)
{
	buf_check_guards(b);
	g_free(b->mem);
	b->mem = b->p = NULL;
}

/* A read into a guarded buffer; returns the result, checks the guards. */
static int read_guarded(Nbdc *c, size_t len, uint64_t off, uint32_t flags)
{
	Buf b = buf_new(len);
	int r = nbdc_pread(c, b.p, len, off, flags);

	buf_free(&b);
	return r;
}

/* A read that must succeed with the pattern. */
static void read_ok(Nbdc *c, size_t len, uint64_t off)
{
	Buf b = buf_new(len);
	int r = nbdc_pread(c, b.p, len, off, 0);

	g_assert_cmpint(r, ==, 0);
	buf_check_pattern(&b, off, 0, len);
	buf_free(&b);
}

/* ---- Sanity after the fact ------------------------------------------------- */

/* The connection must be dead (polled with a deadline: the reader may still be
 * tearing down), explain why, and fail later requests with -ENOTCONN without
 * touching the caller's buffer. */
static void assert_dead(Nbdc *c)
{
	gint64 deadline = g_get_monotonic_time() + 5 * G_USEC_PER_SEC;
	const char *why;
	Buf b;
	int r;

	while (nbdc_is_alive(c) && g_get_monotonic_time() < deadline)
		g_usleep(1000);
	g_assert_false(nbdc_is_alive(c));
	why = nbdc_get_error(c);
	g_assert_nonnull(why);
	g_assert_cmpuint(strlen(why), >, 0);
	g_assert_true(g_utf8_validate(why, -1, NULL));
	note("dead: %s", why);

	b = buf_new(4096);
	r = nbdc_pread(c, b.p, 4096, 0, 0);
	g_assert_cmpint(r, ==, -ENOTCONN);
	buf_check_fill(&b, FILL_BYTE, 0, 4096);
	buf_free(&b);
	g_assert_cmpint(nbdc_pwrite(c, "x", 1, 0, 0), ==, -ENOTCONN);
	g_assert_cmpint(nbdc_flush(c), ==, -ENOTCONN);
}

/* Connects; the first 4 KiB read must then fail with @err and leave the
 * connection dead (the common end of a bad-reply case). */
static void ctx_first_read_kills(Ctx *t, int err)
{
	ctx_connect(t);
	g_assert_cmpint(read_guarded(t->c, 4096, 0, 0), ==, err);
	assert_dead(t->c);
}

/* The connection must still be alive. */
static void assert_alive(Nbdc *c)
{
	g_assert_true(nbdc_is_alive(c));
	g_assert_null(nbdc_get_error(c));
}

/* What must hold of the connection after a failed request. */
enum after {
	DEAD,   /* torn down: later requests -ENOTCONN */
	ALIVE,  /* kept: the next request works */
	EITHER, /* protocol.md allows a resync (then the next request works) or DEAD */
};

/* Checks @mode; for ALIVE/EITHER the script serves one more read (slot 9). */
static void check_after(Nbdc *c, enum after mode)
{
	if (mode == DEAD || (mode == EITHER && !nbdc_is_alive(c))) {
		assert_dead(c);
		return;
	}
	assert_alive(c);
	read_ok(c, 4096, 65536);
}

static void serve_followup(FakeServer *fs, enum after mode)
{
	if (mode == DEAD)
		return;
	fake_expect_request(fs, 9);
	fake_send(fs, fake_chunk_data(9, FAKE_CHUNK_FLAG_DONE, 0, 4096));
}

/* ---- Async helpers -------------------------------------------------------- */

typedef struct {
	GMutex m;
	GCond cv;
	gboolean fired;
	int calls;
	int err;
} Done;

static void done_init(Done *d)
{
	g_mutex_init(&d->m);
	g_cond_init(&d->cv);
	d->fired = FALSE;
	d->calls = 0;
	d->err = 1;
}

static void done_cb(void *opaque, int err)
{
	Done *d = opaque;

	g_mutex_lock(&d->m);
	d->fired = TRUE;
	d->calls++;
	d->err = err;
	g_cond_signal(&d->cv);
	g_mutex_unlock(&d->m);
}

static int done_wait(Done *d)
{
	gint64 end = g_get_monotonic_time() + 10 * G_USEC_PER_SEC;
	int err;

	g_mutex_lock(&d->m);
	while (!d->fired)
		if (!g_cond_wait_until(&d->cv, &d->m, end))
			break;
	g_assert_true(d->fired);
	g_assert_cmpint(d->calls, ==, 1);
	err = d->err;
	g_mutex_unlock(&d->m);
	return err;
}

static void done_clear(Done *d)
{
	g_mutex_clear(&d->m);
	g_cond_clear(&d->cv);
}

typedef struct {
	uint64_t off, len;
	uint32_t flags;
} Extent;

static void extent_cb(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	Extent x = { offset, length, flags };

	g_array_append_val((GArray *)opaque, x);
}

static void assert_extent(GArray *a, guint i, uint64_t off, uint64_t len, uint32_t flags)
{
	const Extent *x;

	g_assert_cmpuint(a->len, >, i);
	x = &g_array_index(a, Extent, i);
	g_assert_cmpuint(x->off, ==, off);
	g_assert_cmpuint(x->len, ==, len);
	g_assert_cmpuint(x->flags, ==, flags);
}

/* ======================================================================
 * H: handshake and options
 * ====================================================================== */

static void test_h1_bad_magic(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send_raw(t.fs, "NBDMAGIXIHAVEOPT\0\3", 18);
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h1_bad_second_magic(void)
{
	Ctx t;
	g_autoptr(FakeMsg) m = fake_msg_new();

	ctx_init(&t);
	fake_msg_u64(m, FAKE_NBDMAGIC);
	fake_msg_u64(m, UINT64_C(0x1122334455667788));
	fake_msg_u16(m, 3);
	fake_send(t.fs, g_steal_pointer(&m));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h2_eof_in_greeting(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send_partial_close(t.fs, fake_greeting_newstyle(3), 11);
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h2_eof_in_go_reply(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send_partial_close(t.fs, fake_rep_info_export(FAKE_OPT_GO, MiB, 1), 20);
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* Non-fixed newstyle: EXPORT_NAME has no error channel, a server that does not
 * know the export just closes. */
static void test_h2_eof_after_export_name(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_newstyle(0));
	fake_expect_client_flags(t.fs, 0);
	fake_expect_option(t.fs, 1);
	fake_close(t.fs);
	ctx_connect_fails(&t, NBDC_ERROR_NO_EXPORT);
	fake_server_finish(t.fs, NULL);
	g_assert_cmpuint(fake_server_capture(t.fs, 1)->option, ==, FAKE_OPT_EXPORT_NAME);
	g_assert_cmpuint(fake_server_capture(t.fs, 0)->option, ==, 0);
	ctx_end(&t);
}

static void test_h2_eof_in_export_name_reply(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_newstyle(0));
	fake_expect_client_flags(t.fs, 0);
	fake_expect_option(t.fs, 1);
	fake_send_partial_close(t.fs, fake_export_name_reply(MiB, 1, TRUE), 9);
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h3_oldstyle_gflags(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_oldstyle(MiB, (1u << 16) | FAKE_EFLAG_HAS_FLAGS));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h3_oldstyle_no_has_flags(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_oldstyle(MiB, FAKE_EFLAG_SEND_FLUSH));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h3_go_no_has_flags(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_GO, MiB, 0));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h4_size_too_big(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.size = UINT64_C(1) << 63;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h4_size_zero(void)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	t.e.size = 0;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpuint(info.size, ==, 0);
	g_assert_cmpuint(info.size_sectors, ==, 0);
	g_assert_cmpint(read_guarded(t.c, 512, 0, 0), ==, -EINVAL);
	assert_alive(t.c);
	ctx_end(&t);
}

static void test_h5_unknown_hflags(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.hflags = 0xffff;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect(&t);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	g_assert_cmphex(fake_server_client_flags(t.fs), ==,
			FAKE_FLAG_FIXED_NEWSTYLE | FAKE_FLAG_NO_ZEROES);
	ctx_end(&t);
}

/* NO_ZEROES must not be sent unless offered; and the GO path still works. */
static void test_h5_no_zeroes_not_offered(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.hflags = FAKE_FLAG_FIXED_NEWSTYLE | 0x8000;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect(&t);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	g_assert_cmphex(fake_server_client_flags(t.fs), ==, FAKE_FLAG_FIXED_NEWSTYLE);
	ctx_end(&t);
}

static void test_h6_reply_bad_magic(void)
{
	Ctx t;
	g_autoptr(FakeMsg) m = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_msg_u64(m, FAKE_OPT_REPLY_MAGIC ^ 1);
	fake_msg_u32(m, FAKE_OPT_GO);
	fake_msg_u32(m, FAKE_REP_ACK);
	fake_msg_u32(m, 0);
	fake_send(t.fs, g_steal_pointer(&m));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h6_reply_wrong_option(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_INFO, MiB, 1));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_INFO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h7_ack_with_payload(void)
{
	Ctx t;
	g_autoptr(FakeMsg) p = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_STRUCTURED_REPLY, 1);
	fake_msg_u32(p, 0);
	fake_send(t.fs, fake_rep(FAKE_OPT_STRUCTURED_REPLY, FAKE_REP_ACK, g_steal_pointer(&p)));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* A 4 GiB option reply: refused at once (a client that tries to read or
 * allocate it would instead hit the handshake timeout). */
static void test_h8_huge_option_reply(void)
{
	Ctx t;
	g_autoptr(FakeMsg) m = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_msg_u64(m, FAKE_OPT_REPLY_MAGIC);
	fake_msg_u32(m, FAKE_OPT_GO);
	fake_msg_u32(m, FAKE_REP_INFO);
	fake_msg_u32(m, 0xfffffff0u);
	fake_msg_u16(m, 0x1234); /* an unknown NBD_INFO type */
	fake_msg_fill(m, 0, 64);
	fake_send(t.fs, g_steal_pointer(&m));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h9_info_too_short(void)
{
	Ctx t;
	g_autoptr(FakeMsg) p = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_msg_u8(p, 0);
	fake_send(t.fs, fake_rep(FAKE_OPT_GO, FAKE_REP_INFO, g_steal_pointer(&p)));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h9_info_export_bad_len(void)
{
	Ctx t;
	g_autoptr(FakeMsg) p = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_msg_u16(p, FAKE_INFO_EXPORT);
	fake_msg_u64(p, MiB);
	fake_msg_u16(p, FAKE_EFLAG_HAS_FLAGS);
	fake_msg_u8(p, 0); /* 13 bytes */
	fake_send(t.fs, fake_rep(FAKE_OPT_GO, FAKE_REP_INFO, g_steal_pointer(&p)));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h9_block_size_bad_len(void)
{
	Ctx t;
	g_autoptr(FakeMsg) p = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_GO, MiB, FAKE_EFLAG_HAS_FLAGS));
	fake_msg_u16(p, FAKE_INFO_BLOCK_SIZE);
	fake_msg_u32(p, 512);
	fake_msg_u32(p, 4096);
	fake_msg_u16(p, 0); /* 12 bytes instead of 14 */
	fake_send(t.fs, fake_rep(FAKE_OPT_GO, FAKE_REP_INFO, g_steal_pointer(&p)));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h9_name_too_long(void)
{
	Ctx t;
	g_autofree char *name = g_strnfill(5000, 'n');

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_GO, MiB, FAKE_EFLAG_HAS_FLAGS));
	fake_send(t.fs, fake_rep_info_name(FAKE_OPT_GO, name));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h9_description_too_long(void)
{
	Ctx t;
	g_autofree char *desc = g_strnfill(4097, 'd');

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_GO, MiB, FAKE_EFLAG_HAS_FLAGS));
	fake_send(t.fs, fake_rep_info_description(FAKE_OPT_GO, desc));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h10_go_without_info_export(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* An invalid block-size advertisement (min not a power of two) is ignored:
 * treated as not advertised, as libnbd does. */
static void test_h11_invalid_block_sizes(void)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	t.e.block_min = 3;
	t.e.block_pref = 4096;
	t.e.block_max = 1 * MiB;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpuint(info.block_min, ==, 0);
	g_assert_cmpuint(info.sector_size, ==, 512);
	ctx_end(&t);
}

/* max = 0xffffffff is valid; the core still caps its requests at 32 MiB. */
static void test_h11_oversized_block_max(void)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	t.e.block_min = 512;
	t.e.block_pref = 4096;
	t.e.block_max = 0xffffffffu;
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpuint(info.block_min, ==, 512);
	g_assert_cmpuint(info.block_pref, ==, 4096);
	g_assert_cmpuint(info.block_max, ==, 0xffffffffu);
	g_assert_cmpuint(info.max_request, ==, 32 * MiB);
	read_ok(t.c, 4096, 8192);
	ctx_end(&t);
}

/* Size not a multiple of the minimum block: accepted, the tail is unreachable. */
static void test_h12_size_unaligned(void)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	t.e.size = 3 * 4096 + 100;
	t.e.block_min = 4096;
	t.e.block_pref = 4096;
	t.e.block_max = 1 * MiB;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpuint(info.size, ==, 3 * 4096 + 100);
	g_assert_cmpuint(info.sector_size, ==, 4096);
	g_assert_cmpuint(info.size_sectors, ==, 3);
	g_assert_cmpint(read_guarded(t.c, 4096, 3 * 4096, 0), ==, -EINVAL);
	g_assert_cmpint(read_guarded(t.c, 512, 0, 0), ==, -EINVAL); /* unaligned */
	assert_alive(t.c);
	ctx_end(&t);
}

static void test_h13_server_reply_to_go(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep(FAKE_OPT_GO, FAKE_REP_SERVER, NULL));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h13_info_reply_to_list(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_LIST, 1);
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_LIST, MiB, 1));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_LIST));
	ctx_list_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h14_error_message_too_long(void)
{
	Ctx t;
	g_autofree char *msg = g_strnfill(5000, 'm');

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_err(FAKE_OPT_GO, FAKE_REP_ERR_UNKNOWN, msg));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h15_server_namelen_too_big(void)
{
	Ctx t;
	g_autoptr(FakeMsg) p = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_LIST, 1);
	fake_msg_u32(p, 100); /* but only 4 bytes follow */
	fake_msg_bytes(p, "abcd", 4);
	fake_send(t.fs, fake_rep(FAKE_OPT_LIST, FAKE_REP_SERVER, g_steal_pointer(&p)));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_LIST));
	ctx_list_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h15_server_name_over_4096(void)
{
	Ctx t;
	g_autofree char *name = g_strnfill(5000, 'e');

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_LIST, 1);
	fake_send(t.fs, fake_rep_server(name, ""));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_LIST));
	ctx_list_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* An endless stream of REP_SERVER: the client caps it and fails (before its
 * handshake timeout, which would give NBDC_ERROR_TIMEOUT). */
static void test_h16_endless_list(void)
{
	Ctx t;

	ctx_init(&t);
	t.cfg.handshake_timeout_ms = 20000;
	fake_server_set_timeout(t.fs, 20000);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_LIST, 1);
	fake_send_repeat(t.fs, fake_rep_server("export-with-a-name", "and a description"),
			 4000000);
	ctx_list_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* An error after some names: the partial list is discarded, the error kept. */
static void test_h17_list_error_after_names(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_LIST, 1);
	fake_send(t.fs, fake_rep_server("a", ""));
	fake_send(t.fs, fake_rep_server("b", "bee"));
	fake_send(t.fs, fake_rep_err(FAKE_OPT_LIST, FAKE_REP_ERR_POLICY, "no listing today"));
	ctx_list_fails(&t, NBDC_ERROR_POLICY);
	ctx_end(&t);
}

static void test_h18_meta_context_too_short(void)
{
	Ctx t;
	g_autoptr(FakeMsg) p = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_SET_META_CONTEXT, 1);
	fake_msg_u32(p, 7); /* id only: len 4 */
	fake_send(t.fs,
		  fake_rep(FAKE_OPT_SET_META_CONTEXT, FAKE_REP_META_CONTEXT, g_steal_pointer(&p)));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_SET_META_CONTEXT));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h18_meta_context_too_long(void)
{
	Ctx t;
	g_autofree char *name = g_strnfill(5000, 'c');

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_SET_META_CONTEXT, 1);
	fake_send(t.fs, fake_rep_meta_context(FAKE_OPT_SET_META_CONTEXT, 7, name));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_SET_META_CONTEXT));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* A context we did not ask for is ignored: connected, but no block status. */
static void test_h18_meta_context_unrequested(void)
{
	Ctx t;
	struct nbdc_info info;
	FakeExport rest;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_SET_META_CONTEXT, 1);
	fake_send(t.fs, fake_rep_meta_context(FAKE_OPT_SET_META_CONTEXT, 9,
					      "qemu:dirty-bitmap:bitmap0"));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_SET_META_CONTEXT));
	rest = t.e;
	rest.greeting = FALSE;
	fake_negotiate(t.fs, &rest, 0, 0);
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_false(info.can_block_status);
	g_assert_cmpint(nbdc_block_status(t.c, 4096, 0, 0, extent_cb, NULL), ==, -EOPNOTSUPP);
	assert_alive(t.c);
	ctx_end(&t);
}

static void tls_config(Ctx *t)
{
	t->cfg.tls = TRUE;
	t->cfg.tls_psk_file = psk_file;
	t->cfg.tls_username = "alice";
}

/* TLS required, the server refuses STARTTLS (ERR_POLICY): fail, never plaintext. */
static void test_h20_starttls_refused(void)
{
	Ctx t;

	ctx_init(&t);
	tls_config(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_STARTTLS, 1);
	fake_send(t.fs, fake_rep_err(FAKE_OPT_STARTTLS, FAKE_REP_ERR_POLICY, NULL));
	ctx_connect_fails(&t, NBDC_ERROR_TLS);
	ctx_end(&t);
}

static void test_h20_tls_required_oldstyle(void)
{
	Ctx t;

	ctx_init(&t);
	tls_config(&t);
	fake_send(t.fs, fake_greeting_oldstyle(MiB, FAKE_EFLAG_HAS_FLAGS));
	ctx_connect_fails(&t, NBDC_ERROR_TLS);
	ctx_end(&t);
}

static void test_h20_tls_required_nonfixed(void)
{
	Ctx t;

	ctx_init(&t);
	tls_config(&t);
	t.e.hflags = 0;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect_fails(&t, NBDC_ERROR_TLS);
	ctx_end(&t);
}

/* STARTTLS acknowledged, then garbage instead of a TLS ServerHello. */
static void test_h21_tls_handshake_garbage(void)
{
	Ctx t;
	g_autoptr(FakeMsg) m = fake_msg_new();

	ctx_init(&t);
	tls_config(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_STARTTLS, 1);
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_STARTTLS));
	fake_msg_fill(m, 0x42, 300);
	fake_send(t.fs, g_steal_pointer(&m));
	ctx_connect_fails(&t, NBDC_ERROR_TLS);
	ctx_end(&t);
}

/* STARTTLS acknowledged and a real TLS session set up; @rest then runs inside. */
static void tls_up(Ctx *t, const char *server_psk)
{
	tls_config(t);
	fake_negotiate(t->fs, &t->e, FAKE_OPT_STARTTLS, 1);
	fake_send(t->fs, fake_rep_ack(FAKE_OPT_STARTTLS));
	fake_starttls(t->fs, server_psk);
}

/* The positive path: negotiation and a read inside TLS. */
static void test_tls_ok(void)
{
	Ctx t;
	FakeExport rest;
	struct nbdc_info info;

	ctx_init(&t);
	tls_up(&t, psk_file);
	rest = t.e;
	rest.greeting = FALSE;
	fake_negotiate(t.fs, &rest, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_true(info.tls);
	g_assert_true(info.structured_replies);
	read_ok(t.c, 4096, 4096);
	ctx_end(&t);
}

/* H19: inside TLS the server answers the next option as if it were STARTTLS. */
static void test_h19_starttls_reply_inside_tls(void)
{
	Ctx t;
	FakeExport rest;

	ctx_init(&t);
	tls_up(&t, psk_file);
	rest = t.e;
	rest.greeting = FALSE;
	fake_negotiate(t.fs, &rest, FAKE_OPT_STRUCTURED_REPLY, 2);
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_STARTTLS));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	fake_server_finish(t.fs, NULL);
	g_assert_cmpuint(fake_server_capture(t.fs, 2)->option, ==, FAKE_OPT_STRUCTURED_REPLY);
	ctx_end(&t);
}

/* H21: the server does not know our PSK identity: the TLS handshake fails. */
static void test_h21_tls_unknown_psk_user(void)
{
	Ctx t;

	ctx_init(&t);
	tls_up(&t, psk_file_bob);
	ctx_connect_fails(&t, NBDC_ERROR_TLS);
	ctx_end(&t);
}

/* T1 inside TLS: a bad reply magic kills the connection. */
static void test_tls_t1_bad_reply_magic(void)
{
	Ctx t;
	FakeExport rest;
	g_autoptr(FakeMsg) m = fake_msg_new();

	ctx_init(&t);
	tls_up(&t, psk_file);
	rest = t.e;
	rest.greeting = FALSE;
	fake_negotiate(t.fs, &rest, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_msg_u32(m, 0x12345678);
	fake_msg_fill(m, 0, 12);
	fake_send(t.fs, g_steal_pointer(&m));
	ctx_first_read_kills(&t, -EPROTO);
	ctx_end(&t);
}

/* T10/T11 inside TLS: the server drops TCP (no close_notify) mid-payload. */
static void test_tls_t10_close_mid_payload(void)
{
	Ctx t;
	FakeExport rest;

	ctx_init(&t);
	tls_up(&t, psk_file);
	rest = t.e;
	rest.greeting = FALSE;
	fake_negotiate(t.fs, &rest, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_send_partial_close(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096), 500);
	ctx_first_read_kills(&t, -ENOTCONN);
	ctx_end(&t);
}

static void test_h22_option_never_answered(void)
{
	Ctx t;

	ctx_init(&t);
	t.cfg.handshake_timeout_ms = 300;
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_stall(t.fs);
	ctx_connect_fails(&t, NBDC_ERROR_TIMEOUT);
	ctx_end(&t);
}

static void test_h22_no_greeting(void)
{
	Ctx t;

	ctx_init(&t);
	t.cfg.handshake_timeout_ms = 300;
	fake_stall(t.fs);
	ctx_connect_fails(&t, NBDC_ERROR_TIMEOUT);
	ctx_end(&t);
}

/* GO refused with @rep: mapped to @code, then the client sends NBD_OPT_ABORT. */
static void go_refused(uint32_t rep, int code)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_err(FAKE_OPT_GO, rep, "refused by the fake"));
	fake_expect_option(t.fs, 2);
	ctx_connect_fails(&t, code);
	fake_server_finish(t.fs, NULL);
	g_assert_true(fake_server_capture(t.fs, 2)->valid);
	g_assert_cmpuint(fake_server_capture(t.fs, 2)->option, ==, FAKE_OPT_ABORT);
	ctx_end(&t);
}

static void test_h23_go_unknown(void)
{
	go_refused(FAKE_REP_ERR_UNKNOWN, NBDC_ERROR_NO_EXPORT);
}

static void test_h23_go_tls_reqd(void)
{
	go_refused(FAKE_REP_ERR_TLS_REQD, NBDC_ERROR_TLS_REQUIRED);
}

static void test_h23_go_policy(void)
{
	go_refused(FAKE_REP_ERR_POLICY, NBDC_ERROR_POLICY);
}

static void test_h23_go_platform(void)
{
	go_refused(FAKE_REP_ERR_PLATFORM, NBDC_ERROR_UNSUPPORTED);
}

static void test_h23_go_invalid(void)
{
	go_refused(FAKE_REP_ERR_INVALID, NBDC_ERROR_SERVER);
}

/* GO unsupported: fall back to EXPORT_NAME (no pad: NO_ZEROES negotiated). */
static void test_h23_go_unsup_fallback(void)
{
	Ctx t;
	struct nbdc_info info;
	FakeExport rest;

	ctx_init(&t);
	t.e.size = 2 * MiB;
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_err(FAKE_OPT_GO, FAKE_REP_ERR_UNSUP, NULL));
	rest = t.e;
	rest.greeting = FALSE;
	fake_negotiate(t.fs, &rest, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpuint(info.size, ==, 2 * MiB);
	read_ok(t.c, 4096, 4096);
	ctx_end(&t);
}

static void test_h23_go_shutdown(void)
{
	go_refused(FAKE_REP_ERR_SHUTDOWN, NBDC_ERROR_SERVER);
}

static void test_h23_go_block_size_reqd(void)
{
	go_refused(FAKE_REP_ERR_BLOCK_SIZE_REQD, NBDC_ERROR_SERVER);
}

static void test_h23_go_unknown_error_type(void)
{
	go_refused(0x80000000u + 100, NBDC_ERROR_SERVER);
}

static void test_h3_oldstyle_size_too_big(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_oldstyle(UINT64_MAX, FAKE_EFLAG_HAS_FLAGS));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

static void test_h4_export_name_size_too_big(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_newstyle(0));
	fake_expect_client_flags(t.fs, 0);
	fake_expect_option(t.fs, 1);
	fake_send(t.fs, fake_export_name_reply(UINT64_C(1) << 63, FAKE_EFLAG_HAS_FLAGS, TRUE));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* An unknown NBD_INFO type (with a payload) is skipped. */
static void test_h8_unknown_info_skipped(void)
{
	Ctx t;
	struct nbdc_info info;
	g_autoptr(FakeMsg) p = fake_msg_new();

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_msg_u16(p, 0x99);
	fake_msg_fill(p, 0x77, 1000);
	fake_send(t.fs, fake_rep(FAKE_OPT_GO, FAKE_REP_INFO, g_steal_pointer(&p)));
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_GO, 2 * MiB, FAKE_EFLAG_HAS_FLAGS));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpuint(info.size, ==, 2 * MiB);
	ctx_end(&t);
}

/* NBD_INFO_NAME gives the canonical name; DESCRIPTION the description. */
static void test_h9_name_and_description(void)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_info_name(FAKE_OPT_GO, "canonical"));
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_GO, MiB, FAKE_EFLAG_HAS_FLAGS));
	fake_send(t.fs, fake_rep_info_description(FAKE_OPT_GO, "a fake disk"));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpstr(info.export_name, ==, "canonical");
	g_assert_cmpstr(info.description, ==, "a fake disk");
	g_assert_cmpstr(info.protocol, ==, "newstyle-fixed");
	g_assert_true(info.structured_replies);
	g_assert_true(info.can_block_status);
	ctx_end(&t);
}

/* Invalid block-size advertisements (protocol.md §1.3) are ignored. */
static void block_sizes_ignored(uint32_t min, uint32_t pref, uint32_t max)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	t.e.block_min = min;
	t.e.block_pref = pref;
	t.e.block_max = max;
	fake_negotiate(t.fs, &t.e, 0, 0);
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	note("advertised %u/%u/%u, got %u/%u/%u", min, pref, max, info.block_min,
	     info.block_pref, info.block_max);
	g_assert_cmpuint(info.block_min, ==, 0);
	g_assert_cmpuint(info.block_pref, ==, 0);
	g_assert_cmpuint(info.block_max, ==, 0);
	g_assert_cmpuint(info.max_request, ==, 32 * MiB);
	ctx_end(&t);
}

static void test_h11_min_too_big(void)
{
	block_sizes_ignored(128 * 1024, 128 * 1024, 1 * MiB);
}

static void test_h11_pref_below_min(void)
{
	block_sizes_ignored(4096, 1024, 1 * MiB);
}

static void test_h11_max_not_multiple(void)
{
	block_sizes_ignored(4096, 4096, 1 * MiB + 512);
}

static void test_h11_pref_below_512(void)
{
	block_sizes_ignored(1, 256, 1 * MiB);
}

static void test_h11_max_below_pref(void)
{
	block_sizes_ignored(512, 65536, 4096);
}

/* With a minimum block, unaligned requests fail locally with -EINVAL. */
static void test_h12_unaligned_request(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.block_min = 4096;
	t.e.block_pref = 4096;
	t.e.block_max = 1 * MiB;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0); /* the first request seen must be DISC */
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 512, 0), ==, -EINVAL);
	g_assert_cmpint(read_guarded(t.c, 1000, 0, 0), ==, -EINVAL);
	g_assert_cmpint(nbdc_pwrite(t.c, "abc", 3, 0, 0), ==, -EINVAL);
	assert_alive(t.c);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	g_assert_cmpuint(fake_server_capture(t.fs, 0)->type, ==, FAKE_CMD_DISC);
	ctx_end(&t);
}

/* ---- Listing: positive and "unsupported" ---------------------------------- */

static void test_list_ok(void)
{
	Ctx t;
	static const char *const exports[] = { "a", "first", "b", "", NULL };
	g_autoptr(GError) err = NULL;
	g_autoptr(GPtrArray) list = NULL;
	const struct nbdc_export *x;

	ctx_init(&t);
	t.e.exports = exports;
	fake_negotiate(t.fs, &t.e, 0, 0);
	list = ctx_list(&t, &err);
	g_assert_no_error(err);
	g_assert_nonnull(list);
	g_assert_cmpuint(list->len, ==, 2);
	x = g_ptr_array_index(list, 0);
	g_assert_cmpstr(x->name, ==, "a");
	g_assert_cmpstr(x->description, ==, "first");
	x = g_ptr_array_index(list, 1);
	g_assert_cmpstr(x->name, ==, "b");
	g_assert_cmpstr(x->description, ==, "");
	fake_server_finish(t.fs, NULL);
	g_assert_true(fake_server_saw_abort(t.fs));
	ctx_end(&t);
}

/* With details: one NBD_OPT_INFO per export; an export the server refuses
 * (ERR_UNKNOWN) keeps its name without info. */
static void test_list_details(void)
{
	Ctx t;
	FakeExport rest;
	g_autoptr(GError) err = NULL;
	g_autoptr(GPtrArray) list = NULL;
	const struct nbdc_export *x;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_LIST, 1);
	fake_send(t.fs, fake_rep_server("a", ""));
	fake_send(t.fs, fake_rep_server("b", "bee"));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_LIST));
	fake_expect_option(t.fs, 2); /* INFO a */
	fake_send(t.fs, fake_rep_info_export(FAKE_OPT_INFO, 3 * MiB,
					     FAKE_EFLAG_HAS_FLAGS | FAKE_EFLAG_READ_ONLY));
	fake_send(t.fs, fake_rep_info_block_size(FAKE_OPT_INFO, 512, 4096, 1 * MiB));
	fake_send(t.fs, fake_rep_info_description(FAKE_OPT_INFO, "from info"));
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_INFO));
	fake_expect_option(t.fs, 3); /* INFO b */
	fake_send(t.fs, fake_rep_err(FAKE_OPT_INFO, FAKE_REP_ERR_UNKNOWN, NULL));
	rest = t.e;
	rest.greeting = FALSE;
	fake_negotiate(t.fs, &rest, 0, 0); /* ABORT */
	fake_server_start(t.fs);
	list = nbdc_list_exports(&t.cfg, TRUE, &err);
	g_assert_no_error(err);
	g_assert_cmpuint(list->len, ==, 2);
	x = g_ptr_array_index(list, 0);
	g_assert_cmpstr(x->name, ==, "a");
	g_assert_true(x->has_info);
	g_assert_cmpuint(x->size, ==, 3 * MiB);
	g_assert_true(x->read_only);
	g_assert_cmpuint(x->block_min, ==, 512);
	g_assert_cmpuint(x->block_pref, ==, 4096);
	g_assert_cmpuint(x->block_max, ==, 1 * MiB);
	g_assert_cmpstr(x->description, ==, "from info");
	x = g_ptr_array_index(list, 1);
	g_assert_cmpstr(x->name, ==, "b");
	g_assert_false(x->has_info);
	g_assert_cmpstr(x->description, ==, "bee");
	fake_server_finish(t.fs, NULL);
	g_assert_cmpuint(fake_server_capture(t.fs, 2)->option, ==, FAKE_OPT_INFO);
	g_assert_cmpuint(fake_server_capture(t.fs, 3)->option, ==, FAKE_OPT_INFO);
	g_assert_true(fake_server_saw_abort(t.fs));
	ctx_end(&t);
}

static void test_list_oldstyle(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_oldstyle(MiB, FAKE_EFLAG_HAS_FLAGS));
	ctx_list_fails(&t, NBDC_ERROR_UNSUPPORTED);
	ctx_end(&t);
}

static void test_list_nonfixed(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.hflags = FAKE_FLAG_NO_ZEROES;
	fake_send(t.fs, fake_greeting_newstyle(t.e.hflags));
	fake_expect_client_flags(t.fs, 0);
	fake_wait_eof(t.fs);
	ctx_list_fails(&t, NBDC_ERROR_UNSUPPORTED);
	ctx_end(&t);
}

static void list_refused(uint32_t rep, int code)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_LIST, 1);
	fake_send(t.fs, fake_rep_err(FAKE_OPT_LIST, rep, NULL));
	ctx_list_fails(&t, code);
	ctx_end(&t);
}

static void test_list_err_unsup(void)
{
	list_refused(FAKE_REP_ERR_UNSUP, NBDC_ERROR_UNSUPPORTED);
}

static void test_list_err_platform(void)
{
	list_refused(FAKE_REP_ERR_PLATFORM, NBDC_ERROR_UNSUPPORTED);
}

static void test_list_err_policy(void)
{
	list_refused(FAKE_REP_ERR_POLICY, NBDC_ERROR_POLICY);
}

static void test_list_err_tls_reqd(void)
{
	list_refused(FAKE_REP_ERR_TLS_REQD, NBDC_ERROR_TLS_REQUIRED);
}

/* ---- Protocol variants that work ------------------------------------------ */

static void test_oldstyle_read(void)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_oldstyle(MiB, FAKE_EFLAG_HAS_FLAGS | FAKE_EFLAG_SEND_FLUSH));
	fake_expect_request(t.fs, 0);
	fake_send(t.fs, fake_simple_reply_data(0));
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpuint(info.size, ==, MiB);
	g_assert_cmpstr(info.protocol, ==, "oldstyle");
	g_assert_false(info.structured_replies);
	read_ok(t.c, 4096, 12288);
	ctx_end(&t);
}

static void test_nonfixed_read(void)
{
	Ctx t;
	struct nbdc_info info;

	ctx_init(&t);
	t.e.hflags = 0;
	ctx_io(&t);
	fake_send(t.fs, fake_simple_reply_data(0));
	ctx_connect(&t);
	nbdc_get_info(t.c, &info);
	g_assert_cmpstr(info.protocol, ==, "newstyle");
	g_assert_false(info.structured_replies);
	read_ok(t.c, 8192, 0);
	ctx_end(&t);
}

/* ======================================================================
 * T: transmission headers and cookies
 * ====================================================================== */

static void test_t1_bad_reply_magic(void)
{
	Ctx t;
	g_autoptr(FakeMsg) m = fake_msg_new();

	ctx_init(&t);
	ctx_io(&t);
	fake_msg_u32(m, 0x12345678);
	fake_msg_u32(m, 0);
	fake_msg_cookie(m, 0, 0);
	fake_send(t.fs, g_steal_pointer(&m));
	ctx_first_read_kills(&t, -EPROTO);
	ctx_end(&t);
}

static void test_t2_unknown_cookie_simple(void)
{
	Ctx t;
	g_autoptr(FakeMsg) m = fake_msg_new();

	ctx_init(&t);
	t.e.sr = FALSE;
	ctx_io(&t);
	fake_msg_u32(m, FAKE_SIMPLE_MAGIC);
	fake_msg_u32(m, 0);
	fake_msg_cookie(m, 0, 1000);
	fake_send(t.fs, g_steal_pointer(&m));
	ctx_first_read_kills(&t, -EPROTO);
	ctx_end(&t);
}

static void test_t3_unknown_cookie_chunk(void)
{
	Ctx t;
	FakeMsg *m;

	ctx_init(&t);
	ctx_io(&t);
	m = fake_msg_new();
	fake_msg_u32(m, FAKE_STRUCTURED_MAGIC);
	fake_msg_u16(m, FAKE_CHUNK_FLAG_DONE);
	fake_msg_u16(m, FAKE_CHUNK_NONE);
	fake_msg_cookie(m, 0, 1000);
	fake_msg_u32(m, 0);
	fake_send(t.fs, m);
	ctx_first_read_kills(&t, -EPROTO);
	ctx_end(&t);
}

static void test_t3_unknown_cookie_simple_error(void)
{
	Ctx t;
	FakeMsg *m;

	ctx_init(&t);
	ctx_io(&t);
	m = fake_msg_new();
	fake_msg_u32(m, FAKE_SIMPLE_MAGIC);
	fake_msg_u32(m, FAKE_EIO);
	fake_msg_cookie(m, 0, 1000);
	fake_send(t.fs, m);
	ctx_first_read_kills(&t, -EPROTO);
	ctx_end(&t);
}

/* Two reads in flight; the first gets its reply twice.  Exactly one read
 * succeeds (whichever the server answered), the other dies with -EPROTO. */
static void test_t4_duplicate_reply(void)
{
	Ctx t;
	Buf a, b;
	Done da, db;
	int ra, rb;
	struct iovec va, vb;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	a = buf_new(4096);
	b = buf_new(4096);
	done_init(&da);
	done_init(&db);
	va = (struct iovec){ a.p, 4096 };
	vb = (struct iovec){ b.p, 4096 };
	g_assert_cmpint(nbdc_aio_preadv(t.c, &va, 1, 0, 0, done_cb, &da), ==, 0);
	g_assert_cmpint(nbdc_aio_preadv(t.c, &vb, 1, 65536, 0, done_cb, &db), ==, 0);
	ra = done_wait(&da);
	rb = done_wait(&db);
	note("first %d, second %d", ra, rb);
	g_assert_true((ra == 0 && rb == -EPROTO) || (ra == -EPROTO && rb == 0));
	if (ra == 0)
		buf_check_pattern(&a, 0, 0, 4096);
	else
		buf_check_pattern(&b, 65536, 0, 4096);
	buf_free(&a);
	buf_free(&b);
	done_clear(&da);
	done_clear(&db);
	assert_dead(t.c);
	ctx_end(&t);
}

/* A reply to NBD_CMD_DISC is ignored; teardown completes. */
static void test_t5_reply_to_disc(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_simple_reply(1, 0));
	ctx_connect(&t);
	read_ok(t.c, 4096, 0);
	nbdc_disconnect(t.c);
	g_assert_false(nbdc_is_alive(t.c));
	g_assert_cmpint(read_guarded(t.c, 4096, 0, 0), ==, -ENOTCONN);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	g_assert_true(fake_server_capture(t.fs, 1)->valid);
	g_assert_cmpuint(fake_server_capture(t.fs, 1)->type, ==, FAKE_CMD_DISC);
	ctx_end(&t);
}

/* A simple reply to a READ although structured replies were negotiated. */
static void test_t6_simple_reply_to_read_with_sr(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_simple_reply_data(0));
	serve_followup(t.fs, EITHER);
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 0, 0), ==, -EPROTO);
	check_after(t.c, EITHER);
	ctx_end(&t);
}

static void test_t7_chunk_without_sr(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.sr = FALSE;
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_first_read_kills(&t, -EPROTO);
	ctx_end(&t);
}

/* A 4 GiB chunk: the connection dies at once, nothing is allocated or awaited. */
static void test_t8_chunk_len_huge(void)
{
	Ctx t;
	FakeMsg *m;

	ctx_init(&t);
	ctx_io(&t);
	m = fake_msg_new();
	fake_msg_u32(m, FAKE_STRUCTURED_MAGIC);
	fake_msg_u16(m, FAKE_CHUNK_FLAG_DONE);
	fake_msg_u16(m, FAKE_CHUNK_OFFSET_DATA);
	fake_msg_cookie(m, 0, 0);
	fake_msg_u32(m, 0xffffffffu);
	fake_msg_offset(m, 0, 0);
	fake_msg_pattern(m, 0, 0, 4096);
	fake_send(t.fs, m);
	ctx_first_read_kills(&t, -EPROTO);
	ctx_end(&t);
}

/* Error codes outside the NBD list map to -EINVAL; the connection lives on. */
static void test_t9_unknown_error_simple(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_simple_reply(0, 0xdeadbeefu));
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_chunk_data(1, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	g_assert_cmpint(nbdc_flush(t.c), ==, -EINVAL);
	assert_alive(t.c);
	read_ok(t.c, 4096, 4096);
	ctx_end(&t);
}

static void test_t9_unknown_error_chunk(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_error(0, FAKE_CHUNK_FLAG_DONE, 2, "ENOENT is not NBD"));
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_chunk_data(1, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 0, 0), ==, -EINVAL);
	assert_alive(t.c);
	read_ok(t.c, 4096, 4096);
	ctx_end(&t);
}

static void test_t10_close_mid_header(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send_partial_close(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096), 10);
	ctx_first_read_kills(&t, -ENOTCONN);
	ctx_end(&t);
}

static void test_t10_close_mid_payload(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send_partial_close(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096),
				20 + 8 + 1000);
	ctx_first_read_kills(&t, -ENOTCONN);
	ctx_end(&t);
}

static void test_t10_close_mid_simple_payload(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.sr = FALSE;
	ctx_io(&t);
	fake_send_partial_close(t.fs, fake_simple_reply_data(0), 16 + 100);
	ctx_first_read_kills(&t, -ENOTCONN);
	ctx_end(&t);
}

static void test_t11_close_between_replies(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_close(t.fs);
	ctx_first_read_kills(&t, -ENOTCONN);
	ctx_end(&t);
}

/* Replies out of order: both reads complete with their own data. */
static void test_t12_out_of_order(void)
{
	Ctx t;
	Buf a, b;
	Done da, db;
	struct iovec va, vb;

	ctx_init(&t);
	t.e.sr = FALSE;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_simple_reply_data(1));
	fake_send(t.fs, fake_simple_reply_data(0));
	ctx_connect(&t);
	a = buf_new(4096);
	b = buf_new(8192);
	done_init(&da);
	done_init(&db);
	va = (struct iovec){ a.p, 4096 };
	vb = (struct iovec){ b.p, 8192 };
	g_assert_cmpint(nbdc_aio_preadv(t.c, &va, 1, 4096, 0, done_cb, &da), ==, 0);
	g_assert_cmpint(nbdc_aio_preadv(t.c, &vb, 1, 65536, 0, done_cb, &db), ==, 0);
	g_assert_cmpint(done_wait(&da), ==, 0);
	g_assert_cmpint(done_wait(&db), ==, 0);
	buf_check_pattern(&a, 4096, 0, 4096);
	buf_check_pattern(&b, 65536, 0, 8192);
	buf_free(&a);
	buf_free(&b);
	done_clear(&da);
	done_clear(&db);
	assert_alive(t.c);
	ctx_end(&t);
}

static void test_t13_reply_never_arrives(void)
{
	Ctx t;

	ctx_init(&t);
	t.cfg.request_timeout_ms = 300;
	ctx_io(&t);
	fake_stall(t.fs);
	ctx_first_read_kills(&t, -ETIMEDOUT);
	ctx_end(&t);
}

/* The server reads nothing while we send a big WRITE: the request times out. */
static void test_t14_server_stops_reading(void)
{
	Ctx t;
	g_autofree guint8 *data = g_malloc0(8 * MiB);

	ctx_init(&t);
	t.e.size = 64 * MiB;
	t.cfg.request_timeout_ms = 500;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_stall(t.fs);
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, 8 * MiB, 0, 0), ==, -ETIMEDOUT);
	assert_dead(t.c);
	ctx_end(&t);
}

/* The server dies while receiving a WRITE payload. */
static void test_t14_server_dies_mid_write(void)
{
	Ctx t;
	g_autofree guint8 *data = g_malloc0(4 * MiB);

	ctx_init(&t);
	t.e.size = 64 * MiB;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request_partial(t.fs, 0, 65536);
	fake_close(t.fs);
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, 4 * MiB, 0, 0), ==, -ENOTCONN);
	assert_dead(t.c);
	ctx_end(&t);
}

/* NBD_ESHUTDOWN: the request fails with -ESHUTDOWN and the client
 * soft-disconnects (NBD_CMD_DISC), so later requests get -ENOTCONN. */
static void test_t9_eshutdown_soft_disconnect(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_simple_reply(0, FAKE_ESHUTDOWN));
	fake_expect_request(t.fs, 1);
	ctx_connect(&t);
	g_assert_cmpint(nbdc_flush(t.c), ==, -ESHUTDOWN);
	assert_dead(t.c);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	g_assert_true(fake_server_capture(t.fs, 1)->valid);
	g_assert_cmpuint(fake_server_capture(t.fs, 1)->type, ==, FAKE_CMD_DISC);
	ctx_end(&t);
}

/* A simple error reply to a READ carries no payload: the connection stays in sync. */
static void test_t9_simple_read_error(void)
{
	Ctx t;

	ctx_init(&t);
	t.e.sr = FALSE;
	ctx_io(&t);
	fake_send(t.fs, fake_simple_reply(0, FAKE_EIO));
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_simple_reply_data(1));
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 0, 0), ==, -EIO);
	assert_alive(t.c);
	read_ok(t.c, 4096, 8192);
	ctx_end(&t);
}

/* The server closes with three requests in flight: all fail with -ENOTCONN. */
static void test_t11_close_with_three_in_flight(void)
{
	Ctx t;
	Buf b[3];
	Done d[3];
	struct iovec v[3];

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_expect_request(t.fs, 2);
	fake_close(t.fs);
	ctx_connect(&t);
	for (int i = 0; i < 3; i++) {
		b[i] = buf_new(4096);
		done_init(&d[i]);
		v[i] = (struct iovec){ b[i].p, 4096 };
		g_assert_cmpint(nbdc_aio_preadv(t.c, &v[i], 1, (uint64_t)i * 4096, 0, done_cb, &d[i]),
				==, 0);
	}
	for (int i = 0; i < 3; i++) {
		g_assert_cmpint(done_wait(&d[i]), ==, -ENOTCONN);
		buf_free(&b[i]);
		done_clear(&d[i]);
	}
	assert_dead(t.c);
	ctx_end(&t);
}

/* A read bigger than block_max is split into requests of at most block_max,
 * covering the range exactly; the server answers them out of order. */
static void test_t12_split_read(void)
{
	Ctx t;
	Buf b;
	uint64_t next = 8192;

	ctx_init(&t);
	t.e.block_min = 512;
	t.e.block_pref = 4096;
	t.e.block_max = 65536;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_expect_request(t.fs, 2);
	fake_send(t.fs, fake_chunk_data(2, FAKE_CHUNK_FLAG_DONE, 0, 65536));
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 65536));
	fake_send(t.fs, fake_chunk_data(1, FAKE_CHUNK_FLAG_DONE, 0, 65536));
	ctx_connect(&t);
	b = buf_new(3 * 65536);
	g_assert_cmpint(nbdc_pread(t.c, b.p, 3 * 65536, 8192, 0), ==, 0);
	buf_check_pattern(&b, 8192, 0, 3 * 65536);
	buf_free(&b);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	for (int i = 0; i < 3; i++) {
		const FakeCapture *cap = fake_server_capture(t.fs, i);

		g_assert_cmpuint(cap->type, ==, FAKE_CMD_READ);
		g_assert_cmpuint(cap->offset, ==, next);
		g_assert_cmpuint(cap->length, ==, 65536);
		next += cap->length;
	}
	ctx_end(&t);
}

/* A write bigger than block_max: split, payloads arrive intact and in place. */
static void test_t12_split_write(void)
{
	Ctx t;
	g_autofree guint8 *data = g_malloc(2 * 65536);

	for (size_t i = 0; i < 2 * 65536; i++)
		data[i] = (guint8)(i ^ (i >> 8));
	ctx_init(&t);
	t.e.block_min = 512;
	t.e.block_pref = 4096;
	t.e.block_max = 65536;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_simple_reply(1, 0));
	fake_send(t.fs, fake_chunk_none(0));
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, 2 * 65536, 65536, 0), ==, 0);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	for (int i = 0; i < 2; i++) {
		const FakeCapture *cap = fake_server_capture(t.fs, i);
		uint64_t rel;

		g_assert_cmpuint(cap->type, ==, FAKE_CMD_WRITE);
		g_assert_cmpuint(cap->length, ==, 65536);
		g_assert_cmpuint(cap->offset, >=, 65536);
		rel = cap->offset - 65536;
		g_assert_cmpuint(rel % 65536, ==, 0);
		g_assert_cmpmem(cap->data->data, cap->data->len, data + rel, 65536);
	}
	g_assert_cmpuint(fake_server_capture(t.fs, 0)->offset, !=,
			 fake_server_capture(t.fs, 1)->offset);
	ctx_end(&t);
}

/* ======================================================================
 * S: structured read chunks (read of 4096 bytes at 4096 unless stated)
 * ====================================================================== */

static void read_expect(FakeMsg *m1, FakeMsg *m2, int want, enum after mode)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, m1);
	if (m2)
		fake_send(t.fs, m2);
	serve_followup(t.fs, mode);
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 4096, 0), ==, want);
	check_after(t.c, mode);
	ctx_end(&t);
}

static void test_s1_data_before_request(void)
{
	read_expect(fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, -512, 4096), NULL, -EPROTO, DEAD);
}

static void test_s1_data_past_request(void)
{
	read_expect(fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 512, 4096), NULL, -EPROTO, DEAD);
}

static void test_s1_data_offset_overflow(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u64(p, UINT64_MAX - 255);
	fake_msg_fill(p, 1, 4096);
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_OFFSET_DATA, p), NULL, -EPROTO,
		    DEAD);
}

static void test_s2_data_too_short(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_offset(p, 0, 0); /* offset, no data: len 8 */
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_OFFSET_DATA, p), NULL, -EPROTO,
		    EITHER);
}

static void test_s2_data_len_4(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, 0);
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_OFFSET_DATA, p), NULL, -EPROTO,
		    EITHER);
}

static void test_s3_hole_bad_len(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_offset(p, 0, 0);
	fake_msg_u32(p, 4096);
	fake_msg_u32(p, 0); /* 16 bytes */
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_OFFSET_HOLE, p), NULL, -EPROTO,
		    EITHER);
}

static void test_s3_hole_size_zero(void)
{
	read_expect(fake_chunk_data(0, 0, 0, 4096), fake_chunk_hole(0, FAKE_CHUNK_FLAG_DONE, 0, 0),
		    -EPROTO, EITHER);
}

static void test_s3_hole_out_of_bounds(void)
{
	read_expect(fake_chunk_hole(0, FAKE_CHUNK_FLAG_DONE, 2048, 4096), NULL, -EPROTO, DEAD);
}

static void test_s4_overlapping_data(void)
{
	read_expect(fake_chunk_data(0, 0, 0, 2048),
		    fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 1024, 3072), -EPROTO, EITHER);
}

static void test_s4_duplicate_data(void)
{
	read_expect(fake_chunk_data(0, 0, 0, 4096), fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096),
		    -EPROTO, EITHER);
}

static void test_s5_gap(void)
{
	read_expect(fake_chunk_data(0, 0, 0, 2048), fake_chunk_none(0), -EPROTO, EITHER);
}

static void test_s5_nothing(void)
{
	read_expect(fake_chunk_none(0), NULL, -EPROTO, EITHER);
}

static void test_s6_df_two_chunks(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, 0, 0, 2048));
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 2048, 2048));
	serve_followup(t.fs, EITHER);
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 4096, NBDC_CMD_FLAG_DF), ==, -EPROTO);
	check_after(t.c, EITHER);
	ctx_end(&t);
}

static void test_s7_none_with_payload(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, 0);
	read_expect(fake_chunk_data(0, 0, 0, 4096),
		    fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_NONE, p), -EPROTO, EITHER);
}

static void test_s7_none_without_done(void)
{
	read_expect(fake_chunk_data(0, 0, 0, 4096), fake_chunk(0, 0, FAKE_CHUNK_NONE, NULL),
		    -EPROTO, EITHER);
}

static void test_s8_error_too_short(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, FAKE_EIO);
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_ERROR, p), NULL, -EPROTO, EITHER);
}

static void test_s8_error_msglen_too_big(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, FAKE_EIO);
	fake_msg_u16(p, 100);
	fake_msg_bytes(p, "ten bytes!", 10);
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_ERROR, p), NULL, -EPROTO, EITHER);
}

static void test_s8_error_code_zero(void)
{
	read_expect(fake_chunk_error(0, FAKE_CHUNK_FLAG_DONE, 0, "zero"), NULL, -EPROTO, EITHER);
}

static void test_s8_error_offset_too_short(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, FAKE_EIO);
	fake_msg_u16(p, 0);
	fake_msg_u32(p, 0); /* 10 bytes: the offset is cut */
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_ERROR_OFFSET, p), NULL, -EPROTO,
		    EITHER);
}

/* ERROR_OFFSET outside the request: the offset is ignored, the error counts. */
static void test_s9_error_offset_outside(void)
{
	read_expect(fake_chunk_error_offset(0, FAKE_CHUNK_FLAG_DONE, FAKE_EIO, "bad", 1 * MiB),
		    NULL, -EIO, ALIVE);
}

static void test_s10_first_error_wins(void)
{
	read_expect(fake_chunk_error(0, 0, FAKE_EIO, "first"),
		    fake_chunk_error(0, FAKE_CHUNK_FLAG_DONE, FAKE_ENOSPC, "second"), -EIO, ALIVE);
}

static void test_s10_content_after_error(void)
{
	read_expect(fake_chunk_error(0, 0, FAKE_EPERM, NULL),
		    fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096), -EPERM, ALIVE);
}

/* Unknown type with bit 15 set: an error chunk; the connection lives on. */
static void test_s11_unknown_error_type(void)
{
	Ctx t;
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, FAKE_ENOSPC);
	fake_msg_u16(p, 4);
	fake_msg_bytes(p, "full", 4);
	fake_msg_fill(p, 0x11, 20); /* type-specific extra bytes */
	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk(0, FAKE_CHUNK_FLAG_DONE, 0x8000 | 42, p));
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_chunk_data(1, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 4096, 0), ==, -ENOSPC);
	assert_alive(t.c);
	read_ok(t.c, 4096, 0);
	ctx_end(&t);
}

static void test_s12_unknown_type(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_fill(p, 0, 8);
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, 100, p), NULL, -EPROTO, DEAD);
}

static void test_s12_data_chunk_to_write(void)
{
	Ctx t;
	guint8 data[4096] = { 0 };

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, sizeof(data), 0, 0), ==, -EPROTO);
	assert_dead(t.c);
	ctx_end(&t);
}

static void test_s12_block_status_to_read(void)
{
	static const uint32_t ext[] = { 4096, 0 };

	read_expect(fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, ext, 1), NULL, -EPROTO,
		    DEAD);
}

static void test_s13_no_done(void)
{
	Ctx t;

	ctx_init(&t);
	t.cfg.request_timeout_ms = 300;
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, 0, 0, 4096));
	fake_stall(t.fs);
	ctx_connect(&t);
	g_assert_cmpint(read_guarded(t.c, 4096, 4096, 0), ==, -ETIMEDOUT);
	assert_dead(t.c);
	ctx_end(&t);
}

static void test_s14_unknown_flags(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, 0xfff0 | FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	read_ok(t.c, 4096, 4096);
	assert_alive(t.c);
	ctx_end(&t);
}

/* ---- Positive structured cases no real server produces -------------------- */

/* OFFSET_HOLE zeroes its range; data around it lands in place. */
static void test_p_hole_zeroes(void)
{
	Ctx t;
	Buf b;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, 0, 0, 1024));
	fake_send(t.fs, fake_chunk_hole(0, 0, 1024, 2048));
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 3072, 1024));
	ctx_connect(&t);
	b = buf_new(4096);
	g_assert_cmpint(nbdc_pread(t.c, b.p, 4096, 8192, 0), ==, 0);
	buf_check_pattern(&b, 8192, 0, 1024);
	buf_check_fill(&b, 0, 1024, 3072);
	buf_check_pattern(&b, 8192, 3072, 4096);
	buf_free(&b);
	assert_alive(t.c);
	ctx_end(&t);
}

/* Several OFFSET_DATA chunks in reverse order, DONE on a final NONE. */
static void test_p_data_out_of_order(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_data(0, 0, 3072, 1024));
	fake_send(t.fs, fake_chunk_data(0, 0, 1024, 2048));
	fake_send(t.fs, fake_chunk_data(0, 0, 0, 1024));
	fake_send(t.fs, fake_chunk_none(0));
	ctx_connect(&t);
	read_ok(t.c, 4096, 4096);
	assert_alive(t.c);
	ctx_end(&t);
}

static void test_p_error_offset(void)
{
	read_expect(fake_chunk_error_offset(0, FAKE_CHUNK_FLAG_DONE, FAKE_EIO, "bad sector", 512),
		    NULL, -EIO, ALIVE);
}

/* Chunks of two reads interleaved. */
static void test_p_interleaved_chunks(void)
{
	Ctx t;
	Buf a, b;
	Done da, db;
	struct iovec va, vb;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_chunk_data(1, 0, 0, 2048));
	fake_send(t.fs, fake_chunk_data(0, 0, 2048, 2048));
	fake_send(t.fs, fake_chunk_data(1, FAKE_CHUNK_FLAG_DONE, 2048, 2048));
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 2048));
	ctx_connect(&t);
	a = buf_new(4096);
	b = buf_new(4096);
	done_init(&da);
	done_init(&db);
	va = (struct iovec){ a.p, 4096 };
	vb = (struct iovec){ b.p, 4096 };
	g_assert_cmpint(nbdc_aio_preadv(t.c, &va, 1, 0, 0, done_cb, &da), ==, 0);
	g_assert_cmpint(nbdc_aio_preadv(t.c, &vb, 1, 131072, 0, done_cb, &db), ==, 0);
	g_assert_cmpint(done_wait(&da), ==, 0);
	g_assert_cmpint(done_wait(&db), ==, 0);
	buf_check_pattern(&a, 0, 0, 4096);
	buf_check_pattern(&b, 131072, 0, 4096);
	buf_free(&a);
	buf_free(&b);
	done_clear(&da);
	done_clear(&db);
	ctx_end(&t);
}

/* A WRITE answered by a NONE chunk; the payload arrived intact. */
static void test_p_write_structured_ok(void)
{
	Ctx t;
	guint8 data[8192];
	const FakeCapture *cap;

	for (size_t i = 0; i < sizeof(data); i++)
		data[i] = (guint8)(i * 7);
	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_none(0));
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, sizeof(data), 16384, 0), ==, 0);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	cap = fake_server_capture(t.fs, 0);
	g_assert_cmpuint(cap->type, ==, FAKE_CMD_WRITE);
	g_assert_cmpuint(cap->offset, ==, 16384);
	g_assert_cmpuint(cap->length, ==, sizeof(data));
	g_assert_cmpmem(cap->data->data, cap->data->len, data, sizeof(data));
	ctx_end(&t);
}

static void test_p_write_error(void)
{
	Ctx t;
	guint8 data[4096] = { 0 };

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_simple_reply(0, FAKE_ENOSPC));
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, sizeof(data), 0, 0), ==, -ENOSPC);
	assert_alive(t.c);
	ctx_end(&t);
}

/* A read-only export: writes fail locally with -EROFS, nothing is sent. */
static void test_p_read_only(void)
{
	Ctx t;
	guint8 data[4096] = { 0 };

	ctx_init(&t);
	t.e.eflags |= FAKE_EFLAG_READ_ONLY;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0); /* the first request must be DISC */
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, sizeof(data), 0, 0), ==, -EROFS);
	g_assert_cmpint(nbdc_trim(t.c, 4096, 0, 0), ==, -EROFS);
	g_assert_cmpint(nbdc_zero(t.c, 4096, 0, 0), ==, -EROFS);
	assert_alive(t.c);
	nbdc_free(g_steal_pointer(&t.c));
	fake_server_finish(t.fs, NULL);
	g_assert_cmpuint(fake_server_capture(t.fs, 0)->type, ==, FAKE_CMD_DISC);
	ctx_end(&t);
}

/* 64 chunks of 64 bytes in a scrambled order. */
static void test_p_many_small_chunks(void)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	for (int i = 0; i < 64; i++) {
		int k = (i * 37) % 64;

		fake_send(t.fs, fake_chunk_data(0, 0, k * 64, 64));
	}
	fake_send(t.fs, fake_chunk_none(0));
	ctx_connect(&t);
	read_ok(t.c, 4096, 4096);
	assert_alive(t.c);
	ctx_end(&t);
}

/* One hole covering the whole request. */
static void test_p_hole_only(void)
{
	Ctx t;
	Buf b;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_hole(0, FAKE_CHUNK_FLAG_DONE, 0, 8192));
	ctx_connect(&t);
	b = buf_new(8192);
	g_assert_cmpint(nbdc_pread(t.c, b.p, 8192, 0, 0), ==, 0);
	buf_check_fill(&b, 0, 0, 8192);
	buf_free(&b);
	assert_alive(t.c);
	ctx_end(&t);
}

/* An ERROR chunk in reply to a WRITE. */
static void test_p_write_error_chunk(void)
{
	Ctx t;
	guint8 data[4096] = { 0 };

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_error(0, FAKE_CHUNK_FLAG_DONE, FAKE_ENOSPC, "disk full"));
	ctx_connect(&t);
	g_assert_cmpint(nbdc_pwrite(t.c, data, sizeof(data), 0, 0), ==, -ENOSPC);
	assert_alive(t.c);
	ctx_end(&t);
}

/* ======================================================================
 * B: block status (context id 7 = base:allocation)
 * ====================================================================== */

/* The async API shares one opaque between the extent and done callbacks. */
typedef struct {
	Done d; /* first: done_cb gets this struct */
	GArray *ext;
} BsWait;

static void bs_extent_cb(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	extent_cb(((BsWait *)opaque)->ext, offset, length, flags);
}

static int block_status_wait(Nbdc *c, uint64_t count, uint64_t off, uint32_t flags, GArray *ext)
{
	BsWait w = { .ext = ext };
	int r;

	done_init(&w.d);
	r = nbdc_aio_block_status(c, count, off, flags, bs_extent_cb, done_cb, &w);
	if (r == 0)
		r = done_wait(&w.d);
	done_clear(&w.d);
	return r;
}

static void bs_expect(FakeMsg *m1, FakeMsg *m2, uint64_t count, uint64_t off, uint32_t flags,
		      int want, enum after mode, GArray *ext)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, m1);
	if (m2)
		fake_send(t.fs, m2);
	serve_followup(t.fs, mode);
	ctx_connect(&t);
	g_assert_cmpint(block_status_wait(t.c, count, off, flags, ext), ==, want);
	check_after(t.c, mode);
	ctx_end(&t);
}

/* The synchronous wrapper hands the caller's opaque to the extent callback. */
static void test_b_sync_wrapper(void)
{
	static const uint32_t e[] = { 4096, 0, 4096, 3 };
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e, 2));
	ctx_connect(&t);
	g_assert_cmpint(nbdc_block_status(t.c, 8192, 0, 0, extent_cb, ext), ==, 0);
	g_assert_cmpuint(ext->len, ==, 2);
	assert_extent(ext, 0, 0, 4096, 0);
	assert_extent(ext, 1, 4096, 4096, NBDC_STATE_HOLE | NBDC_STATE_ZERO);
	assert_alive(t.c);
	ctx_end(&t);
}

static void test_b_ok(void)
{
	static const uint32_t e[] = { 4096, 0, 4096, 3 };
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e, 2), NULL, 8192, 0, 0, 0,
		  ALIVE, ext);
	g_assert_cmpuint(ext->len, ==, 2);
	assert_extent(ext, 0, 0, 4096, 0);
	assert_extent(ext, 1, 4096, 4096, NBDC_STATE_HOLE | NBDC_STATE_ZERO);
}

static void test_b1_too_short(void)
{
	FakeMsg *p = fake_msg_new();
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	fake_msg_u32(p, 7);
	fake_msg_u32(p, 4096);
	bs_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_BLOCK_STATUS, p), NULL, 8192, 0, 0,
		  -EPROTO, EITHER, ext);
}

static void test_b1_misaligned(void)
{
	FakeMsg *p = fake_msg_new();
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	fake_msg_u32(p, 7);
	fake_msg_u32(p, 4096);
	fake_msg_u32(p, 0);
	fake_msg_u32(p, 4096); /* 16 bytes: (16 - 4) % 8 != 0 */
	bs_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_BLOCK_STATUS, p), NULL, 8192, 0, 0,
		  -EPROTO, EITHER, ext);
}

static void test_b1_ext_type(void)
{
	FakeMsg *p = fake_msg_new();
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	fake_msg_u32(p, 7);
	fake_msg_u32(p, 1);
	fake_msg_u64(p, 8192);
	fake_msg_u64(p, 0);
	bs_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_BLOCK_STATUS_EXT, p), NULL, 8192, 0,
		  0, -EPROTO, EITHER, ext);
}

static void test_b2_unknown_context(void)
{
	static const uint32_t e1[] = { 8192, 3 };
	static const uint32_t e2[] = { 8192, 0 };
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_block_status(0, 0, 99, e1, 1),
		  fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e2, 1), 8192, 0, 0, 0, ALIVE,
		  ext);
	g_assert_cmpuint(ext->len, ==, 1);
	assert_extent(ext, 0, 0, 8192, 0);
}

static void test_b3_zero_length_first(void)
{
	static const uint32_t e[] = { 0, 0, 4096, 0 };
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e, 2), NULL, 8192, 0, 0,
		  -EPROTO, EITHER, ext);
	g_assert_cmpuint(ext->len, ==, 0);
}

static void test_b3_zero_length_later(void)
{
	static const uint32_t e[] = { 4096, 0, 0, 1, 4096, 3 };
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e, 3), NULL, 8192, 0, 0, 0,
		  ALIVE, ext);
	g_assert_cmpuint(ext->len, ==, 1);
	assert_extent(ext, 0, 0, 4096, 0);
}

/* Extents beyond the request and the export end are clamped. */
static void test_b4_past_export_end(void)
{
	static const uint32_t e[] = { 65536, 1 };
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e, 1), NULL, 4096,
		  MiB - 4096, 0, 0, ALIVE, ext);
	g_assert_cmpuint(ext->len, ==, 1);
	assert_extent(ext, 0, MiB - 4096, 4096, NBDC_STATE_HOLE);
}

/* REQ_ONE violated (several extents, the first too long): one clamped extent. */
static void test_b5_req_one_violated(void)
{
	static const uint32_t e[] = { 16384, 0, 4096, 3, 4096, 0 };
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e, 3), NULL, 8192, 0,
		  NBDC_CMD_FLAG_REQ_ONE, 0, ALIVE, ext);
	g_assert_cmpuint(ext->len, ==, 1);
	assert_extent(ext, 0, 0, 8192, 0);
}

/* An ERROR chunk in reply to BLOCK_STATUS: the error, no extents. */
static void test_b_error_chunk(void)
{
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_error(0, FAKE_CHUNK_FLAG_DONE, FAKE_EIO, "no map"), NULL, 8192, 0, 0,
		  -EIO, ALIVE, ext);
	g_assert_cmpuint(ext->len, ==, 0);
}

/* A block-status chunk announcing 64 MiB of extents: refused before reading it. */
static void test_b6_huge_chunk(void)
{
	FakeMsg *m = fake_msg_new();
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	fake_msg_u32(m, FAKE_STRUCTURED_MAGIC);
	fake_msg_u16(m, FAKE_CHUNK_FLAG_DONE);
	fake_msg_u16(m, FAKE_CHUNK_BLOCK_STATUS);
	fake_msg_cookie(m, 0, 0);
	fake_msg_u32(m, 64 * MiB + 4);
	fake_msg_u32(m, 7);
	for (int i = 0; i < 64; i++) {
		fake_msg_u32(m, 4096);
		fake_msg_u32(m, 0);
	}
	bs_expect(m, NULL, 8192, 0, 0, -EPROTO, EITHER, ext);
}

/* ---- main ------------------------------------------------------------------ */

/* Each case runs in its own subprocess, so one failing or crashing case is
 * reported as such and the others still run. */
static void run_isolated(gconstpointer data)
{
	void (*fn)(void) = (void (*)(void))data;

	if (g_test_subprocess()) {
		fn();
		return;
	}
	g_test_trap_subprocess(NULL, 60 * G_USEC_PER_SEC, G_TEST_SUBPROCESS_INHERIT_STDERR);
	if (!g_test_trap_has_passed())
		g_test_fail_printf("the case failed in its subprocess (its assertion is on stderr)");
}

#define ADD(path, fn) g_test_add_data_func(path, (gconstpointer)(fn), run_isolated)

/* The PSK files live in one directory made by the parent process (passed to
 * the per-case subprocesses in the environment) and removed at its end, so a
 * crashing case leaves nothing behind. */
#define PSK_DIR_ENV "NBDFS_FAKE_PSK_DIR"

static char *write_psk_file(const char *dir, const char *name, const char *line)
{
	GError *err = NULL;
	char *path = g_build_filename(dir, name, NULL);

	g_file_set_contents(path, line, -1, &err);
	g_assert_no_error(err);
	return path;
}

int main(int argc, char **argv)
{
	int r;

	g_test_init(&argc, &argv, NULL);
	signal(SIGALRM, watchdog_fired);
	if (g_test_subprocess()) {
		const char *dir = g_getenv(PSK_DIR_ENV);

		g_assert_nonnull(dir);
		psk_file = g_build_filename(dir, "alice.psk", NULL);
		psk_file_bob = g_build_filename(dir, "bob.psk", NULL);
	} else {
		GError *err = NULL;

		psk_dir = g_dir_make_tmp("nbdfs-fake-XXXXXX", &err);
		g_assert_no_error(err);
		g_setenv(PSK_DIR_ENV, psk_dir, TRUE);
		psk_file = write_psk_file(psk_dir, "alice.psk",
			"alice:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n");
		psk_file_bob = write_psk_file(psk_dir, "bob.psk",
			"bob:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210\n");
	}

	ADD("/badserver/h1/bad-magic", test_h1_bad_magic);
	ADD("/badserver/h1/bad-second-magic", test_h1_bad_second_magic);
	ADD("/badserver/h2/eof-in-greeting", test_h2_eof_in_greeting);
	ADD("/badserver/h2/eof-in-go-reply", test_h2_eof_in_go_reply);
	ADD("/badserver/h2/eof-after-export-name", test_h2_eof_after_export_name);
	ADD("/badserver/h2/eof-in-export-name-reply", test_h2_eof_in_export_name_reply);
	ADD("/badserver/h3/oldstyle-gflags", test_h3_oldstyle_gflags);
	ADD("/badserver/h3/oldstyle-no-has-flags", test_h3_oldstyle_no_has_flags);
	ADD("/badserver/h3/go-no-has-flags", test_h3_go_no_has_flags);
	ADD("/badserver/h4/size-too-big", test_h4_size_too_big);
	ADD("/badserver/h4/size-zero", test_h4_size_zero);
	ADD("/badserver/h5/unknown-hflags", test_h5_unknown_hflags);
	ADD("/badserver/h5/no-zeroes-not-offered", test_h5_no_zeroes_not_offered);
	ADD("/badserver/h6/reply-bad-magic", test_h6_reply_bad_magic);
	ADD("/badserver/h6/reply-wrong-option", test_h6_reply_wrong_option);
	ADD("/badserver/h7/ack-with-payload", test_h7_ack_with_payload);
	ADD("/badserver/h8/huge-option-reply", test_h8_huge_option_reply);
	ADD("/badserver/h9/info-too-short", test_h9_info_too_short);
	ADD("/badserver/h9/info-export-bad-len", test_h9_info_export_bad_len);
	ADD("/badserver/h9/block-size-bad-len", test_h9_block_size_bad_len);
	ADD("/badserver/h9/name-too-long", test_h9_name_too_long);
	ADD("/badserver/h9/description-too-long", test_h9_description_too_long);
	ADD("/badserver/h10/go-without-info-export", test_h10_go_without_info_export);
	ADD("/badserver/h11/invalid-block-sizes", test_h11_invalid_block_sizes);
	ADD("/badserver/h11/oversized-block-max", test_h11_oversized_block_max);
	ADD("/badserver/h12/size-unaligned", test_h12_size_unaligned);
	ADD("/badserver/h13/server-reply-to-go", test_h13_server_reply_to_go);
	ADD("/badserver/h13/info-reply-to-list", test_h13_info_reply_to_list);
	ADD("/badserver/h14/error-message-too-long", test_h14_error_message_too_long);
	ADD("/badserver/h15/server-namelen-too-big", test_h15_server_namelen_too_big);
	ADD("/badserver/h15/server-name-over-4096", test_h15_server_name_over_4096);
	ADD("/badserver/h16/endless-list", test_h16_endless_list);
	ADD("/badserver/h17/list-error-after-names", test_h17_list_error_after_names);
	ADD("/badserver/h18/meta-context-too-short", test_h18_meta_context_too_short);
	ADD("/badserver/h18/meta-context-too-long", test_h18_meta_context_too_long);
	ADD("/badserver/h18/meta-context-unrequested", test_h18_meta_context_unrequested);
	ADD("/badserver/h20/starttls-refused", test_h20_starttls_refused);
	ADD("/badserver/h20/tls-required-oldstyle", test_h20_tls_required_oldstyle);
	ADD("/badserver/h20/tls-required-nonfixed", test_h20_tls_required_nonfixed);
	ADD("/badserver/h21/tls-handshake-garbage", test_h21_tls_handshake_garbage);
	ADD("/badserver/tls/ok", test_tls_ok);
	ADD("/badserver/h19/starttls-reply-inside-tls", test_h19_starttls_reply_inside_tls);
	ADD("/badserver/h21/tls-unknown-psk-user", test_h21_tls_unknown_psk_user);
	ADD("/badserver/tls/t1-bad-reply-magic", test_tls_t1_bad_reply_magic);
	ADD("/badserver/tls/t10-close-mid-payload", test_tls_t10_close_mid_payload);
	ADD("/badserver/h22/option-never-answered", test_h22_option_never_answered);
	ADD("/badserver/h22/no-greeting", test_h22_no_greeting);
	ADD("/badserver/h23/go-unknown", test_h23_go_unknown);
	ADD("/badserver/h23/go-tls-reqd", test_h23_go_tls_reqd);
	ADD("/badserver/h23/go-policy", test_h23_go_policy);
	ADD("/badserver/h23/go-platform", test_h23_go_platform);
	ADD("/badserver/h23/go-invalid", test_h23_go_invalid);
	ADD("/badserver/h23/go-unsup-fallback", test_h23_go_unsup_fallback);
	ADD("/badserver/h23/go-shutdown", test_h23_go_shutdown);
	ADD("/badserver/h23/go-block-size-reqd", test_h23_go_block_size_reqd);
	ADD("/badserver/h23/go-unknown-error-type", test_h23_go_unknown_error_type);
	ADD("/badserver/h3/oldstyle-size-too-big", test_h3_oldstyle_size_too_big);
	ADD("/badserver/h4/export-name-size-too-big", test_h4_export_name_size_too_big);
	ADD("/badserver/h8/unknown-info-skipped", test_h8_unknown_info_skipped);
	ADD("/badserver/h9/name-and-description", test_h9_name_and_description);
	ADD("/badserver/h11/min-too-big", test_h11_min_too_big);
	ADD("/badserver/h11/pref-below-min", test_h11_pref_below_min);
	ADD("/badserver/h11/max-not-multiple", test_h11_max_not_multiple);
	ADD("/badserver/h11/pref-below-512", test_h11_pref_below_512);
	ADD("/badserver/h11/max-below-pref", test_h11_max_below_pref);
	ADD("/badserver/h12/unaligned-request", test_h12_unaligned_request);
	ADD("/badserver/list/ok", test_list_ok);
	ADD("/badserver/list/details", test_list_details);
	ADD("/badserver/list/oldstyle", test_list_oldstyle);
	ADD("/badserver/list/nonfixed", test_list_nonfixed);
	ADD("/badserver/list/err-unsup", test_list_err_unsup);
	ADD("/badserver/list/err-platform", test_list_err_platform);
	ADD("/badserver/list/err-policy", test_list_err_policy);
	ADD("/badserver/list/err-tls-reqd", test_list_err_tls_reqd);
	ADD("/badserver/proto/oldstyle-read", test_oldstyle_read);
	ADD("/badserver/proto/nonfixed-read", test_nonfixed_read);

	ADD("/badserver/t1/bad-reply-magic", test_t1_bad_reply_magic);
	ADD("/badserver/t2/unknown-cookie-simple", test_t2_unknown_cookie_simple);
	ADD("/badserver/t3/unknown-cookie-chunk", test_t3_unknown_cookie_chunk);
	ADD("/badserver/t3/unknown-cookie-simple-error",
			test_t3_unknown_cookie_simple_error);
	ADD("/badserver/t4/duplicate-reply", test_t4_duplicate_reply);
	ADD("/badserver/t5/reply-to-disc", test_t5_reply_to_disc);
	ADD("/badserver/t6/simple-reply-to-read-with-sr",
			test_t6_simple_reply_to_read_with_sr);
	ADD("/badserver/t7/chunk-without-sr", test_t7_chunk_without_sr);
	ADD("/badserver/t8/chunk-len-huge", test_t8_chunk_len_huge);
	ADD("/badserver/t9/unknown-error-simple", test_t9_unknown_error_simple);
	ADD("/badserver/t9/unknown-error-chunk", test_t9_unknown_error_chunk);
	ADD("/badserver/t9/eshutdown-soft-disconnect", test_t9_eshutdown_soft_disconnect);
	ADD("/badserver/t9/simple-read-error", test_t9_simple_read_error);
	ADD("/badserver/t10/close-mid-header", test_t10_close_mid_header);
	ADD("/badserver/t10/close-mid-payload", test_t10_close_mid_payload);
	ADD("/badserver/t10/close-mid-simple-payload", test_t10_close_mid_simple_payload);
	ADD("/badserver/t11/close-between-replies", test_t11_close_between_replies);
	ADD("/badserver/t11/close-with-three-in-flight", test_t11_close_with_three_in_flight);
	ADD("/badserver/t12/out-of-order", test_t12_out_of_order);
	ADD("/badserver/t12/split-read", test_t12_split_read);
	ADD("/badserver/t12/split-write", test_t12_split_write);
	ADD("/badserver/t13/reply-never-arrives", test_t13_reply_never_arrives);
	ADD("/badserver/t14/server-stops-reading", test_t14_server_stops_reading);
	ADD("/badserver/t14/server-dies-mid-write", test_t14_server_dies_mid_write);

	ADD("/badserver/s1/data-before-request", test_s1_data_before_request);
	ADD("/badserver/s1/data-past-request", test_s1_data_past_request);
	ADD("/badserver/s1/data-offset-overflow", test_s1_data_offset_overflow);
	ADD("/badserver/s2/data-too-short", test_s2_data_too_short);
	ADD("/badserver/s2/data-len-4", test_s2_data_len_4);
	ADD("/badserver/s3/hole-bad-len", test_s3_hole_bad_len);
	ADD("/badserver/s3/hole-size-zero", test_s3_hole_size_zero);
	ADD("/badserver/s3/hole-out-of-bounds", test_s3_hole_out_of_bounds);
	ADD("/badserver/s4/overlapping-data", test_s4_overlapping_data);
	ADD("/badserver/s4/duplicate-data", test_s4_duplicate_data);
	ADD("/badserver/s5/gap", test_s5_gap);
	ADD("/badserver/s5/nothing", test_s5_nothing);
	ADD("/badserver/s6/df-two-chunks", test_s6_df_two_chunks);
	ADD("/badserver/s7/none-with-payload", test_s7_none_with_payload);
	ADD("/badserver/s7/none-without-done", test_s7_none_without_done);
	ADD("/badserver/s8/error-too-short", test_s8_error_too_short);
	ADD("/badserver/s8/error-msglen-too-big", test_s8_error_msglen_too_big);
	ADD("/badserver/s8/error-code-zero", test_s8_error_code_zero);
	ADD("/badserver/s8/error-offset-too-short", test_s8_error_offset_too_short);
	ADD("/badserver/s9/error-offset-outside", test_s9_error_offset_outside);
	ADD("/badserver/s10/first-error-wins", test_s10_first_error_wins);
	ADD("/badserver/s10/content-after-error", test_s10_content_after_error);
	ADD("/badserver/s11/unknown-error-type", test_s11_unknown_error_type);
	ADD("/badserver/s12/unknown-type", test_s12_unknown_type);
	ADD("/badserver/s12/data-chunk-to-write", test_s12_data_chunk_to_write);
	ADD("/badserver/s12/block-status-to-read", test_s12_block_status_to_read);
	ADD("/badserver/s13/no-done", test_s13_no_done);
	ADD("/badserver/s14/unknown-flags", test_s14_unknown_flags);

	ADD("/badserver/positive/hole-zeroes", test_p_hole_zeroes);
	ADD("/badserver/positive/data-out-of-order", test_p_data_out_of_order);
	ADD("/badserver/positive/error-offset", test_p_error_offset);
	ADD("/badserver/positive/interleaved-chunks", test_p_interleaved_chunks);
	ADD("/badserver/positive/write-structured-ok", test_p_write_structured_ok);
	ADD("/badserver/positive/write-error", test_p_write_error);
	ADD("/badserver/positive/read-only", test_p_read_only);
	ADD("/badserver/positive/many-small-chunks", test_p_many_small_chunks);
	ADD("/badserver/positive/hole-only", test_p_hole_only);
	ADD("/badserver/positive/write-error-chunk", test_p_write_error_chunk);

	ADD("/badserver/b/ok", test_b_ok);
	ADD("/badserver/b/sync-wrapper", test_b_sync_wrapper);
	ADD("/badserver/b1/too-short", test_b1_too_short);
	ADD("/badserver/b1/misaligned", test_b1_misaligned);
	ADD("/badserver/b1/ext-type", test_b1_ext_type);
	ADD("/badserver/b2/unknown-context", test_b2_unknown_context);
	ADD("/badserver/b3/zero-length-first", test_b3_zero_length_first);
	ADD("/badserver/b3/zero-length-later", test_b3_zero_length_later);
	ADD("/badserver/b4/past-export-end", test_b4_past_export_end);
	ADD("/badserver/b5/req-one-violated", test_b5_req_one_violated);
	ADD("/badserver/b6/huge-chunk", test_b6_huge_chunk);
	ADD("/badserver/b/error-chunk", test_b_error_chunk);

	r = g_test_run();
	if (psk_dir) {
		g_unlink(psk_file);
		g_unlink(psk_file_bob);
		g_rmdir(psk_dir);
		g_free(psk_dir);
	}
	g_free(psk_file);
	g_free(psk_file_bob);
	return r;
}
