/* test-part.c: unit tests of the MBR/EBR/GPT reader on in-memory devices
 * with crafted tables: every boundary and every malformed case we know. */
#include <string.h>

#include "nbdfs/partition.h"
#include "src/part/ondisk.h"
#include "tablegen.h"

struct want {
	guint number;
	uint64_t start, sectors;
};

static uint8_t *disk_new(uint64_t bytes)
{
	return g_malloc0(bytes);
}

static struct part_table *read_image(uint32_t ss, const uint8_t *disk, uint64_t bytes,
				     GError **error)
{
	g_autoptr(Blockdev) dev = blockdev_mem_new(ss, bytes, disk, bytes, TRUE);

	return part_table_read(dev, error);
}

static struct part_table *read_ok(uint32_t ss, const uint8_t *disk, uint64_t bytes)
{
	g_autoptr(GError) error = NULL;
	struct part_table *t = read_image(ss, disk, bytes, &error);

	g_assert_no_error(error);
	g_assert_nonnull(t);
	g_assert_cmpuint(t->sector_size, ==, ss);
	for (guint i = 0; i < t->warnings->len; i++)
		g_test_message("warning: %s", (char *)t->warnings->pdata[i]);
	return t;
}

static void read_fails(uint32_t ss, const uint8_t *disk, uint64_t bytes, int code,
		       const char *substring)
{
	g_autoptr(GError) error = NULL;
	struct part_table *t = read_image(ss, disk, bytes, &error);

	g_assert_null(t);
	g_assert_error(error, PART_ERROR, code);
	g_test_message("error: %s", error->message);
	if (!strstr(error->message, substring))
		g_error("error \"%s\" lacks \"%s\"", error->message, substring);
}

static void check_entries(const struct part_table *t, const struct want *w, guint n)
{
	for (guint i = 0; i < t->entries->len; i++) {
		const struct part_entry *e = t->entries->pdata[i];

		g_test_message("entry %u start %" G_GUINT64_FORMAT " sectors %" G_GUINT64_FORMAT,
			       e->number, e->start, e->sectors);
	}
	g_assert_cmpuint(t->entries->len, ==, n);
	for (guint i = 0; i < n; i++) {
		const struct part_entry *e = t->entries->pdata[i];

		g_assert_cmpuint(e->number, ==, w[i].number);
		g_assert_cmpuint(e->start, ==, w[i].start);
		g_assert_cmpuint(e->sectors, ==, w[i].sectors);
	}
}

static void check_warning(const struct part_table *t, const char *substring)
{
	for (guint i = 0; i < t->warnings->len; i++)
		if (strstr(t->warnings->pdata[i], substring))
			return;
	g_error("no warning contains \"%s\" (%u warnings)", substring, t->warnings->len);
}

static void check_no_warnings(const struct part_table *t)
{
	if (t->warnings->len)
		g_error("unexpected warning: %s", (char *)t->warnings->pdata[0]);
}

/* ---- MBR ----------------------------------------------------------------- */

static void test_mbr_primaries(void)
{
	const uint64_t n = 4096;
	g_autofree uint8_t *d = disk_new(n * 512);
	static const struct want w[] = { { 1, 2048, 1000 }, { 3, 3048, 1048 } };

	tg_mbr_entry(d, 1, 0x80, 0x83, 2048, 1000);
	tg_mbr_entry(d, 2, 0, 0x00, 100, 100);	 /* type 0: empty */
	tg_mbr_entry(d, 3, 0, 0x07, 3048, 1048); /* ends exactly at the end */
	tg_mbr_entry(d, 4, 0, 0x83, 3000, 0);	 /* 0 sectors: empty */
	g_autoptr(PartTable) t = read_ok(512, d, n * 512);
	g_assert_cmpint(t->kind, ==, PART_TABLE_MBR);
	g_assert_cmpstr(part_table_kind_name(t->kind), ==, "mbr");
	check_entries(t, w, G_N_ELEMENTS(w));
	check_no_warnings(t);
	g_assert_cmpuint(((struct part_entry *)t->entries->pdata[0])->mbr_type, ==, 0x83);
	g_assert_cmpuint(((struct part_entry *)t->entries->pdata[1])->mbr_type, ==, 0x07);
	g_assert_null(((struct part_entry *)t->entries->pdata[0])->label);
	g_assert_cmpstr(((struct part_entry *)t->entries->pdata[0])->type_guid, ==, "");
	g_assert_cmpstr(t->disk_guid, ==, "");
	g_assert_false(t->used_backup);
}

static void test_mbr_beyond_device(void)
{
	const uint64_t n = 4096;
	g_autofree uint8_t *d = disk_new(n * 512);
	static const struct want w[] = { { 1, 1, 100 }, { 4, 0, 1 } };

	tg_mbr_entry(d, 1, 0, 0x83, 1, 100);
	tg_mbr_entry(d, 2, 0, 0x83, 4000, 1001); /* last sector 5000 */
	tg_mbr_entry(d, 3, 0, 0x83, 5000, 10);	 /* starts beyond */
	tg_mbr_entry(d, 4, 0, 0x83, 0, 1);	 /* sector 0 (isohybrid style): allowed */
	g_autoptr(PartTable) t = read_ok(512, d, n * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "MBR partition 2: ends at sector 5000 beyond the device (4096 sectors)");
	check_warning(t, "MBR partition 3: starts at sector 5000 beyond the device");
	g_assert_cmpuint(t->warnings->len, ==, 2);
}

