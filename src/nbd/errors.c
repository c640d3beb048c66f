/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* errors.c: the NBDC_ERROR quark, NBD error code -> errno, logging, names of
 * commands, negotiation and export records. */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"
#include "wire.h"

/* clang-format off */
G_DEFINE_QUARK(nbdc-error-quark, nbdc_error)
/* clang-format on */

int nbdc_errno_from_nbd(uint32_t nbd_error)
{
	switch (nbd_error) {
	case NBD_EPERM:
		return EPERM;
	case NBD_EIO:
		return EIO;
	case NBD_ENOMEM:
		return ENOMEM;
	case NBD_EINVAL:
		return EINVAL;
	case NBD_ENOSPC:
		return ENOSPC;
	case NBD_EOVERFLOW:
		return EOVERFLOW;
	case NBD_ENOTSUP:
		return ENOTSUP;
	case NBD_ESHUTDOWN:
		return ESHUTDOWN;
	default:
		return EINVAL;
	}
}

void nbdc_log(const struct nbdc_config *cfg, enum nbdc_log_level level, const char *fmt, ...)
{
	va_list ap;

	if (level == NBDC_LOG_DEBUG && !cfg->debug)
		return;
	va_start(ap, fmt);
	g_autofree char *msg = g_strdup_vprintf(fmt, ap);
	va_end(ap);
	if (cfg->log) {
		cfg->log(cfg->log_opaque, level, msg);
		return;
	}
	static const char *const names[] = { "debug", "info", "warning" };
	fprintf(stderr, "nbdc %s: %s\n", names[level], msg);
}

void nbdc_neg_clear(struct nbdc_neg *neg)
{
	g_clear_pointer(&neg->name, g_free);
	g_clear_pointer(&neg->description, g_free);
}

void nbdc_export_free(gpointer p)
{
	struct nbdc_export *e = p;

	if (!e)
		return;
	g_free(e->name);
	g_free(e->description);
	g_free(e->canonical_name);
	g_clear_error(&e->error);
	g_free(e);
}

const char *nbdc_cmd_name(uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ:
		return "READ";
	case NBD_CMD_WRITE:
		return "WRITE";
	case NBD_CMD_DISC:
		return "DISC";
	case NBD_CMD_FLUSH:
		return "FLUSH";
	case NBD_CMD_TRIM:
		return "TRIM";
	case NBD_CMD_CACHE:
		return "CACHE";
	case NBD_CMD_WRITE_ZEROES:
		return "WRITE_ZEROES";
	case NBD_CMD_BLOCK_STATUS:
		return "BLOCK_STATUS";
	default:
		return "CMD?";
	}
}
