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
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"
#include "wire.h"

/* A Unix server whose backlog is full: retry this often until the deadline. */
#define UNIX_BUSY_RETRY_US (5 * 1000)
/* How long a graceful close waits for the server's EOF after DISC. */
#define GOODBYE_US (2 * G_USEC_PER_SEC)

static void on_io(void *opaque, uint32_t events);
static void on_timer(void *opaque);
static void hs_drive(struct nbdc_conn *conn);

/* ---- life ---- */

struct nbdc_conn *nbdc_conn_new(Loop *loop, const struct nbdc_config *cfg,
				struct nbdc_tls_ctx *tls, const struct nbdc_hs_goal *goal,
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

/* ---- events ---- */

void nbdc_conn_update_events(struct nbdc_conn *conn)
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
		nbdc_conn_fail(conn, -ENOTCONN, "epoll: cannot watch the socket");
}

/* ---- death ---- */

void nbdc_conn_fail(struct nbdc_conn *conn, int err, const char *msg)
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

/* A negotiation that failed: best-effort send of what it queued (an
 * ABORT), then close with its error. */
static void hs_failed(struct nbdc_conn *conn)
{
	if (conn->t && conn->wbuf && conn->wpos < conn->wbuf->len) {
		struct iovec v = {conn->wbuf->data + conn->wpos, conn->wbuf->len - conn->wpos};

		nbdc_tr_writev(conn->t, &v, 1);
	}
	nbdc_conn_fail(conn, -ENOTCONN, NULL);
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

static void on_timer(void *opaque)
{
	struct nbdc_conn *conn = opaque;
	char *msg = NULL;

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
		if (conn->hs)
			nbdc_hs_take_error(conn->hs);
		nbdc_conn_fail(conn, -ETIMEDOUT, m);
		return;
	}
	case NBDC_CP_READY:
		if (nbdc_send_check_timeout(conn, &msg) < 0) {
			nbdc_conn_fail(conn, -ETIMEDOUT, msg);
			g_free(msg);
		}
		return;
	case NBDC_CP_CLOSING:
		/* The server did not close after DISC: we do. */
		conn->quiet = TRUE;
		nbdc_conn_fail(conn, -ENOTCONN, NULL);
		return;
	default:
		return;
	}
}

/* ---- connecting ---- */

static void tcp_options(struct nbdc_conn *conn, int fd)
{
	int one = 1;
	guint io_ms = conn->cfg->request_timeout_ms;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (io_ms == 0)
		return;
	/* A dead peer is noticed even with nothing in flight: keepalive probes
	 * start after a third of the request timeout and give up after it;
	 * unacknowledged data fails the socket after the request timeout. */
	int idle = (int)MAX(1u, io_ms / 3000), intvl = (int)MAX(1u, io_ms / 6000), cnt = 3;
	unsigned int user_timeout = io_ms;

	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout));
}

static void start_handshake(struct nbdc_conn *conn)
{
	conn->phase = NBDC_CP_HANDSHAKE;
	conn->hs = nbdc_hs_new(conn->cfg, &conn->goal, conn->display);
	conn->wbuf = g_byte_array_new();
	conn->rb.cap = NBDC_RBUF_SIZE;
	conn->rb.data = g_malloc(conn->rb.cap);
	if (nbdc_hs_check(conn->hs) == NBDC_HS_FAILED) {
		nbdc_conn_fail(conn, -ENOTCONN, NULL);
		return;
	}
	nbdc_conn_update_events(conn);
}

static void connect_next(struct nbdc_conn *conn);
static void connect_unix(struct nbdc_conn *conn);

static void connect_unix_again(void *opaque)
{
	connect_unix(opaque);
}

