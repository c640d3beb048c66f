/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* fuzz-nbd.h: the NBD fuzz target (fuzz-nbd.c, input format there), shared by
 * the libFuzzer build (test/fuzz/nbd) and the corpus replay test
 * (test/unit/corpus-replay.c). */
#pragma once

#include <glib.h>
#include <stddef.h>
#include <stdint.h>

/* Runs one input; aborts when the client core breaks a promise. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Each step's result on stderr (off by default). */
void nbd_fuzz_set_verbose(gboolean on);
