/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* nbd.h: the nbdfs NBD client core (handshake, listing, pipelined async I/O).
 *
 * One `Nbdc` handle is one export, carried by one or more connections
 * (multi-conn, only where the server advertises CAN_MULTI_CONN).  A handle
 * made by nbdc_connect() is connected at once; one made by nbdc_open() (with
 * what nbdc_probe_exports() learnt) connects on first use, opens extra
 * connections when requests queue up, and closes them when idle.  With
 * cfg.reconnect a lost connection is made again and its requests resent.
 * Setup calls (parse, connect, list, probe) report failures as GError in the
 * NBDC_ERROR domain, with messages shaped "context: what: why".  I/O calls
 * report failures as a negative errno; see "I/O errors" below.
 *
 * Threads: every function here is thread-safe.  Connections are state
 * machines on the event loops of include/nbdfs/loop.h (cfg.loops); the
 * completion callbacks run on those loops.  No call blocks except the
 * synchronous ones, which must not be called on a loop.
 */
#pragma once

#include <glib.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

G_BEGIN_DECLS

/* ---- Errors (setup path) ---------------------------------------------- */

#define NBDC_ERROR (nbdc_error_quark())
GQuark nbdc_error_quark(void);

typedef enum {
	NBDC_ERROR_URI,		 /* malformed URI; the message names the bad part */
	NBDC_ERROR_CONNECT,	 /* socket, connect or resolve failed (unreachable) */
	NBDC_ERROR_HANDSHAKE,	 /* server broke the protocol during negotiation */
	NBDC_ERROR_TLS,		 /* TLS refused by the server, handshake or certificate failed */
	NBDC_ERROR_TLS_REQUIRED, /* the server requires TLS and we asked for none */
	NBDC_ERROR_NO_EXPORT,	 /* the server does not know the export */
	NBDC_ERROR_POLICY,	 /* refused by policy (the seed's `Policy`) */
	NBDC_ERROR_UNSUPPORTED,	 /* the server cannot do it (the seed's `Unsupported`:
				  * oldstyle, non-fixed newstyle, ERR_UNSUP, ERR_PLATFORM) */
	NBDC_ERROR_SERVER,	 /* another option error reply from the server */
	NBDC_ERROR_TIMEOUT,	 /* the handshake did not finish in time */
	NBDC_ERROR_INVALID,	 /* a bad argument from the caller (e.g. bad config) */
} NbdcError;

/* ---- I/O errors --------------------------------------------------------
 * The I/O path returns 0 or a negative errno, and completion callbacks get
 * the same:
 *   server error reply (the seed's Protocol_error)  -> nbdc_errno_from_nbd()
 *   write/trim/zero on a read-only export (Is_read_only) -> -EROFS, no traffic
 *   the handle or its connection is gone (Disconnected) -> -ENOTCONN
 *   the server broke the protocol (connection now dead) -> -EPROTO
 *   request timeout (config.request_timeout_ms)          -> -ETIMEDOUT
 *   out of bounds or unaligned to the minimum block      -> -EINVAL (-ENOSPC for writes past the
 * end) nbdc_get_error() gives the readable reason a connection died.
 */

/* Maps an NBD error code (wire value) to a positive errno.  Unknown -> EINVAL. */
int nbdc_errno_from_nbd(uint32_t nbd_error);

/* ---- URIs (NBD URI specification, doc/uri.md) --------------------------- */

typedef struct nbdc_uri NbdcUri;

struct nbdc_uri {
	gboolean tls;	      /* nbds:// or nbds+unix:// */
	gboolean unix_socket; /* nbd+unix:// or nbds+unix:// */
	char *host;	      /* TCP host, IPv6 without brackets; NULL for unix */
	char *port;	      /* TCP port, "10809" when absent; NULL for unix */
	char *socket_path;    /* ?socket= (required for +unix); NULL for TCP */
	char *export_name;  /* percent-decoded path minus the leading '/'; never NULL ("" = default)
			     */
	char *tls_username; /* userinfo before '@' (PSK identity), or NULL */
	char *tls_psk_file; /* ?tls-psk-file=, or NULL */
	char *tls_certificates; /* ?tls-certificates=, or NULL */
	char *tls_hostname;	/* ?tls-hostname=, or NULL */
	char *tls_type;		/* ?tls-type= (anon|x509|psk), or NULL */
	int tls_verify_peer;	/* ?tls-verify-peer=0|1|true|false; -1 when absent */
};

