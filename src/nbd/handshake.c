/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* handshake.c: NBD negotiation as a state machine over byte buffers.
 *
 * No I/O here: the connection (conn.c) feeds what arrived into an input
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

#include "internal.h"
#include "wire.h"

enum hs_state {
	ST_GREETING,      /* 16 bytes: NBDMAGIC + oldstyle magic or IHAVEOPT */
	ST_OLDSTYLE,      /* the 136-byte oldstyle tail */
	ST_GFLAGS,        /* 2 bytes of handshake flags */
	ST_NEXT,          /* choose the next option */
	ST_REPLY,         /* an option reply (header + payload) to h->opt */
	ST_EXPORT_NAME,   /* the EXPORT_NAME reply */
	ST_TLS,           /* the connection runs the TLS handshake */
	ST_ABORT_WAIT,    /* ABORT sent: its reply or EOF ends it */
	ST_DONE,
	ST_FAILED,
};

struct nbdc_hs {
	const struct nbdc_config *cfg; /* borrowed */
	char *display;
	const char *export_name;       /* borrowed from cfg ("" = default) */
	struct nbdc_hs_goal goal;
	enum hs_state state;
	gboolean oldstyle, fixed, no_zeroes, tls_on;
	const char *protocol;
	/* progress through the options */
	gboolean sr_done, meta_done, list_done, go_sent;
	uint32_t opt;                  /* option whose replies we read */
	gboolean neg_sr, neg_meta;     /* STRUCTURED_REPLY, base:allocation agreed */
	uint32_t neg_meta_id;
	/* GO / INFO in progress */
	struct nbdc_neg neg;
	gboolean seen_export;
	char *info_name;               /* INFO: the export asked about */
	gboolean info_unsup;           /* the server has no NBD_OPT_INFO */
	/* LIST */
	GPtrArray *list;               /* struct nbdc_export * */
	uint64_t list_bytes;
	guint detail_i;                /* list_details: next entry to ask INFO about */
	GError *error;
};

/* ---- errors ---- */

static const char *opt_name(uint32_t opt)
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

static int fail(struct nbdc_hs *h, NbdcError code, const char *fmt, ...) G_GNUC_PRINTF(3, 4);
static int fail(struct nbdc_hs *h, NbdcError code, const char *fmt, ...)
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

#define PROTO(h, ...) fail(h, NBDC_ERROR_HANDSHAKE, "protocol error: " __VA_ARGS__)

