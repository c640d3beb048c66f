/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* log.c: an export's replay log: the acknowledged writes (and zeroes) that no
 * flush covered yet, in the order they were acknowledged (see the design
 * comment in export.c).  All under c->lock. */
#include "config.h"

#include "internal.h"
#include "wire.h"

void nbdc_log_free_all(Nbdc *c)
{
	while (c->log_head) {
		struct nbdc_log_entry *e = c->log_head;

		c->log_head = e->next;
		g_free(e);
	}
	c->log_tail = NULL;
	c->log_bytes = 0;
	c->log_entries = 0;
}

void nbdc_log_append(Nbdc *c, struct nbdc_log_entry *e)
{
	e->seq = ++c->log_seq;
	e->next = NULL;
	if (c->log_tail)
		c->log_tail->next = e;
	else
		c->log_head = e;
	c->log_tail = e;
	if (e->type == NBD_CMD_WRITE)
		c->log_bytes += e->len; /* memory held: zeroes hold none */
	c->log_entries++;
}

/* A flush covering every entry up to @seq succeeded. */
void nbdc_log_trim(Nbdc *c, guint64 seq)
{
	while (c->log_head && c->log_head->seq <= seq) {
		struct nbdc_log_entry *e = c->log_head;

		c->log_head = e->next;
		if (e->type == NBD_CMD_WRITE)
			c->log_bytes -= e->len;
		c->log_entries--;
		g_free(e);
	}
	if (!c->log_head)
		c->log_tail = NULL;
}

/* The writes in the log may be gone from the server for good. */
void nbdc_log_lose(Nbdc *c, const char *why)
{
	if (!c->log_head)
		return;
	nbdc_log(&c->cfg, NBDC_LOG_WARNING,
		 "%s: %" G_GUINT64_FORMAT " bytes of acknowledged writes may be lost (%s): the "
		 "next flush of every file that wrote them fails with EIO",
		 c->display, c->log_bytes, why);
	nbdc_log_free_all(c);
	c->lost_seq++;
}
