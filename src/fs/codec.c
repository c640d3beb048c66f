/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* codec.c: FUSE requests from bytes, replies to bytes (see fuse-proto.h). */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "fuse-proto.h"

/* ---- Decoding ------------------------------------------------------------ */

/* The request body after the header, consumed front to back. */
struct body {
	const uint8_t *p;
	size_t left;
};

static bool take(struct body *b, void *out, size_t n)
{
	if (b->left < n)
		return false;
	memcpy(out, b->p, n);
	b->p += n;
	b->left -= n;
	return true;
}

/* A NUL-terminated string inside the body. */
static const char *take_name(struct body *b)
{
	const uint8_t *nul = memchr(b->p, '\0', b->left);
	if (nul == NULL)
		return NULL;
	const char *s = (const char *)b->p;
	size_t n = (size_t)(nul - b->p) + 1;
	b->p += n;
	b->left -= n;
	return s;
}

int fusep_decode(const void *buf, size_t len, struct fusep_req *r)
{
	struct fuse_in_header h;
	memset(r, 0, sizeof(*r));
	if (len < sizeof(h))
		return -EPROTO;
	memcpy(&h, buf, sizeof(h));
	if (h.len != len)
		return -EPROTO;
	r->opcode = h.opcode;
	r->unique = h.unique;
	r->nodeid = h.nodeid;
	r->uid = h.uid;
	r->gid = h.gid;
	r->pid = h.pid;
	/* Extensions (security context, supplementary groups) trail the
	 * arguments; nbdfs asks for none, but skip them if present. */
	size_t ext = (size_t)h.total_extlen * 8;
	if (ext > len - sizeof(h))
		return -EINVAL;
	struct body b = { (const uint8_t *)buf + sizeof(h), len - sizeof(h) - ext };

	switch (h.opcode) {
	case FUSE_LOOKUP:
	case FUSE_REMOVEXATTR:
		r->lookup.name = take_name(&b);
		return r->lookup.name ? 0 : -EINVAL;
	case FUSE_FORGET: {
		struct fuse_forget_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->forget.nlookup = in.nlookup;
		return 0;
	}
	case FUSE_BATCH_FORGET: {
		struct fuse_batch_forget_in in;
		if (!take(&b, &in, sizeof(in)) ||
		    in.count > b.left / sizeof(struct fuse_forget_one))
			return -EINVAL;
		r->batch_forget.count = in.count;
		r->batch_forget.items = (const struct fuse_forget_one *)b.p;
		return 0;
	}
	case FUSE_INIT: {
		struct fuse_init_in in = { 0 };
		/* 7.36+ kernels send the extended struct; older ones the first 16 bytes. */
		size_t n = b.left >= sizeof(in) ? sizeof(in) : 16;
		if (!take(&b, &in, n))
			return -EINVAL;
		r->init.major = in.major;
		r->init.minor = in.minor;
		r->init.max_readahead = in.max_readahead;
		r->init.flags = in.flags;
		if (in.flags & FUSE_INIT_EXT)
			r->init.flags |= (uint64_t)in.flags2 << 32;
		return 0;
	}
	case FUSE_GETATTR: {
		struct fuse_getattr_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->getattr.fh = in.fh;
		r->getattr.flags = in.getattr_flags;
		return 0;
	}
	case FUSE_SETATTR: {
		struct fuse_setattr_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->setattr.valid = in.valid;
		r->setattr.fh = in.fh;
		r->setattr.size = in.size;
		return 0;
	}
	case FUSE_OPEN:
	case FUSE_OPENDIR: {
		struct fuse_open_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->open.flags = in.flags;
		return 0;
	}
	case FUSE_READ:
	case FUSE_READDIR: {
		struct fuse_read_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->read.fh = in.fh;
		r->read.offset = in.offset;
		r->read.size = in.size;
		r->read.flags = in.flags;
		return 0;
	}
	case FUSE_WRITE: {
		struct fuse_write_in in;
		if (!take(&b, &in, sizeof(in)) || in.size != b.left)
			return -EINVAL;
		r->write.fh = in.fh;
		r->write.offset = in.offset;
		r->write.size = in.size;
		r->write.flags = in.flags;
		r->write.write_flags = in.write_flags;
		r->write.data = b.p;
		return 0;
	}
	case FUSE_RELEASE:
	case FUSE_RELEASEDIR: {
		struct fuse_release_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->release.fh = in.fh;
		r->release.flags = in.release_flags;
		return 0;
	}
	case FUSE_FLUSH: {
		struct fuse_flush_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->release.fh = in.fh;
		return 0;
	}
	case FUSE_FSYNC:
	case FUSE_FSYNCDIR: {
		struct fuse_fsync_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->release.fh = in.fh;
		r->release.flags = in.fsync_flags;
		return 0;
	}
	case FUSE_SETXATTR: {
		/* nbdfs does not ask for FUSE_SETXATTR_EXT: the short struct. */
		struct fuse_setxattr_in in;
		if (!take(&b, &in, FUSE_COMPAT_SETXATTR_IN_SIZE))
			return -EINVAL;
		r->setxattr.name = take_name(&b);
		if (r->setxattr.name == NULL || in.size != b.left)
			return -EINVAL;
		r->setxattr.value = (const char *)b.p;
		r->setxattr.size = in.size;
		r->setxattr.flags = in.flags;
		return 0;
	}
	case FUSE_GETXATTR:
	case FUSE_LISTXATTR: {
		struct fuse_getxattr_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->getxattr.size = in.size;
		if (h.opcode == FUSE_GETXATTR) {
			r->getxattr.name = take_name(&b);
			if (r->getxattr.name == NULL)
				return -EINVAL;
		}
		return 0;
	}
	case FUSE_FALLOCATE: {
		struct fuse_fallocate_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->fallocate.fh = in.fh;
		r->fallocate.offset = in.offset;
		r->fallocate.length = in.length;
		r->fallocate.mode = in.mode;
		return 0;
	}
	case FUSE_LSEEK: {
		struct fuse_lseek_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->lseek.fh = in.fh;
		r->lseek.offset = in.offset;
		r->lseek.whence = in.whence;
		return 0;
	}
	case FUSE_INTERRUPT: {
		struct fuse_interrupt_in in;
		if (!take(&b, &in, sizeof(in)))
			return -EINVAL;
		r->interrupt.unique = in.unique;
		return 0;
	}
	default:
		return 0;
	}
}

