/* fake-server.c: a scripted fake NBD server on a socketpair (see fake-server.h).
 *
 * Thread model: the test thread builds the script, starts one server thread,
 * and only reads the captures after fake_server_finish() joined it, so no
 * lock is needed.  Every socket operation in the server thread polls with a
 * deadline (fake_server_set_timeout), and a failed step closes the server's
 * end at once, so a client waiting for bytes sees EOF instead of hanging.
 */
#include "fake-server.h"

#include <errno.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- Messages ------------------------------------------------------------ */

enum patch_kind { PATCH_COOKIE, PATCH_OFFSET, PATCH_PATTERN };

struct patch {
	enum patch_kind kind;
	size_t pos;
	int slot;
	int64_t delta;
	size_t len;
};

struct fake_msg {
	GByteArray *bytes;
	GArray *patches; /* struct patch */
};

FakeMsg *fake_msg_new(void)
{
	FakeMsg *m = g_new0(FakeMsg, 1);

	m->bytes = g_byte_array_new();
	m->patches = g_array_new(FALSE, FALSE, sizeof(struct patch));
	return m;
}

void fake_msg_free(FakeMsg *m)
{
	if (!m)
		return;
	g_byte_array_unref(m->bytes);
	g_array_unref(m->patches);
	g_free(m);
}

size_t fake_msg_len(const FakeMsg *m)
{
	return m->bytes->len;
}

void fake_msg_u8(FakeMsg *m, uint8_t v)
{
	g_byte_array_append(m->bytes, &v, 1);
}

void fake_msg_u16(FakeMsg *m, uint16_t v)
{
	uint16_t be = GUINT16_TO_BE(v);

	g_byte_array_append(m->bytes, (const guint8 *)&be, 2);
}

void fake_msg_u32(FakeMsg *m, uint32_t v)
{
	uint32_t be = GUINT32_TO_BE(v);

	g_byte_array_append(m->bytes, (const guint8 *)&be, 4);
}

void fake_msg_u64(FakeMsg *m, uint64_t v)
{
	uint64_t be = GUINT64_TO_BE(v);

	g_byte_array_append(m->bytes, (const guint8 *)&be, 8);
}

void fake_msg_bytes(FakeMsg *m, const void *data, size_t len)
{
	g_assert(len <= G_MAXUINT);
	if (len)
		g_byte_array_append(m->bytes, data, (guint)len);
}

void fake_msg_fill(FakeMsg *m, uint8_t byte, size_t len)
{
	size_t old = m->bytes->len;

	g_assert(len <= G_MAXUINT - old);
	g_byte_array_set_size(m->bytes, (guint)(old + len));
	memset(m->bytes->data + old, byte, len);
}

static void add_patch(FakeMsg *m, enum patch_kind kind, int slot, int64_t delta, size_t len)
{
	struct patch p = {
		.kind = kind,
		.pos = m->bytes->len,
		.slot = slot,
		.delta = delta,
		.len = len,
	};

	g_assert(slot >= 0 && slot < FAKE_SLOTS);
	g_array_append_val(m->patches, p);
	fake_msg_fill(m, 0, len);
}

void fake_msg_cookie(FakeMsg *m, int slot, int64_t delta)
{
	add_patch(m, PATCH_COOKIE, slot, delta, 8);
}

void fake_msg_offset(FakeMsg *m, int slot, int64_t delta)
{
	add_patch(m, PATCH_OFFSET, slot, delta, 8);
}

void fake_msg_pattern(FakeMsg *m, int slot, int64_t delta, size_t len)
{
	add_patch(m, PATCH_PATTERN, slot, delta, len);
}

void fake_msg_append(FakeMsg *m, FakeMsg *tail)
{
	size_t base = m->bytes->len;

	for (guint i = 0; i < tail->patches->len; i++) {
		struct patch p = g_array_index(tail->patches, struct patch, i);

		p.pos += base;
		g_array_append_val(m->patches, p);
	}
	fake_msg_bytes(m, tail->bytes->data, tail->bytes->len);
	fake_msg_free(tail);
}

/* ---- Builders ------------------------------------------------------------ */

FakeMsg *fake_greeting_oldstyle(uint64_t size, uint32_t flags)
{
	FakeMsg *m = fake_msg_new();

	fake_msg_u64(m, FAKE_NBDMAGIC);
	fake_msg_u64(m, FAKE_OLDSTYLE_MAGIC);
	fake_msg_u64(m, size);
	fake_msg_u32(m, flags);
	fake_msg_fill(m, 0, 124);
	return m;
}

