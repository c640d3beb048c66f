/* fuzz-nbd.c: the NBD client core fed arbitrary bytes as its server's stream.
 *
 * Input: one mode byte, then records [u8 gate][u16 be length][bytes] that
 * "the server" sends.  A peer thread on one end of a socketpair sends record
 * i once the client has sent gate(0) + ... + gate(i) messages (options and
 * requests, counted by their magic numbers), or when the client has been
 * idle for a few milliseconds (so a wrong gate cannot stall the input), and
 * drains whatever the client sends; after the last record it shuts its write
 * side, so the client always ends at EOF.  The client connects on the other
 * end and either lists the exports or negotiates and issues a fixed sequence
 * of requests.  Gating keeps replies behind their requests, so a seed can
 * answer cookies (allocated from 1 in submission order) deterministically.
 *
 * Mode byte: bit 0 list instead of connect, bit 1 list with details,
 * bit 2 no structured replies, bit 3 no block status.
 *
 * Linked two ways: with clang -fsanitize=fuzzer as a libFuzzer target
 * (test/fuzz/nbd), and into test/unit/corpus-replay.c, which runs every
 * file of the seed corpus once (a regression test in every build).
 */
#include "fuzz-nbd.h"

#include "nbdfs/loop.h"
#include "nbdfs/nbd.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MODE_LIST (1u << 0)
#define MODE_DETAILS (1u << 1)
#define MODE_NO_SR (1u << 2)
#define MODE_NO_BLOCK_STATUS (1u << 3)

/* The peer gives up on a client that neither reads nor closes after this. */
#define PEER_DEADLINE_US (10 * G_USEC_PER_SEC)
/* A gated record goes out anyway once the client is idle this long (a wrong
 * gate costs this much time; under heavy load a record may go out early,
 * which changes the path taken, never the verdict). */
#define PEER_IDLE_MS 3

struct peer {
	int fd;
	const uint8_t *data;
	size_t size;
	/* parser of the client's stream: counts option and request magics */
	uint8_t window[8];
	uint64_t messages;
};

static void count_messages(struct peer *p, const uint8_t *buf, size_t n)
{
	static const uint8_t opt_magic[8] = { 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T' };
	static const uint8_t req_magic[4] = { 0x25, 0x60, 0x95, 0x13 };

	for (size_t i = 0; i < n; i++) {
		memmove(p->window, p->window + 1, 7);
		p->window[7] = buf[i];
		if (!memcmp(p->window, opt_magic, 8) || !memcmp(p->window + 4, req_magic, 4))
			p->messages++;
	}
}

/* Serves the records and drains the client until it closes. */
static gpointer peer_main(gpointer opaque)
{
	struct peer *p = opaque;
	gint64 deadline = g_get_monotonic_time() + PEER_DEADLINE_US;
	size_t pos = 0; /* next record header in data */
	const uint8_t *out = NULL;
	size_t out_len = 0; /* unsent bytes of the current record */
	uint64_t gate = 0;  /* messages needed before the next record */
	gboolean shut = FALSE, have_gate = FALSE;
	uint8_t sink[65536];

	for (;;) {
		struct pollfd pfd = { .fd = p->fd, .events = POLLIN };
		gint64 left = (deadline - g_get_monotonic_time()) / 1000;
		int timeout, r;

		if (!out_len && !shut && !have_gate) {
			if (pos >= p->size) {
				shutdown(p->fd, SHUT_WR);
				shut = TRUE;
			} else {
				gate += p->data[pos];
				have_gate = TRUE;
			}
		}
		if (have_gate && p->messages >= gate) {
			size_t len = 0;

			if (pos + 3 <= p->size)
				len = ((size_t)p->data[pos + 1] << 8) | p->data[pos + 2];
			out = p->data + MIN(pos + 3, p->size);
			out_len = MIN(len, p->size - (size_t)(out - p->data));
			pos = (size_t)(out - p->data) + out_len;
			have_gate = FALSE;
			continue;
		}
		if (out_len)
			pfd.events |= POLLOUT;
		if (left <= 0)
			break;
		timeout = have_gate ? PEER_IDLE_MS : (int)MIN(left, 1000);
		r = poll(&pfd, 1, timeout);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			break;
		if (r == 0 && have_gate) {
			p->messages = gate; /* idle client: release the record */
			continue;
		}
		if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = recv(p->fd, sink, sizeof(sink), MSG_DONTWAIT);

			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				break; /* the client closed */
			if (n > 0)
				count_messages(p, sink, (size_t)n);
		}
		if (out_len && (pfd.revents & POLLOUT)) {
			ssize_t n = send(p->fd, out, out_len, MSG_DONTWAIT | MSG_NOSIGNAL);

			if (n > 0) {
				out += n;
				out_len -= (size_t)n;
			} else if (n < 0 && errno != EAGAIN && errno != EINTR) {
				out_len = 0; /* the client is gone: stop sending, drain to EOF */
				pos = p->size;
				shut = TRUE;
			}
		}
	}
	close(p->fd);
	return NULL;
}

