/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver-tls.c: bad-server cases of STARTTLS (H19-H21): refused,
 * required, broken; then a real TLS session (PSK) and T cases inside it. */
#include "badserver.h"

#include <glib/gstdio.h>

static char *psk_file;	   /* alice's key: what the client uses */
static char *psk_file_bob; /* a server that knows only bob */
static char *psk_dir;	   /* set in the parent process only */

/* ---- STARTTLS refused or broken (H20, H21) ------------------------------ */

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

/* ---- Inside a TLS session ----------------------------------------------- */

/* STARTTLS acknowledged and a real TLS session set up; @rest then runs inside. */
static void tls_up(Ctx *t, const char *server_psk)
{
	tls_config(t);
	fake_negotiate(t->fs, &t->e, FAKE_OPT_STARTTLS, 1);
	fake_send(t->fs, fake_rep_ack(FAKE_OPT_STARTTLS));
	fake_starttls(t->fs, server_psk);
}

/* ctx_init, a TLS session with alice's key, then a negotiation inside it (no
 * second greeting) up to @stop_option, captured in @slot (0: all of it). */
static void tls_session(Ctx *t, uint32_t stop_option, int slot)
{
	FakeExport rest;

	ctx_init(t);
	tls_up(t, psk_file);
	rest = t->e;
	rest.greeting = FALSE;
	fake_negotiate(t->fs, &rest, stop_option, slot);
}

/* The positive path: negotiation and a read inside TLS. */
static void test_tls_ok(void)
{
	Ctx t;
	struct nbdc_info info;

	tls_session(&t, 0, 0);
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

	tls_session(&t, FAKE_OPT_STRUCTURED_REPLY, 2);
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
	g_autoptr(FakeMsg) m = fake_msg_new();

	tls_session(&t, 0, 0);
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

	tls_session(&t, 0, 0);
	fake_expect_request(t.fs, 0);
	fake_send_partial_close(t.fs, fake_chunk_data(0, FAKE_CHUNK_FLAG_DONE, 0, 4096), 500);
	ctx_first_read_kills(&t, -ENOTCONN);
	ctx_end(&t);
}

/* ---- main ------------------------------------------------------------------ */

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

	badserver_init(&argc, &argv);
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
		psk_file = write_psk_file(
			psk_dir, "alice.psk",
			"alice:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n");
		psk_file_bob = write_psk_file(
			psk_dir, "bob.psk",
			"bob:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210\n");
	}

	ADD("/badserver/h20/starttls-refused", test_h20_starttls_refused);
	ADD("/badserver/h20/tls-required-oldstyle", test_h20_tls_required_oldstyle);
	ADD("/badserver/h20/tls-required-nonfixed", test_h20_tls_required_nonfixed);
	ADD("/badserver/h21/tls-handshake-garbage", test_h21_tls_handshake_garbage);
	ADD("/badserver/tls/ok", test_tls_ok);
	ADD("/badserver/h19/starttls-reply-inside-tls", test_h19_starttls_reply_inside_tls);
	ADD("/badserver/h21/tls-unknown-psk-user", test_h21_tls_unknown_psk_user);
	ADD("/badserver/tls/t1-bad-reply-magic", test_tls_t1_bad_reply_magic);
	ADD("/badserver/tls/t10-close-mid-payload", test_tls_t10_close_mid_payload);

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
