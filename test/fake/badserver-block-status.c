/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver-block-status.c: bad-server cases of block status replies
 * (B1-B6; context id 7 = base:allocation), and the positive ones. */
#include "badserver.h"

/* ---- Waiting for an async block status ---------------------------------- */

/* The async API shares one opaque between the extent and done callbacks. */
typedef struct {
	struct completion *done; /* the done callback's reference */
	GArray *ext;		 /* borrowed */
} BsWait;

static void bs_extent_cb(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	extent_cb(((BsWait *)opaque)->ext, offset, length, flags);
}

static void bs_done_cb(void *opaque, int err)
{
	completion_done(((BsWait *)opaque)->done, err);
}

static int block_status_wait(Nbdc *c, uint64_t count, uint64_t off, uint32_t flags, GArray *ext)
{
	BsWait w = { .done = completion_new(), .ext = ext };
	int r;

	r = nbdc_aio_block_status(c, count, off, flags, bs_extent_cb, bs_done_cb, &w);
	if (r == 0)
		return done_wait(w.done);
	completion_done(w.done, r); /* refused: no callback will drop its reference */
	completion_unref(w.done);
	return r;
}

typedef struct {
	uint64_t count, off;
	uint32_t flags;
	GArray *ext;
} BsRequest;

static int bs_request(Nbdc *c, void *arg)
{
	BsRequest *q = arg;

	return block_status_wait(c, q->count, q->off, q->flags, q->ext);
}

static void bs_expect(FakeMsg *m1, FakeMsg *m2, uint64_t count, uint64_t off, uint32_t flags,
		      int want, enum after mode, GArray *ext)
{
	BsRequest q = { .count = count, .off = off, .flags = flags, .ext = ext };

	expect_reply(m1, m2, bs_request, &q, want, mode);
}

/* ---- B cases ------------------------------------------------------------ */

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

/* An ERROR chunk in reply to BLOCK_STATUS: the error, no extents. */
static void test_b_error_chunk(void)
{
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	bs_expect(fake_chunk_error(0, FAKE_CHUNK_FLAG_DONE, FAKE_EIO, "no map"), NULL, 8192, 0, 0,
		  -EIO, ALIVE, ext);
	g_assert_cmpuint(ext->len, ==, 0);
}

/* A block status chunk of @type whose payload is the big-endian u32 words
 * @w[@n]: the 8 KiB request fails with -EPROTO. */
static void bs_bad_chunk(uint16_t type, const uint32_t *w, size_t n)
{
	FakeMsg *p = fake_msg_new();
	g_autoptr(GArray) ext = g_array_new(FALSE, FALSE, sizeof(Extent));

	for (size_t i = 0; i < n; i++)
		fake_msg_u32(p, w[i]);
	bs_expect(fake_chunk(0, FAKE_CHUNK_FLAG_DONE, type, p), NULL, 8192, 0, 0, -EPROTO, EITHER,
		  ext);
}

static void test_b1_too_short(void)
{
	static const uint32_t w[] = { 7, 4096 };

	bs_bad_chunk(FAKE_CHUNK_BLOCK_STATUS, w, G_N_ELEMENTS(w));
}

static void test_b1_misaligned(void)
{
	static const uint32_t w[] = { 7, 4096, 0, 4096 }; /* 16 bytes: (16 - 4) % 8 != 0 */

	bs_bad_chunk(FAKE_CHUNK_BLOCK_STATUS, w, G_N_ELEMENTS(w));
}

static void test_b1_ext_type(void)
{
	/* context 7, count 1, then the u64 length 8192 and u64 flags 0 */
	static const uint32_t w[] = { 7, 1, 0, 8192, 0, 0 };

	bs_bad_chunk(FAKE_CHUNK_BLOCK_STATUS_EXT, w, G_N_ELEMENTS(w));
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

	bs_expect(fake_chunk_block_status(0, FAKE_CHUNK_FLAG_DONE, 7, e, 1), NULL, 4096, MiB - 4096,
		  0, 0, ALIVE, ext);
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

int main(int argc, char **argv)
{
	badserver_init(&argc, &argv);
	ADD("/badserver/b/sync-wrapper", test_b_sync_wrapper);
	ADD("/badserver/b/ok", test_b_ok);
	ADD("/badserver/b/error-chunk", test_b_error_chunk);
	ADD("/badserver/b1/too-short", test_b1_too_short);
	ADD("/badserver/b1/misaligned", test_b1_misaligned);
	ADD("/badserver/b1/ext-type", test_b1_ext_type);
	ADD("/badserver/b2/unknown-context", test_b2_unknown_context);
	ADD("/badserver/b3/zero-length-first", test_b3_zero_length_first);
	ADD("/badserver/b3/zero-length-later", test_b3_zero_length_later);
	ADD("/badserver/b4/past-export-end", test_b4_past_export_end);
	ADD("/badserver/b5/req-one-violated", test_b5_req_one_violated);
	ADD("/badserver/b6/huge-chunk", test_b6_huge_chunk);
	return g_test_run();
}