static void test_mbr_overflow(void)
{
	/* start + count past 2^32: computed in 64 bits, refused. */
	g_autofree uint8_t *d = disk_new(8 * 512);

	tg_mbr_entry(d, 1, 0, 0x83, 0xffffffffu, 0xffffffffu);
	g_autoptr(PartTable) t = read_ok(512, d, 8 * 512);
	check_entries(t, NULL, 0);
	check_warning(t, "MBR partition 1: starts at sector 4294967295 beyond the device");
}

static void test_mbr_overlap(void)
{
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct want w[] = { { 1, 100, 200 }, { 2, 250, 100 }, { 3, 260, 10 } };

	tg_mbr_entry(d, 1, 0, 0x83, 100, 200);
	tg_mbr_entry(d, 2, 0, 0x83, 250, 100);
	tg_mbr_entry(d, 3, 0, 0x83, 260, 10);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "MBR partition 2 (sectors 250..349) overlaps MBR partition 1");
	check_warning(t, "MBR partition 3 (sectors 260..269) overlaps MBR partition 2");
	g_assert_cmpuint(t->warnings->len, ==, 2);
}

/* An extended partition at @ext of @ext_len sectors with logicals described
 * as (EBR offset from ext, data offset from EBR, length) triples. */
struct logical {
	uint32_t ebr, rel, len;
};

static void write_chain(uint8_t *d, uint32_t ss, uint32_t ext, const struct logical *l, guint n)
{
	for (guint i = 0; i < n; i++) {
		uint8_t *ebr = d + (uint64_t)(ext + l[i].ebr) * ss;

		tg_mbr_entry(ebr, 1, 0, 0x83, l[i].rel, l[i].len);
		if (i + 1 < n)
			tg_mbr_entry(ebr, 2, 0, 0x05, l[i + 1].ebr, l[i + 1].rel + l[i + 1].len);
	}
}

static void test_mbr_logicals(void)
{
	const uint64_t n = 8192;
	g_autofree uint8_t *d = disk_new(n * 512);
	/* Extended partition 4033..8191 (slot 3); EBRs at 4033, 6033, 7033. */
	static const struct logical l[] = { { 0, 63, 1000 }, { 2000, 1, 500 }, { 3000, 100, 100 } };
	static const struct want w[] = {
		{ 1, 2048, 1000 },
		{ 5, 4096, 1000 },
		{ 6, 6034, 500 },
		{ 7, 7133, 100 },
	};

	tg_mbr_entry(d, 1, 0, 0x83, 2048, 1000);
	tg_mbr_entry(d, 3, 0, 0x0f, 4033, 8192 - 4033);
	write_chain(d, 512, 4033, l, 3);
	g_autoptr(PartTable) t = read_ok(512, d, n * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_no_warnings(t);
	g_assert_cmpuint(((struct part_entry *)t->entries->pdata[1])->mbr_type, ==, 0x83);
}

static void test_mbr_multiple_extended(void)
{
	/* Two extended partitions: logical numbers continue across them. */
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct logical a[] = { { 0, 1, 10 }, { 100, 1, 10 } };
	static const struct logical b[] = { { 0, 2, 20 } };
	static const struct want w[] = { { 5, 1001, 10 }, { 6, 1101, 10 }, { 7, 2002, 20 } };

	tg_mbr_entry(d, 2, 0, 0x05, 1000, 500);
	tg_mbr_entry(d, 4, 0, 0x85, 2000, 500);
	write_chain(d, 512, 1000, a, 2);
	write_chain(d, 512, 2000, b, 1);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_no_warnings(t);
}

static void test_ebr_backwards(void)
{
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct logical l[] = { { 0, 1, 10 }, { 100, 1, 10 }, { 200, 1, 10 } };
	static const struct want w[] = { { 5, 1001, 10 }, { 6, 1101, 10 }, { 7, 1201, 10 } };

	tg_mbr_entry(d, 1, 0, 0x05, 1000, 2000);
	write_chain(d, 512, 1000, l, 3);
	/* Link 3 (EBR at 1200) points back to the EBR at 1100: a loop. */
	tg_mbr_entry(d + 1200 * 512, 2, 0, 0x05, 100, 11);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "EBR chain: link 3 points backwards (from sector 1200 to 1100), stopping");
	g_assert_cmpuint(t->warnings->len, ==, 1);
}

static void test_ebr_self_loop(void)
{
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct logical l[] = { { 0, 1, 10 }, { 100, 1, 10 } };
	static const struct want w[] = { { 5, 1001, 10 }, { 6, 1101, 10 } };

	tg_mbr_entry(d, 1, 0, 0x05, 1000, 2000);
	write_chain(d, 512, 1000, l, 2);
	tg_mbr_entry(d + 1100 * 512, 2, 0, 0x05, 100, 11);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "EBR chain: link 2 (sector 1100) points to itself, stopping");
}

static void test_ebr_no_signature(void)
{
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct logical l[] = { { 0, 1, 10 }, { 100, 1, 10 }, { 200, 1, 10 } };
	static const struct want w[] = { { 5, 1001, 10 } };

	tg_mbr_entry(d, 1, 0, 0x05, 1000, 2000);
	write_chain(d, 512, 1000, l, 3);
	d[1100 * 512 + 511] = 0;
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "EBR chain: link 2 at sector 1100 has no 0x55AA signature, stopping");
}

