"""SPEC §5, I/O semantics, every row: unaligned reads and writes (byte-exact
against nbdkit `pattern` and the server), the end of the device (0 bytes,
ENOSPC, short writes), truncation ignored, fsync/fdatasync/close/O_SYNC on the
wire (nbdkit's log filter), fallocate punch/zero, SEEK_DATA/SEEK_HOLE,
O_DIRECT, EROFS, coherence between aliasing files (also after a write that
failed), concurrent unaligned writers, 4096-byte servers, odd export sizes."""
import errno
import mmap
import os
import random
import stat
import subprocess
import threading

import pytest

from nbdfs_test.data import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, MiB,
                             SECTOR, direct_pwrite, errno_of, fallocate, nbd_read, opened,
                             pattern_bytes, read_file)
from nbdfs_test.polling import run, wait_for

ODD = [(0, 1), (1, 1), (7, 9), (511, 2), (512, 512), (513, 1000), (4095, 4097), (12345, 65537),
       (1000000, 3), (3 * MiB - 1, 1), (3 * MiB - 3, 3)]


def _pread(path, off, n):
    with opened(path, os.O_RDONLY) as fd:
        return os.pread(fd, n, off)


# ---------------------------------------------------------------- reads

def test_reads_at_odd_offsets_are_exact(nbdkit, mount):
    m = mount(nbdkit("pattern", "3M").uri())
    f = m / "disk"
    for off, n in ODD:
        assert _pread(f, off, n) == pattern_bytes(off, n), (off, n)
    # sequential buffered read of everything
    assert read_file(f) == pattern_bytes(0, 3 * MiB)


def test_reads_through_partition_at_odd_offsets(nbdkit, mount):
    m = mount(nbdkit("pattern", "3M").uri(), opts=["-o", "split=disk:3"])
    base = 3 * SECTOR
    for off, n in [(0, 1), (5, 700), (4093, 9000), (3 * MiB - base - 1, 1)]:
        assert _pread(m / "disk-part2", off, n) == pattern_bytes(base + off, n), (off, n)
    assert _pread(m / "disk-part1", 1000, 1000) == pattern_bytes(1000, base - 1000)


def test_read_past_end_gives_0_bytes(nbdkit, mount):
    m = mount(nbdkit("pattern", "1M").uri(), opts=["-o", "split=disk:100"])
    f = m / "disk"
    assert _pread(f, MiB, 10) == b""
    assert _pread(f, MiB + 12345, 10) == b""
    assert _pread(f, MiB - 4, 100) == pattern_bytes(MiB - 4, 4)
    assert _pread(m / "disk-part1", 100 * SECTOR, 10) == b""
    assert _pread(m / "disk-part1", 100 * SECTOR - 2, 10) == pattern_bytes(100 * SECTOR - 2, 2)


# ---------------------------------------------------------------- writes

def test_writes_at_odd_offsets(server, mount):
    size = 4 * MiB
    srv = server("memory", str(size))
    m = mount(srv.uri())
    model = bytearray(size)
    with opened(m / "disk", os.O_RDWR) as fd:
        rnd = random.Random(1)
        for off, n in ODD + [(size - 7, 7), (2000, 1), (2001, 1), (2047, 3)]:
            data = bytes(rnd.randrange(256) for _ in range(min(n, 300))) * (n // 300 + 1)
            data = data[:n]
            assert os.pwrite(fd, data, off) == n
            model[off:off + n] = data
            lo, hi = max(0, off - 10), min(size, off + n + 10)
            assert os.pread(fd, hi - lo, lo) == bytes(model[lo:hi]), (off, n)
    assert read_file(m / "disk") == bytes(model)
    assert nbd_read(srv.uri()) == bytes(model)
    # every request on the wire was sector-aligned
    for w in srv.log.requests("Write") + srv.log.requests("Read"):
        assert w["offset"] % SECTOR == 0 and w["count"] % SECTOR == 0, w


def test_write_at_or_past_end_enospc_straddle_short(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_RDWR) as fd:
        assert errno_of(os.pwrite, fd, b"x", MiB) == errno.ENOSPC
        assert errno_of(os.pwrite, fd, b"x" * 4096, MiB + 4096) == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 100, MiB - 10) == 10
        assert os.pread(fd, 20, MiB - 20) == bytes(10) + b"y" * 10
    assert os.path.getsize(m / "disk") == MiB
    assert nbd_read(srv.uri(), MiB - 20) == bytes(10) + b"y" * 10


