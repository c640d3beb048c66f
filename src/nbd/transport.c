/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* transport.c: non-blocking reads and writes on a socket or a TLS session
 * (the session made by tls.c, fed through our pull and push functions). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "transport.h"

/* What one TLS write hands gnutls at most before uncorking. */
#define TLS_CORK_MAX (256u * 1024)

struct nbdc_transport *nbdc_tr_new(int fd)
{
	struct nbdc_transport *t = g_new0(struct nbdc_transport, 1);
	struct stat st;
	int fl = fcntl(fd, F_GETFL);

	t->fd = fd;
	if (fl >= 0 && !(fl & O_NONBLOCK))
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	t->is_socket = fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode);
	return t;
}

void nbdc_tr_close(struct nbdc_transport *t)
{
	if (!t)
		return;
	if (t->tls)
		gnutls_deinit(t->tls);
	nbdc_tls_ctx_unref(t->ctx);
	if (t->fd >= 0)
		close(t->fd);
	g_free(t);
}

void nbdc_tr_shutdown(struct nbdc_transport *t, int how)
{
	if (t && t->fd >= 0 && t->is_socket)
		shutdown(t->fd, how);
}

/* One raw transfer: >0 bytes, 0 on EOF (reads), -EAGAIN or -errno. */
static ssize_t raw_io(struct nbdc_transport *t, gboolean sending, const struct iovec *iov,
		      int iovcnt)
{
	for (;;) {
		ssize_t n;

		if (t->is_socket) {
			struct msghdr m = { .msg_iov = (struct iovec *)iov,
					    .msg_iovlen = (size_t)iovcnt };

			n = sending ? sendmsg(t->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL)
				    : recvmsg(t->fd, &m, MSG_DONTWAIT);
		} else {
			n = sending ? writev(t->fd, iov, iovcnt) : readv(t->fd, iov, iovcnt);
		}
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno == EWOULDBLOCK)
			return -EAGAIN;
		return -errno;
	}
}

/* gnutls transport callbacks: the raw socket, non-blocking.  A failure is
 * kept for the direction's error and handed to gnutls as -1 with errno. */
static ssize_t tls_raw_io(struct nbdc_transport *t, gboolean sending, const struct iovec *iov,
			  int iovcnt)
{
	ssize_t n = raw_io(t, sending, iov, iovcnt);

	if (n < 0) {
		if (sending)
			t->wr_errno = (int)-n;
		else
			t->rd_errno = (int)-n;
		gnutls_transport_set_errno(t->tls, (int)-n);
		return -1;
	}
	return n;
}

static ssize_t tls_pull(gnutls_transport_ptr_t ptr, void *buf, size_t len)
{
	struct iovec v = { buf, len };

	return tls_raw_io(ptr, FALSE, &v, 1);
}

static ssize_t tls_push(gnutls_transport_ptr_t ptr, const void *buf, size_t len)
{
	struct iovec v = { (void *)buf, len };

	return tls_raw_io(ptr, TRUE, &v, 1);
}

static ssize_t tls_pushv(gnutls_transport_ptr_t ptr, const giovec_t *iov, int iovcnt)
{
	return tls_raw_io(ptr, TRUE, (const struct iovec *)iov, iovcnt);
}

gboolean nbdc_tr_start_tls(struct nbdc_transport *t, struct nbdc_tls_ctx *ctx, const char *display,
			   GError **error)
{
	if (t->tls) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_HANDSHAKE,
			    "%s: protocol error: STARTTLS acknowledged while TLS is already on",
			    display);
		return FALSE;
	}
	t->tls = nbdc_tls_session_new(ctx, display, error);
	if (!t->tls)
		return FALSE;
	t->ctx = nbdc_tls_ctx_ref(ctx);
	gnutls_transport_set_ptr(t->tls, t);
	gnutls_transport_set_pull_function(t->tls, tls_pull);
	gnutls_transport_set_push_function(t->tls, tls_push);
	gnutls_transport_set_vec_push_function(t->tls, tls_pushv);
	return TRUE;
}

int nbdc_tr_tls_handshake(struct nbdc_transport *t, const char *display, GError **error)
{
	return nbdc_tls_handshake_step(t->tls, display, error);
}

