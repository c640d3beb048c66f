/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* main.c: nbdfs, phase by phase: options, sources, daemon, loops, exports,
 * partitions, mount, serve, stop.
 *
 * Every start-up failure is one line "nbdfs: SOURCE: cause", a non-zero exit
 * and nothing left mounted.  libfuse parses the mount options and mounts;
 * the event loops then serve /dev/fuse themselves (src/fs/session.c).
 * Stopping (SIGTERM/SIGINT/SIGHUP or unmount): nbdfs unmounts (lazily),
 * then the requests in flight and the final flushes get `timeout` seconds
 * together (src/fs/stop.c); it disconnects every export and exits 0, or 1
 * when some data may not be on its server.
 */
#include "config.h"

#include <errno.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon.h"
#include "fs/fs.h"
#include "list.h"
#include "nbdfs/loop.h"
#include "options.h"
#include "sources.h"
#include "version.h"

/* ---- Phases ------------------------------------------------------------ */

/* The mountpoint, absolute (the daemon changes to / and unmounts by path).
 * NULL after printing one line. */
static char *check_mountpoint(const char *arg)
{
	struct stat st;

	if (stat(arg, &st) < 0) {
		fprintf(stderr, "nbdfs: %s: mountpoint: %s\n", arg, g_strerror(errno));
		return NULL;
	}
	if (!S_ISDIR(st.st_mode)) {
		fprintf(stderr, "nbdfs: %s: mountpoint: not a directory\n", arg);
		return NULL;
	}
	char *abs = realpath(arg, NULL);
	if (abs == NULL)
		fprintf(stderr, "nbdfs: %s: mountpoint: %s\n", arg, g_strerror(errno));
	return abs;
}

/* Appends "-oNAME=VALUE" with fuse_opt's escaping of ',' and '\'. */
static void add_mount_opt(struct fuse_args *args, const char *name, const char *value)
{
	GString *s = g_string_new("-o");

	g_string_append_printf(s, "%s=", name);
	for (const char *p = value; *p; p++) {
		if (*p == ',' || *p == '\\')
			g_string_append_c(s, '\\');
		g_string_append_c(s, *p);
	}
	fuse_opt_add_arg(args, s->str);
	g_string_free(s, TRUE);
}

/* libfuse only parses options and mounts: nbdfs answers the requests. */
static const struct fuse_lowlevel_ops no_ops;

/* The FUSE session (not mounted yet), so that bad FUSE options fail before
 * any connection.  "ro" stays ours (partitioning works on ro mounts), the
 * kernel checks permissions, requests go up to 1 MiB. */
static struct fuse_session *new_session(struct fuse_args *args, const struct options *o,
					Sources *src)
{
	fuse_opt_add_arg(args, "-odefault_permissions");
	add_mount_opt(args, "fsname", o->fsname ? o->fsname : sources_display_name(src));
	add_mount_opt(args, "subtype", o->subtype ? o->subtype : "nbdfs");
	fuse_opt_add_arg(args, "-omax_read=1048576");
	struct fuse_session *se = fuse_session_new(args, &no_ops, sizeof(no_ops), NULL);
	if (se == NULL)
		fprintf(stderr, "nbdfs: bad mount options: %s\n", daemon_fuse_messages());
	return se;
}

/* Mount-time partitioning: -P first, then every split= in order. */
static gboolean partition_at_mount(const struct options *o, Fs *fs)
{
	if (o->partitions_auto) {
		g_autoptr(GError) err = NULL;

		if (!fs_partition_all(fs, &err)) {
			fprintf(stderr, "nbdfs: partitions=auto: %s\n", err->message);
			return FALSE;
		}
	}
	for (guint i = 0; i < o->splits->len; i++) {
		const char *sp = o->splits->pdata[i];
		const char *colon = strrchr(sp, ':');
		g_autofree char *file = g_strndup(sp, (gsize)(colon - sp));
		g_autoptr(GError) err = NULL;

		if (!fs_partition_file(fs, file, colon + 1, &err)) {
			fprintf(stderr, "nbdfs: split=%s: %s\n", sp, err->message);
			return FALSE;
		}
	}
	return TRUE;
}

static gboolean interrupted(void)
{
	sigset_t pending;

	sigpending(&pending);
	return sigismember(&pending, SIGINT) || sigismember(&pending, SIGTERM) ||
	       sigismember(&pending, SIGHUP);
}

/* ---- main ---------------------------------------------------------------- */

