/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* transport.h: one non-blocking byte stream to a server: a plain socket or a
 * gnutls session over it (private).
 *
 * Calls never wait: reads return >0 bytes, 0 at EOF, -EAGAIN when nothing is
 * there yet, or -errno; writes return the bytes taken (a TLS transport takes
 * everything it encrypted, even when the socket is full: see
 * nbdc_tr_want_write) or -EAGAIN / -errno.  No SIGPIPE (MSG_NOSIGNAL).  Used
 * only on the connection's loop thread.
 */
#pragma once

#include <glib.h>
#include <gnutls/gnutls.h>
#include <stdint.h>
#include <sys/uio.h>

#include "nbdfs/nbd.h"
#include "tls.h"

struct nbdc_transport {
	int fd;
	gboolean is_socket;	    /* FALSE: a pipe in tests (readv/writev) */
	gnutls_session_t tls;	    /* NULL while plaintext */
	struct nbdc_tls_ctx *ctx;   /* ref while tls */
	gboolean tls_flush_pending; /* encrypted bytes wait for the socket */
	int rd_errno, wr_errno;	    /* errno seen by the gnutls pull/push functions */
};

/* Wraps a connected (or connecting) fd, made non-blocking.  Takes the fd. */
struct nbdc_transport *nbdc_tr_new(int fd);
/* Closes the fd and frees the TLS session.  NULL is a no-op. */
void nbdc_tr_close(struct nbdc_transport *t);

ssize_t nbdc_tr_recv(struct nbdc_transport *t, void *buf, size_t len);
/* Reads into @iov (not modified). */
ssize_t nbdc_tr_readv(struct nbdc_transport *t, const struct iovec *iov, int iovcnt);
/* Writes what it can of @iov (not modified). */
ssize_t nbdc_tr_writev(struct nbdc_transport *t, const struct iovec *iov, int iovcnt);
/* TRUE when TLS holds decrypted bytes no poll will announce. */
gboolean nbdc_tr_read_pending(struct nbdc_transport *t);
/* TRUE when encrypted bytes are waiting for the socket to take them (wait
 * for EPOLLOUT and call nbdc_tr_writev, even with nothing new). */
gboolean nbdc_tr_want_write(const struct nbdc_transport *t);
/* shutdown(2) of the socket. */
void nbdc_tr_shutdown(struct nbdc_transport *t, int how);

/* ---- TLS on the stream (sessions from tls.c) ------------------------------ */

/* Starts a client session on @t with @ctx's credentials (after STARTTLS was
 * acknowledged); @t keeps a reference to @ctx.  FALSE + GError
 * (NBDC_ERROR_TLS, or NBDC_ERROR_HANDSHAKE when TLS is already on). */
gboolean nbdc_tr_start_tls(struct nbdc_transport *t, struct nbdc_tls_ctx *ctx, const char *display,
			   GError **error);
/* One step of the TLS handshake: 1 done, 0 in progress (wait for what
 * nbdc_tr_tls_wants_write() says), -1 failed (@error set). */
int nbdc_tr_tls_handshake(struct nbdc_transport *t, const char *display, GError **error);
/* During the handshake: TRUE when it waits to write, FALSE to read. */
gboolean nbdc_tr_tls_wants_write(struct nbdc_transport *t);
/* Best-effort close_notify (one non-blocking attempt); no-op without TLS. */
void nbdc_tr_tls_bye(struct nbdc_transport *t);
