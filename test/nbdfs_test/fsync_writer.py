"""The checksummed fsync'd writer of the durability tests, and its handle.

The writer runs as a process of its own (`python3 -m nbdfs_test.fsync_writer
FILE NBLOCKS JOURNAL STOPFILE PAUSEFILE`): while the test process holds a file with
unflushed writes open on a FUSE mount, every fork+exec it does (restarting a
server) closes a copy of that fd in the child, and each close is a FUSE FLUSH
that waits for the server.  Keeping the writer's fd out of the test process
keeps server restarts instant.

For n = 0, 1, ... it writes block n % NBLOCKS, generation n // NBLOCKS (64 KiB:
index, generation, crc32, then bytes drawn from both) with pwrite, then
fsyncs, and journals `B idx gen` before and `E idx gen ok` after each attempt
(ok 1 only when the write was whole and the fsync returned 0), until STOPFILE
exists; while PAUSEFILE exists it starts no new attempt (so the test can look
at a block before the writer wraps around and writes it again).  FsyncWriter (the test side) starts it, follows the journal, tells in
which call it waits (/proc/PID/syscall), and stops it."""
import os
import random
import struct
import subprocess
import sys
import time
import zlib

BLOCK = 65536
HEADER = struct.Struct(">QQI")  # index, generation, crc32 of the payload


def block_bytes(idx, gen):
    payload = random.Random(idx << 32 | gen).randbytes(BLOCK - HEADER.size)
    return HEADER.pack(idx, gen, zlib.crc32(payload)) + payload


def describe(buf):
    """What a block of the image holds, for a failure message."""
    if buf == bytes(len(buf)):
        return "zeros"
    idx, gen, crc = HEADER.unpack(buf[:HEADER.size])
    if zlib.crc32(buf[HEADER.size:]) == crc:
        return f"block {idx} generation {gen}"
    return "garbage (bad checksum)"


def _main(path, nblocks, journal, stopfile, pausefile):
    nblocks = int(nblocks)
    fd = os.open(path, os.O_RDWR)
    with open(journal, "a", buffering=1) as j:
        n = 0
        while not os.path.exists(stopfile):
            if os.path.exists(pausefile):
                time.sleep(0.005)     # polling the pause file
                continue
            idx, gen = n % nblocks, n // nblocks
            n += 1
            j.write(f"B {idx} {gen}\n")
            ok = 0
            try:
                if os.pwrite(fd, block_bytes(idx, gen), idx * BLOCK) == BLOCK:
                    os.fsync(fd)
                    ok = 1
            except OSError:
                pass
            j.write(f"E {idx} {gen} {ok}\n")
    try:
        os.close(fd)
    except OSError:
        pass


class FsyncWriter:
    """The test's side: .ok/.failed (attempts ended), .latest {idx: (gen, ok)}
    with ok None for an attempt not ended (yet), .current (idx, gen) of the
    attempt under way, .waiting_in(*calls, for_s=...), .pause()/.resume()."""

    CALLS = {"write": (1, 18, 20, 296, 328), "fsync": (74, 75)}   # x86_64 numbers

    def __init__(self, path, nblocks, journal, stopfile, pausefile):
        self.args = [str(path), str(nblocks), str(journal), str(stopfile), str(pausefile)]
        self.journal, self.stopfile, self.pausefile = str(journal), str(stopfile), str(pausefile)
        self.current = None
        self.proc = None
        self.ok = self.failed = self.begun = 0
        self.latest = {}
        self._pos = 0
        self._partial = ""
        self._seen = None

    def start(self, preexec_fn=None):
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=pkg_root)
        self.proc = subprocess.Popen([sys.executable, "-m", "nbdfs_test.fsync_writer"] + self.args,
                                     stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec_fn)
        return self

    def refresh(self):
        """Reads what the journal gained since the last call."""
        try:
            with open(self.journal) as f:
                f.seek(self._pos)
                chunk = f.read()
                self._pos = f.tell()
        except FileNotFoundError:
            return self
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            p = line.split()
            if p[0] == "B":
                self.begun += 1
                self.current = (int(p[1]), int(p[2]))
                self.latest[int(p[1])] = (int(p[2]), None)
            else:
                self.current = None
                ok = p[3] == "1"
                self.latest[int(p[1])] = (int(p[2]), ok)
                if ok:
                    self.ok += 1
                else:
                    self.failed += 1
        return self

    def pause(self):
        open(self.pausefile, "w").close()

    def resume(self):
        os.unlink(self.pausefile)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def waiting_in(self, *calls, for_s=0.1):
        """True once the writer has sat in one of `calls` ("write", "fsync")
        during one attempt for for_s seconds (as seen by this poller)."""
        self.refresh()
        try:
            with open(f"/proc/{self.proc.pid}/syscall") as f:
                first = f.read().split()[0]
            nr = int(first) if first.isdigit() else None
        except (OSError, IndexError):
            nr = None
        if not any(nr in self.CALLS[c] for c in calls):
            self._seen = None
            return False
        key = (nr, self.begun)
        now = time.monotonic()
        if self._seen is None or self._seen[0] != key:
            self._seen = (key, now)
        return now - self._seen[1] >= for_s

    def stop(self, timeout):
        """Asks the writer to stop after its current attempt; True if it did."""
        if self.proc is None:
            return True
        open(self.stopfile, "w").close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.refresh()
        return True

    def kill(self):
        """Clean-up: stops it, else SIGKILL (a FUSE wait ends on SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if not self.stop(30):
            self.proc.kill()
            self.proc.wait(timeout=60)


if __name__ == "__main__":
    _main(*sys.argv[1:])
