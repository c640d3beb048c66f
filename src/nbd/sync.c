/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* sync.c: making handles (connect, open), their use and teardown, and the
 * blocking wrappers (which must not run on a loop). */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define DISCONNECT_WAIT_US (5 * G_USEC_PER_SEC)
#define MAX_CONNECTIONS 16u
#define DEFAULT_CONNECTIONS 4u

/* ---- making handles ---- */

static gboolean export_connect(Nbdc *c, GError **error);

static void set_max_request(Nbdc *c)
{
	uint32_t mr = NBD_DEFAULT_MAX_REQUEST;

	if (c->neg.block_max && c->neg.block_max < mr)
		mr = c->neg.block_max;
	if (c->neg.block_min > 1)
		mr -= mr % c->neg.block_min;
	c->max_request = mr;
}

/* How many connections @c may have: what was asked, where the server
 * allows multi-conn; a warning when it does not. */
static void set_max_conns(Nbdc *c)
{
	guint want = c->cfg.connections;
	gboolean mc = (c->neg.eflags & NBD_FLAG_CAN_MULTI_CONN) != 0;

	if (want == 0)
		want = mc ? DEFAULT_CONNECTIONS : 1;
	if (want > MAX_CONNECTIONS) {
		nbdc_log(&c->cfg, NBDC_LOG_WARNING, "%s: %u connections asked, using %u",
			 c->display, want, MAX_CONNECTIONS);
		want = MAX_CONNECTIONS;
	}
	if (want > 1 && !mc) {
		if (c->cfg.connections > 1)
			nbdc_log(&c->cfg, NBDC_LOG_WARNING,
				 "%s: server does not allow multi-conn: using 1 connection, not %u",
				 c->display, c->cfg.connections);
		want = 1;
	}
	if (want > 1 && c->had_fd) {
		if (c->cfg.connections > 1)
			nbdc_log(&c->cfg, NBDC_LOG_WARNING,
				 "%s: a single fd gives a single connection", c->display);
		want = 1;
	}
	c->max_conns = want;
}

static void set_log(Nbdc *c)
{
	c->log_on = c->cfg.reconnect && c->cfg.replay && (c->neg.eflags & NBD_FLAG_SEND_FLUSH) &&
		    !(c->neg.eflags & NBD_FLAG_READ_ONLY);
}

Nbdc *nbdc_connect(const struct nbdc_config *cfg, GError **error)
{
	Nbdc *c = nbdc_export_new(cfg, FALSE, nbdc_export_run, error);

	if (!c)
		return NULL;
	if (!export_connect(c, error)) {
		nbdc_free(c);
		return NULL;
	}
	return c;
}

Nbdc *nbdc_open(const struct nbdc_config *cfg, const struct nbdc_export *known, GError **error)
{
	if (!known || !known->has_info) {
		g_set_error(error, NBDC_ERROR, NBDC_ERROR_INVALID,
			    "nbdc_open: the export was not described (no NBD_OPT_INFO)");
		return NULL;
	}
	Nbdc *c = nbdc_export_new(cfg, TRUE, nbdc_export_run, error);
	if (!c)
		return NULL;
	c->neg.size = known->size;
	c->neg.eflags = known->eflags;
	c->neg.block_min = known->block_min;
	c->neg.block_pref = known->block_pref;
	c->neg.block_max = known->block_max;
	c->neg.name = g_strdup(known->canonical_name ? known->canonical_name
			       : cfg->export_name    ? cfg->export_name
						     : "");
	c->neg.description = g_strdup(known->description ? known->description : "");
	c->neg.protocol = "newstyle-fixed";
	c->neg.tls = cfg->tls;
	set_max_request(c);
	set_max_conns(c);
	set_log(c);
	return c;
}

void nbdc_hold(Nbdc *c, gboolean held)
{
	nbdc_export_hold(c, held);
}

void nbdc_get_health(Nbdc *c, struct nbdc_health *out)
{
	nbdc_export_health(c, out);
}

/* ---- eager connections (nbdc_connect) ---- */

