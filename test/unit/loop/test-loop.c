/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* test-loop.c: the event loops: tasks, timers, end-of-turn work, fd watches,
 * the blocking pool and the completion helper. */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "nbdfs/loop.h"

#define WAIT_US (10 * G_USEC_PER_SEC)

/* Runs @fn(@opaque) on @loop and waits until it returns. */
struct call {
	loop_fn fn;
	void *opaque;
	struct completion *c;
};

static void call_run(void *opaque)
{
	struct call *k = opaque;

	k->fn(k->opaque);
	completion_done(k->c, 0);
}

static void run_on(Loop *loop, loop_fn fn, void *opaque)
{
	struct call k = { fn, opaque, completion_new() };
	gint64 r;

	loop_post(loop, call_run, &k);
	g_assert_true(completion_wait_until(k.c, g_get_monotonic_time() + WAIT_US, &r));
	completion_unref(k.c);
}

/* loop_set_new(@n, @pool_threads), which must succeed. */
static LoopSet *loop_set_ok(guint n, guint pool_threads)
{
	g_autoptr(GError) err = NULL;
	LoopSet *ls = loop_set_new(n, pool_threads, &err);

	g_assert_no_error(err);
	return ls;
}

/* ---- tasks run in order, on the loop's thread ---- */

struct order {
	GMutex lock;
	GArray *seen;
	Loop *loop;
	gboolean wrong_thread;
};

static void record(void *opaque)
{
	struct order *o = opaque;

	g_mutex_lock(&o->lock);
	int v = (int)o->seen->len;
	g_array_append_val(o->seen, v);
	if (!loop_is_current(o->loop))
		o->wrong_thread = TRUE;
	g_mutex_unlock(&o->lock);
}

static void test_post_order(void)
{
	g_autoptr(LoopSet) ls = loop_set_ok(2, 1);
	struct order o = { .seen = g_array_new(FALSE, FALSE, sizeof(int)) };

	g_assert_cmpuint(loop_set_size(ls), ==, 2);
	g_mutex_init(&o.lock);
	o.loop = loop_set_get(ls, 1);
	for (int i = 0; i < 1000; i++)
		loop_post(o.loop, record, &o);
	run_on(o.loop, record, &o); /* runs after the 1000 */
	g_assert_cmpuint(o.seen->len, ==, 1001);
	g_assert_false(o.wrong_thread);
	g_assert_null(loop_current());
	g_array_unref(o.seen);
	g_mutex_clear(&o.lock);
}

/* ---- timers fire in deadline order, a stopped one never ---- */

struct timers {
	Loop *loop;
	struct loop_timer t[5];
	GArray *fired;
	struct completion *all;
	int left;
};

static struct timers *the_timers;
static int ids[5] = { 0, 1, 2, 3, 4 };

static void timer_cb(void *opaque)
{
	int id = *(int *)opaque;
	struct timers *ts = the_timers;

	g_array_append_val(ts->fired, id);
	if (--ts->left == 0)
		completion_done(ts->all, 0);
}

static void start_timers(void *opaque)
{
	struct timers *ts = opaque;
	gint64 now = g_get_monotonic_time();
	/* deadlines: 4 first, then 2, 0, 3; timer 1 is stopped */
	gint64 at[5] = { 30000, 20000, 20000 - 5000, 40000, 5000 };

	for (int i = 0; i < 5; i++)
		loop_timer_start(ts->loop, &ts->t[i], now + at[i], timer_cb, &ids[i]);
	loop_timer_stop(&ts->t[1]);
	g_assert_false(loop_timer_armed(&ts->t[1]));
	/* moving an armed timer */
	loop_timer_start(ts->loop, &ts->t[3], now + 35000, timer_cb, &ids[3]);
}

static void test_timers(void)
{
	g_autoptr(LoopSet) ls = loop_set_ok(1, 1);
	struct timers ts = { 0 };
	gint64 r;

	ts.loop = loop_set_get(ls, 0);
	ts.fired = g_array_new(FALSE, FALSE, sizeof(int));
	ts.all = completion_new();
	ts.left = 4;
	the_timers = &ts;
	gint64 t0 = g_get_monotonic_time();
	run_on(ts.loop, start_timers, &ts);
	g_assert_true(completion_wait_until(ts.all, t0 + WAIT_US, &r));
	g_assert_cmpint(g_get_monotonic_time() - t0, >=, 35000);
	g_assert_cmpuint(ts.fired->len, ==, 4);
	int want[4] = { 4, 2, 0, 3 };
	for (int i = 0; i < 4; i++)
		g_assert_cmpint(g_array_index(ts.fired, int, i), ==, want[i]);
	completion_unref(ts.all);
	g_array_unref(ts.fired);
}

