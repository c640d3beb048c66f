/* fuzz-part.c: libFuzzer entry point for the partition table reader. */
#include "harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return part_fuzz_one(data, size);
}
