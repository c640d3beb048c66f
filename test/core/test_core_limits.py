"""NBD client core vs nbdkit: request splitting at the protocol's limits,
servers that vanish at awkward moments, handshake timeout, URIs."""
import os
import re
import signal
import socket

import pytest

from nbdfs_test.core import run_cli
from nbdfs_test.data import pattern_bytes
from nbdfs_test.servers import free_tcp_port, wait_tcp_listening

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB


def io_err(text, cmd, name):
    return re.search(rf"nbdc-cli: {re.escape(cmd)} [0-9]+ [0-9]+: {name} ", text) is not None


def kind(res, name):
    return re.search(rf"nbdc-cli: \w+: {name}: ", res.stderr) is not None


def logged(logfile, op):
    """(offset, count) of every request OP in an nbdkit log filter file."""
    return [(int(o, 16), int(c, 16)) for o, c in
            re.findall(rf" {op} id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)",
                       open(logfile).read())]


def covers(pieces, off, length):
    pieces = sorted(pieces)
    pos = off
    for o, c in pieces:
        if o != pos:
            return False
        pos += c
    return pos == off + length


def test_read_write_split_at_32M(nbdkit, tmp_path):
    """Without a block-size advertisement the largest READ/WRITE is 32 MiB:
    a 40 MiB request is split and reassembled in order."""
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "memory", "48M", f"logfile={log}")
    res = run_cli(srv.uri(), "info")
    assert res.info()["max_request"] == str(32 * MiB), res
    data = os.urandom(40 * MiB)
    res = run_cli(srv.uri(), "write", 4096, len(data), "read", 4096, len(data),
                  input=data, opts=["--connections", "1"], timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data
    for op in ("Write", "Read"):
        pieces = logged(log, op)
        assert max(c for _, c in pieces) <= 32 * MiB, pieces
        assert covers(pieces, 4096, len(data)), pieces


def test_zero_trim_split_above_4G(nbdkit, tmp_path):
    """TRIM/WRITE_ZEROES lengths are 32-bit: 5 GiB is split below 4 GiB."""
    log = str(tmp_path / "log")
    srv = nbdkit("--filter=log", "memory", "5G", f"logfile={log}")
    res = run_cli(srv.uri(), "fill", 5 * GiB - 4096, 4096, 9, "zero", 0, 5 * GiB,
                  "expect", 5 * GiB - 4096, 4096, 0, "trim", 0, 5 * GiB, timeout=300)
    assert res.returncode == 0, res
    for op in ("Zero", "Trim"):
        pieces = logged(log, op)
        assert pieces and max(c for _, c in pieces) < 4 * GiB, (op, pieces)
        assert covers(pieces, 0, 5 * GiB), (op, pieces)


def test_block_status_large_export(nbdkit):
    srv = nbdkit("memory", "5G")
    res = run_cli(srv.uri(), "fill", 4 * GiB + 65536, 65536, 1, "aio-extents", 0, 5 * GiB)
    assert res.returncode == 0, res
    ext = [tuple(int(x) for x in line.split()[:3]) for line in res.text.splitlines()
           if line[:1].isdigit()]
    assert ext[0][0] == 0 and sum(e[1] for e in ext) == 5 * GiB, ext
    assert any(o <= 4 * GiB + 65536 < o + n and not f & 1 for o, n, f in ext), ext


def test_server_dies_while_idle(nbdkit, repl):
    """The server goes away between requests: the next request fails with
    ENOTCONN at once (no hang, no other errno), and the reason is kept."""
    srv = nbdkit("pattern", "1M")
    r = repl(srv.uri(), opts=["--connections", "1"])
    ok, out = r.run("verify-pattern 0 4096")
    assert ok, r.stderr
    srv.kill(signal.SIGKILL)
    ok, _ = r.run("read 0 4096", timeout=30)
    assert not ok
    assert io_err(r.drain_stderr(), "read", "ENOTCONN"), r.stderr
    ok, out = r.run("alive")
    assert ok and "alive=0" in out and any(x.startswith("error=") for x in out), out


def test_server_dies_during_big_write(nbdkit):
    """The server dies while a 16 MiB write payload is being sent: ENOTCONN,
    never SIGPIPE."""
    srv = nbdkit("eval", "get_size=echo 32M", "can_write=exit 0",
                 "pwrite=kill -9 $PPID; sleep 1", "pread=head -c $3 /dev/zero",
                 "thread_model=echo serialize_requests")
    res = run_cli(srv.uri(), "write", 0, 16 * MiB, "alive", input=os.urandom(16 * MiB),
                  opts=["-k"], timeout=60)
    assert res.returncode == 1, res
    assert io_err(res.stderr, "write", "ENOTCONN"), res
    assert "alive=0" in res.text


def test_handshake_timeout(tmp_path):
    """A server that accepts and never speaks: TIMEOUT after the handshake
    timeout, not a hang."""
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(8)
        res = run_cli(f"nbd+unix:///?socket={path}", "info",
                      opts=["--handshake-timeout-ms", "1000"], timeout=60)
        assert res.returncode == 1, res
        assert kind(res, "TIMEOUT"), res
        res = run_cli(f"nbd+unix:///?socket={path}", "list",
                      opts=["--handshake-timeout-ms", "1000"], timeout=60)
        assert res.returncode == 1, res
        assert kind(res, "TIMEOUT"), res


def test_garbage_server(tmp_path):
    """Something that is not an NBD server: a HANDSHAKE error, quickly."""
    import threading
    path = str(tmp_path / "http.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            with c:
                c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(200))
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = run_cli(f"nbd+unix:///?socket={path}", "info", timeout=60)
        assert res.returncode == 1, res
        assert kind(res, "HANDSHAKE"), res
    finally:
        stop.set()
        t.join(5)
        srv.close()


def test_unreachable_tcp():
    port = free_tcp_port()
    res = run_cli(f"nbd://127.0.0.1:{port}/", "info", timeout=60)
    assert res.returncode == 1, res
    assert kind(res, "CONNECT"), res


def test_ipv6():
    # The shared fixture only knows 127.0.0.1; start on ::1 by hand.
    import subprocess
    from nbdfs_test.polling import kill_and_wait
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "::1", "-p", str(port),
                             "pattern", "1M"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_tcp_listening("::1", port, "nbdkit on [::1]", connect_timeout=0.2)
        res = run_cli(f"nbd://[::1]:{port}/", "info", "verify-pattern", 0, 65536)
        assert res.returncode == 0, res
        assert res.info()["size"] == str(MiB)
    finally:
        kill_and_wait(proc)


def test_percent_encoded_export_name(nbdkit):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-strict=true",
                 "exportname=hello world", "exportname=/abs")
    res = run_cli(f"nbd+unix:///hello%20world?socket={srv.sock}", "info")
    assert res.returncode == 0, res
    assert res.info()["export_name"] == "hello world"
    res = run_cli(f"nbd+unix:////abs?socket={srv.sock}", "info")
    assert res.returncode == 0, res
    assert res.info()["export_name"] == "/abs"


