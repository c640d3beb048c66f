/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* tls.h: TLS credentials and client sessions (private).
 *
 * Below the transport: tls.c knows gnutls and the credential files, not the
 * socket; the transport (transport.c) owns a session made here and gives it
 * its non-blocking pull and push functions.
 */
#pragma once

#include <glib.h>
#include <gnutls/gnutls.h>

#include "nbdfs/nbd.h"

struct nbdc_tls_ctx;

/* The credentials of @cfg, loaded once (files read here, on the caller's
 * thread) and shared by every connection made from it.  NULL + GError
 * (NBDC_ERROR_TLS) when a file cannot be used. */
struct nbdc_tls_ctx *nbdc_tls_ctx_new(const struct nbdc_config *cfg, const char *display,
				      GError **error);
struct nbdc_tls_ctx *nbdc_tls_ctx_ref(struct nbdc_tls_ctx *ctx);
void nbdc_tls_ctx_unref(struct nbdc_tls_ctx *ctx);

/* A non-blocking client session with @ctx's credentials, priorities, SNI and
 * peer check, with no transport functions yet (the caller installs them and
 * keeps a reference to @ctx for the session's life).  NULL + GError
 * (NBDC_ERROR_TLS) on failure.  Caller frees with gnutls_deinit. */
gnutls_session_t nbdc_tls_session_new(struct nbdc_tls_ctx *ctx, const char *display,
				      GError **error);
/* One step of the handshake: 1 done, 0 in progress (wait for the direction
 * gnutls_record_get_direction() says), -1 failed (@error set). */
int nbdc_tls_handshake_step(gnutls_session_t s, const char *display, GError **error);
