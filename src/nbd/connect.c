/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* connect.c: a connection's socket: host names resolved on the pool, a
 * non-blocking connect through the address list, Unix socket paths, TCP
 * options.
 *
 * Called by conn.c on the connection's loop.  Nothing here changes the
 * connection's phase or arms its watch and timer: each call reports by its
 * result (NBDC_CONNECT_STARTED: a connect is under way on conn->t; <0:
 * failed, with a message for the connection's error; see internal.h), and
 * conn.c moves the state machine on.
 */
#include "config.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"
#include "wire.h"

/* A Unix server whose backlog is full: retry this often until the deadline. */
#define UNIX_BUSY_RETRY_US (5 * 1000)

static const char *port_of(const struct nbdc_conn *conn)
{
	return conn->cfg->port ? conn->cfg->port : NBD_DEFAULT_PORT;
}

/* Names the limit when @e says a file descriptor could not be had.  The
 * result lives until the thread's next call. */
static const char *fd_limit_hint(int e)
{
	static __thread char hint[96];
	struct rlimit rl;

	if (e == ENFILE)
		return " (the system's open file limit is reached: fs.file-max)";
	if (e != EMFILE)
		return "";
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
		g_snprintf(hint, sizeof(hint),
			   " (the open file limit of %llu is reached: ulimit -n)",
			   (unsigned long long)rl.rlim_cur);
	else
		g_snprintf(hint, sizeof(hint), " (the open file limit is reached: ulimit -n)");
	return hint;
}

/* ---- TCP options ---- */

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

/* ---- Unix sockets ---- */

int nbdc_connect_unix(struct nbdc_conn *conn, gint64 *retry_at, char **msg)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	const char *path = conn->cfg->socket_path;
	size_t plen = strlen(path);

	/* Paths are literal: a leading '@' is not an abstract socket. */
	if (plen == 0 || plen >= sizeof(sun.sun_path)) {
		*msg = g_strdup_printf("socket path '%s': %s", path, plen ? "too long" : "empty");
		return -ENOTCONN;
	}
	memcpy(sun.sun_path, path, plen);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		int e = errno;

		conn->connect_errno = e;
		*msg = g_strdup_printf("socket: %s%s", g_strerror(e), fd_limit_hint(e));
		return -ENOTCONN;
	}
	socklen_t slen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
	if (connect(fd, (struct sockaddr *)&sun, slen) < 0 && errno != EINPROGRESS) {
		int e = errno;
		gint64 now = g_get_monotonic_time();

		close(fd);
		if (e == EAGAIN && (!conn->deadline || now + UNIX_BUSY_RETRY_US < conn->deadline)) {
			/* The server's backlog is full: it is busy, not gone. */
			*retry_at = now + UNIX_BUSY_RETRY_US;
			return NBDC_CONNECT_BUSY;
		}
		*msg = g_strdup_printf("connect to '%s': %s", path, g_strerror(e));
		return -ENOTCONN;
	}
	conn->t = nbdc_tr_new(fd);
	return NBDC_CONNECT_STARTED;
}

/* ---- TCP ---- */

int nbdc_connect_next(struct nbdc_conn *conn, char **msg)
{
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
			return NBDC_CONNECT_STARTED;
		}
		conn->connect_errno = errno;
		close(fd);
	}
	int e = conn->connect_errno ? conn->connect_errno : ECONNREFUSED;
	*msg = g_strdup_printf("connect to %s port %s: %s%s", conn->cfg->host, port_of(conn),
			       g_strerror(e), fd_limit_hint(e));
	return -ENOTCONN;
}

int nbdc_connect_finish(struct nbdc_conn *conn, char **msg)
{
	int err = 0;
	socklen_t el = sizeof(err);

	if (getsockopt(conn->t->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
		err = errno;
	if (err == 0) {
		if (conn->cfg->host && !conn->cfg->socket_path)
			tcp_options(conn, conn->t->fd);
		return NBDC_CONNECT_UP;
	}
	conn->connect_errno = err;
	nbdc_tr_close(conn->t);
	conn->t = NULL;
	if (conn->cfg->socket_path) {
		*msg = g_strdup_printf("connect to '%s': %s", conn->cfg->socket_path,
				       g_strerror(err));
		return -ENOTCONN;
	}
	return nbdc_connect_next(conn, msg);
}

gboolean nbdc_connect_numeric(struct nbdc_conn *conn)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC,
				  .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV };
	struct addrinfo *res = NULL;

	if (getaddrinfo(conn->cfg->host, port_of(conn), &hints, &res) != 0)
		return FALSE;
	conn->ai_list = conn->ai_next = res;
	return TRUE;
}

int nbdc_connect_resolved(struct nbdc_conn *conn, struct addrinfo **res, int gai, char **msg)
{
	if (gai != 0) {
		*msg = g_strdup_printf("resolve '%s' port %s: %s", conn->cfg->host, port_of(conn),
				       gai_strerror(gai));
		return -ENOTCONN;
	}
	conn->ai_list = conn->ai_next = g_steal_pointer(res);
	return nbdc_connect_next(conn, msg);
}

/* ---- the lookup on the pool ---- */

struct resolve_job {
	Loop *loop;
	char *host, *port;
	nbdc_resolved_fn done;
	void *opaque;
	struct addrinfo *res;
	int gai;
};

static void resolved(void *opaque)
{
	struct resolve_job *j = opaque;

	j->done(j->opaque, &j->res, j->gai);
	if (j->res)
		freeaddrinfo(j->res);
	g_free(j->host);
	g_free(j->port);
	g_free(j);
}

static void resolve_on_pool(void *opaque)
{
	struct resolve_job *j = opaque;
	struct addrinfo hints = { .ai_family = AF_UNSPEC,
				  .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_ADDRCONFIG };

	j->gai = getaddrinfo(j->host, j->port, &hints, &j->res);
	loop_post(j->loop, resolved, j);
}

void nbdc_resolve(struct nbdc_conn *conn, nbdc_resolved_fn done, void *opaque)
{
	struct resolve_job *j = g_new0(struct resolve_job, 1);

	j->loop = conn->loop;
	j->host = g_strdup(conn->cfg->host);
	j->port = g_strdup(port_of(conn));
	j->done = done;
	j->opaque = opaque;
	loop_set_run_blocking(loop_get_set(conn->loop), resolve_on_pool, j);
}