static void connect_unix(struct nbdc_conn *conn)
{
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	const char *path = conn->cfg->socket_path;
	size_t plen = strlen(path);

	/* Paths are literal: a leading '@' is not an abstract socket. */
	if (plen == 0 || plen >= sizeof(sun.sun_path)) {
		g_autofree char *m = g_strdup_printf("socket path '%s': %s", path,
						     plen ? "too long" : "empty");
		nbdc_conn_fail(conn, -ENOTCONN, m);
		return;
	}
	memcpy(sun.sun_path, path, plen);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		int e = errno;
		g_autofree char *m = g_strdup_printf(
		    "socket: %s%s", g_strerror(e),
		    e == EMFILE || e == ENFILE ? " (open file limit reached: ulimit -n)" : "");
		nbdc_conn_fail(conn, -ENOTCONN, m);
		return;
	}
	socklen_t slen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
	if (connect(fd, (struct sockaddr *)&sun, slen) < 0 && errno != EINPROGRESS) {
		int e = errno;

		close(fd);
		if (e == EAGAIN &&
		    (!conn->deadline || g_get_monotonic_time() + UNIX_BUSY_RETRY_US < conn->deadline)) {
			/* The server's backlog is full: it is busy, not gone. */
			conn->phase = NBDC_CP_CONNECTING;
			loop_timer_start(conn->loop, &conn->timer,
					 g_get_monotonic_time() + UNIX_BUSY_RETRY_US,
					 connect_unix_again, conn);
			return;
		}
		g_autofree char *m = g_strdup_printf("connect to '%s': %s", path, g_strerror(e));
		nbdc_conn_fail(conn, -ENOTCONN, m);
		return;
	}
	if (conn->deadline)
		loop_timer_start(conn->loop, &conn->timer, conn->deadline, on_timer, conn);
	conn->t = nbdc_tr_new(fd);
	conn->phase = NBDC_CP_CONNECTING;
	nbdc_conn_update_events(conn);
}

static void connect_done(struct nbdc_conn *conn)
{
	int err = 0;
	socklen_t el = sizeof(err);

	if (getsockopt(conn->t->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
		err = errno;
	if (err == 0) {
		loop_watch_del(&conn->w);
		if (conn->cfg->host && !conn->cfg->socket_path)
			tcp_options(conn, conn->t->fd);
		start_handshake(conn);
		return;
	}
	conn->connect_errno = err;
	loop_watch_del(&conn->w);
	nbdc_tr_close(conn->t);
	conn->t = NULL;
	if (conn->cfg->socket_path) {
		g_autofree char *m = g_strdup_printf("connect to '%s': %s", conn->cfg->socket_path,
						     g_strerror(err));
		nbdc_conn_fail(conn, -ENOTCONN, m);
		return;
	}
	connect_next(conn);
}

static void connect_next(struct nbdc_conn *conn)
{
	const char *port = conn->cfg->port ? conn->cfg->port : NBD_DEFAULT_PORT;

	while (conn->ai_next) {
		struct addrinfo *ai = conn->ai_next;

		conn->ai_next = ai->ai_next;
		int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
				ai->ai_protocol);
		if (fd < 0) {
			conn->connect_errno = errno;
			continue;
		}
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 || errno == EINPROGRESS) {
			conn->t = nbdc_tr_new(fd);
			conn->phase = NBDC_CP_CONNECTING;
			nbdc_conn_update_events(conn);
			return;
		}
		conn->connect_errno = errno;
		close(fd);
	}
	int e = conn->connect_errno ? conn->connect_errno : ECONNREFUSED;
	g_autofree char *m = g_strdup_printf(
	    "connect to %s port %s: %s%s", conn->cfg->host, port, g_strerror(e),
	    e == EMFILE || e == ENFILE ? " (open file limit reached: ulimit -n)" : "");
	nbdc_conn_fail(conn, -ENOTCONN, m);
}

/* A getaddrinfo that ran on the pool. */
struct resolve_job {
	struct nbdc_conn *conn; /* ref */
	char *host, *port;
	struct addrinfo *res;
	int gai;
};