/* Parses @uri.  Returns a new struct (caller frees with nbdc_uri_free) or
 * NULL with NBDC_ERROR_URI naming what is wrong (unknown scheme, +unix
 * without socket=, socket= with a TCP scheme, bad port, bad %-escape,
 * export name > 4096 bytes, unknown query parameter, ...). */
struct nbdc_uri *nbdc_uri_parse(const char *uri, GError **error);
void nbdc_uri_free(struct nbdc_uri *uri);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NbdcUri, nbdc_uri_free)

/* Returns @uri rebuilt without secrets (no query parameters naming key
 * files, no userinfo), for display.  Caller frees with g_free. */
char *nbdc_uri_to_display(const struct nbdc_uri *uri);

/* ---- Configuration ------------------------------------------------------ */

enum nbdc_log_level { NBDC_LOG_DEBUG, NBDC_LOG_INFO, NBDC_LOG_WARNING };
typedef void (*nbdc_log_fn)(void *opaque, enum nbdc_log_level level, const char *msg);

typedef struct loop_set LoopSet;

/* All strings are borrowed: they must outlive every handle made from this
 * config (a handle reconnects with them). */
struct nbdc_config {
	/* Where to connect: exactly one of host, socket_path, fd. */
	const char *host;
	const char *port; /* NULL = "10809" */
	const char *socket_path;
	int fd;			 /* connected socket, -1 when unused; nbdc_connect
				  * takes ownership (closes it, even on failure) */
	const char *export_name; /* NULL or "" = the default export */

	/* TLS (STARTTLS).  tls = TRUE (nbds URIs) requires it: any refusal fails. */
	gboolean tls;
	const char *tls_psk_file;     /* "user:hexkey" lines */
	const char *tls_username;     /* PSK identity; NULL = the login name */
	const char *tls_certificates; /* dir: ca-cert.pem, client-cert.pem, client-key.pem */
	const char *tls_hostname;     /* SNI and verification name; NULL = host */
	gboolean tls_verify_peer;     /* default TRUE */

	/* Negotiation. */
	gboolean structured_replies; /* default TRUE */
	gboolean block_status;	     /* ask for base:allocation; default TRUE */
	guint connections;	     /* 0 = default (4 if CAN_MULTI_CONN, else 1); N>1
				      * without CAN_MULTI_CONN gives 1 and logs a warning */
	guint max_in_flight;	     /* per connection; default 64; more wait in a queue */
	guint handshake_timeout_ms;  /* resolve + connect + negotiate; default 30000; 0 = none */
	guint request_timeout_ms;    /* a sent request unanswered this long (or a server
				      * that stops reading our bytes) means the connection
				      * is lost; default 0 = never.  Without reconnect its
				      * requests fail with -ETIMEDOUT.  On TCP it also sets
				      * keepalive and TCP_USER_TIMEOUT. */

	/* Where connections run: NULL = a process-wide default set of loops. */
	LoopSet *loops;
	/* Reconnection: a lost connection is made again (backoff 50 ms doubling
	 * to 2 s) and its requests resent; a request waits at most
	 * reconnect_timeout_ms for a connection (0: fails at once when there is
	 * none), then fails with -EIO.  Without it a lost connection ends the
	 * handle (-ENOTCONN, -EPROTO, -ETIMEDOUT).  Default FALSE. */
	gboolean reconnect;
	guint reconnect_timeout_ms;
	/* With reconnect: writes acknowledged but not yet covered by a flush
	 * are kept (copied, bounded) and replayed on a new connection before
	 * anything else; where that fails, nbdc_health.lost_writes_seq counts
	 * the loss.  Default TRUE. */
	gboolean replay;
	/* nbdc_open() handles: close connections idle this long while nothing
	 * holds the handle (nbdc_hold); 0 = never.  Default 60000. */
	guint idle_timeout_ms;

