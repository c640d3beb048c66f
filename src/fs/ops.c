/* ops.c: the FUSE low-level operations of nbdfs.
 *
 * DESIGN
 *
 * Request lifecycle.  A FUSE request arrives on one of the session loop's
 * worker threads (fuse_session_loop_mt, clone_fd).  Metadata requests
 * (lookup, getattr, readdir, xattr, open) are answered on that thread from
 * the in-memory tree (tree.c).  Data requests (read, write, fallocate, flush,
 * fsync) are handed to the block layer and the worker returns at once: the
 * reply is sent from the block layer's completion callback, normally on the
 * NBD connection's reader thread (fuse_reply_buf / fuse_reply_write there).
 * No thread ever waits for one request, so a few FUSE threads keep the NBD
 * connections full.  Every request is answered exactly once: each one owns a
 * struct fs_io (or a flush context) that the completion frees after the
 * reply.  fs->inflight counts them, so teardown can wait until all are
 * answered before the session goes away; the NBD blockdev fails requests
 * after its timeout, so that wait is bounded and unmount always works.
 * Write data is copied out of the session's receive buffer (it is reused as
 * soon as the handler returns); read buffers are allocated per request (main()
 * tunes malloc so that these 1 MiB blocks are reused, not mapped and faulted
 * in each time).
 *
 * Thread model.  Session workers (up to max_threads), the NBD reader threads
 * of the block layer (run completions), and a small notify pool (g_thread_pool)
 * that sends cache invalidations.  Lock order: fs->part_lock, then fs->lock
 * (the tree), then export->wlock.  None is held across a reply or a kernel
 * notification, and completions take only fs->lock and export->wlock, which
 * no holder keeps while waiting for I/O.
 *
 * Cache coherence.  Files use the kernel page cache (not direct_io), so
 * readahead works and loop devices behave; O_DIRECT opens bypass it.  An
 * export file and its partition files alias the same bytes but are different
 * inodes with different page caches.  So when a write (or zero) through one
 * file completes, every other file of the same export whose byte range
 * overlaps the written range, and that may hold pages there, gets
 * fuse_lowlevel_notify_inval_inode() for the overlap, BEFORE the write is
 * answered: when write(2) returns, no alias can serve the old bytes.  Which
 * files may hold pages: each node keeps one byte range (cache_lo/cache_hi)
 * that every buffered read or write through it grows before it is sent, and
 * every invalidation shrinks.  O_DIRECT reads and writes create no pages and
 * do not grow it, so a direct-io loop device over a partition file does not
 * make writes to the export file pay an invalidation.  (A file that is not
 * open gives up its whole range at its first invalidation: nobody uses those
 * pages, and we never set keep_cache, so the kernel drops them at the next
 * open anyway.)
 *
 * Two deadlocks shape this:
 *  1. Invalidation waits for page locks.  A page of the alias may be locked by
 *     a read whose reply the NBD reader thread must deliver, so the reader
 *     thread never invalidates: such completions go to the notify pool.
 *  2. The kernel keeps the pages of a buffered write locked until the write is
 *     answered.  Two concurrent overlapping writes through two aliases would
 *     each wait for the other's pages.  So every write in flight is registered
 *     per export (export->writes); an invalidation that would touch pages a
 *     registered write on that alias holds is not done now but attached to
 *     that write (io->after) and done just after it is answered.  A write that
 *     arrives later sees the earlier one registered and defers to it, so the
 *     waits only ever point from older to newer writes and cannot form a cycle;
 *     the pool is unbounded so a waiting job never blocks another.
 * A zero (fallocate) also invalidates its own file's range, after its reply.
 * With -o writeback (FUSE_CAP_WRITEBACK_CACHE) the kernel caches writes and
 * nbdfs gives up alias coherence: no invalidations are sent.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "fs-internal.h"

#define FS_MAX_IO (1024 * 1024)
#define FS_TIMEOUT 1.0

static inline Fs *req_fs(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

/* An open file. */
struct fs_handle {
	struct fs_node *node;      /* ref */
	gboolean writable;
	gboolean sync;             /* O_SYNC / O_DSYNC: FUA writes */
	gboolean direct_io;        /* opened O_DIRECT: FOPEN_DIRECT_IO, no page cache */
	gint dirty;                /* written since the last flush (atomic) */
};

static inline struct fs_handle *fh(struct fuse_file_info *fi)
{
	return (struct fs_handle *)(uintptr_t)fi->fh;
}

/* fs->inflight is atomic: no lock on the I/O path.  Only once teardown has
 * set fs->draining does the last completion take the lock to wake it (both
 * sides use sequentially consistent atomics, so either the completion sees
 * draining or fs_shutdown sees the count at 0). */
void fs_inflight_begin(Fs *fs)
{
	g_atomic_int_inc(&fs->inflight);
}

