"""NBD client core vs nbdkit: server errors, slow servers, servers that die,
request timeouts and out-of-order replies."""
import hashlib
import os
import re
import signal
import time

import pytest

from nbdfs_test.core import run_cli
from nbdfs_test.data import pattern_bytes
from nbdfs_test.polling import wait_for
from nbdfs_test.servers import freeze

KiB = 1024
MiB = 1024 * 1024


def io_err(lines_or_text, cmd, name):
    text = lines_or_text if isinstance(lines_or_text, str) else "\n".join(lines_or_text)
    return re.search(rf"nbdc-cli: {re.escape(cmd)} [0-9]+ [0-9]+: {name} ", text) is not None


@pytest.mark.parametrize("sr", [True, False], ids=["structured", "simple"])
def test_error_filter_eio(nbdkit, repl, tmp_path, sr):
    """EIO from the server surfaces as EIO; the connection survives and works
    once the errors stop."""
    inject = tmp_path / "inject"
    inject.write_text("")
    srv = nbdkit("--filter=error", "pattern", "1M", "error-rate=100%", f"error-file={inject}")
    r = repl(srv.uri(), opts=[] if sr else ["--no-sr"])
    ok, _ = r.run("read 4096 4096")
    assert not ok
    assert io_err(r.drain_stderr(), "read", "EIO"), r.stderr
    ok, out = r.run("alive")
    assert ok and "alive=1" in out, out
    inject.unlink()
    out = r.ok("read 4096 4096")
    assert bytes.fromhex(out[0]) == pattern_bytes(4096, 4096)
    out = r.ok("verify-pattern 0 1M")
    r.close()


def test_error_filter_write_enospc(nbdkit):
    srv = nbdkit("--filter=error", "memory", "1M", "error-pwrite-rate=100%",
                 "error-pwrite=ENOSPC")
    res = run_cli(srv.uri(), "write", 0, 4096, "fill", 0, 512, 1, "read", 0, 512, "alive",
                  input=bytes(4096), opts=["-k"])
    assert res.returncode == 1, res
    assert io_err(res.stderr, "write", "ENOSPC"), res
    assert io_err(res.stderr, "fill", "ENOSPC"), res
    assert "alive=1" in res.text


def test_error_filter_random(nbdkit):
    """10% of reads fail: every failure is EIO, every success has the right
    data, the handle stays alive."""
    srv = nbdkit("--filter=error", "pattern", "1M", "error-pread-rate=10%")
    args = []
    for i in range(40):
        args += ["verify-pattern", i * 4096, 4096]
    res = run_cli(srv.uri(), *args, "alive", opts=["-k"])
    fails = re.findall(r"nbdc-cli: verify-pattern \d+ \d+: (\w+)", res.stderr)
    assert set(fails) <= {"EIO"}, res.stderr
    assert "mismatch" not in res.stderr
    assert res.text.count("pattern ok") + len(fails) == 40
    assert "alive=1" in res.text


def test_delay_filter(nbdkit):
    srv = nbdkit("--filter=delay", "pattern", "1M", "delay-read=300ms", "delay-write=300ms")
    offs = [i * 65536 for i in range(8)]
    res = run_cli(srv.uri(), "aio-reads", 4096, len(offs), *offs, "verify-pattern", 0, 65536)
    assert res.returncode == 0, res
    done = [line.split() for line in res.text.splitlines() if line.startswith("done ")]
    assert sorted(int(d[1]) for d in done) == offs
    for d in done:
        assert d[2] == "0"
        assert d[3] == hashlib.sha256(pattern_bytes(int(d[1]), 4096)).hexdigest()


def test_slow_server_within_timeout(nbdkit):
    """A slow but connected server is not an error when the timeout is longer."""
    srv = nbdkit("--filter=delay", "pattern", "1M", "delay-read=500ms")
    res = run_cli(srv.uri(), "verify-pattern", 0, 8192, opts=["--timeout-ms", "20000"])
    assert res.returncode == 0, res


