/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* handshake.c: NBD negotiation as a state machine over byte buffers.
 *
 * No I/O here: the connection (negotiate.c) feeds what arrived into an input
 * buffer, calls nbdc_hs_step(), sends whatever the step appended to the
 * output buffer, and runs the TLS handshake when asked.  One step consumes
 * as many complete messages as the input holds; it stops when it needs more
 * bytes.  So negotiation runs on an event loop with no thread of its own,
 * and the same code is what the fuzzer drives.
 *
 * Sequence: greeting (oldstyle, newstyle, fixed newstyle), [STARTTLS], then
 * for a data connection STRUCTURED_REPLY, SET_META_CONTEXT base:allocation and
 * GO (falling back to EXPORT_NAME); for a control connection LIST and/or one
 * INFO per export name, then ABORT.  Options go strictly one at a time.
 * Every reply length is checked against a small bound before it is used.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "handshake-impl.h"
#include "wire.h"

/* ---- input ---- */

static gboolean have(const struct nbdc_rbuf *in, size_t n)
{
	return in->end - in->pos >= n;
}

static const uint8_t *take(struct nbdc_rbuf *in, size_t n)
{
	const uint8_t *p = in->data + in->pos;

	in->pos += n;
	return p;
}

/* Handles one complete option reply (@type, payload @d of @len bytes). */
static int on_reply(struct nbdc_hs *h, GByteArray *out, uint32_t type, const uint8_t *d,
		    uint32_t len)
{
	gboolean err = (type & NBD_REP_FLAG_ERROR) != 0;

	switch (h->opt) {
	case NBD_OPT_STARTTLS:
		if (type == NBD_REP_ACK) {
			h->state = ST_TLS;
			return NBDC_HS_START_TLS;
		}
		if (err) {
			GError *e = nbdc_hs_reply_error(h, type, d, len, "TLS");

			nbdc_hs_fail(h, NBDC_ERROR_TLS, "%s", e->message + strlen(h->display) + 2);
			g_error_free(e);
			/* Soft end: the server is still negotiating. */
			nbdc_hs_send_abort(h, out);
			h->state = ST_FAILED;
			return NBDC_HS_FAILED;
		}
		return HS_PROTO(h, "unexpected reply type %u to NBD_OPT_STARTTLS", type);

	case NBD_OPT_STRUCTURED_REPLY:
		if (type == NBD_REP_ACK)
			h->neg_sr = TRUE;
		else if (!err)
			return HS_PROTO(h, "unexpected reply type %u to NBD_OPT_STRUCTURED_REPLY",
					type);
		h->sr_done = TRUE;
		h->state = ST_NEXT;
		return NBDC_HS_WANT;

	case NBD_OPT_SET_META_CONTEXT:
		if (type == NBD_REP_ACK || err) {
			/* An error only means no block status; GO reports
			 * anything serious. */
			if (err)
				h->neg_meta = FALSE;
			h->meta_done = TRUE;
			h->state = ST_NEXT;
			return NBDC_HS_WANT;
		}
		if (type != NBD_REP_META_CONTEXT)
			return HS_PROTO(h, "unexpected reply type %u to NBD_OPT_SET_META_CONTEXT",
					type);
		if (len <= 4 || len > 4 + NBD_MAX_STRING)
			return HS_PROTO(h, "meta context reply of bad length %u", len);
		if (len - 4 == strlen("base:allocation") &&
		    memcmp(d + 4, "base:allocation", len - 4) == 0) {
			h->neg_meta = TRUE;
			h->neg_meta_id = get_be32(d);
		}
		return NBDC_HS_WANT;

	case NBD_OPT_GO:
	case NBD_OPT_INFO:
		return nbdc_hs_go_info_reply(h, out, type, d, len);

	case NBD_OPT_LIST: {
		if (type == NBD_REP_ACK) {
			h->list_done = TRUE;
			h->state = ST_NEXT;
			return NBDC_HS_WANT;
		}
		if (err) {
			h->error = nbdc_hs_reply_error(h, type, d, len, "list");
			nbdc_hs_send_abort(h, out);
			h->state = ST_FAILED;
			return NBDC_HS_FAILED;
		}
		if (type != NBD_REP_SERVER)
			return HS_PROTO(h, "unexpected reply type %u to NBD_OPT_LIST", type);
		if (len < 4)
			return HS_PROTO(h, "NBD_REP_SERVER of %u bytes", len);
		uint32_t nl = get_be32(d);
		if (nl > len - 4 || nl > NBD_MAX_STRING || len - 4 - nl > NBD_MAX_STRING)
			return HS_PROTO(h, "NBD_REP_SERVER name length %u in %u bytes", nl, len);
		h->list_bytes += len;
		if (h->list->len >= NBD_MAX_LIST_EXPORTS || h->list_bytes > NBD_MAX_LIST_BYTES)
			return HS_PROTO(h, "export list too long (%u exports)", h->list->len);
		const char *name = (const char *)d + 4;
		if (memchr(name, 0, len - 4))
			return HS_PROTO(h, "export name contains NUL");
		struct nbdc_export *e = g_new0(struct nbdc_export, 1);
		e->name = g_strndup(name, nl); /* byte-exact: used in GO/INFO */
		e->description = g_utf8_make_valid(name + nl, len - 4 - nl);
		g_ptr_array_add(h->list, e);
		return NBDC_HS_WANT;
	}

	case NBD_OPT_ABORT:
		h->state = ST_DONE;
		return NBDC_HS_DONE;
	}
	return HS_PROTO(h, "reply to an option never sent");
}

