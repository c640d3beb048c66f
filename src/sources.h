/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* sources.h: from the SOURCE arguments to export devices in the tree, and
 * --list (private to the daemon). */
#pragma once

#include <glib.h>

#include "fs/fs.h"
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

/* --list: prints the exports of the one URI in o->args; returns the exit
 * status (0, 1 unreachable or handshake failure, 2 refused or too old). */
int sources_list(const struct options *o);
