/* fake-server.h: a scripted fake NBD server on a socketpair, for bad-server tests.
 *
 * A test builds a script of steps (send bytes, expect an option or a request
 * and capture it, reply with values taken from a capture, half-send then
 * close, wait for the client to go away), starts the server thread, and hands
 * the other end of the socketpair to nbdc_connect()/nbdc_list_exports() as
 * cfg.fd.  Every step is bounded by a deadline, so a wrong client can make a
 * test fail but never hang it.
 *
 * The wire constants below are written out here on purpose (not taken from
 * src/nbd): the harness is an independent check of the wire format.
 * All integers on the wire are big-endian.
 */
#pragma once

#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

/* ---- Wire constants (NBD protocol, doc/proto.md) ----------------------- */

#define FAKE_NBDMAGIC UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define FAKE_OLDSTYLE_MAGIC UINT64_C(0x00420281861253)
#define FAKE_IHAVEOPT UINT64_C(0x49484156454f5054) /* "IHAVEOPT" */
#define FAKE_OPT_REPLY_MAGIC UINT64_C(0x3e889045565a9)
#define FAKE_REQUEST_MAGIC UINT32_C(0x25609513)
#define FAKE_SIMPLE_MAGIC UINT32_C(0x67446698)
#define FAKE_STRUCTURED_MAGIC UINT32_C(0x668e33ef)

/* handshake flags (server) and client flags */
#define FAKE_FLAG_FIXED_NEWSTYLE (1u << 0)
#define FAKE_FLAG_NO_ZEROES (1u << 1)

/* options */
#define FAKE_OPT_EXPORT_NAME 1u
#define FAKE_OPT_ABORT 2u
#define FAKE_OPT_LIST 3u
#define FAKE_OPT_STARTTLS 5u
#define FAKE_OPT_INFO 6u
#define FAKE_OPT_GO 7u
#define FAKE_OPT_STRUCTURED_REPLY 8u
#define FAKE_OPT_LIST_META_CONTEXT 9u
#define FAKE_OPT_SET_META_CONTEXT 10u

/* option reply types */
#define FAKE_REP_ACK 1u
#define FAKE_REP_SERVER 2u
#define FAKE_REP_INFO 3u
#define FAKE_REP_META_CONTEXT 4u
#define FAKE_REP_ERR_UNSUP (0x80000000u + 1)
#define FAKE_REP_ERR_POLICY (0x80000000u + 2)
#define FAKE_REP_ERR_INVALID (0x80000000u + 3)
#define FAKE_REP_ERR_PLATFORM (0x80000000u + 4)
#define FAKE_REP_ERR_TLS_REQD (0x80000000u + 5)
#define FAKE_REP_ERR_UNKNOWN (0x80000000u + 6)
#define FAKE_REP_ERR_SHUTDOWN (0x80000000u + 7)
#define FAKE_REP_ERR_BLOCK_SIZE_REQD (0x80000000u + 8)
#define FAKE_REP_ERR_TOO_BIG (0x80000000u + 9)

/* NBD_INFO_* */
#define FAKE_INFO_EXPORT 0u
#define FAKE_INFO_NAME 1u
#define FAKE_INFO_DESCRIPTION 2u
#define FAKE_INFO_BLOCK_SIZE 3u

/* transmission flags */
#define FAKE_EFLAG_HAS_FLAGS (1u << 0)
#define FAKE_EFLAG_READ_ONLY (1u << 1)
#define FAKE_EFLAG_SEND_FLUSH (1u << 2)
#define FAKE_EFLAG_SEND_FUA (1u << 3)
#define FAKE_EFLAG_ROTATIONAL (1u << 4)
#define FAKE_EFLAG_SEND_TRIM (1u << 5)
#define FAKE_EFLAG_SEND_WRITE_ZEROES (1u << 6)
#define FAKE_EFLAG_SEND_DF (1u << 7)
#define FAKE_EFLAG_CAN_MULTI_CONN (1u << 8)