static void resolved(void *opaque)
{
	struct resolve_job *j = opaque;
	struct nbdc_conn *conn = j->conn;

	if (conn->phase == NBDC_CP_RESOLVING) {
		if (j->gai != 0) {
			g_autofree char *m = g_strdup_printf("resolve '%s' port %s: %s", j->host,
							     j->port, gai_strerror(j->gai));
			nbdc_conn_fail(conn, -ENOTCONN, m);
		} else {
			conn->ai_list = conn->ai_next = g_steal_pointer(&j->res);
			connect_next(conn);
		}
	}
	if (j->res)
		freeaddrinfo(j->res);
	g_free(j->host);
	g_free(j->port);
	g_free(j);
	nbdc_conn_unref(conn);
}

static void resolve_on_pool(void *opaque)
{
	struct resolve_job *j = opaque;
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_ADDRCONFIG};

	j->gai = getaddrinfo(j->host, j->port, &hints, &j->res);
	loop_post(j->conn->loop, resolved, j);
}

static void connect_tcp(struct nbdc_conn *conn)
{
	const char *port = conn->cfg->port ? conn->cfg->port : NBD_DEFAULT_PORT;
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
	struct addrinfo *res = NULL;

	/* Numeric addresses need no lookup; names go to the pool (a lookup
	 * can block for seconds), bounded by the handshake deadline. */
	if (getaddrinfo(conn->cfg->host, port, &hints, &res) == 0) {
		conn->ai_list = conn->ai_next = res;
		connect_next(conn);
		return;
	}
	struct resolve_job *j = g_new0(struct resolve_job, 1);

	j->conn = nbdc_conn_ref(conn);
	j->host = g_strdup(conn->cfg->host);
	j->port = g_strdup(port);
	conn->phase = NBDC_CP_RESOLVING;
	loop_set_run_blocking(loop_get_set(conn->loop), resolve_on_pool, j);
}

