/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* handshake-impl.h: the negotiation's state, shared by handshake.c (the
 * state machine) and handshake-opt.c (option messages and the GO/INFO
 * replies) (private to those two). */
#pragma once

#include "internal.h"

enum hs_state {
	ST_GREETING,	/* 16 bytes: NBDMAGIC + oldstyle magic or IHAVEOPT */
	ST_OLDSTYLE,	/* the 136-byte oldstyle tail */
	ST_GFLAGS,	/* 2 bytes of handshake flags */
	ST_NEXT,	/* choose the next option */
	ST_REPLY,	/* an option reply (header + payload) to h->opt */
	ST_EXPORT_NAME, /* the EXPORT_NAME reply */
	ST_TLS,		/* the connection runs the TLS handshake */
	ST_ABORT_WAIT,	/* ABORT sent: its reply or EOF ends it */
	ST_DONE,
	ST_FAILED,
};

struct nbdc_hs {
	const struct nbdc_config *cfg; /* borrowed */
	char *display;
	const char *export_name; /* borrowed from cfg ("" = default) */
	struct nbdc_hs_goal goal;
	enum hs_state state;
	gboolean oldstyle, fixed, no_zeroes, tls_on;
	const char *protocol;
	/* progress through the options */
	gboolean sr_done, meta_done, list_done, go_sent;
	uint32_t opt;		   /* option whose replies we read */
	gboolean neg_sr, neg_meta; /* STRUCTURED_REPLY, base:allocation agreed */
	uint32_t neg_meta_id;
	/* GO / INFO in progress */
	struct nbdc_neg neg;
	gboolean seen_export;
	char *info_name;     /* INFO: the export asked about */
	gboolean info_unsup; /* the server has no NBD_OPT_INFO */
	/* LIST */
	GPtrArray *list; /* struct nbdc_export * */
	uint64_t list_bytes;
	guint detail_i; /* list_details: next entry to ask INFO about */
	GError *error;
};

/* ---- handshake-opt.c ---- */

/* Fails the negotiation with "display: fmt..." in NBDC_ERROR @code (the
 * first error wins); returns NBDC_HS_FAILED. */
int nbdc_hs_fail(struct nbdc_hs *h, NbdcError code, const char *fmt, ...) G_GNUC_PRINTF(3, 4);
#define HS_PROTO(h, ...) nbdc_hs_fail(h, NBDC_ERROR_HANDSHAKE, "protocol error: " __VA_ARGS__)
const char *nbdc_hs_opt_name(uint32_t opt);
/* The GError for an error reply of @type to an option about @what. */
GError *nbdc_hs_reply_error(struct nbdc_hs *h, uint32_t type, const uint8_t *msg, uint32_t len,
			    const char *what);
/* NBDC_HS_FAILED when @eflags or @size cannot be an export's, else WANT. */
int nbdc_hs_check_eflags(struct nbdc_hs *h, uint64_t size, uint16_t eflags);

/* Appending an option to @out; the send_ forms also wait for its reply. */
void nbdc_hs_put_option(GByteArray *out, uint32_t opt, const void *data, uint32_t len);
void nbdc_hs_send_simple(struct nbdc_hs *h, GByteArray *out, uint32_t opt);
/* GO or INFO for @name, asking for block sizes, name and description. */
void nbdc_hs_send_go_info(struct nbdc_hs *h, GByteArray *out, uint32_t opt, const char *name);
void nbdc_hs_send_meta(struct nbdc_hs *h, GByteArray *out);
/* ABORT: its reply (or EOF) ends the negotiation.  Returns NBDC_HS_WANT. */
int nbdc_hs_send_abort(struct nbdc_hs *h, GByteArray *out);

/* A reply to GO or INFO (@type, payload @d of @len bytes). */
int nbdc_hs_go_info_reply(struct nbdc_hs *h, GByteArray *out, uint32_t type, const uint8_t *d,
			  uint32_t len);
