/* uri.c: NBD URIs (NetworkBlockDevice doc/uri.md): parse, display, apply to a config. */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbdfs/nbd.h"
#include "wire.h"

void nbdc_uri_free(struct nbdc_uri *u)
{
	if (!u)
		return;
	g_free(u->host);
	g_free(u->port);
	g_free(u->socket_path);
	g_free(u->export_name);
	g_free(u->tls_username);
	g_free(u->tls_psk_file);
	g_free(u->tls_certificates);
	g_free(u->tls_hostname);
	g_free(u->tls_type);
	g_free(u);
}

static gboolean uri_fail(GError **error, const char *uri, const char *fmt, ...) G_GNUC_PRINTF(3, 4);
static gboolean uri_fail(GError **error, const char *uri, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	g_autofree char *m = g_strdup_vprintf(fmt, ap);
	va_end(ap);
	g_set_error(error, NBDC_ERROR, NBDC_ERROR_URI, "%s: %s", uri, m);
	return FALSE;
}

static int hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

/* Percent-decodes @s[0..len); NULL with an error naming @what on a bad
 * escape or a decoded NUL. */
static char *pct_decode(const char *s, size_t len, const char *uri, const char *what,
			GError **error)
{
	GString *out = g_string_sized_new(len);

	for (size_t i = 0; i < len; i++) {
		if (s[i] != '%') {
			g_string_append_c(out, s[i]);
			continue;
		}
		int hi = i + 1 < len ? hexval(s[i + 1]) : -1;
		int lo = i + 2 < len ? hexval(s[i + 2]) : -1;
		if (hi < 0 || lo < 0) {
			uri_fail(error, uri, "bad %%-escape '%.*s' in %s", (int)MIN(3, len - i),
				 s + i, what);
			g_string_free(out, TRUE);
			return NULL;
		}
		char ch = (char)(hi * 16 + lo);
		if (ch == 0) {
			uri_fail(error, uri, "%%00 (NUL) in %s is not supported", what);
			g_string_free(out, TRUE);
			return NULL;
		}
		g_string_append_c(out, ch);
		i += 2;
	}
	return g_string_free(out, FALSE);
}

static gboolean parse_port(const char *p, size_t len, const char *uri, char **out, GError **error)
{
	g_autofree char *s = g_strndup(p, len);
	unsigned long v = 0;

	if (len == 0)
		return TRUE; /* "host:" = default port */
	for (size_t i = 0; i < len; i++)
		if (!g_ascii_isdigit(s[i]))
			return uri_fail(error, uri, "bad port '%s'", s);
	if (len > 5 || (v = strtoul(s, NULL, 10)) == 0 || v > 65535)
		return uri_fail(error, uri, "bad port '%s'", s);
	*out = g_strdup_printf("%lu", v);
	return TRUE;
}

static gboolean parse_authority(struct nbdc_uri *u, const char *a, size_t len, const char *uri,
				GError **error)
{
	const char *at = NULL;

	for (size_t i = 0; i < len; i++)
		if (a[i] == '@')
			at = a + i;
	if (at) {
		u->tls_username = pct_decode(a, (size_t)(at - a), uri, "user name", error);
		if (!u->tls_username)
			return FALSE;
		if (!u->tls_username[0])
			return uri_fail(error, uri, "empty user name before '@'");
		len -= (size_t)(at + 1 - a);
		a = at + 1;
	}
	const char *hs = a, *he, *pp = NULL;
	size_t plen = 0;
	if (len > 0 && a[0] == '[') {
		const char *rb = memchr(a, ']', len);

		if (!rb)
			return uri_fail(error, uri, "missing ']' after IPv6 address");
		hs = a + 1;
		he = rb;
		if (he == hs)
			return uri_fail(error, uri, "empty IPv6 address");
		const char *after = rb + 1;
		size_t left = len - (size_t)(after - a);
		if (left > 0) {
			if (after[0] != ':')
				return uri_fail(error, uri, "unexpected '%.*s' after IPv6 address",
						(int)left, after);
			pp = after + 1;
			plen = left - 1;
		}
		gboolean zone = FALSE; /* after '%': a zone id such as "eth0" */
		for (const char *q = hs; q < he; q++) {
			if (*q == '%')
				zone = TRUE;
			else if (zone ? !(g_ascii_isalnum(*q) || strchr("-._~", *q))
				      : !(g_ascii_isxdigit(*q) || *q == ':' || *q == '.'))
				return uri_fail(error, uri, "bad IPv6 address '%.*s'",
						(int)(he - hs), hs);
		}
	} else {
		const char *colon = memchr(a, ':', len);

		he = colon ? colon : a + len;
		if (colon) {
			pp = colon + 1;
			plen = len - (size_t)(pp - a);
		}
	}
	if (he > hs) {
		u->host = pct_decode(hs, (size_t)(he - hs), uri, "host", error);
		if (!u->host)
			return FALSE;
		for (const char *q = u->host; *q; q++)
			if (*q == '/' || *q == '@' || *q == ' ' || *q == '[' || *q == ']')
				return uri_fail(error, uri, "bad host '%s'", u->host);
	}
	if (pp && !parse_port(pp, plen, uri, &u->port, error))
		return FALSE;
	return TRUE;
}

