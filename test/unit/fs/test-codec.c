/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* test-codec.c: the FUSE codec (src/fs/codec.c) on requests a real kernel
 * wrote (requests.txt, recorded from nbdfs-memfile), on every truncation of
 * them, and on the replies it encodes. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glib.h>
#include <linux/falloc.h>
#include <string.h>
#include <unistd.h>

#include "fuse-proto.h"

struct recorded {
	char *name;
	GBytes *bytes;
};

static GPtrArray *requests; /* struct recorded * */

static void recorded_free(gpointer p)
{
	struct recorded *r = p;
	g_free(r->name);
	g_bytes_unref(r->bytes);
	g_free(r);
}

static void load_requests(void)
{
	g_autofree char *path = g_test_build_filename(G_TEST_DIST, "requests.txt", NULL);
	g_autofree char *text = NULL;
	g_autoptr(GError) err = NULL;
	if (!g_file_get_contents(path, &text, NULL, &err))
		g_error("%s", err->message);
	requests = g_ptr_array_new_with_free_func(recorded_free);
	g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
	for (char **l = lines; *l; l++) {
		if (**l == '#' || **l == '\0')
			continue;
		g_auto(GStrv) f = g_strsplit(*l, " ", 2);
		g_assert_nonnull(f[1]);
		gsize n = strlen(f[1]) / 2;
		guint8 *b = g_malloc(n);
		for (gsize i = 0; i < n; i++) {
			char hex[3] = { f[1][2 * i], f[1][2 * i + 1], 0 };
			b[i] = (guint8)g_ascii_strtoull(hex, NULL, 16);
		}
		struct recorded *r = g_new0(struct recorded, 1);
		r->name = g_strdup(f[0]);
		r->bytes = g_bytes_new_take(b, n);
		g_ptr_array_add(requests, r);
	}
	g_assert_cmpuint(requests->len, >=, 15);
}

static GBytes *recorded(const char *name)
{
	for (guint i = 0; i < requests->len; i++) {
		struct recorded *r = requests->pdata[i];
		if (strcmp(r->name, name) == 0)
			return r->bytes;
	}
	g_error("no recorded %s request", name);
	return NULL;
}

/* Decodes the recorded @name into @q (the bytes stay in @buf for the pointers). */
static void decode(const char *name, struct fusep_req *q)
{
	gsize n;
	const void *b = g_bytes_get_data(recorded(name), &n);
	g_assert_cmpint(fusep_decode(b, n, q), ==, 0);
	char spare[16];
	g_assert_cmpstr(fusep_opname(q->opcode, spare), ==, name);
	g_assert_cmpuint(q->unique, !=, 0);
}

