/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* life.c: an Fs, made and freed: its tree, its session state, its stop. */
#include "config.h"

#include <time.h>

#include "fs-internal.h"

Fs *fs_new(const struct fs_config *cfg)
{
	Fs *fs = g_new0(Fs, 1);
	fs->cfg = *cfg;
	clock_gettime(CLOCK_REALTIME, &fs->mount_time);
	fs_tree_init(fs);
	fs_session_init(fs);
	g_mutex_init(&fs->stop_lock);
	g_cond_init(&fs->stop_cond);
	return fs;
}

void fs_free(Fs *fs)
{
	if (fs == NULL)
		return;
	g_assert(g_atomic_int_get(&fs->inflight) == 0);
	fs_free_handles(fs);
	fs_free_dirs(fs);
	fs_session_fini(fs);
	fs_tree_fini(fs);
	g_cond_clear(&fs->stop_cond);
	g_mutex_clear(&fs->stop_lock);
	g_free(fs);
}
