"""SPEC §2, the command line: naming of files, several servers, -a, --list,
start-up failures, background/foreground, --pidfile, signals, mount -t
fuse.nbdfs, and the -o option table."""
import os
import signal
import stat
import subprocess

import pytest

from nbdfs_test.data import MiB, getx, pattern_bytes, read_file
from nbdfs_test.mounts import find_daemon_pids, is_mounted, mount_entry
from nbdfs_test.polling import run, wait_for, wait_pid_exit


def nbdfs(binary, *args, timeout=60):
    """Runs nbdfs to completion (for --list and start-up failures)."""
    r = subprocess.run([binary] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


# ---------------------------------------------------------------- naming

def test_name_from_name_equals_uri(nbdkit, mount):
    srv = nbdkit("pattern", "1M")
    m = mount(f"mydisk={srv.uri()}")
    assert m.files() == ["mydisk"]
    assert read_file(m / "mydisk", 0, 64) == pattern_bytes(0, 64)


def test_name_from_export_name(nbdkit, mount):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-strict=true",
                 "exportname=vol1")
    m = mount(srv.uri("vol1"))
    assert m.files() == ["vol1"]
    assert getx(m / "vol1", "user.nbdfs.export") == "vol1"


def test_empty_export_name_is_disk(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(""))
    assert m.files() == ["disk"]
    assert os.path.getsize(m / "disk") == MiB


@pytest.mark.parametrize("export", ["a/b", "..", ".", "L" * 300],
                         ids=["slash", "dotdot", "dot", "too-long"])
def test_unfit_names_are_escaped_not_dropped(nbdkit, mount, export):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-strict=true",
                 f"exportname={export}")
    quoted = export.replace("/", "%2F").replace(".", "%2E")
    m = mount(f"nbd+unix:///{quoted}?socket={srv.sock}")
    files = m.files()
    assert len(files) == 1, files
    name = files[0]
    assert name not in ("", ".", "..") and "/" not in name and len(name.encode()) <= 255
    assert os.path.getsize(m / name) == MiB
    assert getx(m / name, "user.nbdfs.export") == export


def test_unfit_name_given_by_user_is_escaped(nbdkit, mount):
    m = mount(f"a/b={nbdkit('memory', '1M').uri()}", check=False)
    # Either refused as a bad name at start-up, or escaped: never dropped.
    if m.rc == 0 and is_mounted(m.path):
        files = m.files()
        assert len(files) == 1 and "/" not in files[0]
    else:
        assert m.rc != 0 and "a/b" in m.stderr


def _assert_startup_failure(mount, m, *must_name):
    assert m.rc != 0, f"nbdfs exited 0: {m.cmd}"
    assert not is_mounted(m.path), "a failed start-up left a mount"
    wait_for(lambda: mount.nothing_left(m.path), timeout=10, what="no nbdfs process left")
    lines = [l for l in m.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"want one clear line, got:\n{m.stderr}"
    for s in must_name:
        assert s in lines[0], f"{s!r} not named in: {lines[0]}"


def test_duplicate_names_are_an_error_naming_both(nbdkit, mount):
    a = nbdkit("memory", "1M").uri()
    b = nbdkit("memory", "2M").uri()
    m = mount(f"x={a}", f"x={b}", check=False)
    _assert_startup_failure(mount, m, a, b)


def test_duplicate_default_names_are_an_error(nbdkit, mount):
    a = nbdkit("memory", "1M").uri()
    b = nbdkit("memory", "2M").uri()
    m = mount(a, b, check=False)   # both would be `disk`
    _assert_startup_failure(mount, m, a, b)


def test_several_servers_in_one_mount(nbdkit, mount):
    p = nbdkit("pattern", "1M")
    mem = nbdkit("memory", "2M")
    m = mount(f"pat={p.uri()}", f"mem={mem.uri()}")
    assert m.files() == ["mem", "pat"]
    assert os.path.getsize(m / "mem") == 2 * MiB
    assert read_file(m / "pat", 4096, 16) == pattern_bytes(4096, 16)
    with open(m / "mem", "r+b") as f:
        f.write(b"hello")
    assert read_file(m / "mem", 0, 5) == b"hello"


@pytest.mark.parametrize("flag", ["-a", "--all-exports"])
def test_all_exports(nbdkit, mount, flag):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
                 "exportname=disk1", "exportname=disk2", "exportname=disk3")
    m = mount(srv.uri(), opts=[flag])
    assert m.files() == ["disk1", "disk2", "disk3"]
    for f in m.files():
        assert getx(m / f, "user.nbdfs.export") == f


