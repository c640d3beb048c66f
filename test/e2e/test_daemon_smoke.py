"""Smoke tests of the nbdfs daemon (engineer DAEMON): one test per SPEC row
the daemon owns, small and fast.  The broad acceptance suite is the rest of
test/e2e/.  Fixtures (server, mount, ...) come from test/e2e/conftest.py."""
import errno
import os
import signal
import stat
import subprocess
import time

import pytest

from nbdfs_test.data import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, MiB,
                             errno_of, fallocate, getx, nbd_read, pattern_bytes, read_file,
                             set_partition)
from nbdfs_test.mounts import is_mounted
from nbdfs_test.polling import kill_and_wait, wait_for, wait_pid_exit
from nbdfs_test.servers import free_tcp_port


def _pwrite(path, off, data, flags=0):
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        return os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def test_daemon_rw_stat(server, mount):
    srv = server("memory", "8M", log=False)
    m = mount(srv.uri())
    assert m.files() == ["disk"]
    st = os.stat(m / "disk")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_size == 8 * MiB
    assert st.st_blksize == 4096
    assert st.st_uid == os.getuid()
    data = os.urandom(100000)
    assert _pwrite(m / "disk", 12345, data) == len(data)
    assert read_file(m / "disk", 12345, len(data)) == data
    assert nbd_read(srv.uri(), 12345, len(data)) == data
    # stable times
    assert os.stat(m / "disk").st_mtime == st.st_mtime
    assert m.unmount() is None
    assert not is_mounted(m.path)


def test_daemon_io_semantics(server, mount):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri())
    f = m / "disk"
    size = MiB
    # write at/past end: ENOSPC; straddling: short
    assert errno_of(_pwrite, f, size, b"x") == errno.ENOSPC
    assert _pwrite(f, size - 3, b"abcdef") == 3
    assert read_file(f, size - 3) == b"abc"
    # read past the end: 0 bytes
    assert read_file(f, size + 10, 10) == b""
    # O_TRUNC, truncate and ftruncate are accepted and ignored
    with open(f, "r+b") as fh:
        fh.write(b"hello")
    with open(f, "wb") as fh:
        fh.write(b"HELLO")
    assert os.stat(f).st_size == size
    assert read_file(f, 0, 5) == b"HELLO"
    os.truncate(f, 0)
    assert os.stat(f).st_size == size
    assert read_file(f, size - 3) == b"abc"
    # fsync / fdatasync / O_SYNC / O_DSYNC
    fd = os.open(f, os.O_RDWR | os.O_SYNC)
    try:
        assert os.pwrite(fd, b"sync", 4096) == 4
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert nbd_read(srv.uri(), 4096, 4) == b"sync"
    # O_DIRECT
    import mmap
    buf = mmap.mmap(-1, 8192)
    buf.write(b"D" * 8192)
    fd = os.open(f, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], 65536) == 8192
        rb = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [rb], 65536) == 8192
        assert rb[:] == b"D" * 8192
    finally:
        os.close(fd)
    # fallocate: punch hole and zero range read back as zeros; others EOPNOTSUPP
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, b"\xff" * 16384, 131072)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 131072, 4096)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 131072 + 8192, 100)
        assert errno_of(fallocate, fd, 0, 0, 4096) == errno.EOPNOTSUPP
        got = os.pread(fd, 16384, 131072)
        assert got[:4096] == b"\0" * 4096
        assert got[4096:8192] == b"\xff" * 4096
        assert got[8192:8292] == b"\0" * 100
        assert got[8292:] == b"\xff" * (16384 - 8292)
    finally:
        os.close(fd)
    assert m.unmount() is None


