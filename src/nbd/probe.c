/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* probe.c: control connections: listing exports and describing many of them
 * (NBD_OPT_LIST, NBD_OPT_INFO) before any data connection exists.
 *
 * A probe hands names to up to @parallel control connections at once, each
 * asking NBD_OPT_INFO for the next name until INFOS_PER_CONN (servers cap the
 * options of one connection: nbdkit allows 32), then saying ABORT; another
 * connection takes over while names remain.  A connection that dies after
 * progress gives its current name back (at most MAX_TRIES times); one that
 * fails before anything was learnt fails the whole probe, as a start-up
 * error should.  Servers that cannot describe an export without connecting
 * to it (no NBD_OPT_INFO, oldstyle) get NBDC_ERROR_UNSUPPORTED per export.
 * The connections run on the loops; the caller waits.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "internal.h"
#include "wire.h"

#define INFOS_PER_CONN 28
#define MAX_TRIES 3
#define DEFAULT_PARALLEL 16u

struct probe {
	struct nbdc_config cfg; /* export_name NULL: a control connection */
	LoopSet *loops;
	struct nbdc_tls_ctx *tls; /* ref, or NULL */
	char *display;
	GMutex lock;	    /* everything below */
	GPtrArray *results; /* struct nbdc_export *, one per name */
	guint next;	    /* next name to hand out */
	guint *tries;	    /* per name */
	GQueue again;	    /* indexes given back by a dead connection */
	guint active, parallel;
	guint learnt; /* results received */
	GError *fatal;
	gboolean unsupported; /* the server cannot INFO */
	struct completion *done;
	/* --list */
	gboolean list_mode, details;
	GPtrArray *list;
};

/* One control connection's view. */
struct pconn {
	struct probe *p;
	guint asked;  /* INFOs asked on this connection */
	gint current; /* index in flight, or -1 */
	gboolean progress;
};

static const struct nbdc_conn_owner probe_owner;

/* Under p->lock: the next name index to ask about, or -1. */
static gint take_index_locked(struct probe *p)
{
	if (p->fatal || p->unsupported)
		return -1;
	if (!g_queue_is_empty(&p->again))
		return GPOINTER_TO_INT(g_queue_pop_head(&p->again));
	if (p->next < p->results->len)
		return (gint)p->next++;
	return -1;
}

static const char *probe_next(void *opaque)
{
	struct pconn *pc = opaque;
	struct probe *p = pc->p;
	const char *name = NULL;

	if (pc->asked >= INFOS_PER_CONN)
		return NULL;
	g_mutex_lock(&p->lock);
	gint i = take_index_locked(p);
	if (i >= 0) {
		struct nbdc_export *e = p->results->pdata[i];

		pc->current = i;
		pc->asked++;
		p->tries[i]++;
		name = e->name;
	}
	g_mutex_unlock(&p->lock);
	return name;
}

static void probe_result(void *opaque, const char *name, const struct nbdc_export *e,
			 const GError *err)
{
	struct pconn *pc = opaque;
	struct probe *p = pc->p;

	g_mutex_lock(&p->lock);
	struct nbdc_export *r = p->results->pdata[pc->current];
	if (e) {
		r->has_info = TRUE;
		r->size = e->size;
		r->eflags = e->eflags;
		r->read_only = e->read_only;
		r->block_min = e->block_min;
		r->block_pref = e->block_pref;
		r->block_max = e->block_max;
		g_free(r->canonical_name);
		r->canonical_name = g_strdup(e->canonical_name);
		if (e->description && e->description[0] && !r->description[0]) {
			g_free(r->description);
			r->description = g_strdup(e->description);
		}
	} else {
		g_clear_error(&r->error);
		r->error = g_error_copy(err);
		if (g_error_matches(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED))
			p->unsupported = TRUE;
	}
	p->learnt++;
	pc->progress = TRUE;
	pc->current = -1;
	g_mutex_unlock(&p->lock);
}