static void test_ebr_outside_extended(void)
{
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct logical l[] = { { 0, 1, 10 }, { 2000, 1, 10 } };
	static const struct want w[] = { { 5, 1001, 10 } };

	tg_mbr_entry(d, 1, 0, 0x05, 1000, 2000); /* sectors 1000..2999 */
	write_chain(d, 512, 1000, l, 2);	 /* next EBR at 3000: outside */
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t,
		      "EBR chain: link 1 points to sector 3000 outside the extended partition 1");
}

static void test_logical_refused(void)
{
	/* A logical past the extended end, one on its own EBR: refused, but
	 * they keep their numbers and the chain goes on. */
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct logical l[] = {
		{ 0, 1, 5000 }, { 100, 0, 10 }, { 200, 1, 10 }, { 300, 1, 0 }, { 400, 1, 10 },
	};
	static const struct want w[] = { { 7, 1201, 10 }, { 8, 1401, 10 } };

	tg_mbr_entry(d, 1, 0, 0x05, 1000, 2000);
	write_chain(d, 512, 1000, l, 5);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "MBR partition 5 (logical, EBR at sector 1000): ends at sector 6000 "
			 "beyond the extended partition 1 (sectors 1000..2999)");
	check_warning(t, "MBR partition 6 (logical, EBR at sector 1100): starts on its own EBR");
	g_assert_cmpuint(t->warnings->len, ==, 2);
}

static void test_ebr_max_links(void)
{
	const uint64_t n = 8192;
	g_autofree uint8_t *d = disk_new(n * 512);
	g_autofree struct logical *l = g_new0(struct logical, 200);

	for (guint i = 0; i < 200; i++)
		l[i] = (struct logical){ i * 20, 1, 10 };
	tg_mbr_entry(d, 1, 0, 0x05, 1000, 5000);
	write_chain(d, 512, 1000, l, 200);
	g_autoptr(PartTable) t = read_ok(512, d, n * 512);
	g_assert_cmpuint(t->entries->len, ==, 128);
	g_assert_cmpuint(((struct part_entry *)t->entries->pdata[127])->number, ==, 132);
	check_warning(t, "EBR chain: more than 128 links, stopping");
}

static void test_ebr_empty_extended(void)
{
	/* A blank first EBR: an extended partition without logicals. */
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct want w[] = { { 1, 10, 10 } };

	tg_mbr_entry(d, 1, 0, 0x83, 10, 10);
	tg_mbr_entry(d, 2, 0, 0x05, 1000, 2000);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_no_warnings(t);
}

static void test_extended_beyond_device(void)
{
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct logical l[] = { { 0, 1, 10 } };

	tg_mbr_entry(d, 2, 0, 0x05, 1000, 4000);
	write_chain(d, 512, 1000, l, 1);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, NULL, 0);
	check_warning(t, "MBR partition 2 (extended): ends at sector 4999 beyond the device");
}

static void test_mbr_4096(void)
{
	const uint64_t n = 1024;
	g_autofree uint8_t *d = disk_new(n * 4096);
	static const struct logical l[] = { { 0, 1, 10 }, { 50, 1, 10 } };
	static const struct want w[] = { { 1, 256, 100 }, { 5, 501, 10 }, { 6, 551, 10 } };

	tg_mbr_entry(d, 1, 0, 0x83, 256, 100);
	tg_mbr_entry(d, 2, 0, 0x05, 500, 524);
	write_chain(d, 4096, 500, l, 2);
	g_autoptr(PartTable) t = read_ok(4096, d, n * 4096);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_no_warnings(t);
	/* The same bytes with 512-byte sectors: different sector numbers,
	 * the EBR chain is not found where the MBR says. */
	g_autoptr(PartTable) t512 = read_ok(512, d, n * 4096);
	g_assert_cmpuint(t512->entries->len, ==, 1);
}

static void test_no_table(void)
{
	g_autofree uint8_t *d = disk_new(64 * 512);

	read_fails(512, d, 64 * 512, PART_ERROR_NO_TABLE, "no MBR signature (0x55AA) in sector 0");
	/* A GPT without its protective MBR is refused, with a hint. */
	memcpy(d + 512, "EFI PART", 8);
	read_fails(512, d, 64 * 512, PART_ERROR_NO_TABLE, "a GPT header is at LBA 1");
	/* 0x55AA with impossible boot flags: a FAT boot sector, say. */
	memset(d, 0, 1024);
	tg_mbr_entry(d, 1, 0, 0x83, 1, 10);
	d[446 + 16] = 0x29;
	read_fails(512, d, 64 * 512, PART_ERROR_NO_TABLE, "MBR slot 2 has boot flag 0x29");
}

static void test_fat_boot_sector(void)
{
	/* A FAT filesystem on the whole device: 0x55AA, empty slots. */
	g_autofree uint8_t *d = disk_new(64 * 512);

	d[0] = 0xeb;
	d[1] = 0x3c;
	d[2] = 0x90;
	d[11] = 0x00; /* 512 bytes per sector */
	d[12] = 0x02;
	d[13] = 4;    /* sectors per cluster */
	d[14] = 1;    /* reserved sectors */
	d[16] = 2;    /* FATs */
	d[21] = 0xf8; /* media */
	d[510] = 0x55;
	d[511] = 0xaa;
	read_fails(512, d, 64 * 512, PART_ERROR_NO_TABLE, "sector 0 is a FAT boot sector");
	/* With a used slot it is an MBR (boot code may look like anything). */
	tg_mbr_entry(d, 1, 0, 0x0c, 1, 63);
	g_autoptr(PartTable) t = read_ok(512, d, 64 * 512);
	g_assert_cmpuint(t->entries->len, ==, 1);
	/* All slots empty and no FAT BPB: an empty MBR. */
	memset(d, 0, 446);
	tg_mbr_entry(d, 1, 0, 0, 0, 0);
	g_autoptr(PartTable) t2 = read_ok(512, d, 64 * 512);
	g_assert_cmpint(t2->kind, ==, PART_TABLE_MBR);
	g_assert_cmpuint(t2->entries->len, ==, 0);
	check_no_warnings(t2);
}

