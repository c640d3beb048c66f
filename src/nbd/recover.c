/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* recover.c: an export's state machine on its home loop: first connection,
 * loss and reconnection with backoff, expiry of waiting requests, the idle
 * close, use and health, and closing (see the design comment in export.c). */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

static void timer_fired(void *opaque);

/* Under c->lock: requests parked longer than the timeout, unlinked. */
static struct nbdc_req *expire_locked(Nbdc *c, gint64 now, gboolean all)
{
	gint64 tmo = (gint64)c->cfg.reconnect_timeout_ms * 1000;
	struct nbdc_req *head = NULL, *tail = NULL;

	for (struct nbdc_req *r = c->parked_head, *next; r; r = next) {
		next = r->next;
		if (!all && r->wait_since_us + tmo > now)
			continue;
		nbdc_req_unlink(&c->parked_head, &c->parked_tail, r);
		c->nparked--;
		nbdc_req_append(&head, &tail, r);
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

/* Home loop: one look at the export; does what its state asks.  @kicked:
 * this is the task nbdc_export_kick posted (the kick may be posted again). */
static void export_run(Nbdc *c, gboolean kicked)
{
	struct nbdc_req *expired = NULL, *release = NULL, *throttled = NULL, *flush = NULL;
	struct nbdc_conn *start = NULL;
	GPtrArray *close = NULL;
	gint64 now = g_get_monotonic_time();
	gboolean need_replay = FALSE, look_again = FALSE;
	int expired_err = -EIO;

	g_mutex_lock(&c->lock);
	if (kicked)
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
			c->backoff_us = NBDC_BACKOFF_MIN_US;
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
		if (c->starved)
			expired = expire_locked(c, now, TRUE);
		else if (c->cfg.reconnect && (c->attempts > 0 || c->state == NBDC_EX_RECOVERING))
			expired = expire_locked(c, now, FALSE);
		else if (!c->cfg.reconnect && c->attempts > 0)
			expired = expire_locked(c, now, TRUE);
		c->starved = FALSE;
		if (c->state == NBDC_EX_RECOVERING && c->log_head && !c->replaying &&
		    now >= c->lost_at + tmo && c->nready == 0) {
			nbdc_log_lose(c, "the server stayed away");
			c->replay_owed = FALSE;
		}
		if (c->nready > 0) {
			need_replay =
				c->state == NBDC_EX_RECOVERING && c->replay_owed && c->log_head;
			if (!need_replay) {
				c->state = NBDC_EX_READY;
				release = c->parked_head;
				c->parked_head = c->parked_tail = NULL;
				c->nparked = 0;
			}
		} else if (!attempting && c->conns->len == 0) {
			gboolean keep_trying = c->nparked > 0 || c->throttled_head || c->log_head ||
					       (c->state == NBDC_EX_RECOVERING &&
						now < c->lost_at + tmo && c->holds > 0) ||
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
	} else if (c->state == NBDC_EX_READY && c->nparked > 0 && nbdc_has_usable_locked(c)) {
		release = c->parked_head;
		c->parked_head = c->parked_tail = NULL;
		c->nparked = 0;
	} else if (c->state == NBDC_EX_READY && c->nready == 0 && c->nopening == 0 &&
		   c->conns->len == 0) {
		/* Every connection closed while idle; requests that came back
		 * from a closed one connect again (the IDLE step, next look). */
		c->state = NBDC_EX_IDLE;
		look_again = c->nparked > 0;
	}

	/* Throttled writes go when the log has room again. */
	if (c->throttled_head && (c->log_bytes < NBDC_LOG_MAX || !c->log_on)) {
		throttled = c->throttled_head;
		c->throttled_head = c->throttled_tail = NULL;
	} else if (c->throttled_head && c->state == NBDC_EX_READY) {
		flush = nbdc_early_flush_locked(c);
	}

	/* Idle: nothing held, nothing in flight: close after idle_timeout. */
	if (c->lazy && c->cfg.idle_timeout_ms && c->state == NBDC_EX_READY && c->holds == 0 &&
	    g_atomic_int_get(&c->in_flight) == 0 && c->nparked == 0 && c->conns->len > 0) {
		if (c->log_head && !c->log_flushing) {
			flush = flush ? flush : nbdc_early_flush_locked(c);
		} else if (!c->log_head && c->idle_fired) {
			close = g_ptr_array_new();
			for (guint i = 0; i < c->conns->len; i++)
				g_ptr_array_add(close, nbdc_conn_ref(c->conns->pdata[i]));
			nbdc_log(&c->cfg, NBDC_LOG_DEBUG, "%s: idle: closing %u connection%s",
				 c->display, c->conns->len, c->conns->len == 1 ? "" : "s");
		} else if (!loop_timer_armed(&c->idle_timer)) {
			loop_timer_start(c->home, &c->idle_timer,
					 now + (gint64)c->cfg.idle_timeout_ms * 1000, timer_fired,
					 c);
		}
	} else {
		loop_timer_stop(&c->idle_timer);
	}
	c->idle_fired = FALSE;

	/* Parked requests expire once an attempt failed (the first connection
	 * of a lazy handle is always given its attempt) or after a loss. */
	gboolean can_expire = c->cfg.reconnect && c->state != NBDC_EX_READY &&
			      (c->attempts > 0 || c->state == NBDC_EX_RECOVERING);
	gint64 expiry = can_expire ? next_expiry_locked(c) : 0;
	if (expiry)
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
			nbdc_conn_close(close->pdata[i], NBDC_CLOSE_GRACEFUL);
			nbdc_conn_unref(close->pdata[i]);
		}
		g_ptr_array_free(close, TRUE);
	}
	if ((need_replay && !nbdc_replay_step(c)) || look_again)
		nbdc_export_kick(c); /* e.g. replay finished: release the parked requests */
	if (flush)
		nbdc_export_submit(c, flush);
	nbdc_export_finish_all(c, expired, expired_err);
	/* Parked and throttled requests go out again, in order. */
	for (struct nbdc_req *list = release; list;) {
		struct nbdc_req *next = list->next;

		list->next = list->prev = NULL;
		nbdc_export_resubmit(c, list);
		list = next;
	}
	for (struct nbdc_req *list = throttled; list;) {
		struct nbdc_req *next = list->next;

		list->next = list->prev = NULL;
		if (g_atomic_int_get(&c->closing)) {
			nbdc_export_finish(c, list, -ENOTCONN);
		} else {
			nbdc_export_resubmit(c, list);
		}
		list = next;
	}
}

