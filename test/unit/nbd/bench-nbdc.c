/* bench-nbdc.c: micro-benchmark of the NBD client core (not a test).
 *
 * Runs T threads, each keeping Q asynchronous requests in flight against one
 * server for a fixed time, and prints IOPS, MB/s and the process's CPU
 * seconds (user+sys) per GiB and per request.  Callbacks (on the readers)
 * only count and wake the issuing thread when it sleeps.
 *
 *   bench-nbdc -U SOCKET [-m randread|randwrite|seqread|seqwrite] [-b BS]
 *              [-q QD] [-t THREADS] [-s SECONDS] [-c CONNS] [-n MAXREQS]
 *              [-i MAX_IN_FLIGHT] [-V] [-L] [-P]
 *
 * -L opens the handle as the daemon does (nbdc_probe_exports, nbdc_open):
 * connections open on demand, up to -c (0: the default).  -P drives the
 * requests from the event loops instead of threads: each thread's QD
 * requests start from a loop, and each completion submits the next one
 * from its callback (the pattern of a FUSE layer served by the loops).
 * The last line gives the requests completed and the connections used.
 *
 * -V (reads against `nbdkit pattern`) checks every block read: each 8-byte
 * word holds its own offset, so a reply delivered to the wrong request
 * shows up as an error. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/uio.h>

#include "nbdfs/loop.h"
#include "nbdfs/nbd.h"

static char *opt_socket, *opt_mode = "randread";
static gint opt_bs = 4096, opt_qd = 32, opt_threads = 1, opt_secs = 5, opt_conns = 1;
static gint64 opt_max;	  /* stop after this many requests per thread (0 = time only) */
static gint opt_inflight; /* cfg.max_in_flight (0 = default) */
static gboolean opt_verify, opt_lazy, opt_loops;

struct slot;

struct worker {
	struct slot *slots;
	Nbdc *c;
	GThread *th;
	GMutex m;
	GCond cv;
	gint inflight;	 /* under @m */
	int *free_slots; /* stack of free slot indexes, under @m */
	int nfree;
	gboolean sleeping; /* under @m */
	gint64 done, errs, issued;
	Loop *loop; /* -P: where its requests start */
	guint32 seed;
	uint64_t size, pos;
	char *buf;
};

static volatile gint stop;

struct slot {
	struct worker *w;
	struct iovec iov;
	uint64_t off;
};

static void submit_next(struct slot *sl);

static void on_done(void *opaque, int err)
{
	struct slot *sl = opaque;
	struct worker *w = sl->w;

	if (!err && opt_verify) {
		const unsigned char *p = sl->iov.iov_base;

		for (size_t i = 0; i + 8 <= sl->iov.iov_len; i += 8) {
			uint64_t v;

			memcpy(&v, p + i, 8);
			if (GUINT64_FROM_BE(v) != sl->off + i) {
				err = -EILSEQ;
				break;
			}
		}
	}
	g_mutex_lock(&w->m);
	w->done++;
	if (err)
		w->errs++;
	if (opt_loops && !g_atomic_int_get(&stop) && (!opt_max || w->issued < opt_max)) {
		w->issued++;
		g_mutex_unlock(&w->m);
		submit_next(sl); /* from this loop, in the callback */
		return;
	}
	w->free_slots[w->nfree++] = (int)(sl - w->slots);
	w->inflight--;
	if (w->sleeping)
		g_cond_signal(&w->cv);
	g_mutex_unlock(&w->m);
}

/* The offset of the next request of @w (under w->m, or its only thread). */
static uint64_t next_offset(struct worker *w)
{
	uint64_t blocks = w->size / (uint64_t)opt_bs, off;

	if (strstr(opt_mode, "rand")) {
		w->seed = w->seed * 1103515245u + 12345u;
		return ((uint64_t)w->seed * 2654435761u % blocks) * (uint64_t)opt_bs;
	}
	off = w->pos;
	w->pos += (uint64_t)opt_bs;
	if (w->pos + (uint64_t)opt_bs > w->size)
		w->pos = 0;
	return off;
}

static int submit(struct slot *sl)
{
	struct worker *w = sl->w;

	return strstr(opt_mode, "read")
		       ? nbdc_aio_preadv(w->c, &sl->iov, 1, sl->off, 0, on_done, sl)
		       : nbdc_aio_pwritev(w->c, &sl->iov, 1, sl->off, 0, on_done, sl);
}

