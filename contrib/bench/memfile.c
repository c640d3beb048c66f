/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* memfile.c: nbdfs-memfile, the benchmark's floor: one file held in memory,
 * served through exactly nbdfs's own FUSE request layer (src/fs: the same
 * loops, channels, decoding and replies), with no NBD behind it.
 *
 *   nbdfs-memfile [--direct-io] [-d] [--loops=N] SIZE MOUNTPOINT
 *
 * Runs in the foreground and serves MOUNTPOINT/disk (SIZE bytes, a decimal
 * count with an optional K/M/G suffix); ready when that file exists.
 * SIGTERM, SIGINT or `fusermount3 -u MOUNTPOINT` stop it (exit 0).  Not
 * installed: contrib/bench/bench.py runs it from the build tree.
 */
#include "config.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include "fs.h"
#include "nbdfs/blockdev.h"
#include "nbdfs/loop.h"

static const struct fuse_lowlevel_ops no_ops;

static gboolean parse_size(const char *s, uint64_t *out)
{
	char *end;
	guint64 v = g_ascii_strtoull(s, &end, 10);
	guint64 mult = 1;
	if (end == s)
		return FALSE;
	switch (*end) {
	case 'K':
	case 'k':
		mult = 1ull << 10;
		end++;
		break;
	case 'M':
	case 'm':
		mult = 1ull << 20;
		end++;
		break;
	case 'G':
	case 'g':
		mult = 1ull << 30;
		end++;
		break;
	default:
		break;
	}
	if (*end != '\0' || v == 0 || v > (1ull << 40) / mult)
		return FALSE;
	*out = v * mult;
	return TRUE;
}

int main(int argc, char *argv[])
{
	struct fs_config cfg = { .uid = getuid(), .gid = getgid() };
	const char *size_s = NULL, *mnt = NULL;
	guint nloops = 0;
	uint64_t size;
	g_autoptr(GError) err = NULL;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--direct-io") == 0)
			cfg.direct_io = TRUE;
		else if (strcmp(argv[i], "-d") == 0)
			cfg.debug = TRUE;
		else if (strncmp(argv[i], "--loops=", 8) == 0)
			nloops = (guint)atoi(argv[i] + 8);
		else if (!size_s)
			size_s = argv[i];
		else if (!mnt)
			mnt = argv[i];
		else
			size_s = NULL, i = argc;
	}
	if (!size_s || !mnt || !parse_size(size_s, &size)) {
		fprintf(stderr,
			"usage: nbdfs-memfile [--direct-io] [-d] [--loops=N] SIZE MOUNTPOINT\n");
		return 2;
	}
	if (cfg.debug)
		g_setenv("G_MESSAGES_DEBUG", "all", TRUE);

	Fs *fs = fs_new(&cfg);
	Blockdev *dev = blockdev_mem_new(512, size, NULL, 0, FALSE);
	/* Touch every page now: a floor that page-faults on first use of
	 * each page would measure the kernel's zero-page faults. */
	uint8_t *mem = blockdev_mem_data(dev);
	for (uint64_t off = 0; off < size; off += 4096)
		mem[off] = 0;
	if (!fs_add_export(fs, "disk", "memory", dev, &err)) {
		fprintf(stderr, "nbdfs-memfile: %s\n", err->message);
		return 1;
	}
	blockdev_unref(dev);

	char *fargv[] = { argv[0],
			  "-odefault_permissions",
			  "-ofsname=nbdfs-memfile",
			  "-osubtype=nbdfs-memfile",
			  "-omax_read=1048576",
			  NULL };
	struct fuse_args args = FUSE_ARGS_INIT(5, fargv);
	struct fuse_session *se = fuse_session_new(&args, &no_ops, sizeof(no_ops), NULL);
	if (!se)
		return 1;

	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	LoopSet *loops = loop_set_new(nloops, LOOP_POOL_UNBOUNDED, &err);
	if (!loops) {
		fprintf(stderr, "nbdfs-memfile: %s\n", err->message);
		return 1;
	}
	int ret = 1;
	if (fuse_session_mount(se, mnt) != 0)
		goto out;
	if (!fs_serve(fs, loops, fuse_session_fd(se), &err)) {
		fprintf(stderr, "nbdfs-memfile: %s\n", err->message);
		fuse_session_unmount(se);
		goto out;
	}
	fs_wait_for_stop(fs, &sigs);
	fuse_session_unmount(se);
	ret = fs_stop(fs, 5) ? 0 : 1;
	fs_unserve(fs);
out:
	fuse_session_destroy(se);
	fs_free(fs);
	loop_set_free(loops);
	return ret;
}
