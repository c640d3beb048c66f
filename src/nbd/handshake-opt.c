/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* handshake-opt.c: the option messages of the negotiation: writing an
 * option, what an error reply means, and the replies of GO and INFO
 * (NBD_REP_INFO pieces) that describe an export.  No I/O; every length is
 * checked before it is used.  The state machine that chooses the options is
 * handshake.c.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "handshake-impl.h"
#include "wire.h"

/* ---- errors ---- */

const char *nbdc_hs_opt_name(uint32_t opt)
{
	switch (opt) {
	case NBD_OPT_EXPORT_NAME:
		return "NBD_OPT_EXPORT_NAME";
	case NBD_OPT_ABORT:
		return "NBD_OPT_ABORT";
	case NBD_OPT_LIST:
		return "NBD_OPT_LIST";
	case NBD_OPT_STARTTLS:
		return "NBD_OPT_STARTTLS";
	case NBD_OPT_INFO:
		return "NBD_OPT_INFO";
	case NBD_OPT_GO:
		return "NBD_OPT_GO";
	case NBD_OPT_STRUCTURED_REPLY:
		return "NBD_OPT_STRUCTURED_REPLY";
	case NBD_OPT_SET_META_CONTEXT:
		return "NBD_OPT_SET_META_CONTEXT";
	default:
		return "option";
	}
}

int nbdc_hs_fail(struct nbdc_hs *h, NbdcError code, const char *fmt, ...)
{
	va_list ap;

	if (!h->error) {
		va_start(ap, fmt);
		g_autofree char *m = g_strdup_vprintf(fmt, ap);
		va_end(ap);
		h->error = g_error_new(NBDC_ERROR, code, "%s: %s", h->display, m);
	}
	h->state = ST_FAILED;
	return NBDC_HS_FAILED;
}

/* The GError for an error reply of @type to an option about @what. */
GError *nbdc_hs_reply_error(struct nbdc_hs *h, uint32_t type, const uint8_t *msg, uint32_t len,
			    const char *what)
{
	NbdcError kind = NBDC_ERROR_SERVER;
	const char *why;
	g_autofree char *unknown = NULL;

	switch (type) {
	case NBD_REP_ERR_UNSUP:
		kind = NBDC_ERROR_UNSUPPORTED;
		why = "server does not support this";
		break;
	case NBD_REP_ERR_POLICY:
		kind = NBDC_ERROR_POLICY;
		why = "refused by server policy";
		break;
	case NBD_REP_ERR_INVALID:
		why = "server says the request is invalid";
		break;
	case NBD_REP_ERR_PLATFORM:
		kind = NBDC_ERROR_UNSUPPORTED;
		why = "not supported by the server's platform";
		break;
	case NBD_REP_ERR_TLS_REQD:
		kind = NBDC_ERROR_TLS_REQUIRED;
		why = "server requires TLS";
		break;
	case NBD_REP_ERR_UNKNOWN:
		kind = NBDC_ERROR_NO_EXPORT;
		why = "server does not know this export";
		break;
	case NBD_REP_ERR_SHUTDOWN:
		why = "server is shutting down";
		break;
	case NBD_REP_ERR_BLOCK_SIZE_REQD:
		why = "server requires block size negotiation";
		break;
	case NBD_REP_ERR_TOO_BIG:
		why = "request too big for the server";
		break;
	default:
		why = unknown = g_strdup_printf("server error 0x%x", type);
		break;
	}
	g_autofree char *said = NULL;
	if (len && memchr(msg, 0, len) == NULL && g_utf8_validate((const char *)msg, len, NULL))
		said = g_strdup_printf(" (server says: %.*s)", (int)len, (const char *)msg);
	return g_error_new(NBDC_ERROR, kind, "%s: %s: %s%s", h->display, what, why,
			   said ? said : "");
}

/* ---- output ---- */

void nbdc_hs_put_option(GByteArray *out, uint32_t opt, const void *data, uint32_t len)
{
	struct nbd_option_hdr hdr;

	nbd_encode_option(&hdr, opt, len);
	g_byte_array_append(out, (const guint8 *)&hdr, sizeof(hdr));
	if (len)
		g_byte_array_append(out, data, len);
}

/* Length-prefixed name payload for GO/INFO/SET_META_CONTEXT. */
static void put_name(GByteArray *b, const char *name)
{
	uint8_t l[4];

	put_be32(l, (uint32_t)strlen(name));
	g_byte_array_append(b, l, 4);
	g_byte_array_append(b, (const guint8 *)name, (guint)strlen(name));
}

