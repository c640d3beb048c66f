"""SPEC §6, scale: thousands of exports in one mount under a low open-file
limit, names and sizes learnt without data connections, a data connection
only once a file is used, idle connections closed, an export that cannot be
opened skipped, the exports learnt over parallel control connections."""
import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from nbdfs_test.data import direct_pread, direct_pwrite, read_file, timed
from nbdfs_test.polling import wait_for

CPUS = os.cpu_count() or 1


def _export_dir(tmp_path, n, size=65536):
    """A directory of @n sparse files: nbdkit's file plugin (dir=) serves
    each as an export of that name."""
    d = tmp_path / "exports"
    d.mkdir()
    for i in range(n):
        with open(d / f"e{i:05d}", "wb") as f:
            f.truncate(size)
    # the first bytes of each tell which it is
    for i in range(0, n, max(1, n // 20)):
        with open(d / f"e{i:05d}", "r+b") as f:
            f.write(f"export {i:05d}".encode())
    return d


def _status(pid, key):
    """A number from /proc/PID/status (Threads, VmRSS in KiB, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _threads(pid):
    return _status(pid, "Threads")


def _sockets(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def test_two_thousand_exports_under_a_low_open_file_limit(tmp_path, server, mount):
    """-a on a server with 2000 exports, the daemon under `ulimit -n 1024`:
    the mount works, holds no data connection until files are used, and
    stays within a few threads."""
    n = 2000
    d = _export_dir(tmp_path, n)
    srv = server("file", f"dir={d}", log=False)
    m = mount(srv.uri(), opts=["-a", "-o", "idle_timeout=1"], foreground=True, nofile=1024)
    files = m.files()
    assert len(files) == n and files[0] == "e00000" and files[-1] == f"e{n - 1:05d}"
    # ls -l: every file stat'ed
    assert all(os.lstat(m / f).st_size == 65536 for f in files)
    assert _threads(m.pid) <= 2 * CPUS + 8, _threads(m.pid)
    assert _sockets(m.pid) == 0, "data connections before any file was used"
    for i in range(0, n, 100):
        assert read_file(m / f"e{i:05d}", 0, 12) == f"export {i:05d}".encode()
    assert _threads(m.pid) <= 2 * CPUS + 8, _threads(m.pid)
    # idle connections close (idle_timeout=1)
    wait_for(lambda: _sockets(m.pid) == 0, timeout=30, what="idle connections to close")
    assert m.unmount() == 0


def test_out_of_file_descriptors_fails_the_request_at_once(tmp_path, server, mount):
    """Data connections kept open (idle_timeout=0) until the daemon's open
    file limit is reached: the read that needs one more fails with EIO at
    once, not after the reconnect timeout; the log names the export and the
    limit; the exports already connected keep working."""
    n, nofile = 100, 48
    d = _export_dir(tmp_path, n)
    srv = server("file", f"dir={d}", log=False)
    m = mount(srv.uri(), opts=["-a", "-o", "idle_timeout=0,timeout=30,connections=1"],
              foreground=True, nofile=nofile)
    failed = None
    for i in range(n):
        _, err, secs = timed(lambda: direct_pread(m / f"e{i:05d}", 0, 4096))
        if err is not None:
            failed = (i, err, secs)
            break
    assert failed is not None, f"{n} data connections under a limit of {nofile} open files"
    i, err, secs = failed
    assert i > 0 and err == errno.EIO, failed
    assert secs < 15, f"the read waited {secs:.1f} s for a file descriptor (timeout=30)"
    log = m.log()
    assert f"open file limit of {nofile} is reached" in log, log[-2000:]
    assert f"e{i:05d}" in log, log[-2000:]
    # the exports that have their connection go on
    assert direct_pread(m / "e00000", 0, 4096)[:12] == b"export 00000"
    assert m.unmount() == 0


def test_memory_of_a_burst_is_given_back(server, mount):
    """128 MiB written with O_DIRECT in 1 MiB requests, 16 threads at once:
    the buffers and the replay log grow, and a few seconds after the last
    request the daemon's RSS is back near where it started."""
    srv = server("memory", "256M")
    # Under ASan (CI's second build) freed memory waits in a quarantine and
    # its allocator, not glibc's, gives pages back: no quarantine, and ask it
    # to release often. Other builds ignore the variable.
    asan = os.environ.get("ASAN_OPTIONS", "")
    env = dict(os.environ, ASAN_OPTIONS=(asan + ":" if asan else "") +
               "quarantine_size_mb=0:allocator_release_to_os_interval_ms=100")
    m = mount(srv.uri(), foreground=True, env=env)
    assert read_file(m / "disk", 0, 4096) == bytes(4096)
    before = _status(m.pid, "VmRSS")
    block = os.urandom(1 << 20)

    def writer(k):
        fd = os.open(m / "disk", os.O_WRONLY | os.O_DIRECT)
        try:
            for i in range(k, 128, 16):
                assert direct_pwrite(None, i << 20, block, fd=fd) == len(block)
        finally:
            os.close(fd)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(writer, range(16)))
    peak = _status(m.pid, "VmHWM")
    assert peak > before + 16 * 1024, (before, peak)
    wait_for(lambda: _status(m.pid, "VmRSS") < before + 12 * 1024, timeout=30,
             what=f"RSS back near {before} KiB after a peak of {peak} KiB "
                  f"(now {_status(m.pid, 'VmRSS')} KiB)")
    assert direct_pread(m / "disk", 5 << 20, 4096) == block[:4096]
    assert m.unmount() == 0


def test_data_connection_on_first_use_and_idle_close(server, mount):
    """No data connection before the file is used; the idle one closes with
    NBD_CMD_DISC after idle_timeout."""
    srv = server("memory", "4M")
    m = mount(srv.uri(), opts=["-o", "idle_timeout=1"], foreground=True)
    assert srv.log.open_connections() == 0, srv.log.text()
    assert " Read id=" not in srv.log.text() and " Write id=" not in srv.log.text()
    assert read_file(m / "disk", 0, 4096) == bytes(4096)
    assert " Read id=" in srv.log.text()
    wait_for(lambda: srv.log.open_connections() == 0, timeout=30,
             what=f"the idle connection to close (log:\n{srv.log.text()[-1500:]})")
    # used again: connects again
    with open(m / "disk", "r+b") as f:
        f.write(b"again")
    assert read_file(m / "disk", 0, 5) == b"again"
    assert m.unmount() == 0


SH_PLUGIN = r'''#!/usr/bin/env bash
case "$1" in
  list_exports) printf 'good\nbroken\nalso\n' ;;
  open) if [ "$3" = broken ]; then echo "broken: backing store unavailable" >&2; exit 1; fi
        echo "$3" ;;
  get_size) echo 1048576 ;;
  pread) dd if=/dev/zero bs="$3" count=1 iflag=fullblock 2>/dev/null ;;
  can_write|can_flush) exit 3 ;;
  *) exit 2 ;;
esac
'''


def test_an_export_that_cannot_be_opened_is_skipped(tmp_path, server, mount):
    script = tmp_path / "plugin.sh"
    script.write_text(SH_PLUGIN)
    script.chmod(stat.S_IRWXU)
    srv = server("sh", str(script), log=False)
    m = mount(srv.uri(), opts=["-a"])
    assert m.files() == ["also", "good"]
    assert "broken" in m.stderr and "skipped" in m.stderr, m.stderr
    assert read_file(m / "good", 0, 512) == bytes(512)


def test_every_export_broken_fails_the_mount(tmp_path, server, mount):
    script = tmp_path / "plugin.sh"
    script.write_text(SH_PLUGIN.replace('"$3" = broken', 'true'))
    script.chmod(stat.S_IRWXU)
    srv = server("sh", str(script), log=False)
    m = mount(srv.uri(), opts=["-a"], check=False)
    assert m.rc != 0 and not m.mounted()
    assert "no export could be shown" in m.stderr, m.stderr


def test_exports_are_learnt_over_parallel_connections(tmp_path, server, mount):
    """A server that takes long to open each export: the exports are
    described over several control connections at once."""
    n = 64
    d = _export_dir(tmp_path, n)
    srv = server("--filter=delay", "file", f"dir={d}", "delay-open=200ms")
    m = mount(srv.uri(), opts=["-a"])
    assert len(m.files()) == n
    assert srv.log.max_open_connections() >= 2, srv.log.text()[-2000:]


@pytest.mark.parametrize("n", [1, 40])
def test_startup_never_opens_a_data_connection(tmp_path, server, mount, n):
    """Only control connections at mount (each INFO opens and closes the
    export on the server), none left open."""
    d = _export_dir(tmp_path, n)
    srv = server("file", f"dir={d}")
    m = mount(srv.uri() if n > 1 else srv.uri("e00000"), opts=["-a"] if n > 1 else [])
    assert srv.log.open_connections() == 0, srv.log.text()[-2000:]
    assert " Read id=" not in srv.log.text()
    assert len(m.files()) == n
