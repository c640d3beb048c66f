/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* loop.c: the event loops: epoll, a timer heap, posted tasks, end-of-turn work.
 *
 * One turn: epoll_wait (timeout = the nearest timer, 0 when tasks are
 * pending), the ready fd callbacks, the posted tasks, the due timers, then
 * the end-of-turn queue until it is empty.  A watch is found through a slot
 * table (epoll carries slot and generation, never a pointer), so a callback
 * may delete and free any watch, even one that is ready later in this turn.
 *
 * Polling before sleeping: on this kind of machine (a 2-vCPU virtual machine)
 * a thread that sleeps and is woken again costs ~15 us of CPU, more than a
 * fast server takes to answer.  So a loop that has just sent a request or
 * written a reply (loop_expect) polls for a few microseconds before it
 * sleeps, with a budget that grows when the awaited event came soon and
 * shrinks when polling found nothing; under load (several events a turn) it
 * does not poll at all.  Measured with nbdkit memory over a Unix socket: 4 KiB
 * QD1 reads 12.8k -> 21k IOPS, dd bs=4k writes 51 -> 80 MB/s
 * (contrib/bench/RESULTS.md).
 *
 * Waking a sleeping loop: posters append under @tasks_lock and write the
 * eventfd only when the loop said it is about to sleep (@sleeping, sequentially
 * consistent on both sides: either the loop sees the task before it sleeps,
 * or the poster sees @sleeping and wakes it).  A busy loop costs posters no
 * syscall.
 */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "nbdfs/loop.h"

#define MAX_EVENTS 64
/* Polling budget bounds (see loop_expect), microseconds. */
#define LOOP_SPIN_MIN_US 4
#define LOOP_SPIN_MAX_EVENTS 1
#define LOOP_SPIN_MAX_US 64
#define DEFAULT_POOL_THREADS 4

struct slot {
	struct loop_watch *w; /* NULL when free */
	guint32 gen;
	guint next_free;
};

struct loop {
	LoopSet *set;
	guint index;
	GThread *thread;
	int epfd;
	int evfd;
	gboolean stop;

	/* Watches: the slot table (slot 0 is the eventfd's). */
	struct slot *slots;
	guint nslots, free_slot; /* free list head; 0 = none */

	/* Timers: a binary min-heap of struct loop_timer * by @when (1-based). */
	struct loop_timer **heap;
	guint heap_len, heap_cap;
	gint64 timers_now; /* while running timers: their "now" */

	/* Posted tasks (any thread). */
	GMutex tasks_lock;
	struct loop_task *tasks_head, *tasks_tail;
	gint sleeping;

	/* End of turn. */
	struct loop_defer *defer_head, *defer_tail;

	/* Polling before sleeping (see loop_expect). */
	gboolean expecting; /* loop_expect was called this turn */
	gint spin_us;	    /* the current polling budget */
	int last_events;    /* how many the last wait returned */
};

struct loop_set {
	Loop **loops;
	guint n;
	guint rr; /* atomic round-robin cursor */
	GThreadPool *pool;
};

static __thread Loop *current_loop;

Loop *loop_current(void)
{
	return current_loop;
}

/* ---- Timers ---- */

static void heap_swap(Loop *l, guint a, guint b)
{
	struct loop_timer *t = l->heap[a];

	l->heap[a] = l->heap[b];
	l->heap[b] = t;
	l->heap[a]->index = a;
	l->heap[b]->index = b;
}

static void heap_up(Loop *l, guint i)
{
	while (i > 1 && l->heap[i / 2]->when > l->heap[i]->when) {
		heap_swap(l, i, i / 2);
		i /= 2;
	}
}

static void heap_down(Loop *l, guint i)
{
	for (;;) {
		guint m = i, a = 2 * i, b = 2 * i + 1;

		if (a <= l->heap_len && l->heap[a]->when < l->heap[m]->when)
			m = a;
		if (b <= l->heap_len && l->heap[b]->when < l->heap[m]->when)
			m = b;
		if (m == i)
			return;
		heap_swap(l, i, m);
		i = m;
	}
}

