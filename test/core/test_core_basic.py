"""NBD client core vs nbdkit: data path, export shapes and feature flags
(protocol.md §3.3: read-only, odd sizes, 4096-byte blocks, --no-sr, hidden
flags, block status, NBD_CMD_DISC)."""
import os
import re

import pytest

from nbdfs_test.core import run_cli
from nbdfs_test.data import pattern_bytes
from nbdfs_test.polling import wait_for

KiB = 1024
MiB = 1024 * 1024


def errno_in(res, cmd, name):
    """True if nbdc-cli reported `CMD ...: NAME` on stderr."""
    return re.search(rf"nbdc-cli: {re.escape(cmd)} [0-9]+ [0-9]+: {name} ", res.stderr) is not None


def assert_errno(res, name, *cmds):
    """Each of @cmds failed with errno @name (errno_in)."""
    for cmd in cmds:
        assert errno_in(res, cmd, name), (cmd, res)


def log_ops(logfile):
    """The request names the nbdkit log filter saw, e.g. ['Read', 'Write']."""
    if not os.path.exists(logfile):
        return []
    return re.findall(r"connection=\d+ (\w+) id=", open(logfile).read())


def test_memory_roundtrip(nbdkit):
    srv = nbdkit("memory", "1M")
    info = run_cli(srv.uri(), "info")
    assert info.returncode == 0, info
    i = info.info()
    assert i["size"] == str(MiB)
    assert i["sector_size"] == "512"
    assert i["size_sectors"] == "2048"
    assert i["read_write"] == "1"
    assert i["protocol"] == "newstyle-fixed"
    assert i["structured_replies"] == "1"
    assert i["can_flush"] == "1" and i["can_trim"] == "1" and i["can_zero"] == "1"
    assert i["can_multi_conn"] == "1"
    assert i["can_block_status"] == "1"
    assert i["tls"] == "0"
    assert i["alive"] == "1"
    assert int(i["eflags"], 16) & 1, "HAS_FLAGS must be set"

    data = os.urandom(64 * KiB)
    res = run_cli(srv.uri(), "write", 8192, len(data), "flush", "read", 8192, len(data),
                  input=data)
    assert res.returncode == 0, res
    assert res.stdout == data
    # A new connection sees the data (the server keeps it).
    res = run_cli(srv.uri(), "read", 0, 8192 + len(data))
    assert res.returncode == 0, res
    assert res.stdout == bytes(8192) + data
    # Byte-granular I/O (no minimum block advertised).
    res = run_cli(srv.uri(), "write", 8193, 3, "read", 8192, 8, input=b"xyz")
    assert res.returncode == 0, res
    assert res.stdout == data[:1] + b"xyz" + data[4:8]


def test_zero_and_trim(nbdkit):
    srv = nbdkit("memory", "1M")
    res = run_cli(srv.uri(), "fill", 0, "64K", 0xab, "zero", 4096, 8192, "expect", 4096, 8192, 0,
                  "expect", 0, 4096, 0xab, "expect", 12288, 65536 - 12288, 0xab,
                  "trim", 32768, 4096, "flush")
    assert res.returncode == 0, res
    res = run_cli(srv.uri(), "zero", 0, 4096, "expect", 0, 4096, 0, opts=["--fua"])
    assert res.returncode == 0, res
    res = run_cli(srv.uri(), "fill", 0, 4096, 7, "expect", 0, 4096, 7, opts=["--fua"])
    assert res.returncode == 0, res


def test_pattern_verify(nbdkit):
    srv = nbdkit("pattern", "3M")
    res = run_cli(srv.uri(), "verify-pattern", 0, "3M", "verify-pattern", 12345, 999)
    assert res.returncode == 0, res
    res = run_cli(srv.uri(), "read", 1000, 100)
    assert res.returncode == 0, res
    assert res.stdout == pattern_bytes(1000, 100)


@pytest.mark.parametrize("plugin", [["-r", "memory", "1M"], ["pattern", "1M"]],
                         ids=["memory-r", "pattern"])