FakeMsg *fake_greeting_newstyle(uint16_t hflags)
{
	FakeMsg *m = fake_msg_new();

	fake_msg_u64(m, FAKE_NBDMAGIC);
	fake_msg_u64(m, FAKE_IHAVEOPT);
	fake_msg_u16(m, hflags);
	return m;
}

FakeMsg *fake_rep(uint32_t option, uint32_t type, FakeMsg *payload)
{
	FakeMsg *m = fake_msg_new();
	size_t len = payload ? fake_msg_len(payload) : 0;

	g_assert(len <= UINT32_MAX);
	fake_msg_u64(m, FAKE_OPT_REPLY_MAGIC);
	fake_msg_u32(m, option);
	fake_msg_u32(m, type);
	fake_msg_u32(m, (uint32_t)len);
	if (payload)
		fake_msg_append(m, payload);
	return m;
}

FakeMsg *fake_rep_ack(uint32_t option)
{
	return fake_rep(option, FAKE_REP_ACK, NULL);
}

FakeMsg *fake_rep_err(uint32_t option, uint32_t type, const char *msg)
{
	FakeMsg *p = fake_msg_new();

	if (msg)
		fake_msg_bytes(p, msg, strlen(msg));
	return fake_rep(option, type, p);
}

FakeMsg *fake_rep_server(const char *name, const char *description)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, (uint32_t)strlen(name));
	fake_msg_bytes(p, name, strlen(name));
	if (description)
		fake_msg_bytes(p, description, strlen(description));
	return fake_rep(FAKE_OPT_LIST, FAKE_REP_SERVER, p);
}

FakeMsg *fake_rep_info_export(uint32_t option, uint64_t size, uint16_t eflags)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u16(p, FAKE_INFO_EXPORT);
	fake_msg_u64(p, size);
	fake_msg_u16(p, eflags);
	return fake_rep(option, FAKE_REP_INFO, p);
}

FakeMsg *fake_rep_info_block_size(uint32_t option, uint32_t min, uint32_t pref, uint32_t max)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u16(p, FAKE_INFO_BLOCK_SIZE);
	fake_msg_u32(p, min);
	fake_msg_u32(p, pref);
	fake_msg_u32(p, max);
	return fake_rep(option, FAKE_REP_INFO, p);
}

static FakeMsg *rep_info_string(uint32_t option, uint16_t type, const char *s)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u16(p, type);
	fake_msg_bytes(p, s, strlen(s));
	return fake_rep(option, FAKE_REP_INFO, p);
}

FakeMsg *fake_rep_info_name(uint32_t option, const char *name)
{
	return rep_info_string(option, FAKE_INFO_NAME, name);
}

FakeMsg *fake_rep_info_description(uint32_t option, const char *description)
{
	return rep_info_string(option, FAKE_INFO_DESCRIPTION, description);
}

FakeMsg *fake_rep_meta_context(uint32_t option, uint32_t id, const char *name)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, id);
	fake_msg_bytes(p, name, strlen(name));
	return fake_rep(option, FAKE_REP_META_CONTEXT, p);
}

FakeMsg *fake_export_name_reply(uint64_t size, uint16_t eflags, gboolean zeroes)
{
	FakeMsg *m = fake_msg_new();

	fake_msg_u64(m, size);
	fake_msg_u16(m, eflags);
	if (zeroes)
		fake_msg_fill(m, 0, 124);
	return m;
}

FakeMsg *fake_simple_reply(int slot, uint32_t error)
{
	FakeMsg *m = fake_msg_new();

	fake_msg_u32(m, FAKE_SIMPLE_MAGIC);
	fake_msg_u32(m, error);
	fake_msg_cookie(m, slot, 0);
	return m;
}

/* A pattern covering the captured request's whole length: resolved at send
 * time from the capture, marked with len = SIZE_MAX. */
FakeMsg *fake_simple_reply_data(int slot)
{
	FakeMsg *m = fake_simple_reply(slot, 0);
	struct patch p = {
		.kind = PATCH_PATTERN, .pos = m->bytes->len, .slot = slot, .len = SIZE_MAX
	};

	g_array_append_val(m->patches, p);
	return m;
}

FakeMsg *fake_chunk(int slot, uint16_t flags, uint16_t type, FakeMsg *payload)
{
	FakeMsg *m = fake_msg_new();
	size_t len = payload ? fake_msg_len(payload) : 0;

	g_assert(len <= UINT32_MAX);
	fake_msg_u32(m, FAKE_STRUCTURED_MAGIC);
	fake_msg_u16(m, flags);
	fake_msg_u16(m, type);
	fake_msg_cookie(m, slot, 0);
	fake_msg_u32(m, (uint32_t)len);
	if (payload)
		fake_msg_append(m, payload);
	return m;
}

