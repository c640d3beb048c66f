/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* tls.c: gnutls client sessions after NBD_OPT_STARTTLS: PSK or X.509, SNI,
 * peer checks, a non-blocking handshake.
 *
 * Credentials are loaded once per configuration (a context shared by every
 * connection made from it), so a reconnect or a thousand exports never read
 * key files again, and a bad file is a start-up error. */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "tls.h"

/* TLS 1.2 at least (the NBD spec's MUST). */
#define PRIORITY "NORMAL:-VERS-TLS1.0:-VERS-TLS1.1"

/* Finds @user's hex key in a "user:hexkey" file.  Caller frees. */
static char *psk_lookup(const char *file, const char *user, const char *display, GError **error)
{
	g_autofree char *text = NULL;
	g_autoptr(GError) e = NULL;

	if (!g_file_get_contents(file, &text, NULL, &e)) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_TLS, "%s: TLS: PSK file: %s", display,
			    e->message);
		return NULL;
	}
	g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
	for (char **l = lines; *l; l++) {
		char *line = g_strstrip(*l);
		char *colon = strchr(line, ':');

		if (!colon)
			continue;
		*colon = 0;
		if (strcmp(line, user) == 0) {
			char *key = g_strdup(colon + 1);
			explicit_bzero(text, strlen(text));
			return key;
		}
	}
	explicit_bzero(text, strlen(text));
	g_set_error(error, NBDC_ERROR, NBDC_ERROR_TLS,
		    "%s: TLS: PSK file '%s' has no key for user '%s'", display, file, user);
	return NULL;
}

static gboolean tls_fail(const char *display, const char *what, int r, GError **error)
{
	g_set_error(error, NBDC_ERROR, NBDC_ERROR_TLS, "%s: TLS: %s: %s", display, what,
		    gnutls_strerror(r));
	return FALSE;
}

struct nbdc_tls_ctx {
	gint refs;
	gboolean psk_mode;
	gnutls_psk_client_credentials_t psk;
	gnutls_certificate_credentials_t x509;
	char *hostname; /* SNI and verification name, or NULL */
	gboolean verify_peer;
};

static gboolean setup_x509(struct nbdc_tls_ctx *ctx, const struct nbdc_config *cfg,
			   const char *display, GError **error)
{
	int r = gnutls_certificate_allocate_credentials(&ctx->x509);

	if (r < 0) {
		ctx->x509 = NULL;
		return tls_fail(display, "credentials", r, error);
	}
	if (cfg->tls_certificates) {
		g_autofree char *ca = g_build_filename(cfg->tls_certificates, "ca-cert.pem", NULL);
		g_autofree char *crl = g_build_filename(cfg->tls_certificates, "ca-crl.pem", NULL);
		g_autofree char *cert =
			g_build_filename(cfg->tls_certificates, "client-cert.pem", NULL);
		g_autofree char *key =
			g_build_filename(cfg->tls_certificates, "client-key.pem", NULL);

		if (g_file_test(ca, G_FILE_TEST_EXISTS)) {
			r = gnutls_certificate_set_x509_trust_file(ctx->x509, ca,
								   GNUTLS_X509_FMT_PEM);
			if (r < 0)
				return tls_fail(display, ca, r, error);
		} else {
			gnutls_certificate_set_x509_system_trust(ctx->x509);
		}
		if (g_file_test(crl, G_FILE_TEST_EXISTS)) {
			r = gnutls_certificate_set_x509_crl_file(ctx->x509, crl,
								 GNUTLS_X509_FMT_PEM);
			if (r < 0)
				return tls_fail(display, crl, r, error);
		}
		if (g_file_test(cert, G_FILE_TEST_EXISTS) && g_file_test(key, G_FILE_TEST_EXISTS)) {
			r = gnutls_certificate_set_x509_key_file(ctx->x509, cert, key,
								 GNUTLS_X509_FMT_PEM);
			if (r < 0)
				return tls_fail(display, cert, r, error);
		}
	} else {
		gnutls_certificate_set_x509_system_trust(ctx->x509);
	}
	return TRUE;
}

