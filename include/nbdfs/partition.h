/* partition.h: partitions of a Blockdev (the C form of mirage-block-partition)
 * and the MBR/GPT table reader.
 *
 * A partition is a window [start, start+sectors) of its parent, itself a
 * Blockdev: it holds a reference on its parent, adds its offset to every
 * request and bounds-checks it (-EINVAL, never a wrong sector).  Windows
 * nest.  Partition code only knows the Blockdev interface, so it works on an
 * export, inside a partition, or on an in-memory device.
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
	PART_ERROR_RANGE,      /* a split or window beyond the end of its parent */
	PART_ERROR_NO_TABLE,   /* no valid MBR or GPT in the device */
	PART_ERROR_IO,         /* reading the table failed */
} PartError;

/* A window of @sectors sectors from @start of @parent.  The window's size in
 * bytes is clipped to the parent's size (so a window over a partial last
 * sector is partial too).  Returns a new device (caller unrefs) or NULL with
 * PART_ERROR_RANGE (checked arithmetic: start + sectors must not overflow or
 * pass the parent's end). */
Blockdev *part_window_new(Blockdev *parent, uint64_t start, uint64_t sectors, GError **error);

/* Splits @dev after @first_sectors sectors (the seed's connect/subpartition):
 * *first = [0, first_sectors), *rest = [first_sectors, end), either possibly
 * empty.  @first_sectors past the end fails with PART_ERROR_RANGE.  On success
 * the caller owns both (unref). */
gboolean part_split(Blockdev *dev, uint64_t first_sectors, Blockdev **first, Blockdev **rest,
		    GError **error);

/* ---- Partition tables ---------------------------------------------------- */

enum part_table_kind { PART_TABLE_NONE, PART_TABLE_MBR, PART_TABLE_GPT };

struct part_entry {
	guint number;          /* kernel numbering: MBR 1-4 primaries, 5.. logicals;
	                        * GPT entry index + 1 */
	uint64_t start;        /* first sector, relative to the scanned device */
	uint64_t sectors;      /* length in sectors (> 0) */
	uint8_t mbr_type;      /* MBR partition type byte; 0 for GPT */
	char type_guid[37];    /* GPT type GUID, lower-case text; "" for MBR */
	char uuid[37];         /* GPT unique partition GUID; "" for MBR */
	char *label;           /* GPT name as UTF-8 (may be ""); NULL for MBR */
};

struct part_table {
	enum part_table_kind kind;
	uint32_t sector_size;  /* the sector size the table was read with */
	char disk_guid[37];    /* GPT disk GUID; "" for MBR */
	gboolean used_backup;  /* GPT: the primary header was damaged, the backup was used */
	GPtrArray *entries;    /* struct part_entry *, in number order; owns them */
	GPtrArray *warnings;   /* char *: one readable reason per refused entry or
	                        * ignored damage ("GPT entry 3: ends after last usable LBA"); owns them */
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
