/* handshake.c: NBD negotiation: greeting, options (STARTTLS, STRUCTURED_REPLY,
 * SET_META_CONTEXT, GO/INFO, EXPORT_NAME, LIST, ABORT).
 *
 * Negotiation is strictly one option at a time, synchronous, on the caller's
 * thread, bounded by the handshake deadline in the transport.  Every reply
 * length is checked against a small bound before anything is allocated.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

struct hs {
	const struct nbdc_config *cfg;
	struct nbdc_transport *t;
	char *display;
	const char *export_name;
	gboolean oldstyle, fixed, no_zeroes;
	gboolean tls_on;
	const char *protocol;
};

struct reply {
	uint32_t type;
	uint32_t len;
	uint8_t *data; /* len bytes + a NUL; owned */
};

static void reply_clear(struct reply *r)
{
	g_clear_pointer(&r->data, g_free);
	r->len = 0;
}

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

/* Sets @error from a transport failure @r during @what. */
static gboolean io_fail(struct hs *h, int r, const char *what, GError **error)
{
	if (r == -ETIMEDOUT)
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_TIMEOUT,
			    "%s: handshake timed out (%u ms) during %s", h->display,
			    h->cfg->handshake_timeout_ms, what);
	else if (r == -ENODATA || r == -ECONNRESET || r == -EPIPE)
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_HANDSHAKE,
			    "%s: server closed the connection during %s", h->display, what);
	else
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_HANDSHAKE, "%s: %s: %s", h->display, what,
			    g_strerror(-r));
	return FALSE;
}

static gboolean proto_fail(struct hs *h, GError **error, const char *fmt, ...) G_GNUC_PRINTF(3, 4);
static gboolean proto_fail(struct hs *h, GError **error, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	g_autofree char *m = g_strdup_vprintf(fmt, ap);
	va_end(ap);
	g_set_error(error, NBDC_ERROR, NBDC_ERROR_HANDSHAKE, "%s: protocol error: %s", h->display,
		    m);
	return FALSE;
}

static gboolean send_option(struct hs *h, uint32_t opt, const void *data, uint32_t len,
			    GError **error)
{
	struct nbd_option_hdr hdr;
	struct iovec v[2] = {{&hdr, sizeof(hdr)}, {(void *)data, len}};

	nbd_encode_option(&hdr, opt, len);
	int r = nbdc_tr_writev(h->t, v, len ? 2 : 1);
	if (r < 0)
		return io_fail(h, r, opt_name(opt), error);
	return TRUE;
}

static gboolean read_reply_inner(struct hs *h, uint32_t opt, struct reply *rep, GError **error);

/* Reads one option reply to @opt, payload bounded by NBD_MAX_OPTION_REPLY.
 * On failure @rep is left empty. */
static gboolean read_reply(struct hs *h, uint32_t opt, struct reply *rep, GError **error)
{
	if (read_reply_inner(h, opt, rep, error))
		return TRUE;
	reply_clear(rep);
	return FALSE;
}

static gboolean read_reply_inner(struct hs *h, uint32_t opt, struct reply *rep, GError **error)
{
	struct nbd_option_reply hdr;
	int r = nbdc_tr_read(h->t, &hdr, sizeof(hdr));

	reply_clear(rep);
	if (r < 0)
		return io_fail(h, r, opt_name(opt), error);
	if (be64toh(hdr.magic) != NBD_REP_MAGIC)
		return proto_fail(h, error, "bad option reply magic 0x%" G_GINT64_MODIFIER "x",
				  (guint64)be64toh(hdr.magic));
	if (be32toh(hdr.option) != opt)
		return proto_fail(h, error, "reply to %s echoes option %u", opt_name(opt),
				  be32toh(hdr.option));
	rep->type = be32toh(hdr.type);
	rep->len = be32toh(hdr.len);
	if (rep->len > NBD_MAX_OPTION_REPLY) {
		uint32_t l = rep->len;

		rep->len = 0;
		return proto_fail(h, error, "reply to %s too long (%u bytes)", opt_name(opt), l);
	}
	rep->data = g_malloc(rep->len + 1);
	rep->data[rep->len] = 0;
	if (rep->len) {
		r = nbdc_tr_read(h->t, rep->data, rep->len);
		if (r < 0)
			return io_fail(h, r == -ENODATA ? -ECONNRESET : r, opt_name(opt), error);
	}
	if (rep->type == NBD_REP_ACK && rep->len != 0)
		return proto_fail(h, error, "ACK to %s with %u payload bytes", opt_name(opt),
				  rep->len);
	if ((rep->type & NBD_REP_FLAG_ERROR) && rep->len > NBD_MAX_STRING)
		return proto_fail(h, error, "error message to %s too long (%u bytes)",
				  opt_name(opt), rep->len);
	return TRUE;
}

