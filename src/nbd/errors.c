/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* errors.c: the NBDC_ERROR quark, NBD error code -> errno, logging, names of
 * servers and commands, export records. */
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
	static const char *const names[] = {"debug", "info", "warning"};
	fprintf(stderr, "nbdc %s: %s\n", names[level], msg);
}

char *nbdc_cfg_display(const struct nbdc_config *cfg)
{
	const char *exp = cfg->export_name ? cfg->export_name : "";
	const char *s = cfg->tls ? "s" : "";

	if (cfg->fd >= 0)
		return g_strdup_printf("fd %d", cfg->fd);
	if (cfg->socket_path)
		return g_strdup_printf("nbd%s+unix:///%s?socket=%s", s, exp, cfg->socket_path);
	if (cfg->host) {
		gboolean v6 = strchr(cfg->host, ':') != NULL;

		return g_strdup_printf("nbd%s://%s%s%s:%s/%s", s, v6 ? "[" : "", cfg->host,
				       v6 ? "]" : "", cfg->port ? cfg->port : NBD_DEFAULT_PORT,
				       exp);
	}
	return g_strdup("nbd (no address)");
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
