/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* reply.c: a connection's receive side: replies parsed from its buffer.
 *
 * One read takes up to NBDC_RBUF_SIZE bytes, often several replies at once;
 * headers, offsets and small chunk payloads are parsed from the buffer, and
 * a READ payload is copied from it or, when the buffer is empty and at least
 * RB_DIRECT_MIN bytes are due, read straight into the caller's buffers (no
 * copy).  The parser is a state machine, so a reply may arrive in any number
 * of pieces.  Every length from the server is checked before it is used:
 * a violation kills the connection with -EPROTO.  Loop only.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define RB_DIRECT_MIN (16u * 1024)
#define IOV_BATCH 64
#define MAX_RANGES 4096 /* disjoint pieces of one READ before we call it abuse */
/* Fairness: at most this many bytes per readiness event. */
#define READ_BUDGET (4u * 1024 * 1024)

enum { RX_HDR, RX_DATA, RX_CHUNK_OFF, RX_COLLECT };

/* parse() and read_payload() results besides 0 (done) and -errno */
#define NEED_BYTES 1 /* refill the buffer */
#define DRAINED 2    /* the socket is empty: wait for the next event */
#define GOODBYE 3    /* a draining connection's last reply: return for DISC */

#define VIOLATION(...) (g_strdup_printf("protocol error: " __VA_ARGS__))

/* ---- the buffer ---- */

static size_t avail(const struct nbdc_conn *conn)
{
	return conn->rb.end - conn->rb.pos;
}

ssize_t nbdc_rb_fill(struct nbdc_conn *conn)
{
	struct nbdc_rbuf *rb = &conn->rb;

	if (rb->pos == rb->end) {
		rb->pos = rb->end = 0;
	} else if (rb->pos > 0 && (rb->end == rb->cap || rb->cap - rb->end < 64)) {
		memmove(rb->data, rb->data + rb->pos, rb->end - rb->pos);
		rb->end -= rb->pos;
		rb->pos = 0;
	}
	if (rb->end == rb->cap)
		return -ENOBUFS; /* a message larger than the buffer: never from us */
	ssize_t n = nbdc_tr_recv(conn->t, rb->data + rb->end, rb->cap - rb->end);
	if (n > 0)
		rb->end += (size_t)n;
	return n;
}

void nbdc_reply_fini(struct nbdc_conn *conn)
{
	g_clear_pointer(&conn->buf, g_free);
}

/* ---- the caller's buffers ---- */

/* Fills @n bytes of @req's buffers from @rel on: from @src, or zeroes when
 * @src is NULL. */
static void fill_into(struct nbdc_req *req, uint64_t rel, const uint8_t *src, uint64_t n)
{
	struct iovec v[IOV_BATCH];

	while (n > 0) {
		int k = nbdc_req_iov(req, rel, n, v, IOV_BATCH);

		if (k == 0)
			return;
		for (int i = 0; i < k; i++) {
			if (src) {
				memcpy(v[i].iov_base, src, v[i].iov_len);
				src += v[i].iov_len;
			} else {
				memset(v[i].iov_base, 0, v[i].iov_len);
			}
			rel += v[i].iov_len;
			n -= v[i].iov_len;
		}
	}
}

/* ---- request state ---- */

static void set_err(struct nbdc_req *req, int err)
{
	if (!req->err)
		req->err = err;
}

/* Marks [rel, rel+n) of a structured READ as received; FALSE on overlap (or
 * a pathological number of disjoint pieces).  In-order chunks (the usual
 * case) need no range list; ranges are kept sorted and coalesced. */
