"""End-to-end fixtures: real nbdfs mounts over real NBD servers, loop devices, oracles.

Every resource (server, FUSE mount, loop device, loop mount) is pushed onto one
cleanup stack per test and released last-in first-out in `finally`, so a loop
mount is unmounted before its loop device is detached, the loop device before
the nbdfs mount that holds its backing file, and the nbdfs mount before the
server it talks to.  After cleanup, anything still present (a mount, a loop
device, a daemon pid) fails the test loudly.

The helpers behind these fixtures, and those the tests use (pattern_bytes,
nbd_read, is_mounted, wait_for, ...), are in the nbdfs_test package
(nbdfs_test.mounts, .servers, .data, .polling); this file only defines fixtures.

The oracles are independent of nbdfs: libnbd's nbdcopy/nbdinfo read the
server directly, nbdkit's log filter records what nbdfs sent, and `nbdkit -v`
says whether a client disconnected with NBD_CMD_DISC.
"""
import os
import resource
import signal
import stat
import subprocess
import time

import pytest

from nbdfs_test.build import BUILD_DIR, build_path
from nbdfs_test.data import random_image
from nbdfs_test.fsync_writer import FsyncWriter
from nbdfs_test.mounts import (CleanupStack, Mount, cleanup_mount, detach_loop, find_daemon_pids,
                               is_mounted, need_fuse, need_root, umount_loop)
from nbdfs_test.polling import kill_and_wait, ppid, run, wait_for, wait_pid_exit
from nbdfs_test.servers import (LoggedServer, NbdLog, connectable, die_with_parent, free_tcp_port,
                                freeze)


# --------------------------------------------------------------------------
# Servers and the cleanup stack

@pytest.fixture
def nbdkit(nbdkit):
    """The top-level nbdkit factory, plus a wait until the server accepts a
    connection: the socket file appears at bind(), a moment before listen()."""
    def start(*args, **kw):
        srv = nbdkit(*args, **kw)
        wait_for(lambda: connectable(srv), timeout=30, what="nbdkit to accept connections")
        return srv
    return start


@pytest.fixture
def e2e_stack(nbdkit):
    """One cleanup stack per test. Depends on the top-level `nbdkit` fixture so
    that its servers outlive every mount made here."""
    st = CleanupStack()
    try:
        yield st
    finally:
        st.unwind()
        if st.problems:
            pytest.fail("left behind at teardown:\n  " + "\n  ".join(st.problems), pytrace=False)


@pytest.fixture
def nbdfs_bin():
    """Path of the daemon under test; the test fails if it is not built."""
    p = build_path("src", "nbdfs")
    if not os.access(p, os.X_OK):
        pytest.fail(f"nbdfs is not built: {p} (ninja -C {BUILD_DIR})")
    return p


# --------------------------------------------------------------------------
# Servers with logs (nbdkit with the log filter and stderr in a file,
# qemu-nbd, nbd-server)

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
                                start_new_session=True, preexec_fn=die_with_parent)
        errf.close()
        srv.proc = proc
        srv.cmd = cmd
        e2e_stack.push(f"{what} pid {proc.pid}", lambda: kill_and_wait(proc), phase=1)

        def ready():
            if proc.poll() is not None:
                pytest.fail(f"{what} exited ({proc.returncode}): {' '.join(cmd)}\n{srv.stderr()}")
            return connectable(srv)
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
            kids = [int(d) for d in os.listdir("/proc") if d.isdigit() and ppid(int(d)) == pid]
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
        wait_for(lambda: connectable(srv), timeout=30, what="nbd-server to listen")
        return srv

    nbdkit_.qemu_nbd = qemu_nbd
    nbdkit_.nbd_server = nbd_server
    return nbdkit_


@pytest.fixture
def random_export(server, tmp_path):
    """Factory: random_export(SIZE, **server_kw) -> (srv, img, data): a file
    img of SIZE random bytes (data) served by `server("file", img, log=False,
    **server_kw)`.  A server killed in the test comes back on the same socket
    with server("file", img, log=False, sock=srv.sock)."""
    n = [0]

    def start(size, **kw):
        img, data = random_image(tmp_path / f"random{n[0]}.img", size)
        n[0] += 1
        return server("file", img, log=False, **kw), img, data
    return start


