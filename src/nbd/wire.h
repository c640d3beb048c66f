/* wire.h: NBD wire constants, packed wire structs and byte-order helpers (private).
 *
 * Every multi-byte integer on the NBD wire is big-endian.  The structs here
 * mirror the wire exactly (packed, sizes checked at compile time); fields are
 * converted with the be*() / put_be*() helpers, never read raw.
 */
#pragma once

#include <endian.h>
#include <stdint.h>
#include <string.h>

/* ---- Magics ---- */
#define NBD_MAGIC UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define NBD_OLDSTYLE_MAGIC UINT64_C(0x0000420281861253)
#define NBD_IHAVEOPT UINT64_C(0x49484156454F5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC UINT64_C(0x0003e889045565a9)
#define NBD_REQUEST_MAGIC UINT32_C(0x25609513)
#define NBD_SIMPLE_REPLY_MAGIC UINT32_C(0x67446698)
#define NBD_STRUCTURED_REPLY_MAGIC UINT32_C(0x668e33ef)

/* ---- Handshake flags (server, u16) and client flags (u32) ---- */
#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE NBD_FLAG_FIXED_NEWSTYLE
#define NBD_FLAG_C_NO_ZEROES NBD_FLAG_NO_ZEROES

/* ---- Options ---- */
#define NBD_OPT_EXPORT_NAME 1u
#define NBD_OPT_ABORT 2u
#define NBD_OPT_LIST 3u
#define NBD_OPT_STARTTLS 5u
#define NBD_OPT_INFO 6u
#define NBD_OPT_GO 7u
#define NBD_OPT_STRUCTURED_REPLY 8u
#define NBD_OPT_LIST_META_CONTEXT 9u
#define NBD_OPT_SET_META_CONTEXT 10u

/* ---- Option reply types ---- */
#define NBD_REP_ACK 1u
#define NBD_REP_SERVER 2u
#define NBD_REP_INFO 3u
#define NBD_REP_META_CONTEXT 4u
#define NBD_REP_FLAG_ERROR (UINT32_C(1) << 31)
#define NBD_REP_ERR_UNSUP (NBD_REP_FLAG_ERROR + 1)
#define NBD_REP_ERR_POLICY (NBD_REP_FLAG_ERROR + 2)
#define NBD_REP_ERR_INVALID (NBD_REP_FLAG_ERROR + 3)
#define NBD_REP_ERR_PLATFORM (NBD_REP_FLAG_ERROR + 4)
#define NBD_REP_ERR_TLS_REQD (NBD_REP_FLAG_ERROR + 5)
#define NBD_REP_ERR_UNKNOWN (NBD_REP_FLAG_ERROR + 6)
#define NBD_REP_ERR_SHUTDOWN (NBD_REP_FLAG_ERROR + 7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD (NBD_REP_FLAG_ERROR + 8)
#define NBD_REP_ERR_TOO_BIG (NBD_REP_FLAG_ERROR + 9)
#define NBD_REP_ERR_EXT_HEADER_REQD (NBD_REP_FLAG_ERROR + 10)

/* ---- NBD_INFO_* ---- */
#define NBD_INFO_EXPORT 0u
#define NBD_INFO_NAME 1u
#define NBD_INFO_DESCRIPTION 2u
#define NBD_INFO_BLOCK_SIZE 3u

/* ---- Transmission flags (u16) ---- */
#define NBD_FLAG_HAS_FLAGS (1u << 0)
#define NBD_FLAG_READ_ONLY (1u << 1)
#define NBD_FLAG_SEND_FLUSH (1u << 2)
#define NBD_FLAG_SEND_FUA (1u << 3)
#define NBD_FLAG_ROTATIONAL (1u << 4)
#define NBD_FLAG_SEND_TRIM (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN (1u << 8)
#define NBD_FLAG_SEND_CACHE (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO (1u << 11)

/* ---- Commands and command flags ---- */
#define NBD_CMD_READ 0u
#define NBD_CMD_WRITE 1u
#define NBD_CMD_DISC 2u
#define NBD_CMD_FLUSH 3u
#define NBD_CMD_TRIM 4u
#define NBD_CMD_CACHE 5u
#define NBD_CMD_WRITE_ZEROES 6u
#define NBD_CMD_BLOCK_STATUS 7u

#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

/* ---- Structured reply chunks ---- */
#define NBD_REPLY_FLAG_DONE (1u << 0)
#define NBD_REPLY_TYPE_NONE 0u
#define NBD_REPLY_TYPE_OFFSET_DATA 1u
#define NBD_REPLY_TYPE_OFFSET_HOLE 2u
#define NBD_REPLY_TYPE_BLOCK_STATUS 5u
#define NBD_REPLY_TYPE_ERROR_BIT (1u << 15)
#define NBD_REPLY_TYPE_ERROR (NBD_REPLY_TYPE_ERROR_BIT + 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET (NBD_REPLY_TYPE_ERROR_BIT + 2)

/* ---- NBD error codes (wire) ---- */
#define NBD_EPERM 1u
#define NBD_EIO 5u
#define NBD_ENOMEM 12u
#define NBD_EINVAL 22u
#define NBD_ENOSPC 28u
#define NBD_EOVERFLOW 75u
#define NBD_ENOTSUP 95u
#define NBD_ESHUTDOWN 108u