/* Builds the GError for an error reply @rep to @opt; @what is the context
 * ("export 'x'", "list", ...). */
static gboolean reply_error(struct hs *h, const struct reply *rep, const char *what, GError **error)
{
	NbdcError kind = NBDC_ERROR_SERVER;
	const char *why;
	g_autofree char *unknown = NULL;

	switch (rep->type) {
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
		why = unknown = g_strdup_printf("server error 0x%x", rep->type);
		break;
	}
	g_autofree char *msg = NULL;
	if (rep->len && memchr(rep->data, 0, rep->len) == NULL &&
	    g_utf8_validate((char *)rep->data, rep->len, NULL))
		msg = g_strdup_printf(" (server says: %s)", (char *)rep->data);
	g_set_error(error, NBDC_ERROR, kind, "%s: %s: %s%s", h->display, what, why, msg ? msg : "");
	return FALSE;
}

/* Best-effort NBD_OPT_ABORT: the server may ACK or just close. */
static void send_abort(struct hs *h)
{
	struct reply rep = {0};

	if (!h->t || h->oldstyle || !h->fixed)
		return;
	gint64 dl = g_get_monotonic_time() + G_USEC_PER_SEC;
	if (!h->t->deadline_us || h->t->deadline_us > dl)
		h->t->deadline_us = dl;
	if (send_option(h, NBD_OPT_ABORT, NULL, 0, NULL))
		read_reply(h, NBD_OPT_ABORT, &rep, NULL);
	reply_clear(&rep);
	if (h->tls_on)
		nbdc_tls_bye(h->t);
}

static gboolean check_eflags(struct hs *h, uint64_t size, uint16_t eflags, GError **error)
{
	if (!(eflags & NBD_FLAG_HAS_FLAGS))
		return proto_fail(h, error, "transmission flags 0x%x lack HAS_FLAGS", eflags);
	if (size > INT64_MAX)
		return proto_fail(h, error, "export size %" G_GUINT64_FORMAT " is too large", size);
	return TRUE;
}

/* Reads NBDMAGIC and the second magic, then the oldstyle tail or the
 * handshake flags, and answers with the client flags. */
static gboolean greeting(struct hs *h, struct nbdc_neg *neg, GError **error)
{
	uint8_t buf[16];
	int r = nbdc_tr_read(h->t, buf, sizeof(buf));

	if (r < 0)
		return io_fail(h, r, "greeting", error);
	if (get_be64(buf) != NBD_MAGIC)
		return proto_fail(h, error, "not an NBD server (bad greeting magic)");
	uint64_t m2 = get_be64(buf + 8);
	if (m2 == NBD_OLDSTYLE_MAGIC) {
		struct nbd_oldstyle_tail tail;

		r = nbdc_tr_read(h->t, &tail, sizeof(tail));
		if (r < 0)
			return io_fail(h, r == -ENODATA ? -ECONNRESET : r, "oldstyle greeting",
				       error);
		uint32_t flags = be32toh(tail.flags);
		if (flags >> 16)
			return proto_fail(h, error, "oldstyle global flags 0x%x are not zero",
					  flags >> 16);
		h->oldstyle = TRUE;
		h->protocol = "oldstyle";
		if (neg) {
			neg->size = be64toh(tail.size);
			neg->eflags = (uint16_t)flags;
		}
		return TRUE;
	}
	if (m2 != NBD_IHAVEOPT)
		return proto_fail(h, error,
				  "unknown handshake style (magic 0x%" G_GINT64_MODIFIER "x)",
				  (guint64)m2);
	uint16_t gflags;
	r = nbdc_tr_read(h->t, &gflags, sizeof(gflags));
	if (r < 0)
		return io_fail(h, r == -ENODATA ? -ECONNRESET : r, "greeting", error);
	gflags = be16toh(gflags);
	h->fixed = (gflags & NBD_FLAG_FIXED_NEWSTYLE) != 0;
	h->no_zeroes = (gflags & NBD_FLAG_NO_ZEROES) != 0;
	h->protocol = h->fixed ? "newstyle-fixed" : "newstyle";
	uint32_t cflags = htobe32(gflags & (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES));
	r = nbdc_tr_write(h->t, &cflags, sizeof(cflags));
	if (r < 0)
		return io_fail(h, r, "client flags", error);
	return TRUE;
}

