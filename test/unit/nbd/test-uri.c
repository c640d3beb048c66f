/* test-uri.c: the NBD URI parser, display form and config mapping. */
#include "config.h"

#include <string.h>

#include "nbdfs/nbd.h"

struct good {
	const char *uri;
	gboolean tls, unix_socket;
	const char *host, *port, *socket, *export_name, *user;
};

static const struct good goods[] = {
	{ "nbd://h", FALSE, FALSE, "h", "10809", NULL, "", NULL },
	{ "nbd://h/", FALSE, FALSE, "h", "10809", NULL, "", NULL },
	{ "nbd://h/disk", FALSE, FALSE, "h", "10809", NULL, "disk", NULL },
	{ "nbd://h//disk", FALSE, FALSE, "h", "10809", NULL, "/disk", NULL },
	{ "nbd://h/a/b/c", FALSE, FALSE, "h", "10809", NULL, "a/b/c", NULL },
	{ "nbd://h/hello%20world", FALSE, FALSE, "h", "10809", NULL, "hello world", NULL },
	{ "nbd://h/%41%2f%2F", FALSE, FALSE, "h", "10809", NULL, "A//", NULL },
	{ "nbd://example.com:10810/x", FALSE, FALSE, "example.com", "10810", NULL, "x", NULL },
	{ "nbd://h:/x", FALSE, FALSE, "h", "10809", NULL, "x", NULL },
	{ "nbd://h:00123/x", FALSE, FALSE, "h", "123", NULL, "x", NULL },
	{ "nbd://[::1]/x", FALSE, FALSE, "::1", "10809", NULL, "x", NULL },
	{ "nbd://[::1]:2000", FALSE, FALSE, "::1", "2000", NULL, "", NULL },
	{ "nbd://[fe80::1%25eth0]:2000/", FALSE, FALSE, "fe80::1%eth0", "2000", NULL, "", NULL },
	{ "nbd://127.0.0.1:1/e", FALSE, FALSE, "127.0.0.1", "1", NULL, "e", NULL },
	{ "nbd://alice@h/e", FALSE, FALSE, "h", "10809", NULL, "e", "alice" },
	{ "nbds://alice@h:99/e", TRUE, FALSE, "h", "99", NULL, "e", "alice" },
	{ "nbds://a%40b@h/e", TRUE, FALSE, "h", "10809", NULL, "e", "a@b" },
	{ "NBD://h/e", FALSE, FALSE, "h", "10809", NULL, "e", NULL },
	{ "nbd://h/e#frag", FALSE, FALSE, "h", "10809", NULL, "e", NULL },
	{ "nbd://h/e?x-foo=1", FALSE, FALSE, "h", "10809", NULL, "e", NULL },
	{ "nbd+unix:///?socket=/s", FALSE, TRUE, NULL, NULL, "/s", "", NULL },
	{ "nbd+unix:///x?socket=/s", FALSE, TRUE, NULL, NULL, "/s", "x", NULL },
	{ "nbd+unix://?socket=/s", FALSE, TRUE, NULL, NULL, "/s", "", NULL },
	{ "nbd+unix:///x?socket=/tmp/a%20b", FALSE, TRUE, NULL, NULL, "/tmp/a b", "x", NULL },
	{ "nbd+unix:///x?socket=rel/sock", FALSE, TRUE, NULL, NULL, "rel/sock", "x", NULL },
	{ "nbds+unix://bob@/x?socket=/s&tls-psk-file=/k", TRUE, TRUE, NULL, NULL, "/s", "x",
	  "bob" },
};

static void test_good(void)
{
	for (gsize i = 0; i < G_N_ELEMENTS(goods); i++) {
		const struct good *g = &goods[i];
		g_autoptr(GError) err = NULL;

		if (!g->export_name)
			continue;
		g_test_message("%s", g->uri);
		g_autoptr(NbdcUri) u = nbdc_uri_parse(g->uri, &err);
		g_assert_no_error(err);
		g_assert_nonnull(u);
		g_assert_cmpint(u->tls, ==, g->tls);
		g_assert_cmpint(u->unix_socket, ==, g->unix_socket);
		g_assert_cmpstr(u->host, ==, g->host);
		g_assert_cmpstr(u->port, ==, g->port);
		g_assert_cmpstr(u->socket_path, ==, g->socket);
		g_assert_cmpstr(u->export_name, ==, g->export_name);
		g_assert_cmpstr(u->tls_username, ==, g->user);
	}
}

