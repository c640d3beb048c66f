/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver-transmission.c: bad-server cases of transmission (T1-T14): reply
 * headers and cookies, closes at every point, order, stalls, split requests. */
#include "badserver.h"

/* ---- Reply headers and cookies (T1-T9) ---------------------------------- */

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
	int ra, rb;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096));
	ctx_connect(&t);
	read_two(t.c, 0, 4096, 65536, 4096, &ra, &rb);
	note("first %d, second %d", ra, rb);
	g_assert_true((ra == 0 && rb == -EPROTO) || (ra == -EPROTO && rb == 0));
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
	ctx_end_disc(&t, 1);
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
	g_assert_cmpint(nbdc_trim(t.c, 4096, 0, 0), ==, -EINVAL);
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
	g_assert_cmpint(nbdc_trim(t.c, 4096, 0, 0), ==, -ESHUTDOWN);
	assert_dead(t.c);
	ctx_end_disc(&t, 1);
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

/* ---- Closes, order and stalls (T10-T14) --------------------------------- */

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

/* The server closes with three requests in flight: all fail with -ENOTCONN. */
static void test_t11_close_with_three_in_flight(void)
{
	Ctx t;
	Buf b[3];
	struct completion *d[3];
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
		d[i] = completion_new();
		v[i] = (struct iovec){ b[i].p, 4096 };
		g_assert_cmpint(nbdc_aio_preadv(t.c, &v[i], 1, (uint64_t)i * 4096, 0,
						completion_done, d[i]),
				==, 0);
	}
	for (int i = 0; i < 3; i++) {
		g_assert_cmpint(done_wait(d[i]), ==, -ENOTCONN);
		buf_free(&b[i]);
	}
	assert_dead(t.c);
	ctx_end(&t);
}

/* Replies out of order: both reads complete with their own data. */
static void test_t12_out_of_order(void)
{
	Ctx t;
	int ra, rb;

	ctx_init(&t);
	t.e.sr = FALSE;
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_simple_reply_data(1));
	fake_send(t.fs, fake_simple_reply_data(0));
	ctx_connect(&t);
	read_two(t.c, 4096, 4096, 65536, 8192, &ra, &rb);
	g_assert_cmpint(ra, ==, 0);
	g_assert_cmpint(rb, ==, 0);
	assert_alive(t.c);
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

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	badserver_init(&argc, &argv);
	ADD("/badserver/t1/bad-reply-magic", test_t1_bad_reply_magic);
	ADD("/badserver/t2/unknown-cookie-simple", test_t2_unknown_cookie_simple);
	ADD("/badserver/t3/unknown-cookie-chunk", test_t3_unknown_cookie_chunk);
	ADD("/badserver/t3/unknown-cookie-simple-error", test_t3_unknown_cookie_simple_error);
	ADD("/badserver/t4/duplicate-reply", test_t4_duplicate_reply);
	ADD("/badserver/t5/reply-to-disc", test_t5_reply_to_disc);
	ADD("/badserver/t6/simple-reply-to-read-with-sr", test_t6_simple_reply_to_read_with_sr);
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
	return g_test_run();
}
