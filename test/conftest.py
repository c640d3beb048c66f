"""Shared pytest fixtures: the build under test, real NBD servers, polling.

Every fixture owns its resource and releases it in `finally`: servers run with
--exit-with-parent and are killed by pid; nothing is left behind.
"""
import os
import shutil
import signal
import subprocess
import time

import pytest

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.environ.get("NBDFS_BUILD_DIR", os.path.join(SRC_DIR, "build"))


def build_path(*parts):
    """Path of a built artefact (e.g. build_path('src', 'nbdfs'))."""
    return os.path.join(BUILD_DIR, *parts)


def wait_for(cond, timeout=30.0, interval=0.02, what="condition"):
    """Polls cond() until it returns a true value; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def kill_and_wait(proc, sig=signal.SIGTERM, timeout=10):
    """Ends a process we started (by pid), escalating to SIGKILL."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)


class NbdServer:
    """A real NBD server process listening on a Unix socket (or TCP port)."""

    def __init__(self, proc, sock=None, port=None, export=""):
        self.proc = proc
        self.sock = sock
        self.port = port
        self.export = export

    def uri(self, export=None, scheme="nbd"):
        name = self.export if export is None else export
        if self.sock:
            return f"{scheme}+unix:///{name}?socket={self.sock}"
        return f"{scheme}://127.0.0.1:{self.port}/{name}"

    @property
    def pid(self):
        return self.proc.pid

    def kill(self, sig=signal.SIGKILL):
        return kill_and_wait(self.proc, sig)


def _free_tcp_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            port = _free_tcp_port()
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


def stop_all(procs):
    """Ends every server process a fixture started and closes its stderr pipe."""
    for p in procs:
        kill_and_wait(p)
        if p.stderr:
            p.stderr.close()


def pytest_report_header(config):
    return f"nbdfs build dir: {BUILD_DIR}"