static void start_conn_locked(struct probe *p, GPtrArray *start)
{
	struct pconn *pc = g_new0(struct pconn, 1);
	struct nbdc_hs_goal goal = { .probe_next = probe_next,
				     .probe_result = probe_result,
				     .opaque = pc };

	pc->p = p;
	pc->current = -1;
	p->active++;
	g_ptr_array_add(start, nbdc_conn_new(loop_set_pick(p->loops), &p->cfg, p->tls, &goal,
					     &probe_owner, pc, -1));
}

static gboolean names_left_locked(struct probe *p)
{
	return !p->fatal && !p->unsupported &&
	       (p->next < p->results->len || !g_queue_is_empty(&p->again));
}

static void probe_finished(struct nbdc_conn *conn, void *data, GError *err)
{
	struct pconn *pc = data;
	struct probe *p = pc->p;
	GPtrArray *start = g_ptr_array_new();

	g_mutex_lock(&p->lock);
	p->active--;
	if (p->list_mode) {
		if (err)
			p->fatal = g_error_copy(err);
		else
			p->list = nbdc_hs_take_list(conn->hs);
	} else if (err) {
		gboolean unsup = g_error_matches(err, NBDC_ERROR, NBDC_ERROR_UNSUPPORTED);

		if (unsup) {
			p->unsupported = TRUE;
			if (!p->fatal)
				p->fatal = g_error_copy(err); /* per export, below */
		} else if (p->learnt == 0 && !pc->progress) {
			if (!p->fatal)
				p->fatal = g_error_copy(err);
		}
		if (pc->current >= 0) {
			if (p->tries[pc->current] < MAX_TRIES && !p->fatal) {
				g_queue_push_tail(&p->again, GINT_TO_POINTER(pc->current));
			} else {
				struct nbdc_export *r = p->results->pdata[pc->current];

				g_clear_error(&r->error);
				r->error = g_error_copy(err);
			}
		}
	}
	while (!p->list_mode && names_left_locked(p) && p->active < p->parallel)
		start_conn_locked(p, start);
	gboolean all_done = p->active == 0 && start->len == 0;
	g_mutex_unlock(&p->lock);
	if (err)
		g_error_free(err);
	g_free(pc);
	nbdc_conn_unref(conn);
	/* Each keeps the reference nbdc_conn_new gave: probe_finished drops it. */
	for (guint i = 0; i < start->len; i++)
		nbdc_conn_start(start->pdata[i]);
	g_ptr_array_free(start, TRUE);
	if (all_done)
		completion_done(p->done, 0);
}

static void probe_ready(struct nbdc_conn *conn, void *data)
{
	g_assert_not_reached(); /* control connections never GO */
}

static void probe_lost(struct nbdc_conn *conn, void *data, struct nbdc_req *reqs, int err,
		       const char *msg)
{
	g_assert_not_reached();
}

static void probe_done(struct nbdc_conn *conn, void *data, struct nbdc_req *req, int err)
{
	g_assert_not_reached();
}

static const struct nbdc_conn_owner probe_owner = {
	.ready = probe_ready,
	.finished = probe_finished,
	.lost = probe_lost,
	.done = probe_done,
};

static struct probe *probe_new(const struct nbdc_config *cfg, GError **error)
{
	struct probe *p = g_new0(struct probe, 1);

	p->cfg = *cfg;
	p->cfg.export_name = NULL;
	p->loops = nbdc_cfg_loops(cfg);
	p->display = nbdc_cfg_display(&p->cfg);
	g_mutex_init(&p->lock);
	g_queue_init(&p->again);
	p->results = g_ptr_array_new_with_free_func(nbdc_export_free);
	if (cfg->tls) {
		p->tls = nbdc_tls_ctx_new(cfg, p->display, error);
		if (!p->tls) {
			g_ptr_array_unref(p->results);
			g_free(p->display);
			g_mutex_clear(&p->lock);
			g_free(p);
			return NULL;
		}
	}
	return p;
}

static void probe_free(struct probe *p)
{
	g_clear_error(&p->fatal);
	if (p->results)
		g_ptr_array_unref(p->results);
	if (p->list)
		g_ptr_array_unref(p->list);
	g_queue_clear(&p->again);
	nbdc_tls_ctx_unref(p->tls);
	g_free(p->tries);
	g_free(p->display);
	g_mutex_clear(&p->lock);
	g_free(p);
}