static void start_on_loop(void *opaque)
{
	struct nbdc_conn *conn = opaque;

	if (conn->phase == NBDC_CP_NEW) {
		arm_deadline(conn);
		if (conn->fd_in >= 0) {
			conn->t = nbdc_tr_new(conn->fd_in);
			conn->fd_in = -1;
			start_handshake(conn);
		} else if (conn->cfg->socket_path) {
			connect_unix(conn);
		} else if (conn->cfg->host) {
			connect_tcp(conn);
		} else {
			nbdc_conn_fail(conn, -ENOTCONN, "no host, socket path or fd to connect to");
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

/* ---- negotiation ---- */

/* Writes pending negotiation bytes; FALSE when the connection died. */
static gboolean hs_write(struct nbdc_conn *conn)
{
	while (conn->wpos < conn->wbuf->len) {
		struct iovec v = {conn->wbuf->data + conn->wpos, conn->wbuf->len - conn->wpos};
		ssize_t n = nbdc_tr_writev(conn->t, &v, 1);

		if (n == -EAGAIN)
			break;
		if (n < 0 && conn->hs && nbdc_hs_aborting(conn->hs)) {
			/* The server left before our ABORT: what we wanted anyway. */
			g_byte_array_set_size(conn->wbuf, 0);
			conn->wpos = 0;
			return TRUE;
		}
		if (n < 0) {
			g_autofree char *m = g_strdup_printf(
			    "sending %s: %s", conn->hs ? nbdc_hs_waiting_for(conn->hs) : "handshake",
			    n == -EPIPE || n == -ECONNRESET ? "server closed the connection"
							     : g_strerror((int)-n));
			nbdc_conn_fail(conn, -ENOTCONN, m);
			return FALSE;
		}
		conn->wpos += (gsize)n;
	}
	if (conn->wpos == conn->wbuf->len && conn->wpos > 0) {
		g_byte_array_set_size(conn->wbuf, 0);
		conn->wpos = 0;
	}
	return TRUE;
}

static void tls_drive(struct nbdc_conn *conn)
{
	GError *err = NULL;
	int r = nbdc_tr_tls_handshake(conn->t, conn->display, &err);

	if (r < 0) {
		conn->fail_error = err;
		nbdc_conn_fail(conn, -ENOTCONN, err->message);
		return;
	}
	if (r == 0) {
		nbdc_conn_update_events(conn);
		return;
	}
	conn->phase = NBDC_CP_HANDSHAKE;
	nbdc_hs_tls_done(conn->hs);
	hs_drive(conn);
}

static void became_ready(struct nbdc_conn *conn)
{
	nbdc_hs_result(conn->hs, &conn->neg);
	nbdc_hs_free(conn->hs);
	conn->hs = NULL;
	g_byte_array_unref(conn->wbuf);
	conn->wbuf = NULL;
	conn->wpos = 0;
	loop_timer_stop(&conn->timer);
	conn->deadline = 0;
	conn->phase = NBDC_CP_READY;
	nbdc_send_init(conn);
	nbdc_conn_update_events(conn);
	conn->owner->ready(conn, conn->owner_data);
	/* Replies the server sent right after GO's ACK are already buffered. */
	if (conn->phase == NBDC_CP_READY && conn->rb.pos < conn->rb.end)
		on_io(conn, EPOLLIN);
}

static void hs_drive(struct nbdc_conn *conn)
{
	for (;;) {
		int r = nbdc_hs_step(conn->hs, &conn->rb, conn->wbuf);

		if (!hs_write(conn))
			return;
		switch (r) {
		case NBDC_HS_WANT:
			nbdc_conn_update_events(conn);
			return;
		case NBDC_HS_START_TLS: {
			GError *err = NULL;

			if (conn->wpos < conn->wbuf->len) {
				nbdc_conn_update_events(conn); /* the ACK's reply goes first */
				return;
			}
			if (conn->rb.pos != conn->rb.end) {
				/* The server speaks second in TLS: bytes now are not TLS. */
				conn->fail_error = g_error_new(
				    NBDC_ERROR, NBDC_ERROR_TLS,
				    "%s: TLS: handshake: the server sent data before our hello",
				    conn->display);
				nbdc_conn_fail(conn, -EPROTO, "TLS handshake failed");
				return;
			}
			if (!conn->tls) {
				conn->fail_error = g_error_new(NBDC_ERROR, NBDC_ERROR_TLS,
							       "%s: TLS: no credentials", conn->display);
				nbdc_conn_fail(conn, -ENOTCONN, "TLS: no credentials");
				return;
			}
			if (!nbdc_tr_start_tls(conn->t, conn->tls, conn->display, &err)) {
				conn->fail_error = err;
				nbdc_conn_fail(conn, -ENOTCONN, err->message);
				return;
			}
			conn->phase = NBDC_CP_TLS;
			tls_drive(conn);
			return;
		}
		case NBDC_HS_DONE:
			if (conn->goal.go) {
				became_ready(conn);
			} else {
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
			}
			return;
		case NBDC_HS_FAILED:
		default:
			hs_failed(conn);
			return;
		}
	}
}

/* Reads what arrived during negotiation into conn->rb and steps. */
static void hs_read(struct nbdc_conn *conn)
{
	for (;;) {
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
				r = NBDC_HS_FAILED;
				nbdc_hs_take_error(conn->hs);
				g_autofree char *m = g_strdup_printf(
				    "%s: %s", nbdc_hs_waiting_for(conn->hs),
				    n == -ECONNRESET ? "server closed the connection"
						     : g_strerror((int)-n));
				nbdc_conn_fail(conn, -ENOTCONN, m);
				return;
			}
			if (r == NBDC_HS_DONE) {
				hs_drive(conn);
				return;
			}
			hs_failed(conn);
			return;
		}
		if (!nbdc_tr_read_pending(conn->t) && conn->rb.end < conn->rb.cap)
			break;
	}
	hs_drive(conn);
}

/* ---- events ---- */

static void ready_io(struct nbdc_conn *conn, uint32_t events)
{
	char *msg = NULL;

	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR) || nbdc_tr_read_pending(conn->t)) {
		int r = nbdc_reply_read(conn, &msg);

		if (r < 0) {
			gboolean clean = msg == NULL;

			if (clean)
				conn->quiet = TRUE;
			nbdc_conn_fail(conn, r, msg);
			g_free(msg);
			return;
		}
	}
	if (conn->phase != NBDC_CP_READY && conn->phase != NBDC_CP_CLOSING)
		return;
	if (events & EPOLLOUT) {
		int r = nbdc_send_flush(conn, &msg);

		if (r < 0) {
			nbdc_conn_fail(conn, r, msg);
			g_free(msg);
			return;
		}
	}
	nbdc_conn_update_events(conn);
}