static const char *const opnames[] = {
	[FUSE_LOOKUP] = "LOOKUP",
	[FUSE_FORGET] = "FORGET",
	[FUSE_GETATTR] = "GETATTR",
	[FUSE_SETATTR] = "SETATTR",
	[FUSE_READLINK] = "READLINK",
	[FUSE_SYMLINK] = "SYMLINK",
	[FUSE_MKNOD] = "MKNOD",
	[FUSE_MKDIR] = "MKDIR",
	[FUSE_UNLINK] = "UNLINK",
	[FUSE_RMDIR] = "RMDIR",
	[FUSE_RENAME] = "RENAME",
	[FUSE_LINK] = "LINK",
	[FUSE_OPEN] = "OPEN",
	[FUSE_READ] = "READ",
	[FUSE_WRITE] = "WRITE",
	[FUSE_STATFS] = "STATFS",
	[FUSE_RELEASE] = "RELEASE",
	[FUSE_FSYNC] = "FSYNC",
	[FUSE_SETXATTR] = "SETXATTR",
	[FUSE_GETXATTR] = "GETXATTR",
	[FUSE_LISTXATTR] = "LISTXATTR",
	[FUSE_REMOVEXATTR] = "REMOVEXATTR",
	[FUSE_FLUSH] = "FLUSH",
	[FUSE_INIT] = "INIT",
	[FUSE_OPENDIR] = "OPENDIR",
	[FUSE_READDIR] = "READDIR",
	[FUSE_RELEASEDIR] = "RELEASEDIR",
	[FUSE_FSYNCDIR] = "FSYNCDIR",
	[FUSE_GETLK] = "GETLK",
	[FUSE_SETLK] = "SETLK",
	[FUSE_SETLKW] = "SETLKW",
	[FUSE_ACCESS] = "ACCESS",
	[FUSE_CREATE] = "CREATE",
	[FUSE_INTERRUPT] = "INTERRUPT",
	[FUSE_BMAP] = "BMAP",
	[FUSE_DESTROY] = "DESTROY",
	[FUSE_IOCTL] = "IOCTL",
	[FUSE_POLL] = "POLL",
	[FUSE_NOTIFY_REPLY] = "NOTIFY_REPLY",
	[FUSE_BATCH_FORGET] = "BATCH_FORGET",
	[FUSE_FALLOCATE] = "FALLOCATE",
	[FUSE_READDIRPLUS] = "READDIRPLUS",
	[FUSE_RENAME2] = "RENAME2",
	[FUSE_LSEEK] = "LSEEK",
	[FUSE_COPY_FILE_RANGE] = "COPY_FILE_RANGE",
	[FUSE_SETUPMAPPING] = "SETUPMAPPING",
	[FUSE_REMOVEMAPPING] = "REMOVEMAPPING",
	[FUSE_SYNCFS] = "SYNCFS",
	[FUSE_TMPFILE] = "TMPFILE",
	[FUSE_STATX] = "STATX",
};

const char *fusep_opname(uint32_t opcode, char *spare)
{
	if (opcode < sizeof(opnames) / sizeof(opnames[0]) && opnames[opcode])
		return opnames[opcode];
	snprintf(spare, 16, "OP%u", opcode);
	return spare;
}

/* ---- INIT ---------------------------------------------------------------- */

