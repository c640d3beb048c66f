/* gpt.c: the GUID partition table: protective MBR, primary header at LBA 1,
 * backup header when the primary is damaged, entries.
 *
 * A header is valid when its signature, revision (1.x), size, CRC, own LBA,
 * usable range, entry size and count and its entry array (placement and
 * CRC) all check out; every size is bounded before anything is allocated.
 * The primary is used when valid, else the backup (at the primary's
 * alternate_lba when the primary header itself is intact, else at the last
 * LBA), with used_backup and a warning.  A valid primary with a damaged
 * backup is only a warning.  Entries that do not fit the usable range are
 * refused alone; overlapping entries are all kept with a warning (the kernel
 * shows them all too).
 */
#include <inttypes.h>
#include <string.h>

#include "ondisk.h"
#include "part-private.h"

void part_guid_to_string(const uint8_t g[16], char out[37])
{
	g_snprintf(out, 37, "%08" PRIx32 "-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		   get_le32(g), get_le16(g + 4), get_le16(g + 6), g[8], g[9], g[10], g[11], g[12],
		   g[13], g[14], g[15]);
}

/* UTF-16LE (at most 36 code units, up to the first NUL) to UTF-8; unpaired
 * surrogates become U+FFFD. */
static char *gpt_name_to_utf8(const uint8_t name_le[72])
{
	GString *s = g_string_sized_new(40);

	for (guint i = 0; i < 36; i++) {
		gunichar c = get_le16(name_le + 2 * i);

		if (c == 0)
			break;
		if (c >= 0xd800 && c <= 0xdbff) {
			gunichar lo = i + 1 < 36 ? get_le16(name_le + 2 * (i + 1)) : 0;

			if (lo >= 0xdc00 && lo <= 0xdfff) {
				c = 0x10000 + ((c - 0xd800) << 10) + (lo - 0xdc00);
				i++;
			} else {
				c = 0xfffd;
			}
		} else if (c >= 0xdc00 && c <= 0xdfff) {
			c = 0xfffd;
		}
		g_string_append_unichar(s, c);
	}
	return g_string_free(s, FALSE);
}

/* A header that passed every check, with its entry array. */
struct gpt_loaded {
	uint64_t lba;
	uint64_t alternate_lba;
	uint64_t first_usable, last_usable;
	uint8_t disk_guid[16];
	uint32_t num_entries, entry_size;
	uint8_t *entries;	/* num_entries * entry_size bytes (sector-rounded) */
	gboolean header_intact; /* signature and CRC fine: alternate_lba is usable */
};

static void gpt_loaded_clear(struct gpt_loaded *g)
{
	g_clear_pointer(&g->entries, g_free);
}

enum { GPT_VALID, GPT_INVALID, GPT_IO_ERROR };

/* Loads and checks the header at @lba and its entries.  GPT_INVALID sets
 * *why to the reason ("header CRC mismatch"); GPT_IO_ERROR sets @error. */