	/* Logging: warnings always; NBDC_LOG_DEBUG (one line per request) only when
	 * debug is TRUE.  May be called from any thread.  NULL = stderr. */
	nbdc_log_fn log;
	void *log_opaque;
	gboolean debug;
};

/* Fills @cfg with the defaults above (fd = -1, nothing to connect to). */
void nbdc_config_init(struct nbdc_config *cfg);

/* Points @cfg's address, export name and TLS fields at @uri's (borrowed:
 * @uri must outlive @cfg).  Fields the URI leaves unset stay as they were, so
 * command-line defaults (e.g. tls_psk_file) can be set before or after. */
void nbdc_config_set_uri(struct nbdc_config *cfg, const struct nbdc_uri *uri);

/* ---- Listing (the seed's `list`) ---------------------------------------- */

struct nbdc_export {
	char *name;	   /* never NULL */
	char *description; /* "" when none */
	/* Filled only when the server answered NBD_OPT_INFO for this export
	 * (details asked, or a probe): */
	gboolean has_info;
	uint64_t size;
	uint16_t eflags;
	gboolean read_only;
	uint32_t block_min, block_pref, block_max; /* 0 = not advertised */
	char *canonical_name;			   /* NBD_INFO_NAME, or NULL */
	/* Probes only: why this export could not be described, or NULL.
	 * NBDC_ERROR_UNSUPPORTED: the server cannot describe exports without
	 * connecting to them (no NBD_OPT_INFO, oldstyle...): use nbdc_connect. */
	GError *error;
};

/* Lists the server's exports in the server's order.  Returns a GPtrArray of
 * struct nbdc_export * (the array frees its elements: caller g_ptr_array_unref),
 * or NULL with NBDC_ERROR_POLICY (refused by policy), NBDC_ERROR_UNSUPPORTED
 * (oldstyle, non-fixed newstyle, ERR_UNSUP, ERR_PLATFORM), NBDC_ERROR_TLS_REQUIRED,
 * or a connect/handshake error.  With @details, asks NBD_OPT_INFO for each
 * export.  The export name in @cfg is ignored.  Ends with NBD_OPT_ABORT. */
GPtrArray *nbdc_list_exports(const struct nbdc_config *cfg, gboolean details, GError **error);

/* Learns size, flags and block sizes of the exports @names (@n of them), or
 * with @all of every export the server lists, with NBD_OPT_INFO over at most
 * @parallel control connections at once (0 = 8), each reused for as many
 * exports as the server allows.  Returns a GPtrArray of struct nbdc_export *
 * (in the order asked, or the server's order; failures per export in
 * e->error) that the caller unrefs, or NULL + GError when nothing could be
 * learnt at all (unreachable, TLS, listing refused...). */
GPtrArray *nbdc_probe_exports(const struct nbdc_config *cfg, const char *const *names, guint n,
			      gboolean all, guint parallel, GError **error);

/* ---- Connecting (the seed's `negotiate`) -------------------------------- */

typedef struct nbdc Nbdc;

/* Connects and negotiates: fixed newstyle (NO_ZEROES where offered),
 * [STARTTLS], [STRUCTURED_REPLY], [SET_META_CONTEXT base:allocation], GO with
 * INFO_BLOCK_SIZE/NAME/DESCRIPTION, falling back to EXPORT_NAME; or oldstyle,
 * or non-fixed newstyle.  Then opens the extra multi-conn connections.
 * Returns a new handle (caller frees with nbdc_free) or NULL + GError. */
Nbdc *nbdc_connect(const struct nbdc_config *cfg, GError **error);

