/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* stop.c: the bounded stop (SPEC §7).
 *
 * On SIGTERM, SIGINT or unmount, the requests in flight and the final
 * flush of every export run in parallel and together get at most `timeout`
 * seconds.  The main thread waits here, on fs->stop_cond, which every
 * completion that changes a watched count broadcasts while fs->stopping is
 * set (data.c).  An export's final flush starts once none of its requests
 * is in flight (so it covers them), and only if it has writes no flush has
 * covered yet: an export that only read needs nothing from its server, so a
 * dead server costs it nothing.  A flush that succeeds while new writes
 * arrived (files still open after a lazy unmount) is followed by another.
 * At the deadline whatever is left is given up: every export is
 * disconnected, which fails the requests still waiting with EIO, and each
 * export whose data may not be on its server is named in the log.
 */
#include "config.h"

#include <errno.h>

#include "fs-internal.h"

/* After giving up: how long the abandoned requests get to be answered. */
#define GIVE_UP_GRACE_US (2 * G_USEC_PER_SEC)
/* The least time the stop gives the final flushes (with timeout=0). */
#define STOP_MIN_S 1u

struct final {
	Fs *fs;
	struct fs_export *ex;
};

static void final_done(void *opaque, int err)
{
	struct final *f = opaque;
	Fs *fs = f->fs;
	struct fs_export *ex = f->ex;
	g_mutex_lock(&fs->stop_lock);
	ex->final_running = FALSE;
	if (err < 0) {
		ex->final_failed = TRUE;
		g_free(ex->final_error);
		ex->final_error = g_strdup_printf("the final flush failed: %s", g_strerror(-err));
	}
	g_cond_broadcast(&fs->stop_cond);
	g_mutex_unlock(&fs->stop_lock);
	g_free(f);
	fs_inflight_end(fs, NULL);
}

static gboolean dirty(struct fs_export *ex)
{
	return g_atomic_int_get(&ex->write_gen) != g_atomic_int_get(&ex->clean_gen);
}

/* Under stop_lock: starts the final flushes that are due (into @start, to
 * run after unlocking); TRUE while anything is still to wait for. */
static gboolean pending_locked(Fs *fs, GPtrArray *start)
{
	gboolean busy = g_atomic_int_get(&fs->inflight) > 0;
	for (guint i = 0; i < fs->export_data->len; i++) {
		struct fs_export *ex = fs->export_data->pdata[i];
		if (ex->final_running) {
			busy = TRUE;
			continue;
		}
		if (ex->final_failed || !dirty(ex))
			continue;
		busy = TRUE;
		if (g_atomic_int_get(&ex->inflight) == 0) {
			ex->final_running = TRUE;
			g_ptr_array_add(start, ex);
		}
	}
	return busy;
}

gboolean fs_stop(Fs *fs, guint timeout_s)
{
	gint64 t0 = g_get_monotonic_time();
	/* timeout=0 means "do not wait for an unreachable server": a server
	 * that answers still gets a moment for its final flush. */
	guint bound_s = MAX(timeout_s, STOP_MIN_S);
	gint64 deadline = t0 + (gint64)bound_s * G_USEC_PER_SEC;
	gboolean gave_up = FALSE;
	g_autoptr(GPtrArray) start = g_ptr_array_new();

	g_atomic_int_set(&fs->stopping, 1);
	g_mutex_lock(&fs->stop_lock);
	for (;;) {
		g_ptr_array_set_size(start, 0);
		gboolean busy = pending_locked(fs, start);
		if (start->len > 0) {
			g_mutex_unlock(&fs->stop_lock);
			for (guint i = 0; i < start->len; i++) {
				struct final *f = g_new(struct final, 1);
				f->fs = fs;
				f->ex = start->pdata[i];
				fs_inflight_begin(fs, NULL);
				fs_export_flush(fs, f->ex, final_done, f);
			}
			g_mutex_lock(&fs->stop_lock);
			continue;
		}
		if (!busy)
			break;
		if (!g_cond_wait_until(&fs->stop_cond, &fs->stop_lock, deadline)) {
			g_ptr_array_set_size(start, 0);
			gave_up = pending_locked(fs, start);
			/* A flush picked just now will not be waited for: it is
			 * abandoned with the rest below. */
			for (guint i = 0; i < start->len; i++)
				((struct fs_export *)start->pdata[i])->final_running = FALSE;
			break;
		}
	}
	g_mutex_unlock(&fs->stop_lock);

	/* What is on the server now, and what is not. */
	gboolean ok = TRUE;
	int inflight = g_atomic_int_get(&fs->inflight);
	for (guint i = 0; i < fs->export_data->len; i++) {
		struct fs_export *ex = fs->export_data->pdata[i];
		struct blockdev_health h;
		blockdev_get_health(ex->root, &h);
		g_mutex_lock(&fs->stop_lock);
		const char *why = ex->final_error;
		g_autofree char *late = NULL;
		if (!why &&
		    (dirty(ex) || ex->final_running || g_atomic_int_get(&ex->inflight) > 0)) {
			late = g_strdup_printf("not flushed within the timeout (%us)", bound_s);
			why = late;
		}
		if (!why && h.lost_writes_seq != ex->lost_seq)
			why = "the server lost acknowledged writes before a flush";
		if (why) {
			g_warning("%s (%s): data may not be on the server: %s", ex->name,
				  ex->source, why);
			ok = FALSE;
		}
		g_mutex_unlock(&fs->stop_lock);
	}
	if (gave_up)
		g_warning("stopping: gave up after %us with %d request%s in flight", bound_s,
			  inflight, inflight == 1 ? "" : "s");

	/* Disconnect (NBD_CMD_DISC); what still waits fails at once. */
	for (guint i = 0; i < fs->export_data->len; i++) {
		struct fs_export *ex = fs->export_data->pdata[i];
		blockdev_disconnect(ex->root);
	}
	if (gave_up) {
		gint64 grace = g_get_monotonic_time() + GIVE_UP_GRACE_US;
		g_mutex_lock(&fs->stop_lock);
		while (g_atomic_int_get(&fs->inflight) > 0 &&
		       g_cond_wait_until(&fs->stop_cond, &fs->stop_lock, grace))
			;
		g_mutex_unlock(&fs->stop_lock);
	}
	g_debug("stopped in %" G_GINT64_FORMAT " ms", (g_get_monotonic_time() - t0) / 1000);
	return ok;
}
