/* test-wire.c: the NBD wire codec (wire.h): struct layout, byte order, range checks. */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "nbdfs/nbd.h"
#include "wire.h"

static void test_request(void)
{
	struct nbd_request r;
	static const uint8_t want[28] = {
		0x25, 0x60, 0x95, 0x13,				/* magic */
		0x00, 0x01,					/* flags: FUA */
		0x00, 0x01,					/* type: WRITE */
		0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, /* cookie */
		0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x10, 0x00, /* offset */
		0x00, 0x00, 0x02, 0x00,				/* len */
	};

	nbd_encode_request(&r, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, UINT64_C(0x0102030405060708),
			   UINT64_C(0x100001000), 512);
	g_assert_cmpmem(&r, sizeof(r), want, sizeof(want));
}

static void test_option(void)
{
	struct nbd_option_hdr h;
	static const uint8_t want[16] = {
		'I', 'H', 'A',	'V',  'E', 'O', 'P', 'T', 0, 0, 0, 7, /* NBD_OPT_GO */
		0,   0,	  0x01, 0x02,
	};

	nbd_encode_option(&h, NBD_OPT_GO, 0x102);
	g_assert_cmpmem(&h, sizeof(h), want, sizeof(want));
}

static void test_replies(void)
{
	static const uint8_t simple[16] = {
		0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 9,
	};
	static const uint8_t chunk[20] = {
		0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0x10, 0x08,
	};
	static const uint8_t optrep[20] = {
		0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0,
		0,    7,    0x80, 0,	0,    6,    0,	  0,	0, 0,
	};
	union nbd_reply r;
	struct nbd_option_reply o;

	memcpy(r.raw, simple, 16);
	g_assert_cmphex(be32toh(r.simple.magic), ==, NBD_SIMPLE_REPLY_MAGIC);
	g_assert_cmpuint(be32toh(r.simple.error), ==, NBD_EINVAL);
	g_assert_cmpuint(be64toh(r.simple.cookie), ==, 9);
	memcpy(r.raw, chunk, 20);
	g_assert_cmphex(be32toh(r.structured.magic), ==, NBD_STRUCTURED_REPLY_MAGIC);
	g_assert_cmpuint(be16toh(r.structured.flags), ==, NBD_REPLY_FLAG_DONE);
	g_assert_cmpuint(be16toh(r.structured.type), ==, NBD_REPLY_TYPE_OFFSET_DATA);
	g_assert_cmpuint(be64toh(r.structured.cookie), ==, 42);
	g_assert_cmpuint(be32toh(r.structured.len), ==, 4096 + 8);
	memcpy(&o, optrep, 20);
	g_assert_cmphex(be64toh(o.magic), ==, NBD_REP_MAGIC);
	g_assert_cmpuint(be32toh(o.option), ==, NBD_OPT_GO);
	g_assert_cmphex(be32toh(o.type), ==, NBD_REP_ERR_UNKNOWN);
}

static void test_helpers(void)
{
	uint8_t b[8];

	put_be16(b, 0x1234);
	g_assert_cmphex(b[0], ==, 0x12);
	g_assert_cmphex(get_be16(b), ==, 0x1234);
	put_be32(b + 1, 0xdeadbeef); /* unaligned */
	g_assert_cmphex(get_be32(b + 1), ==, 0xdeadbeef);
	put_be64(b, UINT64_C(0x0102030405060708));
	g_assert_cmphex(b[7], ==, 8);
	g_assert_cmphex(get_be64(b), ==, UINT64_C(0x0102030405060708));
}

static void test_range(void)
{
	g_assert_true(nbd_range_inside(100, 10, 100, 10));
	g_assert_true(nbd_range_inside(105, 5, 100, 10));
	g_assert_true(nbd_range_inside(110, 0, 100, 10));
	g_assert_false(nbd_range_inside(99, 1, 100, 10));
	g_assert_false(nbd_range_inside(105, 6, 100, 10));
	g_assert_false(nbd_range_inside(111, 0, 100, 10));
	g_assert_false(nbd_range_inside(UINT64_MAX, 2, 100, 10));
	g_assert_false(nbd_range_inside(105, UINT64_MAX, 100, 10));
	g_assert_true(nbd_range_inside(UINT64_MAX - 1, 1, UINT64_MAX - 10, 10));
}

static void test_errno_map(void)
{
	g_assert_cmpint(nbdc_errno_from_nbd(1), ==, EPERM);
	g_assert_cmpint(nbdc_errno_from_nbd(5), ==, EIO);
	g_assert_cmpint(nbdc_errno_from_nbd(12), ==, ENOMEM);
	g_assert_cmpint(nbdc_errno_from_nbd(22), ==, EINVAL);
	g_assert_cmpint(nbdc_errno_from_nbd(28), ==, ENOSPC);
	g_assert_cmpint(nbdc_errno_from_nbd(75), ==, EOVERFLOW);
	g_assert_cmpint(nbdc_errno_from_nbd(95), ==, ENOTSUP);
	g_assert_cmpint(nbdc_errno_from_nbd(108), ==, ESHUTDOWN);
	g_assert_cmpint(nbdc_errno_from_nbd(2), ==, EINVAL);
	g_assert_cmpint(nbdc_errno_from_nbd(0xdeadbeef), ==, EINVAL);
}

int main(int argc, char **argv)
{
	g_test_init(&argc, &argv, NULL);
	g_test_add_func("/wire/request", test_request);
	g_test_add_func("/wire/option", test_option);
	g_test_add_func("/wire/replies", test_replies);
	g_test_add_func("/wire/helpers", test_helpers);
	g_test_add_func("/wire/range", test_range);
	g_test_add_func("/wire/errno", test_errno_map);
	return g_test_run();
}
