/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver-structured.c: bad-server cases of structured read chunks
 * (S1-S14), and the positive chunk cases no real server produces (holes,
 * chunks out of order, ERROR_OFFSET, ...). */
#include "badserver.h"

/* ---- S: bad chunks (a read of 4096 bytes at 4096 unless stated) --------- */

static int read_4k_at_4k(Nbdc *c, void *arg)
{
	return read_guarded(c, 4096, 4096, 0);
}

static void read_expect(FakeMsg *m1, FakeMsg *m2, int want, enum after mode)
{
	expect_reply(m1, m2, read_4k_at_4k, NULL, want, mode);
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
	read_expect(fake_chunk_data(0, 0, 0, 4096),
		    fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096), -EPROTO, EITHER);
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
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_ERROR, p), NULL, -EPROTO,
		    EITHER);
}

static void test_s8_error_msglen_too_big(void)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, FAKE_EIO);
	fake_msg_u16(p, 100);
	fake_msg_bytes(p, "ten bytes!", 10);
	read_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_ERROR, p), NULL, -EPROTO,
		    EITHER);
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

/* ---- Positive structured cases no real server produces ------------------ */

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
	int ra, rb;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_expect_request(t.fs, 1);
	fake_send(t.fs, fake_chunk_data(1, 0, 0, 2048));
	fake_send(t.fs, fake_chunk_data(0, 0, 2048, 2048));
	fake_send(t.fs, fake_chunk_data(1, FAKE_CHUNK_FLAG_DONE, 2048, 2048));
	fake_send(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 2048));
	ctx_connect(&t);
	read_two(t.c, 0, 4096, 131072, 4096, &ra, &rb);
	g_assert_cmpint(ra, ==, 0);
	g_assert_cmpint(rb, ==, 0);
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
	ctx_end_disc(&t, 0);
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

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	badserver_init(&argc, &argv);
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
	return g_test_run();
}