static void heap_remove(Loop *l, guint i)
{
	struct loop_timer *last = l->heap[l->heap_len--];

	if (i <= l->heap_len) {
		l->heap[i] = last;
		last->index = i;
		heap_up(l, i);
		heap_down(l, last->index);
	}
}

void loop_timer_start(Loop *loop, struct loop_timer *t, gint64 when, loop_fn fn, void *opaque)
{
	g_assert(loop_is_current(loop) || loop->thread == NULL);
	if (t->loop)
		loop_timer_stop(t);
	/* A timer (re)armed for the past while timers run fires next turn, not
	 * in this one: a callback that re-arms itself cannot spin the loop. */
	if (loop->timers_now && when <= loop->timers_now)
		when = loop->timers_now + 1;
	t->loop = loop;
	t->when = when;
	t->fn = fn;
	t->opaque = opaque;
	if (loop->heap_len + 1 >= loop->heap_cap) {
		loop->heap_cap = MAX(16u, loop->heap_cap * 2);
		loop->heap = g_renew(struct loop_timer *, loop->heap, loop->heap_cap);
	}
	loop->heap[++loop->heap_len] = t;
	t->index = loop->heap_len;
	heap_up(loop, t->index);
}

void loop_timer_stop(struct loop_timer *t)
{
	Loop *loop = t->loop;

	if (!loop)
		return;
	g_assert(loop->heap[t->index] == t);
	heap_remove(loop, t->index);
	t->loop = NULL;
	t->index = 0;
}

/* Runs the timers that are due. */
static void run_timers(Loop *l)
{
	if (l->heap_len == 0)
		return;
	gint64 now = g_get_monotonic_time();

	l->timers_now = now;
	while (l->heap_len > 0 && l->heap[1]->when <= now) {
		struct loop_timer *t = l->heap[1];

		heap_remove(l, 1);
		t->loop = NULL;
		t->index = 0;
		t->fn(t->opaque);
	}
	l->timers_now = 0;
}

/* The epoll timeout in ms until the nearest timer (-1: none). */
static int next_timeout(Loop *l)
{
	if (l->heap_len == 0)
		return -1;
	gint64 d = l->heap[1]->when - g_get_monotonic_time();
	if (d <= 0)
		return 0;
	/* Round up: waking early would spin until the timer is due. */
	return (int)MIN((d + 999) / 1000, (gint64)G_MAXINT);
}

/* ---- Watches ---- */

static guint slot_alloc(Loop *l)
{
	if (l->free_slot) {
		guint s = l->free_slot;

		l->free_slot = l->slots[s].next_free;
		return s;
	}
	l->slots = g_renew(struct slot, l->slots, l->nslots + 1);
	l->slots[l->nslots] = (struct slot){ 0 };
	return l->nslots++;
}

static uint64_t slot_key(const Loop *l, guint s)
{
	return ((uint64_t)l->slots[s].gen << 32) | s;
}