FakeMsg *fake_chunk_data(int slot, uint16_t flags, int64_t delta, size_t len)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_offset(p, slot, delta);
	fake_msg_pattern(p, slot, delta, len);
	return fake_chunk(slot, flags, FAKE_CHUNK_OFFSET_DATA, p);
}

FakeMsg *fake_chunk_hole(int slot, uint16_t flags, int64_t delta, uint32_t len)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_offset(p, slot, delta);
	fake_msg_u32(p, len);
	return fake_chunk(slot, flags, FAKE_CHUNK_OFFSET_HOLE, p);
}

FakeMsg *fake_chunk_none(int slot)
{
	return fake_chunk(slot, FAKE_CHUNK_FLAG_DONE, FAKE_CHUNK_NONE, NULL);
}

static FakeMsg *error_payload(uint32_t error, const char *msg)
{
	FakeMsg *p = fake_msg_new();
	size_t n = msg ? strlen(msg) : 0;

	fake_msg_u32(p, error);
	fake_msg_u16(p, (uint16_t)n);
	if (n)
		fake_msg_bytes(p, msg, n);
	return p;
}

FakeMsg *fake_chunk_error(int slot, uint16_t flags, uint32_t error, const char *msg)
{
	return fake_chunk(slot, flags, FAKE_CHUNK_ERROR, error_payload(error, msg));
}

FakeMsg *fake_chunk_error_offset(int slot, uint16_t flags, uint32_t error, const char *msg,
				 int64_t delta)
{
	FakeMsg *p = error_payload(error, msg);

	fake_msg_offset(p, slot, delta);
	return fake_chunk(slot, flags, FAKE_CHUNK_ERROR_OFFSET, p);
}

FakeMsg *fake_chunk_block_status(int slot, uint16_t flags, uint32_t context_id,
				 const uint32_t *pairs, size_t n)
{
	FakeMsg *p = fake_msg_new();

	fake_msg_u32(p, context_id);
	for (size_t i = 0; i < 2 * n; i++)
		fake_msg_u32(p, pairs[i]);
	return fake_chunk(slot, flags, FAKE_CHUNK_BLOCK_STATUS, p);
}

/* ---- The server ----------------------------------------------------------- */

enum step_kind {
	STEP_SEND,
	STEP_SEND_PARTIAL_CLOSE,
	STEP_SEND_REPEAT,
	STEP_EXPECT_BYTES,
	STEP_EXPECT_CLIENT_FLAGS,
	STEP_EXPECT_OPTION,
	STEP_EXPECT_REQUEST,
	STEP_NEGOTIATE,
	STEP_CLOSE,
	STEP_WAIT_EOF,
	STEP_STALL,
	STEP_STARTTLS,
};

struct step {
	enum step_kind kind;
	FakeMsg *msg;
	size_t n;  /* bytes (expect, partial), SIZE_MAX = all */
	guint max; /* repeat count */
	int slot;
	FakeExport exp;
	uint32_t stop_option;
	const char *psk_file;
};

struct fake_server {
	int fd;	       /* server end, -1 once closed */
	int client_fd; /* client end until taken */
	gboolean client_taken;
	GArray *steps; /* struct step */
	GThread *thread;
	gboolean joined;
	guint timeout_ms;
	gboolean ok;
	gboolean stopped; /* ABORT handled: end the script */
	char *why;
	uint32_t client_flags;
	FakeCapture caps[FAKE_SLOTS];
	gnutls_session_t tls; /* after fake_starttls(), NULL before */
	gnutls_psk_server_credentials_t psk;
};

/* Result of a bounded socket operation. */
enum io_res { IO_OK = 0, IO_EOF = -1, IO_ERROR = -2, IO_TIMEOUT = -3 };

static const char *io_res_name(int r)
{
	switch (r) {
	case IO_EOF:
		return "EOF";
	case IO_ERROR:
		return "socket error";
	case IO_TIMEOUT:
		return "timeout";
	default:
		return "ok";
	}
}

static gint64 deadline_of(FakeServer *fs)
{
	return g_get_monotonic_time() + (gint64)fs->timeout_ms * 1000;
}

static int wait_fd(int fd, short events, gint64 deadline)
{
	for (;;) {
		gint64 left = (deadline - g_get_monotonic_time()) / 1000;
		struct pollfd p = { .fd = fd, .events = events };
		int r;

		if (left < 0)
			return IO_TIMEOUT;
		r = poll(&p, 1, (int)MIN(left + 1, 1000));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return IO_ERROR;
		if (r > 0)
			return IO_OK;
	}
}

