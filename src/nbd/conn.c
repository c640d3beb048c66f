/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* conn.c: one NBD connection as a state machine on one event loop.
 *
 * Phases: NEW -> [RESOLVING: getaddrinfo on the pool] -> CONNECTING
 * (non-blocking connect, next address on failure) -> HANDSHAKE (handshake.c
 * over conn->rb and conn->wbuf) <-> TLS (gnutls, non-blocking) -> READY
 * (transmission: send.c, reply.c) -> [CLOSING: DISC sent, waiting for EOF]
 * -> DEAD.  One timer serves every phase: the handshake deadline, then the
 * request timeout, then the goodbye bound.
 *
 * This file is the state machine; the work of a phase is done below it, by
 * files that report by return value and never call back up: connect.c (the
 * socket), negotiate.c (the negotiation), send.c and reply.c
 * (transmission).  Only this file arms the connection's watch, timer and
 * end-of-turn work, and only it changes the phase (negotiate.c moves
 * between HANDSHAKE and TLS).
 *
 * Threads: everything here runs on conn->loop, except nbdc_conn_start,
 * nbdc_conn_submit and nbdc_conn_close, which post to it.  Other threads
 * hand requests over through the inbox (inq_lock, a short mutex); the loop
 * drains it in one task.  A dying connection closes the inbox under the
 * same lock, so a request is either drained (and reaches owner->lost) or
 * refused (the submitter picks again).  References: the owner holds one,
 * every posted task and pool job another; the memory goes with the last.
 */
#include "config.h"

#include <errno.h>
#include <netdb.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"
#include "wire.h"

/* How long a graceful close waits for the server's EOF after DISC. */
#define GOODBYE_US (2 * G_USEC_PER_SEC)

static void on_io(void *opaque, uint32_t events);
static void on_timer(void *opaque);
static void conn_fail(struct nbdc_conn *conn, int err, const char *msg);

/* ---- life ---- */

struct nbdc_conn *nbdc_conn_new(Loop *loop, const struct nbdc_config *cfg, struct nbdc_tls_ctx *tls,
				const struct nbdc_hs_goal *goal,
				const struct nbdc_conn_owner *owner, void *owner_data, int fd)
{
	struct nbdc_conn *conn = g_new0(struct nbdc_conn, 1);

	conn->refs = 1;
	conn->loop = loop;
	conn->cfg = cfg;
	conn->tls = tls ? nbdc_tls_ctx_ref(tls) : NULL;
	conn->goal = *goal;
	conn->owner = owner;
	conn->owner_data = owner_data;
	conn->fd_in = fd;
	conn->phase = NBDC_CP_NEW;
	struct nbdc_config shown = *cfg;
	if (!goal->go)
		shown.export_name = NULL;
	shown.fd = fd;
	conn->display = nbdc_cfg_display(&shown);
	g_mutex_init(&conn->inq_lock);
	return conn;
}

struct nbdc_conn *nbdc_conn_ref(struct nbdc_conn *conn)
{
	g_atomic_int_inc(&conn->refs);
	return conn;
}

void nbdc_conn_unref(struct nbdc_conn *conn)
{
	if (!conn || !g_atomic_int_dec_and_test(&conn->refs))
		return;
	g_assert(conn->w.loop == NULL && !loop_timer_armed(&conn->timer));
	nbdc_tr_close(conn->t);
	if (conn->fd_in >= 0)
		close(conn->fd_in);
	if (conn->ai_list)
		freeaddrinfo(conn->ai_list);
	nbdc_hs_free(conn->hs);
	if (conn->wbuf)
		g_byte_array_unref(conn->wbuf);
	g_free(conn->rb.data);
	nbdc_neg_clear(&conn->neg);
	nbdc_send_fini(conn);
	nbdc_reply_fini(conn);
	nbdc_tls_ctx_unref(conn->tls);
	g_clear_error(&conn->fail_error);
	g_mutex_clear(&conn->inq_lock);
	g_free(conn->display);
	g_free(conn);
}

gboolean nbdc_conn_is_ready(const struct nbdc_conn *conn)
{
	return conn->phase == NBDC_CP_READY && !conn->shutdown_pending && !conn->draining;
}

gboolean nbdc_conn_usable(const struct nbdc_conn *conn)
{
	return nbdc_conn_is_ready(conn) && !g_atomic_int_get(&conn->inq_closed) && !conn->doomed;
}

/* ---- events ---- */