def test_request_timeout(nbdkit, repl):
    """A request the server never answers fails with ETIMEDOUT after
    request_timeout_ms, the connection is dropped, later requests ENOTCONN."""
    # (the delay filter, not an eval `sleep`: its sleep ends with nbdkit)
    srv = nbdkit("--filter=delay", "pattern", "1M", "delay-read=3600")
    r = repl(srv.uri(), opts=["--timeout-ms", "1000"])
    ok, _ = r.run("read 0 4096", timeout=60)
    assert not ok
    assert io_err(r.drain_stderr(), "read", "ETIMEDOUT"), r.stderr
    ok, out = r.run("alive")
    assert ok and "alive=0" in out, out
    ok, _ = r.run("read 0 4096", timeout=30)
    assert not ok
    assert io_err(r.drain_stderr(), "read", "ENOTCONN"), r.stderr


def test_server_killed_mid_transfer_eval(nbdkit, repl):
    """The server dies while answering (eval kills nbdkit): the request fails
    with ENOTCONN, no hang, later requests fail at once."""
    srv = nbdkit("eval", "get_size=echo 4M",
                 "pread=if [ $4 -ge 2097152 ]; then kill -9 $PPID; sleep 1; fi; "
                 "head -c $3 /dev/zero")
    r = repl(srv.uri(), opts=["--connections", "1"])
    out = r.ok("read 0 4096")
    ok, _ = r.run("read 2097152 4096", timeout=60)
    assert not ok
    err = r.drain_stderr()
    assert io_err(err, "read", "ENOTCONN"), err
    ok, out = r.run("alive")
    assert ok and "alive=0" in out, out
    ok, _ = r.run("read 0 4096", timeout=10)
    assert not ok
    assert io_err(r.drain_stderr(), "read", "ENOTCONN"), r.stderr
    assert r.close() != 0


def test_server_killed_with_requests_in_flight(nbdkit, repl, tmp_path):
    """SIGKILL of the server while requests wait in the delay filter: every
    in-flight request completes with ENOTCONN."""
    log = tmp_path / "log"
    srv = nbdkit("--filter=log", "--filter=delay", "memory", "1M", "delay-read=30",
                 f"logfile={log}")
    r = repl(srv.uri(), opts=["--connections", "1"])
    out = r.ok("info")
    r.send("aio-reads 4096 4 0 4096 8192 12288")
    wait_for(lambda: log.exists() and len(re.findall(r" Read id=", log.read_text())) >= 4,
             timeout=30, what="4 reads to reach the server")
    srv.kill(signal.SIGKILL)
    ok, out = r.result(timeout=20)
    assert not ok
    done = [line.split() for line in out if line.startswith("done ")]
    assert len(done) == 4, out
    assert all(d[2] == "ENOTCONN" for d in done), out
    ok, out = r.run("alive")
    assert ok and "alive=0" in out


