/* xattr.c: the user.nbdfs.* extended attributes (partitioning on request,
 * read-only facts about each file).
 *
 * user.nbdfs.partition is the one writable attribute: "auto", "none" or a
 * sector count (tree.c does the work).  The kernel is told about files that
 * appear or disappear (fuse_lowlevel_notify_inval_entry) after the tree lock
 * is dropped and before the reply, so `setfattr ...; ls` is fresh.  That is
 * safe from inside setxattr: the notifications lock the root directory, and
 * setxattr only holds the inode of the file being partitioned.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "fs-internal.h"

#define XATTR_PREFIX "user.nbdfs."
#define XATTR_PARTITION XATTR_PREFIX "partition"

enum attr_id {
	A_PARTITION, A_START, A_SECTORS, A_SECTOR_SIZE, A_EXPORT, A_URI, A_TYPE, A_UUID, A_LABEL,
	A_COUNT
};

static const char *const attr_names[A_COUNT] = {
	[A_PARTITION] = XATTR_PREFIX "partition",
	[A_START] = XATTR_PREFIX "start",
	[A_SECTORS] = XATTR_PREFIX "sectors",
	[A_SECTOR_SIZE] = XATTR_PREFIX "sector_size",
	[A_EXPORT] = XATTR_PREFIX "export",
	[A_URI] = XATTR_PREFIX "uri",
	[A_TYPE] = XATTR_PREFIX "type",
	[A_UUID] = XATTR_PREFIX "uuid",
	[A_LABEL] = XATTR_PREFIX "label",
};

static int attr_lookup(const char *name)
{
	for (int i = 0; i < A_COUNT; i++)
		if (strcmp(name, attr_names[i]) == 0)
			return i;
	return -1;
}

static gboolean is_gpt_part(const struct fs_node *node)
{
	return node->table_part && node->uuid[0] != '\0';
}

/* The value of attribute @id on @node, or NULL where it does not apply. */
static char *attr_value(Fs *fs, struct fs_node *node, int id)
{
	switch (id) {
	case A_PARTITION:
		return fs_partition_value(fs, node);
	case A_START:
		return g_strdup_printf("%" G_GUINT64_FORMAT, node->info.offset);
	case A_SECTORS:
		return g_strdup_printf("%" G_GUINT64_FORMAT, node->info.sectors);
	case A_SECTOR_SIZE:
		return g_strdup_printf("%u", node->info.sector_size);
	case A_EXPORT:
		return g_strdup(node->info.export_name ? node->info.export_name : "");
	case A_URI:
		return g_strdup(node->info.uri ? node->info.uri : "");
	case A_TYPE:
		if (!node->table_part)
			return NULL;
		if (node->type_guid[0])
			return g_strdup(node->type_guid);
		return g_strdup_printf("0x%02x", node->mbr_type);
	case A_UUID:
		return is_gpt_part(node) ? g_strdup(node->uuid) : NULL;
	case A_LABEL:
		return is_gpt_part(node) ? g_strdup(node->label ? node->label : "") : NULL;
	default:
		return NULL;
	}
}

static void notify_names(Fs *fs, GPtrArray *names)
{
	for (guint i = 0; i < names->len; i++) {
		const char *n = names->pdata[i];
		int r = fuse_lowlevel_notify_inval_entry(fs->se, FS_ROOT_INO, n, strlen(n));
		if (r < 0 && r != -ENOENT)
			g_debug("notify %s: %s", n, g_strerror(-r));
	}
}

void fs_op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value,
		    size_t size, int flags)
{
	Fs *fs = fuse_req_userdata(req);
	int id = attr_lookup(name);
	if (ino == FS_ROOT_INO) {
		fuse_reply_err(req, id >= 0 ? EPERM : ENOTSUP);
		return;
	}
	if (id < 0) {
		fuse_reply_err(req, ENOTSUP);
		return;
	}
	if (id != A_PARTITION) {
		fuse_reply_err(req, EPERM);
		return;
	}
	struct fs_node *node = fs_get_node(fs, ino);
	if (node == NULL) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	g_autoptr(GPtrArray) removed = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GPtrArray) added = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GError) err = NULL;
	gboolean ok = fs_apply_partition(fs, node, value, size, FALSE, removed, added, &err);
	fs_node_unref(node);
	if (!ok) {
		int e = EINVAL;
		switch (err->code) {
		case FS_ERROR_BUSY: e = EBUSY; break;
		case FS_ERROR_NOT_FOUND: e = ENOENT; break;
		case FS_ERROR_IO: e = EIO; break;
		case FS_ERROR_NAME_CLASH: e = EEXIST; break;
		default: e = EINVAL; break;
		}
		g_warning("setxattr %s: %s", XATTR_PARTITION, err->message);
		fuse_reply_err(req, e);
		return;
	}
	if (fs->se) {
		notify_names(fs, removed);
		notify_names(fs, added);
	}
	fuse_reply_err(req, 0);
}

void fs_op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	Fs *fs = fuse_req_userdata(req);
	int id = attr_lookup(name);
	if (ino == FS_ROOT_INO || id < 0) {
		fuse_reply_err(req, ENODATA);
		return;
	}
	struct fs_node *node = fs_get_node(fs, ino);
	if (node == NULL) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	g_autofree char *v = attr_value(fs, node, id);
	fs_node_unref(node);
	if (v == NULL) {
		fuse_reply_err(req, ENODATA);
		return;
	}
	size_t len = strlen(v);
	if (size == 0)
		fuse_reply_xattr(req, len);
	else if (size < len)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, v, len);
}

void fs_op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	Fs *fs = fuse_req_userdata(req);
	if (ino == FS_ROOT_INO) {
		if (size == 0)
			fuse_reply_xattr(req, 0);
		else
			fuse_reply_buf(req, NULL, 0);
		return;
	}
	struct fs_node *node = fs_get_node(fs, ino);
	if (node == NULL) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	GString *list = g_string_new(NULL);
	for (int i = 0; i < A_COUNT; i++) {
		g_autofree char *v = attr_value(fs, node, i);
		if (v)
			g_string_append_len(list, attr_names[i], (gssize)strlen(attr_names[i]) + 1);
	}
	fs_node_unref(node);
	if (size == 0)
		fuse_reply_xattr(req, list->len);
	else if (size < list->len)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, list->str, list->len);
	g_string_free(list, TRUE);
}

void fs_op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	int id = attr_lookup(name);
	if (ino == FS_ROOT_INO || id < 0) {
		fuse_reply_err(req, ENODATA);
		return;
	}
	if (id != A_PARTITION) {
		fuse_reply_err(req, EPERM);
		return;
	}
	/* Removing the partition attribute removes the partition files. */
	fs_op_setxattr(req, ino, name, "none", 4, 0);
}
