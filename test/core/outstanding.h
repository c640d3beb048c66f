/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* outstanding.h: requests left outstanding on a handle while the test gives up
 * on it (`aio-bg`, `abandon`, `abandon-on-loop`, `disconnect-bg`, `aio-wait`
 * of nbdc-cli; outstanding.c). */
#pragma once

#include <stdint.h>

#include "nbdfs/nbd.h"

/* Submits one request of @kind (read, write, flush, trim, zero) over
 * [@off, @off+@len) without waiting.  0, or 1 when it was refused. */
int outstanding_submit(Nbdc *c, const char *kind, uint64_t off, uint64_t len);
/* nbdc_abandon(@c) from this thread (@on_loop FALSE) or from a loop thread
 * (the callback of a zero-length read); the time is what aio-wait measures
 * from.  0, or 1 when the call could not be made where asked. */
int outstanding_abandon(Nbdc *c, gboolean on_loop);
/* nbdc_disconnect(@c) on a thread of its own (it waits for the requests);
 * returns once it has begun.  0, or 3 when it never did. */
int outstanding_disconnect_bg(Nbdc *c);
/* Waits at most @ms for every request submitted, and for the disconnect
 * thread; prints "done KIND OFF ERR ms=T" per request and "disconnect ms=T"
 * (T: milliseconds after the abandon, or after the wait began).  0, or 3
 * when something did not finish in time. */
int outstanding_wait(uint64_t ms);
/* After nbdc_free: 0 when every callback ran exactly once, else 4 (and a
 * line on stderr). */
int outstanding_check(void);
