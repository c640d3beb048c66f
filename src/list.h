/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* list.h: nbdfs --list [--long|--json] URI (private to the daemon). */
#pragma once

#include "options.h"

/* Prints the exports of the one URI in o->args (names; --long: one line
 * each with size, ro/rw, block sizes, description; --json: one JSON
 * document).  @args: the FUSE options left over after parsing, which
 * --list refuses.  Returns the exit status: 0; 1 for bad options, an
 * unreachable server or a failed handshake; 2 when the server refuses to
 * list (policy) or is too old to.  Failures are one line on stderr. */
int list_exports(const struct options *o, const struct fuse_args *args);
