"""Real NBD servers as the tests see them: NbdServer (a process and where it
listens), LoggedServer (plus its stderr file and nbdkit's log filter), NbdLog
(the requests that filter recorded), and readiness checks.  The fixtures that
start and stop servers are in the conftest.py files."""
import ctypes
import os
import re
import signal
import socket
import time

import pytest

from nbdfs_test.data import file_text
from nbdfs_test.polling import kill_and_wait, wait_for


class NbdServer:
    """A real NBD server process listening on a Unix socket (or TCP port)."""

    def __init__(self, proc, sock=None, port=None, export=""):
        self.proc = proc
        self.sock = sock
        self.port = port
        self.export = export

    def uri(self, export=None, scheme="nbd"):
        name = self.export if export is None else export
        if self.sock:
            return f"{scheme}+unix:///{name}?socket={self.sock}"
        return f"{scheme}://127.0.0.1:{self.port}/{name}"

    @property
    def pid(self):
        return self.proc.pid

    def kill(self, sig=signal.SIGKILL):
        return kill_and_wait(self.proc, sig)


def _all_stopped(pid):
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # "pid (comm) S ...": comm may hold spaces and parentheses
                if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                    return False
    except FileNotFoundError:
        return False
    return True


def freeze(pid, timeout=10):
    """SIGSTOPs a server we started and waits until every one of its threads
    is stopped: the signal is delivered asynchronously, and a thread still
    running could answer a request sent just after the kill."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: _all_stopped(pid), timeout=timeout, what=f"pid {pid} to stop (SIGSTOP)")


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """preexec_fn: PR_SET_PDEATHSIG(SIGKILL), so a server outlives no killed pytest."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def tcp_connectable(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_tcp_listening(host, port, what, timeout=30, connect_timeout=0.5):
    """Polls until a TCP connection to host:port succeeds (each attempt bounded
    by connect_timeout); fails the test after timeout seconds."""
    wait_for(lambda: tcp_connectable(host, port, connect_timeout), timeout=timeout, what=what)


def connectable(srv):
    if not srv.sock:
        return tcp_connectable("127.0.0.1", srv.port)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(srv.sock)
        return True
    except OSError:
        return False


def wait_unix_socket(path, proc, what, timeout=30):
    def ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited early ({proc.returncode})")
        if not os.path.exists(path):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
                return True
            except OSError:
                return False
    wait_for(ready, timeout=timeout, what=f"{what} to listen on {path}")


class LoggedServer(NbdServer):
    def __init__(self, proc, sock=None, port=None, export="", log=None, stderr_path=None,
                 cmd=None):
        super().__init__(proc, sock=sock, port=port, export=export)
        self.log = log
        self.stderr_path = stderr_path
        self.cmd = cmd

    def stderr(self):
        return file_text(self.stderr_path)

    def disc_count(self):
        """How many clients ended with NBD_CMD_DISC (needs verbose=True)."""
        return self.stderr().count("client sent NBD_CMD_DISC")

    def eof_count(self):
        """How many clients just closed the socket (needs verbose=True)."""
        return self.stderr().count("client closed input socket")


class NbdLog:
    """The requests nbdkit's log filter (`--filter=log logfile=F`) recorded.
    requests(kind) gives one dict per request of that kind (Read, Write, Zero,
    Trim, Flush, Extents, Cache), with integer offset/count and the flags."""

    _req = re.compile(r"connection=(\d+) (\w+) id=(\d+) (.*?)(?: \.\.\.)?$")

    def __init__(self, path):
        self.path = str(path)

    def text(self):
        return file_text(self.path)

    def requests(self, kind=None):
        out = []
        for line in self.text().splitlines():
            m = self._req.search(line)
            if not m or " ..." not in line or "...%s" % m.group(2) in line:
                continue
            conn, k, rid, rest = m.groups()
            if kind and k.lower() != kind.lower():
                continue
            d = {"conn": int(conn), "kind": k, "id": int(rid)}
            for kv in rest.split():
                if "=" in kv:
                    key, v = kv.split("=", 1)
                    try:
                        d[key] = int(v, 0)
                    except ValueError:
                        d[key] = v
            out.append(d)
        return out

    _start = re.compile(r"connection=(\d+) (\w+) id=(\d+) .*\.\.\.$")
    _end = re.compile(r"connection=(\d+) \.\.\.(\w+) id=(\d+) ")

    def spans(self, *kinds):
        """(kind, first line, last line) of each request of these kinds (all
        when none given), from its `Kind id=N ...` line to its `...Kind id=N
        return` line (None while unanswered), in the order the filter logged
        them: the log filter sits outside the other filters, so a delay
        filter's wait is inside the span."""
        want = {k.lower() for k in kinds}
        out, open_ = [], {}
        for i, line in enumerate(self.text().splitlines()):
            m = self._start.search(line)
            if m and (not want or m.group(2).lower() in want):
                open_[(m.group(1), m.group(3))] = len(out)
                out.append([m.group(2), i, None])
                continue
            m = self._end.search(line)
            if m and (m.group(1), m.group(3)) in open_:
                out[open_.pop((m.group(1), m.group(3)))][2] = i
        return [tuple(s) for s in out]

    def max_in_flight(self, *kinds):
        """The most requests of these kinds the server was serving at once."""
        events = []
        for _, a, b in self.spans(*kinds):
            events.append((a, 1))
            events.append((b if b is not None else float("inf"), -1))
        now = best = 0
        for _, d in sorted(events):
            now += d
            best = max(best, now)
        return best

    def in_flight_together(self, kind_a, kind_b):
        """True when a request of kind_a and one of kind_b were served at once."""
        sp = self.spans(kind_a, kind_b)
        end = lambda s: s[2] if s[2] is not None else float("inf")  # noqa: E731
        return any(x[0].lower() == kind_a.lower() and y[0].lower() == kind_b.lower()
                   and x[1] < end(y) and y[1] < end(x) for x in sp for y in sp)

    _connect = " Connect export="
    _disconnect = " Disconnect transactions="

    def connects(self):
        return [l for l in self.text().splitlines() if self._connect in l]

    def open_connections(self):
        """How many client connections are open now (connects less disconnects)."""
        t = self.text()
        return t.count(self._connect) - t.count(self._disconnect)

    def max_open_connections(self):
        """The most client connections open at once, replaying the log in order."""
        n = best = 0
        for line in self.text().splitlines():
            if self._connect in line:
                n += 1
                best = max(best, n)
            elif self._disconnect in line:
                n -= 1
        return best

    def clear(self):
        with open(self.path, "w"):
            pass


class PidfileDaemon:
    """A daemonized server known by its pid file (nbd-server forks)."""

    def __init__(self, pid):
        self.pid = pid

    def poll(self):
        try:
            os.kill(self.pid, 0)
            return None
        except ProcessLookupError:
            return 0

    def kill(self, sig=signal.SIGTERM):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.poll() is None:
            time.sleep(0.05)
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
