/* ondisk.h: on-disk MBR/EBR and GPT structures, byte-order helpers and the
 * GPT CRC-32 (private to src/part).
 *
 * Everything on disk is little-endian.  The structs are packed and only ever
 * filled with memcpy() from a sector buffer, so no field is accessed
 * unaligned through a pointer; multi-byte fields are kept as byte arrays and
 * read with the get_le*() helpers, so the host byte order never matters.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* ---- Little-endian loads ------------------------------------------------ */

static inline uint16_t get_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
	       ((uint32_t)p[3] << 24);
}

static inline uint64_t get_le64(const uint8_t *p)
{
	return (uint64_t)get_le32(p) | ((uint64_t)get_le32(p + 4) << 32);
}

static inline void put_le32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static inline void put_le64(uint8_t *p, uint64_t v)
{
	put_le32(p, (uint32_t)v);
	put_le32(p + 4, (uint32_t)(v >> 32));
}

/* ---- MBR and EBR -------------------------------------------------------- */

/* One of the four partition slots of an MBR or EBR. */
struct mbr_entry {
	uint8_t boot;	      /* 0x00, or 0x80 = active; anything else: not an MBR */
	uint8_t chs_first[3]; /* ignored: LBA only */
	uint8_t type;	      /* 0 = empty; 0x05/0x0f/0x85 extended; 0xee GPT protective */
	uint8_t chs_last[3];
	uint8_t start_le[4];   /* first sector: absolute in the MBR; in an EBR relative
				* to the EBR (logical) or to the extended start (link) */
	uint8_t sectors_le[4]; /* length in sectors; 0 = empty */
} __attribute__((packed));
_Static_assert(sizeof(struct mbr_entry) == 16, "MBR partition entry is 16 bytes");

/* The first 512 bytes of sector 0 (MBR) or of an EBR: same layout.  With
 * 4096-byte sectors the rest of the sector is not part of the table. */
struct mbr_sector {
	uint8_t boot_code[440];
	uint8_t disk_signature_le[4];
	uint8_t reserved[2];
	struct mbr_entry part[4]; /* at byte 446 */
	uint8_t signature[2];	  /* 0x55 0xaa at byte 510 */
} __attribute__((packed));
_Static_assert(sizeof(struct mbr_sector) == 512, "MBR sector is 512 bytes");
_Static_assert(offsetof(struct mbr_sector, part) == 446, "MBR table at byte 446");

#define MBR_SIG0 0x55
#define MBR_SIG1 0xaa
#define MBR_TYPE_GPT_PROTECTIVE 0xee

static inline int mbr_type_is_extended(uint8_t type)
{
	return type == 0x05 || type == 0x0f || type == 0x85;
}

/* ---- GPT ---------------------------------------------------------------- */

#define GPT_SIGNATURE "EFI PART"
#define GPT_HEADER_MIN_SIZE 92u
#define GPT_ENTRY_MIN_SIZE 128u

/* The GPT header (UEFI 2.x, 5.3.2); header_size may be larger (the rest of
 * the sector up to header_size is covered by the CRC). */
struct gpt_header {
	char signature[8];	    /* "EFI PART" */
	uint8_t revision_le[4];	    /* 0x00010000 = 1.0 */
	uint8_t header_size_le[4];  /* 92 .. sector size */
	uint8_t header_crc32_le[4]; /* CRC of header_size bytes, this field zeroed */
	uint8_t reserved[4];
	uint8_t my_lba_le[8];	     /* where this header lives */
	uint8_t alternate_lba_le[8]; /* where the other header lives */
	uint8_t first_usable_lba_le[8];
	uint8_t last_usable_lba_le[8];
	uint8_t disk_guid[16];
	uint8_t partition_entries_lba_le[8];
	uint8_t num_partition_entries_le[4];
	uint8_t sizeof_partition_entry_le[4];
	uint8_t partition_entry_array_crc32_le[4];
} __attribute__((packed));
_Static_assert(sizeof(struct gpt_header) == 92, "GPT header is 92 bytes");
_Static_assert(offsetof(struct gpt_header, header_crc32_le) == 16, "GPT header CRC at byte 16");

/* A GPT partition entry (the first 128 bytes of each sizeof_partition_entry). */
struct gpt_entry {
	uint8_t type_guid[16]; /* all zero = unused entry */
	uint8_t unique_guid[16];
	uint8_t first_lba_le[8];
	uint8_t last_lba_le[8]; /* inclusive */
	uint8_t attributes_le[8];
	uint8_t name_le[72]; /* 36 UTF-16LE code units, NUL-padded */
} __attribute__((packed));
_Static_assert(sizeof(struct gpt_entry) == 128, "GPT partition entry is 128 bytes");

/* GUIDs are stored mixed-endian: the first three fields little-endian, the
 * last 8 bytes as they are.  @out gets 36 characters + NUL, lower case. */
void part_guid_to_string(const uint8_t guid[16], char out[37]);

/* The CRC-32 of GPT (and zlib, ethernet): reflected polynomial 0xedb88320,
 * initial value and final XOR 0xffffffff.  Start with @crc = 0; pass the
 * previous result to continue over more data. */
uint32_t part_crc32(uint32_t crc, const void *buf, size_t len);
