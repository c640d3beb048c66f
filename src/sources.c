/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* sources.c: SOURCE arguments -> servers -> exports -> devices, and the
 * helpers --list (list.c) shares.
 *
 * Every start-up failure is one line "nbdfs: SOURCE: cause" on stderr.
 */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "nbdfs/blockdev-nbd.h"
#include "nbdfs/nbd.h"
#include "sources.h"

struct server {
	char *arg;  /* as given */
	char *name; /* NAME= or NULL */
	NbdcUri *uri;
};

struct export_src {
	struct server *srv;     /* borrowed */
	char *label;            /* for messages: the arg, or the arg + export */
	char *export_name;      /* requested export name */
	char *display;          /* URI without secrets */
	struct nbdc_config cfg; /* borrows srv->uri, export_name */
	Blockdev *dev;
};

struct sources {
	const struct options *o; /* borrowed */
	GPtrArray *servers;      /* struct server * */
	GPtrArray *exports;      /* struct export_src * */
	char *display;
};

static void server_free(struct server *s)
{
	g_free(s->arg);
	g_free(s->name);
	nbdc_uri_free(s->uri);
	g_free(s);
}

static void export_src_free(struct export_src *e)
{
	blockdev_unref(e->dev);
	g_free(e->label);
	g_free(e->export_name);
	g_free(e->display);
	g_free(e);
}

/* Splits "[NAME=]URI": a '=' before the "://" introduces a name. */
static struct server *server_parse(const char *arg, GError **error)
{
	struct server *s = g_new0(struct server, 1);

	s->arg = g_strdup(arg);
	const char *uri = arg;
	const char *scheme = strstr(arg, "://");
	const char *eq = strchr(arg, '=');
	if (eq && scheme && eq < scheme) {
		s->name = g_strndup(arg, (gsize)(eq - arg));
		uri = eq + 1;
	}
	s->uri = nbdc_uri_parse(uri, error);
	if (s->uri == NULL) {
		server_free(s);
		return NULL;
	}
	return s;
}

static void core_log(void *opaque, enum nbdc_log_level level, const char *msg)
{
	switch (level) {
	case NBDC_LOG_DEBUG:
		g_debug("%s", msg);
		break;
	case NBDC_LOG_INFO:
		g_info("%s", msg);
		break;
	case NBDC_LOG_WARNING:
	default:
		g_warning("%s", msg);
		break;
	}
}

/* Fills @cfg for @uri with the command-line defaults. */
static void config_for(struct nbdc_config *cfg, const struct options *o,
		       const struct nbdc_uri *uri)
{
	nbdc_config_init(cfg);
	cfg->tls_psk_file = o->tls_psk;
	cfg->tls_certificates = o->tls_certificates;
	cfg->tls_verify_peer = o->verify_peer;
	cfg->connections = o->connections;
	cfg->log = core_log;
	cfg->debug = o->debug;
	nbdc_config_set_uri(cfg, uri);
}

static char *display_for(const struct nbdc_uri *uri, const char *export_name)
{
	struct nbdc_uri copy = *uri;

	copy.export_name = (char *)export_name;
	return nbdc_uri_to_display(&copy);
}

/* @cause without a leading "@prefix: " (the core's messages begin with the
 * server's name, which the failure line already gives). */
static const char *strip_prefix(const char *cause, const char *prefix)
{
	size_t n = prefix ? strlen(prefix) : 0;

	if (n && strncmp(cause, prefix, n) == 0 && cause[n] == ':' && cause[n + 1] == ' ')
		return cause + n + 2;
	return cause;
}

static void fail_line_uri(const char *source, const struct nbdc_uri *uri, const char *cause)
{
	cause = strip_prefix(cause, source);
	if (uri) {
		g_autofree char *display = nbdc_uri_to_display(uri);
		cause = strip_prefix(cause, display);
	}
	fprintf(stderr, "nbdfs: %s: %s\n", source, cause);
}

static void fail_line(const char *source, const char *cause)
{
	fail_line_uri(source, NULL, cause);
}

/* -o tls-psk= or tls-certificates= with no TLS source at all would be
 * silently ignored: refuse it, naming the first source.  (With a mix of
 * nbd:// and nbds:// sources the credentials are for the TLS ones.) */
static gboolean check_tls_options(Sources *s)
{
	for (guint i = 0; i < s->servers->len; i++) {
		struct server *srv = s->servers->pdata[i];

		if (srv->uri->tls)
			return TRUE;
	}
	if (s->servers->len == 0)
		return TRUE;
	struct server *first = s->servers->pdata[0];
	return sources_check_tls_options(s->o, first->arg, first->uri);
}

