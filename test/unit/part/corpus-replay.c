/* corpus-replay: runs every file of the partition fuzz corpus
 * (test/fuzz/part/corpus/, or the directory given) through the fuzz
 * target's function, so the seeds are regression tests in every build. */
#include <stdio.h>
#include <string.h>

#include <glib.h>

#include "test/fuzz/part/harness.h"

static gint cmp_names(gconstpointer a, gconstpointer b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void replay(gconstpointer path)
{
	g_autoptr(GError) error = NULL;
	g_autofree char *data = NULL;
	gsize len;

	g_assert_true(g_file_get_contents(path, &data, &len, &error));
	g_assert_no_error(error);
	g_assert_cmpint(part_fuzz_one((const uint8_t *)data, len), ==, 0);
}

int main(int argc, char **argv)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(GDir) dir = NULL;
	g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
	const char *path;
	guint n = 0;

	g_test_init(&argc, &argv, NULL);
	path = argc > 1 ? argv[1] : PART_CORPUS_DIR;
	dir = g_dir_open(path, 0, &error);
	g_assert_no_error(error);
	for (const char *name; (name = g_dir_read_name(dir));)
		g_ptr_array_add(names, g_build_filename(path, name, NULL));
	g_ptr_array_sort(names, cmp_names);
	for (guint i = 0; i < names->len; i++) {
		const char *file = names->pdata[i];
		g_autofree char *base = g_path_get_basename(file);
		g_autofree char *testpath = g_strconcat("/part/corpus/", base, NULL);

		g_test_add_data_func(testpath, file, replay);
		n++;
	}
	g_assert_cmpuint(n, >, 0);
	return g_test_run();
}