# ---------------------------------------------------------------- --list

def test_list(nbdfs_bin, nbdkit):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
                 "exportname=disk1", "exportname=disk2", "exportdesc=fixed:test desc")
    rc, out, err = nbdfs(nbdfs_bin, "--list", srv.uri())
    assert rc == 0, err
    assert out.split() == ["disk1", "disk2"]


def test_list_long(nbdfs_bin, nbdkit):
    srv = nbdkit("--filter=exportname", "--filter=blocksize-policy", "memory", "1M",
                 "exportname-list=explicit", "exportname=disk1", "exportname=disk2",
                 "exportdesc=fixed:test-desc", "blocksize-minimum=512",
                 "blocksize-preferred=65536", "blocksize-maximum=1048576")
    rc, out, err = nbdfs(nbdfs_bin, "--list", "--long", srv.uri())
    assert rc == 0, err
    assert "disk1" in out and "disk2" in out
    assert "test-desc" in out
    assert "1048576" in out or "1M" in out or "1.0M" in out or "1 MiB" in out or "1.0 MiB" in out
    assert "65536" in out or "64K" in out or "64 KiB" in out or "64k" in out


def test_list_read_only_flag(nbdfs_bin, nbdkit):
    rw = nbdfs(nbdfs_bin, "--list", "--long", nbdkit("memory", "1M").uri())[1]
    ro = nbdfs(nbdfs_bin, "--list", "--long", nbdkit("-r", "memory", "1M").uri())[1]
    assert rw != ro, f"--long shows no read-only flag:\n{rw}\n{ro}"


@pytest.mark.parametrize("srvargs", [["-o"], ["--mask-handshake=0"]],
                         ids=["oldstyle", "non-fixed-newstyle"])
def test_list_server_too_old_exits_2(nbdfs_bin, nbdkit, srvargs):
    srv = nbdkit(*srvargs, "memory", "1M")
    rc, out, err = nbdfs(nbdfs_bin, "--list", srv.uri())
    assert rc == 2, f"rc={rc} out={out!r} err={err!r}"
    assert err.strip(), "no reason given"


