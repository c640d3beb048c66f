/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* fs-internal.h: the FUSE layer's shared structures (private to src/fs).
 *
 * The files, top down:
 *   session.c    /dev/fuse: one channel per event loop, INIT, the dispatch
 *                table, replies and kernel notifications, -d request lines
 *   ops.c        names, attributes, the directory, open and release
 *   data.c       read, write, fallocate, flush, fsync, lseek, syncfs
 *   coherence.c  keeping an export file and its partition files coherent
 *   xattr.c      the user.nbdfs.* attributes (partitioning on the pool)
 *   stop.c       the bounded stop: drain, final flushes, give up at the deadline
 *   tree.c       the file tree: nodes, names, partitioning
 *   codec.c      the protocol's bytes (fuse-proto.h)
 *   life.c       an Fs made and freed (the top: it calls the others)
 * doc/ARCHITECTURE.md says which thread runs what.
 *
 * Ownership and locking:
 *  - struct fs_node is reference counted (fs_node_ref/unref, atomic).  The
 *    inode table holds one reference per node, an open file handle another,
 *    a request in flight another, a child one on its parent.
 *  - fs->lock (a GMutex, "the tree lock") protects the inode table, the name
 *    table, every node's children/in_tree/nlookup/open_count fields, the
 *    handle and directory tables and the partition state.  It is never held
 *    across I/O, a reply or a kernel notification; completions may take it.
 *  - node->cache_lock protects node->cache_lo/cache_hi (the byte range that
 *    may have page-cache pages); a leaf lock, taken inside the tree lock or
 *    alone.
 *  - export->part_lock serialises partitioning within one export (setxattr
 *    on the pool, mount time): held across table reads, taken before the
 *    tree lock.  Exports are partitioned independently, so a dead server
 *    holds up only its own.
 *  - export->wlock protects the export's list of writes in flight; it nests
 *    inside the tree lock.
 *  - fs->stop_lock/stop_cond: the stop's bookkeeping; a leaf lock.
 *  - Immutable after creation: node->ino, name, dev, info, parent, export,
 *    table-entry fields.
 */
#pragma once

#include "fs.h"
#include "fuse-proto.h"

#include <stdint.h>

#include "nbdfs/loop.h"

typedef uint64_t fs_ino_t;

#define FS_ROOT_INO FUSE_ROOT_ID
#define FS_NAME_MAX 255
/* How long the kernel may cache names and attributes (they never change
 * under it, but partition files come and go). */
#define FS_ATTR_TIMEOUT 1.0
/* Room before a read reply's data for its header (one write(2) per reply). */
#define FS_REPLY_HDR sizeof(struct fuse_out_header)

/* A channel: one cloned /dev/fuse descriptor, read by one loop (session.c). */
struct fs_chan {
	Fs *fs;
	Loop *loop;
	int fd; /* owned: a clone of the session's descriptor */
	struct loop_watch w;
	uint8_t *buf; /* the next read's buffer, or NULL */
	struct loop_task task;
	struct completion *sync;   /* attach/detach on the loop, waited for */
	struct loop_timer retry;   /* reading again after memory ran out */
	gboolean starved;	   /* said so in the log */
	struct loop_timer tidy;	   /* a quiet channel gives memory back */
	guint64 nread, nread_tidy; /* requests read; and when @tidy was armed */
};

/* A FUSE request being answered: where its reply goes.  Small and copied by
 * value into whatever outlives the dispatch (an I/O in flight). */
struct fs_req {
	struct fs_chan *ch; /* borrowed: channels outlive every request */
	uint64_t unique;
	uint64_t nodeid;
	uint32_t opcode;
	gint64 t0;  /* -d: when it arrived (monotonic us) */
	char *what; /* -d: its arguments, or NULL; freed by the reply */
};

