/* tablegen.c: MBR/EBR/GPT table builder for tests. */
#include <stdio.h>
#include <string.h>

#include "src/part/ondisk.h"
#include "tablegen.h"

void tg_mbr_entry(uint8_t *sector, int slot, uint8_t boot, uint8_t type, uint32_t start,
		  uint32_t count)
{
	uint8_t *e = sector + 446 + 16 * (slot - 1);

	g_assert(slot >= 1 && slot <= 4);
	memset(e, 0, 16);
	e[0] = boot;
	e[4] = type;
	put_le32(e + 8, start);
	put_le32(e + 12, count);
	sector[510] = 0x55;
	sector[511] = 0xaa;
}

void tg_guid(const char *text, uint8_t out[16])
{
	unsigned v[16];
	int n = sscanf(text, "%2x%2x%2x%2x-%2x%2x-%2x%2x-%2x%2x-%2x%2x%2x%2x%2x%2x", &v[0], &v[1],
		       &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9], &v[10], &v[11],
		       &v[12], &v[13], &v[14], &v[15]);
	static const int order[16] = { 3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15 };

	g_assert_cmpint(n, ==, 16);
	for (int i = 0; i < 16; i++)
		out[i] = (uint8_t)v[order[i]];
}

static uint64_t array_sectors(const struct tg_gpt *g)
{
	uint64_t n = g->num_entries ? g->num_entries : 128;
	uint64_t sz = g->entry_size ? g->entry_size : 128;

	return (n * sz + g->sector_size - 1) / g->sector_size;
}

uint64_t tg_gpt_first_usable(const struct tg_gpt *g)
{
	return 2 + array_sectors(g);
}

uint64_t tg_gpt_last_usable(const struct tg_gpt *g)
{
	return g->sectors - 2 - array_sectors(g);
}

void tg_gpt_fix_header_crc(uint8_t *disk, uint32_t ss, uint64_t lba)
{
	uint8_t *h = disk + lba * ss;
	uint32_t size = MIN(get_le32(h + 12), ss); /* a bad size must not overrun */

	put_le32(h + 16, 0);
	put_le32(h + 16, part_crc32(0, h, size));
}

void tg_gpt_fix_crcs(uint8_t *disk, uint32_t ss, uint64_t lba)
{
	uint8_t *h = disk + lba * ss;
	uint64_t pe = get_le64(h + 72);
	uint64_t len = (uint64_t)get_le32(h + 80) * get_le32(h + 84);

	put_le32(h + 88, part_crc32(0, disk + pe * ss, len));
	tg_gpt_fix_header_crc(disk, ss, lba);
}

static void write_header(uint8_t *disk, const struct tg_gpt *g, uint64_t lba, uint64_t alt,
			 uint64_t pe)
{
	uint8_t *h = disk + lba * g->sector_size;

	memset(h, 0, g->sector_size);
	memcpy(h, "EFI PART", 8);
	put_le32(h + 8, 0x00010000);
	put_le32(h + 12, 92);
	put_le64(h + 24, lba);
	put_le64(h + 32, alt);
	put_le64(h + 40, tg_gpt_first_usable(g));
	put_le64(h + 48, tg_gpt_last_usable(g));
	tg_guid("01234567-89ab-cdef-0011-223344556677", h + 56);
	put_le64(h + 72, pe);
	put_le32(h + 80, g->num_entries ? g->num_entries : 128);
	put_le32(h + 84, g->entry_size ? g->entry_size : 128);
	tg_gpt_fix_crcs(disk, g->sector_size, lba);
}

uint64_t tg_gpt_write(uint8_t *disk, const struct tg_gpt *g, const struct tg_gpt_part *parts,
		      guint nparts)
{
	const uint32_t ss = g->sector_size;
	const uint64_t n = array_sectors(g);
	const uint32_t esize = g->entry_size ? g->entry_size : 128;
	const uint64_t last = g->sectors - 1;
	uint8_t *array = disk + 2 * ss;

	memset(disk, 0, 512);
	tg_mbr_entry(disk, 1, 0, 0xee, 1, (uint32_t)MIN(g->sectors - 1, (uint64_t)UINT32_MAX));
	memset(array, 0, n * ss);
	for (guint i = 0; i < nparts; i++) {
		uint8_t *e = array + (size_t)parts[i].index * esize;
		char uuid[37];

		tg_guid(parts[i].type ? parts[i].type : TG_LINUX_FS, e);
		g_snprintf(uuid, sizeof(uuid), "aaaaaaaa-bbbb-cccc-dddd-%012x", parts[i].index + 1);
		tg_guid(uuid, e + 16);
		put_le64(e + 32, parts[i].first);
		put_le64(e + 40, parts[i].last);
		if (parts[i].name) {
			glong len = 0;
			g_autofree gunichar2 *u16 =
				g_utf8_to_utf16(parts[i].name, -1, NULL, &len, NULL);

			g_assert(u16 && len <= 36);
			for (glong k = 0; k < len; k++) {
				e[56 + 2 * k] = (uint8_t)u16[k];
				e[57 + 2 * k] = (uint8_t)(u16[k] >> 8);
			}
		}
	}
	write_header(disk, g, 1, last, 2);
	memcpy(disk + (last - n) * ss, array, n * ss);
	write_header(disk, g, last, 1, last - n);
	return n;
}
