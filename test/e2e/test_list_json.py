# SPDX-License-Identifier: LGPL-2.1-or-later
"""SPEC §2, `nbdfs --list --json URI`: one JSON document (Python's json
parses it) with each export's name, description, size, read-only flag, block
sizes and transmission flags, checked against nbdkit exports built for it and
against `nbdinfo --list --json` of the same server (the independent oracle);
valid JSON for names that are not UTF-8; the exit codes of --list; unknown
options after --list are errors."""
import json
import os
import subprocess
import urllib.parse

import pytest

from nbdfs_test.mounts import is_mounted
from nbdfs_test.polling import run

# An nbdkit sh plugin with three exports that differ in everything --list shows.
SERVER_SCRIPT = r"""#!/usr/bin/env bash
case "$1" in
list_exports) printf 'INTERLEAVED\nalpha\nthe first disk\nbeta\nread-only, "quoted" \\ and\ttab\ngamma\n\n' ;;
open) echo "$3" ;;
get_size) case "$2" in alpha) echo 1M ;; beta) echo 2M ;; *) echo 64K ;; esac ;;
block_size) case "$2" in alpha) echo 512 4096 1M ;; beta) echo 4096 4096 64K ;; *) exit 2 ;; esac ;;
can_write) [ "$2" = beta ] && exit 3 || exit 0 ;;
can_flush|can_trim|can_multi_conn) [ "$2" = alpha ] && exit 0 || exit 3 ;;
can_fua) [ "$2" = alpha ] && echo native || echo none ;;
can_zero) exit 3 ;;
pread) head -c "$3" /dev/zero ;;
pwrite|flush|trim) cat >/dev/null ;;
thread_model) echo parallel ;;
*) exit 2 ;;
esac
"""

FLAGS = ["is_rotational", "can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
         "can_multi_conn", "can_trim", "can_zero"]


