/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* ops.c: names, attributes and the directory: the metadata of a mount.
 *
 * Everything here is answered at once, on the loop that read the request,
 * from the tree in memory (tree.c) under the tree lock: metadata never waits
 * for the network.  The directory is flat: every file is in the root.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <string.h>

#include "fs-internal.h"

static void fill_entry(Fs *fs, struct fs_node *node, struct fuse_entry_out *e)
{
	struct stat st;
	memset(e, 0, sizeof(*e));
	fs_fill_stat(fs, node, &st);
	e->nodeid = node->ino;
	fusep_timeout(FS_ATTR_TIMEOUT, &e->entry_valid, &e->entry_valid_nsec);
	fusep_timeout(FS_ATTR_TIMEOUT, &e->attr_valid, &e->attr_valid_nsec);
	fusep_attr(&e->attr, &st);
}

void fs_op_lookup(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	if (q->nodeid != FS_ROOT_INO) {
		fs_reply_err(r, ENOTDIR);
		return;
	}
	struct fuse_entry_out e;
	g_mutex_lock(&fs->lock);
	struct fs_node *node = fs_lookup_locked(fs, q->lookup.name);
	if (node == NULL) {
		g_mutex_unlock(&fs->lock);
		fs_reply_err(r, ENOENT);
		return;
	}
	node->nlookup++;
	fill_entry(fs, node, &e);
	g_mutex_unlock(&fs->lock);
	if (fs_reply(r, &e, sizeof(e)) == -ENOENT) {
		/* Interrupted: the kernel did not take the reference. */
		g_mutex_lock(&fs->lock);
		fs_forget_locked(fs, e.nodeid, 1);
		g_mutex_unlock(&fs->lock);
	}
}

void fs_op_forget(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	g_mutex_lock(&fs->lock);
	fs_forget_locked(fs, q->nodeid, q->forget.nlookup);
	g_mutex_unlock(&fs->lock);
	fs_reply_none(r);
}

void fs_op_batch_forget(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	g_mutex_lock(&fs->lock);
	for (uint32_t i = 0; i < q->batch_forget.count; i++) {
		struct fuse_forget_one one;
		memcpy(&one, &q->batch_forget.items[i], sizeof(one));
		fs_forget_locked(fs, one.nodeid, one.nlookup);
	}
	g_mutex_unlock(&fs->lock);
	fs_reply_none(r);
}

static void reply_attr(Fs *fs, struct fs_req *r, fs_ino_t ino)
{
	struct stat st;
	if (ino == FS_ROOT_INO) {
		fs_fill_stat(fs, NULL, &st);
	} else {
		struct fs_node *node = fs_get_node(fs, ino);
		if (node == NULL) {
			fs_reply_err(r, ENOENT);
			return;
		}
		fs_fill_stat(fs, node, &st);
		fs_node_unref(node);
	}
	struct fuse_attr_out out;
	memset(&out, 0, sizeof(out));
	fusep_timeout(FS_ATTR_TIMEOUT, &out.attr_valid, &out.attr_valid_nsec);
	fusep_attr(&out.attr, &st);
	fs_reply(r, &out, sizeof(out));
}

void fs_op_getattr(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	reply_attr(fs, r, q->nodeid);
}

/* truncate/ftruncate/O_TRUNC, chmod, chown, utimes: accepted and ignored,
 * the reply carries the real attributes (the size is the device's). */
void fs_op_setattr(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	reply_attr(fs, r, q->nodeid);
}

void fs_op_statfs(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	struct fuse_statfs_out out;
	uint64_t bytes = 0;
	memset(&out, 0, sizeof(out));
	g_mutex_lock(&fs->lock);
	for (guint i = 0; i < fs->exports->len; i++) {
		struct fs_node *node = fs->exports->pdata[i];
		bytes += node->info.size;
	}
	out.st.files = g_hash_table_size(fs->names) + 1;
	g_mutex_unlock(&fs->lock);
	out.st.bsize = 4096;
	out.st.frsize = 4096;
	out.st.blocks = (bytes + 4095) / 4096;
	out.st.namelen = FS_NAME_MAX;
	fs_reply(r, &out, sizeof(out));
}

/* ---- The directory ----------------------------------------------------- */

struct dir_entry {
	fs_ino_t ino;
	char *name;
};

static void dir_entry_clear(gpointer p)
{
	g_free(((struct dir_entry *)p)->name);
}

static void add_subtree(GArray *out, struct fs_node *node)
{
	if (!node->in_tree)
		return;
	struct dir_entry d = { node->ino, g_strdup(node->name) };
	g_array_append_val(out, d);
	for (guint i = 0; i < node->children->len; i++)
		add_subtree(out, node->children->pdata[i]);
}

static void dir_free(Fs *fs, GArray *ents)
{
	g_mutex_lock(&fs->lock);
	g_hash_table_remove(fs->dirs, ents);
	g_mutex_unlock(&fs->lock);
	g_array_unref(ents);
}

void fs_op_opendir(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	if (q->nodeid != FS_ROOT_INO) {
		fs_reply_err(r, ENOTDIR);
		return;
	}
	/* A snapshot: offsets stay valid while partitions come and go. */
	GArray *ents = g_array_new(FALSE, FALSE, sizeof(struct dir_entry));
	g_array_set_clear_func(ents, dir_entry_clear);
	struct dir_entry dot = { FS_ROOT_INO, g_strdup(".") };
	struct dir_entry dotdot = { FS_ROOT_INO, g_strdup("..") };
	g_array_append_val(ents, dot);
	g_array_append_val(ents, dotdot);
	g_mutex_lock(&fs->lock);
	for (guint i = 0; i < fs->exports->len; i++)
		add_subtree(ents, fs->exports->pdata[i]);
	g_hash_table_add(fs->dirs, ents);
	g_mutex_unlock(&fs->lock);
	struct fuse_open_out out = { .fh = (uintptr_t)ents };
	if (fs_reply(r, &out, sizeof(out)) == -ENOENT)
		dir_free(fs, ents);
}

void fs_op_readdir(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	GArray *ents = (GArray *)(uintptr_t)q->read.fh;
	size_t size = MIN((size_t)q->read.size, (size_t)FUSEP_MAX_IO);
	g_autofree char *buf = g_malloc(size ? size : 1);
	size_t used = 0;
	for (uint64_t i = q->read.offset; i < ents->len; i++) {
		struct dir_entry *d = &g_array_index(ents, struct dir_entry, i);
		size_t n = fusep_add_dirent(buf, size, used, d->name, d->ino,
					    d->ino == FS_ROOT_INO ? DT_DIR : DT_REG, i + 1);
		if (n == 0)
			break;
		used += n;
	}
	(void)fs;
	fs_reply(r, buf, used);
}

void fs_op_releasedir(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	dir_free(fs, (GArray *)(uintptr_t)q->release.fh);
	fs_reply_err(r, 0);
}

void fs_each_key(Fs *fs, GHashTable *table, void (*fn)(Fs *fs, gpointer key))
{
	g_mutex_lock(&fs->lock);
	GList *keys = g_hash_table_get_keys(table);
	g_mutex_unlock(&fs->lock);
	for (GList *l = keys; l; l = l->next)
		fn(fs, l->data);
	g_list_free(keys);
}

static void dir_free_key(Fs *fs, gpointer key)
{
	dir_free(fs, key);
}

void fs_free_dirs(Fs *fs)
{
	fs_each_key(fs, fs->dirs, dir_free_key);
}