void fs_inflight_end(Fs *fs)
{
	g_assert(g_atomic_int_get(&fs->inflight) > 0);
	if (g_atomic_int_dec_and_test(&fs->inflight) && g_atomic_int_get(&fs->draining)) {
		g_mutex_lock(&fs->inflight_lock);
		g_cond_broadcast(&fs->inflight_cond);
		g_mutex_unlock(&fs->inflight_lock);
	}
}

/* ---- Coherence --------------------------------------------------------- */

static void inval_clear(gpointer p)
{
	struct fs_inval *inv = p;
	fs_node_unref(inv->node);
}

static GArray *inval_array(void)
{
	GArray *a = g_array_new(FALSE, FALSE, sizeof(struct fs_inval));
	g_array_set_clear_func(a, inval_clear);
	return a;
}

static void io_free(struct fs_io *io)
{
	if (io->now)
		g_array_unref(io->now);
	if (io->after)
		g_array_unref(io->after);
	fs_node_unref(io->node);
	g_free(io);
}

static void send_invals(Fs *fs, GArray *invals)
{
	for (guint i = 0; invals && i < invals->len; i++) {
		struct fs_inval *inv = &g_array_index(invals, struct fs_inval, i);
		int r = fuse_lowlevel_notify_inval_inode(fs->se, inv->node->ino, (off_t)inv->off,
							 (off_t)inv->len);
		if (r < 0 && r != -ENOENT)
			g_debug("%s: invalidating [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT
				"): %s", inv->node->name, inv->off, inv->len, g_strerror(-r));
	}
}

static gboolean coherence_on(Fs *fs)
{
	return !fs->cfg.writeback && fs->se != NULL;
}

/* Registers @io as a write in flight on its export (for deadlock 2). */
static void io_register(struct fs_io *io)
{
	if (!coherence_on(io->fs) || g_atomic_int_get(&io->node->export->nodes) <= 1)
		return;
	struct fs_export *ex = io->node->export;
	g_mutex_lock(&ex->wlock);
	ex->writes = g_list_prepend(ex->writes, io);
	io->registered = TRUE;
	g_mutex_unlock(&ex->wlock);
}

/* Records that the kernel may now cache pages of [off, off + len) of @node
 * (a buffered read or write is going through).  Page-granular. */
static void cache_mark(struct fs_node *node, uint64_t off, size_t len)
{
	uint64_t lo = off & ~(uint64_t)4095, hi = (off + len + 4095) & ~(uint64_t)4095;
	g_mutex_lock(&node->cache_lock);
	if (node->cache_lo >= node->cache_hi) {
		node->cache_lo = lo;
		node->cache_hi = hi;
	} else {
		node->cache_lo = MIN(node->cache_lo, lo);
		node->cache_hi = MAX(node->cache_hi, hi);
	}
	g_mutex_unlock(&node->cache_lock);
}

/* Takes [lo, hi) (bytes within @node) out of its cached range.  Returns
 * FALSE when the kernel can hold no page of it, else the part to invalidate
 * in @inv_lo/@inv_hi.  A file that is not open (the tree lock is held) gives
 * up all its pages at once: nobody uses them, so nothing can hold them locked. */
static gboolean cache_take(struct fs_node *node, uint64_t lo, uint64_t hi, uint64_t *inv_lo,
			   uint64_t *inv_hi)
{
	g_mutex_lock(&node->cache_lock);
	uint64_t clo = node->cache_lo, chi = node->cache_hi;
	gboolean hit = MAX(lo, clo) < MIN(hi, chi);
	if (hit && node->open_count == 0) {
		*inv_lo = clo;
		*inv_hi = chi;
		node->cache_lo = node->cache_hi = 0;
	} else if (hit) {
		*inv_lo = MAX(lo, clo);
		*inv_hi = MIN(hi, chi);
		if (lo <= clo && hi >= chi)
			node->cache_lo = node->cache_hi = 0;
		else if (lo <= clo)
			node->cache_lo = hi;
		else if (hi >= chi)
			node->cache_hi = lo;
	}
	g_mutex_unlock(&node->cache_lock);
	return hit;
}

/* Under the tree lock: adds invalidations of @node's subtree-and-siblings
 * overlapping [a, b) (export bytes) that may hold pages, skipping @self. */
static void collect(struct fs_node *node, struct fs_node *self, uint64_t a, uint64_t b,
		    GArray *out)
{
	if (node != self && node->in_tree && node->info.size > 0) {
		uint64_t s = node->start_byte, e = node->start_byte + node->info.size;
		uint64_t lo = MAX(a, s), hi = MIN(b, e), ilo, ihi;
		if (lo < hi && cache_take(node, lo - s, hi - s, &ilo, &ihi)) {
			struct fs_inval inv = { fs_node_ref(node), ilo, ihi - ilo };
			g_array_append_val(out, inv);
		}
	}
	for (guint i = 0; i < node->children->len; i++)
		collect(node->children->pdata[i], self, a, b, out);
}

