/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* version.c: nbdfs --version: nbdfs's version and those of what it runs on. */
#include "config.h"

#include <gnutls/gnutls.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <string.h>
#include <sys/utsname.h>
#include <unistd.h>

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include "version.h"

#define FUSE_DEVICE "/dev/fuse"
#define FUSE_URING_PARAM "/sys/module/fuse/parameters/enable_uring"

/* What this kernel offers as FUSE transport: the /dev/fuse device and,
 * where the fuse module has the enable_uring parameter, FUSE over io_uring
 * (on or off).  Caller frees. */
static char *kernel_transport(void)
{
	g_autofree char *uring = NULL;
	const char *dev = access(FUSE_DEVICE, F_OK) == 0 ? FUSE_DEVICE : FUSE_DEVICE " missing";
	const char *how;

	if (!g_file_get_contents(FUSE_URING_PARAM, &uring, NULL, NULL))
		how = "not offered (no enable_uring in the fuse module)";
	else if (g_str_has_prefix(uring, "Y") || g_str_has_prefix(uring, "1"))
		how = "offered (enable_uring=Y)";
	else
		how = "not enabled (enable_uring=N)";
	struct utsname u;
	g_autofree char *release = uname(&u) == 0 ? g_strdup(u.release) : g_strdup("?");
	return g_strdup_printf("%s, io_uring %s; Linux %s", dev, how, release);
}

void version_print(FILE *f)
{
	g_autofree char *transport = kernel_transport();

	fprintf(f, "nbdfs %s\n", PACKAGE_VERSION);
	fprintf(f, "libfuse %s\n", fuse_pkgversion());
	fprintf(f, "FUSE protocol %d.%d (spoken by nbdfs)\n", FUSE_KERNEL_VERSION,
		FUSE_KERNEL_MINOR_VERSION);
	fprintf(f, "FUSE transport %s\n", transport);
	fprintf(f, "gnutls %s\n", gnutls_check_version(NULL));
	fprintf(f, "glib %u.%u.%u\n", glib_major_version, glib_minor_version, glib_micro_version);
}