static void test_tiny_devices(void)
{
	g_autofree uint8_t *d = disk_new(4096);

	read_fails(512, d, 0, PART_ERROR_NO_TABLE, "device too small (0 bytes");
	tg_mbr_entry(d, 1, 0, 0x83, 0, 1);
	read_fails(512, d, 511, PART_ERROR_NO_TABLE, "device too small (511 bytes");
	read_fails(4096, d, 4095, PART_ERROR_NO_TABLE, "not one whole 4096-byte sector");
	{
		/* One sector: an MBR works, its only possible partition is sector 0. */
		static const struct want w[] = { { 1, 0, 1 } };
		g_autoptr(PartTable) t = read_ok(512, d, 512);

		check_entries(t, w, 1);
	}
	{
		/* A partial last sector does not count. */
		g_autoptr(PartTable) t = NULL;

		tg_mbr_entry(d, 1, 0, 0x83, 0, 2);
		t = read_ok(512, d, 1000);
		check_entries(t, NULL, 0);
		check_warning(t, "ends at sector 1 beyond the device (1 sectors)");
	}
	tg_mbr_entry(d, 1, 0, 0xee, 1, 1);
	read_fails(512, d, 1024, PART_ERROR_NO_TABLE, "too small for a GPT (2 sectors)");
}

static void test_inside_window(void)
{
	/* A table inside a partition: read through a window, sectors relative
	 * to the window; the window's end is the device's end. */
	g_autofree uint8_t *d = disk_new(4096 * 512);
	const struct tg_gpt g = { .sector_size = 512, .sectors = 1000 };
	static const struct tg_gpt_part p[] = { { 0, 34, 499 } };
	static const struct want w[] = { { 1, 34, 466 } };
	static const struct want wm[] = { { 1, 10, 90 } };

	tg_gpt_write(d + 100 * 512, &g, p, 1);
	tg_mbr_entry(d + 2000 * 512, 1, 0, 0x83, 10, 90);
	tg_mbr_entry(d + 2000 * 512, 2, 0, 0x83, 50, 1000); /* past the window */
	g_autoptr(Blockdev) dev = blockdev_mem_new(512, 4096 * 512, d, 4096 * 512, TRUE);
	g_autoptr(GError) error = NULL;
	g_autoptr(Blockdev) win = blockdev_window_new(dev, 100, 1000, &error);
	g_assert_no_error(error);
	g_autoptr(PartTable) t = part_table_read(win, &error);
	g_assert_no_error(error);
	check_entries(t, w, 1);
	check_no_warnings(t);
	g_autoptr(Blockdev) win2 = blockdev_window_new(dev, 2000, 100, &error);
	g_assert_no_error(error);
	g_autoptr(PartTable) t2 = part_table_read(win2, &error);
	g_assert_no_error(error);
	check_entries(t2, wm, 1);
	check_warning(t2, "MBR partition 2: ends at sector 1049 beyond the device (100 sectors)");
}

static void test_io_error(void)
{
	/* A device that fails its reads: PART_ERROR_IO, not "no table". */
	g_autofree uint8_t *d = disk_new(64 * 512);
	g_autoptr(GError) error = NULL;

	tg_mbr_entry(d, 1, 0, 0x83, 1, 10);
	g_autoptr(Blockdev) dev = blockdev_mem_new(512, 64 * 512, d, 64 * 512, TRUE);
	blockdev_disconnect(dev);
	g_assert_null(part_table_read(dev, &error));
	g_assert_error(error, PART_ERROR, PART_ERROR_IO);
	g_test_message("%s", error->message);
}

/* ---- GPT ----------------------------------------------------------------- */

/* The disk most damaged-GPT cases start from: a table made for 2048 sectors
 * of 512 bytes (on a disk of @disk_sectors) with one partition, entry 0 at
 * LBAs 100..199, which reads back as gpt_one_part.  Caller frees. */
static const struct want gpt_one_part[] = { { 1, 100, 100 } };

static uint8_t *gpt_one_part_disk(uint64_t disk_sectors)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 2048 };
	static const struct tg_gpt_part p[] = { { 0, 100, 199 } };
	uint8_t *d = disk_new(disk_sectors * 512);

	tg_gpt_write(d, &g, p, 1);
	return d;
}

static const struct tg_gpt_part basic_parts[] = {
	{ 0, 34, 1000, TG_ESP, "EFI system" },
	{ 1, 1001, 1999, NULL,
	  "Donn\xc3\xa9"
	  "es \xf0\x9f\x92\xbe" },     /* é, U+1F4BE */
	{ 3, 2000, 2000, NULL, NULL }, /* one sector */
};