static void notify_worker(gpointer data, gpointer user_data);

/* Replies to a finished write or zero. */
static void io_reply(struct fs_io *io)
{
	if (io->result < 0) {
		g_debug("%s: %s at %" G_GUINT64_FORMAT ": %s", io->node->name,
			io->kind == FS_IO_WRITE ? "write" : "zero",
			io->abs_start - io->node->start_byte, g_strerror((int)-io->result));
		fuse_reply_err(io->req, (int)-io->result);
	}
	else if (io->kind == FS_IO_WRITE)
		fuse_reply_write(io->req, (size_t)io->result);
	else
		fuse_reply_err(io->req, 0);
}

/* Completion of a write or zero, on any thread (often an NBD reader). */
static void io_complete(struct fs_io *io)
{
	Fs *fs = io->fs;
	struct fs_node *node = io->node;
	struct fs_export *ex = node->export;
	uint64_t written = io->kind == FS_IO_WRITE ? (io->result > 0 ? (uint64_t)io->result : 0)
						   : (io->result == 0 ? io->len : 0);

	if (coherence_on(fs) && written > 0) {
		uint64_t a = io->abs_start, b = io->abs_start + written;
		if (g_atomic_int_get(&ex->nodes) > 1 || io->direct) {
			io->now = inval_array();
			g_mutex_lock(&fs->lock);
			struct fs_node *root = node;
			while (root->parent)
				root = root->parent;
			/* A direct write bypassed its own file's pages too. */
			collect(root, io->direct ? NULL : node, a, b, io->now);
			g_mutex_unlock(&fs->lock);
		}
		if (io->kind == FS_IO_ZERO) {
			struct fs_inval self = { fs_node_ref(node), a - node->start_byte, written };
			g_mutex_lock(&ex->wlock);
			if (!io->after)
				io->after = inval_array();
			g_array_append_val(io->after, self);
			g_mutex_unlock(&ex->wlock);
		}
	}

	/* Defer invalidations that would wait on pages of a write in flight. */
	if (io->now && io->now->len > 0) {
		g_mutex_lock(&ex->wlock);
		for (guint i = 0; i < io->now->len;) {
			struct fs_inval *inv = &g_array_index(io->now, struct fs_inval, i);
			uint64_t lo = inv->node->start_byte + inv->off, hi = lo + inv->len;
			struct fs_io *holder = NULL;
			for (GList *l = ex->writes; l; l = l->next) {
				struct fs_io *x = l->data;
				if (x != io && x->kind == FS_IO_WRITE && !x->direct &&
				    x->node == inv->node &&
				    x->abs_start < hi + 4096 && lo < x->abs_end + 4096) {
					holder = x;
					break;
				}
			}
			if (holder == NULL) {
				i++;
				continue;
			}
			if (!holder->after)
				holder->after = inval_array();
			struct fs_inval moved = *inv;   /* the reference moves */
			g_array_append_val(holder->after, moved);
			g_array_set_clear_func(io->now, NULL);
			g_array_remove_index(io->now, i);
			g_array_set_clear_func(io->now, inval_clear);
		}
		g_mutex_unlock(&ex->wlock);
	}

	if (io->now && io->now->len > 0) {
		g_thread_pool_push(fs->notify_pool, io, NULL);
		return;
	}
	/* Nothing to invalidate first: answer here, unless invalidations were
	 * attached to us meanwhile (they must run after our reply, off this thread). */
	g_mutex_lock(&ex->wlock);
	gboolean pending = io->after && io->after->len > 0;
	if (!pending && io->registered) {
		ex->writes = g_list_remove(ex->writes, io);
		io->registered = FALSE;
	}
	g_mutex_unlock(&ex->wlock);
	if (pending) {
		g_thread_pool_push(fs->notify_pool, io, NULL);
		return;
	}
	io_reply(io);
	io_free(io);
	fs_inflight_end(fs);
}

/* The notify pool: invalidate aliases, answer, then run what was deferred to us. */
static void notify_worker(gpointer data, gpointer user_data)
{
	struct fs_io *io = data;
	Fs *fs = io->fs;
	struct fs_export *ex = io->node->export;

	send_invals(fs, io->now);
	io_reply(io);
	for (;;) {
		g_mutex_lock(&ex->wlock);
		GArray *after = io->after;
		io->after = NULL;
		if (after == NULL && io->registered) {
			ex->writes = g_list_remove(ex->writes, io);
			io->registered = FALSE;
		}
		g_mutex_unlock(&ex->wlock);
		if (after == NULL)
			break;
		send_invals(fs, after);
		g_array_unref(after);
	}
	io_free(io);
	fs_inflight_end(fs);
}

