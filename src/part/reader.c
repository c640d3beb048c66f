/* reader.c: the helpers of one table read in progress (struct part_reader)
 * that mbr.c, gpt.c and table.c share: bounded sector reads, warnings,
 * entries, the overlap check.  It calls none of them, so the calls run one
 * way: table.c -> mbr.c, gpt.c -> reader.c. */
#include <inttypes.h>
#include <stdlib.h>

#include "part-private.h"

gboolean part_read_sectors(struct part_reader *r, uint64_t lba, uint64_t count, void *buf,
			   GError **error)
{
	int err;

	g_assert(lba <= r->sectors && count <= r->sectors - lba);
	g_assert(count <= SIZE_MAX / r->sector_size);
	err = blockdev_read_sync(r->dev, lba, buf, (size_t)(count * r->sector_size));
	if (err < 0) {
		g_set_error(error, PART_ERROR, PART_ERROR_IO,
			    "partition table: reading %" PRIu64 " sector(s) at %" PRIu64 ": %s",
			    count, lba, g_strerror(-err));
		return FALSE;
	}
	return TRUE;
}

void part_warn(struct part_reader *r, const char *fmt, ...)
{
	va_list ap;

	if (r->table->warnings->len >= PART_MAX_WARNINGS) {
		r->suppressed++;
		return;
	}
	va_start(ap, fmt);
	g_ptr_array_add(r->table->warnings, g_strdup_vprintf(fmt, ap));
	va_end(ap);
}

struct part_entry *part_entry_add(struct part_reader *r, guint number, uint64_t start,
				  uint64_t sectors)
{
	struct part_entry *e = g_new0(struct part_entry, 1);

	e->number = number;
	e->start = start;
	e->sectors = sectors;
	g_ptr_array_add(r->table->entries, e);
	return e;
}

static gint cmp_start(gconstpointer a, gconstpointer b)
{
	const struct part_entry *x = *(struct part_entry *const *)a;
	const struct part_entry *y = *(struct part_entry *const *)b;

	if (x->start != y->start)
		return x->start < y->start ? -1 : 1;
	return x->number < y->number ? -1 : x->number > y->number;
}

/* Sorted by start, an entry overlaps an earlier one exactly when it starts
 * before the furthest end seen so far: one warning per overlapping entry,
 * so a hostile table cannot make this quadratic. */
void part_check_overlaps(struct part_reader *r, const char *what)
{
	GPtrArray *entries = r->table->entries;
	g_autofree struct part_entry **sorted = NULL;
	const struct part_entry *furthest = NULL;
	uint64_t furthest_end = 0;

	if (entries->len < 2)
		return;
	sorted = g_memdup2(entries->pdata, entries->len * sizeof(gpointer));
	qsort(sorted, entries->len, sizeof(gpointer), cmp_start);
	for (guint i = 0; i < entries->len; i++) {
		const struct part_entry *e = sorted[i];
		uint64_t end = e->start + e->sectors;

		if (furthest && e->start < furthest_end)
			part_warn(r,
				  "%s %u (sectors %" PRIu64 "..%" PRIu64 ") overlaps %s %u "
				  "(sectors %" PRIu64 "..%" PRIu64 "); both are kept",
				  what, e->number, e->start, end - 1, what, furthest->number,
				  furthest->start, furthest_end - 1);
		if (!furthest || end > furthest_end) {
			furthest = e;
			furthest_end = end;
		}
	}
}