/* ---- end-of-turn work runs once per turn, after the turn's tasks ---- */

struct turn {
	Loop *loop;
	struct loop_defer d;
	int tasks_run, defers_run, tasks_at_defer;
};

static void turn_defer(void *opaque)
{
	struct turn *t = opaque;

	t->defers_run++;
	t->tasks_at_defer = t->tasks_run;
}

static void turn_task(void *opaque)
{
	struct turn *t = opaque;

	t->tasks_run++;
	loop_defer(t->loop, &t->d, turn_defer, t);
}

static void turn_post_many(void *opaque)
{
	struct turn *t = opaque;

	for (int i = 0; i < 10; i++)
		loop_post(t->loop, turn_task, t);
}

static void nothing(void *opaque)
{
}

static void test_defer(void)
{
	g_autoptr(LoopSet) ls = loop_set_ok(1, 1);
	struct turn t = { 0 };

	t.loop = loop_set_get(ls, 0);
	run_on(t.loop, turn_post_many, &t);
	/* The turn that ran the ten tasks ends with its deferred work before
	 * a task posted after it returns can run. */
	run_on(t.loop, nothing, NULL);
	run_on(t.loop, nothing, NULL);
	g_assert_cmpint(t.tasks_run, ==, 10);
	/* Tasks posted from the loop run later in the same or the next turn;
	 * either way the deferred work saw every one of them, and ran once
	 * per turn, not once per task. */
	g_assert_cmpint(t.defers_run, >=, 1);
	g_assert_cmpint(t.defers_run, <=, 2);
	g_assert_cmpint(t.tasks_at_defer, ==, 10);
}

/* ---- fd watches; deleting a watch that is ready in the same turn ---- */

struct socks {
	Loop *loop;
	int sv[2][2];
	struct loop_watch w[2];
	int calls[1];
	struct completion *c;
};

static void sock_ready(void *opaque, uint32_t events)
{
	struct socks *s = opaque;

	/* Whichever fires first deletes both watches: the other, ready in
	 * the same turn, must not be called. */
	s->calls[0]++;
	loop_watch_del(&s->w[0]);
	loop_watch_del(&s->w[1]);
	completion_done(s->c, 0);
}

static void add_watches(void *opaque)
{
	struct socks *s = opaque;

	for (int i = 0; i < 2; i++)
		g_assert_cmpint(
			loop_watch_add(s->loop, &s->w[i], s->sv[i][0], EPOLLIN, sock_ready, s), ==,
			0);
	/* Both readable before the loop waits again. */
	for (int i = 0; i < 2; i++)
		g_assert_cmpint(write(s->sv[i][1], "x", 1), ==, 1);
}

static void test_watch_delete_ready(void)
{
	g_autoptr(LoopSet) ls = loop_set_ok(1, 1);
	struct socks s = { 0 };
	gint64 r;

	s.loop = loop_set_get(ls, 0);
	for (int i = 0; i < 2; i++)
		g_assert_cmpint(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s.sv[i]), ==, 0);
	s.c = completion_new();
	run_on(s.loop, add_watches, &s);
	g_assert_true(completion_wait_until(s.c, g_get_monotonic_time() + WAIT_US, &r));
	run_on(s.loop, nothing, NULL);
	g_assert_cmpint(s.calls[0], ==, 1);
	g_assert_null(s.w[0].loop);
	g_assert_null(s.w[1].loop);
	completion_unref(s.c);
	for (int i = 0; i < 2; i++) {
		close(s.sv[i][0]);
		close(s.sv[i][1]);
	}
}

/* ---- the pool runs blocking work off the loops ---- */

static void blocking(void *opaque)
{
	g_assert_null(loop_current());
	g_usleep(1000);
	completion_done(opaque, 42);
}

static void test_pool(void)
{
	g_autoptr(LoopSet) ls = loop_set_ok(1, 2);
	struct completion *c[8];

	for (int i = 0; i < 8; i++) {
		c[i] = completion_new();
		loop_set_run_blocking(ls, blocking, c[i]);
	}
	for (int i = 0; i < 8; i++) {
		g_assert_cmpint(completion_wait(c[i]), ==, 42);
		completion_unref(c[i]);
	}
}

/* ---- a wait that gives up leaves the late callback a valid object ---- */

static void late(void *opaque)
{
	g_usleep(50000);
	completion_done_bytes(opaque, -5);
}

