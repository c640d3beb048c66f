/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* badserver.h: what the bad-server cases share (badserver.c): the client
 * context over a fake server, guarded read buffers, the sanity checks after a
 * bad reply, async and extent collectors, and the per-case subprocess runner.
 *
 * The cases are split by protocol phase (protocol.md §2), one TAP executable
 * each; the test paths stay /badserver/<case>:
 *   badserver-greeting.c      H: greeting, flags, sizes, block sizes, GO refusals,
 *                             handshake timeouts; old/non-fixed newstyle that work
 *   badserver-options.c       H: option replies (INFO, meta contexts, errors), LIST
 *   badserver-tls.c           H: STARTTLS, and T cases inside TLS
 *   badserver-transmission.c  T: reply headers, cookies, closes, timeouts
 *   badserver-structured.c    S: structured read chunks, and positive chunk cases
 *   badserver-block-status.c  B: block status replies
 *
 * Each case asserts the exact outcome (GError code, or negative errno) and
 * that the client stays sane: no hang (every step and request is bounded, and
 * a watchdog ends a stuck case), later requests on a dead connection fail with
 * -ENOTCONN, nbdc_get_error() explains, and bytes around read buffers stay
 * untouched.
 */
#pragma once

#include "fake-server.h"
#include "nbdfs/loop.h"
#include "nbdfs/nbd.h"

#include <errno.h>
#include <glib.h>
#include <stdint.h>
#include <string.h>

#define GUARD 64
#define GUARD_BYTE 0xe7
#define FILL_BYTE 0xaa
#define MiB (1024u * 1024u)

/* ---- Runner ---------------------------------------------------------------- */

/* g_test_init() and the watchdog; call first in main(). */
void badserver_init(int *argc, char ***argv);
/* Registers a case that runs in its own subprocess, so one failing or
 * crashing case is reported as such and the others still run. */
void badserver_add(const char *path, void (*fn)(void));
#define ADD(path, fn) badserver_add(path, fn)

/* Diagnostics go to stderr: each case runs in a subprocess whose stderr the
 * suite inherits, while its stdout (TAP) is the parent's business. */
void note(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* ---- Client configuration ------------------------------------------------ */

typedef struct {
	FakeServer *fs; /* owned */
	FakeExport e;
	struct nbdc_config cfg;
	Nbdc *c; /* owned, NULL until connected */
} Ctx;

/* Starts the watchdog, a fake server and a client configuration on it. */
void ctx_init(Ctx *t);
/* Frees the client (must return: no hang) and the server; stops the watchdog. */
void ctx_end(Ctx *t);
/* Starts the script and connects; the connection must succeed. */
void ctx_connect(Ctx *t);
/* Starts the script and connects; it must fail with NBDC_ERROR / @code. */
void ctx_connect_fails(Ctx *t, int code);
/* Starts the script and lists the exports (caller frees the array). */
GPtrArray *ctx_list(Ctx *t, GError **err);
/* Starts the script and lists; it must fail with NBDC_ERROR / @code. */
void ctx_list_fails(Ctx *t, int code);
/* The common start of an I/O case: a normal negotiation, then one request
 * captured in slot 0. */
void ctx_io(Ctx *t);

/* ---- Guarded buffers ------------------------------------------------------- */

typedef struct {
	guint8 *mem; /* owned: GUARD bytes, len bytes, GUARD bytes */
	guint8 *p;   /* borrowed: mem + GUARD */
	size_t len;
} Buf;

Buf buf_new(size_t len);
void buf_check_guards(const Buf *b);
/* Bytes [from, to) of @b hold the pattern of export offset @off + i. */
void buf_check_pattern(const Buf *b, uint64_t off, size_t from, size_t to);
void buf_check_fill(const Buf *b, uint8_t v, size_t from, size_t to);
/* Checks the guards and frees. */
void buf_free(Buf *b);
/* A read into a guarded buffer; returns the result, checks the guards. */
int read_guarded(Nbdc *c, size_t len, uint64_t off, uint32_t flags);
/* A read that must succeed with the pattern. */
void read_ok(Nbdc *c, size_t len, uint64_t off);

/* ---- Sanity after the fact ------------------------------------------------- */

/* The connection must be dead (polled with a deadline: the reader may still be
 * tearing down), explain why, and fail later requests with -ENOTCONN without
 * touching the caller's buffer. */
void assert_dead(Nbdc *c);
/* Connects; the first 4 KiB read must then fail with @err and leave the
 * connection dead (the common end of a bad-reply case). */
void ctx_first_read_kills(Ctx *t, int err);
/* The connection must still be alive. */
void assert_alive(Nbdc *c);
/* Frees the client, which must say goodbye: the script has read its
 * NBD_CMD_DISC into @slot.  Then finishes the server and ends @t. */
void ctx_end_disc(Ctx *t, int slot);

/* What must hold of the connection after a failed request. */
enum after {
	DEAD,	/* torn down: later requests -ENOTCONN */
	ALIVE,	/* kept: the next request works */
	EITHER, /* protocol.md allows a resync (then the next request works) or DEAD */
};

/* Checks @mode; for ALIVE/EITHER the script serves one more read (slot 9). */
void check_after(Nbdc *c, enum after mode);
void serve_followup(FakeServer *fs, enum after mode);

/* A request run on the connected client; returns its result (0 or -errno). */
typedef int (*ctx_request)(Nbdc *c, void *arg);
/* The common case of one bad reply: the server answers the first request
 * with @m1 then @m2 (consumed; @m2 may be NULL) and serves the follow-up of
 * @mode; @request(@arg) must return @want, then @mode must hold. */
void expect_reply(FakeMsg *m1, FakeMsg *m2, ctx_request request, void *arg, int want,
		  enum after mode);

/* ---- Async helpers -------------------------------------------------------- */

/* Waits (10 s at most) for the one call of the callback of @c (struct
 * completion, include/nbdfs/loop.h: completion_done is the nbdc done
 * callback, a second call aborts), drops the waiter's reference, and returns
 * the callback's err. */
int done_wait(struct completion *c);

/* Two async reads in flight at once, @len_a bytes at @off_a then @len_b at
 * @off_b; waits for both and returns their results in @ra and @rb.  A read
 * that succeeded must have read the pattern. */
void read_two(Nbdc *c, uint64_t off_a, size_t len_a, uint64_t off_b, size_t len_b, int *ra,
	      int *rb);

typedef struct {
	uint64_t off, len;
	uint32_t flags;
} Extent;

/* The nbdc extent callback; @opaque is a GArray of Extent. */
void extent_cb(void *opaque, uint64_t offset, uint64_t length, uint32_t flags);
void assert_extent(GArray *a, guint i, uint64_t off, uint64_t len, uint32_t flags);
