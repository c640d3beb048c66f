/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* tree.c: the file tree of a mount: exports, partition files, names, inodes.
 *
 * The directory is flat: every export file and every partition file sits in
 * the root.  Each file is a node with an inode number that is never reused;
 * partition files hang below the file they were made from (node->children),
 * so replacing or removing partitions is a subtree operation.  A removed node
 * leaves the name table at once and the inode table once the kernel forgot
 * it (nlookup 0).  Locking is described in fs-internal.h.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "fs-internal.h"
#include "nbdfs/partition.h"

/* clang-format off */
G_DEFINE_QUARK(nbdfs-fs-error-quark, fs_error)
/* clang-format on */

/* How long partitioning waits for a just-closed partition file's release. */
#define FS_RELEASE_GRACE_US (500 * 1000)

/* ---- Names ------------------------------------------------------------- */

/* Shortens @s in place to at most FS_NAME_MAX bytes: a prefix, '~' and a
 * hash of the whole name, so distinct long names stay distinct. */
static void fit_name(GString *s)
{
	if (s->len <= FS_NAME_MAX)
		return;
	g_autofree char *sum =
		g_compute_checksum_for_data(G_CHECKSUM_SHA256, (const guchar *)s->str, s->len);
	gsize keep = 200;
	/* Do not cut through a %XX escape or a UTF-8 sequence. */
	while (keep > 0 && ((s->str[keep] & 0xC0) == 0x80))
		keep--;
	if (keep >= 1 && s->str[keep - 1] == '%')
		keep -= 1;
	else if (keep >= 2 && s->str[keep - 2] == '%')
		keep -= 2;
	g_string_truncate(s, keep);
	g_string_append_c(s, '~');
	g_string_append_len(s, sum, 16);
}

char *fs_escape_name(const char *raw)
{
	if (raw == NULL || raw[0] == '\0')
		return g_strdup("disk");
	if (strcmp(raw, ".") == 0)
		return g_strdup("%2E");
	if (strcmp(raw, "..") == 0)
		return g_strdup("%2E%2E");
	GString *s = g_string_sized_new(strlen(raw));
	for (const unsigned char *p = (const unsigned char *)raw; *p; p++) {
		if (*p == '/' || *p == '%' || *p < 0x20 || *p == 0x7f)
			g_string_append_printf(s, "%%%02X", *p);
		else
			g_string_append_c(s, (char)*p);
	}
	fit_name(s);
	return g_string_free(s, FALSE);
}

static char *part_name(const char *parent, guint number)
{
	GString *s = g_string_new(parent);
	g_string_append_printf(s, "-part%u", number);
	fit_name(s);
	return g_string_free(s, FALSE);
}

/* ---- Nodes ------------------------------------------------------------- */

struct fs_node *fs_node_ref(struct fs_node *node)
{
	g_atomic_int_inc(&node->ref);
	return node;
}

void fs_node_unref(struct fs_node *node)
{
	if (node == NULL || !g_atomic_int_dec_and_test(&node->ref))
		return;
	g_assert(node->children == NULL || node->children->len == 0);
	if (node->children)
		g_ptr_array_unref(node->children);
	if (node->parent)
		fs_node_unref(node->parent);
	blockdev_unref(node->dev);
	g_mutex_clear(&node->cache_lock);
	g_free(node->label);
	g_free(node->name);
	g_free(node);
}

/* A node for @dev (a reference is taken); ino is assigned when it is linked. */
static struct fs_node *node_new(Fs *fs, char *name, Blockdev *dev, struct fs_export *export,
				struct fs_node *parent)
{
	struct fs_node *node = g_new0(struct fs_node, 1);
	node->ref = 1;
	node->name = name;
	node->dev = blockdev_ref(dev);
	blockdev_get_info(dev, &node->info);
	if (node->info.sector_size == 0)
		node->info.sector_size = 512;
	node->start_byte = node->info.offset * node->info.sector_size;
	node->read_only = fs->cfg.read_only || !node->info.read_write;
	node->export = export;
	node->parent = parent ? fs_node_ref(parent) : NULL;
	node->children = g_ptr_array_new();
	g_mutex_init(&node->cache_lock);
	return node;
}

