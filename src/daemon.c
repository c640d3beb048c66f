/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* daemon.c: logging (--log), the background fork and its ready pipe, the pid
 * file, systemd's notify socket, mount tuning (see daemon.h).
 *
 * Start-up without -f: the process forks before any thread exists; the
 * parent waits on a pipe until the child has connected every export, built
 * the tree and mounted, then exits 0 (or with the child's status if it
 * failed).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <paths.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <syslog.h>
#include <unistd.h>

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include "daemon.h"

/* ---- Logging ----------------------------------------------------------- */

/* Until the mount is ready every message also goes to stderr (the user is
 * watching the start-up); from then on only to the destination chosen with
 * --log.  Messages may come from any thread: a file gets each line in one
 * write() on an O_APPEND descriptor, so lines never interleave. */
enum log_dest { LOG_DEST_STDERR, LOG_DEST_SYSLOG, LOG_DEST_FILE };

static gboolean log_verbose; /* -f or -d: info messages on stderr too */
static gboolean log_debug;   /* -d: every NBD request */
static enum log_dest log_dest = LOG_DEST_STDERR;
static int log_fd = -1;	     /* LOG_DEST_FILE: O_APPEND, close-on-exec */
static gboolean log_started; /* the mount is ready: destination only */

/* One line "TIME nbdfs[PID]: TAGMSG" with the local time to the millisecond;
 * line breaks inside @msg become spaces. */
static void log_to_file(const char *tag, const char *msg)
{
	g_autoptr(GDateTime) now = g_date_time_new_now_local();
	g_autofree char *date = g_date_time_format(now, "%Y-%m-%dT%H:%M:%S");
	g_autofree char *zone = g_date_time_format(now, "%:z");
	g_autoptr(GString) line = g_string_new(NULL);

	g_string_printf(line, "%s.%03d%s nbdfs[%d]: %s", date,
			g_date_time_get_microsecond(now) / 1000, zone, (int)getpid(), tag);
	for (const char *p = msg; *p; p++)
		g_string_append_c(line, (*p == '\n' || *p == '\r') ? ' ' : *p);
	g_string_append_c(line, '\n');
	for (gsize off = 0; off < line->len;) {
		ssize_t r = write(log_fd, line->str + off, line->len - off);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return; /* nowhere left to say so */
		off += (gsize)r;
	}
}

static GLogWriterOutput log_writer(GLogLevelFlags level, const GLogField *fields, gsize n,
				   gpointer user_data)
{
	const char *msg = NULL;

	for (gsize i = 0; i < n; i++)
		if (strcmp(fields[i].key, "MESSAGE") == 0)
			msg = fields[i].value;
	if (msg == NULL)
		return G_LOG_WRITER_HANDLED;
	int prio;
	const char *tag = "";
	gboolean on_stderr = log_dest == LOG_DEST_STDERR || !log_started;
	gboolean on_dest = log_dest != LOG_DEST_STDERR;
	if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL)) {
		prio = LOG_ERR;
		tag = "error: ";
	} else if (level & G_LOG_LEVEL_WARNING) {
		prio = LOG_WARNING;
		tag = "warning: ";
	} else if (level & (G_LOG_LEVEL_MESSAGE | G_LOG_LEVEL_INFO)) {
		/* info: always in a log, on a terminal only with -f */
		prio = LOG_INFO;
		on_stderr = on_stderr && log_verbose;
	} else {
		prio = LOG_DEBUG;
		if (!log_debug)
			return G_LOG_WRITER_HANDLED;
	}
	if (on_stderr)
		fprintf(stderr, "nbdfs: %s%s\n", tag, msg);
	if (on_dest && log_dest == LOG_DEST_SYSLOG)
		syslog(prio, "%s%s", tag, msg);
	else if (on_dest && log_dest == LOG_DEST_FILE)
		log_to_file(tag, msg);
	return G_LOG_WRITER_HANDLED;
}

/* Whether a syslog daemon listens on /dev/log (datagram, as syslog(3)
 * tries first, or stream); FALSE with the reason in @why. */
static gboolean syslog_reachable(const char **why)
{
	static const int types[] = { SOCK_DGRAM, SOCK_STREAM };
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int first_errno = 0;

	g_strlcpy(sa.sun_path, _PATH_LOG, sizeof(sa.sun_path));
	for (gsize i = 0; i < G_N_ELEMENTS(types); i++) {
		int fd = socket(AF_UNIX, types[i] | SOCK_CLOEXEC, 0);

		if (fd < 0) {
			first_errno = first_errno ? first_errno : errno;
			continue;
		}
		int r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
		int e = errno;
		close(fd);
		if (r == 0)
			return TRUE;
		first_errno = first_errno ? first_errno : e;
	}
	*why = g_strerror(first_errno);
	return FALSE;
}

