/* nbdc-cli.c: a command-line driver for the NBD client core (public nbd.h API
 * only), used by the integration tests in test/core/test_*.py.
 *
 *   nbdc-cli [OPTIONS] URI CMD [ARGS...] [CMD [ARGS...]]...
 *
 * Commands run in order on one handle (connected on first need); `list` uses
 * its own short-lived connection.  `repl` reads one command line at a time
 * from stdin and answers "OK" or "ERR <status>" after each, so a test can act
 * on the server between two requests.
 *
 * Exit status: 0 success, 1 an error (I/O: the errno name on stderr; setup:
 * the NbdcError kind and the GError message on stderr), 2 `list` refused with
 * POLICY or UNSUPPORTED, 3 a request that never completed (watchdog), 4 a
 * callback of `aio-bg` that did not run exactly once.
 * The `stress` engine lives in stress.c; requests left outstanding while the
 * handle is abandoned (`aio-bg` ... `aio-wait`) in outstanding.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "nbdfs/loop.h"
#include "nbdfs/nbd.h"
#include "nbdc-cli.h"
#include "outstanding.h"
#include "stress.h"

#define MAX_BUFFER (256u << 20) /* largest read/write buffer we allocate */

static struct {
	gint connections;
	char *tls_psk;
	char *tls_certificates;
	char *tls_username;
	char *tls_hostname;
	gboolean no_verify;
	gint timeout_ms;
	gint handshake_timeout_ms;
	gboolean no_sr;
	gboolean no_block_status;
	gboolean details;
	gboolean hex;
	gboolean keep_going;
	gboolean fua;
	gboolean fast_zero;
	gboolean debug;
	gboolean quiet_log;
	gint stress_max_len;
	gboolean aio_disconnect;
	gboolean req_one;
	gint max_in_flight;
	gint reconnect_ms;
} opt = { .timeout_ms = -1, .handshake_timeout_ms = -1, .reconnect_ms = -1 };

static GOptionEntry entries[] = {
	{ "connections", 0, 0, G_OPTION_ARG_INT, &opt.connections, "Connections (multi-conn)",
	  "N" },
	{ "tls-psk", 0, 0, G_OPTION_ARG_FILENAME, &opt.tls_psk, "PSK key file", "FILE" },
	{ "tls-certificates", 0, 0, G_OPTION_ARG_FILENAME, &opt.tls_certificates, "X.509 dir",
	  "DIR" },
	{ "tls-username", 0, 0, G_OPTION_ARG_STRING, &opt.tls_username, "PSK identity", "NAME" },
	{ "tls-hostname", 0, 0, G_OPTION_ARG_STRING, &opt.tls_hostname, "TLS peer name", "NAME" },
	{ "no-verify", 0, 0, G_OPTION_ARG_NONE, &opt.no_verify, "Do not verify the TLS peer",
	  NULL },
	{ "timeout-ms", 0, 0, G_OPTION_ARG_INT, &opt.timeout_ms, "Request timeout", "MS" },
	{ "handshake-timeout-ms", 0, 0, G_OPTION_ARG_INT, &opt.handshake_timeout_ms,
	  "Handshake timeout", "MS" },
	{ "no-sr", 0, 0, G_OPTION_ARG_NONE, &opt.no_sr, "Do not ask for structured replies", NULL },
	{ "no-block-status", 0, 0, G_OPTION_ARG_NONE, &opt.no_block_status,
	  "Do not ask for base:allocation", NULL },
	{ "details", 0, 0, G_OPTION_ARG_NONE, &opt.details, "list: ask NBD_OPT_INFO per export",
	  NULL },
	{ "hex", 0, 0, G_OPTION_ARG_NONE, &opt.hex, "read: print hex instead of raw bytes", NULL },
	{ "keep-going", 'k', 0, G_OPTION_ARG_NONE, &opt.keep_going,
	  "Run later commands after an error", NULL },
	{ "fua", 0, 0, G_OPTION_ARG_NONE, &opt.fua, "write/trim/zero with FUA", NULL },
	{ "fast-zero", 0, 0, G_OPTION_ARG_NONE, &opt.fast_zero, "zero with FAST_ZERO", NULL },
	{ "debug", 0, 0, G_OPTION_ARG_NONE, &opt.debug, "Core debug log", NULL },
	{ "quiet-log", 0, 0, G_OPTION_ARG_NONE, &opt.quiet_log, "Drop core log lines", NULL },
	{ "req-one", 0, 0, G_OPTION_ARG_NONE, &opt.req_one, "extents with REQ_ONE", NULL },
	{ "max-in-flight", 0, 0, G_OPTION_ARG_INT, &opt.max_in_flight,
	  "Requests in flight per connection", "N" },
	{ "reconnect-ms", 0, 0, G_OPTION_ARG_INT, &opt.reconnect_ms,
	  "Reconnect a lost connection; a request waits this long for one", "MS" },
	{ "aio-disconnect", 0, 0, G_OPTION_ARG_NONE, &opt.aio_disconnect,
	  "aio-reads: call nbdc_disconnect while the reads are in flight", NULL },
	{ "stress-max-len", 0, 0, G_OPTION_ARG_INT, &opt.stress_max_len,
	  "stress: largest request (default 32K)", "BYTES" },
	{ NULL }
};