int fusep_init_reply(const struct fusep_req *in, const struct fusep_init_cfg *cfg,
		     struct fuse_init_out *out)
{
	memset(out, 0, sizeof(*out));
	out->major = FUSEP_MAJOR;
	out->minor = FUSEP_MINOR;
	if (in->init.major != FUSEP_MAJOR || in->init.minor < FUSEP_MIN_MINOR)
		return -EPROTO;
	if (in->init.minor < out->minor)
		out->minor = in->init.minor;
	uint64_t offered = in->init.flags;
	/* ASYNC_READ: readahead in parallel.  BIG_WRITES/MAX_PAGES: 1 MiB
	 * requests.  ASYNC_DIO: an O_DIRECT request is split into parallel
	 * requests.  PARALLEL_DIROPS: lookups need no directory lock.
	 * HANDLE_KILLPRIV_V2: the kernel does not ask for security.capability
	 * before every buffered write (the files have no privileges to kill).
	 * Not ATOMIC_O_TRUNC: O_TRUNC reaches SETATTR, which keeps the size.
	 * No splice: replies are written from our own buffers. */
	uint64_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ASYNC_DIO |
			FUSE_PARALLEL_DIROPS | FUSE_HANDLE_KILLPRIV_V2 | FUSE_INIT_EXT;
	if (cfg->writeback)
		want |= FUSE_WRITEBACK_CACHE;
	uint64_t flags = offered & want;
	out->flags = (uint32_t)flags;
	out->flags2 = (uint32_t)(flags >> 32);
	out->max_readahead = in->init.max_readahead;
	out->max_background = cfg->max_background;
	out->congestion_threshold = cfg->congestion_threshold;
	out->max_write = FUSEP_MAX_IO;
	out->time_gran = 1;
	out->max_pages = FUSEP_MAX_IO / 4096;
	return 0;
}

/* ---- Replies --------------------------------------------------------------- */

void fusep_attr(struct fuse_attr *a, const struct stat *st)
{
	memset(a, 0, sizeof(*a));
	a->ino = st->st_ino;
	a->size = (uint64_t)st->st_size;
	a->blocks = (uint64_t)st->st_blocks;
	a->atime = (uint64_t)st->st_atim.tv_sec;
	a->mtime = (uint64_t)st->st_mtim.tv_sec;
	a->ctime = (uint64_t)st->st_ctim.tv_sec;
	a->atimensec = (uint32_t)st->st_atim.tv_nsec;
	a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
	a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
	a->mode = st->st_mode;
	a->nlink = (uint32_t)st->st_nlink;
	a->uid = st->st_uid;
	a->gid = st->st_gid;
	a->rdev = (uint32_t)st->st_rdev;
	a->blksize = (uint32_t)st->st_blksize;
}

void fusep_timeout(double secs, uint64_t *s, uint32_t *ns)
{
	if (secs < 0)
		secs = 0;
	*s = (uint64_t)secs;
	*ns = (uint32_t)((secs - (double)*s) * 1e9);
}

size_t fusep_add_dirent(char *buf, size_t size, size_t used, const char *name, uint64_t ino,
			uint32_t type, uint64_t next_off)
{
	size_t namelen = strlen(name);
	size_t entlen = FUSE_NAME_OFFSET + namelen;
	size_t padded = FUSE_DIRENT_ALIGN(entlen);
	if (used > size || padded > size - used)
		return 0;
	struct fuse_dirent d = {
		.ino = ino, .off = next_off, .namelen = (uint32_t)namelen, .type = type
	};
	char *p = buf + used;
	memcpy(p, &d, FUSE_NAME_OFFSET);
	memcpy(p + FUSE_NAME_OFFSET, name, namelen);
	memset(p + entlen, 0, padded - entlen);
	return padded;
}

int fusep_notify_inval_inode(struct fusep_notify *n, uint64_t ino, int64_t off, int64_t len,
			     struct iovec *iov)
{
	memset(n, 0, sizeof(*n));
	n->inode.ino = ino;
	n->inode.off = off;
	n->inode.len = len;
	n->hdr.error = FUSE_NOTIFY_INVAL_INODE;
	n->hdr.len = sizeof(n->hdr) + sizeof(n->inode);
	iov[0] = (struct iovec){ &n->hdr, sizeof(n->hdr) };
	iov[1] = (struct iovec){ &n->inode, sizeof(n->inode) };
	return 2;
}

int fusep_notify_inval_entry(struct fusep_notify *n, uint64_t parent, const char *name,
			     struct iovec *iov)
{
	size_t namelen = strlen(name);
	memset(n, 0, sizeof(*n));
	n->entry.parent = parent;
	n->entry.namelen = (uint32_t)namelen;
	n->hdr.error = FUSE_NOTIFY_INVAL_ENTRY;
	n->hdr.len = (uint32_t)(sizeof(n->hdr) + sizeof(n->entry) + namelen + 1);
	iov[0] = (struct iovec){ &n->hdr, sizeof(n->hdr) };
	iov[1] = (struct iovec){ &n->entry, sizeof(n->entry) };
	iov[2] = (struct iovec){ (void *)name, namelen + 1 };
	return 3;
}