def test_list_unreachable_exits_1(nbdfs_bin, tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/nothing.sock"
    rc, out, err = nbdfs(nbdfs_bin, "--list", uri)
    assert rc == 1, f"rc={rc} err={err!r}"
    assert err.strip()


# ---------------------------------------------------------------- start-up failures

def test_startup_bad_uri(mount):
    for bad in ["http://example.com/x", "nbd+unix:///?nosocket=1", "nbd://"]:
        m = mount(bad, check=False)
        _assert_startup_failure(mount, m, bad)


def test_startup_unreachable(mount, tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/nothing.sock"
    m = mount(uri, check=False)
    _assert_startup_failure(mount, m, uri)
    # and the cause
    assert "No such file" in m.stderr or "refused" in m.stderr or "connect" in m.stderr, m.stderr


def test_startup_unreachable_tcp(mount):
    from nbdfs_test.servers import free_tcp_port
    uri = f"nbd://127.0.0.1:{free_tcp_port()}/"
    m = mount(uri, check=False)
    _assert_startup_failure(mount, m, uri)


def test_startup_unknown_export(nbdkit, mount):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-strict=true", "exportname=a")
    uri = srv.uri("zzz")
    m = mount(uri, check=False)
    _assert_startup_failure(mount, m, uri)


def _psk(tmp_path, name, user="alice"):
    path = tmp_path / name
    run(["psktool", "-u", user, "-p", path])
    return str(path)


def _refused_then_mounted(mount, uri, bad_opts, good_opts):
    """Mounting @uri with -o @bad_opts fails at start-up; with -o @good_opts
    it works."""
    m = mount(uri, opts=["-o", bad_opts], check=False)
    _assert_startup_failure(mount, m, uri)
    ok = mount(uri, opts=["-o", good_opts])
    assert ok.files() == ["disk"]


def test_startup_tls_failure(nbdkit, mount, tmp_path):
    good = _psk(tmp_path, "good.psk")
    bad = _psk(tmp_path, "bad.psk")
    srv = nbdkit("--tls=require", f"--tls-psk={good}", "memory", "1M")
    uri = f"nbds+unix://alice@/?socket={srv.sock}"
    # the wrong key fails, and the right key works
    _refused_then_mounted(mount, uri, f"tls-psk={bad}", f"tls-psk={good}")


def test_startup_plaintext_to_tls_only_server(nbdkit, mount, tmp_path):
    srv = nbdkit("--tls=require", f"--tls-psk={_psk(tmp_path, 'k.psk')}", "memory", "1M")
    m = mount(srv.uri(), check=False)
    _assert_startup_failure(mount, m, srv.uri())


def test_startup_missing_mountpoint(nbdkit, mount, tmp_path):
    uri = nbdkit("memory", "1M").uri()
    m = mount(uri, mnt=tmp_path / "does-not-exist", check=False)
    assert m.rc != 0
    assert not is_mounted(m.path)
    lines = [l for l in m.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "does-not-exist" in lines[0], m.stderr


def test_startup_one_bad_source_of_two_mounts_nothing(nbdkit, mount, tmp_path):
    good = nbdkit("memory", "1M").uri()
    bad = f"x=nbd+unix:///?socket={tmp_path}/nothing.sock"
    m = mount(good, bad, check=False)
    _assert_startup_failure(mount, m, bad)


# ---------------------------------------------------------------- lifecycle

def test_ready_when_it_returns(nbdkit, mount, nbdfs_bin, tmp_path):
    """`nbdfs URI mnt && ls mnt` works at once."""
    srv = nbdkit("pattern", "1M")
    mnt = tmp_path / "m"
    mnt.mkdir()
    pf = tmp_path / "pid"
    r = subprocess.run(["sh", "-c", f'"$0" --pidfile "$1" "$2" "$3" && ls "$3" && head -c 16 "$3/disk" | od -An -tx1',
                        nbdfs_bin, str(pf), srv.uri(), str(mnt)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, timeout=60)
    mount.adopt(mnt, pid=int(pf.read_text()) if pf.exists() else None)
    assert r.returncode == 0
    out = r.stdout.decode().split()
    assert out[0] == "disk"
    assert bytes(int(x, 16) for x in out[1:]) == pattern_bytes(0, 16)


def test_pidfile_written_when_ready(nbdkit, mount, nbdfs_bin):
    m = mount(nbdkit("memory", "1M").uri())
    pf = m.cmd[m.cmd.index("--pidfile") + 1]
    assert os.path.exists(pf), "no pid file when nbdfs returned"
    pid = int(open(pf).read().strip())
    assert os.path.exists(f"/proc/{pid}")
    assert os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "nbdfs"
    assert pid in find_daemon_pids(nbdfs_bin, m.path)
    m.unmount()
    assert wait_pid_exit(pid, 30)


def test_background_detaches(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri())
    # the daemon is not the process we started (that one exited 0), and runs on
    assert m.rc == 0 and m.pid and os.path.exists(f"/proc/{m.pid}")
    assert m.files() == ["disk"]


def test_foreground_stays(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), foreground=True)
    assert m.proc.poll() is None
    assert open(m.cmd[m.cmd.index("--pidfile") + 1]).read().strip() == str(m.proc.pid)
    assert m.files() == ["disk"]
    assert m.unmount() == 0


def test_debug_implies_foreground_and_logs_requests(nbdkit, mount):
    srv = nbdkit("pattern", "1M")
    # -d alone (no -f): it must stay in the foreground.
    m = mount(srv.uri(), foreground="-d")
    read_file(m / "disk", 1000, 10)
    assert m.proc.poll() is None
    wait_for(lambda: "read" in m.log().lower(), timeout=10, what="a logged NBD read")
    assert m.unmount() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_flushes_disconnects_exits_0(server, mount, sig):
    srv = server("memory", "4M", verbose=True)
    m = mount(srv.uri(), foreground=True)
    fd = os.open(m / "disk", os.O_WRONLY)
    try:
        os.pwrite(fd, b"signal-data", 1000)
        # the file stays open: no close-time flush; the exit must flush
        writes = len(srv.log.requests("Write"))
        flushes = len(srv.log.requests("Flush"))
        assert writes >= 1
        m.proc.send_signal(sig)
        rc = m.wait_exit(60)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert rc == 0
    assert not is_mounted(m.path)
    assert len(srv.log.requests("Flush")) > flushes, "no NBD_CMD_FLUSH at exit"
    wait_for(lambda: srv.disc_count() >= 1, timeout=10, what="NBD_CMD_DISC on the server")
    assert srv.eof_count() == 0, "a connection was dropped without NBD_CMD_DISC"
    from nbdfs_test.data import nbd_read
    assert nbd_read(srv.uri(), 1000, 11) == b"signal-data"


def test_sigterm_background_daemon(server, mount):
    srv = server("memory", "4M", verbose=True)
    m = mount(srv.uri())
    # a data connection (opened when the file is first used) to disconnect
    with open(m / "disk", "rb") as f:
        assert f.read(512) == bytes(512)
    os.kill(m.pid, signal.SIGTERM)
    assert wait_pid_exit(m.pid, 60)
    assert not is_mounted(m.path)
    wait_for(lambda: srv.disc_count() >= 1, timeout=10, what="NBD_CMD_DISC on the server")


def test_fusermount_u_exits_0_with_disc(server, mount):
    srv = server("memory", "4M", verbose=True)
    m = mount(srv.uri(), foreground=True)
    with open(m / "disk", "r+b") as f:
        f.write(b"x" * 4096)
    flushes_before = len(srv.log.requests("Flush"))
    assert m.unmount() == 0
    wait_for(lambda: srv.disc_count() >= 1, timeout=10, what="NBD_CMD_DISC on the server")
    assert srv.eof_count() == 0
    assert len(srv.log.requests("Flush")) >= max(flushes_before, 1)


def _mount_t(uri, mnt, opts):
    """The command `mount -t fuse.nbdfs URI MNT -o OPTS` runs. mount(8) itself
    runs its helper with the standard PATH only, so a test build (not
    installed) is reached by running that helper, mount.fuse3, the way mount(8)
    does: mount.fuse3 SOURCE DIR -t nbdfs -o OPTS (plus the dev,suid that
    mount(8) adds)."""
    return ["mount.fuse3", uri, str(mnt), "-t", "nbdfs", "-o", opts + ",dev,suid"]


def test_mount_t_fuse_nbdfs(nbdkit, mount, nbdfs_bin, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(nbdfs_bin, bindir / "nbdfs")
    srv = nbdkit("pattern", "1M")
    mnt = tmp_path / "m"
    mnt.mkdir()
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    r = subprocess.run(_mount_t(srv.uri(), mnt, "ro,umask=022"), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    mount.adopt(mnt)
    assert r.returncode == 0, r.stderr.decode()
    assert os.path.ismount(mnt)
    assert mount_entry(mnt)[2] == "fuse.nbdfs"
    assert os.listdir(mnt) == ["disk"]
    assert stat.S_IMODE(os.stat(mnt / "disk").st_mode) == 0o444
    assert read_file(mnt / "disk", 8, 8) == pattern_bytes(8, 8)


def test_mount_t_fuse_nbdfs_with_nbdfs_options(nbdkit, mount, nbdfs_bin, tmp_path):
    """fstab-style: nbdfs options (partitions=auto, timeout) through mount -o."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(nbdfs_bin, bindir / "nbdfs")
    srv = nbdkit("partitioning", _tiny_part(tmp_path), "partition-type=mbr")
    mnt = tmp_path / "m"
    mnt.mkdir()
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    r = subprocess.run(_mount_t(srv.uri(), mnt, "partitions=auto,timeout=5"), env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    mount.adopt(mnt)
    assert r.returncode == 0, r.stderr.decode()
    assert sorted(os.listdir(mnt)) == ["disk", "disk-part1"]


def _tiny_part(tmp_path):
    p = tmp_path / "p1.img"
    p.write_bytes(os.urandom(1024 * 1024))
    return str(p)


# ---------------------------------------------------------------- -o options

def _modes(m):
    return {f: stat.S_IMODE(os.stat(m / f).st_mode) for f in m.files()}


@pytest.mark.parametrize("opts", [["-o", "ro"], ["--ro"]], ids=["-o ro", "--ro"])
def test_option_ro(server, mount, opts):
    srv = server("memory", "1M")
    m = mount(srv.uri(), opts=opts)
    assert _modes(m) == {"disk": 0o444}
    import errno
    with pytest.raises(OSError) as e:
        os.open(m / "disk", os.O_WRONLY)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        os.open(m / "disk", os.O_RDWR)
    assert e.value.errno == errno.EROFS
    read_file(m / "disk", 0, 4096)
    assert srv.log.requests("Write") == []


def test_option_sector_size_4096(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "sector_size=4096"])
    assert getx(m / "disk", "user.nbdfs.sector_size") == "4096"
    assert getx(m / "disk", "user.nbdfs.sectors") == str(MiB // 4096)
    with open(m / "disk", "r+b") as f:
        f.seek(4097)
        f.write(b"abc")
    assert read_file(m / "disk", 4096, 5) == b"\0abc\0"


@pytest.mark.parametrize("opts,attr,want", [
    (["--sector-size=4096"], "user.nbdfs.sector_size", "4096"),
    (["--sector-size", "4096"], "user.nbdfs.sector_size", "4096"),
    (["--timeout=0"], None, None),
    (["--timeout", "5"], None, None),
    (["--connections=1"], None, None),
    (["--partitions=auto"], "user.nbdfs.partition", "none"),
    (["--umask=077"], None, None),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_long_options(nbdkit, mount, opts, attr, want):
    """SPEC §2: every option also as a long option."""
    m = mount(nbdkit("memory", "1M").uri(), opts=opts)
    assert m.files() == ["disk"]
    if attr:
        assert getx(m / "disk", attr) == want


def test_default_sector_size_512(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri())
    assert getx(m / "disk", "user.nbdfs.sector_size") == "512"


def test_default_sector_size_512_when_server_minimum_is_smaller(nbdkit, mount):
    srv = nbdkit("--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=1",
                 "blocksize-preferred=4096", "blocksize-maximum=1048576")
    m = mount(srv.uri())
    assert getx(m / "disk", "user.nbdfs.sector_size") == "512"


def test_default_sector_size_from_server_minimum(nbdkit, mount):
    srv = nbdkit("--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=4096",
                 "blocksize-error-policy=error")
    m = mount(srv.uri())
    assert getx(m / "disk", "user.nbdfs.sector_size") == "4096"


def _parallel_reads(path, seconds=3):
    """O_DIRECT random reads at a deep queue (fio): enough requests at once
    that they queue up on a connection."""
    run(["fio", "--name=load", f"--filename={path}", "--rw=randread", "--bs=4k",
         "--ioengine=libaio", "--iodepth=64", "--numjobs=2", "--direct=1",
         f"--runtime={seconds}", "--time_based", "--output=/dev/null"], timeout=120)


def test_option_connections_multi_conn_server(server, mount):
    """SPEC §6: extra connections open when requests queue up, at most
    connections=N of them; one while the load is light."""
    srv = server("--filter=delay", "memory", "4M", "delay-read=5ms")  # multi-conn
    m = mount(srv.uri(), opts=["-o", "connections=3"])
    read_file(m / "disk", 0, 4096)
    assert srv.log.max_open_connections() == 1, srv.log.text()[-2000:]
    _parallel_reads(m / "disk")
    assert srv.log.max_open_connections() == 3, srv.log.text()[-3000:]
    with open(m / "disk", "r+b") as f:
        f.write(b"z" * 8192)
    assert read_file(m / "disk", 0, 8192) == b"z" * 8192


def test_default_connections_several_with_multi_conn(server, mount):
    srv = server("--filter=delay", "memory", "4M", "delay-read=5ms")
    m = mount(srv.uri())
    _parallel_reads(m / "disk")
    assert srv.log.max_open_connections() >= 2, srv.log.text()[-3000:]


def test_option_connections_server_without_multi_conn(server, mount):
    srv = server("--filter=multi-conn", "memory", "4M", "multi-conn-mode=disable")
    m = mount(srv.uri(), opts=["-o", "connections=4"], foreground=True)
    with open(m / "disk", "r+b") as f:
        f.write(b"q" * 1024)
    assert read_file(m / "disk", 0, 1024) == b"q" * 1024
    assert srv.log.open_connections() == 1
    assert any(w in m.log().lower() for w in ("multi-conn", "multi_conn", "connection")), \
        f"no warning logged: {m.log()!r}"


def test_default_connections_one_without_multi_conn(server, mount):
    srv = server("--filter=multi-conn", "memory", "4M", "multi-conn-mode=disable")
    m = mount(srv.uri())
    read_file(m / "disk", 0, 4096)
    assert srv.log.open_connections() == 1


def test_option_timeout_accepted(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "timeout=5"])
    assert m.files() == ["disk"]
    m2 = mount(nbdkit("memory", "1M").uri(), opts=["-o", "timeout=0"])
    assert m2.files() == ["disk"]


def test_option_uid_gid(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "uid=1234,gid=5678,split=disk:8"])
    for f in m.files():
        st = os.stat(m / f)
        assert (st.st_uid, st.st_gid) == (1234, 5678), f


def test_owner_default_is_mounting_user(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri())
    st = os.stat(m / "disk")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())


def test_option_umask(nbdkit, mount):
    m = mount(nbdkit("memory", "1M").uri(), opts=["-o", "umask=027,split=disk:8"])
    assert _modes(m) == {"disk": 0o640, "disk-part1": 0o640, "disk-part2": 0o640}
    m2 = mount(nbdkit("memory", "1M").uri(), opts=["-o", "umask=077,ro"])
    assert _modes(m2) == {"disk": 0o400}


@pytest.fixture
def open_dir():
    """A mount point every user can reach (tmp_path's parents are 0700)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="nbdfs-e2e-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        if not is_mounted(d):
            os.rmdir(d)


def _as_nobody(*cmd):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] +
                          [str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=30)


def test_option_allow_other(nbdkit, mount, open_dir):
    m = mount(nbdkit("pattern", "1M").uri(), opts=["-o", "allow_other"], mnt=open_dir)
    assert "allow_other" in mount_entry(m.path)[3] or _as_nobody("stat", m / "disk").returncode == 0
    r = _as_nobody("head", "-c", "8", m / "disk")
    assert r.returncode == 0, r.stderr
    assert r.stdout == pattern_bytes(0, 8)


def test_without_allow_other_others_are_denied(nbdkit, mount, open_dir):
    m = mount(nbdkit("pattern", "1M").uri(), mnt=open_dir)
    assert _as_nobody("stat", m / "disk").returncode != 0


# ---------------------------------------------------------------- TCP and TLS forms

def test_tcp_uri(nbdkit, mount):
    srv = nbdkit("pattern", "1M", tcp=True)
    assert srv.uri().startswith("nbd://127.0.0.1:")
    m = mount(srv.uri())
    assert m.files() == ["disk"]
    assert read_file(m / "disk", 777, 33) == pattern_bytes(777, 33)


def test_tcp_uri_with_export_name(nbdkit, mount):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-strict=true",
                 "exportname=vm", tcp=True)
    m = mount(srv.uri("vm"))
    assert m.files() == ["vm"]


def _certtool(*args, cwd):
    run(["certtool"] + list(args), cwd=cwd, timeout=120)


def _ca(d, cn):
    d.mkdir()
    (d / "ca.info").write_text(f'cn = "{cn}"\nca\ncert_signing_key\nexpiration_days = 2\n')
    _certtool("--generate-privkey", "--outfile", "ca-key.pem", cwd=d)
    _certtool("--generate-self-signed", "--load-privkey", "ca-key.pem", "--template", "ca.info",
              "--outfile", "ca-cert.pem", cwd=d)


def _cert(ca, d, prefix, info):
    d.mkdir()
    (d / f"{prefix}.info").write_text(info)
    _certtool("--generate-privkey", "--outfile", f"{prefix}-key.pem", cwd=d)
    _certtool("--generate-certificate", "--load-ca-certificate", ca / "ca-cert.pem",
              "--load-ca-privkey", ca / "ca-key.pem", "--load-privkey", f"{prefix}-key.pem",
              "--template", f"{prefix}.info", "--outfile", f"{prefix}-cert.pem", cwd=d)
    (d / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())


@pytest.fixture
def certs(tmp_path):
    """server/ (for nbdkit), client/ (same CA, with a client cert), other/ (an
    unrelated CA: the server cannot be verified with it)."""
    base = tmp_path / "x509"
    base.mkdir()
    _ca(base / "ca", "e2e CA")
    _ca(base / "otherca", "unrelated CA")
    _cert(base / "ca", base / "server", "server",
          'cn = "localhost"\ndns_name = "localhost"\nip_address = "127.0.0.1"\n'
          'tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n')
    _cert(base / "ca", base / "client", "client",
          'cn = "alice"\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n')
    _cert(base / "otherca", base / "other", "client",
          'cn = "mallory"\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n')
    return base


def test_tls_certificates(nbdkit, mount, certs):
    srv = nbdkit("--tls=require", f"--tls-certificates={certs / 'server'}", "memory", "1M",
                 tcp=True)
    uri = f"nbds://localhost:{srv.port}/"
    m = mount(uri, opts=["-o", f"tls-certificates={certs / 'client'}"])
    assert m.files() == ["disk"]
    with open(m / "disk", "r+b") as f:
        f.write(b"over tls")
    assert read_file(m / "disk", 0, 8) == b"over tls"


def test_tls_unverifiable_server_fails_unless_verify_off(nbdkit, mount, certs):
    srv = nbdkit("--tls=require", f"--tls-certificates={certs / 'server'}", "memory", "1M",
                 tcp=True)
    uri = f"nbds://localhost:{srv.port}/"
    _refused_then_mounted(mount, uri, f"tls-certificates={certs / 'other'}",
                          f"tls-certificates={certs / 'other'},tls-verify-peer=off")


def test_tls_psk_unix(nbdkit, mount, tmp_path):
    psk = _psk(tmp_path, "k.psk")
    srv = nbdkit("--tls=require", f"--tls-psk={psk}", "pattern", "1M")
    m = mount(f"nbds+unix://alice@/?socket={srv.sock}", opts=["-o", f"tls-psk={psk}"])
    assert read_file(m / "disk", 4096, 8) == pattern_bytes(4096, 8)


def test_nbd_uri_default_port(mount):
    """nbd://host with no port means 10809 (needs that port free: waits for it)."""
    import socket as so

    def port_free():
        with so.socket(so.AF_INET, so.SOCK_STREAM) as s:
            s.setsockopt(so.SOL_SOCKET, so.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", 10809))
                return True
            except OSError:
                return False
    wait_for(port_free, timeout=120, what="port 10809 to be free")
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p",
                             "10809", "pattern", "1M"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                with so.create_connection(("127.0.0.1", 10809), timeout=0.5):
                    return True
            except OSError:
                assert proc.poll() is None, "nbdkit could not listen on 10809"
                return False
        wait_for(up, timeout=30, what="nbdkit on 10809")
        for uri in ("nbd://127.0.0.1", "nbd://127.0.0.1/", "nbd://localhost"):
            m = mount(uri)
            assert m.files() == ["disk"]
            assert read_file(m / "disk", 8, 8) == pattern_bytes(8, 8)
            m.unmount()
    finally:
        from nbdfs_test.polling import kill_and_wait
        kill_and_wait(proc)


def test_all_exports_many(nbdkit, mount):
    srv = nbdkit("eval", "list_exports=for i in $(seq 1 200); do echo exp$i; done",
                 "get_size=echo 64K", "pread=head -c $3 /dev/zero")
    m = mount(srv.uri(), opts=["-a"])
    files = m.files()
    assert len(files) == 200
    assert set(files) == {f"exp{i}" for i in range(1, 201)}


def test_list_over_tls(nbdfs_bin, nbdkit, tmp_path):
    psk = _psk(tmp_path, "k.psk")
    srv = nbdkit("--tls=require", f"--tls-psk={psk}", "--filter=exportname", "memory", "1M",
                 "exportname-list=explicit", "exportname=a", "exportname=b")
    rc, out, err = nbdfs(nbdfs_bin, "--list", "-o", f"tls-psk={psk}",
                         f"nbds+unix://alice@/?socket={srv.sock}")
    assert rc == 0, err
    assert out.split() == ["a", "b"]
    rc, out, err = nbdfs(nbdfs_bin, "--list", srv.uri())
    assert rc != 0 and "TLS" in err.upper(), (rc, err)


def test_startup_mountpoint_not_a_directory(nbdkit, mount, tmp_path):
    f = tmp_path / "plainfile"
    f.write_text("x")
    m = mount(nbdkit("memory", "1M").uri(), mnt=f, check=False)
    assert m.rc != 0
    assert not is_mounted(f)
    lines = [l for l in m.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "plainfile" in lines[0], m.stderr
