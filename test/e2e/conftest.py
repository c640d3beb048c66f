"""End-to-end fixtures: real nbdfs mounts over real NBD servers, loop devices, oracles.

Every resource (server, FUSE mount, loop device, loop mount) is pushed onto one
cleanup stack per test and released last-in first-out in `finally`, so a loop
mount is unmounted before its loop device is detached, the loop device before
the nbdfs mount that holds its backing file, and the nbdfs mount before the
server it talks to.  After cleanup, anything still present (a mount, a loop
device, a daemon pid) fails the test loudly.

Helpers for test modules are importable as `from nbdfs_e2e import ...` (this
module registers itself under that name), e.g. pattern_bytes, nbd_read,
NbdLog, is_mounted, wait_for.

The oracles are independent of nbdfs: libnbd's nbdcopy/nbdinfo read the
server directly, nbdkit's log filter records what nbdfs sent, and `nbdkit -v`
says whether a client disconnected with NBD_CMD_DISC.
"""
import errno
import importlib.util
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest

# The project-wide conftest (test/conftest.py) under a name of its own: both
# files are called conftest.py, so a plain import would find this one.
_TOP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")
_spec = importlib.util.spec_from_file_location("nbdfs_test_conftest", _TOP)
top = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(top)
sys.modules.setdefault("nbdfs_test_conftest", top)
sys.modules.setdefault("nbdfs_e2e", sys.modules[__name__])

build_path = top.build_path
wait_for = top.wait_for
kill_and_wait = top.kill_and_wait
NbdServer = top.NbdServer
free_tcp_port = top._free_tcp_port

SECTOR = 512
MiB = 1024 * 1024


# --------------------------------------------------------------------------
# Plain helpers (no fixtures)

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


def _unescape_mount(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts():
    """(source, mountpoint, fstype, options) of every mount, from /proc/self/mounts.
    Unlike os.path.ismount this also sees a FUSE mount whose daemon died."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            p = line.split()
            if len(p) >= 4:
                out.append((_unescape_mount(p[0]), _unescape_mount(p[1]), p[2], p[3]))
    return out


def is_mounted(path):
    path = os.path.realpath(path)
    return any(m[1] == path for m in mounts())


def mount_entry(path):
    path = os.path.realpath(path)
    for m in mounts():
        if m[1] == path:
            return m
    return None


def pid_alive(pid):
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            # a zombie has exited; its parent (not us) has yet to reap it
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_pid_exit(pid, timeout=30.0):
    """True when pid has exited within timeout (we need not be its parent)."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def find_daemon_pids(binary, mnt):
    """Pids of nbdfs processes running `binary ... mnt` (our own, found by
    their unique mountpoint; used only where no pidfile is available)."""
    mnt = os.path.realpath(mnt)
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv:
            continue
        if os.path.basename(argv[0]) != os.path.basename(binary):
            continue
        if any(os.path.realpath(a) == mnt for a in argv[1:] if a.startswith("/") or a.startswith(".")) \
                or mnt in argv:
            pids.append(int(d))
    return pids


def run(cmd, check=True, timeout=120, **kw):
    """subprocess.run with text output captured and a bounded time."""
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"command failed ({r.returncode}): {' '.join(map(str, cmd))}\n"
                    f"stdout: {r.stdout.decode(errors='replace')}\n"
                    f"stderr: {r.stderr.decode(errors='replace')}")
    return r


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
    import select
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
    import json
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