/* Runs control connections until the probe is over. */
static void probe_run(struct probe *p, guint first)
{
	GPtrArray *start = g_ptr_array_new();

	g_assert(loop_current() == NULL);
	p->done = completion_new();
	g_mutex_lock(&p->lock);
	for (guint i = 0; i < first; i++)
		start_conn_locked(p, start);
	g_mutex_unlock(&p->lock);
	for (guint i = 0; i < start->len; i++)
		nbdc_conn_start(start->pdata[i]);
	g_ptr_array_free(start, TRUE);
	/* Every connection is bounded by the handshake timeout; the probe ends
	 * when the last one does. */
	completion_wait(p->done);
	completion_unref(p->done);
}

/* A list-mode probe: one connection, LIST (+ INFO each). */
static void start_list_locked(struct probe *p, GPtrArray *start)
{
	struct pconn *pc = g_new0(struct pconn, 1);
	struct nbdc_hs_goal goal = { .list = TRUE, .list_details = p->details, .opaque = pc };

	pc->p = p;
	pc->current = -1;
	p->active++;
	g_ptr_array_add(start, nbdc_conn_new(loop_set_pick(p->loops), &p->cfg, p->tls, &goal,
					     &probe_owner, pc, p->cfg.fd));
}

GPtrArray *nbdc_list_exports(const struct nbdc_config *cfg, gboolean details, GError **error)
{
	struct probe *p = probe_new(cfg, error);
	GPtrArray *start = g_ptr_array_new();

	if (!p)
		return NULL;
	p->list_mode = TRUE;
	p->details = details;
	p->done = completion_new();
	g_mutex_lock(&p->lock);
	start_list_locked(p, start);
	g_mutex_unlock(&p->lock);
	nbdc_conn_start(start->pdata[0]);
	g_ptr_array_free(start, TRUE);
	completion_wait(p->done);
	completion_unref(p->done);
	GPtrArray *list = NULL;
	if (p->fatal)
		g_propagate_error(error, g_steal_pointer(&p->fatal));
	else
		list = g_steal_pointer(&p->list);
	probe_free(p);
	return list;
}

GPtrArray *nbdc_probe_exports(const struct nbdc_config *cfg, const char *const *names, guint n,
			      gboolean all, guint parallel, GError **error)
{
	g_autoptr(GPtrArray) listed = NULL;

	if (all) {
		listed = nbdc_list_exports(cfg, FALSE, error);
		if (!listed)
			return NULL;
	}
	struct probe *p = probe_new(cfg, error);
	if (!p)
		return NULL;
	guint count = all ? listed->len : n;
	for (guint i = 0; i < count; i++) {
		struct nbdc_export *e = g_new0(struct nbdc_export, 1);

		if (all) {
			struct nbdc_export *l = listed->pdata[i];

			e->name = g_strdup(l->name);
			e->description = g_strdup(l->description);
		} else {
			e->name = g_strdup(names[i] ? names[i] : "");
			e->description = g_strdup("");
		}
		g_ptr_array_add(p->results, e);
	}
	p->tries = g_new0(guint, MAX(count, 1u));
	p->parallel = parallel ? parallel : DEFAULT_PARALLEL;
	guint first = MIN(p->parallel, (count + INFOS_PER_CONN - 1) / INFOS_PER_CONN);
	if (count > 0)
		probe_run(p, MAX(first, 1u));
	if (p->fatal && !p->unsupported) {
		g_propagate_error(error, g_steal_pointer(&p->fatal));
		probe_free(p);
		return NULL;
	}
	/* Every export not described gets the reason. */
	for (guint i = 0; i < p->results->len; i++) {
		struct nbdc_export *e = p->results->pdata[i];

		if (!e->has_info && !e->error)
			e->error = p->unsupported && p->fatal
					   ? g_error_copy(p->fatal)
					   : g_error_new(
						     NBDC_ERROR, NBDC_ERROR_UNSUPPORTED,
						     "%s: export '%s': not described by the server",
						     p->display, e->name);
	}
	GPtrArray *r = g_steal_pointer(&p->results);
	probe_free(p);
	return r;
}