/* Chooses and sends the next option. */
static int next_option(struct nbdc_hs *h, GByteArray *out)
{
	const struct nbdc_hs_goal *g = &h->goal;

	if (!g->go) {
		if (h->oldstyle || !h->fixed)
			return nbdc_hs_fail(h, NBDC_ERROR_UNSUPPORTED,
					    "%s: server is %s and cannot %s",
					    g->list ? "list" : "info",
					    h->oldstyle ? "oldstyle" : "not fixed-newstyle",
					    g->list ? "list exports" : "describe exports");
		if (g->list && !h->list_done) {
			nbdc_hs_send_simple(h, out, NBD_OPT_LIST);
			return NBDC_HS_WANT;
		}
		if (g->list_details && !h->info_unsup && h->detail_i < h->list->len) {
			struct nbdc_export *le = h->list->pdata[h->detail_i++];

			h->info_name = g_strdup(le->name);
			nbdc_hs_send_go_info(h, out, NBD_OPT_INFO, le->name);
			return NBDC_HS_WANT;
		}
		if (g->probe_next && !h->info_unsup) {
			const char *name = g->probe_next(g->opaque);

			if (name) {
				h->info_name = g_strdup(name);
				nbdc_hs_send_go_info(h, out, NBD_OPT_INFO, name);
				return NBDC_HS_WANT;
			}
		}
		return nbdc_hs_send_abort(h, out);
	}
	if (h->oldstyle) {
		h->state = ST_DONE;
		return nbdc_hs_check_eflags(h, h->neg.size, h->neg.eflags) == NBDC_HS_FAILED
			       ? NBDC_HS_FAILED
			       : NBDC_HS_DONE;
	}
	if (!h->fixed) {
		nbdc_hs_put_option(out, NBD_OPT_EXPORT_NAME, h->export_name,
				   (uint32_t)strlen(h->export_name));
		h->opt = NBD_OPT_EXPORT_NAME;
		h->state = ST_EXPORT_NAME;
		return NBDC_HS_WANT;
	}
	if (h->cfg->structured_replies && !h->sr_done) {
		nbdc_hs_send_simple(h, out, NBD_OPT_STRUCTURED_REPLY);
		return NBDC_HS_WANT;
	}
	if (h->neg_sr && h->cfg->block_status && !h->meta_done) {
		nbdc_hs_send_meta(h, out);
		return NBDC_HS_WANT;
	}
	/* GO (neg is reset: keep what the options above negotiated). */
	gboolean sr = h->neg_sr, meta = h->neg_meta;
	uint32_t meta_id = h->neg_meta_id;
	nbdc_hs_send_go_info(h, out, NBD_OPT_GO, h->export_name);
	h->neg_sr = sr;
	h->neg_meta = meta;
	h->neg_meta_id = meta_id;
	return NBDC_HS_WANT;
}

struct nbdc_hs *nbdc_hs_new(const struct nbdc_config *cfg, const struct nbdc_hs_goal *goal,
			    const char *display)
{
	struct nbdc_hs *h = g_new0(struct nbdc_hs, 1);

	h->cfg = cfg;
	h->goal = *goal;
	h->export_name = goal->go && cfg->export_name ? cfg->export_name : "";
	h->display = g_strdup(display);
	h->state = ST_GREETING;
	if (goal->list)
		h->list = g_ptr_array_new_with_free_func(nbdc_export_free);
	return h;
}