static void test_query(void)
{
	g_autoptr(GError) err = NULL;
	g_autoptr(NbdcUri) u = nbdc_uri_parse(
		"nbds://h/e?tls-psk-file=/k%20f&tls-certificates=/c&tls-hostname=srv&"
		"tls-type=psk&tls-verify-peer=false",
		&err);

	g_assert_no_error(err);
	g_assert_cmpstr(u->tls_psk_file, ==, "/k f");
	g_assert_cmpstr(u->tls_certificates, ==, "/c");
	g_assert_cmpstr(u->tls_hostname, ==, "srv");
	g_assert_cmpstr(u->tls_type, ==, "psk");
	g_assert_cmpint(u->tls_verify_peer, ==, 0);

	g_autoptr(NbdcUri) v = nbdc_uri_parse("nbds://h/?tls-verify-peer=1", &err);
	g_assert_no_error(err);
	g_assert_cmpint(v->tls_verify_peer, ==, 1);
	g_autoptr(NbdcUri) w = nbdc_uri_parse("nbds://h/", &err);
	g_assert_no_error(err);
	g_assert_cmpint(w->tls_verify_peer, ==, -1);
	g_assert_null(w->tls_psk_file);
}

struct bad {
	const char *uri;
	const char *msg; /* substring of the error */
};

static const struct bad bads[] = {
	{ "", "empty URI" },
	{ "/tmp/sock", "not an NBD URI" },
	{ "localhost", "not an NBD URI" },
	{ "nbd:/h/x", "not an NBD URI" },
	{ "http://h/x", "unknown scheme 'http'" },
	{ "nbd+vsock://1/x", "unknown scheme 'nbd+vsock'" },
	{ "nbd://h:99999", "nbd://h:99999: bad port '99999'" },
	{ "nbd://h:0/x", "bad port '0'" },
	{ "nbd://h:12a/x", "bad port '12a'" },
	{ "nbd://h:-1/x", "bad port '-1'" },
	{ "nbd://h:1234567/x", "bad port '1234567'" },
	{ "nbd:///x", "missing host" },
	{ "nbd://", "missing host" },
	{ "nbd://@h/x", "empty user name" },
	{ "nbd://[::1/x", "missing ']'" },
	{ "nbd://[]/x", "empty IPv6 address" },
	{ "nbd://[::1]x/x", "unexpected 'x' after IPv6 address" },
	{ "nbd://[zz::1]/x", "bad IPv6 address 'zz::1'" },
	{ "nbd://h/a%2", "bad %-escape '%2' in export name" },
	{ "nbd://h/a%zz", "bad %-escape '%zz' in export name" },
	{ "nbd://h/a%", "bad %-escape '%' in export name" },
	{ "nbd://h/a%00b", "%00 (NUL) in export name" },
	{ "nbd://h%2/x", "bad %-escape '%2' in host" },
	{ "nbd://h%20x/x", "bad host 'h x'" },
	{ "nbd://h/x?socket=/s", "socket= needs an nbd+unix" },
	{ "nbds://h/x?socket=/s", "socket= needs an nbd+unix" },
	{ "nbd+unix:///x", "nbd+unix needs ?socket=PATH" },
	{ "nbds+unix:///x", "nbds+unix needs ?socket=PATH" },
	{ "nbd+unix:///x?socket=", "empty socket path" },
	{ "nbd+unix://h/x?socket=/s", "takes no host or port (got 'h')" },
	{ "nbd+unix:///x?socket=%00abs", "%00 (NUL) in socket" },
	{ "nbd+unix:///x?socket=/s&socket=/t", "'socket' given twice" },
	{ "nbd://h/x?foo=bar", "unknown query parameter 'foo'" },
	{ "nbd://h/x?tls-type=bogus", "bad tls-type 'bogus'" },
	{ "nbd://h/x?tls-verify-peer=maybe", "bad tls-verify-peer 'maybe'" },
	{ "nbd://h/x?tls-verify-peer=1&tls-verify-peer=0", "'tls-verify-peer' given twice" },
	{ "nbd://h/x?tls-hostname", "'tls-hostname' has no value" },
	{ "nbd://h/x?tls-hostname=%g0", "bad %-escape '%g0' in tls-hostname" },
	{ "nbd://h/x?%zz=1", "bad %-escape '%zz' in query" },
};

static void test_bad(void)
{
	for (gsize i = 0; i < G_N_ELEMENTS(bads); i++) {
		g_autoptr(GError) err = NULL;

		g_test_message("%s", bads[i].uri);
		g_autoptr(NbdcUri) u = nbdc_uri_parse(bads[i].uri, &err);
		g_assert_null(u);
		g_assert_error(err, NBDC_ERROR, NBDC_ERROR_URI);
		if (!strstr(err->message, bads[i].msg))
			g_error("'%s': message '%s' lacks '%s'", bads[i].uri, err->message,
				bads[i].msg);
	}
}

