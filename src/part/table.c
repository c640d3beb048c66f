/* table.c: part_table_read(): finds the MBR or GPT of a Blockdev and hands it
 * to mbr.c or gpt.c; the table's life (kind names, free). */
#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "nbdfs/partition.h"
#include "ondisk.h"
#include "part-private.h"

/* clang-format off */
G_DEFINE_QUARK(nbdfs-part-error-quark, part_error)
/* clang-format on */

const char *part_table_kind_name(enum part_table_kind kind)
{
	switch (kind) {
	case PART_TABLE_MBR:
		return "mbr";
	case PART_TABLE_GPT:
		return "gpt";
	case PART_TABLE_NONE:
		break;
	}
	return "none";
}

static void entry_free(gpointer p)
{
	struct part_entry *e = p;

	g_free(e->label);
	g_free(e);
}

void part_table_free(struct part_table *table)
{
	if (!table)
		return;
	g_ptr_array_unref(table->entries);
	g_ptr_array_unref(table->warnings);
	g_free(table);
}

/* Is there a GPT header signature at LBA 1?  (Only to explain a refusal.) */
static gboolean gpt_signature_at_lba1(struct part_reader *r)
{
	g_autofree uint8_t *buf = NULL;

	if (r->sectors < 2)
		return FALSE;
	buf = g_malloc(r->sector_size);
	if (!part_read_sectors(r, 1, 1, buf, NULL))
		return FALSE;
	return memcmp(buf, GPT_SIGNATURE, 8) == 0;
}

/* A FAT boot sector (jump, sane BPB) also ends in 0x55AA; with all four
 * slots empty it is a filesystem on the whole device, not an empty table. */
static gboolean fat_boot_sector(const uint8_t *s, const struct mbr_sector *mbr)
{
	uint16_t bytes_per_sector = get_le16(s + 11);

	for (int i = 0; i < 4; i++)
		if (mbr->part[i].type != 0 || get_le32(mbr->part[i].sectors_le) != 0)
			return FALSE;
	return (s[0] == 0xeb || s[0] == 0xe9) && bytes_per_sector >= 512 &&
	       bytes_per_sector <= 4096 && !(bytes_per_sector & (bytes_per_sector - 1)) &&
	       s[13] != 0 && get_le16(s + 14) != 0 && s[16] != 0 &&
	       (s[21] == 0xf0 || s[21] >= 0xf8);
}

struct part_table *part_table_read(Blockdev *dev, GError **error)
{
	struct blockdev_info info;
	struct part_reader r = { .dev = dev };
	g_autoptr(PartTable) table = NULL;
	g_autofree uint8_t *sector0 = NULL;
	struct mbr_sector mbr;
	gboolean protective = FALSE;
	gboolean ok;

	blockdev_get_info(dev, &info);
	if (info.sector_size < 512 || info.sector_size > 65536 ||
	    (info.sector_size & (info.sector_size - 1))) {
		g_set_error(error, PART_ERROR, PART_ERROR_IO,
			    "partition table: unsupported sector size %" PRIu32, info.sector_size);
		return NULL;
	}
	r.sector_size = info.sector_size;
	r.sectors = info.sectors;

	table = g_new0(struct part_table, 1);
	table->kind = PART_TABLE_NONE;
	table->sector_size = info.sector_size;
	table->entries = g_ptr_array_new_with_free_func(entry_free);
	table->warnings = g_ptr_array_new_with_free_func(g_free);
	r.table = table;

	if (r.sectors == 0) {
		g_set_error(error, PART_ERROR, PART_ERROR_NO_TABLE,
			    "partition table: device too small (%" PRIu64
			    " bytes, not one whole %" PRIu32 "-byte sector)",
			    info.size, info.sector_size);
		return NULL;
	}

	sector0 = g_malloc(r.sector_size);
	if (!part_read_sectors(&r, 0, 1, sector0, error))
		return NULL;
	memcpy(&mbr, sector0, sizeof(mbr));
	if (mbr.signature[0] != MBR_SIG0 || mbr.signature[1] != MBR_SIG1) {
		gboolean gpt = gpt_signature_at_lba1(&r);

		g_set_error(error, PART_ERROR, PART_ERROR_NO_TABLE,
			    "partition table: no MBR signature (0x55AA) in sector 0%s",
			    gpt ? " (a GPT header is at LBA 1, but without a protective MBR)" : "");
		return NULL;
	}
	/* As the kernel does: boot flags other than 0x00/0x80 mean sector 0 is
	 * something else with 0x55AA (a FAT or NTFS boot sector, say). */
	for (int i = 0; i < 4; i++) {
		uint8_t boot = mbr.part[i].boot;

		if (boot != 0x00 && boot != 0x80) {
			g_set_error(error, PART_ERROR, PART_ERROR_NO_TABLE,
				    "partition table: sector 0 has 0x55AA but MBR slot %d has boot "
				    "flag 0x%02x (not 0x00 or 0x80): not a partition table",
				    i + 1, boot);
			return NULL;
		}
		if (mbr.part[i].type == MBR_TYPE_GPT_PROTECTIVE)
			protective = TRUE;
	}

	if (fat_boot_sector(sector0, &mbr)) {
		g_set_error(error, PART_ERROR, PART_ERROR_NO_TABLE,
			    "partition table: sector 0 is a FAT boot sector and no MBR slot is "
			    "used: a filesystem, not a partition table");
		return NULL;
	}

	if (protective) {
		table->kind = PART_TABLE_GPT;
		ok = part_gpt_read(&r, sector0, error);
	} else {
		table->kind = PART_TABLE_MBR;
		ok = part_mbr_read(&r, sector0, error);
	}
	if (!ok)
		return NULL;
	if (r.suppressed)
		g_ptr_array_add(table->warnings,
				g_strdup_printf("%u more warnings not shown", r.suppressed));
	return g_steal_pointer(&table);
}
