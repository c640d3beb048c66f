/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* stress.h: the engine behind `nbdc-cli URI stress THREADS OPS SEED` (stress.c). */
#pragma once

#include <stdint.h>

#include "nbdfs/nbd.h"

/* Runs @nthreads threads of @nops random reads, writes (if the export is
 * writable) and zeroes each on @c (borrowed), seeded by @seed, requests up to
 * @max_len bytes (0: 32 KiB), checked against an in-memory model of the
 * export (at most 64 MiB), then re-reads the whole export.  Prints the
 * "stress threads=... failures=..." line on stdout and each failure on
 * stderr.  Returns 0, or 1 when a request failed, data differed from the
 * model, or a callback ran twice or inside its submit; exits with status 3
 * when a request never completed (WATCHDOG_US). */
int stress_run(Nbdc *c, uint64_t nthreads, uint64_t nops, uint64_t seed, uint32_t max_len);
