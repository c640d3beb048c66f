/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* options.c: parsing and checking the nbdfs command line (see options.h). */
#include "config.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>

#include "options.h"

/* Upper bounds of the numeric options (a day for the timeouts). */
#define MAX_TIMEOUT_S (24u * 3600)
#define MAX_CONNECTIONS 16u

enum { KEY_SPLIT, KEY_DISCARD_RW, KEY_LONG };

/* clang-format off */
#define OPT(t, f, v) {t, offsetof(struct options, f), v}
/* clang-format on */
static const struct fuse_opt opt_spec[] = {
	OPT("-f", foreground, 1),
	OPT("--foreground", foreground, 1),
	OPT("-d", debug, 1),
	OPT("--debug", debug, 1),
	OPT("-a", all_exports, 1),
	OPT("--all-exports", all_exports, 1),
	OPT("--list", list, 1),
	OPT("--long", list_long, 1),
	OPT("--json", list_json, 1),
	OPT("-h", help, 1),
	OPT("--help", help, 1),
	OPT("-V", version, 1),
	OPT("--version", version, 1),
	OPT("-P", partitions_auto, 1),
	OPT("partitions=%s", partitions, 0),
	OPT("--partitions=%s", partitions, 0),
	OPT("ro", read_only, 1),
	OPT("--ro", read_only, 1),
	OPT("-r", read_only, 1),
	OPT("--read-only", read_only, 1),
	OPT("writeback", writeback, 1),
	OPT("--writeback", writeback, 1),
	OPT("sector_size=%s", sector_size_s, 0),
	OPT("--sector_size=%s", sector_size_s, 0),
	OPT("--sector-size=%s", sector_size_s, 0),
	OPT("connections=%s", connections_s, 0),
	OPT("--connections=%s", connections_s, 0),
	OPT("timeout=%s", timeout_s, 0),
	OPT("--timeout=%s", timeout_s, 0),
	OPT("io_timeout=%s", io_timeout_s, 0),
	OPT("--io_timeout=%s", io_timeout_s, 0),
	OPT("--io-timeout=%s", io_timeout_s, 0),
	OPT("idle_timeout=%s", idle_timeout_s, 0),
	OPT("--idle_timeout=%s", idle_timeout_s, 0),
	OPT("--idle-timeout=%s", idle_timeout_s, 0),
	OPT("tls-psk=%s", tls_psk, 0),
	OPT("--tls-psk=%s", tls_psk, 0),
	OPT("tls-certificates=%s", tls_certificates, 0),
	OPT("--tls-certificates=%s", tls_certificates, 0),
	OPT("tls-verify-peer=%s", tls_verify_peer, 0),
	OPT("--tls-verify-peer=%s", tls_verify_peer, 0),
	OPT("uid=%s", uid_s, 0),
	OPT("--uid=%s", uid_s, 0),
	OPT("gid=%s", gid_s, 0),
	OPT("--gid=%s", gid_s, 0),
	OPT("umask=%s", umask_s, 0),
	OPT("--umask=%s", umask_s, 0),
	OPT("fsname=%s", fsname, 0),
	OPT("subtype=%s", subtype, 0),
	OPT("pidfile=%s", pidfile, 0),
	OPT("--pidfile=%s", pidfile, 0),
	OPT("log=%s", log, 0),
	OPT("--log=%s", log, 0),
	FUSE_OPT_KEY("split=", KEY_SPLIT),
	FUSE_OPT_KEY("--split=", KEY_SPLIT),
	FUSE_OPT_KEY("rw", KEY_DISCARD_RW),
	FUSE_OPT_END,
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
	case FUSE_OPT_KEY_OPT:
		/* An unknown "--x": ours to refuse (libfuse would take it for a
		 * mount option and fail later with a vaguer message). */
		if (g_str_has_prefix(arg, "--")) {
			g_ptr_array_add(o->unknown_long, g_strdup(arg));
			return 0;
		}
		return 1; /* a FUSE mount option: keep it */
	default:
		return 1;
	}
}

/* Long options that take a value accept "--opt VALUE" as well as
 * "--opt=VALUE": the first form is rewritten into the second before
 * fuse_opt_parse (whose "--opt %s" templates would also match "--opt=V"). */