gboolean daemon_log_open(const char *log, gboolean foreground)
{
	if (log == NULL)
		log = foreground ? "stderr" : "syslog";
	if (strcmp(log, "stderr") == 0) {
		log_dest = LOG_DEST_STDERR;
		return TRUE;
	}
	if (strcmp(log, "syslog") == 0) {
		log_dest = LOG_DEST_SYSLOG;
		openlog("nbdfs", LOG_PID, LOG_DAEMON);
		return TRUE;
	}
	if (*log == '\0') {
		fprintf(stderr, "nbdfs: --log=: want stderr, syslog or a FILE\n");
		return FALSE;
	}
	g_autofree char *path = g_canonicalize_filename(log, NULL);
	int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0640);
	if (fd < 0) {
		fprintf(stderr, "nbdfs: --log=%s: %s\n", path, g_strerror(errno));
		return FALSE;
	}
	log_fd = fd;
	log_dest = LOG_DEST_FILE;
	return TRUE;
}

static GString *fuse_msg;
static gboolean fuse_msg_capture = TRUE;

static void fuse_log_cb(enum fuse_log_level level, const char *fmt, va_list ap) G_GNUC_PRINTF(2, 0);
static void fuse_log_cb(enum fuse_log_level level, const char *fmt, va_list ap)
{
	g_autofree char *m = g_strdup_vprintf(fmt, ap);

	if (fuse_msg_capture) {
		if (fuse_msg == NULL)
			fuse_msg = g_string_new(NULL);
		g_string_append(fuse_msg, m);
		return;
	}
	g_strchomp(m);
	if (level <= FUSE_LOG_ERR)
		g_warning("%s", m);
	else if (level <= FUSE_LOG_NOTICE)
		g_message("%s", m);
	else
		g_debug("%s", m);
}

void daemon_log_init(gboolean verbose, gboolean debug)
{
	static gboolean installed;

	log_verbose = verbose;
	log_debug = debug;
	if (!installed) {
		g_log_set_writer_func(log_writer, NULL, NULL);
		fuse_set_log_func(fuse_log_cb);
		installed = TRUE;
	}
}

const char *daemon_fuse_messages(void)
{
	static char *last;

	g_free(last);
	g_auto(GStrv) lines = g_strsplit(fuse_msg ? fuse_msg->str : "", "\n", -1);
	GString *one = g_string_new(NULL);
	for (char **l = lines; *l; l++) {
		g_strstrip(*l);
		if (**l == '\0')
			continue;
		if (one->len)
			g_string_append(one, "; ");
		g_string_append(one, *l);
	}
	if (fuse_msg)
		g_string_free(fuse_msg, TRUE);
	fuse_msg = NULL;
	last = g_string_free(one, FALSE);
	return last;
}

/* ---- systemd ------------------------------------------------------------ */

/* sd_notify(3) without libsystemd: one datagram "KEY=VALUE\n..." to the
 * AF_UNIX socket named by $NOTIFY_SOCKET (a path, or '@' for an abstract
 * name).  Nothing when the variable is unset; failures are only debug
 * messages (the mount works without a service manager). */
static void notify(const char *state)
{
	const char *path = g_getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	if (path == NULL || *path == '\0')
		return;
	size_t len = strlen(path);
	if ((path[0] != '/' && path[0] != '@') || len < 2 || len > sizeof(sa.sun_path)) {
		g_debug("NOTIFY_SOCKET=%s: not a unix socket path", path);
		return;
	}
	memcpy(sa.sun_path, path, len);
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = '\0';
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		g_debug("NOTIFY_SOCKET: socket: %s", g_strerror(errno));
		return;
	}
	socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
	if (sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen) < 0)
		g_debug("NOTIFY_SOCKET=%s: %s", path, g_strerror(errno));
	close(fd);
}

/* ---- Background -------------------------------------------------------- */

static int ready_fd = -1;

/* The parent: wait for the child's "ready" byte, else its exit status. */
static int wait_for_child(pid_t pid, int fd)
{
	char c;
	ssize_t r;

	do
		r = read(fd, &c, 1);
	while (r < 0 && errno == EINTR);
	close(fd);
	if (r == 1 && c == 'R')
		return 0;
	int status;
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR)
			return 1;
	}
	if (WIFEXITED(status))
		return WEXITSTATUS(status) ? WEXITSTATUS(status) : 1;
	return 1;
}