class NbdLog:
    """The requests nbdkit's log filter (`--filter=log logfile=F`) recorded.
    requests(kind) gives one dict per request of that kind (Read, Write, Zero,
    Trim, Flush, Extents, Cache), with integer offset/count and the flags."""

    _req = re.compile(r"connection=(\d+) (\w+) id=(\d+) (.*?)(?: \.\.\.)?$")

    def __init__(self, path):
        self.path = str(path)

    def text(self):
        try:
            with open(self.path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

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

    def connects(self):
        return [l for l in self.text().splitlines() if " Connect export=" in l]

    def clear(self):
        with open(self.path, "w"):
            pass


# --------------------------------------------------------------------------
# The cleanup stack

class _Stack:
    """Mounts and loop devices (phase 0) are released last-in first-out, then
    servers (phase 1): a server restarted during a test still outlives the
    mount that uses it, so no unmount waits for an absent server."""

    def __init__(self):
        self.items = []      # (phase, description, callable)
        self.problems = []   # leftovers found at teardown

    def push(self, what, fn, phase=0):
        self.items.append((phase, what, fn))

    def unwind(self):
        for phase in (0, 1):
            todo = [i for i in self.items if i[0] == phase]
            self.items = [i for i in self.items if i[0] != phase]
            for _, what, fn in reversed(todo):
                try:
                    fn()
                except Exception as e:  # keep unwinding: every resource gets its chance
                    self.problems.append(f"{what}: cleanup raised {type(e).__name__}: {e}")


@pytest.fixture
def nbdkit(nbdkit):
    """The top-level nbdkit factory, plus a wait until the server accepts a
    connection: the socket file appears at bind(), a moment before listen()."""
    def start(*args, **kw):
        srv = nbdkit(*args, **kw)
        wait_for(lambda: _connectable(srv), timeout=30, what="nbdkit to accept connections")
        return srv
    return start


@pytest.fixture
def e2e_stack(nbdkit):
    """One cleanup stack per test. Depends on the top-level `nbdkit` fixture so
    that its servers outlive every mount made here."""
    st = _Stack()
    try:
        yield st
    finally:
        st.unwind()
        if st.problems:
            pytest.fail("left behind at teardown:\n  " + "\n  ".join(st.problems), pytrace=False)


def _need_fuse():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 is missing")


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mount)")


@pytest.fixture
def nbdfs_bin():
    """Path of the daemon under test; the test fails if it is not built."""
    p = build_path("src", "nbdfs")
    if not os.access(p, os.X_OK):
        pytest.fail(f"nbdfs is not built: {p} (ninja -C {top.BUILD_DIR})")
    return p


# --------------------------------------------------------------------------
# Servers with logs (nbdkit with the log filter and stderr in a file,
# qemu-nbd, nbd-server)