/* -P: the next request of @sl's worker, on the calling loop. */
static void submit_next(struct slot *sl)
{
	struct worker *w = sl->w;

	g_mutex_lock(&w->m);
	sl->off = next_offset(w);
	g_mutex_unlock(&w->m);
	int r = submit(sl);
	if (r < 0) {
		g_printerr("submit: %s\n", g_strerror(-r));
		g_mutex_lock(&w->m);
		w->errs++;
		w->free_slots[w->nfree++] = (int)(sl - w->slots);
		w->inflight--;
		if (w->sleeping)
			g_cond_signal(&w->cv);
		g_mutex_unlock(&w->m);
	}
}

/* -P: a worker's first QD requests, from a loop. */
static void start_on_loop(void *opaque)
{
	struct worker *w = opaque;

	for (int i = 0; i < opt_qd; i++) {
		g_mutex_lock(&w->m);
		int slot = w->free_slots[--w->nfree];
		w->inflight++;
		w->issued++;
		g_mutex_unlock(&w->m);
		submit_next(&w->slots[slot]);
	}
}

static gpointer worker_main(gpointer data)
{
	struct worker *w = data;
	/* One buffer slot per queue entry (contents irrelevant). */
	struct slot *sl = g_new(struct slot, opt_qd);
	int slot;

	w->slots = sl;
	w->free_slots = g_new(int, opt_qd);
	for (int i = 0; i < opt_qd; i++) {
		w->free_slots[w->nfree++] = i;
		sl[i].w = w;
		sl[i].iov.iov_base = w->buf + (size_t)i * (size_t)opt_bs;
		sl[i].iov.iov_len = (size_t)opt_bs;
	}
	if (opt_loops)
		loop_post(w->loop, start_on_loop, w);
	while (!opt_loops && !g_atomic_int_get(&stop) && (!opt_max || w->issued < opt_max)) {
		g_mutex_lock(&w->m);
		while (w->inflight >= opt_qd) {
			w->sleeping = TRUE;
			g_cond_wait(&w->cv, &w->m);
			w->sleeping = FALSE;
		}
		w->inflight++;
		slot = w->free_slots[--w->nfree];
		sl[slot].off = next_offset(w);
		w->issued++;
		g_mutex_unlock(&w->m);
		int r = submit(&sl[slot]);
		if (r < 0) {
			g_printerr("submit: %s\n", g_strerror(-r));
			g_mutex_lock(&w->m);
			w->free_slots[w->nfree++] = slot;
			w->inflight--;
			w->errs++;
			g_mutex_unlock(&w->m);
			break;
		}
	}
	g_mutex_lock(&w->m);
	while (w->inflight > 0 || (opt_loops && w->issued == 0)) {
		w->sleeping = TRUE;
		g_cond_wait(&w->cv, &w->m);
		w->sleeping = FALSE;
	}
	g_mutex_unlock(&w->m);
	g_free(sl);
	g_free(w->free_slots);
	return NULL;
}

