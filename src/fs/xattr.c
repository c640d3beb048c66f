/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* xattr.c: the user.nbdfs.* extended attributes (partitioning on request,
 * read-only facts and the state of each file).
 *
 * user.nbdfs.partition is the one writable attribute: "auto", "none" or a
 * sector count (tree.c does the work).  Partitioning may read a table over
 * the network, so it runs on the blocking pool, never on a loop: a dead
 * server makes that one setxattr wait (up to the timeout), not the mount.
 * The kernel is told about files that appear or disappear (an entry
 * invalidation) after the tree lock is dropped and before the reply, so
 * `setfattr ...; ls` is fresh.  That is safe from inside setxattr: the
 * notifications lock the root directory, and setxattr only holds the inode
 * of the file being partitioned.  Reading an attribute never waits on the
 * network: state and stats come from counters in memory.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "fs-internal.h"

#define XATTR_PREFIX "user.nbdfs."
#define XATTR_PARTITION XATTR_PREFIX "partition"

enum attr_id {
	A_PARTITION,
	A_START,
	A_SECTORS,
	A_SECTOR_SIZE,
	A_EXPORT,
	A_URI,
	A_STATE,
	A_STATS,
	A_TYPE,
	A_UUID,
	A_LABEL,
	A_COUNT
};

static const char *const attr_names[A_COUNT] = {
	[A_PARTITION] = XATTR_PREFIX "partition", [A_START] = XATTR_PREFIX "start",
	[A_SECTORS] = XATTR_PREFIX "sectors",	  [A_SECTOR_SIZE] = XATTR_PREFIX "sector_size",
	[A_EXPORT] = XATTR_PREFIX "export",	  [A_URI] = XATTR_PREFIX "uri",
	[A_STATE] = XATTR_PREFIX "state",	  [A_STATS] = XATTR_PREFIX "stats",
	[A_TYPE] = XATTR_PREFIX "type",		  [A_UUID] = XATTR_PREFIX "uuid",
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

static guint64 counter(const guint64 *c)
{
	return __atomic_load_n(c, __ATOMIC_RELAXED);
}

/* user.nbdfs.stats: this file's I/O, its export's reconnects. */
static char *stats_text(struct fs_node *node)
{
	struct blockdev_health h;
	blockdev_get_health(node->dev, &h);
	return g_strdup_printf("reads=%" G_GUINT64_FORMAT "\nwrites=%" G_GUINT64_FORMAT
			       "\nbytes_read=%" G_GUINT64_FORMAT
			       "\nbytes_written=%" G_GUINT64_FORMAT "\nerrors=%" G_GUINT64_FORMAT
			       "\nreconnects=%" G_GUINT64_FORMAT "\nin_flight=%d\n",
			       counter(&node->stats.reads), counter(&node->stats.writes),
			       counter(&node->stats.bytes_read),
			       counter(&node->stats.bytes_written), counter(&node->stats.errors),
			       h.reconnects, g_atomic_int_get(&node->stats.in_flight));
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
	case A_STATE: {
		struct blockdev_health h;
		blockdev_get_health(node->dev, &h);
		return g_strdup(blockdev_conn_state_name(h.state));
	}
	case A_STATS:
		return stats_text(node);
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
		int r = fs_notify_inval_entry(fs, FS_ROOT_INO, n);
		if (r < 0 && r != -ENOENT && r != -ENODEV)
			g_debug("notify %s: %s", n, g_strerror(-r));
	}
}

/* A partitioning on the pool. */
struct part_job {
	Fs *fs;
	struct fs_req req;
	struct fs_node *node; /* ref */
	char *value;
	size_t len;
};

