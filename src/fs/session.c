/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* session.c: the FUSE session on /dev/fuse, served by the event loops.
 *
 * libfuse mounts (options, fusermount3, mount.fuse3); from then on nbdfs
 * speaks the kernel protocol itself, as QEMU's FUSE export does.  Each loop
 * of the LoopSet gets a channel: a descriptor cloned from the session's
 * (FUSE_DEV_IOC_CLONE), non-blocking, watched for EPOLLIN.  All channels
 * share the kernel's one input queue, so whichever loop is free takes the
 * next request; a reply must go back on the descriptor that read its
 * request, which any thread may write (write(2) on /dev/fuse is atomic).
 *
 * A loop reads up to READS_PER_TURN requests a turn, each into a buffer of
 * FUSEP_BUF_SIZE bytes, decodes it (codec.c) and runs its operation there:
 * metadata is answered at once from the tree; data requests go to the block
 * layer, whose NBD requests the loop sends together at the end of its turn,
 * and are answered from the completion, on the loop of the NBD connection.
 * A WRITE keeps its buffer (the payload is sent to the server from it, no
 * copy) and the channel takes a fresh one from the free list.  Nothing here
 * blocks a loop, except kernel notifications, which are never sent from a
 * loop (coherence.c, xattr.c send them from the blocking pool).
 *
 * With -d every request is one log line when it is answered:
 *   fuse: READ ino=2 fh=0x... off=0 size=4096 -> 4096 (38 us)
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fs-internal.h"

#define READS_PER_TURN 16
#define STARVED_RETRY_MS 10
/* A channel that read no request for this long, with none in flight
 * anywhere, gives the memory of the last burst back (fs_bufs_tidy). */
#define TIDY_AFTER_MS 2000
#define MAX_BACKGROUND 64
#define CONGESTION_THRESHOLD 48

#ifndef FUSE_DEV_IOC_CLONE
#define FUSE_DEV_IOC_CLONE _IOR(229, 0, uint32_t)
#endif

/* ---- Dispatch --------------------------------------------------------------- */

/* -d: the request's arguments, for its log line. */
static char *describe(const struct fusep_req *q)
{
	GString *s = g_string_new(NULL);
	g_string_printf(s, "ino=%" G_GUINT64_FORMAT, q->nodeid);
	switch (q->opcode) {
	case FUSE_LOOKUP:
	case FUSE_REMOVEXATTR:
		g_string_append_printf(s, " name=%s", q->lookup.name);
		break;
	case FUSE_READ:
	case FUSE_READDIR:
		g_string_append_printf(s, " off=%" G_GUINT64_FORMAT " size=%u", q->read.offset,
				       q->read.size);
		break;
	case FUSE_WRITE:
		g_string_append_printf(s, " off=%" G_GUINT64_FORMAT " size=%u%s", q->write.offset,
				       q->write.size,
				       (q->write.write_flags & FUSE_WRITE_CACHE) ? " cache" : "");
		break;
	case FUSE_OPEN:
	case FUSE_OPENDIR:
		g_string_append_printf(s, " flags=0%o", q->open.flags);
		break;
	case FUSE_GETXATTR:
		g_string_append_printf(s, " name=%s size=%u", q->getxattr.name, q->getxattr.size);
		break;
	case FUSE_LISTXATTR:
		g_string_append_printf(s, " size=%u", q->getxattr.size);
		break;
	case FUSE_SETXATTR:
		g_string_append_printf(s, " name=%s size=%u", q->setxattr.name, q->setxattr.size);
		break;
	case FUSE_FALLOCATE:
		g_string_append_printf(
			s, " mode=0x%x off=%" G_GUINT64_FORMAT " len=%" G_GUINT64_FORMAT,
			q->fallocate.mode, q->fallocate.offset, q->fallocate.length);
		break;
	case FUSE_LSEEK:
		g_string_append_printf(s, " off=%" G_GUINT64_FORMAT " whence=%u", q->lseek.offset,
				       q->lseek.whence);
		break;
	case FUSE_INTERRUPT:
		g_string_append_printf(s, " unique=%" G_GUINT64_FORMAT, q->interrupt.unique);
		break;
	default:
		break;
	}
	return g_string_free(s, FALSE);
}

static void session_ended(Fs *fs)
{
	if (!g_atomic_int_compare_and_exchange(&fs->ended, 0, 1))
		return;
	uint64_t one = 1;
	if (write(fs->end_fd, &one, sizeof(one)) < 0) {
		/* an eventfd write of 1 cannot fail short of a bug */
	}
	g_mutex_lock(&fs->stop_lock);
	g_cond_broadcast(&fs->stop_cond);
	g_mutex_unlock(&fs->stop_lock);
}

