/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nbdc-cli.h: what nbdc-cli.c and its stress engine (stress.c) share: limits,
 * errno names and the line that reports a failed request. */
#pragma once

#include <glib.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define CHUNK (1u << 20) /* verify/fill/expect work in these steps */
#define WATCHDOG_US (120 * G_USEC_PER_SEC)

/* "EIO" for 5 or -5 (a static per-thread buffer for unknown numbers). */
static inline const char *errname(int e)
{
	static __thread char buf[32];
	const char *n;

	if (e < 0)
		e = -e;
	n = strerrorname_np(e);
	if (n)
		return n;
	snprintf(buf, sizeof(buf), "E%d", e);
	return buf;
}

/* Reports request @cmd of [off, off+len) failing with -errno @r; returns 1. */
static inline int io_fail(const char *cmd, uint64_t off, uint64_t len, int r)
{
	fprintf(stderr, "nbdc-cli: %s %" PRIu64 " %" PRIu64 ": %s (%s)\n", cmd, off, len,
		errname(r), g_strerror(-r));
	return 1;
}
