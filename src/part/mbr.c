/* mbr.c: MBR primary partitions and the EBR chains of extended partitions.
 *
 * Numbering is the kernel's: primaries keep their slot (1-4, empty slots
 * leave gaps), logical partitions count from 5 in chain order.  A refused
 * logical keeps its number, so the ones after it keep the kernel's numbers.
 *
 * The EBR chain is hostile input: every EBR must carry 0x55AA and lie inside
 * the extended partition, and each link must point strictly forward (which
 * also makes loops impossible); the chain is cut at PART_EBR_MAX_LINKS.  A
 * broken link stops the chain with a warning and the logicals seen so far
 * stay.  Links are relative to the extended partition's start, a logical's
 * start to its own EBR.
 */
#include <inttypes.h>
#include <string.h>

#include "ondisk.h"
#include "part-private.h"

/* Checks [start, start+count) against [lo, hi) and warns when it does not fit. */
static gboolean fits(struct part_reader *r, const char *what, uint64_t start, uint64_t count,
		     uint64_t lo, uint64_t hi, const char *container)
{
	uint64_t last = start + count - 1; /* start, count < 2^33: no overflow */

	if (start < lo || start + count > hi) {
		if (start >= hi)
			part_warn(r, "%s: starts at sector %" PRIu64 " beyond %s", what, start,
				  container);
		else
			part_warn(r, "%s: ends at sector %" PRIu64 " beyond %s", what, last,
				  container);
		return FALSE;
	}
	return TRUE;
}

static gboolean follow_ebr_chain(struct part_reader *r, guint slot, uint64_t ext_start,
				 uint64_t ext_sectors, guint *next_number, GError **error)
{
	const uint64_t ext_end = ext_start + ext_sectors;
	g_autofree uint8_t *buf = g_malloc(r->sector_size);
	g_autofree char *container =
		g_strdup_printf("the extended partition %u (sectors %" PRIu64 "..%" PRIu64 ")",
				slot, ext_start, ext_end - 1);
	uint64_t ebr = ext_start;

	for (guint link = 1;; link++) {
		struct mbr_sector s;
		const struct mbr_entry *next = NULL;
		uint32_t rel, count;
		uint64_t lba;

		if (link > PART_EBR_MAX_LINKS) {
			part_warn(r, "EBR chain: more than %u links, stopping", PART_EBR_MAX_LINKS);
			return TRUE;
		}
		if (!part_read_sectors(r, ebr, 1, buf, error))
			return FALSE;
		memcpy(&s, buf, sizeof(s));
		if (s.signature[0] != MBR_SIG0 || s.signature[1] != MBR_SIG1) {
			/* An extended partition with no logicals may start with a
			 * blank sector: that is an empty chain, not damage. */
			gboolean blank = link == 1 && buf[0] == 0 &&
					 memcmp(buf, buf + 1, sizeof(s) - 1) == 0;

			if (!blank)
				part_warn(r,
					  "EBR chain: link %u at sector %" PRIu64
					  " has no 0x55AA signature, stopping",
					  link, ebr);
			return TRUE;
		}

		/* Slot 1: the logical partition, unless it is the link itself. */
		const struct mbr_entry *e = &s.part[0];
		rel = get_le32(e->start_le);
		count = get_le32(e->sectors_le);
		if (e->type != 0 && count != 0 && !mbr_type_is_extended(e->type)) {
			guint number = (*next_number)++;
			g_autofree char *what = g_strdup_printf(
				"MBR partition %u (logical, EBR at sector %" PRIu64 ")", number,
				ebr);

			lba = ebr + rel;
			if (rel == 0)
				part_warn(r, "%s: starts on its own EBR, refused", what);
			else if (fits(r, what, lba, count, ext_start, ext_end, container))
				part_entry_add(r, number, lba, count)->mbr_type = e->type;
		}

		/* The first extended-type slot links to the next EBR. */
		for (int i = 0; i < 4; i++)
			if (mbr_type_is_extended(s.part[i].type) &&
			    get_le32(s.part[i].sectors_le) != 0) {
				next = &s.part[i];
				break;
			}
		if (!next)
			return TRUE;
		lba = ext_start + get_le32(next->start_le);
		if (lba == ebr) {
			part_warn(r,
				  "EBR chain: link %u (sector %" PRIu64 ") points to itself, "
				  "stopping",
				  link, ebr);
			return TRUE;
		}
		if (lba < ebr) {
			part_warn(r,
				  "EBR chain: link %u points backwards (from sector %" PRIu64
				  " to %" PRIu64 "), stopping",
				  link, ebr, lba);
			return TRUE;
		}
		if (lba >= ext_end) {
			part_warn(r,
				  "EBR chain: link %u points to sector %" PRIu64
				  " outside %s, stopping",
				  link, lba, container);
			return TRUE;
		}
		ebr = lba;
	}
}

gboolean part_mbr_read(struct part_reader *r, const uint8_t *sector0, GError **error)
{
	struct mbr_sector mbr;
	g_autofree char *device = g_strdup_printf("the device (%" PRIu64 " sectors)", r->sectors);
	guint next_number = 5;
	struct {
		guint slot;
		uint64_t start, sectors;
	} ext[4];
	guint n_ext = 0;

	memcpy(&mbr, sector0, sizeof(mbr));
	for (guint i = 0; i < 4; i++) {
		const struct mbr_entry *e = &mbr.part[i];
		uint64_t start = get_le32(e->start_le);
		uint64_t count = get_le32(e->sectors_le);
		gboolean extended = mbr_type_is_extended(e->type);
		g_autofree char *what =
			g_strdup_printf("MBR partition %u%s", i + 1, extended ? " (extended)" : "");

		if (e->type == 0 || count == 0)
			continue; /* an empty slot; its number stays unused */
		if (!fits(r, what, start, count, 0, r->sectors, device))
			continue;
		if (extended) {
			ext[n_ext].slot = i + 1;
			ext[n_ext].start = start;
			ext[n_ext].sectors = count;
			n_ext++;
			continue;
		}
		part_entry_add(r, i + 1, start, count)->mbr_type = e->type;
	}
	for (guint i = 0; i < n_ext; i++)
		if (!follow_ebr_chain(r, ext[i].slot, ext[i].start, ext[i].sectors, &next_number,
				      error))
			return FALSE;
	part_check_overlaps(r, "MBR partition");
	return TRUE;
}