struct ctx {
	const char *uri_str;
	NbdcUri *uri;
	struct nbdc_config cfg;
	Nbdc *c;
	gboolean connect_failed;
};

/* ---- helpers ------------------------------------------------------------ */

static const char *kind_name(int code)
{
	switch (code) {
	case NBDC_ERROR_URI:
		return "URI";
	case NBDC_ERROR_CONNECT:
		return "CONNECT";
	case NBDC_ERROR_HANDSHAKE:
		return "HANDSHAKE";
	case NBDC_ERROR_TLS:
		return "TLS";
	case NBDC_ERROR_TLS_REQUIRED:
		return "TLS_REQUIRED";
	case NBDC_ERROR_NO_EXPORT:
		return "NO_EXPORT";
	case NBDC_ERROR_POLICY:
		return "POLICY";
	case NBDC_ERROR_UNSUPPORTED:
		return "UNSUPPORTED";
	case NBDC_ERROR_SERVER:
		return "SERVER";
	case NBDC_ERROR_TIMEOUT:
		return "TIMEOUT";
	case NBDC_ERROR_INVALID:
		return "INVALID";
	default:
		return "UNKNOWN";
	}
}

static void print_gerror(const char *what, const GError *err)
{
	if (err && err->domain == NBDC_ERROR)
		fprintf(stderr, "nbdc-cli: %s: %s: %s\n", what, kind_name(err->code), err->message);
	else
		fprintf(stderr, "nbdc-cli: %s: OTHER: %s\n", what,
			err ? err->message : "(no GError)");
}

/* Parses a byte count or offset: decimal or 0x hex, optional k/K, M, G suffix. */
static gboolean parse_u64(const char *s, uint64_t *out)
{
	char *end = NULL;
	guint64 v, mul = 1;

	if (!s || !*s || *s == '-')
		return FALSE;
	errno = 0;
	v = g_ascii_strtoull(s, &end, 0);
	if (errno || end == s)
		return FALSE;
	if (*end == 'k' || *end == 'K')
		mul = 1024, end++;
	else if (*end == 'M')
		mul = 1024 * 1024, end++;
	else if (*end == 'G')
		mul = 1024 * 1024 * 1024, end++;
	if (*end)
		return FALSE;
	if (v > G_MAXUINT64 / mul)
		return FALSE;
	*out = v * mul;
	return TRUE;
}

static void log_cb(void *opaque, enum nbdc_log_level level, const char *msg)
{
	static const char *names[] = { "debug", "info", "warning" };

	if (opt.quiet_log)
		return;
	fprintf(stderr, "nbdc-cli: core %s: %s\n",
		(unsigned)level < G_N_ELEMENTS(names) ? names[level] : "?", msg);
}

static Nbdc *get_handle(struct ctx *x)
{
	g_autoptr(GError) err = NULL;

	if (x->c)
		return x->c;
	if (x->connect_failed)
		return NULL;
	x->c = nbdc_connect(&x->cfg, &err);
	if (!x->c) {
		x->connect_failed = TRUE;
		print_gerror("connect", err);
	}
	return x->c;
}

/* ---- synchronous commands ---------------------------------------------- */

