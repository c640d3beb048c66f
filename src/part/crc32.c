/* crc32.c: the CRC-32 of GPT headers and entry arrays (table-driven). */
#include <glib.h>

#include "ondisk.h"

static uint32_t crc_table[256];

static void crc_table_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;

		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

uint32_t part_crc32(uint32_t crc, const void *buf, size_t len)
{
	static gsize once;
	const uint8_t *p = buf;

	if (g_once_init_enter(&once)) {
		crc_table_init();
		g_once_init_leave(&once, 1);
	}
	crc = ~crc;
	while (len--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}
