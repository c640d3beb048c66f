# SPDX-License-Identifier: LGPL-2.1-or-later
"""SPEC §2, option values: every numeric option is range-checked and a bad
value is refused with one line naming the option, before anything connects
or mounts (issue 8, "Option values"); the edges of each range are accepted;
TLS credentials given for no TLS source are refused naming the source; and
-o fsname=/subtype= reach /proc/self/mountinfo, the default fsname being the
first source's URI without secrets."""
import os

import pytest

from nbdfs_test.mounts import is_mounted
from nbdfs_test.polling import run

NUMERIC = {
    # option: (bad values, good edge values)
    "sector_size": (["-1", "0", "1000", "511", "8192", "4294967296", "abc", "", "512x", "4k"],
                    ["512", "4096"]),
    "connections": (["-1", "0", "17", "4294967296", "18446744073709551616", "two", "", "1.5"],
                    ["1", "16"]),
    "timeout": (["-1", "86401", "4294967295", "4294967296", "1e3", "", "5s", " 5"],
                ["0", "86400"]),
    "io_timeout": (["-1", "86401", "4294967296", "x", "", "0x10"], ["0", "86400"]),
    "idle_timeout": (["-1", "86401", "4294967296", "x", "", "+5"], ["0", "86400"]),
    "uid": (["-1", "4294967295", "4294967296", "root", "", "1.0"], ["0", "4294967294"]),
    "gid": (["-1", "4294967295", "4294967296", "wheel", "", "1.0"], ["0", "4294967294"]),
    "umask": (["-1", "1000", "0778", "8", "0x22", "u=rwx", ""], ["0", "0777", "022"]),
}

BAD = [(name, v) for name, (bad, _) in NUMERIC.items() for v in bad]


def _one_line_naming(m, name):
    lines = [l for l in m.stderr.splitlines() if l.strip()]
    assert m.rc != 0, f"{name}: accepted\n{m.stderr}"
    assert len(lines) == 1, f"{name}: want one line:\n{m.stderr}"
    assert lines[0].startswith("nbdfs: ") and name in lines[0], lines[0]
    assert not is_mounted(m.path)


@pytest.fixture
def srv(server):
    return server("memory", "1M", log=False)


@pytest.mark.parametrize("name, value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_value_is_refused_naming_the_option(srv, mount, name, value):
    m = mount(srv.uri(), opts=["-o", f"{name}={value}"], check=False, pidfile=False)
    _one_line_naming(m, name)


@pytest.mark.parametrize("flag", ["--sector-size", "--connections", "--timeout",
                                  "--io-timeout", "--idle-timeout", "--uid", "--gid", "--umask"])
def test_bad_value_of_a_long_option_is_refused(srv, mount, flag):
    name = flag[2:].replace("-", "_")
    for form in ([f"{flag}=-1"], [flag, "-1"]):
        m = mount(srv.uri(), opts=form, check=False, pidfile=False)
        _one_line_naming(m, name)


@pytest.mark.parametrize("name", sorted(NUMERIC))
def test_edge_values_are_accepted(srv, mount, name):
    for value in NUMERIC[name][1]:
        m = mount(srv.uri(), opts=["-o", f"{name}={value}"])
        assert m.files() == ["disk"], (name, value)
        m.unmount()


# ---------------------------------------------------------------- TLS options

def _psk(tmp_path):
    path = tmp_path / "keys.psk"
    run(["psktool", "-u", "alice", "-p", path])
    return str(path)


@pytest.mark.parametrize("opt", ["tls-psk", "tls-certificates"])
def test_tls_credentials_for_a_plain_source_are_refused(srv, mount, tmp_path, opt):
    cred = _psk(tmp_path) if opt == "tls-psk" else str(tmp_path)
    m = mount(srv.uri(), opts=["-o", f"{opt}={cred}"], check=False, pidfile=False)
    _one_line_naming(m, opt)
    assert srv.uri() in m.stderr, m.stderr


def test_tls_psk_with_a_plain_uri_is_refused_by_list_too(srv, nbdfs_bin, tmp_path):
    r = run([nbdfs_bin, "--list", "-o", f"tls-psk={_psk(tmp_path)}", srv.uri()], check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and r.stdout == b"", err
    assert len(err.strip().splitlines()) == 1 and "tls-psk" in err and srv.uri() in err, err


def test_tls_psk_with_a_tls_and_a_plain_source_is_for_the_tls_one(server, mount, tmp_path):
    psk = _psk(tmp_path)
    tls = server("memory", "1M", extra=["--tls=require", f"--tls-psk={psk}"], log=False)
    plain = server("memory", "2M", log=False)
    tls_uri = tls.uri(scheme="nbds").replace("nbds+unix:///", "nbds+unix://alice@/")
    m = mount(f"a={tls_uri}", f"b={plain.uri()}", opts=["-o", f"tls-psk={psk}"])
    assert m.files() == ["a", "b"]


# ---------------------------------------------------------------- fsname, subtype

def _mountinfo(path):
    """(fstype, source) of path in /proc/self/mountinfo (octal escapes undone)."""
    def unescape(s):
        import re
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    path = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.rstrip("\n").split(" - ", 1)
            if unescape(pre.split()[4]) == path:
                fstype, source = post.split()[:2]
                found = (fstype, unescape(source))
    return found


def test_default_fsname_is_the_first_uri_without_secrets(server, mount, tmp_path):
    psk = _psk(tmp_path)
    tls = server("memory", "1M", extra=["--tls=require", f"--tls-psk={psk}"], log=False)
    plain = server("memory", "1M", log=False)
    uri = f"nbds+unix://alice@/?socket={tls.sock}&tls-psk-file={psk}"
    m = mount(uri, f"second={plain.uri()}")
    fstype, source = _mountinfo(m.path)
    assert fstype == "fuse.nbdfs"
    assert source == f"nbds+unix:///?socket={tls.sock}", source
    assert "alice" not in source and "psk" not in source


def test_fsname_and_subtype_are_honoured(srv, mount):
    m = mount(srv.uri(), opts=["-o", "fsname=my disks,subtype=blocks"])
    assert _mountinfo(m.path) == ("fuse.blocks", "my disks")