void nbdc_hs_free(struct nbdc_hs *h)
{
	if (!h)
		return;
	g_free(h->display);
	g_free(h->info_name);
	nbdc_neg_clear(&h->neg);
	if (h->list)
		g_ptr_array_unref(h->list);
	g_clear_error(&h->error);
	g_free(h);
}

int nbdc_hs_check(struct nbdc_hs *h)
{
	if (strlen(h->export_name) > NBD_MAX_STRING)
		return nbdc_hs_fail(h, NBDC_ERROR_INVALID, "export name longer than %u bytes",
				    NBD_MAX_STRING);
	return NBDC_HS_WANT;
}

int nbdc_hs_step(struct nbdc_hs *h, struct nbdc_rbuf *in, GByteArray *out)
{
	for (;;) {
		switch (h->state) {
		case ST_GREETING: {
			if (!have(in, 16))
				return NBDC_HS_WANT;
			const uint8_t *p = take(in, 16);
			if (get_be64(p) != NBD_MAGIC)
				return HS_PROTO(h, "not an NBD server (bad greeting magic)");
			uint64_t m2 = get_be64(p + 8);
			if (m2 == NBD_OLDSTYLE_MAGIC) {
				h->state = ST_OLDSTYLE;
				continue;
			}
			if (m2 != NBD_IHAVEOPT)
				return HS_PROTO(
					h,
					"unknown handshake style (magic 0x%" G_GINT64_MODIFIER "x)",
					(guint64)m2);
			h->state = ST_GFLAGS;
			continue;
		}
		case ST_OLDSTYLE: {
			if (!have(in, sizeof(struct nbd_oldstyle_tail)))
				return NBDC_HS_WANT;
			const uint8_t *p = take(in, sizeof(struct nbd_oldstyle_tail));
			uint32_t flags = get_be32(p + 8);
			if (flags >> 16)
				return HS_PROTO(h, "oldstyle global flags 0x%x are not zero",
						flags >> 16);
			h->oldstyle = TRUE;
			h->protocol = "oldstyle";
			h->neg.size = get_be64(p);
			h->neg.eflags = (uint16_t)flags;
			if (h->cfg->tls)
				return nbdc_hs_fail(h, NBDC_ERROR_TLS,
						    "TLS: server is oldstyle and cannot do TLS");
			h->state = ST_NEXT;
			continue;
		}
		case ST_GFLAGS: {
			if (!have(in, 2))
				return NBDC_HS_WANT;
			uint16_t gflags = get_be16(take(in, 2));
			uint8_t cf[4];

			h->fixed = (gflags & NBD_FLAG_FIXED_NEWSTYLE) != 0;
			h->no_zeroes = (gflags & NBD_FLAG_NO_ZEROES) != 0;
			h->protocol = h->fixed ? "newstyle-fixed" : "newstyle";
			put_be32(cf, gflags & (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES));
			g_byte_array_append(out, cf, 4);
			if (h->cfg->tls) {
				if (!h->fixed)
					return nbdc_hs_fail(h, NBDC_ERROR_TLS,
							    "TLS: server is not fixed-newstyle and "
							    "cannot do TLS");
				nbdc_hs_send_simple(h, out, NBD_OPT_STARTTLS);
				continue;
			}
			h->state = ST_NEXT;
			continue;
		}
		case ST_NEXT: {
			int r = next_option(h, out);

			if (r != NBDC_HS_WANT)
				return r;
			continue;
		}
		case ST_REPLY:
		case ST_ABORT_WAIT: {
			if (!have(in, sizeof(struct nbd_option_reply)))
				return NBDC_HS_WANT;
			const uint8_t *p = in->data + in->pos;
			if (get_be64(p) != NBD_REP_MAGIC)
				return HS_PROTO(h,
						"bad option reply magic 0x%" G_GINT64_MODIFIER "x",
						(guint64)get_be64(p));
			if (get_be32(p + 8) != h->opt)
				return HS_PROTO(h, "reply to %s echoes option %u",
						nbdc_hs_opt_name(h->opt), get_be32(p + 8));
			uint32_t type = get_be32(p + 12), len = get_be32(p + 16);
			if (len > NBD_MAX_OPTION_REPLY)
				return HS_PROTO(h, "reply to %s too long (%u bytes)",
						nbdc_hs_opt_name(h->opt), len);
			if (!have(in, sizeof(struct nbd_option_reply) + len))
				return NBDC_HS_WANT;
			take(in, sizeof(struct nbd_option_reply));
			const uint8_t *d = take(in, len);
			if (type == NBD_REP_ACK && len != 0)
				return HS_PROTO(h, "ACK to %s with %u payload bytes",
						nbdc_hs_opt_name(h->opt), len);
			if ((type & NBD_REP_FLAG_ERROR) && len > NBD_MAX_STRING)
				return HS_PROTO(h, "error message to %s too long (%u bytes)",
						nbdc_hs_opt_name(h->opt), len);
			if (h->state == ST_ABORT_WAIT) {
				h->state = ST_DONE;
				return h->error ? NBDC_HS_FAILED : NBDC_HS_DONE;
			}
			int r = on_reply(h, out, type, d, len);
			if (r != NBDC_HS_WANT)
				return r;
			continue;
		}
		case ST_EXPORT_NAME: {
			size_t n = h->no_zeroes ? 10 : sizeof(struct nbd_export_name_reply);

			if (!have(in, n))
				return NBDC_HS_WANT;
			const uint8_t *p = take(in, n);
			h->neg.size = get_be64(p);
			h->neg.eflags = get_be16(p + 8);
			h->state = ST_DONE;
			return nbdc_hs_check_eflags(h, h->neg.size, h->neg.eflags) == NBDC_HS_FAILED
				       ? NBDC_HS_FAILED
				       : NBDC_HS_DONE;
		}
		case ST_TLS:
			return NBDC_HS_START_TLS;
		case ST_DONE:
			return h->error ? NBDC_HS_FAILED : NBDC_HS_DONE;
		case ST_FAILED:
			return NBDC_HS_FAILED;
		}
	}
}

