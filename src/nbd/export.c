/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* export.c: one export's connections: choosing, parking, reconnecting,
 * replaying unflushed writes, closing idle ones.
 *
 * A request goes to a ready connection, preferring one on the caller's own
 * loop with fewer than GROW_AT requests; a lazy handle opens another (up to
 * max_conns, where the server allows multi-conn) when none fits.  With no
 * ready connection the request is parked and the export's state machine,
 * which runs on its home loop (export_run), does the rest:
 *
 *   IDLE --request/hold--> CONNECTING --ready--> READY --lost--> RECOVERING
 *   RECOVERING: every connection closed, attempts with backoff (50 ms
 *   doubling to 2 s), on success the replay log is written again, then the
 *   parked requests go out; a parked request fails with -EIO once it waited
 *   reconnect_timeout_ms, and after that long without requests the export
 *   is FAILED until the next one.  READY --idle_timeout, nothing held--> IDLE.
 *
 * One connection lost means every connection goes: a server that restarted
 * may have dropped acknowledged writes of any of them, and replaying while
 * another connection still writes could put old data over new.
 *
 * The replay log keeps a copy of each write from the moment it is sent;
 * the copy joins the log when the write is acknowledged and leaves it when a
 * flush sent after that succeeds.  Past LOG_FLUSH_AT bytes an early flush
 * goes out; past LOG_MAX new writes wait for it.  A replay that fails, or
 * an outage longer than the timeout, loses the log: lost_seq counts it so
 * the next flush of every file that wrote can fail with EIO.
 *
 * Lock: c->lock guards the connection set, the parked and throttled queues,
 * the log and the state; it is never held across a call into a connection,
 * a completion callback, or anything that takes another lock.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define BACKOFF_MIN_US (50 * 1000)
#define BACKOFF_MAX_US (2 * G_USEC_PER_SEC)
#define GROW_AT 16                        /* requests on a connection before another opens */
#define LOG_FLUSH_AT (16u * 1024 * 1024)  /* unflushed bytes that trigger an early flush */
#define LOG_MAX (64u * 1024 * 1024)       /* ... and that make new writes wait */
#define GONE_WAIT_US (5 * G_USEC_PER_SEC) /* teardown waits this long for connections */

static const struct nbdc_conn_owner data_owner;
static void kick(Nbdc *c);

/* ---- references ---- */

void nbdc_export_ref(Nbdc *c)
{
	g_atomic_int_inc(&c->refs);
}

static void log_free_all(Nbdc *c);

void nbdc_export_unref(Nbdc *c)
{
	if (!g_atomic_int_dec_and_test(&c->refs))
		return;
	g_assert(c->conns->len == 0);
	g_ptr_array_unref(c->conns);
	log_free_all(c);
	nbdc_neg_clear(&c->neg);
	nbdc_tls_ctx_unref(c->tls);
	if (c->gone)
		completion_unref(c->gone);
	if (c->drained)
		completion_unref(c->drained);
	if (c->sync_error)
		g_error_free(c->sync_error);
	g_free(c->display);
	g_free(c->error);
	g_free(c->zero_buf);
	nbdc_op_cache_free(c);
	g_mutex_clear(&c->op_lock);
	g_mutex_clear(&c->lock);
	g_free(c);
}

Nbdc *nbdc_export_new(const struct nbdc_config *cfg, gboolean lazy, GError **error)
{
	Nbdc *c = g_new0(Nbdc, 1);

	c->refs = 1;
	c->cfg = *cfg;
	c->loops = nbdc_cfg_loops(cfg);
	c->home = loop_set_pick(c->loops);
	c->display = nbdc_cfg_display(cfg);
	c->lazy = lazy;
	c->had_fd = cfg->fd >= 0;
	c->conns = g_ptr_array_new();
	c->state = NBDC_EX_IDLE;
	c->backoff_us = BACKOFF_MIN_US;
	g_mutex_init(&c->lock);
	g_mutex_init(&c->op_lock);
	if (cfg->tls) {
		c->tls = nbdc_tls_ctx_new(cfg, c->display, error);
		if (!c->tls) {
			nbdc_export_unref(c);
			return NULL;
		}
	}
	return c;
}

gboolean nbdc_export_alive(const Nbdc *c)
{
	return !g_atomic_int_get(&c->closing) && !c->dead;
}

/* ---- completions ---- */

static void complete_task(void *opaque)
{
	struct nbdc_req *req = opaque;

	req->complete(req, req->err);
}

void nbdc_complete_later(Nbdc *c, struct nbdc_req *req, int err)
{
	Loop *loop = loop_current();

	req->err = err;
	loop_post(loop && loop_get_set(loop) == c->loops ? loop : c->home, complete_task, req);
}

/* Nothing is in flight any more. */
static void idle_now(Nbdc *c)
{
	if (g_atomic_int_get(&c->closing)) {
		g_mutex_lock(&c->lock);
		struct completion *d = g_steal_pointer(&c->drained);
		g_mutex_unlock(&c->lock);
		if (d)
			completion_done(d, 0);
	}
	if (c->lazy)
		kick(c); /* maybe idle long enough to close */
}