static int tls_res(FakeServer *fs, ssize_t n)
{
	if (n == GNUTLS_E_PREMATURE_TERMINATION || n == GNUTLS_E_PUSH_ERROR ||
	    n == GNUTLS_E_PULL_ERROR)
		return IO_EOF;
	return IO_ERROR;
}

static int io_write(FakeServer *fs, const void *buf, size_t len, gint64 deadline)
{
	const guint8 *p = buf;

	while (fs->tls && len > 0) {
		ssize_t n = gnutls_record_send(fs->tls, p, len);

		if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
			int r = wait_fd(fs->fd, POLLOUT, deadline);

			if (r)
				return r;
			continue;
		}
		if (n < 0)
			return tls_res(fs, n);
		p += n;
		len -= (size_t)n;
	}
	while (len > 0) {
		ssize_t n = send(fs->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			int r = wait_fd(fs->fd, POLLOUT, deadline);

			if (r)
				return r;
			continue;
		}
		if (n < 0)
			return (errno == EPIPE || errno == ECONNRESET) ? IO_EOF : IO_ERROR;
		p += n;
		len -= (size_t)n;
	}
	return IO_OK;
}

static int io_read(FakeServer *fs, void *buf, size_t len, gint64 deadline)
{
	guint8 *p = buf;

	while (fs->tls && len > 0) {
		ssize_t n = gnutls_record_recv(fs->tls, p, len);

		if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED) {
			int r = gnutls_record_check_pending(fs->tls)
					? IO_OK
					: wait_fd(fs->fd, POLLIN, deadline);

			if (r)
				return r;
			continue;
		}
		if (n == 0)
			return IO_EOF;
		if (n < 0)
			return tls_res(fs, n);
		p += n;
		len -= (size_t)n;
	}
	while (len > 0) {
		ssize_t n = recv(fs->fd, p, len, MSG_DONTWAIT);

		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			int r = wait_fd(fs->fd, POLLIN, deadline);

			if (r)
				return r;
			continue;
		}
		if (n == 0 || (n < 0 && errno == ECONNRESET))
			return IO_EOF;
		if (n < 0)
			return IO_ERROR;
		p += n;
		len -= (size_t)n;
	}
	return IO_OK;
}

/* Reads and discards @len bytes, keeping the first @keep in @into (may be NULL). */
static int io_skip(FakeServer *fs, uint64_t len, GByteArray *into, size_t keep, gint64 deadline)
{
	guint8 buf[65536];

	while (len > 0) {
		size_t n = (size_t)MIN(len, sizeof(buf));
		int r = io_read(fs, buf, n, deadline);

		if (r)
			return r;
		if (into && into->len < keep)
			g_byte_array_append(into, buf, (guint)MIN(n, keep - into->len));
		len -= n;
	}
	return IO_OK;
}

static void fail(FakeServer *fs, guint step, const char *fmt, ...) G_GNUC_PRINTF(3, 4);

static void fail(FakeServer *fs, guint step, const char *fmt, ...)
{
	va_list ap;
	g_autofree char *msg = NULL;

	va_start(ap, fmt);
	msg = g_strdup_vprintf(fmt, ap);
	va_end(ap);
	if (fs->ok) {
		fs->ok = FALSE;
		fs->why = g_strdup_printf("fake server step %u: %s", step, msg);
	}
}

static GByteArray *render(FakeServer *fs, const FakeMsg *m)
{
	GByteArray *out = g_byte_array_new();

	g_byte_array_append(out, m->bytes->data, m->bytes->len);
	for (guint i = 0; i < m->patches->len; i++) {
		const struct patch *p = &g_array_index(m->patches, struct patch, i);
		const FakeCapture *c = &fs->caps[p->slot];
		uint64_t v;

		switch (p->kind) {
		case PATCH_COOKIE:
			v = GUINT64_TO_BE(c->cookie + (uint64_t)p->delta);
			memcpy(out->data + p->pos, &v, 8);
			break;
		case PATCH_OFFSET:
			v = GUINT64_TO_BE(c->offset + (uint64_t)p->delta);
			memcpy(out->data + p->pos, &v, 8);
			break;
		case PATCH_PATTERN: {
			size_t len = p->len;
			uint64_t base = c->offset + (uint64_t)p->delta;

			if (len == SIZE_MAX) { /* whole request, appended at the end */
				len = c->length;
				g_assert(p->pos == out->len);
				g_byte_array_set_size(out, (guint)(out->len + len));
			}
			for (size_t k = 0; k < len; k++)
				out->data[p->pos + k] = fake_pattern_byte(base + k);
			break;
		}
		}
	}
	return out;
}