struct fs_export {
	char *source;	  /* how the user named it (error messages) */
	char *name;	  /* its file name */
	Blockdev *root;	  /* the export device (ref) */
	GMutex part_lock; /* partitioning in this export */
	GMutex wlock;
	GList *writes; /* struct fs_io * in flight (coherence registry) */
	gint nodes;    /* in-tree nodes of this export (atomic read) */
	/* The stop (stop.c) and flush bookkeeping (data.c), atomics: */
	gint inflight;	   /* data requests in flight on this export */
	gint write_gen;	   /* bumped by every completed non-FUA write or zero */
	gint clean_gen;	   /* the write_gen a successful flush covered */
	uint64_t lost_seq; /* lost_writes_seq when the mount began */
	/* Under fs->stop_lock: */
	gboolean final_running, final_failed;
	int final_gen;
	char *final_error;
};

enum fs_part_kind { FS_PART_NONE, FS_PART_MBR, FS_PART_GPT, FS_PART_SPLIT };

/* Counters of a file (user.nbdfs.stats), atomics. */
struct fs_stats {
	guint64 reads, writes, bytes_read, bytes_written, errors;
	gint in_flight;
};

struct fs_node {
	gint ref;
	fs_ino_t ino;
	char *name;		   /* the file name (escaped) */
	Blockdev *dev;		   /* ref */
	struct blockdev_info info; /* snapshot at creation (sizes never change) */
	uint64_t start_byte;	   /* first byte within the export */
	gboolean read_only;	   /* mount ro or device read-only */
	struct fs_export *export;  /* borrowed: exports live as long as the Fs */
	struct fs_node *parent;	   /* ref; NULL for an export file */

	/* From a partition table (table_part): */
	gboolean table_part;
	guint number;
	uint8_t mbr_type;
	char type_guid[37];
	char uuid[37];
	char *label;

	/* Under the tree lock: */
	gboolean in_tree;    /* visible in the directory */
	uint64_t nlookup;    /* kernel references (lookup minus forget) */
	guint open_count;    /* open file handles */
	GPtrArray *children; /* struct fs_node * (refs), partition files */
	enum fs_part_kind part_kind;
	uint64_t split_sectors;

	/* Under cache_lock: [cache_lo, cache_hi) (bytes within the node, empty
	 * when cache_lo >= cache_hi) covers every page-cache page the kernel may
	 * hold for this inode: buffered (not O_DIRECT) reads and writes since its
	 * pages in that range were last invalidated grow it, invalidations shrink it. */
	GMutex cache_lock;
	uint64_t cache_lo, cache_hi;

	struct fs_stats stats;
};

/* An open file. */
struct fs_handle {
	struct fs_node *node; /* ref */
	gboolean writable;
	gboolean sync;	    /* O_SYNC / O_DSYNC: FUA writes */
	gboolean direct_io; /* opened O_DIRECT: FOPEN_DIRECT_IO, no page cache */
	gint dirty;	    /* written since the last flush (atomic) */
	gint wrote;	    /* ever written through (atomic) */
	guint64 errseq;	    /* the export's lost_writes_seq last reported */
};

struct fs {
	struct fs_config cfg;
	struct timespec mount_time;

	/* The session (session.c). */
	LoopSet *loops;	  /* borrowed, from fs_serve */
	GPtrArray *chans; /* struct fs_chan *, one per loop */
	int notify_fd;	  /* where notifications are written (chans[0]) */
	gint serving;	  /* atomic: channels are attached */
	gint initialized; /* atomic: INIT answered */
	gint ended;	  /* atomic: the kernel ended the session */
	int end_fd;	  /* eventfd, readable once ended */
	uint32_t proto_minor;
	GMutex buf_lock; /* the free request buffers */
	GPtrArray *free_bufs;

	GMutex lock;		/* the tree lock */
	GCond closed_cond;	/* signalled (under lock) when a file is released */
	GHashTable *inodes;	/* fs_ino_t -> struct fs_node * (ref) */
	GHashTable *handles;	/* struct fs_handle * of open files (their RELEASE
				 * may never come if the session ends first) */
	GHashTable *dirs;	/* GArray * directory snapshots, likewise */
	GHashTable *names;	/* name -> struct fs_node * (borrowed; in-tree nodes) */
	GPtrArray *exports;	/* struct fs_node * (borrowed from inodes), mount order */
	GPtrArray *export_data; /* struct fs_export *, owned */
	fs_ino_t next_ino;