def test_read_only_export(nbdkit, tmp_path, plugin):
    """Writes, trims and zeroes on a read-only export fail with EROFS locally:
    nothing reaches the server."""
    log = str(tmp_path / "log")
    args = plugin[:-2] + ["--filter=log"] + plugin[-2:] + [f"logfile={log}"]
    srv = nbdkit(*args)
    res = run_cli(srv.uri(), "info", "write", 0, 512, "zero", 0, 512, "trim", 0, 512,
                  "fill", 0, 512, 1, "read", 0, 512, "alive",
                  input=bytes(512), opts=["-k"])
    assert res.info()["read_write"] == "0"
    assert int(res.info()["eflags"], 16) & 2, "READ_ONLY flag"
    assert res.returncode == 1, res
    assert_errno(res, "EROFS", "write", "zero", "trim", "fill")
    assert res.info()["alive"] == "1"
    ops = log_ops(log)
    assert "Read" in ops
    assert not {"Write", "Zero", "Trim"} & set(ops), f"requests reached the server: {ops}"


def test_size_not_multiple_of_512(nbdkit):
    srv = nbdkit("memory", "1000")
    res = run_cli(srv.uri(), "info")
    assert res.returncode == 0, res
    i = res.info()
    assert i["size"] == "1000"
    assert i["sector_size"] == "512"
    assert i["size_sectors"] == "1"
    data = os.urandom(10)
    res = run_cli(srv.uri(), "write", 990, 10, "read", 0, 1000, input=data)
    assert res.returncode == 0, res
    assert res.stdout == bytes(990) + data
    # Out of bounds: reads EINVAL, writes ENOSPC, no traffic needed.
    res = run_cli(srv.uri(), "read", 0, 1001)
    assert res.returncode == 1 and errno_in(res, "read", "EINVAL"), res
    res = run_cli(srv.uri(), "read", 1000, 1)
    assert res.returncode == 1 and errno_in(res, "read", "EINVAL"), res
    res = run_cli(srv.uri(), "write", 996, 8, input=bytes(8))
    assert res.returncode == 1 and errno_in(res, "write", "ENOSPC"), res
    res = run_cli(srv.uri(), "write", 1000, 8, input=bytes(8))
    assert res.returncode == 1 and errno_in(res, "write", "ENOSPC"), res


def test_size_not_multiple_of_512_truncate(nbdkit):
    srv = nbdkit("--filter=truncate", "pattern", "1M", "truncate=1000")
    res = run_cli(srv.uri(), "info", "verify-pattern", 0, 1000)
    assert res.returncode == 0, res
    assert res.info()["size"] == "1000"


def test_4096_minimum_block(nbdkit, tmp_path):
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "--filter=blocksize-policy", "memory", "4M",
                 "blocksize-minimum=4096", "blocksize-preferred=64K", "blocksize-maximum=1M",
                 "blocksize-error-policy=error", f"logfile={log}")
    res = run_cli(srv.uri(), "info")
    assert res.returncode == 0, res
    i = res.info()
    assert (i["block_min"], i["block_pref"], i["block_max"]) == ("4096", "65536", str(MiB))
    assert i["sector_size"] == "4096"
    assert i["size_sectors"] == "1024"
    assert i["max_request"] == str(MiB)
    data = os.urandom(4 * MiB)
    # Requests above block_max are split; no request the server sees exceeds it.
    res = run_cli(srv.uri(), "write", 0, 4 * MiB, "read", 0, 4 * MiB, input=data)
    assert res.returncode == 0, res
    assert res.stdout == data
    counts = [int(c, 16) for c in re.findall(r" (?:Read|Write) id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)",
                                             open(log).read())]
    assert counts and max(counts) <= MiB, counts
    # Unaligned requests fail locally with EINVAL (the server would refuse them).
    before = len(log_ops(log))
    res = run_cli(srv.uri(), "read", 512, 512, "read", 0, 512, "write", 4096, 1000, "zero", 100, 4096,
                  "trim", 4096, 100, "alive", input=bytes(1000), opts=["-k"])
    assert res.returncode == 1, res
    assert_errno(res, "EINVAL", "read", "write", "zero", "trim")
    assert res.info()["alive"] == "1"
    assert len(log_ops(log)) == before, "unaligned requests reached the server"


