/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver-greeting.c: bad-server cases of the handshake proper (H1-H5,
 * H10-H12, H22, H23): greeting, handshake flags, export size and block sizes,
 * GO refusals, silence; and the oldstyle and non-fixed newstyle that work. */
#include "badserver.h"

/* ---- Greeting, flags and export size (H1-H5, H10) ----------------------- */

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

static void test_h3_oldstyle_size_too_big(void)
{
	Ctx t;

	ctx_init(&t);
	fake_send(t.fs, fake_greeting_oldstyle(UINT64_MAX, FAKE_EFLAG_HAS_FLAGS));
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

static void test_h10_go_without_info_export(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep_ack(FAKE_OPT_GO));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
	ctx_end(&t);
}

/* ---- Block sizes (H11, H12) --------------------------------------------- */

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
	note("advertised %u/%u/%u, got %u/%u/%u", min, pref, max, info.block_min, info.block_pref,
	     info.block_max);
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
	ctx_end_disc(&t, 0);
}

/* ---- Silence and refusals (H22, H23) ------------------------------------ */

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

/* ---- Protocol variants that work ---------------------------------------- */

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

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	badserver_init(&argc, &argv);
	ADD("/badserver/h1/bad-magic", test_h1_bad_magic);
	ADD("/badserver/h1/bad-second-magic", test_h1_bad_second_magic);
	ADD("/badserver/h2/eof-in-greeting", test_h2_eof_in_greeting);
	ADD("/badserver/h2/eof-in-go-reply", test_h2_eof_in_go_reply);
	ADD("/badserver/h2/eof-after-export-name", test_h2_eof_after_export_name);
	ADD("/badserver/h2/eof-in-export-name-reply", test_h2_eof_in_export_name_reply);
	ADD("/badserver/h3/oldstyle-gflags", test_h3_oldstyle_gflags);
	ADD("/badserver/h3/oldstyle-no-has-flags", test_h3_oldstyle_no_has_flags);
	ADD("/badserver/h3/go-no-has-flags", test_h3_go_no_has_flags);
	ADD("/badserver/h3/oldstyle-size-too-big", test_h3_oldstyle_size_too_big);
	ADD("/badserver/h4/size-too-big", test_h4_size_too_big);
	ADD("/badserver/h4/size-zero", test_h4_size_zero);
	ADD("/badserver/h4/export-name-size-too-big", test_h4_export_name_size_too_big);
	ADD("/badserver/h5/unknown-hflags", test_h5_unknown_hflags);
	ADD("/badserver/h5/no-zeroes-not-offered", test_h5_no_zeroes_not_offered);
	ADD("/badserver/h10/go-without-info-export", test_h10_go_without_info_export);
	ADD("/badserver/h11/invalid-block-sizes", test_h11_invalid_block_sizes);
	ADD("/badserver/h11/oversized-block-max", test_h11_oversized_block_max);
	ADD("/badserver/h11/min-too-big", test_h11_min_too_big);
	ADD("/badserver/h11/pref-below-min", test_h11_pref_below_min);
	ADD("/badserver/h11/max-not-multiple", test_h11_max_not_multiple);
	ADD("/badserver/h11/pref-below-512", test_h11_pref_below_512);
	ADD("/badserver/h11/max-below-pref", test_h11_max_below_pref);
	ADD("/badserver/h12/size-unaligned", test_h12_size_unaligned);
	ADD("/badserver/h12/unaligned-request", test_h12_unaligned_request);
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
	ADD("/badserver/proto/oldstyle-read", test_oldstyle_read);
	ADD("/badserver/proto/nonfixed-read", test_nonfixed_read);
	return g_test_run();
}
