# SPDX-License-Identifier: LGPL-2.1-or-later
"""SPEC §2, systemd's notify protocol (the unit is Type=notify): with
$NOTIFY_SOCKET set, nbdfs sends READY=1 only once the mount is usable (the
test lists it the moment READY arrives) and STOPPING=1 when it stops, as one
datagram each, to a socket path or an abstract name ('@...'); from the
background daemon READY=1 names its pid (MAINPID=)."""
import os
import select
import signal
import socket
import subprocess
import time
import uuid

import pytest

from nbdfs_test.mounts import is_mounted
from nbdfs_test.polling import kill_and_wait


class NotifySocket:
    """A datagram socket bound where $NOTIFY_SOCKET will point."""

    def __init__(self, abstract):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"nbdfs-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if abstract:
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
            self.path = None
        else:
            # short: sun_path holds 108 bytes, pytest's tmp_path may not fit
            self.path = f"/tmp/{name}.sock"
            self.sock.bind(self.path)
            self.env_value = self.path

    def env(self):
        return dict(os.environ, NOTIFY_SOCKET=self.env_value)

    def recv(self, timeout=30, what="a notification"):
        """The next datagram; fails the test at the deadline."""
        deadline = time.monotonic() + timeout
        left = deadline - time.monotonic()
        if not select.select([self.sock], [], [], max(left, 0))[0]:
            pytest.fail(f"no {what} on $NOTIFY_SOCKET within {timeout}s")
        return self.sock.recv(4096).decode()

    def close(self):
        self.sock.close()
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify(request):
    ns = NotifySocket(request.param)
    try:
        yield ns
    finally:
        ns.close()


def _ls(path):
    r = subprocess.run(["ls", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().split()


def test_ready_once_the_files_are_visible_and_stopping_on_sigterm(server, mount, nbdfs_bin,
                                                                  notify, tmp_path):
    # a server that answers slowly, so the mount takes a while to be ready
    srv = server("--filter=delay", "memory", "1M", "delay-open=500ms", log=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(tmp_path / "nbdfs.err", "wb") as err:
        proc = subprocess.Popen([nbdfs_bin, "-f", srv.uri(), str(mnt)], stdin=subprocess.DEVNULL,
                                stdout=err, stderr=err, env=notify.env())
    m = mount.adopt(mnt, pid=proc.pid)
    try:
        msg = notify.recv(what="READY=1")
        # the moment READY arrives the mount is there and lists its files
        assert is_mounted(mnt), "READY=1 before the mount"
        assert msg == "READY=1", msg
        assert _ls(mnt) == ["disk"]
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(what="STOPPING=1") == "STOPPING=1"
        assert proc.wait(timeout=60) == 0
        assert not is_mounted(mnt)
    finally:
        kill_and_wait(proc)
    assert m.path == str(mnt)


def test_ready_from_the_background_names_the_daemon_and_stopping_on_unmount(server, mount,
                                                                             notify):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), env=notify.env())
    msg = notify.recv(what="READY=1")
    assert msg.split("\n") == ["READY=1", f"MAINPID={m.pid}"], msg
    m.unmount()
    assert notify.recv(what="STOPPING=1") == "STOPPING=1"


def test_nothing_sent_before_ready_when_start_up_fails(mount, notify, tmp_path):
    m = mount(f"nbd+unix:///?socket={tmp_path}/none.sock", env=notify.env(), check=False,
              pidfile=False)
    assert m.rc != 0
    assert not select.select([notify.sock], [], [], 0.2)[0], "a notification for a failed start"


def test_unusable_notify_socket_does_not_stop_the_mount(server, mount, tmp_path):
    srv = server("memory", "1M", log=False)
    for value in (f"{tmp_path}/nobody-listens.sock", "relative/path", "vsock:2:1234"):
        m = mount(srv.uri(), env=dict(os.environ, NOTIFY_SOCKET=value))
        assert m.files() == ["disk"]
        assert m.log() == "" or "syslog" in m.log(), m.log()
        m.unmount()
