/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* export.c: one export's handle: its connections, choosing one for a
 * request, parking, the connections' reports, the early flush.  Its state
 * machine is recover.c, the replay log log.c, writing it again replay.c;
 * the design of all four is here.
 *
 * A request goes to a ready connection, preferring one on the caller's own
 * loop with fewer than GROW_AT requests; a lazy handle opens another (up to
 * max_conns, where the server allows multi-conn) when none fits, or on a
 * loop that submits and has none (requests released from the parked queue
 * on the home loop do not count as that loop's).  With no
 * ready connection the request is parked and the export's state machine,
 * which runs on its home loop (recover.c), does the rest:
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
 * flush sent after that succeeds.  Past NBDC_LOG_FLUSH_AT bytes an early flush
 * goes out; past NBDC_LOG_MAX new writes wait for it.  A replay that fails, or
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

#define GROW_AT 16 /* requests on a connection before another opens */

static const struct nbdc_conn_owner data_owner;

/* ---- references ---- */

void nbdc_export_ref(Nbdc *c)
{
	g_atomic_int_inc(&c->refs);
}

void nbdc_export_unref(Nbdc *c)
{
	if (!g_atomic_int_dec_and_test(&c->refs))
		return;
	g_assert(c->conns->len == 0);
	g_ptr_array_unref(c->conns);
	nbdc_log_free_all(c);
	nbdc_neg_clear(&c->neg);
	nbdc_tls_ctx_unref(c->tls);
	if (c->gone)
		completion_unref(c->gone);
	if (c->drained)
		completion_unref(c->drained);
	if (c->sync_wait)
		completion_unref(c->sync_wait); /* outcomes that never came */
	if (c->sync_error)
		g_error_free(c->sync_error);
	g_free(c->display);
	g_free(c->error);
	g_free(c->zero_buf);
	g_assert(c->op_cache == NULL); /* emptied by nbdc_free */
	g_mutex_clear(&c->op_lock);
	g_mutex_clear(&c->lock);
	g_free(c);
}

Nbdc *nbdc_export_new(const struct nbdc_config *cfg, gboolean lazy, loop_fn run, GError **error)
{
	Nbdc *c = g_new0(Nbdc, 1);

	c->refs = 1;
	c->run = run;
	c->cfg = *cfg;
	c->loops = nbdc_cfg_loops(cfg);
	c->home = loop_set_pick(c->loops);
	c->display = nbdc_cfg_display(cfg);
	c->lazy = lazy;
	c->had_fd = cfg->fd >= 0;
	c->conns = g_ptr_array_new();
	c->state = NBDC_EX_IDLE;
	c->backoff_us = NBDC_BACKOFF_MIN_US;
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

/* Asks the home loop to look at the export (any thread, coalesced). */
void nbdc_export_kick(Nbdc *c)
{
	g_mutex_lock(&c->lock);
	gboolean post = !c->kick_posted;
	c->kick_posted = TRUE;
	g_mutex_unlock(&c->lock);
	if (post) {
		nbdc_export_ref(c); /* the state machine drops it */
		loop_post_task(c->home, &c->kick_task, c->run, c);
	}
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
void nbdc_export_idle_now(Nbdc *c)
{
	if (g_atomic_int_get(&c->closing)) {
		g_mutex_lock(&c->lock);
		struct completion *d = g_steal_pointer(&c->drained);
		g_mutex_unlock(&c->lock);
		if (d)
			completion_done(d, 0);
	}
	if (c->lazy)
		nbdc_export_kick(c); /* maybe idle long enough to close */
}

/* Finishes @req (no lock held). */
void nbdc_export_finish(Nbdc *c, struct nbdc_req *req, int err)
{
	req->complete(req, err);
	if (g_atomic_int_dec_and_test(&c->in_flight))
		nbdc_export_idle_now(c);
}

/* Finishes a list of requests (linked by next) with @err. */
void nbdc_export_finish_all(Nbdc *c, struct nbdc_req *list, int err)
{
	while (list) {
		struct nbdc_req *next = list->next;

		list->next = list->prev = NULL;
		if (list->log) {
			g_free(list->log);
			list->log = NULL;
		}
		nbdc_export_finish(c, list, err);
		list = next;
	}
}

/* ---- the early flush ---- */

/* The replay log grew past its bounds, or the export goes idle with writes
 * in the log: a flush of the core's own trims it. */
static void early_flush_done(struct nbdc_req *req, int err)
{
	Nbdc *c = req->extent_opaque;

	g_mutex_lock(&c->lock);
	c->log_flushing = FALSE;
	g_mutex_unlock(&c->lock);
	g_free(req);
	if (g_atomic_int_dec_and_test(&c->in_flight))
		nbdc_export_idle_now(c);
	nbdc_export_kick(c); /* throttled writes may go now */
	nbdc_export_unref(c);
}

/* Under c->lock: starts an early flush when none runs; returns the request
 * to submit after unlocking, or NULL. */
struct nbdc_req *nbdc_early_flush_locked(Nbdc *c)
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

/* Under c->lock: a new connection on @loop (started after unlocking). */
struct nbdc_conn *nbdc_export_new_conn_locked(Nbdc *c, Loop *loop)
{
	static const struct nbdc_hs_goal go = { .go = TRUE };
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

gboolean nbdc_has_usable_locked(const Nbdc *c)
{
	for (guint i = 0; i < c->conns->len; i++)
		if (nbdc_conn_usable(c->conns->pdata[i]))
			return TRUE;
	return FALSE;
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

		if (!nbdc_conn_usable(conn))
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

/* Under c->lock: parks @req until a connection is ready. */
void nbdc_park_locked(Nbdc *c, struct nbdc_req *req)
{
	if (!req->wait_since_us)
		req->wait_since_us = g_get_monotonic_time();
	nbdc_req_append(&c->parked_head, &c->parked_tail, req);
	c->nparked++;
	Loop *cur = loop_current();
	if (cur && loop_get_set(cur) == c->loops)
		c->prefer = cur;
}

static gboolean is_write_like(const struct nbdc_req *req)
{
	return req->type == NBD_CMD_WRITE || req->type == NBD_CMD_WRITE_ZEROES;
}

/* What a flush makes durable. */
static gboolean changes_data(const struct nbdc_req *req)
{
	return is_write_like(req) || req->type == NBD_CMD_TRIM;
}

/* @cur: the loop the request comes from (its connection is preferred and
 * may be opened there), or NULL. */
static void submit_from(Nbdc *c, struct nbdc_req *req, Loop *cur)
{
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
		if (req->type == NBD_CMD_FLUSH) {
			req->flush_seq = c->log_seq;
			req->flush_gen = c->write_gen;
		}
		if (c->log_on && !req->internal && is_write_like(req) &&
		    c->log_bytes >= NBDC_LOG_MAX) {
			nbdc_req_append(&c->throttled_head, &c->throttled_tail, req);
			flush = nbdc_early_flush_locked(c);
			g_mutex_unlock(&c->lock);
			if (flush)
				submit_from(c, flush, cur);
			return;
		}
		if (c->state == NBDC_EX_READY && tries < 8)
			conn = choose_locked(c, cur, &grow);
		if (conn)
			nbdc_conn_ref(conn);
		else {
			nbdc_park_locked(c, req);
			wake = !c->kick_posted;
		}
		g_mutex_unlock(&c->lock);
		if (grow) {
			nbdc_conn_start(grow);
			nbdc_conn_unref(grow);
		}
		if (!conn) {
			if (wake)
				nbdc_export_kick(c);
			return;
		}
		gboolean ok = nbdc_conn_submit(conn, req);
		nbdc_conn_unref(conn);
		if (ok)
			return;
	}
}

void nbdc_export_submit(Nbdc *c, struct nbdc_req *req)
{
	Loop *cur = loop_current();

	submit_from(c, req, cur && loop_get_set(cur) == c->loops ? cur : NULL);
}

void nbdc_export_resubmit(Nbdc *c, struct nbdc_req *req)
{
	g_atomic_int_dec_and_test(&c->in_flight); /* counted again */
	submit_from(c, req, NULL);
}

/* ---- the connections' reports (on their loops) ---- */

/* Under c->lock: forgets @conn (its reference goes to the caller). */
static gboolean drop_conn_locked(Nbdc *c, struct nbdc_conn *conn)
{
	return g_ptr_array_remove(c->conns, conn);
}

/* Under c->lock: a closed handle's last connection ended (nbdc_free waits). */
static void gone_if_last_locked(Nbdc *c)
{
	if (c->conns->len == 0 && c->gone && !c->gone_done && c->state == NBDC_EX_CLOSED) {
		c->gone_done = TRUE;
		completion_done(c->gone, 0);
	}
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
		refused =
			g_strdup_printf("connection %u negotiated a different export", conn->index);
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
		c->backoff_us = NBDC_BACKOFF_MIN_US;
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
		c->backoff_us = MIN(c->backoff_us * 2, NBDC_BACKOFF_MAX_US);
		if (c->attempts == 1 || c->attempts % 10 == 0)
			nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: reconnect attempt %u: %s",
				 c->display, c->attempts, refused);
	}
	if (refused)
		conn->doomed = TRUE;
	sync_outcome_locked(c, NULL);
	g_mutex_unlock(&c->lock);
	if (refused)
		nbdc_conn_close(conn, NBDC_CLOSE_DROP);
	nbdc_export_kick(c);
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
		/* Out of file descriptors: waiting would not bring one back in
		 * time, so the requests fail now and the next one tries again. */
		c->starved = c->nready == 0 &&
			     (conn->connect_errno == EMFILE || conn->connect_errno == ENFILE);
		if (c->state == NBDC_EX_RECOVERING || c->state == NBDC_EX_CONNECTING) {
			if (c->attempts == 1 || c->attempts % 10 == 0)
				nbdc_log(&c->cfg, NBDC_LOG_WARNING,
					 "%s: connect attempt %u failed: %s", c->display,
					 c->attempts,
					 g_str_has_prefix(err->message, c->display) &&
							 err->message[strlen(c->display)] == ':'
						 ? err->message + strlen(c->display) + 2
						 : err->message);
			c->next_attempt = g_get_monotonic_time() + c->backoff_us;
			c->backoff_us = MIN(c->backoff_us * 2, NBDC_BACKOFF_MAX_US);
		}
	}
	gone_if_last_locked(c); /* a closed handle's attempt, or its first connect */
	g_mutex_unlock(&c->lock);
	if (err)
		g_error_free(err);
	nbdc_conn_unref(conn);
	nbdc_export_kick(c);
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
			nbdc_req_append(&head, &tail, reqs);
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
	gboolean closing = g_atomic_int_get(&c->closing) || c->state == NBDC_EX_CLOSED;
	/* A close of ours (msg NULL: idle, refused, or one of the others a loss
	 * takes down) is no outage; its requests still wait for the next
	 * connection. */
	gboolean loss = !closing && (msg != NULL || conn->shutdown_pending);

	g_mutex_lock(&c->lock);
	if (drop_conn_locked(c, conn) && conn->counted)
		c->nready--;
	if (!closing && c->cfg.reconnect) {
		struct nbdc_req *list = take_user_reqs(reqs, &internal), *tail = list;

		/* Its requests go first: they were sent before the parked ones. */
		while (tail && tail->next)
			tail = tail->next;
		for (struct nbdc_req *r = list; r; r = r->next) {
			r->wait_since_us =
				r->wait_since_us ? r->wait_since_us : g_get_monotonic_time();
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
	}
	if (loss && c->cfg.reconnect) {
		c->replay_owed = c->log_head != NULL;
		if (c->state != NBDC_EX_RECOVERING) {
			if (c->state == NBDC_EX_READY)
				c->warned = FALSE; /* a new outage */
			c->state = NBDC_EX_RECOVERING;
			c->lost_at = g_get_monotonic_time();
			c->next_attempt = 0;
			c->attempts = 0;
			c->backoff_us = NBDC_BACKOFF_MIN_US;
			/* Every other connection goes too, and from now on counts
			 * as neither ready nor usable: the state machine waits for
			 * them all to end before it connects again. */
			others = g_ptr_array_new();
			for (guint i = 0; i < c->conns->len; i++) {
				struct nbdc_conn *o = c->conns->pdata[i];

				o->doomed = TRUE;
				if (o->counted) {
					o->counted = FALSE;
					c->nready--;
				}
				g_ptr_array_add(others, nbdc_conn_ref(o));
			}
		}
		c->replaying = FALSE;
		g_free(c->error);
		c->error = g_strdup(msg ? msg : "server is shutting down");
		if (!c->warned) {
			c->warned = TRUE;
			nbdc_log(&c->cfg, NBDC_LOG_WARNING,
				 "%s: connection lost (%s); reconnecting", c->display, c->error);
		}
	} else if (closing || !c->cfg.reconnect) {
		if (loss || msg) {
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
	gone_if_last_locked(c);
	g_mutex_unlock(&c->lock);

	if (others) {
		for (guint i = 0; i < others->len; i++) {
			nbdc_conn_close(others->pdata[i], NBDC_CLOSE_DROP);
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
	nbdc_export_finish_all(c, fail, err);
	nbdc_conn_unref(conn);
	nbdc_export_kick(c);
	nbdc_export_unref(c);
}

static void conn_done(struct nbdc_conn *conn, void *data, struct nbdc_req *req, int err)
{
	Nbdc *c = data;

	if (err == -ESHUTDOWN && c->cfg.reconnect && !req->internal &&
	    !g_atomic_int_get(&c->closing)) {
		/* The server is going away: the request waits for its successor. */
		g_clear_pointer(&req->log, g_free);
		nbdc_req_reset(req);
		g_mutex_lock(&c->lock);
		nbdc_park_locked(c, req);
		g_mutex_unlock(&c->lock);
		nbdc_export_kick(c);
		return;
	}

	/* What the next flush has to cover: a write, zero or trim of the
	 * user's acknowledged, or a flush (ours too) that covered them. */
	gboolean wrote = err == 0 && !req->internal && changes_data(req);
	gboolean flushed = err == 0 && req->type == NBD_CMD_FLUSH;
	/* The log: a write joins it when acknowledged, a flush (ours too)
	 * trims what it covers. */
	gboolean logged =
		c->log_on && (req->type == NBD_CMD_FLUSH ||
			      (!req->internal && (req->log || (req->type == NBD_CMD_WRITE_ZEROES &&
							       !(req->flags & NBD_CMD_FLAG_FUA)))));
	if (wrote || flushed || logged) {
		struct nbdc_req *flush = NULL;

		g_mutex_lock(&c->lock);
		if (wrote)
			c->write_gen++;
		else if (flushed && req->flush_gen > c->flushed_gen)
			c->flushed_gen = req->flush_gen;
		if (logged) {
			if (err == 0 && req->type == NBD_CMD_FLUSH) {
				nbdc_log_trim(c, req->flush_seq);
			} else if (err == 0 && req->log) {
				nbdc_log_append(c, g_steal_pointer(&req->log));
			} else if (err == 0 && req->type == NBD_CMD_WRITE_ZEROES) {
				struct nbdc_log_entry *e = g_new0(struct nbdc_log_entry, 1);

				e->offset = req->offset;
				e->len = req->len;
				e->type = NBD_CMD_WRITE_ZEROES;
				e->flags = req->flags;
				nbdc_log_append(c, e);
			}
			if (c->log_bytes >= NBDC_LOG_FLUSH_AT ||
			    c->log_entries >= NBDC_LOG_FLUSH_ENTRIES)
				flush = nbdc_early_flush_locked(c);
		}
		g_mutex_unlock(&c->lock);
		g_clear_pointer(&req->log, g_free);
		if (flush)
			nbdc_export_submit(c, flush);
	}
	if (req->internal) {
		req->complete(req, err);
		return;
	}
	nbdc_export_finish(c, req, err);
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