static void do_init(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fusep_init_cfg cfg = { .writeback = fs->cfg.writeback,
				      .max_background = MAX_BACKGROUND,
				      .congestion_threshold = CONGESTION_THRESHOLD };
	struct fuse_init_out out;
	if (fusep_init_reply(q, &cfg, &out) < 0) {
		g_warning("the kernel speaks FUSE %u.%u; nbdfs needs %u.%u or later", q->init.major,
			  q->init.minor, FUSEP_MAJOR, FUSEP_MIN_MINOR);
		fs_reply_err(r, EPROTO);
		return;
	}
	if (fs->cfg.writeback && !(out.flags & FUSE_WRITEBACK_CACHE))
		g_warning("writeback: the kernel has no writeback cache for FUSE");
	fs->proto_minor = out.minor;
	g_debug("FUSE %u.%u: kernel offers flags 0x%" G_GINT64_MODIFIER "x, taking 0x%x/0x%x",
		q->init.major, q->init.minor, q->init.flags, out.flags, out.flags2);
	/* Only the fields this minor knows (all of them from 7.23 on). */
	fs_reply(r, &out, sizeof(out));
	g_atomic_int_set(&fs->initialized, 1);
}

static void dispatch(struct fs_chan *ch, size_t n)
{
	Fs *fs = ch->fs;
	struct fusep_req q;
	int rc = fusep_decode(ch->buf, n, &q);
	struct fs_req r = { .ch = ch, .unique = q.unique, .nodeid = q.nodeid, .opcode = q.opcode };

	if (rc == -EPROTO) {
		g_warning("FUSE: a request of %zu bytes with a bad header: dropped", n);
		return;
	}
	if (fs->cfg.debug) {
		r.t0 = g_get_monotonic_time();
		r.what = rc == 0 ? describe(&q) : g_strdup("(malformed)");
	}
	if (rc < 0) {
		fs_reply_err(&r, EINVAL);
		return;
	}
	if (q.opcode != FUSE_INIT && !g_atomic_int_get(&fs->initialized)) {
		fs_reply_err(&r, EIO);
		return;
	}
	switch (q.opcode) {
	case FUSE_INIT:
		do_init(fs, &r, &q);
		break;
	case FUSE_DESTROY:
		fs_reply_err(&r, 0);
		break;
	case FUSE_INTERRUPT:
		/* Every request ends within its deadline anyway: no reply. */
		fs_reply_none(&r);
		break;
	case FUSE_LOOKUP:
		fs_op_lookup(fs, &r, &q);
		break;
	case FUSE_FORGET:
		fs_op_forget(fs, &r, &q);
		break;
	case FUSE_BATCH_FORGET:
		fs_op_batch_forget(fs, &r, &q);
		break;
	case FUSE_GETATTR:
		fs_op_getattr(fs, &r, &q);
		break;
	case FUSE_SETATTR:
		fs_op_setattr(fs, &r, &q);
		break;
	case FUSE_STATFS:
		fs_op_statfs(fs, &r, &q);
		break;
	case FUSE_OPENDIR:
		fs_op_opendir(fs, &r, &q);
		break;
	case FUSE_READDIR:
		fs_op_readdir(fs, &r, &q);
		break;
	case FUSE_RELEASEDIR:
		fs_op_releasedir(fs, &r, &q);
		break;
	case FUSE_FSYNCDIR:
		fs_reply_err(&r, 0);
		break;
	case FUSE_OPEN:
		fs_op_open(fs, &r, &q);
		break;
	case FUSE_RELEASE:
		fs_op_release(fs, &r, &q);
		break;
	case FUSE_READ:
		fs_op_read(fs, &r, &q);
		break;
	case FUSE_WRITE:
		fs_op_write(fs, &r, &q, &ch->buf);
		break;
	case FUSE_FLUSH:
		fs_op_flush(fs, &r, &q);
		break;
	case FUSE_FSYNC:
		fs_op_fsync(fs, &r, &q);
		break;
	case FUSE_FALLOCATE:
		fs_op_fallocate(fs, &r, &q);
		break;
	case FUSE_LSEEK:
		fs_op_lseek(fs, &r, &q);
		break;
	case FUSE_SYNCFS:
		fs_op_syncfs(fs, &r, &q);
		break;
	case FUSE_SETXATTR:
		fs_op_setxattr(fs, &r, &q);
		break;
	case FUSE_GETXATTR:
		fs_op_getxattr(fs, &r, &q);
		break;
	case FUSE_LISTXATTR:
		fs_op_listxattr(fs, &r, &q);
		break;
	case FUSE_REMOVEXATTR:
		fs_op_removexattr(fs, &r, &q);
		break;
	/* The tree is not a place for new names. */
	case FUSE_MKNOD:
	case FUSE_MKDIR:
	case FUSE_UNLINK:
	case FUSE_RMDIR:
	case FUSE_RENAME:
	case FUSE_RENAME2:
	case FUSE_LINK:
	case FUSE_SYMLINK:
	case FUSE_CREATE:
	case FUSE_TMPFILE:
		fs_reply_err(&r, EPERM);
		break;
	case FUSE_READLINK:
		fs_reply_err(&r, EINVAL);
		break;
	default:
		/* Locks (the kernel keeps them locally), ioctl, poll, bmap,
		 * copy_file_range (the kernel copies), statx, ...: not ours. */
		fs_reply_err(&r, ENOSYS);
		break;
	}
}

