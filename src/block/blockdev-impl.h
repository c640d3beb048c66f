/* blockdev-impl.h: the private side of a Blockdev (ops vtable, base struct,
 * checked dispatch, the root's sector lock table).  Only src/block/ and the
 * block unit tests include it.
 *
 * Every device type embeds `struct blockdev` as its first member and fills
 * `info` once at creation (immutable afterwards).  The public calls in
 * blockdev.h validate a request (disconnected, read-only, bounds, iov shape,
 * zero length) before an op ever sees it, so ops may trust their arguments.
 * A window forwards to its parent through the bdev_submit_* functions, which
 * validate against the parent again but take no sector lock.
 */
#pragma once

#include "nbdfs/blockdev.h"

struct blockdev_ops {
	/* Requests are validated: in bounds, count > 0, iov a whole number
	 * of sectors.  Each must call @done exactly once. */
	void (*read)(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		     blockdev_done_fn done, void *opaque);
	void (*write)(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		      uint32_t flags, blockdev_done_fn done, void *opaque);
	void (*flush)(Blockdev *dev, blockdev_done_fn done, void *opaque);
	void (*write_zeroes)(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
			     blockdev_done_fn done, void *opaque);
	void (*discard)(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
			void *opaque);
	void (*block_status)(Blockdev *dev, uint64_t sector, uint64_t count,
			     blockdev_extent_fn extent, blockdev_done_fn done, void *opaque);
	/* Optional: called once, by the first blockdev_disconnect. */
	void (*disconnect)(Blockdev *dev);
	/* Optional, roots only (blockdev.c forwards to the root): open-file
	 * hints and connection health. */
	void (*hold)(Blockdev *dev, gboolean held);
	void (*get_health)(Blockdev *dev, struct blockdev_health *out);
	/* Frees the device (the containing struct) and drops its references. */
	void (*destroy)(Blockdev *dev);
};

struct sector_locks;

struct blockdev {
	const struct blockdev_ops *ops;
	gint refcount;
	gint disconnected;	    /* atomic */
	Blockdev *root;		    /* self for a root; borrowed (kept alive by the parent chain) */
	struct blockdev_info info;  /* immutable after creation */
	uint64_t addr_sectors;	    /* addressable sectors: ceil(size / sector_size) */
	struct sector_locks *locks; /* root only: the byte layer's sector lock table */
	char *export_name;	    /* root only: owned strings info points at */
	char *uri;
};

/* Initialises the base of a root device (export name and uri are copied;
 * NULL gives "").  Fill dev->info's other fields before or after, then call
 * blockdev_finish_info(). */
void blockdev_init_root(Blockdev *dev, const struct blockdev_ops *ops, const char *export_name,
			const char *uri);
/* Initialises the base of a device that lives inside @parent (takes no
 * reference: the caller does). */
void blockdev_init_child(Blockdev *dev, const struct blockdev_ops *ops, Blockdev *parent);
/* Derives info.sectors and addr_sectors from info.size and sector_size. */
void blockdev_finish_info(Blockdev *dev);
/* Frees what blockdev_init_* allocated (not @dev itself). */
void blockdev_fini(Blockdev *dev);

static inline gboolean blockdev_is_disconnected(Blockdev *dev)
{
	return g_atomic_int_get(&dev->disconnected) != 0;
}

/* Validated dispatch without sector locking (windows, the byte layer). */
void bdev_submit_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		      blockdev_done_fn done, void *opaque);
void bdev_submit_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		       uint32_t flags, blockdev_done_fn done, void *opaque);
void bdev_submit_write_zeroes(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
			      blockdev_done_fn done, void *opaque);
void bdev_submit_discard(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
			 void *opaque);
void bdev_submit_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
			      blockdev_extent_fn extent, blockdev_done_fn done, void *opaque);

/* Checked bounds: 0 when [sector, sector + count) lies inside @dev. */
int bdev_check_range(Blockdev *dev, uint64_t sector, uint64_t count);

/* ---- Sector lock table (sector-lock.c) -----------------------------------
 * One table per root device, keyed by absolute sectors.  An entry covers the
 * sector range [start, end) of one write; its "exclusive" sectors are the
 * edge sectors it read-modify-writes.  Two entries conflict when their ranges
 * overlap on a sector that is exclusive to either.  Shared-only entries
 * (aligned writes) never conflict with each other.  A new entry also waits
 * behind an earlier waiting entry it conflicts with (FIFO fairness, so an
 * RMW is not starved by a stream of aligned writes).  No thread ever blocks:
 * a waiting entry's @granted runs later on the thread that releases the last
 * conflicting entry. */

typedef void (*sector_lock_fn)(void *opaque);

struct sector_lock {
	GList link;	     /* in the table's active or waiting queue */
	uint64_t start, end; /* absolute sectors, end exclusive */
	uint64_t excl[2];    /* exclusive sectors */
	int nexcl;	     /* 0, 1 or 2 */
	sector_lock_fn granted;
	void *opaque;
};

struct sector_locks *sector_locks_new(void);
void sector_locks_free(struct sector_locks *t);
/* Fills @l; @excl_head/@excl_tail mark start and end - 1 exclusive. */
void sector_lock_init(struct sector_lock *l, uint64_t start, uint64_t end, gboolean excl_head,
		      gboolean excl_tail, sector_lock_fn granted, void *opaque);
/* Calls l->granted (now, on this thread, or later on a releasing thread). */
void sector_lock_acquire(struct sector_locks *t, struct sector_lock *l);
void sector_lock_release(struct sector_locks *t, struct sector_lock *l);

/* Tests only: the memory device's max_request (bytes, a sector multiple). */
void blockdev_mem_set_max_request(Blockdev *dev, uint32_t max_request);
/* Tests only: each memory read/write first sleeps up to @max_delay_us
 * (random), to widen race windows. */
void blockdev_mem_set_delay(Blockdev *dev, guint max_delay_us);