static gboolean cover(struct nbdc_req *req, uint64_t rel, uint64_t n)
{
	if (!req->ranges && rel == req->covered) {
		req->covered += n;
		return TRUE;
	}
	if (!req->ranges) {
		req->ranges = g_array_new(FALSE, FALSE, sizeof(uint64_t) * 2);
		if (req->covered) {
			uint64_t r0[2] = { 0, req->covered };

			g_array_append_vals(req->ranges, r0, 1);
		}
	}
	GArray *a = req->ranges;
	guint lo = 0, hi = a->len;
	while (lo < hi) {
		guint mid = (lo + hi) / 2;

		if (g_array_index(a, uint64_t, mid * 2) < rel)
			lo = mid + 1;
		else
			hi = mid;
	}
	uint64_t *prev = lo > 0 ? &g_array_index(a, uint64_t, (lo - 1) * 2) : NULL;
	uint64_t *next = lo < a->len ? &g_array_index(a, uint64_t, lo * 2) : NULL;
	if ((prev && prev[1] > rel) || (next && next[0] < rel + n))
		return FALSE;
	req->covered += n;
	if (prev && prev[1] == rel) {
		prev[1] = rel + n;
		if (next && next[0] == prev[1]) {
			prev[1] = next[1];
			g_array_remove_index(a, lo);
		}
	} else if (next && next[0] == rel + n) {
		next[0] = rel;
	} else {
		if (a->len >= MAX_RANGES)
			return FALSE;
		uint64_t nr[2] = { rel, rel + n };

		g_array_insert_vals(a, lo, nr, 1);
	}
	return TRUE;
}

void nbdc_req_reset(struct nbdc_req *req)
{
	req->err = 0;
	req->bs_seen = FALSE;
	req->content_chunks = 0;
	req->covered = 0;
	if (req->ranges) {
		g_array_unref(req->ranges);
		req->ranges = NULL;
	}
	req->sent_us = 0;
}

/* The reply for @req is complete. */
static void complete(struct nbdc_conn *conn, struct nbdc_req *req)
{
	int err = req->err;

	if (nbdc_send_retire(conn, req))
		conn->rx_drained = TRUE; /* parse() stops: DISC goes out first */
	if (conn->cfg->debug)
		nbdc_log(conn->cfg, NBDC_LOG_DEBUG, "reply cookie=%" G_GUINT64_FORMAT " err=%d",
			 req->cookie, err);
	conn->owner->done(conn, conn->owner_data, req, err);
}

/* The server answered NBD_ESHUTDOWN: this connection takes no new requests
 * and says goodbye (DISC) once idle. */
static void server_shutdown(struct nbdc_conn *conn, uint32_t nbd_err)
{
	if (nbd_err != NBD_ESHUTDOWN || conn->shutdown_pending)
		return;
	conn->shutdown_pending = TRUE;
	conn->draining = TRUE;
	if (conn->owner->shutting_down)
		conn->owner->shutting_down(conn, conn->owner_data);
}

/* ---- replies ---- */

static char *handle_simple(struct nbdc_conn *conn, const uint8_t *h)
{
	uint32_t error = get_be32(h + 4);
	uint64_t cookie = get_be64(h + 8);
	struct nbdc_req *req = nbdc_table_lookup(conn, cookie);

	if (!req)
		return VIOLATION("simple reply for unknown cookie %" G_GUINT64_FORMAT, cookie);
	if (req->type == NBD_CMD_READ && conn->neg.structured_replies)
		return VIOLATION("simple reply to READ cookie=%" G_GUINT64_FORMAT
				 " after structured replies were negotiated",
				 cookie);
	if (error) {
		server_shutdown(conn, error);
		set_err(req, -nbdc_errno_from_nbd(error));
	} else if (req->type == NBD_CMD_READ && req->len > 0) {
		conn->rx_req = req;
		conn->rx_rel = 0;
		conn->rx_left = req->len;
		conn->rx_flags = NBD_REPLY_FLAG_DONE;
		conn->rx_type = 0; /* a simple reply's payload */
		conn->rx_state = RX_DATA;
		return NULL;
	}
	complete(conn, req);
	return NULL;
}

/* A chunk's reply has ended (DONE flag) or a non-final chunk is through. */
static void chunk_end(struct nbdc_conn *conn, struct nbdc_req *req)
{
	conn->rx_state = RX_HDR;
	conn->rx_req = NULL;
	if (!(conn->rx_flags & NBD_REPLY_FLAG_DONE))
		return;
	if (req->type == NBD_CMD_READ && !req->err && req->covered != req->len)
		set_err(req, -EPROTO); /* gaps: never hand back stale bytes */
	if (req->type == NBD_CMD_BLOCK_STATUS && !req->err && !req->bs_seen)
		set_err(req, -EPROTO); /* success without any extent */
	complete(conn, req);
}