def test_partition_end_protects_the_next_partition(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri(), opts=["-o", "split=disk:8"])
    with opened(m / "disk-part1", os.O_RDWR) as fd:
        assert errno_of(os.pwrite, fd, b"x", 8 * SECTOR) == errno.ENOSPC
        assert os.pwrite(fd, b"z" * 100, 8 * SECTOR - 1) == 1
    assert _pread(m / "disk-part2", 0, 16) == bytes(16)
    assert nbd_read(srv.uri(), 8 * SECTOR - 1, 16) == b"z" + bytes(15)


def test_sequential_writes_with_dd_and_cp(tmp_path, server, mount):
    srv = server("memory", "8M", log=False)
    m = mount(srv.uri())
    src = tmp_path / "src.bin"
    data = os.urandom(5 * MiB + 777)
    src.write_bytes(data)
    run(["dd", f"if={src}", f"of={m / 'disk'}", "bs=64k", "status=none"])
    assert nbd_read(srv.uri(), 0, len(data)) == data
    run(["dd", f"if={src}", f"of={m / 'disk'}", "bs=1000", "seek=3", "count=5", "status=none"])
    assert nbd_read(srv.uri(), 3000, 5000) == data[:5000]
    run(["cmp", "-n", "3000", src, m / "disk"])


# ---------------------------------------------------------------- truncation

def test_o_trunc_truncate_ftruncate_ignored(server, mount):
    srv = server("pattern", "1M")
    m = mount(srv.uri())
    f = m / "disk"
    os.truncate(f, 0)
    assert os.path.getsize(f) == MiB
    os.truncate(f, 10 * MiB)
    assert os.path.getsize(f) == MiB
    assert _pread(f, 4096, 64) == pattern_bytes(4096, 64)


def test_o_trunc_and_shell_redirect(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    f = m / "disk"
    with open(f, "r+b") as fh:
        fh.write(b"A" * 8192)
    with opened(f, os.O_WRONLY | os.O_TRUNC) as fd:
        assert os.fstat(fd).st_size == MiB
        os.ftruncate(fd, 0)
        os.ftruncate(fd, 5)
        assert os.fstat(fd).st_size == MiB
        assert os.write(fd, b"hello") == 5
    assert os.path.getsize(f) == MiB
    # the bytes after what was written are not zeroed by the "truncation"
    assert _pread(f, 0, 10) == b"helloAAAAA"
    r = subprocess.run(["sh", "-c", f'echo x > "{f}"'], timeout=30)
    assert r.returncode == 0
    assert _pread(f, 0, 4) == b"x\nll"
    assert nbd_read(srv.uri(), 0, 4) == b"x\nll"
    assert os.path.getsize(f) == MiB


def test_truncate_command(server, mount):
    m = mount(server("memory", "1M").uri())
    r = subprocess.run(["truncate", "-s", "0", m / "disk"], timeout=30)
    assert r.returncode == 0
    assert os.path.getsize(m / "disk") == MiB


# ---------------------------------------------------------------- flush, FUA

def _flushes(srv):
    return len(srv.log.requests("Flush"))


@pytest.mark.parametrize("call", ["fsync", "fdatasync"])
def test_fsync_fdatasync_flush(server, mount, call):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_RDWR) as fd:
        os.pwrite(fd, b"d" * 1000, 1000)
        before = _flushes(srv)
        getattr(os, call)(fd)
        assert _flushes(srv) > before, srv.log.text()[-2000:]
        # the flush came after the data
        reqs = [r for r in srv.log.requests() if r["kind"] in ("Write", "Flush")]
        assert reqs[-1]["kind"] == "Flush"
        assert nbd_read(srv.uri(), 1000, 1000) == b"d" * 1000