/* nbdc_connect: opens the connections now and waits for them (bounded). */
static gboolean export_connect(Nbdc *c, GError **error)
{
	struct completion *w;
	struct nbdc_conn *conn;
	gint64 bound = c->cfg.handshake_timeout_ms
			       ? (gint64)c->cfg.handshake_timeout_ms * 1000 + G_USEC_PER_SEC
			       : G_MAXINT64 / 2;

	g_assert(loop_current() == NULL);
	g_mutex_lock(&c->lock);
	c->connecting_sync = TRUE;
	c->state = NBDC_EX_CONNECTING;
	c->sync_waiting = 1;
	c->sync_wait = completion_new(); /* the outcomes' reference; w the waiter's */
	w = c->sync_wait;
	conn = nbdc_export_new_conn_locked(c, c->home);
	g_mutex_unlock(&c->lock);
	nbdc_conn_start(conn);
	nbdc_conn_unref(conn);
	completion_wait_until(w, g_get_monotonic_time() + bound, NULL);
	completion_unref(w);

	g_mutex_lock(&c->lock);
	if (c->nready == 0) {
		if (c->sync_error)
			g_propagate_error(error, g_steal_pointer(&c->sync_error));
		else
			g_set_error(error, NBDC_ERROR, NBDC_ERROR_TIMEOUT,
				    "%s: handshake timed out", c->display);
		c->connecting_sync = FALSE;
		g_mutex_unlock(&c->lock);
		return FALSE;
	}
	set_max_request(c);
	set_max_conns(c);
	set_log(c);
	/* The extra multi-conn connections, all at once. */
	guint extra = c->max_conns > 1 ? c->max_conns - 1 : 0;
	GPtrArray *more = g_ptr_array_new();
	if (extra) {
		c->sync_waiting = extra;
		c->sync_wait = completion_new();
		w = c->sync_wait;
		for (guint i = 0; i < extra; i++)
			g_ptr_array_add(more,
					nbdc_export_new_conn_locked(c, loop_set_pick(c->loops)));
	}
	g_mutex_unlock(&c->lock);
	for (guint i = 0; i < more->len; i++) {
		nbdc_conn_start(more->pdata[i]);
		nbdc_conn_unref(more->pdata[i]);
	}
	if (extra) {
		completion_wait_until(w, g_get_monotonic_time() + bound, NULL);
		completion_unref(w);
	}
	g_ptr_array_free(more, TRUE);
	g_mutex_lock(&c->lock);
	c->connecting_sync = FALSE;
	g_clear_error(&c->sync_error);
	g_mutex_unlock(&c->lock);
	return TRUE;
}

/* ---- teardown ---- */

/* Closes @c, which from now on reports "disconnected" unless it failed
 * before. */
static void close_disconnected(Nbdc *c, gint64 wait_us)
{
	if (!c)
		return;
	g_autofree char *why = g_strdup_printf("%s: disconnected", c->display);
	g_mutex_lock(&c->lock);
	if (!c->error)
		c->error = g_steal_pointer(&why);
	g_mutex_unlock(&c->lock);
	nbdc_export_close(c, wait_us);
}

void nbdc_disconnect(Nbdc *c)
{
	close_disconnected(c, loop_current() ? 0 : DISCONNECT_WAIT_US);
}

void nbdc_abandon(Nbdc *c)
{
	close_disconnected(c, 0);
}

void nbdc_free(Nbdc *c)
{
	if (!c)
		return;
	nbdc_disconnect(c);
	nbdc_op_cache_close(c);
	if (loop_current() == NULL)
		nbdc_export_wait_gone(c);
	nbdc_export_unref(c);
}

/* ---- blocking wrappers ---- */

static int wait_result(struct completion *w, int r)
{
	if (r == 0)
		r = (int)completion_wait(w);
	else
		completion_unref(w); /* the callback's reference: it never runs */
	completion_unref(w);
	return r;
}

int nbdc_pread(Nbdc *c, void *buf, size_t count, uint64_t offset, uint32_t flags)
{
	struct iovec v = { buf, count };
	struct completion *w = completion_new();

	return wait_result(w, nbdc_aio_preadv(c, &v, 1, offset, flags, completion_done, w));
}

int nbdc_pwrite(Nbdc *c, const void *buf, size_t count, uint64_t offset, uint32_t flags)
{
	struct iovec v = { (void *)buf, count };
	struct completion *w = completion_new();

	return wait_result(w, nbdc_aio_pwritev(c, &v, 1, offset, flags, completion_done, w));
}

int nbdc_flush(Nbdc *c)
{
	struct completion *w = completion_new();

	return wait_result(w, nbdc_aio_flush(c, completion_done, w));
}

int nbdc_trim(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags)
{
	struct completion *w = completion_new();

	return wait_result(w, nbdc_aio_trim(c, count, offset, flags, completion_done, w));
}

int nbdc_zero(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags)
{
	struct completion *w = completion_new();

	return wait_result(w, nbdc_aio_zero(c, count, offset, flags, completion_done, w));
}

/* The aio call has one opaque for both callbacks: the extents go through
 * this forwarder to the caller's. */
struct sync_bs {
	nbdc_extent_fn extent;
	void *opaque;
	struct completion *w;
};

static void sync_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct sync_bs *b = opaque;

	if (b->extent)
		b->extent(b->opaque, offset, length, flags);
}

static void sync_bs_done(void *opaque, int err)
{
	struct sync_bs *b = opaque;

	completion_done(b->w, err);
}

int nbdc_block_status(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags,
		      nbdc_extent_fn extent, void *opaque)
{
	struct sync_bs b = { extent, opaque, completion_new() };

	return wait_result(
		b.w, nbdc_aio_block_status(c, count, offset, flags, sync_extent, sync_bs_done, &b));
}
