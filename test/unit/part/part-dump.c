/* part-dump: prints the partition table of an image file as part_table_read()
 * sees it, for the pytest cross-checks against real tools (test/part/).
 *
 *   part-dump [--sector-size N] IMAGE
 *   part-dump --fuzz-input FILE     (a fuzz-part input: seed or crash)
 *
 * Output, one line each:
 *   table KIND sector_size N used_backup 0|1 disk_guid GUID|-
 *   entry NUMBER start S sectors N mbr_type 0xTT type GUID|- uuid GUID|- label TEXT
 *   warning TEXT
 * or "error CODE MESSAGE" and exit status 1 when there is no table.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbdfs/partition.h"
#include "test/fuzz/part/harness.h"

#define MAX_IMAGE (1ull << 30)

int main(int argc, char **argv)
{
	gint sector_size = 512;
	gboolean fuzz_input = FALSE;
	g_auto(GStrv) files = NULL;
	GOptionEntry options[] = {
		{ "sector-size", 's', 0, G_OPTION_ARG_INT, &sector_size, "sector size", "N" },
		{ "fuzz-input", 0, 0, G_OPTION_ARG_NONE, &fuzz_input, "FILE is a fuzz-part input",
		  NULL },
		{ G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &files, NULL, "IMAGE" },
		{ NULL },
	};
	g_autoptr(GOptionContext) ctx = g_option_context_new("IMAGE");
	g_autoptr(GError) error = NULL;
	g_autoptr(GMappedFile) map = NULL;
	g_autoptr(Blockdev) dev = NULL;
	g_autoptr(PartTable) t = NULL;
	gsize len;

	g_option_context_add_main_entries(ctx, options, NULL);
	if (!g_option_context_parse(ctx, &argc, &argv, &error) || !files || !files[0] || files[1] ||
	    (sector_size != 512 && sector_size != 4096)) {
		fprintf(stderr, "usage: part-dump [--sector-size 512|4096] IMAGE%s%s\n",
			error ? ": " : "", error ? error->message : "");
		return 2;
	}
	map = g_mapped_file_new(files[0], FALSE, &error);
	if (!map) {
		fprintf(stderr, "part-dump: %s\n", error->message);
		return 2;
	}
	len = g_mapped_file_get_length(map);
	if (len > MAX_IMAGE) {
		fprintf(stderr, "part-dump: %s: larger than 1 GiB\n", files[0]);
		return 2;
	}
	if (fuzz_input)
		dev = part_fuzz_device((const uint8_t *)g_mapped_file_get_contents(map), len);
	else
		dev = blockdev_mem_new((uint32_t)sector_size, len, g_mapped_file_get_contents(map),
				       len, TRUE);
	if (!dev) {
		fprintf(stderr, "part-dump: %s: not a fuzz input\n", files[0]);
		return 2;
	}
	t = part_table_read(dev, &error);
	if (!t) {
		printf("error %s %s\n", error->code == PART_ERROR_NO_TABLE ? "no_table" : "io",
		       error->message);
		return 1;
	}
	printf("table %s sector_size %u used_backup %d disk_guid %s\n",
	       part_table_kind_name(t->kind), t->sector_size, t->used_backup ? 1 : 0,
	       t->disk_guid[0] ? t->disk_guid : "-");
	for (guint i = 0; i < t->entries->len; i++) {
		const struct part_entry *e = t->entries->pdata[i];

		printf("entry %u start %" G_GUINT64_FORMAT " sectors %" G_GUINT64_FORMAT
		       " mbr_type 0x%02x type %s uuid %s label %s\n",
		       e->number, e->start, e->sectors, e->mbr_type,
		       e->type_guid[0] ? e->type_guid : "-", e->uuid[0] ? e->uuid : "-",
		       e->label ? e->label : "");
	}
	for (guint i = 0; i < t->warnings->len; i++)
		printf("warning %s\n", (const char *)t->warnings->pdata[i]);
	return 0;
}