def test_fsync_without_server_flush_succeeds(mount, nbdkit):
    srv = nbdkit("eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero",
                 "can_write=exit 0", "pwrite=cat >/dev/null", "can_flush=exit 3",
                 "can_fua=echo none")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_RDWR) as fd:
        os.pwrite(fd, b"q" * 512, 0)
        os.fsync(fd)
        os.fdatasync(fd)


def test_close_after_writes_flushes(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    fd = os.open(m / "disk", os.O_WRONLY)
    os.pwrite(fd, b"c" * 3000, 10)
    before = _flushes(srv)
    os.close(fd)
    # at once: no polling, close(2) returning is the promise
    assert _flushes(srv) > before
    assert nbd_read(srv.uri(), 10, 3000) == b"c" * 3000


def test_dd_data_on_server_when_dd_returns(tmp_path, server, mount):
    srv = server("memory", "4M")
    m = mount(srv.uri())
    data = os.urandom(MiB + 100)
    src = tmp_path / "s"
    src.write_bytes(data)
    run(["dd", f"if={src}", f"of={m / 'disk'}", "bs=1M", "status=none"])
    assert _flushes(srv) >= 1
    assert nbd_read(srv.uri(), 0, len(data)) == data


@pytest.mark.parametrize("flag", ["O_SYNC", "O_DSYNC"])
def test_o_sync_writes_fua_or_flush(server, mount, flag):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_WRONLY | getattr(os, flag)) as fd:
        srv.log.clear()
        os.pwrite(fd, b"s" * 4096, 8192)
        reqs = srv.log.requests()
        writes = [r for r in reqs if r["kind"] == "Write" and r["offset"] <= 8192 < r["offset"] + r["count"]]
        assert writes, srv.log.text()
        durable = writes[-1].get("fua") == 1 or any(
            r["kind"] == "Flush" for r in reqs[reqs.index(writes[-1]) + 1:])
        assert durable, srv.log.text()


# ---------------------------------------------------------------- fallocate

def test_punch_hole_keep_size(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_RDWR) as fd:
        os.pwrite(fd, b"\xaa" * 65536, 0)
        os.pread(fd, 65536, 0)   # warm the page cache
        srv.log.clear()
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 16384)
        assert os.pread(fd, 65536, 0) == b"\xaa" * 4096 + bytes(16384) + b"\xaa" * (65536 - 20480)
        kinds = {r["kind"] for r in srv.log.requests()}
        assert kinds & {"Zero", "Trim"}, srv.log.text()
        # unaligned edges
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 30001, 999)
        want = bytearray(b"\xaa" * 65536)
        want[4096:20480] = bytes(16384)
        want[30001:31000] = bytes(999)
        assert os.pread(fd, 65536, 0) == bytes(want)
    assert nbd_read(srv.uri(), 0, 65536) == bytes(want)
    assert os.path.getsize(m / "disk") == MiB


def test_zero_range(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_RDWR) as fd:
        os.pwrite(fd, b"\x55" * 65536, 0)
        os.pread(fd, 65536, 0)
        srv.log.clear()
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 8192, 32768)
        assert os.pread(fd, 65536, 0) == b"\x55" * 8192 + bytes(32768) + b"\x55" * (65536 - 40960)
        assert srv.log.requests("Zero"), srv.log.text()
    assert nbd_read(srv.uri(), 0, 65536) == b"\x55" * 8192 + bytes(32768) + b"\x55" * (65536 - 40960)


