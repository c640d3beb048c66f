/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* daemon.h: how nbdfs becomes a daemon: logging, the background fork with
 * its "ready" pipe, the pid file, and tuning the mount (private). */
#pragma once

#include <glib.h>
#include <sys/types.h>

/* Routes GLib and libfuse messages to stderr (until daemon_ready moves them
 * to their background destination).  @verbose: info messages too (-f);
 * @debug: every request (-d). */
void daemon_log_init(gboolean verbose, gboolean debug);

/* libfuse's messages are kept during start-up, to become part of one failure
 * line: returns them joined by "; " ("" when none) and forgets them.  Valid
 * until the next call. */
const char *daemon_fuse_messages(void);

/* Without -f: forks.  The parent waits until the child reports ready (exit
 * 0) or fails (its exit status), and never returns.  The child returns TRUE.
 * Call before any thread exists.  FALSE (one line printed) when the fork
 * itself failed. */
gboolean daemon_fork(void);

/* The mount is usable: writes the pid file (FALSE + one line on failure),
 * tells a waiting parent, and without -f detaches (setsid, chdir /, stdio
 * to /dev/null, messages to syslog). */
gboolean daemon_ready(gboolean foreground, const char *pidfile);

/* Removes the pid file at exit (NULL is a no-op). */
void daemon_remove_pidfile(const char *pidfile);

/* Raises the mount's read-ahead (bdi read_ahead_kb) where we may (root). */
void daemon_tune_mount(const char *mountpoint);
