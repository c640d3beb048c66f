"""SPEC §5, row "server restarted before a flush" (and "server gone", "server
silent"): a successful fsync always means the data is on the server.  A
writer puts distinct checksummed 64 KiB blocks on an nbdfs file, each written
then fsync'd, while the server is stopped and resumed (shorter and longer than
io_timeout), killed while an fsync waits, killed anywhere, and restarted on
the same socket, over and over.  Afterwards every block whose own fsync
succeeded is on the backing file with its exact bytes; fsyncs that failed are
allowed.  Run against a persistent server (`nbdkit file`) and against one
whose writeback cache a kill loses (`--filter=cache cache=writeback`), where
nbdfs must replay what was acknowledged but not flushed, or fail the fsync.
The writer is a process of its own (see nbdfs_test.fsync_writer)."""
import pytest

from nbdfs_test.data import sparse_file
from nbdfs_test.fsync_writer import BLOCK, block_bytes, describe
from nbdfs_test.polling import wait_for

NBLOCKS = 256                  # a 16 MiB image; the writer wraps with a new generation
IO_TIMEOUT, TIMEOUT = 3, 10
CYCLES = 3


@pytest.mark.parametrize("cache", [False, True], ids=["persistent", "volatile-cache"])
def test_every_successful_fsync_survives_stops_kills_and_restarts(tmp_path, server, mount,
                                                                  stopped, fsync_writer, cache):
    img = sparse_file(tmp_path / "backing.img", NBLOCKS * BLOCK)
    args = (["--filter=cache", "file", img, "cache=writeback"] if cache else ["file", img])
    srv = server(*args, log=False)
    sock = srv.sock
    m = mount(srv.uri(), opts=["-o", f"timeout={TIMEOUT},io_timeout={IO_TIMEOUT}"],
              foreground=True)
    w = fsync_writer(m / "disk", NBLOCKS)
    kills_in_fsync = lost_by_server = crashes = 0

    def image_block(idx):
        with open(img, "rb") as f:
            f.seek(idx * BLOCK)
            return f.read(BLOCK)

    def restart():
        nonlocal srv
        srv = server(*args, log=False, sock=sock)

    def progress(more=3):
        """Waits until `more` further fsyncs succeeded (the server is usable
        again).  A server that died on its own meanwhile is restarted, as if
        killed: nbdkit 1.32 can abort (`sock >= 0' assertion) when a client
        drops a connection while it replies, which io_timeout does."""
        want = w.refresh().ok + more

        def cond():
            nonlocal crashes
            if srv.proc.poll() is not None:
                crashes += 1
                restart()
            return w.refresh().ok >= want or not w.alive()
        wait_for(cond, timeout=TIMEOUT + IO_TIMEOUT + 30,
                 what=lambda: f"{more} more successful fsyncs (ok={w.ok}, failed={w.failed})")
        if not w.alive():
            pytest.fail(f"the writer exited ({w.proc.returncode})")

    def waiting(for_s=0.1):
        return w.waiting_in("write", "fsync", for_s=for_s)

    progress(20)
    for _ in range(CYCLES):
        # stopped for less than io_timeout: the connection is kept
        stopped(srv.proc)
        wait_for(waiting, timeout=10, what="the writer to wait on the stopped server")
        stopped.cont(srv.proc)
        progress()
        # stopped past io_timeout: nbdfs drops the connection and resends
        stopped(srv.proc)
        wait_for(lambda: waiting(IO_TIMEOUT + 1), timeout=IO_TIMEOUT + 10,
                 what="a request to outlive io_timeout")
        stopped.cont(srv.proc)
        progress()
        # killed while an fsync waits: what the server acknowledged and had
        # not flushed dies with it (with the cache filter).  The writer is
        # paused after that attempt, so the block is looked at before the
        # writer wraps around to it again.
        for _attempt in range(20):
            stopped(srv.proc)
            wait_for(waiting, timeout=10, what="the writer to wait on the stopped server")
            if w.waiting_in("fsync"):
                break
            stopped.cont(srv.proc)      # it waits in write(2): again
            progress(1)
        if w.waiting_in("fsync"):
            kills_in_fsync += 1
            w.pause()
            idx, gen = w.current
            want = block_bytes(idx, gen)
            # (not yet on the image: the server holds it unflushed, and loses
            # it now; a client that flushes after each write leaves no window)
            lost_by_server += image_block(idx) != want
            srv.kill()
            restart()
            wait_for(lambda: w.refresh().latest[idx][1] is not None, timeout=TIMEOUT + 30,
                     what=f"the fsync of block {idx} to end")
            if w.latest[idx][1]:
                have = image_block(idx)
                assert have == want, (f"fsync of block {idx} generation {gen} succeeded across a "
                                      f"server kill, but the image has {describe(have)}\n"
                                      f"nbdfs log:\n{m.log()[-3000:]}")
            w.resume()
        else:
            srv.kill()
            restart()
        progress()
        # killed anywhere, and back at once
        srv.kill()
        restart()
        progress()
        # killed, and away while the writer waits
        srv.kill()
        wait_for(lambda: waiting(0.5), timeout=10, what="the writer to wait for the killed server")
        restart()
        progress()
    assert w.stop(TIMEOUT + IO_TIMEOUT + 30), "the writer did not stop"
    assert kills_in_fsync >= 2, f"only {kills_in_fsync} kills landed while an fsync waited"
    assert w.ok >= 50, (w.ok, w.failed, crashes)
    with open(img, "rb") as f:
        on_disk = f.read()
    lost = []
    for idx, (gen, ok) in sorted(w.latest.items()):
        have = on_disk[idx * BLOCK:(idx + 1) * BLOCK]
        if ok and have != block_bytes(idx, gen):
            lost.append(f"block {idx} generation {gen}: the image has {describe(have)}")
    assert not lost, (f"{len(lost)} blocks whose fsync succeeded are not on the server "
                      f"({w.ok} fsyncs succeeded, {w.failed} failed, {kills_in_fsync} kills "
                      f"during an fsync, {lost_by_server} writes lost by the server, {crashes} "
                      "server crashes):\n  "
                      + "\n  ".join(lost[:10]) + f"\nnbdfs log:\n{m.log()[-3000:]}")
