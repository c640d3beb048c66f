/* transport.c: sockets (TCP, unix, inherited fd) and the full-transfer I/O loops. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "transport.h"

#define IOV_BATCH 64

/* Milliseconds poll() may wait now: the smaller of the idle limit and
 * what is left before the deadline; -1 = forever; 0 when expired. */
static int wait_ms(const struct nbdc_transport *t)
{
	int ms = t->idle_ms ? (int)MIN(t->idle_ms, (guint)G_MAXINT) : -1;

	if (t->deadline_us) {
		gint64 left = t->deadline_us - g_get_monotonic_time();

		if (left <= 0)
			return 0;
		gint64 lms = (left + 999) / 1000;
		if (ms < 0 || lms < ms)
			ms = (int)MIN(lms, (gint64)G_MAXINT);
	}
	return ms;
}

/* Waits for @events; 0 when ready, -ETIMEDOUT or -errno. */
static int wait_fd(const struct nbdc_transport *t, short events)
{
	for (;;) {
		struct pollfd p = {.fd = t->fd, .events = events};
		int ms = wait_ms(t);

		if (ms == 0 && t->deadline_us)
			return -ETIMEDOUT;
		int r = poll(&p, 1, ms);
		if (r > 0)
			return 0;
		if (r == 0)
			return -ETIMEDOUT;
		if (errno != EINTR)
			return -errno;
	}
}

int nbdc_tr_wait_readable(struct nbdc_transport *t, int timeout_ms)
{
	if (t->tls && gnutls_record_check_pending(t->tls) > 0)
		return 1;
	for (;;) {
		struct pollfd p = {.fd = t->fd, .events = POLLIN};
		int r = poll(&p, 1, timeout_ms);

		if (r >= 0)
			return r > 0 ? 1 : 0;
		if (errno != EINTR)
			return -errno;
	}
}

/* Without a time limit a plain blocking call is one syscall; with one,
 * MSG_DONTWAIT + poll() bounds the wait.  (A non-blocking fd from the
 * caller still works: EAGAIN leads to poll() either way.) */
static int io_flags(const struct nbdc_transport *t)
{
	return (t->idle_ms || t->deadline_us) ? MSG_DONTWAIT : 0;
}

/* One raw transfer (@sending: sendmsg, else recvmsg) over @iov, waiting as
 * needed: >0 bytes, 0 on EOF, -errno.  A fd that is not a socket (a pipe
 * in tests) falls back to readv/writev. */
static ssize_t raw_io(struct nbdc_transport *t, gboolean sending, struct iovec *iov, int iovcnt)
{
	for (;;) {
		struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)iovcnt};
		ssize_t n = sending ? sendmsg(t->fd, &m, io_flags(t) | MSG_NOSIGNAL)
				    : recvmsg(t->fd, &m, io_flags(t));

		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno == ENOTSOCK) {
			n = sending ? writev(t->fd, iov, iovcnt) : readv(t->fd, iov, iovcnt);
			if (n >= 0)
				return n;
		}
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -errno;
		int r = wait_fd(t, sending ? POLLOUT : POLLIN);
		if (r < 0)
			return r;
	}
}

static ssize_t raw_recv(struct nbdc_transport *t, void *buf, size_t len)
{
	struct iovec v = {.iov_base = buf, .iov_len = len};

	return raw_io(t, FALSE, &v, 1);
}

/* gnutls transport callbacks: plain socket I/O with our waits. */
static ssize_t tls_pull(gnutls_transport_ptr_t ptr, void *buf, size_t len)
{
	struct nbdc_transport *t = ptr;
	ssize_t n = raw_recv(t, buf, len);

	if (n < 0) {
		t->rd_errno = (int)-n;
		gnutls_transport_set_errno(t->tls, (int)-n);
		return -1;
	}
	return n;
}

static ssize_t tls_push(gnutls_transport_ptr_t ptr, const void *buf, size_t len)
{
	struct nbdc_transport *t = ptr;
	struct iovec v = {.iov_base = (void *)buf, .iov_len = len};
	ssize_t n = raw_io(t, TRUE, &v, 1);

	if (n < 0) {
		t->wr_errno = (int)-n;
		gnutls_transport_set_errno(t->tls, (int)-n);
		return -1;
	}
	return n;
}

static int tls_pull_timeout(gnutls_transport_ptr_t ptr, unsigned int ms)
{
	struct nbdc_transport *t = ptr;
	int r = nbdc_tr_wait_readable(t, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);

	if (r < 0) {
		gnutls_transport_set_errno(t->tls, -r);
		return -1;
	}
	return r;
}