static int send_msg(FakeServer *fs, const FakeMsg *m, size_t limit)
{
	g_autoptr(GByteArray) b = render(fs, m);

	return io_write(fs, b->data, MIN(limit, b->len), deadline_of(fs));
}

static int send_owned(FakeServer *fs, FakeMsg *m)
{
	int r = send_msg(fs, m, SIZE_MAX);

	fake_msg_free(m);
	return r;
}

static void close_fd(FakeServer *fs)
{
	if (fs->tls) {
		gnutls_deinit(fs->tls);
		fs->tls = NULL;
	}
	if (fs->fd >= 0) {
		close(fs->fd);
		fs->fd = -1;
	}
}

#define MAX_OPTION_DATA 65536u

/* Big-endian integers at @p (unaligned). */
static uint16_t get_be16(const guint8 *p)
{
	uint16_t v;

	memcpy(&v, p, 2);
	return GUINT16_FROM_BE(v);
}

static uint32_t get_be32(const guint8 *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return GUINT32_FROM_BE(v);
}

static uint64_t get_be64(const guint8 *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return GUINT64_FROM_BE(v);
}

/* @cap holds a capture, its data empty so far. */
static void capture_begin(FakeCapture *cap)
{
	cap->valid = TRUE;
	if (!cap->data)
		cap->data = g_byte_array_new();
	g_byte_array_set_size(cap->data, 0);
}

/* Reads one option into @cap.  Returns an io_res, or 1 for a bad magic/size. */
static int read_option(FakeServer *fs, FakeCapture *cap, gint64 deadline)
{
	guint8 h[16];
	int r = io_read(fs, h, sizeof(h), deadline);

	if (r)
		return r;
	if (get_be64(h) != FAKE_IHAVEOPT)
		return 1;
	cap->option = get_be32(h + 8);
	cap->option_len = get_be32(h + 12);
	if (cap->option_len > MAX_OPTION_DATA)
		return 1;
	capture_begin(cap);
	return io_skip(fs, cap->option_len, cap->data, cap->option_len, deadline);
}

static int read_request(FakeServer *fs, FakeCapture *cap, size_t payload_max)
{
	gint64 deadline = deadline_of(fs);
	guint8 h[28];
	int r = io_read(fs, h, sizeof(h), deadline);

	if (r)
		return r;
	if (get_be32(h) != FAKE_REQUEST_MAGIC)
		return 1;
	cap->flags = get_be16(h + 4);
	cap->type = get_be16(h + 6);
	cap->cookie = get_be64(h + 8);
	cap->offset = get_be64(h + 16);
	cap->length = get_be32(h + 24);
	capture_begin(cap);
	if (cap->type == FAKE_CMD_WRITE)
		return io_skip(fs, MIN(cap->length, payload_max), cap->data, 1u << 20, deadline);
	return IO_OK;
}