static gboolean starttls(struct hs *h, GError **error)
{
	struct reply rep = {0};
	gboolean ok = FALSE;

	if (h->oldstyle || !h->fixed) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_TLS,
			    "%s: TLS: server is %s and cannot do TLS", h->display,
			    h->oldstyle ? "oldstyle" : "not fixed-newstyle");
		return FALSE;
	}
	if (!send_option(h, NBD_OPT_STARTTLS, NULL, 0, error) ||
	    !read_reply(h, NBD_OPT_STARTTLS, &rep, error))
		goto out;
	if (rep.type == NBD_REP_ACK) {
		const char *hn = h->cfg->tls_hostname ? h->cfg->tls_hostname : h->cfg->host;

		ok = nbdc_tls_start(h->t, h->cfg, hn, h->display, error);
		h->tls_on = ok;
	} else if (rep.type & NBD_REP_FLAG_ERROR) {
		g_autoptr(GError) e = NULL;

		reply_error(h, &rep, "TLS", &e);
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_TLS, "%s", e->message);
		send_abort(h);
	} else {
		proto_fail(h, error, "unexpected reply type %u to NBD_OPT_STARTTLS", rep.type);
	}
out:
	reply_clear(&rep);
	return ok;
}

/* Common start of every connection: socket, greeting, STARTTLS. */
static gboolean hs_start(struct hs *h, const struct nbdc_config *cfg, struct nbdc_neg *neg,
			 GError **error)
{
	gint64 dl = cfg->handshake_timeout_ms
			? g_get_monotonic_time() + (gint64)cfg->handshake_timeout_ms * 1000
			: 0;

	h->cfg = cfg;
	h->display = nbdc_cfg_display(cfg);
	h->export_name = cfg->export_name ? cfg->export_name : "";
	h->t = nbdc_tr_open(cfg, h->display, dl, error);
	if (!h->t)
		return FALSE;
	if (strlen(h->export_name) > NBD_MAX_STRING) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_INVALID,
			    "%s: export name longer than %u bytes", h->display, NBD_MAX_STRING);
		return FALSE;
	}
	if (!greeting(h, neg, error))
		return FALSE;
	if (cfg->tls && !starttls(h, error))
		return FALSE;
	return TRUE;
}

static void hs_clear(struct hs *h)
{
	nbdc_tr_close(h->t);
	h->t = NULL;
	g_clear_pointer(&h->display, g_free);
}

/* Length-prefixed name payload for GO/INFO/SET_META_CONTEXT. */
static void put_name(GByteArray *b, const char *name)
{
	uint8_t l[4];

	put_be32(l, (uint32_t)strlen(name));
	g_byte_array_append(b, l, 4);
	g_byte_array_append(b, (const guint8 *)name, (guint)strlen(name));
}

static gboolean structured_reply(struct hs *h, struct nbdc_neg *neg, GError **error)
{
	struct reply rep = {0};

	if (!send_option(h, NBD_OPT_STRUCTURED_REPLY, NULL, 0, error) ||
	    !read_reply(h, NBD_OPT_STRUCTURED_REPLY, &rep, error))
		return FALSE;
	if (rep.type == NBD_REP_ACK)
		neg->structured_replies = TRUE;
	else if (!(rep.type & NBD_REP_FLAG_ERROR)) {
		reply_clear(&rep);
		return proto_fail(h, error, "unexpected reply type %u to NBD_OPT_STRUCTURED_REPLY",
				  rep.type);
	}
	reply_clear(&rep);
	return TRUE;
}

