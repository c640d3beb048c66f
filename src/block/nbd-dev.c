/* nbd-dev.c: an NBD export (an Nbdc handle) as a Blockdev, with reconnection.
 *
 * Requests map 1:1 onto nbdc_aio_* calls.  The export's last sector may be
 * partial: requests touching it send only the bytes inside (a read zeroes
 * the rest of the caller's buffer first).
 *
 * Reconnection and threads.  A request that fails because its connection
 * died (the handle is no longer alive) is parked instead of completed, and
 * the device turns to "reconnecting": new requests are parked at once too.
 * The reconnect thread (one per device, started on the first outage, lives
 * until disconnect or destroy) does all the slow work: it launches connect
 * attempts on a short-lived attempt thread with backoff (50 ms doubling to
 * 2 s), checks the new export size (a change is refused and logged), swaps
 * the new handle in and resubmits the parked requests; it completes parked
 * requests with -EIO once timeout_s has passed since they first failed, and
 * frees dead handles (never on a reader thread: nbdc_free must not run in a
 * completion callback).  Because attempts run apart, expiry stays on time
 * even while a connect hangs.
 *
 * Lock: `mu` guards the connection pointer, the parked queue and the
 * reconnect state; it is never held across an nbdc call or a callback.
 * A `struct conn` is only freed when no submitter still uses it (`users`).
 *
 * Destroy from a completion callback (the last reference dropped on a
 * reader thread) hands the teardown to a detached thread.
 */
#include "config.h"

#include <errno.h>
#include <gio/gio.h>
#include <string.h>

#include "nbdfs/blockdev-nbd.h"
#include "blockdev-impl.h"

#define BACKOFF_MIN_US (50 * 1000)
#define BACKOFF_MAX_US (2 * 1000 * 1000)
#define DISCONNECT_FLUSH_WAIT_US (5 * 1000 * 1000)
/* Cap on one reconnect attempt's handshake, so teardown never waits long. */
#define ATTEMPT_HANDSHAKE_MAX_MS 10000

struct conn {
	Nbdc *c;
	guint users;                  /* submitters between lookup and nbdc_aio_* return */
	guint64 gen;
};

enum nbd_op { OP_READ, OP_WRITE, OP_FLUSH, OP_ZERO, OP_TRIM, OP_STATUS };

struct nbd_req {
	GList link;                   /* in parked */
	struct nbd_dev *d;
	enum nbd_op op;
	uint64_t offset, count;       /* bytes, clipped to the export size */
	const struct iovec *iov;      /* what goes to nbdc: the caller's or trimmed */
	int iovcnt;
	uint32_t flags;               /* NBDC_CMD_FLAG_* */
	blockdev_done_fn done;
	blockdev_extent_fn extent;
	void *opaque;
	gint64 first_fail;            /* monotonic us of the first connection failure; 0 none */
	struct conn *conn;            /* the connection it was last submitted on */
	struct iovec trimmed[];       /* room for a trimmed copy of the iov */
};

struct nbd_dev {
	struct blockdev base;
	struct nbdc_config recfg;     /* a copy of the caller's config, for reconnecting */
	gboolean can_reconnect;       /* FALSE when the config passed a ready fd */
	guint timeout_s;
	uint64_t size;                /* the export size: must not change across reconnects */
	char *name;                   /* for log lines */

	GMutex mu;
	GCond cond;
	struct conn *conn;            /* current connection (maybe dead) */
	guint64 gen;
	GPtrArray *dead;              /* struct conn * waiting to be freed */
	GQueue parked;
	gboolean reconnecting;        /* conn is dead; requests park */
	gboolean stopping;            /* disconnect or destroy: no more reconnecting */
	GThread *thread;              /* reconnect thread, once started */
	GThread *attempt;             /* running or finished attempt, not yet joined */
	gboolean attempt_done;
	Nbdc *attempt_result;
	char *attempt_error;
	gint64 next_attempt;          /* monotonic us */
	gint64 backoff;
	guint attempts;
};

#define NBD(dev) ((struct nbd_dev *)(dev))

/* Set while a caller's callback runs on this thread, so destroy knows it
 * must not join or free connections here. */
static __thread int in_callback;

static void conn_free(struct conn *cn)
{
	if (!cn)
		return;
	nbdc_free(cn->c);
	g_free(cn);
}

