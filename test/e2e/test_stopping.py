"""SPEC §7, stopping and state: on SIGTERM or unmount the requests in flight
and the final flushes of every export run in parallel within `timeout`, then
nbdfs exits 0 if everything was flushed, else 1 naming each export whose flush
failed (a clean export needs no flush); user.nbdfs.state follows a file's
export through idle, connected, reconnecting and failed; user.nbdfs.stats
counts the I/O done through each file.  Every SIGSTOP is undone at teardown
(the `stopped` fixture)."""
import errno
import os
import re
import signal
import time

from nbdfs_test.data import (MiB, STATS_KEYS, direct_pread, direct_pwrite, errno_of, getx,
                             read_file, setx, sparse_file, state, stats)
from nbdfs_test.mounts import is_mounted
from nbdfs_test.polling import run, wait_for
from nbdfs_test.threads import READS, WRITES, Call, bounded


def _named(log, name):
    """The lines of the log that name the file `name` as a word of its own
    (alone, or as the export in a URI), not inside a longer name."""
    word = re.compile(r"(?<![\w.-])" + re.escape(name) + r"(?![\w.-])")
    return [line for line in log.splitlines() if word.search(line)]


def _flush_failures(log, name):
    """The log's lines that name export file `name` and speak of a flush."""
    return [line for line in _named(log, name) if "flush" in line.lower()]


