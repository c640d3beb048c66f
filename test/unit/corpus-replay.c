/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* corpus-replay: runs every file of a fuzz corpus (CORPUS_DIR, or the
 * directory given) through its fuzz target's function, one TAP case each, so
 * the seeds are regression tests in every build.  Compiled once per target
 * (test/unit/nbd/meson.build with -DCORPUS_NBD, test/unit/part/meson.build
 * with -DCORPUS_PART):
 *   nbd   test/fuzz/nbd/corpus/ through LLVMFuzzerTestOneInput;
 *         NBD_FUZZ_VERBOSE=1 shows the core's log and each request's result
 *   part  test/fuzz/part/corpus/ through part_fuzz_one */
#include <stdio.h>
#include <string.h>

#include <glib.h>

#if defined(CORPUS_NBD)
#include "test/fuzz/nbd/fuzz-nbd.h"
#define CORPUS_TEST_PREFIX "/nbd/corpus/"
#define corpus_one LLVMFuzzerTestOneInput
#elif defined(CORPUS_PART)
#include "test/fuzz/part/harness.h"
#define CORPUS_TEST_PREFIX "/part/corpus/"
#define corpus_one part_fuzz_one
#else
#error "corpus-replay.c needs -DCORPUS_NBD or -DCORPUS_PART"
#endif

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
	g_assert_cmpint(corpus_one((const uint8_t *)data, len), ==, 0);
}

int main(int argc, char **argv)
{
	g_autoptr(GError) error = NULL;
	g_autoptr(GDir) dir = NULL;
	g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
	const char *path;

	g_test_init(&argc, &argv, NULL);
#if defined(CORPUS_NBD)
	nbd_fuzz_set_verbose(g_strcmp0(g_getenv("NBD_FUZZ_VERBOSE"), "1") == 0);
#endif
	path = argc > 1 ? argv[1] : CORPUS_DIR;
	dir = g_dir_open(path, 0, &error);
	g_assert_no_error(error);
	for (const char *name; (name = g_dir_read_name(dir));)
		g_ptr_array_add(names, g_build_filename(path, name, NULL));
	g_ptr_array_sort(names, cmp_names);
	g_assert_cmpuint(names->len, >, 0);
	for (guint i = 0; i < names->len; i++) {
		const char *file = names->pdata[i];
		g_autofree char *base = g_path_get_basename(file);
		g_autofree char *testpath = g_strconcat(CORPUS_TEST_PREFIX, base, NULL);

		g_test_add_data_func(testpath, file, replay);
	}
	return g_test_run();
}