/* ---- Init / destroy ---------------------------------------------------- */

static void fs_op_init(void *userdata, struct fuse_conn_info *conn)
{
	Fs *fs = userdata;
	conn->max_write = FS_MAX_IO;
	conn->max_read = FS_MAX_IO;
	conn->max_readahead = MAX(conn->max_readahead, FS_MAX_IO);
	conn->max_background = 64;
	conn->congestion_threshold = 48;
	conn->want |= conn->capable & (FUSE_CAP_ASYNC_READ | FUSE_CAP_PARALLEL_DIROPS |
				       FUSE_CAP_ASYNC_DIO);
	/* O_TRUNC must reach setattr (which keeps the size), not zero i_size in
	 * the kernel; splice does not help a daemon that copies anyway. */
	conn->want &= ~(FUSE_CAP_ATOMIC_O_TRUNC | FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE |
			FUSE_CAP_SPLICE_MOVE);
	if (fs->cfg.writeback) {
		if (conn->capable & FUSE_CAP_WRITEBACK_CACHE)
			conn->want |= FUSE_CAP_WRITEBACK_CACHE;
		else
			g_warning("writeback: the kernel has no writeback cache for FUSE");
	}
}

/* ---- Names and attributes ---------------------------------------------- */

static void fs_op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	Fs *fs = req_fs(req);
	if (parent != FS_ROOT_INO) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	struct fuse_entry_param e = { 0 };
	g_mutex_lock(&fs->lock);
	struct fs_node *node = g_hash_table_lookup(fs->names, name);
	if (node == NULL) {
		g_mutex_unlock(&fs->lock);
		fuse_reply_err(req, ENOENT);
		return;
	}
	node->nlookup++;
	e.ino = node->ino;
	fs_fill_stat(fs, node, &e.attr);
	g_mutex_unlock(&fs->lock);
	e.attr_timeout = FS_TIMEOUT;
	e.entry_timeout = FS_TIMEOUT;
	if (fuse_reply_entry(req, &e) == -ENOENT) {
		/* The request was interrupted: the kernel did not take the reference. */
		g_mutex_lock(&fs->lock);
		node->nlookup--;
		g_mutex_unlock(&fs->lock);
	}
}

static void forget_one(Fs *fs, fuse_ino_t ino, uint64_t nlookup)
{
	if (ino == FS_ROOT_INO)
		return;
	g_mutex_lock(&fs->lock);
	struct fs_node *node = g_hash_table_lookup(fs->inodes, GUINT_TO_POINTER(ino));
	if (node) {
		node->nlookup = node->nlookup > nlookup ? node->nlookup - nlookup : 0;
		if (!node->in_tree && node->nlookup == 0)
			g_hash_table_remove(fs->inodes, GUINT_TO_POINTER(ino));
	}
	g_mutex_unlock(&fs->lock);
}

static void fs_op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
	forget_one(req_fs(req), ino, nlookup);
	fuse_reply_none(req);
}

static void fs_op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
	for (size_t i = 0; i < count; i++)
		forget_one(req_fs(req), forgets[i].ino, forgets[i].nlookup);
	fuse_reply_none(req);
}

static void reply_attr(fuse_req_t req, fuse_ino_t ino)
{
	Fs *fs = req_fs(req);
	struct stat st;
	if (ino == FS_ROOT_INO) {
		fs_fill_stat(fs, NULL, &st);
	} else {
		struct fs_node *node = fs_get_node(fs, ino);
		if (node == NULL) {
			fuse_reply_err(req, ENOENT);
			return;
		}
		fs_fill_stat(fs, node, &st);
		fs_node_unref(node);
	}
	fuse_reply_attr(req, &st, FS_TIMEOUT);
}

static void fs_op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	reply_attr(req, ino);
}

/* truncate/ftruncate/O_TRUNC, chmod, chown, utimes: accepted and ignored,
 * the reply carries the real attributes (the size is the device's). */
static void fs_op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
			  struct fuse_file_info *fi)
{
	reply_attr(req, ino);
}

static void fs_op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	Fs *fs = req_fs(req);
	struct statvfs sv = { 0 };
	uint64_t bytes = 0;
	g_mutex_lock(&fs->lock);
	for (guint i = 0; i < fs->exports->len; i++) {
		struct fs_node *node = fs->exports->pdata[i];
		bytes += node->info.size;
	}
	sv.f_files = g_hash_table_size(fs->names) + 1;
	g_mutex_unlock(&fs->lock);
	sv.f_bsize = 4096;
	sv.f_frsize = 4096;
	sv.f_blocks = (fsblkcnt_t)((bytes + 4095) / 4096);
	sv.f_namemax = FS_NAME_MAX;
	fuse_reply_statfs(req, &sv);
}

