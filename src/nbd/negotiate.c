/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* negotiate.c: a connection's negotiation phase: feeding what arrives to the
 * handshake state machine (handshake.c), writing what it asks to send,
 * running the TLS handshake after STARTTLS.
 *
 * Called by conn.c on the connection's loop, in the phases HANDSHAKE and TLS
 * (it moves between those two itself).  Each call reports by its result:
 * NBDC_NEG_WAIT (wait for the events nbdc_conn's phase asks for),
 * NBDC_NEG_READY (GO done: transmission may start), NBDC_NEG_DONE (a control
 * connection finished), or -errno: the negotiation failed, and the reason
 * is in *msg, conn->fail_error or the handshake's error.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>

#include "internal.h"
#include "wire.h"

int nbdc_neg_start(struct nbdc_conn *conn)
{
	conn->phase = NBDC_CP_HANDSHAKE;
	conn->hs = nbdc_hs_new(conn->cfg, &conn->goal, conn->display);
	conn->wbuf = g_byte_array_new();
	conn->rb.cap = NBDC_RBUF_SIZE;
	conn->rb.data = g_malloc(conn->rb.cap);
	if (nbdc_hs_check(conn->hs) == NBDC_HS_FAILED)
		return -ENOTCONN;
	return NBDC_NEG_WAIT;
}

void nbdc_neg_finish(struct nbdc_conn *conn)
{
	nbdc_hs_result(conn->hs, &conn->neg);
	nbdc_hs_free(conn->hs);
	conn->hs = NULL;
	g_byte_array_unref(conn->wbuf);
	conn->wbuf = NULL;
	conn->wpos = 0;
}

/* ---- writing ---- */

/* Writes pending negotiation bytes: 0, or -ENOTCONN (@msg set). */
static int hs_write(struct nbdc_conn *conn, char **msg)
{
	while (conn->wpos < conn->wbuf->len) {
		struct iovec v = { conn->wbuf->data + conn->wpos, conn->wbuf->len - conn->wpos };
		ssize_t n = nbdc_tr_writev(conn->t, &v, 1);

		if (n == -EAGAIN)
			break;
		if (n < 0 && conn->hs && nbdc_hs_aborting(conn->hs)) {
			/* The server left before our ABORT: what we wanted anyway. */
			g_byte_array_set_size(conn->wbuf, 0);
			conn->wpos = 0;
			return 0;
		}
		if (n < 0) {
			*msg = g_strdup_printf(
				"sending %s: %s",
				conn->hs ? nbdc_hs_waiting_for(conn->hs) : "handshake",
				n == -EPIPE || n == -ECONNRESET ? "server closed the connection"
								: g_strerror((int)-n));
			return -ENOTCONN;
		}
		conn->wpos += (gsize)n;
	}
	if (conn->wpos == conn->wbuf->len && conn->wpos > 0) {
		g_byte_array_set_size(conn->wbuf, 0);
		conn->wpos = 0;
	}
	return 0;
}

/* A negotiation that failed: best-effort send of what it queued (an
 * ABORT); the handshake's error says why. */
static int hs_failed(struct nbdc_conn *conn)
{
	if (conn->t && conn->wbuf && conn->wpos < conn->wbuf->len) {
		struct iovec v = { conn->wbuf->data + conn->wpos, conn->wbuf->len - conn->wpos };

		nbdc_tr_writev(conn->t, &v, 1);
	}
	return -ENOTCONN;
}

/* ---- stepping ---- */

static int hs_drive(struct nbdc_conn *conn, char **msg);

static int tls_drive(struct nbdc_conn *conn, char **msg)
{
	GError *err = NULL;
	int r = nbdc_tr_tls_handshake(conn->t, conn->display, &err);

	if (r < 0) {
		conn->fail_error = err;
		return -ENOTCONN;
	}
	if (r == 0)
		return NBDC_NEG_WAIT;
	conn->phase = NBDC_CP_HANDSHAKE;
	nbdc_hs_tls_done(conn->hs);
	return hs_drive(conn, msg);
}

/* STARTTLS was acknowledged: the TLS handshake begins. */
static int start_tls(struct nbdc_conn *conn, char **msg)
{
	GError *err = NULL;

	if (conn->wpos < conn->wbuf->len)
		return NBDC_NEG_WAIT; /* the ACK's reply goes first */
	if (conn->rb.pos != conn->rb.end) {
		/* The server speaks second in TLS: bytes now are not TLS. */
		conn->fail_error = g_error_new(
			NBDC_ERROR, NBDC_ERROR_TLS,
			"%s: TLS: handshake: the server sent data before our hello", conn->display);
		return -EPROTO;
	}
	if (!conn->tls) {
		conn->fail_error = g_error_new(NBDC_ERROR, NBDC_ERROR_TLS,
					       "%s: TLS: no credentials", conn->display);
		return -ENOTCONN;
	}
	if (!nbdc_tr_start_tls(conn->t, conn->tls, conn->display, &err)) {
		conn->fail_error = err;
		return -ENOTCONN;
	}
	conn->phase = NBDC_CP_TLS;
	return tls_drive(conn, msg);
}

static int hs_drive(struct nbdc_conn *conn, char **msg)
{
	int r = nbdc_hs_step(conn->hs, &conn->rb, conn->wbuf);
	int w = hs_write(conn, msg);

	if (w < 0)
		return w;
	switch (r) {
	case NBDC_HS_WANT:
		return NBDC_NEG_WAIT;
	case NBDC_HS_START_TLS:
		return start_tls(conn, msg);
	case NBDC_HS_DONE:
		return conn->goal.go ? NBDC_NEG_READY : NBDC_NEG_DONE;
	case NBDC_HS_FAILED:
	default:
		return hs_failed(conn);
	}
}

/* Reads what arrived into conn->rb and steps. */
static int hs_read(struct nbdc_conn *conn, char **msg)
{
	for (;;) {
		if (conn->rb.end == conn->rb.cap && conn->rb.pos == 0) {
			/* Full: the handshake consumes what it holds before we
			 * read on (a reply always fits, NBDC_RBUF_SIZE). */
			int r = hs_drive(conn, msg);

			if (r != NBDC_NEG_WAIT || conn->phase != NBDC_CP_HANDSHAKE)
				return r;
		}
		ssize_t n = nbdc_rb_fill(conn);

		if (n == -EAGAIN)
			break;
		if (n <= 0) {
			int r;

			if (n == 0 || nbdc_hs_aborting(conn->hs)) {
				/* What was complete first; then the EOF. */
				r = nbdc_hs_step(conn->hs, &conn->rb, conn->wbuf);
				if (r != NBDC_HS_DONE)
					r = nbdc_hs_eof(conn->hs, conn->rb.pos != conn->rb.end);
			} else {
				/* The read error says it better than the handshake. */
				GError *superseded = nbdc_hs_take_error(conn->hs);

				g_clear_error(&superseded);
				*msg = g_strdup_printf("%s: %s", nbdc_hs_waiting_for(conn->hs),
						       n == -ECONNRESET
							       ? "server closed the connection"
							       : g_strerror((int)-n));
				return -ENOTCONN;
			}
			if (r == NBDC_HS_DONE)
				return hs_drive(conn, msg);
			return hs_failed(conn);
		}
		if (!nbdc_tr_read_pending(conn->t) && conn->rb.end < conn->rb.cap)
			break;
	}
	return hs_drive(conn, msg);
}

int nbdc_neg_io(struct nbdc_conn *conn, uint32_t events, char **msg)
{
	if (conn->phase == NBDC_CP_TLS)
		return tls_drive(conn, msg);
	if (events & EPOLLOUT) {
		int r = hs_write(conn, msg);

		if (r < 0)
			return r;
	}
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
		return hs_read(conn, msg);
	return hs_drive(conn, msg); /* e.g. STARTTLS waited for its bytes to go out */
}
