/* part-private.h: inside the table reader: table.c hands a read to mbr.c or
 * gpt.c, which use the helpers of reader.c (calls run one way). */
#pragma once

#include <glib.h>
#include <stdint.h>

#include "nbdfs/partition.h"

/* Bounds on hostile tables, checked before anything is read or allocated. */
#define PART_EBR_MAX_LINKS 128u		    /* EBRs followed in one extended partition */
#define PART_GPT_MAX_ARRAY_BYTES (1u << 20) /* a GPT entry array larger is refused */
#define PART_GPT_MAX_ENTRY_SIZE 4096u	    /* a larger GPT entry size is refused */
#define PART_MAX_WARNINGS 100u		    /* later warnings are counted, not kept */

/* One table read in progress. */
struct part_reader {
	Blockdev *dev; /* borrowed */
	uint32_t sector_size;
	uint64_t sectors;	  /* whole sectors of dev: nothing may pass this */
	struct part_table *table; /* being filled */
	guint suppressed;	  /* warnings past PART_MAX_WARNINGS */
};

/* ---- The helpers of a read (reader.c) ------------------------------------ */

/* Reads @count sectors from @lba into @buf (count * sector_size bytes).
 * Ranges outside the device are a programming error (callers check first);
 * an I/O error sets PART_ERROR_IO. */
gboolean part_read_sectors(struct part_reader *r, uint64_t lba, uint64_t count, void *buf,
			   GError **error);

/* Adds a warning (a refused entry or ignored damage) to the table. */
void part_warn(struct part_reader *r, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

/* Appends a new zeroed entry (in number order) and returns it. */
struct part_entry *part_entry_add(struct part_reader *r, guint number, uint64_t start,
				  uint64_t sectors);

/* Warns about overlapping entries (all are kept, as the kernel does).
 * @what names an entry in the message: "MBR partition" or "GPT entry". */
void part_check_overlaps(struct part_reader *r, const char *what);

/* ---- The two formats (mbr.c, gpt.c), called by table.c ------------------ */

/* Parse the table whose sector 0 (sector_size bytes, 0x55AA already
 * checked) is @sector0.  FALSE with PART_ERROR_NO_TABLE or PART_ERROR_IO. */
gboolean part_mbr_read(struct part_reader *r, const uint8_t *sector0, GError **error);
gboolean part_gpt_read(struct part_reader *r, const uint8_t *sector0, GError **error);
