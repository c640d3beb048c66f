/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nbd-dev.c: an NBD export (an Nbdc handle) as a Blockdev.
 *
 * Requests map 1:1 onto nbdc_aio_* calls.  The export's last sector may be
 * partial: requests touching it send only the bytes inside (a read zeroes
 * the rest of the caller's buffer first).  Connections, reconnection, the
 * timeouts and the replay of unflushed writes are the core's (the handle is
 * made with cfg.reconnect); completions run on the core's loops.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "nbdfs/blockdev-nbd.h"
#include "blockdev-impl.h"

enum nbddev_op { OP_READ, OP_WRITE };

/* A request whose iov was trimmed to the export's end. */
struct trimmed {
	blockdev_done_fn done;
	void *opaque;
	int iovcnt;
	struct iovec iov[];
};

struct nbddev {
	struct blockdev base;
	struct nbdc_config cfg; /* the handle's configuration (strings borrowed) */
	Nbdc *c;
	uint64_t size;
};

#define NBDDEV(dev) ((struct nbddev *)(dev))

static void trimmed_done(void *opaque, int err)
{
	struct trimmed *t = opaque;
	blockdev_done_fn done = t->done;
	void *arg = t->opaque;

	g_free(t);
	done(arg, err);
}

/* Maps what the core says to the block layer's errors. */
static int dev_err(int r)
{
	return r == -ETIMEDOUT || r == -EPROTO ? -EIO : r;
}

static void nbddev_rw(Blockdev *dev, enum nbddev_op op, uint64_t sector, const struct iovec *iov,
		      int iovcnt, uint32_t flags, blockdev_done_fn done, void *opaque)
{
	struct nbddev *d = NBDDEV(dev);
	uint64_t offset = sector * dev->info.sector_size, total = 0;
	uint32_t f = flags & BLOCKDEV_FUA ? NBDC_CMD_FLAG_FUA : 0;
	int r;

	for (int i = 0; i < iovcnt; i++)
		total += iov[i].iov_len; /* checked by the base layer */
	uint64_t keep = MIN(total, d->size - offset);
	if (keep < total) {
		/* The partial last sector: send only the bytes inside. */
		struct trimmed *t = g_malloc(sizeof(*t) + (size_t)iovcnt * sizeof(struct iovec));
		uint64_t left = keep;
		int k = 0;

		t->done = done;
		t->opaque = opaque;
		for (int i = 0; i < iovcnt; i++) {
			size_t l = iov[i].iov_len, take = (size_t)MIN((uint64_t)l, left);

			if (take)
				t->iov[k++] = (struct iovec){ iov[i].iov_base, take };
			if (op == OP_READ && take < l)
				memset((uint8_t *)iov[i].iov_base + take, 0, l - take);
			left -= take;
		}
		t->iovcnt = k;
		r = op == OP_READ ? nbdc_aio_preadv(d->c, t->iov, k, offset, 0, trimmed_done, t)
				  : nbdc_aio_pwritev(d->c, t->iov, k, offset, f, trimmed_done, t);
		if (r < 0) {
			g_free(t);
			done(opaque, dev_err(r));
		}
		return;
	}
	r = op == OP_READ ? nbdc_aio_preadv(d->c, iov, iovcnt, offset, 0, done, opaque)
			  : nbdc_aio_pwritev(d->c, iov, iovcnt, offset, f, done, opaque);
	if (r < 0)
		done(opaque, dev_err(r));
}

static void nbddev_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
			blockdev_done_fn done, void *opaque)
{
	nbddev_rw(dev, OP_READ, sector, iov, iovcnt, 0, done, opaque);
}

static void nbddev_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
			 uint32_t flags, blockdev_done_fn done, void *opaque)
{
	nbddev_rw(dev, OP_WRITE, sector, iov, iovcnt, flags, done, opaque);
}

static void nbddev_flush(Blockdev *dev, blockdev_done_fn done, void *opaque)
{
	int r = nbdc_aio_flush(NBDDEV(dev)->c, done, opaque);

	if (r < 0)
		done(opaque, dev_err(r));
}

