/* fake-blockdev.c: a private stand-in for the few blockdev.h functions the
 * table reader uses (memory device, info, synchronous read), used only
 * until src/block/ provides the real memory device. */
#include <errno.h>
#include <string.h>

#include "nbdfs/blockdev.h"

struct blockdev {
	gint refs;
	uint32_t sector_size;
	uint64_t size;
	uint8_t *data;
};

Blockdev *blockdev_mem_new(uint32_t sector_size, uint64_t size, const void *data, size_t data_len,
			   gboolean read_only)
{
	Blockdev *d = g_new0(Blockdev, 1);

	d->refs = 1;
	d->sector_size = sector_size;
	d->size = size;
	d->data = g_malloc0(size ? size : 1);
	if (data)
		memcpy(d->data, data, MIN(size, data_len));
	return d;
}

uint8_t *blockdev_mem_data(Blockdev *dev)
{
	return dev->data;
}

Blockdev *blockdev_ref(Blockdev *dev)
{
	g_atomic_int_inc(&dev->refs);
	return dev;
}

void blockdev_unref(Blockdev *dev)
{
	if (dev && g_atomic_int_dec_and_test(&dev->refs)) {
		g_free(dev->data);
		g_free(dev);
	}
}

void blockdev_get_info(Blockdev *dev, struct blockdev_info *info)
{
	memset(info, 0, sizeof(*info));
	info->sector_size = dev->sector_size;
	info->size = dev->size;
	info->sectors = dev->size / dev->sector_size;
	info->pref_block = 4096;
	info->max_request = 1 << 20;
	info->export_name = "mem";
	info->uri = "mem:";
}

int blockdev_read_sync(Blockdev *dev, uint64_t sector, void *buf, size_t len)
{
	uint64_t total = (dev->size + dev->sector_size - 1) / dev->sector_size;
	uint64_t off;

	if (len % dev->sector_size || sector > total || len / dev->sector_size > total - sector)
		return -EINVAL;
	off = sector * dev->sector_size;
	memset(buf, 0, len);
	if (off < dev->size)
		memcpy(buf, dev->data + off, MIN(len, dev->size - off));
	return 0;
}
