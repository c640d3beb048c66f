/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver.c: the helpers every bad-server case uses (badserver.h): the
 * watchdog and per-case subprocess runner, the client context over a fake
 * server, guarded buffers, and the sanity checks after a bad reply. */
#include "badserver.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

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
void note(const char *fmt, ...)
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

void ctx_init(Ctx *t)
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

void ctx_end(Ctx *t)
{
	nbdc_free(t->c); /* must return: no hang */
	t->c = NULL;
	fake_server_free(t->fs);
	t->fs = NULL;
	alarm(0);
}

/* Starts the script and connects; the connection must succeed. */
void ctx_connect(Ctx *t)
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
void ctx_connect_fails(Ctx *t, int code)
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

GPtrArray *ctx_list(Ctx *t, GError **err)
{
	fake_server_start(t->fs);
	return nbdc_list_exports(&t->cfg, FALSE, err);
}

void ctx_list_fails(Ctx *t, int code)
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
void ctx_io(Ctx *t)
{
	fake_negotiate(t->fs, &t->e, 0, 0);
	fake_expect_request(t->fs, 0);
}

/* ---- Guarded buffers ------------------------------------------------------- */

Buf buf_new(size_t len)
{
	Buf b = { .len = len };

	b.mem = g_malloc(len + 2 * GUARD);
	memset(b.mem, GUARD_BYTE, len + 2 * GUARD);
	b.p = b.mem + GUARD;
	memset(b.p, FILL_BYTE, len);
	return b;
}

void buf_check_guards(const Buf *b)
{
	for (size_t i = 0; i < GUARD; i++) {
		g_assert_cmphex(b->mem[i], ==, GUARD_BYTE);
		g_assert_cmphex(b->p[b->len + i], ==, GUARD_BYTE);
	}
}

/* Bytes [from, to) of @b hold the pattern of export offset @off + i. */
void buf_check_pattern(const Buf *b, uint64_t off, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (b->p[i] != fake_pattern_byte(off + i))
			g_error("byte %zu: got 0x%02x, want pattern 0x%02x", i, b->p[i],
				fake_pattern_byte(off + i));
}

void buf_check_fill(const Buf *b, uint8_t v, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		if (b->p[i] != v)
			g_error("byte %zu: got 0x%02x, want 0x%02x", i, b->p[i], v);
}

void buf_free(Buf *b)
{
	buf_check_guards(b);
	g_free(b->mem);
	b->mem = b->p = NULL;
}

/* A read into a guarded buffer; returns the result, checks the guards. */
int read_guarded(Nbdc *c, size_t len, uint64_t off, uint32_t flags)
{
	Buf b = buf_new(len);
	int r = nbdc_pread(c, b.p, len, off, flags);

	buf_free(&b);
	return r;
}

/* A read that must succeed with the pattern. */
void read_ok(Nbdc *c, size_t len, uint64_t off)
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
void assert_dead(Nbdc *c)
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
void ctx_first_read_kills(Ctx *t, int err)
{
	ctx_connect(t);
	g_assert_cmpint(read_guarded(t->c, 4096, 0, 0), ==, err);
	assert_dead(t->c);
}

/* The connection must still be alive. */
void assert_alive(Nbdc *c)
{
	g_assert_true(nbdc_is_alive(c));
	g_assert_null(nbdc_get_error(c));
}

/* Checks @mode; for ALIVE/EITHER the script serves one more read (slot 9). */
void check_after(Nbdc *c, enum after mode)
{
	if (mode == DEAD || (mode == EITHER && !nbdc_is_alive(c))) {
		assert_dead(c);
		return;
	}
	assert_alive(c);
	read_ok(c, 4096, 65536);
}

void serve_followup(FakeServer *fs, enum after mode)
{
	if (mode == DEAD)
		return;
	fake_expect_request(fs, 9);
	fake_send(fs, fake_chunk_data(9, FAKE_CHUNK_FLAG_DONE, 0, 4096));
}

void ctx_end_disc(Ctx *t, int slot)
{
	nbdc_free(g_steal_pointer(&t->c));
	fake_server_finish(t->fs, NULL);
	g_assert_true(fake_server_capture(t->fs, slot)->valid);
	g_assert_cmpuint(fake_server_capture(t->fs, slot)->type, ==, FAKE_CMD_DISC);
	ctx_end(t);
}

void expect_reply(FakeMsg *m1, FakeMsg *m2, ctx_request request, void *arg, int want,
		  enum after mode)
{
	Ctx t;

	ctx_init(&t);
	ctx_io(&t);
	fake_send(t.fs, m1);
	if (m2)
		fake_send(t.fs, m2);
	serve_followup(t.fs, mode);
	ctx_connect(&t);
	g_assert_cmpint(request(t.c, arg), ==, want);
	check_after(t.c, mode);
	ctx_end(&t);
}

/* ---- Async helpers -------------------------------------------------------- */

int done_wait(struct completion *c)
{
	gint64 end = g_get_monotonic_time() + 10 * G_USEC_PER_SEC;
	gint64 err = 1;
	gboolean fired = completion_wait_until(c, end, &err);

	g_assert_true(fired);
	completion_unref(c);
	return (int)err;
}

void read_two(Nbdc *c, uint64_t off_a, size_t len_a, uint64_t off_b, size_t len_b, int *ra, int *rb)
{
	Buf a = buf_new(len_a), b = buf_new(len_b);
	struct completion *da = completion_new(), *db = completion_new();
	struct iovec va = { a.p, len_a }, vb = { b.p, len_b };

	g_assert_cmpint(nbdc_aio_preadv(c, &va, 1, off_a, 0, completion_done, da), ==, 0);
	g_assert_cmpint(nbdc_aio_preadv(c, &vb, 1, off_b, 0, completion_done, db), ==, 0);
	*ra = done_wait(da);
	*rb = done_wait(db);
	if (*ra == 0)
		buf_check_pattern(&a, off_a, 0, len_a);
	if (*rb == 0)
		buf_check_pattern(&b, off_b, 0, len_b);
	buf_free(&a);
	buf_free(&b);
}

void extent_cb(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	Extent x = { offset, length, flags };

	g_array_append_val((GArray *)opaque, x);
}

void assert_extent(GArray *a, guint i, uint64_t off, uint64_t len, uint32_t flags)
{
	const Extent *x;

	g_assert_cmpuint(a->len, >, i);
	x = &g_array_index(a, Extent, i);
	g_assert_cmpuint(x->off, ==, off);
	g_assert_cmpuint(x->len, ==, len);
	g_assert_cmpuint(x->flags, ==, flags);
}

/* ---- Runner ---------------------------------------------------------------- */

static void run_isolated(gconstpointer data)
{
	void (*fn)(void) = (void (*)(void))data;

	if (g_test_subprocess()) {
		fn();
		return;
	}
	g_test_trap_subprocess(NULL, 60 * G_USEC_PER_SEC, G_TEST_SUBPROCESS_INHERIT_STDERR);
	if (!g_test_trap_has_passed())
		g_test_fail_printf(
			"the case failed in its subprocess (its assertion is on stderr)");
}

void badserver_add(const char *path, void (*fn)(void))
{
	g_test_add_data_func(path, (gconstpointer)fn, run_isolated);
}

void badserver_init(int *argc, char ***argv)
{
	g_test_init(argc, argv, NULL);
	signal(SIGALRM, watchdog_fired);
}