struct nbdc_info {
	uint64_t size;	       /* bytes, <= INT64_MAX */
	uint32_t sector_size;  /* block_min if >= 512, else 512 */
	uint64_t size_sectors; /* size / sector_size (whole sectors) */
	gboolean read_write;   /* !READ_ONLY */
	uint16_t eflags;       /* transmission flags as the server sent them */
	gboolean can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_multi_conn;
	gboolean can_block_status; /* base:allocation negotiated */
	gboolean structured_replies, tls;
	uint32_t block_min, block_pref, block_max; /* 0 = not advertised */
	uint32_t max_request;	 /* largest READ/WRITE sent: min(block_max, 32 MiB) */
	guint connections;	 /* connections actually open */
	const char *protocol;	 /* "oldstyle", "newstyle", "newstyle-fixed"; static */
	const char *export_name; /* canonical name (NBD_INFO_NAME) or the requested one */
	const char *description; /* "" when none */
};

/* A handle for the export @known describes (a probe result with has_info),
 * with no connection yet: the first request (or nbdc_hold) connects.
 * Returns a new handle (caller frees with nbdc_free) or NULL + GError
 * (NBDC_ERROR_INVALID: @known has no info; a TLS credential error). */
Nbdc *nbdc_open(const struct nbdc_config *cfg, const struct nbdc_export *known, GError **error);

/* Fills @out.  Strings are borrowed, valid until nbdc_free.  Before a
 * handle from nbdc_open() connected, structured replies and block status
 * are reported as the configuration asks for them. */
void nbdc_get_info(const Nbdc *c, struct nbdc_info *out);

/* Something uses the handle (an open file): connect now if not connected,
 * and keep idle connections open until the matching nbdc_hold(c, FALSE). */
void nbdc_hold(Nbdc *c, gboolean held);

enum nbdc_state {
	NBDC_STATE_IDLE, /* no connection needed yet, or closed while idle */
	NBDC_STATE_CONNECTED,
	NBDC_STATE_RECONNECTING, /* lost; requests wait up to reconnect_timeout_ms */
	NBDC_STATE_FAILED,	 /* the last wait ran out: requests failed with -EIO */
};

struct nbdc_health {
	enum nbdc_state state;
	guint connections;	  /* open now */
	uint64_t reconnects;	  /* connections re-made after a loss */
	uint64_t lost_writes_seq; /* times acknowledged, unflushed writes were lost */
};

void nbdc_get_health(Nbdc *c, struct nbdc_health *out);

/* FALSE once any connection of the handle has died or was disconnected. */
gboolean nbdc_is_alive(const Nbdc *c);

/* Why the handle died, or NULL while alive.  Borrowed, valid until nbdc_free. */
const char *nbdc_get_error(const Nbdc *c);

/* ---- Asynchronous I/O -----------------------------------------------------
 * Each call returns 0 when the request was queued: then @done is called
 * exactly once, later, on an event loop (never from inside the call), with
 * 0 or a negative errno.  It returns a negative errno when nothing was queued
 * (then @done is never called).  It never blocks: beyond max_in_flight,
 * requests wait in the connection's queue.
 * Requests larger than max_request (reads/writes) or 4 GiB - block_min
 * (trim/zero/block status) are split; the first error wins.  Offsets and
 * lengths must be multiples of block_min when one was advertised (-EINVAL).
 * The iov array and the buffers it points to must stay valid until @done.
 * Read data goes straight from the socket into the caller's buffers.
 * Callbacks must not block: they run on the connection's event loop. */

typedef void (*nbdc_done_fn)(void *opaque, int err);

enum {
	NBDC_CMD_FLAG_FUA = 1 << 0,
	NBDC_CMD_FLAG_NO_HOLE = 1 << 1,
	NBDC_CMD_FLAG_DF = 1 << 2,
	NBDC_CMD_FLAG_REQ_ONE = 1 << 3,
	NBDC_CMD_FLAG_FAST_ZERO = 1 << 4,
};

int nbdc_aio_preadv(Nbdc *c, const struct iovec *iov, int iovcnt, uint64_t offset, uint32_t flags,
		    nbdc_done_fn done, void *opaque);