static int gpt_load(struct part_reader *r, uint64_t lba, struct gpt_loaded *g, char **why,
		    GError **error)
{
	const uint32_t ss = r->sector_size;
	g_autofree uint8_t *buf = NULL;
	struct gpt_header h;
	uint32_t revision, header_size, stored_crc, crc;
	uint64_t array_bytes, array_sectors, pe_lba;

	memset(g, 0, sizeof(*g));
	g->lba = lba;
	if (lba >= r->sectors) {
		*why = g_strdup_printf("header LBA %" PRIu64 " is beyond the device (%" PRIu64
				       " sectors)",
				       lba, r->sectors);
		return GPT_INVALID;
	}
	buf = g_malloc(ss);
	if (!part_read_sectors(r, lba, 1, buf, error))
		return GPT_IO_ERROR;
	memcpy(&h, buf, sizeof(h));
	if (memcmp(h.signature, GPT_SIGNATURE, 8) != 0) {
		*why = g_strdup("header has no \"EFI PART\" signature");
		return GPT_INVALID;
	}
	header_size = get_le32(h.header_size_le);
	if (header_size < GPT_HEADER_MIN_SIZE || header_size > ss) {
		*why = g_strdup_printf("header size %" PRIu32 " is not in %u..%" PRIu32,
				       header_size, GPT_HEADER_MIN_SIZE, ss);
		return GPT_INVALID;
	}
	stored_crc = get_le32(h.header_crc32_le);
	memset(buf + 16, 0, 4);
	crc = part_crc32(0, buf, header_size);
	if (crc != stored_crc) {
		*why = g_strdup("header CRC mismatch");
		return GPT_INVALID;
	}
	g->header_intact = TRUE;
	g->alternate_lba = get_le64(h.alternate_lba_le);

	revision = get_le32(h.revision_le);
	if (revision >> 16 != 1) {
		*why = g_strdup_printf("header revision 0x%08" PRIx32 " is not 1.x", revision);
		return GPT_INVALID;
	}
	if (get_le64(h.my_lba_le) != lba) {
		*why = g_strdup_printf("header says it is at LBA %" PRIu64 ", not %" PRIu64,
				       get_le64(h.my_lba_le), lba);
		return GPT_INVALID;
	}
	g->first_usable = get_le64(h.first_usable_lba_le);
	g->last_usable = get_le64(h.last_usable_lba_le);
	if (g->first_usable > g->last_usable || g->last_usable >= r->sectors ||
	    g->first_usable == 0) {
		*why = g_strdup_printf("usable LBAs %" PRIu64 "..%" PRIu64
				       " are not a range inside the device (%" PRIu64 " sectors)",
				       g->first_usable, g->last_usable, r->sectors);
		return GPT_INVALID;
	}
	if (lba >= g->first_usable && lba <= g->last_usable) {
		*why = g_strdup_printf("header LBA %" PRIu64 " is inside the usable LBAs %" PRIu64
				       "..%" PRIu64,
				       lba, g->first_usable, g->last_usable);
		return GPT_INVALID;
	}

	g->entry_size = get_le32(h.sizeof_partition_entry_le);
	g->num_entries = get_le32(h.num_partition_entries_le);
	if (g->entry_size < GPT_ENTRY_MIN_SIZE || g->entry_size % 8 != 0 ||
	    g->entry_size > PART_GPT_MAX_ENTRY_SIZE) {
		*why = g_strdup_printf("entry size %" PRIu32 " is not a multiple of 8 in %u..%u",
				       g->entry_size, GPT_ENTRY_MIN_SIZE, PART_GPT_MAX_ENTRY_SIZE);
		return GPT_INVALID;
	}
	array_bytes = (uint64_t)g->num_entries * g->entry_size; /* < 2^44 */
	if (array_bytes > PART_GPT_MAX_ARRAY_BYTES) {
		*why = g_strdup_printf("%" PRIu32 " entries of %" PRIu32 " bytes are more than %u "
				       "bytes",
				       g->num_entries, g->entry_size, PART_GPT_MAX_ARRAY_BYTES);
		return GPT_INVALID;
	}
	array_sectors = (array_bytes + ss - 1) / ss;
	pe_lba = get_le64(h.partition_entries_lba_le);
	if (array_sectors > 0) {
		/* Inside the device, after the MBR, apart from this header and
		 * from the usable range (UEFI puts it between them). */
		if (pe_lba == 0 || pe_lba >= r->sectors || array_sectors > r->sectors - pe_lba ||
		    (lba >= pe_lba && lba < pe_lba + array_sectors) ||
		    (pe_lba <= g->last_usable && pe_lba + array_sectors > g->first_usable)) {
			*why = g_strdup_printf("entry array at LBA %" PRIu64 " (%" PRIu64
					       " sectors) is outside the device or overlaps "
					       "the header or the usable LBAs",
					       pe_lba, array_sectors);
			return GPT_INVALID;
		}
	}
	g->entries = g_malloc0(MAX(array_sectors, 1) * ss);
	if (array_sectors && !part_read_sectors(r, pe_lba, array_sectors, g->entries, error)) {
		gpt_loaded_clear(g);
		return GPT_IO_ERROR;
	}
	stored_crc = get_le32(h.partition_entry_array_crc32_le);
	crc = part_crc32(0, g->entries, array_bytes);
	if (crc != stored_crc) {
		*why = g_strdup("partition entries CRC mismatch");
		gpt_loaded_clear(g);
		return GPT_INVALID;
	}
	memcpy(g->disk_guid, h.disk_guid, 16);
	return GPT_VALID;
}

