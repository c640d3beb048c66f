/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* coherence.c: an export file and its partition files show the same bytes.
 *
 * Files use the kernel page cache (not direct_io), so readahead works and
 * loop devices behave; O_DIRECT opens bypass it.  An export file and its
 * partition files alias the same bytes but are different inodes with
 * different page caches.  So when a write (or zero) through one file
 * completes, every other file of the same export whose byte range overlaps
 * the written range, and that may hold pages there, gets
 * FUSE_NOTIFY_INVAL_INODE for the overlap, BEFORE the write is answered:
 * when write(2) returns, no alias can serve the old bytes.  Which files may
 * hold pages: each node keeps one byte range (cache_lo/cache_hi) that every
 * buffered read or write through it grows before it is sent, and every
 * invalidation shrinks.  O_DIRECT reads and writes create no pages and do
 * not grow it.  (A file that is not open gives up its whole range at its
 * first invalidation: nobody uses those pages.)
 *
 * A write that fails may still have reached the server in part (an RMW
 * edge, one piece of a split request): then the aliases are invalidated
 * over the whole requested range, and so is the file's own cache (after the
 * reply: see deadlock 2), since the kernel's pages may hold bytes the
 * server did not take.
 *
 * Two deadlocks shape this:
 *  1. Invalidation waits for page locks.  A page of the alias may be locked by
 *     a read whose reply a loop must deliver, so no loop ever invalidates:
 *     completions that must, go to the blocking pool (loop.h).
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
 * With -o writeback the kernel caches writes and nbdfs gives up alias
 * coherence: no invalidations are sent.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "fs-internal.h"

#define PAGE 4096u

gboolean fs_coherence_on(Fs *fs)
{
	return !fs->cfg.writeback && g_atomic_int_get(&fs->serving);
}

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

void fs_io_free(struct fs_io *io)
{
	if (io->now)
		g_array_unref(io->now);
	if (io->after)
		g_array_unref(io->after);
	fs_buf_put(io->fs, io->buf);
	fs_node_unref(io->node);
	g_free(io);
}

static void send_invals(Fs *fs, GArray *invals)
{
	for (guint i = 0; invals && i < invals->len; i++) {
		struct fs_inval *inv = &g_array_index(invals, struct fs_inval, i);
		int r = fs_notify_inval_inode(fs, inv->node->ino, (int64_t)inv->off,
					      (int64_t)inv->len);
		if (r < 0 && r != -ENOENT && r != -ENODEV)
			g_debug("%s: invalidating [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT
				"): %s",
				inv->node->name, inv->off, inv->len, g_strerror(-r));
	}
}

void fs_io_register(struct fs_io *io)
{
	if (!fs_coherence_on(io->fs) || g_atomic_int_get(&io->node->export->nodes) <= 1)
		return;
	struct fs_export *ex = io->node->export;
	g_mutex_lock(&ex->wlock);
	ex->writes = g_list_prepend(ex->writes, io);
	io->registered = TRUE;
	g_mutex_unlock(&ex->wlock);
}

void fs_cache_mark(struct fs_node *node, uint64_t off, size_t len)
{
	uint64_t lo = off & ~(uint64_t)(PAGE - 1),
		 hi = (off + len + PAGE - 1) & ~(uint64_t)(PAGE - 1);
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
 * in @inv_lo/@inv_hi.  Under the tree lock. */
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

/* Under the tree lock: adds invalidations of @node's subtree overlapping
 * [a, b) (export bytes) that may hold pages, skipping @self. */
static void collect(struct fs_node *node, struct fs_node *self, uint64_t a, uint64_t b, GArray *out)
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

/* Under the export's wlock: @inv after @io's own reply. */
static void add_after(struct fs_io *io, struct fs_inval *inv)
{
	if (!io->after)
		io->after = inval_array();
	g_array_append_val(io->after, *inv);
}

/* The pool: invalidate aliases, answer, then run what was deferred to us. */
static void notify_job(void *opaque)
{
	struct fs_io *io = opaque;
	Fs *fs = io->fs;
	struct fs_export *ex = io->node->export;

	send_invals(fs, io->now);
	io->reply(io);
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
	io->release(io);
}

void fs_io_complete(struct fs_io *io, void (*reply)(struct fs_io *io),
		    void (*release)(struct fs_io *io))
{
	Fs *fs = io->fs;
	struct fs_node *node = io->node;
	struct fs_export *ex = node->export;
	gboolean failed = io->result < 0;
	uint64_t touched = failed		     ? io->len
			   : io->kind == FS_IO_WRITE ? (uint64_t)io->result
						     : io->len;

	io->reply = reply;
	io->release = release;
	if (fs_coherence_on(fs) && touched > 0) {
		uint64_t a = io->abs_start, b = io->abs_start + touched;
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
		/* A zero, and a failed buffered write, leave the file's own
		 * pages stale: after the reply (they are locked until then). */
		if (io->kind == FS_IO_ZERO || (failed && !io->direct)) {
			struct fs_inval self = { fs_node_ref(node), a - node->start_byte, touched };
			g_mutex_lock(&ex->wlock);
			add_after(io, &self);
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
				    x->node == inv->node && x->abs_start < hi + PAGE &&
				    lo < x->abs_end + PAGE) {
					holder = x;
					break;
				}
			}
			if (holder == NULL) {
				i++;
				continue;
			}
			struct fs_inval moved = *inv; /* the reference moves */
			add_after(holder, &moved);
			g_array_set_clear_func(io->now, NULL);
			g_array_remove_index(io->now, i);
			g_array_set_clear_func(io->now, inval_clear);
		}
		g_mutex_unlock(&ex->wlock);
	}

	if (io->now && io->now->len > 0) {
		loop_set_run_blocking(fs_loops(fs), notify_job, io);
		return;
	}
	/* Nothing to invalidate first: answer here, unless invalidations were
	 * attached to us meanwhile (they must run after our reply, off the loop). */
	g_mutex_lock(&ex->wlock);
	gboolean pending = io->after && io->after->len > 0;
	if (!pending && io->registered) {
		ex->writes = g_list_remove(ex->writes, io);
		io->registered = FALSE;
	}
	g_mutex_unlock(&ex->wlock);
	if (pending) {
		loop_set_run_blocking(fs_loops(fs), notify_job, io);
		return;
	}
	reply(io);
	release(io);
}