static int cmd_info(struct ctx *x, char **a)
{
	struct nbdc_info i;
	g_autofree char *name = NULL, *desc = NULL;
	Nbdc *c = get_handle(x);

	if (!c)
		return 1;
	nbdc_get_info(c, &i);
	name = g_strescape(i.export_name ? i.export_name : "(null)", NULL);
	desc = g_strescape(i.description ? i.description : "(null)", NULL);
	printf("size=%" PRIu64 "\n", i.size);
	printf("sector_size=%u\n", i.sector_size);
	printf("size_sectors=%" PRIu64 "\n", i.size_sectors);
	printf("read_write=%d\n", !!i.read_write);
	printf("eflags=0x%04x\n", i.eflags);
	printf("can_flush=%d\n", !!i.can_flush);
	printf("can_fua=%d\n", !!i.can_fua);
	printf("can_trim=%d\n", !!i.can_trim);
	printf("can_zero=%d\n", !!i.can_zero);
	printf("can_fast_zero=%d\n", !!i.can_fast_zero);
	printf("can_multi_conn=%d\n", !!i.can_multi_conn);
	printf("can_block_status=%d\n", !!i.can_block_status);
	printf("structured_replies=%d\n", !!i.structured_replies);
	printf("tls=%d\n", !!i.tls);
	printf("block_min=%u\n", i.block_min);
	printf("block_pref=%u\n", i.block_pref);
	printf("block_max=%u\n", i.block_max);
	printf("max_request=%u\n", i.max_request);
	printf("connections=%u\n", i.connections);
	printf("protocol=%s\n", i.protocol ? i.protocol : "(null)");
	printf("export_name=%s\n", name);
	printf("description=%s\n", desc);
	printf("alive=%d\n", !!nbdc_is_alive(c));
	fflush(stdout);
	return 0;
}

static int cmd_list(struct ctx *x, char **a)
{
	g_autoptr(GError) err = NULL;
	g_autoptr(GPtrArray) list = nbdc_list_exports(&x->cfg, opt.details, &err);

	if (!list) {
		print_gerror("list", err);
		if (err && err->domain == NBDC_ERROR &&
		    (err->code == NBDC_ERROR_POLICY || err->code == NBDC_ERROR_UNSUPPORTED))
			return 2;
		return 1;
	}
	for (guint n = 0; n < list->len; n++) {
		const struct nbdc_export *e = g_ptr_array_index(list, n);
		g_autofree char *name = g_strescape(e->name ? e->name : "(null)", NULL);
		g_autofree char *desc =
			g_strescape(e->description ? e->description : "(null)", NULL);

		printf("%s\t%s", name, desc);
		if (opt.details) {
			if (e->has_info)
				printf("\tsize=%" PRIu64 " eflags=0x%04x read_only=%d block_min=%u"
				       " block_pref=%u block_max=%u",
				       e->size, e->eflags, !!e->read_only, e->block_min,
				       e->block_pref, e->block_max);
			else
				printf("\tnoinfo");
		}
		printf("\n");
	}
	fflush(stdout);
	return 0;
}

static gboolean get_range(char **a, uint64_t *off, uint64_t *len)
{
	if (!parse_u64(a[0], off) || !parse_u64(a[1], len)) {
		fprintf(stderr, "nbdc-cli: bad offset/length '%s' '%s'\n", a[0], a[1]);
		return FALSE;
	}
	return TRUE;
}

/* OFF LEN of @name, which holds LEN bytes in memory (at most MAX_BUFFER). */
static gboolean get_buffer_range(char **a, const char *name, uint64_t *off, uint64_t *len)
{
	if (!get_range(a, off, len))
		return FALSE;
	if (*len > MAX_BUFFER) {
		fprintf(stderr, "nbdc-cli: %s: length too large\n", name);
		return FALSE;
	}
	return TRUE;
}

static int cmd_read(struct ctx *x, char **a)
{
	uint64_t off, len;
	g_autofree uint8_t *buf = NULL;
	Nbdc *c;
	int r;

	if (!get_buffer_range(a, "read", &off, &len) || !(c = get_handle(x)))
		return 1;
	buf = g_malloc(len ? len : 1);
	r = nbdc_pread(c, buf, len, off, 0);
	if (r < 0)
		return io_fail("read", off, len, r);
	if (opt.hex) {
		for (uint64_t n = 0; n < len; n++)
			printf("%02x", buf[n]);
		printf("\n");
	} else {
		fwrite(buf, 1, len, stdout);
	}
	fflush(stdout);
	return 0;
}

static int cmd_write(struct ctx *x, char **a)
{
	uint64_t off, len, got = 0;
	g_autofree uint8_t *buf = NULL;
	Nbdc *c;
	int r;

	if (!get_buffer_range(a, "write", &off, &len))
		return 1;
	buf = g_malloc(len ? len : 1);
	while (got < len) {
		ssize_t n = read(STDIN_FILENO, buf + got, len - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr,
				"nbdc-cli: write: stdin gave %" PRIu64 " of %" PRIu64 " bytes\n",
				got, len);
			return 1;
		}
		got += n;
	}
	if (!(c = get_handle(x)))
		return 1;
	r = nbdc_pwrite(c, buf, len, off, opt.fua ? NBDC_CMD_FLAG_FUA : 0);
	if (r < 0)
		return io_fail("write", off, len, r);
	return 0;
}