void nbdc_hs_tls_done(struct nbdc_hs *h)
{
	g_assert(h->state == ST_TLS);
	h->tls_on = TRUE;
	h->state = ST_NEXT;
}

int nbdc_hs_eof(struct nbdc_hs *h, gboolean midway)
{
	switch (h->state) {
	case ST_ABORT_WAIT:
		/* The ACK to ABORT is optional: closing is a fine answer. */
		h->state = ST_DONE;
		return h->error ? NBDC_HS_FAILED : NBDC_HS_DONE;
	case ST_DONE:
		return h->error ? NBDC_HS_FAILED : NBDC_HS_DONE;
	case ST_FAILED:
		return NBDC_HS_FAILED;
	case ST_EXPORT_NAME:
		if (!midway)
			return nbdc_hs_fail(
				h, NBDC_ERROR_NO_EXPORT,
				"export '%s': server closed the connection (it does not know "
				"this export)",
				h->export_name);
		break;
	default:
		break;
	}
	const char *what =
		h->state == ST_GREETING || h->state == ST_OLDSTYLE || h->state == ST_GFLAGS
			? "greeting"
			: nbdc_hs_opt_name(h->opt);
	return nbdc_hs_fail(h, NBDC_ERROR_HANDSHAKE, "server closed the connection during %s",
			    what);
}

const char *nbdc_hs_waiting_for(const struct nbdc_hs *h)
{
	switch (h->state) {
	case ST_GREETING:
	case ST_OLDSTYLE:
	case ST_GFLAGS:
		return "greeting";
	case ST_TLS:
		return "TLS handshake";
	default:
		return nbdc_hs_opt_name(h->opt);
	}
}

gboolean nbdc_hs_aborting(const struct nbdc_hs *h)
{
	return h->state == ST_ABORT_WAIT || (h->state == ST_FAILED && h->opt == NBD_OPT_ABORT);
}

GError *nbdc_hs_take_error(struct nbdc_hs *h)
{
	GError *e = h->error;

	h->error = NULL;
	return e;
}

void nbdc_hs_result(struct nbdc_hs *h, struct nbdc_neg *neg)
{
	*neg = h->neg;
	memset(&h->neg, 0, sizeof(h->neg));
	if (!neg->name)
		neg->name = g_strdup(h->export_name);
	if (!neg->description)
		neg->description = g_strdup("");
	neg->structured_replies = h->neg_sr;
	neg->meta = h->neg_sr && h->neg_meta;
	neg->meta_id = h->neg_meta_id;
	if (!neg->structured_replies)
		neg->eflags &= ~NBD_FLAG_SEND_DF;
	neg->protocol = h->protocol;
	neg->tls = h->tls_on;
}

GPtrArray *nbdc_hs_take_list(struct nbdc_hs *h)
{
	GPtrArray *l = h->list;

	h->list = NULL;
	return l;
}