static void req_complete(struct nbd_req *req, int err)
{
	blockdev_done_fn done = req->done;
	void *opaque = req->opaque;

	g_free(req);
	in_callback++;
	done(opaque, err);
	in_callback--;
}

static gboolean is_conn_error(int err)
{
	switch (-err) {
	case ENOTCONN: case EPROTO: case ETIMEDOUT: case ECONNRESET: case EPIPE:
	case ESHUTDOWN: case ECONNABORTED: case EIO:
		return TRUE;
	default:
		return FALSE;
	}
}

static void start_thread_locked(struct nbd_dev *d);
static void submit(struct nbd_req *req);

/* A request failed with @err on @cn.  Park it if the connection died (and
 * reconnection can still help), else complete it. */
static void req_failed(struct nbd_req *req, struct conn *cn, int err)
{
	struct nbd_dev *d = req->d;
	gint64 now = g_get_monotonic_time();
	gboolean dead = cn && is_conn_error(err) && !nbdc_is_alive(cn->c);

	if (!dead) {
		req_complete(req, err);
		return;
	}
	g_mutex_lock(&d->mu);
	if (d->stopping || !d->can_reconnect) {
		g_mutex_unlock(&d->mu);
		req_complete(req, d->stopping ? -ENOTCONN : -EIO);
		return;
	}
	if (cn == d->conn && !d->reconnecting) {
		const char *why = nbdc_get_error(cn->c);

		d->reconnecting = TRUE;
		d->backoff = BACKOFF_MIN_US;
		d->next_attempt = now;
		d->attempts = 0;
		g_message("%s: connection lost (%s); reconnecting", d->name,
			  why ? why : g_strerror(-err));
		start_thread_locked(d);
		g_cond_broadcast(&d->cond);
	}
	if (req->first_fail == 0)
		req->first_fail = now;
	if (now - req->first_fail >= (gint64)d->timeout_s * G_USEC_PER_SEC) {
		g_mutex_unlock(&d->mu);
		req_complete(req, -EIO);
		return;
	}
	g_queue_push_tail_link(&d->parked, &req->link);
	start_thread_locked(d);
	g_cond_broadcast(&d->cond);
	g_mutex_unlock(&d->mu);
}

static void req_done(void *opaque, int err)
{
	struct nbd_req *req = opaque;

	if (err == 0 || !req->conn) {
		req_complete(req, err);
		return;
	}
	req_failed(req, req->conn, err);
}

static void status_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct nbd_req *req = opaque;

	req->extent(req->opaque, offset, length,
		    (flags & NBDC_STATE_HOLE ? BLOCKDEV_STATE_HOLE : 0) |
		    (flags & NBDC_STATE_ZERO ? BLOCKDEV_STATE_ZERO : 0));
}

/* Sends @req on the current connection, or parks it while reconnecting. */
static void submit(struct nbd_req *req)
{
	struct nbd_dev *d = req->d;
	struct conn *cn;
	int r = -EINVAL;

	g_mutex_lock(&d->mu);
	if (d->stopping) {
		g_mutex_unlock(&d->mu);
		req_complete(req, -ENOTCONN);
		return;
	}
	if (d->reconnecting && d->timeout_s == 0) {
		g_mutex_unlock(&d->mu);
		req_complete(req, -EIO);
		return;
	}
	if (d->reconnecting) {
		if (req->first_fail == 0)
			req->first_fail = g_get_monotonic_time();
		g_queue_push_tail_link(&d->parked, &req->link);
		g_cond_broadcast(&d->cond);
		g_mutex_unlock(&d->mu);
		return;
	}
	cn = d->conn;
	cn->users++;
	g_mutex_unlock(&d->mu);

	req->conn = cn;
	switch (req->op) {
	case OP_READ:
		r = nbdc_aio_preadv(cn->c, req->iov, req->iovcnt, req->offset, 0, req_done, req);
		break;
	case OP_WRITE:
		r = nbdc_aio_pwritev(cn->c, req->iov, req->iovcnt, req->offset, req->flags,
				     req_done, req);
		break;
	case OP_FLUSH:
		r = nbdc_aio_flush(cn->c, req_done, req);
		break;
	case OP_ZERO:
		r = nbdc_aio_zero(cn->c, req->count, req->offset, req->flags, req_done, req);
		break;
	case OP_TRIM:
		r = nbdc_aio_trim(cn->c, req->count, req->offset, 0, req_done, req);
		break;
	case OP_STATUS:
		r = nbdc_aio_block_status(cn->c, req->count, req->offset, 0, status_extent,
					  req_done, req);
		break;
	}
	/* After a successful queueing @req may already be gone: only @cn. */
	if (r < 0)
		req_failed(req, cn, r);
	g_mutex_lock(&d->mu);
	cn->users--;
	if (cn->users == 0 && cn != d->conn)
		g_cond_broadcast(&d->cond);
	g_mutex_unlock(&d->mu);
}

