/* main.c: the nbdfs command line: parse options, list exports, connect every
 * source, build the file tree, mount, serve, and tear down in order.
 *
 * Start-up: options are parsed and checked, then (without -f) the process
 * forks before any thread exists; the parent waits on a pipe until the child
 * has connected every export, built the tree and mounted, then exits 0 (or
 * with the child's status if it failed).  Every start-up failure is one line
 * "nbdfs: SOURCE: cause" and nothing stays mounted.
 *
 * Teardown: the session loop ends on SIGTERM/SIGINT/SIGHUP or when the
 * filesystem is unmounted; then nbdfs unmounts (lazily), waits for every
 * request in flight, flushes and disconnects every export, and exits 0.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <syslog.h>
#include <unistd.h>

#include "fs/fs.h"
#include "nbdfs/blockdev-nbd.h"
#include "nbdfs/nbd.h"

#define NBDFS_DEFAULT_TIMEOUT 60

/* ---- Logging ----------------------------------------------------------- */

static gboolean log_verbose;   /* -f or -d: info messages too */
static gboolean log_debug;     /* -d: every NBD request */
static gboolean log_syslog;    /* background, after start-up */

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
	if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL)) {
		prio = LOG_ERR;
		tag = "error: ";
	} else if (level & G_LOG_LEVEL_WARNING) {
		prio = LOG_WARNING;
		tag = "warning: ";
	} else if (level & (G_LOG_LEVEL_MESSAGE | G_LOG_LEVEL_INFO)) {
		prio = LOG_INFO;
		if (!log_verbose && !log_syslog)
			return G_LOG_WRITER_HANDLED;
	} else {
		prio = LOG_DEBUG;
		if (!log_debug)
			return G_LOG_WRITER_HANDLED;
	}
	if (log_syslog)
		syslog(prio, "%s%s", tag, msg);
	else
		fprintf(stderr, "nbdfs: %s%s\n", tag, msg);
	return G_LOG_WRITER_HANDLED;
}

/* libfuse's messages: kept during start-up (to become part of one failure
 * line), logged afterwards. */
static GString *fuse_msg;
static gboolean fuse_msg_capture = TRUE;

static void fuse_log_cb(enum fuse_log_level level, const char *fmt, va_list ap)
	G_GNUC_PRINTF(2, 0);
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

/* The captured libfuse messages ("" when none); valid until the next call. */
static const char *fuse_msg_take(void)
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

static void core_log(void *opaque, enum nbdc_log_level level, const char *msg)
{
	switch (level) {
	case NBDC_LOG_DEBUG:
		g_debug("%s", msg);
		break;
	case NBDC_LOG_INFO:
		g_info("%s", msg);
		break;
	case NBDC_LOG_WARNING:
	default:
		g_warning("%s", msg);
		break;
	}
}

/* ---- Options ----------------------------------------------------------- */

#define UNSET_ID ((unsigned)-1)

struct options {
	int foreground, debug, all_exports, list, list_long, help, version;
	int partitions_auto, read_only, writeback;
	char *partitions;
	char *pidfile;
	unsigned sector_size, connections, timeout;
	char *tls_psk, *tls_certificates, *tls_verify_peer;
	unsigned uid, gid, umask;
	GPtrArray *splits;          /* char *: "FILE:SECTORS" */
	GPtrArray *args;            /* char *: sources, then the mountpoint */
};

enum { KEY_SPLIT, KEY_DISCARD_RW };