static gboolean set_meta_context(struct hs *h, struct nbdc_neg *neg, GError **error)
{
	static const char ctx[] = "base:allocation";
	g_autoptr(GByteArray) b = g_byte_array_new();
	struct reply rep = {0};
	uint8_t n[4];

	put_name(b, h->export_name);
	put_be32(n, 1);
	g_byte_array_append(b, n, 4);
	put_name(b, ctx);
	if (!send_option(h, NBD_OPT_SET_META_CONTEXT, b->data, b->len, error))
		return FALSE;
	for (;;) {
		if (!read_reply(h, NBD_OPT_SET_META_CONTEXT, &rep, error))
			goto fail;
		if (rep.type == NBD_REP_ACK)
			break;
		if (rep.type & NBD_REP_FLAG_ERROR) {
			/* No block status; GO reports anything serious. */
			neg->meta = FALSE;
			break;
		}
		if (rep.type != NBD_REP_META_CONTEXT) {
			proto_fail(h, error, "unexpected reply type %u to NBD_OPT_SET_META_CONTEXT",
				   rep.type);
			goto fail;
		}
		if (rep.len <= 4 || rep.len > 4 + NBD_MAX_STRING) {
			proto_fail(h, error, "meta context reply of bad length %u", rep.len);
			goto fail;
		}
		if (rep.len - 4 == strlen(ctx) && memcmp(rep.data + 4, ctx, strlen(ctx)) == 0) {
			neg->meta = TRUE;
			neg->meta_id = get_be32(rep.data);
		}
	}
	reply_clear(&rep);
	return TRUE;
fail:
	reply_clear(&rep);
	return FALSE;
}

static gboolean pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

/* Parses one NBD_REP_INFO into @neg; @seen_export set by NBD_INFO_EXPORT. */
static gboolean parse_info(struct hs *h, const struct reply *rep, struct nbdc_neg *neg,
			   gboolean *seen_export, GError **error)
{
	if (rep->len < 2)
		return proto_fail(h, error, "NBD_REP_INFO of %u bytes", rep->len);
	uint16_t type = get_be16(rep->data);

	switch (type) {
	case NBD_INFO_EXPORT:
		if (rep->len != sizeof(struct nbd_info_export))
			return proto_fail(h, error, "NBD_INFO_EXPORT of %u bytes", rep->len);
		neg->size = get_be64(rep->data + 2);
		neg->eflags = get_be16(rep->data + 10);
		*seen_export = TRUE;
		break;
	case NBD_INFO_NAME:
	case NBD_INFO_DESCRIPTION: {
		if (rep->len > 2 + NBD_MAX_STRING)
			return proto_fail(h, error, "NBD_INFO %s of %u bytes",
					  type == NBD_INFO_NAME ? "NAME" : "DESCRIPTION", rep->len);
		const char *s = (const char *)rep->data + 2;
		size_t l = rep->len - 2;
		if (memchr(s, 0, l))
			return proto_fail(h, error, "NBD_INFO string contains NUL");
		char **dst = type == NBD_INFO_NAME ? &neg->name : &neg->description;
		g_free(*dst);
		/* Names stay byte-exact (they are sent back to the server);
		 * descriptions are for display only. */
		*dst = type == NBD_INFO_NAME ? g_strndup(s, l) : g_utf8_make_valid(s, (gssize)l);
		break;
	}
	case NBD_INFO_BLOCK_SIZE: {
		if (rep->len != sizeof(struct nbd_info_block_size))
			return proto_fail(h, error, "NBD_INFO_BLOCK_SIZE of %u bytes", rep->len);
		uint32_t mn = get_be32(rep->data + 2), pr = get_be32(rep->data + 6),
			 mx = get_be32(rep->data + 10);
		if (!pow2(mn) || mn > 65536 || !pow2(pr) || pr < MAX(mn, 512u) || mx < pr ||
		    (mx != UINT32_MAX && mx % mn)) {
			nbdc_log(h->cfg, NBDC_LOG_WARNING,
				 "%s: ignoring invalid block sizes min=%u pref=%u max=%u",
				 h->display, mn, pr, mx);
			neg->block_min = neg->block_pref = neg->block_max = 0;
		} else {
			neg->block_min = mn;
			neg->block_pref = pr;
			neg->block_max = mx;
		}
		break;
	}
	default:
		break; /* unknown info: skipped */
	}
	return TRUE;
}

/* NBD_OPT_GO or NBD_OPT_INFO for @name.  Returns TRUE when the export was
 * described (and, for GO, transmission began); FALSE + error otherwise.
 * *@unsup is set when the server does not know the option at all. */