void nbdc_tr_install_tls_io(struct nbdc_transport *t)
{
	gnutls_transport_set_ptr(t->tls, t);
	gnutls_transport_set_pull_function(t->tls, tls_pull);
	gnutls_transport_set_pull_timeout_function(t->tls, tls_pull_timeout);
	gnutls_transport_set_push_function(t->tls, tls_push);
}

/* Maps a gnutls record error to -errno. */
static int tls_errno(struct nbdc_transport *t, ssize_t r, int saved)
{
	if (r == GNUTLS_E_PREMATURE_TERMINATION)
		return -ECONNRESET;
	if ((r == GNUTLS_E_PULL_ERROR || r == GNUTLS_E_PUSH_ERROR) && saved)
		return -saved;
	return -EIO;
}

/* One read of up to @len: >0 bytes, 0 on EOF, -errno. */
static ssize_t tr_recv(struct nbdc_transport *t, void *buf, size_t len)
{
	if (!t->tls)
		return raw_recv(t, buf, len);
	for (;;) {
		t->rd_errno = 0;
		ssize_t r = gnutls_record_recv(t->tls, buf, len);

		if (r >= 0)
			return r;
		if (r == GNUTLS_E_INTERRUPTED || r == GNUTLS_E_AGAIN)
			continue;
		if (r == GNUTLS_E_PREMATURE_TERMINATION)
			return 0;
		return tls_errno(t, r, t->rd_errno);
	}
}

ssize_t nbdc_tr_recv(struct nbdc_transport *t, void *buf, size_t len)
{
	return tr_recv(t, buf, len);
}

int nbdc_tr_read(struct nbdc_transport *t, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = tr_recv(t, (char *)buf + got, len - got);

		if (n < 0)
			return (int)n;
		if (n == 0)
			return got ? -ECONNRESET : -ENODATA;
		got += (size_t)n;
	}
	return 0;
}

/* Drops the first @n bytes of @iov (which holds at least @n). */
static int iov_advance(struct iovec **iov, int *iovcnt, size_t n)
{
	while (*iovcnt > 0 && n >= (*iov)->iov_len) {
		n -= (*iov)->iov_len;
		(*iov)++;
		(*iovcnt)--;
	}
	if (*iovcnt > 0) {
		(*iov)->iov_base = (char *)(*iov)->iov_base + n;
		(*iov)->iov_len -= n;
	}
	/* skip empty entries */
	while (*iovcnt > 0 && (*iov)->iov_len == 0) {
		(*iov)++;
		(*iovcnt)--;
	}
	return 0;
}

int nbdc_tr_readv(struct nbdc_transport *t, struct iovec *iov, int iovcnt)
{
	gboolean any = FALSE;

	iov_advance(&iov, &iovcnt, 0);
	while (iovcnt > 0) {
		ssize_t n;

		if (t->tls)
			n = tr_recv(t, iov->iov_base, iov->iov_len);
		else
			n = raw_io(t, FALSE, iov, MIN(iovcnt, IOV_BATCH));
		if (n < 0)
			return (int)n;
		if (n == 0)
			return any ? -ECONNRESET : -ENODATA;
		any = TRUE;
		iov_advance(&iov, &iovcnt, (size_t)n);
	}
	return 0;
}

int nbdc_tr_skip(struct nbdc_transport *t, uint64_t len)
{
	char buf[4096];

	while (len > 0) {
		size_t n = (size_t)MIN(len, sizeof(buf));
		int r = nbdc_tr_read(t, buf, n);

		if (r < 0)
			return r == -ENODATA ? -ECONNRESET : r;
		len -= n;
	}
	return 0;
}

int nbdc_tr_writev(struct nbdc_transport *t, struct iovec *iov, int iovcnt)
{
	iov_advance(&iov, &iovcnt, 0);
	while (iovcnt > 0) {
		ssize_t n;

		if (t->tls) {
			t->wr_errno = 0;
			n = gnutls_record_send(t->tls, iov->iov_base, iov->iov_len);
			if (n == GNUTLS_E_INTERRUPTED || n == GNUTLS_E_AGAIN)
				continue;
			if (n < 0)
				return tls_errno(t, n, t->wr_errno);
		} else {
			n = raw_io(t, TRUE, iov, MIN(iovcnt, IOV_BATCH));
			if (n < 0)
				return (int)n;
		}
		iov_advance(&iov, &iovcnt, (size_t)n);
	}
	return 0;
}

int nbdc_tr_write(struct nbdc_transport *t, const void *buf, size_t len)
{
	struct iovec v = {.iov_base = (void *)buf, .iov_len = len};

	return nbdc_tr_writev(t, &v, 1);
}