/* ---- Directory --------------------------------------------------------- */

struct dir_entry {
	fuse_ino_t ino;
	char *name;
};

static void dir_entry_clear(gpointer p)
{
	g_free(((struct dir_entry *)p)->name);
}

static void add_subtree(GArray *out, struct fs_node *node)
{
	if (!node->in_tree)
		return;
	struct dir_entry d = { node->ino, g_strdup(node->name) };
	g_array_append_val(out, d);
	for (guint i = 0; i < node->children->len; i++)
		add_subtree(out, node->children->pdata[i]);
}

static void dir_free(Fs *fs, GArray *ents)
{
	g_mutex_lock(&fs->lock);
	g_hash_table_remove(fs->dirs, ents);
	g_mutex_unlock(&fs->lock);
	g_array_unref(ents);
}

static void fs_op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	Fs *fs = req_fs(req);
	if (ino != FS_ROOT_INO) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	/* A snapshot: offsets stay valid while partitions come and go. */
	GArray *ents = g_array_new(FALSE, FALSE, sizeof(struct dir_entry));
	g_array_set_clear_func(ents, dir_entry_clear);
	struct dir_entry dot = { FS_ROOT_INO, g_strdup(".") }, dotdot = { FS_ROOT_INO, g_strdup("..") };
	g_array_append_val(ents, dot);
	g_array_append_val(ents, dotdot);
	g_mutex_lock(&fs->lock);
	for (guint i = 0; i < fs->exports->len; i++)
		add_subtree(ents, fs->exports->pdata[i]);
	g_mutex_unlock(&fs->lock);
	g_mutex_lock(&fs->lock);
	g_hash_table_add(fs->dirs, ents);
	g_mutex_unlock(&fs->lock);
	fi->fh = (uintptr_t)ents;
	if (fuse_reply_open(req, fi) == -ENOENT)
		dir_free(fs, ents);
}

static void fs_op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
			  struct fuse_file_info *fi)
{
	Fs *fs = req_fs(req);
	GArray *ents = (GArray *)(uintptr_t)fi->fh;
	size = MIN(size, (size_t)FS_MAX_IO);
	g_autofree char *buf = g_malloc(size);
	size_t used = 0;
	for (guint i = off < 0 ? 0 : (guint)off; i < ents->len; i++) {
		struct dir_entry *d = &g_array_index(ents, struct dir_entry, i);
		struct stat st = { 0 };
		st.st_ino = d->ino;
		st.st_mode = d->ino == FS_ROOT_INO ? S_IFDIR : S_IFREG;
		size_t n = fuse_add_direntry(req, buf + used, size - used, d->name, &st, i + 1);
		if (n > size - used)
			break;
		used += n;
	}
	(void)fs;
	fuse_reply_buf(req, buf, used);
}

static void fs_op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	dir_free(req_fs(req), (GArray *)(uintptr_t)fi->fh);
	fuse_reply_err(req, 0);
}

static void fs_op_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync,
			   struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

/* The tree is not a place for new files. */
static void fs_op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
			dev_t rdev)
{
	fuse_reply_err(req, EPERM);
}

static void fs_op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
	fuse_reply_err(req, EPERM);
}

static void fs_op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	fuse_reply_err(req, EPERM);
}

static void fs_op_rename(fuse_req_t req, fuse_ino_t parent, const char *name,
			 fuse_ino_t newparent, const char *newname, unsigned int flags)
{
	fuse_reply_err(req, EPERM);
}

static void fs_op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
			 struct fuse_file_info *fi)
{
	fuse_reply_err(req, EPERM);
}

/* ---- Open / close ------------------------------------------------------ */

static void handle_free(Fs *fs, struct fs_handle *h);

static void fs_op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	Fs *fs = req_fs(req);
	struct fs_node *node = fs_get_node(fs, ino);
	if (node == NULL) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	gboolean writable = (fi->flags & O_ACCMODE) != O_RDONLY;
	g_mutex_lock(&fs->lock);
	int err = 0;
	if (!node->in_tree)
		err = ENOENT;
	else if (writable && node->read_only)
		err = EROFS;
	if (err == 0)
		node->open_count++;
	g_mutex_unlock(&fs->lock);
	if (err) {
		fs_node_unref(node);
		fuse_reply_err(req, err);
		return;
	}
	struct fs_handle *h = g_new0(struct fs_handle, 1);
	h->node = node;
	h->writable = writable;
	h->sync = (fi->flags & (O_SYNC | O_DSYNC)) != 0;
	/* O_DIRECT opens skip the kernel's cached write path, which asks for
	 * security.capability (a GETXATTR round trip) before every write. */
	h->direct_io = (fi->flags & O_DIRECT) != 0;
	g_mutex_lock(&fs->lock);
	g_hash_table_add(fs->handles, h);
	g_mutex_unlock(&fs->lock);
	fi->fh = (uintptr_t)h;
	fi->keep_cache = 0;
	fi->direct_io = h->direct_io;
	if (fuse_reply_open(req, fi) == -ENOENT)
		handle_free(fs, h);   /* interrupted: the kernel will not release it */
}

