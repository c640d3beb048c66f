/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* daemon.h: how nbdfs becomes a daemon: logging, the background fork with
 * its "ready" pipe, the pid file, systemd's notify socket, and tuning the
 * mount (private). */
#pragma once

#include <glib.h>
#include <sys/types.h>

/* Routes GLib and libfuse messages to stderr (until daemon_ready moves them
 * to their background destination).  @verbose: info messages too (-f);
 * @debug: every request (-d). */
void daemon_log_init(gboolean verbose, gboolean debug);

/* Chooses where messages go, from --log=stderr|syslog|FILE (@log NULL:
 * stderr with @foreground, else syslog).  A FILE is opened here (append,
 * close-on-exec, created 0640; a relative path is taken from the current
 * directory) and gets one line per message with a timestamp.  Until
 * daemon_ready, messages also go to stderr.  Call before daemon_fork.
 * FALSE after one line when FILE cannot be opened. */
gboolean daemon_log_open(const char *log, gboolean foreground);

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
 * tells a waiting parent, says on stderr when the log is syslog and /dev/log
 * cannot be reached (messages are lost until it can), without -f detaches
 * (setsid, chdir /, stdio to
 * /dev/null but for a --log=stderr), from now on logs only to the --log
 * destination, and sends READY=1 to $NOTIFY_SOCKET (with MAINPID= when it
 * forked). */
gboolean daemon_ready(gboolean foreground, const char *pidfile);

/* Sends STOPPING=1 to $NOTIFY_SOCKET: the serve loop has ended, the final
 * flushes and the exit follow. */
void daemon_notify_stopping(void);

/* Removes the pid file at exit (NULL is a no-op). */
void daemon_remove_pidfile(const char *pidfile);

/* Raises the soft limit on open files to the hard limit (each export's
 * connection is a file).  Logs (debug) what it got. */
void daemon_raise_nofile(void);

/* Raises the mount's read-ahead (bdi read_ahead_kb) where we may (root). */
void daemon_tune_mount(const char *mountpoint);