gboolean daemon_fork(void)
{
	int p[2];

	if (pipe(p) < 0) {
		fprintf(stderr, "nbdfs: pipe: %s\n", g_strerror(errno));
		return FALSE;
	}
	fflush(stdout);
	fflush(stderr);
	pid_t pid = fork();
	if (pid < 0) {
		fprintf(stderr, "nbdfs: fork: %s\n", g_strerror(errno));
		close(p[0]);
		close(p[1]);
		return FALSE;
	}
	if (pid > 0) {
		/* Ctrl-C ends the waiting parent; the child sees the signal
		 * pending and gives up before mounting. */
		sigset_t none;
		sigemptyset(&none);
		pthread_sigmask(SIG_SETMASK, &none, NULL);
		close(p[1]);
		_exit(wait_for_child(pid, p[0]));
	}
	close(p[0]);
	fcntl(p[1], F_SETFD, FD_CLOEXEC);
	ready_fd = p[1];
	return TRUE;
}

static gboolean write_pidfile(const char *path)
{
	g_autofree char *s = g_strdup_printf("%d\n", (int)getpid());
	g_autoptr(GError) err = NULL;

	if (!g_file_set_contents(path, s, -1, &err)) {
		fprintf(stderr, "nbdfs: --pidfile: %s\n", err->message);
		return FALSE;
	}
	return TRUE;
}

gboolean daemon_ready(gboolean foreground, const char *pidfile)
{
	if (pidfile && !write_pidfile(pidfile))
		return FALSE;
	/* said before the waiting parent returns to the shell */
	const char *why;
	if (log_dest == LOG_DEST_SYSLOG && !syslog_reachable(&why))
		fprintf(stderr,
			"nbdfs: warning: syslog cannot be reached (%s: %s): messages are lost "
			"until it can; use --log=FILE%s to keep them\n",
			_PATH_LOG, why, foreground ? " or --log=stderr" : " or -f");
	if (ready_fd >= 0) {
		char c = 'R';
		ssize_t r;

		do
			r = write(ready_fd, &c, 1);
		while (r < 0 && errno == EINTR);
		close(ready_fd);
		ready_fd = -1;
	}
	if (!foreground) {
		setsid();
		if (chdir("/") < 0) {
			/* not fatal */
		}
		int null = open("/dev/null", O_RDWR);
		if (null >= 0) {
			dup2(null, STDIN_FILENO);
			dup2(null, STDOUT_FILENO);
			/* --log=stderr in the background: the caller's stderr stays */
			if (log_dest != LOG_DEST_STDERR)
				dup2(null, STDERR_FILENO);
			if (null > STDERR_FILENO)
				close(null);
		}
	}
	log_started = TRUE;
	fuse_msg_capture = FALSE;
	daemon_fuse_messages();
	/* In the background the service manager knows only the parent, which
	 * has just exited: name the daemon (honoured with NotifyAccess=all). */
	g_autofree char *ready = foreground ? g_strdup("READY=1")
					    : g_strdup_printf("READY=1\nMAINPID=%d", (int)getpid());
	notify(ready);
	return TRUE;
}

void daemon_notify_stopping(void)
{
	notify("STOPPING=1");
}

void daemon_remove_pidfile(const char *pidfile)
{
	if (pidfile)
		unlink(pidfile);
}

/* ---- The mount ---------------------------------------------------------- */

/* The kernel reads ahead at most its bdi default (128 KiB) on a FUSE mount,
 * whatever max_readahead says; raise this mount's to 8 MiB where we may
 * (root): several 1 MiB READs in flight keep a sequential reader's NBD
 * connections busy (dd bs=1M: ~830 -> ~980 MB/s against 1 MiB).  The device
 * number comes from mountinfo: a stat of the mountpoint would need the
 * request loop, which may not be running yet. */
void daemon_tune_mount(const char *mountpoint)
{
	g_autofree char *info = NULL;

	if (!g_file_get_contents("/proc/self/mountinfo", &info, NULL, NULL))
		return;
	g_autofree char *dev = NULL;
	g_auto(GStrv) lines = g_strsplit(info, "\n", -1);
	for (char **l = lines; *l; l++) {
		g_auto(GStrv) f = g_strsplit(*l, " ", 6);
		if (g_strv_length(f) < 5)
			continue;
		g_autofree char *mp = g_strcompress(f[4]); /* undoes \040 escapes */
		if (strcmp(mp, mountpoint) == 0) {
			g_free(dev);
			dev = g_strdup(f[2]);
		}
	}
	if (dev == NULL)
		return;
	g_autofree char *path = g_strdup_printf("/sys/class/bdi/%s/read_ahead_kb", dev);
	g_autoptr(GError) err = NULL;
	if (!g_file_set_contents_full(path, "8192\n", -1, G_FILE_SET_CONTENTS_NONE, 0644, &err))
		g_debug("readahead: %s", err->message);
}

void daemon_raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= rl.rlim_max)
		return;
	rlim_t was = rl.rlim_cur;
	rl.rlim_cur = rl.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
		g_debug("open file limit raised from %llu to %llu", (unsigned long long)was,
			(unsigned long long)rl.rlim_max);
}
