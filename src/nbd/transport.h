/* transport.h: one byte stream to a server, plain socket or gnutls session (private).
 *
 * All I/O loops over short transfers and EINTR, never raises SIGPIPE
 * (MSG_NOSIGNAL), and waits with poll() so that a deadline (handshake) or an
 * inactivity limit (a stalled server mid-message) can end it with -ETIMEDOUT.
 * Reads and writes may run at the same time from two threads (the reader and
 * one sender under the connection's send lock); nothing else is concurrent.
 */
#pragma once

#include <glib.h>
#include <gnutls/gnutls.h>
#include <stdint.h>
#include <sys/uio.h>

#include "nbdfs/nbd.h"

struct nbdc_transport {
	int fd;
	gnutls_session_t tls;		       /* NULL while plaintext */
	gnutls_psk_client_credentials_t psk;   /* owned, or NULL */
	gnutls_certificate_credentials_t x509; /* owned, or NULL */
	gint64 deadline_us;		       /* absolute g_get_monotonic_time(); 0 = none */
	guint idle_ms;			       /* max wait without progress; 0 = none */
	int rd_errno, wr_errno;		       /* errno seen by the gnutls pull/push functions */
};

/* Opens a connected socket for @cfg (host/port, socket_path or fd; takes
 * the fd).  Sets TCP_NODELAY on TCP.  @display names the server in errors. */
struct nbdc_transport *nbdc_tr_open(const struct nbdc_config *cfg, const char *display,
				    gint64 deadline_us, GError **error);
/* Closes the fd (and frees the TLS session).  NULL is a no-op. */
void nbdc_tr_close(struct nbdc_transport *t);

/* Reads exactly @len bytes.  0, -ENODATA (EOF before the first byte),
 * -ECONNRESET (EOF part-way), -ETIMEDOUT or another -errno. */
int nbdc_tr_read(struct nbdc_transport *t, void *buf, size_t len);
/* One read of up to @len bytes (waiting as needed): >0 bytes, 0 on EOF,
 * -errno.  For callers that buffer what arrives. */
ssize_t nbdc_tr_recv(struct nbdc_transport *t, void *buf, size_t len);
/* Reads into @iov (modified in place as it advances).  Same returns. */
int nbdc_tr_readv(struct nbdc_transport *t, struct iovec *iov, int iovcnt);
/* Discards @len bytes. */
int nbdc_tr_skip(struct nbdc_transport *t, uint64_t len);
/* Writes all of @iov (modified in place).  0 or -errno. */
int nbdc_tr_writev(struct nbdc_transport *t, struct iovec *iov, int iovcnt);
int nbdc_tr_write(struct nbdc_transport *t, const void *buf, size_t len);
/* Waits until data is readable: 1 ready, 0 after @timeout_ms (-1 = none), -errno. */
int nbdc_tr_wait_readable(struct nbdc_transport *t, int timeout_ms);
/* shutdown(2) of the socket; safe from any thread. */
void nbdc_tr_shutdown(struct nbdc_transport *t, int how);

/* Routes gnutls I/O on @t->tls through the waits above. */
void nbdc_tr_install_tls_io(struct nbdc_transport *t);

/* tls.c: STARTTLS was acknowledged: runs the TLS handshake on @t with the
 * credentials of @cfg.  @hostname is used for SNI and verification (may be
 * NULL for unix sockets).  FALSE + NBDC_ERROR_TLS on failure. */
gboolean nbdc_tls_start(struct nbdc_transport *t, const struct nbdc_config *cfg,
			const char *hostname, const char *display, GError **error);
/* Sends close_notify (bounded by the transport's timeouts); ignores errors. */
void nbdc_tls_bye(struct nbdc_transport *t);