/* The watch events the connection needs now. */
static void update_events(struct nbdc_conn *conn)
{
	uint32_t ev = 0;

	if (!conn->t || conn->phase == NBDC_CP_DEAD)
		return;
	switch (conn->phase) {
	case NBDC_CP_CONNECTING:
		ev = EPOLLOUT;
		break;
	case NBDC_CP_TLS:
		ev = nbdc_tr_tls_wants_write(conn->t) ? EPOLLOUT : EPOLLIN;
		break;
	case NBDC_CP_HANDSHAKE:
		ev = EPOLLIN;
		if (conn->wbuf && conn->wpos < conn->wbuf->len)
			ev |= EPOLLOUT;
		break;
	case NBDC_CP_READY:
	case NBDC_CP_CLOSING:
		ev = EPOLLIN;
		if ((conn->txq_head && conn->stall_since) || nbdc_tr_want_write(conn->t))
			ev |= EPOLLOUT;
		break;
	default:
		return;
	}
	if (conn->w.loop)
		loop_watch_mod(&conn->w, ev);
	else if (loop_watch_add(conn->loop, &conn->w, conn->t->fd, ev, on_io, conn) < 0)
		conn_fail(conn, -ENOTCONN, "epoll: cannot watch the socket");
}

/* ---- death ---- */

/* Dies with @err and @msg (NULL: a quiet close); the owner hears of it. */
static void conn_fail(struct nbdc_conn *conn, int err, const char *msg)
{
	enum nbdc_conn_phase was = conn->phase;

	if (was == NBDC_CP_DEAD)
		return;
	conn->phase = NBDC_CP_DEAD;
	loop_watch_del(&conn->w);
	loop_timer_stop(&conn->timer);
	if (conn->t)
		nbdc_tr_shutdown(conn->t, SHUT_RDWR);
	/* Close the inbox: later submitters pick another connection. */
	g_mutex_lock(&conn->inq_lock);
	conn->inq_closed = TRUE;
	struct nbdc_req *inq = conn->inq_head;
	conn->inq_head = conn->inq_tail = NULL;
	g_mutex_unlock(&conn->inq_lock);

	nbdc_conn_ref(conn);
	if (was == NBDC_CP_READY || was == NBDC_CP_CLOSING) {
		struct nbdc_req *reqs = nbdc_send_take_all(conn), *tail = reqs;

		/* Send order first, then what never reached the send queue. */
		while (tail && tail->next)
			tail = tail->next;
		if (tail)
			tail->next = inq;
		else
			reqs = inq;
		if (msg && conn->cfg->debug)
			nbdc_log(conn->cfg, NBDC_LOG_DEBUG, "%s: connection %u lost: %s",
				 conn->display, conn->index, msg);
		conn->owner->lost(conn, conn->owner_data, reqs, err, msg);
	} else {
		GError *e = NULL;

		g_assert(inq == NULL);
		e = g_steal_pointer(&conn->fail_error);
		if (!e && conn->hs)
			e = nbdc_hs_take_error(conn->hs);
		if (!e)
			e = g_error_new(NBDC_ERROR,
					err == -ETIMEDOUT ? NBDC_ERROR_TIMEOUT : NBDC_ERROR_CONNECT,
					"%s: %s", conn->display, msg ? msg : "closed");
		conn->owner->finished(conn, conn->owner_data, e);
	}
	nbdc_tr_close(conn->t);
	conn->t = NULL;
	nbdc_conn_unref(conn);
}

/* ---- timers ---- */

static void arm_deadline(struct nbdc_conn *conn)
{
	guint ms = conn->cfg->handshake_timeout_ms;

	if (ms == 0)
		return;
	conn->deadline = g_get_monotonic_time() + (gint64)ms * 1000;
	loop_timer_start(conn->loop, &conn->timer, conn->deadline, on_timer, conn);
}

/* The request timeout: arms the timer for the next request due (or a
 * stalled socket); FALSE when one is overdue and the connection died. */
static gboolean check_timeout(struct nbdc_conn *conn)
{
	gint64 next = 0;
	char *msg = NULL;

	if (nbdc_send_check_timeout(conn, &next, &msg) < 0) {
		conn_fail(conn, -ETIMEDOUT, msg);
		g_free(msg);
		return FALSE;
	}
	if (next)
		loop_timer_start(conn->loop, &conn->timer, next, on_timer, conn);
	return TRUE;
}