static int cmd_flush(struct ctx *x, char **a)
{
	Nbdc *c = get_handle(x);
	int r;

	if (!c)
		return 1;
	r = nbdc_flush(c);
	if (r < 0)
		return io_fail("flush", 0, 0, r);
	return 0;
}

static int cmd_trim(struct ctx *x, char **a)
{
	uint64_t off, len;
	Nbdc *c;
	int r;

	if (!get_range(a, &off, &len) || !(c = get_handle(x)))
		return 1;
	r = nbdc_trim(c, len, off, opt.fua ? NBDC_CMD_FLAG_FUA : 0);
	if (r < 0)
		return io_fail("trim", off, len, r);
	return 0;
}

static int cmd_zero(struct ctx *x, char **a)
{
	uint64_t off, len;
	uint32_t flags = 0;
	Nbdc *c;
	int r;

	if (!get_range(a, &off, &len) || !(c = get_handle(x)))
		return 1;
	if (opt.fua)
		flags |= NBDC_CMD_FLAG_FUA;
	if (opt.fast_zero)
		flags |= NBDC_CMD_FLAG_FAST_ZERO;
	r = nbdc_zero(c, len, off, flags);
	if (r < 0)
		return io_fail("zero", off, len, r);
	return 0;
}

struct extent_list {
	GArray *a; /* of uint64_t triples */
	gboolean bad_order;
	uint64_t next;
};

static void extent_cb(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct extent_list *l = opaque;
	uint64_t t[3] = { offset, length, flags };

	if (l->a->len && offset != l->next)
		l->bad_order = TRUE;
	l->next = offset + length;
	g_array_append_vals(l->a, t, 3);
}

/* The aio path: one opaque for the extents and the completion. */
struct extent_wait {
	struct extent_list l;
	struct completion *done; /* the done callback's reference */
};

static void aio_extent_cb(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	struct extent_wait *w = opaque;

	extent_cb(&w->l, offset, length, flags);
}

static void aio_extent_done(void *opaque, int err)
{
	struct extent_wait *w = opaque;

	completion_done(w->done, err);
}

static int aio_block_status(Nbdc *c, uint64_t count, uint64_t offset, struct extent_list *l)
{
	struct extent_wait w = { .l = *l, .done = completion_new() };
	gint64 deadline = g_get_monotonic_time() + WATCHDOG_US;
	gint64 err;
	int r;

	r = nbdc_aio_block_status(c, count, offset, opt.req_one ? NBDC_CMD_FLAG_REQ_ONE : 0,
				  aio_extent_cb, aio_extent_done, &w);
	if (r == 0) {
		if (!completion_wait_until(w.done, deadline, &err)) {
			fprintf(stderr, "nbdc-cli: aio-extents: request never completed\n");
			fflush(stderr);
			_exit(3); /* the callback still references our stack */
		}
		r = (int)err;
	} else {
		completion_done(w.done, r); /* refused: no callback will drop its reference */
	}
	completion_unref(w.done);
	*l = w.l;
	return r;
}

/* extents OFF LEN (the synchronous wrapper) / aio-extents OFF LEN (aio). */
static int do_extents(struct ctx *x, char **a, gboolean aio)
{
	const char *name = aio ? "aio-extents" : "extents";
	uint64_t off, len;
	struct extent_list l = { 0 };
	Nbdc *c;
	int r;

	if (!get_range(a, &off, &len) || !(c = get_handle(x)))
		return 1;
	l.a = g_array_new(FALSE, FALSE, sizeof(uint64_t));
	/* The server may describe only a prefix: ask again from where it stopped. */
	for (uint64_t pos = off; pos < off + len;) {
		guint before = l.a->len;

		if (aio)
			r = aio_block_status(c, off + len - pos, pos, &l);
		else
			r = nbdc_block_status(c, off + len - pos, pos,
					      opt.req_one ? NBDC_CMD_FLAG_REQ_ONE : 0, extent_cb,
					      &l);
		if (r < 0) {
			g_array_unref(l.a);
			return io_fail(name, pos, off + len - pos, r);
		}
		if (l.a->len == before || l.next <= pos) {
			printf("NOPROGRESS %" PRIu64 "\n", pos);
			break;
		}
		pos = l.next;
	}
	for (guint n = 0; n + 2 < l.a->len; n += 3) {
		uint64_t *t = &g_array_index(l.a, uint64_t, n);

		printf("%" PRIu64 " %" PRIu64 " %" PRIu64 "%s%s\n", t[0], t[1], t[2],
		       (t[2] & NBDC_STATE_HOLE) ? " hole" : "",
		       (t[2] & NBDC_STATE_ZERO) ? " zero" : "");
	}
	if (l.bad_order)
		printf("NONCONTIGUOUS\n");
	fflush(stdout);
	g_array_unref(l.a);
	return 0;
}

