/* sector-lock.c: the root device's table of in-flight writes by sector range,
 * which keeps a read-modify-write of an edge sector apart from every other
 * write touching that sector.
 *
 * Design: one mutex per root guards two intrusive queues, `active` (granted
 * entries) and `waiting` (FIFO).  Entries conflict only through exclusive
 * (RMW) sectors, so plain aligned writes take the fast path: when no
 * exclusive entry is active and nothing waits, acquire is one short mutex
 * hold and a list append.  Nobody blocks: a conflicting entry is queued and
 * granted by the release that clears its last conflict; the granted
 * callbacks run on the releasing thread after the mutex is dropped.
 */
#include "config.h"

#include "blockdev-impl.h"

struct sector_locks {
	GMutex mu;
	GQueue active;
	GQueue waiting;
	guint active_excl; /* active entries with exclusive sectors */
};

struct sector_locks *sector_locks_new(void)
{
	struct sector_locks *t = g_new0(struct sector_locks, 1);

	g_mutex_init(&t->mu);
	g_queue_init(&t->active);
	g_queue_init(&t->waiting);
	return t;
}

void sector_locks_free(struct sector_locks *t)
{
	if (!t)
		return;
	g_assert(t->active.length == 0 && t->waiting.length == 0);
	g_mutex_clear(&t->mu);
	g_free(t);
}

void sector_lock_init(struct sector_lock *l, uint64_t start, uint64_t end, gboolean excl_head,
		      gboolean excl_tail, sector_lock_fn granted, void *opaque)
{
	g_assert(start < end);
	l->link.data = l;
	l->link.next = l->link.prev = NULL;
	l->start = start;
	l->end = end;
	l->nexcl = 0;
	if (excl_head)
		l->excl[l->nexcl++] = start;
	if (excl_tail && !(excl_head && end - 1 == start))
		l->excl[l->nexcl++] = end - 1;
	l->granted = granted;
	l->opaque = opaque;
}

static gboolean excl_in(const struct sector_lock *a, const struct sector_lock *b)
{
	for (int i = 0; i < a->nexcl; i++)
		if (a->excl[i] >= b->start && a->excl[i] < b->end)
			return TRUE;
	return FALSE;
}

static gboolean conflict(const struct sector_lock *a, const struct sector_lock *b)
{
	if (a->end <= b->start || b->end <= a->start)
		return FALSE;
	return excl_in(a, b) || excl_in(b, a);
}

static gboolean conflicts_with(const struct sector_lock *l, GList *list, GList *stop)
{
	for (GList *it = list; it && it != stop; it = it->next)
		if (conflict(l, it->data))
			return TRUE;
	return FALSE;
}

void sector_lock_acquire(struct sector_locks *t, struct sector_lock *l)
{
	gboolean go;

	g_mutex_lock(&t->mu);
	if (t->waiting.length == 0 && (t->active_excl == 0 && l->nexcl == 0))
		go = TRUE;
	else
		go = !conflicts_with(l, t->active.head, NULL) &&
		     !conflicts_with(l, t->waiting.head, NULL);
	if (go) {
		g_queue_push_tail_link(&t->active, &l->link);
		if (l->nexcl)
			t->active_excl++;
	} else {
		g_queue_push_tail_link(&t->waiting, &l->link);
	}
	g_mutex_unlock(&t->mu);
	if (go)
		l->granted(l->opaque);
}

void sector_lock_release(struct sector_locks *t, struct sector_lock *l)
{
	GList *granted = NULL, *it, *next;

	g_mutex_lock(&t->mu);
	g_queue_unlink(&t->active, &l->link);
	if (l->nexcl)
		t->active_excl--;
	for (it = t->waiting.head; it; it = next) {
		struct sector_lock *w = it->data;

		next = it->next;
		if (conflicts_with(w, t->active.head, NULL) ||
		    conflicts_with(w, t->waiting.head, it))
			continue;
		g_queue_unlink(&t->waiting, it);
		g_queue_push_tail_link(&t->active, it);
		if (w->nexcl)
			t->active_excl++;
		/* Remember it on a private list for the callbacks below. */
		granted = g_list_prepend(granted, w);
	}
	g_mutex_unlock(&t->mu);
	granted = g_list_reverse(granted);
	for (it = granted; it; it = it->next) {
		struct sector_lock *w = it->data;

		w->granted(w->opaque);
	}
	g_list_free(granted);
}