int loop_watch_add(Loop *loop, struct loop_watch *w, int fd, uint32_t events, loop_io_fn fn,
		   void *opaque)
{
	g_assert(loop_is_current(loop) || loop->thread == NULL);
	g_assert(w->loop == NULL);
	guint s = slot_alloc(loop);
	struct epoll_event ev = { .events = events };

	loop->slots[s].w = w;
	ev.data.u64 = slot_key(loop, s);
	if (epoll_ctl(loop->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
		int e = errno;

		loop->slots[s].w = NULL;
		loop->slots[s].gen++;
		loop->slots[s].next_free = loop->free_slot;
		loop->free_slot = s;
		return -e;
	}
	w->loop = loop;
	w->fd = fd;
	w->events = events;
	w->fn = fn;
	w->opaque = opaque;
	w->slot = s;
	return 0;
}

int loop_watch_mod(struct loop_watch *w, uint32_t events)
{
	Loop *loop = w->loop;

	g_assert(loop);
	if (events == w->events)
		return 0;
	struct epoll_event ev = { .events = events, .data.u64 = slot_key(loop, w->slot) };
	if (epoll_ctl(loop->epfd, EPOLL_CTL_MOD, w->fd, &ev) < 0)
		return -errno;
	w->events = events;
	return 0;
}

void loop_watch_del(struct loop_watch *w)
{
	Loop *loop = w->loop;

	if (!loop)
		return;
	/* ENOENT/EBADF when the fd was closed first: the watch goes anyway. */
	epoll_ctl(loop->epfd, EPOLL_CTL_DEL, w->fd, NULL);
	loop->slots[w->slot].w = NULL;
	loop->slots[w->slot].gen++;
	loop->slots[w->slot].next_free = loop->free_slot;
	loop->free_slot = w->slot;
	w->loop = NULL;
}

/* ---- Tasks ---- */

static void wake(Loop *l)
{
	uint64_t one = 1;
	ssize_t r;

	do
		r = write(l->evfd, &one, sizeof(one));
	while (r < 0 && errno == EINTR);
}

void loop_post_task(Loop *loop, struct loop_task *task, loop_fn fn, void *opaque)
{
	task->next = NULL;
	task->fn = fn;
	task->opaque = opaque;
	g_mutex_lock(&loop->tasks_lock);
	if (loop->tasks_tail)
		loop->tasks_tail->next = task;
	else
		loop->tasks_head = task;
	loop->tasks_tail = task;
	g_mutex_unlock(&loop->tasks_lock);
	if (!loop_is_current(loop) && __atomic_load_n(&loop->sleeping, __ATOMIC_SEQ_CST))
		wake(loop);
}

struct heap_task {
	struct loop_task task;
	loop_fn fn;
	void *opaque;
};

static void heap_task_run(void *opaque)
{
	struct heap_task *ht = opaque;
	loop_fn fn = ht->fn;
	void *arg = ht->opaque;

	g_free(ht);
	fn(arg);
}

void loop_post(Loop *loop, loop_fn fn, void *opaque)
{
	struct heap_task *ht = g_new(struct heap_task, 1);

	ht->fn = fn;
	ht->opaque = opaque;
	loop_post_task(loop, &ht->task, heap_task_run, ht);
}

static gboolean tasks_pending(Loop *l)
{
	g_mutex_lock(&l->tasks_lock);
	gboolean any = l->tasks_head != NULL;
	g_mutex_unlock(&l->tasks_lock);
	return any;
}

static void run_tasks(Loop *l)
{
	g_mutex_lock(&l->tasks_lock);
	struct loop_task *t = l->tasks_head;
	l->tasks_head = l->tasks_tail = NULL;
	g_mutex_unlock(&l->tasks_lock);
	while (t) {
		struct loop_task *next = t->next;

		t->fn(t->opaque);
		t = next;
	}
}

/* ---- End of turn ---- */

void loop_defer(Loop *loop, struct loop_defer *d, loop_fn fn, void *opaque)
{
	g_assert(loop_is_current(loop));
	if (d->queued)
		return;
	d->queued = TRUE;
	d->fn = fn;
	d->opaque = opaque;
	d->next = NULL;
	if (loop->defer_tail)
		loop->defer_tail->next = d;
	else
		loop->defer_head = d;
	loop->defer_tail = d;
}

static void run_deferred(Loop *l)
{
	while (l->defer_head) {
		struct loop_defer *d = l->defer_head;

		l->defer_head = d->next;
		if (!l->defer_head)
			l->defer_tail = NULL;
		d->queued = FALSE;
		d->next = NULL;
		d->fn(d->opaque);
	}
}

/* ---- The thread ---- */

static void on_wakeup(void *opaque, uint32_t events)
{
	Loop *l = opaque;
	uint64_t v;

	while (read(l->evfd, &v, sizeof(v)) < 0 && errno == EINTR)
		;
}

void loop_expect(Loop *loop)
{
	loop->expecting = TRUE;
}

/* Polls (epoll_wait with no timeout) for up to the loop's budget while an
 * event is expected soon: the number of events, or 0 to go to sleep. */
static int spin(Loop *l, struct epoll_event *ev)
{
	/* Under load (several events a turn) the other threads need the CPU
	 * more than this loop needs a quick wake-up. */
	if (!l->expecting || l->spin_us == 0 || l->last_events > LOOP_SPIN_MAX_EVENTS)
		return 0;
	gint64 until = g_get_monotonic_time() + l->spin_us;
	do {
		int n = epoll_wait(l->epfd, ev, MAX_EVENTS, 0);
		if (n != 0 || tasks_pending(l)) {
			l->spin_us = MIN(LOOP_SPIN_MAX_US, l->spin_us * 2);
			return n;
		}
	} while (g_get_monotonic_time() < until);
	l->spin_us /= 2;
	return 0;
}

/* After a sleep that began while an event was expected: had it come within
 * the largest budget, polling would have saved the sleep. */
static void learn(Loop *l, gint64 slept_us)
{
	if (slept_us < LOOP_SPIN_MAX_US && l->spin_us < LOOP_SPIN_MAX_US)
		l->spin_us = MAX(LOOP_SPIN_MIN_US, l->spin_us * 2);
}

static gpointer loop_main(gpointer data)
{
	Loop *l = data;
	struct epoll_event ev[MAX_EVENTS];
	int timeout = 0;

	current_loop = l;
	while (!l->stop) {
		int n = 0;
		if (timeout != 0)
			n = spin(l, ev);
		gboolean expected = l->expecting;
		l->expecting = FALSE;
		if (n == 0) {
			gint64 t0 = expected && timeout != 0 ? g_get_monotonic_time() : 0;
			__atomic_store_n(&l->sleeping, 1, __ATOMIC_SEQ_CST);
			if (timeout != 0 && tasks_pending(l))
				timeout = 0;
			n = epoll_wait(l->epfd, ev, MAX_EVENTS, timeout);
			__atomic_store_n(&l->sleeping, 0, __ATOMIC_SEQ_CST);
			if (t0 && n > 0)
				learn(l, g_get_monotonic_time() - t0);
		}
		if (n < 0 && errno != EINTR)
			g_error("loop %u: epoll_wait: %s", l->index, g_strerror(errno));
		l->last_events = n;
		for (int i = 0; i < n; i++) {
			guint s = (guint)(ev[i].data.u64 & 0xffffffffu);
			guint32 gen = (guint32)(ev[i].data.u64 >> 32);

			if (s >= l->nslots || l->slots[s].gen != gen || !l->slots[s].w)
				continue; /* deleted earlier in this turn */
			struct loop_watch *w = l->slots[s].w;
			w->fn(w->opaque, ev[i].events);
		}
		run_tasks(l);
		run_timers(l);
		run_deferred(l);
		timeout = next_timeout(l);
	}
	current_loop = NULL;
	return NULL;
}

static Loop *loop_new(LoopSet *set, guint index, GError **error)
{
	Loop *l = g_new0(Loop, 1);

	l->set = set;
	l->index = index;
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	l->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	g_mutex_init(&l->tasks_lock);
	if (l->epfd < 0 || l->evfd < 0) {
		int e = errno;

		g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(e), "loop %u: %s: %s",
			    index, l->epfd < 0 ? "epoll_create1" : "eventfd", g_strerror(e));
		goto fail;
	}
	/* The eventfd owns a heap-allocated watch like any other. */
	struct loop_watch *w = g_new0(struct loop_watch, 1);
	int r = loop_watch_add(l, w, l->evfd, EPOLLIN, on_wakeup, l);
	if (r < 0) {
		g_free(w);
		g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(-r),
			    "loop %u: epoll_ctl: %s", index, g_strerror(-r));
		goto fail;
	}
	return l;