#define OPT(t, f, v) { t, offsetof(struct options, f), v }
static const struct fuse_opt opt_spec[] = {
	OPT("-f", foreground, 1), OPT("--foreground", foreground, 1),
	OPT("-d", debug, 1), OPT("--debug", debug, 1),
	OPT("-a", all_exports, 1), OPT("--all-exports", all_exports, 1),
	OPT("--list", list, 1), OPT("--long", list_long, 1),
	OPT("-h", help, 1), OPT("--help", help, 1),
	OPT("-V", version, 1), OPT("--version", version, 1),
	OPT("-P", partitions_auto, 1),
	OPT("partitions=%s", partitions, 0), OPT("--partitions=%s", partitions, 0),
	OPT("ro", read_only, 1), OPT("--ro", read_only, 1), OPT("-r", read_only, 1),
	OPT("--read-only", read_only, 1),
	OPT("writeback", writeback, 1), OPT("--writeback", writeback, 1),
	OPT("sector_size=%u", sector_size, 0), OPT("--sector_size=%u", sector_size, 0),
	OPT("--sector-size=%u", sector_size, 0),
	OPT("connections=%u", connections, 0), OPT("--connections=%u", connections, 0),
	OPT("timeout=%u", timeout, 0), OPT("--timeout=%u", timeout, 0),
	OPT("tls-psk=%s", tls_psk, 0), OPT("--tls-psk=%s", tls_psk, 0),
	OPT("tls-certificates=%s", tls_certificates, 0),
	OPT("--tls-certificates=%s", tls_certificates, 0),
	OPT("tls-verify-peer=%s", tls_verify_peer, 0),
	OPT("--tls-verify-peer=%s", tls_verify_peer, 0),
	OPT("uid=%u", uid, 0), OPT("--uid=%u", uid, 0),
	OPT("gid=%u", gid, 0), OPT("--gid=%u", gid, 0),
	OPT("umask=%o", umask, 0), OPT("--umask=%o", umask, 0),
	OPT("pidfile=%s", pidfile, 0), OPT("--pidfile=%s", pidfile, 0),
	FUSE_OPT_KEY("split=", KEY_SPLIT), FUSE_OPT_KEY("--split=", KEY_SPLIT),
	FUSE_OPT_KEY("rw", KEY_DISCARD_RW),
	FUSE_OPT_END
};

static int opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	struct options *o = data;
	switch (key) {
	case FUSE_OPT_KEY_NONOPT:
		g_ptr_array_add(o->args, g_strdup(arg));
		return 0;
	case KEY_SPLIT: {
		const char *v = arg;
		if (g_str_has_prefix(v, "--split="))
			v += strlen("--split=");
		else if (g_str_has_prefix(v, "split="))
			v += strlen("split=");
		g_ptr_array_add(o->splits, g_strdup(v));
		return 0;
	}
	case KEY_DISCARD_RW:
		return 0;
	default:
		return 1;   /* a FUSE mount option: keep it */
	}
}

/* Long options that take a value accept "--opt VALUE" as well as
 * "--opt=VALUE": the first form is rewritten into the second before
 * fuse_opt_parse (whose "--opt %s" templates would also match "--opt=V"). */
static const char *const long_with_value[] = {
	"--pidfile", "--split", "--partitions", "--sector-size", "--sector_size",
	"--connections", "--timeout", "--tls-psk", "--tls-certificates", "--tls-verify-peer",
	"--uid", "--gid", "--umask", NULL
};

/* A copy of argv with "--opt VALUE" joined into "--opt=VALUE" (caller frees). */
static char **join_long_values(int argc, char *argv[])
{
	GPtrArray *out = g_ptr_array_new();
	for (int i = 0; i < argc; i++) {
		const char *joined = NULL;
		for (const char *const *o = long_with_value; *o && i + 1 < argc; o++)
			if (strcmp(argv[i], *o) == 0)
				joined = *o;
		if (joined) {
			g_ptr_array_add(out, g_strdup_printf("%s=%s", joined, argv[i + 1]));
			i++;
		} else {
			g_ptr_array_add(out, g_strdup(argv[i]));
		}
	}
	g_ptr_array_add(out, NULL);
	return (char **)g_ptr_array_free(out, FALSE);
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: nbdfs [OPTIONS] [NAME=]URI... MOUNTPOINT\n"
		"       nbdfs --list [--long] URI\n"
		"       mount -t fuse.nbdfs URI MOUNTPOINT -o OPTIONS\n"
		"\n"
		"Shows every NBD export (and partition on request) as a regular file.\n"
		"URI: nbd://host[:port][/export], nbd+unix:///[export]?socket=PATH,\n"
		"     nbds://..., nbds+unix://... (TLS)\n"
		"\n"
		"  -a, --all-exports        show every export of each server\n"
		"  --list [--long]          print the server's exports and exit\n"
		"  -f, --foreground         stay in the foreground, log to stderr\n"
		"  -d, --debug              log every NBD request (implies -f)\n"
		"  --pidfile FILE           write the pid once the mount is ready\n"
		"  -P                       same as -o partitions=auto\n"
		"  -h, --help  -V, --version\n"
		"\n"
		"  -o ro                    every file read-only\n"
		"  -o partitions=auto       scan every export's MBR/GPT at mount\n"
		"  -o split=FILE:SECTORS    split FILE after SECTORS sectors (repeatable)\n"
		"  -o sector_size=512|4096  override the sector size\n"
		"  -o connections=N         NBD connections per export (multi-conn)\n"
		"  -o timeout=SECS          wait for an unreachable server (default 60)\n"
		"  -o tls-psk=FILE  -o tls-certificates=DIR  -o tls-verify-peer=on|off\n"
		"  -o writeback             kernel writeback cache: faster small writes, but\n"
		"                           gives up coherence between an export file and its\n"
		"                           partition files, and errors (e.g. writes past the\n"
		"                           end) surface only at fsync/close\n"
		"  -o allow_other,uid=N,gid=N,umask=M   the usual FUSE ownership options\n"
		"\n"
		"Partitions later: setfattr -n user.nbdfs.partition -v auto|none|SECTORS FILE\n");
}