void nbdc_tr_shutdown(struct nbdc_transport *t, int how)
{
	if (t && t->fd >= 0)
		shutdown(t->fd, how);
}

void nbdc_tr_close(struct nbdc_transport *t)
{
	if (!t)
		return;
	if (t->tls)
		gnutls_deinit(t->tls);
	if (t->psk)
		gnutls_psk_free_client_credentials(t->psk);
	if (t->x509)
		gnutls_certificate_free_credentials(t->x509);
	if (t->fd >= 0)
		close(t->fd);
	g_free(t);
}

/* Connects @fd (non-blocking during connect so the deadline applies). */
static int connect_bounded(struct nbdc_transport *t, const struct sockaddr *sa, socklen_t len)
{
	int fl = fcntl(t->fd, F_GETFL);

	if (fl < 0 || fcntl(t->fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return -errno;
	int r = connect(t->fd, sa, len);
	if (r < 0 && errno != EINPROGRESS && errno != EINTR)
		r = -errno;
	else if (r < 0) {
		r = wait_fd(t, POLLOUT);
		if (r == 0) {
			int err = 0;
			socklen_t el = sizeof(err);

			if (getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0)
				err = errno;
			r = -err;
		}
	}
	if (fcntl(t->fd, F_SETFL, fl) < 0 && r == 0)
		r = -errno;
	return r;
}

struct nbdc_transport *nbdc_tr_open(const struct nbdc_config *cfg, const char *display,
				    gint64 deadline_us, GError **error)
{
	struct nbdc_transport *t = g_new0(struct nbdc_transport, 1);

	t->fd = -1;
	t->deadline_us = deadline_us;

	if (cfg->fd >= 0) {
		t->fd = cfg->fd;
		return t;
	}
	if (cfg->socket_path) {
		struct sockaddr_un sun = {.sun_family = AF_UNIX};
		size_t plen = strlen(cfg->socket_path);
		socklen_t slen;

		/* A leading '@' or NUL is not special here: paths are literal,
		 * except the URI form "%00name" which decodes to a leading NUL,
		 * which a C string cannot carry.  Abstract sockets are not
		 * supported. */
		if (plen == 0 || plen >= sizeof(sun.sun_path)) {
			g_set_error(error, NBDC_ERROR, NBDC_ERROR_CONNECT,
				    "%s: socket path '%s': %s", display, cfg->socket_path,
				    plen ? "too long" : "empty");
			goto fail;
		}
		memcpy(sun.sun_path, cfg->socket_path, plen);
		slen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + 1);
		t->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (t->fd < 0) {
			g_set_error(error, NBDC_ERROR, NBDC_ERROR_CONNECT, "%s: socket: %s",
				    display, g_strerror(errno));
			goto fail;
		}
		int r = connect_bounded(t, (struct sockaddr *)&sun, slen);
		if (r < 0) {
			g_set_error(error, NBDC_ERROR,
				    r == -ETIMEDOUT ? NBDC_ERROR_TIMEOUT : NBDC_ERROR_CONNECT,
				    "%s: connect to '%s': %s", display, cfg->socket_path,
				    g_strerror(-r));
			goto fail;
		}
		return t;
	}
	if (!cfg->host) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_INVALID,
			    "%s: no host, socket path or fd to connect to", display);
		goto fail;
	}

	const char *port = cfg->port ? cfg->port : "10809";
	struct addrinfo hints = {
	    .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_ADDRCONFIG};
	struct addrinfo *res = NULL;
	int gr = getaddrinfo(cfg->host, port, &hints, &res);
	if (gr != 0) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_CONNECT, "%s: resolve '%s' port %s: %s",
			    display, cfg->host, port, gai_strerror(gr));
		goto fail;
	}
	int last = ECONNREFUSED;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		t->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (t->fd < 0) {
			last = errno;
			continue;
		}
		int r = connect_bounded(t, ai->ai_addr, ai->ai_addrlen);
		if (r == 0)
			break;
		last = -r;
		close(t->fd);
		t->fd = -1;
		if (r == -ETIMEDOUT)
			break;
	}
	freeaddrinfo(res);
	if (t->fd < 0) {
		g_set_error(
		    error, NBDC_ERROR, last == ETIMEDOUT ? NBDC_ERROR_TIMEOUT : NBDC_ERROR_CONNECT,
		    "%s: connect to %s port %s: %s", display, cfg->host, port, g_strerror(last));
		goto fail;
	}
	int one = 1;
	setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return t;
fail:
	nbdc_tr_close(t);
	return NULL;
}