gboolean nbdc_tr_tls_wants_write(struct nbdc_transport *t)
{
	return gnutls_record_get_direction(t->tls) == 1;
}

void nbdc_tr_tls_bye(struct nbdc_transport *t)
{
	if (t && t->tls)
		gnutls_bye(t->tls, GNUTLS_SHUT_WR); /* non-blocking: one attempt */
}

/* A gnutls read/write result as our return convention. */
static ssize_t tls_result(struct nbdc_transport *t, ssize_t r, gboolean reading)
{
	if (r >= 0)
		return r;
	switch (r) {
	case GNUTLS_E_AGAIN:
	case GNUTLS_E_INTERRUPTED:
		return -EAGAIN;
	case GNUTLS_E_PREMATURE_TERMINATION:
		return reading ? 0 : -EPIPE; /* EOF without close_notify */
	case GNUTLS_E_PULL_ERROR:
		return t->rd_errno ? -t->rd_errno : -EIO;
	case GNUTLS_E_PUSH_ERROR:
		return t->wr_errno ? -t->wr_errno : -EIO;
	default:
		return -EPROTO;
	}
}

ssize_t nbdc_tr_recv(struct nbdc_transport *t, void *buf, size_t len)
{
	if (!t->tls) {
		struct iovec v = { buf, len };

		return raw_io(t, FALSE, &v, 1);
	}
	return tls_result(t, gnutls_record_recv(t->tls, buf, len), TRUE);
}

ssize_t nbdc_tr_readv(struct nbdc_transport *t, const struct iovec *iov, int iovcnt)
{
	if (!t->tls)
		return raw_io(t, FALSE, iov, iovcnt);
	ssize_t total = 0;
	for (int i = 0; i < iovcnt; i++) {
		size_t off = 0;

		while (off < iov[i].iov_len) {
			ssize_t n = nbdc_tr_recv(t, (char *)iov[i].iov_base + off,
						 iov[i].iov_len - off);

			if (n <= 0)
				return total > 0 ? total : n;
			off += (size_t)n;
			total += n;
		}
	}
	return total;
}

gboolean nbdc_tr_read_pending(struct nbdc_transport *t)
{
	return t->tls && gnutls_record_check_pending(t->tls) > 0;
}

gboolean nbdc_tr_want_write(const struct nbdc_transport *t)
{
	return t->tls_flush_pending;
}

/* TLS: encrypts up to TLS_CORK_MAX bytes of @iov into corked records and
 * flushes what the socket takes.  Bytes that are encrypted count as
 * written; the rest of the flush waits for EPOLLOUT (tls_flush_pending). */
static ssize_t tls_writev(struct nbdc_transport *t, const struct iovec *iov, int iovcnt)
{
	ssize_t r;

	if (t->tls_flush_pending) {
		r = gnutls_record_uncork(t->tls, 0);
		if (r < 0)
			return tls_result(t, r, FALSE);
		t->tls_flush_pending = FALSE;
	}
	ssize_t total = 0;
	gnutls_record_cork(t->tls);
	for (int i = 0; i < iovcnt && (size_t)total < TLS_CORK_MAX; i++) {
		size_t off = 0;

		while (off < iov[i].iov_len && (size_t)total < TLS_CORK_MAX) {
			size_t want = MIN(iov[i].iov_len - off, TLS_CORK_MAX - (size_t)total);

			r = gnutls_record_send(t->tls, (const char *)iov[i].iov_base + off, want);
			if (r <= 0) {
				gnutls_record_uncork(t->tls, 0);
				return total > 0 ? total : tls_result(t, r, FALSE);
			}
			off += (size_t)r;
			total += r;
		}
	}
	r = gnutls_record_uncork(t->tls, 0);
	if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
		t->tls_flush_pending = TRUE;
	else if (r < 0)
		return tls_result(t, r, FALSE);
	return total;
}

ssize_t nbdc_tr_writev(struct nbdc_transport *t, const struct iovec *iov, int iovcnt)
{
	if (t->tls)
		return tls_writev(t, iov, iovcnt);
	return raw_io(t, TRUE, iov, iovcnt);
}
