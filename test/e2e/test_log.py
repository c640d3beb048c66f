# SPDX-License-Identifier: LGPL-2.1-or-later
"""SPEC §2, --log=stderr|syslog|FILE: messages never vanish without a word.
A FILE (opened before nbdfs detaches, relative paths from the caller's
directory) gets one timestamped line per message, including the warnings of
a server that dies under a background daemon; when syslog is the log and
/dev/log cannot be reached nbdfs says so before it detaches; syslog gets the
messages when it can be reached; --log=stderr keeps the caller's stderr."""
import os
import re
import socket
import subprocess

import pytest

from nbdfs_test.mounts import is_mounted
from nbdfs_test.polling import wait_for

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d nbdfs\[(\d+)\]: (.*)$")


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _lose_server_and_read(srv, m):
    """Kills the server, then reads the export file with O_DIRECT (under
    -o timeout=1 the read fails with EIO within seconds)."""
    srv.kill()
    r = subprocess.run(["dd", f"if={m / 'disk'}", "of=/dev/null", "bs=4096", "count=1",
                        "iflag=direct"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    assert r.returncode != 0, "a read from a dead server succeeded"
    assert b"Input/output error" in r.stderr, r.stderr


def test_log_file_in_the_background_gets_the_warning_when_the_server_dies(server, mount,
                                                                          tmp_path):
    srv = server("memory", "1M", log=False)
    logf = tmp_path / "nbdfs.log"
    m = mount(srv.uri(), opts=[f"--log={logf}", "-o", "timeout=1"])
    wait_for(lambda: "mounted " in _read(logf), timeout=30, what="the 'mounted' line in the log")
    _lose_server_and_read(srv, m)
    wait_for(lambda: re.search(r"warning: .*" + re.escape(srv.uri()), _read(logf)), timeout=30,
             what="a warning naming the server in the log file")
    m.unmount()
    text = _read(logf)
    lines = text.splitlines()
    assert text.endswith("\n")
    for line in lines:
        mt = LINE.match(line)
        assert mt, f"not a log line: {line!r}"
        assert int(mt.group(1)) == m.pid
    assert any(l.endswith(f"unmounted {m.path}") for l in lines), text
    # after start-up the daemon's messages went to the file only
    assert "warning" not in m.log(), m.log()


def test_log_file_relative_to_the_callers_directory(server, mount, nbdfs_bin, tmp_path):
    srv = server("memory", "1M", log=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pidf = tmp_path / "pid"
    r = subprocess.run([nbdfs_bin, "--log", "rel.log", "--pidfile", str(pidf), srv.uri(),
                        str(mnt)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    m = mount.adopt(mnt, pid=int(pidf.read_text()) if pidf.exists() else None)
    assert r.returncode == 0, r.stderr
    # the daemon has changed to / by now: the file is still the caller's rel.log
    wait_for(lambda: "mounted " in _read(tmp_path / "rel.log"), timeout=30,
             what="the 'mounted' line in ./rel.log")
    m.unmount()
    assert "unmounted" in _read(tmp_path / "rel.log")


def test_log_file_that_cannot_be_opened_fails_the_start(server, mount, tmp_path):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), opts=[f"--log={tmp_path}/no/such/dir/x.log"], check=False,
              pidfile=False)
    assert m.rc != 0
    lines = m.stderr.strip().splitlines()
    assert len(lines) == 1 and "--log=" in lines[0] and "No such file" in lines[0], m.stderr
    assert not is_mounted(m.path)


def test_log_stderr_in_the_background_keeps_the_callers_stderr(server, mount):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), opts=["--log=stderr", "-o", "timeout=1"])
    _lose_server_and_read(srv, m)
    wait_for(lambda: "warning: " in m.log(), timeout=30, what="a warning on the kept stderr")


def _syslog_reachable():
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            with socket.socket(socket.AF_UNIX, kind) as s:
                s.connect("/dev/log")
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("opts", [[], ["--log=syslog"], ["--log=syslog", "-f"]],
                         ids=["background default", "background --log=syslog",
                              "foreground --log=syslog"])
def test_unreachable_syslog_is_said_before_detaching(server, mount, opts):
    srv = server("memory", "1M", log=False)
    fg = "-f" in opts
    m = mount(srv.uri(), opts=[o for o in opts if o != "-f"], foreground=fg)
    said = [l for l in m.log().splitlines() if "syslog cannot be reached" in l]
    if _syslog_reachable():
        assert not said, m.log()
    else:
        assert len(said) == 1 and "/dev/log" in said[0] and "--log=FILE" in said[0], m.log()
        assert said[0].startswith("nbdfs: warning: ")
    assert m.files() == ["disk"]


@pytest.fixture
def dev_log():
    """A syslog socket of our own at /dev/log, where none exists (containers):
    yields the bound datagram socket; removed at teardown."""
    if os.path.lexists("/dev/log"):
        pytest.skip("/dev/log belongs to this machine's syslog")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind("/dev/log")
    except OSError as e:
        s.close()
        pytest.skip(f"cannot bind /dev/log: {e}")
    try:
        yield s
    finally:
        s.close()
        os.unlink("/dev/log")


def _recv_until(sock, pred, timeout, what):
    import select
    import time
    deadline = time.monotonic() + timeout
    got = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; got {got}")
        if select.select([sock], [], [], left)[0]:
            msg = sock.recv(65536).decode(errors="replace")
            got.append(msg)
            if pred(msg):
                return msg


def test_syslog_gets_the_daemons_messages(server, mount, dev_log):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), opts=["-o", "timeout=1"])
    assert "syslog" not in m.log(), m.log()
    # glibc's format: <PRI>TIMESTAMP nbdfs[PID]: MESSAGE, facility daemon (3)
    ours = re.compile(r"^<(\d+)>.* nbdfs\[%d\]: (.*)$" % m.pid, re.S)
    msg = _recv_until(dev_log, lambda x: ours.match(x) and "mounted " in x, 30,
                      "'mounted' on /dev/log")
    assert int(ours.match(msg).group(1)) == 3 * 8 + 6  # daemon.info
    _lose_server_and_read(srv, m)
    msg = _recv_until(dev_log, lambda x: ours.match(x) and "warning: " in x, 30,
                      "a warning on /dev/log")
    assert int(ours.match(msg).group(1)) == 3 * 8 + 4  # daemon.warning
