/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* sources.h: from the SOURCE arguments to export devices in the tree, and
 * the helpers --list shares (private to the daemon). */
#pragma once

#include <glib.h>

#include "fs/fs.h"
#include "nbdfs/nbd.h"
#include "nbdfs/loop.h"
#include "options.h"

typedef struct sources Sources;

/* Parses every "[NAME=]URI" argument (all but the last of o->args).  NULL
 * after printing one line naming the bad source. */
Sources *sources_parse(const struct options *o);
void sources_free(Sources *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Sources, sources_free)

/* The first source's URI without secrets (the default fsname); borrowed. */
const char *sources_display_name(Sources *s);

/* Learns every export (listing with -a), makes its device on @loops and adds
 * it to @fs.  FALSE after printing one line "nbdfs: SOURCE: cause". */
gboolean sources_connect(Sources *s, LoopSet *loops, Fs *fs);

/* Flushes nothing, disconnects every device made so far (start-up failed). */
void sources_disconnect(Sources *s);

/* ---- Helpers shared with --list (list.c) ---- */

/* The URI of one "[NAME=]URI" argument (caller frees), or NULL + GError. */
NbdcUri *sources_parse_uri(const char *arg, GError **error);

/* FALSE after one line naming @arg when -o tls-psk= or tls-certificates=
 * was given for a non-TLS @uri (it would be silently ignored). */
gboolean sources_check_tls_options(const struct options *o, const char *arg,
				   const struct nbdc_uri *uri);

/* Fills @cfg for @uri with the command-line defaults (borrows @o and @uri:
 * both must outlive @cfg). */
void sources_config_for(struct nbdc_config *cfg, const struct options *o,
			const struct nbdc_uri *uri);

/* Prints "nbdfs: SOURCE: cause", without the server's name that @cause may
 * begin with (@uri may be NULL). */
void sources_fail_line(const char *source, const struct nbdc_uri *uri, const char *cause);

/* @cause without a leading "@prefix: " (borrowed from @cause). */
const char *sources_strip_prefix(const char *cause, const char *prefix);