static int cmd_extents(struct ctx *x, char **a)
{
	return do_extents(x, a, FALSE);
}

static int cmd_aio_extents(struct ctx *x, char **a)
{
	return do_extents(x, a, TRUE);
}

static uint8_t pattern_byte(uint64_t pos)
{
	uint64_t word = pos & ~(uint64_t)7;

	return (uint8_t)(word >> (8 * (7 - (pos & 7))));
}

/* The byte @name expects at @pos: the pattern when @byte < 0, else @byte;
 * says what is wrong and returns FALSE when @got differs. */
static gboolean check_byte(const char *name, uint64_t pos, uint8_t got, int byte)
{
	uint8_t want = byte < 0 ? pattern_byte(pos) : (uint8_t)byte;

	if (got == want)
		return TRUE;
	if (byte < 0)
		fprintf(stderr, "nbdc-cli: %s: mismatch at %" PRIu64 ": got 0x%02x, want 0x%02x\n",
			name, pos, got, want);
	else
		fprintf(stderr, "nbdc-cli: %s: byte at %" PRIu64 " is 0x%02x, want 0x%02x\n", name,
			pos, got, want);
	return FALSE;
}

/* [off, off + len) in CHUNK pieces: with @write, writes bytes of value @byte
 * (with FUA under --fua); else reads each piece and checks it (check_byte).
 * Returns the command's exit status (io_fail() names @name and the piece). */
static int io_chunks(Nbdc *c, const char *name, uint64_t off, uint64_t len, int byte,
		     gboolean write)
{
	g_autofree uint8_t *buf = g_malloc(CHUNK);

	if (write)
		memset(buf, byte, CHUNK);
	for (uint64_t done = 0; done < len;) {
		uint64_t n = MIN(len - done, CHUNK);
		int r = write ? nbdc_pwrite(c, buf, n, off + done, opt.fua ? NBDC_CMD_FLAG_FUA : 0)
			      : nbdc_pread(c, buf, n, off + done, 0);

		if (r < 0)
			return io_fail(name, off + done, n, r);
		for (uint64_t i = 0; !write && i < n; i++) {
			if (!check_byte(name, off + done + i, buf[i], byte))
				return 1;
		}
		done += n;
	}
	return 0;
}

static int cmd_verify_pattern(struct ctx *x, char **a)
{
	uint64_t off, len;
	Nbdc *c;

	if (!get_range(a, &off, &len) || !(c = get_handle(x)))
		return 1;
	if (io_chunks(c, "verify-pattern", off, len, -1, FALSE))
		return 1;
	printf("pattern ok %" PRIu64 " %" PRIu64 "\n", off, len);
	fflush(stdout);
	return 0;
}

static gboolean parse_byte(const char *s, uint8_t *b)
{
	uint64_t v;

	if (!parse_u64(s, &v) || v > 255) {
		fprintf(stderr, "nbdc-cli: bad byte '%s'\n", s);
		return FALSE;
	}
	*b = (uint8_t)v;
	return TRUE;
}

/* fill OFF LEN BYTE (@write) / expect OFF LEN BYTE. */
static int do_bytes(struct ctx *x, char **a, gboolean write)
{
	uint64_t off, len;
	uint8_t b;
	Nbdc *c;

	if (!get_range(a, &off, &len) || !parse_byte(a[2], &b) || !(c = get_handle(x)))
		return 1;
	return io_chunks(c, write ? "fill" : "expect", off, len, b, write);
}

static int cmd_fill(struct ctx *x, char **a)
{
	return do_bytes(x, a, TRUE);
}

static int cmd_expect(struct ctx *x, char **a)
{
	return do_bytes(x, a, FALSE);
}

