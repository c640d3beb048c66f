"""SPEC §2 `timeout` and §5 "server gone": requests wait up to `timeout` while
nbdfs reconnects, then fail with EIO; timeout=0 fails at once; a server back
on the same socket in time serves the waiting request; a slow server is not
an unreachable one; unmount always works; waits on a dead server run side by
side and never hold up metadata (also on a silent server)."""
import errno
import os
import signal
import subprocess
import time

import pytest

from nbdfs_test.data import MiB, direct_pread, getx, nbd_read, read_file, timed
from nbdfs_test.mounts import is_mounted
from nbdfs_test.polling import wait_for, wait_pid_exit
from nbdfs_test.threads import READS, Call, bounded


def _mounted(random_export, mount, size, timeout):
    """A random export of @size, mounted with -o timeout=@timeout; its first
    4 KiB read back.  Returns (server, image, data, mount)."""
    srv, img, data = random_export(size)
    m = mount(srv.uri(), opts=["-o", f"timeout={timeout}"])
    assert direct_pread(m / "disk", 0, 4096) == data[:4096]
    return srv, img, data, m


def test_server_gone_read_fails_eio_after_timeout(random_export, mount):
    srv, img, data, m = _mounted(random_export, mount, 4 * MiB, 2)
    t_kill = time.monotonic()
    srv.kill()
    r, e, dt = timed(lambda: direct_pread(m / "disk", MiB, 4096))
    # the server has been unreachable for (about) the timeout when the read
    # fails, whether nbdfs starts counting at the loss or at the request
    since_kill = time.monotonic() - t_kill
    assert e == errno.EIO, (r, e)
    assert since_kill >= 1.5, f"failed {since_kill:.2f}s after the server died, timeout=2"
    assert dt < 60, f"took {dt:.1f}s"
    # writes too
    fd = os.open(m / "disk", os.O_WRONLY)
    try:
        r, e, dt = timed(lambda: os.pwrite(fd, b"w" * 4096, 8192))
        if e is None:      # accepted into a cache? then the flush must fail
            r, e, dt = timed(lambda: os.fsync(fd))
        assert e == errno.EIO
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def test_timeout_0_fails_at_once(random_export, mount):
    srv, img, data, m = _mounted(random_export, mount, 4 * MiB, 0)
    srv.kill()
    r, e, dt = timed(lambda: direct_pread(m / "disk", 2 * MiB, 4096))
    assert e == errno.EIO, (r, e)
    assert dt < 10, f"timeout=0 waited {dt:.1f}s"


def test_server_back_in_time_pending_read_succeeds(server, random_export, mount):
    srv, img, data, m = _mounted(random_export, mount, 4 * MiB, 30)
    sock = srv.sock
    srv.kill()
    read = Call(direct_pread, m / "disk", 3 * MiB, 8192, name="the pending read").start()
    read.wait_blocked_in(*READS, timeout=20)
    srv2 = server("file", img, log=False, sock=sock)
    read.join(60)
    assert read.errno is None, f"pending read failed with errno {read.errno}"
    assert read.value == data[3 * MiB:3 * MiB + 8192]
    # and the mount goes on working
    assert read_file(m / "disk", 100, 100) == data[100:200]
    with open(m / "disk", "r+b") as f:
        f.seek(5000)
        f.write(b"after reconnect")
    assert nbd_read(srv2.uri(), 5000, 15) == b"after reconnect"


def test_recovers_after_a_failed_request(server, random_export, mount):
    srv, img, data = random_export(4 * MiB)
    sock = srv.sock
    m = mount(srv.uri(), opts=["-o", "timeout=1"])
    srv.kill()
    r, e, dt = timed(lambda: direct_pread(m / "disk", MiB, 4096))
    assert e == errno.EIO
    server("file", img, log=False, sock=sock)

    def ok():
        try:
            return direct_pread(m / "disk", 2 * MiB, 4096) == data[2 * MiB:2 * MiB + 4096]
        except OSError:
            return False
    wait_for(ok, timeout=30, what="I/O to work again after the server came back")


def test_slow_server_is_not_unreachable(server, mount):
    srv = server("--filter=delay", "pattern", "1M", "delay-read=3", log=False)
    m = mount(srv.uri(), opts=["-o", "timeout=1"])
    from nbdfs_test.data import pattern_bytes
    r, e, dt = timed(lambda: direct_pread(m / "disk", 65536, 4096))
    assert e is None, f"slow read failed with errno {e}"
    assert r == pattern_bytes(65536, 4096)