/* A flush in flight for flush/fsync/release. */
struct fs_flush {
	Fs *fs;
	fuse_req_t req;
	struct fs_handle *h;       /* freed after the reply (release), else NULL */
};

static void handle_free(Fs *fs, struct fs_handle *h)
{
	g_mutex_lock(&fs->lock);
	g_assert(h->node->open_count > 0);
	h->node->open_count--;
	g_hash_table_remove(fs->handles, h);
	g_cond_broadcast(&fs->closed_cond);
	g_mutex_unlock(&fs->lock);
	fs_node_unref(h->node);
	g_free(h);
}

void fs_free_handles(Fs *fs)
{
	g_mutex_lock(&fs->lock);
	GList *left = g_hash_table_get_keys(fs->handles);
	g_mutex_unlock(&fs->lock);
	for (GList *l = left; l; l = l->next)
		handle_free(fs, l->data);
	g_list_free(left);
	g_mutex_lock(&fs->lock);
	left = g_hash_table_get_keys(fs->dirs);
	g_mutex_unlock(&fs->lock);
	for (GList *l = left; l; l = l->next)
		dir_free(fs, l->data);
	g_list_free(left);
}

static void flush_done(void *opaque, int err)
{
	struct fs_flush *f = opaque;
	Fs *fs = f->fs;
	if (err < 0)
		g_warning("flush: %s", g_strerror(-err));
	fuse_reply_err(f->req, err < 0 ? -err : 0);
	if (f->h)
		handle_free(fs, f->h);
	g_free(f);
	fs_inflight_end(fs);
}

static void start_flush(fuse_req_t req, struct fs_handle *h, gboolean release)
{
	Fs *fs = req_fs(req);
	struct fs_flush *f = g_new0(struct fs_flush, 1);
	f->fs = fs;
	f->req = req;
	f->h = release ? h : NULL;
	fs_inflight_begin(fs);
	blockdev_flush(h->node->dev, flush_done, f);
}

static void fs_op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fs_handle *h = fh(fi);
	if (g_atomic_int_compare_and_exchange(&h->dirty, 1, 0))
		start_flush(req, h, FALSE);
	else
		fuse_reply_err(req, 0);
}

static void fs_op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fs_handle *h = fh(fi);
	if (g_atomic_int_compare_and_exchange(&h->dirty, 1, 0)) {
		start_flush(req, h, TRUE);
		return;
	}
	handle_free(req_fs(req), h);
	fuse_reply_err(req, 0);
}

static void fs_op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	struct fs_handle *h = fh(fi);
	g_atomic_int_set(&h->dirty, 0);
	start_flush(req, h, FALSE);
}

/* ---- Read / write ------------------------------------------------------ */

struct fs_read {
	Fs *fs;
	fuse_req_t req;
	struct fs_node *node;      /* ref */
	uint8_t data[];
};

static void read_done(void *opaque, ssize_t result)
{
	struct fs_read *r = opaque;
	Fs *fs = r->fs;
	if (result < 0) {
		g_debug("%s: read: %s", r->node->name, g_strerror((int)-result));
		fuse_reply_err(r->req, (int)-result);
	} else {
		fuse_reply_buf(r->req, (const char *)r->data, (size_t)result);
	}
	fs_node_unref(r->node);
	g_free(r);
	fs_inflight_end(fs);
}

static void fs_op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	Fs *fs = req_fs(req);
	struct fs_handle *h = fh(fi);
	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	size = MIN(size, (size_t)FS_MAX_IO);
	if ((uint64_t)off >= h->node->info.size || size == 0) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	struct fs_read *r = g_try_malloc(sizeof(*r) + size);
	if (r == NULL) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	r->fs = fs;
	r->req = req;
	r->node = fs_node_ref(h->node);
	if (!h->direct_io && !(fi->flags & O_DIRECT))
		cache_mark(h->node, (uint64_t)off, size);
	fs_inflight_begin(fs);
	blockdev_pread_bytes(h->node->dev, r->data, size, (uint64_t)off, read_done, r);
}

static void io_bytes_done(void *opaque, ssize_t result)
{
	struct fs_io *io = opaque;
	io->result = result;
	io_complete(io);
}