def test_out_of_order_replies(nbdkit, tmp_path):
    """Parallel server, slow low offsets: replies overtake each other and each
    lands in its own buffer."""
    backing = tmp_path / "disk"
    content = os.urandom(MiB)
    backing.write_bytes(content)
    srv = nbdkit("eval", "thread_model=echo parallel", "get_size=echo 1M",
                 "pread=if [ $4 -lt 65536 ]; then sleep 3; fi; "
                 f"dd if={backing} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none")
    offs = [0, 4096, 524288, 528384, 600000 // 4096 * 4096, 917504]
    res = run_cli(srv.uri(), "aio-reads", 4096, len(offs), *offs, opts=["--connections", "1"])
    assert res.returncode == 0, res
    done = [line.split() for line in res.text.splitlines() if line.startswith("done ")]
    order = [int(d[1]) for d in done]
    assert sorted(order) == sorted(offs)
    # The fast (high) offsets complete before the slow ones.
    assert set(order[:4]) == {o for o in offs if o >= 65536}, order
    for d in done:
        off = int(d[1])
        assert d[3] == hashlib.sha256(content[off:off + 4096]).hexdigest(), d


def test_serialized_server(nbdkit):
    srv = nbdkit("--filter=noparallel", "memory", "1M", "serialize=requests")
    res = run_cli(srv.uri(), "stress", 4, 300, 3)
    assert res.returncode == 0, res


def test_disconnect_waits_for_in_flight(nbdkit):
    """nbdc_disconnect with reads in flight on a slow server: they complete
    with their data, then NBD_CMD_DISC goes out."""
    srv = nbdkit("-v", "--filter=delay", "pattern", "1M", "delay-read=1")
    offs = [0, 65536, 131072]
    res = run_cli(srv.uri(), "aio-reads", 4096, len(offs), *offs,
                  opts=["--aio-disconnect", "--connections", "1"], timeout=120)
    assert res.returncode == 0, res
    done = [line.split() for line in res.text.splitlines() if line.startswith("done ")]
    assert len(done) == 3
    for d in done:
        assert d[2] == "0", done
        assert d[3] == hashlib.sha256(pattern_bytes(int(d[1]), 4096)).hexdigest()
    srv.kill(sig=signal.SIGTERM)
    assert "client sent NBD_CMD_DISC" in srv.proc.stderr.read().decode(errors="replace")


def test_disconnect_bounded_wait(nbdkit):
    """Requests that would take much longer than the disconnect bound: the
    disconnect still returns, the requests end with ENOTCONN, nothing hangs."""
    srv = nbdkit("--filter=delay", "pattern", "1M", "delay-read=300")
    res = run_cli(srv.uri(), "aio-reads", 4096, 2, 0, 4096,
                  opts=["--aio-disconnect", "--connections", "1"], timeout=120)
    assert res.returncode == 1, res
    done = [line.split() for line in res.text.splitlines() if line.startswith("done ")]
    assert [d[2] for d in done] == ["ENOTCONN", "ENOTCONN"], res


ERRNOS = ["EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "ESHUTDOWN"]


@pytest.mark.parametrize("code", ERRNOS)
@pytest.mark.parametrize("op", ["pread", "pwrite"])
def test_error_codes_map_to_errno(nbdkit, op, code):
    """Each NBD error code reaches the caller as the matching errno."""
    srv = nbdkit("--filter=error", "memory", "1M", f"error-{op}-rate=100%",
                 f"error-{op}={code}")
    cmd = ["read", 0, 4096] if op == "pread" else ["write", 0, 4096]
    res = run_cli(srv.uri(), *cmd, input=bytes(4096), opts=["--connections", "1"])
    assert res.returncode == 1, res
    assert io_err(res.stderr, cmd[0], code), res


@pytest.mark.parametrize("op,cmd", [("trim", "trim"), ("zero", "zero"),
                                    ("extents", "aio-extents")])
def test_error_other_commands(nbdkit, op, cmd):
    srv = nbdkit("--filter=error", "memory", "1M", f"error-{op}-rate=100%", f"error-{op}=EIO")
    args = [cmd] if cmd == "flush" else [cmd, 0, 4096]
    res = run_cli(srv.uri(), *args, "alive", "read", 0, 512, opts=["-k", "--connections", "1"])
    assert res.returncode == 1, res
    assert io_err(res.stderr, cmd, "EIO"), res
    assert "alive=1" in res.text
    assert f"nbdc-cli: read" not in res.stderr


def test_error_flush(nbdkit):
    """A flush after a write fails with the server's error.  (nbdkit 1.32's
    error filter cannot fail flushes: a scripted server does.)"""
    srv = nbdkit("eval", "get_size=echo 1M", "pread=head -c $3 /dev/zero",
                 "can_write=exit 0", "pwrite=cat >/dev/null", "can_flush=exit 0",
                 "flush=echo 'EIO flush failed' >&2; exit 1")
    res = run_cli(srv.uri(), "info", "write", 0, 512, "flush", "alive", "read", 0, 512,
                  input=bytes(512), opts=["-k"])
    assert res.info()["can_flush"] == "1"
    assert res.returncode == 1, res
    assert io_err(res.stderr, "flush", "EIO"), res
    assert "alive=1" in res.text


def flushes(log):
    return len(re.findall(r" Flush id=", log.read_text())) if log.exists() else 0


def test_flush_with_nothing_written_is_immediate_with_the_server_gone(nbdkit, repl, tmp_path):
    """A flush with nothing to cover (no write since the last flush that
    succeeded, or none ever) sends nothing and returns 0 at once, even with
    the server killed and a long reconnect timeout; after a write it goes to
    the server again."""
    log = tmp_path / "log"
    srv = nbdkit("--filter=log", "memory", "1M", f"logfile={log}")
    r = repl(srv.uri(), opts=["--reconnect-ms", "30000", "--connections", "2"])
    r.ok("read 0 4096")
    r.ok("flush")  # never wrote: nothing to flush
    assert flushes(log) == 0
    r.ok("fill 0 64k 7")  # a write: the next flush goes out
    r.ok("flush")
    wait_for(lambda: flushes(log) == 1, timeout=10, what="the flush in the server's log")
    r.ok("read 0 4096")  # reads leave nothing to flush
    r.ok("flush")
    assert flushes(log) == 1
    srv.kill(signal.SIGKILL)
    t0 = time.monotonic()
    r.ok("flush", timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert r.close() == 0


def test_flush_after_a_write_waits_for_the_server(nbdkit, repl, tmp_path):
    """With the server gone, a flush that has a write to cover is not skipped:
    it waits for a connection and fails with EIO when none comes in time."""
    log = tmp_path / "log"
    srv = nbdkit("--filter=log", "memory", "1M", f"logfile={log}")
    r = repl(srv.uri(), opts=["--reconnect-ms", "1500"])
    r.ok("fill 0 4096 1")
    srv.kill(signal.SIGKILL)
    t0 = time.monotonic()
    ok, _ = r.run("flush", timeout=20)
    elapsed = time.monotonic() - t0
    assert not ok
    assert io_err(r.drain_stderr(), "flush", "EIO"), r.stderr
    assert elapsed >= 1.0, elapsed
    assert flushes(log) == 0
    r.close()


def _done(lines):
    """aio-wait's lines: [(kind, offset, errno name, ms after the abandon)]."""
    out = []
    for line in lines:
        if line.startswith("done "):
            _, kind, off, err, ms = line.split()
            out.append((kind, int(off), err, float(ms.split("=")[1])))
    return out


ABANDON_MS = 200  # "promptly": well under any timeout, with room for a loaded CI host


def _aio_reads(r, n):
    """Starts @n background 4 KiB reads at offsets 0, 4096, ..."""
    for i in range(n):
        r.ok(f"aio-bg read {i * 4096} 4096")


def _abandon(r, n, cmd="abandon"):
    """Abandons the handle with @cmd and waits for the background requests:
    there are @n, each failed with ENOTCONN within ABANDON_MS.  Returns
    aio-wait's output lines and their _done() list."""
    r.ok(cmd)
    out = r.ok("aio-wait 10000", timeout=30)
    done = _done(out)
    assert [err for _, _, err, _ in done] == ["ENOTCONN"] * n, out
    assert max(ms for *_, ms in done) < ABANDON_MS, out
    return out, done


def test_abandon_fails_requests_on_a_silent_server_at_once(nbdkit, repl):
    """The server stops answering (SIGSTOP): requests in flight and queued
    behind max_in_flight all fail with ENOTCONN as soon as the handle is
    abandoned, each callback exactly once (nbdc-cli exits 4 otherwise)."""
    srv = nbdkit("memory", "1M")
    r = repl(srv.uri(), opts=["--connections", "1", "--max-in-flight", "4"])
    r.ok("read 0 512")
    freeze(srv.pid)
    try:
        _aio_reads(r, 8)
        r.ok("aio-bg write 65536 4096")
        _abandon(r, 9)
    finally:
        os.kill(srv.pid, signal.SIGCONT)
    assert r.close() == 0, r.stderr


def test_abandon_from_a_loop_fails_parked_requests_at_once(nbdkit, repl):
    """Server killed, reconnect with a long timeout: requests parked while
    the handle reconnects fail with ENOTCONN as soon as it is abandoned, here
    from a loop thread (a completion callback)."""
    srv = nbdkit("memory", "1M")
    r = repl(srv.uri(), opts=["--reconnect-ms", "60000", "--quiet-log"])
    r.ok("read 0 512")
    srv.kill(signal.SIGKILL)
    _aio_reads(r, 4)
    r.ok("aio-bg zero 0 4096")
    r.ok("aio-bg flush 0 0")
    _abandon(r, 6, cmd="abandon-on-loop")
    t0 = time.monotonic()
    assert r.close() == 0, r.stderr
    assert time.monotonic() - t0 < 2.0  # no connection left to wait for


def test_abandon_while_reconnecting_to_a_silent_server(nbdkit, repl):
    """The server stops answering (SIGSTOP); the request timeout drops the
    connection and the handle reconnects into a handshake nobody answers:
    abandon fails the parked requests with ENOTCONN at once and ends the
    attempt, so nothing is left for the teardown to wait for."""
    srv = nbdkit("memory", "1M")
    r = repl(srv.uri(), opts=["--connections", "1", "--timeout-ms", "300",
                              "--reconnect-ms", "60000"])
    r.ok("read 0 512")
    freeze(srv.pid)
    try:
        _aio_reads(r, 3)
        wait_for(lambda: "reconnecting" in r.drain_stderr(), timeout=20,
                 what="the request timeout to drop the connection")
        _abandon(r, 3)
        t0 = time.monotonic()
        assert r.close() == 0, r.stderr
        assert time.monotonic() - t0 < 2.0  # the attempt ended with the abandon
    finally:
        os.kill(srv.pid, signal.SIGCONT)


def test_abandon_ends_a_disconnect_waiting_for_a_silent_server(nbdkit, repl):
    """nbdc_disconnect waits (bounded, seconds) for requests in flight; an
    abandon from another thread meanwhile ends that wait at once."""
    srv = nbdkit("memory", "1M")
    r = repl(srv.uri(), opts=["--connections", "1"])
    r.ok("read 0 512")
    freeze(srv.pid)
    try:
        _aio_reads(r, 3)
        r.ok("disconnect-bg")
        out, _ = _abandon(r, 3)
    finally:
        os.kill(srv.pid, signal.SIGCONT)
    disc = [float(l.split("=")[1]) for l in out if l.startswith("disconnect ms=")]
    assert disc and disc[0] < ABANDON_MS, out
    assert r.close() == 0, r.stderr


def test_abandon_still_says_goodbye_on_idle_connections(nbdkit, repl):
    """One connection holds a request the server sits on (delay filter), the
    others are idle: abandon fails the request at once, and every idle
    connection still ends with NBD_CMD_DISC (nbdkit -v says so)."""
    srv = nbdkit("-v", "--filter=delay", "memory", "1M", "delay-read=20")
    r = repl(srv.uri(), opts=["--connections", "3"])
    ok, out = r.run("info")
    assert ok and "connections=3" in out, (out, r.stderr)
    r.ok("aio-bg read 0 4096")
    out, done = _abandon(r, 1)
    assert [(k, e) for k, _, e, _ in done] == [("read", "ENOTCONN")], out
    assert r.close() == 0, r.stderr
    srv.kill(signal.SIGKILL)
    err = srv.proc.stderr.read().decode(errors="replace")
    assert err.count("client sent NBD_CMD_DISC") == 2, err[-3000:]
