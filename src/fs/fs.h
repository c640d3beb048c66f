/* fs.h: the nbdfs FUSE layer as main.c sees it (private to the daemon).
 *
 * main.c builds one Blockdev per export, hands each to fs_add_export(),
 * applies the mount-time partitioning (-P, split=), then mounts a low-level
 * FUSE session with fs_lowlevel_ops() and the Fs as userdata.
 */
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <glib.h>
#include <sys/types.h>

#include "nbdfs/blockdev.h"

G_BEGIN_DECLS

#define FS_ERROR (fs_error_quark())
GQuark fs_error_quark(void);

typedef enum {
	FS_ERROR_NAME_CLASH,   /* two files would get the same name */
	FS_ERROR_NOT_FOUND,    /* no such file in the mount */
	FS_ERROR_BUSY,         /* a partition file below is open */
	FS_ERROR_INVALID,      /* malformed value, split beyond the end, no table */
	FS_ERROR_IO,           /* reading a table failed */
	FS_ERROR_NO_TABLE,     /* "auto" on a file with no valid MBR/GPT */
} FsError;

struct fs_config {
	gboolean read_only;    /* -o ro: every file read-only */
	gboolean writeback;    /* -o writeback: kernel writeback cache, no alias coherence */
	uid_t uid;             /* owner of every file */
	gid_t gid;
	mode_t umask;          /* masks 0644/0444 and the root dir's 0755 */
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

/* The low-level operations; userdata must be the Fs. */
const struct fuse_lowlevel_ops *fs_lowlevel_ops(void);

/* Tells the tree its session (for cache notifications).  Call after
 * fuse_session_new, before the loop. */
void fs_set_session(Fs *fs, struct fuse_session *se);

/* After the session loop ended: waits for every FUSE request still in
 * flight, flushes every export and disconnects it (NBD_CMD_DISC).  Returns
 * FALSE if a flush failed (logged). */
gboolean fs_shutdown(Fs *fs);

G_END_DECLS