/* Under the tree lock: makes @node visible. */
static void link_node(Fs *fs, struct fs_node *node)
{
	node->ino = fs->next_ino++;
	node->in_tree = TRUE;
	g_hash_table_insert(fs->inodes, GSIZE_TO_POINTER(node->ino), fs_node_ref(node));
	g_hash_table_insert(fs->names, node->name, node);
	g_atomic_int_inc(&node->export->nodes);
}

static void unlink_subtree(Fs *fs, struct fs_node *node, GPtrArray *removed);

/* Under the tree lock: hides every partition file below @node. */
static void unlink_children(Fs *fs, struct fs_node *node, GPtrArray *removed)
{
	for (guint i = 0; i < node->children->len; i++) {
		struct fs_node *child = node->children->pdata[i];
		unlink_subtree(fs, child, removed);
		fs_node_unref(child);
	}
	g_ptr_array_set_size(node->children, 0);
	node->part_kind = FS_PART_NONE;
}

/* Under the tree lock: hides @node and its subtree; names go to @removed. */
static void unlink_subtree(Fs *fs, struct fs_node *node, GPtrArray *removed)
{
	unlink_children(fs, node, removed);
	if (!node->in_tree)
		return;
	node->in_tree = FALSE;
	g_atomic_int_add(&node->export->nodes, -1);
	g_hash_table_remove(fs->names, node->name);
	if (removed)
		g_ptr_array_add(removed, g_strdup(node->name));
	if (node->nlookup == 0)
		g_hash_table_remove(fs->inodes, GSIZE_TO_POINTER(node->ino));
}

/* Under the tree lock: is any partition file below @node open? */
static gboolean subtree_busy(struct fs_node *node)
{
	for (guint i = 0; i < node->children->len; i++) {
		struct fs_node *child = node->children->pdata[i];
		if (child->open_count > 0 || subtree_busy(child))
			return TRUE;
	}
	return FALSE;
}

/* Under the tree lock: is @name used by a visible node outside @below's subtree? */
static gboolean name_taken(Fs *fs, const char *name, struct fs_node *below)
{
	struct fs_node *other = g_hash_table_lookup(fs->names, name);
	if (other == NULL)
		return FALSE;
	for (struct fs_node *p = other->parent; p; p = p->parent)
		if (p == below)
			return FALSE;
	return TRUE;
}

struct fs_node *fs_get_node(Fs *fs, fs_ino_t ino)
{
	g_mutex_lock(&fs->lock);
	struct fs_node *node = g_hash_table_lookup(fs->inodes, GSIZE_TO_POINTER(ino));
	if (node)
		fs_node_ref(node);
	g_mutex_unlock(&fs->lock);
	return node;
}

/* ---- The Fs's tree ------------------------------------------------------ */

static void export_free(struct fs_export *ex)
{
	g_assert(ex->writes == NULL);
	blockdev_unref(ex->root);
	g_mutex_clear(&ex->wlock);
	g_mutex_clear(&ex->part_lock);
	g_free(ex->final_error);
	g_free(ex->name);
	g_free(ex->source);
	g_free(ex);
}

void fs_tree_init(Fs *fs)
{
	g_mutex_init(&fs->lock);
	g_cond_init(&fs->closed_cond);
	fs->inodes = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL,
					   (GDestroyNotify)fs_node_unref);
	fs->names = g_hash_table_new(g_str_hash, g_str_equal);
	fs->handles = g_hash_table_new(g_direct_hash, g_direct_equal);
	fs->dirs = g_hash_table_new(g_direct_hash, g_direct_equal);
	fs->exports = g_ptr_array_new();
	fs->export_data = g_ptr_array_new_with_free_func((GDestroyNotify)export_free);
	fs->next_ino = FS_ROOT_INO + 1;
}

void fs_tree_fini(Fs *fs)
{
	g_hash_table_unref(fs->handles);
	g_hash_table_unref(fs->dirs);
	g_mutex_lock(&fs->lock);
	for (guint i = 0; i < fs->exports->len; i++)
		unlink_subtree(fs, fs->exports->pdata[i], NULL);
	g_mutex_unlock(&fs->lock);
	g_hash_table_unref(fs->names);
	g_hash_table_unref(fs->inodes);
	g_ptr_array_unref(fs->exports);
	g_ptr_array_unref(fs->export_data);
	g_cond_clear(&fs->closed_cond);
	g_mutex_clear(&fs->lock);
}

