/* blockdev.h: one block-device interface for NBD exports, windows of them
 * (partitions, splits) and in-memory devices (the C form of Mirage_block.S),
 * plus byte I/O on top.
 *
 * A Blockdev is reference counted.  Requests are in whole sectors; the
 * device's last sector may be partial (an export whose size is not a multiple
 * of the sector size): reading it gives zeros past the end and writing it
 * stores only the bytes inside the device.
 *
 * Completion: every asynchronous call calls @done exactly once, with 0 or a
 * negative errno (byte calls: a byte count or a negative errno).  @done may
 * run before the call returns (immediate errors, in-memory devices) or later
 * on another thread (an NBD reader), so a caller must not hold a lock that
 * @done takes.  Callbacks must not block for long.  Buffers (and iov arrays)
 * must stay valid until @done.
 *
 * Errors: -EINVAL out of bounds or misaligned, -ENOSPC write at/after the
 * end (byte calls), -EROFS write to a read-only device, -ENOTCONN after
 * disconnect, -EIO when an export stayed unreachable past its timeout,
 * -EOPNOTSUPP for an operation the device cannot do.
 */
#pragma once

#include <glib.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

G_BEGIN_DECLS

typedef struct blockdev Blockdev;

/* Set-up errors of the block layer (constructors, windows, splits). */
#define BLOCKDEV_ERROR (blockdev_error_quark())
GQuark blockdev_error_quark(void);

typedef enum {
	BLOCKDEV_ERROR_INVALID, /* a bad parameter (e.g. a sector size) */
	BLOCKDEV_ERROR_RANGE,	/* a window or split beyond the end of its parent */
} BlockdevError;

struct blockdev_info {
	uint32_t sector_size; /* 512 or 4096 (any power of two >= 512) */
	uint64_t size;	      /* bytes; may end with a partial sector */
	uint64_t sectors;     /* whole sectors: size / sector_size */
	uint64_t offset;      /* first sector within the root export, however deep */
	gboolean read_write;
	uint32_t pref_block;  /* preferred I/O size for st_blksize; 4096 if none */
	uint32_t max_request; /* bytes: largest efficient single read/write */
	gboolean can_flush, can_fua, can_trim, can_zero, can_block_status;
	const char *export_name; /* the root export's name; borrowed, valid while @dev lives */
	const char *uri;	 /* the root export's URI without secrets; borrowed */
};

typedef void (*blockdev_done_fn)(void *opaque, int err);
/* An extent of base:allocation state, in bytes relative to the device start. */
typedef void (*blockdev_extent_fn)(void *opaque, uint64_t offset, uint64_t length, uint32_t flags);
enum { BLOCKDEV_STATE_HOLE = 1 << 0, BLOCKDEV_STATE_ZERO = 1 << 1 };

/* Request flags. */
enum {
	BLOCKDEV_FUA = 1 << 0,	    /* write/zero: durable on completion */
	BLOCKDEV_MAY_TRIM = 1 << 1, /* zero: may deallocate (punch hole) */
};

Blockdev *blockdev_ref(Blockdev *dev);
void blockdev_unref(Blockdev *dev); /* NULL is a no-op */
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Blockdev, blockdev_unref)

void blockdev_get_info(Blockdev *dev, struct blockdev_info *info);

/* The root device (the export) under any partition; borrowed. */
Blockdev *blockdev_get_root(Blockdev *dev);

/* Sector I/O: iov lengths must add up to a whole number of sectors. */
void blockdev_read(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		   blockdev_done_fn done, void *opaque);
void blockdev_write(Blockdev *dev, uint64_t sector, const struct iovec *iov, int iovcnt,
		    uint32_t flags, blockdev_done_fn done, void *opaque);
/* Without a server flush: completes with 0. */
void blockdev_flush(Blockdev *dev, blockdev_done_fn done, void *opaque);
/* Reads back as zeros afterwards; BLOCKDEV_MAY_TRIM lets it deallocate. */
void blockdev_write_zeroes(Blockdev *dev, uint64_t sector, uint64_t count, uint32_t flags,
			   blockdev_done_fn done, void *opaque);
/* Advisory discard (NBD TRIM); contents are undefined afterwards. */
void blockdev_discard(Blockdev *dev, uint64_t sector, uint64_t count, blockdev_done_fn done,
		      void *opaque);
/* Extents covering [sector, sector+count) in order (possibly fewer bytes,
 * never more); -EOPNOTSUPP where the device has no block status. */
void blockdev_block_status(Blockdev *dev, uint64_t sector, uint64_t count,
			   blockdev_extent_fn extent, blockdev_done_fn done, void *opaque);

/* Marks this device disconnected: later requests fail with -ENOTCONN.  For
 * an export also fails the requests still waiting for a connection and sends
 * NBD_CMD_DISC; it does not flush (the caller flushes first, with its own
 * deadline).  Never blocks, never fails, idempotent.  A partition's
 * disconnect never touches its parent or siblings. */
void blockdev_disconnect(Blockdev *dev);

/* ---- Use and health (answered by the root export) --------------------------
 * A file of @dev was opened (@held TRUE) or closed (FALSE): an export opens
 * its connection ahead of the first request, and closes idle connections
 * only while nothing holds it.  Calls must pair. */
