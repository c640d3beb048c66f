/* tls.c: gnutls client session after NBD_OPT_STARTTLS: PSK or X.509, SNI, peer checks. */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "transport.h"

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

static gboolean setup_x509(struct nbdc_transport *t, const struct nbdc_config *cfg,
			   const char *display, GError **error)
{
	int r = gnutls_certificate_allocate_credentials(&t->x509);

	if (r < 0)
		return tls_fail(display, "credentials", r, error);
	if (cfg->tls_certificates) {
		g_autofree char *ca = g_build_filename(cfg->tls_certificates, "ca-cert.pem", NULL);
		g_autofree char *crl = g_build_filename(cfg->tls_certificates, "ca-crl.pem", NULL);
		g_autofree char *cert =
		    g_build_filename(cfg->tls_certificates, "client-cert.pem", NULL);
		g_autofree char *key =
		    g_build_filename(cfg->tls_certificates, "client-key.pem", NULL);

		if (g_file_test(ca, G_FILE_TEST_EXISTS)) {
			r = gnutls_certificate_set_x509_trust_file(t->x509, ca,
								   GNUTLS_X509_FMT_PEM);
			if (r < 0)
				return tls_fail(display, ca, r, error);
		} else {
			gnutls_certificate_set_x509_system_trust(t->x509);
		}
		if (g_file_test(crl, G_FILE_TEST_EXISTS)) {
			r = gnutls_certificate_set_x509_crl_file(t->x509, crl, GNUTLS_X509_FMT_PEM);
			if (r < 0)
				return tls_fail(display, crl, r, error);
		}
		if (g_file_test(cert, G_FILE_TEST_EXISTS) && g_file_test(key, G_FILE_TEST_EXISTS)) {
			r = gnutls_certificate_set_x509_key_file(t->x509, cert, key,
								 GNUTLS_X509_FMT_PEM);
			if (r < 0)
				return tls_fail(display, cert, r, error);
		}
	} else {
		gnutls_certificate_set_x509_system_trust(t->x509);
	}
	r = gnutls_credentials_set(t->tls, GNUTLS_CRD_CERTIFICATE, t->x509);
	if (r < 0)
		return tls_fail(display, "credentials", r, error);
	return TRUE;
}

static gboolean setup_psk(struct nbdc_transport *t, const struct nbdc_config *cfg,
			  const char *display, GError **error)
{
	const char *user = cfg->tls_username ? cfg->tls_username : g_get_user_name();
	g_autofree char *key = psk_lookup(cfg->tls_psk_file, user, display, error);

	if (!key)
		return FALSE;
	gnutls_datum_t k = {.data = (unsigned char *)key, .size = (unsigned)strlen(key)};
	int r = gnutls_psk_allocate_client_credentials(&t->psk);
	if (r >= 0)
		r = gnutls_psk_set_client_credentials(t->psk, user, &k, GNUTLS_PSK_KEY_HEX);
	explicit_bzero(key, strlen(key));
	if (r < 0)
		return tls_fail(display, "PSK key", r, error);
	r = gnutls_credentials_set(t->tls, GNUTLS_CRD_PSK, t->psk);
	if (r < 0)
		return tls_fail(display, "credentials", r, error);
	return TRUE;
}

gboolean nbdc_tls_start(struct nbdc_transport *t, const struct nbdc_config *cfg,
			const char *hostname, const char *display, GError **error)
{
	int r;

	if (t->tls) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_HANDSHAKE,
			    "%s: protocol error: STARTTLS acknowledged while TLS is already on",
			    display);
		return FALSE;
	}
	r = gnutls_init(&t->tls, GNUTLS_CLIENT | GNUTLS_NO_SIGNAL);
	if (r < 0) {
		t->tls = NULL;
		return tls_fail(display, "init", r, error);
	}
	nbdc_tr_install_tls_io(t);
	if (cfg->tls_psk_file) {
		r = gnutls_priority_set_direct(t->tls, PRIORITY ":+ECDHE-PSK:+DHE-PSK:+PSK", NULL);
		if (r < 0)
			return tls_fail(display, "priority", r, error);
		if (!setup_psk(t, cfg, display, error))
			return FALSE;
	} else {
		r = gnutls_priority_set_direct(t->tls, PRIORITY, NULL);
		if (r < 0)
			return tls_fail(display, "priority", r, error);
		if (!setup_x509(t, cfg, display, error))
			return FALSE;
		if (hostname && !g_hostname_is_ip_address(hostname))
			gnutls_server_name_set(t->tls, GNUTLS_NAME_DNS, hostname, strlen(hostname));
		if (cfg->tls_verify_peer)
			gnutls_session_set_verify_cert(t->tls, hostname, 0);
	}
	gnutls_handshake_set_timeout(t->tls, GNUTLS_INDEFINITE_TIMEOUT);
	do {
		r = gnutls_handshake(t->tls);
	} while (r < 0 && !gnutls_error_is_fatal(r));
	if (r < 0) {
		if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
			gnutls_datum_t out = {0};
			unsigned status = gnutls_session_get_verify_cert_status(t->tls);

			if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509,
									 &out, 0) == 0) {
				g_set_error(error, NBDC_ERROR, NBDC_ERROR_TLS,
					    "%s: TLS: server certificate: %s", display,
					    g_strstrip((char *)out.data));
				gnutls_free(out.data);
				return FALSE;
			}
		}
		if ((r == GNUTLS_E_PULL_ERROR && t->rd_errno == ETIMEDOUT) ||
		    (r == GNUTLS_E_PUSH_ERROR && t->wr_errno == ETIMEDOUT)) {
			g_set_error(error, NBDC_ERROR, NBDC_ERROR_TIMEOUT,
				    "%s: TLS: handshake timed out", display);
			return FALSE;
		}
		return tls_fail(display, "handshake", r, error);
	}
	return TRUE;
}

void nbdc_tls_bye(struct nbdc_transport *t)
{
	if (!t || !t->tls)
		return;
	gint64 dl = g_get_monotonic_time() + G_USEC_PER_SEC;
	if (!t->deadline_us || t->deadline_us > dl)
		t->deadline_us = dl;
	int r;
	do {
		r = gnutls_bye(t->tls, GNUTLS_SHUT_WR);
	} while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED);
}