/* FUA without SEND_FUA is emulated by a flush after the write (if SEND_FLUSH). */
int nbdc_aio_pwritev(Nbdc *c, const struct iovec *iov, int iovcnt, uint64_t offset, uint32_t flags,
		     nbdc_done_fn done, void *opaque);
/* Without SEND_FLUSH: completes with 0 and sends nothing.  With multi-conn a
 * flush on one connection covers the writes completed on all of them.
 * A flush with nothing to cover also completes with 0 and sends nothing
 * (on a loop, as always; it needs no connection, so it is immediate with the
 * server gone): no write, zero or trim of this handle is unfinished (in
 * flight, queued, waiting for a connection), each one acknowledged was
 * covered by a flush that succeeded after it, on any of the handle's
 * connections, and the replay log holds nothing (a write lost since counts
 * as not covered).  A handle that never wrote never flushes. */
int nbdc_aio_flush(Nbdc *c, nbdc_done_fn done, void *opaque);
/* Without SEND_TRIM: -EOPNOTSUPP. */
int nbdc_aio_trim(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags, nbdc_done_fn done,
		  void *opaque);
/* Without SEND_WRITE_ZEROES: emulated with writes of a zero buffer. */
int nbdc_aio_zero(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags, nbdc_done_fn done,
		  void *opaque);

/* base:allocation states (wire values). */
enum { NBDC_STATE_HOLE = 1 << 0, NBDC_STATE_ZERO = 1 << 1 };
/* Called on the loop for each extent, in order, before @done; extents
 * are validated (non-empty, inside the request, clamped to the export). */
typedef void (*nbdc_extent_fn)(void *opaque, uint64_t offset, uint64_t length, uint32_t flags);
/* Without negotiated block status: -EOPNOTSUPP. */
int nbdc_aio_block_status(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags,
			  nbdc_extent_fn extent, nbdc_done_fn done, void *opaque);

/* ---- Synchronous wrappers (block the calling thread) -------------------- */

int nbdc_pread(Nbdc *c, void *buf, size_t count, uint64_t offset, uint32_t flags);
int nbdc_pwrite(Nbdc *c, const void *buf, size_t count, uint64_t offset, uint32_t flags);
int nbdc_flush(Nbdc *c);
int nbdc_trim(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags);
int nbdc_zero(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags);
int nbdc_block_status(Nbdc *c, uint64_t count, uint64_t offset, uint32_t flags,
		      nbdc_extent_fn extent, void *opaque);

/* ---- Teardown (the seed's `disconnect`: never fails) -------------------- */

/* Stops accepting requests, waits (bounded, a few seconds) for in-flight ones,
 * sends NBD_CMD_DISC on every connection, shuts TLS down and closes.
 * Idempotent.  Later requests fail with -ENOTCONN.  Must not be called on a
 * loop (use nbdc_abandon there). */
void nbdc_disconnect(Nbdc *c);

/* Stops accepting requests without waiting: requests still waiting for a
 * connection or in flight fail with -ENOTCONN, idle connections get
 * NBD_CMD_DISC.  Any thread, never blocks, idempotent.
 * At once, whatever the server does: every request of the handle (in
 * flight on a server that stopped answering, queued behind max_in_flight,
 * parked while it reconnects, waiting for the replay log) has its callback
 * run, exactly once, on a loop within milliseconds; a connection attempt
 * under way ends; a connection with no request says NBD_CMD_DISC even when
 * another one had requests.  Called while nbdc_disconnect() waits for
 * requests in flight (on another thread), it ends that wait. */
void nbdc_abandon(Nbdc *c);

/* Disconnects if needed and frees; off a loop it waits (bounded) until every
 * connection is closed and every callback ran.  NULL is a no-op.  On a loop
 * (the last reference dropped in a callback) the teardown finishes later. */
void nbdc_free(Nbdc *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Nbdc, nbdc_free)

G_END_DECLS
