/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* fs.h: the nbdfs FUSE layer as main.c sees it (private to the daemon).
 *
 * main.c builds one Blockdev per export, hands each to fs_add_export(),
 * applies the mount-time partitioning (-P, split=), mounts with libfuse
 * (options, fusermount3) and gives the connected /dev/fuse descriptor to
 * fs_serve(): from then on the event loops read and answer the kernel's
 * requests themselves (src/fs/session.c).  At the end fs_stop() drains and
 * flushes within a deadline and fs_unserve() lets go of the descriptor.
 */
#pragma once

#include <glib.h>
#include <signal.h>
#include <sys/types.h>

#include "nbdfs/blockdev.h"

G_BEGIN_DECLS

#define FS_ERROR (fs_error_quark())
GQuark fs_error_quark(void);

typedef enum {
	FS_ERROR_NAME_CLASH, /* two files would get the same name */
	FS_ERROR_NOT_FOUND,  /* no such file in the mount */
	FS_ERROR_BUSY,	     /* a partition file below is open */
	FS_ERROR_INVALID,    /* malformed value, split beyond the end, no table */
	FS_ERROR_IO,	     /* reading a table failed */
	FS_ERROR_NO_TABLE,   /* "auto" on a file with no valid MBR/GPT */
} FsError;

struct fs_config {
	gboolean read_only; /* -o ro: every file read-only */
	gboolean writeback; /* -o writeback: kernel writeback cache, no alias coherence */
	uid_t uid;	    /* owner of every file */
	gid_t gid;
	mode_t umask;	    /* masks 0644/0444 and the root dir's 0755 */
	gboolean debug;	    /* -d: one log line per FUSE request */
	gboolean direct_io; /* every open bypasses the page cache (the benchmark's floor) */
};

typedef struct fs Fs;

/* A new, empty file tree.  Caller frees with fs_free (after the session). */
Fs *fs_new(const struct fs_config *cfg);
void fs_free(Fs *fs);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Fs, fs_free)

/* Adds export @dev (a reference is taken) as file @raw_name (escaped here;
 * "" gives "disk").  @source (borrowed, copied) names where it came from in
 * error messages.  Fails with FS_ERROR_NAME_CLASH naming both sources. */
gboolean fs_add_export(Fs *fs, const char *raw_name, const char *source, Blockdev *dev,
		       GError **error);

/* Applies a user.nbdfs.partition value ("auto", "none", "SECTORS") to the file
 * called @file, as at mount time.  GError in FS_ERROR. */
gboolean fs_partition_file(Fs *fs, const char *file, const char *value, GError **error);

/* -P: scans every export's table; exports without one get no partition files
 * (logged), other failures are returned. */
gboolean fs_partition_all(Fs *fs, GError **error);

/* The escaped file name for @raw (never NULL; caller frees): '%' '/' and
 * control characters become %XX, "" becomes "disk", "." and ".." become
 * "%2E" and "%2E%2E"; over-long names are shortened with a hash suffix. */
char *fs_escape_name(const char *raw);

typedef struct loop_set LoopSet;

/* Serves the mounted FUSE connection @fuse_fd (borrowed: libfuse's, it must
 * stay open until fs_unserve) on every loop of @loops (borrowed, must
 * outlive the serving): a cloned descriptor per loop, non-blocking.  FALSE
 * + GError (G_FILE_ERROR) when a descriptor cannot be cloned or watched. */
gboolean fs_serve(Fs *fs, LoopSet *loops, int fuse_fd, GError **error);
/* A descriptor that becomes readable once the kernel ended the session (the
 * file system was unmounted and released): poll it, do not read it. */
int fs_ended_fd(Fs *fs);
/* Blocks the calling thread until one of @sigs arrives (they must be
 * blocked in every thread) or the session ended. */
void fs_wait_for_stop(Fs *fs, const sigset_t *sigs);
/* The bounded stop (call after unmounting, or once the session ended):
 * waits for the requests in flight and flushes every export that has
 * unflushed writes, all in parallel, for at most @timeout_s seconds in all;
 * then fails what is left (the requests still waiting get EIO) and
 * disconnects every export (NBD_CMD_DISC).  TRUE when everything was
 * flushed; else FALSE, with each export whose data may be lost logged. */
gboolean fs_stop(Fs *fs, guint timeout_s);
/* Stops reading requests and closes the cloned descriptors (the caller
 * closes @fuse_fd).  Before the loops go. */
void fs_unserve(Fs *fs);
/* FALSE while a request is still owed a reply (the stop gave up on it): the
 * Fs must then not be freed (the process exits instead). */
gboolean fs_idle(Fs *fs);

G_END_DECLS