def _close_quietly(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------- stopping

def test_sigterm_with_a_writer_blocked_on_a_stopped_server_exits_1_within_timeout(
        random_export, mount, stopped):
    """The server freezes (SIGSTOP) while a writer waits in write(2): SIGTERM
    still ends nbdfs within about `timeout`, unmounted, exit 1 naming the
    export it could not flush, and the writer gets an error, never success."""
    timeout = 3
    srv, img, data = random_export(4 * MiB)
    m = mount(srv.uri(), opts=["-o", f"io_timeout=2,timeout={timeout}"], foreground=True)
    fd = os.open(m / "disk", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"acknowledged, not flushed", 0) == 25
        stopped(srv.proc)

        def write_then_fsync():
            os.pwrite(fd, b"w" * 65536, MiB)
            os.fsync(fd)
        writer = Call(write_then_fsync, name="writer").start()
        writer.wait_blocked_in(*WRITES, "fsync", timeout=10)
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        rc = m.wait_exit(timeout + 60)
        dt = time.monotonic() - t0
        writer.join(30)
    finally:
        _close_quietly([fd])
    log = m.log()
    assert dt < timeout + 6, f"SIGTERM took {dt:.1f}s with timeout={timeout}\n{log}"
    assert not is_mounted(m.path)
    assert writer.errno is not None, "the blocked write(2)/fsync(2) reported success"
    assert rc == 1, f"exit status {rc} with unflushed data\n{log}"
    assert _flush_failures(log, "disk"), f"no log line names 'disk' and its flush:\n{log}"


def test_sigterm_with_twelve_exports_flushes_in_parallel_and_names_the_dirty_ones(
        tmp_path, server, mount):
    """Twelve exports, eight with data written and not flushed, server gone:
    the final flushes run together (well under 12 x timeout), exit 1, and the
    log names each of the eight and none of the four clean exports."""
    timeout = 3
    names = [f"vol{i:02d}" for i in range(12)]
    d = tmp_path / "exports"
    d.mkdir()
    for n in names:
        sparse_file(d / n, MiB)
    srv = server("file", f"dir={d}", log=False)
    m = mount(srv.uri(), opts=["-a", "-o", f"timeout={timeout}"], foreground=True)
    assert m.files() == names
    dirty, clean = names[:8], names[8:]
    fds = []
    try:
        for n in dirty:
            fd = os.open(m / n, os.O_RDWR)   # kept open: no flush at close
            fds.append(fd)
            assert os.pwrite(fd, n.encode() * 100, 4096) == 500
        for n in clean:
            assert read_file(m / n, 0, 512) == bytes(512)   # connected, but clean
        srv.kill()
        t0 = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        rc = m.wait_exit(12 * timeout + 60)
        dt = time.monotonic() - t0
    finally:
        _close_quietly(fds)
    log = m.log()
    assert dt < 12, f"SIGTERM took {dt:.1f}s for 12 exports at timeout={timeout}\n{log}"
    assert not is_mounted(m.path)
    assert rc == 1, f"exit status {rc} with 8 exports unflushed\n{log}"
    for n in dirty:
        assert _flush_failures(log, n), f"the log does not name {n} as not flushed:\n{log}"
    for n in clean:
        assert not _flush_failures(log, n), f"clean export {n} named as not flushed:\n{log}"


def test_unmount_with_server_gone_and_nothing_written_exits_0_at_once(random_export, mount):
    """A connected export with nothing written needs no flush: fusermount3 -u
    with its server gone exits 0 without waiting for the timeout."""
    timeout = 10
    srv, img, data = random_export(4 * MiB)
    m = mount(srv.uri(), opts=["-o", f"timeout={timeout}"], foreground=True)
    assert read_file(m / "disk", 0, 4096) == data[:4096]
    srv.kill()
    t0 = time.monotonic()
    rc = m.unmount(timeout=timeout + 60)
    dt = time.monotonic() - t0
    assert rc == 0, f"exit status {rc} with nothing to flush\n{m.log()}"
    assert dt < timeout / 2, f"unmount waited {dt:.1f}s with nothing to flush\n{m.log()}"


def test_unmount_with_server_gone_and_data_unflushed_exits_1_within_timeout(random_export, mount):
    """Written, then the server died: close(2) cannot flush (EIO), and
    fusermount3 -u makes nbdfs try once more within `timeout`, then exit 1
    naming the export."""
    timeout = 3
    srv, img, data = random_export(4 * MiB)
    m = mount(srv.uri(), opts=["-o", f"timeout={timeout}"], foreground=True)
    fd = os.open(m / "disk", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"u" * 4096, 8192) == 4096
        srv.kill()
    except BaseException:
        _close_quietly([fd])
        raise
    closing = bounded(os.close, fd, timeout=timeout + 60, name="close")
    assert closing.errno == errno.EIO, f"close(2) after a lost flush: {closing.error!r}"
    t0 = time.monotonic()
    rc = m.unmount(timeout=timeout + 60)
    dt = time.monotonic() - t0
    log = m.log()
    assert dt < timeout + 6, f"nbdfs took {dt:.1f}s to exit after unmount\n{log}"
    assert rc == 1, f"exit status {rc} with data never flushed\n{log}"
    assert _flush_failures(log, "disk"), f"no log line names 'disk' and its flush:\n{log}"


# ---------------------------------------------------------------- user.nbdfs.state

FILES = ("disk", "disk-part1", "disk-part2")


def _states(m):
    return {f: state(m / f) for f in FILES}


def test_state_idle_connected_reconnecting_connected(server, random_export, mount):
    """idle before any I/O (no data connection yet), connected once read,
    reconnecting while the server is gone and a request waits, connected again
    after the server is back on the same socket; partition files show their
    export's state."""
    srv, img, data = random_export(4 * MiB)
    sock = srv.sock
    m = mount(srv.uri(), opts=["-o", "timeout=30,split=disk:2048"])
    assert _states(m) == dict.fromkeys(FILES, "idle")
    assert direct_pread(m / "disk-part2", 0, 4096) == data[MiB:MiB + 4096]
    assert _states(m) == dict.fromkeys(FILES, "connected")
    srv.kill()
    reader = Call(direct_pread, m / "disk", 2 * MiB, 4096, name="reader").start()
    reader.wait_blocked_in(*READS)
    wait_for(lambda: _states(m) == dict.fromkeys(FILES, "reconnecting"), timeout=10,
             what=f"every file to say reconnecting (now {_states(m)})")
    server("file", img, log=False, sock=sock)
    reader.join(60)
    assert reader.errno is None and reader.value == data[2 * MiB:2 * MiB + 4096]
    wait_for(lambda: _states(m) == dict.fromkeys(FILES, "connected"), timeout=10,
             what=f"every file to say connected again (now {_states(m)})")


def test_state_failed_after_a_request_gave_up(random_export, mount):
    """Server gone, a request waited `timeout` and failed with EIO: the export
    and its partitions say failed, and the failed request is counted."""
    srv, img, data = random_export(4 * MiB)
    m = mount(srv.uri(), opts=["-o", "timeout=1,split=disk:2048"])
    assert direct_pread(m / "disk", 0, 4096) == data[:4096]
    srv.kill()
    r = bounded(direct_pread, m / "disk", MiB, 4096, timeout=60, name="reader")
    assert r.errno == errno.EIO, r.error
    assert _states(m) == dict.fromkeys(FILES, "failed")
    assert stats(m / "disk")["errors"] == 1


def test_state_and_stats_are_read_only_and_listed(nbdkit, mount):
    """Both attributes exist on every file, getfattr -d shows them, and
    setting either fails with EPERM."""
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "split=disk:8"])
    for f in FILES:
        out = run(["getfattr", "-d", m / f], timeout=30).stdout.decode()
        assert re.search(r"^user\.nbdfs\.state=", out, re.M), out
        assert re.search(r"^user\.nbdfs\.stats=", out, re.M), out
        for name in ("user.nbdfs.state", "user.nbdfs.stats"):
            assert errno_of(setx, m / f, name, "connected") == errno.EPERM, (f, name)
        assert state(m / f) == "idle"