static void deliver_extents(struct nbdc_conn *conn, struct nbdc_req *req, uint32_t len)
{
	uint64_t pos = req->offset;
	uint64_t end = req->offset + req->len; /* validated at submit: <= size */
	uint32_t n = (len - 4) / 8;
	const uint8_t *p = conn->buf + 4;

	if (req->bs_seen)
		return; /* one chunk per context */
	req->bs_seen = TRUE;
	for (uint32_t i = 0; i < n && pos < end; i++, p += 8) {
		uint32_t elen = get_be32(p), flags = get_be32(p + 4);

		if (elen == 0) {
			if (i == 0)
				set_err(req, -EPROTO);
			break;
		}
		uint64_t l = MIN((uint64_t)elen, end - pos);
		if (!req->err && req->extent)
			req->extent(req->extent_opaque, pos, l, flags);
		pos += l;
		if (req->flags & NBD_CMD_FLAG_REQ_ONE)
			break;
	}
	req->bs_reached = pos;
}

/* A small chunk payload (hole, block status, error) is in conn->buf. */
static char *chunk_payload(struct nbdc_conn *conn)
{
	struct nbdc_req *req = conn->rx_req;
	uint32_t len = conn->rx_len;
	const uint8_t *b = conn->buf;

	switch (conn->rx_type) {
	case NBD_REPLY_TYPE_OFFSET_HOLE: {
		uint64_t off = get_be64(b);
		uint32_t hl = get_be32(b + 8);

		if (hl == 0 || !nbd_range_inside(off, hl, req->offset, req->len))
			return VIOLATION("OFFSET_HOLE [%" G_GUINT64_FORMAT
					 "+%u) outside the request",
					 off, hl);
		fill_into(req, off - req->offset, NULL, hl);
		if (!cover(req, off - req->offset, hl) ||
		    (++req->content_chunks > 1 && (req->flags & NBD_CMD_FLAG_DF)))
			set_err(req, -EPROTO);
		break;
	}
	case NBD_REPLY_TYPE_BLOCK_STATUS:
		if (get_be32(b) == conn->neg.meta_id)
			deliver_extents(conn, req, len);
		break;
	default: { /* an error chunk */
		uint32_t e = get_be32(b);
		uint16_t ml = get_be16(b + 4);

		if (ml > len - 6 || (conn->rx_type == NBD_REPLY_TYPE_ERROR && ml != len - 6) ||
		    (conn->rx_type == NBD_REPLY_TYPE_ERROR_OFFSET && ml + 14u != len))
			return VIOLATION("error chunk message length %u in %u bytes", ml, len);
		server_shutdown(conn, e);
		set_err(req, e ? -nbdc_errno_from_nbd(e) : -EPROTO);
		if (conn->cfg->debug && ml)
			nbdc_log(conn->cfg, NBDC_LOG_DEBUG,
				 "cookie=%" G_GUINT64_FORMAT " server error %u: %.*s", req->cookie,
				 e, (int)ml, b + 6);
		break;
	}
	}
	chunk_end(conn, req);
	return NULL;
}

static void collect(struct nbdc_conn *conn, uint32_t len)
{
	if (len > conn->buf_size) {
		conn->buf = g_realloc(conn->buf, len);
		conn->buf_size = len;
	}
	conn->buf_have = 0;
	conn->rx_state = RX_COLLECT;
}