static int cmd_alive(struct ctx *x, char **a)
{
	Nbdc *c = get_handle(x);
	const char *why;

	if (!c)
		return 1;
	why = nbdc_get_error(c);
	printf("alive=%d\n", !!nbdc_is_alive(c));
	if (why) {
		g_autofree char *e = g_strescape(why, NULL);

		printf("error=%s\n", e);
	}
	fflush(stdout);
	return 0;
}

static int cmd_disconnect(struct ctx *x, char **a)
{
	Nbdc *c = get_handle(x);

	if (!c)
		return 1;
	nbdc_disconnect(c);
	return 0;
}

/* ---- aio-reads: N concurrent reads, reported in completion order ------- */

struct aread {
	uint64_t off;
	uint8_t *buf;
	struct iovec iov; /* must stay valid until the completion */
	int err;
	struct completion *done; /* NULL until submitted */
};

struct aread_set {
	GMutex lock;
	GPtrArray *order; /* struct aread * in completion order, under @lock */
	guint64 len;
};

struct aread_op {
	struct aread_set *set;
	struct aread *r;
};

static void aread_done(void *opaque, int err)
{
	struct aread_op *op = opaque;
	struct aread_set *s = op->set;

	g_mutex_lock(&s->lock);
	op->r->err = err;
	g_ptr_array_add(s->order, op->r);
	g_mutex_unlock(&s->lock);
	completion_done(op->r->done, err);
}

/* aio-reads LEN N OFF1 ... OFFN: prints "done OFF ERR SHA256" per read. */
static int cmd_aio_reads(struct ctx *x, char **a, int *consumed)
{
	uint64_t len, n;
	struct aread_set s = { 0 };
	g_autofree struct aread *rs = NULL;
	g_autofree struct aread_op *ops = NULL;
	gint64 deadline;
	int status = 0;
	Nbdc *c;

	*consumed = 2;
	if (!a[0] || !a[1] || !parse_u64(a[0], &len) || !parse_u64(a[1], &n) || n == 0 ||
	    n > 1024 || len == 0 || len > (16u << 20)) {
		fprintf(stderr, "nbdc-cli: aio-reads LEN N OFF...: bad LEN or N\n");
		return 1;
	}
	for (uint64_t i = 0; i < n; i++) {
		if (!a[2 + i]) {
			fprintf(stderr, "nbdc-cli: aio-reads: missing offsets\n");
			return 1;
		}
	}
	*consumed = 2 + n;
	if (!(c = get_handle(x)))
		return 1;
	rs = g_new0(struct aread, n);
	ops = g_new0(struct aread_op, n);
	g_mutex_init(&s.lock);
	s.order = g_ptr_array_new();
	s.len = len;
	for (uint64_t i = 0; i < n; i++) {
		int r;

		if (!parse_u64(a[2 + i], &rs[i].off)) {
			fprintf(stderr, "nbdc-cli: aio-reads: bad offset '%s'\n", a[2 + i]);
			status = 1;
			break;
		}
		rs[i].buf = g_malloc(len);
		rs[i].iov.iov_base = rs[i].buf;
		rs[i].iov.iov_len = len;
		ops[i].set = &s;
		ops[i].r = &rs[i];
		rs[i].done = completion_new();
		r = nbdc_aio_preadv(c, &rs[i].iov, 1, rs[i].off, 0, aread_done, &ops[i]);
		if (r < 0) {
			completion_done(rs[i].done, r); /* refused: no callback will run */
			io_fail("aio-reads", rs[i].off, len, r);
			status = 1;
			break;
		}
	}
	if (opt.aio_disconnect) {
		gint64 t0 = g_get_monotonic_time();

		nbdc_disconnect(c);
		printf("disconnect took %" G_GINT64_FORMAT " ms\n",
		       (g_get_monotonic_time() - t0) / 1000);
	}
	deadline = g_get_monotonic_time() + WATCHDOG_US;
	for (uint64_t i = 0; i < n && rs[i].done; i++) {
		if (!completion_wait_until(rs[i].done, deadline, NULL)) {
			guint pending = 0;

			for (uint64_t k = 0; k < n && rs[k].done; k++)
				pending += !completion_is_done(rs[k].done);
			fprintf(stderr, "nbdc-cli: aio-reads: %u requests never completed\n",
				pending);
			fflush(stderr);
			_exit(3); /* callbacks still reference our stack: cannot return */
		}
	}
	for (guint i = 0; i < s.order->len; i++) {
		struct aread *r = g_ptr_array_index(s.order, i);
		g_autofree char *sum = NULL;

		if (!r->err)
			sum = g_compute_checksum_for_data(G_CHECKSUM_SHA256, r->buf, len);
		printf("done %" PRIu64 " %s %s\n", r->off, r->err ? errname(r->err) : "0",
		       sum ? sum : "-");
		if (r->err)
			status = 1;
	}
	fflush(stdout);
	for (uint64_t i = 0; i < n; i++) {
		g_free(rs[i].buf);
		completion_unref(rs[i].done);
	}
	g_ptr_array_unref(s.order);
	g_mutex_clear(&s.lock);
	return status;
}

