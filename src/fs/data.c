/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* data.c: the data path: open and release, read, write, fallocate, flush,
 * fsync, lseek(SEEK_DATA/SEEK_HOLE), syncfs.
 *
 * Each request is handed to the block layer on the loop that read it and
 * answered from the completion, on the loop of the NBD connection that
 * served it (or at once, when the block layer completes inline): no thread
 * waits for a request.  A read is received straight into its reply buffer
 * (FS_REPLY_HDR bytes of header room, then the data: one write(2) answers
 * it); a write is sent to the server straight from the buffer /dev/fuse
 * delivered it in.  fs->inflight and export->inflight count the requests
 * in flight for the stop (stop.c).
 *
 * Flushes and lost writes.  Every completed write or zero (but FUA ones,
 * which are durable) bumps export->write_gen; a successful flush records the
 * generation it covered in export->clean_gen, so the stop flushes only
 * exports with unflushed writes.  When the block layer reports that
 * acknowledged writes were lost (a server restarted before a flush and the
 * replay failed: blockdev_health.lost_writes_seq moved), the next flush
 * through every handle that wrote fails with EIO, once, as Linux's errseq
 * does for a disk.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fs-internal.h"

/* ---- Accounting ---------------------------------------------------------- */

void fs_inflight_begin(Fs *fs, struct fs_export *ex)
{
	g_atomic_int_inc(&fs->inflight);
	if (ex)
		g_atomic_int_inc(&ex->inflight);
}

/* Wakes the stop when it watches (either it sees the counts at 0 or we see
 * it stopping: both sides use sequentially consistent atomics). */
static void stop_wake(Fs *fs)
{
	if (g_atomic_int_get(&fs->stopping)) {
		g_mutex_lock(&fs->stop_lock);
		g_cond_broadcast(&fs->stop_cond);
		g_mutex_unlock(&fs->stop_lock);
	}
}

void fs_inflight_end(Fs *fs, struct fs_export *ex)
{
	if (ex)
		g_atomic_int_add(&ex->inflight, -1);
	g_assert(g_atomic_int_get(&fs->inflight) > 0);
	g_atomic_int_add(&fs->inflight, -1);
	stop_wake(fs);
}

int fs_io_errno(ssize_t result)
{
	switch ((int)-result) {
	case ENOSPC:
	case EROFS:
	case EINVAL:
	case EOPNOTSUPP:
	case ENOMEM:
	case ENXIO:
		return (int)-result;
	default:
		return EIO; /* -ENOTCONN after giving up, -EPROTO, -ETIMEDOUT... */
	}
}