struct fs_node *fs_lookup_locked(Fs *fs, const char *name)
{
	return g_hash_table_lookup(fs->names, name);
}

void fs_forget_locked(Fs *fs, fs_ino_t ino, uint64_t nlookup)
{
	if (ino == FS_ROOT_INO)
		return;
	struct fs_node *node = g_hash_table_lookup(fs->inodes, GSIZE_TO_POINTER(ino));
	if (node) {
		node->nlookup = node->nlookup > nlookup ? node->nlookup - nlookup : 0;
		if (!node->in_tree && node->nlookup == 0)
			g_hash_table_remove(fs->inodes, GSIZE_TO_POINTER(ino));
	}
}

gboolean fs_add_export(Fs *fs, const char *raw_name, const char *source, Blockdev *dev,
		       GError **error)
{
	char *name = fs_escape_name(raw_name);
	g_mutex_lock(&fs->lock);
	struct fs_node *other = g_hash_table_lookup(fs->names, name);
	if (other) {
		g_set_error(error, FS_ERROR, FS_ERROR_NAME_CLASH,
			    "file name \"%s\" is already given by %s", name, other->export->source);
		g_mutex_unlock(&fs->lock);
		g_free(name);
		return FALSE;
	}
	struct fs_export *ex = g_new0(struct fs_export, 1);
	struct blockdev_health health;
	ex->source = g_strdup(source);
	ex->name = g_strdup(name);
	blockdev_get_health(dev, &health);
	ex->lost_seq = health.lost_writes_seq;
	ex->root = blockdev_ref(dev);
	g_mutex_init(&ex->wlock);
	g_mutex_init(&ex->part_lock);
	g_ptr_array_add(fs->export_data, ex);
	struct fs_node *node = node_new(fs, name, dev, ex, NULL);
	link_node(fs, node);
	g_ptr_array_add(fs->exports, node);
	g_mutex_unlock(&fs->lock);
	fs_node_unref(node);
	return TRUE;
}

/* ---- Partitioning ------------------------------------------------------ */

static struct fs_node *lookup_name(Fs *fs, const char *name)
{
	g_mutex_lock(&fs->lock);
	struct fs_node *node = g_hash_table_lookup(fs->names, name);
	if (node)
		fs_node_ref(node);
	g_mutex_unlock(&fs->lock);
	return node;
}

/* Parses a decimal sector count: digits only (surrounding blanks and a
 * trailing newline allowed), no sign, no overflow. */
static gboolean parse_sectors(const char *s, uint64_t *out)
{
	if (*s == '\0')
		return FALSE;
	uint64_t v = 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return FALSE;
		if (v > (UINT64_MAX - 9) / 10)
			return FALSE;
		v = v * 10 + (uint64_t)(*s - '0');
	}
	*out = v;
	return TRUE;
}

