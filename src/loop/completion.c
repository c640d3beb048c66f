/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* completion.c: block until one asynchronous callback ran (see loop.h). */
#include "config.h"

#include "nbdfs/loop.h"

struct completion {
	GMutex lock;
	GCond cond;
	gint refs;
	gboolean done;
	gint64 result;
};

struct completion *completion_new(void)
{
	struct completion *c = g_new0(struct completion, 1);

	g_mutex_init(&c->lock);
	g_cond_init(&c->cond);
	c->refs = 2;
	return c;
}

struct completion *completion_ref(struct completion *c)
{
	g_atomic_int_inc(&c->refs);
	return c;
}

void completion_unref(struct completion *c)
{
	if (c && g_atomic_int_dec_and_test(&c->refs)) {
		g_mutex_clear(&c->lock);
		g_cond_clear(&c->cond);
		g_free(c);
	}
}

static void finish(struct completion *c, gint64 result)
{
	g_mutex_lock(&c->lock);
	g_assert(!c->done);
	c->result = result;
	c->done = TRUE;
	g_cond_broadcast(&c->cond);
	g_mutex_unlock(&c->lock);
	completion_unref(c);
}

void completion_done(void *opaque, int result)
{
	finish(opaque, result);
}

void completion_done_bytes(void *opaque, gssize result)
{
	finish(opaque, result);
}

gint64 completion_wait(struct completion *c)
{
	g_assert(loop_current() == NULL);
	g_mutex_lock(&c->lock);
	while (!c->done)
		g_cond_wait(&c->cond, &c->lock);
	gint64 r = c->result;
	g_mutex_unlock(&c->lock);
	return r;
}

gboolean completion_wait_until(struct completion *c, gint64 deadline_us, gint64 *result)
{
	g_assert(loop_current() == NULL);
	g_mutex_lock(&c->lock);
	while (!c->done)
		if (!g_cond_wait_until(&c->cond, &c->lock, deadline_us))
			break;
	gboolean done = c->done;
	if (done && result)
		*result = c->result;
	g_mutex_unlock(&c->lock);
	return done;
}

gboolean completion_is_done(struct completion *c)
{
	g_mutex_lock(&c->lock);
	gboolean done = c->done;
	g_mutex_unlock(&c->lock);
	return done;
}