static gboolean go_or_info(struct hs *h, uint32_t opt, const char *name, struct nbdc_neg *neg,
			   gboolean *unsup, GError **error)
{
	g_autoptr(GByteArray) b = g_byte_array_new();
	struct reply rep = {0};
	gboolean seen_export = FALSE;
	uint8_t n[8];
	g_autofree char *what = g_strdup_printf("export '%s'", name);

	*unsup = FALSE;
	put_name(b, name);
	put_be16(n, 3);
	put_be16(n + 2, NBD_INFO_BLOCK_SIZE);
	put_be16(n + 4, NBD_INFO_NAME);
	put_be16(n + 6, NBD_INFO_DESCRIPTION);
	g_byte_array_append(b, n, 8);
	if (!send_option(h, opt, b->data, b->len, error))
		return FALSE;
	for (;;) {
		if (!read_reply(h, opt, &rep, error))
			goto fail;
		if (rep.type == NBD_REP_ACK) {
			if (!seen_export) {
				proto_fail(h, error, "%s: server omitted NBD_INFO_EXPORT", what);
				goto fail;
			}
			break;
		}
		if (rep.type == NBD_REP_INFO) {
			if (!parse_info(h, &rep, neg, &seen_export, error))
				goto fail;
			continue;
		}
		if (rep.type & NBD_REP_FLAG_ERROR) {
			if (rep.type == NBD_REP_ERR_UNSUP)
				*unsup = TRUE;
			reply_error(h, &rep, what, error);
			goto fail;
		}
		proto_fail(h, error, "unexpected reply type %u to %s", rep.type, opt_name(opt));
		goto fail;
	}
	reply_clear(&rep);
	return check_eflags(h, neg->size, neg->eflags, error);
fail:
	reply_clear(&rep);
	return FALSE;
}

static gboolean export_name(struct hs *h, struct nbdc_neg *neg, GError **error)
{
	struct nbd_export_name_reply rep;
	size_t len = h->no_zeroes ? 10 : sizeof(rep);

	if (!send_option(h, NBD_OPT_EXPORT_NAME, h->export_name, (uint32_t)strlen(h->export_name),
			 error))
		return FALSE;
	int r = nbdc_tr_read(h->t, &rep, len);
	if (r == -ENODATA) {
		g_set_error(
		    error, NBDC_ERROR, NBDC_ERROR_NO_EXPORT,
		    "%s: export '%s': server closed the connection (it does not know this export)",
		    h->display, h->export_name);
		return FALSE;
	}
	if (r < 0)
		return io_fail(h, r, "NBD_OPT_EXPORT_NAME", error);
	neg->size = be64toh(rep.size);
	neg->eflags = be16toh(rep.eflags);
	return check_eflags(h, neg->size, neg->eflags, error);
}

struct nbdc_transport *nbdc_hs_connect(const struct nbdc_config *cfg, struct nbdc_neg *neg,
				       GError **error)
{
	struct hs h = {0};
	struct nbdc_transport *t = NULL;

	memset(neg, 0, sizeof(*neg));
	if (!hs_start(&h, cfg, neg, error))
		goto fail;
	if (h.oldstyle) {
		if (!check_eflags(&h, neg->size, neg->eflags, error))
			goto fail;
	} else if (h.fixed) {
		gboolean unsup = FALSE;

		if (cfg->structured_replies && !structured_reply(&h, neg, error))
			goto fail;
		if (neg->structured_replies && cfg->block_status &&
		    !set_meta_context(&h, neg, error))
			goto fail;
		if (!go_or_info(&h, NBD_OPT_GO, h.export_name, neg, &unsup, error)) {
			if (!unsup) {
				send_abort(&h);
				goto fail;
			}
			g_clear_error(error);
			if (!export_name(&h, neg, error))
				goto fail;
		}
	} else if (!export_name(&h, neg, error)) {
		goto fail;
	}
	if (!neg->name)
		neg->name = g_strdup(h.export_name);
	if (!neg->description)
		neg->description = g_strdup("");
	if (!neg->structured_replies) {
		neg->meta = FALSE;
		neg->eflags &= ~NBD_FLAG_SEND_DF;
	}
	neg->protocol = h.protocol;
	neg->tls = h.tls_on;
	t = h.t;
	h.t = NULL;
	t->deadline_us = 0;
	goto out;
fail:
	nbdc_neg_clear(neg);
out:
	hs_clear(&h);
	return t;
}

