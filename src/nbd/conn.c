/* conn.c: one NBD connection in transmission: cookie table, sending, the reader thread.
 *
 * Thread model.  Any thread may submit: it takes @lock to wait for a free
 * slot (max_in_flight), allocates the cookie and inserts the request into the
 * table and the in-flight list, drops @lock, then takes @send_lock and writes
 * header + payload itself (no hand-off to another thread).  One reader thread
 * per connection reads every reply, scatters READ data straight into the
 * caller's iovecs, removes the request from the table under @lock and runs
 * the completion outside any lock.
 *
 * Only the reader removes requests, so it can use a request it looked up
 * without holding @lock while it reads the payload.  A request's memory lives
 * until its operation completes, and an operation holds a submission
 * reference until the submitter has finished sending, so a (malicious) early
 * reply never frees what a sender is still using.
 *
 * The connection dies only on the reader: on EOF, a protocol violation or a
 * timeout the reader marks it dead, completes every in-flight request with an
 * error and exits.  Other threads that notice a failure (a failed send, a
 * disconnect) record why and shutdown() the socket so that the reader ends
 * it.  Lock order: @lock and @send_lock are never held together.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"
#include "wire.h"

#define IOV_BATCH 64

const char *nbdc_cmd_name(uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ:
		return "READ";
	case NBD_CMD_WRITE:
		return "WRITE";
	case NBD_CMD_DISC:
		return "DISC";
	case NBD_CMD_FLUSH:
		return "FLUSH";
	case NBD_CMD_TRIM:
		return "TRIM";
	case NBD_CMD_CACHE:
		return "CACHE";
	case NBD_CMD_WRITE_ZEROES:
		return "WRITE_ZEROES";
	case NBD_CMD_BLOCK_STATUS:
		return "BLOCK_STATUS";
	default:
		return "CMD?";
	}
}

/* ---- iovec cursor ---- */

struct iov_cur {
	const struct iovec *v;
	int n;
	size_t skip;
};

static void cur_init(struct iov_cur *cur, const struct nbdc_req *req, uint64_t rel)
{
	uint64_t skip = req->iov_off + rel;

	cur->v = req->iov;
	cur->n = req->iovcnt;
	while (cur->n > 0 && skip >= cur->v->iov_len) {
		skip -= cur->v->iov_len;
		cur->v++;
		cur->n--;
	}
	cur->skip = (size_t)skip;
}

/* Fills up to @max entries of @out with the next bytes (at most *@left);
 * returns the count and lowers *@left. */
static int cur_fill(struct iov_cur *cur, struct iovec *out, int max, uint64_t *left)
{
	int k = 0;

	while (k<max && * left> 0 && cur->n > 0) {
		size_t avail = cur->v->iov_len - cur->skip;
		size_t take = (size_t)MIN((uint64_t)avail, *left);

		if (take) {
			out[k].iov_base = (char *)cur->v->iov_base + cur->skip;
			out[k].iov_len = take;
			k++;
		}
		*left -= take;
		if (take == avail) {
			cur->v++;
			cur->n--;
			cur->skip = 0;
		} else {
			cur->skip += take;
		}
	}
	return k;
}

/* ---- the receive buffer (reader only) ----
 *
 * One recv takes up to RBUF_SIZE bytes, often several replies at once at
 * high queue depth; headers, offsets and small payloads are copied out of
 * it.  A payload of RB_DIRECT_MIN bytes or more that is not buffered yet is
 * read straight into the caller's iovecs (no copy).  The semantics of the
 * reads below are those of nbdc_tr_read: -ENODATA only for EOF before the
 * first byte of what was asked. */
#define RBUF_SIZE (64u * 1024)
#define RB_DIRECT_MIN (16u * 1024)

static size_t rb_avail(const struct nbdc_conn *conn)
{
	return conn->rend - conn->rpos;
}

/* Refills the (drained) buffer with one read: >0, 0 on EOF, -errno. */
static ssize_t rb_fill(struct nbdc_conn *conn)
{
	conn->rpos = conn->rend = 0;
	ssize_t n = nbdc_tr_recv(conn->t, conn->rbuf, RBUF_SIZE);
	if (n > 0)
		conn->rend = (size_t)n;
	return n;
}

/* Reads exactly @len bytes into @dst. */
static int rb_read(struct nbdc_conn *conn, void *dst, size_t len)
{
	size_t got = 0;

	while (got < len) {
		size_t avail = rb_avail(conn);

		if (avail == 0) {
			if (len - got >= RB_DIRECT_MIN) {
				int r = nbdc_tr_read(conn->t, (char *)dst + got, len - got);
				return r == -ENODATA && got ? -ECONNRESET : r;
			}
			ssize_t n = rb_fill(conn);
			if (n < 0)
				return (int)n;
			if (n == 0)
				return got ? -ECONNRESET : -ENODATA;
			continue;
		}
		size_t take = MIN(avail, len - got);
		memcpy((char *)dst + got, conn->rbuf + conn->rpos, take);
		conn->rpos += take;
		got += take;
	}
	return 0;
}

