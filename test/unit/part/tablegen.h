/* tablegen.h: builds MBR, EBR and GPT tables in a memory image, for tests
 * (correct by default; tests then damage them on purpose). */
#pragma once

#include <glib.h>
#include <stdint.h>

#define TG_LINUX_FS "0fc63daf-8483-4772-8e79-3d69d8477de4"
#define TG_ESP "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"

/* Sets MBR/EBR slot @slot (1-4) of the 512-byte table at @sector and the
 * 0x55AA signature. */
void tg_mbr_entry(uint8_t *sector, int slot, uint8_t boot, uint8_t type, uint32_t start,
		  uint32_t count);

/* GUID text to its mixed-endian on-disk bytes. */
void tg_guid(const char *text, uint8_t out[16]);

struct tg_gpt_part {
	guint index; /* 0-based entry slot */
	uint64_t first, last;
	const char *type; /* GUID text; NULL = TG_LINUX_FS */
	const char *name; /* UTF-8 (encoded to UTF-16LE), NULL = "" */
};

struct tg_gpt {
	uint32_t sector_size;
	uint64_t sectors;     /* disk size in sectors */
	uint32_t num_entries; /* 0 = 128 */
	uint32_t entry_size;  /* 0 = 128 */
};

/* Writes a protective MBR, the primary header (LBA 1) and entries (LBA 2),
 * the backup entries and header (last LBA) with correct CRCs.  Usable LBAs:
 * after the primary array .. before the backup array.  Returns the number of
 * sectors of one entry array. */
uint64_t tg_gpt_write(uint8_t *disk, const struct tg_gpt *g, const struct tg_gpt_part *parts,
		      guint nparts);

/* First and last usable LBA that tg_gpt_write() uses for @g. */
uint64_t tg_gpt_first_usable(const struct tg_gpt *g);
uint64_t tg_gpt_last_usable(const struct tg_gpt *g);

/* Recomputes the header CRC of the header at @lba (after a test edits it). */
void tg_gpt_fix_header_crc(uint8_t *disk, uint32_t sector_size, uint64_t lba);
/* Recomputes the entry array CRC of the header at @lba, then its header CRC. */
void tg_gpt_fix_crcs(uint8_t *disk, uint32_t sector_size, uint64_t lba);