def test_daemon_seek_data_hole(server, mount):
    srv = server("memory", "4M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    f = m / "disk"
    _pwrite(f, 2 * MiB, b"x" * 4096)
    fd = os.open(f, os.O_RDONLY)
    try:
        # nbdkit memory allocates 32 KiB pages
        assert os.lseek(fd, 0, os.SEEK_DATA) == 2 * MiB
        assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 2 * MiB + 32768
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert errno_of(os.lseek, fd, 2 * MiB + 32768, os.SEEK_DATA) == errno.ENXIO
        assert errno_of(os.lseek, fd, 4 * MiB, os.SEEK_DATA) == errno.ENXIO
    finally:
        os.close(fd)
    fd = os.open(m / "disk-part2", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + 32768
    finally:
        os.close(fd)


def test_daemon_read_only(server, mount):
    # a read-only export is read-only anyway
    ro_srv = server("-r", "memory", "1M", log=False)
    m = mount(ro_srv.uri())
    assert stat.S_IMODE(os.stat(m / "disk").st_mode) == 0o444
    assert errno_of(os.open, m / "disk", os.O_WRONLY) == errno.EROFS
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), opts=["-o", "ro"])
    st = os.stat(m / "disk")
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert errno_of(os.open, m / "disk", os.O_RDWR) == errno.EROFS
    # partitioning is allowed on a read-only mount
    set_partition(m / "disk", "100")
    assert sorted(m.files()) == ["disk", "disk-part1", "disk-part2"]


def test_daemon_partitions_auto_and_split(server, mount, tmp_path):
    a = tmp_path / "a.img"
    b = tmp_path / "b.img"
    a.write_bytes(os.urandom(MiB))
    b.write_bytes(os.urandom(2 * MiB))
    srv = server("partitioning", a, b, "partition-type=mbr", log=False)
    m = mount(srv.uri(), opts=["-P"])
    assert m.files() == ["disk", "disk-part1", "disk-part2"]
    assert read_file(m / "disk-part1") == a.read_bytes()
    assert read_file(m / "disk-part2") == b.read_bytes()
    assert getx(m / "disk", "user.nbdfs.partition") == "mbr"
    assert getx(m / "disk-part1", "user.nbdfs.type") == "0x83"
    start = int(getx(m / "disk-part2", "user.nbdfs.start"))
    assert int(getx(m / "disk-part2", "user.nbdfs.sectors")) == 2 * MiB // 512
    assert getx(m / "disk-part2", "user.nbdfs.sector_size") == "512"
    assert "user.nbdfs.uri" in os.listxattr(m / "disk-part2")
    # split a partition file, nested names, offsets
    set_partition(m / "disk-part2", "1024")
    assert getx(m / "disk-part2", "user.nbdfs.partition") == "split:1024"
    assert "disk-part2-part2" in m.files()
    assert int(getx(m / "disk-part2-part2", "user.nbdfs.start")) == start + 1024
    assert read_file(m / "disk-part2-part2") == b.read_bytes()[512 * 1024:]
    # EBUSY while a partition below is open, checked first
    with open(m / "disk-part2-part1", "rb"):
        assert errno_of(set_partition, m / "disk", "none") == errno.EBUSY
        assert errno_of(set_partition, m / "disk", "garbage") == errno.EBUSY
    # EINVAL: malformed, beyond the end, no table
    assert errno_of(set_partition, m / "disk", "garbage") == errno.EINVAL
    assert errno_of(set_partition, m / "disk-part1", "999999") == errno.EINVAL
    assert errno_of(set_partition, m / "disk-part1", "auto") == errno.EINVAL
    # read-only attributes
    assert errno_of(os.setxattr, m / "disk", "user.nbdfs.start", b"1") in (errno.EPERM,
                                                                           errno.EACCES)
    assert errno_of(os.getxattr, m / "disk", "user.nbdfs.nonesuch") == errno.ENODATA
    # none removes, auto rescans
    set_partition(m / "disk", "none")
    assert m.files() == ["disk"]
    set_partition(m / "disk", "auto")
    assert m.files() == ["disk", "disk-part1", "disk-part2"]