def test_list_details_200(nbdkit):
    script = 'echo NAMES; for i in $(seq 1 200); do echo exp$i; done'
    srv = nbdkit("eval", f"list_exports={script}", "get_size=echo 2M",
                 "pread=head -c $3 /dev/zero")
    res = run_cli(srv.uri(), "list", opts=["--details"], timeout=120)
    assert res.returncode == 0, res
    lines = [x.split("\t") for x in res.text.splitlines()]
    assert [x[0] for x in lines] == [f"exp{i}" for i in range(1, 201)]
    assert all(f"size={2 * MiB}" in x[2] for x in lines), lines[:3]


def test_pattern_large_unaligned_reads(nbdkit):
    srv = nbdkit("pattern", "64M")
    res = run_cli(srv.uri(), "read", 33 * MiB + 3, 5 * MiB + 5, timeout=120)
    assert res.returncode == 0, res
    assert res.stdout == pattern_bytes(33 * MiB + 3, 5 * MiB + 5)


@pytest.mark.parametrize("conns", ["1", "4"])
def test_requests_after_disconnect_fail_fast(nbdkit, conns):
    srv = nbdkit("memory", "1M")
    res = run_cli(srv.uri(), "disconnect", "disconnect", "write", 0, 512, "zero", 0, 512,
                  "trim", 0, 512, "aio-extents", 0, 512, "aio-reads", 512, 2, 0, 512,
                  input=bytes(512), opts=["-k", "--connections", conns], timeout=60)
    assert res.returncode == 1, res
    for cmd in ("write", "zero", "trim", "aio-extents"):
        assert io_err(res.stderr, cmd, "ENOTCONN"), (cmd, res)
    assert io_err(res.stderr, "aio-reads", "ENOTCONN"), res


def test_huge_export_bounds(nbdkit):
    """A 2^63-1 byte export: bounds checks never overflow."""
    top = 2 ** 63 - 1
    srv = nbdkit("null", str(top))
    res = run_cli(srv.uri(), "info", "read", top - 1, 1, "read", top - 1, 2,
                  "read", 2 ** 64 - 1, 2, "write", top, 1, "zero", top - 511, 1024,
                  "trim", 2 ** 64 - 512, 1024, "aio-extents", top - 511, 1024,
                  input=b"x", opts=["-k"])
    assert res.returncode == 1, res
    assert res.info()["size"] == str(top)
    assert io_err(res.stderr, "read", "EINVAL"), res
    assert res.stderr.count("EINVAL") >= 3, res.stderr
    assert io_err(res.stderr, "write", "ENOSPC"), res
    assert re.search(r"zero \d+ \d+: (ENOSPC|EINVAL)", res.stderr), res
    assert re.search(r"trim \d+ \d+: (ENOSPC|EINVAL)", res.stderr), res
    assert "alive=" not in res.text or "alive=1" in res.text


def test_backpressure_many_in_flight(nbdkit):
    """More requests than max_in_flight on one connection: callers wait,
    nothing deadlocks, every read gets its own data."""
    import hashlib
    srv = nbdkit("--filter=delay", "pattern", "4M", "delay-read=50ms")
    offs = [i * 8192 for i in range(300)]
    res = run_cli(srv.uri(), "aio-reads", 8192, len(offs), *offs,
                  opts=["--connections", "1"], timeout=300)
    assert res.returncode == 0, res
    done = [line.split() for line in res.text.splitlines() if line.startswith("done ")]
    assert sorted(int(d[1]) for d in done) == offs
    for d in done:
        assert d[2] == "0" and d[3] == hashlib.sha256(
            pattern_bytes(int(d[1]), 8192)).hexdigest(), d


def test_split_requests_with_one_slot(nbdkit):
    """A request split in pieces needs more than one slot over time:
    max_in_flight=1 must not deadlock."""
    srv = nbdkit("memory", "48M")
    res = run_cli(srv.uri(), "fill", 0, "40M", 3, "read", 0, "40M", "zero", 0, "40M",
                  "expect", 0, "40M", 0,
                  opts=["--max-in-flight", "1", "--connections", "1"], timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"\x03" * (40 * MiB)