/* ---- Sources ----------------------------------------------------------- */

struct server {
	char *arg;                  /* as given */
	char *name;                 /* NAME= or NULL */
	NbdcUri *uri;
};

struct export_src {
	struct server *srv;         /* borrowed */
	char *label;                /* for messages: the arg, or the arg + export */
	char *export_name;          /* requested export name */
	char *display;              /* URI without secrets */
	struct nbdc_config cfg;     /* borrows srv->uri, export_name */
	Blockdev *dev;
};

static void server_free(struct server *s)
{
	g_free(s->arg);
	g_free(s->name);
	nbdc_uri_free(s->uri);
	g_free(s);
}

static void export_src_free(struct export_src *e)
{
	blockdev_unref(e->dev);
	g_free(e->label);
	g_free(e->export_name);
	g_free(e->display);
	g_free(e);
}

/* Splits "[NAME=]URI": a '=' before the "://" introduces a name. */
static struct server *server_parse(const char *arg, GError **error)
{
	struct server *s = g_new0(struct server, 1);
	s->arg = g_strdup(arg);
	const char *uri = arg;
	const char *scheme = strstr(arg, "://");
	const char *eq = strchr(arg, '=');
	if (eq && scheme && eq < scheme) {
		s->name = g_strndup(arg, (gsize)(eq - arg));
		uri = eq + 1;
	}
	s->uri = nbdc_uri_parse(uri, error);
	if (s->uri == NULL) {
		server_free(s);
		return NULL;
	}
	return s;
}

static gboolean parse_on_off(const char *v, gboolean *out)
{
	if (!g_ascii_strcasecmp(v, "on") || !g_ascii_strcasecmp(v, "yes") || !strcmp(v, "1") ||
	    !g_ascii_strcasecmp(v, "true")) {
		*out = TRUE;
		return TRUE;
	}
	if (!g_ascii_strcasecmp(v, "off") || !g_ascii_strcasecmp(v, "no") || !strcmp(v, "0") ||
	    !g_ascii_strcasecmp(v, "false")) {
		*out = FALSE;
		return TRUE;
	}
	return FALSE;
}

/* Fills @cfg for @uri with the command-line defaults. */
static void config_for(struct nbdc_config *cfg, const struct options *o, gboolean verify_peer,
		       const struct nbdc_uri *uri)
{
	nbdc_config_init(cfg);
	cfg->tls_psk_file = o->tls_psk;
	cfg->tls_certificates = o->tls_certificates;
	cfg->tls_verify_peer = verify_peer;
	cfg->connections = o->connections;
	cfg->log = core_log;
	cfg->debug = o->debug;
	nbdc_config_set_uri(cfg, uri);
}

static char *display_for(const struct nbdc_uri *uri, const char *export_name)
{
	struct nbdc_uri copy = *uri;
	copy.export_name = (char *)export_name;
	return nbdc_uri_to_display(&copy);
}

/* One start-up failure line: "nbdfs: SOURCE: cause" (the cause may already
 * begin with the source, as the core's messages do). */
static const char *strip_prefix(const char *cause, const char *prefix)
{
	size_t n = prefix ? strlen(prefix) : 0;
	if (n && strncmp(cause, prefix, n) == 0 && cause[n] == ':' && cause[n + 1] == ' ')
		return cause + n + 2;
	return cause;
}