def test_fallocate_command_line(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    with open(m / "disk", "r+b") as f:
        f.write(b"\x11" * 20000)
    run(["fallocate", "-p", "-o", "1000", "-l", "5000", m / "disk"])
    run(["fallocate", "-z", "-o", "10000", "-l", "3000", m / "disk"])
    want = bytearray(b"\x11" * 20000)
    want[1000:6000] = bytes(5000)
    want[10000:13000] = bytes(3000)
    assert read_file(m / "disk", 0, 20000) == bytes(want)
    assert nbd_read(srv.uri(), 0, 20000) == bytes(want)


def test_punch_hole_on_read_only_fails(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "ro"])
    with opened(m / "disk", os.O_RDONLY) as fd:
        e = errno_of(fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert e in (errno.EBADF, errno.EROFS, errno.EPERM)


# ---------------------------------------------------------------- SEEK_DATA / SEEK_HOLE

def test_seek_data_hole(server, mount):
    size = 8 * MiB
    srv = server("memory", str(size))
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    with open(m / "disk", "r+b") as f:
        f.seek(MiB)
        f.write(b"\x01" * 65536)
        f.seek(5 * MiB)
        f.write(b"\x02" * 65536)
    with opened(m / "disk", os.O_RDONLY) as fd:
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + 65536
        assert os.lseek(fd, MiB + 100, os.SEEK_DATA) == MiB + 100
        assert os.lseek(fd, MiB + 65536, os.SEEK_DATA) == 5 * MiB
        assert os.lseek(fd, 5 * MiB, os.SEEK_HOLE) == 5 * MiB + 65536
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert errno_of(os.lseek, fd, 5 * MiB + 65536, os.SEEK_DATA) == errno.ENXIO
        assert errno_of(os.lseek, fd, size, os.SEEK_DATA) == errno.ENXIO
    # a partition file answers in its own offsets
    with opened(m / "disk-part2", os.O_RDONLY) as fd:
        base = 2048 * SECTOR     # == 1 MiB, where the first data is
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 65536
        assert os.lseek(fd, 5 * MiB - base, os.SEEK_HOLE) == 5 * MiB + 65536 - base


def test_seek_without_block_status_all_data(nbdkit, mount):
    m = mount(nbdkit("--filter=noextents", "memory", "1M").uri())
    with opened(m / "disk", os.O_RDONLY) as fd:
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 100, os.SEEK_HOLE) == MiB


# ---------------------------------------------------------------- O_DIRECT

def test_o_direct(server, mount):
    srv = server("memory", "1M")
    m = mount(srv.uri())
    buf = mmap.mmap(-1, 65536)
    data = os.urandom(65536)
    buf.write(data)
    with opened(m / "disk", os.O_RDWR | os.O_DIRECT) as fd:
        assert os.pwrite(fd, buf, 131072) == 65536
        rbuf = mmap.mmap(-1, 65536)
        assert os.preadv(fd, [rbuf], 131072) == 65536
        assert bytes(rbuf) == data
    assert nbd_read(srv.uri(), 131072, 65536) == data
    # and the buffered view agrees at once
    assert _pread(m / "disk", 131072, 65536) == data


def test_o_direct_dd(tmp_path, server, mount):
    srv = server("memory", "4M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    src = tmp_path / "s"
    data = os.urandom(MiB)
    src.write_bytes(data)
    run(["dd", f"if={src}", f"of={m / 'disk-part2'}", "bs=64k", "oflag=direct", "status=none"])
    out = run(["dd", f"if={m / 'disk-part2'}", "bs=64k", "count=16", "iflag=direct",
               "status=none"]).stdout
    assert out == data
    assert nbd_read(srv.uri(), 2048 * SECTOR, MiB) == data


# ---------------------------------------------------------------- read-only

@pytest.mark.parametrize("how", ["export", "mount"])
def test_write_to_read_only_erofs(nbdkit, mount, how):
    if how == "export":
        m = mount(nbdkit("-r", "memory", "1M").uri(), opts=["-o", "split=disk:8"])
    else:
        m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "ro,split=disk:8"])
    for f in m.files():
        assert stat.S_IMODE(os.stat(m / f).st_mode) == 0o444
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
            assert errno_of(os.open, m / f, flags) == errno.EROFS, (f, flags)
        assert _pread(m / f, 0, 4) == bytes(4)


