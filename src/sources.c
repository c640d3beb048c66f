/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* sources.c: SOURCE arguments -> servers -> exports -> devices, and --list.
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

/* ---- --list ------------------------------------------------------------ */

int sources_list(const struct options *o)
{
	if (o->args->len != 1) {
		fprintf(stderr, "nbdfs: --list takes exactly one URI\n");
		return 1;
	}
	const char *arg = o->args->pdata[0];
	g_autoptr(GError) err = NULL;
	struct server *s = server_parse(arg, &err);
	if (s == NULL) {
		fail_line(arg, err->message);
		return 1;
	}
	struct nbdc_config cfg;
	config_for(&cfg, o, s->uri);
	g_autoptr(GPtrArray) list = nbdc_list_exports(&cfg, o->list_long, &err);
	int ret = 0;
	if (list == NULL) {
		g_autofree char *display = nbdc_uri_to_display(s->uri);
		const char *why = strip_prefix(strip_prefix(err->message, arg), display);

		if (g_error_matches(err, NBDC_ERROR, NBDC_ERROR_POLICY)) {
			fprintf(stderr, "nbdfs: %s: listing exports refused by policy: %s\n", arg,
				why);
			ret = 2;
		} else if (g_error_matches(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED)) {
			fprintf(stderr, "nbdfs: %s: server too old to list exports: %s\n", arg, why);
			ret = 2;
		} else {
			fail_line(arg, why);
			ret = 1;
		}
		server_free(s);
		return ret;
	}
	for (guint i = 0; i < list->len; i++) {
		struct nbdc_export *e = list->pdata[i];

		if (!o->list_long) {
			printf("%s\n", e->name);
			continue;
		}
		if (e->has_info)
			printf("%s\tsize=%" G_GUINT64_FORMAT "\t%s\tblock=%u/%u/%u\t%s\n", e->name,
			       e->size, e->read_only ? "ro" : "rw", e->block_min, e->block_pref,
			       e->block_max, e->description);
		else
			printf("%s\tsize=?\t?\tblock=?\t%s\n", e->name, e->description);
	}
	fflush(stdout);
	server_free(s);
	return 0;
}