static int cmd_stress(struct ctx *x, char **a)
{
	uint64_t nthreads, nops, seed;
	Nbdc *c;

	if (!parse_u64(a[0], &nthreads) || !parse_u64(a[1], &nops) || !parse_u64(a[2], &seed) ||
	    nthreads == 0 || nthreads > 64 || nops > 10000000) {
		fprintf(stderr, "nbdc-cli: stress THREADS OPS SEED: bad arguments\n");
		return 1;
	}
	if (!(c = get_handle(x)))
		return 1;
	return stress_run(c, nthreads, nops, seed,
			  opt.stress_max_len > 0 ? (uint32_t)opt.stress_max_len : 0);
}

/* ---- outstanding requests (outstanding.c) -------------------------------- */

static int cmd_aio_bg(struct ctx *x, char **a)
{
	uint64_t off, len;
	Nbdc *c;

	if (!get_range(a + 1, &off, &len) || !(c = get_handle(x)))
		return 1;
	return outstanding_submit(c, a[0], off, len);
}

static int cmd_abandon(struct ctx *x, char **a)
{
	Nbdc *c = get_handle(x);

	return c ? outstanding_abandon(c, FALSE) : 1;
}

static int cmd_abandon_on_loop(struct ctx *x, char **a)
{
	Nbdc *c = get_handle(x);

	return c ? outstanding_abandon(c, TRUE) : 1;
}

static int cmd_disconnect_bg(struct ctx *x, char **a)
{
	Nbdc *c = get_handle(x);

	return c ? outstanding_disconnect_bg(c) : 1;
}

static int cmd_aio_wait(struct ctx *x, char **a)
{
	uint64_t ms;

	if (!parse_u64(a[0], &ms)) {
		fprintf(stderr, "nbdc-cli: aio-wait MS: bad time '%s'\n", a[0]);
		return 1;
	}
	return outstanding_wait(ms);
}

/* ---- command dispatch ---------------------------------------------------- */

struct command {
	const char *name;
	int nargs;
	int (*fn)(struct ctx *x, char **a);
};

static const struct command commands[] = {
	{ "info", 0, cmd_info },
	{ "list", 0, cmd_list },
	{ "read", 2, cmd_read },
	{ "write", 2, cmd_write },
	{ "flush", 0, cmd_flush },
	{ "trim", 2, cmd_trim },
	{ "zero", 2, cmd_zero },
	{ "extents", 2, cmd_extents },
	{ "aio-extents", 2, cmd_aio_extents },
	{ "verify-pattern", 2, cmd_verify_pattern },
	{ "fill", 3, cmd_fill },
	{ "expect", 3, cmd_expect },
	{ "alive", 0, cmd_alive },
	{ "disconnect", 0, cmd_disconnect },
	{ "stress", 3, cmd_stress },
	{ "aio-bg", 3, cmd_aio_bg },
	{ "abandon", 0, cmd_abandon },
	{ "abandon-on-loop", 0, cmd_abandon_on_loop },
	{ "disconnect-bg", 0, cmd_disconnect_bg },
	{ "aio-wait", 1, cmd_aio_wait },
};

static int run_commands(struct ctx *x, char **argv, int argc, gboolean in_repl);

static int cmd_repl(struct ctx *x)
{
	char line[4096];
	int status = 0;

	while (fgets(line, sizeof(line), stdin)) {
		g_auto(GStrv) av = NULL;
		int ac = 0, r;

		g_strstrip(line);
		if (!*line || *line == '#')
			continue;
		if (!g_shell_parse_argv(line, &ac, &av, NULL)) {
			printf("ERR parse\n");
			fflush(stdout);
			continue;
		}
		r = run_commands(x, av, ac, TRUE);
		if (r)
			printf("ERR %d\n", r);
		else
			printf("OK\n");
		fflush(stdout);
		fflush(stderr);
		if (r)
			status = r;
	}
	return status;
}

