"""SPEC §2 `-d` and §5 (buffered and O_DIRECT I/O), the FUSE request path of
issue 10: `-d` logs one line per FUSE request (`fuse: OPNAME ...`), and by it
a buffered write costs no GETXATTR security.capability round trip; O_DIRECT
writers and readers of one file, and a buffered reader beside an O_DIRECT
writer, are in flight together on the server (nbdkit's delay filter makes
each request last, its log filter shows them overlap)."""
import mmap
import os
import re
import threading
import time

from nbdfs_test.data import MiB, nbd_read, opened, pattern_bytes
from nbdfs_test.polling import wait_for
from nbdfs_test.threads import Call


def test_buffered_writes_send_no_getxattr(server, mount):
    srv = server("memory", "4M", log=False)
    m = mount(srv.uri(), foreground="-d")
    with opened(m / "disk", os.O_WRONLY) as fd:
        for i in range(50):
            assert os.write(fd, bytes([i]) * 4096) == 4096

    def writes():
        return len(re.findall(r"fuse: WRITE ", m.log()))
    wait_for(lambda: writes() >= 50, timeout=10,
             what=lambda: f"50 `fuse: WRITE` lines from -d (got {writes()}):\n{m.log()[-2000:]}")
    caps = [l for l in m.log().splitlines() if re.search(r"fuse: GETXATTR .*security\.capability", l)]
    assert len(caps) <= 1, f"{len(caps)} GETXATTR security.capability for 50 writes:\n" \
        + "\n".join(caps[:5])
    assert nbd_read(srv.uri(), 49 * 4096, 4096) == bytes([49]) * 4096


def _together(jobs):
    """Runs the jobs (functions of no argument) on threads released at once;
    returns (seconds from the first start to the last end, the Calls)."""
    gate = threading.Barrier(len(jobs), timeout=30)

    def gated(job):
        gate.wait()
        t0 = time.monotonic()
        job()
        return t0, time.monotonic()
    calls = [Call(gated, job, name=f"job {i}").start() for i, job in enumerate(jobs)]
    for c in calls:
        c.join(60)
    for c in calls:
        assert c.error is None, f"{c.name}: {c.error!r}"
    return max(c.value[1] for c in calls) - min(c.value[0] for c in calls), calls


def _aligned(data):
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def test_concurrent_o_direct_writers_to_one_file_are_in_flight_together(server, mount):
    srv = server("--filter=delay", "memory", "64M", "delay-write=500ms")
    m = mount(srv.uri())
    data = [os.urandom(65536) for _ in range(4)]
    bufs = [_aligned(d) for d in data]
    with opened(m / "disk", os.O_RDWR | os.O_DIRECT) as fd:
        took, _ = _together([lambda b=b, i=i: os.pwrite(fd, b, i * MiB)
                                for i, b in enumerate(bufs)])
    assert took < 1.5, f"4 O_DIRECT writes of 0.5 s each took {took:.2f}s: one after another"
    assert srv.log.max_in_flight("Write") >= 2, srv.log.text()[-3000:]
    for i, d in enumerate(data):
        assert nbd_read(srv.uri(), i * MiB, 65536) == d


def test_concurrent_o_direct_readers_of_one_file_are_in_flight_together(server, mount):
    srv = server("--filter=delay", "pattern", "64M", "delay-read=500ms")
    m = mount(srv.uri())
    bufs = [mmap.mmap(-1, 65536) for _ in range(4)]
    with opened(m / "disk", os.O_RDONLY | os.O_DIRECT) as fd:
        took, _ = _together([lambda b=b, i=i: os.preadv(fd, [b], i * MiB)
                                    for i, b in enumerate(bufs)])
    assert took < 1.5, f"4 O_DIRECT reads of 0.5 s each took {took:.2f}s: one after another"
    assert srv.log.max_in_flight("Read") >= 2, srv.log.text()[-3000:]
    for i, b in enumerate(bufs):
        assert bytes(b) == pattern_bytes(i * MiB, 65536)


def test_buffered_reader_and_o_direct_writer_of_one_file_do_not_serialise(server, mount):
    srv = server("--filter=delay", "memory", "64M", "delay-read=1", "delay-write=1")
    m = mount(srv.uri())
    data = os.urandom(65536)
    buf = _aligned(data)
    rfd = os.open(m / "disk", os.O_RDONLY)
    wfd = os.open(m / "disk", os.O_WRONLY | os.O_DIRECT)
    got = {}
    try:
        took, _ = _together([lambda: got.setdefault("r", os.pread(rfd, 65536, 8 * MiB)),
                                lambda: os.pwrite(wfd, buf, 0)])
    finally:
        os.close(rfd)
        os.close(wfd)
    assert got["r"] == bytes(65536)
    assert took < 1.7, f"a 1 s read and a 1 s write took {took:.2f}s: one after the other"
    assert srv.log.in_flight_together("Read", "Write"), srv.log.text()[-3000:]
    assert nbd_read(srv.uri(), 0, 65536) == data