static void test_gpt_basic(void)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 4096 };
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct want w[] = { { 1, 34, 967 }, { 2, 1001, 999 }, { 4, 2000, 1 } };

	tg_gpt_write(d, &g, basic_parts, 3);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	g_assert_cmpint(t->kind, ==, PART_TABLE_GPT);
	g_assert_cmpstr(part_table_kind_name(t->kind), ==, "gpt");
	g_assert_cmpstr(part_table_kind_name(PART_TABLE_NONE), ==, "none");
	check_entries(t, w, G_N_ELEMENTS(w));
	check_no_warnings(t);
	g_assert_false(t->used_backup);
	g_assert_cmpstr(t->disk_guid, ==, "01234567-89ab-cdef-0011-223344556677");
	const struct part_entry *e0 = t->entries->pdata[0], *e1 = t->entries->pdata[1];
	const struct part_entry *e2 = t->entries->pdata[2];
	g_assert_cmpstr(e0->type_guid, ==, TG_ESP);
	g_assert_cmpstr(e0->uuid, ==, "aaaaaaaa-bbbb-cccc-dddd-000000000001");
	g_assert_cmpstr(e0->label, ==, "EFI system");
	g_assert_cmpuint(e0->mbr_type, ==, 0);
	g_assert_cmpstr(e1->type_guid, ==, TG_LINUX_FS);
	g_assert_cmpstr(e1->label, ==,
			"Donn\xc3\xa9"
			"es \xf0\x9f\x92\xbe");
	g_assert_cmpstr(e2->label, ==, "");
	g_assert_cmpstr(e2->uuid, ==, "aaaaaaaa-bbbb-cccc-dddd-000000000004");
}

static void test_gpt_4096(void)
{
	const struct tg_gpt g = { .sector_size = 4096, .sectors = 1024 };
	g_autofree uint8_t *d = disk_new(1024 * 4096);
	static const struct tg_gpt_part p[] = { { 0, 6, 255 }, { 1, 256, 1018 } };
	static const struct want w[] = { { 1, 6, 250 }, { 2, 256, 763 } };

	g_assert_cmpuint(tg_gpt_first_usable(&g), ==, 6);
	g_assert_cmpuint(tg_gpt_last_usable(&g), ==, 1018);
	tg_gpt_write(d, &g, p, 2);
	g_autoptr(PartTable) t = read_ok(4096, d, 1024 * 4096);
	g_assert_cmpint(t->kind, ==, PART_TABLE_GPT);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_no_warnings(t);
	/* Read with 512-byte sectors the header is not at LBA 1. */
	read_fails(512, d, 1024 * 4096, PART_ERROR_NO_TABLE, "no valid GPT");
}

static void test_gpt_bad_primary_crc(void)
{
	g_autofree uint8_t *d = gpt_one_part_disk(2048);

	d[512 + 40] ^= 1; /* first usable LBA changed, CRC not updated */
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	check_entries(t, gpt_one_part, 1);
	g_assert_true(t->used_backup);
	check_warning(t, "GPT: primary header CRC mismatch, using backup at LBA 2047");
	g_assert_cmpuint(t->warnings->len, ==, 1);
}

static void test_gpt_bad_entries_crc(void)
{
	g_autofree uint8_t *d = gpt_one_part_disk(2048);

	d[2 * 512 + 32] = 50; /* primary entry 1 now starts at 50 */
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	check_entries(t, gpt_one_part, 1);
	g_assert_true(t->used_backup);
	check_warning(t, "GPT: primary partition entries CRC mismatch, using backup at LBA 2047");
}

static void test_gpt_bad_backup(void)
{
	g_autofree uint8_t *d = gpt_one_part_disk(2048);

	d[2047 * 512 + 3] ^= 1; /* backup signature */
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	check_entries(t, gpt_one_part, 1);
	g_assert_false(t->used_backup);
	check_warning(t, "GPT: backup header at LBA 2047 is damaged (header has no \"EFI PART\" "
			 "signature); the primary is used");
}

static void test_gpt_both_bad(void)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 2048 };
	g_autofree uint8_t *d = disk_new(2048 * 512);

	tg_gpt_write(d, &g, NULL, 0);
	d[512 + 40] ^= 1;
	d[(2047 - 32) * 512] ^= 1; /* backup entry array */
	read_fails(512, d, 2048 * 512, PART_ERROR_NO_TABLE,
		   "protective MBR but no valid GPT: primary at LBA 1: header CRC mismatch; "
		   "backup at LBA 2047: partition entries CRC mismatch");
}

static void test_gpt_grown_disk(void)
{
	/* Table made for 2048 sectors, disk grown to 4096: the backup is at
	 * the primary's alternate_lba (2047), not at the last LBA. */
	g_autofree uint8_t *d = gpt_one_part_disk(4096);

	{
		g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);

		check_entries(t, gpt_one_part, 1);
		check_no_warnings(t);
	}
	d[2 * 512 + 32] = 50; /* primary entries damaged: the backup at 2047 */
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, gpt_one_part, 1);
	g_assert_true(t->used_backup);
	check_warning(t, "using backup at LBA 2047");
}

static void test_gpt_alternate_wrong(void)
{
	/* Primary entries damaged and its alternate_lba pointing at nothing
	 * (sector 1000): the backup is then looked for at the last LBA. */
	g_autofree uint8_t *d = gpt_one_part_disk(2048);

	put_le64(d + 512 + 32, 1000);
	tg_gpt_fix_header_crc(d, 512, 1);
	d[2 * 512 + 32] = 50;
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	check_entries(t, gpt_one_part, 1);
	g_assert_true(t->used_backup);
	check_warning(t, "GPT: primary partition entries CRC mismatch, using backup at LBA 2047");
	/* With a good primary the stale alternate_lba is no damage at all. */
	d[2 * 512 + 32] = 100;
	g_autoptr(PartTable) t2 = read_ok(512, d, 2048 * 512);
	check_entries(t2, gpt_one_part, 1);
	g_assert_false(t2->used_backup);
	check_no_warnings(t2);
}