static const char *const long_with_value[] = {
	"--pidfile",
	"--split",
	"--partitions",
	"--sector-size",
	"--sector_size",
	"--connections",
	"--timeout",
	"--io-timeout",
	"--io_timeout",
	"--idle-timeout",
	"--idle_timeout",
	"--tls-psk",
	"--tls-certificates",
	"--tls-verify-peer",
	"--uid",
	"--gid",
	"--umask",
	"--log",
	NULL,
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

gboolean options_parse(int argc, char *argv[], struct options *o, struct fuse_args *args)
{
	memset(o, 0, sizeof(*o));
	o->uid = o->gid = o->umask = OPTIONS_UNSET_ID;
	o->verify_peer = TRUE;
	o->splits = g_ptr_array_new_with_free_func(g_free);
	o->args = g_ptr_array_new_with_free_func(g_free);
	o->unknown_long = g_ptr_array_new_with_free_func(g_free);
	char **joined = join_long_values(argc, argv);
	/* fuse_args takes the strings (allocated = 1: fuse_opt_free_args frees). */
	*args = (struct fuse_args)FUSE_ARGS_INIT(0, NULL);
	for (char **a = joined; *a; a++)
		fuse_opt_add_arg(args, *a);
	g_strfreev(joined);
	return fuse_opt_parse(args, o, opt_spec, opt_proc) == 0;
}

/* Parses @s as a decimal (or with @base 8, octal) number within [min, max]. */
static gboolean check_uint(const char *name, const char *s, guint base, guint64 min, guint64 max,
			   unsigned *out)
{
	guint64 v;
	g_autoptr(GError) err = NULL;

	if (s == NULL)
		return TRUE;
	if (!g_ascii_string_to_unsigned(s, base, min, max, &v, &err)) {
		if (base == 8)
			fprintf(stderr,
				"nbdfs: %s=%s: want an octal number from %" G_GUINT64_FORMAT
				" to %" G_GINT64_MODIFIER "o\n",
				name, s, min, max);
		else
			fprintf(stderr,
				"nbdfs: %s=%s: want a whole number from %" G_GUINT64_FORMAT
				" to %" G_GUINT64_FORMAT "\n",
				name, s, min, max);
		return FALSE;
	}
	*out = (unsigned)v;
	return TRUE;
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

gboolean options_check(struct options *o)
{
	if (o->unknown_long->len > 0) {
		fprintf(stderr, "nbdfs: unknown option %s (see nbdfs --help)\n",
			(char *)o->unknown_long->pdata[0]);
		return FALSE;
	}
	if ((o->list_long || o->list_json) && !o->list) {
		fprintf(stderr, "nbdfs: %s goes with --list (see nbdfs --help)\n",
			o->list_json ? "--json" : "--long");
		return FALSE;
	}
	o->timeout = 60;
	o->io_timeout = 120;
	o->idle_timeout = 60;
	if (!check_uint("sector_size", o->sector_size_s, 10, 0, 65536, &o->sector_size) ||
	    !check_uint("connections", o->connections_s, 10, 1, MAX_CONNECTIONS, &o->connections) ||
	    !check_uint("timeout", o->timeout_s, 10, 0, MAX_TIMEOUT_S, &o->timeout) ||
	    !check_uint("io_timeout", o->io_timeout_s, 10, 0, MAX_TIMEOUT_S, &o->io_timeout) ||
	    !check_uint("idle_timeout", o->idle_timeout_s, 10, 0, MAX_TIMEOUT_S,
			&o->idle_timeout) ||
	    !check_uint("uid", o->uid_s, 10, 0, G_MAXUINT32 - 1, &o->uid) ||
	    !check_uint("gid", o->gid_s, 10, 0, G_MAXUINT32 - 1, &o->gid) ||
	    !check_uint("umask", o->umask_s, 8, 0, 0777, &o->umask))
		return FALSE;
	if (o->sector_size_s && o->sector_size != 512 && o->sector_size != 4096) {
		fprintf(stderr, "nbdfs: sector_size=%s: want 512 or 4096\n", o->sector_size_s);
		return FALSE;
	}
	if (o->tls_verify_peer && !parse_on_off(o->tls_verify_peer, &o->verify_peer)) {
		fprintf(stderr, "nbdfs: tls-verify-peer=%s: want on or off\n", o->tls_verify_peer);
		return FALSE;
	}
	if (o->partitions) {
		if (strcmp(o->partitions, "auto") == 0) {
			o->partitions_auto = 1;
		} else if (strcmp(o->partitions, "none") != 0) {
			fprintf(stderr, "nbdfs: partitions=%s: want auto or none\n", o->partitions);
			return FALSE;
		}
	}
	for (guint i = 0; i < o->splits->len; i++) {
		const char *sp = o->splits->pdata[i];
		const char *colon = strrchr(sp, ':');
		guint64 v;

		if (colon == NULL || colon == sp || colon[1] == '\0' ||
		    !g_ascii_string_to_unsigned(colon + 1, 10, 0, G_MAXUINT64, &v, NULL)) {
			fprintf(stderr, "nbdfs: split=%s: want FILE:SECTORS\n", sp);
			return FALSE;
		}
	}
	if (o->debug)
		o->foreground = 1;
	return TRUE;
}

void options_clear(struct options *o)
{
	g_clear_pointer(&o->splits, g_ptr_array_unref);
	g_clear_pointer(&o->args, g_ptr_array_unref);
	g_clear_pointer(&o->unknown_long, g_ptr_array_unref);
	char **strs[] = { &o->partitions,
			  &o->pidfile,
			  &o->log,
			  &o->sector_size_s,
			  &o->connections_s,
			  &o->timeout_s,
			  &o->io_timeout_s,
			  &o->idle_timeout_s,
			  &o->uid_s,
			  &o->gid_s,
			  &o->umask_s,
			  &o->tls_psk,
			  &o->tls_certificates,
			  &o->tls_verify_peer,
			  &o->fsname,
			  &o->subtype };
	for (gsize i = 0; i < G_N_ELEMENTS(strs); i++)
		g_clear_pointer(strs[i], g_free);
}

void options_usage(FILE *f)
{
	fprintf(f, "usage: nbdfs [OPTIONS] [NAME=]URI... MOUNTPOINT\n"
		   "       nbdfs --list [--long|--json] URI\n"
		   "       mount -t fuse.nbdfs URI MOUNTPOINT -o OPTIONS\n"
		   "\n"
		   "Shows every NBD export (and partition on request) as a regular file.\n"
		   "URI: nbd://host[:port][/export], nbd+unix:///[export]?socket=PATH,\n"
		   "     nbds://..., nbds+unix://... (TLS)\n"
		   "\n"
		   "  -a, --all-exports        show every export of each server\n"
		   "  --list [--long|--json]   print the server's exports and exit\n"
		   "  -f, --foreground         stay in the foreground, log to stderr\n"
		   "  -d, --debug              log every FUSE and NBD request (implies -f)\n"
		   "  --pidfile FILE           write the pid once the mount is ready\n"
		   "  --log=stderr|syslog|FILE where messages go (default: stderr with -f,\n"
		   "                           else syslog); also -o log=...\n"
		   "  -P                       same as -o partitions=auto\n"
		   "  -h, --help  -V, --version\n"
		   "\n"
		   "  -o ro                    every file read-only\n"
		   "  -o partitions=auto       scan every export's MBR/GPT at mount\n"
		   "  -o split=FILE:SECTORS    split FILE after SECTORS sectors (repeatable)\n"
		   "  -o sector_size=512|4096  override the sector size\n"
		   "  -o connections=N         NBD connections per export (multi-conn, 1-16)\n"
		   "  -o timeout=SECS          wait for an unreachable server (default 60);\n"
		   "                           also the bound on stopping: in-flight requests\n"
		   "                           and final flushes get at most SECS together\n"
		   "  -o io_timeout=SECS       a sent request unanswered this long means the\n"
		   "                           connection is lost (default 120, 0 = never)\n"
		   "  -o idle_timeout=SECS     close unused connections (default 60, 0 = never)\n"
		   "  -o tls-psk=FILE  -o tls-certificates=DIR  -o tls-verify-peer=on|off\n"
		   "  -o writeback             kernel writeback cache: faster small writes, but\n"
		   "                           gives up coherence between an export file and its\n"
		   "                           partition files, and errors (e.g. writes past the\n"
		   "                           end) surface only at fsync/close\n"
		   "  -o allow_other,uid=N,gid=N,umask=M   the usual FUSE ownership options\n"
		   "  -o fsname=NAME,subtype=TYPE          as in other FUSE filesystems\n"
		   "\n"
		   "Partitions later: setfattr -n user.nbdfs.partition -v auto|none|SECTORS FILE\n"
		   "-o options of nbdfs are also long options (-o timeout=5: --timeout=5).\n"
		   "See nbdfs(1).\n");
}
