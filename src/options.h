/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* options.h: the nbdfs command line, parsed and checked (private to the daemon).
 *
 * One struct filled by fuse_opt_parse: what the user asked for, apart from
 * runtime state.  Every value is range-checked here; a bad one is one line
 * naming the option.
 */
#pragma once

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <glib.h>
#include <stdio.h>

#define OPTIONS_UNSET_ID ((unsigned)-1)

struct options {
	int foreground, debug, all_exports, list, list_long, list_json, help, version;
	int partitions_auto, read_only, writeback;
	char *partitions;
	char *pidfile;
	char *log; /* --log=stderr|syslog|FILE, NULL = default */
	/* Numeric values as given (checked by options_check into the fields below). */
	char *sector_size_s, *connections_s, *timeout_s, *io_timeout_s, *idle_timeout_s;
	char *uid_s, *gid_s, *umask_s;
	unsigned sector_size, connections, timeout, io_timeout, idle_timeout;
	unsigned uid, gid, umask; /* OPTIONS_UNSET_ID when not given */
	char *tls_psk, *tls_certificates, *tls_verify_peer;
	gboolean verify_peer;	 /* from tls_verify_peer, default TRUE */
	char *fsname, *subtype;	 /* -o fsname=, -o subtype= (NULL: defaults) */
	GPtrArray *splits;	 /* char *: "FILE:SECTORS" */
	GPtrArray *args;	 /* char *: sources, then the mountpoint */
	GPtrArray *unknown_long; /* char *: "--x" options fuse_opt does not know */
};

/* Parses @argc/@argv into @o (initialised here) and @args (the FUSE mount
 * options left over).  FALSE after printing one line to stderr. */
gboolean options_parse(int argc, char *argv[], struct options *o, struct fuse_args *args);
/* Checks and converts every value (ranges, on/off, partitions=, split=).
 * FALSE after printing one line naming the option. */
gboolean options_check(struct options *o);
void options_clear(struct options *o);
void options_usage(FILE *f);