static char *handle_chunk(struct nbdc_conn *conn, const uint8_t *h)
{
	uint16_t flags = get_be16(h + 4);
	uint16_t type = get_be16(h + 6);
	uint64_t cookie = get_be64(h + 8);
	uint32_t len = get_be32(h + 16);
	struct nbdc_req *req;

	if (!conn->neg.structured_replies)
		return VIOLATION("structured reply without negotiation");
	req = nbdc_table_lookup(conn, cookie);
	if (!req)
		return VIOLATION("chunk for unknown cookie %" G_GUINT64_FORMAT, cookie);
	conn->rx_req = req;
	conn->rx_flags = flags;
	conn->rx_type = type;
	conn->rx_len = len;
	switch (type) {
	case NBD_REPLY_TYPE_NONE:
		if (len != 0 || !(flags & NBD_REPLY_FLAG_DONE))
			return VIOLATION("NONE chunk with length %u, flags 0x%x", len, flags);
		chunk_end(conn, req);
		return NULL;
	case NBD_REPLY_TYPE_OFFSET_DATA:
		if (req->type != NBD_CMD_READ)
			return VIOLATION("OFFSET_DATA chunk for %s", nbdc_cmd_name(req->type));
		if (len < 9 || len - 8 > req->len)
			return VIOLATION("OFFSET_DATA chunk of %u bytes for a %u byte read", len,
					 req->len);
		conn->rx_state = RX_CHUNK_OFF;
		return NULL;
	case NBD_REPLY_TYPE_OFFSET_HOLE:
		if (req->type != NBD_CMD_READ)
			return VIOLATION("OFFSET_HOLE chunk for %s", nbdc_cmd_name(req->type));
		if (len != sizeof(struct nbd_chunk_offset_hole))
			return VIOLATION("OFFSET_HOLE chunk of %u bytes", len);
		collect(conn, len);
		return NULL;
	case NBD_REPLY_TYPE_BLOCK_STATUS:
		if (req->type != NBD_CMD_BLOCK_STATUS)
			return VIOLATION("BLOCK_STATUS chunk for %s", nbdc_cmd_name(req->type));
		if (len < 12 || (len - 4) % 8 || len > NBD_MAX_BS_CHUNK)
			return VIOLATION("BLOCK_STATUS chunk of %u bytes", len);
		collect(conn, len);
		return NULL;
	default:
		if (!(type & NBD_REPLY_TYPE_ERROR_BIT))
			return VIOLATION("unknown chunk type %u", type);
		if (len < 6 || len > 6 + NBD_MAX_STRING + 8)
			return VIOLATION("error chunk of %u bytes", len);
		collect(conn, len);
		return NULL;
	}
}

/* The payload of the READ in conn->rx_req: from the buffer, or straight
 * from the socket.  0 when done, NEED_BYTES/DRAINED, <0 on a dead socket. */
static int read_payload(struct nbdc_conn *conn, char **msg)
{
	struct nbdc_req *req = conn->rx_req;

	while (conn->rx_left > 0) {
		size_t a = avail(conn);

		if (a > 0) {
			size_t n = (size_t)MIN((uint64_t)a, conn->rx_left);

			fill_into(req, conn->rx_rel, conn->rb.data + conn->rb.pos, n);
			conn->rb.pos += n;
			conn->rx_rel += n;
			conn->rx_left -= n;
			continue;
		}
		if (conn->rx_left < RB_DIRECT_MIN)
			return NEED_BYTES;
		struct iovec v[IOV_BATCH];
		int k = nbdc_req_iov(req, conn->rx_rel, conn->rx_left, v, IOV_BATCH);
		if (k == 0) {
			*msg = g_strdup("internal error: read buffer too short");
			return -EPROTO;
		}
		size_t want = 0;
		for (int i = 0; i < k; i++)
			want += v[i].iov_len;
		ssize_t n = nbdc_tr_readv(conn->t, v, k);
		if (n == -EAGAIN)
			return DRAINED;
		if (n <= 0) {
			*msg = n == 0 || n == -ECONNRESET
				       ? g_strdup("server closed the connection (reading READ "
						  "payload)")
				       : g_strdup_printf("reading READ payload: %s",
							 g_strerror((int)-n));
			return -ENOTCONN;
		}
		conn->rx_rel += (uint64_t)n;
		conn->rx_left -= (uint64_t)n;
		if ((size_t)n < want && conn->rx_left > 0 && !conn->t->tls)
			return DRAINED; /* the socket is empty: no read to see EAGAIN */
	}
	return 0;
}

