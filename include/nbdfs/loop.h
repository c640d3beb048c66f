/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* loop.h: event loops (one epoll thread each), their timers and cross-thread
 * tasks, and one small pool for the blocking work that must stay off them.
 *
 * A LoopSet owns N loops (default: one per online CPU) and the pool.  A loop
 * is a thread in the manner of redis's ae: it waits in epoll_wait for its fd
 * watches and its nearest timer, then runs, in this order, the fd callbacks
 * that are ready, the tasks other threads posted to it, the timers that are
 * due, and the end-of-turn work queued during the turn (where connections
 * send what requests queued up: one sendmsg for many).  Nothing on a loop
 * may block; blocking work goes to the pool (loop_set_run_blocking).
 *
 * Threads: watches, timers and end-of-turn work belong to one loop and are
 * used only on that loop's thread.  loop_post() and the pool may be called
 * from any thread.  doc/ARCHITECTURE.md says which work runs where.
 */
#pragma once

#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef struct loop Loop;
typedef struct loop_set LoopSet;

typedef void (*loop_fn)(void *opaque);
typedef void (*loop_io_fn)(void *opaque, uint32_t events);

/* ---- The set ------------------------------------------------------------ */

/* Starts @n loop threads (0 = one per online CPU) named "nbdfs-loop-I",
 * with every signal blocked, and a pool of at most @pool_threads (0 = 4,
 * LOOP_POOL_UNBOUNDED = as many as there are jobs: for jobs that may wait
 * on one another, such as the daemon's kernel cache invalidations) threads.  NULL + GError
 * (G_FILE_ERROR) when a thread, epoll or eventfd could not be made; the message names the resource.
 */
#define LOOP_POOL_UNBOUNDED G_MAXUINT
LoopSet *loop_set_new(guint n, guint pool_threads, GError **error);
/* Stops every loop (after the tasks already posted to it ran), joins the
 * threads and the pool.  Watches and timers must be gone (their owners
 * removed them); NULL is a no-op.  Must not be called on a loop. */
void loop_set_free(LoopSet *ls);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(LoopSet, loop_set_free)

guint loop_set_size(const LoopSet *ls);
/* Loop @i (0 <= i < size); borrowed. */
Loop *loop_set_get(LoopSet *ls, guint i);
/* The calling thread's loop when it is one of @ls's, else the next loop
 * in round-robin order.  Borrowed. */
Loop *loop_set_pick(LoopSet *ls);
/* The set @loop belongs to.  Borrowed. */
LoopSet *loop_get_set(Loop *loop);
/* Index of @loop within its set. */
guint loop_index(const Loop *loop);

/* Runs @fn(@opaque) on a pool thread (it may block there).  Any thread. */
void loop_set_run_blocking(LoopSet *ls, loop_fn fn, void *opaque);

/* The loop whose thread is calling, or NULL (main thread, pool, tests). */
Loop *loop_current(void);
static inline gboolean loop_is_current(const Loop *loop)
{
	return loop_current() == loop;
}

/* ---- Watches (loop thread only) ------------------------------------------
 * Embedded in the owner's struct.  @events are EPOLLIN/EPOLLOUT/... (the
 * loop adds nothing: no edge trigger unless asked).  @fn gets the events
 * epoll reported (EPOLLERR and EPOLLHUP included).  A callback may delete
 * its own or any other watch of the loop, even one that is ready in the
 * same turn (it is then not called). */
struct loop_watch {
	Loop *loop; /* set while registered, else NULL */
	int fd;
	uint32_t events;
	loop_io_fn fn;
	void *opaque;
	guint slot; /* private: the loop's dispatch slot */
};

/* 0 or a negative errno from epoll_ctl (the watch is then not registered). */
int loop_watch_add(Loop *loop, struct loop_watch *w, int fd, uint32_t events, loop_io_fn fn,
		   void *opaque);