/* Clips [sector, sector + count) to the export; returns the byte count. */
static uint64_t clip(struct nbddev *d, uint64_t offset, uint64_t count_bytes)
{
	return MIN(count_bytes, d->size - offset);
}

static void nbddev_zero(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
			blockdev_done_fn done, void *opaque)
{
	struct nbddev *d = NBDDEV(dev);
	uint64_t offset = sector * dev->info.sector_size;
	uint32_t f = (flags & BLOCKDEV_FUA ? NBDC_CMD_FLAG_FUA : 0) |
		     (flags & BLOCKDEV_MAY_TRIM ? 0 : NBDC_CMD_FLAG_NO_HOLE);
	int r = nbdc_aio_zero(d->c, clip(d, offset, count * dev->info.sector_size), offset, f, done,
			      opaque);

	if (r < 0)
		done(opaque, dev_err(r));
}

static void nbddev_discard(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
			   void *opaque)
{
	struct nbddev *d = NBDDEV(dev);
	uint64_t offset = sector * dev->info.sector_size;
	int r = nbdc_aio_trim(d->c, clip(d, offset, count * dev->info.sector_size), offset, 0, done,
			      opaque);

	if (r < 0)
		done(opaque, dev_err(r));
}

/* Extents come in the core's flags; the block layer's have the same bits
 * but are spelt out so that neither header depends on the other. */
struct status_ctx {
	blockdev_extent_fn extent;
	blockdev_done_fn done;
	void *opaque;
};

static void status_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct status_ctx *s = opaque;

	s->extent(s->opaque, offset, length,
		  (flags & NBDC_STATE_HOLE ? BLOCKDEV_STATE_HOLE : 0) |
			  (flags & NBDC_STATE_ZERO ? BLOCKDEV_STATE_ZERO : 0));
}

static void status_done(void *opaque, int err)
{
	struct status_ctx *s = opaque;
	blockdev_done_fn done = s->done;
	void *arg = s->opaque;

	g_free(s);
	done(arg, dev_err(err));
}

static void nbddev_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
				blockdev_extent_fn extent, blockdev_done_fn done, void *opaque)
{
	struct nbddev *d = NBDDEV(dev);
	uint64_t offset = sector * dev->info.sector_size;
	struct status_ctx *s = g_new(struct status_ctx, 1);

	s->extent = extent;
	s->done = done;
	s->opaque = opaque;
	int r = nbdc_aio_block_status(d->c, clip(d, offset, count * dev->info.sector_size), offset,
				      0, status_extent, status_done, s);
	if (r < 0) {
		g_free(s);
		done(opaque, dev_err(r));
	}
}

static void nbddev_disconnect(Blockdev *dev)
{
	nbdc_abandon(NBDDEV(dev)->c);
}

static void nbddev_hold(Blockdev *dev, gboolean held)
{
	nbdc_hold(NBDDEV(dev)->c, held);
}

static void nbddev_get_health(Blockdev *dev, struct blockdev_health *out)
{
	struct nbdc_health h;

	nbdc_get_health(NBDDEV(dev)->c, &h);
	switch (h.state) {
	case NBDC_STATE_IDLE:
		out->state = BLOCKDEV_CONN_IDLE;
		break;
	case NBDC_STATE_CONNECTED:
		out->state = BLOCKDEV_CONN_CONNECTED;
		break;
	case NBDC_STATE_RECONNECTING:
		out->state = BLOCKDEV_CONN_RECONNECTING;
		break;
	case NBDC_STATE_FAILED:
		out->state = BLOCKDEV_CONN_FAILED;
		break;
	}
	out->reconnects = h.reconnects;
	out->lost_writes_seq = h.lost_writes_seq;
}

static void nbddev_destroy(Blockdev *dev)
{
	struct nbddev *d = NBDDEV(dev);

	/* Off a loop this waits (bounded) for the connections; on a loop (the
	 * last reference dropped in a completion) it finishes later. */
	nbdc_free(d->c);
	blockdev_fini(&d->base);
	g_free(d);
}