static void on_timer(void *opaque)
{
	struct nbdc_conn *conn = opaque;

	switch (conn->phase) {
	case NBDC_CP_RESOLVING:
	case NBDC_CP_CONNECTING:
	case NBDC_CP_HANDSHAKE:
	case NBDC_CP_TLS: {
		const char *what = conn->phase == NBDC_CP_RESOLVING    ? "resolving the host"
				   : conn->phase == NBDC_CP_CONNECTING ? "connect"
				   : conn->hs ? nbdc_hs_waiting_for(conn->hs)
					      : "handshake";
		g_autofree char *m = g_strdup_printf("handshake timed out (%u ms) during %s",
						     conn->cfg->handshake_timeout_ms, what);
		if (conn->hs) {
			/* The timeout says it better than the handshake. */
			GError *superseded = nbdc_hs_take_error(conn->hs);

			g_clear_error(&superseded);
		}
		conn_fail(conn, -ETIMEDOUT, m);
		return;
	}
	case NBDC_CP_READY:
		check_timeout(conn);
		return;
	case NBDC_CP_CLOSING:
		/* The server did not close after DISC: we do. */
		conn->quiet = TRUE;
		conn_fail(conn, -ENOTCONN, NULL);
		return;
	default:
		return;
	}
}

/* ---- connecting and negotiating ---- */

static void became_ready(struct nbdc_conn *conn);

/* A connect step's result: under way (wait for EPOLLOUT) or failed. */
static void connecting(struct nbdc_conn *conn, int r, char *msg)
{
	if (r < 0)
		conn_fail(conn, r, msg);
	else {
		conn->phase = NBDC_CP_CONNECTING;
		update_events(conn);
	}
	g_free(msg);
}

/* A negotiation step's result. */
static void negotiated(struct nbdc_conn *conn, int r, char *msg)
{
	switch (r) {
	case NBDC_NEG_WAIT:
		update_events(conn);
		break;
	case NBDC_NEG_READY:
		became_ready(conn);
		break;
	case NBDC_NEG_DONE:
		/* A control connection: done; close quietly. */
		loop_watch_del(&conn->w);
		loop_timer_stop(&conn->timer);
		conn->phase = NBDC_CP_DEAD;
		nbdc_tr_tls_bye(conn->t);
		nbdc_conn_ref(conn);
		conn->owner->finished(conn, conn->owner_data, NULL);
		nbdc_tr_close(conn->t);
		conn->t = NULL;
		nbdc_conn_unref(conn);
		break;
	default:
		conn_fail(conn, r, msg);
		break;
	}
	g_free(msg);
}

static void start_negotiation(struct nbdc_conn *conn)
{
	negotiated(conn, nbdc_neg_start(conn), NULL);
}

static void connect_unix(struct nbdc_conn *conn);

static void connect_unix_again(void *opaque)
{
	connect_unix(opaque);
}

static void connect_unix(struct nbdc_conn *conn)
{
	gint64 retry_at = 0;
	char *msg = NULL;
	int r = nbdc_connect_unix(conn, &retry_at, &msg);

	if (r == NBDC_CONNECT_BUSY) {
		conn->phase = NBDC_CP_CONNECTING;
		loop_timer_start(conn->loop, &conn->timer, retry_at, connect_unix_again, conn);
		return;
	}
	if (r == NBDC_CONNECT_STARTED && conn->deadline)
		loop_timer_start(conn->loop, &conn->timer, conn->deadline, on_timer, conn);
	connecting(conn, r, msg);
}

/* EPOLLOUT on a connecting socket: connected, or the next address. */
static void connect_done(struct nbdc_conn *conn)
{
	char *msg = NULL;
	int r;

	loop_watch_del(&conn->w);
	r = nbdc_connect_finish(conn, &msg);
	if (r == NBDC_CONNECT_UP)
		start_negotiation(conn);
	else
		connecting(conn, r, msg);
}

static void resolved(void *opaque, struct addrinfo **res, int gai)
{
	struct nbdc_conn *conn = opaque;

	if (conn->phase == NBDC_CP_RESOLVING) {
		char *msg = NULL;
		int r = nbdc_connect_resolved(conn, res, gai, &msg);

		connecting(conn, r, msg);
	}
	nbdc_conn_unref(conn);
}