/* ---- The reconnect thread ---------------------------------------------------- */

static gpointer attempt_main(gpointer opaque)
{
	struct nbd_dev *d = opaque;
	g_autoptr(GError) error = NULL;
	Nbdc *c = nbdc_connect(&d->recfg, &error);
	char *why = NULL;

	if (c) {
		struct nbdc_info info;

		nbdc_get_info(c, &info);
		if (info.size != d->size) {
			why = g_strdup_printf("the export size changed from %" G_GUINT64_FORMAT
					      " to %" G_GUINT64_FORMAT " bytes; refusing it",
					      d->size, info.size);
			nbdc_free(c);
			c = NULL;
		}
	} else {
		why = g_strdup(error->message);
	}
	g_mutex_lock(&d->mu);
	d->attempt_result = c;
	d->attempt_error = why;
	d->attempt_done = TRUE;
	g_cond_broadcast(&d->cond);
	g_mutex_unlock(&d->mu);
	return NULL;
}

static gpointer reconnect_main(gpointer opaque)
{
	struct nbd_dev *d = opaque;

	g_mutex_lock(&d->mu);
	while (!d->stopping) {
		gint64 now = g_get_monotonic_time();
		gint64 wake = G_MAXINT64;
		GQueue expired = G_QUEUE_INIT, resubmit = G_QUEUE_INIT;
		GPtrArray *to_free = NULL;
		GList *it, *next;

		/* A finished attempt: swap the connection in, or back off. */
		if (d->attempt && d->attempt_done) {
			GThread *t = d->attempt;
			Nbdc *c = d->attempt_result;
			g_autofree char *why = d->attempt_error;

			d->attempt = NULL;
			d->attempt_done = FALSE;
			d->attempt_result = NULL;
			d->attempt_error = NULL;
			g_mutex_unlock(&d->mu);
			g_thread_join(t);
			g_mutex_lock(&d->mu);
			d->attempts++;
			if (c && d->stopping) {
				g_mutex_unlock(&d->mu);
				nbdc_free(c);
				g_mutex_lock(&d->mu);
			} else if (c) {
				struct conn *cn = g_new0(struct conn, 1);

				cn->c = c;
				cn->gen = ++d->gen;
				g_ptr_array_add(d->dead, d->conn);
				d->conn = cn;
				d->reconnecting = FALSE;
				g_message("%s: reconnected after %u attempt%s", d->name, d->attempts,
					  d->attempts == 1 ? "" : "s");
			} else {
				if (d->attempts == 1 || d->attempts % 10 == 0)
					g_warning("%s: reconnect attempt %u failed: %s", d->name,
						  d->attempts, why);
				d->next_attempt = now + d->backoff;
				d->backoff = MIN(d->backoff * 2, BACKOFF_MAX_US);
			}
			continue;
		}
		/* Expire parked requests; resubmit them once connected. */
		for (it = d->parked.head; it; it = next) {
			struct nbd_req *req = it->data;
			gint64 deadline = req->first_fail + (gint64)d->timeout_s * G_USEC_PER_SEC;

			next = it->next;
			if (now >= deadline) {
				g_queue_unlink(&d->parked, it);
				g_queue_push_tail_link(&expired, it);
			} else if (!d->reconnecting) {
				g_queue_unlink(&d->parked, it);
				g_queue_push_tail_link(&resubmit, it);
			} else {
				wake = MIN(wake, deadline);
			}
		}
		/* Dead connections nobody is submitting on any more. */
		for (guint i = 0; i < d->dead->len;) {
			struct conn *cn = d->dead->pdata[i];

			if (cn->users == 0) {
				if (!to_free)
					to_free = g_ptr_array_new();
				g_ptr_array_add(to_free, cn);
				g_ptr_array_remove_index_fast(d->dead, i);
			} else {
				i++;
			}
		}
		if (d->reconnecting && !d->attempt) {
			if (now >= d->next_attempt) {
				d->attempt_done = FALSE;
				d->attempt = g_thread_new("nbd-connect", attempt_main, d);
			} else {
				wake = MIN(wake, d->next_attempt);
			}
		}
		if (expired.length || resubmit.length || to_free) {
			g_mutex_unlock(&d->mu);
			while ((it = g_queue_pop_head_link(&expired)))
				req_complete(it->data, -EIO);
			while ((it = g_queue_pop_head_link(&resubmit)))
				submit(it->data);
			if (to_free) {
				for (guint i = 0; i < to_free->len; i++)
					conn_free(to_free->pdata[i]);
				g_ptr_array_free(to_free, TRUE);
			}
			g_mutex_lock(&d->mu);
			continue;
		}
		if (wake == G_MAXINT64)
			g_cond_wait(&d->cond, &d->mu);
		else
			g_cond_wait_until(&d->cond, &d->mu, wake);
	}
	g_mutex_unlock(&d->mu);
	return NULL;
}

