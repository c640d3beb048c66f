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
	struct server *srv;	/* borrowed */
	char *label;		/* for messages: the arg, or the arg + export */
	char *export_name;	/* requested export name */
	char *display;		/* URI without secrets */
	struct nbdc_config cfg; /* borrows srv->uri, export_name */
	Blockdev *dev;
};

struct sources {
	const struct options *o; /* borrowed */
	LoopSet *loops;		 /* borrowed: the daemon's */
	GPtrArray *servers;	 /* struct server * */
	GPtrArray *exports;	 /* struct export_src * */
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
static void config_for(struct nbdc_config *cfg, const struct options *o, const struct nbdc_uri *uri)
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

/* The handshake bound: the timeout (connecting to a server that answers
 * nothing must not outlast the requests waiting for it), 30 s without one. */
static guint handshake_ms(const struct options *o)
{
	return o->timeout ? MIN(o->timeout, 3600u) * 1000 : 30000;
}

/* Makes the device of export @e of @srv (lazily when the probe described
 * it, else by connecting now) and adds it to @fs.  FALSE + @error. */
static gboolean add_export(Sources *s, struct server *srv, const struct nbdc_export *e, Fs *fs,
			   GError **error)
{
	const struct options *o = s->o;
	struct export_src *x = g_new0(struct export_src, 1);

	x->srv = srv;
	x->export_name = g_strdup(e->name);
	x->display = display_for(srv->uri, x->export_name);
	x->label = o->all_exports ? g_strdup(x->display) : g_strdup(srv->arg);
	config_for(&x->cfg, o, srv->uri);
	x->cfg.export_name = x->export_name;
	x->cfg.loops = s->loops;
	x->cfg.handshake_timeout_ms = handshake_ms(o);
	g_ptr_array_add(s->exports, x);

	struct blockdev_nbd_opts bopts = {
		.sector_size = o->sector_size,
		.timeout_s = o->timeout,
		.io_timeout_s = o->io_timeout,
		.idle_timeout_s = o->idle_timeout,
		.read_only = o->read_only,
		.uri = x->display,
	};
	/* Without INFO the server must be asked by connecting; and some servers
	 * (nbd-server) answer INFO with size 0 for an export they have not
	 * opened: a size 0 is checked the same way. */
	if (e->has_info && e->size > 0)
		x->dev = blockdev_nbd_open(&x->cfg, &bopts, e, error);
	else
		x->dev = blockdev_nbd_new(&x->cfg, &bopts, error);
	if (!x->dev)
		return FALSE;
	const char *name = (!o->all_exports && srv->name) ? srv->name : x->export_name;
	return fs_add_export(fs, name, x->label, x->dev, error);
}

/* Learns the exports of @srv (its one export, or with -a all it lists). */
static GPtrArray *probe_server(Sources *s, struct server *srv, GError **error)
{
	const struct options *o = s->o;
	struct nbdc_config cfg;
	const char *name = srv->uri->export_name;

	config_for(&cfg, o, srv->uri);
	cfg.loops = s->loops;
	cfg.handshake_timeout_ms = handshake_ms(o);
	return nbdc_probe_exports(&cfg, &name, 1, o->all_exports, 0, error);
}

gboolean sources_connect(Sources *s, LoopSet *loops, Fs *fs)
{
	const struct options *o = s->o;
	guint shown = 0;

	s->loops = loops;
	for (guint i = 0; i < s->servers->len; i++) {
		struct server *srv = s->servers->pdata[i];
		g_autoptr(GError) err = NULL;
		g_autoptr(GPtrArray) found = probe_server(s, srv, &err);

		if (!found) {
			fail_line_uri(srv->arg, srv->uri, err->message);
			return FALSE;
		}
		if (o->all_exports && found->len == 0)
			g_warning("%s: the server lists no exports", srv->arg);
		for (guint j = 0; j < found->len; j++) {
			struct nbdc_export *e = found->pdata[j];
			g_autoptr(GError) e_err = NULL;

			/* The server cannot describe it without a connection:
			 * connect to it now (old servers, oldstyle). */
			if (!e->has_info && e->error &&
			    !g_error_matches(e->error, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED))
				e_err = g_error_copy(e->error);
			if (!e_err && add_export(s, srv, e, fs, &e_err)) {
				shown++;
				continue;
			}
			if (g_error_matches(e_err, FS_ERROR, FS_ERROR_NAME_CLASH) ||
			    !o->all_exports) {
				struct export_src *x =
					s->exports->len
						? g_ptr_array_index(s->exports, s->exports->len - 1)
						: NULL;
				const char *label = x && x->srv == srv ? x->label : srv->arg;

				fail_line_uri(label, srv->uri, e_err->message);
				return FALSE;
			}
			/* -a goes on: one export that cannot be opened is skipped. */
			g_autofree char *display = display_for(srv->uri, e->name);
			g_warning("%s: skipped: %s", display,
				  strip_prefix(strip_prefix(e_err->message, display), srv->arg));
		}
	}
	if (shown == 0 && o->all_exports) {
		fprintf(stderr, "nbdfs: %s: no export could be shown\n",
			s->servers->len ? ((struct server *)s->servers->pdata[0])->arg : "");
		return FALSE;
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