void nbdc_export_run(void *opaque)
{
	Nbdc *c = opaque;

	export_run(c, TRUE);
	nbdc_export_unref(c);
}

static void timer_fired(void *opaque)
{
	Nbdc *c = opaque;

	g_mutex_lock(&c->lock);
	if (!loop_timer_armed(&c->idle_timer) && c->state == NBDC_EX_READY)
		c->idle_fired = TRUE;
	g_mutex_unlock(&c->lock);
	/* Not the kick's task, which may be queued: kick_posted stays (a kick
	 * posting its task again while queued would corrupt the loop's list). */
	nbdc_export_ref(c);
	export_run(c, FALSE);
	nbdc_export_unref(c);
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
		nbdc_export_kick(c);
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
	 * fails with -ENOTCONN; idle connections say goodbye (each decides on
	 * its own loop, so one stuck request does not cost the others their
	 * NBD_CMD_DISC). */
	enum nbdc_close_how how =
		g_atomic_int_get(&c->in_flight) == 0 ? NBDC_CLOSE_GRACEFUL : NBDC_CLOSE_ABANDON;
	g_mutex_unlock(&c->lock);
	for (guint i = 0; i < conns->len; i++) {
		nbdc_conn_close(conns->pdata[i], how);
		nbdc_conn_unref(conns->pdata[i]);
	}
	g_ptr_array_free(conns, TRUE);
	export_run(c, FALSE); /* fails what is parked or throttled */
	nbdc_export_unref(c);
}

void nbdc_export_close(Nbdc *c, gint64 wait_us)
{
	struct completion *drained = NULL;

	g_mutex_lock(&c->lock);
	if (g_atomic_int_get(&c->closing)) {
		/* Closing already; giving up now ends another caller's wait for
		 * the requests in flight (it then closes, as it would have). */
		struct completion *d = wait_us == 0 ? g_steal_pointer(&c->drained) : NULL;

		g_mutex_unlock(&c->lock);
		if (d)
			completion_done(d, 0);
		return;
	}
	if (wait_us > 0 && loop_current() == NULL && g_atomic_int_get(&c->in_flight) > 0) {
		c->drained = completion_new(); /* the last request's reference; ours */
		drained = c->drained;
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
	completion_wait_until(w, g_get_monotonic_time() + NBDC_GONE_WAIT_US, NULL);
	completion_unref(w);
}
