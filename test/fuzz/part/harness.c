/* harness.c: builds an in-memory device from a fuzz input, reads its table,
 * and checks what every table must satisfy. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "nbdfs/partition.h"
#include "src/part/ondisk.h"

static void fix_gpt_crcs(uint8_t *disk, uint64_t len, uint32_t ss, uint64_t lba)
{
	uint8_t *h;
	uint32_t hsize;
	uint64_t pe, n;

	if (lba == 0 || lba >= len / ss)
		return;
	h = disk + lba * ss;
	hsize = get_le32(h + 12);
	pe = get_le64(h + 72);
	n = (uint64_t)get_le32(h + 80) * get_le32(h + 84);
	if (pe < len / ss && n <= len - pe * ss)
		put_le32(h + 88, part_crc32(0, disk + pe * ss, n));
	if (hsize >= 20 && hsize <= ss) {
		put_le32(h + 16, 0);
		put_le32(h + 16, part_crc32(0, h, hsize));
	}
}

static void check(int cond, const char *what)
{
	if (!cond) {
		fprintf(stderr, "part fuzz invariant violated: %s\n", what);
		abort();
	}
}

Blockdev *part_fuzz_device(const uint8_t *data, size_t size)
{
	Blockdev *dev;
	uint32_t ss;
	uint64_t sectors, len;
	uint8_t *disk;
	size_t pos = 7;

	if (size < 7)
		return NULL;
	ss = (data[0] & 1) ? 4096 : 512;
	sectors = MIN((uint64_t)get_le32(data + 1), PART_FUZZ_MAX_BYTES / ss);
	len = sectors * ss + get_le16(data + 5) % ss;
	if (len > PART_FUZZ_MAX_BYTES)
		len = PART_FUZZ_MAX_BYTES;
	dev = blockdev_mem_new(ss, len, NULL, 0, TRUE);
	check(dev != NULL, "memory device");
	disk = blockdev_mem_data(dev);
	while (pos + 6 <= size) {
		uint64_t off = get_le32(data + pos);
		size_t n = MIN((size_t)get_le16(data + pos + 4), size - pos - 6);

		pos += 6;
		if (off < len)
			memcpy(disk + off, data + pos, MIN((uint64_t)n, len - off));
		pos += n;
	}
	if (data[0] & 2) {
		fix_gpt_crcs(disk, len, ss, 1);
		fix_gpt_crcs(disk, len, ss, len / ss - 1);
	}
	return dev;
}

int part_fuzz_one(const uint8_t *data, size_t size)
{
	g_autoptr(Blockdev) dev = part_fuzz_device(data, size);
	g_autoptr(GError) error = NULL;
	g_autoptr(PartTable) t = NULL;
	struct blockdev_info info;
	uint32_t ss;

	if (!dev)
		return 0;
	blockdev_get_info(dev, &info);
	ss = info.sector_size;
	t = part_table_read(dev, &error);
	if (!t) {
		check(error != NULL && error->domain == PART_ERROR, "an error in PART_ERROR");
		check(error->code == PART_ERROR_NO_TABLE, "no I/O errors from a memory device");
		return 0;
	}
	check(error == NULL, "no error with a table");
	check(t->kind == PART_TABLE_MBR || t->kind == PART_TABLE_GPT, "table kind");
	check(t->sector_size == ss, "sector size");
	check(t->warnings->len <= 101, "warnings bounded");
	for (guint i = 0; i < t->entries->len; i++) {
		const struct part_entry *e = t->entries->pdata[i];
		g_autoptr(Blockdev) w = NULL;

		check(e->sectors > 0, "entry not empty");
		check(e->start < info.sectors && e->sectors <= info.sectors - e->start,
		      "entry inside the device");
		check(i == 0 || e->number > ((struct part_entry *)t->entries->pdata[i - 1])->number,
		      "entries in increasing number order");
		if (t->kind == PART_TABLE_MBR) {
			check(e->number >= 1 && e->number <= 4 + 4 * 128, "MBR numbering");
			check(e->label == NULL && e->type_guid[0] == 0, "MBR entry fields");
		} else {
			check(e->label != NULL && g_utf8_validate(e->label, -1, NULL), "GPT label");
			check(strlen(e->type_guid) == 36 && strlen(e->uuid) == 36, "GPT GUIDs");
		}
		/* Every accepted entry must make a window of its parent. */
		w = blockdev_window_new(dev, e->start, e->sectors, &error);
		check(w != NULL, "window of an entry");
	}
	return 0;
}
