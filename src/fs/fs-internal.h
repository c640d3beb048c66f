/* fs-internal.h: the FUSE layer's shared structures (tree.c, ops.c, xattr.c).
 *
 * Ownership and locking (see the design comment in ops.c for the whole story):
 *  - struct fs_node is reference counted (node_ref/node_unref, atomic).  The
 *    inode table holds one reference per node, an open file handle another,
 *    a request in flight another, a child one on its parent.
 *  - fs->lock (a GMutex, "the tree lock") protects the inode table, the name
 *    table, every node's children/in_tree/nlookup/open_count/cached fields and
 *    the partition state.  It is never held across I/O, a FUSE reply or a
 *    kernel notification, and it may be taken from a completion callback.
 *  - node->cache_lock protects node->cache_lo/cache_hi (the byte range that
 *    may have page-cache pages); a leaf lock, taken inside the tree lock or
 *    alone from the read/write handlers.
 *  - fs->part_lock serialises partitioning (setxattr, mount-time); it is held
 *    across table reads and taken before the tree lock.
 *  - export->wlock protects the export's list of writes in flight; it nests
 *    inside the tree lock.
 *  - Immutable after creation: node->ino, name, dev, info, parent, export,
 *    table-entry fields.
 */
#pragma once

#include "fs.h"

#include <stdint.h>

struct fs_export {
	char *source;              /* how the user named it (error messages) */
	Blockdev *root;            /* the export device (ref) */
	GMutex wlock;
	GList *writes;             /* struct fs_io * in flight (coherence registry) */
	gint nodes;                /* in-tree nodes of this export (atomic read) */
};

enum fs_part_kind { FS_PART_NONE, FS_PART_MBR, FS_PART_GPT, FS_PART_SPLIT };

struct fs_node {
	gint ref;
	fuse_ino_t ino;
	char *name;                /* the file name (escaped) */
	Blockdev *dev;             /* ref */
	struct blockdev_info info; /* snapshot at creation (sizes never change) */
	uint64_t start_byte;       /* first byte within the export */
	gboolean read_only;        /* mount ro or device read-only */
	struct fs_export *export;  /* borrowed: exports live as long as the Fs */
	struct fs_node *parent;    /* ref; NULL for an export file */

	/* From a partition table (table_part): */
	gboolean table_part;
	guint number;
	uint8_t mbr_type;
	char type_guid[37];
	char uuid[37];
	char *label;

	/* Under the tree lock: */
	gboolean in_tree;          /* visible in the directory */
	uint64_t nlookup;          /* kernel references (lookup minus forget) */
	guint open_count;          /* open file handles */
	GPtrArray *children;       /* struct fs_node * (refs), partition files */
	enum fs_part_kind part_kind;
	uint64_t split_sectors;

	/* Under cache_lock: [cache_lo, cache_hi) (bytes within the node, empty
	 * when cache_lo >= cache_hi) covers every page-cache page the kernel may
	 * hold for this inode: buffered (not O_DIRECT) reads and writes since its
	 * pages in that range were last invalidated grow it, invalidations shrink it. */
	GMutex cache_lock;
	uint64_t cache_lo, cache_hi;
};

struct fs {
	struct fs_config cfg;
	struct fuse_session *se;
	struct timespec mount_time;

	GMutex lock;               /* the tree lock */
	GCond closed_cond;         /* signalled (under lock) when a file is released */
	GMutex part_lock;
	GHashTable *inodes;        /* fuse_ino_t -> struct fs_node * (ref) */
	GHashTable *handles;       /* struct fs_handle * of open files (their RELEASE
	                            * may never come if the session ends first) */
	GHashTable *dirs;          /* GArray * directory snapshots, likewise */
	GHashTable *names;         /* name -> struct fs_node * (borrowed; in-tree nodes) */
	GPtrArray *exports;        /* struct fs_node * (borrowed from inodes), mount order */
	GPtrArray *export_data;    /* struct fs_export *, owned */
	fuse_ino_t next_ino;

	/* Requests in flight (replied from completions), for shutdown. */
	GMutex inflight_lock;
	GCond inflight_cond;
	gint inflight;             /* atomic */
	gint draining;             /* atomic: fs_shutdown is waiting for inflight == 0 */

	GThreadPool *notify_pool;  /* completions that must notify the kernel */
};

/* One read/write/zero in flight. */
struct fs_io {
	struct fs *fs;
	fuse_req_t req;
	struct fs_node *node;      /* ref */
	int kind;                  /* FS_IO_WRITE, FS_IO_ZERO */
	uint64_t abs_start, abs_end;   /* bytes within the export */
	gboolean registered;       /* in export->writes */
	gboolean direct;           /* through a FOPEN_DIRECT_IO handle: holds no pages,
	                            * and its own file's pages need invalidating */
	ssize_t result;
	GArray *now;               /* struct fs_inval: aliases to invalidate before the reply */
	GArray *after;             /* struct fs_inval: to invalidate after the reply */
	size_t len;
	uint8_t data[];            /* write payload */
};

enum { FS_IO_WRITE = 1, FS_IO_ZERO };

struct fs_inval {
	struct fs_node *node;      /* ref */
	uint64_t off, len;         /* bytes within node */
};

#define FS_ROOT_INO FUSE_ROOT_ID
#define FS_NAME_MAX 255

/* tree.c */
struct fs_node *fs_node_ref(struct fs_node *node);
void fs_node_unref(struct fs_node *node);
/* Looks up an inode and returns a new reference, or NULL (any thread). */
struct fs_node *fs_get_node(Fs *fs, fuse_ino_t ino);
/* Applies a partition value to @node; on success fills @removed/@added with
 * names (char *, owned by the arrays) for kernel notification. */
gboolean fs_apply_partition(Fs *fs, struct fs_node *node, const char *value, size_t len,
			    gboolean mounting, GPtrArray *removed, GPtrArray *added,
			    GError **error);
/* Text of user.nbdfs.partition for @node: "none", "mbr", "gpt", "split:N". */
char *fs_partition_value(Fs *fs, struct fs_node *node);
/* Fills @st for @node (or the root dir when @node is NULL). */
void fs_fill_stat(Fs *fs, struct fs_node *node, struct stat *st);

/* ops.c */
/* Frees the handles of files the kernel never released (session over). */
void fs_free_handles(Fs *fs);
void fs_inflight_begin(Fs *fs);
void fs_inflight_end(Fs *fs);

/* xattr.c */
void fs_op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
		    size_t size, int flags);
void fs_op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size);
void fs_op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
void fs_op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name);