static gboolean setup_psk(struct nbdc_tls_ctx *ctx, const struct nbdc_config *cfg,
			  const char *display, GError **error)
{
	const char *user = cfg->tls_username ? cfg->tls_username : g_get_user_name();
	g_autofree char *key = psk_lookup(cfg->tls_psk_file, user, display, error);

	if (!key)
		return FALSE;
	gnutls_datum_t k = { .data = (unsigned char *)key, .size = (unsigned)strlen(key) };
	int r = gnutls_psk_allocate_client_credentials(&ctx->psk);
	if (r < 0)
		ctx->psk = NULL;
	if (r >= 0)
		r = gnutls_psk_set_client_credentials(ctx->psk, user, &k, GNUTLS_PSK_KEY_HEX);
	explicit_bzero(key, strlen(key));
	if (r < 0)
		return tls_fail(display, "PSK key", r, error);
	return TRUE;
}

struct nbdc_tls_ctx *nbdc_tls_ctx_new(const struct nbdc_config *cfg, const char *display,
				      GError **error)
{
	struct nbdc_tls_ctx *ctx = g_new0(struct nbdc_tls_ctx, 1);
	const char *hn = cfg->tls_hostname ? cfg->tls_hostname : cfg->host;

	ctx->refs = 1;
	ctx->psk_mode = cfg->tls_psk_file != NULL;
	ctx->hostname = g_strdup(hn);
	ctx->verify_peer = cfg->tls_verify_peer;
	if (!(ctx->psk_mode ? setup_psk(ctx, cfg, display, error)
			    : setup_x509(ctx, cfg, display, error))) {
		nbdc_tls_ctx_unref(ctx);
		return NULL;
	}
	return ctx;
}

struct nbdc_tls_ctx *nbdc_tls_ctx_ref(struct nbdc_tls_ctx *ctx)
{
	g_atomic_int_inc(&ctx->refs);
	return ctx;
}

void nbdc_tls_ctx_unref(struct nbdc_tls_ctx *ctx)
{
	if (!ctx || !g_atomic_int_dec_and_test(&ctx->refs))
		return;
	if (ctx->psk)
		gnutls_psk_free_client_credentials(ctx->psk);
	if (ctx->x509)
		gnutls_certificate_free_credentials(ctx->x509);
	g_free(ctx->hostname);
	g_free(ctx);
}

/* Priorities, credentials, SNI and the peer check of a new session; *@what
 * names the step that failed. */
static int session_setup(gnutls_session_t s, const struct nbdc_tls_ctx *ctx, const char **what)
{
	int r;

	*what = "priority";
	if (ctx->psk_mode) {
		r = gnutls_priority_set_direct(s, PRIORITY ":+ECDHE-PSK:+DHE-PSK:+PSK", NULL);
		if (r < 0)
			return r;
		*what = "credentials";
		return gnutls_credentials_set(s, GNUTLS_CRD_PSK, ctx->psk);
	}
	r = gnutls_priority_set_direct(s, PRIORITY, NULL);
	if (r < 0)
		return r;
	*what = "credentials";
	r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, ctx->x509);
	if (r < 0)
		return r;
	if (ctx->hostname && !g_hostname_is_ip_address(ctx->hostname))
		gnutls_server_name_set(s, GNUTLS_NAME_DNS, ctx->hostname, strlen(ctx->hostname));
	if (ctx->verify_peer)
		gnutls_session_set_verify_cert(s, ctx->hostname, 0);
	return 0;
}

gnutls_session_t nbdc_tls_session_new(struct nbdc_tls_ctx *ctx, const char *display, GError **error)
{
	gnutls_session_t s;
	const char *what = "init";
	int r = gnutls_init(&s, GNUTLS_CLIENT | GNUTLS_NO_SIGNAL | GNUTLS_NONBLOCK);

	if (r < 0) {
		tls_fail(display, what, r, error);
		return NULL;
	}
	r = session_setup(s, ctx, &what);
	if (r < 0) {
		tls_fail(display, what, r, error);
		gnutls_deinit(s);
		return NULL;
	}
	gnutls_handshake_set_timeout(s, GNUTLS_INDEFINITE_TIMEOUT);
	return s;
}

int nbdc_tls_handshake_step(gnutls_session_t s, const char *display, GError **error)
{
	int r = gnutls_handshake(s);

	if (r == 0)
		return 1;
	if (!gnutls_error_is_fatal(r))
		return 0;
	if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
		gnutls_datum_t out = { 0 };
		unsigned status = gnutls_session_get_verify_cert_status(s);

		if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out,
								 0) == 0) {
			g_set_error(error, NBDC_ERROR, NBDC_ERROR_TLS,
				    "%s: TLS: server certificate: %s", display,
				    g_strstrip((char *)out.data));
			gnutls_free(out.data);
			return -1;
		}
	}
	tls_fail(display, "handshake", r, error);
	return -1;
}