/* Replay only: NBD_FUZZ_VERBOSE=1 shows the core's log and each result. */
static gboolean verbose;

void nbd_fuzz_set_verbose(gboolean on)
{
	verbose = on;
}

static void quiet(void *opaque, enum nbdc_log_level level, const char *msg)
{
	if (verbose)
		fprintf(stderr, "  log: %s\n", msg);
}

static int show(const char *what, int r)
{
	if (verbose)
		fprintf(stderr, "  %s -> %d\n", what, r);
	return r;
}

/* The extent callback of block status (its opaque, shared with the done
 * callback, is the completion). */
static void check_extent(void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
	g_assert(length > 0); /* the core promises validated extents */
}

/* The result of the done callback of @c for a request whose submission
 * returned @r (when it was refused, no callback runs: 0); drops the
 * waiter's reference. */
static int wait_done(struct completion *c, int r)
{
	gint64 res = 0;

	if (r == 0)
		res = completion_wait(c);
	else
		completion_done(c, 0); /* drops the reference no callback will drop */
	completion_unref(c);
	return (int)res;
}

static void exercise(Nbdc *c)
{
	struct nbdc_info info;
	static uint8_t buf[3][8192];
	struct iovec iov[2] = { { buf[1], 4096 }, { buf[2], 4096 } };
	struct iovec wv = { buf[0], 512 };
	struct completion *bs = completion_new(), *r5 = completion_new(), *r6 = completion_new();
	struct completion *w3 = completion_new(), *f4 = completion_new();
	int s, e, s3, s4, s5, s6, e5, e6;

	nbdc_get_info(c, &info);
	g_assert(info.size <= INT64_MAX);
	show("read", nbdc_pread(c, buf[0], 4096, 0, 0)); /* cookie 1 */

	s = show("block status",
		 nbdc_aio_block_status(c, 8192, 0, 0, check_extent, completion_done, bs)); /* 2 */
	e = wait_done(bs, s);
	if (s == 0)
		show("block status done", e);
	/* The flush goes out while the write is unfinished, so that it is
	 * sent (a flush with nothing to cover is not) even when the write fails. */
	s3 = nbdc_aio_pwritev(c, &wv, 1, 0, NBDC_CMD_FLAG_FUA, completion_done, w3); /* 3 */
	s4 = nbdc_aio_flush(c, completion_done, f4);				     /* 4 */
	e = wait_done(w3, s3);
	show("write", s3 ? s3 : e);
	e = wait_done(f4, s4);
	show("flush", s4 ? s4 : e);
	s5 = nbdc_aio_preadv(c, &iov[0], 1, 4096, 0, completion_done, r5); /* 5 */
	s6 = nbdc_aio_preadv(c, &iov[1], 1, 8192, 0, completion_done, r6); /* 6 */
	e5 = wait_done(r5, s5);
	e6 = wait_done(r6, s6);
	show("2 reads", e5 ? e5 : e6);
	show("trim", nbdc_trim(c, 4096, 0, 0)); /* 7 */
	show("zero", nbdc_zero(c, 4096, 0, 0)); /* 8 */
	nbdc_is_alive(c);
	nbdc_get_error(c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct nbdc_config cfg;
	struct peer p;
	GThread *th;
	GError *err = NULL;
	uint8_t mode;
	int sv[2];

	if (size < 1)
		return 0;
	mode = data[0];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return 0;
	p = (struct peer){ .fd = sv[1], .data = data + 1, .size = size - 1 };
	th = g_thread_new("fuzz-peer", peer_main, &p);

	nbdc_config_init(&cfg);
	cfg.fd = sv[0];
	cfg.connections = 1;
	cfg.handshake_timeout_ms = 2000;
	cfg.request_timeout_ms = 2000;
	cfg.structured_replies = !(mode & MODE_NO_SR);
	cfg.block_status = !(mode & MODE_NO_BLOCK_STATUS);
	cfg.log = quiet;

	if (mode & MODE_LIST) {
		GPtrArray *list = nbdc_list_exports(&cfg, !!(mode & MODE_DETAILS), &err);

		if (list) {
			show("list entries", (int)list->len);
			for (guint i = 0; i < list->len; i++) {
				const struct nbdc_export *e = g_ptr_array_index(list, i);

				g_assert(e->name && e->description);
				g_assert(strlen(e->name) <= 4096);
			}
			g_ptr_array_unref(list);
		} else {
			g_assert(err && err->domain == NBDC_ERROR);
			if (verbose)
				fprintf(stderr, "  list: %s\n", err->message);
		}
	} else {
		Nbdc *c = nbdc_connect(&cfg, &err);

		if (c) {
			exercise(c);
			nbdc_free(c);
		} else {
			g_assert(err && err->domain == NBDC_ERROR);
			if (verbose)
				fprintf(stderr, "  connect: %s\n", err->message);
		}
	}
	g_clear_error(&err);
	g_thread_join(th);
	return 0;
}