static void test_gpt_primary_gone(void)
{
	/* Primary header zeroed: its alternate_lba cannot be trusted, the
	 * backup is looked for at the last LBA. */
	const struct tg_gpt g = { .sector_size = 512, .sectors = 2048 };
	g_autofree uint8_t *d = disk_new(2048 * 512);
	static const struct tg_gpt_part p[] = { { 5, 1000, 1999 } };
	static const struct want w[] = { { 6, 1000, 1000 } };

	tg_gpt_write(d, &g, p, 1);
	memset(d + 512, 0, 512);
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	check_entries(t, w, 1);
	g_assert_true(t->used_backup);
	check_warning(t, "GPT: primary header has no \"EFI PART\" signature, using backup at "
			 "LBA 2047");
}

static void test_gpt_entries_refused(void)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 4096 };
	g_autofree uint8_t *d = disk_new(4096 * 512);
	const uint64_t lu = tg_gpt_last_usable(&g); /* 4062 */
	const struct tg_gpt_part p[] = {
		{ 0, 34, 99 },	     /* ok: first usable */
		{ 1, 33, 99 },	     /* before first usable */
		{ 2, 4000, lu + 1 }, /* after last usable */
		{ 3, 5000, 6000 },   /* past the end of the device */
		{ 4, 200, 199 },     /* zero length: first > last */
		{ 5, 300, 100 },     /* first > last */
		{ 6, 4000, lu },     /* ok: last usable */
	};
	static const struct want w[] = { { 1, 34, 66 }, { 7, 4000, 63 } };

	g_assert_cmpuint(lu, ==, 4062);
	tg_gpt_write(d, &g, p, G_N_ELEMENTS(p));
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "GPT entry 2: starts at LBA 33 before the first usable LBA 34, refused");
	check_warning(t, "GPT entry 3: ends at LBA 4063 after the last usable LBA 4062, refused");
	check_warning(t, "GPT entry 4: ends at LBA 6000 after the last usable LBA 4062, refused");
	check_warning(t, "GPT entry 5: first LBA 200 is after last LBA 199, refused");
	check_warning(t, "GPT entry 6: first LBA 300 is after last LBA 100, refused");
	g_assert_cmpuint(t->warnings->len, ==, 5);
}

static void test_gpt_overlap(void)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 4096 };
	g_autofree uint8_t *d = disk_new(4096 * 512);
	static const struct tg_gpt_part p[] = { { 0, 100, 999 },
						{ 1, 500, 1499 },
						{ 2, 1500, 1600 } };
	static const struct want w[] = { { 1, 100, 900 }, { 2, 500, 1000 }, { 3, 1500, 101 } };

	tg_gpt_write(d, &g, p, 3);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, w, G_N_ELEMENTS(w));
	check_warning(t, "GPT entry 2 (sectors 500..1499) overlaps GPT entry 1 (sectors 100..999); "
			 "both are kept");
	g_assert_cmpuint(t->warnings->len, ==, 1);
}

/* Edits a header field in both headers, fixes their CRCs, and expects the
 * table to be refused with @why. */
static void expect_both_headers_refused(const struct tg_gpt *g, guint off, uint64_t value,
					guint width, const char *why)
{
	const uint32_t ss = g->sector_size;
	g_autofree uint8_t *d = disk_new(g->sectors * ss);
	const uint64_t lbas[2] = { 1, g->sectors - 1 };

	tg_gpt_write(d, g, NULL, 0);
	for (int i = 0; i < 2; i++) {
		uint8_t *h = d + lbas[i] * ss;

		if (width == 4)
			put_le32(h + off, (uint32_t)value);
		else
			put_le64(h + off, value);
		tg_gpt_fix_header_crc(d, ss, lbas[i]);
	}
	read_fails(ss, d, g->sectors * ss, PART_ERROR_NO_TABLE, why);
}

/* Edits a field of the primary header only, fixes its CRC (unless @why is
 * about the CRC), expects the backup to be used with a warning. */
static void expect_primary_refused(const struct tg_gpt *g, guint off, uint64_t value, guint width,
				   const char *why)
{
	const uint32_t ss = g->sector_size;
	g_autofree uint8_t *d = disk_new(g->sectors * ss);
	g_autofree char *warning = NULL;
	uint8_t *h = d + ss;

	tg_gpt_write(d, g, NULL, 0);
	if (width == 4)
		put_le32(h + off, (uint32_t)value);
	else
		put_le64(h + off, value);
	if (!strstr(why, "CRC"))
		tg_gpt_fix_header_crc(d, ss, 1);
	g_autoptr(PartTable) t = read_ok(ss, d, g->sectors * ss);
	g_assert_true(t->used_backup);
	warning = g_strdup_printf("GPT: primary %s, using backup at LBA %" G_GUINT64_FORMAT, why,
				  g->sectors - 1);
	check_warning(t, warning);
}

