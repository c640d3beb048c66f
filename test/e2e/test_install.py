# SPDX-License-Identifier: LGPL-2.1-or-later
"""`meson install` works as written: into a scratch DESTDIR it puts the
binary, the man page, the bash completion and a systemd unit whose ExecStart
is the installed binary (Type=notify); and `nbdfs --version` names what nbdfs
runs on."""
import json
import os
import re
import shutil
import subprocess

import pytest

from nbdfs_test import build as top
from nbdfs_test.build import build_path
from nbdfs_test.polling import run


def _meson():
    m = shutil.which("meson")
    if m is None:
        pytest.fail("meson is not installed")
    return m


def _introspect(what):
    r = run([_meson(), "introspect", what, top.BUILD_DIR], timeout=60)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(DESTDIR, the options of the build: prefix, bindir, mandir, ...)."""
    dest = tmp_path_factory.mktemp("destdir")
    run([_meson(), "install", "-C", top.BUILD_DIR, "--destdir", str(dest), "--no-rebuild"],
        timeout=300)
    opts = {o["name"]: o["value"] for o in _introspect("--buildoptions")}
    return dest, opts


def _under(dest, path):
    return os.path.join(str(dest), path.lstrip("/"))


def _absolute(opts, key):
    v = opts[key]
    return v if os.path.isabs(v) else os.path.join(opts["prefix"], v)


def test_install_puts_the_binary_in_bindir(installed):
    dest, opts = installed
    binary = _under(dest, os.path.join(_absolute(opts, "bindir"), "nbdfs"))
    assert os.access(binary, os.X_OK), f"no {binary}"
    r = run([binary, "--version"], timeout=30)
    assert r.stdout.decode().startswith("nbdfs ")


def test_install_puts_the_man_page_in_man1(installed):
    dest, opts = installed
    page = _under(dest, os.path.join(_absolute(opts, "mandir"), "man1", "nbdfs.1"))
    assert os.path.exists(page), f"no {page}"
    head = open(page, errors="replace").read(4000)
    assert re.search(r'^\.TH "?NBDFS"? "?1"?', head, re.M), head[:400]


def test_install_puts_the_completion_where_bash_completion_looks(installed):
    dest, opts = installed
    want = opts.get("bashcompletionsdir") or ""
    if not want:
        r = subprocess.run(["pkg-config", "--variable=completionsdir",
                            f"--define-variable=datadir={_absolute(opts, 'datadir')}",
                            "bash-completion"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=30)
        want = r.stdout.decode().strip() if r.returncode == 0 else \
            os.path.join(_absolute(opts, "datadir"), "bash-completion", "completions")
    path = _under(dest, os.path.join(want, "nbdfs"))
    assert os.path.exists(path), f"no {path}; installed: {sorted(_files(dest))}"
    assert "complete -F _nbdfs nbdfs" in open(path).read()


def _files(dest):
    for root, _, names in os.walk(dest):
        for n in names:
            yield os.path.relpath(os.path.join(root, n), dest)


def test_install_puts_a_notify_unit_running_the_installed_binary(installed):
    dest, opts = installed
    units = [f for f in _files(dest) if f.endswith("nbdfs@.service")]
    assert len(units) == 1, sorted(_files(dest))
    assert "/systemd/system/" in "/" + units[0], units[0]
    text = open(os.path.join(dest, units[0])).read()
    assert "@BINDIR@" not in text
    exec_start = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
    assert exec_start == os.path.join(_absolute(opts, "bindir"), "nbdfs"), exec_start
    assert os.path.samefile(_under(dest, exec_start),
                            _under(dest, os.path.join(_absolute(opts, "bindir"), "nbdfs")))
    assert re.search(r"^Type=notify$", text, re.M), text
    # notify comes from the process systemd started: it must stay in the foreground
    assert re.search(r"^ExecStart=\S+ -f ", text, re.M), text
    if shutil.which("systemd-analyze"):
        unit = dest / "nbdfs@x.service"
        unit.write_text(text.replace(exec_start, shutil.which("true")))
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        problems = [l for l in r.stderr.decode(errors="replace").splitlines()
                    if "nbdfs@x.service" in l and "ConditionPathExists" not in l]
        assert not problems, problems


# ---------------------------------------------------------------- --version

def _project_version():
    return _introspect("--projectinfo")["version"]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_what_nbdfs_runs_on(nbdfs_bin, flag):
    r = run([nbdfs_bin, flag], timeout=30)
    out = r.stdout.decode()
    lines = dict(l.split(" ", 1) for l in out.splitlines() if " " in l)
    assert out.splitlines()[0] == f"nbdfs {_project_version()}", out
    assert re.match(r"3\.\d+\.\d+", lines["libfuse"]), out
    assert re.match(r"\d+\.\d+\.\d+", lines["gnutls"]), out
    assert re.match(r"2\.\d+\.\d+", lines["glib"]), out
    proto = re.search(r"^FUSE protocol (\d+)\.(\d+)", out, re.M)
    assert proto and int(proto.group(1)) == 7 and int(proto.group(2)) >= 31, out
    transport = re.search(r"^FUSE transport (.*)$", out, re.M).group(1)
    assert transport.startswith("/dev/fuse" if os.path.exists("/dev/fuse") else "/dev/fuse missing")
    param = "/sys/module/fuse/parameters/enable_uring"
    if not os.path.exists(param):
        assert "io_uring not offered" in transport, transport
    elif open(param).read().strip() in ("Y", "1"):
        assert "io_uring offered" in transport, transport
    else:
        assert "io_uring not enabled" in transport, transport
    assert r.stderr == b""