static void gpt_add_entries(struct part_reader *r, const struct gpt_loaded *g)
{
	static const uint8_t zero_guid[16];

	for (uint32_t i = 0; i < g->num_entries; i++) {
		struct gpt_entry ge;
		struct part_entry *e;
		uint64_t first, last;
		guint number = i + 1;

		memcpy(&ge, g->entries + (size_t)i * g->entry_size, sizeof(ge));
		if (memcmp(ge.type_guid, zero_guid, 16) == 0)
			continue; /* unused entry */
		first = get_le64(ge.first_lba_le);
		last = get_le64(ge.last_lba_le);
		if (first > last) {
			part_warn(r,
				  "GPT entry %u: first LBA %" PRIu64 " is after last LBA %" PRIu64
				  ", refused",
				  number, first, last);
			continue;
		}
		if (first < g->first_usable) {
			part_warn(r,
				  "GPT entry %u: starts at LBA %" PRIu64
				  " before the first usable LBA %" PRIu64 ", refused",
				  number, first, g->first_usable);
			continue;
		}
		if (last > g->last_usable) {
			part_warn(r,
				  "GPT entry %u: ends at LBA %" PRIu64
				  " after the last usable LBA %" PRIu64 ", refused",
				  number, last, g->last_usable);
			continue;
		}
		/* last_usable < device sectors was checked with the header. */
		e = part_entry_add(r, number, first, last - first + 1);
		part_guid_to_string(ge.type_guid, e->type_guid);
		part_guid_to_string(ge.unique_guid, e->uuid);
		e->label = gpt_name_to_utf8(ge.name_le);
	}
}

gboolean part_gpt_read(struct part_reader *r, const uint8_t *sector0, GError **error)
{
	struct mbr_sector mbr;
	struct gpt_loaded primary = { 0 }, backup = { 0 };
	g_autofree char *why_primary = NULL;
	g_autofree char *why_backup = NULL;
	const struct gpt_loaded *use;
	const uint64_t last_lba = r->sectors - 1;
	uint64_t backup_lba;
	int rc;

	memcpy(&mbr, sector0, sizeof(mbr));
	for (int i = 0; i < 4; i++)
		if (mbr.part[i].type == MBR_TYPE_GPT_PROTECTIVE &&
		    get_le32(mbr.part[i].start_le) != 1)
			part_warn(r,
				  "protective MBR: the 0xEE partition starts at sector %" PRIu32
				  ", not 1",
				  get_le32(mbr.part[i].start_le));
	if (r->sectors < 3) {
		g_set_error(error, PART_ERROR, PART_ERROR_NO_TABLE,
			    "partition table: protective MBR but the device is too small for a "
			    "GPT (%" PRIu64 " sectors)",
			    r->sectors);
		return FALSE;
	}

	rc = gpt_load(r, 1, &primary, &why_primary, error);
	if (rc == GPT_IO_ERROR)
		return FALSE;
	/* The backup: where an intact primary header says, else (or when
	 * nothing valid is there, e.g. a grown disk) at the last LBA. */
	backup_lba = primary.header_intact ? primary.alternate_lba : last_lba;
	if (backup_lba <= 1 || backup_lba > last_lba)
		backup_lba = last_lba;
	rc = gpt_load(r, backup_lba, &backup, &why_backup, error);
	if (rc == GPT_INVALID && backup_lba != last_lba) {
		g_autofree char *why_last = NULL;

		rc = gpt_load(r, last_lba, &backup, &why_last, error);
		if (rc == GPT_VALID) {
			backup_lba = last_lba;
			g_clear_pointer(&why_backup, g_free);
		}
	}
	if (rc == GPT_IO_ERROR) {
		gpt_loaded_clear(&primary);
		return FALSE;
	}

	if (!why_primary) {
		use = &primary;
		if (why_backup)
			part_warn(r,
				  "GPT: backup header at LBA %" PRIu64 " is damaged (%s); "
				  "the primary is used",
				  backup_lba, why_backup);
	} else if (!why_backup) {
		use = &backup;
		r->table->used_backup = TRUE;
		part_warn(r, "GPT: primary %s, using backup at LBA %" PRIu64, why_primary,
			  backup_lba);
	} else {
		g_set_error(error, PART_ERROR, PART_ERROR_NO_TABLE,
			    "partition table: protective MBR but no valid GPT: primary at LBA 1: "
			    "%s; backup at LBA %" PRIu64 ": %s",
			    why_primary, backup_lba, why_backup);
		gpt_loaded_clear(&primary);
		gpt_loaded_clear(&backup);
		return FALSE;
	}

	part_guid_to_string(use->disk_guid, r->table->disk_guid);
	gpt_add_entries(r, use);
	part_check_overlaps(r, "GPT entry");
	gpt_loaded_clear(&primary);
	gpt_loaded_clear(&backup);
	return TRUE;
}