static struct fs_io *io_new(fuse_req_t req, struct fs_handle *h, int kind, uint64_t off,
			    size_t len, size_t payload)
{
	/* Not zeroed: the payload is overwritten at once. */
	struct fs_io *io = g_try_malloc(sizeof(*io) + payload);
	if (io == NULL)
		return NULL;
	memset(io, 0, sizeof(*io));
	io->fs = req_fs(req);
	io->req = req;
	io->node = fs_node_ref(h->node);
	io->kind = kind;
	io->len = len;
	io->abs_start = h->node->start_byte + off;
	io->abs_end = io->abs_start + len;
	return io;
}

static void fs_op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
			struct fuse_file_info *fi)
{
	struct fs_handle *h = fh(fi);
	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (h->node->read_only) {
		fuse_reply_err(req, EROFS);
		return;
	}
	size = MIN(size, (size_t)FS_MAX_IO);
	struct fs_io *io = io_new(req, h, FS_IO_WRITE, (uint64_t)off, size, size);
	if (io == NULL) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	memcpy(io->data, buf, size);
	io->direct = h->direct_io;
	if (!h->direct_io && !(fi->flags & O_DIRECT))
		cache_mark(h->node, (uint64_t)off, size);
	uint32_t flags = (h->sync || (fi->flags & (O_SYNC | O_DSYNC))) ? BLOCKDEV_FUA : 0;
	g_atomic_int_set(&h->dirty, 1);
	fs_inflight_begin(io->fs);
	io_register(io);
	blockdev_pwrite_bytes(h->node->dev, io->data, size, (uint64_t)off, flags, io_bytes_done, io);
}

static void fs_op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
			    struct fuse_file_info *fi)
{
	struct fs_handle *h = fh(fi);
	uint32_t flags;
	if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE))
		flags = BLOCKDEV_MAY_TRIM;
	else if ((mode & ~FALLOC_FL_KEEP_SIZE) == FALLOC_FL_ZERO_RANGE)
		flags = 0;
	else {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	if (offset < 0 || length <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (h->node->read_only) {
		fuse_reply_err(req, EROFS);
		return;
	}
	uint64_t size = h->node->info.size;
	if ((uint64_t)offset >= size) {
		fuse_reply_err(req, 0);
		return;
	}
	uint64_t len = MIN((uint64_t)length, size - (uint64_t)offset);
	if (h->sync || (fi->flags & (O_SYNC | O_DSYNC)))
		flags |= BLOCKDEV_FUA;
	struct fs_io *io = io_new(req, h, FS_IO_ZERO, (uint64_t)offset, len, 0);
	if (io == NULL) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	g_atomic_int_set(&h->dirty, 1);
	fs_inflight_begin(io->fs);
	io_register(io);
	blockdev_zero_bytes(h->node->dev, (uint64_t)offset, len, flags, io_bytes_done, io);
}

/* ---- lseek(SEEK_DATA / SEEK_HOLE) -------------------------------------- */

struct seek_ctx {
	GMutex lock;
	GCond cond;
	gboolean done;
	int err;
	int whence;
	uint64_t from;             /* looking at or after this byte */
	uint64_t found;            /* result, UINT64_MAX while not found */
	uint64_t covered;          /* end of the last extent seen */
};

static void seek_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct seek_ctx *c = opaque;
	uint64_t end = offset + length;
	if (end > c->covered)
		c->covered = end;
	if (c->found != UINT64_MAX || end <= c->from)
		return;
	gboolean hole = (flags & BLOCKDEV_STATE_HOLE) != 0;
	if ((c->whence == SEEK_DATA) != hole)
		c->found = MAX(offset, c->from);
}

static void seek_done(void *opaque, int err)
{
	struct seek_ctx *c = opaque;
	g_mutex_lock(&c->lock);
	c->err = err;
	c->done = TRUE;
	g_cond_signal(&c->cond);
	g_mutex_unlock(&c->lock);
}