static int negotiate(FakeServer *fs, guint idx, const struct step *st)
{
	const FakeExport *e = &st->exp;
	gboolean sr_acked = FALSE;
	int r;

	if (e->greeting) {
		guint8 cf[4];

		r = send_owned(fs, fake_greeting_newstyle(e->hflags));
		if (!r)
			r = io_read(fs, cf, 4, deadline_of(fs));
		if (r) {
			fail(fs, idx, "negotiate: greeting: %s", io_res_name(r));
			return r;
		}
		fs->client_flags = get_be32(cf);
	}
	for (;;) {
		FakeCapture tmp = { 0 };
		FakeCapture *cap = &tmp;
		uint32_t opt;

		r = read_option(fs, cap, deadline_of(fs));
		if (r) {
			fail(fs, idx, "negotiate: reading an option: %s",
			     r == 1 ? "bad magic or length" : io_res_name(r));
			if (tmp.data)
				g_byte_array_unref(tmp.data);
			return r;
		}
		opt = cap->option;
		if (st->stop_option && opt == st->stop_option) {
			FakeCapture *dst = &fs->caps[st->slot];

			if (dst->data)
				g_byte_array_unref(dst->data);
			*dst = tmp;
			return IO_OK;
		}
		switch (opt) {
		case FAKE_OPT_STRUCTURED_REPLY:
			if (e->sr) {
				sr_acked = TRUE;
				r = send_owned(fs, fake_rep_ack(opt));
			} else {
				r = send_owned(fs, fake_rep_err(opt, FAKE_REP_ERR_UNSUP, NULL));
			}
			break;
		case FAKE_OPT_SET_META_CONTEXT:
		case FAKE_OPT_LIST_META_CONTEXT:
			r = 0;
			if (e->meta && sr_acked &&
			    memmem(cap->data->data, cap->data->len, "base:allocation", 15))
				r = send_owned(fs, fake_rep_meta_context(opt, e->meta_id,
									 "base:allocation"));
			if (!r)
				r = send_owned(fs, fake_rep_ack(opt));
			break;
		case FAKE_OPT_INFO:
		case FAKE_OPT_GO:
			r = send_owned(fs, fake_rep_info_export(opt, e->size, e->eflags));
			if (!r && e->block_min)
				r = send_owned(fs, fake_rep_info_block_size(opt, e->block_min,
									    e->block_pref,
									    e->block_max));
			if (!r)
				r = send_owned(fs, fake_rep_ack(opt));
			if (!r && opt == FAKE_OPT_GO) {
				g_byte_array_unref(tmp.data);
				return IO_OK;
			}
			break;
		case FAKE_OPT_EXPORT_NAME:
			r = send_owned(fs, fake_export_name_reply(
						   e->size, e->eflags,
						   !(fs->client_flags & FAKE_FLAG_NO_ZEROES)));
			g_byte_array_unref(tmp.data);
			return r;
		case FAKE_OPT_LIST:
			r = 0;
			for (size_t i = 0; !r && e->exports && e->exports[i]; i += 2)
				r = send_owned(fs,
					       fake_rep_server(e->exports[i], e->exports[i + 1]));
			if (!r)
				r = send_owned(fs, fake_rep_ack(opt));
			break;
		case FAKE_OPT_ABORT:
			send_owned(fs, fake_rep_ack(opt)); /* the client may have closed */
			fs->stopped = TRUE;
			g_byte_array_unref(tmp.data);
			return IO_OK;
		case FAKE_OPT_STARTTLS:
			r = send_owned(fs, fake_rep_err(opt, FAKE_REP_ERR_POLICY, NULL));
			break;
		default:
			r = send_owned(fs, fake_rep_err(opt, FAKE_REP_ERR_UNSUP, NULL));
			break;
		}
		g_byte_array_unref(tmp.data);
		if (r) {
			fail(fs, idx, "negotiate: replying to option %u: %s", opt, io_res_name(r));
			return r;
		}
	}
}

static int wait_eof(FakeServer *fs)
{
	gint64 deadline = deadline_of(fs);
	guint8 buf[65536];

	for (;;) {
		int r = io_read(fs, buf, 1, deadline);

		if (r == IO_EOF)
			return IO_OK;
		if (r)
			return r;
		/* drain whatever else is there without blocking */
		if (!fs->tls)
			while (recv(fs->fd, buf, sizeof(buf), MSG_DONTWAIT) > 0)
				;
	}
}

static int stall(FakeServer *fs)
{
	gint64 deadline = deadline_of(fs);

	for (;;) {
		gint64 left = (deadline - g_get_monotonic_time()) / 1000;
		struct pollfd p = { .fd = fs->fd, .events = POLLRDHUP };
		int r;

		if (left < 0)
			return IO_TIMEOUT;
		r = poll(&p, 1, (int)MIN(left + 1, 1000));
		if (r < 0 && errno != EINTR)
			return IO_ERROR;
		if (r > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR)))
			return IO_OK;
	}
}

static int starttls(FakeServer *fs, guint idx, const char *psk_file)
{
	gint64 deadline = deadline_of(fs);
	int r;

	if (gnutls_psk_allocate_server_credentials(&fs->psk) < 0 ||
	    gnutls_psk_set_server_credentials_file(fs->psk, psk_file) < 0 ||
	    gnutls_init(&fs->tls, GNUTLS_SERVER | GNUTLS_NO_SIGNAL | GNUTLS_NONBLOCK) < 0 ||
	    gnutls_priority_set_direct(fs->tls, "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK", NULL) < 0 ||
	    gnutls_credentials_set(fs->tls, GNUTLS_CRD_PSK, fs->psk) < 0) {
		fail(fs, idx, "TLS setup failed");
		return IO_ERROR;
	}
	fcntl(fs->fd, F_SETFL, fcntl(fs->fd, F_GETFL) | O_NONBLOCK);
	gnutls_transport_set_int(fs->tls, fs->fd);
	do {
		r = gnutls_handshake(fs->tls);
		if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
			int w = wait_fd(fs->fd,
					gnutls_record_get_direction(fs->tls) ? POLLOUT : POLLIN,
					deadline);

			if (w) {
				fail(fs, idx, "TLS handshake: %s", io_res_name(w));
				return w;
			}
		} else if (r < 0 && gnutls_error_is_fatal(r)) {
			fail(fs, idx, "TLS handshake: %s", gnutls_strerror(r));
			return IO_ERROR;
		}
	} while (r < 0);
	return IO_OK;
}