def _die_with_parent():
    """preexec_fn: PR_SET_PDEATHSIG(SIGKILL), so a server outlives no killed pytest."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _connectable(srv):
    try:
        if srv.sock:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(srv.sock)
        else:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=0.5):
                pass
        return True
    except OSError:
        return False


class LoggedServer(NbdServer):
    def __init__(self, proc, sock=None, port=None, export="", log=None, stderr_path=None,
                 cmd=None):
        super().__init__(proc, sock=sock, port=port, export=export)
        self.log = log
        self.stderr_path = stderr_path
        self.cmd = cmd

    def stderr(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except (FileNotFoundError, TypeError):
            return ""

    def disc_count(self):
        """How many clients ended with NBD_CMD_DISC (needs verbose=True)."""
        return self.stderr().count("client sent NBD_CMD_DISC")

    def eof_count(self):
        """How many clients just closed the socket (needs verbose=True)."""
        return self.stderr().count("client closed input socket")


@pytest.fixture
def server(e2e_stack, tmp_path):
    """Factory for servers whose traffic tests can inspect.

    server(*nbdkit_args, log=True, verbose=False, tcp=False, sock=None, export="")
      starts `nbdkit -f --exit-with-parent [-v] -U SOCK [--filter=log] ARGS logfile=LOG`.
      .log is an NbdLog, .stderr() the server's stderr (a file, so -v cannot block
      it), .disc_count() the clients that sent NBD_CMD_DISC. sock= reuses a path
      (restart a server on the same socket). Killed at teardown after every mount.
    server.qemu_nbd(FILE, *args)   `qemu-nbd -f raw -t -e 16 -k SOCK ARGS FILE`
    server.nbd_server(FILE, *args, name="disk") nbd-server on a 127.0.0.1 port (config
                                   file, pid file; killed with its children)
    """
    n = [0]

    def _start(cmd, srv, what):
        errp = tmp_path / f"server{n[0]}.err"
        n[0] += 1
        srv.stderr_path = str(errp)
        errf = open(errp, "wb")
        # servers without --exit-with-parent (qemu-nbd) die with pytest too
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                                start_new_session=True, preexec_fn=_die_with_parent)
        errf.close()
        srv.proc = proc
        srv.cmd = cmd
        e2e_stack.push(f"{what} pid {proc.pid}", lambda: kill_and_wait(proc), phase=1)

        def ready():
            if proc.poll() is not None:
                pytest.fail(f"{what} exited ({proc.returncode}): {' '.join(cmd)}\n{srv.stderr()}")
            return _connectable(srv)
        wait_for(ready, timeout=30, what=f"{what} to listen ({' '.join(cmd)})")
        return srv

    def nbdkit_(*args, log=True, verbose=False, tcp=False, sock=None, export="", extra=()):
        port = None
        if tcp:
            port = free_tcp_port()
            where = ["-i", "127.0.0.1", "-p", str(port)]
        else:
            sock = str(sock or tmp_path / f"srv{n[0]}.sock")
            if os.path.exists(sock):
                os.unlink(sock)  # stale after a SIGKILL
            where = ["-U", sock]
        logf = tmp_path / f"srv{n[0]}.log"
        cmd = ["nbdkit", "-f", "--exit-with-parent"] + (["-v"] if verbose else []) + list(extra) + where
        if log:
            cmd.append("--filter=log")
        cmd += [str(a) for a in args]
        if log:
            cmd.append(f"logfile={logf}")
        srv = LoggedServer(None, sock=None if tcp else sock, port=port, export=export,
                           log=NbdLog(logf) if log else None)
        return _start(cmd, srv, "nbdkit")

    def qemu_nbd(path, *args, sock=None, fmt="raw"):
        sock = str(sock or tmp_path / f"qemu{n[0]}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        # -e: qemu-nbd serves one client by default; nbdfs (several
        # connections) and the nbdcopy oracle need more
        cmd = ["qemu-nbd", "-f", fmt, "-t", "-e", "16", "-k", sock] + [str(a) for a in args] \
            + [str(path)]
        return _start(cmd, LoggedServer(None, sock=sock), "qemu-nbd")

    def nbd_server(path, *args, name="disk", readonly=False):
        port = free_tcp_port()
        conf = tmp_path / f"nbd-server{n[0]}.conf"
        conf.write_text(
            "[generic]\n"
            f"    listenaddr = 127.0.0.1\n"
            f"    port = {port}\n"
            "    allowlist = true\n"
            f"[{name}]\n"
            f"    exportname = {path}\n"
            f"    readonly = {'true' if readonly else 'false'}\n")
        # nbd-server -d serves one client and exits; in daemon mode it forks
        # per client and writes its pid file: kill that pid and its children.
        pidf = tmp_path / f"nbd-server{n[0]}.pid"
        errp = tmp_path / f"nbd-server{n[0]}.err"
        n[0] += 1
        cmd = ["nbd-server", "-C", str(conf), "-p", str(pidf)] + [str(a) for a in args]
        with open(errp, "wb") as errf:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, timeout=60)
        if r.returncode != 0:
            pytest.fail(f"nbd-server failed ({r.returncode}): {errp.read_text()}")
        pid = int(wait_for(lambda: pidf.exists() and pidf.read_text().strip(), timeout=30,
                           what="nbd-server's pid file"))

        def stop():
            kids = [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == pid]
            for p_ in [pid] + kids:
                try:
                    os.kill(p_, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p_ in [pid] + kids:
                if not wait_pid_exit(p_, 10):
                    os.kill(p_, signal.SIGKILL)
                    wait_pid_exit(p_, 10)
        e2e_stack.push(f"nbd-server pid {pid}", stop, phase=1)
        srv = LoggedServer(None, port=port, export=name, stderr_path=str(errp), cmd=cmd)
        srv.server_pid = pid
        wait_for(lambda: _connectable(srv), timeout=30, what="nbd-server to listen")
        return srv

    nbdkit_.qemu_nbd = qemu_nbd
    nbdkit_.nbd_server = nbd_server
    return nbdkit_


# --------------------------------------------------------------------------
# nbdfs mounts

class Mount:
    """A running nbdfs mount. .path, .pid, .proc (foreground only), .log()."""

    def __init__(self, fixture, path, cmd, errpath, pid=None, proc=None):
        self._fx = fixture
        self.path = str(path)
        self.cmd = cmd
        self.errpath = errpath
        self.pid = pid
        self.proc = proc

    def __truediv__(self, name):
        return os.path.join(self.path, name)

    def file(self, name):
        return os.path.join(self.path, name)

    def files(self):
        return sorted(os.listdir(self.path))

    def log(self):
        """What nbdfs wrote to stderr (before daemonizing, or all of it with -f)."""
        try:
            with open(self.errpath, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mounted(self):
        return is_mounted(self.path)

    def unmount(self, timeout=60.0, lazy=False):
        """fusermount3 -u (-uz if lazy), then waits for the daemon to exit.
        Returns the daemon's exit status where we know it (foreground), else None."""
        r = subprocess.run(["fusermount3", "-uz" if lazy else "-u", self.path],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            pytest.fail(f"fusermount3 -u {self.path} failed: {r.stderr.decode(errors='replace')}")
        return self.wait_exit(timeout)

    def wait_exit(self, timeout=60.0):
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"nbdfs pid {self.proc.pid} did not exit within {timeout}s")
        if self.pid and not wait_pid_exit(self.pid, timeout):
            pytest.fail(f"nbdfs pid {self.pid} did not exit within {timeout}s")
        return None