def test_daemon_split_at_mount(server, mount):
    srv = server("pattern", "1M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:1000", "-o", "split=disk-part2:24"])
    assert m.files() == ["disk", "disk-part1", "disk-part2", "disk-part2-part1",
                         "disk-part2-part2"]
    assert os.stat(m / "disk-part1").st_size == 1000 * 512
    assert read_file(m / "disk-part2-part2", 0, 64) == pattern_bytes(1024 * 512, 64)


def test_daemon_alias_coherence(server, mount):
    srv = server("memory", "2M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    whole = os.open(m / "disk", os.O_RDWR)
    part = os.open(m / "disk-part2", os.O_RDWR)
    try:
        # both cached
        assert os.pread(whole, 4096, MiB) == b"\0" * 4096
        assert os.pread(part, 4096, 0) == b"\0" * 4096
        os.pwrite(part, b"P" * 4096, 0)
        assert os.pread(whole, 4096, MiB) == b"P" * 4096
        os.pwrite(whole, b"W" * 100, MiB + 10)
        assert os.pread(part, 200, 0) == b"P" * 10 + b"W" * 100 + b"P" * 90
    finally:
        os.close(whole)
        os.close(part)


def test_daemon_list(server, nbdfs_bin):
    srv = server("--filter=exportname", "memory", "1M", "exportname=alpha",
                 "exportname=beta", "exportname-list=explicit", log=False)
    r = subprocess.run([nbdfs_bin, "--list", srv.uri()], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split() == ["alpha", "beta"]
    r = subprocess.run([nbdfs_bin, "--list", "--long", srv.uri()], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[0].startswith("alpha")
    assert str(MiB) in lines[0]


def test_daemon_list_failures(server, nbdfs_bin, tmp_path):
    old = server("memory", "1M", extra=["-o"], log=False)
    r = subprocess.run([nbdfs_bin, "--list", old.uri()], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 2, r.stderr
    assert b"too old" in r.stderr
    r = subprocess.run([nbdfs_bin, "--list", f"nbd+unix:///?socket={tmp_path}/none"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr


def test_daemon_all_exports(server, mount):
    srv = server("--filter=exportname", "memory", "1M", "exportname=alpha",
                 "exportname=beta", "exportname-list=explicit", log=False)
    m = mount(srv.uri(), opts=["-a"])
    assert m.files() == ["alpha", "beta"]


def test_daemon_startup_failures(server, mount, tmp_path):
    missing = tmp_path / "no-such-socket"
    cases = [
        ("nbd://", None),
        (f"nbd+unix:///?socket={missing}", None),
    ]
    for src, _ in cases:
        m = mount(src, check=False, pidfile=False)
        assert m.rc != 0
        lines = [l for l in m.stderr.splitlines() if l.strip()]
        assert len(lines) == 1, m.stderr
        assert lines[0].startswith("nbdfs: ") and src in lines[0]
        assert not is_mounted(m.path)
    # missing mountpoint
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), mnt=tmp_path / "nonexistent", check=False, pidfile=False)
    assert m.rc != 0 and "nonexistent" in m.stderr
    # two sources, one name
    m = mount(srv.uri(), srv.uri(), check=False, pidfile=False)
    assert m.rc != 0
    assert m.stderr.count(srv.uri()) >= 2, m.stderr
    assert not is_mounted(m.path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_sigterm_exit_0(server, mount, sig):
    srv = server("memory", "1M", verbose=True, log=False)
    m = mount(srv.uri(), foreground=True)
    _pwrite(m / "disk", 0, b"bye")
    m.proc.send_signal(sig)
    assert m.proc.wait(timeout=60) == 0, m.log()
    assert not is_mounted(m.path)
    wait_for(lambda: srv.disc_count() >= 1, timeout=30, what="NBD_CMD_DISC")
    assert nbd_read(srv.uri(), 0, 3) == b"bye"


def test_daemon_background_ready_and_pidfile(server, mount):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri())
    # ready when nbdfs returned: the file is there, the pidfile names the daemon
    assert os.path.exists(m / "disk")
    assert m.pid and m.pid != os.getpid()
    os.kill(m.pid, signal.SIGTERM)
    assert wait_pid_exit(m.pid, 60)
    wait_for(lambda: not is_mounted(m.path), timeout=30, what="unmount after SIGTERM")


def test_daemon_list_refused_by_policy(nbdfs_bin, tmp_path):
    img = tmp_path / "img"
    img.write_bytes(b"\0" * MiB)
    port = free_tcp_port()
    conf = tmp_path / "nbd-server.conf"
    conf.write_text("[generic]\n    listenaddr = 127.0.0.1\n    port = %d\n    allowlist = false\n"
                    "[disk]\n    exportname = %s\n" % (port, img))
    errf = open(tmp_path / "nbd-server.err", "wb")
    p = subprocess.Popen(["nbd-server", "-C", str(conf), "-d"], stdin=subprocess.DEVNULL,
                         stdout=errf, stderr=errf, start_new_session=True)
    errf.close()
    try:
        def up():
            # listening (state 0A), without connecting: nbd-server -d serves
            # one client at a time and a probe would confuse it
            with open("/proc/net/tcp") as f:
                return any(l.split()[1].endswith(":%04X" % port) and l.split()[3] == "0A"
                           for l in f.readlines()[1:])
        wait_for(up, timeout=30, what="nbd-server to listen")
        r = subprocess.run([nbdfs_bin, "--list", f"nbd://127.0.0.1:{port}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        assert r.returncode == 2, r.stderr
        assert b"refused by policy" in r.stderr
    finally:
        kill_and_wait(p)


def test_daemon_fua_flush_on_close(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    srv.log.clear()
    fd = os.open(m / "disk", os.O_WRONLY | os.O_DSYNC)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
    finally:
        os.close(fd)
    writes = srv.log.requests("Write")
    assert writes and all(w.get("fua") == 1 for w in writes), srv.log.text()
    srv.log.clear()
    fd = os.open(m / "disk", os.O_WRONLY)
    try:
        os.pwrite(fd, b"b" * 4096, 8192)
        assert not srv.log.requests("Flush")
    finally:
        os.close(fd)          # flush on close after writes
    assert srv.log.requests("Flush"), srv.log.text()
    srv.log.clear()
    with open(m / "disk", "rb") as f:
        f.read(10)
    assert not srv.log.requests("Flush")   # no writes, no flush


def test_daemon_alias_concurrent_writes(server, mount):
    """Overlapping writes through an export and its partitions at once: no
    deadlock between the invalidations, and the aliases agree afterwards."""
    import threading
    srv = server("memory", "4M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048", "-o", "split=disk-part2:1024"])
    stop = time.monotonic() + 2
    errors = []

    def writer(name, base, tag):
        fd = os.open(m / name, os.O_RDWR)
        try:
            while time.monotonic() < stop:
                for off in range(0, 65536, 4096):
                    os.pwrite(fd, bytes([tag]) * 6000, base + off)
                os.pread(fd, 65536, base)
        except OSError as e:
            errors.append(e)
        finally:
            os.close(fd)

    ts = [threading.Thread(target=writer, args=a) for a in
          (("disk", MiB, 65), ("disk-part2", 0, 66), ("disk", MiB + 1000, 67),
           ("disk-part2-part1", 500, 68))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not any(t.is_alive() for t in ts), "writers hung"
    assert not errors
    a = os.open(m / "disk", os.O_RDWR)
    b = os.open(m / "disk-part2", os.O_RDWR)
    try:
        os.pread(a, 65536, MiB)
        os.pread(b, 65536, 0)
        os.pwrite(b, b"Z" * 65536, 0)
        assert os.pread(a, 65536, MiB) == b"Z" * 65536
        os.pwrite(a, b"Y" * 65536, MiB)
        assert os.pread(b, 65536, 0) == b"Y" * 65536
    finally:
        os.close(a)
        os.close(b)
