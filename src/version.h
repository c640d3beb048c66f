/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* version.h: nbdfs --version (private to the daemon). */
#pragma once

#include <glib.h>
#include <stdio.h>

/* Prints one "NAME VERSION" line each for nbdfs, libfuse, the FUSE kernel
 * protocol nbdfs speaks, the FUSE transport the running kernel offers,
 * gnutls and glib (the libraries' versions as loaded at run time). */
void version_print(FILE *f);
