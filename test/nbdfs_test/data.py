"""Bytes and files: the `pattern` plugin's contents, the server read straight
with libnbd's nbdcopy/nbdinfo (an oracle independent of nbdfs), file reads and
writes (O_DIRECT too; an fd closed at the end of a block), random and sparse
images (with sfdisk tables), nbdfs's xattrs (the state and the stats of a
file), fallocate(2), a call's errno and how long it took."""
import contextlib
import ctypes
import ctypes.util
import json
import mmap
import os
import re
import select
import struct
import subprocess
import time

import pytest

from nbdfs_test.polling import run


SECTOR = 512
MiB = 1024 * 1024


def pattern_bytes(off, length):
    """The bytes of nbdkit's `pattern` plugin at [off, off+length): every
    8-byte big-endian word holds its own offset."""
    if length <= 0:
        return b""
    start = off & ~7
    end = (off + length + 7) & ~7
    n = (end - start) // 8
    buf = struct.pack(f">{n}Q", *range(start, end, 8))
    return buf[off - start:off - start + length]


def nbd_size(uri):
    """Export size as the server reports it (nbdinfo)."""
    return int(run(["nbdinfo", "--size", uri], timeout=60).stdout.decode().strip())


def nbd_read(uri, off=0, length=None, timeout=120, request_size=None, extents=True):
    """Reads [off, off+length) of the export straight from the server with
    nbdcopy (independent of nbdfs). length None: to the end. request_size:
    nbdcopy's request size (for servers with a small maximum block size)."""
    cmd = ["nbdcopy", "--synchronous"]
    if request_size:
        cmd.append(f"--request-size={request_size}")
    if not extents:
        cmd.append("--no-extents")
    p = subprocess.Popen(cmd + [uri, "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd = p.stdout.fileno()
    deadline = time.monotonic() + timeout

    def chunk(n):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"nbd_read {uri}: no data within {timeout}s (is the server "
                        f"refusing a second client?)")
        return os.read(fd, n)
    try:
        skip = off
        while skip > 0:
            c = chunk(min(skip, MiB))
            if not c:
                break
            skip -= len(c)
        out = []
        want = length
        while want is None or want > 0:
            c = chunk(MiB if want is None else min(want, MiB))
            if not c:
                break
            out.append(c)
            if want is not None:
                want -= len(c)
        if want:
            rc = p.wait(timeout=30)
            if rc != 0:
                pytest.fail(f"nbdcopy {uri} failed ({rc}): {p.stderr.read().decode(errors='replace')}")
        return b"".join(out)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        p.stdout.close()
        p.stderr.close()


def nbd_write_file(path, uri, timeout=120):
    """Copies a local file to the start of the export with nbdcopy."""
    run(["nbdcopy", "--synchronous", "--flush", str(path), uri], timeout=timeout)


def file_text(path):
    """The text of a log or stderr file (bad bytes replaced); "" while there
    is none (path None, or no such file yet)."""
    if path is None:
        return ""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def opened(path, flags):
    """`with opened(path, os.O_RDWR) as fd:` an os.open() fd, closed at the
    end of the block whatever happens in it."""
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def read_file(path, off=0, length=None):
    with open(path, "rb", buffering=0) as f:
        f.seek(off)
        if length is None:
            return f.read()
        out = b""
        while len(out) < length:
            c = f.read(length - len(out))
            if not c:
                break
            out += c
        return out


def pwrite_file(path, off, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        n = os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    return n


def direct_pread(path, off, n):
    """An O_DIRECT read of n bytes at off (an aligned buffer): the page cache
    can neither answer it nor hide it from nbdfs's counters."""
    buf = mmap.mmap(-1, max(n, 1))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)
        buf.close()


def direct_pwrite(path, off, data, fd=None):
    """An O_DIRECT write of data at off (copied to an aligned buffer) through
    path, or through fd (opened with O_DIRECT) when given; returns the count."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    own = fd is None
    if own:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        return os.pwrite(fd, buf, off)
    finally:
        if own:
            os.close(fd)
        buf.close()


def random_image(path, size):
    """A file of size random bytes (for nbdkit's file plugin); returns
    (str(path), the bytes), the contents to compare reads with."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return str(path), data


def sparse_file(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def sfdisk(path, script):
    """Writes a partition table with sfdisk (script on stdin) into a file."""
    r = subprocess.run(["sfdisk", "-q", "--wipe", "always", str(path)], input=script.encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"sfdisk {path} failed: {r.stderr.decode(errors='replace')}\n{script}")


def sfdisk_json(path):
    """The table as sfdisk --json sees it: {'label':..., 'partitions': [{'node', 'start',
    'size', 'type', 'uuid', 'name'}...]} with 'number' added (the node's suffix)."""
    t = json.loads(run(["sfdisk", "--json", str(path)], timeout=60).stdout)["partitiontable"]
    for p in t.get("partitions", []):
        p["number"] = int(re.search(r"(\d+)$", p["node"]).group(1))
    return t


def image(path, size, table=None):
    """A sparse image file of size bytes, with an sfdisk table if given."""
    sparse_file(path, size)
    if table:
        sfdisk(path, table)
    return str(path)


def getx(path, name):
    """A user.nbdfs.* attribute as text."""
    return os.getxattr(path, name).decode()


def setx(path, name, value):
    os.setxattr(path, name, value.encode() if isinstance(value, str) else value)


STATS_KEYS = ("reads", "writes", "bytes_read", "bytes_written", "errors", "reconnects",
              "in_flight")


def state(path):
    """user.nbdfs.state: idle, connected, reconnecting or failed."""
    return getx(path, "user.nbdfs.state").strip()


def stats(path):
    """user.nbdfs.stats as {key: int}, one `key=value` a line; fails the test
    on a line of another shape."""
    out = {}
    for line in getx(path, "user.nbdfs.stats").splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*([a-z_]+)=(\d+)\s*", line)
        if not m:
            pytest.fail(f"user.nbdfs.stats of {path}: line {line!r} is not key=value")
        out[m.group(1)] = int(m.group(2))
    return out


def set_partition(path, value):
    """setfattr -n user.nbdfs.partition -v VALUE PATH; raises OSError on failure."""
    setx(path, "user.nbdfs.partition", value)


_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    return _libc


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd, mode, off, length):
    """fallocate(2) with a mode; raises OSError with the errno on failure."""
    if libc().fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def errno_of(fn, *args, **kw):
    """Runs fn; returns the errno of the OSError it raised, or None."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return None


def timed(fn):
    """Runs fn(); returns (its value, None, seconds it took), or (None, the
    errno of the OSError it raised, seconds it took)."""
    t0 = time.monotonic()
    try:
        return fn(), None, time.monotonic() - t0
    except OSError as e:
        return None, e.errno, time.monotonic() - t0