static gboolean set_once(char **field, char *val, const char *key, const char *uri, GError **error)
{
	if (*field) {
		g_free(val);
		return uri_fail(error, uri, "query parameter '%s' given twice", key);
	}
	*field = val;
	return TRUE;
}

/* The field that the string-valued query parameter @key sets, or NULL. */
static char **string_param(struct nbdc_uri *u, const char *key)
{
	if (strcmp(key, "socket") == 0)
		return &u->socket_path;
	if (strcmp(key, "tls-type") == 0)
		return &u->tls_type;
	if (strcmp(key, "tls-hostname") == 0)
		return &u->tls_hostname;
	if (strcmp(key, "tls-psk-file") == 0)
		return &u->tls_psk_file;
	if (strcmp(key, "tls-certificates") == 0)
		return &u->tls_certificates;
	return NULL;
}

static gboolean parse_query(struct nbdc_uri *u, const char *q, const char *uri, GError **error)
{
	g_auto(GStrv) parts = g_strsplit(q, "&", -1);

	for (char **p = parts; *p; p++) {
		if (!**p)
			continue;
		char *eq = strchr(*p, '=');
		g_autofree char *key =
			pct_decode(*p, eq ? (size_t)(eq - *p) : strlen(*p), uri, "query", error);
		if (!key)
			return FALSE;
		if (!eq)
			return uri_fail(error, uri, "query parameter '%s' has no value", key);
		char *val = pct_decode(eq + 1, strlen(eq + 1), uri, key, error);
		if (!val)
			return FALSE;
		char **field = string_param(u, key);

		if (field) {
			if (field == &u->tls_type && strcmp(val, "anon") && strcmp(val, "x509") &&
			    strcmp(val, "psk")) {
				uri_fail(error, uri,
					 "bad tls-type '%s' (expected anon, x509 or psk)", val);
				g_free(val);
				return FALSE;
			}
			if (!set_once(field, val, key, uri, error))
				return FALSE;
		} else if (strcmp(key, "tls-verify-peer") == 0) {
			int v = -1;

			if (!strcmp(val, "1") || !g_ascii_strcasecmp(val, "true") ||
			    !g_ascii_strcasecmp(val, "yes") || !g_ascii_strcasecmp(val, "on"))
				v = 1;
			else if (!strcmp(val, "0") || !g_ascii_strcasecmp(val, "false") ||
				 !g_ascii_strcasecmp(val, "no") || !g_ascii_strcasecmp(val, "off"))
				v = 0;
			if (v < 0) {
				uri_fail(error, uri, "bad tls-verify-peer '%s' (expected 0 or 1)",
					 val);
				g_free(val);
				return FALSE;
			}
			g_free(val);
			if (u->tls_verify_peer != -1)
				return uri_fail(error, uri, "query parameter '%s' given twice",
						key);
			u->tls_verify_peer = v;
		} else if (g_str_has_prefix(key, "x-")) {
			g_free(val); /* experimental: ignored */
		} else {
			g_free(val);
			return uri_fail(error, uri, "unknown query parameter '%s'", key);
		}
	}
	return TRUE;
}

struct nbdc_uri *nbdc_uri_parse(const char *uri, GError **error)
{
	g_autoptr(NbdcUri) u = g_new0(struct nbdc_uri, 1);
	const char *sep;