static void test_completion_deadline(void)
{
	g_autoptr(LoopSet) ls = loop_set_ok(1, 1);
	struct completion *c = completion_new();
	gint64 r = 0;

	loop_set_run_blocking(ls, late, c);
	g_assert_false(completion_wait_until(c, g_get_monotonic_time() + 1000, &r));
	/* The callback still holds its reference; loop_set_free joins the
	 * pool: the callback ran on a valid object. */
	completion_unref(c);
}

/* ---- picking: a loop thread gets its own loop ---- */

struct pick {
	LoopSet *ls;
	Loop *loop, *got;
};

static void do_pick(void *opaque)
{
	struct pick *p = opaque;

	p->got = loop_set_pick(p->ls);
}

static void test_pick(void)
{
	g_autoptr(LoopSet) ls = loop_set_ok(3, 1);
	struct pick p = { ls };

	for (guint i = 0; i < 3; i++) {
		p.loop = loop_set_get(ls, i);
		run_on(p.loop, do_pick, &p);
		g_assert_true(p.got == p.loop);
		g_assert_cmpuint(loop_index(p.loop), ==, i);
		g_assert_true(loop_get_set(p.loop) == ls);
	}
	/* Off the loops: round robin over all three. */
	Loop *seen[3] = { loop_set_pick(ls), loop_set_pick(ls), loop_set_pick(ls) };
	g_assert_true(seen[0] != seen[1] && seen[1] != seen[2] && seen[0] != seen[2]);
}

/* ---- polling before sleeping: an awaited event is caught, an idle loop
 * stops polling ---- */

struct expect_ctx {
	int fds[2];
	struct loop_watch w;
	int got;
	pid_t tid;
};

static void expect_readable(void *opaque, uint32_t events)
{
	struct expect_ctx *x = opaque;
	char c;
	if (read(x->fds[0], &c, 1) == 1)
		x->got++;
	loop_expect(loop_current()); /* as after a reply: more soon */
}

static void expect_setup(void *opaque)
{
	struct expect_ctx *x = opaque;
	x->tid = gettid();
	g_assert_cmpint(
		loop_watch_add(loop_current(), &x->w, x->fds[0], EPOLLIN, expect_readable, x), ==,
		0);
	loop_expect(loop_current());
}

static void expect_teardown(void *opaque)
{
	struct expect_ctx *x = opaque;
	loop_watch_del(&x->w);
}

/* The loop thread's CPU time (utime + stime), in clock ticks. */
static long thread_ticks(pid_t tid)
{
	g_autofree char *path = g_strdup_printf("/proc/self/task/%d/stat", (int)tid);
	g_autofree char *text = NULL;
	g_assert_true(g_file_get_contents(path, &text, NULL, NULL));
	const char *p = strrchr(text, ')');
	g_auto(GStrv) f = g_strsplit(p + 2, " ", -1);
	return atol(f[11]) + atol(f[12]); /* fields 14 and 15 of the line */
}

static void test_expect(void)
{
	g_autoptr(GError) err = NULL;
	g_autoptr(LoopSet) ls = loop_set_new(1, 0, &err);
	struct expect_ctx x = { 0 };
	g_assert_nonnull(ls);
	g_assert_cmpint(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, x.fds), ==, 0);
	run_on(loop_set_get(ls, 0), expect_setup, &x);
	/* A ping-pong of quick events: every one arrives. */
	for (int i = 0; i < 200; i++) {
		g_assert_cmpint(write(x.fds[1], "x", 1), ==, 1);
		g_usleep(20);
	}
	gint64 deadline = g_get_monotonic_time() + WAIT_US;
	while (g_atomic_int_get(&x.got) < 200 && g_get_monotonic_time() < deadline)
		g_usleep(1000);
	g_assert_cmpint(g_atomic_int_get(&x.got), ==, 200);
	/* Nothing more comes: the loop must sleep, not poll. */
	g_usleep(100 * 1000);
	long before = thread_ticks(x.tid);
	g_usleep(500 * 1000);
	long used = thread_ticks(x.tid) - before;
	g_assert_cmpint(used, <=, 2); /* <= 20 ms of 500 */
	run_on(loop_set_get(ls, 0), expect_teardown, &x);
	close(x.fds[0]);
	close(x.fds[1]);
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/loop/post-order", test_post_order);
	g_test_add_func("/loop/timers", test_timers);
	g_test_add_func("/loop/defer", test_defer);
	g_test_add_func("/loop/watch-delete-ready", test_watch_delete_ready);
	g_test_add_func("/loop/pool", test_pool);
	g_test_add_func("/loop/completion-deadline", test_completion_deadline);
	g_test_add_func("/loop/pick", test_pick);
	g_test_add_func("/loop/expect", test_expect);
	return g_test_run();
}