static void start_thread_locked(struct nbd_dev *d)
{
	if (!d->thread && !d->stopping)
		d->thread = g_thread_new("nbd-reconnect", reconnect_main, d);
}

/* ---- Ops ------------------------------------------------------------------------ */

static struct nbd_req *req_new(struct nbd_dev *d, enum nbd_op op, int iovcnt)
{
	struct nbd_req *req = g_malloc0(sizeof(*req) + (size_t)MAX(iovcnt, 0) * sizeof(struct iovec));

	req->link.data = req;
	req->d = d;
	req->op = op;
	return req;
}

/* Clips [offset, offset + count) to the export; returns the byte count. */
static uint64_t clip(struct nbd_dev *d, uint64_t offset, uint64_t count)
{
	return MIN(count, d->size - offset);
}

/* Points req->iov at a copy of @iov trimmed to @keep bytes (zeroing the
 * dropped part of the caller's buffers for a read). */
static void set_trimmed_iov(struct nbd_req *req, const struct iovec *iov, int iovcnt,
			    uint64_t keep, gboolean zero_rest)
{
	uint64_t left = keep;
	int k = 0;

	for (int i = 0; i < iovcnt; i++) {
		size_t l = iov[i].iov_len;
		size_t take = (size_t)MIN((uint64_t)l, left);

		if (take > 0)
			req->trimmed[k++] = (struct iovec){ iov[i].iov_base, take };
		if (zero_rest && take < l)
			memset((uint8_t *)iov[i].iov_base + take, 0, l - take);
		left -= take;
	}
	req->iov = req->trimmed;
	req->iovcnt = k;
	req->count = keep;
}

static void nbd_rw(Blockdev *dev, enum nbd_op op, uint64_t sector, const struct iovec *iov,
		   int iovcnt, uint32_t flags, blockdev_done_fn done, void *opaque)
{
	struct nbd_dev *d = NBD(dev);
	uint32_t ss = dev->info.sector_size;
	uint64_t offset = sector * ss, total = 0, keep;
	struct nbd_req *req;

	for (int i = 0; i < iovcnt; i++)
		total += iov[i].iov_len;     /* checked by the base layer */
	keep = clip(d, offset, total);
	req = req_new(d, op, keep < total ? iovcnt : 0);
	req->offset = offset;
	req->flags = flags & BLOCKDEV_FUA ? NBDC_CMD_FLAG_FUA : 0;
	req->done = done;
	req->opaque = opaque;
	if (keep < total) {
		set_trimmed_iov(req, iov, iovcnt, keep, op == OP_READ);
	} else {
		req->iov = iov;
		req->iovcnt = iovcnt;
		req->count = total;
	}
	submit(req);
}

static void nbd_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		     blockdev_done_fn done, void *opaque)
{
	nbd_rw(dev, OP_READ, sector, iov, iovcnt, 0, done, opaque);
}

static void nbd_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		      uint32_t flags, blockdev_done_fn done, void *opaque)
{
	nbd_rw(dev, OP_WRITE, sector, iov, iovcnt, flags, done, opaque);
}