# ---------------------------------------------------------------- user.nbdfs.stats

def test_stats_count_the_io_done_through_each_file(server, mount):
    """O_DIRECT I/O (the page cache neither adds nor hides requests): 5 reads
    of 4 KiB and 3 writes of 8 KiB through disk-part1 are counted there, and
    the export file's counters do not move."""
    srv = server("memory", "4M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    part, exp = m / "disk-part1", m / "disk"
    fresh = stats(exp)
    assert set(fresh) == set(STATS_KEYS), fresh
    assert fresh == dict.fromkeys(STATS_KEYS, 0), fresh
    for i in range(5):
        assert direct_pread(part, i * 4096, 4096) == bytes(4096)
    for i in range(3):
        assert direct_pwrite(part, 65536 + i * 8192, os.urandom(8192)) == 8192
    s = stats(part)
    assert (s["reads"], s["bytes_read"], s["writes"], s["bytes_written"]) == (5, 20480, 3, 24576), s
    assert (s["errors"], s["in_flight"]) == (0, 0), s
    assert stats(exp) == fresh
    assert stats(m / "disk-part2") == fresh


def test_stats_count_failed_requests_as_errors(server, mount):
    srv = server("--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%",
                 log=False)
    m = mount(srv.uri())
    assert errno_of(direct_pread, m / "disk", 0, 4096) == errno.EIO
    assert errno_of(direct_pread, m / "disk", 65536, 4096) == errno.EIO
    s = stats(m / "disk")
    assert s["errors"] == 2, s
    assert s["in_flight"] == 0, s
    direct_pwrite(m / "disk", 0, b"w" * 4096)    # writes still work, and are no errors
    assert stats(m / "disk")["errors"] == 2


def test_stats_reconnects_and_in_flight(server, random_export, mount):
    """in_flight counts the request waiting through disk-part2 (and nothing on
    the export file), 0 again when it is answered; a server restart is one
    more reconnect on the export, seen through each of its files."""
    srv, img, data = random_export(4 * MiB)
    sock = srv.sock
    m = mount(srv.uri(), opts=["-o", "timeout=30,split=disk:2048"])
    part = m / "disk-part2"
    assert direct_pread(part, 0, 4096) == data[MiB:MiB + 4096]
    before = {f: stats(m / f) for f in FILES}
    r0 = before["disk"]["reconnects"]
    assert all(s["reconnects"] == r0 and s["in_flight"] == 0 for s in before.values()), before
    srv.kill()
    reader = Call(direct_pread, part, 8192, 4096, name="reader").start()
    reader.wait_blocked_in(*READS)
    wait_for(lambda: stats(part)["in_flight"] == 1, timeout=10,
             what=f"disk-part2 to count its waiting read in flight ({getx(part, 'user.nbdfs.stats')})")
    assert stats(m / "disk")["in_flight"] == 0
    server("file", img, log=False, sock=sock)
    reader.join(60)
    assert reader.errno is None and reader.value == data[MiB + 8192:MiB + 12288]
    wait_for(lambda: stats(part)["in_flight"] == 0, timeout=10, what="in_flight back to 0")
    for f in FILES:
        assert stats(m / f)["reconnects"] == r0 + 1, (f, stats(m / f))
