/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* outstanding.c: requests left outstanding on a handle while the test gives up
 * on it: submitted without waiting, then abandoned (from the main thread or a
 * loop) or disconnected on another thread, then waited for with a deadline,
 * each callback counted.  Requests and buffers live until the process ends:
 * a callback may still come after a wait gave up. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "nbdfs/loop.h"
#include "nbdfs/nbd.h"
#include "nbdc-cli.h"
#include "outstanding.h"

struct bg_req {
	char kind[8];
	uint64_t off, len;
	struct iovec v;
	gint calls;
	gint err;
	gint64 done_us;
	struct completion *done; /* the callback drops one reference */
};

static GPtrArray *reqs;	   /* struct bg_req *, never freed */
static gint64 given_up_us; /* when the abandon was called; 0 = not yet */
static GThread *disconnector;
static gint64 disconnected_us; /* when nbdc_disconnect returned */

static void bg_done(void *opaque, int err)
{
	struct bg_req *r = opaque;

	if (g_atomic_int_add(&r->calls, 1) > 0) {
		fprintf(stderr, "nbdc-cli: %s %" PRIu64 ": callback ran again (%s)\n", r->kind,
			r->off, errname(err));
		return;
	}
	r->err = err;
	r->done_us = g_get_monotonic_time();
	completion_done(r->done, err);
}

int outstanding_submit(Nbdc *c, const char *kind, uint64_t off, uint64_t len)
{
	struct bg_req *r = g_new0(struct bg_req, 1);
	int s;

	if (!reqs)
		reqs = g_ptr_array_new();
	g_strlcpy(r->kind, kind, sizeof(r->kind));
	r->off = off;
	r->len = len;
	r->v.iov_base = g_malloc0(len ? len : 1);
	r->v.iov_len = len;
	r->done = completion_new();
	if (strcmp(kind, "read") == 0)
		s = nbdc_aio_preadv(c, &r->v, 1, off, 0, bg_done, r);
	else if (strcmp(kind, "write") == 0)
		s = nbdc_aio_pwritev(c, &r->v, 1, off, 0, bg_done, r);
	else if (strcmp(kind, "flush") == 0)
		s = nbdc_aio_flush(c, bg_done, r);
	else if (strcmp(kind, "trim") == 0)
		s = nbdc_aio_trim(c, len, off, 0, bg_done, r);
	else if (strcmp(kind, "zero") == 0)
		s = nbdc_aio_zero(c, len, off, 0, bg_done, r);
	else {
		fprintf(stderr, "nbdc-cli: aio-bg: unknown kind '%s'\n", kind);
		return 1;
	}
	if (s < 0) {
		completion_done(r->done, s); /* refused: no callback drops its reference */
		completion_unref(r->done);
		return io_fail(kind, off, len, s);
	}
	g_ptr_array_add(reqs, r);
	return 0;
}

struct loop_abandon {
	Nbdc *c;
	gboolean on_loop;
	struct completion *done;
};

static void abandon_from_callback(void *opaque, int err)
{
	struct loop_abandon *a = opaque;

	a->on_loop = loop_current() != NULL;
	given_up_us = g_get_monotonic_time();
	nbdc_abandon(a->c);
	completion_done(a->done, err);
}

int outstanding_abandon(Nbdc *c, gboolean on_loop)
{
	if (!on_loop) {
		given_up_us = g_get_monotonic_time();
		nbdc_abandon(c);
		return 0;
	}
	/* A read of nothing completes on a loop without the server. */
	static char none[1];
	struct iovec v = { none, 0 };
	struct loop_abandon a = { .c = c, .done = completion_new() };
	int s = nbdc_aio_preadv(c, &v, 1, 0, 0, abandon_from_callback, &a);

	if (s < 0) {
		completion_done(a.done, s);
		completion_unref(a.done);
		return io_fail("abandon-on-loop", 0, 0, s);
	}
	if (!completion_wait_until(a.done, g_get_monotonic_time() + WATCHDOG_US, NULL)) {
		fprintf(stderr, "nbdc-cli: abandon-on-loop: the read of nothing never completed\n");
		fflush(stderr);
		_exit(3); /* the callback still references our stack */
	}
	completion_unref(a.done);
	if (!a.on_loop) {
		fprintf(stderr, "nbdc-cli: abandon-on-loop: the callback did not run on a loop\n");
		return 1;
	}
	return 0;
}

static gpointer disconnect_thread(gpointer data)
{
	nbdc_disconnect(data);
	disconnected_us = g_get_monotonic_time();
	return NULL;
}

int outstanding_disconnect_bg(Nbdc *c)
{
	gint64 deadline = g_get_monotonic_time() + WATCHDOG_US;

	disconnector = g_thread_new("disconnect", disconnect_thread, c);
	/* Returns once the disconnect has begun: the handle says it is not
	 * alive from then on, and the disconnect waits for the requests. */
	while (nbdc_is_alive(c)) {
		if (g_get_monotonic_time() > deadline) {
			fprintf(stderr, "nbdc-cli: disconnect-bg: the disconnect never began\n");
			return 3;
		}
		g_usleep(1000);
	}
	return 0;
}

int outstanding_wait(uint64_t ms)
{
	gint64 start = g_get_monotonic_time(), deadline = start + (gint64)ms * 1000;
	int status = 0;

	for (guint i = 0; reqs && i < reqs->len; i++) {
		struct bg_req *r = reqs->pdata[i];

		if (!completion_wait_until(r->done, deadline, NULL)) {
			printf("pending %s %" PRIu64 "\n", r->kind, r->off);
			status = 3;
		}
	}
	if (disconnector) {
		/* The disconnect waits its own bound (seconds) at most. */
		g_thread_join(disconnector);
		disconnector = NULL;
	}
	gint64 from = given_up_us ? given_up_us : start;
	for (guint i = 0; reqs && i < reqs->len; i++) {
		struct bg_req *r = reqs->pdata[i];

		if (!completion_is_done(r->done))
			continue;
		printf("done %s %" PRIu64 " %s ms=%.1f\n", r->kind, r->off,
		       r->err ? errname(r->err) : "0", (double)(r->done_us - from) / 1000.0);
	}
	if (disconnected_us)
		printf("disconnect ms=%.1f\n", (double)(disconnected_us - from) / 1000.0);
	fflush(stdout);
	return status;
}

int outstanding_check(void)
{
	int status = 0;

	for (guint i = 0; reqs && i < reqs->len; i++) {
		struct bg_req *r = reqs->pdata[i];
		gint n = g_atomic_int_get(&r->calls);

		if (n != 1) {
			fprintf(stderr, "nbdc-cli: %s %" PRIu64 ": callback ran %d times\n",
				r->kind, r->off, n);
			status = 4;
		}
	}
	return status;
}