static void test_gpt_header_checks(void)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 2048 };
	const struct tg_gpt g4k = { .sector_size = 4096, .sectors = 256 };

	expect_both_headers_refused(&g, 8, 0x00020000, 4, "header revision 0x00020000 is not 1.x");
	expect_both_headers_refused(&g, 12, 91, 4, "header size 91 is not in 92..512");
	expect_both_headers_refused(&g, 12, 513, 4, "header size 513 is not in 92..512");
	expect_both_headers_refused(&g4k, 12, 4097, 4, "header size 4097 is not in 92..4096");
	expect_both_headers_refused(&g, 24, 5, 8, "header says it is at LBA 5, not 1");
	/* Absurd entry counts and sizes are refused before any allocation. */
	expect_both_headers_refused(&g, 80, 1000000, 4,
				    "1000000 entries of 128 bytes are more than 1048576 bytes");
	expect_both_headers_refused(&g, 80, 0xffffffff, 4, "4294967295 entries of 128 bytes");
	expect_both_headers_refused(&g, 84, 0xfffffff8, 4, "entry size 4294967288 is not");
	expect_both_headers_refused(&g, 84, 100, 4, "entry size 100 is not a multiple of 8 in");
	expect_both_headers_refused(&g, 84, 132, 4, "entry size 132 is not a multiple of 8");
	expect_both_headers_refused(&g, 84, 8192, 4, "entry size 8192");
	expect_both_headers_refused(&g, 48, 2048, 8, "usable LBAs 34..2048 are not a range");
	expect_both_headers_refused(&g, 40, 0, 8, "usable LBAs 0..2014 are not a range");
	expect_both_headers_refused(&g, 40, 2015, 8, "usable LBAs 2015..2014 are not a range");
	expect_primary_refused(&g, 40, 1, 8, "header LBA 1 is inside the usable LBAs 1..2014");
	expect_primary_refused(&g, 32, 5000, 8, "header CRC mismatch"); /* CRC not fixed */
	expect_both_headers_refused(&g, 72, 2047, 8, "entry array at LBA 2047 (32 sectors)");
	expect_both_headers_refused(&g, 72, 0, 8, "entry array at LBA 0");
	expect_both_headers_refused(&g, 72, 20, 8, "entry array at LBA 20 (32 sectors) is outside");
	expect_both_headers_refused(&g, 72, 1ull << 62, 8, "is outside the device");
}

static void test_gpt_entries_elsewhere(void)
{
	/* The entry array where the header says (LBA 40, first usable 100),
	 * 256-byte entries, 20 of them. */
	const struct tg_gpt g = {
		.sector_size = 512, .sectors = 2048, .num_entries = 20, .entry_size = 256
	};
	g_autofree uint8_t *d = disk_new(2048 * 512);
	static const struct tg_gpt_part p[] = { { 19, 100, 199, NULL, "last" } };
	static const struct want w[] = { { 20, 100, 100 } };
	uint8_t *h = d + 512;

	tg_gpt_write(d, &g, p, 1);
	memmove(d + 40 * 512, d + 2 * 512, 10 * 512);
	memset(d + 2 * 512, 0, 10 * 512);
	put_le64(h + 72, 40);
	put_le64(h + 40, 100);
	tg_gpt_fix_crcs(d, 512, 1);
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	check_entries(t, w, 1);
	g_assert_cmpstr(((struct part_entry *)t->entries->pdata[0])->label, ==, "last");
	/* The backup header has a different first usable LBA; it is only
	 * checked on its own. */
	check_no_warnings(t);
}

static void test_gpt_no_entries(void)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 2048 };
	g_autofree uint8_t *d = disk_new(2048 * 512);

	tg_gpt_write(d, &g, NULL, 0);
	for (int i = 0; i < 2; i++) {
		uint64_t lba = i ? 2047 : 1;

		put_le32(d + lba * 512 + 80, 0);
		tg_gpt_fix_crcs(d, 512, lba);
	}
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	g_assert_cmpint(t->kind, ==, PART_TABLE_GPT);
	check_entries(t, NULL, 0);
	check_no_warnings(t);
}

static void test_gpt_hybrid_and_pmbr(void)
{
	g_autofree uint8_t *d = gpt_one_part_disk(2048);

	/* Hybrid MBR: 0xEE in slot 2, a FAT partition in slot 1: GPT wins. */
	tg_mbr_entry(d, 1, 0x80, 0x0c, 100, 100);
	tg_mbr_entry(d, 2, 0, 0xee, 5, 2000);
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	g_assert_cmpint(t->kind, ==, PART_TABLE_GPT);
	check_entries(t, gpt_one_part, 1);
	check_warning(t, "protective MBR: the 0xEE partition starts at sector 5, not 1");
}

static void test_gpt_names(void)
{
	const struct tg_gpt g = { .sector_size = 512, .sectors = 2048 };
	g_autofree uint8_t *d = disk_new(2048 * 512);
	static const struct tg_gpt_part p[] = { { 0, 100, 199 }, { 1, 200, 299 } };
	uint8_t *e0 = d + 1024, *e1 = d + 1024 + 128;

	tg_gpt_write(d, &g, p, 2);
	/* Entry 1: 36 units, no NUL: "AB", a lone high surrogate, "C", a lone
	 * low surrogate, then 'x' to the end. */
	static const uint16_t u[] = { 'A', 'B', 0xd800, 'C', 0xdc00 };
	for (int i = 0; i < 36; i++) {
		uint16_t c = i < 5 ? u[i] : 'x';

		e0[56 + 2 * i] = (uint8_t)c;
		e0[57 + 2 * i] = (uint8_t)(c >> 8);
	}
	/* Entry 2: a high surrogate in the last unit (its pair would be past
	 * the name), after 35 'y'. */
	for (int i = 0; i < 36; i++) {
		uint16_t c = i < 35 ? 'y' : 0xd83d;

		e1[56 + 2 * i] = (uint8_t)c;
		e1[57 + 2 * i] = (uint8_t)(c >> 8);
	}
	tg_gpt_fix_crcs(d, 512, 1);
	g_autoptr(PartTable) t = read_ok(512, d, 2048 * 512);
	g_autofree char *want0 = g_strconcat("AB\xef\xbf\xbd"
					     "C\xef\xbf\xbd",
					     NULL);
	g_autoptr(GString) w0 = g_string_new(want0);
	for (int i = 5; i < 36; i++)
		g_string_append_c(w0, 'x');
	g_autoptr(GString) w1 = g_string_new(NULL);
	for (int i = 0; i < 35; i++)
		g_string_append_c(w1, 'y');
	g_string_append(w1, "\xef\xbf\xbd");
	g_assert_cmpstr(((struct part_entry *)t->entries->pdata[0])->label, ==, w0->str);
	g_assert_cmpstr(((struct part_entry *)t->entries->pdata[1])->label, ==, w1->str);
	g_assert_true(g_utf8_validate(w0->str, -1, NULL));
}