/* Finishes @req (no lock held). */
static void finish(Nbdc *c, struct nbdc_req *req, int err)
{
	req->complete(req, err);
	if (g_atomic_int_dec_and_test(&c->in_flight))
		idle_now(c);
}

/* Finishes a list of requests (linked by next) with @err. */
static void finish_all(Nbdc *c, struct nbdc_req *list, int err)
{
	while (list) {
		struct nbdc_req *next = list->next;

		list->next = list->prev = NULL;
		if (list->log) {
			g_free(list->log);
			list->log = NULL;
		}
		finish(c, list, err);
		list = next;
	}
}

/* ---- the replay log (under c->lock) ---- */

static void log_free_all(Nbdc *c)
{
	while (c->log_head) {
		struct nbdc_log_entry *e = c->log_head;

		c->log_head = e->next;
		g_free(e);
	}
	c->log_tail = NULL;
	c->log_bytes = 0;
}

static void log_append(Nbdc *c, struct nbdc_log_entry *e)
{
	e->seq = ++c->log_seq;
	e->next = NULL;
	if (c->log_tail)
		c->log_tail->next = e;
	else
		c->log_head = e;
	c->log_tail = e;
	c->log_bytes += e->len;
}

/* A flush covering every entry up to @seq succeeded. */
static void log_trim(Nbdc *c, guint64 seq)
{
	while (c->log_head && c->log_head->seq <= seq) {
		struct nbdc_log_entry *e = c->log_head;

		c->log_head = e->next;
		c->log_bytes -= e->len;
		g_free(e);
	}
	if (!c->log_head)
		c->log_tail = NULL;
}

/* The writes in the log may be gone from the server for good. */
static void log_lose(Nbdc *c, const char *why)
{
	if (!c->log_head)
		return;
	nbdc_log(&c->cfg, NBDC_LOG_WARNING,
		 "%s: %" G_GUINT64_FORMAT " bytes of acknowledged writes may be lost (%s): the "
		 "next flush of every file that wrote them fails with EIO",
		 c->display, c->log_bytes, why);
	log_free_all(c);
	c->lost_seq++;
}

static void early_flush_done(struct nbdc_req *req, int err)
{
	Nbdc *c = req->extent_opaque;

	g_mutex_lock(&c->lock);
	c->log_flushing = FALSE;
	g_mutex_unlock(&c->lock);
	g_free(req);
	if (g_atomic_int_dec_and_test(&c->in_flight))
		idle_now(c);
	kick(c); /* throttled writes may go now */
	nbdc_export_unref(c);
}

/* Under c->lock: starts an early flush when none runs; returns the request
 * to submit after unlocking, or NULL. */
static struct nbdc_req *early_flush_locked(Nbdc *c)
{
	if (c->log_flushing || !c->log_head)
		return NULL;
	struct nbdc_req *req = g_new0(struct nbdc_req, 1);

	req->type = NBD_CMD_FLUSH;
	req->internal = TRUE;
	req->complete = early_flush_done;
	req->extent_opaque = c;
	c->log_flushing = TRUE;
	nbdc_export_ref(c);
	return req;
}

/* ---- choosing a connection ---- */

static gboolean usable(const struct nbdc_conn *conn)
{
	return nbdc_conn_is_ready(conn) && !g_atomic_int_get(&conn->inq_closed);
}

/* Under c->lock: a new connection on @loop (started after unlocking). */
struct nbdc_conn *nbdc_export_new_conn_locked(Nbdc *c, Loop *loop)
{
	static const struct nbdc_hs_goal go = {.go = TRUE};
	int fd = -1;

	if (c->cfg.fd >= 0) {
		fd = c->cfg.fd; /* an inherited socket serves once */
		c->cfg.fd = -1;
	}
	struct nbdc_conn *conn = nbdc_conn_new(loop, &c->cfg, c->tls, &go, &data_owner, c, fd);
	conn->index = c->next_index++;
	g_ptr_array_add(c->conns, nbdc_conn_ref(conn));
	c->nopening++;
	nbdc_export_ref(c);
	return conn; /* the caller's reference: dropped after starting */
}

static gboolean can_grow(const Nbdc *c)
{
	return c->lazy && c->conns->len < c->max_conns && c->nopening == 0 &&
	       (c->neg.eflags & NBD_FLAG_CAN_MULTI_CONN) && !c->had_fd && c->ever_ready;
}

/* Under c->lock: the connection for a request from @cur (a loop or NULL);
 * *@grow gets a new connection to start when the load says so. */
static struct nbdc_conn *choose_locked(Nbdc *c, Loop *cur, struct nbdc_conn **grow)
{
	struct nbdc_conn *local = NULL, *any = NULL;
	gint lload = G_MAXINT, aload = G_MAXINT;
	guint n = c->conns->len, start = n ? c->rr++ % n : 0;