static void test_long_export(void)
{
	g_autoptr(GError) err = NULL;
	g_autofree char *name = g_strnfill(4096, 'a');
	g_autofree char *ok = g_strdup_printf("nbd://h/%s", name);
	g_autofree char *bad = g_strdup_printf("nbd://h/%sa", name);
	g_autofree char *bad2 = g_strdup_printf("nbd://h/%s%%41", name);

	g_autoptr(NbdcUri) u = nbdc_uri_parse(ok, &err);
	g_assert_no_error(err);
	g_assert_cmpuint(strlen(u->export_name), ==, 4096);
	g_autoptr(NbdcUri) v = nbdc_uri_parse(bad, &err);
	g_assert_null(v);
	g_assert_error(err, NBDC_ERROR, NBDC_ERROR_URI);
	g_assert_nonnull(strstr(err->message, "longer than 4096"));
	g_clear_error(&err);
	g_autoptr(NbdcUri) w = nbdc_uri_parse(bad2, &err);
	g_assert_null(w);
	g_assert_error(err, NBDC_ERROR, NBDC_ERROR_URI);
}

static void test_display(void)
{
	static const char *const cases[][2] = {
		{ "nbd://h/disk", "nbd://h/disk" },
		{ "nbd://h:10809/disk", "nbd://h/disk" },
		{ "nbd://alice@h:99/a%20b?tls-psk-file=/k", "nbd://h:99/a%20b" },
		{ "nbds://[::1]:5/x?tls-certificates=/c", "nbds://[::1]:5/x" },
		{ "nbd+unix:///x?socket=/s", "nbd+unix:///x?socket=/s" },
		{ "nbds+unix://u@/x?socket=/s&tls-psk-file=/k", "nbds+unix:///x?socket=/s" },
		{ "nbd://h", "nbd://h/" },
	};

	for (gsize i = 0; i < G_N_ELEMENTS(cases); i++) {
		g_autoptr(GError) err = NULL;
		g_autoptr(NbdcUri) u = nbdc_uri_parse(cases[i][0], &err);

		g_assert_no_error(err);
		g_autofree char *d = nbdc_uri_to_display(u);
		g_assert_cmpstr(d, ==, cases[i][1]);
		/* the display form parses back to the same place */
		g_autoptr(NbdcUri) back = nbdc_uri_parse(d, &err);
		g_assert_no_error(err);
		g_assert_cmpstr(back->export_name, ==, u->export_name);
		g_assert_cmpstr(back->host, ==, u->host);
		g_assert_cmpstr(back->socket_path, ==, u->socket_path);
	}
}

static void test_config(void)
{
	struct nbdc_config cfg;
	g_autoptr(GError) err = NULL;
	g_autoptr(NbdcUri) u = nbdc_uri_parse("nbds://bob@h:77/e?tls-verify-peer=0", &err);

	g_assert_no_error(err);
	nbdc_config_init(&cfg);
	g_assert_cmpint(cfg.fd, ==, -1);
	g_assert_true(cfg.tls_verify_peer);
	g_assert_true(cfg.structured_replies);
	g_assert_true(cfg.block_status);
	g_assert_cmpuint(cfg.max_in_flight, ==, 64);
	g_assert_cmpuint(cfg.handshake_timeout_ms, ==, 30000);
	cfg.tls_psk_file = "/default.psk";
	cfg.socket_path = "/stale";
	nbdc_config_set_uri(&cfg, u);
	g_assert_true(cfg.tls);
	g_assert_cmpstr(cfg.host, ==, "h");
	g_assert_cmpstr(cfg.port, ==, "77");
	g_assert_null(cfg.socket_path);
	g_assert_cmpstr(cfg.export_name, ==, "e");
	g_assert_cmpstr(cfg.tls_username, ==, "bob");
	g_assert_cmpstr(cfg.tls_psk_file, ==, "/default.psk"); /* kept */
	g_assert_false(cfg.tls_verify_peer);

	g_autoptr(NbdcUri) v = nbdc_uri_parse("nbd+unix:///x?socket=/s&tls-psk-file=/k", &err);
	g_assert_no_error(err);
	nbdc_config_set_uri(&cfg, v);
	g_assert_false(cfg.tls);
	g_assert_null(cfg.host);
	g_assert_cmpstr(cfg.socket_path, ==, "/s");
	g_assert_cmpstr(cfg.tls_psk_file, ==, "/k");
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/uri/good", test_good);
	g_test_add_func("/uri/query", test_query);
	g_test_add_func("/uri/bad", test_bad);
	g_test_add_func("/uri/long-export", test_long_export);
	g_test_add_func("/uri/display", test_display);
	g_test_add_func("/uri/config", test_config);
	return g_test_run();
}