static const struct blockdev_ops nbddev_ops = {
	.read = nbddev_read,
	.write = nbddev_write,
	.flush = nbddev_flush,
	.write_zeroes = nbddev_zero,
	.discard = nbddev_discard,
	.block_status = nbddev_block_status,
	.disconnect = nbddev_disconnect,
	.hold = nbddev_hold,
	.get_health = nbddev_get_health,
	.destroy = nbddev_destroy,
};

/* The handle's configuration for a device. */
static void dev_config(struct nbdc_config *out, const struct nbdc_config *cfg,
		       const struct blockdev_nbd_opts *opts)
{
	*out = *cfg;
	out->reconnect = cfg->fd < 0; /* an inherited socket cannot be made again */
	out->reconnect_timeout_ms = opts->timeout_s * 1000;
	out->request_timeout_ms = opts->io_timeout_s * 1000;
	out->idle_timeout_ms = opts->idle_timeout_s * 1000;
	/* Each connect is bounded by the timeout (a connect to a server that
	 * answers nothing must not outlast the requests waiting for it). */
	if (opts->timeout_s > 0)
		out->handshake_timeout_ms = MIN(opts->timeout_s, 3600u) * 1000;
}

static gboolean check_ss(uint32_t ss, GError **error)
{
	if (ss != 0 && (ss < 512 || (ss & (ss - 1)) != 0 || ss > 64 * 1024)) {
		g_set_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_INVALID,
			    "sector size %u: not a power of two between 512 and 65536", ss);
		return FALSE;
	}
	return TRUE;
}

static Blockdev *wrap(Nbdc *c, const struct blockdev_nbd_opts *opts, const struct nbdc_config *cfg,
		      GError **error)
{
	struct nbdc_info info;
	uint32_t ss = opts->sector_size;

	nbdc_get_info(c, &info);
	if (ss == 0)
		ss = info.sector_size;
	if (ss < 512 || (ss & (ss - 1)) != 0 || (info.block_min && ss % info.block_min)) {
		g_set_error(error, BLOCKDEV_ERROR, BLOCKDEV_ERROR_INVALID,
			    "sector size %u: not a multiple of the export's minimum block size %u",
			    ss, info.block_min);
		nbdc_free(c);
		return NULL;
	}
	struct nbddev *d = g_new0(struct nbddev, 1);
	blockdev_init_root(&d->base, &nbddev_ops, info.export_name, opts->uri);
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
	d->cfg = *cfg;
	d->c = c;
	d->size = info.size;
	return &d->base;
}

/* blockdev_nbd_new() (@lazy FALSE: connects now) and blockdev_nbd_open()
 * (@lazy TRUE: a handle for @known that connects on first use). */
static Blockdev *nbddev_new(const struct nbdc_config *cfg, const struct blockdev_nbd_opts *opts,
			    gboolean lazy, const struct nbdc_export *known, GError **error)
{
	static const struct blockdev_nbd_opts defaults = { 0 };
	struct nbdc_config dcfg;

	if (!opts)
		opts = &defaults;
	if (!check_ss(opts->sector_size, error))
		return NULL;
	dev_config(&dcfg, cfg, opts);
	Nbdc *c = lazy ? nbdc_open(&dcfg, known, error) : nbdc_connect(&dcfg, error);
	if (!c)
		return NULL;
	return wrap(c, opts, &dcfg, error);
}

Blockdev *blockdev_nbd_new(const struct nbdc_config *cfg, const struct blockdev_nbd_opts *opts,
			   GError **error)
{
	g_return_val_if_fail(cfg != NULL, NULL);
	return nbddev_new(cfg, opts, FALSE, NULL, error);
}

Blockdev *blockdev_nbd_open(const struct nbdc_config *cfg, const struct blockdev_nbd_opts *opts,
			    const struct nbdc_export *known, GError **error)
{
	g_return_val_if_fail(cfg != NULL, NULL);
	return nbddev_new(cfg, opts, TRUE, known, error);
}