static void export_free(gpointer p)
{
	struct nbdc_export *e = p;

	g_free(e->name);
	g_free(e->description);
	g_free(e);
}

GPtrArray *nbdc_hs_list(const struct nbdc_config *cfg, gboolean details, GError **error)
{
	struct hs h = {0};
	struct reply rep = {0};
	g_autoptr(GPtrArray) list = g_ptr_array_new_with_free_func(export_free);
	GPtrArray *ret = NULL;
	uint64_t bytes = 0;
	struct nbdc_config lcfg = *cfg;

	lcfg.export_name = NULL; /* ignored: keep it out of messages too */
	if (!hs_start(&h, &lcfg, NULL, error))
		goto out;
	if (h.oldstyle || !h.fixed) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED,
			    "%s: list: server is %s and cannot list exports", h.display,
			    h.oldstyle ? "oldstyle" : "not fixed-newstyle");
		goto out;
	}
	if (!send_option(&h, NBD_OPT_LIST, NULL, 0, error))
		goto out;
	for (;;) {
		if (!read_reply(&h, NBD_OPT_LIST, &rep, error))
			goto out;
		if (rep.type == NBD_REP_ACK)
			break;
		if (rep.type & NBD_REP_FLAG_ERROR) {
			reply_error(&h, &rep, "list", error);
			send_abort(&h);
			goto out;
		}
		if (rep.type != NBD_REP_SERVER) {
			proto_fail(&h, error, "unexpected reply type %u to NBD_OPT_LIST", rep.type);
			goto out;
		}
		if (rep.len < 4) {
			proto_fail(&h, error, "NBD_REP_SERVER of %u bytes", rep.len);
			goto out;
		}
		uint32_t nl = get_be32(rep.data);
		if (nl > rep.len - 4 || nl > NBD_MAX_STRING || rep.len - 4 - nl > NBD_MAX_STRING) {
			proto_fail(&h, error, "NBD_REP_SERVER name length %u in %u bytes", nl,
				   rep.len);
			goto out;
		}
		bytes += rep.len;
		if (list->len >= NBD_MAX_LIST_EXPORTS || bytes > NBD_MAX_LIST_BYTES) {
			proto_fail(&h, error, "export list too long (%u exports)", list->len);
			goto out;
		}
		const char *name = (const char *)rep.data + 4;
		if (memchr(name, 0, rep.len - 4)) {
			proto_fail(&h, error, "export name contains NUL");
			goto out;
		}
		struct nbdc_export *e = g_new0(struct nbdc_export, 1);
		e->name = g_strndup(name, nl); /* byte-exact: used in GO/INFO */
		e->description = g_utf8_make_valid(name + nl, rep.len - 4 - nl);
		g_ptr_array_add(list, e);
	}
	if (details) {
		for (guint i = 0; i < list->len; i++) {
			struct nbdc_export *e = list->pdata[i];
			struct nbdc_neg neg = {0};
			gboolean unsup = FALSE;
			g_autoptr(GError) e2 = NULL;

			if (!go_or_info(&h, NBD_OPT_INFO, e->name, &neg, &unsup, &e2)) {
				nbdc_neg_clear(&neg);
				if (e2->code == NBDC_ERROR_HANDSHAKE ||
				    e2->code == NBDC_ERROR_TIMEOUT) {
					g_propagate_error(error, g_steal_pointer(&e2));
					goto out;
				}
				if (unsup)
					break; /* no NBD_OPT_INFO: names only */
				continue;
			}
			e->has_info = TRUE;
			e->size = neg.size;
			e->eflags = neg.eflags;
			e->read_only = (neg.eflags & NBD_FLAG_READ_ONLY) != 0;
			e->block_min = neg.block_min;
			e->block_pref = neg.block_pref;
			e->block_max = neg.block_max;
			if (neg.description && neg.description[0] && !e->description[0]) {
				g_free(e->description);
				e->description = g_steal_pointer(&neg.description);
			}
			nbdc_neg_clear(&neg);
		}
	}
	send_abort(&h);
	ret = g_steal_pointer(&list);
out:
	reply_clear(&rep);
	hs_clear(&h);
	return ret;
}