static void part_job_run(void *opaque)
{
	struct part_job *j = opaque;
	Fs *fs = j->fs;
	g_autoptr(GPtrArray) removed = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GPtrArray) added = g_ptr_array_new_with_free_func(g_free);
	g_autoptr(GError) err = NULL;
	gboolean ok =
		fs_apply_partition(fs, j->node, j->value, j->len, FALSE, removed, added, &err);
	int e = 0;
	if (!ok) {
		switch (err->code) {
		case FS_ERROR_BUSY:
			e = EBUSY;
			break;
		case FS_ERROR_NOT_FOUND:
			e = ENOENT;
			break;
		case FS_ERROR_IO:
			e = EIO;
			break;
		case FS_ERROR_NAME_CLASH:
			e = EEXIST;
			break;
		default:
			e = EINVAL;
			break;
		}
		g_warning("setxattr %s: %s", XATTR_PARTITION, err->message);
	} else {
		notify_names(fs, removed);
		notify_names(fs, added);
	}
	fs_reply_err(&j->req, e);
	fs_node_unref(j->node);
	g_free(j->value);
	g_free(j);
	fs_inflight_end(fs, NULL);
}

static void start_partition(Fs *fs, struct fs_req *r, fs_ino_t ino, const char *value, size_t len)
{
	struct fs_node *node = fs_get_node(fs, ino);
	if (node == NULL) {
		fs_reply_err(r, ENOENT);
		return;
	}
	struct part_job *j = g_new0(struct part_job, 1);
	j->fs = fs;
	j->req = *r;
	j->node = node;
	j->value = g_strndup(value, len); /* never NULL, even for "" */
	j->len = len;
	fs_inflight_begin(fs, NULL);
	loop_set_run_blocking(fs_loops(fs), part_job_run, j);
}

void fs_op_setxattr(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	int id = attr_lookup(q->setxattr.name);
	if (q->nodeid == FS_ROOT_INO) {
		fs_reply_err(r, id >= 0 ? EPERM : ENOTSUP);
		return;
	}
	if (id < 0) {
		fs_reply_err(r, ENOTSUP);
		return;
	}
	if (id != A_PARTITION) {
		fs_reply_err(r, EPERM);
		return;
	}
	start_partition(fs, r, q->nodeid, q->setxattr.value, q->setxattr.size);
}

/* Answers a getxattr/listxattr of @len bytes in @v by the size rules. */
static void reply_sized(struct fs_req *r, uint32_t size, const char *v, size_t len)
{
	if (size == 0) {
		struct fuse_getxattr_out out = { .size = (uint32_t)len };
		fs_reply(r, &out, sizeof(out));
	} else if (size < len) {
		fs_reply_err(r, ERANGE);
	} else {
		fs_reply(r, v, len);
	}
}

void fs_op_getxattr(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	int id = attr_lookup(q->getxattr.name);
	if (q->nodeid == FS_ROOT_INO || id < 0) {
		fs_reply_err(r, ENODATA);
		return;
	}
	struct fs_node *node = fs_get_node(fs, q->nodeid);
	if (node == NULL) {
		fs_reply_err(r, ENOENT);
		return;
	}
	g_autofree char *v = attr_value(fs, node, id);
	fs_node_unref(node);
	if (v == NULL) {
		fs_reply_err(r, ENODATA);
		return;
	}
	reply_sized(r, q->getxattr.size, v, strlen(v));
}

void fs_op_listxattr(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	if (q->nodeid == FS_ROOT_INO) {
		reply_sized(r, q->getxattr.size, "", 0);
		return;
	}
	struct fs_node *node = fs_get_node(fs, q->nodeid);
	if (node == NULL) {
		fs_reply_err(r, ENOENT);
		return;
	}
	GString *list = g_string_new(NULL);
	for (int i = 0; i < A_COUNT; i++) {
		g_autofree char *v = attr_value(fs, node, i);
		if (v)
			g_string_append_len(list, attr_names[i], (gssize)strlen(attr_names[i]) + 1);
	}
	fs_node_unref(node);
	reply_sized(r, q->getxattr.size, list->str, list->len);
	g_string_free(list, TRUE);
}

void fs_op_removexattr(Fs *fs, struct fs_req *r, const struct fusep_req *q)
{
	int id = attr_lookup(q->lookup.name);
	if (q->nodeid == FS_ROOT_INO || id < 0) {
		fs_reply_err(r, ENODATA);
		return;
	}
	if (id != A_PARTITION) {
		fs_reply_err(r, EPERM);
		return;
	}
	/* Removing the partition attribute removes the partition files. */
	start_partition(fs, r, q->nodeid, "none", 4);
}
