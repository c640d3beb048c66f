"""NBD client core vs nbdkit: handshake variants and export listing
(oldstyle, non-fixed newstyle, NBD_OPT_LIST refused, unknown exports, many
exports with descriptions)."""
import os
import re

import pytest

from nbdfs_test.core import run_cli

MiB = 1024 * 1024


def kind(res, name):
    """True if nbdc-cli reported the NbdcError kind NAME on stderr."""
    return re.search(rf"nbdc-cli: \w+: {name}: ", res.stderr) is not None


def assert_kind(res, rc, name):
    """nbdc-cli exited with @rc and reported the NbdcError kind @name."""
    assert res.returncode == rc, res
    assert kind(res, name), res


def list_lines(res):
    return [line.split("\t") for line in res.text.splitlines() if line]


def assert_export(uri, name, description):
    """info on @uri names the export @name with @description."""
    res = run_cli(uri, "info")
    assert res.returncode == 0, res
    assert res.info()["export_name"] == name
    assert res.info()["description"] == description


def assert_list_unsupported(srv):
    """Listing the exports of @srv fails with UNSUPPORTED (exit 2)."""
    res = run_cli(srv.uri(), "list")
    assert_kind(res, 2, "UNSUPPORTED")


def write_read_8k(srv, off, protocol):
    """Writes 8 KiB of random data at @off and reads it back; the 1 MiB export
    speaks @protocol.  Returns nbdc-cli's info."""
    data = os.urandom(8192)
    res = run_cli(srv.uri(), "info", "write", off, 8192, "read", off, 8192, input=data)
    assert res.returncode == 0, res
    i = res.info()
    assert i["protocol"] == protocol
    assert i["size"] == str(MiB)
    assert res.stdout.endswith(data)
    return i


def test_list_200_exports(nbdkit):
    script = ('echo INTERLEAVED; for i in $(seq 1 200); do echo exp$i; '
              'echo "description of $i"; done')
    srv = nbdkit("eval", f"list_exports={script}", "get_size=echo 1M",
                 "pread=head -c $3 /dev/zero")
    res = run_cli(srv.uri(), "list")
    assert res.returncode == 0, res
    lines = list_lines(res)
    assert [x[0] for x in lines] == [f"exp{i}" for i in range(1, 201)]
    assert [x[1] for x in lines] == [f"description of {i}" for i in range(1, 201)]


def test_list_details(nbdkit):
    script = 'echo INTERLEAVED; for i in 1 2 3; do echo exp$i; echo "d$i"; done'
    srv = nbdkit("eval", f"list_exports={script}", "get_size=echo 3M",
                 "pread=head -c $3 /dev/zero")
    res = run_cli(srv.uri(), "list", opts=["--details"])
    assert res.returncode == 0, res
    lines = list_lines(res)
    assert [x[:2] for x in lines] == [["exp1", "d1"], ["exp2", "d2"], ["exp3", "d3"]]
    for x in lines:
        assert f"size={3 * MiB}" in x[2], x
        assert "read_only=1" in x[2], x   # eval without pwrite is read-only


def test_list_explicit_exportname(nbdkit):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
                 "exportname=disk1", "exportname=disk2", "exportname=disk3",
                 "exportdesc=fixed:test")
    res = run_cli(srv.uri(), "list")
    assert res.returncode == 0, res
    assert list_lines(res) == [["disk1", "test"], ["disk2", "test"], ["disk3", "test"]]


def test_list_no_exports(nbdkit):
    srv = nbdkit("eval", "list_exports=echo NAMES", "get_size=echo 1M",
                 "pread=head -c $3 /dev/zero")
    res = run_cli(srv.uri(), "list")
    assert res.returncode == 0, res
    assert res.text == ""


def test_list_with_names_needing_escapes(nbdkit):
    script = "printf 'INTERLEAVED\\na b\\n\\nwith\\ttab\\nd\\n'"
    srv = nbdkit("eval", f"list_exports={script}", "get_size=echo 1M",
                 "pread=head -c $3 /dev/zero")
    res = run_cli(srv.uri(), "list")
    assert res.returncode == 0, res
    # nbdc-cli prints names escaped (g_strescape): a tab becomes \t
    assert list_lines(res) == [["a b", ""], ["with\\ttab", "d"]]


def test_oldstyle(nbdkit):
    srv = nbdkit("-o", "memory", "1M")
    i = write_read_8k(srv, 4096, "oldstyle")
    assert i["structured_replies"] == "0"
    assert_list_unsupported(srv)


@pytest.mark.parametrize("mask", ["0", "2"])
def test_non_fixed_newstyle(nbdkit, mask):
    """--mask-handshake=0: non-fixed newstyle (=2: also NO_ZEROES): only
    EXPORT_NAME works; listing is impossible."""
    srv = nbdkit(f"--mask-handshake={mask}", "memory", "1M")
    write_read_8k(srv, 0, "newstyle")
    assert_list_unsupported(srv)


def test_fixed_without_no_zeroes(nbdkit):
    srv = nbdkit("--mask-handshake=1", "memory", "1M")
    res = run_cli(srv.uri(), "info", "read", 0, 512)
    assert res.returncode == 0, res
    assert res.info()["protocol"] == "newstyle-fixed"


def test_list_refused(nbdkit):
    """exportname-list=error: nbdkit answers NBD_REP_ERR_PLATFORM, which nbd.h
    maps to UNSUPPORTED (exit 2); connecting still works."""
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=error")
    assert_list_unsupported(srv)
    res = run_cli(srv.uri(), "read", 0, 512)
    assert res.returncode == 0, res


def test_unknown_export_go(nbdkit):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-strict=true",
                 "exportname=a")
    res = run_cli(srv.uri("zzz"), "info")
    assert_kind(res, 1, "NO_EXPORT")
    assert "zzz" in res.stderr, "the message should name the export"
    res = run_cli(srv.uri("a"), "info")
    assert res.returncode == 0, res
    assert res.info()["export_name"] == "a"


def test_unknown_export_export_name_path(nbdkit):
    """Non-fixed newstyle forces NBD_OPT_EXPORT_NAME; nbdkit just closes the
    connection for an unknown name.  That is a clean NO_EXPORT, not a hang."""
    srv = nbdkit("--mask-handshake=0", "--filter=exportname", "memory", "1M",
                 "exportname-strict=true", "exportname=a")
    res = run_cli(srv.uri("zzz"), "info", timeout=60)
    assert_kind(res, 1, "NO_EXPORT")
    res = run_cli(srv.uri("a"), "info")
    assert res.returncode == 0, res


def test_export_name_and_description(nbdkit):
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
                 "exportname=disk1", "exportdesc=fixed:my disk")
    assert_export(srv.uri("disk1"), "disk1", "my disk")


def test_unreachable(tmp_path):
    res = run_cli(f"nbd+unix:///?socket={tmp_path}/nothing.sock", "info")
    assert_kind(res, 1, "CONNECT")
    res = run_cli(f"nbd+unix:///?socket={tmp_path}/nothing.sock", "list")
    assert_kind(res, 1, "CONNECT")


def test_bad_uri():
    res = run_cli("nbd+unix:///disk", "info")
    assert_kind(res, 1, "URI")


def test_canonical_export_name(nbdkit):
    """The default export "" resolves to the server's canonical name
    (NBD_INFO_NAME)."""
    srv = nbdkit("--filter=exportname", "memory", "1M", "default-export=disk1",
                 "exportname=disk1", "exportdesc=fixed:hello")
    assert_export(srv.uri(""), "disk1", "hello")