static void stats_add(guint64 *counter, guint64 n)
{
	__atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

/* ---- Open and release ----------------------------------------------------- */

void fs_op_open(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_node *node = fs_get_node(fs, q->nodeid);
	if (node == NULL) {
		fs_reply_err(r, ENOENT);
		return;
	}
	gboolean writable = (q->open.flags & O_ACCMODE) != O_RDONLY;
	int err = 0;
	g_mutex_lock(&fs->lock);
	if (!node->in_tree)
		err = ENOENT;
	else if (writable && node->read_only)
		err = EROFS;
	if (err == 0)
		node->open_count++;
	g_mutex_unlock(&fs->lock);
	if (err) {
		fs_node_unref(node);
		fs_reply_err(r, err);
		return;
	}
	struct fs_handle *h = g_new0(struct fs_handle, 1);
	struct blockdev_health health;
	h->node = node;
	h->writable = writable;
	h->sync = (q->open.flags & (O_SYNC | O_DSYNC)) != 0;
	h->direct_io = (q->open.flags & O_DIRECT) != 0 || fs->cfg.direct_io;
	blockdev_get_health(node->dev, &health);
	h->errseq = health.lost_writes_seq;
	g_mutex_lock(&fs->lock);
	g_hash_table_add(fs->handles, h);
	g_mutex_unlock(&fs->lock);
	/* An open file keeps its export's connection (opened now if needed). */
	blockdev_hold(node->dev, TRUE);

	struct fuse_open_out out = { .fh = (uintptr_t)h };
	/* O_DIRECT opens bypass the page cache, and direct writes to one file
	 * may run in parallel (the kernel would serialise them on the inode).
	 * Read-only handles need no FLUSH at close. */
	if (h->direct_io)
		out.open_flags |= FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
	if (!writable && !fs->cfg.writeback)
		out.open_flags |= FOPEN_NOFLUSH;
	if (fs_reply(r, &out, sizeof(out)) == -ENOENT)
		fs_handle_free(fs, h); /* interrupted: the kernel will not release it */
}

void fs_handle_free(Fs *fs, struct fs_handle *h)
{
	g_mutex_lock(&fs->lock);
	g_assert(h->node->open_count > 0);
	h->node->open_count--;
	g_hash_table_remove(fs->handles, h);
	g_cond_broadcast(&fs->closed_cond);
	g_mutex_unlock(&fs->lock);
	blockdev_hold(h->node->dev, FALSE);
	fs_node_unref(h->node);
	g_free(h);
}

static void handle_free_key(Fs *fs, gpointer key)
{
	fs_handle_free(fs, key);
}

void fs_free_handles(Fs *fs)
{
	fs_each_key(fs, fs->handles, handle_free_key);
}

/* ---- Flush ----------------------------------------------------------------- */

struct export_flush {
	Fs *fs;
	struct fs_export *ex;
	int gen; /* the write_gen this flush covers */
	blockdev_done_fn done;
	void *opaque;
};

static void export_flush_done(void *opaque, int err)
{
	struct export_flush *f = opaque;
	struct fs_export *ex = f->ex;
	if (err == 0) {
		/* clean_gen = max(clean_gen, gen), in generation order */
		for (;;) {
			int cur = g_atomic_int_get(&ex->clean_gen);
			if (f->gen - cur <= 0 ||
			    g_atomic_int_compare_and_exchange(&ex->clean_gen, cur, f->gen))
				break;
		}
	}
	f->done(f->opaque, err);
	g_free(f);
}

void fs_export_flush(Fs *fs, struct fs_export *ex, blockdev_done_fn done, void *opaque)
{
	struct export_flush *f = g_new(struct export_flush, 1);
	f->fs = fs;
	f->ex = ex;
	f->gen = g_atomic_int_get(&ex->write_gen);
	f->done = done;
	f->opaque = opaque;
	blockdev_flush(ex->root, export_flush_done, f);
}

/* A flush in flight for flush/fsync/release. */
struct fs_flush {
	Fs *fs;
	struct fs_req req;
	struct fs_handle *h;
	gboolean release; /* free the handle after the reply */
};

static void flush_done(void *opaque, int err)
{
	struct fs_flush *f = opaque;
	Fs *fs = f->fs;
	struct fs_handle *h = f->h;
	struct fs_export *ex = h->node->export;
	struct blockdev_health health;

	blockdev_get_health(h->node->dev, &health);
	if (health.lost_writes_seq != h->errseq) {
		h->errseq = health.lost_writes_seq;
		if (g_atomic_int_get(&h->wrote) && err == 0) {
			g_warning("%s: acknowledged writes were lost by the server before a "
				  "flush: this flush fails with EIO",
				  h->node->name);
			err = -EIO;
		}
	}
	if (err < 0)
		g_warning("%s: flush: %s", h->node->name, g_strerror(-err));
	fs_reply_err(&f->req, err < 0 ? fs_io_errno(err) : 0);
	if (f->release)
		fs_handle_free(fs, h);
	g_free(f);
	fs_inflight_end(fs, ex);
}

static void start_flush(Fs *fs, struct fs_req *r, struct fs_handle *h, gboolean release)
{
	struct fs_flush *f = g_new0(struct fs_flush, 1);
	f->fs = fs;
	f->req = *r;
	f->h = h;
	f->release = release;
	fs_inflight_begin(fs, h->node->export);
	fs_export_flush(fs, h->node->export, flush_done, f);
}

void fs_op_flush(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_handle *h = fs_handle_of(q->release.fh);
	if (g_atomic_int_compare_and_exchange(&h->dirty, 1, 0))
		start_flush(fs, r, h, FALSE);
	else
		fs_reply_err(r, 0);
}

void fs_op_release(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_handle *h = fs_handle_of(q->release.fh);
	if (g_atomic_int_compare_and_exchange(&h->dirty, 1, 0)) {
		start_flush(fs, r, h, TRUE);
		return;
	}
	fs_handle_free(fs, h);
	fs_reply_err(r, 0);
}

void fs_op_fsync(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_handle *h = fs_handle_of(q->release.fh);
	g_atomic_int_set(&h->dirty, 0);
	start_flush(fs, r, h, FALSE);
}

/* syncfs(2) on the mount: every export with unflushed writes, in parallel. */
struct fs_syncfs {
	Fs *fs;
	struct fs_req req;
	gint pending;
	gint err;
};

static void syncfs_done(void *opaque, int err)
{
	struct fs_syncfs *s = opaque;
	if (err < 0)
		g_atomic_int_compare_and_exchange(&s->err, 0, err);
	if (!g_atomic_int_dec_and_test(&s->pending))
		return;
	Fs *fs = s->fs;
	int e = g_atomic_int_get(&s->err);
	fs_reply_err(&s->req, e < 0 ? fs_io_errno(e) : 0);
	g_free(s);
	fs_inflight_end(fs, NULL);
}

void fs_op_syncfs(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_syncfs *s = g_new0(struct fs_syncfs, 1);
	s->fs = fs;
	s->req = *r;
	s->pending = 1;
	fs_inflight_begin(fs, NULL);
	g_mutex_lock(&fs->lock);
	g_autoptr(GPtrArray) dirty = g_ptr_array_new();
	for (guint i = 0; i < fs->export_data->len; i++) {
		struct fs_export *ex = fs->export_data->pdata[i];
		if (g_atomic_int_get(&ex->write_gen) != g_atomic_int_get(&ex->clean_gen))
			g_ptr_array_add(dirty, ex);
	}
	g_mutex_unlock(&fs->lock);
	g_atomic_int_add(&s->pending, (gint)dirty->len);
	for (guint i = 0; i < dirty->len; i++)
		fs_export_flush(fs, dirty->pdata[i], syncfs_done, s);
	syncfs_done(s, 0);
}

/* ---- Read -------------------------------------------------------------------- */

struct fs_read {
	Fs *fs;
	struct fs_req req;
	struct fs_node *node; /* ref */
	uint8_t *buf;	      /* FS_REPLY_HDR + data */
	gboolean pooled;      /* @buf came from fs_buf_get */
};

/* Small reads get a buffer of their own size; large ones a request buffer
 * from the free list (1 MiB: malloc would map and unmap each). */
#define READ_POOLED_FROM (64u * 1024)

static void read_done(void *opaque, ssize_t result)
{
	struct fs_read *rd = opaque;
	Fs *fs = rd->fs;
	struct fs_node *node = rd->node;
	struct fs_export *ex = node->export;

	g_atomic_int_add(&node->stats.in_flight, -1);
	if (result < 0) {
		stats_add(&node->stats.errors, 1);
		g_debug("%s: read: %s", node->name, g_strerror((int)-result));
		fs_reply_err(&rd->req, fs_io_errno(result));
	} else {
		stats_add(&node->stats.reads, 1);
		stats_add(&node->stats.bytes_read, (guint64)result);
		fs_reply_data(&rd->req, rd->buf, (size_t)result);
	}
	if (rd->pooled)
		fs_buf_put(fs, rd->buf);
	else
		g_free(rd->buf);
	fs_node_unref(node);
	g_free(rd);
	fs_inflight_end(fs, ex);
}

void fs_op_read(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_handle *h = fs_handle_of(q->read.fh);
	struct fs_node *node = h->node;
	size_t size = MIN((size_t)q->read.size, (size_t)FUSEP_MAX_IO);
	uint64_t off = q->read.offset;

	if (off >= node->info.size || size == 0) {
		fs_reply(r, NULL, 0);
		return;
	}
	gboolean pooled = size >= READ_POOLED_FROM;
	uint8_t *buf = pooled ? fs_buf_get(fs) : g_try_malloc(FS_REPLY_HDR + size);
	if (buf == NULL) {
		stats_add(&node->stats.errors, 1);
		fs_reply_err(r, ENOMEM);
		return;
	}
	struct fs_read *rd = g_new(struct fs_read, 1);
	rd->fs = fs;
	rd->req = *r;
	rd->node = fs_node_ref(node);
	rd->pooled = pooled;
	rd->buf = buf;
	if (!h->direct_io && !(q->read.flags & O_DIRECT))
		fs_cache_mark(node, off, size);
	g_atomic_int_inc(&node->stats.in_flight);
	fs_inflight_begin(fs, node->export);
	blockdev_pread_bytes(node->dev, rd->buf + FS_REPLY_HDR, size, off, read_done, rd);
}

/* ---- Write and zero ------------------------------------------------------------ */

static void io_reply(struct fs_io *io)
{
	if (io->result < 0) {
		g_debug("%s: %s at %" G_GUINT64_FORMAT ": %s", io->node->name,
			io->kind == FS_IO_WRITE ? "write" : "zero",
			io->abs_start - io->node->start_byte, g_strerror((int)-io->result));
		fs_reply_err(&io->req, fs_io_errno(io->result));
	} else if (io->kind == FS_IO_WRITE) {
		struct fuse_write_out out = { .size = (uint32_t)io->result };
		fs_reply(&io->req, &out, sizeof(out));
	} else {
		fs_reply_err(&io->req, 0);
	}
}

static void io_release(struct fs_io *io)
{
	Fs *fs = io->fs;
	struct fs_export *ex = io->node->export;
	fs_io_free(io);
	fs_inflight_end(fs, ex);
}

static void io_bytes_done(void *opaque, ssize_t result)
{
	struct fs_io *io = opaque;
	struct fs_node *node = io->node;
	io->result = result;
	g_atomic_int_add(&node->stats.in_flight, -1);
	if (result < 0) {
		stats_add(&node->stats.errors, 1);
	} else if (io->kind == FS_IO_WRITE) {
		stats_add(&node->stats.writes, 1);
		stats_add(&node->stats.bytes_written, (guint64)result);
	}
	/* Unflushed now, unless FUA made it durable (a failed write may have
	 * reached the server in part: unflushed too).  Before the reply, so
	 * that a flush asked for after it covers it. */
	if (!io->fua || result < 0)
		g_atomic_int_inc(&node->export->write_gen);
	fs_io_complete(io, io_reply, io_release);
}

static struct fs_io *io_new(Fs *fs, struct fs_req *r, struct fs_handle *h, int kind, uint64_t off,
			    size_t len)
{
	struct fs_io *io = g_new0(struct fs_io, 1);
	io->fs = fs;
	io->req = *r;
	io->node = fs_node_ref(h->node);
	io->kind = kind;
	io->len = len;
	io->abs_start = h->node->start_byte + off;
	io->abs_end = io->abs_start + len;
	io->direct = h->direct_io;
	return io;
}

void fs_op_write(Fs *fs, struct fs_req *r, const struct fusep_req *q, uint8_t **bufp)
{
	struct fs_handle *h = fs_handle_of(q->write.fh);
	struct fs_node *node = h->node;
	if (node->read_only) {
		fs_reply_err(r, EROFS);
		return;
	}
	size_t size = q->write.size;
	uint64_t off = q->write.offset;
	struct fs_io *io = io_new(fs, r, h, FS_IO_WRITE, off, size);
	io->buf = *bufp; /* the payload stays where the kernel put it */
	*bufp = NULL;
	io->data = q->write.data;
	io->fua = h->sync || (q->write.flags & (O_SYNC | O_DSYNC));
	if (!h->direct_io && !(q->write.flags & O_DIRECT))
		fs_cache_mark(node, off, size);
	g_atomic_int_set(&h->dirty, 1);
	g_atomic_int_set(&h->wrote, 1);
	g_atomic_int_inc(&node->stats.in_flight);
	fs_inflight_begin(fs, node->export);
	fs_io_register(io);
	blockdev_pwrite_bytes(node->dev, io->data, size, off, io->fua ? BLOCKDEV_FUA : 0,
			      io_bytes_done, io);
}

void fs_op_fallocate(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_handle *h = fs_handle_of(q->fallocate.fh);
	struct fs_node *node = h->node;
	uint32_t mode = q->fallocate.mode, flags;
	if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
		flags = BLOCKDEV_MAY_TRIM;
	else if ((mode & ~(uint32_t)FALLOC_FL_KEEP_SIZE) == FALLOC_FL_ZERO_RANGE)
		flags = 0;
	else {
		fs_reply_err(r, EOPNOTSUPP);
		return;
	}
	uint64_t offset = q->fallocate.offset, length = q->fallocate.length;
	if ((int64_t)offset < 0 || (int64_t)length <= 0) {
		fs_reply_err(r, EINVAL);
		return;
	}
	if (node->read_only) {
		fs_reply_err(r, EROFS);
		return;
	}
	uint64_t size = node->info.size;
	if (offset >= size) {
		fs_reply_err(r, 0);
		return;
	}
	uint64_t len = MIN(length, size - offset);
	struct fs_io *io = io_new(fs, r, h, FS_IO_ZERO, offset, len);
	io->fua = h->sync;
	if (io->fua)
		flags |= BLOCKDEV_FUA;
	g_atomic_int_set(&h->dirty, 1);
	g_atomic_int_set(&h->wrote, 1);
	g_atomic_int_inc(&node->stats.in_flight);
	fs_inflight_begin(fs, node->export);
	fs_io_register(io);
	blockdev_zero_bytes(node->dev, offset, len, flags, io_bytes_done, io);
}

/* ---- lseek(SEEK_DATA / SEEK_HOLE) ---------------------------------------------
 * A state machine over block status queries of at most 1 GiB, answered from
 * the last completion.  A query the block layer completes inline (memory
 * devices, immediate errors) is continued by the caller's loop, not by
 * recursion: @phase says who goes on. */

enum { SEEK_ISSUING, SEEK_DONE_INLINE, SEEK_ASYNC };

struct fs_seek {
	Fs *fs;
	struct fs_req req;
	struct fs_node *node; /* ref */
	int whence;
	uint64_t off, size, pos;
	uint64_t found;	  /* result, UINT64_MAX while not found */
	uint64_t covered; /* end of the last extent seen */
	int err;
	gint phase;
};

static void seek_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct fs_seek *s = opaque;
	uint64_t end = offset + length;
	if (end > s->covered)
		s->covered = end;
	if (s->found != UINT64_MAX || end <= s->pos)
		return;
	gboolean hole = (flags & BLOCKDEV_STATE_HOLE) != 0;
	if ((s->whence == SEEK_DATA) != hole)
		s->found = MAX(offset, s->pos);
}