int loop_watch_mod(struct loop_watch *w, uint32_t events);
/* No-op when not registered.  Does not close the fd. */
void loop_watch_del(struct loop_watch *w);

/* ---- Timers (loop thread only) ---------------------------------------------
 * Embedded; @when is g_get_monotonic_time() microseconds.  Starting an armed
 * timer moves it.  A timer fires once; its callback may start it again. */
struct loop_timer {
	Loop *loop; /* set while armed, else NULL */
	gint64 when;
	loop_fn fn;
	void *opaque;
	guint index; /* private: position in the loop's heap */
};

void loop_timer_start(Loop *loop, struct loop_timer *t, gint64 when, loop_fn fn, void *opaque);
/* No-op when not armed. */
void loop_timer_stop(struct loop_timer *t);
static inline gboolean loop_timer_armed(const struct loop_timer *t)
{
	return t->loop != NULL;
}

/* ---- Polling before sleeping (loop thread only) -------------------------------
 * Says that an event is expected soon on this loop (a request was just sent
 * to a fast server, a reply was just written to a client that asks again at
 * once).  Before it would sleep, the loop then polls its descriptors for a
 * few microseconds: on a virtual machine a sleep and the wake-up after it
 * cost more than the wait itself.  The budget adapts (0 to 64 us): it grows
 * when events came soon after the loop began waiting, and shrinks when
 * polling found nothing, so an idle loop does not poll at all. */
void loop_expect(Loop *loop);

/* ---- Tasks (any thread) ------------------------------------------------------
 * Runs @fn(@opaque) on @loop's thread soon, in posting order.  From the loop
 * itself the task runs later in the same turn (never inside this call).
 * loop_post allocates; loop_post_task uses the caller's struct, which must
 * stay valid and must not be posted again until its @fn has started. */
struct loop_task {
	struct loop_task *next;
	loop_fn fn;
	void *opaque;
};

void loop_post(Loop *loop, loop_fn fn, void *opaque);
void loop_post_task(Loop *loop, struct loop_task *task, loop_fn fn, void *opaque);

/* ---- End of turn (loop thread only) -------------------------------------------
 * Queues @d to run once, after this turn's events, tasks and timers (where a
 * connection sends everything queued during the turn at once).  Queuing an
 * already queued @d does nothing.  Work queued by end-of-turn callbacks runs
 * in the same turn. */
struct loop_defer {
	struct loop_defer *next;
	gboolean queued;
	loop_fn fn;
	void *opaque;
};

void loop_defer(Loop *loop, struct loop_defer *d, loop_fn fn, void *opaque);

/* ---- Waiting for one callback (completion.c) ---------------------------------
 * The one helper for "start an asynchronous call, block until its callback
 * ran".  Reference counted, so that a wait that gave up at its deadline
 * leaves the late callback a valid object: completion_new() returns two
 * references, one for the waiter (completion_unref) and one that the
 * callback (completion_done or completion_done_bytes) drops.  Waiting on a
 * loop thread is a programming error (the callback may need that loop). */
struct completion;

struct completion *completion_new(void);
/* Another waiter's reference (each waiter drops one with completion_unref). */
struct completion *completion_ref(struct completion *c);
void completion_unref(struct completion *c);
/* Callbacks with the shapes of blockdev_done_fn / nbdc_done_fn and
 * blockdev_bytes_fn: record @result, wake the waiter, drop their reference. */
void completion_done(void *opaque, int result);
void completion_done_bytes(void *opaque, gssize result);
/* Blocks until the callback ran; returns its result. */
gint64 completion_wait(struct completion *c);
/* Blocks until the callback ran (TRUE, *@result set) or @deadline_us
 * (monotonic) passed (FALSE). */
gboolean completion_wait_until(struct completion *c, gint64 deadline_us, gint64 *result);
/* TRUE once the callback ran (does not block). */
gboolean completion_is_done(struct completion *c);

G_END_DECLS