	/* Requests in flight (answered from completions), for the stop. */
	gint inflight; /* atomic */
	GMutex stop_lock;
	GCond stop_cond; /* broadcast when a count the stop watches changes */
	gint stopping;	 /* atomic: fs_stop is watching */
};

/* One read, write or zero in flight. */
struct fs_io {
	struct fs *fs;
	struct fs_req req;
	struct fs_node *node;	     /* ref */
	int kind;		     /* FS_IO_READ, FS_IO_WRITE, FS_IO_ZERO */
	uint64_t abs_start, abs_end; /* bytes within the export */
	gboolean registered;	     /* in export->writes */
	gboolean direct;	     /* through a FOPEN_DIRECT_IO handle: holds no pages,
				      * and its own file's pages need invalidating */
	gboolean fua;
	ssize_t result;
	GArray *now;   /* struct fs_inval: aliases to invalidate before the reply */
	GArray *after; /* struct fs_inval: to invalidate after the reply */
	size_t len;
	uint8_t *buf;			   /* the request buffer holding the payload (owned) */
	const uint8_t *data;		   /* the write payload inside @buf */
	void (*reply)(struct fs_io *io);   /* answers the request (data.c) */
	void (*release)(struct fs_io *io); /* frees it once the work after the reply is done */
};

enum { FS_IO_READ = 1, FS_IO_WRITE, FS_IO_ZERO };

struct fs_inval {
	struct fs_node *node; /* ref */
	uint64_t off, len;    /* bytes within node */
};

/* ---- reply.c ---- */

/* Replies; any thread.  @err is 0 or a positive errno.  They return 0, or
 * -ENOENT when the kernel no longer waits for the request (interrupted), or
 * another -errno when the write failed.  Each frees @r->what. */
int fs_reply_err(struct fs_req *r, int err);
int fs_reply(struct fs_req *r, const void *arg, size_t len);
/* @buf holds FS_REPLY_HDR free bytes, then @len bytes of data. */
int fs_reply_data(struct fs_req *r, uint8_t *buf, size_t len);
/* Requests that get no reply (FORGET). */
void fs_reply_none(struct fs_req *r);
/* Kernel notifications, written on the session's fd.  They may wait for
 * page locks: never call them on a loop (see coherence.c).  0 or -errno. */
int fs_notify_inval_inode(Fs *fs, fs_ino_t ino, int64_t off, int64_t len);
int fs_notify_inval_entry(Fs *fs, fs_ino_t parent, const char *name);
/* A request buffer of FUSEP_BUF_SIZE bytes (NULL when memory ran out),
 * and back (any thread). */
uint8_t *fs_buf_get(Fs *fs);
/* The daemon went quiet: the free request buffers and the heap's unused
 * pages go back to the system (the heap on the pool: it may take a while). */
void fs_bufs_tidy(Fs *fs);
void fs_buf_put(Fs *fs, uint8_t *buf);
/* The loops requests run on. */
static inline LoopSet *fs_loops(Fs *fs)
{
	return fs->loops;
}

/* ---- session.c ---- */
void fs_session_init(Fs *fs);
void fs_session_fini(Fs *fs);

/* ---- the operations (ops.c, data.c, xattr.c): run on the loop that read
 * the request; each answers @r exactly once (now or from a completion). ---- */