def nbdfs(binary, *args, timeout=60):
    r = subprocess.run([binary] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode(errors="replace")


@pytest.fixture
def three_exports(nbdkit, tmp_path):
    script = tmp_path / "exports.sh"
    script.write_text(SERVER_SCRIPT)
    script.chmod(0o755)
    return nbdkit("sh", script)


def test_list_json_describes_every_export(nbdfs_bin, three_exports):
    rc, out, err = nbdfs(nbdfs_bin, "--list", "--json", three_exports.uri())
    assert rc == 0, err
    assert err == ""
    doc = json.loads(out)
    assert doc["TLS"] is False
    assert doc["uri"] == f"nbd+unix:///?socket={three_exports.sock}"
    ex = {e["export-name"]: e for e in doc["exports"]}
    assert [e["export-name"] for e in doc["exports"]] == ["alpha", "beta", "gamma"]

    a, b, g = ex["alpha"], ex["beta"], ex["gamma"]
    assert a["description"] == "the first disk"
    assert b["description"] == 'read-only, "quoted" \\ and\ttab'
    assert g["description"] == ""
    assert (a["export-size"], b["export-size"], g["export-size"]) == (1 << 20, 2 << 20, 64 << 10)
    assert (a["is_read_only"], b["is_read_only"], g["is_read_only"]) == (False, True, False)
    assert (a["block_size_minimum"], a["block_size_preferred"], a["block_size_maximum"]) == \
        (512, 4096, 1 << 20)
    assert (b["block_size_minimum"], b["block_size_preferred"], b["block_size_maximum"]) == \
        (4096, 4096, 64 << 10)
    assert (g["block_size_minimum"], g["block_size_preferred"], g["block_size_maximum"]) == \
        (None, None, None)
    assert a["can_flush"] and a["can_trim"] and a["can_fua"] and a["can_multi_conn"]
    assert not (b["can_flush"] or b["can_trim"] or b["can_fua"] or b["can_multi_conn"])
    assert not b["can_zero"] and not b["can_fast_zero"]  # read-only: no write flags
    for e in doc["exports"]:
        assert e["uri"] == f"nbd+unix:///{e['export-name']}?socket={three_exports.sock}"
        for f in FLAGS:
            assert isinstance(e[f], bool), (e["export-name"], f)


def test_list_json_agrees_with_nbdinfo(nbdfs_bin, three_exports):
    """Every key both print has the same value as nbdinfo's (can_df aside:
    the server offers DF only to a client that negotiated structured replies,
    which nbdinfo does before listing)."""
    ours = json.loads(nbdfs(nbdfs_bin, "--list", "--json", three_exports.uri())[1])
    theirs = json.loads(run(["nbdinfo", "--list", "--json", three_exports.uri()],
                            timeout=60).stdout)
    assert [e["export-name"] for e in ours["exports"]] == \
        [e["export-name"] for e in theirs["exports"]]
    compared = 0
    for o, t in zip(ours["exports"], theirs["exports"]):
        for k, v in t.items():
            if k in o and o[k] is not None and k != "can_df":
                assert o[k] == v, f"{o['export-name']}: {k}: nbdfs {o[k]!r}, nbdinfo {v!r}"
                compared += 1
    assert compared >= 3 * 12


def test_list_json_names_that_are_not_utf8(nbdfs_bin, nbdkit):
    raw = b"bad\xff\xfename\x01\n\"q\"\\"
    srv = nbdkit("--filter=exportname", "memory", "1M", "exportname-list=explicit",
                 os.fsdecode(b"exportname=" + raw), "exportname=\u00fcber")
    rc, out, err = nbdfs(nbdfs_bin, "--list", "--json", srv.uri())
    assert rc == 0, err
    out.decode("utf-8")  # strict: the document itself is UTF-8
    doc = json.loads(out)
    names = [e["export-name"] for e in doc["exports"]]
    assert names == ["bad\ufffd\ufffdname\x01\n\"q\"\\", "\u00fcber"]
    # the export's uri names it exactly
    uri = doc["exports"][0]["uri"]
    path = urllib.parse.urlsplit(uri).path
    assert urllib.parse.unquote_to_bytes(path[1:]) == raw


def test_list_json_with_no_exports_is_an_empty_array(nbdfs_bin, nbdkit, tmp_path):
    script = tmp_path / "none.sh"
    script.write_text("#!/bin/sh\ncase $1 in list_exports) echo NAMES;; get_size) echo 1M;;"
                      " pread) head -c $3 /dev/zero;; *) exit 2;; esac\n")
    script.chmod(0o755)
    rc, out, err = nbdfs(nbdfs_bin, "--list", "--json", nbdkit("sh", script).uri())
    assert rc == 0, err
    assert json.loads(out)["exports"] == []


@pytest.mark.parametrize("srvargs", [["-o"], ["--mask-handshake=0"]],
                         ids=["oldstyle", "non-fixed-newstyle"])
def test_list_json_server_too_old_exits_2_printing_nothing(nbdfs_bin, nbdkit, srvargs):
    rc, out, err = nbdfs(nbdfs_bin, "--list", "--json", nbdkit(*srvargs, "memory", "1M").uri())
    assert rc == 2 and out == b"", (rc, out, err)
    assert len(err.strip().splitlines()) == 1, err


def test_list_json_unreachable_exits_1_printing_nothing(nbdfs_bin, tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/nothing.sock"
    rc, out, err = nbdfs(nbdfs_bin, "--list", "--json", uri)
    assert rc == 1 and out == b"", (rc, out, err)
    assert len(err.strip().splitlines()) == 1 and uri in err, err


@pytest.mark.parametrize("args, names", [
    (["--list", "-o", "bogus"], "bogus"),
    (["--list", "-o", "allow_other"], "allow_other"),
    (["--list", "--json", "--bogus"], "--bogus"),
    (["--list", "--jsn"], "--jsn"),
    (["--list", "-o", "timeout=-1"], "timeout"),
    (["--list", "EXTRA"], "one URI"),
    (["--json"], "--json"),
    (["--long"], "--long"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_list_refuses_unknown_options(nbdfs_bin, nbdkit, tmp_path, args, names):
    srv = nbdkit("memory", "1M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    extra = [str(mnt)] if args in (["--json"], ["--long"]) else []
    rc, out, err = nbdfs(nbdfs_bin, *[a for a in args if a != "EXTRA"], srv.uri(),
                         *(["second-arg"] if "EXTRA" in args else []), *extra)
    assert rc == 1, (rc, out, err)
    assert out == b""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdfs: ") and names in lines[0], err
    assert not is_mounted(mnt)


def test_list_long_and_plain_are_unchanged(nbdfs_bin, three_exports):
    rc, out, err = nbdfs(nbdfs_bin, "--list", three_exports.uri())
    assert rc == 0 and out.decode().split("\n") == ["alpha", "beta", "gamma", ""], (out, err)
    rc, out, err = nbdfs(nbdfs_bin, "--list", "--long", three_exports.uri())
    lines = out.decode().splitlines()
    assert rc == 0 and len(lines) == 3, (out, err)
    assert lines[1].split("\t")[:4] == ["beta", f"size={2 << 20}", "ro", "block=4096/4096/65536"]