/* Reads @len payload bytes into @req's buffers at @rel: buffered bytes
 * first, then small rests through the buffer, big ones straight. */
static int read_into(struct nbdc_conn *conn, struct nbdc_req *req, uint64_t rel, uint64_t len)
{
	struct iov_cur cur;
	struct iovec tmp[IOV_BATCH];

	cur_init(&cur, req, rel);
	while (len > 0) {
		size_t avail = rb_avail(conn);

		if (avail) {
			uint64_t part = MIN((uint64_t)avail, len), left = part;
			int k = cur_fill(&cur, tmp, IOV_BATCH, &left);

			if (k == 0)
				return -EFAULT; /* caller's iov shorter than the request */
			for (int i = 0; i < k; i++) {
				memcpy(tmp[i].iov_base, conn->rbuf + conn->rpos, tmp[i].iov_len);
				conn->rpos += tmp[i].iov_len;
			}
			len -= part - left;
			continue;
		}
		if (len < RB_DIRECT_MIN) {
			ssize_t n = rb_fill(conn);

			if (n < 0)
				return (int)n;
			if (n == 0)
				return -ECONNRESET;
			continue;
		}
		int k = cur_fill(&cur, tmp, IOV_BATCH, &len);

		if (k == 0)
			return -EFAULT; /* caller's iov shorter than the request */
		int r = nbdc_tr_readv(conn->t, tmp, k);
		if (r < 0)
			return r == -ENODATA ? -ECONNRESET : r;
	}
	return 0;
}

static void zero_into(struct nbdc_req *req, uint64_t rel, uint64_t len)
{
	struct iov_cur cur;
	struct iovec tmp[IOV_BATCH];

	cur_init(&cur, req, rel);
	while (len > 0) {
		int k = cur_fill(&cur, tmp, IOV_BATCH, &len);

		if (k == 0)
			return;
		for (int i = 0; i < k; i++)
			memset(tmp[i].iov_base, 0, tmp[i].iov_len);
	}
}

/* ---- the cookie table (under @lock) ----
 *
 * Open addressing with linear probing and backward-shift deletion (no
 * tombstones, so churn never forces a rehash): GHashTable cost ~600
 * instructions per request here, mostly tombstone rehashes.  Kept at most
 * half full; grows when internal requests exceed max_in_flight.  Cookie 0
 * marks an empty slot and is never allocated (a server's 0 finds nothing). */
#define TABLE_MIN 128u