	/* Least loaded, ties broken round robin. */
	for (guint k = 0; k < n; k++) {
		struct nbdc_conn *conn = c->conns->pdata[(start + k) % n];
		gint load;

		if (!usable(conn))
			continue;
		load = g_atomic_int_get(&conn->load);
		if (conn->loop == cur && load < lload) {
			local = conn;
			lload = load;
		}
		if (load < aload) {
			any = conn;
			aload = load;
		}
	}
	struct nbdc_conn *pick = local && lload < GROW_AT ? local : (lload <= aload ? local : any);
	if (!pick)
		pick = any;
	if (pick && can_grow(c) && (lload >= GROW_AT || (!local && cur && aload > 0)) &&
	    aload >= (cur && !local ? 1 : GROW_AT))
		*grow = nbdc_export_new_conn_locked(c, cur ? cur : c->home);
	return pick;
}

/* ---- submitting ---- */

static void append(struct nbdc_req **head, struct nbdc_req **tail, struct nbdc_req *req)
{
	req->next = NULL;
	req->prev = *tail;
	if (*tail)
		(*tail)->next = req;
	else
		*head = req;
	*tail = req;
}

/* Under c->lock: parks @req until a connection is ready. */
static void park_locked(Nbdc *c, struct nbdc_req *req)
{
	if (!req->wait_since_us)
		req->wait_since_us = g_get_monotonic_time();
	append(&c->parked_head, &c->parked_tail, req);
	c->nparked++;
	Loop *cur = loop_current();
	if (cur && loop_get_set(cur) == c->loops)
		c->prefer = cur;
}

static gboolean is_write_like(const struct nbdc_req *req)
{
	return req->type == NBD_CMD_WRITE || req->type == NBD_CMD_WRITE_ZEROES;
}

void nbdc_export_submit(Nbdc *c, struct nbdc_req *req)
{
	Loop *cur = loop_current();

	if (cur && loop_get_set(cur) != c->loops)
		cur = NULL;
	g_atomic_int_inc(&c->in_flight);
	for (guint tries = 0;; tries++) {
		struct nbdc_conn *conn = NULL, *grow = NULL;
		struct nbdc_req *flush = NULL;
		gboolean wake = FALSE;

		g_mutex_lock(&c->lock);
		if (g_atomic_int_get(&c->closing) || c->state == NBDC_EX_CLOSED ||
		    (c->dead && !c->cfg.reconnect)) {
			g_mutex_unlock(&c->lock);
			g_atomic_int_dec_and_test(&c->in_flight);
			nbdc_complete_later(c, req, -ENOTCONN);
			return;
		}
		if (req->type == NBD_CMD_FLUSH)
			req->flush_seq = c->log_seq;
		if (c->log_on && !req->internal && is_write_like(req) && c->log_bytes >= LOG_MAX) {
			append(&c->throttled_head, &c->throttled_tail, req);
			flush = early_flush_locked(c);
			g_mutex_unlock(&c->lock);
			if (flush)
				nbdc_export_submit(c, flush);
			return;
		}
		if (c->state == NBDC_EX_READY && tries < 8)
			conn = choose_locked(c, cur, &grow);
		if (conn)
			nbdc_conn_ref(conn);
		else {
			park_locked(c, req);
			wake = !c->kick_posted;
		}
		g_mutex_unlock(&c->lock);
		if (grow) {
			nbdc_conn_start(grow);
			nbdc_conn_unref(grow);
		}
		if (!conn) {
			if (wake)
				kick(c);
			return;
		}
		gboolean ok = nbdc_conn_submit(conn, req);
		nbdc_conn_unref(conn);
		if (ok)
			return;
	}
}

/* ---- the connections' reports (on their loops) ---- */

/* Under c->lock: forgets @conn (its reference goes to the caller). */
static gboolean drop_conn_locked(Nbdc *c, struct nbdc_conn *conn)
{
	return g_ptr_array_remove(c->conns, conn);
}

/* Under c->lock: one outcome nbdc_connect waits for is in. */
static void sync_outcome_locked(Nbdc *c, const GError *err)
{
	if (!c->connecting_sync || c->sync_waiting == 0)
		return;
	if (err && !c->sync_error && c->nready == 0)
		c->sync_error = g_error_copy(err);
	if (--c->sync_waiting == 0)
		completion_done(g_steal_pointer(&c->sync_wait), 0);
}