static void test_recorded(void)
{
	struct fusep_req q;

	for (guint i = 0; i < requests->len; i++) {
		struct recorded *r = requests->pdata[i];
		decode(r->name, &q);
	}
	decode("INIT", &q);
	g_assert_cmpuint(q.init.major, ==, 7);
	g_assert_cmpuint(q.init.minor, >=, FUSEP_MIN_MINOR);
	g_assert_true(q.init.flags & FUSE_HANDLE_KILLPRIV_V2);
	decode("LOOKUP", &q);
	g_assert_cmpuint(q.nodeid, ==, FUSE_ROOT_ID);
	g_assert_cmpstr(q.lookup.name, ==, "disk");
	decode("WRITE", &q);
	g_assert_cmpuint(q.write.offset, ==, 4096);
	g_assert_cmpuint(q.write.size, ==, 16);
	g_assert_cmpmem(q.write.data, 16, "recorded payload", 16);
	decode("READ", &q);
	g_assert_cmpuint(q.read.offset, ==, 0);
	g_assert_cmpuint(q.read.size, ==, 512);
	decode("LSEEK", &q);
	g_assert_cmpuint(q.lseek.whence, ==, SEEK_DATA);
	g_assert_cmpuint(q.lseek.offset, ==, 0);
	decode("FALLOCATE", &q);
	g_assert_cmpuint(q.fallocate.mode, ==, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
	g_assert_cmpuint(q.fallocate.offset, ==, 8192);
	g_assert_cmpuint(q.fallocate.length, ==, 4096);
	decode("SETXATTR", &q);
	g_assert_cmpstr(q.setxattr.name, ==, "user.nbdfs.partition");
	g_assert_cmpuint(q.setxattr.size, ==, 4);
	g_assert_cmpmem(q.setxattr.value, 4, "1024", 4);
	decode("GETXATTR", &q);
	g_assert_cmpstr(q.getxattr.name, ==, "user.nbdfs.state");
	decode("LISTXATTR", &q);
	g_assert_null(q.getxattr.name);
	decode("FORGET", &q);
	g_assert_cmpuint(q.forget.nlookup, >=, 1);
	decode("OPEN", &q);
	g_assert_true(q.open.flags & O_DIRECT);
	decode("RELEASE", &q);
	g_assert_cmpuint(q.release.fh, !=, 0);
}

/* Every prefix of every recorded request: the header's length no longer
 * matches (EPROTO); with the length patched to match, the arguments are
 * short (EINVAL) or enough.  ASan checks that nothing reads past the end. */
static void test_truncated(void)
{
	for (guint i = 0; i < requests->len; i++) {
		struct recorded *r = requests->pdata[i];
		gsize n;
		const guint8 *b = g_bytes_get_data(r->bytes, &n);
		for (gsize len = 0; len < n; len++) {
			struct fusep_req q;
			guint8 *copy = g_memdup2(b, len ? len : 1);
			g_assert_cmpint(fusep_decode(copy, len, &q), ==, -EPROTO);
			if (len >= sizeof(struct fuse_in_header)) {
				uint32_t l = (uint32_t)len;
				memcpy(copy, &l, sizeof(l));
				int rc = fusep_decode(copy, len, &q);
				g_assert_true(rc == 0 || rc == -EINVAL);
			}
			g_free(copy);
		}
	}
}

static void test_bad_arguments(void)
{
	struct fusep_req q;
	gsize n;
	const guint8 *b = g_bytes_get_data(recorded("LOOKUP"), &n);
	g_autofree guint8 *c = g_memdup2(b, n);

	/* A name without its NUL. */
	c[n - 1] = 'x';
	g_assert_cmpint(fusep_decode(c, n, &q), ==, -EINVAL);
	/* A WRITE whose size says more than it carries. */
	b = g_bytes_get_data(recorded("WRITE"), &n);
	g_autofree guint8 *w = g_memdup2(b, n);
	struct fuse_write_in in;
	memcpy(&in, w + sizeof(struct fuse_in_header), sizeof(in));
	in.size += 1;
	memcpy(w + sizeof(struct fuse_in_header), &in, sizeof(in));
	g_assert_cmpint(fusep_decode(w, n, &q), ==, -EINVAL);
	/* A SETXATTR whose value size is wrong. */
	b = g_bytes_get_data(recorded("SETXATTR"), &n);
	g_autofree guint8 *s = g_memdup2(b, n);
	uint32_t big = 1000;
	memcpy(s + sizeof(struct fuse_in_header), &big, sizeof(big));
	g_assert_cmpint(fusep_decode(s, n, &q), ==, -EINVAL);
	/* Extensions longer than the message. */
	g_autofree guint8 *e = g_memdup2(b, n);
	struct fuse_in_header h;
	memcpy(&h, e, sizeof(h));
	h.total_extlen = 0xffff;
	memcpy(e, &h, sizeof(h));
	g_assert_cmpint(fusep_decode(e, n, &q), ==, -EINVAL);
	/* An opcode nobody knows decodes to its header (ENOSYS is the reply). */
	g_autofree guint8 *u = g_memdup2(b, n);
	memcpy(&h, u, sizeof(h));
	h.opcode = 4000;
	h.total_extlen = 0;
	memcpy(u, &h, sizeof(h));
	g_assert_cmpint(fusep_decode(u, n, &q), ==, 0);
	char spare[16];
	g_assert_cmpstr(fusep_opname(4000, spare), ==, "OP4000");
}

static void test_init_reply(void)
{
	struct fusep_req q;
	struct fuse_init_out out;
	struct fusep_init_cfg cfg = { .max_background = 64, .congestion_threshold = 48 };

	decode("INIT", &q);
	g_assert_cmpint(fusep_init_reply(&q, &cfg, &out), ==, 0);
	g_assert_cmpuint(out.major, ==, 7);
	g_assert_cmpuint(out.minor, ==, MIN(q.init.minor, (uint32_t)FUSEP_MINOR));
	uint64_t taken = out.flags | (uint64_t)out.flags2 << 32;
	g_assert_cmpuint(taken & ~q.init.flags, ==, 0); /* only what was offered */
	g_assert_true(taken & FUSE_HANDLE_KILLPRIV_V2);
	g_assert_true(taken & FUSE_MAX_PAGES);
	g_assert_true(taken & FUSE_ASYNC_DIO);
	g_assert_false(taken & FUSE_WRITEBACK_CACHE);
	g_assert_false(taken & FUSE_ATOMIC_O_TRUNC); /* O_TRUNC must reach SETATTR */
	g_assert_false(taken & (FUSE_SPLICE_READ | FUSE_SPLICE_WRITE | FUSE_SPLICE_MOVE));
	g_assert_cmpuint(out.max_write, ==, FUSEP_MAX_IO);
	g_assert_cmpuint(out.max_pages, ==, 256);
	g_assert_cmpuint(out.max_background, ==, 64);
	g_assert_cmpuint(out.max_readahead, ==, q.init.max_readahead);

	cfg.writeback = TRUE;
	g_assert_cmpint(fusep_init_reply(&q, &cfg, &out), ==, 0);
	g_assert_true(out.flags & FUSE_WRITEBACK_CACHE);

	struct fusep_req old = q;
	old.init.flags &= ~(uint64_t)FUSE_HANDLE_KILLPRIV_V2;
	g_assert_cmpint(fusep_init_reply(&old, &cfg, &out), ==, 0);
	g_assert_false(out.flags & FUSE_HANDLE_KILLPRIV_V2);
	old.init.minor = FUSEP_MIN_MINOR - 1;
	g_assert_cmpint(fusep_init_reply(&old, &cfg, &out), ==, -EPROTO);
	old.init.minor = 45;
	old.init.major = 8;
	g_assert_cmpint(fusep_init_reply(&old, &cfg, &out), ==, -EPROTO);
}

static void test_dirent(void)
{
	char buf[96];
	size_t used = 0, n;

	n = fusep_add_dirent(buf, sizeof(buf), used, "disk", 2, DT_REG, 1);
	g_assert_cmpuint(n, ==, FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + 4));
	g_assert_cmpuint(n % 8, ==, 0);
	struct fuse_dirent d;
	memcpy(&d, buf, FUSE_NAME_OFFSET);
	g_assert_cmpuint(d.ino, ==, 2);
	g_assert_cmpuint(d.off, ==, 1);
	g_assert_cmpuint(d.namelen, ==, 4);
	g_assert_cmpuint(d.type, ==, DT_REG);
	g_assert_cmpmem(buf + FUSE_NAME_OFFSET, 4, "disk", 4);
	used += n;
	n = fusep_add_dirent(buf, sizeof(buf), used, "disk-part1", 3, DT_REG, 2);
	g_assert_cmpuint(n, ==, 40); /* 24 + 10, padded to 8 */
	used += n;
	/* No room left: nothing written, 0. */
	g_assert_cmpuint(fusep_add_dirent(buf, sizeof(buf), used, "x", 4, DT_REG, 3), ==, 0);
	g_assert_cmpuint(fusep_add_dirent(buf, 8, 0, "x", 4, DT_REG, 3), ==, 0);
}

