/* blockdev-nbd.h: an NBD export as a Blockdev, with reconnection.
 *
 * Kept apart from blockdev.h so that the FUSE layer never sees NBD types:
 * only main.c (which builds devices from URIs) includes this header.
 */
#pragma once

#include "nbdfs/blockdev.h"
#include "nbdfs/nbd.h"

G_BEGIN_DECLS

struct blockdev_nbd_opts {
	uint32_t sector_size;   /* 0 = the server's minimum block size if >= 512, else 512 */
	guint timeout_s;        /* how long a request waits for an unreachable server
	                         * (reconnecting with backoff meanwhile) before -EIO;
	                         * 0 = fail at once.  A slow but connected server is
	                         * not unreachable. */
	gboolean read_only;     /* refuse writes even where the export allows them */
	const char *uri;        /* display URI (no secrets) for blockdev_info.uri; copied */
};

/* Connects with @cfg (borrowed: must outlive the device, it is reused to
 * reconnect).  Reconnection re-checks the export size; a changed size is
 * refused (logged) and retried until the timeout.  Returns a new device
 * (caller unrefs) or NULL + GError (NBDC_ERROR domain, or G_IO_ERROR for a
 * bad sector size). */
Blockdev *blockdev_nbd_new(const struct nbdc_config *cfg, const struct blockdev_nbd_opts *opts,
			   GError **error);

G_END_DECLS