def _close_own_fds_under(path):
    """Closes this process's fds on files under path (or on path itself): a test
    that failed while holding a file open (its frame lives on in the traceback)
    must not keep a mount busy."""
    path = os.path.realpath(path)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == path or target.startswith(path + "/"):
            try:
                os.close(int(fd))
            except OSError:
                pass


def _cleanup_mount(stack, m, binary):
    _close_own_fds_under(m.path)
    pids = set()
    if m.pid:
        pids.add(m.pid)
    if m.proc is not None:
        pids.add(m.proc.pid)
    if is_mounted(m.path):
        pids.update(find_daemon_pids(binary, m.path))
        r = subprocess.run(["fusermount3", "-u", m.path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        if r.returncode != 0 or is_mounted(m.path):
            subprocess.run(["fusermount3", "-uz", m.path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
    if is_mounted(m.path):
        stack.problems.append(f"nbdfs mount {m.path} still mounted after fusermount3 -u/-uz")
    for pid in pids:
        if not wait_pid_exit(pid, 60):
            stack.problems.append(f"nbdfs pid {pid} ({m.path}) still running 60s after unmount: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_pid_exit(pid, 10)
    if m.proc is not None:
        kill_and_wait(m.proc)


@pytest.fixture
def mount(e2e_stack, nbdfs_bin, tmp_path):
    """Factory: mount(*sources, opts=[...], mnt=None, foreground=False, pidfile=True,
    check=True, env=None, timeout=60) runs `nbdfs [opts] [--pidfile F] SOURCES MNT`.

    Background (default): nbdfs must return once the mount is ready; with check
    (default) the test fails unless it exits 0 and MNT is a mount point.
    foreground=True adds -f and waits for the mount to appear (a string, e.g.
    "-d", is added instead of -f: the process must stay in the foreground).
    Returns a Mount (.path, .pid, .unmount()). check=False returns the Mount
    with .rc and .stderr set even when nbdfs failed (for start-up failure tests).
    Teardown: fusermount3 -u (then -uz), wait for the daemon pid to exit."""
    _need_fuse()
    n = [0]

    def do_mount(*sources, opts=(), mnt=None, foreground=False, pidfile=True, check=True,
                 env=None, timeout=60):
        i = n[0]
        n[0] += 1
        if mnt is None:
            mnt = tmp_path / f"mnt{i}"
            mnt.mkdir()
        mnt = str(mnt)
        errpath = str(tmp_path / f"nbdfs{i}.err")
        pf = str(tmp_path / f"nbdfs{i}.pid") if pidfile else None
        cmd = [nbdfs_bin] + [str(o) for o in opts]
        if foreground:
            cmd.append("-f" if foreground is True else foreground)
        if pf:
            cmd += ["--pidfile", pf]
        cmd += [str(s) for s in sources] + [mnt]
        m = Mount(do_mount, mnt, cmd, errpath)
        e2e_stack.push(f"nbdfs mount {mnt}", lambda: _cleanup_mount(e2e_stack, m, nbdfs_bin))
        with open(errpath, "wb") as errf:
            if foreground:
                m.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                                          env=env)
                m.pid = m.proc.pid

                def up():
                    if m.proc.poll() is not None:
                        return "exited"
                    return is_mounted(mnt) and os.path.ismount(mnt)
                deadline = time.monotonic() + timeout
                while not up():
                    if time.monotonic() > deadline:
                        pytest.fail(f"nbdfs -f: {mnt} not mounted within {timeout}s\n{m.log()}")
                    time.sleep(0.02)
                m.rc = m.proc.returncode
                m.stderr = m.log()
                if check and m.rc is not None:
                    pytest.fail(f"nbdfs -f exited {m.rc}: {' '.join(cmd)}\n{m.stderr}")
            else:
                # stdout/stderr go to a file, not a pipe: a daemon that kept them
                # open would otherwise make us wait for it to exit.
                p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                                     env=env)
                try:
                    m.rc = p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    kill_and_wait(p, signal.SIGKILL)
                    pytest.fail(f"nbdfs did not return within {timeout}s: {' '.join(cmd)}\n{m.log()}")
                m.stderr = m.log()
                if check:
                    if m.rc != 0:
                        pytest.fail(f"nbdfs exited {m.rc}: {' '.join(cmd)}\n{m.stderr}")
                    if not os.path.ismount(mnt):
                        pytest.fail(f"nbdfs exited 0 but {mnt} is not (yet) a usable mount point: "
                                    f"{' '.join(cmd)}\n{m.stderr}")
                if pf:
                    # SPEC: written once ready, i.e. before nbdfs returned. Be lenient
                    # here (test_cli checks it strictly) so cleanup knows the pid.
                    for _ in range(250):
                        if os.path.exists(pf) and open(pf).read().strip():
                            break
                        if m.rc != 0:
                            break
                        time.sleep(0.02)
                    try:
                        m.pid = int(open(pf).read().strip())
                    except (OSError, ValueError):
                        m.pid = None
                if m.pid is None and is_mounted(mnt):
                    pids = find_daemon_pids(nbdfs_bin, mnt)
                    m.pid = pids[0] if pids else None
        return m

    def adopt(mnt, pid=None):
        """Registers a mount made some other way (e.g. mount -t fuse.nbdfs)
        for the same teardown; pid found by its mountpoint when not given."""
        m = Mount(do_mount, str(mnt), None, str(tmp_path / "adopted.err"), pid=pid)
        if m.pid is None:
            pids = find_daemon_pids(nbdfs_bin, mnt)
            m.pid = pids[0] if pids else None
        e2e_stack.push(f"nbdfs mount {mnt}", lambda: _cleanup_mount(e2e_stack, m, nbdfs_bin))
        return m

    def nothing_left(mnt):
        """True when mnt is not mounted and no nbdfs runs for it."""
        return not is_mounted(mnt) and not find_daemon_pids(nbdfs_bin, mnt)

    do_mount.adopt = adopt
    do_mount.nothing_left = nothing_left
    return do_mount


# --------------------------------------------------------------------------
# Loop devices and loop mounts

def _loop_backing(dev):
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


@pytest.fixture
def loopdev(e2e_stack):
    """Factory: loopdev(FILE, direct_io=False, ro=False, sector_size=None) ->
    '/dev/loopN' (losetup -f --show). Detached at teardown (and waited for)."""
    _need_root()

    def attach(path, direct_io=False, ro=False, sector_size=None):
        cmd = ["losetup", "-f", "--show"]
        if direct_io:
            cmd.append("--direct-io=on")
        if ro:
            cmd.append("-r")
        if sector_size:
            cmd += ["-b", str(sector_size)]
        cmd.append(str(path))
        r = run(cmd, check=False, timeout=60)
        dev = r.stdout.decode().strip()
        if dev:
            e2e_stack.push(f"loop device {dev}", lambda: _detach(e2e_stack, dev))
        if r.returncode != 0 or not dev:
            pytest.fail(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        return dev

    return attach


def _detach(stack, dev):
    if _loop_backing(dev) is None:
        return
    _close_own_fds_under(dev)
    subprocess.run(["losetup", "-d", dev], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    deadline = time.monotonic() + 30
    while _loop_backing(dev) is not None:
        if time.monotonic() > deadline:
            stack.problems.append(f"loop device {dev} still attached to {_loop_backing(dev)}")
            return
        time.sleep(0.05)


@pytest.fixture
def loopmount(e2e_stack, loopdev, tmp_path):
    """Factory: loopmount(DEV_OR_FILE, mnt=None, fstype=None, options=None) ->
    mount directory. A regular file is first attached with loopdev. Unmounted
    at teardown (umount, then umount -l)."""
    n = [0]

    def do(dev, mnt=None, fstype=None, options=None):
        if not stat.S_ISBLK(os.stat(dev).st_mode):
            dev = loopdev(dev)
        if mnt is None:
            mnt = tmp_path / f"loopmnt{n[0]}"
            n[0] += 1
            mnt.mkdir()
        mnt = str(mnt)
        cmd = ["mount"] + (["-t", fstype] if fstype else []) + (["-o", options] if options else []) \
            + [dev, mnt]
        e2e_stack.push(f"loop mount {mnt}", lambda: _umount(e2e_stack, mnt))
        run(cmd, timeout=120)
        return mnt

    return do


def _umount(stack, mnt):
    if not is_mounted(mnt):
        return
    _close_own_fds_under(mnt)
    subprocess.run(["umount", mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    if is_mounted(mnt):
        stack.problems.append(f"loop mount {mnt} still mounted")


def umount(mnt):
    """Unmounts a loop mount now (the fixture's teardown then has nothing to do)."""
    run(["umount", mnt], timeout=120)


def losetup_detach(dev, timeout=30):
    """Detaches a loop device now and waits until the kernel released it."""
    run(["losetup", "-d", dev], timeout=60)
    wait_for(lambda: _loop_backing(dev) is None, timeout=timeout, what=f"{dev} to detach")


# --------------------------------------------------------------------------
# xattrs and syscalls Python lacks

def getx(path, name):
    """A user.nbdfs.* attribute as text."""
    return os.getxattr(path, name).decode()


def setx(path, name, value):
    os.setxattr(path, name, value.encode() if isinstance(value, str) else value)


def set_partition(path, value):
    """setfattr -n user.nbdfs.partition -v VALUE PATH; raises OSError on failure."""
    setx(path, "user.nbdfs.partition", value)


_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate.restype = ctypes.c_int
    return _libc


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd, mode, off, length):
    """fallocate(2) with a mode; raises OSError with the errno on failure."""
    import ctypes
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


__all__ = [n for n in dir() if not n.startswith("_")] + ["errno"]