/* commands and command flags */
#define FAKE_CMD_READ 0u
#define FAKE_CMD_WRITE 1u
#define FAKE_CMD_DISC 2u
#define FAKE_CMD_FLUSH 3u
#define FAKE_CMD_TRIM 4u
#define FAKE_CMD_WRITE_ZEROES 6u
#define FAKE_CMD_BLOCK_STATUS 7u
#define FAKE_CMD_FLAG_FUA (1u << 0)
#define FAKE_CMD_FLAG_DF (1u << 2)
#define FAKE_CMD_FLAG_REQ_ONE (1u << 3)

/* structured reply chunk types and flags */
#define FAKE_CHUNK_NONE 0u
#define FAKE_CHUNK_OFFSET_DATA 1u
#define FAKE_CHUNK_OFFSET_HOLE 2u
#define FAKE_CHUNK_BLOCK_STATUS 5u
#define FAKE_CHUNK_BLOCK_STATUS_EXT 6u
#define FAKE_CHUNK_ERROR ((1u << 15) + 1)
#define FAKE_CHUNK_ERROR_OFFSET ((1u << 15) + 2)
#define FAKE_CHUNK_FLAG_DONE (1u << 0)

/* NBD error codes */
#define FAKE_EPERM 1u
#define FAKE_EIO 5u
#define FAKE_ENOMEM 12u
#define FAKE_EINVAL 22u
#define FAKE_ENOSPC 28u
#define FAKE_EOVERFLOW 75u
#define FAKE_ENOTSUP 95u
#define FAKE_ESHUTDOWN 108u

/* ---- Messages: bytes plus fields filled in when the step runs ----------- */

/* Number of capture slots per server; slot numbers are 0..FAKE_SLOTS-1. */
#define FAKE_SLOTS 16

typedef struct fake_msg FakeMsg;