static void conn_ready(struct nbdc_conn *conn, void *data)
{
	Nbdc *c = data;
	g_autofree char *refused = NULL;

	g_mutex_lock(&c->lock);
	c->nopening--;
	if (c->ever_ready && conn->neg.size != c->neg.size)
		refused = g_strdup_printf("the export size changed from %" G_GUINT64_FORMAT
					  " to %" G_GUINT64_FORMAT " bytes; refusing it",
					  c->neg.size, conn->neg.size);
	else if (c->connecting_sync && c->ever_ready &&
		 (conn->neg.eflags != c->neg.eflags ||
		  conn->neg.structured_replies != c->neg.structured_replies))
		refused = g_strdup_printf("connection %u negotiated a different export",
					  conn->index);
	else if (g_atomic_int_get(&c->closing) || c->state == NBDC_EX_CLOSED)
		refused = g_strdup("closing");
	if (!refused) {
		c->nready++;
		conn->counted = TRUE;
		if (!c->ever_ready) {
			/* The first GO tells what INFO could not. */
			nbdc_neg_clear(&c->neg);
			c->neg = conn->neg;
			c->neg.name = g_strdup(conn->neg.name);
			c->neg.description = g_strdup(conn->neg.description);
			c->ever_ready = TRUE;
		}
		c->neg.structured_replies = conn->neg.structured_replies;
		c->neg.meta = conn->neg.meta;
		if (c->state == NBDC_EX_RECOVERING) {
			c->reconnects++;
			nbdc_log(&c->cfg, NBDC_LOG_INFO, "%s: reconnected after %u attempt%s",
				 c->display, c->attempts + 1, c->attempts ? "s" : "");
		} else if (c->state != NBDC_EX_READY) {
			c->state = NBDC_EX_READY;
		}
		c->attempts = 0;
		c->backoff_us = BACKOFF_MIN_US;
		g_clear_pointer(&c->error, g_free);
	} else if (c->connecting_sync) {
		nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: extra connection %u failed, using %u: %s",
			 c->display, conn->index, c->nready, refused);
	} else if (c->ever_ready && !g_atomic_int_get(&c->closing)) {
		/* A failed attempt like any other: backoff, and a warning now
		 * and then. */
		g_free(c->error);
		c->error = g_strdup(refused);
		c->attempts++;
		c->next_attempt = g_get_monotonic_time() + c->backoff_us;
		c->backoff_us = MIN(c->backoff_us * 2, BACKOFF_MAX_US);
		if (c->attempts == 1 || c->attempts % 10 == 0)
			nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: reconnect attempt %u: %s",
				 c->display, c->attempts, refused);
	}
	sync_outcome_locked(c, NULL);
	g_mutex_unlock(&c->lock);
	if (refused)
		nbdc_conn_close(conn, FALSE);
	kick(c);
}

static void conn_finished(struct nbdc_conn *conn, void *data, GError *err)
{
	Nbdc *c = data;

	g_mutex_lock(&c->lock);
	if (drop_conn_locked(c, conn))
		c->nopening = c->nopening ? c->nopening - 1 : 0;
	if (err && c->connecting_sync) {
		if (c->nready > 0)
			nbdc_log(&c->cfg, NBDC_LOG_WARNING,
				 "%s: extra connection %u failed, using %u: %s", c->display,
				 conn->index, c->nready, err->message);
		else
			c->attempts++;
		sync_outcome_locked(c, err);
	} else if (err) {
		g_free(c->error);
		c->error = g_strdup(err->message);
		c->attempts++;
		if (c->state == NBDC_EX_RECOVERING || c->state == NBDC_EX_CONNECTING) {
			if (c->attempts == 1 || c->attempts % 10 == 0)
				nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: connect attempt %u failed: %s",
					 c->display, c->attempts,
					 g_str_has_prefix(err->message, c->display) &&
							 err->message[strlen(c->display)] == ':'
						 ? err->message + strlen(c->display) + 2
						 : err->message);
			c->next_attempt = g_get_monotonic_time() + c->backoff_us;
			c->backoff_us = MIN(c->backoff_us * 2, BACKOFF_MAX_US);
		}
	}
	g_mutex_unlock(&c->lock);
	if (err)
		g_error_free(err);
	nbdc_conn_unref(conn);
	kick(c);
	nbdc_export_unref(c);
}

/* Requests of a lost connection: the core's replay writes are dropped (the
 * replay starts over), the others wait for the next connection. */
static struct nbdc_req *take_user_reqs(struct nbdc_req *reqs, struct nbdc_req **internal)
{
	struct nbdc_req *head = NULL, *tail = NULL;

	*internal = NULL;
	while (reqs) {
		struct nbdc_req *next = reqs->next;

		if (reqs->log && !reqs->internal) {
			g_free(reqs->log); /* sent again later: copied again */
			reqs->log = NULL;
		}
		nbdc_req_reset(reqs);
		if (reqs->internal && reqs->type != NBD_CMD_FLUSH) {
			reqs->next = *internal;
			*internal = reqs;
		} else {
			append(&head, &tail, reqs);
		}
		reqs = next;
	}
	return head;
}