@pytest.fixture
def stopped(e2e_stack):
    """stopped(proc) SIGSTOPs a server we started; stopped.cont(proc) resumes
    it.  Every stopped server gets SIGCONT at teardown, before the cleanup
    stack unmounts anything (this fixture depends on e2e_stack, so it is torn
    down first), so no unmount waits on a frozen server."""
    procs = []

    def stop(proc):
        procs.append(proc)
        freeze(proc.pid)

    def cont(proc):
        os.kill(proc.pid, signal.SIGCONT)
    stop.cont = cont
    try:
        yield stop
    finally:
        for p in procs:
            if p.poll() is not None:
                continue        # killed meanwhile (and reaped: its pid is not ours)
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.fixture
def fsync_writer(e2e_stack, tmp_path):
    """Factory: fsync_writer(FILE, nblocks) starts the checksummed fsync'd
    writer (nbdfs_test.fsync_writer) as a process of its own on FILE and
    returns its FsyncWriter.  Start it after the mount: at teardown it is
    stopped (then killed) before the mount is released."""
    n = [0]

    def start(path, nblocks):
        i = n[0]
        n[0] += 1
        w = FsyncWriter(path, nblocks, tmp_path / f"writer{i}.journal", tmp_path / f"writer{i}.stop",
                        tmp_path / f"writer{i}.pause")
        e2e_stack.push(f"fsync writer on {path}", w.kill)
        return w.start(preexec_fn=die_with_parent)
    return start


# --------------------------------------------------------------------------
# nbdfs mounts

@pytest.fixture
def mount(e2e_stack, nbdfs_bin, tmp_path):
    """Factory: mount(*sources, opts=[...], mnt=None, foreground=False, pidfile=True,
    check=True, env=None, timeout=60, nofile=None) runs `nbdfs [opts] [--pidfile F]
    SOURCES MNT` (nofile=N: under an open-file limit of N, as `ulimit -n N`).

    Background (default): nbdfs must return once the mount is ready; with check
    (default) the test fails unless it exits 0 and MNT is a mount point.
    foreground=True adds -f and waits for the mount to appear (a string, e.g.
    "-d", is added instead of -f: the process must stay in the foreground).
    Returns a Mount (.path, .pid, .unmount()). check=False returns the Mount
    with .rc and .stderr set even when nbdfs failed (for start-up failure tests).
    Teardown: fusermount3 -u (then -uz), wait for the daemon pid to exit."""
    need_fuse()
    n = [0]

    def do_mount(*sources, opts=(), mnt=None, foreground=False, pidfile=True, check=True,
                 env=None, timeout=60, nofile=None):
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
        e2e_stack.push(f"nbdfs mount {mnt}", lambda: cleanup_mount(e2e_stack, m, nbdfs_bin))

        def limits():
            # nofile=N: the daemon starts as under `ulimit -n N` (soft and hard)
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        with open(errpath, "wb") as errf:
            if foreground:
                m.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                                          env=env, preexec_fn=limits)
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
                                     env=env, preexec_fn=limits)
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
        e2e_stack.push(f"nbdfs mount {mnt}", lambda: cleanup_mount(e2e_stack, m, nbdfs_bin))
        return m

    def nothing_left(mnt):
        """True when mnt is not mounted and no nbdfs runs for it."""
        return not is_mounted(mnt) and not find_daemon_pids(nbdfs_bin, mnt)

    do_mount.adopt = adopt
    do_mount.nothing_left = nothing_left
    return do_mount


# --------------------------------------------------------------------------
# Loop devices and loop mounts

@pytest.fixture
def loopdev(e2e_stack):
    """Factory: loopdev(FILE, direct_io=False, ro=False, sector_size=None) ->
    '/dev/loopN' (losetup -f --show). Detached at teardown (and waited for)."""
    need_root()

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
            e2e_stack.push(f"loop device {dev}", lambda: detach_loop(e2e_stack, dev))
        if r.returncode != 0 or not dev:
            pytest.fail(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        return dev

    return attach


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
        e2e_stack.push(f"loop mount {mnt}", lambda: umount_loop(e2e_stack, mnt))
        run(cmd, timeout=120)
        return mnt

    return do