static void seek_finish(struct fs_seek *s, int err, uint64_t result)
{
	Fs *fs = s->fs;
	struct fs_export *ex = s->node->export;
	if (err)
		fs_reply_err(&s->req, err);
	else {
		struct fuse_lseek_out out = { .offset = result };
		fs_reply(&s->req, &out, sizeof(out));
	}
	fs_node_unref(s->node);
	g_free(s);
	fs_inflight_end(fs, ex);
}

/* What the last query gave: TRUE when @s was answered (and freed). */
static gboolean seek_result(struct fs_seek *s)
{
	if (s->err == -EOPNOTSUPP) {
		/* No block status: all data, one hole at the end. */
		seek_finish(s, 0, s->whence == SEEK_DATA ? s->off : s->size);
		return TRUE;
	}
	if (s->err < 0) {
		seek_finish(s, fs_io_errno(s->err), 0);
		return TRUE;
	}
	if (s->found != UINT64_MAX && s->found < s->size) {
		seek_finish(s, 0, s->found);
		return TRUE;
	}
	if (s->found == UINT64_MAX && s->covered <= s->pos) {
		/* No progress: treat the rest as data. */
		seek_finish(s, 0, s->whence == SEEK_DATA ? s->pos : s->size);
		return TRUE;
	}
	s->pos = s->found != UINT64_MAX ? s->size : s->covered;
	return FALSE;
}

