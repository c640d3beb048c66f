"""Smoke tests of the nbdfs command line (engineer DAEMON): -o options, TLS,
name escaping, mount.fuse3 and fstab, -d, server loss.  Fixtures come from
test/e2e/conftest.py."""
import errno
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from nbdfs_test.data import MiB, errno_of, getx, read_file
from nbdfs_test.mounts import find_daemon_pids, is_mounted
from nbdfs_test.polling import kill_and_wait, run, wait_for, wait_pid_exit
from nbdfs_test.servers import free_tcp_port


def test_daemon_ownership_options(server, mount):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), opts=["-o", "uid=1234,gid=567,umask=027"])
    st = os.stat(m / "disk")
    assert (st.st_uid, st.st_gid) == (1234, 567)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert stat.S_IMODE(os.stat(m.path).st_mode) == 0o750


def test_daemon_sector_size_and_connections(server, mount):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), opts=["-o", "sector_size=4096,connections=2,timeout=5"])
    assert getx(m / "disk", "user.nbdfs.sector_size") == "4096"
    assert getx(m / "disk", "user.nbdfs.sectors") == str(MiB // 4096)
    fd = os.open(m / "disk", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"abc", 5000) == 3       # read-modify-write of a 4K sector
        assert os.pread(fd, 5, 4999) == b"\0abc\0"
    finally:
        os.close(fd)


def test_daemon_bad_option_one_line(server, mount):
    srv = server("memory", "1M", log=False)
    for opts in (["-o", "bogus"], ["-o", "sector_size=1000"], ["-o", "split=nocolon"]):
        m = mount(srv.uri(), opts=opts, check=False, pidfile=False)
        assert m.rc != 0
        lines = [l for l in m.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("nbdfs: "), m.stderr
        assert not is_mounted(m.path)


def test_daemon_name_escaping(server, mount):
    srv = server("--filter=exportname", "memory", "1M", "exportname=a/b", "exportname=.",
                 "exportname=100%", "exportname-list=explicit", log=False)
    m = mount(srv.uri(), opts=["-a"])
    assert m.files() == ["%2E", "100%25", "a%2Fb"]
    assert getx(m / "a%2Fb", "user.nbdfs.export") == "a/b"
    m2 = mount(f"mine={srv.uri(export='a/b')}")
    assert m2.files() == ["mine"]


def test_daemon_tls_psk(server, mount, tmp_path):
    keys = tmp_path / "keys.psk"
    run(["psktool", "-u", "alice", "-p", keys])
    srv = server("memory", "1M", extra=["--tls=require", f"--tls-psk={keys}"], log=False)
    uri = srv.uri(scheme="nbds").replace("nbds+unix:///", "nbds+unix://alice@/")
    m = mount(uri, opts=["-o", f"tls-psk={keys}"])
    assert os.stat(m / "disk").st_size == MiB
    assert "keys.psk" not in getx(m / "disk", "user.nbdfs.uri")
    # TLS refused (no TLS asked of a server that requires it): one line, nothing mounted
    bad = mount(srv.uri(), check=False, pidfile=False)
    assert bad.rc != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not is_mounted(bad.path)


def test_daemon_mount_fuse3_and_fstab(server, nbdfs_bin, tmp_path, e2e_stack):
    srv = server("memory", "1M", log=False)
    mnt = tmp_path / "m"
    mnt.mkdir()

    def cleanup():
        pids = find_daemon_pids(nbdfs_bin, str(mnt))
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], timeout=60)
        for pid in pids:
            wait_pid_exit(pid, 60)
    e2e_stack.push("mount.fuse3 mount", cleanup)
    env = dict(os.environ, PATH=os.path.dirname(nbdfs_bin) + ":" + os.environ["PATH"])
    # mount.fuse3 is what `mount -t fuse.nbdfs` runs
    run(["mount.fuse3", srv.uri(), mnt, "-t", "fuse.nbdfs", "-o",
         "ro,split=disk:100,nofail,_netdev"], env=env)
    assert is_mounted(mnt)
    assert sorted(os.listdir(mnt)) == ["disk", "disk-part1", "disk-part2"]
    assert errno_of(os.open, mnt / "disk", os.O_RDWR) == errno.EROFS
    pids = find_daemon_pids(nbdfs_bin, str(mnt))
    run(["umount", mnt])
    for pid in pids:
        assert wait_pid_exit(pid, 60)
    # fstab through mount(8): the PROGRAM#SOURCE form needs no PATH
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{nbdfs_bin}#{srv.uri()} {mnt} fuse split=disk:10,nofail 0 0\n")
    run(["mount", "-T", fstab, str(mnt)])
    assert sorted(os.listdir(mnt)) == ["disk", "disk-part1", "disk-part2"]
    pids = find_daemon_pids(nbdfs_bin, str(mnt))
    run(["umount", mnt])
    for pid in pids:
        assert wait_pid_exit(pid, 60)
    assert not is_mounted(mnt)


def test_daemon_debug_logs_requests(server, mount):
    srv = server("memory", "1M", log=False)
    m = mount(srv.uri(), opts=["-d"], foreground=True)
    read_file(m / "disk", 0, 4096)
    assert m.unmount() == 0
    log = m.log()
    assert "READ" in log and "DISC" in log, log


def test_daemon_server_loss(server, mount, tmp_path):
    sock = tmp_path / "lost.sock"
    srv = server("memory", "4M", log=False, sock=sock)
    m = mount(srv.uri(), opts=["-o", "timeout=2"], foreground=True)
    assert read_file(m / "disk", 0, 4096) == b"\0" * 4096
    srv.kill()
    t0 = time.monotonic()
    fd = os.open(m / "disk", os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        e = errno_of(os.preadv, fd, [buf], 2 * MiB)
    finally:
        os.close(fd)
    assert e == errno.EIO
    assert time.monotonic() - t0 < 30
    # unmount always works, the daemon ends
    assert m.unmount(timeout=60) is not None
    assert not is_mounted(m.path)