static int run_step(FakeServer *fs, guint idx, struct step *st)
{
	FakeCapture *cap = st->slot >= 0 ? &fs->caps[st->slot] : NULL;
	int r = IO_OK;

	switch (st->kind) {
	case STEP_SEND:
		r = send_msg(fs, st->msg, SIZE_MAX);
		break;
	case STEP_SEND_PARTIAL_CLOSE:
		r = send_msg(fs, st->msg, st->n);
		close_fd(fs);
		break;
	case STEP_SEND_REPEAT:
		for (guint i = 0; i < st->max; i++) {
			r = send_msg(fs, st->msg, SIZE_MAX);
			if (r == IO_EOF)
				return IO_OK; /* the client gave up: expected */
			if (r)
				break;
		}
		break;
	case STEP_EXPECT_BYTES:
		capture_begin(cap);
		r = io_skip(fs, st->n, cap->data, st->n, deadline_of(fs));
		break;
	case STEP_EXPECT_CLIENT_FLAGS: {
		uint32_t v;

		r = io_read(fs, &v, 4, deadline_of(fs));
		if (!r) {
			fs->client_flags = GUINT32_FROM_BE(v);
			cap->option = fs->client_flags;
			cap->valid = TRUE;
		}
		break;
	}
	case STEP_EXPECT_OPTION:
		r = read_option(fs, cap, deadline_of(fs));
		break;
	case STEP_EXPECT_REQUEST:
		r = read_request(fs, cap, st->n);
		break;
	case STEP_NEGOTIATE:
		return negotiate(fs, idx, st);
	case STEP_CLOSE:
		close_fd(fs);
		break;
	case STEP_WAIT_EOF:
		r = wait_eof(fs);
		break;
	case STEP_STALL:
		r = stall(fs);
		break;
	case STEP_STARTTLS:
		return starttls(fs, idx, st->psk_file);
	}
	if (r)
		fail(fs, idx, "%s", r == 1 ? "bad magic or oversized length" : io_res_name(r));
	return r;
}

static gpointer server_thread(gpointer data)
{
	FakeServer *fs = data;

	for (guint i = 0; i < fs->steps->len && !fs->stopped; i++) {
		struct step *st = &g_array_index(fs->steps, struct step, i);

		if (fs->fd < 0) {
			fail(fs, i, "connection already closed");
			break;
		}
		if (run_step(fs, i, st))
			break;
	}
	if (fs->ok && fs->fd >= 0 && !fs->stopped)
		wait_eof(fs); /* a real server stays until the client leaves */
	close_fd(fs);
	return NULL;
}

FakeServer *fake_server_new(void)
{
	FakeServer *fs = g_new0(FakeServer, 1);
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		g_error("socketpair: %s", g_strerror(errno));
	fs->fd = sv[1];
	fs->client_fd = sv[0];
	fs->steps = g_array_new(FALSE, TRUE, sizeof(struct step));
	fs->timeout_ms = 5000;
	fs->ok = TRUE;
	return fs;
}

FakeServer *fake_server_new_fd(int fd)
{
	FakeServer *fs = g_new0(FakeServer, 1);

	fs->fd = fd;
	fs->client_fd = -1;
	fs->client_taken = TRUE;
	fs->steps = g_array_new(FALSE, TRUE, sizeof(struct step));
	fs->timeout_ms = 5000;
	fs->ok = TRUE;
	return fs;
}

int fake_server_client_fd(FakeServer *fs)
{
	g_assert(!fs->client_taken);
	fs->client_taken = TRUE;
	return fs->client_fd;
}

void fake_server_set_timeout(FakeServer *fs, guint ms)
{
	fs->timeout_ms = ms;
}

static struct step *add_step(FakeServer *fs, enum step_kind kind)
{
	struct step st = { .kind = kind, .slot = -1, .n = SIZE_MAX };

	g_assert(!fs->thread);
	g_array_append_val(fs->steps, st);
	return &g_array_index(fs->steps, struct step, fs->steps->len - 1);
}

static int check_slot(int slot)
{
	g_assert(slot >= 0 && slot < FAKE_SLOTS);
	return slot;
}

void fake_send(FakeServer *fs, FakeMsg *m)
{
	add_step(fs, STEP_SEND)->msg = m;
}