def test_4096_minimum_block_odd_size(nbdkit):
    """1001K = 250.25 blocks of 4096: the size is reported as is, the tail
    is unreachable (EINVAL), the whole blocks work."""
    srv = nbdkit("--filter=blocksize-policy", "memory", "1001K", "blocksize-minimum=4096",
                 "blocksize-error-policy=error")
    res = run_cli(srv.uri(), "info")
    assert res.returncode == 0, res
    i = res.info()
    assert i["size"] == str(1001 * KiB)
    assert i["sector_size"] == "4096"
    assert i["size_sectors"] == "250"
    res = run_cli(srv.uri(), "fill", 0, 250 * 4096, 0x5a, "expect", 0, 250 * 4096, 0x5a)
    assert res.returncode == 0, res
    res = run_cli(srv.uri(), "read", 250 * 4096, 4096)
    assert res.returncode == 1 and errno_in(res, "read", "EINVAL"), res
    res = run_cli(srv.uri(), "read", 250 * 4096, 1024)
    assert res.returncode == 1 and errno_in(res, "read", "EINVAL"), res


def test_4096_minimum_block_scripted(nbdkit):
    srv = nbdkit("eval", "block_size=echo 4K 64K 32M", "get_size=echo 1M",
                 "pread=head -c $3 /dev/zero")
    res = run_cli(srv.uri(), "info", "read", 0, 8192, "read", 0, 512, opts=["-k"])
    i = res.info()
    assert (i["block_min"], i["block_pref"], i["block_max"]) == ("4096", "65536", str(32 * MiB))
    assert i["max_request"] == str(32 * MiB)
    assert res.returncode == 1 and errno_in(res, "read", "EINVAL"), res
    assert res.stdout.endswith(bytes(8192)) or bytes(8192) in res.stdout


@pytest.mark.parametrize("where", ["server", "client"])
def test_simple_replies(nbdkit, where):
    """--no-sr (server) or structured_replies=FALSE (client): simple replies
    only, data path works, block status is EOPNOTSUPP."""
    if where == "server":
        srv = nbdkit("--no-sr", "memory", "1M")
        opts = []
    else:
        srv = nbdkit("memory", "1M")
        opts = ["--no-sr"]
    data = os.urandom(128 * KiB)
    res = run_cli(srv.uri(), "info", "write", 4096, len(data), "read", 4096, len(data),
                  input=data, opts=opts)
    assert res.returncode == 0, res
    i = res.info()
    assert i["structured_replies"] == "0"
    assert i["can_block_status"] == "0"
    assert res.stdout.endswith(data)
    for cmd in ("extents", "aio-extents"):
        res = run_cli(srv.uri(), cmd, 0, 4096, opts=opts)
        assert res.returncode == 1 and errno_in(res, cmd, "EOPNOTSUPP"), res


def _file_eval(path, *extra):
    """eval plugin backed by a file, with the given extra callbacks."""
    return ["eval", "get_size=echo 1M",
            f"pread=dd if={path} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none",
            "can_write=exit 0",
            f"pwrite=dd of={path} oflag=seek_bytes seek=$4 conv=notrunc iflag=fullblock status=none",
            ] + list(extra)


