/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver-options.c: bad-server cases of option replies (H6-H9, H13-H18):
 * framing, NBD_INFO, errors and meta contexts, and the export list. */
#include "badserver.h"

/* ---- Option replies (H6-H9, H13, H14, H18) ------------------------------ */

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

static void test_h13_server_reply_to_go(void)
{
	Ctx t;

	ctx_init(&t);
	fake_negotiate(t.fs, &t.e, FAKE_OPT_GO, 1);
	fake_send(t.fs, fake_rep(FAKE_OPT_GO, FAKE_REP_SERVER, NULL));
	ctx_connect_fails(&t, NBDC_ERROR_HANDSHAKE);
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
	fake_send(t.fs,
		  fake_rep_meta_context(FAKE_OPT_SET_META_CONTEXT, 9, "qemu:dirty-bitmap:bitmap0"));
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

/* ---- Listing: bad replies (H13, H15-H17) -------------------------------- */

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
	fake_send_repeat(t.fs, fake_rep_server("export-with-a-name", "and a description"), 4000000);
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

/* ---- Listing: positive and "unsupported" -------------------------------- */

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

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	badserver_init(&argc, &argv);
	ADD("/badserver/h6/reply-bad-magic", test_h6_reply_bad_magic);
	ADD("/badserver/h6/reply-wrong-option", test_h6_reply_wrong_option);
	ADD("/badserver/h7/ack-with-payload", test_h7_ack_with_payload);
	ADD("/badserver/h8/huge-option-reply", test_h8_huge_option_reply);
	ADD("/badserver/h8/unknown-info-skipped", test_h8_unknown_info_skipped);
	ADD("/badserver/h9/info-too-short", test_h9_info_too_short);
	ADD("/badserver/h9/info-export-bad-len", test_h9_info_export_bad_len);
	ADD("/badserver/h9/block-size-bad-len", test_h9_block_size_bad_len);
	ADD("/badserver/h9/name-too-long", test_h9_name_too_long);
	ADD("/badserver/h9/description-too-long", test_h9_description_too_long);
	ADD("/badserver/h9/name-and-description", test_h9_name_and_description);
	ADD("/badserver/h13/server-reply-to-go", test_h13_server_reply_to_go);
	ADD("/badserver/h14/error-message-too-long", test_h14_error_message_too_long);
	ADD("/badserver/h18/meta-context-too-short", test_h18_meta_context_too_short);
	ADD("/badserver/h18/meta-context-too-long", test_h18_meta_context_too_long);
	ADD("/badserver/h18/meta-context-unrequested", test_h18_meta_context_unrequested);
	ADD("/badserver/h13/info-reply-to-list", test_h13_info_reply_to_list);
	ADD("/badserver/h15/server-namelen-too-big", test_h15_server_namelen_too_big);
	ADD("/badserver/h15/server-name-over-4096", test_h15_server_name_over_4096);
	ADD("/badserver/h16/endless-list", test_h16_endless_list);
	ADD("/badserver/h17/list-error-after-names", test_h17_list_error_after_names);
	ADD("/badserver/list/ok", test_list_ok);
	ADD("/badserver/list/details", test_list_details);
	ADD("/badserver/list/oldstyle", test_list_oldstyle);
	ADD("/badserver/list/nonfixed", test_list_nonfixed);
	ADD("/badserver/list/err-unsup", test_list_err_unsup);
	ADD("/badserver/list/err-platform", test_list_err_platform);
	ADD("/badserver/list/err-policy", test_list_err_policy);
	ADD("/badserver/list/err-tls-reqd", test_list_err_tls_reqd);
	return g_test_run();
}
