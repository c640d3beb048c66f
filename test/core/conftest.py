"""Fixtures for the NBD client core integration tests (test/core): the
nbdc-cli driver (run once, or as a line-driven REPL), qemu-nbd and nbd-server,
TLS keys and certificates made at test time.  Every server is killed by pid in
a `finally`; nothing outlives its test.  The helpers behind them are in
nbdfs_test.core, nbdfs_test.servers and nbdfs_test.tls.
"""
import os
import shutil
import signal
import subprocess

import pytest

from nbdfs_test.core import Repl, run_cli
from nbdfs_test.polling import kill_and_wait, stop_all, wait_for
from nbdfs_test.servers import (NbdServer, PidfileDaemon, free_tcp_port, wait_tcp_listening,
                                wait_unix_socket)
from nbdfs_test.tls import make_ca, make_cert


@pytest.fixture
def cli():
    return run_cli


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
        wait_unix_socket(sock, proc, "qemu-nbd")
        return NbdServer(proc, sock=sock, export=name)

    try:
        yield start
    finally:
        stop_all(procs)


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
        d = PidfileDaemon(int(open(pidfile).read().strip()))
        daemons.append(d)
        if tcp:
            wait_tcp_listening("127.0.0.1", port, "nbd-server to listen")
        else:
            wait_unix_socket(sock, None, "nbd-server")
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
    make_ca(ca, "nbdfs test CA")
    make_ca(other_ca, "nbdfs unrelated CA")
    server, client, wrong = base / "server", base / "client", base / "wrong"
    make_cert(ca, server, "server",
               'organization = "nbdfs test"\ncn = "localhost"\ndns_name = "localhost"\n'
               'ip_address = "127.0.0.1"\ntls_www_server\nencryption_key\nsigning_key\n'
               'expiration_days = 3\n')
    make_cert(ca, client, "client",
               'organization = "nbdfs test"\ncn = "alice"\ntls_www_client\n'
               'encryption_key\nsigning_key\nexpiration_days = 3\n')
    make_cert(other_ca, wrong, "client",
               'organization = "nbdfs test"\ncn = "mallory"\ntls_www_client\n'
               'encryption_key\nsigning_key\nexpiration_days = 3\n')

    class Dirs:
        pass
    dirs = Dirs()
    dirs.server, dirs.client, dirs.wrong = str(server), str(client), str(wrong)
    return dirs