static void on_io(void *opaque, uint32_t events)
{
	struct nbdc_conn *conn = opaque;

	nbdc_conn_ref(conn);
	switch (conn->phase) {
	case NBDC_CP_CONNECTING:
		connect_done(conn);
		break;
	case NBDC_CP_HANDSHAKE:
		if ((events & EPOLLOUT) && !hs_write(conn))
			break;
		if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
			hs_read(conn);
		else
			hs_drive(conn); /* e.g. STARTTLS waited for its bytes to go out */
		break;
	case NBDC_CP_TLS:
		tls_drive(conn);
		break;
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

static void drain_inbox(void *opaque)
{
	struct nbdc_conn *conn = opaque;

	g_mutex_lock(&conn->inq_lock);
	struct nbdc_req *list = conn->inq_head;
	conn->inq_head = conn->inq_tail = NULL;
	conn->inq_posted = FALSE;
	g_mutex_unlock(&conn->inq_lock);
	while (list) {
		struct nbdc_req *next = list->next;

		list->next = NULL;
		nbdc_send_queue(conn, list);
		list = next;
	}
	nbdc_conn_unref(conn);
}

gboolean nbdc_conn_submit(struct nbdc_conn *conn, struct nbdc_req *req)
{
	if (loop_is_current(conn->loop)) {
		if (!nbdc_conn_is_ready(conn))
			return FALSE;
		g_atomic_int_inc(&conn->load);
		nbdc_send_queue(conn, req);
		return TRUE;
	}
	g_mutex_lock(&conn->inq_lock);
	if (conn->inq_closed) {
		g_mutex_unlock(&conn->inq_lock);
		return FALSE;
	}
	req->next = NULL;
	if (conn->inq_tail)
		conn->inq_tail->next = req;
	else
		conn->inq_head = req;
	conn->inq_tail = req;
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
	gboolean graceful;
};

void nbdc_conn_drained(struct nbdc_conn *conn)
{
	if (conn->phase != NBDC_CP_READY || conn->disc_sent)
		return;
	nbdc_send_disc(conn);
	conn->phase = NBDC_CP_CLOSING;
	loop_timer_start(conn->loop, &conn->timer, g_get_monotonic_time() + GOODBYE_US, on_timer,
			 conn);
	nbdc_conn_update_events(conn);
}

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
		while (list) {
			struct nbdc_req *next = list->next;

			list->next = NULL;
			nbdc_send_queue(conn, list);
			list = next;
		}
		if (!cr->graceful)
			nbdc_conn_fail(conn, -ENOTCONN, NULL);
		else if (!conn->txq_head && !conn->inf_head)
			nbdc_conn_drained(conn);
		break;
	}
	case NBDC_CP_CLOSING:
		if (!cr->graceful)
			nbdc_conn_fail(conn, -ENOTCONN, NULL);
		break;
	case NBDC_CP_DEAD:
		break;
	default:
		nbdc_conn_fail(conn, -ENOTCONN, "connection closed before it was ready");
		break;
	}
	nbdc_conn_unref(conn);
	g_free(cr);
}

void nbdc_conn_close(struct nbdc_conn *conn, gboolean graceful)
{
	struct close_req *cr = g_new(struct close_req, 1);

	cr->conn = nbdc_conn_ref(conn);
	cr->graceful = graceful;
	/* Always later: the caller may be inside this connection's callbacks. */
	loop_post(conn->loop, close_on_loop, cr);
}