FakeMsg *fake_msg_new(void);
void fake_msg_free(FakeMsg *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(FakeMsg, fake_msg_free)
size_t fake_msg_len(const FakeMsg *m);
void fake_msg_u8(FakeMsg *m, uint8_t v);
void fake_msg_u16(FakeMsg *m, uint16_t v);
void fake_msg_u32(FakeMsg *m, uint32_t v);
void fake_msg_u64(FakeMsg *m, uint64_t v);
void fake_msg_bytes(FakeMsg *m, const void *data, size_t len);
void fake_msg_fill(FakeMsg *m, uint8_t byte, size_t len);
/* Appends @tail (consumed) to @m, keeping its deferred fields. */
void fake_msg_append(FakeMsg *m, FakeMsg *tail);

/* Deferred fields, computed from capture @slot when the message is sent: */
/* u64: the captured request's cookie + @delta (delta != 0 makes an unknown cookie). */
void fake_msg_cookie(FakeMsg *m, int slot, int64_t delta);
/* u64: the captured request's offset + @delta. */
void fake_msg_offset(FakeMsg *m, int slot, int64_t delta);
/* @len bytes of the test pattern for absolute offsets captured offset + @delta + i. */
void fake_msg_pattern(FakeMsg *m, int slot, int64_t delta, size_t len);

/* The test pattern: the byte the fake "export" holds at @offset. */
static inline uint8_t fake_pattern_byte(uint64_t offset)
{
	return (uint8_t)((offset * 131u) ^ (offset >> 9) ^ 0x5c);
}

/* ---- Builders ------------------------------------------------------------ */

/* Oldstyle greeting: NBDMAGIC, oldstyle magic, size, u32 flags (gflags << 16 | eflags), 124 zeros.
 */
FakeMsg *fake_greeting_oldstyle(uint64_t size, uint32_t flags);
/* Newstyle greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags (FIXED_NEWSTYLE => fixed newstyle). */
FakeMsg *fake_greeting_newstyle(uint16_t hflags);

/* Option reply header + payload (consumed, may be NULL); length from the payload. */
FakeMsg *fake_rep(uint32_t option, uint32_t type, FakeMsg *payload);
FakeMsg *fake_rep_ack(uint32_t option);
/* Error reply (type has bit 31 set) with an optional message (NULL = none). */
FakeMsg *fake_rep_err(uint32_t option, uint32_t type, const char *msg);
/* NBD_REP_SERVER (to LIST): u32 namelen, name, description. */
FakeMsg *fake_rep_server(const char *name, const char *description);
FakeMsg *fake_rep_info_export(uint32_t option, uint64_t size, uint16_t eflags);
FakeMsg *fake_rep_info_block_size(uint32_t option, uint32_t min, uint32_t pref, uint32_t max);
FakeMsg *fake_rep_info_name(uint32_t option, const char *name);
FakeMsg *fake_rep_info_description(uint32_t option, const char *description);
FakeMsg *fake_rep_meta_context(uint32_t option, uint32_t id, const char *name);
/* Reply to NBD_OPT_EXPORT_NAME: size, eflags, 124 zeros when @zeroes. */
FakeMsg *fake_export_name_reply(uint64_t size, uint16_t eflags, gboolean zeroes);

/* Simple reply to the request captured in @slot (cookie echoed). */
FakeMsg *fake_simple_reply(int slot, uint32_t error);
/* Simple reply with error 0 followed by the pattern for the whole captured range. */
FakeMsg *fake_simple_reply_data(int slot);
/* Structured chunk header (cookie of @slot) + payload (consumed, may be NULL). */
FakeMsg *fake_chunk(int slot, uint16_t flags, uint16_t type, FakeMsg *payload);
/* OFFSET_DATA at captured offset + @delta carrying @len pattern bytes. */
FakeMsg *fake_chunk_data(int slot, uint16_t flags, int64_t delta, size_t len);
/* OFFSET_HOLE at captured offset + @delta of @len bytes. */
FakeMsg *fake_chunk_hole(int slot, uint16_t flags, int64_t delta, uint32_t len);
/* NONE with DONE. */
FakeMsg *fake_chunk_none(int slot);
/* ERROR: u32 error, u16 msglen, message. */
FakeMsg *fake_chunk_error(int slot, uint16_t flags, uint32_t error, const char *msg);
/* ERROR_OFFSET: as ERROR plus u64 offset = captured offset + @delta. */
FakeMsg *fake_chunk_error_offset(int slot, uint16_t flags, uint32_t error, const char *msg,
				 int64_t delta);
/* BLOCK_STATUS: u32 context id, then @n (length, flags) pairs. */
FakeMsg *fake_chunk_block_status(int slot, uint16_t flags, uint32_t context_id,
				 const uint32_t *pairs, size_t n);

/* ---- The server ----------------------------------------------------------- */

typedef struct fake_server FakeServer;

/* What an expect step captured. */
typedef struct {
	gboolean valid;
	/* option steps */
	uint32_t option;
	uint32_t option_len;
	/* request steps */
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint64_t offset;
	uint32_t length;
	/* option data, write payload (first 1 MiB) or raw expected bytes */
	GByteArray *data;
} FakeCapture;

/* What fake_negotiate() serves.  fake_export_init() sets the defaults. */
typedef struct {
	gboolean greeting; /* send a newstyle greeting with @hflags, read client flags; default TRUE
			    */
	uint16_t hflags;   /* default FIXED_NEWSTYLE | NO_ZEROES */
	gboolean sr;	   /* ACK STRUCTURED_REPLY (else ERR_UNSUP); default TRUE */
	gboolean meta;	   /* answer base:allocation in SET_META_CONTEXT; default TRUE */
	uint32_t meta_id;  /* its context id; default 7 */
	uint64_t size;	   /* default 1 MiB */
	uint16_t eflags;   /* default
			      HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|SEND_DF */
	uint32_t block_min, block_pref, block_max; /* sent in GO/INFO when block_min != 0 */
	const char *const *exports; /* NULL-terminated name, description pairs for LIST */
} FakeExport;

void fake_export_init(FakeExport *e);

/* A new server with a fresh socketpair.  The script is empty; steps are added
 * with the functions below, then fake_server_start() runs them in a thread. */
FakeServer *fake_server_new(void);
/* A server on an already connected stream socket @fd (taken over), e.g. the
 * stdin of a program run by nbdinfo/nbdcopy in command mode.  There is no
 * client end: fake_server_client_fd() must not be called. */
FakeServer *fake_server_new_fd(int fd);
/* The client end of the socketpair; the caller owns it (give it to cfg.fd). */
int fake_server_client_fd(FakeServer *fs);
/* Per-step deadline in ms (default 5000). */
void fake_server_set_timeout(FakeServer *fs, guint ms);

/* Steps. */
void fake_send(FakeServer *fs, FakeMsg *m); /* consumes @m */
void fake_send_raw(FakeServer *fs, const void *data, size_t len);
/* Sends the first @n bytes of @m (consumed), then closes the connection. */
void fake_send_partial_close(FakeServer *fs, FakeMsg *m, size_t n);
/* Sends @m (consumed) up to @max times, stopping quietly when the client closes. */
void fake_send_repeat(FakeServer *fs, FakeMsg *m, guint max);
void fake_expect_bytes(FakeServer *fs, size_t n, int slot);
/* Reads the 4-byte client flags into @slot (option = the flags). */
void fake_expect_client_flags(FakeServer *fs, int slot);
/* Reads one option (IHAVEOPT, option, len, data[len <= 64 KiB]) into @slot. */
void fake_expect_option(FakeServer *fs, int slot);
/* Reads one request header into @slot, and a WRITE's whole payload. */
void fake_expect_request(FakeServer *fs, int slot);
/* Reads a request header and only @n bytes of a WRITE's payload. */
void fake_expect_request_partial(FakeServer *fs, int slot, size_t n);
/* Serves a normal negotiation for @exp (greeting if exp->greeting, then
 * options in any order).  Ends after GO's ACK or the EXPORT_NAME reply, or,
 * when @stop_option != 0, as soon as that option arrives (captured in @slot,
 * unanswered).  A LIST is answered from exp->exports, an ABORT ends the script. */
void fake_negotiate(FakeServer *fs, const FakeExport *exp, uint32_t stop_option, int slot);
void fake_close(FakeServer *fs);
/* Runs a TLS server handshake (PSK, keys from the "user:hexkey" file
 * @psk_file, borrowed until the script ends); every later step then speaks
 * through TLS.  Send the ACK to NBD_OPT_STARTTLS first.  fake_close() never
 * sends a close_notify. */
void fake_starttls(FakeServer *fs, const char *psk_file);
/* Reads and discards until the client closes. */
void fake_wait_eof(FakeServer *fs);
/* Reads nothing until the client closes (hang-up). */
void fake_stall(FakeServer *fs);

/* Starts the script.  When it ends the server waits (reading and discarding)
 * for the client to close, then closes its end. */
void fake_server_start(FakeServer *fs);
/* Joins the thread.  Returns TRUE if every step completed; else FALSE with a
 * message naming the failed step (borrowed, valid until fake_server_free). */
gboolean fake_server_finish(FakeServer *fs, const char **why);
/* A capture (valid after fake_server_finish). */
const FakeCapture *fake_server_capture(FakeServer *fs, int slot);
/* Client flags seen by the last flags step (or by fake_negotiate). */
uint32_t fake_server_client_flags(FakeServer *fs);
/* TRUE if fake_negotiate() received NBD_OPT_ABORT. */
gboolean fake_server_saw_abort(FakeServer *fs);
/* Finishes if needed, frees. */
void fake_server_free(FakeServer *fs);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(FakeServer, fake_server_free)

G_END_DECLS