void nbdc_hs_send_simple(struct nbdc_hs *h, GByteArray *out, uint32_t opt)
{
	nbdc_hs_put_option(out, opt, NULL, 0);
	h->opt = opt;
	h->state = ST_REPLY;
}

/* GO or INFO for @name, asking for block sizes, name and description. */
void nbdc_hs_send_go_info(struct nbdc_hs *h, GByteArray *out, uint32_t opt, const char *name)
{
	g_autoptr(GByteArray) b = g_byte_array_new();
	uint8_t n[8];

	put_name(b, name);
	put_be16(n, 3);
	put_be16(n + 2, NBD_INFO_BLOCK_SIZE);
	put_be16(n + 4, NBD_INFO_NAME);
	put_be16(n + 6, NBD_INFO_DESCRIPTION);
	g_byte_array_append(b, n, 8);
	nbdc_hs_put_option(out, opt, b->data, b->len);
	nbdc_neg_clear(&h->neg);
	memset(&h->neg, 0, sizeof(h->neg));
	h->seen_export = FALSE;
	h->opt = opt;
	h->state = ST_REPLY;
}

void nbdc_hs_send_meta(struct nbdc_hs *h, GByteArray *out)
{
	static const char ctx[] = "base:allocation";
	g_autoptr(GByteArray) b = g_byte_array_new();
	uint8_t n[4];

	put_name(b, h->export_name);
	put_be32(n, 1);
	g_byte_array_append(b, n, 4);
	put_name(b, ctx);
	nbdc_hs_put_option(out, NBD_OPT_SET_META_CONTEXT, b->data, b->len);
	h->opt = NBD_OPT_SET_META_CONTEXT;
	h->state = ST_REPLY;
}

int nbdc_hs_send_abort(struct nbdc_hs *h, GByteArray *out)
{
	nbdc_hs_put_option(out, NBD_OPT_ABORT, NULL, 0);
	h->opt = NBD_OPT_ABORT;
	h->state = ST_ABORT_WAIT;
	return NBDC_HS_WANT;
}

/* ---- GO and INFO ---- */

int nbdc_hs_check_eflags(struct nbdc_hs *h, uint64_t size, uint16_t eflags)
{
	if (!(eflags & NBD_FLAG_HAS_FLAGS))
		return HS_PROTO(h, "transmission flags 0x%x lack HAS_FLAGS", eflags);
	if (size > INT64_MAX)
		return HS_PROTO(h, "export size %" G_GUINT64_FORMAT " is too large", size);
	return NBDC_HS_WANT;
}

static gboolean pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

/* One NBD_REP_INFO into h->neg. */
static int parse_info(struct nbdc_hs *h, const uint8_t *d, uint32_t len)
{
	if (len < 2)
		return HS_PROTO(h, "NBD_REP_INFO of %u bytes", len);
	uint16_t type = get_be16(d);

	switch (type) {
	case NBD_INFO_EXPORT:
		if (len != sizeof(struct nbd_info_export))
			return HS_PROTO(h, "NBD_INFO_EXPORT of %u bytes", len);
		h->neg.size = get_be64(d + 2);
		h->neg.eflags = get_be16(d + 10);
		h->seen_export = TRUE;
		break;
	case NBD_INFO_NAME:
	case NBD_INFO_DESCRIPTION: {
		if (len > 2 + NBD_MAX_STRING)
			return HS_PROTO(h, "NBD_INFO %s of %u bytes",
					type == NBD_INFO_NAME ? "NAME" : "DESCRIPTION", len);
		const char *s = (const char *)d + 2;
		size_t l = len - 2;
		if (memchr(s, 0, l))
			return HS_PROTO(h, "NBD_INFO string contains NUL");
		char **dst = type == NBD_INFO_NAME ? &h->neg.name : &h->neg.description;
		g_free(*dst);
		/* Names stay byte-exact (they are sent back to the server);
		 * descriptions are for display only. */
		*dst = type == NBD_INFO_NAME ? g_strndup(s, l) : g_utf8_make_valid(s, (gssize)l);
		break;
	}
	case NBD_INFO_BLOCK_SIZE: {
		if (len != sizeof(struct nbd_info_block_size))
			return HS_PROTO(h, "NBD_INFO_BLOCK_SIZE of %u bytes", len);
		uint32_t mn = get_be32(d + 2), pr = get_be32(d + 6), mx = get_be32(d + 10);
		if (!pow2(mn) || mn > 65536 || !pow2(pr) || pr < MAX(mn, 512u) || mx < pr ||
		    (mx != UINT32_MAX && mx % mn)) {
			nbdc_log(h->cfg, NBDC_LOG_WARNING,
				 "%s: ignoring invalid block sizes min=%u pref=%u max=%u",
				 h->display, mn, pr, mx);
			h->neg.block_min = h->neg.block_pref = h->neg.block_max = 0;
		} else {
			h->neg.block_min = mn;
			h->neg.block_pref = pr;
			h->neg.block_max = mx;
		}
		break;
	}
	default:
		break; /* unknown info: skipped */
	}
	return NBDC_HS_WANT;
}

