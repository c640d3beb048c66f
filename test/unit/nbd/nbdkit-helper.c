/* nbdkit-helper.c: start and stop nbdkit for the core's unit tests. */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nbdkit-helper.h"

static void child_setup_fd(gpointer data)
{
	int fd = GPOINTER_TO_INT(data);

	dup2(fd, 0);
	dup2(fd, 1);
}

struct nbdkit *nbdkit_start_fd(const char *const *args)
{
	int sv[2];
	g_autoptr(GPtrArray) argv = g_ptr_array_new();
	g_autoptr(GError) err = NULL;
	struct nbdkit *k = g_new0(struct nbdkit, 1);

	g_assert_cmpint(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), ==, 0);
	g_ptr_array_add(argv, "nbdkit");
	g_ptr_array_add(argv, "-s");
	g_ptr_array_add(argv, "--exit-with-parent");
	for (const char *const *a = args; *a; a++)
		g_ptr_array_add(argv, (char *)*a);
	g_ptr_array_add(argv, NULL);
	/* sv[1] is CLOEXEC, but dup2 onto 0/1 clears that on the copies. */
	if (!g_spawn_async(NULL, (char **)argv->pdata, NULL,
			   G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD |
				   G_SPAWN_CHILD_INHERITS_STDIN,
			   child_setup_fd, GINT_TO_POINTER(sv[1]), &k->pid, &err))
		g_error("spawn nbdkit: %s", err->message);
	close(sv[1]);
	k->fd = sv[0];
	return k;
}

static int free_port(void)
{
	struct sockaddr_in sin = { .sin_family = AF_INET,
				   .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), ==, 0);
	g_assert_cmpint(getsockname(fd, (struct sockaddr *)&sin, &len), ==, 0);
	close(fd);
	return ntohs(sin.sin_port);
}

struct nbdkit *nbdkit_start_tcp(const char *const *args)
{
	return nbdkit_start_unix_or_tcp(args, TRUE);
}

struct nbdkit *nbdkit_start_unix(const char *const *args)
{
	return nbdkit_start_unix_or_tcp(args, FALSE);
}

struct nbdkit *nbdkit_start_unix_or_tcp(const char *const *args, gboolean tcp)
{
	g_autoptr(GPtrArray) argv = g_ptr_array_new();
	g_autoptr(GError) err = NULL;
	struct nbdkit *k = g_new0(struct nbdkit, 1);

	k->fd = -1;
	k->dir = g_dir_make_tmp("nbdc-test-XXXXXX", &err);
	g_assert_no_error(err);
	k->socket = g_build_filename(k->dir, "sock", NULL);
	g_autofree char *pidfile = g_build_filename(k->dir, "pid", NULL);
	g_ptr_array_add(argv, "nbdkit");
	g_ptr_array_add(argv, "-P");
	g_ptr_array_add(argv, pidfile);
	g_ptr_array_add(argv, "-f");
	g_ptr_array_add(argv, "--exit-with-parent");
	g_autofree char *port = NULL;
	if (tcp) {
		k->port = free_port();
		port = g_strdup_printf("%d", k->port);
		g_ptr_array_add(argv, "-i");
		g_ptr_array_add(argv, "127.0.0.1");
		g_ptr_array_add(argv, "-p");
		g_ptr_array_add(argv, port);
	} else {
		g_ptr_array_add(argv, "-U");
		g_ptr_array_add(argv, k->socket);
	}
	for (const char *const *a = args; *a; a++)
		g_ptr_array_add(argv, (char *)*a);
	g_ptr_array_add(argv, NULL);
	if (!g_spawn_async(NULL, (char **)argv->pdata, NULL,
			   G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD, NULL, NULL, &k->pid,
			   &err))
		g_error("spawn nbdkit: %s", err->message);
	gint64 until = g_get_monotonic_time() + 20 * G_USEC_PER_SEC;
	/* nbdkit writes the pid file once it listens. */
	while (!g_file_test(pidfile, G_FILE_TEST_EXISTS)) {
		int status;
		if (waitpid(k->pid, &status, WNOHANG) == k->pid)
			g_error("nbdkit exited early (status %d)", status);
		if (g_get_monotonic_time() > until)
			g_error("nbdkit socket %s did not appear", k->socket);
		g_usleep(10000);
	}
	return k;
}

void nbdkit_stop(struct nbdkit *k)
{
	int status;

	if (!k)
		return;
	if (k->fd >= 0)
		close(k->fd);
	kill(k->pid, SIGTERM);
	while (waitpid(k->pid, &status, 0) < 0 && errno == EINTR)
		;
	g_spawn_close_pid(k->pid);
	if (k->socket) {
		g_autofree char *pidfile = g_build_filename(k->dir, "pid", NULL);

		unlink(k->socket);
		unlink(pidfile);
	}
	if (k->dir)
		rmdir(k->dir);
	g_free(k->socket);
	g_free(k->dir);
	g_free(k);
}