static void fs_op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
			struct fuse_file_info *fi)
{
	struct fs_handle *h = fh(fi);
	struct fs_node *node = h->node;
	uint64_t size = node->info.size;
	uint32_t ss = node->info.sector_size;
	if (whence != SEEK_DATA && whence != SEEK_HOLE) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (off < 0 || (uint64_t)off >= size) {
		fuse_reply_err(req, ENXIO);
		return;
	}
	/* Blocking is fine here: lseek is rare and holds one worker thread. */
	uint64_t pos = (uint64_t)off;
	while (pos < size) {
		struct seek_ctx c = { .whence = whence, .from = pos, .found = UINT64_MAX };
		g_mutex_init(&c.lock);
		g_cond_init(&c.cond);
		uint64_t sector = pos / ss;
		uint64_t count = (size - sector * ss + ss - 1) / ss;
		count = MIN(count, (uint64_t)(1u << 30) / ss);   /* 1 GiB a query */
		c.covered = sector * ss;
		blockdev_block_status(node->dev, sector, count, seek_extent, seek_done, &c);
		g_mutex_lock(&c.lock);
		while (!c.done)
			g_cond_wait(&c.cond, &c.lock);
		g_mutex_unlock(&c.lock);
		g_mutex_clear(&c.lock);
		g_cond_clear(&c.cond);
		if (c.err == -EOPNOTSUPP) {
			/* No block status: all data, one hole at the end. */
			fuse_reply_lseek(req, whence == SEEK_DATA ? off : (off_t)size);
			return;
		}
		if (c.err < 0) {
			fuse_reply_err(req, -c.err);
			return;
		}
		if (c.found != UINT64_MAX) {
			if (c.found >= size)
				break;
			fuse_reply_lseek(req, (off_t)c.found);
			return;
		}
		if (c.covered <= pos) {
			/* No progress: treat the rest as data. */
			fuse_reply_lseek(req, whence == SEEK_DATA ? (off_t)pos : (off_t)size);
			return;
		}
		pos = c.covered;
	}
	if (whence == SEEK_DATA)
		fuse_reply_err(req, ENXIO);
	else
		fuse_reply_lseek(req, (off_t)size);
}

/* ---- The table --------------------------------------------------------- */

static const struct fuse_lowlevel_ops fs_ops = {
	.init = fs_op_init,
	.lookup = fs_op_lookup,
	.forget = fs_op_forget,
	.forget_multi = fs_op_forget_multi,
	.getattr = fs_op_getattr,
	.setattr = fs_op_setattr,
	.statfs = fs_op_statfs,
	.opendir = fs_op_opendir,
	.readdir = fs_op_readdir,
	.releasedir = fs_op_releasedir,
	.fsyncdir = fs_op_fsyncdir,
	.mknod = fs_op_mknod,
	.mkdir = fs_op_mkdir,
	.unlink = fs_op_unlink,
	.rmdir = fs_op_unlink,
	.rename = fs_op_rename,
	.create = fs_op_create,
	.open = fs_op_open,
	.read = fs_op_read,
	.write = fs_op_write,
	.flush = fs_op_flush,
	.release = fs_op_release,
	.fsync = fs_op_fsync,
	.fallocate = fs_op_fallocate,
	.lseek = fs_op_lseek,
	.setxattr = fs_op_setxattr,
	.getxattr = fs_op_getxattr,
	.listxattr = fs_op_listxattr,
	.removexattr = fs_op_removexattr,
};

const struct fuse_lowlevel_ops *fs_lowlevel_ops(void)
{
	return &fs_ops;
}

void fs_set_session(Fs *fs, struct fuse_session *se)
{
	fs->se = se;
	if (fs->notify_pool == NULL)
		fs->notify_pool = g_thread_pool_new(notify_worker, fs, -1, FALSE, NULL);
}

gboolean fs_shutdown(Fs *fs)
{
	/* Every request still in flight gets its answer first (the NBD blockdev
	 * fails them after its timeout if the server is gone). */
	g_atomic_int_set(&fs->draining, 1);
	g_mutex_lock(&fs->inflight_lock);
	while (g_atomic_int_get(&fs->inflight) > 0) {
		gint64 deadline = g_get_monotonic_time() + 10 * G_TIME_SPAN_SECOND;
		int n;
		if (!g_cond_wait_until(&fs->inflight_cond, &fs->inflight_lock, deadline) &&
		    (n = g_atomic_int_get(&fs->inflight)) > 0)
			g_message("unmount: waiting for %d request%s in flight", n,
				  n == 1 ? "" : "s");
	}
	g_mutex_unlock(&fs->inflight_lock);

	gboolean ok = TRUE;
	g_mutex_lock(&fs->lock);
	g_autoptr(GPtrArray) roots = g_ptr_array_new_with_free_func((GDestroyNotify)blockdev_unref);
	for (guint i = 0; i < fs->export_data->len; i++) {
		struct fs_export *ex = fs->export_data->pdata[i];
		g_ptr_array_add(roots, blockdev_ref(ex->root));
	}
	g_mutex_unlock(&fs->lock);
	for (guint i = 0; i < roots->len; i++) {
		int r = blockdev_flush_sync(roots->pdata[i]);
		if (r < 0) {
			struct fs_export *ex = fs->export_data->pdata[i];
			g_warning("%s: flush at unmount: %s", ex->source, g_strerror(-r));
			ok = FALSE;
		}
	}
	for (guint i = 0; i < roots->len; i++)
		blockdev_disconnect(roots->pdata[i]);
	if (fs->notify_pool) {
		g_thread_pool_free(fs->notify_pool, FALSE, TRUE);
		fs->notify_pool = NULL;
	}
	return ok;
}