static guint slot_of(const struct nbdc_conn *conn, uint64_t cookie)
{
	return (guint)((cookie * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & conn->table_mask;
}

static void table_put(struct nbdc_conn *conn, uint64_t cookie, struct nbdc_req *req)
{
	guint i = slot_of(conn, cookie);

	while (conn->table[i].cookie)
		i = (i + 1) & conn->table_mask;
	conn->table[i].cookie = cookie;
	conn->table[i].req = req;
}

static void table_init(struct nbdc_conn *conn, guint size)
{
	conn->table = g_new0(struct nbdc_slot, size);
	conn->table_mask = size - 1;
	conn->table_used = 0;
}

static void table_insert(struct nbdc_conn *conn, uint64_t cookie, struct nbdc_req *req)
{
	if ((conn->table_used + 1) * 2 > conn->table_mask + 1) {
		struct nbdc_slot *old = conn->table;
		guint n = conn->table_mask + 1, used = conn->table_used;

		table_init(conn, n * 2);
		for (guint i = 0; i < n; i++)
			if (old[i].cookie)
				table_put(conn, old[i].cookie, old[i].req);
		conn->table_used = used;
		g_free(old);
	}
	table_put(conn, cookie, req);
	conn->table_used++;
}

static struct nbdc_req *table_lookup(const struct nbdc_conn *conn, uint64_t cookie)
{
	if (cookie == 0)
		return NULL;
	for (guint i = slot_of(conn, cookie); conn->table[i].cookie;
	     i = (i + 1) & conn->table_mask)
		if (conn->table[i].cookie == cookie)
			return conn->table[i].req;
	return NULL;
}

static void table_remove(struct nbdc_conn *conn, uint64_t cookie)
{
	guint m = conn->table_mask, i = slot_of(conn, cookie);

	if (cookie == 0)
		return;
	while (conn->table[i].cookie != cookie) {
		if (!conn->table[i].cookie)
			return;
		i = (i + 1) & m;
	}
	/* Backward shift: move later entries of the probe run into the hole
	 * when their home slot is not cyclically inside (hole, j]. */
	for (guint j = (i + 1) & m; conn->table[j].cookie; j = (j + 1) & m) {
		guint home = slot_of(conn, conn->table[j].cookie);

		if (((j - home) & m) >= ((j - i) & m)) {
			conn->table[i] = conn->table[j];
			i = j;
		}
	}
	conn->table[i].cookie = 0;
	conn->table[i].req = NULL;
	conn->table_used--;
}

static void table_clear(struct nbdc_conn *conn)
{
	memset(conn->table, 0, sizeof(*conn->table) * (conn->table_mask + 1));
	conn->table_used = 0;
}

/* ---- connection state ---- */

void nbdc_set_dead(Nbdc *c, const char *msg)
{
	g_mutex_lock(&c->lock);
	if (!c->error)
		c->error = g_strdup(msg);
	g_mutex_unlock(&c->lock);
	g_atomic_int_set(&c->dead, 1);
}

static void list_remove(struct nbdc_conn *conn, struct nbdc_req *req)
{
	if (req->prev)
		req->prev->next = req->next;
	else
		conn->head = req->next;
	if (req->next)
		req->next->prev = req->prev;
	else
		conn->tail = req->prev;
	req->prev = req->next = NULL;
}

/* Wakes the threads waiting on @conn->cond; @lock held.  GLib's broadcast
 * is a futex syscall even with nobody waiting, so the waiters count
 * themselves (cond_wait / cond_wait_until below) and the hot path skips
 * the wake-up when there are none. */
static void wake_waiters(struct nbdc_conn *conn)
{
	if (conn->waiters > 0)
		g_cond_broadcast(&conn->cond);
}

static void cond_wait(struct nbdc_conn *conn)
{
	conn->waiters++;
	g_cond_wait(&conn->cond, &conn->lock);
	conn->waiters--;
}

static gboolean cond_wait_until(struct nbdc_conn *conn, gint64 until_us)
{
	conn->waiters++;
	gboolean r = g_cond_wait_until(&conn->cond, &conn->lock, until_us);
	conn->waiters--;
	return r;
}

/* Removes @req from the table (reader only) and completes it. */
static void complete(struct nbdc_conn *conn, struct nbdc_req *req, int err)
{
	g_mutex_lock(&conn->lock);
	table_remove(conn, req->cookie);
	list_remove(conn, req);
	g_mutex_unlock(&conn->lock);
	if (req->err)
		err = req->err;
	if (conn->c->cfg.debug)
		nbdc_log(&conn->c->cfg, NBDC_LOG_DEBUG, "reply cookie=%" G_GUINT64_FORMAT " err=%d",
			 req->cookie, err);
	nbdc_req_done(req, err);
	/* The slot is free only now, so that a drain also waits for callbacks. */
	g_mutex_lock(&conn->lock);
	conn->in_flight--;
	wake_waiters(conn);
	g_mutex_unlock(&conn->lock);
}

/* Reader only: the connection is over.  Completes everything in flight
 * with @err (or the error a request already had). */
static void kill_conn(struct nbdc_conn *conn, int err, const char *msg)
{
	struct nbdc_req *list;

	g_mutex_lock(&conn->lock);
	if (conn->fail_msg) { /* a sender saw the failure first */
		msg = conn->fail_msg;
		err = conn->fail_err;
	}
	conn->dead = TRUE;
	list = conn->head;
	conn->head = conn->tail = NULL;
	table_clear(conn);
	wake_waiters(conn);
	g_mutex_unlock(&conn->lock);

	if (msg) {
		g_autofree char *full = g_strdup_printf("%s: %s", conn->c->display, msg);

		nbdc_set_dead(conn->c, full);
		if (!g_atomic_int_get(&conn->c->closing) || err != -ENOTCONN)
			nbdc_log(&conn->c->cfg, NBDC_LOG_WARNING, "%s", full);
	} else {
		g_autofree char *full = g_strdup_printf("%s: disconnected", conn->c->display);

		nbdc_set_dead(conn->c, full);
	}
	nbdc_tr_shutdown(conn->t, SHUT_RDWR);
	while (list) {
		struct nbdc_req *next = list->next;

		list->prev = list->next = NULL;
		if (conn->c->cfg.debug)
			nbdc_log(&conn->c->cfg, NBDC_LOG_DEBUG,
				 "reply cookie=%" G_GUINT64_FORMAT " err=%d (connection lost)",
				 list->cookie, list->err ? list->err : err);
		nbdc_req_done(list, list->err ? list->err : err);
		g_mutex_lock(&conn->lock);
		conn->in_flight--;
		wake_waiters(conn);
		g_mutex_unlock(&conn->lock);
		list = next;
	}
}

/* Records why a non-reader thread gave up on the connection and makes the
 * reader notice. */
static void fail_async(struct nbdc_conn *conn, int err, const char *fmt, ...) G_GNUC_PRINTF(3, 4);
static void fail_async(struct nbdc_conn *conn, int err, const char *fmt, ...)
{
	va_list ap;

	g_mutex_lock(&conn->lock);
	if (!conn->fail_msg && !conn->dead) {
		va_start(ap, fmt);
		conn->fail_msg = g_strdup_vprintf(fmt, ap);
		va_end(ap);
		conn->fail_err = err;
	}
	g_mutex_unlock(&conn->lock);
	nbdc_tr_shutdown(conn->t, SHUT_RDWR);
}

/* ---- submit ---- */

/* Set on reader threads: a completion callback that submits more work
 * must never wait for a slot that only its own reader can free. */
static __thread gboolean on_reader;

gboolean nbdc_on_reader_thread(void)
{
	return on_reader;
}

int nbdc_conn_submit(struct nbdc_conn *conn, struct nbdc_req *req, gboolean internal)
{
	Nbdc *c = conn->c;
	struct nbd_request hdr;
	struct iovec tmp[IOV_BATCH];
	guint max = c->cfg.max_in_flight ? c->cfg.max_in_flight : 64;

	gboolean nowait = internal || on_reader;

	g_mutex_lock(&conn->lock);
	while (!nowait && !conn->dead && !g_atomic_int_get(&c->closing) &&
	       (guint)conn->in_flight >= max)
		cond_wait(conn);
	if (conn->dead || conn->fail_msg || conn->disc_sent ||
	    (g_atomic_int_get(&c->closing) && !internal)) {
		g_mutex_unlock(&conn->lock);
		return -ENOTCONN;
	}
	req->cookie = __atomic_add_fetch(&c->next_cookie, 1, __ATOMIC_RELAXED);
	if (c->cfg.request_timeout_ms)
		req->deadline = g_get_monotonic_time() + (gint64)c->cfg.request_timeout_ms * 1000;
	table_insert(conn, req->cookie, req);
	req->prev = conn->tail;
	req->next = NULL;
	if (conn->tail)
		conn->tail->next = req;
	else
		conn->head = req;
	conn->tail = req;
	conn->in_flight++;
	conn->senders++;
	/* Everything the send needs is read before @lock is dropped: from
	 * then on the reader may complete (and free) @req at any time, even
	 * before we send (a server can guess cookies). */
	uint16_t type = req->type, flags = req->flags;
	uint32_t len = req->len;
	uint64_t cookie = req->cookie, offset = req->offset;
	struct iov_cur cur;

	if (type == NBD_CMD_WRITE)
		cur_init(&cur, req, 0);
	g_mutex_unlock(&conn->lock);

	if (c->cfg.debug)
		nbdc_log(&c->cfg, NBDC_LOG_DEBUG,
			 "%s cookie=%" G_GUINT64_FORMAT " off=%" G_GUINT64_FORMAT
			 " len=%u flags=0x%x conn=%u",
			 nbdc_cmd_name(type), cookie, offset, len, flags, conn->index);
	nbd_encode_request(&hdr, flags, type, cookie, offset, len);

	int r;
	g_mutex_lock(&conn->send_lock);
	tmp[0].iov_base = &hdr;
	tmp[0].iov_len = sizeof(hdr);
	if (type == NBD_CMD_WRITE) {
		uint64_t left = len;
		int k = 1 + cur_fill(&cur, tmp + 1, IOV_BATCH - 1, &left);

		r = nbdc_tr_writev(conn->t, tmp, k);
		while (r == 0 && left > 0) {
			k = cur_fill(&cur, tmp, IOV_BATCH, &left);
			if (k == 0) {
				r = -EFAULT;
				break;
			}
			r = nbdc_tr_writev(conn->t, tmp, k);
		}
	} else {
		r = nbdc_tr_writev(conn->t, tmp, 1);
	}
	g_mutex_unlock(&conn->send_lock);

	if (r < 0)
		fail_async(conn, r == -ETIMEDOUT ? -ETIMEDOUT : -ENOTCONN,
			   "sending %s cookie=%" G_GUINT64_FORMAT ": %s", nbdc_cmd_name(type),
			   cookie,
			   r == -ETIMEDOUT ? "server stopped reading (timeout)" : g_strerror(-r));
	g_mutex_lock(&conn->lock);
	conn->senders--;
	wake_waiters(conn);
	g_mutex_unlock(&conn->lock);
	return 0;
}

/* ---- reader ---- */

/* Marks [rel, rel+n) of a structured READ as received; FALSE on overlap. */
#define MAX_RANGES 4096 /* disjoint pieces of one READ before we call it abuse */

/* Marks [rel, rel+n) of a structured READ as received; FALSE on overlap (or
 * a pathological number of disjoint pieces).  @covered counts the bytes
 * received; in-order chunks (the usual case) need no range list.  Ranges
 * are kept sorted and coalesced, so their number is the number of gaps. */
static gboolean cover(struct nbdc_req *req, uint64_t rel, uint64_t n)
{
	if (!req->ranges && rel == req->covered) {
		req->covered += n;
		return TRUE;
	}
	if (!req->ranges) {
		req->ranges = g_array_new(FALSE, FALSE, sizeof(uint64_t) * 2);
		if (req->covered) {
			uint64_t r0[2] = {0, req->covered};

			g_array_append_vals(req->ranges, r0, 1);
		}
	}
	GArray *a = req->ranges;
	/* insertion point: the first range starting at or after @rel */
	guint lo = 0, hi = a->len;
	while (lo < hi) {
		guint mid = (lo + hi) / 2;

		if (g_array_index(a, uint64_t, mid * 2) < rel)
			lo = mid + 1;
		else
			hi = mid;
	}
	uint64_t *prev = lo > 0 ? &g_array_index(a, uint64_t, (lo - 1) * 2) : NULL;
	uint64_t *next = lo < a->len ? &g_array_index(a, uint64_t, lo * 2) : NULL;
	if ((prev && prev[1] > rel) || (next && next[0] < rel + n))
		return FALSE;
	req->covered += n;
	if (prev && prev[1] == rel) {
		prev[1] = rel + n;
		if (next && next[0] == prev[1]) {
			prev[1] = next[1];
			g_array_remove_index(a, lo);
		}
	} else if (next && next[0] == rel + n) {
		next[0] = rel;
	} else {
		if (a->len >= MAX_RANGES)
			return FALSE;
		uint64_t nr[2] = {rel, rel + n};

		g_array_insert_vals(a, lo, nr, 1);
	}
	return TRUE;
}

static uint64_t covered_bytes(const struct nbdc_req *req)
{
	return req->covered;
}

static void set_err(struct nbdc_req *req, int err)
{
	if (!req->err)
		req->err = err;
}

/* The server answered NBD_ESHUTDOWN: no new requests on the handle; once
 * this connection is idle the reader sends NBD_CMD_DISC (soft disconnect). */
static void server_shutdown(struct nbdc_conn *conn, uint32_t nbd_err)
{
	if (nbd_err != NBD_ESHUTDOWN || conn->shutdown_pending)
		return;
	g_autofree char *msg = g_strdup_printf("%s: server is shutting down", conn->c->display);
	nbdc_set_dead(conn->c, msg);
	nbdc_log(&conn->c->cfg, NBDC_LOG_WARNING, "%s", msg);
	conn->shutdown_pending = TRUE;
}

/* Reader: sends DISC after ESHUTDOWN once nothing is in flight. */
static void maybe_soft_disconnect(struct nbdc_conn *conn)
{
	struct nbd_request hdr;

	if (!conn->shutdown_pending)
		return;
	g_mutex_lock(&conn->lock);
	gboolean go = !conn->disc_sent && conn->in_flight == 0 && conn->senders == 0;
	if (go)
		conn->disc_sent = TRUE;
	g_mutex_unlock(&conn->lock);
	if (!go)
		return;
	nbd_encode_request(&hdr, 0, NBD_CMD_DISC, 0, 0, 0);
	g_mutex_lock(&conn->send_lock);
	if (nbdc_tr_write(conn->t, &hdr, sizeof(hdr)) == 0)
		nbdc_tls_bye(conn->t);
	g_mutex_unlock(&conn->send_lock);
	nbdc_tr_shutdown(conn->t, SHUT_WR);
}

/* Looks @cookie up (the entry stays: only this thread removes entries). */
static struct nbdc_req *lookup(struct nbdc_conn *conn, uint64_t cookie)
{
	g_mutex_lock(&conn->lock);
	struct nbdc_req *req = table_lookup(conn, cookie);
	g_mutex_unlock(&conn->lock);
	return req;
}

/* Protocol violation: returns the message for kill_conn. */
#define VIOLATION(...) (g_strdup_printf("protocol error: " __VA_ARGS__))

static char *io_msg(int r, const char *what)
{
	if (r == -ETIMEDOUT)
		return g_strdup_printf("request timed out (%s)", what);
	if (r == -ENODATA || r == -ECONNRESET)
		return g_strdup_printf("server closed the connection (%s)", what);
	return g_strdup_printf("%s: %s", what, g_strerror(-r));
}

static int io_err(int r)
{
	return r == -ETIMEDOUT ? -ETIMEDOUT : -ENOTCONN;
}

static char *handle_simple(struct nbdc_conn *conn, const union nbd_reply *rep, int *kerr)
{
	uint64_t cookie = be64toh(rep->simple.cookie);
	uint32_t error = be32toh(rep->simple.error);
	struct nbdc_req *req = lookup(conn, cookie);

	*kerr = -EPROTO;
	if (!req)
		return VIOLATION("simple reply for unknown cookie %" G_GUINT64_FORMAT, cookie);
	if (req->type == NBD_CMD_READ && conn->neg.structured_replies)
		return VIOLATION("simple reply to READ cookie=%" G_GUINT64_FORMAT
				 " after structured replies were negotiated",
				 cookie);
	if (error) {
		server_shutdown(conn, error);
		set_err(req, -nbdc_errno_from_nbd(error));
	} else if (req->type == NBD_CMD_READ) {
		int r = read_into(conn, req, 0, req->len);
		if (r < 0) {
			*kerr = io_err(r);
			return r == -EFAULT ? g_strdup("internal error: read buffer too short")
					    : io_msg(r, "reading READ payload");
		}
	}
	complete(conn, req, 0);
	return NULL;
}

/* Reads a small chunk payload of @len (bounded by the caller) into conn->buf. */
static int read_buf(struct nbdc_conn *conn, uint32_t len)
{
	if (len > conn->buf_size) {
		conn->buf = g_realloc(conn->buf, len);
		conn->buf_size = len;
	}
	if (!len)
		return 0;
	int r = rb_read(conn, conn->buf, len);
	return r == -ENODATA ? -ECONNRESET : r;
}

static void deliver_extents(struct nbdc_conn *conn, struct nbdc_req *req, uint32_t len)
{
	uint64_t pos = req->offset;
	uint64_t end = req->offset + req->len; /* validated at submit: <= size */
	uint32_t n = (len - 4) / 8;
	const uint8_t *p = conn->buf + 4;

	if (req->bs_seen)
		return; /* one chunk per context */
	req->bs_seen = TRUE;
	for (uint32_t i = 0; i < n && pos < end; i++, p += 8) {
		uint32_t elen = get_be32(p), flags = get_be32(p + 4);

		if (elen == 0) {
			if (i == 0)
				set_err(req, -EPROTO);
			break;
		}
		uint64_t l = MIN((uint64_t)elen, end - pos);
		if (req->op->extent && !req->err)
			req->op->extent(req->op->opaque, pos, l, flags);
		pos += l;
		if (req->flags & NBD_CMD_FLAG_REQ_ONE)
			break;
	}
	req->op->bs_pos = pos;
}

static char *handle_chunk(struct nbdc_conn *conn, const union nbd_reply *rep, int *kerr)
{
	uint16_t flags = be16toh(rep->structured.flags);
	uint16_t type = be16toh(rep->structured.type);
	uint64_t cookie = be64toh(rep->structured.cookie);
	uint32_t len = be32toh(rep->structured.len);
	struct nbdc_req *req;
	int r;

	*kerr = -EPROTO;
	if (!conn->neg.structured_replies)
		return VIOLATION("structured reply without negotiation");
	req = lookup(conn, cookie);
	if (!req)
		return VIOLATION("chunk for unknown cookie %" G_GUINT64_FORMAT, cookie);

	switch (type) {
	case NBD_REPLY_TYPE_NONE:
		if (len != 0 || !(flags & NBD_REPLY_FLAG_DONE))
			return VIOLATION("NONE chunk with length %u, flags 0x%x", len, flags);
		break;
	case NBD_REPLY_TYPE_OFFSET_DATA: {
		uint8_t ob[8];

		if (req->type != NBD_CMD_READ)
			return VIOLATION("OFFSET_DATA chunk for %s", nbdc_cmd_name(req->type));
		if (len < 9 || len - 8 > req->len)
			return VIOLATION("OFFSET_DATA chunk of %u bytes for a %u byte read", len,
					 req->len);
		r = rb_read(conn, ob, 8);
		if (r < 0)
			goto io;
		uint64_t off = get_be64(ob), dlen = len - 8;
		if (!nbd_range_inside(off, dlen, req->offset, req->len))
			return VIOLATION("OFFSET_DATA [%" G_GUINT64_FORMAT "+%" G_GUINT64_FORMAT
					 ") outside the request [%" G_GUINT64_FORMAT "+%u)",
					 off, dlen, req->offset, req->len);
		r = read_into(conn, req, off - req->offset, dlen);
		if (r < 0)
			goto io;
		if (!cover(req, off - req->offset, dlen) ||
		    (++req->content_chunks > 1 && (req->flags & NBD_CMD_FLAG_DF)))
			set_err(req, -EPROTO);
		break;
	}
	case NBD_REPLY_TYPE_OFFSET_HOLE: {
		if (req->type != NBD_CMD_READ)
			return VIOLATION("OFFSET_HOLE chunk for %s", nbdc_cmd_name(req->type));
		if (len != sizeof(struct nbd_chunk_offset_hole))
			return VIOLATION("OFFSET_HOLE chunk of %u bytes", len);
		r = read_buf(conn, len);
		if (r < 0)
			goto io;
		uint64_t off = get_be64(conn->buf);
		uint32_t hl = get_be32(conn->buf + 8);
		if (hl == 0 || !nbd_range_inside(off, hl, req->offset, req->len))
			return VIOLATION(
			    "OFFSET_HOLE [%" G_GUINT64_FORMAT "+%u) outside the request", off, hl);
		zero_into(req, off - req->offset, hl);
		if (!cover(req, off - req->offset, hl) ||
		    (++req->content_chunks > 1 && (req->flags & NBD_CMD_FLAG_DF)))
			set_err(req, -EPROTO);
		break;
	}
	case NBD_REPLY_TYPE_BLOCK_STATUS:
		if (req->type != NBD_CMD_BLOCK_STATUS)
			return VIOLATION("BLOCK_STATUS chunk for %s", nbdc_cmd_name(req->type));
		if (len < 12 || (len - 4) % 8 || len > NBD_MAX_BS_CHUNK)
			return VIOLATION("BLOCK_STATUS chunk of %u bytes", len);
		r = read_buf(conn, len);
		if (r < 0)
			goto io;
		if (get_be32(conn->buf) == conn->neg.meta_id)
			deliver_extents(conn, req, len);
		break;
	default:
		if (!(type & NBD_REPLY_TYPE_ERROR_BIT))
			return VIOLATION("unknown chunk type %u", type);
		if (len < 6 || len > 6 + NBD_MAX_STRING + 8)
			return VIOLATION("error chunk of %u bytes", len);
		r = read_buf(conn, len);
		if (r < 0)
			goto io;
		uint32_t e = get_be32(conn->buf);
		uint16_t ml = get_be16(conn->buf + 4);
		if (ml > len - 6 || (type == NBD_REPLY_TYPE_ERROR && ml != len - 6) ||
		    (type == NBD_REPLY_TYPE_ERROR_OFFSET && ml + 14u != len))
			return VIOLATION("error chunk message length %u in %u bytes", ml, len);
		server_shutdown(conn, e);
		set_err(req, e ? -nbdc_errno_from_nbd(e) : -EPROTO);
		if (conn->c->cfg.debug && ml)
			nbdc_log(&conn->c->cfg, NBDC_LOG_DEBUG,
				 "cookie=%" G_GUINT64_FORMAT " server error %u: %.*s", cookie, e,
				 (int)ml, conn->buf + 6);
		break;
	}
	if (flags & NBD_REPLY_FLAG_DONE) {
		if (req->type == NBD_CMD_READ && !req->err && covered_bytes(req) != req->len)
			set_err(req, -EPROTO); /* gaps: never hand back stale bytes */
		if (req->type == NBD_CMD_BLOCK_STATUS && !req->err && !req->bs_seen)
			set_err(req, -EPROTO); /* success without any extent */
		complete(conn, req, 0);
	}
	return NULL;
io:
	*kerr = io_err(r);
	return io_msg(r, "reading a reply chunk");
}

/* Waits for the next reply; with a request timeout, wakes up to expire
 * the oldest request.  NULL when data is ready. */
static char *wait_reply(struct nbdc_conn *conn, int *kerr)
{
	guint tmo = conn->c->cfg.request_timeout_ms;

	if (!tmo || rb_avail(conn))
		return NULL;
	for (;;) {
		int r = nbdc_tr_wait_readable(conn->t, (int)MAX(tmo / 4, 10u));

		if (r != 0) {
			if (r < 0) {
				*kerr = -ENOTCONN;
				return io_msg(r, "waiting for a reply");
			}
			return NULL;
		}
		g_mutex_lock(&conn->lock);
		gboolean expired = conn->head && conn->head->deadline &&
				   conn->head->deadline <= g_get_monotonic_time();
		uint64_t ck = conn->head ? conn->head->cookie : 0;
		g_mutex_unlock(&conn->lock);
		if (expired) {
			*kerr = -ETIMEDOUT;
			return g_strdup_printf(
			    "request cookie=%" G_GUINT64_FORMAT " timed out after %u ms", ck, tmo);
		}
	}
}

static gpointer reader_main(gpointer data)
{
	struct nbdc_conn *conn = data;
	char *msg = NULL;
	int kerr = -ENOTCONN;

	on_reader = TRUE;

	for (;;) {
		union nbd_reply rep;
		int r;

		msg = wait_reply(conn, &kerr);
		if (msg)
			break;
		r = rb_read(conn, rep.raw, sizeof(struct nbd_simple_reply));
		if (r == -ENODATA) {
			/* EOF between replies: clean after our DISC. */
			g_mutex_lock(&conn->lock);
			gboolean clean = conn->disc_sent && !conn->head;
			g_mutex_unlock(&conn->lock);
			if (!clean)
				msg = g_strdup("server closed the connection");
			kerr = -ENOTCONN;
			break;
		}
		if (r < 0) {
			kerr = io_err(r);
			msg = io_msg(r, "reading a reply header");
			break;
		}
		uint32_t magic = be32toh(rep.simple.magic);
		if (magic == NBD_SIMPLE_REPLY_MAGIC) {
			msg = handle_simple(conn, &rep, &kerr);
		} else if (magic == NBD_STRUCTURED_REPLY_MAGIC) {
			r = rb_read(conn, rep.raw + 16, 4);
			if (r < 0) {
				kerr = io_err(r);
				msg = io_msg(r == -ENODATA ? -ECONNRESET : r,
					     "reading a reply header");
			} else {
				msg = handle_chunk(conn, &rep, &kerr);
			}
		} else {
			kerr = -EPROTO;
			msg = VIOLATION("bad reply magic 0x%08x", magic);
		}
		if (msg)
			break;
		maybe_soft_disconnect(conn);
	}
	g_mutex_lock(&conn->lock);
	gboolean disc = conn->disc_sent;
	g_mutex_unlock(&conn->lock);
	/* After our DISC, how the stream ends (EOF, reset, a TLS peer that
	 * skips close_notify, the goodbye timeout) is not an error. */
	if (disc && (!msg || kerr != -EPROTO))
		kill_conn(conn, -ENOTCONN, NULL);
	else
		kill_conn(conn, kerr, msg ? msg : "connection lost");
	g_free(msg);
	g_mutex_lock(&conn->lock);
	conn->reader_done = TRUE;
	wake_waiters(conn);
	g_mutex_unlock(&conn->lock);
	return NULL;
}

struct nbdc_conn *nbdc_conn_new(Nbdc *c, guint index, struct nbdc_transport *t,
				struct nbdc_neg *neg)
{
	struct nbdc_conn *conn = g_new0(struct nbdc_conn, 1);

	conn->c = c;
	conn->index = index;
	conn->t = t;
	conn->neg = *neg;
	memset(neg, 0, sizeof(*neg));
	g_mutex_init(&conn->send_lock);
	g_mutex_init(&conn->lock);
	g_cond_init(&conn->cond);
	table_init(conn, TABLE_MIN);
	conn->rbuf = g_malloc(RBUF_SIZE);
	t->idle_ms = c->cfg.request_timeout_ms;
	g_autofree char *name = g_strdup_printf("nbdc-reader-%u", index);
	conn->reader = g_thread_new(name, reader_main, conn);
	return conn;
}

gboolean nbdc_conn_drain(struct nbdc_conn *conn, gint64 until_us)
{
	gboolean idle;

	g_mutex_lock(&conn->lock);
	while (conn->in_flight > 0 || conn->senders > 0)
		if (!cond_wait_until(conn, until_us))
			break;
	idle = conn->in_flight == 0 && conn->senders == 0;
	g_mutex_unlock(&conn->lock);
	return idle;
}

void nbdc_conn_disconnect(struct nbdc_conn *conn)
{
	struct nbd_request hdr;

	g_mutex_lock(&conn->lock);
	gboolean skip = conn->dead || conn->disc_sent || conn->fail_msg;
	conn->disc_sent = TRUE;
	gboolean idle = conn->in_flight == 0 && conn->senders == 0;
	g_mutex_unlock(&conn->lock);
	if (skip)
		return;
	if (!idle) {
		/* Requests still pending after the bounded wait: abandon them. */
		nbdc_tr_shutdown(conn->t, SHUT_RDWR);
		return;
	}
	/* A bound on the goodbye: a server that stopped reading must not
	 * hold us. */
	conn->t->idle_ms = 2000;
	nbd_encode_request(&hdr, 0, NBD_CMD_DISC, 0, 0, 0);
	if (conn->c->cfg.debug)
		nbdc_log(&conn->c->cfg, NBDC_LOG_DEBUG, "DISC conn=%u", conn->index);
	g_mutex_lock(&conn->send_lock);
	if (nbdc_tr_write(conn->t, &hdr, sizeof(hdr)) == 0)
		nbdc_tls_bye(conn->t);
	g_mutex_unlock(&conn->send_lock);
	nbdc_tr_shutdown(conn->t, SHUT_WR);
}

void nbdc_conn_stop(struct nbdc_conn *conn)
{
	if (conn->reader) {
		/* Give the server a moment to close after DISC, then force. */
		gint64 until = g_get_monotonic_time() + 2 * G_USEC_PER_SEC;

		g_mutex_lock(&conn->lock);
		while (!conn->reader_done)
			if (!cond_wait_until(conn, until))
				break;
		g_mutex_unlock(&conn->lock);
		nbdc_tr_shutdown(conn->t, SHUT_RDWR);
		g_thread_join(conn->reader);
		conn->reader = NULL;
	}
}

void nbdc_conn_free(struct nbdc_conn *conn)
{
	if (!conn)
		return;
	nbdc_conn_stop(conn);
	nbdc_tr_close(conn->t);
	nbdc_neg_clear(&conn->neg);
	g_free(conn->table);
	g_free(conn->buf);
	g_free(conn->rbuf);
	g_free(conn->fail_msg);
	g_mutex_clear(&conn->send_lock);
	g_mutex_clear(&conn->lock);
	g_cond_clear(&conn->cond);
	g_free(conn);
}