/* An INFO reply sequence for h->info_name ended: report it. */
static void info_finished(struct nbdc_hs *h, GError *err)
{
	struct nbdc_export e = { 0 };

	if (!err) {
		e.name = h->info_name;
		e.description = h->neg.description ? h->neg.description : (char *)"";
		e.has_info = TRUE;
		e.size = h->neg.size;
		e.eflags = h->neg.eflags;
		e.read_only = (h->neg.eflags & NBD_FLAG_READ_ONLY) != 0;
		e.block_min = h->neg.block_min;
		e.block_pref = h->neg.block_pref;
		e.block_max = h->neg.block_max;
		e.canonical_name = h->neg.name;
	}
	if (h->goal.list_details) {
		struct nbdc_export *le = h->list->pdata[h->detail_i - 1];

		if (!err) {
			le->has_info = TRUE;
			le->size = e.size;
			le->eflags = e.eflags;
			le->read_only = e.read_only;
			le->block_min = e.block_min;
			le->block_pref = e.block_pref;
			le->block_max = e.block_max;
			if (h->neg.description && h->neg.description[0] && !le->description[0]) {
				g_free(le->description);
				le->description = g_steal_pointer(&h->neg.description);
			}
		}
	} else if (h->goal.probe_result) {
		h->goal.probe_result(h->goal.opaque, h->info_name, err ? NULL : &e, err);
	}
	g_clear_error(&err);
	g_clear_pointer(&h->info_name, g_free);
	nbdc_neg_clear(&h->neg);
}

/* A reply to GO or INFO: NBD_REP_INFO pieces, then ACK or an error. */
int nbdc_hs_go_info_reply(struct nbdc_hs *h, GByteArray *out, uint32_t type, const uint8_t *d,
			  uint32_t len)
{
	gboolean err = (type & NBD_REP_FLAG_ERROR) != 0;
	g_autofree char *what = g_strdup_printf("export '%s'", h->opt == NBD_OPT_GO ? h->export_name
										    : h->info_name);

	if (type == NBD_REP_INFO)
		return parse_info(h, d, len);
	if (type == NBD_REP_ACK) {
		if (!h->seen_export)
			return HS_PROTO(h, "%s: server omitted NBD_INFO_EXPORT", what);
		int r = nbdc_hs_check_eflags(h, h->neg.size, h->neg.eflags);
		if (r == NBDC_HS_FAILED)
			return r;
		if (h->opt == NBD_OPT_GO) {
			h->state = ST_DONE;
			return NBDC_HS_DONE;
		}
		info_finished(h, NULL);
		h->state = ST_NEXT;
		return NBDC_HS_WANT;
	}
	if (!err)
		return HS_PROTO(h, "unexpected reply type %u to %s", type,
				nbdc_hs_opt_name(h->opt));
	if (h->opt == NBD_OPT_GO) {
		if (type == NBD_REP_ERR_UNSUP) {
			/* No GO: the old way, which has no error channel. */
			g_autofree char *name = g_strdup(h->export_name);

			nbdc_hs_put_option(out, NBD_OPT_EXPORT_NAME, name, (uint32_t)strlen(name));
			h->opt = NBD_OPT_EXPORT_NAME;
			h->state = ST_EXPORT_NAME;
			return NBDC_HS_WANT;
		}
		GError *e = nbdc_hs_reply_error(h, type, d, len, what);
		h->error = e;
		nbdc_hs_send_abort(h, out);
		h->state = ST_FAILED;
		return NBDC_HS_FAILED;
	}
	/* INFO: an unknown option ends the details (names only);
	 * another error is this export's alone. */
	if (type == NBD_REP_ERR_UNSUP)
		h->info_unsup = TRUE;
	info_finished(h, nbdc_hs_reply_error(h, type, d, len, what));
	h->state = ST_NEXT;
	return NBDC_HS_WANT;
}