fail:
	if (l->epfd >= 0)
		close(l->epfd);
	if (l->evfd >= 0)
		close(l->evfd);
	g_mutex_clear(&l->tasks_lock);
	g_free(l->slots);
	g_free(l);
	return NULL;
}

static void loop_free(Loop *l)
{
	if (!l)
		return;
	/* Slot 0 holds the eventfd's watch (allocated in loop_new). */
	if (l->nslots > 0 && l->slots[0].w)
		g_free(l->slots[0].w);
	for (guint s = 1; s < l->nslots; s++)
		if (l->slots[s].w)
			g_warning("loop %u: watch on fd %d still registered at exit", l->index,
				  l->slots[s].w->fd);
	if (l->heap_len)
		g_warning("loop %u: %u timer%s still armed at exit", l->index, l->heap_len,
			  l->heap_len == 1 ? "" : "s");
	close(l->epfd);
	close(l->evfd);
	g_mutex_clear(&l->tasks_lock);
	g_free(l->slots);
	g_free(l->heap);
	g_free(l);
}

static void stop_task(void *opaque)
{
	Loop *l = opaque;

	l->stop = TRUE;
}

static void pool_run(gpointer data, gpointer user)
{
	struct loop_task *t = data;
	loop_fn fn = t->fn;
	void *opaque = t->opaque;

	g_free(t);
	fn(opaque);
}