/* The GError for an error reply of @type to an option about @what. */
static GError *reply_error(struct nbdc_hs *h, uint32_t type, const uint8_t *msg, uint32_t len,
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

static void put_option(GByteArray *out, uint32_t opt, const void *data, uint32_t len)
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

static void send_simple(struct nbdc_hs *h, GByteArray *out, uint32_t opt)
{
	put_option(out, opt, NULL, 0);
	h->opt = opt;
	h->state = ST_REPLY;
}

/* GO or INFO for @name, asking for block sizes, name and description. */
static void send_go_info(struct nbdc_hs *h, GByteArray *out, uint32_t opt, const char *name)
{
	g_autoptr(GByteArray) b = g_byte_array_new();
	uint8_t n[8];

	put_name(b, name);
	put_be16(n, 3);
	put_be16(n + 2, NBD_INFO_BLOCK_SIZE);
	put_be16(n + 4, NBD_INFO_NAME);
	put_be16(n + 6, NBD_INFO_DESCRIPTION);
	g_byte_array_append(b, n, 8);
	put_option(out, opt, b->data, b->len);
	nbdc_neg_clear(&h->neg);
	memset(&h->neg, 0, sizeof(h->neg));
	h->seen_export = FALSE;
	h->opt = opt;
	h->state = ST_REPLY;
}

static void send_meta(struct nbdc_hs *h, GByteArray *out)
{
	static const char ctx[] = "base:allocation";
	g_autoptr(GByteArray) b = g_byte_array_new();
	uint8_t n[4];

	put_name(b, h->export_name);
	put_be32(n, 1);
	g_byte_array_append(b, n, 4);
	put_name(b, ctx);
	put_option(out, NBD_OPT_SET_META_CONTEXT, b->data, b->len);
	h->opt = NBD_OPT_SET_META_CONTEXT;
	h->state = ST_REPLY;
}

static int send_abort(struct nbdc_hs *h, GByteArray *out)
{
	put_option(out, NBD_OPT_ABORT, NULL, 0);
	h->opt = NBD_OPT_ABORT;
	h->state = ST_ABORT_WAIT;
	return NBDC_HS_WANT;
}

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

static int check_eflags(struct nbdc_hs *h, uint64_t size, uint16_t eflags)
{
	if (!(eflags & NBD_FLAG_HAS_FLAGS))
		return PROTO(h, "transmission flags 0x%x lack HAS_FLAGS", eflags);
	if (size > INT64_MAX)
		return PROTO(h, "export size %" G_GUINT64_FORMAT " is too large", size);
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
		return PROTO(h, "NBD_REP_INFO of %u bytes", len);
	uint16_t type = get_be16(d);

	switch (type) {
	case NBD_INFO_EXPORT:
		if (len != sizeof(struct nbd_info_export))
			return PROTO(h, "NBD_INFO_EXPORT of %u bytes", len);
		h->neg.size = get_be64(d + 2);
		h->neg.eflags = get_be16(d + 10);
		h->seen_export = TRUE;
		break;
	case NBD_INFO_NAME:
	case NBD_INFO_DESCRIPTION: {
		if (len > 2 + NBD_MAX_STRING)
			return PROTO(h, "NBD_INFO %s of %u bytes",
				     type == NBD_INFO_NAME ? "NAME" : "DESCRIPTION", len);
		const char *s = (const char *)d + 2;
		size_t l = len - 2;
		if (memchr(s, 0, l))
			return PROTO(h, "NBD_INFO string contains NUL");
		char **dst = type == NBD_INFO_NAME ? &h->neg.name : &h->neg.description;
		g_free(*dst);
		/* Names stay byte-exact (they are sent back to the server);
		 * descriptions are for display only. */
		*dst = type == NBD_INFO_NAME ? g_strndup(s, l) : g_utf8_make_valid(s, (gssize)l);
		break;
	}
	case NBD_INFO_BLOCK_SIZE: {
		if (len != sizeof(struct nbd_info_block_size))
			return PROTO(h, "NBD_INFO_BLOCK_SIZE of %u bytes", len);
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
	struct nbdc_export e = {0};

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
			GError *e = reply_error(h, type, d, len, "TLS");

			fail(h, NBDC_ERROR_TLS, "%s", e->message + strlen(h->display) + 2);
			g_error_free(e);
			/* Soft end: the server is still negotiating. */
			send_abort(h, out);
			h->state = ST_FAILED;
			return NBDC_HS_FAILED;
		}
		return PROTO(h, "unexpected reply type %u to NBD_OPT_STARTTLS", type);

	case NBD_OPT_STRUCTURED_REPLY:
		if (type == NBD_REP_ACK)
			h->neg_sr = TRUE;
		else if (!err)
			return PROTO(h, "unexpected reply type %u to NBD_OPT_STRUCTURED_REPLY",
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
			return PROTO(h, "unexpected reply type %u to NBD_OPT_SET_META_CONTEXT", type);
		if (len <= 4 || len > 4 + NBD_MAX_STRING)
			return PROTO(h, "meta context reply of bad length %u", len);
		if (len - 4 == strlen("base:allocation") &&
		    memcmp(d + 4, "base:allocation", len - 4) == 0) {
			h->neg_meta = TRUE;
			h->neg_meta_id = get_be32(d);
		}
		return NBDC_HS_WANT;

	case NBD_OPT_GO:
	case NBD_OPT_INFO: {
		g_autofree char *what = g_strdup_printf(
		    "export '%s'", h->opt == NBD_OPT_GO ? h->export_name : h->info_name);

		if (type == NBD_REP_INFO)
			return parse_info(h, d, len);
		if (type == NBD_REP_ACK) {
			if (!h->seen_export)
				return PROTO(h, "%s: server omitted NBD_INFO_EXPORT", what);
			int r = check_eflags(h, h->neg.size, h->neg.eflags);
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
			return PROTO(h, "unexpected reply type %u to %s", type, opt_name(h->opt));
		if (h->opt == NBD_OPT_GO) {
			if (type == NBD_REP_ERR_UNSUP) {
				/* No GO: the old way, which has no error channel. */
				g_autofree char *name = g_strdup(h->export_name);

				put_option(out, NBD_OPT_EXPORT_NAME, name, (uint32_t)strlen(name));
				h->opt = NBD_OPT_EXPORT_NAME;
				h->state = ST_EXPORT_NAME;
				return NBDC_HS_WANT;
			}
			GError *e = reply_error(h, type, d, len, what);
			h->error = e;
			send_abort(h, out);
			h->state = ST_FAILED;
			return NBDC_HS_FAILED;
		}
		/* INFO: an unknown option ends the details (names only);
		 * another error is this export's alone. */
		if (type == NBD_REP_ERR_UNSUP)
			h->info_unsup = TRUE;
		info_finished(h, reply_error(h, type, d, len, what));
		h->state = ST_NEXT;
		return NBDC_HS_WANT;
	}

	case NBD_OPT_LIST: {
		if (type == NBD_REP_ACK) {
			h->list_done = TRUE;
			h->state = ST_NEXT;
			return NBDC_HS_WANT;
		}
		if (err) {
			h->error = reply_error(h, type, d, len, "list");
			send_abort(h, out);
			h->state = ST_FAILED;
			return NBDC_HS_FAILED;
		}
		if (type != NBD_REP_SERVER)
			return PROTO(h, "unexpected reply type %u to NBD_OPT_LIST", type);
		if (len < 4)
			return PROTO(h, "NBD_REP_SERVER of %u bytes", len);
		uint32_t nl = get_be32(d);
		if (nl > len - 4 || nl > NBD_MAX_STRING || len - 4 - nl > NBD_MAX_STRING)
			return PROTO(h, "NBD_REP_SERVER name length %u in %u bytes", nl, len);
		h->list_bytes += len;
		if (h->list->len >= NBD_MAX_LIST_EXPORTS || h->list_bytes > NBD_MAX_LIST_BYTES)
			return PROTO(h, "export list too long (%u exports)", h->list->len);
		const char *name = (const char *)d + 4;
		if (memchr(name, 0, len - 4))
			return PROTO(h, "export name contains NUL");
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
	return PROTO(h, "reply to an option never sent");
}

/* Chooses and sends the next option. */
static int next_option(struct nbdc_hs *h, GByteArray *out)
{
	const struct nbdc_hs_goal *g = &h->goal;

	if (!g->go) {
		if (h->oldstyle || !h->fixed)
			return fail(h, NBDC_ERROR_UNSUPPORTED, "%s: server is %s and cannot %s",
				    g->list ? "list" : "info",
				    h->oldstyle ? "oldstyle" : "not fixed-newstyle",
				    g->list ? "list exports" : "describe exports");
		if (g->list && !h->list_done) {
			send_simple(h, out, NBD_OPT_LIST);
			return NBDC_HS_WANT;
		}
		if (g->list_details && !h->info_unsup && h->detail_i < h->list->len) {
			struct nbdc_export *le = h->list->pdata[h->detail_i++];

			h->info_name = g_strdup(le->name);
			send_go_info(h, out, NBD_OPT_INFO, le->name);
			return NBDC_HS_WANT;
		}
		if (g->probe_next && !h->info_unsup) {
			const char *name = g->probe_next(g->opaque);

			if (name) {
				h->info_name = g_strdup(name);
				send_go_info(h, out, NBD_OPT_INFO, name);
				return NBDC_HS_WANT;
			}
		}
		return send_abort(h, out);
	}
	if (h->oldstyle) {
		h->state = ST_DONE;
		return check_eflags(h, h->neg.size, h->neg.eflags) == NBDC_HS_FAILED
			       ? NBDC_HS_FAILED
			       : NBDC_HS_DONE;
	}
	if (!h->fixed) {
		put_option(out, NBD_OPT_EXPORT_NAME, h->export_name,
			   (uint32_t)strlen(h->export_name));
		h->opt = NBD_OPT_EXPORT_NAME;
		h->state = ST_EXPORT_NAME;
		return NBDC_HS_WANT;
	}
	if (h->cfg->structured_replies && !h->sr_done) {
		send_simple(h, out, NBD_OPT_STRUCTURED_REPLY);
		return NBDC_HS_WANT;
	}
	if (h->neg_sr && h->cfg->block_status && !h->meta_done) {
		send_meta(h, out);
		return NBDC_HS_WANT;
	}
	/* GO (neg is reset: keep what the options above negotiated). */
	gboolean sr = h->neg_sr, meta = h->neg_meta;
	uint32_t meta_id = h->neg_meta_id;
	send_go_info(h, out, NBD_OPT_GO, h->export_name);
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
		return fail(h, NBDC_ERROR_INVALID, "export name longer than %u bytes",
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
				return PROTO(h, "not an NBD server (bad greeting magic)");
			uint64_t m2 = get_be64(p + 8);
			if (m2 == NBD_OLDSTYLE_MAGIC) {
				h->state = ST_OLDSTYLE;
				continue;
			}
			if (m2 != NBD_IHAVEOPT)
				return PROTO(h, "unknown handshake style (magic 0x%" G_GINT64_MODIFIER
						"x)", (guint64)m2);
			h->state = ST_GFLAGS;
			continue;
		}
		case ST_OLDSTYLE: {
			if (!have(in, sizeof(struct nbd_oldstyle_tail)))
				return NBDC_HS_WANT;
			const uint8_t *p = take(in, sizeof(struct nbd_oldstyle_tail));
			uint32_t flags = get_be32(p + 8);
			if (flags >> 16)
				return PROTO(h, "oldstyle global flags 0x%x are not zero",
					     flags >> 16);
			h->oldstyle = TRUE;
			h->protocol = "oldstyle";
			h->neg.size = get_be64(p);
			h->neg.eflags = (uint16_t)flags;
			if (h->cfg->tls)
				return fail(h, NBDC_ERROR_TLS,
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
					return fail(h, NBDC_ERROR_TLS,
						    "TLS: server is not fixed-newstyle and "
						    "cannot do TLS");
				send_simple(h, out, NBD_OPT_STARTTLS);
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
				return PROTO(h, "bad option reply magic 0x%" G_GINT64_MODIFIER "x",
					     (guint64)get_be64(p));
			if (get_be32(p + 8) != h->opt)
				return PROTO(h, "reply to %s echoes option %u", opt_name(h->opt),
					     get_be32(p + 8));
			uint32_t type = get_be32(p + 12), len = get_be32(p + 16);
			if (len > NBD_MAX_OPTION_REPLY)
				return PROTO(h, "reply to %s too long (%u bytes)", opt_name(h->opt),
					     len);
			if (!have(in, sizeof(struct nbd_option_reply) + len))
				return NBDC_HS_WANT;
			take(in, sizeof(struct nbd_option_reply));
			const uint8_t *d = take(in, len);
			if (type == NBD_REP_ACK && len != 0)
				return PROTO(h, "ACK to %s with %u payload bytes", opt_name(h->opt),
					     len);
			if ((type & NBD_REP_FLAG_ERROR) && len > NBD_MAX_STRING)
				return PROTO(h, "error message to %s too long (%u bytes)",
					     opt_name(h->opt), len);
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
			return check_eflags(h, h->neg.size, h->neg.eflags) == NBDC_HS_FAILED
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
			return fail(h, NBDC_ERROR_NO_EXPORT,
				    "export '%s': server closed the connection (it does not know "
				    "this export)", h->export_name);
		break;
	default:
		break;
	}
	const char *what = h->state == ST_GREETING || h->state == ST_OLDSTYLE ||
				   h->state == ST_GFLAGS
			       ? "greeting"
			       : opt_name(h->opt);
	return fail(h, NBDC_ERROR_HANDSHAKE, "server closed the connection during %s", what);
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
		return opt_name(h->opt);
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