	u->tls_verify_peer = -1;
	if (!uri || !*uri) {
		uri_fail(error, "''", "empty URI");
		return NULL;
	}
	sep = strstr(uri, "://");
	if (!sep) {
		uri_fail(error, uri,
			 "not an NBD URI (expected nbd://HOST[:PORT]/EXPORT or "
			 "nbd+unix:///EXPORT?socket=PATH)");
		return NULL;
	}
	g_autofree char *scheme = g_ascii_strdown(uri, sep - uri);
	if (!strcmp(scheme, "nbd")) {
	} else if (!strcmp(scheme, "nbds")) {
		u->tls = TRUE;
	} else if (!strcmp(scheme, "nbd+unix")) {
		u->unix_socket = TRUE;
	} else if (!strcmp(scheme, "nbds+unix")) {
		u->tls = u->unix_socket = TRUE;
	} else {
		uri_fail(error, uri,
			 "unknown scheme '%s' (expected nbd, nbds, nbd+unix or nbds+unix)", scheme);
		return NULL;
	}

	const char *rest = sep + 3;
	const char *hash = strchr(rest, '#');
	size_t rlen = hash ? (size_t)(hash - rest) : strlen(rest);
	g_autofree char *r = g_strndup(rest, rlen);
	char *qm = strchr(r, '?');
	if (qm)
		*qm++ = 0;
	char *slash = strchr(r, '/');
	size_t alen = slash ? (size_t)(slash - r) : strlen(r);

	if (!parse_authority(u, r, alen, uri, error))
		return NULL;
	const char *path = slash ? slash + 1 : "";
	u->export_name = pct_decode(path, strlen(path), uri, "export name", error);
	if (!u->export_name)
		return NULL;
	if (strlen(u->export_name) > NBD_MAX_STRING) {
		uri_fail(error, uri, "export name longer than %u bytes", NBD_MAX_STRING);
		return NULL;
	}
	if (qm && !parse_query(u, qm, uri, error))
		return NULL;

	if (u->unix_socket) {
		if (!u->socket_path) {
			uri_fail(error, uri, "%s needs ?socket=PATH", scheme);
			return NULL;
		}
		if (!u->socket_path[0]) {
			uri_fail(error, uri, "empty socket path");
			return NULL;
		}
		if (u->host || u->port) {
			uri_fail(error, uri, "%s takes no host or port (got '%s')", scheme,
				 u->host ? u->host : u->port);
			return NULL;
		}
	} else {
		if (u->socket_path) {
			uri_fail(error, uri, "socket= needs an nbd+unix:// or nbds+unix:// URI");
			return NULL;
		}
		if (!u->host) {
			uri_fail(error, uri, "missing host");
			return NULL;
		}
		if (!u->port)
			u->port = g_strdup(NBD_DEFAULT_PORT);
	}
	return g_steal_pointer(&u);
}

char *nbdc_uri_to_display(const struct nbdc_uri *u)
{
	GString *s = g_string_new(u->tls ? "nbds" : "nbd");
	g_autofree char *exp =
		g_uri_escape_string(u->export_name ? u->export_name : "", "/:@!$'()*+,;=", FALSE);

	if (u->unix_socket) {
		g_autofree char *sock = g_uri_escape_string(u->socket_path ? u->socket_path : "",
							    "/:@!$'()*+,;", FALSE);

		g_string_append_printf(s, "+unix:///%s?socket=%s", exp, sock);
	} else {
		gboolean v6 = u->host && strchr(u->host, ':');

		g_string_append_printf(s, "://%s%s%s", v6 ? "[" : "", u->host ? u->host : "",
				       v6 ? "]" : "");
		if (u->port && strcmp(u->port, NBD_DEFAULT_PORT) != 0)
			g_string_append_printf(s, ":%s", u->port);
		g_string_append_printf(s, "/%s", exp);
	}
	return g_string_free(s, FALSE);
}

void nbdc_config_set_uri(struct nbdc_config *cfg, const struct nbdc_uri *u)
{
	cfg->tls = u->tls;
	if (u->unix_socket) {
		cfg->socket_path = u->socket_path;
		cfg->host = NULL;
		cfg->port = NULL;
	} else {
		cfg->host = u->host;
		cfg->port = u->port;
		cfg->socket_path = NULL;
	}
	cfg->export_name = u->export_name;
	if (u->tls_username)
		cfg->tls_username = u->tls_username;
	if (u->tls_psk_file)
		cfg->tls_psk_file = u->tls_psk_file;
	if (u->tls_certificates)
		cfg->tls_certificates = u->tls_certificates;
	if (u->tls_hostname)
		cfg->tls_hostname = u->tls_hostname;
	if (u->tls_verify_peer >= 0)
		cfg->tls_verify_peer = u->tls_verify_peer;
}
