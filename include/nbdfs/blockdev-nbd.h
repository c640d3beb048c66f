/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* blockdev-nbd.h: an NBD export as a Blockdev.
 *
 * Kept apart from blockdev.h so that the FUSE layer never sees NBD types:
 * only the daemon's start-up (which builds devices from URIs) includes it.
 * The NBD core does the connection work (include/nbdfs/nbd.h): connecting
 * on first use, reconnecting with backoff, the request timeout, replaying
 * unflushed writes, closing idle connections; this device maps sectors to
 * byte requests and the core's states to the block layer's.
 */
#pragma once

#include "nbdfs/blockdev.h"
#include "nbdfs/nbd.h"

G_BEGIN_DECLS

struct blockdev_nbd_opts {
	uint32_t sector_size; /* 0 = the server's minimum block size if >= 512, else 512 */
	guint timeout_s;      /* how long a request waits for an unreachable server
			       * (reconnecting with backoff meanwhile) before -EIO;
			       * 0 = fail at once.  A slow but connected server is
			       * not unreachable.  Also bounds each connect. */
	guint io_timeout_s;   /* a sent request unanswered this long means the
			       * connection is lost (reconnect and resend); 0 = never */
	guint idle_timeout_s; /* lazy devices: close connections idle this long with
			       * no open file; 0 = never */
	gboolean read_only;   /* refuse writes even where the export allows them */
	const char *uri;      /* display URI (no secrets) for blockdev_info.uri; copied */
};

/* Connects now with @cfg (copied; its strings are borrowed and must outlive
 * the device: it reconnects with them).  Reconnection re-checks the export
 * size; a changed size is refused (logged) and retried until the timeout.
 * Returns a new device (caller unrefs) or NULL + GError (NBDC_ERROR, or
 * BLOCKDEV_ERROR for a bad sector size). */
Blockdev *blockdev_nbd_new(const struct nbdc_config *cfg, const struct blockdev_nbd_opts *opts,
			   GError **error);

/* The same for an export @known describes (nbdc_probe_exports), without
 * connecting: the first open (blockdev_hold) or request connects. */
Blockdev *blockdev_nbd_open(const struct nbdc_config *cfg, const struct blockdev_nbd_opts *opts,
			    const struct nbdc_export *known, GError **error);

G_END_DECLS
