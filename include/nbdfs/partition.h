/* partition.h: the MBR/GPT partition table reader.
 *
 * It reads a Blockdev through the Blockdev interface only, so it works on an
 * export, inside a partition, or on an in-memory device.  It only says where
 * the partitions are; a partition itself is a window of the device
 * (blockdev_window_new() in blockdev.h).
 *
 * Setup errors are GError in the PART_ERROR domain, "context: what: why".
 */
#pragma once

#include <glib.h>
#include <stdint.h>

#include "nbdfs/blockdev.h"

G_BEGIN_DECLS

#define PART_ERROR (part_error_quark())
GQuark part_error_quark(void);

typedef enum {
	PART_ERROR_NO_TABLE, /* no valid MBR or GPT in the device */
	PART_ERROR_IO,	     /* reading the table failed */
} PartError;

enum part_table_kind { PART_TABLE_NONE, PART_TABLE_MBR, PART_TABLE_GPT };

struct part_entry {
	guint number;	    /* kernel numbering: MBR 1-4 primaries, 5.. logicals;
			     * GPT entry index + 1 */
	uint64_t start;	    /* first sector, relative to the scanned device */
	uint64_t sectors;   /* length in sectors (> 0) */
	uint8_t mbr_type;   /* MBR partition type byte; 0 for GPT */
	char type_guid[37]; /* GPT type GUID, lower-case text; "" for MBR */
	char uuid[37];	    /* GPT unique partition GUID; "" for MBR */
	char *label;	    /* GPT name as UTF-8 (may be ""); NULL for MBR */
};

struct part_table {
	enum part_table_kind kind;
	uint32_t sector_size; /* the sector size the table was read with */
	char disk_guid[37];   /* GPT disk GUID; "" for MBR */
	gboolean used_backup; /* GPT: the primary header was damaged, the backup was used */
	GPtrArray *entries;   /* struct part_entry *, in number order; owns them */
	GPtrArray *warnings;  /* char *: one readable reason per refused entry or
			       * ignored damage ("GPT entry 3: ends after last usable LBA"); owns
			       * them */
};

/* Reads the MBR or GPT table of @dev with @dev's sector size (blocking I/O).
 * A protective MBR (type 0xEE) means GPT.  Entries that do not fit inside
 * @dev (or, for GPT, inside the usable LBA range) are refused alone, with a
 * warning; the others still appear.  MBR extended partitions (0x05, 0x0f,
 * 0x85) get no entry; their EBR chain is followed safely (bounded, no loops,
 * each EBR checked).  Returns the table (caller frees) or NULL with
 * PART_ERROR_NO_TABLE (the message says why) or PART_ERROR_IO. */
struct part_table *part_table_read(Blockdev *dev, GError **error);
void part_table_free(struct part_table *table);
typedef struct part_table PartTable;
G_DEFINE_AUTOPTR_CLEANUP_FUNC(PartTable, part_table_free)

/* "mbr", "gpt" or "none". */
const char *part_table_kind_name(enum part_table_kind kind);

G_END_DECLS
