"""SPEC §2 `io_timeout` and §5 "server silent": a server that stays
connected but stops answering (SIGSTOP; a link that drops every packet) is
a lost connection after io_timeout, then `timeout` applies as for a server
that went away; metadata never waits for it; once it answers again new
requests succeed.  Every SIGSTOP is undone (SIGCONT) in clean-up."""
import errno
import os
import subprocess
import time

import pytest

from nbdfs_test.data import MiB, direct_pread, getx, read_file, timed
from nbdfs_test.polling import wait_for
from nbdfs_test.threads import Call


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_silent_server_fails_the_request_then_recovers(random_export, mount, stopped, tcp):
    srv, img, data = random_export(8 * MiB, tcp=tcp)
    m = mount(srv.uri(), opts=["-o", "io_timeout=2,timeout=2"])
    assert direct_pread(m / "disk", 0, 4096) == data[:4096]
    stopped(srv.proc)
    read = Call(direct_pread, m / "disk", MiB, 4096, name="the read on a silent server").start()
    try:
        # Metadata stays responsive while the read waits for the server.
        time.sleep(0.5)
        for _ in range(5):
            r, e, dt = timed(lambda: (os.listdir(m.path), os.stat(m / "disk"),
                                       getx(m / "disk", "user.nbdfs.sectors")))
            assert e is None and dt < 1.0, (e, dt)
        read.join(30)
    finally:
        stopped.cont(srv.proc)
        read.wait(60)
    assert read.errno == errno.EIO, (read.value, read.errno, read.dt)
    assert read.dt < 15, (read.value, read.errno, read.dt)
    # The server answers again: new requests reconnect and succeed.
    wait_for(lambda: timed(lambda: direct_pread(m / "disk", 2 * MiB, 4096))[1] is None, timeout=30,
             what="a read to succeed after SIGCONT")
    assert direct_pread(m / "disk", 3 * MiB, 4096) == data[3 * MiB:3 * MiB + 4096]


def test_slow_server_within_io_timeout_is_not_touched(server, mount):
    """Replies slower than a second but within io_timeout: no reconnect."""
    srv = server("--filter=delay", "memory", "4M", "delay-read=1500ms")
    m = mount(srv.uri(), opts=["-o", "io_timeout=5,timeout=1"])
    assert direct_pread(m / "disk", 0, 4096) == bytes(4096)
    assert srv.log.open_connections() == 1
    assert len(srv.log.connects()) == 2, srv.log.text()  # the mount's INFO, one data connection


def test_io_timeout_0_waits_for_a_slow_server(server, mount):
    srv = server("--filter=delay", "memory", "4M", "delay-read=2")
    m = mount(srv.uri(), opts=["-o", "io_timeout=0,timeout=1"])
    assert direct_pread(m / "disk", 0, 4096) == bytes(4096)


NS_SETUP = """
set -e
ip netns add {ns}
ip link add {vh} type veth peer name {vn}
ip link set {vn} netns {ns}
ip addr add {host}/30 dev {vh}
ip link set {vh} up
ip netns exec {ns} ip addr add {peer}/30 dev {vn}
ip netns exec {ns} ip link set {vn} up
ip netns exec {ns} ip link set lo up
"""


@pytest.fixture
def netns():
    """A network namespace joined to this one by a veth pair: a test host
    whose link can be cut.  Deleted (with everything in it) at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    tag = f"{os.getpid() % 100000}"
    ns = f"nbdfs-t{tag}"
    net = {"ns": ns, "vh": f"nbdh{tag}", "vn": f"nbdn{tag}",
           "host": f"10.213.{os.getpid() % 250}.1", "peer": f"10.213.{os.getpid() % 250}.2"}
    procs = []
    try:
        subprocess.run(["bash", "-c", NS_SETUP.format(**net)], check=True, timeout=30,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def spawn(cmd, **kw):
            p = subprocess.Popen(["ip", "netns", "exec", ns] + cmd, **kw)
            procs.append(p)
            return p
        net["spawn"] = spawn
        net["cut"] = lambda: subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "link", "set", net["vn"], "down"],
            check=True, timeout=30)
        yield net
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        subprocess.run(["ip", "link", "del", net["vh"]], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)


def test_keepalive_notices_a_dead_link_with_nothing_in_flight(tmp_path, netns, mount):
    """Over TCP, a peer whose link died is noticed by keepalive (derived from
    io_timeout) even when no request is waiting."""
    err = open(tmp_path / "nbdkit.err", "wb")
    srv = netns["spawn"](["nbdkit", "-f", "--exit-with-parent", "-i", netns["peer"], "-p", "10809",
                          "memory", "4M"], stdout=err, stderr=err)
    err.close()
    uri = f"nbd://{netns['peer']}:10809/"

    def up():
        r = subprocess.run(["nbdinfo", "--size", uri], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=10)
        return r.returncode == 0
    wait_for(up, timeout=30, what="nbdkit in the namespace")
    m = mount(uri, opts=["-o", "io_timeout=3,timeout=5"], foreground=True)
    assert read_file(m / "disk", 0, 4096) == bytes(4096)
    assert "lost" not in m.log()
    netns["cut"]()
    # Nothing is in flight: only keepalive can tell.
    wait_for(lambda: "connection lost" in m.log(), timeout=60,
             what=f"keepalive to notice the dead link (log:\n{m.log()})")
    assert srv.poll() is None