static void fail_line_uri(const char *source, const struct nbdc_uri *uri, const char *cause)
{
	cause = strip_prefix(cause, source);
	if (uri) {
		g_autofree char *display = nbdc_uri_to_display(uri);
		cause = strip_prefix(cause, display);
	}
	fprintf(stderr, "nbdfs: %s: %s\n", source, cause);
}

static void fail_line(const char *source, const char *cause)
{
	fail_line_uri(source, NULL, cause);
}

/* ---- --list ------------------------------------------------------------ */

static int do_list(const struct options *o, gboolean verify_peer)
{
	if (o->args->len != 1) {
		fprintf(stderr, "nbdfs: --list takes exactly one URI\n");
		return 1;
	}
	const char *arg = o->args->pdata[0];
	g_autoptr(GError) err = NULL;
	struct server *s = server_parse(arg, &err);
	if (s == NULL) {
		fail_line(arg, err->message);
		return 1;
	}
	struct nbdc_config cfg;
	config_for(&cfg, o, verify_peer, s->uri);
	g_autoptr(GPtrArray) list = nbdc_list_exports(&cfg, o->list_long, &err);
	int ret = 0;
	if (list == NULL) {
		g_autofree char *display = nbdc_uri_to_display(s->uri);
		const char *why = strip_prefix(strip_prefix(err->message, arg), display);
		if (g_error_matches(err, NBDC_ERROR, NBDC_ERROR_POLICY)) {
			fprintf(stderr, "nbdfs: %s: listing exports refused by policy: %s\n", arg,
				why);
			ret = 2;
		} else if (g_error_matches(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED)) {
			fprintf(stderr, "nbdfs: %s: server too old to list exports: %s\n", arg, why);
			ret = 2;
		} else {
			fail_line(arg, why);
			ret = 1;
		}
		server_free(s);
		return ret;
	}
	for (guint i = 0; i < list->len; i++) {
		struct nbdc_export *e = list->pdata[i];
		if (!o->list_long) {
			printf("%s\n", e->name);
			continue;
		}
		if (e->has_info)
			printf("%s\tsize=%" G_GUINT64_FORMAT "\t%s\tblock=%u/%u/%u\t%s\n", e->name,
			       e->size, e->read_only ? "ro" : "rw", e->block_min, e->block_pref,
			       e->block_max, e->description);
		else
			printf("%s\tsize=?\t?\tblock=?\t%s\n", e->name, e->description);
	}
	fflush(stdout);
	server_free(s);
	return 0;
}

/* ---- Start-up ---------------------------------------------------------- */

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

static void signal_ready(gboolean foreground)
{
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
			dup2(null, STDERR_FILENO);
			if (null > STDERR_FILENO)
				close(null);
		}
		openlog("nbdfs", LOG_PID, LOG_DAEMON);
		log_syslog = TRUE;
	}
}

/* The kernel reads ahead at most its bdi default (128 KiB) on a FUSE mount,
 * whatever max_readahead says; raise this mount's to 8 MiB where we may
 * (root): several 1 MiB READs in flight keep a sequential reader's NBD
 * connections busy (dd bs=1M: ~830 -> ~980 MB/s against 1 MiB).  The device number comes from mountinfo: a stat of the mountpoint
 * would need the session loop, which is not running yet. */
static void raise_readahead(const char *mountpoint)
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
		g_autofree char *mp = g_strcompress(f[4]);   /* undoes \040 escapes */
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