static void conn_lost(struct nbdc_conn *conn, void *data, struct nbdc_req *reqs, int err,
		      const char *msg)
{
	Nbdc *c = data;
	GPtrArray *others = NULL;
	struct nbdc_req *fail = NULL, *internal = NULL;
	gboolean expected = g_atomic_int_get(&c->closing) || c->state == NBDC_EX_CLOSED ||
			    (msg == NULL && !conn->shutdown_pending);

	g_mutex_lock(&c->lock);
	if (drop_conn_locked(c, conn) && conn->counted)
		c->nready--;
	if (!expected && c->cfg.reconnect) {
		struct nbdc_req *list = take_user_reqs(reqs, &internal), *tail = list;

		/* Its requests go first: they were sent before the parked ones. */
		while (tail && tail->next)
			tail = tail->next;
		for (struct nbdc_req *r = list; r; r = r->next) {
			r->wait_since_us = r->wait_since_us ? r->wait_since_us : g_get_monotonic_time();
			c->nparked++;
		}
		if (tail) {
			tail->next = c->parked_head;
			if (c->parked_head)
				c->parked_head->prev = tail;
			else
				c->parked_tail = tail;
			c->parked_head = list;
		}
		c->replay_owed = c->log_head != NULL;
		if (c->state != NBDC_EX_RECOVERING) {
			if (c->state == NBDC_EX_READY)
				c->warned = FALSE; /* a new outage */
			c->state = NBDC_EX_RECOVERING;
			c->lost_at = g_get_monotonic_time();
			c->next_attempt = 0;
			c->attempts = 0;
			c->backoff_us = BACKOFF_MIN_US;
			others = g_ptr_array_new();
			for (guint i = 0; i < c->conns->len; i++)
				g_ptr_array_add(others, nbdc_conn_ref(c->conns->pdata[i]));
		}
		c->replaying = FALSE;
		g_free(c->error);
		c->error = g_strdup(msg ? msg : "server is shutting down");
		if (!c->warned) {
			c->warned = TRUE;
			nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: connection lost (%s); reconnecting",
				 c->display, c->error);
		}
	} else {
		if (!expected || msg) {
			c->dead = TRUE;
			if (!c->error)
				c->error = g_strdup_printf("%s: %s", c->display,
							   msg ? msg : "server is shutting down");
			if (!g_atomic_int_get(&c->closing) || err != -ENOTCONN)
				nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: %s", c->display,
					 msg ? msg : "server is shutting down");
		}
		fail = reqs;
	}
	if (c->conns->len == 0 && c->gone && !c->gone_done && c->state == NBDC_EX_CLOSED) {
		c->gone_done = TRUE;
		completion_done(c->gone, 0);
	}
	g_mutex_unlock(&c->lock);

	if (others) {
		for (guint i = 0; i < others->len; i++) {
			nbdc_conn_close(others->pdata[i], FALSE);
			nbdc_conn_unref(others->pdata[i]);
		}
		g_ptr_array_free(others, TRUE);
	}
	while (internal) {
		struct nbdc_req *next = internal->next;

		internal->complete(internal, -ENOTCONN);
		internal = next;
	}
	/* Without reconnect each request fails with the connection's error. */
	finish_all(c, fail, err);
	nbdc_conn_unref(conn);
	kick(c);
	nbdc_export_unref(c);
}

static void conn_done(struct nbdc_conn *conn, void *data, struct nbdc_req *req, int err)
{
	Nbdc *c = data;

	if (c->log_on && !req->internal &&
	    (req->log || req->type == NBD_CMD_FLUSH ||
	     (req->type == NBD_CMD_WRITE_ZEROES && !(req->flags & NBD_CMD_FLAG_FUA)))) {
		struct nbdc_req *flush = NULL;

		g_mutex_lock(&c->lock);
		if (err == 0 && req->type == NBD_CMD_FLUSH) {
			log_trim(c, req->flush_seq);
		} else if (err == 0 && req->log) {
			log_append(c, g_steal_pointer(&req->log));
		} else if (err == 0 && req->type == NBD_CMD_WRITE_ZEROES) {
			struct nbdc_log_entry *e = g_new0(struct nbdc_log_entry, 1);

			e->offset = req->offset;
			e->len = req->len;
			e->type = NBD_CMD_WRITE_ZEROES;
			e->flags = req->flags;
			log_append(c, e);
		}
		if (c->log_bytes >= LOG_FLUSH_AT)
			flush = early_flush_locked(c);
		g_mutex_unlock(&c->lock);
		g_clear_pointer(&req->log, g_free);
		if (flush)
			nbdc_export_submit(c, flush);
	}
	if (req->internal) {
		req->complete(req, err);
		return;
	}
	finish(c, req, err);
}

static void conn_sent(struct nbdc_conn *conn, void *data, struct nbdc_req *req)
{
	Nbdc *c = data;

	if (!c->log_on || req->internal || (req->flags & NBD_CMD_FLAG_FUA) || req->log)
		return;
	/* Copied while the server works on it: off the reply's path. */
	struct nbdc_log_entry *e = g_malloc(sizeof(*e) + req->len);
	uint8_t *p = e->data;
	uint64_t skip = req->iov_off, left = req->len;

	e->next = NULL;
	e->offset = req->offset;
	e->len = req->len;
	e->type = NBD_CMD_WRITE;
	e->flags = 0;
	e->seq = 0;
	for (int i = 0; i < req->iovcnt && left > 0; i++) {
		if (skip >= req->iov[i].iov_len) {
			skip -= req->iov[i].iov_len;
			continue;
		}
		size_t n = (size_t)MIN((uint64_t)(req->iov[i].iov_len - skip), left);

		memcpy(p, (const char *)req->iov[i].iov_base + skip, n);
		p += n;
		left -= n;
		skip = 0;
	}
	req->log = e;
}