static void connect_tcp(struct nbdc_conn *conn)
{
	char *msg = NULL;

	/* Numeric addresses need no lookup; names go to the pool (a lookup
	 * can block for seconds), bounded by the handshake deadline. */
	if (nbdc_connect_numeric(conn)) {
		int r = nbdc_connect_next(conn, &msg);

		connecting(conn, r, msg);
		return;
	}
	conn->phase = NBDC_CP_RESOLVING;
	nbdc_resolve(conn, resolved, nbdc_conn_ref(conn));
}

static void start_on_loop(void *opaque)
{
	struct nbdc_conn *conn = opaque;

	if (conn->phase == NBDC_CP_NEW) {
		arm_deadline(conn);
		if (conn->fd_in >= 0) {
			conn->t = nbdc_tr_new(conn->fd_in);
			conn->fd_in = -1;
			start_negotiation(conn);
		} else if (conn->cfg->socket_path) {
			connect_unix(conn);
		} else if (conn->cfg->host) {
			connect_tcp(conn);
		} else {
			conn_fail(conn, -ENOTCONN, "no host, socket path or fd to connect to");
		}
	}
	nbdc_conn_unref(conn);
}

void nbdc_conn_start(struct nbdc_conn *conn)
{
	nbdc_conn_ref(conn);
	if (loop_is_current(conn->loop))
		start_on_loop(conn);
	else
		loop_post(conn->loop, start_on_loop, conn);
}

/* ---- transmission ---- */

static void ready_io(struct nbdc_conn *conn, uint32_t events);

static void became_ready(struct nbdc_conn *conn)
{
	nbdc_neg_finish(conn);
	loop_timer_stop(&conn->timer);
	conn->deadline = 0;
	conn->phase = NBDC_CP_READY;
	nbdc_send_init(conn);
	update_events(conn);
	conn->owner->ready(conn, conn->owner_data);
	/* Replies the server sent right after GO's ACK are already buffered. */
	if (conn->phase == NBDC_CP_READY && conn->rb.pos < conn->rb.end) {
		nbdc_conn_ref(conn);
		ready_io(conn, EPOLLIN);
		nbdc_conn_unref(conn);
	}
}

/* Writes what the send queue holds; FALSE when the connection died. */
static gboolean send_now(struct nbdc_conn *conn)
{
	char *msg = NULL;

	if (nbdc_send_flush(conn, &msg) < 0) {
		conn_fail(conn, -ENOTCONN, msg);
		g_free(msg);
		return FALSE;
	}
	/* Requests that went out (or a socket that stopped taking bytes)
	 * start the request timeout. */
	if (conn->phase == NBDC_CP_READY && conn->cfg->request_timeout_ms &&
	    !loop_timer_armed(&conn->timer) && (conn->inf_head || conn->stall_since))
		return check_timeout(conn);
	return TRUE;
}

static void send_deferred(void *opaque)
{
	struct nbdc_conn *conn = opaque;

	if ((conn->phase == NBDC_CP_READY || conn->phase == NBDC_CP_CLOSING) && send_now(conn))
		update_events(conn);
	nbdc_conn_unref(conn); /* the queued end-of-turn work's reference */
}

/* What requests queued during this turn go out together at its end. */
static void send_soon(struct nbdc_conn *conn)
{
	if (conn->tx_defer.queued)
		return;
	loop_defer(conn->loop, &conn->tx_defer, send_deferred, nbdc_conn_ref(conn));
}

/* A draining connection's last request finished: DISC, then wait for EOF. */
static void drained(struct nbdc_conn *conn)
{
	if (conn->phase != NBDC_CP_READY || conn->disc_sent)
		return;
	nbdc_send_disc(conn);
	conn->phase = NBDC_CP_CLOSING;
	loop_timer_start(conn->loop, &conn->timer, g_get_monotonic_time() + GOODBYE_US, on_timer,
			 conn);
	update_events(conn);
}

static void ready_io(struct nbdc_conn *conn, uint32_t events)
{
	char *msg = NULL;

	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR) || nbdc_tr_read_pending(conn->t)) {
		int r;

		while ((r = nbdc_reply_read(conn, &msg)) == NBDC_REPLY_DRAINED)
			drained(conn);
		if (r < 0) {
			gboolean clean = msg == NULL;

			if (clean)
				conn->quiet = TRUE;
			conn_fail(conn, r, msg);
			g_free(msg);
			return;
		}
		/* Replies freed slots: more of the queue may go. */
		if (conn->txq_head)
			send_soon(conn);
	}
	if (conn->phase != NBDC_CP_READY && conn->phase != NBDC_CP_CLOSING)
		return;
	if ((events & EPOLLOUT) && !send_now(conn))
		return;
	update_events(conn);
}