void fs_op_lookup(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_forget(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_batch_forget(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_getattr(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_setattr(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_statfs(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_opendir(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_readdir(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_releasedir(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_open(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_release(Fs *fs, struct fs_req *r, const struct fusep_req *q);
/* data.c */
void fs_op_read(Fs *fs, struct fs_req *r, const struct fusep_req *q);
/* Takes the request buffer (*@bufp = NULL) when it keeps the payload. */
void fs_op_write(Fs *fs, struct fs_req *r, const struct fusep_req *q, uint8_t **bufp);
void fs_op_flush(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_fsync(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_fallocate(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_lseek(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_syncfs(Fs *fs, struct fs_req *r, const struct fusep_req *q);
/* xattr.c */
void fs_op_setxattr(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_getxattr(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_listxattr(Fs *fs, struct fs_req *r, const struct fusep_req *q);
void fs_op_removexattr(Fs *fs, struct fs_req *r, const struct fusep_req *q);

/* ---- ops.c ---- */
/* The handle of @fh (the kernel gives back what OPEN returned). */
static inline struct fs_handle *fs_handle_of(uint64_t fh)
{
	return (struct fs_handle *)(uintptr_t)fh;
}
/* Frees the directory snapshots the kernel never released. */
void fs_free_dirs(Fs *fs);
/* Calls @fn(@fs, key) for every key of @table (a table of @fs, under the
 * tree lock), without the lock, as they were when called. */
void fs_each_key(Fs *fs, GHashTable *table, void (*fn)(Fs *fs, gpointer key));

/* ---- data.c ---- */
/* Frees @h: closes the file (the tree counts it no more) and unholds its device. */
void fs_handle_free(Fs *fs, struct fs_handle *h);
/* Frees the handles the kernel never released. */
void fs_free_handles(Fs *fs);
void fs_inflight_begin(Fs *fs, struct fs_export *ex);
void fs_inflight_end(Fs *fs, struct fs_export *ex);
/* The errno a data request's failure is reported with: what the block layer
 * said where it means something to the caller, else EIO. */
int fs_io_errno(ssize_t result);
/* Flushes @ex's device and records what it covered (the stop's and fsync's
 * bookkeeping); @done(opaque, err) on a loop. */
void fs_export_flush(Fs *fs, struct fs_export *ex, blockdev_done_fn done, void *opaque);

/* ---- coherence.c ---- */
gboolean fs_coherence_on(Fs *fs);
/* Records that the kernel may now cache pages of [off, off + len) of @node. */
void fs_cache_mark(struct fs_node *node, uint64_t off, size_t len);
/* Registers @io as a write in flight on its export (for deadlock 2). */
void fs_io_register(struct fs_io *io);
/* A write or zero finished (io->result set): invalidates what must be
 * invalidated before the reply, calls @reply, invalidates what must wait for
 * the reply, then calls @release.  On a loop; the invalidations (and the
 * calls after them) go to the blocking pool. */
void fs_io_complete(struct fs_io *io, void (*reply)(struct fs_io *io),
		    void (*release)(struct fs_io *io));
/* Frees @io's own parts (node reference, buffer, invalidation lists). */
void fs_io_free(struct fs_io *io);

/* ---- tree.c ---- */
void fs_tree_init(Fs *fs);
void fs_tree_fini(Fs *fs);
struct fs_node *fs_node_ref(struct fs_node *node);
void fs_node_unref(struct fs_node *node);
/* Looks up an inode and returns a new reference, or NULL (any thread). */
struct fs_node *fs_get_node(Fs *fs, fs_ino_t ino);
/* Under the tree lock: the node called @name, borrowed, or NULL. */
struct fs_node *fs_lookup_locked(Fs *fs, const char *name);
/* Under the tree lock: the kernel forgets @nlookup references to @ino. */
void fs_forget_locked(Fs *fs, fs_ino_t ino, uint64_t nlookup);
/* Applies a partition value to @node; on success fills @removed/@added with
 * names (char *, owned by the arrays) for kernel notification.  Blocks
 * (reads the table): never on a loop. */
gboolean fs_apply_partition(Fs *fs, struct fs_node *node, const char *value, size_t len,
			    gboolean mounting, GPtrArray *removed, GPtrArray *added,
			    GError **error);
/* Text of user.nbdfs.partition for @node: "none", "mbr", "gpt", "split:N". */
char *fs_partition_value(Fs *fs, struct fs_node *node);
/* Fills @st for @node (or the root dir when @node is NULL). */
void fs_fill_stat(Fs *fs, struct fs_node *node, struct stat *st);