static void nbd_flush(Blockdev *dev, blockdev_done_fn done, void *opaque)
{
	struct nbd_req *req = req_new(NBD(dev), OP_FLUSH, 0);

	req->done = done;
	req->opaque = opaque;
	submit(req);
}

static void nbd_range(Blockdev *dev, enum nbd_op op, uint64_t sector, uint64_t count,
		      uint32_t flags, blockdev_extent_fn extent, blockdev_done_fn done,
		      void *opaque)
{
	struct nbd_dev *d = NBD(dev);
	uint32_t ss = dev->info.sector_size;
	struct nbd_req *req = req_new(d, op, 0);

	req->offset = sector * ss;
	req->count = clip(d, req->offset, count * ss);
	req->flags = flags;
	req->extent = extent;
	req->done = done;
	req->opaque = opaque;
	submit(req);
}

static void nbd_zero(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
		     blockdev_done_fn done, void *opaque)
{
	uint32_t f = (flags & BLOCKDEV_FUA ? NBDC_CMD_FLAG_FUA : 0) |
		     (flags & BLOCKDEV_MAY_TRIM ? 0 : NBDC_CMD_FLAG_NO_HOLE);

	nbd_range(dev, OP_ZERO, sector, count, f, NULL, done, opaque);
}

static void nbd_discard(Blockdev *dev, uint64_t sector, uint64_t count,
			blockdev_done_fn done, void *opaque)
{
	nbd_range(dev, OP_TRIM, sector, count, 0, NULL, done, opaque);
}

static void nbd_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
			     blockdev_extent_fn extent, blockdev_done_fn done, void *opaque)
{
	nbd_range(dev, OP_STATUS, sector, count, 0, extent, done, opaque);
}

/* Flush (bounded wait), stop reconnecting, fail parked requests, disconnect. */
struct flush_wait {
	GMutex mu;
	GCond cond;
	gboolean finished;
	gint refs;
};

static void flush_wait_unref(struct flush_wait *w)
{
	if (g_atomic_int_dec_and_test(&w->refs)) {
		g_mutex_clear(&w->mu);
		g_cond_clear(&w->cond);
		g_free(w);
	}
}

static void flush_wait_done(void *opaque, int err)
{
	struct flush_wait *w = opaque;

	g_mutex_lock(&w->mu);
	w->finished = TRUE;
	g_cond_signal(&w->cond);
	g_mutex_unlock(&w->mu);
	flush_wait_unref(w);
}

static void nbd_disconnect(Blockdev *dev)
{
	struct nbd_dev *d = NBD(dev);
	struct conn *cn = NULL, *cur;
	GQueue parked = G_QUEUE_INIT;
	GList *it;

	g_mutex_lock(&d->mu);
	if (!d->reconnecting && !d->stopping && nbdc_is_alive(d->conn->c)) {
		cn = d->conn;
		cn->users++;
	}
	g_mutex_unlock(&d->mu);
	if (cn) {
		struct flush_wait *w = g_new0(struct flush_wait, 1);
		gint64 deadline = g_get_monotonic_time() + DISCONNECT_FLUSH_WAIT_US;

		g_mutex_init(&w->mu);
		g_cond_init(&w->cond);
		w->refs = 2;
		if (dev->info.can_flush && nbdc_aio_flush(cn->c, flush_wait_done, w) == 0) {
			g_mutex_lock(&w->mu);
			while (!w->finished)
				if (!g_cond_wait_until(&w->cond, &w->mu, deadline))
					break;
			g_mutex_unlock(&w->mu);
		} else {
			flush_wait_unref(w);
		}
		flush_wait_unref(w);
	}
	g_mutex_lock(&d->mu);
	d->stopping = TRUE;
	while ((it = g_queue_pop_head_link(&d->parked)))
		g_queue_push_tail_link(&parked, it);
	g_cond_broadcast(&d->cond);
	cur = d->conn;
	cur->users++;
	g_mutex_unlock(&d->mu);
	while ((it = g_queue_pop_head_link(&parked)))
		req_complete(it->data, -ENOTCONN);
	/* Bounded in the core; fails in-flight requests with -ENOTCONN. */
	nbdc_disconnect(cur->c);
	g_mutex_lock(&d->mu);
	cur->users--;
	if (cn)
		cn->users--;
	g_mutex_unlock(&d->mu);
}