/* ---- Limits ---- */
#define NBD_MAX_STRING 4096u /* names, descriptions, messages */
#define NBD_DEFAULT_PORT "10809"
#define NBD_DEFAULT_MAX_REQUEST (32u * 1024 * 1024)
#define NBD_MAX_OPTION_REPLY (64u * 1024) /* any option reply we accept */
#define NBD_MAX_LIST_EXPORTS 100000u
#define NBD_MAX_LIST_BYTES (16u * 1024 * 1024)
#define NBD_MAX_BS_CHUNK (1u * 1024 * 1024) /* block status chunk payload */

/* ---- Wire structs ---- */
struct nbd_option_hdr { /* client option request header */
	uint64_t magic; /* NBD_IHAVEOPT */
	uint32_t option;
	uint32_t len;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_option_hdr) == 16, "option header");

struct nbd_option_reply { /* server option reply header */
	uint64_t magic;	  /* NBD_REP_MAGIC */
	uint32_t option;
	uint32_t type;
	uint32_t len;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_option_reply) == 20, "option reply header");

struct nbd_request {
	uint32_t magic; /* NBD_REQUEST_MAGIC */
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint64_t offset;
	uint32_t len;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_request) == 28, "request header");

struct nbd_simple_reply {
	uint32_t magic; /* NBD_SIMPLE_REPLY_MAGIC */
	uint32_t error;
	uint64_t cookie;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_simple_reply) == 16, "simple reply");

struct nbd_structured_reply {
	uint32_t magic; /* NBD_STRUCTURED_REPLY_MAGIC */
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint32_t len;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_structured_reply) == 20, "structured reply");

/* Both reply forms start with the magic; the reader reads the 16 common
 * bytes first, then the 4 more a structured header needs. */
union nbd_reply {
	struct nbd_simple_reply simple;
	struct nbd_structured_reply structured;
	uint8_t raw[20];
};

struct nbd_oldstyle_tail { /* after NBDMAGIC + oldstyle magic */
	uint64_t size;
	uint32_t flags; /* u16 gflags (0) + u16 eflags */
	uint8_t zeroes[124];
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_oldstyle_tail) == 136, "oldstyle tail");

struct nbd_export_name_reply { /* reply to NBD_OPT_EXPORT_NAME */
	uint64_t size;
	uint16_t eflags;
	uint8_t zeroes[124]; /* absent with NO_ZEROES */
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_export_name_reply) == 134, "export name reply");

struct nbd_info_export {
	uint16_t info; /* NBD_INFO_EXPORT */
	uint64_t size;
	uint16_t eflags;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_info_export) == 12, "info export");

struct nbd_info_block_size {
	uint16_t info; /* NBD_INFO_BLOCK_SIZE */
	uint32_t minimum;
	uint32_t preferred;
	uint32_t maximum;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_info_block_size) == 14, "info block size");

struct nbd_chunk_offset_hole {
	uint64_t offset;
	uint32_t length;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_chunk_offset_hole) == 12, "hole chunk");

struct nbd_chunk_error {
	uint32_t error;
	uint16_t msglen;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_chunk_error) == 6, "error chunk");

struct nbd_block_descriptor {
	uint32_t length;
	uint32_t flags;
} __attribute__((packed));
_Static_assert(sizeof(struct nbd_block_descriptor) == 8, "block descriptor");

/* ---- Byte order helpers on unaligned buffers ---- */
static inline uint16_t get_be16(const void *p)
{
	uint16_t v;
	memcpy(&v, p, sizeof(v));
	return be16toh(v);
}

static inline uint32_t get_be32(const void *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return be32toh(v);
}

static inline uint64_t get_be64(const void *p)
{
	uint64_t v;
	memcpy(&v, p, sizeof(v));
	return be64toh(v);
}

static inline void put_be16(void *p, uint16_t v)
{
	v = htobe16(v);
	memcpy(p, &v, sizeof(v));
}

static inline void put_be32(void *p, uint32_t v)
{
	v = htobe32(v);
	memcpy(p, &v, sizeof(v));
}

static inline void put_be64(void *p, uint64_t v)
{
	v = htobe64(v);
	memcpy(p, &v, sizeof(v));
}

/* ---- Codec (inline so the unit test and the fake server can share it) ---- */
static inline void nbd_encode_request(struct nbd_request *r, uint16_t flags, uint16_t type,
				      uint64_t cookie, uint64_t offset, uint32_t len)
{
	r->magic = htobe32(NBD_REQUEST_MAGIC);
	r->flags = htobe16(flags);
	r->type = htobe16(type);
	r->cookie = htobe64(cookie);
	r->offset = htobe64(offset);
	r->len = htobe32(len);
}

static inline void nbd_encode_option(struct nbd_option_hdr *h, uint32_t option, uint32_t len)
{
	h->magic = htobe64(NBD_IHAVEOPT);
	h->option = htobe32(option);
	h->len = htobe32(len);
}

/* Overflow-safe "[off, off+len) lies inside [base, base+size)". */
static inline int nbd_range_inside(uint64_t off, uint64_t len, uint64_t base, uint64_t size)
{
	return off >= base && off - base <= size && len <= size - (off - base);
}