void fake_send_raw(FakeServer *fs, const void *data, size_t len)
{
	FakeMsg *m = fake_msg_new();

	fake_msg_bytes(m, data, len);
	fake_send(fs, m);
}

void fake_send_partial_close(FakeServer *fs, FakeMsg *m, size_t n)
{
	struct step *st = add_step(fs, STEP_SEND_PARTIAL_CLOSE);

	st->msg = m;
	st->n = n;
}

void fake_send_repeat(FakeServer *fs, FakeMsg *m, guint max)
{
	struct step *st = add_step(fs, STEP_SEND_REPEAT);

	st->msg = m;
	st->max = max;
}

void fake_expect_bytes(FakeServer *fs, size_t n, int slot)
{
	struct step *st = add_step(fs, STEP_EXPECT_BYTES);

	st->n = n;
	st->slot = check_slot(slot);
}

void fake_expect_client_flags(FakeServer *fs, int slot)
{
	add_step(fs, STEP_EXPECT_CLIENT_FLAGS)->slot = check_slot(slot);
}

void fake_expect_option(FakeServer *fs, int slot)
{
	add_step(fs, STEP_EXPECT_OPTION)->slot = check_slot(slot);
}

void fake_expect_request(FakeServer *fs, int slot)
{
	add_step(fs, STEP_EXPECT_REQUEST)->slot = check_slot(slot);
}

void fake_expect_request_partial(FakeServer *fs, int slot, size_t n)
{
	struct step *st = add_step(fs, STEP_EXPECT_REQUEST);

	st->slot = check_slot(slot);
	st->n = n;
}

void fake_negotiate(FakeServer *fs, const FakeExport *exp, uint32_t stop_option, int slot)
{
	struct step *st = add_step(fs, STEP_NEGOTIATE);

	st->exp = *exp;
	st->stop_option = stop_option;
	st->slot = stop_option ? check_slot(slot) : -1;
}

void fake_close(FakeServer *fs)
{
	add_step(fs, STEP_CLOSE);
}

void fake_starttls(FakeServer *fs, const char *psk_file)
{
	add_step(fs, STEP_STARTTLS)->psk_file = psk_file;
}

void fake_wait_eof(FakeServer *fs)
{
	add_step(fs, STEP_WAIT_EOF);
}

void fake_stall(FakeServer *fs)
{
	add_step(fs, STEP_STALL);
}

void fake_export_init(FakeExport *e)
{
	*e = (FakeExport){
		.greeting = TRUE,
		.hflags = FAKE_FLAG_FIXED_NEWSTYLE | FAKE_FLAG_NO_ZEROES,
		.sr = TRUE,
		.meta = TRUE,
		.meta_id = 7,
		.size = 1u << 20,
		.eflags = FAKE_EFLAG_HAS_FLAGS | FAKE_EFLAG_SEND_FLUSH | FAKE_EFLAG_SEND_FUA |
			  FAKE_EFLAG_SEND_TRIM | FAKE_EFLAG_SEND_WRITE_ZEROES | FAKE_EFLAG_SEND_DF,
	};
}

void fake_server_start(FakeServer *fs)
{
	g_assert(!fs->thread);
	fs->thread = g_thread_new("fake-nbd-server", server_thread, fs);
}

gboolean fake_server_finish(FakeServer *fs, const char **why)
{
	if (fs->thread && !fs->joined) {
		g_thread_join(fs->thread);
		fs->joined = TRUE;
	}
	if (why)
		*why = fs->why ? fs->why : "ok";
	return fs->ok;
}

const FakeCapture *fake_server_capture(FakeServer *fs, int slot)
{
	g_assert(fs->joined);
	return &fs->caps[check_slot(slot)];
}

uint32_t fake_server_client_flags(FakeServer *fs)
{
	return fs->client_flags;
}

gboolean fake_server_saw_abort(FakeServer *fs)
{
	return fs->stopped;
}

void fake_server_free(FakeServer *fs)
{
	if (!fs)
		return;
	fake_server_finish(fs, NULL);
	close_fd(fs);
	if (!fs->client_taken && fs->client_fd >= 0)
		close(fs->client_fd);
	for (guint i = 0; i < fs->steps->len; i++)
		fake_msg_free(g_array_index(fs->steps, struct step, i).msg);
	g_array_unref(fs->steps);
	for (int i = 0; i < FAKE_SLOTS; i++)
		if (fs->caps[i].data)
			g_byte_array_unref(fs->caps[i].data);
	if (fs->psk)
		gnutls_psk_free_server_credentials(fs->psk);
	g_free(fs->why);
	g_free(fs);
}
