/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* cfg.c: a configuration: its defaults, the name that shows its server in
 * messages, and the loops its connections run on. */
#include "config.h"

#include <string.h>

#include "internal.h"
#include "wire.h"

void nbdc_config_init(struct nbdc_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->fd = -1;
	cfg->tls_verify_peer = TRUE;
	cfg->structured_replies = TRUE;
	cfg->block_status = TRUE;
	cfg->max_in_flight = 64;
	cfg->handshake_timeout_ms = 30000;
	cfg->replay = TRUE;
	cfg->idle_timeout_ms = 60000;
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

/* The process-wide default loops are started on first use. */
LoopSet *nbdc_cfg_loops(const struct nbdc_config *cfg)
{
	static LoopSet *deflt;

	if (cfg->loops)
		return cfg->loops;
	if (g_once_init_enter(&deflt)) {
		g_autoptr(GError) err = NULL;
		LoopSet *ls = loop_set_new(MIN(4u, MAX(2u, g_get_num_processors())), 2, &err);

		if (!ls)
			g_error("nbdc: cannot start the default event loops: %s", err->message);
		g_once_init_leave(&deflt, ls);
	}
	return deflt;
}