LoopSet *loop_set_new(guint n, guint pool_threads, GError **error)
{
	LoopSet *ls = g_new0(LoopSet, 1);
	sigset_t all, old;

	if (n == 0)
		n = MAX(1u, g_get_num_processors());
	ls->loops = g_new0(Loop *, n);
	ls->n = n;
	for (guint i = 0; i < n; i++) {
		ls->loops[i] = loop_new(ls, i, error);
		if (!ls->loops[i])
			goto fail;
	}
	/* Loop and pool threads take no signals: the main thread does. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	for (guint i = 0; i < n; i++) {
		g_autofree char *name = g_strdup_printf("nbdfs-loop-%u", i);

		ls->loops[i]->thread = g_thread_try_new(name, loop_main, ls->loops[i], error);
		if (!ls->loops[i]->thread) {
			pthread_sigmask(SIG_SETMASK, &old, NULL);
			g_prefix_error(error, "starting event loop thread %u of %u: ", i + 1, n);
			goto fail;
		}
	}
	gint max = pool_threads == LOOP_POOL_UNBOUNDED ? -1
		   : pool_threads		       ? (gint)MIN(pool_threads, (guint)G_MAXINT)
						       : DEFAULT_POOL_THREADS;
	ls->pool = g_thread_pool_new(pool_run, ls, max, FALSE, error);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (!ls->pool) {
		g_prefix_error(error, "starting the blocking-work pool: ");
		goto fail;
	}
	return ls;
fail:
	loop_set_free(ls);
	return NULL;
}

void loop_set_free(LoopSet *ls)
{
	if (!ls)
		return;
	g_assert(loop_current() == NULL);
	if (ls->pool)
		g_thread_pool_free(ls->pool, FALSE, TRUE);
	for (guint i = 0; i < ls->n; i++) {
		Loop *l = ls->loops[i];

		if (l && l->thread) {
			loop_post(l, stop_task, l);
			wake(l);
			g_thread_join(l->thread);
			l->thread = NULL;
		}
	}
	for (guint i = 0; i < ls->n; i++)
		loop_free(ls->loops[i]);
	g_free(ls->loops);
	g_free(ls);
}

guint loop_set_size(const LoopSet *ls)
{
	return ls->n;
}

Loop *loop_set_get(LoopSet *ls, guint i)
{
	g_assert(i < ls->n);
	return ls->loops[i];
}

Loop *loop_set_pick(LoopSet *ls)
{
	Loop *cur = loop_current();

	if (cur && cur->set == ls)
		return cur;
	guint i = (guint)__atomic_fetch_add(&ls->rr, 1, __ATOMIC_RELAXED);
	return ls->loops[i % ls->n];
}

LoopSet *loop_get_set(Loop *loop)
{
	return loop->set;
}

guint loop_index(const Loop *loop)
{
	return loop->index;
}

void loop_set_run_blocking(LoopSet *ls, loop_fn fn, void *opaque)
{
	struct loop_task *t = g_new(struct loop_task, 1);

	t->next = NULL;
	t->fn = fn;
	t->opaque = opaque;
	g_thread_pool_push(ls->pool, t, NULL);
}