def test_flags_hidden(nbdkit, tmp_path):
    """No FLUSH, FUA, TRIM or WRITE_ZEROES: flush is a no-op success, FUA
    writes are plain writes, zero is emulated with writes, trim EOPNOTSUPP."""
    backing = tmp_path / "disk"
    backing.write_bytes(b"\xff" * MiB)
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "--filter=nozero",
                 *_file_eval(backing, "can_flush=exit 3", "can_fua=echo none", "can_trim=exit 3",
                             "can_multi_conn=exit 3"),
                 "zeromode=none", f"logfile={log}")
    res = run_cli(srv.uri(), "info")
    assert res.returncode == 0, res
    i = res.info()
    assert (i["can_flush"], i["can_fua"], i["can_trim"], i["can_zero"]) == ("0", "0", "0", "0")
    res = run_cli(srv.uri(), "flush")
    assert res.returncode == 0, res
    data = os.urandom(4096)
    res = run_cli(srv.uri(), "write", 0, 4096, "read", 0, 4096, input=data, opts=["--fua"])
    assert res.returncode == 0, res
    assert res.stdout == data
    res = run_cli(srv.uri(), "zero", 8192, 16384, "expect", 8192, 16384, 0,
                  "expect", 4096, 4096, 0xff, "expect", 24576, 4096, 0xff)
    assert res.returncode == 0, res
    assert backing.read_bytes()[8192:24576] == bytes(16384)
    res = run_cli(srv.uri(), "trim", 0, 4096)
    assert res.returncode == 1 and errno_in(res, "trim", "EOPNOTSUPP"), res
    ops = set(log_ops(log))
    assert not {"Flush", "Zero", "Trim"} & ops, ops
    assert "Write" in ops


def test_fua_emulated_by_flush(nbdkit, tmp_path):
    """SEND_FLUSH but no SEND_FUA: a FUA write is a write followed by a flush."""
    backing = tmp_path / "disk"
    backing.write_bytes(bytes(MiB))
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", *_file_eval(backing, "can_flush=exit 0", "flush=exit 0",
                                             "can_fua=echo none"), f"logfile={log}")
    res = run_cli(srv.uri(), "info")
    assert (res.info()["can_flush"], res.info()["can_fua"]) == ("1", "0"), res
    res = run_cli(srv.uri(), "write", 0, 4096, input=os.urandom(4096), opts=["--fua"])
    assert res.returncode == 0, res
    ops = log_ops(log)
    assert "Write" in ops and "Flush" in ops[ops.index("Write"):], ops
    assert "fua=1" not in open(log).read()


def test_fua_sent_when_supported(nbdkit, tmp_path):
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "memory", "1M", f"logfile={log}")
    res = run_cli(srv.uri(), "write", 0, 4096, input=os.urandom(4096), opts=["--fua"])
    assert res.returncode == 0, res
    assert re.search(r"Write id=\d+ offset=0x0 count=0x1000 fua=1", open(log).read()), \
        open(log).read()


def _extents(res):
    out = []
    for line in res.text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    assert "NONCONTIGUOUS" not in res.text and "NOPROGRESS" not in res.text, res.text
    return out


def _merge(extents):
    merged = []
    for off, length, flags in extents:
        if merged and merged[-1][2] == flags and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, flags)
        else:
            merged.append((off, length, flags))
    return merged


EXTENTS = pytest.mark.parametrize("cmd", ["extents", "aio-extents"],
                                  ids=["sync", "aio"])


@EXTENTS
def test_block_status_memory(nbdkit, cmd):
    srv = nbdkit("memory", "1M")
    res = run_cli(srv.uri(), "fill", 65536, 65536, 1, cmd, 0, MiB)
    assert res.returncode == 0, res
    ext = _extents(res)
    assert ext[0][0] == 0
    assert sum(e[1] for e in ext) == MiB
    for off, length, flags in ext:
        if off < 131072 and off + length > 65536:
            assert flags & 1 == 0, f"written range reported as a hole: {ext}"
        if off >= 262144:
            assert flags & 1, f"untouched range reported as data: {ext}"
    # A sub-range: extents stay inside the request.
    res = run_cli(srv.uri(), cmd, 60000, 10000)
    assert res.returncode == 0, res
    ext = _extents(res)
    assert ext[0][0] == 60000 and sum(e[1] for e in ext) == 10000, ext