static void on_readable(void *opaque, uint32_t events);

/* Memory came back (or may have): read requests again. */
static void retry_reading(void *opaque)
{
	struct fs_chan *ch = opaque;
	if (ch->w.loop)
		loop_watch_mod(&ch->w, EPOLLIN);
}

/* No buffer for the next request: stop watching for a while (the kernel
 * keeps the requests queued) instead of spinning; said once. */
static void starve(struct fs_chan *ch)
{
	if (!ch->starved)
		g_warning("out of memory for a %u-byte FUSE request buffer: not reading "
			  "requests for %d ms at a time until memory is available",
			  FUSEP_BUF_SIZE, STARVED_RETRY_MS);
	ch->starved = TRUE;
	loop_watch_mod(&ch->w, 0);
	loop_timer_start(ch->loop, &ch->retry, g_get_monotonic_time() + STARVED_RETRY_MS * 1000,
			 retry_reading, ch);
}

/* @ch's tidy timer: quiet since it was armed? */
static void tidy(void *opaque)
{
	struct fs_chan *ch = opaque;
	if (ch->nread != ch->nread_tidy) {
		ch->nread_tidy = ch->nread;
		loop_timer_start(ch->loop, &ch->tidy, g_get_monotonic_time() + TIDY_AFTER_MS * 1000,
				 tidy, ch);
	} else if (g_atomic_int_get(&ch->fs->inflight) == 0) {
		fs_bufs_tidy(ch->fs);
	}
}

static void on_readable(void *opaque, uint32_t events)
{
	struct fs_chan *ch = opaque;
	Fs *fs = ch->fs;

	if (!loop_timer_armed(&ch->tidy)) {
		ch->nread_tidy = ch->nread;
		loop_timer_start(ch->loop, &ch->tidy, g_get_monotonic_time() + TIDY_AFTER_MS * 1000,
				 tidy, ch);
	}

	for (int i = 0; i < READS_PER_TURN; i++) {
		if (ch->buf == NULL && (ch->buf = fs_buf_get(fs)) == NULL) {
			starve(ch);
			return;
		}
		ch->starved = FALSE;
		ssize_t n = read(ch->fd, ch->buf, FUSEP_BUF_SIZE);
		if (n < 0) {
			if (errno == EINTR || errno == ENOENT)
				continue; /* ENOENT: interrupted before it was read */
			if (errno == EAGAIN)
				return;
			if (errno != ENODEV)
				g_warning("reading /dev/fuse: %s", g_strerror(errno));
			loop_timer_stop(&ch->tidy);
			loop_watch_del(&ch->w);
			session_ended(fs);
			return;
		}
		ch->nread++;
		dispatch(ch, (size_t)n);
	}
}

/* ---- Channels ---------------------------------------------------------------- */

static void chan_attach(void *opaque)
{
	struct fs_chan *ch = opaque;
	int r = loop_watch_add(ch->loop, &ch->w, ch->fd, EPOLLIN, on_readable, ch);
	completion_done(ch->sync, r);
}

static void chan_detach(void *opaque)
{
	struct fs_chan *ch = opaque;
	loop_timer_stop(&ch->retry);
	loop_timer_stop(&ch->tidy);
	loop_watch_del(&ch->w);
	completion_done(ch->sync, 0);
}

/* Runs @fn(@ch) on the channel's loop and waits for it; its result. */
static int on_chan_loop(struct fs_chan *ch, loop_fn fn)
{
	ch->sync = completion_new();
	loop_post_task(ch->loop, &ch->task, fn, ch);
	int r = (int)completion_wait(ch->sync);
	completion_unref(ch->sync);
	ch->sync = NULL;
	return r;
}