static void conn_shutting_down(struct nbdc_conn *conn, void *data)
{
	Nbdc *c = data;

	if (c->cfg.reconnect)
		return; /* the connection closes when idle; a new one replaces it */
	g_mutex_lock(&c->lock);
	c->dead = TRUE;
	if (!c->error)
		c->error = g_strdup_printf("%s: server is shutting down", c->display);
	g_mutex_unlock(&c->lock);
	nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: server is shutting down", c->display);
}

static const struct nbdc_conn_owner data_owner = {
	.ready = conn_ready,
	.finished = conn_finished,
	.lost = conn_lost,
	.done = conn_done,
	.sent = conn_sent,
	.shutting_down = conn_shutting_down,
};

/* ---- the state machine (home loop) ---- */

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
	kick(c);
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
static gboolean replay_step(Nbdc *c)
{
	struct nbdc_conn *conn = NULL;
	GPtrArray *batch = NULL;

	g_mutex_lock(&c->lock);
	if (c->replay_pending > 0) {
		g_mutex_unlock(&c->lock);
		return TRUE;
	}
	if (c->replay_failed) {
		log_lose(c, "the server refused them on the new connection");
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
		if (usable(c->conns->pdata[i]))
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

static void run_task(void *opaque);
static void timer_fired(void *opaque);

/* Asks the home loop to look at the export (any thread, coalesced). */
static void kick(Nbdc *c)
{
	g_mutex_lock(&c->lock);
	gboolean post = !c->kick_posted;
	c->kick_posted = TRUE;
	g_mutex_unlock(&c->lock);
	if (post) {
		nbdc_export_ref(c);
		loop_post_task(c->home, &c->kick_task, run_task, c);
	}
}

/* Under c->lock: requests parked longer than the timeout, unlinked. */
static struct nbdc_req *expire_locked(Nbdc *c, gint64 now, gboolean all)
{
	gint64 tmo = (gint64)c->cfg.reconnect_timeout_ms * 1000;
	struct nbdc_req *head = NULL, *tail = NULL;

	for (struct nbdc_req *r = c->parked_head, *next; r; r = next) {
		next = r->next;
		if (!all && r->wait_since_us + tmo > now)
			continue;
		if (r->prev)
			r->prev->next = r->next;
		else
			c->parked_head = r->next;
		if (r->next)
			r->next->prev = r->prev;
		else
			c->parked_tail = r->prev;
		c->nparked--;
		append(&head, &tail, r);
	}
	return head;
}

/* Under c->lock: the earliest parked deadline, or 0. */
static gint64 next_expiry_locked(Nbdc *c)
{
	gint64 tmo = (gint64)c->cfg.reconnect_timeout_ms * 1000, t = 0;

	for (struct nbdc_req *r = c->parked_head; r; r = r->next)
		if (!t || r->wait_since_us + tmo < t)
			t = r->wait_since_us + tmo;
	return t;
}

static Loop *attempt_loop(Nbdc *c)
{
	return c->prefer ? c->prefer : c->home;
}

/* Home loop: one look at the export; does what its state asks. */
static void export_run(Nbdc *c)
{
	struct nbdc_req *expired = NULL, *release = NULL, *throttled = NULL, *flush = NULL;
	struct nbdc_conn *start = NULL;
	GPtrArray *close = NULL;
	gint64 now = g_get_monotonic_time();
	gboolean need_replay = FALSE;
	int expired_err = -EIO;

	g_mutex_lock(&c->lock);
	c->kick_posted = FALSE;
	if (g_atomic_int_get(&c->closing) || c->state == NBDC_EX_CLOSED) {
		expired = expire_locked(c, now, TRUE);
		expired_err = -ENOTCONN;
		throttled = c->throttled_head;
		c->throttled_head = c->throttled_tail = NULL;
		goto out;
	}
	gboolean wanted = c->nparked > 0 || c->throttled_head || c->holds > 0;

	/* Without reconnect a dead handle takes nothing. */
	if (!c->cfg.reconnect && (c->dead || (c->ever_ready && c->conns->len == 0))) {
		expired = expire_locked(c, now, TRUE);
		expired_err = -ENOTCONN;
		goto out;
	}

	switch (c->state) {
	case NBDC_EX_IDLE:
	case NBDC_EX_FAILED:
		if ((c->nparked > 0 || c->holds > 0) && c->conns->len == 0 &&
		    (c->nparked > 0 || c->state == NBDC_EX_IDLE)) {
			c->state = c->ever_ready ? NBDC_EX_RECOVERING : NBDC_EX_CONNECTING;
			c->lost_at = now;
			c->attempts = 0;
			c->backoff_us = BACKOFF_MIN_US;
			c->next_attempt = 0;
			if (c->state == NBDC_EX_RECOVERING)
				c->warned = TRUE; /* a fresh start, not a loss */
		}
		break;
	default:
		break;
	}

	if (c->connecting_sync) {
		/* nbdc_connect makes its connections itself. */
	} else if (c->state == NBDC_EX_CONNECTING || c->state == NBDC_EX_RECOVERING) {
		gint64 tmo = (gint64)c->cfg.reconnect_timeout_ms * 1000;
		gboolean attempting = c->nopening > 0;

		/* Requests wait out their timeout; the first connection of a
		 * lazy handle is always given its attempt. */
		if (c->cfg.reconnect && (c->attempts > 0 || c->state == NBDC_EX_RECOVERING))
			expired = expire_locked(c, now, FALSE);
		if (!c->cfg.reconnect && c->attempts > 0)
			expired = expire_locked(c, now, TRUE);
		if (c->state == NBDC_EX_RECOVERING && c->log_head && !c->replaying &&
		    now >= c->lost_at + tmo && c->nready == 0) {
			log_lose(c, "the server stayed away");
			c->replay_owed = FALSE;
		}
		if (c->nready > 0) {
			need_replay = c->state == NBDC_EX_RECOVERING && c->replay_owed && c->log_head;
			if (!need_replay) {
				c->state = NBDC_EX_READY;
				release = c->parked_head;
				c->parked_head = c->parked_tail = NULL;
				c->nparked = 0;
			}
		} else if (!attempting && c->conns->len == 0) {
			gboolean keep_trying = c->nparked > 0 || c->throttled_head || c->log_head ||
					       (c->state == NBDC_EX_RECOVERING && now < c->lost_at + tmo &&
						c->holds > 0) ||
					       (c->attempts == 0 && wanted);
			if (!c->cfg.reconnect && c->attempts > 0)
				keep_trying = FALSE;
			if (!keep_trying) {
				c->state = c->attempts > 0 || c->ever_ready ? NBDC_EX_FAILED
									     : NBDC_EX_IDLE;
			} else if (now >= c->next_attempt) {
				start = nbdc_export_new_conn_locked(c, attempt_loop(c));
			} else {
				loop_timer_start(c->home, &c->retry_timer, c->next_attempt,
						 timer_fired, c);
			}
		}
	} else if (c->state == NBDC_EX_READY && c->nparked > 0 && c->nready > 0) {
		release = c->parked_head;
		c->parked_head = c->parked_tail = NULL;
		c->nparked = 0;
	} else if (c->state == NBDC_EX_READY && c->nready == 0 && c->nopening == 0 &&
		   c->conns->len == 0) {
		/* Every connection closed while idle. */
		c->state = NBDC_EX_IDLE;
	}

	/* Throttled writes go when the log has room again. */
	if (c->throttled_head && (c->log_bytes < LOG_MAX || !c->log_on)) {
		throttled = c->throttled_head;
		c->throttled_head = c->throttled_tail = NULL;
	} else if (c->throttled_head && c->state == NBDC_EX_READY) {
		flush = early_flush_locked(c);
	}

	/* Idle: nothing held, nothing in flight: close after idle_timeout. */
	if (c->lazy && c->cfg.idle_timeout_ms && c->state == NBDC_EX_READY && c->holds == 0 &&
	    g_atomic_int_get(&c->in_flight) == 0 && c->nparked == 0 && c->conns->len > 0) {
		if (c->log_head && !c->log_flushing) {
			flush = flush ? flush : early_flush_locked(c);
		} else if (!c->log_head && c->idle_fired) {
			close = g_ptr_array_new();
			for (guint i = 0; i < c->conns->len; i++)
				g_ptr_array_add(close, nbdc_conn_ref(c->conns->pdata[i]));
			nbdc_log(&c->cfg, NBDC_LOG_DEBUG, "%s: idle: closing %u connection%s",
				 c->display, c->conns->len, c->conns->len == 1 ? "" : "s");
		} else if (!loop_timer_armed(&c->idle_timer)) {
			loop_timer_start(c->home, &c->idle_timer,
					 now + (gint64)c->cfg.idle_timeout_ms * 1000, timer_fired, c);
		}
	} else {
		loop_timer_stop(&c->idle_timer);
	}
	c->idle_fired = FALSE;

	gint64 expiry = next_expiry_locked(c);
	if (expiry && c->cfg.reconnect && c->state != NBDC_EX_READY)
		loop_timer_start(c->home, &c->expiry_timer, expiry, timer_fired, c);
	else
		loop_timer_stop(&c->expiry_timer);
out:
	g_mutex_unlock(&c->lock);

	if (start) {
		nbdc_conn_start(start);
		nbdc_conn_unref(start);
	}
	if (close) {
		for (guint i = 0; i < close->len; i++) {
			nbdc_conn_close(close->pdata[i], TRUE);
			nbdc_conn_unref(close->pdata[i]);
		}
		g_ptr_array_free(close, TRUE);
	}
	if (need_replay && !replay_step(c))
		kick(c); /* replay finished: release the parked requests */
	if (flush)
		nbdc_export_submit(c, flush);
	finish_all(c, expired, expired_err);
	/* Parked and throttled requests go out again, in order. */
	for (struct nbdc_req *list = release; list;) {
		struct nbdc_req *next = list->next;

		list->next = list->prev = NULL;
		g_atomic_int_dec_and_test(&c->in_flight); /* submit counts it again */
		nbdc_export_submit(c, list);
		list = next;
	}
	for (struct nbdc_req *list = throttled; list;) {
		struct nbdc_req *next = list->next;

		list->next = list->prev = NULL;
		if (g_atomic_int_get(&c->closing)) {
			finish(c, list, -ENOTCONN);
		} else {
			g_atomic_int_dec_and_test(&c->in_flight); /* counted again */
			nbdc_export_submit(c, list);
		}
		list = next;
	}
}

static void run_task(void *opaque)
{
	Nbdc *c = opaque;

	export_run(c);
	nbdc_export_unref(c);
}

static void timer_fired(void *opaque)
{
	Nbdc *c = opaque;

	g_mutex_lock(&c->lock);
	if (!loop_timer_armed(&c->idle_timer) && c->state == NBDC_EX_READY)
		c->idle_fired = TRUE;
	g_mutex_unlock(&c->lock);
	nbdc_export_ref(c);
	run_task(c);
}

/* ---- use, health, closing ---- */

void nbdc_export_hold(Nbdc *c, gboolean held)
{
	g_mutex_lock(&c->lock);
	if (held)
		c->holds++;
	else if (c->holds > 0)
		c->holds--;
	gboolean look = held ? c->holds == 1 && c->conns->len == 0 : c->holds == 0;
	g_mutex_unlock(&c->lock);
	if (look)
		kick(c);
}

void nbdc_export_health(Nbdc *c, struct nbdc_health *out)
{
	memset(out, 0, sizeof(*out));
	g_mutex_lock(&c->lock);
	switch (c->state) {
	case NBDC_EX_READY:
		out->state = NBDC_STATE_CONNECTED;
		break;
	case NBDC_EX_RECOVERING:
		out->state = NBDC_STATE_RECONNECTING;
		break;
	case NBDC_EX_FAILED:
		out->state = NBDC_STATE_FAILED;
		break;
	case NBDC_EX_CONNECTING:
		out->state = c->attempts > 0 ? NBDC_STATE_RECONNECTING : NBDC_STATE_IDLE;
		break;
	default:
		out->state = c->dead ? NBDC_STATE_FAILED : NBDC_STATE_IDLE;
		break;
	}
	if (c->dead && !c->cfg.reconnect)
		out->state = NBDC_STATE_FAILED;
	out->connections = c->nready;
	out->reconnects = c->reconnects;
	out->lost_writes_seq = c->lost_seq;
	g_mutex_unlock(&c->lock);
}

static void close_task(void *opaque)
{
	Nbdc *c = opaque;
	GPtrArray *conns;

	g_mutex_lock(&c->lock);
	c->state = NBDC_EX_CLOSED;
	loop_timer_stop(&c->retry_timer);
	loop_timer_stop(&c->expiry_timer);
	loop_timer_stop(&c->idle_timer);
	conns = g_ptr_array_new();
	for (guint i = 0; i < c->conns->len; i++)
		g_ptr_array_add(conns, nbdc_conn_ref(c->conns->pdata[i]));
	if (c->conns->len == 0 && c->gone && !c->gone_done) {
		c->gone_done = TRUE;
		completion_done(c->gone, 0);
	}
	/* What is still in flight after the caller's wait is abandoned: it
	 * fails with -ENOTCONN; idle connections say goodbye. */
	gboolean graceful = g_atomic_int_get(&c->in_flight) == 0;
	g_mutex_unlock(&c->lock);
	for (guint i = 0; i < conns->len; i++) {
		nbdc_conn_close(conns->pdata[i], graceful);
		nbdc_conn_unref(conns->pdata[i]);
	}
	g_ptr_array_free(conns, TRUE);
	export_run(c); /* fails what is parked or throttled */
	nbdc_export_unref(c);
}

void nbdc_export_close(Nbdc *c, gint64 wait_us)
{
	struct completion *drained = NULL;

	g_mutex_lock(&c->lock);
	if (g_atomic_int_get(&c->closing)) {
		g_mutex_unlock(&c->lock);
		return;
	}
	if (wait_us > 0 && loop_current() == NULL && g_atomic_int_get(&c->in_flight) > 0) {
		c->drained = completion_new();
		drained = completion_ref(c->drained);
	}
	c->gone = completion_new(); /* ours and the last connection's reference */
	g_atomic_int_set(&c->closing, 1);
	g_mutex_unlock(&c->lock);
	if (drained) {
		/* Bounded: requests in flight (and their follow-ups) finish. */
		if (g_atomic_int_get(&c->in_flight) > 0)
			completion_wait_until(drained, g_get_monotonic_time() + wait_us, NULL);
		completion_unref(drained);
	}
	nbdc_export_ref(c);
	loop_post(c->home, close_task, c);
}

void nbdc_export_wait_gone(Nbdc *c)
{
	struct completion *w = NULL;

	g_assert(loop_current() == NULL);
	g_mutex_lock(&c->lock);
	if (c->gone)
		w = completion_ref(c->gone);
	g_mutex_unlock(&c->lock);
	if (!w)
		return;
	completion_wait_until(w, g_get_monotonic_time() + GONE_WAIT_US, NULL);
	completion_unref(w);
}
