/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* list.c: nbdfs --list: the server's exports as names, lines or JSON (see list.h).
 *
 * The JSON document follows `nbdinfo --list --json` in its key names, so
 * scripts written for one read the other:
 *
 *   {"uri": "nbd://host/", "TLS": false, "exports": [
 *     {"export-name": "disk", "description": "", "uri": "nbd://host/disk",
 *      "export-size": 1048576, "is_read_only": false, "is_rotational": false,
 *      "can_flush": true, ..., "block_size_minimum": 512, ...}]}
 *
 * Export names and descriptions are any bytes: valid UTF-8 is kept, every
 * other byte becomes U+FFFD, so the document is always valid JSON; "uri"
 * (percent-encoded) names the export exactly.  Values the server did not
 * give (no NBD_OPT_INFO answer, no block size) are null.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "list.h"
#include "nbdfs/nbd.h"
#include "sources.h"

/* Transmission flags (NBD protocol "Transmission flags", the core's
 * NBD_FLAG_*), under the keys nbdinfo gives them. */
/* clang-format off */
static const struct {
	guint16 bit;
	const char *key;
} json_flags[] = {
	{1u << 4,  "is_rotational"},  /* NBD_FLAG_ROTATIONAL */
	{1u << 10, "can_cache"},      /* NBD_FLAG_SEND_CACHE */
	{1u << 7,  "can_df"},         /* NBD_FLAG_SEND_DF */
	{1u << 11, "can_fast_zero"},  /* NBD_FLAG_SEND_FAST_ZERO */
	{1u << 2,  "can_flush"},      /* NBD_FLAG_SEND_FLUSH */
	{1u << 3,  "can_fua"},        /* NBD_FLAG_SEND_FUA */
	{1u << 8,  "can_multi_conn"}, /* NBD_FLAG_CAN_MULTI_CONN */
	{1u << 5,  "can_trim"},       /* NBD_FLAG_SEND_TRIM */
	{1u << 6,  "can_zero"},       /* NBD_FLAG_SEND_WRITE_ZEROES */
};
/* clang-format on */

/* ---- JSON ---------------------------------------------------------------- */

/* Appends @s as a JSON string: '"', '\' and control characters escaped,
 * valid UTF-8 kept, each byte of an invalid sequence as U+FFFD. */
static void json_string(GString *out, const char *s)
{
	const char *end = s + strlen(s);

	g_string_append_c(out, '"');
	while (s < end) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			g_string_append_c(out, '\\');
			g_string_append_c(out, (char)c);
			s++;
		} else if (c < 0x20 || c == 0x7f) {
			g_string_append_printf(out, "\\u%04x", c);
			s++;
		} else if (c < 0x80) {
			g_string_append_c(out, (char)c);
			s++;
		} else {
			gunichar u = g_utf8_get_char_validated(s, end - s);

			if (u == (gunichar)-1 || u == (gunichar)-2) {
				g_string_append(out, "\\ufffd");
				s++;
			} else {
				const char *next = g_utf8_next_char(s);

				g_string_append_len(out, s, next - s);
				s = next;
			}
		}
	}
	g_string_append_c(out, '"');
}

static void json_key(GString *out, const char *indent, const char *key)
{
	g_string_append(out, indent);
	json_string(out, key);
	g_string_append(out, ": ");
}

/* A block size: null when the server advertised none (0). */
static void json_block_size(GString *out, const char *key, guint32 v, gboolean has_info)
{
	json_key(out, ",\n\t\t", key);
	if (has_info && v)
		g_string_append_printf(out, "%u", v);
	else
		g_string_append(out, "null");
}

static void json_export(GString *out, const struct nbdc_uri *server, const struct nbdc_export *e)
{
	struct nbdc_uri copy = *server;

	copy.export_name = e->name;
	g_autofree char *uri = nbdc_uri_to_display(&copy);

	g_string_append(out, "\t{\n");
	json_key(out, "\t\t", "export-name");
	json_string(out, e->name);
	json_key(out, ",\n\t\t", "description");
	json_string(out, e->description);
	json_key(out, ",\n\t\t", "uri");
	json_string(out, uri);
	json_key(out, ",\n\t\t", "export-size");
	if (e->has_info)
		g_string_append_printf(out, "%" G_GUINT64_FORMAT, e->size);
	else
		g_string_append(out, "null");
	json_key(out, ",\n\t\t", "is_read_only");
	g_string_append(out, !e->has_info ? "null" : e->read_only ? "true" : "false");
	for (gsize i = 0; i < G_N_ELEMENTS(json_flags); i++) {
		json_key(out, ",\n\t\t", json_flags[i].key);
		if (!e->has_info)
			g_string_append(out, "null");
		else
			g_string_append(out, (e->eflags & json_flags[i].bit) ? "true" : "false");
	}
	json_block_size(out, "block_size_minimum", e->block_min, e->has_info);
	json_block_size(out, "block_size_preferred", e->block_pref, e->has_info);
	json_block_size(out, "block_size_maximum", e->block_max, e->has_info);
	g_string_append(out, "\n\t}");
}

