"""Helpers for the NBD client core integration tests (imported by
test/core/conftest.py and the test files): the nbdc-cli driver, a line-driven
REPL, the pattern plugin's contents, certtool wrappers.
"""
import importlib.util
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time

import pytest

# The shared test/conftest.py, loaded by path under its own name (every
# conftest.py is a module called "conftest", so importing it by name is
# ambiguous).
_spec = importlib.util.spec_from_file_location(
    "nbdfs_shared_conftest",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py"))
shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shared)
build_path = shared.build_path
wait_for = shared.wait_for
kill_and_wait = shared.kill_and_wait
stop_all = shared.stop_all
NbdServer = shared.NbdServer
free_tcp_port = shared._free_tcp_port

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


@pytest.fixture
def cli():
    return run_cli


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


@pytest.fixture
def repl():
    """Factory: repl(uri, opts=()) -> Repl; all are closed (and killed) at teardown."""
    started = []

    def start(uri, opts=()):
        r = Repl(uri, opts)
        started.append(r)
        return r

    try:
        yield start
    finally:
        for r in started:
            if r.proc.poll() is None:
                try:
                    r.proc.stdin.close()
                except OSError:
                    pass
                try:
                    r.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    kill_and_wait(r.proc, signal.SIGKILL)


def pattern_bytes(off, length):
    """What nbdkit's pattern plugin holds: each 8-byte BE word = its offset."""
    start = off & ~7
    end = (off + length + 7) & ~7
    data = b"".join((w).to_bytes(8, "big") for w in range(start, end, 8))
    return data[off - start: off - start + length]


def _wait_socket(path, proc, what, timeout=30):
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


@pytest.fixture
def qemu_nbd(tmp_path):
    """Factory: qemu_nbd(image, name='disk', description=None, extra=()) runs
    `qemu-nbd -f raw -k SOCK --persistent ...` and returns an NbdServer."""
    procs = []

    def start(image, name="disk", description=None, extra=()):
        if shutil.which("qemu-nbd") is None:
            pytest.fail("qemu-nbd is not installed")
        sock = str(tmp_path / f"qemu{len(procs)}.sock")
        cmd = ["qemu-nbd", "-f", "raw", "-k", sock, "--persistent", "-x", name]
        if description is not None:
            cmd += ["-D", description]
        cmd += list(extra) + [str(image)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        procs.append(proc)
        _wait_socket(sock, proc, "qemu-nbd")
        return NbdServer(proc, sock=sock, export=name)

    try:
        yield start
    finally:
        stop_all(procs)


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


class _Daemon:
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


@pytest.fixture
def nbd_server(tmp_path):
    """Factory: nbd_server({name: image_path}, export_lines=(), tcp=False)
    starts nbd-server (it daemonizes; we kill it by its pid file) with a config
    file, on a Unix socket, or with tcp=True on a private 127.0.0.1 port (it
    does not listen on TCP once unixsock is set).  Returns an NbdServer."""
    daemons = []

    def start(exports, export_lines=(), tcp=False):
        if shutil.which("nbd-server") is None:
            pytest.fail("nbd-server is not installed")
        n = len(daemons)
        sock = str(tmp_path / f"nbd-server{n}.sock")
        pidfile = str(tmp_path / f"nbd-server{n}.pid")
        cfg = tmp_path / f"nbd-server{n}.conf"
        port = free_tcp_port()
        text = ["[generic]", f"    port = {port}", "    allowlist = true"]
        if tcp:
            text += ["    listenaddr = 127.0.0.1"]
        else:
            text += [f"    unixsock = {sock}"]
        for name, path in exports.items():
            text += [f"[{name}]", f"    exportname = {path}"] + [f"    {x}" for x in export_lines]
        cfg.write_text("\n".join(text) + "\n")
        rc = subprocess.run(["nbd-server", "-C", str(cfg), "-p", pidfile],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        if rc.returncode != 0:
            pytest.fail(f"nbd-server failed: {rc.stdout.decode(errors='replace')}")
        wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(),
                 timeout=30, what="nbd-server pid file")
        d = _Daemon(int(open(pidfile).read().strip()))
        daemons.append(d)
        if tcp:
            def listening():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        return True
                except OSError:
                    return False
            wait_for(listening, timeout=30, what="nbd-server to listen")
        else:
            _wait_socket(sock, None, "nbd-server")
        srv = NbdServer(None, sock=None if tcp else sock, port=port, export=next(iter(exports)))
        srv.daemon = d
        return srv

    try:
        yield start
    finally:
        for d in daemons:
            d.kill()


@pytest.fixture
def psk_file(tmp_path):
    """A PSK key file with user alice (psktool's format: user:hexkey)."""
    path = tmp_path / "keys.psk"
    path.write_text(f"alice:{os.urandom(32).hex()}\n")
    os.chmod(path, 0o600)
    return str(path)


def _certtool(*args, cwd):
    r = subprocess.run(["certtool"] + list(args), cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120)
    if r.returncode != 0:
        pytest.fail(f"certtool {' '.join(args)}: {r.stdout.decode(errors='replace')}")


def _make_ca(d, cn):
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.info").write_text(f'cn = "{cn}"\nca\ncert_signing_key\nexpiration_days = 3\n')
    _certtool("--generate-privkey", "--outfile", "ca-key.pem", cwd=d)
    _certtool("--generate-self-signed", "--load-privkey", "ca-key.pem",
              "--template", "ca.info", "--outfile", "ca-cert.pem", cwd=d)


def _make_cert(ca, d, prefix, template):
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{prefix}.info").write_text(template)
    _certtool("--generate-privkey", "--outfile", f"{prefix}-key.pem", cwd=d)
    _certtool("--generate-certificate", "--load-ca-certificate", str(ca / "ca-cert.pem"),
              "--load-ca-privkey", str(ca / "ca-key.pem"), "--load-privkey", f"{prefix}-key.pem",
              "--template", f"{prefix}.info", "--outfile", f"{prefix}-cert.pem", cwd=d)
    shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")


@pytest.fixture(scope="module")
def x509(tmp_path_factory):
    """Certificates made by certtool at test time:
    .server  dir for nbdkit --tls-certificates (ca-cert, server-cert/key for
             localhost and 127.0.0.1)
    .client  dir for the client (ca-cert, client-cert/key), same CA
    .wrong   client dir whose CA did not sign the server (and its own client cert)
    """
    if shutil.which("certtool") is None:
        pytest.fail("certtool (gnutls-bin) is not installed")
    base = tmp_path_factory.mktemp("x509")
    ca, other_ca = base / "ca", base / "other-ca"
    _make_ca(ca, "nbdfs test CA")
    _make_ca(other_ca, "nbdfs unrelated CA")
    server, client, wrong = base / "server", base / "client", base / "wrong"
    _make_cert(ca, server, "server",
               'organization = "nbdfs test"\ncn = "localhost"\ndns_name = "localhost"\n'
               'ip_address = "127.0.0.1"\ntls_www_server\nencryption_key\nsigning_key\n'
               'expiration_days = 3\n')
    _make_cert(ca, client, "client",
               'organization = "nbdfs test"\ncn = "alice"\ntls_www_client\n'
               'encryption_key\nsigning_key\nexpiration_days = 3\n')
    _make_cert(other_ca, wrong, "client",
               'organization = "nbdfs test"\ncn = "mallory"\ntls_www_client\n'
               'encryption_key\nsigning_key\nexpiration_days = 3\n')

    class Dirs:
        pass
    dirs = Dirs()
    dirs.server, dirs.client, dirs.wrong = str(server), str(client), str(wrong)
    return dirs