static void test_notify(void)
{
	struct fusep_notify n;
	struct iovec iov[3];
	int cnt = fusep_notify_inval_inode(&n, 7, 4096, 8192, iov);
	g_assert_cmpint(cnt, ==, 2);
	g_assert_cmpuint(n.hdr.len, ==, iov[0].iov_len + iov[1].iov_len);
	g_assert_cmpint(n.hdr.error, ==, FUSE_NOTIFY_INVAL_INODE);
	g_assert_cmpuint(n.hdr.unique, ==, 0);
	g_assert_cmpuint(n.inode.ino, ==, 7);
	g_assert_cmpint(n.inode.off, ==, 4096);
	g_assert_cmpint(n.inode.len, ==, 8192);
	cnt = fusep_notify_inval_entry(&n, FUSE_ROOT_ID, "disk-part2", iov);
	g_assert_cmpint(cnt, ==, 3);
	g_assert_cmpuint(n.hdr.len, ==, iov[0].iov_len + iov[1].iov_len + iov[2].iov_len);
	g_assert_cmpuint(iov[2].iov_len, ==, 11); /* the name and its NUL */
	g_assert_cmpint(n.hdr.error, ==, FUSE_NOTIFY_INVAL_ENTRY);
	g_assert_cmpuint(n.entry.namelen, ==, 10);
}

static void test_attr(void)
{
	struct stat st = { 0 };
	struct fuse_attr a;
	st.st_ino = 5;
	st.st_size = 1 << 20;
	st.st_blocks = 2048;
	st.st_mode = S_IFREG | 0644;
	st.st_nlink = 1;
	st.st_uid = 1000;
	st.st_gid = 100;
	st.st_blksize = 65536;
	st.st_mtim.tv_sec = 1700000000;
	st.st_mtim.tv_nsec = 5;
	fusep_attr(&a, &st);
	g_assert_cmpuint(a.ino, ==, 5);
	g_assert_cmpuint(a.size, ==, 1 << 20);
	g_assert_cmpuint(a.blocks, ==, 2048);
	g_assert_cmpuint(a.mode, ==, S_IFREG | 0644);
	g_assert_cmpuint(a.uid, ==, 1000);
	g_assert_cmpuint(a.gid, ==, 100);
	g_assert_cmpuint(a.blksize, ==, 65536);
	g_assert_cmpuint(a.mtime, ==, 1700000000);
	g_assert_cmpuint(a.mtimensec, ==, 5);

	uint64_t s;
	uint32_t ns;
	fusep_timeout(1.5, &s, &ns);
	g_assert_cmpuint(s, ==, 1);
	g_assert_cmpuint(ns, ==, 500000000);
	fusep_timeout(-1, &s, &ns);
	g_assert_cmpuint(s, ==, 0);
	g_assert_cmpuint(ns, ==, 0);
}

int main(int argc, char *argv[])
{
	g_test_init(&argc, &argv, NULL);
	load_requests();
	g_test_add_func("/codec/recorded", test_recorded);
	g_test_add_func("/codec/truncated", test_truncated);
	g_test_add_func("/codec/bad-arguments", test_bad_arguments);
	g_test_add_func("/codec/init-reply", test_init_reply);
	g_test_add_func("/codec/dirent", test_dirent);
	g_test_add_func("/codec/notify", test_notify);
	g_test_add_func("/codec/attr", test_attr);
	int r = g_test_run();
	g_ptr_array_unref(requests);
	return r;
}