# ---------------------------------------------------------------- coherence

def test_coherence_between_partition_and_export(tmp_path, server, mount):
    srv = server("memory", "4M")
    m = mount(srv.uri(), opts=["-o", "split=disk:1024"])
    base = 1024 * SECTOR
    exp, part = m / "disk", m / "disk-part2"
    # warm the page cache on both sides
    read_file(exp)
    read_file(part)
    with open(part, "r+b") as f:
        f.seek(1000)
        f.write(b"through-partition")
    with open(exp, "rb") as f:
        f.seek(base + 1000)
        assert f.read(17) == b"through-partition"
    read_file(exp)
    read_file(part)
    with open(exp, "r+b") as f:
        f.seek(base + 5000)
        f.write(b"through-export")
    with open(part, "rb") as f:
        f.seek(5000)
        assert f.read(14) == b"through-export"
    # with both open at once (long-lived fds, as a loop device has)
    fe = os.open(exp, os.O_RDWR)
    fp = os.open(part, os.O_RDWR)
    try:
        for i in range(20):
            off = random.randrange(0, 4 * MiB - base - 100)
            os.pread(fe, 100, base + off)
            os.pread(fp, 100, off)
            data = os.urandom(37)
            if i % 2:
                os.pwrite(fp, data, off)
                assert os.pread(fe, 37, base + off) == data
            else:
                os.pwrite(fe, data, base + off)
                assert os.pread(fp, 37, off) == data
    finally:
        os.close(fe)
        os.close(fp)