static int clone_fd(int session_fd, GError **error)
{
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
			    "opening /dev/fuse: %s", g_strerror(errno));
		return -1;
	}
	uint32_t master = (uint32_t)session_fd;
	if (ioctl(fd, FUSE_DEV_IOC_CLONE, &master) < 0) {
		int e = errno;
		close(fd);
		g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(e),
			    "cloning the FUSE descriptor: %s", g_strerror(e));
		return -1;
	}
	return fd;
}

gboolean fs_serve(Fs *fs, LoopSet *loops, int fuse_fd, GError **error)
{
	g_return_val_if_fail(fs->chans->len == 0, FALSE);
	fs->loops = loops;
	for (guint i = 0; i < loop_set_size(loops); i++) {
		int fd = clone_fd(fuse_fd, error);
		if (fd < 0)
			goto fail;
		struct fs_chan *ch = g_new0(struct fs_chan, 1);
		ch->fs = fs;
		ch->loop = loop_set_get(loops, i);
		ch->fd = fd;
		g_ptr_array_add(fs->chans, ch);
		if (i == 0)
			fs->notify_fd = fd;
		int r = on_chan_loop(ch, chan_attach);
		if (r < 0) {
			g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
				    "watching /dev/fuse: %s", g_strerror(-r));
			goto fail;
		}
	}
	g_atomic_int_set(&fs->serving, 1);
	return TRUE;
fail:
	fs_unserve(fs);
	return FALSE;
}

int fs_ended_fd(Fs *fs)
{
	return fs->end_fd;
}

void fs_unserve(Fs *fs)
{
	g_atomic_int_set(&fs->serving, 0);
	for (guint i = 0; i < fs->chans->len; i++) {
		struct fs_chan *ch = fs->chans->pdata[i];
		if (ch->w.loop)
			on_chan_loop(ch, chan_detach);
	}
	/* A reply still owed would be written to a descriptor we closed (or
	 * to one that reused its number): with requests in flight (the stop
	 * gave up on them), keep the channels; the exit closes them. */
	if (g_atomic_int_get(&fs->inflight) > 0)
		return;
	for (guint i = 0; i < fs->chans->len; i++) {
		struct fs_chan *ch = fs->chans->pdata[i];
		fs_buf_put(fs, ch->buf);
		close(ch->fd);
		g_free(ch);
	}
	g_ptr_array_set_size(fs->chans, 0);
	fs->notify_fd = -1;
}

gboolean fs_idle(Fs *fs)
{
	return g_atomic_int_get(&fs->inflight) == 0;
}

/* Waits until a signal (@sigs, blocked in every thread) or the end of the
 * session (the file system was unmounted). */
void fs_wait_for_stop(Fs *fs, const sigset_t *sigs)
{
	int sfd = signalfd(-1, sigs, SFD_CLOEXEC);
	struct pollfd p[2] = { { .fd = sfd, .events = POLLIN },
			       { .fd = fs_ended_fd(fs), .events = POLLIN } };

	if (sfd < 0)
		g_warning("signalfd: %s", g_strerror(errno));
	for (;;) {
		int r = poll(sfd < 0 ? p + 1 : p, sfd < 0 ? 1 : 2, -1);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			g_warning("poll: %s", g_strerror(errno));
			break;
		}
		if (sfd >= 0 && (p[0].revents & POLLIN)) {
			struct signalfd_siginfo si;

			if (read(sfd, &si, sizeof(si)) == sizeof(si))
				g_info("%s: stopping", strsignal((int)si.ssi_signo));
			break;
		}
		if (p[sfd < 0 ? 0 : 1].revents)
			break;
	}
	if (sfd >= 0)
		close(sfd);
}

/* ---- The session state in the Fs (life.c creates and frees the Fs) ---- */

void fs_session_init(Fs *fs)
{
	fs->chans = g_ptr_array_new();
	fs->notify_fd = -1;
	fs->end_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	g_mutex_init(&fs->buf_lock);
	fs->free_bufs = g_ptr_array_new_with_free_func(g_free);
}

void fs_session_fini(Fs *fs)
{
	if (fs->chans->len > 0)
		fs_unserve(fs);
	g_ptr_array_unref(fs->chans);
	if (fs->end_fd >= 0)
		close(fs->end_fd);
	g_ptr_array_unref(fs->free_bufs);
	g_mutex_clear(&fs->buf_lock);
}