static void test_gpt_many_warnings(void)
{
	/* 1000 refused entries: 100 warnings kept, the rest counted. */
	const struct tg_gpt g = { .sector_size = 512, .sectors = 4096, .num_entries = 1000 };
	g_autofree uint8_t *d = disk_new(4096 * 512);
	g_autofree struct tg_gpt_part *p = g_new0(struct tg_gpt_part, 1000);

	for (guint i = 0; i < 1000; i++)
		p[i] = (struct tg_gpt_part){ i, 3000, 2000 };
	tg_gpt_write(d, &g, p, 1000);
	g_autoptr(PartTable) t = read_ok(512, d, 4096 * 512);
	check_entries(t, NULL, 0);
	g_assert_cmpuint(t->warnings->len, ==, 101);
	check_warning(t, "900 more warnings not shown");
}

static void test_gpt_crc32(void)
{
	/* The standard check value of CRC-32/ISO-HDLC. */
	g_assert_cmphex(part_crc32(0, "123456789", 9), ==, 0xcbf43926);
	g_assert_cmphex(part_crc32(part_crc32(0, "1234", 4), "56789", 5), ==, 0xcbf43926);
	g_assert_cmphex(part_crc32(0, "", 0), ==, 0);
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/part/mbr/primaries", test_mbr_primaries);
	g_test_add_func("/part/mbr/beyond-device", test_mbr_beyond_device);
	g_test_add_func("/part/mbr/overflow", test_mbr_overflow);
	g_test_add_func("/part/mbr/overlap", test_mbr_overlap);
	g_test_add_func("/part/mbr/logicals", test_mbr_logicals);
	g_test_add_func("/part/mbr/multiple-extended", test_mbr_multiple_extended);
	g_test_add_func("/part/mbr/ebr-backwards", test_ebr_backwards);
	g_test_add_func("/part/mbr/ebr-self-loop", test_ebr_self_loop);
	g_test_add_func("/part/mbr/ebr-no-signature", test_ebr_no_signature);
	g_test_add_func("/part/mbr/ebr-outside-extended", test_ebr_outside_extended);
	g_test_add_func("/part/mbr/logical-refused", test_logical_refused);
	g_test_add_func("/part/mbr/ebr-max-links", test_ebr_max_links);
	g_test_add_func("/part/mbr/empty-extended", test_ebr_empty_extended);
	g_test_add_func("/part/mbr/extended-beyond-device", test_extended_beyond_device);
	g_test_add_func("/part/mbr/4096", test_mbr_4096);
	g_test_add_func("/part/none/no-table", test_no_table);
	g_test_add_func("/part/none/tiny-devices", test_tiny_devices);
	g_test_add_func("/part/none/fat-boot-sector", test_fat_boot_sector);
	g_test_add_func("/part/window", test_inside_window);
	g_test_add_func("/part/io-error", test_io_error);
	g_test_add_func("/part/gpt/basic", test_gpt_basic);
	g_test_add_func("/part/gpt/4096", test_gpt_4096);
	g_test_add_func("/part/gpt/bad-primary-crc", test_gpt_bad_primary_crc);
	g_test_add_func("/part/gpt/bad-entries-crc", test_gpt_bad_entries_crc);
	g_test_add_func("/part/gpt/bad-backup", test_gpt_bad_backup);
	g_test_add_func("/part/gpt/both-bad", test_gpt_both_bad);
	g_test_add_func("/part/gpt/grown-disk", test_gpt_grown_disk);
	g_test_add_func("/part/gpt/primary-gone", test_gpt_primary_gone);
	g_test_add_func("/part/gpt/alternate-wrong", test_gpt_alternate_wrong);
	g_test_add_func("/part/gpt/entries-refused", test_gpt_entries_refused);
	g_test_add_func("/part/gpt/overlap", test_gpt_overlap);
	g_test_add_func("/part/gpt/header-checks", test_gpt_header_checks);
	g_test_add_func("/part/gpt/entries-elsewhere", test_gpt_entries_elsewhere);
	g_test_add_func("/part/gpt/no-entries", test_gpt_no_entries);
	g_test_add_func("/part/gpt/hybrid-pmbr", test_gpt_hybrid_and_pmbr);
	g_test_add_func("/part/gpt/names", test_gpt_names);
	g_test_add_func("/part/gpt/many-warnings", test_gpt_many_warnings);
	g_test_add_func("/part/gpt/crc32", test_gpt_crc32);
	return g_test_run();
}