def test_failed_writes_leave_no_stale_alias(tmp_path, server, mount):
    """Issue 8 F2: a write that fails with EIO may have partly reached the
    server (read-modify-write edges, split requests).  With the export file
    held open and its page cache full, unaligned writes through the partition
    file (buffered and O_DIRECT) fail now and then (error filter, 20% of NBD
    writes); after each failure the export file reads what the backing file
    holds, byte for byte."""
    size, region = 4 * MiB, 512 * 1024
    img = tmp_path / "backing.img"
    img.write_bytes(os.urandom(size))
    srv = server("--filter=error", "file", img, "error-pwrite=EIO", "error-pwrite-rate=20%",
                 log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    base = 2048 * SECTOR
    rnd = random.Random(8)
    failures = 0
    fds = []
    try:
        exp = os.open(m / "disk", os.O_RDONLY)
        fds.append(exp)
        back = os.open(img, os.O_RDONLY)
        fds.append(back)
        buffered = os.open(m / "disk-part2", os.O_RDWR)
        fds.append(buffered)
        direct = os.open(m / "disk-part2", os.O_RDWR | os.O_DIRECT)
        fds.append(direct)
        assert os.pread(exp, region, base) == os.pread(back, region, base)   # cached now
        for i in range(160):
            off, n = rnd.randrange(0, region - 70000), rnd.randrange(1, 70000)
            data = rnd.randbytes(n)
            how = "O_DIRECT" if i % 2 else "buffered"
            try:
                if how == "O_DIRECT":
                    direct_pwrite(None, off, data, fd=direct)
                else:
                    os.pwrite(buffered, data, off)
                continue
            except OSError as e:
                assert e.errno == errno.EIO, e
            failures += 1
            seen, truth = os.pread(exp, region, base), os.pread(back, region, base)
            if seen != truth:
                stale = [j for j in range(region) if seen[j] != truth[j]]
                outside = sum(1 for j in stale if not off <= j < off + n)
                pytest.fail(f"after failed write {i} ({how}, {n} bytes at disk-part2 {off}): "
                            f"disk shows {len(stale)} stale bytes in [{stale[0]}, {stale[-1]}] "
                            f"of its cached region (partition offsets; {outside} of them "
                            "outside this write, i.e. left by an earlier one)")
    finally:
        for fd in fds:
            os.close(fd)
    assert failures >= 10, f"only {failures} of 160 writes failed: the test proved little"


@pytest.mark.parametrize("sector", [512, 4096])
def test_concurrent_unaligned_writers(server, mount, sector):
    size = MiB
    if sector == 512:
        srv = server("memory", str(size), log=False)
    else:   # a server that rejects anything not 4096-aligned
        srv = server("--filter=blocksize-policy", "memory", str(size), "blocksize-minimum=4096",
                     "blocksize-error-policy=error", log=False)
    m = mount(srv.uri(), opts=["-o", f"split=disk:{16 * SECTOR // sector}"])
    region = 16384
    nthreads = 8
    stripe = 37        # ranges of 37 bytes, interleaved: every sector is shared
    model = bytearray(size)
    errors = []

    def writer(t):
        try:
            # even threads through the export, odd ones through the partition
            # (same bytes: disk-part2 starts at sector 16 of disk)
            path, delta = (m / "disk", 0) if t % 2 == 0 else (m / "disk-part2", 16 * SECTOR)
            with opened(path, os.O_RDWR) as fd:
                for rnd in range(6):
                    for k in range(region // (stripe * nthreads)):
                        off = 16 * SECTOR + (k * nthreads + t) * stripe
                        val = bytes([(t * 16 + rnd) & 0xff]) * stripe
                        assert os.pwrite(fd, val, off - delta) == stripe
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors
    for t in range(nthreads):
        for k in range(region // (stripe * nthreads)):
            off = 16 * SECTOR + (k * nthreads + t) * stripe
            model[off:off + stripe] = bytes([(t * 16 + 5) & 0xff]) * stripe
    assert read_file(m / "disk") == bytes(model)
    assert nbd_read(srv.uri(), request_size=65536, extents=False) == bytes(model)


# ---------------------------------------------------------------- block sizes and odd sizes

def test_4096_minimum_server_byte_writes(server, mount):
    srv = server("--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=4096",
                 "blocksize-preferred=65536", "blocksize-maximum=1048576",
                 "blocksize-error-policy=error")
    m = mount(srv.uri())
    model = bytearray(MiB)
    with opened(m / "disk", os.O_RDWR) as fd:
        for off in (0, 1, 4095, 4096, 4097, 8191, 65535, MiB - 1):
            os.pwrite(fd, b"\x7f", off)
            model[off] = 0x7f
        os.pwrite(fd, b"ab" * 3000, 10000)
        model[10000:16000] = b"ab" * 3000
        assert os.pread(fd, 70000, 0) == bytes(model[:70000])
        os.fsync(fd)
    assert nbd_read(srv.uri()) == bytes(model)
    for r in srv.log.requests("Write") + srv.log.requests("Read"):
        assert r["offset"] % 4096 == 0 and r["count"] % 4096 == 0, r


def test_4096_minimum_and_size_not_a_multiple(server, mount):
    """1001K = 250.25 blocks of 4096. The last 1024 bytes cannot be reached by
    any request the server accepts (libnbd refuses too), so the SPEC only
    promises: size as the export's, every full block usable, the tail answers
    (data or an error) without hanging."""
    size = 1001 * 1024
    srv = server("--filter=blocksize-policy", "memory", str(size), "blocksize-minimum=4096",
                 "blocksize-error-policy=error")
    m = mount(srv.uri())
    f = m / "disk"
    assert os.path.getsize(f) == size
    last_full = (size // 4096) * 4096
    with opened(f, os.O_RDWR) as fd:
        assert os.pwrite(fd, b"END", last_full - 3) == 3
        assert os.pread(fd, 3, last_full - 3) == b"END"
        assert errno_of(os.pwrite, fd, b"x", size) == errno.ENOSPC
        try:
            os.pwrite(fd, b"tail", size - 4)
        except OSError:
            pass
        try:
            os.pread(fd, 10, size - 4)
        except OSError:
            pass
    assert nbd_read(srv.uri(), last_full - 3, 3, request_size=4096, extents=False) == b"END"


def test_export_size_not_a_multiple_of_512(server, mount):
    srv = server("memory", "1000")
    m = mount(srv.uri())
    f = m / "disk"
    assert os.path.getsize(f) == 1000
    with opened(f, os.O_RDWR) as fd:
        assert os.pwrite(fd, b"0123456789", 990) == 10
        assert os.pread(fd, 100, 995) == b"56789"
        assert os.pread(fd, 10, 1000) == b""
        assert errno_of(os.pwrite, fd, b"x", 1000) == errno.ENOSPC
        assert os.pwrite(fd, b"abcdef", 997) == 3
        assert os.pwrite(fd, b"head", 0) == 4
    assert read_file(f) == b"head" + bytes(986) + b"0123456abc"
    assert nbd_read(srv.uri()) == b"head" + bytes(986) + b"0123456abc"


def test_read_only_server_gives_0444(nbdkit, mount):
    m = mount(nbdkit("-r", "pattern", "1M").uri())
    assert stat.S_IMODE(os.stat(m / "disk").st_mode) == 0o444
    assert errno_of(os.open, m / "disk", os.O_RDWR) == errno.EROFS
    assert _pread(m / "disk", 8, 8) == pattern_bytes(8, 8)


def test_large_sequential_io_crosses_max_block_size(server, mount):
    """Requests larger than the server's maximum are split (blocksize-policy
    with the error policy rejects anything bigger)."""
    srv = server("--filter=blocksize-policy", "memory", "8M", "blocksize-maximum=65536",
                 "blocksize-error-policy=error", log=False)
    m = mount(srv.uri())
    data = os.urandom(3 * MiB)
    with opened(m / "disk", os.O_RDWR) as fd:
        assert os.pwrite(fd, data, 12345) == len(data)
        assert os.pread(fd, len(data), 12345) == data
    assert nbd_read(srv.uri(), 12345, len(data), request_size=65536) == data


# ---------------------------------------------------------------- servers lacking features

def test_o_sync_without_fua_write_then_flush(server, mount):
    srv = server("eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero", "can_write=exit 0",
                 "pwrite=cat >/dev/null", "can_flush=exit 0", "flush=exit 0",
                 "can_fua=echo none")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_WRONLY | os.O_DSYNC) as fd:
        srv.log.clear()
        os.pwrite(fd, b"s" * 4096, 8192)
        reqs = srv.log.requests()
        writes = [i for i, r in enumerate(reqs) if r["kind"] == "Write"]
        assert writes, srv.log.text()
        assert all(r.get("fua", 0) == 0 for r in reqs if r["kind"] == "Write")
        assert any(r["kind"] == "Flush" for r in reqs[writes[-1] + 1:]), srv.log.text()


def test_punch_and_zero_without_server_write_zeroes(server, mount):
    """A server with no WRITE_ZEROES: the range still reads back as zeros."""
    srv = server("--filter=nozero", "memory", "1M", "zeromode=none")
    m = mount(srv.uri())
    with opened(m / "disk", os.O_RDWR) as fd:
        os.pwrite(fd, b"\x77" * 65536, 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 10000)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 30000, 5000)
        want = bytearray(b"\x77" * 65536)
        want[1000:11000] = bytes(10000)
        want[30000:35000] = bytes(5000)
        assert os.pread(fd, 65536, 0) == bytes(want)
    assert nbd_read(srv.uri(), 0, 65536) == bytes(want)
    assert srv.log.requests("Zero") == []


def test_server_error_is_eio_at_once(tmp_path, server, mount):
    """A connected server that answers with an error is not unreachable: EIO
    without waiting for the timeout, and I/O works again once it recovers."""
    inject = tmp_path / "inject"
    srv = server("--filter=error", "pattern", "4M", "error-rate=100%", f"error-file={inject}",
                 "error=EIO", log=False)
    m = mount(srv.uri())      # default timeout: 60 s
    import mmap
    import time

    def direct_read(off):
        buf = mmap.mmap(-1, 4096)
        with opened(m / "disk", os.O_RDONLY | os.O_DIRECT) as fd:
            os.preadv(fd, [buf], off)
            return bytes(buf)
    assert direct_read(0) == pattern_bytes(0, 4096)
    inject.write_text("")
    t0 = time.monotonic()
    assert errno_of(direct_read, MiB) == errno.EIO
    assert time.monotonic() - t0 < 30, "a server error waited like a lost server"
    inject.unlink()
    assert direct_read(2 * MiB) == pattern_bytes(2 * MiB, 4096)


@pytest.mark.parametrize("direct", [0, 1], ids=["buffered", "direct"])
def test_fio_verify(tmp_path, server, mount, direct):
    """fio: 4 jobs of random writes (sizes not multiples of the sector in the
    buffered run), each on its own range of a partition file, then verified;
    bounded to 4 x 2 MiB."""
    srv = server("memory", "16M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    bs = "4k-64k" if direct else "1000-9000"
    cmd = ["fio", "--name=nbdfs", f"--filename={m / 'disk-part2'}", "--rw=randwrite",
           f"--bsrange={bs}", "--size=2M", "--numjobs=4", "--offset_increment=2M",
           f"--direct={direct}", "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1",
           "--do_verify=1", "--group_reporting", "--output-format=terse",
           "--randseed=42", "--verify_state_save=0"]
    if not direct:
        cmd.append("--bs_unaligned=1")
    r = run(cmd, check=False, timeout=600)
    assert r.returncode == 0, r.stdout.decode()[-2000:] + r.stderr.decode()[-2000:]


def test_coherence_readahead_and_mmap(server, mount):
    """Pages the kernel read ahead (never asked for by the test) and pages
    mapped with mmap are invalidated too when an alias is written."""
    srv = server("memory", "8M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    base = 2048 * SECTOR
    exp, part = m / "disk", m / "disk-part2"
    # a small read at the start of the partition: readahead fills more
    assert _pread(part, 0, 4096) == bytes(4096)
    with open(exp, "r+b") as f:
        f.seek(base + 200000)
        f.write(b"readahead-window")
    assert _pread(part, 200000, 16) == b"readahead-window"
    # mmap of the export, then a write through the partition
    with open(exp, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert mm[base + 300000:base + 300004] == bytes(4)
            with open(part, "r+b") as g:
                g.seek(300000)
                g.write(b"MMAP")
            assert mm[base + 300000:base + 300004] == b"MMAP"
        finally:
            mm.close()


def test_coherence_with_a_loop_device(server, mount, loopdev):
    """Write through the export file while a loop device on the partition
    file is attached: an O_DIRECT read of the loop device sees it."""
    srv = server("memory", "8M", log=False)
    m = mount(srv.uri(), opts=["-o", "split=disk:2048"])
    dev = loopdev(m / "disk-part2")
    base = 2048 * SECTOR

    def dev_read(off, n):
        buf = mmap.mmap(-1, 4096)
        with opened(dev, os.O_RDONLY | os.O_DIRECT) as fd:
            os.preadv(fd, [buf], off)
            return bytes(buf[:n])
    assert dev_read(8192, 8) == bytes(8)
    with open(m / "disk", "r+b") as f:
        f.seek(base + 8192)
        f.write(b"via-disk")
    assert dev_read(8192, 8) == b"via-disk"
    # and the reverse: through the loop device, seen in the export file
    buf = mmap.mmap(-1, 4096)
    buf.write(b"via-loop" + bytes(4088))
    with opened(dev, os.O_WRONLY | os.O_DIRECT) as fd:
        os.pwrite(fd, buf, 16384)
        os.fsync(fd)
    assert _pread(m / "disk", base + 16384, 8) == b"via-loop"
    assert nbd_read(srv.uri(), base + 16384, 8) == b"via-loop"