static void on_io(void *opaque, uint32_t events)
{
	struct nbdc_conn *conn = opaque;
	char *msg = NULL;

	nbdc_conn_ref(conn);
	switch (conn->phase) {
	case NBDC_CP_CONNECTING:
		connect_done(conn);
		break;
	case NBDC_CP_HANDSHAKE:
	case NBDC_CP_TLS: {
		int r = nbdc_neg_io(conn, events, &msg);

		negotiated(conn, r, msg);
		break;
	}
	case NBDC_CP_READY:
	case NBDC_CP_CLOSING:
		ready_io(conn, events);
		break;
	default:
		break;
	}
	nbdc_conn_unref(conn);
}

/* ---- the inbox and closing (any thread) ---- */

/* On the loop: the requests taken from the inbox (@list, linked by next)
 * join the send queue, in order. */
static void queue_inbox(struct nbdc_conn *conn, struct nbdc_req *list)
{
	if (list)
		send_soon(conn);
	while (list) {
		struct nbdc_req *next = list->next;

		list->next = NULL;
		nbdc_send_queue(conn, list);
		list = next;
	}
}

static void drain_inbox(void *opaque)
{
	struct nbdc_conn *conn = opaque;

	g_mutex_lock(&conn->inq_lock);
	struct nbdc_req *list = conn->inq_head;
	conn->inq_head = conn->inq_tail = NULL;
	conn->inq_posted = FALSE;
	g_mutex_unlock(&conn->inq_lock);
	queue_inbox(conn, list);
	nbdc_conn_unref(conn);
}

gboolean nbdc_conn_submit(struct nbdc_conn *conn, struct nbdc_req *req)
{
	if (loop_is_current(conn->loop)) {
		if (!nbdc_conn_is_ready(conn))
			return FALSE;
		g_atomic_int_inc(&conn->load);
		nbdc_send_queue(conn, req);
		send_soon(conn);
		return TRUE;
	}
	g_mutex_lock(&conn->inq_lock);
	if (conn->inq_closed) {
		g_mutex_unlock(&conn->inq_lock);
		return FALSE;
	}
	nbdc_req_append(&conn->inq_head, &conn->inq_tail, req);
	g_atomic_int_inc(&conn->load);
	gboolean post = !conn->inq_posted;
	conn->inq_posted = TRUE;
	g_mutex_unlock(&conn->inq_lock);
	if (post)
		loop_post_task(conn->loop, &conn->inq_task, drain_inbox, nbdc_conn_ref(conn));
	return TRUE;
}

struct close_req {
	struct nbdc_conn *conn; /* ref */
	enum nbdc_close_how how;
};

static void close_on_loop(void *opaque)
{
	struct close_req *cr = opaque;
	struct nbdc_conn *conn = cr->conn;

	conn->quiet = TRUE;
	switch (conn->phase) {
	case NBDC_CP_READY: {
		/* No new requests; what is already handed over still goes. */
		g_mutex_lock(&conn->inq_lock);
		conn->inq_closed = TRUE;
		struct nbdc_req *list = conn->inq_head;
		conn->inq_head = conn->inq_tail = NULL;
		g_mutex_unlock(&conn->inq_lock);
		conn->draining = TRUE;
		queue_inbox(conn, list);
		gboolean idle = !conn->txq_head && !conn->inf_head;
		if (cr->how == NBDC_CLOSE_DROP || (cr->how == NBDC_CLOSE_ABANDON && !idle))
			conn_fail(conn, -ENOTCONN, NULL);
		else if (idle)
			drained(conn);
		break;
	}
	case NBDC_CP_CLOSING:
		if (cr->how != NBDC_CLOSE_GRACEFUL)
			conn_fail(conn, -ENOTCONN, NULL);
		break;
	case NBDC_CP_DEAD:
		break;
	default:
		conn_fail(conn, -ENOTCONN, "connection closed before it was ready");
		break;
	}
	nbdc_conn_unref(conn);
	g_free(cr);
}

void nbdc_conn_close(struct nbdc_conn *conn, enum nbdc_close_how how)
{
	struct close_req *cr = g_new(struct close_req, 1);

	cr->conn = nbdc_conn_ref(conn);
	cr->how = how;
	/* Always later: the caller may be inside this connection's callbacks. */
	loop_post(conn->loop, close_on_loop, cr);
}