int main(int argc, char *argv[])
{
	struct options o = { 0 };
	o.timeout = NBDFS_DEFAULT_TIMEOUT;
	o.uid = o.gid = o.umask = UNSET_ID;
	o.splits = g_ptr_array_new_with_free_func(g_free);
	o.args = g_ptr_array_new_with_free_func(g_free);
	g_auto(GStrv) argv_joined = join_long_values(argc, argv);
	struct fuse_args args = FUSE_ARGS_INIT((int)g_strv_length(argv_joined), argv_joined);
	g_autoptr(GPtrArray) servers = g_ptr_array_new_with_free_func((GDestroyNotify)server_free);
	g_autoptr(GPtrArray) exports =
		g_ptr_array_new_with_free_func((GDestroyNotify)export_src_free);
	g_autoptr(Fs) fs = NULL;
	struct fuse_session *se = NULL;
	struct fuse_loop_config *loop_cfg = NULL;
	g_autofree char *mountpoint = NULL;
	gboolean verify_peer = TRUE;
	int ret = 1;

	/* Every read and write holds a ~1 MiB block for its lifetime.  Above
	 * glibc's mmap threshold each one would be mmap'd, faulted in page by
	 * page and unmapped again; per-thread arenas would each keep their own.
	 * Serve them from two arenas that keep freed memory for reuse. */
	mallopt(M_ARENA_MAX, 2);
	mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);

	g_log_set_writer_func(log_writer, NULL, NULL);
	fuse_set_log_func(fuse_log_cb);

	if (fuse_opt_parse(&args, &o, opt_spec, opt_proc) < 0) {
		fprintf(stderr, "nbdfs: bad options: %s (see nbdfs --help)\n", fuse_msg_take());
		goto out_args;
	}
	if (o.help) {
		usage(stdout);
		ret = 0;
		goto out_args;
	}
	if (o.version) {
		printf("nbdfs %s\n", PACKAGE_VERSION);
		ret = 0;
		goto out_args;
	}
	if (o.debug)
		o.foreground = 1;
	log_debug = o.debug;
	log_verbose = o.foreground;
	if (o.tls_verify_peer && !parse_on_off(o.tls_verify_peer, &verify_peer)) {
		fprintf(stderr, "nbdfs: tls-verify-peer=%s: want on or off\n", o.tls_verify_peer);
		goto out_args;
	}
	if (o.list) {
		ret = do_list(&o, verify_peer);
		goto out_args;
	}
	if (o.partitions) {
		if (strcmp(o.partitions, "auto") == 0)
			o.partitions_auto = 1;
		else if (strcmp(o.partitions, "none") != 0) {
			fprintf(stderr, "nbdfs: partitions=%s: want auto or none\n", o.partitions);
			goto out_args;
		}
	}
	if (o.sector_size != 0 && o.sector_size != 512 && o.sector_size != 4096) {
		fprintf(stderr, "nbdfs: sector_size=%u: want 512 or 4096\n", o.sector_size);
		goto out_args;
	}
	if (o.args->len < 2) {
		fprintf(stderr, "nbdfs: %s (see nbdfs --help)\n",
			o.args->len == 0 ? "no source and no mountpoint given"
					 : "need a source and a mountpoint");
		goto out_args;
	}
	for (guint i = 0; i < o.splits->len; i++) {
		const char *sp = o.splits->pdata[i];
		const char *colon = strrchr(sp, ':');
		if (colon == NULL || colon == sp || colon[1] == '\0') {
			fprintf(stderr, "nbdfs: split=%s: want FILE:SECTORS\n", sp);
			goto out_args;
		}
	}

	/* The mountpoint (absolute: we chdir away and unmount by path). */
	const char *mnt_arg = o.args->pdata[o.args->len - 1];
	struct stat st;
	if (stat(mnt_arg, &st) < 0) {
		fprintf(stderr, "nbdfs: %s: mountpoint: %s\n", mnt_arg, g_strerror(errno));
		goto out_args;
	}
	if (!S_ISDIR(st.st_mode)) {
		fprintf(stderr, "nbdfs: %s: mountpoint: not a directory\n", mnt_arg);
		goto out_args;
	}
	if (o.pidfile && !g_path_is_absolute(o.pidfile)) {
		/* absolute: the daemon changes to / and removes it at exit */
		char *abs = g_canonicalize_filename(o.pidfile, NULL);
		g_free(o.pidfile);
		o.pidfile = abs;
	}
	mountpoint = realpath(mnt_arg, NULL);
	if (mountpoint == NULL) {
		fprintf(stderr, "nbdfs: %s: mountpoint: %s\n", mnt_arg, g_strerror(errno));
		goto out_args;
	}

	/* Parse every source before anything connects. */
	for (guint i = 0; i + 1 < o.args->len; i++) {
		g_autoptr(GError) err = NULL;
		struct server *s = server_parse(o.args->pdata[i], &err);
		if (s == NULL) {
			fail_line(o.args->pdata[i], err->message);
			goto out_args;
		}
		g_ptr_array_add(servers, s);
	}

	struct fs_config fcfg = {
		.read_only = o.read_only,
		.writeback = o.writeback,
		.uid = o.uid != UNSET_ID ? (uid_t)o.uid : getuid(),
		.gid = o.gid != UNSET_ID ? (gid_t)o.gid : getgid(),
		.umask = o.umask != UNSET_ID ? (mode_t)(o.umask & 0777) : 0,
	};
	fs = fs_new(&fcfg);

	/* The session (not mounted yet), so bad FUSE options fail before any
	 * connection.  "ro" stays ours (partitioning works on ro mounts), the
	 * kernel checks permissions, requests go up to 1 MiB. */
	fuse_opt_add_arg(&args, "-odefault_permissions");
	fuse_opt_add_arg(&args, "-ofsname=nbdfs,subtype=nbdfs");
	fuse_opt_add_arg(&args, "-omax_read=1048576");
	se = fuse_session_new(&args, fs_lowlevel_ops(), sizeof(struct fuse_lowlevel_ops), fs);
	if (se == NULL) {
		fprintf(stderr, "nbdfs: bad mount options: %s\n", fuse_msg_take());
		goto out_args;
	}

	/* Signals: only the main thread takes them (threads inherit this mask). */
	sigset_t sigs, oldsigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &sigs, &oldsigs);

	if (!o.foreground) {
		int p[2];
		if (pipe(p) < 0) {
			fprintf(stderr, "nbdfs: pipe: %s\n", g_strerror(errno));
			goto out_args;
		}
		fflush(stdout);
		fflush(stderr);
		pid_t pid = fork();
		if (pid < 0) {
			fprintf(stderr, "nbdfs: fork: %s\n", g_strerror(errno));
			goto out_args;
		}
		if (pid > 0) {
			/* Ctrl-C ends the waiting parent; the child sees the
			 * signal pending and gives up before mounting. */
			pthread_sigmask(SIG_SETMASK, &oldsigs, NULL);
			close(p[1]);
			ret = wait_for_child(pid, p[0]);
			goto out_args;
		}
		close(p[0]);
		ready_fd = p[1];
	}

	/* Connect every export. */
	for (guint i = 0; i < servers->len; i++) {
		struct server *s = servers->pdata[i];
		g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
		if (o.all_exports) {
			struct nbdc_config lcfg;
			config_for(&lcfg, &o, verify_peer, s->uri);
			g_autoptr(GError) err = NULL;
			g_autoptr(GPtrArray) list = nbdc_list_exports(&lcfg, FALSE, &err);
			if (list == NULL) {
				fail_line_uri(s->arg, s->uri, err->message);
				goto out_args;
			}
			for (guint j = 0; j < list->len; j++) {
				struct nbdc_export *e = list->pdata[j];
				g_ptr_array_add(names, g_strdup(e->name));
			}
			if (list->len == 0)
				g_warning("%s: the server lists no exports", s->arg);
		} else {
			g_ptr_array_add(names, g_strdup(s->uri->export_name));
		}
		for (guint j = 0; j < names->len; j++) {
			struct export_src *e = g_new0(struct export_src, 1);
			e->srv = s;
			e->export_name = g_strdup(names->pdata[j]);
			e->display = display_for(s->uri, e->export_name);
			e->label = o.all_exports ? g_strdup(e->display) : g_strdup(s->arg);
			config_for(&e->cfg, &o, verify_peer, s->uri);
			e->cfg.export_name = e->export_name;
			g_ptr_array_add(exports, e);
		}
	}
	for (guint i = 0; i < exports->len; i++) {
		struct export_src *e = exports->pdata[i];
		struct blockdev_nbd_opts bopts = {
			.sector_size = o.sector_size,
			.timeout_s = o.timeout,
			.read_only = o.read_only,
			.uri = e->display,
		};
		g_autoptr(GError) err = NULL;
		e->dev = blockdev_nbd_new(&e->cfg, &bopts, &err);
		if (e->dev == NULL) {
			fail_line_uri(e->label, e->srv->uri, strip_prefix(err->message, e->display));
			goto out_disconnect;
		}
		const char *name = (!o.all_exports && e->srv->name) ? e->srv->name : e->export_name;
		if (!fs_add_export(fs, name, e->label, e->dev, &err)) {
			fail_line(e->label, err->message);
			goto out_disconnect;
		}
	}

	/* Mount-time partitioning: -P first, then every split= in order. */
	if (o.partitions_auto) {
		g_autoptr(GError) err = NULL;
		if (!fs_partition_all(fs, &err)) {
			fprintf(stderr, "nbdfs: partitions=auto: %s\n", err->message);
			goto out_disconnect;
		}
	}
	for (guint i = 0; i < o.splits->len; i++) {
		const char *sp = o.splits->pdata[i];
		const char *colon = strrchr(sp, ':');
		g_autofree char *file = g_strndup(sp, (gsize)(colon - sp));
		g_autoptr(GError) err = NULL;
		if (!fs_partition_file(fs, file, colon + 1, &err)) {
			fprintf(stderr, "nbdfs: split=%s: %s\n", sp, err->message);
			goto out_disconnect;
		}
	}

	/* Interrupted while connecting: mount nothing. */
	sigset_t pending;
	sigpending(&pending);
	if (sigismember(&pending, SIGINT) || sigismember(&pending, SIGTERM) ||
	    sigismember(&pending, SIGHUP)) {
		fprintf(stderr, "nbdfs: %s: interrupted before mounting\n", mountpoint);
		goto out_disconnect;
	}
	fs_set_session(fs, se);
	if (fuse_set_signal_handlers(se) != 0) {
		fprintf(stderr, "nbdfs: cannot set signal handlers\n");
		goto out_session;
	}
	if (fuse_session_mount(se, mountpoint) != 0) {
		fprintf(stderr, "nbdfs: %s: cannot mount: %s\n", mountpoint, fuse_msg_take());
		goto out_signals;
	}
	raise_readahead(mountpoint);
	if (o.pidfile && !write_pidfile(o.pidfile)) {
		fuse_session_unmount(se);
		goto out_signals;
	}
	g_info("mounted %u export%s on %s", exports->len, exports->len == 1 ? "" : "s",
	       mountpoint);
	signal_ready(o.foreground);
	fuse_msg_capture = FALSE;
	fuse_msg_take();

	loop_cfg = fuse_loop_cfg_create();
	fuse_loop_cfg_set_clone_fd(loop_cfg, 1);
	/* Workers never wait for data I/O (replies come from completions), so
	 * a few keep the connections full; only lseek and partition changes
	 * block one.  As many idle as max: no thread is created and destroyed
	 * per burst (each also owns a ~1 MiB receive buffer). */
	fuse_loop_cfg_set_max_threads(loop_cfg, 12);
	fuse_loop_cfg_set_idle_threads(loop_cfg, 12);
	pthread_sigmask(SIG_SETMASK, &oldsigs, NULL);
	int lr = fuse_session_loop_mt(se, loop_cfg);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	ret = (lr == 0 || lr == SIGTERM || lr == SIGINT || lr == SIGHUP) ? 0 : 1;
	if (ret != 0)
		g_warning("session loop ended: %s", lr < 0 ? g_strerror(-lr) : "error");

	fuse_session_unmount(se);
	if (!fs_shutdown(fs))
		ret = 1;
	if (o.pidfile)
		unlink(o.pidfile);
	g_info("unmounted %s", mountpoint);
	fuse_remove_signal_handlers(se);
	fuse_session_destroy(se);
	se = NULL;
	goto out_args;
out_signals:
	fuse_remove_signal_handlers(se);
out_session:
	fs_shutdown(fs);
	fuse_session_destroy(se);
	se = NULL;
	goto out_args;
out_disconnect:
	for (guint i = 0; i < exports->len; i++) {
		struct export_src *e = exports->pdata[i];
		if (e->dev)
			blockdev_disconnect(e->dev);
	}
out_args:
	if (se)
		fuse_session_destroy(se);
	if (loop_cfg)
		fuse_loop_cfg_destroy(loop_cfg);
	g_clear_pointer(&fs, fs_free);
	g_ptr_array_set_size(exports, 0);
	fuse_opt_free_args(&args);
	g_ptr_array_unref(o.splits);
	g_ptr_array_unref(o.args);
	g_free(o.partitions);
	g_free(o.pidfile);
	g_free(o.tls_psk);
	g_free(o.tls_certificates);
	g_free(o.tls_verify_peer);
	if (ready_fd >= 0)
		close(ready_fd);
	return ret;
}
