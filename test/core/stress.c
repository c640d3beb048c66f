/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* stress.c: nbdc-cli's `stress` engine: concurrent random reads, writes and
 * zeroes through the public nbd.h API, checked against an in-memory model.
 *
 * THREADS threads each run OPS operations (reads, writes, zeroes; async in
 * batches of up to four, plus synchronous ones while the batch is in flight)
 * on random ranges aligned to the export's unit.  The export is cut into
 * REGION-sized regions with one mutex each; a batch takes the mutexes of every
 * region it touches, in ascending order (no deadlock), and the ranges inside
 * one batch never share a region.  So every byte has one writer at a time and
 * the in-memory model is exact.  At the end everything is re-read.
 */
#include "stress.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "nbdc-cli.h"
#include "nbdfs/loop.h"

#define REGION (64u << 10)
#define STRESS_MAX_LEN (32u << 10) /* default; --stress-max-len */
#define BATCH 4

enum { OP_READ, OP_WRITE, OP_ZERO };

struct stress {
	Nbdc *c;
	uint64_t size; /* the part of the export we use (whole units) */
	uint32_t unit;
	uint8_t *model;
	GMutex *locks;
	guint nregions;
	guint ops;
	guint32 seed;
	uint32_t max_len;
	gboolean writable, can_flush;
	gint failures, reentrant, double_done, mismatches;
	gint64 nreads, nwrites, nzeroes, nsync, nflush, bytes;
};

static __thread gboolean in_submit;

struct sop {
	struct stress *st;
	struct completion *done; /* async ops: the waiter's reference */
	int kind;
	gboolean sync;
	uint64_t off;
	uint32_t len;
	uint8_t *buf;
	struct iovec iov[3];
	int iovcnt;
	int err;
	gint done_count;
};