@EXTENTS
def test_block_status_sparse_random(nbdkit, cmd):
    """Our extents agree with nbdinfo --map (libnbd as the oracle)."""
    import json
    import subprocess
    srv = nbdkit("sparse-random", "4M", "seed=42", "percent=30", "runlength=65536")
    res = run_cli(srv.uri(), cmd, 0, 4 * MiB)
    assert res.returncode == 0, res
    ours = _merge([(o, l, f & 3) for o, l, f in _extents(res)])
    m = subprocess.run(["nbdinfo", "--map", "--json", srv.uri()], stdout=subprocess.PIPE,
                       check=True, timeout=60)
    theirs = _merge([(e["offset"], e["length"], e["type"] & 3) for e in json.loads(m.stdout)])
    assert ours == theirs
    assert any(f & 1 for _, _, f in ours) and any(not f & 1 for _, _, f in ours)


def test_disconnect_sends_disc(nbdkit, tmp_path):
    """A clean end sends NBD_CMD_DISC on every connection (nbdkit -v says so)."""
    srv = nbdkit("-v", "memory", "1M")
    res = run_cli(srv.uri(), "write", 0, 4096, "flush", "info", input=bytes(4096))
    assert res.returncode == 0, res
    nconn = int(res.info()["connections"])
    srv.kill(sig=15)
    err = srv.proc.stderr.read().decode(errors="replace")
    assert err.count("client sent NBD_CMD_DISC") >= nconn, err[-3000:]


def test_disconnect_log(nbdkit, tmp_path):
    """The log filter shows the flush, then each connection's disconnect."""
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "memory", "1M", f"logfile={log}")
    res = run_cli(srv.uri(), "write", 0, 4096, "flush", "info", input=bytes(4096),
                  opts=["--connections", "1"])
    assert res.returncode == 0, res
    wait_for(lambda: "Disconnect" in open(log).read(), timeout=10, what="Disconnect in the log")
    text = open(log).read()
    assert text.index("Flush") < text.rindex("Disconnect")


def test_explicit_disconnect(nbdkit):
    srv = nbdkit("memory", "1M")
    res = run_cli(srv.uri(), "read", 0, 512, "disconnect", "alive", "read", 0, 512, "flush",
                  opts=["-k"])
    assert res.returncode == 1, res
    assert "alive=0" in res.text
    assert errno_in(res, "read", "ENOTCONN"), res
    assert errno_in(res, "flush", "ENOTCONN"), res


def test_debug_log(nbdkit):
    """debug=TRUE: one log line per request; debug=FALSE: none."""
    srv = nbdkit("memory", "1M")
    res = run_cli(srv.uri(), "read", 0, 512, "read", 512, 512, "flush", opts=["--debug"])
    assert res.returncode == 0, res
    assert len(re.findall(r"core debug", res.stderr)) >= 3, res.stderr
    res = run_cli(srv.uri(), "read", 0, 512, "read", 512, 512, "flush")
    assert res.returncode == 0, res
    assert "core debug" not in res.stderr, res.stderr


def test_description_empty_when_none(nbdkit):
    srv = nbdkit("memory", "1M")
    res = run_cli(srv.uri(), "info")
    assert res.info()["description"] == ""
    assert res.info()["export_name"] == ""


def test_block_status_req_one(nbdkit):
    """REQ_ONE: one extent per reply; looping over the range gives the same map."""
    srv = nbdkit("sparse-random", "2M", "seed=7", "percent=40", "runlength=65536")
    full = run_cli(srv.uri(), "aio-extents", 0, 2 * MiB)
    one = run_cli(srv.uri(), "aio-extents", 0, 2 * MiB, opts=["--req-one"])
    assert full.returncode == 0 and one.returncode == 0, (full, one)
    assert _merge([(o, n, f & 3) for o, n, f in _extents(one)]) == \
        _merge([(o, n, f & 3) for o, n, f in _extents(full)])


def test_fast_zero(nbdkit):
    srv = nbdkit("memory", "1M")
    res = run_cli(srv.uri(), "info", "fill", 0, 8192, 1, "zero", 0, 8192, "expect", 0, 8192, 0,
                  opts=["--fast-zero"])
    assert res.info()["can_fast_zero"] == "1"
    assert res.returncode == 0, res