static gboolean apply_partition(Fs *fs, struct fs_node *node, const char *value, size_t len,
				gboolean mounting, GPtrArray *removed, GPtrArray *added,
				GError **error)
{
	/* Busy first, before the value is even looked at.  The kernel sends
	 * RELEASE asynchronously after close(2), so a file closed just before
	 * gets a moment to be released before it counts as open. */
	g_mutex_lock(&fs->lock);
	gint64 deadline = g_get_monotonic_time() + FS_RELEASE_GRACE_US;
	while (node->in_tree && subtree_busy(node) &&
	       g_cond_wait_until(&fs->closed_cond, &fs->lock, deadline))
		;
	gboolean gone = !node->in_tree, busy = subtree_busy(node);
	g_mutex_unlock(&fs->lock);
	if (gone) {
		g_set_error(error, FS_ERROR, FS_ERROR_NOT_FOUND, "%s: file was removed",
			    node->name);
		return FALSE;
	}
	if (busy) {
		g_set_error(error, FS_ERROR, FS_ERROR_BUSY, "%s: a partition file below is open",
			    node->name);
		return FALSE;
	}

	/* The value: at most a short word or number; trailing NULs/blanks ignored. */
	if (len > 64) {
		g_set_error(error, FS_ERROR, FS_ERROR_INVALID, "%s: malformed partition value",
			    node->name);
		return FALSE;
	}
	g_autofree char *v = g_strndup(value, len);
	g_strstrip(v);

	enum fs_part_kind kind;
	uint64_t split = 0;
	g_autoptr(GPtrArray) devs = g_ptr_array_new_with_free_func((GDestroyNotify)blockdev_unref);
	g_autoptr(GArray) numbers = g_array_new(FALSE, FALSE, sizeof(guint));
	g_autoptr(PartTable) table = NULL;
	if (strcmp(v, "none") == 0) {
		kind = FS_PART_NONE;
	} else if (strcmp(v, "auto") == 0) {
		g_autoptr(GError) err = NULL;
		table = part_table_read(node->dev, &err);
		if (table == NULL) {
			gboolean io = g_error_matches(err, PART_ERROR, PART_ERROR_IO);
			g_set_error(error, FS_ERROR, io ? FS_ERROR_IO : FS_ERROR_NO_TABLE, "%s: %s",
				    node->name, err->message);
			return FALSE;
		}
		for (guint i = 0; table->warnings && i < table->warnings->len; i++)
			g_warning("%s: %s", node->name, (const char *)table->warnings->pdata[i]);
		kind = table->kind == PART_TABLE_GPT ? FS_PART_GPT : FS_PART_MBR;
		for (guint i = 0; i < table->entries->len; i++) {
			struct part_entry *e = table->entries->pdata[i];
			g_autoptr(GError) werr = NULL;
			Blockdev *d = blockdev_window_new(node->dev, e->start, e->sectors, &werr);
			if (d == NULL) {
				g_warning("%s: partition %u refused: %s", node->name, e->number,
					  werr->message);
				continue;
			}
			g_ptr_array_add(devs, d);
			g_array_append_val(numbers, e->number);
		}
		/* Keep the entries in step with devs for the per-partition attributes. */
	} else if (parse_sectors(v, &split)) {
		g_autoptr(GError) err = NULL;
		Blockdev *first = NULL, *rest = NULL;
		if (!blockdev_split(node->dev, split, &first, &rest, &err)) {
			g_set_error(error, FS_ERROR, FS_ERROR_INVALID,
				    "%s: split at %" G_GUINT64_FORMAT " sectors: %s", node->name,
				    split, err->message);
			return FALSE;
		}
		g_ptr_array_add(devs, first);
		g_ptr_array_add(devs, rest);
		guint n1 = 1, n2 = 2;
		g_array_append_val(numbers, n1);
		g_array_append_val(numbers, n2);
		kind = FS_PART_SPLIT;
	} else {
		g_set_error(
			error, FS_ERROR, FS_ERROR_INVALID,
			"%s: malformed partition value \"%s\" (want auto, none or a sector count)",
			node->name, v);
		return FALSE;
	}

	/* The new nodes, not yet visible. */
	g_autoptr(GPtrArray) nodes = g_ptr_array_new_with_free_func((GDestroyNotify)fs_node_unref);
	for (guint i = 0; i < devs->len; i++) {
		guint number = g_array_index(numbers, guint, i);
		struct fs_node *child = node_new(fs, part_name(node->name, number), devs->pdata[i],
						 node->export, node);
		child->number = number;
		if (table) {
			for (guint j = 0; j < table->entries->len; j++) {
				struct part_entry *e = table->entries->pdata[j];
				if (e->number != number)
					continue;
				child->table_part = TRUE;
				child->mbr_type = e->mbr_type;
				memcpy(child->type_guid, e->type_guid, sizeof(child->type_guid));
				child->type_guid[sizeof(child->type_guid) - 1] = '\0';
				memcpy(child->uuid, e->uuid, sizeof(child->uuid));
				child->uuid[sizeof(child->uuid) - 1] = '\0';
				child->label = g_strdup(e->label);
				break;
			}
		}
		g_ptr_array_add(nodes, child);
	}

	g_mutex_lock(&fs->lock);
	if (!node->in_tree || subtree_busy(node)) {
		g_mutex_unlock(&fs->lock);
		g_set_error(error, FS_ERROR, FS_ERROR_BUSY, "%s: a partition file below is open",
			    node->name);
		return FALSE;
	}
	for (guint i = 0; i < nodes->len; i++) {
		struct fs_node *child = nodes->pdata[i];
		if (name_taken(fs, child->name, node)) {
			struct fs_node *other = g_hash_table_lookup(fs->names, child->name);
			g_set_error(error, FS_ERROR, FS_ERROR_NAME_CLASH,
				    "%s: partition file name \"%s\" is already used (by %s)",
				    node->name, child->name, other->export->source);
			g_mutex_unlock(&fs->lock);
			return FALSE;
		}
	}
	unlink_children(fs, node, removed);
	for (guint i = 0; i < nodes->len; i++) {
		struct fs_node *child = nodes->pdata[i];
		link_node(fs, child);
		g_ptr_array_add(node->children, fs_node_ref(child));
		if (added)
			g_ptr_array_add(added, g_strdup(child->name));
	}
	node->part_kind = kind;
	node->split_sectors = split;
	g_mutex_unlock(&fs->lock);

	if (!mounting || kind != FS_PART_NONE)
		g_message("%s: partitions %s: %u file%s", node->name, v, nodes->len,
			  nodes->len == 1 ? "" : "s");
	return TRUE;
}

