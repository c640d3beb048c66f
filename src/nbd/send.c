/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* send.c: a connection's send queue, cookie table and request timeout.
 *
 * Requests queued during one loop turn go out together at its end: one
 * writev/sendmsg carries the headers and write payloads of many requests
 * (up to SEND_IOV entries and SEND_BYTES).  A request enters the cookie
 * table only once its last byte is written, so a reply to a request still
 * being sent (a server guessing cookies) is a protocol error and can never
 * complete a write whose payload we are still reading.  At most
 * max_in_flight requests are in flight; the rest wait in the queue.
 * Everything here runs on the connection's loop, called by conn.c, which
 * decides when to write (the end of a turn, EPOLLOUT) and arms the timer.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"
#include "wire.h"

#define SEND_IOV 256
#define SEND_BYTES (8u * 1024 * 1024)
#define TABLE_MIN 128u
#define DEFAULT_MAX_IN_FLIGHT 64u

/* ---- the cookie table ----
 *
 * Open addressing with linear probing and backward-shift deletion (no
 * tombstones, so churn never forces a rehash), at most half full.  Cookie 0
 * marks an empty slot and is never allocated (a server's 0 finds nothing). */

static guint slot_of(const struct nbdc_conn *conn, uint64_t cookie)
{
	return (guint)((cookie * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & conn->table_mask;
}

static void table_put(struct nbdc_conn *conn, uint64_t cookie, struct nbdc_req *req)
{
	guint i = slot_of(conn, cookie);

	while (conn->table[i].cookie)
		i = (i + 1) & conn->table_mask;
	conn->table[i].cookie = cookie;
	conn->table[i].req = req;
}

static void table_init(struct nbdc_conn *conn, guint size)
{
	conn->table = g_new0(struct nbdc_slot, size);
	conn->table_mask = size - 1;
	conn->table_used = 0;
}

static void table_insert(struct nbdc_conn *conn, uint64_t cookie, struct nbdc_req *req)
{
	if ((conn->table_used + 1) * 2 > conn->table_mask + 1) {
		struct nbdc_slot *old = conn->table;
		guint n = conn->table_mask + 1, used = conn->table_used;

		table_init(conn, n * 2);
		for (guint i = 0; i < n; i++)
			if (old[i].cookie)
				table_put(conn, old[i].cookie, old[i].req);
		conn->table_used = used;
		g_free(old);
	}
	table_put(conn, cookie, req);
	conn->table_used++;
}

struct nbdc_req *nbdc_table_lookup(const struct nbdc_conn *conn, uint64_t cookie)
{
	if (cookie == 0 || !conn->table)
		return NULL;
	for (guint i = slot_of(conn, cookie); conn->table[i].cookie; i = (i + 1) & conn->table_mask)
		if (conn->table[i].cookie == cookie)
			return conn->table[i].req;
	return NULL;
}

static void table_remove(struct nbdc_conn *conn, uint64_t cookie)
{
	guint m = conn->table_mask, i = slot_of(conn, cookie);

	if (cookie == 0)
		return;
	while (conn->table[i].cookie != cookie) {
		if (!conn->table[i].cookie)
			return;
		i = (i + 1) & m;
	}
	/* Backward shift: move later entries of the probe run into the hole
	 * when their home slot is not cyclically inside (hole, j]. */
	for (guint j = (i + 1) & m; conn->table[j].cookie; j = (j + 1) & m) {
		guint home = slot_of(conn, conn->table[j].cookie);

		if (((j - home) & m) >= ((j - i) & m)) {
			conn->table[i] = conn->table[j];
			i = j;
		}
	}
	conn->table[i].cookie = 0;
	conn->table[i].req = NULL;
	conn->table_used--;
}

void nbdc_send_init(struct nbdc_conn *conn)
{
	if (!conn->table)
		table_init(conn, TABLE_MIN);
}

void nbdc_send_fini(struct nbdc_conn *conn)
{
	g_clear_pointer(&conn->table, g_free);
}

/* ---- the in-flight list ---- */

static void inf_append(struct nbdc_conn *conn, struct nbdc_req *req)
{
	nbdc_req_append(&conn->inf_head, &conn->inf_tail, req);
	conn->inf_count++;
}

static void inf_remove(struct nbdc_conn *conn, struct nbdc_req *req)
{
	nbdc_req_unlink(&conn->inf_head, &conn->inf_tail, req);
	conn->inf_count--;
}

gboolean nbdc_send_retire(struct nbdc_conn *conn, struct nbdc_req *req)
{
	table_remove(conn, req->cookie);
	inf_remove(conn, req);
	g_atomic_int_add(&conn->load, -1);
	return conn->draining && !conn->txq_head && !conn->inf_head;
}

struct nbdc_req *nbdc_send_take_all(struct nbdc_conn *conn)
{
	struct nbdc_req *head = conn->inf_head, *tail = conn->inf_tail;

	/* In flight first (sent earlier), then the queue. */
	if (tail)
		tail->next = conn->txq_head;
	else
		head = conn->txq_head;
	conn->inf_head = conn->inf_tail = NULL;
	conn->txq_head = conn->txq_tail = NULL;
	conn->inf_count = conn->tx_count = 0;
	conn->tx_off = 0;
	if (conn->table)
		memset(conn->table, 0, sizeof(*conn->table) * (conn->table_mask + 1));
	conn->table_used = 0;
	g_atomic_int_set(&conn->load, 0);
	for (struct nbdc_req *r = head; r; r = r->next)
		r->prev = NULL;
	return head;
}

/* ---- queueing and writing ---- */

void nbdc_send_queue(struct nbdc_conn *conn, struct nbdc_req *req)
{
	struct nbd_request hdr;

	req->cookie = ++conn->next_cookie;
	nbd_encode_request(&hdr, req->flags, req->type, req->cookie, req->offset, req->len);
	memcpy(req->hdr, &hdr, sizeof(hdr));
	req->sent_us = 0;
	nbdc_req_append(&conn->txq_head, &conn->txq_tail, req);
	conn->tx_count++;
	if (conn->cfg->debug)
		nbdc_log(conn->cfg, NBDC_LOG_DEBUG,
			 "%s cookie=%" G_GUINT64_FORMAT " off=%" G_GUINT64_FORMAT
			 " len=%u flags=0x%x conn=%u",
			 nbdc_cmd_name(req->type), req->cookie, req->offset, req->len, req->flags,
			 conn->index);
}

/* Up to @max iovecs for [rel, rel + len) of @req's buffers; returns the
 * count (0 if @req's iov is shorter than the request: a caller bug). */
int nbdc_req_iov(const struct nbdc_req *req, uint64_t rel, uint64_t len, struct iovec *out, int max)
{
	uint64_t skip = req->iov_off + rel;
	int i = 0, k = 0;

	while (i < req->iovcnt && skip >= req->iov[i].iov_len) {
		skip -= req->iov[i].iov_len;
		i++;
	}
	while (k < max && len > 0 && i < req->iovcnt) {
		size_t take = (size_t)MIN((uint64_t)(req->iov[i].iov_len - skip), len);

		if (take) {
			out[k].iov_base = (char *)req->iov[i].iov_base + skip;
			out[k].iov_len = take;
			k++;
		}
		len -= take;
		skip = 0;
		i++;
	}
	return k;
}

static size_t wire_len(const struct nbdc_req *req)
{
	return sizeof(struct nbd_request) + (req->type == NBD_CMD_WRITE ? req->len : 0);
}

/* @req's last byte is written: it is in flight now. */
static void went_out(struct nbdc_conn *conn, struct nbdc_req *req, gint64 now)
{
	conn->txq_head = req->next;
	if (!conn->txq_head)
		conn->txq_tail = NULL;
	conn->tx_count--;
	req->sent_us = now;
	table_insert(conn, req->cookie, req);
	inf_append(conn, req);
	loop_expect(conn->loop); /* a reply, soon from a fast server */
	if (req->type == NBD_CMD_WRITE && conn->owner->sent)
		conn->owner->sent(conn, conn->owner_data, req);
}

/* The socket took less than offered: the request timeout also bounds how
 * long a server may leave our bytes unread. */
static void stalled(struct nbdc_conn *conn, gint64 now)
{
	if (!conn->stall_since)
		conn->stall_since = now;
}

int nbdc_send_flush(struct nbdc_conn *conn, char **msg)
{
	guint max = conn->cfg->max_in_flight ? conn->cfg->max_in_flight : DEFAULT_MAX_IN_FLIGHT;
	struct iovec v[SEND_IOV];

	ssize_t n;

	if (nbdc_tr_want_write(conn->t)) {
		n = nbdc_tr_writev(conn->t, v, 0);
		if (n == -EAGAIN)
			return 0;
		if (n < 0)
			goto failed;
	}
	while (conn->txq_head && conn->inf_count < max) {
		int k = 0;
		size_t bytes = 0, skip = conn->tx_off;
		guint reqs = 0;

		for (struct nbdc_req *r = conn->txq_head;
		     r && k < SEND_IOV - 2 && bytes < SEND_BYTES && conn->inf_count + reqs < max;
		     r = r->next, skip = 0, reqs++) {
			if (skip < sizeof(struct nbd_request)) {
				v[k].iov_base = r->hdr + skip;
				v[k].iov_len = sizeof(struct nbd_request) - skip;
				bytes += v[k].iov_len;
				k++;
			}
			if (r->type == NBD_CMD_WRITE && r->len) {
				size_t pskip = skip > sizeof(struct nbd_request)
						       ? skip - sizeof(struct nbd_request)
						       : 0;
				int got =
					nbdc_req_iov(r, pskip, r->len - pskip, v + k, SEND_IOV - k);

				for (int j = 0; j < got; j++)
					bytes += v[k + j].iov_len;
				k += got;
			}
		}
		n = nbdc_tr_writev(conn->t, v, k);
		if (n == -EAGAIN) {
			stalled(conn, g_get_monotonic_time());
			return 0;
		}
		if (n < 0)
			goto failed;
		conn->stall_since = 0;
		gint64 now = g_get_monotonic_time();
		size_t left = (size_t)n;
		while (left > 0 && conn->txq_head) {
			struct nbdc_req *r = conn->txq_head;
			size_t rest = wire_len(r) - conn->tx_off;

			if (left < rest) {
				conn->tx_off += left;
				left = 0;
				break;
			}
			left -= rest;
			conn->tx_off = 0;
			went_out(conn, r, now);
		}
		if ((size_t)n < bytes && (!conn->t->tls || nbdc_tr_want_write(conn->t))) {
			stalled(conn, now); /* the socket is full: EPOLLOUT continues */
			return 0;
		}
	}
	return 0;
failed:
	*msg = g_strdup_printf("sending requests: %s", n == -EPIPE || n == -ECONNRESET
							       ? "server closed the connection"
							       : g_strerror((int)-n));
	return -ENOTCONN;
}

/* ---- the request timeout ---- */

int nbdc_send_check_timeout(struct nbdc_conn *conn, gint64 *next_due, char **msg)
{
	gint64 tmo = (gint64)conn->cfg->request_timeout_ms * 1000;
	gint64 now = g_get_monotonic_time(), next = 0;

	*next_due = 0;
	if (tmo == 0)
		return 0;
	if (conn->inf_head) {
		gint64 due = conn->inf_head->sent_us + tmo;

		if (due <= now) {
			*msg = g_strdup_printf(
				"request cookie=%" G_GUINT64_FORMAT " timed out after %u ms",
				conn->inf_head->cookie, conn->cfg->request_timeout_ms);
			return -ETIMEDOUT;
		}
		next = due;
	}
	if (conn->stall_since) {
		gint64 due = conn->stall_since + tmo;

		if (due <= now) {
			*msg = g_strdup_printf("server stopped reading (timeout after %u ms)",
					       conn->cfg->request_timeout_ms);
			return -ETIMEDOUT;
		}
		next = next ? MIN(next, due) : due;
	}
	*next_due = next;
	return 0;
}

void nbdc_send_disc(struct nbdc_conn *conn)
{
	struct nbd_request hdr;
	struct iovec v = { &hdr, sizeof(hdr) };

	nbd_encode_request(&hdr, 0, NBD_CMD_DISC, 0, 0, 0);
	if (conn->cfg->debug)
		nbdc_log(conn->cfg, NBDC_LOG_DEBUG, "DISC conn=%u", conn->index);
	conn->disc_sent = TRUE;
	/* Best effort, one attempt: 28 bytes into an idle socket. */
	if (nbdc_tr_writev(conn->t, &v, 1) == (ssize_t)sizeof(hdr))
		nbdc_tr_tls_bye(conn->t);
	nbdc_tr_shutdown(conn->t, SHUT_WR);
}
