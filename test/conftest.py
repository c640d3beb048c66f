"""Fixtures shared by every suite: the build under test and real NBD servers.

Every fixture owns its resource and releases it in `finally`: servers run with
--exit-with-parent and are killed by pid; nothing is left behind.  Helpers
live in the nbdfs_test package; conftest files only define fixtures.
"""
import os
import shutil
import subprocess

import pytest

from nbdfs_test.build import BUILD_DIR
from nbdfs_test.polling import stop_all, wait_for
from nbdfs_test.servers import NbdServer, free_tcp_port


@pytest.fixture
def nbdkit(tmp_path):
    """Factory: nbdkit(*args, tcp=False, export="", sock=None) starts
    `nbdkit -f --exit-with-parent -U SOCK ARGS...` and waits until it listens.
    All servers are killed at teardown."""
    procs = []

    def start(*args, tcp=False, export="", sock=None, env=None):
        if shutil.which("nbdkit") is None:
            pytest.fail("nbdkit is not installed (contrib/test.sh installs it)")
        port = None
        if tcp:
            port = free_tcp_port()
            where = ["-i", "127.0.0.1", "-p", str(port)]
        else:
            sock = sock or str(tmp_path / f"nbdkit{len(procs)}.sock")
            where = ["-U", sock]
        # nbdkit writes its pid file only once it accepts connections (the
        # socket file appears a moment earlier), so readiness is the pid file.
        pidfile = str(tmp_path / f"nbdkit{len(procs)}.pid")
        cmd = (["nbdkit", "-f", "--exit-with-parent", "-P", pidfile] + where
               + [str(a) for a in args])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)
        procs.append(proc)
        srv = NbdServer(proc, sock=None if tcp else sock, port=port, export=export)

        def ready():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")
                pytest.fail(f"nbdkit exited ({proc.returncode}): {' '.join(cmd)}\n{err}")
            return os.path.exists(pidfile) and os.path.getsize(pidfile) > 0

        wait_for(ready, timeout=30, what=f"nbdkit to listen ({' '.join(cmd)})")
        return srv

    try:
        yield start
    finally:
        stop_all(procs)


def pytest_report_header(config):
    return f"nbdfs build dir: {BUILD_DIR}"
