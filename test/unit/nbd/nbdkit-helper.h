/* nbdkit-helper.h: start nbdkit for unit tests (socketpair + -s, or -U socket). */
#pragma once

#include <glib.h>
#include <sys/types.h>

struct nbdkit {
	GPid pid;
	char *dir;    /* temp dir holding the socket (-U mode) */
	char *socket; /* -U socket path, or NULL in -s mode */
	int fd;	      /* our end of the socketpair in -s mode, else -1 */
	int port;     /* TCP port on 127.0.0.1 (tcp mode) */
};

/* -s mode: argv after "nbdkit -s --exit-with-parent"; returns the fd to give
 * nbdc_connect (cfg.fd).  NULL-terminated argv. */
struct nbdkit *nbdkit_start_fd(const char *const *args);
/* -U mode: waits until the socket exists (polling with a deadline). */
struct nbdkit *nbdkit_start_unix(const char *const *args);
/* TCP on 127.0.0.1, a free port (k->port). */
struct nbdkit *nbdkit_start_tcp(const char *const *args);
struct nbdkit *nbdkit_start_unix_or_tcp(const char *const *args, gboolean tcp);
/* Kills by pid, waits, removes the temp dir. */
void nbdkit_stop(struct nbdkit *k);