int main(int argc, char *argv[])
{
	struct options o;
	struct fuse_args args;
	g_autoptr(Sources) src = NULL;
	g_autoptr(LoopSet) loops = NULL;
	g_autoptr(Fs) fs = NULL;
	g_autoptr(GError) err = NULL;
	g_autofree char *mountpoint = NULL;
	struct fuse_session *se = NULL;
	sigset_t sigs, oldsigs;
	int ret = 1;

	/* Every read and write holds a ~1 MiB block for its lifetime: serve
	 * them from the heap, which keeps freed memory for reuse instead of
	 * mmap'ing, faulting in and unmapping each one.  One arena: a quiet
	 * daemon's malloc_trim (fs_bufs_tidy) gives back the free top of the
	 * main heap only; another arena's top would stay (25 of 33 MiB after a
	 * burst of 16 writers, measured). */
	mallopt(M_ARENA_MAX, 1);
	mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);

	daemon_log_init(FALSE, FALSE);
	if (!options_parse(argc, argv, &o, &args)) {
		fprintf(stderr, "nbdfs: bad options: %s (see nbdfs --help)\n",
			daemon_fuse_messages());
		goto out;
	}
	if (o.help) {
		options_usage(stdout);
		ret = 0;
		goto out;
	}
	if (o.version) {
		version_print(stdout);
		ret = 0;
		goto out;
	}
	if (!options_check(&o))
		goto out;
	daemon_log_init(o.foreground, o.debug);
	if (o.list) {
		ret = list_exports(&o, &args);
		goto out;
	}
	if (o.args->len < 2) {
		fprintf(stderr, "nbdfs: %s (see nbdfs --help)\n",
			o.args->len == 0 ? "no source and no mountpoint given"
					 : "need a source and a mountpoint");
		goto out;
	}
	if (!daemon_log_open(o.log, o.foreground))
		goto out;
	mountpoint = check_mountpoint(o.args->pdata[o.args->len - 1]);
	if (!mountpoint)
		goto out;
	if (o.pidfile && !g_path_is_absolute(o.pidfile)) {
		char *abs = g_canonicalize_filename(o.pidfile, NULL);

		g_free(o.pidfile);
		o.pidfile = abs;
	}
	src = sources_parse(&o);
	if (!src)
		goto out;
	struct fs_config fcfg = {
		.read_only = o.read_only,
		.writeback = o.writeback,
		.uid = o.uid != OPTIONS_UNSET_ID ? (uid_t)o.uid : getuid(),
		.gid = o.gid != OPTIONS_UNSET_ID ? (gid_t)o.gid : getgid(),
		.umask = o.umask != OPTIONS_UNSET_ID ? (mode_t)o.umask : 0,
		.debug = o.debug,
	};
	fs = fs_new(&fcfg);
	se = new_session(&args, &o, src);
	if (!se)
		goto out;

	/* Signals: only the main thread takes them (threads inherit this mask). */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, &oldsigs);
	if (!o.foreground && !daemon_fork())
		goto out;

	daemon_raise_nofile();
	/* The pool is unbounded: kernel cache invalidations may wait for one
	 * another (src/fs/coherence.c), partitioning may wait on a server. */
	loops = loop_set_new(0, LOOP_POOL_UNBOUNDED, &err);
	if (!loops) {
		fprintf(stderr, "nbdfs: %s\n", err->message);
		goto out;
	}
	if (!sources_connect(src, loops, fs) || !partition_at_mount(&o, fs))
		goto out_disconnect;
	if (interrupted()) {
		fprintf(stderr, "nbdfs: %s: interrupted before mounting\n", mountpoint);
		goto out_disconnect;
	}
	if (fuse_session_mount(se, mountpoint) != 0) {
		fprintf(stderr, "nbdfs: %s: cannot mount: %s\n", mountpoint,
			daemon_fuse_messages());
		goto out_stop;
	}
	if (!fs_serve(fs, loops, fuse_session_fd(se), &err)) {
		fprintf(stderr, "nbdfs: %s: %s\n", mountpoint, err->message);
		fuse_session_unmount(se);
		goto out_stop;
	}
	daemon_tune_mount(mountpoint);
	if (!daemon_ready(o.foreground, o.pidfile)) {
		fuse_session_unmount(se);
		goto out_stop;
	}
	g_info("mounted %s", mountpoint);

	fs_wait_for_stop(fs, &sigs);
	daemon_notify_stopping();
	fuse_session_unmount(se);
	ret = fs_stop(fs, o.timeout) ? 0 : 1;
	fs_unserve(fs);
	daemon_remove_pidfile(o.pidfile);
	g_info("unmounted %s%s", mountpoint, ret ? " (some data may not be on the server)" : "");
	goto out;

out_stop:
	fs_stop(fs, o.timeout);
	fs_unserve(fs);
	goto out;
out_disconnect:
	sources_disconnect(src);
out:
	if (fs && !fs_idle(fs)) {
		/* The stop gave up on requests whose callbacks may still come:
		 * nothing they use may be freed.  The exit closes /dev/fuse. */
		fflush(NULL);
		_exit(ret);
	}
	if (se)
		fuse_session_destroy(se);
	g_clear_pointer(&fs, fs_free);
	g_clear_pointer(&src, sources_free);
	g_clear_pointer(&loops, loop_set_free);
	fuse_opt_free_args(&args);
	options_clear(&o);
	return ret;
}