static void print_json(const struct nbdc_uri *uri, GPtrArray *list)
{
	g_autofree char *display = nbdc_uri_to_display(uri);
	g_autoptr(GString) out = g_string_new("{\n");

	json_key(out, "", "uri");
	json_string(out, display);
	json_key(out, ",\n", "TLS");
	g_string_append(out, uri->tls ? "true" : "false");
	json_key(out, ",\n", "exports");
	g_string_append(out, "[");
	for (guint i = 0; i < list->len; i++) {
		g_string_append(out, i ? ",\n" : "\n");
		json_export(out, uri, list->pdata[i]);
	}
	g_string_append(out, list->len ? "\n]\n}\n" : "]\n}\n");
	fwrite(out->str, 1, out->len, stdout);
}

/* ---- Text ---------------------------------------------------------------- */

static void print_text(const struct options *o, GPtrArray *list)
{
	for (guint i = 0; i < list->len; i++) {
		struct nbdc_export *e = list->pdata[i];

		if (!o->list_long)
			printf("%s\n", e->name);
		else if (e->has_info)
			printf("%s\tsize=%" G_GUINT64_FORMAT "\t%s\tblock=%u/%u/%u\t%s\n", e->name,
			       e->size, e->read_only ? "ro" : "rw", e->block_min, e->block_pref,
			       e->block_max, e->description);
		else
			printf("%s\tsize=?\t?\tblock=?\t%s\n", e->name, e->description);
	}
}

/* ---- --list -------------------------------------------------------------- */

/* Whatever fuse_opt_parse left over (mount options such as -o allow_other
 * or a misspelt one) has no meaning for --list: one line naming it. */
static gboolean check_no_mount_options(const struct fuse_args *args)
{
	if (args->argc <= 1)
		return TRUE;
	g_autofree char *rest = g_strjoinv(" ", args->argv + 1);
	fprintf(stderr, "nbdfs: --list: unknown option %s (see nbdfs --help)\n", rest);
	return FALSE;
}

int list_exports(const struct options *o, const struct fuse_args *args)
{
	if (!check_no_mount_options(args))
		return 1;
	if (o->args->len != 1) {
		fprintf(stderr, "nbdfs: --list takes exactly one URI%s\n",
			o->args->len ? ", not several" : "");
		return 1;
	}
	const char *arg = o->args->pdata[0];
	g_autoptr(GError) err = NULL;
	g_autoptr(NbdcUri) uri = sources_parse_uri(arg, &err);
	if (uri == NULL) {
		sources_fail_line(arg, NULL, err->message);
		return 1;
	}
	if (!sources_check_tls_options(o, arg, uri))
		return 1;
	struct nbdc_config cfg;
	sources_config_for(&cfg, o, uri);
	g_autoptr(GPtrArray) list = nbdc_list_exports(&cfg, o->list_long || o->list_json, &err);
	if (list == NULL) {
		g_autofree char *display = nbdc_uri_to_display(uri);
		const char *why =
			sources_strip_prefix(sources_strip_prefix(err->message, arg), display);

		if (g_error_matches(err, NBDC_ERROR, NBDC_ERROR_POLICY)) {
			fprintf(stderr, "nbdfs: %s: listing exports refused by policy: %s\n", arg,
				why);
			return 2;
		}
		if (g_error_matches(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED)) {
			fprintf(stderr, "nbdfs: %s: server too old to list exports: %s\n", arg,
				why);
			return 2;
		}
		sources_fail_line(arg, NULL, why);
		return 1;
	}
	if (o->list_json)
		print_json(uri, list);
	else
		print_text(o, list);
	if (fflush(stdout) != 0) {
		fprintf(stderr, "nbdfs: --list: stdout: %s\n", g_strerror(errno));
		return 1;
	}
	return 0;
}