static void seek_run(struct fs_seek *s);

static void seek_done(void *opaque, int err)
{
	struct fs_seek *s = opaque;
	s->err = err;
	if (g_atomic_int_compare_and_exchange(&s->phase, SEEK_ISSUING, SEEK_DONE_INLINE))
		return; /* the issuer goes on */
	if (!seek_result(s))
		seek_run(s);
}

static void seek_run(struct fs_seek *s)
{
	uint32_t ss = s->node->info.sector_size;
	for (;;) {
		if (s->pos >= s->size) {
			if (s->whence == SEEK_DATA)
				seek_finish(s, ENXIO, 0);
			else
				seek_finish(s, 0, s->size);
			return;
		}
		uint64_t sector = s->pos / ss;
		uint64_t count = (s->size - sector * ss + ss - 1) / ss;
		count = MIN(count, (uint64_t)(1u << 30) / ss); /* 1 GiB a query */
		s->covered = sector * ss;
		s->found = UINT64_MAX;
		s->err = 0;
		g_atomic_int_set(&s->phase, SEEK_ISSUING);
		blockdev_block_status(s->node->dev, sector, count, seek_extent, seek_done, s);
		if (g_atomic_int_compare_and_exchange(&s->phase, SEEK_ISSUING, SEEK_ASYNC))
			return; /* seek_done goes on */
		if (seek_result(s))
			return;
	}
}

void fs_op_lseek(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fs_handle *h = fs_handle_of(q->lseek.fh);
	struct fs_node *node = h->node;
	uint64_t off = q->lseek.offset;
	if (q->lseek.whence != SEEK_DATA && q->lseek.whence != SEEK_HOLE) {
		fs_reply_err(r, EINVAL);
		return;
	}
	if ((int64_t)off < 0 || off >= node->info.size) {
		fs_reply_err(r, ENXIO);
		return;
	}
	struct fs_seek *s = g_new0(struct fs_seek, 1);
	s->fs = fs;
	s->req = *r;
	s->node = fs_node_ref(node);
	s->whence = (int)q->lseek.whence;
	s->off = s->pos = off;
	s->size = node->info.size;
	fs_inflight_begin(fs, node->export);
	seek_run(s);
}
