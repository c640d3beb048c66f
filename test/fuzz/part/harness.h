/* harness.h: the partition fuzz target, shared by the libFuzzer entry point
 * (fuzz-part.c) and the corpus replay test (test/unit/corpus-replay.c). */
#pragma once

#include <stddef.h>
#include <stdint.h>

/* Input format (all little-endian), compact so that seeds of real disks stay
 * tiny:
 *   byte 0      flags: bit 0 = 4096-byte sectors (else 512),
 *                      bit 1 = recompute the GPT CRCs after building the image
 *                      (primary at LBA 1, backup at the last LBA), so that
 *                      mutations get past the CRC checks
 *   bytes 1-4   device size in whole sectors (capped to PART_FUZZ_MAX_BYTES)
 *   bytes 5-6   extra bytes of a partial last sector (mod sector size)
 *   then chunks: u32 byte offset, u16 length, length bytes of data, written
 *   into the zero-filled device (clipped at its end; a short last chunk is
 *   used as far as it goes).
 * Runs part_table_read() on it (both sector sizes are reachable through the
 * flag) and checks the invariants of the result; aborts on a violation. */
#define PART_FUZZ_MAX_BYTES (256u << 10)

#include "nbdfs/blockdev.h"

int part_fuzz_one(const uint8_t *data, size_t size);

/* The device an input describes (caller unrefs), or NULL when the input is
 * shorter than its 7-byte header.  part-dump --fuzz-input uses it to show
 * what a seed or a crash input contains. */
Blockdev *part_fuzz_device(const uint8_t *data, size_t size);
