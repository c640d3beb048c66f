/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* replay.c: writing an export's replay log again after a loss, batch by
 * batch, before the parked requests go (see the design comment in
 * export.c); the log itself is log.c. */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

struct replay_req {
	struct nbdc_req req;
	Nbdc *c;
};

static void replay_done(struct nbdc_req *req, int err)
{
	struct replay_req *rr = (struct replay_req *)req;
	Nbdc *c = rr->c;

	g_mutex_lock(&c->lock);
	if (err && err != -ENOTCONN && err != -ETIMEDOUT && err != -EPROTO)
		c->replay_failed = TRUE; /* the server refused the data itself */
	c->replay_pending--;
	g_mutex_unlock(&c->lock);
	g_free(rr);
	nbdc_export_kick(c);
	nbdc_export_unref(c);
}

static gboolean overlaps(const struct nbdc_log_entry *a, const struct nbdc_log_entry *b)
{
	return a->offset < b->offset + b->len && b->offset < a->offset + a->len;
}

/* Under c->lock: the next batch of the log to write again on @conn: entries
 * in order, stopping before one that overlaps an earlier entry of the batch
 * (the server may run a batch's writes in any order). */
static GPtrArray *replay_batch_locked(Nbdc *c, struct nbdc_log_entry **cursor)
{
	GPtrArray *batch = g_ptr_array_new();
	struct nbdc_log_entry *e = *cursor;

	for (; e && batch->len < 64; e = e->next) {
		gboolean clash = FALSE;

		for (guint i = 0; i < batch->len && !clash; i++)
			clash = overlaps(batch->pdata[i], e);
		if (clash)
			break;
		g_ptr_array_add(batch, e);
	}
	*cursor = e;
	return batch;
}

/* Home loop: writes the log again, batch by batch, on the first ready
 * connection.  TRUE while it is not finished. */
gboolean nbdc_replay_step(Nbdc *c)
{
	struct nbdc_conn *conn = NULL;
	GPtrArray *batch = NULL;

	g_mutex_lock(&c->lock);
	if (c->replay_pending > 0) {
		g_mutex_unlock(&c->lock);
		return TRUE;
	}
	if (c->replay_failed) {
		nbdc_log_lose(c, "the server refused them on the new connection");
		c->replay_failed = FALSE;
		c->replaying = FALSE;
		c->replay_owed = FALSE;
		g_mutex_unlock(&c->lock);
		return FALSE;
	}
	if (!c->replaying) {
		c->replaying = TRUE;
		c->replay_cursor = c->log_head;
		if (c->log_head)
			nbdc_log(&c->cfg, NBDC_LOG_INFO,
				 "%s: replaying %" G_GUINT64_FORMAT " bytes of unflushed writes",
				 c->display, c->log_bytes);
	}
	if (!c->replay_cursor) {
		c->replaying = FALSE;
		c->replay_owed = FALSE; /* written again: a flush will cover them */
		g_mutex_unlock(&c->lock);
		return FALSE;
	}
	for (guint i = 0; i < c->conns->len && !conn; i++)
		if (nbdc_conn_usable(c->conns->pdata[i]))
			conn = nbdc_conn_ref(c->conns->pdata[i]);
	if (!conn) {
		c->replaying = FALSE;
		g_mutex_unlock(&c->lock);
		return TRUE;
	}
	batch = replay_batch_locked(c, &c->replay_cursor);
	c->replay_pending = batch->len;
	GPtrArray *reqs = g_ptr_array_new();
	for (guint i = 0; i < batch->len; i++) {
		struct nbdc_log_entry *e = batch->pdata[i];
		struct replay_req *rr = g_new0(struct replay_req, 1);

		rr->c = c;
		nbdc_export_ref(c);
		rr->req.internal = TRUE;
		rr->req.complete = replay_done;
		rr->req.type = e->type;
		rr->req.flags = e->flags;
		rr->req.offset = e->offset;
		rr->req.len = e->len;
		if (e->type == NBD_CMD_WRITE) {
			rr->req.one.iov_base = e->data;
			rr->req.one.iov_len = e->len;
			rr->req.iov = &rr->req.one;
			rr->req.iovcnt = 1;
		}
		g_ptr_array_add(reqs, rr);
	}
	g_mutex_unlock(&c->lock);
	g_ptr_array_free(batch, TRUE);
	for (guint i = 0; i < reqs->len; i++) {
		struct replay_req *rr = reqs->pdata[i];

		if (!nbdc_conn_submit(conn, &rr->req))
			replay_done(&rr->req, -ENOTCONN);
	}
	g_ptr_array_free(reqs, TRUE);
	nbdc_conn_unref(conn);
	return TRUE;
}