static gpointer teardown_main(gpointer opaque)
{
	struct nbd_dev *d = opaque;
	GList *it;

	g_mutex_lock(&d->mu);
	d->stopping = TRUE;
	g_cond_broadcast(&d->cond);
	g_mutex_unlock(&d->mu);
	if (d->thread)
		g_thread_join(d->thread);
	if (d->attempt) {
		g_thread_join(d->attempt);
		if (d->attempt_result)
			nbdc_free(d->attempt_result);
		g_free(d->attempt_error);
	}
	/* Requests still parked (a caller dropped its last reference with
	 * requests pending) fail. */
	while ((it = g_queue_pop_head_link(&d->parked)))
		req_complete(it->data, -ENOTCONN);
	conn_free(d->conn);
	for (guint i = 0; i < d->dead->len; i++)
		conn_free(d->dead->pdata[i]);
	g_ptr_array_free(d->dead, TRUE);
	g_mutex_clear(&d->mu);
	g_cond_clear(&d->cond);
	g_free(d->name);
	blockdev_fini(&d->base);
	g_free(d);
	return NULL;
}

static void nbd_destroy(Blockdev *dev)
{
	if (in_callback) {
		/* On a reader thread: nbdc_free must not run here. */
		g_thread_unref(g_thread_new("nbd-teardown", teardown_main, dev));
		return;
	}
	teardown_main(dev);
}

static const struct blockdev_ops nbd_ops = {
	.read = nbd_read,
	.write = nbd_write,
	.flush = nbd_flush,
	.write_zeroes = nbd_zero,
	.discard = nbd_discard,
	.block_status = nbd_block_status,
	.disconnect = nbd_disconnect,
	.destroy = nbd_destroy,
};

Blockdev *blockdev_nbd_new(const struct nbdc_config *cfg, const struct blockdev_nbd_opts *opts,
			   GError **error)
{
	struct blockdev_nbd_opts defaults = { 0 };
	struct nbdc_info info;
	struct nbd_dev *d;
	uint32_t ss;
	Nbdc *c;

	g_return_val_if_fail(cfg != NULL, NULL);
	if (!opts)
		opts = &defaults;
	ss = opts->sector_size;
	if (ss != 0 && (ss < 512 || (ss & (ss - 1)) != 0 || ss > 64 * 1024)) {
		g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
			    "sector size %u: not a power of two between 512 and 65536", ss);
		return NULL;
	}
	c = nbdc_connect(cfg, error);
	if (!c)
		return NULL;
	nbdc_get_info(c, &info);
	if (ss == 0)
		ss = info.sector_size;
	if (ss < 512 || (ss & (ss - 1)) != 0 || (info.block_min && ss % info.block_min)) {
		g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
			    "sector size %u: not a multiple of the export's minimum block size %u",
			    ss, info.block_min);
		nbdc_free(c);
		return NULL;
	}

	d = g_new0(struct nbd_dev, 1);
	blockdev_init_root(&d->base, &nbd_ops, info.export_name, opts->uri);
	d->base.info.sector_size = ss;
	d->base.info.size = info.size;
	d->base.info.read_write = info.read_write && !opts->read_only;
	d->base.info.pref_block = info.block_pref >= 512 ? info.block_pref : 4096;
	d->base.info.max_request = info.max_request;
	d->base.info.can_flush = info.can_flush;
	d->base.info.can_fua = info.can_fua;
	d->base.info.can_trim = info.can_trim;
	d->base.info.can_zero = info.can_zero;
	d->base.info.can_block_status = info.can_block_status;
	blockdev_finish_info(&d->base);

	d->recfg = *cfg;
	d->can_reconnect = cfg->fd < 0;
	if (d->recfg.handshake_timeout_ms == 0 ||
	    d->recfg.handshake_timeout_ms > ATTEMPT_HANDSHAKE_MAX_MS)
		d->recfg.handshake_timeout_ms = ATTEMPT_HANDSHAKE_MAX_MS;
	d->timeout_s = opts->timeout_s;
	d->size = info.size;
	d->name = g_strdup(opts->uri && *opts->uri ? opts->uri
			   : *d->base.export_name ? d->base.export_name : "nbd");
	g_mutex_init(&d->mu);
	g_cond_init(&d->cond);
	g_queue_init(&d->parked);
	d->dead = g_ptr_array_new();
	d->conn = g_new0(struct conn, 1);
	d->conn->c = c;
	return &d->base;
}