void blockdev_hold(Blockdev *dev, gboolean held);

enum blockdev_conn_state {
	BLOCKDEV_CONN_IDLE, /* no connection needed yet, or closed while idle */
	BLOCKDEV_CONN_CONNECTED,
	BLOCKDEV_CONN_RECONNECTING, /* lost; requests wait up to the timeout */
	BLOCKDEV_CONN_FAILED,	    /* the last wait ran out: requests failed with EIO */
};

struct blockdev_health {
	enum blockdev_conn_state state;
	uint64_t reconnects; /* connections re-established after a loss */
	/* Counts the times acknowledged writes that no flush had covered yet
	 * were lost (a server restart before the flush, and the replay failed).
	 * A file that saw it change since its last flush must fail its next
	 * flush with EIO (once), as Linux's errseq does for a disk. */
	uint64_t lost_writes_seq;
};

/* The root export's health; devices without a connection (memory) are
 * always CONNECTED with zero counts. */
void blockdev_get_health(Blockdev *dev, struct blockdev_health *out);
/* "idle", "connected", "reconnecting", "failed" (static). */
const char *blockdev_conn_state_name(enum blockdev_conn_state state);

/* Blocking wrappers (sync.c): return 0 or a negative errno. */
int blockdev_read_sync(Blockdev *dev, uint64_t sector, void *buf, size_t len);
int blockdev_write_sync(Blockdev *dev, uint64_t sector, const void *buf, size_t len,
			uint32_t flags);
int blockdev_flush_sync(Blockdev *dev);

/* ---- Windows (window.c) --------------------------------------------------
 * A window is [start, start+sectors) of its parent, itself a Blockdev: it
 * holds a reference on its parent, adds its start to every request and
 * bounds-checks it (-EINVAL, never a wrong sector).  Windows nest; info.offset
 * is absolute however deep.  A partition of a disk is a window (the table
 * reader, partition.h, only says where they are). */

/* A window of @sectors sectors from @start of @parent.  The window's size in
 * bytes is clipped to the parent's size (so a window over a partial last
 * sector is partial too).  Returns a new device (caller unrefs) or NULL with
 * BLOCKDEV_ERROR_RANGE (checked arithmetic: start + sectors must not overflow
 * or pass the parent's end). */
Blockdev *blockdev_window_new(Blockdev *parent, uint64_t start, uint64_t sectors, GError **error);

/* Splits @dev after @first_sectors sectors (the seed's connect/subpartition):
 * *first = [0, first_sectors), *rest = [first_sectors, end), either possibly
 * empty.  @first_sectors past the end fails with BLOCKDEV_ERROR_RANGE.  On
 * success the caller owns both (unref). */
gboolean blockdev_split(Blockdev *dev, uint64_t first_sectors, Blockdev **first, Blockdev **rest,
			GError **error);

/* An in-memory device of @size bytes (zero-filled), for tests.  @data (may
 * be NULL) is copied in, at most @size bytes of it.  Supports every op,
 * including block status (all data).  read_write unless @read_only. */
Blockdev *blockdev_mem_new(uint32_t sector_size, uint64_t size, const void *data, size_t data_len,
			   gboolean read_only);
/* Borrowed pointer to the memory device's bytes (tests only). */
uint8_t *blockdev_mem_data(Blockdev *dev);

/* ---- Byte I/O ------------------------------------------------------------
 * The one place that turns a file's (offset, length) into sector I/O.  The
 * aligned middle goes straight through with no copy; an unaligned head or
 * tail is read-modify-written under a lock on those sectors of the root
 * export (shared by every partition of it), so concurrent writers sharing
 * an edge sector never lose each other's bytes.  Large requests are split at
 * max_request.  @done gets the byte count or a negative errno:
 *   read:  short at the end, 0 at or past the end;
 *   write: -ENOSPC at or past the end, short when straddling it;
 *   zero:  0 or -errno (clipped to the end). */

typedef void (*blockdev_bytes_fn)(void *opaque, ssize_t result);

void blockdev_pread_bytes(Blockdev *dev, void *buf, size_t len, uint64_t offset,
			  blockdev_bytes_fn done, void *opaque);
void blockdev_pwrite_bytes(Blockdev *dev, const void *buf, size_t len, uint64_t offset,
			   uint32_t flags, blockdev_bytes_fn done, void *opaque);
/* flags: BLOCKDEV_MAY_TRIM (punch hole), BLOCKDEV_FUA. */
void blockdev_zero_bytes(Blockdev *dev, uint64_t offset, uint64_t len, uint32_t flags,
			 blockdev_bytes_fn done, void *opaque);

/* Blocking byte wrappers (sync.c). */
ssize_t blockdev_pread_bytes_sync(Blockdev *dev, void *buf, size_t len, uint64_t offset);
ssize_t blockdev_pwrite_bytes_sync(Blockdev *dev, const void *buf, size_t len, uint64_t offset,
				   uint32_t flags);
ssize_t blockdev_zero_bytes_sync(Blockdev *dev, uint64_t offset, uint64_t len, uint32_t flags);

G_END_DECLS
