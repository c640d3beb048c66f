"""The NBD client core driven from Python (test/core): nbdc-cli, built as
$BUILD/test/core/nbdc-cli, run once (run_cli) or line by line (Repl)."""
import os
import selectors
import signal
import subprocess
import time

import pytest

from nbdfs_test.build import build_path
from nbdfs_test.polling import kill_and_wait, wait_for


CLI_TIMEOUT = 180


def cli_path():
    return build_path("test", "core", "nbdc-cli")


class CliResult:
    def __init__(self, proc, stdout, stderr):
        self.returncode = proc.returncode
        self.stdout = stdout
        self.stderr = stderr

    @property
    def text(self):
        return self.stdout.decode(errors="replace")

    def info(self):
        """key=value lines of `info` (and `alive`) as a dict."""
        out = {}
        for line in self.text.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
        return out

    def __repr__(self):
        return (f"<nbdc-cli rc={self.returncode} stdout={self.stdout[:400]!r} "
                f"stderr={self.stderr[-2000:]!r}>")


def run_cli(*args, input=None, timeout=CLI_TIMEOUT, opts=()):
    """Runs `nbdc-cli OPTS... ARGS...`; returns a CliResult (never raises on
    a nonzero exit).  A hang fails the test after `timeout` seconds."""
    exe = cli_path()
    if not os.path.exists(exe):
        pytest.fail(f"{exe} is not built (ninja -C $NBDFS_BUILD_DIR test/core/nbdc-cli)")
    cmd = [exe] + [str(o) for o in opts] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_and_wait(proc, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"nbdc-cli hung for {timeout}s: {' '.join(cmd)}\nstderr: "
                    f"{err.decode(errors='replace')[-2000:]}")
    return CliResult(proc, out, err.decode(errors="replace"))


class Repl:
    """nbdc-cli URI repl: one command line in, output lines then OK / ERR n out."""

    def __init__(self, uri, opts=()):
        exe = cli_path()
        if not os.path.exists(exe):
            pytest.fail(f"{exe} is not built")
        self.cmd = [exe, "--hex"] + [str(o) for o in opts] + [uri, "repl"]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.buf = b""
        self.errbuf = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
        self.sel.register(self.proc.stderr, selectors.EVENT_READ, "err")

    def send(self, line):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def _pump(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for key, _ in self.sel.select(timeout=min(left, 0.5)):
            data = os.read(key.fileobj.fileno(), 65536)
            if not data:
                self.sel.unregister(key.fileobj)
                continue
            if key.data == "out":
                self.buf += data
            else:
                self.errbuf += data
        return True

    def result(self, timeout=60):
        """Waits for the OK/ERR line of the last command: (ok, [output lines])."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.buf.split(b"\n")
            for i, line in enumerate(lines[:-1]):
                if line == b"OK" or line.startswith(b"ERR"):
                    self.buf = b"\n".join(lines[i + 1:])
                    return line == b"OK", [x.decode(errors="replace") for x in lines[:i]]
            if self.proc.poll() is not None and not self.sel.get_map():
                pytest.fail(f"nbdc-cli repl exited ({self.proc.returncode}); stderr: "
                            f"{self.stderr}")
            if not self._pump(deadline):
                pytest.fail(f"nbdc-cli repl: no answer within {timeout}s; stderr: {self.stderr}")

    def run(self, line, timeout=60):
        self.send(line)
        return self.result(timeout)

    def ok(self, line, timeout=60):
        """Runs @line, asserts it answered OK; returns its output lines."""
        ok, out = self.run(line, timeout)
        assert ok, (line, out, self.stderr)
        return out

    @property
    def stderr(self):
        return self.errbuf.decode(errors="replace")

    def drain_stderr(self, timeout=0.2):
        deadline = time.monotonic() + timeout
        while self._pump(deadline):
            pass
        return self.stderr

    def close(self, timeout=30):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_and_wait(self.proc, signal.SIGKILL)
            pytest.fail("nbdc-cli repl did not exit after stdin closed")
        finally:
            self.sel.close()
            for f in (self.proc.stdout, self.proc.stderr):
                f.close()
        return self.proc.returncode


def kill_server_under_stress(srv, log, cli_args):
    """Runs `nbdc-cli --quiet-log CLI_ARGS` (an 8-thread stress), kills the
    server with SIGKILL once its log shows >300 writes, and returns
    (returncode, stderr text) of the client."""
    proc = subprocess.Popen([cli_path(), "--quiet-log"] + [str(a) for a in cli_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for(lambda: log.exists() and log.read_text().count(" Write id=") > 300
                 or proc.poll() is not None, timeout=60, what="stress to get going")
        assert proc.poll() is None, proc.communicate()
        srv.kill(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_and_wait(proc, signal.SIGKILL)
    return proc.returncode, err.decode(errors="replace")