def test_unmount_works_with_server_gone(random_export, mount):
    srv, img, data = random_export(4 * MiB)
    # (with the default timeout of 60 s the daemon may spend 60 s on its last
    # flush before exiting; 10 s keeps the test short, the rule is the same)
    m = mount(srv.uri(), opts=["-o", "timeout=10"])
    with open(m / "disk", "r+b") as f:
        f.write(b"x" * 100)
    srv.kill()
    t0 = time.monotonic()
    r = subprocess.run(["fusermount3", "-u", m.path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert not is_mounted(m.path)
    assert wait_pid_exit(m.pid, 90), "nbdfs still running 90 s after unmount"
    assert time.monotonic() - t0 < 120


def test_sigterm_works_with_server_gone(random_export, mount):
    srv, img, data = random_export(4 * MiB)
    m = mount(srv.uri(), opts=["-o", "timeout=3"], foreground=True)
    srv.kill()
    m.proc.send_signal(signal.SIGTERM)
    m.wait_exit(60)
    assert not is_mounted(m.path)


def test_server_gone_at_mount_fails_at_once(tmp_path, mount):
    """Start-up is not the place to wait: an absent server fails the mount."""
    sock = tmp_path / "absent.sock"
    t0 = time.monotonic()
    m = mount(f"nbd+unix:///?socket={sock}", check=False)
    assert m.rc != 0 and not is_mounted(m.path)
    assert time.monotonic() - t0 < 60


def test_many_pending_requests_survive_a_restart(server, random_export, mount):
    srv, img, data, m = _mounted(random_export, mount, 8 * MiB, 30)
    sock = srv.sock
    srv.kill()
    reads = [Call(direct_pread, m / "disk", MiB + i * 65536, 65536, name=f"read {i}").start()
             for i in range(8)]
    wait_for(lambda: all(r.in_syscall(*READS) for r in reads), timeout=20,
             what="8 pending reads")
    server("file", img, log=False, sock=sock)
    for r in reads:
        r.join(60)
    for i, r in enumerate(reads):
        off = MiB + i * 65536
        assert r.errno is None, f"read {i} failed with errno {r.errno}"
        assert r.value == data[off:off + 65536], f"read {i} wrong data"


def test_default_timeout_waits(server, random_export, mount):
    """Default timeout is 60 s: a request is still waiting 5 s into an outage,
    and succeeds once the server is back."""
    srv, img, data = random_export(4 * MiB)
    sock = srv.sock
    m = mount(srv.uri())
    srv.kill()
    read = Call(direct_pread, m / "disk", 2 * MiB, 4096, name="the read").start()
    assert not read.wait(5), f"the read gave up within 5 s: {(read.value, read.errno)}"
    server("file", img, log=False, sock=sock)
    read.join(60)
    assert read.errno is None and read.value == data[2 * MiB:2 * MiB + 4096]


def _split_chain(depth):
    """-o split= options that cut disk into nested halves: disk-part1,
    disk-part2, disk-part2-part1, disk-part2-part2, ... (2 * depth files)."""
    opts, parent = [], "disk"
    for _ in range(depth):
        opts += ["-o", f"split={parent}:2048"]
        parent += "-part2"
    return opts


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_waits_on_a_dead_server_run_in_parallel_and_leave_metadata_free(server, mount, stopped,
                                                                       how):
    """Issue 8 F4: twelve lseek(SEEK_DATA) (block status) and three setfattr
    user.nbdfs.partition=auto waiting on a dead server occupy no thread that
    metadata needs: ls, stat and getxattr answer in under a second while they
    wait, and the waits all end with an error after about one timeout, side by
    side.  Each wait is on a file of its own (the kernel runs one SEEK_DATA and
    one setxattr at a time per inode): twelve nested partition files of disk,
    and three more export files of the same export.  The server is killed, or
    stopped (SIGSTOP: silent, so io_timeout comes first)."""
    timeout, io_timeout = 10, 2
    bound = timeout + (io_timeout if how == "stopped" else 0)
    srv = server("memory", "64M", log=False)
    extra = ["p0", "p1", "p2"]
    m = mount(srv.uri(), *[f"{n}={srv.uri()}" for n in extra],
              opts=["-o", f"timeout={timeout},io_timeout={io_timeout}"] + _split_chain(6))
    files = [f for f in m.files() if f.startswith("disk")][:12]
    assert len(files) == 12, m.files()
    for f in files + extra:
        assert read_file(m / f, 0, 512) == bytes(512)   # each export connected
    fds = [os.open(m / f, os.O_RDONLY) for f in files]
    seeks, setfattrs = [], []
    try:
        if how == "killed":
            srv.kill()
        else:
            stopped(srv.proc)
        t0 = time.monotonic()
        seeks = [Call(os.lseek, fd, 0, os.SEEK_DATA, name=f"lseek {f}").start()
                 for fd, f in zip(fds, files)]
        # setxattr(2) as `setfattr -n user.nbdfs.partition -v auto` does it, from a
        # thread: a child process would close our fds on the mount at exec, and
        # each close is a FUSE FLUSH
        setfattrs = [Call(os.setxattr, m / f, "user.nbdfs.partition", b"auto",
                          name=f"setfattr {f}").start() for f in extra]
        calls = seeks + setfattrs

        wait_for(lambda: all(c.in_syscall("lseek", "setxattr") for c in calls), timeout=5,
                 what=lambda: "every lseek and setxattr to wait: "
                 f"{[(c.name, c.syscall(), c.dt) for c in calls]}")
        # metadata, while all fifteen wait
        while time.monotonic() - t0 < timeout / 2:
            probe = bounded(lambda: (os.listdir(m.path), os.stat(m / "disk"),
                                     getx(m / "disk", "user.nbdfs.sectors")),
                            timeout=bound + 60, name="ls/stat/getxattr")
            assert probe.errno is None, probe.error
            assert probe.dt < 1.0, f"ls/stat/getxattr took {probe.dt:.1f}s behind the waits"
        for c in calls:
            c.join(bound + 60)
        took = time.monotonic() - t0
    finally:
        if how == "stopped":
            stopped.cont(srv.proc)
        for c in seeks + setfattrs:
            c.wait(bound + 60)
        for fd in fds:
            os.close(fd)
    assert [c.errno for c in seeks] == [errno.EIO] * 12, [(c.name, c.value, c.errno) for c in seeks]
    assert all(c.errno is not None for c in setfattrs), [(c.name, c.value) for c in setfattrs]
    assert took < bound + 5, f"the waits took {took:.1f}s in all with timeout={timeout}: " \
        "one after another, not side by side"
