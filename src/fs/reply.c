/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* reply.c: answering FUSE requests, notifying the kernel, request buffers.
 *
 * Replies may be written from any thread: each is one write(2) or writev(2)
 * on the descriptor that read the request (the kernel finds the request in
 * that descriptor's processing list).  Notifications may wait for page locks
 * in the kernel, so they are never written from a loop (see coherence.c).
 */
#include "config.h"

#include <errno.h>
#include <linux/fuse.h>
#include <malloc.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fs-internal.h"

#define FREE_BUFS_MAX 32

/* ---- Buffers --------------------------------------------------------------- */

uint8_t *fs_buf_get(Fs *fs)
{
	uint8_t *b = NULL;
	g_mutex_lock(&fs->buf_lock);
	if (fs->free_bufs->len > 0)
		b = g_ptr_array_steal_index_fast(fs->free_bufs, fs->free_bufs->len - 1);
	g_mutex_unlock(&fs->buf_lock);
	return b ? b : g_try_malloc(FUSEP_BUF_SIZE);
}

void fs_buf_put(Fs *fs, uint8_t *buf)
{
	if (buf == NULL)
		return;
	g_mutex_lock(&fs->buf_lock);
	if (fs->free_bufs->len < FREE_BUFS_MAX) {
		g_ptr_array_add(fs->free_bufs, buf);
		buf = NULL;
	}
	g_mutex_unlock(&fs->buf_lock);
	g_free(buf);
}

static void heap_trim(void *opaque)
{
	(void)opaque;
	malloc_trim(0);
}

void fs_bufs_tidy(Fs *fs)
{
	g_mutex_lock(&fs->buf_lock);
	GPtrArray *free_bufs = fs->free_bufs;
	fs->free_bufs = g_ptr_array_new_with_free_func(g_free);
	g_mutex_unlock(&fs->buf_lock);
	g_debug("quiet: %u free request buffers and the heap's unused pages go back",
		free_bufs->len);
	g_ptr_array_unref(free_bufs);
	loop_set_run_blocking(fs_loops(fs), heap_trim, NULL);
}

/* ---- Replies --------------------------------------------------------------- */

/* -d: "fuse: OP ARGS -> RESULT (N us)". */
static void log_reply(struct fs_req *r, int err, size_t bytes, gboolean data)
{
	char spare[16], result[32];
	gint64 dt = g_get_monotonic_time() - r->t0;
	if (err)
		g_strlcpy(result, strerrorname_np(err) ? strerrorname_np(err) : "error",
			  sizeof(result));
	else
		g_snprintf(result, sizeof(result), "%zu", data ? bytes : 0);
	g_debug("fuse: %s %s -> %s (%" G_GINT64_FORMAT " us)", fusep_opname(r->opcode, spare),
		r->what, result, dt);
	g_free(r->what);
	r->what = NULL;
}

static int written(struct fs_req *r, ssize_t w, size_t want)
{
	/* The application often asks again at once (dd, a QD1 reader). */
	Loop *cur = loop_current();
	if (cur)
		loop_expect(cur);
	if (w >= 0 && (size_t)w == want)
		return 0;
	int e = w < 0 ? errno : EIO;
	/* ENOENT: interrupted, the kernel no longer waits; ENODEV: unmounted. */
	if (e != ENOENT && e != ENODEV)
		g_warning("replying to FUSE request %" G_GUINT64_FORMAT ": %s", r->unique,
			  g_strerror(e));
	return -e;
}

static int reply_iov(struct fs_req *r, int err, const void *arg, size_t len)
{
	struct fuse_out_header h = { .len = (uint32_t)(sizeof(h) + (err ? 0 : len)),
				     .error = -err,
				     .unique = r->unique };
	struct iovec iov[2] = { { &h, sizeof(h) }, { (void *)arg, len } };
	int n = err || len == 0 ? 1 : 2;
	if (r->what) {
		size_t shown = len;
		if (r->opcode == FUSE_WRITE && !err && len == sizeof(struct fuse_write_out))
			shown = ((const struct fuse_write_out *)arg)->size;
		log_reply(r, err, shown, len > 0);
	}
	return written(r, writev(r->ch->fd, iov, n), h.len);
}

int fs_reply_err(struct fs_req *r, int err)
{
	return reply_iov(r, err, NULL, 0);
}

int fs_reply(struct fs_req *r, const void *arg, size_t len)
{
	return reply_iov(r, 0, arg, len);
}

int fs_reply_data(struct fs_req *r, uint8_t *buf, size_t len)
{
	struct fuse_out_header h = { .len = (uint32_t)(FS_REPLY_HDR + len),
				     .error = 0,
				     .unique = r->unique };
	memcpy(buf, &h, sizeof(h));
	if (r->what)
		log_reply(r, 0, len, TRUE);
	return written(r, write(r->ch->fd, buf, h.len), h.len);
}

void fs_reply_none(struct fs_req *r)
{
	g_free(r->what);
	r->what = NULL;
}

int fs_notify_inval_inode(Fs *fs, fs_ino_t ino, int64_t off, int64_t len)
{
	struct fusep_notify n;
	struct iovec iov[3];
	int cnt = fusep_notify_inval_inode(&n, ino, off, len, iov);
	g_assert(loop_current() == NULL);
	if (g_atomic_int_get(&fs->ended))
		return -ENODEV;
	return writev(fs->notify_fd, iov, cnt) < 0 ? -errno : 0;
}

int fs_notify_inval_entry(Fs *fs, fs_ino_t parent, const char *name)
{
	struct fusep_notify n;
	struct iovec iov[3];
	int cnt = fusep_notify_inval_entry(&n, parent, name, iov);
	g_assert(loop_current() == NULL);
	if (g_atomic_int_get(&fs->ended))
		return -ENODEV;
	return writev(fs->notify_fd, iov, cnt) < 0 ? -errno : 0;
}