Sources *sources_parse(const struct options *o)
{
	g_autoptr(Sources) s = g_new0(Sources, 1);

	s->o = o;
	s->servers = g_ptr_array_new_with_free_func((GDestroyNotify)server_free);
	s->exports = g_ptr_array_new_with_free_func((GDestroyNotify)export_src_free);
	for (guint i = 0; i + 1 < o->args->len; i++) {
		g_autoptr(GError) err = NULL;
		struct server *srv = server_parse(o->args->pdata[i], &err);

		if (srv == NULL) {
			fail_line(o->args->pdata[i], err->message);
			return NULL;
		}
		g_ptr_array_add(s->servers, srv);
	}
	if (!check_tls_options(s))
		return NULL;
	if (s->servers->len > 0) {
		struct server *first = s->servers->pdata[0];

		s->display = nbdc_uri_to_display(first->uri);
	}
	return g_steal_pointer(&s);
}

void sources_free(Sources *s)
{
	if (!s)
		return;
	g_ptr_array_unref(s->exports);
	g_ptr_array_unref(s->servers);
	g_free(s->display);
	g_free(s);
}

const char *sources_display_name(Sources *s)
{
	return s->display ? s->display : "nbdfs";
}

gboolean sources_connect(Sources *s, LoopSet *loops, Fs *fs)
{
	const struct options *o = s->o;

	(void)loops;
	for (guint i = 0; i < s->servers->len; i++) {
		struct server *srv = s->servers->pdata[i];
		g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);

		if (o->all_exports) {
			struct nbdc_config lcfg;
			g_autoptr(GError) err = NULL;

			config_for(&lcfg, o, srv->uri);
			g_autoptr(GPtrArray) list = nbdc_list_exports(&lcfg, FALSE, &err);
			if (list == NULL) {
				fail_line_uri(srv->arg, srv->uri, err->message);
				return FALSE;
			}
			for (guint j = 0; j < list->len; j++) {
				struct nbdc_export *e = list->pdata[j];

				g_ptr_array_add(names, g_strdup(e->name));
			}
			if (list->len == 0)
				g_warning("%s: the server lists no exports", srv->arg);
		} else {
			g_ptr_array_add(names, g_strdup(srv->uri->export_name));
		}
		for (guint j = 0; j < names->len; j++) {
			struct export_src *e = g_new0(struct export_src, 1);

			e->srv = srv;
			e->export_name = g_strdup(names->pdata[j]);
			e->display = display_for(srv->uri, e->export_name);
			e->label = o->all_exports ? g_strdup(e->display) : g_strdup(srv->arg);
			config_for(&e->cfg, o, srv->uri);
			e->cfg.export_name = e->export_name;
			g_ptr_array_add(s->exports, e);
		}
	}
	for (guint i = 0; i < s->exports->len; i++) {
		struct export_src *e = s->exports->pdata[i];
		struct blockdev_nbd_opts bopts = {
			.sector_size = o->sector_size,
			.timeout_s = o->timeout,
			.read_only = o->read_only,
			.uri = e->display,
		};
		g_autoptr(GError) err = NULL;

		e->dev = blockdev_nbd_new(&e->cfg, &bopts, &err);
		if (e->dev == NULL) {
			fail_line_uri(e->label, e->srv->uri, strip_prefix(err->message, e->display));
			return FALSE;
		}
		const char *name = (!o->all_exports && e->srv->name) ? e->srv->name : e->export_name;
		if (!fs_add_export(fs, name, e->label, e->dev, &err)) {
			fail_line(e->label, err->message);
			return FALSE;
		}
	}
	return TRUE;
}

void sources_disconnect(Sources *s)
{
	for (guint i = 0; i < s->exports->len; i++) {
		struct export_src *e = s->exports->pdata[i];

		if (e->dev)
			blockdev_disconnect(e->dev);
	}
}

/* ---- For --list (list.c) ------------------------------------------------ */

NbdcUri *sources_parse_uri(const char *arg, GError **error)
{
	struct server *s = server_parse(arg, error);

	if (s == NULL)
		return NULL;
	NbdcUri *uri = g_steal_pointer(&s->uri);
	server_free(s);
	return uri;
}

gboolean sources_check_tls_options(const struct options *o, const char *arg,
				   const struct nbdc_uri *uri)
{
	const char *opt = o->tls_psk ? "tls-psk" : o->tls_certificates ? "tls-certificates" : NULL;

	if (opt == NULL || uri->tls)
		return TRUE;
	fprintf(stderr, "nbdfs: %s: %s= needs a TLS URI (nbds:// or nbds+unix://)\n", arg, opt);
	return FALSE;
}

void sources_config_for(struct nbdc_config *cfg, const struct options *o,
			const struct nbdc_uri *uri)
{
	config_for(cfg, o, uri);
}

void sources_fail_line(const char *source, const struct nbdc_uri *uri, const char *cause)
{
	fail_line_uri(source, uri, cause);
}

const char *sources_strip_prefix(const char *cause, const char *prefix)
{
	return strip_prefix(cause, prefix);
}