static void stress_fail(struct stress *st, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static void stress_fail(struct stress *st, const char *fmt, ...)
{
	va_list ap;

	if (g_atomic_int_add(&st->failures, 1) >= 20)
		return;
	va_start(ap, fmt);
	fprintf(stderr, "nbdc-cli: stress: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
}

static void stress_done(void *opaque, int err)
{
	struct sop *op = opaque;

	if (in_submit)
		g_atomic_int_inc(&op->st->reentrant);
	if (g_atomic_int_add(&op->done_count, 1) != 0) {
		g_atomic_int_inc(&op->st->double_done);
		return;
	}
	op->err = err;
	completion_done(op->done, err);
}

static guint64 xorshift(guint64 *s)
{
	guint64 v = *s;

	v ^= v << 13;
	v ^= v >> 7;
	v ^= v << 17;
	*s = v;
	return v;
}

static void fill_random(uint8_t *buf, size_t len, guint64 *s)
{
	size_t i = 0;

	for (; i + 8 <= len; i += 8) {
		guint64 v = xorshift(s);

		memcpy(buf + i, &v, 8);
	}
	for (; i < len; i++)
		buf[i] = (uint8_t)xorshift(s);
}

static void make_iov(struct sop *op, GRand *rnd)
{
	op->iovcnt = g_rand_int_range(rnd, 1, 4);
	if (op->len < 3)
		op->iovcnt = 1;
	if (op->iovcnt == 1) {
		op->iov[0].iov_base = op->buf;
		op->iov[0].iov_len = op->len;
		return;
	}
	{
		uint32_t cut1 = g_rand_int_range(rnd, 1, op->len - 1);
		uint32_t cut2 = op->iovcnt == 3 ? (uint32_t)g_rand_int_range(rnd, cut1 + 1, op->len)
						: op->len;

		op->iov[0].iov_base = op->buf;
		op->iov[0].iov_len = cut1;
		op->iov[1].iov_base = op->buf + cut1;
		op->iov[1].iov_len = cut2 - cut1;
		if (op->iovcnt == 3) {
			op->iov[2].iov_base = op->buf + cut2;
			op->iov[2].iov_len = op->len - cut2;
		}
	}
}

static int stress_submit(struct stress *st, struct sop *op)
{
	int r;

	in_submit = TRUE;
	switch (op->kind) {
	case OP_READ:
		r = nbdc_aio_preadv(st->c, op->iov, op->iovcnt, op->off, 0, stress_done, op);
		break;
	case OP_WRITE:
		r = nbdc_aio_pwritev(st->c, op->iov, op->iovcnt, op->off, 0, stress_done, op);
		break;
	default:
		r = nbdc_aio_zero(st->c, op->len, op->off, 0, stress_done, op);
		break;
	}
	in_submit = FALSE;
	return r;
}

static int stress_sync(struct stress *st, struct sop *op)
{
	switch (op->kind) {
	case OP_READ:
		return nbdc_pread(st->c, op->buf, op->len, op->off, 0);
	case OP_WRITE:
		return nbdc_pwrite(st->c, op->buf, op->len, op->off, 0);
	default:
		return nbdc_zero(st->c, op->len, op->off, 0);
	}
}

static const char *op_name(int kind)
{
	return kind == OP_READ ? "read" : kind == OP_WRITE ? "write" : "zero";
}

static void stress_check(struct stress *st, struct sop *op)
{
	if (op->err) {
		stress_fail(st, "%s %s %" PRIu64 "+%u: %s", op->sync ? "sync" : "async",
			    op_name(op->kind), op->off, op->len, errname(op->err));
		return;
	}
	g_atomic_pointer_add(&st->bytes, op->len);
	switch (op->kind) {
	case OP_READ:
		g_atomic_pointer_add(&st->nreads, 1);
		if (memcmp(op->buf, st->model + op->off, op->len) != 0) {
			uint32_t i = 0;

			while (i < op->len && op->buf[i] == st->model[op->off + i])
				i++;
			g_atomic_int_inc(&st->mismatches);
			stress_fail(st,
				    "%s read %" PRIu64
				    "+%u: data differs from the model at %" PRIu64,
				    op->sync ? "sync" : "async", op->off, op->len, op->off + i);
		}
		break;
	case OP_WRITE:
		g_atomic_pointer_add(&st->nwrites, 1);
		memcpy(st->model + op->off, op->buf, op->len);
		break;
	default:
		g_atomic_pointer_add(&st->nzeroes, 1);
		memset(st->model + op->off, 0, op->len);
		break;
	}
}

static gpointer stress_thread(gpointer data)
{
	struct stress *st = ((struct stress **)data)[0];
	guint idx = GPOINTER_TO_UINT(((gpointer *)data)[1]);
	g_autoptr(GRand) rnd = g_rand_new_with_seed(st->seed * 7919u + idx);
	guint64 xs = ((guint64)st->seed << 32) ^ (idx + 1) ^ 0x9e3779b97f4a7c15ull;
	g_autofree gboolean *want = g_new0(gboolean, st->nregions);
	uint64_t nunits = st->size / st->unit;
	uint64_t maxunits = MAX(1, MIN(st->max_len, st->size) / st->unit);
	guint done = 0;

	while (done < st->ops && g_atomic_int_get(&st->failures) == 0) {
		struct sop ops[BATCH];
		int k = g_rand_int_range(rnd, 1, BATCH + 1), nops = 0;
		gint64 deadline;

		if ((guint)k > st->ops - done)
			k = st->ops - done;
		memset(want, 0, st->nregions * sizeof(gboolean));
		for (int i = 0; i < k; i++) {
			for (int tries = 0; tries < 8; tries++) {
				uint64_t lu = 1 + (uint64_t)(g_rand_double(rnd) * maxunits);
				uint64_t off, len, r0, r1;
				gboolean clash = FALSE;

				if (lu > maxunits)
					lu = maxunits;
				if (lu > nunits)
					lu = nunits;
				off = (uint64_t)(g_rand_double(rnd) * (nunits - lu + 1));
				if (off > nunits - lu)
					off = nunits - lu;
				off *= st->unit;
				len = lu * st->unit;
				r0 = off / REGION;
				r1 = (off + len - 1) / REGION;
				for (uint64_t r = r0; r <= r1; r++)
					clash |= want[r];
				if (clash)
					continue;
				for (uint64_t r = r0; r <= r1; r++)
					want[r] = TRUE;
				memset(&ops[nops], 0, sizeof(ops[nops]));
				ops[nops].st = st;
				ops[nops].off = off;
				ops[nops].len = (uint32_t)len;
				nops++;
				break;
			}
		}
		if (nops == 0)
			continue;
		for (guint r = 0; r < st->nregions; r++)
			if (want[r])
				g_mutex_lock(&st->locks[r]);

		for (int i = 0; i < nops; i++) {
			struct sop *op = &ops[i];
			guint p = g_rand_int_range(rnd, 0, 100);

			op->kind = !st->writable ? OP_READ
				   : p < 45	 ? OP_READ
				   : p < 92	 ? OP_WRITE
						 : OP_ZERO;
			op->sync = g_rand_int_range(rnd, 0, 100) < 20;
			op->buf = g_malloc(op->len);
			if (op->kind == OP_WRITE)
				fill_random(op->buf, op->len, &xs);
			else
				memset(op->buf, 0xa5, op->len);
			make_iov(op, rnd);
		}
		/* Submit every async op first, then run the sync ones meanwhile. */
		for (int i = 0; i < nops; i++) {
			struct sop *op = &ops[i];
			int r;

			if (op->sync)
				continue;
			op->done = completion_new();
			r = stress_submit(st, op);
			if (r < 0) {
				op->err = r;
				g_atomic_int_inc(&op->done_count);
				completion_done(op->done, r); /* refused: no callback will run */
			}
		}
		for (int i = 0; i < nops; i++) {
			if (ops[i].sync) {
				ops[i].err = stress_sync(st, &ops[i]);
				g_atomic_pointer_add(&st->nsync, 1);
			}
		}
		deadline = g_get_monotonic_time() + WATCHDOG_US;
		for (int i = 0; i < nops; i++) {
			if (ops[i].done && !completion_wait_until(ops[i].done, deadline, NULL)) {
				int pending = 0;

				for (int j = 0; j < nops; j++)
					pending += ops[j].done && !completion_is_done(ops[j].done);
				fprintf(stderr, "nbdc-cli: stress: %d requests never completed\n",
					pending);
				fflush(stderr);
				_exit(3); /* callbacks still reference our stack */
			}
		}
		for (int i = 0; i < nops; i++) {
			completion_unref(ops[i].done);
			stress_check(st, &ops[i]);
			g_free(ops[i].buf);
		}
		for (guint r = st->nregions; r-- > 0;)
			if (want[r])
				g_mutex_unlock(&st->locks[r]);
		done += nops;

		if (st->can_flush && g_rand_int_range(rnd, 0, 64) == 0) {
			int r = nbdc_flush(st->c);

			g_atomic_pointer_add(&st->nflush, 1);
			if (r < 0)
				stress_fail(st, "flush: %s", errname(r));
		}
	}
	return NULL;
}

static int stress_read_all(struct stress *st, uint8_t *dst)
{
	for (uint64_t off = 0; off < st->size; off += CHUNK) {
		uint64_t n = MIN(CHUNK, st->size - off);
		int r = nbdc_pread(st->c, dst + off, n, off, 0);

		if (r < 0) {
			io_fail("stress: read-all", off, n, r);
			return -1;
		}
	}
	return 0;
}

int stress_run(Nbdc *c, uint64_t nthreads, uint64_t nops, uint64_t seed, uint32_t max_len)
{
	struct stress st = { 0 };
	struct nbdc_info info;
	g_autofree GThread **threads = NULL;
	g_autofree gpointer *args = NULL;
	g_autofree uint8_t *check = NULL;
	int status = 0;

	st.c = c;
	nbdc_get_info(st.c, &info);
	st.unit = info.block_min ? info.block_min : 512;
	if (st.unit > REGION) {
		fprintf(stderr, "nbdc-cli: stress: block_min %u too large\n", st.unit);
		return 1;
	}
	st.size = info.size / st.unit * st.unit;
	if (st.size == 0 || st.size > (64u << 20)) {
		fprintf(stderr, "nbdc-cli: stress: export size %" PRIu64 " unsuitable\n",
			info.size);
		return 1;
	}
	st.writable = info.read_write;
	st.can_flush = info.can_flush;
	st.ops = nops;
	st.seed = (guint32)seed;
	st.max_len = max_len > 0 ? max_len : STRESS_MAX_LEN;
	if (st.max_len > (64u << 20))
		st.max_len = 64u << 20;
	st.nregions = (st.size + REGION - 1) / REGION;
	st.locks = g_new0(GMutex, st.nregions);
	for (guint r = 0; r < st.nregions; r++)
		g_mutex_init(&st.locks[r]);
	st.model = g_malloc(st.size);
	if (stress_read_all(&st, st.model) < 0) {
		status = 1;
		goto out;
	}

	threads = g_new0(GThread *, nthreads);
	args = g_new0(gpointer, 2 * nthreads);
	for (uint64_t t = 0; t < nthreads; t++) {
		args[2 * t] = &st;
		args[2 * t + 1] = GUINT_TO_POINTER((guint)t);
		threads[t] = g_thread_new("stress", stress_thread, &args[2 * t]);
	}
	for (uint64_t t = 0; t < nthreads; t++)
		g_thread_join(threads[t]);

	if (st.can_flush && st.writable) {
		int r = nbdc_flush(st.c);

		if (r < 0)
			stress_fail(&st, "final flush: %s", errname(r));
	}
	check = g_malloc(st.size);
	if (stress_read_all(&st, check) < 0) {
		status = 1;
	} else if (memcmp(check, st.model, st.size) != 0) {
		uint64_t i = 0;

		while (check[i] == st.model[i])
			i++;
		stress_fail(&st, "final re-read differs from the model at %" PRIu64, i);
	}
	printf("stress threads=%" PRIu64 " reads=%" G_GINT64_FORMAT " writes=%" G_GINT64_FORMAT
	       " zeroes=%" G_GINT64_FORMAT " sync=%" G_GINT64_FORMAT " flushes=%" G_GINT64_FORMAT
	       " bytes=%" G_GINT64_FORMAT
	       " failures=%d mismatches=%d reentrant=%d double_done=%d\n",
	       nthreads, st.nreads, st.nwrites, st.nzeroes, st.nsync, st.nflush, st.bytes,
	       st.failures, st.mismatches, st.reentrant, st.double_done);
	fflush(stdout);
	if (st.failures || st.reentrant || st.double_done)
		status = 1;
out:
	for (guint r = 0; r < st.nregions; r++)
		g_mutex_clear(&st.locks[r]);
	g_free(st.locks);
	g_free(st.model);
	return status;
}