static double cpu_now(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
	       ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
	GOptionEntry entries[] = {
		{ "socket", 'U', 0, G_OPTION_ARG_STRING, &opt_socket, "unix socket", "PATH" },
		{ "mode", 'm', 0, G_OPTION_ARG_STRING, &opt_mode,
		  "randread|randwrite|seqread|seqwrite", "M" },
		{ "bs", 'b', 0, G_OPTION_ARG_INT, &opt_bs, "block size", "N" },
		{ "qd", 'q', 0, G_OPTION_ARG_INT, &opt_qd, "queue depth per thread", "N" },
		{ "threads", 't', 0, G_OPTION_ARG_INT, &opt_threads, "threads", "N" },
		{ "seconds", 's', 0, G_OPTION_ARG_INT, &opt_secs, "run time", "N" },
		{ "conns", 'c', 0, G_OPTION_ARG_INT, &opt_conns, "connections (0 = default)", "N" },
		{ "max", 'n', 0, G_OPTION_ARG_INT64, &opt_max, "requests per thread (0 = no limit)",
		  "N" },
		{ "in-flight", 'i', 0, G_OPTION_ARG_INT, &opt_inflight,
		  "max_in_flight per connection", "N" },
		{ "verify", 'V', 0, G_OPTION_ARG_NONE, &opt_verify, "check reads of nbdkit pattern",
		  NULL },
		{ "lazy", 'L', 0, G_OPTION_ARG_NONE, &opt_lazy,
		  "open as the daemon does (on demand)", NULL },
		{ "loops", 'P', 0, G_OPTION_ARG_NONE, &opt_loops, "submit from the event loops",
		  NULL },
		{ NULL }
	};
	g_autoptr(GOptionContext) ctx = g_option_context_new("- NBD core benchmark");
	g_autoptr(GError) err = NULL;
	struct nbdc_config cfg;

	g_option_context_add_main_entries(ctx, entries, NULL);
	if (!g_option_context_parse(ctx, &argc, &argv, &err) || !opt_socket || opt_bs <= 0 ||
	    opt_qd <= 0 || opt_threads <= 0) {
		g_printerr("%s\n", err ? err->message : "need -U SOCKET and positive numbers");
		return 2;
	}
	nbdc_config_init(&cfg);
	cfg.socket_path = opt_socket;
	cfg.connections = (guint)opt_conns;
	if (opt_inflight > 0)
		cfg.max_in_flight = (guint)opt_inflight;
	g_autoptr(LoopSet) loops = NULL;
	if (opt_loops) {
		loops = loop_set_new(0, 0, &err);
		if (!loops) {
			g_printerr("%s\n", err->message);
			return 1;
		}
		cfg.loops = loops;
	}
	Nbdc *c;
	if (opt_lazy) {
		const char *names[] = { "" };
		g_autoptr(GPtrArray) known = nbdc_probe_exports(&cfg, names, 1, FALSE, 1, &err);

		if (!known || ((struct nbdc_export *)known->pdata[0])->error) {
			g_printerr("%s\n",
				   known ? ((struct nbdc_export *)known->pdata[0])->error->message
					 : err->message);
			return 1;
		}
		c = nbdc_open(&cfg, known->pdata[0], &err);
	} else {
		c = nbdc_connect(&cfg, &err);
	}
	if (!c) {
		g_printerr("%s\n", err->message);
		return 1;
	}
	struct nbdc_info info;
	nbdc_get_info(c, &info);

	struct worker *ws = g_new0(struct worker, opt_threads);
	double cpu0 = cpu_now();
	gint64 t0 = g_get_monotonic_time();
	for (int i = 0; i < opt_threads; i++) {
		struct worker *w = &ws[i];

		w->c = c;
		g_mutex_init(&w->m);
		g_cond_init(&w->cv);
		w->seed = 12345u + (guint32)i * 7919u;
		w->size = info.size;
		w->pos = info.size / (uint64_t)opt_threads * (uint64_t)i / (uint64_t)opt_bs *
			 (uint64_t)opt_bs;
		w->buf = g_malloc0((size_t)opt_qd * (size_t)opt_bs);
		if (opt_loops)
			w->loop = loop_set_get(loops, (guint)i % loop_set_size(loops));
		w->th = g_thread_new("bench", worker_main, w);
	}
	if (!opt_max) {
		g_usleep((gulong)opt_secs * G_USEC_PER_SEC);
		g_atomic_int_set(&stop, 1);
	}
	gint64 total = 0, errs = 0;
	for (int i = 0; i < opt_threads; i++) {
		g_thread_join(ws[i].th);
		total += ws[i].done;
		errs += ws[i].errs;
		g_free(ws[i].buf);
		g_mutex_clear(&ws[i].m);
		g_cond_clear(&ws[i].cv);
	}
	double secs = (double)(g_get_monotonic_time() - t0) / 1e6;
	double cpu = cpu_now() - cpu0;
	struct nbdc_health health;
	nbdc_get_health(c, &health);
	double bytes = (double)total * opt_bs;
	printf("%s bs=%d qd=%d threads=%d conns=%u: %.0f IOPS %.1f MB/s cpu %.2fs "
	       "(%.2f s/GiB, %.1f us/req) errors=%" G_GINT64_FORMAT "\n",
	       opt_mode, opt_bs, opt_qd, opt_threads, health.connections, total / secs,
	       bytes / secs / 1e6, cpu, cpu / (bytes / 1073741824.0), cpu / (double)total * 1e6,
	       errs);
	printf("requests=%" G_GINT64_FORMAT " connections=%u\n", total, health.connections);
	nbdc_free(c);
	g_free(ws);
	return errs ? 1 : 0;
}
