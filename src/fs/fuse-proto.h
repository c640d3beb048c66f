/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* fuse-proto.h: the FUSE kernel protocol as nbdfs speaks it on /dev/fuse
 * (private to src/fs): decoding requests, encoding replies (codec.c).
 *
 * The wire structs are the kernel's own (<linux/fuse.h>, protocol 7.38 on
 * Debian 12); this header adds the few constants of newer protocols that
 * nbdfs may meet, the decoded form of a request, and the pure functions that
 * turn bytes into it and replies into bytes.  Nothing here does I/O, so the
 * unit tests (test/unit/fs) feed it recorded requests.
 *
 * Every byte read from /dev/fuse is checked before it is used: the header's
 * length must equal what read(2) returned, each opcode's argument struct must
 * fit, names must be NUL-terminated inside the message, and payload sizes
 * must match what is left.  A request that fails is answered EINVAL (or
 * dropped when even its header is unreadable).
 */
#pragma once

#include <linux/fuse.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/uio.h>

/* Opcodes and flags newer than the 7.38 header (the kernel here speaks 7.45). */
#ifndef FUSE_STATX
#define FUSE_STATX 52
#endif
#ifndef FUSE_COPY_FILE_RANGE_64
#define FUSE_COPY_FILE_RANGE_64 53
#endif

/* The protocol nbdfs implements (the oldest kernel it accepts is 7.31:
 * 5.2, for FUSE_MAX_PAGES and FUSE_NO_OPENDIR_SUPPORT's era). */
#define FUSEP_MAJOR 7
#define FUSEP_MINOR FUSE_KERNEL_MINOR_VERSION
#define FUSEP_MIN_MINOR 31

/* Requests up to 1 MiB (256 pages, the kernel's max_pages_limit here). */
#define FUSEP_MAX_IO (1024u * 1024u)
/* A read from /dev/fuse must have room for the largest WRITE: its header,
 * its argument struct and max_write bytes. */
#define FUSEP_HEADROOM 4096u
#define FUSEP_BUF_SIZE (FUSEP_MAX_IO + FUSEP_HEADROOM)

/* A request, decoded.  Pointers point into the buffer it was read into and
 * are valid as long as that buffer is. */
struct fusep_req {
	uint32_t opcode;
	uint64_t unique;
	uint64_t nodeid;
	uint32_t uid, gid, pid;
	union {
		struct {
			const char *name;
		} lookup; /* also REMOVEXATTR's name */
		struct {
			uint64_t nlookup;
		} forget;
		struct {
			uint32_t count;
			const struct fuse_forget_one *items; /* unaligned-safe copy: use memcpy */
		} batch_forget;
		struct {
			uint32_t major, minor, max_readahead;
			uint64_t flags; /* flags | flags2 << 32 */
		} init;
		struct {
			uint64_t fh;
			uint32_t flags;
		} getattr;
		struct {
			uint32_t valid;
			uint64_t fh, size;
		} setattr;
		struct {
			uint32_t flags;
		} open; /* OPEN, OPENDIR */
		struct {
			uint64_t fh, offset;
			uint32_t size, flags;
		} read; /* READ, READDIR */
		struct {
			uint64_t fh, offset;
			uint32_t size, flags, write_flags;
			const uint8_t *data;
		} write;
		struct {
			uint64_t fh;
			uint32_t flags; /* RELEASE: release_flags; FSYNC: fsync_flags */
		} release;		/* RELEASE, RELEASEDIR, FLUSH, FSYNC, FSYNCDIR */
		struct {
			const char *name;
			const char *value;
			uint32_t size, flags;
		} setxattr;
		struct {
			const char *name; /* NULL for LISTXATTR */
			uint32_t size;
		} getxattr; /* GETXATTR, LISTXATTR */
		struct {
			uint64_t fh, offset, length;
			uint32_t mode;
		} fallocate;
		struct {
			uint64_t fh, offset;
			uint32_t whence;
		} lseek;
		struct {
			uint64_t unique; /* the request to interrupt */
		} interrupt;
	};
};

/* Decodes the request of @len bytes at @buf (what one read(2) returned).
 * 0, or -EPROTO when the header itself is bad (no reply possible: @r->unique
 * is 0), or -EINVAL when the arguments are bad (reply EINVAL to @r->unique).
 * Unknown opcodes decode to their header only (reply ENOSYS). */
int fusep_decode(const void *buf, size_t len, struct fusep_req *r);

/* The opcode's name ("READ"), or "OP<n>" in @spare (>= 16 bytes). */
const char *fusep_opname(uint32_t opcode, char *spare);

/* ---- INIT -------------------------------------------------------------- */

struct fusep_init_cfg {
	bool writeback; /* -o writeback: FUSE_WRITEBACK_CACHE */
	uint16_t max_background;
	uint16_t congestion_threshold;
};

/* The reply to INIT: 0 with @out filled, or -EPROTO (major != 7, or a minor
 * too old; the error to send is then out->major == 0 && ...: reply EPROTO). */
int fusep_init_reply(const struct fusep_req *in, const struct fusep_init_cfg *cfg,
		     struct fuse_init_out *out);

/* ---- Replies -------------------------------------------------------------- */

/* A struct fuse_attr from @st. */
void fusep_attr(struct fuse_attr *a, const struct stat *st);
/* Seconds and nanoseconds from a timeout in seconds. */
void fusep_timeout(double secs, uint64_t *s, uint32_t *ns);

/* Appends one directory entry to @buf (@size bytes, @used of them used):
 * the bytes it takes, or 0 when it does not fit. */
size_t fusep_add_dirent(char *buf, size_t size, size_t used, const char *name, uint64_t ino,
			uint32_t type, uint64_t next_off);

/* A notification's header + struct (+ name): fills @iov[0..], returns the
 * count.  @hdr and @arg are the caller's storage. */
struct fusep_notify {
	struct fuse_out_header hdr;
	union {
		struct fuse_notify_inval_inode_out inode;
		struct fuse_notify_inval_entry_out entry;
	};
};
int fusep_notify_inval_inode(struct fusep_notify *n, uint64_t ino, int64_t off, int64_t len,
			     struct iovec *iov);
int fusep_notify_inval_entry(struct fusep_notify *n, uint64_t parent, const char *name,
			     struct iovec *iov);
