/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* libFuzzer target: the FUSE request decoder (src/fs/codec.c) fed arbitrary
 * bytes as one read(2) from /dev/fuse would return them.  Whatever decodes
 * must stay inside the input: names and values end before its end, a WRITE's
 * payload lies within it, a BATCH_FORGET's items too; INIT's reply is built. */
#include "config.h"

#include <errno.h>
#include <linux/fuse.h>
#include <stdlib.h>
#include <string.h>

#include "fuse-proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void inside(const uint8_t *buf, size_t len, const void *p, size_t n)
{
	const uint8_t *q = p;
	if (q < buf || q + n > buf + len)
		abort();
}

static void string_inside(const uint8_t *buf, size_t len, const char *s)
{
	if (s == NULL)
		return;
	inside(buf, len, s, 1);
	inside(buf, len, s, strnlen(s, (size_t)(buf + len - (const uint8_t *)s)) + 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	/* A copy of exactly @size bytes: ASan sees a read past the request. */
	uint8_t *buf = malloc(size ? size : 1);
	struct fusep_req r;
	char spare[16];

	memcpy(buf, data, size);
	memset(&r, 0, sizeof(r));
	int e = fusep_decode(buf, size, &r);
	if (e != 0 && e != -EPROTO && e != -EINVAL)
		abort();
	(void)fusep_opname(r.opcode, spare);
	if (e == 0) {
		switch (r.opcode) {
		case FUSE_LOOKUP:
		case FUSE_REMOVEXATTR:
			string_inside(buf, size, r.lookup.name);
			break;
		case FUSE_WRITE:
			if (r.write.size)
				inside(buf, size, r.write.data, r.write.size);
			break;
		case FUSE_BATCH_FORGET:
			if (r.batch_forget.count)
				inside(buf, size, r.batch_forget.items,
				       (size_t)r.batch_forget.count *
					       sizeof(struct fuse_forget_one));
			break;
		case FUSE_SETXATTR:
			string_inside(buf, size, r.setxattr.name);
			if (r.setxattr.size)
				inside(buf, size, r.setxattr.value, r.setxattr.size);
			break;
		case FUSE_GETXATTR:
			string_inside(buf, size, r.getxattr.name);
			break;
		case FUSE_INIT: {
			struct fusep_init_cfg cfg = { .writeback = size & 1, .max_background = 64 };
			struct fuse_init_out out;
			(void)fusep_init_reply(&r, &cfg, &out);
			break;
		}
		default:
			break;
		}
	}
	free(buf);
	return 0;
}