static int run_commands(struct ctx *x, char **argv, int argc, gboolean in_repl)
{
	int status = 0;
	int i = 0;

	while (i < argc) {
		const char *name = argv[i];
		const struct command *cmd = NULL;
		int r;

		if (strcmp(name, "repl") == 0 && !in_repl) {
			r = cmd_repl(x);
			i++;
		} else if (strcmp(name, "aio-reads") == 0) {
			int used = 0;

			r = cmd_aio_reads(x, argv + i + 1, &used);
			i += 1 + used;
			if (i > argc)
				i = argc;
		} else {
			for (size_t n = 0; n < G_N_ELEMENTS(commands); n++)
				if (strcmp(commands[n].name, name) == 0)
					cmd = &commands[n];
			if (!cmd) {
				fprintf(stderr, "nbdc-cli: unknown command '%s'\n", name);
				return 1;
			}
			if (cmd->nargs > argc - i - 1) {
				fprintf(stderr, "nbdc-cli: %s needs %d arguments\n", name,
					cmd->nargs);
				return 1;
			}
			r = cmd->fn(x, argv + i + 1);
			i += 1 + cmd->nargs;
		}
		if (r) {
			if (!status || r > status)
				status = r;
			if (!opt.keep_going || x->connect_failed)
				return status;
		}
	}
	return status;
}

int main(int argc, char **argv)
{
	g_autoptr(GOptionContext) oc = g_option_context_new("URI CMD [ARGS]... [CMD [ARGS]...]...");
	g_autoptr(GError) err = NULL;
	struct ctx x = { 0 };
	int status;

	g_option_context_add_main_entries(oc, entries, NULL);
	g_option_context_set_summary(
		oc,
		"Commands: info | list [--details] | read OFF LEN | write OFF LEN (<data) | flush "
		"|\n"
		"  trim OFF LEN | zero OFF LEN | [aio-]extents OFF LEN | verify-pattern OFF LEN |\n"
		"  fill OFF LEN BYTE | expect OFF LEN BYTE | alive | disconnect |\n"
		"  aio-reads LEN N OFF... | stress THREADS OPS SEED | repl (commands from stdin) "
		"|\n"
		"  aio-bg read|write|flush|trim|zero OFF LEN | abandon | abandon-on-loop |\n"
		"  disconnect-bg | aio-wait MS");
	if (!g_option_context_parse(oc, &argc, &argv, &err)) {
		fprintf(stderr, "nbdc-cli: %s\n", err->message);
		return 1;
	}
	if (argc < 3) {
		fprintf(stderr, "usage: nbdc-cli [OPTIONS] URI CMD [ARGS]...\n");
		return 1;
	}
	x.uri_str = argv[1];
	x.uri = nbdc_uri_parse(x.uri_str, &err);
	if (!x.uri) {
		print_gerror("uri", err);
		return 1;
	}
	nbdc_config_init(&x.cfg);
	nbdc_config_set_uri(&x.cfg, x.uri);
	if (opt.connections > 0)
		x.cfg.connections = opt.connections;
	if (opt.max_in_flight > 0)
		x.cfg.max_in_flight = opt.max_in_flight;
	if (opt.tls_psk)
		x.cfg.tls_psk_file = opt.tls_psk;
	if (opt.tls_certificates)
		x.cfg.tls_certificates = opt.tls_certificates;
	if (opt.tls_username)
		x.cfg.tls_username = opt.tls_username;
	if (opt.tls_hostname)
		x.cfg.tls_hostname = opt.tls_hostname;
	if (opt.no_verify)
		x.cfg.tls_verify_peer = FALSE;
	if (opt.timeout_ms >= 0)
		x.cfg.request_timeout_ms = opt.timeout_ms;
	if (opt.handshake_timeout_ms >= 0)
		x.cfg.handshake_timeout_ms = opt.handshake_timeout_ms;
	if (opt.no_sr)
		x.cfg.structured_replies = FALSE;
	if (opt.no_block_status)
		x.cfg.block_status = FALSE;
	if (opt.reconnect_ms >= 0) {
		x.cfg.reconnect = TRUE;
		x.cfg.reconnect_timeout_ms = opt.reconnect_ms;
	}
	x.cfg.log = log_cb;
	x.cfg.debug = opt.debug;

	status = run_commands(&x, argv + 2, argc - 2, FALSE);

	nbdc_free(x.c);
	if (!status)
		status = outstanding_check();
	nbdc_uri_free(x.uri);
	g_free(opt.tls_psk);
	g_free(opt.tls_certificates);
	g_free(opt.tls_username);
	g_free(opt.tls_hostname);
	return status;
}