gboolean fs_apply_partition(Fs *fs, struct fs_node *node, const char *value, size_t len,
			    gboolean mounting, GPtrArray *removed, GPtrArray *added, GError **error)
{
	g_mutex_lock(&node->export->part_lock);
	gboolean ok = apply_partition(fs, node, value, len, mounting, removed, added, error);
	g_mutex_unlock(&node->export->part_lock);
	return ok;
}

char *fs_partition_value(Fs *fs, struct fs_node *node)
{
	g_mutex_lock(&fs->lock);
	enum fs_part_kind kind = node->part_kind;
	uint64_t split = node->split_sectors;
	g_mutex_unlock(&fs->lock);
	switch (kind) {
	case FS_PART_MBR:
		return g_strdup("mbr");
	case FS_PART_GPT:
		return g_strdup("gpt");
	case FS_PART_SPLIT:
		return g_strdup_printf("split:%" G_GUINT64_FORMAT, split);
	case FS_PART_NONE:
	default:
		return g_strdup("none");
	}
}

gboolean fs_partition_file(Fs *fs, const char *file, const char *value, GError **error)
{
	struct fs_node *node = lookup_name(fs, file);
	if (node == NULL) {
		g_set_error(error, FS_ERROR, FS_ERROR_NOT_FOUND, "%s: no such file in the mount",
			    file);
		return FALSE;
	}
	gboolean ok = fs_apply_partition(fs, node, value, strlen(value), TRUE, NULL, NULL, error);
	fs_node_unref(node);
	return ok;
}

gboolean fs_partition_all(Fs *fs, GError **error)
{
	g_mutex_lock(&fs->lock);
	g_autoptr(GPtrArray) roots = g_ptr_array_new_with_free_func((GDestroyNotify)fs_node_unref);
	for (guint i = 0; i < fs->exports->len; i++)
		g_ptr_array_add(roots, fs_node_ref(fs->exports->pdata[i]));
	g_mutex_unlock(&fs->lock);
	for (guint i = 0; i < roots->len; i++) {
		struct fs_node *node = roots->pdata[i];
		g_autoptr(GError) err = NULL;
		if (fs_apply_partition(fs, node, "auto", 4, TRUE, NULL, NULL, &err))
			continue;
		if (g_error_matches(err, FS_ERROR, FS_ERROR_NO_TABLE)) {
			g_message("%s", err->message);
			continue;
		}
		g_propagate_error(error, g_steal_pointer(&err));
		return FALSE;
	}
	return TRUE;
}

/* ---- Attributes -------------------------------------------------------- */

void fs_fill_stat(Fs *fs, struct fs_node *node, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_uid = fs->cfg.uid;
	st->st_gid = fs->cfg.gid;
	st->st_atim = st->st_mtim = st->st_ctim = fs->mount_time;
	if (node == NULL) {
		st->st_ino = FS_ROOT_INO;
		st->st_mode = S_IFDIR | (0755 & ~fs->cfg.umask);
		st->st_nlink = 2;
		st->st_blksize = 4096;
		return;
	}
	st->st_ino = node->ino;
	st->st_mode = S_IFREG | ((node->read_only ? 0444 : 0644) & ~fs->cfg.umask);
	st->st_nlink = 1;
	st->st_size = (off_t)node->info.size;
	st->st_blksize = node->info.pref_block ? node->info.pref_block : 4096;
	st->st_blocks = (blkcnt_t)((node->info.size + 511) / 512);
}