/* Parses what the buffer holds. */
static int parse(struct nbdc_conn *conn, char **msg)
{
	for (;;) {
		if (conn->phase != NBDC_CP_READY && conn->phase != NBDC_CP_CLOSING)
			return DRAINED;
		if (conn->rx_drained)
			return GOODBYE;
		switch (conn->rx_state) {
		case RX_HDR: {
			if (avail(conn) < 4)
				return NEED_BYTES;
			const uint8_t *h = conn->rb.data + conn->rb.pos;
			uint32_t magic = get_be32(h);

			if (magic == NBD_SIMPLE_REPLY_MAGIC) {
				if (avail(conn) < sizeof(struct nbd_simple_reply))
					return NEED_BYTES;
				conn->rb.pos += sizeof(struct nbd_simple_reply);
				*msg = handle_simple(conn, h);
			} else if (magic == NBD_STRUCTURED_REPLY_MAGIC) {
				if (avail(conn) < sizeof(struct nbd_structured_reply))
					return NEED_BYTES;
				conn->rb.pos += sizeof(struct nbd_structured_reply);
				*msg = handle_chunk(conn, h);
			} else {
				*msg = VIOLATION("bad reply magic 0x%08x", magic);
			}
			if (*msg)
				return -EPROTO;
			break;
		}
		case RX_CHUNK_OFF: {
			struct nbdc_req *req = conn->rx_req;

			if (avail(conn) < 8)
				return NEED_BYTES;
			uint64_t off = get_be64(conn->rb.data + conn->rb.pos);
			uint64_t dlen = conn->rx_len - 8;
			conn->rb.pos += 8;
			if (!nbd_range_inside(off, dlen, req->offset, req->len)) {
				*msg = VIOLATION("OFFSET_DATA [%" G_GUINT64_FORMAT
						 "+%" G_GUINT64_FORMAT
						 ") outside the request [%" G_GUINT64_FORMAT "+%u)",
						 off, dlen, req->offset, req->len);
				return -EPROTO;
			}
			if (!cover(req, off - req->offset, dlen) ||
			    (++req->content_chunks > 1 && (req->flags & NBD_CMD_FLAG_DF)))
				set_err(req, -EPROTO);
			conn->rx_rel = off - req->offset;
			conn->rx_left = dlen;
			conn->rx_state = RX_DATA;
			break;
		}
		case RX_DATA: {
			int r = read_payload(conn, msg);

			if (r != 0)
				return r;
			if (conn->rx_type == 0) { /* simple reply */
				struct nbdc_req *req = conn->rx_req;

				conn->rx_state = RX_HDR;
				conn->rx_req = NULL;
				complete(conn, req);
			} else {
				chunk_end(conn, conn->rx_req);
			}
			break;
		}
		case RX_COLLECT: {
			size_t want = conn->rx_len - conn->buf_have, n = MIN(avail(conn), want);

			memcpy(conn->buf + conn->buf_have, conn->rb.data + conn->rb.pos, n);
			conn->rb.pos += n;
			conn->buf_have += n;
			if (conn->buf_have < conn->rx_len)
				return NEED_BYTES;
			*msg = chunk_payload(conn);
			if (*msg)
				return -EPROTO;
			break;
		}
		}
	}
}

static gboolean mid_message(const struct nbdc_conn *conn)
{
	return conn->rx_state != RX_HDR || avail(conn) > 0;
}

int nbdc_reply_read(struct nbdc_conn *conn, char **msg)
{
	size_t budget = READ_BUDGET;
	/* A plaintext read that took less than it was offered emptied the
	 * socket: the next would only see EAGAIN (one wasted recvmsg per
	 * reply at queue depth 1).  Level-triggered: the loop calls again
	 * when more arrives. */
	gboolean emptied = FALSE;

	for (;;) {
		int r = parse(conn, msg);

		if (r < 0)
			return r;
		if (r == GOODBYE) {
			conn->rx_drained = FALSE;
			return NBDC_REPLY_DRAINED;
		}
		if (conn->phase != NBDC_CP_READY && conn->phase != NBDC_CP_CLOSING)
			return 0;
		/* TLS may hold decrypted bytes no poll announces: read on. */
		if (r == DRAINED && !nbdc_tr_read_pending(conn->t))
			return 0;
		if (budget == 0 || emptied)
			return 0; /* level-triggered: the loop calls again */
		ssize_t n = nbdc_rb_fill(conn);
		if (n == -EAGAIN)
			return 0;
		if (n == 0) {
			if (!mid_message(conn) && conn->disc_sent && !conn->inf_head) {
				*msg = NULL; /* the clean end after our DISC */
				return -ENOTCONN;
			}
			*msg = g_strdup(mid_message(conn) ? "server closed the connection "
							    "(in the middle of a reply)"
							  : "server closed the connection");
			return -ENOTCONN;
		}
		if (n < 0) {
			if (conn->disc_sent && n != -EPROTO) {
				*msg = NULL;
				return -ENOTCONN;
			}
			*msg = n == -ECONNRESET ? g_strdup("server closed the connection")
			       : n == -EPROTO	? g_strdup("TLS: receiving: protocol error")
						: g_strdup_printf("reading replies: %s",
								  g_strerror((int)-n));
			return n == -EPROTO ? -EPROTO : -ENOTCONN;
		}
		budget = (size_t)n >= budget ? 0 : budget - (size_t)n;
		emptied = conn->rb.end < conn->rb.cap && !conn->t->tls;
	}
}
